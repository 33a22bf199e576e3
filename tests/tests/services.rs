//! Services: a connection to a Service address goes through the mesh to one of its endpoints,
//! with the endpoint's identity required, its policy applied on the target port, and a dead or
//! withdrawn endpoint skipped. Real agents and controller; the Service is a `kind: Service`
//! document in the controller's configuration directory.
#![cfg(feature = "privileged")]

use std::collections::BTreeMap;
use std::time::Duration;

use mesh_api::admin::ServiceInfo;
use serde_json::Value;
use tests::*;

const APP_PORT: u16 = 8080;
const SVC_IP: &str = "10.96.0.10";
const HOST: &str = "web.default.svc.cluster.local";

fn id(sa: &str) -> String {
    format!("spiffe://cluster.local/ns/default/sa/{sa}")
}

fn services(t: &Topology, n: NodeId) -> Vec<ServiceInfo> {
    let (_, body) = http_get(&t.node(n).netns, "127.0.0.1:15000", "/services").unwrap();
    serde_json::from_str(&body).unwrap_or_default()
}

/// Waits until `n`'s agent resolves the Service `web` to exactly `ready` ready endpoints.
fn wait_endpoints(t: &Topology, n: NodeId, ready: &[&str]) {
    let mut want: Vec<String> = ready.iter().map(|s| s.to_string()).collect();
    want.sort();
    let took = time_until(Duration::from_secs(30), || {
        let got: Vec<String> = services(t, n)
            .iter()
            .filter(|s| s.name == "web")
            .flat_map(|s| s.endpoints.iter().filter(|e| e.ready).map(|e| e.address.to_string()))
            .collect();
        let mut got = got;
        got.sort();
        got == want
    });
    let took = took.unwrap_or_else(|| panic!("the agent never resolved web to {want:?}: {:?}", services(t, n)));
    eprintln!("the agent resolved web to {want:?} after {took:?}");
}

fn echoes(t: &Topology, from: PodId, to: &str, count: u32, extra: &[&str]) -> Value {
    let count = count.to_string();
    let mut args = vec!["echoes", "--to", to, "--count", &count, "--bytes", "2000", "--timeout-ms", "3000"];
    args.extend_from_slice(extra);
    t.pod_app(from, &args).unwrap()
}

/// Pods: the client `a` and endpoint `e1` on n1, endpoints `e2` and `e3` on n2, each endpoint
/// with its own service account and the label app=web, and a non-meshed pod `p` on n2.
struct Cluster {
    t: Topology,
    n1: NodeId,
    n2: NodeId,
    a: PodId,
    e: [PodId; 3],
    p: PodId,
}

fn cluster(name: &str) -> Cluster {
    let mut t = Topology::new(name).unwrap();
    let n1 = t.add_node("n1").unwrap();
    let n2 = t.add_node("n2").unwrap();
    let a = t.add_pod(n1, "a", true).unwrap();
    let e1 = t.add_pod(n1, "e1", true).unwrap();
    let e2 = t.add_pod(n2, "e2", true).unwrap();
    let e3 = t.add_pod(n2, "e3", true).unwrap();
    let p = t.add_pod(n2, "p", false).unwrap();
    for e in [e1, e2, e3] {
        t.pods[e.0].labels.push(("tier".into(), "web".into()));
    }
    t.write_workloads().unwrap();
    Cluster { t, n1, n2, a, e: [e1, e2, e3], p }
}

/// The controller, an echo server in each endpoint on the target port, both agents, ready.
fn start_with_endpoint_servers(
    t: &mut Topology,
    e: [PodId; 3],
    n1: NodeId,
    n2: NodeId,
) -> (Controller, Vec<Server>, Agent, Agent) {
    let ctl = t.start_controller(&[]).unwrap();
    let servers = e.iter().map(|p| t.start_server(*p, APP_PORT).unwrap()).collect();
    let agent1 = t.start_agent(n1, &[]).unwrap();
    let agent2 = t.start_agent(n2, &[]).unwrap();
    t.wait_ready(n1).unwrap();
    t.wait_ready(n2).unwrap();
    (ctl, servers, agent1, agent2)
}

fn selector_service() -> String {
    format!("kind: Service\nname: web\nnamespace: default\naddresses: [{SVC_IP}]\nports: [{{port: 80, targetPort: {APP_PORT}}}]\nselector: {{tier: web}}\n")
}

/// 300 connections to the Service address all succeed and every endpoint gets a share; the
/// legs between nodes are mutual TLS requiring each endpoint's own identity (the marker each
/// connection sends never crosses the wire, nothing but the tunnel does), the leg on the
/// client's node is the node-local relay; metrics and logs carry the Service.
#[test]
fn a_service_spreads_connections_over_its_endpoints_with_each_endpoints_identity() {
    let Cluster { mut t, n1, n2, a, e, .. } = cluster("svc-spread");
    let (_ctl, servers, agent1, agent2) = start_with_endpoint_servers(&mut t, e, n1, n2);
    t.write_config("web.yaml", &selector_service()).unwrap();
    let ips: Vec<String> = e.iter().map(|p| t.pod(*p).ip.to_string()).collect();
    wait_endpoints(&t, n1, &ips.iter().map(String::as_str).collect::<Vec<_>>());

    let mut cap = Capture::start(&t.fabric, "br0", t.dir.join("fabric.pcap")).unwrap();
    let marker = "SOCKMESH-SERVICE-MARKER-51c0";
    let to = format!("{SVC_IP}:80");
    let r = echoes(&t, a, &to, 300, &["--marker", marker]);
    cap.stop();
    assert_eq!((r["succeeded"].as_u64(), r["failed"].as_u64()), (Some(300), Some(0)), "{r}");

    // Every endpoint got a share (a uniform spread gives each about 100; 30 is far below).
    let shares: Vec<usize> = servers.iter().map(|s| s.accepted().unwrap().len()).collect();
    eprintln!("connections per endpoint: {shares:?}");
    assert_eq!(shares.iter().sum::<usize>(), 300, "{shares:?}");
    assert!(shares.iter().all(|&n| n >= 30), "an endpoint got (almost) nothing: {shares:?}");

    // The wire: only the tunnel (and the control plane), never the marker.
    let pcap = cap.bytes().unwrap();
    assert!(!pcap.windows(marker.len()).any(|w| w == marker.as_bytes()), "the marker crossed the wire in plaintext");
    assert!(cap.count("tcp port 15008").unwrap() > 100, "the legs to n2 did not go through the tunnel");
    assert_eq!(cap.count("tcp and not port 15008 and not port 15012").unwrap(), 0, "plain TCP between the nodes");

    // Each leg required and logged its endpoint's identity, with the Service.
    let lines: Vec<Value> = agent1.access_log().into_iter().filter(|l| l["dst_service"] == HOST).collect();
    let (lines, local_inbound): (Vec<Value>, Vec<Value>) =
        lines.into_iter().partition(|l| l["direction"] == "outbound");
    assert_eq!(lines.len(), 300, "one access-log line per connection, with the Service");
    // The node-local leg is logged by n1's agent for the destination too.
    assert_eq!(local_inbound.len(), shares[0], "one inbound line per node-local connection");
    let mut by_endpoint: BTreeMap<String, (String, String, usize)> = BTreeMap::new();
    for l in &lines {
        assert_eq!(l["result"], "ok", "{l}");
        assert_eq!(l["orig_dst"], to, "the original destination is the Service address: {l}");
        let w = l["dst_workload"].as_str().unwrap().to_owned();
        let entry = by_endpoint.entry(w).or_insert((
            l["dst_principal"].as_str().unwrap().to_owned(),
            l["connection_security_policy"].as_str().unwrap().to_owned(),
            0,
        ));
        entry.2 += 1;
    }
    let want: BTreeMap<String, (String, String)> = [
        ("default/e1", "sa-e1", "node_local"),
        ("default/e2", "sa-e2", "mutual_tls"),
        ("default/e3", "sa-e3", "mutual_tls"),
    ]
    .iter()
    .map(|(w, sa, sec)| (w.to_string(), (id(sa), sec.to_string())))
    .collect();
    let got: BTreeMap<String, (String, String)> =
        by_endpoint.iter().map(|(w, (p, s, _))| (w.clone(), (p.clone(), s.clone()))).collect();
    assert_eq!(got, want);
    // n2's agent saw a's identity, proven in the handshake, on the target port.
    wait_for(Duration::from_secs(5), || {
        Ok(agent2.access_log().iter().filter(|l| l["src_principal"] == id("sa-a")).count() >= shares[1] + shares[2])
    })
    .unwrap();
    let inbound = agent2.access_log().into_iter().find(|l| l["src_principal"] == id("sa-a")).unwrap();
    assert!(inbound["orig_dst"].as_str().unwrap().ends_with(&format!(":{APP_PORT}")), "{inbound}");
    // The source named the Service in its CONNECT; n2's agent found it in its own records
    // (this endpoint, this port) and labels the destination's side with it too.
    assert_eq!(inbound["dst_service"], HOST, "{inbound}");
    let (_, m2) = http_get(&t.node(n2).netns, "127.0.0.1:15020", "/metrics").unwrap();
    let dest = [("reporter", "destination"), ("destination_service", HOST), ("destination_workload", "e3")];
    assert_eq!(metric(&m2, "istio_tcp_connections_opened_total", &dest).unwrap_or(0.0) as usize, shares[2], "{m2}");

    // Istio's Service labels on the source's metrics.
    let (_, m) = http_get(&t.node(n1).netns, "127.0.0.1:15020", "/metrics").unwrap();
    let labels = [
        ("reporter", "source"),
        ("destination_service", HOST),
        ("destination_service_name", "web"),
        ("destination_service_namespace", "default"),
        ("destination_workload", "e2"),
    ];
    let opened = metric(&m, "istio_tcp_connections_opened_total", &labels).unwrap_or(0.0);
    assert_eq!(opened as usize, shares[1], "{m}");

    // meshctl services shows the endpoints, the identities they must prove and their health.
    let out = run(t.node_command(n1, bin("meshctl")).unwrap().arg("services")).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}");
    assert!(text.contains("default/web") && text.contains(SVC_IP) && text.contains("80->8080"), "{text}");
    for sa in ["sa-e1", "sa-e2", "sa-e3"] {
        assert!(text.contains(&id(sa)), "{text}");
    }
}

/// An endpoint marked not ready, or whose workload is gone, gets no new connections once the
/// agent has the change; an endpoint whose app died is skipped with no client error.
#[test]
fn withdrawn_and_dead_endpoints_are_skipped_without_client_errors() {
    let Cluster { mut t, n1, n2, a, e, .. } = cluster("svc-failover");
    let (_ctl, servers, agent1, _agent2) = start_with_endpoint_servers(&mut t, e, n1, n2);
    let ips: Vec<String> = e.iter().map(|p| t.pod(*p).ip.to_string()).collect();
    let to = format!("{SVC_IP}:80");
    let accepted = |i: usize| servers[i].accepted().unwrap().len();

    // Not ready: explicit endpoints, e3 marked not ready.
    let explicit = format!(
        "kind: Service\nname: web\naddresses: [{SVC_IP}]\nports: [{{port: 80, targetPort: {APP_PORT}}}]\nendpoints:\n- {{address: {}}}\n- {{address: {}}}\n- {{address: {}, ready: false}}\n",
        ips[0], ips[1], ips[2]
    );
    t.write_config("web.yaml", &explicit).unwrap();
    wait_endpoints(&t, n1, &[&ips[0], &ips[1]]);
    let before = accepted(2);
    let r = echoes(&t, a, &to, 60, &[]);
    assert_eq!(r["failed"], 0, "{r}");
    assert_eq!(accepted(2), before, "a not-ready endpoint got new connections");

    // Dead: e2's app (on the other node) is killed. Its agent answers that the app is
    // unreachable; the source agent tries another endpoint (a tunnel attempt may have read the
    // client's first bytes: they go first to whichever endpoint takes the connection, e1's
    // node-local relay included); no client sees an error, and every byte comes back.
    t.write_config("web.yaml", &selector_service()).unwrap();
    wait_endpoints(&t, n1, &[&ips[0], &ips[1], &ips[2]]);
    // SAFETY: the echo server this test started.
    unsafe { libc::kill(servers[1].pid as i32, libc::SIGKILL) };
    let before = (accepted(0), accepted(2));
    let r = echoes(&t, a, &to, 60, &[]);
    assert_eq!((r["succeeded"].as_u64(), r["failed"].as_u64()), (Some(60), Some(0)), "{r}");
    assert_eq!(accepted(0) + accepted(2), before.0 + before.1 + 60, "the live endpoints took every connection");
    let n1_netns = t.node(n1).netns.clone();
    let skipped = |reason: &str| {
        let (_, m) = http_get(&n1_netns, "127.0.0.1:15020", "/metrics").unwrap();
        metric(&m, "sockmesh_service_endpoint_failures_total", &[("reason", reason)]).unwrap_or(0.0)
    };
    assert!(skipped("destination_app_unreachable") >= 1.0, "the dead endpoint was never tried (or not counted)");

    // Removed: e1's workload leaves the mesh (the controller no longer places it); the
    // selector no longer yields it, though its app is still up.
    t.pods[e[0].0].meshed = false;
    t.write_controller_workloads(&[]).unwrap();
    wait_endpoints(&t, n1, &[&ips[1], &ips[2]]);
    let before = accepted(0);
    let r = echoes(&t, a, &to, 30, &[]);
    assert_eq!(r["failed"], 0, "{r}");
    assert_eq!(accepted(0), before, "a removed endpoint got new connections");

    // Two of three dead, one of them on the client's own node: every connection still lands on
    // the third within the three attempts a connection may make.
    t.pods[e[0].0].meshed = true;
    t.write_controller_workloads(&[]).unwrap();
    wait_endpoints(&t, n1, &[&ips[0], &ips[1], &ips[2]]);
    // SAFETY: the echo server this test started.
    unsafe { libc::kill(servers[0].pid as i32, libc::SIGKILL) };
    let before = accepted(2);
    let r = echoes(&t, a, &to, 60, &[]);
    assert_eq!((r["succeeded"].as_u64(), r["failed"].as_u64()), (Some(60), Some(0)), "{r}");
    assert_eq!(accepted(2), before + 60);
    assert!(skipped("upstream_unreachable") >= 1.0, "the dead endpoint on this node was never tried");
    // No client was refused (the destination's side of the failed node-local attempts is
    // logged as refused, as it would be by another node's agent).
    let outbound = agent1.access_log().into_iter().filter(|l| l["direction"] == "outbound" && l["dst_service"] == HOST);
    assert!(outbound.clone().all(|l| l["result"] == "ok"), "{:?}", outbound.collect::<Vec<_>>());
}

/// Port 80 of the Service maps to 8080 on the endpoint, where the endpoint's own policy
/// applies: STRICT admits (the connection arrives as mutual TLS), a DENY on 8080 refuses. A
/// Service without a ready endpoint refuses promptly, counted as `no_endpoint`; a port the
/// Service does not have is refused; an endpoint outside the mesh is reached in plain TCP.
#[test]
fn the_target_port_carries_the_endpoints_policy_and_empty_services_refuse_promptly() {
    let Cluster { mut t, n1, n2, a, e, p } = cluster("svc-policy");
    let _ctl = t.start_controller(&[]).unwrap();
    let server = t.start_server(e[1], APP_PORT).unwrap();
    let plain_server = t.start_server(p, APP_PORT).unwrap();
    // The pods' range is the mesh's: an address in it that is no workload is refused...
    let agent1 = t.start_agent(n1, &["--mesh-cidr", "10.20.0.0/16"]).unwrap();
    let agent2 = t.start_agent(n2, &["--mesh-cidr", "10.20.0.0/16"]).unwrap();
    t.wait_ready(n1).unwrap();
    t.wait_ready(n2).unwrap();
    let e2 = t.pod(e[1]).ip.to_string();
    let svc = |name: &str, addr: &str, endpoints: &str| {
        format!("kind: Service\nname: {name}\naddresses: [{addr}]\nports: [{{port: 80, targetPort: {APP_PORT}}}]\nendpoints: [{endpoints}]\n")
    };
    t.write_config(
        "svcs.yaml",
        &[
            svc("web", SVC_IP, &format!("{{address: {e2}}}")),
            svc("empty", "10.96.0.11", &format!("{{address: {e2}, ready: false}}")),
            // p is outside the mesh; e3 is a mesh workload whose app is not running.
            svc("outside", "10.96.0.12", &format!("{{address: {}}}, {{address: {}}}", t.pod(p).ip, t.pod(e[2]).ip)),
        ]
        .join("---\n"),
    )
    .unwrap();
    t.write_config("strict.yaml", "apiVersion: security.sockmesh.io/v1alpha1\nkind: PeerAuthentication\nmetadata: {name: strict, namespace: default}\nspec:\n  mtls: {mode: STRICT}\n").unwrap();
    wait_endpoints(&t, n1, &[&e2]);
    wait_for(Duration::from_secs(30), || Ok(services(&t, n1).len() == 3)).unwrap();
    let to = format!("{SVC_IP}:80");

    // STRICT on the endpoint admits what comes through the Service: it arrives as mTLS.
    let r = echoes(&t, a, &to, 5, &[]);
    assert_eq!(r["failed"], 0, "{r}");
    assert_eq!(server.accepted().unwrap().len(), 5);

    // A DENY on the endpoint's port 8080 refuses connections made to the Service's port 80.
    t.write_config("deny.yaml", &format!("apiVersion: security.sockmesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: deny-8080, namespace: default}}\nspec:\n  selector: {{matchLabels: {{app: e2}}}}\n  action: DENY\n  rules:\n  - to:\n    - operation: {{ports: [\"{APP_PORT}\"]}}\n")).unwrap();
    time_until(Duration::from_secs(30), || echoes(&t, a, &to, 1, &[])["failed"] == 1)
        .expect("the DENY on 8080 never refused connections to the Service's port 80");
    let before = server.accepted().unwrap().len();
    assert_eq!(echoes(&t, a, &to, 3, &[])["failed"], 3);
    assert_eq!(server.accepted().unwrap().len(), before, "a denied connection reached the app");
    let deny = agent2.access_log().into_iter().find(|l| l["result"] == "deny_policy").expect("a deny line");
    assert_eq!(deny["orig_dst"], format!("{e2}:{APP_PORT}"), "{deny}");
    t.remove_config("deny.yaml").unwrap();

    // No ready endpoint: refused at once, not after a connect timeout, and counted.
    let r = t.pod_app(a, &["echo", "--to", "10.96.0.11:80", "--bytes", "100", "--timeout-ms", "3000"]).unwrap();
    assert_eq!(r["ok"], false, "{r}");
    eprintln!("a Service without ready endpoints refused the client after {} ms ({})", r["ms"], r["error"]);
    let line = agent1
        .access_log()
        .into_iter()
        .find(|l| l["result"] == "no_endpoint")
        .expect("an access-log line with result no_endpoint");
    assert_eq!(line["dst_service"], "empty.default.svc.cluster.local", "{line}");
    let (_, m) = http_get(&t.node(n1).netns, "127.0.0.1:15020", "/metrics").unwrap();
    assert!(metric(&m, "sockmesh_connections_refused_total", &[("reason", "no_endpoint")]).unwrap_or(0.0) >= 1.0);

    // A port the Service does not have.
    let r = t.pod_app(a, &["echo", "--to", &format!("{SVC_IP}:81"), "--bytes", "100"]).unwrap();
    assert_eq!(r["ok"], false, "{r}");
    wait_for(Duration::from_secs(5), || Ok(agent1.access_log().iter().any(|l| l["result"] == "unknown_service_port")))
        .unwrap();

    // ...but an endpoint the controller lists as outside the mesh is reached in plain TCP
    // (there is no identity to require), and logged so, also after a failed attempt at a mesh
    // endpoint (e3's agent answers that its app is unreachable).
    let direct = t.pod_app(a, &["echo", "--to", &t.addr(p, APP_PORT), "--bytes", "100"]).unwrap();
    assert_eq!(direct["ok"], false, "an unknown address in the mesh's range was reached directly: {direct}");
    let r = echoes(&t, a, "10.96.0.12:80", 20, &[]);
    assert_eq!(r["failed"], 0, "{r}");
    assert_eq!(plain_server.accepted().unwrap().len(), 20);
    // Each line is written when the agent sees its connection close, which can follow the
    // client's last read: wait for them, then count.
    let outside = || -> Vec<Value> {
        agent1
            .access_log()
            .into_iter()
            .filter(|l| l["direction"] == "outbound" && l["dst_service"] == "outside.default.svc.cluster.local")
            .collect()
    };
    let _ = wait_for(Duration::from_secs(10), || Ok(outside().len() >= 20));
    let lines = outside();
    assert_eq!(lines.len(), 20);
    for l in &lines {
        assert_eq!(
            (l["connection_security_policy"].as_str(), l["dst_principal"].as_str()),
            (Some("none"), Some("-")),
            "{l}"
        );
    }
    let (_, m) = http_get(&t.node(n1).netns, "127.0.0.1:15020", "/metrics").unwrap();
    let skipped = metric(&m, "sockmesh_service_endpoint_failures_total", &[("reason", "destination_app_unreachable")]);
    // Each connection draws e3 first half the time: twenty never doing so is a one-in-a-million event.
    assert!(skipped.unwrap_or(0.0) >= 1.0, "no connection tried e3 first, so the mixed case never ran: {m}");
}

/// The Service a source names in its CONNECT request labels the destination's metrics and log
/// only when the destination's own records list that Service with this endpoint and target
/// port: a peer (here a hand-driven HBONE client with a valid certificate) cannot make up
/// label values or pin a Service on a connection that did not go through it.
#[test]
fn a_claimed_service_labels_the_destination_only_when_its_own_records_agree() {
    let Mesh { mut t, n2, b, .. } = Topology::two_node_mesh("svc-claim").unwrap();
    let _ctl = t.start_controller(&[]).unwrap();
    let _s1 = t.start_server(b, APP_PORT).unwrap();
    let _s2 = t.start_server(b, 9090).unwrap();
    let agent2 = t.start_agent(n2, &[]).unwrap();
    t.wait_ready(n2).unwrap();
    let bip = t.pod(b).ip.to_string();
    t.write_config(
        "web.yaml",
        &format!("kind: Service\nname: web\naddresses: [{SVC_IP}]\nports: [{{port: 80, targetPort: {APP_PORT}}}]\nendpoints: [{{address: {bip}}}]\n"),
    )
    .unwrap();
    wait_for(Duration::from_secs(30), || Ok(services(&t, n2).iter().any(|s| s.name == "web"))).unwrap();
    let claim = |service: &str, port: u16| {
        let out = t
            .node_command(n2, bin("sm-hbone"))
            .unwrap()
            .args(["--to", &format!("{bip}:15008"), "--expect", &id("sa-b"), "--service", service])
            .args(["--case", &format!("c=CONNECT,{bip}:{port}")])
            .arg("--root-dir")
            .arg(t.controller_dir())
            .output()
            .unwrap();
        let v: Value = serde_json::from_slice(out.stdout.trim_ascii()).unwrap();
        assert_eq!(v["cases"]["c"]["status"], 200, "{v}");
    };
    claim("default/web", APP_PORT);
    claim("default/invented-by-the-peer", APP_PORT);
    claim("default/web", 9090);
    // One access-log line per connection, at close.
    let services_of = |port: u16| -> Vec<String> {
        let to = format!("{bip}:{port}");
        let lines = agent2.access_log().into_iter().filter(|l| l["orig_dst"] == to);
        let mut v: Vec<String> = lines.map(|l| l["dst_service"].as_str().unwrap_or("?").to_owned()).collect();
        v.sort();
        v
    };
    wait_for(Duration::from_secs(10), || Ok(services_of(APP_PORT).len() == 2 && services_of(9090).len() == 1)).unwrap();
    // The true claim is used; the invented one is not.
    assert_eq!(services_of(APP_PORT), ["-", HOST]);
    // A real Service, but not on this port: not pinned on the connection.
    assert_eq!(services_of(9090), ["-"]);
    let (_, m) = http_get(&t.node(n2).netns, "127.0.0.1:15020", "/metrics").unwrap();
    assert!(!m.contains("invented-by-the-peer"), "a peer's claim became a label value");
}

/// A Service with an IPv6 address beside its IPv4 one: an IPv6 client connecting to it reaches
/// each endpoint over IPv6 (the IPv6-only one included), through the tunnel to the other node
/// and the node-local relay on its own, and each endpoint's app sees the client's IPv6 address.
#[test]
fn a_service_with_an_ipv6_address_carries_ipv6_clients_to_its_endpoints() {
    let mut t = Topology::new("svc-v6").unwrap();
    let (n1, n2) = (t.add_node("n1").unwrap(), t.add_node("n2").unwrap());
    let a = t.add_pod_stack(n1, "a", true, Stack::Dual).unwrap();
    let e1 = t.add_pod_stack(n1, "e1", true, Stack::Dual).unwrap();
    let e2 = t.add_pod_stack(n2, "e2", true, Stack::Dual).unwrap();
    let e3 = t.add_pod_stack(n2, "e3", true, Stack::V6).unwrap();
    let e = [e1, e2, e3];
    for p in e {
        t.pods[p.0].labels.push(("tier".into(), "web".into()));
    }
    t.write_workloads().unwrap();
    let (_ctl, servers, _agent1, _agent2) = start_with_endpoint_servers(&mut t, e, n1, n2);
    let svc = format!("kind: Service\nname: web\nnamespace: default\naddresses: [{SVC_IP}, \"fd96::10\"]\nports: [{{port: 80, targetPort: {APP_PORT}}}]\nselector: {{tier: web}}\n");
    t.write_config("web.yaml", &svc).unwrap();
    let mut want: Vec<String> = e.iter().map(|p| t.pod(*p).ip6.unwrap().to_string()).collect();
    want.extend([e1, e2].iter().map(|p| t.pod(*p).ip.to_string()));
    wait_endpoints(&t, n1, &want.iter().map(String::as_str).collect::<Vec<_>>());

    let mut cap = Capture::start(&t.fabric, "br0", t.dir.join("fabric.pcap")).unwrap();
    let marker = "SOCKMESH-SERVICE-V6-MARKER-0e7d";
    let r = echoes(&t, a, "[fd96::10]:80", 60, &["--marker", marker]);
    cap.stop();
    assert_eq!((r["succeeded"].as_u64(), r["failed"].as_u64()), (Some(60), Some(0)), "{r}");
    let a6 = t.pod(a).ip6.unwrap().to_string();
    for (p, s) in e.iter().zip(&servers) {
        let peers: Vec<String> =
            s.accepted().unwrap().iter().map(|ev| ev["peer"].as_str().unwrap().to_owned()).collect();
        assert!(!peers.is_empty(), "{} got no connection", t.pod(*p).name);
        // Over IPv6, and from a's own address.
        assert!(peers.iter().all(|peer| peer.starts_with(&format!("[{a6}]:"))), "{}: {peers:?}", t.pod(*p).name);
    }
    let pcap = cap.bytes().unwrap();
    assert!(!pcap.windows(marker.len()).any(|w| w == marker.as_bytes()), "the marker crossed the wire in plaintext");
    assert!(
        cap.count("ip6 and tcp port 15008").unwrap() > 10,
        "the legs to n2 did not go through the tunnel over IPv6"
    );
    assert_eq!(cap.count("tcp and not port 15008 and not port 15012").unwrap(), 0, "plain TCP between the nodes");
}
