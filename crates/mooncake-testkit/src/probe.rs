//! What a host can run, for build scripts: a test that needs a missing server is then reported
//! as ignored rather than passing without running.

use std::path::Path;
use std::process::{Command, Stdio};

fn runs(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// From a build script: declares the cfgs `etcd_server` (Debian's `etcd-server` runs),
/// `redis_server` (`redis-server` runs), `net_namespaces` (a network namespace with a veth
/// pair can be made), `mooncake_wheel` (Mooncake's Python wheel can run: a Python and
/// Debian's `libibverbs1`; see [`crate::mooncake_py`]), `promtool` (Debian's `prometheus`)
/// and `chromium` (Debian's `chromium`), and sets those that hold. Probed again
/// when PATH or `MOONCAKE_PY_VENV` changes; after installing a part, `cargo clean -p <crate>`
/// probes anew.
pub fn declare_servers() {
    println!("cargo::rustc-check-cfg=cfg(etcd_server)");
    println!("cargo::rustc-check-cfg=cfg(redis_server)");
    println!("cargo::rustc-check-cfg=cfg(net_namespaces)");
    println!("cargo::rustc-check-cfg=cfg(mooncake_wheel)");
    println!("cargo::rustc-check-cfg=cfg(promtool)");
    println!("cargo::rustc-check-cfg=cfg(chromium)");
    println!("cargo::rerun-if-env-changed=PATH");
    println!("cargo::rerun-if-env-changed=MOONCAKE_PY_VENV");
    if wheel_can_run() {
        println!("cargo::rustc-cfg=mooncake_wheel");
    }
    if runs("etcd", &["--version"]) {
        println!("cargo::rustc-cfg=etcd_server");
    }
    if runs("redis-server", &["--version"]) {
        println!("cargo::rustc-cfg=redis_server");
    }
    for tool in ["promtool", "chromium"] {
        if runs(tool, &["--version"]) {
            println!("cargo::rustc-cfg={tool}");
        }
    }
    // A throwaway namespace: the veth pair vanishes with it.
    let veth = [
        "--net",
        "ip",
        "link",
        "add",
        "mc-probe0",
        "type",
        "veth",
        "peer",
        "name",
        "mc-probe1",
    ];
    if runs("unshare", &veth) {
        println!("cargo::rustc-cfg=net_namespaces");
    }
}

/// Whether a Python that can hold the wheel runs (`$MOONCAKE_PY_VENV`'s, or `python3` to make
/// one) and its libraries can load.
fn wheel_can_run() -> bool {
    let venv_python = std::env::var_os("MOONCAKE_PY_VENV")
        .filter(|dir| !dir.is_empty())
        .map(|dir| Path::new(&dir).join("bin/python3"));
    let python = venv_python.is_some_and(|p| runs(&p.to_string_lossy(), &["--version"]))
        || runs("python3", &["--version"]);
    cfg!(target_os = "linux") && python && libibverbs_installed()
}

/// Whether the dynamic loader can find `libibverbs.so.1` (Debian's `libibverbs1`), which
/// Mooncake's wheel links against even without RDMA hardware.
pub fn libibverbs_installed() -> bool {
    const LIB: &str = "libibverbs.so.1";
    let listed = ["ldconfig", "/sbin/ldconfig", "/usr/sbin/ldconfig"]
        .iter()
        .find_map(|ldconfig| Command::new(ldconfig).arg("-p").output().ok())
        .is_some_and(|out| String::from_utf8_lossy(&out.stdout).contains(LIB));
    let multiarch = format!("{}-linux-gnu", std::env::consts::ARCH);
    listed
        || [
            format!("/lib/{multiarch}"),
            format!("/usr/lib/{multiarch}"),
            "/lib64".into(),
            "/usr/lib64".into(),
            "/usr/lib".into(),
            "/lib".into(),
        ]
        .iter()
        .any(|dir| Path::new(dir).join(LIB).exists())
}
