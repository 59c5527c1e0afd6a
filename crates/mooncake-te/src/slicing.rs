//! Cutting a request into slices.
//!
//! Slices of `slice_size` bytes, except that a remainder of up to a quarter slice is merged
//! into the last one instead of going out as a runt (Mooncake's tail merge, with its default
//! fragment ratio of 4).

/// `(offset, len)` of each slice of a `len`-byte request.
pub fn slices(len: usize, slice_size: usize) -> impl Iterator<Item = (usize, usize)> {
    let merge_limit = slice_size + slice_size / 4;
    let mut offset = 0;
    std::iter::from_fn(move || {
        if offset >= len {
            return None;
        }
        let remaining = len - offset;
        let this = if remaining <= merge_limit {
            remaining
        } else {
            slice_size
        };
        let at = offset;
        offset += this;
        Some((at, this))
    })
}

/// How many slices [`slices`] yields.
pub fn slice_count(len: usize, slice_size: usize) -> usize {
    if len == 0 {
        return 0;
    }
    let merge_limit = slice_size + slice_size / 4;
    if len <= merge_limit {
        return 1;
    }
    let full = len / slice_size;
    let tail = len % slice_size;
    if tail == 0 || tail > slice_size / 4 {
        full + usize::from(tail > 0)
    } else {
        full
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_cover_the_request_exactly() {
        let slice = 64 << 10;
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
            let cut: Vec<_> = slices(len, slice).collect();
            assert_eq!(cut.len(), slice_count(len, slice), "len {len}");
            assert_eq!(cut.iter().map(|(_, l)| l).sum::<usize>(), len);
            let mut expect = 0;
            for (offset, l) in &cut {
                assert_eq!(*offset, expect);
                assert!(*l <= slice + slice / 4 && *l > 0);
                expect += l;
            }
        }
        assert_eq!(slice_count(slice + slice / 4, slice), 1, "tail merged");
        assert_eq!(
            slice_count(2 * slice + 100, slice),
            2,
            "runt merged into the last slice"
        );
    }
}
