//! Interception on the real kernel: eBPF programs, real agents, real sockets.
#![cfg(feature = "privileged")]

use std::time::Duration;

use serde_json::Value;
use tests::*;

const APP_PORT: u16 = 8080;
const MIB: u64 = 1024 * 1024;

fn dst(t: &Topology, p: PodId) -> String {
    t.addr(p, APP_PORT)
}

fn outbound_lines(agent: &Agent) -> Vec<Value> {
    agent.access_log().into_iter().filter(|l| l["direction"] == "outbound").collect()
}

#[test]
fn cross_node_bytes_arrive_intact_and_the_source_agent_records_them() {
    let mut m = Topology::two_node_mesh("cross").unwrap();
    let Running { ctl: _ctl, server, agent1, agent2 } = m.start(APP_PORT).unwrap();
    let Mesh { t, a, b, .. } = m;

    let r = t.pod_app(a, &["echo", "--to", &dst(&t, b), "--bytes", &(10 * MIB).to_string(), "--seed", "7"]).unwrap();
    assert_eq!(r["ok"], true, "transfer failed: {r}");
    assert_eq!(r["received"], 10 * MIB);
    // The kernel connected the app to the agent's outbound listener, not to b; the app sees the
    // address it dialled as its peer (getpeername), and its own as its local end.
    assert_eq!(r["wire_peer"], "127.0.0.1:15001", "{r}");
    assert_eq!(r["peer"], dst(&t, b), "{r}");
    assert!(r["local"].as_str().unwrap().starts_with(&format!("{}:", t.pod(a).ip)), "{r}");

    wait_for(Duration::from_secs(5), || Ok(!outbound_lines(&agent1).is_empty())).unwrap();
    let line = &outbound_lines(&agent1)[0];
    assert_eq!(line["src_workload"], "default/a", "{line}");
    assert_eq!(line["src_principal"], "spiffe://cluster.local/ns/default/sa/sa-a", "{line}");
    assert_eq!(line["dst_principal"], "spiffe://cluster.local/ns/default/sa/sa-b", "{line}");
    assert_eq!(line["connection_security_policy"], "mutual_tls", "{line}");
    assert_eq!(line["orig_dst"], dst(&t, b), "{line}");
    assert_eq!(line["dst_workload"], "default/b", "{line}");
    assert_eq!(line["bytes_sent"], 10 * MIB, "{line}");
    assert_eq!(line["bytes_received"], 10 * MIB, "{line}");

    // On n2 the connection was captured on its way in and handed to the app by the agent,
    // dialling it from a's address: the app sees its real client.
    wait_for(Duration::from_secs(5), || Ok(agent2.access_log().iter().any(|l| l["direction"] == "inbound"))).unwrap();
    let accepted = server.accepted().unwrap();
    assert_eq!(accepted.len(), 1, "{accepted:?}");
    assert!(accepted[0]["peer"].as_str().unwrap().starts_with(&format!("{}:", t.pod(a).ip)), "{accepted:?}");
}

/// One pod holding more connections to one destination than the peer allows streams on one
/// HBONE connection (256): the pool opens more mTLS connections instead of stalling.
#[test]
fn more_concurrent_connections_than_one_tunnel_carries_all_work() {
    let mut m = Topology::two_node_mesh("many").unwrap();
    let Running { ctl: _ctl, server: _server, agent1, agent2: _agent2 } = m.start(APP_PORT).unwrap();
    let Mesh { t, a, b, .. } = m;

    let r = t.pod_app(a, &["hold", "--to", &dst(&t, b), "--count", "600", "--hold-ms", "0"]).unwrap();
    let results = r["results"].as_array().unwrap();
    let failed: Vec<(usize, &Value)> = results.iter().enumerate().filter(|(_, r)| r["ok"] != true).collect();
    assert!(failed.is_empty(), "{} of 600 held connections failed, first: {:?}", failed.len(), failed.first());
    let hbone = agent1.stats().unwrap().hbone;
    assert_eq!(hbone.streams, 600, "{hbone:?}");
    assert!(hbone.tls_sessions >= 3, "600 streams at 256 per connection need 3: {hbone:?}");
    // Each client wrote at once: its byte went out right behind the CONNECT request, without
    // waiting for the destination's answer, and still came back (checked above). (On an idle
    // machine 598-599 of 600 do; a client slower to write than the agent to open its stream
    // goes the ordinary way.)
    assert!(hbone.early_streams >= 300, "most clients' first bytes waited a round trip: {hbone:?}");
}

#[test]
fn a_non_meshed_pods_connections_are_not_touched() {
    let mut t = Topology::new("nonmesh").unwrap();
    let n1 = t.add_node("n1").unwrap();
    let n2 = t.add_node("n2").unwrap();
    let _a = t.add_pod(n1, "a", true).unwrap();
    let c = t.add_pod(n1, "c", false).unwrap();
    let d = t.add_pod(n2, "d", false).unwrap();
    t.write_workloads().unwrap();
    let _ctl = t.start_controller(&[]).unwrap();
    let server = t.start_server(d, APP_PORT).unwrap();
    let agent1 = t.start_agent(n1, &[]).unwrap();
    let _agent2 = t.start_agent(n2, &[]).unwrap();

    let r = t.pod_app(c, &["echo", "--to", &dst(&t, d), "--bytes", "100000"]).unwrap();
    assert_eq!(r["ok"], true, "{r}");
    // Connected straight to d, and d saw c's own address.
    assert_eq!((&r["wire_peer"], &r["peer"]), (&dst(&t, d).into(), &dst(&t, d).into()), "{r}");
    let accepted = server.accepted().unwrap();
    assert!(accepted[0]["peer"].as_str().unwrap().starts_with(&format!("{}:", t.pod(c).ip)), "{accepted:?}");
    let stats = agent1.stats().unwrap();
    assert_eq!(stats.kernel["redirected"], 0, "{stats:?}");
    assert_eq!(stats.outbound.accepted, 0, "{stats:?}");
    assert!(agent1.access_log().is_empty(), "{:?}", agent1.access_log());
}

#[test]
fn the_agents_own_connections_are_never_intercepted() {
    // The agent runs as root in a cgroup under the node root where connect4 is attached, and
    // the pod's client runs as root too: no uid or mark could tell them apart. Only the
    // workload map does.
    let mut m = Topology::two_node_mesh("noloop").unwrap();
    let Running { ctl: _ctl, server, agent1, agent2: _agent2 } = m.start(APP_PORT).unwrap();
    let Mesh { t, n1, a, b, .. } = m;
    let agent_cgroup = t.node(n1).cgroup.join("agent");
    let procs = std::fs::read_to_string(agent_cgroup.join("cgroup.procs")).unwrap();
    assert!(procs.lines().any(|p| p.trim() == agent1.pid().unwrap().to_string()), "agent not in {agent_cgroup:?}");
    assert!(cgroup_programs(&t.node(n1).cgroup).unwrap().iter().any(|p| p.contains("connect4")));

    for i in 0..5 {
        let r = t.pod_app(a, &["echo", "--to", &dst(&t, b), "--bytes", "1000", "--seed", &i.to_string()]).unwrap();
        assert_eq!(r["ok"], true, "{r}");
    }
    wait_for(Duration::from_secs(5), || Ok(outbound_lines(&agent1).len() == 5)).unwrap();
    let stats = agent1.stats().unwrap();
    // Exactly one redirect per app connection: the agent's 5 upstream dials (made from inside
    // a's netns) were not redirected back to itself.
    assert_eq!(stats.kernel["redirected"], 5, "{stats:?}");
    assert_eq!(stats.outbound.accepted, 5, "{stats:?}");
    assert_eq!(server.accepted().unwrap().len(), 5);
}

#[test]
fn fail_closed_while_the_agent_is_stopped_and_back_after_restart() {
    let mut m = Topology::two_node_mesh("failclosed").unwrap();
    let Running { ctl: _ctl, server, mut agent1, agent2: _agent2 } = m.start(APP_PORT).unwrap();
    let Mesh { t, n1, a, b, .. } = m;
    let to = dst(&t, b);
    assert_eq!(t.pod_app(a, &["echo", "--to", &to, "--bytes", "1000"]).unwrap()["ok"], true);

    agent1.stop().unwrap();
    // Programs stay attached without an agent (P6)...
    assert!(cgroup_programs(&t.node(n1).cgroup).unwrap().iter().any(|p| p.contains("connect4")));
    // ...so a's connection is still redirected, finds no listener and fails: never direct.
    let r = t.pod_app(a, &["echo", "--to", &to, "--bytes", "1000", "--timeout-ms", "1000"]).unwrap();
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(r["stage"], "connect", "{r}");
    assert_eq!(r["errno"], libc::ECONNREFUSED, "{r}");
    assert_eq!(server.accepted().unwrap().len(), 1, "the app saw a connection while the agent was down");

    // Same flags, no re-registration: the workloads file and the pinned maps bring it back.
    let _agent1 = t.start_agent(n1, &[]).unwrap();
    t.wait_ready(n1).unwrap();
    let r = t.pod_app(a, &["echo", "--to", &to, "--bytes", "1000"]).unwrap();
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["wire_peer"], "127.0.0.1:15001", "{r}");
}

#[test]
fn kill_9_and_restart_keeps_programs_attached_and_nothing_bypasses() {
    let Mesh { mut t, n1, n2, a, b } = Topology::two_node_mesh("restart").unwrap();
    let _ctl = t.start_controller(&[]).unwrap();
    let server = t.start_server(b, APP_PORT).unwrap();
    let mut agent1 = t.start_agent(n1, &[]).unwrap();
    let _agent2 = t.start_agent(n2, &[]).unwrap();
    // Ready before the probes start: the failures counted must be the restart's, not start-up's.
    // (No wait after the restart: the probes measure exactly that window.)
    t.wait_ready(n1).unwrap();
    t.wait_ready(n2).unwrap();
    let node = t.node(n1);
    let links_before = pinned_link_ids(&node.bpffs).unwrap();
    assert_eq!(links_before.len(), tests::CGROUP_PROGRAMS.len() + 1, "{links_before:?}"); // + a's sk_lookup

    let to = dst(&t, b);
    // The prober runs until the test says so: from before the kill until after the restart,
    // however slow the machine.
    let until = node.state_dir.join("probe-stop").display().to_string();
    let prober = t
        .spawn_pod_app(
            a,
            &[
                "probe",
                "--to",
                &to,
                "--interval-ms",
                "3",
                "--duration-ms",
                "600000",
                "--until-file",
                &until,
                "--timeout-ms",
                "5000",
            ],
        )
        .unwrap();
    // Killed once probes are getting through, however long the prober took to start (a VM
    // under emulation is several times slower than this machine).
    wait_for(Duration::from_secs(20), || Ok(server.accepted()?.len() >= 3)).unwrap();
    agent1.kill().unwrap();
    // While no agent runs, the programs are still attached, with the same links.
    for _ in 0..5 {
        let progs = cgroup_programs(&node.cgroup).unwrap();
        for p in tests::CGROUP_PROGRAMS {
            assert!(progs.iter().any(|n| n == p), "{p} detached while the agent was down: {progs:?}");
        }
        assert_eq!(pinned_link_ids(&node.bpffs).unwrap(), links_before);
        std::thread::sleep(Duration::from_millis(100));
    }
    let agent1 = t.start_agent(n1, &[]).unwrap();
    t.wait_ready(n1).unwrap();
    // Probes through the restarted agent too, before the prober is told to stop.
    let before = server.accepted().unwrap().len();
    wait_for(Duration::from_secs(30), || Ok(server.accepted()?.len() >= before + 3)).unwrap();
    std::fs::write(&until, "").unwrap();
    let summary = prober.result().unwrap();

    assert_eq!(pinned_link_ids(&t.node(n1).bpffs).unwrap(), links_before, "links were replaced");
    let adopted: Vec<Value> = agent1.log_lines().into_iter().filter(|l| l["message"] == "program attached").collect();
    assert_eq!(adopted.len(), tests::CGROUP_PROGRAMS.len(), "one line per node-wide link: {adopted:?}");
    assert!(adopted.iter().all(|l| l["adopted"] == true), "new agent re-attached instead of taking over: {adopted:?}");
    // How many probes fit in the window depends on the machine's speed; what matters is that
    // some got through before the kill, some failed while no agent ran, and that none went
    // around the agent (below).
    let ok = summary["ok"].as_u64().unwrap();
    assert!(ok > 0, "no probe succeeded around the restart: {summary}");
    assert!(summary["failed"].as_u64().unwrap() > 0, "no probe failed while the agent was down: {summary}");
    // Every probe that got through was connected to an agent's listener, none to b directly.
    let peers = summary["peers"].as_object().unwrap();
    assert_eq!(peers.keys().collect::<Vec<_>>(), vec!["127.0.0.1:15001"], "{summary}");
    // Every successful probe reached the app; at most the one in flight when the agent was
    // killed reached it without completing.
    let accepted = server.accepted().unwrap().len() as u64;
    assert!(ok <= accepted && accepted <= ok + 1, "app accepted {accepted}, probes ok {ok}");
    // The probes before the kill alone would satisfy the counts: the restarted agent itself
    // must carry traffic.
    t.wait_ready(n1).unwrap();
    let r = t.pod_app(a, &["echo", "--to", &to, "--bytes", "1000"]).unwrap();
    assert_eq!((r["ok"].as_bool(), r["wire_peer"].as_str()), (Some(true), Some("127.0.0.1:15001")), "{r}");
    wait_for(Duration::from_secs(5), || Ok(agent1.access_log().iter().any(|l| l["result"] == "ok"))).unwrap();
}

#[test]
fn inbound_from_the_node_lands_on_the_agent_not_the_app() {
    let Mesh { mut t, n2, b, .. } = Topology::two_node_mesh("inbound").unwrap();
    let _ctl = t.start_controller(&[]).unwrap();
    let server = t.start_server(b, APP_PORT).unwrap();
    let mut agent2 = t.start_agent(n2, &[]).unwrap();
    // Until it has a configuration the agent admits nothing (STRICT and policy are unknown).
    t.wait_ready(n2).unwrap();
    let to = dst(&t, b);

    let r = t.node_app(n2, &["echo", "--to", &to, "--bytes", "50000"]).unwrap();
    assert_eq!(r["ok"], true, "{r}");
    wait_for(Duration::from_secs(5), || Ok(!agent2.access_log().is_empty())).unwrap();
    let line = &agent2.access_log()[0];
    assert_eq!(line["direction"], "inbound", "{line}");
    assert_eq!(line["dst_workload"], "default/b", "{line}");
    assert_eq!(line["orig_dst"], to, "{line}");
    assert!(line["src_addr"].as_str().unwrap().starts_with(&format!("{}:", t.node(n2).gateway_ip)), "{line}");
    // The agent carried it (its log line above, the kernel's count of steered connections),
    // and dialled the app from the node's address: the app sees the client it would have seen
    // without the mesh.
    let accepted = server.accepted().unwrap();
    let node = format!("{}:", t.node(n2).gateway_ip);
    assert!(accepted[0]["peer"].as_str().unwrap().starts_with(&node), "{accepted:?}");
    assert!(agent2.stats().unwrap().kernel["inbound_steered"] >= 1);

    // With the agent down, nothing from outside reaches the app.
    agent2.stop().unwrap();
    let r = t.node_app(n2, &["echo", "--to", &to, "--bytes", "1000", "--timeout-ms", "1000"]).unwrap();
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(server.accepted().unwrap().len(), 1, "the app was reached with no agent running");
}

/// One pod may not take the node's map from the others: over its quota its connects are
/// refused and counted while another pod of the node still connects; and when the node's map is
/// full, every connect is refused and counted. Nothing passes unproxied either way.
#[test]
fn a_pod_over_its_quota_and_a_full_map_are_refused_and_counted() {
    let mut t = Topology::new("quota").unwrap();
    let n1 = t.add_node("n1").unwrap();
    let n2 = t.add_node("n2").unwrap();
    let a = t.add_pod(n1, "a", true).unwrap();
    let a2 = t.add_pod(n1, "a2", true).unwrap();
    let b = t.add_pod(n2, "b", true).unwrap();
    t.write_workloads().unwrap();
    let _ctl = t.start_controller(&[]).unwrap();
    let _server = t.start_server(b, APP_PORT).unwrap();
    let agent1 = t.start_agent(n1, &["--max-connections", "3", "--max-connections-per-workload", "2"]).unwrap();
    let _agent2 = t.start_agent(n2, &[]).unwrap();
    t.wait_ready(n1).unwrap();
    t.wait_ready(n2).unwrap();
    let to = dst(&t, b);

    // a holds what it can of three connections: two, its quota.
    let held = t.spawn_pod_app(a, &["hold", "--to", &to, "--count", "3", "--hold-ms", "60000"]).unwrap();
    wait_for(Duration::from_secs(10), || Ok(agent1.stats()?.maps["SM_ORIG_DST"].entries == 2)).unwrap();
    // The kernel's count of a's live connections, as the agent reports it.
    let live = |name: &str| -> u64 {
        let list = agent1.api(serde_json::json!({"op": "workloads"})).unwrap();
        let w = list.as_array().unwrap().iter().find(|w| w["name"] == name).cloned().unwrap();
        w["liveConnections"].as_u64().unwrap()
    };
    assert_eq!(live("a"), 2);
    // a2, on the same node, still connects: one connection fills the node's map (3)...
    let r = t.pod_app(a2, &["hold", "--to", &to, "--count", "2", "--hold-ms", "0"]).unwrap();
    let results = r["results"].as_array().unwrap();
    assert_eq!(results[0]["ok"], true, "another pod was starved by a's connections: {r}");
    // ...and the next is refused because the map is full.
    assert_eq!(
        (results[1]["ok"].as_bool(), results[1]["errno"].as_i64()),
        (Some(false), Some(libc::EPERM as i64)),
        "{r}"
    );
    let r = held.stop().unwrap();
    let results = r["results"].as_array().unwrap();
    assert_eq!((results[0]["ok"].as_bool(), results[1]["ok"].as_bool()), (Some(true), Some(true)), "{r}");
    assert_eq!(
        (results[2]["ok"].as_bool(), results[2]["errno"].as_i64()),
        (Some(false), Some(libc::EPERM as i64)),
        "{r}"
    );
    let stats = agent1.stats().unwrap();
    assert_eq!(stats.kernel["refused_workload_quota"], 1, "{stats:?}");
    assert_eq!(stats.kernel["refused_orig_dst_map_full"], 1, "{stats:?}");
    assert_eq!(stats.kernel["redirected"], 3, "{stats:?}");
    // Closed connections free their entries and their quota, each counted off exactly once:
    // both counts are back to zero (exactly: a count that wrapped below zero would show as
    // about 1.8e19), and the next connection works.
    wait_for(Duration::from_secs(10), || Ok(agent1.stats()?.maps["SM_ORIG_DST"].entries == 0)).unwrap();
    assert_eq!((live("a"), live("a2")), (0, 0));
    let r = t.pod_app(a, &["echo", "--to", &to, "--bytes", "1000"]).unwrap();
    assert_eq!(r["ok"], true, "{r}");
}

#[test]
fn a_workload_added_and_removed_at_run_time_is_captured_then_released() {
    let mut t = Topology::new("runtime").unwrap();
    let n1 = t.add_node("n1").unwrap();
    let n2 = t.add_node("n2").unwrap();
    let e = t.add_pod(n1, "e", false).unwrap();
    let d = t.add_pod(n2, "d", false).unwrap();
    t.write_workloads().unwrap();
    let _ctl = t.start_controller(&[]).unwrap();
    let _server = t.start_server(d, APP_PORT).unwrap();
    let mut agent1 = t.start_agent(n1, &[]).unwrap();
    let to = dst(&t, d);
    let echo = |t: &Topology| t.pod_app(e, &["echo", "--to", &to, "--bytes", "2000"]).unwrap();

    assert_eq!(echo(&t)["wire_peer"], to, "captured before it was added");

    // The controller places e on n1, so n1 may obtain e's identity.
    t.write_controller_workloads(&[e]).unwrap();
    std::thread::sleep(Duration::from_millis(1200));
    let add = serde_json::json!({"op": "add_workload", "workload": t.workload_json(e)});
    // The state file cannot be written (its temporary name is taken by a directory): the add
    // fails whole, nothing of e stays captured, and a retry is not told "already registered".
    let blocker = t.node(n1).state_dir.join("workloads.json.tmp");
    std::fs::create_dir(&blocker).unwrap();
    let err = agent1.api(add.clone()).unwrap_err().to_string();
    assert!(err.contains("cannot write the state file"), "{err}");
    assert_eq!(agent1.api(serde_json::json!({"op": "workloads"})).unwrap(), serde_json::json!([]));
    // A workload that could not be captured fails closed: its connects are refused (not sent
    // around the agent), and readiness names it.
    let r = echo(&t);
    assert_eq!((r["ok"].as_bool(), r["errno"].as_i64()), (Some(false), Some(libc::EPERM as i64)), "{r}");
    let (status, body) = http_get(&t.node(n1).netns, "127.0.0.1:15021", "/healthz/ready").unwrap();
    assert!(status == 503 && body.contains("default/e is not captured"), "{status} {body}");
    std::fs::remove_dir(&blocker).unwrap();
    agent1.api(add).unwrap();
    t.wait_ready(n1).unwrap();
    let r = echo(&t);
    assert_eq!((r["ok"].clone(), r["wire_peer"].clone()), (Value::Bool(true), Value::from("127.0.0.1:15001")), "{r}");
    wait_for(Duration::from_secs(5), || Ok(!agent1.access_log().is_empty())).unwrap();
    let first = &agent1.access_log()[0];
    assert_eq!(
        (first["src_workload"].as_str(), first["connection_security_policy"].as_str()),
        (Some("default/e"), Some("none")),
        "d is not in the mesh: {first}"
    );

    // A record of another node's workload is refused, and changes nothing: had it been taken
    // as a destination (it claims d's address), e's next connection to d would need mTLS.
    let mut elsewhere = t.workload_json(d);
    elsewhere["name"] = "impostor".into();
    let err = agent1.api(serde_json::json!({"op": "add_workload", "workload": elsewhere})).unwrap_err().to_string();
    assert!(err.contains("runs on node") && err.contains("n2") && err.contains("register it on its own node"), "{err}");
    assert_eq!(echo(&t)["ok"], true);
    wait_for(Duration::from_secs(5), || Ok(agent1.access_log().len() == 2)).unwrap();
    assert_eq!(agent1.access_log()[1]["connection_security_policy"], "none", "the refused record became a destination");

    // Added at run time, it survives a restart.
    agent1.kill().unwrap();
    let agent1 = t.start_agent(n1, &[]).unwrap();
    t.wait_ready(n1).unwrap();
    assert_eq!(echo(&t)["wire_peer"], "127.0.0.1:15001");

    agent1.api(serde_json::json!({"op": "remove_workload", "namespace": "default", "name": "e"})).unwrap();
    let r = echo(&t);
    assert_eq!((r["ok"].clone(), r["peer"].clone()), (Value::Bool(true), Value::from(to.as_str())), "{r}");
    // The maps are counted off the connection path, every two seconds: wait for a count.
    wait_for(Duration::from_secs(5), || {
        let maps = agent1.stats()?.maps;
        Ok(["SM_WORKLOADS", "SM_INBOUND", "SM_ORIG_DST"].iter().all(|m| maps[*m].entries == 0 && maps[*m].capacity > 0))
    })
    .unwrap();
    let ports = listening_ports(&t.pod(e).netns).unwrap();
    assert!(!ports.iter().any(|p| [15001, 15006, 15008].contains(p)), "listeners left behind: {ports:?}");
    let links = pinned_link_ids(&t.node(n1).bpffs).unwrap();
    assert!(!links.keys().any(|k| k.starts_with("sk_lookup")), "{links:?}");
    assert_eq!(agent1.api(serde_json::json!({"op": "workloads"})).unwrap(), serde_json::json!([]));
}

/// The kernel decides, not a version number: `mesh-agent preflight` probes each feature the
/// datapath needs. Where all are there the agent starts and attaches; where one is missing
/// (Debian 11's 5.10, under `cargo xtask kernels`) the agent refuses with the same names and
/// leaves the node exactly as it found it: no program attached, nothing pinned, no pod's
/// connection sent to an agent that is not there.
#[test]
fn the_agent_runs_only_where_the_kernel_has_every_feature_it_needs() {
    let Mesh { mut t, n1, n2, a, b } = Topology::two_node_mesh("kfeat").unwrap();
    let node = t.node(n1);
    let out = std::process::Command::new(tests::process::bin("mesh-agent"))
        .args(["preflight", "--bpffs", "/sys/fs/bpf", "--cgroup-root"])
        .arg(&node.cgroup)
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // One line per feature, each with its verdict.
    for f in mesh_api::kernel::FEATURES {
        assert!(text.lines().any(|l| l.contains(f.name) && l.contains(&format!("(Linux {})", f.since))), "{text}");
    }
    let scratch: Vec<_> = std::fs::read_dir("/sys/fs/bpf")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("sockmesh-preflight"))
        .collect();
    assert!(scratch.is_empty(), "preflight left its scratch maps behind: {scratch:?}");
    let missing: Vec<&str> = text.lines().filter(|l| l.starts_with("MISSING")).collect();
    // meshctl check runs the same probes: its kernel line agrees and names what is missing.
    let check =
        std::process::Command::new(tests::process::bin("meshctl")).args(["-o", "json", "check"]).output().unwrap();
    let report: Value = serde_json::from_slice(&check.stdout).unwrap();
    let kernel = report["checks"].as_array().unwrap().iter().find(|c| c["name"] == "kernel").unwrap().clone();
    assert_eq!(kernel["ok"], out.status.success(), "meshctl check and preflight disagree: {kernel}\n{text}");
    // On this host (the agent runs on it directly) the node mounts are right.
    let mounts = report["checks"].as_array().unwrap().iter().find(|c| c["name"] == "node mounts").unwrap();
    assert_eq!(mounts["ok"], true, "{mounts}");
    for m in &missing {
        let name = m.trim_start_matches("MISSING").trim().split(" (Linux").next().unwrap();
        assert!(kernel["detail"].as_str().unwrap().contains(name), "meshctl check does not name {name:?}: {kernel}");
    }
    println!(
        "kernel {}: preflight {}",
        mesh_api::kernel::release(),
        if out.status.success() { "passed" } else { "refused" }
    );
    // The kernel matrix says which verdict each kernel must get; elsewhere (this machine, CI)
    // the kernel must run the datapath, so a probe that fails wrongly cannot pass as a refusal.
    let expect_refused = std::env::var("SOCKMESH_EXPECT_KERNEL").is_ok_and(|v| v == "refused");
    assert_eq!(!out.status.success(), expect_refused, "preflight's verdict is not the expected one: {text}");
    if out.status.success() {
        assert!(missing.is_empty(), "{text}");
        assert!(text.contains("the agent's programs pass this kernel's verifier"), "{text}");
        let _ctl = t.start_controller(&[]).unwrap();
        let _server = t.start_server(b, APP_PORT).unwrap();
        let _agent1 = t.start_agent(n1, &[]).unwrap();
        let _agent2 = t.start_agent(n2, &[]).unwrap();
        let progs = cgroup_programs(&t.node(n1).cgroup).unwrap();
        for p in tests::CGROUP_PROGRAMS {
            assert!(progs.iter().any(|n| n == p), "{p} not attached: {progs:?}");
        }
        t.wait_ready(n1).unwrap();
        t.wait_ready(n2).unwrap();
        let r = t.pod_app(a, &["echo", "--to", &dst(&t, b), "--bytes", "1000"]).unwrap();
        assert_eq!((r["ok"].as_bool(), r["wire_peer"].as_str()), (Some(true), Some("127.0.0.1:15001")), "{r}");
    } else {
        assert!(!missing.is_empty(), "preflight failed without naming a missing feature: {text}");
        let _ctl = t.start_controller(&[]).unwrap();
        let server = t.start_server(b, APP_PORT).unwrap();
        let refused = match t.start_agent(n1, &[]) {
            Ok(_) => panic!("the agent started on a kernel that lacks: {missing:?}"),
            Err(e) => format!("{e:#}"),
        };
        for m in &missing {
            let name = m.trim_start_matches("MISSING").trim().split(" (Linux").next().unwrap();
            assert!(refused.contains(name), "the refusal does not name {name:?}: {refused}");
        }
        println!("the agent's refusal: {refused}");
        assert!(refused.contains("not attached (none of it"), "{refused}");
        let node = t.node(n1);
        let progs = cgroup_programs(&node.cgroup).unwrap();
        assert!(!progs.iter().any(|p| p.starts_with("sm_")), "half-attached after the refusal: {progs:?}");
        // What is pinned is the guard alone: a's two connect links.
        let mut pins: Vec<String> =
            walk(&node.bpffs).iter().map(|p| p.strip_prefix(&node.bpffs).unwrap().display().to_string()).collect();
        pins.sort();
        assert_eq!(pins, ["guard/default_a-connect4", "guard/default_a-connect6"], "{refused}");
        assert!(refused.contains("Fail closed") && refused.contains("default/a"), "{refused}");
        // a is meshed and its agent cannot run: its connections fail, none reaches b (P4).
        let r = t.pod_app(a, &["echo", "--to", &dst(&t, b), "--bytes", "1000", "--timeout-ms", "2000"]).unwrap();
        assert_eq!((r["ok"].as_bool(), r["errno"].as_i64()), (Some(false), Some(libc::EPERM as i64)), "{r}");
        assert!(server.accepted().unwrap().is_empty(), "a meshed pod's connection left in plaintext");
        // A second refusal keeps the guard as it is.
        assert!(t.start_agent(n1, &[]).is_err());
        assert_eq!(walk(&node.bpffs).len(), 2);
        // Uninstalling lifts it: the operator's explicit choice to leave the node unmeshed.
        let out = std::process::Command::new(tests::process::bin("mesh-agent"))
            .args(["uninstall", "--bpffs-dir"])
            .arg(&node.bpffs)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let r = t.pod_app(a, &["echo", "--to", &dst(&t, b), "--bytes", "1000"]).unwrap();
        assert_eq!(r["ok"], true, "{r}");
        assert_ne!(r["wire_peer"], "127.0.0.1:15001", "{r}");
    }
}

/// Every file below `dir` (none if it does not exist).
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// The guard a refusing agent leaves on a meshed workload's cgroup (tested here on this
/// kernel; the refusal that installs it runs on Linux 5.10 in the kernel matrix): TCP beyond
/// loopback is refused with EPERM, loopback is not, and an agent that runs the datapath lifts
/// it once it has captured the workload.
#[test]
fn the_fail_closed_guard_refuses_tcp_beyond_loopback_until_its_pins_are_removed() {
    let Mesh { mut t, n1, n2, a, b } = Topology::two_node_mesh("guard").unwrap();
    let server = t.start_server(b, APP_PORT).unwrap();
    let pins = t.node(n1).bpffs.join("guard");
    mesh_api::kernel::guard(&t.pod(a).cgroup, &pins, "default_a").unwrap();
    let r = t.pod_app(a, &["echo", "--to", &dst(&t, b), "--bytes", "1000", "--timeout-ms", "2000"]).unwrap();
    assert_eq!((r["ok"].as_bool(), r["errno"].as_i64()), (Some(false), Some(libc::EPERM as i64)), "{r}");
    assert!(server.accepted().unwrap().is_empty());
    // Over IPv6 too, and through a v4-mapped address on an IPv6 socket.
    let mapped = format!("[::ffff:{}]:{APP_PORT}", t.pod(b).ip);
    for other in ["[2001:db8::1]:9", mapped.as_str()] {
        let r = t.pod_app(a, &["echo", "--to", other, "--bytes", "10", "--timeout-ms", "2000"]).unwrap();
        assert_eq!(r["errno"].as_i64(), Some(libc::EPERM as i64), "{other}: {r}");
    }
    assert!(server.accepted().unwrap().is_empty());
    // Loopback is the pod's own business: nothing listens there, so the kernel refuses it
    // (ECONNREFUSED), not the guard (EPERM).
    for lo in ["127.0.0.1:9", "[::1]:9"] {
        let r = t.pod_app(a, &["echo", "--to", lo, "--bytes", "10", "--timeout-ms", "2000"]).unwrap();
        assert_eq!(r["errno"].as_i64(), Some(libc::ECONNREFUSED as i64), "{lo}: {r}");
    }
    // Installing it again over its own pins changes nothing.
    mesh_api::kernel::guard(&t.pod(a).cgroup, &pins, "default_a").unwrap();
    // An agent that runs the datapath lifts it, once a is captured: a's connection then goes
    // through the mesh.
    let _ctl = t.start_controller(&[]).unwrap();
    let _agent1 = t.start_agent(n1, &[]).unwrap();
    let _agent2 = t.start_agent(n2, &[]).unwrap();
    t.wait_ready(n1).unwrap();
    t.wait_ready(n2).unwrap();
    assert!(!pins.exists(), "the running agent left the guard in place");
    let r = t.pod_app(a, &["echo", "--to", &dst(&t, b), "--bytes", "1000"]).unwrap();
    assert_eq!((r["ok"].as_bool(), r["wire_peer"].as_str()), (Some(true), Some("127.0.0.1:15001")), "{r}");
}
