//! The composition root: builds the agent's parts from its configuration, wires them together,
//! starts its tasks, and returns what a caller (main, a test) needs to reach it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_api::admin::Source;
use tokio::task::JoinHandle;

use crate::admin::{self, Views};
use crate::config::Config;
use crate::config_watch::{ConfigFile, ConfigWatch};
use crate::connections::Connections;
use crate::ebpf::maps::{Census, Lookup, OrigDstTable};
use crate::ebpf::{self, Datapath, DatapathConfig};
use crate::hbone::pool::Pool;
use crate::identity::{Identities, IdentityConfig};
use crate::inputs::{Lifecycle, Phase, ProxyInputs, ProxySettings};
use crate::metrics::Metrics;
use crate::registration::{Registry, StateFile};
use crate::state::{ConfigState, StateStore};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Workloads(#[from] mesh_model::WorkloadError),
    #[error(transparent)]
    Datapath(#[from] ebpf::EbpfError),
    /// The kernel cannot run the datapath; the message says what was guarded.
    #[error("{0}")]
    Kernel(String),
    #[error("reading the trust bundle {path}: {source}")]
    TrustBundle { path: PathBuf, source: std::io::Error },
    #[error("identity: {0}")]
    Identity(#[from] crate::identity::InitError),
    #[error(transparent)]
    Bind(std::io::Error),
    #[error("binding the local API at {path}: {source}")]
    Api { path: PathBuf, source: std::io::Error },
}

/// A started agent. Its accept loops wait until `lifecycle` is set to serving.
pub struct Agent {
    pub admin_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub readiness_addr: SocketAddr,
    pub api_socket: PathBuf,
    /// Workloads that could not be captured at start (each logged with its reason).
    pub failed: usize,
    pub views: Arc<Views>,
    pub lifecycle: Arc<Lifecycle>,
    /// The node-wide listeners' descriptors (owned by `tasks`), by kind, for a successor.
    pub node_fds: Vec<(&'static str, RawFd)>,
    /// The tasks that serve the node-wide listeners, follow the controller, the pods and the
    /// local API, and run the census: stopped when this agent hands over.
    pub tasks: Vec<JoinHandle<()>>,
    /// Binds the local API at its path again (a successor that took it went away), and knows
    /// which socket file is this agent's.
    pub api_rebind: Arc<crate::api::Rebind>,
}

/// What a predecessor handed over: its node-wide listeners by kind, and each workload's by pin
/// name.
#[derive(Default)]
pub struct Handed {
    /// A predecessor runs beside this agent until it is told to stop.
    pub successor: bool,
    pub node: HashMap<String, OwnedFd>,
    pub workloads: HashMap<String, Vec<(String, OwnedFd)>>,
}

pub const ADMIN: &str = "admin";
pub const METRICS: &str = "metrics";
pub const READINESS: &str = "readiness";

/// The predecessor's listener of `kind` if it is bound where this agent would bind (in this
/// netns: a DaemonSet's surge pod has a netns of its own), else a new one.
async fn node_listener(
    handed: &mut HashMap<String, OwnedFd>,
    kind: &str,
    addr: SocketAddr,
) -> Result<tokio::net::TcpListener, StartError> {
    if let Some(fd) = handed.remove(kind) {
        let l = std::net::TcpListener::from(fd);
        let here = crate::netns::this_netns_cookie().ok();
        let same_netns = here.is_some() && crate::netns::socket_netns_cookie(&l).ok() == here;
        let same_addr = l.local_addr().ok() == Some(addr)
            || (addr.port() == 0 && l.local_addr().is_ok_and(|a| a.ip() == addr.ip()));
        if same_netns && same_addr {
            l.set_nonblocking(true).map_err(StartError::Bind)?;
            return tokio::net::TcpListener::from_std(l).map_err(StartError::Bind);
        }
        tracing::info!(kind, %addr, "the predecessor's listener is bound elsewhere (another netns, say); binding a new one");
    }
    admin::bind(addr, kind).await.map_err(StartError::Bind)
}

/// On a kernel that cannot run the datapath, the meshed workloads this agent knows of on its
/// node (its file's and those added through its API) fail closed anyway (P4): each cgroup gets
/// the guard that refuses TCP connects beyond loopback. Returns the refusal, extended with
/// what was guarded.
fn guard_workloads<'a>(cfg: &Config, workloads: impl Iterator<Item = &'a mesh_model::Workload>, why: String) -> String {
    let pin_dir = cfg.bpffs_dir.join("guard");
    let (mut guarded, mut failed) = (Vec::new(), Vec::new());
    for w in workloads.filter(|w| w.is_local_to(&cfg.node)) {
        let Some(cgroup) = &w.cgroup else { continue };
        let key = w.key();
        match mesh_api::kernel::guard(cgroup, &pin_dir, &format!("{}_{}", key.namespace, key.name)) {
            Ok(()) => guarded.push(key.to_string()),
            Err(e) => failed.push(format!("{key}: {e}")),
        }
    }
    let mut msg = why;
    if !guarded.is_empty() {
        msg += &format!(
            "\nFail closed: the TCP connections of {} ({}) beyond loopback are refused until an agent runs on this node; `mesh-agent uninstall --bpffs-dir {}` lifts this.",
            if guarded.len() == 1 { "this node's meshed workload".to_owned() } else { format!("this node's {} meshed workloads", guarded.len()) },
            guarded.join(", "),
            cfg.bpffs_dir.display()
        );
    }
    if !failed.is_empty() {
        msg += &format!("\nCould NOT guard, so these workloads' connections go out unmeshed: {}", failed.join("; "));
    }
    if guarded.is_empty() && failed.is_empty() {
        msg += "\nNo meshed workload with a cgroup is known on this node (none in --workloads, none added through the API), so none was guarded.";
    }
    msg
}

pub async fn start(cfg: Config, handed: Handed) -> Result<Agent, StartError> {
    let Handed { successor, node: mut handed_node, workloads: handed_workloads } = handed;
    let file_workloads = match &cfg.workloads_file {
        Some(p) => mesh_model::workload::parse_file(p)?,
        None => Vec::new(),
    };
    let metrics = Arc::new(Metrics::new());
    let loaded = Datapath::load(&DatapathConfig {
        bpffs_dir: &cfg.bpffs_dir,
        cgroup_root: &cfg.cgroup_root,
        max_connections: cfg.max_connections,
        max_workloads: cfg.max_workloads,
        pod_hook: cfg.kubelet_pods,
    });
    let (datapath, links) = match loaded {
        // The kernel cannot run the datapath: named by the probes, or refused by the verifier
        // in a way they did not foresee. Either way nothing of it is attached.
        Err(e @ (ebpf::EbpfError::Kernel(_) | ebpf::EbpfError::Program { .. })) => {
            let persisted = StateFile::new(&cfg.state_dir).load();
            let why = e.to_string();
            return Err(StartError::Kernel(guard_workloads(&cfg, file_workloads.iter().chain(&persisted), why)));
        }
        r => r?,
    };
    for l in &links {
        tracing::info!(link = l.name, adopted = l.adopted, "program attached");
    }
    let census = Arc::new(Mutex::new(Census::open(datapath.maps_dir(), datapath.live_counts().clone())?));
    let lookup = Lookup::probe(datapath.maps_dir())?;
    tracing::info!(?lookup, "where accepted connections' original destinations are found");
    let orig_dst = OrigDstTable::open(datapath.maps_dir(), lookup)?;
    let bundle = std::fs::read_to_string(&cfg.trust_bundle)
        .map_err(|source| StartError::TrustBundle { path: cfg.trust_bundle.clone(), source })?;
    let identities = Identities::new(
        IdentityConfig {
            controllers: cfg.controller.clone(),
            controller_name: cfg.controller_name.clone(),
            trust_domain: cfg.trust_domain.clone(),
            bundle_pems: vec![bundle],
            credential_file: cfg.node_credential_file.clone(),
            cert_ttl: (cfg.cert_ttl_seconds > 0).then(|| Duration::from_secs(cfg.cert_ttl_seconds)),
            wait: Duration::from_millis(cfg.cert_wait_ms),
        },
        metrics.clone(),
    )?;
    let state = Arc::new(StateStore::new(&cfg.trust_domain, &cfg.root_namespace));
    state.set_file_workloads(&file_workloads);
    // The last configuration, before anything is captured: a restarted agent enforces what it
    // enforced before, whether or not the controller is there.
    let config_file = ConfigFile::new(&cfg.state_dir);
    match config_file.load() {
        Ok(Some((version, resources))) => {
            match ConfigState::build(resources, version, &cfg.root_namespace, &cfg.trust_domain) {
                Ok(c) => {
                    tracing::info!(version, "configuration from the last run in force until the controller pushes");
                    identities.trust.set_meshes(&c.meshes);
                    state.set_config(c);
                    metrics.set_config(None, version);
                }
                Err(e) => {
                    tracing::error!(error = %e, "the configuration kept by the last run is not usable; waiting for the controller")
                }
            }
        }
        Ok(None) => {}
        Err(e) => tracing::error!(error = %e, "waiting for the controller"),
    }
    let conns = Arc::new(Connections::new(metrics.clone()));
    let loads = Arc::new(crate::balance::Loads::default());
    let inputs = Arc::new(ProxyInputs {
        settings: ProxySettings::from_config(&cfg),
        state: state.clone(),
        identities: identities.clone(),
        metrics: metrics.clone(),
        conns: conns.clone(),
        orig_dst,
        loads: loads.clone(),
        lifecycle: Arc::new(Lifecycle::new(Phase::Starting)),
        limits: crate::limits::Limits::new(cfg.limits.clone(), metrics.clone(), None),
        gateways: Arc::new(crate::gateway_health::GatewayHealth::new(
            metrics.clone(),
            state.clone(),
            Duration::from_millis(cfg.connect_timeout_ms),
        )),
    });
    let lifecycle = inputs.lifecycle.clone();
    let pool = Arc::new(Pool::new(cfg.hbone_pooling, cfg.hbone_connections, metrics.clone()));
    let state_file = StateFile::new(&cfg.state_dir);
    let registry = Arc::new(Registry::new(
        &cfg.node,
        cfg.max_connections_per_workload,
        cfg.sysctl_net.clone(),
        datapath,
        inputs,
        pool.clone(),
        state_file,
        cfg.kubelet_pods.then(|| crate::pods::Kubelet {
            cgroup_root: cfg.cgroup_root.clone(),
            proc_root: cfg.host_proc.clone(),
            host_netns: cfg.host_netns.clone(),
        }),
    ));

    registry.hand_in(handed_workloads);
    if successor {
        // The predecessor still serves: nothing of its may look stale to this agent yet.
        registry.set_hold(crate::registration::Hold::CleanupDeferred);
    }
    let admin_l = node_listener(&mut handed_node, ADMIN, cfg.admin_addr).await?;
    let metrics_l = node_listener(&mut handed_node, METRICS, cfg.metrics_addr).await?;
    let ready_l = node_listener(&mut handed_node, READINESS, cfg.readiness_addr).await?;
    let node_fds =
        vec![(ADMIN, admin_l.as_raw_fd()), (METRICS, metrics_l.as_raw_fd()), (READINESS, ready_l.as_raw_fd())];
    let api_l =
        crate::api::bind(&cfg.api_socket).map_err(|source| StartError::Api { path: cfg.api_socket.clone(), source })?;
    let addr = |l: &tokio::net::TcpListener| l.local_addr().map_err(StartError::Bind);
    let (admin_addr, metrics_addr, readiness_addr) = (addr(&admin_l)?, addr(&metrics_l)?, addr(&ready_l)?);

    let mut failed = 0;
    let local = file_workloads.into_iter().filter(|w| w.is_local_to(&cfg.node)).map(|w| (w, Source::File));
    let persisted = registry.persisted().into_iter().map(|w| (w, Source::Api));
    for (w, source) in local.chain(persisted) {
        let key = w.key();
        if let Err(e) = registry.add(w, source).await {
            // One broken record must not take the node's other workloads down.
            failed += 1;
            tracing::error!(workload = %key, error = %e, "cannot capture workload");
        }
    }
    // Pods are known from the configuration: with one kept from the last run they are captured
    // now, and what is left of pods that are gone is swept; without one the sweep waits for
    // the controller's (until then, a previous agent's entries keep refusing or capturing).
    let swept = if registry.follows_pods() {
        registry.follow_pods().await;
        state.load().config.version > 0
    } else {
        true
    };
    if swept {
        registry.sweep_stale().await;
    }
    let mut tasks = Vec::new();
    if registry.follows_pods() {
        tasks.push(tokio::spawn(registry.clone().watch_pods(swept)));
    }
    // Every workload of this node is captured or refused in place by now: a guard a refusing
    // agent left (on a kernel since replaced) can go.
    ebpf::remove_guard(&cfg.bpffs_dir);
    let views = Arc::new(Views {
        config: cfg.clone(),
        registry,
        identities: identities.clone(),
        conns,
        metrics: metrics.clone(),
        state: state.clone(),
        census: census.clone(),
        links,
        lookup,
        loads: loads.clone(),
        lifecycle: lifecycle.clone(),
    });
    let api_rebind = Arc::new(crate::api::Rebind::default());
    api_rebind.set_bound(crate::api::inode(&cfg.api_socket));
    tasks.push(tokio::spawn(crate::api::serve(views.clone(), api_l, cfg.api_socket.clone(), api_rebind.clone())));
    tasks.push(tokio::spawn(
        ConfigWatch {
            state,
            identities,
            metrics: metrics.clone(),
            pool,
            registry: views.registry.clone(),
            loads: loads.clone(),
            file: config_file,
        }
        .run(),
    ));
    tasks.push(tokio::spawn(admin::serve_admin(views.clone(), admin_l)));
    tasks.push(tokio::spawn(admin::serve_metrics(views.clone(), metrics_l)));
    tasks.push(tokio::spawn(crate::census::run(census, metrics, views.state.clone(), views.registry.clone())));
    tasks.push(tokio::spawn(admin::serve_readiness(views.clone(), ready_l)));
    tracing::info!(node = %cfg.node, failed, api = %cfg.api_socket.display(), "agent started");
    Ok(Agent {
        admin_addr,
        metrics_addr,
        readiness_addr,
        api_socket: cfg.api_socket,
        failed,
        views,
        lifecycle,
        node_fds,
        tasks,
        api_rebind,
    })
}
