//! The agent's configuration: built once from the command line, validated, immutable, and
//! serialisable for the config dump. Only this module reads flags or the environment.

use std::path::{Path, PathBuf};

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// This node's name; workload records whose `node` differs are not captured here.
    #[arg(long)]
    pub node: String,
    /// cgroup v2 directory under which this node's pods live; the node-wide programs attach
    /// here. Default: the cgroup v2 mount point (found in /proc/self/mountinfo).
    #[arg(long)]
    pub cgroup_root: Option<PathBuf>,
    /// bpffs directory for this node's pins. Default: /sys/fs/bpf/sockmesh/<node>.
    #[arg(long)]
    pub bpffs_dir: Option<PathBuf>,
    /// YAML file of `kind: Workload` documents, the same as in the controller's config: this
    /// node's records (with netns and cgroup) are captured, the others are known as
    /// destinations until the controller's push, which is authoritative for identities.
    #[arg(long)]
    pub workloads: Option<PathBuf>,
    /// Capture the pods the controller pushes for this node (Kubernetes): each pod's cgroup is
    /// found by its UID under --cgroup-root (the host's cgroup v2 tree, either kubelet cgroup
    /// driver) and its netns from a process in that cgroup, through --host-proc.
    #[arg(long, default_value_t = false)]
    pub kubelet_pods: bool,
    /// The host's /proc (in a container: a read-only mount of it, e.g. /host/proc), where pods'
    /// processes and their network namespaces are found.
    #[arg(long, default_value = "/proc")]
    pub host_proc: PathBuf,
    /// A writable view of the network sysctls (`/proc/sys/net`), which the agent sets in each
    /// meshed pod's netns so that its apps can be dialled from their clients' addresses. A
    /// container's own `/proc/sys` is read-only: the DaemonSet mounts the host's
    /// `/proc/sys/net` (which shows the netns of whoever reads it) at `/host/sysctl-net`.
    #[arg(long, default_value = "/proc/sys/net")]
    pub sysctl_net: PathBuf,
    /// The host's network namespace, which no meshed pod may be in. Default: that of the
    /// host's PID 1 (<host-proc>/1/ns/net).
    #[arg(long)]
    pub host_netns: Option<PathBuf>,
    /// The DaemonSet this agent runs as, namespace/name (Kubernetes). When told to stop, the
    /// agent reads it once: while it exists (an upgrade, a drain) the programs stay attached;
    /// gone or being deleted (an uninstall), the agent detaches everything it pinned. Without
    /// this flag a stopping agent always keeps them.
    #[arg(long, value_name = "NAMESPACE/NAME")]
    pub daemonset: Option<String>,
    /// The Kubernetes API server for that read. Default: https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT.
    #[arg(long)]
    pub kube_api: Option<String>,
    /// The service-account token for that read.
    #[arg(long, default_value = "/var/run/secrets/kubernetes.io/serviceaccount/token")]
    pub kube_token_file: PathBuf,
    /// The cluster CA for that read.
    #[arg(long, default_value = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt")]
    pub kube_ca_file: PathBuf,
    /// Directory for run-time state (workloads added through the API). Default:
    /// /run/sockmesh/<node>.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Root-only Unix socket of the local API. Default: <state-dir>/agent.sock.
    #[arg(long)]
    pub api_socket: Option<PathBuf>,
    /// Most live intercepted connections on this node (size of the original-destination map);
    /// connections beyond it are refused and counted.
    #[arg(long, default_value_t = mesh_common::ORIG_DST_SIZE)]
    pub max_connections: u32,
    /// Most live intercepted connections of one workload: one pod's excess is refused (and
    /// counted) before it can take the node's map from the others. Default: a quarter of the
    /// node's default (16384), or --max-connections if that is lower.
    #[arg(long)]
    pub max_connections_per_workload: Option<u32>,
    /// Most meshed workloads on this node.
    #[arg(long, default_value_t = mesh_common::WORKLOADS_SIZE)]
    pub max_workloads: u32,
    /// The mesh's pod address ranges (repeat the flag for several). A destination inside them
    /// that is not a known workload is refused, never sent in plaintext; outside them an
    /// unknown destination is passed through as plain TCP.
    #[arg(long = "mesh-cidr", value_name = "CIDR")]
    pub mesh_cidrs: Vec<mesh_model::Cidr>,
    /// How long the agent waits for an upstream connect before refusing the client.
    #[arg(long, default_value_t = 5000)]
    pub connect_timeout_ms: u64,
    /// After handing over to a successor (an upgrade), how long established connections may
    /// run on through this agent; those still open then are closed and counted. Keep it below
    /// the pod's terminationGracePeriodSeconds.
    #[arg(long, default_value_t = 25)]
    pub drain_deadline_seconds: u64,
    /// Started beside a running agent (an upgrade): how long to wait until this one could
    /// serve every workload (a configuration, and a certificate each) before giving up. It
    /// then exits with what was missing, and the running agent serves on.
    #[arg(long, default_value_t = 120)]
    pub handover_wait_seconds: u64,
    /// How many endpoints of a Service one connection tries (each unreachable one is skipped)
    /// before the client is refused.
    #[arg(long, default_value_t = 3)]
    pub service_attempts: usize,
    /// Log lines as text or as one JSON object each.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// The controller's gRPC URL, e.g. https://10.0.0.1:15012. Several replicas: repeat the
    /// flag or separate the URLs with commas; the agent uses one at a time and moves to the
    /// next when it fails.
    #[arg(long, value_delimiter = ',', required = true)]
    pub controller: Vec<String>,
    /// The name the controller's serving certificate must carry.
    #[arg(long, default_value = "mesh-controller")]
    pub controller_name: String,
    /// PEM roots: the controller's and every workload certificate must chain to them.
    #[arg(long)]
    pub trust_bundle: PathBuf,
    /// File holding this node's credential for the controller (mode 0600).
    #[arg(long)]
    pub node_credential_file: PathBuf,
    /// The SPIFFE trust domain of this mesh's identities (the controller's --trust-domain).
    #[arg(long, default_value = "cluster.local")]
    pub trust_domain: String,
    /// Workload certificate lifetime to ask for; 0 = the CA's default.
    #[arg(long, default_value_t = 0)]
    pub cert_ttl_seconds: u64,
    /// How long a connection waits for its workload's first certificate before it is refused.
    #[arg(long, default_value_t = 5000)]
    pub cert_wait_ms: u64,
    /// Policies in this namespace without a selector apply to the whole mesh.
    #[arg(long, default_value = "sockmesh-system")]
    pub root_namespace: String,
    /// Admin API (config dump, workloads, certificates, connections); loopback only.
    #[arg(long, default_value = "127.0.0.1:15000")]
    pub admin_addr: std::net::SocketAddr,
    /// Prometheus metrics (/metrics).
    #[arg(long, default_value = "0.0.0.0:15020")]
    pub metrics_addr: std::net::SocketAddr,
    /// Readiness (/healthz/ready).
    #[arg(long, default_value = "0.0.0.0:15021")]
    pub readiness_addr: std::net::SocketAddr,
    /// Carry many connections over one mutual-TLS HBONE connection per (source workload,
    /// destination identity). `false` makes a fresh TLS handshake per connection (for
    /// measuring handshake cost; never faster).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub hbone_pooling: bool,
    /// With pooling, how many HBONE connections one (source workload, destination) may have at
    /// once: a new one is made while every existing one carries streams, and streams go to the
    /// least loaded. More than one lets the TLS work of concurrent connections between two pods
    /// run on several worker threads (with `--worker-threads` above 1). Default 1: on a 2-CPU
    /// host, 2 connections with 2 workers moved no more than 1 (docs/benchmarks.md).
    #[arg(long)]
    pub hbone_connections: Option<usize>,
    /// Send connections between two meshed pods of this node through mutual TLS too (to the
    /// agent itself), as if they crossed nodes. By default they are authenticated by kernel
    /// facts on both ends, authorized by the destination's policy and relayed without TLS:
    /// the bytes never leave the node.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    pub same_node_tls: bool,
    /// Threads that carry connections (the tokio runtime's workers). Default: 1 where the
    /// agent can use at most 2 CPUs (it shares them with the workloads it serves, and a second
    /// worker costs more in cross-thread wake-ups than it adds), else 2.
    #[arg(long)]
    pub worker_threads: Option<usize>,
    #[command(flatten)]
    pub limits: LimitArgs,
}

/// Bounds on what one client, one source address or one authenticated peer can make the agent
/// do. docs/security.md lists each, its default, and what happens when it is hit (each hit is
/// counted in `sockmesh_limit_hits_total`).
#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct LimitArgs {
    /// TLS handshakes in progress on the HBONE ports, all sources together. A connection
    /// beyond it is reset before any cryptographic work.
    #[arg(long, default_value_t = 1024)]
    pub max_pending_handshakes: usize,
    /// TLS handshakes in progress from one source address.
    #[arg(long, default_value_t = 64)]
    pub max_pending_handshakes_per_source: usize,
    /// New TLS handshakes per second from one source address, in bursts of up to twice this;
    /// 0 lifts the rate limit (for measuring fresh handshakes from one client).
    #[arg(long, default_value_t = 256)]
    pub handshakes_per_source_per_second: u32,
    /// How long the HBONE server's TLS handshake, and then the HTTP/2 preface and settings,
    /// may take each.
    #[arg(long, default_value_t = 10_000)]
    pub handshake_timeout_ms: u64,
    /// HBONE connections open from one authenticated peer (its identity, from one address).
    #[arg(long, default_value_t = 256)]
    pub max_connections_per_peer: usize,
    /// HBONE streams open from one authenticated peer, across its connections.
    #[arg(long, default_value_t = 1024)]
    pub max_streams_per_peer: usize,
    /// What one authenticated peer may have sent that the agent has not yet passed on, in MiB:
    /// the sum of the HTTP/2 receive windows of its connections. Each new connection's window
    /// is an eighth of what is left (at most 16 MiB, at least the protocol's 64 KiB).
    #[arg(long, default_value_t = 64)]
    pub peer_buffer_mib: u64,
    /// Plaintext connections (15006) open from one source address.
    #[arg(long, default_value_t = 1024)]
    pub max_plaintext_per_source: usize,
    /// An HBONE connection with no stream open for this long is closed (GOAWAY).
    #[arg(long, default_value_t = 300)]
    pub hbone_idle_timeout_seconds: u64,
    /// An inbound connection (an HBONE stream, plaintext, or from a pod of this node) that moves
    /// no byte either way for this long is closed.
    #[arg(long, default_value_t = 3600)]
    pub idle_timeout_seconds: u64,
}

impl LimitArgs {
    pub(crate) fn check(&self) -> Result<(), ConfigError> {
        let invalid = |setting, value: &dyn std::fmt::Debug, reason: &str| ConfigError::Invalid {
            setting,
            value: format!("{value:?}"),
            reason: reason.to_owned(),
        };
        let nonzero: [(&'static str, u64); 9] = [
            ("max-pending-handshakes", self.max_pending_handshakes as u64),
            ("max-pending-handshakes-per-source", self.max_pending_handshakes_per_source as u64),
            ("handshake-timeout-ms", self.handshake_timeout_ms),
            ("max-connections-per-peer", self.max_connections_per_peer as u64),
            ("max-streams-per-peer", self.max_streams_per_peer as u64),
            ("peer-buffer-mib", self.peer_buffer_mib),
            ("max-plaintext-per-source", self.max_plaintext_per_source as u64),
            ("hbone-idle-timeout-seconds", self.hbone_idle_timeout_seconds),
            ("idle-timeout-seconds", self.idle_timeout_seconds),
        ];
        for (setting, v) in nonzero {
            if v == 0 {
                return Err(invalid(setting, &v, "must be at least 1"));
            }
        }
        // A timeout meant as "never" must not overflow the clock: at most 30 days.
        for (setting, v) in [
            ("handshake-timeout-ms", self.handshake_timeout_ms / 1000),
            ("hbone-idle-timeout-seconds", self.hbone_idle_timeout_seconds),
            ("idle-timeout-seconds", self.idle_timeout_seconds),
        ] {
            if v > 30 * 24 * 3600 {
                return Err(invalid(setting, &v, "must be at most 30 days"));
            }
        }
        if self.peer_buffer_mib > 64 * 1024 {
            return Err(invalid("peer-buffer-mib", &self.peer_buffer_mib, "must be at most 65536 (64 GiB)"));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Config {
    pub node: String,
    pub cgroup_root: PathBuf,
    pub bpffs_dir: PathBuf,
    pub workloads_file: Option<PathBuf>,
    pub kubelet_pods: bool,
    pub host_proc: PathBuf,
    pub host_netns: PathBuf,
    pub sysctl_net: PathBuf,
    /// The agent's DaemonSet (namespace, name) and how to ask the API server about it.
    pub daemonset: Option<(String, String, crate::kubeapi::KubeApi)>,
    pub state_dir: PathBuf,
    pub api_socket: PathBuf,
    pub max_connections: u32,
    pub max_connections_per_workload: u32,
    pub max_workloads: u32,
    pub mesh_cidrs: Vec<mesh_model::Cidr>,
    pub connect_timeout_ms: u64,
    pub drain_deadline_seconds: u64,
    pub handover_wait_seconds: u64,
    pub service_attempts: usize,
    pub log_format: LogFormat,
    pub controller: Vec<String>,
    pub controller_name: String,
    pub trust_bundle: PathBuf,
    /// The path only: the credential itself never appears in the config dump or logs.
    pub node_credential_file: PathBuf,
    pub trust_domain: String,
    pub cert_ttl_seconds: u64,
    pub cert_wait_ms: u64,
    pub admin_addr: std::net::SocketAddr,
    pub metrics_addr: std::net::SocketAddr,
    pub readiness_addr: std::net::SocketAddr,
    pub root_namespace: String,
    pub hbone_pooling: bool,
    pub hbone_connections: usize,
    pub same_node_tls: bool,
    pub worker_threads: usize,
    pub limits: LimitArgs,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `value` is already quoted where quoting helps (it is the value's `Debug` form).
    #[error("--{setting} {value}: {reason}")]
    Invalid { setting: &'static str, value: String, reason: String },
    #[error("no cgroup v2 mount found in /proc/self/mountinfo; mount one or pass --cgroup-root")]
    NoCgroup2,
    #[error("{USE_NSENTER} (the agent looked for {what})", USE_NSENTER = mesh_api::host::USE_NSENTER)]
    SysRemounted { what: String },
}

impl Config {
    pub fn from_args(a: RunArgs) -> Result<Config, ConfigError> {
        let invalid = |setting, value: &dyn std::fmt::Debug, reason: &str| ConfigError::Invalid {
            setting,
            value: format!("{value:?}"),
            reason: reason.to_owned(),
        };
        if !mesh_model::workload::is_node_name(&a.node) {
            return Err(invalid("node", &a.node, "must be non-empty and use only letters, digits, '-', '.', '_'"));
        }
        let remounted = |what: String| ConfigError::SysRemounted { what };
        let cgroup_root = match a.cgroup_root {
            Some(p) => p,
            None if mesh_api::host::sys_remounted() => return Err(remounted("a cgroup v2 mount".into())),
            None => cgroup2_mount()?,
        };
        if !cgroup_root.join("cgroup.procs").exists() {
            if mesh_api::host::sys_remounted() {
                return Err(remounted(format!("--cgroup-root {}", cgroup_root.display())));
            }
            return Err(invalid("cgroup-root", &cgroup_root, "is not a cgroup v2 directory (no cgroup.procs)"));
        }
        if a.max_connections < 1 {
            return Err(invalid("max-connections", &a.max_connections, "must be at least 1"));
        }
        let worker_threads = match a.worker_threads {
            Some(n) if !(1..=64).contains(&n) => {
                return Err(invalid("worker-threads", &n, "must be between 1 and 64"));
            }
            Some(n) => n,
            None if std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) <= 2 => 1,
            None => 2,
        };
        let hbone_connections = match a.hbone_connections {
            Some(n) if !(1..=64).contains(&n) => {
                return Err(invalid("hbone-connections", &n, "must be between 1 and 64"));
            }
            Some(n) => n,
            None => 1,
        };
        let max_connections_per_workload = match a.max_connections_per_workload {
            None => mesh_common::WORKLOAD_CONNS_DEFAULT.min(a.max_connections),
            Some(n) if n < 1 || n > a.max_connections => {
                return Err(invalid(
                    "max-connections-per-workload",
                    &n,
                    &format!("must be between 1 and --max-connections ({})", a.max_connections),
                ));
            }
            Some(n) => n,
        };
        if !(1..=16).contains(&a.service_attempts) {
            return Err(invalid("service-attempts", &a.service_attempts, "must be between 1 and 16"));
        }
        a.limits.check()?;
        if a.max_workloads < 1 {
            return Err(invalid("max-workloads", &a.max_workloads, "must be at least 1"));
        }
        if let Some(w) = &a.workloads {
            if !w.is_file() {
                return Err(invalid("workloads", w, "no such file"));
            }
        }
        if !a.admin_addr.ip().is_loopback() {
            return Err(invalid(
                "admin-addr",
                &a.admin_addr,
                "must be a loopback address: the admin API has no authentication",
            ));
        }
        for url in &a.controller {
            if !url.starts_with("https://") {
                return Err(invalid("controller", url, "must be an https:// URL (the CA is only spoken to over TLS)"));
            }
        }
        for (setting, p) in [("trust-bundle", &a.trust_bundle), ("node-credential-file", &a.node_credential_file)] {
            if !p.is_file() {
                return Err(invalid(setting, p, "no such file"));
            }
        }
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&a.node_credential_file).map(|m| m.permissions().mode() & 0o777).unwrap_or(0);
            if mode & 0o077 != 0 {
                return Err(invalid(
                    "node-credential-file",
                    &a.node_credential_file,
                    &format!("is readable by group or others (mode {mode:o}); chmod 600 it"),
                ));
            }
        }
        let host_netns = a.host_netns.clone().unwrap_or_else(|| a.host_proc.join("1/ns/net"));
        if a.kubelet_pods {
            if !a.host_proc.join("self").exists() {
                return Err(invalid(
                    "host-proc",
                    &a.host_proc,
                    "is not a proc filesystem: pass the host's /proc (mounted read-only into the agent's container, e.g. at /host/proc)",
                ));
            }
            if let Err(e) = std::fs::metadata(&host_netns) {
                return Err(invalid(
                    "host-netns",
                    &host_netns,
                    &format!("cannot be read ({e}): the agent needs the host's /proc and CAP_SYS_PTRACE to tell the host's netns from a pod's"),
                ));
            }
        }
        let daemonset = match &a.daemonset {
            None => None,
            Some(d) => {
                let Some((ns, name)) = d.split_once('/').filter(|(n, m)| !n.is_empty() && !m.is_empty()) else {
                    return Err(invalid(
                        "daemonset",
                        d,
                        "expected namespace/name, e.g. sockmesh-system/sockmesh-agent",
                    ));
                };
                let url = match (&a.kube_api, std::env::var("KUBERNETES_SERVICE_HOST"), std::env::var("KUBERNETES_SERVICE_PORT")) {
                    (Some(u), _, _) => u.clone(),
                    (None, Ok(h), Ok(p)) if h.contains(':') => format!("https://[{h}]:{p}"),
                    (None, Ok(h), Ok(p)) => format!("https://{h}:{p}"),
                    _ => {
                        return Err(invalid(
                            "daemonset",
                            d,
                            "needs the API server: KUBERNETES_SERVICE_HOST/PORT are not set (not in a pod?); pass --kube-api",
                        ))
                    }
                };
                if !url.starts_with("https://") && !url.starts_with("http://") {
                    return Err(invalid("kube-api", &url, "must be an http(s):// URL"));
                }
                let api = crate::kubeapi::KubeApi {
                    url,
                    token_file: a.kube_token_file.clone(),
                    ca_file: a.kube_ca_file.clone(),
                };
                Some((ns.to_owned(), name.to_owned(), api))
            }
        };
        let bpffs_dir = a.bpffs_dir.unwrap_or_else(|| Path::new("/sys/fs/bpf/sockmesh").join(&a.node));
        let state_dir = a.state_dir.unwrap_or_else(|| Path::new("/run/sockmesh").join(&a.node));
        let api_socket = a.api_socket.unwrap_or_else(|| state_dir.join("agent.sock"));
        Ok(Config {
            node: a.node,
            cgroup_root,
            bpffs_dir,
            workloads_file: a.workloads,
            kubelet_pods: a.kubelet_pods,
            host_proc: a.host_proc,
            host_netns,
            sysctl_net: a.sysctl_net,
            daemonset,
            state_dir,
            api_socket,
            max_connections: a.max_connections,
            max_connections_per_workload,
            max_workloads: a.max_workloads,
            mesh_cidrs: a.mesh_cidrs,
            connect_timeout_ms: a.connect_timeout_ms,
            drain_deadline_seconds: a.drain_deadline_seconds,
            handover_wait_seconds: a.handover_wait_seconds,
            service_attempts: a.service_attempts,
            log_format: a.log_format,
            controller: a.controller,
            controller_name: a.controller_name,
            trust_bundle: a.trust_bundle,
            node_credential_file: a.node_credential_file,
            trust_domain: a.trust_domain,
            cert_ttl_seconds: a.cert_ttl_seconds,
            cert_wait_ms: a.cert_wait_ms,
            admin_addr: a.admin_addr,
            metrics_addr: a.metrics_addr,
            readiness_addr: a.readiness_addr,
            root_namespace: a.root_namespace,
            hbone_pooling: a.hbone_pooling,
            hbone_connections,
            same_node_tls: a.same_node_tls,
            worker_threads,
            limits: a.limits,
        })
    }
}

/// The cgroup v2 mount point, from /proc/self/mountinfo.
pub fn cgroup2_mount() -> Result<PathBuf, ConfigError> {
    mesh_api::host::cgroup2_mount().ok_or(ConfigError::NoCgroup2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    #[test]
    fn worker_threads_out_of_range_are_refused_with_the_flag_named() {
        use clap::Parser;
        let dir = std::env::temp_dir().join(format!("sockmesh-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("cgroup.procs"), "").unwrap();
        let args = |extra: &[&str]| {
            let mut v = vec!["agent", "--node", "n1", "--cgroup-root", dir.to_str().unwrap()];
            v.extend_from_slice(&["--controller", "https://c:15012", "--trust-bundle", "/nonexistent"]);
            v.extend_from_slice(&["--node-credential-file", "/nonexistent"]);
            v.extend_from_slice(extra);
            Cli::parse_from(v).run
        };
        let e = Config::from_args(args(&["--worker-threads", "0"])).unwrap_err().to_string();
        assert!(e.contains("--worker-threads") && e.contains("between 1 and 64"), "{e}");
        // Valid worker counts get past that check (and fail later, on the missing files),
        // and the path is quoted once.
        let e = Config::from_args(args(&["--worker-threads", "3"])).unwrap_err().to_string();
        assert_eq!(e, "--trust-bundle \"/nonexistent\": no such file");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
