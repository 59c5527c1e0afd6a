//! What a host can run, for build scripts: a test that needs a missing server is then reported
//! as ignored rather than passing without running.

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
/// `redis_server` (`redis-server` runs) and `net_namespaces` (a network namespace with a veth
/// pair can be made), and sets those that hold. Probed again when PATH changes; after
/// installing a part, `cargo clean -p <crate>` probes anew.
pub fn declare_servers() {
    println!("cargo::rustc-check-cfg=cfg(etcd_server)");
    println!("cargo::rustc-check-cfg=cfg(redis_server)");
    println!("cargo::rustc-check-cfg=cfg(net_namespaces)");
    println!("cargo::rerun-if-env-changed=PATH");
    if runs("etcd", &["--version"]) {
        println!("cargo::rustc-cfg=etcd_server");
    }
    if runs("redis-server", &["--version"]) {
        println!("cargo::rustc-cfg=redis_server");
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
