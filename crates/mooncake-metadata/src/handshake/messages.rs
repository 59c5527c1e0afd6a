//! JSON bodies of the handshake messages.

use serde::{Deserialize, Serialize};

/// Notify request; the reply has an empty `name` and `notify_msg: "success"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotifyMessage {
    /// Sender's segment name.
    pub name: String,
    /// Application payload.
    pub notify_msg: String,
}

impl NotifyMessage {
    /// The accepting reply.
    pub fn success() -> Self {
        Self {
            name: String::new(),
            notify_msg: "success".to_owned(),
        }
    }
}

/// RDMA connection request or reply. Only the reply's rejection is built here; the RDMA
/// transport fills in the rest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionMessage {
    /// GID of the sender's NIC.
    #[serde(default)]
    pub local_gid: String,
    /// LID of the sender's NIC.
    #[serde(default)]
    pub local_lid: u16,
    /// `<server>@<nic>` of the sender.
    #[serde(default)]
    pub local_nic_path: String,
    /// Opaque payload.
    #[serde(default)]
    pub payload: String,
    /// `<server>@<nic>` of the receiver.
    #[serde(default)]
    pub peer_nic_path: String,
    /// Queue-pair numbers.
    #[serde(default)]
    pub qp_num: Vec<u32>,
    /// Present when the sender supports the ready-ack round trip.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_ack: Option<bool>,
    /// Non-empty means rejected.
    #[serde(default)]
    pub reply_msg: String,
}

/// Probe reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeReply {
    /// `success`.
    pub status: String,
}
