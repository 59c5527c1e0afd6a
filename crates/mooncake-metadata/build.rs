//! Tells the tests which servers this host runs (see `mooncake_testkit::probe`).

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    mooncake_testkit::probe::declare_servers();
}
