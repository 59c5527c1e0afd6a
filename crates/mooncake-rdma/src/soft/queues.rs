//! The objects a device hands out (protection domains, memory regions, completion queues,
//! queue pairs) and the per-device worker that executes posted requests.

use super::*;

pub(super) struct SoftPd {
    pub(super) id: u64,
    pub(super) device: Arc<DeviceState>,
    pub(super) fabric: Arc<Fabric>,
}

impl ProtectionDomain for SoftPd {
    unsafe fn register(
        &self,
        addr: usize,
        len: usize,
        access: Access,
    ) -> Result<Arc<dyn MemoryRegion>> {
        if len == 0 || addr.checked_add(len).is_none() {
            return Err(Error::invalid("cannot register an empty or wrapping range"));
        }
        let key = self.fabric.next_key.fetch_add(1, Ordering::Relaxed) + 0x100;
        self.fabric
            .mrs
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                key,
                MrEntry {
                    device: self.device.name.clone(),
                    pd: self.id,
                    addr,
                    len,
                    access,
                },
            );
        Ok(Arc::new(SoftMr {
            key,
            fabric: Arc::downgrade(&self.fabric),
        }))
    }

    fn create_qp(&self, cq: &Arc<dyn CompletionQueue>, cap: QpCap) -> Result<Arc<dyn QueuePair>> {
        let cq = cq
            .as_any()
            .downcast_ref::<SoftCq>()
            .ok_or_else(|| Error::invalid("a soft QP needs a soft CQ"))?
            .inner
            .clone();
        let qpn = self.fabric.next_qpn.fetch_add(1, Ordering::Relaxed) + 0x10;
        let inner = Arc::new(QpInner {
            qpn,
            pd: self.id,
            device: self.device.clone(),
            fabric: Arc::downgrade(&self.fabric),
            cq,
            cap,
            state: Mutex::new(QpState::Reset),
            remote: Mutex::new(None),
            faults: Mutex::new(VecDeque::new()),
            outstanding: AtomicU32::new(0),
        });
        lock(&self.fabric.qps).insert(qpn, Arc::downgrade(&inner));
        Ok(Arc::new(SoftQp { inner }))
    }
}

pub(super) struct SoftMr {
    pub(super) key: u32,
    pub(super) fabric: Weak<Fabric>,
}

impl MemoryRegion for SoftMr {
    fn lkey(&self) -> u32 {
        self.key
    }

    fn rkey(&self) -> u32 {
        self.key
    }
}

impl Drop for SoftMr {
    fn drop(&mut self) {
        if let Some(fabric) = self.fabric.upgrade() {
            // Taking the write lock waits out any copy that still uses the range.
            fabric
                .mrs
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&self.key);
        }
    }
}

pub(super) struct CqInner {
    pub(super) capacity: usize,
    pub(super) queue: Mutex<VecDeque<Completion>>,
    pub(super) ready: Condvar,
    /// Requests posted towards this CQ whose completions were not polled yet.
    pub(super) unpolled: AtomicU64,
    pub(super) device: Arc<DeviceState>,
    /// The handle that created the CQ: an overflow is its event.
    pub(super) events: Weak<EventQueue>,
}

impl CqInner {
    fn posted(&self) {
        let n = self.unpolled.fetch_add(1, Ordering::AcqRel) + 1;
        self.device.cq_high_water.fetch_max(n, Ordering::Relaxed);
    }

    fn unposted(&self, count: u64) {
        let _ = self
            .unpolled
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                Some(n.saturating_sub(count))
            });
    }

    fn push(&self, completion: Completion) {
        let mut queue = lock(&self.queue);
        if queue.len() >= self.capacity {
            drop(queue);
            self.unposted(1);
            tracing::warn!(device = %self.device.name, "soft CQ overflow: completion lost");
            if let Some(events) = self.events.upgrade() {
                lock(&events.events).push_back(AsyncEvent::CqError);
                events.ready.notify_all();
            }
            return;
        }
        queue.push_back(completion);
        drop(queue);
        self.ready.notify_all();
    }
}

pub(super) struct SoftCq {
    pub(super) inner: Arc<CqInner>,
}

impl CompletionQueue for SoftCq {
    fn poll(&self, max: usize) -> Vec<Completion> {
        let mut queue = lock(&self.inner.queue);
        let n = queue.len().min(max);
        let out: Vec<Completion> = queue.drain(..n).collect();
        drop(queue);
        self.inner.unposted(out.len() as u64);
        out
    }

    fn wait(&self, timeout: Duration) {
        let queue = lock(&self.inner.queue);
        if queue.is_empty() {
            let _ = self.inner.ready.wait_timeout(queue, timeout);
        }
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum QpState {
    Reset,
    Init,
    Rtr,
    Rts,
    Err,
}

pub(super) struct QpInner {
    pub(super) qpn: u32,
    pub(super) pd: u64,
    pub(super) device: Arc<DeviceState>,
    pub(super) fabric: Weak<Fabric>,
    pub(super) cq: Arc<CqInner>,
    pub(super) cap: QpCap,
    pub(super) state: Mutex<QpState>,
    pub(super) remote: Mutex<Option<(u32, [u8; 16])>>,
    pub(super) faults: Mutex<VecDeque<WcStatus>>,
    pub(super) outstanding: AtomicU32,
}

impl Drop for QpInner {
    fn drop(&mut self) {
        if let Some(fabric) = self.fabric.upgrade() {
            let mut qps = lock(&fabric.qps);
            if qps.get(&self.qpn).is_some_and(|w| w.strong_count() == 0) {
                qps.remove(&self.qpn);
            }
        }
    }
}

pub(super) struct SoftQp {
    pub(super) inner: Arc<QpInner>,
}

pub(super) struct Job {
    pub(super) qp: Arc<QpInner>,
    pub(super) wr: WorkRequest,
}

impl QueuePair for SoftQp {
    fn qp_num(&self) -> u32 {
        self.inner.qpn
    }

    fn modify(&self, to: QpTransition) -> Result<()> {
        let qp = &self.inner;
        let mut state = lock(&qp.state);
        let bad = |what: &str| {
            Err(Error::new(
                ErrorKind::Endpoint,
                format!("soft QP {}: {what} from {:?}", qp.qpn, *state),
            ))
        };
        match to {
            QpTransition::Init { port, .. } => {
                if *state != QpState::Reset {
                    return bad("INIT");
                }
                if port != 1 {
                    return bad("INIT on a port other than 1");
                }
                *state = QpState::Init;
            }
            QpTransition::Rtr(attr) => {
                if *state != QpState::Init {
                    return bad("RTR");
                }
                if qp.device.refuse.load(Ordering::Acquire) {
                    return bad("RTR on a device that refuses connections");
                }
                let fabric = qp
                    .fabric
                    .upgrade()
                    .ok_or_else(|| Error::closed("the soft fabric"))?;
                let target = lock(&fabric.devices)
                    .values()
                    .find(|d| d.has_gid(&attr.dest_gid))
                    .cloned();
                match target {
                    None => return bad("RTR towards an unknown GID"),
                    Some(d) if d.refuse.load(Ordering::Acquire) => {
                        return bad("RTR towards a device that refuses connections")
                    }
                    Some(_) => {}
                }
                *lock(&qp.remote) = Some((attr.dest_qp_num, attr.dest_gid));
                *state = QpState::Rtr;
            }
            QpTransition::Rts => {
                if *state != QpState::Rtr {
                    return bad("RTS");
                }
                *state = QpState::Rts;
            }
            QpTransition::Err => *state = QpState::Err,
        }
        Ok(())
    }

    fn post_send(&self, wrs: &[WorkRequest]) -> Result<(), PostError> {
        let qp = &self.inner;
        let state = *lock(&qp.state);
        if !matches!(state, QpState::Rts | QpState::Err) {
            return Err(PostError {
                posted: 0,
                error: Error::new(
                    ErrorKind::Endpoint,
                    format!("soft QP {}: post in {state:?}", qp.qpn),
                ),
            });
        }
        let sender = {
            let mut worker = lock(&qp.device.worker);
            worker
                .get_or_insert_with(|| spawn_worker(&qp.device.name, qp.fabric.clone()))
                .clone()
        };
        for (i, wr) in wrs.iter().enumerate() {
            let depth = qp.outstanding.fetch_add(1, Ordering::AcqRel);
            if depth >= qp.cap.max_send_wr {
                qp.outstanding.fetch_sub(1, Ordering::AcqRel);
                return Err(PostError {
                    posted: i,
                    error: Error::new(ErrorKind::Endpoint, "send queue full"),
                });
            }
            let job = Job {
                qp: qp.clone(),
                wr: *wr,
            };
            qp.cq.posted();
            if sender.send(job).is_err() {
                qp.cq.unposted(1);
                qp.outstanding.fetch_sub(1, Ordering::AcqRel);
                return Err(PostError {
                    posted: i,
                    error: Error::closed("the soft device worker"),
                });
            }
        }
        Ok(())
    }
}

pub(super) fn spawn_worker(device: &str, fabric: Weak<Fabric>) -> mpsc::Sender<Job> {
    let (tx, rx) = mpsc::channel::<Job>();
    let name = format!("soft-{device}");
    let spawned = std::thread::Builder::new().name(name).spawn(move || {
        // Ends when the device state (holder of the sender) is dropped with its fabric.
        while let Ok(job) = rx.recv() {
            execute(&fabric, job);
        }
    });
    if let Err(e) = spawned {
        tracing::error!("cannot start a soft device worker: {e}");
    }
    tx
}

pub(super) fn execute(fabric: &Weak<Fabric>, job: Job) {
    let Job { qp, wr } = job;
    {
        let mut stalled = lock(&qp.device.stalled);
        while *stalled {
            stalled = qp
                .device
                .unstalled
                .wait(stalled)
                .unwrap_or_else(|p| p.into_inner());
        }
    }
    let latency = qp.device.latency_us.load(Ordering::Acquire);
    if latency > 0 {
        std::thread::sleep(Duration::from_micros(latency));
    }
    let status = match fabric.upgrade() {
        Some(fabric) => run(&fabric, &qp, &wr),
        None => WcStatus::FlushErr,
    };
    if status == WcStatus::Success {
        qp.device.completed.fetch_add(1, Ordering::Relaxed);
        qp.device
            .bytes
            .fetch_add(u64::from(wr.len), Ordering::Relaxed);
    } else {
        qp.device.failed.fetch_add(1, Ordering::Relaxed);
        if status != WcStatus::FlushErr {
            *lock(&qp.state) = QpState::Err;
        }
    }
    qp.outstanding.fetch_sub(1, Ordering::AcqRel);
    qp.cq.push(Completion {
        wr_id: wr.wr_id,
        status,
        bytes: if status == WcStatus::Success {
            wr.len
        } else {
            0
        },
    });
}

pub(super) fn run(fabric: &Fabric, qp: &QpInner, wr: &WorkRequest) -> WcStatus {
    if *lock(&qp.state) == QpState::Err {
        return WcStatus::FlushErr;
    }
    if let Some(status) = lock(&qp.faults).pop_front() {
        return status;
    }
    if let Some(status) = lock(&qp.device.faults).pop_front() {
        return status;
    }
    if !qp.device.port_up.load(Ordering::Acquire) {
        return WcStatus::RetryExcErr;
    }
    let Some((dest_qpn, dest_gid)) = *lock(&qp.remote) else {
        return WcStatus::LocalQpOpErr;
    };
    let Some(peer) = lock(&fabric.qps).get(&dest_qpn).and_then(Weak::upgrade) else {
        return WcStatus::RetryExcErr;
    };
    let peer_ok = peer.device.has_gid(&dest_gid)
        && peer.device.port_up.load(Ordering::Acquire)
        && matches!(*lock(&peer.state), QpState::Rtr | QpState::Rts)
        && lock(&peer.remote).is_some_and(|(n, _)| n == qp.qpn);
    if !peer_ok {
        return WcStatus::RetryExcErr;
    }
    let (Ok(len), Ok(local_addr), Ok(remote_addr)) = (
        usize::try_from(wr.len),
        usize::try_from(wr.local_addr),
        usize::try_from(wr.remote_addr),
    ) else {
        return WcStatus::LocalLenErr;
    };
    let mrs = fabric.mrs.read().unwrap_or_else(|p| p.into_inner());
    let local_need = match wr.op {
        WrOp::Read => Access::LOCAL_WRITE,
        WrOp::Write => Access::default(),
    };
    let local_ok = mrs.get(&wr.lkey).is_some_and(|mr| {
        mr.device == qp.device.name
            && mr.pd == qp.pd
            && covers(mr, local_addr, len)
            && mr.access.contains(local_need)
    });
    if !local_ok {
        return WcStatus::LocalProtErr;
    }
    let remote_need = match wr.op {
        WrOp::Read => Access::REMOTE_READ,
        WrOp::Write => Access::REMOTE_WRITE,
    };
    let remote_ok = mrs.get(&wr.rkey).is_some_and(|mr| {
        mr.device == peer.device.name
            && mr.pd == peer.pd
            && covers(mr, remote_addr, len)
            && mr.access.contains(remote_need)
    });
    if !remote_ok {
        return WcStatus::RemoteAccessErr;
    }
    let (src, dst) = match wr.op {
        WrOp::Read => (remote_addr, local_addr),
        WrOp::Write => (local_addr, remote_addr),
    };
    // SAFETY: both ranges were just checked to lie inside live registrations, whose owners
    // promised (`ProtectionDomain::register`) they stay valid until the registration drops;
    // a registration is removed only under the write lock, and we hold the read lock for the
    // whole copy. `copy` tolerates overlap (a loopback QP may copy within one buffer).
    unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, len) };
    drop(mrs);
    WcStatus::Success
}

pub(super) fn covers(mr: &MrEntry, addr: usize, len: usize) -> bool {
    addr >= mr.addr
        && addr
            .checked_add(len)
            .is_some_and(|end| end <= mr.addr + mr.len)
}
