//! What operators see: metrics with Istio's labels, the access log, the admin API, meshctl.
#![cfg(feature = "privileged")]

use std::time::Duration;

use serde_json::Value;
use tests::*;

const APP_PORT: u16 = 8080;
const A_ID: &str = "spiffe://cluster.local/ns/default/sa/sa-a";
const B_ID: &str = "spiffe://cluster.local/ns/default/sa/sa-b";

fn mesh(name: &str) -> (Topology, NodeId, NodeId, PodId, PodId) {
    let Mesh { t, n1, n2, a, b } = Topology::two_node_mesh(name).unwrap();
    (t, n1, n2, a, b)
}

#[test]
fn metrics_carry_istio_labels_and_refusals_show_with_their_reason() {
    let (mut t, n1, n2, a, b) = mesh("metrics");
    // e runs on n1 but the controller does not place it there: n1 may not have its identity.
    let e = t.add_pod(n1, "e", false).unwrap();
    let ctl = t.start_controller(&[]).unwrap();
    let _server = t.start_server(b, APP_PORT).unwrap();
    let agent1 = t.start_agent(n1, &["--cert-wait-ms", "1000"]).unwrap();
    let agent2 = t.start_agent(n2, &[]).unwrap();
    // Before e is added (n1 is never ready after that: e gets no certificate).
    t.wait_ready(n1).unwrap();
    t.wait_ready(n2).unwrap();
    let to = format!("{}:{APP_PORT}", t.pod(b).ip);
    let r = t.pod_app(a, &["echo", "--to", &to, "--bytes", "300000"]).unwrap();
    assert_eq!(r["ok"], true, "{r}");
    wait_for(Duration::from_secs(5), || Ok(agent2.access_log().len() == 1)).unwrap();

    let labels = [
        ("source_workload", "a"),
        ("source_workload_namespace", "default"),
        ("source_principal", A_ID),
        ("destination_workload", "b"),
        ("destination_workload_namespace", "default"),
        ("destination_principal", B_ID),
        ("connection_security_policy", "mutual_tls"),
        ("response_flags", "-"),
    ];
    for (n, reporter) in [(n1, "source"), (n2, "destination")] {
        let m = scrape(&t, n);
        let mut l = labels.to_vec();
        l.push(("reporter", reporter));
        assert_eq!(metric(&m, "istio_tcp_connections_opened_total", &l), Some(1.0), "{reporter}:\n{m}");
        assert_eq!(metric(&m, "istio_tcp_connections_closed_total", &l), Some(1.0), "{reporter}:\n{m}");
        assert_eq!(metric(&m, "istio_tcp_sent_bytes_total", &l), Some(300000.0), "{reporter}:\n{m}");
        assert_eq!(metric(&m, "istio_tcp_received_bytes_total", &l), Some(300000.0), "{reporter}:\n{m}");
    }
    let m1 = scrape(&t, n1);
    assert_eq!(metric(&m1, "sockmesh_ebpf_events_total", &[("event", "redirected")]), Some(1.0), "{m1}");
    assert_eq!(metric(&m1, "sockmesh_ebpf_map_capacity", &[("map", "SM_ORIG_DST")]), Some(65536.0), "{m1}");
    assert!(
        metric(&m1, "sockmesh_certificate_expiry_timestamp_seconds", &[("identity", A_ID)]).unwrap() > 1.7e9,
        "{m1}"
    );

    // e is captured and refused for want of a certificate: counted with its reason, logged.
    agent1.api(serde_json::json!({"op": "add_workload", "workload": t.workload_json(e)})).unwrap();
    let r = t.pod_app(e, &["echo", "--to", &to, "--bytes", "1000"]).unwrap();
    assert_eq!(r["ok"], false, "{r}");
    let m1 = scrape(&t, n1);
    assert_eq!(
        metric(&m1, "sockmesh_connections_refused_total", &[("direction", "outbound"), ("reason", "no_certificate")]),
        Some(1.0),
        "{m1}"
    );
    assert_eq!(
        metric(
            &m1,
            "istio_tcp_connections_closed_total",
            &[("source_workload", "e"), ("response_flags", "no_certificate")]
        ),
        Some(1.0),
        "{m1}"
    );
    let line =
        agent1.access_log().into_iter().find(|l| l["src_workload"] == "default/e").expect("an access-log line for e");
    assert_eq!(line["decision"], "deny", "{line}");
    assert_eq!(line["result"], "no_certificate", "{line}");
    assert_eq!(line["orig_dst"], to, "{line}");

    // The controller's own metrics: what it signed and what it refused (e's identity on n1).
    let (status, cm) = http_get(&t.fabric, &format!("{CONTROLLER_IP}:15014"), "/metrics").unwrap();
    assert_eq!(status, 200);
    assert_eq!(metric(&cm, "sockmesh_ca_certificates_signed_total", &[("identity", A_ID)]), Some(1.0), "{cm}");
    assert!(metric(&cm, "sockmesh_ca_requests_refused_total", &[("reason", "unauthorized")]).unwrap() >= 1.0, "{cm}");
    drop(ctl);
}

fn meshctl(t: &Topology, n: NodeId, args: &[&str]) -> (i32, String) {
    let out = t.node_command(n, bin("meshctl")).unwrap().args(args).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn meshctl_check_passes_on_a_healthy_node_and_says_what_is_wrong_otherwise() {
    let (t, n1, _n2, _a, _b) = mesh("check");
    let _ctl = t.start_controller(&[]).unwrap();
    let mut agent1 = t.start_agent(n1, &[]).unwrap();
    // Ready once the workload has its certificate.
    wait_for(
        Duration::from_secs(10),
        || Ok(http_get(&t.node(n1).netns, "127.0.0.1:15021", "/healthz/ready")?.0 == 200),
    )
    .unwrap();
    let (code, out) = meshctl(&t, n1, &["check"]);
    assert_eq!(code, 0, "{out}");
    for name in ["kernel", "cgroup v2", "bpffs", "agent", "programs", "certificates", "controller"] {
        assert!(out.lines().any(|l| l.starts_with('✓') && l.contains(name)), "{name} not ✓:\n{out}");
    }

    // bpffs not mounted (in a private mount namespace, so the rest of the machine keeps it).
    let out = t
        .node_command(n1, "unshare")
        .unwrap()
        .args(["-m", "--propagation", "private", "sh", "-c"])
        .arg(format!("umount /sys/fs/bpf && exec {} check", bin("meshctl").display()))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("✗ bpffs"), "{text}");
    assert!(text.contains("mount -t bpf bpf /sys/fs/bpf"), "no useful hint:\n{text}");

    // The agent stopped.
    agent1.stop().unwrap();
    let (code, out) = meshctl(&t, n1, &["check"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("✗ agent"), "{out}");
    assert!(out.contains("start mesh-agent"), "no useful hint:\n{out}");
    let (code, json) = meshctl(&t, n1, &["check", "-o", "json"]);
    assert_eq!(code, 1);
    let v: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["ok"], false);
    assert!(v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["name"] == "agent" && c["ok"] == false && c["hint"].as_str().unwrap().contains("mesh-agent")));
}

#[test]
fn meshctl_json_parses_and_matches_the_tables() {
    let mut m = Topology::two_node_mesh("meshctl").unwrap();
    let _running = m.start(APP_PORT).unwrap();
    let Mesh { t, n1, a, b, .. } = m;
    let to = format!("{}:{APP_PORT}", t.pod(b).ip);
    // A connection held open while we look.
    let held = t.spawn_pod_app(a, &["hold", "--to", &to, "--count", "1", "--hold-ms", "4000"]).unwrap();
    wait_for(Duration::from_secs(5), || {
        let (_, j) = meshctl(&t, n1, &["connections", "-o", "json"]);
        Ok(serde_json::from_str::<Value>(&j).map(|v| v.as_array().map(|a| a.len()) == Some(1)).unwrap_or(false))
    })
    .unwrap();

    for cmd in ["workloads", "certs", "connections", "policies"] {
        let (code, table) = meshctl(&t, n1, &[cmd]);
        assert_eq!(code, 0, "{cmd}: {table}");
        let (code, json) = meshctl(&t, n1, &[cmd, "-o", "json"]);
        assert_eq!(code, 0, "{cmd}: {json}");
        let v: Value = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{cmd} -o json: {e}: {json}"));
        let items = v.as_array().unwrap();
        let rows: Vec<&str> = table.lines().skip(1).collect();
        if items.is_empty() {
            assert_eq!(table.trim(), "(none)", "{cmd}");
            continue;
        }
        assert_eq!(rows.len(), items.len(), "{cmd}: table\n{table}\njson {json}");
        for item in items {
            let key = match cmd {
                "workloads" => format!("{} ", item["name"].as_str().unwrap()),
                "certs" => item["identity"].as_str().unwrap().to_owned(),
                "connections" => item["origDst"].as_str().unwrap().to_owned(),
                _ => unreachable!(),
            };
            assert!(rows.iter().any(|r| r.contains(&key)), "{cmd}: {key} not in\n{table}");
        }
    }
    let (_, table) = meshctl(&t, n1, &["certs"]);
    assert!(table.contains(A_ID) && table.contains("true"), "{table}");
    let (code, status) = meshctl(&t, n1, &["status", "-o", "json"]);
    assert_eq!(code, 0);
    let s: Value = serde_json::from_str(&status).unwrap();
    assert_eq!(s["node"], "n1");
    assert_eq!(s["workloads"], 1);
    let (_, text) = meshctl(&t, n1, &["status"]);
    assert!(text.contains("node:        n1") && text.contains("workloads:   1"), "{text}");
    let held = held.result().unwrap();
    assert_eq!(held["results"][0]["ok"], true, "the connection looked at was not carried: {held}");
}

#[test]
fn the_demo_tour_runs_and_leaves_nothing_behind() {
    let out = std::process::Command::new(bin("sm-demo")).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "demo failed:\n{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("never appeared"), "{text}");
    assert!(text.contains("✓ certificates"), "{text}");
    assert!(text.contains("istio_tcp_connections_opened_total"), "{text}");
    assert!(text.contains("a -> b refused") && text.contains("result=\"deny_policy\""), "{text}");
    assert!(text.contains("a -> b works again"), "{text}");
    assert!(text.contains("pay-1 -> pay-2 (same mesh, across nodes): ok=true"), "{text}");
    assert!(text.contains("pay-1 -> shop-2 (another mesh): ok=false; shop-2's app saw 0 connection(s)"), "{text}");
    assert!(text.contains("reason=\"other_mesh\""), "{text}");
    // Everything the demo made carries its topology id; none of it may remain.
    let id_line = text.lines().find(|l| l.contains("root CA and trust bundle in")).unwrap();
    let id = id_line.rsplit('/').nth(1).unwrap().trim_start_matches(PREFIX).split('-').next().unwrap().to_owned();
    let netns = run(std::process::Command::new("ip").args(["netns", "list"])).unwrap();
    assert!(!String::from_utf8_lossy(&netns.stdout).contains(&id), "demo left namespaces");
    assert!(!std::path::Path::new("/sys/fs/bpf").join(format!("{PREFIX}{id}")).exists(), "demo left pins");
    assert!(!cgroup2_mount().unwrap().join(format!("{PREFIX}{id}")).exists(), "demo left cgroups");
}

/// `meshctl exec` runs a command as part of a workload (its netns and its cgroup), so what the
/// command connects to goes through the mesh: the demo's "try" hint depends on it.
#[test]
fn meshctl_exec_runs_a_command_as_part_of_the_workload() {
    let mut m = Topology::two_node_mesh("exec").unwrap();
    let Running { ctl: _ctl, server: _server, agent1, agent2: _agent2 } = m.start(APP_PORT).unwrap();
    let Mesh { t, n1, b, .. } = m;
    let to = format!("{}:{APP_PORT}", t.pod(b).ip);
    let out = t
        .node_command(n1, bin("meshctl"))
        .unwrap()
        .args(["exec", "default/a", "--"])
        .arg(bin("sm-testapp"))
        .args(["echo", "--to", &to, "--bytes", "1000"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let r: Value = serde_json::from_str(text.lines().last().unwrap_or("")).unwrap();
    assert_eq!(
        (r["ok"].as_bool(), r["wire_peer"].as_str()),
        (Some(true), Some("127.0.0.1:15001")),
        "not captured: {r}"
    );
    wait_for(Duration::from_secs(5), || Ok(!agent1.access_log().is_empty())).unwrap();
    let line = &agent1.access_log()[0];
    assert_eq!(
        (line["src_workload"].as_str(), line["connection_security_policy"].as_str()),
        (Some("default/a"), Some("mutual_tls")),
        "{line}"
    );

    // A workload this node does not capture: a clear error naming what it does capture.
    let out = t.node_command(n1, bin("meshctl")).unwrap().args(["exec", "default/b", "--", "true"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("default/b is not captured") && err.contains("default/a"), "{err}");
}
