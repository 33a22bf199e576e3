//! The 15001 listeners: a meshed workload's redirected connections. The source is the workload
//! whose netns the accepting listener lives in — a kernel fact, never an address — cross-checked
//! against the cgroup the kernel recorded for the socket. The original destination comes from
//! the map sock_ops filled; without it the connection is refused (fail closed). A destination
//! that is a Service address goes to one of its endpoints (`service`).

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Instant;

use mesh_common::{OrigDst, PortKey, AF_INET, AF_INET6};
use tokio::net::{TcpListener, TcpStream};

use crate::hbone::client::{EarlyBytes, Tunnel};
use crate::hbone::pool::{Destination, Pool, Source};
use crate::identity::WorkloadCert;
use crate::inputs::ProxyInputs;
use crate::netns::reset;
use crate::outcome::{
    ConnRecord, Direction, HandshakeFailure, KernelRefusal, Peer, Reason, Security, Target, TunnelFailure,
};
use crate::state::LocalWorkload;
use mesh_identity::verify::VerifyError;

/// The socket address an [`OrigDst`] names.
pub fn orig_dst_addr(o: &OrigDst) -> Option<SocketAddr> {
    let ip = match o.dst.family {
        AF_INET => IpAddr::V4(Ipv4Addr::from(o.dst.addr[0].to_ne_bytes())),
        AF_INET6 => {
            let mut b = [0u8; 16];
            for (i, w) in o.dst.addr.iter().enumerate() {
                b[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
            let v6 = Ipv6Addr::from(b);
            // A dual-stack socket's v4-mapped destination is dialled as IPv4.
            v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, o.dst.port))
}

/// Where the agent finds an accepted socket's original destination.
pub fn port_key(netns_cookie: u64, peer: SocketAddr) -> PortKey {
    PortKey { netns_cookie, port: peer.port(), family: if peer.is_ipv4() { AF_INET } else { AF_INET6 }, _pad: 0 }
}

pub async fn serve(inputs: Arc<ProxyInputs>, pool: Arc<Pool>, wl: Arc<LocalWorkload>, listener: TcpListener) {
    let lifecycle = inputs.lifecycle.clone();
    lifecycle
        .accept_loop(listener, "outbound", wl.key(), &inputs.limits, |stream, peer, in_flight| {
            let orig =
                inputs.orig_dst.take(crate::sockdiag::socket_cookie(&stream).ok(), &port_key(wl.netns_cookie, peer));
            // The task lives as long as the connection, and holds only what carrying it needs:
            // the one-off steps (certificate, tunnel set-up, dial) run boxed, and their state is
            // freed once done instead of sizing every connection's task.
            let setup = Box::pin(handle(inputs.clone(), pool.clone(), wl.clone(), stream, peer, orig));
            async move {
                let _in_flight = in_flight;
                if let Some(carry) = setup.await {
                    carry.await
                }
            }
        })
        .await
}

async fn handle(
    inputs: Arc<ProxyInputs>,
    pool: Arc<Pool>,
    wl: Arc<LocalWorkload>,
    client: TcpStream,
    peer: SocketAddr,
    orig: Option<OrigDst>,
) -> Option<Carry> {
    let started = Instant::now();
    let _ = client.set_nodelay(true);
    // Read once: the record and the certificate are of the same identity.
    let known = wl.known();
    let mut rec = ConnRecord {
        direction: Direction::Outbound,
        security: Security::None,
        src: Peer { addr: Some(peer), ..Peer::workload(&known) },
        dst: Peer::default(),
        orig_dst: Target::Unknown,
        service: None,
    };
    let refuse = |rec: &ConnRecord, client: TcpStream, reason: Reason, detail: &dyn std::fmt::Display| {
        inputs.conns.refused(rec, reason, started, detail);
        reset(client);
        None
    };
    let kernel = |k: KernelRefusal| Reason::Kernel(k);
    let Some(orig) = orig else {
        let r = kernel(KernelRefusal::NoOrigDst);
        return refuse(&rec, client, r.clone(), &r);
    };
    let Some(dst) = orig_dst_addr(&orig) else {
        let r = kernel(KernelRefusal::UnknownFamily);
        return refuse(&rec, client, r.clone(), &r);
    };
    rec.orig_dst = Target::Addr(dst);
    if orig.workload_id != wl.id {
        let r = kernel(KernelRefusal::WorkloadMismatch);
        return refuse(&rec, client, r.clone(), &r);
    }
    // The mesh's own ports are not for workloads: on this pod they would loop into the agent,
    // elsewhere they are other agents' endpoints.
    if mesh_common::is_mesh_port(dst.port()) {
        return refuse(&rec, client, Reason::MeshPort, &Reason::MeshPort);
    }
    // Nothing leaves a meshed workload before it can prove who it is.
    let cert = match Box::pin(inputs.identities.get(&known.spiffe_id)).await {
        Ok(c) => c,
        Err(e) => return refuse(&rec, client, Reason::NoCertificate, &e),
    };
    inputs.metrics.accepted(Direction::Outbound);
    // A Service address, unless a workload has it (a workload's own address always means the
    // workload; the controller refuses such Services, but an agent's file may name one).
    let snap = inputs.state.load();
    let svc = snap.config.services.get(&dst.ip()).filter(|_| snap.destination(dst.ip()).is_none()).cloned();
    drop(snap);
    if let Some(svc) = svc {
        return Box::pin(super::service::handle(inputs, pool, wl, client, rec, svc, dst, cert, started)).await;
    }
    let mut early = EarlyBytes::default();
    match Box::pin(open(&inputs, &pool, &wl, &client, &mut rec, dst, &cert, &mut early, false)).await {
        Ok(upstream) => {
            // Held for the connection's life otherwise: this workload's certificate (the record
            // keeps its own references to both identities).
            drop(cert);
            Some(carry(inputs, client, rec, upstream, early, started, None))
        }
        Err(f) => refuse(&rec, client, f.reason, &f.detail),
    }
}

/// Where a connection goes once the destination agreed: a relay to a pod of this node, a
/// tunnel stream to another node's agent, or a plain TCP connection outside the mesh.
pub enum Upstream {
    Local { upstream: TcpStream, inbound: ConnRecord },
    Tunnel(Tunnel),
    Plain(TcpStream),
}

/// Why a destination could not be used; `retry` when another endpoint of a Service may be
/// tried instead: nothing of the connection can have reached an app, and the refusal was not
/// a policy's.
pub struct Failure {
    pub reason: Reason,
    pub detail: String,
    pub retry: bool,
}

impl Failure {
    pub fn new(reason: Reason, detail: &dyn std::fmt::Display, retry: bool) -> Failure {
        Failure { reason, detail: detail.to_string(), retry }
    }
}

/// Opens the way to `dst` for `wl`'s connection, filling in the record's destination: the
/// node-local relay when a workload of this node has the address, mutual TLS requiring the
/// destination's identity when a mesh workload has it, plain TCP when nothing in the mesh
/// does and it is outside the mesh's ranges — or, `listed_outside`, when the controller's
/// Service record lists it as an endpoint that is no workload (it knows the address, and knows
/// it is not in the mesh: a pod of a namespace outside the mesh, say). `early` keeps what the
/// client wrote before, if a tunnel attempt read it.
#[allow(clippy::too_many_arguments)]
pub async fn open(
    inputs: &Arc<ProxyInputs>,
    pool: &Pool,
    wl: &Arc<LocalWorkload>,
    client: &TcpStream,
    rec: &mut ConnRecord,
    dst: SocketAddr,
    cert: &WorkloadCert,
    early: &mut EarlyBytes,
    listed_outside: bool,
) -> Result<Upstream, Failure> {
    // The mesh's own ports are not for workloads (a Service's target port included).
    if mesh_common::is_mesh_port(dst.port()) {
        return Err(Failure::new(Reason::MeshPort, &Reason::MeshPort, false));
    }
    let snap = inputs.state.load();
    if !inputs.settings.same_node_tls {
        if let Some(local) = snap.local_at(dst.ip()).cloned() {
            drop(snap);
            return super::local::open(inputs, wl, local, rec, dst).await;
        }
    }
    let Some(dst_wl) = snap.destination(dst.ip()).cloned() else {
        // Not a known workload. Without a configuration that means nothing (the list of
        // workloads may simply not be here yet); inside the mesh's pod ranges it is a workload
        // the agent does not know. Neither leaves in plaintext.
        let no_config = snap.config.version == 0;
        drop(snap);
        if no_config {
            return Err(Failure::new(Reason::NoConfig, &Reason::NoConfig, false));
        }
        if inputs.settings.in_mesh_ranges(dst.ip()) && !listed_outside {
            let r = Reason::UnknownMeshDestination;
            return Err(Failure::new(r.clone(), &r, true));
        }
        // Not a mesh workload: there is no identity to require. Passed through as TCP, and
        // logged as connection_security_policy=none.
        rec.security = Security::None;
        rec.dst = Peer { addr: Some(dst), ..Peer::default() };
        return match Box::pin(
            inputs.dial(&wl.netns, dst, None, || format!("outbound connection from {} to {dst}", wl.key())),
        )
        .await
        {
            Ok(s) => Ok(Upstream::Plain(s)),
            Err(e) => Err(Failure::new(Reason::UpstreamUnreachable, &e, true)),
        };
    };
    drop(snap);
    // A meshed destination: mutual TLS to its HBONE port, expecting its identity.
    rec.security = Security::MutualTls;
    rec.dst = Peer { addr: Some(dst), ..Peer::workload(&dst_wl) };
    let hbone = SocketAddr::new(dst.ip(), mesh_common::HBONE_PORT);
    let service = rec.service.as_ref().map(|s| s.key.clone());
    let to = Destination {
        id: &dst_wl.spiffe_id,
        hbone_addr: hbone,
        target: dst,
        service: service.as_deref(),
        client: wl.ip_for(dst.ip()),
    };
    // The source identity is the certificate's: the tunnel is what that certificate proves,
    // whatever the workload's identity has become meanwhile (the pool then closes it).
    let src = Source { key: wl.key(), id: &cert.id, cert, client, identity: Some(&wl.known) };
    let timeout = inputs.settings.connect_timeout;
    let opened = Box::pin(pool.open(src, to, timeout, || wl.netns.dial(hbone, None, timeout), early)).await;
    let sent_early = early.any();
    opened.map(Upstream::Tunnel).map_err(|e| {
        // A peer whose mesh does not accept ours ends the handshake (it verifies our
        // certificate after we verified its own, so what we see is the connection ending):
        // said as what it is, as the peer says it.
        let snap = inputs.state.load();
        let src_mesh = snap.config.mesh_of_trust_domain(cert.id.trust_domain(), inputs.state.trust_domain());
        let other_mesh = src_mesh.is_none_or(|m| !snap.config.accepts(dst_wl.mesh(), m))
            && matches!(e.failure(), TunnelFailure::Handshake(_) | TunnelFailure::H2 | TunnelFailure::Closed);
        drop(snap);
        if other_mesh {
            let h =
                HandshakeFailure::Verify(VerifyError::OtherMesh { got: dst_wl.spiffe_id.trust_domain().to_owned() });
            inputs.metrics.handshake_failed(Direction::Outbound, &h);
            return Failure::new(Reason::Tunnel(TunnelFailure::Handshake(h)), &e, true);
        }
        if let Some(h) = e.handshake() {
            inputs.metrics.handshake_failed(Direction::Outbound, &h);
        }
        let retry = match e.failure() {
            // The destination's policy refused (or the request was bad): another endpoint is
            // not asked to overrule it.
            TunnelFailure::Denied | TunnelFailure::Refused(_) => false,
            // Nothing was sent, or the destination could not reach its app: nothing of the
            // connection reached an app.
            TunnelFailure::Connect | TunnelFailure::Handshake(_) | TunnelFailure::AppUnreachable => true,
            // The tunnel died or went quiet after the request: if the client's first bytes
            // went with it, the app may have them, and another endpoint must not get them too.
            TunnelFailure::H2 | TunnelFailure::Timeout | TunnelFailure::Closed => !sent_early,
        };
        Failure::new(Reason::Tunnel(e.failure()), &e, retry)
    })
}

/// Carries an opened connection until both sides are done, then records it. `in_flight` (a
/// Service endpoint's count of connections) is held as long.
pub fn carry(
    inputs: Arc<ProxyInputs>,
    client: TcpStream,
    rec: ConnRecord,
    upstream: Upstream,
    early: EarlyBytes,
    started: Instant,
    in_flight: Option<crate::balance::InFlight>,
) -> Carry {
    let rec = Arc::new(rec);
    match upstream {
        Upstream::Tunnel(tunnel) => {
            // The tunnel sent the client's first bytes behind its request: kept until the
            // answer in case they had to go elsewhere, they are not needed from here on, and an
            // idle connection must not hold them for its life.
            drop(early);
            let live = inputs.conns.opened(&rec);
            Carry::Tunnel(TunnelCarry {
                relay: Some(crate::hbone::io::relay(client, tunnel.send, tunnel.recv, None)),
                held: Some((live, tunnel.lease)),
                in_flight,
                early: tunnel.early,
                rec,
                inputs,
                started,
            })
        }
        // Boxed: only passed-through and same-node connections carry a plain relay's state.
        Upstream::Plain(upstream) => Carry::Other(Box::pin(async move {
            super::relay(&inputs.conns, client, upstream, rec, early.into_read(), started, None).await;
            drop(in_flight);
        })),
        Upstream::Local { upstream, inbound } => Carry::Other(Box::pin(async move {
            super::local::carry(&inputs, client, upstream, rec, inbound, early.into_read(), started).await;
            drop(in_flight);
        })),
    }
}

/// What carries a connection once it is open: the task of every idle connection holds one for
/// the connection's life, so the common case, a tunnel stream, is a plain struct of what it
/// needs (about 300 bytes) rather than an async function's frame.
// The large variant is the one nearly every connection uses; boxing it would add an allocation.
#[allow(clippy::large_enum_variant)]
pub enum Carry {
    Tunnel(TunnelCarry),
    Other(Pin<Box<dyn Future<Output = ()> + Send>>),
}

pub struct TunnelCarry {
    /// Dropped as soon as it is done (the socket and the stream go first).
    relay: Option<crate::hbone::io::Relay>,
    /// Released before the close is recorded: the connection's entry in the live table, the
    /// stream's share of its HBONE connection.
    held: Option<(crate::connections::Live, crate::hbone::client::StreamLease)>,
    /// A Service endpoint's count of connections, released last.
    in_flight: Option<crate::balance::InFlight>,
    early: u64,
    rec: Arc<ConnRecord>,
    inputs: Arc<ProxyInputs>,
    started: Instant,
}

impl Future for Carry {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        match self.get_mut() {
            Carry::Other(f) => f.as_mut().poll(cx),
            Carry::Tunnel(t) => {
                let Some(relay) = t.relay.as_mut() else { return Poll::Ready(()) };
                let (sent, received, err) = ready!(Pin::new(relay).poll(cx));
                t.relay = None;
                drop(t.held.take());
                let bytes = crate::outcome::Bytes { sent: sent + t.early, received };
                t.inputs.conns.closed(&t.rec, bytes, t.started, err.as_ref());
                drop(t.in_flight.take());
                Poll::Ready(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_common::SockAddr;

    #[test]
    fn orig_dst_round_trips_v4_v6_and_mapped() {
        let v4 = OrigDst {
            dst: SockAddr { family: AF_INET, port: 8080, _pad: 0, addr: [u32::from_ne_bytes([10, 0, 2, 7]), 0, 0, 0] },
            ..Default::default()
        };
        assert_eq!(orig_dst_addr(&v4), Some("10.0.2.7:8080".parse().unwrap()));
        let mut b = [0u32; 4];
        b[0] = u32::from_ne_bytes([0xfd, 0, 0, 0]);
        b[3] = u32::from_ne_bytes([0, 0, 0, 7]);
        let v6 = OrigDst { dst: SockAddr { family: AF_INET6, port: 80, _pad: 0, addr: b }, ..Default::default() };
        assert_eq!(orig_dst_addr(&v6), Some("[fd00::7]:80".parse().unwrap()));
        let mapped = [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), u32::from_ne_bytes([10, 0, 0, 1])];
        let m = OrigDst { dst: SockAddr { family: AF_INET6, port: 80, _pad: 0, addr: mapped }, ..Default::default() };
        assert_eq!(orig_dst_addr(&m), Some("10.0.0.1:80".parse().unwrap()));
        let bad = OrigDst { dst: SockAddr { family: 99, ..Default::default() }, ..Default::default() };
        assert_eq!(orig_dst_addr(&bad), None);
    }

    #[test]
    fn port_key_uses_peer_port_and_family() {
        let k = port_key(42, "127.0.0.1:40000".parse().unwrap());
        assert_eq!((k.netns_cookie, k.port, k.family), (42, 40000, AF_INET));
        let k = port_key(42, "[::1]:40001".parse().unwrap());
        assert_eq!((k.port, k.family), (40001, AF_INET6));
    }
}
