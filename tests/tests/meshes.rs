//! Several meshes on the same nodes: each a trust boundary with its own trust domain and CA,
//! joined by namespace label. Real agents and controller; the meshes and namespaces are `kind:
//! Mesh` and `kind: Namespace` documents in the controller's configuration directory.
#![cfg(feature = "privileged")]

use std::time::Duration;

use mesh_api::admin::{CertInfo, Meshes};
use mesh_identity::verify::{pem_to_ders, PeerRole, TrustBundle};
use serde_json::Value;
use tests::*;

const APP_PORT: u16 = 8080;

fn echo(t: &Topology, p: PodId, to: &str) -> Value {
    t.pod_app(p, &["echo", "--to", to, "--bytes", "2000", "--timeout-ms", "3000"]).unwrap()
}

fn addr(t: &Topology, p: PodId) -> String {
    format!("{}:{APP_PORT}", t.pod(p).ip)
}

/// A Mesh document; `extra`: more lines of its spec.
fn mesh_doc_with(name: &str, td: &str, trust: &[&str], extra: &str) -> String {
    format!(
        "apiVersion: security.sockmesh.io/v1alpha1\nkind: Mesh\nmetadata: {{name: {name}}}\nspec:\n  trustDomain: {td}\n  trust: [{}]\n{extra}---\n",
        trust.join(", ")
    )
}

fn namespace_doc(name: &str, mesh: &str) -> String {
    format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n  labels: {{sockmesh.io/mesh: {mesh}}}\n---\n")
}

/// The certificates `n`'s agent holds, by identity.
fn certs(t: &Topology, n: NodeId) -> Vec<CertInfo> {
    let (_, body) = http_get(&t.node(n).netns, "127.0.0.1:15000", "/certificates").unwrap();
    serde_json::from_str(&body).unwrap_or_default()
}

/// Waits until `n`'s agent holds a valid certificate for each of `ids`.
fn wait_certs(t: &Topology, n: NodeId, ids: &[String]) {
    let ok = time_until(Duration::from_secs(30), || {
        let have = certs(t, n);
        ids.iter().all(|id| have.iter().any(|c| &c.identity == id && c.ready))
    });
    assert!(ok.is_some(), "node {:?} never held certificates for {ids:?}: {:?}", n.0, certs(t, n));
}

/// Two nodes; on each a pod of team-a (mesh `a`) and of team-b (mesh `b`); a third pod of
/// team-b (its own service account) and a pod outside the mesh, `p`, on n2.
struct Cluster {
    t: Topology,
    n1: NodeId,
    n2: NodeId,
    a1: PodId,
    a2: PodId,
    b1: PodId,
    b2: PodId,
    b3: PodId,
    p: PodId,
}

fn cluster(name: &str, config: &str) -> (Cluster, Controller, Agent, Agent, Vec<Server>) {
    let mut t = Topology::new(name).unwrap();
    let n1 = t.add_node("n1").unwrap();
    let n2 = t.add_node("n2").unwrap();
    let a1 = t.add_pod(n1, "a1", true).unwrap();
    let b1 = t.add_pod(n1, "b1", true).unwrap();
    let a2 = t.add_pod(n2, "a2", true).unwrap();
    let b2 = t.add_pod(n2, "b2", true).unwrap();
    let b3 = t.add_pod(n2, "b3", true).unwrap();
    let p = t.add_pod(n2, "p", false).unwrap();
    for (p, ns) in [(a1, "team-a"), (a2, "team-a"), (b1, "team-b"), (b2, "team-b"), (b3, "team-b")] {
        t.pods[p.0].namespace = ns.into();
    }
    t.write_workloads().unwrap();
    t.write_config("meshes.yaml", config).unwrap();
    let ctl = t.start_controller(&[]).unwrap();
    let servers = [a1, a2, b1, b2, b3].iter().map(|p| t.start_server(*p, APP_PORT).unwrap()).collect();
    let agent1 = t.start_agent(n1, &[]).unwrap();
    let agent2 = t.start_agent(n2, &[]).unwrap();
    t.wait_ready(n1).unwrap();
    t.wait_ready(n2).unwrap();
    (Cluster { t, n1, n2, a1, a2, b1, b2, b3, p }, ctl, agent1, agent2, servers)
}

/// Mesh `a` (certificates of an hour) and mesh `b` (STRICT by default).
fn two_meshes(trust_a: &[&str]) -> String {
    let mut y = mesh_doc_with("a", "a.example", trust_a, "  certTtlSeconds: 3600\n");
    y.push_str(&mesh_doc_with("b", "b.example", &[], "  mtlsMode: STRICT\n"));
    y.push_str(&namespace_doc("team-a", "a"));
    y.push_str(&namespace_doc("team-b", "b"));
    y
}

fn id(td: &str, ns: &str, sa: &str) -> String {
    format!("spiffe://{td}/ns/{ns}/sa/{sa}")
}

/// Within each mesh pods talk over mutual TLS (and on one node through the local relay); a pod
/// of mesh `a` connecting to a pod of mesh `b`, on another node or the same one, is refused at
/// the handshake: both agents count and log `other_mesh`, and the app in `b` never sees it.
/// Each mesh's certificates chain to its own root only.
#[test]
fn two_meshes_on_the_same_nodes_are_isolated() {
    let (c, _ctl, agent1, agent2, servers) = cluster("mesh-iso", &two_meshes(&[]));
    let Cluster { t, n1, n2, a1, a2, b1, b2, p, .. } = c;
    wait_certs(&t, n1, &[id("a.example", "team-a", "sa-a1"), id("b.example", "team-b", "sa-b1")]);
    wait_certs(&t, n2, &[id("a.example", "team-a", "sa-a2"), id("b.example", "team-b", "sa-b2")]);

    // Within a mesh: across nodes (mutual TLS) and on one node.
    for (from, to) in [(a1, a2), (b1, b2), (a2, a1), (b2, b1)] {
        let r = echo(&t, from, &addr(&t, to));
        assert_eq!(r["ok"], true, "{} -> {}: {r}", t.pod(from).name, t.pod(to).name);
    }
    let a2_line =
        || agent1.access_log().into_iter().find(|l| l["direction"] == "outbound" && l["dst_workload"] == "team-a/a2");
    let _ = wait_for(Duration::from_secs(10), || Ok(a2_line().is_some()));
    let line = a2_line().expect("a1 -> a2 logged");
    assert_eq!(line["connection_security_policy"], "mutual_tls", "{line}");
    assert_eq!((line["src_mesh"].as_str(), line["dst_mesh"].as_str()), (Some("a"), Some("a")), "{line}");

    // Across meshes: refused, whichever node.
    let b2_seen = servers[3].accepted().unwrap().len();
    let b1_seen = servers[2].accepted().unwrap().len();
    for to in [b2, b1] {
        let r = echo(&t, a1, &addr(&t, to));
        assert_eq!(r["ok"], false, "a1 -> {} was let through: {r}", t.pod(to).name);
    }
    assert_eq!(servers[3].accepted().unwrap().len(), b2_seen, "b2's app saw a connection from mesh a");
    assert_eq!(servers[2].accepted().unwrap().len(), b1_seen, "b1's app saw a connection from mesh a");

    // Counted by both agents with the reason, and logged.
    let other = |n: NodeId, dir: &str| {
        metric(&scrape(&t, n), "sockmesh_handshake_failures_total", &[("direction", dir), ("reason", "other_mesh")])
            .unwrap_or(0.0)
    };
    assert!(other(n1, "outbound") >= 2.0, "n1 (the source) did not count other_mesh:\n{}", scrape(&t, n1));
    assert!(other(n2, "inbound") >= 1.0, "n2 (b2's agent) did not count other_mesh:\n{}", scrape(&t, n2));
    assert!(other(n1, "inbound") >= 1.0, "n1 did not count the same-node refusal for b1");
    let refused: Vec<Value> = agent1.access_log().into_iter().filter(|l| l["result"] == "other_mesh").collect();
    assert!(
        refused.iter().any(|l| l["direction"] == "outbound" && l["dst_workload"] == "team-b/b2"),
        "no outbound other_mesh line for b2: {refused:?}"
    );
    assert!(
        refused.iter().any(|l| l["direction"] == "inbound" && l["dst_workload"] == "team-b/b1"),
        "no inbound other_mesh line for b1 (same node): {refused:?}"
    );
    let n2_log = agent2.log_lines();
    assert!(
        n2_log.iter().any(|l| l["message"] == "HBONE handshake refused" && l["reason"] == "other_mesh"),
        "b2's agent did not log the refusal with its reason"
    );

    // A mesh's defaults: b is STRICT (plaintext from a pod outside the mesh refused), a is
    // PERMISSIVE (let through).
    assert_eq!(echo(&t, p, &addr(&t, b2))["ok"], false, "plaintext reached b2 although mesh b is STRICT");
    assert_eq!(echo(&t, p, &addr(&t, a2))["ok"], true, "mesh a is PERMISSIVE");

    // Each mesh's certificates chain to its root, and to no other mesh's: the chains as
    // `meshctl certs -o json` shows them.
    let root =
        |mesh: &str| std::fs::read_to_string(t.controller_dir().join("meshes").join(mesh).join("root.pem")).unwrap();
    let default_root = std::fs::read_to_string(t.controller_dir().join("root.pem")).unwrap();
    let out = t.node_command(n1, bin("meshctl")).unwrap().args(["-o", "json", "certs"]).output().unwrap();
    let held: Vec<CertInfo> = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("meshctl certs -o json: {e}: {}", String::from_utf8_lossy(&out.stdout)));
    // Mesh a's certificates live an hour (its certTtlSeconds), back-dated a minute.
    let a1_cert = held.iter().find(|c| c.identity == id("a.example", "team-a", "sa-a1")).unwrap();
    assert_eq!(a1_cert.not_after.unwrap() - a1_cert.not_before.unwrap(), 3600 + 60, "{a1_cert:?}");
    for (identity, td, own, others) in [
        (id("a.example", "team-a", "sa-a1"), "a.example", root("a"), [root("b"), default_root.clone()]),
        (id("b.example", "team-b", "sa-b1"), "b.example", root("b"), [root("a"), default_root.clone()]),
    ] {
        let c = held.iter().find(|c| c.identity == identity).unwrap_or_else(|| panic!("no {identity}: {held:?}"));
        let chain: Vec<_> = c.chain.iter().flat_map(|p| pem_to_ders(p)).collect();
        assert!(!chain.is_empty(), "{identity}: no chain in the admin API");
        let verify = |roots: &str| {
            TrustBundle::from_pems(td, &[roots.to_owned()]).unwrap().verify_peer(
                &chain[0],
                &chain[1..],
                PeerRole::Client,
                rustls_pki_types::UnixTime::now(),
                None,
            )
        };
        assert!(verify(&own).is_ok(), "{identity} does not chain to its mesh's root");
        for other in &others {
            assert!(verify(other).is_err(), "{identity} chains to another mesh's root");
        }
    }

    // meshctl meshes shows both, with their namespaces.
    let out = t.node_command(n1, bin("meshctl")).unwrap().args(["-o", "json", "meshes"]).output().unwrap();
    let m: Meshes =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    let a = m.meshes.iter().find(|x| x.name == "a").expect("mesh a listed");
    assert_eq!((a.trust_domain.as_str(), a.namespaces.clone()), ("a.example", vec!["team-a".to_owned()]));
    assert!(a.root_not_after.is_some());
    assert!(m.problems.is_empty(), "{:?}", m.problems);

    // A mesh-wide policy (root namespace) names its mesh: it reaches b's workloads, not a's.
    t.write_config("b-wide.yaml", "apiVersion: security.sockmesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: b-deny-all, namespace: sockmesh-system}\nspec:\n  mesh: b\n  action: DENY\n  rules: [{}]\n").unwrap();
    time_until(Duration::from_secs(30), || echo(&t, b1, &addr(&t, b2))["ok"] == false)
        .expect("mesh b's mesh-wide DENY never took effect");
    assert_eq!(echo(&t, a1, &addr(&t, a2))["ok"], true, "mesh b's mesh-wide policy reached mesh a");

    // A namespace labelled for a mesh that does not exist: reported, and meshctl check says so.
    t.write_config("lost.yaml", &namespace_doc("team-lost", "nope")).unwrap();
    let warned = time_until(Duration::from_secs(30), || {
        let out = t.node_command(n1, bin("meshctl")).unwrap().args(["check"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).contains("no accepted Mesh nope")
    });
    assert!(warned.is_some(), "meshctl check did not warn about team-lost's mesh");
}

/// Federation: mesh `a` accepts identities of `b`, and an ALLOW in team-a names one `b`
/// principal by its trust domain: exactly that principal reaches a1; another `b` principal is
/// refused by policy (it passed the handshake); `b` does not accept `a` back.
#[test]
fn federation_lets_exactly_the_allowed_principal_through() {
    let policy = "apiVersion: security.sockmesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: allow-b2, namespace: team-a}\nspec:\n  selector: {matchLabels: {app: a1}}\n  action: ALLOW\n  rules:\n  - from:\n    - source: {principals: [\"b.example/ns/team-b/sa/sa-b2\"]}\n";
    let (c, _ctl, agent1, _agent2, servers) = cluster("mesh-fed", &(two_meshes(&["b"]) + policy));
    let Cluster { t, n1, n2, a1, b1, b2, b3, a2, .. } = c;
    wait_certs(&t, n1, &[id("a.example", "team-a", "sa-a1"), id("b.example", "team-b", "sa-b1")]);
    wait_certs(&t, n2, &[id("b.example", "team-b", "sa-b2"), id("b.example", "team-b", "sa-b3")]);

    let seen = servers[0].accepted().unwrap().len();
    let r = echo(&t, b2, &addr(&t, a1));
    assert_eq!(r["ok"], true, "the allowed principal of mesh b was refused: {r}");
    assert_eq!(servers[0].accepted().unwrap().len(), seen + 1);
    // Logged when a1's agent sees the connection close, which can follow the client's end.
    let b2_line = || {
        agent1
            .access_log()
            .into_iter()
            .find(|l| l["direction"] == "inbound" && l["src_principal"] == id("b.example", "team-b", "sa-b2"))
    };
    let _ = wait_for(Duration::from_secs(10), || Ok(b2_line().is_some()));
    let line = b2_line().expect("a1's agent logged the b2 connection with its principal");
    assert_eq!((line["src_mesh"].as_str(), line["dst_mesh"].as_str()), (Some("b"), Some("a")), "{line}");

    // Another principal of b: through the handshake (a trusts b), refused by a1's policy.
    let r = echo(&t, b3, &addr(&t, a1));
    assert_eq!(r["ok"], false, "b3 is not allowed: {r}");
    assert!(
        agent1
            .access_log()
            .iter()
            .any(|l| l["result"] == "no_allow_match" && l["src_principal"] == id("b.example", "team-b", "sa-b3")),
        "b3's refusal is a policy decision at a1's agent"
    );
    // Same node, b1 (not allowed either).
    assert_eq!(echo(&t, b1, &addr(&t, a1))["ok"], false);
    assert_eq!(servers[0].accepted().unwrap().len(), seen + 1, "a1's app saw a refused connection");

    // b does not accept a: refused at the handshake.
    let r = echo(&t, a2, &addr(&t, b2));
    assert_eq!(r["ok"], false, "mesh b accepted mesh a without trusting it: {r}");
    let n2_other = metric(
        &scrape(&t, n2),
        "sockmesh_handshake_failures_total",
        &[("direction", "inbound"), ("reason", "other_mesh")],
    );
    assert!(n2_other.unwrap_or(0.0) >= 1.0, "{}", scrape(&t, n2));

    // The trust withdrawn: b2 is refused again, although its agent has a tunnel to a1 open
    // from before (the pool drops it, and a1's agent checks every new stream).
    t.write_config("meshes.yaml", &(two_meshes(&[]) + policy)).unwrap();
    time_until(Duration::from_secs(30), || echo(&t, b2, &addr(&t, a1))["ok"] == false)
        .expect("b2 still reaches a1 after mesh a stopped trusting mesh b");
    let after = servers[0].accepted().unwrap().len();
    for _ in 0..3 {
        assert_eq!(echo(&t, b2, &addr(&t, a1))["ok"], false, "b2 let through again");
    }
    assert_eq!(servers[0].accepted().unwrap().len(), after, "a1's app saw a connection after the trust ended");
}

/// A namespace relabelled from mesh `a` to mesh `b`: its pod gets a `b` certificate (no
/// restart), then reaches `b`'s pods and no longer `a`'s. A tunnel it held to an `a` pod
/// with the old identity is closed.
#[test]
fn a_namespace_moved_to_another_mesh_changes_its_pods_certificates_and_peers() {
    let mut t = Topology::new("mesh-move").unwrap();
    let n1 = t.add_node("n1").unwrap();
    let n2 = t.add_node("n2").unwrap();
    let x = t.add_pod(n1, "x", true).unwrap();
    let a2 = t.add_pod(n2, "a2", true).unwrap();
    let b2 = t.add_pod(n2, "b2", true).unwrap();
    for (p, ns) in [(x, "team-x"), (a2, "team-a"), (b2, "team-b")] {
        t.pods[p.0].namespace = ns.into();
    }
    t.write_workloads().unwrap();
    let config = |x_mesh: &str| {
        let mut y = two_meshes(&[]);
        y.push_str(&namespace_doc("team-x", x_mesh));
        y
    };
    t.write_config("meshes.yaml", &config("a")).unwrap();
    let _ctl = t.start_controller(&[]).unwrap();
    let _servers: Vec<Server> = [a2, b2].iter().map(|p| t.start_server(*p, APP_PORT).unwrap()).collect();
    let agent1 = t.start_agent(n1, &[]).unwrap();
    let _agent2 = t.start_agent(n2, &[]).unwrap();
    t.wait_ready(n1).unwrap();
    t.wait_ready(n2).unwrap();
    wait_certs(&t, n1, &[id("a.example", "team-x", "sa-x")]);
    assert_eq!(echo(&t, x, &addr(&t, a2))["ok"], true, "x (mesh a) -> a2");
    assert_eq!(echo(&t, x, &addr(&t, b2))["ok"], false, "x (mesh a) -> b2 let through");

    // A long-lived connection from x to a2, made while x is in mesh a.
    let held = t.spawn_pod_app(x, &["linger", "--to", &addr(&t, a2), "--seconds", "30"]).expect("a held connection");
    std::thread::sleep(Duration::from_millis(500));

    t.write_config("meshes.yaml", &config("b")).unwrap();
    wait_certs(&t, n1, &[id("b.example", "team-x", "sa-x")]);
    let took = time_until(Duration::from_secs(30), || echo(&t, x, &addr(&t, b2))["ok"] == true)
        .expect("x never reached b2 after moving to mesh b");
    eprintln!("x reached mesh b {took:?} after its certificate");
    assert_eq!(echo(&t, x, &addr(&t, a2))["ok"], false, "x (now mesh b) still reaches a2");
    // The old identity is dropped with its last workload.
    let old = id("a.example", "team-x", "sa-x");
    let dropped = time_until(Duration::from_secs(10), || !certs(&t, n1).iter().any(|c| c.identity == old));
    assert!(dropped.is_some(), "the mesh-a certificate of x is still held: {:?}", certs(&t, n1));
    // The connection made with the old identity was closed (not left running to mesh a).
    let r = held.result().unwrap();
    assert_eq!(
        (r["ok"].as_bool(), r["closed_by_peer"].as_bool()),
        (Some(true), Some(true)),
        "the tunnel made with x's old identity stayed open: {r}"
    );
    assert!(agent1.log_text().contains("its tunnels made with the old one are closed"));

    // Relabelled for a mesh that does not exist: x is refused, not left in mesh b until its
    // certificate expires.
    t.write_config("meshes.yaml", &config("nope")).unwrap();
    let in_b = id("b.example", "team-x", "sa-x");
    let dropped = time_until(Duration::from_secs(30), || !certs(&t, n1).iter().any(|c| c.identity == in_b));
    assert!(dropped.is_some(), "x kept its mesh-b certificate: {:?}", certs(&t, n1));
    assert_eq!(echo(&t, x, &addr(&t, b2))["ok"], false, "x, in no mesh now, still reaches b2");
}
