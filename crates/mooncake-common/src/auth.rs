//! The cluster token: who may talk to a master, an engine or the metadata server.
//!
//! Everyone in a cluster shares one secret. It never travels: peers prove they hold it with
//! HMAC-SHA256 tags over fresh nonces, compared in constant time.
//!
//! - **Per-request proofs** ([`ClusterToken::prove`], [`ProofChecker`]) for stateless channels
//!   (master gRPC, metadata HTTP writes): `v1.<unix ms>.<nonce>.<tag>` over a scope (the RPC
//!   path, the metadata key). A proof is good for [`PROOF_WINDOW`] around the checker's clock,
//!   and only once.
//! - **Session challenge-response** ([`ClusterToken::client_hello`] and friends) for
//!   connections (handshake port, TCP data port, shared-memory socket): each side sends a
//!   nonce and proves the token over both, so a recorded exchange never verifies again, and
//!   the client learns the server holds the token too.
//! - **Signatures** ([`ClusterToken::sign`], [`ClusterToken::verify`]) for entries that rest in
//!   a store the writer does not control (segment descriptors in Redis, etcd or HTTP).
//!
//! Every tag is keyed by a purpose label, so a tag made for one use never verifies for another.
//! Everything here is sans-IO.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

use crate::{Error, ErrorKind, Result};

/// Bytes of a nonce.
pub const NONCE_LEN: usize = 32;
/// Bytes of a tag (HMAC-SHA256).
pub const TAG_LEN: usize = 32;
/// Shortest token accepted, in bytes.
pub const MIN_TOKEN_LEN: usize = 16;
/// How far a proof's clock may be from the checker's.
pub const PROOF_WINDOW: Duration = Duration::from_secs(120);
/// Environment variable a token is read from where no option gives one.
pub const TOKEN_ENV: &str = "MC_CLUSTER_TOKEN";

const PROOF_VERSION: &str = "v1";

/// What a tag is for; part of its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// A per-request proof.
    Request,
    /// A server's answer to a client's hello.
    ServerChallenge,
    /// A client's answer to a server's challenge.
    ClientAnswer,
    /// A signed entry.
    Signature,
}

impl Purpose {
    fn label(self) -> &'static [u8] {
        match self {
            Self::Request => b"mooncake/request/v1",
            Self::ServerChallenge => b"mooncake/session/server/v1",
            Self::ClientAnswer => b"mooncake/session/client/v1",
            Self::Signature => b"mooncake/signature/v1",
        }
    }
}

/// A nonce.
pub type Nonce = [u8; NONCE_LEN];
/// A tag.
pub type Tag = [u8; TAG_LEN];

/// The shared secret of a cluster, cheap to clone. Its `Debug` never shows the secret.
#[derive(Clone)]
pub struct ClusterToken {
    keys: Arc<[hmac::Key; 4]>,
}

impl fmt::Debug for ClusterToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterToken(..)")
    }
}

impl ClusterToken {
    /// A token from its secret text; at least [`MIN_TOKEN_LEN`] bytes.
    pub fn new(secret: &str) -> Result<Self> {
        let secret = secret.trim();
        if secret.len() < MIN_TOKEN_LEN {
            return Err(Error::invalid(format!(
                "a cluster token needs at least {MIN_TOKEN_LEN} characters (try `mooncake token`)"
            )));
        }
        let root = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
        let derive = |purpose: Purpose| {
            let derived = hmac::sign(&root, purpose.label());
            hmac::Key::new(hmac::HMAC_SHA256, derived.as_ref())
        };
        Ok(Self {
            keys: Arc::new([
                derive(Purpose::Request),
                derive(Purpose::ServerChallenge),
                derive(Purpose::ClientAnswer),
                derive(Purpose::Signature),
            ]),
        })
    }

    /// The token an option names, else [`TOKEN_ENV`]'s, else none. An empty option means none,
    /// whatever the environment says.
    pub fn resolve(option: Option<&str>) -> Result<Option<Self>> {
        let text = match option {
            Some(text) => text.to_owned(),
            None => match std::env::var(TOKEN_ENV) {
                Ok(text) => text,
                Err(_) => return Ok(None),
            },
        };
        if text.trim().is_empty() {
            return Ok(None);
        }
        Self::new(&text).map(Some)
    }

    /// Whether `other` was made from the same secret.
    pub fn same_secret(&self, other: &ClusterToken) -> bool {
        let probe: [&[u8]; 1] = [b"same-secret"];
        self.verify(&probe, &other.sign(&probe))
    }

    /// A fresh random secret: 64 hexadecimal characters.
    pub fn generate() -> Result<String> {
        Ok(hex(&random::<32>()?))
    }

    fn key(&self, purpose: Purpose) -> &hmac::Key {
        &self.keys[purpose as usize]
    }

    fn tag(&self, purpose: Purpose, parts: &[&[u8]]) -> Tag {
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(hmac::sign(self.key(purpose), &message(parts)).as_ref());
        tag
    }

    /// Constant time in the tag's contents.
    fn verify_tag(&self, purpose: Purpose, parts: &[&[u8]], tag: &[u8]) -> bool {
        hmac::verify(self.key(purpose), &message(parts), tag).is_ok()
    }

    /// A proof for one request on `scope`, good once, for [`PROOF_WINDOW`].
    pub fn prove(&self, scope: &str) -> Result<String> {
        let now = unix_millis(SystemTime::now());
        Ok(self.prove_at(scope, now, request_nonce()?))
    }

    fn prove_at(&self, scope: &str, unix_ms: u64, nonce: Nonce) -> String {
        let stamp = unix_ms.to_string();
        let tag = self.tag(
            Purpose::Request,
            &[scope.as_bytes(), stamp.as_bytes(), &nonce],
        );
        format!("{PROOF_VERSION}.{stamp}.{}.{}", hex(&nonce), hex(&tag))
    }

    /// A signature over `parts` (a name and a body, say).
    pub fn sign(&self, parts: &[&[u8]]) -> String {
        hex(&self.tag(Purpose::Signature, parts))
    }

    /// Whether `signature` is this token's signature over `parts`.
    pub fn verify(&self, parts: &[&[u8]], signature: &str) -> bool {
        unhex::<TAG_LEN>(signature)
            .is_some_and(|tag| self.verify_tag(Purpose::Signature, parts, &tag))
    }

    /// A client's first message: its nonce, and what it must remember for the answer.
    pub fn client_hello(&self) -> Result<(Nonce, ClientSession)> {
        let nonce = random()?;
        Ok((
            nonce,
            ClientSession {
                token: self.clone(),
                client_nonce: nonce,
            },
        ))
    }

    /// A server's reply to `client_nonce`: its own nonce and a tag proving it holds the token,
    /// and what it must remember to check the client's answer.
    pub fn server_challenge(&self, client_nonce: &Nonce) -> Result<(Challenge, ServerSession)> {
        let server_nonce = random()?;
        let tag = self.tag(Purpose::ServerChallenge, &[client_nonce, &server_nonce]);
        Ok((
            Challenge { server_nonce, tag },
            ServerSession {
                token: self.clone(),
                client_nonce: *client_nonce,
                server_nonce,
            },
        ))
    }
}

/// A server's challenge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Challenge {
    /// The server's nonce.
    pub server_nonce: Nonce,
    /// Its proof over both nonces.
    pub tag: Tag,
}

impl Challenge {
    /// Bytes on the wire: nonce, then tag.
    pub const LEN: usize = NONCE_LEN + TAG_LEN;

    /// Encodes.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[..NONCE_LEN].copy_from_slice(&self.server_nonce);
        out[NONCE_LEN..].copy_from_slice(&self.tag);
        out
    }

    /// Decodes; `None` unless exactly [`Self::LEN`] bytes.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != Self::LEN {
            return None;
        }
        let mut challenge = Self {
            server_nonce: [0; NONCE_LEN],
            tag: [0; TAG_LEN],
        };
        challenge.server_nonce.copy_from_slice(&bytes[..NONCE_LEN]);
        challenge.tag.copy_from_slice(&bytes[NONCE_LEN..]);
        Some(challenge)
    }
}

/// The client's side of a session exchange, between hello and answer.
#[derive(Debug)]
pub struct ClientSession {
    token: ClusterToken,
    client_nonce: Nonce,
}

impl ClientSession {
    /// Checks the server's challenge and returns the client's answer. Fails with
    /// `ERR_UNAUTHENTICATED` when the server does not hold the token.
    pub fn answer(self, challenge: &Challenge) -> Result<Tag> {
        let nonces: [&[u8]; 2] = [&self.client_nonce, &challenge.server_nonce];
        if !self
            .token
            .verify_tag(Purpose::ServerChallenge, &nonces, &challenge.tag)
        {
            return Err(unauthenticated(
                "the peer does not hold this cluster's token",
            ));
        }
        Ok(self.token.tag(Purpose::ClientAnswer, &nonces))
    }
}

/// The server's side of a session exchange, between challenge and answer.
#[derive(Debug)]
pub struct ServerSession {
    token: ClusterToken,
    client_nonce: Nonce,
    server_nonce: Nonce,
}

impl ServerSession {
    /// Checks the client's answer.
    pub fn check(self, answer: &[u8]) -> Result<()> {
        let nonces: [&[u8]; 2] = [&self.client_nonce, &self.server_nonce];
        if self
            .token
            .verify_tag(Purpose::ClientAnswer, &nonces, answer)
        {
            Ok(())
        } else {
            Err(unauthenticated(
                "the peer did not prove it holds the cluster token",
            ))
        }
    }
}

/// Checks per-request proofs: tag, clock window, and that no proof is used twice.
#[derive(Debug)]
pub struct ProofChecker {
    token: ClusterToken,
    seen: Mutex<SeenNonces>,
}

/// Proofs accepted within the window, by stamp then nonce. A replay repeats both (the stamp
/// is under the tag), so the pair is what must not come twice.
#[derive(Debug)]
struct SeenNonces {
    seen: BTreeSet<(u64, Nonce)>,
    capacity: usize,
    /// The latest stamp forgotten to make room: proofs stamped at or before it are refused,
    /// since they can no longer be checked for replay.
    floor: u64,
}

/// Most proofs remembered; beyond it the oldest are forgotten early (see
/// [`SeenNonces::floor`]).
const MAX_REMEMBERED: usize = 1 << 20;

impl ProofChecker {
    /// A checker for `token`.
    pub fn new(token: ClusterToken) -> Self {
        Self::remembering(token, MAX_REMEMBERED)
    }

    fn remembering(token: ClusterToken, capacity: usize) -> Self {
        Self {
            token,
            seen: Mutex::new(SeenNonces {
                seen: BTreeSet::new(),
                capacity,
                floor: 0,
            }),
        }
    }

    /// The token it checks against.
    pub fn token(&self) -> &ClusterToken {
        &self.token
    }

    /// Accepts `proof` for `scope` once, or fails with `ERR_UNAUTHENTICATED`.
    pub fn check(&self, proof: &str, scope: &str) -> Result<()> {
        self.check_at(proof, scope, unix_millis(SystemTime::now()))
    }

    fn check_at(&self, proof: &str, scope: &str, now_ms: u64) -> Result<()> {
        let mut fields = proof.split('.');
        let (Some(PROOF_VERSION), Some(stamp), Some(nonce), Some(tag), None) = (
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
        ) else {
            return Err(unauthenticated("malformed proof"));
        };
        let (Ok(unix_ms), Some(nonce), Some(tag)) = (
            stamp.parse::<u64>(),
            unhex::<NONCE_LEN>(nonce),
            unhex::<TAG_LEN>(tag),
        ) else {
            return Err(unauthenticated("malformed proof"));
        };
        if !self.token.verify_tag(
            Purpose::Request,
            &[scope.as_bytes(), stamp.as_bytes(), &nonce],
            &tag,
        ) {
            return Err(unauthenticated("wrong cluster token"));
        }
        let window = PROOF_WINDOW.as_millis() as u64;
        if unix_ms.abs_diff(now_ms) > window {
            return Err(unauthenticated(
                "proof outside the clock window (are the clocks in step?)",
            ));
        }
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.forget_before(now_ms.saturating_sub(window));
        if unix_ms <= seen.floor {
            return Err(unauthenticated("proof too old to check for replay"));
        }
        if !seen.seen.insert((unix_ms, nonce)) {
            return Err(unauthenticated("proof replayed"));
        }
        while seen.seen.len() > seen.capacity {
            if let Some((stamp, _)) = seen.seen.pop_first() {
                seen.floor = seen.floor.max(stamp);
            }
        }
        Ok(())
    }
}

impl SeenNonces {
    fn forget_before(&mut self, cutoff_ms: u64) {
        while self
            .seen
            .first()
            .is_some_and(|(stamp, _)| *stamp < cutoff_ms)
        {
            self.seen.pop_first();
        }
    }
}

/// The parts, each length-prefixed so that ("ab", "c") and ("a", "bc") differ.
fn message(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(parts.iter().map(|p| p.len() + 8).sum());
    for part in parts {
        out.extend_from_slice(&(part.len() as u64).to_le_bytes());
        out.extend_from_slice(part);
    }
    out
}

/// An `ERR_UNAUTHENTICATED` error.
pub fn unauthenticated(message: impl Into<String>) -> Error {
    Error::new(ErrorKind::Unauthenticated, message)
}

fn unix_millis(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A nonce no other proof of this process or any other used: a random prefix drawn once per
/// process and a counter. A proof's nonce need only be unique (its tag is keyed), and this
/// spares a system call per request.
fn request_nonce() -> Result<Nonce> {
    static PREFIX: OnceLock<[u8; NONCE_LEN - 8]> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix = match PREFIX.get() {
        Some(prefix) => prefix,
        None => {
            let drawn = random()?;
            PREFIX.get_or_init(|| drawn)
        }
    };
    let mut nonce = [0u8; NONCE_LEN];
    nonce[..NONCE_LEN - 8].copy_from_slice(prefix);
    nonce[NONCE_LEN - 8..].copy_from_slice(&COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    Ok(nonce)
}

fn random<const N: usize>() -> Result<[u8; N]> {
    let mut out = [0u8; N];
    SystemRandom::new()
        .fill(&mut out)
        .map_err(|_| Error::new(ErrorKind::InternalError, "no system randomness"))?;
    Ok(out)
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        out.push(DIGITS[usize::from(byte >> 4)] as char);
        out.push(DIGITS[usize::from(byte & 15)] as char);
    }
    out
}

fn unhex<const N: usize>(text: &str) -> Option<[u8; N]> {
    let bytes = text.as_bytes();
    if bytes.len() != N * 2 {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = [0u8; N];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(secret: &str) -> ClusterToken {
        ClusterToken::new(secret).unwrap()
    }

    #[test]
    fn short_tokens_are_refused() {
        assert_eq!(
            ClusterToken::new("short").unwrap_err().kind(),
            ErrorKind::InvalidArgument
        );
        assert_eq!(ClusterToken::generate().unwrap().len(), 64);
        assert_ne!(
            ClusterToken::generate().unwrap(),
            ClusterToken::generate().unwrap()
        );
    }

    #[test]
    fn a_proof_holds_once_for_its_scope_and_token_within_the_window() {
        let a = token("a-secret-of-enough-length");
        let checker = ProofChecker::new(a.clone());
        let proof = a.prove("/mooncake.Master/Ping").unwrap();
        assert!(checker.check(&proof, "/mooncake.Master/RemoveAll").is_err());
        checker.check(&proof, "/mooncake.Master/Ping").unwrap();
        let replay = checker.check(&proof, "/mooncake.Master/Ping").unwrap_err();
        assert_eq!(replay.kind(), ErrorKind::Unauthenticated);

        let other = token("another-secret-of-enough-length");
        let forged = other.prove("/mooncake.Master/Ping").unwrap();
        assert!(checker.check(&forged, "/mooncake.Master/Ping").is_err());

        let now = unix_millis(SystemTime::now());
        let window = PROOF_WINDOW.as_millis() as u64;
        let stale = a.prove_at("s", now - window - 1_000, [7; NONCE_LEN]);
        assert!(checker.check(&stale, "s").is_err());
        let early = a.prove_at("s", now + window + 1_000, [8; NONCE_LEN]);
        assert!(checker.check(&early, "s").is_err());
        for garbage in ["", "v1", "v1.1.2.3", "v2.1.aa.bb", &proof.replace('.', ":")] {
            assert!(checker.check(garbage, "s").is_err(), "{garbage}");
        }
    }

    #[test]
    fn a_full_replay_memory_forgets_the_oldest_and_refuses_what_it_forgot() {
        let a = token("a-secret-of-enough-length");
        let checker = ProofChecker::remembering(a.clone(), 4);
        let now = unix_millis(SystemTime::now());
        // Out of order, as clients with different clocks send them.
        let proofs: Vec<String> = [5u64, 1, 4, 2, 3, 6]
            .iter()
            .map(|&i| a.prove_at("s", now - 10_000 + i, [i as u8; NONCE_LEN]))
            .collect();
        for proof in &proofs {
            checker.check_at(proof, "s", now).unwrap();
        }
        // Stamps 1 and 2 were forgotten: neither they nor anything as old may pass again.
        for proof in &proofs {
            assert!(checker.check_at(proof, "s", now).is_err(), "{proof}");
        }
        let old = a.prove_at("s", now - 10_000 + 2, [9; NONCE_LEN]);
        assert!(checker.check_at(&old, "s", now).is_err());
        let fresh = a.prove_at("s", now, [10; NONCE_LEN]);
        checker.check_at(&fresh, "s", now).unwrap();
    }

    #[test]
    fn sessions_authenticate_both_sides_and_never_replay() {
        let a = token("a-secret-of-enough-length");
        let (hello, client) = a.client_hello().unwrap();
        let (challenge, server) = a.server_challenge(&hello).unwrap();
        let challenge = Challenge::decode(&challenge.encode()).unwrap();
        let answer = client.answer(&challenge).unwrap();
        server.check(&answer).unwrap();

        // The same hello and answer against a fresh challenge: refused.
        let (_, fresh) = a.server_challenge(&hello).unwrap();
        assert!(fresh.check(&answer).is_err());

        // A server without the token cannot pass as one.
        let b = token("another-secret-of-enough-length");
        let (hello, client) = a.client_hello().unwrap();
        let (impostor, _) = b.server_challenge(&hello).unwrap();
        assert_eq!(
            client.answer(&impostor).unwrap_err().kind(),
            ErrorKind::Unauthenticated
        );
        assert!(Challenge::decode(&[0; 10]).is_none());
    }

    #[test]
    fn signatures_bind_every_part() {
        let a = token("a-secret-of-enough-length");
        let signature = a.sign(&[b"segment/a", b"{\"x\":1}"]);
        assert!(a.verify(&[b"segment/a", b"{\"x\":1}"], &signature));
        assert!(!a.verify(&[b"segment/b", b"{\"x\":1}"], &signature));
        assert!(!a.verify(&[b"segment/a{\"x\":1}"], &signature));
        assert!(!a.verify(&[b"segment/a", b"{\"x\":2}"], &signature));
        assert!(!token("another-secret-of-enough-length")
            .verify(&[b"segment/a", b"{\"x\":1}"], &signature));
        assert!(!a.verify(&[b"segment/a", b"{\"x\":1}"], "zz"));
    }
}
