//! What became of a connection, as types: the one place where a refusal gets its bounded label
//! (the `reason` of `sockmesh_connections_refused_total`, the access log's `result` and Istio's
//! `response_flags`), so that a label cannot be misspelt at a call site or drift between views.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

pub use mesh_api::admin::{Direction, Security};
use mesh_identity::verify::VerifyError;
use mesh_identity::SpiffeId;
use mesh_model::authz::DenyReason;

use crate::state::{KnownWorkload, ServiceEntry};

/// How a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Carried until one side finished (possibly with an I/O error along the way).
    Ok,
    Refused(Reason),
}

impl Outcome {
    /// The access log's `result` and the `response_flags` label ("ok" / "-" for carried ones).
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Refused(r) => r.label(),
        }
    }
}

/// Why the agent refused a connection. Every variant maps to one bounded label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// The kernel's record of the socket does not let the agent carry it.
    Kernel(KernelRefusal),
    /// The source workload has no certificate (yet, or any more).
    NoCertificate,
    /// The destination's authorization policy.
    Denied(DenyReason),
    /// Plaintext to a workload whose PeerAuthentication is STRICT.
    MtlsStrict,
    /// The destination is one of the mesh's own ports.
    MeshPort,
    /// An HBONE CONNECT request refused before any dial.
    BadRequest(BadRequest),
    /// The mutual-TLS tunnel to the destination could not be opened or was refused.
    Tunnel(TunnelFailure),
    /// The app (or a non-mesh destination) could not be reached.
    UpstreamUnreachable,
    /// No configuration yet (none pushed, none kept from a previous run): the agent does not
    /// know the destination's identity or the policy, and decides nothing on a guess.
    NoConfig,
    /// The destination is inside the mesh's pod ranges but is no known workload.
    UnknownMeshDestination,
    /// The destination is a Service address, and the Service has no ready endpoint.
    NoEndpoint,
    /// The destination is a Service address whose every ready endpoint left is in another zone,
    /// behind a gateway the client's workload cannot reach now.
    GatewayUnreachable,
    /// The destination is a Service address, on a port the Service does not have.
    UnknownServicePort,
    /// The agent's own dial to an app from a client's address, steered back to it.
    OwnDial,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelRefusal {
    /// No original destination recorded for the socket (map full, or not ours).
    NoOrigDst,
    /// The recorded destination has an address family the agent does not know.
    UnknownFamily,
    /// The original destination was recorded for another workload's cgroup.
    WorkloadMismatch,
}

pub use mesh_model::hbone::BadRequest;

/// Why a tunnel to the destination failed, as the source agent saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TunnelFailure {
    /// The destination's HBONE port could not be reached.
    Connect,
    Handshake(HandshakeFailure),
    /// HTTP/2 failed on the connection or the stream.
    H2,
    /// 401: the destination's policy refused the connection.
    Denied,
    /// 503: the destination agent could not reach its app.
    AppUnreachable,
    /// Any other status.
    Refused(u16),
    /// No answer within the connect timeout.
    Timeout,
    /// The connection closed before the destination answered.
    Closed,
}

/// Why a mutual-TLS handshake failed (either end).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// Our verifier refused the peer's certificate.
    Verify(VerifyError),
    Timeout,
    /// The peer did not negotiate HTTP/2 (ALPN).
    NoAlpn,
    /// The HTTP/2 preface and settings did not complete.
    H2Handshake,
    /// The TLS configuration for this peer could not be built (a bad local certificate).
    TlsConfig,
    /// Anything else the TLS layer reported.
    Other,
}

impl HandshakeFailure {
    /// Our verifier's reason when it refused the peer's certificate, else [`Other`].
    ///
    /// [`Other`]: HandshakeFailure::Other
    pub fn from_io(e: &std::io::Error) -> HandshakeFailure {
        e.get_ref()
            .and_then(|i| i.downcast_ref::<rustls::Error>())
            .and_then(VerifyError::from_rustls)
            .map(HandshakeFailure::Verify)
            .unwrap_or(HandshakeFailure::Other)
    }

    pub fn label(&self) -> &'static str {
        match self {
            HandshakeFailure::Verify(v) => v.reason(),
            HandshakeFailure::Timeout => "handshake_timeout",
            HandshakeFailure::NoAlpn => "no_alpn",
            HandshakeFailure::H2Handshake => "h2_handshake",
            HandshakeFailure::TlsConfig => "tls_config",
            HandshakeFailure::Other => "handshake_failed",
        }
    }
}

impl TunnelFailure {
    pub fn label(&self) -> &'static str {
        match self {
            TunnelFailure::Connect => "hbone_connect_failed",
            TunnelFailure::Handshake(h) => h.label(),
            TunnelFailure::H2 => "h2_error",
            TunnelFailure::Denied => "denied_by_destination",
            TunnelFailure::AppUnreachable => "destination_app_unreachable",
            TunnelFailure::Refused(_) => "destination_refused",
            TunnelFailure::Timeout => "timeout",
            TunnelFailure::Closed => "hbone_closed",
        }
    }

    /// The failure a CONNECT answer other than 200 means.
    pub fn from_status(s: http::StatusCode) -> TunnelFailure {
        match s {
            http::StatusCode::UNAUTHORIZED => TunnelFailure::Denied,
            http::StatusCode::SERVICE_UNAVAILABLE => TunnelFailure::AppUnreachable,
            other => TunnelFailure::Refused(other.as_u16()),
        }
    }
}

impl Reason {
    pub fn label(&self) -> &'static str {
        match self {
            Reason::Kernel(KernelRefusal::NoOrigDst | KernelRefusal::UnknownFamily) => "no_orig_dst",
            Reason::Kernel(KernelRefusal::WorkloadMismatch) => "workload_mismatch",
            Reason::NoCertificate => "no_certificate",
            Reason::Denied(d) => d.label(),
            Reason::MtlsStrict => "mtls_strict",
            Reason::MeshPort => "mesh_port",
            Reason::BadRequest(b) => b.label(),
            Reason::Tunnel(t) => t.label(),
            Reason::UpstreamUnreachable => "upstream_unreachable",
            Reason::NoConfig => "no_config",
            Reason::UnknownMeshDestination => "unknown_mesh_destination",
            Reason::NoEndpoint => "no_endpoint",
            Reason::GatewayUnreachable => "gateway_unreachable",
            Reason::UnknownServicePort => "unknown_service_port",
            Reason::OwnDial => "own_dial_steered_back",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Kernel(KernelRefusal::NoOrigDst) => f.write_str("no original destination recorded for this socket"),
            Reason::Kernel(KernelRefusal::UnknownFamily) => f.write_str("unknown address family"),
            Reason::Kernel(KernelRefusal::WorkloadMismatch) => {
                f.write_str("socket was recorded for another workload's cgroup")
            }
            Reason::NoCertificate => f.write_str("this workload has no certificate"),
            Reason::Denied(d) => write!(f, "{d}"),
            Reason::MtlsStrict => f.write_str("plaintext refused: PeerAuthentication STRICT"),
            Reason::MeshPort => f.write_str("destination is a mesh port"),
            Reason::BadRequest(b) => write!(f, "bad HBONE request: {b:?}"),
            Reason::Tunnel(TunnelFailure::Handshake(HandshakeFailure::Verify(v))) => write!(f, "handshake: {v}"),
            Reason::Tunnel(t) => write!(f, "tunnel: {}", t.label()),
            Reason::UpstreamUnreachable => f.write_str("upstream unreachable"),
            Reason::NoConfig => f.write_str("no configuration received yet: refused rather than decided on a guess"),
            Reason::UnknownMeshDestination => {
                f.write_str("the destination is in the mesh's pod ranges but is no known workload")
            }
            Reason::NoEndpoint => f.write_str("the Service has no ready endpoint"),
            Reason::GatewayUnreachable => {
                f.write_str("every ready endpoint of the Service left is behind another zone's gateway that cannot be reached now")
            }
            Reason::UnknownServicePort => f.write_str("the Service has no such port"),
            Reason::OwnDial => f.write_str(
                "the agent's own dial from a client's address came back to it (the kernel's record of such dials is full)",
            ),
        }
    }
}

/// One end of a connection as the agent knows it. The workload and principal are shared with
/// the agent's state (no copies of their strings per connection).
#[derive(Debug, Clone, Default)]
pub struct Peer {
    pub workload: Option<Arc<KnownWorkload>>,
    /// The verified (or, for a local workload, kernel-attested) identity.
    pub principal: Option<Arc<SpiffeId>>,
    pub addr: Option<SocketAddr>,
}

impl Peer {
    pub fn workload(w: &Arc<KnownWorkload>) -> Peer {
        Peer { principal: Some(w.spiffe_id.clone()), workload: Some(w.clone()), addr: None }
    }
}

/// What the connection asked for.
#[derive(Debug, Clone, Default)]
pub enum Target {
    #[default]
    Unknown,
    Addr(SocketAddr),
    /// An HBONE request's authority as received (it may not be an address).
    Requested(String),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Unknown => f.write_str("-"),
            Target::Addr(a) => write!(f, "{a}"),
            Target::Requested(s) => f.write_str(s),
        }
    }
}

/// The facts of one connection, logged and counted at close.
#[derive(Debug, Clone)]
pub struct ConnRecord {
    pub direction: Direction,
    pub security: Security,
    pub src: Peer,
    pub dst: Peer,
    pub orig_dst: Target,
    /// The Service the client connected to (its address was the original destination).
    pub service: Option<Arc<ServiceEntry>>,
}

/// Bytes moved, as the source would count them: toward the destination, and back.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Bytes {
    pub sent: u64,
    pub received: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every reason's label is one a dashboard already knows (the names the metrics have
    /// always used), and distinct reasons that mean different things get different labels.
    #[test]
    fn reasons_map_to_their_metric_labels() {
        let cases: Vec<(Reason, &str)> = vec![
            (Reason::Kernel(KernelRefusal::NoOrigDst), "no_orig_dst"),
            (Reason::Kernel(KernelRefusal::UnknownFamily), "no_orig_dst"),
            (Reason::Kernel(KernelRefusal::WorkloadMismatch), "workload_mismatch"),
            (Reason::NoCertificate, "no_certificate"),
            (Reason::Denied(DenyReason::DenyPolicy("default/deny-a".into())), "deny_policy"),
            (Reason::Denied(DenyReason::NoAllowMatch), "no_allow_match"),
            (Reason::MtlsStrict, "mtls_strict"),
            (Reason::MeshPort, "mesh_port"),
            (Reason::BadRequest(BadRequest::NotConnect), "hbone_not_connect"),
            (Reason::BadRequest(BadRequest::NoAuthority), "hbone_no_authority"),
            (Reason::BadRequest(BadRequest::BadAuthority), "hbone_bad_authority"),
            (Reason::BadRequest(BadRequest::NotLocal), "hbone_destination_not_local"),
            (Reason::BadRequest(BadRequest::MeshPort), "hbone_mesh_port"),
            (Reason::BadRequest(BadRequest::BadForwarded), "hbone_bad_forwarded"),
            (Reason::BadRequest(BadRequest::ForgedSource), "hbone_source_not_peers"),
            (Reason::Tunnel(TunnelFailure::Connect), "hbone_connect_failed"),
            (
                Reason::Tunnel(TunnelFailure::Handshake(HandshakeFailure::Verify(VerifyError::UnknownIssuer))),
                "unknown_issuer",
            ),
            (Reason::Tunnel(TunnelFailure::Handshake(HandshakeFailure::Timeout)), "handshake_timeout"),
            (Reason::Tunnel(TunnelFailure::Handshake(HandshakeFailure::NoAlpn)), "no_alpn"),
            (Reason::Tunnel(TunnelFailure::Handshake(HandshakeFailure::TlsConfig)), "tls_config"),
            (Reason::Tunnel(TunnelFailure::Handshake(HandshakeFailure::Other)), "handshake_failed"),
            (Reason::Tunnel(TunnelFailure::H2), "h2_error"),
            (Reason::Tunnel(TunnelFailure::from_status(http::StatusCode::UNAUTHORIZED)), "denied_by_destination"),
            (
                Reason::Tunnel(TunnelFailure::from_status(http::StatusCode::SERVICE_UNAVAILABLE)),
                "destination_app_unreachable",
            ),
            (Reason::Tunnel(TunnelFailure::from_status(http::StatusCode::BAD_REQUEST)), "destination_refused"),
            (Reason::Tunnel(TunnelFailure::Timeout), "timeout"),
            (Reason::Tunnel(TunnelFailure::Closed), "hbone_closed"),
            (Reason::UpstreamUnreachable, "upstream_unreachable"),
            (Reason::NoConfig, "no_config"),
            (Reason::UnknownMeshDestination, "unknown_mesh_destination"),
            (Reason::NoEndpoint, "no_endpoint"),
            (Reason::GatewayUnreachable, "gateway_unreachable"),
            (Reason::UnknownServicePort, "unknown_service_port"),
            (Reason::OwnDial, "own_dial_steered_back"),
        ];
        for (reason, label) in &cases {
            assert_eq!(reason.label(), *label, "{reason:?}");
            assert_eq!(Outcome::Refused(reason.clone()).label(), *label);
            assert!(!reason.to_string().is_empty());
        }
        assert_eq!(Outcome::Ok.label(), "ok");
    }

    #[test]
    fn a_handshake_failure_finds_the_verifiers_reason_inside_io_errors() {
        let inner = rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
            std::sync::Arc::new(VerifyError::Expired),
        )));
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, inner);
        assert_eq!(HandshakeFailure::from_io(&io).label(), "expired");
        let plain = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        assert_eq!(HandshakeFailure::from_io(&plain), HandshakeFailure::Other);
    }
}
