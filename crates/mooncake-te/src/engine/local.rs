//! This engine as its peers see it: the descriptor it publishes, what its handshake
//! listener answers, and the publisher that keeps the metadata store current.

use super::*;

/// What the handshake listener needs of this engine.
pub(super) struct Local {
    pub(super) name: String,
    pub(super) data_port: u16,
    /// Interfaces TCP rails leave from (empty: one path, by the routing table).
    pub(super) tcp_rails: Vec<LocalRail>,
    pub(super) registry: Arc<MemoryRegistry>,
    /// The control table and what same-host peers need to reach us, when offered.
    pub(super) shm: Option<(Arc<ControlTable>, ShmTarget)>,
    pub(super) rdma: Option<Arc<RdmaTransport>>,
    pub(super) listener: Mutex<Option<NotifyListener>>,
    pub(super) queued: Mutex<Vec<Notification>>,
    /// Signs the descriptor, so that peers holding the token can tell it is ours.
    pub(super) token: Option<mooncake_common::auth::ClusterToken>,
}

impl Local {
    pub(super) fn desc(&self) -> SegmentDesc {
        let mut desc = SegmentDesc::tcp(&self.name, self.data_port);
        if !self.tcp_rails.is_empty() {
            let rails: Vec<_> = self
                .tcp_rails
                .iter()
                .map(|rail| RailAddr {
                    device: rail.device.clone(),
                    ip: rail.ip.to_string(),
                    port: self.data_port,
                })
                .collect();
            desc.extra.insert(
                "tcp_rails".to_owned(),
                serde_json::to_value(rails).expect("rail addresses serialize"),
            );
        }
        if let Some((_, target)) = &self.shm {
            desc.extra.insert(
                "shm".to_owned(),
                serde_json::to_value(target).expect("shm target serializes"),
            );
        }
        if let Some(rdma) = &self.rdma {
            desc.protocol = serde_json::json!(["rdma", "tcp"]);
            desc.extra.insert(
                "devices".to_owned(),
                serde_json::to_value(rdma.local_devices()).expect("devices serialize"),
            );
            desc.extra.insert(
                "priority_matrix".to_owned(),
                serde_json::to_value(rdma.priority_matrix()).unwrap_or_default(),
            );
        }
        desc.buffers = self
            .registry
            .regions()
            .iter()
            .filter(|region| region.is_remote())
            .map(|region| {
                let mut extra = serde_json::Map::new();
                extra.insert("location".to_owned(), region.location().into());
                let keys = self
                    .rdma
                    .as_ref()
                    .and_then(|r| r.buffer_keys(region.addr()));
                if let Some((lkeys, rkeys)) = &keys {
                    extra.insert("lkey".to_owned(), lkeys.clone().into());
                    extra.insert("rkey".to_owned(), rkeys.clone().into());
                }
                if let Some(slot) = region.slot() {
                    let mut shm = serde_json::Map::new();
                    shm.insert("slot".to_owned(), slot.index.into());
                    shm.insert("generation".to_owned(), slot.generation.into());
                    if let Some(arena) = region.backing_arena() {
                        shm.insert("arena".to_owned(), arena.id().into());
                    }
                    extra.insert("shm".to_owned(), shm.into());
                }
                BufferDesc {
                    // RDMA peers read a buffer's location from its name; TCP ones ignore it.
                    name: match keys {
                        Some(_) => region.location().to_owned(),
                        None => self.name.clone(),
                    },
                    addr: region.addr() as u64,
                    length: region.len() as u64,
                    extra,
                }
            })
            .collect();
        if let Some(token) = &self.token {
            desc.sign(token);
        }
        desc
    }
}

impl HandshakeHandler for Local {
    fn on_metadata(&self, _peer_desc: &str) -> Result<String> {
        Ok(self.desc().encode())
    }

    fn on_connection(&self, request: ConnectionMessage) -> ConnectionMessage {
        match &self.rdma {
            Some(rdma) => rdma.on_connection(request),
            None => ConnectionMessage {
                local_nic_path: request.peer_nic_path,
                peer_nic_path: request.local_nic_path,
                reply_msg: "RDMA is not enabled on this peer".to_owned(),
                ..ConnectionMessage::default()
            },
        }
    }

    fn on_notify(&self, message: NotifyMessage) {
        let notification = Notification {
            from: message.name,
            message: message.notify_msg,
        };
        let listener = self
            .listener
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match listener {
            Some(listener) => listener(notification),
            None => {
                let mut queued = self.queued.lock().unwrap_or_else(|p| p.into_inner());
                if queued.len() >= NOTIFY_QUEUE_LIMIT {
                    tracing::warn!("notification queue full; dropping the oldest");
                    queued.remove(0);
                }
                queued.push(notification);
            }
        }
    }
}

/// Republishes the local descriptor whenever registrations change (store mode only).
pub(super) struct Publisher {
    pub(super) store: Arc<dyn MetadataStore>,
    pub(super) keys: Keys,
    pub(super) dirty: Notify,
}

impl Publisher {
    pub(super) async fn publish(&self, local: &Local) -> Result<()> {
        self.store
            .put(&self.keys.segment(&local.name), &local.desc().encode())
            .await
    }
}
