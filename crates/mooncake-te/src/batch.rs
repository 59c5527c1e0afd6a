//! Batches: one task per request, awaited as a whole.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use mooncake_common::{Error, Handle, Result};
use mooncake_transport::{BatchProgress, Task, TaskStatus};
use tokio::sync::OnceCell;
use tokio::time::Instant;

use crate::stats::Routes;

/// Handle of a submitted batch.
pub type BatchId = Handle;

/// The state of one task, as reported to callers.
#[derive(Debug, Clone)]
pub struct TaskReport {
    /// Mooncake's status.
    pub status: TaskStatus,
    /// Bytes that arrived.
    pub transferred_bytes: u64,
    /// Why it did not complete.
    pub error: Option<Error>,
}

/// A notification to send once the batch completes.
pub(crate) struct PendingNotify {
    pub(crate) target: String,
    pub(crate) message: String,
    pub(crate) sent: OnceCell<Result<()>>,
}

/// A submitted batch.
pub(crate) struct Batch {
    pub(crate) tasks: Vec<Arc<Task>>,
    pub(crate) progress: Arc<BatchProgress>,
    pub(crate) submitted_at: Instant,
    pub(crate) notify: Option<PendingNotify>,
    /// Each request's direction and transport, for the statistics.
    pub(crate) routes: Arc<Routes>,
    /// Set once the settled batch has been counted in the statistics.
    pub(crate) accounted: AtomicBool,
}

impl Batch {
    pub(crate) fn reports(&self) -> Vec<TaskReport> {
        self.tasks
            .iter()
            .map(|task| TaskReport {
                status: task.status(),
                transferred_bytes: task.transferred_bytes(),
                error: task.error().cloned(),
            })
            .collect()
    }

    /// The first error in request order, once settled.
    pub(crate) fn first_error(&self) -> Option<Error> {
        if !self.progress.has_failure() {
            return None;
        }
        self.tasks.iter().find_map(|t| t.error().cloned())
    }
}
