//! Carrying captured connections. `outbound` serves the 15001 listeners, `inbound` the 15006
//! ones; both end in [`relay`], which moves the bytes and writes the access-log line.

pub mod batch;
pub mod h2io;
pub mod hbone;
pub mod inbound;
pub mod local;
pub mod outbound;
pub mod splice;
pub mod tunnel;

use std::net::SocketAddr;
use std::time::Instant;

use tokio::net::TcpStream;

use std::sync::Arc;

use crate::app::Agent;
use crate::netns::NetnsWorker;

/// Why a captured connection was refused (bounded: these become log fields and metric labels).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RefuseReason {
    /// The kernel recorded no original destination for this socket (map full, or not ours).
    NoOrigDst,
    /// The original destination was recorded for another workload's cgroup.
    WorkloadMismatch,
    /// The upstream could not be reached.
    UpstreamUnreachable,
    /// The destination is one of the mesh's own ports.
    MeshPort,
    /// The source workload has no certificate (yet, or any more).
    NoCertificate,
    /// The mTLS tunnel to the destination could not be opened.
    TunnelFailed,
}

impl RefuseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RefuseReason::NoOrigDst => "no_orig_dst",
            RefuseReason::WorkloadMismatch => "workload_mismatch",
            RefuseReason::UpstreamUnreachable => "upstream_unreachable",
            RefuseReason::MeshPort => "mesh_port",
            RefuseReason::NoCertificate => "no_certificate",
            RefuseReason::TunnelFailed => "tunnel_failed",
        }
    }
}

/// Refuses a client with a TCP reset rather than a clean close, so that it cannot mistake the
/// refusal for an empty response.
pub fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(std::time::Duration::ZERO));
    drop(stream);
}

/// Why a TLS handshake failed, as a bounded label: our verifier's reason when it refused the
/// peer's certificate, else "handshake_failed".
pub fn handshake_failure(e: &std::io::Error) -> &'static str {
    e.get_ref()
        .and_then(|i| i.downcast_ref::<rustls::Error>())
        .and_then(mesh_identity::verify::VerifyError::from_rustls)
        .map(|v| v.reason())
        .unwrap_or("handshake_failed")
}

/// Opens a TCP connection from inside a workload's netns (the agent's socket, not the pod's:
/// never intercepted).
/// With `bind_to`, the socket's source address is fixed first (the inbound path binds to the
/// app's own address, which sk_lookup recognises as traffic from inside the pod).
pub async fn dial_in(
    netns: &NetnsWorker,
    addr: SocketAddr,
    bind_to: Option<std::net::IpAddr>,
    timeout: std::time::Duration,
) -> std::io::Result<TcpStream> {
    let v6 = addr.is_ipv6();
    let s = match netns.spare_tcp(v6) {
        Some(s) => s,
        None => netns.run(move || crate::netns::new_tcp_socket(v6)).await.map_err(std::io::Error::other)??,
    };
    if let Some(ip) = bind_to {
        // Choose the port at connect() by the whole 4-tuple, not at bind() by the address
        // alone: otherwise many connections to one app exhaust the ports (ports held in
        // TIME_WAIT are never reused by bind).
        let one: libc::c_int = 1;
        // SAFETY: setsockopt on a socket we own, with a pointer to a live c_int.
        unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&s),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        s.bind(&SocketAddr::new(ip, 0).into())?;
    }
    s.set_nodelay(true)?;
    match s.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    // To an address on this machine the kernel has usually finished the handshake (or been
    // refused) within connect() itself, the packets being processed in this thread's softirq:
    // then there is nothing to wait for, and the caller goes on in the same poll.
    let established = match s.take_error()? {
        Some(e) => return Err(e),
        None => s.peer_addr().is_ok(),
    };
    let stream = TcpStream::from_std(std::net::TcpStream::from(s))?;
    if !established {
        match tokio::time::timeout(timeout, stream.writable()).await {
            Ok(r) => r?,
            Err(_) => return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")),
        }
        if let Some(e) = stream.take_error()? {
            return Err(e);
        }
    }
    Ok(stream)
}

/// The facts of one connection, logged at close.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConnRecord {
    pub direction: &'static str,
    pub src_workload: Option<String>,
    pub src_principal: Option<String>,
    pub src_addr: Option<String>,
    pub dst_workload: Option<String>,
    pub dst_principal: Option<String>,
    pub orig_dst: String,
    /// Istio's connection_security_policy: "mutual_tls" or "none".
    pub security: &'static str,
}

/// Moves bytes both ways (in the kernel, [`splice`]) until both sides are done, then writes one
/// access-log line. Returns
/// (bytes client→upstream, bytes upstream→client, error).
pub async fn relay(
    agent: &Arc<Agent>,
    client: TcpStream,
    upstream: TcpStream,
    rec: ConnRecord,
    started: Instant,
) -> (u64, u64, Option<String>) {
    let rec = Arc::new(rec);
    let _live = opened(agent, &rec);
    let res = tokio::try_join!(splice::one_way(&client, &upstream), splice::one_way(&upstream, &client));
    let (sent, received, error) = match res {
        Ok((a, b)) => (a, b, None),
        Err(e) => (0, 0, Some(e.to_string())),
    };
    log_close(agent, &rec, sent, received, started, error.as_deref().unwrap_or("-"), "ok");
    (sent, received, error)
}

/// A connection is being relayed: counted as opened and listed by the admin API until the
/// returned guard is dropped.
pub fn opened(agent: &Arc<Agent>, rec: &Arc<ConnRecord>) -> crate::app::LiveConn {
    agent.stats.metrics.opened(rec);
    agent.track(rec)
}

/// One access-log line per connection, at close (or refusal), and the matching metrics.
pub fn log_close(
    agent: &Agent,
    rec: &ConnRecord,
    sent: u64,
    received: u64,
    started: Instant,
    error: &str,
    result: &str,
) {
    agent.stats.metrics.closed(rec, sent, received, result);
    tracing::info!(
        target: "access",
        direction = rec.direction,
        src_workload = rec.src_workload.as_deref().unwrap_or("-"),
        src_principal = rec.src_principal.as_deref().unwrap_or("-"),
        src_addr = rec.src_addr.as_deref().unwrap_or("-"),
        dst_workload = rec.dst_workload.as_deref().unwrap_or("-"),
        dst_principal = rec.dst_principal.as_deref().unwrap_or("-"),
        connection_security_policy = rec.security,
        orig_dst = %rec.orig_dst,
        bytes_sent = sent,
        bytes_received = received,
        duration_ms = started.elapsed().as_millis() as u64,
        decision = if result == "ok" { "allow" } else { "deny" },
        result,
        error,
        "connection closed"
    );
}
