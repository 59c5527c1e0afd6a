//! What each live client's engine last said about its rails, for the dashboard.
//!
//! Volatile: never logged (a new leader hears it again with the next pings) and forgotten with
//! its client. Bounded whatever a client sends: [`MAX_REPORTED_RAILS`] rails per client, labels
//! of [`MAX_RAIL_LABEL_LEN`](crate::master::types::MAX_RAIL_LABEL_LEN) bytes, and
//! [`MAX_STORED_RAILS`] in all.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::Master;
use crate::master::types::{ClientId, RailReport, MAX_REPORTED_RAILS};

/// Rails kept for all clients together: many clients reporting full lists cannot grow the
/// master past this either.
pub const MAX_STORED_RAILS: usize = 16384;

/// The latest report of each live client.
#[derive(Default)]
pub(super) struct RailBoard {
    by_client: HashMap<ClientId, Vec<RailReport>>,
    /// Rails held in all, kept with the map so that a report is checked against
    /// [`MAX_STORED_RAILS`] without a scan.
    stored: usize,
}

impl RailBoard {
    /// Replaces `client`'s report; refused (the old one dropped too) when it would take the
    /// board past [`MAX_STORED_RAILS`].
    fn replace(&mut self, client: ClientId, rails: Vec<RailReport>) -> bool {
        self.forget(client);
        let Some(stored) = self
            .stored
            .checked_add(rails.len())
            .filter(|n| *n <= MAX_STORED_RAILS)
        else {
            return false;
        };
        if !rails.is_empty() {
            self.stored = stored;
            self.by_client.insert(client, rails);
        }
        true
    }

    fn forget(&mut self, client: ClientId) {
        if let Some(old) = self.by_client.remove(&client) {
            self.stored = self.stored.saturating_sub(old.len());
        }
    }

    /// Keeps the reports of the clients `live` accepts.
    pub(super) fn retain(&mut self, live: impl Fn(ClientId) -> bool) {
        let gone: Vec<ClientId> = self
            .by_client
            .keys()
            .filter(|id| !live(**id))
            .copied()
            .collect();
        for client in gone {
            self.forget(client);
        }
    }

    pub(super) fn clear(&mut self) {
        self.by_client.clear();
        self.stored = 0;
    }

    #[cfg(test)]
    pub(super) fn stored(&self) -> usize {
        self.stored
    }

    /// Panics unless every bound holds and the count matches the reports.
    #[cfg(test)]
    pub(super) fn check_invariants(&self) {
        use crate::master::types::MAX_RAIL_LABEL_LEN;
        let counted: usize = self.by_client.values().map(Vec::len).sum();
        assert_eq!(self.stored, counted, "rails miscounted");
        assert!(self.stored <= MAX_STORED_RAILS, "too many rails stored");
        for rail in self.by_client.values().flatten() {
            for label in [&rail.peer, &rail.local, &rail.remote] {
                assert!(label.len() <= MAX_RAIL_LABEL_LEN, "a rail label unbounded");
                assert!(!label.chars().any(char::is_control), "a control character");
            }
        }
        assert!(
            self.by_client
                .values()
                .all(|r| !r.is_empty() && r.len() <= MAX_REPORTED_RAILS),
            "a report unbounded or empty"
        );
    }
}

/// The rails of one node, for the dashboard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRails {
    /// The node's segment names, or `None` for clients that mount no segment.
    pub node: Option<String>,
    /// Its rails, by peer, then NICs.
    pub rails: Vec<RailReport>,
}

impl Master {
    /// Keeps `client`'s latest report of its rails in place of the one before. Only a live
    /// client's report is kept, and only its first [`MAX_REPORTED_RAILS`] rails, labels bounded;
    /// a report that would take the master past [`MAX_STORED_RAILS`] is dropped. Returns
    /// whether it was kept.
    pub fn report_rails(
        &mut self,
        client: ClientId,
        rails: impl IntoIterator<Item = RailReport>,
    ) -> bool {
        if !self.clients.get(&client).is_some_and(|c| c.ok) {
            self.rails.forget(client);
            return false;
        }
        let rails: Vec<RailReport> = rails
            .into_iter()
            .take(MAX_REPORTED_RAILS)
            .map(RailReport::bounded)
            .collect();
        let kept = self.rails.replace(client, rails);
        if !kept {
            tracing::debug!(
                "a rail report was dropped: the master holds {MAX_STORED_RAILS} rails already"
            );
        }
        kept
    }

    /// Every live client's rails, by node: a node is named by its clients' segment names, so
    /// that the admin pages never show client ids. Nodes are sorted by name (clients without a
    /// segment last), rails by peer, then NICs.
    pub fn rails_by_node(&self) -> Vec<NodeRails> {
        let mut names: HashMap<ClientId, BTreeSet<&str>> = HashMap::new();
        for s in self.segments.values().filter(|s| s.alive()) {
            names.entry(s.client).or_default().insert(&s.spec.name);
        }
        let mut nodes: BTreeMap<Option<String>, Vec<RailReport>> = BTreeMap::new();
        for (client, rails) in &self.rails.by_client {
            if !self.clients.get(client).is_some_and(|c| c.ok) {
                continue;
            }
            let node = names
                .get(client)
                .map(|names| names.iter().copied().collect::<Vec<_>>().join(", "));
            nodes.entry(node).or_default().extend(rails.iter().cloned());
        }
        let mut nodes: Vec<NodeRails> = nodes
            .into_iter()
            .map(|(node, mut rails)| {
                rails.sort_by(|a, b| {
                    (&a.peer, &a.local, &a.remote).cmp(&(&b.peer, &b.local, &b.remote))
                });
                NodeRails { node, rails }
            })
            .collect();
        // The map puts `None` first; a stable sort moves it last and keeps the names' order.
        nodes.sort_by_key(|n| n.node.is_none());
        nodes
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::master::types::{RailState, SegmentId, SegmentSpec, MAX_RAIL_LABEL_LEN};
    use crate::master::MasterConfig;

    fn rail(peer: &str, local: &str, state: RailState) -> RailReport {
        RailReport {
            peer: peer.to_owned(),
            local: local.to_owned(),
            remote: "10.0.0.2:9000".to_owned(),
            state,
            bytes: 1 << 20,
            failures: 0,
        }
    }

    fn mount(master: &mut Master, now: Instant, client: ClientId, id: u128, name: &str) {
        let spec = SegmentSpec {
            id: SegmentId(id),
            name: name.to_owned(),
            base: 0x1000_0000 * (id as u64 + 1),
            size: 16 << 20,
            te_endpoint: format!("127.0.0.1:{}", 15000 + id),
            protocol: "tcp".into(),
            host_id: "host".into(),
        };
        master.mount_segment(now, client, spec).unwrap();
    }

    fn stored_rails(master: &Master) -> usize {
        master.rails_by_node().iter().map(|n| n.rails.len()).sum()
    }

    #[test]
    fn a_report_of_ten_thousand_rails_with_megabyte_labels_is_cut_to_bounds() {
        let mut master = Master::new(MasterConfig::default()).unwrap();
        let (now, client) = (Instant::now(), ClientId(1));
        mount(&mut master, now, client, 1, "node-a");
        let huge = "x".repeat(1 << 20);
        // Multi-byte characters at the cut, and a control character.
        let wide = format!("{}\u{1b}[31m", "é".repeat(1 << 19));
        let report = (0..10_000).map(|i| RailReport {
            peer: format!("{huge}{i}"),
            local: wide.clone(),
            remote: huge.clone(),
            state: RailState::Usable,
            bytes: u64::MAX,
            failures: u64::MAX,
        });
        assert!(master.report_rails(client, report));
        let nodes = master.rails_by_node();
        assert_eq!(nodes.len(), 1);
        assert_eq!(nodes[0].rails.len(), MAX_REPORTED_RAILS);
        for r in &nodes[0].rails {
            for label in [&r.peer, &r.local, &r.remote] {
                assert!(label.len() <= MAX_RAIL_LABEL_LEN, "{} bytes", label.len());
                assert!(label.capacity() <= MAX_RAIL_LABEL_LEN, "a huge buffer kept");
                assert!(!label.chars().any(char::is_control));
            }
            assert_eq!(r.local.chars().next(), Some('é'));
        }
        assert_eq!(master.rails.stored(), MAX_REPORTED_RAILS);
    }

    #[test]
    fn a_report_replaces_the_one_before_and_an_empty_one_clears_it() {
        let mut master = Master::new(MasterConfig::default()).unwrap();
        let (now, client) = (Instant::now(), ClientId(1));
        mount(&mut master, now, client, 1, "node-a");
        let first = ["eth0", "eth1", "eth2"].map(|nic| rail("node-b", nic, RailState::Usable));
        master.report_rails(client, first);
        master.report_rails(client, [rail("node-b", "eth0", RailState::Paused)]);
        let nodes = master.rails_by_node();
        assert_eq!(
            nodes[0].rails,
            vec![rail("node-b", "eth0", RailState::Paused)]
        );
        master.report_rails(client, []);
        assert!(master.rails_by_node().is_empty());
        assert_eq!(master.rails.stored(), 0);
    }

    #[test]
    fn only_live_clients_reports_are_kept_and_they_go_when_the_client_expires() {
        let config = MasterConfig::default();
        let ttl = config.client_ttl;
        let mut master = Master::new(config).unwrap();
        let now = Instant::now();
        let (live, stranger) = (ClientId(1), ClientId(2));
        mount(&mut master, now, live, 1, "node-a");
        // A client this master does not know (it would be told to remount) is not listened to.
        assert_eq!(
            master.ping(now, stranger),
            super::super::ClientStatus::NeedRemount
        );
        assert!(!master.report_rails(stranger, [rail("node-a", "eth0", RailState::Usable)]));
        assert!(master.report_rails(live, [rail("node-b", "eth0", RailState::Failed)]));
        assert_eq!(stored_rails(&master), 1);

        let later = now + ttl + Duration::from_secs(1);
        master.tick(later);
        assert!(
            master.rails_by_node().is_empty(),
            "a silent client's rails are shown"
        );
        assert_eq!(master.rails.stored(), 0, "a silent client's rails are kept");

        // Back: its next report counts again, until a new leader's epoch forgets it.
        mount(&mut master, later, live, 1, "node-a");
        assert!(master.report_rails(live, [rail("node-b", "eth0", RailState::Usable)]));
        master.begin_epoch(later);
        assert_eq!(master.rails.stored(), 0);
    }

    #[test]
    fn the_master_holds_a_bounded_number_of_rails_in_all() {
        let mut master = Master::new(MasterConfig::default()).unwrap();
        let now = Instant::now();
        let clients = MAX_STORED_RAILS / MAX_REPORTED_RAILS;
        let full = |k: usize| {
            (0..MAX_REPORTED_RAILS)
                .map(move |i| rail(&format!("peer-{k}"), &i.to_string(), RailState::Usable))
        };
        for k in 0..=clients {
            let client = ClientId(k as u128 + 1);
            mount(
                &mut master,
                now,
                client,
                k as u128 + 1,
                &format!("node-{k}"),
            );
            let kept = master.report_rails(client, full(k));
            assert_eq!(kept, k < clients, "client {k}");
        }
        assert_eq!(master.rails.stored(), MAX_STORED_RAILS);
        // A client already on the board may still replace its report.
        assert!(master.report_rails(ClientId(1), full(0).take(3)));
        assert!(master.report_rails(ClientId(clients as u128 + 1), full(clients).take(3)));
        assert_eq!(
            stored_rails(&master),
            MAX_STORED_RAILS - MAX_REPORTED_RAILS + 6
        );
    }

    #[test]
    fn nodes_are_named_by_their_segments_and_sorted() {
        let mut master = Master::new(MasterConfig::default()).unwrap();
        let now = Instant::now();
        let (two, one, none) = (ClientId(7), ClientId(8), ClientId(9));
        mount(&mut master, now, two, 1, "node-z");
        mount(&mut master, now, two, 2, "node-b");
        mount(&mut master, now, one, 3, "node-c");
        // A pure requester registers by remounting nothing.
        master.remount_segments(now, none, Vec::new()).unwrap();
        for client in [none, one, two] {
            let rails = [
                rail("peer-2", "eth0", RailState::Usable),
                rail("peer-1", "eth1", RailState::Usable),
                rail("peer-1", "eth0", RailState::Paused),
            ];
            assert!(master.report_rails(client, rails));
        }
        let nodes = master.rails_by_node();
        let names: Vec<_> = nodes.iter().map(|n| n.node.as_deref()).collect();
        assert_eq!(names, [Some("node-b, node-z"), Some("node-c"), None]);
        let order: Vec<_> = nodes[0]
            .rails
            .iter()
            .map(|r| (r.peer.as_str(), r.local.as_str()))
            .collect();
        assert_eq!(
            order,
            [("peer-1", "eth0"), ("peer-1", "eth1"), ("peer-2", "eth0")]
        );
    }
}
