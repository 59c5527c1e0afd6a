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

/// The `len` bytes at `ptr`.
pub(crate) fn bytes<'a>(ptr: *mut u8, len: usize) -> &'a [u8] {
    // SAFETY: as above.
    unsafe { std::slice::from_raw_parts(ptr, len) }
}
