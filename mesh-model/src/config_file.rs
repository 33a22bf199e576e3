//! One file of the controller's configuration directory: multi-document YAML holding
//! workloads, Services, Meshes, Namespaces and policies, in the same shapes as on Kubernetes
//! (`kind: AuthorizationPolicy` / `PeerAuthentication` / `Mesh` with metadata and spec;
//! `kind: Workload` and `kind: Service` with the record itself; `kind: Namespace` with the
//! labels that put its workloads in a mesh). Pure, and fuzzed (fuzz/: `config_file`); the
//! controller's `config_dir` watches the directory and assembles the model from these.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::policy::{AuthorizationPolicySpec, PeerAuthenticationSpec};
use crate::{MeshSpec, Service, Workload};

/// What one file holds, each item with the line its document starts on.
#[derive(Debug, Clone, Default)]
pub struct FileContents {
    pub workloads: Vec<Workload>,
    pub authz: Vec<Sourced<AuthorizationPolicySpec>>,
    pub peer: Vec<Sourced<PeerAuthenticationSpec>>,
    /// Services and the line each starts on.
    pub services: Vec<(usize, Service)>,
    pub meshes: Vec<Sourced<MeshSpec>>,
    /// Namespaces (line, name, labels).
    pub namespaces: Vec<(usize, String, BTreeMap<String, String>)>,
}

/// A policy and the line of its file where its document starts.
#[derive(Debug, Clone)]
pub struct Sourced<S> {
    pub line: usize,
    pub namespace: String,
    pub name: String,
    pub spec: S,
}

#[derive(Deserialize)]
struct Meta {
    name: String,
    #[serde(default = "default_ns")]
    namespace: String,
}

fn default_ns() -> String {
    "default".into()
}

/// `kind: Namespace` (only its name and labels are read).
#[derive(Deserialize)]
struct NamespaceDoc {
    #[serde(rename = "apiVersion")]
    api_version: String,
    metadata: NamespaceMeta,
}

#[derive(Deserialize)]
struct NamespaceMeta {
    name: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyDoc<S> {
    #[serde(rename = "apiVersion")]
    api_version: String,
    #[allow(dead_code)]
    kind: String,
    metadata: Meta,
    spec: S,
}

/// Parses one file. Errors name the file, the line and the reason.
pub fn parse_file(path: &Path, text: &str) -> Result<FileContents, String> {
    use crate::workload::documents;
    let mut out = FileContents::default();
    for doc in documents(path, text).map_err(|e| e.to_string())? {
        let start = doc.line;
        let at =
            |line: Option<usize>, reason: String| format!("{}:{}: {reason}", path.display(), line.unwrap_or(start));
        let kind = doc
            .kind(path, "Workload, Service, Mesh, Namespace, AuthorizationPolicy or PeerAuthentication")
            .map_err(|e| e.to_string())?;
        let doc_line = |e: &serde_yaml::Error| e.location().map(|l| start + l.line() - 1);
        let v = doc.value.clone();
        match kind {
            "Workload" => {
                let w = doc.workload(path).map_err(|e| e.to_string())?;
                if w.node.is_none() {
                    return Err(at(None, format!("Workload {}: no node; every workload is placed on a node", w.key())));
                }
                w.validate("").map_err(|e| at(None, e.to_string()))?;
                if w.mesh.is_some() {
                    return Err(at(None, format!("Workload {}: `mesh` is not set on a workload; it comes from its namespace's {} label, e.g.\n{}", w.key(), crate::mesh::MESH_LABEL, crate::mesh::MESH_EXAMPLE)));
                }
                out.workloads.push(w);
            }
            "Service" => {
                let svc: Service = doc.record(path, "Service").map_err(|e| e.to_string())?;
                svc.validate_source().map_err(|e| {
                    at(
                        None,
                        format!(
                            "Service {}/{}: {e}; a Service looks like\n{}",
                            svc.namespace,
                            svc.name,
                            crate::service::SERVICE_EXAMPLE
                        ),
                    )
                })?;
                out.services.push((start, svc));
            }
            "Mesh" => {
                let d: PolicyDoc<MeshSpec> = serde_yaml::from_value(v).map_err(|e| {
                    at(doc_line(&e), format!("Mesh: {e}; a Mesh looks like\n{}", crate::mesh::MESH_EXAMPLE))
                })?;
                check_api(&d.api_version).map_err(|r| at(None, r))?;
                d.spec.validate(&d.metadata.name).map_err(|e| at(None, format!("Mesh {}: {e}", d.metadata.name)))?;
                out.meshes.push(Sourced { line: start, namespace: String::new(), name: d.metadata.name, spec: d.spec });
            }
            "Namespace" => {
                let d: NamespaceDoc = serde_yaml::from_value(v).map_err(|e| at(doc_line(&e), format!("Namespace: {e}")))?;
                if d.api_version != "v1" {
                    return Err(at(None, format!("Namespace: apiVersion {:?}: expected \"v1\"", d.api_version)));
                }
                out.namespaces.push((start, d.metadata.name, d.metadata.labels));
            }
            "AuthorizationPolicy" => {
                let d: PolicyDoc<AuthorizationPolicySpec> =
                    serde_yaml::from_value(v).map_err(|e| at(doc_line(&e), format!("AuthorizationPolicy: {e}")))?;
                check_api(&d.api_version).map_err(|r| at(None, r))?;
                out.authz.push(Sourced {
                    line: start,
                    namespace: d.metadata.namespace,
                    name: d.metadata.name,
                    spec: d.spec,
                });
            }
            "PeerAuthentication" => {
                let d: PolicyDoc<PeerAuthenticationSpec> =
                    serde_yaml::from_value(v).map_err(|e| at(doc_line(&e), format!("PeerAuthentication: {e}")))?;
                check_api(&d.api_version).map_err(|r| at(None, r))?;
                out.peer.push(Sourced {
                    line: start,
                    namespace: d.metadata.namespace,
                    name: d.metadata.name,
                    spec: d.spec,
                });
            }
            other => {
                return Err(at(
                    None,
                    format!(
                        "unknown kind {other:?}: expected Workload, Service, Mesh, Namespace, AuthorizationPolicy or PeerAuthentication"
                    ),
                ))
            }
        }
    }
    Ok(out)
}

fn check_api(v: &str) -> Result<(), String> {
    let want = format!("{}/{}", crate::policy::GROUP, crate::policy::VERSION);
    if v == want {
        Ok(())
    } else {
        Err(format!("apiVersion {v:?}: expected {want:?}"))
    }
}
