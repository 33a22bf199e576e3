//! Node authentication on Kubernetes: the agent (a DaemonSet pod) sends its projected
//! service-account token; the API server's TokenReview says whether it is valid for our
//! audience, whose it is, and which node the pod is bound to. Only tokens of the agent's own
//! service account are accepted (and, in a zone, of its east-west gateway's, which make the
//! caller the gateway: its own identity only), the answer must name our audience, and the node
//! comes from the token's binding, never from the request.
//!
//! An accepted token is remembered (by its SHA-256) until it expires or for five minutes,
//! whichever is sooner, so an agent's calls cost one TokenReview per token every few minutes
//! and a token the API server stops accepting (its pod deleted, say) is refused here within
//! five minutes — unless reviews are being spent by a flood of unknown tokens, when a token
//! accepted before stays accepted until it expires rather than shutting its agent out; tokens
//! not yet known are checked at a bounded rate, so callers
//! with made-up tokens cannot turn the controller into a TokenReview flood.
//!
//! Exercised against a mock API server (tower-test) with recorded JSON; not yet against a real
//! cluster.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};

use crate::auth::{AuthError, AuthFuture, Caller, NodeAuthenticator};

/// The extra field a bound service-account token carries its node in.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";

/// Most accepted tokens remembered (one or two per node: a projected token is rotated well
/// before it expires).
const CACHE_MAX: usize = 16_384;

/// The longest an accepted token is taken without asking the API server again.
pub const REMEMBER_SECS: u64 = 300;

/// Until when (Unix seconds) an accepted token expiring at `exp` is taken without a review.
fn remember_until(exp: u64, now: u64) -> u64 {
    exp.min(now.saturating_add(REMEMBER_SECS))
}

/// TokenReviews of tokens not yet known: a burst of this many, refilled at this rate per
/// second (every agent's first call after a controller restart fits in a few seconds).
pub const REVIEW_BURST: u32 = 100;
pub const REVIEWS_PER_SECOND: u32 = 50;

/// A token bucket.
struct Bucket {
    tokens: f64,
    capacity: f64,
    per_second: f64,
    at: Instant,
}

impl Bucket {
    fn take(&mut self) -> bool {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * self.per_second).min(self.capacity);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

pub struct TokenReviewAuthenticator {
    client: kube::Client,
    audience: String,
    /// `system:serviceaccount:<namespace>:<name>` of the agent DaemonSet.
    agent_user: String,
    /// The same of the zone's east-west gateway, when this controller is in a zone.
    gateway_user: Option<String>,
    /// Token digest (SHA-256) -> (caller, review again after, expiry), Unix seconds.
    accepted: Mutex<HashMap<[u8; 32], (Caller, u64, u64)>>,
    reviews: Mutex<Bucket>,
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn digest(token: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    d.as_ref().try_into().expect("SHA-256 is 32 bytes")
}

/// The `exp` claim of a JWT, read without verifying it: the TokenReview verified the token,
/// this only bounds how long its answer is remembered.
fn expiry(token: &str) -> Option<u64> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    claims["exp"].as_u64()
}

impl TokenReviewAuthenticator {
    pub fn new(client: kube::Client, audience: &str, agent_namespace: &str, agent_service_account: &str) -> Self {
        Self::with_rate(client, audience, agent_namespace, agent_service_account, REVIEW_BURST, REVIEWS_PER_SECOND)
    }

    pub fn with_rate(
        client: kube::Client,
        audience: &str,
        agent_namespace: &str,
        agent_service_account: &str,
        burst: u32,
        per_second: u32,
    ) -> Self {
        TokenReviewAuthenticator {
            client,
            audience: audience.to_owned(),
            agent_user: format!("system:serviceaccount:{agent_namespace}:{agent_service_account}"),
            gateway_user: None,
            accepted: Mutex::new(HashMap::new()),
            reviews: Mutex::new(Bucket {
                tokens: burst as f64,
                capacity: burst as f64,
                per_second: per_second as f64,
                at: Instant::now(),
            }),
        }
    }

    /// Also accepts tokens of the zone's east-west gateway's service account (`namespace/name`),
    /// as the gateway.
    pub fn with_gateway(mut self, namespace: &str, service_account: &str) -> Self {
        self.gateway_user = Some(format!("system:serviceaccount:{namespace}:{service_account}"));
        self
    }

    async fn check(&self, token: &str) -> Result<Caller, AuthError> {
        let key = digest(token);
        let now = now_secs();
        let known = self.accepted.lock().unwrap_or_else(|e| e.into_inner()).get(&key).cloned();
        let known = known.filter(|(_, _, exp)| *exp > now);
        if let Some((caller, review_after, _)) = &known {
            if *review_after > now {
                return Ok(caller.clone());
            }
        }
        if !self.reviews.lock().unwrap_or_else(|e| e.into_inner()).take() {
            // Reviews are scarce (callers with made-up tokens spend them): a token accepted
            // before, not yet expired, stays accepted rather than shutting its agent out.
            return match known {
                Some((caller, _, _)) => Ok(caller),
                None => Err(AuthError::RateLimited),
            };
        }
        let caller = match self.review(token).await {
            Ok(caller) => caller,
            Err(e) => {
                self.accepted.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
                return Err(e);
            }
        };
        if let Some(exp) = expiry(token).filter(|e| *e > now) {
            let mut accepted = self.accepted.lock().unwrap_or_else(|e| e.into_inner());
            if accepted.len() >= CACHE_MAX {
                accepted.retain(|_, (_, _, e)| *e > now);
                if accepted.len() >= CACHE_MAX {
                    accepted.clear();
                }
            }
            accepted.insert(key, (caller.clone(), remember_until(exp, now), exp));
        }
        Ok(caller)
    }

    async fn review(&self, token: &str) -> Result<Caller, AuthError> {
        let review = TokenReview {
            spec: TokenReviewSpec { token: Some(token.to_owned()), audiences: Some(vec![self.audience.clone()]) },
            ..Default::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let done = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| AuthError::Unavailable(format!("TokenReview: {e}")))?;
        let status = done.status.ok_or(AuthError::Unknown)?;
        if status.authenticated != Some(true) {
            return Err(AuthError::Unknown);
        }
        // The answer must say the token is for us: a token minted for another audience (the
        // API server's own, say) is not a credential for the CA, and an answer that names no
        // audience does not say it is.
        if !status.audiences.as_ref().is_some_and(|auds| auds.iter().any(|a| a == &self.audience)) {
            return Err(AuthError::Unknown);
        }
        let user = status.user.ok_or(AuthError::Unknown)?;
        let gateway = match user.username.as_deref() {
            Some(u) if u == self.agent_user => false,
            Some(u) if self.gateway_user.as_deref() == Some(u) => true,
            // A valid token, but not the agent's: a workload must not mint node credentials.
            _ => return Err(AuthError::Unknown),
        };
        let node = user
            .extra
            .as_ref()
            .and_then(|e| e.get(NODE_NAME_EXTRA))
            .and_then(|v| v.first())
            .filter(|n| !n.is_empty())
            .ok_or(AuthError::NoNode)?;
        Ok(match gateway {
            true => Caller::Gateway { node: node.clone() },
            false => Caller::Node(node.clone()),
        })
    }
}

impl NodeAuthenticator for TokenReviewAuthenticator {
    fn authenticate<'a>(&'a self, credential: &'a str) -> AuthFuture<'a> {
        Box::pin(self.check(credential))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Request, Response};
    use kube::client::Body;

    /// A mock API server answering one TokenReview with `status` (recorded JSON shape).
    async fn with_review(status: serde_json::Value, token: &str) -> Result<Caller, AuthError> {
        review_by(status, token, false).await
    }

    /// As [`with_review`], by a controller that also takes its zone gateway's tokens (`zoned`).
    async fn review_by(status: serde_json::Value, token: &str, zoned: bool) -> Result<Caller, AuthError> {
        let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = kube::Client::new(svc, "default");
        let mut auth = TokenReviewAuthenticator::new(client, "sockmesh-ca", "sockmesh-system", "sockmesh-agent");
        if zoned {
            auth = auth.with_gateway("sockmesh-system", "sockmesh-gateway");
        }
        let server = tokio::spawn(async move { answer_one(&mut handle, status).await });
        let r = auth.authenticate(token).await;
        assert_eq!(server.await.unwrap(), token, "the token is what is reviewed");
        r
    }

    type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

    /// Answers the next TokenReview with `status`; returns the token it carried.
    async fn answer_one(handle: &mut Handle, status: serde_json::Value) -> String {
        {
            let (req, send) = handle.next_request().await.expect("a request");
            assert_eq!(req.method(), http::Method::POST);
            assert_eq!(req.uri().path(), "/apis/authentication.k8s.io/v1/tokenreviews");
            let body = req.into_body().collect_bytes().await.unwrap();
            let sent: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(sent["spec"]["audiences"], serde_json::json!(["sockmesh-ca"]));
            let reply = serde_json::json!({
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenReview",
                "metadata": {"creationTimestamp": null},
                "spec": sent["spec"],
                "status": status,
            });
            send.send_response(
                Response::builder().status(201).body(Body::from(serde_json::to_vec(&reply).unwrap())).unwrap(),
            );
            sent["spec"]["token"].as_str().unwrap().to_owned()
        }
    }

    /// A JWT-shaped token whose payload claims `exp` (the signature is not ours to check).
    fn token_expiring_at(exp: u64, n: u32) -> String {
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{{\"exp\":{exp},\"n\":{n}}}"));
        format!("eyJhbGciOiJSUzI1NiJ9.{payload}.c2ln")
    }

    fn agent(extra_node: Option<&str>) -> serde_json::Value {
        let mut user = serde_json::json!({
            "username": "system:serviceaccount:sockmesh-system:sockmesh-agent",
            "uid": "8d1e1a4c-0000-4000-8000-000000000001",
            "groups": ["system:serviceaccounts", "system:serviceaccounts:sockmesh-system", "system:authenticated"],
        });
        if let Some(n) = extra_node {
            user["extra"] = serde_json::json!({
                "authentication.kubernetes.io/node-name": [n],
                "authentication.kubernetes.io/pod-name": ["sockmesh-agent-x7k2p"],
            });
        }
        serde_json::json!({"authenticated": true, "audiences": ["sockmesh-ca"], "user": user})
    }

    #[tokio::test]
    async fn a_bound_agent_token_names_its_node() {
        assert_eq!(with_review(agent(Some("worker-2")), "tok-1").await.unwrap(), "worker-2");
    }

    /// In a zone, the gateway's own token makes the caller the gateway (never a node, whose
    /// workloads' identities it would then get); without a zone it is any workload's token.
    #[tokio::test]
    async fn a_zone_gateways_token_makes_the_caller_the_gateway_only_in_a_zone() {
        let gateway = || {
            let mut g = agent(Some("edge-1"));
            g["user"]["username"] = "system:serviceaccount:sockmesh-system:sockmesh-gateway".into();
            g
        };
        assert_eq!(review_by(gateway(), "gw-1", true).await.unwrap(), Caller::Gateway { node: "edge-1".into() });
        assert!(matches!(review_by(gateway(), "gw-2", false).await, Err(AuthError::Unknown)));
        // The agent's token is still a node's in a zone.
        assert_eq!(review_by(agent(Some("worker-2")), "tok-9", true).await.unwrap(), Caller::Node("worker-2".into()));
    }

    #[tokio::test]
    async fn unauthenticated_foreign_or_unbound_tokens_are_refused() {
        let denied = serde_json::json!({"authenticated": false, "error": "token has expired"});
        assert!(matches!(with_review(denied, "tok-2").await, Err(AuthError::Unknown)));
        let mut other = agent(Some("worker-2"));
        other["user"]["username"] = "system:serviceaccount:default:web".into();
        assert!(matches!(with_review(other, "tok-3").await, Err(AuthError::Unknown)));
        let mut wrong_aud = agent(Some("worker-2"));
        wrong_aud["audiences"] = serde_json::json!(["kubernetes"]);
        assert!(matches!(with_review(wrong_aud, "tok-4").await, Err(AuthError::Unknown)));
        // An answer that names no audience does not say the token is ours.
        let mut no_aud = agent(Some("worker-2"));
        no_aud.as_object_mut().unwrap().remove("audiences");
        assert!(matches!(with_review(no_aud, "tok-6").await, Err(AuthError::Unknown)));
        assert!(matches!(with_review(agent(None), "tok-5").await, Err(AuthError::NoNode)));
    }

    #[tokio::test]
    async fn an_api_error_is_unavailable_not_a_pass() {
        let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let auth = TokenReviewAuthenticator::new(
            kube::Client::new(svc, "default"),
            "sockmesh-ca",
            "sockmesh-system",
            "sockmesh-agent",
        );
        tokio::spawn(async move {
            let (_req, send) = handle.next_request().await.unwrap();
            let status = serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": "tokenreviews.authentication.k8s.io is forbidden", "reason": "Forbidden", "code": 403});
            send.send_response(
                Response::builder().status(403).body(Body::from(serde_json::to_vec(&status).unwrap())).unwrap(),
            );
        });
        assert!(matches!(auth.authenticate("tok").await, Err(AuthError::Unavailable(_))));
    }

    #[test]
    fn accepted_tokens_are_remembered_five_minutes_at_most() {
        assert_eq!(remember_until(1_000 + 3_600, 1_000), 1_000 + REMEMBER_SECS);
        assert_eq!(remember_until(1_000 + 60, 1_000), 1_000 + 60);
    }

    /// An accepted token costs one TokenReview until it expires; then it is reviewed again.
    #[tokio::test]
    async fn an_accepted_token_is_remembered_until_it_expires() {
        let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let auth = TokenReviewAuthenticator::new(
            kube::Client::new(svc, "default"),
            "sockmesh-ca",
            "sockmesh-system",
            "sockmesh-agent",
        );
        let token = token_expiring_at(now_secs() + 3600, 1);
        let server = tokio::spawn(async move {
            answer_one(&mut handle, agent(Some("worker-2"))).await;
            handle
        });
        assert_eq!(auth.authenticate(&token).await.unwrap(), "worker-2");
        handle = server.await.unwrap();
        for _ in 0..3 {
            // No request reaches the API: a second one would wait for an answer for ever.
            let r = tokio::time::timeout(std::time::Duration::from_secs(2), auth.authenticate(&token)).await;
            assert_eq!(r.expect("answered from memory").unwrap(), "worker-2");
        }
        // A token that has expired (by its claim) is not remembered: each call reviews it.
        let old = token_expiring_at(now_secs() - 10, 2);
        for _ in 0..2 {
            let server = tokio::spawn(async move {
                answer_one(&mut handle, agent(Some("worker-2"))).await;
                handle
            });
            auth.authenticate(&old).await.unwrap();
            handle = server.await.unwrap();
        }
        drop(handle);
    }

    /// Tokens not yet known are reviewed at a bounded rate: beyond it a caller is told to retry,
    /// and no request reaches the API.
    #[tokio::test]
    async fn reviews_of_unknown_tokens_are_rate_limited() {
        let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = kube::Client::new(svc, "default");
        let auth =
            TokenReviewAuthenticator::with_rate(client, "sockmesh-ca", "sockmesh-system", "sockmesh-agent", 2, 0);
        let denied = serde_json::json!({"authenticated": false, "error": "invalid token"});
        for n in 0..2 {
            let server = tokio::spawn({
                let denied = denied.clone();
                async move {
                    answer_one(&mut handle, denied).await;
                    handle
                }
            });
            assert!(matches!(auth.authenticate(&format!("made-up-{n}")).await, Err(AuthError::Unknown)));
            handle = server.await.unwrap();
        }
        let r = tokio::time::timeout(std::time::Duration::from_secs(2), auth.authenticate("made-up-3")).await;
        let e = r.expect("refused without a request").unwrap_err();
        assert!(matches!(e, AuthError::RateLimited), "{e}");
        assert_eq!(e.status().code(), tonic::Code::Unavailable);
        drop(handle);
    }

    /// A token accepted before and not yet expired stays accepted when the reviews are spent
    /// (a flood of made-up tokens cannot shut a real agent out); with a review to spend it is
    /// reviewed again, and refused and forgotten if the API server no longer accepts it.
    #[tokio::test]
    async fn a_known_token_outlives_a_review_flood_but_not_a_refusal() {
        let token = token_expiring_at(now_secs() + 3600, 7);
        let known = |auth: &TokenReviewAuthenticator| {
            let due = (Caller::Node("worker-2".into()), now_secs() - 1, now_secs() + 3600);
            auth.accepted.lock().unwrap().insert(digest(&token), due);
        };
        let denied = serde_json::json!({"authenticated": false, "error": "invalid token"});

        let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = kube::Client::new(svc, "default");
        let auth =
            TokenReviewAuthenticator::with_rate(client, "sockmesh-ca", "sockmesh-system", "sockmesh-agent", 1, 0);
        known(&auth);
        let server = tokio::spawn({
            let denied = denied.clone();
            async move {
                answer_one(&mut handle, denied).await;
                handle
            }
        });
        assert!(matches!(auth.authenticate("made-up").await, Err(AuthError::Unknown)));
        let handle = server.await.unwrap();
        let r = tokio::time::timeout(std::time::Duration::from_secs(2), auth.authenticate(&token)).await;
        assert_eq!(r.expect("answered without a request").unwrap(), "worker-2");
        drop(handle);

        let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = kube::Client::new(svc, "default");
        let auth =
            TokenReviewAuthenticator::with_rate(client, "sockmesh-ca", "sockmesh-system", "sockmesh-agent", 1, 0);
        known(&auth);
        let server = tokio::spawn(async move {
            answer_one(&mut handle, denied).await;
            handle
        });
        assert!(matches!(auth.authenticate(&token).await, Err(AuthError::Unknown)));
        drop(server.await.unwrap());
        assert!(auth.accepted.lock().unwrap().is_empty(), "a refused token is forgotten");
    }
}
