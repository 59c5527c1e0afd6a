//! Self-describing bytes for tests, benches and torture runs: every 8-byte word holds its own
//! absolute offset and a seed, so a byte that lands at the wrong offset, comes from another
//! source or is stale shows where it came from. Offsets below 1 TiB and seeds below 2^24 give
//! every (seed, offset) a distinct word.

/// The word at the 8-byte aligned absolute offset `at`.
pub fn word(seed: u64, at: u64) -> u64 {
    (at & !7) ^ (seed << 40)
}

/// The byte at absolute offset `at`.
pub fn byte(seed: u64, at: u64) -> u8 {
    word(seed, at).to_le_bytes()[(at & 7) as usize]
}

/// Fills `buf` as if it started at absolute offset `at`.
pub fn fill(buf: &mut [u8], seed: u64, at: u64) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = byte(seed, at + i as u64);
    }
}

/// `len` bytes of the pattern from absolute offset `at`.
pub fn bytes(seed: u64, at: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0; len];
    fill(&mut out, seed, at);
    out
}

/// The first offset (relative to `buf`) whose byte differs from the pattern, if any.
pub fn mismatch(buf: &[u8], seed: u64, at: u64) -> Option<usize> {
    buf.iter()
        .enumerate()
        .position(|(i, b)| *b != byte(seed, at + i as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_unique_per_offset_and_seed() {
        let a = bytes(1, 0, 1 << 20);
        assert_eq!(mismatch(&a, 1, 0), None);
        // A word at the wrong offset differs from the right one within its own 8 bytes.
        assert!(
            mismatch(&a[8..], 1, 0).is_some_and(|at| at < 8),
            "shifted by a word"
        );
        assert!(
            mismatch(&a[65536..], 1, 0).is_some_and(|at| at < 8),
            "shifted by 64 KiB"
        );
        assert!(mismatch(&a, 2, 0).is_some(), "another seed");
        let mut words = std::collections::HashSet::new();
        for seed in 0..4 {
            for at in (0..1 << 16).step_by(8) {
                assert!(words.insert(word(seed, at)));
            }
        }
        let mut part = vec![0; 13];
        fill(&mut part, 3, 1_000_003);
        assert_eq!(part, bytes(3, 0, 1_000_016)[1_000_003..]);
    }
}
