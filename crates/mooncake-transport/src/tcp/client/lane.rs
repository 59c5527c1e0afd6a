//! A lane: one persistent connection to a peer's rail, carrying one request at a time by
//! performing its exchange ([`ClientExchange`]) on the socket.

use super::*;
use crate::tcp::exchange::{ClientExchange, ClientStep, StatusVerdict};
use crate::tcp::wire::{Op, Status, STATUS_LEN};
use mooncake_common::service::opening;

pub(super) struct Lane {
    pub(super) peer: Arc<PeerRails>,
    pub(super) rail: usize,
    pub(super) index: usize,
    pub(super) normal: async_channel::Receiver<Job>,
    pub(super) urgent: async_channel::Receiver<Job>,
    pub(super) config: TcpClientConfig,
    pub(super) stop: CancellationToken,
    pub(super) conn: Option<TcpStream>,
}

/// Why a slice did not make it, and whose fault that was.
pub(super) enum Outcome {
    Done,
    /// The peer refused or the request ran out of time: the path is fine, the slice fails.
    Refused(Error),
    /// The path failed: charge the rail and try another.
    PathFailed(Error, Failure),
    /// The rail went down before the slice started: try another, charge nothing.
    Moved(Error),
}

impl Lane {
    pub(super) async fn run(mut self) {
        loop {
            let next = tokio::select! {
                biased;
                _ = self.stop.cancelled() => break,
                next = self.urgent.recv() => next,
                next = self.normal.recv() => next,
            };
            let Ok(job) = next else { break };
            let outcome = self.carry(&job.slice).await;
            self.settle(job, outcome);
        }
        for queue in [&self.urgent, &self.normal] {
            queue.close();
            while let Ok(job) = queue.try_recv() {
                job.slice
                    .task
                    .slice_failed(Error::closed("the TCP transport"));
            }
        }
    }

    /// Reports a slice, or hands it to another rail.
    pub(super) fn settle(&self, mut job: Job, outcome: Outcome) {
        let len = job.slice.len as u64;
        let rails = &self.peer.rails;
        let error = match outcome {
            Outcome::Done => {
                rails.done(self.rail, len);
                if job.attempts > 0 {
                    rails.rescued(self.rail);
                }
                // Let go of the memory before reporting: whoever awaits the task may
                // unregister it the moment it settles.
                let task = job.slice.task.clone();
                drop(job);
                return task.slice_done(len as usize);
            }
            Outcome::Refused(e) => {
                rails.release(self.rail, len);
                e
            }
            Outcome::PathFailed(e, how) => {
                rails.failed(self.rail, len, how);
                if job.attempts < rails.policy().retry_budget && !self.stop.is_cancelled() {
                    job.attempts += 1;
                    tracing::debug!(path = %self.path(), lane = self.index, slice = ?job.slice, attempt = job.attempts, "retrying on another rail: {e}");
                    return self.peer.send(job);
                }
                e
            }
            Outcome::Moved(e) => {
                rails.release(self.rail, len);
                if !self.stop.is_cancelled() {
                    return self.peer.send(job);
                }
                e
            }
        };
        tracing::debug!(path = %self.path(), lane = self.index, slice = ?job.slice, "slice failed: {error}");
        let task = job.slice.task.clone();
        drop(job);
        task.slice_failed(error);
    }

    pub(super) fn path(&self) -> &PeerAddr {
        &self.peer.lanes[self.rail].path.remote
    }

    pub(super) async fn carry(&mut self, slice: &Slice) -> Outcome {
        if slice.task.has_failed() {
            return Outcome::Refused(Error::new(
                ErrorKind::TransferFailed,
                "skipped: an earlier slice of the same request failed",
            ));
        }
        if !self.peer.rails.is_usable(self.rail) {
            return Outcome::Moved(Error::new(
                ErrorKind::NoRail,
                format!("the rail to {} is down", self.path()),
            ));
        }
        let now = Instant::now();
        if slice.deadline.is_some_and(|d| d <= now) {
            return Outcome::Refused(timeout_error(slice));
        }
        let stall_limit = now + self.config.io_timeout;
        let limit = slice.deadline.map_or(stall_limit, |d| d.min(stall_limit));
        let stop = self.stop.clone();
        let link = self.peer.lanes[self.rail].link.clone();
        let cut = link.as_ref().map(|link| link.cut_token());
        let link_down = async {
            match &cut {
                Some(cut) => cut.cancelled().await,
                None => std::future::pending().await,
            }
        };
        let outcome = tokio::select! {
            _ = stop.cancelled() => Outcome::Refused(Error::closed("the TCP transport")),
            _ = link_down => Outcome::PathFailed(
                Error::new(ErrorKind::Socket, format!("the link to {} went down", self.path())),
                Failure::Fatal,
            ),
            outcome = tokio::time::timeout_at(limit, self.exchange(slice)) => match outcome {
                Ok(Ok(())) => Outcome::Done,
                Ok(Err(e)) if e.kind() == ErrorKind::Socket => Outcome::PathFailed(e, Failure::Transient),
                Ok(Err(e)) => Outcome::Refused(e),
                Err(_) if slice.deadline.is_some_and(|d| d <= Instant::now()) => Outcome::Refused(timeout_error(slice)),
                Err(_) => Outcome::PathFailed(
                    Error::new(
                        ErrorKind::Socket,
                        format!("{}: no progress for {:?}", self.path(), self.config.io_timeout),
                    ),
                    Failure::Transient,
                ),
            },
        };
        if !matches!(outcome, Outcome::Done) {
            // The exchange may have stopped mid-payload; this connection is out of step.
            self.conn = None;
        }
        outcome
    }

    /// Performs the steps of one request ([`ClientExchange`]) on this lane's connection.
    pub(super) async fn exchange(&mut self, slice: &Slice) -> Result<()> {
        let version = self.path().version;
        let peer = self.path().to_string();
        let op = match slice.op {
            Opcode::Read => Op::Read,
            Opcode::Write => Op::Write,
        };
        let plan = ClientExchange::new(op, version, slice.remote_addr, slice.len as u64)
            .map_err(|e| Error::invalid(e.to_string()))?;
        let conn = self.connection().await?;
        let io = |e: std::io::Error| Error::socket(format!("data exchange with {peer}"), e);
        let judge = |frame: Option<Status>| match ClientExchange::on_status(frame) {
            StatusVerdict::Continue => Ok(()),
            StatusVerdict::Rejected => Err(Error::new(
                ErrorKind::AddressNotRegistered,
                format!(
                    "{peer} rejected {} bytes at {:#x}: not inside one registered buffer",
                    slice.len, slice.remote_addr
                ),
            )),
            StatusVerdict::Broken => Err(bad_status(&peer, frame)),
        };
        let mut steps = plan.steps().iter().peekable();
        while let Some(step) = steps.next() {
            match step {
                ClientStep::SendHeader(header) => {
                    conn.write_all(&header.encode()).await.map_err(io)?;
                }
                ClientStep::SendPayload => {
                    // SAFETY: the engine checked the range lies in `slice.region`, which the
                    // slice keeps registered and mapped.
                    let payload = unsafe { slice.region.bytes(slice.local_addr, slice.len) };
                    if steps.next_if_eq(&&ClientStep::ReadStatus).is_none() {
                        conn.write_all(payload).await.map_err(io)?;
                        continue;
                    }
                    // The status is read while the body is still going out, so an early
                    // reject ends the write instead of surfacing as a broken pipe.
                    let (mut rx, mut tx) = conn.split();
                    let status = read_status(&mut rx);
                    let send = tx.write_all(payload);
                    tokio::pin!(send, status);
                    tokio::select! {
                        sent = &mut send => match sent {
                            Ok(()) => judge(status.await.map_err(io)?)?,
                            Err(e) => match tokio::time::timeout(Duration::from_millis(200), status).await {
                                Ok(Ok(frame @ Some(Status::AddressRejected))) => judge(frame)?,
                                _ => return Err(io(e)),
                            },
                        },
                        early = &mut status => match early.map_err(io)? {
                            Some(Status::Ok) => return Err(bad_status(&peer, Some(Status::Ok))),
                            frame => judge(frame)?,
                        },
                    }
                }
                ClientStep::ReadStatus => judge(read_status(conn).await.map_err(io)?)?,
                ClientStep::ReadPayload => {
                    // SAFETY: the range lies in `slice.region` (checked by the engine) and the
                    // transfer rule keeps everyone else off it until the slice settles.
                    let target = unsafe { slice.region.bytes_mut(slice.local_addr, slice.len) };
                    conn.read_exact(target).await.map_err(io)?;
                }
                ClientStep::ReadFence => {
                    let mut echo = [0u8; 1];
                    conn.read_exact(&mut echo).await.map_err(io)?;
                }
            }
        }
        Ok(())
    }

    pub(super) async fn connection(&mut self) -> Result<&mut TcpStream> {
        if self.conn.is_none() {
            let rail = &self.peer.lanes[self.rail];
            let down_until = *rail.down_until.lock().unwrap_or_else(|p| p.into_inner());
            if down_until.is_some_and(|until| Instant::now() < until) {
                return Err(Error::new(
                    ErrorKind::Socket,
                    format!(
                        "{} is unreachable (a connect failed moments ago)",
                        rail.path.remote
                    ),
                ));
            }
            let connected = tokio::time::timeout(self.config.connect_timeout, connect(&rail.path));
            let mut stream = match connected.await {
                Ok(Ok(stream)) => stream,
                failed => {
                    *rail.down_until.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(Instant::now() + RECONNECT_COOLDOWN);
                    let target = &rail.path.remote;
                    return Err(match failed {
                        Ok(Err(e)) => Error::socket(format!("connect to {target}"), e),
                        _ => {
                            Error::new(ErrorKind::Socket, format!("connect to {target} timed out"))
                        }
                    });
                }
            };
            *rail.down_until.lock().unwrap_or_else(|p| p.into_inner()) = None;
            if let Some(token) = &self.config.token {
                let target = &rail.path.remote;
                let opened = tokio::time::timeout(
                    self.config.connect_timeout,
                    opening::open(&mut stream, token),
                );
                opened
                    .await
                    .map_err(|_| {
                        Error::new(
                            ErrorKind::Unauthenticated,
                            format!(
                                "{target} did not answer the cluster token's challenge in time"
                            ),
                        )
                    })?
                    .map_err(|e| {
                        Error::new(
                            ErrorKind::Unauthenticated,
                            format!("{target}: {}", e.message()),
                        )
                    })?;
            }
            self.conn = Some(stream);
        }
        Ok(self.conn.as_mut().expect("connected above"))
    }
}

/// Connects over a path, from its local interface's address when it has one.
pub(super) async fn connect(path: &TcpPath) -> std::io::Result<TcpStream> {
    let target = path.remote.to_string();
    let stream = match &path.local {
        None => TcpStream::connect(&target).await?,
        Some(nic) => {
            let remote = tokio::net::lookup_host(&target)
                .await?
                .find(|addr| addr.is_ipv4() == nic.ip.is_ipv4())
                .ok_or_else(|| {
                    std::io::Error::new(
                        std::io::ErrorKind::AddrNotAvailable,
                        format!("{target} has no address of the family of {}", nic.ip),
                    )
                })?;
            let socket = match nic.ip {
                IpAddr::V4(_) => TcpSocket::new_v4()?,
                IpAddr::V6(_) => TcpSocket::new_v6()?,
            };
            socket.bind(SocketAddr::new(nic.ip, 0))?;
            socket.connect(remote).await?
        }
    };
    stream.set_nodelay(true)?;
    socket2::SockRef::from(&stream).set_tcp_user_timeout(Some(USER_TIMEOUT))?;
    Ok(stream)
}

pub(super) async fn read_status<R: AsyncReadExt + Unpin>(
    reader: &mut R,
) -> std::io::Result<Option<Status>> {
    let mut frame = [0u8; STATUS_LEN];
    reader.read_exact(&mut frame).await?;
    Ok(Status::decode(&frame))
}

pub(super) fn bad_status(peer: &str, status: Option<Status>) -> Error {
    Error::new(
        ErrorKind::Protocol,
        format!("{peer} answered an unexpected status {status:?}"),
    )
}

pub(super) fn timeout_error(slice: &Slice) -> Error {
    Error::new(
        ErrorKind::Timeout,
        format!(
            "{} bytes at {:#x} missed the request deadline",
            slice.len, slice.remote_addr
        ),
    )
}
