//! The agent's admin API (127.0.0.1:15000) and local API answers, as typed records. The agent
//! serialises these; `meshctl` and the tests deserialise the same types.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Which way a connection goes, seen from the agent that reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// A meshed workload of this node is the client.
    Outbound,
    /// A workload of this node is the server.
    Inbound,
}

impl Direction {
    pub const ALL: [Direction; 2] = [Direction::Outbound, Direction::Inbound];

    pub const fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }

    /// Istio's `reporter` label.
    pub const fn reporter(self) -> &'static str {
        match self {
            Direction::Outbound => "source",
            Direction::Inbound => "destination",
        }
    }
}

/// How a connection was protected: Istio's `connection_security_policy`, plus `node_local` for
/// two pods of one node (both identities kernel facts, nothing on a wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Security {
    MutualTls,
    NodeLocal,
    None,
}

impl Security {
    pub const fn as_str(self) -> &'static str {
        match self {
            Security::MutualTls => "mutual_tls",
            Security::NodeLocal => "node_local",
            Security::None => "none",
        }
    }
}

/// How a workload came to be registered on the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The agent's workloads file.
    File,
    /// The local API (persisted in the agent's state directory).
    Api,
    /// The controller's push: a Kubernetes pod of this node, found by its UID.
    Kubernetes,
}

/// A workload this agent captures, with the kernel objects that tie it to traffic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadInfo {
    pub namespace: String,
    pub name: String,
    pub service_account: String,
    pub identity: String,
    pub ips: Vec<IpAddr>,
    pub labels: BTreeMap<String, String>,
    pub netns: PathBuf,
    pub cgroup: PathBuf,
    pub cgroup_id: u64,
    pub netns_cookie: u64,
    pub source: Source,
    /// The Kubernetes pod's UID (pods found by UID).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    /// Its intercepted connections alive now (the kernel's count, what its quota bounds).
    #[serde(default)]
    pub live_connections: u64,
    /// Its quota of live intercepted connections.
    #[serde(default)]
    pub max_connections: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PolicyKind {
    AuthorizationPolicy,
    PeerAuthentication,
    /// Configuration the controller refused; `reason` says where and why.
    Rejected,
}

/// A policy in force on this node (or one the controller rejected).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyInfo {
    pub namespace: String,
    pub name: String,
    pub kind: PolicyKind,
    /// ALLOW, DENY, AUDIT, DRY-RUN, `MTLS STRICT`/`MTLS PERMISSIVE`, or INVALID.
    pub action: String,
    /// This node's workloads it selects (`namespace/name`).
    pub workloads: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// An identity this agent serves and its certificate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertInfo {
    pub identity: String,
    /// How many of this node's workloads use it.
    pub workloads: usize,
    /// A certificate is in hand and not expired.
    pub ready: bool,
    /// Seconds since the epoch.
    pub not_before: Option<i64>,
    pub not_after: Option<i64>,
    /// The certificate chain, leaf first (PEM; public).
    #[serde(default)]
    pub chain: Vec<String>,
}

/// A mesh as this node's agent knows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MeshInfo {
    pub name: String,
    pub trust_domain: String,
    /// The meshes whose identities its workloads accept besides its own.
    pub trust: Vec<String>,
    pub namespaces: Vec<String>,
    /// When its CA's root (the earliest, if several) expires, seconds since the epoch.
    pub root_not_after: Option<i64>,
    /// Its workloads' mTLS mode where no PeerAuthentication says.
    pub mtls_mode: String,
}

/// `/meshes`: the meshes, and what the controller reported about meshes it could not admit
/// (a namespace labelled for a mesh that does not exist, a rejected Mesh).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Meshes {
    pub meshes: Vec<MeshInfo>,
    pub problems: Vec<String>,
}

/// A connection being relayed now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionInfo {
    pub direction: Direction,
    pub src_workload: Option<String>,
    pub src_principal: Option<String>,
    pub src_addr: Option<SocketAddr>,
    pub dst_workload: Option<String>,
    pub dst_principal: Option<String>,
    pub orig_dst: String,
    /// The Service the client connected to (`name.namespace.svc.cluster.local`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst_service: Option<String>,
    pub security: Security,
    pub age_ms: u64,
}

/// A Service as this agent resolves it, with each endpoint's health as seen from here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceInfo {
    pub namespace: String,
    pub name: String,
    /// Imported from other zones: the address is this zone's for it, and endpoints in other
    /// zones name their zone.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub imported: bool,
    /// Empty for a headless Service.
    pub addresses: Vec<IpAddr>,
    /// (port, target port)
    pub ports: Vec<(u16, u16)>,
    pub endpoints: Vec<EndpointInfo>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointInfo {
    pub address: IpAddr,
    /// `namespace/name` of the mesh workload at the address; None when it is not in the mesh.
    pub workload: Option<String>,
    /// The identity a connection to it must prove; None when it is not in the mesh.
    pub identity: Option<String>,
    pub ready: bool,
    /// Connections this agent is carrying to it now (what the balancer compares).
    pub in_flight: u32,
    /// The zone of an endpoint in another zone (reached through that zone's gateway).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
}

/// A node-wide kernel link: whether this agent took it over, and whether it is still pinned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LinkInfo {
    pub name: String,
    pub adopted: bool,
    pub attached: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MapFill {
    pub entries: u64,
    pub capacity: u64,
}

/// Connections of one direction.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DirectionStats {
    /// Captured connections that got past the checks and were carried (or tried to be).
    pub accepted: u64,
    /// Refusals by reason (the same labels as `sockmesh_connections_refused_total`).
    pub refused: BTreeMap<String, u64>,
    /// Failed mutual-TLS handshakes by reason.
    pub handshake_failures: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HboneStats {
    /// TLS sessions opened as a client (one per pooled HBONE connection).
    pub tls_sessions: u64,
    /// CONNECT streams sent.
    pub streams: u64,
    /// Streams that carried the client's first bytes right behind the CONNECT request.
    pub early_streams: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertStats {
    pub issued: u64,
    /// Failed certificate requests by reason.
    pub failures: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigStats {
    /// The version of the configuration applied (0: none received yet).
    pub version: u64,
    /// From the controller accepting the last change to this agent applying it.
    pub push_lag_ms: u64,
}

/// What the agent counted. Read from its Prometheus registry, so it always agrees with
/// `/metrics`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Stats {
    pub node: String,
    /// The kernel programs' counters (`redirected`, `inbound_steered`, ...).
    pub kernel: BTreeMap<String, u64>,
    /// Entries and capacity of each bounded eBPF map.
    pub maps: BTreeMap<String, MapFill>,
    pub outbound: DirectionStats,
    pub inbound: DirectionStats,
    pub hbone: HboneStats,
    pub certificates: CertStats,
    pub config: ConfigStats,
    /// Original-destination entries the agent's census removed: their socket was gone and no
    /// kernel hook had removed them (a restart's leftovers, or a kind of socket the hooks
    /// miss), or they belonged to a workload no longer registered.
    #[serde(default)]
    pub reclaimed_entries: u64,
    /// Connections and streams refused or closed at an abuse limit, by limit
    /// (`pending_handshakes`, `connections_per_peer`, `idle`, ...).
    #[serde(default)]
    pub limits: BTreeMap<String, u64>,
}

/// `/status`: the agent at a glance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub node: String,
    pub ready: bool,
    pub not_ready: Vec<String>,
    pub links: Vec<LinkInfo>,
    /// Where the agent finds an accepted connection's original destination: `by_connection`
    /// (it runs below the programs' cgroup root, so the kernel binds each destination to the
    /// socket the agent accepts) or `by_port` (it runs outside it).
    #[serde(default)]
    pub orig_dst_lookup: String,
    pub workloads: usize,
    pub connections: usize,
    pub controller: String,
    pub stats: Stats,
}

/// `/healthz/ready`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Readiness {
    pub ready: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing: Vec<String>,
}

/// `/config_dump`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigDump {
    /// The agent's settings (flags), as it runs with them.
    pub config: serde_json::Value,
    pub workloads: Vec<WorkloadInfo>,
    pub policies: Vec<PolicyInfo>,
    pub config_version: u64,
    pub certificates: Vec<CertInfo>,
    pub links: Vec<LinkInfo>,
}

/// The admin API's paths.
pub mod paths {
    pub const STATUS: &str = "/status";
    pub const CONFIG_DUMP: &str = "/config_dump";
    pub const WORKLOADS: &str = "/workloads";
    pub const POLICIES: &str = "/policies";
    pub const CERTIFICATES: &str = "/certificates";
    pub const CONNECTIONS: &str = "/connections";
    pub const SERVICES: &str = "/services";
    pub const MESHES: &str = "/meshes";
    pub const STATS: &str = "/stats";
    pub const READY: &str = "/healthz/ready";
    pub const ALL: [&str; 9] =
        [STATUS, CONFIG_DUMP, WORKLOADS, POLICIES, CERTIFICATES, CONNECTIONS, SERVICES, MESHES, STATS];
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enums_serialise_as_their_labels() {
        for d in Direction::ALL {
            assert_eq!(serde_json::to_value(d).unwrap(), d.as_str());
        }
        for s in [Security::MutualTls, Security::NodeLocal, Security::None] {
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
    }

    #[test]
    fn stats_round_trip() {
        let mut s = Stats { node: "n1".into(), ..Default::default() };
        s.outbound.refused.insert("no_certificate".into(), 2);
        s.maps.insert("SM_ORIG_DST".into(), MapFill { entries: 3, capacity: 65536 });
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["outbound"]["refused"]["no_certificate"], 2);
        assert_eq!(v["maps"]["SM_ORIG_DST"]["capacity"], 65536);
        assert_eq!(serde_json::from_value::<Stats>(v).unwrap(), s);
    }
}
