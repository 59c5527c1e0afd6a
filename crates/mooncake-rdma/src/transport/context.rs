//! A device context: its protection domain, CQ budget, endpoints and link, and the thread
//! that polls its completions and events.

use super::*;

pub(crate) struct Context {
    pub(super) index: usize,
    pub(super) name: String,
    pub(super) local_path: String,
    pub(super) device: Arc<dyn Device>,
    pub(super) pd: Arc<dyn ProtectionDomain>,
    pub(super) cq: Arc<dyn CompletionQueue>,
    pub(super) link: Mutex<LinkInfo>,
    pub(super) port_up: AtomicBool,
    pub(super) active: AtomicBool,
    pub(super) local_failures: AtomicU32,
    pub(super) endpoints: Mutex<EndpointStore<Arc<Endpoint>>>,
    pub(super) retiring: Mutex<Vec<Arc<Endpoint>>>,
    /// Requests posted on the CQ and not yet completed (or written off).
    pub(super) cq_outstanding: AtomicUsize,
    pub(super) max_cqe: usize,
    /// Pieces that found the CQ full, with the endpoint they were meant for.
    pub(super) cq_waiting: Mutex<VecDeque<(Arc<Endpoint>, Piece)>>,
}

impl Context {
    pub(super) fn usable(&self) -> bool {
        self.port_up.load(Ordering::Acquire) && self.active.load(Ordering::Acquire)
    }

    /// Claims one CQ entry, if the CQ has room.
    pub(super) fn reserve_cqe(&self) -> bool {
        self.cq_outstanding
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_cqe).then_some(n + 1)
            })
            .is_ok()
    }

    pub(super) fn release_cqes(&self, count: usize) {
        if count > 0 {
            let _ = self
                .cq_outstanding
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    Some(n.saturating_sub(count))
                });
        }
    }

    pub(super) fn link(&self) -> LinkInfo {
        lock(&self.link).clone()
    }
}

pub(super) fn open_context(
    provider: &dyn Provider,
    name: &str,
    index: usize,
    server_name: &str,
    config: &RdmaConfig,
) -> Result<Context> {
    let device = provider.open(name)?;
    let port = device.query_port(config.ib_port)?;
    if port.state != PortState::Active {
        return Err(Error::new(
            ErrorKind::Context,
            format!("{name} port {} is {:?}", config.ib_port, port.state),
        ));
    }
    let gids = device.gid_table(config.ib_port)?;
    let gid_index = select_gid(&gids, config.gid_index)
        .ok_or_else(|| Error::new(ErrorKind::Context, format!("{name} has no usable GID")))?;
    let gid = gids
        .iter()
        .find(|e| e.index == gid_index)
        .map(|e| e.gid)
        .ok_or_else(|| Error::new(ErrorKind::Context, format!("{name} lost its GID")))?;
    let pd = device.alloc_pd()?;
    let cq = device.create_cq(config.max_cqe)?;
    tracing::info!(device = %name, gid = %gid_to_string(&gid), gid_index, "RDMA context up");
    Ok(Context {
        index,
        name: name.to_owned(),
        local_path: format!("{server_name}@{name}"),
        device,
        pd,
        cq,
        link: Mutex::new(LinkInfo {
            gid,
            gid_index,
            lid: port.lid,
            port: config.ib_port,
            mtu: port.active_mtu.min(config.mtu),
        }),
        port_up: AtomicBool::new(true),
        active: AtomicBool::new(true),
        local_failures: AtomicU32::new(0),
        endpoints: Mutex::new(EndpointStore::new(config.store_kind, config.max_ep_per_ctx)),
        retiring: Mutex::new(Vec::new()),
        cq_outstanding: AtomicUsize::new(0),
        max_cqe: config.max_cqe,
        cq_waiting: Mutex::new(VecDeque::new()),
    })
}

pub(super) fn poll_loop(inner: Weak<Inner>, ctx: Arc<Context>) {
    const TICK: Duration = Duration::from_millis(100);
    // While requests are outstanding or were recently, the CQ is polled closely; after
    // `PARK_AFTER` without any, the waits grow to `MAX_WAIT` so an idle context costs
    // hundreds of wakeups a second rather than tens of thousands.
    const PARK_AFTER: Duration = Duration::from_millis(100);
    const BUSY_WAIT: Duration = Duration::from_micros(50);
    const MAX_WAIT: Duration = Duration::from_millis(5);
    let mut last_tick = Instant::now();
    let mut last_busy = Instant::now();
    let mut wait = BUSY_WAIT;
    loop {
        let Some(transport) = inner.upgrade() else {
            return;
        };
        if transport.stop.load(Ordering::Acquire) {
            return;
        }
        let completions = ctx.cq.poll(64);
        let idle = completions.is_empty();
        for wc in completions {
            transport.on_completion(&ctx, wc);
        }
        if !idle {
            transport.drain_cq_waiting(&ctx);
        }
        while let Some(event) = ctx.device.next_event(Duration::ZERO) {
            transport.on_event(&ctx, event);
        }
        if last_tick.elapsed() >= TICK {
            last_tick = Instant::now();
            transport.tick(&ctx);
        }
        drop(transport);
        if !idle || ctx.cq_outstanding.load(Ordering::Acquire) > 0 {
            last_busy = Instant::now();
            wait = BUSY_WAIT;
        }
        if idle {
            if last_busy.elapsed() >= PARK_AFTER {
                wait = (wait * 2).min(MAX_WAIT);
            }
            ctx.cq.wait(wait);
        }
    }
}
