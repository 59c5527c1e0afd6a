//! Helpers shared by the engine's integration tests.
#![allow(dead_code)]

/// Fills `len` bytes at `ptr` with the self-describing pattern of `seed`
/// (`mooncake_common::pattern`): every 8-byte word holds its offset and the seed, so a wrong
/// byte tells where it came from and from which fill.
pub(crate) fn fill(ptr: *mut u8, len: usize, seed: u64) {
    // SAFETY: test buffers come from `allocate` and are `len` long.
    let bytes = unsafe { std::slice::from_raw_parts_mut(ptr, len) };
    mooncake_common::pattern::fill(bytes, seed, 0);
}

/// The `len` bytes at `ptr`.
pub(crate) fn bytes<'a>(ptr: *mut u8, len: usize) -> &'a [u8] {
    // SAFETY: as above.
    unsafe { std::slice::from_raw_parts(ptr, len) }
}
