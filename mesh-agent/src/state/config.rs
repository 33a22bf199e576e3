//! The configuration half of the snapshot: what the controller's last accepted push says, and
//! the decisions taken from it (authorization by mesh-model's engine, which workloads accept
//! plaintext under PeerAuthentication, and which addresses are Services).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use mesh_api::push::{Kind, ResourceId};
use mesh_identity::SpiffeId;
use mesh_model::authz::{Compiled, Facts, PolicyIndex, Verdict};
use mesh_model::policy::{MtlsMode, PeerAuthenticationSpec};
use mesh_model::{MeshRecord, Service, Workload, WorkloadKey};

use super::{KnownWorkload, LocalWorkload, Snapshot};

/// A PeerAuthentication as pushed.
#[derive(Debug, Clone)]
pub struct PeerAuth {
    pub namespace: String,
    pub name: String,
    pub spec: PeerAuthenticationSpec,
}

#[derive(Default)]
pub struct ConfigState {
    /// The controller's version of this configuration; 0 before the first push.
    pub version: u64,
    pub index: PolicyIndex,
    pub peer_auth: Vec<PeerAuth>,
    /// Every workload in the mesh, by address (for destinations and their identities).
    pub workloads: HashMap<IpAddr, Arc<KnownWorkload>>,
    /// The same by namespace/name: the controller's labels are what policies select on.
    pub by_key: HashMap<WorkloadKey, Arc<KnownWorkload>>,
    /// Services by virtual address: a connection to one goes to one of its endpoints.
    pub services: HashMap<IpAddr, Arc<ServiceEntry>>,
    /// Every Service (headless ones too) by `namespace/name`: for checking what a source
    /// says its client connected to, and for the admin API.
    pub services_by_key: BTreeMap<String, Arc<ServiceEntry>>,
    /// Services imported from other zones, by `namespace/name` (apart: they have the names of
    /// this zone's own Services).
    pub imported: BTreeMap<String, Arc<ServiceEntry>>,
    /// Other zones' gateways (address, identity), from the imports' endpoints: the pool keeps
    /// its tunnels to them across pushes.
    pub gateways: std::collections::HashSet<(SocketAddr, SpiffeId)>,
    /// Configuration the controller rejected (file, line, reason), as it reported it.
    pub rejected: Vec<String>,
    /// The meshes, the default one included, by name; empty when the cluster has only the
    /// default mesh (whose trust domain and roots are then the agent's flags).
    pub meshes: BTreeMap<String, Arc<MeshRecord>>,
    /// The pushed resources themselves, to which the next delta applies.
    pub resources: BTreeMap<ResourceId, String>,
}

/// A Service as pushed (endpoints listed), with the names its metrics carry.
#[derive(Debug)]
pub struct ServiceEntry {
    pub service: Service,
    /// `namespace/name`.
    pub key: String,
    /// Its endpoints' addresses, to check a claim without a walk.
    pub endpoint_addrs: std::collections::HashSet<IpAddr>,
    /// Istio's `destination_service`: `name.namespace.svc.cluster.local`.
    pub host: String,
}

/// A pushed resource this agent cannot use. The controller validated it, so this means the two
/// disagree (different versions, or a damaged file): the whole update is refused, because
/// leaving one resource out can change what the rest means (a dropped DENY allows, a dropped
/// sole ALLOW allows everything, a dropped STRICT means PERMISSIVE).
#[derive(Debug, thiserror::Error)]
#[error("{id}: {reason}")]
pub struct BuildError {
    pub id: String,
    pub reason: String,
}

impl ConfigState {
    /// The Service `key` (`namespace/name`) if `target` is one of its endpoints on one of its
    /// target ports: how a destination checks what a source says it connected to.
    pub fn service_of_endpoint(&self, key: &str, target: SocketAddr) -> Option<&Arc<ServiceEntry>> {
        self.services_by_key.get(key).filter(|s| {
            s.service.ports.iter().any(|p| p.target() == target.port()) && s.endpoint_addrs.contains(&target.ip())
        })
    }

    /// Builds the state from a push's resources, all of them or none.
    pub fn build(
        resources: BTreeMap<ResourceId, String>,
        version: u64,
        root: &str,
        trust_domain: &str,
    ) -> Result<ConfigState, BuildError> {
        let mut policies = Vec::new();
        let mut peer_auth = Vec::new();
        let mut workloads = Vec::new();
        let mut rejected = Vec::new();
        let mut services = Vec::new();
        let mut meshes = BTreeMap::new();
        let mut records = Vec::new();
        for (id, json) in &resources {
            let (ns, name) = (&id.namespace, &id.name);
            let bad = |reason: String| BuildError { id: id.to_string(), reason };
            match id.kind {
                Kind::AuthorizationPolicy => {
                    let spec = serde_json::from_str(json).map_err(|e| bad(e.to_string()))?;
                    policies.push(Compiled::compile(ns, name, &spec).map_err(|e| bad(e.to_string()))?);
                }
                Kind::PeerAuthentication => {
                    let spec: PeerAuthenticationSpec = serde_json::from_str(json).map_err(|e| bad(e.to_string()))?;
                    spec.validate().map_err(bad)?;
                    peer_auth.push(PeerAuth { namespace: ns.clone(), name: name.clone(), spec });
                }
                Kind::Workload => {
                    let w = serde_json::from_str::<Workload>(json).map_err(|e| bad(e.to_string()))?;
                    records.push((id, w));
                }
                Kind::Mesh => {
                    let m: MeshRecord = serde_json::from_str(json).map_err(|e| bad(e.to_string()))?;
                    // Its roots must be usable: a mesh whose peers could not be verified would
                    // refuse them all for a reason nobody could see.
                    mesh_identity::verify::TrustBundle::from_pems(&m.trust_domain, &m.roots)
                        .map_err(|e| bad(e.to_string()))?;
                    meshes.insert(m.name.clone(), Arc::new(m));
                }
                Kind::Service => {
                    let svc: Service = serde_json::from_str(json).map_err(|e| bad(e.to_string()))?;
                    svc.validate().map_err(bad)?;
                    // An endpoint in another zone must name identities a tunnel can require.
                    for r in svc.endpoints.iter().filter_map(|e| e.remote.as_ref()) {
                        for id in [&r.identity, &r.gateway_identity] {
                            SpiffeId::parse(id).map_err(|e| bad(format!("remote endpoint identity {id:?}: {e}")))?;
                        }
                    }
                    let key = format!("{}/{}", svc.namespace, svc.name);
                    let endpoint_addrs = svc.endpoints.iter().map(|e| e.address).collect();
                    services.push(Arc::new(ServiceEntry { host: svc.host(), key, endpoint_addrs, service: svc }));
                }
                Kind::Rejected => rejected.push(serde_json::from_str::<String>(json).map_err(|e| bad(e.to_string()))?),
                Kind::Unspecified => return Err(bad("an unspecified kind".into())),
            }
        }
        for (id, w) in records {
            let bad = |reason: String| BuildError { id: id.to_string(), reason };
            // Its identity is in its mesh's trust domain.
            let td = match &w.mesh {
                None => trust_domain,
                Some(m) => match meshes.get(m) {
                    Some(r) => r.trust_domain.as_str(),
                    None => return Err(bad(format!("its mesh {m} is not in the push"))),
                },
            };
            // A workload left out would be "not in the mesh" to every client here.
            let known =
                KnownWorkload::new(td, w).map_err(|e| bad(format!("its identity is not a valid SPIFFE ID: {e}")))?;
            workloads.push(known)
        }
        let mut state = ConfigState::from_known(version, workloads);
        state.meshes = meshes;
        state.index = PolicyIndex::new(root, policies);
        state.peer_auth = peer_auth;
        state.rejected = rejected;
        for svc in &services {
            for ip in &svc.service.addresses {
                // The controller gives each address to one Service or workload; a push that
                // does not is two versions disagreeing, refused whole like any other.
                if state.services.insert(*ip, svc.clone()).is_some() || state.workloads.contains_key(ip) {
                    let id = ResourceId::new(Kind::Service, &svc.service.namespace, &svc.service.name);
                    return Err(BuildError { id: id.to_string(), reason: format!("address {ip} is taken twice") });
                }
            }
        }
        // A Service imported from other zones has the name of the zone's own Service, if it
        // has one: what a source says it connected to is checked against the zone's own.
        let (imported, own): (Vec<_>, Vec<_>) = services.into_iter().partition(|s| s.service.imported);
        state.services_by_key = own.into_iter().map(|s| (s.key.clone(), s)).collect();
        state.gateways = imported
            .iter()
            .flat_map(|s| s.service.endpoints.iter().filter_map(|e| e.remote.as_ref()))
            .filter_map(|r| SpiffeId::parse(&r.gateway_identity).ok().map(|id| (r.gateway, id)))
            .collect();
        state.imported = imported.into_iter().map(|s| (s.key.clone(), s)).collect();
        state.resources = resources;
        Ok(state)
    }

    /// A state with only workloads, each with its identity computed once.
    fn from_known(version: u64, all: Vec<KnownWorkload>) -> ConfigState {
        let mut workloads = HashMap::new();
        let mut by_key = HashMap::new();
        for k in all {
            let k = Arc::new(k);
            for ip in &k.workload.ips {
                workloads.insert(*ip, k.clone());
            }
            by_key.insert(k.workload.key(), k);
        }
        ConfigState { version, workloads, by_key, ..Default::default() }
    }

    /// The mesh whose trust domain is `td` (`default_td`, the agent's own, is the default
    /// mesh's while no meshes are pushed).
    pub fn mesh_of_trust_domain<'a>(&'a self, td: &str, default_td: &str) -> Option<&'a str> {
        if self.meshes.is_empty() {
            return (td == default_td).then_some(mesh_model::mesh::DEFAULT_MESH);
        }
        self.meshes.values().find(|m| m.trust_domain == td).map(|m| m.name.as_str())
    }

    /// Whether workloads of mesh `server` accept peers of mesh `client`: their own mesh, and
    /// the meshes theirs trusts.
    pub fn accepts(&self, server: &str, client: &str) -> bool {
        server == client || self.meshes.get(server).is_some_and(|m| m.trust.iter().any(|t| t == client))
    }

    /// The mTLS mode for a workload's port: a selecting policy in its namespace, then its
    /// namespace's policy without selector, then the mesh-wide one (root namespace, no
    /// selector); a port-level setting beats the policy's own; PERMISSIVE if none says.
    #[cfg(test)]
    pub fn mtls_mode(&self, root: &str, namespace: &str, labels: &mesh_model::Labels, port: u16) -> MtlsMode {
        let default = mesh_model::mesh::DEFAULT_MESH;
        self.declared_mtls_mode(root, default, namespace, labels, port).unwrap_or(MtlsMode::Permissive)
    }

    /// [`ConfigState::mtls_mode`] when a PeerAuthentication says, for a workload of `mesh`: a
    /// policy naming another mesh does not apply, and the root namespace's mesh-wide one is
    /// the one for this mesh (the default mesh's when it names none).
    pub fn declared_mtls_mode(
        &self,
        root: &str,
        mesh: &str,
        namespace: &str,
        labels: &mesh_model::Labels,
        port: u16,
    ) -> Option<MtlsMode> {
        let level = |spec: &PeerAuthenticationSpec| -> MtlsMode {
            if let Some(m) = spec.port_level_mtls.get(&port.to_string()) {
                if m.mode != MtlsMode::Unset {
                    return m.mode;
                }
            }
            spec.mtls.as_ref().map(|m| m.mode).unwrap_or(MtlsMode::Unset)
        };
        let selects = |spec: &PeerAuthenticationSpec| {
            spec.selector.as_ref().is_some_and(|s| labels.contains_all(&s.match_labels))
        };
        let in_mesh = |p: &PeerAuth| match &p.spec.mesh {
            Some(m) => m == mesh,
            None => p.namespace != root || mesh == mesh_model::mesh::DEFAULT_MESH,
        };
        type Tier<'a> = Box<dyn Fn(&PeerAuth) -> bool + 'a>;
        let tiers: [Tier<'_>; 3] = [
            Box::new(|p| in_mesh(p) && p.namespace == namespace && selects(&p.spec)),
            Box::new(|p| in_mesh(p) && p.namespace == namespace && p.spec.selector.is_none()),
            Box::new(|p| in_mesh(p) && p.namespace == root && p.spec.selector.is_none()),
        ];
        for tier in tiers {
            for p in self.peer_auth.iter().filter(|p| tier(p)) {
                let m = level(&p.spec);
                if m != MtlsMode::Unset {
                    return Some(m);
                }
            }
        }
        None
    }
}

impl Snapshot {
    /// Decides a connection to a local workload, logging what AUDIT and dry-run policies saw.
    pub fn authorize(&self, wl: &LocalWorkload, facts: &Facts<'_>) -> Verdict {
        let rec = self.record_of(wl);
        let policies = self.config.index.for_workload_in(rec.mesh(), &wl.key().namespace, &rec.workload.labels);
        let v = mesh_model::authz::authorize(facts, &policies);
        for name in &v.audited {
            tracing::info!(target: "policy", policy = %name, workload = %wl.key(), principal = facts.principal.unwrap_or("-"), source = %facts.source_ip, port = facts.dst_port, "AUDIT policy matched");
        }
        for (name, action, matched) in &v.dry_run {
            tracing::info!(target: "policy", policy = %name, action = ?action, matched, workload = %wl.key(), principal = facts.principal.unwrap_or("-"), source = %facts.source_ip, port = facts.dst_port, "dry-run policy evaluated (not enforced)");
        }
        v
    }

    /// The PeerAuthentication mode for a local workload's port; where none says, its mesh's
    /// default (PERMISSIVE if that says nothing either).
    pub fn mtls_mode(&self, root: &str, wl: &LocalWorkload, port: u16) -> MtlsMode {
        let rec = self.record_of(wl);
        self.config
            .declared_mtls_mode(root, rec.mesh(), &wl.key().namespace, &rec.workload.labels, port)
            .or_else(|| self.config.meshes.get(rec.mesh()).and_then(|m| m.mtls_mode))
            .unwrap_or(MtlsMode::Permissive)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pa(ns: &str, name: &str, yaml: &str) -> PeerAuth {
        PeerAuth { namespace: ns.into(), name: name.into(), spec: serde_yaml::from_str(yaml).unwrap() }
    }

    fn labels(app: &str) -> mesh_model::Labels {
        [("app".to_owned(), app.to_owned())].into()
    }

    const ROOT: &str = "sockmesh-system";

    /// The three tiers in order, port-level settings over a policy's own, UNSET falling
    /// through, and PERMISSIVE when nothing says.
    #[test]
    fn mtls_mode_is_chosen_by_selector_then_namespace_then_mesh() {
        let mut s = ConfigState::default();
        let b = labels("b");
        assert_eq!(s.mtls_mode(ROOT, "default", &b, 80), MtlsMode::Permissive, "nothing says");

        s.peer_auth.push(pa(ROOT, "mesh", "mtls: {mode: STRICT}"));
        assert_eq!(s.mtls_mode(ROOT, "default", &b, 80), MtlsMode::Strict, "mesh-wide");
        assert_eq!(s.mtls_mode("other-root", "default", &b, 80), MtlsMode::Permissive, "only the root ns is mesh-wide");

        s.peer_auth.push(pa("default", "ns", "mtls: {mode: PERMISSIVE}"));
        assert_eq!(s.mtls_mode(ROOT, "default", &b, 80), MtlsMode::Permissive, "namespace beats mesh");
        assert_eq!(s.mtls_mode(ROOT, "prod", &b, 80), MtlsMode::Strict, "another namespace keeps the mesh's");

        s.peer_auth.push(pa(
            "default",
            "b-only",
            "selector: {matchLabels: {app: b}}\nmtls: {mode: STRICT}\nportLevelMtls: {\"9090\": {mode: PERMISSIVE}, \"9091\": {mode: UNSET}}",
        ));
        assert_eq!(s.mtls_mode(ROOT, "default", &b, 80), MtlsMode::Strict, "a selecting policy beats the namespace's");
        assert_eq!(s.mtls_mode(ROOT, "default", &b, 9090), MtlsMode::Permissive, "port level beats the policy's own");
        assert_eq!(s.mtls_mode(ROOT, "default", &b, 9091), MtlsMode::Strict, "UNSET at port level falls to the policy");
        assert_eq!(s.mtls_mode(ROOT, "default", &labels("c"), 80), MtlsMode::Permissive, "not selected");
        // A selector in another namespace selects nothing here.
        s.peer_auth.push(pa("prod", "x", "selector: {matchLabels: {app: c}}\nmtls: {mode: PERMISSIVE}"));
        assert_eq!(s.mtls_mode(ROOT, "default", &labels("c"), 80), MtlsMode::Permissive);
        assert_eq!(s.mtls_mode(ROOT, "prod", &labels("c"), 80), MtlsMode::Permissive);
        assert_eq!(s.mtls_mode(ROOT, "prod", &labels("d"), 80), MtlsMode::Strict);
    }

    /// A selector-less policy with UNSET mode defers to the next tier.
    #[test]
    fn unset_defers_to_the_next_tier() {
        let s = ConfigState {
            peer_auth: vec![pa("default", "ns", "mtls: {mode: UNSET}"), pa(ROOT, "mesh", "mtls: {mode: STRICT}")],
            ..Default::default()
        };
        assert_eq!(s.mtls_mode(ROOT, "default", &labels("b"), 80), MtlsMode::Strict);
    }

    #[test]
    fn a_push_builds_workloads_policies_and_reports_rejections() {
        let mut r = BTreeMap::new();
        r.insert(
            ResourceId::new(Kind::Workload, "default", "b"),
            r#"{"name":"b","namespace":"default","serviceAccount":"sa-b","ips":["10.0.0.2"]}"#.into(),
        );
        r.insert(
            ResourceId::new(Kind::AuthorizationPolicy, "default", "deny"),
            r#"{"action":"DENY","rules":[{"from":[{"source":{"principals":["*"]}}]}]}"#.into(),
        );
        r.insert(ResourceId::new(Kind::PeerAuthentication, "default", "s"), r#"{"mtls":{"mode":"STRICT"}}"#.into());
        r.insert(ResourceId::new(Kind::Rejected, "", "0000"), r#""bad.yaml:3: nope""#.into());
        let s = ConfigState::build(r.clone(), 3, ROOT, "cluster.local").unwrap();
        assert_eq!(s.version, 3);
        let b = &s.workloads[&"10.0.0.2".parse().unwrap()];
        assert_eq!(b.spiffe_id.to_string(), "spiffe://cluster.local/ns/default/sa/sa-b");
        assert_eq!(s.index.for_workload("default", &labels("b")).deny.len(), 1);
        assert_eq!(s.mtls_mode(ROOT, "default", &labels("b"), 80), MtlsMode::Strict);
        assert_eq!(s.rejected, vec!["bad.yaml:3: nope".to_owned()]);
        assert_eq!(s.resources.len(), 4);

        // A Service: found by its address, with its endpoints as pushed.
        let mut with_svc = r.clone();
        with_svc.insert(
            ResourceId::new(Kind::Service, "default", "web"),
            r#"{"name":"web","namespace":"default","addresses":["10.96.0.10"],"ports":[{"port":80,"targetPort":8080}],"selector":{"app":"b"},"endpoints":[{"address":"10.0.0.2","workload":"b"}]}"#.into(),
        );
        let s = ConfigState::build(with_svc.clone(), 5, ROOT, "cluster.local").unwrap();
        let web = &s.services[&"10.96.0.10".parse().unwrap()];
        assert_eq!(
            (web.host.as_str(), web.service.port(80).unwrap().target()),
            ("web.default.svc.cluster.local", 8080)
        );
        assert_eq!(s.services_by_key.len(), 1);
        let at = |a: &str| a.parse().unwrap();
        assert!(s.service_of_endpoint("default/web", at("10.0.0.2:8080")).is_some());
        for (key, target) in
            [("default/web", "10.0.0.2:80"), ("default/web", "10.0.0.9:8080"), ("default/db", "10.0.0.2:8080")]
        {
            assert!(s.service_of_endpoint(key, at(target)).is_none(), "{key} {target}");
        }
        // A Service on a workload's address is two versions disagreeing: refused whole.
        with_svc.insert(
            ResourceId::new(Kind::Service, "default", "on-b"),
            r#"{"name":"on-b","addresses":["10.0.0.2"],"ports":[{"port":80}]}"#.into(),
        );
        let e = ConfigState::build(with_svc, 6, ROOT, "cluster.local").err().expect("refused");
        assert!(e.reason.contains("taken twice"), "{e}");

        // One resource that does not decode refuses the whole update, whichever it is.
        for (kind, json) in [
            (Kind::AuthorizationPolicy, r#"{"action":"DENY","rules":[{"to":[{"operation":{"ports":["http"]}}]}]}"#),
            (Kind::AuthorizationPolicy, r#"{"action":"MAYBE"}"#),
            (Kind::PeerAuthentication, r#"{"mtls":{"mode":"SOMETIMES"}}"#),
            (Kind::Workload, r#"{"name":"x"}"#),
            // Decodes, but names no valid identity: left out, clients would see "not meshed".
            (Kind::Workload, r#"{"name":"x","serviceAccount":"sa x","ips":["10.0.0.9"]}"#),
            (Kind::Service, r#"{"name":"Web","ports":[{"port":80}]}"#),
        ] {
            let mut bad = r.clone();
            bad.insert(ResourceId::new(kind, "default", "broken"), json.into());
            let e = ConfigState::build(bad, 4, ROOT, "cluster.local").err().expect("refused");
            assert!(e.id.contains("broken"), "{e}");
        }
    }

    /// A workload of a mesh gets its SPIFFE ID in that mesh's trust domain; a push naming a mesh
    /// it does not define, or a mesh whose roots cannot be read, is refused whole; the mesh's
    /// default mTLS mode and what it trusts are read.
    #[test]
    fn workloads_of_a_mesh_get_its_trust_domain() {
        let root = mesh_identity::ca::Ca::generate_root("a.example").unwrap().cert_pem;
        let mesh = |roots: &str| {
            serde_json::json!({"name": "a", "trustDomain": "a.example", "roots": [roots], "trust": ["default"], "mtlsMode": "STRICT"})
                .to_string()
        };
        let mut r = BTreeMap::new();
        r.insert(
            ResourceId::new(Kind::Workload, "team-a", "x"),
            r#"{"name":"x","namespace":"team-a","serviceAccount":"sa-x","ips":["10.0.0.7"],"mesh":"a"}"#.into(),
        );
        r.insert(ResourceId::new(Kind::Mesh, "", "a"), mesh(&root));
        let s = ConfigState::build(r.clone(), 2, ROOT, "cluster.local").unwrap();
        let x = &s.workloads[&"10.0.0.7".parse().unwrap()];
        assert_eq!(x.spiffe_id.to_string(), "spiffe://a.example/ns/team-a/sa/sa-x");
        assert_eq!(x.mesh(), "a");
        assert!(s.accepts("a", "default") && s.accepts("a", "a") && !s.accepts("default", "a"));
        assert_eq!(s.meshes["a"].mtls_mode, Some(MtlsMode::Strict));

        let mut no_mesh = r.clone();
        no_mesh.remove(&ResourceId::new(Kind::Mesh, "", "a"));
        let e = ConfigState::build(no_mesh, 3, ROOT, "cluster.local").err().expect("refused");
        assert!(e.reason.contains("mesh a is not in the push"), "{e}");
        let mut bad_roots = r;
        bad_roots.insert(ResourceId::new(Kind::Mesh, "", "a"), mesh("not a certificate"));
        assert!(ConfigState::build(bad_roots, 4, ROOT, "cluster.local").is_err());
    }
}
