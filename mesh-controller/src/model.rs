//! The controller's one model of the mesh: workloads (who runs where, with which identity and
//! addresses), Services and policies. Sources (a local directory today; the Kubernetes API next) produce
//! it; the CA's node authorization and the push to agents read it.

use std::collections::BTreeMap;
use std::sync::Arc;

use mesh_model::authz::Compiled;
use mesh_model::mesh::{mesh_of_label, MESH_LABEL};
use mesh_model::policy::{AuthorizationPolicySpec, PeerAuthenticationSpec};
use mesh_model::{MeshRecord, MeshSpec, Service, Workload, WorkloadKey};

pub type Key = (String, String);

/// Where a source's Services get their endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoints {
    /// From the selector, resolved against the model's workloads (or the explicit list).
    FromSelector,
    /// As the source listed them, sorted and deduplicated (EndpointSlices).
    Listed,
}

#[derive(Debug, Clone, Default)]
pub struct Model {
    /// Shared with the source's copies and the models before and after: a change copies
    /// pointers, not a hundred thousand records. The map itself is shared too: the mesh keeper
    /// copies the source's model, and copies this map only to take out the workloads of a
    /// mesh that is not there.
    pub workloads: Arc<BTreeMap<WorkloadKey, Arc<Workload>>>,
    /// Shared like `workloads`.
    pub authz: Arc<BTreeMap<Key, AuthorizationPolicySpec>>,
    pub peer_auth: BTreeMap<Key, PeerAuthenticationSpec>,
    /// Services with their endpoints resolved (selectors against `workloads`), or as the source
    /// listed them (Kubernetes EndpointSlices).
    pub services: BTreeMap<Key, Service>,
    /// Meshes besides the default one, by name (each valid on its own; the mesh keeper checks
    /// them against each other and gives each its CA).
    pub meshes: BTreeMap<String, MeshSpec>,
    /// When each Mesh was created (seconds since the epoch), where the source knows it
    /// (Kubernetes' `creationTimestamp`): of two claiming one trust domain the older stands,
    /// decided the same way by every controller replica, whatever each admitted before.
    pub mesh_created: BTreeMap<String, i64>,
    /// Meshes whose status says their current spec was accepted (`Accepted=True` for their
    /// generation), where the source has status: in force, whichever replica wrote it, so
    /// one keeps its trust domain against any other Mesh claiming it (an older one edited to
    /// it included).
    pub mesh_in_force: std::collections::BTreeSet<String>,
    /// Namespaces labelled for a mesh other than the default: namespace -> mesh name.
    pub namespace_meshes: BTreeMap<String, String>,
    /// What agents are told about each mesh, the default one included (filled by the mesh
    /// keeper); empty when there is only the default mesh, so that such a cluster's pushes are
    /// what they were before meshes existed.
    pub mesh_records: BTreeMap<String, MeshRecord>,
    /// What was rejected and why (path, line, reason), for the operator.
    pub errors: Vec<String>,
    pub version: u64,
    pub accepted_at_ms: i64,
}

impl Model {
    /// Admits an AuthorizationPolicy if it compiles. If not, it is rejected whole: the version
    /// `previous` (the model in force) has of it stays in force — an edit that breaks a DENY
    /// must not lift it — and a policy never valid is not applied. `what` names it for the
    /// error (file and line, or the object).
    pub fn admit_authz(&mut self, previous: &Model, key: Key, spec: &AuthorizationPolicySpec, what: String) {
        let checked = Compiled::compile(&key.0, &key.1, spec).map(drop).map_err(|e| e.to_string());
        admit(Arc::make_mut(&mut self.authz), &previous.authz, key, spec, checked, what, &mut self.errors);
    }

    /// [`Model::admit_authz`] for a PeerAuthentication.
    pub fn admit_peer_auth(&mut self, previous: &Model, key: Key, spec: &PeerAuthenticationSpec, what: String) {
        let checked = spec.validate().map_err(|e| e.to_string());
        admit(&mut self.peer_auth, &previous.peer_auth, key, spec, checked, what, &mut self.errors);
    }

    /// Records which namespaces are in which mesh (from their `sockmesh.io/mesh` label) and
    /// puts each workload in its namespace's mesh. Call after the workloads are in.
    pub fn set_namespaces(&mut self, labels: &BTreeMap<String, BTreeMap<String, String>>) {
        for (ns, l) in labels {
            if let Some(mesh) = l.get(MESH_LABEL).and_then(|v| mesh_of_label(v)) {
                self.namespace_meshes.insert(ns.clone(), mesh.to_owned());
            }
        }
        // A shared map is copied only when some workload's mesh changes.
        let meshes = &self.namespace_meshes;
        if self.workloads.values().all(|w| w.mesh.as_ref() == meshes.get(&w.namespace)) {
            return;
        }
        for w in Arc::make_mut(&mut self.workloads).values_mut() {
            let mesh = meshes.get(&w.namespace);
            if w.mesh.as_ref() != mesh {
                Arc::make_mut(w).mesh = mesh.cloned();
            }
        }
    }

    /// Admits a Mesh that is valid on its own; `what` names it for the error.
    pub fn admit_mesh(&mut self, name: &str, spec: &MeshSpec, what: String) {
        let checked = if self.meshes.contains_key(name) {
            Err("defined twice; the first definition stands".to_owned())
        } else {
            spec.validate(name)
        };
        match checked {
            Ok(()) => {
                self.meshes.insert(name.to_owned(), spec.clone());
            }
            Err(e) => {
                let e = format!("{what} {name} rejected: {e}");
                tracing::error!(error = %e, "Mesh rejected; its namespaces' workloads get no certificates");
                self.errors.push(e);
            }
        }
    }

    /// Admits Services read from a source (each with what names it for an error: file and
    /// line, or the object). Call after the workloads are in. With [`Endpoints::FromSelector`]
    /// a selector is resolved against them (config directory); with [`Endpoints::Listed`] the
    /// source listed the endpoints itself (Kubernetes EndpointSlices) and a selector is carried
    /// for information only. A Service that is invalid, defined a second time, or whose address
    /// is a workload's or an earlier Service's, is left out whole and reported; the others stand.
    pub fn admit_services(&mut self, services: Vec<(Service, String)>, endpoints: Endpoints) {
        let mut valid: Vec<(Service, String)> = Vec::new();
        for (s, what) in services {
            if let Some((_, first)) = valid.iter().find(|(v, _)| v.key() == s.key()) {
                let e = format!("defined twice; the first definition ({first}) stands");
                self.reject_service(&what, &s, &e);
                continue;
            }
            let checked = match endpoints {
                Endpoints::FromSelector => s.validate_source(),
                Endpoints::Listed => s.validate(),
            };
            match checked {
                Ok(()) => valid.push((s, what)),
                Err(e) => self.reject_service(&what, &s, &e),
            }
        }
        let verdicts =
            mesh_model::service::check_addresses(valid.iter().map(|(s, _)| s), self.workloads.values().map(|w| &**w));
        for ((s, what), verdict) in valid.into_iter().zip(verdicts) {
            match verdict {
                Err(e) => self.reject_service(&what, &s, &e),
                Ok(()) => {
                    let s = match endpoints {
                        Endpoints::FromSelector => s.resolved(self.workloads.values().map(|w| &**w)),
                        Endpoints::Listed => s,
                    };
                    self.services.insert(s.key(), s);
                }
            }
        }
    }

    fn reject_service(&mut self, what: &str, s: &Service, e: &str) {
        let e = format!("{what} {}/{} rejected: {e}", s.namespace, s.name);
        tracing::error!(error = %e, "Service rejected; the rest of the configuration stays in force");
        self.errors.push(e);
    }

    pub fn placement(&self) -> crate::placement::Placement {
        crate::placement::Placement::from_workloads(self.workloads.values())
    }
}

fn admit<S: Clone>(
    into: &mut BTreeMap<Key, S>,
    previous: &BTreeMap<Key, S>,
    key: Key,
    spec: &S,
    checked: Result<(), String>,
    what: String,
    errors: &mut Vec<String>,
) {
    let Err(e) = checked else {
        into.insert(key, spec.clone());
        return;
    };
    let e = match previous.get(&key) {
        Some(kept) => {
            into.insert(key, kept.clone());
            format!("{what} rejected whole: {e}; its previous version stays in force")
        }
        None => format!("{what} rejected whole: {e}; not applied"),
    };
    tracing::error!(error = %e, "policy rejected; the rest of the configuration stays in force");
    errors.push(e);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> Model {
        let text = "kind: Workload\nname: a\nnamespace: shop\nips: [10.0.0.1]\nnode: n1\n---\nkind: Workload\nname: b\nnamespace: blog\nips: [10.0.0.2]\nnode: n1\n";
        let ws = mesh_model::workload::parse_str(std::path::Path::new("w"), text).unwrap();
        let mut m = Model::default();
        Arc::make_mut(&mut m.workloads).extend(ws.into_iter().map(|w| (w.key(), Arc::new(w))));
        m
    }

    /// `set_namespaces` on a model that shares its map of workloads: with no workload's mesh to
    /// change, the map stays shared; a namespace moved to another mesh copies the map, changes
    /// only that namespace's records, and leaves the other model's as they were.
    #[test]
    fn a_copy_shares_the_workloads_until_a_namespace_changes_mesh() {
        let mut source = model();
        source.set_namespaces(&BTreeMap::new());
        let mut copy = source.clone();
        copy.set_namespaces(&BTreeMap::new());
        assert!(Arc::ptr_eq(&copy.workloads, &source.workloads), "the map was copied with nothing to change");

        let labels =
            BTreeMap::from([("shop".to_owned(), BTreeMap::from([(MESH_LABEL.to_owned(), "payments".to_owned())]))]);
        copy.set_namespaces(&labels);
        assert!(!Arc::ptr_eq(&copy.workloads, &source.workloads));
        let key = |ns: &str, n: &str| WorkloadKey { namespace: ns.into(), name: n.into() };
        assert_eq!(copy.workloads[&key("shop", "a")].mesh.as_deref(), Some("payments"));
        assert_eq!(source.workloads[&key("shop", "a")].mesh, None, "the source's record changed");
        assert!(Arc::ptr_eq(&copy.workloads[&key("blog", "b")], &source.workloads[&key("blog", "b")]));
    }
}
