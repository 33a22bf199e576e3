//! The composition root: the agent's state (local workloads and the datapath) and what it
//! does when a workload appears or goes. Returns what tests and the API need to reach it.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use mesh_common::{InboundKey, HBONE_PORT, INBOUND_PORT, OUTBOUND_PORT};
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::ebpf::{self, Datapath};
use crate::identity::Identities;
use crate::netns::{self, NetnsWorker};
use crate::proxy::{self, RefuseReason};
use mesh_model::{Workload, WorkloadError, WorkloadKey};

/// A workload this agent captures, with the kernel objects that tie it to traffic.
pub struct LocalWorkload {
    pub key: WorkloadKey,
    pub workload: Workload,
    /// Echoed by connect4/6 into each original destination; checked at accept.
    pub id: u32,
    pub cgroup_id: u64,
    pub netns: NetnsWorker,
    pub netns_cookie: u64,
    /// The identity its certificate carries.
    pub spiffe_id: mesh_identity::SpiffeId,
    inbound_keys: Vec<InboundKey>,
    pin_name: String,
}

struct Registered {
    wl: Arc<LocalWorkload>,
    tasks: Vec<JoinHandle<()>>,
    /// Added through the API (persisted in the state file) rather than the workloads file.
    runtime: bool,
}

#[derive(Default)]
pub struct Stats {
    pub outbound: AtomicU64,
    pub inbound: AtomicU64,
    refused: Mutex<BTreeMap<&'static str, u64>>,
    handshake_failures: Mutex<BTreeMap<&'static str, u64>>,
    pub metrics: crate::metrics::Metrics,
    live: Mutex<BTreeMap<u64, (Arc<crate::proxy::ConnRecord>, std::time::SystemTime)>>,
    next_live: AtomicU64,
}

/// A connection being relayed, listed by the admin API until dropped.
pub struct LiveConn {
    agent: Arc<Agent>,
    id: u64,
}

impl Drop for LiveConn {
    fn drop(&mut self) {
        self.agent.stats.live.lock().unwrap().remove(&self.id);
    }
}

impl Stats {
    pub fn refused(&self, reason: RefuseReason) {
        self.refused_label(reason.as_str());
    }
    pub fn refused_label(&self, reason: &'static str) {
        *self.refused.lock().unwrap().entry(reason).or_default() += 1;
    }
    pub fn handshake_failed(&self, direction: &'static str, reason: &'static str) {
        *self.handshake_failures.lock().unwrap().entry(reason).or_default() += 1;
        self.metrics.handshake_failed(direction, reason);
    }
    pub fn snapshot(&self) -> serde_json::Value {
        serde_json::json!({
            "outbound_accepted": self.outbound.load(Ordering::Relaxed),
            "inbound_accepted": self.inbound.load(Ordering::Relaxed),
            "refused": *self.refused.lock().unwrap(),
            "inbound_handshake_failures": *self.handshake_failures.lock().unwrap(),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error(transparent)]
    Invalid(#[from] WorkloadError),
    #[error("workload {0} is already registered; remove it first")]
    Exists(WorkloadKey),
    #[error("workload {0} is not registered")]
    NotFound(WorkloadKey),
    #[error(
        "workload {key}: its netns {netns} is already used by workload {other}; one workload per network namespace"
    )]
    SharedNetns { key: WorkloadKey, netns: String, other: WorkloadKey },
    #[error("workload {key}: cgroup {path}: {source}")]
    Cgroup { key: WorkloadKey, path: PathBuf, source: std::io::Error },
    #[error("workload {key}: {source}")]
    Netns { key: WorkloadKey, source: netns::NetnsError },
    #[error("workload {key}: cannot listen on {addr} in its netns: {source}; is another process using the mesh's ports there?")]
    Listen { key: WorkloadKey, addr: SocketAddr, source: std::io::Error },
    #[error("workload {key}: its identity is not a valid SPIFFE ID: {source}")]
    Identity { key: WorkloadKey, source: mesh_identity::SpiffeError },
    #[error("workload {key}: {source}")]
    Ebpf { key: WorkloadKey, source: Box<ebpf::EbpfError> },
    #[error("workload {0} was added from the workloads file; edit that file instead")]
    FromFile(WorkloadKey),
    #[error("cannot write state file {path}: {source}")]
    State { path: PathBuf, source: std::io::Error },
}

pub struct Agent {
    pub config: Config,
    datapath: Mutex<Datapath>,
    registered: Mutex<BTreeMap<WorkloadKey, Registered>>,
    /// The registered workloads by address: every outbound connection asks whether its
    /// destination is on this node.
    local_ips: Mutex<std::collections::HashMap<IpAddr, Arc<LocalWorkload>>>,
    /// Every known workload address (local or not) -> workload: where a destination address
    /// leads and which identity it must prove.
    known: Mutex<BTreeMap<IpAddr, Workload>>,
    pub stats: Stats,
    pub identities: Arc<Identities>,
    pub pool: proxy::tunnel::Pool,
    links: Vec<ebpf::LinkReport>,
    policy: std::sync::RwLock<Arc<crate::policy::PolicyState>>,
    policy_connected: std::sync::atomic::AtomicBool,
    pub push_lag_ms: AtomicU64,
    /// Serialises registration so that add/remove never interleave half-way.
    register_lock: tokio::sync::Mutex<()>,
}

impl Agent {
    pub fn new(
        config: Config,
        datapath: Datapath,
        identities: Arc<Identities>,
        links: Vec<ebpf::LinkReport>,
    ) -> Arc<Self> {
        let pooling = config.hbone_pooling;
        Arc::new(Agent {
            config,
            datapath: Mutex::new(datapath),
            registered: Mutex::new(BTreeMap::new()),
            local_ips: Default::default(),
            known: Mutex::new(BTreeMap::new()),
            stats: Stats::default(),
            identities,
            pool: proxy::tunnel::Pool::new(pooling),
            links,
            policy: Default::default(),
            policy_connected: Default::default(),
            push_lag_ms: AtomicU64::new(0),
            register_lock: tokio::sync::Mutex::new(()),
        })
    }

    pub fn datapath(&self) -> MutexGuard<'_, Datapath> {
        self.datapath.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn connect_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.config.connect_timeout_ms)
    }

    /// The node-wide links: whether this agent took them over, and whether they are still
    /// pinned (attached).
    pub fn links_json(&self) -> serde_json::Value {
        serde_json::Value::Array(
            self.links
                .iter()
                .map(|l| {
                    serde_json::json!({
                        "name": l.name,
                        "adopted": l.adopted,
                        "attached": self.config.bpffs_dir.join("links").join(l.name).exists(),
                    })
                })
                .collect(),
        )
    }

    /// Shares the connection's record (no copy of its strings per live connection).
    pub fn track(self: &Arc<Self>, rec: &Arc<crate::proxy::ConnRecord>) -> LiveConn {
        let id = self.stats.next_live.fetch_add(1, Ordering::Relaxed);
        self.stats.live.lock().unwrap().insert(id, (rec.clone(), std::time::SystemTime::now()));
        LiveConn { agent: self.clone(), id }
    }

    /// The connections being relayed now.
    pub fn connections_json(&self) -> serde_json::Value {
        let now = std::time::SystemTime::now();
        let live = self.stats.live.lock().unwrap();
        serde_json::Value::Array(
            live.values()
                .map(|(r, since)| {
                    serde_json::json!({
                        "direction": r.direction,
                        "srcWorkload": r.src_workload,
                        "srcPrincipal": r.src_principal,
                        "srcAddr": r.src_addr,
                        "dstWorkload": r.dst_workload,
                        "dstPrincipal": r.dst_principal,
                        "origDst": r.orig_dst,
                        "security": r.security,
                        "ageMs": now.duration_since(*since).map(|d| d.as_millis() as u64).unwrap_or(0),
                    })
                })
                .collect(),
        )
    }

    /// Refreshes the metrics read at scrape time (kernel counters, map fill, certificates).
    pub fn refresh_metrics(&self) {
        let m = &self.stats.metrics;
        {
            let dp = self.datapath();
            for (name, v) in dp.counters() {
                m.set_kernel_counter(name, v);
            }
            for (map, n) in dp.map_fill() {
                m.set_map(map, n, self.map_capacity(map));
            }
        }
        m.set_push_lag(self.push_lag_ms.load(Ordering::Relaxed), self.policy_state().version);
        for c in self.identities.certs_json().as_array().into_iter().flatten() {
            if let (Some(id), Some(na)) = (c["identity"].as_str(), c["notAfter"].as_i64()) {
                m.set_cert_expiry(id, na);
            }
        }
    }

    fn map_capacity(&self, map: &str) -> u32 {
        match map {
            mesh_common::ORIG_DST => self.config.max_connections,
            mesh_common::ORIG_DST_BY_PORT => mesh_common::orig_dst_by_port_size(self.config.max_connections),
            _ => self.config.max_workloads,
        }
    }

    /// Ready: the programs are attached (pins present) and every local workload has a
    /// certificate. Returns what is missing otherwise.
    pub fn readiness(&self) -> Result<(), Vec<String>> {
        let mut missing = Vec::new();
        for pin in ["connect4", "connect6", "sock_ops", "sock_release"] {
            if !self.config.bpffs_dir.join("links").join(pin).exists() {
                missing.push(format!("{pin} program not attached"));
            }
        }
        for r in self.registered.lock().unwrap().values() {
            if self.identities.current(&r.wl.spiffe_id).is_none() {
                missing.push(format!("{} has no certificate", r.wl.key));
            }
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(missing)
        }
    }

    /// The meshed workload at a destination address, if any: from the controller's push, or
    /// the local workloads file.
    pub fn destination(&self, ip: IpAddr) -> Option<Workload> {
        if let Some(w) = self.policy_state().workloads.get(&ip) {
            return Some(w.clone());
        }
        self.known.lock().unwrap().get(&ip).cloned()
    }

    /// The workload registered on this node at `ip`, if any: the agent holds its netns, so a
    /// connection to it need not leave the node.
    pub fn local_workload_at(&self, ip: IpAddr) -> Option<Arc<LocalWorkload>> {
        self.local_ips.lock().unwrap().get(&ip).cloned()
    }

    pub fn policy_state(&self) -> Arc<crate::policy::PolicyState> {
        self.policy.read().unwrap().clone()
    }

    pub fn set_policy_state(&self, s: crate::policy::PolicyState, lag_ms: i64) {
        *self.policy.write().unwrap() = Arc::new(s);
        self.policy_connected.store(true, Ordering::Relaxed);
        self.push_lag_ms.store(lag_ms as u64, Ordering::Relaxed);
    }

    /// Whether a push has been received since the last reconnect attempt (resets backoff).
    pub fn policy_connected(&self) -> bool {
        self.policy_connected.swap(false, Ordering::Relaxed)
    }

    /// Decides a connection to a local workload, logging what AUDIT and dry-run policies saw.
    pub fn authorize(&self, wl: &LocalWorkload, facts: &mesh_model::authz::Facts<'_>) -> mesh_model::authz::Verdict {
        let state = self.policy_state();
        // Labels select policies; the controller's record is current (a label change there
        // applies at once), the local record is the fallback. Identity never comes from labels.
        let labels = state.by_key.get(&wl.key).map(|w| &w.labels).unwrap_or(&wl.workload.labels);
        let policies = state.index.for_workload(&wl.workload.namespace, labels);
        let v = mesh_model::authz::authorize(facts, &policies);
        for name in &v.audited {
            tracing::info!(target: "policy", policy = %name, workload = %wl.key, principal = facts.principal.unwrap_or("-"), source = %facts.source_ip, port = facts.dst_port, "AUDIT policy matched");
        }
        for (name, action, matched) in &v.dry_run {
            tracing::info!(target: "policy", policy = %name, action = ?action, matched, workload = %wl.key, principal = facts.principal.unwrap_or("-"), source = %facts.source_ip, port = facts.dst_port, "dry-run policy evaluated (not enforced)");
        }
        v
    }

    pub fn mtls_mode(&self, wl: &LocalWorkload, port: u16) -> mesh_model::policy::MtlsMode {
        let state = self.policy_state();
        let w = state.by_key.get(&wl.key).unwrap_or(&wl.workload);
        state.mtls_mode(&self.config.root_namespace, w, port)
    }

    /// The policies that select this node's workloads, for the admin API.
    pub fn policies_json(&self) -> serde_json::Value {
        let state = self.policy_state();
        let reg = self.registered.lock().unwrap();
        let mut out = BTreeMap::new();
        for r in reg.values() {
            let labels = state.by_key.get(&r.wl.key).map(|w| &w.labels).unwrap_or(&r.wl.workload.labels);
            let ps = state.index.for_workload(&r.wl.workload.namespace, labels);
            for (list, action) in
                [(&ps.deny, "DENY"), (&ps.allow, "ALLOW"), (&ps.audit, "AUDIT"), (&ps.dry_run, "DRY-RUN")]
            {
                for p in list {
                    let e = out.entry(p.name.clone()).or_insert_with(|| serde_json::json!({"namespace": p.namespace, "name": p.name.split('/').nth(1).unwrap_or(""), "kind": "AuthorizationPolicy", "action": action, "workloads": []}));
                    e["workloads"].as_array_mut().unwrap().push(serde_json::json!(r.wl.key.to_string()));
                }
            }
        }
        for (i, e) in state.errors.iter().enumerate() {
            out.insert(format!("~invalid-{i:04}"), serde_json::json!({"namespace": "-", "name": e, "kind": "rejected", "action": "INVALID", "workloads": []}));
        }
        for (ns, name, spec) in &state.peer {
            out.insert(format!("{ns}/{name}#pa"), serde_json::json!({"namespace": ns, "name": name, "kind": "PeerAuthentication", "action": format!("mtls {:?}", spec.mtls.as_ref().map(|m| m.mode).unwrap_or_default()).to_uppercase(), "workloads": []}));
        }
        serde_json::Value::Array(out.into_values().collect())
    }

    fn state_file(&self) -> PathBuf {
        self.config.state_dir.join("workloads.json")
    }

    /// Workloads added through the API by a previous run of this agent.
    pub fn load_runtime_state(&self) -> Vec<Workload> {
        match std::fs::read(self.state_file()) {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(v) => v,
                Err(e) => {
                    tracing::error!(path = %self.state_file().display(), error = %e, "ignoring unreadable state file");
                    Vec::new()
                }
            },
            Err(_) => Vec::new(),
        }
    }

    fn save_runtime_state(&self) -> Result<(), RegisterError> {
        let list: Vec<Workload> =
            self.registered.lock().unwrap().values().filter(|r| r.runtime).map(|r| r.wl.workload.clone()).collect();
        let path = self.state_file();
        let tmp = path.with_extension("json.tmp");
        let write = || -> std::io::Result<()> {
            std::fs::create_dir_all(&self.config.state_dir)?;
            std::fs::write(&tmp, serde_json::to_vec_pretty(&list)?)?;
            std::fs::rename(&tmp, &path)
        };
        write().map_err(|source| RegisterError::State { path, source })
    }

    /// Records workloads that run elsewhere (for attribution only).
    pub fn set_known(&self, all: &[Workload]) {
        let mut known = self.known.lock().unwrap();
        for w in all {
            for ip in &w.ips {
                known.insert(*ip, w.clone());
            }
        }
    }

    pub async fn add_workload(
        self: &Arc<Self>,
        w: Workload,
        runtime: bool,
    ) -> Result<Arc<LocalWorkload>, RegisterError> {
        let _guard = self.register_lock.lock().await;
        let key = w.key();
        w.validate(&self.config.node)?;
        if w.is_local_to(&self.config.node) {
            w.check_local_objects()?;
        }
        if !w.is_local_to(&self.config.node) {
            self.set_known(std::slice::from_ref(&w));
            return Err(RegisterError::Invalid(WorkloadError::Invalid {
                key: key.to_string(),
                reason: format!(
                    "runs on node {:?}, not on this node {:?}",
                    w.node.as_deref().unwrap_or(""),
                    self.config.node
                ),
            }));
        }
        let netns_path = w.netns.clone().expect("validated");
        let cgroup_path = w.cgroup.clone().expect("validated");
        {
            let reg = self.registered.lock().unwrap();
            if reg.contains_key(&key) {
                return Err(RegisterError::Exists(key));
            }
            let ino = |p: &std::path::Path| std::fs::metadata(p).map(|m| std::os::unix::fs::MetadataExt::ino(&m)).ok();
            let mine = ino(&netns_path);
            if let Some(other) = reg.values().find(|r| mine.is_some() && ino(r.wl.netns.path()) == mine) {
                return Err(RegisterError::SharedNetns {
                    key,
                    netns: netns_path.display().to_string(),
                    other: other.wl.key.clone(),
                });
            }
        }
        let cgroup_id = ebpf::cgroup_id(&cgroup_path).map_err(|source| RegisterError::Cgroup {
            key: key.clone(),
            path: cgroup_path.clone(),
            source,
        })?;
        let netns_path2 = netns_path.clone();
        let worker = tokio::task::spawn_blocking(move || NetnsWorker::spawn(&netns_path2))
            .await
            .expect("netns spawn task")
            .map_err(|source| RegisterError::Netns { key: key.clone(), source })?;

        // Listeners first: by the time the kernel redirects anything, someone is listening.
        let listeners = worker
            .run(bind_listeners)
            .await
            .map_err(|source| RegisterError::Netns { key: key.clone(), source })?
            .map_err(|(addr, source)| RegisterError::Listen { key: key.clone(), addr, source })?;
        let netns_cookie =
            netns::socket_netns_cookie(&listeners.outbound[0]).map_err(|source| RegisterError::Netns {
                key: key.clone(),
                source: netns::NetnsError::Enter { path: netns_path.clone(), source },
            })?;

        let spiffe_id =
            mesh_identity::SpiffeId::workload(self.identities.trust_domain(), &w.namespace, &w.service_account)
                .map_err(|source| RegisterError::Identity { key: key.clone(), source })?;
        let id = self.allocate_id(&key);
        let pin_name = format!("{}_{}", key.namespace, key.name);
        let inbound_keys: Vec<InboundKey> = w.ips.iter().map(|ip| inbound_key(*ip)).collect();
        let wl = Arc::new(LocalWorkload {
            key: key.clone(),
            spiffe_id: spiffe_id.clone(),
            workload: w.clone(),
            id,
            cgroup_id,
            netns: worker,
            netns_cookie,
            inbound_keys: inbound_keys.clone(),
            pin_name: pin_name.clone(),
        });

        let attach = (|| -> Result<bool, ebpf::EbpfError> {
            let mut dp = self.datapath();
            for k in &inbound_keys {
                dp.set_inbound_listener(*k, &listeners.inbound)?;
            }
            let adopted = dp.attach_sk_lookup(&pin_name, wl.netns.file())?;
            dp.add_workload_cgroup(cgroup_id, id)?;
            Ok(adopted)
        })();
        let adopted = match attach {
            Ok(a) => a,
            Err(source) => {
                self.release_kernel_state(&wl);
                return Err(RegisterError::Ebpf { key, source: Box::new(source) });
            }
        };

        let mut tasks = Vec::new();
        for l in listeners.outbound {
            let l = tokio::net::TcpListener::from_std(l).expect("nonblocking listener");
            tasks.push(tokio::spawn(proxy::outbound::serve(self.clone(), wl.clone(), l)));
        }
        let inbound = tokio::net::TcpListener::from_std(listeners.inbound).expect("nonblocking listener");
        tasks.push(tokio::spawn(proxy::inbound::serve(self.clone(), wl.clone(), inbound)));
        let hbone = tokio::net::TcpListener::from_std(listeners.hbone).expect("nonblocking listener");
        tasks.push(tokio::spawn(proxy::hbone::serve(self.clone(), wl.clone(), hbone)));
        self.identities.acquire(&spiffe_id);

        self.set_known(std::slice::from_ref(&w));
        self.local_ips.lock().unwrap().extend(w.ips.iter().map(|ip| (*ip, wl.clone())));
        self.registered.lock().unwrap().insert(key.clone(), Registered { wl: wl.clone(), tasks, runtime });
        if runtime {
            self.save_runtime_state()?;
        }
        tracing::info!(workload = %key, cgroup_id, netns_cookie, id, sk_lookup_adopted = adopted, "workload captured");
        Ok(wl)
    }

    pub async fn remove_workload(&self, key: &WorkloadKey, from_api: bool) -> Result<(), RegisterError> {
        let _guard = self.register_lock.lock().await;
        let reg = {
            let mut all = self.registered.lock().unwrap();
            match all.get(key) {
                None => return Err(RegisterError::NotFound(key.clone())),
                Some(r) if from_api && !r.runtime => return Err(RegisterError::FromFile(key.clone())),
                Some(_) => all.remove(key).expect("present"),
            }
        };
        // Reverse order of add: stop redirecting, stop steering, then close the listeners.
        self.release_kernel_state(&reg.wl);
        for t in reg.tasks {
            t.abort();
        }
        self.identities.release(&reg.wl.spiffe_id);
        {
            let mut known = self.known.lock().unwrap();
            let mut local = self.local_ips.lock().unwrap();
            for ip in &reg.wl.workload.ips {
                known.remove(ip);
                local.remove(ip);
            }
        }
        if reg.runtime {
            self.save_runtime_state()?;
        }
        tracing::info!(workload = %key, "workload released");
        Ok(())
    }

    fn release_kernel_state(&self, wl: &LocalWorkload) {
        let mut dp = self.datapath();
        if let Err(e) = dp.remove_workload_cgroup(wl.cgroup_id) {
            tracing::error!(workload = %wl.key, error = %e, "could not remove the workload's cgroup entry");
        }
        dp.detach_sk_lookup(&wl.pin_name);
        for k in &wl.inbound_keys {
            dp.remove_inbound_listener(k);
        }
    }

    /// After start-up registration: removes what a previous agent left for workloads that no
    /// longer exist (map entries, sk_lookup links).
    pub fn sweep_stale(&self) {
        let reg = self.registered.lock().unwrap();
        let cgroups: Vec<u64> = reg.values().map(|r| r.wl.cgroup_id).collect();
        let pins: Vec<&str> = reg.values().map(|r| r.wl.pin_name.as_str()).collect();
        let keys: Vec<InboundKey> = reg.values().flat_map(|r| r.wl.inbound_keys.iter().copied()).collect();
        let mut dp = self.datapath();
        for (cg, _) in dp.workload_cgroups() {
            if !cgroups.contains(&cg) {
                tracing::info!(cgroup_id = cg, "removing stale workload entry");
                let _ = dp.remove_workload_cgroup(cg);
            }
        }
        for pin in dp.sk_lookup_pins() {
            if !pins.contains(&pin.as_str()) {
                tracing::info!(pin, "removing stale sk_lookup link");
                dp.detach_sk_lookup(&pin);
            }
        }
        for k in dp.inbound_keys() {
            if !keys.contains(&k) {
                dp.remove_inbound_listener(&k);
            }
        }
    }

    fn allocate_id(&self, key: &WorkloadKey) -> u32 {
        let reg = self.registered.lock().unwrap();
        let mut id = fnv1a(key.to_string().as_bytes()).max(1);
        while reg.values().any(|r| r.wl.id == id) {
            id = id.wrapping_add(1).max(1);
        }
        id
    }

    pub fn workloads_json(&self) -> serde_json::Value {
        let reg = self.registered.lock().unwrap();
        serde_json::Value::Array(
            reg.values()
                .map(|r| {
                    serde_json::json!({
                        "namespace": r.wl.key.namespace,
                        "name": r.wl.key.name,
                        "serviceAccount": r.wl.workload.service_account,
                        "identity": r.wl.spiffe_id.to_string(),
                        "ips": r.wl.workload.ips,
                        "labels": r.wl.workload.labels,
                        "netns": r.wl.netns.path(),
                        "cgroupId": r.wl.cgroup_id,
                        "netnsCookie": r.wl.netns_cookie,
                        "source": if r.runtime { "api" } else { "file" },
                    })
                })
                .collect(),
        )
    }

    pub fn stats_json(&self) -> serde_json::Value {
        let dp = self.datapath();
        serde_json::json!({
            "node": self.config.node,
            "kernel": dp.counters(),
            "maps": dp.map_fill(),
            "agent": self.stats.snapshot(),
            "hbone": self.pool.stats_json(),
            "config": {"version": self.policy_state().version, "pushLagMs": self.push_lag_ms.load(Ordering::Relaxed)},
            "certificates": {
                "issued": self.identities.stats.issued.load(Ordering::Relaxed),
                "failures": *self.identities.stats.failures.lock().unwrap(),
            },
        })
    }
}

struct Listeners {
    outbound: Vec<std::net::TcpListener>,
    inbound: std::net::TcpListener,
    hbone: std::net::TcpListener,
}

/// Runs inside the workload's netns.
fn bind_listeners() -> Result<Listeners, (SocketAddr, std::io::Error)> {
    let v4_lo: SocketAddr = (std::net::Ipv4Addr::LOCALHOST, OUTBOUND_PORT).into();
    let mut outbound = vec![listen(v4_lo, false)?];
    // [::1] only if the pod has IPv6 loopback; a v4-only pod never connects over v6.
    if let Ok(l) = listen((Ipv6Addr::LOCALHOST, OUTBOUND_PORT).into(), true) {
        outbound.push(l);
    }
    let inbound = listen_any(INBOUND_PORT)?;
    let hbone = listen_any(HBONE_PORT)?;
    Ok(Listeners { outbound, inbound, hbone })
}

/// A dual-stack wildcard listener (sk_lookup assigns both families to it), or IPv4 only when
/// the netns has IPv6 disabled.
fn listen_any(port: u16) -> Result<std::net::TcpListener, (SocketAddr, std::io::Error)> {
    listen((Ipv6Addr::UNSPECIFIED, port).into(), false)
        .or_else(|_| listen((std::net::Ipv4Addr::UNSPECIFIED, port).into(), false))
}

fn listen(addr: SocketAddr, v6only: bool) -> Result<std::net::TcpListener, (SocketAddr, std::io::Error)> {
    let mk = || -> std::io::Result<std::net::TcpListener> {
        let s = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        if addr.is_ipv6() {
            s.set_only_v6(v6only)?;
        }
        s.set_reuse_address(true)?;
        s.set_nonblocking(true)?;
        s.bind(&addr.into())?;
        s.listen(1024)?;
        Ok(s.into())
    };
    mk().map_err(|e| (addr, e))
}

fn inbound_key(ip: IpAddr) -> InboundKey {
    match ip {
        IpAddr::V4(v4) => InboundKey::v4(u32::from_ne_bytes(v4.octets())),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let mut w = [0u32; 4];
            for (i, c) in o.chunks(4).enumerate() {
                w[i] = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]);
            }
            InboundKey::v6(w)
        }
    }
}

fn fnv1a(bytes: &[u8]) -> u32 {
    let mut h: u32 = 0x811c9dc5;
    for b in bytes {
        h ^= *b as u32;
        h = h.wrapping_mul(0x01000193);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inbound_keys_match_what_sk_lookup_reads() {
        // sk_lookup's local_ip4 is the network-order word; on the host that is from_ne_bytes.
        let k = inbound_key("10.20.1.10".parse().unwrap());
        assert_eq!(k, InboundKey::v4(u32::from_ne_bytes([10, 20, 1, 10])));
        let k6 = inbound_key("fd00::1".parse().unwrap());
        assert_eq!(k6.family, mesh_common::AF_INET6 as u32);
        assert_eq!(k6.addr[0].to_ne_bytes(), [0xfd, 0, 0, 0]);
    }
}
