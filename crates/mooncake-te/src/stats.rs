//! What went through which transport: requests and bytes as submitted, and, once each request
//! settles, whether it completed, the bytes that arrived and its latency from submission to
//! completion, by transport and direction.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::time::Duration;

use mooncake_transport::Opcode;

use crate::metrics::LatencyHistogram;

/// A transport, for statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportKind {
    /// Mooncake's TCP data protocol.
    Tcp,
    /// Same-host shared memory.
    Shm,
    /// RDMA.
    Rdma,
}

impl TransportKind {
    /// Every transport.
    pub const ALL: [Self; 3] = [Self::Tcp, Self::Shm, Self::Rdma];

    /// Its name (`tcp`, `shm`, `rdma`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Shm => "shm",
            Self::Rdma => "rdma",
        }
    }

    /// Index into per-route tables; 0 is "no transport".
    fn route_index(self) -> usize {
        match self {
            Self::Tcp => 1,
            Self::Shm => 2,
            Self::Rdma => 3,
        }
    }
}

/// The label of a route: a transport's name, or `none` for a request that failed before one
/// was chosen.
pub fn route_name(route: Option<TransportKind>) -> &'static str {
    route.map_or("none", TransportKind::name)
}

/// The label of a direction.
pub fn op_name(op: Opcode) -> &'static str {
    match op {
        Opcode::Read => "read",
        Opcode::Write => "write",
    }
}

const ROUTES: [Option<TransportKind>; 4] = [
    None,
    Some(TransportKind::Tcp),
    Some(TransportKind::Shm),
    Some(TransportKind::Rdma),
];
const OPS: [Opcode; 2] = [Opcode::Read, Opcode::Write];

fn op_index(op: Opcode) -> usize {
    match op {
        Opcode::Read => 0,
        Opcode::Write => 1,
    }
}

#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    bytes: AtomicU64,
}

/// What settled requests of one route and direction did.
#[derive(Debug, Default)]
pub struct Settled {
    completed: AtomicU64,
    failed: AtomicU64,
    bytes: AtomicU64,
    latency: LatencyHistogram,
}

impl Settled {
    /// Requests that completed.
    pub fn completed(&self) -> u64 {
        self.completed.load(Ordering::Relaxed)
    }

    /// Requests that failed, timed out or were cancelled.
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    /// Bytes that arrived, failed requests' completed slices included.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Submission to completion of the requests that completed.
    pub fn latency(&self) -> &LatencyHistogram {
        &self.latency
    }
}

/// Requests and bytes through each transport.
#[derive(Debug, Default)]
pub(crate) struct TransportStats {
    submitted: [Counters; 3],
    /// By route (none, tcp, shm, rdma), then direction (read, write).
    settled: [[Settled; 2]; 4],
}

impl TransportStats {
    /// A request of `bytes` was handed to `kind`.
    pub(crate) fn record(&self, kind: TransportKind, bytes: usize) {
        let counters = &self.submitted[kind.route_index() - 1];
        counters.requests.fetch_add(1, Ordering::Relaxed);
        counters.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// A request settled: `latency` is `Some` when it completed. A request that completed
    /// without a route moved nothing (it was empty) and is not counted.
    pub(crate) fn record_settled(
        &self,
        route: Option<TransportKind>,
        op: Opcode,
        transferred: u64,
        latency: Option<Duration>,
    ) {
        let settled = &self.settled[route.map_or(0, TransportKind::route_index)][op_index(op)];
        match latency {
            Some(_) if route.is_none() => return,
            Some(latency) => {
                settled.completed.fetch_add(1, Ordering::Relaxed);
                settled.latency.observe(latency);
            }
            None => {
                settled.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
        settled.bytes.fetch_add(transferred, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> Vec<(TransportKind, u64, u64)> {
        TransportKind::ALL
            .into_iter()
            .zip(&self.submitted)
            .map(|(kind, c)| {
                (
                    kind,
                    c.requests.load(Ordering::Relaxed),
                    c.bytes.load(Ordering::Relaxed),
                )
            })
            .collect()
    }

    /// Every (route, direction) and what its settled requests did.
    pub(crate) fn settled(
        &self,
    ) -> impl Iterator<Item = (Option<TransportKind>, Opcode, &Settled)> {
        ROUTES
            .into_iter()
            .zip(&self.settled)
            .flat_map(|(route, by_op)| {
                OPS.into_iter()
                    .zip(by_op)
                    .map(move |(op, settled)| (route, op, settled))
            })
    }
}

/// Per request of a batch: its direction, and the transport it was routed to once it was.
/// Shared between the batch and its requests on their way to a transport.
#[derive(Debug)]
pub(crate) struct Routes(Box<[AtomicU8]>);

const WRITE_BIT: u8 = 0b100;
const ROUTE_MASK: u8 = 0b011;

impl Routes {
    pub(crate) fn new(ops: impl Iterator<Item = Opcode>) -> Self {
        Self(
            ops.map(|op| AtomicU8::new(if op == Opcode::Write { WRITE_BIT } else { 0 }))
                .collect(),
        )
    }

    /// Request `index` goes through `kind`.
    pub(crate) fn routed(&self, index: usize, kind: TransportKind) {
        if let Some(slot) = self.0.get(index) {
            slot.fetch_or(kind.route_index() as u8, Ordering::Release);
        }
    }

    /// Request `index`'s route and direction.
    pub(crate) fn get(&self, index: usize) -> (Option<TransportKind>, Opcode) {
        let code = self
            .0
            .get(index)
            .map_or(0, |slot| slot.load(Ordering::Acquire));
        let op = if code & WRITE_BIT == 0 {
            Opcode::Read
        } else {
            Opcode::Write
        };
        (ROUTES[usize::from(code & ROUTE_MASK)], op)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settled_requests_count_by_route_and_direction() {
        let stats = TransportStats::default();
        let routes = Routes::new([Opcode::Write, Opcode::Read, Opcode::Read].into_iter());
        routes.routed(0, TransportKind::Shm);
        routes.routed(1, TransportKind::Tcp);
        for (index, (transferred, latency)) in [
            (4096, Some(Duration::from_micros(30))),
            (100, None),
            (0, None),
        ]
        .into_iter()
        .enumerate()
        {
            let (route, op) = routes.get(index);
            stats.record_settled(route, op, transferred, latency);
        }
        stats.record_settled(None, Opcode::Read, 0, Some(Duration::ZERO));
        let find = |route, op| {
            stats
                .settled()
                .find(|(r, o, _)| *r == route && *o == op)
                .map(|(_, _, s)| (s.completed(), s.failed(), s.bytes(), s.latency().count()))
        };
        assert_eq!(
            find(Some(TransportKind::Shm), Opcode::Write),
            Some((1, 0, 4096, 1))
        );
        assert_eq!(
            find(Some(TransportKind::Tcp), Opcode::Read),
            Some((0, 1, 100, 0))
        );
        assert_eq!(find(None, Opcode::Read), Some((0, 1, 0, 0)));
        assert_eq!(stats.settled().count(), 8);
    }
}
