//! Batches: submission, waiting, status and release.

use super::*;

impl TransferEngine {
    /// Submits a batch. Local ranges and segment handles are checked here and the whole
    /// submission is refused if one is wrong; remote ranges are checked against the target's
    /// descriptor (refreshed once on a miss) and fail only their own task.
    pub fn submit(
        self: &Arc<Self>,
        requests: &[TransferRequest],
        options: SubmitOptions,
    ) -> Result<BatchId> {
        self.ensure_open()?;
        if options.notify.is_some() && requests.is_empty() {
            return Err(Error::invalid(
                "a batch with a notification needs at least one request",
            ));
        }
        let mut resolved = Vec::with_capacity(requests.len());
        {
            let segments = self.segments();
            for (i, request) in requests.iter().enumerate() {
                let segment = segments.get(request.segment).ok_or_else(|| {
                    Error::invalid(format!(
                        "request {i}: unknown segment handle (open the segment first)"
                    ))
                })?;
                if self.config.protocol == Protocol::Shm
                    && (self.shm.is_none() || segment.same_host().is_none())
                {
                    return Err(Error::new(
                        ErrorKind::NotSupportedTransport,
                        format!(
                            "protocol 'shm' needs a target on this host with shared memory enabled; '{}' is not",
                            segment.name
                        ),
                    ));
                }
                let region = self
                    .local
                    .registry
                    .find(request.local_addr, request.len)
                    .ok_or_else(|| {
                        Error::new(
                            ErrorKind::AddressNotRegistered,
                            format!(
                                "request {i}: local range [{:#x}, +{}) is not inside one registered buffer",
                                request.local_addr, request.len
                            ),
                        )
                    })?;
                resolved.push((segment, region));
            }
        }
        let submitted_at = Instant::now();
        let deadline = options.timeout.map(|t| submitted_at + t);
        let progress = BatchProgress::new(requests.len());
        let routes = Arc::new(Routes::new(requests.iter().map(|r| r.op)));
        let mut tasks = Vec::with_capacity(requests.len());
        let last = requests.len().saturating_sub(1);
        for (i, (request, (segment, region))) in requests.iter().zip(resolved.iter()).enumerate() {
            let count = slicing::slice_count(
                request.len,
                self.config.slice_size,
                slicing::default_fragment_limit(self.config.slice_size),
            );
            let task = Task::new(count as u32, progress.clone());
            tasks.push(task.clone());
            if count == 0 {
                continue;
            }
            let job = Dispatch {
                request: *request,
                segment: segment.clone(),
                region: region.clone(),
                task,
                deadline,
                copy_here: options.copy_on_caller && i == last,
                routes: routes.clone(),
                index: i,
            };
            if segment
                .desc()
                .buffer_containing(request.remote_addr, request.len as u64)
                .is_some()
            {
                self.dispatch(job);
            } else {
                self.dispatch_after_refresh(job);
            }
        }
        let notify = options.notify.map(|message| PendingNotify {
            target: resolved[0].0.name.clone(),
            message,
            sent: OnceCell::new(),
        });
        let has_notify = notify.is_some();
        let batch = Arc::new(Batch {
            tasks,
            progress,
            submitted_at,
            notify,
            routes,
            accounted: AtomicBool::new(false),
        });
        let id = self.batches().insert(batch.clone());
        if has_notify {
            // Sent at completion even if nobody awaits the batch.
            let engine = self.clone();
            self.spawn(async move {
                if let Err(e) = engine.settle(&batch).await {
                    tracing::debug!("batch with a notification did not complete: {e}");
                }
            });
        }
        Ok(id)
    }

    /// Waits for a batch to settle. Resolves when every task completed (and a requested
    /// notification was delivered); otherwise fails with the first task's error.
    pub async fn wait(&self, id: BatchId) -> Result<()> {
        let batch = self.batch(id)?;
        self.settle(&batch).await
    }

    /// Per-task status of a batch.
    pub fn status(&self, id: BatchId) -> Result<Vec<TaskReport>> {
        Ok(self.batch(id)?.reports())
    }

    /// When the batch was submitted, and when each task finished (for latency figures).
    pub fn timings(&self, id: BatchId) -> Result<(Instant, Vec<Option<Instant>>)> {
        let batch = self.batch(id)?;
        Ok((
            batch.submitted_at,
            batch.tasks.iter().map(|t| t.finished_at()).collect(),
        ))
    }

    /// Frees a settled batch; `ERR_BATCH_BUSY` while some task is unfinished.
    pub fn free_batch(&self, id: BatchId) -> Result<()> {
        let mut batches = self.batches();
        let batch = batches
            .get(id)
            .ok_or_else(|| Error::invalid("unknown or freed batch id"))?;
        if !batch.progress.is_settled() {
            return Err(Error::new(
                ErrorKind::BatchBusy,
                "the batch still has unfinished tasks",
            ));
        }
        let removed = batches.remove(id);
        drop(batches);
        if let Some(batch) = removed {
            self.account(&batch);
        }
        Ok(())
    }

    /// Frees the batch now if settled, or as soon as it settles.
    pub fn release_batch(self: &Arc<Self>, id: BatchId) {
        let Ok(batch) = self.batch(id) else { return };
        if batch.progress.is_settled() {
            self.batches().remove(id);
            self.account(&batch);
            return;
        }
        let engine = self.clone();
        self.spawn(async move {
            batch.progress.settled().await;
            engine.batches().remove(id);
            engine.account(&batch);
        });
    }

    /// Submits, waits and frees: the one-call transfer.
    pub async fn transfer(
        self: &Arc<Self>,
        requests: &[TransferRequest],
        options: SubmitOptions,
    ) -> Result<()> {
        let id = self.submit(requests, options)?;
        let result = self.wait(id).await;
        self.release_batch(id);
        result
    }

    /// Live batches (submitted and not yet freed).
    pub fn batch_count(&self) -> usize {
        self.batches().len()
    }

    pub(super) fn batch(&self, id: BatchId) -> Result<Arc<Batch>> {
        self.batches()
            .get(id)
            .cloned()
            .ok_or_else(|| Error::invalid("unknown or freed batch id"))
    }

    /// Counts a settled batch's requests in the statistics, once: when it is first awaited or
    /// freed. Latency is measured to when each task settled, not to now.
    fn account(&self, batch: &Batch) {
        if batch.accounted.swap(true, Ordering::AcqRel) {
            return;
        }
        for (index, task) in batch.tasks.iter().enumerate() {
            let (route, op) = batch.routes.get(index);
            let latency = (task.status() == TaskStatus::Completed)
                .then(|| task.finished_at())
                .flatten()
                .map(|at| at.saturating_duration_since(batch.submitted_at));
            self.stats
                .record_settled(route, op, task.transferred_bytes(), latency);
        }
    }

    pub(super) fn batches(&self) -> std::sync::MutexGuard<'_, HandleSlab<Arc<Batch>>> {
        self.batches.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) async fn settle(&self, batch: &Batch) -> Result<()> {
        batch.progress.settled().await;
        self.account(batch);
        if let Some(error) = batch.first_error() {
            return Err(error);
        }
        match &batch.notify {
            None => Ok(()),
            Some(notify) => notify
                .sent
                .get_or_init(|| self.send_notify(&notify.target, &notify.message))
                .await
                .clone(),
        }
    }
}
