//! An in-process software verbs provider.
//!
//! A [`SoftFabric`] is a set of named devices, each with a GID. Transports (engines) in the
//! same process open devices from the same fabric and connect RC queue pairs through the
//! normal handshake; a READ or WRITE is then a `memcpy` between two registrations, checked the
//! way a NIC checks them (key, bounds, access rights, QP state). Every device runs one worker
//! thread that executes posted requests in order and puts completions on the CQ, so requests
//! are really in flight between the post and the completion.
//!
//! Fault injection: fail the next completions of a device or QP with a chosen status, put a
//! port down or up (with async events), force a QP into ERR, refuse connections, slow a
//! device down or stall it, raise any async event. An error completion moves its QP to ERR,
//! as on hardware, so requests behind it flush. A CQ holds as many completions as it was
//! created for; one more is lost and raises `CqError`, as an overflow does on hardware.

use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, RwLock, Weak};
use std::time::Duration;

use mooncake_common::{Error, ErrorKind, Result};

use crate::verbs::{
    Access, AsyncEvent, Completion, CompletionQueue, Device, GidEntry, GidType, MemoryRegion,
    PortAttr, PortState, PostError, ProtectionDomain, Provider, QpCap, QpTransition, QueuePair,
    WcStatus, WorkRequest, WrOp,
};

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A process-local fabric of software devices.
#[derive(Clone, Default)]
pub struct SoftFabric {
    inner: Arc<Fabric>,
}

/// Counters of one software device, as initiator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SoftDeviceStats {
    /// Work requests that completed successfully.
    pub completed: u64,
    /// Work requests that completed with an error (flushes included).
    pub failed: u64,
    /// Bytes moved by successful requests.
    pub bytes: u64,
    /// Most requests posted and not yet polled at once on one CQ of the device.
    pub cq_high_water: u64,
}

#[derive(Default)]
struct Fabric {
    devices: Mutex<HashMap<String, Arc<DeviceState>>>,
    qps: Mutex<HashMap<u32, Weak<QpInner>>>,
    mrs: RwLock<HashMap<u32, MrEntry>>,
    next_qpn: AtomicU32,
    next_key: AtomicU32,
    next_pd: AtomicU64,
}

struct MrEntry {
    device: String,
    pd: u64,
    addr: usize,
    len: usize,
    access: Access,
}

struct DeviceState {
    name: String,
    gids: Vec<GidEntry>,
    lid: u16,
    port_up: AtomicBool,
    refuse: AtomicBool,
    broken: AtomicBool,
    latency_us: AtomicU64,
    stalled: Mutex<bool>,
    unstalled: Condvar,
    faults: Mutex<VecDeque<WcStatus>>,
    listeners: Mutex<Vec<Weak<EventQueue>>>,
    worker: Mutex<Option<mpsc::Sender<Job>>>,
    completed: AtomicU64,
    failed: AtomicU64,
    bytes: AtomicU64,
    cq_high_water: AtomicU64,
}

impl DeviceState {
    fn has_gid(&self, gid: &[u8; 16]) -> bool {
        self.gids.iter().any(|e| &e.gid == gid)
    }

    fn raise(&self, event: AsyncEvent) {
        let mut listeners = lock(&self.listeners);
        listeners.retain(|l| l.strong_count() > 0);
        for queue in listeners.iter().filter_map(Weak::upgrade) {
            lock(&queue.events).push_back(event);
            queue.ready.notify_all();
        }
    }
}

#[derive(Default)]
struct EventQueue {
    events: Mutex<VecDeque<AsyncEvent>>,
    ready: Condvar,
}

impl SoftFabric {
    /// An empty fabric.
    pub fn new() -> Self {
        Self::default()
    }

    /// The process-wide fabric.
    pub fn global() -> Self {
        static GLOBAL: std::sync::OnceLock<SoftFabric> = std::sync::OnceLock::new();
        GLOBAL.get_or_init(SoftFabric::new).clone()
    }

    /// Adds a device with one RoCE v2 GID at index 0.
    pub fn add_device(&self, name: &str, gid: [u8; 16]) -> Result<()> {
        self.add_device_with_gids(
            name,
            vec![GidEntry {
                index: 0,
                gid,
                kind: GidType::RoceV2,
                netdev: None,
            }],
        )
    }

    /// Adds a device with the given GID table.
    pub fn add_device_with_gids(&self, name: &str, gids: Vec<GidEntry>) -> Result<()> {
        let mut devices = lock(&self.inner.devices);
        if devices.contains_key(name) {
            return Err(Error::invalid(format!("soft device {name} already exists")));
        }
        devices.insert(
            name.to_owned(),
            Arc::new(DeviceState {
                name: name.to_owned(),
                gids,
                lid: 0,
                port_up: AtomicBool::new(true),
                refuse: AtomicBool::new(false),
                broken: AtomicBool::new(false),
                latency_us: AtomicU64::new(0),
                stalled: Mutex::new(false),
                unstalled: Condvar::new(),
                faults: Mutex::new(VecDeque::new()),
                listeners: Mutex::new(Vec::new()),
                worker: Mutex::new(None),
                completed: AtomicU64::new(0),
                failed: AtomicU64::new(0),
                bytes: AtomicU64::new(0),
                cq_high_water: AtomicU64::new(0),
            }),
        );
        Ok(())
    }

    fn device(&self, name: &str) -> Result<Arc<DeviceState>> {
        lock(&self.inner.devices)
            .get(name)
            .cloned()
            .ok_or_else(|| Error::new(ErrorKind::DeviceNotFound, format!("no soft device {name}")))
    }

    /// Fails the next `count` requests that `device` executes with `status`.
    pub fn fail_next(&self, device: &str, count: usize, status: WcStatus) -> Result<()> {
        let dev = self.device(device)?;
        lock(&dev.faults).extend(std::iter::repeat_n(status, count));
        Ok(())
    }

    /// Fails the next `count` requests of QP `qp_num` with `status`.
    pub fn fail_next_on_qp(&self, qp_num: u32, count: usize, status: WcStatus) -> Result<()> {
        let qp = self.qp(qp_num)?;
        lock(&qp.faults).extend(std::iter::repeat_n(status, count));
        Ok(())
    }

    /// Puts port 1 of `device` down or up and raises `PortError` or `PortActive`.
    pub fn set_port(&self, device: &str, up: bool) -> Result<()> {
        let dev = self.device(device)?;
        if dev.port_up.swap(up, Ordering::AcqRel) != up {
            dev.raise(if up {
                AsyncEvent::PortActive(1)
            } else {
                AsyncEvent::PortError(1)
            });
        }
        Ok(())
    }

    /// Moves QP `qp_num` to ERR (pending and later requests flush) and raises `QpFatal`.
    pub fn force_qp_error(&self, qp_num: u32) -> Result<()> {
        let qp = self.qp(qp_num)?;
        *lock(&qp.state) = QpState::Err;
        qp.device.raise(AsyncEvent::QpFatal(qp_num));
        Ok(())
    }

    /// Makes `device` refuse (or accept again) connections: RTR towards it or on it fails.
    pub fn refuse_connections(&self, device: &str, refuse: bool) -> Result<()> {
        self.device(device)?.refuse.store(refuse, Ordering::Release);
        Ok(())
    }

    /// Makes opening `device` fail (or succeed again).
    pub fn set_broken(&self, device: &str, broken: bool) -> Result<()> {
        self.device(device)?.broken.store(broken, Ordering::Release);
        Ok(())
    }

    /// Adds `latency` before each request `device` executes.
    pub fn set_latency(&self, device: &str, latency: Duration) -> Result<()> {
        self.device(device)?
            .latency_us
            .store(latency.as_micros() as u64, Ordering::Release);
        Ok(())
    }

    /// Holds every request `device` is given (without running it) until released; a stalled
    /// device completes nothing, not even flushes.
    pub fn stall(&self, device: &str, stalled: bool) -> Result<()> {
        let dev = self.device(device)?;
        *lock(&dev.stalled) = stalled;
        dev.unstalled.notify_all();
        Ok(())
    }

    /// Raises `event` on every open handle of `device`.
    pub fn raise(&self, device: &str, event: AsyncEvent) -> Result<()> {
        self.device(device)?.raise(event);
        Ok(())
    }

    /// Numbers of the live QPs created on `device`.
    pub fn qp_nums(&self, device: &str) -> Vec<u32> {
        // The strong references are dropped after the lock: dropping the last one runs
        // `QpInner::drop`, which takes the same lock.
        let live: Vec<(u32, Arc<QpInner>)> = lock(&self.inner.qps)
            .iter()
            .filter_map(|(n, qp)| qp.upgrade().map(|q| (*n, q)))
            .collect();
        let mut nums: Vec<u32> = live
            .iter()
            .filter(|(_, q)| q.device.name == device)
            .map(|(n, _)| *n)
            .collect();
        drop(live);
        nums.sort_unstable();
        nums
    }

    /// Counters of `device`.
    pub fn stats(&self, device: &str) -> SoftDeviceStats {
        self.device(device)
            .map(|d| SoftDeviceStats {
                completed: d.completed.load(Ordering::Relaxed),
                failed: d.failed.load(Ordering::Relaxed),
                bytes: d.bytes.load(Ordering::Relaxed),
                cq_high_water: d.cq_high_water.load(Ordering::Relaxed),
            })
            .unwrap_or_default()
    }

    fn qp(&self, qp_num: u32) -> Result<Arc<QpInner>> {
        lock(&self.inner.qps)
            .get(&qp_num)
            .and_then(Weak::upgrade)
            .ok_or_else(|| Error::new(ErrorKind::Endpoint, format!("no soft QP {qp_num}")))
    }
}

impl Provider for SoftFabric {
    fn device_names(&self) -> Vec<String> {
        let mut names: Vec<_> = lock(&self.inner.devices).keys().cloned().collect();
        names.sort();
        names
    }

    fn open(&self, name: &str) -> Result<Arc<dyn Device>> {
        let state = self.device(name)?;
        if state.broken.load(Ordering::Acquire) {
            return Err(Error::new(
                ErrorKind::Context,
                format!("soft device {name} failed to open"),
            ));
        }
        let events = Arc::new(EventQueue::default());
        lock(&state.listeners).push(Arc::downgrade(&events));
        Ok(Arc::new(SoftDevice {
            state,
            fabric: self.inner.clone(),
            events,
        }))
    }
}

struct SoftDevice {
    state: Arc<DeviceState>,
    fabric: Arc<Fabric>,
    events: Arc<EventQueue>,
}

impl Device for SoftDevice {
    fn name(&self) -> &str {
        &self.state.name
    }

    fn query_port(&self, port: u8) -> Result<PortAttr> {
        if port != 1 {
            return Err(Error::new(
                ErrorKind::Context,
                format!("soft device {} has no port {port}", self.state.name),
            ));
        }
        Ok(PortAttr {
            state: if self.state.port_up.load(Ordering::Acquire) {
                PortState::Active
            } else {
                PortState::Down
            },
            lid: self.state.lid,
            active_mtu: 4096,
        })
    }

    fn gid_table(&self, _port: u8) -> Result<Vec<GidEntry>> {
        Ok(self.state.gids.clone())
    }

    fn alloc_pd(&self) -> Result<Arc<dyn ProtectionDomain>> {
        Ok(Arc::new(SoftPd {
            id: self.fabric.next_pd.fetch_add(1, Ordering::Relaxed),
            device: self.state.clone(),
            fabric: self.fabric.clone(),
        }))
    }

    fn create_cq(&self, cqe: usize) -> Result<Arc<dyn CompletionQueue>> {
        if cqe == 0 {
            return Err(Error::invalid("a CQ needs at least one entry"));
        }
        Ok(Arc::new(SoftCq {
            inner: Arc::new(CqInner {
                capacity: cqe,
                queue: Mutex::new(VecDeque::with_capacity(cqe.min(4096))),
                ready: Condvar::new(),
                unpolled: AtomicU64::new(0),
                device: self.state.clone(),
                events: Arc::downgrade(&self.events),
            }),
        }))
    }

    fn next_event(&self, timeout: Duration) -> Option<AsyncEvent> {
        let mut events = lock(&self.events.events);
        if events.is_empty() && !timeout.is_zero() {
            events = self
                .events
                .ready
                .wait_timeout(events, timeout)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        events.pop_front()
    }
}

struct SoftPd {
    id: u64,
    device: Arc<DeviceState>,
    fabric: Arc<Fabric>,
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

struct SoftMr {
    key: u32,
    fabric: Weak<Fabric>,
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

struct CqInner {
    capacity: usize,
    queue: Mutex<VecDeque<Completion>>,
    ready: Condvar,
    /// Requests posted towards this CQ whose completions were not polled yet.
    unpolled: AtomicU64,
    device: Arc<DeviceState>,
    /// The handle that created the CQ: an overflow is its event.
    events: Weak<EventQueue>,
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

struct SoftCq {
    inner: Arc<CqInner>,
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
enum QpState {
    Reset,
    Init,
    Rtr,
    Rts,
    Err,
}

struct QpInner {
    qpn: u32,
    pd: u64,
    device: Arc<DeviceState>,
    fabric: Weak<Fabric>,
    cq: Arc<CqInner>,
    cap: QpCap,
    state: Mutex<QpState>,
    remote: Mutex<Option<(u32, [u8; 16])>>,
    faults: Mutex<VecDeque<WcStatus>>,
    outstanding: AtomicU32,
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

struct SoftQp {
    inner: Arc<QpInner>,
}

struct Job {
    qp: Arc<QpInner>,
    wr: WorkRequest,
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

fn spawn_worker(device: &str, fabric: Weak<Fabric>) -> mpsc::Sender<Job> {
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

fn execute(fabric: &Weak<Fabric>, job: Job) {
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

fn run(fabric: &Fabric, qp: &QpInner, wr: &WorkRequest) -> WcStatus {
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

fn covers(mr: &MrEntry, addr: usize, len: usize) -> bool {
    addr >= mr.addr
        && addr
            .checked_add(len)
            .is_some_and(|end| end <= mr.addr + mr.len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listing_qps_while_they_are_dropped_does_not_deadlock() {
        let fabric = SoftFabric::new();
        fabric.add_device("soft0", [1; 16]).unwrap();
        let device = fabric.open("soft0").unwrap();
        let pd = device.alloc_pd().unwrap();
        let cq = device.create_cq(16).unwrap();
        let cap = QpCap {
            max_send_wr: 4,
            max_recv_wr: 4,
            max_sge: 1,
            max_inline: 0,
        };
        let stop = Arc::new(AtomicBool::new(false));
        let lister = {
            let (fabric, stop) = (fabric.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    fabric.qp_nums("soft0");
                }
            })
        };
        let (done_tx, done_rx) = mpsc::channel();
        let churner = std::thread::spawn(move || {
            let until = std::time::Instant::now() + Duration::from_millis(300);
            while std::time::Instant::now() < until {
                let qps: Vec<_> = (0..8).map(|_| pd.create_qp(&cq, cap).unwrap()).collect();
                drop(qps);
            }
            let _ = done_tx.send(());
        });
        let finished = done_rx.recv_timeout(Duration::from_secs(20)).is_ok();
        stop.store(true, Ordering::Release);
        assert!(finished, "creating and dropping QPs deadlocked");
        churner.join().unwrap();
        lister.join().unwrap();
        assert!(fabric.qp_nums("soft0").is_empty());
    }
}
