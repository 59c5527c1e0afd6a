//! What went through which transport.

use std::sync::atomic::{AtomicU64, Ordering};

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
    /// Its name (`tcp`, `shm`, `rdma`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Shm => "shm",
            Self::Rdma => "rdma",
        }
    }
}

#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    bytes: AtomicU64,
}

/// Requests and bytes submitted through each transport.
#[derive(Debug, Default)]
pub(crate) struct TransportStats {
    tcp: Counters,
    shm: Counters,
    rdma: Counters,
}

impl TransportStats {
    pub(crate) fn record(&self, kind: TransportKind, bytes: usize) {
        let counters = match kind {
            TransportKind::Tcp => &self.tcp,
            TransportKind::Shm => &self.shm,
            TransportKind::Rdma => &self.rdma,
        };
        counters.requests.fetch_add(1, Ordering::Relaxed);
        counters.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> Vec<(TransportKind, u64, u64)> {
        [
            (TransportKind::Tcp, &self.tcp),
            (TransportKind::Shm, &self.shm),
            (TransportKind::Rdma, &self.rdma),
        ]
        .into_iter()
        .map(|(kind, c)| {
            (
                kind,
                c.requests.load(Ordering::Relaxed),
                c.bytes.load(Ordering::Relaxed),
            )
        })
        .collect()
    }
}
