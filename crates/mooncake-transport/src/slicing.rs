//! Cutting a request into slices: pieces of `slice_size` bytes, except that a remainder of up
//! to `fragment_limit` bytes is merged into the last piece instead of going out as a runt
//! (Mooncake's tail merge). Every transport cuts with these; RDMA also clips pieces at buffer
//! ends, one [`next_len`] at a time.

/// Mooncake's default merge limit: a quarter slice (`fragment_ratio` 4).
pub fn default_fragment_limit(slice_size: usize) -> usize {
    slice_size / 4
}

/// The length of the next piece when `remaining` bytes are left.
pub fn next_len(remaining: usize, slice_size: usize, fragment_limit: usize) -> usize {
    let slice_size = slice_size.max(1);
    if remaining <= slice_size.saturating_add(fragment_limit) {
        remaining
    } else {
        slice_size
    }
}

/// `(offset, len)` of each piece of a `len`-byte request.
pub fn slices(
    len: usize,
    slice_size: usize,
    fragment_limit: usize,
) -> impl Iterator<Item = (usize, usize)> {
    let mut offset = 0;
    std::iter::from_fn(move || {
        if offset >= len {
            return None;
        }
        let at = offset;
        let this = next_len(len - offset, slice_size, fragment_limit);
        offset += this;
        Some((at, this))
    })
}

/// How many pieces [`slices`] yields, without cutting.
pub fn slice_count(len: usize, slice_size: usize, fragment_limit: usize) -> usize {
    let slice_size = slice_size.max(1);
    let merged = slice_size.saturating_add(fragment_limit);
    if len == 0 {
        0
    } else if len <= merged {
        1
    } else {
        // Full slices until what is left fits in one merged piece.
        (len - merged).div_ceil(slice_size) + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cover_the_request_exactly_and_merge_small_tails() {
        let slice = 64 << 10;
        for fragment in [0, 1, slice / 4, slice - 1, slice, 3 * slice] {
            for len in [
                0,
                1,
                slice - 1,
                slice,
                slice + 1,
                slice + slice / 4,
                slice + slice / 4 + 1,
                10 * slice + 7,
                1 << 26,
            ] {
                let cut: Vec<_> = slices(len, slice, fragment).collect();
                assert_eq!(cut.len(), slice_count(len, slice, fragment), "len {len}");
                assert_eq!(cut.iter().map(|(_, l)| l).sum::<usize>(), len);
                let mut expect = 0;
                for (offset, l) in &cut {
                    assert_eq!(*offset, expect);
                    assert!(*l <= slice + fragment && *l > 0);
                    expect += l;
                }
            }
        }
        let quarter = default_fragment_limit(slice);
        assert_eq!(
            slice_count(slice + slice / 4, slice, quarter),
            1,
            "tail merged"
        );
        assert_eq!(
            slice_count(2 * slice + 100, slice, quarter),
            2,
            "runt merged"
        );
        assert_eq!(
            slices(200, 64, 16).collect::<Vec<_>>(),
            vec![(0, 64), (64, 64), (128, 72)]
        );
        assert_eq!(
            slices(81, 64, 16).collect::<Vec<_>>(),
            vec![(0, 64), (64, 17)]
        );
    }
}
