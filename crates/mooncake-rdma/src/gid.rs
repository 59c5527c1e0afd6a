//! Which GID a context sends from (Mooncake's auto-selection, `rdma_gid_probe.h`).
//!
//! Candidates are non-null RoCE v2 or InfiniBand entries, ranked best first:
//! netdev-attached routable, routable without netdev, netdev private IPv4, netdev degraded
//! (overlay interface or link-local), private without netdev, degraded without netdev. Any
//! other non-null entry (RoCE v1) is the last resort. Ties go to the lower index.
//! `MC_GID_INDEX` overrides the ranking.

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::verbs::{GidEntry, GidType};

/// Address class of a GID, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum GidClass {
    /// Routable and attached to a network device.
    NetdevRoutable,
    /// Routable, no network device.
    Routable,
    /// Private IPv4 on a network device.
    NetdevPrivate,
    /// Overlay interface or link-local, on a network device.
    NetdevDegraded,
    /// Private IPv4, no network device.
    Private,
    /// Link-local, no network device.
    Degraded,
    /// Non-null but not RoCE v2 or InfiniBand.
    Other,
}

/// Whether an interface name belongs to a container or overlay network.
pub fn is_overlay_netdev(name: &str) -> bool {
    ["flannel", "cni", "calico", "vxlan", "docker"]
        .iter()
        .any(|p| name.starts_with(p))
        || name == "tunl0"
}

/// Whether an IPv4 address is in 10/8, 172.16/12 or 100.64/10.
pub fn is_private_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    a == 10 || (a == 172 && (16..32).contains(&b)) || (a == 100 && (64..128).contains(&b))
}

/// The class of `entry`, or `None` for a null GID.
pub fn classify(entry: &GidEntry) -> Option<GidClass> {
    if entry.gid == [0u8; 16] {
        return None;
    }
    if entry.kind == GidType::RoceV1 {
        return Some(GidClass::Other);
    }
    let ip = Ipv6Addr::from(entry.gid);
    let (private, link_local) = match ip.to_ipv4_mapped() {
        Some(v4) => (is_private_v4(v4), v4.is_link_local()),
        None => (false, ip.segments()[0] & 0xffc0 == 0xfe80),
    };
    let overlay = entry.netdev.as_deref().is_some_and(is_overlay_netdev);
    let netdev = entry.netdev.as_deref().is_some_and(|n| !n.is_empty());
    Some(match (netdev, overlay || link_local, private) {
        (true, true, _) => GidClass::NetdevDegraded,
        (true, false, true) => GidClass::NetdevPrivate,
        (true, false, false) => GidClass::NetdevRoutable,
        (false, true, _) => GidClass::Degraded,
        (false, false, true) => GidClass::Private,
        (false, false, false) => GidClass::Routable,
    })
}

/// The GID index to use: `override_index` when it names a non-null entry, else the best
/// ranked entry. `None` when the table holds no usable GID.
pub fn select_gid(entries: &[GidEntry], override_index: Option<u32>) -> Option<u32> {
    if let Some(index) = override_index {
        return entries
            .iter()
            .find(|e| e.index == index && e.gid != [0u8; 16])
            .map(|e| e.index);
    }
    entries
        .iter()
        .filter_map(|e| classify(e).map(|class| (class, e.index)))
        .min()
        .map(|(_, index)| index)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(index: u32, ip: [u8; 4], kind: GidType, netdev: Option<&str>) -> GidEntry {
        let mut gid = [0u8; 16];
        gid[10] = 0xff;
        gid[11] = 0xff;
        gid[12..].copy_from_slice(&ip);
        GidEntry {
            index,
            gid,
            kind,
            netdev: netdev.map(str::to_owned),
        }
    }

    fn link_local(index: u32, netdev: Option<&str>) -> GidEntry {
        let mut gid = [0u8; 16];
        gid[0] = 0xfe;
        gid[1] = 0x80;
        gid[15] = 1;
        GidEntry {
            index,
            gid,
            kind: GidType::RoceV2,
            netdev: netdev.map(str::to_owned),
        }
    }

    #[test]
    fn classes() {
        use GidType::*;
        let c = |e: GidEntry| classify(&e);
        assert_eq!(
            c(v4(0, [8, 8, 8, 8], RoceV2, Some("eth0"))),
            Some(GidClass::NetdevRoutable)
        );
        assert_eq!(
            c(v4(0, [8, 8, 8, 8], RoceV2, None)),
            Some(GidClass::Routable)
        );
        assert_eq!(
            c(v4(0, [10, 1, 2, 3], RoceV2, Some("eth0"))),
            Some(GidClass::NetdevPrivate)
        );
        assert_eq!(
            c(v4(0, [172, 20, 0, 1], RoceV2, None)),
            Some(GidClass::Private)
        );
        assert_eq!(
            c(v4(0, [100, 70, 0, 1], RoceV2, None)),
            Some(GidClass::Private)
        );
        assert_eq!(
            c(v4(0, [172, 40, 0, 1], RoceV2, None)),
            Some(GidClass::Routable)
        );
        assert_eq!(
            c(v4(0, [8, 8, 8, 8], RoceV2, Some("flannel.1"))),
            Some(GidClass::NetdevDegraded)
        );
        assert_eq!(
            c(v4(0, [8, 8, 8, 8], RoceV2, Some("docker0"))),
            Some(GidClass::NetdevDegraded)
        );
        assert_eq!(
            c(link_local(0, Some("eth0"))),
            Some(GidClass::NetdevDegraded)
        );
        assert_eq!(c(link_local(0, None)), Some(GidClass::Degraded));
        assert_eq!(
            c(v4(0, [8, 8, 8, 8], RoceV1, Some("eth0"))),
            Some(GidClass::Other)
        );
        let null = GidEntry {
            index: 0,
            gid: [0; 16],
            kind: RoceV2,
            netdev: None,
        };
        assert_eq!(classify(&null), None);
    }

    #[test]
    fn prefers_routable_roce_v2_on_a_netdev() {
        use GidType::*;
        let table = vec![
            link_local(0, Some("eth0")),
            v4(1, [10, 0, 0, 11], RoceV1, Some("eth0")),
            v4(2, [10, 0, 0, 11], RoceV2, Some("eth0")),
            v4(3, [10, 244, 0, 5], RoceV2, Some("cni0")),
            v4(4, [192, 0, 2, 7], RoceV2, None),
            v4(5, [192, 0, 2, 7], RoceV2, Some("eth1")),
        ];
        assert_eq!(select_gid(&table, None), Some(5));
        assert_eq!(select_gid(&table[..5], None), Some(4));
        assert_eq!(select_gid(&table[..4], None), Some(2));
        assert_eq!(select_gid(&table[..2], None), Some(0));
        assert_eq!(select_gid(&table[1..2], None), Some(1));
        assert_eq!(select_gid(&[], None), None);
    }

    #[test]
    fn override_wins_when_it_names_a_real_entry() {
        let table = vec![
            link_local(0, None),
            v4(3, [8, 8, 8, 8], GidType::RoceV2, None),
        ];
        assert_eq!(select_gid(&table, Some(0)), Some(0));
        assert_eq!(select_gid(&table, Some(7)), None);
    }
}
