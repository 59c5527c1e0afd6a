//! `/health`: whether this master serves, and if not why. 200 when it leads, its log (if any)
//! can make changes durable and its state lock can be taken within [`STATE_LOCK_DEADLINE`];
//! 503 otherwise, with the reasons. The body is JSON either way: `status` (`ok` or
//! `unavailable`), `role`, `service_ready`, `applied_seq`, and with a log `durable_seq` and
//! `log_failed`, with HA `leader`, `view_version`, `leader_seq`, `lag` and `failovers`.

use std::sync::{Mutex, TryLockError};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;

use super::super::service::Role;
use super::{Admin, Master};

/// Longer than any lock the master holds to serve; a lock held longer is stuck.
pub(super) const STATE_LOCK_DEADLINE: Duration = Duration::from_millis(500);
/// How often the lock is tried until the deadline.
const RETRY_LOCK: Duration = Duration::from_millis(2);

pub(super) async fn health(State(admin): State<Admin>) -> (StatusCode, Json<serde_json::Value>) {
    let role = admin.role.borrow().clone();
    let applied = applied_seq_within(&admin.state, STATE_LOCK_DEADLINE).await;
    let mut reasons = Vec::new();
    let (role_name, log) = match &role {
        Role::Leader(log) => ("leader", log.as_ref()),
        Role::Standby => {
            reasons.push("standby: it follows the leader's log and serves nothing".to_owned());
            ("standby", None)
        }
    };
    if applied.is_none() {
        reasons.push(format!(
            "the state lock could not be taken within {} ms",
            STATE_LOCK_DEADLINE.as_millis()
        ));
    }
    let mut body = serde_json::json!({
        "role": role_name,
        "service_ready": matches!(role, Role::Leader(_)),
        "applied_seq": applied,
    });
    if let Some(log) = log {
        let progress = log.progress();
        if let Some(failed) = &progress.failed {
            reasons.push(format!("the log failed: {failed}"));
        } else if !log.healthy() {
            reasons.push("the log can no longer make changes durable".to_owned());
        }
        body["durable_seq"] = progress.durable.into();
        body["log_failed"] = progress.failed.into();
    }
    if let Some(ha) = &admin.ha {
        let status = ha.snapshot();
        body["leader"] = status.leader.into();
        body["view_version"] = status.view_version.into();
        body["leader_seq"] = status.leader_seq.into();
        body["lag"] = applied
            .map(|applied| status.leader_seq.saturating_sub(applied))
            .into();
        body["failovers"] = status.promotions.into();
    }
    let code = if reasons.is_empty() {
        body["status"] = "ok".into();
        StatusCode::OK
    } else {
        body["status"] = "unavailable".into();
        body["reason"] = reasons.join("; ").into();
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body))
}

/// The last applied log entry, read under the state lock if it can be taken before `deadline`
/// passes. Tried rather than waited for: a stuck lock must not hold a thread per probe.
async fn applied_seq_within(state: &Mutex<Master>, deadline: Duration) -> Option<u64> {
    let until = Instant::now() + deadline;
    loop {
        let applied = match state.try_lock() {
            Ok(master) => Some(master.last_seq()),
            // As `Master::lock` does: every method leaves the state consistent.
            Err(TryLockError::Poisoned(poisoned)) => Some(poisoned.into_inner().last_seq()),
            Err(TryLockError::WouldBlock) => None,
        };
        if applied.is_some() || Instant::now() >= until {
            return applied;
        }
        tokio::time::sleep(RETRY_LOCK).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::sync::watch;
    use tokio_util::sync::CancellationToken;
    use tokio_util::task::TaskTracker;

    use super::super::super::log::{BoxFuture, Log, LogStore, Recovered, SnapshotPolicy};
    use super::super::test_support::{admin, get, serve};
    use super::*;
    use crate::master::MasterConfig;
    use crate::proto::journal::{Entry, Snapshot};

    fn json(body: &str) -> serde_json::Value {
        serde_json::from_str(body).unwrap()
    }

    #[tokio::test]
    async fn a_leader_is_ready() {
        let (addr, server) = serve(admin(Master::new(MasterConfig::default()).unwrap())).await;
        let (head, body) = get(addr, "/health").await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let body = json(&body);
        assert_eq!(body["status"], "ok");
        assert_eq!(body["role"], "leader");
        assert_eq!(body["service_ready"], true);
        assert!(body["applied_seq"].is_u64(), "{body}");
        server.abort();
    }

    #[tokio::test]
    async fn a_standby_is_not_ready_and_says_why() {
        let mut standby = admin(Master::new(MasterConfig::default()).unwrap());
        let (role_tx, role) = watch::channel(Role::Standby);
        standby.role = role;
        let (addr, server) = serve(standby).await;
        let (head, body) = get(addr, "/health").await;
        assert!(head.starts_with("HTTP/1.1 503"), "{head}");
        let body = json(&body);
        assert_eq!(body["status"], "unavailable");
        assert_eq!(body["role"], "standby");
        assert_eq!(body["service_ready"], false);
        assert!(
            body["reason"].as_str().unwrap().contains("standby"),
            "{body}"
        );
        drop(role_tx);
        server.abort();
    }

    /// A log store whose every write fails.
    struct BrokenDisk;

    impl LogStore for BrokenDisk {
        fn load(&self) -> BoxFuture<'_, mooncake_common::Result<Recovered>> {
            Box::pin(async { Ok(Recovered::default()) })
        }
        fn append<'a>(&'a self, _: &'a [Entry]) -> BoxFuture<'a, mooncake_common::Result<()>> {
            Box::pin(async { Err(mooncake_common::Error::invalid("the disk is gone")) })
        }
        fn compact<'a>(&'a self, _: &'a Snapshot) -> BoxFuture<'a, mooncake_common::Result<()>> {
            Box::pin(async { Err(mooncake_common::Error::invalid("the disk is gone")) })
        }
    }

    #[tokio::test]
    async fn a_failed_log_makes_it_unavailable() {
        let now = std::time::Instant::now();
        let journaled = Master::recover(MasterConfig::default(), now, None, Vec::new()).unwrap();
        let mut broken = admin(journaled);
        let (stop, tracker) = (CancellationToken::new(), TaskTracker::new());
        let log = Log::start(
            Arc::new(BrokenDisk),
            broken.state.clone(),
            SnapshotPolicy::default(),
            stop.clone(),
            &tracker,
            None,
        );
        let seq = {
            let mut master = Master::lock(&broken.state);
            master.begin_epoch(now);
            log.submit(&mut master)
        };
        assert!(log.durable(seq.unwrap()).await.is_err());
        let (_role_tx, role) = watch::channel(Role::Leader(Some(log)));
        broken.role = role;
        let (addr, server) = serve(broken).await;
        let (head, body) = get(addr, "/health").await;
        assert!(head.starts_with("HTTP/1.1 503"), "{head}");
        let body = json(&body);
        assert_eq!(body["role"], "leader");
        assert!(body["log_failed"]
            .as_str()
            .unwrap()
            .contains("the disk is gone"));
        assert!(
            body["reason"].as_str().unwrap().contains("the log failed"),
            "{body}"
        );
        server.abort();
        stop.cancel();
        tracker.close();
        tracker.wait().await;
    }

    #[tokio::test]
    async fn a_stuck_state_lock_makes_it_unavailable() {
        let stuck = admin(Master::new(MasterConfig::default()).unwrap());
        let state = Arc::clone(&stuck.state);
        let (addr, server) = serve(stuck).await;
        let (locked_tx, locked_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let holder = std::thread::spawn(move || {
            let _guard = Master::lock(&state);
            locked_tx.send(()).unwrap();
            let _ = release_rx.recv();
        });
        locked_rx.recv().unwrap();
        let (head, body) = get(addr, "/health").await;
        release_tx.send(()).unwrap();
        holder.join().unwrap();
        assert!(head.starts_with("HTTP/1.1 503"), "{head}");
        let body = json(&body);
        assert!(body["applied_seq"].is_null(), "{body}");
        assert!(
            body["reason"].as_str().unwrap().contains("state lock"),
            "{body}"
        );
        let (head, _) = get(addr, "/health").await;
        assert!(head.starts_with("HTTP/1.1 200"), "released: {head}");
        server.abort();
    }
}
