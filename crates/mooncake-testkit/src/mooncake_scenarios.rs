//! What Mooncake's Python client does against a master, as scenarios that take the master's
//! address: the same assertions hold for Mooncake's own `mooncake_master` (this crate's tests)
//! and for any master that claims to speak its protocol. Each panics on the first difference.

#![allow(clippy::unwrap_used)]

use serde_json::{json, Value};

use crate::mooncake_py::{pattern, pattern_seeded, sha256_hex, MooncakeWheel, PyClient};

/// The read lease a master must run with for [`leases_expire_and_bulk_removal_counts`].
pub const SHORT_LEASE_MS: u64 = 300;

const MIB: u64 = 1 << 20;

/// A client set up against `master` with a segment of `segment` bytes.
pub fn client(wheel: &MooncakeWheel, master: &str, segment: u64) -> PyClient {
    let mut client = PyClient::spawn(wheel).unwrap();
    let reply = client
        .call_ok(&json!({"op": "setup", "master": master, "global_segment_size": segment}))
        .unwrap();
    assert_eq!(reply["rc"], 0, "{reply}");
    client
}

pub fn call(client: &mut PyClient, command: Value) -> Value {
    client.call_ok(&command).unwrap()
}

pub fn rc(client: &mut PyClient, command: Value) -> Value {
    call(client, command)["rc"].clone()
}

/// Checks a `get`-style description: `len` bytes of `key`'s pattern.
pub fn assert_value(reply: &Value, key: &str, seed: u64, len: usize) {
    assert_eq!(reply["len"], len, "{key}: {reply}");
    assert_eq!(reply["ok"], true, "{key}: {reply}");
    assert_eq!(
        reply["sha256"],
        sha256_hex(&pattern_seeded(key, seed, len)),
        "{key}"
    );
}

pub fn close(client: &mut PyClient) {
    assert_eq!(rc(client, json!({"op": "close"})), 0);
}

/// Put, get, existence, sizes, a 1 MiB value, a 300-byte key, an existing key, removal under a lease.
pub fn put_get_exist_and_remove(wheel: &MooncakeWheel, master: &str) {
    let mut c = client(wheel, master, 16 * MIB);

    assert_eq!(rc(&mut c, json!({"op": "put", "key": "k1", "size": 14})), 0);
    let got = call(&mut c, json!({"op": "get", "key": "k1"}));
    assert_value(&got, "k1", 0, 14);
    let bytes = pattern("k1", 14);
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(got["hex"], hex);

    assert_eq!(
        rc(&mut c, json!({"op": "put", "key": "big", "size": MIB})),
        0
    );
    let got = call(&mut c, json!({"op": "get", "key": "big"}));
    assert_value(&got, "big", 0, MIB as usize);
    assert!(got.get("hex").is_none());

    assert_eq!(
        rc(
            &mut c,
            json!({"op": "put_bytes", "key": "raw", "hex": "68656c6c6f2d6d6f6f6e63616b65"})
        ),
        0
    );
    let got = call(&mut c, json!({"op": "get", "key": "raw"}));
    assert_eq!(got["hex"], "68656c6c6f2d6d6f6f6e63616b65");
    assert_eq!(got["ok"], false);

    assert_eq!(rc(&mut c, json!({"op": "is_exist", "key": "k1"})), 1);
    assert_eq!(rc(&mut c, json!({"op": "is_exist", "key": "nokey"})), 0);
    assert_eq!(rc(&mut c, json!({"op": "get_size", "key": "k1"})), 14);
    assert_eq!(rc(&mut c, json!({"op": "get_size", "key": "nokey"})), -704);
    let missing = call(&mut c, json!({"op": "get", "key": "nokey"}));
    assert_eq!(missing["len"], 0);

    // An existing key: the master answers OBJECT_ALREADY_EXISTS, the client reports success
    // and the first value stays.
    assert_eq!(
        rc(
            &mut c,
            json!({"op": "put", "key": "k1", "size": 20, "seed": 1})
        ),
        0
    );
    assert_value(
        &call(&mut c, json!({"op": "get", "key": "k1"})),
        "k1",
        0,
        14,
    );

    let long_key = "L".repeat(300);
    assert_eq!(
        rc(&mut c, json!({"op": "put", "key": long_key, "size": 1000})),
        0
    );
    assert_value(
        &call(&mut c, json!({"op": "get", "key": long_key})),
        &long_key,
        0,
        1000,
    );
    assert_eq!(rc(&mut c, json!({"op": "is_exist", "key": long_key})), 1);

    // A read just now leased k1 (default lease 10 s).
    assert_eq!(rc(&mut c, json!({"op": "remove", "key": "k1"})), -706);
    assert_eq!(
        rc(&mut c, json!({"op": "remove", "key": "k1", "force": true})),
        0
    );
    assert_eq!(
        rc(&mut c, json!({"op": "remove", "key": "k1", "force": true})),
        -704
    );
    assert_eq!(rc(&mut c, json!({"op": "is_exist", "key": "k1"})), 0);
    assert_eq!(rc(&mut c, json!({"op": "health_check"})), 0);
    close(&mut c);
}

/// Leases come from reads and expire (the master runs with a lease of [`SHORT_LEASE_MS`]); removal by pattern and of everything counts what went.
pub fn leases_expire_and_bulk_removal_counts(wheel: &MooncakeWheel, master: &str) {
    let mut c = client(wheel, master, 16 * MIB);
    let keys = ["r-a", "r-b", "s-c"];
    let sizes = [10, 20, 30];
    assert_eq!(
        rc(
            &mut c,
            json!({"op": "put_batch", "keys": keys, "sizes": sizes})
        ),
        0
    );
    // A put grants no lease; a read does.
    assert_eq!(rc(&mut c, json!({"op": "remove", "key": "s-c"})), 0);
    call(&mut c, json!({"op": "get", "key": "r-a"}));
    assert_eq!(rc(&mut c, json!({"op": "remove", "key": "r-a"})), -706);
    call(&mut c, json!({"op": "sleep", "seconds": 0.6}));
    assert_eq!(rc(&mut c, json!({"op": "remove", "key": "r-a"})), 0);
    assert_eq!(
        rc(&mut c, json!({"op": "remove_by_regex", "regex": "^r-"})),
        1
    );
    let more = ["t-d", "t-e", "t-f"];
    assert_eq!(
        rc(
            &mut c,
            json!({"op": "put_batch", "keys": more, "sizes": [5, 6, 7]})
        ),
        0
    );
    call(&mut c, json!({"op": "get", "key": "t-d"}));
    // Without force, a leased object stays.
    assert_eq!(rc(&mut c, json!({"op": "remove_all"})), 2);
    assert_eq!(rc(&mut c, json!({"op": "is_exist", "key": "t-d"})), 1);
    assert_eq!(rc(&mut c, json!({"op": "remove_all", "force": true})), 1);
    assert_eq!(
        rc(&mut c, json!({"op": "batch_is_exist", "keys": keys})),
        json!([0, 0, 0])
    );
    close(&mut c);
}

/// Batches of 2 and of 300 keys (whose lengths widen every length on the wire).
pub fn batches_of_2_and_300_keys(wheel: &MooncakeWheel, master: &str) {
    let mut c = client(wheel, master, 16 * MIB);

    let keys = ["b-one", "b-two"];
    assert_eq!(
        rc(
            &mut c,
            json!({"op": "put_batch", "keys": keys, "sizes": [5, 9]})
        ),
        0
    );
    let got = call(
        &mut c,
        json!({"op": "get_batch", "keys": ["b-one", "b-two", "b-none"]}),
    );
    let values = got["values"].as_array().unwrap();
    assert_eq!(values.len(), 3);
    assert_value(&values[0], "b-one", 0, 5);
    assert_value(&values[1], "b-two", 0, 9);
    assert_eq!(values[2]["len"], 0);
    assert_eq!(
        rc(
            &mut c,
            json!({"op": "batch_is_exist", "keys": ["b-one", "b-none"]})
        ),
        json!([1, 0])
    );
    assert_eq!(
        rc(
            &mut c,
            json!({"op": "batch_remove", "keys": ["b-one", "b-none"], "force": true})
        ),
        json!([0, -704])
    );

    // 300 keys: every length in the messages takes 2 bytes.
    let keys: Vec<String> = (0..300).map(|i| format!("many-{i:03}")).collect();
    let sizes: Vec<u64> = (0..300).map(|i| 100 + 37 * i).collect();
    assert_eq!(
        rc(
            &mut c,
            json!({"op": "put_batch", "keys": keys, "sizes": sizes})
        ),
        0
    );
    let got = call(&mut c, json!({"op": "get_batch", "keys": keys}));
    let values = got["values"].as_array().unwrap();
    assert_eq!(values.len(), 300);
    for ((key, size), value) in keys.iter().zip(&sizes).zip(values) {
        assert_value(value, key, 0, *size as usize);
    }
    assert_eq!(
        rc(&mut c, json!({"op": "batch_is_exist", "keys": keys})),
        json!(vec![1; 300])
    );
    assert_eq!(
        rc(
            &mut c,
            json!({"op": "batch_remove", "keys": keys, "force": true})
        ),
        json!(vec![0; 300])
    );
    close(&mut c);
}

/// The zero-copy batch calls the connectors use: `batch_put_from` and `batch_get_into`.
pub fn zero_copy_batches(wheel: &MooncakeWheel, master: &str) {
    let mut c = client(wheel, master, 16 * MIB);
    assert_eq!(
        rc(&mut c, json!({"op": "register_buffer", "size": 4 * MIB})),
        0
    );
    let keys = ["z-1", "z-2", "z-3"];
    let sizes = [4, 4000, MIB];
    assert_eq!(
        rc(
            &mut c,
            json!({"op": "batch_put_from", "keys": keys, "sizes": sizes})
        ),
        json!([0, 0, 0])
    );
    let got = call(
        &mut c,
        json!({"op": "batch_get_into", "keys": keys, "sizes": sizes}),
    );
    assert_eq!(got["rc"], json!(sizes));
    for ((key, size), value) in keys
        .iter()
        .zip(sizes)
        .zip(got["values"].as_array().unwrap())
    {
        assert_value(value, key, 0, size as usize);
    }
    // Read back by the copying API too, and a missing key in a zero-copy batch.
    assert_value(
        &call(&mut c, json!({"op": "get", "key": "z-3"})),
        "z-3",
        0,
        MIB as usize,
    );
    let got = call(
        &mut c,
        json!({"op": "batch_get_into", "keys": ["z-1", "z-none"], "sizes": [4, 4]}),
    );
    assert_eq!(got["rc"], json!([4, -704]));
    assert_value(&got["values"][0], "z-1", 0, 4);
    close(&mut c);
}

/// Upserts, of the same size (in place) and of another.
pub fn upserts_replace_values(wheel: &MooncakeWheel, master: &str) {
    let mut c = client(wheel, master, 16 * MIB);
    assert_eq!(
        rc(&mut c, json!({"op": "upsert", "key": "u1", "size": 5})),
        0
    );
    assert_value(&call(&mut c, json!({"op": "get", "key": "u1"})), "u1", 0, 5);
    assert_eq!(
        rc(
            &mut c,
            json!({"op": "upsert", "key": "u1", "size": 5, "seed": 1})
        ),
        0
    );
    assert_value(
        &call(&mut c, json!({"op": "get", "key": "u1", "seed": 1})),
        "u1",
        1,
        5,
    );
    assert_eq!(
        rc(
            &mut c,
            json!({"op": "upsert", "key": "u1", "size": 70000, "seed": 2})
        ),
        0
    );
    assert_value(
        &call(&mut c, json!({"op": "get", "key": "u1", "seed": 2})),
        "u1",
        2,
        70000,
    );
    let keys = ["u1", "u2"];
    assert_eq!(
        rc(
            &mut c,
            json!({"op": "upsert_batch", "keys": keys, "sizes": [6, 7], "seed": 3})
        ),
        0
    );
    let got = call(&mut c, json!({"op": "get_batch", "keys": keys, "seed": 3}));
    assert_value(&got["values"][0], "u1", 3, 6);
    assert_value(&got["values"][1], "u2", 3, 7);
    close(&mut c);
}

/// A node with a segment and a requester without one: values cross processes both ways.
pub fn a_value_crosses_processes(wheel: &MooncakeWheel, master: &str) {
    let mut node = client(wheel, master, 16 * MIB);
    let mut requester = client(wheel, master, 0);

    assert_eq!(
        rc(&mut node, json!({"op": "put", "key": "x1", "size": MIB})),
        0
    );
    let there = call(&mut requester, json!({"op": "get", "key": "x1"}));
    assert_value(&there, "x1", 0, MIB as usize);
    let here = call(&mut node, json!({"op": "get", "key": "x1"}));
    assert_eq!(here["sha256"], there["sha256"]);

    // Without a segment of its own, the requester's writes land in the node's.
    assert_eq!(
        rc(
            &mut requester,
            json!({"op": "put", "key": "x2", "size": 300_000})
        ),
        0
    );
    assert_value(
        &call(&mut node, json!({"op": "get", "key": "x2"})),
        "x2",
        0,
        300_000,
    );
    let keys = ["x3", "x4"];
    assert_eq!(
        rc(
            &mut requester,
            json!({"op": "batch_put_from", "keys": keys, "sizes": [MIB, 10]})
        ),
        json!([0, 0])
    );
    let got = call(&mut node, json!({"op": "get_batch", "keys": keys}));
    assert_value(&got["values"][0], "x3", 0, MIB as usize);
    assert_value(&got["values"][1], "x4", 0, 10);

    close(&mut requester);
    close(&mut node);
}

/// Refusals: empty values and keys, bad patterns, buffers too small, empty batches.
pub fn edge_cases(wheel: &MooncakeWheel, master: &str) {
    let mut c = client(wheel, master, 16 * MIB);
    // INVALID_PARAMS, from the client (no buffer for 0 bytes, or more than the 16 MiB local
    // buffer) or from the master (empty key, bad regex).
    assert_eq!(
        rc(&mut c, json!({"op": "put", "key": "e0", "size": 0})),
        -600
    );
    assert_eq!(
        rc(&mut c, json!({"op": "put", "key": "e1", "size": 17 * MIB})),
        -600
    );
    assert_eq!(rc(&mut c, json!({"op": "put", "key": "", "size": 3})), -600);
    assert_eq!(
        rc(&mut c, json!({"op": "remove_by_regex", "regex": "(["})),
        -600
    );

    // Empty batches; get_batch of no keys gives one empty value.
    assert_eq!(
        rc(&mut c, json!({"op": "put_batch", "keys": [], "sizes": []})),
        0
    );
    assert_eq!(
        rc(&mut c, json!({"op": "batch_is_exist", "keys": []})),
        json!([])
    );
    assert_eq!(
        rc(&mut c, json!({"op": "batch_remove", "keys": []})),
        json!([])
    );
    let got = call(&mut c, json!({"op": "get_batch", "keys": []}));
    assert_eq!(got["values"].as_array().unwrap().len(), 1);
    assert_eq!(got["values"][0]["len"], 0);

    // A key twice in one batch: the first value stays.
    assert_eq!(
        rc(
            &mut c,
            json!({"op": "put_batch", "keys": ["d", "d"], "sizes": [3, 4]})
        ),
        0
    );
    assert_value(&call(&mut c, json!({"op": "get", "key": "d"})), "d", 0, 3);

    // Zero-copy reads of a missing key, and into a buffer too small.
    assert_eq!(
        rc(
            &mut c,
            json!({"op": "batch_get_into", "keys": ["none"], "sizes": [4]})
        ),
        json!([-704])
    );
    assert_eq!(
        rc(
            &mut c,
            json!({"op": "batch_get_into", "keys": ["d"], "sizes": [2]})
        ),
        json!([-600])
    );
    close(&mut c);
    assert_eq!(rc(&mut c, json!({"op": "close"})), 0);
}
