//! Reads: the replica list (which grants a lease), the best replica first and the next one
//! when a transfer fails or stalls, and a re-validation for a read that outlived its lease.
//! Every copy is bounded by its destination: a size the master names that does not fit is
//! `ERR_BUFFER_OVERFLOW`, never a longer copy.

use std::time::{Duration, Instant};

use mooncake_common::{Error, ErrorKind, Result};
use mooncake_te::Opcode;

use super::metrics::Operation;
use super::transfer::{Move, Replica};
use super::{Staged, StoreClient, Value};

/// Attempts of a read whose lease keeps running out.
const READ_ATTEMPTS: usize = 3;

impl StoreClient {
    /// The value of `key`.
    pub async fn get(&self, key: &str) -> Result<Value> {
        self.metrics
            .observe(Operation::Get, self.read_value(key), |value| {
                value.len() as u64
            })
            .await
    }

    async fn read_value(&self, key: &str) -> Result<Value> {
        self.ensure_open()?;
        // Read straight into the memory the value is returned in: a block of the (registered)
        // staging buffer, or else a vector registered privately for this one read.
        let mut value: Option<Value> = None;
        let mut registered: Option<usize> = None;
        let result = self
            .read_object(key, |size| {
                if let Some(addr) = registered.take() {
                    let _ = self.engine.unregister(addr);
                }
                let len = usize::try_from(size)
                    .map_err(|_| Error::new(ErrorKind::BufferOverflow, "too large"))?
                    .max(1);
                if let Some(mut staged) = self.local.take(len) {
                    let addr = staged.as_mut_ptr() as usize;
                    value = Some(Value::Staged(staged));
                    return Ok((addr, len));
                }
                // Left uninitialised: the read writes it before anything reads it.
                let mut owned = Vec::with_capacity(len);
                let addr = owned.as_mut_ptr() as usize;
                // SAFETY: the vector outlives the registration: it is unregistered below before
                // the vector is moved out, and never reallocated meanwhile.
                unsafe { self.engine.register_private(addr, len, Box::new(())) }?;
                registered = Some(addr);
                value = Some(Value::Owned(owned));
                Ok((addr, len))
            })
            .await;
        if let Some(addr) = registered {
            let _ = self.engine.unregister(addr);
        }
        let size = result? as usize;
        let mut value = value
            .ok_or_else(|| Error::new(ErrorKind::InternalError, "read without a destination"))?;
        // SAFETY: the read succeeded, so it wrote `size` bytes at the destination, which
        // holds at least that many (checked by `read_object`).
        unsafe { value.filled(size) };
        Ok(value)
    }

    /// Reads `key` into registered memory at `addr` (capacity `cap`); returns its size.
    pub async fn get_into(&self, key: &str, addr: usize, cap: usize) -> Result<u64> {
        let read = async {
            self.ensure_open()?;
            self.read_into(key, addr, cap, None).await
        };
        self.metrics
            .observe(Operation::Get, read, |size| *size)
            .await
    }

    async fn read_into(
        &self,
        key: &str,
        addr: usize,
        cap: usize,
        avoid: Option<u64>,
    ) -> Result<u64> {
        if !self.engine.is_registered(addr, cap.max(1)) {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                "the buffer is not registered (registerBuffer it, or use allocate)",
            ));
        }
        self.read_object_avoiding(key, avoid, |_| Ok((addr, cap)))
            .await
    }

    async fn read_object(
        &self,
        key: &str,
        destination: impl FnMut(u64) -> Result<(usize, usize)>,
    ) -> Result<u64> {
        self.read_object_avoiding(key, None, destination).await
    }

    /// One read: the replica list (one RPC), a destination `(address, capacity)` for the size
    /// it names, the bytes, and the lease check; `avoid` is a replica to try last. Returns
    /// the size.
    async fn read_object_avoiding(
        &self,
        key: &str,
        avoid: Option<u64>,
        mut destination: impl FnMut(u64) -> Result<(usize, usize)>,
    ) -> Result<u64> {
        let mut last = None;
        let mut target: Option<(u64, usize)> = None;
        for _ in 0..READ_ATTEMPTS {
            let asked = Instant::now();
            let generation = self.master.generation();
            let (list, ttl) = self.lookups.lookup(key).await?;
            // Checked: non-empty, every replica of this size.
            let size = list[0].size;
            let addr = match target {
                Some((known, addr)) if known == size => addr,
                _ => {
                    let (addr, cap) = destination(size)?;
                    fits(key, size, cap)?;
                    target = Some((size, addr));
                    addr
                }
            };
            let used = self
                .read_any(key, addr, size as usize, &list, avoid)
                .await?;
            if Instant::now() < asked + ttl && self.master.generation() == generation {
                return Ok(size);
            }
            // The lease ran out while reading, or the master that granted it was replaced
            // (the new one knows no leases): the bytes are good only if the replica we read is
            // still the object's (ids change on removal, eviction and rewrite, and survive a
            // failover).
            match self.lookups.lookup(key).await {
                Ok((now, _)) if now.iter().any(|r| r.id == used) => return Ok(size),
                Ok(_) => {
                    last = Some(Error::new(
                        ErrorKind::LeaseExpired,
                        format!("'{key}' changed while being read"),
                    ))
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            Error::new(ErrorKind::LeaseExpired, format!("'{key}' kept changing"))
        }))
    }

    /// Batch of zero-copy reads; one result (the size) per key.
    pub async fn batch_get_into(
        &self,
        keys: &[String],
        ranges: &[(usize, usize)],
    ) -> Vec<Result<u64>> {
        if keys.len() != ranges.len() {
            let e = Error::new(
                ErrorKind::InvalidArgument,
                "keys and buffers differ in number",
            );
            self.metrics
                .record(Operation::Get, Instant::now(), keys.iter().map(|_| None));
            return keys.iter().map(|_| Err(e.clone())).collect();
        }
        self.batch_read(keys, |i, _| {
            let (addr, cap) = ranges[i];
            if !self.engine.is_registered(addr, cap.max(1)) {
                return Err(Error::new(
                    ErrorKind::InvalidArgument,
                    "the buffer is not registered",
                ));
            }
            Ok((addr, cap))
        })
        .await
    }

    /// Batch of copying reads; all transfers overlap.
    pub async fn batch_get(&self, keys: &[String]) -> Vec<Result<Value>> {
        let mut staged: Vec<Option<Staged>> = keys.iter().map(|_| None).collect();
        let sizes = self
            .batch_read(keys, |i, size| {
                let len = usize::try_from(size)
                    .map_err(|_| Error::new(ErrorKind::BufferOverflow, "too large"))?
                    .max(1);
                let block = self.stage(len)?;
                let range = (block.addr(), len);
                staged[i] = Some(block);
                Ok(range)
            })
            .await;
        sizes
            .into_iter()
            .zip(staged)
            .map(|(size, block)| {
                let size = size? as usize;
                let block = block.ok_or_else(|| {
                    Error::new(ErrorKind::InternalError, "read without a destination")
                })?;
                Ok(match block {
                    Staged::Local(mut staging) => {
                        staging.truncate(size);
                        Value::Staged(staging)
                    }
                    // A temporary allocation goes away with `block`: copy out of it.
                    temporary => {
                        // SAFETY: the read filled `size` bytes of the allocation, which holds
                        // at least that many (checked by `batch_read`), alive here.
                        Value::Owned(
                            unsafe {
                                std::slice::from_raw_parts(temporary.addr() as *const u8, size)
                            }
                            .to_vec(),
                        )
                    }
                })
            })
            .collect()
    }

    /// The batch read path: one master round trip for every key's replicas, one engine batch
    /// for every key's best replica into the memory `destination(index, size)` names
    /// (`(address, capacity)`), and the careful single-key path for keys whose first choice
    /// failed or whose lease ran out.
    async fn batch_read(
        &self,
        keys: &[String],
        destination: impl FnMut(usize, u64) -> Result<(usize, usize)>,
    ) -> Vec<Result<u64>> {
        let reads = self.batch_read_each(keys, destination);
        self.metrics
            .observe_each(Operation::Get, reads, |_, size| *size)
            .await
    }

    async fn batch_read_each(
        &self,
        keys: &[String],
        mut destination: impl FnMut(usize, u64) -> Result<(usize, usize)>,
    ) -> Vec<Result<u64>> {
        if let Err(e) = self.ensure_open() {
            return keys.iter().map(|_| Err(e.clone())).collect();
        }
        let asked = Instant::now();
        let generation = self.master.generation();
        let lists = self.lookups.lookup_batch(keys).await;
        let mut results: Vec<Result<u64>> = Vec::with_capacity(keys.len());
        let mut work = Vec::new();
        // Per key: its destination, lease, first choice and whether another replica exists.
        let mut pending: Vec<Option<Planned>> = Vec::with_capacity(keys.len());
        let mut deadline: Option<Duration> = None;
        for (i, lookup) in lists.into_iter().enumerate() {
            let planned = lookup.and_then(|(list, ttl)| {
                let best = self.preference(&list).swap_remove(0);
                let (addr, cap) = destination(i, best.size)?;
                fits(&keys[i], best.size, cap)?;
                Ok((best, addr, cap, ttl, list.len() > 1))
            });
            match planned {
                Ok((best, addr, cap, ttl, fallback)) => {
                    let len = best.size as usize;
                    if fallback {
                        let wait = self.pace.deadline(self.place(&best), len);
                        deadline = Some(deadline.map_or(wait, |d| d.max(wait)));
                    }
                    results.push(Ok(best.size));
                    pending.push(Some(Planned {
                        addr,
                        cap,
                        ttl,
                        first_choice: best.id,
                    }));
                    work.push(Move {
                        item: i,
                        op: Opcode::Read,
                        local: addr,
                        len,
                        replica: best,
                    });
                }
                Err(e) => {
                    results.push(Err(e));
                    pending.push(None);
                }
            }
        }
        let mut failed = vec![false; keys.len()];
        for (i, outcome) in self.move_bytes(work, deadline).await {
            if let Some(flag) = failed.get_mut(i) {
                *flag |= outcome.is_err();
            }
        }
        for (i, entry) in pending.iter().enumerate() {
            let Some(planned) = entry else {
                continue;
            };
            // A failed first choice, a lease that ran out or a master replaced meanwhile: take
            // the careful single-key path, which falls back across replicas and re-validates.
            let moved = self.master.generation() != generation;
            if failed[i] || moved || Instant::now() >= asked + planned.ttl {
                let avoid = failed[i].then_some(planned.first_choice);
                results[i] = self
                    .read_into(&keys[i], planned.addr, planned.cap, avoid)
                    .await;
            }
        }
        results
    }

    /// Replicas best first: this process, then this host, then the rest.
    fn preference(&self, list: &[Replica]) -> Vec<Replica> {
        let mut sorted = list.to_vec();
        sorted.sort_by_key(|r| self.place(r));
        sorted
    }

    /// Reads `len` bytes from the best replica, falling back to the next when a transfer
    /// fails or stalls (every replica but the last gets a deadline); `avoid` is tried last.
    /// Returns the id of the replica read.
    async fn read_any(
        &self,
        key: &str,
        addr: usize,
        len: usize,
        list: &[Replica],
        avoid: Option<u64>,
    ) -> Result<u64> {
        let mut order = self.preference(list);
        if let Some(avoid) = avoid {
            order.sort_by_key(|r| r.id == avoid);
        }
        let mut last = None;
        let count = order.len();
        for (n, replica) in order.into_iter().enumerate() {
            let id = replica.id;
            match self.read_replica(replica, addr, len, n + 1 < count).await {
                Ok(()) => return Ok(id),
                Err(e) => {
                    tracing::debug!(
                        key,
                        replica = id,
                        "replica read failed, trying the next: {e}"
                    );
                    last = Some(e);
                }
            }
        }
        Err(Error::new(
            ErrorKind::TransferFailed,
            format!(
                "every replica of '{key}' failed: {}",
                last.map(|e| e.message().to_owned()).unwrap_or_default()
            ),
        ))
    }
}

/// A key's place in a batch read.
struct Planned {
    addr: usize,
    cap: usize,
    ttl: Duration,
    first_choice: u64,
}

fn fits(key: &str, size: u64, cap: usize) -> Result<()> {
    if size > cap as u64 {
        return Err(Error::new(
            ErrorKind::BufferOverflow,
            format!("'{key}' is {size} bytes; the buffer holds {cap}"),
        ));
    }
    Ok(())
}
