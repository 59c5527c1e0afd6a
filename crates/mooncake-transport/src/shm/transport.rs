//! Same-host peers by owner, and where copies run.
//!
//! A copy of up to [`INLINE_LIMIT`] bytes runs on the submitting thread: handing it to another
//! thread would cost more than the copy. Larger requests arrive as several slices, which a
//! pool of copy threads (one per core, at most four) runs side by side; a submitter that may
//! block (an async worker) takes the last slice itself.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use mooncake_common::{Error, Result};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::peer::{RemoteRange, ShmPeer, ShmTarget};
use crate::{Opcode, Region, Task};

/// Copies up to this size run on the submitting thread.
pub const INLINE_LIMIT: usize = 256 << 10;

/// One piece of a request, for the shared-memory path.
pub struct ShmSlice {
    /// Direction.
    pub op: Opcode,
    /// Local registered memory, held for the duration.
    pub region: Arc<Region>,
    /// Start of the local range.
    pub local_addr: usize,
    /// Length.
    pub len: usize,
    /// The remote side.
    pub remote: RemoteRange,
    /// Where the outcome goes.
    pub task: Arc<Task>,
    /// When it stops being worth doing.
    pub deadline: Option<Instant>,
}

impl ShmSlice {
    fn run(self, peer: &ShmPeer) {
        if self.task.has_failed() {
            self.task.slice_failed(Error::new(
                mooncake_common::ErrorKind::TransferFailed,
                "skipped: an earlier slice of the same request failed",
            ));
            return;
        }
        if self.deadline.is_some_and(|d| d <= Instant::now()) {
            self.task.slice_failed(Error::new(
                mooncake_common::ErrorKind::Timeout,
                "missed the request deadline",
            ));
            return;
        }
        let outcome = peer.copy(
            self.op,
            &self.region,
            self.local_addr,
            self.len,
            &self.remote,
        );
        // Let go of the memory before reporting: whoever awaits the task may unregister it
        // the moment it settles.
        let (task, len) = (self.task, self.len);
        drop(self.region);
        match outcome {
            Ok(()) => task.slice_done(len),
            Err(e) => task.slice_failed(e),
        }
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// Same-host transfers.
pub struct ShmTransport {
    peers: Mutex<HashMap<String, Arc<ShmPeer>>>,
    jobs: async_channel::Sender<Job>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    runtime: tokio::runtime::Handle,
    shutdown: CancellationToken,
    watchers: TaskTracker,
}

impl ShmTransport {
    /// Starts the copy threads; watchers of owners run on `runtime`.
    pub fn new(runtime: tokio::runtime::Handle) -> Result<Self> {
        let (jobs, queue) = async_channel::unbounded::<Job>();
        let count = std::thread::available_parallelism()
            .map_or(2, |n| n.get())
            .min(4);
        let mut threads = Vec::with_capacity(count);
        for i in 0..count {
            let queue = queue.clone();
            let thread = std::thread::Builder::new()
                .name(format!("mooncake-copy-{i}"))
                .spawn(move || {
                    while let Ok(job) = queue.recv_blocking() {
                        job();
                    }
                })
                .map_err(|e| {
                    Error::new(
                        mooncake_common::ErrorKind::Memory,
                        format!("spawn copy thread: {e}"),
                    )
                })?;
            threads.push(thread);
        }
        Ok(Self {
            peers: Mutex::new(HashMap::new()),
            jobs,
            threads: Mutex::new(threads),
            runtime,
            shutdown: CancellationToken::new(),
            watchers: TaskTracker::new(),
        })
    }

    /// The connection to `target`'s owner, made on first use and made again if the owner
    /// restarted. Blocks briefly (a local socket round trip) when connecting.
    pub fn peer(&self, target: &ShmTarget) -> Result<Arc<ShmPeer>> {
        if self.shutdown.is_cancelled() {
            return Err(Error::closed("the shared-memory transport"));
        }
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(peer) = peers.get(&target.socket).filter(|p| p.is_alive()) {
            return Ok(peer.clone());
        }
        let (peer, watch) = ShmPeer::connect(target)?;
        let (watched, stop) = (peer.clone(), self.shutdown.clone());
        self.watchers.spawn_on(
            async move {
                tokio::select! {
                    _ = stop.cancelled() => {}
                    () = watched.watch(watch) => {}
                }
            },
            &self.runtime,
        );
        peers.insert(target.socket.clone(), peer.clone());
        Ok(peer)
    }

    /// Runs `slices` against `peer`; each is reported to its task exactly once. With
    /// `copy_last`, this thread copies the last slice whatever its size, after queueing the rest.
    pub fn submit(&self, peer: &Arc<ShmPeer>, slices: Vec<ShmSlice>, copy_last: bool) {
        let count = slices.len();
        let mut here = None;
        for (i, slice) in slices.into_iter().enumerate() {
            if copy_last && i + 1 == count {
                here = Some(slice);
                continue;
            }
            if slice.len <= INLINE_LIMIT {
                slice.run(peer);
                continue;
            }
            let peer = peer.clone();
            let job: Job = Box::new(move || slice.run(&peer));
            if let Err(rejected) = self.jobs.try_send(job) {
                // Closed: run it here rather than lose the report.
                (rejected.into_inner())();
            }
        }
        if let Some(slice) = here {
            slice.run(peer);
        }
    }

    /// Stops the copy threads (after the copies queued so far) and the owner watchers, and
    /// drops every mapping.
    pub async fn close(&self) {
        self.shutdown.cancel();
        self.jobs.close();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        let _ =
            tokio::task::spawn_blocking(move || threads.into_iter().for_each(|t| drop(t.join())))
                .await;
        self.watchers.close();
        self.watchers.wait().await;
        self.peers.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

impl Drop for ShmTransport {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.jobs.close();
    }
}
