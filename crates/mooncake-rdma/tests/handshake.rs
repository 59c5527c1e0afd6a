//! The QP handshake: ready-ack, rejections, peer restart, and a real handshake listener.

mod common;

use std::sync::Arc;

use common::*;
use mooncake_common::Result;
use mooncake_metadata::handshake::messages::{ConnectionMessage, NotifyMessage};
use mooncake_metadata::handshake::{HandshakeHandler, HandshakeServer};
use mooncake_rdma::verbs::Provider;
use mooncake_rdma::{EndpointState, HandshakeConnector, RdmaOptions, RdmaPeer, RdmaTransport};
use mooncake_transport::rail::RailPolicy;
use mooncake_transport::{Arena, Opcode, Region};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_ack_round_trip_connects_both_sides() {
    let world = World::new();
    let (a, b) = world.pair();
    a.fill(7);
    let batch = submit(
        &a,
        &b.peer(),
        &[(Opcode::Write, 0, remote(&b, 0), MIB)],
        MIB,
    );
    batch.wait().await;
    assert!(batch.errors().is_empty(), "{:?}", batch.errors());

    let log = world.connector.log.lock().unwrap().clone();
    assert!(!log.is_empty());
    for (req, reply) in &log {
        assert!(reply.reply_msg.is_empty(), "{reply:?}");
        assert_eq!(reply.local_nic_path, req.peer_nic_path);
        assert_eq!(reply.peer_nic_path, req.local_nic_path);
        assert_eq!(reply.qp_num.len(), 2);
    }
    // Each connection: a request with ready_ack false, then the same QPs with true.
    let first = log
        .iter()
        .find(|(r, _)| r.ready_ack == Some(false))
        .unwrap();
    let ack = log
        .iter()
        .find(|(r, _)| {
            r.ready_ack == Some(true)
                && r.local_nic_path == first.0.local_nic_path
                && r.peer_nic_path == first.0.peer_nic_path
        })
        .expect("ready-ack sent");
    assert_eq!(ack.0.qp_num, first.0.qp_num);

    let (local_dev, peer_path) = {
        let (srv, dev) = first.0.local_nic_path.split_once('@').unwrap();
        assert_eq!(srv, "A");
        (dev.to_owned(), first.0.peer_nic_path.clone())
    };
    let mine = a.transport.endpoint_info(&local_dev, &peer_path).unwrap();
    let remote_dev = peer_path.split_once('@').unwrap().1;
    let theirs = b
        .transport
        .endpoint_info(remote_dev, &first.0.local_nic_path)
        .unwrap();
    assert_eq!(mine.state, EndpointState::Connected);
    assert_eq!(theirs.state, EndpointState::Connected);
    assert_eq!(mine.peer_qp_nums.as_ref(), Some(&theirs.qp_nums));
    assert_eq!(theirs.peer_qp_nums.as_ref(), Some(&mine.qp_nums));
    close(&[&a, &b]).await;
}

fn request(from: &str, to: &str, qps: Vec<u32>, ack: Option<bool>) -> ConnectionMessage {
    ConnectionMessage {
        local_gid: "00:00:00:00:00:00:00:00:00:00:ff:ff:c0:00:02:01".into(),
        local_lid: 0,
        local_nic_path: from.into(),
        payload: String::new(),
        peer_nic_path: to.into(),
        qp_num: qps,
        ready_ack: ack,
        reply_msg: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mismatched_requests_are_rejected() {
    let world = World::new();
    let (a, b) = world.pair();
    let qps = world.fabric.qp_nums("mlx_a0");
    assert!(qps.is_empty());
    let cases = [
        request("A@mlx_a0", "B@mlx_nope", vec![1, 2], Some(false)),
        request("A@mlx_a0", "C@mlx_b0", vec![1, 2], Some(false)),
        request("A@mlx_a0", "B@mlx_b0", vec![1, 2, 3], Some(false)),
        request("A@mlx_a0", "no-at-sign", vec![1, 2], Some(false)),
        request("A@mlx_a0", "B@mlx_b0", vec![1, 2], Some(true)),
        ConnectionMessage {
            local_gid: "garbage".into(),
            ..request("A@mlx_a0", "B@mlx_b0", vec![1, 2], Some(false))
        },
    ];
    for req in cases {
        let reply = b.transport.on_connection(req.clone());
        assert!(!reply.reply_msg.is_empty(), "accepted {req:?}");
        assert_eq!(reply.local_nic_path, req.peer_nic_path);
        assert_eq!(reply.peer_nic_path, req.local_nic_path);
    }
    let reply =
        b.transport
            .on_connection(request("A@mlx_a0", "B@mlx_b0", vec![1, 2, 3], Some(false)));
    assert!(reply.reply_msg.contains("QP count"), "{}", reply.reply_msg);

    // End to end: a side with three QPs per endpoint cannot connect.
    let mut config = config();
    config.num_qp_per_ep = 3;
    config.retry_cnt = 3;
    let c = world.node("C", &["mlx_a0"], 4 * MIB, config);
    let batch = submit(
        &c,
        &b.peer(),
        &[(Opcode::Write, 0, remote(&b, 0), MIB)],
        MIB,
    );
    batch.wait().await;
    assert_eq!(batch.errors().len(), 1, "{:?}", batch.errors());
    assert!(world
        .connector
        .log
        .lock()
        .unwrap()
        .iter()
        .any(|(_, reply)| reply.reply_msg.contains("QP count")));
    close(&[&a, &b, &c]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_peer_gets_a_rebuilt_endpoint() {
    let world = World::new();
    let (a, b) = world.pair();
    a.fill(8);
    // B connects to A (B active), so A holds passive endpoints keyed by B's paths.
    let batch = submit(
        &b,
        &a.peer(),
        &[(Opcode::Read, 0, remote(&a, 0), 2 * MIB)],
        MIB,
    );
    batch.wait().await;
    assert!(batch.errors().is_empty(), "{:?}", batch.errors());
    let old = a.transport.endpoint_info("mlx_a0", "B@mlx_b0").unwrap();
    b.transport.close().await;
    drop(b);

    // "B" comes back on the same devices with new QPs.
    let b2 = world.node("B", &["mlx_b0", "mlx_b1"], 16 * MIB, config());
    let batch = submit(
        &b2,
        &a.peer(),
        &[(Opcode::Read, 0, remote(&a, 0), 2 * MIB)],
        MIB,
    );
    batch.wait().await;
    assert!(batch.errors().is_empty(), "{:?}", batch.errors());
    assert_eq!(b2.bytes(0, 2 * MIB), a.bytes(0, 2 * MIB));
    let new = a.transport.endpoint_info("mlx_a0", "B@mlx_b0").unwrap();
    assert_eq!(new.state, EndpointState::Connected);
    assert_ne!(new.peer_qp_nums, old.peer_qp_nums);
    let theirs = b2.transport.endpoint_info("mlx_b0", "A@mlx_a0").unwrap();
    assert_eq!(new.peer_qp_nums.as_ref(), Some(&theirs.qp_nums));

    // And A can reach the new B, whatever stale endpoints it still had.
    let batch = submit(
        &a,
        &b2.peer(),
        &[(Opcode::Write, 4 * MIB, remote(&b2, 4 * MIB), 2 * MIB)],
        MIB,
    );
    batch.wait().await;
    assert!(batch.errors().is_empty(), "{:?}", batch.errors());
    assert_eq!(b2.bytes(4 * MIB, 2 * MIB), a.bytes(4 * MIB, 2 * MIB));
    close(&[&a, &b2]).await;
}

struct Passive(Arc<RdmaTransport>);

impl HandshakeHandler for Passive {
    fn on_metadata(&self, _peer_desc: &str) -> Result<String> {
        Err(mooncake_common::Error::invalid("not in this test"))
    }
    fn on_notify(&self, _message: NotifyMessage) {}
    fn on_connection(&self, request: ConnectionMessage) -> ConnectionMessage {
        self.0.on_connection(request)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_through_a_real_handshake_listener() {
    let world = World::new();
    let provider: Arc<dyn Provider> = Arc::new(world.fabric.clone());
    let open = |name: &str, devices: &[&str]| {
        let options = RdmaOptions {
            server_name: name.to_owned(),
            devices: devices.iter().map(|s| s.to_string()).collect(),
            matrix: matrix(devices),
            config: config(),
            rail_policy: RailPolicy::default(),
        };
        let transport = Arc::new(
            RdmaTransport::new(
                provider.clone(),
                options,
                Arc::new(HandshakeConnector::default()),
            )
            .unwrap(),
        );
        let region = Arc::new(Region::arena(
            Arc::new(Arena::new(name, 4 * MIB).unwrap()),
            "cpu:0",
        ));
        transport.register(&region).unwrap();
        Node {
            name: name.to_owned(),
            devices: devices.iter().map(|s| s.to_string()).collect(),
            transport,
            region,
            matrix: matrix(devices),
        }
    };
    let a = open("A", &["mlx_a0", "mlx_a1"]);
    let b = open("B", &["mlx_b0", "mlx_b1"]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = HandshakeServer::start(
        listener,
        Arc::new(Passive(b.transport.clone())),
        1 << 20,
        16,
    )
    .unwrap();
    let peer = Arc::new(RdmaPeer::from_desc(&b.desc(), &server.local_addr().to_string()).unwrap());
    a.fill(9);
    let batch = submit(
        &a,
        &peer,
        &[(Opcode::Write, 0, remote(&b, 0), 3 * MIB)],
        MIB,
    );
    batch.wait().await;
    assert!(batch.errors().is_empty(), "{:?}", batch.errors());
    assert_eq!(b.bytes(0, 3 * MIB), a.bytes(0, 3 * MIB));
    server.close().await;
    close(&[&a, &b]).await;
}
