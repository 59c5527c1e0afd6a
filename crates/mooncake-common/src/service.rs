//! The accept loop every listener of the project runs (TCP and Unix sockets).
//!
//! A [`Service`] accepts connections until closed, runs a handler per connection, and on
//! [`Service::close`] stops accepting, cancels every handler and waits for them (the
//! mini-redis shutdown pattern). Handlers stop where they stand when cancelled, so a peer that
//! stalls never holds up a close. Dropping a service cancels it without waiting.
//!
//! Admission never stops the loop. A connection over its peer's cap takes the place of that
//! peer's longest-silent connection; one over the total cap takes the place of the
//! longest-silent connection of anyone, if that one has been silent for
//! [`Limits::reclaim_after`] and has not proven the cluster token (see
//! [`Activity::authenticated`]), and is closed at once otherwise. A peer that opens connections
//! and stalls them thus costs only itself (its own older connections go first, and the per-peer
//! cap keeps it from filling the listener), and nothing waits in the listen backlog behind it.
//! Handlers report progress on their [`Activity`].

pub mod opening;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Who is on the other end of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// For logs: `ip:port`, `pid N`.
    pub label: String,
    /// What the per-peer cap counts by: the IP address, the process.
    pub key: String,
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.label)
    }
}

/// A listener the accept loop can drive.
pub trait Listener: Send + 'static {
    /// An accepted connection.
    type Stream: Send + 'static;
    /// Accepts the next connection, with who sent it.
    fn accept_one(&self) -> impl Future<Output = std::io::Result<(Self::Stream, Peer)>> + Send;
}

impl Listener for TcpListener {
    type Stream = TcpStream;

    async fn accept_one(&self) -> std::io::Result<(TcpStream, Peer)> {
        let (stream, peer) = self.accept().await?;
        let _ = stream.set_nodelay(true);
        let key = peer.ip().to_canonical().to_string();
        Ok((
            stream,
            Peer {
                label: peer.to_string(),
                key,
            },
        ))
    }
}

impl Listener for UnixListener {
    type Stream = UnixStream;

    async fn accept_one(&self) -> std::io::Result<(UnixStream, Peer)> {
        let (stream, _) = self.accept().await?;
        let cred = stream.peer_cred().ok();
        let label = cred
            .and_then(|cred| cred.pid())
            .map_or_else(|| "unix peer".to_owned(), |pid| format!("pid {pid}"));
        Ok((
            stream,
            Peer {
                key: label.clone(),
                label,
            },
        ))
    }
}

/// How many connections a service holds, and when it may close one to admit another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once.
    pub max_connections: usize,
    /// Connections served at once for one peer ([`Peer::key`]).
    pub max_per_peer: usize,
    /// Over a cap, a connection silent at least this long makes room for a new one.
    pub reclaim_after: Duration,
}

impl Limits {
    /// `max_connections` in all, `max_per_peer` per peer, reclaiming after 250 ms of silence.
    pub fn new(max_connections: usize, max_per_peer: usize) -> Self {
        Self {
            max_connections: max_connections.max(1),
            max_per_peer: max_per_peer.clamp(1, max_connections.max(1)),
            reclaim_after: Duration::from_millis(250),
        }
    }
}

/// When a connection last made progress; handlers [`touch`](Activity::touch) it.
#[derive(Debug, Clone)]
pub struct Activity {
    epoch: Instant,
    last_ms: Arc<AtomicU64>,
    authenticated: Arc<AtomicBool>,
}

impl Activity {
    fn new(epoch: Instant) -> Self {
        let activity = Self {
            epoch,
            last_ms: Arc::new(AtomicU64::new(0)),
            authenticated: Arc::new(AtomicBool::new(false)),
        };
        activity.touch();
        activity
    }

    /// A handle not tied to any service (for handlers run outside one, and tests).
    pub fn detached() -> Self {
        Self::new(Instant::now())
    }

    /// Records progress now.
    pub fn touch(&self) {
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(now, Ordering::Relaxed);
    }

    /// Records that the peer proved the cluster token: from now on only its own newer
    /// connections may take this one's place, however long it stays quiet (an idle lane or a
    /// watch connection is not a stalled attacker).
    pub fn authenticated(&self) {
        self.authenticated.store(true, Ordering::Relaxed);
        self.touch();
    }

    fn is_authenticated(&self) -> bool {
        self.authenticated.load(Ordering::Relaxed)
    }

    /// How long since the last progress.
    pub fn silent_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(last)
    }
}

struct Entry {
    key: String,
    activity: Activity,
    evict: CancellationToken,
}

/// The connections being served.
struct Table {
    limits: Limits,
    epoch: Instant,
    next_id: u64,
    live: HashMap<u64, Entry>,
    per_peer: HashMap<String, usize>,
}

/// What admission decided.
enum Admitted {
    In(u64, Activity, CancellationToken),
    Refused,
}

impl Table {
    fn admit(&mut self, key: &str) -> Admitted {
        let peer_full = self.per_peer.get(key).copied().unwrap_or(0) >= self.limits.max_per_peer;
        if peer_full || self.live.len() >= self.limits.max_connections {
            // Over the peer's cap its own connections make room, whatever their state: the
            // peer competes only with itself. Over the total, anyone's that went quiet.
            let reclaim_after = if peer_full {
                Duration::ZERO
            } else {
                self.limits.reclaim_after
            };
            let victim = self
                .live
                .iter()
                .filter(|(_, e)| {
                    if peer_full {
                        e.key == key
                    } else {
                        !e.activity.is_authenticated()
                    }
                })
                .map(|(id, e)| (*id, e.activity.silent_for()))
                .filter(|(_, silent)| *silent >= reclaim_after)
                .max_by_key(|(_, silent)| *silent)
                .map(|(id, _)| id);
            let Some(victim) = victim else {
                return Admitted::Refused;
            };
            if let Some(entry) = self.remove(victim) {
                entry.evict.cancel();
            }
        }
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let activity = Activity::new(self.epoch);
        let evict = CancellationToken::new();
        *self.per_peer.entry(key.to_owned()).or_default() += 1;
        self.live.insert(
            id,
            Entry {
                key: key.to_owned(),
                activity: activity.clone(),
                evict: evict.clone(),
            },
        );
        Admitted::In(id, activity, evict)
    }

    fn remove(&mut self, id: u64) -> Option<Entry> {
        let entry = self.live.remove(&id)?;
        if let Some(count) = self.per_peer.get_mut(&entry.key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.per_peer.remove(&entry.key);
            }
        }
        Some(entry)
    }
}

/// A running accept loop.
pub struct Service {
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl Service {
    /// Serves `listener`, running `handler` for each connection within `limits`.
    pub fn start<L, H, F>(listener: L, limits: Limits, handler: H) -> Self
    where
        L: Listener,
        H: Fn(L::Stream, Peer, Activity) -> F + Send + Sync + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let table = Arc::new(Mutex::new(Table {
            limits,
            epoch: Instant::now(),
            next_id: 0,
            live: HashMap::new(),
            per_peer: HashMap::new(),
        }));
        let (stop, connections) = (shutdown.clone(), tracker.clone());
        tracker.spawn(async move {
            loop {
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
                let admitted = table
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .admit(&peer.key);
                let Admitted::In(id, activity, evict) = admitted else {
                    tracing::debug!(%peer, "connection refused: the listener is full of active ones");
                    continue;
                };
                let (stop, table) = (stop.clone(), table.clone());
                let handled = handler(stream, peer, activity);
                connections.spawn(async move {
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = evict.cancelled() => {}
                        () = handled => {}
                    }
                    table.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
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
        let service = Service::start(
            listener,
            Limits::new(4, 4),
            |mut stream: TcpStream, _, _| async move {
                let mut byte = [0u8; 1];
                while stream.read_exact(&mut byte).await.is_ok() {
                    let _ = stream.write_all(&byte).await;
                }
            },
        );
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

    #[test]
    fn a_connection_that_proved_the_token_makes_room_only_for_its_own_peer() {
        let limits = Limits {
            reclaim_after: Duration::ZERO,
            ..Limits::new(2, 2)
        };
        let mut table = Table {
            limits,
            epoch: Instant::now(),
            next_id: 0,
            live: HashMap::new(),
            per_peer: HashMap::new(),
        };
        let Admitted::In(_, member, member_evicted) = table.admit("member") else {
            panic!("room for the first");
        };
        member.authenticated();
        let Admitted::In(_, _, stranger_evicted) = table.admit("stranger") else {
            panic!("room for the second");
        };
        // Full: newcomers take the unproven connection's place, never the member's.
        for newcomer in ["third", "fourth", "fifth"] {
            assert!(matches!(table.admit(newcomer), Admitted::In(..)));
            assert!(!member_evicted.is_cancelled(), "{newcomer}");
        }
        assert!(stranger_evicted.is_cancelled());
        // The member's own newer connections may still take its place (it is the quietest).
        std::thread::sleep(Duration::from_millis(5));
        let _ = table.admit("member");
        let _ = table.admit("member");
        assert!(member_evicted.is_cancelled());
    }
}
