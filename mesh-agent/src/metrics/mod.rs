//! Prometheus metrics (OpenMetrics text on :15020). The TCP metrics carry the label set Istio
//! uses, so existing dashboards work unchanged. Every label value is bounded: workload names,
//! namespaces and principals come from the workload records (a cluster's size), reasons and
//! flags from enums.

use std::collections::BTreeMap;
use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::proxy::ConnRecord;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub connection_security_policy: &'static str,
    pub response_flags: String,
    pub request_protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub direction: &'static str,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IdentityLabels {
    pub identity: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabels {
    pub map: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    pub event: &'static str,
}

pub struct Metrics {
    registry: Registry,
    opened: Family<TcpLabels, Counter>,
    closed: Family<TcpLabels, Counter>,
    sent: Family<TcpLabels, Counter>,
    received: Family<TcpLabels, Counter>,
    refused: Family<ReasonLabels, Counter>,
    handshake_failures: Family<ReasonLabels, Counter>,
    cert_expiry: Family<IdentityLabels, Gauge>,
    map_entries: Family<MapLabels, Gauge>,
    map_capacity: Family<MapLabels, Gauge>,
    kernel_events: Family<EventLabels, Counter>,
    push_lag: Gauge,
    config_version: Gauge,
    /// Last kernel counter values seen (they live in a pinned map, across agent restarts).
    kernel_seen: Mutex<BTreeMap<&'static str, u64>>,
}

fn split_workload(w: &Option<String>) -> (String, String) {
    match w.as_deref().and_then(|w| w.split_once('/')) {
        Some((ns, name)) => (name.to_owned(), ns.to_owned()),
        None => ("unknown".into(), "unknown".into()),
    }
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
            opened: Family::default(),
            closed: Family::default(),
            sent: Family::default(),
            received: Family::default(),
            refused: Family::default(),
            handshake_failures: Family::default(),
            cert_expiry: Family::default(),
            map_entries: Family::default(),
            map_capacity: Family::default(),
            kernel_events: Family::default(),
            push_lag: Gauge::default(),
            config_version: Gauge::default(),
            kernel_seen: Mutex::new(BTreeMap::new()),
            registry: Registry::default(),
        };
        let istio = registry.sub_registry_with_prefix("istio");
        istio.register("tcp_connections_opened", "TCP connections opened", m.opened.clone());
        istio.register("tcp_connections_closed", "TCP connections closed", m.closed.clone());
        istio.register("tcp_sent_bytes", "Bytes sent toward the destination", m.sent.clone());
        istio.register("tcp_received_bytes", "Bytes received from the destination", m.received.clone());
        let sm = registry.sub_registry_with_prefix("sockmesh");
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
            "From the controller accepting a change to this agent applying it (last push)",
            m.push_lag.clone(),
        );
        sm.register("config_version", "Version of the configuration applied", m.config_version.clone());
        Metrics { registry, ..m }
    }

    fn labels(rec: &ConnRecord, flags: &str) -> TcpLabels {
        let (sw, sns) = split_workload(&rec.src_workload);
        let (dw, dns) = split_workload(&rec.dst_workload);
        TcpLabels {
            reporter: if rec.direction == "outbound" { "source" } else { "destination" },
            source_workload: sw,
            source_workload_namespace: sns,
            source_principal: rec.src_principal.clone().unwrap_or_else(|| "unknown".into()),
            destination_workload: dw,
            destination_workload_namespace: dns,
            destination_principal: rec.dst_principal.clone().unwrap_or_else(|| "unknown".into()),
            // Bounded: mutual_tls, node_local (same node, identities from kernel facts, no
            // wire), or none (plaintext).
            connection_security_policy: match rec.security {
                "mutual_tls" => "mutual_tls",
                crate::proxy::local::SECURITY => crate::proxy::local::SECURITY,
                _ => "none",
            },
            response_flags: if flags == "ok" { "-".into() } else { flags.to_owned() },
            request_protocol: "tcp",
        }
    }

    pub fn opened(&self, rec: &ConnRecord) {
        self.opened.get_or_create(&Self::labels(rec, "ok")).inc();
    }

    /// A connection ended (`result` "ok") or was refused (`result` its reason).
    pub fn closed(&self, rec: &ConnRecord, sent: u64, received: u64, result: &str) {
        let l = Self::labels(rec, result);
        if result != "ok" {
            // Refused before it was relayed: it was opened and closed at once.
            self.opened.get_or_create(&l).inc();
            self.refused.get_or_create(&ReasonLabels { direction: rec.direction, reason: result.to_owned() }).inc();
        }
        self.closed.get_or_create(&l).inc();
        self.sent.get_or_create(&l).inc_by(sent);
        self.received.get_or_create(&l).inc_by(received);
    }

    pub fn handshake_failed(&self, direction: &'static str, reason: &str) {
        self.handshake_failures.get_or_create(&ReasonLabels { direction, reason: reason.to_owned() }).inc();
    }

    pub fn set_cert_expiry(&self, identity: &str, not_after: i64) {
        self.cert_expiry.get_or_create(&IdentityLabels { identity: identity.to_owned() }).set(not_after);
    }

    pub fn set_map(&self, map: &'static str, entries: usize, capacity: u32) {
        self.map_entries.get_or_create(&MapLabels { map }).set(entries as i64);
        self.map_capacity.get_or_create(&MapLabels { map }).set(capacity as i64);
    }

    pub fn set_kernel_counter(&self, event: &'static str, value: u64) {
        let mut seen = self.kernel_seen.lock().unwrap();
        let last = seen.entry(event).or_insert(0);
        let c = self.kernel_events.get_or_create(&EventLabels { event });
        if value >= *last {
            c.inc_by(value - *last);
        }
        *last = value;
    }

    pub fn set_push_lag(&self, lag_ms: u64, version: u64) {
        self.push_lag.set(lag_ms as i64);
        self.config_version.set(version as i64);
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}
