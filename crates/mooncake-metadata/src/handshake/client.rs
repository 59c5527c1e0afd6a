//! One handshake exchange with a peer.

use std::time::Duration;

use mooncake_common::auth::ClusterToken;
use mooncake_common::service::opening;
use mooncake_common::{Error, ErrorKind, Result};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::frame::{self, MessageType};
use super::server::read_frame;

/// Mooncake's client receive timeout.
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// Sends `body` as a `kind` message to `addr` (`host:port`) and returns the reply's JSON.
/// With `token`, the connection opens with the token's challenge-response, and a peer that
/// cannot prove it holds the token fails the request with `ERR_UNAUTHENTICATED`.
pub async fn request(
    addr: &str,
    kind: MessageType,
    body: &str,
    connect_timeout: Duration,
    max_frame: usize,
    token: Option<&ClusterToken>,
) -> Result<String> {
    let targets: Vec<_> = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| Error::new(ErrorKind::Dns, format!("resolve {addr}: {e}")).with_source(e))?
        .collect();
    let mut last = Error::new(ErrorKind::Dns, format!("{addr} resolved to no address"));
    let mut stream = None;
    for target in targets {
        match tokio::time::timeout(connect_timeout, TcpStream::connect(target)).await {
            Ok(Ok(s)) => {
                stream = Some(s);
                break;
            }
            Ok(Err(e)) => last = Error::socket(format!("connect to {target}"), e),
            Err(_) => {
                last = Error::new(
                    ErrorKind::Socket,
                    format!("connect to {target} timed out after {connect_timeout:?}"),
                )
            }
        }
    }
    let mut stream = stream.ok_or(last)?;
    let _ = stream.set_nodelay(true);
    if let Some(token) = token {
        tokio::time::timeout(connect_timeout, opening::open(&mut stream, token))
            .await
            .map_err(|_| {
                Error::new(
                    ErrorKind::Unauthenticated,
                    format!("{addr} did not answer the cluster token's challenge in time"),
                )
            })?
            .map_err(|e| {
                Error::new(
                    ErrorKind::Unauthenticated,
                    format!("{addr}: {}", e.message()),
                )
            })?;
    }
    let exchange = async {
        stream
            .write_all(&frame::encode(kind, body.as_bytes()))
            .await
            .map_err(|e| Error::socket(format!("send {kind:?} to {addr}"), e))?;
        read_frame(&mut stream, max_frame, None).await.map_err(|e| {
            // A peer with a token says nothing to a client without one: it hangs up.
            let hint = if token.is_none() {
                " (a peer that requires a cluster token hangs up on clients without it)"
            } else {
                ""
            };
            Error::new(ErrorKind::Socket, format!("reply from {addr}: {e}{hint}"))
        })
    };
    let reply = tokio::time::timeout(REPLY_TIMEOUT, exchange)
        .await
        .map_err(|_| Error::new(ErrorKind::Socket, format!("{addr} did not reply in time")))??;
    if reply.kind != kind {
        return Err(Error::new(
            ErrorKind::Protocol,
            format!("{addr} replied with {:?} to {kind:?}", reply.kind),
        ));
    }
    String::from_utf8(reply.body).map_err(|_| {
        Error::new(
            ErrorKind::MalformedJson,
            format!("reply from {addr} is not UTF-8"),
        )
    })
}
