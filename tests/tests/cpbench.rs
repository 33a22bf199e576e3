//! `cargo xtask bench --control-plane` end to end, in its short form: the real controller and
//! simulated agents; the report comes out, every figure in it was measured, and what the bench
//! checks by counting holds (a one-policy change reaches the nodes it concerns and no other; a
//! joining node gets its workloads; every certificate is signed). No timing is asserted: the
//! machines are noisy. Needs no root, but runs with the privileged suite, which has the release
//! binaries (`cargo xtask test` builds them).
#![cfg(feature = "privileged")]

use serde_json::Value;
use tests::*;

#[test]
fn the_control_plane_benchmark_measures_and_pushes_only_what_changed() {
    let out = std::env::temp_dir().join(format!("{PREFIX}cpbench-out-{}", std::process::id()));
    // A wait that never ends fails the run after two minutes, not ten.
    let run = std::process::Command::new(bin("sm-cpbench"))
        .args(["--quick", "--timeout-secs", "120", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "sm-cpbench failed:\n{stdout}\n{}", String::from_utf8_lossy(&run.stderr));
    assert!(stdout.contains("targets:"), "no summary line:\n{stdout}");
    assert!(std::fs::read_to_string(out.join("report.txt")).unwrap().contains("policy propagation"));
    let r: Value = serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();

    // Every figure was measured: a number (NaN is written as null).
    for section in ["controller", "snapshot", "propagation", "bytes", "join", "ca"] {
        let m = r[section].as_object().unwrap_or_else(|| panic!("no {section} in {r}"));
        assert!(!m.is_empty(), "{section}");
        for (k, v) in m {
            assert!(v.is_number(), "{section}.{k} = {v}");
        }
    }
    let f = |path: &str| path.split('.').fold(&r, |v, k| &v[k]).as_f64().unwrap_or_else(|| panic!("{path}"));
    for k in [
        "controller.rss_bytes_watching",
        "controller.rss_bytes_per_workload",
        "snapshot.p50_ms",
        "snapshot.bytes_per_node_median",
        "propagation.last_p50_ms",
        "propagation.last_p99_ms",
        "join.ms",
        "ca.per_s",
        "ca.p99_ms",
    ] {
        assert!(f(k) > 0.0, "{k} = {}", f(k));
    }
    assert!(f("propagation.last_p50_ms") <= f("propagation.last_p99_ms"));
    assert!(r["machine"]["cpu_model"].as_str().is_some_and(|m| !m.is_empty()), "{}", r["machine"]);

    let nodes = r["params"]["nodes"].as_u64().unwrap();
    assert_eq!(nodes, 50);
    let changes = r["changes"].as_array().unwrap();
    assert_eq!(changes.len() as u64, r["params"]["changes"].as_u64().unwrap());
    for c in changes {
        // Every node it concerns applied it and was sent something; the others nothing.
        let concerned = c["concerned_nodes"].as_u64().unwrap();
        assert!(concerned > 0 && concerned < nodes, "{c}");
        assert_eq!(c["concerned_applied"], c["concerned_nodes"], "{c}");
        let bytes = c["bytes_per_concerned_node"].as_array().unwrap();
        assert_eq!(bytes.len() as u64, concerned, "{c}");
        assert!(bytes.iter().all(|b| b.as_u64().unwrap() > 0), "{c}");
        assert_eq!(c["propagation_ms"].as_array().unwrap().len() as u64, concerned, "{c}");
        assert_eq!(c["nonconcerned_bytes"], 0, "{c}");
        // And what they were sent is the changed policy, once each: not their whole part again,
        // nor anything shared.
        assert_eq!(c["sent_to_concerned_by_kind"], serde_json::json!({"KIND_AUTHORIZATION_POLICY": concerned}), "{c}");
        assert_eq!(c["nonconcerned_nodes_with_bytes"], 0, "{c}");
    }
    assert_eq!(r["bytes"]["nonconcerned_total"], 0);

    // The joining node's snapshot holds its own workloads and the policies selecting them.
    let j = &r["join"];
    assert!(j["own_workloads_expected"].as_u64().unwrap() > 0, "{j}");
    assert_eq!(j["own_workloads_received"], j["own_workloads_expected"], "{j}");
    assert_eq!(j["policies_received"], j["policies_expected"], "{j}");
    assert!(j["bytes"].as_u64().unwrap() > 0 && j["resources"].as_u64().unwrap() > 0, "{j}");

    // Every node got its certificate.
    assert_eq!(r["ca"]["signed"].as_u64(), Some(nodes), "{}", r["ca"]);
    assert_eq!(r["ca"]["errors"], 0);
    assert!(r["errors"].as_array().unwrap().is_empty(), "{}", r["errors"]);
    let _ = std::fs::remove_dir_all(&out);
}
