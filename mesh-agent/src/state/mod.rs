//! What the agent knows, as one immutable snapshot swapped atomically by its two writers:
//! registration (the workloads captured on this node) and the configuration watch (every
//! workload of the mesh, policies, PeerAuthentication, from the controller). The connection
//! path loads the current snapshot without a lock and decides from it; a writer builds a new
//! half and swaps it in.

mod config;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use mesh_common::InboundKey;
use mesh_identity::SpiffeId;
use mesh_model::{Workload, WorkloadKey};

pub use config::{BuildError, ConfigState, ServiceEntry};

use crate::netns::NetnsWorker;

/// A workload of the mesh, with its SPIFFE identity computed once.
#[derive(Debug)]
pub struct KnownWorkload {
    pub key: WorkloadKey,
    pub workload: Workload,
    pub spiffe_id: Arc<SpiffeId>,
}

impl KnownWorkload {
    /// `None` when the record's names do not form a workload SPIFFE ID in `trust_domain` (its
    /// mesh's).
    pub fn new(trust_domain: &str, workload: Workload) -> Result<KnownWorkload, mesh_identity::SpiffeError> {
        let id = SpiffeId::workload(trust_domain, &workload.namespace, &workload.service_account)?;
        Ok(KnownWorkload { key: workload.key(), workload, spiffe_id: Arc::new(id) })
    }

    /// The mesh it belongs to.
    pub fn mesh(&self) -> &str {
        self.workload.mesh.as_deref().unwrap_or(mesh_model::mesh::DEFAULT_MESH)
    }
}

/// A workload this agent captures, with the kernel objects that tie it to traffic.
pub struct LocalWorkload {
    pub key: WorkloadKey,
    /// Its addresses (from its record on this node; they do not change while it is captured).
    pub ips: Vec<IpAddr>,
    /// Its record and identity: the controller's when it has one (a namespace moved to another
    /// mesh changes the identity of a workload that stays captured), else its own.
    pub known: tokio::sync::watch::Sender<Arc<KnownWorkload>>,
    /// Echoed by connect4/6 into each original destination; checked at accept.
    pub id: u32,
    pub cgroup_id: u64,
    /// Its cgroup directory (its record's, or for a pod the one found by its UID).
    pub cgroup: std::path::PathBuf,
    pub netns: NetnsWorker,
    pub netns_cookie: u64,
    /// What its netns was set up for: dialling its apps from their clients' addresses.
    pub transparent: crate::transparent::Setup,
    /// Where sk_lookup finds this workload's inbound socket.
    pub inbound_keys: Vec<InboundKey>,
    /// The name of its sk_lookup link under the node's bpffs directory.
    pub pin_name: String,
    /// The workloads file, the local API (persisted in the state directory), or the
    /// controller's push (a pod found by UID).
    pub source: mesh_api::admin::Source,
}

impl LocalWorkload {
    pub fn key(&self) -> &WorkloadKey {
        &self.key
    }
    /// Its record and identity now.
    pub fn known(&self) -> Arc<KnownWorkload> {
        self.known.borrow().clone()
    }
    pub fn spiffe_id(&self) -> Arc<SpiffeId> {
        self.known.borrow().spiffe_id.clone()
    }
    pub fn ips(&self) -> &[IpAddr] {
        &self.ips
    }
    /// Its (first) address of the family of `other`: what it is seen from when it connects
    /// there.
    pub fn ip_for(&self, other: IpAddr) -> Option<IpAddr> {
        self.ips.iter().find(|ip| ip.is_ipv4() == other.is_ipv4()).copied()
    }
    /// Wakes when its identity changes: its tunnels, made with the old one, are closed.
    pub fn identity_changes(&self) -> tokio::sync::watch::Receiver<Arc<KnownWorkload>> {
        self.known.subscribe()
    }
}

/// Returns when the identity `rx` follows changes; never, if its workload is gone (what
/// happens to its connections then is the workload's removal's business).
pub async fn identity_changed(mut rx: tokio::sync::watch::Receiver<Arc<KnownWorkload>>) {
    if rx.changed().await.is_err() {
        std::future::pending::<()>().await
    }
}

/// The registration writer's half: this node's captured workloads, and the workloads the
/// agent's own file names (local mode: every node's, for destinations before any push).
#[derive(Default)]
pub struct LocalState {
    pub by_key: BTreeMap<WorkloadKey, Arc<LocalWorkload>>,
    pub by_ip: HashMap<IpAddr, Arc<LocalWorkload>>,
    pub file_known: HashMap<IpAddr, Arc<KnownWorkload>>,
}

impl LocalState {
    /// This state with `wl` captured.
    pub fn with(&self, wl: Arc<LocalWorkload>) -> LocalState {
        let mut next = self.clone_shallow();
        for ip in wl.ips() {
            next.by_ip.insert(*ip, wl.clone());
            next.file_known.insert(*ip, wl.known());
        }
        next.by_key.insert(wl.key().clone(), wl);
        next
    }

    /// This state without the workload `key`.
    pub fn without(&self, key: &WorkloadKey) -> LocalState {
        let mut next = self.clone_shallow();
        if let Some(wl) = next.by_key.remove(key) {
            for ip in wl.ips() {
                next.by_ip.remove(ip);
                next.file_known.remove(ip);
            }
        }
        next
    }

    fn clone_shallow(&self) -> LocalState {
        LocalState { by_key: self.by_key.clone(), by_ip: self.by_ip.clone(), file_known: self.file_known.clone() }
    }
}

/// Everything the connection path decides from.
#[derive(Default)]
pub struct Snapshot {
    pub config: Arc<ConfigState>,
    pub local: Arc<LocalState>,
}

impl Snapshot {
    /// The mesh workload at a destination address, if any: the controller's record first,
    /// then the agent's own file (or its registrations).
    pub fn destination(&self, ip: IpAddr) -> Option<&Arc<KnownWorkload>> {
        self.config.workloads.get(&ip).or_else(|| self.local.file_known.get(&ip))
    }

    /// The workload captured on this node at `ip`: a connection to it need not leave the node.
    pub fn local_at(&self, ip: IpAddr) -> Option<&Arc<LocalWorkload>> {
        self.local.by_ip.get(&ip)
    }

    /// The record policies select `wl` by (its labels): the controller's (a label change there
    /// applies at once), else the local one. Identity never comes from labels.
    pub fn record_of(&self, wl: &LocalWorkload) -> Arc<KnownWorkload> {
        self.config.by_key.get(wl.key()).cloned().unwrap_or_else(|| wl.known())
    }
}

/// The current snapshot, swapped by its writers.
pub struct StateStore {
    current: ArcSwap<Snapshot>,
    trust_domain: String,
    root_namespace: String,
    /// Why the last configuration update was refused, while that is the latest news.
    refused: std::sync::Mutex<Option<String>>,
}

impl StateStore {
    pub fn new(trust_domain: &str, root_namespace: &str) -> StateStore {
        StateStore {
            current: ArcSwap::from_pointee(Snapshot::default()),
            trust_domain: trust_domain.to_owned(),
            root_namespace: root_namespace.to_owned(),
            refused: std::sync::Mutex::new(None),
        }
    }

    pub fn set_refused(&self, why: Option<String>) {
        *self.refused.lock().unwrap_or_else(|e| e.into_inner()) = why;
    }

    /// Why the last configuration update was refused, if it was.
    pub fn refused(&self) -> Option<String> {
        self.refused.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn root_namespace(&self) -> &str {
        &self.root_namespace
    }

    /// Replaces the registration half. The caller serialises its own updates.
    pub fn update_local(&self, f: impl Fn(&LocalState) -> LocalState) {
        self.current.rcu(|cur| Snapshot { config: cur.config.clone(), local: Arc::new(f(&cur.local)) });
    }

    /// Replaces the configuration half.
    pub fn set_config(&self, config: ConfigState) {
        let config = Arc::new(config);
        self.current.rcu(|cur| Snapshot { config: config.clone(), local: cur.local.clone() });
    }

    /// The record and identity a workload of this node is captured with: the controller's (its
    /// mesh, and so its trust domain, is the controller's to say), else its own record's, in
    /// the default mesh.
    pub fn identity_for(&self, mut w: Workload) -> Result<KnownWorkload, mesh_identity::SpiffeError> {
        let snap = self.load();
        if let Some(k) = snap.config.by_key.get(&w.key()) {
            w.mesh = k.workload.mesh.clone();
            return Ok(KnownWorkload { key: w.key(), workload: w, spiffe_id: k.spiffe_id.clone() });
        }
        w.mesh = None;
        KnownWorkload::new(&self.trust_domain, w)
    }

    /// Records the workloads of the agent's file (other nodes' too) as destinations.
    pub fn set_file_workloads(&self, all: &[Workload]) {
        let known: Vec<(IpAddr, Arc<KnownWorkload>)> = all
            .iter()
            .filter_map(|w| match KnownWorkload::new(&self.trust_domain, w.clone()) {
                Ok(k) => Some(Arc::new(k)),
                Err(e) => {
                    tracing::warn!(workload = %w.key(), error = %e, "workload has no valid identity; not a destination");
                    None
                }
            })
            .flat_map(|k| k.workload.ips.iter().map(|ip| (*ip, k.clone())).collect::<Vec<_>>())
            .collect();
        self.update_local(|cur| {
            let mut next = cur.clone_shallow();
            next.file_known.extend(known.iter().cloned());
            next
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(name: &str, ip: &str) -> Workload {
        serde_yaml::from_str(&format!("name: {name}\nips: [{ip}]\nserviceAccount: sa-{name}\n")).unwrap()
    }

    /// The controller's record of an address wins over the agent's file, and each writer's
    /// swap keeps the other's half.
    #[test]
    fn destinations_prefer_the_controllers_record_and_writers_keep_each_others_half() {
        let store = StateStore::new("cluster.local", "sockmesh-system");
        store.set_file_workloads(&[w("a", "10.0.0.1"), w("b", "10.0.0.2")]);
        let snap = store.load();
        let b = snap.destination("10.0.0.2".parse().unwrap()).unwrap();
        assert_eq!(b.spiffe_id.to_string(), "spiffe://cluster.local/ns/default/sa/sa-b");

        let mut pushed = w("b-new", "10.0.0.2");
        pushed.service_account = "other".into();
        let json = serde_json::to_string(&pushed).unwrap();
        let id = mesh_api::push::ResourceId::new(mesh_api::push::Kind::Workload, "default", "b-new");
        let cfg = ConfigState::build([(id, json)].into(), 7, "istio-system", "cluster.local").unwrap();
        store.set_config(cfg);
        let snap = store.load();
        let b = snap.destination("10.0.0.2".parse().unwrap()).unwrap();
        assert_eq!(b.key.name, "b-new");
        assert!(snap.destination("10.0.0.1".parse().unwrap()).is_some(), "the file's half was kept");
        assert_eq!(snap.config.version, 7);
        assert!(snap.destination("10.9.9.9".parse().unwrap()).is_none());
    }
}
