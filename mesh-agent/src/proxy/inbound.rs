//! The 15006 listeners: plaintext TCP that sk_lookup steered away from a meshed workload's app.
//! The accepted socket's local address is the destination the client asked for. There is no
//! peer identity on this path (the client's address is recorded, never trusted as identity).

use std::sync::Arc;
use std::time::Instant;

use tokio::net::{TcpListener, TcpStream};

use super::{dial_in, log_close, relay, reset, ConnRecord, RefuseReason};
use crate::app::{Agent, LocalWorkload};

pub async fn serve(agent: Arc<Agent>, wl: Arc<LocalWorkload>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let agent = agent.clone();
                let wl = wl.clone();
                tokio::spawn(async move { handle(agent, wl, stream, peer).await });
            }
            Err(e) => {
                tracing::warn!(workload = %wl.key, error = %e, "inbound accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn handle(agent: Arc<Agent>, wl: Arc<LocalWorkload>, client: TcpStream, peer: std::net::SocketAddr) {
    let started = Instant::now();
    let _ = client.set_nodelay(true);
    let dst = match client.local_addr() {
        Ok(a) => a,
        Err(_) => return reset(client),
    };
    // A dual-stack listener reports IPv4 clients as v4-mapped.
    let dst = std::net::SocketAddr::new(dst.ip().to_canonical(), dst.port());
    let rec = ConnRecord {
        direction: "inbound",
        // Plaintext: no verified source. An address is never taken for an identity (P2).
        src_workload: None,
        src_principal: None,
        src_addr: Some(std::net::SocketAddr::new(peer.ip().to_canonical(), peer.port()).to_string()),
        dst_workload: Some(wl.key.to_string()),
        dst_principal: Some(wl.spiffe_id.to_string()),
        orig_dst: dst.to_string(),
        security: "none",
    };
    if mesh_common::is_mesh_port(dst.port()) {
        // Dialling it would loop back into the agent.
        agent.stats.refused(RefuseReason::MeshPort);
        log_close(&agent, &rec, 0, 0, started, "destination is a mesh port", RefuseReason::MeshPort.as_str());
        return reset(client);
    }
    // PeerAuthentication: STRICT refuses plaintext outright; PERMISSIVE lets it through after
    // policy, with no peer identity.
    if agent.mtls_mode(&wl, dst.port()) == mesh_model::policy::MtlsMode::Strict {
        agent.stats.refused_label("mtls_strict");
        log_close(&agent, &rec, 0, 0, started, "plaintext refused: PeerAuthentication STRICT", "mtls_strict");
        return reset(client);
    }
    let verdict = agent.authorize(
        &wl,
        &mesh_model::authz::Facts { principal: None, source_ip: peer.ip().to_canonical(), dst_port: dst.port() },
    );
    if let mesh_model::authz::Decision::Deny(reason) = &verdict.decision {
        agent.stats.refused_label(reason.label());
        log_close(&agent, &rec, 0, 0, started, &reason.to_string(), reason.label());
        return reset(client);
    }
    agent.stats.inbound.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // From inside the pod's netns, from the app's own address: sk_lookup leaves that alone.
    let upstream = match Box::pin(dial_in(&wl.netns, dst, Some(dst.ip()), agent.connect_timeout())).await {
        Ok(s) => s,
        Err(e) => {
            agent.stats.refused(RefuseReason::UpstreamUnreachable);
            log_close(&agent, &rec, 0, 0, started, &e.to_string(), RefuseReason::UpstreamUnreachable.as_str());
            return reset(client);
        }
    };
    relay(&agent, client, upstream, rec, started).await;
}
