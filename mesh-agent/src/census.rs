//! The census loop: map fill, kernel counters, collection of released entries, reclamation of
//! entries whose socket is gone, and retries of workloads that could not be captured — all off
//! the connection path.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::ebpf::maps::{Census, LiveSockets};
use crate::metrics::Metrics;
use crate::registration::Registry;
use crate::state::StateStore;

/// Every two seconds, on a blocking thread (a walk of a full map never runs on the connection
/// path's threads or under its locks): counts the maps and collects released entries. Every
/// fifth pass, and the first two, also removes entries whose socket is gone (comparing with
/// each workload netns' sockets) and retries capturing the workloads that failed.
pub async fn run(census: Arc<Mutex<Census>>, metrics: Arc<Metrics>, state: Arc<StateStore>, registry: Arc<Registry>) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    let mut suspects = std::collections::HashSet::new();
    for pass in 0u64.. {
        tick.tick().await;
        // Not while another agent of this node runs beside this one (a hand-over): entries of
        // workloads this agent does not know may be the other's.
        let reconcile = (pass < 2 || pass % 5 == 0) && !registry.holds_cleanup();
        let live = if reconcile {
            registry.retry_failed().await;
            Some(live_sockets(&state).await)
        } else {
            None
        };
        let (census, m) = (census.clone(), metrics.clone());
        let mut s = std::mem::take(&mut suspects);
        let (collected, removed, s) = tokio::task::spawn_blocking(move || {
            let mut c = census.lock().unwrap_or_else(|e| e.into_inner());
            let removed = live.map(|l| c.reconcile(&l, &mut s)).unwrap_or(0);
            (c.pass(&m), removed, s)
        })
        .await
        .unwrap_or_default();
        suspects = s;
        if collected > 0 {
            tracing::debug!(collected, "collected released original-destination entries");
        }
        if removed > 0 {
            metrics.reclaimed_entries(removed);
            tracing::info!(removed, "removed original-destination entries whose socket is gone");
        }
    }
}

/// The TCP sockets alive in each captured workload's netns, by workload id.
async fn live_sockets(state: &StateStore) -> LiveSockets {
    let mut live = LiveSockets::new();
    for wl in state.load().local.by_key.values() {
        let cookies = match wl.netns.run(crate::sockdiag::tcp_cookies).await {
            Ok(Ok(cookies)) => Some(cookies),
            Ok(Err(e)) => {
                tracing::warn!(workload = %wl.key(), error = %e, "listing the workload's sockets failed");
                None
            }
            Err(e) => {
                tracing::warn!(workload = %wl.key(), error = %e, "listing the workload's sockets failed");
                None
            }
        };
        live.insert(wl.id, cookies);
    }
    live
}
