//! One status writer among the controller's replicas, chosen with a `coordination.k8s.io`
//! Lease. Every replica serves the CA and the push; only the holder of the Lease writes policy
//! status (two writers would fight over `lastTransitionTime` and patch twice).
//!
//! The holder renews the Lease every third of its duration. A replica takes it over when its
//! holder has not renewed it for a whole duration (the holder died, or cannot reach the API
//! server). Every write carries the resourceVersion read, so of two replicas taking it at once
//! the API server lets one through (409 Conflict for the other). A holder that cannot renew
//! for a whole duration stops writing before another may start.
//!
//! `decide` is pure and decides everything; `run` only reads and writes the Lease. Exercised
//! against the fake API server (tests/tests/kubernetes.rs), not yet against a real cluster.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::PostParams;
use kube::{Api, Client};

/// Which Lease, and who this replica is.
#[derive(Debug, Clone)]
pub struct Election {
    pub namespace: String,
    pub name: String,
    pub holder: String,
    pub duration: Duration,
}

/// What this replica does with the Lease as it finds it.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Ours: renew it.
    Renew,
    /// Nobody's, or its holder's has run out: take it.
    Take,
    /// Another replica holds it.
    Follow { holder: String },
}

/// `spec` as read; `now` and the renew time in microseconds since the epoch.
pub fn decide(spec: Option<&LeaseSpec>, me: &str, now_us: i64, default_duration: Duration) -> Decision {
    let Some(spec) = spec else { return Decision::Take };
    let holder = spec.holder_identity.as_deref().unwrap_or("");
    if holder.is_empty() {
        return Decision::Take;
    }
    if holder == me {
        return Decision::Renew;
    }
    let duration_us = spec
        .lease_duration_seconds
        .filter(|s| *s > 0)
        .map(|s| i64::from(s) * 1_000_000)
        .unwrap_or(default_duration.as_micros() as i64);
    let renewed_us = spec.renew_time.as_ref().or(spec.acquire_time.as_ref()).map(|t| t.0.as_microsecond());
    match renewed_us {
        Some(r) if now_us < r.saturating_add(duration_us) => Decision::Follow { holder: holder.to_owned() },
        _ => Decision::Take,
    }
}

fn now() -> jiff::Timestamp {
    jiff::Timestamp::now()
}

/// One round: reads the Lease and renews, takes or leaves it. True when this replica holds it.
async fn round(api: &Api<Lease>, e: &Election) -> Result<bool, kube::Error> {
    let current = api.get_opt(&e.name).await?;
    let t = now();
    let decision = decide(current.as_ref().and_then(|l| l.spec.as_ref()), &e.holder, t.as_microsecond(), e.duration);
    let duration_s = e.duration.as_secs().clamp(1, i32::MAX as u64) as i32;
    let conflict = |r: Result<Lease, kube::Error>| match r {
        Ok(_) => Ok(true),
        // Another replica wrote first: it holds the Lease now.
        Err(kube::Error::Api(s)) if s.is_conflict() || s.is_already_exists() => Ok(false),
        Err(e) => Err(e),
    };
    match (decision, current) {
        (Decision::Follow { .. }, _) => Ok(false),
        (_, None) => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(e.name.clone()),
                    namespace: Some(e.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(e.holder.clone()),
                    lease_duration_seconds: Some(duration_s),
                    acquire_time: Some(MicroTime(t)),
                    renew_time: Some(MicroTime(t)),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            conflict(api.create(&PostParams::default(), &lease).await)
        }
        (d, Some(mut lease)) => {
            let spec = lease.spec.get_or_insert_with(Default::default);
            if d == Decision::Take {
                spec.holder_identity = Some(e.holder.clone());
                spec.acquire_time = Some(MicroTime(t));
                spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            }
            spec.renew_time = Some(MicroTime(t));
            spec.lease_duration_seconds = Some(duration_s);
            // The resourceVersion read stays in the metadata: a write in between is a conflict.
            conflict(api.replace(&e.name, &PostParams::default(), &lease).await)
        }
    }
}

/// Keeps `leader` true while this replica holds the Lease.
pub async fn run(client: Client, e: Election, leader: tokio::sync::watch::Sender<bool>) {
    let api: Api<Lease> = Api::namespaced(client, &e.namespace);
    let mut held_since_renewal: Option<tokio::time::Instant> = None;
    loop {
        let started = tokio::time::Instant::now();
        let held = match round(&api, &e).await {
            Ok(true) => {
                held_since_renewal = Some(started);
                true
            }
            Ok(false) => {
                held_since_renewal = None;
                false
            }
            Err(err) => {
                tracing::warn!(lease = %format!("{}/{}", e.namespace, e.name), error = %err, "could not read or renew the status writer's Lease");
                // Still the holder until the Lease could have run out for the others.
                held_since_renewal.is_some_and(|r| r.elapsed() < e.duration)
            }
        };
        if held != *leader.borrow() {
            tracing::info!(
                lease = %format!("{}/{}", e.namespace, e.name),
                holder = %e.holder,
                writer = held,
                "{}",
                if held { "this replica writes policy status now" } else { "another replica writes policy status" }
            );
            leader.send_replace(held);
        }
        // Renew well within the duration; a follower looks as often, to take over promptly.
        tokio::time::sleep(e.duration / 3).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(holder: &str, renewed_s: i64, duration_s: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            renew_time: Some(MicroTime(jiff::Timestamp::from_second(renewed_s).unwrap())),
            lease_duration_seconds: Some(duration_s),
            ..Default::default()
        }
    }

    const S: i64 = 1_000_000;

    #[test]
    fn the_lease_is_renewed_by_its_holder_taken_when_run_out_and_left_alone_otherwise() {
        let d = Duration::from_secs(15);
        assert_eq!(decide(None, "a", 100 * S, d), Decision::Take, "no Lease yet");
        assert_eq!(decide(Some(&spec("a", 100, 15)), "a", 200 * S, d), Decision::Renew, "ours, even late");
        assert_eq!(
            decide(Some(&spec("b", 100, 15)), "a", 114 * S, d),
            Decision::Follow { holder: "b".into() },
            "b renewed 14 s ago"
        );
        assert_eq!(decide(Some(&spec("b", 100, 15)), "a", 115 * S, d), Decision::Take, "b's ran out");
        assert_eq!(decide(Some(&spec("", 100, 15)), "a", 101 * S, d), Decision::Take, "released");
        // The Lease's own duration counts, not this replica's.
        assert_eq!(decide(Some(&spec("b", 100, 60)), "a", 130 * S, d), Decision::Follow { holder: "b".into() });
        // No renew time: as old as it gets.
        let mut s = spec("b", 100, 15);
        s.renew_time = None;
        assert_eq!(decide(Some(&s), "a", 101 * S, d), Decision::Take);
    }
}
