//! Tells the tests what this host can run, so that a test needing a missing part is reported
//! as ignored rather than passing without running: `redis_server` when Debian's
//! `redis-server` runs, `net_namespaces` when a network namespace with a veth pair can be
//! made (the multi-rail failover test). Probed again when PATH changes; after installing a
//! part, `cargo clean -p mooncake-te` probes anew.

use std::process::{Command, Stdio};

fn runs(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn main() {
    println!("cargo::rustc-check-cfg=cfg(redis_server)");
    println!("cargo::rustc-check-cfg=cfg(net_namespaces)");
    println!("cargo::rerun-if-env-changed=PATH");
    println!("cargo::rerun-if-changed=build.rs");
    if runs("redis-server", &["--version"]) {
        println!("cargo::rustc-cfg=redis_server");
    }
    // A throwaway namespace: the veth pair vanishes with it.
    if runs(
        "unshare",
        &[
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
        ],
    ) {
        println!("cargo::rustc-cfg=net_namespaces");
    }
}
