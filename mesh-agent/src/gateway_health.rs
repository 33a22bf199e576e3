//! Which other zones' gateways this agent cannot reach now. A zone that is wholly gone (its
//! network cut off, its edge dropping everything) answers nothing: without this, every new
//! connection to its Services would wait out the connect timeout before failing over or being
//! refused. So the first failure to reach a gateway (no TCP connection, or no answer to a
//! CONNECT in time, or the connection closed under it) marks it unreachable: its endpoints are
//! skipped by the Service balancer, and a Service that has no other endpoint is refused at once
//! (`gateway_unreachable`). The agent then probes the gateway itself — a TCP connection from
//! the netns of the workload that found it gone, every 0.5 s doubling to 5 s — and marks it
//! reachable when one opens. No client connection pays for the probing.
//!
//! A gateway that refuses by policy (404, 401) or proves the wrong identity is reachable: those
//! failures are per connection and are not remembered here.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use crate::metrics::Metrics;
use crate::state::{LocalWorkload, StateStore};

/// The first probe's delay; each failed probe doubles it, up to [`PROBE_MAX`].
const PROBE_FIRST: Duration = Duration::from_millis(500);
const PROBE_MAX: Duration = Duration::from_secs(5);

pub struct GatewayHealth {
    /// The unreachable gateways (each has one probe running).
    down: Mutex<HashMap<SocketAddr, ()>>,
    metrics: Arc<Metrics>,
    /// Which gateways the configuration still leads through.
    state: Arc<StateStore>,
    /// How long a probe's connection may take.
    connect_timeout: Duration,
}

impl GatewayHealth {
    pub fn new(metrics: Arc<Metrics>, state: Arc<StateStore>, connect_timeout: Duration) -> GatewayHealth {
        GatewayHealth { down: Mutex::default(), metrics, state, connect_timeout }
    }

    fn down(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, ()>> {
        self.down.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_unreachable(&self, gateway: SocketAddr) -> bool {
        self.down().contains_key(&gateway)
    }

    fn set_reachable(&self, gateway: SocketAddr) {
        let mut down = self.down();
        down.remove(&gateway);
        self.metrics.gateways_unreachable(down.len());
    }

    /// Marks `gateway` unreachable, as `wl`'s connection found it, and starts probing it (once:
    /// a gateway already marked is being probed).
    pub fn mark_unreachable(
        self: &Arc<Self>,
        wl: &Arc<LocalWorkload>,
        gateway: SocketAddr,
        error: &dyn std::fmt::Display,
    ) {
        {
            let mut down = self.down();
            if down.insert(gateway, ()).is_some() {
                return;
            }
            self.metrics.gateways_unreachable(down.len());
        }
        tracing::warn!(%gateway, %error, "another zone's gateway cannot be reached: its endpoints are skipped until it answers again");
        tokio::spawn(probe(self.clone(), Arc::downgrade(wl), gateway));
    }
}

/// Probes `gateway` until a TCP connection to it opens, or until probing it means nothing more.
async fn probe(health: Arc<GatewayHealth>, wl: Weak<LocalWorkload>, gateway: SocketAddr) {
    let mut wait = PROBE_FIRST;
    loop {
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(PROBE_MAX);
        // No import leads through it any more: forgotten (a new import through it starts
        // afresh).
        let wanted = health.state.load().config.gateways.iter().any(|(a, _)| *a == gateway);
        // The workload whose netns it was reached from is gone: forgotten too, and the next
        // connection through it finds out again.
        let Some(wl) = wl.upgrade().filter(|_| wanted) else {
            health.set_reachable(gateway);
            return;
        };
        let dialled = wl.netns.dial(gateway, None, health.connect_timeout).await;
        drop(wl);
        if dialled.is_ok() {
            health.set_reachable(gateway);
            tracing::info!(%gateway, "another zone's gateway answers again: its endpoints are used again");
            return;
        }
    }
}
