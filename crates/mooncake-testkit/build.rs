//! Tells the tests what this host runs (`etcd_server`, `mooncake_wheel`, ...: see
//! `src/probe.rs`, shared with the other crates' build scripts), so that a test needing a
//! missing part is reported as ignored rather than passing without running.

#[allow(dead_code, unreachable_pub)]
#[path = "src/probe.rs"]
mod probe;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=src/probe.rs");
    probe::declare_servers();
}
