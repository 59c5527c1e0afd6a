//! What this node holds: payloads by name, the memory ranges they registered with the engine
//! (a range shared by payloads counted once), and the shards a failed pull left behind.
//!
//! Memory is kept alive by reference-counted owners: the engine's registration holds one, and
//! so does every task that reads the bytes directly (hashing, checking), so no range is freed
//! while anything may still touch it, whatever order things end in.

use std::any::Any;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use mooncake_common::{Error, ErrorKind, Result};
use mooncake_te::TransferEngine;

use crate::catalogue::{Location, Payload};

/// Keeps a buffer's memory valid while alive.
pub(crate) type Owner = Arc<dyn Any + Send + Sync>;

/// Why this node holds a payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// Hashing and publishing: not yet in the catalogue.
    Registering,
    Registered,
    /// Pulling: its buffers are being written.
    Pulling,
    Replica,
    /// Leaving the catalogue: nothing may add it back.
    Withdrawing,
}

/// One payload this node holds.
pub(crate) struct Held {
    pub(crate) role: Role,
    pub(crate) buffers: Vec<(usize, usize)>,
    /// Once in the catalogue: the entry as this node knows it, and its own copy of each shard.
    pub(crate) listed: Option<(Payload, Vec<Location>)>,
}

/// Shards held when a pull failed, for the next try with the same buffers.
pub(crate) struct Partial {
    pub(crate) buffers: Vec<(usize, usize)>,
    pub(crate) payload: Payload,
    pub(crate) done: Vec<bool>,
}

struct Range {
    len: usize,
    users: usize,
    /// A pull writes it: no other payload may use it.
    written: bool,
}

#[derive(Default)]
pub(crate) struct Local {
    pub(crate) payloads: HashMap<String, Held>,
    pub(crate) partial: HashMap<String, Partial>,
    ranges: HashMap<usize, Range>,
}

impl Local {
    /// Registers `spans` with `engine` for payload `name` and records it; the engine keeps
    /// the owner of each range it registers. A range may serve several payloads if it matches
    /// exactly and none of them writes it; any other overlap fails with
    /// `ERR_ADDRESS_OVERLAPPED`.
    pub(crate) fn open(
        &mut self,
        engine: &TransferEngine,
        name: &str,
        role: Role,
        spans: &[(usize, usize)],
        owners: &[Owner],
    ) -> Result<()> {
        if self.payloads.contains_key(name) {
            return Err(Error::new(
                ErrorKind::PayloadOpened,
                format!("this node already holds '{name}'"),
            ));
        }
        self.check(spans, role == Role::Pulling)?;
        let mut added = Vec::new();
        for (&(addr, len), owner) in spans.iter().zip(owners) {
            if self.ranges.contains_key(&addr) {
                continue;
            }
            // SAFETY: `owner` keeps the range valid for reads and writes, and the engine keeps
            // a clone of it for as long as the range is registered or in use by a transfer.
            let registered = unsafe { engine.register(addr, len, "*", Box::new(owner.clone())) };
            if let Err(e) = registered {
                for addr in added {
                    let _ = engine.unregister(addr);
                }
                return Err(e);
            }
            added.push(addr);
        }
        for &(addr, len) in spans {
            let range = self.ranges.entry(addr).or_insert(Range {
                len,
                users: 0,
                written: false,
            });
            range.users += 1;
            range.written |= role == Role::Pulling;
        }
        self.payloads.insert(
            name.to_owned(),
            Held {
                role,
                buffers: spans.to_vec(),
                listed: None,
            },
        );
        Ok(())
    }

    /// Changes `name`'s role; a finished pull's ranges may then be shared.
    pub(crate) fn settle(&mut self, name: &str, role: Role) {
        let Some(held) = self.payloads.get_mut(name) else {
            return;
        };
        if held.role == Role::Pulling && role != Role::Pulling {
            for (addr, _) in &held.buffers {
                if let Some(range) = self.ranges.get_mut(addr) {
                    range.written = false;
                }
            }
        }
        held.role = role;
    }

    pub(crate) fn role(&self, name: &str) -> Option<Role> {
        self.payloads.get(name).map(|h| h.role)
    }

    /// Forgets `name` and lets the engine go of ranges no other payload uses (it keeps their
    /// owners while a transfer still uses them).
    pub(crate) fn close(&mut self, engine: &TransferEngine, name: &str) {
        let Some(held) = self.payloads.remove(name) else {
            return;
        };
        for (addr, _) in &held.buffers {
            let Some(range) = self.ranges.get_mut(addr) else {
                continue;
            };
            range.users = range.users.saturating_sub(1);
            if range.users > 0 {
                continue;
            }
            self.ranges.remove(addr);
            if let Err(e) = engine.unregister(*addr) {
                tracing::warn!("P2P '{name}': {addr:#x} stays registered: {e}");
            }
        }
    }

    /// Refuses empty buffers, buffers that overlap each other, and buffers that overlap a
    /// registered range other than exactly, or exactly where either side writes.
    fn check(&self, spans: &[(usize, usize)], writes: bool) -> Result<()> {
        let overlap = |a: (usize, usize), b: (usize, usize)| a.0 < b.0 + b.1 && b.0 < a.0 + a.1;
        let mut seen = HashSet::new();
        for (i, &(addr, len)) in spans.iter().enumerate() {
            if len == 0 || addr.checked_add(len).is_none() {
                return Err(Error::invalid(format!(
                    "buffer {i} is empty or out of range"
                )));
            }
            if !seen.insert(addr) || spans[..i].iter().any(|&other| overlap(other, (addr, len))) {
                return Err(Error::new(
                    ErrorKind::AddressOverlapped,
                    format!("buffer {i} overlaps another buffer of the same payload"),
                ));
            }
            for (&start, range) in &self.ranges {
                if !overlap((start, range.len), (addr, len)) {
                    continue;
                }
                let why = if (start, range.len) != (addr, len) {
                    "overlaps memory of another payload"
                } else if writes || range.written {
                    "is memory another payload uses, and a pull writes it"
                } else {
                    continue;
                };
                return Err(Error::new(
                    ErrorKind::AddressOverlapped,
                    format!("buffer {i} ({addr:#x}+{len}) {why}"),
                ));
            }
        }
        Ok(())
    }
}
