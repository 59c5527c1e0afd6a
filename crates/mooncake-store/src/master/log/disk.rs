//! The log in a local directory: `snapshot` (the latest snapshot) and `log` (the batches
//! appended since), each record framed as `[length u32][crc32 u32][protobuf]`, little-endian.
//! Every append and snapshot is fsync'd before it counts. A frame torn by a crash mid-write is
//! cut off at start-up: it was never acknowledged. The directory is locked while a master
//! uses it.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use mooncake_common::{Error, ErrorKind, Result};
use prost::Message;

use super::{BoxFuture, LogStore, Recovered};
use crate::proto::journal::{Batch, Entry, Snapshot};

const LOG: &str = "log";
const SNAPSHOT: &str = "snapshot";
const LOCK: &str = "lock";
const FRAME_HEADER: usize = 8;

/// The log in a directory.
pub struct DiskLog {
    dir: PathBuf,
    log: Arc<Mutex<File>>,
    /// Held (locked) for as long as this master lives.
    _lock: File,
}

impl DiskLog {
    /// Opens (creating) `dir` and locks it; fails when another master holds it.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|e| io(&dir, "create", e))?;
        let lock_path = dir.join(LOCK);
        let lock = File::create(&lock_path).map_err(|e| io(&lock_path, "create", e))?;
        lock.try_lock().map_err(|_| {
            Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "data directory {} is in use by another master",
                    dir.display()
                ),
            )
        })?;
        let log_path = dir.join(LOG);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&log_path)
            .map_err(|e| io(&log_path, "open", e))?;
        // The log's directory entry must survive a crash as much as its contents.
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io(&dir, "sync", e))?;
        Ok(Self {
            dir,
            log: Arc::new(Mutex::new(log)),
            _lock: lock,
        })
    }

    fn load_now(&self) -> Result<Recovered> {
        let snapshot_path = self.dir.join(SNAPSHOT);
        let snapshot = match std::fs::read(&snapshot_path) {
            Ok(bytes) => {
                let (frames, tail) = frames(&bytes);
                match (frames.first(), tail) {
                    (Some(frame), Tail::Clean) if frames.len() == 1 => {
                        Some(Snapshot::decode(*frame).map_err(|e| corrupt(&snapshot_path, e))?)
                    }
                    _ => return Err(corrupt(&snapshot_path, "damaged frame")),
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io(&snapshot_path, "read", e)),
        };
        let after = snapshot.as_ref().map_or(0, |s| s.seq);
        let log_path = self.dir.join(LOG);
        let file = lock(&self.log);
        let mut bytes = Vec::new();
        let mut reader = File::open(&log_path).map_err(|e| io(&log_path, "open", e))?;
        reader
            .read_to_end(&mut bytes)
            .map_err(|e| io(&log_path, "read", e))?;
        let (frames, tail) = frames(&bytes);
        if tail == Tail::Damaged {
            // Entries after the damage were acknowledged: refuse rather than drop them.
            return Err(corrupt(
                &log_path,
                "a record in the middle fails its checksum",
            ));
        }
        let mut entries = Vec::new();
        let mut kept = 0;
        for frame in &frames {
            let batch = Batch::decode(*frame).map_err(|e| corrupt(&log_path, e))?;
            entries.extend(batch.entries.into_iter().filter(|e| e.seq > after));
            kept += FRAME_HEADER + frame.len();
        }
        if tail == Tail::Torn {
            tracing::warn!(
                path = %log_path.display(),
                cut = bytes.len() - kept,
                "cutting off a log record torn by a crash (it was never acknowledged)"
            );
            file.set_len(kept as u64)
                .and_then(|()| file.sync_all())
                .map_err(|e| io(&log_path, "truncate", e))?;
        }
        Ok(Recovered { snapshot, entries })
    }
}

impl LogStore for DiskLog {
    fn load(&self) -> BoxFuture<'_, Result<Recovered>> {
        Box::pin(async move { self.load_now() })
    }

    fn append<'a>(&'a self, entries: &'a [Entry]) -> BoxFuture<'a, Result<()>> {
        let frame = frame(&Batch {
            entries: entries.to_vec(),
        });
        let log = self.log.clone();
        let path = self.dir.join(LOG);
        Box::pin(async move {
            blocking(move || {
                let mut file = lock(&log);
                file.write_all(&frame)
                    .and_then(|()| file.sync_data())
                    .map_err(|e| io(&path, "append to", e))
            })
            .await
        })
    }

    fn compact<'a>(&'a self, snapshot: &'a Snapshot) -> BoxFuture<'a, Result<()>> {
        let frame = frame(snapshot);
        let log = self.log.clone();
        let dir = self.dir.clone();
        Box::pin(async move {
            blocking(move || {
                let tmp = dir.join("snapshot.tmp");
                let path = dir.join(SNAPSHOT);
                let mut file = File::create(&tmp).map_err(|e| io(&tmp, "create", e))?;
                file.write_all(&frame)
                    .and_then(|()| file.sync_all())
                    .map_err(|e| io(&tmp, "write", e))?;
                std::fs::rename(&tmp, &path).map_err(|e| io(&path, "replace", e))?;
                File::open(&dir)
                    .and_then(|d| d.sync_all())
                    .map_err(|e| io(&dir, "sync", e))?;
                // The snapshot holds everything the log did: a crash before this line leaves
                // entries that recovery skips.
                let file = lock(&log);
                file.set_len(0)
                    .and_then(|()| file.sync_all())
                    .map_err(|e| io(&dir.join(LOG), "truncate", e))
            })
            .await
        })
    }
}

async fn blocking(work: impl FnOnce() -> Result<()> + Send + 'static) -> Result<()> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Error::new(ErrorKind::InternalError, format!("log writer: {e}")))?
}

fn frame(message: &impl Message) -> Vec<u8> {
    let body = message.encode_to_vec();
    let mut out = Vec::with_capacity(FRAME_HEADER + body.len());
    // Batches stay far below 4 GiB: at most MAX_BATCH_ENTRIES entries per append.
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// How a file of frames ends.
#[derive(Debug, PartialEq, Eq)]
enum Tail {
    /// Every byte belongs to an intact frame.
    Clean,
    /// The last frame is incomplete or fails its checksum: a write a crash cut short.
    Torn,
    /// A frame in the middle fails its checksum: the file was damaged after it was written.
    Damaged,
}

/// The intact frames of `bytes`, up to the first that is not, and how the file ends.
fn frames(mut bytes: &[u8]) -> (Vec<&[u8]>, Tail) {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let Some((header, rest)) = bytes.split_first_chunk::<FRAME_HEADER>() else {
            return (out, Tail::Torn);
        };
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        let Some(body) = rest.get(..len) else {
            return (out, Tail::Torn);
        };
        if crc32fast::hash(body) != crc {
            let last = rest.len() == len;
            return (out, if last { Tail::Torn } else { Tail::Damaged });
        }
        out.push(body);
        bytes = &rest[len..];
    }
    (out, Tail::Clean)
}

fn lock(file: &Mutex<File>) -> std::sync::MutexGuard<'_, File> {
    // Writes are whole frames or fail; a panic mid-write leaves a torn frame that load cuts.
    file.lock().unwrap_or_else(|p| p.into_inner())
}

fn io(path: &Path, what: &str, e: std::io::Error) -> Error {
    Error::new(
        ErrorKind::InternalError,
        format!("cannot {what} {}: {e}", path.display()),
    )
}

fn corrupt(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::InternalError,
        format!("{} is damaged: {e}", path.display()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::journal::{record::Change, Record};

    fn entry(seq: u64) -> Entry {
        Entry {
            seq,
            records: vec![Record {
                change: Some(Change::Erase(format!("key-{seq}"))),
            }],
            more: false,
            piece: 0,
        }
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "mooncake-disklog-{name}-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[tokio::test]
    async fn appends_compacts_and_cuts_a_torn_tail() {
        let dir = temp_dir("torn");
        {
            let log = DiskLog::open(&dir).unwrap();
            assert!(DiskLog::open(&dir).is_err(), "a second master is refused");
            log.append(&[entry(1), entry(2)]).await.unwrap();
            log.compact(&Snapshot {
                seq: 2,
                ..Snapshot::default()
            })
            .await
            .unwrap();
            log.append(&[entry(3)]).await.unwrap();
            log.append(&[entry(4)]).await.unwrap();
        }
        // A crash in the middle of the next append.
        let torn = frame(&Batch {
            entries: vec![entry(5)],
        });
        let mut file = OpenOptions::new().append(true).open(dir.join(LOG)).unwrap();
        file.write_all(&torn[..torn.len() - 3]).unwrap();
        drop(file);

        let log = DiskLog::open(&dir).unwrap();
        let recovered = log.load().await.unwrap();
        assert_eq!(recovered.snapshot.map(|s| s.seq), Some(2));
        let seqs: Vec<u64> = recovered.entries.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [3, 4]);
        // The cut tail is gone: the next append follows entry 4.
        log.append(&[entry(5)]).await.unwrap();
        let seqs: Vec<u64> = log
            .load()
            .await
            .unwrap()
            .entries
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(seqs, [3, 4, 5]);
        drop(log);

        // A flipped bit in a record that others follow is damage, not a torn write.
        let path = dir.join(LOG);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[FRAME_HEADER + 1] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let log = DiskLog::open(&dir).unwrap();
        assert_eq!(
            log.load().await.unwrap_err().kind(),
            ErrorKind::InternalError
        );
        drop(log);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
