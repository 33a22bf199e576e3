//! The connections being relayed now, and what is written when one ends: one access-log line
//! and the matching metrics, from the connection's [`ConnRecord`] and [`Outcome`].
//!
//! The live set is sharded: opening and closing a connection locks one shard for an insert or
//! a removal, and listing (the admin API) walks one shard at a time, copying out shared
//! records, so a listing of many connections never holds up the connection path for long.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use mesh_api::admin::ConnectionInfo;

use crate::metrics::Metrics;
use crate::outcome::{Bytes, ConnRecord, Outcome, Peer, Reason};

const SHARDS: usize = 16;

type Shard = Mutex<HashMap<u64, (Arc<ConnRecord>, SystemTime)>>;

pub struct Connections {
    metrics: Arc<Metrics>,
    shards: [Shard; SHARDS],
    next: AtomicU64,
}

/// A connection in the live set: counted as opened, listed until dropped.
pub struct Live {
    conns: Arc<Connections>,
    id: u64,
}

impl Drop for Live {
    fn drop(&mut self) {
        self.conns.shard(self.id).lock().unwrap_or_else(|e| e.into_inner()).remove(&self.id);
    }
}

impl Connections {
    pub fn new(metrics: Arc<Metrics>) -> Connections {
        Connections { metrics, shards: Default::default(), next: AtomicU64::new(0) }
    }

    fn shard(&self, id: u64) -> &Shard {
        &self.shards[id as usize % SHARDS]
    }

    /// The connection is being relayed: counted as opened and listed until the guard drops.
    pub fn opened(self: &Arc<Self>, rec: &Arc<ConnRecord>) -> Live {
        self.metrics.opened(rec);
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.shard(id).lock().unwrap_or_else(|e| e.into_inner()).insert(id, (rec.clone(), SystemTime::now()));
        Live { conns: self.clone(), id }
    }

    /// The connection ended after it was carried.
    pub fn closed(&self, rec: &ConnRecord, bytes: Bytes, started: Instant, error: Option<&std::io::Error>) {
        self.record(rec, &Outcome::Ok, bytes, started, error.map(|e| e as &dyn std::fmt::Display));
    }

    /// The connection was refused before it was carried.
    pub fn refused(&self, rec: &ConnRecord, reason: Reason, started: Instant, detail: &dyn std::fmt::Display) {
        self.record(rec, &Outcome::Refused(reason), Bytes::default(), started, Some(detail));
    }

    fn record(
        &self,
        rec: &ConnRecord,
        outcome: &Outcome,
        bytes: Bytes,
        started: Instant,
        error: Option<&dyn std::fmt::Display>,
    ) {
        self.metrics.closed(rec, outcome, bytes.sent, bytes.received);
        let workload = |p: &Peer| p.workload.as_ref().map(|w| w.key.to_string());
        let principal = |p: &Peer| p.principal.as_ref().map(|id| id.to_string());
        fn mesh(p: &Peer) -> &str {
            p.workload.as_ref().map(|w| w.mesh()).unwrap_or("-")
        }
        tracing::info!(
            target: "access",
            direction = rec.direction.as_str(),
            src_workload = workload(&rec.src).as_deref().unwrap_or("-"),
            src_principal = principal(&rec.src).as_deref().unwrap_or("-"),
            src_mesh = mesh(&rec.src),
            src_addr = %rec.src.addr.map(|a| a.to_string()).unwrap_or_else(|| "-".into()),
            dst_workload = workload(&rec.dst).as_deref().unwrap_or("-"),
            dst_principal = principal(&rec.dst).as_deref().unwrap_or("-"),
            dst_mesh = mesh(&rec.dst),
            connection_security_policy = rec.security.as_str(),
            orig_dst = %rec.orig_dst,
            dst_service = rec.service.as_ref().map(|s| s.host.as_str()).unwrap_or("-"),
            bytes_sent = bytes.sent,
            bytes_received = bytes.received,
            duration_ms = started.elapsed().as_millis() as u64,
            decision = if *outcome == Outcome::Ok { "allow" } else { "deny" },
            result = outcome.label(),
            error = %error.map(|e| e.to_string()).unwrap_or_else(|| "-".into()),
            "connection closed"
        );
    }

    pub fn count(&self) -> usize {
        self.shards.iter().map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len()).sum()
    }

    /// The connections being relayed now.
    pub fn list(&self) -> Vec<ConnectionInfo> {
        let now = SystemTime::now();
        let mut all = Vec::new();
        for s in &self.shards {
            let records: Vec<_> = s.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
            all.extend(records);
        }
        all.into_iter()
            .map(|(r, since)| ConnectionInfo {
                direction: r.direction,
                src_workload: r.src.workload.as_ref().map(|w| w.key.to_string()),
                src_principal: r.src.principal.as_ref().map(|p| p.to_string()),
                src_addr: r.src.addr,
                dst_workload: r.dst.workload.as_ref().map(|w| w.key.to_string()),
                dst_principal: r.dst.principal.as_ref().map(|p| p.to_string()),
                orig_dst: r.orig_dst.to_string(),
                dst_service: r.service.as_ref().map(|s| s.host.clone()),
                security: r.security,
                age_ms: now.duration_since(since).map(|d| d.as_millis() as u64).unwrap_or(0),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::{Direction, Security, Target};

    #[test]
    fn a_connection_is_listed_while_live_and_counted_once() {
        let metrics = Arc::new(Metrics::new());
        let conns = Arc::new(Connections::new(metrics.clone()));
        let rec = Arc::new(ConnRecord {
            direction: Direction::Outbound,
            security: Security::None,
            src: Peer::default(),
            dst: Peer::default(),
            orig_dst: Target::Addr("10.0.0.1:80".parse().unwrap()),
            service: None,
        });
        let live: Vec<_> = (0..40).map(|_| conns.opened(&rec)).collect();
        assert_eq!(conns.count(), 40);
        assert_eq!(conns.list()[0].orig_dst, "10.0.0.1:80");
        drop(live);
        assert_eq!(conns.count(), 0);
        conns.closed(&rec, Bytes { sent: 5, received: 7 }, Instant::now(), None);
        let text = metrics.encode();
        assert!(text.contains("istio_tcp_connections_opened_total{") && text.contains("} 40"), "{text}");
        assert!(text.contains("istio_tcp_sent_bytes_total{") && text.contains("} 5"), "{text}");
    }
}
