use std::sync::atomic::{AtomicUsize, Ordering};

use mooncake_common::ErrorKind;
use mooncake_topology::{Entry, PriorityMatrix, WILDCARD};

const REFERENCE: &str = r#"{ "cpu:0": [["mlx5_0","mlx5_1"], ["mlx5_2","mlx5_3"]],
  "cpu:1": [["mlx5_2","mlx5_3"], ["mlx5_0","mlx5_1"]],
  "cuda:0": [["mlx5_0"], ["mlx5_1","mlx5_2","mlx5_3"]] }"#;

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[test]
fn json_round_trip_keeps_document_order() {
    let matrix = PriorityMatrix::parse(REFERENCE).expect("parse");
    let locations: Vec<_> = matrix.iter().map(|(l, _)| l).collect();
    assert_eq!(locations, ["cpu:0", "cpu:1", "cuda:0"]);
    assert_eq!(
        matrix.get("cuda:0").map(|e| e.preferred.clone()),
        Some(names(&["mlx5_0"]))
    );
    let json = matrix.to_json();
    assert!(json.starts_with(r#"{"cpu:0":[["mlx5_0","mlx5_1"],["mlx5_2","mlx5_3"]],"cpu:1""#));
    assert_eq!(PriorityMatrix::parse(&json).expect("reparse"), matrix);
    assert_eq!(
        PriorityMatrix::parse("{}").expect("empty"),
        PriorityMatrix::new()
    );
}

#[test]
fn malformed_matrices_are_rejected() {
    for bad in [
        r#"{"cpu:0": [["mlx5_0"]]}"#,
        r#"{"cpu:0": [["mlx5_0"], [], []]}"#,
        r#"{"cpu:0": [["mlx5_0"], [7]]}"#,
        r#"{"cpu:0": "mlx5_0"}"#,
        r#"[["mlx5_0"], []]"#,
        r#"{"cpu:0": [["mlx5_0"], []]"#,
        "",
    ] {
        let err = PriorityMatrix::parse(bad).expect_err(bad);
        assert_eq!(err.kind(), ErrorKind::MalformedJson, "{bad}");
        assert_eq!(err.kind().code(), "ERR_MALFORMED_JSON");
    }
}

#[test]
fn devices_wildcard_and_restrict() {
    let mut matrix = PriorityMatrix::parse(REFERENCE).expect("parse");
    assert_eq!(
        matrix.devices(),
        names(&["mlx5_0", "mlx5_1", "mlx5_2", "mlx5_3"])
    );
    let wildcard = matrix.entry_for("cuda:9");
    assert_eq!(wildcard.preferred, matrix.devices());
    assert!(wildcard.available.is_empty());
    assert_eq!(
        matrix.entry_for("cpu:1").preferred,
        names(&["mlx5_2", "mlx5_3"])
    );

    matrix.restrict(&["mlx5_1", "mlx5_3"]);
    assert_eq!(
        matrix.get("cpu:0"),
        Some(&Entry {
            preferred: names(&["mlx5_1"]),
            available: names(&["mlx5_3"]),
        })
    );
    assert_eq!(matrix.devices(), names(&["mlx5_1", "mlx5_3"]));
    assert_eq!(matrix.len(), 3);

    matrix.insert(WILDCARD, Entry::default());
    assert_eq!(*matrix.entry_for("cuda:9"), Entry::default());
}

#[test]
fn load_reads_a_matrix_file() {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let path = std::env::temp_dir().join(format!(
        "mooncake-topology-matrix-{}-{}.json",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&path, REFERENCE).expect("write");
    let loaded = PriorityMatrix::load(&path);
    std::fs::write(&path, r#"{"cpu:0": [[]]}"#).expect("write");
    let malformed = PriorityMatrix::load(&path);
    std::fs::remove_file(&path).expect("remove");

    assert_eq!(loaded.expect("load").len(), 3);
    assert_eq!(
        malformed.expect_err("malformed").kind(),
        ErrorKind::MalformedJson
    );
    let missing = PriorityMatrix::load(&path).expect_err("missing");
    assert_eq!(missing.kind(), ErrorKind::InvalidArgument);
}
