//! L4 authorization and PeerAuthentication, written to the controller's config directory and
//! enforced by the agents without restarts.
#![cfg(feature = "privileged")]

use std::time::Duration;

use tests::*;

const APP_PORT: u16 = 8080;

fn deny_from_a() -> &'static str {
    "apiVersion: security.sockmesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: deny-a, namespace: default}\nspec:\n  selector: {matchLabels: {app: b}}\n  action: DENY\n  rules:\n  - from:\n    - source: {principals: [\"cluster.local/ns/default/sa/sa-a\"]}\n"
}

fn echo_ok(t: &Topology, p: PodId, to: &str) -> bool {
    t.pod_app(p, &["echo", "--to", to, "--bytes", "2000", "--timeout-ms", "1000"]).unwrap()["ok"] == true
}

/// One node with two meshed pods, a and b, and its workloads file written.
fn one_node(name: &str) -> (Topology, NodeId, PodId, PodId) {
    Topology::one_node_mesh(name).unwrap()
}

/// A DENY written to the controller's config directory reaches the destination's agent and is
/// enforced without a restart; removing it restores traffic. How fast is the agents' business
/// to report (`sockmesh_config_push_lag_milliseconds`), not this test's verdict: the bounds
/// below are liveness bounds, generous enough for an emulated machine.
#[test]
fn a_deny_policy_takes_effect_and_its_removal_restores_traffic() {
    let mut t = Topology::new("deny").unwrap();
    let n1 = t.add_node("n1").unwrap();
    let n2 = t.add_node("n2").unwrap();
    let a = t.add_pod(n1, "a", true).unwrap();
    let c = t.add_pod(n1, "c", true).unwrap();
    let b = t.add_pod(n2, "b", true).unwrap();
    t.write_workloads().unwrap();
    let _ctl = t.start_controller(&[]).unwrap();
    let server = t.start_server(b, APP_PORT).unwrap();
    let agent1 = t.start_agent(n1, &[]).unwrap();
    let agent2 = t.start_agent(n2, &[]).unwrap();
    t.wait_ready(n1).unwrap();
    t.wait_ready(n2).unwrap();
    let pids = (agent1.pid(), agent2.pid());
    let to = format!("{}:{APP_PORT}", t.pod(b).ip);
    assert!(echo_ok(&t, a, &to) && echo_ok(&t, c, &to));

    t.write_config("deny-a.yaml", deny_from_a()).unwrap();
    let took = time_until(Duration::from_secs(30), || !echo_ok(&t, a, &to))
        .expect("A->B still allowed 30 s after the DENY policy");
    eprintln!("the DENY took effect after {took:?}");
    let seen_before = server.accepted().unwrap().len();
    for _ in 0..3 {
        assert!(!echo_ok(&t, a, &to), "A->B allowed under DENY");
        assert!(echo_ok(&t, c, &to), "C->B refused by a policy about A");
    }
    assert_eq!(server.accepted().unwrap().len(), seen_before + 3, "the app saw a denied connection");
    // Refused at B's agent with its reason, visible in metrics and the access log.
    let line = agent2.access_log().into_iter().find(|l| l["result"] == "deny_policy").expect("a deny line");
    assert_eq!(line["decision"], "deny");
    assert_eq!(line["src_principal"], "spiffe://cluster.local/ns/default/sa/sa-a");
    let (_, m) = http_get(&t.node(n2).netns, "127.0.0.1:15020", "/metrics").unwrap();
    assert!(metric(&m, "sockmesh_connections_refused_total", &[("reason", "deny_policy")]).unwrap() >= 4.0, "{m}");
    // The source agent saw its tunnel refused with 401.
    assert!(agent1.access_log().iter().any(|l| l["result"] == "denied_by_destination"));

    t.remove_config("deny-a.yaml").unwrap();
    let took = time_until(Duration::from_secs(30), || echo_ok(&t, a, &to))
        .expect("A->B still denied 30 s after the policy was removed");
    eprintln!("removing the DENY took effect after {took:?}");
    assert_eq!((agent1.pid(), agent2.pid()), pids, "no agent restart");
}

#[test]
fn strict_refuses_plaintext_and_permissive_allows_it_unless_policy_denies() {
    let mut t = Topology::new("strict").unwrap();
    let n1 = t.add_node("n1").unwrap();
    let n2 = t.add_node("n2").unwrap();
    let a = t.add_pod(n1, "a", true).unwrap();
    let plain = t.add_pod(n1, "p", false).unwrap();
    let b = t.add_pod(n2, "b", true).unwrap();
    t.write_workloads().unwrap();
    let _ctl = t.start_controller(&[]).unwrap();
    let server = t.start_server(b, APP_PORT).unwrap();
    let _agent1 = t.start_agent(n1, &[]).unwrap();
    let _agent2 = t.start_agent(n2, &[]).unwrap();
    t.wait_ready(n1).unwrap();
    t.wait_ready(n2).unwrap();
    let to = format!("{}:{APP_PORT}", t.pod(b).ip);
    let from_node = |t: &Topology| {
        t.node_app(n2, &["echo", "--to", &to, "--bytes", "2000", "--timeout-ms", "1000"]).unwrap()["ok"] == true
    };

    // PERMISSIVE (the default): plaintext from a non-meshed pod and from the node gets through.
    assert!(echo_ok(&t, plain, &to) && from_node(&t) && echo_ok(&t, a, &to));

    t.write_config("strict.yaml", "apiVersion: security.sockmesh.io/v1alpha1\nkind: PeerAuthentication\nmetadata: {name: b-strict, namespace: default}\nspec:\n  selector: {matchLabels: {app: b}}\n  mtls: {mode: STRICT}\n").unwrap();
    time_until(Duration::from_secs(30), || !echo_ok(&t, plain, &to)).expect("plaintext still allowed under STRICT");
    let before = server.accepted().unwrap().len();
    assert!(!from_node(&t), "a process on the node reached b's app in plaintext under STRICT");
    assert!(!echo_ok(&t, plain, &to));
    assert!(echo_ok(&t, a, &to), "mTLS must still work under STRICT");
    assert_eq!(server.accepted().unwrap().len(), before + 1, "plaintext reached the app under STRICT");

    // PERMISSIVE again, with an ALLOW policy for sa-a only: plaintext (no identity) is denied.
    t.write_config("strict.yaml", "apiVersion: security.sockmesh.io/v1alpha1\nkind: PeerAuthentication\nmetadata: {name: b-strict, namespace: default}\nspec:\n  mtls: {mode: PERMISSIVE}\n").unwrap();
    t.write_config("allow.yaml", "apiVersion: security.sockmesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: only-a, namespace: default}\nspec:\n  selector: {matchLabels: {app: b}}\n  rules:\n  - from:\n    - source: {principals: [\"cluster.local/ns/default/sa/sa-a\"]}\n").unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    assert!(echo_ok(&t, a, &to));
    assert!(!echo_ok(&t, plain, &to), "PERMISSIVE plaintext must still pass policy");
    t.remove_config("allow.yaml").unwrap();
    time_until(Duration::from_secs(30), || echo_ok(&t, plain, &to))
        .expect("PERMISSIVE without policy should allow plaintext");
}

#[test]
fn labels_select_policies_but_never_change_identity_and_dots_match_literally() {
    let mut t = Topology::new("labels").unwrap();
    let n1 = t.add_node("n1").unwrap();
    let n2 = t.add_node("n2").unwrap();
    let a = t.add_pod(n1, "a", true).unwrap();
    let d = t.add_pod(n1, "d", true).unwrap();
    let b = t.add_pod(n2, "b", true).unwrap();
    t.pods[a.0].service_account = "my.sa".into();
    t.pods[d.0].service_account = "myxsa".into();
    t.write_workloads().unwrap();
    let _ctl = t.start_controller(&[]).unwrap();
    let _server = t.start_server(b, APP_PORT).unwrap();
    let _agent1 = t.start_agent(n1, &[]).unwrap();
    let agent2 = t.start_agent(n2, &[]).unwrap();
    t.wait_ready(n1).unwrap();
    t.wait_ready(n2).unwrap();
    let to = format!("{}:{APP_PORT}", t.pod(b).ip);

    assert!(echo_ok(&t, d, &to), "myxsa refused before any policy");
    // Only my.sa, literally: "myxsa" is not matched by the '.'.
    t.write_config("allow.yaml", "apiVersion: security.sockmesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: only-dotted, namespace: default}\nspec:\n  selector: {matchLabels: {app: b}}\n  rules:\n  - from:\n    - source: {principals: [\"cluster.local/ns/default/sa/my.sa\"]}\n").unwrap();
    time_until(Duration::from_secs(30), || !echo_ok(&t, d, &to)).expect("myxsa still allowed");
    assert!(echo_ok(&t, a, &to), "my.sa refused");
    assert!(!echo_ok(&t, d, &to), "myxsa matched my.sa");

    // Relabel b (app: b -> app: b2): the policy no longer selects it, so d gets through; b's
    // identity is what it was.
    t.pods[b.0].labels = vec![("app".into(), "b2".into())];
    t.write_controller_workloads(&[]).unwrap();
    time_until(Duration::from_secs(30), || echo_ok(&t, d, &to)).expect("the label change did not deselect the policy");
    let last = agent2.access_log().into_iter().rfind(|l| l["result"] == "ok").unwrap();
    assert_eq!(last["dst_principal"], "spiffe://cluster.local/ns/default/sa/sa-b", "{last}");
    assert_eq!(last["src_principal"], "spiffe://cluster.local/ns/default/sa/myxsa", "{last}");
}

#[test]
fn agents_keep_enforcing_while_the_controller_is_away_and_catch_up_when_it_returns() {
    let Mesh { mut t, n1, n2, a, b } = Topology::two_node_mesh("ctlrestart").unwrap();
    let mut ctl = t.start_controller(&[]).unwrap();
    let _server = t.start_server(b, APP_PORT).unwrap();
    let _agent1 = t.start_agent(n1, &[]).unwrap();
    let _agent2 = t.start_agent(n2, &[]).unwrap();
    t.wait_ready(n1).unwrap();
    t.wait_ready(n2).unwrap();
    let to = format!("{}:{APP_PORT}", t.pod(b).ip);
    assert!(echo_ok(&t, a, &to), "a -> b refused before any policy");
    t.write_config("deny-a.yaml", deny_from_a()).unwrap();
    time_until(Duration::from_secs(30), || !echo_ok(&t, a, &to)).expect("DENY not applied");

    ctl.stop();
    t.remove_config("deny-a.yaml").unwrap();
    for _ in 0..3 {
        assert!(!echo_ok(&t, a, &to), "the last state (DENY) was lost while the controller was away");
        std::thread::sleep(Duration::from_millis(300));
    }
    let _ctl = t.start_controller(&[]).unwrap();
    time_until(Duration::from_secs(10), || echo_ok(&t, a, &to))
        .expect("new state not picked up after the controller returned");
}

#[test]
fn an_invalid_policy_is_reported_on_every_node_and_never_half_applied() {
    let mut t = Topology::new("invalid").unwrap();
    let n1 = t.add_node("n1").unwrap();
    let n2 = t.add_node("n2").unwrap();
    let a = t.add_pod(n1, "a", true).unwrap();
    let c = t.add_pod(n1, "c", true).unwrap();
    let b = t.add_pod(n2, "b", true).unwrap();
    t.write_workloads().unwrap();
    let ctl = t.start_controller(&[]).unwrap();
    let _server = t.start_server(b, APP_PORT).unwrap();
    // The agents connect well after the controller accepted its configuration: the snapshot
    // they get first is that old, and its age is not a push lag.
    std::thread::sleep(Duration::from_secs(1));
    let _agent1 = t.start_agent(n1, &[]).unwrap();
    let _agent2 = t.start_agent(n2, &[]).unwrap();
    t.wait_ready(n1).unwrap();
    t.wait_ready(n2).unwrap();
    let (_, m) = http_get(&t.node(n1).netns, "127.0.0.1:15020", "/metrics").unwrap();
    assert_eq!(metric(&m, "sockmesh_config_push_lag_milliseconds", &[]), Some(0.0), "a snapshot counted as lag: {m}");
    let to = format!("{}:{APP_PORT}", t.pod(b).ip);
    // Its first rule alone would allow only a; its second rule is invalid. Applied half, c would
    // be denied.
    t.write_config("bad.yaml", "apiVersion: security.sockmesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: only-a, namespace: default}\nspec:\n  selector: {matchLabels: {app: b}}\n  rules:\n  - from:\n    - source: {principals: [\"cluster.local/ns/default/sa/sa-a\"]}\n  - to:\n    - operation: {ports: [\"http\"]}\n").unwrap();
    let shown = time_until(Duration::from_secs(30), || {
        let out = t.node_command(n2, bin("meshctl")).unwrap().args(["policies"]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        // The row names the file and the line where the policy starts, and why.
        text.lines().any(|l| {
            l.contains("INVALID")
                && l.contains("bad.yaml:1: AuthorizationPolicy")
                && l.contains("\"http\" is not a port")
        })
    });
    assert!(shown.is_some(), "meshctl policies does not report the rejected policy");
    // The controller's own log says which file, line and why.
    let logged = ctl.log_lines().into_iter().any(|l| {
        let e = l["error"].as_str().unwrap_or_default();
        e.contains("bad.yaml:1: AuthorizationPolicy rejected whole") && e.contains("\"http\" is not a port")
    });
    assert!(logged, "the controller did not log the rejected policy with its file and line");
    assert!(echo_ok(&t, c, &to), "the invalid policy was half-applied");
    assert!(echo_ok(&t, a, &to));
    let (_, m) = http_get(&t.node(n1).netns, "127.0.0.1:15020", "/metrics").unwrap();
    assert!(metric(&m, "sockmesh_config_version", &[]).unwrap() >= 1.0, "{m}");
    assert!(metric(&m, "sockmesh_config_push_lag_milliseconds", &[]).is_some(), "{m}");
}

/// Same node, four clients at a time over sizes around the boundaries that matter (empty, one
/// byte, a segment, a page, 64 KiB, a receive buffer): every echo comes back whole (checksums
/// both ways, half-close included) and no relay ends in an error. This test is what found the
/// kernel relay's lost and duplicated bytes (ARCHITECTURE.md, "Same node").
#[test]
fn same_node_relays_lose_nothing_under_concurrency() {
    let (mut t, n1, a, b) = one_node("sameconc");
    let _ctl = t.start_controller(&[]).unwrap();
    let _server = t.start_server(b, APP_PORT).unwrap();
    let agent = t.start_agent(n1, &[]).unwrap();
    t.wait_ready(n1).unwrap();
    let to = format!("{}:{APP_PORT}", t.pod(b).ip);
    let sizes: [u64; 13] = [0, 1, 2, 777, 1448, 4095, 4096, 65535, 65536, 65537, 131_073, 300_001, 1_000_003];
    const CLIENTS: u64 = 4;
    const ROUNDS: u64 = 4;
    let failed = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|sc| {
        for c in 0..CLIENTS {
            let (t, to, sizes, failed) = (&t, &to, &sizes, &failed);
            sc.spawn(move || {
                for round in 0..ROUNDS {
                    for (i, n) in sizes.iter().enumerate() {
                        let seed = (c * 1000 + round * 100 + i as u64 + 1).to_string();
                        let r = t.pod_app(a, &["echo", "--to", to, "--bytes", &n.to_string(), "--seed", &seed]);
                        match r {
                            Ok(r) if r["ok"] == true => {}
                            other => failed.lock().unwrap().push(format!("{n} bytes: {other:?}")),
                        }
                    }
                }
            });
        }
    });
    let conns = (CLIENTS * ROUNDS) as usize * sizes.len();
    let _ = wait_for(Duration::from_secs(5), || Ok(agent.access_log().len() >= 2 * conns));
    let errors: Vec<_> = agent.access_log().into_iter().filter(|l| l["error"] != "-").collect();
    let failed = failed.into_inner().unwrap();
    assert!(failed.is_empty(), "{} echoes failed: {failed:?}\nagent errors: {errors:?}", failed.len());
    assert!(errors.is_empty(), "relays that ended in an error: {errors:?}");
    let log = agent.access_log();
    assert_eq!(log.len(), 2 * conns, "access log lines missing");
    // Every one went the same-node way (no TLS, relayed by this agent), not through a tunnel.
    let other: Vec<_> = log.iter().filter(|l| l["connection_security_policy"] != "node_local").collect();
    assert!(other.is_empty(), "connections that did not take the same-node path: {other:?}");
}

/// Same node: no TLS (nothing leaves the node; both identities are kernel facts), but the
/// destination's policy still decides, and both sides are attributed. `--same-node-tls true`
/// puts the same connection through mutual TLS.
#[test]
fn same_node_traffic_skips_tls_but_not_policy() {
    let (mut t, n1, a, b) = one_node("samenode");
    let _ctl = t.start_controller(&[]).unwrap();
    let server = t.start_server(b, APP_PORT).unwrap();
    let mut agent = t.start_agent(n1, &[]).unwrap();
    t.wait_ready(n1).unwrap();
    let to = format!("{}:{APP_PORT}", t.pod(b).ip);

    let r = t.pod_app(a, &["echo", "--to", &to, "--bytes", "1000000", "--seed", "3"]).unwrap();
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(server.accepted().unwrap().len(), 1);
    wait_for(Duration::from_secs(5), || Ok(agent.access_log().len() >= 2)).unwrap();
    let log = agent.access_log();
    for dir in ["outbound", "inbound"] {
        let l = log.iter().find(|l| l["direction"] == dir).unwrap_or_else(|| panic!("no {dir} line: {log:?}"));
        assert_eq!(l["connection_security_policy"], "node_local", "{l}");
        assert_eq!(l["src_principal"], "spiffe://cluster.local/ns/default/sa/sa-a", "{l}");
        assert_eq!(l["dst_principal"], "spiffe://cluster.local/ns/default/sa/sa-b", "{l}");
        assert_eq!(l["bytes_sent"], 1_000_000, "{l}");
    }
    assert_eq!(agent.stats().unwrap().hbone.tls_sessions, 0, "same-node traffic made a TLS session");
    let (_, m) = http_get(&t.node(n1).netns, "127.0.0.1:15020", "/metrics").unwrap();
    for reporter in ["source", "destination"] {
        let labels =
            [("reporter", reporter), ("connection_security_policy", "node_local"), ("destination_workload", "b")];
        assert_eq!(metric(&m, "istio_tcp_connections_opened_total", &labels), Some(1.0), "{reporter}: {m}");
    }

    // Policy still decides: a DENY for a's principal refuses a -> b on the same node.
    t.write_config("deny-a.yaml", deny_from_a()).unwrap();
    time_until(Duration::from_secs(30), || !echo_ok(&t, a, &to)).expect("same-node A->B allowed under DENY");
    let seen = server.accepted().unwrap().len();
    for _ in 0..3 {
        assert!(!echo_ok(&t, a, &to), "same-node A->B allowed under DENY");
    }
    assert_eq!(server.accepted().unwrap().len(), seen, "the app saw a denied connection");
    assert!(agent.access_log().iter().any(|l| l["direction"] == "inbound" && l["result"] == "deny_policy"));
    t.remove_config("deny-a.yaml").unwrap();
    time_until(Duration::from_secs(30), || echo_ok(&t, a, &to)).expect("A->B still denied after removal");

    // Asked for TLS on every hop: the same connection goes through HBONE to the agent itself.
    agent.stop().unwrap();
    let agent = t.start_agent(n1, &["--same-node-tls", "true"]).unwrap();
    t.wait_ready(n1).unwrap();
    wait_for(Duration::from_secs(10), || Ok(echo_ok(&t, a, &to))).unwrap();
    assert!(agent.stats().unwrap().hbone.tls_sessions >= 1);
    assert!(agent.access_log().iter().any(|l| l["connection_security_policy"] == "mutual_tls"));
}
