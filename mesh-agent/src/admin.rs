//! The agent's HTTP endpoints: the admin API (localhost only; config dump, workloads, policies,
//! certificates, connections, Services, stats, status), Prometheus metrics, and readiness. Every answer
//! is a typed record of `mesh_api::admin`, the same types `meshctl` reads.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use axum::Router;
use mesh_api::admin::{self, paths, LinkInfo, PolicyInfo, PolicyKind, Readiness, Stats, Status};
use mesh_model::policy::MtlsMode;

use crate::config::Config;
use crate::connections::Connections;
use crate::ebpf::maps::Lookup;
use crate::ebpf::maps::{Census, BOUNDED_MAPS};
use crate::ebpf::LinkReport;
use crate::identity::Identities;
use crate::inputs::Phase;
use crate::metrics::Metrics;
use crate::outcome::Direction;
use crate::registration::Registry;
use crate::state::StateStore;

/// What the admin views read.
pub struct Views {
    pub config: Config,
    pub registry: Arc<Registry>,
    pub identities: Arc<Identities>,
    pub conns: Arc<Connections>,
    pub metrics: Arc<Metrics>,
    pub state: Arc<StateStore>,
    pub census: Arc<Mutex<Census>>,
    pub links: Vec<LinkReport>,
    pub lookup: Lookup,
    pub loads: Arc<crate::balance::Loads>,
    pub lifecycle: Arc<crate::inputs::Lifecycle>,
}

impl Views {
    /// The kernel counters, read now (a few lookups; map fill comes from the last census).
    async fn refresh_counters(&self) {
        let (census, metrics) = (self.census.clone(), self.metrics.clone());
        let _ = tokio::task::spawn_blocking(move || {
            census.lock().unwrap_or_else(|e| e.into_inner()).read_counters(&metrics)
        })
        .await;
    }

    pub async fn stats(&self) -> Stats {
        self.refresh_counters().await;
        let m = &self.metrics;
        Stats {
            node: self.config.node.clone(),
            kernel: m.kernel_stats(),
            maps: m.map_stats(&BOUNDED_MAPS),
            outbound: m.direction_stats(Direction::Outbound),
            inbound: m.direction_stats(Direction::Inbound),
            hbone: m.hbone_stats(),
            certificates: m.cert_stats(),
            config: m.config_stats(),
            reclaimed_entries: m.reclaimed(),
            limits: m.limit_stats(&crate::limits::Limit::ALL.map(|l| l.label())),
        }
    }

    /// The node-wide links: whether this agent took them over, and whether they are still
    /// pinned (attached).
    pub fn links(&self) -> Vec<LinkInfo> {
        self.links
            .iter()
            .map(|l| LinkInfo {
                name: l.name.to_owned(),
                adopted: l.adopted,
                attached: self.config.bpffs_dir.join("links").join(l.name).exists(),
            })
            .collect()
    }

    /// What this agent lacks to serve the workloads it captured: a configuration, and a
    /// certificate for each. A successor waits for none before it takes over.
    pub fn unable_to_serve(&self) -> Vec<String> {
        let snap = self.state.load();
        let mut missing = Vec::new();
        if snap.config.version == 0 {
            missing.push("no configuration received from the controller yet".to_owned());
        }
        for wl in snap.local.by_key.values() {
            if self.identities.current(&wl.spiffe_id()).is_none() {
                missing.push(format!("{} has no certificate", wl.key()));
            }
        }
        missing
    }

    /// Ready: the programs are attached (pins present), a configuration is in force (pushed,
    /// or kept from the last run), every workload of this node is captured, and every captured
    /// one has a certificate. Otherwise, what is missing.
    pub async fn readiness(&self) -> Readiness {
        let mut missing = Vec::new();
        match self.lifecycle.phase() {
            Phase::Serving => {}
            Phase::Starting => missing.push("taking over from the agent running on this node".to_owned()),
            Phase::Draining => missing.push("handed over to a successor; draining".to_owned()),
        }
        for l in self.links().into_iter().filter(|l| !l.attached) {
            missing.push(format!("{} program not attached", l.name));
        }
        let snap = self.state.load();
        if snap.config.version == 0 {
            missing.push("no configuration received from the controller yet".to_owned());
        }
        for (key, reason) in self.registry.not_captured().await {
            missing.push(format!("{key} is not captured (its connections are refused): {reason}"));
        }
        for wl in snap.local.by_key.values() {
            if self.identities.current(&wl.spiffe_id()).is_none() {
                missing.push(format!("{} has no certificate", wl.key()));
            }
        }
        Readiness { ready: missing.is_empty(), missing }
    }

    /// The policies that select this node's workloads, PeerAuthentications, and what the
    /// controller rejected.
    pub fn policies(&self) -> Vec<PolicyInfo> {
        let snap = self.state.load();
        let mut out: BTreeMap<String, PolicyInfo> = BTreeMap::new();
        for wl in snap.local.by_key.values() {
            let rec = snap.record_of(wl);
            let ps = snap.config.index.for_workload_in(rec.mesh(), &wl.key().namespace, &rec.workload.labels);
            for (list, action) in
                [(&ps.deny, "DENY"), (&ps.allow, "ALLOW"), (&ps.audit, "AUDIT"), (&ps.dry_run, "DRY-RUN")]
            {
                for p in list {
                    let e = out.entry(p.name.clone()).or_insert_with(|| PolicyInfo {
                        namespace: p.namespace.clone(),
                        name: p.name.split_once('/').map(|(_, n)| n).unwrap_or(&p.name).to_owned(),
                        kind: PolicyKind::AuthorizationPolicy,
                        action: action.into(),
                        workloads: Vec::new(),
                        reason: None,
                    });
                    e.workloads.push(wl.key().to_string());
                }
            }
        }
        if let Some(why) = self.state.refused() {
            let info = PolicyInfo {
                namespace: "-".into(),
                name: "(configuration update)".into(),
                kind: PolicyKind::Rejected,
                action: "REFUSED".into(),
                workloads: Vec::new(),
                reason: Some(format!("{why} (in force: version {})", snap.config.version)),
            };
            out.insert("~refused".into(), info);
        }
        for (i, e) in snap.config.rejected.iter().enumerate() {
            // The controller's message names the file, line, kind and policy; it is the reason.
            let info = PolicyInfo {
                namespace: "-".into(),
                name: "-".into(),
                kind: PolicyKind::Rejected,
                action: "INVALID".into(),
                workloads: Vec::new(),
                reason: Some(e.clone()),
            };
            out.insert(format!("~invalid-{i:04}"), info);
        }
        for p in &snap.config.peer_auth {
            let mode = p.spec.mtls.as_ref().map(|m| m.mode).unwrap_or_default();
            let mode = match mode {
                MtlsMode::Strict => "STRICT",
                MtlsMode::Permissive => "PERMISSIVE",
                MtlsMode::Unset => "UNSET",
            };
            let info = PolicyInfo {
                namespace: p.namespace.clone(),
                name: p.name.clone(),
                kind: PolicyKind::PeerAuthentication,
                action: format!("MTLS {mode}"),
                workloads: Vec::new(),
                reason: None,
            };
            out.insert(format!("{}/{}#pa", p.namespace, p.name), info);
        }
        out.into_values().collect()
    }

    /// The Services this agent resolves, each endpoint with the workload and identity a
    /// connection to it requires, its readiness and the connections carried to it now.
    pub fn services(&self) -> Vec<admin::ServiceInfo> {
        let snap = self.state.load();
        snap.config
            .services_by_key
            .values()
            .chain(snap.config.imported.values())
            .map(|e| {
                let s = &e.service;
                admin::ServiceInfo {
                    namespace: s.namespace.clone(),
                    name: s.name.clone(),
                    imported: s.imported,
                    addresses: s.addresses.clone(),
                    ports: s.ports.iter().map(|p| (p.port, p.target())).collect(),
                    endpoints: s
                        .endpoints
                        .iter()
                        .map(|ep| match &ep.remote {
                            // In another zone: its address means nothing here.
                            Some(r) => admin::EndpointInfo {
                                address: ep.address,
                                workload: None,
                                identity: Some(r.identity.clone()),
                                ready: ep.ready,
                                in_flight: self.loads.get(&crate::balance::LoadKey::of(ep)),
                                zone: Some(r.zone.clone()),
                            },
                            None => {
                                let wl = snap.destination(ep.address);
                                admin::EndpointInfo {
                                    address: ep.address,
                                    workload: wl.map(|w| w.key.to_string()),
                                    identity: wl.map(|w| w.spiffe_id.to_string()),
                                    ready: ep.ready,
                                    in_flight: self.loads.get(&crate::balance::LoadKey::of(ep)),
                                    zone: None,
                                }
                            }
                        })
                        .collect(),
                }
            })
            .collect()
    }

    /// The meshes (just the default one, from the agent's flags, while the controller pushes
    /// none), and what the controller reported about meshes it could not admit.
    pub fn meshes(&self) -> admin::Meshes {
        let snap = self.state.load();
        let root_expiry = |roots: &[String]| {
            roots
                .iter()
                .flat_map(|p| mesh_identity::verify::pem_to_ders(p))
                .filter_map(|d| mesh_identity::verify::not_after(&d))
                .min()
        };
        let mut meshes: Vec<admin::MeshInfo> = snap
            .config
            .meshes
            .values()
            .map(|m| admin::MeshInfo {
                name: m.name.clone(),
                trust_domain: m.trust_domain.clone(),
                trust: m.trust.clone(),
                namespaces: m.namespaces.clone(),
                root_not_after: root_expiry(&m.roots),
                mtls_mode: format!("{:?}", m.mtls_mode.unwrap_or(mesh_model::policy::MtlsMode::Permissive))
                    .to_uppercase(),
            })
            .collect();
        if meshes.is_empty() {
            let mut namespaces: Vec<String> = snap.config.by_key.keys().map(|k| k.namespace.clone()).collect();
            namespaces.sort();
            namespaces.dedup();
            let roots = self.identities.trust.default_roots();
            meshes.push(admin::MeshInfo {
                name: mesh_model::mesh::DEFAULT_MESH.into(),
                trust_domain: self.config.trust_domain.clone(),
                trust: vec![],
                namespaces,
                root_not_after: root_expiry(roots),
                mtls_mode: "PERMISSIVE".into(),
            });
        }
        // How the controller words what it could not admit about meshes.
        let problems = snap
            .config
            .rejected
            .iter()
            .filter(|e| e.contains("Mesh ") || e.contains(mesh_model::mesh::MESH_LABEL))
            .cloned()
            .collect();
        admin::Meshes { meshes, problems }
    }

    pub async fn status(&self) -> Status {
        let ready = self.readiness().await;
        Status {
            node: self.config.node.clone(),
            ready: ready.ready,
            not_ready: ready.missing,
            links: self.links(),
            orig_dst_lookup: self.lookup.as_str().to_owned(),
            workloads: self.state.load().local.by_key.len(),
            connections: self.conns.count(),
            controller: self.config.controller.join(", "),
            stats: self.stats().await,
        }
    }

    pub fn config_dump(&self) -> admin::ConfigDump {
        admin::ConfigDump {
            config: serde_json::to_value(&self.config).unwrap_or_default(),
            workloads: self.registry.list(),
            policies: self.policies(),
            config_version: self.state.load().config.version,
            certificates: self.identities.certs(),
            links: self.links(),
        }
    }
}

type S = State<Arc<Views>>;

pub async fn bind(addr: SocketAddr, what: &str) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(e.kind(), format!("{what} on {addr}: {e}; is another agent running on this node?"))
    })
}

pub async fn serve_admin(views: Arc<Views>, listener: tokio::net::TcpListener) {
    let app = Router::new()
        .route("/", get(|| async { Json(serde_json::json!({ "endpoints": paths::ALL })) }))
        .route(paths::CONFIG_DUMP, get(|State(v): S| async move { Json(v.config_dump()) }))
        .route(paths::WORKLOADS, get(|State(v): S| async move { Json(v.registry.list()) }))
        .route(paths::POLICIES, get(|State(v): S| async move { Json(v.policies()) }))
        .route(paths::CERTIFICATES, get(|State(v): S| async move { Json(v.identities.certs()) }))
        .route(paths::CONNECTIONS, get(|State(v): S| async move { Json(v.conns.list()) }))
        .route(paths::SERVICES, get(|State(v): S| async move { Json(v.services()) }))
        .route(paths::MESHES, get(|State(v): S| async move { Json(v.meshes()) }))
        .route(paths::STATS, get(|State(v): S| async move { Json(v.stats().await) }))
        .route(paths::STATUS, get(|State(v): S| async move { Json(v.status().await) }))
        .with_state(views);
    let _ = axum::serve(listener, app).await;
}

pub async fn serve_metrics(views: Arc<Views>, listener: tokio::net::TcpListener) {
    let app = Router::new().route("/metrics", get(metrics)).route("/stats/prometheus", get(metrics)).with_state(views);
    let _ = axum::serve(listener, app).await;
}

pub async fn serve_readiness(views: Arc<Views>, listener: tokio::net::TcpListener) {
    let app = Router::new().route(paths::READY, get(ready)).with_state(views);
    let _ = axum::serve(listener, app).await;
}

async fn metrics(State(v): S) -> Response {
    v.refresh_counters().await;
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], v.metrics.encode())
        .into_response()
}

async fn ready(State(v): S) -> Response {
    let r = v.readiness().await;
    let code = if r.ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, Json(r)).into_response()
}
