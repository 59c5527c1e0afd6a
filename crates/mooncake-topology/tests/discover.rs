mod fixture;

use fixture::{Fixture, Port};
use mooncake_topology::{DiscoverOptions, Entry, Topology};

fn entry(preferred: &[&str], available: &[&str]) -> Entry {
    let own = |l: &[&str]| l.iter().map(|s| s.to_string()).collect();
    Entry {
        preferred: own(preferred),
        available: own(available),
    }
}

fn mlx(range: impl IntoIterator<Item = usize>) -> Vec<String> {
    range.into_iter().map(|i| format!("mlx5_{i}")).collect()
}

/// Leaf switch `leaf` (0..8) of a DGX-like host: per socket two root ports, each feeding a
/// switch whose two downstream ports each feed a leaf switch. Returns the chain to the leaf's
/// upstream port and the bus number its devices start at.
fn leaf_switch(leaf: usize) -> (String, usize) {
    let (socket, root_port, down) = (leaf / 4, (leaf / 2) % 2, leaf % 2);
    let base = socket * 0x80;
    let bus = base + root_port * 0x20 + down * 0x10;
    let chain = format!(
        "pci0000:{base:02x}/0000:{base:02x}:{rp:02x}.0/0000:{t1:02x}:00.0/0000:{t1d:02x}:{down:02x}.0/0000:{up:02x}:00.0",
        rp = 1 + root_port,
        t1 = base + 1 + root_port * 0x20,
        t1d = base + 2 + root_port * 0x20,
        up = bus + 3,
    );
    (chain, bus + 4)
}

/// Device `n` below leaf switch port `port`.
fn below(leaf: usize, port: usize, n: usize) -> String {
    let (chain, bus) = leaf_switch(leaf);
    format!(
        "{chain}/0000:{bus:02x}:{port:02x}.0/0000:{:02x}:00.0",
        bus + 1 + n
    )
}

fn dgx(fx: &Fixture) {
    fx.numa_nodes(2);
    for i in 0..8 {
        let numa = (i / 4) as i32;
        fx.gpu(&below(i, 0, 0), numa);
        let port = Port::roce(&format!("ens{i}np0"), i as u8 + 1);
        fx.rdma_nic(&format!("mlx5_{i}"), &below(i, 1, 1), numa, &[port]);
    }
    fx.virtual_net("lo");
}

#[test]
fn dgx_like_host_pairs_each_gpu_with_the_nic_on_its_switch() {
    let fx = Fixture::new();
    dgx(&fx);
    let topo = Topology::discover(&fx.options(None)).expect("discover");

    assert_eq!(topo.numa_nodes.len(), 2);
    assert_eq!(topo.numa_nodes[1].cpulist.as_deref(), Some("32-63"));
    let nic_names: Vec<_> = topo.rdma_nics.iter().map(|n| n.name.clone()).collect();
    assert_eq!(nic_names, mlx(0..8));
    assert_eq!(
        topo.rdma_nics[5].pci_bus_id.as_deref(),
        Some("0000:96:00.0")
    );
    assert_eq!(topo.rdma_nics[5].numa_node, 1);
    let gid = &topo.rdma_nics[0].ports[0].gids[3];
    assert_eq!((gid.index, gid.gid_type.as_deref()), (3, Some("RoCE v2")));
    assert_eq!(gid.netdev.as_deref(), Some("ens0np0"));
    assert_eq!(
        topo.rdma_nics[0].ports[0].gids.len(),
        4,
        "zero GIDs are empty slots"
    );
    let gpu_buses: Vec<_> = topo.gpus.iter().map(|g| g.pci_bus_id.as_str()).collect();
    assert_eq!(gpu_buses[..2], ["0000:05:00.0", "0000:15:00.0"]);
    assert_eq!(topo.gpus[7].location, "cuda:7");
    assert_eq!(topo.gpus[7].numa_node, 1);

    let matrix = topo.matrix();
    let locations: Vec<_> = matrix.iter().map(|(l, _)| l.to_owned()).collect();
    let mut expected = vec!["cpu:0".to_owned(), "cpu:1".to_owned()];
    expected.extend((0..8).map(|i| format!("cuda:{i}")));
    assert_eq!(locations, expected);
    let cpu0 = matrix.get("cpu:0").expect("cpu:0");
    assert_eq!(
        (cpu0.preferred.clone(), cpu0.available.clone()),
        (mlx(0..4), mlx(4..8))
    );
    let cpu1 = matrix.get("cpu:1").expect("cpu:1");
    assert_eq!(
        (cpu1.preferred.clone(), cpu1.available.clone()),
        (mlx(4..8), mlx(0..4))
    );
    for i in 0..8 {
        let gpu = matrix.get(&format!("cuda:{i}")).expect("gpu entry");
        assert_eq!(gpu.preferred, mlx([i]));
        assert_eq!(gpu.available, mlx((0..8).filter(|&j| j != i)));
    }

    let net = topo.net_matrix();
    let names = |r: std::ops::Range<usize>| r.map(|i| format!("ens{i}np0")).collect::<Vec<_>>();
    let net0 = net.get("cpu:0").expect("cpu:0");
    assert_eq!(
        (net0.preferred.clone(), net0.available.clone()),
        (names(0..4), names(4..8))
    );
    let lo = topo.interfaces.iter().find(|i| i.name == "lo").expect("lo");
    assert!(!lo.is_physical() && lo.numa_node.is_none());
    let ens6 = topo
        .interfaces
        .iter()
        .find(|i| i.name == "ens6np0")
        .expect("ens6np0");
    assert_eq!(
        ens6.pci_bus_id.as_deref(),
        topo.rdma_nics[6].pci_bus_id.as_deref()
    );
    assert_eq!(
        (ens6.operstate.as_deref(), ens6.carrier),
        (Some("up"), Some(true))
    );

    let text = topo.to_string();
    assert!(text.contains("RDMA NICs: 8") && text.contains("cuda:7") && text.contains("RoCE v2"));
    let json = serde_json::to_value(&topo).expect("serialize");
    assert_eq!(json["gpus"][3]["location"], "cuda:3");
    assert_eq!(json["rdma_nics"][0]["ports"][0]["state"], "4: ACTIVE");
}

#[test]
fn nics_sharing_a_gpu_switch_are_all_preferred() {
    let fx = Fixture::new();
    fx.numa_nodes(1);
    fx.gpu(&below(0, 0, 0), 0);
    fx.rdma_nic("mlx5_0", &below(0, 1, 1), 0, &[Port::roce("a0", 1)]);
    fx.rdma_nic("mlx5_1", &below(0, 2, 2), 0, &[Port::roce("a1", 2)]);
    fx.rdma_nic("mlx5_2", &below(1, 1, 1), 0, &[Port::roce("a2", 3)]);
    fx.gpu(&below(1, 0, 0), 0);
    let matrix = Topology::discover(&fx.options(None))
        .expect("discover")
        .matrix();
    assert_eq!(
        matrix.get("cuda:0"),
        Some(&entry(&["mlx5_0", "mlx5_1"], &["mlx5_2"]))
    );
    assert_eq!(
        matrix.get("cuda:1"),
        Some(&entry(&["mlx5_2"], &["mlx5_0", "mlx5_1"]))
    );
}

#[test]
fn gpu_on_a_node_without_nics_considers_every_nic() {
    let fx = Fixture::new();
    fx.numa_nodes(2);
    fx.gpu(&below(4, 0, 0), 1);
    fx.rdma_nic("mlx5_0", &below(0, 1, 1), 0, &[Port::roce("a0", 1)]);
    fx.rdma_nic("mlx5_1", &below(2, 1, 1), 0, &[Port::roce("a1", 2)]);
    let matrix = Topology::discover(&fx.options(None))
        .expect("discover")
        .matrix();
    // Both are in the other socket, equally far: the tie is kept.
    assert_eq!(
        matrix.get("cuda:0"),
        Some(&entry(&["mlx5_0", "mlx5_1"], &[]))
    );
    assert_eq!(
        matrix.get("cpu:1"),
        Some(&entry(&[], &["mlx5_0", "mlx5_1"]))
    );
}

#[test]
fn host_without_nics_has_empty_cpu_entries() {
    let fx = Fixture::new();
    fx.gpu(&below(0, 0, 0), -1);
    fx.virtual_net("lo");
    let topo = Topology::discover(&fx.options(None)).expect("discover");
    assert_eq!(topo.numa_nodes.len(), 1, "no node dir means node 0 only");
    assert!(topo.rdma_nics.is_empty());
    assert_eq!(topo.gpus[0].numa_node, 0, "numa_node -1 counts as node 0");
    let matrix = topo.matrix();
    assert_eq!(matrix.get("cpu:0"), Some(&Entry::default()));
    assert_eq!(matrix.get("cuda:0"), Some(&Entry::default()));
    assert_eq!(topo.net_matrix().get("cpu:0"), Some(&Entry::default()));
}

#[test]
fn filters_and_unusable_nics_are_skipped() {
    let fx = Fixture::new();
    fx.numa_nodes(1);
    fx.rdma_nic("mlx5_0", &below(0, 1, 1), 0, &[Port::roce("a0", 1)]);
    let down = [Port::down("a1", 2), Port::down("a1b", 3)];
    fx.rdma_nic("mlx5_1", &below(1, 1, 1), 0, &down);
    fx.rdma_nic("mlx5_2", &below(2, 1, 1), 0, &[Port::zero_gids("a2")]);
    let mixed = [Port::down("a3", 4), Port::roce("a3b", 5)];
    fx.rdma_nic("mlx5_3", &below(3, 1, 1), 0, &mixed);

    let names = |options: &DiscoverOptions| -> Vec<String> {
        let topo = Topology::discover(options).expect("discover");
        topo.rdma_nics.into_iter().map(|n| n.name).collect()
    };
    assert_eq!(names(&fx.options(None)), ["mlx5_0", "mlx5_3"]);
    assert_eq!(names(&fx.options(Some(&["mlx5_3", "mlx5_1"]))), ["mlx5_3"]);
    assert_eq!(names(&fx.options(Some(&[]))), ["mlx5_0", "mlx5_3"]);
}

#[test]
fn garbled_or_missing_files_skip_only_that_device() {
    let fx = Fixture::new();
    fx.numa_nodes(1);
    fx.rdma_nic("mlx5_0", &below(0, 1, 1), 0, &[Port::roce("a0", 1)]);
    fx.gpu(&below(0, 0, 0), 0);
    fx.write(
        &format!("sys/devices/{}/numa_node", below(0, 1, 1)),
        "garbage",
    );
    let pci = fx.pci(&below(1, 0, 0), (0x030200, 0x10de), 0);
    fx.write(&format!("{pci}/class"), "not hex");
    fx.write("sys/class/infiniband/broken/ports/1/gids/0", "zz:not-a-gid");
    fx.write("sys/class/infiniband/broken/ports/1/state", "4: ACTIVE");
    fx.write("sys/class/infiniband/noports/node_type", "1: CA");
    let topo = Topology::discover(&fx.options(None)).expect("discover");
    let nics: Vec<_> = topo.rdma_nics.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(nics, ["mlx5_0"]);
    assert_eq!(topo.rdma_nics[0].numa_node, 0);
    assert_eq!(topo.gpus.len(), 1);
}

#[test]
fn missing_root_is_an_error() {
    let options = DiscoverOptions {
        root: std::env::temp_dir().join("mooncake-topology-does-not-exist"),
        filters: None,
    };
    let err = Topology::discover(&options).expect_err("missing root");
    assert_eq!(err.kind().code(), "ERR_INVALID_ARGUMENT");
}

#[test]
fn discovery_on_this_host_succeeds() {
    let topo = Topology::discover(&DiscoverOptions::default()).expect("discover /");
    assert!(!topo.numa_nodes.is_empty());
    assert!(topo.matrix().get("cpu:0").is_some() || topo.numa_nodes[0].id != 0);
    assert!(topo.to_string().contains("NUMA nodes"));
}
