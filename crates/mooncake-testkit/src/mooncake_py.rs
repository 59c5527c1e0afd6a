//! Mooncake's own Python client and `mooncake_master`, from the pinned PyPI wheel, so that
//! tests can drive the real client against a master of ours and compare with the real one.
//!
//! - [`MooncakeWheel`]: a virtual environment holding the wheel, made on first use;
//! - [`RealMaster`]: the wheel's `mooncake_master` on loopback, killed on drop;
//! - [`PyClient`]: one `MooncakeDistributedStore` in a Python process, driven by JSON commands
//!   (`python/mooncake_driver.py` documents them), killed on drop;
//! - [`pattern`]: the bytes the driver stores under a key, to check what comes back.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

/// The PyPI package that holds Mooncake's Python client and master (no CUDA needed).
pub const WHEEL_PACKAGE: &str = "mooncake-transfer-engine-non-cuda";
/// The version under test: the wire types differ between releases.
pub const WHEEL_VERSION: &str = "0.3.13.post1";

/// How long [`PyClient::call`] waits for a reply unless [`PyClient::set_timeout`] says otherwise.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the master may take to accept connections.
const MASTER_STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Ports are picked by binding and releasing them, so another process may take one first; a
/// master that exits during startup is retried on fresh ports.
const START_ATTEMPTS: usize = 3;
/// Written into a virtual environment this module made, once the wheel imports in it.
const MARKER: &str = ".mooncake-testkit";
const LOG_TAIL_BYTES: u64 = 4096;

/// Prints the import check's result: the installed version, then the package's directory.
const CHECK_SCRIPT: &str = "\
import importlib.metadata, os, sys
from mooncake.store import MooncakeDistributedStore
import mooncake
sys.stdout.write('\\n' + importlib.metadata.version('mooncake-transfer-engine-non-cuda'))
sys.stdout.write('\\n' + os.path.dirname(os.path.abspath(mooncake.__file__)) + '\\n')
";

/// A virtual environment where `from mooncake.store import MooncakeDistributedStore` works with
/// [`WHEEL_VERSION`] of [`WHEEL_PACKAGE`].
#[derive(Clone, Debug)]
pub struct MooncakeWheel {
    venv: PathBuf,
    package_dir: PathBuf,
}

impl MooncakeWheel {
    /// Finds the environment, or makes it (`python3 -m venv`, then `pip install` of the pinned
    /// wheel), and checks that the client imports. Where: `$MOONCAKE_PY_VENV`, else
    /// `target/mooncake-py-venv` in the workspace. Done once per process; several processes
    /// may do it at once. `Err` is why the wheel cannot be used here, fit for a skip message.
    pub fn get() -> Result<MooncakeWheel, String> {
        static WHEEL: OnceLock<Result<MooncakeWheel, String>> = OnceLock::new();
        WHEEL.get_or_init(find_or_make).clone()
    }

    /// [`MooncakeWheel::get`] for a test that runs only where the build probe found python3 and
    /// libibverbs (`cfg(mooncake_wheel)`): a wheel that then cannot be installed fails the test,
    /// so that a test which did not run never shows as passed.
    pub fn for_test() -> MooncakeWheel {
        match Self::get() {
            Ok(wheel) => wheel,
            Err(reason) => panic!("Mooncake's wheel cannot be used here: {reason}"),
        }
    }

    /// The environment's root.
    pub fn venv(&self) -> &Path {
        &self.venv
    }

    /// The environment's interpreter.
    pub fn python(&self) -> PathBuf {
        venv_python(&self.venv)
    }

    /// The installed `mooncake` package (`site-packages/mooncake`).
    pub fn package_dir(&self) -> &Path {
        &self.package_dir
    }

    /// `python/mooncake_driver.py` of this crate, the program [`PyClient`] runs.
    pub fn driver_script(&self) -> PathBuf {
        driver_script()
    }

    /// The wheel's `mooncake_master` executable (the ELF binary, not the `bin/` wrapper).
    pub fn master_binary(&self) -> PathBuf {
        self.package_dir.join("mooncake_master")
    }
}

fn driver_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("python/mooncake_driver.py")
}

fn venv_python(venv: &Path) -> PathBuf {
    venv.join("bin/python3")
}

fn find_or_make() -> Result<MooncakeWheel, String> {
    if !crate::probe::libibverbs_installed() {
        return Err("libibverbs1 is not installed (apt-get install libibverbs1)".into());
    }
    let venv = match std::env::var_os("MOONCAKE_PY_VENV") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => {
            let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
            let workspace = crate_dir.ancestors().nth(2).unwrap_or(crate_dir);
            workspace.join("target/mooncake-py-venv")
        }
    };
    let problem = match check(&venv) {
        Ok(wheel) => return Ok(wheel),
        Err(problem) => problem,
    };
    if venv.exists() && !venv.join(MARKER).exists() && !is_empty_dir(&venv) {
        return Err(format!(
            "{} cannot be used ({problem}); remove it or point MOONCAKE_PY_VENV elsewhere",
            venv.display()
        ));
    }
    let staging = staging_dir(&venv)?;
    let made = make(&staging);
    let installed = made.and_then(|()| {
        // Another process may have finished first; its environment is as good as ours.
        if let Ok(wheel) = check(&venv) {
            return Ok(wheel);
        }
        if venv.exists() {
            let old = staging_dir(&venv)?;
            fs::rename(&venv, &old).map_err(|e| format!("moving {} aside: {e}", venv.display()))?;
            let _ = fs::remove_dir_all(&old);
        }
        match fs::rename(&staging, &venv) {
            Ok(()) => {}
            // Lost a race to a process that put its environment in place meanwhile.
            Err(_) if venv.exists() => {}
            Err(e) => return Err(format!("moving the new environment into place: {e}")),
        }
        check(&venv)
    });
    let _ = fs::remove_dir_all(&staging);
    installed
}

/// Makes an environment in `dir` and installs the wheel. The environment is built aside and
/// renamed into place, so a process killed midway never leaves a half-made one where it is
/// used; what runs from it (`python3`, `site-packages`) does not depend on its path.
fn make(dir: &Path) -> Result<(), String> {
    let venv = run(Command::new("python3").arg("-m").arg("venv").arg(dir)).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            "python3 not found".to_string()
        } else {
            format!("python3 -m venv could not run: {e}")
        }
    })?;
    if !venv.status.success() {
        return Err(format!(
            "python3 -m venv failed (Debian needs python3-venv): {}",
            last_lines(&venv.stderr, 5)
        ));
    }
    let spec = format!("{WHEEL_PACKAGE}=={WHEEL_VERSION}");
    let pip = run(Command::new(venv_python(dir))
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .arg(&spec))
    .map_err(|e| format!("pip could not run: {e}"))?;
    if !pip.status.success() {
        return Err(format!(
            "pip could not install {spec}: {}",
            last_lines(&pip.stderr, 5)
        ));
    }
    fs::write(dir.join(MARKER), format!("{spec}\n"))
        .map_err(|e| format!("writing {}: {e}", dir.join(MARKER).display()))
}

/// Whether the client imports in `venv`, with the pinned version.
fn check(venv: &Path) -> Result<MooncakeWheel, String> {
    let python = venv_python(venv);
    if !python.exists() {
        return Err(format!("{} is missing", python.display()));
    }
    let output = run(Command::new(&python).arg("-c").arg(CHECK_SCRIPT))
        .map_err(|e| format!("{} could not run: {e}", python.display()))?;
    if !output.status.success() {
        return Err(format!(
            "`from mooncake.store import MooncakeDistributedStore` failed: {}",
            last_lines(&output.stderr, 5)
        ));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let mut lines = stdout.lines().rev().filter(|l| !l.is_empty());
    let (Some(package_dir), Some(version)) = (lines.next(), lines.next()) else {
        return Err(format!("unexpected import check output: {stdout:?}"));
    };
    if version != WHEEL_VERSION {
        return Err(format!("{WHEEL_PACKAGE} is {version}, not {WHEEL_VERSION}"));
    }
    let wheel = MooncakeWheel {
        venv: venv.to_path_buf(),
        package_dir: PathBuf::from(package_dir),
    };
    if !wheel.master_binary().is_file() {
        return Err(format!("{} is missing", wheel.master_binary().display()));
    }
    Ok(wheel)
}

fn run(command: &mut Command) -> io::Result<Output> {
    command
        .stdin(Stdio::null())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
}

fn is_empty_dir(dir: &Path) -> bool {
    fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_none())
}

/// A fresh name beside `venv`, on the same file system so that a rename can move it.
fn staging_dir(venv: &Path) -> Result<PathBuf, String> {
    let parent = venv.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(parent).map_err(|e| format!("creating {}: {e}", parent.display()))?;
    let name = venv
        .file_name()
        .unwrap_or(OsStr::new("venv"))
        .to_string_lossy();
    Ok(parent.join(format!(".{name}.{}", unique_suffix())))
}

/// The wheel's `mooncake_master` on `127.0.0.1`, its RPC and metrics ports free ones, with no
/// HTTP metadata server and no etcd; killed and reaped on drop. Its output goes to a log in a
/// directory of its own, which is also its working directory.
pub struct RealMaster {
    child: Child,
    port: u16,
    metrics_port: u16,
    dir: ScratchDir,
}

impl RealMaster {
    /// Starts one with `extra_args` (gflags, e.g. `--default_kv_lease_ttl=500`; not the ports)
    /// and waits until it accepts connections.
    pub fn start(wheel: &MooncakeWheel, extra_args: &[&str]) -> io::Result<RealMaster> {
        let mut last = io::Error::other("mooncake_master did not start");
        for _ in 0..START_ATTEMPTS {
            match Self::try_start(wheel, extra_args) {
                Ok(master) => return Ok(master),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn try_start(wheel: &MooncakeWheel, extra_args: &[&str]) -> io::Result<RealMaster> {
        let dir = ScratchDir::new("mooncake-master")?;
        let [port, metrics_port] = free_ports()?;
        let log = File::create(dir.log())?;
        let child = Command::new(wheel.master_binary())
            .arg("--rpc_address=127.0.0.1")
            .arg(format!("--rpc_port={port}"))
            .arg("--enable_http_metadata_server=false")
            .arg("--metrics_host=127.0.0.1")
            .arg(format!("--metrics_port={metrics_port}"))
            .args(extra_args)
            .current_dir(&dir.path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let mut master = RealMaster {
            child,
            port,
            metrics_port,
            dir,
        };
        let deadline = Instant::now() + MASTER_STARTUP_TIMEOUT;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        loop {
            if let Some(status) = master.child.try_wait()? {
                return Err(io::Error::other(format!(
                    "mooncake_master exited with {status}:\n{}",
                    master.log_tail()
                )));
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(master);
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "mooncake_master did not listen on {addr} within {MASTER_STARTUP_TIMEOUT:?}:\n{}",
                        master.log_tail()
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `127.0.0.1:<rpc port>`, what a client's `master_server_addr` takes.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The RPC port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The port of its HTTP metrics and admin server.
    pub fn metrics_port(&self) -> u16 {
        self.metrics_port
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Its log (stdout and stderr).
    pub fn log_path(&self) -> PathBuf {
        self.dir.log()
    }

    /// The last few KiB of its log.
    pub fn log_tail(&self) -> String {
        tail_of(&self.dir.log())
    }
}

impl Drop for RealMaster {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl std::fmt::Debug for RealMaster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RealMaster")
            .field("addr", &self.addr())
            .field("log", &self.log_path())
            .finish()
    }
}

/// One `MooncakeDistributedStore` in its own Python process, running
/// `python/mooncake_driver.py`: [`PyClient::call`] sends a command and waits for its reply.
/// The driver's stderr (the C++ library logs a lot) goes to a log file. Killed on drop.
pub struct PyClient {
    child: Child,
    stdin: Option<ChildStdin>,
    replies: Receiver<io::Result<String>>,
    timeout: Duration,
    dir: ScratchDir,
}

impl PyClient {
    /// Starts the driver under the wheel's Python and waits until it answers `hello`.
    pub fn spawn(wheel: &MooncakeWheel) -> io::Result<PyClient> {
        let dir = ScratchDir::new("mooncake-py")?;
        let log = File::create(dir.log())?;
        let mut child = Command::new(wheel.python())
            .arg("-u")
            .arg(wheel.driver_script())
            .current_dir(&dir.path)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        let (tx, replies) = mpsc::channel();
        if let Some(stdout) = stdout {
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        let mut client = PyClient {
            child,
            stdin,
            replies,
            timeout: DEFAULT_CALL_TIMEOUT,
            dir,
        };
        client.call(&serde_json::json!({ "op": "hello" }))?;
        Ok(client)
    }

    /// How long [`PyClient::call`] waits for each reply.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Sends `command` (an object with `op`) and returns the driver's reply as it is: a Python
    /// exception comes back as an `error` field. `Err`, with the log's tail, when the driver
    /// does not answer within the timeout (it is then killed), has exited, or answers
    /// something that is not the reply to `command`.
    pub fn call(&mut self, command: &Value) -> io::Result<Value> {
        let op = command.get("op").cloned().unwrap_or(Value::Null);
        let mut line = serde_json::to_string(command).map_err(io::Error::other)?;
        line.push('\n');
        let sent = match self.stdin.as_mut() {
            Some(stdin) => stdin
                .write_all(line.as_bytes())
                .and_then(|()| stdin.flush()),
            None => Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the driver was stopped",
            )),
        };
        if let Err(e) = sent {
            return Err(self.failure(e.kind(), &format!("sending {op}: {e}")));
        }
        let reply = match self.replies.recv_timeout(self.timeout) {
            Ok(Ok(reply)) => reply,
            Ok(Err(e)) => {
                return Err(self.failure(e.kind(), &format!("reading the reply to {op}: {e}")))
            }
            Err(RecvTimeoutError::Timeout) => {
                self.stop();
                return Err(self.failure(
                    io::ErrorKind::TimedOut,
                    &format!("no reply to {op} within {:?}", self.timeout),
                ));
            }
            Err(RecvTimeoutError::Disconnected) => {
                let status = self.child.wait().map(|s| s.to_string()).unwrap_or_default();
                return Err(self.failure(
                    io::ErrorKind::UnexpectedEof,
                    &format!("the driver exited ({status}) before answering {op}"),
                ));
            }
        };
        let value: Value = serde_json::from_str(&reply).map_err(|e| {
            self.failure(
                io::ErrorKind::InvalidData,
                &format!("reply to {op} is not JSON ({e}): {reply}"),
            )
        })?;
        if value.get("op") != Some(&op) {
            return Err(self.failure(
                io::ErrorKind::InvalidData,
                &format!("reply to {op} is for another command: {reply}"),
            ));
        }
        Ok(value)
    }

    /// [`PyClient::call`], with a reply carrying `error` turned into `Err` too.
    pub fn call_ok(&mut self, command: &Value) -> io::Result<Value> {
        let reply = self.call(command)?;
        match reply.get("error") {
            Some(error) => Err(self.failure(
                io::ErrorKind::Other,
                &format!("{} failed: {error}", command["op"]),
            )),
            None => Ok(reply),
        }
    }

    /// The driver's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its log (the driver's stderr).
    pub fn log_path(&self) -> PathBuf {
        self.dir.log()
    }

    /// The last few KiB of its log.
    pub fn log_tail(&self) -> String {
        tail_of(&self.dir.log())
    }

    fn stop(&mut self) {
        self.stdin = None;
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn failure(&self, kind: io::ErrorKind, what: &str) -> io::Error {
        io::Error::new(
            kind,
            format!(
                "{what}\n--- {}:\n{}",
                self.log_path().display(),
                self.log_tail()
            ),
        )
    }
}

impl Drop for PyClient {
    fn drop(&mut self) {
        self.stop();
    }
}

impl std::fmt::Debug for PyClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PyClient")
            .field("pid", &self.child.id())
            .field("log", &self.log_path())
            .finish()
    }
}

/// The value of `len` bytes the driver stores under `key` (seed 0); see [`pattern_seeded`].
pub fn pattern(key: &str, len: usize) -> Vec<u8> {
    pattern_seeded(key, 0, len)
}

/// The value of `len` bytes the driver stores under `key` with `seed` (the driver's `pattern`,
/// byte for byte). With `d = SHA-256(UTF-8(key) ‖ 0x00 ‖ seed as 8-byte little-endian)`:
///
/// `value[i] = d[i % 32] ^ (((i / 32) mod 2^32) >> (8 * (i % 4))) as u8`
///
/// That is, 32-byte blocks, block `j` being `d` XOR the little-endian `j` repeated eight times.
pub fn pattern_seeded(key: &str, seed: u64, len: usize) -> Vec<u8> {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    context.update(key.as_bytes());
    context.update(&[0]);
    context.update(&seed.to_le_bytes());
    let digest = context.finish();
    let d = digest.as_ref();
    (0..len)
        .map(|i| {
            let block = (i / 32) as u32;
            d[i % 32] ^ (block >> (8 * (i % 4))) as u8
        })
        .collect()
}

/// Lower-case hex SHA-256 of `data`, as the driver reports what it reads.
pub fn sha256_hex(data: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A directory under [`std::env::temp_dir`] holding a process's log; removed on drop unless the
/// thread is panicking, so that a failed test leaves the log to read.
struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    fn new(prefix: &str) -> io::Result<Self> {
        let path = std::env::temp_dir().join(format!("{prefix}-{}", unique_suffix()));
        fs::create_dir_all(&path)?;
        Ok(Self { path })
    }

    fn log(&self) -> PathBuf {
        self.path.join("out.log")
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept {}", self.path.display());
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

fn unique_suffix() -> String {
    static SEQUENCE: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "{}-{}-{nanos}",
        std::process::id(),
        SEQUENCE.fetch_add(1, Ordering::Relaxed)
    )
}

/// Two distinct ports that were free a moment ago.
fn free_ports() -> io::Result<[u16; 2]> {
    // Both held at once so that the kernel hands out distinct ones.
    let a = TcpListener::bind("127.0.0.1:0")?;
    let b = TcpListener::bind("127.0.0.1:0")?;
    Ok([a.local_addr()?.port(), b.local_addr()?.port()])
}

fn tail_of(path: &Path) -> String {
    let read = || -> io::Result<String> {
        let mut file = File::open(path)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES)))?;
        let mut buf = Vec::new();
        file.read_to_end(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    read().unwrap_or_else(|e| format!("({}: {e})", path.display()))
}

fn last_lines(bytes: &[u8], count: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(count)..].join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pattern_matches_the_driver() {
        // Values the driver's `pattern` gives.
        assert_eq!(
            pattern("hello", 40),
            hex("b3564a584d4b73ee4f2c328c5411265e0e67903051b4ec32c5f068e5cc5b9b15b2564a584c4b73ee")
        );
        assert_eq!(
            pattern_seeded("hello", 7, 40),
            hex("e730184411ad1f3090e905e55a7c413b3655ea0fe652ce267d611511709ae913e630184410ad1f30")
        );
        assert_eq!(
            sha256_hex(&pattern("k", 1 << 20)),
            "618e4075f3dd82cf6a649f66d51f29b887cd8e1be3b2416caaf87ae048ac4ff8"
        );
        assert!(pattern("k", 0).is_empty());
        assert_eq!(pattern("k", 100)[..40], pattern("k", 40)[..]);
    }

    #[test]
    fn sha256_hex_is_lower_case_hex() {
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn free_ports_are_distinct() {
        let [a, b] = free_ports().unwrap();
        assert_ne!(a, b);
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }
}
