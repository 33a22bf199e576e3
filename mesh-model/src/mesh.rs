//! Meshes: trust boundaries sharing nodes. Each mesh has its own trust domain and CA; a
//! namespace joins one with the label `sockmesh.io/mesh=<name>` (`enabled`, or no Mesh at all,
//! is the default mesh, whose trust domain and CA are the controller's flags). A workload's
//! SPIFFE ID is in its mesh's trust domain, and an agent verifies a peer against the trust of
//! the mesh of the workload it serves: identities of other meshes are refused unless that mesh
//! lists them under `trust` (federation).

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::policy::{MtlsMode, PolicyStatus};

/// A namespace joins a mesh with this label.
pub const MESH_LABEL: &str = "sockmesh.io/mesh";
/// The label value that joins the default mesh (kept from before there were several meshes).
pub const MESH_ENABLED: &str = "enabled";
/// The default mesh's name: the trust domain and CA given to the controller by its flags.
pub const DEFAULT_MESH: &str = "default";

/// The mesh a namespace label value names: `None` for the default mesh.
pub fn mesh_of_label(value: &str) -> Option<&str> {
    match value {
        MESH_ENABLED | DEFAULT_MESH => None,
        other => Some(other),
    }
}

/// A mesh: a trust domain, its CA, and what its workloads accept.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[kube(
    group = "security.sockmesh.io",
    version = "v1alpha1",
    kind = "Mesh",
    status = "PolicyStatus",
    printcolumn = r#"{"name":"Trust domain","type":"string","jsonPath":".spec.trustDomain"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[serde(deny_unknown_fields)]
pub struct MeshSpec {
    /// The trust domain of this mesh's SPIFFE IDs (`spiffe://<trustDomain>/ns/<ns>/sa/<sa>`);
    /// unique among meshes.
    pub trust_domain: String,
    /// The CA that signs this mesh's certificates. Absent: the controller generates a root for
    /// the mesh and keeps it in its state directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<MeshCa>,
    /// The mTLS mode of this mesh's workloads where no PeerAuthentication says (PERMISSIVE
    /// when absent, as for the default mesh).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls_mode: Option<MtlsMode>,
    /// Lifetime of this mesh's workload certificates, in seconds (the controller's
    /// `--cert-ttl` when absent; capped by its `--max-cert-ttl`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_ttl_seconds: Option<u64>,
    /// Meshes whose workloads this mesh's workloads accept as peers (federation). Their
    /// principals are then named in this mesh's policies with their trust domain, and still
    /// need a policy that allows them when the workload's policy is an allow-list.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trust: Vec<String>,
}

/// An operator-provided CA: files readable by the controller (on Kubernetes, a Secret mounted
/// into its pod). `certFile` may be a root or an intermediate; `chainFile` holds the
/// certificates above it up to the root.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[serde(deny_unknown_fields)]
pub struct MeshCa {
    pub cert_file: String,
    pub key_file: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain_file: Option<String>,
}

/// How one Mesh document looks (config directory); errors show it.
pub const MESH_EXAMPLE: &str = "apiVersion: security.sockmesh.io/v1alpha1\nkind: Mesh\nmetadata: {name: payments}\nspec:\n  trustDomain: payments.example\n  trust: [default]          # optional: accept identities of these meshes\n---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: pay\n  labels: {sockmesh.io/mesh: payments}";

/// Whether `td` is a SPIFFE trust domain: lowercase letters, digits, `.`, `-`, `_`, at most
/// 255 bytes.
pub fn valid_trust_domain(td: &str) -> bool {
    !td.is_empty()
        && td.len() <= 255
        && td.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_'))
}

impl MeshSpec {
    /// Why this mesh cannot be admitted on its own (see [`check_meshes`] for what depends on
    /// the others).
    pub fn validate(&self, name: &str) -> Result<(), String> {
        if name == DEFAULT_MESH || name == MESH_ENABLED {
            return Err(format!(
                "the name {name:?} is the default mesh's, configured by the controller's --trust-domain and CA flags; give this mesh another name"
            ));
        }
        if !crate::workload::is_dns_label(name) {
            return Err(format!("name {name:?}: lowercase letters, digits and '-', at most 63, as a label value"));
        }
        if !valid_trust_domain(&self.trust_domain) {
            return Err(format!(
                "trustDomain {:?}: not a SPIFFE trust domain (lowercase letters, digits, '.', '-', '_')",
                self.trust_domain
            ));
        }
        if self.cert_ttl_seconds == Some(0) {
            return Err("certTtlSeconds: must be positive".into());
        }
        if self.mtls_mode == Some(MtlsMode::Unset) {
            return Err("mtlsMode: STRICT or PERMISSIVE (leave it out for PERMISSIVE)".into());
        }
        if self.trust.iter().any(|t| t == name) {
            return Err("trust: a mesh always accepts its own workloads; list other meshes".into());
        }
        if let Some(ca) = &self.ca {
            if ca.cert_file.is_empty() || ca.key_file.is_empty() {
                return Err("ca: certFile and keyFile are both needed".into());
            }
        }
        Ok(())
    }
}

/// The verdict on each of `meshes` (in order, those in force first; each valid on its own),
/// given the default mesh's trust domain: a trust domain taken by an earlier mesh (or the
/// default) is refused. (Trust in a mesh that is not there is the keeper's to leave out.)
pub fn check_meshes<'a>(
    default_trust_domain: &str,
    meshes: impl IntoIterator<Item = (&'a str, &'a MeshSpec)>,
) -> Vec<Result<(), String>> {
    let meshes: Vec<(&str, &MeshSpec)> = meshes.into_iter().collect();
    let mut taken: Vec<(&str, &str)> = vec![(default_trust_domain, DEFAULT_MESH)];
    let mut out = Vec::new();
    for (name, spec) in &meshes {
        if let Some((_, other)) = taken.iter().find(|(td, _)| *td == spec.trust_domain) {
            out.push(Err(format!("trustDomain {:?} is mesh {other}'s; each mesh needs its own", spec.trust_domain)));
            continue;
        }
        taken.push((&spec.trust_domain, name));
        out.push(Ok(()));
    }
    out
}

/// What an agent is told about a mesh (configuration push): its trust domain and roots, the
/// meshes its workloads accept, its default mTLS mode, and its namespaces (for display).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshRecord {
    pub name: String,
    pub trust_domain: String,
    /// PEM root certificates of this mesh's CA.
    pub roots: Vec<String>,
    /// Names of the meshes whose identities this mesh's workloads accept (not itself).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trust: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls_mode: Option<MtlsMode>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
}

/// The CRD manifest, as `cargo xtask codegen` writes it to deploy/crds/.
pub fn crd_yaml() -> (&'static str, String) {
    use kube::CustomResourceExt;
    ("meshes.security.sockmesh.io.yaml", serde_yaml::to_string(&Mesh::crd()).expect("CRD serialises"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(td: &str, trust: &[&str]) -> MeshSpec {
        MeshSpec { trust_domain: td.into(), trust: trust.iter().map(|s| s.to_string()).collect(), ..Default::default() }
    }

    #[test]
    fn a_mesh_is_checked_alone_and_against_the_others() {
        assert!(spec("a.example", &[]).validate("a").is_ok());
        for (name, s, want) in [
            ("default", spec("x.example", &[]), "default mesh"),
            ("enabled", spec("x.example", &[]), "default mesh"),
            ("A", spec("x.example", &[]), "name"),
            ("a", spec("X.example", &[]), "trustDomain"),
            ("a", spec("", &[]), "trustDomain"),
            ("a", spec("a.example", &["a"]), "its own"),
            ("a", MeshSpec { cert_ttl_seconds: Some(0), ..spec("a.example", &[]) }, "certTtlSeconds"),
            ("a", MeshSpec { mtls_mode: Some(MtlsMode::Unset), ..spec("a.example", &[]) }, "mtlsMode"),
        ] {
            let e = s.validate(name).unwrap_err();
            assert!(e.contains(want), "{name}: {e}");
        }
        let (a, b, c, d) = (
            spec("a.example", &["b"]),
            spec("b.example", &["default"]),
            spec("a.example", &[]),
            spec("cluster.local", &[]),
        );
        let e = spec("e.example", &["zz"]);
        let v = check_meshes("cluster.local", [("a", &a), ("b", &b), ("c", &c), ("d", &d), ("e", &e)]);
        assert!(v[0].is_ok() && v[1].is_ok(), "{v:?}");
        assert!(v[2].as_ref().unwrap_err().contains("mesh a's"), "{v:?}");
        assert!(v[3].as_ref().unwrap_err().contains("mesh default's"), "{v:?}");
        assert!(v[4].is_ok(), "trust in a missing mesh is the keeper's to leave out: {v:?}");
    }

    #[test]
    fn enabled_and_default_name_the_default_mesh() {
        assert_eq!(mesh_of_label("enabled"), None);
        assert_eq!(mesh_of_label("default"), None);
        assert_eq!(mesh_of_label("payments"), Some("payments"));
    }
}
