//! Routing: a transport per request (shared memory, RDMA or TCP), and what each carried.

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
        match self.route(&segment, &request) {
            Ok(Route::Tcp) => {
                self.stats.record(TransportKind::Tcp, request.len);
                tracing::debug!(segment = %segment.name, len = request.len, "request via tcp");
                self.tcp.submit(&segment.tcp, pieces.map(slice_at));
            }
            Ok(Route::Rdma(rdma, peer)) => {
                self.stats.record(TransportKind::Rdma, request.len);
                tracing::debug!(segment = %segment.name, len = request.len, "request via rdma");
                rdma.submit(&peer, pieces.map(slice_at).collect());
            }
            Ok(Route::Shm(transport, peer, remote)) => {
                self.stats.record(TransportKind::Shm, request.len);
                tracing::debug!(segment = %segment.name, len = request.len, path = ?peer.path(&remote.buffer), "request via shared memory");
                let slices = pieces
                    .map(|(offset, len)| ShmSlice {
                        op: request.op,
                        region: region.clone(),
                        local_addr: request.local_addr + offset,
                        len,
                        remote: RemoteRange {
                            addr: remote.addr + offset as u64,
                            ..remote
                        },
                        task: task.clone(),
                        deadline,
                    })
                    .collect();
                transport.submit(&peer, slices, copy_here);
            }
            Err(error) => {
                for _ in pieces {
                    task.slice_failed(error.clone());
                }
            }
        }
    }

    /// Under `auto`: shared memory when the target is on this host and the buffer is
    /// reachable that way, else RDMA when both ends have it and the buffer has remote keys,
    /// else TCP. A forced protocol takes its own path or fails.
    pub(super) fn route(
        &self,
        segment: &RemoteSegment,
        request: &TransferRequest,
    ) -> Result<Route<'_>> {
        let protocol = self.config.protocol;
        let mut unreachable = None;
        if matches!(protocol, Protocol::Auto | Protocol::Shm) {
            if let (Some(transport), Some(target)) = (&self.shm, segment.same_host()) {
                let desc = segment.desc();
                let buffer = desc.buffer_containing(request.remote_addr, request.len as u64);
                let shared = buffer.and_then(|b| Some((b.addr, shm_buffer(b)?)));
                if let Some((buffer_addr, buffer)) = shared {
                    match transport.peer(&target) {
                        Ok(peer) if peer.path(&buffer).is_some() => {
                            let remote = RemoteRange {
                                buffer,
                                buffer_addr,
                                addr: request.remote_addr,
                            };
                            return Ok(Route::Shm(transport, peer, remote));
                        }
                        Ok(_) => {
                            tracing::debug!(segment = %segment.name, "buffer outside arenas and process_vm not permitted; using tcp")
                        }
                        Err(e) => {
                            tracing::debug!(segment = %segment.name, "same-host peer unreachable ({e}); using tcp");
                            unreachable = Some(e);
                        }
                    }
                }
            }
            if self.config.protocol == Protocol::Shm {
                return Err(unreachable.unwrap_or_else(|| {
                    Error::new(
                        ErrorKind::NotSupportedTransport,
                        format!(
                            "no shared-memory path to [{:#x}, +{}) in '{}'",
                            request.remote_addr, request.len, segment.name
                        ),
                    )
                }));
            }
        }
        if matches!(protocol, Protocol::Auto | Protocol::Rdma) {
            if let (Some(rdma), Some(peer)) = (&self.local.rdma, segment.rdma()) {
                let keyed = peer
                    .buffer_index(request.remote_addr)
                    .is_some_and(|i| !peer.buffers[i].rkeys.is_empty());
                if keyed {
                    return Ok(Route::Rdma(rdma, peer));
                }
            }
            if protocol == Protocol::Rdma {
                return Err(Error::new(
                    ErrorKind::NotSupportedTransport,
                    format!(
                        "no RDMA path to [{:#x}, +{}) in '{}'",
                        request.remote_addr, request.len, segment.name
                    ),
                ));
            }
        }
        Ok(Route::Tcp)
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

/// Where a request goes.
pub(super) enum Route<'a> {
    Tcp,
    Rdma(&'a RdmaTransport, Arc<RdmaPeer>),
    Shm(&'a ShmTransport, Arc<ShmPeer>, RemoteRange),
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
