//! Interception on the real kernel: eBPF programs, real agents, real sockets.
#![cfg(feature = "privileged")]

use std::time::Duration;

use serde_json::Value;
use tests::*;

const APP_PORT: u16 = 8080;
const MIB: u64 = 1024 * 1024;

/// Two nodes; a meshed on n1; b meshed on n2 with an echo server.
fn two_nodes(name: &str) -> (Topology, NodeId, NodeId, PodId, PodId) {
    let mut t = Topology::new(name).unwrap();
    let n1 = t.add_node("n1").unwrap();
    let n2 = t.add_node("n2").unwrap();
    let a = t.add_pod(n1, "a", true).unwrap();
    let b = t.add_pod(n2, "b", true).unwrap();
    (t, n1, n2, a, b)
}

fn dst(t: &Topology, p: PodId) -> String {
    format!("{}:{APP_PORT}", t.pod(p).ip)
}

fn outbound_lines(agent: &Agent) -> Vec<Value> {
    agent.access_log().into_iter().filter(|l| l["direction"] == "outbound").collect()
}

#[test]
fn cross_node_bytes_arrive_intact_and_the_source_agent_records_them() {
    let (mut t, n1, n2, a, b) = two_nodes("cross");
    t.write_workloads().unwrap();
    let server = t.start_server(b, APP_PORT).unwrap();
    let agent1 = t.start_agent(n1, &[]).unwrap();
    let agent2 = t.start_agent(n2, &[]).unwrap();

    let r = t.pod_app(a, &["echo", "--to", &dst(&t, b), "--bytes", &(10 * MIB).to_string(), "--seed", "7"]).unwrap();
    assert_eq!(r["ok"], true, "transfer failed: {r}");
    assert_eq!(r["received"], 10 * MIB);
    // The kernel connected the app to the agent's outbound listener, not to b.
    assert_eq!(r["peer"], "127.0.0.1:15001", "{r}");

    wait_for(Duration::from_secs(5), || Ok(!outbound_lines(&agent1).is_empty())).unwrap();
    let line = &outbound_lines(&agent1)[0];
    assert_eq!(line["src_workload"], "default/a", "{line}");
    assert_eq!(line["src_principal"], "ns/default/sa/sa-a", "{line}");
    assert_eq!(line["orig_dst"], dst(&t, b), "{line}");
    assert_eq!(line["dst_workload"], "default/b", "{line}");
    assert_eq!(line["bytes_sent"], 10 * MIB, "{line}");
    assert_eq!(line["bytes_received"], 10 * MIB, "{line}");

    // On n2 the connection was captured on its way in and handed to the app by the agent.
    wait_for(Duration::from_secs(5), || Ok(agent2.access_log().iter().any(|l| l["direction"] == "inbound"))).unwrap();
    let accepted = server.accepted().unwrap();
    assert_eq!(accepted.len(), 1, "{accepted:?}");
    assert!(accepted[0]["peer"].as_str().unwrap().starts_with(&format!("{}:", t.pod(b).ip)), "{accepted:?}");
}
