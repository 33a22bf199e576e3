//! Local workloads: what a node agent must capture, and where their kernel objects are.
//!
//! In local mode the records come from a YAML file (`--workloads`) and from the root-only
//! Unix-socket API at run time. Identity is a name, a namespace and a service account; the
//! kernel facts that tie it to traffic are the cgroup (which sockets are the workload's) and the
//! netns (where the agent's listeners live). IPs are only used to steer inbound packets.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Workload {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default = "default_service_account")]
    pub service_account: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub ips: Vec<IpAddr>,
    /// The node the workload runs on; records for other nodes are known but not captured here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Path of the workload's network namespace (e.g. /run/netns/pod-a). Local workloads only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<PathBuf>,
    /// Path of the workload's cgroup v2 directory. Local workloads only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<PathBuf>,
}

fn default_namespace() -> String {
    "default".into()
}
fn default_service_account() -> String {
    "default".into()
}

/// `namespace/name`: how a workload is named in logs, the API and the state file.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct WorkloadKey {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for WorkloadKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("cannot read workload file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("workload file {path} is not valid YAML for a workload list (line {line}): {reason}; expected `workloads: [{{name, namespace, serviceAccount, labels, ips, node, netns, cgroup}}]`")]
    Parse { path: PathBuf, line: usize, reason: String },
    #[error("workload {key}: {reason}")]
    Invalid { key: String, reason: String },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkloadFile {
    #[serde(default)]
    workloads: Vec<Workload>,
}

impl Workload {
    pub fn key(&self) -> WorkloadKey {
        WorkloadKey { namespace: self.namespace.clone(), name: self.name.clone() }
    }

    /// Whether this record is one the agent of `node` must capture.
    pub fn is_local_to(&self, node: &str) -> bool {
        self.node.as_deref().is_none_or(|n| n == node)
    }

    /// Checks a record: names, addresses, and (for a workload of `node`) that its kernel
    /// objects are named. Whether they exist is the agent's check.
    pub fn validate(&self, node: &str) -> Result<(), WorkloadError> {
        let invalid = |reason: String| WorkloadError::Invalid { key: self.key().to_string(), reason };
        // Kubernetes' own rules: a namespace is a DNS-1123 label; pod and service-account
        // names are DNS-1123 subdomains.
        if !is_dns_label(&self.namespace) {
            return Err(invalid(format!(
                "namespace {:?} must be a DNS-1123 label: lowercase letters, digits and '-', starting and ending with a letter or digit, at most 63 characters",
                self.namespace
            )));
        }
        for (what, v) in [("name", &self.name), ("serviceAccount", &self.service_account)] {
            if !is_dns_subdomain(v) {
                return Err(invalid(format!(
                    "{what} {v:?} must be a DNS-1123 subdomain: dot-separated labels of lowercase letters, digits and '-', at most 253 characters"
                )));
            }
        }
        if self.ips.is_empty() {
            return Err(invalid("ips is empty; list the workload's addresses".into()));
        }
        if self.is_local_to(node) {
            if self.netns.is_none() {
                return Err(invalid(format!("runs on this node ({node}) but has no netns path")));
            }
            if self.cgroup.is_none() {
                return Err(invalid(format!("runs on this node ({node}) but has no cgroup path")));
            }
        }
        Ok(())
    }

    /// Checks that the kernel objects of a local workload exist (run on its node).
    pub fn check_local_objects(&self) -> Result<(), WorkloadError> {
        let invalid = |reason: String| WorkloadError::Invalid { key: self.key().to_string(), reason };
        if let Some(netns) = &self.netns {
            if !netns.exists() {
                return Err(invalid(format!("netns {} does not exist", netns.display())));
            }
        }
        if let Some(cgroup) = &self.cgroup {
            if !cgroup.join("cgroup.procs").exists() {
                return Err(invalid(format!(
                    "cgroup {} is not a cgroup v2 directory (no cgroup.procs)",
                    cgroup.display()
                )));
            }
        }
        Ok(())
    }
}

/// A DNS-1123 label (RFC 1123, as Kubernetes applies it): 1-63 lowercase letters, digits and
/// '-', starting and ending with a letter or digit.
fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A DNS-1123 subdomain: labels joined by '.', at most 253 characters in all.
fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

pub fn parse_file(path: &Path) -> Result<Vec<Workload>, WorkloadError> {
    let text = std::fs::read_to_string(path).map_err(|source| WorkloadError::Read { path: path.to_owned(), source })?;
    parse_str(path, &text)
}

pub fn parse_str(path: &Path, text: &str) -> Result<Vec<Workload>, WorkloadError> {
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    let file: WorkloadFile = serde_yaml::from_str(text).map_err(|e| WorkloadError::Parse {
        path: path.to_owned(),
        line: e.location().map(|l| l.line()).unwrap_or(0),
        reason: e.to_string(),
    })?;
    let mut seen = std::collections::BTreeSet::new();
    for w in &file.workloads {
        if !seen.insert(w.key()) {
            return Err(WorkloadError::Invalid {
                key: w.key().to_string(),
                reason: format!("listed twice in {}", path.display()),
            });
        }
    }
    Ok(file.workloads)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_workload_list_with_defaults() {
        let ws = parse_str(
            Path::new("w.yaml"),
            "workloads:\n- name: a\n  ips: [10.0.0.1]\n  node: n1\n  labels: {app: a}\n",
        )
        .unwrap();
        assert_eq!(ws.len(), 1);
        assert_eq!(ws[0].namespace, "default");
        assert_eq!(ws[0].service_account, "default");
        assert_eq!(ws[0].labels["app"], "a");
        assert!(ws[0].is_local_to("n1"));
        assert!(!ws[0].is_local_to("n2"));
    }

    #[test]
    fn bad_yaml_names_the_line_and_unknown_fields_are_rejected() {
        let err = parse_str(Path::new("w.yaml"), "workloads:\n- name: a\n  ips: [10.0.0.1]\n  serviceAcount: x\n")
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("w.yaml") && msg.contains("line 4") && msg.contains("serviceAcount"), "{msg}");
        let err = parse_str(Path::new("w.yaml"), "workloads:\n- name: a\n  ips: [not-an-ip]\n").unwrap_err();
        assert!(err.to_string().contains("line"), "{err}");
    }

    #[test]
    fn duplicates_and_bad_names_are_refused() {
        let err =
            parse_str(Path::new("w.yaml"), "workloads:\n- {name: a, ips: [10.0.0.1]}\n- {name: a, ips: [10.0.0.2]}\n")
                .unwrap_err();
        assert!(err.to_string().contains("listed twice"), "{err}");
        let w = Workload {
            name: "A_B".into(),
            namespace: "default".into(),
            service_account: "sa".into(),
            labels: Default::default(),
            ips: vec!["10.0.0.1".parse().unwrap()],
            node: Some("other".into()),
            netns: None,
            cgroup: None,
        };
        assert!(w.validate("n1").unwrap_err().to_string().contains("DNS-1123 subdomain"));
        let mut ok = w.clone();
        ok.name = "a".into();
        ok.validate("n1").unwrap();
        ok.node = Some("n1".into());
        assert!(ok.validate("n1").unwrap_err().to_string().contains("no netns"));
    }

    #[test]
    fn namespaces_are_labels_and_names_are_subdomains() {
        let mut w: Workload = serde_yaml::from_str("name: a\nips: [10.0.0.1]\nnode: other\n").unwrap();
        for ok in ["a", "my.sa", "a-b.c-d", &"x".repeat(63)] {
            w.service_account = ok.into();
            w.validate("n1").unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in ["", "A", "a..b", ".a", "a.", "-a", "a-", "a_b", &"x".repeat(64), &format!("{}.b", "x".repeat(252))]
        {
            w.service_account = bad.into();
            let e = w.validate("n1").unwrap_err().to_string();
            assert!(e.contains("serviceAccount") && e.contains("subdomain"), "{bad}: {e}");
        }
        w.service_account = "sa".into();
        w.namespace = "team.a".into();
        let e = w.validate("n1").unwrap_err().to_string();
        assert!(e.contains("namespace") && e.contains("DNS-1123 label") && !e.contains("'.'"), "{e}");
        w.namespace = "x".repeat(64);
        assert!(w.validate("n1").is_err());
        w.namespace = "team-a".into();
        w.name = "web.v1".into();
        w.validate("n1").unwrap();
    }
}
