//! Where segment descriptors and catalogues live: [`MetadataStore`], a key/value store of JSON
//! strings (HTTP, Redis and etcd), and an in-process one.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use mooncake_common::Result;

/// A boxed, sendable future.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A value and the revision it was read at, for a later [`MetadataStore::swap`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revisioned {
    /// The value.
    pub value: String,
    /// Changes whenever the value is written: etcd's mod revision, the HTTP server's counter.
    /// Stores that compare values rather than revisions (Redis) leave it 0.
    pub revision: u64,
}

/// A key/value store of JSON strings.
pub trait MetadataStore: Send + Sync {
    /// The value at `key`, or `None` when absent.
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<String>>>;
    /// Stores `value` at `key`, replacing any previous value.
    fn put<'a>(&'a self, key: &'a str, value: &'a str) -> BoxFuture<'a, Result<()>>;
    /// Removes `key`; removing an absent key succeeds.
    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<()>>;

    /// The value at `key` with its revision, or `None` when absent.
    fn get_revisioned<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Revisioned>>>;
    /// Replaces the value at `key` with `new` (or removes it, for `None`) only if it is still
    /// `expected` as read (for `None`: only if `key` is absent). Whether it did.
    fn swap<'a>(
        &'a self,
        key: &'a str,
        expected: Option<&'a Revisioned>,
        new: Option<&'a str>,
    ) -> BoxFuture<'a, Result<bool>>;
    /// Every key that starts with `prefix`, with its value, in key order.
    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<(String, String)>>>;
    /// Stores `value` at `key` for `ttl`: it disappears unless stored again before then.
    fn put_expiring<'a>(
        &'a self,
        key: &'a str,
        value: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<()>>;
}

#[derive(Debug)]
struct Entry {
    value: String,
    revision: u64,
    expires: Option<Instant>,
}

impl Entry {
    fn live(&self, now: Instant) -> bool {
        self.expires.is_none_or(|at| at > now)
    }
}

#[derive(Debug, Default)]
struct Entries {
    map: HashMap<String, Entry>,
    revision: u64,
}

impl Entries {
    fn live(&self, key: &str) -> Option<&Entry> {
        let now = Instant::now();
        self.map.get(key).filter(|e| e.live(now))
    }

    fn write(&mut self, key: &str, value: String, expires: Option<Instant>) -> Option<String> {
        self.revision += 1;
        let entry = Entry {
            value,
            revision: self.revision,
            expires,
        };
        self.map.insert(key.to_owned(), entry).map(|old| old.value)
    }

    fn remove(&mut self, key: &str) -> Option<String> {
        self.map.remove(key).map(|old| old.value)
    }

    /// Drops expired entries; the values they held.
    fn expire(&mut self) -> Vec<(String, String)> {
        let now = Instant::now();
        let dead: Vec<String> = self
            .map
            .iter()
            .filter(|(_, e)| !e.live(now))
            .map(|(k, _)| k.clone())
            .collect();
        dead.into_iter()
            .filter_map(|k| self.map.remove(&k).map(|e| (k, e.value)))
            .collect()
    }
}

/// An in-process store: the embedded HTTP server's state, and a stand-in for tests.
#[derive(Debug, Default)]
pub struct MemoryStore {
    entries: Mutex<Entries>,
}

impl MemoryStore {
    /// The value at `key`.
    pub fn get_now(&self, key: &str) -> Option<String> {
        self.lock().live(key).map(|e| e.value.clone())
    }

    /// The value at `key` with its revision.
    pub fn get_revisioned_now(&self, key: &str) -> Option<Revisioned> {
        self.lock().live(key).map(|e| Revisioned {
            value: e.value.clone(),
            revision: e.revision,
        })
    }

    /// Stores `value` at `key`; the value it displaced, an expired one not yet dropped
    /// included (so that a caller counting bytes held can subtract it).
    pub fn put_now(&self, key: &str, value: String) -> Option<String> {
        self.lock().write(key, value, None)
    }

    /// Stores `value` at `key` until `ttl` passes (a `ttl` past the clock's range: for good);
    /// the value it displaced, as for [`put_now`](Self::put_now).
    pub fn put_expiring_now(&self, key: &str, value: String, ttl: Duration) -> Option<String> {
        self.lock()
            .write(key, value, Instant::now().checked_add(ttl))
    }

    /// Removes `key`; the value it held, an expired one not yet dropped included.
    pub fn delete_now(&self, key: &str) -> Option<String> {
        self.lock().remove(key)
    }

    /// The compare-and-swap of [`MetadataStore::swap`], comparing revisions; on success, the
    /// value it displaced as for [`put_now`](Self::put_now) (`Some(None)` when there was none).
    pub fn swap_now(
        &self,
        key: &str,
        expected: Option<u64>,
        new: Option<String>,
    ) -> Option<Option<String>> {
        let mut entries = self.lock();
        let current = entries.live(key).map(|e| e.revision);
        if current != expected {
            return None;
        }
        Some(match new {
            Some(value) => entries.write(key, value, None),
            None => entries.remove(key),
        })
    }

    /// Every live key that starts with `prefix`, with its value, in key order.
    pub fn list_now(&self, prefix: &str) -> Vec<(String, String)> {
        let entries = self.lock();
        let now = Instant::now();
        let found: BTreeMap<&String, &Entry> = entries
            .map
            .iter()
            .filter(|(k, e)| k.starts_with(prefix) && e.live(now))
            .collect();
        found
            .into_iter()
            .map(|(k, e)| (k.clone(), e.value.clone()))
            .collect()
    }

    /// Drops the entries whose time ran out; the keys and values they held.
    pub fn expire_now(&self) -> Vec<(String, String)> {
        self.lock().expire()
    }

    /// Number of keys, expired ones not yet dropped included.
    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    /// Whether the store is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        // A panic while holding this lock cannot leave the map half-updated.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl MetadataStore for MemoryStore {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<String>>> {
        Box::pin(async move { Ok(self.get_now(key)) })
    }

    fn put<'a>(&'a self, key: &'a str, value: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.put_now(key, value.to_owned());
            Ok(())
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.delete_now(key);
            Ok(())
        })
    }

    fn get_revisioned<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Revisioned>>> {
        Box::pin(async move { Ok(self.get_revisioned_now(key)) })
    }

    fn swap<'a>(
        &'a self,
        key: &'a str,
        expected: Option<&'a Revisioned>,
        new: Option<&'a str>,
    ) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let expected = expected.map(|e| e.revision);
            Ok(self
                .swap_now(key, expected, new.map(str::to_owned))
                .is_some())
        })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<(String, String)>>> {
        Box::pin(async move { Ok(self.list_now(prefix)) })
    }

    fn put_expiring<'a>(
        &'a self,
        key: &'a str,
        value: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.put_expiring_now(key, value.to_owned(), ttl);
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swaps_compare_revisions_and_entries_expire() {
        let store = MemoryStore::default();
        assert_eq!(store.swap_now("k", None, Some("a".into())), Some(None));
        assert_eq!(store.swap_now("k", None, Some("b".into())), None);
        let read = store.get_revisioned_now("k").unwrap();
        assert_eq!(read.value, "a");
        store.put_now("k", "a".into());
        assert_eq!(
            store.swap_now("k", Some(read.revision), Some("c".into())),
            None,
            "a write in between, even of the same value, changes the revision"
        );
        let read = store.get_revisioned_now("k").unwrap();
        assert_eq!(
            store.swap_now("k", Some(read.revision), None),
            Some(Some("a".into()))
        );
        assert_eq!(store.get_now("k"), None);

        store.put_now("p/1", "x".into());
        store.put_now("p/0", "y".into());
        store.put_now("q", "z".into());
        store.put_expiring_now("p/2", "gone".into(), Duration::ZERO);
        assert_eq!(
            store.list_now("p/"),
            [("p/0".into(), "y".into()), ("p/1".into(), "x".into())]
        );
        assert_eq!(store.get_now("p/2"), None);
        assert_eq!(store.expire_now(), [("p/2".into(), "gone".into())]);
        assert_eq!(store.len(), 3);

        // An expired entry not yet dropped is absent, yet a write still reports displacing it.
        store.put_expiring_now("p/3", "dead".into(), Duration::ZERO);
        assert_eq!(store.get_now("p/3"), None);
        assert_eq!(store.put_now("p/3", "x".into()), Some("dead".into()));
        store.put_expiring_now("p/4", "long".into(), Duration::MAX);
        assert_eq!(store.get_now("p/4").as_deref(), Some("long"));
    }
}
