//! A master that lies about sizes: the client refuses its replica lists and never copies more
//! than the destination holds, or more than the caller gave it.

use std::sync::{Arc, Mutex};

use mooncake_common::{pattern, EngineConfig, ErrorKind};
use mooncake_store::client::{StoreClient, StoreConfig};
use mooncake_store::master::service::{MasterService, OpCounters, Role};
use mooncake_store::master::{Master, MasterConfig, WriteConfig};
use mooncake_store::proto::master_server::{Master as Rpc, MasterServer as Grpc};
use mooncake_store::proto::*;
use tonic::{Request, Response, Status};

/// How the liar bends the truth.
#[derive(Clone, Copy, PartialEq)]
enum Lie {
    /// Replica lists lead with a made-up replica of the true size, and the real replica claims
    /// twice its size.
    MixedSizes,
    /// Every replica claims twice its size.
    Inflated,
    /// Write grants name replicas twice the size asked for (and no space is reserved, so
    /// that every put takes the two-round-trip path).
    LargerGrant,
    /// Reservations claim twice the size granted.
    LargerReservation,
}

struct Liar {
    honest: MasterService,
    lie: Lie,
}

impl Liar {
    fn bend(&self, reply: &mut GetReplicaListResponse) {
        let Some(real) = reply.replicas.first().cloned() else {
            return;
        };
        match self.lie {
            Lie::MixedSizes => {
                let fake = Replica {
                    transport_endpoint: "10.255.255.1:9".into(),
                    id: real.id + 1_000_000,
                    ..real.clone()
                };
                reply.replicas[0].size *= 2;
                reply.replicas.insert(0, fake);
            }
            Lie::Inflated => reply.replicas.iter_mut().for_each(|r| r.size *= 2),
            Lie::LargerGrant | Lie::LargerReservation => {}
        }
    }
}

type Reply<T> = Result<Response<T>, Status>;

/// The service: the listed calls answered honestly, the rest as written out.
macro_rules! liar {
    (honest { $($name:ident($request:ty) -> $response:ty;)* } $($lies:tt)*) => {
        #[tonic::async_trait]
        impl Rpc for Liar {
            $(async fn $name(&self, request: Request<$request>) -> Reply<$response> {
                self.honest.$name(request).await
            })*
            $($lies)*
        }
    };
}

liar! {
    honest {
        service_ready(ServiceReadyRequest) -> ServiceReadyResponse;
        ping(PingRequest) -> PingResponse;
        mount_segment(MountSegmentRequest) -> Outcome;
        re_mount_segment(ReMountSegmentRequest) -> Outcome;
        unmount_segment(UnmountSegmentRequest) -> Outcome;
        graceful_unmount_segment(GracefulUnmountSegmentRequest) -> Outcome;
        put_start(PutStartRequest) -> PutStartResponse;
        put_end(KeyRequest) -> Outcome;
        put_revoke(KeyRequest) -> Outcome;
        upsert_start(PutStartRequest) -> PutStartResponse;
        batch_put_end(BatchKeysRequest) -> BatchOutcome;
        batch_put_revoke(BatchKeysRequest) -> BatchOutcome;
        batch_upsert_start(BatchPutStartRequest) -> BatchPutStartResponse;
        exist_key(ExistKeyRequest) -> ExistKeyResponse;
        batch_exist_key(BatchExistKeyRequest) -> BatchExistKeyResponse;
        remove(RemoveRequest) -> Outcome;
        batch_remove(BatchRemoveRequest) -> BatchOutcome;
        remove_by_regex(RemoveByRegexRequest) -> CountResponse;
        remove_all(RemoveAllRequest) -> CountResponse;
        renew_reservations(RenewReservationsRequest) -> RenewReservationsResponse;
        release_reservation(ReleaseReservationRequest) -> Outcome;
        commit_reserved(CommitReservedRequest) -> BatchOutcome;
    }

    async fn batch_put_start(
        &self,
        request: Request<BatchPutStartRequest>,
    ) -> Reply<BatchPutStartResponse> {
        let mut reply = self.honest.batch_put_start(request).await?;
        if self.lie == Lie::LargerGrant {
            for result in &mut reply.get_mut().results {
                result.replicas.iter_mut().for_each(|r| r.size *= 2);
            }
        }
        Ok(reply)
    }

    async fn reserve(&self, request: Request<ReserveRequest>) -> Reply<ReserveResponse> {
        if self.lie == Lie::LargerGrant {
            return Ok(Response::new(ReserveResponse {
                outcome: Some(Outcome {
                    code: -200,
                    error: "ERR_NO_AVAILABLE_HANDLE".into(),
                    message: "no space".into(),
                    kind: mooncake_store::proto::ErrorKind::ErrNoAvailableHandle as i32,
                }),
                ..Default::default()
            }));
        }
        let mut reply = self.honest.reserve(request).await?;
        if self.lie == Lie::LargerReservation {
            reply.get_mut().size *= 2;
        }
        Ok(reply)
    }

    async fn get_replica_list(
        &self,
        request: Request<GetReplicaListRequest>,
    ) -> Reply<GetReplicaListResponse> {
        let mut reply = self.honest.get_replica_list(request).await?;
        self.bend(reply.get_mut());
        Ok(reply)
    }

    async fn batch_get_replica_list(
        &self,
        request: Request<BatchGetReplicaListRequest>,
    ) -> Reply<BatchGetReplicaListResponse> {
        let mut reply = self.honest.batch_get_replica_list(request).await?;
        reply.get_mut().results.iter_mut().for_each(|r| self.bend(r));
        Ok(reply)
    }
}

/// A lying master on loopback, and its address.
async fn liar(lie: Lie) -> String {
    let state = Arc::new(Mutex::new(Master::new(MasterConfig::default()).unwrap()));
    let (_, leading) = tokio::sync::watch::channel(Role::Leader(None));
    let honest = MasterService::new(state, leading, Arc::new(OpCounters::default()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        tonic::transport::Server::builder()
            .add_service(Grpc::new(Liar { honest, lie }))
            .serve_with_incoming(incoming)
            .await
    });
    address
}

async fn client(master: &str) -> Arc<StoreClient> {
    let mut engine = EngineConfig::from_env("127.0.0.1", "P2PHANDSHAKE");
    engine.advertised_host = Some("127.0.0.1".into());
    let mut config = StoreConfig::new(engine);
    config.master_address = master.to_owned();
    config.global_segment_size = 16 << 20;
    config.local_buffer_size = 4 << 20;
    StoreClient::connect(config).await.unwrap()
}

const VALUE: usize = 64 << 10;
const GUARD: u8 = 0xA5;

fn value() -> Vec<u8> {
    pattern::bytes(1, 0, VALUE)
}

/// Reads `key` with `getInto` into the first half of a registered region whose second half
/// is a guard; returns the outcome's code and whether the guard is intact.
async fn read_guarded(client: &StoreClient, key: &str) -> (Option<ErrorKind>, bool) {
    let region = client.engine().allocate(2 * VALUE).unwrap();
    let base = region.as_ptr() as usize;
    // SAFETY: the region is ours, and no transfer uses it yet.
    unsafe { std::ptr::write_bytes(region.as_ptr().add(VALUE), GUARD, VALUE) };
    let outcome = client.get_into(key, base, VALUE).await;
    // SAFETY: the read settled; nothing writes the region any more.
    let guard = unsafe { std::slice::from_raw_parts(region.as_ptr().add(VALUE), VALUE) };
    (
        outcome.err().map(|e| e.kind()),
        guard.iter().all(|b| *b == GUARD),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_of_different_sizes_are_refused() {
    let master = liar(Lie::MixedSizes).await;
    let node = client(&master).await;
    node.put("k", &value(), &WriteConfig::default())
        .await
        .unwrap();
    let (code, guard) = read_guarded(&node, "k").await;
    assert_eq!(code, Some(ErrorKind::Protocol));
    assert!(guard, "nothing was written past the destination");
    assert_eq!(node.get("k").await.unwrap_err().kind(), ErrorKind::Protocol);
    let batch = node.batch_get(&["k".into()]).await;
    assert_eq!(batch[0].as_ref().unwrap_err().kind(), ErrorKind::Protocol);
    node.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_size_larger_than_the_destination_is_an_overflow_not_a_longer_copy() {
    let master = liar(Lie::Inflated).await;
    let node = client(&master).await;
    node.put("k", &value(), &WriteConfig::default())
        .await
        .unwrap();
    let (code, guard) = read_guarded(&node, "k").await;
    assert_eq!(code, Some(ErrorKind::BufferOverflow));
    assert!(guard, "nothing was written past the destination");
    let region = node.engine().allocate(4 * VALUE).unwrap();
    let (addr, cap) = (region.as_ptr() as usize, VALUE);
    let batch = node.batch_get_into(&["k".into()], &[(addr, cap)]).await;
    assert_eq!(
        batch[0].as_ref().unwrap_err().kind(),
        ErrorKind::BufferOverflow
    );
    node.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_larger_than_the_value_writes_nothing() {
    let master = liar(Lie::LargerGrant).await;
    let node = client(&master).await;
    let err = node
        .put("k", &value(), &WriteConfig::default())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Protocol);
    assert_eq!(
        node.get("k").await.unwrap_err().kind(),
        ErrorKind::ObjectNotFound,
        "the write was revoked"
    );
    node.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reservation_larger_than_granted_is_not_used() {
    let master = liar(Lie::LargerReservation).await;
    let node = client(&master).await;
    node.put("k", &value(), &WriteConfig::default())
        .await
        .unwrap();
    assert_eq!(node.get("k").await.unwrap().to_vec(), value());
    node.close().await;
}
