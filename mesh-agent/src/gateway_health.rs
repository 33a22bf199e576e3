//! Which other zones' gateways each workload of this node cannot reach now. A zone that is
//! wholly gone (its network cut off, its edge dropping everything) answers nothing: without
//! this, every new connection to its Services would wait out the connect timeout before
//! failing over or being refused. So the first failure of a workload's connection to reach a
//! gateway (no TCP connection, no answer to a CONNECT in time, or the connection closed under
//! it) marks that gateway unreachable for that workload: its endpoints are skipped by the
//! Service balancer, and a Service with no other ready endpoint is refused at once
//! (`gateway_unreachable`). The agent then probes the gateway itself from that workload's netns
//! — a TCP connection, every 0.5 s doubling to 5 s — and clears the mark when one opens. No
//! client connection pays for the probing.
//!
//! Per workload, not per node: whether a pod reaches a gateway is the pod's own affair (its
//! egress policy, its netns), so one pod that cannot must not shut the node's other pods out of
//! a gateway they reach. Each (workload, gateway) costs one connection's timeout per outage.
//!
//! A gateway that refuses by policy (404, 401) or proves the wrong identity is reachable: those
//! failures are per connection and are not remembered here. Nor is a gateway's 503 (it could not
//! reach the endpoint), which it answers within its own dial timeout, below the agents'
//! connect timeout. The probe proves only that a TCP connection opens: a load balancer that
//! accepts connections with no gateway behind it looks reachable, and the next connection
//! through it finds out again.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use mesh_model::WorkloadKey;

use crate::metrics::Metrics;
use crate::state::{LocalWorkload, StateStore};

/// The first probe's delay; each failed probe doubles it, up to [`PROBE_MAX`].
const PROBE_FIRST: Duration = Duration::from_millis(500);
const PROBE_MAX: Duration = Duration::from_secs(5);

type Key = (WorkloadKey, SocketAddr);

pub struct GatewayHealth {
    /// The (workload, gateway) pairs marked unreachable; each has one probe running.
    down: Mutex<HashSet<Key>>,
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

    fn down(&self) -> std::sync::MutexGuard<'_, HashSet<Key>> {
        self.down.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `workload` found `gateway` unreachable and it has not answered since.
    pub fn is_unreachable(&self, workload: &WorkloadKey, gateway: SocketAddr) -> bool {
        let down = self.down();
        // Nothing marked (the usual case): no key is built.
        !down.is_empty() && down.contains(&(workload.clone(), gateway))
    }

    /// The metric: how many gateways some workload of this node cannot reach now.
    fn count(&self, down: &HashSet<Key>) {
        let gateways: HashSet<&SocketAddr> = down.iter().map(|(_, g)| g).collect();
        self.metrics.gateways_unreachable(gateways.len());
    }

    fn set_reachable(&self, key: &Key) {
        let mut down = self.down();
        down.remove(key);
        self.count(&down);
    }

    /// Marks `gateway` unreachable for `wl`, as its connection found it, and starts probing it
    /// from `wl`'s netns. False when it was marked already (and is being probed).
    pub fn mark_unreachable(
        self: &Arc<Self>,
        wl: &Arc<LocalWorkload>,
        gateway: SocketAddr,
        error: &dyn std::fmt::Display,
    ) -> bool {
        let key = (wl.key().clone(), gateway);
        {
            let mut down = self.down();
            if !down.insert(key.clone()) {
                return false;
            }
            self.count(&down);
        }
        tracing::warn!(workload = %key.0, %gateway, %error, "another zone's gateway cannot be reached: its endpoints are skipped until it answers again");
        tokio::spawn(probe(self.clone(), Arc::downgrade(wl), key));
        true
    }
}

/// Probes `key`'s gateway from its workload's netns until a TCP connection to it opens, or until
/// probing it means nothing more.
async fn probe(health: Arc<GatewayHealth>, wl: Weak<LocalWorkload>, key: Key) {
    let gateway = key.1;
    let mut wait = PROBE_FIRST;
    loop {
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(PROBE_MAX);
        // No import leads through it any more: forgotten (a new import through it starts
        // afresh).
        let wanted = health.state.load().config.gateways.iter().any(|(a, _)| *a == gateway);
        // The workload is gone: forgotten too.
        let Some(wl) = wl.upgrade().filter(|_| wanted) else {
            health.set_reachable(&key);
            return;
        };
        let dialled = wl.netns.dial(gateway, None, health.connect_timeout).await;
        drop(wl);
        if dialled.is_ok() {
            health.set_reachable(&key);
            tracing::info!(workload = %key.0, %gateway, "another zone's gateway answers again: its endpoints are used again");
            return;
        }
    }
}
