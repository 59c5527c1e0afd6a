//! The master's wire, both sides: domain types to and from their protobuf messages, outcomes
//! to and from results, and the protocol version.

use std::time::Duration;

use mooncake_common::{Error, ErrorKind, Result};
use tonic::Status;

use crate::master::types::{
    RailReport, RailState, ReplicaDesc, ReplicaStatus, SegmentId, SegmentSpec, SoftPin, WriteConfig,
};
use crate::proto;

/// The version `ServiceReady` reports; clients refuse a master of another version. 2: writes
/// are named by the write id their start returned.
pub const STORE_VERSION: &str = "mooncake-kv-store/2";

/// A single-key write start as the batch of one key it is.
impl From<proto::PutStartRequest> for proto::BatchPutStartRequest {
    fn from(r: proto::PutStartRequest) -> Self {
        Self {
            client_id: r.client_id,
            keys: vec![r.key],
            sizes: vec![r.size],
            config: r.config,
        }
    }
}

/// The one answer of a one-key batch (the default when it has none).
pub fn first<T: Default>(items: Vec<T>) -> T {
    items.into_iter().next().unwrap_or_default()
}

/// A result as a per-key outcome.
pub fn to_outcome(result: &Result<()>) -> proto::Outcome {
    match result {
        Ok(()) => proto::Outcome::default(),
        Err(e) => proto::Outcome {
            code: e.kind().errno().unwrap_or(-1),
            error: e.kind().code().to_owned(),
            message: e.message().to_owned(),
            kind: to_kind(e.kind()),
        },
    }
}

/// A kind as the proto's `ErrorKind` numbers it: its place in the catalogue, from 1.
fn to_kind(kind: ErrorKind) -> i32 {
    ErrorKind::ALL
        .iter()
        .position(|k| *k == kind)
        .and_then(|i| i32::try_from(i + 1).ok())
        .unwrap_or(0)
}

/// A per-key outcome back to a result. A missing outcome is a broken reply, not a success; a
/// kind this side does not know is an internal error.
pub fn from_outcome(outcome: Option<&proto::Outcome>) -> Result<()> {
    let Some(o) = outcome else {
        return Err(Error::new(
            ErrorKind::Protocol,
            "the master's reply carries no outcome",
        ));
    };
    if o.kind == 0 && o.code == 0 {
        return Ok(());
    }
    let kind = usize::try_from(o.kind)
        .ok()
        .and_then(|i| i.checked_sub(1))
        .and_then(|i| ErrorKind::ALL.get(i).copied())
        .unwrap_or(ErrorKind::InternalError);
    Err(Error::new(kind, o.message.clone()))
}

/// `u128` to the wire.
pub fn to_uuid(value: u128) -> proto::Uuid {
    proto::Uuid {
        high: (value >> 64) as u64,
        low: value as u64,
    }
}

/// A `u128` from the wire.
pub fn from_uuid(value: proto::Uuid) -> u128 {
    u128::from(value.high) << 64 | u128::from(value.low)
}

/// Domain segment to the wire.
pub fn to_segment(spec: &SegmentSpec) -> proto::Segment {
    proto::Segment {
        id: Some(to_uuid(spec.id.0)),
        name: spec.name.clone(),
        base: spec.base,
        size: spec.size,
        te_endpoint: spec.te_endpoint.clone(),
        protocol: spec.protocol.clone(),
        host_id: spec.host_id.clone(),
    }
}

/// A segment from the wire; its id is required.
pub fn from_segment(value: Option<proto::Segment>) -> Result<SegmentSpec> {
    let missing =
        |what: &str| Error::new(ErrorKind::InvalidArgument, format!("{what} is required"));
    let s = value.ok_or_else(|| missing("segment"))?;
    Ok(SegmentSpec {
        id: SegmentId(from_uuid(s.id.ok_or_else(|| missing("segment id"))?)),
        name: s.name,
        base: s.base,
        size: s.size,
        te_endpoint: s.te_endpoint,
        protocol: s.protocol,
        host_id: s.host_id,
    })
}

/// Write options to the wire.
pub fn to_write_config(config: &WriteConfig) -> proto::ReplicateConfig {
    let (action, ttl) = match config.soft_pin {
        SoftPin::Preserve => (proto::SoftPinAction::SoftPinPreserve, None),
        SoftPin::Enable(ttl) => (
            proto::SoftPinAction::SoftPinEnable,
            ttl.map(|t| t.as_millis() as u64),
        ),
        SoftPin::Disable => (proto::SoftPinAction::SoftPinDisable, None),
    };
    proto::ReplicateConfig {
        replica_num: config.replica_num,
        preferred_segments: config.preferred_segments.clone(),
        soft_pin_action: action as i32,
        soft_pin_ttl_ms: ttl,
        with_hard_pin: config.hard_pin,
        host_id: config.host_id.clone(),
    }
}

/// Write options from the wire (absent: the defaults).
pub fn from_write_config(config: Option<proto::ReplicateConfig>) -> WriteConfig {
    let Some(c) = config else {
        return WriteConfig::default();
    };
    let soft_pin = match proto::SoftPinAction::try_from(c.soft_pin_action).unwrap_or_default() {
        proto::SoftPinAction::SoftPinPreserve => SoftPin::Preserve,
        proto::SoftPinAction::SoftPinEnable => {
            SoftPin::Enable(c.soft_pin_ttl_ms.map(Duration::from_millis))
        }
        proto::SoftPinAction::SoftPinDisable => SoftPin::Disable,
    };
    WriteConfig {
        replica_num: c.replica_num,
        preferred_segments: c.preferred_segments,
        soft_pin,
        hard_pin: c.with_hard_pin,
        host_id: c.host_id,
    }
}

/// Replica to the wire.
pub fn to_replica(d: &ReplicaDesc) -> proto::Replica {
    proto::Replica {
        id: d.id,
        segment_name: d.segment_name.clone(),
        segment_id: Some(to_uuid(d.segment_id.0)),
        transport_endpoint: d.te_endpoint.clone(),
        buffer_address: d.address,
        size: d.size,
        status: match d.status {
            ReplicaStatus::Processing => proto::ReplicaStatus::Processing as i32,
            ReplicaStatus::Complete => proto::ReplicaStatus::Complete as i32,
        },
    }
}

/// A rail to the wire.
pub fn to_rail_report(rail: &RailReport) -> proto::RailReport {
    let state = match rail.state {
        RailState::Usable => proto::RailState::Usable,
        RailState::Failed => proto::RailState::Failed,
        RailState::Paused => proto::RailState::Paused,
    };
    proto::RailReport {
        peer: rail.peer.clone(),
        local: rail.local.clone(),
        remote: rail.remote.clone(),
        state: state as i32,
        bytes: rail.bytes,
        failures: rail.failures,
    }
}

/// A rail from the wire, its labels bounded; `None` for a state this side does not know.
pub fn from_rail_report(rail: proto::RailReport) -> Option<RailReport> {
    let state = match proto::RailState::try_from(rail.state).ok()? {
        proto::RailState::Unspecified => return None,
        proto::RailState::Usable => RailState::Usable,
        proto::RailState::Failed => RailState::Failed,
        proto::RailState::Paused => RailState::Paused,
    };
    let report = RailReport {
        peer: rail.peer,
        local: rail.local,
        remote: rail.remote,
        state,
        bytes: rail.bytes,
        failures: rail.failures,
    };
    Some(report.bounded())
}

/// A whole-call failure, as a gRPC status whose message carries the stable code.
pub fn to_status(error: &Error) -> Status {
    let message = format!("[{}] {}", error.kind().code(), error.message());
    match error.kind() {
        ErrorKind::InvalidArgument => Status::invalid_argument(message),
        ErrorKind::ObjectNotFound | ErrorKind::SegmentNotFound => Status::not_found(message),
        ErrorKind::Unauthenticated => Status::unauthenticated(message),
        ErrorKind::PermissionDenied => Status::permission_denied(message),
        _ => Status::failed_precondition(message),
    }
}

/// A whole-call failure back to an error with its stable code; transport failures are
/// `ERR_RPC_FAIL` / `ERR_RPC_TIMEOUT`.
pub fn from_status(status: &tonic::Status) -> Error {
    let message = status.message();
    if let Some(rest) = message.strip_prefix('[') {
        if let Some((code, text)) = rest.split_once("] ") {
            if let Some(kind) = ErrorKind::ALL.iter().copied().find(|k| k.code() == code) {
                return Error::new(kind, text.to_owned());
            }
        }
    }
    match status.code() {
        tonic::Code::DeadlineExceeded => {
            Error::new(ErrorKind::RpcTimeout, format!("master RPC: {message}"))
        }
        _ => Error::new(
            ErrorKind::RpcFail,
            format!("master RPC failed ({:?}): {message}", status.code()),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_protos_kinds_are_the_catalogue() {
        for kind in ErrorKind::ALL {
            let wire = proto::ErrorKind::try_from(to_kind(*kind)).unwrap();
            assert_eq!(wire.as_str_name(), kind.code());
            let outcome = to_outcome(&Err(Error::new(*kind, "x")));
            assert_eq!(from_outcome(Some(&outcome)).unwrap_err().kind(), *kind);
        }
        assert_eq!(
            proto::ErrorKind::try_from(ErrorKind::ALL.len() as i32 + 1).ok(),
            None
        );
        assert!(from_outcome(Some(&proto::Outcome::default())).is_ok());
        assert_eq!(from_outcome(None).unwrap_err().kind(), ErrorKind::Protocol);
    }
}
