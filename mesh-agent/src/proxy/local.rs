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

use mesh_model::authz::{Decision, Facts};
use tokio::net::TcpStream;

use crate::inputs::ProxyInputs;
use crate::netns::reset;
use crate::outcome::{ConnRecord, Direction, Peer, Reason, Security, Target};
use crate::state::LocalWorkload;

pub async fn handle(
    inputs: Arc<ProxyInputs>,
    src: Arc<LocalWorkload>,
    dst_wl: Arc<LocalWorkload>,
    client: TcpStream,
    mut out: ConnRecord,
    dst: SocketAddr,
    started: Instant,
) {
    out.security = Security::NodeLocal;
    out.dst = Peer::workload(&dst_wl.known);
    let source_ip = src.ips().iter().find(|ip| ip.is_ipv4() == dst.is_ipv4()).copied().unwrap_or(dst.ip());
    let inb = ConnRecord {
        direction: Direction::Inbound,
        security: Security::NodeLocal,
        src: out.src.clone(),
        dst: out.dst.clone(),
        orig_dst: Target::Addr(dst),
    };
    let refuse = |reason: Reason, detail: &dyn std::fmt::Display, client: TcpStream| {
        inputs.conns.refused(&inb, reason.clone(), started, detail);
        inputs.conns.refused(&out, reason, started, detail);
        reset(client);
    };
    if mesh_common::is_mesh_port(dst.port()) {
        return refuse(Reason::MeshPort, &Reason::MeshPort, client);
    }
    let snap = inputs.state.load();
    if snap.config.version == 0 {
        // The destination's policy is not known yet: nothing is admitted on a guess.
        return refuse(Reason::NoConfig, &Reason::NoConfig, client);
    }
    let principal = src.spiffe_id().to_string();
    let facts = Facts { principal: Some(&principal), source_ip, dst_port: dst.port() };
    if let Decision::Deny(d) = snap.authorize(&dst_wl, &facts).decision {
        let reason = Reason::Denied(d);
        return refuse(reason.clone(), &reason, client);
    }
    drop(snap);
    inputs.metrics.accepted(Direction::Inbound);
    // From inside the destination's netns, from its own address: sk_lookup leaves that alone.
    let upstream = match Box::pin(dst_wl.netns.dial(dst, Some(dst.ip()), inputs.settings.connect_timeout)).await {
        Ok(s) => s,
        Err(e) => return refuse(Reason::UpstreamUnreachable, &e, client),
    };
    let inb = Arc::new(inb);
    let live_in = inputs.conns.opened(&inb);
    let (bytes, error) = super::relay(&inputs.conns, client, upstream, Arc::new(out), started).await;
    drop(live_in);
    inputs.conns.closed(&inb, bytes, started, error.as_ref());
}
