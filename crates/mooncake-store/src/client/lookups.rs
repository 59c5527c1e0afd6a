//! Replica lookups: leased lists reused, concurrent ones coalesced.
//!
//! A replica list comes with a lease, and a leased object is never removed, evicted or
//! rewritten in place before the lease ends (its space is parked until then): the replicas
//! keep that version's bytes. So a read of a key whose list this client leased, with a good
//! share of the lease left, reads them without asking the master. A reader may thus see the
//! version it leased until that lease ends; its own writes and removals of a key forget the
//! key's list, so a client always reads what it wrote. Mooncake's own master rewrites leased
//! objects in place, so against it (`mooncake://`) lists are never reused.
//!
//! A lookup that arrives while another is on its way to the master waits for that one to
//! return, then goes out in one batch with every lookup that arrived meanwhile. An idle
//! client pays no delay; a busy one makes one master round trip per wave of reads instead of
//! one per read, which spares both the master's CPU and its own.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mooncake_common::{Error, ErrorKind, Result};
use tokio::sync::oneshot;

use super::master_client::MasterClient;
use super::transfer::{checked_replicas, Replica};
use crate::proto;
use crate::wire::from_outcome;

/// A key's replicas and how long the lease on them lasts.
pub(super) type Lookup = Result<(Vec<Replica>, Duration)>;

/// How long a read waits for the holders of a key to mount again after a master recovered
/// (they do on their next ping, or at once when they notice a new leader), and a write for
/// the nodes with room to take new objects again.
pub(super) const RECOVERY_WAIT: Duration = Duration::from_secs(3);
pub(super) const RECOVERY_POLL: Duration = Duration::from_millis(50);

/// The master knows the key but cannot serve it yet (see [`RECOVERY_WAIT`]).
fn recovering(e: &Error) -> bool {
    e.kind() == ErrorKind::UnavailableInCurrentStatus
}

/// A list is reused while more than this share of its lease is left: a read that starts on
/// it finishes well inside the lease.
const REUSE_WHILE_LEFT: u32 = 4;

/// Lists kept at most; past this, expired ones go first.
const MAX_LEASED: usize = 1 << 16;

pub(super) struct Lookups {
    master: MasterClient,
    queue: Mutex<Queue>,
    /// Whether the master keeps a leased object's bytes until the lease ends.
    reuse: bool,
    leased: Mutex<HashMap<String, Leased>>,
    /// Counts this client's writes and removals: a list looked up before one of them is not
    /// kept, whatever key it touched.
    changes: AtomicU64,
}

/// A list this client holds a lease on.
struct Leased {
    list: Vec<Replica>,
    until: Instant,
    ttl: Duration,
    /// The master's generation it came from (a new leader knows no leases).
    generation: u64,
}

#[derive(Default)]
struct Queue {
    /// A wave is on its way to the master.
    busy: bool,
    waiting: Vec<(String, oneshot::Sender<Lookup>)>,
}

impl Lookups {
    pub(super) fn new(master: MasterClient) -> Arc<Self> {
        Arc::new(Self {
            reuse: master.leases_keep_bytes(),
            master,
            queue: Mutex::new(Queue::default()),
            leased: Mutex::default(),
            changes: AtomicU64::new(0),
        })
    }

    /// The replicas of `key`: a leased list of it, or else one from the master.
    pub(super) async fn lookup(self: &Arc<Self>, key: &str) -> Lookup {
        if let Some(hit) = self.reused(key) {
            return Ok(hit);
        }
        let (asked, generation, changes) = self.before();
        let answer = self.lookup_fresh(key).await;
        if let Ok((list, ttl)) = &answer {
            self.keep(key, list, *ttl, (asked, generation, changes));
        }
        answer
    }

    /// Forgets the lists of `keys`: this client is about to change them, or just did.
    pub(super) fn forget(&self, keys: &[String]) {
        self.changes.fetch_add(1, Ordering::AcqRel);
        let mut leased = lock(&self.leased);
        for key in keys {
            leased.remove(key);
        }
    }

    /// Drops `key`'s list: none of its replicas could be read.
    pub(super) fn unreadable(&self, key: &str) {
        lock(&self.leased).remove(key);
    }

    /// Forgets every list (after removals by pattern).
    pub(super) fn forget_all(&self) {
        self.changes.fetch_add(1, Ordering::AcqRel);
        lock(&self.leased).clear();
    }

    /// A leased list of `key` and the lease left, while enough of it is.
    fn reused(&self, key: &str) -> Option<(Vec<Replica>, Duration)> {
        if !self.reuse {
            return None;
        }
        let leased = lock(&self.leased);
        let held = leased.get(key)?;
        let left = held.until.checked_duration_since(Instant::now())?;
        (left > held.ttl / REUSE_WHILE_LEFT && held.generation == self.master.generation())
            .then(|| (held.list.clone(), left))
    }

    /// When a lookup was asked: the lease it grants runs from no earlier.
    fn before(&self) -> (Instant, u64, u64) {
        (
            Instant::now(),
            self.master.generation(),
            self.changes.load(Ordering::Acquire),
        )
    }

    /// Keeps a list looked up at `asked`, unless this client changed something since.
    fn keep(&self, key: &str, list: &[Replica], ttl: Duration, asked: (Instant, u64, u64)) {
        let (at, generation, changes) = asked;
        if !self.reuse || ttl.is_zero() {
            return;
        }
        let mut leased = lock(&self.leased);
        if self.changes.load(Ordering::Acquire) != changes {
            return;
        }
        if leased.len() >= MAX_LEASED {
            let now = Instant::now();
            leased.retain(|_, held| held.until > now);
            if leased.len() >= MAX_LEASED {
                return;
            }
        }
        leased.insert(
            key.to_owned(),
            Leased {
                list: list.to_vec(),
                until: at + ttl,
                ttl,
                generation,
            },
        );
    }

    /// The replicas of `key` from the master (never a reused list), looked up with whatever
    /// other lookups are waiting. A key whose holders have yet to mount again on a master that
    /// just recovered (or took over) is looked up again for a moment.
    pub(super) async fn lookup_fresh(self: &Arc<Self>, key: &str) -> Lookup {
        let deadline = Instant::now() + RECOVERY_WAIT;
        loop {
            match self.lookup_once(key).await {
                Err(e) if recovering(&e) && Instant::now() < deadline => {
                    tokio::time::sleep(RECOVERY_POLL).await;
                }
                answer => return answer,
            }
        }
    }

    async fn lookup_once(self: &Arc<Self>, key: &str) -> Lookup {
        let (reply, answer) = oneshot::channel();
        let lead = {
            let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            queue.waiting.push((key.to_owned(), reply));
            !std::mem::replace(&mut queue.busy, true)
        };
        if lead {
            tokio::spawn(self.clone().drain());
        }
        answer
            .await
            .unwrap_or_else(|_| Err(Error::new(ErrorKind::RpcFail, "the lookup was dropped")))
    }

    /// The replicas of every key: leased lists, and one request for the rest.
    pub(super) async fn lookup_batch(&self, keys: &[String]) -> Vec<Lookup> {
        let mut answers: Vec<Option<Lookup>> =
            keys.iter().map(|key| self.reused(key).map(Ok)).collect();
        let missing: Vec<usize> = (0..keys.len()).filter(|i| answers[*i].is_none()).collect();
        if !missing.is_empty() {
            let asked = self.before();
            let subset: Vec<String> = missing.iter().map(|i| keys[*i].clone()).collect();
            let fresh = self.lookup_batch_fresh(&subset).await;
            for (i, answer) in missing.into_iter().zip(fresh) {
                if let Ok((list, ttl)) = &answer {
                    self.keep(&keys[i], list, *ttl, asked);
                }
                answers[i] = Some(answer);
            }
        }
        answers
            .into_iter()
            .map(|a| a.unwrap_or_else(|| Err(Error::new(ErrorKind::InternalError, "no answer"))))
            .collect()
    }

    /// The replicas of every key in one request, one answer per key (keys whose holders have
    /// yet to mount again are looked up again for a moment, as in
    /// [`lookup_fresh`](Self::lookup_fresh)).
    async fn lookup_batch_fresh(&self, keys: &[String]) -> Vec<Lookup> {
        let deadline = Instant::now() + RECOVERY_WAIT;
        let mut answers = self.lookup_batch_once(keys).await;
        loop {
            let again: Vec<usize> = (0..keys.len())
                .filter(|i| matches!(&answers[*i], Err(e) if recovering(e)))
                .collect();
            if again.is_empty() || Instant::now() >= deadline {
                return answers;
            }
            tokio::time::sleep(RECOVERY_POLL).await;
            let subset: Vec<String> = again.iter().map(|i| keys[*i].clone()).collect();
            for (i, answer) in again.into_iter().zip(self.lookup_batch_once(&subset).await) {
                answers[i] = answer;
            }
        }
    }

    async fn lookup_batch_once(&self, keys: &[String]) -> Vec<Lookup> {
        let request = proto::BatchGetReplicaListRequest {
            keys: keys.to_vec(),
        };
        match self
            .master
            .call(request, |mut g, r| async move {
                g.batch_get_replica_list(r).await
            })
            .await
        {
            Ok(reply) => answers(keys.iter(), reply.results),
            Err(e) => keys.iter().map(|_| Err(e.clone())).collect(),
        }
    }

    /// Sends waves until nobody waits.
    async fn drain(self: Arc<Self>) {
        loop {
            let wave = {
                let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
                if queue.waiting.is_empty() {
                    queue.busy = false;
                    return;
                }
                std::mem::take(&mut queue.waiting)
            };
            self.send(wave).await;
        }
    }

    async fn send(&self, mut wave: Vec<(String, oneshot::Sender<Lookup>)>) {
        if wave.len() == 1 {
            let (key, reply) = wave.swap_remove(0);
            let request = proto::GetReplicaListRequest { key: key.clone() };
            let answer = self
                .master
                .call(
                    request,
                    |mut g, r| async move { g.get_replica_list(r).await },
                )
                .await
                .and_then(|r| parse(&key, r.outcome.as_ref(), &r.replicas, r.lease_ttl_ms));
            let _ = reply.send(answer);
            return;
        }
        let request = proto::BatchGetReplicaListRequest {
            keys: wave.iter().map(|(key, _)| key.clone()).collect(),
        };
        let answers = self.master.call(request, |mut g, r| async move {
            g.batch_get_replica_list(r).await
        });
        match answers.await {
            Ok(answers) => {
                let parsed = answers_for(&wave, answers.results);
                for ((_, reply), answer) in wave.into_iter().zip(parsed) {
                    let _ = reply.send(answer);
                }
            }
            Err(e) => {
                for (_, reply) in wave {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }
}

fn answers_for(
    wave: &[(String, oneshot::Sender<Lookup>)],
    results: Vec<proto::GetReplicaListResponse>,
) -> Vec<Lookup> {
    answers(wave.iter().map(|(key, _)| key), results)
}

/// One answer per key, in order; keys the master did not answer fail.
fn answers<'a>(
    keys: impl Iterator<Item = &'a String>,
    results: Vec<proto::GetReplicaListResponse>,
) -> Vec<Lookup> {
    let mut results = results.into_iter();
    keys.map(|key| match results.next() {
        Some(r) => parse(key, r.outcome.as_ref(), &r.replicas, r.lease_ttl_ms),
        None => Err(Error::new(
            ErrorKind::Protocol,
            "the master answered fewer keys than asked",
        )),
    })
    .collect()
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// One key's answer: its replicas, checked, or why there are none to read.
fn parse(
    key: &str,
    outcome: Option<&proto::Outcome>,
    list: &[proto::Replica],
    lease_ttl_ms: u64,
) -> Lookup {
    from_outcome(outcome)?;
    if list.is_empty() {
        return Err(Error::new(
            ErrorKind::ObjectNotFound,
            format!("'{key}' has no readable replica"),
        ));
    }
    let list = checked_replicas(key, list, None)?;
    Ok((list, Duration::from_millis(lease_ttl_ms)))
}
