//! Every master RPC handler against hostile requests: keys empty, huge or full of control
//! characters, sizes of zero and 2^64-1, ids that were never handed out or belong to someone
//! else, mounts that wrap the address space, regexes that do not compile, and time jumping
//! ahead between calls. A handler may refuse anything; it must answer, never panic, and leave
//! the state machine's invariants whole.
//!
//! `PROPTEST_CASES=100000 cargo test -p mooncake-store --lib fuzz` runs longer.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use tokio::sync::watch;
use tonic::Request;

use super::service::{MasterService, OpCounters, Role};
use super::{Master, MasterConfig};
use crate::access::Caller;
use crate::proto;
use crate::proto::master_server::Master as _;

fn uuid() -> impl Strategy<Value = Option<proto::Uuid>> {
    prop_oneof![
        4 => (0..3u64).prop_map(|low| Some(proto::Uuid { high: 1, low })),
        1 => Just(None),
        1 => any::<(u64, u64)>().prop_map(|(high, low)| Some(proto::Uuid { high, low })),
    ]
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => (0..4u8).prop_map(|k| format!("key-{k}")),
        1 => Just(String::new()),
        1 => Just("k".repeat(5_000)),
        1 => Just("line\nbreak\u{0}nul".to_owned()),
        1 => "\\PC{0,16}",
    ]
}

fn size() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => Just(4096u64),
        2 => 1..(256u64 << 10),
        1 => Just(0u64),
        1 => Just(u64::MAX),
        1 => Just(1u64 << 40),
        1 => any::<u64>(),
    ]
}

/// A ping's rail report: mostly a few plain rails, sometimes far too many, labels far too
/// long or full of control characters, states no version defines.
fn rails() -> impl Strategy<Value = Vec<proto::RailReport>> {
    let label = prop_oneof![
        4 => (0..3u8).prop_map(|n| format!("node-{n}")),
        1 => Just(String::new()),
        1 => Just("r".repeat(10_000)),
        1 => Just("nic\n\u{0}<b>".to_owned()),
        1 => "\\PC{0,16}",
    ];
    let rail = (
        label.clone(),
        label.clone(),
        label,
        -1..5i32,
        any::<u64>(),
        any::<u64>(),
    )
        .prop_map(
            |(peer, local, remote, state, bytes, failures)| proto::RailReport {
                peer,
                local,
                remote,
                state,
                bytes,
                failures,
            },
        );
    prop_oneof![
        6 => proptest::collection::vec(rail.clone(), 0..4),
        1 => proptest::collection::vec(rail, 60..200),
    ]
}

fn segment() -> impl Strategy<Value = proto::Segment> {
    let name = prop_oneof![
        4 => (0..3u8).prop_map(|n| format!("node-{n}")),
        1 => Just(String::new()),
        1 => Just("node\n# HELP injected".to_owned()),
        1 => Just("n".repeat(1_000)),
    ];
    let base = prop_oneof![
        4 => (1..4u64).prop_map(|n| n << 32),
        1 => Just(0u64),
        1 => Just(u64::MAX - 4095),
        1 => any::<u64>(),
    ];
    let bytes = prop_oneof![
        4 => Just(1u64 << 20),
        1 => Just(0u64),
        1 => Just(1u64 << 40),
        1 => Just(u64::MAX),
    ];
    (uuid(), name, base, bytes, 0..3u8).prop_map(|(id, name, base, size, endpoint)| {
        proto::Segment {
            id,
            name,
            base,
            size,
            te_endpoint: format!("127.0.0.1:{}", 15_000 + u16::from(endpoint)),
            protocol: "tcp".into(),
            host_id: String::new(),
        }
    })
}

fn config() -> impl Strategy<Value = Option<proto::ReplicateConfig>> {
    let replicas = prop_oneof![4 => 1..3u32, 1 => Just(0u32), 1 => Just(u32::MAX)];
    let preferred = proptest::collection::vec(
        prop_oneof![(0..3u8).prop_map(|n| format!("node-{n}")), "\\PC{0,8}"],
        0..3,
    );
    let ttl = prop_oneof![
        Just(None),
        Just(Some(0u64)),
        Just(Some(u64::MAX)),
        (1..100_000u64).prop_map(Some)
    ];
    prop_oneof![
        1 => Just(None),
        4 => (replicas, preferred, 0..4i32, ttl, any::<bool>()).prop_map(
            |(replica_num, preferred_segments, soft_pin_action, soft_pin_ttl_ms, with_hard_pin)| {
                Some(proto::ReplicateConfig {
                    replica_num,
                    preferred_segments,
                    soft_pin_action,
                    soft_pin_ttl_ms,
                    with_hard_pin,
                    host_id: String::new(),
                })
            }
        ),
    ]
}

fn write_id() -> impl Strategy<Value = u64> {
    prop_oneof![3 => 0..8u64, 1 => any::<u64>()]
}

fn keys() -> impl Strategy<Value = Vec<String>> {
    proptest::collection::vec(key(), 0..5)
}

#[derive(Debug, Clone)]
enum Call {
    Ping(proto::PingRequest),
    Mount(proto::MountSegmentRequest),
    Remount(proto::ReMountSegmentRequest),
    Unmount(proto::UnmountSegmentRequest),
    GracefulUnmount(proto::GracefulUnmountSegmentRequest),
    PutStart(proto::PutStartRequest),
    UpsertStart(proto::PutStartRequest),
    PutEnd(proto::KeyRequest),
    PutRevoke(proto::KeyRequest),
    BatchPutStart(proto::BatchPutStartRequest),
    BatchUpsertStart(proto::BatchPutStartRequest),
    BatchPutEnd(proto::BatchKeysRequest),
    BatchPutRevoke(proto::BatchKeysRequest),
    GetReplicaList(proto::GetReplicaListRequest),
    BatchGetReplicaList(proto::BatchGetReplicaListRequest),
    ExistKey(proto::ExistKeyRequest),
    BatchExistKey(proto::BatchExistKeyRequest),
    Remove(proto::RemoveRequest),
    BatchRemove(proto::BatchRemoveRequest),
    RemoveByRegex(proto::RemoveByRegexRequest),
    RemoveAll(proto::RemoveAllRequest),
    /// Time passes (a few milliseconds: every timeout is that short here) and the periodic
    /// work runs.
    Advance(u64),
}

fn call() -> impl Strategy<Value = Call> {
    let key_request = (uuid(), key(), write_id())
        .prop_map(|(client_id, key, write_id)| proto::KeyRequest {
            client_id,
            key,
            write_id,
        })
        .boxed();
    let batch_keys = (uuid(), keys(), proptest::collection::vec(write_id(), 0..5))
        .prop_map(|(client_id, keys, write_ids)| proto::BatchKeysRequest {
            client_id,
            keys,
            write_ids,
        })
        .boxed();
    let put_start = (uuid(), key(), size(), config())
        .prop_map(|(client_id, key, size, config)| proto::PutStartRequest {
            client_id,
            key,
            size,
            config,
        })
        .boxed();
    let batch_start = (
        uuid(),
        keys(),
        proptest::collection::vec(size(), 0..5),
        config(),
    )
        .prop_map(
            |(client_id, keys, sizes, config)| proto::BatchPutStartRequest {
                client_id,
                keys,
                sizes,
                config,
            },
        )
        .boxed();
    let pattern = prop_oneof![
        Just("key-.*".to_owned()),
        Just("(".to_owned()),
        Just("a{100000}{100000}".to_owned()),
        Just(String::new()),
        "\\PC{0,12}",
    ];
    prop_oneof![
        3 => (uuid(), rails()).prop_map(|(client_id, rails)| Call::Ping(proto::PingRequest { client_id, rails })),
        3 => (uuid(), segment()).prop_map(|(client_id, s)| Call::Mount(proto::MountSegmentRequest { client_id, segment: Some(s) })),
        1 => (uuid(), proptest::collection::vec(segment(), 0..3)).prop_map(|(client_id, segments)| Call::Remount(proto::ReMountSegmentRequest { client_id, segments })),
        1 => (uuid(), uuid()).prop_map(|(client_id, segment_id)| Call::Unmount(proto::UnmountSegmentRequest { client_id, segment_id })),
        1 => (uuid(), uuid(), prop_oneof![Just(0u64), Just(u64::MAX), 0..10_000u64]).prop_map(|(client_id, segment_id, grace_period_ms)| Call::GracefulUnmount(proto::GracefulUnmountSegmentRequest { client_id, segment_id, grace_period_ms })),
        5 => put_start.clone().prop_map(Call::PutStart),
        2 => put_start.prop_map(Call::UpsertStart),
        5 => key_request.clone().prop_map(Call::PutEnd),
        1 => key_request.prop_map(Call::PutRevoke),
        2 => batch_start.clone().prop_map(Call::BatchPutStart),
        1 => batch_start.prop_map(Call::BatchUpsertStart),
        2 => batch_keys.clone().prop_map(Call::BatchPutEnd),
        1 => batch_keys.prop_map(Call::BatchPutRevoke),
        3 => key().prop_map(|key| Call::GetReplicaList(proto::GetReplicaListRequest { key })),
        1 => keys().prop_map(|keys| Call::BatchGetReplicaList(proto::BatchGetReplicaListRequest { keys })),
        1 => key().prop_map(|key| Call::ExistKey(proto::ExistKeyRequest { key })),
        1 => keys().prop_map(|keys| Call::BatchExistKey(proto::BatchExistKeyRequest { keys })),
        2 => (key(), any::<bool>()).prop_map(|(key, force)| Call::Remove(proto::RemoveRequest { key, force })),
        1 => (keys(), any::<bool>()).prop_map(|(keys, force)| Call::BatchRemove(proto::BatchRemoveRequest { keys, force })),
        1 => (pattern, any::<bool>()).prop_map(|(pattern, force)| Call::RemoveByRegex(proto::RemoveByRegexRequest { pattern, force })),
        1 => any::<bool>().prop_map(|force| Call::RemoveAll(proto::RemoveAllRequest { force })),
        2 => prop_oneof![8 => 0..3u64, 1 => Just(25u64)].prop_map(Call::Advance),
    ]
}

fn admin<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.extensions_mut().insert(Caller::Admin);
    request
}

/// Writes the master granted: (client, key, write id). A request naming write id `i < 4`
/// ends the `i`-th of them as its writer would; `4 <= i < 8` names its id under the
/// request's own key and client, as a confused or hostile client would.
#[derive(Default)]
struct Granted(Vec<(Option<proto::Uuid>, String, u64)>);

impl Granted {
    /// Remembers a granted write; whether it was granted.
    fn note(
        &mut self,
        client: &Option<proto::Uuid>,
        key: &str,
        reply: &proto::PutStartResponse,
    ) -> bool {
        let granted = reply.outcome.as_ref().is_none_or(|o| o.code == 0) && reply.write_id != 0;
        if granted {
            self.0.push((*client, key.to_owned(), reply.write_id));
        }
        granted
    }

    fn note_batch(
        &mut self,
        client: &Option<proto::Uuid>,
        keys: &[String],
        reply: Result<tonic::Response<proto::BatchPutStartResponse>, tonic::Status>,
    ) -> bool {
        let Ok(reply) = reply else { return false };
        let mut any = false;
        for (key, result) in keys.iter().zip(&reply.get_ref().results) {
            any |= self.note(client, key, result);
        }
        any
    }

    fn aim(&self, client: &mut Option<proto::Uuid>, key: &mut String, write_id: &mut u64) {
        if self.0.is_empty() || *write_id >= 8 {
            return;
        }
        let index = (*write_id as usize) % self.0.len();
        let (granted_client, granted_key, id) = &self.0[self.0.len() - 1 - index];
        if *write_id < 4 {
            *client = *granted_client;
            key.clone_from(granted_key);
        }
        *write_id = *id;
    }
}

/// Runs `call`; a refusal is as good as an answer. Whether the call succeeded, by name.
async fn run(service: &MasterService, granted: &mut Granted, call: Call) -> (&'static str, bool) {
    macro_rules! answer {
        ($method:ident, $message:expr) => {{
            let ok = match service.$method(admin($message)).await {
                Ok(reply) => format!("{:?}", reply.get_ref()).matches("code: -").count() == 0,
                Err(_) => false,
            };
            (stringify!($method), ok)
        }};
    }
    match call {
        Call::Ping(m) => answer!(ping, m),
        Call::Mount(m) => answer!(mount_segment, m),
        Call::Remount(m) => answer!(re_mount_segment, m),
        Call::Unmount(m) => answer!(unmount_segment, m),
        Call::GracefulUnmount(m) => answer!(graceful_unmount_segment, m),
        Call::PutStart(m) => {
            let (client, key) = (m.client_id, m.key.clone());
            let reply = service.put_start(admin(m)).await;
            (
                "put_start",
                reply.is_ok_and(|r| granted.note(&client, &key, r.get_ref())),
            )
        }
        Call::UpsertStart(m) => {
            let (client, key) = (m.client_id, m.key.clone());
            let reply = service.upsert_start(admin(m)).await;
            (
                "upsert_start",
                reply.is_ok_and(|r| granted.note(&client, &key, r.get_ref())),
            )
        }
        Call::PutEnd(mut m) => {
            granted.aim(&mut m.client_id, &mut m.key, &mut m.write_id);
            answer!(put_end, m)
        }
        Call::PutRevoke(mut m) => {
            granted.aim(&mut m.client_id, &mut m.key, &mut m.write_id);
            answer!(put_revoke, m)
        }
        Call::BatchPutStart(m) => {
            let (client, keys) = (m.client_id, m.keys.clone());
            let reply = service.batch_put_start(admin(m)).await;
            ("batch_put_start", granted.note_batch(&client, &keys, reply))
        }
        Call::BatchUpsertStart(m) => {
            let (client, keys) = (m.client_id, m.keys.clone());
            let reply = service.batch_upsert_start(admin(m)).await;
            (
                "batch_upsert_start",
                granted.note_batch(&client, &keys, reply),
            )
        }
        Call::BatchPutEnd(mut m) => {
            aim_batch(granted, &mut m);
            answer!(batch_put_end, m)
        }
        Call::BatchPutRevoke(mut m) => {
            aim_batch(granted, &mut m);
            answer!(batch_put_revoke, m)
        }
        Call::GetReplicaList(m) => answer!(get_replica_list, m),
        Call::BatchGetReplicaList(m) => answer!(batch_get_replica_list, m),
        Call::ExistKey(m) => answer!(exist_key, m),
        Call::BatchExistKey(m) => answer!(batch_exist_key, m),
        Call::Remove(m) => answer!(remove, m),
        Call::BatchRemove(m) => answer!(batch_remove, m),
        Call::RemoveByRegex(m) => answer!(remove_by_regex, m),
        Call::RemoveAll(m) => answer!(remove_all, m),
        Call::Advance(_) => ("advance", true),
    }
}

fn aim_batch(granted: &Granted, m: &mut proto::BatchKeysRequest) {
    for (key, write_id) in m.keys.iter_mut().zip(m.write_ids.iter_mut()) {
        let mut client = m.client_id;
        granted.aim(&mut client, key, write_id);
        if *write_id < 4 {
            m.client_id = client;
        }
    }
}

/// Runs `calls` against a fresh master with millisecond timeouts, checking the invariants
/// after each; the successes by call.
/// Runs `calls` against a fresh master whose timeouts are `slowdown` times the fuzzer's tight
/// ones (20 ms client TTL, 2 ms leases).
fn drive(calls: Vec<Call>, slowdown: u32) -> Vec<(&'static str, bool)> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let config = MasterConfig {
        client_ttl: Duration::from_millis(20) * slowdown,
        default_kv_lease_ttl: Duration::from_millis(2) * slowdown,
        put_start_discard_timeout: Duration::from_millis(2) * slowdown,
        put_start_release_timeout: Duration::from_millis(6) * slowdown,
        ..MasterConfig::default()
    };
    let state = Arc::new(Mutex::new(Master::new(config).unwrap()));
    let (_role, leading) = watch::channel(Role::Leader(None));
    let service = MasterService::new(state.clone(), leading, Arc::new(OpCounters::default()));
    runtime.block_on(async {
        let mut outcomes = Vec::new();
        let mut granted = Granted::default();
        for call in calls {
            if let Call::Advance(ms) = call {
                std::thread::sleep(Duration::from_millis(ms));
                Master::lock(&state).tick(Instant::now());
            } else {
                outcomes.push(run(&service, &mut granted, call).await);
            }
            Master::lock(&state).check_invariants();
        }
        outcomes
    })
}

/// The mix is hostile but not hopeless: mounts, writes, reads and removals all succeed
/// often enough that the fuzzer reaches the states behind them. Timeouts are stretched so that
/// what expires depends on the calls, not on how busy the machine is.
#[test]
fn hostile_calls_still_reach_deep_states() {
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let mut successes = std::collections::BTreeMap::<&str, u32>::new();
    for _ in 0..200 {
        let calls = proptest::collection::vec(call(), 30..60)
            .new_tree(&mut runner)
            .unwrap()
            .current();
        for (name, ok) in drive(calls, 50) {
            *successes.entry(name).or_default() += u32::from(ok);
        }
    }
    for deep in [
        "mount_segment",
        "put_start",
        "put_end",
        "get_replica_list",
        "remove",
        "batch_put_start",
    ] {
        assert!(
            successes.get(deep).copied().unwrap_or(0) > 0,
            "{deep} never succeeded: {successes:?}"
        );
    }
}

proptest! {
    #[test]
    fn every_handler_answers_hostile_requests(calls in proptest::collection::vec(call(), 1..60)) {
        drive(calls, 1);
    }
}
