//! Several controller replicas (local mode), on the real kernel with the real binaries: agents
//! use one, move to another when it goes away, keep their state meanwhile, and keep getting
//! certificates and configuration changes.
#![cfg(feature = "privileged")]

use std::time::Duration;

use serde_json::Value;
use tests::*;

const APP_PORT: u16 = 8080;
const SECOND_PORT: u16 = CONTROLLER_PORT + 1;

fn deny_from_a() -> &'static str {
    "apiVersion: security.sockmesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: deny-a, namespace: default}\nspec:\n  selector: {matchLabels: {app: b}}\n  action: DENY\n  rules:\n  - from:\n    - source: {principals: [\"cluster.local/ns/default/sa/sa-a\"]}\n"
}

fn echo_ok(t: &Topology, p: PodId, to: &str) -> bool {
    t.pod_app(p, &["echo", "--to", to, "--bytes", "2000", "--timeout-ms", "1000"]).unwrap()["ok"] == true
}

fn lines_with(agent: &Agent, message: &str) -> Vec<Value> {
    agent.log_lines().into_iter().filter(|l| l["message"] == message).collect()
}

/// Two replicas sharing one CA: the agents start on the first; with it killed they move to the
/// second, which renews their (short-lived) certificates and pushes a DENY written meanwhile;
/// with the first back and the second killed, they move back and the DENY's removal arrives.
#[test]
fn agents_move_to_another_controller_replica_and_keep_certificates_and_configuration_coming() {
    let Mesh { mut t, n1, n2, a, b } = Topology::two_node_mesh("replicas").unwrap();
    let mut first = t.start_controller(&[]).unwrap();
    let dir = t.controller_dir();
    let second_dir = dir.with_file_name("controller-replica-2");
    let ca: Vec<String> = ["root.pem", "root-key.pem"].iter().map(|f| dir.join(f).display().to_string()).collect();
    let replica_args =
        ["--ca-cert", &ca[0], "--ca-key", &ca[1], "--metrics-addr", "0.0.0.0:15114", "--admin-addr", "127.0.0.1:15115"];
    let mut second = t.start_controller_replica(SECOND_PORT, &second_dir, &replica_args).unwrap();
    let _server = t.start_server(b, APP_PORT).unwrap();
    // Certificates that live 8 s: renewed every few seconds, so renewals show who serves.
    let both = format!("https://{CONTROLLER_IP}:{CONTROLLER_PORT},https://{CONTROLLER_IP}:{SECOND_PORT}");
    let flags = ["--controller", &both, "--cert-ttl-seconds", "8"];
    let agent1 = t.start_agent(n1, &flags).unwrap();
    let agent2 = t.start_agent(n2, &flags).unwrap();
    t.wait_ready(n1).unwrap();
    t.wait_ready(n2).unwrap();
    let to = t.addr(b, APP_PORT);
    assert!(echo_ok(&t, a, &to));
    let issued = |a: &Agent| lines_with(a, "certificate issued").len();
    let moved = |a: &Agent| lines_with(a, "controller replica unavailable; moving to the next").len();
    assert_eq!((moved(&agent1), moved(&agent2)), (0, 0), "the agents started on the first replica");

    first.stop();
    let before = (issued(&agent1), issued(&agent2));
    wait_for(Duration::from_secs(60), || Ok(issued(&agent1) >= before.0 + 2 && issued(&agent2) >= before.1 + 2))
        .expect("certificates stopped being issued with one replica gone");
    assert!(moved(&agent1) >= 1 && moved(&agent2) >= 1, "the agents never moved to the second replica");
    // Their state was kept meanwhile, and a change made now reaches them through the second.
    assert!(echo_ok(&t, a, &to));
    t.write_config("deny-a.yaml", deny_from_a()).unwrap();
    time_until(Duration::from_secs(30), || !echo_ok(&t, a, &to))
        .expect("the DENY never arrived through the second replica");

    // The first back, the second gone: back they go.
    let _first = t.start_controller(&[]).unwrap();
    second.stop();
    t.remove_config("deny-a.yaml").unwrap();
    time_until(Duration::from_secs(30), || echo_ok(&t, a, &to))
        .expect("the DENY's removal never arrived through the first replica");
    let before = (issued(&agent1), issued(&agent2));
    wait_for(Duration::from_secs(60), || Ok(issued(&agent1) > before.0 && issued(&agent2) > before.1))
        .expect("certificates stopped being issued after moving back");
}
