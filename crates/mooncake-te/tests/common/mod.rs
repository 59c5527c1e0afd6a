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

/// A write of `len` bytes from `local` to `remote` in `segment`, and the read that brings them
/// back into the `len` bytes after them in `local`.
pub(crate) fn round_trip(
    segment: mooncake_te::SegmentId,
    local: *mut u8,
    remote: u64,
    len: usize,
) -> [mooncake_te::TransferRequest; 2] {
    let write = mooncake_te::TransferRequest {
        op: mooncake_te::Opcode::Write,
        segment,
        local_addr: local as usize,
        remote_addr: remote,
        len,
    };
    let read = mooncake_te::TransferRequest {
        op: mooncake_te::Opcode::Read,
        local_addr: local as usize + len,
        ..write
    };
    [write, read]
}
