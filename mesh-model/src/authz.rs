//! The L4 authorization engine: a pure function from the facts of a connection and the
//! policies that select its destination workload to a decision with a reason.
//!
//! DENY beats ALLOW; if any ALLOW policy selects the workload, a connection no ALLOW policy
//! matches is denied; AUDIT policies only record that they matched; dry-run policies are
//! evaluated and reported, never enforced. Matching is exact, `prefix*`, `*suffix` or `*` —
//! never a regular expression. Policies are compiled once and indexed by namespace and label,
//! so the cost of a decision depends on the policies that select the workload, not on how many
//! exist in the cluster.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use crate::policy::{Action, AuthorizationPolicySpec, WorkloadSelector};

/// What is known about a connection when it is authorized.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    /// The peer's verified SPIFFE ID; None for plaintext.
    pub principal: Option<&'a str>,
    pub source_ip: IpAddr,
    pub dst_port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow(AllowReason),
    Deny(DenyReason),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowReason {
    /// No ALLOW policy selects the workload (and no DENY matched).
    NoAllowPolicies,
    /// This ALLOW policy matched.
    AllowPolicy(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DenyReason {
    /// This DENY policy matched.
    DenyPolicy(String),
    /// ALLOW policies select the workload and none matched.
    NoAllowMatch,
}

impl DenyReason {
    /// A bounded label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            DenyReason::DenyPolicy(_) => "deny_policy",
            DenyReason::NoAllowMatch => "no_allow_match",
        }
    }
}

impl std::fmt::Display for DenyReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DenyReason::DenyPolicy(p) => write!(f, "denied by policy {p}"),
            DenyReason::NoAllowMatch => write!(f, "no ALLOW policy matched"),
        }
    }
}

/// A decision and what else the evaluation noticed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub decision: Decision,
    /// AUDIT policies that matched.
    pub audited: Vec<String>,
    /// Dry-run policies: (name, action, matched).
    pub dry_run: Vec<(String, Action, bool)>,
}

impl Verdict {
    pub fn allowed(&self) -> bool {
        matches!(self.decision, Decision::Allow(_))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("policy {policy}: {field}: {reason}")]
pub struct PolicyError {
    pub policy: String,
    pub field: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Any,
}

impl Pattern {
    fn parse(s: &str) -> Result<Pattern, String> {
        if s == "*" {
            return Ok(Pattern::Any);
        }
        let stars = s.matches('*').count();
        if stars == 0 {
            return Ok(Pattern::Exact(s.to_owned()));
        }
        if stars == 1 && s.ends_with('*') {
            return Ok(Pattern::Prefix(s[..s.len() - 1].to_owned()));
        }
        if stars == 1 && s.starts_with('*') {
            return Ok(Pattern::Suffix(s[1..].to_owned()));
        }
        Err(format!("{s:?}: '*' may only stand alone, at the start, or at the end"))
    }

    fn matches(&self, v: &str) -> bool {
        match self {
            Pattern::Exact(e) => v == e,
            Pattern::Prefix(p) => v.starts_with(p.as_str()),
            Pattern::Suffix(p) => v.ends_with(p.as_str()),
            Pattern::Any => !v.is_empty(),
        }
    }
}

/// An address block (`10.0.0.0/8`, `fd00::/64`) or one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    len: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Cidr, String> {
        Cidr::parse(s)
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl serde::Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl Cidr {
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (a, l) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = a.parse().map_err(|_| format!("{s:?} is not an address or CIDR"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match l {
            Some(l) => l
                .parse::<u8>()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(|| format!("{s:?}: prefix length must be 0..={max}"))?,
            None => max,
        };
        Ok(Cidr { addr, len })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let bits = |ip: IpAddr| -> (u128, u32) {
            match ip {
                IpAddr::V4(v) => (u32::from(v) as u128, 32),
                IpAddr::V6(v) => (u128::from(v), 128),
            }
        };
        let ip = ip.to_canonical();
        if ip.is_ipv4() != self.addr.is_ipv4() {
            return false;
        }
        let (a, width) = bits(self.addr);
        let (b, _) = bits(ip);
        let shift = width - self.len as u32;
        if shift >= width {
            return true;
        }
        (a >> shift) == (b >> shift)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct CSource {
    principals: Vec<Pattern>,
    not_principals: Vec<Pattern>,
    namespaces: Vec<Pattern>,
    not_namespaces: Vec<Pattern>,
    ip_blocks: Vec<Cidr>,
    not_ip_blocks: Vec<Cidr>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct COp {
    ports: Vec<u16>,
    not_ports: Vec<u16>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct CRule {
    from: Vec<CSource>,
    to: Vec<COp>,
}

/// A validated, compiled AuthorizationPolicy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compiled {
    /// `namespace/name`.
    pub name: String,
    pub namespace: String,
    pub selector: Option<crate::Labels>,
    pub action: Action,
    pub dry_run: bool,
    /// The mesh whose workloads it applies to (`None`: see [`PolicyIndex::for_workload_in`]).
    pub mesh: Option<String>,
    rules: Vec<CRule>,
}

fn strip_scheme(p: &str) -> &str {
    p.strip_prefix("spiffe://").unwrap_or(p)
}

/// The namespace in a workload principal (`…/ns/<ns>/sa/<sa>`).
fn principal_namespace(p: &str) -> Option<&str> {
    let mut it = p.split('/');
    while let Some(seg) = it.next() {
        if seg == "ns" {
            return it.next();
        }
    }
    None
}

impl CSource {
    fn matches(&self, f: &Facts<'_>) -> bool {
        // Plaintext has the empty principal: positive patterns never match it, negative ones do
        // not exclude it (as in Istio).
        let principal = f.principal.map(strip_scheme).unwrap_or("");
        let ns = f.principal.and_then(|p| principal_namespace(strip_scheme(p))).unwrap_or("");
        let any = |ps: &[Pattern], v: &str| ps.iter().any(|p| p.matches(v));
        (self.principals.is_empty() || any(&self.principals, principal))
            && !any(&self.not_principals, principal)
            && (self.namespaces.is_empty() || any(&self.namespaces, ns))
            && !any(&self.not_namespaces, ns)
            && (self.ip_blocks.is_empty() || self.ip_blocks.iter().any(|c| c.contains(f.source_ip)))
            && !self.not_ip_blocks.iter().any(|c| c.contains(f.source_ip))
    }
}

impl COp {
    fn matches(&self, f: &Facts<'_>) -> bool {
        (self.ports.is_empty() || self.ports.contains(&f.dst_port)) && !self.not_ports.contains(&f.dst_port)
    }
}

impl CRule {
    fn matches(&self, f: &Facts<'_>) -> bool {
        (self.from.is_empty() || self.from.iter().any(|s| s.matches(f)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.matches(f)))
    }
}

impl Compiled {
    /// Validates and compiles a policy; an invalid one is refused whole, never half-applied.
    pub fn compile(namespace: &str, name: &str, spec: &AuthorizationPolicySpec) -> Result<Compiled, PolicyError> {
        let full = format!("{namespace}/{name}");
        let err = |field: String, reason: String| PolicyError { policy: full.clone(), field, reason };
        if let Some(m) = spec.mesh.as_deref().filter(|m| !crate::workload::is_dns_label(m)) {
            return Err(err("mesh".into(), format!("{m:?} is not a mesh name (lowercase letters, digits and '-')")));
        }
        let mut rules = Vec::new();
        for (ri, r) in spec.rules.iter().enumerate() {
            let mut from = Vec::new();
            for (fi, f) in r.from.iter().enumerate() {
                let at = |n: &str| format!("rules[{ri}].from[{fi}].source.{n}");
                let pats = |n: &str, v: &[String]| -> Result<Vec<Pattern>, PolicyError> {
                    v.iter().map(|s| Pattern::parse(strip_scheme(s)).map_err(|r| err(at(n), r))).collect()
                };
                let cidrs = |n: &str, v: &[String]| -> Result<Vec<Cidr>, PolicyError> {
                    v.iter().map(|s| Cidr::parse(s).map_err(|r| err(at(n), r))).collect()
                };
                let s = &f.source;
                from.push(CSource {
                    principals: pats("principals", &s.principals)?,
                    not_principals: pats("notPrincipals", &s.not_principals)?,
                    namespaces: pats("namespaces", &s.namespaces)?,
                    not_namespaces: pats("notNamespaces", &s.not_namespaces)?,
                    ip_blocks: cidrs("ipBlocks", &s.ip_blocks)?,
                    not_ip_blocks: cidrs("notIpBlocks", &s.not_ip_blocks)?,
                });
            }
            let mut to = Vec::new();
            for (ti, t) in r.to.iter().enumerate() {
                let ports = |n: &str, v: &[String]| -> Result<Vec<u16>, PolicyError> {
                    v.iter()
                        .map(|p| {
                            p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| {
                                err(
                                    format!("rules[{ri}].to[{ti}].operation.{n}"),
                                    format!("{p:?} is not a port (1-65535)"),
                                )
                            })
                        })
                        .collect()
                };
                to.push(COp {
                    ports: ports("ports", &t.operation.ports)?,
                    not_ports: ports("notPorts", &t.operation.not_ports)?,
                });
            }
            rules.push(CRule { from, to });
        }
        Ok(Compiled {
            name: full.clone(),
            namespace: namespace.to_owned(),
            selector: spec.selector.as_ref().map(|s: &WorkloadSelector| s.match_labels.clone()),
            action: spec.action,
            dry_run: spec.dry_run,
            mesh: spec.mesh.clone(),
            rules,
        })
    }

    pub fn matches(&self, f: &Facts<'_>) -> bool {
        self.rules.iter().any(|r| r.matches(f))
    }

    fn selects(&self, labels: &crate::Labels) -> bool {
        self.selector.as_ref().is_none_or(|sel| labels.contains_all(sel))
    }
}

/// The policies that apply to one workload, split by what they do.
#[derive(Debug, Clone, Default)]
pub struct WorkloadPolicies {
    pub deny: Vec<Arc<Compiled>>,
    pub allow: Vec<Arc<Compiled>>,
    pub audit: Vec<Arc<Compiled>>,
    pub dry_run: Vec<Arc<Compiled>>,
}

impl WorkloadPolicies {
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .deny
            .iter()
            .chain(&self.allow)
            .chain(&self.audit)
            .chain(&self.dry_run)
            .map(|p| p.name.clone())
            .collect();
        v.sort();
        v
    }
}

/// Decides a connection. Pure: the same facts and policies always give the same verdict.
pub fn authorize(f: &Facts<'_>, p: &WorkloadPolicies) -> Verdict {
    let dry_run = p.dry_run.iter().map(|d| (d.name.clone(), d.action, d.matches(f))).collect();
    let audited = p.audit.iter().filter(|a| a.matches(f)).map(|a| a.name.clone()).collect();
    let decision = if let Some(d) = p.deny.iter().find(|d| d.matches(f)) {
        Decision::Deny(DenyReason::DenyPolicy(d.name.clone()))
    } else if p.allow.is_empty() {
        Decision::Allow(AllowReason::NoAllowPolicies)
    } else if let Some(a) = p.allow.iter().find(|a| a.matches(f)) {
        Decision::Allow(AllowReason::AllowPolicy(a.name.clone()))
    } else {
        Decision::Deny(DenyReason::NoAllowMatch)
    };
    Verdict { decision, audited, dry_run }
}

/// All policies, indexed so that finding those that select a workload looks only at its
/// namespace's (and the root namespace's) policies without a selector and at those whose
/// selector's first label the workload has.
#[derive(Debug, Clone, Default)]
pub struct PolicyIndex {
    root_namespace: String,
    namespaces: HashMap<String, NamespacePolicies>,
}

#[derive(Debug, Clone, Default)]
struct NamespacePolicies {
    unselected: Vec<Arc<Compiled>>,
    by_label: HashMap<(String, String), Vec<Arc<Compiled>>>,
}

impl PolicyIndex {
    pub fn new(root_namespace: &str, policies: impl IntoIterator<Item = Compiled>) -> Self {
        let mut idx = PolicyIndex { root_namespace: root_namespace.to_owned(), namespaces: HashMap::new() };
        for p in policies {
            let ns = idx.namespaces.entry(p.namespace.clone()).or_default();
            match p.selector.as_ref().and_then(|s| s.iter().next()) {
                Some((k, v)) => ns.by_label.entry((k.clone(), v.clone())).or_default().push(Arc::new(p)),
                None => ns.unselected.push(Arc::new(p)),
            }
        }
        idx
    }

    /// The policies that select a workload of the default mesh in `namespace` with `labels`.
    pub fn for_workload(&self, namespace: &str, labels: &crate::Labels) -> WorkloadPolicies {
        self.for_workload_in(crate::mesh::DEFAULT_MESH, namespace, labels)
    }

    /// The policies that select a workload of `mesh` in `namespace` with `labels`. A policy
    /// naming a mesh applies only to that mesh's workloads; one of the root namespace that names
    /// none, only to the default mesh's: one mesh's mesh-wide policies are never another's.
    pub fn for_workload_in(&self, mesh: &str, namespace: &str, labels: &crate::Labels) -> WorkloadPolicies {
        let mut out = WorkloadPolicies::default();
        let root = self.root_namespace.as_str();
        let mut add = |p: &Arc<Compiled>| {
            let applies_to = match (&p.mesh, p.namespace == root) {
                (Some(m), _) => m.as_str() == mesh,
                (None, true) => mesh == crate::mesh::DEFAULT_MESH,
                (None, false) => true,
            };
            if !applies_to || !p.selects(labels) {
                return;
            }
            let list = if p.dry_run {
                &mut out.dry_run
            } else {
                match p.action {
                    Action::Deny => &mut out.deny,
                    Action::Allow => &mut out.allow,
                    Action::Audit => &mut out.audit,
                }
            };
            list.push(p.clone());
        };
        let mut spaces = vec![namespace];
        if self.root_namespace != namespace {
            spaces.push(&self.root_namespace);
        }
        for ns in spaces {
            let Some(np) = self.namespaces.get(ns) else { continue };
            // A root-namespace policy without a selector is mesh-wide; with one, it selects by
            // labels in every namespace (as in Istio).
            np.unselected.iter().for_each(&mut add);
            for (k, v) in labels {
                if let Some(ps) = np.by_label.get(&(k.clone(), v.clone())) {
                    ps.iter().for_each(&mut add);
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests;
