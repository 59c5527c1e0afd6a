//! Same-host peers by owner, and where copies run.
//!
//! A copy of up to [`INLINE_LIMIT`] bytes runs on the submitting thread: handing it to another
//! thread would cost more than the copy. Larger requests arrive as several slices, which a
//! pool of copy threads (one per core, at most four) runs side by side; a submitter that may
//! block (an async worker) takes the last slice itself.
//!
//! The submitting thread never waits on an owner: it may be an async worker of the runtime
//! that owner's server answers on (several engines in one process share one). Connecting is
//! asynchronous ([`ShmTransport::connect`]), and a slice whose arena is not mapped yet goes to
//! a copy thread, which asks the owner for it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use mooncake_common::auth::ClusterToken;
use mooncake_common::{Error, ErrorKind, Result};
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
    /// Runs the slice, asking the owner for its arena first if need be: for a thread that
    /// may block.
    fn run(self, peer: &ShmPeer) {
        let Some(slice) = self.worth_copying() else {
            return;
        };
        let outcome = peer.copy(
            slice.op,
            &slice.region,
            slice.local_addr,
            slice.len,
            &slice.remote,
        );
        slice.report(outcome);
    }

    /// Runs the slice unless that needs asking the owner for its arena: then gives it back,
    /// untouched. Never blocks on the owner.
    fn run_mapped(self, peer: &ShmPeer) -> Option<Self> {
        let slice = self.worth_copying()?;
        match peer.copy_if_mapped(
            slice.op,
            &slice.region,
            slice.local_addr,
            slice.len,
            &slice.remote,
        ) {
            None => Some(slice),
            Some(outcome) => {
                slice.report(outcome);
                None
            }
        }
    }

    /// The slice, unless it is not worth copying any more (then reported).
    fn worth_copying(self) -> Option<Self> {
        if self.task.has_failed() {
            self.task.slice_failed(Error::new(
                ErrorKind::TransferFailed,
                "skipped: an earlier slice of the same request failed",
            ));
            return None;
        }
        if self.deadline.is_some_and(|d| d <= Instant::now()) {
            self.task.slice_failed(Error::new(
                ErrorKind::Timeout,
                "missed the request deadline",
            ));
            return None;
        }
        Some(self)
    }

    fn report(self, outcome: Result<()>) {
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

/// A slice for a copy thread.
struct Job {
    peer: Arc<ShmPeer>,
    slice: ShmSlice,
}

/// What we know of one owner.
#[derive(Default)]
struct Owner {
    /// The connection, once made (it may have gone away since).
    peer: Option<Arc<ShmPeer>>,
    /// Why the last attempt to connect failed, if it did.
    failure: Option<Error>,
    /// Attempts so far. One runs at a time; who waited for one takes its outcome.
    attempts: u64,
    connecting: Arc<tokio::sync::Mutex<()>>,
}

impl Owner {
    fn live(&self) -> Option<Arc<ShmPeer>> {
        self.peer.clone().filter(|p| p.is_alive())
    }
}

/// Same-host transfers.
pub struct ShmTransport {
    token: Option<ClusterToken>,
    owners: Mutex<HashMap<String, Owner>>,
    jobs: async_channel::Sender<Job>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    runtime: tokio::runtime::Handle,
    shutdown: CancellationToken,
    watchers: TaskTracker,
}

impl ShmTransport {
    /// Starts the copy threads; watchers of owners run on `runtime`. With `token`, owners
    /// must prove they hold it, and are shown that we do.
    pub fn new(runtime: tokio::runtime::Handle, token: Option<ClusterToken>) -> Result<Self> {
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
                        job.slice.run(&job.peer);
                    }
                })
                .map_err(|e| Error::new(ErrorKind::Memory, format!("spawn copy thread: {e}")))?;
            threads.push(thread);
        }
        Ok(Self {
            token,
            owners: Mutex::new(HashMap::new()),
            jobs,
            threads: Mutex::new(threads),
            runtime,
            shutdown: CancellationToken::new(),
            watchers: TaskTracker::new(),
        })
    }

    /// The live connection to `target`'s owner. Never blocks: [`ShmTransport::connect`] makes
    /// it (and makes it again if the owner restarted). Fails with the last attempt's error
    /// when that failed.
    pub fn peer(&self, target: &ShmTarget) -> Result<Arc<ShmPeer>> {
        if self.shutdown.is_cancelled() {
            return Err(Error::closed("the shared-memory transport"));
        }
        let owners = self.owners();
        let owner = owners.get(&target.socket);
        if let Some(peer) = owner.and_then(Owner::live) {
            return Ok(peer);
        }
        Err(owner.and_then(|o| o.failure.clone()).unwrap_or_else(|| {
            Error::new(
                ErrorKind::Socket,
                format!("not connected to the same-host peer @{}", target.socket),
            )
        }))
    }

    /// Whether the connection to `target`'s owner is up: [`ShmTransport::peer`] has it.
    pub fn is_connected(&self, target: &ShmTarget) -> bool {
        self.owners()
            .get(&target.socket)
            .is_some_and(|o| o.live().is_some())
    }

    /// The connection to `target`'s owner, made now unless it is up (made again if the owner
    /// restarted). Waits for the owner without holding a thread; callers that come while an
    /// attempt runs take its outcome.
    pub async fn connect(&self, target: &ShmTarget) -> Result<Arc<ShmPeer>> {
        let (gate, seen) = {
            let mut owners = self.owners();
            let owner = owners.entry(target.socket.clone()).or_default();
            if let Some(peer) = owner.live() {
                return Ok(peer);
            }
            (owner.connecting.clone(), owner.attempts)
        };
        let _turn = gate.lock().await;
        if let Some(owner) = self.owners().get(&target.socket) {
            if let Some(peer) = owner.live() {
                return Ok(peer);
            }
            if let Some(failure) = owner.failure.as_ref().filter(|_| owner.attempts != seen) {
                return Err(failure.clone());
            }
        }
        let closed = || Error::closed("the shared-memory transport");
        let outcome = tokio::select! {
            _ = self.shutdown.cancelled() => return Err(closed()),
            connected = ShmPeer::connect(target, self.token.as_ref()) => connected,
        };
        if self.shutdown.is_cancelled() {
            return Err(closed());
        }
        let mut owners = self.owners();
        let owner = owners.entry(target.socket.clone()).or_default();
        owner.attempts = owner.attempts.wrapping_add(1);
        match outcome {
            Ok((peer, watch)) => {
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
                owner.peer = Some(peer.clone());
                owner.failure = None;
                Ok(peer)
            }
            Err(e) => {
                owner.failure = Some(e.clone());
                Err(e)
            }
        }
    }

    /// Runs `slices` against `peer`; each is reported to its task exactly once. With
    /// `copy_last`, this thread copies the last slice whatever its size, after queueing the
    /// rest. This thread never asks the owner anything: a slice whose arena is not mapped yet
    /// goes to a copy thread, small or not.
    pub fn submit(&self, peer: &Arc<ShmPeer>, slices: Vec<ShmSlice>, copy_last: bool) {
        let count = slices.len();
        let mut here = None;
        for (i, slice) in slices.into_iter().enumerate() {
            if copy_last && i + 1 == count {
                here = Some(slice);
                continue;
            }
            let unmapped = if slice.len <= INLINE_LIMIT {
                slice.run_mapped(peer)
            } else {
                Some(slice)
            };
            if let Some(slice) = unmapped {
                self.queue(peer, slice);
            }
        }
        if let Some(slice) = here.and_then(|slice| slice.run_mapped(peer)) {
            self.queue(peer, slice);
        }
    }

    /// Hands `slice` to a copy thread.
    fn queue(&self, peer: &Arc<ShmPeer>, slice: ShmSlice) {
        let job = Job {
            peer: peer.clone(),
            slice,
        };
        if let Err(rejected) = self.jobs.try_send(job) {
            // Closed: run it here rather than lose the report, unless that means waiting on
            // the owner.
            let Job { peer, slice } = rejected.into_inner();
            if let Some(slice) = slice.run_mapped(&peer) {
                slice.report(Err(Error::closed("the shared-memory transport")));
            }
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
        self.owners().clear();
    }

    fn owners(&self) -> std::sync::MutexGuard<'_, HashMap<String, Owner>> {
        self.owners.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for ShmTransport {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.jobs.close();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::memory::{Arena, MemoryRegistry};
    use crate::shm::{ControlTable, ShmBuffer, ShmServer};
    use crate::{BatchProgress, TaskStatus};

    /// The peer's socket timeout: a copy this slow waited for an answer that could not come.
    const IO_TIMEOUT: Duration = Duration::from_secs(2);

    fn target(socket: &str, probe: u64) -> ShmTarget {
        ShmTarget {
            host: "this-host".into(),
            socket: socket.into(),
            pid: std::process::id(),
            probe,
        }
    }

    // The owner's server and the copies share one single-threaded runtime, as engines in one
    // process may: connecting and mapping fresh arenas must never wait on the owner from it.
    #[tokio::test(flavor = "current_thread")]
    async fn fresh_arenas_never_wait_on_the_runtime_their_owner_serves_on() {
        const ARENAS: usize = 32;
        const LEN: usize = 4 << 10;
        let control = Arc::new(ControlTable::new().unwrap());
        let registry = Arc::new(MemoryRegistry::default());
        let server = ShmServer::start(control.clone(), registry.clone()).unwrap();
        let mut remote = Vec::with_capacity(ARENAS);
        for _ in 0..ARENAS {
            let arena = Arc::new(Arena::new("remote", LEN).unwrap());
            let slot = control.claim().unwrap();
            registry
                .register(Region::arena(arena.clone(), "*").with_slot(Some(slot)))
                .unwrap();
            remote.push((arena, slot));
        }
        let local = Arc::new(Arena::new("local", LEN).unwrap());
        // SAFETY: the arena is LEN bytes, mapped, and ours alone here.
        unsafe { std::slice::from_raw_parts_mut(local.as_ptr(), LEN) }.fill(0x5a);
        let region = Arc::new(Region::arena(local.clone(), "*"));

        let transport = ShmTransport::new(tokio::runtime::Handle::current(), None).unwrap();
        let target = target(server.name(), control.addr() as u64);
        assert!(!transport.is_connected(&target));
        let started = Instant::now();
        let (first, second) = tokio::join!(transport.connect(&target), transport.connect(&target));
        assert!(
            started.elapsed() < IO_TIMEOUT,
            "connecting waited on the owner"
        );
        let peer = first.unwrap();
        assert!(
            Arc::ptr_eq(&peer, &second.unwrap()),
            "one connection per owner"
        );
        assert!(Arc::ptr_eq(&peer, &transport.peer(&target).unwrap()));

        for (i, (arena, slot)) in remote.iter().enumerate() {
            let progress = BatchProgress::new(1);
            let task = Task::new(1, progress.clone());
            let slice = ShmSlice {
                op: Opcode::Write,
                region: region.clone(),
                local_addr: local.as_ptr() as usize,
                len: LEN,
                remote: RemoteRange {
                    buffer: ShmBuffer {
                        slot: slot.index,
                        generation: slot.generation,
                        arena: Some(arena.id()),
                    },
                    buffer_addr: arena.as_ptr() as u64,
                    addr: arena.as_ptr() as u64,
                },
                task: task.clone(),
                deadline: None,
            };
            let started = Instant::now();
            transport.submit(&peer, vec![slice], i % 2 == 0);
            progress.settled().await;
            let took = started.elapsed();
            assert!(took < IO_TIMEOUT, "copy {i} took {took:?}");
            assert_eq!(task.status(), TaskStatus::Completed, "{:?}", task.error());
            // SAFETY: as above; the copy has settled.
            let landed = unsafe { std::slice::from_raw_parts(arena.as_ptr(), LEN) };
            assert!(landed.iter().all(|b| *b == 0x5a), "copy {i} landed wrong");
        }
        transport.close().await;
        server.close().await;
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_failed_connection_is_what_peer_reports() {
        let transport = ShmTransport::new(tokio::runtime::Handle::current(), None).unwrap();
        let nobody = target("mooncake-shm-test-nobody-listens", 0);
        let error = transport.connect(&nobody).await.unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Socket, "{error:?}");
        let reported = transport.peer(&nobody).unwrap_err();
        assert_eq!(reported.message(), error.message());
        assert!(!transport.is_connected(&nobody));
        transport.close().await;
        let closed = transport.connect(&nobody).await.unwrap_err();
        assert_eq!(closed.kind(), ErrorKind::Closed, "{closed:?}");
    }
}
