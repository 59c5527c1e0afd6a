//! Helpers shared by the engine's integration tests.
#![allow(dead_code)]

/// Fills `len` bytes at `ptr` with a pattern that depends on `seed`.
pub(crate) fn fill(ptr: *mut u8, len: usize, seed: u8) {
    // SAFETY: test buffers come from `allocate` and are `len` long.
    let bytes = unsafe { std::slice::from_raw_parts_mut(ptr, len) };
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(31).wrapping_add(seed);
    }
}

/// Fills `len` bytes at `ptr` so that every 8-byte word is its own offset XOR `seed`: a wrong
/// byte tells where it came from (the offset) and from which fill (the seed).
pub(crate) fn fill_unique(ptr: *mut u8, len: usize, seed: u64) {
    // SAFETY: as above.
    let bytes = unsafe { std::slice::from_raw_parts_mut(ptr, len) };
    for (i, word) in bytes.chunks_mut(8).enumerate() {
        let value = ((i * 8) as u64 ^ seed).to_le_bytes();
        word.copy_from_slice(&value[..word.len()]);
    }
}

/// The `len` bytes at `ptr`.
pub(crate) fn bytes<'a>(ptr: *mut u8, len: usize) -> &'a [u8] {
    // SAFETY: as above.
    unsafe { std::slice::from_raw_parts(ptr, len) }
}
