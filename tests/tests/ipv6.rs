//! IPv6 on the real kernel: dual-stack and IPv6-only pods through the same datapath, identity
//! and policy as IPv4 ones, and an outside packet claiming a pod's own IPv6 address.
#![cfg(feature = "privileged")]

use std::time::Duration;

use serde_json::Value;
use tests::*;

const APP_PORT: u16 = 8080;
const MIB: u64 = 1024 * 1024;

/// n1: `a` dual-stack, `c` IPv6-only; n2: `b` dual-stack, `d` IPv6-only. All meshed.
struct V6Mesh {
    t: Topology,
    n1: NodeId,
    n2: NodeId,
    a: PodId,
    b: PodId,
    c: PodId,
    d: PodId,
}

fn v6_mesh(test: &str) -> V6Mesh {
    let mut t = Topology::new(test).unwrap();
    let (n1, n2) = (t.add_node("n1").unwrap(), t.add_node("n2").unwrap());
    let a = t.add_pod_stack(n1, "a", true, Stack::Dual).unwrap();
    let b = t.add_pod_stack(n2, "b", true, Stack::Dual).unwrap();
    let c = t.add_pod_stack(n1, "c", true, Stack::V6).unwrap();
    let d = t.add_pod_stack(n2, "d", true, Stack::V6).unwrap();
    t.write_workloads().unwrap();
    V6Mesh { t, n1, n2, a, b, c, d }
}

fn id(pod: &str) -> String {
    format!("spiffe://cluster.local/ns/default/sa/sa-{pod}")
}

fn inbound_from(agent: &Agent, principal: &str) -> Vec<Value> {
    agent.access_log().into_iter().filter(|l| l["direction"] == "inbound" && l["src_principal"] == principal).collect()
}

/// An echo through the mesh whose bytes arrived intact, and whose socket really went to the
/// agent while the app saw the address it dialled and its own.
fn meshed_echo(t: &Topology, from: PodId, to: &str, bytes: u64, marker: &str) {
    let r = t
        .pod_app(
            from,
            &["echo", "--to", to, "--bytes", &bytes.to_string(), "--marker", marker, "--timeout-ms", "20000"],
        )
        .unwrap();
    assert_eq!((&r["ok"], &r["received"]), (&Value::Bool(true), &Value::from(bytes)), "{r}");
    assert_eq!(r["wire_peer"], "[::1]:15001", "not captured: {r}");
    assert_eq!(r["peer"], to, "{r}");
    let own = format!("[{}]:", t.pod(from).ip6.unwrap());
    assert!(r["local"].as_str().unwrap().starts_with(&own), "{r}");
}

#[test]
fn dual_stack_and_ipv6_only_pods_carry_bytes_over_mutual_tls_and_the_wire_shows_only_tls() {
    let V6Mesh { mut t, n1, n2, a, b, c, d } = v6_mesh("v6wire");
    let _ctl = t.start_controller(&[]).unwrap();
    let server_b = t.start_server(b, APP_PORT).unwrap();
    let server_d = t.start_server(d, APP_PORT).unwrap();
    let server_a = t.start_server(a, APP_PORT).unwrap();
    let agent1 = t.start_agent(n1, &[]).unwrap();
    let agent2 = t.start_agent(n2, &[]).unwrap();
    t.wait_ready(n1).unwrap();
    t.wait_ready(n2).unwrap();

    let mut cap = Capture::start(&t.fabric, "br0", t.dir.join("fabric.pcap")).unwrap();
    let marker = "SOCKMESH-V6-PLAINTEXT-MARKER-51c2";
    // Dual-stack to dual-stack over IPv6, IPv6-only to IPv6-only, both across nodes.
    meshed_echo(&t, a, &t.addr6(b, APP_PORT), 10 * MIB, marker);
    meshed_echo(&t, c, &t.addr6(d, APP_PORT), MIB, marker);
    // The dual-stack pod's IPv4 still works beside it, from an IPv4 socket and from an IPv6
    // one dialling the IPv4-mapped address (whose own end is then IPv4-mapped too).
    let r = t.pod_app(a, &["echo", "--to", &t.addr(b, APP_PORT), "--bytes", "1000"]).unwrap();
    assert_eq!((&r["ok"], &r["wire_peer"]), (&Value::Bool(true), &Value::from("127.0.0.1:15001")), "{r}");
    let mapped = format!("[::ffff:{}]:{APP_PORT}", t.pod(b).ip);
    let r = t.pod_app(a, &["echo", "--to", &mapped, "--bytes", "1000"]).unwrap();
    assert_eq!(
        (&r["ok"], &r["wire_peer"], &r["peer"]),
        (&Value::Bool(true), &"[::1]:15001".into(), &mapped.into()),
        "{r}"
    );
    assert!(r["local"].as_str().unwrap().starts_with(&format!("[::ffff:{}]:", t.pod(a).ip)), "{r}");
    cap.stop();

    let pcap = cap.bytes().unwrap();
    assert!(!pcap.windows(marker.len()).any(|w| w == marker.as_bytes()), "the marker crossed the wire in plaintext");
    let tunnel6 = cap.count("ip6 and tcp port 15008").unwrap();
    assert!(tunnel6 > 100, "expected the transfers on 15008 over IPv6, saw {tunnel6} packets");
    assert_eq!(cap.count("tcp and not port 15008 and not port 15012").unwrap(), 0, "TCP beside the tunnel");
    let tls6 = cap.count("ip6 and tcp port 15008 and (ip6[40 + ((ip6[52] & 0xf0) >> 2)] = 0x16)").unwrap();
    assert!(tls6 >= 2, "no TLS handshake records on 15008 over IPv6 ({tls6})");

    // b's and d's agent verified who called, over IPv6.
    wait_for(Duration::from_secs(5), || Ok(!inbound_from(&agent2, &id("a")).is_empty())).unwrap();
    wait_for(Duration::from_secs(5), || Ok(!inbound_from(&agent2, &id("c")).is_empty())).unwrap();
    let line = &inbound_from(&agent2, &id("c"))[0];
    assert_eq!((&line["dst_principal"], &line["connection_security_policy"]), (&id("d").into(), &"mutual_tls".into()));
    assert!(line["src_addr"].as_str().unwrap().starts_with(&format!("[{}]:", t.pod(c).ip6.unwrap())), "{line}");
    assert_eq!(server_b.accepted().unwrap().len(), 3, "b's app saw each of a's connections");
    assert_eq!(server_d.accepted().unwrap().len(), 1);

    // Same node over IPv6: c to a on n1.
    meshed_echo(&t, c, &t.addr6(a, APP_PORT), 100_000, marker);
    assert_eq!(server_a.accepted().unwrap().len(), 1);
    wait_for(Duration::from_secs(5), || Ok(!inbound_from(&agent1, &id("c")).is_empty())).unwrap();
}

fn forged_dropped(agent: &Agent) -> u64 {
    agent.stats().unwrap().kernel.get("inbound_dropped_forged_self_source").copied().unwrap_or(0)
}

/// IPv4 drops a packet from outside whose source is one of the receiver's own addresses (a
/// martian); IPv6 has no such check, and sk_lookup takes "source is the destination" to mean
/// "from inside the pod". A SYN forged that way, sent from the node through a raw socket, must
/// not reach the app.
#[test]
fn an_outside_packet_forging_a_pods_own_ipv6_address_never_reaches_its_app() {
    let V6Mesh { mut t, n1, n2, b, .. } = v6_mesh("v6spoof");
    // b's listeners take TCP Fast Open without a cookie (0x602: server, no cookie, no socket
    // option needed): a SYN carrying data that reaches the app's listener is handed to the
    // app at once, handshake or not, so the app's accept log shows where each SYN went.
    let fastopen = ["netns", "exec", &t.pod(b).netns, "sysctl", "-qw", "net.ipv4.tcp_fastopen=1538"];
    run(std::process::Command::new("ip").args(fastopen)).unwrap();
    let server = t.start_server(b, APP_PORT).unwrap();
    let b6 = t.pod(b).ip6.unwrap();
    let spoof = |t: &Topology, port: u16| {
        let from = format!("[{b6}]:{port}");
        let out = t
            .node_command(n2, bin("sm-attack"))
            .unwrap()
            .args(["spoof-syn", "--from", &from, "--to", &t.addr6(b, APP_PORT), "--data", "SPOOFED"])
            .output()
            .unwrap();
        let v: Value = serde_json::from_slice(out.stdout.trim_ascii()).unwrap();
        assert!(v["sent"].as_u64().unwrap_or(0) > 0, "{v} {}", String::from_utf8_lossy(&out.stderr));
        from
    };
    let accepted_from = |from: &str| server.accepted().unwrap().iter().any(|e| e["peer"] == from);

    // Before the mesh captures b, the forged SYN reaches the app: the packet and the Fast Open
    // that reveal it work.
    let before = spoof(&t, 40001);
    wait_for(Duration::from_secs(20), || Ok(accepted_from(&before))).unwrap();

    let _ctl = t.start_controller(&[]).unwrap();
    let _agent1 = t.start_agent(n1, &[]).unwrap();
    let agent2 = t.start_agent(n2, &[]).unwrap();
    t.wait_ready(n1).unwrap();
    t.wait_ready(n2).unwrap();
    let dropped_before = forged_dropped(&agent2);
    let captured = spoof(&t, 40002);
    // Wherever it went, it got there: the agent's ingress filter dropped it, or the app took
    // it.
    wait_for(Duration::from_secs(20), || Ok(forged_dropped(&agent2) > dropped_before || accepted_from(&captured)))
        .unwrap();
    assert!(!accepted_from(&captured), "the forged SYN reached b's app: {:?}", server.accepted().unwrap());
    assert_eq!(forged_dropped(&agent2), dropped_before + 1);
    // The pod's own connections to itself still reach the app directly.
    let r = t.pod_app(b, &["echo", "--to", &t.addr6(b, APP_PORT), "--bytes", "1000"]).unwrap();
    assert_eq!(r["ok"], true, "{r}");
}

fn echo_ok(t: &Topology, from: PodId, to: &str) -> bool {
    t.pod_app(from, &["echo", "--to", to, "--bytes", "1000", "--timeout-ms", "5000"]).unwrap()["ok"] == true
}

/// Policy by verified identity over IPv6, and fail closed with the source's agent down.
#[test]
fn over_ipv6_policy_is_enforced_and_a_stopped_agent_fails_closed() {
    let V6Mesh { mut t, n1, n2, a, c, d, .. } = v6_mesh("v6policy");
    let _ctl = t.start_controller(&[]).unwrap();
    let server = t.start_server(d, APP_PORT).unwrap();
    let mut agent1 = t.start_agent(n1, &[]).unwrap();
    let agent2 = t.start_agent(n2, &[]).unwrap();
    t.wait_ready(n1).unwrap();
    t.wait_ready(n2).unwrap();
    let to = t.addr6(d, APP_PORT);
    assert!(echo_ok(&t, c, &to) && echo_ok(&t, a, &to));

    let deny = "apiVersion: security.sockmesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: deny-c, namespace: default}\nspec:\n  selector: {matchLabels: {app: d}}\n  action: DENY\n  rules:\n  - from:\n    - source: {principals: [\"cluster.local/ns/default/sa/sa-c\"]}\n";
    t.write_config("deny-c.yaml", deny).unwrap();
    time_until(Duration::from_secs(30), || !echo_ok(&t, c, &to)).expect("c->d still allowed 30 s after the DENY");
    let seen = server.accepted().unwrap().len();
    assert!(!echo_ok(&t, c, &to), "c->d allowed under DENY");
    assert!(echo_ok(&t, a, &to), "a->d refused by a policy about c");
    assert_eq!(server.accepted().unwrap().len(), seen + 1, "the app saw a denied connection");
    let line = agent2.access_log().into_iter().find(|l| l["result"] == "deny_policy").expect("a deny line");
    assert_eq!(line["src_principal"], id("c"), "{line}");
    assert!(line["src_addr"].as_str().unwrap().starts_with(&format!("[{}]:", t.pod(c).ip6.unwrap())), "{line}");

    // With n1's agent stopped, a's IPv6 connections fail; none reaches d's app.
    agent1.stop().unwrap();
    let seen = server.accepted().unwrap().len();
    let r = t.pod_app(a, &["echo", "--to", &to, "--bytes", "1000", "--timeout-ms", "3000"]).unwrap();
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!((&r["stage"], &r["errno"]), (&Value::from("connect"), &Value::from(libc::ECONNREFUSED)), "{r}");
    assert_eq!(server.accepted().unwrap().len(), seen, "the app saw a connection while the agent was down");
}
