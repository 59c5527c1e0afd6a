//! The gRPC face of the master: converts messages, takes the lock, calls the state machine.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use mooncake_common::{Error, ErrorKind, Result};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use super::log::Log;
use super::state::{ReservationGrant, ReservedPart, RESERVATION_TTL};
use super::types::{
    ClientId, ClientStatus, ReplicaDesc, SegmentId, WriteConfig, WriteGrant, WriteId,
    MAX_REPORTED_RAILS,
};
use super::Master;
use crate::access::require_admin;
use crate::proto;
use crate::wire::{
    first, from_rail_report, from_segment, from_uuid, from_write_config, to_outcome, to_replica,
    to_status, STORE_VERSION,
};

/// Requests and failures per operation, for `master_<op>_requests_total` and
/// `master_<op>_failures_total`, and the bytes of the objects written and read.
#[derive(Default)]
pub struct OpCounters {
    /// op -> [requests, failures]
    counters: Mutex<BTreeMap<&'static str, [u64; 2]>>,
    put_bytes: AtomicU64,
    get_bytes: AtomicU64,
}

impl OpCounters {
    pub(super) fn count(&self, op: &'static str, items: usize, failures: usize) {
        let mut map = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        let entry = map.entry(op).or_default();
        entry[0] += items as u64;
        entry[1] += failures as u64;
    }

    /// Counts `bytes` of objects granted space for writing.
    pub(super) fn count_put_bytes(&self, bytes: u64) {
        self.put_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Counts `bytes` of objects whose replicas went to a reader.
    pub(super) fn count_get_bytes(&self, bytes: u64) {
        self.get_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Bytes of the objects granted space for writing so far.
    pub fn put_bytes(&self) -> u64 {
        self.put_bytes.load(Ordering::Relaxed)
    }

    /// Bytes of the objects whose replicas went to readers so far.
    pub fn get_bytes(&self) -> u64 {
        self.get_bytes.load(Ordering::Relaxed)
    }

    /// `(op, requests, failures)` for every operation seen.
    pub fn snapshot(&self) -> Vec<(&'static str, u64, u64)> {
        self.counters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(op, [r, f])| (*op, *r, *f))
            .collect()
    }
}

/// What this master is doing now.
#[derive(Clone, Default)]
pub enum Role {
    /// Serving; with a log, a change is acknowledged only once its entry is durable.
    Leader(Option<Log>),
    /// Following the leader's log; serves nothing.
    #[default]
    Standby,
}

/// The service: the state machine behind a lock, this master's role, and counters.
#[derive(Clone)]
pub struct MasterService {
    state: Arc<Mutex<Master>>,
    role: watch::Receiver<Role>,
    counters: Arc<OpCounters>,
}

impl MasterService {
    /// Counts `items` requests of `op`, `failures` of them failed.
    pub(super) fn count(&self, op: &'static str, items: usize, failures: usize) {
        self.counters.count(op, items, failures);
    }

    /// Serves `state` while `role` says it leads.
    pub fn new(
        state: Arc<Mutex<Master>>,
        role: watch::Receiver<Role>,
        counters: Arc<OpCounters>,
    ) -> Self {
        Self {
            state,
            role,
            counters,
        }
    }

    /// The state, when this master serves.
    pub(super) fn master(&self) -> std::result::Result<MutexGuard<'_, Master>, Status> {
        let master = Master::lock(&self.state);
        // Checked under the lock: a master that stepped down reloads its state under it.
        self.leading()?;
        Ok(master)
    }

    /// This master's log when it leads (`None` without one), or why it does not serve.
    fn leading(&self) -> std::result::Result<Option<Log>, Status> {
        match &*self.role.borrow() {
            Role::Leader(Some(log)) if !log.healthy() => Err(unavailable(
                "this master can no longer make changes durable; it acknowledges nothing",
            )),
            Role::Leader(log) => Ok(log.clone()),
            Role::Standby => Err(unavailable("this master is a standby; ask the leader")),
        }
    }

    /// Runs `change` under the lock, queues the log entry it produced before any other change
    /// can take the lock, and waits until that entry is durable.
    pub(super) async fn durably<T>(
        &self,
        change: impl FnOnce(&mut Master) -> T,
    ) -> std::result::Result<T, Status> {
        Ok(self.durably_logged(change).await?.0)
    }

    /// Waits until every entry taken so far is durable: an answer drawn from state that the log
    /// may not have yet (a commit already done, a key that already exists) must not be
    /// acknowledged before it is.
    pub(super) async fn earlier_durable(&self) -> std::result::Result<(), Status> {
        let log = self.leading()?;
        let seq = self.master()?.last_seq();
        if let Some(log) = log {
            log.durable(seq).await.map_err(|e| to_status(&e))?;
        }
        Ok(())
    }

    /// [`durably`](Self::durably), and whether the change wrote a log entry.
    async fn durably_logged<T>(
        &self,
        change: impl FnOnce(&mut Master) -> T,
    ) -> std::result::Result<(T, bool), Status> {
        let log = self.leading()?;
        let (out, seq) = {
            let mut master = self.master()?;
            let out = change(&mut master);
            (out, log.as_ref().and_then(|log| log.submit(&mut master)))
        };
        if let (Some(log), Some(seq)) = (log, seq) {
            log.durable(seq).await.map_err(|e| to_status(&e))?;
            return Ok((out, true));
        }
        Ok((out, false))
    }
}

fn unavailable(message: &str) -> Status {
    Status::unavailable(format!(
        "[{}] {message}",
        ErrorKind::UnavailableInCurrentStatus.code()
    ))
}

fn uuid(value: Option<proto::Uuid>, what: &str) -> std::result::Result<u128, Status> {
    let value = value.ok_or_else(|| bad_request(format!("{what} is required")))?;
    Ok(from_uuid(value))
}

fn bad_request(message: String) -> Status {
    Status::invalid_argument(format!("[{}] {message}", ErrorKind::InvalidArgument.code()))
}

fn put_response(result: Result<WriteGrant>) -> proto::PutStartResponse {
    match result {
        Ok(grant) => proto::PutStartResponse {
            outcome: Some(proto::Outcome::default()),
            replicas: grant.replicas.iter().map(to_replica).collect(),
            write_id: grant.write.0,
        },
        Err(e) => proto::PutStartResponse {
            outcome: Some(to_outcome(&Err(e))),
            ..Default::default()
        },
    }
}

fn replica_list(result: Result<(Vec<ReplicaDesc>, Duration)>) -> proto::GetReplicaListResponse {
    match result {
        Ok((replicas, ttl)) => proto::GetReplicaListResponse {
            outcome: Some(proto::Outcome::default()),
            replicas: replicas.iter().map(to_replica).collect(),
            lease_ttl_ms: ttl.as_millis() as u64,
        },
        Err(e) => proto::GetReplicaListResponse {
            outcome: Some(to_outcome(&Err(e))),
            ..Default::default()
        },
    }
}

type Reply<T> = std::result::Result<Response<T>, Status>;

/// An object's replicas and the read lease granted with them.
pub(super) type ReplicaList = (Vec<ReplicaDesc>, Duration);

impl MasterService {
    /// Starts a write of each `(key, size)`: the door every kind of client's put and upsert
    /// goes through. With `named_by_key` (clients that end writes by key, not by write id), a
    /// client's write never preempts its own write in progress: the older write's end would
    /// commit the newer one's replicas before their bytes are there.
    pub(super) async fn start_writes(
        &self,
        op: &'static str,
        client: ClientId,
        writes: &[(String, u64)],
        config: &WriteConfig,
        upsert: bool,
        named_by_key: bool,
    ) -> std::result::Result<Vec<Result<WriteGrant>>, Status> {
        let now = Instant::now();
        let start = |master: &mut Master, key: &str, size: u64| {
            let own = master
                .write_in_progress(key)
                .is_some_and(|(writer, _)| writer == client);
            if named_by_key && own {
                let (kind, what) = if upsert {
                    (
                        ErrorKind::ObjectReplicaBusy,
                        "is being written by this client",
                    )
                } else {
                    (ErrorKind::ObjectAlreadyExists, "is being written")
                };
                return Err(Error::new(kind, format!("'{key}' {what}")));
            }
            if upsert {
                master.upsert_start(now, client, key, size, config)
            } else {
                master.put_start(now, client, key, size, config)
            }
        };
        // An upsert in place stops the log vouching for the old bytes before they change.
        let (mut results, logged): (Vec<_>, bool) = self
            .durably_logged(|master| {
                writes
                    .iter()
                    .map(|(key, size)| start(master, key, *size))
                    .collect()
            })
            .await?;
        // Space that an eviction freed for these writes goes back only once the eviction is
        // durable, which it now is: one more try for the writes that found none.
        let no_space = |r: &Result<WriteGrant>| {
            r.as_ref()
                .is_err_and(|e| e.kind() == ErrorKind::NoAvailableHandle)
        };
        if logged && results.iter().any(no_space) {
            let retry: Vec<usize> = (0..results.len())
                .filter(|i| no_space(&results[*i]))
                .collect();
            let again: Vec<_> = self
                .durably(|master| {
                    retry
                        .iter()
                        .map(|i| start(master, &writes[*i].0, writes[*i].1))
                        .collect()
                })
                .await?;
            for (i, r) in retry.into_iter().zip(again) {
                results[i] = r;
            }
        }
        // A put of a key that exists succeeds for the client (insert-if-absent): only once
        // the existing value is durable.
        let exists = |r: &Result<WriteGrant>| {
            r.as_ref()
                .is_err_and(|e| e.kind() == ErrorKind::ObjectAlreadyExists)
        };
        if results.iter().any(exists) {
            self.earlier_durable().await?;
        }
        self.counters.count(
            op,
            results.len(),
            results.iter().filter(|r| r.is_err()).count(),
        );
        let granted = writes.iter().zip(&results).filter(|(_, r)| r.is_ok());
        self.counters
            .count_put_bytes(granted.map(|((_, size), _)| *size).sum());
        Ok(results)
    }

    async fn batch_start(
        &self,
        op: &'static str,
        request: proto::BatchPutStartRequest,
        upsert: bool,
    ) -> Reply<proto::BatchPutStartResponse> {
        let client = ClientId(uuid(request.client_id, "client_id")?);
        if request.keys.len() != request.sizes.len() {
            return Err(bad_request(format!(
                "{} keys but {} sizes",
                request.keys.len(),
                request.sizes.len()
            )));
        }
        let config = from_write_config(request.config);
        let writes: Vec<(String, u64)> = request.keys.into_iter().zip(request.sizes).collect();
        let results = self
            .start_writes(op, client, &writes, &config, upsert, false)
            .await?;
        Ok(Response::new(proto::BatchPutStartResponse {
            results: results.into_iter().map(put_response).collect(),
        }))
    }

    /// Ends or revokes writes, each key with the write id its start returned: the door every
    /// kind of client's commit and revoke goes through.
    pub(super) async fn finish_writes(
        &self,
        op: &'static str,
        client: ClientId,
        writes: &[(String, WriteId)],
        apply: impl Fn(&mut Master, ClientId, &str, WriteId) -> Result<()>,
    ) -> std::result::Result<Vec<Result<()>>, Status> {
        let (results, logged): (Vec<_>, bool) = self
            .durably_logged(|master| {
                writes
                    .iter()
                    .map(|(key, write)| {
                        if write.0 == 0 {
                            Err(Error::new(
                                ErrorKind::InvalidArgument,
                                format!("'{key}': the write id its start returned is required"),
                            ))
                        } else {
                            apply(master, client, key, *write)
                        }
                    })
                    .collect()
            })
            .await?;
        if !logged {
            // A repeated end of a write that ended already: its first end may still be on
            // its way to the log.
            self.earlier_durable().await?;
        }
        self.counters.count(
            op,
            results.len(),
            results.iter().filter(|r| r.is_err()).count(),
        );
        Ok(results)
    }

    async fn batch_writes(
        &self,
        op: &'static str,
        request: proto::BatchKeysRequest,
        apply: impl Fn(&mut Master, ClientId, &str, WriteId) -> Result<()>,
    ) -> Reply<proto::BatchOutcome> {
        let client = ClientId(uuid(request.client_id, "client_id")?);
        if request.keys.len() != request.write_ids.len() {
            return Err(bad_request(format!(
                "{} keys but {} write ids",
                request.keys.len(),
                request.write_ids.len()
            )));
        }
        let writes: Vec<(String, WriteId)> = request
            .keys
            .into_iter()
            .zip(request.write_ids.into_iter().map(WriteId))
            .collect();
        let results = self.finish_writes(op, client, &writes, apply).await?;
        Ok(Response::new(proto::BatchOutcome {
            results: results.iter().map(to_outcome).collect(),
        }))
    }

    /// Each key's replicas and the read lease it was granted.
    pub(super) fn replica_lists(
        &self,
        keys: &[String],
    ) -> std::result::Result<Vec<Result<ReplicaList>>, Status> {
        let now = Instant::now();
        let results: Vec<_> = {
            let mut master = self.master()?;
            keys.iter()
                .map(|k| master.get_replica_list(now, k))
                .collect()
        };
        self.counters.count(
            "get_replica_list",
            results.len(),
            results.iter().filter(|r| r.is_err()).count(),
        );
        let found = results.iter().flatten();
        self.counters.count_get_bytes(
            found
                .filter_map(|(replicas, _)| replicas.first().map(|r| r.size))
                .sum(),
        );
        Ok(results)
    }

    /// A single-key start: the batch path with one key.
    async fn one_start(
        &self,
        op: &'static str,
        r: proto::PutStartRequest,
        upsert: bool,
    ) -> Reply<proto::PutStartResponse> {
        Ok(Response::new(first(
            self.batch_start(op, r.into(), upsert)
                .await?
                .into_inner()
                .results,
        )))
    }

    /// A single-key end or revoke: the batch path with one key.
    async fn one_write(
        &self,
        op: &'static str,
        r: proto::KeyRequest,
        apply: impl Fn(&mut Master, ClientId, &str, WriteId) -> Result<()>,
    ) -> Reply<proto::Outcome> {
        let batch = proto::BatchKeysRequest {
            client_id: r.client_id,
            keys: vec![r.key],
            write_ids: vec![r.write_id],
        };
        Ok(Response::new(first(
            self.batch_writes(op, batch, apply)
                .await?
                .into_inner()
                .results,
        )))
    }

    fn single(&self, op: &'static str, result: Result<()>) -> Reply<proto::Outcome> {
        self.counters.count(op, 1, usize::from(result.is_err()));
        Ok(Response::new(to_outcome(&result)))
    }
}

#[tonic::async_trait]
impl proto::master_server::Master for MasterService {
    async fn service_ready(
        &self,
        _: Request<proto::ServiceReadyRequest>,
    ) -> Reply<proto::ServiceReadyResponse> {
        Ok(Response::new(proto::ServiceReadyResponse {
            version: STORE_VERSION.to_owned(),
        }))
    }

    async fn ping(&self, request: Request<proto::PingRequest>) -> Reply<proto::PingResponse> {
        let r = request.into_inner();
        let client = ClientId(uuid(r.client_id, "client_id")?);
        // Converted before the lock, and no more than the master keeps: a report of thousands
        // of rails costs the master a look at the first few.
        let rails: Vec<_> = r
            .rails
            .into_iter()
            .take(MAX_REPORTED_RAILS)
            .filter_map(from_rail_report)
            .collect();
        let status = {
            let mut master = self.master()?;
            let status = master.ping(Instant::now(), client);
            master.report_rails(client, rails);
            status
        };
        self.counters.count("ping", 1, 0);
        Ok(Response::new(proto::PingResponse {
            view_version: 0,
            client_status: match status {
                ClientStatus::Ok => proto::ClientStatus::Ok as i32,
                ClientStatus::NeedRemount => proto::ClientStatus::NeedRemount as i32,
            },
        }))
    }

    async fn mount_segment(
        &self,
        request: Request<proto::MountSegmentRequest>,
    ) -> Reply<proto::Outcome> {
        let r = request.into_inner();
        let client = ClientId(uuid(r.client_id, "client_id")?);
        let spec = from_segment(r.segment).map_err(|e| to_status(&e))?;
        let result = self
            .durably(|m| m.mount_segment(Instant::now(), client, spec))
            .await?;
        self.single("mount_segment", result)
    }

    async fn re_mount_segment(
        &self,
        request: Request<proto::ReMountSegmentRequest>,
    ) -> Reply<proto::Outcome> {
        let r = request.into_inner();
        let client = ClientId(uuid(r.client_id, "client_id")?);
        let specs = r
            .segments
            .into_iter()
            .map(|s| from_segment(Some(s)).map_err(|e| to_status(&e)))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let result = self
            .durably(|m| m.remount_segments(Instant::now(), client, specs))
            .await?;
        self.single("remount_segment", result)
    }

    async fn unmount_segment(
        &self,
        request: Request<proto::UnmountSegmentRequest>,
    ) -> Reply<proto::Outcome> {
        let r = request.into_inner();
        let client = ClientId(uuid(r.client_id, "client_id")?);
        let id = SegmentId(uuid(r.segment_id, "segment_id")?);
        let result = self.durably(|m| m.unmount_segment(client, id)).await?;
        self.single("unmount_segment", result)
    }

    async fn graceful_unmount_segment(
        &self,
        request: Request<proto::GracefulUnmountSegmentRequest>,
    ) -> Reply<proto::Outcome> {
        let r = request.into_inner();
        let client = ClientId(uuid(r.client_id, "client_id")?);
        let id = SegmentId(uuid(r.segment_id, "segment_id")?);
        let grace = Duration::from_millis(r.grace_period_ms);
        let result = self
            .durably(|m| m.graceful_unmount_segment(Instant::now(), client, id, grace))
            .await?;
        self.single("graceful_unmount_segment", result)
    }

    async fn put_start(
        &self,
        request: Request<proto::PutStartRequest>,
    ) -> Reply<proto::PutStartResponse> {
        self.one_start("put_start", request.into_inner(), false)
            .await
    }

    async fn put_end(&self, request: Request<proto::KeyRequest>) -> Reply<proto::Outcome> {
        let now = Instant::now();
        self.one_write("put_end", request.into_inner(), |m, c, k, w| {
            m.put_end(now, c, k, w)
        })
        .await
    }

    async fn put_revoke(&self, request: Request<proto::KeyRequest>) -> Reply<proto::Outcome> {
        let now = Instant::now();
        self.one_write("put_revoke", request.into_inner(), |m, c, k, w| {
            m.put_revoke(now, c, k, w)
        })
        .await
    }

    async fn upsert_start(
        &self,
        request: Request<proto::PutStartRequest>,
    ) -> Reply<proto::PutStartResponse> {
        self.one_start("upsert_start", request.into_inner(), true)
            .await
    }

    async fn batch_put_start(
        &self,
        request: Request<proto::BatchPutStartRequest>,
    ) -> Reply<proto::BatchPutStartResponse> {
        self.batch_start("put_start", request.into_inner(), false)
            .await
    }

    async fn batch_put_end(
        &self,
        request: Request<proto::BatchKeysRequest>,
    ) -> Reply<proto::BatchOutcome> {
        let now = Instant::now();
        self.batch_writes("put_end", request.into_inner(), |m, c, k, w| {
            m.put_end(now, c, k, w)
        })
        .await
    }

    async fn batch_put_revoke(
        &self,
        request: Request<proto::BatchKeysRequest>,
    ) -> Reply<proto::BatchOutcome> {
        let now = Instant::now();
        self.batch_writes("put_revoke", request.into_inner(), |m, c, k, w| {
            m.put_revoke(now, c, k, w)
        })
        .await
    }

    async fn batch_upsert_start(
        &self,
        request: Request<proto::BatchPutStartRequest>,
    ) -> Reply<proto::BatchPutStartResponse> {
        self.batch_start("upsert_start", request.into_inner(), true)
            .await
    }

    async fn get_replica_list(
        &self,
        request: Request<proto::GetReplicaListRequest>,
    ) -> Reply<proto::GetReplicaListResponse> {
        let key = request.into_inner().key;
        let batch = proto::BatchGetReplicaListRequest { keys: vec![key] };
        Ok(Response::new(first(
            self.batch_get_replica_list(Request::new(batch))
                .await?
                .into_inner()
                .results,
        )))
    }

    async fn batch_get_replica_list(
        &self,
        request: Request<proto::BatchGetReplicaListRequest>,
    ) -> Reply<proto::BatchGetReplicaListResponse> {
        let keys = request.into_inner().keys;
        let results = self.replica_lists(&keys)?;
        Ok(Response::new(proto::BatchGetReplicaListResponse {
            results: results.into_iter().map(replica_list).collect(),
        }))
    }

    async fn exist_key(
        &self,
        request: Request<proto::ExistKeyRequest>,
    ) -> Reply<proto::ExistKeyResponse> {
        let key = request.into_inner().key;
        let exists = self.master()?.exist_key(Instant::now(), &key);
        self.counters
            .count("exist_key", 1, usize::from(exists.is_err()));
        let exists = exists.map_err(|e| to_status(&e))?;
        Ok(Response::new(proto::ExistKeyResponse { exists }))
    }

    async fn batch_exist_key(
        &self,
        request: Request<proto::BatchExistKeyRequest>,
    ) -> Reply<proto::BatchExistKeyResponse> {
        let keys = request.into_inner().keys;
        let now = Instant::now();
        // Answers are bare booleans: one key no master could hold refuses the batch.
        let exists: Result<Vec<bool>> = {
            let mut master = self.master()?;
            keys.iter().map(|k| master.exist_key(now, k)).collect()
        };
        self.counters
            .count("exist_key", keys.len(), usize::from(exists.is_err()));
        let exists = exists.map_err(|e| to_status(&e))?;
        Ok(Response::new(proto::BatchExistKeyResponse { exists }))
    }

    async fn reserve(
        &self,
        request: Request<proto::ReserveRequest>,
    ) -> Reply<proto::ReserveResponse> {
        let r = request.into_inner();
        let client = ClientId(uuid(r.client_id, "client_id")?);
        // A reservation dies with the master that granted it: nothing of it is logged, but
        // space an eviction freed for it goes back only once the eviction is durable.
        let reserve = |m: &mut Master| m.reserve(Instant::now(), client, r.size, &r.host_id);
        let (mut grant, logged) = self.durably_logged(reserve).await?;
        let no_space = |g: &Result<ReservationGrant>| {
            g.as_ref()
                .is_err_and(|e| e.kind() == ErrorKind::NoAvailableHandle)
        };
        if logged && no_space(&grant) {
            grant = self.durably(reserve).await?;
        }
        self.counters
            .count("reserve", 1, usize::from(grant.is_err()));
        Ok(Response::new(match grant {
            Ok(g) => proto::ReserveResponse {
                outcome: Some(proto::Outcome::default()),
                reservation_id: g.id,
                transport_endpoint: g.te_endpoint,
                address: g.address,
                size: g.size,
                ttl_ms: g.ttl.as_millis() as u64,
            },
            Err(e) => proto::ReserveResponse {
                outcome: Some(to_outcome(&Err(e))),
                ..Default::default()
            },
        }))
    }

    async fn renew_reservations(
        &self,
        request: Request<proto::RenewReservationsRequest>,
    ) -> Reply<proto::RenewReservationsResponse> {
        let r = request.into_inner();
        let client = ClientId(uuid(r.client_id, "client_id")?);
        let renewed = self
            .master()?
            .renew_reservations(Instant::now(), client, &r.reservation_ids);
        Ok(Response::new(proto::RenewReservationsResponse {
            renewed,
            ttl_ms: RESERVATION_TTL.as_millis() as u64,
        }))
    }

    async fn release_reservation(
        &self,
        request: Request<proto::ReleaseReservationRequest>,
    ) -> Reply<proto::Outcome> {
        let r = request.into_inner();
        let client = ClientId(uuid(r.client_id, "client_id")?);
        let result =
            self.master()?
                .release_reservation(Instant::now(), client, r.reservation_id, r.landed);
        Ok(Response::new(to_outcome(&result)))
    }

    async fn commit_reserved(
        &self,
        request: Request<proto::CommitReservedRequest>,
    ) -> Reply<proto::BatchOutcome> {
        let r = request.into_inner();
        let client = ClientId(uuid(r.client_id, "client_id")?);
        let now = Instant::now();
        let results: Vec<Result<()>> = self
            .durably(|master| {
                r.writes
                    .iter()
                    .map(|w| {
                        let part = ReservedPart {
                            reservation: w.reservation_id,
                            offset: w.offset,
                            size: w.size,
                            address: w.address,
                        };
                        master.commit_reserved(now, client, &w.key, part)
                    })
                    .collect()
            })
            .await?;
        // An existing key is an answer drawn from state the log may not have yet.
        if results.iter().any(|r| {
            r.as_ref()
                .is_err_and(|e| e.kind() == ErrorKind::ObjectAlreadyExists)
        }) {
            self.earlier_durable().await?;
        }
        self.counters.count(
            "commit_reserved",
            results.len(),
            results.iter().filter(|r| r.is_err()).count(),
        );
        let committed = r.writes.iter().zip(&results).filter(|(_, r)| r.is_ok());
        self.counters
            .count_put_bytes(committed.map(|(w, _)| w.size).sum());
        Ok(Response::new(proto::BatchOutcome {
            results: results.iter().map(to_outcome).collect(),
        }))
    }

    async fn remove(&self, request: Request<proto::RemoveRequest>) -> Reply<proto::Outcome> {
        let r = request.into_inner();
        let result = self
            .durably(|m| m.remove(Instant::now(), &r.key, r.force))
            .await?;
        self.single("remove", result)
    }

    async fn batch_remove(
        &self,
        request: Request<proto::BatchRemoveRequest>,
    ) -> Reply<proto::BatchOutcome> {
        let r = request.into_inner();
        let now = Instant::now();
        let results: Vec<_> = self
            .durably(|master| {
                r.keys
                    .iter()
                    .map(|k| to_outcome(&master.remove(now, k, r.force)))
                    .collect()
            })
            .await?;
        self.counters.count(
            "remove",
            results.len(),
            results.iter().filter(|o| o.code != 0).count(),
        );
        Ok(Response::new(proto::BatchOutcome { results }))
    }

    async fn remove_by_regex(
        &self,
        request: Request<proto::RemoveByRegexRequest>,
    ) -> Reply<proto::CountResponse> {
        require_admin(&request)?;
        let r = request.into_inner();
        let result = self
            .durably(|m| m.remove_by_regex(Instant::now(), &r.pattern, r.force))
            .await?;
        self.counters
            .count("remove_by_regex", 1, usize::from(result.is_err()));
        match result {
            Ok(count) => Ok(Response::new(proto::CountResponse { count })),
            Err(e) => Err(to_status(&e)),
        }
    }

    async fn remove_all(
        &self,
        request: Request<proto::RemoveAllRequest>,
    ) -> Reply<proto::CountResponse> {
        require_admin(&request)?;
        let force = request.into_inner().force;
        let count = self
            .durably(|m| m.remove_all(Instant::now(), force))
            .await?;
        self.counters.count("remove_all", 1, 0);
        Ok(Response::new(proto::CountResponse { count }))
    }
}
