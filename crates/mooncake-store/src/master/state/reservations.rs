//! Space reserved ahead of need, for puts in one round trip.
//!
//! A client reserves a range of a segment, writes values into parts of it, and commits each
//! part as a new object whose one replica is exactly that part (COMPLETE at once). The master
//! stays the authority: a commit names the reservation and the part, and fails unless the
//! reservation still holds that part for that client. Reservations are not logged: they last
//! [`RESERVATION_TTL`] unless renewed, which is shorter than the pause before a recovered
//! master places anything in a segment, so a client of a master that restarted stops writing
//! into its old reservations before their space can go to anybody else. What a reservation
//! still holds when it ends is parked until bytes in flight to it have surely landed (freed at
//! once when its client says none are).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use mooncake_common::{Error, ErrorKind, Result};

use super::{check_key, Master, Object, Replica};
use crate::allocator::Block;
use crate::master::types::{ClientId, ReplicaStatus, SegmentId, SoftPin, WriteConfig};

/// How long a reservation lasts without renewal.
pub const RESERVATION_TTL: Duration = Duration::from_secs(1);

/// The largest reservation.
pub const MAX_RESERVATION: u64 = 64 << 20;

/// The smallest reservation worth lending.
const MIN_RESERVATION: u64 = 256 << 10;

/// A reservation is at most this fraction of the pool.
const POOL_SHARE: u64 = 16;

/// All reservations together are at most this fraction of the pool.
const MAX_LENT_SHARE: u64 = 4;

/// Reservations one client may hold at once.
const MAX_PER_CLIENT: usize = 4;

/// What a client reserved.
pub(super) struct Reservation {
    client: ClientId,
    segment: SegmentId,
    /// Segment offset of its first byte: commits count from it.
    start: u64,
    size: u64,
    /// Free parts, as segment offsets: offset -> length.
    free: BTreeMap<u64, u64>,
    expires_at: Instant,
}

/// A part of a reservation that a client wrote a value into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReservedPart {
    /// The reservation.
    pub reservation: u64,
    /// From its first byte.
    pub offset: u64,
    /// Bytes.
    pub size: u64,
    /// Where the bytes went, in the owner's memory.
    pub address: u64,
}

/// What `reserve` grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReservationGrant {
    /// Its id, for renewals and commits.
    pub id: u64,
    /// The Transfer Engine segment to write to.
    pub te_endpoint: String,
    /// Address of its first byte in the owner's memory.
    pub address: u64,
    /// Bytes.
    pub size: u64,
    /// How long it lasts without renewal.
    pub ttl: Duration,
}

impl Master {
    /// Reserves `size` bytes in one segment for `client`'s puts.
    pub fn reserve(
        &mut self,
        now: Instant,
        client: ClientId,
        size: u64,
        host_id: &str,
    ) -> Result<ReservationGrant> {
        if size == 0 || size > MAX_RESERVATION {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("a reservation of {size} bytes (1 to {MAX_RESERVATION})"),
            ));
        }
        let held = self
            .reservations
            .values()
            .filter(|r| r.client == client)
            .count();
        if held >= MAX_PER_CLIENT {
            return Err(Error::new(
                ErrorKind::TooManyRequests,
                format!("a client may hold {MAX_PER_CLIENT} reservations"),
            ));
        }
        // Reserved space is space no object has: a small pool lends small reservations.
        let pool: u64 = self
            .segments
            .values()
            .filter(|s| s.alive())
            .map(|s| s.allocator.capacity())
            .sum();
        let lent: u64 = self.reservations.values().map(|r| r.size).sum();
        let size = size
            .min(pool / POOL_SHARE)
            .min((pool / MAX_LENT_SHARE).saturating_sub(lent));
        if size < MIN_RESERVATION {
            return Err(Error::new(
                ErrorKind::NoAvailableHandle,
                format!("the pool ({pool} bytes, {lent} lent) has no reservation to lend"),
            ));
        }
        let config = WriteConfig {
            host_id: host_id.to_owned(),
            ..WriteConfig::default()
        };
        // Never at the cost of cached objects: a put without a reservation takes two steps.
        let Some(replica) = self
            .allocate_free(now, "(reservation)", size, &config)
            .into_iter()
            .next()
        else {
            return Err(Error::new(
                ErrorKind::NoAvailableHandle,
                "no free space to reserve",
            ));
        };
        let (te_endpoint, base) = self
            .segments
            .get(&replica.segment)
            .map(|s| (s.spec.te_endpoint.clone(), s.spec.base))
            .ok_or_else(|| Error::new(ErrorKind::InternalError, "segment vanished"))?;
        let id = self.new_write().0;
        let grant = ReservationGrant {
            id,
            te_endpoint,
            // Cannot wrap: the block lies inside the segment, whose end was checked.
            address: base.saturating_add(replica.block.offset),
            size: replica.block.reserved,
            ttl: RESERVATION_TTL,
        };
        self.reservations.insert(
            id,
            Reservation {
                client,
                segment: replica.segment,
                start: replica.block.offset,
                size: replica.block.reserved,
                free: BTreeMap::from([(replica.block.offset, replica.block.reserved)]),
                expires_at: now + RESERVATION_TTL,
            },
        );
        Ok(grant)
    }

    /// Renews `client`'s reservations among `ids`; one answer per id. One on a segment out of
    /// service is not renewed: nothing written there can be read.
    pub fn renew_reservations(&mut self, now: Instant, client: ClientId, ids: &[u64]) -> Vec<bool> {
        ids.iter()
            .map(|id| {
                let Some(r) = self.reservations.get(id) else {
                    return false;
                };
                let alive = self.takes_objects(r.segment);
                match self.reservations.get_mut(id) {
                    Some(r) if r.client == client && r.expires_at > now && alive => {
                        r.expires_at = now + RESERVATION_TTL;
                        true
                    }
                    _ => false,
                }
            })
            .collect()
    }

    /// Ends a reservation: its free parts go back at once when `landed` (no transfer into
    /// them can still land), else after the landing grace.
    pub fn release_reservation(
        &mut self,
        now: Instant,
        client: ClientId,
        id: u64,
        landed: bool,
    ) -> Result<()> {
        match self.reservations.get(&id) {
            Some(r) if r.client == client => {}
            Some(_) => {
                return Err(Error::new(
                    ErrorKind::IllegalClient,
                    "the reservation belongs to another client",
                ))
            }
            None => return Ok(()),
        }
        let until = if landed {
            now
        } else {
            now + self.landing_grace()
        };
        self.end_reservation(id, until, now);
        Ok(())
    }

    /// Creates `key` from a part of a reservation, which its client wrote.
    /// Put semantics: an existing key (readable or being written) is left as it is.
    pub fn commit_reserved(
        &mut self,
        now: Instant,
        client: ClientId,
        key: &str,
        part: ReservedPart,
    ) -> Result<()> {
        let ReservedPart {
            reservation: id,
            offset,
            size,
            address,
        } = part;
        check_key(key)?;
        let stale = |why: &str| {
            Err(Error::new(
                ErrorKind::InvalidWrite,
                format!("'{key}': reservation {id} {why}"),
            ))
        };
        let Some(reservation) = self.reservations.get(&id) else {
            return stale("is not held (expired, released, or granted by an earlier master)");
        };
        if reservation.client != client {
            return Err(Error::new(
                ErrorKind::IllegalClient,
                format!("'{key}': reservation {id} belongs to another client"),
            ));
        }
        if reservation.expires_at <= now {
            return stale("expired");
        }
        let segment = reservation.segment;
        if !self.takes_objects(segment) {
            return stale("is on a segment that is out of service");
        }
        if size == 0 {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("'{key}': the value must not be empty"),
            ));
        }
        // The part, as a segment offset, must lie within one free part of the reservation.
        let within = offset
            .checked_add(size)
            .is_some_and(|end| end <= reservation.size);
        if !within {
            return stale("does not hold that part");
        }
        let at = reservation.start + offset;
        let end = at + size;
        let base = self.segments.get(&segment).map_or(0, |s| s.spec.base);
        if base.checked_add(at) != Some(address) {
            return stale("does not hold the address the bytes went to");
        }
        let holding = reservation
            .free
            .range(..=at)
            .next_back()
            .map(|(o, l)| (*o, *l))
            .filter(|(o, l)| o.checked_add(*l).is_some_and(|e| e >= end));
        let Some((part, len)) = holding else {
            return stale("does not hold that part");
        };
        if self.objects.contains_key(key) {
            return Err(Error::new(
                ErrorKind::ObjectAlreadyExists,
                format!("'{key}' already exists"),
            ));
        }
        let Some(reservation) = self.reservations.get_mut(&id) else {
            return stale("is not held");
        };
        reservation.free.remove(&part);
        if part < at {
            reservation.free.insert(part, at - part);
        }
        if end < part + len {
            reservation.free.insert(end, part + len - end);
        }
        let write = self.new_write();
        let replica = Replica {
            id: self.next_replica,
            segment,
            block: Block {
                offset: at,
                reserved: size,
            },
            status: ReplicaStatus::Complete,
        };
        self.next_replica = self.next_replica.saturating_add(1);
        self.objects.insert(
            key.to_owned(),
            Object {
                size,
                write,
                writer: client,
                put_start: now,
                replicas: vec![replica],
                lease_until: now,
                soft_pin_until: None,
                pending_soft_pin: SoftPin::Preserve,
                hard_pinned: false,
            },
        );
        self.touch_key(key);
        Ok(())
    }

    /// Whether new objects may go to `segment`: mounted, alive, not being unmounted.
    fn takes_objects(&self, segment: SegmentId) -> bool {
        self.segments
            .get(&segment)
            .is_some_and(|s| s.alive() && s.unmount_at.is_none())
    }

    /// Ends reservations past their time. Their client stopped renewing them, maybe frozen
    /// in the middle of a transfer: what they hold is parked as an abandoned write's space is.
    pub(super) fn expire_reservations(&mut self, now: Instant) {
        let due: Vec<u64> = self
            .reservations
            .iter()
            .filter(|(_, r)| r.expires_at <= now)
            .map(|(id, _)| *id)
            .collect();
        let until = now + self.config.put_start_release_timeout;
        for id in due {
            self.end_reservation(id, until, now);
        }
    }

    /// Every free part of every reservation: `(segment, offset, length)`.
    #[cfg(test)]
    pub(super) fn reserved_parts(&self) -> Vec<(SegmentId, u64, u64)> {
        self.reservations
            .values()
            .flat_map(|r| r.free.iter().map(|(o, l)| (r.segment, *o, *l)))
            .collect()
    }

    /// Forgets the reservations on segments that are gone (their space went with them).
    pub(super) fn drop_reservations_on(&mut self, ids: &[SegmentId]) {
        self.reservations.retain(|_, r| !ids.contains(&r.segment));
    }

    fn end_reservation(&mut self, id: u64, until: Instant, now: Instant) {
        let Some(reservation) = self.reservations.remove(&id) else {
            return;
        };
        for (offset, reserved) in reservation.free {
            let block = Block { offset, reserved };
            if until <= now {
                self.free(reservation.segment, block);
            } else {
                self.park(reservation.segment, block, until, None);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::master::config::MasterConfig;
    use crate::master::types::SegmentSpec;

    const MIB: u64 = 1 << 20;

    fn part(reservation: u64, offset: u64, size: u64, address: u64) -> ReservedPart {
        ReservedPart {
            reservation,
            offset,
            size,
            address,
        }
    }

    fn master() -> (Master, Instant, ClientId) {
        let now = Instant::now();
        let mut master = Master::new(MasterConfig::default()).unwrap();
        let client = ClientId(7);
        let spec = SegmentSpec {
            id: SegmentId(1),
            name: "node".into(),
            base: 0x1000_0000,
            size: 256 * MIB,
            te_endpoint: "127.0.0.1:15000".into(),
            protocol: "tcp".into(),
            host_id: String::new(),
        };
        master.mount_segment(now, client, spec).unwrap();
        (master, now, client)
    }

    #[test]
    fn commits_carve_objects_out_of_a_reservation_once() {
        let (mut m, now, client) = master();
        let grant = m.reserve(now, client, 4 * MIB, "").unwrap();
        assert_eq!(grant.size, 4 * MIB);
        m.commit_reserved(now, client, "a", part(grant.id, 0, 1000, grant.address))
            .unwrap();
        m.commit_reserved(
            now,
            client,
            "b",
            part(grant.id, 1000, MIB, grant.address + 1000),
        )
        .unwrap();
        m.check_invariants();
        let (list, _) = m.get_replica_list(now, "b").unwrap();
        assert_eq!(list[0].address, grant.address + 1000);
        assert_eq!(list[0].size, MIB);
        // The same part twice, a part overlapping one taken, one past the end: refused.
        let kind = |r: Result<()>| r.unwrap_err().kind();
        assert_eq!(
            kind(m.commit_reserved(now, client, "c", part(grant.id, 0, 10, grant.address))),
            ErrorKind::InvalidWrite
        );
        assert_eq!(
            kind(m.commit_reserved(
                now,
                client,
                "c",
                part(grant.id, 500, 1000, grant.address + 500)
            )),
            ErrorKind::InvalidWrite
        );
        assert_eq!(
            kind(m.commit_reserved(
                now,
                client,
                "c",
                part(grant.id, 4 * MIB - 10, 11, grant.address + 4 * MIB - 10)
            )),
            ErrorKind::InvalidWrite
        );
        // Another client's reservation, an existing key, an unknown reservation.
        assert_eq!(
            kind(m.commit_reserved(
                now,
                ClientId(8),
                "c",
                part(grant.id, 2 * MIB, 10, grant.address + 2 * MIB)
            )),
            ErrorKind::IllegalClient
        );
        assert_eq!(
            kind(m.commit_reserved(
                now,
                client,
                "a",
                part(grant.id, 2 * MIB, 10, grant.address + 2 * MIB)
            )),
            ErrorKind::ObjectAlreadyExists
        );
        assert_eq!(
            kind(m.commit_reserved(now, client, "c", part(999, 0, 10, 0))),
            ErrorKind::InvalidWrite
        );
        // The right part named with another address (a part of another reservation).
        assert_eq!(
            kind(m.commit_reserved(now, client, "c", part(grant.id, 2 * MIB, 10, grant.address))),
            ErrorKind::InvalidWrite
        );
        // The part an existing key was refused for is still held.
        m.commit_reserved(
            now,
            client,
            "c",
            part(grant.id, 2 * MIB, 10, grant.address + 2 * MIB),
        )
        .unwrap();
        m.check_invariants();
    }

    #[test]
    fn an_unrenewed_reservation_ends_and_its_space_comes_back_after_landing() {
        let (mut m, mut now, client) = master();
        let grant = m.reserve(now, client, 8 * MIB, "").unwrap();
        m.commit_reserved(now, client, "kept", part(grant.id, 0, MIB, grant.address))
            .unwrap();
        now += RESERVATION_TTL / 2;
        assert_eq!(
            m.renew_reservations(now, client, &[grant.id, 12345]),
            vec![true, false]
        );
        now += RESERVATION_TTL + Duration::from_millis(1);
        let grant_ended = now;
        m.tick(now);
        assert!(m
            .commit_reserved(
                now,
                client,
                "late",
                part(grant.id, MIB, 10, grant.address + MIB)
            )
            .is_err());
        // Parked while late bytes may land, then free; the committed object stays.
        let parked = m.stats(now).parked_bytes;
        assert_eq!(parked, 7 * MIB);
        m.check_invariants();
        // Parked as an abandoned write's space (its client may be frozen mid-transfer); the
        // segment's owner keeps pinging meanwhile.
        let release = m.config().put_start_release_timeout;
        while now < grant_ended + release {
            now += m.config().client_ttl / 2;
            m.ping(now, client);
        }
        m.tick(now);
        assert_eq!(m.stats(now).parked_bytes, 0);
        assert!(m.get_replica_list(now, "kept").is_ok());
        m.check_invariants();
    }

    #[test]
    fn a_release_with_everything_landed_frees_at_once() {
        let (mut m, now, client) = master();
        let used = m.stats(now).allocated_bytes;
        let grant = m.reserve(now, client, 8 * MIB, "").unwrap();
        assert_eq!(m.stats(now).allocated_bytes, used + 8 * MIB);
        m.release_reservation(now, client, grant.id, true).unwrap();
        assert_eq!(m.stats(now).allocated_bytes, used);
        assert!(m.reserve(now, client, MAX_RESERVATION + 1, "").is_err());
        for _ in 0..MAX_PER_CLIENT {
            m.reserve(now, client, MIB, "").unwrap();
        }
        assert_eq!(
            m.reserve(now, client, MIB, "").unwrap_err().kind(),
            ErrorKind::TooManyRequests
        );
        m.check_invariants();
    }
}
