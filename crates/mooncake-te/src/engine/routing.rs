//! Dispatch: a request cut into slices and handed to the transport the router picks, and what
//! each transport carried.

use std::collections::HashMap;

use super::*;

impl TransferEngine {
    pub(super) fn dispatch(self: &Arc<Self>, job: Dispatch) {
        self.route(job, false);
    }

    /// Routes `job` and hands its slices to the transport; with `prepared`, what the router
    /// asked for first was done already (it may have failed).
    fn route(self: &Arc<Self>, job: Dispatch, prepared: bool) {
        let transport = match self.router.route(&job.segment, &job.request, prepared) {
            Ok(Route::Ready(transport)) => Ok(transport),
            Ok(Route::After(first)) => {
                // Routed again once done, off the submitting thread.
                let engine = self.clone();
                self.spawn(async move {
                    tokio::select! {
                        _ = engine.shutdown.cancelled() => {
                            engine.fail(&job, &Error::closed("the transfer engine"));
                        }
                        () = first => engine.route(job, true),
                    }
                });
                return;
            }
            Err(error) => Err(error),
        };
        let Dispatch {
            request,
            segment,
            region,
            task,
            deadline,
            copy_here,
            routes,
            index,
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
        match transport {
            Ok(transport) => {
                self.stats.record(transport.kind(), request.len);
                routes.routed(index, transport.kind());
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

    /// Fails every slice of `job` with `error`.
    fn fail(&self, job: &Dispatch, error: &Error) {
        for _ in 0..slicing::slice_count(
            job.request.len,
            self.config.slice_size,
            slicing::default_fragment_limit(self.config.slice_size),
        ) {
            job.task.slice_failed(error.clone());
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

    /// The rails to each segment opened so far, by the segment's name: TCP ones to its data
    /// server, RDMA ones to its NICs. A segment reached only through shared memory or not
    /// reached yet has none and is left out.
    pub fn rails_by_segment(&self) -> Vec<(String, Vec<RailStats>)> {
        let segments = self.segments().all();
        // One pass over the RDMA rails, not one per segment.
        let mut rdma: HashMap<String, Vec<RailStats>> = HashMap::new();
        if let Some(transport) = &self.local.rdma {
            for rail in transport.all_rails() {
                rdma.entry(rail.peer).or_default().push(rail.stats);
            }
        }
        segments
            .iter()
            .filter_map(|segment| {
                let mut rails = self.tcp.rails_to(&segment.tcp).unwrap_or_default();
                if let Some(peer) = segment.rdma() {
                    rails.extend(rdma.remove(&peer.server_name).unwrap_or_default());
                }
                (!rails.is_empty()).then(|| (segment.name.clone(), rails))
            })
            .collect()
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
                Err(error) => engine.fail(&job, &error),
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
    /// Where the batch keeps this request's route, and the request's place in the batch.
    pub(super) routes: Arc<Routes>,
    pub(super) index: usize,
}
