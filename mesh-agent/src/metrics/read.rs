//! Typed readings for `/stats` and the local API, from the same counters `/metrics` encodes.

use std::collections::BTreeMap;

use mesh_api::admin::{CertStats, ConfigStats, DirectionStats, HboneStats, MapFill};

use super::labels::{DirectionLabels, FailureLabels, LimitLabels, MapLabels, ReasonLabels};
use super::{Kind, Metrics};
use crate::outcome::Direction;

impl Metrics {
    pub fn direction_stats(&self, direction: Direction) -> DirectionStats {
        let d = direction.as_str();
        let mut out = DirectionStats {
            accepted: self.accepted.get(&DirectionLabels { direction: d }).map(|c| c.get()).unwrap_or(0),
            ..Default::default()
        };
        let seen = self.seen_reasons.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for ((dir, reason), kind) in seen {
            let l = ReasonLabels { direction: dir, reason };
            match kind {
                Kind::Refused if dir == d => {
                    out.refused.insert(reason.to_owned(), self.refused.get(&l).map(|c| c.get()).unwrap_or(0));
                }
                Kind::Handshake if dir == d => {
                    let n = self.handshake_failures.get(&l).map(|c| c.get()).unwrap_or(0);
                    out.handshake_failures.insert(reason.to_owned(), n);
                }
                _ => {}
            }
        }
        out
    }

    pub fn hbone_stats(&self) -> HboneStats {
        HboneStats {
            tls_sessions: self.tls_sessions.get(),
            streams: self.streams.get(),
            early_streams: self.early_streams.get(),
        }
    }

    pub fn cert_stats(&self) -> CertStats {
        let seen = self.seen_reasons.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let failures = seen
            .into_iter()
            .filter(|(_, k)| *k == Kind::Certificate)
            .map(|((_, reason), _)| {
                (reason.to_owned(), self.cert_failures.get(&FailureLabels { reason }).map(|c| c.get()).unwrap_or(0))
            })
            .collect();
        CertStats { issued: self.certs_issued.get(), failures }
    }

    pub fn config_stats(&self) -> ConfigStats {
        ConfigStats { version: self.config_version.get().max(0) as u64, push_lag_ms: self.push_lag.get().max(0) as u64 }
    }

    pub fn kernel_stats(&self) -> BTreeMap<String, u64> {
        self.kernel_seen.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    pub fn map_stats(&self, maps: &[&'static str]) -> BTreeMap<String, MapFill> {
        maps.iter()
            .map(|&map| {
                let l = MapLabels { map };
                let entries = self.map_entries.get(&l).map(|g| g.get().max(0) as u64).unwrap_or(0);
                let capacity = self.map_capacity.get(&l).map(|g| g.get().max(0) as u64).unwrap_or(0);
                (map.to_owned(), MapFill { entries, capacity })
            })
            .collect()
    }

    /// Hits of each of `limits` that has been hit.
    pub fn limit_stats(&self, limits: &[&'static str]) -> BTreeMap<String, u64> {
        limits
            .iter()
            .filter_map(|&limit| self.limit_hits.get(&LimitLabels { limit }).map(|c| (limit.to_owned(), c.get())))
            .collect()
    }
}
