//! The generated roots of Meshes without `spec.ca`, kept in Secrets that every controller
//! replica reads. A replica's state directory is its own (an `emptyDir`, lost with the pod):
//! a root kept there would differ between replicas, and change when a replica is rescheduled,
//! and every agent of the mesh would then distrust half of its peers.
//!
//! The first replica to need a mesh's root generates it and creates the Secret
//! `sockmesh-root-<mesh>` (type `kubernetes.io/tls`) in the controller's namespace. Create is
//! atomic on the API server: of two replicas doing it at once, one gets 409 AlreadyExists and
//! reads the winner's root instead of using its own. No Lease is needed for that.
//!
//! The Secret is the mesh's root from then on; it is never rewritten. Deleting it makes the
//! next replica that admits the mesh generate a new root: every certificate of that mesh must
//! then be renewed, and replicas that still hold the old one disagree until they restart (say
//! so before doing it: `kubectl rollout restart deployment/sockmesh-controller`).
//!
//! Exercised with recorded answers (below) and against the fake API server
//! (tests/tests/kubernetes.rs), not yet against a real cluster.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use kube::api::PostParams;
use kube::{Api, Client};
use mesh_identity::ca::Ca;

use crate::meshes::RootError;

/// The annotation naming the trust domain a kept root was generated for.
pub const TRUST_DOMAIN_ANNOTATION: &str = "sockmesh.io/trust-domain";
/// The label naming the mesh whose root a Secret holds.
pub const MESH_ROOT_LABEL: &str = "sockmesh.io/mesh-root";

/// How long one mesh's reads and create may take together.
pub const CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The Secret holding `mesh`'s generated root.
pub fn secret_name(mesh: &str) -> String {
    format!("sockmesh-root-{mesh}")
}

/// The Secrets of one namespace (the controller's).
pub struct Secrets {
    api: Api<Secret>,
    namespace: String,
}

impl Secrets {
    pub fn new(client: Client, namespace: &str) -> Secrets {
        Secrets { api: Api::namespaced(client, namespace), namespace: namespace.to_owned() }
    }

    /// An API error: the server's refusal is said as it is (trying again would not change it),
    /// anything else (no answer, overloaded) is worth another try.
    fn api_error(&self, name: &str, e: kube::Error) -> RootError {
        let what = format!("reading or creating Secret {}/{name}", self.namespace);
        match &e {
            kube::Error::Api(s) if s.code == 403 => RootError::Bad(format!(
                "{what}: {e}; the controller's service account needs get and create on Secrets in {} (deploy/controller.yaml's Role)",
                self.namespace
            )),
            // 401: this replica's credentials were refused (a token being rotated, say): brief.
            kube::Error::Api(s) if (400..500).contains(&s.code) && ![401, 408, 429].contains(&s.code) => {
                RootError::Bad(format!("{what}: {e}"))
            }
            _ => RootError::Unreachable(format!("{what}: {e}")),
        }
    }

    /// `mesh`'s root (certificate, key): the Secret's, or generated and kept in a new Secret.
    /// An API server that does not answer within [`CALL_TIMEOUT`] is one to try again later.
    pub async fn get_or_create(&self, mesh: &str, trust_domain: &str) -> Result<(String, String), RootError> {
        match tokio::time::timeout(CALL_TIMEOUT, self.get_or_create_now(mesh, trust_domain)).await {
            Ok(r) => r,
            Err(_) => Err(RootError::Unreachable(format!(
                "reading or creating Secret {}/{}: no answer from the API server within {} s",
                self.namespace,
                secret_name(mesh),
                CALL_TIMEOUT.as_secs()
            ))),
        }
    }

    async fn get_or_create_now(&self, mesh: &str, trust_domain: &str) -> Result<(String, String), RootError> {
        let name = secret_name(mesh);
        if let Some(s) = self.api.get_opt(&name).await.map_err(|e| self.api_error(&name, e))? {
            return self.parse(&name, mesh, trust_domain, &s);
        }
        let root = Ca::generate_root(trust_domain).map_err(|e| RootError::Bad(format!("generating a root: {e}")))?;
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(self.namespace.clone()),
                labels: Some(BTreeMap::from([
                    ("app.kubernetes.io/managed-by".to_owned(), "sockmesh-controller".to_owned()),
                    (MESH_ROOT_LABEL.to_owned(), mesh.to_owned()),
                ])),
                annotations: Some(BTreeMap::from([(TRUST_DOMAIN_ANNOTATION.to_owned(), trust_domain.to_owned())])),
                ..Default::default()
            },
            type_: Some("kubernetes.io/tls".into()),
            data: Some(BTreeMap::from([
                ("tls.crt".to_owned(), ByteString(root.cert_pem.clone().into_bytes())),
                ("tls.key".to_owned(), ByteString(root.key_pem.clone().into_bytes())),
            ])),
            ..Default::default()
        };
        match self.api.create(&PostParams::default(), &secret).await {
            Ok(_) => {
                tracing::info!(mesh, trust_domain, secret = %format!("{}/{name}", self.namespace), "generated a new root CA for the mesh, kept in a Secret");
                Ok((root.cert_pem, root.key_pem))
            }
            // Another replica created it first: its root is the mesh's.
            Err(kube::Error::Api(s)) if s.is_already_exists() => {
                let s = self.api.get(&name).await.map_err(|e| self.api_error(&name, e))?;
                self.parse(&name, mesh, trust_domain, &s)
            }
            Err(e) => Err(self.api_error(&name, e)),
        }
    }

    fn parse(&self, name: &str, mesh: &str, trust_domain: &str, s: &Secret) -> Result<(String, String), RootError> {
        let what = format!("Secret {}/{name}", self.namespace);
        let fix = format!(
            "it keeps mesh {mesh}'s generated root: restore it, or delete it to have a new root generated (every certificate of the mesh is then renewed under the new one)"
        );
        let kept_for = s.metadata.annotations.as_ref().and_then(|a| a.get(TRUST_DOMAIN_ANNOTATION));
        if let Some(td) = kept_for.filter(|td| *td != trust_domain) {
            return Err(RootError::Bad(format!(
                "{what} holds a root generated for trust domain {td:?}, but the Mesh says {trust_domain:?}; delete the Secret to have a root generated for {trust_domain:?}"
            )));
        }
        let field = |key: &str| -> Result<String, RootError> {
            let bytes = s.data.as_ref().and_then(|d| d.get(key)).map(|b| b.0.clone());
            let bytes = bytes.ok_or_else(|| RootError::Bad(format!("{what} has no {key}; {fix}")))?;
            String::from_utf8(bytes).map_err(|_| RootError::Bad(format!("{what}: {key} is not PEM text; {fix}")))
        };
        Ok((field("tls.crt")?, field("tls.key")?))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use http::{Request, Response};
    use kube::client::Body;
    use serde_json::{json, Value};

    use super::*;

    fn respond(code: u16, body: &Value) -> Response<Body> {
        Response::builder()
            .status(code)
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(body).unwrap()))
            .unwrap()
    }

    fn status(code: u16, reason: &str) -> Value {
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "reason": reason, "message": reason, "code": code})
    }

    fn secret(cert: &str, key: &str, td: &str) -> Value {
        use base64::Engine;
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "sockmesh-root-pay", "namespace": "sockmesh-system", "resourceVersion": "7", "annotations": {TRUST_DOMAIN_ANNOTATION: td}},
            "type": "kubernetes.io/tls",
            "data": {"tls.crt": b64(cert), "tls.key": b64(key)},
        })
    }

    /// An answer, given the request's method, path and body.
    type Answer = Box<dyn Fn(&str, &str, &Value) -> Response<Body> + Send>;
    /// The requests seen: method, path, body.
    type Seen = Arc<Mutex<Vec<(String, String, Value)>>>;

    /// A mock API server answering each request with the next of `answers`; the requests are
    /// kept.
    fn api(answers: Vec<Answer>) -> (Secrets, Seen) {
        let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            for answer in answers {
                let Some((req, send)) = handle.next_request().await else { return };
                let (method, path) = (req.method().to_string(), req.uri().path().to_owned());
                let bytes = req.into_body().collect_bytes().await.unwrap();
                let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                send.send_response(answer(&method, &path, &body));
                log.lock().unwrap().push((method, path, body));
            }
        });
        (Secrets::new(Client::new(svc, "default"), "sockmesh-system"), seen)
    }

    const PATH: &str = "/api/v1/namespaces/sockmesh-system/secrets/sockmesh-root-pay";

    /// The first replica finds no Secret, generates a root and creates it; the root it uses is
    /// the one it stored.
    #[tokio::test]
    async fn a_missing_root_is_generated_and_kept_in_a_secret() {
        let (s, seen) = api(vec![
            Box::new(|_, _, _| respond(404, &status(404, "NotFound"))),
            Box::new(|_, _, body| {
                let mut b = body.clone();
                b["metadata"]["resourceVersion"] = json!("1");
                respond(201, &b)
            }),
        ]);
        let (cert, key) = s.get_or_create("pay", "pay.example").await.ok().unwrap();
        let seen = seen.lock().unwrap();
        assert_eq!((seen[0].0.as_str(), seen[0].1.as_str()), ("GET", PATH));
        let (m, p, body) = &seen[1];
        assert_eq!((m.as_str(), p.as_str()), ("POST", "/api/v1/namespaces/sockmesh-system/secrets"));
        assert_eq!(body["metadata"]["name"], "sockmesh-root-pay");
        assert_eq!(body["metadata"]["annotations"][TRUST_DOMAIN_ANNOTATION], "pay.example");
        assert_eq!(body["type"], "kubernetes.io/tls");
        let stored: Secret = serde_json::from_value(body.clone()).unwrap();
        let data = stored.data.unwrap();
        assert_eq!(data["tls.crt"].0, cert.as_bytes());
        assert_eq!(data["tls.key"].0, key.as_bytes());
        assert!(Ca::from_pem("pay.example", &cert, &key, "", Default::default(), Default::default()).is_ok());
    }

    /// Two replicas at once: this one's create loses (409 AlreadyExists), and it uses the
    /// winner's root, read back, not the one it generated.
    #[tokio::test]
    async fn a_replica_that_loses_the_race_uses_the_winners_root() {
        let winner = Ca::generate_root("pay.example").unwrap();
        let kept = secret(&winner.cert_pem, &winner.key_pem, "pay.example");
        let (s, seen) = api(vec![
            Box::new(|_, _, _| respond(404, &status(404, "NotFound"))),
            Box::new(|_, _, _| respond(409, &status(409, "AlreadyExists"))),
            Box::new(move |_, _, _| respond(200, &kept)),
        ]);
        let (cert, key) = s.get_or_create("pay", "pay.example").await.ok().unwrap();
        assert_eq!((cert, key), (winner.cert_pem, winner.key_pem));
        assert_eq!(seen.lock().unwrap().iter().map(|r| r.0.as_str()).collect::<Vec<_>>(), ["GET", "POST", "GET"]);
    }

    /// A kept root is used as it is; one kept for another trust domain, or without its key, is
    /// refused with what to do; an API server that does not answer is worth another try, one
    /// that refuses (RBAC) is not.
    #[tokio::test]
    async fn kept_roots_are_checked_and_an_unreachable_server_is_retried() {
        let root = Ca::generate_root("pay.example").unwrap();
        let (ok, other_td, keyless) = (
            secret(&root.cert_pem, &root.key_pem, "pay.example"),
            secret(&root.cert_pem, &root.key_pem, "old.example"),
            {
                let mut s = secret(&root.cert_pem, &root.key_pem, "pay.example");
                s["data"].as_object_mut().unwrap().remove("tls.key");
                s
            },
        );
        let (s, seen) = api(vec![
            Box::new(move |_, _, _| respond(200, &ok)),
            Box::new(move |_, _, _| respond(200, &other_td)),
            Box::new(move |_, _, _| respond(200, &keyless)),
            Box::new(|_, _, _| respond(500, &status(500, "InternalError"))),
            Box::new(|_, _, _| respond(403, &status(403, "Forbidden"))),
        ]);
        assert_eq!(s.get_or_create("pay", "pay.example").await.ok().unwrap(), (root.cert_pem, root.key_pem));
        match s.get_or_create("pay", "pay.example").await {
            Err(RootError::Bad(e)) => assert!(
                e.contains("sockmesh-system/sockmesh-root-pay")
                    && e.contains("\"old.example\"")
                    && e.contains("delete the Secret"),
                "{e}"
            ),
            _ => panic!("a root of another trust domain was used"),
        }
        match s.get_or_create("pay", "pay.example").await {
            Err(RootError::Bad(e)) => assert!(e.contains("has no tls.key") && e.contains("restore it"), "{e}"),
            _ => panic!("a Secret without its key was used"),
        }
        assert!(matches!(s.get_or_create("pay", "pay.example").await, Err(RootError::Unreachable(_))));
        // Refused by RBAC: said, with what to grant, not tried again and again.
        match s.get_or_create("pay", "pay.example").await {
            Err(RootError::Bad(e)) => assert!(e.contains("needs get and create on Secrets in sockmesh-system"), "{e}"),
            _ => panic!("a 403 was taken for an API server that did not answer"),
        }
        // Nothing was written over a kept root.
        assert!(seen.lock().unwrap().iter().all(|r| r.0 == "GET"));
    }
}

/// The keeper with its roots in Secrets: while the API server does not answer, the meshes
/// whose root is unknown are not accepted yet (no verdict written), the store is asked once
/// per admission, not once per mesh, and the keeper admits again soon; once the Secrets are
/// read, the meshes are accepted with their roots.
#[cfg(test)]
mod keeper_tests {
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use http::{Request, Response};
    use kube::client::Body;
    use mesh_model::MeshSpec;
    use serde_json::{json, Value};

    use super::*;
    use crate::meshes::{Keeper, RootStore, RETRY_UNANSWERED};
    use crate::model::Model;

    fn kept(mesh: &str, td: &str, root: &mesh_identity::ca::GeneratedRoot) -> Value {
        use base64::Engine;
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": secret_name(mesh), "namespace": "sockmesh-system", "annotations": {TRUST_DOMAIN_ANNOTATION: td}},
            "type": "kubernetes.io/tls", "data": {"tls.crt": b64(&root.cert_pem), "tls.key": b64(&root.key_pem)},
        })
    }

    #[tokio::test]
    async fn an_unanswered_root_is_not_accepted_yet_and_is_tried_again() {
        let (pay, shop) = (Ca::generate_root("pay.example").unwrap(), Ca::generate_root("shop.example").unwrap());
        let answers = vec![
            (503, json!({"kind": "Status", "code": 503, "reason": "ServiceUnavailable", "message": "etcd"})),
            (200, kept("pay", "pay.example", &pay)),
            (200, kept("shop", "shop.example", &shop)),
        ];
        let asked = Arc::new(AtomicUsize::new(0));
        let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let count = asked.clone();
        tokio::spawn(async move {
            for (code, body) in answers {
                let Some((_, send)) = handle.next_request().await else { return };
                count.fetch_add(1, Ordering::SeqCst);
                send.send_response(
                    Response::builder().status(code).body(Body::from(serde_json::to_vec(&body).unwrap())).unwrap(),
                );
            }
        });
        let store = RootStore::Secrets(Box::new(Secrets::new(Client::new(svc, "default"), "sockmesh-system")));
        let (_, default) = crate::meshes::test_ca("cluster.local");
        let day = Duration::from_secs(86_400);
        let mut keeper = Keeper::new(store, default, day, day);
        let model = || {
            let mut m = Model::default();
            for (name, td) in [("pay", "pay.example"), ("shop", "shop.example")] {
                m.admit_mesh(name, &MeshSpec { trust_domain: td.into(), ..Default::default() }, "Mesh".into());
            }
            m.set_namespaces(&BTreeMap::from([(
                "till".to_owned(),
                BTreeMap::from([(mesh_model::mesh::MESH_LABEL.to_owned(), "pay".to_owned())]),
            )]));
            m
        };
        let mut m = model();
        keeper.admit(&mut m).await;
        assert!(keeper.pending(), "admitted as if the meshes had no root");
        assert_eq!(keeper.retry, Some(RETRY_UNANSWERED));
        assert!(m.meshes.is_empty(), "accepted without a root: {:?}", m.meshes.keys());
        assert!(m.errors.iter().any(|e| e.contains("Mesh shop not accepted yet")), "{:?}", m.errors);
        assert_eq!(keeper.verdicts.get("pay"), None, "a verdict from an API server that did not answer");
        assert_eq!(asked.load(Ordering::SeqCst), 1, "asked again for the second mesh in the same admission");

        let mut m = model();
        let signers = keeper.admit(&mut m).await;
        assert!(!keeper.pending() && keeper.retry.is_none());
        assert_eq!(keeper.verdicts.get("pay"), Some(Ok(())));
        assert_eq!(m.mesh_records["pay"].roots, [pay.cert_pem.trim().to_owned() + "\n"]);
        assert_eq!(signers.for_trust_domain("shop.example").unwrap().mesh, "shop");
    }
}
