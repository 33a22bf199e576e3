//! Same node: a meshed pod connecting to another meshed pod of this node. Both identities are
//! kernel facts here — the source from the listener that accepted (its netns), the destination
//! from the netns the agent dials into — so there is nothing for TLS to prove and nothing
//! leaves the node. The destination's policy decides exactly as it does for HBONE (with the
//! source's principal), and both sides are logged and counted as they would be across nodes,
//! with `connection_security_policy="node_local"`.
//!
//! `--same-node-tls true` sends these connections through HBONE instead.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::TcpStream;

use super::{dial_in, log_close, relay, reset, ConnRecord, RefuseReason};
use crate::app::{Agent, LocalWorkload};

pub const SECURITY: &str = "node_local";

pub async fn handle(
    agent: Arc<Agent>,
    src: Arc<LocalWorkload>,
    dst_wl: Arc<LocalWorkload>,
    client: TcpStream,
    mut out: ConnRecord,
    dst: SocketAddr,
    started: Instant,
) {
    out.security = SECURITY;
    out.dst_workload = Some(dst_wl.key.to_string());
    out.dst_principal = Some(dst_wl.spiffe_id.to_string());
    let source_ip = src.workload.ips.iter().find(|ip| ip.is_ipv4() == dst.is_ipv4()).copied().unwrap_or(dst.ip());
    let inb = ConnRecord {
        direction: "inbound",
        src_workload: out.src_workload.clone(),
        src_principal: out.src_principal.clone(),
        src_addr: out.src_addr.clone(),
        dst_workload: out.dst_workload.clone(),
        dst_principal: out.dst_principal.clone(),
        orig_dst: dst.to_string(),
        security: SECURITY,
    };
    let refuse = |reason: &'static str, detail: &str, client: TcpStream| {
        agent.stats.refused_label(reason);
        log_close(&agent, &inb, 0, 0, started, detail, reason);
        log_close(&agent, &out, 0, 0, started, detail, reason);
        reset(client);
    };
    if mesh_common::is_mesh_port(dst.port()) {
        return refuse(RefuseReason::MeshPort.as_str(), "destination is a mesh port", client);
    }
    let principal = src.spiffe_id.to_string();
    let verdict = agent
        .authorize(&dst_wl, &mesh_model::authz::Facts { principal: Some(&principal), source_ip, dst_port: dst.port() });
    if let mesh_model::authz::Decision::Deny(reason) = &verdict.decision {
        return refuse(reason.label(), &reason.to_string(), client);
    }
    agent.stats.inbound.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // From inside the destination's netns, from its own address: sk_lookup leaves that alone.
    let upstream = match Box::pin(dial_in(&dst_wl.netns, dst, Some(dst.ip()), agent.connect_timeout())).await {
        Ok(s) => s,
        Err(e) => return refuse(RefuseReason::UpstreamUnreachable.as_str(), &e.to_string(), client),
    };
    let inb = Arc::new(inb);
    let live_in = super::opened(&agent, &inb);
    let (sent, received, error) = relay(&agent, client, upstream, out, started).await;
    drop(live_in);
    log_close(&agent, &inb, sent, received, started, error.as_deref().unwrap_or("-"), "ok");
}
