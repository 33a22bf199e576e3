//! Registration: a workload appears (from the workloads file or the local API) and the agent
//! captures it — listeners in its netns first, then steering (sk_lookup), then redirection of
//! its cgroup — or it goes and all of that is undone in reverse. Also the start-up sweep of
//! what a previous agent left for workloads that no longer exist.
//!
//! One writer at a time (an async mutex around the datapath and the registered set); readers
//! see the result in the state snapshot.

mod listeners;
mod persist;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use mesh_api::admin::{Source, WorkloadInfo};
use mesh_common::InboundKey;
use mesh_model::{Workload, WorkloadError, WorkloadKey};
use tokio::task::JoinHandle;

use crate::ebpf::{self, Datapath};
use crate::hbone::pool::Pool;
use crate::identity::Identities;
use crate::inputs::ProxyInputs;
use crate::netns::{self, NetnsWorker};
use crate::state::{KnownWorkload, LocalWorkload, StateStore};
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
}

struct Registered {
    wl: Arc<LocalWorkload>,
    tasks: Vec<JoinHandle<()>>,
}

struct Inner {
    datapath: Datapath,
    registered: BTreeMap<WorkloadKey, Registered>,
}

pub struct Registry {
    node: String,
    state: Arc<StateStore>,
    identities: Arc<Identities>,
    inputs: Arc<ProxyInputs>,
    pool: Arc<Pool>,
    file: StateFile,
    inner: tokio::sync::Mutex<Inner>,
}

impl Registry {
    pub fn new(node: &str, datapath: Datapath, inputs: Arc<ProxyInputs>, pool: Arc<Pool>, file: StateFile) -> Registry {
        Registry {
            node: node.to_owned(),
            state: inputs.state.clone(),
            identities: inputs.identities.clone(),
            inputs,
            pool,
            file,
            inner: tokio::sync::Mutex::new(Inner { datapath, registered: BTreeMap::new() }),
        }
    }

    /// Workloads added through the API by a previous run of this agent.
    pub fn persisted(&self) -> Vec<Workload> {
        self.file.load()
    }

    /// Captures a workload of this node. On error nothing of it remains: not in the kernel,
    /// not in the state, not in the state file.
    pub async fn add(&self, w: Workload, source: Source) -> Result<Arc<LocalWorkload>, RegisterError> {
        w.validate(&self.node)?;
        let key = w.key();
        if !w.is_local_to(&self.node) {
            let node = w.node.clone().unwrap_or_default();
            return Err(RegisterError::OtherNode { key, node, here: self.node.clone() });
        }
        w.check_local_objects()?;
        let netns_path = w.netns.clone().expect("validated: a local workload names its netns");
        let cgroup_path = w.cgroup.clone().expect("validated: a local workload names its cgroup");
        let mut inner = self.inner.lock().await;
        if inner.registered.contains_key(&key) {
            return Err(RegisterError::Exists(key));
        }
        let ino = |p: &std::path::Path| std::fs::metadata(p).map(|m| std::os::unix::fs::MetadataExt::ino(&m)).ok();
        if let Some(mine) = ino(&netns_path) {
            if let Some(other) = inner.registered.values().find(|r| ino(r.wl.netns.path()) == Some(mine)) {
                return Err(RegisterError::SharedNetns { key, netns: netns_path, other: other.wl.key().clone() });
            }
        }
        let known = KnownWorkload::new(self.state.trust_domain(), w)
            .map_err(|source| RegisterError::Identity { key: key.clone(), source })?;
        let cgroup_id = ebpf::cgroup_id(&cgroup_path).map_err(|source| RegisterError::Cgroup {
            key: key.clone(),
            path: cgroup_path.clone(),
            source,
        })?;
        let worker = tokio::task::spawn_blocking(move || NetnsWorker::spawn(&netns_path))
            .await
            .map_err(|e| RegisterError::Netns { key: key.clone(), source: netns::NetnsError::Thread(e.to_string()) })?
            .map_err(|source| RegisterError::Netns { key: key.clone(), source })?;

        // Listeners first: by the time the kernel redirects anything, someone is listening.
        let listeners = worker
            .run(listeners::bind)
            .await
            .map_err(|source| RegisterError::Netns { key: key.clone(), source })?
            .map_err(|(addr, source)| RegisterError::Listen { key: key.clone(), addr, source })?;
        let netns_cookie =
            netns::socket_netns_cookie(&listeners.outbound[0]).map_err(|source| RegisterError::Netns {
                key: key.clone(),
                source: netns::NetnsError::Enter { path: worker.path().into(), source },
            })?;
        let id = allocate_id(&inner.registered, &key);
        let inbound_keys: Vec<InboundKey> = known.workload.ips.iter().map(|ip| listeners::inbound_key(*ip)).collect();
        let wl = Arc::new(LocalWorkload {
            known: Arc::new(known),
            id,
            cgroup_id,
            netns: worker,
            netns_cookie,
            inbound_keys,
            pin_name: format!("{}_{}", key.namespace, key.name),
            source,
        });

        let attach = (|| -> Result<bool, ebpf::EbpfError> {
            let dp = &mut inner.datapath;
            for k in &wl.inbound_keys {
                dp.set_inbound_listener(*k, &listeners.inbound)?;
            }
            let adopted = dp.attach_sk_lookup(&wl.pin_name, wl.netns.file())?;
            dp.add_workload_cgroup(cgroup_id, id)?;
            Ok(adopted)
        })();
        let adopted = match attach {
            Ok(a) => a,
            Err(source) => {
                release_kernel_state(&mut inner.datapath, &wl);
                return Err(RegisterError::Ebpf { key, source: Box::new(source) });
            }
        };
        self.state.update_local(|cur| cur.with(wl.clone()));
        let tasks = self.spawn_proxies(&wl, listeners);
        self.identities.acquire(wl.spiffe_id());

        if source == Source::Api {
            let mut list: Vec<&Workload> = inner
                .registered
                .values()
                .filter(|r| r.wl.source == Source::Api)
                .map(|r| &r.wl.known.workload)
                .collect();
            list.push(&wl.known.workload);
            if let Err(e) = self.file.save(&list) {
                self.undo(&mut inner.datapath, Registered { wl, tasks });
                return Err(RegisterError::State { path: self.file.path().to_owned(), source: e });
            }
        }
        inner.registered.insert(key.clone(), Registered { wl: wl.clone(), tasks });
        tracing::info!(workload = %key, cgroup_id, netns_cookie, id, sk_lookup_adopted = adopted, "workload captured");
        Ok(wl)
    }

    fn spawn_proxies(&self, wl: &Arc<LocalWorkload>, l: listeners::Listeners) -> Vec<JoinHandle<()>> {
        let tokio_listener =
            |l: std::net::TcpListener| tokio::net::TcpListener::from_std(l).expect("nonblocking listener");
        let inputs = &self.inputs;
        let mut tasks = Vec::new();
        for l in l.outbound {
            let serve = crate::proxy::outbound::serve(inputs.clone(), self.pool.clone(), wl.clone(), tokio_listener(l));
            tasks.push(tokio::spawn(serve));
        }
        tasks.push(tokio::spawn(crate::proxy::inbound::serve(inputs.clone(), wl.clone(), tokio_listener(l.inbound))));
        tasks.push(tokio::spawn(crate::hbone::server::serve(inputs.clone(), wl.clone(), tokio_listener(l.hbone))));
        tasks
    }

    /// Releases a workload. `from_api`: only workloads the API added may be removed by it.
    pub async fn remove(&self, key: &WorkloadKey, from_api: bool) -> Result<(), RegisterError> {
        let mut inner = self.inner.lock().await;
        let source = match inner.registered.get(key) {
            None => return Err(RegisterError::NotFound(key.clone())),
            Some(r) => r.wl.source,
        };
        if from_api && source != Source::Api {
            return Err(RegisterError::FromFile(key.clone()));
        }
        if source == Source::Api {
            let list: Vec<&Workload> = inner
                .registered
                .values()
                .filter(|r| r.wl.source == Source::Api && r.wl.key() != key)
                .map(|r| &r.wl.known.workload)
                .collect();
            self.file.save(&list).map_err(|e| RegisterError::State { path: self.file.path().to_owned(), source: e })?;
        }
        let reg = inner.registered.remove(key).expect("present");
        self.undo(&mut inner.datapath, reg);
        tracing::info!(workload = %key, "workload released");
        Ok(())
    }

    /// Reverse order of add: stop redirecting, stop steering, close the listeners, forget it.
    fn undo(&self, dp: &mut Datapath, reg: Registered) {
        release_kernel_state(dp, &reg.wl);
        for t in reg.tasks {
            t.abort();
        }
        self.identities.release(reg.wl.spiffe_id());
        self.state.update_local(|cur| cur.without(reg.wl.key()));
        self.pool.evict_stale(&self.state.load());
    }

    /// After start-up registration: removes what a previous agent left for workloads that no
    /// longer exist (map entries, sk_lookup links).
    pub async fn sweep_stale(&self) {
        let mut inner = self.inner.lock().await;
        let Inner { datapath: dp, registered } = &mut *inner;
        let cgroups: Vec<u64> = registered.values().map(|r| r.wl.cgroup_id).collect();
        let pins: Vec<&str> = registered.values().map(|r| r.wl.pin_name.as_str()).collect();
        let keys: Vec<InboundKey> = registered.values().flat_map(|r| r.wl.inbound_keys.iter().copied()).collect();
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

    /// The workloads captured now (from the snapshot: no lock).
    pub fn list(&self) -> Vec<WorkloadInfo> {
        let snap = self.state.load();
        snap.local
            .by_key
            .values()
            .map(|wl| {
                let w = &wl.known.workload;
                WorkloadInfo {
                    namespace: w.namespace.clone(),
                    name: w.name.clone(),
                    service_account: w.service_account.clone(),
                    identity: wl.spiffe_id().to_string(),
                    ips: w.ips.clone(),
                    labels: w.labels.clone(),
                    netns: wl.netns.path().to_owned(),
                    cgroup: w.cgroup.clone().unwrap_or_default(),
                    cgroup_id: wl.cgroup_id,
                    netns_cookie: wl.netns_cookie,
                    source: wl.source,
                }
            })
            .collect()
    }
}

fn release_kernel_state(dp: &mut Datapath, wl: &LocalWorkload) {
    if let Err(e) = dp.remove_workload_cgroup(wl.cgroup_id) {
        tracing::error!(workload = %wl.key(), error = %e, "could not remove the workload's cgroup entry");
    }
    dp.detach_sk_lookup(&wl.pin_name);
    for k in &wl.inbound_keys {
        dp.remove_inbound_listener(k);
    }
}

/// A stable id per workload name (so a restarted agent gives a workload the id its pinned
/// entries carry), moved on past ids in use.
fn allocate_id(registered: &BTreeMap<WorkloadKey, Registered>, key: &WorkloadKey) -> u32 {
    let mut id = fnv1a(key.to_string().as_bytes()).max(1);
    while registered.values().any(|r| r.wl.id == id) {
        id = id.wrapping_add(1).max(1);
    }
    id
}

fn fnv1a(bytes: &[u8]) -> u32 {
    let mut h: u32 = 0x811c9dc5;
    for b in bytes {
        h ^= *b as u32;
        h = h.wrapping_mul(0x01000193);
    }
    h
}
