//! Policy CRDs, group `security.sockmesh.io`, version `v1alpha1`: shaped like Istio's so that
//! users recognise them (and Istio's convert by changing the group).

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub const GROUP: &str = "security.sockmesh.io";
pub const VERSION: &str = "v1alpha1";

/// Which workloads a policy applies to, in its namespace (all of them when absent). A policy in
/// the root namespace without a selector applies to the whole mesh.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[serde(deny_unknown_fields)]
pub struct WorkloadSelector {
    #[serde(default)]
    pub match_labels: crate::Labels,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    #[default]
    Allow,
    Deny,
    /// Logs matches; never changes a decision.
    Audit,
}

/// L4 authorization: who (source identity, namespace, address) may reach which ports of the
/// selected workloads.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "security.sockmesh.io",
    version = "v1alpha1",
    kind = "AuthorizationPolicy",
    namespaced,
    status = "PolicyStatus",
    shortname = "ap",
    printcolumn = r#"{"name":"Action","type":"string","jsonPath":".spec.action"}"#,
    printcolumn = r#"{"name":"Dry-run","type":"boolean","jsonPath":".spec.dryRun"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[serde(deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    #[serde(default)]
    pub action: Action,
    /// A connection matches the policy if it matches any rule. ALLOW with no rules allows
    /// nothing; DENY with no rules denies nothing.
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// Evaluate and log what would happen, without enforcing it.
    #[serde(default)]
    pub dry_run: bool,
    /// The mesh whose workloads it applies to. A policy of the root namespace applies to the
    /// default mesh's workloads unless this names another mesh; a namespace's policy applies to
    /// its workloads, which are all in the namespace's mesh (a different mesh here selects none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh: Option<String>,
}

/// A rule matches if any `from` matches (or there is none) and any `to` matches (or none).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[serde(deny_unknown_fields)]
pub struct Rule {
    #[serde(default)]
    pub from: Vec<From>,
    #[serde(default)]
    pub to: Vec<To>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct From {
    pub source: Source,
}

/// Every field set must match. Values match exactly, or by prefix (`abc*`), suffix (`*abc`),
/// or `*` (any non-empty value); never by regular expression. Principals are SPIFFE IDs with or
/// without the `spiffe://` scheme (`cluster.local/ns/default/sa/web`).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[serde(deny_unknown_fields)]
pub struct Source {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<String>,
    /// CIDRs or addresses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_blocks: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ip_blocks: Vec<String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct To {
    pub operation: Operation,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[serde(deny_unknown_fields)]
pub struct Operation {
    /// Destination ports, as strings like Istio's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ports: Vec<String>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsMode {
    /// Inherit from the namespace or mesh policy (PERMISSIVE if none).
    #[default]
    Unset,
    /// Only mutual TLS: plaintext to the workload is refused.
    Strict,
    /// Mutual TLS and plaintext (after policy, with no peer identity).
    Permissive,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Mtls {
    #[serde(default)]
    pub mode: MtlsMode,
}

/// Whether the selected workloads accept plaintext.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "security.sockmesh.io",
    version = "v1alpha1",
    kind = "PeerAuthentication",
    namespaced,
    status = "PolicyStatus",
    shortname = "pa",
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mtls.mode"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[serde(deny_unknown_fields)]
pub struct PeerAuthenticationSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<Mtls>,
    /// Per-port overrides, keyed by port number.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub port_level_mtls: BTreeMap<String, Mtls>,
    /// The mesh whose workloads it applies to, as for an AuthorizationPolicy: a root-namespace
    /// policy is its mesh's mesh-wide setting (the default mesh's when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh: Option<String>,
}

impl PeerAuthenticationSpec {
    /// Why this policy cannot be applied, if it cannot: a `portLevelMtls` key that is not a port
    /// number written plainly (`8080`, not `08080` or `http`), or port-level settings without a
    /// selector (they would apply to every workload's port, which is never what was meant).
    pub fn validate(&self) -> Result<(), String> {
        for k in self.port_level_mtls.keys() {
            match k.parse::<u16>() {
                Ok(p) if p > 0 && p.to_string() == *k => {}
                _ => return Err(format!("portLevelMtls: key {k:?} is not a port number (1-65535, no leading zeros)")),
            }
        }
        if let Some(m) = self.mesh.as_deref().filter(|m| !crate::workload::is_dns_label(m)) {
            return Err(format!("mesh: {m:?} is not a mesh name (lowercase letters, digits and '-')"));
        }
        if !self.port_level_mtls.is_empty() && self.selector.is_none() {
            return Err("portLevelMtls needs a selector: port-level settings apply to selected workloads only".into());
        }
        Ok(())
    }
}

/// Status of a policy: whether the controller accepted it, for which generation.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Accepted`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True` or `False`.
    pub status: String,
    pub reason: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
}

/// The CRD manifests, as `cargo xtask codegen` writes them to deploy/crds/.
pub fn crd_yamls() -> Vec<(&'static str, String)> {
    use kube::CustomResourceExt;
    vec![
        (
            "authorizationpolicies.security.sockmesh.io.yaml",
            serde_yaml::to_string(&AuthorizationPolicy::crd()).expect("CRD serialises"),
        ),
        (
            "peerauthentications.security.sockmesh.io.yaml",
            serde_yaml::to_string(&PeerAuthentication::crd()).expect("CRD serialises"),
        ),
        crate::mesh::crd_yaml(),
    ]
}
