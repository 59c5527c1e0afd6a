//! Choosing segments for the replicas of an object.
//!
//! Every replica goes to a different segment name (a different client), so that losing one
//! client never takes two replicas. Preferred segments are tried first, in order. Placement is
//! best effort: fewer replicas than asked is a success as long as there is one.

use super::config::AllocationStrategy;

/// What placement needs to know of a segment.
#[derive(Debug, Clone)]
pub struct Candidate<'a> {
    /// Index in the caller's list.
    pub index: usize,
    /// Segment (client) name.
    pub name: &'a str,
    /// Owner's host.
    pub host_id: &'a str,
    /// Largest request that fits now.
    pub largest_free: u64,
    /// Free bytes over capacity.
    pub free_ratio: f64,
}

/// The order in which to try candidates for an object of `size` bytes with `key`.
pub fn order(
    strategy: AllocationStrategy,
    candidates: &[Candidate<'_>],
    preferred: &[String],
    writer_host: &str,
    key: &str,
    size: u64,
) -> Vec<usize> {
    let fits: Vec<&Candidate<'_>> = candidates
        .iter()
        .filter(|c| c.largest_free >= size)
        .collect();
    let mut out: Vec<usize> = Vec::with_capacity(fits.len());
    for name in preferred {
        out.extend(fits.iter().filter(|c| c.name == name).map(|c| c.index));
    }
    let mut rest: Vec<&Candidate<'_>> = fits
        .iter()
        .copied()
        .filter(|c| !out.contains(&c.index))
        .collect();
    match strategy {
        AllocationStrategy::Random => {
            if !rest.is_empty() {
                let start = fastrand::usize(..rest.len());
                rest.rotate_left(start);
            }
        }
        AllocationStrategy::FreeRatioFirst => {
            fastrand::shuffle(&mut rest);
            rest.sort_by(|a, b| b.free_ratio.total_cmp(&a.free_ratio));
        }
        AllocationStrategy::LocalFirst => {
            // The writer's host first, rotated by the key so that hot writers spread; then the
            // other hosts in a stable order.
            rest.sort_by(|a, b| {
                (a.host_id != writer_host, a.host_id, a.name).cmp(&(
                    b.host_id != writer_host,
                    b.host_id,
                    b.name,
                ))
            });
            let local = rest.iter().take_while(|c| c.host_id == writer_host).count();
            if local > 1 {
                let spin = key.bytes().fold(0usize, |h, b| {
                    h.wrapping_mul(31).wrapping_add(usize::from(b))
                });
                rest[..local].rotate_left(spin % local);
            }
        }
    }
    out.extend(rest.iter().map(|c| c.index));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidates() -> Vec<Candidate<'static>> {
        vec![
            Candidate {
                index: 0,
                name: "a",
                host_id: "h1",
                largest_free: 100,
                free_ratio: 0.1,
            },
            Candidate {
                index: 1,
                name: "b",
                host_id: "h2",
                largest_free: 100,
                free_ratio: 0.9,
            },
            Candidate {
                index: 2,
                name: "c",
                host_id: "h1",
                largest_free: 10,
                free_ratio: 0.5,
            },
            Candidate {
                index: 3,
                name: "d",
                host_id: "h3",
                largest_free: 100,
                free_ratio: 0.5,
            },
        ]
    }

    #[test]
    fn preferred_first_and_too_small_skipped() {
        let order = order(
            AllocationStrategy::Random,
            &candidates(),
            &["d".into(), "c".into()],
            "",
            "k",
            50,
        );
        assert_eq!(order[0], 3);
        assert!(!order.contains(&2), "c cannot hold 50 bytes");
        assert_eq!(order.len(), 3);
    }

    #[test]
    fn strategies_rank_as_documented() {
        let by_ratio = order(
            AllocationStrategy::FreeRatioFirst,
            &candidates(),
            &[],
            "",
            "k",
            50,
        );
        assert_eq!(by_ratio, vec![1, 3, 0]);
        let local = order(
            AllocationStrategy::LocalFirst,
            &candidates(),
            &[],
            "h3",
            "k",
            5,
        );
        assert_eq!(local[0], 3);
        assert_eq!(local.len(), 4);
    }
}
