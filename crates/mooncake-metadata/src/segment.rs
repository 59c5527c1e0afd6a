//! The segment descriptor, as Mooncake publishes it (`TransferMetadata::encodeSegmentDesc`).
//!
//! Fields this crate does not model (RDMA devices, priority matrix, vendor extras) are kept
//! in `extra` and written back untouched, so a descriptor survives a round trip through us.

use mooncake_common::auth::{unauthenticated, ClusterToken};
use mooncake_common::{Error, ErrorKind, Result};
use serde::{Deserialize, Serialize};

/// One registered buffer of a segment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BufferDesc {
    /// TCP segments publish the segment name here; RDMA ones the location (`cpu:0`).
    pub name: String,
    /// Absolute virtual address in the owner's process.
    pub addr: u64,
    /// Length in bytes.
    pub length: u64,
    /// Anything else the publisher put on the buffer (keys, `shm_name`, ...).
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl BufferDesc {
    /// Whether `[addr, addr + len)` lies inside this buffer.
    pub fn contains(&self, addr: u64, len: u64) -> bool {
        addr >= self.addr
            && addr
                .checked_add(len)
                .is_some_and(|end| end <= self.addr.saturating_add(self.length))
    }
}

/// A segment descriptor.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SegmentDesc {
    /// The segment name.
    pub name: String,
    /// `tcp`, `rdma`, ... A multi-protocol build publishes an array.
    pub protocol: serde_json::Value,
    /// TCP data port (0 when the segment has no TCP transport).
    #[serde(default)]
    pub tcp_data_port: u16,
    /// TCP data protocol version; absent means 1.
    #[serde(default = "one")]
    pub tcp_proto_version: u32,
    /// `YYYY-MM-DD HH:MM:SS.uuuuuu`, informational.
    #[serde(default)]
    pub timestamp: String,
    /// Registered buffers.
    #[serde(default)]
    pub buffers: Vec<BufferDesc>,
    /// Fields this crate leaves alone.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

fn one() -> u32 {
    1
}

/// Where a signed descriptor or `rpc_meta` entry carries its signature; Mooncake ignores it.
const SIGNATURE: &str = "signature";
const SEGMENT_PURPOSE: &[u8] = b"segment";
const RPC_META_PURPOSE: &[u8] = b"rpc_meta";

impl SegmentDesc {
    /// An empty TCP descriptor.
    pub fn tcp(name: &str, tcp_data_port: u16) -> Self {
        Self {
            name: name.to_owned(),
            protocol: serde_json::Value::String("tcp".to_owned()),
            tcp_data_port,
            tcp_proto_version: 2,
            timestamp: timestamp_now(),
            buffers: Vec::new(),
            extra: serde_json::Map::new(),
        }
    }

    /// Parses and validates descriptor JSON, rejecting what Mooncake rejects: an empty name,
    /// a buffer with an empty name or a zero address or length; and a buffer whose range
    /// wraps the address space.
    pub fn decode(json: &str) -> Result<Self> {
        let desc: Self = serde_json::from_str(json).map_err(|e| {
            Error::new(ErrorKind::MalformedJson, format!("segment descriptor: {e}"))
        })?;
        if desc.name.is_empty() {
            return Err(Error::new(
                ErrorKind::MalformedJson,
                "segment descriptor without a name",
            ));
        }
        if let Some(bad) = desc.buffers.iter().find(|b| {
            b.name.is_empty()
                || b.addr == 0
                || b.length == 0
                || b.addr.checked_add(b.length).is_none()
        }) {
            return Err(Error::new(
                ErrorKind::MalformedJson,
                format!(
                    "segment '{}' has an invalid buffer at {:#x}",
                    desc.name, bad.addr
                ),
            ));
        }
        Ok(desc)
    }

    /// Compact JSON.
    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("a segment descriptor always serializes")
    }

    /// Signs the descriptor with the cluster token, so that readers holding it can tell an
    /// entry its owner wrote from one someone else put in the metadata store.
    pub fn sign(&mut self, token: &ClusterToken) {
        self.extra.remove(SIGNATURE);
        let signature = token.sign(&[SEGMENT_PURPOSE, self.encode().as_bytes()]);
        self.extra
            .insert(SIGNATURE.to_owned(), serde_json::Value::String(signature));
    }

    /// Checks the owner's signature, and that the descriptor names the segment `name`
    /// (`ERR_UNAUTHENTICATED` otherwise).
    pub fn verify(&self, token: &ClusterToken, name: &str) -> Result<()> {
        let mut unsigned = self.clone();
        let signature = match unsigned.extra.remove(SIGNATURE) {
            Some(serde_json::Value::String(signature)) => signature,
            _ => {
                return Err(unauthenticated(format!(
                    "the descriptor of segment '{name}' is not signed: its owner holds no cluster token"
                )))
            }
        };
        if !token.verify(&[SEGMENT_PURPOSE, unsigned.encode().as_bytes()], &signature) {
            return Err(unauthenticated(format!(
                "the descriptor of segment '{name}' does not carry this cluster's signature"
            )));
        }
        if self.name != name {
            return Err(unauthenticated(format!(
                "the entry of segment '{name}' holds the descriptor of '{}'",
                self.name
            )));
        }
        Ok(())
    }

    /// Whether the descriptor speaks `protocol`, alone or among others.
    pub fn speaks(&self, protocol: &str) -> bool {
        match &self.protocol {
            serde_json::Value::String(p) => p == protocol,
            serde_json::Value::Array(list) => list.iter().any(|p| p.as_str() == Some(protocol)),
            _ => false,
        }
    }

    /// The buffer that holds `[addr, addr + len)` whole.
    pub fn buffer_containing(&self, addr: u64, len: u64) -> Option<&BufferDesc> {
        self.buffers.iter().find(|b| b.contains(addr, len))
    }
}

/// `rpc_meta/<name>`: where a segment's handshake listener is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RpcMeta {
    /// IP or host name.
    pub ip_or_host_name: String,
    /// Handshake port.
    pub rpc_port: u16,
    /// The owner's signature over the segment name and the fields above, with a cluster token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

impl RpcMeta {
    /// Parses `rpc_meta` JSON.
    pub fn decode(json: &str) -> Result<Self> {
        serde_json::from_str(json)
            .map_err(|e| Error::new(ErrorKind::MalformedJson, format!("rpc_meta entry: {e}")))
    }

    /// Compact JSON.
    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("an rpc_meta entry always serializes")
    }

    fn signed_parts(&self, name: &str) -> [Vec<u8>; 4] {
        [
            RPC_META_PURPOSE.to_vec(),
            name.as_bytes().to_vec(),
            self.ip_or_host_name.as_bytes().to_vec(),
            self.rpc_port.to_le_bytes().to_vec(),
        ]
    }

    /// Signs the entry of segment `name`.
    pub fn sign(&mut self, token: &ClusterToken, name: &str) {
        let parts = self.signed_parts(name);
        let parts: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
        self.signature = Some(token.sign(&parts));
    }

    /// Checks that the entry is segment `name`'s, signed by a holder of the token.
    pub fn verify(&self, token: &ClusterToken, name: &str) -> Result<()> {
        let parts = self.signed_parts(name);
        let parts: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
        match &self.signature {
            Some(signature) if token.verify(&parts, signature) => Ok(()),
            Some(_) => Err(unauthenticated(format!(
                "the rpc_meta entry of segment '{name}' does not carry this cluster's signature"
            ))),
            None => Err(unauthenticated(format!(
                "the rpc_meta entry of segment '{name}' is not signed"
            ))),
        }
    }
}

/// Local wall-clock time in Mooncake's format. UTC here: the field is informational and
/// excluded from descriptor equality.
fn timestamp_now() -> String {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since_epoch.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{:06}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since_epoch.subsec_micros()
    )
}

/// Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    const RDMA_EXAMPLE: &str = r#"{"name":"node01","protocol":"rdma","tcp_data_port":0,"tcp_proto_version":1,
 "timestamp":"2026-08-22 13:12:18.123456",
 "devices":[{"name":"mlx5_0","lid":0,"gid":"00:00:00:00:00:00:00:00:00:00:ff:ff:0a:00:00:0b"}],
 "buffers":[{"name":"cpu:0","addr":140330139148288,"length":1073741824,"rkey":[2093056],"lkey":[2093056]}],
 "priority_matrix":{"cpu:0":[["mlx5_0"],[]]}}"#;

    #[test]
    fn mooncake_descriptor_round_trips() {
        let desc = SegmentDesc::decode(RDMA_EXAMPLE).unwrap();
        assert!(desc.speaks("rdma"));
        assert_eq!(desc.buffers[0].extra["rkey"][0], 2093056);
        let again = SegmentDesc::decode(&desc.encode()).unwrap();
        assert_eq!(
            again.extra["priority_matrix"],
            desc.extra["priority_matrix"]
        );
        assert_eq!(again.buffers, desc.buffers);
    }

    #[test]
    fn tcp_descriptor_defaults_version_one() {
        let desc = SegmentDesc::decode(
            r#"{"name":"n","protocol":"tcp","tcp_data_port":15001,
                "buffers":[{"name":"n","addr":4096,"length":4096}]}"#,
        )
        .unwrap();
        assert_eq!(desc.tcp_proto_version, 1);
        assert!(desc.buffer_containing(4096, 4096).is_some());
        assert!(desc.buffer_containing(4097, 4096).is_none());
        assert!(desc.buffer_containing(u64::MAX, 2).is_none());
    }

    #[test]
    fn corrupt_descriptors_are_rejected() {
        for bad in [
            "{",
            r#"{"name":"","protocol":"tcp"}"#,
            r#"{"name":"n","protocol":"tcp","buffers":[{"name":"n","addr":0,"length":1}]}"#,
        ] {
            assert_eq!(
                SegmentDesc::decode(bad).unwrap_err().kind(),
                ErrorKind::MalformedJson
            );
        }
    }

    #[test]
    fn signed_descriptors_refuse_any_change() {
        let token = ClusterToken::new("segment-signing-secret-0001").unwrap();
        let mut desc = SegmentDesc::decode(RDMA_EXAMPLE).unwrap();
        assert_eq!(
            desc.verify(&token, "node01").unwrap_err().kind(),
            ErrorKind::Unauthenticated
        );
        desc.sign(&token);
        let published = desc.encode();
        let read = SegmentDesc::decode(&published).unwrap();
        read.verify(&token, "node01").unwrap();
        assert!(
            read.verify(&token, "node02").is_err(),
            "moved to another key"
        );
        let other = ClusterToken::new("another-signing-secret-0002").unwrap();
        assert!(read.verify(&other, "node01").is_err());
        for (from, to) in [
            ("140330139148288", "140330139148289"),
            ("1073741824", "2073741824"),
            ("mlx5_0", "mlx5_1"),
            ("\"tcp_data_port\":0", "\"tcp_data_port\":1"),
        ] {
            let tampered = SegmentDesc::decode(&published.replacen(from, to, 1)).unwrap();
            assert!(tampered.verify(&token, "node01").is_err(), "{from} -> {to}");
        }

        let mut rpc = RpcMeta {
            ip_or_host_name: "10.0.0.1".into(),
            rpc_port: 15001,
            signature: None,
        };
        assert!(rpc.verify(&token, "node01").is_err());
        rpc.sign(&token, "node01");
        let read = RpcMeta::decode(&rpc.encode()).unwrap();
        read.verify(&token, "node01").unwrap();
        assert!(read.verify(&token, "node02").is_err());
        let moved = RpcMeta {
            rpc_port: 15002,
            ..read.clone()
        };
        assert!(moved.verify(&token, "node01").is_err());
    }

    proptest::proptest! {
        /// Whatever a peer or a store hands over, decoding answers without panicking, and a
        /// descriptor it accepts has only buffers that do not wrap.
        #[test]
        fn any_text_decodes_or_fails_cleanly(text in "\\PC{0,200}") {
            let _ = SegmentDesc::decode(&text);
            let _ = RpcMeta::decode(&text);
        }

        #[test]
        fn any_json_shape_decodes_or_fails_cleanly(
            name in "\\PC{0,8}",
            addr in proptest::prelude::any::<u64>(),
            length in proptest::prelude::any::<u64>(),
            port in proptest::prelude::any::<u32>(),
            version in proptest::prelude::any::<i64>(),
        ) {
            let text = serde_json::json!({
                "name": name, "protocol": "tcp", "tcp_data_port": port,
                "tcp_proto_version": version,
                "buffers": [{"name": name, "addr": addr, "length": length}],
            })
            .to_string();
            if let Ok(desc) = SegmentDesc::decode(&text) {
                for buffer in &desc.buffers {
                    proptest::prop_assert!(buffer.addr.checked_add(buffer.length).is_some());
                    proptest::prop_assert!(buffer.addr != 0 && buffer.length != 0);
                }
            }
        }

        /// Changing any one byte of a signed descriptor makes it undecodable or unverifiable
        /// (or leaves it meaning the same: JSON whitespace and escapes).
        #[test]
        fn a_flipped_byte_never_verifies_as_something_else(at in 0usize..4096, to in 0u8..128) {
            let token = ClusterToken::new("segment-signing-secret-0001").unwrap();
            let mut desc = SegmentDesc::decode(RDMA_EXAMPLE).unwrap();
            desc.sign(&token);
            let mut bytes = desc.encode().into_bytes();
            let at = at % bytes.len();
            bytes[at] = to;
            let Ok(text) = String::from_utf8(bytes) else { return Ok(()) };
            if let Ok(read) = SegmentDesc::decode(&text) {
                if read.verify(&token, "node01").is_ok() {
                    let mut original = desc.clone();
                    original.extra.remove(SIGNATURE);
                    let mut read = read;
                    read.extra.remove(SIGNATURE);
                    proptest::prop_assert_eq!(original.encode(), read.encode());
                }
            }
        }
    }

    #[test]
    fn timestamp_has_mooncake_shape() {
        let ts = timestamp_now();
        assert_eq!(ts.len(), "2026-08-22 13:12:18.123456".len());
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_000), (2024, 10, 4));
    }
}
