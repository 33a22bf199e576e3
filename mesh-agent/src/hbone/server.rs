//! The HBONE server on 15008, inside each meshed workload's netns: mutual TLS 1.3 with the
//! workload's certificate (the client must present a valid workload certificate of the trust
//! domain), then HTTP/2 CONNECT requests, each dialled to the app from the client's address the
//! source states (`forwarded`), once checked against the peer's identity.
//!
//! Responses: 200 tunnel open; 400 malformed request, a destination that is not this
//! workload, or a stated client address that is not one of the peer identity's workloads; 401 denied by policy; 403 no configuration yet (policy unknown); 503 the app is
//! unreachable. Header lists, concurrent streams
//! and the handshake are bounded (the constants in [`super`]).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;

use bytes::Bytes;
use h2::server::SendResponse;
use http::StatusCode;
use mesh_identity::verify::{spiffe_id_of, VerifyError};
use mesh_identity::SpiffeId;
use tokio::net::{TcpListener, TcpStream};

use super::batch::BatchIo;
use super::{io, parse_connect, parse_forwarded, BadRequest};
use super::{MAX_FRAME_SIZE, MAX_HEADER_LIST, SERVER_MAX_STREAMS, STREAM_WINDOW};
use crate::identity::WorkloadCert;
use crate::inputs::ProxyInputs;
use crate::netns::reset;
use crate::outcome::{Bytes as Moved, ConnRecord, Direction, HandshakeFailure, Peer, Reason, Security, Target};
use crate::state::LocalWorkload;
use crate::transparent::Fallback;

pub async fn serve(inputs: Arc<ProxyInputs>, wl: Arc<LocalWorkload>, listener: TcpListener) {
    let lifecycle = inputs.lifecycle.clone();
    lifecycle
        // In flight until the connection ends: after a hand-over, once its streams have.
        .accept_loop(listener, "HBONE", wl.key(), &inputs.limits, |tcp, peer, in_flight| {
            connection(inputs.clone(), wl.clone(), tcp, peer, in_flight)
        })
        .await
}

async fn connection(
    inputs: Arc<ProxyInputs>,
    wl: Arc<LocalWorkload>,
    tcp: TcpStream,
    peer: SocketAddr,
    _in_flight: crate::inputs::InFlight,
) {
    // Before anything is read or computed: a flood of handshakes is refused here, cheaply.
    let pending = match inputs.limits.handshake(peer.ip()) {
        Ok(p) => p,
        Err(l) => {
            inputs.limits.hit(l, &format_args!("HBONE connection from {peer} to {}", wl.key()));
            return reset(tcp);
        }
    };
    let _ = tcp.set_nodelay(true);
    // Subscribed before the identity is read: a change from here on closes the connection.
    let changes = wl.identity_changes();
    let Some(cert) = inputs.identities.current(&wl.spiffe_id()) else {
        inputs.metrics.refused(Direction::Inbound, &Reason::NoCertificate);
        tracing::warn!(workload = %wl.key(), %peer, "refused HBONE connection: this workload has no certificate yet");
        return reset(tcp);
    };
    // Each poll of this connection's task writes once (see batch.rs).
    let io = BatchIo::new(tcp);
    let batcher = io.batcher();
    if batcher.clone().run(Box::pin(tunnel(inputs, wl, cert, io, peer, changes, pending))).await == Ended::ByUs {
        batcher.linger(LINGER).await;
    }
}

/// How long a connection this side ended waits for the peer to close its side too.
const LINGER: std::time::Duration = std::time::Duration::from_secs(5);

/// Who ended an HBONE connection.
#[derive(PartialEq, Eq)]
enum Ended {
    /// The peer closed it, or it failed.
    ByPeer,
    /// This side did (a GOAWAY when handing over, an identity change): it closes gently.
    ByUs,
}

async fn tunnel(
    inputs: Arc<ProxyInputs>,
    wl: Arc<LocalWorkload>,
    cert: Arc<WorkloadCert>,
    io: BatchIo,
    peer: SocketAddr,
    changes: tokio::sync::watch::Receiver<Arc<crate::state::KnownWorkload>>,
    pending: crate::limits::Pending,
) -> Ended {
    let acceptor = tokio_rustls::TlsAcceptor::from(cert.server_config.clone());
    let served = cert.id.clone();
    drop(cert);
    let failed = |failure: HandshakeFailure, error: &dyn std::fmt::Display| {
        tracing::warn!(workload = %wl.key(), %peer, reason = failure.label(), error = %error, "HBONE handshake refused");
        inputs.metrics.handshake_failed(Direction::Inbound, &failure);
        Ended::ByPeer
    };
    let handshake_timeout = inputs.limits.handshake_timeout();
    let tls = match tokio::time::timeout(handshake_timeout, acceptor.accept(io)).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => return failed(HandshakeFailure::from_io(&e), &e),
        Err(_) => return failed(HandshakeFailure::Timeout, &"timed out"),
    };
    let peer_id = match tls.get_ref().1.peer_certificates().and_then(|c| c.first()).map(spiffe_id_of) {
        Some(Ok(id)) => id,
        Some(Err(e)) => return failed(HandshakeFailure::Verify(e), &"peer certificate"),
        None => return failed(HandshakeFailure::Verify(VerifyError::NoCertificate), &"no peer certificate"),
    };
    // The peer's share: its connections, streams and the bytes it may have in flight unread.
    let lease = match inputs.limits.peer(&peer_id.to_string(), peer.ip()) {
        Ok(l) => Arc::new(l),
        Err(l) => {
            inputs.limits.hit(l, &format_args!("HBONE connection from {peer_id} at {peer} to {}", wl.key()));
            return Ended::ByPeer;
        }
    };
    let h2 = h2::server::Builder::new()
        .max_header_list_size(MAX_HEADER_LIST)
        .max_concurrent_streams(SERVER_MAX_STREAMS)
        .initial_window_size(STREAM_WINDOW.min(lease.window()))
        .initial_connection_window_size(lease.window())
        .max_frame_size(MAX_FRAME_SIZE)
        .handshake::<_, Bytes>(tls);
    let mut conn = match tokio::time::timeout(handshake_timeout, h2).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return failed(HandshakeFailure::H2Handshake, &e),
        Err(_) => return failed(HandshakeFailure::H2Handshake, &"timed out"),
    };
    drop(pending);
    let peer_id = Arc::new(peer_id);
    // Accepted for the identity this workload has now: if it changes (its namespace moved to
    // another mesh), the connection and its streams are closed.
    if *wl.spiffe_id() != served {
        tracing::info!(workload = %wl.key(), %peer, "HBONE connection closed: this workload's identity changed during the handshake");
        return Ended::ByUs;
    }
    let mut changed = Box::pin(crate::state::identity_changed(changes));
    let lifecycle = inputs.lifecycle.clone();
    let mut draining = Box::pin(lifecycle.draining());
    let mut going_away = false;
    // Streams open on this connection, and when it last had none: a connection without a
    // stream for the idle timeout is told to go away, and closed if it has not within a
    // handshake timeout more.
    let open = Arc::new(OpenStreams::default());
    let idle_for = inputs.limits.hbone_idle();
    let mut idle_deadline = tokio::time::Instant::now() + idle_for;
    let mut closing: Option<tokio::time::Instant> = None;
    loop {
        let next = tokio::select! {
            n = conn.accept() => n,
            () = tokio::time::sleep_until(idle_deadline), if closing.is_none() => {
                match open.idle_since() {
                    Some(since) if since + idle_for <= tokio::time::Instant::now() => {
                        inputs.limits.hit(crate::limits::Limit::HboneIdle, &format_args!("HBONE connection from {peer_id} at {peer} to {}", wl.key()));
                        conn.graceful_shutdown();
                        going_away = true;
                        closing = Some(tokio::time::Instant::now() + handshake_timeout);
                    }
                    Some(since) => idle_deadline = since + idle_for,
                    None => idle_deadline = tokio::time::Instant::now() + idle_for,
                }
                continue;
            }
            () = tokio::time::sleep_until(closing.unwrap_or_else(tokio::time::Instant::now)), if closing.is_some() => {
                // A stream the peer opened as the GOAWAY crossed it runs to its end (the
                // connection ends with it); with none, the peer has had its time.
                if open.idle_since().is_some() {
                    return Ended::ByUs;
                }
                closing = Some(tokio::time::Instant::now() + handshake_timeout);
                continue;
            }
            () = &mut changed => {
                tracing::info!(workload = %wl.key(), %peer, "HBONE connection closed: this workload's identity changed");
                return Ended::ByUs;
            }
            // Handed over: GOAWAY, so the peer opens its next streams on a new connection (to
            // the successor, on the same listener); the streams already open run to their end.
            () = &mut draining, if !going_away => {
                going_away = true;
                conn.graceful_shutdown();
                continue;
            }
        };
        // After our GOAWAY the connection ends (None) once its streams have: ended by us.
        let Some(next) = next else { return if going_away { Ended::ByUs } else { Ended::ByPeer } };
        let Ok((req, mut respond)) = next else { return Ended::ByPeer };
        let slot = match lease.stream() {
            Ok(s) => s,
            Err(l) => {
                // Refused unprocessed: a client of ours sends it again on another connection
                // (which counts against the same bound).
                inputs.limits.hit(l, &format_args!("HBONE stream from {peer_id} at {peer} to {}", wl.key()));
                respond.send_reset(h2::Reason::REFUSED_STREAM);
                continue;
            }
        };
        let slot = (slot, open.enter());
        let (inputs, wl, peer_id) = (inputs.clone(), wl.clone(), peer_id.clone());
        // The stream's first steps (policy, the dial to the app, usually complete within
        // connect(), and the answer) run here, in this connection's poll, so the answer leaves
        // in the same write as what the connection sends anyway (batch.rs); the rest of the
        // stream gets a task of its own.
        // Only the relay outlives the set-up: it is spawned on its own, so an idle stream's task
        // does not keep the set-up's state (the request, its headers) for the stream's life.
        let mut setup = Box::pin(stream(inputs, wl, peer_id, peer, req, respond, slot));
        match std::future::poll_fn(|cx| Poll::Ready(setup.as_mut().poll(cx))).await {
            Poll::Ready(Some(relay)) => {
                tokio::spawn(relay);
            }
            Poll::Ready(None) => {}
            // The relay gets a task of its own here too: awaited in this one, it would be held
            // twice (moved into the await) beside the finished set-up, for the stream's life.
            Poll::Pending => {
                tokio::spawn(async move {
                    if let Some(relay) = setup.await {
                        tokio::spawn(relay);
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
    inputs: Arc<ProxyInputs>,
    wl: Arc<LocalWorkload>,
    peer_id: Arc<SpiffeId>,
    peer: SocketAddr,
    req: http::Request<h2::RecvStream>,
    mut respond: SendResponse<Bytes>,
    slot: (crate::limits::PeerStream, OpenStream),
) -> Option<impl Future<Output = ()> + Send + 'static> {
    let started = Instant::now();
    let snap = inputs.state.load();
    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
    // The source workload is looked up by the tunnel's address only to label metrics and
    // logs, and only kept when that workload's identity is the one the certificate proved.
    let src_workload = snap.destination(peer.ip()).filter(|w| *w.spiffe_id == *peer_id).cloned();
    let mut rec = ConnRecord {
        direction: Direction::Inbound,
        security: Security::MutualTls,
        src: Peer { workload: src_workload, principal: Some(peer_id.clone()), addr: Some(peer) },
        dst: Peer::workload(&wl.known()),
        orig_dst: Target::Requested(req.uri().to_string()),
        service: None,
    };
    // A refusal before any dial: logged and counted, and answered with `code`.
    let refuse = |rec: &ConnRecord, respond: &mut SendResponse<Bytes>, reason: Reason, code: StatusCode| {
        inputs.conns.refused(rec, reason.clone(), started, &reason);
        status(respond, code);
    };
    let dst = match parse_connect(req.method(), req.uri(), wl.ips()) {
        Ok(d) => d,
        Err(bad) => {
            refuse(&rec, &mut respond, Reason::BadRequest(bad), StatusCode::BAD_REQUEST);
            return None;
        }
    };
    rec.orig_dst = Target::Addr(dst);
    // The Service the source says its client connected to: labels only, and only if ours.
    let claimed = req.headers().get(super::SERVICE_HEADER).and_then(|v| v.to_str().ok());
    rec.service = claimed.and_then(|key| snap.config.service_of_endpoint(key, dst)).cloned();
    if snap.config.version == 0 {
        // No policy known yet: nothing is admitted on a guess.
        refuse(&rec, &mut respond, Reason::NoConfig, StatusCode::FORBIDDEN);
        return None;
    }
    // The client's address the source states: taken only if it is the address of a workload
    // with the identity the certificate proved, so a peer speaks only for its own workloads.
    // An address this agent's records give another identity is refused before any dial; one
    // they do not have yet (they may lag the source's) is not used, and that is counted.
    let forwarded = req.headers().get_all(super::FORWARDED).iter().map(|v| v.as_bytes());
    let client = parse_forwarded(forwarded).and_then(|claim| match claim {
        None => Ok(Err(Fallback::NotStated)),
        Some(ip) => match snap.destination(ip) {
            Some(w) if *w.spiffe_id == *peer_id => Ok(Ok(ip)),
            Some(_) => Err(BadRequest::ForgedSource),
            None => Ok(Err(Fallback::Unverified)),
        },
    });
    let client = match client {
        Ok(c) => c,
        Err(bad) => {
            refuse(&rec, &mut respond, Reason::BadRequest(bad), StatusCode::BAD_REQUEST);
            return None;
        }
    };
    // The handshake checked the peer's mesh; trust withdrawn since is enforced per stream.
    let peer_mesh = snap.config.mesh_of_trust_domain(peer_id.trust_domain(), inputs.state.trust_domain());
    if peer_mesh.is_none_or(|m| !snap.config.accepts(wl.known().mesh(), m)) {
        let h = HandshakeFailure::Verify(VerifyError::OtherMesh { got: peer_id.trust_domain().to_owned() });
        let reason = Reason::Tunnel(crate::outcome::TunnelFailure::Handshake(h));
        refuse(&rec, &mut respond, reason, StatusCode::UNAUTHORIZED);
        return None;
    }
    let principal = peer_id.to_string();
    let facts = mesh_model::authz::Facts { principal: Some(&principal), source_ip: peer.ip(), dst_port: dst.port() };
    if let mesh_model::authz::Decision::Deny(d) = snap.authorize(&wl, &facts).decision {
        // Refused before any dial: the app never sees it; the source agent resets its client.
        refuse(&rec, &mut respond, Reason::Denied(d), StatusCode::UNAUTHORIZED);
        return None;
    }
    drop(snap);
    inputs.metrics.accepted(Direction::Inbound);
    let what = || format!("HBONE stream from {peer_id} at {peer} to {dst}");
    let app = match Box::pin(inputs.dial_app(&wl, dst, client, what)).await {
        Ok(s) => s,
        Err(e) => {
            inputs.conns.refused(&rec, Reason::UpstreamUnreachable, started, &e);
            status(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
            return None;
        }
    };
    let resp = http::Response::builder().status(StatusCode::OK).body(()).expect("a valid response");
    let send = respond.send_response(resp, false).ok()?;
    let rec = Arc::new(rec);
    let live = inputs.conns.opened(&rec);
    // Made here and awaited by reference: moved into the block, its parts would be held twice.
    let mut relay = io::relay(app, send, req.into_body(), Some(inputs.limits.idle()));
    Some(async move {
        let (from_app, to_app, err) = (&mut relay).await;
        drop(relay);
        if err.as_ref().is_some_and(io::is_idle) {
            inputs.limits.hit(crate::limits::Limit::StreamIdle, &format_args!("HBONE stream to {dst}"));
        }
        drop(live);
        drop(slot);
        // As the source would count them: sent toward the app, received back from it.
        inputs.conns.closed(&rec, Moved { sent: to_app, received: from_app }, started, err.as_ref());
    })
}

/// The streams open on one HBONE connection, and since when it has had none.
struct OpenStreams {
    open: std::sync::Mutex<(usize, Option<tokio::time::Instant>)>,
}

impl Default for OpenStreams {
    fn default() -> Self {
        OpenStreams { open: std::sync::Mutex::new((0, Some(tokio::time::Instant::now()))) }
    }
}

impl OpenStreams {
    fn enter(self: &Arc<Self>) -> OpenStream {
        let mut o = self.open.lock().unwrap_or_else(|e| e.into_inner());
        *o = (o.0 + 1, None);
        OpenStream(self.clone())
    }

    fn idle_since(&self) -> Option<tokio::time::Instant> {
        self.open.lock().unwrap_or_else(|e| e.into_inner()).1
    }
}

/// One stream's place in [`OpenStreams`].
struct OpenStream(Arc<OpenStreams>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        let mut o = self.0.open.lock().unwrap_or_else(|e| e.into_inner());
        o.0 -= 1;
        if o.0 == 0 {
            o.1 = Some(tokio::time::Instant::now());
        }
    }
}
