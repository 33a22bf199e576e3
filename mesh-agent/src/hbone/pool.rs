//! The HBONE client: HTTP/2 CONNECT over mutual TLS 1.3 to the destination workload's 15008,
//! presenting the source workload's certificate and requiring the destination's identity.
//! Connections are pooled per (source workload, destination identity, address) and carry many
//! streams; a new TLS session is made only when none is usable.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use h2::{RecvStream, SendStream};
use mesh_identity::SpiffeId;
use mesh_model::WorkloadKey;

use super::dial_in;
use crate::app::LocalWorkload;
use crate::identity::{Identities, WorkloadCert};

/// Stream and connection windows: large enough for a fast flow across nodes.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// The largest DATA frame either end accepts: above h2io's largest read, so a read is one frame.
pub const MAX_FRAME_SIZE: u32 = 256 * 1024;
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("cannot reach the destination's HBONE port {0}: {1}")]
    Connect(SocketAddr, std::io::Error),
    #[error("TLS handshake with {0} failed: {1}")]
    Handshake(SocketAddr, String, &'static str),
    #[error("the peer did not negotiate h2")]
    NoAlpn,
    #[error("HTTP/2: {0}")]
    H2(#[from] h2::Error),
    #[error("the destination answered {0}")]
    Status(http::StatusCode),
    #[error("timed out")]
    Timeout,
    #[error("the HBONE connection closed before the destination answered")]
    Closed,
}

impl TunnelError {
    /// A bounded label (response flag).
    pub fn reason(&self) -> &'static str {
        match self {
            TunnelError::Connect(..) => "hbone_connect_failed",
            TunnelError::Handshake(_, _, r) => r,
            TunnelError::NoAlpn => "no_alpn",
            TunnelError::H2(_) => "h2_error",
            TunnelError::Status(s) if *s == http::StatusCode::UNAUTHORIZED => "denied_by_destination",
            TunnelError::Status(s) if *s == http::StatusCode::SERVICE_UNAVAILABLE => "destination_app_unreachable",
            TunnelError::Status(_) => "destination_refused",
            TunnelError::Timeout => "timeout",
            TunnelError::Closed => "hbone_closed",
        }
    }
}

/// Where a tunnel goes: the identity the peer must prove, its HBONE address, and the
/// destination to CONNECT to.
pub struct Destination<'a> {
    pub id: &'a SpiffeId,
    pub hbone_addr: SocketAddr,
    pub target: SocketAddr,
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct PoolKey {
    src: WorkloadKey,
    dst: SpiffeId,
    addr: SocketAddr,
}

/// The current pooled connection for a key, and how many streams it carries.
struct Pooled {
    sender: SendRequest<Bytes>,
    active: Arc<AtomicUsize>,
}

type Slot = Arc<tokio::sync::Mutex<Option<Pooled>>>;

/// What a new connection needs.
struct NewConnection<'a> {
    identities: &'a Identities,
    wl: &'a LocalWorkload,
    cert: &'a WorkloadCert,
    dst: &'a SpiffeId,
    addr: SocketAddr,
    connect_timeout: Duration,
    client: &'a tokio::net::TcpStream,
}

/// An open tunnel stream.
pub struct Tunnel {
    pub send: SendStream<Bytes>,
    pub recv: RecvStream,
    pub lease: StreamLease,
    /// How many of the client's bytes were sent behind the CONNECT request ([`Pool::send_early`]).
    pub early: u64,
}

/// The most of a client's first bytes sent behind the CONNECT request: well inside the
/// stream window a peer starts with (65,535 bytes).
const EARLY_MAX: usize = 16 * 1024;

/// The destination's answer to CONNECT: 200 opens the tunnel.
fn established(
    resp: http::Response<RecvStream>,
    send: SendStream<Bytes>,
    lease: StreamLease,
    early: u64,
) -> Result<Tunnel, TunnelError> {
    if resp.status() != http::StatusCode::OK {
        return Err(TunnelError::Status(resp.status()));
    }
    Ok(Tunnel { send, recv: resp.into_body(), lease, early })
}

/// One stream's share of its connection: released when the stream is done, so that the pool
/// knows when a connection has room under the peer's MAX_CONCURRENT_STREAMS.
pub struct StreamLease(Arc<AtomicUsize>);

impl Drop for StreamLease {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

pub struct Pool {
    /// When false, every connection gets its own TLS session (see `--hbone-pooling`).
    pooling: bool,
    slots: Mutex<HashMap<PoolKey, Slot>>,
    /// TLS sessions opened (one per pooled connection).
    pub tls_sessions: AtomicU64,
    /// CONNECT streams sent.
    pub streams: AtomicU64,
    /// Streams that carried the client's first bytes right behind the CONNECT request.
    pub early_streams: AtomicU64,
    pub handshake_failures: Mutex<BTreeMap<&'static str, u64>>,
}

impl Pool {
    pub fn new(pooling: bool) -> Pool {
        Pool {
            pooling,
            slots: Default::default(),
            tls_sessions: Default::default(),
            streams: Default::default(),
            early_streams: Default::default(),
            handshake_failures: Default::default(),
        }
    }

    /// Opens a tunnel stream to `to.target` through `to.hbone_addr`.
    pub async fn open(
        &self,
        identities: &Identities,
        wl: &LocalWorkload,
        cert: &WorkloadCert,
        to: Destination<'_>,
        connect_timeout: Duration,
        client: &tokio::net::TcpStream,
    ) -> Result<Tunnel, TunnelError> {
        let Destination { id: dst, hbone_addr, target } = to;
        let req = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(target.to_string())
            .version(http::Version::HTTP_2)
            .body(())
            .expect("a valid CONNECT request");
        let new = NewConnection { identities, wl, cert, dst, addr: hbone_addr, connect_timeout, client };
        if !self.pooling {
            return self.open_new(new, req, None).await;
        }
        let key = PoolKey { src: wl.key.clone(), dst: dst.clone(), addr: hbone_addr };
        let slot = self.slots.lock().unwrap().entry(key).or_default().clone();
        let mut guard = slot.lock().await;
        // A connection at the peer's stream limit is not reused: a new one becomes current,
        // and the full one closes once its streams are done. (Waiting for room instead
        // would stall new connections behind long-lived ones.)
        let reusable = match guard.take() {
            Some(p) if p.active.load(Ordering::Relaxed) < p.sender.current_max_send_streams() => {
                p.sender.ready().await.ok().map(|sender| Pooled { sender, active: p.active })
            }
            _ => None,
        };
        let Some(p) = reusable else {
            // The slot stays locked until the new connection is in it.
            return self.open_new(new, req, Some(guard)).await;
        };
        let (mut sender, active) = (p.sender.clone(), p.active.clone());
        *guard = Some(p);
        drop(guard);
        let (resp, send, lease, early) = self.start_stream(&mut sender, req, &active, client)?;
        let resp = tokio::time::timeout(connect_timeout + Duration::from_secs(1), resp)
            .await
            .map_err(|_| TunnelError::Timeout)??;
        established(resp, send, lease, early)
    }

    /// Sends what the client has already written right behind the CONNECT request, in the same
    /// write, instead of a round trip later. The destination agent has already proved its
    /// identity (this is after the handshake), and it forwards nothing to its app before its
    /// policy admits the stream and the app is reached; if it refuses, these bytes are dropped
    /// with the stream and the client is reset, as it would have been anyway.
    fn send_early(&self, send: &mut SendStream<Bytes>, client: &tokio::net::TcpStream) -> Result<u64, TunnelError> {
        // Read straight into the buffer h2 sends (no zeroing, no copy).
        let mut buf = bytes::BytesMut::with_capacity(EARLY_MAX);
        match client.try_read_buf(&mut buf) {
            Ok(n) if n > 0 => {
                send.send_data(buf.freeze(), false)?;
                self.early_streams.fetch_add(1, Ordering::Relaxed);
                Ok(n as u64)
            }
            // Nothing yet, or the client already finished: the relay sees to it.
            _ => Ok(0),
        }
    }

    /// Sends the CONNECT request on a connection and, right behind it, what the client has
    /// already written; the stream counts against the connection's limit until it is done.
    fn start_stream(
        &self,
        sender: &mut SendRequest<Bytes>,
        req: http::Request<()>,
        active: &Arc<AtomicUsize>,
        client: &tokio::net::TcpStream,
    ) -> Result<(h2::client::ResponseFuture, SendStream<Bytes>, StreamLease, u64), TunnelError> {
        active.fetch_add(1, Ordering::Relaxed);
        let lease = StreamLease(active.clone());
        let (resp, mut send) = sender.send_request(req, false)?;
        self.streams.fetch_add(1, Ordering::Relaxed);
        let early = self.send_early(&mut send, client)?;
        Ok((resp, send, lease, early))
    }

    /// A new HBONE connection and its first stream. The TLS handshake, the HTTP/2 preface and
    /// settings and the first CONNECT run in one batched task (see batch.rs), so the client's
    /// last handshake flight, the preface, SETTINGS and the request leave in one write; the
    /// connection then gets a task of its own (in the pool, when pooling).
    async fn open_new(
        &self,
        new: NewConnection<'_>,
        req: http::Request<()>,
        slot: Option<tokio::sync::MutexGuard<'_, Option<Pooled>>>,
    ) -> Result<Tunnel, TunnelError> {
        let NewConnection { identities, wl, cert, dst, addr, connect_timeout, client } = new;
        // From the source pod's netns: the tunnel leaves the pod with the pod's address.
        let tcp = dial_in(&wl.netns, addr, None, connect_timeout).await.map_err(|e| TunnelError::Connect(addr, e))?;
        let cfg = identities
            .client_config(cert, dst.clone())
            .map_err(|e| TunnelError::Handshake(addr, e.to_string(), "tls_config"))?;
        let io = super::batch::BatchIo::new(tcp);
        let batcher = io.batcher();
        let setup = async {
            let tls = self.handshake(cfg, io, addr).await?;
            let (mut sender, mut conn) = h2::client::Builder::new()
                .initial_window_size(STREAM_WINDOW)
                .initial_connection_window_size(CONNECTION_WINDOW)
                .max_frame_size(MAX_FRAME_SIZE)
                .handshake::<_, Bytes>(tls)
                .await?;
            self.tls_sessions.fetch_add(1, Ordering::Relaxed);
            let active: Arc<AtomicUsize> = Arc::default();
            if let Some(mut slot) = slot {
                *slot = Some(Pooled { sender: sender.clone(), active: active.clone() });
            }
            // From here on the connection exists (and may be in the pool): it is kept running
            // whatever becomes of this stream.
            let (resp, send, lease, early) = match self.start_stream(&mut sender, req, &active, client) {
                Ok(s) => s,
                Err(e) => return Ok((Some(conn), Err(e))),
            };
            // Drive the connection here until the answer arrives.
            let wait = tokio::time::timeout(connect_timeout + Duration::from_secs(1), async {
                tokio::select! {
                    r = resp => (true, r.map_err(TunnelError::from)),
                    r = &mut conn => (false, Err(r.err().map(TunnelError::from).unwrap_or(TunnelError::Closed))),
                }
            })
            .await;
            Ok::<_, TunnelError>(match wait {
                Err(_) => (Some(conn), Err(TunnelError::Timeout)),
                Ok((alive, r)) => (alive.then_some(conn), r.and_then(|resp| established(resp, send, lease, early))),
            })
        };
        let (conn, stream) = batcher.clone().run(Box::pin(setup)).await?;
        if let Some(conn) = conn {
            tokio::spawn(async move {
                if let Err(e) = batcher.run(conn).await {
                    tracing::debug!(error = %e, "HBONE connection ended");
                }
            });
        }
        stream
    }

    async fn handshake(
        &self,
        cfg: Arc<rustls::ClientConfig>,
        io: super::batch::BatchIo,
        addr: SocketAddr,
    ) -> Result<tokio_rustls::client::TlsStream<super::batch::BatchIo>, TunnelError> {
        // The name is not checked (the SPIFFE ID is); it only has to be syntactically valid.
        let name = rustls_pki_types::ServerName::try_from("hbone.sockmesh.invalid").expect("static name");
        let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, tokio_rustls::TlsConnector::from(cfg).connect(name, io))
            .await
        {
            Err(_) => return Err(self.failed(TunnelError::Handshake(addr, "timed out".into(), "handshake_timeout"))),
            Ok(Err(e)) => {
                let reason = super::handshake_failure(&e);
                return Err(self.failed(TunnelError::Handshake(addr, e.to_string(), reason)));
            }
            Ok(Ok(t)) => t,
        };
        if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
            return Err(TunnelError::NoAlpn);
        }
        Ok(tls)
    }

    fn failed(&self, e: TunnelError) -> TunnelError {
        *self.handshake_failures.lock().unwrap().entry(e.reason()).or_default() += 1;
        e
    }

    pub fn stats_json(&self) -> serde_json::Value {
        serde_json::json!({
            "tls_sessions": self.tls_sessions.load(Ordering::Relaxed),
            "streams": self.streams.load(Ordering::Relaxed),
            "early_streams": self.early_streams.load(Ordering::Relaxed),
            "handshake_failures": *self.handshake_failures.lock().unwrap(),
        })
    }
}
