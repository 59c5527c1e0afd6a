//! Golden frames: traffic between Mooncake 0.3.13's Python client and its `mooncake_master`,
//! captured on loopback (`tests/golden/mooncake-0.3.13`). Every body decodes with this side's
//! types and encodes back to the same bytes; every function id and type hash is Mooncake's.

use std::collections::HashMap;
use std::path::PathBuf;

use mooncake_store::coro_rpc::frame::{RequestHeader, ResponseHeader};
use mooncake_store::coro_rpc::messages::{reencode, table};
use mooncake_store::coro_rpc::struct_pack::{decode, encode, md5_32};
use serde_json::Value;

fn golden() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/mooncake-0.3.13")
}

fn hex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
        .collect()
}

fn lines(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn every_id_and_type_hash_is_mooncakes() {
    let ours: HashMap<&str, _> = table().into_iter().map(|row| (row.0, row)).collect();
    let rows = lines(&golden().join("hashtable.jsonl"));
    let mut checked = 0;
    for row in &rows {
        let name = row["rpc"].as_str().unwrap();
        let Some((_, id, args, reply)) = ours.get(name) else {
            continue;
        };
        let want_id =
            u32::from_str_radix(row["fid"].as_str().unwrap().trim_start_matches("0x"), 16).unwrap();
        assert_eq!(*id, want_id, "{name} id");
        let req = row["req_literal"].as_str().unwrap();
        match args {
            None => assert_eq!(req, "(no body)", "{name}"),
            Some(literal) => {
                assert_eq!(*literal, hex(req), "{name} argument literal");
                let hash = row["req_hash"].as_str().unwrap().trim_start_matches("0x");
                assert_eq!(md5_32(literal) & !1, u32::from_str_radix(hash, 16).unwrap());
            }
        }
        assert_eq!(
            *reply,
            hex(row["resp_literal"].as_str().unwrap()),
            "{name} reply literal"
        );
        checked += 1;
    }
    assert_eq!(
        checked,
        ours.len(),
        "every function served is in Mooncake's table"
    );
}

/// Outcome of replaying one capture through the codec.
#[derive(Default, Debug)]
struct Replay {
    requests: usize,
    replies: usize,
    refused: usize,
}

fn replay(path: &std::path::Path) -> Replay {
    let mut out = Replay::default();
    // (connection, seq) -> function id, and whether this side refused the request.
    let mut pending: HashMap<(u64, u32), (u32, bool)> = HashMap::new();
    for frame in lines(path) {
        // Opens, closes, and stray bytes that were never a whole header.
        let (Some(dir), Some(_)) = (frame["dir"].as_str(), frame["hdr"].as_str()) else {
            continue;
        };
        let conn = frame["conn"].as_u64().unwrap();
        let header = hex(frame["hdr"].as_str().unwrap());
        let body = hex(frame["body"].as_str().unwrap());
        if dir == "c2s" {
            let Ok(header) = RequestHeader::parse(header[..].try_into().unwrap()) else {
                // Mooncake's master closes the connection without a reply; so does this side.
                out.refused += 1;
                continue;
            };
            assert_eq!(header.length as usize, body.len());
            let refused = match reencode(header.function_id, true, &body) {
                None => true,
                Some(Ok(again)) => {
                    assert_eq!(
                        again,
                        body,
                        "{} request {:#x}",
                        path.display(),
                        header.function_id
                    );
                    out.requests += 1;
                    false
                }
                Some(Err(_)) => true,
            };
            out.refused += usize::from(refused);
            pending.insert((conn, header.seq), (header.function_id, refused));
        } else {
            let header = ResponseHeader::parse(header[..].try_into().unwrap()).unwrap();
            let (id, refused) = pending
                .remove(&(conn, header.seq))
                .expect("a reply to a request");
            // Mooncake refused exactly what this side refuses, and said why in a string.
            assert_eq!(
                header.err_code != 0,
                refused,
                "{} reply {id:#x}",
                path.display()
            );
            let again = if refused {
                let message: String = decode(&body).unwrap();
                encode(&message, true)
            } else {
                reencode(id, false, &body).unwrap().unwrap()
            };
            assert_eq!(again, body, "{} reply {id:#x}", path.display());
            out.replies += 1;
        }
    }
    out
}

#[test]
fn every_captured_body_decodes_and_reencodes_byte_for_byte() {
    let mut total = Replay::default();
    for entry in std::fs::read_dir(golden()).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().unwrap() == "hashtable.jsonl" {
            continue;
        }
        let r = replay(&path);
        println!("{}: {r:?}", path.display());
        total.requests += r.requests;
        total.replies += r.replies;
        total.refused += r.refused;
    }
    println!("all captures: {total:?}");
    assert!(total.requests >= 100 && total.replies >= 100, "{total:?}");
}
