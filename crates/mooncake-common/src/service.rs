//! The accept loop every listener of the project runs (TCP and Unix sockets).
//!
//! A [`Service`] accepts connections until closed, runs a handler per connection, caps how many
//! run at once, and on [`Service::close`] stops accepting, cancels every handler and waits for
//! them (the mini-redis shutdown pattern). Handlers stop where they stand when cancelled, so a
//! peer that stalls never holds up a close. Dropping a service cancels it without waiting.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A listener the accept loop can drive.
pub trait Listener: Send + 'static {
    /// An accepted connection.
    type Stream: Send + 'static;
    /// Accepts the next connection, with a description of the peer for logs.
    fn accept_one(&self) -> impl Future<Output = std::io::Result<(Self::Stream, String)>> + Send;
}

impl Listener for TcpListener {
    type Stream = TcpStream;

    async fn accept_one(&self) -> std::io::Result<(TcpStream, String)> {
        let (stream, peer) = self.accept().await?;
        let _ = stream.set_nodelay(true);
        Ok((stream, peer.to_string()))
    }
}

impl Listener for UnixListener {
    type Stream = UnixStream;

    async fn accept_one(&self) -> std::io::Result<(UnixStream, String)> {
        let (stream, _) = self.accept().await?;
        let peer = stream
            .peer_cred()
            .ok()
            .and_then(|cred| cred.pid())
            .map_or_else(|| "unix peer".to_owned(), |pid| format!("pid {pid}"));
        Ok((stream, peer))
    }
}

/// A running accept loop.
pub struct Service {
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl Service {
    /// Serves `listener`, running `handler` for each connection, at most `max_connections` at
    /// once (further connections wait in the listen backlog).
    pub fn start<L, H, F>(listener: L, max_connections: usize, handler: H) -> Self
    where
        L: Listener,
        H: Fn(L::Stream, String) -> F + Send + Sync + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let limit = Arc::new(Semaphore::new(max_connections.max(1)));
        let (stop, connections) = (shutdown.clone(), tracker.clone());
        tracker.spawn(async move {
            loop {
                let permit = tokio::select! {
                    _ = stop.cancelled() => break,
                    permit = limit.clone().acquire_owned() => match permit {
                        Ok(permit) => permit,
                        Err(_) => break,
                    },
                };
                let (stream, peer) = tokio::select! {
                    _ = stop.cancelled() => break,
                    accepted = listener.accept_one() => match accepted {
                        Ok(pair) => pair,
                        Err(e) => {
                            // Out of descriptors and the like: back off instead of spinning.
                            tracing::warn!("accept failed: {e}");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                };
                let (stop, handled) = (stop.clone(), handler(stream, peer));
                connections.spawn(async move {
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        () = handled => {}
                    }
                    drop(permit);
                });
            }
        });
        tracker.close();
        Self { shutdown, tracker }
    }

    /// Stops accepting, cancels every handler and waits for them.
    pub async fn close(&self) {
        self.shutdown.cancel();
        self.tracker.wait().await;
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn serves_until_closed_even_with_stalled_peers() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = Service::start(listener, 4, |mut stream: TcpStream, _| async move {
            let mut byte = [0u8; 1];
            while stream.read_exact(&mut byte).await.is_ok() {
                let _ = stream.write_all(&byte).await;
            }
        });
        let mut echo = TcpStream::connect(addr).await.unwrap();
        echo.write_all(b"x").await.unwrap();
        let mut back = [0u8; 1];
        echo.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"x");
        let _stalled = TcpStream::connect(addr).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), service.close())
            .await
            .expect("close must not wait for peers");
        assert_eq!(
            echo.read(&mut back).await.unwrap_or(0),
            0,
            "connections are dropped on close"
        );
    }
}
