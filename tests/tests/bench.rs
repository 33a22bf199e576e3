//! `cargo xtask bench` end to end, in its short form: the real topology, agents and tools; the
//! report, results and chart come out, and the numbers in them are measurements (positive,
//! consistent with each other), not placeholders. No timing is asserted: the machines are noisy.
#![cfg(feature = "privileged")]

use tests::bench::{ConnRate, Key, Latency, Node, Path, Quantile, ResultsFile, Rss, Scraping, Throughput, Via};
use tests::*;

#[test]
fn the_benchmark_measures_mesh_and_direct_and_writes_its_report() {
    let out = tempfile_dir();
    let run = std::process::Command::new(bin("sm-bench")).args(["--quick", "--out"]).arg(&out).output().unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "sm-bench failed:\n{stdout}\n{}", String::from_utf8_lossy(&run.stderr));
    assert!(stdout.contains("targets:"), "no summary line:\n{stdout}");

    let file: ResultsFile = serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let r = &file.results;
    let median = |k: Key| {
        let m = r.median(k);
        assert!(!m.is_nan(), "{k} was not measured");
        m
    };
    let tput = |case, path| Key::Throughput { case, path };
    let lat = |q| Key::Latency { case: Latency::CrossClosed, path: Path::Mesh, q };
    for k in [
        tput(Throughput::Cross1, Path::Direct),
        tput(Throughput::Cross1, Path::Mesh),
        tput(Throughput::Cross2, Path::Mesh),
        tput(Throughput::Cross8, Path::Direct),
        tput(Throughput::Cross8, Path::Mesh),
        tput(Throughput::Same, Path::Direct),
        tput(Throughput::Same, Path::Mesh),
        lat(Quantile::P50),
        Key::Latency { case: Latency::CrossClosed, path: Path::Direct, q: Quantile::P50 },
        Key::Conns { case: ConnRate::Direct },
        Key::Conns { case: ConnRate::MeshPooled },
        Key::Conns { case: ConnRate::MeshFreshMtls },
        Key::AgentCpuPerGb,
        Key::AgentCpuPer1kRps,
        Key::LatencyRate { case: Latency::CrossClosed4, path: Path::Mesh },
        Key::LatencyRate { case: Latency::CrossClosed16, path: Path::Direct },
        Key::LatencyRate { case: Latency::CrossClosed16, path: Path::Mesh },
        Key::Latency { case: Latency::CrossClosed16, path: Path::Mesh, q: Quantile::P50 },
        Key::Rss { when: Rss::Idle, node: Node::N1 },
        Key::ViaConns { via: Via::PodAddress },
        Key::ViaConns { via: Via::Service },
        Key::ViaEchoP50 { via: Via::Service },
        Key::ConnSetup { scraping: Scraping::Off, q: Quantile::P99 },
        Key::ConnSetup { scraping: Scraping::Every100Ms, q: Quantile::P99 },
    ] {
        assert!(median(k) > 0.0, "{k} = {}", median(k));
    }
    // Both agents were replaced under probes every 2 ms: none refused or reset.
    assert_eq!(median(Key::UpgradeFailed { path: Path::Mesh }), 0.0, "notes: {:?}", file.notes);
    assert!(median(Key::UpgradeMaxConnect { path: Path::Mesh }) > 0.0);
    // Percentiles are ordered, and the fixed-rate run really ran near its rate.
    let q = |p| median(lat(p));
    assert!(
        q(Quantile::P50) <= q(Quantile::P90)
            && q(Quantile::P90) <= q(Quantile::P99)
            && q(Quantile::P99) <= q(Quantile::P999)
    );
    let rps = median(Key::LatencyRate { case: Latency::CrossRate1000, path: Path::Mesh });
    assert!((500.0..=1100.0).contains(&rps), "fixed-rate run at {rps}/s, asked for 1000/s");
    // Every held connection was opened through the mesh.
    assert_eq!(median(Key::IdleConns), 1000.0);
    assert_eq!(median(Key::ScrapeHeldConns), 1000.0);
    let scraped = file.notes.iter().find(|n| n.contains("scrapes of the agents' /metrics")).expect("a scrape note");
    assert!(!scraped.starts_with("connection set-up with scraping: 0 "), "{scraped}");
    // With pooling off each connection made its own mutual-TLS session; pooled, almost none did.
    let fresh = median(Key::HandshakesPerConn { case: ConnRate::MeshFreshMtls });
    assert!((0.95..=1.05).contains(&fresh), "{fresh} handshakes per connection with --hbone-pooling false");
    assert!(median(Key::HandshakesPerConn { case: ConnRate::MeshPooled }) < 0.05);

    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("kernel: ") && md.contains("commit: "), "{md}");
    assert!(md.contains("throughput, cross-node, 1 connection"), "{md}");
    assert!(md.contains("through a Service address"), "{md}");
    assert!(md.contains("with /metrics scraped every 100 ms"), "{md}");
    let png = std::fs::read(out.join("chart.png")).unwrap();
    assert!(png.len() > 10_000 && png.starts_with(b"\x89PNG\r\n\x1a\n"), "chart.png is not a PNG");
    let _ = std::fs::remove_dir_all(&out);
}

fn tempfile_dir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("{PREFIX}bench-out-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}
