//! The 15001 listeners: a meshed workload's redirected connections. The source is the workload
//! whose netns the accepting listener lives in — a kernel fact, never an address — cross-checked
//! against the cgroup the kernel recorded for the socket. The original destination comes from
//! the map sock_ops filled; without it the connection is refused (fail closed).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use mesh_common::{OrigDst, PortKey, AF_INET, AF_INET6};
use tokio::net::{TcpListener, TcpStream};

use crate::hbone::pool::{Destination, Pool, Source};
use crate::inputs::ProxyInputs;
use crate::netns::reset;
use crate::outcome::{ConnRecord, Direction, KernelRefusal, Peer, Reason, Security, Target};
use crate::state::LocalWorkload;

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
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(workload = %wl.key(), error = %e, "outbound accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let orig = inputs.orig_dst.take(crate::sockdiag::socket_cookie(&stream).ok(), &port_key(wl.netns_cookie, peer));
        // The task lives as long as the connection: the one-off steps (certificate, tunnel
        // set-up, dial) are boxed inside it so their state is freed once done instead of sizing
        // every connection's task.
        tokio::spawn(handle(inputs.clone(), pool.clone(), wl.clone(), stream, peer, orig));
    }
}

async fn handle(
    inputs: Arc<ProxyInputs>,
    pool: Arc<Pool>,
    wl: Arc<LocalWorkload>,
    client: TcpStream,
    peer: SocketAddr,
    orig: Option<OrigDst>,
) {
    let started = Instant::now();
    let _ = client.set_nodelay(true);
    let mut rec = ConnRecord {
        direction: Direction::Outbound,
        security: Security::None,
        src: Peer { addr: Some(peer), ..Peer::workload(&wl.known) },
        dst: Peer::default(),
        orig_dst: Target::Unknown,
    };
    let refuse = |rec: &ConnRecord, client: TcpStream, reason: Reason, detail: &dyn std::fmt::Display| {
        inputs.conns.refused(rec, reason, started, detail);
        reset(client);
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
    let cert = match Box::pin(inputs.identities.get(wl.spiffe_id())).await {
        Ok(c) => c,
        Err(e) => return refuse(&rec, client, Reason::NoCertificate, &e),
    };
    inputs.metrics.accepted(Direction::Outbound);
    let snap = inputs.state.load();
    if !inputs.settings.same_node_tls {
        if let Some(local) = snap.local_at(dst.ip()).cloned() {
            drop((snap, cert));
            return Box::pin(super::local::handle(inputs, wl, local, client, rec, dst, started)).await;
        }
    }
    let Some(dst_wl) = snap.destination(dst.ip()).cloned() else {
        // Not a known workload. Without a configuration that means nothing (the list of
        // workloads may simply not be here yet); inside the mesh's pod ranges it is a workload
        // the agent does not know. Neither leaves in plaintext.
        let no_config = snap.config.version == 0;
        drop((snap, cert));
        if no_config {
            return refuse(&rec, client, Reason::NoConfig, &Reason::NoConfig);
        }
        if inputs.settings.in_mesh_ranges(dst.ip()) {
            let r = Reason::UnknownMeshDestination;
            return refuse(&rec, client, r.clone(), &r);
        }
        // Not a mesh workload: there is no identity to require. Passed through as TCP, and
        // logged as connection_security_policy=none.
        let upstream = match Box::pin(wl.netns.dial(dst, None, inputs.settings.connect_timeout)).await {
            Ok(s) => s,
            Err(e) => return refuse(&rec, client, Reason::UpstreamUnreachable, &e),
        };
        // Boxed: only passed-through connections carry a plain relay's state. Inline, it
        // sized every connection's task, HBONE ones included.
        Box::pin(super::relay(&inputs.conns, client, upstream, Arc::new(rec), started)).await;
        return;
    };
    drop(snap);
    // A meshed destination: mutual TLS to its HBONE port, expecting its identity.
    rec.security = Security::MutualTls;
    rec.dst = Peer::workload(&dst_wl);
    let hbone = SocketAddr::new(dst.ip(), mesh_common::HBONE_PORT);
    let to = Destination { id: &dst_wl.spiffe_id, hbone_addr: hbone, target: dst };
    let src = Source { key: wl.key(), cert: &cert, client: &client };
    let timeout = inputs.settings.connect_timeout;
    let opened = Box::pin(pool.open(src, to, timeout, || wl.netns.dial(hbone, None, timeout))).await;
    let tunnel = match opened {
        Ok(t) => t,
        Err(e) => {
            if let Some(h) = e.handshake() {
                inputs.metrics.handshake_failed(Direction::Outbound, &h);
            }
            return refuse(&rec, client, Reason::Tunnel(e.failure()), &e);
        }
    };
    // Held for the connection's life otherwise: the destination's record and this workload's
    // certificate (the record keeps its own references to both identities).
    drop((dst_wl, cert));
    let rec = Arc::new(rec);
    let live = inputs.conns.opened(&rec);
    let (sent, received, err) = crate::hbone::io::relay(client, tunnel.send, tunnel.recv).await;
    drop((live, tunnel.lease));
    let bytes = crate::outcome::Bytes { sent: sent + tunnel.early, received };
    inputs.conns.closed(&rec, bytes, started, err.as_ref());
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
