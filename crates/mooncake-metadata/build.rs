//! Tells the tests what this host runs, so that a test needing a missing server is reported as
//! ignored rather than passing without running: `etcd_server` when Debian's `etcd-server` runs,
//! `redis_server` when `redis-server` does. Probed again when PATH changes; after installing
//! one, `cargo clean -p mooncake-metadata` probes anew.

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
    println!("cargo::rustc-check-cfg=cfg(etcd_server)");
    println!("cargo::rustc-check-cfg=cfg(redis_server)");
    println!("cargo::rerun-if-env-changed=PATH");
    println!("cargo::rerun-if-changed=build.rs");
    if runs("etcd", &["--version"]) {
        println!("cargo::rustc-cfg=etcd_server");
    }
    if runs("redis-server", &["--version"]) {
        println!("cargo::rustc-cfg=redis_server");
    }
}
