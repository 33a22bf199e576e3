//! The Kubernetes configuration source: reflectors over Pods, Namespaces, Services,
//! EndpointSlices, Meshes and the policy CRDs feed the same model the local directory does. Reconciling
//! is a pure function of the stores (`model_from`), tested on recorded objects; the watch
//! plumbing is kube-runtime's.
//!
//! Services are read in every namespace (a meshed client may call a Service whose endpoints are
//! outside the mesh; its agent then passes the connection through plainly). Their endpoints and
//! target ports come from their EndpointSlices (`service_of`), as kube-proxy reads them; the
//! selector is carried along but not resolved again.
//!
//! Policies get an `Accepted` status condition for the generation read (`status`).
//!
//! Exercised against a mock API server (tower-test) with recorded JSON, including watch events,
//! a 410 Gone resync and status writes; not yet against a real cluster.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service as KubeService};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::runtime::{reflector, watcher, WatchStreamExt};
use kube::{Api, Client, ResourceExt};
use mesh_model::policy::{AuthorizationPolicy, PeerAuthentication};
use mesh_model::{Endpoint, Mesh, Service, ServicePort, Workload};

use crate::model::Model;

/// A namespace joins a mesh with this label (like Istio's dataplane-mode label): `enabled` for
/// the default mesh, or a `Mesh`'s name.
pub use mesh_model::mesh::MESH_LABEL;

/// The label by which an EndpointSlice names its Service (of the slice's namespace).
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The workload record of a meshed pod, or None if it is not (yet) one: not in a meshed
/// namespace, host network, not scheduled, or finished. A scheduled pod is a workload before it
/// has an address (its record then has none): its node's agent finds its cgroup by UID and
/// refuses its connections until it can capture it.
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
    let pod_uid = pod.metadata.uid.clone().filter(|u| mesh_model::workload::is_pod_uid(u));
    if ips.is_empty() && pod_uid.is_none() {
        return None;
    }
    let qos_class =
        status.qos_class.clone().filter(|q| matches!(q.as_str(), "Guaranteed" | "Burstable" | "BestEffort"));
    Some(Workload {
        name: pod.name_any(),
        namespace: ns,
        service_account: spec.service_account_name.clone().unwrap_or_else(|| "default".into()),
        labels: pod.labels().clone().into(),
        ips,
        node: Some(spec.node_name.clone()?),
        netns: None,
        cgroup: None,
        mesh: None,
        pod_uid,
        qos_class,
    })
}

/// The Service record of a Kubernetes Service and its EndpointSlices (`slices`: those of its
/// namespace labelled [`SERVICE_NAME_LABEL`] with its name; any other is ignored, and so are
/// FQDN slices, whose endpoints are names). Pure.
///
/// None for an `ExternalName` Service, and for one left without a port (it has no endpoints
/// to reach yet; not an error). Otherwise:
/// - addresses: `spec.clusterIPs` (else `spec.clusterIP`); "None" (headless), "" and
///   unparsable ones are skipped, so a headless Service has none.
/// - selector: `spec.selector` if not empty, for information: the endpoints are the slices'.
/// - ports: TCP ones only. The target port is the number of the slices' port with the Service
///   port's name (none or "" for a single unnamed port), which resolves a named `targetPort`
///   as kube-proxy does; failing that an integer `targetPort`; failing that (a named
///   `targetPort` no slice resolves) the port is dropped. Slices that give one name different
///   numbers (pods disagreeing on a named port) cannot be represented: the first slice by name
///   wins.
/// - export: the label `sockmesh.io/export: "true"` offers it to the other zones.
/// - endpoints: every address of every endpoint of the (IPv4 and IPv6) slices, ready unless
///   `conditions.ready` is false, naming the pod of a `targetRef` to a Pod; sorted, duplicates
///   removed.
pub fn service_of(svc: &KubeService, slices: &[&EndpointSlice]) -> Option<Service> {
    let namespace = svc.namespace()?;
    let name = svc.name_any();
    let spec = svc.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    let mut slices: Vec<&EndpointSlice> = slices
        .iter()
        .copied()
        .filter(|s| {
            s.namespace().as_deref() == Some(namespace.as_str())
                && s.labels().get(SERVICE_NAME_LABEL) == Some(&name)
                && matches!(s.address_type.as_str(), "IPv4" | "IPv6")
        })
        .collect();
    slices.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));

    let cluster_ips: Vec<&String> = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ips.iter().collect(),
        _ => spec.cluster_ip.iter().collect(),
    };
    let mut addresses: Vec<IpAddr> = Vec::new();
    for ip in cluster_ips.into_iter().filter_map(|ip| ip.parse().ok()) {
        if !addresses.contains(&ip) {
            addresses.push(ip);
        }
    }

    let tcp = |protocol: Option<&str>| matches!(protocol, None | Some("TCP"));
    let unnamed_is_none = |n: &Option<String>| n.clone().filter(|n| !n.is_empty());
    let mut ports = Vec::new();
    for p in spec.ports.iter().flatten().filter(|p| tcp(p.protocol.as_deref())) {
        let Ok(port) = u16::try_from(p.port) else { continue };
        let port_name = unnamed_is_none(&p.name);
        let from_slices = slices
            .iter()
            .flat_map(|s| s.ports.iter().flatten())
            .filter(|sp| tcp(sp.protocol.as_deref()) && unnamed_is_none(&sp.name) == port_name)
            .find_map(|sp| sp.port.and_then(|n| u16::try_from(n).ok()).filter(|n| *n != 0));
        let target_port = match (from_slices, &p.target_port) {
            (Some(n), _) => Some(n),
            (None, Some(IntOrString::Int(n))) => match u16::try_from(*n) {
                Ok(n) if n != 0 => Some(n),
                _ => continue,
            },
            (None, Some(IntOrString::String(_))) => continue,
            (None, None) => None,
        };
        ports.push(ServicePort { name: port_name, port, target_port });
    }
    if ports.is_empty() {
        return None;
    }

    let mut endpoints = Vec::new();
    for s in &slices {
        for e in &s.endpoints {
            let ready = e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            let workload =
                e.target_ref.as_ref().filter(|r| r.kind.as_deref() == Some("Pod")).and_then(|r| r.name.clone());
            for address in e.addresses.iter().filter_map(|a| a.parse().ok()) {
                endpoints.push(Endpoint { address, workload: workload.clone(), ready, remote: None });
            }
        }
    }
    endpoints.sort();
    endpoints.dedup();

    Some(Service {
        name,
        namespace,
        addresses,
        ports,
        selector: spec.selector.clone().filter(|s| !s.is_empty()),
        endpoints,
        export: svc.labels().get(mesh_model::service::EXPORT_LABEL).is_some_and(|v| v == "true"),
        imported: false,
    })
}

/// The model from the current contents of the stores. Pure, but for the log line of a
/// rejected policy, handled as [`Model::admit_authz`] says, or of a rejected Service
/// ([`Model::admit_services`]).
#[allow(clippy::too_many_arguments)]
pub fn model_from(
    pods: &[Arc<Pod>],
    namespaces: &[Arc<Namespace>],
    meshes: &[Arc<Mesh>],
    services: &[Arc<KubeService>],
    slices: &[Arc<EndpointSlice>],
    aps: &[Arc<AuthorizationPolicy>],
    pas: &[Arc<PeerAuthentication>],
    previous: &Model,
) -> Model {
    // Any value of the label joins a mesh: `enabled` the default one, else the Mesh it names.
    let meshed: std::collections::BTreeSet<String> = namespaces
        .iter()
        .filter(|n| n.labels().get(MESH_LABEL).is_some_and(|v| !v.is_empty()))
        .map(|n| n.name_any())
        .collect();
    let mut m = Model::default();
    for p in pods {
        if let Some(w) = workload_of(p, &meshed) {
            std::sync::Arc::make_mut(&mut m.workloads).insert(w.key(), std::sync::Arc::new(w));
        }
    }
    let labels = namespaces.iter().map(|n| (n.name_any(), n.labels().clone())).collect();
    m.set_namespaces(&labels);
    // In a fixed order (by name); which of two claiming one trust domain stands is the mesh
    // keeper's decision (the one in force).
    let mut meshes: Vec<&Arc<Mesh>> = meshes.iter().collect();
    meshes.sort_by_key(|x| x.name_any());
    for x in meshes {
        m.admit_mesh(&x.name_any(), &x.spec, "Mesh".into());
        if let Some(t) = &x.metadata.creation_timestamp {
            m.mesh_created.insert(x.name_any(), t.0.as_second());
        }
        let in_force = x.status.as_ref().is_some_and(|s| {
            s.observed_generation.is_some()
                && s.observed_generation == x.metadata.generation
                && s.conditions.iter().any(|c| c.type_ == "Accepted" && c.status == "True")
        });
        if in_force {
            m.mesh_in_force.insert(x.name_any());
        }
    }
    let mut slices_of: BTreeMap<(String, String), Vec<&EndpointSlice>> = BTreeMap::new();
    for s in slices {
        if let (Some(ns), Some(svc)) = (s.namespace(), s.labels().get(SERVICE_NAME_LABEL)) {
            slices_of.entry((ns, svc.clone())).or_default().push(s);
        }
    }
    let mut records: Vec<Service> = services
        .iter()
        .filter_map(|s| {
            let key = (s.namespace().unwrap_or_default(), s.name_any());
            service_of(s, slices_of.get(&key).map(Vec::as_slice).unwrap_or_default())
        })
        .collect();
    // The stores' order is arbitrary; the address check keeps the first of two claimants.
    records.sort_by_key(Service::key);
    // The error names the object: "Service ns/name rejected: ...".
    let records = records.into_iter().map(|s| (s, "Service".to_owned())).collect();
    m.admit_services(records, crate::model::Endpoints::Listed);
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

/// For watcher `i`'s stream: `(i, whether this event ends its initial list)`.
fn done<K, E>(i: usize) -> impl Fn(Result<watcher::Event<K>, E>) -> (usize, bool) {
    move |e| (i, matches!(e, Ok(watcher::Event::InitDone)))
}

/// Runs the reflectors and publishes a new model after every change. Mesh statuses carry the
/// mesh keeper's `verdicts`.
pub async fn run(
    client: Client,
    tx: tokio::sync::watch::Sender<Arc<Model>>,
    verdicts: Arc<crate::meshes::Verdicts>,
    election: Option<lease::Election>,
) {
    let (pods, pods_w) = reflector::store::<Pod>();
    let (mesh_store, meshes_w) = reflector::store::<Mesh>();
    let (nss, nss_w) = reflector::store::<Namespace>();
    let (aps, aps_w) = reflector::store::<AuthorizationPolicy>();
    let (pas, pas_w) = reflector::store::<PeerAuthentication>();
    let (svcs, svcs_w) = reflector::store::<KubeService>();
    let (eps, eps_w) = reflector::store::<EndpointSlice>();
    let cfg = watcher::Config::default();
    // Every watcher event (including the end of a re-list, when the store is swapped) triggers a
    // rebuild; errors back off instead of spinning.
    // Each stream says, per event, which watcher it is and whether that watcher's initial list
    // is complete (`InitDone`).
    let s1 = reflector(pods_w, watcher(Api::<Pod>::all(client.clone()), cfg.clone()).default_backoff()).map(done(0));
    let s2 =
        reflector(nss_w, watcher(Api::<Namespace>::all(client.clone()), cfg.clone()).default_backoff()).map(done(1));
    let s3 = reflector(aps_w, watcher(Api::<AuthorizationPolicy>::all(client.clone()), cfg.clone()).default_backoff())
        .map(done(2));
    let s4 = reflector(pas_w, watcher(Api::<PeerAuthentication>::all(client.clone()), cfg.clone()).default_backoff())
        .map(done(3));
    let s5 =
        reflector(svcs_w, watcher(Api::<KubeService>::all(client.clone()), cfg.clone()).default_backoff()).map(done(4));
    let s6 = reflector(eps_w, watcher(Api::<EndpointSlice>::all(client.clone()), cfg.clone()).default_backoff())
        .map(done(5));
    let s7 = reflector(meshes_w, watcher(Api::<Mesh>::all(client.clone()), cfg).default_backoff()).map(done(6));
    let mut all = futures::stream::select_all(vec![
        s1.boxed(),
        s2.boxed(),
        s3.boxed(),
        s4.boxed(),
        s5.boxed(),
        s6.boxed(),
        s7.boxed(),
    ]);
    let changed = Arc::new(tokio::sync::Notify::new());
    let stores = status::Stores { aps: aps.clone(), pas: pas.clone(), meshes: mesh_store.clone() };
    // One replica writes status: the Lease's holder (without an election, this one).
    let (leader_tx, leader) = tokio::sync::watch::channel(election.is_none());
    match election {
        Some(e) => tokio::spawn(lease::run(client.clone(), e, leader_tx)),
        // Kept, so that the writer never sees the choice end.
        None => tokio::spawn(async move {
            let _writer = leader_tx;
            std::future::pending::<()>().await
        }),
    };
    tokio::spawn(status::run(client.clone(), stores, verdicts, changed.clone(), leader));
    let mut version = 0u64;
    // Nothing is published until every watcher has listed once: a model built from some of the
    // stores (pods not listed yet, or namespaces) would tell agents that their pods left the
    // mesh, and they would release them.
    let mut listed = [false; 7];
    while let Some((i, init_done)) = all.next().await {
        listed[i] |= init_done;
        if !listed.iter().all(|l| *l) {
            continue;
        }
        changed.notify_one();
        let previous = tx.borrow().clone();
        let mut m = model_from(
            &pods.state(),
            &nss.state(),
            &mesh_store.state(),
            &svcs.state(),
            &eps.state(),
            &aps.state(),
            &pas.state(),
            &previous,
        );
        version += 1;
        m.version = version;
        m.accepted_at_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        let changed = {
            let cur = tx.borrow();
            cur.workloads != m.workloads
                || cur.services != m.services
                || cur.authz != m.authz
                || cur.peer_auth != m.peer_auth
                || cur.meshes != m.meshes
                || cur.namespace_meshes != m.namespace_meshes
                || cur.errors != m.errors
        };
        if changed {
            tracing::info!(
                version,
                workloads = m.workloads.len(),
                services = m.services.len(),
                policies = m.authz.len(),
                "configuration from the Kubernetes API"
            );
            let _ = tx.send(Arc::new(m));
        }
    }
}

pub mod lease;
pub mod roots;
pub mod status;

#[cfg(test)]
mod tests;
