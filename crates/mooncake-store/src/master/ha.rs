//! High availability through etcd, with Mooncake's names: masters of one `cluster_id` race
//! to create `mooncake-store/<cluster_id>/master_view` bound to a lease (TTL 5 s); the winner
//! leads and writes the log to etcd, the others apply that log as it comes and take over when
//! the key goes away.
//!
//! Fencing: the leader stops answering when it cannot be sure its lease still holds (its
//! last renewal's send time plus the TTL, less a margin), which is before etcd lets the lease
//! go and another master can win; and every log write is conditional on the lease, so a
//! leader that was frozen past its lease can acknowledge nothing after it wakes.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{
    Compare, CompareOp, EventType, LeaseKeepAliveStream, LeaseKeeper, PutOptions, Txn, TxnOp,
    WatchOptions,
};
use mooncake_common::auth::ClusterToken;
use mooncake_common::{Error, ErrorKind, Result};
use mooncake_metadata::etcd::EtcdStore;
use prost::Message;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::log::etcd::{etcd, ClusterKeys, EtcdLog, LeaseClock, Pieces};
use super::log::{Log, SnapshotPolicy};
use super::service::Role;
use super::Master;
use crate::access::{view_address, view_value};
use crate::proto::journal::Batch;

/// Mooncake's `DEFAULT_MASTER_VIEW_LEASE_TTL_SEC`.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(5);
/// How much earlier than its lease's end a leader stops answering: room for clock drift
/// between this host and etcd's.
const LEASE_MARGIN: Duration = Duration::from_millis(1000);
/// How often a standby checks that the leader's RPC port still accepts connections. A port
/// that refuses twice in a row means the leader's process is gone: its lease is revoked so
/// that failover does not wait for the TTL. (A dead process cannot write, so nothing can be
/// acknowledged by two leaders; a live leader never refuses.)
const DEATH_PROBE: Duration = Duration::from_millis(200);

/// How masters find each other.
#[derive(Debug, Clone)]
pub struct HaConfig {
    /// etcd endpoints, `host:port`.
    pub endpoints: Vec<String>,
    /// Masters (and clients) of one cluster share it. Default `mooncake_cluster`.
    pub cluster_id: String,
    /// The address clients reach this master's RPC at; default: the bind address and port
    /// (127.0.0.1 for an unspecified bind address).
    pub advertise: Option<String>,
    /// The leader's lease. Default 5 s.
    pub lease_ttl: Duration,
    /// Signs the view this master writes when it leads. Set from the master's cluster token.
    pub token: Option<ClusterToken>,
}

impl HaConfig {
    /// HA over `endpoints` (`h1:2379;h2:2379`, commas too, `etcd://` optional).
    pub fn new(endpoints: &str, cluster_id: &str) -> Result<Self> {
        let endpoints = EtcdStore::new(endpoints)?.endpoints().to_vec();
        validate_cluster_id(cluster_id)?;
        Ok(Self {
            endpoints,
            cluster_id: cluster_id.to_owned(),
            advertise: None,
            lease_ttl: DEFAULT_LEASE_TTL,
            token: None,
        })
    }

    pub(crate) fn advertised(&self, host: &str, port: u16) -> String {
        if let Some(address) = &self.advertise {
            return address.clone();
        }
        let host = match host {
            "" | "0.0.0.0" | "::" | "[::]" => "127.0.0.1",
            other => other,
        };
        format!("{host}:{port}")
    }
}

/// Mooncake's rule: `[0-9A-Za-z_.-]`, at most 128 characters.
pub fn validate_cluster_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "cluster id '{id}': use 1-128 of [0-9A-Za-z_.-]"
        )))
    }
}

/// What this master knows of the election, for `/health` and `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct HaView {
    /// The leader's address, when one is known.
    pub leader: Option<String>,
    /// The etcd revision of the current `master_view`.
    pub view_version: i64,
    /// The last log entry the leader is known to have written.
    pub leader_seq: u64,
    /// Times this master became the leader.
    pub promotions: u64,
}

/// Shared [`HaView`].
#[derive(Debug, Clone, Default)]
pub struct HaStatus(Arc<Mutex<HaView>>);

impl HaStatus {
    /// A copy of the view.
    pub fn snapshot(&self) -> HaView {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn update(&self, change: impl FnOnce(&mut HaView)) {
        change(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()));
    }
}

/// Joins the election; `role` tells the service when this master leads.
pub(crate) fn start(
    config: HaConfig,
    snapshot: SnapshotPolicy,
    advertised: String,
    state: Arc<Mutex<Master>>,
    role: watch::Sender<Role>,
    stop: CancellationToken,
    tracker: &TaskTracker,
) -> Result<HaStatus> {
    validate_cluster_id(&config.cluster_id)?;
    let loopback = |address: &str| {
        let address = address.strip_prefix("http://").unwrap_or(address);
        let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
        matches!(host, "localhost" | "[::1]") || host.starts_with("127.")
    };
    if loopback(&advertised) && !config.endpoints.iter().all(|e| loopback(e)) {
        // Clients on other hosts could not reach it, and standbys there would take their own
        // loopback for a dead leader.
        return Err(Error::invalid(format!(
            "HA masters advertise their RPC address through etcd: {advertised} is loopback but \
             etcd is not; pass the address clients reach this master at (--rpc-address)"
        )));
    }
    let status = HaStatus::default();
    let member = Member {
        keys: ClusterKeys::new(&config.cluster_id),
        config,
        snapshot,
        advertised,
        state,
        role,
        stop,
        status: status.clone(),
    };
    tracker.spawn(member.run());
    Ok(status)
}

struct Member {
    config: HaConfig,
    snapshot: SnapshotPolicy,
    keys: ClusterKeys,
    advertised: String,
    state: Arc<Mutex<Master>>,
    role: watch::Sender<Role>,
    stop: CancellationToken,
    status: HaStatus,
}

impl Member {
    async fn run(self) {
        while !self.stop.is_cancelled() {
            let result = self.term().await;
            self.role.send_replace(Role::Standby);
            if let Err(e) = result {
                tracing::warn!("master HA: {e}; starting over from etcd");
                tokio::select! {
                    _ = self.stop.cancelled() => {}
                    _ = tokio::time::sleep(Duration::from_millis(300)) => {}
                }
            }
        }
    }

    /// Loads the log, follows it, and leads when the view is free; returns when leadership
    /// ends (the state then holds changes etcd may not have: it is reloaded).
    async fn term(&self) -> Result<()> {
        let client = Arc::new(EtcdStore::with_endpoints(self.config.endpoints.clone())?);
        let log = EtcdLog::new(client.clone(), self.keys.clone());
        let (recovered, revision) = log.load_at().await?;
        {
            let mut master = Master::lock(&self.state);
            let config = master.config().clone();
            *master = Master::recover(
                config,
                Instant::now(),
                recovered.snapshot,
                recovered.entries,
            )?;
        }
        let root = self.keys.root().to_owned();
        let mut events = client
            .call("watch", |mut c| {
                let root = root.clone();
                let options = WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(revision + 1);
                async move { c.watch(root, Some(options)).await }
            })
            .await?;
        let view_key = self.keys.view();
        let log_prefix = self.keys.log_prefix();
        let view = client
            .call("GET", |mut c| {
                let key = view_key.clone();
                async move { c.get(key, None).await }
            })
            .await?;
        // The leader's address and lease.
        let mut leader: Option<(String, i64)> = None;
        let mut free = match view.kvs().first() {
            Some(kv) => {
                let address = self.view_address(kv.value_str().unwrap_or_default());
                let version = kv.mod_revision();
                leader = Some((address.clone(), kv.lease()));
                self.status.update(|s| {
                    s.leader = Some(address);
                    s.view_version = version;
                });
                false
            }
            None => true,
        };
        let mut pieces = Pieces::default();
        let mut probe = tokio::time::interval(DEATH_PROBE);
        let mut refused = 0;
        loop {
            if free {
                free = false;
                if let Some(won) = self.campaign(&client).await? {
                    tracing::info!(view_version = won.revision, "won the election");
                    return self.lead(&client, &log, won).await;
                }
                tracing::debug!("another master won the election");
            }
            let message = tokio::select! {
                _ = self.stop.cancelled() => return Ok(()),
                _ = probe.tick() => {
                    refused = match &leader {
                        Some((address, _)) if refuses(address).await => refused + 1,
                        _ => 0,
                    };
                    if refused >= 2 {
                        if let Some((address, lease)) = &leader {
                            tracing::warn!(
                                leader = %address,
                                "the leader's port refuses connections: its process is gone; \
                                 ending its lease instead of waiting it out"
                            );
                            revoke(&client, *lease).await;
                        }
                        refused = 0;
                    }
                    continue;
                }
                message = events.message() => message.map_err(etcd)?,
            };
            let Some(message) = message else {
                return Err(etcd("the watch ended"));
            };
            if message.canceled() {
                return Err(etcd(format!(
                    "the watch was cancelled: {}",
                    message.cancel_reason()
                )));
            }
            for event in message.events() {
                let Some(kv) = event.kv() else { continue };
                let key = kv.key_str().map_err(etcd)?;
                if key == view_key {
                    match event.event_type() {
                        EventType::Delete => {
                            free = true;
                            leader = None;
                            self.status.update(|s| s.leader = None);
                        }
                        EventType::Put => {
                            let address = self.view_address(kv.value_str().unwrap_or_default());
                            let version = kv.mod_revision();
                            leader = Some((address.clone(), kv.lease()));
                            self.status.update(|s| {
                                s.leader = Some(address);
                                s.view_version = version;
                            });
                        }
                    }
                } else if key.starts_with(&log_prefix) && event.event_type() == EventType::Put {
                    let batch = Batch::decode(kv.value()).map_err(etcd)?;
                    let now = Instant::now();
                    for entry in pieces.push(batch.entries) {
                        let seq = entry.seq;
                        Master::lock(&self.state).apply(now, &entry)?;
                        self.status.update(|s| s.leader_seq = s.leader_seq.max(seq));
                    }
                }
            }
        }
    }

    /// The leader's address in a view value (its signature, if any, left to clients: a
    /// standby only probes the address).
    fn view_address(&self, value: &str) -> String {
        view_address(value, &self.keys.view(), None).unwrap_or_default()
    }

    /// Tries to create the view bound to a new lease.
    async fn campaign(&self, client: &EtcdStore) -> Result<Option<Won>> {
        let granted_at = Instant::now();
        let ttl = self.config.lease_ttl.as_secs().max(1) as i64;
        let granted = client
            .call("lease grant", |mut c| async move {
                c.lease_grant(ttl, None).await
            })
            .await?;
        let (lease, granted_ttl) = (granted.id(), granted.ttl());
        let view = self.keys.view();
        let txn = Txn::new()
            .when([Compare::create_revision(view.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                view.clone(),
                view_value(&self.advertised, &view, self.config.token.as_ref()),
                Some(PutOptions::new().with_lease(lease)),
            )]);
        let reply = client
            .call("campaign", |mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await?;
        if reply.succeeded() {
            let revision = reply.header().map_or(0, |h| h.revision());
            Ok(Some(Won {
                lease,
                revision,
                granted_at,
                ttl: Duration::from_secs(u64::try_from(granted_ttl).unwrap_or(0)),
            }))
        } else {
            revoke(client, lease).await;
            Ok(None)
        }
    }

    /// Catches up, starts a new epoch and serves until the lease or the log fails.
    async fn lead(&self, client: &Arc<EtcdStore>, log: &EtcdLog, won: Won) -> Result<()> {
        let ttl = self.config.lease_ttl;
        let clock = LeaseClock::new(won.granted_at + won.ttl.saturating_sub(LEASE_MARGIN));
        let term_stop = self.stop.child_token();
        let term_tasks = TaskTracker::new();
        let lease = won.lease;
        let (keeper, responses) = client
            .call("lease keep-alive", |mut c| async move {
                c.lease_keep_alive(lease).await
            })
            .await?;
        term_tasks.spawn(keep_alive(
            client.clone(),
            won.lease,
            keeper,
            responses,
            clock.clone(),
            ttl,
            term_stop.clone(),
        ));
        let result = self.serve(log, &won, &clock, &term_stop, &term_tasks).await;
        self.role.send_replace(Role::Standby);
        clock.expire();
        term_stop.cancel();
        term_tasks.close();
        term_tasks.wait().await;
        // Let a standby take over now rather than when the lease runs out.
        revoke(client, won.lease).await;
        self.status.update(|s| s.leader = None);
        result
    }

    async fn serve(
        &self,
        log: &EtcdLog,
        won: &Won,
        clock: &LeaseClock,
        term_stop: &CancellationToken,
        term_tasks: &TaskTracker,
    ) -> Result<()> {
        // The previous leader's lease is gone, so its log is final: apply the rest of it, or
        // load it again when a snapshot replaced entries this master has not seen (the
        // snapshot includes entries that were never appended on their own).
        let applied = Master::lock(&self.state).last_seq();
        let snapshot = log.snapshot_seq().await?;
        let now = Instant::now();
        if snapshot > applied {
            let (recovered, _) = log.load_at().await?;
            tracing::debug!(applied, snapshot, "caught up from the latest snapshot");
            let mut master = Master::lock(&self.state);
            let config = master.config().clone();
            *master = Master::recover(config, now, recovered.snapshot, recovered.entries)?;
            master.begin_epoch(now);
        } else {
            let rest = log.entries_after(applied, None).await?;
            tracing::debug!(applied, rest = rest.len(), "caught up with the log");
            let mut master = Master::lock(&self.state);
            for entry in &rest {
                master.apply(now, entry)?;
            }
            master.begin_epoch(now);
        }
        let writer = Arc::new(log.leading(won.lease, clock.clone()));
        let log = Log::start(
            writer,
            self.state.clone(),
            self.snapshot,
            term_stop.clone(),
            term_tasks,
            Some(clock.clone()),
        );
        let epoch = log.submit(&mut Master::lock(&self.state));
        if let Some(seq) = epoch {
            log.durable(seq).await?;
        }
        let seq = Master::lock(&self.state).last_seq();
        self.status.update(|s| {
            s.leader = Some(self.advertised.clone());
            s.view_version = won.revision;
            s.leader_seq = seq;
            s.promotions += 1;
        });
        self.role.send_replace(Role::Leader(Some(log.clone())));
        tracing::info!(
            address = %self.advertised,
            view_version = won.revision,
            seq,
            "leading the cluster"
        );
        let mut check = tokio::time::interval(Duration::from_millis(50));
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return Ok(()),
                _ = check.tick() => {}
            }
            if !log.healthy() {
                let why = log
                    .progress()
                    .failed
                    .unwrap_or_else(|| "its lease could not be renewed in time".to_owned());
                tracing::warn!("stepping down: {why}");
                return Err(Error::new(ErrorKind::UnavailableInCurrentStatus, why));
            }
            let seq = Master::lock(&self.state).last_seq();
            self.status.update(|s| s.leader_seq = seq);
        }
    }
}

struct Won {
    lease: i64,
    revision: i64,
    granted_at: Instant,
    /// What etcd granted (it may differ from what was asked).
    ttl: Duration,
}

/// Renews the lease every tenth of its TTL and moves the clock. A broken stream (its etcd
/// member died) is opened again on another member, as long as the lease may still hold.
async fn keep_alive(
    client: Arc<EtcdStore>,
    lease: i64,
    mut keeper: LeaseKeeper,
    mut responses: LeaseKeepAliveStream,
    clock: LeaseClock,
    ttl: Duration,
    stop: CancellationToken,
) {
    let period = ttl / 10;
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let sent = Instant::now();
        let renewed = async {
            keeper.keep_alive().await?;
            responses.message().await
        };
        match tokio::time::timeout(period * 2, renewed).await {
            Ok(Ok(Some(reply))) if reply.ttl() > 0 => {
                let granted = Duration::from_secs(reply.ttl().unsigned_abs());
                if let Some(until) = sent.checked_add(granted.saturating_sub(LEASE_MARGIN)) {
                    clock.extend(until);
                }
                continue;
            }
            Ok(Ok(Some(_))) => {
                tracing::warn!("the leader's lease expired in etcd");
                clock.expire();
                return;
            }
            failed => tracing::warn!("lease renewal failed ({failed:?}); reopening the stream"),
        }
        client.skip_current().await;
        while clock.valid() && !stop.is_cancelled() {
            let reopened = client.call("lease keep-alive", |mut c| async move {
                c.lease_keep_alive(lease).await
            });
            match tokio::time::timeout(period * 4, reopened).await {
                Ok(Ok((k, r))) => {
                    (keeper, responses) = (k, r);
                    break;
                }
                _ => client.skip_current().await,
            }
        }
    }
}

/// Whether nothing listens at `address` any more (the connection is refused, not merely slow:
/// a frozen or partitioned leader is waited out through its lease).
async fn refuses(address: &str) -> bool {
    let connect = tokio::net::TcpStream::connect(address);
    matches!(
        tokio::time::timeout(DEATH_PROBE, connect).await,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

/// Ends a lease now (its keys go with it); bounded, and best effort.
async fn revoke(client: &EtcdStore, lease: i64) {
    let revoked = client.call("lease revoke", |mut c| async move {
        c.lease_revoke(lease).await
    });
    let _ = tokio::time::timeout(Duration::from_secs(1), revoked).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_in_every_form() {
        for text in [
            "h1:2379;h2:2379",
            "etcd://h1:2379,h2:2379",
            " h1:2379 ; h2:2379 ",
        ] {
            let config = HaConfig::new(text, "mooncake_cluster").unwrap();
            assert_eq!(config.endpoints, ["h1:2379", "h2:2379"], "{text}");
        }
        assert!(HaConfig::new(";", "c").is_err());
        assert!(HaConfig::new("h:1", "bad id!").is_err());
        assert!(HaConfig::new("h:1", &"x".repeat(129)).is_err());
        assert!(HaConfig::new("h:1", "mooncake_cluster").is_ok());
    }
}
