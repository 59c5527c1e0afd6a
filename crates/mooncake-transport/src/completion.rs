//! Progress of tasks and batches.
//!
//! A batch holds one [`Task`] per request; a task counts its slices. Each slice reports exactly
//! once, success or failure, and the last report of a task settles it and, if it was the
//! batch's last, wakes whoever awaits the batch. Counting is lock-free; the first error of a
//! task is kept (later ones are echoes of the same cause).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use mooncake_common::{Error, ErrorKind};
use tokio::sync::Notify;
use tokio::time::Instant;

/// Mooncake's task states, with its numbering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum TaskStatus {
    /// In progress.
    Waiting = 0,
    /// Accepted, not yet started (unused by the TCP path; kept for the numbering).
    Pending = 1,
    /// The request was invalid.
    Invalid = 2,
    /// Cancelled: the engine closed.
    Canceled = 3,
    /// Every byte arrived.
    Completed = 4,
    /// The deadline passed first.
    Timeout = 5,
    /// A slice failed.
    Failed = 6,
}

impl TaskStatus {
    fn from_u8(value: u8) -> Self {
        match value {
            1 => Self::Pending,
            2 => Self::Invalid,
            3 => Self::Canceled,
            4 => Self::Completed,
            5 => Self::Timeout,
            6 => Self::Failed,
            _ => Self::Waiting,
        }
    }

    /// Mooncake's name (`COMPLETED`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Self::Waiting => "WAITING",
            Self::Pending => "PENDING",
            Self::Invalid => "INVALID",
            Self::Canceled => "CANCELED",
            Self::Completed => "COMPLETED",
            Self::Timeout => "TIMEOUT",
            Self::Failed => "FAILED",
        }
    }

    /// Whether the task is settled.
    pub fn is_terminal(self) -> bool {
        !matches!(self, Self::Waiting | Self::Pending)
    }

    fn for_error(error: &Error) -> Self {
        match error.kind() {
            ErrorKind::Timeout => Self::Timeout,
            ErrorKind::Closed => Self::Canceled,
            ErrorKind::InvalidArgument => Self::Invalid,
            _ => Self::Failed,
        }
    }
}

/// Shared progress of one batch.
#[derive(Debug)]
pub struct BatchProgress {
    unsettled: AtomicUsize,
    failed: AtomicBool,
    settled: Notify,
}

impl BatchProgress {
    /// Progress for a batch of `tasks` tasks.
    pub fn new(tasks: usize) -> Arc<Self> {
        Arc::new(Self {
            unsettled: AtomicUsize::new(tasks),
            failed: AtomicBool::new(false),
            settled: Notify::new(),
        })
    }

    /// Whether every task has settled.
    pub fn is_settled(&self) -> bool {
        self.unsettled.load(Ordering::Acquire) == 0
    }

    /// Whether some task did not complete.
    pub fn has_failure(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Resolves once every task has settled.
    pub async fn settled(&self) {
        loop {
            // Registered before the check, so a settle in between still wakes us.
            let notified = self.settled.notified();
            if self.is_settled() {
                return;
            }
            notified.await;
        }
    }

    fn task_settled(&self, ok: bool) {
        if !ok {
            self.failed.store(true, Ordering::Release);
        }
        if self.unsettled.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.settled.notify_waiters();
        }
    }
}

/// Progress of one request.
#[derive(Debug)]
pub struct Task {
    slices: u32,
    succeeded: AtomicU32,
    failed: AtomicU32,
    /// Slices reported either way; the report that completes the count settles the task.
    reported: AtomicU32,
    transferred: AtomicU64,
    status: AtomicU8,
    error: OnceLock<Error>,
    finished_at: OnceLock<Instant>,
    batch: Arc<BatchProgress>,
}

impl Task {
    /// A task of `slices` slices in `batch`. A task of zero slices settles at once.
    pub fn new(slices: u32, batch: Arc<BatchProgress>) -> Arc<Self> {
        let task = Arc::new(Self {
            slices,
            succeeded: AtomicU32::new(0),
            failed: AtomicU32::new(0),
            reported: AtomicU32::new(0),
            transferred: AtomicU64::new(0),
            status: AtomicU8::new(TaskStatus::Waiting as u8),
            error: OnceLock::new(),
            finished_at: OnceLock::new(),
            batch,
        });
        if slices == 0 {
            task.settle();
        }
        task
    }

    /// A task that failed before any slice was sent.
    pub fn failed_at_submit(error: Error, batch: Arc<BatchProgress>) -> Arc<Self> {
        let task = Self::new(1, batch);
        task.slice_failed(error);
        task
    }

    /// A slice of `len` bytes arrived.
    pub fn slice_done(&self, len: usize) {
        self.transferred.fetch_add(len as u64, Ordering::Relaxed);
        self.succeeded.fetch_add(1, Ordering::AcqRel);
        self.check_settled();
    }

    /// A slice failed with `error`.
    pub fn slice_failed(&self, error: Error) {
        let _ = self.error.set(error);
        self.failed.fetch_add(1, Ordering::AcqRel);
        self.check_settled();
    }

    /// Whether some slice already failed (later slices need not be sent).
    pub fn has_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire) > 0
    }

    /// Current state.
    pub fn status(&self) -> TaskStatus {
        TaskStatus::from_u8(self.status.load(Ordering::Acquire))
    }

    /// Bytes of slices that arrived; a lower bound until the task settles.
    pub fn transferred_bytes(&self) -> u64 {
        self.transferred.load(Ordering::Relaxed)
    }

    /// The first error, once a slice failed.
    pub fn error(&self) -> Option<&Error> {
        self.error.get()
    }

    /// When the task settled.
    pub fn finished_at(&self) -> Option<Instant> {
        self.finished_at.get().copied()
    }

    fn check_settled(&self) {
        // Two last reports may land at once; only the one whose count completes settles.
        if self.reported.fetch_add(1, Ordering::AcqRel) + 1 == self.slices {
            self.settle();
        }
    }

    fn settle(&self) {
        let status = match self.error.get() {
            None => TaskStatus::Completed,
            Some(error) => TaskStatus::for_error(error),
        };
        let _ = self.finished_at.set(Instant::now());
        self.status.store(status as u8, Ordering::Release);
        self.batch.task_settled(status == TaskStatus::Completed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_reports_racing_settle_the_batch_once() {
        const ROUNDS: usize = 20_000;
        let tasks: Vec<_> = (0..ROUNDS)
            .map(|_| {
                let batch = BatchProgress::new(1);
                (Task::new(2, batch.clone()), batch)
            })
            .collect();
        let tasks = Arc::new(tasks);
        let start = Arc::new(std::sync::Barrier::new(2));
        let racers: Vec<_> = (0..2)
            .map(|_| {
                let (tasks, start) = (tasks.clone(), start.clone());
                std::thread::spawn(move || {
                    for (task, _) in tasks.iter() {
                        start.wait();
                        task.slice_done(1);
                    }
                })
            })
            .collect();
        racers.into_iter().for_each(|r| r.join().unwrap());
        let broken = tasks
            .iter()
            .filter(|(_, batch)| !batch.is_settled())
            .count();
        assert_eq!(broken, 0, "batches left unsettled by a double settle");
    }

    #[tokio::test]
    async fn batch_settles_after_every_slice() {
        let batch = BatchProgress::new(2);
        let a = Task::new(2, batch.clone());
        let b = Task::new(0, batch.clone());
        assert_eq!(b.status(), TaskStatus::Completed);
        a.slice_done(10);
        assert_eq!(a.status(), TaskStatus::Waiting);
        assert!(!batch.is_settled());
        let waiter = tokio::spawn({
            let batch = batch.clone();
            async move { batch.settled().await }
        });
        a.slice_failed(Error::new(ErrorKind::Timeout, "late"));
        waiter.await.unwrap();
        assert_eq!(a.status(), TaskStatus::Timeout);
        assert_eq!(a.transferred_bytes(), 10);
        assert!(batch.has_failure());
    }
}
