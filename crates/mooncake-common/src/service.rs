//! The accept loop every TCP listener of the project runs.
//!
//! A [`Service`] accepts connections until closed, runs a handler per connection, caps how many
//! run at once, and on [`Service::close`] stops accepting, cancels every handler and waits for
//! them (the mini-redis shutdown pattern). Handlers stop where they stand when cancelled, so a
//! peer that stalls never holds up a close. Dropping a service cancels it without waiting.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::{Error, Result};

/// A running accept loop.
pub struct Service {
    addr: SocketAddr,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl Service {
    /// Serves `listener`, running `handler` for each connection, at most `max_connections` at
    /// once (further connections wait in the listen backlog).
    pub fn start<H, F>(listener: TcpListener, max_connections: usize, handler: H) -> Result<Self>
    where
        H: Fn(TcpStream, SocketAddr) -> F + Send + Sync + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        let addr = listener
            .local_addr()
            .map_err(|e| Error::socket("listener address", e))?;
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
                    accepted = listener.accept() => match accepted {
                        Ok(pair) => pair,
                        Err(e) => {
                            // Out of descriptors and the like: back off instead of spinning.
                            tracing::warn!(%addr, "accept failed: {e}");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                };
                let _ = stream.set_nodelay(true);
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
        Ok(Self {
            addr,
            shutdown,
            tracker,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
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
        let service = Service::start(listener, 4, |mut stream, _| async move {
            let mut byte = [0u8; 1];
            while stream.read_exact(&mut byte).await.is_ok() {
                let _ = stream.write_all(&byte).await;
            }
        })
        .unwrap();
        let mut echo = TcpStream::connect(service.local_addr()).await.unwrap();
        echo.write_all(b"x").await.unwrap();
        let mut back = [0u8; 1];
        echo.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"x");
        let _stalled = TcpStream::connect(service.local_addr()).await.unwrap();
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
