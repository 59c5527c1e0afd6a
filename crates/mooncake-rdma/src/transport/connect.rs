//! Endpoints: finding one for a peer path, connecting it through the handshake, and
//! accepting a peer's connection.

use super::*;

/// Releases a connect claim if its task ends without reaching an outcome.
pub(super) struct ConnectGuard {
    pub(super) inner: Arc<Inner>,
    pub(super) ctx: Arc<Context>,
    pub(super) ep: Arc<Endpoint>,
    pub(super) armed: bool,
}

impl ConnectGuard {
    fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for ConnectGuard {
    fn drop(&mut self) {
        if self.armed {
            tracing::warn!(from = %self.ep.local_path, to = %self.ep.peer_path, "RDMA connect task ended without an outcome");
            let e = Error::new(ErrorKind::Endpoint, "the connect task ended early");
            self.inner
                .connect_failed(&self.ctx, &self.ep, e, Charge::None);
        }
    }
}

impl Inner {
    pub(super) fn endpoint(
        self: &Arc<Self>,
        ctx: &Arc<Context>,
        peer_path: &str,
    ) -> Result<Arc<Endpoint>> {
        let mut store = lock(&ctx.endpoints);
        if let Some(ep) = store.get(peer_path) {
            return Ok(ep);
        }
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::closed("the RDMA transport"));
        }
        let ep = Endpoint::new(
            ctx.local_path.clone(),
            peer_path.to_owned(),
            ctx.pd.clone(),
            ctx.cq.clone(),
            self.config.num_qp_per_ep,
            self.config.max_wr,
            self.config.ib_port,
        )?;
        let evicted = store.insert(peer_path, ep.clone());
        drop(store);
        if let Some((_, old)) = evicted {
            tracing::debug!(device = %ctx.name, peer = %old.peer_path, "endpoint evicted");
            self.retire(ctx, &old);
        }
        Ok(ep)
    }

    pub(super) fn spawn_connect(
        self: &Arc<Self>,
        ctx: Arc<Context>,
        ep: Arc<Endpoint>,
        peer: Arc<RdmaPeer>,
    ) {
        let cancel = self.cancel.clone();
        // Settles the pending pieces however the task ends: a panic, or a runtime that
        // drops it unfinished, still releases the connect claim.
        let guard = ConnectGuard {
            inner: self.clone(),
            ctx,
            ep,
            armed: true,
        };
        self.tasks.spawn_on(
            async move {
                let mut guard = guard;
                let (inner, ctx, ep) = (guard.inner.clone(), guard.ctx.clone(), guard.ep.clone());
                let outcome = tokio::select! {
                    r = inner.connect(&ctx, &ep, &peer) => r,
                    _ = cancel.cancelled() => Err((Error::closed("the RDMA transport"), Charge::None)),
                };
                guard.disarm();
                match outcome {
                    Ok(()) => match ep.mark_connected() {
                        Ok(pieces) => inner.post(&ctx, &ep, pieces),
                        Err(pieces) => {
                            for piece in pieces {
                                let e = Error::new(ErrorKind::Endpoint, "endpoint retired");
                                inner.retry(piece, e, Charge::None);
                            }
                        }
                    },
                    Err((e, charge)) => inner.connect_failed(&ctx, &ep, e, charge),
                }
            },
            &self.runtime,
        );
    }

    pub(super) fn connect_failed(
        self: &Arc<Self>,
        ctx: &Arc<Context>,
        ep: &Arc<Endpoint>,
        e: Error,
        charge: Charge,
    ) {
        if charge != Charge::None {
            tracing::warn!(from = %ep.local_path, to = %ep.peer_path, "RDMA connect failed: {e}");
        }
        let (pieces, retire) = ep.active_failed();
        if retire {
            self.retire(ctx, ep);
        }
        for piece in pieces {
            self.retry(piece, e.clone(), charge);
        }
    }

    /// The active handshake. A failure says how to charge the rail: nothing when the
    /// transport closes or the endpoint was retired, `Transient` when this side failed
    /// (building or moving its own QPs), `Remote` when the peer rejected or never answered.
    pub(super) async fn connect(
        &self,
        ctx: &Context,
        ep: &Endpoint,
        peer: &RdmaPeer,
    ) -> Result<(), (Error, Charge)> {
        let local = |e: Error| (e, Charge::Transient);
        let remote = |e: Error| (e, Charge::Remote);
        let retired = || {
            (
                Error::new(ErrorKind::Endpoint, "endpoint retired"),
                Charge::None,
            )
        };
        let link = ctx.link();
        let request = match ep.begin_active(&link).map_err(local)? {
            ActiveStart::Connected => return Ok(()),
            ActiveStart::Retired => return Err(retired()),
            ActiveStart::WaitForAck => return self.wait_connected(ep).await,
            ActiveStart::Send(request) => request,
        };
        if ep.peer_path == ep.local_path {
            return ep.connect_loopback(&link).map_err(local);
        }
        let remote_device = ep.peer_path.rsplit_once('@').map(|(_, d)| d).unwrap_or("");
        let fallback_gid = peer.device(remote_device).and_then(|d| parse_gid(&d.gid));
        let reply = self
            .connector
            .connect(&peer.rpc_addr, request)
            .await
            .map_err(|e| match e.kind() {
                ErrorKind::Closed => (e, Charge::None),
                _ => (e, Charge::Remote),
            })?;
        if let Err(e) = ep.complete_active(&reply, &link, fallback_gid) {
            if matches!(
                ep.state(),
                EndpointState::Destroying | EndpointState::Destroyed
            ) {
                return Err((e, Charge::None));
            }
            return Err(remote(e));
        }
        if reply.ready_ack.is_some() {
            let ack = self
                .connector
                .connect(&peer.rpc_addr, ep.ready_ack(&link))
                .await
                .map_err(remote)?;
            if !ack.reply_msg.is_empty() {
                return Err(remote(Error::new(
                    ErrorKind::RejectHandshake,
                    format!("{} rejected the ready-ack: {}", ep.peer_path, ack.reply_msg),
                )));
            }
        }
        Ok(())
    }

    pub(super) async fn wait_connected(&self, ep: &Endpoint) -> Result<(), (Error, Charge)> {
        let deadline = Instant::now() + self.config.ready_ack_timeout;
        loop {
            match ep.state() {
                EndpointState::Connected => return Ok(()),
                EndpointState::Destroying | EndpointState::Destroyed => {
                    return Err((
                        Error::new(ErrorKind::Endpoint, "endpoint retired"),
                        Charge::None,
                    ));
                }
                _ if Instant::now() >= deadline => {
                    return Err((
                        Error::new(
                            ErrorKind::Endpoint,
                            format!("{} never sent its ready-ack", ep.peer_path),
                        ),
                        Charge::Remote,
                    ));
                }
                _ => tokio::time::sleep(Duration::from_millis(2)).await,
            }
        }
    }

    pub(super) fn accept(
        self: &Arc<Self>,
        request: &ConnectionMessage,
    ) -> Result<(LinkInfo, Vec<u32>)> {
        let reject = |msg: String| Error::new(ErrorKind::RejectHandshake, msg);
        if self.closed.load(Ordering::Acquire) {
            return Err(reject("the RDMA transport is closed".to_owned()));
        }
        let (server, device) = request
            .peer_nic_path
            .rsplit_once('@')
            .ok_or_else(|| reject(format!("bad peer_nic_path '{}'", request.peer_nic_path)))?;
        if server != self.server_name {
            return Err(reject(format!(
                "peer_nic_path names server '{server}', this is '{}'",
                self.server_name
            )));
        }
        let ctx = self
            .context(device)
            .cloned()
            .ok_or_else(|| reject(format!("no device {device} here")))?;
        if !ctx.usable() {
            return Err(reject(format!("device {device} is down")));
        }
        if !request.local_nic_path.contains('@') {
            return Err(reject(format!(
                "bad local_nic_path '{}'",
                request.local_nic_path
            )));
        }
        if request.qp_num.len() != self.config.num_qp_per_ep {
            return Err(reject(format!(
                "QP count mismatch: {} requested, {} here; check MC_NUM_QP_PER_EP",
                request.qp_num.len(),
                self.config.num_qp_per_ep
            )));
        }
        let link = ctx.link();
        if request.ready_ack == Some(true) {
            let ep = lock(&ctx.endpoints)
                .peek(&request.local_nic_path)
                .cloned()
                .ok_or_else(|| {
                    reject(format!("ready-ack for unknown {}", request.local_nic_path))
                })?;
            ep.on_ready_ack(request)?;
            return Ok((link, ep.qp_nums()));
        }
        let peer_gid = parse_gid(&request.local_gid)
            .ok_or_else(|| reject(format!("bad local_gid '{}'", request.local_gid)))?;
        for _ in 0..3 {
            let ep = self.endpoint(&ctx, &request.local_nic_path)?;
            match ep.accept(request, &link, peer_gid) {
                Ok(qp_num) => return Ok((link, qp_num)),
                Err(AcceptError::Retired) => {
                    self.retire(&ctx, &ep);
                }
                Err(AcceptError::PeerRestarted) => {
                    tracing::info!(peer = %request.local_nic_path, "peer restarted: endpoint rebuilt");
                    self.retire(&ctx, &ep);
                }
                Err(AcceptError::Failed(e)) => return Err(e),
            }
        }
        Err(reject(format!(
            "endpoint for {} keeps being retired",
            request.local_nic_path
        )))
    }
}
