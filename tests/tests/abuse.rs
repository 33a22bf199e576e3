//! The agent under abuse, on the real kernel with the real binaries: a hostile client
//! (`sm-attack`) against a destination agent's HBONE port, and a legitimate meshed connection
//! made while it attacks. Each limit is set low with its flag so that it is reached quickly;
//! docs/security.md gives the defaults. No verdict depends on the machine's speed: the bounds
//! checked are counts (handshakes answered, windows granted, streams opened) and deadlines
//! from below (a connection is never closed before its deadline).
#![cfg(feature = "privileged")]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use tests::*;

const APP_PORT: u16 = 8080;
const B_ID: &str = "spiffe://cluster.local/ns/default/sa/sa-b";

/// Runs sm-attack in `n`'s netns against `to` and returns its JSON line.
fn attack(t: &Topology, n: NodeId, to: &str, args: &[&str]) -> Value {
    let out = attack_cmd(t, n, to, args).output().unwrap();
    serde_json::from_slice(out.stdout.trim_ascii())
        .unwrap_or_else(|_| panic!("sm-attack {args:?}: {}", String::from_utf8_lossy(&out.stdout)))
}

fn attack_cmd(t: &Topology, n: NodeId, to: &str, args: &[&str]) -> Command {
    let mut cmd = t.node_command(n, bin("sm-attack")).unwrap();
    cmd.args(&args[..1]).args(["--to", to, "--expect", B_ID]).arg("--root-dir").arg(t.controller_dir());
    cmd.args(&args[1..]);
    cmd
}

fn echo_ok(t: &Topology, from: PodId, to: &str) -> Value {
    t.pod_app(from, &["echo", "--to", to, "--bytes", "20000", "--timeout-ms", "20000"]).unwrap()
}

/// A two-node mesh whose destination agent (n2) runs with `flags`; both agents ready.
fn mesh_with(name: &str, flags: &[&str]) -> (Mesh, Controller, Server, Agent, Agent) {
    let mut m = Topology::two_node_mesh(name).unwrap();
    let ctl = m.t.start_controller(&[]).unwrap();
    let server = m.t.start_server(m.b, APP_PORT).unwrap();
    let agent1 = m.t.start_agent(m.n1, &[]).unwrap();
    let agent2 = m.t.start_agent(m.n2, flags).unwrap();
    m.t.wait_ready(m.n1).unwrap();
    m.t.wait_ready(m.n2).unwrap();
    (m, ctl, server, agent1, agent2)
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn hits(agent: &Agent, limit: &str) -> u64 {
    agent.stats().unwrap().limits.get(limit).copied().unwrap_or(0)
}

/// The agent never ran out of descriptors: no accept failed.
fn no_accept_failures(agent: &Agent) {
    let failed: Vec<_> = agent
        .log_lines()
        .into_iter()
        .filter(|l| l["message"].as_str().is_some_and(|m| m.contains("accept failed")))
        .collect();
    assert!(failed.is_empty(), "{failed:?}");
}

#[test]
fn a_client_hello_flood_gets_only_its_rate_of_handshakes_and_a_meshed_connection_still_succeeds() {
    let (m, _ctl, _server, _agent1, agent2) = mesh_with("hellos", &["--handshakes-per-source-per-second", "50"]);
    let (t, hbone, to) = (&m.t, format!("{}:15008", m.t.pod(m.b).ip), m.dst(APP_PORT));
    let flood = std::thread::scope(|s| {
        let flood = s.spawn(|| attack(t, m.n2, &hbone, &["hellos", "--count", "3000", "--concurrency", "32"]));
        // Meshed connections from a (another source) while the flood runs.
        for _ in 0..3 {
            let r = echo_ok(t, m.a, &to);
            assert_eq!(r["ok"], true, "a meshed connection failed during the flood: {r}");
        }
        flood.join().unwrap()
    });
    let (answered, refused) = (flood["answered"].as_u64().unwrap(), flood["refused"].as_u64().unwrap());
    let seconds = flood["seconds"].as_f64().unwrap();
    // The handshakes the agent did (it sent its flight, signed with the workload's key) are
    // bounded by its allowance: a burst of twice the rate, then the rate.
    let allowance = 100.0 + 50.0 * (seconds + 1.0);
    assert!(
        (answered as f64) <= allowance,
        "{answered} handshakes in {seconds:.1}s: over the allowance {allowance}: {flood}"
    );
    assert!(refused > 0, "{flood}");
    assert_eq!(answered + refused + flood["failed"].as_u64().unwrap(), 3000, "{flood}");
    assert!(hits(&agent2, "handshake_rate_per_source") >= refused.min(1), "not counted");
    // What was refused was refused before any handshake: the agent logged no handshake for it.
    let failures: u64 = agent2.stats().unwrap().inbound.handshake_failures.values().sum();
    assert!(failures <= answered, "{failures} handshake failures for {answered} handshakes done");
}

#[test]
fn thirty_thousand_idle_connections_leave_no_emfile_and_meshed_connections_succeed() {
    let (m, _ctl, _server, _agent1, agent2) = mesh_with("idle30k", &["--handshake-timeout-ms", "3000"]);
    let t = &m.t;
    let hbone = format!("{}:15008", t.pod(m.b).ip);
    // One source, more connections than one address has ports by default.
    run(Command::new("ip").args([
        "netns",
        "exec",
        &t.node(m.n2).netns,
        "sysctl",
        "-qw",
        "net.ipv4.ip_local_port_range=1024 65000",
    ]))
    .unwrap();
    let to = m.dst(APP_PORT);
    let floods: Vec<Value> = std::thread::scope(|s| {
        // Two processes (each may hold 20,000 descriptors here).
        let floods: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| {
                    attack(
                        t,
                        m.n2,
                        &hbone,
                        &["idle", "--count", "15000", "--wait-ms", "30000", "--deadline-ms", "3000"],
                    )
                })
            })
            .collect();
        for _ in 0..3 {
            let r = echo_ok(t, m.a, &to);
            assert_eq!(r["ok"], true, "a meshed connection failed during the flood: {r}");
        }
        floods.into_iter().map(|f| f.join().unwrap()).collect()
    });
    let total = |k: &str| floods.iter().map(|f| f[k].as_u64().unwrap()).sum::<u64>();
    for f in &floods {
        assert_eq!(f["opened"], 15000, "{f}");
    }
    // The agent took what it could from its accept queue (the rest overflowed it and never
    // reached the agent: they cost it nothing, and the client's side of them stays open until
    // it sends): beyond the pending-handshake bounds at once, refused and counted; within
    // them, held to the handshake deadline and closed then, counted.
    let stats = agent2.stats().unwrap();
    assert!(stats.limits.get("pending_handshakes_per_source").copied().unwrap_or(0) > 0, "{:?}", stats.limits);
    let timed_out = stats.inbound.handshake_failures.get("handshake_timeout").copied().unwrap_or(0);
    assert!(timed_out > 0, "none was held to the handshake deadline: {:?}", stats.inbound);
    assert!(total("at_deadline") >= 1, "none was closed at the 3 s handshake deadline: {floods:?}");
    assert!(total("closed") >= 10_000, "{floods:?}");
    no_accept_failures(&agent2);
    assert_eq!(echo_ok(t, m.a, &to)["ok"], true);
}

#[test]
fn slow_clients_are_closed_at_their_deadlines_never_before() {
    let flags = ["--handshake-timeout-ms", "2000", "--hbone-idle-timeout-seconds", "3", "--idle-timeout-seconds", "3"];
    let (m, _ctl, _server, _agent1, agent2) = mesh_with("slow", &flags);
    let t = &m.t;
    let hbone = format!("{}:15008", t.pod(m.b).ip);
    let app = m.dst(APP_PORT);
    let cases = [
        ("tcp", 2000, &hbone),
        ("half-hello", 2000, &hbone),
        ("no-preface", 2000, &hbone),
        ("no-connect", 3000, &hbone),
        ("silent-stream", 3000, &hbone),
        // Plaintext to the app (PERMISSIVE, from the node): the idle timeout of 15006.
        ("tcp", 3000, &app),
    ];
    let app = app.as_str();
    std::thread::scope(|s| {
        let runs: Vec<_> = cases
            .iter()
            .map(|(stage, deadline, to)| {
                let r = s.spawn(move || {
                    attack(t, m.n2, to, &["slow", "--stage", stage, "--target", app, "--wait-ms", "60000"])
                });
                (stage, deadline, to, r)
            })
            .collect();
        for (stage, deadline, to, r) in runs {
            let r = r.join().unwrap();
            let closed = r["closed_ms"].as_u64().unwrap_or_else(|| panic!("{stage} to {to} was never closed: {r}"));
            // Timers fire at their deadline or after it (a millisecond's rounding allowed)...
            assert!(
                closed + 5 >= *deadline,
                "{stage} to {to} closed after {closed} ms, before its {deadline} ms deadline: {r}"
            );
            // ...and the flags set the deadlines: the defaults (10 s for the handshake, an
            // hour idle) would close nothing this early.
            assert!(
                closed < 9000,
                "{stage} to {to} closed only after {closed} ms: the {deadline} ms deadline was not applied: {r}"
            );
        }
    });
    assert!(hits(&agent2, "hbone_idle") >= 1);
    assert!(
        hits(&agent2, "idle") >= 2,
        "the silent stream and the plaintext connection: {:?}",
        agent2.stats().unwrap().limits
    );
}

#[test]
fn one_peer_is_held_to_its_bound_and_another_is_not() {
    let flags = ["--max-connections-per-peer", "6", "--peer-buffer-mib", "8", "--max-streams-per-peer", "5"];
    let (m, _ctl, _server, _agent1, agent2) = mesh_with("peer", &flags);
    let t = &m.t;
    let hbone = format!("{}:15008", t.pod(m.b).ip);
    let mut held = attack_cmd(t, m.n2, &hbone, &["windows", "--connections", "8", "--then-sa", "sa-y"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(held.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    let v: Value = serde_json::from_str(&line).unwrap_or_else(|_| panic!("{line}"));
    let windows = v["windows"].as_array().unwrap();
    // Each connection gets an eighth of what the peer's 8 MiB has left, down to HTTP/2's
    // 64 KiB floor; the seventh and eighth are over the peer's six.
    let granted: Vec<u64> = windows[..6].iter().map(|w| w.as_u64().unwrap_or_else(|| panic!("{v}"))).collect();
    assert_eq!(granted[0], 1 << 20, "{v}");
    assert!(granted.windows(2).all(|w| w[1] < w[0]), "{v}");
    assert!(granted.iter().sum::<u64>() <= 8 << 20, "{v}");
    assert_eq!(windows[6], "refused", "{v}");
    assert_eq!(windows[7], "refused", "{v}");
    // Another identity from the same address is another peer: a full share.
    assert_eq!(v["other"], 1 << 20, "{v}");
    // And a's agent, a peer of its own, gets through while this one is held.
    assert_eq!(echo_ok(t, m.a, &m.dst(APP_PORT))["ok"], true);
    assert!(hits(&agent2, "connections_per_peer") >= 2);
    drop(held.stdin.take());
    held.wait().unwrap();

    // Streams count across the peer's connections: five open, the rest refused unprocessed.
    // (Another identity: the connections above may still be on their way out.)
    let r = attack(t, m.n2, &hbone, &["streams", "--target", &m.dst(APP_PORT), "--count", "8", "--sa", "sa-z"]);
    assert_eq!(r["opened"], 5, "{r}");
    assert_eq!(r["refused"], 3, "{r}");
    assert!(hits(&agent2, "streams_per_peer") >= 3);
}

#[test]
fn http2_floods_leave_the_agent_up_its_memory_bounded_and_other_connections_working() {
    let (m, _ctl, server, _agent1, agent2) = mesh_with("h2flood", &[]);
    let t = &m.t;
    let hbone = format!("{}:15008", t.pod(m.b).ip);
    let app = m.dst(APP_PORT);
    let pid = agent2.pid().unwrap();
    assert_eq!(echo_ok(t, m.a, &app)["ok"], true);
    let before = rss_kib(pid);
    for a in ["rapid-reset", "continuation", "settings", "ping", "streams", "garbage-after-preface", "bad-preface"] {
        let accepted = server.accepted().unwrap().len();
        // Meshed connections from a while the attack runs (at least one, started with it),
        // and one after it.
        let (r, echoes) = std::thread::scope(|s| {
            let attacker =
                s.spawn(|| attack(t, m.n2, &hbone, &["h2", "--attack", a, "--target", &app, "--count", "10000"]));
            let mut echoes = 0;
            loop {
                let e = echo_ok(t, m.a, &app);
                assert_eq!(e["ok"], true, "a meshed connection failed during {a}: {e}");
                echoes += 1;
                if attacker.is_finished() {
                    break;
                }
            }
            (attacker.join().unwrap(), echoes)
        });
        assert!(r.get("error").is_none(), "{a}: {r}");
        eprintln!("{a}: {r} (agent RSS {} KiB, {echoes} meshed connections during it)", rss_kib(pid));
        assert!(std::fs::metadata(format!("/proc/{pid}")).is_ok(), "the agent died under {a}");
        let e = echo_ok(t, m.a, &app);
        assert_eq!(e["ok"], true, "a meshed connection failed after {a}: {e} ({r})");
        match a {
            // The connection is ended by the agent (GOAWAY, ENHANCE_YOUR_CALM or a protocol
            // error), long before the attack's 10,000 frames are through.
            "rapid-reset" | "continuation" => {
                assert_ne!(r["ended"], "open", "{a}: {r}");
                assert_eq!(r["goaway"], 11, "{a}: ENHANCE_YOUR_CALM expected: {r}");
            }
            "garbage-after-preface" => {
                assert_ne!(r["ended"], "open", "{a}: {r}");
                assert!(r["goaway"].is_u64(), "{a}: {r}");
            }
            // Not HTTP/2 at all: closed (the library sends no GOAWAY before a preface).
            "bad-preface" => assert_ne!(r["ended"], "open", "{a}: {r}"),
            // 10,000 streams: the agent holds at most 1,024 at once on a connection.
            // Answered (PING and SETTINGS acknowledgements) and absorbed.
            "ping" => assert_eq!(r["pings_acked"], 10000, "{a}: {r}"),
            "streams" => {
                let reached = server.accepted().unwrap().len() - accepted - echoes - 1;
                assert!(reached <= 1024, "{a}: {reached} streams reached the app at once (1,024 allowed)");
                assert_eq!(r["goaway"], 11, "{a}: ENHANCE_YOUR_CALM expected: {r}");
            }
            _ => {}
        }
    }
    // The memory bound (docs/security.md): what the floods leave is small next to the
    // windows they could have filled.
    let after = rss_kib(pid);
    eprintln!("agent RSS before the floods {before} KiB, after {after} KiB");
    assert!(after < before + 64 * 1024, "RSS grew from {before} KiB to {after} KiB");
    // A header list at the limit is served; over it, refused with 431.
    let out = t
        .node_command(m.n2, bin("sm-hbone"))
        .unwrap()
        .args(["--to", &hbone, "--expect", B_ID])
        .args(["--case", &format!("at=CONNECT,{app},16000"), "--case", &format!("over=CONNECT,{app},16500")])
        .arg("--root-dir")
        .arg(t.controller_dir())
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(out.stdout.trim_ascii()).unwrap();
    assert_eq!(v["cases"]["at"]["status"], 200, "{v}");
    assert_eq!(v["cases"]["over"]["status"], 431, "{v}");
}

#[test]
fn a_flood_of_plaintext_connections_is_refused_before_the_agent_runs_out_of_descriptors() {
    let (m, _ctl, server, _agent1, agent2) = mesh_with("fds", &["--max-plaintext-per-source", "100000"]);
    let t = &m.t;
    let app = m.dst(APP_PORT);
    // A connection established before the flood, halfway through its transfer.
    let halfway = t.dir.join("fds-halfway");
    let established = t
        .spawn_pod_app(
            m.a,
            &[
                "echo",
                "--to",
                &app,
                "--bytes",
                "200000",
                "--halfway-until-file",
                halfway.to_str().unwrap(),
                "--timeout-ms",
                "60000",
            ],
        )
        .unwrap();
    wait_for(Duration::from_secs(20), || Ok(server.accepted()?.len() == 1)).unwrap();
    // The agent's descriptors, lowered while it runs: 1,024, of which 256 are kept back.
    let pid = agent2.pid().unwrap().to_string();
    run(Command::new("prlimit").args(["--pid", &pid, "--nofile=1024:1024"])).unwrap();
    // Plaintext connections from the node to b's app, each costing the agent two descriptors.
    // The app is too busy to accept meanwhile: the agent's dials to it wait in connect(), each
    // holding a descriptor, so a dial must be refused before it waits, not after.
    server.pause();
    let flood = attack(t, m.n2, &app, &["idle", "--count", "2000", "--wait-ms", "3000"]);
    server.resume();
    assert!(hits(&agent2, "descriptors") > 0, "{flood} {:?}", agent2.stats().unwrap().limits);
    no_accept_failures(&agent2);
    // The established connection finishes its transfer.
    std::fs::write(&halfway, "").unwrap();
    let r = established.result().unwrap();
    assert_eq!(r["ok"], true, "the established connection broke during the flood: {r}");
    // Once the flood is gone, new connections are taken again.
    wait_for(Duration::from_secs(30), || Ok(echo_ok(t, m.a, &app)["ok"] == true)).unwrap();
}

#[test]
fn a_stalled_destination_agent_fails_its_connections_at_their_deadline_and_blocks_no_other() {
    let mut t = Topology::new("stall").unwrap();
    let (n1, n2, n3) = (t.add_node("n1").unwrap(), t.add_node("n2").unwrap(), t.add_node("n3").unwrap());
    let a = t.add_pod(n1, "a", true).unwrap();
    let b = t.add_pod(n2, "b", true).unwrap();
    let c = t.add_pod(n3, "c", true).unwrap();
    t.write_workloads().unwrap();
    let _ctl = t.start_controller(&[]).unwrap();
    let _sb = t.start_server(b, APP_PORT).unwrap();
    let _sc = t.start_server(c, APP_PORT).unwrap();
    let _agent1 = t.start_agent(n1, &[]).unwrap();
    let agent2 = t.start_agent(n2, &[]).unwrap();
    let _agent3 = t.start_agent(n3, &[]).unwrap();
    for n in [n1, n2, n3] {
        t.wait_ready(n).unwrap();
    }
    let (to_b, to_c) = (t.addr(b, APP_PORT), t.addr(c, APP_PORT));
    // No connection to b is pooled yet: the first of them makes one, and the TLS handshake
    // with the stopped agent hangs until its own timeout.
    agent2.pause();
    // Six new connections to the stopped destination at once (the agent's connect timeout is
    // 2 s; a TLS handshake may take 10 s).
    let stalled: Vec<_> = (0..6)
        .map(|_| t.spawn_pod_app(a, &["echo", "--to", &to_b, "--bytes", "1000", "--timeout-ms", "120000"]).unwrap())
        .collect();
    // Another destination is not held up behind them.
    let r = echo_ok(&t, a, &to_c);
    assert_eq!(r["ok"], true, "{r}");
    let failed: Vec<Value> = stalled.into_iter().map(|s| s.result().unwrap()).collect();
    assert!(failed.iter().all(|r| r["ok"] == false), "{failed:?}");
    // Each failed at its own deadline: one makes the connection and waits out the TLS
    // handshake (10 s); the others wait for it only until their connect timeout (2 s), where
    // one after another they would take 10, 20, 30 s...
    let early = failed.iter().filter(|r| r["ms"].as_u64().unwrap() < 9000).count();
    assert!(early >= 5, "the connections to the stalled destination queued behind each other: {failed:?}");
    agent2.resume();
}
