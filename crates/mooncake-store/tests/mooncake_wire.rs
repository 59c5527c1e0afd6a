//! Golden frames: traffic between Mooncake 0.3.13's Python client and its `mooncake_master`,
//! captured on loopback (`tests/golden/mooncake-0.3.13`). Every body decodes with this side's
//! types and encodes back to the same bytes; every function id and type hash is Mooncake's.

use std::collections::HashMap;
use std::path::PathBuf;

use mooncake_store::coro_rpc::frame::{RequestHeader, ResponseHeader};
use mooncake_store::coro_rpc::messages::{
    reencode, table, BatchGetReplicaList, BatchPutStart, BatchUpsertStart, Expected,
    GetReplicaList, Method, Ping, PutStart, ReplicaDescriptor, ReplicaList, StartReply,
    UpsertStart,
};
use mooncake_store::coro_rpc::struct_pack::{decode, encode, has_literal, md5_32};
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

/// Plays a capture's requests, in their order and on as many connections, to this master (lease
/// `lease`), and compares each reply with Mooncake's: `(function id, same bytes)` per reply.
async fn replay_on_our_master(
    path: &std::path::Path,
    lease: std::time::Duration,
) -> Vec<(u32, bool)> {
    use mooncake_store::master::{MasterConfig, MasterServer, MasterServerConfig};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = MasterServer::start(MasterServerConfig {
        rpc_port: 0,
        metrics_port: None,
        mooncake_rpc_port: Some(0),
        master: MasterConfig {
            default_kv_lease_ttl: lease,
            ..MasterConfig::default()
        },
        ..MasterServerConfig::default()
    })
    .await
    .unwrap();
    let address = server.mooncake_rpc_addr().unwrap();
    let mut connections: HashMap<u64, tokio::net::TcpStream> = HashMap::new();
    let mut asked: HashMap<(u64, u32), (u32, Vec<u8>)> = HashMap::new();
    let mut out = Vec::new();
    let mut clock = 0.0;
    for frame in lines(path) {
        let (Some(dir), Some(hdr)) = (frame["dir"].as_str(), frame["hdr"].as_str()) else {
            continue;
        };
        let conn = frame["conn"].as_u64().unwrap();
        let body = hex(frame["body"].as_str().unwrap());
        // Keep the capture's pauses (leases expire in them).
        let t = frame["t"].as_f64().unwrap();
        if t - clock > 0.05 {
            tokio::time::sleep(std::time::Duration::from_secs_f64(t - clock)).await;
        }
        clock = t;
        let header = hex(hdr);
        if dir == "c2s" {
            let Ok(request) = RequestHeader::parse(header[..].try_into().unwrap()) else {
                continue;
            };
            let stream = match connections.entry(conn) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(tokio::net::TcpStream::connect(address).await.unwrap())
                }
            };
            stream.write_all(&header).await.unwrap();
            stream.write_all(&body).await.unwrap();
            let mut reply = [0u8; 16];
            stream.read_exact(&mut reply).await.unwrap();
            let reply = ResponseHeader::parse(&reply).unwrap();
            let mut ours = vec![0u8; reply.length as usize];
            stream.read_exact(&mut ours).await.unwrap();
            asked.insert((conn, request.seq), (request.function_id, ours));
        } else {
            let reply = ResponseHeader::parse(header[..].try_into().unwrap()).unwrap();
            if let Some((id, ours)) = asked.remove(&(conn, reply.seq)) {
                out.push((id, normalized(id, &ours) == normalized(id, &body)));
            }
        }
    }
    server.close().await;
    out
}

/// A reply with what this master does differently on purpose set aside: replica ids (an
/// in-place upsert renumbers its replicas, so that a reader sees the rewrite) and a ping's client
/// status (a client is alive once it mounted; Mooncake's waits for a remount).
fn normalized(function_id: u32, body: &[u8]) -> Vec<u8> {
    fn renumbered(replicas: &mut [ReplicaDescriptor]) {
        for r in replicas {
            r.id = 0;
        }
    }
    let literal = has_literal(body);
    match function_id {
        Ping::ID => match decode::<<Ping as Method>::Reply>(body) {
            Ok(Ok(mut reply)) => {
                reply.client_status = 0;
                encode(&Ok::<_, i32>(reply), literal)
            }
            _ => body.to_vec(),
        },
        PutStart::ID | UpsertStart::ID => match decode::<StartReply>(body) {
            Ok(Ok(mut replicas)) => {
                renumbered(&mut replicas);
                encode(&Ok::<_, i32>(replicas), literal)
            }
            _ => body.to_vec(),
        },
        BatchPutStart::ID | BatchUpsertStart::ID => match decode::<Vec<StartReply>>(body) {
            Ok(mut replies) => {
                replies.iter_mut().flatten().for_each(|r| renumbered(r));
                encode(&replies, literal)
            }
            _ => body.to_vec(),
        },
        GetReplicaList::ID => match decode::<Expected<ReplicaList>>(body) {
            Ok(Ok(mut list)) => {
                renumbered(&mut list.replicas);
                encode(&Ok::<_, i32>(list), literal)
            }
            _ => body.to_vec(),
        },
        BatchGetReplicaList::ID => match decode::<Vec<Expected<ReplicaList>>>(body) {
            Ok(mut lists) => {
                lists
                    .iter_mut()
                    .flatten()
                    .for_each(|l| renumbered(&mut l.replicas));
                encode(&lists, literal)
            }
            _ => body.to_vec(),
        },
        _ => body.to_vec(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_master_answers_as_mooncakes_did() {
    // Each capture's master's read lease, and the replies that differ on purpose: in
    // `zc-real` a key that was just read is upserted; Mooncake rewrites it in place under the
    // reader's lease, this master writes elsewhere and parks the old bytes until the lease ends
    // (the upsert's reply and the lists of that key then name another address).
    let upsert_under_lease = [
        format!("{:#x}", BatchUpsertStart::ID),
        format!("{:#x}", GetReplicaList::ID),
        format!("{:#x}", BatchGetReplicaList::ID),
    ];
    let captures: [(&str, u64, &[String]); 5] = [
        ("cap1", 1, &[]),
        ("more-real", 10, &[]),
        ("b300-real", 10, &[]),
        ("zc-real", 10, &upsert_under_lease),
        ("two-real", 10, &[]),
    ];
    let mut total = 0;
    for (name, lease_s, allowed) in captures {
        let path = golden().join(format!("{name}.jsonl"));
        let results = replay_on_our_master(&path, std::time::Duration::from_secs(lease_s)).await;
        let differ: Vec<String> = results
            .iter()
            .filter(|r| !r.1)
            .map(|r| format!("{:#x}", r.0))
            .filter(|id| !allowed.contains(id))
            .collect();
        println!("{name}: {} replies", results.len());
        assert!(
            differ.is_empty(),
            "{name}: replies to {differ:?} differ from Mooncake's"
        );
        total += results.len();
    }
    assert!(total >= 90, "{total} replies compared");
}
