//! Rails: the (local device, remote device) pairs a transfer to one peer can take, which
//! one each slice takes, and which ones are paused.
//!
//! Selection sprays slices over the preferred tier, each to the usable rail with the fewest
//! bytes in flight, so a slow rail, whose bytes drain slowly, gets less. The available tier
//! is used only while no preferred rail is usable. Health follows a rail monitor: errors
//! inside a window pause a rail, each pause in a row twice as long as the last up to a cap;
//! a pause ends when it expires or when a slice still in flight on the rail succeeds.
//! Device events (a port or link going down) hold a rail paused until it comes back.
//!
//! Selection takes no lock: in-flight bytes and pause deadlines are atomics, and only
//! failures and the first success after one touch the mutex.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// When rails pause and for how long, and how often a slice may be retried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RailPolicy {
    /// Errors within `error_window` that pause a rail.
    pub error_threshold: u32,
    /// Window in which errors add up.
    pub error_window: Duration,
    /// First pause.
    pub cooldown: Duration,
    /// Longest pause (each pause in a row doubles the previous one).
    pub max_cooldown: Duration,
    /// Attempts a slice may make beyond its first (Mooncake's `MC_RETRY_CNT`).
    pub retry_budget: u32,
}

impl Default for RailPolicy {
    fn default() -> Self {
        Self {
            error_threshold: 3,
            error_window: Duration::from_secs(10),
            cooldown: Duration::from_secs(30),
            max_cooldown: Duration::from_secs(300),
            retry_budget: 9,
        }
    }
}

/// How a failure counts against its rail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Counts toward the threshold (a timeout, a reset connection).
    Transient,
    /// Pauses the rail at once (the path is known to be broken).
    Fatal,
}

/// What a rail has done, for stats and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RailStats {
    /// Local device or interface.
    pub local: String,
    /// Remote device or address.
    pub remote: String,
    /// Whether the rail is in the preferred tier.
    pub preferred: bool,
    /// Whether selection may pick it now.
    pub usable: bool,
    /// Whether a slice failed on it (or it was held down) since it last carried one: a rail
    /// with nowhere else to steer to keeps failing without ever being paused.
    pub failing: bool,
    /// Bytes handed to the rail and not yet settled.
    pub inflight_bytes: u64,
    /// Bytes carried successfully.
    pub bytes: u64,
    /// Slices carried successfully.
    pub slices: u64,
    /// Slices that failed on it.
    pub failures: u64,
    /// Pauses so far.
    pub pauses: u64,
    /// Slices it carried after they had failed on another rail.
    pub rescued: u64,
}

/// Held paused by a device event until [`RailSet::resume`].
const HELD: u64 = u64::MAX;

struct Rail {
    local: String,
    remote: String,
    inflight: AtomicU64,
    /// Nanoseconds since the set's epoch until which the rail is paused; 0 when it is not.
    paused_until: AtomicU64,
    /// Set while the rail has errors or pauses on record, so successes skip the lock.
    troubled: AtomicBool,
    health: Mutex<Health>,
    bytes: AtomicU64,
    slices: AtomicU64,
    failures: AtomicU64,
    pauses: AtomicU64,
    rescued: AtomicU64,
}

#[derive(Default)]
struct Health {
    errors: u32,
    window_start: u64,
    /// Pauses in a row without a success in between.
    streak: u32,
}

/// The rails to one peer, in two tiers.
pub struct RailSet {
    rails: Box<[Rail]>,
    preferred: usize,
    policy: RailPolicy,
    epoch: Instant,
    cursor: AtomicUsize,
}

impl std::fmt::Debug for RailSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RailSet")
            .field("rails", &self.stats())
            .finish_non_exhaustive()
    }
}

impl RailSet {
    /// Rails given as `(local, remote)` names; `preferred` ones are used first.
    pub fn new(
        policy: RailPolicy,
        preferred: Vec<(String, String)>,
        available: Vec<(String, String)>,
    ) -> Self {
        let split = preferred.len();
        let rails = preferred
            .into_iter()
            .chain(available)
            .map(|(local, remote)| Rail {
                local,
                remote,
                inflight: AtomicU64::new(0),
                paused_until: AtomicU64::new(0),
                troubled: AtomicBool::new(false),
                health: Mutex::new(Health::default()),
                bytes: AtomicU64::new(0),
                slices: AtomicU64::new(0),
                failures: AtomicU64::new(0),
                pauses: AtomicU64::new(0),
                rescued: AtomicU64::new(0),
            })
            .collect();
        Self {
            rails,
            preferred: split,
            policy,
            epoch: Instant::now(),
            cursor: AtomicUsize::new(0),
        }
    }

    /// Number of rails, both tiers.
    pub fn len(&self) -> usize {
        self.rails.len()
    }

    /// Whether there are no rails at all.
    pub fn is_empty(&self) -> bool {
        self.rails.is_empty()
    }

    /// `(local, remote)` names of a rail.
    pub fn rail(&self, index: usize) -> (&str, &str) {
        let rail = &self.rails[index];
        (&rail.local, &rail.remote)
    }

    /// The policy the set runs with.
    pub fn policy(&self) -> &RailPolicy {
        &self.policy
    }

    /// Picks the rail for a slice of `bytes` and counts the bytes in flight on it: the usable
    /// preferred rail with the fewest bytes in flight, else the best usable available one.
    /// `avoid` (the rail a retried slice just failed on) is taken only when nothing else is
    /// usable. `None` when no rail is usable.
    pub fn pick(&self, bytes: u64, avoid: Option<usize>) -> Option<usize> {
        self.pick_at(self.now(), bytes, avoid)
    }

    fn pick_at(&self, now: u64, bytes: u64, avoid: Option<usize>) -> Option<usize> {
        let rotation = self.cursor.fetch_add(1, Ordering::Relaxed);
        let tiers = [0..self.preferred, self.preferred..self.rails.len()];
        let chosen = tiers
            .into_iter()
            .find_map(|tier| self.least_loaded(tier, rotation, now, avoid))
            .or_else(|| avoid.filter(|&i| i < self.rails.len() && self.usable_at(i, now)))?;
        self.rails[chosen]
            .inflight
            .fetch_add(bytes, Ordering::Relaxed);
        Some(chosen)
    }

    fn least_loaded(
        &self,
        tier: std::ops::Range<usize>,
        rotation: usize,
        now: u64,
        avoid: Option<usize>,
    ) -> Option<usize> {
        let width = tier.len();
        if width == 0 {
            return None;
        }
        // Starting the scan at a rotating offset spreads ties over the tier.
        (0..width)
            .map(|k| tier.start + (rotation + k) % width)
            .filter(|&i| Some(i) != avoid && self.usable_at(i, now))
            .min_by_key(|&i| self.rails[i].inflight.load(Ordering::Relaxed))
    }

    /// Whether selection may pick the rail now.
    pub fn is_usable(&self, rail: usize) -> bool {
        self.usable_at(rail, self.now())
    }

    fn usable_at(&self, rail: usize, now: u64) -> bool {
        self.rails[rail].paused_until.load(Ordering::Acquire) <= now
    }

    /// A slice of `bytes` arrived over the rail; an unheld pause ends.
    pub fn done(&self, rail: usize, bytes: u64) {
        let Some(r) = self.rails.get(rail) else {
            return;
        };
        r.inflight.fetch_sub(bytes, Ordering::Relaxed);
        r.bytes.fetch_add(bytes, Ordering::Relaxed);
        r.slices.fetch_add(1, Ordering::Relaxed);
        if r.troubled.load(Ordering::Acquire) {
            let mut health = r.health.lock().unwrap_or_else(|p| p.into_inner());
            *health = Health::default();
            r.troubled.store(false, Ordering::Release);
            let _ = r
                .paused_until
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |until| {
                    (until != HELD).then_some(0)
                });
        }
    }

    /// A slice of `bytes` left the rail with an outcome that says nothing about the rail
    /// (the peer refused it, or it moved before starting).
    pub fn release(&self, rail: usize, bytes: u64) {
        if let Some(r) = self.rails.get(rail) {
            r.inflight.fetch_sub(bytes, Ordering::Relaxed);
        }
    }

    /// A slice that had failed on another rail arrived over this one.
    pub fn rescued(&self, rail: usize) {
        if let Some(r) = self.rails.get(rail) {
            r.rescued.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A slice of `bytes` failed on the rail. A rail is paused only while another one is
    /// usable: with nowhere to steer to, pausing would only fail slices that might get through.
    pub fn failed(&self, rail: usize, bytes: u64, how: Failure) {
        self.failed_at(self.now(), rail, bytes, how);
    }

    fn failed_at(&self, now: u64, rail: usize, bytes: u64, how: Failure) {
        let Some(r) = self.rails.get(rail) else {
            return;
        };
        r.inflight.fetch_sub(bytes, Ordering::Relaxed);
        r.failures.fetch_add(1, Ordering::Relaxed);
        let mut health = r.health.lock().unwrap_or_else(|p| p.into_inner());
        r.troubled.store(true, Ordering::Release);
        if r.paused_until.load(Ordering::Acquire) > now {
            // Already paused: slices that were in flight when it broke add nothing.
            return;
        }
        let window = self.policy.error_window.as_nanos() as u64;
        if health.errors == 0 || now.saturating_sub(health.window_start) > window {
            health.errors = 0;
            health.window_start = now;
        }
        health.errors += 1;
        let elsewhere = (0..self.rails.len()).any(|i| i != rail && self.usable_at(i, now));
        if elsewhere && (how == Failure::Fatal || health.errors >= self.policy.error_threshold) {
            let cooldown = self
                .policy
                .cooldown
                .saturating_mul(1 << health.streak.min(16))
                .min(self.policy.max_cooldown);
            health.errors = 0;
            health.streak += 1;
            r.paused_until.store(
                now.saturating_add(cooldown.as_nanos() as u64).min(HELD - 1),
                Ordering::Release,
            );
            r.pauses.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(local = %r.local, remote = %r.remote, ?cooldown, "rail paused");
        }
    }

    /// Holds the rail paused (its device or link went down) until [`resume`](Self::resume).
    pub fn pause(&self, rail: usize) {
        let Some(r) = self.rails.get(rail) else {
            return;
        };
        let _health = r.health.lock().unwrap_or_else(|p| p.into_inner());
        r.troubled.store(true, Ordering::Release);
        if r.paused_until.swap(HELD, Ordering::AcqRel) != HELD {
            r.pauses.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(local = %r.local, remote = %r.remote, "rail down");
        }
    }

    /// Lets a rail held by [`pause`](Self::pause) carry slices again, with a clean record.
    pub fn resume(&self, rail: usize) {
        let Some(r) = self.rails.get(rail) else {
            return;
        };
        let mut health = r.health.lock().unwrap_or_else(|p| p.into_inner());
        *health = Health::default();
        r.troubled.store(false, Ordering::Release);
        if r.paused_until.swap(0, Ordering::AcqRel) == HELD {
            tracing::info!(local = %r.local, remote = %r.remote, "rail up");
        }
    }

    /// A snapshot of every rail.
    pub fn stats(&self) -> Vec<RailStats> {
        let now = self.now();
        self.rails
            .iter()
            .enumerate()
            .map(|(i, r)| RailStats {
                local: r.local.clone(),
                remote: r.remote.clone(),
                preferred: i < self.preferred,
                usable: self.usable_at(i, now),
                failing: r.troubled.load(Ordering::Acquire),
                inflight_bytes: r.inflight.load(Ordering::Relaxed),
                bytes: r.bytes.load(Ordering::Relaxed),
                slices: r.slices.load(Ordering::Relaxed),
                failures: r.failures.load(Ordering::Relaxed),
                pauses: r.pauses.load(Ordering::Relaxed),
                rescued: r.rescued.load(Ordering::Relaxed),
            })
            .collect()
    }

    fn now(&self) -> u64 {
        // Never 0, so a pause that ends "now" still compares as over.
        self.epoch.elapsed().as_nanos() as u64 + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    fn pairs(names: &[&str]) -> Vec<(String, String)> {
        names
            .iter()
            .map(|n| (format!("l{n}"), format!("r{n}")))
            .collect()
    }

    fn set(preferred: &[&str], available: &[&str]) -> RailSet {
        RailSet::new(RailPolicy::default(), pairs(preferred), pairs(available))
    }

    #[test]
    fn sprays_by_bytes_in_flight() {
        let rails = set(&["0", "1"], &["2"]);
        let mut counts = [0; 3];
        for _ in 0..100 {
            counts[rails.pick(1 << 20, None).unwrap()] += 1;
        }
        assert_eq!(counts, [50, 50, 0]);
        // Rail 0 drains, rail 1 does not: new slices go to rail 0.
        for _ in 0..50 {
            rails.done(0, 1 << 20);
        }
        for _ in 0..10 {
            assert_eq!(rails.pick(1 << 20, None), Some(0));
        }
    }

    #[test]
    fn available_tier_only_when_no_preferred_rail_is_usable() {
        let rails = set(&["0"], &["1", "2"]);
        rails.pause(0);
        let picked: Vec<_> = (0..4).map(|_| rails.pick(10, None).unwrap()).collect();
        assert!(picked.iter().all(|&i| i == 1 || i == 2));
        assert!(picked.contains(&1) && picked.contains(&2));
        rails.resume(0);
        assert_eq!(rails.pick(10, None), Some(0));
    }

    #[test]
    fn avoid_is_a_last_resort() {
        let rails = set(&["0", "1"], &[]);
        assert_eq!(rails.pick(10, Some(0)), Some(1));
        rails.pause(1);
        assert_eq!(rails.pick(10, Some(0)), Some(0));
        rails.pause(0);
        assert_eq!(rails.pick(10, Some(0)), None);
    }

    #[test]
    fn errors_in_a_window_pause_with_doubling_cooldown() {
        let rails = set(&["0", "1"], &[]);
        let t = 10 * SEC;
        rails.failed_at(t, 0, 0, Failure::Transient);
        rails.failed_at(t + SEC, 0, 0, Failure::Transient);
        assert!(rails.usable_at(0, t + SEC));
        rails.failed_at(t + 2 * SEC, 0, 0, Failure::Transient);
        assert!(!rails.usable_at(0, t + 2 * SEC));
        assert!(!rails.usable_at(0, t + 31 * SEC));
        assert!(rails.usable_at(0, t + 33 * SEC));
        // Broken again right after: twice as long.
        rails.failed_at(t + 33 * SEC, 0, 0, Failure::Fatal);
        assert!(!rails.usable_at(0, t + 33 * SEC + 59 * SEC));
        assert!(rails.usable_at(0, t + 33 * SEC + 61 * SEC));
        // The cap holds however long the streak.
        for k in 0..10 {
            let now = t + (100 + 400 * k) * SEC;
            rails.failed_at(now, 0, 0, Failure::Fatal);
            assert!(rails.usable_at(0, now + 301 * SEC));
        }
        assert_eq!(rails.stats()[0].pauses, 12);
    }

    #[test]
    fn the_only_usable_rail_is_never_paused_for_errors() {
        let rails = set(&["0"], &[]);
        for _ in 0..10 {
            rails.failed(0, 0, Failure::Fatal);
        }
        assert!(rails.is_usable(0));
        let two = set(&["0", "1"], &[]);
        two.pause(1);
        two.failed(0, 0, Failure::Fatal);
        assert!(two.is_usable(0));
        two.resume(1);
        two.failed(0, 0, Failure::Fatal);
        assert!(!two.is_usable(0));
    }

    #[test]
    fn errors_far_apart_do_not_add_up() {
        let rails = set(&["0"], &[]);
        for k in 0..10 {
            rails.failed_at((1 + 11 * k) * SEC, 0, 0, Failure::Transient);
            assert!(rails.usable_at(0, (1 + 11 * k) * SEC));
        }
    }

    #[test]
    fn success_ends_a_pause_and_the_streak_but_not_a_hold() {
        let rails = set(&["0", "1"], &[]);
        let now = rails.now();
        rails.failed_at(now, 0, 0, Failure::Fatal);
        assert!(!rails.is_usable(0));
        rails.done(0, 0);
        assert!(rails.is_usable(0));
        rails.pause(1);
        rails.done(1, 0);
        assert!(!rails.is_usable(1));
        rails.resume(1);
        assert!(rails.is_usable(1));
    }

    #[test]
    fn a_rail_is_failing_from_a_failure_until_it_carries_a_slice() {
        let rails = set(&["0"], &[]);
        assert!(!rails.stats()[0].failing);
        rails.failed(0, 0, Failure::Fatal);
        let stats = &rails.stats()[0];
        assert!(stats.usable && stats.failing, "{stats:?}");
        rails.done(0, 0);
        assert!(!rails.stats()[0].failing);
        rails.pause(0);
        rails.resume(0);
        assert!(!rails.stats()[0].failing);
    }

    #[test]
    fn in_flight_bytes_are_settled_either_way() {
        let rails = set(&["0"], &[]);
        let rail = rails.pick(100, None).unwrap();
        assert_eq!(rails.stats()[0].inflight_bytes, 100);
        rails.failed(rail, 100, Failure::Transient);
        let rail = rails.pick(50, None).unwrap();
        rails.done(rail, 50);
        let stats = &rails.stats()[0];
        assert_eq!(
            (
                stats.inflight_bytes,
                stats.bytes,
                stats.slices,
                stats.failures
            ),
            (0, 50, 1, 1)
        );
    }

    #[test]
    fn empty_set_picks_nothing() {
        let rails = set(&[], &[]);
        assert!(rails.is_empty());
        assert_eq!(rails.pick(1, None), None);
        assert_eq!(rails.pick(1, Some(3)), None);
        rails.done(3, 1);
        rails.failed(3, 1, Failure::Fatal);
    }
}
