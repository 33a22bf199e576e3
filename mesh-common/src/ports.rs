//! The mesh's well-known ports, following Istio ambient's conventions so that operators and
//! network policies recognise them.

/// Outbound capture: the agent's listener at 127.0.0.1 / [::1] inside each meshed pod's netns.
pub const OUTBOUND_PORT: u16 = 15001;
/// Inbound plaintext capture: the agent's socket in each meshed pod's netns, fed by sk_lookup.
pub const INBOUND_PORT: u16 = 15006;
/// HBONE (HTTP/2 CONNECT over mutual TLS) on each meshed pod's address.
pub const HBONE_PORT: u16 = 15008;
/// Admin API (localhost only).
pub const ADMIN_PORT: u16 = 15000;
/// Prometheus metrics.
pub const METRICS_PORT: u16 = 15020;
/// Readiness.
pub const READINESS_PORT: u16 = 15021;

/// The mesh's own ports. A captured connection to one of them is refused by the agent: from
/// a pod it would loop into the agent (15001/15006/15008) or reach another node's agent
/// endpoints (admin, metrics, readiness), which are not for workloads.
pub const MESH_PORTS: [u16; 6] = [OUTBOUND_PORT, INBOUND_PORT, HBONE_PORT, ADMIN_PORT, METRICS_PORT, READINESS_PORT];

pub fn is_mesh_port(port: u16) -> bool {
    let mut i = 0;
    while i < MESH_PORTS.len() {
        if MESH_PORTS[i] == port {
            return true;
        }
        i += 1;
    }
    false
}
