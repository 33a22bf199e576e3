//! Identity and mutual TLS between agents, on the real kernel with the real controller.
#![cfg(feature = "privileged")]

use std::time::Duration;

use serde_json::Value;
use tests::*;

const APP_PORT: u16 = 8080;

fn mesh(name: &str) -> Mesh {
    Topology::two_node_mesh(name).unwrap()
}

fn dst(t: &Topology, p: PodId) -> String {
    t.addr(p, APP_PORT)
}

const A_ID: &str = "spiffe://cluster.local/ns/default/sa/sa-a";
const B_ID: &str = "spiffe://cluster.local/ns/default/sa/sa-b";

#[test]
fn between_nodes_the_wire_carries_only_tls_and_b_sees_a_verified() {
    let mut m = mesh("wire");
    let Running { ctl: _ctl, server, agent1, agent2 } = m.start(APP_PORT).unwrap();
    let Mesh { t, a, b, .. } = m;
    let mut cap = Capture::start(&t.fabric, "br0", t.dir.join("fabric.pcap")).unwrap();

    let marker = "SOCKMESH-PLAINTEXT-MARKER-7f3a9c";
    let r =
        t.pod_app(a, &["echo", "--to", &dst(&t, b), "--bytes", &(10 << 20).to_string(), "--marker", marker]).unwrap();
    assert_eq!(r["ok"], true, "{r}");
    cap.stop();

    let pcap = cap.bytes().unwrap();
    assert!(!pcap.windows(marker.len()).any(|w| w == marker.as_bytes()), "the marker crossed the wire in plaintext");
    let tunnel = cap.count("tcp port 15008").unwrap();
    assert!(tunnel > 100, "expected the transfer on 15008, saw {tunnel} packets");
    // Nothing else between the nodes but the tunnel and the control plane (also TLS, 15012).
    assert_eq!(cap.count("tcp and not port 15008 and not port 15012").unwrap(), 0);
    // The tunnel opened with a TLS handshake record (content type 22) and then carried only
    // TLS application data; with the marker absent, the 10 MiB went encrypted.
    let tls_handshakes = cap.count("tcp port 15008 and (tcp[((tcp[12:1] & 0xf0) >> 2):1] = 0x16)").unwrap();
    assert!(tls_handshakes >= 2, "no TLS handshake records on 15008 ({tls_handshakes})");

    // B's agent logged the connection with A's identity, as verified from A's certificate.
    wait_for(Duration::from_secs(5), || Ok(agent2.access_log().iter().any(|l| l["src_principal"] == A_ID))).unwrap();
    let line = agent2.access_log().into_iter().find(|l| l["src_principal"] == A_ID).unwrap();
    assert_eq!(line["direction"], "inbound", "{line}");
    assert_eq!(line["dst_principal"], B_ID, "{line}");
    assert_eq!(line["connection_security_policy"], "mutual_tls", "{line}");
    // The marker is part of the 10 MiB the client sends.
    assert_eq!(line["bytes_sent"], 10u64 << 20, "{line}");
    assert_eq!(line["src_addr"].as_str().unwrap().split(':').next(), Some(t.pod(a).ip.to_string().as_str()), "{line}");
    assert_eq!(server.accepted().unwrap().len(), 1);
    drop(agent1);
}

#[test]
fn many_connections_share_one_tls_session() {
    let mut m = mesh("pool");
    let Running { ctl: _ctl, server: _server, agent1, agent2 } = m.start(APP_PORT).unwrap();
    let Mesh { t, a, b, .. } = m;
    for i in 0..20 {
        let r = t.pod_app(a, &["echo", "--to", &dst(&t, b), "--bytes", "5000", "--seed", &i.to_string()]).unwrap();
        assert_eq!(r["ok"], true, "{r}");
    }
    let h = agent1.stats().unwrap().hbone;
    assert_eq!(h.streams, 20, "{h:?}");
    assert_eq!(h.tls_sessions, 1, "20 connections should share one TLS session: {h:?}");
    wait_for(Duration::from_secs(5), || Ok(agent2.access_log().len() == 20)).unwrap();
}

#[test]
fn malformed_hbone_requests_get_the_documented_error_and_no_dial() {
    let Mesh { mut t, n2, b, .. } = mesh("malformed");
    let _ctl = t.start_controller(&[]).unwrap();
    let server = t.start_server(b, APP_PORT).unwrap();
    let agent2 = t.start_agent(n2, &[]).unwrap();
    wait_for(Duration::from_secs(10), || Ok(agent2.api(serde_json::json!({"op": "certs"}))?[0]["ready"] == true))
        .unwrap();
    let bip = t.pod(b).ip;
    let hbone = format!("{bip}:15008");
    let root = t.controller_dir();
    let cases = [
        format!("get=GET,http://{bip}:{APP_PORT}/"),
        format!("post=POST,http://{bip}:{APP_PORT}/x"),
        format!("name=CONNECT,example.com:{APP_PORT}"),
        format!("noport=CONNECT,{bip}"),
        format!("notlocal=CONNECT,10.20.1.10:{APP_PORT}"),
        format!("meshport=CONNECT,{bip}:15006"),
        format!("oversized=CONNECT,{bip}:{APP_PORT},20000"),
        // Well-formed, but nothing listens there: the agent's dial fails.
        format!("noapp=CONNECT,{bip}:9999"),
    ];
    let mut cmd = t.node_command(n2, bin("sm-hbone")).unwrap();
    cmd.args(["--to", &hbone, "--expect", B_ID]).arg("--root-dir").arg(&root);
    for c in &cases {
        cmd.args(["--case", c]);
    }
    let out = cmd.output().unwrap();
    let v: Value = serde_json::from_slice(out.stdout.trim_ascii())
        .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(v["handshake"], "ok", "{v}");
    let c = &v["cases"];
    for name in ["get", "post", "name", "noport", "notlocal", "meshport"] {
        assert_eq!(c[name]["status"], 400, "{name}: {v}");
    }
    // Oversized header lists are refused by the HTTP/2 layer before the request exists:
    // 431 Request Header Fields Too Large.
    assert_eq!(c["oversized"]["status"], 431, "{v}");
    assert_eq!(c["noapp"]["status"], 503, "{v}");
    assert!(server.accepted().unwrap().is_empty(), "a malformed request reached the app");
    let refused = agent2.stats().unwrap().inbound.refused;
    assert_eq!(refused.get("hbone_not_connect"), Some(&2), "{refused:?}");
    assert_eq!(refused.get("hbone_destination_not_local"), Some(&1), "{refused:?}");

    // A well-formed request from the same client is served (the cases above were not refused
    // for some other reason).
    let out = t
        .node_command(n2, bin("sm-hbone"))
        .unwrap()
        .args(["--to", &hbone, "--expect", B_ID, "--case", &format!("ok=CONNECT,{bip}:{APP_PORT}")])
        .arg("--root-dir")
        .arg(&root)
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(out.stdout.trim_ascii()).unwrap();
    assert_eq!(v["cases"]["ok"]["status"], 200, "{v}");
    wait_for(Duration::from_secs(5), || Ok(server.accepted()?.len() == 1)).unwrap();
}

#[test]
fn peers_with_bad_certificates_are_refused_with_a_reason_in_log_and_stats() {
    let Mesh { mut t, n2, b, .. } = mesh("badpeer");
    let _ctl = t.start_controller(&[]).unwrap();
    let server = t.start_server(b, APP_PORT).unwrap();
    let agent2 = t.start_agent(n2, &[]).unwrap();
    wait_for(Duration::from_secs(10), || Ok(agent2.api(serde_json::json!({"op": "certs"}))?[0]["ready"] == true))
        .unwrap();
    let hbone = format!("{}:15008", t.pod(b).ip);
    for (kind, reason) in [("rogue", "unknown_issuer"), ("other-td", "wrong_trust_domain")] {
        let out = t
            .node_command(n2, bin("sm-hbone"))
            .unwrap()
            .args([
                "--to",
                &hbone,
                "--expect",
                B_ID,
                "--client-cert",
                kind,
                "--case",
                &format!("c=CONNECT,{}", dst(&t, b)),
            ])
            .arg("--root-dir")
            .arg(t.controller_dir())
            .output()
            .unwrap();
        let v: Value = serde_json::from_slice(out.stdout.trim_ascii()).unwrap();
        // TLS 1.3: the client learns of the refusal at its first read at the latest.
        assert!(v["handshake"] == "failed" || v["cases"]["c"]["error"].is_string(), "{kind}: {v}");
        wait_for(Duration::from_secs(5), || Ok(agent2.stats()?.inbound.handshake_failures.get(reason) == Some(&1)))
            .unwrap();
        assert!(
            agent2.log_lines().iter().any(|l| l["message"] == "HBONE handshake refused" && l["reason"] == reason),
            "no log line with reason {reason}"
        );
    }
    assert!(server.accepted().unwrap().is_empty());
}

#[test]
fn certificates_rotate_while_connections_keep_working() {
    let Mesh { mut t, n1, n2, a, b } = mesh("rotate");
    let _ctl = t.start_controller(&["--cert-ttl", "20s", "--max-cert-ttl", "20s"]).unwrap();
    let _server = t.start_server(b, APP_PORT).unwrap();
    let agent1 = t.start_agent(n1, &[]).unwrap();
    let _agent2 = t.start_agent(n2, &[]).unwrap();
    t.wait_ready(n1).unwrap();
    t.wait_ready(n2).unwrap();
    let to = dst(&t, b);
    let first = agent1.api(serde_json::json!({"op": "certs"})).unwrap();

    // A long-lived connection (25 s, 1 KiB a second) and a new connection every 2 s.
    let long =
        t.spawn_pod_app(a, &["echo", "--to", &to, "--bytes", "25000", "--chunk", "1000", "--pace-ms", "1000"]).unwrap();
    let probes = t.pod_app(a, &["probe", "--to", &to, "--interval-ms", "2000", "--duration-ms", "26000"]).unwrap();
    let long = long.result().unwrap();

    assert_eq!(long["ok"], true, "long-lived connection broke: {long}");
    assert_eq!(probes["failed"], 0, "{probes}");
    assert!(probes["ok"].as_u64().unwrap() >= 10, "{probes}");
    let s = agent1.stats().unwrap();
    // Issued at start, then renewed at half-life (10 s) at least twice.
    assert!(s.certificates.issued >= 3, "{s:?}");
    let now = agent1.api(serde_json::json!({"op": "certs"})).unwrap();
    let first_expiry = first[0]["notAfter"].as_i64().expect("the first certificate's expiry");
    assert!(
        now[0]["notAfter"].as_i64().expect("a current certificate") > first_expiry,
        "not renewed: {first} -> {now}"
    );
    // The first certificate expired while the long connection and the probes ran (they span
    // 25 s, the certificate lived 20 s): they kept working on its successors.
    let wall = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    assert!(first_expiry < wall, "the first certificate had not expired by the end ({first_expiry} >= {wall})");
}

#[test]
fn with_the_controller_down_existing_identities_work_and_a_new_workload_fails_closed() {
    let Mesh { mut t, n1, n2, a, b } = mesh("ctldown");
    let e = t.add_pod(n1, "e", false).unwrap();
    // The controller would allow e on n1, but it will be down when e appears.
    t.write_controller_workloads(&[e]).unwrap();
    let mut ctl = t.start_controller(&[]).unwrap();
    let server = t.start_server(b, APP_PORT).unwrap();
    let agent1 = t.start_agent(n1, &["--cert-wait-ms", "1000"]).unwrap();
    let _agent2 = t.start_agent(n2, &[]).unwrap();
    // The existing identities must exist before the controller goes (e is not registered yet,
    // so readiness is a's and b's certificates only).
    t.wait_ready(n1).unwrap();
    t.wait_ready(n2).unwrap();
    let to = dst(&t, b);
    assert_eq!(t.pod_app(a, &["echo", "--to", &to, "--bytes", "1000"]).unwrap()["ok"], true);

    ctl.stop();
    // Existing identities keep working, new connections included.
    for _ in 0..3 {
        let r = t.pod_app(a, &["echo", "--to", &to, "--bytes", "1000"]).unwrap();
        assert_eq!(r["ok"], true, "{r}");
    }
    let before = server.accepted().unwrap().len();

    agent1.api(serde_json::json!({"op": "add_workload", "workload": t.workload_json(e)})).unwrap();
    let r = t.pod_app(e, &["echo", "--to", &to, "--bytes", "1000"]).unwrap();
    assert_eq!(r["ok"], false, "a workload without a certificate got through: {r}");
    assert_eq!(r["wire_peer"], "127.0.0.1:15001", "it was captured, then refused: {r}");
    assert_eq!(server.accepted().unwrap().len(), before, "the app saw e's connection");
    let s = agent1.stats().unwrap();
    assert!(s.outbound.refused.get("no_certificate").is_some_and(|n| *n >= 1), "{s:?}");
    let failures = &s.certificates.failures;
    assert!(failures.get("rpc").unwrap_or(&0) + failures.get("timeout").unwrap_or(&0) >= 1, "{s:?}");
}

/// The other tests wait for ready agents before their first traffic; this one proves what
/// happens when a pod connects before its certificate exists: the connection waits (up to
/// --cert-wait-ms), and goes through over mutual TLS once the certificate arrives.
#[test]
fn a_connection_opened_before_its_certificate_waits_for_it_and_then_goes_through() {
    let Mesh { mut t, n1, n2, a, b } = mesh("certwait");
    let mut ctl = t.start_controller(&[]).unwrap();
    let server = t.start_server(b, APP_PORT).unwrap();
    // b's agent gets b's certificate now; the controller then goes before a's agent starts.
    let agent2 = t.start_agent(n2, &[]).unwrap();
    t.wait_ready(n2).unwrap();
    ctl.stop();
    let agent1 = t.start_agent(n1, &["--cert-wait-ms", "20000"]).unwrap();
    let to = dst(&t, b);
    let echo = t.spawn_pod_app(a, &["echo", "--to", &to, "--bytes", "1000", "--timeout-ms", "25000"]).unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    let (status, body) = http_get(&t.node(n1).netns, "127.0.0.1:15021", "/healthz/ready").unwrap();
    assert_ne!(status, 200, "a's certificate exists before the controller is back: {body}");
    assert!(server.accepted().unwrap().is_empty(), "the app was reached before a had a certificate");

    let _ctl = t.start_controller(&[]).unwrap();
    let r = echo.result().unwrap();
    assert_eq!(r["ok"], true, "the waiting connection failed: {r}");
    assert_eq!(r["wire_peer"], "127.0.0.1:15001", "it was not captured: {r}");
    assert_eq!(server.accepted().unwrap().len(), 1);
    wait_for(Duration::from_secs(5), || Ok(!agent1.access_log().is_empty())).unwrap();
    let line = &agent1.access_log()[0];
    assert_eq!(
        (line["result"].as_str(), line["connection_security_policy"].as_str()),
        (Some("ok"), Some("mutual_tls")),
        "{line}"
    );
    wait_for(Duration::from_secs(5), || Ok(!agent2.access_log().is_empty())).unwrap();
    assert_eq!(agent2.access_log()[0]["src_principal"], A_ID);
}
