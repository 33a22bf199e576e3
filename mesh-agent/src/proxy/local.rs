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

use super::outbound::{Failure, Upstream};
use crate::inputs::ProxyInputs;
use crate::outcome::{ConnRecord, Direction, HandshakeFailure, Peer, Reason, Security, Target, TunnelFailure};
use crate::state::LocalWorkload;

/// The destination's side of a same-node connection: its policy, then a dial into its netns.
/// A refusal is logged for the destination here (as its agent would across nodes); the
/// caller logs the source's side.
pub async fn open(
    inputs: &Arc<ProxyInputs>,
    src: &Arc<LocalWorkload>,
    dst_wl: Arc<LocalWorkload>,
    out: &mut ConnRecord,
    dst: SocketAddr,
) -> Result<Upstream, Failure> {
    let started = Instant::now();
    out.security = Security::NodeLocal;
    out.dst = Peer { addr: Some(dst), ..Peer::workload(&dst_wl.known()) };
    let source_ip = src.ip_for(dst.ip());
    let inbound = ConnRecord {
        direction: Direction::Inbound,
        security: Security::NodeLocal,
        src: out.src.clone(),
        dst: out.dst.clone(),
        orig_dst: Target::Addr(dst),
        service: out.service.clone(),
    };
    let refuse = |reason: Reason, detail: &dyn std::fmt::Display, retry: bool| {
        inputs.conns.refused(&inbound, reason.clone(), started, detail);
        Err(Failure::new(reason, detail, retry))
    };
    let snap = inputs.state.load();
    if snap.config.version == 0 {
        // The destination's policy is not known yet: nothing is admitted on a guess.
        return refuse(Reason::NoConfig, &Reason::NoConfig, false);
    }
    // The same rule as the destination's HBONE listener: a peer of a mesh the destination's
    // mesh does not accept is refused, and counted, as the handshake would refuse it.
    let (src_known, dst_known) = (src.known(), dst_wl.known());
    if !snap.config.accepts(dst_known.mesh(), src_known.mesh()) {
        let got = src_known.spiffe_id.trust_domain().to_owned();
        let h = HandshakeFailure::Verify(mesh_identity::verify::VerifyError::OtherMesh { got });
        inputs.metrics.handshake_failed(Direction::Inbound, &h);
        inputs.metrics.handshake_failed(Direction::Outbound, &h);
        let reason = Reason::Tunnel(TunnelFailure::Handshake(h));
        return refuse(reason.clone(), &reason, false);
    }
    let principal = src_known.spiffe_id.to_string();
    let facts = Facts { principal: Some(&principal), source_ip: source_ip.unwrap_or(dst.ip()), dst_port: dst.port() };
    // The app is dialled from the source's address (lacking one of the destination's family,
    // any of its addresses: a fallback, counted).
    let client = source_ip.or(src.ips().first().copied()).ok_or(crate::transparent::Fallback::Family);
    if let Decision::Deny(d) = snap.authorize(&dst_wl, &facts).decision {
        let reason = Reason::Denied(d);
        return refuse(reason.clone(), &reason, false);
    }
    drop(snap);
    inputs.metrics.accepted(Direction::Inbound);
    let what = || format!("same-node connection from {} to {dst}", src_known.spiffe_id);
    match Box::pin(inputs.dial_app(&dst_wl, dst, client, what)).await {
        Ok(upstream) => Ok(Upstream::Local { upstream, inbound }),
        Err(e) => refuse(Reason::UpstreamUnreachable, &e, true),
    }
}

/// Relays an opened same-node connection, recording both sides.
pub async fn carry(
    inputs: &Arc<ProxyInputs>,
    client: TcpStream,
    upstream: TcpStream,
    out: Arc<ConnRecord>,
    inbound: ConnRecord,
    first: bytes::Bytes,
    started: Instant,
) {
    let inbound = Arc::new(inbound);
    let live_in = inputs.conns.opened(&inbound);
    // Idle is the destination's bound, as on its HBONE streams.
    let idle = Some(inputs.limits.idle());
    let (bytes, error) = super::relay(&inputs.conns, client, upstream, out, first, started, idle).await;
    if error.as_ref().is_some_and(crate::hbone::io::is_idle) {
        inputs.limits.hit(crate::limits::Limit::StreamIdle, &"same-node connection");
    }
    drop(live_in);
    inputs.conns.closed(&inbound, bytes, started, error.as_ref());
}
