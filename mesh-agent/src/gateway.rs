//! `mesh-agent gateway`: a zone's east-west gateway. Agents of other zones open an HBONE
//! tunnel to it (mutual TLS: they prove a workload identity of the mesh's trust domain, it
//! proves its own), and ask for `endpoint:port` with CONNECT. It forwards the stream, as bytes,
//! to that endpoint's agent (port 15008 of the endpoint's address) — only when the endpoint is
//! a mesh workload of an exported Service of this zone, and the request names one of its target
//! ports. What it forwards is the source agent's own mutual TLS session with the endpoint's
//! agent: the gateway holds no key that decrypts it, and the endpoint's agent sees and enforces
//! the source's own identity. So the gateway decides which pods another zone can reach at all;
//! which port of such a pod a connection reaches is in the inner request, which only the
//! endpoint's agent reads, and which its policy decides, as for any client.
//!
//! It is the agent's binary without the datapath: no kernel programs, no capture. It takes its
//! certificate from the zone's CA like any workload (a node credential, and a workload record
//! placing its service account on its node), and the zone's configuration from the push.
//!
//! Answers: 200 forwarding; 400 a malformed request; 404 not an exported endpoint of this zone;
//! 503 the endpoint's agent cannot be reached.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use bytes::Bytes;
use http::StatusCode;
use mesh_api::push::config_service_client::ConfigServiceClient;
use mesh_api::push::WatchRequest;
use mesh_identity::verify::spiffe_id_of;
use mesh_identity::SpiffeId;
use tokio::net::{TcpListener, TcpStream};

use crate::config::LogFormat;
use crate::config_watch::{Gather, Resources};
use crate::hbone::{io, MAX_FRAME_SIZE, MAX_HEADER_LIST, SERVER_MAX_STREAMS, STREAM_WINDOW};
use crate::identity::{Identities, IdentityConfig};
use crate::metrics::Metrics;
use crate::state::ConfigState;

#[derive(clap::Args, Debug)]
pub struct GatewayArgs {
    /// Where the other zones' agents reach this gateway (HBONE: mutual TLS, HTTP/2 CONNECT).
    #[arg(long, default_value = "0.0.0.0:15008")]
    pub listen: SocketAddr,
    /// This zone's controller's gRPC URL(s), as for `mesh-agent run`.
    #[arg(long, value_delimiter = ',', required = true)]
    pub controller: Vec<String>,
    /// The name the controller's serving certificate must carry.
    #[arg(long, default_value = "mesh-controller")]
    pub controller_name: String,
    /// PEM roots: the mesh's shared root (every zone's certificates chain to it).
    #[arg(long)]
    pub trust_bundle: PathBuf,
    /// This gateway node's credential for the controller (mode 0600).
    #[arg(long)]
    pub node_credential_file: PathBuf,
    /// The mesh's SPIFFE trust domain.
    #[arg(long, default_value = "cluster.local")]
    pub trust_domain: String,
    /// The gateway's identity, namespace/service account: the zone's configuration must place
    /// a workload of it on this node (the CA signs nothing else for it).
    #[arg(long, default_value = "sockmesh-system/sockmesh-gateway")]
    pub service_account: String,
    /// A forwarded stream that moves no byte either way for this long is closed.
    #[arg(long, default_value_t = 3600)]
    pub idle_timeout_seconds: u64,
    /// How long a dial to an endpoint's agent may take before the other zone's agent is
    /// answered 503. Keep it below the agents' --connect-timeout-ms (5 s by default): an agent
    /// that hears nothing from a gateway in its connect timeout takes the whole gateway for
    /// unreachable, where a 503 fails over that endpoint alone.
    #[arg(long, default_value_t = 2000)]
    pub dial_timeout_ms: u64,
    /// Connections forwarded at once; more are refused at accept.
    #[arg(long, default_value_t = 16384)]
    pub max_connections: usize,
    /// /ready, /stats and /certs (the identities this process holds) over HTTP.
    #[arg(long, default_value = "127.0.0.1:15021")]
    pub admin_addr: SocketAddr,
    /// Log lines as text or as one JSON object each.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// Where the gateway may forward: every (endpoint address, target port) of this zone's
/// exported Services whose endpoint is a mesh workload.
type Routes = ArcSwap<HashSet<SocketAddr>>;

#[derive(Default)]
struct Stats {
    forwarded: AtomicU64,
    refused_not_exported: AtomicU64,
    refused_unreachable: AtomicU64,
    refused_handshake: AtomicU64,
    refused_busy: AtomicU64,
}

/// A forwarded stream's limits: how long it may sit idle, and how long its dial may take.
#[derive(Clone, Copy)]
struct Timeouts {
    idle: Duration,
    dial: Duration,
}

pub async fn run(args: GatewayArgs) -> anyhow::Result<()> {
    let (ns, sa) = args
        .service_account
        .split_once('/')
        .context("--service-account: expected namespace/name, e.g. sockmesh-system/sockmesh-gateway")?;
    let id = SpiffeId::workload(&args.trust_domain, ns, sa)
        .map_err(|e| anyhow::anyhow!("--service-account {}: not a valid identity: {e}", args.service_account))?;
    let bundle = std::fs::read_to_string(&args.trust_bundle)
        .with_context(|| format!("reading --trust-bundle {}", args.trust_bundle.display()))?;
    let metrics = Arc::new(Metrics::new());
    let identities = Identities::new(
        IdentityConfig {
            controllers: args.controller.clone(),
            controller_name: args.controller_name.clone(),
            trust_domain: args.trust_domain.clone(),
            bundle_pems: mesh_identity::ca::split_pems(&bundle),
            credential_file: args.node_credential_file.clone(),
            cert_ttl: None,
            wait: Duration::from_secs(5),
        },
        metrics,
    )?;
    identities.acquire(&id);
    let routes: Arc<Routes> = Arc::default();
    let stats: Arc<Stats> = Arc::default();
    tokio::spawn(watch(identities.clone(), routes.clone(), args.trust_domain.clone()));
    let listener = TcpListener::bind(args.listen).await.with_context(|| format!("--listen {}", args.listen))?;
    let admin =
        TcpListener::bind(args.admin_addr).await.with_context(|| format!("--admin-addr {}", args.admin_addr))?;
    tokio::spawn(serve_admin(admin, identities.clone(), routes.clone(), stats.clone(), id.clone()));
    tracing::info!(listen = %args.listen, identity = %id, "gateway ready");
    let slots = Arc::new(tokio::sync::Semaphore::new(args.max_connections));
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            stats.refused_busy.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, max = args.max_connections, "refused: --max-connections reached");
            continue;
        };
        let (identities, routes, stats, id) = (identities.clone(), routes.clone(), stats.clone(), id.clone());
        let limits = Timeouts {
            idle: Duration::from_secs(args.idle_timeout_seconds),
            dial: Duration::from_millis(args.dial_timeout_ms),
        };
        tokio::spawn(async move {
            connection(tcp, peer, identities, routes, stats, id, limits).await;
            drop(slot);
        });
    }
}

async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    identities: Arc<Identities>,
    routes: Arc<Routes>,
    stats: Arc<Stats>,
    id: SpiffeId,
    limits: Timeouts,
) {
    let _ = tcp.set_nodelay(true);
    let Some(cert) = identities.current(&id) else {
        tracing::warn!(%peer, "refused: the gateway has no certificate yet");
        return;
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(cert.server_config.clone());
    drop(cert);
    let handshake = async {
        let tls = acceptor.accept(tcp).await?;
        let client = match tls.get_ref().1.peer_certificates().and_then(|c| c.first()).map(spiffe_id_of) {
            Some(Ok(id)) => id,
            _ => return Err(std::io::Error::other("no valid client certificate")),
        };
        let conn = h2::server::Builder::new()
            .max_header_list_size(MAX_HEADER_LIST)
            .max_concurrent_streams(SERVER_MAX_STREAMS)
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(crate::hbone::CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME_SIZE)
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(std::io::Error::other)?;
        Ok((client, conn))
    };
    let (client, mut conn) = match tokio::time::timeout(crate::hbone::HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            stats.refused_handshake.fetch_add(1, Ordering::Relaxed);
            return tracing::warn!(%peer, error = %e, "gateway handshake refused");
        }
        Err(_) => {
            stats.refused_handshake.fetch_add(1, Ordering::Relaxed);
            return tracing::warn!(%peer, "gateway handshake timed out");
        }
    };
    let client = Arc::new(client);
    while let Some(next) = conn.accept().await {
        let Ok((req, respond)) = next else { break };
        let (routes, stats, client) = (routes.clone(), stats.clone(), client.clone());
        tokio::spawn(stream(req, respond, routes, stats, client, peer, limits));
    }
}

async fn stream(
    req: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    routes: Arc<Routes>,
    stats: Arc<Stats>,
    client: Arc<SpiffeId>,
    peer: SocketAddr,
    limits: Timeouts,
) {
    let answer = |respond: &mut h2::server::SendResponse<Bytes>, status: StatusCode| {
        let resp = http::Response::builder().status(status).body(()).expect("a valid response");
        respond.send_response(resp, true).ok();
    };
    // CONNECT to an address, never a name: the gateway resolves nothing for a peer.
    let authority = req.uri().authority().map(|a| a.as_str());
    let target = match authority.and_then(|a| a.parse::<SocketAddr>().ok()) {
        Some(t) if req.method() == http::Method::CONNECT => t,
        _ => {
            tracing::warn!(%client, %peer, method = %req.method(), authority = ?authority, "refused: not a CONNECT to address:port");
            return answer(&mut respond, StatusCode::BAD_REQUEST);
        }
    };
    if !routes.load().contains(&target) {
        stats.refused_not_exported.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%client, %peer, %target, "refused: not an exported endpoint of this zone");
        return answer(&mut respond, StatusCode::NOT_FOUND);
    }
    let hbone = SocketAddr::new(target.ip(), mesh_common::HBONE_PORT);
    let upstream = match tokio::time::timeout(limits.dial, TcpStream::connect(hbone)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            stats.refused_unreachable.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%client, %target, error = %e, "refused: the endpoint's agent is unreachable");
            return answer(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
        }
        Err(_) => {
            stats.refused_unreachable.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%client, %target, "refused: the endpoint's agent did not answer in time");
            return answer(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
        }
    };
    let _ = upstream.set_nodelay(true);
    let resp = http::Response::builder().status(StatusCode::OK).body(()).expect("a valid response");
    let Ok(send) = respond.send_response(resp, false) else { return };
    stats.forwarded.fetch_add(1, Ordering::Relaxed);
    let (up, down, err) = io::relay(upstream, send, req.into_body(), Some(limits.idle)).await;
    let error = err.map(|e| e.to_string());
    tracing::info!(%client, %peer, endpoint = %target, bytes_in = up, bytes_out = down, error, "forwarded");
}

/// Follows the zone's configuration: the exported Services' endpoints.
async fn watch(identities: Arc<Identities>, routes: Arc<Routes>, trust_domain: String) {
    let mut backoff = Duration::from_millis(250);
    loop {
        let (replica, channel) = identities.channel();
        let mut got = false;
        match watch_once(&identities, channel, &routes, &trust_domain, &mut got).await {
            Ok(()) => tracing::warn!("configuration stream ended; reconnecting"),
            Err(e) => {
                identities.controller_failed(replica);
                tracing::warn!(error = %e, "configuration stream unavailable; keeping the last routes");
            }
        }
        // A stream that delivered something was healthy: start the backoff over.
        backoff = if got { Duration::from_millis(250) } else { (backoff * 2).min(Duration::from_secs(5)) };
        tokio::time::sleep(backoff).await;
    }
}

async fn watch_once(
    identities: &Identities,
    channel: tonic::transport::Channel,
    routes: &Routes,
    trust_domain: &str,
    got: &mut bool,
) -> anyhow::Result<()> {
    let mut client = ConfigServiceClient::new(channel);
    let mut req = tonic::Request::new(WatchRequest { accepts_parts: true });
    req.metadata_mut().insert("authorization", identities.bearer()?);
    let mut s = client.watch(req).await?.into_inner();
    let mut resources = Resources::new();
    let mut parts = Gather::default();
    while let Some(u) = s.message().await? {
        let version = u.version;
        let Some((next, _)) = parts.add(&resources, u)? else { continue };
        let state = ConfigState::build(next.clone(), version, "sockmesh-system", trust_domain)
            .map_err(|e| anyhow::anyhow!("update to version {version} refused: {e}"))?;
        resources = next;
        let r = routes_of(&state);
        tracing::info!(version, routes = r.len(), "exported endpoints updated");
        routes.store(Arc::new(r));
        *got = true;
    }
    Ok(())
}

/// Every target the gateway forwards to: the exported Services' endpoints that are workloads of
/// the default mesh (what the controller exports; the tunnel it carries ends in their agent's
/// mutual TLS), on their target ports.
fn routes_of(state: &ConfigState) -> HashSet<SocketAddr> {
    let mut out = HashSet::new();
    let in_mesh =
        |ip: &std::net::IpAddr| state.workloads.get(ip).is_some_and(|w| w.mesh() == mesh_model::mesh::DEFAULT_MESH);
    for s in state.services_by_key.values().filter(|s| s.service.export) {
        for ep in s.service.endpoints.iter().filter(|e| e.remote.is_none() && in_mesh(&e.address)) {
            for p in &s.service.ports {
                out.insert(SocketAddr::new(ep.address, p.target()));
            }
        }
    }
    out
}

async fn serve_admin(
    listener: TcpListener,
    identities: Arc<Identities>,
    routes: Arc<Routes>,
    stats: Arc<Stats>,
    id: SpiffeId,
) {
    use axum::routing::get;
    let ready = {
        let identities = identities.clone();
        move || {
            let ok = identities.current(&id).is_some();
            async move {
                if ok {
                    (StatusCode::OK, "ready\n")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "no certificate yet\n")
                }
            }
        }
    };
    let app = axum::Router::new()
        .route("/ready", get(ready))
        .route(
            "/certs",
            get(move || {
                let ids: Vec<String> = identities.certs().into_iter().map(|c| c.identity).collect();
                async move { axum::Json(ids) }
            }),
        )
        .route(
            "/stats",
            get(move || {
                let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
                let body = serde_json::json!({
                    "routes": routes.load().len(),
                    "forwarded": l(&stats.forwarded),
                    "refusedNotExported": l(&stats.refused_not_exported),
                    "refusedUnreachable": l(&stats.refused_unreachable),
                    "refusedHandshake": l(&stats.refused_handshake),
                    "refusedBusy": l(&stats.refused_busy),
                });
                async move { axum::Json(body) }
            }),
        );
    let _ = axum::serve(listener, app).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_api::push::{Kind, ResourceId};

    fn state(services: &[(&str, &str)], workloads: &[(&str, &str)]) -> ConfigState {
        let mut r = Resources::new();
        for (name, json) in services {
            r.insert(ResourceId::new(Kind::Service, "default", *name), json.to_string());
        }
        for (name, json) in workloads {
            r.insert(ResourceId::new(Kind::Workload, "default", *name), json.to_string());
        }
        ConfigState::build(r, 1, "sockmesh-system", "cluster.local").unwrap()
    }

    /// Only exported Services' mesh endpoints, on their target ports, are forwarded to.
    #[test]
    fn routes_are_the_exported_services_mesh_endpoints() {
        let s = state(
            &[
                (
                    "web",
                    r#"{"name":"web","addresses":["10.96.0.1"],"ports":[{"port":80,"targetPort":8080}],"export":true,"endpoints":[{"address":"10.20.2.10","workload":"b"},{"address":"192.0.2.9"}]}"#,
                ),
                (
                    "db",
                    r#"{"name":"db","addresses":["10.96.0.2"],"ports":[{"port":5432}],"endpoints":[{"address":"10.20.2.11","workload":"c"}]}"#,
                ),
            ],
            &[
                ("b", r#"{"name":"b","serviceAccount":"b","ips":["10.20.2.10"],"node":"n2"}"#),
                ("c", r#"{"name":"c","serviceAccount":"c","ips":["10.20.2.11"],"node":"n2"}"#),
            ],
        );
        let r = routes_of(&s);
        assert_eq!(
            r,
            HashSet::from(["10.20.2.10:8080".parse().unwrap()]),
            "not the db (unexported), not 192.0.2.9 (not in the mesh), not port 80"
        );
    }
}
