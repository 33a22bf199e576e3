//! Status write-back: every AuthorizationPolicy, PeerAuthentication and Mesh carries an `Accepted`
//! condition for the generation the controller last read, so `kubectl get ap` shows whether a
//! policy is in force, and why not when it is rejected (an invalid policy is never half-applied;
//! the model leaves it out whole).
//!
//! `desired` is pure and decides everything; the writer only patches what it returns. A write
//! happens only when the status would change, so our own status updates (which come back as
//! watch events) settle after one round.
//!
//! Exercised against the mock API server in `tests.rs`; not yet against a real cluster.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::Store;
use kube::{Api, Client, Resource, ResourceExt};
use mesh_model::authz::Compiled;
use mesh_model::policy::{AuthorizationPolicy, Condition, PeerAuthentication, PolicyStatus};
use mesh_model::Mesh;

use crate::meshes::Verdicts;
use serde::de::DeserializeOwned;

pub const ACCEPTED: &str = "Accepted";

/// Whether the controller applies this policy, and if not, why.
pub fn verdict_authz(ap: &AuthorizationPolicy) -> Result<(), String> {
    Compiled::compile(&ap.namespace().unwrap_or_default(), &ap.name_any(), &ap.spec)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

pub fn verdict_peer(pa: &PeerAuthentication) -> Result<(), String> {
    pa.spec.validate()
}

/// What the Accepted condition says of an accepted object, and after a rejection's reason.
pub struct Messages {
    pub accepted: &'static str,
    pub rejected: &'static str,
}

pub const POLICY: Messages = Messages {
    accepted: "in force on the nodes running the workloads it selects",
    rejected: "no part of this policy is applied",
};
pub const MESH: Messages = Messages {
    accepted: "in force: the workloads of its namespaces get certificates of its trust domain from its CA",
    rejected: "its namespaces' workloads get no certificates, so their connections are refused",
};

/// The status a policy should have, or None when `current` already says it. Other conditions
/// (written by someone else) are kept; `lastTransitionTime` moves only when True/False flips.
pub fn desired(
    generation: Option<i64>,
    current: Option<&PolicyStatus>,
    verdict: &Result<(), String>,
    now: &str,
) -> Option<PolicyStatus> {
    desired_as(generation, current, verdict, now, &POLICY)
}

/// [`desired`] with the messages of another kind of object.
pub fn desired_as(
    generation: Option<i64>,
    current: Option<&PolicyStatus>,
    verdict: &Result<(), String>,
    now: &str,
    messages: &Messages,
) -> Option<PolicyStatus> {
    let (status, reason, message) = match verdict {
        Ok(()) => ("True", "Accepted", messages.accepted.to_owned()),
        Err(e) => ("False", "Invalid", format!("{e}; {}", messages.rejected)),
    };
    let old = current.and_then(|s| s.conditions.iter().find(|c| c.type_ == ACCEPTED));
    if let (Some(cur), Some(c)) = (current, old) {
        if cur.observed_generation == generation && c.status == status && c.reason == reason && c.message == message {
            return None;
        }
    }
    let last_transition_time = match old {
        Some(c) if c.status == status => c.last_transition_time.clone().or_else(|| Some(now.to_owned())),
        _ => Some(now.to_owned()),
    };
    let mut conditions: Vec<Condition> =
        current.map(|s| s.conditions.iter().filter(|c| c.type_ != ACCEPTED).cloned().collect()).unwrap_or_default();
    conditions.push(Condition {
        type_: ACCEPTED.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        last_transition_time,
    });
    Some(PolicyStatus { observed_generation: generation, conditions })
}

fn now_rfc3339() -> String {
    // Kubernetes times are RFC 3339 with whole seconds.
    jiff::Timestamp::from_second(jiff::Timestamp::now().as_second()).map(|t| t.to_string()).unwrap_or_default()
}

/// Resource versions we already wrote a status for: the store may not have seen our write yet
/// when the next trigger comes, and writing the same status twice would be noise.
type Written = HashMap<(String, String), String>;

async fn write_kind<K>(
    client: &Client,
    store: &Store<K>,
    written: &mut Written,
    verdict: fn(&K) -> Result<(), String>,
    status: fn(&K) -> Option<&PolicyStatus>,
) where
    K: Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + Debug
        + Send
        + Sync
        + 'static,
{
    let kind = K::kind(&());
    // One snapshot of the store for the whole pass.
    let objects = store.state();
    let present: std::collections::HashSet<(String, String)> =
        objects.iter().map(|o| (o.namespace().unwrap_or_default(), o.name_any())).collect();
    written.retain(|k, _| present.contains(k));
    for o in objects {
        let (ns, name) = (o.namespace().unwrap_or_default(), o.name_any());
        let rv = o.resource_version().unwrap_or_default();
        if written.get(&(ns.clone(), name.clone())) == Some(&rv) {
            continue;
        }
        let v = verdict(&o);
        let Some(want) = desired(o.meta().generation, status(&o), &v, &now_rfc3339()) else {
            continue;
        };
        let api: Api<K> = Api::namespaced(client.clone(), &ns);
        let patch = serde_json::json!({ "status": want });
        match api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch)).await {
            Ok(_) => {
                let accepted = v.is_ok();
                tracing::info!(%kind, namespace = %ns, %name, accepted, generation = ?o.meta().generation, "policy status written");
                written.insert((ns, name), rv);
            }
            // Retried on the next change or the periodic pass.
            Err(e) => tracing::warn!(%kind, namespace = %ns, %name, error = %e, "could not write policy status"),
        }
    }
}

/// Writes each Mesh's status (cluster-scoped) with the mesh keeper's verdict: valid alone,
/// against the others (a trust domain or root already taken), and its CA loaded. A Mesh the
/// keeper has not judged yet waits (unless it is invalid alone).
async fn write_meshes(client: &Client, store: &Store<Mesh>, written: &mut Written, verdicts: &Verdicts) {
    let objects = store.state();
    let present: std::collections::HashSet<(String, String)> =
        objects.iter().map(|o| (String::new(), o.name_any())).collect();
    written.retain(|k, _| present.contains(k));
    let api: Api<Mesh> = Api::all(client.clone());
    for o in objects {
        let name = o.name_any();
        let Some(v) = verdicts.get(&name).or_else(|| o.spec.validate(&name).err().map(Err)) else { continue };
        // The verdict can change with another Mesh: it is part of what was written.
        let written_as = format!("{}|{v:?}", o.resource_version().unwrap_or_default());
        if written.get(&(String::new(), name.clone())) == Some(&written_as) {
            continue;
        }
        let Some(want) = desired_as(o.meta().generation, o.status.as_ref(), &v, &now_rfc3339(), &MESH) else {
            continue;
        };
        let patch = serde_json::json!({ "status": want });
        match api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch)).await {
            Ok(_) => {
                tracing::info!(kind = "Mesh", %name, accepted = v.is_ok(), generation = ?o.meta().generation, "mesh status written");
                written.insert((String::new(), name), written_as);
            }
            Err(e) => tracing::warn!(kind = "Mesh", %name, error = %e, "could not write mesh status"),
        }
    }
}

/// The stores whose objects get a status.
pub struct Stores {
    pub aps: Store<AuthorizationPolicy>,
    pub pas: Store<PeerAuthentication>,
    pub meshes: Store<Mesh>,
}

/// Writes statuses after every change the source saw (`changed`), and every 30 s so that a
/// failed write is retried; only while this replica holds the status writer's Lease
/// (`leader`), and at once when it comes to hold it.
pub async fn run(
    client: Client,
    stores: Stores,
    verdicts: Arc<Verdicts>,
    changed: Arc<tokio::sync::Notify>,
    mut leader: tokio::sync::watch::Receiver<bool>,
) {
    let (mut wa, mut wp, mut wm) = (Written::new(), Written::new(), Written::new());
    loop {
        tokio::select! {
            _ = changed.notified() => {}
            _ = verdicts.changed.notified() => {}
            r = leader.changed() => {
                if r.is_err() {
                    return;
                }
                // What the previous writer wrote is in the objects; what it had not is written now.
                wa.clear(); wp.clear(); wm.clear();
            }
            _ = tokio::time::sleep(Duration::from_secs(30)) => { wa.clear(); wp.clear(); wm.clear(); }
        }
        if !*leader.borrow_and_update() {
            continue;
        }
        write_kind(&client, &stores.aps, &mut wa, verdict_authz, |o| o.status.as_ref()).await;
        write_kind(&client, &stores.pas, &mut wp, verdict_peer, |o| o.status.as_ref()).await;
        write_meshes(&client, &stores.meshes, &mut wm, &verdicts).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cond(status: &str, reason: &str, msg: &str, ltt: Option<&str>) -> Condition {
        Condition {
            type_: ACCEPTED.into(),
            status: status.into(),
            reason: reason.into(),
            message: msg.into(),
            last_transition_time: ltt.map(Into::into),
        }
    }

    #[test]
    fn status_is_written_only_when_it_would_change() {
        let ok: Result<(), String> = Ok(());
        let bad: Result<(), String> = Err("rules[0].to[0].operation.ports: \"http\" is not a port".into());
        let now = "2026-11-25T10:00:00Z";

        // New policy: Accepted True for its generation.
        let s = desired(Some(3), None, &ok, now).unwrap();
        assert_eq!(s.observed_generation, Some(3));
        assert_eq!(s.conditions.len(), 1);
        let c = &s.conditions[0];
        assert_eq!(
            (c.status.as_str(), c.reason.as_str(), c.last_transition_time.as_deref()),
            ("True", "Accepted", Some(now))
        );

        // Same generation, same verdict: nothing to write.
        assert_eq!(desired(Some(3), Some(&s), &ok, "later"), None);

        // New generation, still accepted: observedGeneration moves, the transition time does not.
        let s4 = desired(Some(4), Some(&s), &ok, "2026-11-25T11:00:00Z").unwrap();
        assert_eq!(s4.observed_generation, Some(4));
        assert_eq!(s4.conditions[0].last_transition_time.as_deref(), Some(now));

        // Edited into something invalid: False, Invalid, the reason, and a new transition time.
        let s5 = desired(Some(5), Some(&s4), &bad, "2026-11-25T12:00:00Z").unwrap();
        let c = &s5.conditions[0];
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "Invalid"));
        assert!(c.message.contains("\"http\" is not a port") && c.message.contains("no part"), "{}", c.message);
        assert_eq!(c.last_transition_time.as_deref(), Some("2026-11-25T12:00:00Z"));

        // Conditions of other types are kept; ours is replaced, not duplicated.
        let mut mixed = PolicyStatus {
            observed_generation: Some(1),
            conditions: vec![cond("True", "Ok", "other", None), cond("False", "Invalid", "old", Some("t0"))],
        };
        mixed.conditions[0].type_ = "Ready".into();
        let s = desired(Some(2), Some(&mixed), &ok, now).unwrap();
        assert_eq!(s.conditions.iter().filter(|c| c.type_ == ACCEPTED).count(), 1);
        assert!(s.conditions.iter().any(|c| c.type_ == "Ready"));

        // Someone rewrote our condition's message: it is put back.
        let mut tampered = desired(Some(7), None, &ok, now).unwrap();
        tampered.conditions[0].message = "hand edited".into();
        assert!(desired(Some(7), Some(&tampered), &ok, now).is_some());
    }
}
