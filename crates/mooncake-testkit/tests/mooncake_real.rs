//! Mooncake's real Python client against its real `mooncake_master`: the scenarios hold for
//! Mooncake's own pair, the baseline a master of ours is held to.

use std::time::Duration;

use mooncake_testkit::mooncake_py::{MooncakeWheel, PyClient, RealMaster};
use mooncake_testkit::mooncake_scenarios::{self as scenario, SHORT_LEASE_MS};
use serde_json::json;

/// Runs `scenario` against a fresh `mooncake_master` started with `args`.
fn on_real_master(args: &[&str], scenario: fn(&MooncakeWheel, &str)) {
    let wheel = MooncakeWheel::for_test();
    let master = RealMaster::start(&wheel, args).unwrap();
    scenario(&wheel, &master.addr());
}

#[test]
#[cfg_attr(not(mooncake_wheel), ignore = "needs python3 and Debian's libibverbs1")]
fn put_get_exist_and_remove() {
    on_real_master(&[], scenario::put_get_exist_and_remove);
}

#[test]
#[cfg_attr(not(mooncake_wheel), ignore = "needs python3 and Debian's libibverbs1")]
fn leases_expire_and_bulk_removal_counts() {
    on_real_master(
        &[&format!("--default_kv_lease_ttl={SHORT_LEASE_MS}")],
        scenario::leases_expire_and_bulk_removal_counts,
    );
}

#[test]
#[cfg_attr(not(mooncake_wheel), ignore = "needs python3 and Debian's libibverbs1")]
fn batches_of_2_and_300_keys() {
    on_real_master(&[], scenario::batches_of_2_and_300_keys);
}

#[test]
#[cfg_attr(not(mooncake_wheel), ignore = "needs python3 and Debian's libibverbs1")]
fn zero_copy_batches() {
    on_real_master(&[], scenario::zero_copy_batches);
}

#[test]
#[cfg_attr(not(mooncake_wheel), ignore = "needs python3 and Debian's libibverbs1")]
fn upserts_replace_values() {
    on_real_master(&[], scenario::upserts_replace_values);
}

#[test]
#[cfg_attr(not(mooncake_wheel), ignore = "needs python3 and Debian's libibverbs1")]
fn a_value_crosses_processes() {
    on_real_master(&[], scenario::a_value_crosses_processes);
}

#[test]
#[cfg_attr(not(mooncake_wheel), ignore = "needs python3 and Debian's libibverbs1")]
fn edge_cases() {
    on_real_master(&[], scenario::edge_cases);
}

#[test]
#[cfg_attr(not(mooncake_wheel), ignore = "needs python3 and Debian's libibverbs1")]
fn the_driver_answers_errors_and_times_out() {
    let wheel = MooncakeWheel::for_test();
    let mut c = PyClient::spawn(&wheel).unwrap();
    let reply = c.call(&json!({"op": "bogus"})).unwrap();
    assert!(
        reply["error"].as_str().unwrap().contains("bogus"),
        "{reply}"
    );
    let reply = c.call(&json!({"op": "get", "key": "k"})).unwrap();
    assert!(
        reply["error"].as_str().unwrap().contains("setup"),
        "{reply}"
    );
    assert!(c.call_ok(&json!({"op": "put"})).is_err());
    assert!(c.call(&json!({"op": "hello"})).unwrap()["pid"] == c.pid());

    c.set_timeout(Duration::from_millis(500));
    let err = c.call(&json!({"op": "sleep", "seconds": 30})).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
    assert!(c.call(&json!({"op": "hello"})).is_err());

    let mut c = PyClient::spawn(&wheel).unwrap();
    c.call(&json!({"op": "exit"})).unwrap();
    let err = c.call(&json!({"op": "hello"})).unwrap_err();
    assert!(
        matches!(
            err.kind(),
            std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::BrokenPipe
        ),
        "{err}"
    );
}

#[test]
#[cfg_attr(not(mooncake_wheel), ignore = "needs python3 and Debian's libibverbs1")]
fn a_master_that_cannot_start_says_why() {
    let wheel = MooncakeWheel::for_test();
    let err = RealMaster::start(&wheel, &["--no_such_flag=1"]).unwrap_err();
    assert!(err.to_string().contains("no_such_flag"), "{err}");
}
