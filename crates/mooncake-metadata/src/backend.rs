//! Which metadata world an engine lives in, picked from a Mooncake connection string. P2P
//! handshake mode has no store at all: descriptors travel over the handshake socket.

use std::sync::Arc;

use mooncake_common::auth::ClusterToken;
use mooncake_common::{Error, ErrorKind, Result};

use crate::etcd::EtcdStore;
use crate::http::HttpStore;
use crate::redis::RedisStore;
use crate::store::MetadataStore;

/// The metadata world an engine lives in.
#[derive(Clone)]
pub enum MetadataBackend {
    /// No central store: descriptors are exchanged over the handshake socket and a segment's
    /// name is its `host:port`.
    P2pHandshake,
    /// A central key/value store.
    Store(Arc<dyn MetadataStore>),
}

impl std::fmt::Debug for MetadataBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::P2pHandshake => f.write_str("P2PHANDSHAKE"),
            Self::Store(_) => f.write_str("Store"),
        }
    }
}

/// Picks a backend from a Mooncake connection string: `P2PHANDSHAKE`,
/// `http://host:port/path`, `redis://host:port`, `etcd://h1:2379,h2:2379`. A string without
/// `proto://` means etcd, as in Mooncake (`h1:2379;h2:2379`). Stores connect on first use.
/// With a cluster token, writes to the HTTP metadata server carry proofs of it.
pub fn connect(conn: &str, token: Option<&ClusterToken>) -> Result<MetadataBackend> {
    let conn = conn.trim();
    if conn == "P2PHANDSHAKE" {
        return Ok(MetadataBackend::P2pHandshake);
    }
    let (proto, _) = conn.split_once("://").unwrap_or(("etcd", conn));
    match proto {
        "http" => Ok(MetadataBackend::Store(Arc::new(HttpStore::with_token(
            conn,
            token.cloned(),
        )?))),
        "redis" => Ok(MetadataBackend::Store(Arc::new(RedisStore::new(
            conn,
        )?))),
        "etcd" => Ok(MetadataBackend::Store(Arc::new(EtcdStore::new(conn)?))),
        "https" => Err(Error::new(
            ErrorKind::NotImplemented,
            format!("the '{proto}' metadata backend is not available in this build; use P2PHANDSHAKE, http://, redis:// or etcd://"),
        )),
        other => Err(Error::invalid(format!(
            "unknown metadata backend '{other}' in '{conn}'"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_strings_pick_backends() {
        assert!(matches!(
            connect("P2PHANDSHAKE", None).unwrap(),
            MetadataBackend::P2pHandshake
        ));
        assert!(matches!(
            connect("http://127.0.0.1:8080/metadata", None).unwrap(),
            MetadataBackend::Store(_)
        ));
        assert!(matches!(
            connect("redis://127.0.0.1:6379", None).unwrap(),
            MetadataBackend::Store(_)
        ));
        for etcd in [
            "10.0.0.1:2379",
            "10.0.0.1:2379;10.0.0.2:2379",
            "etcd://10.0.0.1:2379,10.0.0.2:2379",
            "etcd://10.0.0.1:2379;10.0.0.2:2379",
        ] {
            assert!(
                matches!(connect(etcd, None).unwrap(), MetadataBackend::Store(_)),
                "{etcd}"
            );
        }
        assert_eq!(
            connect("etcd://", None).unwrap_err().kind(),
            ErrorKind::InvalidArgument
        );
        assert_eq!(
            connect("https://10.0.0.1/metadata", None)
                .unwrap_err()
                .kind(),
            ErrorKind::NotImplemented
        );
        assert_eq!(
            connect("gopher://x", None).unwrap_err().kind(),
            ErrorKind::InvalidArgument
        );
    }
}
