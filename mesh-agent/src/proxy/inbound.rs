//! The 15006 listeners: plaintext TCP that sk_lookup steered away from a meshed workload's app.
//! The accepted socket's local address is the destination the client asked for. There is no
//! peer identity on this path (the client's address is recorded, never trusted as identity);
//! the app is dialled from the client's address, as it would have seen it without the mesh.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use mesh_model::authz::{Decision, Facts};
use mesh_model::policy::MtlsMode;
use tokio::net::{TcpListener, TcpStream};

use crate::inputs::ProxyInputs;
use crate::netns::reset;
use crate::outcome::{ConnRecord, Direction, Peer, Reason, Security, Target};
use crate::state::LocalWorkload;

pub async fn serve(inputs: Arc<ProxyInputs>, wl: Arc<LocalWorkload>, listener: TcpListener) {
    let lifecycle = inputs.lifecycle.clone();
    lifecycle
        .accept_loop(listener, "inbound", wl.key(), &inputs.limits, |stream, peer, in_flight| {
            handle(inputs.clone(), wl.clone(), stream, peer, in_flight)
        })
        .await
}

async fn handle(
    inputs: Arc<ProxyInputs>,
    wl: Arc<LocalWorkload>,
    client: TcpStream,
    peer: SocketAddr,
    _in_flight: crate::inputs::InFlight,
) {
    let started = Instant::now();
    let _ = client.set_nodelay(true);
    let Ok(dst) = client.local_addr() else {
        return reset(client);
    };
    // A dual-stack listener reports IPv4 clients as v4-mapped.
    let dst = SocketAddr::new(dst.ip().to_canonical(), dst.port());
    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
    let rec = ConnRecord {
        direction: Direction::Inbound,
        security: Security::None,
        // Plaintext: no verified source. An address is never taken for an identity.
        src: Peer { addr: Some(peer), ..Peer::default() },
        dst: Peer::workload(&wl.known()),
        orig_dst: Target::Addr(dst),
        service: None,
    };
    let refuse = |reason: Reason, client: TcpStream| {
        inputs.conns.refused(&rec, reason.clone(), started, &reason);
        reset(client);
    };
    let slot = match inputs.limits.plaintext(peer.ip()) {
        Ok(s) => s,
        Err(l) => {
            inputs.limits.hit(l, &format_args!("plaintext connection from {peer} to {dst}"));
            return reset(client);
        }
    };
    if mesh_common::is_mesh_port(dst.port()) {
        // Dialling it would loop back into the agent.
        return refuse(Reason::MeshPort, client);
    }
    if crate::transparent::is_own_dial(&client) {
        // This agent's own dial to the app from a client's address, which sk_lookup steered
        // here because the kernel could not record it (`transparent_dial_map_full`): refused,
        // so that it fails rather than loops.
        return refuse(Reason::OwnDial, client);
    }
    let snap = inputs.state.load();
    if snap.config.version == 0 {
        // Neither STRICT nor policy known yet: nothing is admitted on a guess.
        return refuse(Reason::NoConfig, client);
    }
    // PeerAuthentication: STRICT refuses plaintext outright; PERMISSIVE lets it through after
    // policy, with no peer identity.
    if snap.mtls_mode(inputs.state.root_namespace(), &wl, dst.port()) == MtlsMode::Strict {
        return refuse(Reason::MtlsStrict, client);
    }
    let facts = Facts { principal: None, source_ip: peer.ip(), dst_port: dst.port() };
    if let Decision::Deny(d) = snap.authorize(&wl, &facts).decision {
        return refuse(Reason::Denied(d), client);
    }
    drop(snap);
    inputs.metrics.accepted(Direction::Inbound);
    let what = || format!("plaintext connection from {peer} to {dst}");
    // The app sees the client's real address: what it would see without the mesh.
    let upstream = match Box::pin(inputs.dial_app(&wl, dst, Ok(peer.ip()), what)).await {
        Ok(s) => s,
        Err(e) => {
            inputs.conns.refused(&rec, Reason::UpstreamUnreachable, started, &e);
            return reset(client);
        }
    };
    let idle = Some(inputs.limits.idle());
    let (_, error) =
        super::relay(&inputs.conns, client, upstream, Arc::new(rec), bytes::Bytes::new(), started, idle).await;
    if error.as_ref().is_some_and(crate::hbone::io::is_idle) {
        inputs.limits.hit(crate::limits::Limit::StreamIdle, &format_args!("plaintext connection from {peer} to {dst}"));
    }
    drop(slot);
}
