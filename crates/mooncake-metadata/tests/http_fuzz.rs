//! The metadata HTTP server against arbitrary requests on the wire: any method, path, query,
//! headers and body, lengths that lie, requests cut short. It answers or hangs up in time,
//! keeps serving honest clients, and without a proof of the token nothing is ever written.
//!
//! `PROPTEST_CASES=20000 cargo test -p mooncake-metadata --test http_fuzz` runs longer.

use std::time::Duration;

use mooncake_common::auth::ClusterToken;
use mooncake_metadata::http::{HttpStore, MetadataServer, MetadataServerConfig};
use mooncake_metadata::MetadataStore;
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SECRET: &str = "metadata-fuzz-secret-0001";

fn method() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("GET".to_owned()),
        Just("PUT".to_owned()),
        Just("DELETE".to_owned()),
        Just("POST".to_owned()),
        "[A-Z]{0,12}",
        "\\PC{0,6}",
    ]
}

fn target() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9%/_.-]{0,24}".prop_map(|k| format!("/metadata?key={k}")),
        Just("/metadata".to_owned()),
        Just("/metadata?key=".to_owned()),
        Just(format!("/metadata?key={}", "k".repeat(10_000))),
        "/[a-z?=&%]{0,20}",
        "\\PC{0,40}",
    ]
}

fn headers() -> impl Strategy<Value = Vec<String>> {
    let header = prop_oneof![
        "x-mooncake-proof: [a-z0-9.]{0,80}",
        "[A-Za-z-]{1,12}: \\PC{0,20}",
    ];
    proptest::collection::vec(header, 0..3)
}

/// What the request says of its body's length.
#[derive(Debug, Clone)]
enum Length {
    /// `Content-Length` of the body sent.
    Exact,
    /// No length header.
    Absent,
    /// A length that lies (or is not a number), or a chunked body that is not.
    Lie(String),
}

fn length() -> impl Strategy<Value = Length> {
    prop_oneof![
        6 => Just(Length::Exact),
        2 => Just(Length::Absent),
        1 => prop_oneof![
            (0..100_000_000u64).prop_map(|n| format!("Content-Length: {n}")),
            Just("Content-Length: -1".to_owned()),
            Just("Transfer-Encoding: chunked".to_owned()),
        ]
        .prop_map(Length::Lie),
    ]
}

#[derive(Debug, Clone)]
struct RawRequest {
    method: String,
    target: String,
    headers: Vec<String>,
    length: Length,
    body: Vec<u8>,
    /// Send only this many bytes, then stop writing (a request cut short).
    cut: Option<usize>,
}

fn request() -> impl Strategy<Value = RawRequest> {
    (
        method(),
        target(),
        headers(),
        length(),
        proptest::collection::vec(any::<u8>(), 0..512),
        prop_oneof![4 => Just(None), 1 => (0..600usize).prop_map(Some)],
    )
        .prop_map(|(method, target, headers, length, body, cut)| RawRequest {
            method,
            target,
            headers,
            length,
            body,
            cut,
        })
}

impl RawRequest {
    /// Whether the server may wait for more: then the client stops writing, so that the
    /// server sees the end at once instead of waiting out its timeouts.
    fn incomplete(&self) -> bool {
        self.cut.is_some() || matches!(self.length, Length::Lie(_))
    }

    fn bytes(&self) -> Vec<u8> {
        let mut out = format!("{} {} HTTP/1.1\r\nHost: fuzz\r\n", self.method, self.target);
        for header in &self.headers {
            out.push_str(header);
            out.push_str("\r\n");
        }
        match &self.length {
            Length::Exact => out.push_str(&format!("Content-Length: {}\r\n", self.body.len())),
            Length::Absent => {}
            Length::Lie(header) => {
                out.push_str(header);
                out.push_str("\r\n");
            }
        }
        out.push_str("Connection: close\r\n\r\n");
        let mut bytes = out.into_bytes();
        bytes.extend_from_slice(&self.body);
        if let Some(cut) = self.cut {
            bytes.truncate(cut);
        }
        bytes
    }
}

/// Longest the server may take to answer or hang up: its header and body timeouts are one
/// second here.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);

#[test]
fn arbitrary_requests_change_nothing_and_stop_no_one() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let token = ClusterToken::new(SECRET).unwrap();
    let server = runtime.block_on(async {
        let config = MetadataServerConfig {
            token: Some(token.clone()),
            header_read_timeout: Duration::from_secs(1),
            body_read_timeout: Duration::from_secs(1),
            ..MetadataServerConfig::default()
        };
        MetadataServer::start_with("127.0.0.1", 0, config)
            .await
            .unwrap()
    });
    let addr = server.local_addr();
    let honest = HttpStore::with_token(&server.url(), Some(token)).unwrap();
    let raw = |request: &RawRequest| {
        runtime.block_on(async {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let _ = stream.write_all(&request.bytes()).await;
            if request.incomplete() {
                // Whatever is missing never comes.
                let _ = stream.shutdown().await;
            }
            let mut reply = Vec::new();
            let answered =
                tokio::time::timeout(ANSWER_WITHIN, stream.read_to_end(&mut reply)).await;
            answered.map(|_| String::from_utf8_lossy(&reply).into_owned())
        })
    };
    // The raw path reaches the handlers: an unproven write is refused as such.
    let unproven = RawRequest {
        method: "PUT".into(),
        target: "/metadata?key=k".into(),
        headers: Vec::new(),
        length: Length::Exact,
        body: b"{}".to_vec(),
        cut: None,
    };
    let reply = raw(&unproven).unwrap();
    assert!(reply.starts_with("HTTP/1.1 401"), "{reply}");
    let answered = std::cell::Cell::new(0u32);
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::default());
    runner
        .run(&request(), |request| {
            let reply = raw(&request);
            prop_assert!(reply.is_ok(), "no answer or hang-up for {request:?}");
            if reply.is_ok_and(|r| r.starts_with("HTTP/1.1 ")) {
                answered.set(answered.get() + 1);
            }
            prop_assert!(
                server.store().is_empty(),
                "an unauthenticated request wrote: {request:?}"
            );
            Ok(())
        })
        .unwrap();
    // Most requests are parsed far enough to get a status, not just a hang-up.
    assert!(
        answered.get() >= runner.config().cases / 2,
        "only {} requests were answered",
        answered.get()
    );
    runtime.block_on(async {
        honest.put("after/the/fuzz", "{}").await.unwrap();
        assert_eq!(
            honest.get("after/the/fuzz").await.unwrap().as_deref(),
            Some("{}")
        );
        server.close().await;
    });
}
