//! The Kubernetes source against a mock API server answering with recorded JSON: list, watch
//! events (added, modified, deleted), a 410 Gone that forces a re-list, and equivalence with
//! the local directory source.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use kube::client::Body;
use serde_json::{json, Value};

use super::*;

fn pod(name: &str, node: &str, sa: &str, ip: &str, app: &str, rv: u32) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "resourceVersion": rv.to_string(), "labels": {"app": app}, "uid": format!("uid-{name}")},
        "spec": {"nodeName": node, "serviceAccountName": sa, "containers": [{"name": "app", "image": "app:1"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
    })
}

fn list(kind: &str, api_version: &str, rv: u32, items: Vec<Value>) -> Value {
    json!({"apiVersion": api_version, "kind": kind, "metadata": {"resourceVersion": rv.to_string()}, "items": items})
}

fn events(evs: &[(&str, Value)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (t, o) in evs {
        out.extend(serde_json::to_vec(&json!({"type": t, "object": o})).unwrap());
        out.push(b'\n');
    }
    out
}

fn ok(body: Vec<u8>) -> Response<Body> {
    Response::builder().status(200).header("content-type", "application/json").body(Body::from(body)).unwrap()
}

const DENY: &str = r#"{"selector": {"matchLabels": {"app": "b"}}, "action": "DENY", "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/default/sa/sa-a"]}}]}]}"#;

/// The API server: scripted answers per resource; later watches are held open (never answered).
async fn api_server(
    mut handle: tower_test::mock::Handle<Request<Body>, Response<Body>>,
    pod_lists: Arc<Mutex<u32>>,
    go_410: Arc<tokio::sync::Notify>,
) {
    let mut pod_watches = 0;
    let mut held = Vec::new();
    let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default", "resourceVersion": "5", "labels": {MESH_LABEL: MESH_ENABLED}}});
    let other_ns =
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "kube-system", "resourceVersion": "6"}});
    let ap = json!({"apiVersion": "security.sockmesh.io/v1alpha1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny-a", "namespace": "default", "resourceVersion": "7", "generation": 1}, "spec": serde_json::from_str::<Value>(DENY).unwrap()});
    while let Some((req, send)) = handle.next_request().await {
        let path = req.uri().path().to_owned();
        let watch = req.uri().query().unwrap_or("").contains("watch=true");
        if req.method() == http::Method::PATCH {
            let (_, body) = patched(req, std::slice::from_ref(&ap)).await;
            send.send_response(ok(serde_json::to_vec(&body).unwrap()));
            continue;
        }
        match (path.as_str(), watch) {
            ("/api/v1/namespaces", false) => send.send_response(ok(serde_json::to_vec(&list(
                "NamespaceList",
                "v1",
                10,
                vec![ns.clone(), other_ns.clone()],
            ))
            .unwrap())),
            ("/api/v1/pods", false) => {
                let n = {
                    let mut l = pod_lists.lock().unwrap();
                    *l += 1;
                    *l
                };
                let items = if n == 1 {
                    vec![pod("a", "n1", "sa-a", "10.0.0.1", "a", 100)]
                } else {
                    // After the 410: the re-list shows what happened meanwhile (d appeared).
                    vec![
                        pod("a", "n1", "sa-a", "10.0.0.1", "a2", 150),
                        pod("b", "n2", "sa-b", "10.0.0.2", "b", 120),
                        pod("d", "n2", "sa-d", "10.0.0.4", "d", 190),
                    ]
                };
                send.send_response(ok(serde_json::to_vec(&list("PodList", "v1", 100 * n, items)).unwrap()));
            }
            ("/api/v1/pods", true) => {
                pod_watches += 1;
                match pod_watches {
                    1 => send.send_response(ok(events(&[
                        ("ADDED", pod("b", "n2", "sa-b", "10.0.0.2", "b", 120)),
                        ("ADDED", pod("c", "n2", "sa-c", "10.0.0.3", "c", 130)),
                        ("MODIFIED", pod("a", "n1", "sa-a", "10.0.0.1", "a2", 140)),
                        ("DELETED", pod("c", "n2", "sa-c", "10.0.0.3", "c", 145)),
                    ]))),
                    2 => {
                        // Only once the test has seen the watch's events applied.
                        go_410.notified().await;
                        send.send_response(ok(events(&[(
                        "ERROR",
                        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": "too old resource version: 145 (180)", "reason": "Expired", "code": 410}),
                    )])))
                    }
                    _ => held.push(send),
                }
            }
            ("/apis/security.sockmesh.io/v1alpha1/authorizationpolicies", false) => {
                send.send_response(ok(serde_json::to_vec(&list(
                    "AuthorizationPolicyList",
                    "security.sockmesh.io/v1alpha1",
                    20,
                    vec![ap.clone()],
                ))
                .unwrap()))
            }
            ("/apis/security.sockmesh.io/v1alpha1/peerauthentications", false) => send.send_response(ok(
                serde_json::to_vec(&list("PeerAuthenticationList", "security.sockmesh.io/v1alpha1", 30, vec![]))
                    .unwrap(),
            )),
            (_, true) => held.push(send),
            (p, _) => panic!("unexpected request {p}"),
        }
    }
}

/// A status PATCH: (path, the merge patch's status), and the object as the server would return it.
async fn patched(req: Request<Body>, objects: &[Value]) -> ((String, Value), Value) {
    let path = req.uri().path().to_owned();
    assert!(path.ends_with("/status"), "only status is ever patched, not {path}");
    let bytes = req.into_body().collect_bytes().await.unwrap();
    let patch: Value = serde_json::from_slice(&bytes).unwrap();
    let name = path.trim_end_matches("/status").rsplit('/').next().unwrap().to_owned();
    let mut obj =
        objects.iter().find(|o| o["metadata"]["name"] == name.as_str()).expect("patch of a known object").clone();
    obj["status"] = patch["status"].clone();
    ((path, patch["status"].clone()), obj)
}

/// Waits until the model has exactly `want` workloads and pod a's app label is `app_a`.
async fn reach(
    rx: &mut tokio::sync::watch::Receiver<Arc<Model>>,
    want: &[&str],
    app_a: &str,
) -> Result<Arc<Model>, tokio::time::error::Elapsed> {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            {
                let m = rx.borrow_and_update().clone();
                let names: Vec<&str> = m.workloads.keys().map(|k| k.name.as_str()).collect();
                let label = m.workloads.values().find(|w| w.name == "a").map(|w| w.labels["app"].clone());
                if names == want && label.as_deref() == Some(app_a) {
                    return m;
                }
            }
            rx.changed().await.unwrap();
        }
    })
    .await
}

#[tokio::test]
async fn lists_watches_resyncs_after_410_and_matches_the_local_directory() {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(svc, "default");
    let pod_lists = Arc::new(Mutex::new(0));
    let go_410 = Arc::new(tokio::sync::Notify::new());
    tokio::spawn(api_server(handle, pod_lists.clone(), go_410.clone()));
    let (tx, mut rx) = tokio::sync::watch::channel(Arc::new(Model::default()));
    tokio::spawn(run(client, tx));

    // The list, then the watch: b ADDED, c ADDED then DELETED, a MODIFIED (app=a2).
    reach(&mut rx, &["a", "b"], "a2").await.expect("watch events were not applied");
    assert_eq!(*pod_lists.lock().unwrap(), 1);
    // 410 Gone: the watcher re-lists and finds d, which appeared meanwhile.
    go_410.notify_one();
    let m = reach(&mut rx, &["a", "b", "d"], "a2").await.expect("the model never reached the re-listed state");
    assert_eq!(*pod_lists.lock().unwrap(), 2, "the 410 did not cause a re-list");
    assert_eq!(m.authz.len(), 1);

    // The same state written as a local directory gives the same model.
    let dir = tempfile::tempdir().unwrap();
    let mut yaml = String::new();
    for (name, node, sa, ip, app) in [
        ("a", "n1", "sa-a", "10.0.0.1", "a2"),
        ("b", "n2", "sa-b", "10.0.0.2", "b"),
        ("d", "n2", "sa-d", "10.0.0.4", "d"),
    ] {
        yaml.push_str(&format!("kind: Workload\nname: {name}\nnamespace: default\nserviceAccount: {sa}\nlabels: {{app: {app}}}\nips: [{ip}]\nnode: {node}\n---\n"));
    }
    yaml.push_str(&format!("apiVersion: security.sockmesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: deny-a, namespace: default}}\nspec: {DENY}\n"));
    std::fs::write(dir.path().join("mesh.yaml"), yaml).unwrap();
    let (ltx, mut lrx) = tokio::sync::watch::channel(Arc::new(Model::default()));
    tokio::spawn(crate::config_dir::watch(Some(dir.path().to_owned()), None, ltx));
    lrx.changed().await.unwrap();
    let local = lrx.borrow().clone();
    assert!(local.errors.is_empty(), "{:?}", local.errors);
    assert_eq!(local.workloads, m.workloads);
    assert_eq!(local.authz, m.authz);
    assert_eq!(local.peer_auth, m.peer_auth);
    let _ = BTreeMap::<u8, u8>::new();
}

#[test]
fn only_scheduled_addressed_pods_of_meshed_namespaces_are_workloads() {
    let meshed = std::collections::BTreeSet::from(["default".to_string()]);
    let p = |v: Value| serde_json::from_value::<Pod>(v).unwrap();
    assert!(workload_of(&p(pod("a", "n1", "sa-a", "10.0.0.1", "a", 1)), &meshed).is_some());
    let mut other = pod("a", "n1", "sa-a", "10.0.0.1", "a", 1);
    other["metadata"]["namespace"] = "kube-system".into();
    assert!(workload_of(&p(other), &meshed).is_none());
    let mut host = pod("a", "n1", "sa-a", "10.0.0.1", "a", 1);
    host["spec"]["hostNetwork"] = true.into();
    assert!(workload_of(&p(host), &meshed).is_none());
    let mut pending = pod("a", "n1", "sa-a", "10.0.0.1", "a", 1);
    pending["status"] = json!({"phase": "Pending"});
    assert!(workload_of(&p(pending), &meshed).is_none());
    let mut done = pod("a", "n1", "sa-a", "10.0.0.1", "a", 1);
    done["status"]["phase"] = "Succeeded".into();
    assert!(workload_of(&p(done), &meshed).is_none());
    let mut nosa = pod("a", "n1", "sa-a", "10.0.0.1", "a", 1);
    nosa["spec"].as_object_mut().unwrap().remove("serviceAccountName");
    assert_eq!(workload_of(&p(nosa), &meshed).unwrap().service_account, "default");
}

/// Status write-back: each policy gets `Accepted` True/False for the generation read, an invalid
/// one says why, one already up to date is not written, a new generation is written again, and
/// nothing is written twice.
#[tokio::test]
async fn policies_get_an_accepted_condition_for_the_generation_read() {
    let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(svc, "default");
    let ap = |name: &str, gen: i64, rv: u32, spec: &str, status: Value| {
        json!({"apiVersion": "security.sockmesh.io/v1alpha1", "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": "default", "resourceVersion": rv.to_string(), "generation": gen},
            "spec": serde_json::from_str::<Value>(spec).unwrap(), "status": status})
    };
    let current = json!({"observedGeneration": 1, "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted",
        "message": "in force on the nodes running the workloads it selects", "lastTransitionTime": "2026-11-01T00:00:00Z"}]});
    let good = ap("good", 3, 11, DENY, Value::Null);
    let bad = ap("bad", 2, 12, r#"{"rules": [{"to": [{"operation": {"ports": ["http"]}}]}]}"#, Value::Null);
    let settled = ap("settled", 1, 13, DENY, current.clone());
    let pa_bad = json!({"apiVersion": "security.sockmesh.io/v1alpha1", "kind": "PeerAuthentication",
        "metadata": {"name": "pa-bad", "namespace": "default", "resourceVersion": "14", "generation": 1},
        "spec": {"portLevelMtls": {"8080": {"mode": "PERMISSIVE"}}}});
    // `settled` edited to generation 2, arriving as a watch event once the first writes are in.
    let settled_v2 = ap("settled", 2, 15, DENY, current.clone());
    let objects = vec![good.clone(), bad.clone(), settled.clone(), pa_bad.clone()];

    let (patches_tx, mut patches) = tokio::sync::mpsc::unbounded_channel::<(String, Value)>();
    let edit = Arc::new(tokio::sync::Notify::new());
    let edit2 = edit.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        let mut ap_watches = 0;
        while let Some((req, send)) = handle.next_request().await {
            let watch = req.uri().query().unwrap_or("").contains("watch=true");
            let path = req.uri().path().to_owned();
            if req.method() == http::Method::PATCH {
                let (rec, obj) = patched(req, &objects).await;
                patches_tx.send(rec).unwrap();
                send.send_response(ok(serde_json::to_vec(&obj).unwrap()));
                continue;
            }
            let g = "security.sockmesh.io/v1alpha1";
            match (path.as_str(), watch) {
                ("/api/v1/namespaces", false) => {
                    send.send_response(ok(serde_json::to_vec(&list("NamespaceList", "v1", 1, vec![])).unwrap()))
                }
                ("/api/v1/pods", false) => {
                    send.send_response(ok(serde_json::to_vec(&list("PodList", "v1", 1, vec![])).unwrap()))
                }
                ("/apis/security.sockmesh.io/v1alpha1/authorizationpolicies", false) => {
                    send.send_response(ok(serde_json::to_vec(&list(
                        "AuthorizationPolicyList",
                        g,
                        20,
                        vec![good.clone(), bad.clone(), settled.clone()],
                    ))
                    .unwrap()))
                }
                ("/apis/security.sockmesh.io/v1alpha1/peerauthentications", false) => send.send_response(ok(
                    serde_json::to_vec(&list("PeerAuthenticationList", g, 20, vec![pa_bad.clone()])).unwrap(),
                )),
                ("/apis/security.sockmesh.io/v1alpha1/authorizationpolicies", true) if ap_watches == 0 => {
                    ap_watches += 1;
                    let (send, edit) = (send, edit2.clone());
                    let ev = events(&[("MODIFIED", settled_v2.clone())]);
                    tokio::spawn(async move {
                        edit.notified().await;
                        send.send_response(ok(ev));
                    });
                }
                (_, true) => held.push(send),
                (p, _) => panic!("unexpected request {p}"),
            }
        }
    });
    let (tx, _rx) = tokio::sync::watch::channel(Arc::new(Model::default()));
    tokio::spawn(run(client, tx));

    async fn next(patches: &mut tokio::sync::mpsc::UnboundedReceiver<(String, Value)>) -> (String, Value) {
        tokio::time::timeout(Duration::from_secs(10), patches.recv())
            .await
            .expect("no status write within 10 s")
            .unwrap()
    }
    let mut first = BTreeMap::new();
    for _ in 0..3 {
        let (path, status) = next(&mut patches).await;
        assert!(first.insert(path.clone(), status).is_none(), "{path} written twice");
    }
    let at =
        |kind: &str, name: &str| format!("/apis/security.sockmesh.io/v1alpha1/namespaces/default/{kind}/{name}/status");
    let cond =
        |s: &Value| s["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Accepted").unwrap().clone();
    let g = &first[&at("authorizationpolicies", "good")];
    assert_eq!((g["observedGeneration"].as_i64(), cond(g)["status"].as_str()), (Some(3), Some("True")), "{g}");
    let b = &first[&at("authorizationpolicies", "bad")];
    assert_eq!((b["observedGeneration"].as_i64(), cond(b)["status"].as_str()), (Some(2), Some("False")), "{b}");
    assert_eq!(cond(b)["reason"], "Invalid");
    assert!(cond(b)["message"].as_str().unwrap().contains("ports"), "{b}");
    let p = &first[&at("peerauthentications", "pa-bad")];
    assert!(cond(p)["message"].as_str().unwrap().contains("needs a selector"), "{p}");
    assert!(!first.contains_key(&at("authorizationpolicies", "settled")), "an up-to-date status was rewritten");

    // The edit: generation 2 of `settled` gets observedGeneration 2; it stayed accepted, so its
    // transition time is the one it had.
    edit.notify_one();
    let (path, s) = next(&mut patches).await;
    assert_eq!(path, at("authorizationpolicies", "settled"));
    assert_eq!(s["observedGeneration"], 2);
    assert_eq!(cond(&s)["lastTransitionTime"], "2026-11-01T00:00:00Z");
    // And nothing else is written (the others have not changed).
    assert!(
        tokio::time::timeout(Duration::from_millis(500), patches.recv()).await.is_err(),
        "an unchanged policy was written again"
    );
}
