//! Agent upgrades without downtime, on the real kernel with the real binaries: a second agent
//! started beside the running one takes its listeners over, the old one drains, and no
//! connection is refused or reset meanwhile.
#![cfg(feature = "privileged")]

use std::time::Duration;

use serde_json::{json, Value};
use tests::*;

const APP_PORT: u16 = 8080;
const TRANSFER_PORT: u16 = 8081;

fn probe_args<'a>(to: &'a str, until: &'a str) -> Vec<&'a str> {
    vec![
        "probe",
        "--to",
        to,
        "--interval-ms",
        "2",
        "--duration-ms",
        "900000",
        "--until-file",
        until,
        "--timeout-ms",
        "10000",
    ]
}

fn lines_with(agent: &Agent, message: &str) -> Vec<Value> {
    agent.log_lines().into_iter().filter(|l| l["message"] == message).collect()
}

/// The program attached to each of a node's cgroup hooks: one each, never two.
fn one_program_per_hook(t: &Topology, n: NodeId) {
    let progs = cgroup_programs(&t.node(n).cgroup).unwrap();
    for p in tests::CGROUP_PROGRAMS {
        assert_eq!(progs.iter().filter(|n| *n == p).count(), 1, "{p} on {}: {progs:?}", t.node(n).name);
    }
}

/// Both nodes' agents are replaced, one after the other, while a pod probes a pod on its own
/// node and one on the other node every 2 ms, and a long transfer is halfway: no probe fails,
/// the transfer completes intact through the draining agents, the links are the same ones,
/// with one program each, and the old agents exit once their connections are done.
#[test]
fn surge_upgrade_under_load_refuses_nothing() {
    let mut t = Topology::new("handover").unwrap();
    let n1 = t.add_node("n1").unwrap();
    let n2 = t.add_node("n2").unwrap();
    let a = t.add_pod(n1, "a", true).unwrap();
    let c = t.add_pod(n1, "c", true).unwrap();
    let b = t.add_pod(n2, "b", true).unwrap();
    t.write_workloads().unwrap();
    let _ctl = t.start_controller(&[]).unwrap();
    let server_b = t.start_server(b, APP_PORT).unwrap();
    let server_c = t.start_server(c, APP_PORT).unwrap();
    let transfer_server = t.start_server(b, TRANSFER_PORT).unwrap();
    // A drain deadline no slow machine reaches: the transfer decides when the old agents go.
    let drain = ["--drain-deadline-seconds", "600"];
    let mut old1 = t.start_agent(n1, &drain).unwrap();
    let mut old2 = t.start_agent(n2, &drain).unwrap();
    t.wait_ready(n1).unwrap();
    t.wait_ready(n2).unwrap();
    let links1 = pinned_link_ids(&t.node(n1).bpffs).unwrap();
    let links2 = pinned_link_ids(&t.node(n2).bpffs).unwrap();
    // The cgroup links, and a's and c's sk_lookup on n1, b's on n2.
    assert_eq!(links1.len(), tests::CGROUP_PROGRAMS.len() + 2, "{links1:?}");
    assert_eq!(links2.len(), tests::CGROUP_PROGRAMS.len() + 1, "{links2:?}");
    let maps = |n: NodeId| -> Vec<String> {
        let mut m: Vec<String> = std::fs::read_dir(t.node(n).bpffs.join("maps"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        m.sort();
        m
    };
    let (maps1, maps2) = (maps(n1), maps(n2));
    assert!(maps1.iter().any(|m| m == "SM_INBOUND"), "{maps1:?}");

    let until = t.node(n1).state_dir.join("probe-stop").display().to_string();
    let halfway = t.node(n1).state_dir.join("transfer-go-on");
    let (to_b, to_c) = (t.addr(b, APP_PORT), t.addr(c, APP_PORT));
    let cross = t.spawn_pod_app(a, &probe_args(&to_b, &until)).unwrap();
    let same = t.spawn_pod_app(a, &probe_args(&to_c, &until)).unwrap();
    let to_transfer = t.addr(b, TRANSFER_PORT);
    let transfer = t
        .spawn_pod_app(
            a,
            &[
                "echo",
                "--to",
                &to_transfer,
                "--bytes",
                "10000000",
                "--halfway-until-file",
                &halfway.display().to_string(),
            ],
        )
        .unwrap();
    // Probes get through both ways, and the transfer is under way, before anything changes.
    wait_for(Duration::from_secs(30), || {
        Ok(server_b.accepted()?.len() >= 3
            && server_c.accepted()?.len() >= 3
            && !transfer_server.accepted()?.is_empty())
    })
    .unwrap();

    // n1's agent (the source of every probe, and both ends of the same-node ones), then n2's
    // (the destination of the cross-node ones: its HBONE connections go away under them).
    let new1 = t.start_agent(n1, &[]).unwrap();
    assert_eq!(lines_with(&new1, "taking over from the agent running on this node").len(), 1);
    let captured = lines_with(&new1, "workload captured");
    assert_eq!(captured.len(), 2, "{captured:?}");
    assert!(captured.iter().all(|l| l["listeners_taken_over"] == true), "{captured:?}");
    wait_for(Duration::from_secs(30), || Ok(!lines_with(&old1, "handed over to a successor; draining").is_empty()))
        .unwrap();
    // New probes now go through the new agent while the old one still carries the transfer.
    let before = (server_b.accepted().unwrap().len(), server_c.accepted().unwrap().len());
    wait_for(Duration::from_secs(30), || {
        Ok(server_b.accepted()?.len() >= before.0 + 3 && server_c.accepted()?.len() >= before.1 + 3)
    })
    .unwrap();
    let new2 = t.start_agent(n2, &[]).unwrap();
    wait_for(Duration::from_secs(30), || Ok(!lines_with(&old2, "handed over to a successor; draining").is_empty()))
        .unwrap();
    let before = server_b.accepted().unwrap().len();
    wait_for(Duration::from_secs(30), || Ok(server_b.accepted()?.len() >= before + 3)).unwrap();
    // The old agents are still there: the transfer's connection runs through both.
    assert!(
        old1.pid().is_some_and(alive) && old2.pid().is_some_and(alive),
        "an old agent left before the transfer ended"
    );

    // The rest of the transfer, through the draining agents; then they go by themselves.
    std::fs::write(&halfway, "").unwrap();
    let r = transfer.result().unwrap();
    if r["ok"] != true {
        // What each agent saw of it (the relay's end and its error), and what it warned of.
        for (name, agent) in [("old1", &old1), ("old2", &old2), ("new1", &new1)] {
            let seen: Vec<Value> = agent
                .log_lines()
                .into_iter()
                .filter(|l| l["orig_dst"].as_str() == Some(&to_transfer) || l["level"] == "WARN")
                .collect();
            eprintln!("{name}: {seen:?}");
        }
    }
    assert_eq!((r["ok"].as_bool(), r["received"].as_u64()), (Some(true), Some(10_000_000)), "{r}");
    for old in [&mut old1, &mut old2] {
        let status = old.wait_exit(Duration::from_secs(120)).unwrap();
        assert!(status.success(), "{status}: {}", old.log_text());
        assert_eq!(lines_with(old, "drained: every connection ended; exiting, kernel programs stay attached").len(), 1);
    }
    std::fs::write(&until, "").unwrap();
    for (what, prober) in [("same node", same), ("cross node", cross)] {
        let s = prober.result().unwrap();
        assert_eq!(s["failed"], 0, "{what}: probes failed during the upgrade: {s}");
        assert!(s["ok"].as_u64().unwrap() > 0, "{what}: {s}");
        println!("{what}: {} probes, longest (connect to answer) {} µs", s["ok"], s["max_rtt_us"]);
    }
    // The new agents carried traffic, and the kernel state is the one it was.
    assert!(new1.access_log().iter().any(|l| l["result"] == "ok" && l["dst_workload"] == "default/c"));
    assert!(new2.access_log().iter().any(|l| l["result"] == "ok" && l["direction"] == "inbound"));
    assert_eq!(pinned_link_ids(&t.node(n1).bpffs).unwrap(), links1, "n1's links were replaced");
    assert_eq!(pinned_link_ids(&t.node(n2).bpffs).unwrap(), links2, "n2's links were replaced");
    assert_eq!((maps(n1), maps(n2)), (maps1, maps2), "pinned maps were lost or added");
    one_program_per_hook(&t, n1);
    one_program_per_hook(&t, n2);
}

/// Pauses (SIGSTOP) or resumes (SIGCONT) the controller: no certificate is signed meanwhile.
fn signal(ctl: &Controller, sig: i32) {
    // SAFETY: our own child's pid.
    unsafe { libc::kill(ctl.pid().unwrap() as i32, sig) };
}

fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

/// A connection that outlives the drain deadline is closed at the deadline, not at the
/// hand-over, and the old agent counts it; new connections go to the new agent meanwhile.
#[test]
fn a_connection_outliving_the_drain_deadline_is_closed_then_and_counted() {
    let (mut t, n1, a, b) = Topology::one_node_mesh("drain").unwrap();
    let _ctl = t.start_controller(&[]).unwrap();
    let server = t.start_server(b, APP_PORT).unwrap();
    const DEADLINE_S: u64 = 4;
    let mut old = t.start_agent(n1, &["--drain-deadline-seconds", &DEADLINE_S.to_string()]).unwrap();
    t.wait_ready(n1).unwrap();
    let to = t.addr(b, APP_PORT);
    let lingering = t.spawn_pod_app(a, &["linger", "--to", &to, "--seconds", "600"]).unwrap();
    wait_for(Duration::from_secs(30), || Ok(server.accepted()?.len() == 1)).unwrap();

    let new = t.start_agent(n1, &[]).unwrap();
    // Served by the new agent while the old one holds the lingering connection.
    let r = t.pod_app(a, &["echo", "--to", &to, "--bytes", "1000"]).unwrap();
    assert_eq!(r["ok"], true, "{r}");
    wait_for(Duration::from_secs(10), || Ok(new.access_log().iter().any(|l| l["result"] == "ok"))).unwrap();

    let r = lingering.result().unwrap();
    assert_eq!((r["ok"].as_bool(), r["closed_by_peer"].as_bool()), (Some(true), Some(true)), "{r}");
    let status = old.wait_exit(Duration::from_secs(60)).unwrap();
    assert!(status.success(), "{status}");
    // Closed no earlier than the deadline after the drain began (one clock: this machine's).
    let draining = lines_with(&old, "handed over to a successor; draining");
    let since = draining[0]["since_unix_ms"].as_u64().unwrap();
    let closed = r["closed_unix_ms"].as_u64().unwrap();
    assert!(closed + 1 >= since + DEADLINE_S * 1000, "closed {} ms into the drain: {r}", closed as i64 - since as i64);
    let reached = lines_with(
        &old,
        "drain deadline reached: closing the connections still open; exiting, kernel programs stay attached",
    );
    assert_eq!(reached.len(), 1, "{}", old.log_text());
    assert!(reached[0]["closed_at_deadline"].as_u64().unwrap() >= 1, "{}", reached[0]);
    assert!(!lines_with(&old, "connection closed at the drain deadline").is_empty());
    // The new agent still serves after the old one is gone.
    let r = t.pod_app(a, &["echo", "--to", &to, "--bytes", "1000"]).unwrap();
    assert_eq!(r["ok"], true, "{r}");
}

/// The agent running on the node dies while its successor is still waiting to take over (here:
/// for certificates, the controller being paused): the successor notices and accepts at once,
/// rather than leave the pods' connections waiting in the backlogs.
#[test]
fn a_successor_whose_predecessor_dies_first_accepts_at_once() {
    let (mut t, n1, a, b) = Topology::one_node_mesh("orphaned").unwrap();
    let ctl = t.start_controller(&[]).unwrap();
    let _server = t.start_server(b, APP_PORT).unwrap();
    let mut old = t.start_agent(n1, &[]).unwrap();
    t.wait_ready(n1).unwrap();
    let to = t.addr(b, APP_PORT);
    signal(&ctl, libc::SIGSTOP);
    std::thread::scope(|s| {
        let successor = s.spawn(|| t.start_agent(n1, &[]));
        // Once the old agent has handed its listeners over, it dies.
        wait_for(Duration::from_secs(60), || {
            Ok(!lines_with(&old, "listeners handed to a successor; serving until it is ready").is_empty())
        })
        .unwrap();
        old.kill().unwrap();
        let new = successor.join().unwrap().unwrap();
        assert_eq!(lines_with(&new, "the predecessor went away before this agent took over; accepting now").len(), 1);
        signal(&ctl, libc::SIGCONT);
        t.wait_ready(n1).unwrap();
        let r = t.pod_app(a, &["echo", "--to", &to, "--bytes", "1000"]).unwrap();
        assert_eq!(r["ok"], true, "{r}");
        wait_for(Duration::from_secs(10), || Ok(new.access_log().iter().any(|l| l["result"] == "ok"))).unwrap();
    });
}

/// An agent that holds the node but does not answer on the hand-over socket (one too old to
/// hand over, say): a second agent does not capture beside it (that would refuse every pod),
/// it exits saying what to do, and the first keeps serving.
#[test]
fn an_agent_that_cannot_hand_over_is_not_run_beside() {
    let (mut t, n1, a, b) = Topology::one_node_mesh("nohandover").unwrap();
    let _ctl = t.start_controller(&[]).unwrap();
    let _server = t.start_server(b, APP_PORT).unwrap();
    let first = t.start_agent(n1, &[]).unwrap();
    t.wait_ready(n1).unwrap();
    std::fs::remove_file(t.node(n1).state_dir.join("handover.sock")).unwrap();
    let e = t.start_agent(n1, &[]).err().expect("a second agent ran beside one that does not hand over").to_string();
    assert!(e.contains("did not answer") && e.contains("maxSurge 0"), "{e}");
    let r = t.pod_app(a, &["echo", "--to", &t.addr(b, APP_PORT), "--bytes", "1000"]).unwrap();
    assert_eq!(r["ok"], true, "{r}");
    wait_for(Duration::from_secs(10), || Ok(first.access_log().iter().any(|l| l["result"] == "ok"))).unwrap();
}

/// A successor that cannot become ready (no certificates: the controller is paused) gives up
/// after `--handover-wait-seconds`, exits saying what it was missing, and the running agent
/// serves on: its pods' connections work, and its local API is back at its path and takes
/// changes again (the successor took none meanwhile). The links are the ones there were.
#[test]
fn a_successor_that_cannot_become_ready_gives_up_and_the_running_agent_serves_on() {
    let (mut t, n1, a, b) = Topology::one_node_mesh("giveup").unwrap();
    let ctl = t.start_controller(&[]).unwrap();
    let _server = t.start_server(b, APP_PORT).unwrap();
    let mut old = t.start_agent(n1, &[]).unwrap();
    t.wait_ready(n1).unwrap();
    let links = pinned_link_ids(&t.node(n1).bpffs).unwrap();
    let to = t.addr(b, APP_PORT);
    signal(&ctl, libc::SIGSTOP);
    let e = std::thread::scope(|s| {
        let successor = s.spawn(|| t.start_agent(n1, &["--handover-wait-seconds", "20"]));
        // Meanwhile the successor holds the local API's path and takes no change: one it
        // accepted would be lost when it gives up.
        let refused = |e: &anyhow::Error| e.to_string().contains("taking over from the one running on this node");
        wait_for(Duration::from_secs(30), || {
            Ok(old
                .api(json!({"op": "remove_workload", "namespace": "default", "name": "nobody"}))
                .is_err_and(|e| refused(&e)))
        })
        .expect("the successor took a change through the local API while taking over");
        successor.join().unwrap().err().expect("a successor without certificates took over").to_string()
    });
    signal(&ctl, libc::SIGCONT);
    assert!(
        e.contains("could not take over within --handover-wait-seconds 20")
            && e.contains("serves on")
            && e.contains(&format!("PID {}", old.pid().unwrap())),
        "{e}"
    );
    wait_for(Duration::from_secs(10), || {
        Ok(!lines_with(&old, "a successor went away before taking over; carrying on").is_empty())
    })
    .unwrap();
    let r = t.pod_app(a, &["echo", "--to", &to, "--bytes", "1000"]).unwrap();
    assert_eq!(r["ok"], true, "{r}");
    wait_for(Duration::from_secs(10), || Ok(old.access_log().iter().any(|l| l["result"] == "ok"))).unwrap();
    // The API answers at its path again, and takes changes (no longer frozen for a hand-over).
    wait_for(Duration::from_secs(10), || Ok(old.api(json!({"op": "workloads"})).is_ok()))
        .expect("the running agent's local API did not come back");
    let e = old.api(json!({"op": "remove_workload", "namespace": "default", "name": "nobody"})).unwrap_err();
    assert!(!e.to_string().contains("handing over"), "{e}");
    assert_eq!(pinned_link_ids(&t.node(n1).bpffs).unwrap(), links);
    one_program_per_hook(&t, n1);
    // Its socket, bound again, is its own: removed when it stops.
    let api = t.node(n1).state_dir.join("agent.sock");
    old.stop().unwrap();
    assert!(!api.exists(), "the agent left its local API socket behind");
}

/// A DaemonSet's surge, each agent in a pod's netns of its own (`hostNetwork: false`): the new
/// agent takes the pods' listeners over (they are in the pods' netns, whichever agent passed
/// them) but binds its own node-wide listeners (readiness, metrics, admin) in its netns, the
/// old agent's being in another. A pod probing a pod on its node every 2 ms sees no refusal,
/// the old agent drains and exits, and the new one answers readiness in its own netns.
#[test]
fn a_surge_agent_in_a_netns_of_its_own_takes_over() {
    let (mut t, n1, a, b) = Topology::one_node_mesh("surgenetns").unwrap();
    let old_pod = t.add_pod(n1, "agent-old", false).unwrap();
    let new_pod = t.add_pod(n1, "agent-new", false).unwrap();
    let _ctl = t.start_controller(&[]).unwrap();
    let server = t.start_server(b, APP_PORT).unwrap();
    let (old_ns, new_ns) = (t.pod(old_pod).netns.clone(), t.pod(new_pod).netns.clone());
    let ready = |netns: &str| {
        wait_for(Duration::from_secs(20), || Ok(http_get(netns, "127.0.0.1:15021", "/healthz/ready")?.0 == 200))
    };
    let mut old = t.start_agent_at(n1, &old_ns, &t.pod(old_pod).cgroup, &[]).unwrap();
    ready(&old_ns).expect("the old agent's readiness, in its netns");
    let links = pinned_link_ids(&t.node(n1).bpffs).unwrap();

    let until = t.node(n1).state_dir.join("probe-stop").display().to_string();
    let to = t.addr(b, APP_PORT);
    let prober = t.spawn_pod_app(a, &probe_args(&to, &until)).unwrap();
    wait_for(Duration::from_secs(30), || Ok(server.accepted()?.len() >= 3)).unwrap();

    let new = t.start_agent_at(n1, &new_ns, &t.pod(new_pod).cgroup, &[]).unwrap();
    let rebound =
        lines_with(&new, "the predecessor's listener is bound elsewhere (another netns, say); binding a new one");
    let mut kinds: Vec<&str> = rebound.iter().filter_map(|l| l["kind"].as_str()).collect();
    kinds.sort();
    assert_eq!(kinds, ["admin", "metrics", "readiness"], "{rebound:?}");
    let captured = lines_with(&new, "workload captured");
    assert_eq!(captured.len(), 2, "{captured:?}");
    assert!(captured.iter().all(|l| l["listeners_taken_over"] == true), "{captured:?}");
    let status = old.wait_exit(Duration::from_secs(120)).unwrap();
    assert!(status.success(), "{status}: {}", old.log_text());
    ready(&new_ns).expect("the new agent's readiness, in its netns");
    let before = server.accepted().unwrap().len();
    wait_for(Duration::from_secs(30), || Ok(server.accepted()?.len() >= before + 3)).unwrap();
    std::fs::write(&until, "").unwrap();
    let s = prober.result().unwrap();
    assert_eq!(s["failed"], 0, "probes failed during the upgrade: {s}");
    assert!(new.access_log().iter().any(|l| l["result"] == "ok" && l["dst_workload"] == "default/b"));
    assert_eq!(pinned_link_ids(&t.node(n1).bpffs).unwrap(), links, "the links were replaced");
    one_program_per_hook(&t, n1);
}
