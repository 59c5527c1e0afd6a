//! Sending pieces: the rails of a peer, a rail per piece, retries, and posting on the queues.

use super::*;

impl Inner {
    pub(super) fn context(&self, name: &str) -> Option<&Arc<Context>> {
        self.contexts.iter().find(|c| c.name == name)
    }

    pub(super) fn rails_for(
        &self,
        peer: &RdmaPeer,
        local_location: &str,
        buffer: usize,
    ) -> Arc<RailEntry> {
        let remote_location = peer.buffers[buffer].location.clone();
        let mine = |names: &[String]| -> Vec<String> {
            names
                .iter()
                .filter(|n| self.context(n).is_some())
                .cloned()
                .collect()
        };
        let (mut lp, mut la) = self
            .matrix
            .get(local_location)
            .or_else(|| self.matrix.get(WILDCARD))
            .map(|e| (mine(&e.preferred), mine(&e.available)))
            .unwrap_or_default();
        if lp.is_empty() && la.is_empty() {
            lp = self.contexts.iter().map(|c| c.name.clone()).collect();
        }
        la.retain(|n| !lp.contains(n));
        let theirs = |names: &[String]| -> Vec<String> {
            names
                .iter()
                .filter(|n| peer.rkey(buffer, n).is_some())
                .cloned()
                .collect()
        };
        let (mut rp, mut ra) = peer
            .matrix
            .get(&remote_location)
            .or_else(|| peer.matrix.get(WILDCARD))
            .map(|e| (theirs(&e.preferred), theirs(&e.available)))
            .unwrap_or_default();
        if rp.is_empty() && ra.is_empty() {
            rp = peer
                .devices
                .iter()
                .map(|d| d.name.clone())
                .filter(|n| peer.rkey(buffer, n).is_some())
                .collect();
        }
        ra.retain(|n| !rp.contains(n));
        let pairs = |ls: &[String], rs: &[String]| -> Vec<(String, String)> {
            ls.iter()
                .flat_map(|l| rs.iter().map(move |r| (l.clone(), r.clone())))
                .collect()
        };
        let preferred = pairs(&lp, &rp);
        let mut available = pairs(&lp, &ra);
        available.extend(pairs(&la, &rp));
        available.extend(pairs(&la, &ra));

        let key = (
            peer.server_name.clone(),
            local_location.to_owned(),
            remote_location.clone(),
        );
        let mut rails = lock(&self.rails);
        if let Some(entry) = rails.get(&key) {
            if entry.preferred == preferred && entry.available == available {
                return entry.clone();
            }
        }
        let set = RailSet::new(self.policy.clone(), preferred.clone(), available.clone());
        for i in 0..set.len() {
            if self.context(set.rail(i).0).is_some_and(|c| !c.usable()) {
                set.pause(i);
            }
        }
        let entry = Arc::new(RailEntry {
            peer: peer.server_name.clone(),
            local_location: local_location.to_owned(),
            remote_location,
            preferred,
            available,
            set,
        });
        rails.insert(key, entry.clone());
        entry
    }

    pub(super) fn set_device_rails(&self, device: &str, up: bool) {
        let rails = lock(&self.rails);
        for entry in rails.values() {
            for i in 0..entry.set.len() {
                if entry.set.rail(i).0 == device {
                    if up {
                        entry.set.resume(i);
                    } else {
                        entry.set.pause(i);
                    }
                }
            }
        }
    }

    pub(super) fn dispatch(self: &Arc<Self>, mut piece: Piece) {
        if self.closed.load(Ordering::Acquire) {
            return self.finish(piece, Err(Error::closed("the RDMA transport")));
        }
        if piece.slice.task.has_failed() {
            let e = Error::new(
                ErrorKind::TransferFailed,
                "another slice of the request failed",
            );
            return self.finish(piece, Err(e));
        }
        if piece.expired(TokioInstant::now()) {
            let e = deadline_error(&piece);
            return self.finish(piece, Err(e));
        }
        // Mooncake's rule: a slice fails for good once its failures reach MC_RETRY_CNT.
        if piece.attempts >= self.policy.retry_budget {
            let last = piece
                .last_error
                .take()
                .map(|e| e.to_string())
                .unwrap_or_default();
            let e = Error::new(
                ErrorKind::TransferFailed,
                format!(
                    "slice to {} failed after {} attempts: {last}",
                    piece.peer.server_name, piece.attempts
                ),
            );
            return self.finish(piece, Err(e));
        }
        let Some(rail) = pick_rail(&piece) else {
            let last = piece
                .last_error
                .as_ref()
                .map(|e| format!(" (last error: {e})"))
                .unwrap_or_default();
            let e = Error::new(
                ErrorKind::NoRail,
                format!(
                    "no usable rail to {} for {} -> {}{last}",
                    piece.peer.server_name, piece.rails.local_location, piece.rails.remote_location
                ),
            );
            return self.finish(piece, Err(e));
        };
        piece.rail = Some(rail);
        let (local, remote) = piece.rails.set.rail(rail);
        let Some(ctx) = self.context(local).cloned() else {
            let e = Error::new(ErrorKind::DeviceNotFound, format!("no context {local}"));
            return self.retry(piece, e, Charge::Transient);
        };
        let peer_path = piece.peer.nic_path(remote);
        let ep = match self.endpoint(&ctx, &peer_path) {
            Ok(ep) => ep,
            Err(e) => return self.retry(piece, e, Charge::Transient),
        };
        let peer = piece.peer.clone();
        let mut state = ep.lock();
        match state.state {
            EndpointState::Connected => {
                drop(state);
                self.post(&ctx, &ep, vec![piece]);
            }
            EndpointState::Destroying | EndpointState::Destroyed => {
                drop(state);
                let e = Error::new(
                    ErrorKind::Endpoint,
                    format!("endpoint to {peer_path} retired"),
                );
                self.retry(piece, e, Charge::None);
            }
            _ => {
                state.pending.push(piece);
                let spawn = !state.connecting;
                state.connecting = true;
                drop(state);
                if spawn {
                    self.spawn_connect(ctx, ep, peer);
                }
            }
        }
    }

    pub(super) fn retry(self: &Arc<Self>, mut piece: Piece, error: Error, charge: Charge) {
        let rail = piece.rail.take();
        if let Some(r) = rail {
            settle(&piece.rails.set, r, piece.len as u64, charge);
        }
        tracing::debug!(
            peer = %piece.peer.server_name,
            attempt = piece.attempts,
            "RDMA slice retried: {error}"
        );
        piece.avoid = rail.or(piece.avoid);
        piece.attempts += 1;
        piece.last_error = Some(error);
        self.dispatch(piece);
    }

    pub(super) fn finish(&self, mut piece: Piece, outcome: Result<()>) {
        if let Some(r) = piece.rail.take() {
            match &outcome {
                Ok(()) => piece.rails.set.done(r, piece.len as u64),
                Err(_) => settle(&piece.rails.set, r, piece.len as u64, Charge::None),
            }
        }
        piece.slice.piece_finished(outcome);
    }

    /// Posts `pieces` on `ep`, as far as its send queues and the context's CQ have room.
    pub(super) fn post(
        self: &Arc<Self>,
        ctx: &Arc<Context>,
        ep: &Arc<Endpoint>,
        pieces: Vec<Piece>,
    ) {
        if self.post_now(ctx, ep, pieces) {
            // The CQ may have emptied while the pieces were being queued.
            self.drain_cq_waiting(ctx);
        }
    }

    /// Posts what fits; returns whether some pieces were queued for room in the CQ.
    pub(super) fn post_now(
        self: &Arc<Self>,
        ctx: &Arc<Context>,
        ep: &Arc<Endpoint>,
        pieces: Vec<Piece>,
    ) -> bool {
        let mut rejected: Vec<(Piece, Error)> = Vec::new();
        let mut broken: Vec<(Piece, Error)> = Vec::new();
        let mut waiting: Vec<Piece> = Vec::new();
        {
            let mut state = ep.lock();
            if state.state != EndpointState::Connected {
                drop(state);
                for piece in pieces {
                    let e = Error::new(
                        ErrorKind::Endpoint,
                        format!("endpoint to {} is not connected", ep.peer_path),
                    );
                    self.retry(piece, e, Charge::None);
                }
                return false;
            }
            let now = TokioInstant::now();
            let nqp = state.qps.len();
            let mut batches: Vec<Vec<WorkRequest>> = vec![Vec::new(); nqp];
            let regs = self.registrations.read().unwrap_or_else(|p| p.into_inner());
            let mut inflight = lock(&self.inflight);
            for piece in pieces {
                if piece.expired(now) {
                    let e = deadline_error(&piece);
                    broken.push((piece, e));
                    continue;
                }
                let Some(qp) = (0..nqp)
                    .map(|k| (state.next_qp + k) % nqp)
                    .find(|&i| state.depth[i] < self.config.max_wr)
                else {
                    state.backlog.push_back(piece);
                    continue;
                };
                if !ctx.reserve_cqe() {
                    waiting.push(piece);
                    continue;
                }
                state.next_qp = (qp + 1) % nqp;
                let lkey = regs
                    .get(&piece.region_addr)
                    .and_then(|r| r.mrs.get(ctx.index))
                    .map(|m| m.lkey());
                let remote_dev = piece
                    .rail
                    .map(|r| piece.rails.set.rail(r).1)
                    .unwrap_or_default();
                let rkey = piece.peer.rkey(piece.buffer, remote_dev);
                let (Some(lkey), Some(rkey)) = (lkey, rkey) else {
                    ctx.release_cqes(1);
                    let e = Error::new(
                        ErrorKind::AddressNotRegistered,
                        format!(
                            "no key for {:#x} on {} or {remote_dev}",
                            piece.local_addr, ctx.name
                        ),
                    );
                    broken.push((piece, e));
                    continue;
                };
                let wr_id = self.next_wr.fetch_add(1, Ordering::Relaxed);
                batches[qp].push(WorkRequest {
                    wr_id,
                    op: match piece.op {
                        Opcode::Read => WrOp::Read,
                        Opcode::Write => WrOp::Write,
                    },
                    local_addr: piece.local_addr as u64,
                    len: piece.len as u32,
                    lkey,
                    remote_addr: piece.remote_addr,
                    rkey,
                });
                state.depth[qp] += 1;
                ep.outstanding.fetch_add(1, Ordering::AcqRel);
                inflight.insert(
                    wr_id,
                    Posted {
                        piece,
                        ep: ep.clone(),
                        qp,
                    },
                );
            }
            for (qp, wrs) in batches.iter().enumerate() {
                if wrs.is_empty() {
                    continue;
                }
                if let Err(err) = state.qps[qp].post_send(wrs) {
                    for wr in &wrs[err.posted.min(wrs.len())..] {
                        if let Some(posted) = inflight.remove(&wr.wr_id) {
                            state.depth[qp] = state.depth[qp].saturating_sub(1);
                            ep.outstanding.fetch_sub(1, Ordering::AcqRel);
                            ctx.release_cqes(1);
                            rejected.push((posted.piece, err.error.clone()));
                        }
                    }
                }
            }
        }
        let queued = !waiting.is_empty();
        if queued {
            lock(&ctx.cq_waiting).extend(waiting.into_iter().map(|piece| (ep.clone(), piece)));
            if self.closed.load(Ordering::Acquire) {
                // `shut_down` may have emptied the queue before these arrived.
                let left: Vec<_> = lock(&ctx.cq_waiting).drain(..).collect();
                for (_, piece) in left {
                    self.finish(piece, Err(Error::closed("the RDMA transport")));
                }
            }
        }
        for (piece, e) in broken {
            self.finish(piece, Err(e));
        }
        if !rejected.is_empty() {
            self.retire(ctx, ep);
        }
        for (piece, e) in rejected {
            self.retry(piece, e, Charge::None);
        }
        queued
    }
}
