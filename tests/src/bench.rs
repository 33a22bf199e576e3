//! What the benchmark (`sm-bench`) measures, as types: the key of every result and its
//! statistics. The benchmark writes `results.json` with these types and its test reads them
//! back with the same ones, so neither retypes the other's names.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Whether the client pod is meshed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Path {
    Direct,
    Mesh,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Throughput {
    /// Across nodes, one connection.
    Cross1,
    /// Across nodes, two connections at once.
    Cross2,
    /// Across nodes, eight connections at once.
    Cross8,
    /// Two pods of one node.
    Same,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Latency {
    /// Across nodes, the next request as soon as the answer arrives.
    CrossClosed,
    /// Across nodes, 1,000 requests a second.
    CrossRate1000,
    /// One node, closed loop.
    SameClosed,
    /// Across nodes, closed loop on each of 4 connections at once.
    CrossClosed4,
    /// Across nodes, closed loop on each of 16 connections at once.
    CrossClosed16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Quantile {
    P50,
    P90,
    P99,
    P999,
}

impl Quantile {
    pub const ALL: [Quantile; 4] = [Quantile::P50, Quantile::P90, Quantile::P99, Quantile::P999];

    pub fn as_str(self) -> &'static str {
        match self {
            Quantile::P50 => "p50",
            Quantile::P90 => "p90",
            Quantile::P99 => "p99",
            Quantile::P999 => "p999",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnRate {
    Direct,
    /// Through the mesh, streams on pooled mutual-TLS connections.
    MeshPooled,
    /// Through the mesh, a fresh mutual-TLS handshake per connection.
    MeshFreshMtls,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rss {
    /// Before any load.
    Start,
    /// After the load runs.
    Idle,
    /// While the idle connections are held.
    Held,
}

/// How a meshed client names the same destination pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Via {
    /// The pod's own address.
    PodAddress,
    /// A Service address whose only endpoint is that pod.
    Service,
}

/// Whether the agents' metrics were scraped while a measurement ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scraping {
    Off,
    /// Both agents' `/metrics`, every 100 ms.
    Every100Ms,
}

/// A node of the benchmark's topology.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Node {
    N1,
    N2,
}

/// One measured quantity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(tag = "what", rename_all = "snake_case")]
pub enum Key {
    /// Gbit/s.
    Throughput { case: Throughput, path: Path },
    /// Whole-machine CPU seconds per GB moved between two pods of one node.
    MachineCpuPerGb { path: Path },
    /// Both agents' CPU seconds per GB moved across nodes.
    AgentCpuPerGb,
    /// Both agents' CPU (vCPU: CPU seconds per second) per 1,000 requests a second, 1 KiB
    /// request/response across nodes at 1,000 a second.
    AgentCpuPer1kRps,
    /// Microseconds.
    Latency { case: Latency, path: Path, q: Quantile },
    /// Requests per second the latency run achieved.
    LatencyRate { case: Latency, path: Path },
    /// New connections per second.
    Conns { case: ConnRate },
    /// TLS sessions opened per new connection.
    HandshakesPerConn { case: ConnRate },
    /// Bytes.
    Rss { when: Rss, node: Node },
    /// Bytes of agent memory per idle proxied connection.
    MemPerConn { node: Node },
    /// How many idle connections were held.
    IdleConns,
    /// New connections per second through the mesh, to a pod by `via`.
    ViaConns { via: Via },
    /// 1 KiB echo p50 (µs), closed loop, through the mesh to a pod by `via`.
    ViaEchoP50 { via: Via },
    /// Probe connections (one every 2 ms, same node and cross-node) refused or reset while both
    /// nodes' agents were replaced by the hand-over; the direct path probed at the same time.
    UpgradeFailed { path: Path },
    /// The longest of those probes (µs), from connect() to the echoed answer.
    UpgradeMaxConnect { path: Path },
    /// A new meshed connection's set-up (µs, connect() to its 1 KiB answer; one at a time),
    /// with many idle connections held, with and without metrics scrapes.
    ConnSetup { scraping: Scraping, q: Quantile },
    /// How many idle connections were held while [`Key::ConnSetup`] was measured.
    ScrapeHeldConns,
}

impl fmt::Display for Key {
    /// A dotted name for reading (`latency.cross_closed.mesh.p50`), from the same names the
    /// JSON uses.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn n<T: Serialize>(v: &T) -> String {
            serde_json::to_value(v).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
        }
        match self {
            Key::Throughput { case, path } => write!(f, "throughput.{}.{}", n(case), n(path)),
            Key::MachineCpuPerGb { path } => write!(f, "machine_cpu_per_gb.{}", n(path)),
            Key::AgentCpuPerGb => f.write_str("agent_cpu_per_gb"),
            Key::AgentCpuPer1kRps => f.write_str("agent_cpu_per_1k_rps"),
            Key::Latency { case, path, q } => write!(f, "latency.{}.{}.{}", n(case), n(path), q.as_str()),
            Key::LatencyRate { case, path } => write!(f, "latency_rate.{}.{}", n(case), n(path)),
            Key::Conns { case } => write!(f, "conns.{}", n(case)),
            Key::HandshakesPerConn { case } => write!(f, "handshakes_per_conn.{}", n(case)),
            Key::Rss { when, node } => write!(f, "rss.{}.{}", n(when), n(node)),
            Key::MemPerConn { node } => write!(f, "mem_per_conn.{}", n(node)),
            Key::IdleConns => f.write_str("idle_conns"),
            Key::ViaConns { via } => write!(f, "via_conns.{}", n(via)),
            Key::ViaEchoP50 { via } => write!(f, "via_echo_p50.{}", n(via)),
            Key::UpgradeFailed { path } => write!(f, "upgrade_failed.{}", n(path)),
            Key::UpgradeMaxConnect { path } => write!(f, "upgrade_max_connect.{}", n(path)),
            Key::ConnSetup { scraping, q } => write!(f, "conn_setup.{}.{}", n(scraping), q.as_str()),
            Key::ScrapeHeldConns => f.write_str("scrape_held_conns"),
        }
    }
}

/// Median and spread of repeated measurements.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub samples: Vec<f64>,
}

impl Stat {
    pub fn of(mut v: Vec<f64>) -> Stat {
        if v.is_empty() {
            return Stat { median: f64::NAN, min: f64::NAN, max: f64::NAN, samples: v };
        }
        let samples = v.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        let n = v.len();
        let median = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 };
        Stat { median, min: v[0], max: v[n - 1], samples }
    }
}

/// Every result of a run.
#[derive(Clone, Debug, Default)]
pub struct Results(pub BTreeMap<Key, Stat>);

/// One result as written to results.json: the typed key, its dotted name for reading, the stat.
#[derive(Serialize, Deserialize)]
struct Entry {
    key: Key,
    name: String,
    #[serde(flatten)]
    stat: Stat,
}

impl Serialize for Results {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let entries: Vec<Entry> =
            self.0.iter().map(|(k, v)| Entry { key: *k, name: k.to_string(), stat: v.clone() }).collect();
        entries.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Results {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let entries = Vec::<Entry>::deserialize(d)?;
        Ok(Results(entries.into_iter().map(|e| (e.key, e.stat)).collect()))
    }
}

impl Results {
    pub fn insert(&mut self, key: Key, samples: Vec<f64>) {
        self.0.insert(key, Stat::of(samples));
    }

    pub fn get(&self, key: Key) -> Option<&Stat> {
        self.0.get(&key)
    }

    /// The median, NaN when not measured.
    pub fn median(&self, key: Key) -> f64 {
        self.get(key).map(|s| s.median).unwrap_or(f64::NAN)
    }
}

/// What `results.json` holds.
#[derive(Serialize, Deserialize)]
pub struct ResultsFile {
    pub results: Results,
    pub machine: serde_json::Value,
    pub notes: Vec<String>,
}

fn sh_out(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// What a benchmark report records of the machine and the code: CPUs and their model (the
/// machines of this kind differ), memory, kernel, commit, date.
pub fn machine() -> serde_json::Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned()))
        .unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo").unwrap_or_default().lines().next().unwrap_or("").to_owned();
    let dirty = !sh_out("git", &["status", "--porcelain", "--untracked-files=no"]).is_empty();
    serde_json::json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu_model": cpu,
        "memory": mem.trim_start_matches("MemTotal:").trim(),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "commit": format!("{}{}", sh_out("git", &["rev-parse", "--short", "HEAD"]), if dirty { " (with uncommitted changes)" } else { "" }),
        "date": sh_out("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_read_as_dotted_names_and_round_trip() {
        let k = Key::Latency { case: Latency::CrossClosed, path: Path::Mesh, q: Quantile::P50 };
        assert_eq!(k.to_string(), "latency.cross_closed.mesh.p50");
        let mut r = Results::default();
        r.insert(k, vec![3.0, 1.0, 2.0]);
        r.insert(Key::IdleConns, vec![1000.0]);
        let back: Results = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back.median(k), 2.0);
        assert_eq!(back.median(Key::IdleConns), 1000.0);
        assert_eq!(Key::ViaConns { via: Via::Service }.to_string(), "via_conns.service");
        assert!(back.median(Key::AgentCpuPerGb).is_nan());
    }
}
