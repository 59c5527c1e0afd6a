//! Mooncake's HTTP metadata protocol: `GET/PUT/DELETE <url>?key=<escaped key>`, the value as
//! the body, 200 on success and 404 for a missing key.
//!
//! [`HttpStore`] is the client side; [`MetadataServer`] the embedded server, whose routes
//! ([`router`]) other servers (the store master) can mount too.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{Method, Request, StatusCode};
use axum::routing::get;
use axum::Router;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use mooncake_common::{Error, ErrorKind, Result};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use tokio_util::sync::CancellationToken;

use crate::store::{BoxFuture, MemoryStore, MetadataStore};

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

/// Client of an HTTP metadata server.
pub struct HttpStore {
    url: String,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl HttpStore {
    /// A client for `url` (`http://host:port/metadata`). Connections are kept alive.
    pub fn new(url: &str) -> Result<Self> {
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
        })
    }

    async fn call(&self, method: Method, key: &str, body: Option<&str>) -> Result<Option<Bytes>> {
        let uri = format!("{}?key={}", self.url, escape(key));
        let mut request = Request::builder().method(method.clone()).uri(&uri);
        if body.is_some() {
            request = request.header("content-type", "application/json");
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default().to_owned())))
            .map_err(|e| Error::invalid(format!("metadata request to {uri}: {e}")))?;
        let exchange = async {
            let response = self.client.request(request).await.map_err(|e| {
                Error::new(ErrorKind::Metadata, format!("{method} {uri}: {e}")).with_source(e)
            })?;
            let status = response.status();
            let bytes = response
                .into_body()
                .collect()
                .await
                .map_err(|e| Error::new(ErrorKind::Metadata, format!("{method} {uri}: {e}")))?
                .to_bytes();
            match status {
                StatusCode::OK => Ok(Some(bytes)),
                StatusCode::NOT_FOUND => Ok(None),
                other => Err(Error::new(
                    ErrorKind::Metadata,
                    format!("{method} {uri}: HTTP {other}"),
                )),
            }
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| Error::new(ErrorKind::Metadata, format!("{method} {uri}: timed out")))?
    }
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
}

#[derive(serde::Deserialize)]
struct KeyQuery {
    key: Option<String>,
}

/// The metadata routes (`/metadata`, `/health`) over `store`. Keys are unescaped, so a key
/// escaped as Mooncake's client does and one escaped further name the same entry.
pub fn router(store: Arc<MemoryStore>) -> Router {
    async fn get_key(
        State(store): State<Arc<MemoryStore>>,
        Query(q): Query<KeyQuery>,
    ) -> (StatusCode, String) {
        match q.key {
            None => (StatusCode::BAD_REQUEST, "missing key".to_owned()),
            Some(key) => match store.get_now(&key) {
                Some(value) => (StatusCode::OK, value),
                None => (StatusCode::NOT_FOUND, "metadata not found".to_owned()),
            },
        }
    }
    async fn put_key(
        State(store): State<Arc<MemoryStore>>,
        Query(q): Query<KeyQuery>,
        body: Bytes,
    ) -> (StatusCode, &'static str) {
        let Some(key) = q.key else {
            return (StatusCode::BAD_REQUEST, "missing key");
        };
        match String::from_utf8(body.to_vec()) {
            Ok(value) => {
                store.put_now(&key, value);
                (StatusCode::OK, "metadata updated")
            }
            Err(_) => (StatusCode::BAD_REQUEST, "value is not UTF-8"),
        }
    }
    async fn delete_key(
        State(store): State<Arc<MemoryStore>>,
        Query(q): Query<KeyQuery>,
    ) -> (StatusCode, &'static str) {
        match q.key {
            None => (StatusCode::BAD_REQUEST, "missing key"),
            Some(key) if store.delete_now(&key) => (StatusCode::OK, "metadata deleted"),
            Some(_) => (StatusCode::NOT_FOUND, "metadata not found"),
        }
    }
    Router::new()
        .route("/metadata", get(get_key).put(put_key).delete(delete_key))
        .route("/health", get(|| async { "OK" }))
        .with_state(store)
}

/// An embedded HTTP metadata server.
pub struct MetadataServer {
    addr: SocketAddr,
    store: Arc<MemoryStore>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl MetadataServer {
    /// Listens on `host:port` (port 0 picks a free one) and serves until [`close`](Self::close).
    pub async fn start(host: &str, port: u16) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind((host, port))
            .await
            .map_err(|e| Error::socket(format!("bind metadata server on {host}:{port}"), e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::socket("metadata server address", e))?;
        let store = Arc::new(MemoryStore::default());
        let shutdown = CancellationToken::new();
        let app = router(store.clone());
        let stop = shutdown.clone();
        let task = tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
            if let Err(e) = served {
                tracing::warn!("metadata server stopped: {e}");
            }
        });
        tracing::info!(%addr, "HTTP metadata server listening");
        Ok(Self {
            addr,
            store,
            shutdown,
            task,
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

    /// Stops accepting, lets in-flight requests finish, and waits for the server task.
    pub async fn close(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
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

    #[test]
    fn bad_urls_are_rejected() {
        assert!(HttpStore::new("ftp://x/metadata").is_err());
        assert!(HttpStore::new("not a url").is_err());
    }
}
