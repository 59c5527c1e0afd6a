//! Completions, events and endpoint retirement: what a context does when things fail.

use super::*;

impl Inner {
    /// Two-phase destroy, first phase; pieces that never reached a QP are dispatched again.
    pub(super) fn retire(self: &Arc<Self>, ctx: &Arc<Context>, ep: &Arc<Endpoint>) {
        self.retire_with(ctx, ep, false);
    }

    /// Retires `ep`; with `force`, or when a QP cannot reach ERR (nothing would flush), the
    /// QPs are destroyed at once and the requests they held are dispatched again.
    pub(super) fn retire_with(
        self: &Arc<Self>,
        ctx: &Arc<Context>,
        ep: &Arc<Endpoint>,
        force: bool,
    ) {
        {
            let mut store = lock(&ctx.endpoints);
            if store
                .peek(&ep.peer_path)
                .is_some_and(|cur| Arc::ptr_eq(cur, ep))
            {
                store.remove(&ep.peer_path);
            }
        }
        let retired = ep.retire();
        let mut pieces = retired.pieces;
        let mut written_off = Vec::new();
        if force || retired.stuck {
            pieces.extend(ep.destroy_now());
            written_off = self.take_inflight(ctx, ep);
        } else if retired.now {
            lock(&ctx.retiring).push(ep.clone());
        }
        for piece in pieces {
            let e = Error::new(
                ErrorKind::Endpoint,
                format!("endpoint to {} retired", ep.peer_path),
            );
            self.retry(piece, e, Charge::None);
        }
        self.redispatch_written_off(ep, written_off);
    }

    pub(super) fn retire_all(self: &Arc<Self>, ctx: &Arc<Context>, force: bool) {
        let endpoints = lock(&ctx.endpoints).drain();
        for (_, ep) in endpoints {
            self.retire_with(ctx, &ep, force);
        }
        if force {
            let retiring = std::mem::take(&mut *lock(&ctx.retiring));
            for ep in retiring {
                ep.destroy_now();
                let written_off = self.take_inflight(ctx, &ep);
                self.redispatch_written_off(&ep, written_off);
            }
        }
    }

    /// Removes every posted request of `ep` (whose QPs are gone, so they will never
    /// complete) and gives their CQ entries back. Whoever removes an entry owns its piece,
    /// so a completion racing with this still reports the piece once.
    pub(super) fn take_inflight(&self, ctx: &Context, ep: &Arc<Endpoint>) -> Vec<Piece> {
        let mut inflight = lock(&self.inflight);
        let ids: Vec<u64> = inflight
            .iter()
            .filter(|(_, p)| Arc::ptr_eq(&p.ep, ep))
            .map(|(id, _)| *id)
            .collect();
        let pieces: Vec<Piece> = ids
            .iter()
            .filter_map(|id| inflight.remove(id))
            .map(|p| p.piece)
            .collect();
        drop(inflight);
        ctx.release_cqes(pieces.len());
        pieces
    }

    pub(super) fn redispatch_written_off(self: &Arc<Self>, ep: &Endpoint, pieces: Vec<Piece>) {
        if !pieces.is_empty() {
            tracing::warn!(peer = %ep.peer_path, count = pieces.len(), "requests of a destroyed endpoint dispatched again");
        }
        for piece in pieces {
            let e = Error::new(
                ErrorKind::Endpoint,
                format!(
                    "endpoint to {} destroyed with the request outstanding",
                    ep.peer_path
                ),
            );
            self.retry(piece, e, Charge::None);
        }
    }

    /// Destroys everything and only then fails what is left with `ERR_CLOSED`: once a slice
    /// reports, no QP may still reach its memory. Idempotent.
    pub(super) fn shut_down(self: &Arc<Self>) {
        self.closed.store(true, Ordering::Release);
        self.cancel.cancel();
        let mut left: Vec<Piece> = Vec::new();
        for ctx in &self.contexts {
            // Pieces that never reached a QP fail here already, through `dispatch`.
            let endpoints = lock(&ctx.endpoints).drain();
            for (_, ep) in endpoints {
                self.retire(ctx, &ep);
            }
            let retiring = std::mem::take(&mut *lock(&ctx.retiring));
            for ep in retiring {
                left.extend(ep.destroy_now());
                left.extend(self.take_inflight(ctx, &ep));
            }
            left.extend(lock(&ctx.cq_waiting).drain(..).map(|(_, piece)| piece));
        }
        left.extend(lock(&self.inflight).drain().map(|(_, posted)| posted.piece));
        self.registrations
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        for piece in left {
            self.finish(piece, Err(Error::closed("the RDMA transport")));
        }
    }

    /// Posts pieces that waited for room in the CQ, as long as there is room.
    pub(super) fn drain_cq_waiting(self: &Arc<Self>, ctx: &Arc<Context>) {
        loop {
            let room = ctx
                .max_cqe
                .saturating_sub(ctx.cq_outstanding.load(Ordering::Acquire));
            if room == 0 {
                return;
            }
            let batch: Vec<(Arc<Endpoint>, Piece)> = {
                let mut queue = lock(&ctx.cq_waiting);
                let n = room.min(queue.len());
                queue.drain(..n).collect()
            };
            if batch.is_empty() {
                return;
            }
            let mut requeued = false;
            let mut groups: Vec<(Arc<Endpoint>, Vec<Piece>)> = Vec::new();
            for (ep, piece) in batch {
                match groups.last_mut() {
                    Some((last, pieces)) if Arc::ptr_eq(last, &ep) => pieces.push(piece),
                    _ => groups.push((ep, vec![piece])),
                }
            }
            for (ep, pieces) in groups {
                requeued |= self.post_now(ctx, &ep, pieces);
            }
            // Requeued means the CQ filled up again; its completions will drain the rest.
            if requeued {
                return;
            }
        }
    }

    pub(super) fn on_completion(self: &Arc<Self>, ctx: &Arc<Context>, wc: Completion) {
        let Some(Posted { piece, ep, qp }) = lock(&self.inflight).remove(&wc.wr_id) else {
            tracing::debug!(device = %ctx.name, wr_id = wc.wr_id, "completion for an unknown request");
            return;
        };
        ctx.release_cqes(1);
        let backlog: Vec<Piece> = {
            let mut state = ep.lock();
            if let Some(d) = state.depth.get_mut(qp) {
                *d = d.saturating_sub(1);
            }
            ep.outstanding.fetch_sub(1, Ordering::AcqRel);
            if state.state == EndpointState::Connected {
                state.backlog.drain(..).collect()
            } else {
                Vec::new()
            }
        };
        if !backlog.is_empty() {
            self.post(ctx, &ep, backlog);
        }
        if wc.status == WcStatus::Success {
            ctx.local_failures.store(0, Ordering::Relaxed);
            return self.finish(piece, Ok(()));
        }
        let error = Error::new(
            ErrorKind::TransferFailed,
            format!(
                "{} -> {}: work completion {}",
                ctx.name, ep.peer_path, wc.status
            ),
        );
        // Any error leaves the QP in ERR: the endpoint cannot carry more.
        self.retire(ctx, &ep);
        match wc.status {
            WcStatus::FlushErr => self.retry(piece, error, Charge::None),
            status if status.is_local() => {
                let failures = ctx.local_failures.fetch_add(1, Ordering::AcqRel) + 1;
                if failures >= MAX_LOCAL_FAILURES && ctx.active.swap(false, Ordering::AcqRel) {
                    tracing::error!(device = %ctx.name, "too many local faults: context disabled");
                    self.set_device_rails(&ctx.name, false);
                    self.retire_all(ctx, false);
                }
                // Mooncake hands a local fault to another local NIC: any rail of this
                // device would likely fail the same way.
                let mut piece = piece;
                piece.avoid_device = Some(ctx.name.clone());
                self.retry(piece, error, Charge::Transient);
            }
            _ => self.retry(piece, error, Charge::Remote),
        }
    }

    pub(super) fn on_event(self: &Arc<Self>, ctx: &Arc<Context>, event: AsyncEvent) {
        tracing::info!(device = %ctx.name, ?event, "RDMA async event");
        let port = self.config.ib_port;
        match event {
            // A new LID invalidates every connection; the port is brought back by the
            // next PortActive or by the tick once the port reads ACTIVE.
            AsyncEvent::PortError(p) | AsyncEvent::LidChange(p) if p == port => {
                ctx.port_up.store(false, Ordering::Release);
                self.set_device_rails(&ctx.name, false);
                self.retire_all(ctx, false);
            }
            AsyncEvent::PortActive(p) if p == port => self.port_back(ctx),
            // Completions are lost or will never come: nothing drains, so destroy now.
            AsyncEvent::DeviceFatal | AsyncEvent::CqError | AsyncEvent::WqFatal => {
                ctx.active.store(false, Ordering::Release);
                self.set_device_rails(&ctx.name, false);
                self.retire_all(ctx, true);
            }
            AsyncEvent::QpFatal(qpn) => {
                let target = lock(&ctx.endpoints)
                    .entries()
                    .into_iter()
                    .map(|(_, ep)| ep)
                    .find(|ep| ep.qp_nums().contains(&qpn));
                if let Some(ep) = target {
                    self.retire(ctx, &ep);
                }
            }
            AsyncEvent::GidChange(p) if p == port => {
                self.reprobe_gid(ctx);
                self.retire_all(ctx, false);
            }
            _ => {}
        }
    }

    pub(super) fn port_back(&self, ctx: &Context) {
        if let Ok(attr) = ctx.device.query_port(self.config.ib_port) {
            lock(&ctx.link).lid = attr.lid;
        }
        self.reprobe_gid(ctx);
        ctx.port_up.store(true, Ordering::Release);
        if ctx.active.load(Ordering::Acquire) {
            self.set_device_rails(&ctx.name, true);
        }
    }

    pub(super) fn reprobe_gid(&self, ctx: &Context) {
        let table = match ctx.device.gid_table(self.config.ib_port) {
            Ok(table) => table,
            Err(e) => {
                tracing::warn!(device = %ctx.name, "GID re-probe failed: {e}");
                return;
            }
        };
        if let Some(index) = select_gid(&table, self.config.gid_index) {
            if let Some(entry) = table.iter().find(|e| e.index == index) {
                let mut link = lock(&ctx.link);
                link.gid = entry.gid;
                link.gid_index = index;
            }
        }
    }

    pub(super) fn tick(self: &Arc<Self>, ctx: &Arc<Context>) {
        let timeout = self.config.destroy_timeout;
        let mut forced = Vec::new();
        lock(&ctx.retiring).retain(|ep| match ep.try_finish_destroy(timeout) {
            Teardown::Draining => true,
            Teardown::Drained => false,
            Teardown::Forced => {
                forced.push(ep.clone());
                false
            }
        });
        for ep in forced {
            let written_off = self.take_inflight(ctx, &ep);
            self.redispatch_written_off(&ep, written_off);
        }
        let endpoints: Vec<Arc<Endpoint>> = lock(&ctx.endpoints)
            .entries()
            .into_iter()
            .map(|(_, ep)| ep)
            .collect();
        for ep in endpoints
            .iter()
            .filter(|ep| ep.ack_overdue(self.config.ready_ack_timeout))
        {
            tracing::warn!(peer = %ep.peer_path, "no ready-ack in time: endpoint deleted");
            self.retire(ctx, ep);
        }
        let now = TokioInstant::now();
        let mut expired: Vec<Piece> = endpoints
            .iter()
            .flat_map(|ep| ep.take_expired(now))
            .collect();
        {
            let mut waiting = lock(&ctx.cq_waiting);
            if waiting.iter().any(|(_, piece)| piece.expired(now)) {
                let all = std::mem::take(&mut *waiting);
                for (ep, piece) in all {
                    if piece.expired(now) {
                        expired.push(piece);
                    } else {
                        waiting.push_back((ep, piece));
                    }
                }
            }
        }
        for piece in expired {
            let e = deadline_error(&piece);
            self.finish(piece, Err(e));
        }
        self.drain_cq_waiting(ctx);
        if !ctx.port_up.load(Ordering::Acquire)
            && ctx.active.load(Ordering::Acquire)
            && ctx
                .device
                .query_port(self.config.ib_port)
                .is_ok_and(|attr| attr.state == PortState::Active)
        {
            tracing::info!(device = %ctx.name, "port active again");
            self.port_back(ctx);
        }
    }
}
