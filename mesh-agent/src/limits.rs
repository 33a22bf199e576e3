//! What one client, one source address or one authenticated peer may make the agent do: the
//! abuse bounds. Each admission returns a guard that gives its share back when dropped, so a
//! connection holds exactly what it was granted for exactly as long as it lives. Every refusal
//! is counted ([`Limit`], `sockmesh_limit_hits_total`) and logged at the first hit of its kind
//! and at every power of two after that: a flood cannot turn into a flood of log lines.
//!
//! Where each bound applies:
//! - a TLS handshake on an HBONE port ([`Limits::handshake`]): in total, per source address,
//!   and a rate per source address; refused before any cryptographic work;
//! - an authenticated HBONE peer (its identity, from one address) ([`Limits::peer`]): its
//!   connections, its streams, and the bytes it may have in flight unread (the receive windows
//!   its connections are given);
//! - a plaintext connection (15006) ([`Limits::plaintext`]): per source address;
//! - every accepted connection, and each dial to an app for an inbound stream or plaintext
//!   connection ([`Limits::descriptor`]): a quarter of the process's descriptors is kept for
//!   what is already admitted (outbound dials, relay pipes), so a flood is refused before the
//!   agent runs out (`EMFILE`);
//! - idle connections and streams ([`Activity`], [`idle`]).

use std::collections::HashMap;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::LimitArgs;
use crate::metrics::Metrics;

/// The bound a connection or stream ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Limit {
    PendingHandshakes,
    PendingHandshakesPerSource,
    HandshakeRatePerSource,
    ConnectionsPerPeer,
    StreamsPerPeer,
    PlaintextPerSource,
    Descriptors,
    HboneIdle,
    StreamIdle,
}

impl Limit {
    pub const ALL: [Limit; 9] = [
        Limit::PendingHandshakes,
        Limit::PendingHandshakesPerSource,
        Limit::HandshakeRatePerSource,
        Limit::ConnectionsPerPeer,
        Limit::StreamsPerPeer,
        Limit::PlaintextPerSource,
        Limit::Descriptors,
        Limit::HboneIdle,
        Limit::StreamIdle,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Limit::PendingHandshakes => "pending_handshakes",
            Limit::PendingHandshakesPerSource => "pending_handshakes_per_source",
            Limit::HandshakeRatePerSource => "handshake_rate_per_source",
            Limit::ConnectionsPerPeer => "connections_per_peer",
            Limit::StreamsPerPeer => "streams_per_peer",
            Limit::PlaintextPerSource => "plaintext_per_source",
            Limit::Descriptors => "descriptors",
            Limit::HboneIdle => "hbone_idle",
            Limit::StreamIdle => "idle",
        }
    }
}

/// The largest and smallest HTTP/2 connection receive window a peer's connection is given.
/// HTTP/2 starts every connection at 65,535 bytes and a window can only be grown, so that is
/// the floor.
pub const MAX_WINDOW: u32 = 16 * 1024 * 1024;
pub const MIN_WINDOW: u32 = 65_535;

/// How many source addresses are remembered before the ones with nothing open and a full
/// rate allowance are forgotten.
const SOURCES_KEPT: usize = 16_384;

#[derive(Debug)]
struct Source {
    pending: usize,
    plaintext: usize,
    /// Handshakes that may start now (a token bucket).
    tokens: f64,
    refilled: Instant,
}

#[derive(Debug, Default)]
struct Peer {
    connections: usize,
    streams: usize,
    /// The sum of the receive windows its open connections were given.
    reserved: u64,
}

pub struct Limits {
    s: LimitArgs,
    metrics: Arc<Metrics>,
    pending: AtomicUsize,
    sources: Mutex<HashMap<IpAddr, Source>>,
    peers: Mutex<HashMap<(String, IpAddr), Peer>>,
    /// The soft limit on descriptors, or None to read it at each check (it can be changed
    /// while the agent runs, with prlimit(1)).
    nofile: Option<u64>,
    hits: [AtomicU64; 9],
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A source is one address (an IPv4-mapped IPv6 address is its IPv4 one). Not an IPv6 prefix:
/// pods' IPv6 addresses often share one /64 across many nodes, which would then share one
/// source's bounds.
fn source_key(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

/// Accepted sockets and dials for peers whose descriptor number is at or above this are
/// refused, and relays copy through user space rather than open a pipe there: the kernel gives
/// out the lowest free number, so reaching it means everything below is taken. A quarter of
/// the limit is kept back (never less than 64) for what established connections need.
pub fn fd_ceiling() -> RawFd {
    ceiling(nofile())
}

fn ceiling(nofile: u64) -> RawFd {
    nofile.saturating_sub((nofile / 4).max(64)).clamp(16, i32::MAX as u64) as RawFd
}

/// The soft limit on open descriptors.
pub fn nofile() -> u64 {
    let mut l = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit on our own process with a valid struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) } != 0 {
        return 1024;
    }
    l.rlim_cur
}

impl Limits {
    pub fn new(s: LimitArgs, metrics: Arc<Metrics>, nofile: Option<u64>) -> Arc<Limits> {
        Arc::new(Limits {
            s,
            metrics,
            pending: AtomicUsize::new(0),
            sources: Mutex::default(),
            peers: Mutex::default(),
            nofile,
            hits: Default::default(),
        })
    }

    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.s.handshake_timeout_ms)
    }

    pub fn hbone_idle(&self) -> Duration {
        Duration::from_secs(self.s.hbone_idle_timeout_seconds)
    }

    pub fn idle(&self) -> Duration {
        Duration::from_secs(self.s.idle_timeout_seconds)
    }

    /// Counts a hit, logging the first and every power of two after it.
    pub fn hit(&self, limit: Limit, what: &dyn std::fmt::Display) {
        let n = self.hits[limit as usize].fetch_add(1, Ordering::Relaxed) + 1;
        self.metrics.limit_hit(limit.label());
        if n.is_power_of_two() {
            tracing::warn!(
                limit = limit.label(),
                hits = n,
                "{what}: refused or closed at a limit (logged at powers of two)"
            );
        }
    }

    /// A TLS handshake from `src` may start: nothing has been read or computed for it yet.
    pub fn handshake(self: &Arc<Self>, src: IpAddr) -> Result<Pending, Limit> {
        self.handshake_at(src, Instant::now())
    }

    fn handshake_at(self: &Arc<Self>, src: IpAddr, now: Instant) -> Result<Pending, Limit> {
        let key = source_key(src);
        let mut sources = lock(&self.sources);
        if self.pending.load(Ordering::Relaxed) >= self.s.max_pending_handshakes {
            return Err(Limit::PendingHandshakes);
        }
        if sources.len() >= SOURCES_KEPT && !sources.contains_key(&key) {
            sources.retain(|_, s| !self.forgettable(s, now));
        }
        let rate = f64::from(self.s.handshakes_per_source_per_second);
        let burst = 2.0 * rate;
        let s = sources.entry(key).or_insert(Source { pending: 0, plaintext: 0, tokens: burst, refilled: now });
        if s.pending >= self.s.max_pending_handshakes_per_source {
            return Err(Limit::PendingHandshakesPerSource);
        }
        if rate > 0.0 {
            s.tokens = (s.tokens + now.saturating_duration_since(s.refilled).as_secs_f64() * rate).min(burst);
            s.refilled = now;
            if s.tokens < 1.0 {
                return Err(Limit::HandshakeRatePerSource);
            }
            s.tokens -= 1.0;
        }
        s.pending += 1;
        self.pending.fetch_add(1, Ordering::Relaxed);
        Ok(Pending { limits: self.clone(), key })
    }

    /// A source with nothing open whose rate allowance is full again holds nothing worth
    /// remembering.
    fn forgettable(&self, s: &Source, now: Instant) -> bool {
        let rate = f64::from(self.s.handshakes_per_source_per_second);
        let tokens = s.tokens + now.saturating_duration_since(s.refilled).as_secs_f64() * rate;
        s.pending == 0 && s.plaintext == 0 && (rate == 0.0 || tokens >= 2.0 * rate)
    }

    fn release_source(&self, key: IpAddr, f: impl FnOnce(&mut Source)) {
        let mut sources = lock(&self.sources);
        if let Some(s) = sources.get_mut(&key) {
            f(s);
            if self.forgettable(s, Instant::now()) {
                sources.remove(&key);
            }
        }
    }

    /// A plaintext connection from `src` may be carried.
    pub fn plaintext(self: &Arc<Self>, src: IpAddr) -> Result<PlaintextSlot, Limit> {
        let key = source_key(src);
        let mut sources = lock(&self.sources);
        let burst = 2.0 * f64::from(self.s.handshakes_per_source_per_second);
        let now = Instant::now();
        let s = sources.entry(key).or_insert(Source { pending: 0, plaintext: 0, tokens: burst, refilled: now });
        if s.plaintext >= self.s.max_plaintext_per_source {
            return Err(Limit::PlaintextPerSource);
        }
        s.plaintext += 1;
        Ok(PlaintextSlot { limits: self.clone(), key })
    }

    /// An authenticated peer's new connection: its place among the peer's connections and the
    /// receive window it gets (an eighth of what the peer's budget has left).
    pub fn peer(self: &Arc<Self>, id: &str, src: IpAddr) -> Result<PeerLease, Limit> {
        let key = (id.to_owned(), src.to_canonical());
        let mut peers = lock(&self.peers);
        let p = peers.entry(key.clone()).or_default();
        if p.connections >= self.s.max_connections_per_peer {
            return Err(Limit::ConnectionsPerPeer);
        }
        let budget = self.s.peer_buffer_mib << 20;
        let left = budget.saturating_sub(p.reserved);
        let window = (left / 8).clamp(u64::from(MIN_WINDOW), u64::from(MAX_WINDOW)) as u32;
        p.connections += 1;
        p.reserved += u64::from(window);
        Ok(PeerLease { limits: self.clone(), key, window })
    }

    fn fd_ceiling(&self) -> RawFd {
        ceiling(self.nofile.unwrap_or_else(nofile))
    }

    /// A descriptor just made for a peer (an accepted socket, a dial for a stream) may be kept.
    pub fn descriptor(&self, fd: &impl AsRawFd) -> Result<(), Limit> {
        if fd.as_raw_fd() >= self.fd_ceiling() {
            return Err(Limit::Descriptors);
        }
        Ok(())
    }
}

/// A handshake in progress: counted per source and in total until dropped.
pub struct Pending {
    limits: Arc<Limits>,
    key: IpAddr,
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.limits.pending.fetch_sub(1, Ordering::Relaxed);
        self.limits.release_source(self.key, |s| s.pending -= 1);
    }
}

/// A plaintext connection carried for a source.
pub struct PlaintextSlot {
    limits: Arc<Limits>,
    key: IpAddr,
}

impl Drop for PlaintextSlot {
    fn drop(&mut self) {
        self.limits.release_source(self.key, |s| s.plaintext -= 1);
    }
}

/// One connection of an authenticated peer.
pub struct PeerLease {
    limits: Arc<Limits>,
    key: (String, IpAddr),
    window: u32,
}

impl PeerLease {
    /// The HTTP/2 connection receive window this connection may advertise.
    pub fn window(&self) -> u32 {
        self.window
    }

    /// A stream of this peer may open.
    pub fn stream(self: &Arc<Self>) -> Result<PeerStream, Limit> {
        let mut peers = lock(&self.limits.peers);
        let p = peers.get_mut(&self.key).expect("a leased peer is kept while it has connections");
        if p.streams >= self.limits.s.max_streams_per_peer {
            return Err(Limit::StreamsPerPeer);
        }
        p.streams += 1;
        Ok(PeerStream { lease: self.clone() })
    }
}

impl Drop for PeerLease {
    fn drop(&mut self) {
        let mut peers = lock(&self.limits.peers);
        if let Some(p) = peers.get_mut(&self.key) {
            p.connections -= 1;
            p.reserved -= u64::from(self.window);
            if p.connections == 0 && p.streams == 0 {
                peers.remove(&self.key);
            }
        }
    }
}

/// One open stream of a peer (it keeps the peer's connection lease alive).
pub struct PeerStream {
    lease: Arc<PeerLease>,
}

impl Drop for PeerStream {
    fn drop(&mut self) {
        if let Some(p) = lock(&self.lease.limits.peers).get_mut(&self.lease.key) {
            p.streams -= 1;
        }
    }
}

/// When a connection last moved a byte, and how many it moved each way: the relays note each
/// chunk here, and [`idle`] closes what has been quiet too long.
#[derive(Debug)]
pub struct Activity {
    epoch: tokio::time::Instant,
    last_ms: AtomicU64,
    pub a_to_b: AtomicU64,
    pub b_to_a: AtomicU64,
}

impl Default for Activity {
    fn default() -> Self {
        Activity {
            epoch: tokio::time::Instant::now(),
            last_ms: AtomicU64::new(0),
            a_to_b: AtomicU64::new(0),
            b_to_a: AtomicU64::new(0),
        }
    }
}

impl Activity {
    /// `n` bytes moved; `forward` is the a-to-b direction.
    pub fn moved(&self, forward: bool, n: u64) {
        let c = if forward { &self.a_to_b } else { &self.b_to_a };
        c.fetch_add(n, Ordering::Relaxed);
        self.last_ms.store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn last(&self) -> tokio::time::Instant {
        self.epoch + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }

    pub fn totals(&self) -> (u64, u64) {
        (self.a_to_b.load(Ordering::Relaxed), self.b_to_a.load(Ordering::Relaxed))
    }
}

/// Resolves once `activity` has seen no byte for `timeout`.
pub async fn idle(activity: &Activity, timeout: Duration) {
    loop {
        let deadline = activity.last() + timeout;
        if tokio::time::Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep_until(deadline).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        limits: LimitArgs,
    }

    fn limits(args: &[&str]) -> Arc<Limits> {
        let s = Cli::parse_from(std::iter::once("agent").chain(args.iter().copied())).limits;
        Limits::new(s, Arc::new(Metrics::new()), Some(20_000))
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn handshakes_are_bounded_per_source_and_in_total_and_given_back() {
        let l = limits(&["--max-pending-handshakes", "4", "--max-pending-handshakes-per-source", "2"]);
        let a1 = l.handshake(ip("10.0.0.1")).unwrap();
        let _a2 = l.handshake(ip("10.0.0.1")).unwrap();
        assert_eq!(l.handshake(ip("10.0.0.1")).err(), Some(Limit::PendingHandshakesPerSource));
        // Another source is not held to the first one's bound.
        let _b1 = l.handshake(ip("10.0.0.2")).unwrap();
        let _b2 = l.handshake(ip("10.0.0.2")).unwrap();
        assert_eq!(l.handshake(ip("10.0.0.3")).err(), Some(Limit::PendingHandshakes));
        drop(a1);
        assert!(l.handshake(ip("10.0.0.3")).is_ok());
        // Each IPv6 address is a source of its own, even within one /64.
        let l = limits(&["--max-pending-handshakes-per-source", "1"]);
        let _c = l.handshake(ip("fd00:1:2:3::1")).unwrap();
        assert_eq!(l.handshake(ip("fd00:1:2:3::1")).err(), Some(Limit::PendingHandshakesPerSource));
        assert!(l.handshake(ip("fd00:1:2:3::2")).is_ok());
        // A v4-mapped address is the IPv4 source.
        let _d = l.handshake(ip("10.9.9.9")).unwrap();
        assert_eq!(l.handshake(ip("::ffff:10.9.9.9")).err(), Some(Limit::PendingHandshakesPerSource));
    }

    #[test]
    fn the_handshake_rate_per_source_allows_a_burst_then_the_rate() {
        let l = limits(&["--handshakes-per-source-per-second", "10"]);
        let t0 = Instant::now();
        let src = ip("10.0.0.1");
        // Kept in progress: a source with a handshake in progress is never forgotten (which
        // would give it a full allowance again), however slowly this test runs.
        let mut held = Vec::new();
        for i in 0..20 {
            held.push(l.handshake_at(src, t0).unwrap_or_else(|e| panic!("burst of twice the rate: {i}: {e:?}")));
        }
        assert_eq!(l.handshake_at(src, t0).err(), Some(Limit::HandshakeRatePerSource));
        assert_eq!(l.handshake_at(ip("10.0.0.2"), t0).err(), None);
        // A tenth of a second later, one more.
        let t1 = t0 + Duration::from_millis(100);
        held.push(l.handshake_at(src, t1).unwrap());
        assert_eq!(l.handshake_at(src, t1).err(), Some(Limit::HandshakeRatePerSource));
        // 0 lifts the rate limit.
        let l = limits(&["--handshakes-per-source-per-second", "0"]);
        for _ in 0..1000 {
            assert!(l.handshake_at(src, t0).is_ok());
        }
    }

    #[test]
    fn a_peers_windows_shrink_with_its_budget_and_its_connections_and_streams_are_bounded() {
        let l = limits(&["--peer-buffer-mib", "64", "--max-connections-per-peer", "40", "--max-streams-per-peer", "3"]);
        let mut leases = Vec::new();
        for _ in 0..40 {
            leases.push(Arc::new(l.peer("spiffe://td/ns/a/sa/x", ip("10.0.0.1")).unwrap()));
        }
        let total: u64 = leases.iter().map(|w| u64::from(w.window())).sum();
        assert_eq!(leases[0].window(), 8 << 20, "an eighth of 64 MiB");
        assert!(leases.windows(2).all(|w| w[1].window() <= w[0].window()));
        assert_eq!(leases[39].window(), MIN_WINDOW);
        // Never more than the budget, but for connections at the protocol's floor.
        let floors = leases.iter().filter(|w| w.window() == MIN_WINDOW).count() as u64;
        assert!(total <= (64 << 20) + floors * u64::from(MIN_WINDOW), "{total}");
        assert_eq!(l.peer("spiffe://td/ns/a/sa/x", ip("10.0.0.1")).err(), Some(Limit::ConnectionsPerPeer));
        // Another identity, or the same one from another address, is another peer.
        assert_eq!(l.peer("spiffe://td/ns/a/sa/y", ip("10.0.0.1")).unwrap().window(), 8 << 20);
        assert_eq!(l.peer("spiffe://td/ns/a/sa/x", ip("10.0.0.2")).unwrap().window(), 8 << 20);
        // Streams count across the peer's connections.
        let s: Vec<_> = (0..3).map(|i| leases[i % 2].stream().unwrap()).collect();
        assert_eq!(leases[5].stream().err(), Some(Limit::StreamsPerPeer));
        drop(s);
        assert!(leases[5].stream().is_ok());
        // Closed connections give their windows back.
        leases.clear();
        assert_eq!(l.peer("spiffe://td/ns/a/sa/x", ip("10.0.0.1")).unwrap().window(), 8 << 20);
        assert!(lock(&l.peers).len() <= 1, "peers with nothing open are forgotten");
    }

    #[test]
    fn plaintext_connections_are_bounded_per_source() {
        let l = limits(&["--max-plaintext-per-source", "2"]);
        let a = l.plaintext(ip("10.0.0.1")).unwrap();
        let _b = l.plaintext(ip("10.0.0.1")).unwrap();
        assert_eq!(l.plaintext(ip("10.0.0.1")).err(), Some(Limit::PlaintextPerSource));
        assert!(l.plaintext(ip("10.0.0.2")).is_ok());
        drop(a);
        assert!(l.plaintext(ip("10.0.0.1")).is_ok());
    }

    #[test]
    fn a_quarter_of_the_descriptors_is_kept_back() {
        let l = limits(&[]);
        assert_eq!(l.fd_ceiling(), 15_000);
        struct Fd(RawFd);
        impl AsRawFd for Fd {
            fn as_raw_fd(&self) -> RawFd {
                self.0
            }
        }
        assert!(l.descriptor(&Fd(14_999)).is_ok());
        assert_eq!(l.descriptor(&Fd(15_000)).err(), Some(Limit::Descriptors));
    }

    #[test]
    fn bad_limits_are_refused_naming_the_flag() {
        let s = Cli::parse_from(["agent", "--max-streams-per-peer", "0"]).limits;
        let e = s.check().unwrap_err().to_string();
        assert!(e.contains("--max-streams-per-peer") && e.contains("at least 1"), "{e}");
        // A timeout meant as "never" is refused rather than overflowing the clock.
        let s = Cli::parse_from(["agent", "--idle-timeout-seconds", "18446744073709551615"]).limits;
        let e = s.check().unwrap_err().to_string();
        assert!(e.contains("--idle-timeout-seconds") && e.contains("30 days"), "{e}");
    }

    #[tokio::test]
    async fn idle_resolves_only_after_a_quiet_timeout() {
        let a = Arc::new(Activity::default());
        let t0 = tokio::time::Instant::now();
        let w = tokio::spawn({
            let a = a.clone();
            async move { idle(&a, Duration::from_millis(300)).await }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        a.moved(true, 5);
        w.await.unwrap();
        // Quiet for the timeout from the last byte, not from the start (timers fire at their
        // deadline or later).
        assert!(t0.elapsed() >= Duration::from_millis(500), "{:?}", t0.elapsed());
        assert_eq!(a.totals(), (5, 0));
    }
}
