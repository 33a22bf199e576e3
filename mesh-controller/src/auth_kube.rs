//! Node authentication on Kubernetes: the agent (a DaemonSet pod) sends its projected
//! service-account token; the API server's TokenReview says whether it is valid for our
//! audience, whose it is, and which node the pod is bound to. Only tokens of the agent's own
//! service account are accepted, and the node comes from the token's binding, never from the
//! request.
//!
//! Exercised against a mock API server (tower-test) with recorded JSON; not yet against a real
//! cluster.

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};

use crate::auth::{AuthError, AuthFuture, NodeAuthenticator};

/// The extra field a bound service-account token carries its node in.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";

pub struct TokenReviewAuthenticator {
    client: kube::Client,
    audience: String,
    /// `system:serviceaccount:<namespace>:<name>` of the agent DaemonSet.
    agent_user: String,
}

impl TokenReviewAuthenticator {
    pub fn new(client: kube::Client, audience: &str, agent_namespace: &str, agent_service_account: &str) -> Self {
        TokenReviewAuthenticator {
            client,
            audience: audience.to_owned(),
            agent_user: format!("system:serviceaccount:{agent_namespace}:{agent_service_account}"),
        }
    }

    async fn review(&self, token: &str) -> Result<String, AuthError> {
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
        if let Some(auds) = &status.audiences {
            if !auds.iter().any(|a| a == &self.audience) {
                return Err(AuthError::Unknown);
            }
        }
        let user = status.user.ok_or(AuthError::Unknown)?;
        if user.username.as_deref() != Some(self.agent_user.as_str()) {
            // A valid token, but not the agent's: a workload must not mint node credentials.
            return Err(AuthError::Unknown);
        }
        let node = user
            .extra
            .as_ref()
            .and_then(|e| e.get(NODE_NAME_EXTRA))
            .and_then(|v| v.first())
            .filter(|n| !n.is_empty())
            .ok_or(AuthError::NoNode)?;
        Ok(node.clone())
    }
}

impl NodeAuthenticator for TokenReviewAuthenticator {
    fn authenticate<'a>(&'a self, credential: &'a str) -> AuthFuture<'a> {
        Box::pin(self.review(credential))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Request, Response};
    use kube::client::Body;

    /// A mock API server answering one TokenReview with `status` (recorded JSON shape).
    async fn with_review(status: serde_json::Value, token: &str) -> Result<String, AuthError> {
        let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = kube::Client::new(svc, "default");
        let auth = TokenReviewAuthenticator::new(client, "sockmesh-ca", "sockmesh-system", "sockmesh-agent");
        let server = tokio::spawn(async move {
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
        });
        let r = auth.authenticate(token).await;
        assert_eq!(server.await.unwrap(), token, "the token is what is reviewed");
        r
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
}
