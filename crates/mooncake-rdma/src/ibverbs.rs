//! The verbs interface on real devices, through libibverbs (rdma-core).
//!
//! Built on `ibverbs-sys`, the raw bindings under the `ibverbs` crate: the safe crate ties
//! every object to its parent by lifetime and has no one-sided READ/WRITE, while the
//! transport holds objects as `Arc<dyn ...>` and posts RDMA READ and WRITE. Each wrapper here
//! owns one verbs object and keeps its parent alive (`Arc`), so objects are destroyed child
//! first. libibverbs is thread-safe, which is what the `Send`/`Sync` impls rely on.
//!
//! Gaps: completions are polled (the CQ `wait` sleeps for the time it is given instead of
//! arming a completion channel; the transport's poller shortens the sleeps while requests
//! are outstanding); the async event fd is put in non-blocking mode and `poll(2)`ed.

use std::ffi::{c_void, CStr};
use std::os::fd::RawFd;
use std::ptr;
use std::sync::Arc;
use std::time::Duration;

use ibverbs_sys as ffi;
use mooncake_common::{Error, ErrorKind, Result};

use crate::verbs::{
    Access, AsyncEvent, Completion, CompletionQueue, Device, GidEntry, GidType, MemoryRegion,
    PortAttr, PortState, PostError, ProtectionDomain, Provider, QpCap, QpTransition, QueuePair,
    WcStatus, WorkRequest, WrOp,
};

fn os_error(kind: ErrorKind, what: &str) -> Error {
    let io = std::io::Error::last_os_error();
    Error::new(kind, format!("{what}: {io}")).with_source(io)
}

fn errno_error(kind: ErrorKind, what: &str, errno: i32) -> Error {
    let io = std::io::Error::from_raw_os_error(errno);
    Error::new(kind, format!("{what}: {io}")).with_source(io)
}

/// Opens devices through libibverbs.
#[derive(Debug, Default, Clone, Copy)]
pub struct IbvProvider;

impl IbvProvider {
    /// The provider.
    pub fn new() -> Self {
        Self
    }
}

/// Runs `f` over the device list, freeing it afterwards.
fn with_devices<T>(f: impl FnOnce(&[*mut ffi::ibv_device]) -> T) -> Result<T> {
    let mut n: i32 = 0;
    // SAFETY: FFI call with a valid out-pointer; the result is checked for null.
    let list = unsafe { ffi::ibv_get_device_list(&mut n) };
    if list.is_null() {
        return Err(os_error(ErrorKind::DeviceNotFound, "ibv_get_device_list"));
    }
    // SAFETY: libibverbs returned `n` valid device pointers at `list`, alive until freed.
    let devices = unsafe { std::slice::from_raw_parts(list, n.max(0) as usize) };
    let out = f(devices);
    // SAFETY: frees the list obtained above; no device pointer from it is used afterwards
    // except through an opened context, which stays valid on its own.
    unsafe { ffi::ibv_free_device_list(list) };
    Ok(out)
}

fn device_name(dev: *mut ffi::ibv_device) -> Option<String> {
    // SAFETY: `dev` comes from a live device list; the name is a NUL-terminated string owned
    // by libibverbs.
    let name = unsafe { ffi::ibv_get_device_name(dev) };
    if name.is_null() {
        return None;
    }
    // SAFETY: non-null, NUL-terminated, valid while the list lives (we copy it out).
    Some(
        unsafe { CStr::from_ptr(name) }
            .to_string_lossy()
            .into_owned(),
    )
}

impl Provider for IbvProvider {
    fn device_names(&self) -> Vec<String> {
        with_devices(|devs| devs.iter().filter_map(|d| device_name(*d)).collect())
            .unwrap_or_default()
    }

    fn open(&self, name: &str) -> Result<Arc<dyn Device>> {
        let ctx = with_devices(|devs| {
            devs.iter()
                .find(|d| device_name(**d).as_deref() == Some(name))
                // SAFETY: opens a device of the live list; the result is checked below.
                .map(|d| unsafe { ffi::ibv_open_device(*d) })
        })?
        .ok_or_else(|| Error::new(ErrorKind::DeviceNotFound, format!("no RDMA device {name}")))?;
        if ctx.is_null() {
            return Err(os_error(
                ErrorKind::Context,
                &format!("ibv_open_device({name})"),
            ));
        }
        // SAFETY: `ctx` is a live context; its async fd is a plain descriptor we may set
        // non-blocking so that event polling never blocks.
        let async_fd = unsafe { (*ctx).async_fd };
        // SAFETY: fcntl on a descriptor owned by the context.
        unsafe {
            let flags = libc::fcntl(async_fd, libc::F_GETFL);
            libc::fcntl(async_fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
        Ok(Arc::new(IbvDevice {
            inner: Arc::new(ContextHandle { ctx, async_fd }),
            name: name.to_owned(),
        }))
    }
}

struct ContextHandle {
    ctx: *mut ffi::ibv_context,
    async_fd: RawFd,
}

// SAFETY: libibverbs contexts may be used from any thread.
unsafe impl Send for ContextHandle {}
// SAFETY: as above; verbs calls on one context are thread-safe.
unsafe impl Sync for ContextHandle {}

impl Drop for ContextHandle {
    fn drop(&mut self) {
        // SAFETY: every child object holds an Arc to this handle, so none is left.
        unsafe { ffi::ibv_close_device(self.ctx) };
    }
}

struct IbvDevice {
    inner: Arc<ContextHandle>,
    name: String,
}

fn mtu_bytes(mtu: u32) -> u32 {
    match mtu {
        1 => 256,
        2 => 512,
        3 => 1024,
        4 => 2048,
        _ => 4096,
    }
}

fn mtu_enum(bytes: u32) -> u32 {
    match bytes {
        0..=256 => 1,
        257..=512 => 2,
        513..=1024 => 3,
        1025..=2048 => 4,
        _ => 5,
    }
}

impl IbvDevice {
    fn port_attr(&self, port: u8) -> Result<ffi::ibv_port_attr> {
        let mut attr = ffi::ibv_port_attr::default();
        // SAFETY: FFI call on a live context with a valid out-pointer of the right type.
        let rc = unsafe {
            ffi::ibv_query_port(
                self.inner.ctx,
                port,
                &mut attr as *mut ffi::ibv_port_attr as *mut _,
            )
        };
        if rc != 0 {
            return Err(errno_error(ErrorKind::Context, "ibv_query_port", rc));
        }
        Ok(attr)
    }
}

impl Device for IbvDevice {
    fn name(&self) -> &str {
        &self.name
    }

    fn query_port(&self, port: u8) -> Result<PortAttr> {
        let attr = self.port_attr(port)?;
        let state = match attr.state {
            ffi::ibv_port_state::IBV_PORT_ACTIVE => PortState::Active,
            ffi::ibv_port_state::IBV_PORT_ARMED => PortState::Armed,
            ffi::ibv_port_state::IBV_PORT_INIT => PortState::Init,
            _ => PortState::Down,
        };
        Ok(PortAttr {
            state,
            lid: attr.lid,
            active_mtu: mtu_bytes(attr.active_mtu),
        })
    }

    fn gid_table(&self, port: u8) -> Result<Vec<GidEntry>> {
        // `ibv_query_gid_table` returns the entries of every port, so the buffer must hold
        // the tables of all of them.
        let mut dev = ffi::ibv_device_attr::default();
        // SAFETY: FFI call on a live context with a valid out-pointer of the right type.
        let rc = unsafe { ffi::ibv_query_device(self.inner.ctx, &mut dev) };
        if rc != 0 {
            return Err(errno_error(ErrorKind::Context, "ibv_query_device", rc));
        }
        let mut entries = 0usize;
        for p in 1..=dev.phys_port_cnt.max(port) {
            entries += self.port_attr(p)?.gid_tbl_len.max(0) as usize;
        }
        let mut table = vec![ffi::ibv_gid_entry::default(); entries];
        // SAFETY: the buffer holds `table.len()` entries of the size we pass.
        let n = unsafe {
            ffi::_ibv_query_gid_table(
                self.inner.ctx,
                table.as_mut_ptr(),
                table.len(),
                0,
                std::mem::size_of::<ffi::ibv_gid_entry>(),
            )
        };
        if n < 0 {
            return Err(errno_error(
                ErrorKind::Context,
                "ibv_query_gid_table",
                -n as i32,
            ));
        }
        table.truncate(n as usize);
        Ok(table
            .into_iter()
            .filter(|e| e.port_num == u32::from(port))
            .map(|e| {
                // SAFETY: every variant of the GID union is 16 plain bytes.
                let gid = unsafe { e.gid.raw };
                let kind = match e.gid_type {
                    0 => GidType::Ib,
                    1 => GidType::RoceV1,
                    _ => GidType::RoceV2,
                };
                GidEntry {
                    index: e.gid_index,
                    gid,
                    kind,
                    netdev: netdev_name(e.ndev_ifindex),
                }
            })
            .collect())
    }

    fn alloc_pd(&self) -> Result<Arc<dyn ProtectionDomain>> {
        // SAFETY: FFI call on a live context; checked for null.
        let pd = unsafe { ffi::ibv_alloc_pd(self.inner.ctx) };
        if pd.is_null() {
            return Err(os_error(ErrorKind::Context, "ibv_alloc_pd"));
        }
        Ok(Arc::new(IbvPd {
            inner: Arc::new(PdHandle {
                pd,
                _ctx: self.inner.clone(),
            }),
        }))
    }

    fn create_cq(&self, cqe: usize) -> Result<Arc<dyn CompletionQueue>> {
        let cqe = i32::try_from(cqe).unwrap_or(i32::MAX);
        // SAFETY: FFI call on a live context, no channel, vector 0; checked for null.
        let cq =
            unsafe { ffi::ibv_create_cq(self.inner.ctx, cqe, ptr::null_mut(), ptr::null_mut(), 0) };
        if cq.is_null() {
            return Err(os_error(ErrorKind::Context, "ibv_create_cq"));
        }
        Ok(Arc::new(IbvCq {
            inner: Arc::new(CqHandle {
                cq,
                _ctx: self.inner.clone(),
            }),
        }))
    }

    fn next_event(&self, timeout: Duration) -> Option<AsyncEvent> {
        let mut pfd = libc::pollfd {
            fd: self.inner.async_fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: polls one valid pollfd.
        if unsafe { libc::poll(&mut pfd, 1, ms) } <= 0 {
            return None;
        }
        let mut event = ffi::ibv_async_event::default();
        // SAFETY: the fd is non-blocking; the call fills `event` or fails.
        if unsafe { ffi::ibv_get_async_event(self.inner.ctx, &mut event) } != 0 {
            return None;
        }
        // SAFETY: the union member read matches the event type, per ibv_get_async_event(3).
        let out = unsafe {
            match event.event_type {
                ffi::IBV_EVENT_PORT_ACTIVE => {
                    Some(AsyncEvent::PortActive(event.element.port_num as u8))
                }
                ffi::IBV_EVENT_PORT_ERR => {
                    Some(AsyncEvent::PortError(event.element.port_num as u8))
                }
                ffi::IBV_EVENT_GID_CHANGE => {
                    Some(AsyncEvent::GidChange(event.element.port_num as u8))
                }
                ffi::IBV_EVENT_LID_CHANGE => {
                    Some(AsyncEvent::LidChange(event.element.port_num as u8))
                }
                ffi::IBV_EVENT_DEVICE_FATAL => Some(AsyncEvent::DeviceFatal),
                ffi::IBV_EVENT_CQ_ERR => Some(AsyncEvent::CqError),
                ffi::IBV_EVENT_WQ_FATAL => Some(AsyncEvent::WqFatal),
                ffi::IBV_EVENT_QP_FATAL
                | ffi::IBV_EVENT_QP_REQ_ERR
                | ffi::IBV_EVENT_QP_ACCESS_ERR => {
                    let qp = event.element.qp;
                    (!qp.is_null()).then(|| AsyncEvent::QpFatal((*qp).qp_num))
                }
                _ => None,
            }
        };
        // SAFETY: acknowledges the event just obtained, as libibverbs requires.
        unsafe { ffi::ibv_ack_async_event(&mut event) };
        out
    }
}

fn netdev_name(ifindex: u32) -> Option<String> {
    if ifindex == 0 {
        return None;
    }
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: the buffer has IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name into `buf`.
    Some(
        unsafe { CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned(),
    )
}

struct PdHandle {
    pd: *mut ffi::ibv_pd,
    _ctx: Arc<ContextHandle>,
}

// SAFETY: protection domains may be used from any thread.
unsafe impl Send for PdHandle {}
// SAFETY: as above.
unsafe impl Sync for PdHandle {}

impl Drop for PdHandle {
    fn drop(&mut self) {
        // SAFETY: MRs and QPs hold an Arc to this handle, so none is left.
        unsafe { ffi::ibv_dealloc_pd(self.pd) };
    }
}

struct IbvPd {
    inner: Arc<PdHandle>,
}

impl ProtectionDomain for IbvPd {
    unsafe fn register(
        &self,
        addr: usize,
        len: usize,
        access: Access,
    ) -> Result<Arc<dyn MemoryRegion>> {
        let mut flags = 0u32;
        if access.contains(Access::LOCAL_WRITE) {
            flags |= ffi::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0;
        }
        if access.contains(Access::REMOTE_WRITE) {
            flags |= ffi::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0;
        }
        if access.contains(Access::REMOTE_READ) {
            flags |= ffi::ibv_access_flags::IBV_ACCESS_REMOTE_READ.0;
        }
        // SAFETY: the caller guarantees the range stays valid until the MR is dropped.
        let mr = unsafe { ffi::ibv_reg_mr(self.inner.pd, addr as *mut c_void, len, flags as i32) };
        if mr.is_null() {
            return Err(os_error(ErrorKind::Context, "ibv_reg_mr"));
        }
        Ok(Arc::new(IbvMr {
            mr,
            _pd: self.inner.clone(),
        }))
    }

    fn create_qp(&self, cq: &Arc<dyn CompletionQueue>, cap: QpCap) -> Result<Arc<dyn QueuePair>> {
        let cq = cq
            .as_any()
            .downcast_ref::<IbvCq>()
            .ok_or_else(|| Error::invalid("an ibverbs QP needs an ibverbs CQ"))?
            .inner
            .clone();
        let mut attr = ffi::ibv_qp_init_attr {
            qp_context: ptr::null_mut(),
            send_cq: cq.cq,
            recv_cq: cq.cq,
            srq: ptr::null_mut(),
            cap: ffi::ibv_qp_cap {
                max_send_wr: cap.max_send_wr,
                max_recv_wr: cap.max_recv_wr,
                max_send_sge: cap.max_sge,
                max_recv_sge: cap.max_sge,
                max_inline_data: cap.max_inline,
            },
            qp_type: ffi::ibv_qp_type::IBV_QPT_RC,
            sq_sig_all: 0,
        };
        // SAFETY: FFI call with a live PD and a filled init attr; checked for null.
        let qp = unsafe { ffi::ibv_create_qp(self.inner.pd, &mut attr) };
        if qp.is_null() {
            return Err(os_error(ErrorKind::Endpoint, "ibv_create_qp"));
        }
        Ok(Arc::new(IbvQp {
            qp,
            _pd: self.inner.clone(),
            _cq: cq,
        }))
    }
}

struct IbvMr {
    mr: *mut ffi::ibv_mr,
    _pd: Arc<PdHandle>,
}

// SAFETY: an MR is immutable after registration; keys may be read from any thread.
unsafe impl Send for IbvMr {}
// SAFETY: as above.
unsafe impl Sync for IbvMr {}

impl MemoryRegion for IbvMr {
    fn lkey(&self) -> u32 {
        // SAFETY: `mr` is live until drop.
        unsafe { (*self.mr).lkey }
    }

    fn rkey(&self) -> u32 {
        // SAFETY: `mr` is live until drop.
        unsafe { (*self.mr).rkey }
    }
}

impl Drop for IbvMr {
    fn drop(&mut self) {
        // SAFETY: deregisters the MR created in `register`, once.
        let rc = unsafe { ffi::ibv_dereg_mr(self.mr) };
        if rc != 0 {
            tracing::warn!(
                "ibv_dereg_mr failed: {}",
                std::io::Error::from_raw_os_error(rc)
            );
        }
    }
}

struct CqHandle {
    cq: *mut ffi::ibv_cq,
    _ctx: Arc<ContextHandle>,
}

// SAFETY: CQs may be polled from any thread (we poll from one at a time).
unsafe impl Send for CqHandle {}
// SAFETY: as above.
unsafe impl Sync for CqHandle {}

impl Drop for CqHandle {
    fn drop(&mut self) {
        // SAFETY: QPs hold an Arc to this handle, so none uses the CQ any more.
        unsafe { ffi::ibv_destroy_cq(self.cq) };
    }
}

struct IbvCq {
    inner: Arc<CqHandle>,
}

fn wc_status(status: u32) -> WcStatus {
    use ffi::ibv_wc_status as s;
    match status {
        s::IBV_WC_SUCCESS => WcStatus::Success,
        s::IBV_WC_LOC_LEN_ERR => WcStatus::LocalLenErr,
        s::IBV_WC_LOC_QP_OP_ERR => WcStatus::LocalQpOpErr,
        s::IBV_WC_LOC_PROT_ERR => WcStatus::LocalProtErr,
        s::IBV_WC_LOC_ACCESS_ERR => WcStatus::LocalAccessErr,
        s::IBV_WC_MW_BIND_ERR => WcStatus::MwBindErr,
        s::IBV_WC_WR_FLUSH_ERR => WcStatus::FlushErr,
        s::IBV_WC_REM_ACCESS_ERR => WcStatus::RemoteAccessErr,
        s::IBV_WC_REM_INV_REQ_ERR => WcStatus::RemoteInvReqErr,
        s::IBV_WC_REM_OP_ERR => WcStatus::RemoteOpErr,
        s::IBV_WC_RETRY_EXC_ERR => WcStatus::RetryExcErr,
        s::IBV_WC_RNR_RETRY_EXC_ERR => WcStatus::RnrRetryExcErr,
        _ => WcStatus::GeneralErr,
    }
}

impl CompletionQueue for IbvCq {
    fn poll(&self, max: usize) -> Vec<Completion> {
        let max = max.clamp(1, 256);
        // SAFETY: `ibv_wc` is plain old data (integers and a bitflag newtype); all-zero is a
        // valid value and the array is overwritten by the provider.
        let mut wcs: Vec<ffi::ibv_wc> = vec![unsafe { std::mem::zeroed() }; max];
        let cq = self.inner.cq;
        // SAFETY: `cq` is live; `ops.poll_cq` is the provider's implementation of the inline
        // `ibv_poll_cq`, given room for `max` completions.
        let n = unsafe {
            let ctx = (*cq).context;
            match (*ctx).ops.poll_cq {
                Some(poll_cq) => poll_cq(cq, max as i32, wcs.as_mut_ptr()),
                None => -1,
            }
        };
        if n <= 0 {
            return Vec::new();
        }
        wcs.truncate(n as usize);
        wcs.iter()
            .map(|wc| Completion {
                wr_id: wc.wr_id(),
                status: match wc.error() {
                    None => WcStatus::Success,
                    Some((status, _vendor)) => wc_status(status),
                },
                bytes: wc.len() as u32,
            })
            .collect()
    }

    fn wait(&self, timeout: Duration) {
        std::thread::sleep(timeout);
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

struct IbvQp {
    qp: *mut ffi::ibv_qp,
    _pd: Arc<PdHandle>,
    _cq: Arc<CqHandle>,
}

// SAFETY: posting and modifying a QP from several threads is allowed by libibverbs; the
// transport serializes posts per endpoint anyway.
unsafe impl Send for IbvQp {}
// SAFETY: as above.
unsafe impl Sync for IbvQp {}

impl Drop for IbvQp {
    fn drop(&mut self) {
        // SAFETY: destroys the QP created in `create_qp`, once; the CQ and PD outlive it.
        unsafe { ffi::ibv_destroy_qp(self.qp) };
    }
}

impl IbvQp {
    fn modify_with(&self, attr: &mut ffi::ibv_qp_attr, mask: ffi::ibv_qp_attr_mask) -> Result<()> {
        // SAFETY: FFI call on a live QP with a filled attribute struct.
        let rc = unsafe { ffi::ibv_modify_qp(self.qp, attr, mask.0 as i32) };
        if rc != 0 {
            return Err(errno_error(ErrorKind::Endpoint, "ibv_modify_qp", rc));
        }
        Ok(())
    }
}

impl QueuePair for IbvQp {
    fn qp_num(&self) -> u32 {
        // SAFETY: `qp` is live until drop.
        unsafe { (*self.qp).qp_num }
    }

    fn modify(&self, to: QpTransition) -> Result<()> {
        use ffi::ibv_qp_attr_mask as m;
        match to {
            QpTransition::Init { port, pkey_index } => {
                let access = ffi::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE
                    | ffi::ibv_access_flags::IBV_ACCESS_REMOTE_READ
                    | ffi::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE
                    | ffi::ibv_access_flags::IBV_ACCESS_REMOTE_ATOMIC;
                let mut attr = ffi::ibv_qp_attr {
                    qp_state: ffi::ibv_qp_state::IBV_QPS_INIT,
                    pkey_index,
                    port_num: port,
                    qp_access_flags: access.0,
                    ..Default::default()
                };
                self.modify_with(
                    &mut attr,
                    m::IBV_QP_STATE
                        | m::IBV_QP_PKEY_INDEX
                        | m::IBV_QP_PORT
                        | m::IBV_QP_ACCESS_FLAGS,
                )
            }
            QpTransition::Rtr(rtr) => {
                let mut attr = ffi::ibv_qp_attr {
                    qp_state: ffi::ibv_qp_state::IBV_QPS_RTR,
                    path_mtu: mtu_enum(rtr.mtu) as _,
                    dest_qp_num: rtr.dest_qp_num,
                    rq_psn: 0,
                    max_dest_rd_atomic: 16,
                    min_rnr_timer: 12,
                    ah_attr: ffi::ibv_ah_attr {
                        dlid: rtr.dest_lid,
                        sl: 0,
                        src_path_bits: 0,
                        port_num: rtr.port,
                        is_global: 1,
                        ..Default::default()
                    },
                    ..Default::default()
                };
                attr.ah_attr.grh.dgid.raw = rtr.dest_gid;
                attr.ah_attr.grh.sgid_index = rtr.sgid_index as u8;
                attr.ah_attr.grh.hop_limit = 16;
                self.modify_with(
                    &mut attr,
                    m::IBV_QP_STATE
                        | m::IBV_QP_AV
                        | m::IBV_QP_PATH_MTU
                        | m::IBV_QP_DEST_QPN
                        | m::IBV_QP_RQ_PSN
                        | m::IBV_QP_MAX_DEST_RD_ATOMIC
                        | m::IBV_QP_MIN_RNR_TIMER,
                )
            }
            QpTransition::Rts => {
                let mut attr = ffi::ibv_qp_attr {
                    qp_state: ffi::ibv_qp_state::IBV_QPS_RTS,
                    timeout: 14,
                    retry_cnt: 7,
                    rnr_retry: 7,
                    sq_psn: 0,
                    max_rd_atomic: 16,
                    ..Default::default()
                };
                self.modify_with(
                    &mut attr,
                    m::IBV_QP_STATE
                        | m::IBV_QP_TIMEOUT
                        | m::IBV_QP_RETRY_CNT
                        | m::IBV_QP_RNR_RETRY
                        | m::IBV_QP_SQ_PSN
                        | m::IBV_QP_MAX_QP_RD_ATOMIC,
                )
            }
            QpTransition::Err => {
                let mut attr = ffi::ibv_qp_attr {
                    qp_state: ffi::ibv_qp_state::IBV_QPS_ERR,
                    ..Default::default()
                };
                self.modify_with(&mut attr, m::IBV_QP_STATE)
            }
        }
    }

    fn post_send(&self, wrs: &[WorkRequest]) -> Result<(), PostError> {
        if wrs.is_empty() {
            return Ok(());
        }
        let mut sges: Vec<ffi::ibv_sge> = wrs
            .iter()
            .map(|wr| ffi::ibv_sge {
                addr: wr.local_addr,
                length: wr.len,
                lkey: wr.lkey,
            })
            .collect();
        // One raw pointer for all entries: re-borrowing the vector per entry would
        // invalidate the pointers handed out before.
        let sge_base = sges.as_mut_ptr();
        let mut chain: Vec<ffi::ibv_send_wr> = Vec::with_capacity(wrs.len());
        for (i, wr) in wrs.iter().enumerate() {
            let mut w = ffi::ibv_send_wr {
                wr_id: wr.wr_id,
                next: ptr::null_mut(),
                // SAFETY: `i < sges.len()`; `sges` is neither moved nor borrowed again
                // until the post returns.
                sg_list: unsafe { sge_base.add(i) },
                num_sge: 1,
                opcode: match wr.op {
                    WrOp::Read => ffi::ibv_wr_opcode::IBV_WR_RDMA_READ,
                    WrOp::Write => ffi::ibv_wr_opcode::IBV_WR_RDMA_WRITE,
                },
                send_flags: ffi::ibv_send_flags::IBV_SEND_SIGNALED.0,
                wr: Default::default(),
                qp_type: Default::default(),
                __bindgen_anon_1: Default::default(),
                __bindgen_anon_2: Default::default(),
            };
            w.wr.rdma.remote_addr = wr.remote_addr;
            w.wr.rdma.rkey = wr.rkey;
            chain.push(w);
        }
        let base = chain.as_mut_ptr();
        for i in 1..chain.len() {
            // SAFETY: `i - 1` and `i` are in bounds of `chain`, which is not moved again.
            unsafe { (*base.add(i - 1)).next = base.add(i) };
        }
        let mut bad: *mut ffi::ibv_send_wr = ptr::null_mut();
        // SAFETY: `ops.post_send` implements the inline `ibv_post_send`; the chain and its
        // scatter entries live until the call returns (the device copies them).
        let rc = unsafe {
            let ctx = (*self.qp).context;
            match (*ctx).ops.post_send {
                Some(post_send) => post_send(self.qp, base, &mut bad),
                None => libc::ENOSYS,
            }
        };
        if rc == 0 {
            return Ok(());
        }
        let posted = if bad.is_null() {
            0
        } else {
            // SAFETY: `bad` points into `chain`, as ibv_post_send(3) specifies.
            (unsafe { bad.offset_from(base) }).clamp(0, wrs.len() as isize) as usize
        };
        Err(PostError {
            posted,
            error: errno_error(ErrorKind::Endpoint, "ibv_post_send", rc),
        })
    }
}
