//! Moving object bytes: replica lists checked before they size anything, one engine batch per
//! step, and read deadlines that tell a stalled replica holder from a slow one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use mooncake_common::{Error, ErrorKind, Result};
use mooncake_te::engine::SubmitOptions;
use mooncake_te::{Opcode, SegmentId as EngineSegment, TransferRequest};

use super::StoreClient;
use crate::proto;

/// A replica as the client uses it: checked by [`checked_replicas`].
#[derive(Debug, Clone)]
pub(super) struct Replica {
    pub(super) id: u64,
    pub(super) endpoint: String,
    pub(super) address: u64,
    pub(super) size: u64,
}

/// The master's replica list for `key`, checked before any of it sizes a copy: at least one
/// replica, all of one non-zero size (`expected`, when the caller knows it), ranges that do
/// not wrap, an endpoint each. A list that breaks this is refused whole.
pub(super) fn checked_replicas(
    key: &str,
    list: &[proto::Replica],
    expected: Option<u64>,
) -> Result<Vec<Replica>> {
    let bad = |what: String| {
        Err(Error::new(
            ErrorKind::Protocol,
            format!("the master's replica list for '{key}' {what}"),
        ))
    };
    let Some(first) = list.first() else {
        return bad("is empty".into());
    };
    let size = expected.unwrap_or(first.size);
    let mut out = Vec::with_capacity(list.len());
    for r in list {
        if r.size != size || size == 0 {
            return bad(format!("gives sizes {} and {size}", r.size));
        }
        if r.buffer_address == 0 || r.buffer_address.checked_add(r.size).is_none() {
            return bad(format!(
                "has a range that wraps: {} bytes at {:#x}",
                r.size, r.buffer_address
            ));
        }
        if usize::try_from(r.size).is_err() {
            return bad(format!(
                "has {} bytes, more than this host can address",
                r.size
            ));
        }
        if r.transport_endpoint.is_empty() {
            return bad("has a replica without an endpoint".into());
        }
        out.push(Replica {
            id: r.id,
            endpoint: r.transport_endpoint.clone(),
            address: r.buffer_address,
            size: r.size,
        });
    }
    Ok(out)
}

/// One replica's share of a step: `len` bytes between local memory and the replica.
pub(super) struct Move {
    /// What the outcome is reported as.
    pub(super) item: usize,
    pub(super) op: Opcode,
    pub(super) local: usize,
    /// The local range's length; the replica was checked to be exactly as long.
    pub(super) len: usize,
    pub(super) replica: Replica,
}

/// Where a replica lives, seen from this client: reads from each place have their own pace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Place {
    /// This process: a plain copy.
    Process = 0,
    /// This host: shared memory.
    Host = 1,
    /// Another host: the network.
    Remote = 2,
}

/// Recent read speed, to give a read that has another replica to fall back on a deadline
/// that a working holder meets and a frozen one does not.
pub(super) struct ReadPace {
    /// Smoothed nanoseconds per KiB of recent reads from this host and from others (0: none
    /// seen yet).
    nanos_per_kib: [AtomicU64; 2],
}

/// A deadline never shorter than this: scheduling hiccups on a busy host are not stalls.
const DEADLINE_FLOOR: Duration = Duration::from_millis(250);
/// Nor longer than this: beyond it, the next replica is the better bet.
const DEADLINE_CEILING: Duration = Duration::from_secs(5);
/// Before any read was timed: 100 MB/s, slow enough for any link worth using.
const ASSUMED_NANOS_PER_KIB: u64 = 10_000;
/// How many times the expected time a read may take.
const DEADLINE_SLACK: u32 = 8;

impl ReadPace {
    pub(super) fn new() -> Self {
        Self {
            nanos_per_kib: [AtomicU64::new(0), AtomicU64::new(0)],
        }
    }

    fn slot(&self, place: Place) -> &AtomicU64 {
        &self.nanos_per_kib[usize::from(place == Place::Remote)]
    }

    /// The deadline for reading `len` bytes from `place` when another replica could serve
    /// them.
    pub(super) fn deadline(&self, place: Place, len: usize) -> Duration {
        let pace = match self.slot(place).load(Ordering::Relaxed) {
            0 => ASSUMED_NANOS_PER_KIB,
            pace => pace,
        };
        let kib = (len as u64).div_ceil(1024);
        let expected = Duration::from_nanos(kib.saturating_mul(pace));
        (expected * DEADLINE_SLACK).clamp(DEADLINE_FLOOR, DEADLINE_CEILING)
    }

    /// Learns from a read of `len` bytes from `place` that took `took`. Small reads say more
    /// about round trips than about speed, and copies in this process nothing about peers.
    pub(super) fn record(&self, place: Place, len: usize, took: Duration) {
        if len < 64 << 10 || place == Place::Process {
            return;
        }
        let slot = self.slot(place);
        let sample = u64::try_from(took.as_nanos() / (len as u128 / 1024).max(1))
            .unwrap_or(u64::MAX)
            .max(1);
        let old = slot.load(Ordering::Relaxed);
        let new = if old == 0 {
            sample
        } else {
            (old.saturating_mul(7).saturating_add(sample)) / 8
        };
        slot.store(new.max(1), Ordering::Relaxed);
    }
}

impl StoreClient {
    /// Moves the bytes of every [`Move`] with one engine batch (the engine copies replicas in
    /// this process itself), every request finishing within `deadline` if one is given.
    /// Returns each move's outcome by item; once it returns, no byte of any move is still in
    /// flight.
    pub(super) async fn move_bytes(
        &self,
        work: Vec<Move>,
        deadline: Option<Duration>,
    ) -> Vec<(usize, Result<()>)> {
        let mut outcomes = Vec::with_capacity(work.len());
        let mut remote: Vec<(usize, TransferRequest)> = Vec::new();
        for m in work {
            let Move {
                item,
                op,
                local,
                len,
                replica,
            } = m;
            if replica.size != len as u64 {
                outcomes.push((
                    item,
                    Err(Error::new(
                        ErrorKind::InternalError,
                        format!("a {len}-byte move to a {}-byte replica", replica.size),
                    )),
                ));
                continue;
            }
            match self.segment(&replica.endpoint).await {
                Ok(segment) => remote.push((
                    item,
                    TransferRequest {
                        op,
                        segment,
                        local_addr: local,
                        remote_addr: replica.address,
                        len,
                    },
                )),
                Err(e) => outcomes.push((item, Err(e))),
            }
        }
        if remote.is_empty() {
            return outcomes;
        }
        let requests: Vec<TransferRequest> = remote.iter().map(|(_, r)| *r).collect();
        let options = SubmitOptions {
            timeout: deadline,
            copy_on_caller: true,
            ..SubmitOptions::default()
        };
        match self.engine.submit(&requests, options) {
            Err(e) => outcomes.extend(remote.iter().map(|(i, _)| (*i, Err(e.clone())))),
            Ok(batch) => {
                let _ = self.engine.wait(batch).await;
                let reports = self.engine.status(batch).unwrap_or_default();
                self.engine.release_batch(batch);
                let mut reports = reports.into_iter();
                for (item, _) in &remote {
                    let outcome = match reports.next() {
                        Some(report) => report.error.map_or(Ok(()), Err),
                        None => Err(Error::new(
                            ErrorKind::InternalError,
                            "the engine reported fewer requests than submitted",
                        )),
                    };
                    outcomes.push((*item, outcome));
                }
            }
        }
        outcomes
    }

    async fn segment(&self, endpoint: &str) -> Result<EngineSegment> {
        Ok(self.engine.open_segment(endpoint).await?.id)
    }

    /// Where `replica` lives, seen from here.
    pub(super) fn place(&self, replica: &Replica) -> Place {
        if replica.endpoint == self.engine.segment_name() {
            Place::Process
        } else if mooncake_te::address::split_host_port(&replica.endpoint)
            .is_ok_and(|(h, _)| h == self.host_id)
        {
            Place::Host
        } else {
            Place::Remote
        }
    }

    /// Reads one replica into `local`; with `hurry`, within a deadline from recent reads of
    /// its place (the caller has another replica to turn to).
    pub(super) async fn read_replica(
        &self,
        replica: Replica,
        local: usize,
        len: usize,
        hurry: bool,
    ) -> Result<()> {
        let place = self.place(&replica);
        let deadline = hurry.then(|| self.pace.deadline(place, len));
        let started = Instant::now();
        let work = vec![Move {
            item: 0,
            op: Opcode::Read,
            local,
            len,
            replica,
        }];
        let outcome = self.move_bytes(work, deadline).await.pop().map_or_else(
            || Err(Error::new(ErrorKind::InternalError, "no outcome")),
            |(_, o)| o,
        );
        if outcome.is_ok() {
            self.pace.record(place, len, started.elapsed());
        }
        outcome
    }
}
