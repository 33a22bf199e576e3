//! The HBONE client: a new connection (TLS 1.3 presenting the source workload's certificate and
//! requiring the destination's identity, then the HTTP/2 preface) and CONNECT streams on it.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::client::{ResponseFuture, SendRequest};
use h2::{RecvStream, SendStream};
use tokio::net::TcpStream;

use super::batch::BatchIo;
use super::{CONNECTION_WINDOW, EARLY_MAX, HANDSHAKE_TIMEOUT, MAX_FRAME_SIZE, STREAM_WINDOW};
use crate::outcome::{HandshakeFailure, TunnelFailure};

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("cannot reach the destination's HBONE port {addr}: {source}")]
    Connect { addr: SocketAddr, source: std::io::Error },
    #[error("TLS handshake with {addr} failed ({}): {source}", failure.label())]
    Handshake { addr: SocketAddr, failure: HandshakeFailure, source: std::io::Error },
    #[error("the TLS configuration for the destination cannot be built: {0}")]
    TlsConfig(#[source] rustls::Error),
    #[error("the peer did not negotiate h2")]
    NoAlpn,
    #[error("HTTP/2: {0}")]
    H2(#[from] h2::Error),
    #[error("the destination answered {0}")]
    Status(http::StatusCode),
    #[error("no answer from the destination in time")]
    Timeout,
    #[error("the HBONE connection closed before the destination answered")]
    Closed,
}

impl TunnelError {
    /// The peer refused the stream before doing anything with it (HTTP/2 REFUSED_STREAM: it
    /// counted more open streams than its limit, its view of closed streams lagging ours). Safe
    /// to send again: nothing of it reached the app.
    pub fn is_refused_stream(&self) -> bool {
        matches!(self, TunnelError::H2(e) if e.reason() == Some(h2::Reason::REFUSED_STREAM))
    }

    /// The peer sent GOAWAY (an agent handing over to its successor, say) before it took the
    /// stream: a stream above its last stream id, or one started after the GOAWAY. Safe to
    /// send again on a new connection: nothing of it reached the app.
    pub fn is_gone_away(&self) -> bool {
        matches!(self, TunnelError::H2(e) if e.is_go_away() && e.is_remote())
    }

    pub fn failure(&self) -> TunnelFailure {
        match self {
            TunnelError::Connect { .. } => TunnelFailure::Connect,
            TunnelError::Handshake { failure, .. } => TunnelFailure::Handshake(failure.clone()),
            TunnelError::TlsConfig(_) => TunnelFailure::Handshake(HandshakeFailure::TlsConfig),
            TunnelError::NoAlpn => TunnelFailure::Handshake(HandshakeFailure::NoAlpn),
            TunnelError::H2(_) => TunnelFailure::H2,
            TunnelError::Status(s) => TunnelFailure::from_status(*s),
            TunnelError::Timeout => TunnelFailure::Timeout,
            TunnelError::Closed => TunnelFailure::Closed,
        }
    }

    /// The handshake failure, when this is one (counted apart from other tunnel failures).
    pub fn handshake(&self) -> Option<HandshakeFailure> {
        match self.failure() {
            TunnelFailure::Handshake(h) => Some(h),
            _ => None,
        }
    }
}

/// An open tunnel stream.
pub struct Tunnel {
    pub send: SendStream<Bytes>,
    pub recv: RecvStream,
    pub lease: StreamLease,
    /// How many of the client's bytes were sent behind the CONNECT request.
    pub early: u64,
}

/// One stream's share of its connection: released when the stream is done, so that the pool
/// knows when a connection has room under the peer's MAX_CONCURRENT_STREAMS.
pub struct StreamLease(Arc<AtomicUsize>);

impl Drop for StreamLease {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The CONNECT request for `target`; `service` (`namespace/name`) names the Service the client
/// connected to, for the destination's metrics (it checks the claim against its own records);
/// `client` is the client workload's address, which the destination's app is shown (it checks
/// that too).
pub fn connect_request(target: SocketAddr, service: Option<&str>, client: Option<IpAddr>) -> http::Request<()> {
    let mut b =
        http::Request::builder().method(http::Method::CONNECT).uri(target.to_string()).version(http::Version::HTTP_2);
    if let Some(s) = service {
        b = b.header(super::SERVICE_HEADER, s);
    }
    if let Some(ip) = client {
        b = b.header(super::FORWARDED, super::forwarded_for(ip));
    }
    b.body(()).expect("a valid CONNECT request")
}

/// A stream whose CONNECT was sent, awaiting the destination's answer.
pub struct Started {
    pub response: ResponseFuture,
    pub stream: PendingStream,
}

/// The stream's own half until the answer arrives.
pub struct PendingStream {
    send: SendStream<Bytes>,
    lease: StreamLease,
    early: u64,
}

impl PendingStream {
    /// The destination's answer: 200 opens the tunnel.
    pub fn established(self, resp: http::Response<RecvStream>) -> Result<Tunnel, TunnelError> {
        if resp.status() != http::StatusCode::OK {
            return Err(TunnelError::Status(resp.status()));
        }
        Ok(Tunnel { send: self.send, recv: resp.into_body(), lease: self.lease, early: self.early })
    }
}

/// What the client has written before its stream opened: read once, sent behind the CONNECT
/// request, and kept until the stream is answered, in case it must be sent again.
#[derive(Default)]
pub struct EarlyBytes(Option<Bytes>);

impl EarlyBytes {
    /// For a stream that must carry none of the client's bytes (the outer stream to another
    /// zone's gateway, which can read what it carries): nothing is read for it.
    pub fn none() -> EarlyBytes {
        EarlyBytes(Some(Bytes::new()))
    }

    /// Whether any of the client's bytes went behind a CONNECT request.
    pub fn any(&self) -> bool {
        self.0.as_ref().is_some_and(|b| !b.is_empty())
    }

    /// What was read from the client for a stream that was then not opened: a connection
    /// carried some other way must send it first.
    pub fn into_read(self) -> Bytes {
        self.0.unwrap_or_default()
    }

    /// The client's first bytes, read now if they have not been (at most [`EARLY_MAX`]).
    fn get(&mut self, client: &TcpStream) -> Bytes {
        self.0
            .get_or_insert_with(|| {
                // Read straight into the buffer h2 sends (no zeroing). A short read is copied
                // into a buffer of its own size: the whole buffer would otherwise stay allocated
                // for as long as this copy is kept.
                let mut buf = bytes::BytesMut::with_capacity(EARLY_MAX);
                match client.try_read_buf(&mut buf) {
                    Ok(n) if n > 0 && n * 2 < buf.capacity() => Bytes::copy_from_slice(&buf),
                    Ok(n) if n > 0 => buf.freeze(),
                    // Nothing yet, or the client already finished: the relay sees to it.
                    _ => Bytes::new(),
                }
            })
            .clone()
    }
}

/// Sends the CONNECT request on a connection and, right behind it, what the client has already
/// written (up to [`EARLY_MAX`]) instead of a round trip later. That is safe: the destination
/// agent has proved its identity in the handshake, and it forwards nothing to its app before
/// its policy admits the stream and the app is reached; a refused stream's bytes are dropped
/// with it and the client is reset, as it would have been anyway. The stream counts against
/// the connection's limit until it is done.
pub fn start_stream(
    sender: &mut SendRequest<Bytes>,
    req: http::Request<()>,
    active: &Arc<AtomicUsize>,
    client: &TcpStream,
    early: &mut EarlyBytes,
) -> Result<Started, TunnelError> {
    active.fetch_add(1, Ordering::Relaxed);
    let lease = StreamLease(active.clone());
    let (response, mut send) = sender.send_request(req, false)?;
    let data = early.get(client);
    let early = data.len() as u64;
    if early > 0 {
        send.send_data(data, false)?;
    }
    Ok(Started { response, stream: PendingStream { send, lease, early } })
}

/// Waits for the answer to a stream on a connection that another task drives.
pub async fn answer(started: Started, connect_timeout: Duration) -> Result<Tunnel, TunnelError> {
    let Started { response, stream } = started;
    let resp = tokio::time::timeout(connect_timeout + Duration::from_secs(1), response)
        .await
        .map_err(|_| TunnelError::Timeout)??;
    stream.established(resp)
}

/// A new HBONE connection up to HTTP/2: TLS first (from the batched I/O, so the client's last
/// flight and the preface leave together; or, for a tunnel inside a tunnel, over the outer
/// stream), then the preface and settings.
pub async fn handshake<IO>(
    io: IO,
    cfg: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
) -> Result<(SendRequest<Bytes>, h2::client::Connection<tokio_rustls::client::TlsStream<IO>, Bytes>), TunnelError>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    // The name is not checked (the SPIFFE ID is); it only has to be syntactically valid.
    let name = rustls_pki_types::ServerName::try_from("hbone.sockmesh.invalid").expect("static name");
    let tls =
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, tokio_rustls::TlsConnector::from(cfg).connect(name, io)).await {
            Err(_) => {
                let source = std::io::Error::new(std::io::ErrorKind::TimedOut, "handshake timed out");
                return Err(TunnelError::Handshake { addr, failure: HandshakeFailure::Timeout, source });
            }
            Ok(Err(source)) => {
                return Err(TunnelError::Handshake { addr, failure: HandshakeFailure::from_io(&source), source })
            }
            Ok(Ok(t)) => t,
        };
    if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
        return Err(TunnelError::NoAlpn);
    }
    Ok(h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .handshake::<_, Bytes>(tls)
        .await?)
}

/// Dials the destination's HBONE port with `dial` and wraps the socket for batched writes.
pub async fn dial<F>(addr: SocketAddr, dial: F) -> Result<BatchIo, TunnelError>
where
    F: std::future::Future<Output = std::io::Result<TcpStream>>,
{
    let tcp = dial.await.map_err(|source| TunnelError::Connect { addr, source })?;
    Ok(BatchIo::new(tcp))
}
