//! HBONE connections pooled per (source workload, destination identity, address): each carries
//! many CONNECT streams, and a new TLS session is made only when none is usable — or, with
//! `--hbone-connections` above 1, when every connection already carries a stream, so that
//! concurrent connections between two pods spread their TLS work over several connection tasks
//! (and so over the runtime's threads) instead of queueing behind one. Slots whose source or
//! destination is gone are evicted when the agent's state changes.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use mesh_identity::SpiffeId;
use mesh_model::WorkloadKey;
use tokio::net::TcpStream;

use super::client::{self, EarlyBytes, Started, Tunnel, TunnelError};
use super::MAX_STREAMS;
use crate::identity::WorkloadCert;
use crate::metrics::Metrics;
use crate::state::Snapshot;

/// Where a tunnel goes: the identity the peer must prove, its HBONE address, the destination
/// to CONNECT to, and the Service (`namespace/name`) the client connected to, if any.
pub struct Destination<'a> {
    pub id: &'a SpiffeId,
    pub hbone_addr: SocketAddr,
    pub target: SocketAddr,
    pub service: Option<&'a str>,
    /// The client workload's address (of the target's family), stated to the destination.
    pub client: Option<std::net::IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub src: WorkloadKey,
    /// The identity the source had when the slot was made (a workload whose namespace moves
    /// to another mesh gets a new one, and new tunnels).
    pub src_id: SpiffeId,
    pub dst: SpiffeId,
    pub addr: SocketAddr,
}

/// The current pooled connection for a key, and how many streams it carries.
struct Pooled {
    sender: SendRequest<Bytes>,
    active: Arc<AtomicUsize>,
}

/// A key's connections (at most the pool's `per_peer`).
type Slot = Arc<tokio::sync::Mutex<Vec<Pooled>>>;

/// What a tunnel from one workload needs, whether or not a connection is made.
pub struct Source<'a> {
    pub key: &'a WorkloadKey,
    pub id: &'a SpiffeId,
    pub cert: &'a WorkloadCert,
    /// The source's identity as it follows the controller: a connection made with one identity
    /// is closed when it changes.
    pub identity: Option<&'a tokio::sync::watch::Sender<Arc<crate::state::KnownWorkload>>>,
    /// The pod's connection: its first bytes may go behind the CONNECT request.
    pub client: &'a TcpStream,
}

/// How many times a stream the peer refused, or went away from, before processing it is sent
/// again.
pub const REFUSED_RETRIES: u32 = 2;

pub struct Pool {
    /// When false, every connection gets its own TLS session (see `--hbone-pooling`).
    pooling: bool,
    /// How many connections a key may have at once.
    per_peer: usize,
    slots: Mutex<HashMap<PoolKey, Slot>>,
    metrics: Arc<Metrics>,
}

impl Pool {
    pub fn new(pooling: bool, per_peer: usize, metrics: Arc<Metrics>) -> Pool {
        Pool { pooling, per_peer: per_peer.max(1), slots: Default::default(), metrics }
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<PoolKey, Slot>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Opens a tunnel stream to `to.target` through `to.hbone_addr`; `dial` makes the TCP
    /// connection when a new HBONE connection is needed. A stream the peer refuses before
    /// processing it (REFUSED_STREAM) is sent again, up to [`REFUSED_RETRIES`] times. `early`
    /// keeps the client's first bytes once read, for the caller's next attempt elsewhere.
    pub async fn open<D, F>(
        &self,
        src: Source<'_>,
        to: Destination<'_>,
        connect_timeout: Duration,
        dial: D,
        early: &mut EarlyBytes,
    ) -> Result<Tunnel, TunnelError>
    where
        D: Fn() -> F,
        F: Future<Output = std::io::Result<TcpStream>>,
    {
        let mut tries = 0;
        let r = loop {
            match self.open_once(&src, &to, connect_timeout, &dial, early).await {
                Err(e) if (e.is_refused_stream() || e.is_gone_away()) && tries < REFUSED_RETRIES => {
                    tries += 1;
                    self.metrics.stream_refused_retried();
                    // The peer counts that connection full, or is going away: the next try gets
                    // a new one (the old one keeps its streams and closes when they are done).
                    self.retire(&src, &to);
                }
                r => break r,
            }
        };
        self.metrics.stream(early.any());
        r
    }

    async fn open_once<D, F>(
        &self,
        src: &Source<'_>,
        to: &Destination<'_>,
        connect_timeout: Duration,
        dial: &D,
        early: &mut EarlyBytes,
    ) -> Result<Tunnel, TunnelError>
    where
        D: Fn() -> F,
        F: Future<Output = std::io::Result<TcpStream>>,
    {
        let req = client::connect_request(to.target, to.service, to.client);
        if !self.pooling {
            return self.open_new(src, to, req, connect_timeout, dial, early, None).await;
        }
        let key = PoolKey { src: src.key.clone(), src_id: src.id.clone(), dst: to.id.clone(), addr: to.hbone_addr };
        let slot = self.slots().entry(key).or_default().clone();
        // Waiting for the slot (another stream may be making its connection) ends at the
        // connect timeout: a destination that stalls (stopped, or not reading) fails each new
        // connection to it at its own deadline, instead of queueing them behind one another's
        // handshakes.
        let deadline = tokio::time::Instant::now() + connect_timeout;
        let mut guard = tokio::time::timeout_at(deadline, slot.lock()).await.map_err(|_| TunnelError::Timeout)?;
        // A connection at the peer's stream limit is not reused: it leaves the slot and closes
        // once its streams are done. (Waiting for room instead would stall new connections
        // behind long-lived ones.) Nor is one that has ended.
        let mut usable = Vec::with_capacity(guard.len());
        for p in guard.drain(..) {
            if p.active.load(Ordering::Relaxed) < p.sender.current_max_send_streams().min(MAX_STREAMS as usize) {
                // The pooled sender never sends itself (streams go out on clones), so this only
                // finds out whether the connection is still alive; the stream's answer is
                // waited for until the connect timeout (client::answer).
                if let Ok(sender) = p.sender.ready().await {
                    usable.push(Pooled { sender, active: p.active });
                }
            }
        }
        *guard = usable;
        // The least loaded connection, unless every one carries streams and the key may have
        // another.
        let least = guard.iter().min_by_key(|p| p.active.load(Ordering::Relaxed));
        let Some(p) = least.filter(|p| p.active.load(Ordering::Relaxed) == 0 || guard.len() >= self.per_peer) else {
            // The slot stays locked until the new connection is in it.
            return self.open_new(src, to, req, connect_timeout, dial, early, Some(guard)).await;
        };
        let (mut sender, active) = (p.sender.clone(), p.active.clone());
        drop(guard);
        let started = client::start_stream(&mut sender, req, &active, src.client, early)?;
        client::answer(started, connect_timeout).await
    }

    /// A new HBONE connection and its first stream. The TLS handshake, the HTTP/2 preface and
    /// settings and the first CONNECT run in one batched task (see batch.rs), so the client's
    /// last handshake flight, the preface, SETTINGS and the request leave in one write; the
    /// connection then gets a task of its own (in the pool, when pooling).
    #[allow(clippy::too_many_arguments)]
    async fn open_new<D, F>(
        &self,
        src: &Source<'_>,
        to: &Destination<'_>,
        req: http::Request<()>,
        connect_timeout: Duration,
        dial: &D,
        early: &mut EarlyBytes,
        slot: Option<tokio::sync::MutexGuard<'_, Vec<Pooled>>>,
    ) -> Result<Tunnel, TunnelError>
    where
        D: Fn() -> F,
        F: Future<Output = std::io::Result<TcpStream>>,
    {
        let cfg = src.cert.client_config(to.id).map_err(TunnelError::TlsConfig)?;
        let io = client::dial(to.hbone_addr, dial()).await?;
        let batcher = io.batcher();
        let setup = async {
            let (mut sender, mut conn) = client::handshake(io, cfg, to.hbone_addr).await?;
            self.metrics.tls_session();
            let active: Arc<AtomicUsize> = Arc::default();
            if let Some(mut slot) = slot {
                slot.push(Pooled { sender: sender.clone(), active: active.clone() });
            }
            // From here on the connection exists (and may be in the pool): it is kept running
            // whatever becomes of this stream.
            let Started { response, stream } = match client::start_stream(&mut sender, req, &active, src.client, early)
            {
                Ok(s) => s,
                Err(e) => return Ok((Some(conn), Err(e))),
            };
            // Drive the connection here until the answer arrives.
            let mut response = std::pin::pin!(response);
            let wait = tokio::time::timeout(connect_timeout + Duration::from_secs(1), async {
                tokio::select! {
                    r = &mut response => (true, r.map_err(TunnelError::from)),
                    r = &mut conn => {
                        // The connection ended first. What became of this stream is its own
                        // error, which h2 has set by now: refused unprocessed (above a GOAWAY's
                        // last stream id: sent again) or lost once processed (never sent again,
                        // its first bytes may have reached the app). The connection's error
                        // (a GOAWAY with an error code, say) does not tell the two apart.
                        let own = match std::future::poll_fn(|cx| Poll::Ready(response.as_mut().poll(cx))).await {
                            Poll::Ready(r) => Some(r),
                            Poll::Pending => None,
                        };
                        let lost = || r.err().map(TunnelError::from).filter(|e| !e.is_gone_away());
                        (false, Err(own.and_then(|o| o.err()).map(TunnelError::from).or_else(lost).unwrap_or(TunnelError::Closed)))
                    }
                }
            })
            .await;
            Ok::<_, TunnelError>(match wait {
                Err(_) => (Some(conn), Err(TunnelError::Timeout)),
                Ok((alive, r)) => (alive.then_some(conn), r.and_then(|resp| stream.established(resp))),
            })
        };
        let (conn, stream) = batcher.clone().run(Box::pin(setup)).await?;
        if let Some(conn) = conn {
            // Subscribed first, then compared: a change before this point is seen by the
            // comparison, one after it by the subscription.
            let changes = src.identity.map(|s| s.subscribe());
            let stale = src.identity.is_some_and(|s| *s.borrow().spiffe_id != *src.id);
            tokio::spawn(async move {
                let changed = async {
                    match changes {
                        _ if stale => {}
                        Some(rx) => crate::state::identity_changed(rx).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    r = batcher.run(conn) => if let Err(e) = r {
                        tracing::debug!(error = %e, "HBONE connection ended");
                    },
                    // Made with an identity the source no longer has (its namespace moved to
                    // another mesh, say): closed, with every stream on it.
                    () = changed => tracing::info!("HBONE connection closed: its source workload's identity changed"),
                }
            });
        }
        stream
    }

    /// Stops reusing the current connections for (source, destination).
    fn retire(&self, src: &Source<'_>, to: &Destination<'_>) {
        let key = PoolKey { src: src.key.clone(), src_id: src.id.clone(), dst: to.id.clone(), addr: to.hbone_addr };
        let slot = self.slots().get(&key).cloned();
        // Never waits: a slot that is locked is having its next connection made, which
        // replaces the current one anyway.
        if let Some(slot) = slot {
            if let Ok(mut s) = slot.try_lock() {
                s.clear();
            }
        }
    }

    /// Stops reusing `src`'s connections to `addr` (it stopped answering them). A slot that is
    /// locked is having its next connection made, and is left to it.
    pub fn retire_address(&self, src: &WorkloadKey, addr: SocketAddr) {
        let slots: Vec<Slot> =
            self.slots().iter().filter(|(k, _)| k.addr == addr && k.src == *src).map(|(_, s)| s.clone()).collect();
        for slot in slots {
            if let Ok(mut s) = slot.try_lock() {
                s.clear();
            }
        }
    }

    /// Drops the slots `keep` refuses, and slots with no connection. A dropped slot's
    /// connection closes once its streams are done.
    pub fn retain(&self, keep: impl Fn(&PoolKey) -> bool) -> usize {
        let mut slots = self.slots();
        let before = slots.len();
        slots.retain(|k, slot| keep(k) && !slot.try_lock().is_ok_and(|s| s.is_empty()));
        before - slots.len()
    }

    /// Evicts the slots whose source is no longer captured here (or no longer has the identity
    /// the slot was opened with), or whose address no longer leads to a workload with the
    /// identity the slot was opened for.
    pub fn evict_stale(&self, snap: &Snapshot) -> usize {
        let n = self.retain(|k| {
            let src = snap.local.by_key.get(&k.src).map(|wl| wl.known()).filter(|s| *s.spiffe_id == k.src_id);
            let dst = snap.destination(k.addr.ip()).filter(|d| *d.spiffe_id == k.dst);
            match (src, dst) {
                // And whose destination's mesh no longer accepts the source's (trust withdrawn).
                (Some(s), Some(d)) => snap.config.accepts(d.mesh(), s.mesh()),
                // Another zone's gateway, while an import still leads through it.
                (Some(_), None) => snap.config.gateways.contains(&(k.addr, k.dst.clone())),
                _ => false,
            }
        });
        if n > 0 {
            tracing::debug!(evicted = n, "HBONE pool slots whose source or destination is gone");
        }
        n
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.slots().len()
    }
}

#[cfg(test)]
mod tests;
