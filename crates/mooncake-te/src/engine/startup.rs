//! Start-up: discovery, the transports, the listeners and the first publication.

use super::*;
use mooncake_common::service::Limits;
use mooncake_metadata::handshake::server::HandshakeOptions;
use mooncake_transport::shm::ShmServerOptions;
use mooncake_transport::tcp::DataServerOptions;

impl TransferEngine {
    pub(super) async fn start_on(
        config: EngineConfig,
        verbs: Option<Arc<dyn Provider>>,
    ) -> Result<Arc<Self>> {
        config.validate()?;
        let backend = mooncake_metadata::connect(&config.metadata, config.cluster_token.as_ref())?;
        let (discovered, matrix) = discover(&config)?;
        let (host, named_port) = split_host_port(&config.local_server_name)?;
        let advertised = match &config.advertised_host {
            Some(host) => host.clone(),
            None => advertised_host(&host).await?,
        };
        let ip = bind_ip(&advertised);
        let p2p = matches!(backend, MetadataBackend::P2pHandshake);
        let rpc_port = config.rpc_port.or(if p2p { named_port } else { None });
        let mut tcp_rails = config
            .devices
            .as_deref()
            .map(local_rails)
            .unwrap_or_default();
        // Rails arrive on several interfaces, so the data port listens on all of them, in one
        // address family: IPv4 when any rail has it.
        let v4 = tcp_rails.iter().any(|rail| rail.ip.is_ipv4());
        tcp_rails.retain(|rail| rail.ip.is_ipv4() == v4);
        let data_ip = match (tcp_rails.is_empty(), v4) {
            (true, _) => ip.clone(),
            (false, true) => "0.0.0.0".to_owned(),
            (false, false) => "::".to_owned(),
        };
        let rpc_listener = bind(&ip, rpc_port, &config.rpc_port_range).await?;
        let data_listener = bind(&data_ip, config.tcp_data_port, &config.rpc_port_range).await?;
        let rpc_port = rpc_listener
            .local_addr()
            .map_err(|e| Error::socket("handshake listener address", e))?
            .port();
        let data_port = data_listener
            .local_addr()
            .map_err(|e| Error::socket("data listener address", e))?
            .port();
        let name = if p2p {
            join_host_port(&advertised, rpc_port)
        } else {
            config.local_server_name.clone()
        };
        let verbs = verbs.or_else(|| host_verbs(&discovered));
        let rdma = start_rdma(&config, verbs, &name, &matrix)?;
        let registry = Arc::new(MemoryRegistry::default());
        let (shm_server, shm_offer, shm) =
            match shm::host::host_id().filter(|_| config.shared_memory) {
                Some(host) => {
                    let control = Arc::new(ControlTable::new()?);
                    let options = ShmServerOptions {
                        token: config.cluster_token.clone(),
                        ..ShmServerOptions::default()
                    };
                    let server = ShmServer::start_with(control.clone(), registry.clone(), options)?;
                    let target = ShmTarget {
                        host: host.to_owned(),
                        socket: server.name().to_owned(),
                        pid: std::process::id(),
                        probe: control.addr() as u64,
                    };
                    let transport = Arc::new(ShmTransport::new(
                        tokio::runtime::Handle::current(),
                        config.cluster_token.clone(),
                    )?);
                    (Some(server), Some((control, target)), Some(transport))
                }
                None => (None, None, None),
            };
        let local = Arc::new(Local {
            name: name.clone(),
            data_port,
            tcp_rails,
            registry: registry.clone(),
            shm: shm_offer,
            rdma,
            listener: Mutex::new(None),
            queued: Mutex::new(Vec::new()),
            token: config.cluster_token.clone(),
        });
        let handshake = HandshakeServer::start_with(
            rpc_listener,
            local.clone(),
            HandshakeOptions {
                max_frame: config.handshake_max_length,
                limits: Limits::new(
                    config.handshake_max_connections,
                    handshake::server::MAX_PER_PEER,
                ),
                token: config.cluster_token.clone(),
            },
        )?;
        let data = TcpServer::start_with(
            data_listener,
            registry,
            DataServerOptions {
                token: config.cluster_token.clone(),
                ..DataServerOptions::default()
            },
        )?;
        let tcp = Arc::new(TcpClient::new(
            TcpClientConfig {
                lanes_per_peer: config.tcp_lanes_per_peer,
                connect_timeout: config.connect_timeout,
                io_timeout: config.io_timeout,
                rails: RailPolicy {
                    retry_budget: config.retry_budget,
                    ..RailPolicy::default()
                },
                token: config.cluster_token.clone(),
            },
            tokio::runtime::Handle::current(),
        ));
        let keys = Keys::new(config.cluster_id.as_deref());
        let publisher = match &backend {
            MetadataBackend::Store(store) => Some(Arc::new(Publisher {
                store: store.clone(),
                keys: keys.clone(),
                dirty: Notify::new(),
            })),
            MetadataBackend::P2pHandshake => None,
        };
        let mut transports: Vec<Arc<dyn Transport>> = vec![Arc::new(InProcess {
            local: local.clone(),
            runtime: tokio::runtime::Handle::current(),
        })];
        if let Some(shm) = &shm {
            transports.push(Arc::new(SharedMemory(shm.clone())));
        }
        if let Some(rdma) = &local.rdma {
            transports.push(Arc::new(Rdma(rdma.clone())));
        }
        transports.push(Arc::new(Tcp(tcp.clone())));
        let router = Router::new(config.protocol, transports);
        let engine = Arc::new(Self {
            resolver: Resolver {
                backend,
                keys,
                connect_timeout: config.connect_timeout,
                max_frame: config.handshake_max_length,
                token: config.cluster_token.clone(),
            },
            config,
            local,
            handshake,
            data,
            tcp,
            shm_server,
            shm,
            router,
            discovered,
            matrix,
            stats: TransportStats::default(),
            segments: Mutex::new(SegmentTable::default()),
            batches: Mutex::new(HandleSlab::default()),
            publisher,
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
            runtime: tokio::runtime::Handle::current(),
            closed: AtomicBool::new(false),
        });
        if let Some(publisher) = &engine.publisher {
            let mut rpc = RpcMeta {
                ip_or_host_name: advertised.clone(),
                rpc_port,
                signature: None,
            };
            if let Some(token) = &engine.config.cluster_token {
                rpc.sign(token, &name);
            }
            let published = async {
                publisher
                    .store
                    .put(&publisher.keys.rpc_meta(&name), &rpc.encode())
                    .await?;
                engine.publish_now().await
            };
            if let Err(e) = published.await {
                engine.close().await;
                return Err(e);
            }
            engine.spawn_publisher();
        }
        tracing::info!(segment = %name, rpc_port, data_port, "transfer engine started");
        Ok(engine)
    }
}

/// The verbs provider for this host's NICs: libibverbs in a build with RDMA, when discovery
/// found a usable NIC.
pub(super) fn host_verbs(topology: &Topology) -> Option<Arc<dyn Provider>> {
    #[cfg(feature = "rdma")]
    if topology.rdma_nics.iter().any(|nic| nic.is_usable()) {
        return Some(Arc::new(mooncake_rdma::ibverbs::IbvProvider::new()));
    }
    let _ = topology;
    None
}

/// The RDMA transport over the matrix's devices, unless the protocol rules RDMA out. Without
/// a provider or a device, `rdma` fails and `auto` goes on without RDMA.
pub(super) fn start_rdma(
    config: &EngineConfig,
    verbs: Option<Arc<dyn Provider>>,
    name: &str,
    matrix: &PriorityMatrix,
) -> Result<Option<Arc<RdmaTransport>>> {
    if matches!(config.protocol, Protocol::Tcp | Protocol::Shm) {
        return Ok(None);
    }
    let devices = matrix.devices();
    let started = match verbs {
        Some(verbs) if !devices.is_empty() => {
            let mut options = RdmaOptions::new(name, devices, matrix.clone());
            options.config.retry_cnt = config.retry_budget;
            let connector = Arc::new(HandshakeConnector {
                connect_timeout: config.connect_timeout,
                max_frame: config.handshake_max_length,
                token: config.cluster_token.clone(),
            });
            RdmaTransport::new(verbs, options, connector).map(Arc::new)
        }
        _ => Err(Error::new(
            ErrorKind::DeviceNotFound,
            "no RDMA device: this build has no RDMA support or the host no usable NIC",
        )),
    };
    match started {
        Ok(rdma) => Ok(Some(rdma)),
        Err(e) if config.protocol == Protocol::Rdma => Err(e),
        Err(e) => {
            tracing::debug!("RDMA not in use: {e}");
            Ok(None)
        }
    }
}

/// Discovers the host (devices limited to `config.devices`) and settles the priority matrix:
/// the given one, else `MC_CUSTOM_TOPO_JSON`'s, else the discovered one.
pub(super) fn discover(config: &EngineConfig) -> Result<(Topology, PriorityMatrix)> {
    let options = DiscoverOptions {
        filters: config.devices.clone(),
        ..DiscoverOptions::default()
    };
    let host = Topology::discover(&options).unwrap_or_else(|e| {
        tracing::warn!("topology discovery failed ({e}); continuing without devices");
        Topology::default()
    });
    let mut matrix = match &config.topology_json {
        Some(json) => PriorityMatrix::parse(json)?,
        None => match PriorityMatrix::from_env() {
            Some(loaded) => loaded?,
            None => host.matrix(),
        },
    };
    if let Some(devices) = &config.devices {
        matrix.restrict(devices);
    }
    Ok((host, matrix))
}
