//! Where segment descriptors live.
//!
//! [`MetadataStore`] is a key/value store of JSON strings (HTTP and Redis now; etcd plugs in
//! behind the same trait). P2P handshake mode has no store at all: descriptors travel over
//! the handshake socket, so [`MetadataBackend`] tells the engine which world it is in.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use mooncake_common::{Error, ErrorKind, Result};

/// A boxed, sendable future.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A key/value store of JSON strings.
pub trait MetadataStore: Send + Sync {
    /// The value at `key`, or `None` when absent.
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<String>>>;
    /// Stores `value` at `key`, replacing any previous value.
    fn put<'a>(&'a self, key: &'a str, value: &'a str) -> BoxFuture<'a, Result<()>>;
    /// Removes `key`; removing an absent key succeeds.
    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<()>>;
}

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
/// `http://host:port/path`, `redis://host:port`. A string without `proto://` means etcd, as in
/// Mooncake.
pub fn connect(conn: &str) -> Result<MetadataBackend> {
    let conn = conn.trim();
    if conn == "P2PHANDSHAKE" {
        return Ok(MetadataBackend::P2pHandshake);
    }
    let (proto, _) = conn.split_once("://").unwrap_or(("etcd", conn));
    match proto {
        "http" => Ok(MetadataBackend::Store(Arc::new(crate::http::HttpStore::new(conn)?))),
        "redis" => Ok(MetadataBackend::Store(Arc::new(crate::redis::RedisStore::new(
            conn,
        )?))),
        "etcd" | "https" => Err(Error::new(
            ErrorKind::NotImplemented,
            format!("the '{proto}' metadata backend is not available in this build; use P2PHANDSHAKE, http:// or redis://"),
        )),
        other => Err(Error::invalid(format!(
            "unknown metadata backend '{other}' in '{conn}'"
        ))),
    }
}

/// An in-process store: the embedded HTTP server's state, and a stand-in for tests.
#[derive(Debug, Default)]
pub struct MemoryStore {
    entries: Mutex<HashMap<String, String>>,
}

impl MemoryStore {
    /// The value at `key`.
    pub fn get_now(&self, key: &str) -> Option<String> {
        self.lock().get(key).cloned()
    }

    /// Stores `value` at `key`.
    pub fn put_now(&self, key: &str, value: String) {
        self.lock().insert(key.to_owned(), value);
    }

    /// Removes `key`; whether it was there.
    pub fn delete_now(&self, key: &str) -> bool {
        self.lock().remove(key).is_some()
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether the store is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        // A panic while holding this lock cannot leave the map half-updated.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl MetadataStore for MemoryStore {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<String>>> {
        Box::pin(async move { Ok(self.get_now(key)) })
    }

    fn put<'a>(&'a self, key: &'a str, value: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.put_now(key, value.to_owned());
            Ok(())
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.delete_now(key);
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_strings_pick_backends() {
        assert!(matches!(
            connect("P2PHANDSHAKE").unwrap(),
            MetadataBackend::P2pHandshake
        ));
        assert!(matches!(
            connect("http://127.0.0.1:8080/metadata").unwrap(),
            MetadataBackend::Store(_)
        ));
        assert!(matches!(
            connect("redis://127.0.0.1:6379").unwrap(),
            MetadataBackend::Store(_)
        ));
        assert_eq!(
            connect("10.0.0.1:2379").unwrap_err().kind(),
            ErrorKind::NotImplemented
        );
        assert_eq!(
            connect("gopher://x").unwrap_err().kind(),
            ErrorKind::InvalidArgument
        );
    }
}
