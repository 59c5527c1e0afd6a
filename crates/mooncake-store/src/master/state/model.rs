//! The master against a model: random sequences of every operation from several clients on
//! a virtual clock, with a simulated memory that records which write filled each byte. After
//! every step the master's invariants hold, every committed replica holds the bytes of the
//! key's last committed write, and every read inside its lease finds exactly the bytes of the
//! write that was committed when the lease was granted.
//!
//! The clients follow the rules a real client keeps: a writer fills its replicas before it
//! ends the write and may keep filling until then, even after a newer write preempted it; a
//! write that was revoked may still land for up to the client TTL; a frozen client does
//! nothing until it thaws, then remounts.
//!
//! The durable variant keeps a log: entries become durable only at a `Flush`, and a `Crash`
//! rebuilds the master from the durable entries (or the snapshot taken with them). The rebuilt
//! state must be exactly the state at the last flush, and every replica it serves must hold
//! the bytes of its write, although the crashed master went on removing, evicting and
//! reallocating after that flush. Writes and leases in flight at a crash end with it: a real
//! client's transfers finish long before the owners remount and their segments settle.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::*;
use crate::master::types::{ReplicaDesc, WriteConfig, WriteGrant};
use crate::proto::journal::{Entry, Snapshot};

const CLIENTS: usize = 3;
const KEYS: usize = 6;
/// Small segments, so that allocations fail and eviction runs.
const SEGMENT: u64 = 64 << 10;
const SIZES: [u64; 4] = [1 << 10, 4 << 10, 16 << 10, 40 << 10];

#[derive(Debug, Clone)]
enum Op {
    Start {
        client: usize,
        key: usize,
        size: usize,
        upsert: bool,
        replicas: u32,
    },
    Fill(usize),
    End(usize),
    Revoke(usize),
    Lookup(usize),
    Read(usize),
    Remove {
        key: usize,
        force: bool,
    },
    Exists(usize),
    RemoveAll {
        force: bool,
    },
    Advance(u64),
    Freeze(usize),
    Thaw(usize),
    Flush,
    Crash,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0..CLIENTS, 0..KEYS, 0..SIZES.len(), any::<bool>(), 1..=2u32).prop_map(
            |(client, key, size, upsert, replicas)| Op::Start { client, key, size, upsert, replicas }
        ),
        2 => any::<usize>().prop_map(Op::Fill),
        5 => any::<usize>().prop_map(Op::End),
        1 => any::<usize>().prop_map(Op::Revoke),
        4 => (0..KEYS).prop_map(Op::Lookup),
        3 => any::<usize>().prop_map(Op::Read),
        2 => (0..KEYS, any::<bool>()).prop_map(|(key, force)| Op::Remove { key, force }),
        1 => (0..KEYS).prop_map(Op::Exists),
        1 => any::<bool>().prop_map(|force| Op::RemoveAll { force }),
        4 => (0..2_500u64).prop_map(Op::Advance),
        1 => (0..CLIENTS).prop_map(Op::Freeze),
        1 => (0..CLIENTS).prop_map(Op::Thaw),
        2 => Just(Op::Flush),
        1 => Just(Op::Crash),
    ]
}

/// Which write last filled each byte of one endpoint's memory: `start -> (end, write id)`.
#[derive(Default)]
struct Memory {
    pieces: BTreeMap<u64, (u64, u64)>,
}

impl Memory {
    fn fill(&mut self, start: u64, end: u64, tag: u64) {
        let overlapping: Vec<u64> = self
            .pieces
            .range(..end)
            .filter(|(_, (e, _))| *e > start)
            .map(|(s, _)| *s)
            .collect();
        for s in overlapping {
            let (e, t) = self.pieces.remove(&s).expect("listed");
            if s < start {
                self.pieces.insert(s, (start, t));
            }
            if e > end {
                self.pieces.insert(end, (e, t));
            }
        }
        self.pieces.insert(start, (end, tag));
    }

    /// Whether every byte of `[start, end)` was last filled by `tag`.
    fn holds(&self, start: u64, end: u64, tag: u64) -> bool {
        let mut at = start;
        for (s, (e, t)) in self.pieces.range(..end) {
            if *e <= start {
                continue;
            }
            if *s > at || *t != tag {
                return false;
            }
            at = *e;
        }
        at >= end
    }
}

#[derive(PartialEq)]
enum State {
    Pending,
    Revoked(Instant),
    Ended,
}

struct Write {
    client: usize,
    key: usize,
    grant: WriteGrant,
    filled: bool,
    state: State,
}

struct Reader {
    expect: u64,
    replicas: Vec<ReplicaDesc>,
    until: Instant,
}

struct Model {
    master: Master,
    now: Instant,
    config: MasterConfig,
    clients: Vec<ClientId>,
    specs: Vec<SegmentSpec>,
    frozen: [bool; CLIENTS],
    memory: HashMap<String, Memory>,
    writes: Vec<Write>,
    readers: Vec<Reader>,
    /// The write id of each key's committed value, as far as the model knows.
    committed: [Option<u64>; KEYS],
    /// With a log: the durable entries, those not yet flushed, and the state at the last flush.
    log: Option<Durable>,
}

struct Durable {
    entries: Vec<Entry>,
    pending: Vec<Entry>,
    flushed: crate::proto::journal::Snapshot,
}

fn key_name(key: usize) -> String {
    format!("key-{key}")
}

impl Model {
    fn new(durable: bool) -> Self {
        let config = MasterConfig {
            put_start_discard_timeout: Duration::from_secs(5),
            // Beyond any run: a writer slower than this may clobber, by Mooncake's design.
            put_start_release_timeout: Duration::from_secs(3600),
            ..MasterConfig::default()
        };
        let now = Instant::now();
        let mut master = if durable {
            Master::recover(config.clone(), now, None, Vec::new()).unwrap()
        } else {
            Master::new(config.clone()).unwrap()
        };
        let mut clients = Vec::new();
        let mut specs = Vec::new();
        for i in 0..CLIENTS {
            let client = ClientId(i as u128 + 1);
            // One base for all: distinct endpoints may use the same addresses.
            let spec = SegmentSpec {
                id: SegmentId(100 + i as u128),
                name: format!("node-{i}"),
                base: 0x7000_0000,
                size: SEGMENT,
                te_endpoint: format!("10.0.0.{i}:15000"),
                protocol: "tcp".into(),
                host_id: format!("10.0.0.{i}"),
            };
            master.mount_segment(now, client, spec.clone()).unwrap();
            clients.push(client);
            specs.push(spec);
        }
        let mut model = Self {
            master,
            now,
            config,
            clients,
            specs,
            frozen: [false; CLIENTS],
            memory: HashMap::new(),
            writes: Vec::new(),
            readers: Vec::new(),
            committed: [None; KEYS],
            log: None,
        };
        if durable {
            let pending: Vec<Entry> = model.master.take_entry().into_iter().collect();
            model.log = Some(Durable {
                entries: Vec::new(),
                pending,
                flushed: Snapshot::default(),
            });
            model.flush();
        }
        model
    }

    /// Every entry taken so far becomes durable.
    fn flush(&mut self) {
        let Some(log) = &mut self.log else { return };
        log.entries.append(&mut log.pending);
        if let Some(last) = log.entries.last() {
            self.master.entries_durable(last.seq);
        }
        log.flushed = self.master.snapshot();
    }

    /// The master dies; a new one recovers what was durable.
    fn crash(&mut self) {
        let Some(log) = &mut self.log else { return };
        log.pending.clear();
        let from_snapshot = log.entries.len() % 2 == 0;
        let recovered = if from_snapshot {
            Master::recover(
                self.config.clone(),
                self.now,
                Some(log.flushed.clone()),
                Vec::new(),
            )
        } else {
            Master::recover(self.config.clone(), self.now, None, log.entries.clone())
        };
        self.master = recovered.expect("the durable log applies");
        assert_eq!(
            self.master.snapshot(),
            log.flushed,
            "recovery did not rebuild the flushed state"
        );
        self.master.begin_epoch(self.now);
        log.pending.extend(self.master.take_entry());
        for w in &mut self.writes {
            w.state = State::Ended;
        }
        self.readers.clear();
        for key in 0..KEYS {
            self.committed[key] = self.master.objects.get(&key_name(key)).map(|o| o.write.0);
        }
        self.flush();
    }

    fn fillable(&self, w: &Write) -> bool {
        !self.frozen[w.client]
            && match w.state {
                State::Pending => true,
                State::Revoked(at) => self.now < at + self.config.client_ttl,
                State::Ended => false,
            }
    }

    fn fill(&mut self, index: usize) {
        let w = &mut self.writes[index];
        w.filled = true;
        for r in &w.grant.replicas {
            self.memory.entry(r.te_endpoint.clone()).or_default().fill(
                r.address,
                r.address + r.size,
                w.grant.write.0,
            );
        }
    }

    fn pick(&self, n: usize, eligible: impl Fn(&Write) -> bool) -> Option<usize> {
        let candidates: Vec<usize> = (0..self.writes.len())
            .filter(|i| eligible(&self.writes[*i]))
            .collect();
        (!candidates.is_empty()).then(|| candidates[n % candidates.len()])
    }

    fn holds(&self, replicas: &[ReplicaDesc], tag: u64) -> bool {
        replicas.iter().all(|r| {
            self.memory
                .get(&r.te_endpoint)
                .is_some_and(|m| m.holds(r.address, r.address + r.size, tag))
        })
    }

    fn apply(&mut self, op: &Op) {
        let now = self.now;
        match *op {
            Op::Start {
                client,
                key,
                size,
                upsert,
                replicas,
            } => {
                if self.frozen[client] {
                    return;
                }
                let config = WriteConfig {
                    replica_num: replicas,
                    ..WriteConfig::default()
                };
                let c = self.clients[client];
                let name = key_name(key);
                let size = SIZES[size];
                let started = if upsert {
                    self.master.upsert_start(now, c, &name, size, &config)
                } else {
                    self.master.put_start(now, c, &name, size, &config)
                };
                // The service answers a start only once its entry (an upsert in place stops
                // the log vouching for the old bytes) is durable.
                if let Some(entry) = self.master.take_entry() {
                    if let Some(log) = &mut self.log {
                        log.pending.push(entry);
                    }
                    self.flush();
                }
                if let Ok(grant) = started {
                    assert!(grant.write.0 > 0);
                    assert!(!grant.replicas.is_empty());
                    assert!(grant.replicas.iter().all(|r| r.size == size));
                    assert!(
                        self.writes.iter().all(|w| w.grant.write != grant.write),
                        "a write id given twice"
                    );
                    // The old value is gone: rewritten in place or parked for its readers.
                    self.committed[key] = None;
                    self.writes.push(Write {
                        client,
                        key,
                        grant,
                        filled: false,
                        state: State::Pending,
                    });
                }
            }
            Op::Fill(n) => {
                if let Some(i) = self.pick(n, |w| self.fillable(w)) {
                    self.fill(i);
                }
            }
            Op::End(n) => {
                let Some(i) = self.pick(n, |w| !self.frozen[w.client] && w.state == State::Pending)
                else {
                    return;
                };
                if !self.writes[i].filled {
                    self.fill(i);
                }
                let w = &mut self.writes[i];
                w.state = State::Ended;
                let name = key_name(w.key);
                let ended = self
                    .master
                    .put_end(now, self.clients[w.client], &name, w.grant.write);
                match ended {
                    Ok(()) => self.committed[w.key] = Some(w.grant.write.0),
                    Err(e) => assert_eq!(e.kind(), ErrorKind::InvalidWrite, "{e}"),
                }
            }
            Op::Revoke(n) => {
                let Some(i) = self.pick(n, |w| !self.frozen[w.client] && w.state == State::Pending)
                else {
                    return;
                };
                let w = &mut self.writes[i];
                w.state = State::Revoked(now);
                let name = key_name(w.key);
                if let Err(e) =
                    self.master
                        .put_revoke(now, self.clients[w.client], &name, w.grant.write)
                {
                    assert_eq!(e.kind(), ErrorKind::InvalidWrite, "{e}");
                }
            }
            Op::Lookup(key) => {
                if let Ok((replicas, ttl)) = self.master.get_replica_list(now, &key_name(key)) {
                    let expect = self.committed[key]
                        .expect("the master serves a key that has no committed value");
                    assert!(
                        self.holds(&replicas, expect),
                        "a fresh read of another write's bytes"
                    );
                    self.readers.push(Reader {
                        expect,
                        replicas,
                        until: now + ttl,
                    });
                }
            }
            Op::Read(n) => {
                if self.readers.is_empty() {
                    return;
                }
                let reader = self.readers.swap_remove(n % self.readers.len());
                // Past its lease a real reader re-validates instead of trusting the bytes.
                if now < reader.until {
                    assert!(
                        self.holds(&reader.replicas, reader.expect),
                        "a leased read found another write's bytes"
                    );
                }
            }
            Op::Remove { key, force } => {
                let _ = self.master.remove(now, &key_name(key), force);
            }
            Op::Exists(key) => {
                let _ = self.master.exist_key(now, &key_name(key));
            }
            Op::RemoveAll { force } => {
                self.master.remove_all(now, force);
            }
            Op::Advance(millis) => {
                self.now += Duration::from_millis(millis);
                for (i, c) in self.clients.iter().enumerate() {
                    if !self.frozen[i]
                        && self.master.ping(self.now, *c) == ClientStatus::NeedRemount
                    {
                        self.master
                            .remount_segments(self.now, *c, vec![self.specs[i].clone()])
                            .unwrap();
                    }
                }
                self.master.tick(self.now);
            }
            Op::Freeze(client) => self.frozen[client] = true,
            Op::Thaw(client) => {
                if !std::mem::replace(&mut self.frozen[client], false) {
                    return;
                }
                let c = self.clients[client];
                if self.master.ping(now, c) == ClientStatus::NeedRemount {
                    self.master
                        .remount_segments(now, c, vec![self.specs[client].clone()])
                        .unwrap();
                }
            }
            Op::Flush => self.flush(),
            Op::Crash => self.crash(),
        }
        if let Some(log) = &mut self.log {
            log.pending.extend(self.master.take_entry());
        }
        self.check();
    }

    /// After every step: the master is consistent, and every committed replica holds its
    /// write's bytes.
    fn check(&mut self) {
        self.master.check_invariants();
        for key in 0..KEYS {
            let Some(replicas) = self.master.query_key(&key_name(key)) else {
                self.committed[key] = None;
                continue;
            };
            let complete: Vec<ReplicaDesc> = replicas
                .into_iter()
                .filter(|r| r.status == ReplicaStatus::Complete)
                .collect();
            if complete.is_empty() {
                continue;
            }
            let expect = self.committed[key].expect("a readable key that was never committed");
            assert!(
                self.holds(&complete, expect),
                "a committed replica of {} holds another write's bytes",
                key_name(key)
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn every_read_sees_its_own_write(ops in proptest::collection::vec(op(), 1..300)) {
        let mut model = Model::new(false);
        for op in &ops {
            model.apply(op);
        }
    }

    #[test]
    fn a_crash_recovers_exactly_what_was_durable(ops in proptest::collection::vec(op(), 1..300)) {
        let mut model = Model::new(true);
        for op in &ops {
            model.apply(op);
        }
    }
}
