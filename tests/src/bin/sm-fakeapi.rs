//! sm-fakeapi: a TEST FIXTURE standing in for a Kubernetes API server, never shipped. There is
//! no API server to be had on the machines the tests run on, so the real controller (kube-rs)
//! is pointed at this process with a kubeconfig instead.
//!
//! It serves, over plain HTTP/1.1, what the controller and the agent use:
//! - list and watch (`?watch=true`, from a `resourceVersion`, as chunked JSON lines) of every
//!   kind found in `<dir>/objects/*.json`: each file one object as the API server returns it
//!   (recorded JSON). The directory is read every 50 ms: a new file is an ADDED event, a
//!   changed one MODIFIED, a removed one DELETED, each with the next resourceVersion;
//! - GET of one object (404 when it is not there);
//! - PATCH of a `/status` subresource (a JSON merge patch of `status`), which also bumps the
//!   object's resourceVersion and is sent to watchers, as the API server does;
//! - POST of a TokenReview: `<dir>/tokens.json` maps a token to `{username, node, audiences}`;
//! - POST (create) and PUT (replace) of any other object, as the controller's Lease needs:
//!   create answers 409 AlreadyExists for an object that is there, replace 409 Conflict when
//!   the body's resourceVersion is not the object's current one (optimistic concurrency), as
//!   the API server does. Such objects live in memory only.
//!
//! Every request is logged to `<dir>/requests.log` (method, path and, for writes, the body),
//! and each create or replace that was stored as `{"stored": <code>, "path", "object"}`, so
//! that a test can see what was asked and what was written.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser)]
#[command(about = "A fake Kubernetes API server for tests (list/watch, TokenReview, status)")]
struct Args {
    /// Address to listen on.
    #[arg(long)]
    listen: std::net::SocketAddr,
    /// Directory with `objects/` (the cluster's objects) and `tokens.json`.
    #[arg(long)]
    dir: PathBuf,
}

/// (plural resource, namespace or "", name)
type Key = (String, String, String);

#[derive(Default)]
struct Store {
    rv: u64,
    /// Current objects (with their resourceVersion set).
    objects: BTreeMap<Key, Value>,
    /// The file content each object was last read from (to tell a change).
    from_file: BTreeMap<Key, Value>,
    /// Status written through the API, kept over what the files say.
    status: BTreeMap<Key, Value>,
    /// Every event: (resourceVersion, plural, type, object).
    events: Vec<(u64, String, &'static str, Value)>,
}

struct Shared {
    store: Mutex<Store>,
    changed: tokio::sync::Notify,
    dir: PathBuf,
}

fn plural_of(kind: &str) -> String {
    match kind {
        "Mesh" => "meshes".into(),
        "AuthorizationPolicy" => "authorizationpolicies".into(),
        "PeerAuthentication" => "peerauthentications".into(),
        k => format!("{}s", k.to_lowercase()),
    }
}

fn key_of(o: &Value) -> Option<Key> {
    let kind = o["kind"].as_str()?;
    let name = o["metadata"]["name"].as_str()?;
    let ns = o["metadata"]["namespace"].as_str().unwrap_or("");
    Some((plural_of(kind), ns.to_owned(), name.to_owned()))
}

impl Store {
    fn put(&mut self, key: Key, mut o: Value, kind: &'static str) {
        self.rv += 1;
        if let Some(s) = self.status.get(&key) {
            o["status"] = s.clone();
        }
        o["metadata"]["resourceVersion"] = self.rv.to_string().into();
        self.events.push((self.rv, key.0.clone(), kind, o.clone()));
        self.objects.insert(key, o);
    }

    fn sync(&mut self, files: BTreeMap<Key, Value>) -> bool {
        let mut changed = false;
        let gone: Vec<Key> = self.from_file.keys().filter(|k| !files.contains_key(*k)).cloned().collect();
        for k in gone {
            self.from_file.remove(&k);
            self.status.remove(&k);
            if let Some(mut o) = self.objects.remove(&k) {
                self.rv += 1;
                o["metadata"]["resourceVersion"] = self.rv.to_string().into();
                self.events.push((self.rv, k.0.clone(), "DELETED", o));
                changed = true;
            }
        }
        for (k, o) in files {
            if self.from_file.get(&k) == Some(&o) {
                continue;
            }
            let kind = if self.objects.contains_key(&k) { "MODIFIED" } else { "ADDED" };
            self.from_file.insert(k.clone(), o.clone());
            self.put(k, o, kind);
            changed = true;
        }
        changed
    }
}

fn read_objects(dir: &Path) -> BTreeMap<Key, Value> {
    let mut out = BTreeMap::new();
    let Ok(rd) = std::fs::read_dir(dir.join("objects")) else { return out };
    for e in rd.flatten() {
        let p = e.path();
        if p.extension().and_then(|x| x.to_str()) != Some("json") {
            continue;
        }
        // A file being written is read again on the next pass.
        let Ok(text) = std::fs::read_to_string(&p) else { continue };
        let Ok(o) = serde_json::from_str::<Value>(&text) else { continue };
        if let Some(k) = key_of(&o) {
            out.insert(k, o);
        }
    }
    out
}

struct Request {
    method: String,
    path: String,
    query: BTreeMap<String, String>,
    body: Vec<u8>,
}

async fn read_request(r: &mut BufReader<TcpStream>) -> std::io::Result<Option<Request>> {
    let mut line = String::new();
    if r.read_line(&mut line).await? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_owned();
    let target = parts.next().unwrap_or("/").to_owned();
    let mut len = 0usize;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).await? == 0 || h == "\r\n" || h == "\n" {
            break;
        }
        if let Some((n, v)) = h.split_once(':') {
            if n.trim().eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0; len.min(1 << 20)];
    r.read_exact(&mut body).await?;
    let (path, q) = target.split_once('?').unwrap_or((&target, ""));
    let query = q
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.replace("%2F", "/").replace("%3A", ":")))
        .collect();
    Ok(Some(Request { method, path: path.to_owned(), query, body }))
}

async fn respond(w: &mut TcpStream, code: u16, body: &Value) -> std::io::Result<()> {
    let text = body.to_string();
    let reason = if code == 200 || code == 201 { "OK" } else { "Error" };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        text.len()
    );
    w.write_all(head.as_bytes()).await?;
    w.write_all(text.as_bytes()).await
}

/// The API server's answer for an object that is not there (`plural` as `details.kind`).
fn not_found(plural: &str, name: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": format!("{plural} {name:?} not found"), "reason": "NotFound", "details": {"name": name, "kind": plural}, "code": 404})
}

/// The path's resource: (plural, namespace or "", name or "", whether it is `/status`).
fn route(path: &str) -> Option<(String, String, String, bool)> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let rest = match segs.as_slice() {
        ["api", "v1", rest @ ..] => rest,
        ["apis", _, _, rest @ ..] => rest,
        _ => return None,
    };
    let (rest, status) = match rest {
        [r @ .., "status"] => (r, true),
        r => (r, false),
    };
    let s = |x: &str| x.to_owned();
    Some(match rest {
        [plural] => (s(plural), s(""), s(""), status),
        ["namespaces", ns, plural] => (s(plural), s(ns), s(""), status),
        ["namespaces", ns, plural, name] => (s(plural), s(ns), s(name), status),
        [plural, name] => (s(plural), s(""), s(name), status),
        _ => return None,
    })
}

fn list_kind(plural: &str, items: &[Value]) -> String {
    items
        .first()
        .and_then(|o| o["kind"].as_str())
        .map(|k| format!("{k}List"))
        .unwrap_or_else(|| format!("{plural}List"))
}

async fn handle(shared: Arc<Shared>, stream: TcpStream) -> std::io::Result<()> {
    let mut r = BufReader::new(stream);
    let Some(req) = read_request(&mut r).await? else { return Ok(()) };
    let mut w = r.into_inner();
    {
        let mut log = std::fs::OpenOptions::new().create(true).append(true).open(shared.dir.join("requests.log"))?;
        let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
        // A TokenReview's token is a credential: logged as its length only.
        let body = if req.path.ends_with("tokenreviews") {
            json!({"tokenLength": body["spec"]["token"].as_str().map(str::len)})
        } else {
            body
        };
        writeln!(log, "{}", json!({"method": req.method, "path": req.path, "query": req.query, "body": body}))?;
    }
    if req.method == "POST" && req.path.ends_with("/tokenreviews") {
        let review: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
        let tokens: Value = std::fs::read_to_string(shared.dir.join("tokens.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(Value::Null);
        let token = review["spec"]["token"].as_str().unwrap_or("");
        let status = match tokens.get(token) {
            Some(t) => json!({
                "authenticated": true,
                "user": {"username": t["username"], "extra": {"authentication.kubernetes.io/node-name": [t["node"]]}},
                "audiences": t["audiences"],
            }),
            None => json!({"authenticated": false, "error": "invalid bearer token"}),
        };
        let out = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": review["spec"], "status": status});
        return respond(&mut w, 201, &out).await;
    }
    let Some((plural, ns, name, status)) = route(&req.path) else {
        return respond(&mut w, 404, &not_found("", &req.path)).await;
    };
    // `namespaces/<name>` is one Namespace.
    let (plural, ns, name) = if plural == "namespaces" && name.is_empty() && !ns.is_empty() {
        (plural, String::new(), ns)
    } else {
        (plural, ns, name)
    };
    if req.method == "PATCH" && status {
        let patch: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
        let key = (plural, ns, name);
        let out = {
            let mut st = shared.store.lock().unwrap();
            st.objects.get(&key).cloned().map(|o| {
                let mut s = o["status"].clone();
                merge(&mut s, &patch["status"]);
                st.status.insert(key.clone(), s);
                st.put(key.clone(), o, "MODIFIED");
                st.objects[&key].clone()
            })
        };
        let Some(out) = out else { return respond(&mut w, 404, &not_found(&key.0, &key.2)).await };
        shared.changed.notify_waiters();
        return respond(&mut w, 200, &out).await;
    }
    if (req.method == "POST" && name.is_empty() || req.method == "PUT" && !name.is_empty()) && !status {
        let mut o: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
        let Some(obj_name) = o["metadata"]["name"].as_str().map(str::to_owned) else {
            return respond(
                &mut w,
                400,
                &json!({"kind": "Status", "code": 400, "reason": "BadRequest", "message": "no metadata.name"}),
            )
            .await;
        };
        let key = (plural.clone(), ns.clone(), obj_name.clone());
        let conflict = |reason: &str, message: String| json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "reason": reason, "message": message, "code": 409});
        let out = {
            let mut st = shared.store.lock().unwrap();
            let current = st.objects.get(&key).map(|c| c["metadata"]["resourceVersion"].clone());
            match (req.method.as_str(), current) {
                ("POST", Some(_)) => {
                    Err((409, conflict("AlreadyExists", format!("{plural} {obj_name:?} already exists"))))
                }
                ("PUT", None) => Err((404, not_found(&plural, &obj_name))),
                ("PUT", Some(rv)) if o["metadata"]["resourceVersion"] != rv => Err((
                    409,
                    conflict(
                        "Conflict",
                        format!("Operation cannot be fulfilled on {plural} {obj_name:?}: the object has been modified"),
                    ),
                )),
                (m, _) => {
                    o["metadata"]["namespace"] = if ns.is_empty() { Value::Null } else { ns.clone().into() };
                    st.put(key.clone(), o, if m == "POST" { "ADDED" } else { "MODIFIED" });
                    Ok((if m == "POST" { 201 } else { 200 }, st.objects[&key].clone()))
                }
            }
        };
        return match out {
            Ok((code, o)) => {
                // What was stored, apart from what was asked (a write refused is not stored).
                let mut log =
                    std::fs::OpenOptions::new().create(true).append(true).open(shared.dir.join("requests.log"))?;
                writeln!(log, "{}", json!({"stored": code, "path": req.path, "object": o}))?;
                shared.changed.notify_waiters();
                respond(&mut w, code, &o).await
            }
            Err((code, e)) => respond(&mut w, code, &e).await,
        };
    }
    if req.method != "GET" {
        return respond(&mut w, 405, &json!({"kind": "Status", "code": 405, "message": "not served by the fake"}))
            .await;
    }
    if !name.is_empty() {
        let o = shared.store.lock().unwrap().objects.get(&(plural.clone(), ns, name.clone())).cloned();
        return match o {
            Some(o) => respond(&mut w, 200, &o).await,
            None => respond(&mut w, 404, &not_found(&plural, &name)).await,
        };
    }
    let in_ns = |o: &Value| ns.is_empty() || o["metadata"]["namespace"].as_str() == Some(ns.as_str());
    if req.query.get("watch").map(String::as_str) != Some("true") {
        let out = {
            let st = shared.store.lock().unwrap();
            let items: Vec<Value> =
                st.objects.iter().filter(|(k, o)| k.0 == plural && in_ns(o)).map(|(_, o)| o.clone()).collect();
            json!({"apiVersion": "v1", "kind": list_kind(&plural, &items), "metadata": {"resourceVersion": st.rv.to_string()}, "items": items})
        };
        return respond(&mut w, 200, &out).await;
    }
    // A watch: events after the given resourceVersion, then new ones as they come, until the
    // asked timeout (at most a minute; the client watches again from where it was).
    let mut from: u64 = req.query.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
    let secs: u64 = req.query.get("timeoutSeconds").and_then(|v| v.parse().ok()).unwrap_or(60).min(60);
    let head =
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
    w.write_all(head.as_bytes()).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let notified = shared.changed.notified();
        tokio::pin!(notified);
        // Registered before the events are read, so that none is missed in between.
        notified.as_mut().enable();
        let batch: Vec<Value> = {
            let st = shared.store.lock().unwrap();
            let out = st
                .events
                .iter()
                .filter(|(rv, p, _, o)| *rv > from && *p == plural && in_ns(o))
                .map(|(_, _, t, o)| json!({"type": t, "object": o}))
                .collect();
            from = st.rv;
            out
        };
        for e in batch {
            let line = format!("{e}\n");
            w.write_all(format!("{:x}\r\n{line}\r\n", line.len()).as_bytes()).await?;
        }
        w.flush().await?;
        tokio::select! {
            _ = notified => {}
            _ = tokio::time::sleep_until(deadline) => break,
        }
    }
    w.write_all(b"0\r\n\r\n").await
}

fn merge(into: &mut Value, patch: &Value) {
    match (into.as_object_mut(), patch.as_object()) {
        (Some(a), Some(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    a.remove(k);
                } else {
                    merge(a.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        _ => *into = patch.clone(),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(args.dir.join("objects"))?;
    let shared =
        Arc::new(Shared { store: Mutex::new(Store::default()), changed: Default::default(), dir: args.dir.clone() });
    shared.store.lock().unwrap().sync(read_objects(&args.dir));
    let listener = TcpListener::bind(args.listen).await?;
    eprintln!("{}", json!({"message": "fake API server ready", "addr": listener.local_addr()?.to_string()}));
    let poller = shared.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let files = read_objects(&poller.dir);
            if poller.store.lock().unwrap().sync(files) {
                poller.changed.notify_waiters();
            }
        }
    });
    loop {
        let (s, _) = listener.accept().await?;
        let shared = shared.clone();
        tokio::spawn(async move {
            let _ = handle(shared, s).await;
        });
    }
}
