//! Generational slab handles.
//!
//! Batch and segment ids are slab indices with a generation, so a stale id (a freed batch, a
//! closed segment) is detected instead of aliasing whatever took its slot. A handle packs into
//! a `u64` for the C-style API: the index in the low 32 bits, the generation in the high 32.
//! `u64::MAX` is never produced, so it stays free as Mooncake's `INVALID_BATCH_ID`.

/// A slab index plus the generation it was issued under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Handle {
    index: u32,
    generation: u32,
}

impl Handle {
    /// Packs into a `u64`.
    pub fn to_u64(self) -> u64 {
        (u64::from(self.generation) << 32) | u64::from(self.index)
    }

    /// Unpacks a `u64` made by [`Handle::to_u64`].
    pub fn from_u64(raw: u64) -> Self {
        Self {
            index: raw as u32,
            generation: (raw >> 32) as u32,
        }
    }
}

struct Slot<T> {
    generation: u32,
    value: Option<T>,
}

/// A slab whose handles carry generations.
pub struct HandleSlab<T> {
    slots: Vec<Slot<T>>,
    free: Vec<u32>,
}

impl<T> Default for HandleSlab<T> {
    fn default() -> Self {
        Self {
            slots: Vec::new(),
            free: Vec::new(),
        }
    }
}

impl<T> HandleSlab<T> {
    /// Stores `value` and returns its handle.
    pub fn insert(&mut self, value: T) -> Handle {
        self.insert_with(|_| value)
    }

    /// Stores the value `make` builds from its own handle.
    pub fn insert_with(&mut self, make: impl FnOnce(Handle) -> T) -> Handle {
        if let Some(index) = self.free.pop() {
            let slot = &mut self.slots[index as usize];
            let handle = Handle {
                index,
                generation: slot.generation,
            };
            slot.value = Some(make(handle));
            return handle;
        }
        let index = u32::try_from(self.slots.len()).expect("more than 2^32 live handles");
        let handle = Handle {
            index,
            generation: 0,
        };
        self.slots.push(Slot {
            generation: 0,
            value: Some(make(handle)),
        });
        handle
    }

    /// The value behind `handle`, if it is still live.
    pub fn get(&self, handle: Handle) -> Option<&T> {
        let slot = self.slots.get(handle.index as usize)?;
        (slot.generation == handle.generation)
            .then_some(slot.value.as_ref())
            .flatten()
    }

    /// Removes and returns the value; the slot's next handle gets a new generation.
    pub fn remove(&mut self, handle: Handle) -> Option<T> {
        let slot = self.slots.get_mut(handle.index as usize)?;
        if slot.generation != handle.generation {
            return None;
        }
        let value = slot.value.take()?;
        // Generation u32::MAX with index u32::MAX would pack to u64::MAX (the invalid id).
        slot.generation = slot.generation.wrapping_add(1) % u32::MAX;
        self.free.push(handle.index);
        Some(value)
    }

    /// Live values.
    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.slots.iter().filter_map(|slot| slot.value.as_ref())
    }

    /// Removes every value.
    pub fn drain(&mut self) -> Vec<T> {
        let mut out = Vec::new();
        for (index, slot) in self.slots.iter_mut().enumerate() {
            if let Some(value) = slot.value.take() {
                slot.generation = slot.generation.wrapping_add(1) % u32::MAX;
                self.free.push(index as u32);
                out.push(value);
            }
        }
        out
    }

    /// Number of live values.
    pub fn len(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Whether no value is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_handles_miss() {
        let mut slab = HandleSlab::default();
        let a = slab.insert("a");
        assert_eq!(slab.remove(a), Some("a"));
        let b = slab.insert("b");
        assert_ne!(a, b, "reused slot must carry a new generation");
        assert_eq!(slab.get(a), None);
        assert_eq!(slab.get(b), Some(&"b"));
        assert_eq!(Handle::from_u64(b.to_u64()), b);
        assert_eq!(slab.len(), 1);
    }
}
