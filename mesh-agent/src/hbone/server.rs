//! The HBONE server on 15008, inside each meshed workload's netns: mutual TLS 1.3 with the
//! workload's certificate (the client must present a valid workload certificate of the trust
//! domain), then HTTP/2 CONNECT requests, each dialled to the app from the app's own address.
//!
//! Responses: 200 tunnel open; 400 malformed request, or a destination that is not this
//! workload; 401 denied by policy; 503 the app is unreachable. Header lists, concurrent streams
//! and the handshake are bounded.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::server::SendResponse;
use http::{Method, StatusCode};
use mesh_identity::verify::spiffe_id_of;
use mesh_identity::SpiffeId;
use tokio::net::{TcpListener, TcpStream};

use super::{dial_in, h2io, log_close, ConnRecord, RefuseReason};
use crate::app::{Agent, LocalWorkload};

pub const MAX_HEADER_LIST: u32 = 16 * 1024;
pub const MAX_STREAMS: u32 = 256;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a CONNECT request was refused before any dial.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadRequest {
    NotConnect,
    NoAuthority,
    BadAuthority,
    NotLocal,
    MeshPort,
}

impl BadRequest {
    pub fn reason(self) -> &'static str {
        match self {
            BadRequest::NotConnect => "hbone_not_connect",
            BadRequest::NoAuthority => "hbone_no_authority",
            BadRequest::BadAuthority => "hbone_bad_authority",
            BadRequest::NotLocal => "hbone_destination_not_local",
            BadRequest::MeshPort => "hbone_mesh_port",
        }
    }
}

/// The destination a CONNECT request asks for, if this workload may serve it. Pure.
pub fn parse_connect(method: &Method, uri: &http::Uri, local_ips: &[IpAddr]) -> Result<SocketAddr, BadRequest> {
    if method != Method::CONNECT {
        return Err(BadRequest::NotConnect);
    }
    let auth = uri.authority().ok_or(BadRequest::NoAuthority)?;
    // An address, never a name: the agent resolves nothing on behalf of a peer.
    let dst: SocketAddr = auth.as_str().parse().map_err(|_| BadRequest::BadAuthority)?;
    if dst.port() == 0 {
        return Err(BadRequest::BadAuthority);
    }
    if !local_ips.contains(&dst.ip()) {
        return Err(BadRequest::NotLocal);
    }
    if mesh_common::is_mesh_port(dst.port()) {
        return Err(BadRequest::MeshPort);
    }
    Ok(dst)
}

pub async fn serve(agent: Arc<Agent>, wl: Arc<LocalWorkload>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((tcp, peer)) => {
                let agent = agent.clone();
                let wl = wl.clone();
                tokio::spawn(async move { connection(agent, wl, tcp, peer).await });
            }
            Err(e) => {
                tracing::warn!(workload = %wl.key, error = %e, "HBONE accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn connection(agent: Arc<Agent>, wl: Arc<LocalWorkload>, tcp: TcpStream, peer: SocketAddr) {
    let _ = tcp.set_nodelay(true);
    let Some(cert) = agent.identities.current(&wl.spiffe_id) else {
        agent.stats.refused(RefuseReason::NoCertificate);
        tracing::warn!(workload = %wl.key, %peer, "refused HBONE connection: this workload has no certificate yet");
        return super::reset(tcp);
    };
    // Each poll of this connection's task writes once (see batch.rs).
    let io = super::batch::BatchIo::new(tcp);
    let batcher = io.batcher();
    batcher.run(Box::pin(tunnel(agent, wl, cert, io, peer))).await
}

async fn tunnel(
    agent: Arc<Agent>,
    wl: Arc<LocalWorkload>,
    cert: Arc<crate::identity::WorkloadCert>,
    io: super::batch::BatchIo,
    peer: SocketAddr,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(cert.server_config.clone());
    drop(cert);
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(io)).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            let reason = super::handshake_failure(&e);
            agent.stats.handshake_failed("inbound", reason);
            tracing::warn!(workload = %wl.key, %peer, reason, error = %e, "HBONE handshake refused");
            return;
        }
        Err(_) => {
            agent.stats.handshake_failed("inbound", "handshake_timeout");
            return;
        }
    };
    let peer_id = match tls.get_ref().1.peer_certificates().and_then(|c| c.first()).map(spiffe_id_of) {
        Some(Ok(id)) => id,
        _ => {
            agent.stats.handshake_failed("inbound", "no_certificate");
            return;
        }
    };
    let h2 = h2::server::Builder::new()
        .max_header_list_size(MAX_HEADER_LIST)
        .max_concurrent_streams(MAX_STREAMS)
        .initial_window_size(super::tunnel::STREAM_WINDOW)
        .initial_connection_window_size(super::tunnel::CONNECTION_WINDOW)
        .max_frame_size(super::tunnel::MAX_FRAME_SIZE)
        .handshake::<_, Bytes>(tls);
    let mut conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, h2).await {
        Ok(Ok(c)) => c,
        _ => {
            agent.stats.handshake_failed("inbound", "h2_handshake");
            return;
        }
    };
    let peer_id = Arc::new(peer_id);
    while let Some(next) = conn.accept().await {
        let Ok((req, respond)) = next else { break };
        let (agent, wl, peer_id) = (agent.clone(), wl.clone(), peer_id.clone());
        // The stream's first steps (policy, the dial to the app, usually complete within
        // connect(), and the answer) run here, in this connection's poll, so the answer leaves
        // in the same write as what the connection sends anyway (batch.rs); the rest of the
        // stream gets a task of its own.
        // Only the relay outlives the set-up: it is spawned on its own, so an idle stream's task
        // does not keep the set-up's state (the request, its headers) for the stream's life.
        let mut setup = Box::pin(stream(agent, wl, peer_id, peer, req, respond));
        match std::future::poll_fn(|cx| Poll::Ready(setup.as_mut().poll(cx))).await {
            Poll::Ready(Some(relay)) => {
                tokio::spawn(relay);
            }
            Poll::Ready(None) => {}
            Poll::Pending => {
                tokio::spawn(async move {
                    if let Some(relay) = setup.await {
                        relay.await;
                    }
                });
            }
        }
    }
}

fn status(respond: &mut SendResponse<Bytes>, code: StatusCode) {
    let resp = http::Response::builder().status(code).body(()).expect("a valid response");
    let _ = respond.send_response(resp, true);
}

/// A stream's set-up: policy, the dial to the app, the answer. Returns the relay that carries
/// the stream from then on (`None` when the stream was refused or went away).
async fn stream(
    agent: Arc<Agent>,
    wl: Arc<LocalWorkload>,
    peer_id: Arc<SpiffeId>,
    peer: SocketAddr,
    req: http::Request<h2::RecvStream>,
    mut respond: SendResponse<Bytes>,
) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
    let started = Instant::now();
    // The workload name is looked up by the tunnel's source address only to label metrics and
    // logs, and only kept when that workload's identity is the one the certificate proved.
    let src_workload = agent.destination(peer.ip().to_canonical()).filter(|w| {
        mesh_identity::SpiffeId::workload(agent.identities.trust_domain(), &w.namespace, &w.service_account).as_ref()
            == Ok(&*peer_id)
    });
    let mut rec = ConnRecord {
        direction: "inbound",
        src_workload: src_workload.map(|w| w.key().to_string()),
        src_principal: Some(peer_id.to_string()),
        src_addr: Some(SocketAddr::new(peer.ip().to_canonical(), peer.port()).to_string()),
        dst_workload: Some(wl.key.to_string()),
        dst_principal: Some(wl.spiffe_id.to_string()),
        orig_dst: req.uri().to_string(),
        security: "mutual_tls",
    };
    let dst = match parse_connect(req.method(), req.uri(), &wl.workload.ips) {
        Ok(d) => d,
        Err(bad) => {
            agent.stats.refused_label(bad.reason());
            log_close(&agent, &rec, 0, 0, started, &format!("{bad:?}"), bad.reason());
            status(&mut respond, StatusCode::BAD_REQUEST);
            return None;
        }
    };
    rec.orig_dst = dst.to_string();
    let principal = peer_id.to_string();
    let verdict = agent.authorize(
        &wl,
        &mesh_model::authz::Facts {
            principal: Some(&principal),
            source_ip: peer.ip().to_canonical(),
            dst_port: dst.port(),
        },
    );
    if let mesh_model::authz::Decision::Deny(reason) = &verdict.decision {
        // Refused before any dial: the app never sees it; the source agent resets its client.
        agent.stats.refused_label(reason.label());
        log_close(&agent, &rec, 0, 0, started, &reason.to_string(), reason.label());
        status(&mut respond, StatusCode::UNAUTHORIZED);
        return None;
    }
    agent.stats.inbound.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let app = match Box::pin(dial_in(&wl.netns, dst, Some(dst.ip()), agent.connect_timeout())).await {
        Ok(s) => s,
        Err(e) => {
            agent.stats.refused(RefuseReason::UpstreamUnreachable);
            log_close(&agent, &rec, 0, 0, started, &e.to_string(), RefuseReason::UpstreamUnreachable.as_str());
            status(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
            return None;
        }
    };
    let resp = http::Response::builder().status(StatusCode::OK).body(()).expect("a valid response");
    let send = respond.send_response(resp, false).ok()?;
    let rec = Arc::new(rec);
    let live = super::opened(&agent, &rec);
    let body = req.into_body();
    Some(async move {
        let (from_app, to_app, err) = h2io::relay(app, send, body).await;
        drop(live);
        // As the source would count them: sent toward the app, received back from it.
        let error = err.map(|e| e.to_string()).unwrap_or_else(|| "-".into());
        log_close(&agent, &rec, to_app, from_app, started, &error, "ok");
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips() -> Vec<IpAddr> {
        vec!["10.20.2.10".parse().unwrap()]
    }

    #[test]
    fn connect_requests_are_checked_before_any_dial() {
        let ok = parse_connect(&Method::CONNECT, &"10.20.2.10:8080".parse().unwrap(), &ips());
        assert_eq!(ok, Ok("10.20.2.10:8080".parse().unwrap()));
        let cases: &[(Method, &str, BadRequest)] = &[
            (Method::GET, "10.20.2.10:8080", BadRequest::NotConnect),
            (Method::POST, "10.20.2.10:8080", BadRequest::NotConnect),
            (Method::CONNECT, "/path-only", BadRequest::NoAuthority),
            (Method::CONNECT, "example.com:80", BadRequest::BadAuthority),
            (Method::CONNECT, "10.20.2.10:0", BadRequest::BadAuthority),
            (Method::CONNECT, "10.20.9.9:8080", BadRequest::NotLocal),
            (Method::CONNECT, "10.20.2.10:15008", BadRequest::MeshPort),
            (Method::CONNECT, "10.20.2.10:15006", BadRequest::MeshPort),
        ];
        for (m, u, want) in cases {
            assert_eq!(parse_connect(m, &u.parse().unwrap(), &ips()), Err(*want), "{m} {u}");
        }
    }
}
