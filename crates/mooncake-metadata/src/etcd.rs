//! etcd as the metadata store, as Mooncake's default plugin: a connection string without a
//! scheme (`10.0.0.1:2379`), or `etcd://a:2379,b:2379`; Mooncake's `;` separates endpoints as
//! well as `,`. Keys are stored as the engine spells them, values as the JSON text it passes.
//!
//! One client per endpoint, made on first use (so [`EtcdStore::new`] needs no runtime and never
//! blocks) and remade after a failed call. Calls stick to the endpoint that last answered and
//! move on to the next one when it fails, as etcd's Go client does: etcd-client's own balanced
//! channel keeps routing calls to a dead member (each fails with its connect error), so it
//! cannot carry a cluster through the loss of a member.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::http::uri::Authority;
use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp};
use mooncake_common::{Error, ErrorKind, Result};
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::store::{BoxFuture, MetadataStore, Revisioned};

/// Connecting to one endpoint.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(1000);
/// One request to one endpoint: long enough for a member to see a new leader elected.
const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(2000);
/// One operation, every try included: a dead cluster is an error within this.
const OPERATION_TIMEOUT: Duration = Duration::from_millis(4000);
/// Pause after every endpoint failed in turn (a leader election, say), doubled up to the cap.
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_millis(500);

/// Client of an etcd cluster holding the metadata.
pub struct EtcdStore {
    endpoints: Vec<String>,
    clients: Vec<Mutex<Option<Client>>>,
    /// The endpoint that answered last, tried first.
    current: AtomicUsize,
}

impl EtcdStore {
    /// A client for the endpoints in `conn`: `etcd://h1:2379,h2:2379`, `etcd://h1:2379;h2:2379`
    /// or the same without the scheme. Connects on first use.
    pub fn new(conn: &str) -> Result<Self> {
        let list = conn.trim().strip_prefix("etcd://").unwrap_or(conn.trim());
        Self::with_endpoints(
            list.split([',', ';'])
                .map(str::trim)
                .filter(|e| !e.is_empty()),
        )
        .map_err(|e| Error::invalid(format!("etcd metadata address '{conn}': {}", e.message())))
    }

    /// A client for `endpoints`, each `host:port` (or `http://host:port`). Connects on first
    /// use.
    pub fn with_endpoints<I, S>(endpoints: I) -> Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let endpoints: Vec<String> = endpoints.into_iter().map(Into::into).collect();
        if endpoints.is_empty() {
            return Err(Error::invalid("no etcd endpoints"));
        }
        for endpoint in &endpoints {
            let authority = endpoint.strip_prefix("http://").unwrap_or(endpoint);
            let valid = authority
                .trim_end_matches('/')
                .parse::<Authority>()
                .is_ok_and(|a| a.port().is_some());
            if !valid {
                return Err(Error::invalid(format!(
                    "etcd endpoint '{endpoint}' must look like host:port"
                )));
            }
        }
        Ok(Self {
            clients: endpoints.iter().map(|_| Mutex::new(None)).collect(),
            endpoints,
            current: AtomicUsize::new(0),
        })
    }

    /// The endpoints this store uses.
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// Gives up on the endpoint in use (a stream on it broke): the next call starts with the
    /// next one, on a fresh connection.
    pub async fn skip_current(&self) {
        let count = self.endpoints.len();
        let index = self.current.load(Ordering::Relaxed) % count;
        self.clients[index].lock().await.take();
        let _ = self.current.compare_exchange(
            index,
            (index + 1) % count,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    async fn client(&self, index: usize) -> Result<Client> {
        let mut slot = self.clients[index].lock().await;
        if let Some(client) = slot.as_ref() {
            return Ok(client.clone());
        }
        let options = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_timeout(ATTEMPT_TIMEOUT);
        // etcd-client dials lazily, so this returns at once; the callers' timeouts cover a
        // version that would dial here.
        let client = Client::connect([&self.endpoints[index]], Some(options))
            .await
            .map_err(|e| self.failed("connect", index, e))?;
        *slot = Some(client.clone());
        Ok(client)
    }

    /// Runs `call` against the endpoints in turn, from the one that answered last, until one
    /// answers or [`OPERATION_TIMEOUT`] passes. A call that reached a member before failing
    /// may run twice: it must be idempotent (the same value put again, an absent key deleted
    /// again, a conditional transaction).
    pub async fn call<T, F, Fut>(&self, what: &str, call: F) -> Result<T>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        let deadline = Instant::now() + OPERATION_TIMEOUT;
        let count = self.endpoints.len();
        let mut index = self.current.load(Ordering::Relaxed) % count;
        let mut backoff = FIRST_BACKOFF;
        let mut tries = 0;
        loop {
            let attempt = async {
                let client = self.client(index).await?;
                call(client).await.map_err(|e| self.failed(what, index, e))
            };
            let limit = deadline.min(Instant::now() + ATTEMPT_TIMEOUT);
            let error = match tokio::time::timeout_at(limit, attempt).await {
                Ok(Ok(value)) => {
                    self.current.store(index, Ordering::Relaxed);
                    return Ok(value);
                }
                Ok(Err(e)) => e,
                Err(_) => self.error(what, index, "no answer in time"),
            };
            self.clients[index].lock().await.take();
            index = (index + 1) % count;
            tries += 1;
            if tries % count == 0 {
                tokio::time::sleep_until(deadline.min(Instant::now() + backoff)).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            if Instant::now() >= deadline {
                return Err(error);
            }
        }
    }

    fn error(&self, what: &str, index: usize, why: impl std::fmt::Display) -> Error {
        let endpoint = &self.endpoints[index];
        let message = if self.endpoints.len() == 1 {
            format!("etcd {what} at {endpoint}: {why}")
        } else {
            let all = self.endpoints.join(",");
            format!("etcd {what} at {all} (last tried {endpoint}): {why}")
        };
        Error::new(ErrorKind::Metadata, message)
    }

    fn failed(&self, what: &str, index: usize, e: etcd_client::Error) -> Error {
        self.error(what, index, &e).with_source(e)
    }
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.endpoints)
            .finish_non_exhaustive()
    }
}

impl MetadataStore for EtcdStore {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<String>>> {
        Box::pin(async move {
            let response = self
                .call(
                    "GET",
                    |mut client| async move { client.get(key, None).await },
                )
                .await?;
            match response.kvs().first() {
                None => Ok(None),
                Some(kv) => utf8(key, kv.value()).map(Some),
            }
        })
    }

    fn put<'a>(&'a self, key: &'a str, value: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.call("PUT", |mut client| async move {
                client.put(key, value, None).await
            })
            .await
            .map(drop)
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.call("DELETE", |mut client| async move {
                client.delete(key, None).await
            })
            .await
            .map(drop)
        })
    }

    fn get_revisioned<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Revisioned>>> {
        Box::pin(async move {
            let response = self
                .call(
                    "GET",
                    |mut client| async move { client.get(key, None).await },
                )
                .await?;
            match response.kvs().first() {
                None => Ok(None),
                Some(kv) => Ok(Some(Revisioned {
                    value: utf8(key, kv.value())?,
                    revision: u64::try_from(kv.mod_revision()).unwrap_or(0),
                })),
            }
        })
    }

    /// A transaction on the key's mod revision. `call` may send it again after it reached a
    /// member; a repeat of one that succeeded answers `false`, which a caller that re-reads
    /// before retrying handles as any lost race.
    fn swap<'a>(
        &'a self,
        key: &'a str,
        expected: Option<&'a Revisioned>,
        new: Option<&'a str>,
    ) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let compare = match expected {
                None => Compare::version(key, CompareOp::Equal, 0),
                Some(read) => match i64::try_from(read.revision) {
                    Ok(revision) => Compare::mod_revision(key, CompareOp::Equal, revision),
                    // No key ever had that revision.
                    Err(_) => return Ok(false),
                },
            };
            let operation = match new {
                Some(value) => TxnOp::put(key, value, None),
                None => TxnOp::delete(key, None),
            };
            let txn = Txn::new().when([compare]).and_then([operation]);
            let response = self
                .call("TXN", |mut client| {
                    let txn = txn.clone();
                    async move { client.txn(txn).await }
                })
                .await?;
            Ok(response.succeeded())
        })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<(String, String)>>> {
        Box::pin(async move {
            let response = self
                .call("LIST", |mut client| async move {
                    // etcd refuses an empty key; "all keys" is its own range.
                    let options = if prefix.is_empty() {
                        GetOptions::new().with_all_keys()
                    } else {
                        GetOptions::new().with_prefix()
                    };
                    client.get(prefix, Some(options)).await
                })
                .await?;
            let mut entries = response
                .kvs()
                .iter()
                .map(|kv| {
                    let key = kv.key_str().map_err(|_| {
                        Error::new(
                            ErrorKind::MalformedJson,
                            format!("a key under '{prefix}' is not UTF-8"),
                        )
                    })?;
                    Ok((key.to_owned(), utf8(key, kv.value())?))
                })
                .collect::<Result<Vec<_>>>()?;
            entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            Ok(entries)
        })
    }

    /// A fresh lease of `ttl` (in whole seconds, rounded up; etcd lengthens one shorter than
    /// its minimum, about 2 s by default) for every call: a lease left behind by an earlier
    /// call just runs out.
    fn put_expiring<'a>(
        &'a self,
        key: &'a str,
        value: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let seconds = ttl
                .as_secs()
                .saturating_add(u64::from(ttl.subsec_nanos() > 0))
                .max(1);
            let seconds = i64::try_from(seconds).unwrap_or(i64::MAX);
            let lease = self
                .call("LEASE GRANT", |mut client| async move {
                    client.lease_grant(seconds, None).await
                })
                .await?
                .id();
            self.call("PUT", |mut client| async move {
                client
                    .put(key, value, Some(PutOptions::new().with_lease(lease)))
                    .await
            })
            .await
            .map(drop)
        })
    }
}

fn utf8(key: &str, value: &[u8]) -> Result<String> {
    std::str::from_utf8(value).map(str::to_owned).map_err(|_| {
        Error::new(
            ErrorKind::MalformedJson,
            format!("metadata '{key}' is not UTF-8"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_strings_name_every_endpoint() {
        let both = ["10.0.0.1:2379", "10.0.0.2:2379"];
        for conn in [
            "etcd://10.0.0.1:2379,10.0.0.2:2379",
            "etcd://10.0.0.1:2379;10.0.0.2:2379",
            "10.0.0.1:2379;10.0.0.2:2379",
            " 10.0.0.1:2379 ; 10.0.0.2:2379; ",
        ] {
            assert_eq!(EtcdStore::new(conn).unwrap().endpoints(), both, "{conn}");
        }
        assert_eq!(
            EtcdStore::new("etcd://http://h:2379").unwrap().endpoints(),
            ["http://h:2379"]
        );
        for bad in ["", "etcd://", ";", "etcd://h", "h:port", "https://h:2379/x"] {
            assert_eq!(
                EtcdStore::new(bad).unwrap_err().kind(),
                ErrorKind::InvalidArgument,
                "{bad}"
            );
        }
    }
}
