//! Services: virtual addresses and ports in front of a set of endpoints. Clients connect to a
//! Service address; the source agent picks a ready endpoint, maps the port to the endpoint's
//! target port and carries the connection to it as it would to the endpoint's own address
//! (mutual TLS requiring the endpoint's identity when it is a mesh workload).
//!
//! Two sources produce the same record: the Kubernetes source from a Service and its
//! EndpointSlices, and the controller's configuration directory from `kind: Service` documents
//! with a selector (endpoints computed from the workloads' labels) or explicit endpoints. The
//! controller resolves selectors; what it pushes to agents always lists the endpoints.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::workload::{is_dns_label, Workload};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Service {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// The virtual addresses (a Kubernetes Service's cluster IPs). None: a headless Service,
    /// whose clients reach the endpoints by their own addresses.
    #[serde(default)]
    pub addresses: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    /// The endpoints are the workloads of the Service's namespace with all these labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<BTreeMap<String, String>>,
    /// Explicit endpoints (or, once the controller resolved the selector, the selected ones).
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
    /// Offered to the other zones (clusters) of the mesh: they learn its endpoints and their
    /// identities, give it an address of their own, and reach it through this zone's east-west
    /// gateway (the multi-cluster Services API's `ServiceExport`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub export: bool,
    /// Made by the controller from other zones' exports (never by a source): its addresses are
    /// this zone's for it, its endpoints those of every zone that exports it, each remote one
    /// reached through its zone's gateway.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub imported: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub port: u16,
    /// The endpoints' port; the Service port when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<u16>,
}

impl ServicePort {
    pub fn target(&self) -> u16 {
        self.target_port.unwrap_or(self.port)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Endpoint {
    pub address: IpAddr,
    /// The workload (in the Service's namespace) this endpoint is, when it is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    /// Only ready endpoints get new connections.
    #[serde(default = "yes")]
    pub ready: bool,
    /// An endpoint in another zone (imported Services only): `address` is an address of that
    /// zone's network, reached only through its gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<RemoteEndpoint>,
}

/// Where an endpoint of another zone is and who it is.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RemoteEndpoint {
    pub zone: String,
    /// The SPIFFE ID the endpoint's workload proves, end to end.
    pub identity: String,
    /// Its zone's east-west gateway (address and port), and the SPIFFE ID the gateway proves.
    pub gateway: std::net::SocketAddr,
    pub gateway_identity: String,
}

fn default_namespace() -> String {
    "default".into()
}
fn yes() -> bool {
    true
}

/// A Service as its zone offers it to the other zones: its ports, and its endpoints that are
/// mesh workloads, each with the identity it proves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Exported {
    pub namespace: String,
    pub name: String,
    pub ports: Vec<ServicePort>,
    pub endpoints: Vec<ExportedEndpoint>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExportedEndpoint {
    /// An address of the exporting zone's network.
    pub address: IpAddr,
    /// The SPIFFE ID its workload proves.
    pub identity: String,
    pub ready: bool,
}

/// The label that exports a Kubernetes Service to the other zones (value `"true"`); in the
/// configuration directory, `export: true` on the Service.
pub const EXPORT_LABEL: &str = "sockmesh.io/export";

/// How one Service document looks; every "expected" hint shows it.
pub const SERVICE_EXAMPLE: &str = "kind: Service\nname: web\nnamespace: default\naddresses: [10.96.0.10]\nports: [{port: 80, targetPort: 8080}]\nselector: {app: web}";

impl Service {
    /// `namespace/name`.
    pub fn key(&self) -> (String, String) {
        (self.namespace.clone(), self.name.clone())
    }

    /// The Istio `destination_service` name: `name.namespace.svc.cluster.local`, or
    /// `name.namespace.svc.clusterset.local` for a Service imported from other zones.
    pub fn host(&self) -> String {
        let domain = if self.imported { "clusterset" } else { "cluster" };
        format!("{}.{}.svc.{domain}.local", self.name, self.namespace)
    }

    /// The port a client connects to, if the Service has it.
    pub fn port(&self, port: u16) -> Option<&ServicePort> {
        self.ports.iter().find(|p| p.port == port)
    }

    /// Checks a record as a source gives it: [`Service::validate`], and endpoints from one
    /// place (a selector or a list).
    pub fn validate_source(&self) -> Result<(), String> {
        self.validate()?;
        if self.selector.is_some() && !self.endpoints.is_empty() {
            return Err("has both a selector and explicit endpoints; give one of them".into());
        }
        // Only the controller makes imports, from what other zones' controllers said.
        if self.imported || self.endpoints.iter().any(|e| e.remote.is_some()) {
            return Err("sets `imported` or a `remote` endpoint: those come from other zones' exports only; export the Service in its own zone (export: true)".into());
        }
        Ok(())
    }

    /// Checks a record on its own: names, ports and addresses. What it may collide with is
    /// the controller's check ([`check_addresses`]). A resolved record (as pushed) passes.
    pub fn validate(&self) -> Result<(), String> {
        if !is_dns_label(&self.namespace) {
            return Err(format!("namespace {:?} must be a DNS-1123 label", self.namespace));
        }
        // Kubernetes' rule for Service names (DNS-1035): a label starting with a letter.
        if !is_dns_label(&self.name) || !self.name.starts_with(|c: char| c.is_ascii_lowercase()) {
            return Err(format!(
                "name {:?} must be a DNS-1035 label: lowercase letters, digits and '-', starting with a letter, at most 63 characters",
                self.name
            ));
        }
        if self.ports.is_empty() {
            return Err("ports is empty; list at least one {port, targetPort}".into());
        }
        let mut seen_ports = BTreeSet::new();
        let mut seen_names = BTreeSet::new();
        for p in &self.ports {
            if p.port == 0 || p.target() == 0 {
                return Err(format!("port {}: ports and target ports are 1-65535", p.port));
            }
            if !seen_ports.insert(p.port) {
                return Err(format!("port {} is listed twice", p.port));
            }
            if let Some(n) = &p.name {
                if !seen_names.insert(n.as_str()) {
                    return Err(format!("port name {n:?} is used twice"));
                }
            }
        }
        let mut seen_addrs = BTreeSet::new();
        for a in &self.addresses {
            if a.is_unspecified() || a.is_loopback() || a.is_multicast() {
                return Err(format!("address {a} cannot be a Service address"));
            }
            if !seen_addrs.insert(*a) {
                return Err(format!("address {a} is listed twice"));
            }
        }
        Ok(())
    }

    /// This Service with its selector resolved against `workloads`: one endpoint per address of
    /// every workload of its namespace that has all the selector's labels. Endpoints sorted,
    /// so that equal inputs give equal records.
    pub fn resolved<'a>(&self, workloads: impl IntoIterator<Item = &'a Workload>) -> Service {
        let mut out = self.clone();
        if let Some(sel) = &self.selector {
            out.endpoints = workloads
                .into_iter()
                .filter(|w| w.namespace == self.namespace && sel.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
                .flat_map(|w| {
                    w.ips.iter().map(|ip| Endpoint {
                        address: *ip,
                        workload: Some(w.name.clone()),
                        ready: true,
                        remote: None,
                    })
                })
                .collect();
        }
        out.endpoints.sort();
        out.endpoints.dedup();
        out
    }
}

/// Whether each of `services` (in order) may keep its addresses: a Service address must not be
/// a workload's address or an earlier Service's. One verdict per Service, with the reason.
pub fn check_addresses<'a>(
    services: impl IntoIterator<Item = &'a Service>,
    workloads: impl IntoIterator<Item = &'a Workload>,
) -> Vec<Result<(), String>> {
    // Who holds each address; named only when a Service collides with it (the model is rebuilt
    // on every change, and most addresses are workloads' that no Service claims).
    enum Holder<'a> {
        Workload(&'a Workload),
        Service(&'a Service),
    }
    let mut taken: std::collections::HashMap<IpAddr, Holder<'a>> = std::collections::HashMap::new();
    for w in workloads {
        for ip in &w.ips {
            taken.insert(*ip, Holder::Workload(w));
        }
    }
    services
        .into_iter()
        .map(|s| match s.addresses.iter().find_map(|a| taken.get(a).map(|who| (a, who))) {
            Some((a, Holder::Workload(w))) => Err(format!("address {a} is already workload {}'s", w.key())),
            Some((a, Holder::Service(o))) => {
                Err(format!("address {a} is already Service {}/{}'s", o.namespace, o.name))
            }
            None => {
                for a in &s.addresses {
                    taken.insert(*a, Holder::Service(s));
                }
                Ok(())
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(yaml: &str) -> Service {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn wl(name: &str, ns: &str, app: &str, ip: &str) -> Workload {
        serde_yaml::from_str(&format!("name: {name}\nnamespace: {ns}\nlabels: {{app: {app}}}\nips: [{ip}]\nnode: n1\n"))
            .unwrap()
    }

    #[test]
    fn a_selector_picks_the_namespaces_workloads_with_every_label() {
        let s =
            svc("name: web\naddresses: [10.96.0.10]\nports: [{port: 80, targetPort: 8080}]\nselector: {app: web}\n");
        s.validate().unwrap();
        let ws = [
            wl("w2", "default", "web", "10.0.0.2"),
            wl("w1", "default", "web", "10.0.0.1"),
            wl("other", "default", "db", "10.0.0.3"),
            wl("w3", "prod", "web", "10.0.0.4"),
        ];
        let r = s.resolved(&ws);
        r.validate().expect("a resolved record (selector and endpoints) is valid as pushed");
        let eps: Vec<(String, bool)> =
            r.endpoints.iter().map(|e| (e.address.to_string(), e.workload.is_some() && e.ready)).collect();
        assert_eq!(eps, [("10.0.0.1".to_owned(), true), ("10.0.0.2".to_owned(), true)]);
        assert_eq!(r.port(80).unwrap().target(), 8080);
        assert!(r.port(8080).is_none());
        assert_eq!(r.host(), "web.default.svc.cluster.local");
        // Explicit endpoints are kept (sorted), readiness defaults to true.
        let e = svc(
            "name: ext\nports: [{port: 443}]\nendpoints: [{address: 192.0.2.9}, {address: 192.0.2.1, ready: false}]\n",
        );
        let r = e.resolved(&ws);
        assert_eq!(r.endpoints[0].address.to_string(), "192.0.2.1");
        assert!(!r.endpoints[0].ready && r.endpoints[1].ready);
        assert_eq!(r.port(443).unwrap().target(), 443);
    }

    #[test]
    fn bad_services_are_refused_with_the_reason() {
        for (yaml, want) in [
            ("name: Web\nports: [{port: 80}]", "DNS-1035"),
            ("name: 1web\nports: [{port: 80}]", "DNS-1035"),
            ("name: web\nports: []", "ports is empty"),
            ("name: web\nports: [{port: 80}, {port: 80, targetPort: 81}]", "listed twice"),
            ("name: web\nports: [{port: 80, targetPort: 0}]", "1-65535"),
            ("name: web\nports: [{name: a, port: 80}, {name: a, port: 81}]", "used twice"),
            ("name: web\naddresses: [127.0.0.1]\nports: [{port: 80}]", "cannot be a Service address"),
            ("name: web\naddresses: [10.96.0.1, 10.96.0.1]\nports: [{port: 80}]", "listed twice"),
            ("name: web\nports: [{port: 80}]\nselector: {app: a}\nendpoints: [{address: 10.0.0.1}]", "both"),
            ("name: web\nports: [{port: 80}]\nimported: true", "other zones' exports only"),
            (
                "name: web\nports: [{port: 80}]\nendpoints: [{address: 10.0.0.1, remote: {zone: z, identity: \"spiffe://cluster.local/ns/default/sa/x\", gateway: \"192.0.2.1:15008\", gatewayIdentity: \"spiffe://cluster.local/ns/sockmesh-system/sa/g\"}}]",
                "other zones' exports only",
            ),
        ] {
            let e = svc(yaml).validate_source().unwrap_err();
            assert!(e.contains(want), "{yaml}: {e}");
        }
        assert!(serde_yaml::from_str::<Service>("name: web\nports: [{port: 80, target: 8080}]").is_err());
    }

    #[test]
    fn a_service_address_must_be_nobody_elses() {
        let a = svc("name: a\naddresses: [10.96.0.1]\nports: [{port: 80}]");
        let b = svc("name: b\naddresses: [10.96.0.1]\nports: [{port: 80}]");
        let c = svc("name: c\naddresses: [10.0.0.1]\nports: [{port: 80}]");
        let headless = svc("name: h\nports: [{port: 80}]");
        let ws = [wl("w1", "default", "web", "10.0.0.1")];
        let v = check_addresses([&a, &b, &c, &headless], &ws);
        assert_eq!((v[0].is_ok(), v[3].is_ok()), (true, true), "{v:?}");
        assert!(v[1].as_ref().unwrap_err().contains("Service default/a"), "{v:?}");
        assert!(v[2].as_ref().unwrap_err().contains("workload default/w1"), "{v:?}");
    }
}
