//! The configuration watch: the controller's push stream (a snapshot, then deltas) turned into
//! the configuration half of the agent's state. Reconnects with backoff for ever and keeps the
//! last state while the controller is away.
//!
//! Every configuration applied is also kept on disk ([`ConfigFile`]), so that a restarted
//! agent enforces the last policy it had — STRICT and DENY included — from its first
//! connection, even if the controller is away. An update the agent cannot decode is refused
//! whole: the previous configuration stays in force, and the refusal is counted and shown.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use mesh_api::push::config_service_client::ConfigServiceClient;
use mesh_api::push::{ConfigUpdate, Resource, ResourceId, WatchRequest};
use serde::{Deserialize, Serialize};

use crate::hbone::pool::Pool;
use crate::identity::{FetchError, Identities};
use crate::metrics::Metrics;
use crate::state::{BuildError, ConfigState, StateStore};

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("controller: {0}")]
    Rpc(#[from] tonic::Status),
    #[error(transparent)]
    Credential(#[from] FetchError),
    #[error("the update cannot be decoded: {0}")]
    Decode(#[from] mesh_api::push::UnknownKind),
    #[error("update to version {version} refused whole, the previous configuration stays in force: {source}")]
    Refused { version: u64, source: BuildError },
}

pub struct ConfigWatch {
    pub state: Arc<StateStore>,
    pub identities: Arc<Identities>,
    pub metrics: Arc<Metrics>,
    pub pool: Arc<Pool>,
    pub registry: Arc<crate::registration::Registry>,
    /// Service endpoints' in-flight counts: those of endpoints gone from every Service are
    /// forgotten once idle.
    pub loads: Arc<crate::balance::Loads>,
    pub file: ConfigFile,
}

impl ConfigWatch {
    /// Watches for ever.
    pub async fn run(self) {
        let mut backoff = Duration::from_millis(250);
        loop {
            let mut applied = false;
            let (replica, channel) = self.identities.channel();
            let result = self.stream_once(channel, &mut applied).await;
            if !matches!(result, Err(WatchError::Decode(_) | WatchError::Refused { .. })) {
                // The replica went away (or ended the stream): the next try goes to another,
                // if there are several. The state in force stays meanwhile.
                self.identities.controller_failed(replica);
            }
            match result {
                Ok(()) => tracing::warn!("configuration stream ended; reconnecting"),
                Err(e @ (WatchError::Decode(_) | WatchError::Refused { .. })) => {
                    self.metrics.config_refused();
                    self.state.set_refused(Some(e.to_string()));
                    tracing::error!(error = %e, retry_in_ms = backoff.as_millis() as u64, "configuration update refused");
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "configuration stream unavailable; keeping the last state")
                }
            }
            // A stream that delivered something was healthy: start the backoff over.
            backoff = if applied { Duration::from_millis(250) } else { (backoff * 2).min(Duration::from_secs(5)) };
            tokio::time::sleep(backoff).await;
        }
    }

    async fn stream_once(&self, channel: tonic::transport::Channel, applied: &mut bool) -> Result<(), WatchError> {
        let mut client = ConfigServiceClient::new(channel);
        let mut req = tonic::Request::new(WatchRequest { accepts_parts: true });
        req.metadata_mut().insert("authorization", self.identities.bearer()?);
        let mut s = client.watch(req).await?.into_inner();
        let mut resources = self.state.load().config.resources.clone();
        let mut parts = Gather::default();
        while let Some(u) = s.message().await? {
            let (version, accepted_at_ms) = (u.version, u.accepted_at_ms);
            let Some((next, snapshot)) = parts.add(&resources, u)? else { continue };
            let (root, td) = (self.state.root_namespace(), self.state.trust_domain());
            let state = ConfigState::build(next.clone(), version, root, td)
                .map_err(|source| WatchError::Refused { version, source })?;
            resources = next;
            // A delta's lag is how long the change took to reach this agent. A snapshot (the
            // first message of every stream) carries the state as it was accepted, perhaps long
            // ago: its age is not a lag and is not reported as one.
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0);
            let lag_ms = (!snapshot).then(|| (now_ms - accepted_at_ms).max(0) as u64);
            match lag_ms {
                Some(lag_ms) => {
                    tracing::info!(version, resources = resources.len(), lag_ms, "configuration change applied")
                }
                None => tracing::info!(version, resources = resources.len(), "configuration snapshot applied"),
            }
            self.identities.trust.set_meshes(&state.meshes);
            self.state.set_config(state);
            self.state.set_refused(None);
            self.metrics.set_config(lag_ms, version);
            self.registry.follow_config().await;
            let snap = self.state.load();
            self.pool.evict_stale(&snap);
            let endpoints: std::collections::HashSet<crate::balance::LoadKey> = snap
                .config
                .services_by_key
                .values()
                .chain(snap.config.imported.values())
                .flat_map(|s| s.service.endpoints.iter().map(crate::balance::LoadKey::of))
                .collect();
            self.loads.retain(|k| endpoints.contains(k));
            if let Err(e) = self.file.save(version, &resources) {
                tracing::error!(path = %self.file.path.display(), error = %e, "cannot keep the configuration on disk; a restart without the controller would start without it");
            }
            *applied = true;
        }
        Ok(())
    }
}

/// Resources as pushed: identity -> JSON.
pub type Resources = BTreeMap<ResourceId, String>;

/// An update sent in parts (`more`), gathered until its last part: nothing is applied before.
#[derive(Default)]
pub struct Gather {
    partial: Option<(Resources, bool)>,
}

impl Gather {
    /// Adds a part to the update under way, which starts from `resources`. Once the last part
    /// is in: the resources the update leaves, and whether it was a snapshot.
    pub fn add(&mut self, resources: &Resources, u: ConfigUpdate) -> Result<Option<(Resources, bool)>, WatchError> {
        let more = u.more;
        let (mut next, snapshot) = match self.partial.take() {
            Some(p) => p,
            None if u.snapshot => (BTreeMap::new(), true),
            None => (resources.clone(), false),
        };
        apply(&mut next, u)?;
        if more {
            self.partial = Some((next, snapshot));
            return Ok(None);
        }
        Ok(Some((next, snapshot)))
    }
}

/// Applies one update to the resources: a snapshot replaces them, a delta changes them.
/// Nothing changes if any of it cannot be decoded.
pub fn apply(resources: &mut BTreeMap<ResourceId, String>, u: ConfigUpdate) -> Result<(), WatchError> {
    // Everything decoded first, so that a failure leaves the resources as they were.
    let upserts = u.upserts.into_iter().map(Resource::into_parts).collect::<Result<Vec<_>, _>>()?;
    let removals = u.removals.into_iter().map(|k| k.into_id()).collect::<Result<Vec<_>, _>>()?;
    if u.snapshot {
        resources.clear();
    }
    resources.extend(upserts);
    for k in removals {
        resources.remove(&k);
    }
    Ok(())
}

/// A configuration read back: its version and resources.
pub type Kept = (u64, BTreeMap<ResourceId, String>);

/// The last configuration applied, on disk: `<state-dir>/config.json`, written whole and
/// renamed into place, with a SHA-256 of its resources that is checked on load.
pub struct ConfigFile {
    path: PathBuf,
}

#[derive(Serialize, Deserialize)]
struct Stored {
    format: u32,
    version: u64,
    sha256: String,
    resources: Vec<StoredResource>,
}

#[derive(Serialize, Deserialize)]
struct StoredResource {
    kind: i32,
    namespace: String,
    name: String,
    json: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a configuration this agent wrote ({reason}); remove it, the controller will push the configuration again")]
    Invalid { path: PathBuf, reason: String },
}

const FORMAT: u32 = 1;

fn digest(resources: &[StoredResource]) -> String {
    let bytes = serde_json::to_vec(resources).expect("serialisable");
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &bytes);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

impl ConfigFile {
    pub fn new(state_dir: &Path) -> ConfigFile {
        ConfigFile { path: state_dir.join("config.json") }
    }

    pub fn save(&self, version: u64, resources: &BTreeMap<ResourceId, String>) -> std::io::Result<()> {
        let resources: Vec<StoredResource> = resources
            .iter()
            .map(|(id, json)| StoredResource {
                kind: id.kind as i32,
                namespace: id.namespace.clone(),
                name: id.name.clone(),
                json: json.clone(),
            })
            .collect();
        let stored = Stored { format: FORMAT, version, sha256: digest(&resources), resources };
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = self.path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec(&stored)?)?;
        std::fs::rename(&tmp, &self.path)
    }

    /// The configuration kept by the last run, if there is one; an error if the file is
    /// there but damaged (it is then not used).
    pub fn load(&self) -> Result<Option<Kept>, ConfigFileError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(ConfigFileError::Read { path: self.path.clone(), source }),
        };
        let invalid = |reason: String| ConfigFileError::Invalid { path: self.path.clone(), reason };
        let stored: Stored = serde_json::from_slice(&bytes).map_err(|e| invalid(e.to_string()))?;
        if stored.format != FORMAT {
            return Err(invalid(format!("format {} (this agent writes {FORMAT})", stored.format)));
        }
        if digest(&stored.resources) != stored.sha256 {
            return Err(invalid("its checksum does not match its content".into()));
        }
        let mut out = BTreeMap::new();
        for r in stored.resources {
            let res = Resource { kind: r.kind, namespace: r.namespace, name: r.name, json: r.json };
            let (id, json) = res.into_parts().map_err(|e| invalid(e.to_string()))?;
            out.insert(id, json);
        }
        Ok(Some((stored.version, out)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_api::push::Kind;

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

    /// A snapshot in parts replaces the resources once, at its last part; a delta in parts
    /// changes them once, at its last part.
    #[test]
    fn an_update_in_parts_is_applied_whole_at_its_last_part() {
        let id = |n: &str| ResourceId::new(Kind::Workload, "default", n);
        let before: BTreeMap<ResourceId, String> = [(id("old"), "{}".to_owned())].into();
        let mut g = Gather::default();
        let part = |snapshot, more, names: &[&str]| ConfigUpdate {
            snapshot,
            more,
            version: 7,
            upserts: names.iter().map(|n| upsert(Kind::Workload, n)).collect(),
            ..Default::default()
        };
        assert!(g.add(&before, part(true, true, &["a"])).unwrap().is_none());
        assert!(g.add(&before, part(false, true, &["b"])).unwrap().is_none());
        let (after, snapshot) = g.add(&before, part(false, false, &["c"])).unwrap().unwrap();
        assert!(snapshot);
        assert_eq!(after.keys().cloned().collect::<Vec<_>>(), [id("a"), id("b"), id("c")]);
        // A delta in two parts starts from what the agent holds.
        assert!(g.add(&after, part(false, true, &["d"])).unwrap().is_none());
        let removal = ConfigUpdate { removals: vec![id("a").key()], ..part(false, false, &[]) };
        let (next, snapshot) = g.add(&after, removal).unwrap().unwrap();
        assert!(!snapshot);
        assert_eq!(next.keys().cloned().collect::<Vec<_>>(), [id("b"), id("c"), id("d")]);
    }

    #[test]
    fn the_kept_configuration_round_trips_and_damage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = ConfigFile::new(dir.path());
        assert!(f.load().unwrap().is_none());
        let mut r = BTreeMap::new();
        r.insert(
            ResourceId::new(Kind::PeerAuthentication, "default", "strict"),
            r#"{"mtls":{"mode":"STRICT"}}"#.into(),
        );
        f.save(9, &r).unwrap();
        assert_eq!(f.load().unwrap(), Some((9, r)));
        // A changed byte in the content: the checksum no longer matches.
        let text = std::fs::read_to_string(&f.path).unwrap().replace("STRICT", "PERMISSIVE");
        std::fs::write(&f.path, text).unwrap();
        let e = f.load().unwrap_err().to_string();
        assert!(e.contains("checksum") && e.contains("remove it"), "{e}");
        std::fs::write(&f.path, "{").unwrap();
        assert!(f.load().is_err());
    }
}
