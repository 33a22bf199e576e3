//! Connections to an endpoint in another zone (an imported Service's remote endpoint): HBONE
//! inside HBONE. The outer tunnel goes to that zone's east-west gateway, which must prove the
//! gateway's identity, and asks it (CONNECT `endpoint:port`) to forward the stream to the
//! endpoint's agent. Inside that stream the source runs a second mutual TLS session, end to
//! end with the endpoint's agent, which must prove the endpoint's identity and sees the
//! source's own certificate. The gateway forwards bytes it cannot read: the outer stream
//! carries none of the client's bytes in the clear (no early data on it), and the inner
//! session's keys exist only at the two agents.
//!
//! The outer connection is pooled like any tunnel (per source workload and gateway); the inner
//! session is one per connection. A gateway that cannot be reached is remembered, and skipped
//! until it answers again ([`crate::gateway_health`]).

use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use mesh_identity::SpiffeId;
use mesh_model::service::RemoteEndpoint;
use tokio::net::TcpStream;

use super::outbound::{Failure, Upstream};
use crate::hbone::client::{self, EarlyBytes, TunnelError};
use crate::hbone::pool::{Destination, Pool, Source};
use crate::hbone::stream_io::StreamIo;
use crate::identity::WorkloadCert;
use crate::inputs::ProxyInputs;
use crate::outcome::{ConnRecord, Direction, HandshakeFailure, Peer, Reason, Security, TunnelFailure};
use crate::state::LocalWorkload;

/// Opens the way to `target` (an address of the remote zone's network) through its gateway.
#[allow(clippy::too_many_arguments)]
pub async fn open(
    inputs: &Arc<ProxyInputs>,
    pool: &Pool,
    wl: &Arc<LocalWorkload>,
    client: &TcpStream,
    rec: &mut ConnRecord,
    target: SocketAddr,
    remote: &RemoteEndpoint,
    cert: &WorkloadCert,
    early: &mut EarlyBytes,
) -> Result<Upstream, Failure> {
    // The mesh's own ports are not for workloads.
    if mesh_common::is_mesh_port(target.port()) {
        return Err(Failure::new(Reason::MeshPort, &Reason::MeshPort, false));
    }
    // Checked when the push was decoded; a record that fails here is refused, never guessed.
    let (Ok(dst_id), Ok(gw_id)) = (SpiffeId::parse(&remote.identity), SpiffeId::parse(&remote.gateway_identity)) else {
        let r = Reason::Tunnel(TunnelFailure::Handshake(HandshakeFailure::TlsConfig));
        return Err(Failure::new(r, &"the remote endpoint's identity is not a SPIFFE ID", true));
    };
    rec.security = Security::MutualTls;
    rec.dst = Peer { workload: None, principal: Some(Arc::new(dst_id.clone())), addr: Some(target) };
    let timeout = inputs.settings.connect_timeout;
    let service = rec.service.as_ref().map(|s| s.key.clone());

    // The outer tunnel: to the gateway, proving the gateway's identity, carrying nothing of
    // the client's yet.
    let mut none = EarlyBytes::none();
    let src = Source { key: wl.key(), id: &cert.id, cert, client, identity: Some(&wl.known) };
    let to = Destination { id: &gw_id, hbone_addr: remote.gateway, target, service: None, client: None };
    let gateway = remote.gateway;
    let outer = Box::pin(pool.open(src, to, timeout, || wl.netns.dial(gateway, None, timeout), &mut none))
        .await
        .map_err(|e| {
            // No connection, no answer in time, or the connection gone under the stream: the
            // gateway is unreachable until it answers again (its zone may be wholly gone), and
            // its pooled connections, which may be dead without knowing it, are dropped.
            let unreachable =
                matches!(e.failure(), TunnelFailure::Connect | TunnelFailure::Timeout | TunnelFailure::Closed);
            if unreachable && inputs.gateways.mark_unreachable(wl, gateway, &e) {
                pool.retire_address(wl.key(), gateway);
            }
            // Nothing of the client's went on the outer stream: whatever the gateway said (its
            // routes may lag an export just withdrawn, say), another endpoint may be tried.
            Failure { retry: true, ..failure(inputs, &e, "the gateway", false) }
        })?;

    // The inner tunnel, end to end with the endpoint's agent.
    let hbone = SocketAddr::new(target.ip(), mesh_common::HBONE_PORT);
    let inner = async {
        let cfg = cert.client_config(&dst_id).map_err(TunnelError::TlsConfig)?;
        let io = StreamIo::new(outer.send, outer.recv, outer.lease);
        let (mut sender, conn) = client::handshake(io, cfg, hbone).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "tunnel through a gateway ended");
            }
        });
        let active = Arc::new(AtomicUsize::new(0));
        // The client address is not stated: it means nothing in the endpoint's zone.
        let req = client::connect_request(target, service.as_deref(), None);
        let started = client::start_stream(&mut sender, req, &active, client, early)?;
        client::answer(started, timeout).await
    };
    let opened = Box::pin(inner).await;
    let sent_early = early.any();
    opened.map(Upstream::Tunnel).map_err(|e| failure(inputs, &e, "the endpoint", sent_early))
}

/// A failed tunnel as the Service's failover sees it: `sent_early` when the client's first
/// bytes went with it (then a tunnel that died is not retried elsewhere).
fn failure(inputs: &ProxyInputs, e: &TunnelError, whose: &str, sent_early: bool) -> Failure {
    if let Some(h) = e.handshake() {
        inputs.metrics.handshake_failed(Direction::Outbound, &h);
    }
    let retry = match e.failure() {
        TunnelFailure::Denied | TunnelFailure::Refused(_) => false,
        TunnelFailure::Connect | TunnelFailure::Handshake(_) | TunnelFailure::AppUnreachable => true,
        TunnelFailure::H2 | TunnelFailure::Timeout | TunnelFailure::Closed => !sent_early,
    };
    Failure::new(Reason::Tunnel(e.failure()), &format_args!("{whose}: {e}"), retry)
}
