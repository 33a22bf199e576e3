//! The server's view on the real kernel: a meshed app sees its client's own pod address (not its
//! own, as it did when the agent dialled it from the app's address), across nodes and on one
//! node, over IPv4 and IPv6; the address a peer agent states is checked against its identity;
//! where the address cannot be used the app sees its own, counted; and the kernel record that
//! lets the agent's dial from a client's address reach the app cannot be used from outside.
#![cfg(feature = "privileged")]

use std::time::Duration;

use serde_json::Value;
use tests::*;

const APP_PORT: u16 = 8080;
const FALLBACKS: &str = "sockmesh_source_address_fallbacks_total";

/// The address of an accept event's peer (`ip:port` or `[ip6]:port`).
fn peer_ip(event: &Value) -> String {
    let peer = event["peer"].as_str().unwrap_or_default();
    let (ip, _) = peer.rsplit_once(':').unwrap_or((peer, ""));
    ip.trim_start_matches('[').trim_end_matches(']').to_owned()
}

/// The addresses `server`'s app saw its connections come from, in order.
fn seen(server: &Server) -> Vec<String> {
    server.accepted().unwrap().iter().map(peer_ip).collect()
}

fn echo_ok(t: &Topology, from: PodId, to: &str, bytes: u64) {
    let r = t.pod_app(from, &["echo", "--to", to, "--bytes", &bytes.to_string(), "--timeout-ms", "20000"]).unwrap();
    assert_eq!((&r["ok"], &r["received"]), (&Value::Bool(true), &Value::from(bytes)), "{to}: {r}");
}

#[test]
fn apps_see_their_clients_pod_address_across_nodes_and_on_one_node_over_ipv4_and_ipv6() {
    let mut t = Topology::new("srcaddr").unwrap();
    let (n1, n2) = (t.add_node("n1").unwrap(), t.add_node("n2").unwrap());
    let a = t.add_pod_stack(n1, "a", true, Stack::Dual).unwrap();
    let c = t.add_pod_stack(n1, "c", true, Stack::V6).unwrap();
    let e = t.add_pod(n1, "e", true).unwrap();
    let b = t.add_pod_stack(n2, "b", true, Stack::Dual).unwrap();
    let d = t.add_pod_stack(n2, "d", true, Stack::V6).unwrap();
    t.write_workloads().unwrap();
    let _ctl = t.start_controller(&[]).unwrap();
    let (server_a, server_b, server_d) = (
        t.start_server(a, APP_PORT).unwrap(),
        t.start_server(b, APP_PORT).unwrap(),
        t.start_server(d, APP_PORT).unwrap(),
    );
    let _agent1 = t.start_agent(n1, &[]).unwrap();
    let _agent2 = t.start_agent(n2, &[]).unwrap();
    t.wait_ready(n1).unwrap();
    t.wait_ready(n2).unwrap();
    let ip4 = |p: PodId| t.pod(p).ip.to_string();
    let ip6 = |p: PodId| t.pod(p).ip6.unwrap().to_string();

    let mut cap = Capture::start(&t.fabric, "br0", t.dir.join("fabric.pcap")).unwrap();
    // Across nodes, through HBONE: IPv4 and IPv6 from a dual-stack pod, IPv6 from an IPv6-only one.
    echo_ok(&t, a, &t.addr(b, APP_PORT), 1 << 20);
    echo_ok(&t, a, &t.addr6(b, APP_PORT), 1 << 20);
    echo_ok(&t, c, &t.addr6(d, APP_PORT), 100_000);
    cap.stop();
    assert_eq!(seen(&server_b), [ip4(a), ip6(a)]);
    assert_eq!(seen(&server_d), [ip6(c)]);
    // The apps' replies to those addresses came back to the agent: none left for the fabric
    // (where they would have been routed to the client's node).
    assert_eq!(cap.count("tcp and not port 15008 and not port 15012").unwrap(), 0, "TCP beside the tunnel");

    // On one node, through the node-local relay: IPv4 and IPv6.
    echo_ok(&t, e, &t.addr(a, APP_PORT), 100_000);
    echo_ok(&t, c, &t.addr6(a, APP_PORT), 100_000);
    assert_eq!(seen(&server_a), [ip4(e), ip6(c)]);

    // Every one of them used the client's address: no fallback anywhere.
    for n in [n1, n2] {
        let text = scrape(&t, n);
        assert_eq!(
            metric(&text, FALLBACKS, &[]),
            None,
            "{}",
            text.lines().filter(|l| l.contains(FALLBACKS)).collect::<Vec<_>>().join("\n")
        );
    }
}

/// The destination pod holds the client's address itself (an address of its own that a client
/// also has): dialled from it, the app would take the connection for one from itself. The app
/// is dialled from its own address instead, and that is counted.
#[test]
fn a_client_address_the_destination_holds_itself_falls_back_to_the_apps_own_and_is_counted() {
    let mut t = Topology::new("srccoll").unwrap();
    let n1 = t.add_node("n1").unwrap();
    let a = t.add_pod(n1, "a", true).unwrap();
    let e = t.add_pod(n1, "e", true).unwrap();
    t.write_workloads().unwrap();
    let lo = ["-n", &t.pod(e).netns, "addr", "add", &format!("{}/32", t.pod(a).ip), "dev", "lo"];
    run(std::process::Command::new("ip").args(lo)).unwrap();
    let _ctl = t.start_controller(&[]).unwrap();
    let server = t.start_server(e, APP_PORT).unwrap();
    let _agent = t.start_agent(n1, &[]).unwrap();
    t.wait_ready(n1).unwrap();

    echo_ok(&t, a, &t.addr(e, APP_PORT), 100_000);
    assert_eq!(seen(&server), [t.pod(e).ip.to_string()]);
    let text = scrape(&t, n1);
    assert_eq!(metric(&text, FALLBACKS, &[("reason", "collision")]), Some(1.0), "{text}");
}

/// A source agent states its client's address in the CONNECT request. The destination takes it
/// only when it is the address of a workload of the identity the peer's certificate proved;
/// the address of another identity's workload is refused; one it has no record of (its
/// records may lag the source's) is not used, and that is counted.
#[test]
fn a_peer_can_state_only_its_own_workloads_address() {
    let mut t = Topology::new("srcforge").unwrap();
    let (n1, n2) = (t.add_node("n1").unwrap(), t.add_node("n2").unwrap());
    let a = t.add_pod(n1, "a", true).unwrap();
    let c = t.add_pod(n1, "c", true).unwrap();
    let b = t.add_pod(n2, "b", true).unwrap();
    t.write_workloads().unwrap();
    let _ctl = t.start_controller(&[]).unwrap();
    let server = t.start_server(b, APP_PORT).unwrap();
    let agent2 = t.start_agent(n2, &[]).unwrap();
    t.wait_ready(n2).unwrap();

    let bip = t.pod(b).ip;
    let connect = |name: &str, forwarded: &str| format!("{name}=CONNECT,{bip}:{APP_PORT},0,{forwarded}");
    // The client certificate is sa-a's: a's address is its own, c's (sa-c) is not.
    let cases = [
        connect("own", &format!("for={}", t.pod(a).ip)),
        connect("other", &format!("for={}", t.pod(c).ip)),
        connect("nobody", "for=10.99.0.1"),
        connect("malformed", "by=10.20.1.10"),
        format!("unstated=CONNECT,{bip}:{APP_PORT}"),
    ];
    let mut cmd = t.node_command(n2, bin("sm-hbone")).unwrap();
    cmd.args(["--to", &format!("{bip}:15008"), "--expect", "spiffe://cluster.local/ns/default/sa/sa-b"])
        .arg("--root-dir")
        .arg(t.controller_dir());
    for c in &cases {
        cmd.args(["--case", c]);
    }
    let out = cmd.output().unwrap();
    let v: Value = serde_json::from_slice(out.stdout.trim_ascii())
        .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stdout)));
    let status = |name: &str| v["cases"][name]["status"].clone();
    assert_eq!([status("own"), status("nobody"), status("unstated")], [200, 200, 200], "{v}");
    assert_eq!([status("other"), status("malformed")], [400, 400], "{v}");

    // The app saw the stated address, and for the requests whose address could not be used
    // its own; the refused ones never reached it.
    wait_for(Duration::from_secs(5), || Ok(server.accepted()?.len() >= 3)).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(seen(&server), [t.pod(a).ip.to_string(), bip.to_string(), bip.to_string()]);
    let refused = agent2.stats().unwrap().inbound.refused;
    assert_eq!(refused.get("hbone_source_not_peers"), Some(&1), "{refused:?}");
    assert_eq!(refused.get("hbone_bad_forwarded"), Some(&1), "{refused:?}");
    let text = scrape(&t, n2);
    assert_eq!(metric(&text, FALLBACKS, &[("reason", "unverified")]), Some(1.0), "{text}");
    assert_eq!(metric(&text, FALLBACKS, &[("reason", "not_stated")]), Some(1.0), "{text}");
}

/// One node: `b` meshed, `u` outside the mesh; the controller running.
fn with_outsider(name: &str) -> (Topology, NodeId, PodId, PodId, Controller) {
    let mut t = Topology::new(name).unwrap();
    let n2 = t.add_node("n2").unwrap();
    let b = t.add_pod(n2, "b", true).unwrap();
    let u = t.add_pod(n2, "u", false).unwrap();
    t.write_workloads().unwrap();
    let ctl = t.start_controller(&[]).unwrap();
    (t, n2, b, u, ctl)
}

/// The agent's dial to an app from a client's address looks, to sk_lookup, like a packet from
/// outside; sock_ops records it (by its socket mark, in the app's own netns) so that it goes to
/// the app. A process outside the mesh that sets the same mark on its own socket (CAP_NET_RAW
/// suffices) must not get that record: its connection is steered to the agent like any other.
#[test]
fn an_outside_connection_marked_like_the_agents_own_dial_never_reaches_the_app() {
    let (mut t, n2, b, u, _ctl) = with_outsider("srcmark");
    let server = t.start_server(b, APP_PORT).unwrap();
    let agent = t.start_agent(n2, &[]).unwrap();
    t.wait_ready(n2).unwrap();

    // Plaintext from outside the mesh (PERMISSIVE) goes through the agent, and the app sees the
    // client's real address.
    let to = t.addr(b, APP_PORT);
    echo_ok(&t, u, &to, 10_000);
    assert_eq!(seen(&server), [t.pod(u).ip.to_string()]);

    // The same with mesh_common::TRANSPARENT_MARK on the client's socket: it goes through the
    // agent all the same (its plaintext log line), not to the app directly.
    let steered = || agent.stats().unwrap().kernel.get("inbound_steered").copied().unwrap_or(0);
    let before = steered();
    let r = t.pod_app(u, &["echo", "--to", &to, "--bytes", "1000", "--mark", "15008", "--timeout-ms", "5000"]).unwrap();
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(steered(), before + 1, "the marked connection was not steered to the agent");
    wait_for(Duration::from_secs(5), || {
        Ok(agent.access_log().iter().filter(|l| l["direction"] == "inbound").count() == 2)
    })
    .unwrap();
    assert_eq!(seen(&server), [t.pod(u).ip.to_string(), t.pod(u).ip.to_string()]);
}

/// sk_lookup leaves the HBONE port to whoever listens on it (the agent). With the agent stopped,
/// an app listening there itself would get plaintext from outside; the ingress filter drops
/// anything from outside for a meshed app's listening socket on its pod address.
#[test]
fn with_the_agent_stopped_an_app_listening_on_the_hbone_port_gets_nothing_from_outside() {
    let (mut t, n2, b, u, _ctl) = with_outsider("srclisten");
    let mut agent = t.start_agent(n2, &[]).unwrap();
    t.wait_ready(n2).unwrap();
    agent.stop().unwrap();
    drop(agent);

    let server = t.start_server(b, 15008).unwrap();
    let r = t.pod_app(u, &["echo", "--to", &t.addr(b, 15008), "--bytes", "1000", "--timeout-ms", "2000"]).unwrap();
    assert_eq!(r["ok"], false, "plaintext from outside reached an app with the agent stopped: {r}");
    assert!(server.accepted().unwrap().is_empty(), "{:?}", server.accepted().unwrap());
    // The app goes (its port is the agent's), and the agent comes back to report.
    // SAFETY: the pid of a child this topology started.
    unsafe { libc::kill(server.pid as i32, libc::SIGKILL) };
    let fds = format!("/proc/{}/fd", server.pid);
    wait_for(Duration::from_secs(10), || Ok(std::fs::read_dir(&fds).map(|d| d.count() == 0).unwrap_or(true))).unwrap();

    let agent = t.start_agent(n2, &[]).unwrap();
    t.wait_ready(n2).unwrap();
    let dropped = agent.stats().unwrap().kernel.get("inbound_dropped_outside_to_app_listener").copied().unwrap_or(0);
    assert!(dropped >= 1, "{:?}", agent.stats().unwrap().kernel);
}

/// A key of `SM_TP_DIALS` (mesh_common::DialKey, 40 bytes) that no real dial has: IPv4, from
/// 198.51.100.x to 192.0.2.1, numbered by `i`.
fn filler_dial(i: u32) -> [u8; 40] {
    let mut k = [0u8; 40];
    k[0..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
    k[2..4].copy_from_slice(&1u16.to_ne_bytes());
    k[4..6].copy_from_slice(&(i as u16).to_ne_bytes());
    k[8..12].copy_from_slice(&[192, 0, 2, 1]);
    k[24..28].copy_from_slice(&[198, 51, 100, (i >> 16) as u8]);
    k
}

/// The kernel's record of the agent's dials from clients' addresses (`SM_TP_DIALS`) is bounded
/// and node-wide. When it is full, a dial it cannot record looks to sk_lookup like any SYN from
/// outside and is steered back to the agent. The agent refuses its own dial there (counted),
/// so the connection fails closed: it does not loop, and nothing reaches the app unrecorded.
/// With room again, connections go through from the client's address.
#[test]
fn with_the_kernels_record_of_dials_full_a_connection_fails_closed_counted_and_then_recovers() {
    let (mut t, n2, b, u, _ctl) = with_outsider("srcfull");
    let server = t.start_server(b, APP_PORT).unwrap();
    let agent = t.start_agent(n2, &[]).unwrap();
    t.wait_ready(n2).unwrap();
    let to = t.addr(b, APP_PORT);
    let client = t.pod(u).ip.to_string();
    echo_ok(&t, u, &to, 10_000);
    assert_eq!(seen(&server), std::slice::from_ref(&client));
    // That connection ended (its record gone with its socket) before the map is filled.
    wait_for(Duration::from_secs(10), || Ok(!agent.access_log().is_empty())).unwrap();

    let map = PinnedMap::open(&t.node(n2).bpffs.join("maps/SM_TP_DIALS")).unwrap();
    let mut fillers = Vec::new();
    // Until full; run again just before the connection, in case a record went meanwhile.
    let fill = |fillers: &mut Vec<[u8; 40]>| {
        for i in fillers.len() as u32..1 << 20 {
            let k = filler_dial(i);
            if !map.insert(&k, &[1]).unwrap() {
                break;
            }
            fillers.push(k);
        }
    };
    fill(&mut fillers);
    assert!(!fillers.is_empty() && fillers.len() < 1 << 20, "{} entries taken", fillers.len());
    fill(&mut fillers);

    let r = t.pod_app(u, &["echo", "--to", &to, "--bytes", "1000", "--timeout-ms", "5000"]).unwrap();
    assert_eq!(r["ok"], false, "a connection went through with the record full: {r}");
    assert_eq!(seen(&server), std::slice::from_ref(&client), "a dial the kernel did not record reached the app");
    let full = agent.stats().unwrap().kernel.get("transparent_dial_map_full").copied().unwrap_or(0);
    assert_eq!(full, 1, "{:?}", agent.stats().unwrap().kernel);
    let refused = |t: &Topology| {
        metric(&scrape(t, n2), "sockmesh_connections_refused_total", &[("reason", "own_dial_steered_back")])
            .unwrap_or(0.0)
    };
    wait_for(Duration::from_secs(10), || Ok(refused(&t) >= 1.0)).unwrap();
    // One connection, one dial, one refusal: the agent did not dial again into itself.
    assert_eq!(refused(&t), 1.0);

    for k in &fillers {
        map.remove(k).unwrap();
    }
    echo_ok(&t, u, &to, 10_000);
    assert_eq!(seen(&server), [client.clone(), client]);
    assert_eq!(agent.stats().unwrap().kernel.get("transparent_dial_map_full").copied().unwrap_or(0), 1);
}
