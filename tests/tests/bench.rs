//! `cargo xtask bench` end to end, in its short form: the real topology, agents and tools; the
//! report, results and chart come out, and the numbers in them are measurements (positive,
//! consistent with each other), not placeholders. No timing is asserted: the machines are noisy.
#![cfg(feature = "privileged")]

use serde_json::Value;
use tests::*;

#[test]
fn the_benchmark_measures_mesh_and_direct_and_writes_its_report() {
    let out = tempfile_dir();
    let run = std::process::Command::new(bin("sm-bench")).args(["--quick", "--out"]).arg(&out).output().unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "sm-bench failed:\n{stdout}\n{}", String::from_utf8_lossy(&run.stderr));
    assert!(stdout.contains("targets:"), "no summary line:\n{stdout}");

    let results: Value = serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let r = &results["results"];
    let median = |k: &str| r[k]["median"].as_f64().unwrap_or_else(|| panic!("no {k} in {r}"));
    for k in [
        "tput.cross_1.direct",
        "tput.cross_1.mesh",
        "tput.cross_2.mesh",
        "tput.same.direct",
        "tput.same.mesh",
        "lat.cross_closed.mesh.p50",
        "lat.cross_closed.direct.p50",
        "conns.direct",
        "conns.mesh_pooled",
        "conns.mesh_fresh_mtls",
        "cpu.seconds_per_gb",
        "mem.idle_rss.n1",
    ] {
        assert!(median(k) > 0.0, "{k} = {}", median(k));
    }
    // Percentiles are ordered, and the fixed-rate run really ran near its rate.
    let q = |p: &str| median(&format!("lat.cross_closed.mesh.{p}"));
    assert!(q("p50") <= q("p90") && q("p90") <= q("p99") && q("p99") <= q("p999"));
    let rps = median("lat.cross_rate1000.mesh.rps");
    assert!((500.0..=1100.0).contains(&rps), "fixed-rate run at {rps}/s, asked for 1000/s");
    // Every held connection was opened through the mesh.
    assert_eq!(median("mem.idle_conns"), 1000.0);
    // With pooling off each connection made its own mutual-TLS session; pooled, almost none did.
    let fresh = median("conns.mesh_fresh_mtls.handshakes_per_conn");
    assert!((0.95..=1.05).contains(&fresh), "{fresh} handshakes per connection with --hbone-pooling false");
    assert!(median("conns.mesh_pooled.handshakes_per_conn") < 0.05);

    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("kernel: ") && md.contains("commit: "), "{md}");
    assert!(md.contains("throughput, cross-node, 1 connection"), "{md}");
    let png = std::fs::read(out.join("chart.png")).unwrap();
    assert!(png.len() > 10_000 && png.starts_with(b"\x89PNG\r\n\x1a\n"), "chart.png is not a PNG");
    let _ = std::fs::remove_dir_all(&out);
}

fn tempfile_dir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("{PREFIX}bench-out-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}
