//! The configuration watch: the controller's push stream (a snapshot, then deltas) turned into
//! the configuration half of the agent's state. Reconnects with backoff for ever and keeps the
//! last state while the controller is away.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use mesh_api::push::config_service_client::ConfigServiceClient;
use mesh_api::push::{ConfigUpdate, ResourceId, WatchRequest};

use crate::hbone::pool::Pool;
use crate::identity::{now_secs, FetchError, Identities};
use crate::metrics::Metrics;
use crate::state::{ConfigState, StateStore};

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("controller: {0}")]
    Rpc(#[from] tonic::Status),
    #[error(transparent)]
    Credential(#[from] FetchError),
    #[error("the update cannot be decoded: {0}")]
    Decode(#[from] mesh_api::push::UnknownKind),
}

pub struct ConfigWatch {
    pub state: Arc<StateStore>,
    pub identities: Arc<Identities>,
    pub metrics: Arc<Metrics>,
    pub pool: Arc<Pool>,
}

impl ConfigWatch {
    /// Watches for ever.
    pub async fn run(self) {
        let mut backoff = Duration::from_millis(250);
        loop {
            let mut applied = false;
            match self.stream_once(&mut applied).await {
                Ok(()) => tracing::warn!("configuration stream ended; reconnecting"),
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "configuration stream unavailable; keeping the last state")
                }
            }
            // A stream that delivered something was healthy: start the backoff over.
            backoff = if applied { Duration::from_millis(250) } else { (backoff * 2).min(Duration::from_secs(5)) };
            tokio::time::sleep(backoff).await;
        }
    }

    async fn stream_once(&self, applied: &mut bool) -> Result<(), WatchError> {
        let mut client = ConfigServiceClient::new(self.identities.channel());
        let mut req = tonic::Request::new(WatchRequest {});
        req.metadata_mut().insert("authorization", self.identities.bearer()?);
        let mut s = client.watch(req).await?.into_inner();
        let mut resources = self.state.load().config.resources.clone();
        while let Some(u) = s.message().await? {
            let (version, snapshot, accepted_at_ms) = (u.version, u.snapshot, u.accepted_at_ms);
            apply(&mut resources, u)?;
            let state =
                ConfigState::build(resources.clone(), version, self.state.root_namespace(), self.state.trust_domain());
            let lag_ms = (now_secs() * 1000 - accepted_at_ms).max(0) as u64;
            tracing::info!(version, snapshot, resources = resources.len(), lag_ms, "configuration applied");
            self.state.set_config(state);
            self.metrics.set_config(lag_ms, version);
            self.pool.evict_stale(&self.state.load());
            *applied = true;
        }
        Ok(())
    }
}

/// Applies one update to the resources: a snapshot replaces them, a delta changes them.
pub fn apply(resources: &mut BTreeMap<ResourceId, String>, u: ConfigUpdate) -> Result<(), WatchError> {
    let mut next = if u.snapshot { BTreeMap::new() } else { resources.clone() };
    for r in u.upserts {
        let (id, json) = r.into_parts()?;
        next.insert(id, json);
    }
    for k in u.removals {
        next.remove(&k.into_id()?);
    }
    *resources = next;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_api::push::{Kind, Resource};

    fn upsert(kind: Kind, name: &str) -> Resource {
        ResourceId::new(kind, "default", name).with_json("{}".into())
    }

    #[test]
    fn snapshots_replace_deltas_change_and_undecodable_updates_change_nothing() {
        let mut r = BTreeMap::new();
        let snap = ConfigUpdate { snapshot: true, upserts: vec![upsert(Kind::Workload, "a")], ..Default::default() };
        apply(&mut r, snap).unwrap();
        let delta = ConfigUpdate {
            upserts: vec![upsert(Kind::AuthorizationPolicy, "p")],
            removals: vec![ResourceId::new(Kind::Workload, "default", "a").key()],
            ..Default::default()
        };
        apply(&mut r, delta).unwrap();
        assert_eq!(
            r.keys().cloned().collect::<Vec<_>>(),
            vec![ResourceId::new(Kind::AuthorizationPolicy, "default", "p")]
        );
        let bad = ConfigUpdate {
            upserts: vec![upsert(Kind::Workload, "b"), Resource { kind: 42, ..upsert(Kind::Workload, "c") }],
            ..Default::default()
        };
        assert!(apply(&mut r, bad).is_err());
        assert_eq!(r.len(), 1, "a half-applied update");
        let snap = ConfigUpdate { snapshot: true, ..Default::default() };
        apply(&mut r, snap).unwrap();
        assert!(r.is_empty());
    }
}
