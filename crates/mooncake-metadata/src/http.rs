//! Mooncake's HTTP metadata protocol: `GET/PUT/DELETE <url>?key=<escaped key>`, the value as
//! the body, 200 on success and 404 for a missing key.
//!
//! Extended compatibly, for [`MetadataServer`] (Mooncake's own server has none of it, and the
//! client says so rather than fall back):
//! - a GET answers the entry's revision as `ETag: "<revision>"`;
//! - a PUT or DELETE with `If-Match: "<revision>"` or `If-None-Match: *` happens only if the
//!   entry is at that revision, or absent; else 412. Both answers carry [`CONDITION_HEADER`];
//! - `GET <url>?prefix=<escaped prefix>` answers `[{"key": .., "value": ..}, ..]` in key order;
//! - a PUT with [`TTL_HEADER`] stores an entry that expires, and repeats the header.
//!
//! [`HttpStore`] is the client side; [`MetadataServer`] the embedded server, whose routes
//! ([`router`]) other servers (the store master) can mount too.
//!
//! The server is bounded ([`MetadataServerConfig`]): key and value sizes, keys held, bytes held,
//! connections, and the time a peer may take to send a request or read a reply. With a cluster
//! token, PUT and DELETE carry a per-request proof in [`PROOF_HEADER`] over
//! [`write_scope`]; reads stay open (descriptors are signed by their owners).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{Query, State};
use axum::http::header::{CONTENT_TYPE, ETAG, IF_MATCH, IF_NONE_MATCH};
use axum::http::{HeaderMap, HeaderValue, Method, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use mooncake_common::auth::{ClusterToken, ProofChecker};
use mooncake_common::{Error, ErrorKind, Result};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::store::{BoxFuture, MemoryStore, MetadataStore, Revisioned};

/// The header that carries a write's proof when the server has a cluster token.
pub const PROOF_HEADER: &str = "x-mooncake-proof";

/// On a PUT, the milliseconds until the entry expires; the server repeats it in its answer.
pub const TTL_HEADER: &str = "x-mooncake-ttl-ms";

/// Marks the answer to a conditional write (200 or 412) of a server that checked the
/// condition: one that ignores `If-Match` would write and answer 200 without it.
pub const CONDITION_HEADER: &str = "x-mooncake-condition";

/// What a write's proof is made over: the method and the key as stored (unescaped), so a
/// proof for one key or one method never serves another.
pub fn write_scope(method: &str, key: &str) -> String {
    format!("{method} {key}")
}

/// What `curl_easy_escape`, and so Mooncake's client, escapes: everything but letters, digits
/// and `-._~`. Mooncake's own metadata server stores keys as they were spelled, so a key must
/// be spelled exactly this way for both sides to find each other's entries there.
const CURL_ESCAPED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// A key as it goes into the query string.
fn escape(key: &str) -> String {
    utf8_percent_encode(key, CURL_ESCAPED).to_string()
}

/// Mooncake's client timeout for one metadata request.
const REQUEST_TIMEOUT: Duration = Duration::from_millis(3000);

/// Largest reply the client takes in: a server is no more trusted than its peers.
const MAX_REPLY_BYTES: usize = 64 << 20;

/// Client of an HTTP metadata server.
pub struct HttpStore {
    url: String,
    client: Client<HttpConnector, Full<Bytes>>,
    token: Option<ClusterToken>,
    /// Whether the server has shown that it keeps revisions.
    conditional: AtomicBool,
}

impl HttpStore {
    /// A client for `url` (`http://host:port/metadata`). Connections are kept alive.
    pub fn new(url: &str) -> Result<Self> {
        Self::with_token(url, None)
    }

    /// A client that proves `token` on every write, as a server with a token requires.
    pub fn with_token(url: &str, token: Option<ClusterToken>) -> Result<Self> {
        let parsed: hyper::Uri = url
            .parse()
            .map_err(|e| Error::invalid(format!("metadata URL '{url}': {e}")))?;
        if parsed.scheme_str() != Some("http") || parsed.host().is_none() {
            return Err(Error::invalid(format!(
                "metadata URL '{url}' must look like http://host:port/metadata"
            )));
        }
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_millis(1500)));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Ok(Self {
            url: url.trim_end_matches('?').to_owned(),
            client,
            token,
            conditional: AtomicBool::new(false),
        })
    }

    /// One request with `param` (`key` or `prefix`) in the query; any answer is returned, a
    /// failure to get one is an error.
    async fn send(
        &self,
        method: Method,
        param: Param<'_>,
        headers: &[(&'static str, String)],
        body: Option<&str>,
    ) -> Result<Answer> {
        let uri = match param {
            Param::Key(key) => format!("{}?key={}", self.url, escape(key)),
            Param::Prefix(prefix) => format!("{}?prefix={}", self.url, escape(prefix)),
        };
        let what = format!("{method} {uri}");
        let mut request = Request::builder().method(method.clone()).uri(&uri);
        if body.is_some() {
            request = request.header("content-type", "application/json");
        }
        if let (Some(token), Param::Key(key), true) = (&self.token, param, method != Method::GET) {
            request = request.header(
                PROOF_HEADER,
                token.prove(&write_scope(method.as_str(), key))?,
            );
        }
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default().to_owned())))
            .map_err(|e| Error::invalid(format!("metadata request to {uri}: {e}")))?;
        let exchange = async {
            let response = self.client.request(request).await.map_err(|e| {
                Error::new(ErrorKind::Metadata, format!("{what}: {e}")).with_source(e)
            })?;
            let status = response.status();
            let headers = response.headers().clone();
            let body = Limited::new(response.into_body(), MAX_REPLY_BYTES)
                .collect()
                .await
                .map_err(|e| Error::new(ErrorKind::Metadata, format!("{what}: {e}")))?
                .to_bytes();
            Ok(Answer {
                what: what.clone(),
                status,
                headers,
                body,
            })
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| Error::new(ErrorKind::Metadata, format!("{what}: timed out")))?
    }

    /// A plain request: the body on 200, `None` on 404, an error otherwise.
    async fn call(&self, method: Method, key: &str, body: Option<&str>) -> Result<Option<Bytes>> {
        let answer = self.send(method, Param::Key(key), &[], body).await?;
        match answer.status {
            StatusCode::OK => Ok(Some(answer.body)),
            StatusCode::NOT_FOUND => Ok(None),
            _ => Err(answer.refused()),
        }
    }

    /// The error for a server that keeps no revisions (Mooncake's own).
    fn unconditional(&self, why: &str) -> Error {
        Error::new(
            ErrorKind::NotImplemented,
            format!(
                "the metadata server at {} does not support conditional updates ({why}); use \
                 etcd, Redis, or this package's metadata server",
                self.url
            ),
        )
    }
}

/// Where a request points: one key, or every key under a prefix.
#[derive(Clone, Copy)]
enum Param<'a> {
    Key(&'a str),
    Prefix(&'a str),
}

/// A server's answer, whatever its status.
struct Answer {
    /// The method and URI, for messages.
    what: String,
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    /// The error for a status the caller does not expect.
    fn refused(&self) -> Error {
        let kind = match self.status {
            StatusCode::UNAUTHORIZED => ErrorKind::Unauthenticated,
            StatusCode::PAYLOAD_TOO_LARGE | StatusCode::URI_TOO_LONG => ErrorKind::InvalidArgument,
            _ => ErrorKind::Metadata,
        };
        let why: String = String::from_utf8_lossy(&self.body)
            .chars()
            .take(200)
            .collect();
        Error::new(kind, format!("{}: HTTP {}: {why}", self.what, self.status))
    }

    fn text(self, key: &str) -> Result<String> {
        String::from_utf8(self.body.to_vec()).map_err(|_| {
            Error::new(
                ErrorKind::MalformedJson,
                format!("metadata '{key}' is not UTF-8"),
            )
        })
    }
}

/// An entry of a listing on the wire.
#[derive(serde::Serialize, serde::Deserialize)]
struct Listed {
    key: String,
    value: String,
}

/// `"17"`: a revision as an entity tag.
fn etag(revision: u64) -> String {
    format!("\"{revision}\"")
}

/// The revision in an entity tag of ours; `None` for any other tag (a weak one included).
fn revision_of(tag: &str) -> Option<u64> {
    let digits = tag.strip_prefix('"')?.strip_suffix('"')?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

impl MetadataStore for HttpStore {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<String>>> {
        Box::pin(async move {
            match self.call(Method::GET, key, None).await? {
                None => Ok(None),
                Some(bytes) => String::from_utf8(bytes.to_vec()).map(Some).map_err(|_| {
                    Error::new(
                        ErrorKind::MalformedJson,
                        format!("metadata '{key}' is not UTF-8"),
                    )
                }),
            }
        })
    }

    fn put<'a>(&'a self, key: &'a str, value: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            match self.call(Method::PUT, key, Some(value)).await? {
                Some(_) => Ok(()),
                None => Err(Error::new(
                    ErrorKind::Metadata,
                    format!("PUT '{key}' answered 404"),
                )),
            }
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move { self.call(Method::DELETE, key, None).await.map(drop) })
    }

    /// Fails with [`ErrorKind::NotImplemented`] when the server sends no revision (`ETag`), as
    /// Mooncake's own does not.
    fn get_revisioned<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Revisioned>>> {
        Box::pin(async move {
            let answer = self.send(Method::GET, Param::Key(key), &[], None).await?;
            match answer.status {
                StatusCode::OK => {}
                StatusCode::NOT_FOUND => return Ok(None),
                _ => return Err(answer.refused()),
            }
            let tag = answer
                .headers
                .get(ETAG)
                .ok_or_else(|| self.unconditional("its reads carry no ETag"))?;
            let revision = tag
                .to_str()
                .ok()
                .and_then(revision_of)
                .ok_or_else(|| self.unconditional("its ETag is not a revision"))?;
            self.conditional.store(true, Ordering::Relaxed);
            Ok(Some(Revisioned {
                value: answer.text(key)?,
                revision,
            }))
        })
    }

    /// A PUT or DELETE with `If-Match` or `If-None-Match: *`. A server that ignores those
    /// writes unconditionally, so a create is preceded by a read until this server has shown
    /// that it keeps revisions, and a success counts only when marked as checked.
    fn swap<'a>(
        &'a self,
        key: &'a str,
        expected: Option<&'a Revisioned>,
        new: Option<&'a str>,
    ) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            if expected.is_none()
                && !self.conditional.load(Ordering::Relaxed)
                && self.get_revisioned(key).await?.is_some()
            {
                return Ok(false);
            }
            let condition = match expected {
                None => ("if-none-match", "*".to_owned()),
                Some(read) => ("if-match", etag(read.revision)),
            };
            let method = if new.is_some() {
                Method::PUT
            } else {
                Method::DELETE
            };
            let answer = self
                .send(method, Param::Key(key), &[condition], new)
                .await?;
            match answer.status {
                StatusCode::OK if answer.headers.contains_key(CONDITION_HEADER) => {
                    self.conditional.store(true, Ordering::Relaxed);
                    Ok(true)
                }
                StatusCode::OK => Err(self.unconditional(
                    "it did not say it checked the condition, and may have written anyway",
                )),
                StatusCode::PRECONDITION_FAILED => Ok(false),
                _ => Err(answer.refused()),
            }
        })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<(String, String)>>> {
        Box::pin(async move {
            let answer = self
                .send(Method::GET, Param::Prefix(prefix), &[], None)
                .await?;
            match answer.status {
                StatusCode::OK => {}
                // Mooncake's own server wants a key: it answers 404 or 400 without one.
                StatusCode::NOT_FOUND | StatusCode::BAD_REQUEST => {
                    return Err(Error::new(
                        ErrorKind::NotImplemented,
                        format!(
                            "the metadata server at {} does not support listing ({} answered \
                             {}); use etcd, Redis, or this package's metadata server",
                            self.url, answer.what, answer.status
                        ),
                    ))
                }
                _ => return Err(answer.refused()),
            }
            let listed: Vec<Listed> = serde_json::from_slice(&answer.body).map_err(|e| {
                Error::new(
                    ErrorKind::MalformedJson,
                    format!(
                        "{}: not a listing (a JSON array of key and value): {e}",
                        answer.what
                    ),
                )
            })?;
            let mut entries: Vec<(String, String)> = listed
                .into_iter()
                .filter(|e| e.key.starts_with(prefix))
                .map(|e| (e.key, e.value))
                .collect();
            entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            Ok(entries)
        })
    }

    fn put_expiring<'a>(
        &'a self,
        key: &'a str,
        value: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let millis = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
            let answer = self
                .send(
                    Method::PUT,
                    Param::Key(key),
                    &[(TTL_HEADER, millis.to_string())],
                    Some(value),
                )
                .await?;
            match answer.status {
                StatusCode::OK if answer.headers.contains_key(TTL_HEADER) => Ok(()),
                StatusCode::OK => Err(Error::new(
                    ErrorKind::NotImplemented,
                    format!(
                        "the metadata server at {} does not support expiring entries ('{key}' \
                         was stored for good); use etcd, Redis, or this package's metadata \
                         server",
                        self.url
                    ),
                )),
                _ => Err(answer.refused()),
            }
        })
    }
}

/// Caps and timeouts of an embedded metadata server, and who may write to it.
#[derive(Debug, Clone)]
pub struct MetadataServerConfig {
    /// Longest key, in bytes as stored (unescaped). Default 4 KiB; keys travel in the request
    /// line, which the server reads into at most [`MAX_REQUEST_HEAD`] bytes.
    pub max_key_bytes: usize,
    /// Largest value. Default 4 MiB (a segment descriptor is a few KiB).
    pub max_value_bytes: usize,
    /// Most keys held. Default 100,000.
    pub max_keys: usize,
    /// Most bytes of keys and values held. Default 256 MiB.
    pub max_total_bytes: usize,
    /// Most connections open at once; connections beyond it are closed as they arrive.
    /// Default 1,024.
    pub max_connections: usize,
    /// A request's head must arrive within this, and an idle kept-alive connection is closed
    /// after it. Default 10 s.
    pub header_read_timeout: Duration,
    /// A request's body must arrive within this of its handler starting. Default 10 s.
    pub body_read_timeout: Duration,
    /// A connection whose peer reads nothing of a reply for this long is closed. Default 10 s.
    pub write_stall_timeout: Duration,
    /// With a token, PUT and DELETE need a proof of it; without, anyone may write.
    pub token: Option<ClusterToken>,
}

/// Largest request head (request line and headers) the server buffers.
pub const MAX_REQUEST_HEAD: usize = 64 << 10;

/// How long a closing server waits for requests in flight.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

impl Default for MetadataServerConfig {
    fn default() -> Self {
        Self {
            max_key_bytes: 4 << 10,
            max_value_bytes: 4 << 20,
            max_keys: 100_000,
            max_total_bytes: 256 << 20,
            max_connections: 1024,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(10),
            write_stall_timeout: Duration::from_secs(10),
            token: None,
        }
    }
}

#[derive(serde::Deserialize)]
struct KeyQuery {
    key: Option<String>,
    prefix: Option<String>,
}

type Reply = (StatusCode, String);

fn reply(status: StatusCode, text: impl Into<String>) -> Reply {
    (status, text.into())
}

/// Bytes an entry counts for against [`MetadataServerConfig::max_total_bytes`].
fn size(key: &str, value: &str) -> usize {
    key.len().saturating_add(value.len())
}

/// How often expired entries are dropped, freeing the room they held.
const REAP_EVERY: Duration = Duration::from_millis(250);

/// What a write asks of the entry it replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Condition {
    /// Nothing: a plain write.
    Always,
    /// `If-None-Match: *`: that there is none.
    Absent,
    /// `If-Match: "<revision>"`: that it is still at that revision.
    At(u64),
}

/// The server's account of what it holds.
struct Held {
    /// Bytes of keys and values written through the routes, expired entries not yet dropped
    /// included.
    bytes: usize,
    /// When expired entries were last dropped.
    reaped: Instant,
}

/// What the routes share.
struct Served {
    store: Arc<MemoryStore>,
    config: MetadataServerConfig,
    checker: Option<ProofChecker>,
    /// Every write through the routes holds this lock from its checks to its update of the
    /// count, so the two agree.
    held: Mutex<Held>,
}

impl Served {
    fn key(&self, key: Option<String>) -> std::result::Result<String, Reply> {
        let key = key.ok_or_else(|| reply(StatusCode::BAD_REQUEST, "missing key"))?;
        self.bounded("key", key)
    }

    fn bounded(&self, what: &str, text: String) -> std::result::Result<String, Reply> {
        if text.len() > self.config.max_key_bytes {
            return Err(reply(
                StatusCode::URI_TOO_LONG,
                format!(
                    "a {what} of {} bytes is longer than the {} allowed",
                    text.len(),
                    self.config.max_key_bytes
                ),
            ));
        }
        Ok(text)
    }

    /// The one key a write names: a prefix is for reads.
    fn write_key(&self, query: KeyQuery) -> std::result::Result<String, Reply> {
        if query.prefix.is_some() {
            return Err(reply(
                StatusCode::BAD_REQUEST,
                "a write names one key, not a prefix",
            ));
        }
        self.key(query.key)
    }

    fn authorize(
        &self,
        method: &Method,
        key: &str,
        headers: &HeaderMap,
    ) -> std::result::Result<(), Reply> {
        let Some(checker) = &self.checker else {
            return Ok(());
        };
        let unauthorized = |why: &str| reply(StatusCode::UNAUTHORIZED, why);
        let proof = headers
            .get(PROOF_HEADER)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| unauthorized("this metadata server needs a cluster token proof"))?;
        checker
            .check(proof, &write_scope(method.as_str(), key))
            .map_err(|e| unauthorized(e.message()))
    }

    async fn value(&self, body: Body) -> std::result::Result<String, Reply> {
        let max = self.config.max_value_bytes;
        let too_large = || {
            reply(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("values are limited to {max} bytes"),
            )
        };
        if usize::try_from(body.size_hint().lower()).map_or(true, |declared| declared > max) {
            return Err(too_large());
        }
        let read = tokio::time::timeout(
            self.config.body_read_timeout,
            Limited::new(body, max).collect(),
        )
        .await
        .map_err(|_| {
            reply(
                StatusCode::REQUEST_TIMEOUT,
                "the value did not arrive in time",
            )
        })?;
        let bytes = match read {
            Ok(collected) => collected.to_bytes(),
            Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => return Err(too_large()),
            Err(e) => return Err(reply(StatusCode::BAD_REQUEST, e.to_string())),
        };
        String::from_utf8(bytes.into())
            .map_err(|_| reply(StatusCode::BAD_REQUEST, "value is not UTF-8"))
    }

    fn get(&self, key: &str) -> Response {
        match self.store.get_revisioned_now(key) {
            Some(read) => {
                (StatusCode::OK, [(ETAG, etag(read.revision))], read.value).into_response()
            }
            None => reply(StatusCode::NOT_FOUND, "metadata not found").into_response(),
        }
    }

    fn list(&self, prefix: &str) -> Response {
        let listed: Vec<Listed> = self
            .store
            .list_now(prefix)
            .into_iter()
            .map(|(key, value)| Listed { key, value })
            .collect();
        match serde_json::to_string(&listed) {
            Ok(json) => {
                (StatusCode::OK, [(CONTENT_TYPE, "application/json")], json).into_response()
            }
            Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
        }
    }

    fn lock_held(&self) -> std::sync::MutexGuard<'_, Held> {
        // The count is updated in one assignment: a panic cannot leave it half-done.
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Drops expired entries and what they held.
    fn reap(&self, held: &mut Held) {
        for (key, value) in self.store.expire_now() {
            held.bytes = held.bytes.saturating_sub(size(&key, &value));
        }
        held.reaped = Instant::now();
    }

    /// The routes may be mounted on a server with no reaping task of its own.
    fn reap_if_due(&self, held: &mut Held) {
        if held.reaped.elapsed() >= REAP_EVERY {
            self.reap(held);
        }
    }

    /// Whether an entry of `new` bytes fits in place of a live one of `old` bytes; when not,
    /// expired entries are dropped and it is asked again.
    fn room(
        &self,
        held: &mut Held,
        old: Option<usize>,
        new: usize,
    ) -> std::result::Result<(), Reply> {
        let fits = |held: &Held| {
            if old.is_none() && self.store.len() >= self.config.max_keys {
                return Err(format!(
                    "the metadata server holds its maximum of {} keys",
                    self.config.max_keys
                ));
            }
            held.bytes
                .saturating_sub(old.unwrap_or(0))
                .checked_add(new)
                .filter(|after| *after <= self.config.max_total_bytes)
                .map(drop)
                .ok_or_else(|| {
                    format!(
                        "the metadata server holds its maximum of {} bytes",
                        self.config.max_total_bytes
                    )
                })
        };
        if fits(held).is_ok() {
            return Ok(());
        }
        self.reap(held);
        fits(held).map_err(|why| reply(StatusCode::INSUFFICIENT_STORAGE, why))
    }

    /// Counts a write at `key` that displaced `old` (expired or not) and took `taken` bytes.
    fn account(held: &mut Held, key: &str, old: Option<String>, taken: usize) {
        let freed = old.map_or(0, |v| size(key, &v));
        held.bytes = held.bytes.saturating_sub(freed).saturating_add(taken);
    }

    fn put(&self, key: &str, value: String, ttl: Option<Duration>) -> Response {
        let mut held = self.lock_held();
        self.reap_if_due(&mut held);
        let old = self.store.get_now(key).map(|v| size(key, &v));
        let taken = size(key, &value);
        if let Err(refused) = self.room(&mut held, old, taken) {
            return refused.into_response();
        }
        let displaced = match ttl {
            None => self.store.put_now(key, value),
            Some(ttl) => self.store.put_expiring_now(key, value, ttl),
        };
        Self::account(&mut held, key, displaced, taken);
        match ttl {
            None => reply(StatusCode::OK, "metadata updated").into_response(),
            Some(ttl) => (
                StatusCode::OK,
                [(TTL_HEADER, ttl.as_millis().to_string())],
                "metadata updated",
            )
                .into_response(),
        }
    }

    fn delete(&self, key: &str) -> Response {
        let mut held = self.lock_held();
        self.reap_if_due(&mut held);
        let live = self.store.get_now(key).is_some();
        let displaced = self.store.delete_now(key);
        Self::account(&mut held, key, displaced, 0);
        if live {
            reply(StatusCode::OK, "metadata deleted").into_response()
        } else {
            reply(StatusCode::NOT_FOUND, "metadata not found").into_response()
        }
    }

    /// A conditional PUT (`new` set) or DELETE: 200 when the condition held, 412 when not,
    /// both marked with [`CONDITION_HEADER`].
    fn swap(&self, key: &str, condition: Condition, new: Option<String>) -> Response {
        let expected = match condition {
            Condition::At(revision) => Some(revision),
            Condition::Absent | Condition::Always => None,
        };
        let checked = |status: StatusCode, text: &'static str| {
            (status, [(CONDITION_HEADER, "checked")], text).into_response()
        };
        let failed = || checked(StatusCode::PRECONDITION_FAILED, "metadata changed");
        let mut held = self.lock_held();
        self.reap_if_due(&mut held);
        let current = self.store.get_revisioned_now(key);
        if current.as_ref().map(|c| c.revision) != expected {
            return failed();
        }
        let taken = new.as_ref().map_or(0, |v| size(key, v));
        if new.is_some() {
            let old = current.as_ref().map(|c| size(key, &c.value));
            if let Err(refused) = self.room(&mut held, old, taken) {
                return refused.into_response();
            }
        }
        match self.store.swap_now(key, expected, new) {
            // It expired a moment ago.
            None => failed(),
            Some(displaced) => {
                Self::account(&mut held, key, displaced, taken);
                checked(StatusCode::OK, "metadata updated")
            }
        }
    }
}

/// The condition a write's headers set.
fn condition(headers: &HeaderMap) -> std::result::Result<Condition, Reply> {
    let bad = |why: &str| reply(StatusCode::BAD_REQUEST, why);
    let text = |value: &HeaderValue| value.to_str().map(str::trim).unwrap_or_default().to_owned();
    match (headers.get(IF_MATCH), headers.get(IF_NONE_MATCH)) {
        (None, None) => Ok(Condition::Always),
        (Some(_), Some(_)) => Err(bad("a write takes If-Match or If-None-Match, not both")),
        (None, Some(tag)) if text(tag) == "*" => Ok(Condition::Absent),
        (None, Some(_)) => Err(bad("If-None-Match on a write must be *")),
        (Some(tag), None) => revision_of(&text(tag))
            .map(Condition::At)
            .ok_or_else(|| bad("If-Match must be one revision as read, like \"17\"")),
    }
}

/// The expiry a PUT's headers ask for.
fn ttl(headers: &HeaderMap) -> std::result::Result<Option<Duration>, Reply> {
    let Some(value) = headers.get(TTL_HEADER) else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|millis| Some(Duration::from_millis(millis)))
        .ok_or_else(|| {
            reply(
                StatusCode::BAD_REQUEST,
                format!("{TTL_HEADER} must be a whole number of milliseconds"),
            )
        })
}

/// The metadata routes (`/metadata`, `/health`) over `store`, with the default caps and no
/// token. Keys are unescaped, so a key escaped as Mooncake's client does and one escaped
/// further name the same entry.
pub fn router(store: Arc<MemoryStore>) -> Router {
    router_with(store, MetadataServerConfig::default())
}

/// The metadata routes over `store`, bounded by `config`. The byte cap counts what is written
/// through these routes: `store` should start empty.
pub fn router_with(store: Arc<MemoryStore>, config: MetadataServerConfig) -> Router {
    routes(served(store, config))
}

fn served(store: Arc<MemoryStore>, config: MetadataServerConfig) -> Arc<Served> {
    let checker = config.token.clone().map(ProofChecker::new);
    Arc::new(Served {
        store,
        config,
        checker,
        held: Mutex::new(Held {
            bytes: 0,
            reaped: Instant::now(),
        }),
    })
}

fn routes(served: Arc<Served>) -> Router {
    async fn get_key(State(s): State<Arc<Served>>, Query(q): Query<KeyQuery>) -> Response {
        match (q.key, q.prefix) {
            (Some(_), Some(_)) => {
                reply(StatusCode::BAD_REQUEST, "name a key or a prefix, not both").into_response()
            }
            (None, Some(prefix)) => match s.bounded("prefix", prefix) {
                Ok(prefix) => s.list(&prefix),
                Err(refused) => refused.into_response(),
            },
            (key, None) => match s.key(key) {
                Ok(key) => s.get(&key),
                Err(refused) => refused.into_response(),
            },
        }
    }
    async fn put_key(
        State(s): State<Arc<Served>>,
        Query(q): Query<KeyQuery>,
        headers: HeaderMap,
        body: Body,
    ) -> Response {
        // Key, proof and headers first: nobody makes the server buffer a value it would
        // refuse.
        let checked = s.write_key(q).and_then(|key| {
            s.authorize(&Method::PUT, &key, &headers)?;
            let condition = condition(&headers)?;
            let ttl = ttl(&headers)?;
            if condition != Condition::Always && ttl.is_some() {
                return Err(reply(
                    StatusCode::BAD_REQUEST,
                    "a conditional write cannot expire",
                ));
            }
            Ok((key, condition, ttl))
        });
        let (key, condition, ttl) = match checked {
            Ok(checked) => checked,
            Err(refused) => return refused.into_response(),
        };
        match s.value(body).await {
            Ok(value) if condition == Condition::Always => s.put(&key, value, ttl),
            Ok(value) => s.swap(&key, condition, Some(value)),
            Err(refused) => refused.into_response(),
        }
    }
    async fn delete_key(
        State(s): State<Arc<Served>>,
        Query(q): Query<KeyQuery>,
        headers: HeaderMap,
    ) -> Response {
        let checked = s.write_key(q).and_then(|key| {
            s.authorize(&Method::DELETE, &key, &headers)?;
            Ok((key, condition(&headers)?))
        });
        match checked {
            Ok((key, Condition::Always)) => s.delete(&key),
            Ok((key, condition)) => s.swap(&key, condition, None),
            Err(refused) => refused.into_response(),
        }
    }
    Router::new()
        .route("/metadata", get(get_key).put(put_key).delete(delete_key))
        .route("/health", get(|| async { "OK" }))
        .with_state(served)
}

/// Drops expired entries every [`REAP_EVERY`] until `stop`.
async fn reap_every(served: Arc<Served>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(REAP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {
                let mut held = served.lock_held();
                served.reap(&mut held);
            }
        }
    }
}

/// An embedded HTTP metadata server.
pub struct MetadataServer {
    addr: SocketAddr,
    store: Arc<MemoryStore>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl MetadataServer {
    /// Listens on `host:port` (port 0 picks a free one) with the default caps and no token,
    /// and serves until [`close`](Self::close).
    pub async fn start(host: &str, port: u16) -> Result<Self> {
        Self::start_with(host, port, MetadataServerConfig::default()).await
    }

    /// Listens on `host:port` (port 0 picks a free one) bounded by `config`.
    pub async fn start_with(host: &str, port: u16, config: MetadataServerConfig) -> Result<Self> {
        if config.max_connections == 0 {
            return Err(Error::invalid(
                "a metadata server needs at least one connection",
            ));
        }
        let listener = tokio::net::TcpListener::bind((host, port))
            .await
            .map_err(|e| Error::socket(format!("bind metadata server on {host}:{port}"), e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::socket("metadata server address", e))?;
        let store = Arc::new(MemoryStore::default());
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let limits = Limits {
            connections: Arc::new(Semaphore::new(config.max_connections)),
            header_read_timeout: config.header_read_timeout,
            write_stall_timeout: config.write_stall_timeout,
        };
        let served = served(store.clone(), config);
        let app = routes(served.clone());
        tracker.spawn(reap_every(served, shutdown.clone()));
        tracker.spawn(accept(
            listener,
            app,
            limits,
            shutdown.clone(),
            tracker.clone(),
        ));
        tracing::info!(%addr, "HTTP metadata server listening");
        Ok(Self {
            addr,
            store,
            shutdown,
            tracker,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The URL engines pass as `metadata`.
    pub fn url(&self) -> String {
        format!("http://{}/metadata", self.addr)
    }

    /// The stored entries.
    pub fn store(&self) -> &Arc<MemoryStore> {
        &self.store
    }

    /// Stops accepting, gives requests in flight a moment to finish, and waits for every
    /// connection task.
    pub async fn close(self) {
        self.shutdown.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

/// Per-connection bounds of a running server.
struct Limits {
    connections: Arc<Semaphore>,
    header_read_timeout: Duration,
    write_stall_timeout: Duration,
}

async fn accept(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: Limits,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(MAX_REQUEST_HEAD);
    let service = TowerToHyperService::new(app);
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors, most likely: let some connections end first.
                    tracing::warn!("metadata server accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = limits.connections.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "metadata server at its connection cap; closing");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let io = TokioIo::new(StallGuard::new(stream, limits.write_stall_timeout));
        let conn = http.serve_connection(io, service.clone());
        let stop = stop.clone();
        tracker.spawn(async move {
            let _permit = permit;
            let mut conn = std::pin::pin!(conn);
            let served = tokio::select! {
                served = conn.as_mut() => served,
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    match tokio::time::timeout(CLOSE_GRACE, conn.as_mut()).await {
                        Ok(served) => served,
                        Err(_) => Ok(()),
                    }
                }
            };
            if let Err(e) = served {
                tracing::debug!(%peer, "metadata connection ended: {e}");
            }
        });
    }
}

/// A stream whose writes fail once the peer has read nothing for `stall`, so a peer that
/// stops reading a reply cannot hold its connection forever.
struct StallGuard<S> {
    inner: S,
    stall: Duration,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> StallGuard<S> {
    fn new(inner: S, stall: Duration) -> Self {
        Self {
            inner,
            stall,
            deadline: None,
        }
    }

    fn progress<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.deadline = None;
            return polled;
        }
        let stall = self.stall;
        let deadline = self
            .deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(stall)));
        match deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the peer stopped reading",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for StallGuard<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for StallGuard<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.progress(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.progress(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_flush(cx);
        this.progress(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.progress(cx, polled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn client_and_server_speak_mooncake_http() {
        let server = MetadataServer::start("127.0.0.1", 0).await.unwrap();
        let client = HttpStore::new(&server.url()).unwrap();
        let key = "mooncake/ram/host a&b";
        assert_eq!(client.get(key).await.unwrap(), None);
        client.put(key, "{\"x\":1}").await.unwrap();
        assert_eq!(server.store().get_now(key).as_deref(), Some("{\"x\":1}"));
        assert_eq!(client.get(key).await.unwrap().as_deref(), Some("{\"x\":1}"));
        client.delete(key).await.unwrap();
        assert_eq!(client.get(key).await.unwrap(), None);
        server.close().await;
        let err = client.get(key).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Metadata);
    }

    #[test]
    fn keys_are_escaped_as_curl_does() {
        assert_eq!(
            escape("mooncake/ram/node-1.a_b~c d+e:f@g%"),
            "mooncake%2Fram%2Fnode-1.a_b~c%20d%2Be%3Af%40g%25"
        );
    }

    #[tokio::test]
    async fn the_server_finds_a_key_however_it_was_escaped() {
        let server = MetadataServer::start("127.0.0.1", 0).await.unwrap();
        let client = HttpStore::new(&server.url()).unwrap();
        client.put("mooncake/ram/node-1.x_y~z", "{}").await.unwrap();
        let base = server.url();
        let http: Client<HttpConnector, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build(HttpConnector::new());
        for spelling in [
            "mooncake%2Fram%2Fnode-1.x_y~z",
            "mooncake%2Fram%2Fnode%2D1%2Ex%5Fy%7Ez",
        ] {
            let uri: hyper::Uri = format!("{base}?key={spelling}").parse().unwrap();
            let response = http.get(uri).await.unwrap();
            assert_eq!(response.status(), StatusCode::OK, "{spelling}");
        }
        server.close().await;
    }

    async fn raw(addr: SocketAddr, request: &[u8]) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.write_all(request).await.unwrap();
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
            .await
            .expect("the server answers and closes");
        String::from_utf8_lossy(&answer).into_owned()
    }

    #[tokio::test]
    async fn caps_refuse_large_values_and_a_full_store_and_change_nothing() {
        let config = MetadataServerConfig {
            max_key_bytes: 64,
            max_value_bytes: 1000,
            max_keys: 3,
            max_total_bytes: 2100,
            ..MetadataServerConfig::default()
        };
        let server = MetadataServer::start_with("127.0.0.1", 0, config)
            .await
            .unwrap();
        let client = HttpStore::new(&server.url()).unwrap();
        let big = "x".repeat(1001);
        let err = client.put("a", &big).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
        assert!(err.message().contains("413"), "{err}");
        let err = client.put(&"k".repeat(65), "{}").await.unwrap_err();
        assert!(err.message().contains("414"), "{err}");
        assert!(server.store().is_empty());

        let value = "v".repeat(999);
        client.put("a", &value).await.unwrap();
        client.put("b", &value).await.unwrap();
        // 2 x 1000 bytes held; a third 1000 would pass 2100.
        let err = client.put("c", &value).await.unwrap_err();
        assert!(err.message().contains("507"), "{err}");
        client.put("c", "small").await.unwrap();
        let err = client.put("d", "1").await.unwrap_err();
        assert!(err.message().contains("507"), "{err}");
        assert_eq!(server.store().len(), 3);
        // Rewriting a held key needs no new room; deleting one frees its bytes and slot.
        client.put("a", "short").await.unwrap();
        client.put("b", "short").await.unwrap();
        client.put("d", "1").await.unwrap_err();
        client.delete("c").await.unwrap();
        client.put("d", &value).await.unwrap();
        client.put("e", "1").await.unwrap_err();
        assert_eq!(
            client.get("d").await.unwrap().as_deref(),
            Some(value.as_str())
        );

        // A declared length past the cap is refused before the body is read.
        let head = format!(
            "PUT /metadata?key=z HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            1 << 30
        );
        let answer = raw(server.local_addr(), head.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
        server.close().await;
    }

    #[tokio::test]
    async fn half_sent_requests_are_dropped_and_connections_capped() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let config = MetadataServerConfig {
            max_connections: 4,
            header_read_timeout: Duration::from_millis(300),
            body_read_timeout: Duration::from_millis(300),
            ..MetadataServerConfig::default()
        };
        let server = MetadataServer::start_with("127.0.0.1", 0, config)
            .await
            .unwrap();
        let addr = server.local_addr();
        let mut hung = Vec::new();
        for i in 0..20 {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let partial = if i % 2 == 0 {
                "PUT /metadata?key=a HTTP/1.1\r\nhost: x\r\n".to_owned()
            } else {
                "PUT /metadata?key=a HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{".to_owned()
            };
            // The server may already have closed a connection over its cap.
            let _ = stream.write_all(partial.as_bytes()).await;
            hung.push(stream);
        }
        for mut stream in hung {
            let mut rest = Vec::new();
            let ended =
                tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest)).await;
            assert!(ended.is_ok(), "a half-sent request was kept open");
            let rest = String::from_utf8_lossy(&rest);
            assert!(
                rest.is_empty() || rest.starts_with("HTTP/1.1 408"),
                "{rest}"
            );
        }
        assert!(server.store().is_empty());
        // The slots are free again.
        let client = HttpStore::new(&server.url()).unwrap();
        client.put("a", "{}").await.unwrap();
        server.close().await;
    }

    #[tokio::test]
    async fn with_a_token_writes_need_a_fresh_proof_for_their_key() {
        let token = ClusterToken::new("a-secret-of-enough-length").unwrap();
        let config = MetadataServerConfig {
            token: Some(token.clone()),
            ..MetadataServerConfig::default()
        };
        let server = MetadataServer::start_with("127.0.0.1", 0, config)
            .await
            .unwrap();
        let (url, addr) = (server.url(), server.local_addr());
        let anonymous = HttpStore::new(&url).unwrap();
        let impostor = HttpStore::with_token(
            &url,
            Some(ClusterToken::new("another-secret-of-enough-length").unwrap()),
        )
        .unwrap();
        let member = HttpStore::with_token(&url, Some(token.clone())).unwrap();
        for client in [&anonymous, &impostor] {
            let err = client.put("k", "{}").await.unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Unauthenticated, "{err}");
        }
        assert!(server.store().is_empty());
        member.put("k", "{\"a\":1}").await.unwrap();
        // Reads stay open.
        assert_eq!(
            anonymous.get("k").await.unwrap().as_deref(),
            Some("{\"a\":1}")
        );
        for client in [&anonymous, &impostor] {
            let err = client.delete("k").await.unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Unauthenticated, "{err}");
        }
        assert!(server.store().get_now("k").is_some());

        // A proof binds its method and key, and holds once.
        let put = |key: &str, proof: &str| {
            format!(
                "PUT /metadata?key={key} HTTP/1.1\r\nhost: x\r\n{PROOF_HEADER}: {proof}\r\n\
                 content-length: 2\r\nconnection: close\r\n\r\n{{}}"
            )
        };
        let proof = token.prove(&write_scope("PUT", "other")).unwrap();
        let answer = raw(addr, put("k", &proof).as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
        let delete = token.prove(&write_scope("DELETE", "k")).unwrap();
        let answer = raw(addr, put("k", &delete).as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
        let answer = raw(addr, put("other", &proof).as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        let answer = raw(addr, put("other", &proof).as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 401"), "replayed: {answer}");
        assert_eq!(server.store().get_now("k").as_deref(), Some("{\"a\":1}"));

        member.delete("k").await.unwrap();
        assert_eq!(member.get("k").await.unwrap(), None);
        server.close().await;
    }

    fn rss_mib() -> u64 {
        mooncake_testkit::rss_kib() >> 10
    }

    /// The hostile figures with the default caps: `cargo test -p mooncake-metadata --lib
    /// hostile_figures -- --ignored --nocapture`.
    #[tokio::test(flavor = "multi_thread")]
    #[ignore = "prints figures; moves 570 MB"]
    async fn hostile_figures() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let server = MetadataServer::start("127.0.0.1", 0).await.unwrap();
        let client = HttpStore::new(&server.url()).unwrap();
        let before = rss_mib();
        let value = "v".repeat(1_900_000);
        let mut refused = 0;
        for i in 0..300 {
            if client.put(&format!("k{i}"), &value).await.is_err() {
                refused += 1;
            }
        }
        println!(
            "300 x 1.9 MB PUTs: {} stored, {refused} refused, RSS {before} -> {} MiB",
            server.store().len(),
            rss_mib()
        );
        let started = std::time::Instant::now();
        let mut hung = Vec::new();
        for _ in 0..1000 {
            let mut stream = tokio::net::TcpStream::connect(server.local_addr())
                .await
                .unwrap();
            let _ = stream
                .write_all(b"GET /metadata?key=a HTTP/1.1\r\nhost: x\r\n")
                .await;
            hung.push(stream);
        }
        let mut open = 1000;
        for mut stream in hung {
            let mut rest = Vec::new();
            if tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut rest))
                .await
                .is_ok()
            {
                open -= 1;
            }
        }
        println!(
            "1000 half-sent requests: {open} still open after {:.1} s",
            started.elapsed().as_secs_f64()
        );
        server.close().await;
    }

    #[test]
    fn bad_urls_are_rejected() {
        assert!(HttpStore::new("ftp://x/metadata").is_err());
        assert!(HttpStore::new("not a url").is_err());
    }
}
