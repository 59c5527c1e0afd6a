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

mod queues;

use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, RwLock, Weak};
use std::time::Duration;

use mooncake_common::{Error, ErrorKind, Result};

use self::queues::*;
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
