//! Real etcd members on loopback ports, for tests of the etcd metadata backends.

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long a cluster (or a restarted member) may take to report healthy.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a member may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Free ports are picked by binding and releasing them, so another process may take one
/// before etcd binds it; a cluster that fails to start is retried on fresh ports.
const START_ATTEMPTS: usize = 3;

/// Whether `etcd --version` runs on this host.
pub fn etcd_installed() -> bool {
    Command::new("etcd")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A cluster of real `etcd` processes on `127.0.0.1`, each member with its own data
/// directory under [`std::env::temp_dir`]. Every member is killed, and the directories
/// removed, on drop. Logs go to `<name>.log` beside the data directories.
pub struct EtcdCluster {
    root: PathBuf,
    token: String,
    members: Vec<Member>,
}

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

impl EtcdCluster {
    /// Starts `members` members (1 or 3 make sense) and waits until every one of them
    /// reports healthy, which needs an elected leader.
    ///
    /// # Panics
    ///
    /// When `members` is 0.
    pub fn new(members: usize) -> io::Result<Self> {
        assert!(members > 0, "an etcd cluster needs at least one member");
        let mut last = io::Error::other("etcd did not start");
        for _ in 0..START_ATTEMPTS {
            match Self::try_new(members) {
                Ok(cluster) => return Ok(cluster),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn try_new(members: usize) -> io::Result<Self> {
        static SEQUENCE: AtomicU32 = AtomicU32::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let token = format!(
            "mooncake-etcd-{}-{}-{nanos}",
            std::process::id(),
            SEQUENCE.fetch_add(1, Ordering::Relaxed)
        );
        let root = std::env::temp_dir().join(&token);
        fs::create_dir_all(&root)?;
        // Built before anything else can fail, so that drop removes `root`.
        let mut cluster = Self {
            root,
            token,
            members: Vec::new(),
        };
        let ports = free_ports(2 * members)?;
        cluster.members = (0..members)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: ports[2 * i],
                peer_port: ports[2 * i + 1],
                child: None,
            })
            .collect();
        for member in 0..members {
            cluster.spawn(member)?;
        }
        cluster.wait_healthy(STARTUP_TIMEOUT)?;
        Ok(cluster)
    }

    /// Number of members, running or not.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether the cluster has no members (never true: [`EtcdCluster::new`] refuses 0).
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Every member's client address, `127.0.0.1:port`, stopped members included (a client
    /// is configured with the whole cluster).
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.len()).map(|m| self.endpoint(m)).collect()
    }

    /// One member's client address, `127.0.0.1:port`.
    pub fn endpoint(&self, member: usize) -> String {
        format!("127.0.0.1:{}", self.members[member].client_port)
    }

    /// The endpoints in Mooncake's form: `127.0.0.1:p1;127.0.0.1:p2;...`.
    pub fn connection_string(&self) -> String {
        self.endpoints().join(";")
    }

    /// Whether `member`'s process is running (it may still be catching up).
    pub fn is_running(&mut self, member: usize) -> bool {
        self.members[member]
            .child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Kills `member` with SIGKILL and reaps it; its data directory is kept. A member that
    /// is not running is left alone.
    pub fn kill(&mut self, member: usize) {
        if let Some(mut child) = self.members[member].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops `member` with SIGTERM, waiting for it to exit (SIGKILL after a while); its data
    /// directory is kept for [`EtcdCluster::start`].
    pub fn stop(&mut self, member: usize) {
        let Some(mut child) = self.members[member].child.take() else {
            return;
        };
        if let Ok(pid) = libc::pid_t::try_from(child.id()) {
            // SAFETY: kill(2) takes no pointers; `pid` is our own unreaped child, so the id
            // cannot have been reused by another process.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Starts a stopped or killed `member` again on its old ports and data directory, and
    /// waits until every running member reports healthy.
    pub fn start(&mut self, member: usize) -> io::Result<()> {
        if !self.is_running(member) {
            self.kill(member);
            self.spawn(member)?;
        }
        self.wait_healthy(STARTUP_TIMEOUT)
    }

    /// Waits until every running member answers `GET /health` with `"health":"true"`; an
    /// error, with the log's tail, when a member exits or `timeout` passes first.
    pub fn wait_healthy(&mut self, timeout: Duration) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut healthy = true;
            for member in 0..self.len() {
                let Some(child) = self.members[member].child.as_mut() else {
                    continue;
                };
                if let Ok(Some(status)) = child.try_wait() {
                    self.members[member].child = None;
                    return Err(io::Error::other(format!(
                        "etcd member {member} exited with {status}:\n{}",
                        self.log_tail(member)
                    )));
                }
                healthy &= is_healthy(self.members[member].client_port);
            }
            if healthy {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let logs: Vec<String> = (0..self.len()).map(|m| self.log_tail(m)).collect();
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "etcd cluster not healthy after {timeout:?}:\n{}",
                        logs.join("\n")
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn spawn(&mut self, member: usize) -> io::Result<()> {
        let initial_cluster = self
            .members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let m = &self.members[member];
        let client_url = format!("http://127.0.0.1:{}", m.client_port);
        let peer_url = format!("http://127.0.0.1:{}", m.peer_port);
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path(member))?;
        let mut command = Command::new("etcd");
        command
            .arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(self.root.join(&m.name))
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &initial_cluster])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", &self.token])
            // Loopback peers: a short election timeout makes a lost leader cheap in tests.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if let Some(arch) = unsupported_arch() {
            command.env("ETCD_UNSUPPORTED_ARCH", arch);
        }
        self.members[member].child = Some(command.spawn()?);
        Ok(())
    }

    fn log_path(&self, member: usize) -> PathBuf {
        self.root.join(format!("{}.log", self.members[member].name))
    }

    fn log_tail(&self, member: usize) -> String {
        let path = self.log_path(member);
        tail(&path, 2048).unwrap_or_else(|e| format!("({}: {e})", path.display()))
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for member in 0..self.members.len() {
            self.kill(member);
        }
        let _ = fs::remove_dir_all(&self.root);
    }
}

impl std::fmt::Debug for EtcdCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdCluster")
            .field("root", &self.root)
            .field("endpoints", &self.endpoints())
            .finish()
    }
}

/// `count` distinct ports that were free a moment ago.
fn free_ports(count: usize) -> io::Result<Vec<u16>> {
    // All held at once so that the kernel hands out distinct ones.
    let listeners = (0..count)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<io::Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect()
}

/// Whether etcd's `/health` on `port` says the member is healthy (it has a leader).
fn is_healthy(port: u16) -> bool {
    let exchange = || -> io::Result<String> {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        stream.set_write_timeout(Some(Duration::from_secs(1)))?;
        stream
            .write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        Ok(response)
    };
    exchange().is_ok_and(|r| r.starts_with("HTTP/1.1 200") && r.contains(r#""health":"true""#))
}

/// The last `bytes` of the file at `path`.
fn tail(path: &Path, bytes: u64) -> io::Result<String> {
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(bytes)))?;
    let mut buf = Vec::new();
    file.read_to_end(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// etcd 3.4 refuses to run on architectures other than amd64 (and ppc64le) unless
/// `ETCD_UNSUPPORTED_ARCH` names the Go architecture it runs on.
fn unsupported_arch() -> Option<&'static str> {
    match std::env::consts::ARCH {
        "x86_64" => None,
        "aarch64" => Some("arm64"),
        "x86" => Some("386"),
        "powerpc64" => Some("ppc64le"),
        "loongarch64" => Some("loong64"),
        other => Some(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_distinct() {
        let mut ports = free_ports(6).unwrap();
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), 6);
    }

    #[test]
    #[cfg_attr(not(etcd_server), ignore = "needs Debian's etcd-server")]
    fn a_cluster_forms_restarts_and_cleans_up() {
        let mut cluster = EtcdCluster::new(3).unwrap();
        assert_eq!(cluster.endpoints().len(), 3);
        assert_eq!(cluster.connection_string().matches(';').count(), 2);
        cluster.kill(1);
        assert!(!cluster.is_running(1));
        cluster.wait_healthy(Duration::from_secs(10)).unwrap();
        cluster.start(1).unwrap();
        assert!(cluster.is_running(1));
        cluster.stop(2);
        cluster.start(2).unwrap();
        let root = cluster.root.clone();
        drop(cluster);
        assert!(!root.exists());
    }
}
