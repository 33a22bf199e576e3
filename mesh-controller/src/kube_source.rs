//! The Kubernetes configuration source: reflectors over Pods, Namespaces and the policy CRDs
//! feed the same model the local directory does. Reconciling is a pure function of the stores
//! (`model_from`), tested on recorded objects; the watch plumbing is kube-runtime's.
//!
//! Policies get an `Accepted` status condition for the generation read (`status`).
//!
//! Exercised against a mock API server (tower-test) with recorded JSON, including watch events,
//! a 410 Gone resync and status writes; not yet against a real cluster.

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::runtime::{reflector, watcher, WatchStreamExt};
use kube::{Api, Client, ResourceExt};
use mesh_model::policy::{AuthorizationPolicy, PeerAuthentication};
use mesh_model::Workload;

use crate::model::Model;

/// A namespace joins the mesh with this label (like Istio's dataplane-mode label).
pub const MESH_LABEL: &str = "sockmesh.io/mesh";
pub const MESH_ENABLED: &str = "enabled";

/// The workload record of a meshed pod, or None if it is not (yet) one: not in a meshed
/// namespace, host network, not scheduled, no address, or finished.
pub fn workload_of(pod: &Pod, meshed_namespaces: &std::collections::BTreeSet<String>) -> Option<Workload> {
    let ns = pod.namespace()?;
    if !meshed_namespaces.contains(&ns) {
        return None;
    }
    let spec = pod.spec.as_ref()?;
    if spec.host_network == Some(true) {
        return None;
    }
    let status = pod.status.as_ref()?;
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return None;
    }
    let mut ips = Vec::new();
    for ip in status.pod_ips.iter().flatten() {
        if let Ok(ip) = ip.ip.parse() {
            ips.push(ip);
        }
    }
    if ips.is_empty() {
        if let Some(ip) = status.pod_ip.as_ref().and_then(|i| i.parse().ok()) {
            ips.push(ip);
        }
    }
    if ips.is_empty() {
        return None;
    }
    Some(Workload {
        name: pod.name_any(),
        namespace: ns,
        service_account: spec.service_account_name.clone().unwrap_or_else(|| "default".into()),
        labels: pod.labels().clone(),
        ips,
        node: Some(spec.node_name.clone()?),
        netns: None,
        cgroup: None,
    })
}

/// The model from the current contents of the stores. Pure, but for the log line of a
/// rejected policy, handled as [`Model::admit_authz`] says.
pub fn model_from(
    pods: &[Arc<Pod>],
    namespaces: &[Arc<Namespace>],
    aps: &[Arc<AuthorizationPolicy>],
    pas: &[Arc<PeerAuthentication>],
    previous: &Model,
) -> Model {
    let meshed: std::collections::BTreeSet<String> = namespaces
        .iter()
        .filter(|n| n.labels().get(MESH_LABEL).map(String::as_str) == Some(MESH_ENABLED))
        .map(|n| n.name_any())
        .collect();
    let mut m = Model::default();
    for p in pods {
        if let Some(w) = workload_of(p, &meshed) {
            m.workloads.insert(w.key(), w);
        }
    }
    for ap in aps {
        let key = (ap.namespace().unwrap_or_default(), ap.name_any());
        m.admit_authz(previous, key, &ap.spec, "AuthorizationPolicy".into());
    }
    for pa in pas {
        let key = (pa.namespace().unwrap_or_default(), pa.name_any());
        let what = format!("PeerAuthentication {}/{}", key.0, key.1);
        m.admit_peer_auth(previous, key, &pa.spec, what);
    }
    m
}

/// Runs the reflectors and publishes a new model after every change.
pub async fn run(client: Client, tx: tokio::sync::watch::Sender<Arc<Model>>) {
    let (pods, pods_w) = reflector::store::<Pod>();
    let (nss, nss_w) = reflector::store::<Namespace>();
    let (aps, aps_w) = reflector::store::<AuthorizationPolicy>();
    let (pas, pas_w) = reflector::store::<PeerAuthentication>();
    let cfg = watcher::Config::default();
    // Every watcher event (including the end of a re-list, when the store is swapped) triggers a
    // rebuild; errors back off instead of spinning.
    let s1 = reflector(pods_w, watcher(Api::<Pod>::all(client.clone()), cfg.clone()).default_backoff()).map(|_| ());
    let s2 =
        reflector(nss_w, watcher(Api::<Namespace>::all(client.clone()), cfg.clone()).default_backoff()).map(|_| ());
    let s3 = reflector(aps_w, watcher(Api::<AuthorizationPolicy>::all(client.clone()), cfg.clone()).default_backoff())
        .map(|_| ());
    let s4 =
        reflector(pas_w, watcher(Api::<PeerAuthentication>::all(client.clone()), cfg).default_backoff()).map(|_| ());
    let mut all = futures::stream::select_all(vec![s1.boxed(), s2.boxed(), s3.boxed(), s4.boxed()]);
    let changed = Arc::new(tokio::sync::Notify::new());
    tokio::spawn(status::run(client.clone(), aps.clone(), pas.clone(), changed.clone()));
    let mut version = 0u64;
    while all.next().await.is_some() {
        changed.notify_one();
        let previous = tx.borrow().clone();
        let mut m = model_from(&pods.state(), &nss.state(), &aps.state(), &pas.state(), &previous);
        version += 1;
        m.version = version;
        m.accepted_at_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        let changed = {
            let cur = tx.borrow();
            cur.workloads != m.workloads
                || cur.authz != m.authz
                || cur.peer_auth != m.peer_auth
                || cur.errors != m.errors
        };
        if changed {
            tracing::info!(
                version,
                workloads = m.workloads.len(),
                policies = m.authz.len(),
                "configuration from the Kubernetes API"
            );
            let _ = tx.send(Arc::new(m));
        }
    }
}

pub mod status;

#[cfg(test)]
mod tests;
