//! Generates the master's gRPC code from `proto/mooncake_store.proto` and its log's records
//! from `proto/mooncake_journal.proto`, with the protoc that the
//! `protoc-bin-vendored` crate ships (nothing to install on the host).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // `etcd_server` when Debian's etcd runs here: the HA tests are ignored (not passed) without.
    mooncake_testkit::probe::declare_servers();
    // SAFETY: build scripts are single-threaded; nothing reads the environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    tonic_prost_build::configure().compile_protos(
        &["proto/mooncake_store.proto", "proto/mooncake_journal.proto"],
        &["proto"],
    )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
