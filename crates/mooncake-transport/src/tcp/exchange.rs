//! The TCP data protocol's exchanges, without I/O: what each side sends and expects, in
//! order, for one request. The client's lanes and the server's sessions perform these steps
//! on their sockets; tests drive both sides against each other in memory.
//!
//! | request   | client                                        | server                         |
//! |-----------|-----------------------------------------------|--------------------------------|
//! | v1 write  | header, payload, fence read header, 1 byte in | payload in; fence: 1 byte out  |
//! | v2 write  | header, payload, status in (may come early)   | payload in, status out         |
//! | v1 read   | header, payload in                            | payload out                    |
//! | v2 read   | header, status in, payload in                 | status out, payload out        |
//!
//! A range the server does not hold is answered with a reject status in v2 and a closed
//! connection in v1. v1 acknowledges nothing, so a write is followed by a one-byte read of its
//! last byte on the same connection: the server serves a session in order, so the answer
//! proves the write was applied before the client reports it (Mooncake's own v1 client
//! reports a write once it left the socket).
//! An empty v1 request has no byte to fence with, so it completes unanswered; the engine
//! never sends one (an empty transfer has no slices).

use super::wire::{Header, Op, Status, Version};

/// One step of the client's side of an exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientStep {
    /// Send this request header.
    SendHeader(Header),
    /// Send the request's bytes from local memory.
    SendPayload,
    /// Read a status frame; see [`ClientExchange::on_status`]. For a v2 write it may arrive
    /// while the payload is still going out (an early reject).
    ReadStatus,
    /// Read the request's bytes into local memory.
    ReadPayload,
    /// Read the one byte that answers the v1 fence.
    ReadFence,
}

/// What a status frame means to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusVerdict {
    /// Go on (or, as the last step, done).
    Continue,
    /// The server holds no such range; nothing was touched.
    Rejected,
    /// Not a frame this protocol sends: the connection is out of step.
    Broken,
}

/// The client's side of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientExchange {
    steps: Vec<ClientStep>,
}

/// A request whose range wraps the address space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{len} bytes at {addr:#x} wrap the address space")]
pub struct Wraps {
    /// Start.
    pub addr: u64,
    /// Length.
    pub len: u64,
}

impl ClientExchange {
    /// The steps of `op` on `len` bytes at `addr`, in `version`.
    pub fn new(op: Op, version: Version, addr: u64, len: u64) -> Result<Self, Wraps> {
        let end = addr.checked_add(len).ok_or(Wraps { addr, len })?;
        let header = Header {
            size: len,
            addr,
            op,
            version,
        };
        let mut steps = vec![ClientStep::SendHeader(header)];
        match (op, version) {
            (Op::Write, Version::V1) => {
                steps.push(ClientStep::SendPayload);
                if len > 0 {
                    steps.push(ClientStep::SendHeader(Header {
                        size: 1,
                        addr: end - 1,
                        op: Op::Read,
                        version: Version::V1,
                    }));
                    steps.push(ClientStep::ReadFence);
                }
            }
            (Op::Write, Version::V2) => {
                steps.push(ClientStep::SendPayload);
                steps.push(ClientStep::ReadStatus);
            }
            (Op::Read, Version::V1) => steps.push(ClientStep::ReadPayload),
            (Op::Read, Version::V2) => {
                steps.push(ClientStep::ReadStatus);
                steps.push(ClientStep::ReadPayload);
            }
        }
        Ok(Self { steps })
    }

    /// The steps, in order.
    pub fn steps(&self) -> &[ClientStep] {
        &self.steps
    }

    /// What a status frame (`None`: one whose magic is wrong) means.
    pub fn on_status(frame: Option<Status>) -> StatusVerdict {
        match frame {
            Some(Status::Ok) => StatusVerdict::Continue,
            Some(Status::AddressRejected) => StatusVerdict::Rejected,
            Some(Status::Other(_)) | None => StatusVerdict::Broken,
        }
    }
}

/// One step of the server's side of an exchange, after it read the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerStep {
    /// Read the request's bytes into registered memory.
    ReadPayload,
    /// Send the request's bytes from registered memory.
    SendPayload,
    /// Send a status frame.
    SendStatus(Status),
    /// End the session (a v1 reject).
    Close,
}

/// The server's side of a request whose header it read: `holds` says whether the range lies
/// inside one registered buffer.
pub fn serve(header: &Header, holds: bool) -> Vec<ServerStep> {
    match (holds, header.op, header.version) {
        (false, _, Version::V2) => vec![
            ServerStep::SendStatus(Status::AddressRejected),
            ServerStep::Close,
        ],
        (false, _, Version::V1) => vec![ServerStep::Close],
        (true, Op::Write, Version::V1) => vec![ServerStep::ReadPayload],
        (true, Op::Write, Version::V2) => {
            vec![ServerStep::ReadPayload, ServerStep::SendStatus(Status::Ok)]
        }
        (true, Op::Read, Version::V1) => vec![ServerStep::SendPayload],
        (true, Op::Read, Version::V2) => {
            vec![ServerStep::SendStatus(Status::Ok), ServerStep::SendPayload]
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::super::wire::{HEADER_LEN, STATUS_LEN};
    use super::*;

    /// A server session over `memory` (registered at `base`), fed by a byte pipe.
    pub(super) struct Server {
        pub(super) base: u64,
        pub(super) memory: Vec<u8>,
        pub(super) closed: bool,
    }

    impl Server {
        /// Serves every whole request in `inbound`, answering into `outbound`.
        fn pump(&mut self, inbound: &mut VecDeque<u8>, outbound: &mut VecDeque<u8>) {
            while !self.closed && inbound.len() >= HEADER_LEN {
                let bytes: Vec<u8> = inbound.iter().take(HEADER_LEN).copied().collect();
                let header = Header::decode(bytes.as_slice().try_into().unwrap()).unwrap();
                let (addr, len) = (header.addr, header.size);
                let holds = addr >= self.base
                    && addr
                        .checked_add(len)
                        .is_some_and(|end| end <= self.base + self.memory.len() as u64);
                let payload_in = header.op == Op::Write && holds;
                if payload_in && inbound.len() < HEADER_LEN + len as usize {
                    return; // the rest of the payload is still on its way
                }
                inbound.drain(..HEADER_LEN);
                let at = addr.wrapping_sub(self.base) as usize;
                for step in serve(&header, holds) {
                    match step {
                        ServerStep::ReadPayload => {
                            for (i, b) in inbound.drain(..len as usize).enumerate() {
                                self.memory[at + i] = b;
                            }
                        }
                        ServerStep::SendPayload => {
                            outbound.extend(&self.memory[at..at + len as usize]);
                        }
                        ServerStep::SendStatus(status) => outbound.extend(status.encode()),
                        ServerStep::Close => self.closed = true,
                    }
                }
            }
        }
    }

    #[derive(Debug, PartialEq, Eq)]
    pub(super) enum Outcome {
        Done,
        Rejected,
        /// The connection ended or broke.
        Lost,
    }

    /// Runs one exchange against `server`; the server runs only when the client waits for
    /// bytes, as over a real connection.
    pub(super) fn run(server: &mut Server, exchange: &ClientExchange, local: &mut [u8]) -> Outcome {
        let (mut to_server, mut to_client) = (VecDeque::new(), VecDeque::new());
        let read = |n: usize,
                    server: &mut Server,
                    to_server: &mut VecDeque<u8>,
                    to_client: &mut VecDeque<u8>| {
            server.pump(to_server, to_client);
            (to_client.len() >= n).then(|| to_client.drain(..n).collect::<Vec<u8>>())
        };
        for step in exchange.steps() {
            match *step {
                ClientStep::SendHeader(header) => to_server.extend(header.encode()),
                ClientStep::SendPayload => to_server.extend(local.iter()),
                ClientStep::ReadStatus => {
                    let Some(frame) = read(STATUS_LEN, server, &mut to_server, &mut to_client)
                    else {
                        return Outcome::Lost;
                    };
                    match ClientExchange::on_status(Status::decode(
                        frame.as_slice().try_into().unwrap(),
                    )) {
                        StatusVerdict::Continue => {}
                        StatusVerdict::Rejected => return Outcome::Rejected,
                        StatusVerdict::Broken => return Outcome::Lost,
                    }
                }
                ClientStep::ReadPayload => {
                    let Some(bytes) = read(local.len(), server, &mut to_server, &mut to_client)
                    else {
                        return Outcome::Lost;
                    };
                    local.copy_from_slice(&bytes);
                }
                ClientStep::ReadFence => {
                    if read(1, server, &mut to_server, &mut to_client).is_none() {
                        return Outcome::Lost;
                    }
                }
            }
        }
        Outcome::Done
    }

    pub(super) fn unique(len: usize, seed: u64) -> Vec<u8> {
        mooncake_common::pattern::bytes(seed, 0, len)
    }

    #[test]
    fn a_write_is_applied_before_it_completes_and_a_read_returns_it() {
        for version in [Version::V1, Version::V2] {
            let mut server = Server {
                base: 0x1000,
                memory: vec![0; 4096],
                closed: false,
            };
            let mut written = unique(1000, 1);
            let write = ClientExchange::new(Op::Write, version, 0x1100, 1000).unwrap();
            assert_eq!(run(&mut server, &write, &mut written), Outcome::Done);
            // Complete means applied: the server's memory holds the bytes now.
            assert_eq!(
                &server.memory[0x100..0x100 + 1000],
                &written[..],
                "{version:?}"
            );
            let mut back = vec![0; 1000];
            let read = ClientExchange::new(Op::Read, version, 0x1100, 1000).unwrap();
            assert_eq!(run(&mut server, &read, &mut back), Outcome::Done);
            assert_eq!(back, written, "{version:?}");
        }
    }

    #[test]
    fn a_v1_write_waits_for_its_fence() {
        let write = ClientExchange::new(Op::Write, Version::V1, 0x1000, 64).unwrap();
        assert_eq!(
            write.steps()[2],
            ClientStep::SendHeader(Header {
                size: 1,
                addr: 0x103f,
                op: Op::Read,
                version: Version::V1
            }),
            "the fence reads the write's last byte"
        );
        assert_eq!(write.steps().last(), Some(&ClientStep::ReadFence));
        let empty = ClientExchange::new(Op::Write, Version::V1, 0x1000, 0).unwrap();
        assert!(!empty.steps().contains(&ClientStep::ReadFence));
    }

    #[test]
    fn a_range_the_server_does_not_hold_is_refused_and_touches_nothing() {
        for (version, expected) in [
            (Version::V2, Outcome::Rejected),
            (Version::V1, Outcome::Lost),
        ] {
            for op in [Op::Read, Op::Write] {
                let mut server = Server {
                    base: 0x1000,
                    memory: unique(4096, 7),
                    closed: false,
                };
                let mut local = unique(100, 9);
                let before = local.clone();
                let exchange = ClientExchange::new(op, version, 0x1000 + 4000, 100).unwrap();
                assert_eq!(
                    run(&mut server, &exchange, &mut local),
                    expected,
                    "{op:?} {version:?}"
                );
                assert_eq!(server.memory, unique(4096, 7), "server memory untouched");
                assert_eq!(local, before, "local memory untouched");
                assert!(server.closed);
            }
        }
    }

    #[test]
    fn status_frames_are_judged() {
        assert_eq!(
            ClientExchange::on_status(Some(Status::Ok)),
            StatusVerdict::Continue
        );
        assert_eq!(
            ClientExchange::on_status(Some(Status::AddressRejected)),
            StatusVerdict::Rejected
        );
        assert_eq!(
            ClientExchange::on_status(Some(Status::Other(9))),
            StatusVerdict::Broken
        );
        assert_eq!(ClientExchange::on_status(None), StatusVerdict::Broken);
        assert!(ClientExchange::new(Op::Read, Version::V2, u64::MAX - 3, 8).is_err());
    }
}

/// Property tests of the exchanges, both sides driven against each other in memory. They run
/// proptest's default case count under `cargo test`; set `PROPTEST_CASES=100000` for a longer
/// run.
#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    use super::super::wire::STATUS_LEN;
    use super::tests::{run, unique, Outcome, Server};
    use super::*;

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![Just(Op::Read), Just(Op::Write)]
    }

    fn version() -> impl Strategy<Value = Version> {
        prop_oneof![Just(Version::V1), Just(Version::V2)]
    }

    /// A registered buffer (never wrapping, as none can) and a request near it: inside,
    /// across either edge, outside, or wrapping the address space.
    #[derive(Debug, Clone)]
    struct Case {
        base: u64,
        memory_len: usize,
        addr: u64,
        len: u64,
        seed: u64,
    }

    fn case() -> impl Strategy<Value = Case> {
        (1usize..=256).prop_flat_map(|memory_len| {
            let top = u64::MAX - memory_len as u64;
            let base = prop_oneof![
                0u64..64,
                any::<u64>().prop_map(move |b| b.min(top)),
                top.saturating_sub(64)..=top,
            ];
            let span = memory_len as i64 + 16;
            (base, -16i64..=span, 0u64..=span as u64, any::<u64>()).prop_map(
                move |(base, offset, len, seed)| Case {
                    base,
                    memory_len,
                    addr: base.wrapping_add_signed(offset),
                    len,
                    seed,
                },
            )
        })
    }

    fn edge() -> impl Strategy<Value = u64> {
        prop_oneof![0u64..64, any::<u64>(), u64::MAX - 64..=u64::MAX]
    }

    proptest! {
        #![proptest_config(ProptestConfig::default())]

        #[test]
        fn both_sides_agree_and_nothing_moves_for_a_refused_range(
            case in case(), op in op(), version in version()
        ) {
            let Case { base, memory_len, addr, len, seed } = case;
            let Ok(exchange) = ClientExchange::new(op, version, addr, len) else {
                prop_assert!(addr.checked_add(len).is_none());
                return Ok(());
            };
            let holds = addr >= base && addr + len <= base + memory_len as u64;
            let memory = unique(memory_len, seed);
            let mut server = Server { base, memory: memory.clone(), closed: false };
            let before = unique(len as usize, !seed);
            let mut local = before.clone();
            let outcome = run(&mut server, &exchange, &mut local);
            if holds {
                prop_assert_eq!(outcome, Outcome::Done);
                prop_assert!(!server.closed);
                let at = (addr - base) as usize..(addr - base + len) as usize;
                match op {
                    Op::Write => {
                        prop_assert_eq!(&server.memory[at.clone()], &before[..]);
                        prop_assert_eq!(&server.memory[..at.start], &memory[..at.start]);
                        prop_assert_eq!(&server.memory[at.end..], &memory[at.end..]);
                    }
                    Op::Read => {
                        prop_assert_eq!(&local[..], &memory[at]);
                        prop_assert_eq!(&server.memory, &memory);
                    }
                }
            } else {
                // v1 acknowledges nothing and has no byte to fence an empty request with, so
                // an empty v1 request completes unjudged; the engine never sends one.
                let expected = match version {
                    Version::V1 if len == 0 => Outcome::Done,
                    Version::V1 => Outcome::Lost,
                    Version::V2 => Outcome::Rejected,
                };
                let unjudged = expected == Outcome::Done;
                prop_assert_eq!(outcome, expected);
                prop_assert!(server.closed || unjudged);
                prop_assert_eq!(&server.memory, &memory);
                prop_assert_eq!(&local, &before);
            }
        }

        #[test]
        fn a_wrapping_range_is_refused_before_anything_is_sent(
            addr in edge(), len in edge(), op in op(), version in version()
        ) {
            let header = Header { size: len, addr, op, version };
            match (ClientExchange::new(op, version, addr, len), addr.checked_add(len)) {
                (Err(wraps), None) => prop_assert_eq!(wraps, Wraps { addr, len }),
                (Ok(exchange), Some(end)) => {
                    let steps = exchange.steps();
                    prop_assert_eq!(steps[0], ClientStep::SendHeader(header));
                    let payload = match op {
                        Op::Write => ClientStep::SendPayload,
                        Op::Read => ClientStep::ReadPayload,
                    };
                    prop_assert_eq!(steps.iter().filter(|s| **s == payload).count(), 1);
                    if (op, version) == (Op::Write, Version::V1) && len > 0 {
                        let fence = Header { size: 1, addr: end - 1, op: Op::Read, version };
                        prop_assert_eq!(&steps[2..], &[ClientStep::SendHeader(fence), ClientStep::ReadFence]);
                    }
                    prop_assert_eq!(
                        steps.contains(&ClientStep::ReadStatus),
                        version == Version::V2
                    );
                }
                (built, end) => prop_assert!(false, "{:?} for an end of {:?}", built, end),
            }
            let refused = serve(&header, false);
            prop_assert!(refused.ends_with(&[ServerStep::Close]));
            prop_assert!(!refused.iter().any(|s| matches!(s, ServerStep::ReadPayload | ServerStep::SendPayload)));
            let served = serve(&header, true);
            prop_assert!(!served.contains(&ServerStep::Close));
            let moved = match op {
                Op::Write => ServerStep::ReadPayload,
                Op::Read => ServerStep::SendPayload,
            };
            prop_assert_eq!(served.iter().filter(|s| **s == moved).count(), 1);
        }

        #[test]
        fn garbage_status_frames_break_the_exchange(
            word in prop_oneof![
                any::<u64>(),
                (0u32..4).prop_map(|code| u64::from_le_bytes(Status::Other(code).encode())),
                any::<u32>().prop_map(|code| u64::from_le_bytes(Status::Other(code).encode())),
            ],
            op in op(), addr in 0u64..1 << 40, len in 1u64..64
        ) {
            let frame: [u8; STATUS_LEN] = word.to_le_bytes();
            let exchange = ClientExchange::new(op, Version::V2, addr, len).unwrap();
            let before = vec![0u8; len as usize];
            let mut local = before.clone();
            let mut verdict = StatusVerdict::Continue;
            for step in exchange.steps() {
                match step {
                    ClientStep::ReadStatus => {
                        verdict = ClientExchange::on_status(Status::decode(&frame));
                        if verdict != StatusVerdict::Continue {
                            break;
                        }
                    }
                    ClientStep::ReadPayload => local.fill(0xAA),
                    _ => {}
                }
            }
            let expected = if frame == Status::Ok.encode() {
                StatusVerdict::Continue
            } else if frame == Status::AddressRejected.encode() {
                StatusVerdict::Rejected
            } else {
                StatusVerdict::Broken
            };
            prop_assert_eq!(verdict, expected);
            if expected != StatusVerdict::Continue {
                prop_assert_eq!(local, before);
            }
        }
    }
}
