//! The local configuration source: a directory of YAML files holding workloads, Services and
//! policies, in the same shapes as on Kubernetes (multi-document YAML; `kind:
//! AuthorizationPolicy` / `PeerAuthentication` with metadata and spec; `kind: Workload` and
//! `kind: Service` with the record itself; `kind: Mesh` as on Kubernetes, and `kind: Namespace`
//! with the labels that put its workloads in a mesh).
//! Reloaded when a file changes. A bad file is reported (path, line, reason) and its last good
//! contents are kept; an invalid policy is reported and left out whole, never half-applied.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use mesh_model::config_file::{parse_file, FileContents};
use mesh_model::Workload;

use crate::model::Model;

/// Builds the model from the last good contents of every file; an invalid policy is handled
/// as [`Model::admit_authz`] says.
fn assemble(
    files: &BTreeMap<PathBuf, FileContents>,
    errors: Vec<String>,
    read: &BTreeMap<PathBuf, Vec<Arc<Workload>>>,
    version: u64,
    previous: &Model,
) -> Model {
    let mut m = Model { version, ..Default::default() };
    for (path, f) in files {
        // Each file's workloads as read (shared by every model built from them), or as listed.
        let ws = read.get(path).into_iter().flatten().cloned().chain(f.workloads.iter().cloned().map(Arc::new));
        for w in ws {
            Arc::make_mut(&mut m.workloads).insert(w.key(), w);
        }
    }
    m.errors = errors;
    let mut labels = BTreeMap::new();
    for (path, f) in files {
        for (line, name, l) in &f.namespaces {
            if labels.insert(name.clone(), l.clone()).is_some() {
                m.errors.push(format!(
                    "{}:{line}: Namespace {name} is defined twice; the last definition stands",
                    path.display()
                ));
            }
        }
    }
    m.set_namespaces(&labels);
    for (path, f) in files {
        for d in &f.meshes {
            m.admit_mesh(&d.name, &d.spec, format!("{}:{}: Mesh", path.display(), d.line));
        }
    }
    let services = files
        .iter()
        .flat_map(|(path, f)| {
            f.services.iter().map(move |(line, s)| (s.clone(), format!("{}:{line}: Service", path.display())))
        })
        .collect();
    m.admit_services(services, crate::model::Endpoints::FromSelector);
    for (path, f) in files {
        for p in &f.authz {
            let what = format!("{}:{}: AuthorizationPolicy", path.display(), p.line);
            m.admit_authz(previous, (p.namespace.clone(), p.name.clone()), &p.spec, what);
        }
        for p in &f.peer {
            let what = format!("{}:{}: PeerAuthentication {}/{}", path.display(), p.line, p.namespace, p.name);
            m.admit_peer_auth(previous, (p.namespace.clone(), p.name.clone()), &p.spec, what);
        }
    }
    m.accepted_at_ms =
        SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0);
    m
}

/// What tells a file's versions apart: its modification time, size and inode (a file replaced
/// by a rename gets a new inode even within the clock's granularity). None when unreadable.
type Stamp = Option<(SystemTime, u64, u64)>;

fn stamp(m: std::io::Result<std::fs::Metadata>) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    m.ok().and_then(|m| Some((m.modified().ok()?, m.len(), m.ino())))
}

/// Watches `dir` (polling modification times every 200 ms) and publishes a new model whenever
/// what it yields changes.
/// A file's workloads, each made shareable. Into a new vector: collected in place, the
/// pointers would keep the whole buffer of records they came from (the records' size times
/// its capacity, a few hundred bytes per workload) for as long as the file is unchanged.
fn shared(ws: Vec<Workload>) -> Vec<Arc<Workload>> {
    let mut out = Vec::with_capacity(ws.len());
    out.extend(ws.into_iter().map(Arc::new));
    out
}

pub async fn watch(dir: Option<PathBuf>, workloads_file: Option<PathBuf>, tx: tokio::sync::watch::Sender<Arc<Model>>) {
    let mut good: BTreeMap<PathBuf, FileContents> = BTreeMap::new();
    let mut read: BTreeMap<PathBuf, Vec<Arc<Workload>>> = BTreeMap::new();
    let mut seen: BTreeMap<PathBuf, Stamp> = BTreeMap::new();
    // The error of each file whose last read failed: it stands until the file changes.
    let mut failed: BTreeMap<PathBuf, String> = BTreeMap::new();
    let mut version = tx.borrow().version;
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut first = true;
    loop {
        tick.tick().await;
        let mut now: BTreeMap<PathBuf, Stamp> = BTreeMap::new();
        if let Some(f) = &workloads_file {
            now.insert(f.clone(), stamp(std::fs::metadata(f)));
        }
        if let Some(rd) = dir.as_ref().and_then(|d| std::fs::read_dir(d).ok()) {
            for e in rd.flatten() {
                let p = e.path();
                if matches!(p.extension().and_then(|x| x.to_str()), Some("yaml" | "yml")) {
                    now.insert(p, stamp(e.metadata()));
                }
            }
        }
        if now == seen && !first {
            continue;
        }
        first = false;
        // Only the files that changed are read again: at a hundred thousand workloads, reading
        // them all would be most of a change's time.
        let changed: Vec<&PathBuf> =
            now.iter().filter(|(p, s)| s.is_none() || seen.get(*p) != Some(*s)).map(|(p, _)| p).collect();
        good.retain(|p, _| now.contains_key(p));
        read.retain(|p, _| now.contains_key(p));
        failed.retain(|p, _| now.contains_key(p));
        for p in changed {
            failed.remove(p);
            let parsed = if Some(p) == workloads_file.as_ref() {
                // The --workloads file: `kind: Workload` documents only.
                mesh_model::workload::parse_file(p).map_err(|e| e.to_string()).and_then(|ws| {
                    match ws.iter().find(|w| w.node.is_none()) {
                        Some(w) => Err(format!(
                            "{}: workload {} has no node; the controller places every workload on a node",
                            p.display(),
                            w.key()
                        )),
                        None => Ok(FileContents { workloads: ws, ..Default::default() }),
                    }
                })
            } else {
                std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display())).and_then(|t| parse_file(p, &t))
            };
            match parsed {
                Ok(mut c) => {
                    // Its workloads are kept once, shared by the models built from them.
                    read.insert(p.clone(), shared(std::mem::take(&mut c.workloads)));
                    good.insert(p.clone(), c);
                }
                Err(e) => {
                    tracing::error!(error = %e, kept_last_good = good.contains_key(p), "configuration file rejected");
                    failed.insert(p.clone(), e);
                }
            }
        }
        seen = now;
        let errors = failed.values().cloned().collect();
        version += 1;
        let previous = tx.borrow().clone();
        let m = assemble(&good, errors, &read, version, &previous);
        tracing::info!(
            version,
            workloads = m.workloads.len(),
            services = m.services.len(),
            policies = m.authz.len(),
            peer_authentications = m.peer_auth.len(),
            errors = m.errors.len(),
            "configuration loaded"
        );
        let _ = tx.send(Arc::new(m));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn a_files_shared_workloads_keep_no_buffer_beyond_their_pointers() {
        let text: String = (0..100)
            .map(|i| format!("kind: Workload\nname: w{i}\nips: [10.0.{}.{}]\nnode: n1\n---\n", i / 200, i % 200 + 1))
            .collect();
        let ws = parse_file(Path::new("w.yaml"), &text).unwrap().workloads;
        assert_eq!(ws.len(), 100);
        let shared = shared(ws);
        // Kept for as long as the file is unchanged: its buffer is the pointers, nothing more.
        assert_eq!(shared.capacity(), 100, "the shared list kept {} slots for 100 records", shared.capacity());
    }

    #[test]
    fn parses_policies_and_workloads_and_names_the_line_of_an_error() {
        let text = "apiVersion: security.sockmesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: deny-a, namespace: default}\nspec:\n  action: DENY\n  rules:\n  - from:\n    - source: {principals: [\"cluster.local/ns/default/sa/sa-a\"]}\n---\nkind: Workload\nname: b\nserviceAccount: sa-b\nips: [10.0.0.2]\nnode: n2\n";
        let c = parse_file(Path::new("p.yaml"), text).unwrap();
        assert_eq!(c.authz.len(), 1);
        assert_eq!(c.workloads.len(), 1);
        let bad = "apiVersion: security.sockmesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: x}\nspec:\n  action: DENY\n---\napiVersion: security.sockmesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: y}\nspec:\n  acton: DENY\n";
        let e = parse_file(Path::new("bad.yaml"), bad).unwrap_err();
        assert!(e.starts_with("bad.yaml:") && e.contains("acton"), "{e}");
        let line: usize = e.split(':').nth(1).unwrap().parse().unwrap();
        assert!((7..=10).contains(&line), "line {line}: {e}");
        let e = parse_file(Path::new("k.yaml"), "kind: Gateway\n").unwrap_err();
        assert!(e.contains("unknown kind"), "{e}");
        let e = parse_file(
            Path::new("v.yaml"),
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: x}\nspec: {}\n",
        )
        .unwrap_err();
        assert!(e.contains("apiVersion"), "{e}");
    }

    #[test]
    fn an_invalid_policy_is_left_out_whole_and_reported() {
        let text = "apiVersion: security.sockmesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: bad}\nspec:\n  rules:\n  - to:\n    - operation: {ports: [\"http\"]}\n";
        let c = parse_file(Path::new("p.yaml"), text).unwrap();
        let files = BTreeMap::from([(PathBuf::from("p.yaml"), c)]);
        let m = assemble(&files, vec![], &BTreeMap::new(), 1, &Model::default());
        assert!(m.authz.is_empty());
        assert!(
            m.errors[0].starts_with("p.yaml:1: AuthorizationPolicy rejected whole")
                && m.errors[0].contains("default/bad")
                && m.errors[0].contains("ports"),
            "{:?}",
            m.errors
        );
        // The old workload list is answered with the documents to write.
        let e = parse_file(Path::new("w.yaml"), "workloads:\n- {name: a, ips: [10.0.0.1], node: n1}\n").unwrap_err();
        assert!(e.starts_with("w.yaml:1:") && e.contains("kind: Workload"), "{e}");

        // A PeerAuthentication whose port key would silently never match is refused, not ignored.
        for (spec, want) in [
            ("selector: {matchLabels: {app: b}}\n  portLevelMtls: {\"08080\": {mode: PERMISSIVE}}", "08080"),
            ("portLevelMtls: {\"8080\": {mode: PERMISSIVE}}", "needs a selector"),
        ] {
            let text = format!("apiVersion: security.sockmesh.io/v1alpha1\nkind: PeerAuthentication\nmetadata: {{name: pa}}\nspec:\n  {spec}\n");
            let c = parse_file(Path::new("pa.yaml"), &text).unwrap();
            let m = assemble(
                &BTreeMap::from([(PathBuf::from("pa.yaml"), c)]),
                vec![],
                &BTreeMap::new(),
                1,
                &Model::default(),
            );
            assert!(m.peer_auth.is_empty(), "{spec}");
            assert!(
                m.errors[0].starts_with("pa.yaml:1: PeerAuthentication default/pa") && m.errors[0].contains(want),
                "{:?}",
                m.errors
            );
        }
        let ok = "apiVersion: security.sockmesh.io/v1alpha1\nkind: PeerAuthentication\nmetadata: {name: pa}\nspec:\n  selector: {matchLabels: {app: b}}\n  portLevelMtls: {\"8080\": {mode: PERMISSIVE}}\n";
        let m = assemble(
            &BTreeMap::from([(PathBuf::from("pa.yaml"), parse_file(Path::new("pa.yaml"), ok).unwrap())]),
            vec![],
            &BTreeMap::new(),
            1,
            &Model::default(),
        );
        assert_eq!((m.peer_auth.len(), m.errors.len()), (1, 0), "{:?}", m.errors);
    }

    /// `kind: Service` documents: a selector is resolved against the workloads (and again
    /// when they change); a bad Service names its file and line; an address already taken
    /// leaves that Service out, reported, and the rest in force.
    #[test]
    fn services_resolve_their_selectors_and_bad_ones_are_reported_with_their_line() {
        let text = "kind: Workload\nname: w1\nlabels: {app: web}\nips: [10.0.0.1]\nnode: n1\n---\nkind: Workload\nname: w2\nlabels: {app: web}\nips: [10.0.0.2]\nnode: n2\n---\nkind: Service\nname: web\naddresses: [10.96.0.10]\nports: [{port: 80, targetPort: 8080}]\nselector: {app: web}\n---\nkind: Service\nname: clash\naddresses: [10.0.0.2]\nports: [{port: 80}]\nendpoints: [{address: 192.0.2.1}]\n";
        let files = BTreeMap::from([(PathBuf::from("s.yaml"), parse_file(Path::new("s.yaml"), text).unwrap())]);
        let m = assemble(&files, vec![], &BTreeMap::new(), 1, &Model::default());
        let web = &m.services[&("default".to_owned(), "web".to_owned())];
        let eps: Vec<String> =
            web.endpoints.iter().map(|e| format!("{}={}", e.workload.as_deref().unwrap_or("-"), e.address)).collect();
        assert_eq!(eps, ["w1=10.0.0.1", "w2=10.0.0.2"]);
        assert!(!m.services.contains_key(&("default".to_owned(), "clash".to_owned())));
        assert!(
            m.errors.iter().any(
                |e| e.starts_with("s.yaml:19: Service default/clash rejected") && e.contains("workload default/w2")
            ),
            "{:?}",
            m.errors
        );
        // The same Service in two files: the first (by path) stands, the second is reported.
        let again = "kind: Service\nname: web\naddresses: [10.96.0.99]\nports: [{port: 81}]\n";
        let mut two = files.clone();
        two.insert(PathBuf::from("t.yaml"), parse_file(Path::new("t.yaml"), again).unwrap());
        let m2 = assemble(&two, vec![], &BTreeMap::new(), 2, &Model::default());
        assert_eq!(m2.services[&("default".to_owned(), "web".to_owned())].addresses, web.addresses);
        assert!(
            m2.errors
                .iter()
                .any(|e| e.starts_with("t.yaml:1: Service default/web rejected: defined twice")
                    && e.contains("s.yaml:13")),
            "{:?}",
            m2.errors
        );
        // Pushed to every node, with the endpoints listed.
        let v = crate::view::View::build(Arc::new(m.clone()), "sockmesh-system", None);
        let mine = v.node_part("n1");
        let pushed =
            v.snapshot(&mine).find(|(id, _)| id.kind == mesh_api::push::Kind::Service).expect("the Service is pushed");
        assert!(pushed.1.contains("10.0.0.2") && pushed.1.contains("\"targetPort\":8080"), "{}", pushed.1);

        let e = parse_file(Path::new("b.yaml"), "kind: Workload\nname: w1\nips: [10.0.0.1]\nnode: n1\n---\nkind: Service\nname: web\nports: [{port: 80, targetPrt: 8080}]\n").unwrap_err();
        assert!(e.starts_with("b.yaml:8:") && e.contains("targetPrt"), "{e}");
        let e = parse_file(
            Path::new("b.yaml"),
            "kind: Service\nname: web\nports: [{port: 80}]\nselector: {app: a}\nendpoints: [{address: 10.0.0.9}]\n",
        )
        .unwrap_err();
        assert!(
            e.starts_with("b.yaml:1:")
                && e.contains("both a selector and explicit endpoints")
                && e.contains("kind: Service\nname: web"),
            "{e}"
        );
    }

    /// An edit that breaks a DENY must not lift it: the version in force stays, and says so.
    /// A policy that was never valid is not applied. Deleting the file removes the policy.
    #[test]
    fn a_broken_edit_keeps_the_previous_version_of_a_policy_in_force() {
        let deny = |ports: &str| {
            format!("apiVersion: security.sockmesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: deny-x}}\nspec:\n  action: DENY\n  rules:\n  - from:\n    - source: {{principals: [\"cluster.local/ns/default/sa/x\"]}}\n    to:\n    - operation: {{ports: [{ports}]}}\n")
        };
        let files =
            |text: &str| BTreeMap::from([(PathBuf::from("d.yaml"), parse_file(Path::new("d.yaml"), text).unwrap())]);
        let good = assemble(&files(&deny("\"8080\"")), vec![], &BTreeMap::new(), 1, &Model::default());
        assert_eq!(good.authz.len(), 1, "{:?}", good.errors);
        let key = ("default".to_owned(), "deny-x".to_owned());

        let broken = assemble(&files(&deny("\"http\"")), vec![], &BTreeMap::new(), 2, &good);
        assert_eq!(broken.authz.get(&key), good.authz.get(&key), "the DENY in force was lifted");
        assert!(broken.errors[0].contains("previous version stays in force"), "{:?}", broken.errors);
        // Still broken at the next reload: still the last good version.
        let again = assemble(&files(&deny("\"http\"")), vec![], &BTreeMap::new(), 3, &broken);
        assert_eq!(again.authz.get(&key), good.authz.get(&key));

        let never = assemble(&files(&deny("\"http\"")), vec![], &BTreeMap::new(), 1, &Model::default());
        assert!(never.authz.is_empty() && never.errors[0].contains("not applied"), "{:?}", never.errors);
        let deleted = assemble(&BTreeMap::new(), vec![], &BTreeMap::new(), 4, &again);
        assert!(deleted.authz.is_empty());
    }

    /// `kind: Mesh` and `kind: Namespace`: the example errors show parses; the namespace's label
    /// puts its workloads in the mesh; a bad Mesh names its file and line; a Workload cannot
    /// name its own mesh.
    #[test]
    fn meshes_and_namespaces_are_read_and_bad_ones_named() {
        let c = parse_file(Path::new("m.yaml"), mesh_model::mesh::MESH_EXAMPLE).unwrap();
        assert_eq!((c.meshes.len(), c.namespaces.len()), (1, 1));
        let w = parse_file(Path::new("w.yaml"), "kind: Workload\nname: p\nnamespace: pay\nips: [10.0.0.1]\nnode: n1\n")
            .unwrap();
        let files = BTreeMap::from([(PathBuf::from("m.yaml"), c), (PathBuf::from("w.yaml"), w)]);
        let m = assemble(&files, vec![], &BTreeMap::new(), 1, &Model::default());
        assert!(m.errors.is_empty(), "{:?}", m.errors);
        assert_eq!(m.workloads.values().next().unwrap().mesh.as_deref(), Some("payments"));
        assert_eq!(m.meshes["payments"].trust_domain, "payments.example");

        let e = parse_file(
            Path::new("b.yaml"),
            "kind: Workload\nname: w\nips: [10.0.0.1]\nnode: n1\n---\napiVersion: security.sockmesh.io/v1alpha1\nkind: Mesh\nmetadata: {name: default}\nspec: {trustDomain: x.example}\n",
        )
        .unwrap_err();
        assert!(e.starts_with("b.yaml:6:") && e.contains("default mesh"), "{e}");
        let e = parse_file(Path::new("b.yaml"), "apiVersion: security.sockmesh.io/v1alpha1\nkind: Mesh\nmetadata: {name: a}\nspec: {trustDomian: x.example}\n").unwrap_err();
        assert!(e.contains("trustDomian") && e.contains("kind: Mesh"), "{e}");
        let e = parse_file(Path::new("b.yaml"), "kind: Workload\nname: w\nips: [10.0.0.1]\nnode: n1\nmesh: a\n")
            .unwrap_err();
        assert!(e.contains("comes from its namespace"), "{e}");
        let e = parse_file(Path::new("b.yaml"), "apiVersion: v2\nkind: Namespace\nmetadata: {name: a}\n").unwrap_err();
        assert!(e.contains("expected \"v1\""), "{e}");
    }
}
