//! Local workloads: what a node agent must capture, and where their kernel objects are.
//!
//! In local mode the records come from YAML files of `kind: Workload` documents — the same
//! documents in the controller's configuration and in an agent's `--workloads` file — and from
//! the agent's root-only Unix-socket API at run time. Identity is a name, a namespace and a service account; the
//! kernel facts that tie it to traffic are the cgroup (which sockets are the workload's) and the
//! netns (where the agent's listeners live). IPs are only used to steer inbound packets.

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
    pub labels: crate::Labels,
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
    /// The mesh the workload belongs to (from its namespace's `sockmesh.io/mesh` label); absent
    /// for the default mesh. Set by the controller, never by an agent's own file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh: Option<String>,
    /// The Kubernetes pod's UID (records from the Kubernetes source). The agent of the pod's
    /// node finds the pod's cgroup and netns from it: such a record names neither path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    /// The pod's QoS class (`Guaranteed`, `Burstable`, `BestEffort`): where the kubelet puts its
    /// cgroup. Absent: the agent looks under every class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qos_class: Option<String>,
}

/// Whether `s` has the shape of a Kubernetes UID (an RFC 4122 UUID in lowercase: 8-4-4-4-12
/// hex digits). Checked because a UID becomes part of cgroup names and pin names.
pub fn is_pod_uid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
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

/// How one workload document looks; every "expected" hint shows it.
pub const WORKLOAD_EXAMPLE: &str = "kind: Workload\nname: web\nnamespace: default\nserviceAccount: web\nlabels: {app: web}\nips: [10.20.1.10]\nnode: n1\nnetns: /run/netns/web\ncgroup: /sys/fs/cgroup/mesh/web\n---\nkind: Workload\n...";

#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("cannot read workload file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{}:{line}: {reason}", path.display())]
    Parse { path: PathBuf, line: usize, reason: String },
    #[error("{}:{line}: a `workloads: [...]` list is not read any more; write one `kind: Workload` document per workload, separated by `---`, e.g.\n{WORKLOAD_EXAMPLE}", path.display())]
    OldShape { path: PathBuf, line: usize },
    #[error("workload {key}: {reason}")]
    Invalid { key: String, reason: String },
}

/// One YAML document of a file and the file line it starts on.
pub struct Document {
    pub line: usize,
    pub value: serde_yaml::Value,
    /// The document's own lines (for errors that name the line of a field).
    text: String,
}

/// Splits a multi-document YAML file, keeping where each document starts so that an error in
/// it can name a line of the file. Empty documents are dropped.
pub fn documents(path: &Path, text: &str) -> Result<Vec<Document>, WorkloadError> {
    // Where YAML would see the documents: a `---` line (perhaps followed by a comment or by
    // the document's first content) starts one; comments, blank lines and directives before
    // the first `---` are no document of their own.
    let lines: Vec<&str> = text.lines().collect();
    let seps: Vec<usize> = (0..lines.len())
        .filter(|&i| {
            let l = lines[i].trim_end();
            l == "---" || l.starts_with("--- ") || l.starts_with("---\t")
        })
        .collect();
    let trivial = |l: &&str| {
        let t = l.trim();
        t.is_empty() || t.starts_with('#') || t.starts_with('%')
    };
    // Each document's first line (1-based) and the index of the line after its last.
    let mut spans: Vec<(usize, usize)> = Vec::new();
    let first_sep = seps.first().copied().unwrap_or(lines.len());
    if seps.is_empty() || !lines[..first_sep].iter().all(trivial) {
        spans.push((1, first_sep));
    }
    for (k, &i) in seps.iter().enumerate() {
        let end = seps.get(k + 1).copied().unwrap_or(lines.len());
        let rest = lines[i].trim_end()[3..].trim();
        let start = if rest.is_empty() || rest.starts_with('#') { i + 2 } else { i + 1 };
        spans.push((start, end));
    }
    let mut out = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let (start, end) = spans.get(i).copied().unwrap_or((1, lines.len()));
        let own = lines.get(start - 1..end.max(start - 1)).unwrap_or_default().join("\n");
        let value = serde_yaml::Value::deserialize(doc).map_err(|e| WorkloadError::Parse {
            path: path.to_owned(),
            line: e.location().map(|l| l.line()).unwrap_or(start),
            reason: e.to_string(),
        })?;
        if !value.is_null() {
            out.push(Document { line: start, value, text: own });
        }
    }
    Ok(out)
}

impl Document {
    /// The document's `kind`, or the error a user needs: the old workload list is recognised
    /// and answered with the shape to write instead.
    pub fn kind(&self, path: &Path, expected: &str) -> Result<&str, WorkloadError> {
        if let Some(k) = self.value.get("kind").and_then(|k| k.as_str()) {
            return Ok(k);
        }
        if self.value.get("workloads").is_some() {
            return Err(WorkloadError::OldShape { path: path.to_owned(), line: self.line });
        }
        Err(WorkloadError::Parse {
            path: path.to_owned(),
            line: self.line,
            reason: format!("document has no `kind` ({expected})"),
        })
    }

    /// Reads a `kind: Workload` document (an `apiVersion` is allowed and ignored).
    pub fn workload(&self, path: &Path) -> Result<Workload, WorkloadError> {
        self.record(path, "Workload")
    }

    /// Reads a flat document of `kind: <what>` (an `apiVersion` is allowed and ignored) into
    /// its record; an error names the file line of the field it is about.
    pub fn record<T: serde::de::DeserializeOwned>(&self, path: &Path, what: &str) -> Result<T, WorkloadError> {
        let mut v = self.value.clone();
        if let Some(m) = v.as_mapping_mut() {
            m.remove("kind");
            m.remove("apiVersion");
        }
        serde_yaml::from_value(v).map_err(|e| WorkloadError::Parse {
            path: path.to_owned(),
            line: self.line_of::<T>(&e),
            reason: format!("{what}: {e}"),
        })
    }

    /// The file line an error is about. Reading a value loses positions, so the document's
    /// text is read again, with its `kind` and `apiVersion` lines blanked, for the position.
    fn line_of<T: serde::de::DeserializeOwned>(&self, e: &serde_yaml::Error) -> usize {
        let blanked: String = self
            .text
            .lines()
            .map(|l| if l.starts_with("kind:") || l.starts_with("apiVersion:") { "#" } else { l })
            .collect::<Vec<_>>()
            .join("\n");
        match serde_yaml::from_str::<T>(&blanked) {
            // The same content (but for blank lines) fails the same way, now with a position.
            Err(again) if again.location().is_some() => {
                again.location().map(|l| self.line + l.line() - 1).unwrap_or(self.line)
            }
            _ => e.location().map(|l| self.line + l.line() - 1).unwrap_or(self.line),
        }
    }
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
        if let Some(uid) = &self.pod_uid {
            if !is_pod_uid(uid) {
                return Err(invalid(format!(
                    "podUid {uid:?} is not a Kubernetes UID (8-4-4-4-12 lowercase hex digits)"
                )));
            }
            if self.netns.is_some() || self.cgroup.is_some() {
                return Err(invalid(
                    "a pod (podUid) names no netns or cgroup path: its node's agent finds them from the UID".into(),
                ));
            }
        }
        if let Some(q) = &self.qos_class {
            if !matches!(q.as_str(), "Guaranteed" | "Burstable" | "BestEffort") {
                return Err(invalid(format!("qosClass {q:?} must be Guaranteed, Burstable or BestEffort")));
            }
        }
        // A pod is known from the moment it is scheduled, before it has an address: its
        // agent refuses its connections until it has one and is captured.
        if self.ips.is_empty() && self.pod_uid.is_none() {
            return Err(invalid("ips is empty; list the workload's addresses".into()));
        }
        if self.is_local_to(node) && self.pod_uid.is_none() {
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

/// A node name as the agent's `--node` and the controller's node list take it: letters,
/// digits, '-', '.' and '_'.
pub fn is_node_name(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
}

/// A DNS-1123 label (RFC 1123, as Kubernetes applies it): 1-63 lowercase letters, digits and
/// '-', starting and ending with a letter or digit.
pub fn is_dns_label(s: &str) -> bool {
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

/// Reads a workload file: `kind: Workload` documents only (policies belong to the
/// controller's configuration directory). A workload named twice is refused.
pub fn parse_str(path: &Path, text: &str) -> Result<Vec<Workload>, WorkloadError> {
    let mut out: Vec<Workload> = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for doc in documents(path, text)? {
        match doc.kind(path, "a workload file holds `kind: Workload` documents")? {
            "Workload" => {}
            other => {
                return Err(WorkloadError::Parse {
                    path: path.to_owned(),
                    line: doc.line,
                    reason: format!(
                        "kind {other:?}: a workload file holds only `kind: Workload` documents (policies go in the controller's --config-dir)"
                    ),
                })
            }
        }
        let w = doc.workload(path)?;
        if !seen.insert(w.key()) {
            return Err(WorkloadError::Invalid {
                key: w.key().to_string(),
                reason: format!("listed twice in {}", path.display()),
            });
        }
        out.push(w);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_workload_list_with_defaults() {
        let ws = parse_str(
            Path::new("w.yaml"),
            "kind: Workload\nname: a\nips: [10.0.0.1]\nnode: n1\nlabels: {app: a}\n---\n",
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
        let err = parse_str(
            Path::new("w.yaml"),
            "kind: Workload\nname: b\nips: [10.0.0.2]\n---\nkind: Workload\nname: a\nips: [10.0.0.1]\nserviceAcount: x\n",
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("w.yaml:8:") && msg.contains("serviceAcount"), "{msg}");
        let err = parse_str(Path::new("w.yaml"), "kind: Workload\nname: a\nips: [not-an-ip]\n").unwrap_err();
        assert!(err.to_string().starts_with("w.yaml:3:"), "{err}");
        // Comments before the first `---`, and a comment after one, are no documents.
        let err = parse_str(
            Path::new("w.yaml"),
            "# n1\n---\nkind: Workload\nname: a\nips: [10.0.0.1]\n--- # b\nkind: Workload\nname: b\nips: [10.0.0.2]\nserviceAcount: x\n",
        )
        .unwrap_err();
        assert!(err.to_string().starts_with("w.yaml:10:"), "{err}");
        let ok =
            parse_str(Path::new("w.yaml"), "---\r\nkind: Workload\r\nname: a\r\nips: [10.0.0.1]\r\n---\r\n---\r\n");
        assert_eq!(ok.unwrap().len(), 1);
        let err = parse_str(Path::new("w.yaml"), "kind: AuthorizationPolicy\n").unwrap_err();
        assert!(err.to_string().contains("--config-dir"), "{err}");
        let err = parse_str(Path::new("w.yaml"), "name: a\nips: [10.0.0.1]\n").unwrap_err();
        assert!(err.to_string().contains("no `kind`"), "{err}");
    }

    #[test]
    fn duplicates_and_bad_names_are_refused() {
        let err = parse_str(
            Path::new("w.yaml"),
            "kind: Workload\nname: a\nips: [10.0.0.1]\n---\nkind: Workload\nname: a\nips: [10.0.0.2]\n",
        )
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
            mesh: None,
            pod_uid: None,
            qos_class: None,
        };
        assert!(w.validate("n1").unwrap_err().to_string().contains("DNS-1123 subdomain"));
        let mut ok = w.clone();
        ok.name = "a".into();
        ok.validate("n1").unwrap();
        ok.node = Some("n1".into());
        assert!(ok.validate("n1").unwrap_err().to_string().contains("no netns"));
    }

    #[test]
    fn the_old_list_gets_an_error_that_shows_the_documents_to_write() {
        let err = parse_str(Path::new("w.yaml"), "workloads:\n- {name: a, ips: [10.0.0.1]}\n").unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("w.yaml:1: a `workloads: [...]` list is not read"), "{msg}");
        assert!(msg.contains("kind: Workload\nname: web"), "{msg}");
        // The example in the message is itself a valid file.
        let example = WORKLOAD_EXAMPLE.trim_end_matches("---\nkind: Workload\n...");
        assert_eq!(parse_str(Path::new("x"), example).unwrap()[0].name, "web");
    }

    #[test]
    fn pods_name_a_uid_and_no_paths() {
        let uid = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";
        let mut w: Workload =
            serde_yaml::from_str(&format!("name: a\nips: []\nnode: n1\npodUid: {uid}\nqosClass: Burstable\n")).unwrap();
        // A scheduled pod without an address yet, on this node, with no paths: valid.
        w.validate("n1").unwrap();
        for bad in ["0F1E2D3C-4B5A-6978-8796-A5B4C3D2E1F0", "../../etc", "0f1e2d3c4b5a69788796a5b4c3d2e1f0", ""] {
            w.pod_uid = Some(bad.into());
            let e = w.validate("n1").unwrap_err().to_string();
            assert!(e.contains("podUid") && e.contains("UID"), "{bad}: {e}");
        }
        w.pod_uid = Some(uid.into());
        w.cgroup = Some("/sys/fs/cgroup/x".into());
        assert!(w.validate("n1").unwrap_err().to_string().contains("finds them from the UID"));
        w.cgroup = None;
        w.qos_class = Some("Gold".into());
        assert!(w.validate("n1").unwrap_err().to_string().contains("qosClass"));
        // Without a UID an address is still required.
        let mut plain = w.clone();
        plain.pod_uid = None;
        plain.qos_class = None;
        assert!(plain.validate("n1").unwrap_err().to_string().contains("ips is empty"));
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
