//! The authenticated opening of a connection: the cluster token's challenge-response
//! ([`crate::auth`]) framed for the handshake port, the TCP data port and the shared-memory
//! socket, before their own first frame.
//!
//! ```text
//! 0   "MCAUTH"       magic
//! 6   u8  version    1
//! 7   u8  step       1 hello (client), 2 challenge (server), 3 answer (client)
//! 8   8 bytes        zero
//! 16  u8  0xA5       marker
//! 17  7 bytes        zero
//! 24  body           hello: nonce (32); challenge: nonce, tag (64); answer: tag (32)
//! ```
//!
//! No Mooncake peer can take the opening for one of its own frames. Read as a handshake frame,
//! the first eight bytes announce a length of about 2^48 bytes, far above any limit; read as a
//! TCP data header, byte 16 is an opcode Mooncake never uses (it knows 0, 1, 0x80 and 0x81);
//! read as a shared-memory request, the first byte is an unknown kind. Each of them closes the
//! connection, and so does a listener holding a token when the first bytes are not an opening.
//! Without a token, nothing of this goes on the wire.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::auth::{unauthenticated, Challenge, ClusterToken, Nonce, NONCE_LEN, TAG_LEN};
use crate::Result;

const MAGIC: &[u8; 6] = b"MCAUTH";
const VERSION: u8 = 1;
const MARKER: u8 = 0xA5;
/// Bytes before a step's body.
pub const PREFIX_LEN: usize = 24;

/// One step of the exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The client's nonce.
    Hello = 1,
    /// The server's nonce and proof.
    Challenge = 2,
    /// The client's proof.
    Answer = 3,
}

impl Step {
    /// Bytes of its body.
    pub const fn body_len(self) -> usize {
        match self {
            Self::Hello => NONCE_LEN,
            Self::Challenge => Challenge::LEN,
            Self::Answer => TAG_LEN,
        }
    }

    /// Bytes of the whole frame.
    pub const fn frame_len(self) -> usize {
        PREFIX_LEN + self.body_len()
    }
}

/// Frames `body` as `step`; `body` must be [`Step::body_len`] long.
pub fn encode(step: Step, body: &[u8]) -> Vec<u8> {
    debug_assert_eq!(body.len(), step.body_len());
    let mut out = vec![0u8; PREFIX_LEN];
    out[..6].copy_from_slice(MAGIC);
    out[6] = VERSION;
    out[7] = step as u8;
    out[16] = MARKER;
    out.extend_from_slice(body);
    out
}

/// Whether `prefix` (the first [`PREFIX_LEN`] bytes of a connection) opens `step`.
pub fn is_prefix(prefix: &[u8], step: Step) -> bool {
    prefix.len() == PREFIX_LEN
        && &prefix[..6] == MAGIC
        && prefix[6] == VERSION
        && prefix[7] == step as u8
        && prefix[16] == MARKER
        && prefix[8..16].iter().chain(&prefix[17..]).all(|b| *b == 0)
}

/// The body of a whole `step` frame, if `frame` is one.
pub fn decode(frame: &[u8], step: Step) -> Option<&[u8]> {
    (frame.len() == step.frame_len() && is_prefix(&frame[..PREFIX_LEN], step))
        .then(|| &frame[PREFIX_LEN..])
}

/// Reads one `step` frame; a connection that sends anything else is not authenticated.
async fn read_step<S: AsyncRead + Unpin>(stream: &mut S, step: Step) -> Result<Vec<u8>> {
    let mut frame = vec![0u8; step.frame_len()];
    let closed = |_| {
        unauthenticated(format!(
            "the peer closed the connection instead of sending its {step:?}: it holds no \
             cluster token, or another one"
        ))
    };
    stream
        .read_exact(&mut frame[..PREFIX_LEN])
        .await
        .map_err(closed)?;
    if !is_prefix(&frame[..PREFIX_LEN], step) {
        return Err(unauthenticated(format!(
            "the peer sent no {step:?}: it does not run with a cluster token"
        )));
    }
    stream
        .read_exact(&mut frame[PREFIX_LEN..])
        .await
        .map_err(closed)?;
    frame.drain(..PREFIX_LEN);
    Ok(frame)
}

async fn write_step<S: AsyncWrite + Unpin>(stream: &mut S, step: Step, body: &[u8]) -> Result<()> {
    stream
        .write_all(&encode(step, body))
        .await
        .map_err(|e| crate::Error::socket(format!("send the {step:?} of the opening"), e))
}

/// The server's side: succeeds once the client proved it holds `token`. The caller bounds it
/// in time.
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    token: &ClusterToken,
) -> Result<()> {
    let hello = read_step(stream, Step::Hello).await?;
    let mut nonce: Nonce = [0; NONCE_LEN];
    nonce.copy_from_slice(&hello);
    let (challenge, session) = token.server_challenge(&nonce)?;
    write_step(stream, Step::Challenge, &challenge.encode()).await?;
    let answer = read_step(stream, Step::Answer).await?;
    session.check(&answer)
}

/// The client's side: succeeds once the server proved it holds `token`, and the answer is on
/// its way. Fails with `ERR_UNAUTHENTICATED` against a server without it. The caller bounds
/// it in time.
pub async fn open<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    token: &ClusterToken,
) -> Result<()> {
    let (nonce, session) = token.client_hello()?;
    write_step(stream, Step::Hello, &nonce).await?;
    let body = read_step(stream, Step::Challenge).await?;
    let challenge = Challenge::decode(&body)
        .ok_or_else(|| unauthenticated("malformed challenge from the peer"))?;
    let answer = session.answer(&challenge)?;
    write_step(stream, Step::Answer, &answer).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    fn token(secret: &str) -> ClusterToken {
        ClusterToken::new(secret).unwrap()
    }

    #[test]
    fn frames_round_trip_and_are_never_mooncake_frames() {
        for step in [Step::Hello, Step::Challenge, Step::Answer] {
            let body = vec![7u8; step.body_len()];
            let frame = encode(step, &body);
            assert_eq!(frame.len(), step.frame_len());
            assert_eq!(decode(&frame, step), Some(&body[..]));
            let other = if step == Step::Hello {
                Step::Answer
            } else {
                Step::Hello
            };
            assert_eq!(decode(&frame, other), None);
            // A handshake length far above any limit (128 MiB at most).
            let length = u64::from_le_bytes(frame[..8].try_into().unwrap());
            assert!(length > 1 << 40, "{length:#x}");
            // A TCP data opcode Mooncake never sends.
            assert!(![0u8, 1, 0x80, 0x81].contains(&frame[16]));
            // A shared-memory request kind nobody knows.
            assert!(frame[0] > 2);
        }
        let mut bent = encode(Step::Hello, &[0; NONCE_LEN]);
        bent[9] = 1;
        assert_eq!(decode(&bent, Step::Hello), None);
        assert_eq!(decode(&bent[..20], Step::Hello), None);
    }

    #[tokio::test]
    async fn both_sides_prove_the_token() {
        let a = token("a-secret-of-enough-length");
        let (mut client, mut server) = tokio::io::duplex(1024);
        let (opened, accepted) = tokio::join!(open(&mut client, &a), accept(&mut server, &a));
        opened.unwrap();
        accepted.unwrap();

        let b = token("another-secret-of-enough-length");
        let (mut client, mut server) = tokio::io::duplex(1024);
        // Each side hangs up once it gave up, as a connection does.
        let (opened, accepted) =
            tokio::join!(async move { open(&mut client, &a).await }, async move {
                accept(&mut server, &b).await
            });
        assert_eq!(opened.unwrap_err().kind(), ErrorKind::Unauthenticated);
        assert_eq!(accepted.unwrap_err().kind(), ErrorKind::Unauthenticated);
    }

    #[tokio::test]
    async fn a_server_without_the_token_and_a_plain_client_are_told_apart() {
        let a = token("a-secret-of-enough-length");
        // A server that reads the hello and hangs up, as a Mooncake listener does.
        let (mut client, mut server) = tokio::io::duplex(1024);
        let hang_up = async move {
            let mut first = [0u8; 8];
            let _ = server.read_exact(&mut first).await;
        };
        let (opened, ()) = tokio::join!(open(&mut client, &a), hang_up);
        let error = opened.unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Unauthenticated);
        assert!(error.message().contains("token"), "{error}");

        // A client that sends a Mooncake frame straight away.
        let (mut client, mut server) = tokio::io::duplex(1024);
        client.write_all(&[3u8; 64]).await.unwrap();
        let refused = accept(&mut server, &a).await.unwrap_err();
        assert_eq!(refused.kind(), ErrorKind::Unauthenticated);
    }
}

/// Property tests of the opening's framing and exchange. They run proptest's default case
/// count under `cargo test`; set `PROPTEST_CASES=100000` for a longer run.
#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;
    use tokio::io::{DuplexStream, ReadHalf, WriteHalf};

    use super::*;
    use crate::ErrorKind;

    const STEPS: [Step; 3] = [Step::Hello, Step::Challenge, Step::Answer];

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![Just(Step::Hello), Just(Step::Challenge), Just(Step::Answer)]
    }

    fn frame() -> impl Strategy<Value = (Step, Vec<u8>)> {
        step().prop_flat_map(|step| {
            (
                Just(step),
                proptest::collection::vec(any::<u8>(), step.body_len()),
            )
        })
    }

    fn secret() -> impl Strategy<Value = String> {
        "[A-Za-z0-9_-]{16,40}"
    }

    /// Bytes a Mooncake peer may open with, and arbitrary bytes after them.
    fn mooncake_opening() -> impl Strategy<Value = Vec<u8>> {
        let tail = || proptest::collection::vec(any::<u8>(), 0..48);
        prop_oneof![
            // A handshake frame under any limit a listener can set (128 MiB by default).
            (1u64..=1 << 40, tail()).prop_map(|(len, rest)| {
                let mut out = len.to_le_bytes().to_vec();
                out.extend(rest);
                out
            }),
            // A TCP data header (the padding is whatever Mooncake left there).
            (
                any::<[u8; 16]>(),
                prop_oneof![Just(0u8), Just(1), Just(0x80), Just(0x81)],
                tail()
            )
                .prop_map(|(words, opcode, rest)| {
                    let mut out = words.to_vec();
                    out.push(opcode);
                    out.extend(rest);
                    out
                }),
            // Shared-memory requests: a kind (control table, arena, watch) and an arena id.
            (0u8..=2, tail()).prop_map(|(kind, rest)| {
                let mut out = vec![kind];
                out.extend(rest);
                out
            }),
        ]
    }

    async fn relay(
        mut from: ReadHalf<DuplexStream>,
        mut to: WriteHalf<DuplexStream>,
        flip: Option<(usize, u8)>,
    ) {
        let (mut at, mut buf) = (0usize, [0u8; 64]);
        while let Ok(n @ 1..) = from.read(&mut buf).await {
            if let Some((i, mask)) = flip.filter(|(i, _)| (at..at + n).contains(i)) {
                buf[i - at] ^= mask;
            }
            at += n;
            if to.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    }

    /// Runs the client with `client` against the server with `server` through a relay that
    /// flips one byte: `(true, i, mask)` the client's i-th byte, `(false, ..)` the server's.
    fn exchange(
        client: &ClusterToken,
        server: &ClusterToken,
        flip: Option<(bool, usize, u8)>,
    ) -> (Result<()>, Result<()>) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(async {
            let (mut near, client_side) = tokio::io::duplex(1024);
            let (server_side, mut far) = tokio::io::duplex(1024);
            let (from_client, to_client) = tokio::io::split(client_side);
            let (from_server, to_server) = tokio::io::split(server_side);
            let upstream = flip.filter(|f| f.0).map(|(_, i, m)| (i, m));
            let downstream = flip.filter(|f| !f.0).map(|(_, i, m)| (i, m));
            // Each side hangs up once it is done, as a connection does.
            let (opened, accepted, (), ()) = tokio::join!(
                async move { open(&mut near, client).await },
                async move { accept(&mut far, server).await },
                relay(from_client, to_server, upstream),
                relay(from_server, to_client, downstream),
            );
            (opened, accepted)
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::default())]

        #[test]
        fn arbitrary_bytes_decode_only_when_well_formed(
            bytes in proptest::collection::vec(any::<u8>(), 0..128)
        ) {
            for step in STEPS {
                if let Some(body) = decode(&bytes, step) {
                    prop_assert_eq!(encode(step, body), bytes.clone());
                }
                let canonical = &encode(step, &vec![0; step.body_len()])[..PREFIX_LEN];
                prop_assert_eq!(is_prefix(&bytes, step), bytes == canonical);
            }
        }

        #[test]
        fn frames_round_trip_and_any_flip_in_the_prefix_is_refused(
            (step, body) in frame(), at in any::<prop::sample::Index>(), mask in 1u8..
        ) {
            let frame = encode(step, &body);
            prop_assert_eq!(frame.len(), step.frame_len());
            for other in STEPS {
                let decoded = decode(&frame, other);
                prop_assert_eq!(decoded, (other == step).then_some(&body[..]));
            }
            prop_assert_eq!(decode(&frame[..frame.len() - 1], step), None);
            let mut longer = frame.clone();
            longer.push(0);
            prop_assert_eq!(decode(&longer, step), None);

            let mut bent = frame.clone();
            let at = at.index(bent.len());
            bent[at] ^= mask;
            if at < PREFIX_LEN {
                prop_assert_eq!(decode(&bent, step), None);
            } else {
                prop_assert_eq!(decode(&bent, step), Some(&bent[PREFIX_LEN..]));
            }
        }

        #[test]
        fn mooncake_frames_and_openings_are_never_taken_for_each_other(
            mooncake in mooncake_opening(), (step, body) in frame()
        ) {
            let first = &mooncake[..mooncake.len().min(PREFIX_LEN)];
            for step in STEPS {
                prop_assert!(!is_prefix(first, step));
                prop_assert_eq!(decode(&mooncake, step), None);
            }
            let opening = encode(step, &body);
            prop_assert!(u64::from_le_bytes(opening[..8].try_into().unwrap()) > 1 << 48);
            prop_assert!(![0u8, 1, 0x80, 0x81].contains(&opening[16]));
            prop_assert!(opening[0] > 2);
        }

        #[test]
        fn exchanges_succeed_with_the_same_token_only(a in secret(), b in secret()) {
            let same = a == b;
            let (a, b) = (ClusterToken::new(&a).unwrap(), ClusterToken::new(&b).unwrap());
            let (opened, accepted) = exchange(&a, &a, None);
            prop_assert!(opened.is_ok() && accepted.is_ok(), "{:?} {:?}", opened, accepted);
            if !same {
                let (opened, accepted) = exchange(&a, &b, None);
                prop_assert_eq!(opened.map_err(|e| e.kind()), Err(ErrorKind::Unauthenticated));
                prop_assert_eq!(accepted.map_err(|e| e.kind()), Err(ErrorKind::Unauthenticated));
            }
        }

        /// The server never accepts a tampered exchange. The client notices unless the flip
        /// hit its own answer, which it cannot check: the server then closes the connection.
        #[test]
        fn any_flipped_byte_fails_the_exchange(
            a in secret(),
            upstream in any::<bool>(),
            at in any::<prop::sample::Index>(),
            mask in 1u8..,
        ) {
            let a = ClusterToken::new(&a).unwrap();
            let sent = if upstream {
                Step::Hello.frame_len() + Step::Answer.frame_len()
            } else {
                Step::Challenge.frame_len()
            };
            let at = at.index(sent);
            let (opened, accepted) = exchange(&a, &a, Some((upstream, at, mask)));
            prop_assert_eq!(accepted.map_err(|e| e.kind()), Err(ErrorKind::Unauthenticated));
            if upstream && at >= Step::Hello.frame_len() {
                prop_assert!(opened.is_ok(), "{:?}", opened);
            } else {
                prop_assert_eq!(opened.map_err(|e| e.kind()), Err(ErrorKind::Unauthenticated));
            }
        }
    }
}
