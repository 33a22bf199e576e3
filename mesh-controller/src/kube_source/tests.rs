//! The Kubernetes source against a mock API server answering with recorded JSON: list, watch
//! events (added, modified, deleted), a 410 Gone that forces a re-list, Services from their
//! EndpointSlices, and equivalence with the local directory source.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use kube::client::Body;
use serde_json::{json, Value};

use super::*;
use mesh_model::mesh::MESH_ENABLED;

/// A pod's UID as the API server gives it (a UUID), made from its name.
fn uid_of(name: &str) -> String {
    let hex: String = name.bytes().map(|b| format!("{b:02x}")).collect();
    format!("00000000-0000-4000-8000-{hex:0>12}")
}

fn pod(name: &str, node: &str, sa: &str, ip: &str, app: &str, rv: u32) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "resourceVersion": rv.to_string(), "labels": {"app": app}, "uid": uid_of(name)},
        "spec": {"nodeName": node, "serviceAccountName": sa, "containers": [{"name": "app", "image": "app:1"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
    })
}

fn service(ns: &str, name: &str, cluster_ip: &str, ports: Value, selector: Value, rv: u32) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": ns, "resourceVersion": rv.to_string(), "uid": format!("uid-{name}")},
        "spec": {"type": "ClusterIP", "clusterIP": cluster_ip, "clusterIPs": [cluster_ip], "ports": ports, "selector": selector}
    })
}

/// An endpoint of a slice: a pod's address, with `ready` as the EndpointSlice controller
/// writes it (absent: unknown, which counts as ready).
fn endpoint(ip: &str, pod: &str, ready: Option<bool>) -> Value {
    let mut e = json!({"addresses": [ip], "targetRef": {"kind": "Pod", "name": pod}, "conditions": {}});
    if let Some(r) = ready {
        e["conditions"]["ready"] = r.into();
    }
    e
}

fn endpoint_slice(ns: &str, name: &str, svc: &str, ports: Value, endpoints: Vec<Value>, rv: u32) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": ns, "resourceVersion": rv.to_string(), "labels": {SERVICE_NAME_LABEL: svc}},
        "addressType": "IPv4", "ports": ports, "endpoints": endpoints
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
            // web: a named targetPort its slice resolves; db: headless, one unnamed port.
            ("/api/v1/services", false) => send.send_response(ok(serde_json::to_vec(&list(
                "ServiceList",
                "v1",
                40,
                vec![
                    service(
                        "default",
                        "web",
                        "10.96.0.10",
                        json!([{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]),
                        json!({"app": "b"}),
                        31,
                    ),
                    service(
                        "default",
                        "db",
                        "None",
                        json!([{"port": 9000, "targetPort": 9000}]),
                        json!({"app": "d"}),
                        32,
                    ),
                ],
            ))
            .unwrap())),
            ("/apis/discovery.k8s.io/v1/endpointslices", false) => send.send_response(ok(serde_json::to_vec(&list(
                "EndpointSliceList",
                "discovery.k8s.io/v1",
                50,
                vec![
                    endpoint_slice(
                        "default",
                        "web-x1",
                        "web",
                        json!([{"name": "http", "port": 8080, "protocol": "TCP"}]),
                        vec![endpoint("10.0.0.2", "b", Some(true))],
                        41,
                    ),
                    endpoint_slice(
                        "default",
                        "db-x2",
                        "db",
                        json!([{"name": "", "port": 9000, "protocol": "TCP"}]),
                        vec![endpoint("10.0.0.4", "d", None)],
                        42,
                    ),
                ],
            ))
            .unwrap())),
            ("/apis/security.sockmesh.io/v1alpha1/meshes", false) => send.send_response(ok(serde_json::to_vec(&list(
                "MeshList",
                "security.sockmesh.io/v1alpha1",
                1,
                vec![],
            ))
            .unwrap())),
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

/// Answers a status PATCH with the object patched, and reports (path, status) on `tx`.
async fn answer_patch(
    req: Request<Body>,
    send: tower_test::mock::SendResponse<Response<Body>>,
    objects: &[Value],
    tx: &tokio::sync::mpsc::UnboundedSender<(String, Value)>,
) {
    let (rec, obj) = patched(req, objects).await;
    tx.send(rec).unwrap();
    send.send_response(ok(serde_json::to_vec(&obj).unwrap()));
}

/// Waits (10 s at most) until the model published is one that `done` accepts.
async fn until(
    rx: &mut tokio::sync::watch::Receiver<Arc<Model>>,
    done: impl Fn(&Model) -> bool,
) -> Result<Arc<Model>, tokio::time::error::Elapsed> {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            {
                let m = rx.borrow_and_update().clone();
                if done(&m) {
                    return m;
                }
            }
            rx.changed().await.unwrap();
        }
    })
    .await
}

/// Waits until the model has exactly `want` workloads and pod a's app label is `app_a`.
async fn reach(
    rx: &mut tokio::sync::watch::Receiver<Arc<Model>>,
    want: &[&str],
    app_a: &str,
) -> Result<Arc<Model>, tokio::time::error::Elapsed> {
    until(rx, |m| {
        let names: Vec<&str> = m.workloads.keys().map(|k| k.name.as_str()).collect();
        let label = m.workloads.values().find(|w| w.name == "a").map(|w| w.labels["app"].clone());
        names == want && label.as_deref() == Some(app_a)
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
    tokio::spawn(run(client, tx, Default::default(), None));

    // The list, then the watch: b ADDED, c ADDED then DELETED, a MODIFIED (app=a2).
    reach(&mut rx, &["a", "b"], "a2").await.expect("watch events were not applied");
    assert_eq!(*pod_lists.lock().unwrap(), 1);
    // 410 Gone: the watcher re-lists and finds d, which appeared meanwhile.
    go_410.notify_one();
    reach(&mut rx, &["a", "b", "d"], "a2").await.expect("the model never reached the re-listed state");
    assert_eq!(*pod_lists.lock().unwrap(), 2, "the 410 did not cause a re-list");
    // The Services' reflectors are independent of the pods': wait for them too.
    let m = until(&mut rx, |m| m.workloads.len() == 3 && m.services.len() == 2).await.expect("no Services");
    assert_eq!(m.authz.len(), 1);

    // The same state written as a local directory gives the same model.
    let dir = tempfile::tempdir().unwrap();
    let mut yaml = String::new();
    for (name, node, sa, ip, app) in [
        ("a", "n1", "sa-a", "10.0.0.1", "a2"),
        ("b", "n2", "sa-b", "10.0.0.2", "b"),
        ("d", "n2", "sa-d", "10.0.0.4", "d"),
    ] {
        yaml.push_str(&format!("kind: Workload\nname: {name}\nnamespace: default\nserviceAccount: {sa}\nlabels: {{app: {app}}}\nips: [{ip}]\nnode: {node}\npodUid: {}\n---\n", uid_of(name)));
    }
    // The Services with selectors: the controller resolves them against the workloads to the
    // endpoints the slices list (the named target port written as the number it resolves to).
    yaml.push_str("kind: Service\nname: web\nnamespace: default\naddresses: [10.96.0.10]\nports: [{name: http, port: 80, targetPort: 8080}]\nselector: {app: b}\n---\n");
    yaml.push_str("kind: Service\nname: db\nnamespace: default\nports: [{port: 9000, targetPort: 9000}]\nselector: {app: d}\n---\n");
    yaml.push_str(&format!("apiVersion: security.sockmesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: deny-a, namespace: default}}\nspec: {DENY}\n"));
    std::fs::write(dir.path().join("mesh.yaml"), yaml).unwrap();
    let (ltx, mut lrx) = tokio::sync::watch::channel(Arc::new(Model::default()));
    tokio::spawn(crate::config_dir::watch(Some(dir.path().to_owned()), None, ltx));
    lrx.changed().await.unwrap();
    let local = lrx.borrow().clone();
    assert!(local.errors.is_empty(), "{:?}", local.errors);
    assert_eq!(local.workloads, m.workloads);
    assert_eq!(local.services, m.services);
    assert_eq!(m.services[&("default".to_owned(), "web".to_owned())].endpoints.len(), 1);
    assert_eq!(local.authz, m.authz);
    assert_eq!(local.peer_auth, m.peer_auth);
    let _ = BTreeMap::<u8, u8>::new();
}

#[test]
fn scheduled_pods_of_meshed_namespaces_are_workloads_from_the_moment_they_are_scheduled() {
    let meshed = std::collections::BTreeSet::from(["default".to_string()]);
    let p = |v: Value| serde_json::from_value::<Pod>(v).unwrap();
    assert!(workload_of(&p(pod("a", "n1", "sa-a", "10.0.0.1", "a", 1)), &meshed).is_some());
    let mut other = pod("a", "n1", "sa-a", "10.0.0.1", "a", 1);
    other["metadata"]["namespace"] = "kube-system".into();
    assert!(workload_of(&p(other), &meshed).is_none());
    let mut host = pod("a", "n1", "sa-a", "10.0.0.1", "a", 1);
    host["spec"]["hostNetwork"] = true.into();
    assert!(workload_of(&p(host), &meshed).is_none());
    // Scheduled, no address yet: pushed to its node at once (with its UID and QoS class), so
    // that its agent refuses its connections until it can capture it.
    let mut pending = pod("a", "n1", "sa-a", "10.0.0.1", "a", 1);
    pending["status"] = json!({"phase": "Pending", "qosClass": "BestEffort"});
    let w = workload_of(&p(pending.clone()), &meshed).expect("a scheduled pod is a workload");
    assert!(w.ips.is_empty());
    assert_eq!(w.pod_uid.as_deref(), Some(uid_of("a").as_str()));
    assert_eq!(w.qos_class.as_deref(), Some("BestEffort"));
    w.validate("n1").unwrap();
    // Not scheduled: no node to push it to.
    pending["spec"].as_object_mut().unwrap().remove("nodeName");
    assert!(workload_of(&p(pending.clone()), &meshed).is_none());
    // A UID that is not one is not trusted into a path: without an address it is no workload.
    pending["spec"]["nodeName"] = "n1".into();
    pending["metadata"]["uid"] = "../../x".into();
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
                answer_patch(req, send, &objects, &patches_tx).await;
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
                ("/api/v1/services", false) => {
                    send.send_response(ok(serde_json::to_vec(&list("ServiceList", "v1", 1, vec![])).unwrap()))
                }
                ("/apis/discovery.k8s.io/v1/endpointslices", false) => send.send_response(ok(serde_json::to_vec(
                    &list("EndpointSliceList", "discovery.k8s.io/v1", 1, vec![]),
                )
                .unwrap())),
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
                ("/apis/security.sockmesh.io/v1alpha1/meshes", false) => send.send_response(ok(serde_json::to_vec(
                    &list("MeshList", "security.sockmesh.io/v1alpha1", 1, vec![]),
                )
                .unwrap())),
                (_, true) => held.push(send),
                (p, _) => panic!("unexpected request {p}"),
            }
        }
    });
    let (tx, _rx) = tokio::sync::watch::channel(Arc::new(Model::default()));
    tokio::spawn(run(client, tx, Default::default(), None));

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

/// A Service of a namespace outside the mesh, from its EndpointSlice: cluster IP, the named
/// target port resolved by the slice, an integer one no slice names, a UDP port left out,
/// readiness and pod names; then the slice's watch events: an endpoint turning not ready, and
/// the slice deleted (the Service stays, without endpoints, and without the port only a slice
/// could resolve).
#[tokio::test]
async fn services_take_their_endpoints_and_target_ports_from_endpoint_slices() {
    let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(svc, "default");
    let web = service(
        "shop",
        "web",
        "10.96.0.10",
        json!([
            {"name": "web", "port": 80, "targetPort": "http", "protocol": "TCP"},
            {"name": "metrics", "port": 9090, "targetPort": 9091},
            {"name": "dns", "port": 53, "targetPort": 53, "protocol": "UDP"}
        ]),
        json!({"app": "web"}),
        10,
    );
    let slice = |eps: Vec<Value>, rv: u32| {
        endpoint_slice("shop", "web-abc12", "web", json!([{"name": "web", "port": 8080, "protocol": "TCP"}]), eps, rv)
    };
    let listed = slice(
        vec![
            endpoint("10.1.0.1", "web-1", Some(true)),
            endpoint("10.1.0.2", "web-2", None),
            endpoint("10.1.0.3", "web-3", Some(false)),
        ],
        20,
    );
    let modified = slice(
        vec![
            endpoint("10.1.0.1", "web-1", Some(true)),
            endpoint("10.1.0.2", "web-2", Some(false)),
            endpoint("10.1.0.3", "web-3", Some(false)),
        ],
        21,
    );
    let (step1, step2) = (Arc::new(tokio::sync::Notify::new()), Arc::new(tokio::sync::Notify::new()));
    let (s1, s2) = (step1.clone(), step2.clone());
    tokio::spawn(async move {
        let mut held = Vec::new();
        let mut slice_watches = 0;
        while let Some((req, send)) = handle.next_request().await {
            let watch = req.uri().query().unwrap_or("").contains("watch=true");
            let path = req.uri().path().to_owned();
            let empty =
                |kind: &str, api_version: &str| ok(serde_json::to_vec(&list(kind, api_version, 1, vec![])).unwrap());
            match (path.as_str(), watch) {
                ("/api/v1/namespaces", false) => send.send_response(empty("NamespaceList", "v1")),
                ("/api/v1/pods", false) => send.send_response(empty("PodList", "v1")),
                ("/apis/security.sockmesh.io/v1alpha1/authorizationpolicies", false) => {
                    send.send_response(empty("AuthorizationPolicyList", "security.sockmesh.io/v1alpha1"))
                }
                ("/apis/security.sockmesh.io/v1alpha1/peerauthentications", false) => {
                    send.send_response(empty("PeerAuthenticationList", "security.sockmesh.io/v1alpha1"))
                }
                ("/api/v1/services", false) => {
                    send.send_response(ok(
                        serde_json::to_vec(&list("ServiceList", "v1", 10, vec![web.clone()])).unwrap()
                    ))
                }
                ("/apis/discovery.k8s.io/v1/endpointslices", false) => send.send_response(ok(serde_json::to_vec(
                    &list("EndpointSliceList", "discovery.k8s.io/v1", 20, vec![listed.clone()]),
                )
                .unwrap())),
                ("/apis/discovery.k8s.io/v1/endpointslices", true) if slice_watches < 2 => {
                    slice_watches += 1;
                    // Each answer waits for the test to have seen the state before it.
                    let (step, ev) = if slice_watches == 1 {
                        (s1.clone(), events(&[("MODIFIED", modified.clone())]))
                    } else {
                        (s2.clone(), events(&[("DELETED", modified.clone())]))
                    };
                    tokio::spawn(async move {
                        step.notified().await;
                        send.send_response(ok(ev));
                    });
                }
                ("/apis/security.sockmesh.io/v1alpha1/meshes", false) => send.send_response(ok(serde_json::to_vec(
                    &list("MeshList", "security.sockmesh.io/v1alpha1", 1, vec![]),
                )
                .unwrap())),
                (_, true) => held.push(send),
                (p, _) => panic!("unexpected request {p}"),
            }
        }
    });
    let (tx, mut rx) = tokio::sync::watch::channel(Arc::new(Model::default()));
    tokio::spawn(run(client, tx, Default::default(), None));
    let key = ("shop".to_owned(), "web".to_owned());
    let eps = |m: &Model| -> Vec<(String, Option<String>, bool)> {
        m.services.get(&key).map_or(vec![], |s| {
            s.endpoints.iter().map(|e| (e.address.to_string(), e.workload.clone(), e.ready)).collect()
        })
    };
    let ep = |ip: &str, pod: &str, ready: bool| (ip.to_owned(), Some(pod.to_owned()), ready);

    let m = until(&mut rx, |m| eps(m).len() == 3).await.expect("the listed Service never came");
    let s = &m.services[&key];
    assert!(m.errors.is_empty(), "{:?}", m.errors);
    assert_eq!(s.addresses, ["10.96.0.10".parse::<std::net::IpAddr>().unwrap()]);
    assert_eq!(s.selector, Some(BTreeMap::from([("app".to_owned(), "web".to_owned())])));
    let ports: Vec<(Option<&str>, u16, u16)> =
        s.ports.iter().map(|p| (p.name.as_deref(), p.port, p.target())).collect();
    assert_eq!(ports, [(Some("web"), 80, 8080), (Some("metrics"), 9090, 9091)]);
    assert_eq!(eps(&m), [ep("10.1.0.1", "web-1", true), ep("10.1.0.2", "web-2", true), ep("10.1.0.3", "web-3", false)]);
    // No workload is in the mesh (shop is not meshed), and the listed endpoints stand.
    assert!(m.workloads.is_empty());

    step1.notify_one();
    let m = until(&mut rx, |m| eps(m).get(1).is_some_and(|e| !e.2)).await.expect("the MODIFIED slice was not applied");
    assert_eq!(
        eps(&m),
        [ep("10.1.0.1", "web-1", true), ep("10.1.0.2", "web-2", false), ep("10.1.0.3", "web-3", false)]
    );

    step2.notify_one();
    let m = until(&mut rx, |m| m.services.get(&key).is_some_and(|s| s.endpoints.is_empty()))
        .await
        .expect("the DELETED slice was not applied");
    let s = &m.services[&key];
    assert_eq!(s.ports.iter().map(|p| (p.port, p.target())).collect::<Vec<_>>(), [(9090, 9091)]);
    assert_eq!(s.addresses.len(), 1);
}

/// The conversion on its own: ExternalName Services are skipped, headless ones kept without
/// addresses, dual-stack addresses kept, a named target port no slice resolves drops its port
/// (and a Service left without ports is omitted), FQDN slices and other Services' slices are
/// ignored.
#[test]
fn service_of_skips_external_names_keeps_headless_services_and_drops_unresolved_ports() {
    let k = |v: Value| serde_json::from_value::<KubeService>(v).unwrap();
    let es = |v: Value| serde_json::from_value::<EndpointSlice>(v).unwrap();
    let ports =
        json!([{"name": "http", "port": 80, "targetPort": "http"}, {"name": "grpc", "port": 81, "targetPort": 9001}]);

    let mut ext = service("default", "ext", "", json!([{"port": 443}]), json!({}), 1);
    ext["spec"] = json!({"type": "ExternalName", "externalName": "example.com", "ports": [{"port": 443}]});
    assert_eq!(service_of(&k(ext), &[]), None);

    // Headless, no slice yet: http's named target port is unresolved, so only grpc is left.
    let headless = k(service("default", "h", "None", ports.clone(), json!({"app": "h"}), 1));
    let s = service_of(&headless, &[]).unwrap();
    assert!(s.addresses.is_empty() && s.endpoints.is_empty());
    assert_eq!(s.ports, [ServicePort { name: Some("grpc".into()), port: 81, target_port: Some(9001) }]);
    assert_eq!(s.selector, Some(BTreeMap::from([("app".to_owned(), "h".to_owned())])));

    // Only named target ports, none resolved: no ports, so no Service (yet), and no error.
    let named = k(service(
        "default",
        "n",
        "10.96.0.3",
        json!([{"name": "http", "port": 80, "targetPort": "http"}]),
        json!({}),
        1,
    ));
    assert_eq!(service_of(&named, &[]), None);

    // Dual stack; the slices: its own IPv4 one (http resolved, a non-pod endpoint, two addresses
    // of one endpoint), an FQDN one, and another Service's.
    let mut dual = service("default", "d", "10.96.0.4", ports, Value::Null, 1);
    dual["spec"]["clusterIPs"] = json!(["10.96.0.4", "fd00::4"]);
    let own = es(endpoint_slice(
        "default",
        "d-1",
        "d",
        json!([{"name": "http", "port": 8080}, {"name": "grpc", "port": 9002, "protocol": "UDP"}]),
        vec![
            json!({"addresses": ["192.0.2.7"], "targetRef": {"kind": "Node", "name": "n1"}}),
            json!({"addresses": ["10.0.0.9", "10.0.0.8"], "targetRef": {"kind": "Pod", "name": "p"}, "conditions": {"ready": false}}),
        ],
        2,
    ));
    let mut fqdn_v = endpoint_slice("default", "d-2", "d", json!([{"name": "http", "port": 8081}]), vec![], 3);
    fqdn_v["addressType"] = "FQDN".into();
    fqdn_v["endpoints"] = json!([{"addresses": ["db.example.com"]}]);
    let fqdn = es(fqdn_v);
    let other = es(endpoint_slice(
        "default",
        "e-1",
        "e",
        json!([{"name": "http", "port": 7070}]),
        vec![endpoint("10.0.0.5", "q", None)],
        4,
    ));
    let s = service_of(&k(dual), &[&other, &fqdn, &own]).unwrap();
    assert_eq!(s.addresses.iter().map(|a| a.to_string()).collect::<Vec<_>>(), ["10.96.0.4", "fd00::4"]);
    assert_eq!(s.selector, None);
    // http from the IPv4 slice (not the FQDN one's 8081); grpc's slice port is UDP: its integer target.
    assert_eq!(s.ports.iter().map(|p| (p.port, p.target())).collect::<Vec<_>>(), [(80, 8080), (81, 9001)]);
    let eps: Vec<(String, Option<&str>, bool)> =
        s.endpoints.iter().map(|e| (e.address.to_string(), e.workload.as_deref(), e.ready)).collect();
    assert_eq!(
        eps,
        [
            ("10.0.0.8".to_owned(), Some("p"), false),
            ("10.0.0.9".to_owned(), Some("p"), false),
            ("192.0.2.7".to_owned(), None, true)
        ]
    );
}

/// The label `sockmesh.io/export: "true"` exports a Service to the other zones; any other
/// value, or none, does not.
#[test]
fn the_export_label_offers_a_service_to_the_other_zones() {
    let k = |v: Value| serde_json::from_value::<KubeService>(v).unwrap();
    let with = |label: Option<&str>| {
        let mut v = service("default", "web", "10.96.0.5", json!([{"port": 80}]), json!({"app": "web"}), 1);
        if let Some(l) = label {
            v["metadata"]["labels"] = json!({mesh_model::service::EXPORT_LABEL: l});
        }
        service_of(&k(v), &[]).unwrap()
    };
    assert!(with(Some("true")).export);
    assert!(!with(Some("yes")).export);
    assert!(!with(None).export);
    assert!(!with(Some("true")).imported, "a source never makes an import");
}

/// Meshes and namespace labels: a pod of a namespace labelled for mesh `a` is in mesh `a`, one
/// labelled `enabled` in the default mesh, the same as the equivalent directory; a Mesh whose
/// trust domain is the default mesh's gets `Accepted=False` with the reason, a good one `True`.
#[tokio::test]
async fn meshes_come_from_namespace_labels_and_bad_ones_get_accepted_false() {
    let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(svc, "default");
    let g = "security.sockmesh.io/v1alpha1";
    let ns = |name: &str, mesh: &str| json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "resourceVersion": "5", "labels": {MESH_LABEL: mesh}}});
    let mesh = |name: &str, spec: Value| json!({"apiVersion": g, "kind": "Mesh", "metadata": {"name": name, "resourceVersion": "9", "generation": 1, "creationTimestamp": "2026-01-02T03:04:05Z"}, "spec": spec});
    let mut a1 = pod("a1", "n1", "sa-a", "10.0.0.1", "a", 100);
    a1["metadata"]["namespace"] = json!("team-a");
    let d1 = pod("d1", "n2", "sa-d", "10.0.0.2", "d", 101);
    let meshes = vec![
        mesh("a", json!({"trustDomain": "a.example", "trust": ["default"]})),
        mesh("dup", json!({"trustDomain": "cluster.local"})),
    ];
    let objects = meshes.clone();
    let (patches_tx, mut patches) = tokio::sync::mpsc::unbounded_channel::<(String, Value)>();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Some((req, send)) = handle.next_request().await {
            let watch = req.uri().query().unwrap_or("").contains("watch=true");
            let path = req.uri().path().to_owned();
            if req.method() == http::Method::PATCH {
                answer_patch(req, send, &objects, &patches_tx).await;
                continue;
            }
            let body = match (path.as_str(), watch) {
                (_, true) => {
                    held.push(send);
                    continue;
                }
                ("/api/v1/namespaces", _) => {
                    list("NamespaceList", "v1", 1, vec![ns("team-a", "a"), ns("default", "enabled")])
                }
                ("/api/v1/pods", _) => list("PodList", "v1", 1, vec![a1.clone(), d1.clone()]),
                ("/api/v1/services", _) => list("ServiceList", "v1", 1, vec![]),
                ("/apis/discovery.k8s.io/v1/endpointslices", _) => {
                    list("EndpointSliceList", "discovery.k8s.io/v1", 1, vec![])
                }
                ("/apis/security.sockmesh.io/v1alpha1/authorizationpolicies", _) => {
                    list("AuthorizationPolicyList", g, 1, vec![])
                }
                ("/apis/security.sockmesh.io/v1alpha1/peerauthentications", _) => {
                    list("PeerAuthenticationList", g, 1, vec![])
                }
                ("/apis/security.sockmesh.io/v1alpha1/meshes", _) => list("MeshList", g, 1, meshes.clone()),
                (p, _) => panic!("unexpected request {p}"),
            };
            send.send_response(ok(serde_json::to_vec(&body).unwrap()));
        }
    });
    let (tx, mut rx) = tokio::sync::watch::channel(Arc::new(Model::default()));
    let verdicts: Arc<crate::meshes::Verdicts> = Default::default();
    tokio::spawn(run(client, tx, verdicts.clone(), None));
    let m = until(&mut rx, |m| m.workloads.len() == 2 && m.meshes.len() == 2).await.expect("no meshes");
    // The mesh keeper judges them (as the controller runs it after the source), and the status
    // writer writes its verdicts.
    let state = tempfile::tempdir().unwrap();
    let (_, ca) = crate::meshes::test_ca("cluster.local");
    let day = Duration::from_secs(86_400);
    let mut keeper = crate::meshes::Keeper::new(crate::meshes::RootStore::Files(state.path().to_owned()), ca, day, day);
    keeper.verdicts = verdicts;
    keeper.admit(&mut (*m).clone()).await;
    let mesh_of = |name: &str| m.workloads.values().find(|w| w.name == name).unwrap().mesh.clone();
    assert_eq!(mesh_of("a1").as_deref(), Some("a"));
    assert_eq!(mesh_of("d1"), None, "`enabled` is the default mesh");
    assert_eq!(m.namespace_meshes, BTreeMap::from([("team-a".to_owned(), "a".to_owned())]));
    // When each was created, for every replica to settle a trust domain claimed twice alike.
    assert_eq!(m.mesh_created.get("a"), Some(&1_767_323_045));

    let mut statuses = BTreeMap::new();
    for _ in 0..2 {
        let (path, s) =
            tokio::time::timeout(Duration::from_secs(10), patches.recv()).await.expect("no status").unwrap();
        statuses.insert(path, s["conditions"][0].clone());
    }
    let at = |name: &str| format!("/apis/security.sockmesh.io/v1alpha1/meshes/{name}/status");
    assert_eq!(statuses[&at("a")]["status"], "True", "{statuses:?}");
    let dup = &statuses[&at("dup")];
    assert_eq!((dup["status"].as_str(), dup["reason"].as_str()), (Some("False"), Some("Invalid")));
    assert!(dup["message"].as_str().unwrap().contains("mesh default's"), "{dup}");

    // The same written as a directory: the same workloads (in the same meshes) and meshes.
    let dir = tempfile::tempdir().unwrap();
    let yaml = "apiVersion: v1\nkind: Namespace\nmetadata: {name: team-a, labels: {sockmesh.io/mesh: a}}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: default, labels: {sockmesh.io/mesh: enabled}}\n---\napiVersion: security.sockmesh.io/v1alpha1\nkind: Mesh\nmetadata: {name: a}\nspec: {trustDomain: a.example, trust: [default]}\n---\napiVersion: security.sockmesh.io/v1alpha1\nkind: Mesh\nmetadata: {name: dup}\nspec: {trustDomain: cluster.local}\n---\nkind: Workload\nname: a1\nnamespace: team-a\nserviceAccount: sa-a\nlabels: {app: a}\nips: [10.0.0.1]\nnode: n1\npodUid: {a1}\n---\nkind: Workload\nname: d1\nserviceAccount: sa-d\nlabels: {app: d}\nips: [10.0.0.2]\nnode: n2\npodUid: {d1}\n";
    let yaml = yaml.replace("{a1}", &uid_of("a1")).replace("{d1}", &uid_of("d1"));
    std::fs::write(dir.path().join("mesh.yaml"), yaml).unwrap();
    let (ltx, mut lrx) = tokio::sync::watch::channel(Arc::new(Model::default()));
    tokio::spawn(crate::config_dir::watch(Some(dir.path().to_owned()), None, ltx));
    lrx.changed().await.unwrap();
    let local = lrx.borrow().clone();
    assert!(local.errors.is_empty(), "{:?}", local.errors);
    assert_eq!(local.workloads, m.workloads);
    assert_eq!(local.meshes, m.meshes);
    assert_eq!(local.namespace_meshes, m.namespace_meshes);
}

/// Nothing is published until every watcher has listed once: with the namespaces not listed
/// yet, a model would have no meshed namespace and so no pods, and agents would release theirs.
#[tokio::test]
async fn nothing_is_published_before_every_watcher_has_listed() {
    let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(svc, "default");
    let namespaces_go = Arc::new(tokio::sync::Notify::new());
    let go = namespaces_go.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        let mut namespaces = None;
        loop {
            tokio::select! {
                r = handle.next_request() => {
                    let Some((req, send)) = r else { return };
                    let path = req.uri().path().to_owned();
                    if req.uri().query().unwrap_or("").contains("watch=true") {
                        held.push(send);
                        continue;
                    }
                    let body = match path.as_str() {
                        "/api/v1/pods" => list("PodList", "v1", 10, vec![pod("a", "n1", "sa-a", "10.0.0.1", "a", 10)]),
                        // Held until the test says so.
                        "/api/v1/namespaces" => {
                            namespaces = Some(send);
                            continue;
                        }
                        _ => list("List", "v1", 10, vec![]),
                    };
                    send.send_response(ok(serde_json::to_vec(&body).unwrap()));
                }
                _ = go.notified(), if namespaces.is_some() => {
                    let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default", "resourceVersion": "5", "labels": {MESH_LABEL: MESH_ENABLED}}});
                    let body = list("NamespaceList", "v1", 10, vec![ns]);
                    namespaces.take().unwrap().send_response(ok(serde_json::to_vec(&body).unwrap()));
                }
            }
        }
    });
    let (tx, mut rx) = tokio::sync::watch::channel(Arc::new(Model::default()));
    tokio::spawn(run(client, tx, Default::default(), None));
    // Every other watcher lists; the pods' list has a pod. Nothing may be published meanwhile.
    let early = tokio::time::timeout(Duration::from_secs(2), rx.changed()).await;
    assert!(early.is_err(), "a model was published before the namespaces were listed: {:?}", rx.borrow().workloads);
    namespaces_go.notify_one();
    let m = until(&mut rx, |m| m.workloads.len() == 1).await.expect("no model once everything was listed");
    assert_eq!(m.version, 1, "the first model published is the complete one");
}

/// A Mesh is in force when its status accepted its current generation (written by whichever
/// replica held the Lease); one whose spec changed since, or that was refused, is not.
#[test]
fn meshes_in_force_are_read_from_their_status() {
    let g = "security.sockmesh.io/v1alpha1";
    let mesh = |name: &str, generation: i64, observed: i64, accepted: &str| -> Arc<Mesh> {
        Arc::new(
            serde_json::from_value(json!({
                "apiVersion": g, "kind": "Mesh",
                "metadata": {"name": name, "generation": generation, "creationTimestamp": "2026-01-02T03:04:05Z"},
                "spec": {"trustDomain": format!("{name}.example")},
                "status": {"observedGeneration": observed, "conditions": [{"type": "Accepted", "status": accepted, "reason": "R", "message": "m"}]},
            }))
            .unwrap(),
        )
    };
    let meshes = [mesh("kept", 2, 2, "True"), mesh("edited", 3, 2, "True"), mesh("refused", 1, 1, "False")];
    let m = model_from(&[], &[], &meshes, &[], &[], &[], &[], &Model::default());
    assert_eq!(m.mesh_in_force.iter().collect::<Vec<_>>(), ["kept"]);
    assert_eq!(m.mesh_created.len(), 3);
}
