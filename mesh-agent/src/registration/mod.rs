//! Registration: a workload appears (from the workloads file or the local API) and the agent
//! captures it — listeners in its netns first, then steering (sk_lookup), then redirection of
//! its cgroup — or it goes and all of that is undone in reverse. Also the start-up sweep of
//! what a previous agent left for workloads that no longer exist.
//!
//! A workload that cannot be captured fails closed: its cgroup stays redirected with a quota of
//! zero, so its connects are refused (never sent around the agent), it is reported in
//! readiness and counted, and capturing it is retried.
//!
//! One writer at a time (an async mutex around the datapath and the registered set); readers
//! see the result in the state snapshot.

mod capture;
mod listeners;
mod persist;
mod pods;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use mesh_api::admin::{Source, WorkloadInfo};
use mesh_common::InboundKey;
use mesh_model::{Workload, WorkloadError, WorkloadKey};
use tokio::task::JoinHandle;

use crate::ebpf::maps::LiveCounts;
use crate::ebpf::{self, Datapath};
use crate::hbone::pool::Pool;
use crate::identity::Identities;
use crate::inputs::ProxyInputs;
use crate::metrics::Metrics;
use crate::netns;
use crate::state::{LocalWorkload, StateStore};
pub use persist::StateFile;

#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error(transparent)]
    Invalid(#[from] WorkloadError),
    #[error("workload {key} runs on node {node:?}, not on this node {here:?}; register it on its own node")]
    OtherNode { key: WorkloadKey, node: String, here: String },
    #[error("workload {0} is already registered; remove it first")]
    Exists(WorkloadKey),
    #[error("workload {0} is not registered")]
    NotFound(WorkloadKey),
    #[error(
        "workload {key}: its netns {netns} is already used by workload {other}; one workload per network namespace"
    )]
    SharedNetns { key: WorkloadKey, netns: PathBuf, other: WorkloadKey },
    #[error("workload {key}: its cgroup {cgroup} is already used by workload {other}; one workload per cgroup")]
    SharedCgroup { key: WorkloadKey, cgroup: PathBuf, other: WorkloadKey },
    #[error(
        "workload {key}: every connection-count slot is in use (by workloads, or counting connections of removed ones until the census counts them off); raise --max-workloads, or wait a few seconds and it is retried"
    )]
    NoSlot { key: WorkloadKey },
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
    #[error("cannot write the state file {path}: {source}; the workload was not added")]
    State { path: PathBuf, source: std::io::Error },
    #[error("workload {0} is a pod (it has a podUid); this agent finds pods only when run with --kubelet-pods")]
    NoKubelet(WorkloadKey),
    #[error("pod {0} has no address yet; its connections are refused until it has one and is captured")]
    NoAddress(WorkloadKey),
    #[error("{key}: {source}")]
    Pod { key: WorkloadKey, source: Box<crate::pods::PodError> },
    #[error("workload {0}: this agent is handing over to a successor; ask the new agent")]
    HandingOver(WorkloadKey),
}

impl RegisterError {
    /// A bounded label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            RegisterError::Invalid(_) => "invalid",
            RegisterError::OtherNode { .. } => "other_node",
            RegisterError::Exists(_) => "exists",
            RegisterError::NotFound(_) => "not_found",
            RegisterError::SharedNetns { .. } => "shared_netns",
            RegisterError::SharedCgroup { .. } => "shared_cgroup",
            RegisterError::NoSlot { .. } => "no_slot",
            RegisterError::Cgroup { .. } => "cgroup",
            RegisterError::Netns { .. } => "netns",
            RegisterError::Listen { .. } => "listen",
            RegisterError::Identity { .. } => "identity",
            RegisterError::Ebpf { .. } => "ebpf",
            RegisterError::FromFile(_) => "from_file",
            RegisterError::State { .. } => "state_file",
            RegisterError::NoKubelet(_) => "not_kubelet",
            RegisterError::NoAddress(_) => "no_address",
            RegisterError::Pod { .. } => "pod",
            RegisterError::HandingOver(_) => "handing_over",
        }
    }

    /// Whether the workload fails closed after this error (its cgroup refused, unless another
    /// workload holds it; reported, counted and retried): every failure to capture a workload of
    /// this node, but not a request that was wrong about the workload's state (already
    /// registered, not found, another node's, not the API's to remove).
    fn fails_closed(&self) -> bool {
        !matches!(
            self,
            RegisterError::Exists(_)
                | RegisterError::NotFound(_)
                | RegisterError::OtherNode { .. }
                | RegisterError::FromFile(_)
                | RegisterError::HandingOver(_)
        )
    }
}

struct Registered {
    wl: Arc<LocalWorkload>,
    tasks: Vec<JoinHandle<()>>,
    /// Its listeners' descriptors (owned by `tasks`, valid while they run), by kind.
    fds: Vec<(&'static str, std::os::fd::RawFd)>,
}

/// A workload of this node that could not be captured.
struct Failed {
    workload: Workload,
    source: Source,
    /// The cgroup its record names, when it exists.
    wants: Option<u64>,
    /// The cgroup it holds, refused: the one it wants, unless another workload held that one
    /// when it failed (it inherits it, refused, when that workload lets go).
    cgroup_id: Option<u64>,
    /// The directory of `cgroup_id`, for a pod (found by its UID): while it exists the refusal
    /// is kept, even if a later look fails.
    held: Option<PathBuf>,
    reason: String,
    /// A pod that has no address yet: refused, but not a reason for the agent to be unready
    /// (a pod's network does not exist before its sandbox does).
    waiting: bool,
}

pub(crate) struct Inner {
    datapath: Datapath,
    registered: BTreeMap<WorkloadKey, Registered>,
    failed: BTreeMap<WorkloadKey, Failed>,
    /// The last connection-count slot given out (see `capture::allocate_slot`).
    next_slot: u32,
}

pub struct Registry {
    node: String,
    /// Where pods are found by UID (`--kubelet-pods`).
    kubelet: Option<crate::pods::Kubelet>,
    /// Each workload's quota of live intercepted connections.
    max_conns: u32,
    /// The network sysctls, as a workload's netns thread sees them (`--sysctl-net`).
    sysctl_net: std::path::PathBuf,
    state: Arc<StateStore>,
    identities: Arc<Identities>,
    metrics: Arc<Metrics>,
    inputs: Arc<ProxyInputs>,
    pool: Arc<Pool>,
    file: StateFile,
    live: Arc<LiveCounts>,
    inner: tokio::sync::Mutex<Inner>,
    /// Woken after a configuration change, for [`Registry::watch_pods`].
    pods_changed: tokio::sync::Notify,
    /// A predecessor's listeners, by pin name, until the workload they belong to is captured.
    handed: std::sync::Mutex<std::collections::HashMap<String, listeners::Handed>>,
    /// While two agents of this node overlap in a hand-over, see [`Hold`].
    hold: std::sync::atomic::AtomicU8,
}

/// What an agent refrains from while another agent of its node runs beside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    None = 0,
    /// Handing over: this agent changes nothing of the node's kernel state or its state
    /// directory any more (no captures, releases, retries, sweeps or reclaims; the local API
    /// refuses changes). What it holds it keeps serving. Lifted if the successor goes away.
    Frozen = 1,
    /// Taking over: this agent captures, but removes nothing another agent may still be using
    /// (no sweep of what looks stale, no lifting of refusals, no reclaiming of entries) until
    /// the predecessor has stopped and this agent's view is its own.
    CleanupDeferred = 2,
}

/// A failed workload (other than `holder`) whose record names cgroup `cg` and that holds none.
fn heir(inner: &Inner, cg: u64, holder: &WorkloadKey) -> Option<WorkloadKey> {
    inner
        .failed
        .iter()
        .find(|(k, f)| *k != holder && f.wants == Some(cg) && f.cgroup_id.is_none())
        .map(|(k, _)| k.clone())
}

/// `holder` no longer holds cgroup `cg` (its entry made with workload id `id`): a failed
/// workload whose record names it inherits it, refused in place; otherwise the entry goes.
fn let_go(inner: &mut Inner, cg: u64, holder: &WorkloadKey, id: u32) {
    match heir(inner, cg, holder) {
        Some(h) => {
            if let Err(e) = inner.datapath.set_workload_cgroup(cg, mesh_common::WORKLOAD_SLOT_REFUSED, 0) {
                tracing::error!(workload = %h, error = %e, "could not refuse the cgroup of a workload that failed to register");
            }
            if let Some(f) = inner.failed.get_mut(&h) {
                f.cgroup_id = Some(cg);
            }
        }
        None => {
            if let Err(e) = inner.datapath.remove_workload_cgroup(cg, id) {
                tracing::error!(workload = %holder, error = %e, "could not remove a cgroup entry");
            }
        }
    }
}

impl Registry {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        node: &str,
        max_conns: u32,
        sysctl_net: std::path::PathBuf,
        datapath: Datapath,
        inputs: Arc<ProxyInputs>,
        pool: Arc<Pool>,
        file: StateFile,
        kubelet: Option<crate::pods::Kubelet>,
    ) -> Registry {
        Registry {
            node: node.to_owned(),
            kubelet,
            max_conns,
            sysctl_net,
            state: inputs.state.clone(),
            identities: inputs.identities.clone(),
            metrics: inputs.metrics.clone(),
            inputs,
            pool,
            file,
            live: datapath.live_counts().clone(),
            pods_changed: tokio::sync::Notify::new(),
            handed: Default::default(),
            hold: std::sync::atomic::AtomicU8::new(Hold::None as u8),
            inner: tokio::sync::Mutex::new(Inner {
                datapath,
                registered: BTreeMap::new(),
                failed: BTreeMap::new(),
                next_slot: 0,
            }),
        }
    }

    /// Listeners a predecessor handed over, by workload pin name: capturing the workload takes
    /// them instead of binding new ones. What no capture takes is closed by
    /// [`Registry::drop_unclaimed`].
    pub fn hand_in(&self, handed: std::collections::HashMap<String, Vec<(String, std::os::fd::OwnedFd)>>) {
        *self.handed.lock().unwrap_or_else(|e| e.into_inner()) = handed;
    }

    pub fn set_hold(&self, h: Hold) {
        self.hold.store(h as u8, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn frozen(&self) -> bool {
        self.hold.load(std::sync::atomic::Ordering::SeqCst) == Hold::Frozen as u8
    }

    /// Taking over from a predecessor that still serves (cleanup deferred).
    pub fn taking_over(&self) -> bool {
        self.hold.load(std::sync::atomic::Ordering::SeqCst) == Hold::CleanupDeferred as u8
    }

    /// Frozen, or cleanup deferred: nothing that looks stale is removed now.
    pub fn holds_cleanup(&self) -> bool {
        self.hold.load(std::sync::atomic::Ordering::SeqCst) != Hold::None as u8
    }

    /// How many handed listeners' workloads are not captured yet.
    pub fn unclaimed(&self) -> usize {
        self.handed.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Closes handed listeners no workload took (the predecessor's workloads this agent does
    /// not capture): returns their pin names.
    pub fn drop_unclaimed(&self) -> Vec<String> {
        self.handed.lock().unwrap_or_else(|e| e.into_inner()).drain().map(|(k, _)| k).collect()
    }

    /// Copies of every captured workload's listeners, by pin name and kind, for a successor.
    pub async fn listener_fds(&self) -> std::io::Result<Vec<(String, Vec<(&'static str, std::os::fd::OwnedFd)>)>> {
        let inner = self.inner.lock().await;
        let mut out = Vec::new();
        for r in inner.registered.values() {
            let mut fds = Vec::new();
            for (kind, fd) in &r.fds {
                // SAFETY: the descriptor is owned by the workload's accept tasks, which run
                // until the workload is removed, and that needs the lock held here.
                let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(*fd) };
                fds.push((*kind, fd.try_clone_to_owned()?));
            }
            out.push((r.wl.pin_name.clone(), fds));
        }
        Ok(out)
    }

    /// Workloads added through the API by a previous run of this agent.
    pub fn persisted(&self) -> Vec<Workload> {
        self.file.load()
    }

    /// Captures a workload of this node. If it cannot be captured, its cgroup (when it exists)
    /// is refused instead and the failure is kept for readiness and retries; the error is
    /// returned either way.
    pub async fn add(&self, w: Workload, source: Source) -> Result<Arc<LocalWorkload>, RegisterError> {
        let mut inner = self.inner.lock().await;
        if self.frozen() {
            return Err(RegisterError::HandingOver(w.key()));
        }
        self.add_locked(&mut inner, w, source).await
    }

    async fn add_locked(
        &self,
        inner: &mut Inner,
        w: Workload,
        source: Source,
    ) -> Result<Arc<LocalWorkload>, RegisterError> {
        let key = w.key();
        match self.capture(inner, w.clone(), source).await {
            Ok(wl) => {
                if let Some(f) = inner.failed.remove(&key) {
                    if let Some(old) = f.cgroup_id.filter(|cg| *cg != wl.cgroup_id) {
                        let_go(inner, old, &key, mesh_common::WORKLOAD_SLOT_REFUSED);
                    }
                    tracing::info!(workload = %key, "captured after an earlier failure");
                    self.metrics.set_not_captured(inner.failed.len());
                }
                Ok(wl)
            }
            Err(e) if e.fails_closed() => {
                self.fail_closed(inner, w, source, &e);
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    /// Refuses the cgroup of a workload that could not be captured.
    fn fail_closed(&self, inner: &mut Inner, w: Workload, source: Source, e: &RegisterError) {
        let key = w.key();
        // A pod's cgroup wherever it is found, whatever its QoS level says: refused either way.
        let path = match (&w.pod_uid, &self.kubelet) {
            (Some(uid), Some(k)) => k.find_cgroup(uid, None).ok(),
            (Some(_), None) => None,
            (None, _) => w.cgroup.clone(),
        };
        let mut wants = path.as_deref().and_then(|p| ebpf::cgroup_id(p).ok());
        let mut held = path.filter(|_| w.pod_uid.is_some() && wants.is_some());
        // A pod refused before whose cgroup is still there stays refused when this look did
        // not find it (a read that failed must not lift a refusal).
        if wants.is_none() {
            if let Some(f) = inner.failed.get(&key) {
                let still = f.held.as_deref().zip(f.cgroup_id).filter(|(p, id)| ebpf::cgroup_id(p).ok() == Some(*id));
                if let Some((p, id)) = still {
                    (wants, held) = (Some(id), Some(p.to_owned()));
                }
            }
        }
        // A cgroup another workload holds stays as that workload made it.
        let cgroup_id = wants.filter(|cg| capture::cgroup_owner(inner, *cg).is_none_or(|o| *o == key));
        if let Some(cg) = cgroup_id {
            if let Err(err) = inner.datapath.set_workload_cgroup(cg, mesh_common::WORKLOAD_SLOT_REFUSED, 0) {
                tracing::error!(workload = %key, error = %err, "could not refuse the cgroup of a workload that failed to register");
            }
        }
        // Its record named another cgroup before: that one is let go.
        if let Some(old) = inner.failed.get(&key).and_then(|f| f.cgroup_id).filter(|old| Some(*old) != cgroup_id) {
            let_go(inner, old, &key, mesh_common::WORKLOAD_SLOT_REFUSED);
        }
        let first = !inner.failed.contains_key(&key);
        if first {
            self.metrics.registration_failed(e.label());
            tracing::error!(workload = %key, reason = e.label(), refused = cgroup_id.is_some(), "cannot capture workload: {e}; its connections are refused until it is captured");
        }
        // Not yet the agent's to capture: no address, or no cgroup yet (the kubelet has not
        // started the pod, or it is being deleted).
        let waiting = match e {
            RegisterError::NoAddress(_) => true,
            RegisterError::Pod { source, .. } => matches!(**source, crate::pods::PodError::NoCgroup { .. }),
            _ => false,
        };
        let failed = Failed { workload: w, source, wants, cgroup_id, held, reason: e.to_string(), waiting };
        inner.failed.insert(key, failed);
        self.metrics.set_not_captured(inner.failed.len());
        if source == Source::Api {
            if let Err(err) = self.save_state(inner, None) {
                tracing::error!(error = %err, "cannot write the state file");
            }
        }
    }

    /// Tries again to capture the workloads that failed (pods are [`Registry::follow_pods`]'s).
    pub async fn retry_failed(&self) {
        let mut inner = self.inner.lock().await;
        if self.frozen() {
            return;
        }
        let pending: Vec<(Workload, Source)> = inner
            .failed
            .values()
            .filter(|f| f.source != Source::Kubernetes)
            .map(|f| (f.workload.clone(), f.source))
            .collect();
        for (w, source) in pending {
            let _ = self.add_locked(&mut inner, w, source).await;
        }
    }

    /// The workloads of this node that could not be captured, and why (pods still waiting for
    /// an address left out: they are not the agent's to capture yet).
    pub async fn not_captured(&self) -> Vec<(WorkloadKey, String)> {
        let inner = self.inner.lock().await;
        inner.failed.iter().filter(|(_, f)| !f.waiting).map(|(k, f)| (k.clone(), f.reason.clone())).collect()
    }

    /// Writes the API's workloads (captured or failed, so that a failed one stays refused
    /// across restarts), leaving out `except`.
    fn save_state(&self, inner: &Inner, except: Option<&WorkloadKey>) -> std::io::Result<()> {
        // The workloads as the API gave them: the mesh is the controller's to say.
        let captured = inner
            .registered
            .values()
            .filter(|r| r.wl.source == Source::Api)
            .map(|r| Workload { mesh: None, ..r.wl.known().workload.clone() });
        let failed = inner.failed.values().filter(|f| f.source == Source::Api).map(|f| f.workload.clone());
        let list: Vec<Workload> = captured.chain(failed).filter(|w| Some(&w.key()) != except).collect();
        self.file.save(&list.iter().collect::<Vec<_>>())
    }

    /// Releases a workload (or stops refusing one that failed). `from_api`: only workloads
    /// the API added may be removed by it.
    pub async fn remove(&self, key: &WorkloadKey, from_api: bool) -> Result<(), RegisterError> {
        let mut inner = self.inner.lock().await;
        if self.frozen() {
            return Err(RegisterError::HandingOver(key.clone()));
        }
        self.remove_locked(&mut inner, key, from_api)
    }

    fn remove_locked(&self, inner: &mut Inner, key: &WorkloadKey, from_api: bool) -> Result<(), RegisterError> {
        let source = match (inner.registered.get(key), inner.failed.get(key)) {
            (Some(r), _) => r.wl.source,
            (None, Some(f)) => f.source,
            (None, None) => return Err(RegisterError::NotFound(key.clone())),
        };
        if from_api && source != Source::Api {
            return Err(RegisterError::FromFile(key.clone()));
        }
        if source == Source::Api {
            self.save_state(inner, Some(key))
                .map_err(|e| RegisterError::State { path: self.file.path().to_owned(), source: e })?;
        }
        if let Some(f) = inner.failed.remove(key) {
            if let Some(cg) = f.cgroup_id {
                let_go(inner, cg, key, mesh_common::WORKLOAD_SLOT_REFUSED);
            }
            self.metrics.set_not_captured(inner.failed.len());
        }
        if let Some(reg) = inner.registered.remove(key) {
            // A workload that failed because this one held its cgroup inherits it, refused in
            // place: the cgroup is never left unredirected in between.
            let cg = reg.wl.cgroup_id;
            let heir = heir(inner, cg, key);
            let how = if heir.is_some() { capture::Release::Refuse } else { capture::Release::Forget };
            self.undo(&mut inner.datapath, reg, how);
            if let Some(f) = heir.and_then(|h| inner.failed.get_mut(&h)) {
                f.cgroup_id = Some(cg);
            }
        }
        tracing::info!(workload = %key, "workload released");
        Ok(())
    }

    /// After start-up registration: removes what a previous agent left for workloads that no
    /// longer exist (map entries, sk_lookup links).
    pub async fn sweep_stale(&self) {
        let mut inner = self.inner.lock().await;
        if self.holds_cleanup() {
            tracing::debug!("another agent of this node runs beside this one: no sweep now");
            return;
        }
        let Inner { datapath: dp, registered, failed, .. } = &mut *inner;
        let refused = failed.values().filter_map(|f| f.cgroup_id);
        let cgroups: Vec<u64> = registered.values().map(|r| r.wl.cgroup_id).chain(refused).collect();
        let pins: Vec<&str> = registered.values().map(|r| r.wl.pin_name.as_str()).collect();
        let keys: Vec<InboundKey> = registered.values().flat_map(|r| r.wl.inbound_keys.iter().copied()).collect();
        let entries = dp.workload_cgroups();
        // The refusals the pod cgroup hook made for this node's pods whose cgroups appeared
        // after they were last looked for: kept. Read after the entries, so that none made
        // before that read is missed (the hook records one before it enters the refusal).
        // Only while the agent follows pods: nothing else would ever lift them.
        let uids = if self.follows_pods() { self.node_pod_uids() } else { Default::default() };
        let hooked: Vec<u64> =
            dp.hook_refusals().into_iter().filter(|(_, u)| uids.contains(u)).map(|(cg, _)| cg).collect();
        for (cg, _) in entries {
            if !cgroups.contains(&cg) && !hooked.contains(&cg) {
                tracing::info!(cgroup_id = cg, "removing stale workload entry");
                let _ = dp.remove_stale_cgroup(cg);
                dp.forget_hook_refusal(cg);
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

    /// After a configuration change: a captured workload whose identity the controller now
    /// gives differently (its namespace moved to another mesh, or its service account changed)
    /// takes the new one. It gets a certificate for it, and the tunnels made with the old one
    /// are closed (both ways): a workload moved out of a mesh keeps no connection to that
    /// mesh's peers. Its capture (listeners, kernel state) is untouched.
    pub async fn follow_config(&self) {
        self.pods_changed.notify_one();
        let inner = self.inner.lock().await;
        if self.frozen() {
            return;
        }
        let snap = self.state.load();
        let mut changed = 0;
        for r in inner.registered.values() {
            let cur = r.wl.known();
            let next = match snap.config.by_key.get(r.wl.key()) {
                Some(rec) if rec.spiffe_id == cur.spiffe_id => continue,
                Some(rec) => crate::state::KnownWorkload {
                    key: cur.key.clone(),
                    workload: Workload { mesh: rec.workload.mesh.clone(), ..cur.workload.clone() },
                    spiffe_id: rec.spiffe_id.clone(),
                },
                // It was in a mesh by the controller's word, and the controller no longer has
                // it (its namespace names a mesh that is not there): back to its own record's
                // identity, which the CA signs for no one, so it is refused rather than kept in
                // the old mesh until its certificate expires.
                None if snap.config.version > 0 && cur.workload.mesh.is_some() => {
                    let own = Workload { mesh: None, ..cur.workload.clone() };
                    match crate::state::KnownWorkload::new(self.state.trust_domain(), own) {
                        Ok(k) => k,
                        Err(e) => {
                            tracing::error!(workload = %r.wl.key(), error = %e, "no identity to fall back to");
                            continue;
                        }
                    }
                }
                None => continue,
            };
            tracing::info!(workload = %r.wl.key(), from = %cur.spiffe_id, to = %next.spiffe_id, mesh = next.mesh(), "workload identity changed: a new certificate, and its tunnels made with the old one are closed");
            self.identities.acquire(&next.spiffe_id);
            r.wl.known.send_replace(Arc::new(next));
            self.identities.release(&cur.spiffe_id);
            changed += 1;
        }
        drop(inner);
        if changed > 0 {
            self.pool.evict_stale(&self.state.load());
        }
    }

    /// The workloads captured now (from the snapshot: no lock).
    pub fn list(&self) -> Vec<WorkloadInfo> {
        let snap = self.state.load();
        snap.local
            .by_key
            .values()
            .map(|wl| {
                let known = wl.known();
                let w = &known.workload;
                WorkloadInfo {
                    namespace: w.namespace.clone(),
                    name: w.name.clone(),
                    service_account: w.service_account.clone(),
                    identity: wl.spiffe_id().to_string(),
                    ips: w.ips.clone(),
                    labels: w.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                    netns: wl.netns.path().to_owned(),
                    cgroup: wl.cgroup.clone(),
                    cgroup_id: wl.cgroup_id,
                    netns_cookie: wl.netns_cookie,
                    source: wl.source,
                    pod_uid: w.pod_uid.clone(),
                    live_connections: self.live.get(wl.id).unwrap_or(0),
                    max_connections: self.max_conns,
                }
            })
            .collect()
    }
}
