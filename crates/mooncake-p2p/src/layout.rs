//! How a payload's buffers are cut into shards, and the local memory they live in.

use std::sync::Arc;

use mooncake_common::{Error, Result};
use mooncake_transport::Arena;

/// Most shards one payload may have: bounds what a catalogue entry can make a node allocate.
pub const MAX_SHARDS: usize = 1 << 20;

/// The shard lengths of buffers of `size_list` bytes cut by `max_shard_size`: each buffer on
/// its own, the last shard of each shorter when the buffer is not a multiple.
pub fn shard_sizes(size_list: &[u64], max_shard_size: u64) -> Result<Vec<u64>> {
    if max_shard_size == 0 {
        return Err(Error::invalid("maxShardSize must be at least 1 byte"));
    }
    if size_list.is_empty() {
        return Err(Error::invalid("a payload needs at least one buffer"));
    }
    let mut shards = Vec::new();
    for (i, &size) in size_list.iter().enumerate() {
        if size == 0 {
            return Err(Error::invalid(format!("buffer {i} is empty")));
        }
        let count = size.div_ceil(max_shard_size);
        if count > (MAX_SHARDS - shards.len()) as u64 {
            return Err(Error::invalid(format!(
                "more than {MAX_SHARDS} shards: raise maxShardSize"
            )));
        }
        let full = size / max_shard_size;
        shards.extend(std::iter::repeat_n(max_shard_size, full as usize));
        if size % max_shard_size != 0 {
            shards.push(size % max_shard_size);
        }
    }
    Ok(shards)
}

/// Where each shard lies: `(buffer index, offset in that buffer, length)`.
pub(crate) fn shard_places(
    size_list: &[u64],
    max_shard_size: u64,
) -> Result<Vec<(usize, u64, u64)>> {
    shard_sizes(size_list, max_shard_size)?;
    let mut places = Vec::new();
    for (buffer, &size) in size_list.iter().enumerate() {
        let mut offset = 0;
        while offset < size {
            let len = max_shard_size.min(size - offset);
            places.push((buffer, offset, len));
            offset += len;
        }
    }
    Ok(places)
}

/// The digest recorded per shard.
pub fn checksum(bytes: &[u8]) -> String {
    format!("xxh3:{:016x}", xxhash_rust::xxh3::xxh3_64(bytes))
}

/// Memory a payload is registered from or pulled into.
pub struct LocalBuffer {
    addr: usize,
    len: usize,
    owner: Box<dyn std::any::Any + Send + Sync>,
}

impl LocalBuffer {
    /// Engine-style shared memory, kept mapped while the buffer is in use.
    pub fn arena(arena: Arc<Arena>) -> Self {
        Self {
            addr: arena.as_ptr() as usize,
            len: arena.len(),
            owner: Box::new(arena),
        }
    }

    /// Caller memory, kept alive by `owner`.
    ///
    /// # Safety
    /// `[addr, addr+len)` must stay valid for reads and writes while `owner` lives, and nothing
    /// may write it while a payload is registered from it.
    pub unsafe fn external(
        addr: usize,
        len: usize,
        owner: Box<dyn std::any::Any + Send + Sync>,
    ) -> Self {
        Self { addr, len, owner }
    }

    /// Its first byte.
    pub fn addr(&self) -> usize {
        self.addr
    }

    /// Its length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(crate) fn into_owner(self) -> Box<dyn std::any::Any + Send + Sync> {
        self.owner
    }
}

impl std::fmt::Debug for LocalBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LocalBuffer({:#x}+{})", self.addr, self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn buffers_are_cut_one_by_one() {
        assert_eq!(shard_sizes(&[10, 4, 3], 4).unwrap(), [4, 4, 2, 4, 3]);
        assert_eq!(
            shard_places(&[10, 3], 4).unwrap(),
            [(0, 0, 4), (0, 4, 4), (0, 8, 2), (1, 0, 3)]
        );
        for (sizes, max) in [
            (vec![], 4),
            (vec![4, 0], 4),
            (vec![4], 0),
            (vec![u64::MAX], 1),
        ] {
            assert!(shard_sizes(&sizes, max).is_err(), "{sizes:?} by {max}");
        }
    }

    proptest! {
        #[test]
        fn shards_tile_every_buffer(sizes in prop::collection::vec(1u64..10_000, 1..6), max in 1u64..5000) {
            let places = shard_places(&sizes, max).unwrap();
            let mut next = vec![0u64; sizes.len()];
            for (buffer, offset, len) in places {
                prop_assert_eq!(offset, next[buffer]);
                prop_assert!(len >= 1 && len <= max);
                next[buffer] += len;
            }
            prop_assert_eq!(next, sizes);
        }
    }
}
