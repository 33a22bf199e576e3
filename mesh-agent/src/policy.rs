//! The configuration the agent gets from the controller's push stream, and the decisions it
//! takes from it: authorization (mesh-model's engine) and which workloads accept plaintext
//! (PeerAuthentication). The agent keeps the last state while the controller is away.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use mesh_identity::config_proto::config_service_client::ConfigServiceClient;
use mesh_identity::config_proto::WatchRequest;
use mesh_model::authz::{Compiled, PolicyIndex};
use mesh_model::policy::{AuthorizationPolicySpec, MtlsMode, PeerAuthenticationSpec};
use mesh_model::Workload;

use crate::app::Agent;

type Key = (String, String, String);

/// What the last accepted push says.
#[derive(Default)]
pub struct PolicyState {
    pub version: u64,
    pub index: PolicyIndex,
    pub peer: Vec<(String, String, PeerAuthenticationSpec)>,
    /// Every workload in the mesh, by address (for destinations and their identities).
    pub workloads: BTreeMap<IpAddr, Workload>,
    /// The same, by namespace/name: the controller's labels are what policies select on.
    pub by_key: BTreeMap<mesh_model::WorkloadKey, Workload>,
    pub resources: BTreeMap<Key, String>,
    /// Configuration the controller rejected (file, line, reason), as it reported it.
    pub errors: Vec<String>,
}

impl PolicyState {
    fn build(resources: BTreeMap<Key, String>, version: u64, root: &str) -> PolicyState {
        let mut policies = Vec::new();
        let mut peer = Vec::new();
        let mut workloads = BTreeMap::new();
        let mut by_key = BTreeMap::new();
        let mut errors = Vec::new();
        for ((kind, ns, name), json) in &resources {
            match kind.as_str() {
                "AuthorizationPolicy" => match serde_json::from_str::<AuthorizationPolicySpec>(json)
                    .map_err(|e| e.to_string())
                    .and_then(|s| Compiled::compile(ns, name, &s).map_err(|e| e.to_string()))
                {
                    Ok(c) => policies.push(c),
                    // The controller validated it; a failure here means versions disagree. Fail
                    // closed for that policy's intent is not knowable, so it is logged loudly.
                    Err(e) => {
                        tracing::error!(policy = %format!("{ns}/{name}"), error = %e, "pushed policy does not compile; ignored")
                    }
                },
                "PeerAuthentication" => {
                    if let Ok(s) = serde_json::from_str::<PeerAuthenticationSpec>(json) {
                        peer.push((ns.clone(), name.clone(), s));
                    }
                }
                "Workload" => {
                    if let Ok(w) = serde_json::from_str::<Workload>(json) {
                        for ip in &w.ips {
                            workloads.insert(*ip, w.clone());
                        }
                        by_key.insert(w.key(), w);
                    }
                }
                "ConfigError" => {
                    if let Ok(e) = serde_json::from_str::<String>(json) {
                        errors.push(e);
                    }
                }
                _ => {}
            }
        }
        PolicyState { version, index: PolicyIndex::new(root, policies), peer, workloads, by_key, resources, errors }
    }

    /// The mTLS mode for a workload's port: a selecting policy in its namespace, then its
    /// namespace's policy without selector, then the mesh-wide one; PERMISSIVE if none says.
    pub fn mtls_mode(&self, root: &str, w: &Workload, port: u16) -> MtlsMode {
        let level = |spec: &PeerAuthenticationSpec| -> MtlsMode {
            if let Some(m) = spec.port_level_mtls.get(&port.to_string()) {
                if m.mode != MtlsMode::Unset {
                    return m.mode;
                }
            }
            spec.mtls.as_ref().map(|m| m.mode).unwrap_or(MtlsMode::Unset)
        };
        let selects = |spec: &PeerAuthenticationSpec| {
            spec.selector.as_ref().is_some_and(|s| s.match_labels.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
        };
        type Tier<'a> = Box<dyn Fn(&(String, String, PeerAuthenticationSpec)) -> bool + 'a>;
        let tiers: [Tier<'_>; 3] = [
            Box::new(|(ns, _, s)| ns == &w.namespace && selects(s)),
            Box::new(|(ns, _, s)| ns == &w.namespace && s.selector.is_none()),
            Box::new(|(ns, _, s)| ns == root && s.selector.is_none()),
        ];
        for tier in tiers {
            for p in self.peer.iter().filter(|p| tier(p)) {
                let m = level(&p.2);
                if m != MtlsMode::Unset {
                    return m;
                }
            }
        }
        MtlsMode::Permissive
    }
}

/// Watches the controller's push stream for ever: reconnects with backoff, keeps the last state
/// while the controller is away.
pub async fn watch(agent: Arc<Agent>) {
    let mut backoff = Duration::from_millis(250);
    loop {
        match stream_once(&agent).await {
            Ok(()) => tracing::warn!("configuration stream ended; reconnecting"),
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "configuration stream unavailable; keeping the last state")
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
        if agent.policy_connected() {
            backoff = Duration::from_millis(250);
        }
    }
}

async fn stream_once(agent: &Arc<Agent>) -> Result<(), String> {
    let mut client = ConfigServiceClient::new(agent.identities.channel());
    let mut req = tonic::Request::new(WatchRequest {});
    req.metadata_mut().insert("authorization", agent.identities.bearer().map_err(|e| e.to_string())?);
    let mut s = client.watch(req).await.map_err(|e| format!("{}: {}", e.code(), e.message()))?.into_inner();
    let mut resources: BTreeMap<Key, String> = agent.policy_state().resources.clone();
    while let Some(u) = s.message().await.map_err(|e| format!("{}: {}", e.code(), e.message()))? {
        if u.snapshot {
            resources.clear();
        }
        for r in u.upserts {
            resources.insert((r.kind, r.namespace, r.name), r.json);
        }
        for k in u.removals {
            resources.remove(&(k.kind, k.namespace, k.name));
        }
        let state = PolicyState::build(resources.clone(), u.version, &agent.config.root_namespace);
        let lag_ms = (crate::identity::now_secs() * 1000 - u.accepted_at_ms).max(0);
        tracing::info!(
            version = u.version,
            snapshot = u.snapshot,
            resources = resources.len(),
            lag_ms,
            "configuration applied"
        );
        agent.set_policy_state(state, lag_ms);
    }
    Ok(())
}
