//! What the proxies get: a narrow set of handles, not the agent. The state they read is the
//! current snapshot; everything they record goes to the metrics and the live-connection set.

use std::sync::Arc;
use std::time::Duration;

use crate::balance::Loads;
use crate::config::Config;
use crate::connections::Connections;
use crate::ebpf::maps::OrigDstTable;
use crate::identity::Identities;
use crate::metrics::Metrics;
use crate::state::StateStore;

/// The settings the connection path uses, from the agent's configuration.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    /// How long a dial (to an app, a non-mesh destination, or a peer's HBONE port) may take.
    pub connect_timeout: Duration,
    /// Same-node connections through mutual TLS instead of the node-local relay.
    pub same_node_tls: bool,
    /// The mesh's pod ranges: an unknown destination inside them is refused.
    pub mesh_cidrs: Vec<mesh_model::Cidr>,
    /// Endpoints of a Service one connection may try.
    pub service_attempts: usize,
}

impl ProxySettings {
    pub fn from_config(c: &Config) -> ProxySettings {
        ProxySettings {
            connect_timeout: Duration::from_millis(c.connect_timeout_ms),
            same_node_tls: c.same_node_tls,
            mesh_cidrs: c.mesh_cidrs.clone(),
            service_attempts: c.service_attempts,
        }
    }

    pub fn in_mesh_ranges(&self, ip: std::net::IpAddr) -> bool {
        self.mesh_cidrs.iter().any(|c| c.contains(ip))
    }
}

pub struct ProxyInputs {
    pub settings: ProxySettings,
    pub state: Arc<StateStore>,
    pub identities: Arc<Identities>,
    pub metrics: Arc<Metrics>,
    pub conns: Arc<Connections>,
    /// Where outbound connections find their original destination.
    pub orig_dst: OrigDstTable,
    /// Connections carried to each Service endpoint now (the balancer's input).
    pub loads: Arc<Loads>,
}
