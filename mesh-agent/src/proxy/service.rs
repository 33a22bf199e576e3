//! Connections to a Service address. The source agent resolves them (the kernel only recorded
//! the original destination): it picks a ready endpoint, maps the Service port to the target
//! port, and carries the connection to that endpoint exactly as it would a connection made to
//! the endpoint's own address: mutual TLS requiring the endpoint's identity when it is a mesh
//! workload, the node-local relay when it runs on this node, plain TCP only when it is not in
//! the mesh. The destination's policy is evaluated on the endpoint and the target port.
//!
//! The endpoint is chosen by [`crate::balance`]. An endpoint that cannot be reached (its port
//! refuses, its agent answers that the app is unreachable, no tunnel opens) is skipped and
//! another is tried, at most `--service-attempts` in all, with the client's first bytes kept
//! for the next attempt; a tunnel that failed after carrying those bytes is not retried (see
//! [`super::outbound::open`]). An endpoint that no workload has is outside the mesh: the
//! controller listed it, so it is reached in plain TCP even inside `--mesh-cidr`. An endpoint
//! in another zone (a Service imported from other zones) is reached through that zone's
//! gateway ([`super::remote`]); while that gateway cannot be reached, its endpoints are
//! skipped without a try, and a Service with no other endpoint is refused at once
//! ([`crate::gateway_health`]).

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::TcpStream;

use super::outbound::{carry, open, Carry, Failure};
use crate::balance::{pick, LoadKey};
use crate::hbone::client::EarlyBytes;
use crate::hbone::pool::Pool;
use crate::identity::WorkloadCert;
use crate::inputs::ProxyInputs;
use crate::netns::reset;
use crate::outcome::{ConnRecord, Reason};
use crate::state::{LocalWorkload, ServiceEntry};

/// Carries a connection made to `svc`'s address `dst`.
#[allow(clippy::too_many_arguments)]
pub async fn handle(
    inputs: Arc<ProxyInputs>,
    pool: Arc<Pool>,
    wl: Arc<LocalWorkload>,
    client: TcpStream,
    mut rec: ConnRecord,
    svc: Arc<ServiceEntry>,
    dst: SocketAddr,
    cert: Arc<WorkloadCert>,
    started: Instant,
) -> Option<Carry> {
    rec.service = Some(svc.clone());
    let refuse = |rec: &ConnRecord, client: TcpStream, reason: Reason, detail: &dyn std::fmt::Display| {
        inputs.conns.refused(rec, reason, started, detail);
        reset(client);
        None
    };
    let Some(port) = svc.service.port(dst.port()) else {
        return refuse(&rec, client, Reason::UnknownServicePort, &Reason::UnknownServicePort);
    };
    let target_port = port.target();
    let mut early = EarlyBytes::default();
    // Ready endpoints behind another zone's gateway that this workload cannot reach now are
    // never tried, nor, once an attempt of this connection's finds a gateway gone, the others
    // behind it. Only an import has such endpoints: a Service of this zone checks nothing.
    let unreachable = |e: &&mesh_model::Endpoint| {
        svc.service.imported
            && e.ready
            && e.remote.as_ref().is_some_and(|r| inputs.gateways.is_unreachable(wl.key(), r.gateway))
    };
    let mut tried: Vec<&mesh_model::Endpoint> = Vec::new();
    // The last endpoint's failure and the record of that attempt.
    let mut last: Option<(ConnRecord, Failure)> = None;
    while tried.len() < inputs.settings.service_attempts {
        let excluded: Cow<[&mesh_model::Endpoint]> = match svc.service.imported {
            true => tried.iter().copied().chain(svc.service.endpoints.iter().filter(unreachable)).collect(),
            false => Cow::Borrowed(&tried),
        };
        let loads = &inputs.loads;
        let Some(ep) = pick(
            &svc.service.endpoints,
            &excluded,
            dst.is_ipv4(),
            |e| loads.get(&LoadKey::of(e)),
            |n| fastrand::usize(..n),
        ) else {
            break;
        };
        let target = SocketAddr::new(ep.address, target_port);
        tried.push(ep);
        // Counted from the attempt until the connection ends (carried with it).
        let in_flight = inputs.loads.start(LoadKey::of(ep));
        // Each attempt from the client's record as it came (the original destination is the
        // Service address); the endpoint becomes its `dst`.
        let mut attempt = rec.clone();
        let opened = match &ep.remote {
            // In another zone: through its gateway.
            Some(remote) => {
                let opened =
                    super::remote::open(&inputs, &pool, &wl, &client, &mut attempt, target, remote, &cert, &mut early);
                Box::pin(opened).await
            }
            None => Box::pin(open(&inputs, &pool, &wl, &client, &mut attempt, target, &cert, &mut early, true)).await,
        };
        match opened {
            Ok(upstream) => {
                drop(cert);
                return Some(carry(inputs.clone(), client, attempt, upstream, early, started, Some(in_flight)));
            }
            Err(f) if f.retry => {
                tracing::debug!(service = %svc.host, endpoint = %target, reason = f.reason.label(), error = %f.detail, "endpoint unusable; trying another");
                inputs.metrics.service_endpoint_failed(f.reason.label());
                last = Some((attempt, f));
            }
            Err(f) => return refuse(&attempt, client, f.reason, &f.detail),
        }
    }
    match last {
        // Every endpoint tried failed: the client learns the last reason.
        Some((attempt, f)) => refuse(&attempt, client, f.reason, &f.detail),
        None if svc.service.endpoints.iter().any(|e| unreachable(&e)) => {
            refuse(&rec, client, Reason::GatewayUnreachable, &Reason::GatewayUnreachable)
        }
        None => refuse(&rec, client, Reason::NoEndpoint, &Reason::NoEndpoint),
    }
}
