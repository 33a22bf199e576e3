//! What the proxies get: a narrow set of handles, not the agent. The state they read is the
//! current snapshot; everything they record goes to the metrics and the live-connection set.

use std::sync::Arc;
use std::time::Duration;

use crate::balance::Loads;
use crate::config::Config;
use crate::connections::Connections;
use crate::ebpf::maps::OrigDstTable;
use crate::identity::Identities;
use crate::limits::Limits;
use crate::metrics::Metrics;
use crate::state::StateStore;

/// The settings the connection path uses, from the agent's configuration.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    /// How long a dial (to an app, a non-mesh destination, or a peer's HBONE port) may take.
    pub connect_timeout: Duration,
    /// Same-node connections through mutual TLS instead of the node-local relay.
    pub same_node_tls: bool,
    /// The mesh's pod ranges: an unknown destination inside them is refused.
    pub mesh_cidrs: Vec<mesh_model::Cidr>,
    /// Endpoints of a Service one connection may try.
    pub service_attempts: usize,
}

impl ProxySettings {
    pub fn from_config(c: &Config) -> ProxySettings {
        ProxySettings {
            connect_timeout: Duration::from_millis(c.connect_timeout_ms),
            same_node_tls: c.same_node_tls,
            mesh_cidrs: c.mesh_cidrs.clone(),
            service_attempts: c.service_attempts,
        }
    }

    pub fn in_mesh_ranges(&self, ip: std::net::IpAddr) -> bool {
        self.mesh_cidrs.iter().any(|c| c.contains(ip))
    }
}

pub struct ProxyInputs {
    pub settings: ProxySettings,
    pub state: Arc<StateStore>,
    pub identities: Arc<Identities>,
    pub metrics: Arc<Metrics>,
    pub conns: Arc<Connections>,
    /// Where outbound connections find their original destination.
    pub orig_dst: OrigDstTable,
    /// Connections carried to each Service endpoint now (the balancer's input).
    pub loads: Arc<Loads>,
    /// Whether to accept, and what is in flight (a hand-over to a successor drains this agent).
    pub lifecycle: Arc<Lifecycle>,
    /// What one client, source or peer may make the agent do.
    pub limits: Arc<Limits>,
    /// Other zones' gateways found unreachable (their endpoints are skipped).
    pub gateways: Arc<crate::gateway_health::GatewayHealth>,
}

impl ProxyInputs {
    /// Dials from inside a workload's netns for one connection (described by `what`): to its
    /// app from the app's own address (`bind_to`; sk_lookup leaves that alone), or onward for
    /// its outbound connection. The socket is checked against the descriptors kept for
    /// established traffic before it connects: a dial to an app too busy to accept, or to a
    /// destination that drops SYNs, waits in connect() holding its descriptor, and enough of
    /// them would leave the agent none (counted, and refused as unreachable).
    pub async fn dial(
        &self,
        netns: &crate::netns::NetnsWorker,
        dst: std::net::SocketAddr,
        bind_to: Option<std::net::IpAddr>,
        what: impl FnOnce() -> String,
    ) -> std::io::Result<tokio::net::TcpStream> {
        let s = self.socket(netns, dst.is_ipv6(), what).await?;
        crate::netns::connect(s, dst, bind_to, self.settings.connect_timeout).await
    }

    /// A dial socket of `netns`, checked against the descriptor ceiling (see [`Self::dial`]).
    async fn socket(
        &self,
        netns: &crate::netns::NetnsWorker,
        v6: bool,
        what: impl FnOnce() -> String,
    ) -> std::io::Result<socket2::Socket> {
        let s = netns.socket(v6).await?;
        if let Err(l) = self.limits.descriptor(&s) {
            self.limits.hit(l, &what());
            return Err(std::io::Error::other("out of descriptors for new connections"));
        }
        Ok(s)
    }

    /// Dials an app of local workload `wl` at `dst` for a connection from `client` (checked by
    /// the caller: a verified workload's address, or a plaintext connection's real peer; or why
    /// there is none): from
    /// that address when it can be used, so that the app sees who called it; else from the
    /// app's own address, counted by reason (see [`crate::transparent`]).
    pub async fn dial_app(
        &self,
        wl: &crate::state::LocalWorkload,
        dst: std::net::SocketAddr,
        client: Result<std::net::IpAddr, crate::transparent::Fallback>,
        what: impl Fn() -> String,
    ) -> std::io::Result<tokio::net::TcpStream> {
        use crate::transparent::{Fallback, Source};
        let (from, fallback) = crate::transparent::source(&wl.transparent, client, dst.ip());
        if let Some(f) = fallback {
            self.metrics.source_fallback(f.label());
        }
        if let Source::Client(ip) = from {
            let s = self.socket(&wl.netns, dst.is_ipv6(), &what).await?;
            match crate::transparent::prepare(&s, dst.is_ipv6()).and_then(|()| crate::netns::bind(&s, ip)) {
                Ok(()) => return crate::netns::connect(s, dst, None, self.settings.connect_timeout).await,
                Err(e) => {
                    tracing::debug!(workload = %wl.key(), client = %ip, error = %e, "cannot bind the client's address; dialling the app from its own");
                    self.metrics.source_fallback(Fallback::Bind.label());
                }
            }
        }
        self.dial(&wl.netns, dst, Some(dst.ip()), what).await
    }
}

/// Where the agent is in its life, as the accept loops see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Listeners exist but nothing is accepted yet: a successor taking over a running agent's
    /// listeners leaves them to that agent until it is ready itself.
    Starting,
    Serving,
    /// Handed over: no more accepts (the successor accepts on the same sockets), HBONE
    /// connections told to go away; what is established runs on until it ends or the drain
    /// deadline.
    Draining,
}

/// The phase, and the connections accepted and not yet finished (from accept to the end of
/// the task that carries them: set-up included, which the live-connection set does not see).
pub struct Lifecycle {
    phase: tokio::sync::watch::Sender<Phase>,
    in_flight: Arc<std::sync::atomic::AtomicUsize>,
}

/// One accepted connection's share of [`Lifecycle::in_flight`].
pub struct InFlight(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

impl Lifecycle {
    pub fn new(phase: Phase) -> Lifecycle {
        Lifecycle { phase: tokio::sync::watch::Sender::new(phase), in_flight: Arc::default() }
    }

    pub fn set(&self, p: Phase) {
        self.phase.send_replace(p);
    }

    pub fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    /// Waits until accepting may start: true when serving, false when draining began first.
    pub async fn accepting(&self) -> bool {
        let mut rx = self.phase.subscribe();
        let serving = match rx.wait_for(|p| *p != Phase::Starting).await {
            Ok(p) => *p == Phase::Serving,
            Err(_) => false,
        };
        serving
    }

    /// Resolves once draining has begun.
    pub async fn draining(&self) {
        let mut rx = self.phase.subscribe();
        let _ = rx.wait_for(|p| *p == Phase::Draining).await;
    }

    pub fn track(&self) -> InFlight {
        self.in_flight.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        InFlight(self.in_flight.clone())
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Accepts on `listener` once serving, until draining begins, and runs each connection's
    /// task (`handle`'s future) on its own, counted in flight until it ends: `handle` is given
    /// the count's share, which its future must hold to its end. (Not wrapped here: a future
    /// moved into another and awaited there is held twice, for the connection's life.) A
    /// connection whose descriptor falls in the share kept for established traffic is reset at
    /// once (counted); an accept error (out of descriptors all the same, say) is logged and
    /// retried after a pause.
    pub async fn accept_loop<F>(
        &self,
        listener: tokio::net::TcpListener,
        what: &'static str,
        workload: &mesh_model::WorkloadKey,
        limits: &Limits,
        mut handle: impl FnMut(tokio::net::TcpStream, std::net::SocketAddr, InFlight) -> F,
    ) where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        if !self.accepting().await {
            return;
        }
        // The loop itself counts as in flight until it has stopped: a connection it accepts as
        // draining begins is tracked before the loop's own count goes.
        let _loop = self.track();
        let draining = self.draining();
        tokio::pin!(draining);
        loop {
            let r = tokio::select! {
                biased;
                () = &mut draining => return,
                r = listener.accept() => r,
            };
            match r {
                Ok((stream, peer)) => {
                    if let Err(l) = limits.descriptor(&stream) {
                        limits.hit(l, &format_args!("{what} connection from {peer} to {workload}"));
                        crate::netns::reset(stream);
                        continue;
                    }
                    tokio::spawn(handle(stream, peer, self.track()));
                }
                Err(e) => {
                    tracing::warn!(workload = %workload, error = %e, "{what} accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}
