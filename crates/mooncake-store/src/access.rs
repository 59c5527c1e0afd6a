//! Who may call the master, and how a client proves it may.
//!
//! A master started with a cluster token answers only calls that carry a fresh proof of it
//! (`x-mooncake-proof`, bound to the RPC's path, good once); anything else gets
//! `ERR_UNAUTHENTICATED` before a handler runs. Removing everything (`RemoveAll`,
//! `RemoveByRegex`) needs the admin role: a proof made with the admin token
//! (`x-mooncake-admin-proof`). A master without tokens is open, as Mooncake's is.
//!
//! [`Guarded`] wraps the gRPC service and checks every call at one door; it records the role
//! the caller proved as a request extension ([`Caller`]) for handlers to authorise against.
//! [`Prover`] is the client's side: it signs each call with the tokens it was given.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use mooncake_common::auth::{ClusterToken, ProofChecker};
use mooncake_common::{Error, ErrorKind, Result};
use tonic::codegen::{http, BoxFuture, GrpcMethod, Service};
use tonic::server::NamedService;
use tonic::{Request, Status};

use crate::wire::to_status;

/// The header carrying a proof of the cluster token.
pub const PROOF_HEADER: &str = "x-mooncake-proof";
/// The header carrying a proof of the admin token.
pub const ADMIN_PROOF_HEADER: &str = "x-mooncake-admin-proof";

/// The tokens a master asks for, or a client holds.
#[derive(Debug, Clone, Default)]
pub struct Tokens {
    /// Every call must prove it. `None`: calls need no proof (Mooncake's behaviour).
    pub cluster: Option<ClusterToken>,
    /// Admin calls must prove it. `None` on a master with a cluster token: admin calls are
    /// refused.
    pub admin: Option<ClusterToken>,
}

/// Environment variable the admin token is read from where no option gives one.
pub const ADMIN_TOKEN_ENV: &str = "MC_ADMIN_TOKEN";

impl Tokens {
    /// Tokens from options, else `MC_CLUSTER_TOKEN` and `MC_ADMIN_TOKEN`. An empty option
    /// means none, whatever the environment says.
    pub fn resolve(cluster: Option<&str>, admin: Option<&str>) -> Result<Self> {
        let admin = match admin {
            Some(text) => Some(text.to_owned()),
            None => std::env::var(ADMIN_TOKEN_ENV).ok(),
        };
        let admin = match admin.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(text) => Some(ClusterToken::new(text)?),
        };
        Ok(Self {
            cluster: ClusterToken::resolve(cluster)?,
            admin,
        })
    }
}

/// The role a caller proved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// Any member of the cluster.
    Member,
    /// May remove every object.
    Admin,
}

/// Checks every call's proofs.
#[derive(Debug)]
struct Gate {
    member: Option<ProofChecker>,
    admin: Option<ProofChecker>,
}

impl Gate {
    fn admit(&self, path: &str, headers: &http::HeaderMap) -> Result<Caller> {
        let proof = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        if let Some(admin_proof) = proof(ADMIN_PROOF_HEADER) {
            let Some(admin) = &self.admin else {
                return Err(Error::new(
                    ErrorKind::Unauthenticated,
                    "this master has no admin token",
                ));
            };
            admin.check(admin_proof, path)?;
            return Ok(Caller::Admin);
        }
        match (&self.member, &self.admin) {
            (None, None) => Ok(Caller::Admin),
            (None, Some(_)) => Ok(Caller::Member),
            (Some(member), _) => {
                let Some(member_proof) = proof(PROOF_HEADER) else {
                    return Err(Error::new(
                        ErrorKind::Unauthenticated,
                        "this master needs the cluster token (clusterToken / MC_CLUSTER_TOKEN)",
                    ));
                };
                member.check(member_proof, path)?;
                Ok(Caller::Member)
            }
        }
    }
}

/// A gRPC service behind the gate.
#[derive(Debug, Clone)]
pub struct Guarded<S> {
    inner: S,
    gate: Arc<Gate>,
}

impl<S> Guarded<S> {
    /// Puts `inner` behind a gate asking for `tokens`.
    pub fn new(inner: S, tokens: Tokens) -> Self {
        Self {
            inner,
            gate: Arc::new(Gate {
                member: tokens.cluster.map(ProofChecker::new),
                admin: tokens.admin.map(ProofChecker::new),
            }),
        }
    }
}

impl<S: NamedService> NamedService for Guarded<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<B>> for Guarded<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::result::Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        match self.gate.admit(request.uri().path(), request.headers()) {
            Ok(caller) => {
                request.extensions_mut().insert(caller);
                Box::pin(self.inner.call(request))
            }
            Err(e) => {
                tracing::debug!(path = request.uri().path(), "master call refused: {e}");
                let refused = to_status(&e).into_http();
                Box::pin(async move { Ok(refused) })
            }
        }
    }
}

/// Fails with `ERR_PERMISSION_DENIED` unless the caller proved the admin role.
pub(crate) fn require_admin<T>(request: &Request<T>) -> std::result::Result<(), Status> {
    match request.extensions().get::<Caller>() {
        Some(Caller::Admin) => Ok(()),
        _ => Err(to_status(&Error::new(
            ErrorKind::PermissionDenied,
            "removing every object needs the admin token (adminToken / MC_ADMIN_TOKEN)",
        ))),
    }
}

/// Signs a client's calls with the tokens it holds.
#[derive(Debug, Clone, Default)]
pub struct Prover {
    tokens: Arc<Tokens>,
}

impl Prover {
    /// A prover for `tokens`.
    pub fn new(tokens: Tokens) -> Self {
        Self {
            tokens: Arc::new(tokens),
        }
    }
}

impl tonic::service::Interceptor for Prover {
    fn call(&mut self, mut request: Request<()>) -> std::result::Result<Request<()>, Status> {
        if self.tokens.cluster.is_none() && self.tokens.admin.is_none() {
            return Ok(request);
        }
        let path = request
            .extensions()
            .get::<GrpcMethod>()
            .map(|m| format!("/{}/{}", m.service(), m.method()))
            .ok_or_else(|| Status::internal("a master call without its method"))?;
        let sign = |token: &ClusterToken| {
            token
                .prove(&path)
                .map_err(|e| to_status(&e))
                .and_then(|proof| {
                    proof
                        .parse::<tonic::metadata::MetadataValue<_>>()
                        .map_err(|_| Status::internal("unprintable proof"))
                })
        };
        if let Some(cluster) = &self.tokens.cluster {
            let proof = sign(cluster)?;
            request.metadata_mut().insert(PROOF_HEADER, proof);
        }
        if let Some(admin) = &self.tokens.admin {
            if is_admin_call(&path) {
                let proof = sign(admin)?;
                request.metadata_mut().insert(ADMIN_PROOF_HEADER, proof);
            }
        }
        Ok(request)
    }
}

/// The value of `master_view` for the leader at `address`: with a cluster token, the address
/// and its signature, so that clients follow only a leader a member wrote (the etcd key may be
/// writable by others).
pub fn view_value(address: &str, view_key: &str, token: Option<&ClusterToken>) -> String {
    match token {
        None => address.to_owned(),
        Some(token) => {
            let signature = token.sign(&[VIEW_PURPOSE, view_key.as_bytes(), address.as_bytes()]);
            format!("{address} {signature}")
        }
    }
}

/// The leader's address in a `master_view` value; with a token, only when a member signed it
/// (`ERR_UNAUTHENTICATED` otherwise).
pub fn view_address(value: &str, view_key: &str, token: Option<&ClusterToken>) -> Result<String> {
    let (address, signature) = match value.split_once(' ') {
        Some((address, signature)) => (address, Some(signature)),
        None => (value, None),
    };
    if let Some(token) = token {
        let parts: [&[u8]; 3] = [VIEW_PURPOSE, view_key.as_bytes(), address.as_bytes()];
        if !signature.is_some_and(|s| token.verify(&parts, s)) {
            return Err(Error::new(
                ErrorKind::Unauthenticated,
                format!("the master view '{view_key}' is not signed with this cluster's token"),
            ));
        }
    }
    Ok(address.to_owned())
}

const VIEW_PURPOSE: &[u8] = b"master_view";

/// Calls that need the admin role. The admin token leaves the client only for them.
fn is_admin_call(path: &str) -> bool {
    path.ends_with("/RemoveAll") || path.ends_with("/RemoveByRegex")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(secret: &str) -> ClusterToken {
        ClusterToken::new(secret).unwrap()
    }

    fn headers(pairs: &[(&'static str, String)]) -> http::HeaderMap {
        let mut map = http::HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, value.parse().unwrap());
        }
        map
    }

    const PING: &str = "/mooncake.store.v1.Master/Ping";

    #[test]
    fn a_view_is_followed_only_when_a_member_signed_it() {
        let member = token("member-secret-0123456789");
        let key = "mooncake-store/c/master_view";
        let signed = view_value("10.0.0.1:50051", key, Some(&member));
        assert_eq!(
            view_address(&signed, key, Some(&member)).unwrap(),
            "10.0.0.1:50051"
        );
        assert_eq!(view_address(&signed, key, None).unwrap(), "10.0.0.1:50051");
        let moved = signed.replacen("10.0.0.1", "10.6.6.6", 1);
        assert!(view_address(&moved, key, Some(&member)).is_err());
        assert!(view_address("10.6.6.6:50051", key, Some(&member)).is_err());
        assert!(view_address(&signed, "mooncake-store/other/master_view", Some(&member)).is_err());
        assert_eq!(view_value("h:1", key, None), "h:1");
    }

    #[test]
    fn the_gate_admits_by_token_and_role() {
        let (member, admin) = (
            token("member-secret-0123456789"),
            token("admin-secret-0123456789"),
        );
        let open = Gate {
            member: None,
            admin: None,
        };
        assert_eq!(open.admit(PING, &headers(&[])).unwrap(), Caller::Admin);

        let gate = Gate {
            member: Some(ProofChecker::new(member.clone())),
            admin: Some(ProofChecker::new(admin.clone())),
        };
        let kind = |r: Result<Caller>| r.unwrap_err().kind();
        assert_eq!(
            kind(gate.admit(PING, &headers(&[]))),
            ErrorKind::Unauthenticated
        );
        let proof = member.prove(PING).unwrap();
        assert_eq!(
            gate.admit(PING, &headers(&[(PROOF_HEADER, proof.clone())]))
                .unwrap(),
            Caller::Member
        );
        // Once only, and only for its path.
        assert!(gate
            .admit(PING, &headers(&[(PROOF_HEADER, proof)]))
            .is_err());
        let elsewhere = member.prove("/mooncake.store.v1.Master/RemoveAll").unwrap();
        assert!(gate
            .admit(PING, &headers(&[(PROOF_HEADER, elsewhere)]))
            .is_err());
        // The member token does not make an admin.
        let posing = member.prove(PING).unwrap();
        assert!(gate
            .admit(PING, &headers(&[(ADMIN_PROOF_HEADER, posing)]))
            .is_err());
        let admin_proof = admin.prove(PING).unwrap();
        assert_eq!(
            gate.admit(PING, &headers(&[(ADMIN_PROOF_HEADER, admin_proof)]))
                .unwrap(),
            Caller::Admin
        );

        let no_admin = Gate {
            member: Some(ProofChecker::new(member.clone())),
            admin: None,
        };
        let admin_proof = admin.prove(PING).unwrap();
        assert!(no_admin
            .admit(PING, &headers(&[(ADMIN_PROOF_HEADER, admin_proof)]))
            .is_err());
    }
}
