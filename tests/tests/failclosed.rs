//! Fail closed everywhere: each test is an attack or a failure that used to let traffic through
//! in plaintext, or knock the node over, reproduced on a live mesh.
#![cfg(feature = "privileged")]

use std::time::Duration;

use serde_json::{json, Value};
use tests::*;

const APP_PORT: u16 = 8080;

fn echo(t: &Topology, p: PodId, to: &str) -> Value {
    t.pod_app(p, &["echo", "--to", to, "--bytes", "2000", "--timeout-ms", "2000"]).unwrap()
}

/// MPTCP sockets are captured and carried through the mesh (the agent's listener speaks TCP,
/// so the connection falls back to TCP there), and however many a pod opens and closes, none
/// leaves an entry behind in the node's original-destination map (their kernel subflows are
/// never released through the cgroup hook, which used to leak one entry per connection until
/// every pod of the node was refused).
#[test]
fn mptcp_connections_are_carried_and_leave_no_map_entries_behind() {
    let mut m = Topology::two_node_mesh("mptcp").unwrap();
    let Running { ctl: _ctl, server: _server, agent1, agent2: _agent2 } = m.start(APP_PORT).unwrap();
    let Mesh { t, a, b, .. } = m;
    let to = t.addr(b, APP_PORT);

    let r = t.pod_app(a, &["echo", "--to", &to, "--bytes", "100000", "--mptcp"]).unwrap();
    assert_eq!((r["ok"].as_bool(), r["wire_peer"].as_str()), (Some(true), Some("127.0.0.1:15001")), "{r}");
    wait_for(Duration::from_secs(5), || Ok(!agent1.access_log().is_empty())).unwrap();
    assert_eq!(agent1.access_log()[0]["connection_security_policy"], "mutual_tls");

    let entries = || -> anyhow::Result<u64> { Ok(agent1.stats()?.maps["SM_ORIG_DST"].entries) };
    wait_for(Duration::from_secs(10), || Ok(entries()? == 0)).unwrap();
    let r = t.pod_app(a, &["churn", "--to", &to, "--count", "10000", "--mptcp", "--timeout-ms", "10000"]).unwrap();
    assert_eq!(r["ok"].as_u64().unwrap() + r["failed"].as_u64().unwrap(), 10_000, "{r}");
    assert!(r["ok"].as_u64().unwrap() > 0, "{r}");
    // Back to where it was: every entry went with its socket, removed by the kernel's hooks
    // as the socket closed — not left for the agent's census to find.
    let back = wait_for(Duration::from_secs(60), || Ok(entries()? == 0));
    assert!(back.is_ok(), "{} entries left after 10,000 MPTCP connections: {:?}", entries().unwrap(), agent1.stats());
    let stats = agent1.stats().unwrap();
    assert_eq!(stats.reclaimed_entries, 0, "the census had to remove entries the hooks left: {stats:?}");
    // None was lost to the tunnel (a peer that refused streams it still counted open used to
    // end the pooled connection, and every stream on it, after 1,024 refusals: h2_error).
    assert!(!stats.outbound.refused.contains_key("h2_error"), "{stats:?}");
    assert!(stats.kernel["closed_unreleased"] > 0, "{stats:?}");
    // And the node still carries connections, once both agents have worked through what the
    // churn left queued (how long that takes is the machine's speed, not the mesh's: on a fast
    // one the next connection can come while the destination still answers the churn's last
    // streams, and wait past its 2 s). A node that stopped carrying never gets there.
    let mut r = Value::Null;
    let carried = time_until(Duration::from_secs(30), || {
        r = echo(&t, a, &to);
        r["ok"] == true
    });
    assert!(carried.is_some(), "{r} {:?}", agent1.stats());
    eprintln!("after the churn, a connection was carried again after {carried:?}");
}

/// An agent restarted while the controller is away enforces the configuration it had, from the
/// first connection: the policy that denies a client and the STRICT mode that refuses
/// plaintext are kept on disk. A meshed pod's connections never leave in plaintext meanwhile,
/// though this node learned the destination only from the controller.
#[test]
fn a_restarted_agent_enforces_the_last_configuration_without_the_controller() {
    let mut t = Topology::new("lastconfig").unwrap();
    let n1 = t.add_node("n1").unwrap();
    let n2 = t.add_node("n2").unwrap();
    let a = t.add_pod(n1, "a", true).unwrap();
    let p = t.add_pod(n1, "p", false).unwrap();
    let b = t.add_pod(n2, "b", true).unwrap();
    let b2 = t.add_pod(n2, "b2", true).unwrap();
    t.write_workloads().unwrap();
    // Each agent's own file names only its pods: the other node's come from the controller.
    t.write_local_workloads(n1).unwrap();
    t.write_local_workloads(n2).unwrap();
    t.write_config("allow.yaml", "apiVersion: security.sockmesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: only-a, namespace: default}\nspec:\n  selector: {matchLabels: {app: b}}\n  rules:\n  - from:\n    - source: {principals: [\"cluster.local/ns/default/sa/sa-a\"]}\n").unwrap();
    t.write_config("strict.yaml", "apiVersion: security.sockmesh.io/v1alpha1\nkind: PeerAuthentication\nmetadata: {name: b2-strict, namespace: default}\nspec:\n  selector: {matchLabels: {app: b2}}\n  mtls: {mode: STRICT}\n").unwrap();
    let mut ctl = t.start_controller(&[]).unwrap();
    let server_b = t.start_server(b, APP_PORT).unwrap();
    let server_b2 = t.start_server(b2, APP_PORT).unwrap();
    let mut agent1 = t.start_agent(n1, &[]).unwrap();
    let mut agent2 = t.start_agent(n2, &[]).unwrap();
    t.wait_ready(n1).unwrap();
    t.wait_ready(n2).unwrap();
    let (to_b, to_b2) = (t.addr(b, APP_PORT), t.addr(b2, APP_PORT));
    assert_eq!(echo(&t, a, &to_b)["ok"], true, "a -> b must be allowed");
    assert_eq!(echo(&t, p, &to_b)["ok"], false, "plaintext p -> b must be denied (only sa-a)");
    assert_eq!(echo(&t, p, &to_b2)["ok"], false, "plaintext p -> b2 must be refused (STRICT)");

    ctl.stop();
    agent1.kill().unwrap();
    agent2.kill().unwrap();
    let (seen_b, seen_b2) = (server_b.accepted().unwrap().len(), server_b2.accepted().unwrap().len());
    let _agent1 = t.start_agent(n1, &[]).unwrap();
    let agent2 = t.start_agent(n2, &[]).unwrap();
    let mut cap = Capture::start(&t.fabric, "br0", t.dir.join("fabric.pcap")).unwrap();
    // The first attempt of each is refused.
    assert_eq!(echo(&t, p, &to_b)["ok"], false, "the denied client got through after the restart");
    assert_eq!(echo(&t, p, &to_b2)["ok"], false, "plaintext got through STRICT after the restart");
    // a has no certificate now (the controller is away): refused, not sent in plaintext.
    assert_eq!(echo(&t, a, &to_b)["ok"], false);
    cap.stop();
    assert_eq!((server_b.accepted().unwrap().len(), server_b2.accepted().unwrap().len()), (seen_b, seen_b2));
    let a_ip = t.pod(a).ip;
    assert_eq!(
        cap.count(&format!("src host {a_ip} and tcp port {APP_PORT}")).unwrap(),
        0,
        "a's traffic left in plaintext"
    );
    let refused: Vec<Value> = agent2.access_log().into_iter().filter(|l| l["decision"] == "deny").collect();
    assert!(refused.iter().any(|l| l["result"] == "no_allow_match"), "{refused:?}");
    assert!(refused.iter().any(|l| l["result"] == "mtls_strict"), "{refused:?}");
}

/// The mesh's own ports are exempt only on the pod's own loopback: a meshed pod's connection to
/// another node's agent (metrics, admin, readiness) is captured and refused, and a destination
/// inside the mesh's pod ranges that is no known workload is refused too. Neither is ever on
/// the wire in plaintext.
#[test]
fn mesh_ports_and_unknown_mesh_addresses_never_leave_in_plaintext() {
    let mut t = Topology::new("meshports").unwrap();
    let n1 = t.add_node("n1").unwrap();
    let n2 = t.add_node("n2").unwrap();
    let a = t.add_pod(n1, "a", true).unwrap();
    let b = t.add_pod(n2, "b", true).unwrap();
    t.write_workloads().unwrap();
    let _ctl = t.start_controller(&[]).unwrap();
    let _server = t.start_server(b, APP_PORT).unwrap();
    let agent1 = t.start_agent(n1, &["--mesh-cidr", "10.20.0.0/16"]).unwrap();
    let _agent2 = t.start_agent(n2, &[]).unwrap();
    t.wait_ready(n1).unwrap();
    t.wait_ready(n2).unwrap();
    let metrics = format!("{}:15020", t.node(n2).underlay_ip);
    let unknown = "10.20.2.99:8080";
    let mut cap = Capture::start(&t.fabric, "br0", t.dir.join("fabric.pcap")).unwrap();
    for to in [metrics.as_str(), unknown] {
        let r = echo(&t, a, to);
        assert_eq!(r["ok"], false, "{to}: {r}");
    }
    // Still carried: a known workload.
    assert_eq!(echo(&t, a, &t.addr(b, APP_PORT))["ok"], true);
    cap.stop();
    assert_eq!(cap.count("tcp port 15020").unwrap(), 0, "a connection to another node's metrics crossed the wire");
    assert_eq!(cap.count("host 10.20.2.99").unwrap(), 0, "a connection to an unknown mesh address crossed the wire");
    let refused = agent1.stats().unwrap().outbound.refused;
    assert_eq!(refused.get("mesh_port"), Some(&1), "{refused:?}");
    assert_eq!(refused.get("unknown_mesh_destination"), Some(&1), "{refused:?}");
}

/// A pod cannot opt itself out of the mesh by taking the agent's port in its netns: its
/// registration fails, so its cgroup stays redirected and refused — connects fail at once,
/// never around the agent — readiness names it, a counter says why, and once the port is free
/// the agent captures it on its own.
#[test]
fn a_pod_that_cannot_be_captured_is_refused_reported_and_retried() {
    let Mesh { mut t, n1, n2, a, b } = Topology::two_node_mesh("squat").unwrap();
    let t = &mut t;
    let _ctl = t.start_controller(&[]).unwrap();
    let server = t.start_server(b, APP_PORT).unwrap();
    // The app in a listens on the agent's outbound port before the agent comes.
    let squatter = t.start_server(a, 15001).unwrap();
    let agent1 = t.start_agent(n1, &[]).unwrap();
    let _agent2 = t.start_agent(n2, &[]).unwrap();
    t.wait_ready(n2).unwrap();
    let to = t.addr(b, APP_PORT);

    let r = echo(t, a, &to);
    assert_eq!((r["ok"].as_bool(), r["errno"].as_i64()), (Some(false), Some(libc::EPERM as i64)), "{r}");
    assert!(server.accepted().unwrap().is_empty(), "the app was reached by a pod the agent could not capture");
    let (status, body) = http_get(&t.node(n1).netns, "127.0.0.1:15021", "/healthz/ready").unwrap();
    assert!(status == 503 && body.contains("default/a is not captured") && body.contains("15001"), "{status} {body}");
    let m1 = scrape(t, n1);
    assert_eq!(metric(&m1, "sockmesh_registration_failures_total", &[("reason", "listen")]), Some(1.0), "{m1}");
    assert_eq!(metric(&m1, "sockmesh_workloads_not_captured", &[]), Some(1.0), "{m1}");
    assert!(agent1.stats().unwrap().kernel["refused_not_captured"] >= 1);

    // The port is free again: the agent captures a by itself (it retries every 10 s).
    // SAFETY: a process this test started.
    unsafe { libc::kill(squatter.pid as i32, libc::SIGKILL) };
    wait_for(Duration::from_secs(30), || Ok(echo(t, a, &to)["ok"] == true)).unwrap();
    t.wait_ready(n1).unwrap();
}

/// An update the agent cannot decode (here from a stand-in controller, since the real one
/// validates what it pushes) is refused whole: the policy in force stays — including the DENY
/// the update would have removed — and the refusal is counted and shown by `meshctl policies`.
#[test]
fn an_undecodable_update_is_refused_whole_and_the_last_state_stays() {
    let Mesh { mut t, n1, n2, a, b } = Topology::two_node_mesh("undecodable").unwrap();
    let workload =
        |p| json!({"kind": 1, "namespace": "default", "name": t.pod(p).name, "json": t.workload_json(p).to_string()});
    let deny = json!({"selector": {"matchLabels": {"app": "b"}}, "action": "DENY", "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/default/sa/sa-a"]}}]}]});
    let script = json!([
        {"delayMs": 0, "update": {"snapshot": true, "version": 1, "upserts": [
            workload(a), workload(b),
            {"kind": 2, "namespace": "default", "name": "deny-a", "json": deny.to_string()},
        ]}},
        {"delayMs": 2000, "update": {"version": 2,
            "upserts": [{"kind": 3, "namespace": "default", "name": "broken", "json": "{\"mtls\":{\"mode\":\"SOMETIMES\"}}"}],
            "removals": [{"kind": 2, "namespace": "default", "name": "deny-a"}]}},
    ]);
    let _ctl = t.start_fake_controller(&script).unwrap();
    let _server = t.start_server(b, APP_PORT).unwrap();
    let _agent1 = t.start_agent(n1, &[]).unwrap();
    let _agent2 = t.start_agent(n2, &[]).unwrap();
    t.wait_ready(n1).unwrap();
    t.wait_ready(n2).unwrap();
    let to = t.addr(b, APP_PORT);
    assert_eq!(echo(&t, a, &to)["ok"], false, "the DENY of version 1 is not in force");
    wait_for(Duration::from_secs(20), || {
        Ok(metric(&scrape(&t, n2), "sockmesh_config_updates_refused_total", &[]).unwrap_or(0.0) >= 1.0)
    })
    .unwrap();
    assert_eq!(echo(&t, a, &to)["ok"], false, "a refused update removed the DENY");
    let shown = time_until(Duration::from_secs(20), || {
        let out = t.node_command(n2, bin("meshctl")).unwrap().args(["policies", "-o", "json"]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        text.contains("REFUSED") && text.contains("version 2") && text.contains("SOMETIMES")
    });
    assert!(shown.is_some(), "meshctl policies does not report the refused update");
    assert_eq!(metric(&scrape(&t, n2), "sockmesh_config_version", &[]), Some(1.0));
}

/// A client port reused while the agent had not yet accepted the first connection from it
/// cannot give the second connection's destination to the first (or the first's to the
/// second): each connection's destination is bound to it during its handshake.
#[test]
fn a_reused_client_port_cannot_take_another_connections_destination() {
    let mut m = Topology::two_node_mesh("portreuse").unwrap();
    let Running { ctl: _ctl, server: first, agent1, agent2: _agent2 } = m.start(APP_PORT).unwrap();
    let Mesh { mut t, a, b, .. } = m;
    let second = t.start_server(b, APP_PORT + 1).unwrap();
    let ready = t.dir.join("reuse-ready");
    agent1.pause();
    let app = t
        .spawn_pod_app(
            a,
            &[
                "reuse",
                "--first",
                &t.addr(b, APP_PORT),
                "--second",
                &t.addr(b, APP_PORT + 1),
                "--port",
                "40123",
                "--ready-file",
                ready.to_str().unwrap(),
            ],
        )
        .unwrap();
    let waited = wait_for(Duration::from_secs(10), || Ok(ready.exists()));
    agent1.resume();
    waited.unwrap();
    let r = app.result().unwrap();
    assert_eq!(r["first"]["ok"], true, "{r}");
    assert_eq!(r["second"]["ok"], true, "the second connection lost its destination: {r}");
    // The second server saw exactly the second connection; the first's reset connection went
    // nowhere else.
    assert_eq!(second.accepted().unwrap().len(), 1, "{:?}", second.accepted());
    assert!(first.accepted().unwrap().len() <= 1);
}

/// Where the agent finds an accepted connection's destination is a kernel fact it probes at
/// start: below the programs' cgroup root (as a DaemonSet's agent is) sock_ops binds each
/// destination to the socket the agent accepts; outside it (a plain host whose mesh is one
/// cgroup subtree) sock_ops never sees the agent's sockets and destinations stay keyed by
/// port. Either way connections are carried over mTLS.
#[test]
fn the_agent_finds_destinations_by_connection_below_its_cgroup_root_and_by_port_outside() {
    let Mesh { mut t, n1, n2, a, b } = Topology::two_node_mesh("lookup").unwrap();
    let _ctl = t.start_controller(&[]).unwrap();
    let _server = t.start_server(b, APP_PORT).unwrap();
    // n1's agent outside n1's cgroup root (a sibling of it), n2's below its own.
    let outside = t.cgroup_root.join("n1-agent-outside");
    let agent1 = t.start_agent_in(n1, &outside, &[]).unwrap();
    let _agent2 = t.start_agent(n2, &[]).unwrap();
    t.wait_ready(n1).unwrap();
    t.wait_ready(n2).unwrap();
    let lookup = |n| {
        let (status, body) = http_get(&t.node(n).netns, "127.0.0.1:15000", "/status").unwrap();
        assert_eq!(status, 200, "{body}");
        serde_json::from_str::<Value>(&body).unwrap()["origDstLookup"].as_str().unwrap().to_owned()
    };
    assert_eq!((lookup(n1).as_str(), lookup(n2).as_str()), ("by_port", "by_connection"));

    let r = echo(&t, a, &t.addr(b, APP_PORT));
    assert_eq!((r["ok"].as_bool(), r["wire_peer"].as_str()), (Some(true), Some("127.0.0.1:15001")), "{r}");
    wait_for(Duration::from_secs(5), || Ok(!agent1.access_log().is_empty())).unwrap();
    assert_eq!(agent1.access_log()[0]["connection_security_policy"], "mutual_tls");
    // Nothing was moved to an accepted socket on n1: sock_ops never saw them.
    assert_eq!(agent1.stats().unwrap().kernel["moved_to_accepted"], 0);
}

/// A record that names a cgroup another workload holds can neither take that workload's
/// connections over nor refuse them: it fails closed without touching the cgroup (reported and
/// retried like any failure). When the holder lets go, the failed record inherits the cgroup,
/// refused in place: its processes are never left to connect around the mesh.
#[test]
fn a_record_naming_another_workloads_cgroup_leaves_that_workload_alone() {
    let mut m = Topology::two_node_mesh("sharedcg").unwrap();
    let c = m.t.add_pod(m.n1, "c", false).unwrap();
    let Running { ctl: _ctl, server: _server, agent1, agent2: _agent2 } = m.start(APP_PORT).unwrap();
    let Mesh { t, n1, a, b, .. } = m;
    let to = t.addr(b, APP_PORT);
    let add = |w: &Value| agent1.api(json!({"op": "add_workload", "workload": w}));
    let carried = |what: &str| {
        let before = agent1.access_log().len();
        let r = echo(&t, a, &to);
        assert_eq!(r["ok"], true, "{what}: {r}");
        wait_for(Duration::from_secs(5), || Ok(agent1.access_log().len() > before)).unwrap();
        let last = agent1.access_log().last().cloned().unwrap();
        assert_eq!(
            (last["src_workload"].as_str(), last["connection_security_policy"].as_str()),
            (Some("default/a"), Some("mutual_tls")),
            "{what}: {last}"
        );
    };
    carried("before");

    // A record with a's cgroup that cannot be captured at all (its netns does not exist).
    let mut broken = t.workload_json(c);
    broken["name"] = json!("c2");
    broken["ips"] = json!(["10.20.1.99"]);
    broken["netns"] = json!("/run/netns/sockmesh-test-does-not-exist");
    broken["cgroup"] = json!(t.pod(a).cgroup);
    assert!(add(&broken).is_err());
    carried("after a record naming its cgroup failed to register");

    // c's own netns, but a's cgroup.
    let mut twin = t.workload_json(c);
    twin["name"] = json!("c-twin");
    twin["cgroup"] = json!(t.pod(a).cgroup);
    let err = add(&twin).unwrap_err().to_string();
    assert!(err.contains("already used by workload default/a"), "{err}");
    carried("after a record sharing its cgroup was refused");
    let m1 = scrape(&t, n1);
    assert_eq!(metric(&m1, "sockmesh_registration_failures_total", &[("reason", "shared_cgroup")]), Some(1.0), "{m1}");
    let (status, body) = http_get(&t.node(n1).netns, "127.0.0.1:15021", "/healthz/ready").unwrap();
    assert!(status == 503 && body.contains("default/c-twin is not captured"), "{status} {body}");

    // The holder lets go: c, added through the API, holds its cgroup; a record naming that
    // cgroup fails; c is removed. c's processes are refused at once (the failed record's
    // cgroup, refused in place), not sent to b around the mesh.
    add(&t.workload_json(c)).unwrap();
    let mut heir = broken.clone();
    heir["name"] = json!("c3");
    heir["ips"] = json!(["10.20.1.98"]);
    heir["cgroup"] = json!(t.pod(c).cgroup);
    assert!(add(&heir).is_err());
    agent1.api(json!({"op": "remove_workload", "namespace": "default", "name": "c"})).unwrap();
    let r = echo(&t, c, &to);
    assert_eq!((r["ok"].as_bool(), r["errno"].as_i64()), (Some(false), Some(libc::EPERM as i64)), "{r}");
}
