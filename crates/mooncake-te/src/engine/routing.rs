//! Dispatch: a request cut into slices and handed to the transport the router picks, and what
//! each transport carried.

use super::*;

impl TransferEngine {
    pub(super) fn dispatch(&self, job: Dispatch) {
        let Dispatch {
            request,
            segment,
            region,
            task,
            deadline,
            copy_here,
        } = job;
        let pieces = slicing::slices(
            request.len,
            self.config.slice_size,
            slicing::default_fragment_limit(self.config.slice_size),
        );
        let slice_at = |(offset, len): (usize, usize)| Slice {
            op: request.op,
            local_addr: request.local_addr + offset,
            len,
            remote_addr: request.remote_addr + offset as u64,
            region: region.clone(),
            task: task.clone(),
            deadline,
        };
        match self.router.route(&segment, &request) {
            Ok(transport) => {
                self.stats.record(transport.kind(), request.len);
                tracing::debug!(segment = %segment.name, len = request.len, via = transport.kind().name(), "request routed");
                transport.submit(
                    &segment,
                    &request,
                    pieces.map(slice_at).collect(),
                    copy_here,
                );
            }
            Err(error) => {
                for _ in pieces {
                    task.slice_failed(error.clone());
                }
            }
        }
    }

    /// The rails to every peer used so far: TCP ones by the peer's first data address, RDMA
    /// ones by the peer's name and the two memory locations.
    pub fn rail_stats(&self) -> Vec<(String, Vec<RailStats>)> {
        let mut all = self.tcp.rail_stats();
        if let Some(rdma) = &self.local.rdma {
            let mut by_peer: Vec<(String, Vec<RailStats>)> = Vec::new();
            for rail in rdma.all_rails() {
                let key = format!(
                    "rdma {} ({} -> {})",
                    rail.peer, rail.local_location, rail.remote_location
                );
                match by_peer.iter_mut().find(|(k, _)| *k == key) {
                    Some((_, rails)) => rails.push(rail.stats),
                    None => by_peer.push((key, vec![rail.stats])),
                }
            }
            all.extend(by_peer);
        }
        all
    }

    /// Requests and bytes submitted through each transport since start.
    pub fn stats(&self) -> Vec<(TransportKind, u64, u64)> {
        self.stats.snapshot()
    }

    pub(super) fn dispatch_after_refresh(self: &Arc<Self>, job: Dispatch) {
        let engine = self.clone();
        self.spawn(async move {
            let local_desc = engine.local.desc().encode();
            let refreshed = tokio::select! {
                _ = engine.shutdown.cancelled() => Err(Error::closed("the transfer engine")),
                fetched = engine.resolver.fetch(&job.segment.name, &local_desc) => fetched,
            };
            let (addr, len) = (job.request.remote_addr, job.request.len);
            let outcome = refreshed.and_then(|fetched| {
                job.segment.set_desc(fetched.desc);
                match job.segment.desc().buffer_containing(addr, len as u64) {
                    Some(_) => Ok(()),
                    None => Err(Error::new(
                        ErrorKind::AddressNotRegistered,
                        format!(
                            "remote range [{addr:#x}, +{len}) is not inside one buffer of segment '{}'",
                            job.segment.name
                        ),
                    )),
                }
            });
            match outcome {
                Ok(()) => engine.dispatch(job),
                Err(error) => {
                    for _ in 0..slicing::slice_count(
                        len,
                        engine.config.slice_size,
                        slicing::default_fragment_limit(engine.config.slice_size),
                    ) {
                        job.task.slice_failed(error.clone());
                    }
                }
            }
        });
    }
}

/// One request on its way to a transport.
pub(super) struct Dispatch {
    pub(super) request: TransferRequest,
    pub(super) segment: Arc<RemoteSegment>,
    pub(super) region: Arc<Region>,
    pub(super) task: Arc<Task>,
    pub(super) deadline: Option<Instant>,
    /// Whether the submitting thread copies the last same-host slice itself.
    pub(super) copy_here: bool,
}
