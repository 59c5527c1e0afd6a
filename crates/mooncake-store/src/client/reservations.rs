//! Puts in one round trip: space the master reserved for this client ahead of need. A small
//! put takes a part of a reservation here, writes its bytes there, and commits the part as the
//! object (`CommitReserved`); the master stays the authority and refuses a part it no longer
//! holds for this client. A reservation is used only while more than three quarters of its
//! lifetime are left, and is renewed several times per lifetime while held: a client that
//! loses touch with the master stops writing into its reservations within a quarter of a
//! lifetime, long before the master could give their space to anyone else (it parks what a
//! lapsed reservation held, and a recovered master places nothing in a segment for a while).
//! A part whose transfer failed is never used again (its bytes may still land).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use mooncake_common::{Error, ErrorKind, Result};

use super::lock;
use super::master_client::MasterClient;
use crate::allocator::{Block, SegmentAllocator};
use crate::master::types::{ClientId, SoftPin, WriteConfig};
use crate::proto;
use crate::wire::{from_outcome, to_uuid};

/// Values up to this size take the one-round-trip path.
pub(super) const FAST_MAX: u64 = 1 << 20;
/// Bytes asked for per reservation.
const RESERVATION_SIZE: u64 = 16 << 20;
/// How long no `Reserve` is asked after one was refused.
const QUIET_AFTER_REFUSAL: Duration = Duration::from_secs(1);
/// A reservation unused this long goes back.
const IDLE: Duration = Duration::from_secs(2);
/// Reservations held at once.
const MAX_HELD: usize = 2;

/// A part of a reservation, for one value.
pub(super) struct Part {
    pub(super) reservation: u64,
    pub(super) endpoint: String,
    /// Absolute address of the part's first byte.
    pub(super) address: u64,
    /// From the reservation's first byte.
    pub(super) offset: u64,
    pub(super) size: u64,
    block: Block,
}

/// What became of a part.
pub(super) enum Used {
    /// Committed: the part is the object now.
    Committed,
    /// Not committed, and its bytes have landed (the key existed): the part is free again.
    Unused,
    /// Its transfer failed: late bytes may still land, so it is never used again.
    Spoiled,
    /// The master no longer holds the reservation.
    Stale,
}

struct Held {
    id: u64,
    endpoint: String,
    address: u64,
    /// Free parts, as offsets from the reservation's first byte.
    free: SegmentAllocator,
    /// Its end by this client's clock (counted from before it was asked for).
    until: Instant,
    ttl: Duration,
    generation: u64,
    in_flight: usize,
    spoiled: bool,
    last_used: Instant,
}

impl Held {
    fn usable(&self, now: Instant, generation: u64) -> bool {
        self.generation == generation
            && self
                .until
                .checked_duration_since(now)
                .is_some_and(|left| left > self.ttl * 3 / 4)
    }
}

pub(super) struct Reservations {
    master: MasterClient,
    client: ClientId,
    host_id: String,
    /// Off against a master without reservations (Mooncake's own).
    enabled: AtomicBool,
    held: Mutex<Vec<Held>>,
    /// One `Reserve` at a time.
    asking: tokio::sync::Mutex<()>,
    /// After a refused `Reserve`, none until this: puts meanwhile take two steps rather than
    /// three.
    quiet_until: Mutex<Option<Instant>>,
}

/// Whether a put with `config` may take the one-round-trip path: one replica, placed where
/// the master likes, nothing pinned.
pub(super) fn eligible(config: &WriteConfig, size: u64) -> bool {
    config.replica_num == 1
        && config.preferred_segments.is_empty()
        && config.soft_pin == SoftPin::Preserve
        && !config.hard_pin
        && size > 0
        && size <= FAST_MAX
}

impl Reservations {
    pub(super) fn new(master: MasterClient, client: ClientId, host_id: String) -> Self {
        Self {
            enabled: AtomicBool::new(!master.is_mooncakes()),
            master,
            client,
            host_id,
            held: Mutex::default(),
            asking: tokio::sync::Mutex::new(()),
            quiet_until: Mutex::default(),
        }
    }

    /// A part of `size` bytes, reserving more space when none is left; `None` sends the put
    /// the two-round-trip way.
    pub(super) async fn take(&self, size: u64) -> Option<Part> {
        if !self.enabled.load(Ordering::Acquire) {
            return None;
        }
        if let Some(part) = self.take_held(size) {
            return Some(part);
        }
        let _asking = self.asking.lock().await;
        if let Some(part) = self.take_held(size) {
            return Some(part);
        }
        if lock(&self.quiet_until).is_some_and(|until| Instant::now() < until) {
            return None;
        }
        if !self.make_room().await {
            return None;
        }
        match self.reserve().await {
            Ok(held) => {
                lock(&self.held).push(held);
                self.take_held(size)
            }
            Err(e) => {
                if e.kind() == ErrorKind::NotImplemented {
                    self.enabled.store(false, Ordering::Release);
                }
                *lock(&self.quiet_until) = Some(Instant::now() + QUIET_AFTER_REFUSAL);
                tracing::debug!("no reservation: {e}");
                None
            }
        }
    }

    /// Reports how a part was used.
    pub(super) fn done(&self, part: Part, used: Used) {
        let mut held = lock(&self.held);
        let Some(at) = held.iter().position(|h| h.id == part.reservation) else {
            return;
        };
        let h = &mut held[at];
        h.in_flight = h.in_flight.saturating_sub(1);
        match used {
            Used::Committed => {}
            Used::Unused => h.free.free(part.block),
            Used::Spoiled => h.spoiled = true,
            Used::Stale => {
                held.remove(at);
            }
        }
    }

    /// Whether `part`'s reservation may still be written into: checked again just before its
    /// bytes go, since a process can be paused between taking a part and writing it.
    pub(super) fn still_usable(&self, part: &Part) -> bool {
        let (now, generation) = (Instant::now(), self.master.generation());
        lock(&self.held).iter().any(|h| {
            h.id == part.reservation
                && h.generation == generation
                && h.until
                    .checked_duration_since(now)
                    .is_some_and(|left| left > h.ttl / 2)
        })
    }

    fn take_held(&self, size: u64) -> Option<Part> {
        let (now, generation) = (Instant::now(), self.master.generation());
        let mut held = lock(&self.held);
        held.iter_mut()
            .filter(|h| h.usable(now, generation))
            .find_map(|h| {
                let block = h.free.allocate(size)?;
                h.in_flight += 1;
                h.last_used = now;
                Some(Part {
                    reservation: h.id,
                    endpoint: h.endpoint.clone(),
                    address: h.address + block.offset,
                    offset: block.offset,
                    size,
                    block,
                })
            })
    }

    /// Gives back reservations nothing can be taken from, so a new one may be held.
    async fn make_room(&self) -> bool {
        let (now, generation) = (Instant::now(), self.master.generation());
        let done: Vec<(u64, bool)> = {
            let mut held = lock(&self.held);
            let (spent, kept): (Vec<Held>, Vec<Held>) =
                std::mem::take(&mut *held).into_iter().partition(|h| {
                    h.in_flight == 0
                        && (!h.usable(now, generation) || h.free.largest_free() < FAST_MAX)
                });
            *held = kept;
            let room = held.len() < MAX_HELD;
            if !room {
                return false;
            }
            spent.into_iter().map(|h| (h.id, !h.spoiled)).collect()
        };
        for (id, landed) in done {
            self.release(id, landed).await;
        }
        true
    }

    async fn reserve(&self) -> Result<Held> {
        let asked = Instant::now();
        let generation = self.master.generation();
        let request = proto::ReserveRequest {
            client_id: Some(to_uuid(self.client.0)),
            size: RESERVATION_SIZE,
            host_id: self.host_id.clone(),
        };
        let reply = self
            .master
            .call_once(request, |mut g, r| async move { g.reserve(r).await })
            .await?;
        from_outcome(reply.outcome.as_ref())?;
        // What a master grants is checked before it places a byte.
        let sane = reply.size > 0
            && reply.size <= RESERVATION_SIZE
            && reply.address != 0
            && reply.address.checked_add(reply.size).is_some()
            && !reply.transport_endpoint.is_empty()
            && reply.ttl_ms > 0;
        if !sane {
            // Nothing was written to it: its space goes back at once.
            self.release(reply.reservation_id, true).await;
            return Err(Error::new(
                ErrorKind::Protocol,
                format!(
                    "the master granted a reservation of {} bytes at {:#x} on '{}' for {} ms",
                    reply.size, reply.address, reply.transport_endpoint, reply.ttl_ms
                ),
            ));
        }
        let ttl = Duration::from_millis(reply.ttl_ms);
        Ok(Held {
            id: reply.reservation_id,
            endpoint: reply.transport_endpoint,
            address: reply.address,
            free: SegmentAllocator::new(reply.size),
            until: asked + ttl,
            ttl,
            generation,
            in_flight: 0,
            spoiled: false,
            last_used: asked,
        })
    }

    async fn release(&self, id: u64, landed: bool) {
        let request = proto::ReleaseReservationRequest {
            client_id: Some(to_uuid(self.client.0)),
            reservation_id: id,
            landed,
        };
        let released = self
            .master
            .call_once(
                request,
                |mut g, r| async move { g.release_reservation(r).await },
            )
            .await;
        if let Err(e) = released {
            // It ends by itself once no longer renewed.
            tracing::debug!("releasing reservation {id}: {e}");
        }
    }

    /// Renews what is held, and forgets what the master no longer holds. Called a few times
    /// per lifetime.
    pub(super) async fn renew(&self) {
        let asked = Instant::now();
        // Space held idle is space the pool lacks.
        let idle: Vec<(u64, bool)> = {
            let mut held = lock(&self.held);
            let (idle, kept): (Vec<Held>, Vec<Held>) = std::mem::take(&mut *held)
                .into_iter()
                .partition(|h| h.in_flight == 0 && asked.duration_since(h.last_used) > IDLE);
            *held = kept;
            idle.into_iter().map(|h| (h.id, !h.spoiled)).collect()
        };
        for (id, landed) in idle {
            self.release(id, landed).await;
        }
        let ids: Vec<u64> = lock(&self.held).iter().map(|h| h.id).collect();
        if ids.is_empty() {
            return;
        }
        let request = proto::RenewReservationsRequest {
            client_id: Some(to_uuid(self.client.0)),
            reservation_ids: ids.clone(),
        };
        let reply = self
            .master
            .call_once(
                request,
                |mut g, r| async move { g.renew_reservations(r).await },
            )
            .await;
        let Ok(reply) = reply else {
            return;
        };
        let ttl = Duration::from_millis(reply.ttl_ms);
        let mut held = lock(&self.held);
        for (id, renewed) in ids
            .iter()
            .zip(reply.renewed.iter().chain(std::iter::repeat(&false)))
        {
            if let Some(at) = held.iter().position(|h| h.id == *id) {
                if *renewed {
                    held[at].until = asked + ttl;
                    held[at].ttl = ttl;
                } else if held[at].in_flight == 0 {
                    held.remove(at);
                } else {
                    // Lost: nothing new goes there; parts in flight find out at commit.
                    held[at].until = asked;
                }
            }
        }
    }

    /// How often to renew.
    pub(super) fn renew_every(&self) -> Duration {
        lock(&self.held)
            .iter()
            .map(|h| h.ttl / 8)
            .min()
            .unwrap_or(Duration::from_millis(125))
    }

    /// Gives everything back (at close).
    pub(super) async fn release_all(&self) {
        let held: Vec<Held> = std::mem::take(&mut *lock(&self.held));
        for h in held {
            self.release(h.id, !h.spoiled && h.in_flight == 0).await;
        }
    }
}
