//! The agent's one counter store: a Prometheus registry (OpenMetrics text on :15020). The
//! admin API's `/stats` and the local API's `stats` are read from the same counters, so no view
//! can disagree with another. The TCP metrics carry the label set Istio uses, so existing
//! dashboards work unchanged. Every label value is bounded: workload names, namespaces and
//! principals come from the workload records (a cluster's size), reasons from [`Reason`].

use std::collections::BTreeMap;
use std::sync::Mutex;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

mod labels;
mod read;

use labels::{
    DirectionLabels, EventLabels, FailureLabels, IdentityLabels, LimitLabels, MapLabels, ReasonLabels, TcpLabels,
};

use crate::outcome::{ConnRecord, Direction, HandshakeFailure, Outcome, Reason};

pub struct Metrics {
    registry: Registry,
    opened: Family<TcpLabels, Counter>,
    closed: Family<TcpLabels, Counter>,
    sent: Family<TcpLabels, Counter>,
    received: Family<TcpLabels, Counter>,
    accepted: Family<DirectionLabels, Counter>,
    refused: Family<ReasonLabels, Counter>,
    handshake_failures: Family<ReasonLabels, Counter>,
    tls_sessions: Counter,
    streams: Counter,
    streams_retried: Counter,
    early_streams: Counter,
    certs_issued: Counter,
    cert_failures: Family<FailureLabels, Counter>,
    cert_expiry: Family<IdentityLabels, Gauge>,
    map_entries: Family<MapLabels, Gauge>,
    map_capacity: Family<MapLabels, Gauge>,
    kernel_events: Family<EventLabels, Counter>,
    push_lag: Gauge,
    config_version: Gauge,
    config_refused: Counter,
    registration_failures: Family<FailureLabels, Counter>,
    not_captured: Gauge,
    gateways_unreachable: Gauge,
    reclaimed: Counter,
    endpoint_failures: Family<FailureLabels, Counter>,
    limit_hits: Family<LimitLabels, Counter>,
    source_fallbacks: Family<FailureLabels, Counter>,
    /// Which reason labels have been counted, to list them in `/stats` (the values stay in the
    /// registry; this only remembers which keys exist, a bounded set).
    seen_reasons: Mutex<BTreeMap<(&'static str, &'static str), Kind>>,
    /// Last kernel counter values seen (they live in a pinned map, across agent restarts).
    kernel_seen: Mutex<BTreeMap<&'static str, u64>>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Refused,
    Handshake,
    Certificate,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            registry: Registry::default(),
            opened: Family::default(),
            closed: Family::default(),
            sent: Family::default(),
            received: Family::default(),
            accepted: Family::default(),
            refused: Family::default(),
            handshake_failures: Family::default(),
            tls_sessions: Counter::default(),
            streams: Counter::default(),
            streams_retried: Counter::default(),
            early_streams: Counter::default(),
            certs_issued: Counter::default(),
            cert_failures: Family::default(),
            cert_expiry: Family::default(),
            map_entries: Family::default(),
            map_capacity: Family::default(),
            kernel_events: Family::default(),
            push_lag: Gauge::default(),
            config_version: Gauge::default(),
            config_refused: Counter::default(),
            registration_failures: Family::default(),
            not_captured: Gauge::default(),
            gateways_unreachable: Gauge::default(),
            reclaimed: Counter::default(),
            endpoint_failures: Family::default(),
            limit_hits: Family::default(),
            source_fallbacks: Family::default(),
            seen_reasons: Mutex::new(BTreeMap::new()),
            kernel_seen: Mutex::new(BTreeMap::new()),
        };
        let istio = registry.sub_registry_with_prefix("istio");
        istio.register("tcp_connections_opened", "TCP connections opened", m.opened.clone());
        istio.register("tcp_connections_closed", "TCP connections closed", m.closed.clone());
        istio.register("tcp_sent_bytes", "Bytes sent toward the destination", m.sent.clone());
        istio.register("tcp_received_bytes", "Bytes received from the destination", m.received.clone());
        let sm = registry.sub_registry_with_prefix("sockmesh");
        sm.register(
            "connections_accepted",
            "Captured connections that passed the agent's checks and were carried",
            m.accepted.clone(),
        );
        sm.register(
            "connections_refused",
            "Connections refused, by reason (policy denials, no certificate, ...)",
            m.refused.clone(),
        );
        sm.register(
            "handshake_failures",
            "mTLS handshakes and peer verifications that failed, by reason",
            m.handshake_failures.clone(),
        );
        sm.register(
            "hbone_tls_sessions",
            "HBONE connections opened as a client (one TLS session each)",
            m.tls_sessions.clone(),
        );
        sm.register("hbone_streams", "HBONE CONNECT streams sent", m.streams.clone());
        sm.register(
            "hbone_streams_retried",
            "HBONE streams sent again after the peer refused them unprocessed (REFUSED_STREAM)",
            m.streams_retried.clone(),
        );
        sm.register(
            "hbone_early_streams",
            "HBONE streams whose client's first bytes went right behind the CONNECT request",
            m.early_streams.clone(),
        );
        sm.register("certificates_issued", "Workload certificates received from the CA", m.certs_issued.clone());
        sm.register(
            "certificate_requests_failed",
            "Certificate requests to the CA that failed, by reason",
            m.cert_failures.clone(),
        );
        sm.register(
            "certificate_expiry_timestamp_seconds",
            "Not-after time of each served identity's certificate",
            m.cert_expiry.clone(),
        );
        sm.register("ebpf_map_entries", "Entries in each bounded eBPF map", m.map_entries.clone());
        sm.register("ebpf_map_capacity", "Capacity of each bounded eBPF map", m.map_capacity.clone());
        sm.register(
            "ebpf_events",
            "What the kernel programs did (redirects, refusals when a map was full, ...)",
            m.kernel_events.clone(),
        );
        sm.register(
            "config_push_lag_milliseconds",
            "From the controller accepting a change to this agent applying it (last change pushed; snapshots are not counted)",
            m.push_lag.clone(),
        );
        sm.register("config_version", "Version of the configuration applied", m.config_version.clone());
        sm.register(
            "config_updates_refused",
            "Configuration updates refused whole (undecodable); the previous configuration stays in force",
            m.config_refused.clone(),
        );
        sm.register(
            "registration_failures",
            "Workloads of this node that could not be captured, by reason (their connections are refused)",
            m.registration_failures.clone(),
        );
        sm.register(
            "workloads_not_captured",
            "Workloads of this node that could not be captured now (their connections are refused)",
            m.not_captured.clone(),
        );
        sm.register(
            "gateways_unreachable",
            "Other zones' gateways this agent cannot reach now (their endpoints are skipped until they answer again)",
            m.gateways_unreachable.clone(),
        );
        sm.register(
            "orig_dst_reclaimed",
            "Original-destination entries removed by the agent because their socket was gone and no kernel hook removed them",
            m.reclaimed.clone(),
        );
        sm.register(
            "service_endpoint_failures",
            "Service endpoints that could not be used for a connection (another endpoint was then tried), by reason",
            m.endpoint_failures.clone(),
        );
        sm.register(
            "limit_hits",
            "Connections and streams refused or closed at an abuse limit, by limit (docs/security.md lists them)",
            m.limit_hits.clone(),
        );
        sm.register(
            "source_address_fallbacks",
            "Connections dialled to an app from the app's own address instead of its client's, by reason",
            m.source_fallbacks.clone(),
        );
        Metrics { registry, ..m }
    }

    pub fn opened(&self, rec: &ConnRecord) {
        self.opened.get_or_create(&TcpLabels::of(rec, &Outcome::Ok)).inc();
    }

    /// A connection ended or was refused. A refused one was never opened: it is counted as
    /// opened and closed at once, and under its reason.
    pub fn closed(&self, rec: &ConnRecord, outcome: &Outcome, sent: u64, received: u64) {
        let l = TcpLabels::of(rec, outcome);
        if let Outcome::Refused(reason) = outcome {
            self.opened.get_or_create(&l).inc();
            self.refused(rec.direction, reason);
        }
        self.closed.get_or_create(&l).inc();
        self.sent.get_or_create(&l).inc_by(sent);
        self.received.get_or_create(&l).inc_by(received);
    }

    /// A refusal that has no connection record (one turned away before anything was known).
    pub fn refused(&self, direction: Direction, reason: &Reason) {
        let l = ReasonLabels { direction: direction.as_str(), reason: reason.label() };
        self.seen(l.direction, l.reason, Kind::Refused);
        self.refused.get_or_create(&l).inc();
    }

    pub fn accepted(&self, direction: Direction) {
        self.accepted.get_or_create(&DirectionLabels { direction: direction.as_str() }).inc();
    }

    pub fn handshake_failed(&self, direction: Direction, failure: &HandshakeFailure) {
        let l = ReasonLabels { direction: direction.as_str(), reason: failure.label() };
        self.seen(l.direction, l.reason, Kind::Handshake);
        self.handshake_failures.get_or_create(&l).inc();
    }

    pub fn tls_session(&self) {
        self.tls_sessions.inc();
    }

    pub fn stream(&self, early: bool) {
        self.streams.inc();
        if early {
            self.early_streams.inc();
        }
    }

    /// A Service endpoint could not be used for a connection; another is tried.
    pub fn service_endpoint_failed(&self, reason: &'static str) {
        self.endpoint_failures.get_or_create(&FailureLabels { reason }).inc();
    }

    pub fn limit_hit(&self, limit: &'static str) {
        self.limit_hits.get_or_create(&LimitLabels { limit }).inc();
    }

    pub fn source_fallback(&self, reason: &'static str) {
        self.source_fallbacks.get_or_create(&FailureLabels { reason }).inc();
    }

    pub fn stream_refused_retried(&self) {
        self.streams_retried.inc();
    }

    pub fn certificate_issued(&self, identity: &str, not_after: i64) {
        self.certs_issued.inc();
        self.cert_expiry.get_or_create(&IdentityLabels { identity: identity.to_owned() }).set(not_after);
    }

    /// The identity is no longer served: its expiry series goes with it.
    pub fn certificate_dropped(&self, identity: &str) {
        self.cert_expiry.remove(&IdentityLabels { identity: identity.to_owned() });
    }

    pub fn certificate_failed(&self, reason: &'static str) {
        self.seen("-", reason, Kind::Certificate);
        self.cert_failures.get_or_create(&FailureLabels { reason }).inc();
    }

    pub fn set_map(&self, map: &'static str, entries: usize, capacity: u32) {
        self.map_entries.get_or_create(&MapLabels { map }).set(entries as i64);
        self.map_capacity.get_or_create(&MapLabels { map }).set(capacity as i64);
    }

    /// Kernel counters are absolute values from a pinned map that outlives this process; the
    /// Prometheus counter moves by what changed since the last reading.
    pub fn set_kernel_counter(&self, event: &'static str, value: u64) {
        let mut seen = self.kernel_seen.lock().unwrap_or_else(|e| e.into_inner());
        let last = seen.entry(event).or_insert(0);
        let c = self.kernel_events.get_or_create(&EventLabels { event });
        if value >= *last {
            c.inc_by(value - *last);
        }
        *last = value;
    }

    pub fn config_refused(&self) {
        self.config_refused.inc();
    }

    pub fn registration_failed(&self, reason: &'static str) {
        self.registration_failures.get_or_create(&FailureLabels { reason }).inc();
    }

    pub fn gateways_unreachable(&self, n: usize) {
        self.gateways_unreachable.set(n as i64);
    }

    pub fn set_not_captured(&self, n: usize) {
        self.not_captured.set(n as i64);
    }

    pub fn reclaimed_entries(&self, n: usize) {
        self.reclaimed.inc_by(n as u64);
    }

    pub fn reclaimed(&self) -> u64 {
        self.reclaimed.get()
    }

    /// `lag_ms` is that of a change (a delta); a snapshot has none and leaves the gauge alone.
    pub fn set_config(&self, lag_ms: Option<u64>, version: u64) {
        if let Some(lag_ms) = lag_ms {
            self.push_lag.set(lag_ms as i64);
        }
        self.config_version.set(version as i64);
    }

    fn seen(&self, direction: &'static str, reason: &'static str, kind: Kind) {
        let mut s = self.seen_reasons.lock().unwrap_or_else(|e| e.into_inner());
        s.entry((direction, reason)).or_insert(kind);
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::{KernelRefusal, Peer, Security, Target};

    fn rec(direction: Direction) -> ConnRecord {
        ConnRecord {
            direction,
            security: Security::MutualTls,
            src: Peer::default(),
            dst: Peer::default(),
            orig_dst: Target::Unknown,
            service: None,
        }
    }

    /// A refusal shows in /metrics under its reason and in the typed stats with the same
    /// number; an outbound refusal is not an inbound one.
    #[test]
    fn refusals_reach_prometheus_and_stats_with_the_same_label() {
        let m = Metrics::new();
        let r = Outcome::Refused(Reason::Kernel(KernelRefusal::WorkloadMismatch));
        m.closed(&rec(Direction::Outbound), &r, 0, 0);
        m.closed(&rec(Direction::Outbound), &r, 0, 0);
        m.closed(&rec(Direction::Inbound), &Outcome::Refused(Reason::MtlsStrict), 0, 0);
        m.accepted(Direction::Inbound);
        let text = m.encode();
        assert!(
            text.contains(r#"sockmesh_connections_refused_total{direction="outbound",reason="workload_mismatch"} 2"#),
            "{text}"
        );
        assert!(text.contains(r#"response_flags="workload_mismatch""#), "{text}");
        let out = m.direction_stats(Direction::Outbound);
        assert_eq!(out.refused.get("workload_mismatch"), Some(&2));
        assert!(!out.refused.contains_key("mtls_strict"));
        assert_eq!(out.accepted, 0);
        let inb = m.direction_stats(Direction::Inbound);
        assert_eq!((inb.accepted, inb.refused.get("mtls_strict")), (1, Some(&1)));
    }

    #[test]
    fn a_dropped_identity_takes_its_expiry_series_with_it() {
        let m = Metrics::new();
        m.certificate_issued("spiffe://td/ns/a/sa/b", 1_900_000_000);
        assert!(m.encode().contains("spiffe://td/ns/a/sa/b"));
        m.certificate_dropped("spiffe://td/ns/a/sa/b");
        assert!(!m.encode().contains("spiffe://td/ns/a/sa/b"));
        assert_eq!(m.cert_stats().issued, 1);
    }

    #[test]
    fn kernel_counters_move_by_their_difference() {
        let m = Metrics::new();
        m.set_kernel_counter("redirected", 5);
        m.set_kernel_counter("redirected", 7);
        assert!(m.encode().contains(r#"sockmesh_ebpf_events_total{event="redirected"} 7"#));
        assert_eq!(m.kernel_stats().get("redirected"), Some(&7));
    }
}
