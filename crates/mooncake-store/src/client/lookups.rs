//! Replica lookups of concurrent single-key reads, coalesced.
//!
//! A lookup that arrives while another is on its way to the master waits for that one to
//! return, then goes out in one batch with every lookup that arrived meanwhile. An idle
//! client pays no delay; a busy one makes one master round trip per wave of reads instead of
//! one per read, which spares both the master's CPU and its own.

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

pub(super) struct Lookups {
    master: MasterClient,
    queue: Mutex<Queue>,
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
            master,
            queue: Mutex::new(Queue::default()),
        })
    }

    /// The replicas of `key`, looked up with whatever other lookups are waiting. A key whose
    /// holders have yet to mount again on a master that just recovered (or took over) is
    /// looked up again for a moment.
    pub(super) async fn lookup(self: &Arc<Self>, key: &str) -> Lookup {
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

    /// The replicas of every key in one request, one answer per key (keys whose holders have
    /// yet to mount again are looked up again for a moment, as in [`lookup`](Self::lookup)).
    pub(super) async fn lookup_batch(&self, keys: &[String]) -> Vec<Lookup> {
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
