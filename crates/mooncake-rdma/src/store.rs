//! The endpoint cache of one context, keyed by peer NIC path (Mooncake's `EndpointStore`).
//!
//! SIEVE (NSDI'24, the default): a hit only sets a visited bit; new entries go to the head;
//! the eviction hand walks from where it stopped (the tail at first) towards the head,
//! clearing visited bits, and evicts the first unvisited entry, wrapping around. FIFO evicts
//! the oldest entry. The list is a vector ordered tail (oldest) to head (newest); eviction and
//! removal are linear, which is fine for the cache sizes and rates of endpoint churn.

use std::collections::HashMap;

/// Eviction policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    /// Evict the oldest entry.
    Fifo,
    /// SIEVE: evict the first entry not used since the hand last passed it.
    Sieve,
}

/// A bounded map with SIEVE or FIFO eviction.
#[derive(Debug)]
pub struct EndpointStore<V> {
    kind: StoreKind,
    capacity: usize,
    map: HashMap<String, (V, bool)>,
    /// Tail (oldest) first.
    order: Vec<String>,
    /// Index into `order` where the SIEVE hand rests.
    hand: Option<usize>,
}

impl<V: Clone> EndpointStore<V> {
    /// An empty store holding at most `capacity` (at least 1) entries.
    pub fn new(kind: StoreKind, capacity: usize) -> Self {
        Self {
            kind,
            capacity: capacity.max(1),
            map: HashMap::new(),
            order: Vec::new(),
            hand: None,
        }
    }

    /// The entry for `key`, marking it used.
    pub fn get(&mut self, key: &str) -> Option<V> {
        let (value, visited) = self.map.get_mut(key)?;
        *visited = true;
        Some(value.clone())
    }

    /// The entry for `key`, without marking it.
    pub fn peek(&self, key: &str) -> Option<&V> {
        self.map.get(key).map(|(v, _)| v)
    }

    /// Inserts or replaces `key`. Returns what was displaced: the old value of `key`, or the
    /// entry evicted to make room.
    pub fn insert(&mut self, key: &str, value: V) -> Option<(String, V)> {
        if let Some((old, visited)) = self.map.get_mut(key) {
            *visited = false;
            return Some((key.to_owned(), std::mem::replace(old, value)));
        }
        let evicted = if self.map.len() >= self.capacity {
            self.evict()
        } else {
            None
        };
        self.map.insert(key.to_owned(), (value, false));
        self.order.push(key.to_owned());
        evicted
    }

    /// Removes `key`.
    pub fn remove(&mut self, key: &str) -> Option<V> {
        let (value, _) = self.map.remove(key)?;
        if let Some(pos) = self.order.iter().position(|k| k == key) {
            self.remove_at(pos);
        }
        Some(value)
    }

    /// Removes and returns every entry.
    pub fn drain(&mut self) -> Vec<(String, V)> {
        self.hand = None;
        self.order.clear();
        self.map.drain().map(|(k, (v, _))| (k, v)).collect()
    }

    /// Every entry, oldest first.
    pub fn entries(&self) -> Vec<(String, V)> {
        self.order
            .iter()
            .filter_map(|k| self.map.get(k).map(|(v, _)| (k.clone(), v.clone())))
            .collect()
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the store is empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    fn evict(&mut self) -> Option<(String, V)> {
        if self.order.is_empty() {
            return None;
        }
        let pos = match self.kind {
            StoreKind::Fifo => 0,
            StoreKind::Sieve => {
                let mut pos = self.hand.unwrap_or(0).min(self.order.len() - 1);
                // Bounded: one full pass clears every bit.
                for _ in 0..=self.order.len() {
                    let entry = self.map.get_mut(&self.order[pos]);
                    match entry {
                        Some((_, visited)) if *visited => {
                            *visited = false;
                            pos = (pos + 1) % self.order.len();
                        }
                        _ => break,
                    }
                }
                pos
            }
        };
        let key = self.remove_at(pos);
        if self.kind == StoreKind::Sieve {
            // The hand stays where the victim was: now the next newer entry.
            self.hand = (!self.order.is_empty()).then(|| pos % self.order.len());
        }
        let (value, _) = self.map.remove(&key)?;
        Some((key, value))
    }

    fn remove_at(&mut self, pos: usize) -> String {
        let key = self.order.remove(pos);
        if let Some(hand) = self.hand {
            if pos < hand {
                self.hand = Some(hand - 1);
            }
            if self.order.is_empty() {
                self.hand = None;
            } else if let Some(h) = self.hand {
                self.hand = Some(h.min(self.order.len() - 1));
            }
        }
        key
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifo_evicts_oldest_regardless_of_use() {
        let mut store = EndpointStore::new(StoreKind::Fifo, 2);
        store.insert("a", 1);
        store.insert("b", 2);
        store.get("a");
        assert_eq!(store.insert("c", 3), Some(("a".into(), 1)));
        assert_eq!(store.len(), 2);
    }

    #[test]
    fn replacing_a_key_returns_the_old_value() {
        let mut store = EndpointStore::new(StoreKind::Sieve, 2);
        store.insert("a", 1);
        assert_eq!(store.insert("a", 2), Some(("a".into(), 1)));
        assert_eq!(store.get("a"), Some(2));
        assert_eq!(store.remove("a"), Some(2));
        assert!(store.is_empty());
    }
}
