//! Tells the tests whether this host runs `etcd` (Debian's `etcd-server`): `etcd_server`, so
//! that a test needing it is reported as ignored rather than passing without running. Probed
//! again when PATH changes.

use std::process::{Command, Stdio};

fn main() {
    println!("cargo::rustc-check-cfg=cfg(etcd_server)");
    println!("cargo::rerun-if-env-changed=PATH");
    println!("cargo::rerun-if-changed=build.rs");
    let runs = Command::new("etcd")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if runs {
        println!("cargo::rustc-cfg=etcd_server");
    }
}
