//! Writes: `PutStart` (or `UpsertStart`) names the write and its replicas, one engine batch
//! fills them, and `PutEnd` (or `PutRevoke`) names the same write, so a late step of one write
//! can never commit or free another's space.

use std::collections::HashMap;
use std::time::Instant;

use mooncake_common::{Error, ErrorKind, Result};
use mooncake_te::Opcode;
use mooncake_transport::copy::copy_bytes;

use super::lookups::{RECOVERY_POLL, RECOVERY_WAIT};
use super::metrics::Operation;
use super::reservations::{self, Part, Used};
use super::transfer::{checked_replicas, Move, Replica};
use super::{Staged, StoreClient};
use crate::master::types::WriteConfig;
use crate::proto;
use crate::wire::{from_outcome, to_uuid, to_write_config};

/// Values copied into staging, ready for [`StoreClient::write_staged`]. The copy is taken when
/// this is made, so the caller may reuse its memory as soon as it has one.
pub struct StagedValues {
    blocks: Vec<Staged>,
    lens: Vec<usize>,
}

impl StoreClient {
    /// Copies `values` into registered staging now. A failure here (a closed client, staging
    /// full) is counted as failed puts: the write never starts.
    pub fn stage_values(&self, values: &[&[u8]]) -> Result<StagedValues> {
        let started = Instant::now();
        let staged = self.copy_into_staging(values);
        if staged.is_err() {
            self.metrics
                .record(Operation::Put, started, values.iter().map(|_| None));
        }
        staged
    }

    fn copy_into_staging(&self, values: &[&[u8]]) -> Result<StagedValues> {
        self.ensure_open()?;
        let mut blocks = Vec::with_capacity(values.len());
        let mut lens = Vec::with_capacity(values.len());
        for value in values {
            let block = self.stage(value.len().max(1))?;
            // SAFETY: the block is at least `value.len()` bytes of registered memory that
            // this call owns; `value` is the caller's, alive for the call.
            unsafe { copy_bytes(value.as_ptr(), block.addr() as *mut u8, value.len()) };
            blocks.push(block);
            lens.push(value.len());
        }
        Ok(StagedValues { blocks, lens })
    }

    /// Writes staged values under `keys` (one per value); one result per key.
    pub async fn write_staged(
        &self,
        keys: &[String],
        staged: StagedValues,
        config: &WriteConfig,
        upsert: bool,
    ) -> Vec<Result<()>> {
        let ranges: Vec<(usize, usize)> = staged
            .blocks
            .iter()
            .zip(&staged.lens)
            .map(|(block, len)| (block.addr(), *len))
            .collect();
        // `staged` lives until the transfers are done.
        let results = self.write_from(keys, &ranges, config, upsert).await;
        drop(staged);
        results
    }

    /// Stores `value` under `key` (insert if absent: an existing key is left as it is).
    pub async fn put(&self, key: &str, value: &[u8], config: &WriteConfig) -> Result<()> {
        self.write_copy(key, value, config, false).await
    }

    /// Inserts or replaces `value` under `key`.
    pub async fn upsert(&self, key: &str, value: &[u8], config: &WriteConfig) -> Result<()> {
        self.write_copy(key, value, config, true).await
    }

    async fn write_copy(
        &self,
        key: &str,
        value: &[u8],
        config: &WriteConfig,
        upsert: bool,
    ) -> Result<()> {
        let staged = self.stage_values(&[value])?;
        first(
            self.write_staged(&[key.to_owned()], staged, config, upsert)
                .await,
        )
    }

    /// Stores `len` bytes of registered memory at `addr` under `key` (zero copy).
    pub async fn put_from(
        &self,
        key: &str,
        addr: usize,
        len: usize,
        config: &WriteConfig,
    ) -> Result<()> {
        self.write_registered(key, (addr, len), config, false).await
    }

    /// Inserts or replaces `key` from registered memory (zero copy).
    pub async fn upsert_from(
        &self,
        key: &str,
        addr: usize,
        len: usize,
        config: &WriteConfig,
    ) -> Result<()> {
        self.write_registered(key, (addr, len), config, true).await
    }

    async fn write_registered(
        &self,
        key: &str,
        range: (usize, usize),
        config: &WriteConfig,
        upsert: bool,
    ) -> Result<()> {
        first(
            self.write_from(&[key.to_owned()], &[range], config, upsert)
                .await,
        )
    }

    /// Batch of zero-copy puts; one result per key, failures isolated per key.
    pub async fn batch_put_from(
        &self,
        keys: &[String],
        ranges: &[(usize, usize)],
        config: &WriteConfig,
    ) -> Vec<Result<()>> {
        self.write_from(keys, ranges, config, false).await
    }

    /// Batch of copying puts.
    pub async fn batch_put(
        &self,
        keys: &[String],
        values: &[&[u8]],
        config: &WriteConfig,
    ) -> Vec<Result<()>> {
        match self.stage_values(values) {
            Ok(staged) => self.write_staged(keys, staged, config, false).await,
            Err(e) => keys.iter().map(|_| Err(e.clone())).collect(),
        }
    }

    /// Every put and upsert that got past staging ends here, and is counted in the metrics here.
    async fn write_from(
        &self,
        keys: &[String],
        ranges: &[(usize, usize)],
        config: &WriteConfig,
        upsert: bool,
    ) -> Vec<Result<()>> {
        let writes = async {
            if let Err(e) = self.ensure_open() {
                return keys.iter().map(|_| Err(e.clone())).collect();
            }
            self.write_each(keys, ranges, config, upsert).await
        };
        self.metrics
            .observe_each(Operation::Put, writes, |i, ()| {
                ranges.get(i).map_or(0, |(_, len)| *len as u64)
            })
            .await
    }

    async fn write_each(
        &self,
        keys: &[String],
        ranges: &[(usize, usize)],
        config: &WriteConfig,
        upsert: bool,
    ) -> Vec<Result<()>> {
        let mut results: Vec<Result<()>> = vec![Ok(()); keys.len()];
        if keys.len() != ranges.len() {
            let e = Error::new(
                ErrorKind::InvalidArgument,
                "keys and buffers differ in number",
            );
            return keys.iter().map(|_| Err(e.clone())).collect();
        }
        for (i, (key, (addr, len))) in keys.iter().zip(ranges).enumerate() {
            if *len == 0 {
                results[i] = Err(Error::new(
                    ErrorKind::InvalidArgument,
                    format!("'{key}': the value must not be empty"),
                ));
            } else if !self.engine.is_registered(*addr, *len) {
                results[i] = Err(Error::new(
                    ErrorKind::InvalidArgument,
                    format!("'{key}': the buffer is not registered (registerBuffer it, or use allocate)"),
                ));
            }
        }
        let mut todo: Vec<usize> = (0..keys.len()).filter(|i| results[*i].is_ok()).collect();
        if !upsert {
            // Small puts take parts of reservations: one round trip. What that path gives
            // back (a reservation the master no longer holds) goes the usual way.
            let mut parts = Vec::new();
            let mut rest = Vec::new();
            for i in todo {
                let len = ranges[i].1 as u64;
                let part = if reservations::eligible(config, len) {
                    self.reservations.take(len).await
                } else {
                    None
                };
                match part {
                    Some(part) => parts.push((i, part)),
                    None => rest.push(i),
                }
            }
            rest.extend(self.write_reserved(keys, ranges, parts, &mut results).await);
            rest.sort_unstable();
            todo = rest;
        }
        if todo.is_empty() {
            return results;
        }
        let mut wire = to_write_config(config);
        if wire.host_id.is_empty() {
            wire.host_id = self.host_id.clone();
        }
        let request = proto::BatchPutStartRequest {
            client_id: Some(to_uuid(self.id.0)),
            keys: todo.iter().map(|i| keys[*i].clone()).collect(),
            sizes: todo.iter().map(|i| ranges[*i].1 as u64).collect(),
            config: Some(wire),
        };
        let generation = self.master.generation();
        let started = self.start_writes(request, upsert).await;
        let started = match started {
            Ok(s) => s.results,
            Err(e) => {
                for i in &todo {
                    results[*i] = Err(e.clone());
                }
                return results;
            }
        };
        if started.len() != todo.len() {
            let e = Error::new(
                ErrorKind::Protocol,
                format!(
                    "the master answered {} of {} write starts",
                    started.len(),
                    todo.len()
                ),
            );
            // Writes it did start are left to its release timeout.
            for i in &todo {
                results[*i] = Err(e.clone());
            }
            return results;
        }
        // Every write the master granted: (item, write id, replicas).
        let mut granted: Vec<(usize, u64, Vec<Replica>)> = Vec::new();
        for (i, reply) in todo.iter().zip(started) {
            let key = &keys[*i];
            match from_outcome(reply.outcome.as_ref()) {
                Ok(()) if reply.write_id == 0 => {
                    results[*i] = Err(Error::new(
                        ErrorKind::Protocol,
                        format!("the master started a write of '{key}' without naming it"),
                    ));
                }
                Ok(()) => {
                    match checked_replicas(key, &reply.replicas, Some(ranges[*i].1 as u64)) {
                        Ok(list) => granted.push((*i, reply.write_id, list)),
                        Err(e) => {
                            // Nothing was written: give the space back.
                            granted.push((*i, reply.write_id, Vec::new()));
                            results[*i] = Err(e);
                        }
                    }
                }
                // Put is insert-if-absent, as in Mooncake: the key already holds a value.
                Err(e) if e.kind() == ErrorKind::ObjectAlreadyExists && !upsert => {}
                Err(e) => results[*i] = Err(e),
            }
        }
        if self.master.generation() != generation {
            // Granted by a master that has since been replaced: its successor knows nothing of
            // this space and may hand it out, so no byte goes there.
            let e = Error::new(
                ErrorKind::RpcFail,
                "the master leader changed while the write started; nothing was written",
            );
            for (i, _, _) in &granted {
                if results[*i].is_ok() {
                    results[*i] = Err(e.clone());
                }
            }
            return results;
        }
        let work: Vec<Move> = granted
            .iter()
            .flat_map(|(i, _, list)| {
                list.iter().map(move |replica| Move {
                    item: *i,
                    op: Opcode::Write,
                    local: ranges[*i].0,
                    len: ranges[*i].1,
                    replica: replica.clone(),
                })
            })
            .collect();
        let mut failed: HashMap<usize, Error> = HashMap::new();
        for (i, outcome) in self.move_bytes(work, None).await {
            if let Err(e) = outcome {
                failed.entry(i).or_insert(e);
            }
        }
        let (mut commit, mut revoke) = (Vec::new(), Vec::new());
        for (i, write, _) in &granted {
            if results[*i].is_err() {
                revoke.push((*i, *write));
                continue;
            }
            match failed.remove(i) {
                None => commit.push((*i, *write)),
                Some(e) => {
                    results[*i] = Err(Error::new(
                        ErrorKind::TransferFailed,
                        format!("'{}': {}", keys[*i], e.message()),
                    ));
                    revoke.push((*i, *write));
                }
            }
        }
        self.finish_writes(keys, &commit, true, &mut results).await;
        self.finish_writes(keys, &revoke, false, &mut results).await;
        results
    }

    /// Writes values into reserved parts (`(item, part)`) and commits them as objects in one
    /// request; returns the items to write the usual way (their reservation is gone).
    async fn write_reserved(
        &self,
        keys: &[String],
        ranges: &[(usize, usize)],
        parts: Vec<(usize, Part)>,
        results: &mut [Result<()>],
    ) -> Vec<usize> {
        let mut again = Vec::new();
        let (parts, lapsed): (Vec<_>, Vec<_>) = parts
            .into_iter()
            .partition(|(_, part)| self.reservations.still_usable(part));
        for (i, part) in lapsed {
            // Nothing was written to it.
            self.reservations.done(part, Used::Unused);
            again.push(i);
        }
        if parts.is_empty() {
            return again;
        }
        let work: Vec<Move> = parts
            .iter()
            .map(|(i, part)| Move {
                item: *i,
                op: Opcode::Write,
                local: ranges[*i].0,
                len: ranges[*i].1,
                replica: Replica {
                    id: 0,
                    endpoint: part.endpoint.clone(),
                    address: part.address,
                    size: part.size,
                },
            })
            .collect();
        let mut failed: HashMap<usize, Error> = HashMap::new();
        for (i, outcome) in self.move_bytes(work, None).await {
            if let Err(e) = outcome {
                failed.entry(i).or_insert(e);
            }
        }
        let mut landed = Vec::new();
        for (i, part) in parts {
            match failed.remove(&i) {
                None => landed.push((i, part)),
                Some(e) => {
                    results[i] = Err(Error::new(
                        ErrorKind::TransferFailed,
                        format!("'{}': {}", keys[i], e.message()),
                    ));
                    self.reservations.done(part, Used::Spoiled);
                }
            }
        }
        if landed.is_empty() {
            return again;
        }
        let request = proto::CommitReservedRequest {
            client_id: Some(to_uuid(self.id.0)),
            writes: landed
                .iter()
                .map(|(i, part)| proto::ReservedWrite {
                    key: keys[*i].clone(),
                    reservation_id: part.reservation,
                    offset: part.offset,
                    size: part.size,
                    address: part.address,
                })
                .collect(),
        };
        // Never repeated: a repeat of a commit that ran would find its part taken.
        let reply = self
            .master
            .call_once(
                request,
                |mut g, r| async move { g.commit_reserved(r).await },
            )
            .await;
        match reply {
            Ok(reply) => {
                let outcomes = commit_outcomes(reply.results);
                for ((i, part), outcome) in landed.into_iter().zip(outcomes) {
                    match outcome {
                        Ok(()) => self.reservations.done(part, Used::Committed),
                        // Put is insert-if-absent: the key already holds a value.
                        Err(e) if e.kind() == ErrorKind::ObjectAlreadyExists => {
                            self.reservations.done(part, Used::Unused)
                        }
                        Err(e) if e.kind() == ErrorKind::InvalidWrite => {
                            self.reservations.done(part, Used::Stale);
                            again.push(i);
                        }
                        Err(e) => {
                            results[i] = Err(e);
                            self.reservations.done(part, Used::Spoiled);
                        }
                    }
                }
            }
            // Whether it ran is unknown: the parts are never used again.
            Err(e) => {
                for (i, part) in landed {
                    results[i] = Err(e.clone());
                    self.reservations.done(part, Used::Spoiled);
                }
            }
        }
        again
    }

    /// `PutStart` (or `UpsertStart`) of every key in `request`. Keys the master cannot place
    /// yet because their room is on nodes that mounted again moments ago (after a master
    /// recovered or took over) are started again for a moment.
    async fn start_writes(
        &self,
        request: proto::BatchPutStartRequest,
        upsert: bool,
    ) -> Result<proto::BatchPutStartResponse> {
        let deadline = std::time::Instant::now() + RECOVERY_WAIT;
        let mut answers = self.start_once(request.clone(), upsert).await?;
        loop {
            let again: Vec<usize> = (0..answers.results.len())
                .filter(|i| {
                    answers.results[*i].outcome.as_ref().is_some_and(|o| {
                        o.kind == proto::ErrorKind::ErrUnavailableInCurrentStatus as i32
                    })
                })
                .collect();
            if again.is_empty() || std::time::Instant::now() >= deadline {
                return Ok(answers);
            }
            tokio::time::sleep(RECOVERY_POLL).await;
            let retry = proto::BatchPutStartRequest {
                keys: again.iter().map(|i| request.keys[*i].clone()).collect(),
                sizes: again.iter().map(|i| request.sizes[*i]).collect(),
                ..request.clone()
            };
            let replies = self.start_once(retry, upsert).await?;
            if replies.results.len() != again.len() {
                return Ok(replies);
            }
            for (i, reply) in again.into_iter().zip(replies.results) {
                answers.results[i] = reply;
            }
        }
    }

    async fn start_once(
        &self,
        request: proto::BatchPutStartRequest,
        upsert: bool,
    ) -> Result<proto::BatchPutStartResponse> {
        // Not repeated after a timeout: a start that ran would make its repeat answer "already
        // exists", which a put reads as done.
        if upsert {
            self.master
                .call_once(
                    request,
                    |mut g, r| async move { g.batch_upsert_start(r).await },
                )
                .await
        } else {
            self.master
                .call_once(
                    request,
                    |mut g, r| async move { g.batch_put_start(r).await },
                )
                .await
        }
    }

    /// `PutEnd` (`commit`) or `PutRevoke` for `(item, write id)` pairs.
    async fn finish_writes(
        &self,
        keys: &[String],
        writes: &[(usize, u64)],
        commit: bool,
        results: &mut [Result<()>],
    ) {
        if writes.is_empty() {
            return;
        }
        let request = proto::BatchKeysRequest {
            client_id: Some(to_uuid(self.id.0)),
            keys: writes.iter().map(|(i, _)| keys[*i].clone()).collect(),
            write_ids: writes.iter().map(|(_, w)| *w).collect(),
        };
        let reply = if commit {
            self.master
                .call(request, |mut g, r| async move { g.batch_put_end(r).await })
                .await
        } else {
            self.master
                .call(
                    request,
                    |mut g, r| async move { g.batch_put_revoke(r).await },
                )
                .await
        };
        match reply {
            Ok(reply) if commit => {
                let outcomes = commit_outcomes(reply.results);
                for ((i, _), outcome) in writes.iter().zip(outcomes) {
                    if let Err(e) = outcome {
                        results[*i] = Err(e);
                    }
                }
            }
            Ok(_) => {}
            Err(e) if commit => {
                for (i, _) in writes {
                    results[*i] = Err(e.clone());
                }
            }
            Err(e) => tracing::warn!("revoking failed writes: {e}"),
        }
    }
}

/// One result per commit asked for, in order; commits the master did not answer failed.
fn commit_outcomes(results: Vec<proto::Outcome>) -> impl Iterator<Item = Result<()>> {
    results
        .into_iter()
        .map(|o| from_outcome(Some(&o)))
        .chain(std::iter::repeat_with(|| {
            Err(Error::new(
                ErrorKind::Protocol,
                "the master answered fewer commits than asked",
            ))
        }))
}

fn first(results: Vec<Result<()>>) -> Result<()> {
    results.into_iter().next().unwrap_or(Ok(()))
}
