//! `cargo xtask demo`: a local mesh in network namespaces with real traffic, narrated.

use std::io::Write;
use std::time::Duration;

use anyhow::{Context, Result};
use tests::*;

fn say(step: &str) {
    println!("\n\x1b[1;36m── {step}\x1b[0m");
    let _ = std::io::stdout().flush();
}

fn show_access(agent: &Agent, node: &str) {
    for l in agent.access_log() {
        println!(
            "  [{node}] {} {} -> {} ({}) sent={}B received={}B {}ms result={}",
            l["direction"].as_str().unwrap_or("?"),
            l["src_workload"].as_str().filter(|s| *s != "-").or(l["src_addr"].as_str()).unwrap_or("?"),
            l["orig_dst"].as_str().unwrap_or("?"),
            l["dst_workload"].as_str().unwrap_or("-"),
            l["bytes_sent"],
            l["bytes_received"],
            l["duration_ms"],
            l["result"].as_str().unwrap_or("?"),
        );
    }
}

fn meshctl(t: &Topology, n: NodeId, args: &[&str]) -> Result<String> {
    let out = t.node_command(n, bin("meshctl"))?.args(args).output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    Ok(text.lines().map(|l| format!("  {l}")).collect::<Vec<_>>().join("\n"))
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let keep = args.iter().any(|a| a == "--keep");
    if let Some(i) = args.iter().position(|a| a == "--zones") {
        match args.get(i + 1).map(String::as_str) {
            Some("2") if !keep => return zones_demo(),
            Some("2") => anyhow::bail!("--keep is not offered with --zones: the two-zone demo cleans up after itself"),
            other => anyhow::bail!("--zones {}: the demo has two zones (--zones 2)", other.unwrap_or("")),
        }
    }
    say("building a two-node topology (network namespaces, a cgroup per pod)");
    let mut t = Topology::new("demo")?;
    let n1 = t.add_node("n1")?;
    let n2 = t.add_node("n2")?;
    let a = t.add_pod(n1, "a", true)?;
    let c = t.add_pod(n1, "c", false)?;
    let b = t.add_pod(n2, "b", true)?;
    // A second replica of b's app on n1, for the Service step.
    let b2 = t.add_pod(n1, "b2", true)?;
    for p in [b, b2] {
        t.pods[p.0].labels.push(("tier".into(), "web".into()));
    }
    // For the meshes step: pay-1 (n1) and pay-2 (n2) of namespace pay, shop-2 (n2) of shop.
    let pay1 = t.add_pod(n1, "pay-1", true)?;
    let pay2 = t.add_pod(n2, "pay-2", true)?;
    let shop2 = t.add_pod(n2, "shop-2", true)?;
    t.pods[pay1.0].namespace = "pay".into();
    t.pods[pay2.0].namespace = "pay".into();
    t.pods[shop2.0].namespace = "shop".into();
    t.write_workloads()?;
    say("starting the controller (the CA) on the fabric");
    let controller = t.start_controller(&[])?;
    println!("  root CA and trust bundle in {}", t.controller_dir().display());
    for p in [a, c, b, b2, pay1, pay2, shop2] {
        let pod = t.pod(p);
        println!(
            "  pod {:<6} of {:<7} on {}  ip {:<11} meshed={}",
            pod.name,
            pod.namespace,
            t.node(pod.node).name,
            pod.ip,
            pod.meshed
        );
    }
    let server = t.start_server(b, 8080)?;
    let server2 = t.start_server(b2, 8080)?;
    let _pay_server = t.start_server(pay2, 8080)?;
    let shop_server = t.start_server(shop2, 8080)?;
    println!("  echo servers listening in pods b, b2, pay-2 and shop-2 on :8080");

    say("starting one agent per node");
    let mut agent1 = t.start_agent(n1, &[])?;
    let agent2 = t.start_agent(n2, &[])?;
    println!("  programs attached to n1's cgroup root: {}", cgroup_programs(&t.node(n1).cgroup)?.join(", "));
    println!("  pinned links: {:?}", pinned_link_ids(&t.node(n1).bpffs)?.keys().collect::<Vec<_>>());

    let to = format!("{}:8080", t.pod(b).ip);
    say("waiting for the workloads' certificates (each agent asks the CA for its pods' identities)");
    wait_for(Duration::from_secs(15), || {
        Ok(http_get(&t.node(n1).netns, "127.0.0.1:15021", "/healthz/ready")?.0 == 200)
    })?;
    wait_for(Duration::from_secs(15), || {
        Ok(http_get(&t.node(n2).netns, "127.0.0.1:15021", "/healthz/ready")?.0 == 200)
    })?;
    println!("{}", meshctl(&t, n1, &["certs"])?);

    say(&format!("pod a (meshed) sends 8 MiB to b at {to} while tcpdump watches the wire between the nodes"));
    let marker = "HELLO-FROM-POD-A-IN-PLAINTEXT";
    let mut cap = Capture::start(&t.fabric, "br0", t.dir.join("wire.pcap"))?;
    let r = t.pod_app(a, &["echo", "--to", &to, "--bytes", &(8 << 20).to_string(), "--marker", marker])?;
    cap.stop();
    println!(
        "  result: ok={} received={}B checksum_match={} in {}ms",
        r["ok"], r["received"], r["checksum_match"], r["ms"]
    );
    println!("  the kernel connected a's socket to {} (the agent's listener in a's netns), not to b;", r["wire_peer"]);
    println!("  a's app sees its ends as they would be without the mesh: {} -> {}", r["local"], r["peer"]);
    let leaked = cap.bytes()?.windows(marker.len()).any(|w| w == marker.as_bytes());
    println!("  on the wire: {} packets on 15008 (HBONE: HTTP/2 CONNECT in TLS 1.3),", cap.count("tcp port 15008")?);
    println!(
        "               {} packets of anything else (besides the control plane's TLS on 15012),",
        cap.count("tcp and not port 15008 and not port 15012")?
    );
    println!(
        "               and the marker {marker:?} {}",
        if leaked { "WAS SEEN IN PLAINTEXT" } else { "never appeared" }
    );
    std::thread::sleep(Duration::from_millis(300));

    say("the access log: one line per connection, at close, on both ends");
    show_access(&agent1, "n1");
    show_access(&agent2, "n2");
    if let Some(l) = agent2.access_log().last() {
        println!("  as JSON: {l}");
    }
    println!(
        "  b's app saw its peer as {} (a's own address: n2's agent dialled it from there)",
        server.accepted()?[0]["peer"]
    );

    say("metrics on n2's agent (:15020/metrics, with Istio's TCP labels)");
    let (_, metrics) = http_get(&t.node(n2).netns, "127.0.0.1:15020", "/metrics")?;
    for l in metrics.lines().filter(|l| l.starts_with("istio_tcp_")) {
        println!("  {l}");
    }

    say("meshctl on n1");
    println!("  $ meshctl workloads\n{}", meshctl(&t, n1, &["workloads"])?);
    println!("  $ meshctl check\n{}", meshctl(&t, n1, &["check"])?);

    say("pod c (not meshed) connects to b: untouched on n1, captured on its way into b");
    let r = t.pod_app(c, &["echo", "--to", &to, "--bytes", "4096"])?;
    println!("  result: ok={} peer={} (c's socket went straight out)", r["ok"], r["wire_peer"]);
    std::thread::sleep(Duration::from_millis(300));
    println!("  n1 agent outbound connections so far: {}", agent1.stats()?.outbound.accepted);
    show_access(&agent2, "n2");

    say("fail closed: stop n1's agent, and a's connections fail instead of leaving in plaintext");
    agent1.stop()?;
    let r = t.pod_app(a, &["echo", "--to", &to, "--bytes", "1000", "--timeout-ms", "1000"])?;
    println!("  with the agent stopped: ok={} error={}", r["ok"], r["error"]);
    println!("  programs still attached: {}", cgroup_programs(&t.node(n1).cgroup)?.join(", "));
    let agent1 = t.start_agent(n1, &[])?;
    let r = t.pod_app(a, &["echo", "--to", &to, "--bytes", "1000"])?;
    println!("  agent restarted (it took over the pinned programs): ok={} connected to {}", r["ok"], r["wire_peer"]);

    say("policy: a DENY written to the controller's config directory, enforced at b without restarts");
    let deny = "apiVersion: security.sockmesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: deny-a, namespace: default}\nspec:\n  selector: {matchLabels: {app: b}}\n  action: DENY\n  rules:\n  - from:\n    - source: {principals: [\"cluster.local/ns/default/sa/sa-a\"]}\n";
    println!("{}", deny.lines().map(|l| format!("  | {l}")).collect::<Vec<_>>().join("\n"));
    t.write_config("deny-a.yaml", deny)?;
    let t0 = std::time::Instant::now();
    wait_for(Duration::from_secs(5), || {
        Ok(t.pod_app(a, &["echo", "--to", &to, "--bytes", "1000", "--timeout-ms", "1000"])?["ok"] == false)
    })?;
    println!("  a -> b refused {}ms after the file was written", t0.elapsed().as_millis());
    std::thread::sleep(Duration::from_millis(200));
    if let Some(l) = agent2.access_log().into_iter().rfind(|l| l["decision"] == "deny") {
        println!(
            "  n2 access log: decision={} result={} src_principal={} ({})",
            l["decision"], l["result"], l["src_principal"], l["error"]
        );
    }
    let (_, m) = http_get(&t.node(n2).netns, "127.0.0.1:15020", "/metrics")?;
    for l in m.lines().filter(|l| l.starts_with("sockmesh_connections_refused_total")) {
        println!("  {l}");
    }
    println!("  $ meshctl policies (on n2)\n{}", meshctl(&t, n2, &["policies"])?);
    t.remove_config("deny-a.yaml")?;
    wait_for(Duration::from_secs(5), || Ok(t.pod_app(a, &["echo", "--to", &to, "--bytes", "1000"])?["ok"] == true))?;
    println!("  policy removed: a -> b works again");

    say("a Service: web at 10.96.0.10:80, endpoints b (n2) and b2 (n1), port 80 -> 8080");
    let svc = "kind: Service\nname: web\nnamespace: default\naddresses: [10.96.0.10]\nports: [{port: 80, targetPort: 8080}]\nselector: {tier: web}\n";
    println!("{}", svc.lines().map(|l| format!("  | {l}")).collect::<Vec<_>>().join("\n"));
    t.write_config("web.yaml", svc)?;
    wait_for(Duration::from_secs(10), || {
        Ok(http_get(&t.node(n1).netns, "127.0.0.1:15000", "/services")?.1.contains("10.96.0.10"))
    })?;
    let (b_before, b2_before) = (server.accepted()?.len(), server2.accepted()?.len());
    let r = t.pod_app(a, &["echoes", "--to", "10.96.0.10:80", "--count", "20", "--bytes", "1000"])?;
    println!("  a made 20 connections to 10.96.0.10:80: {} succeeded, {} failed", r["succeeded"], r["failed"]);
    println!(
        "  b served {}, b2 served {} (the agent picks the less busy of two endpoints drawn at random)",
        server.accepted()?.len() - b_before,
        server2.accepted()?.len() - b2_before
    );
    println!("  to b: mutual TLS requiring b's identity; to b2 (same node as a): the node-local relay");
    println!("  $ meshctl services (on n1)\n{}", meshctl(&t, n1, &["services"])?);

    say("several meshes on the same nodes: payments (namespace pay) and shop (namespace shop)");
    let meshes = "apiVersion: security.sockmesh.io/v1alpha1\nkind: Mesh\nmetadata: {name: payments}\nspec: {trustDomain: payments.example}\n---\napiVersion: security.sockmesh.io/v1alpha1\nkind: Mesh\nmetadata: {name: shop}\nspec: {trustDomain: shop.example}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: pay, labels: {sockmesh.io/mesh: payments}}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {sockmesh.io/mesh: shop}}\n";
    println!("{}", meshes.lines().map(|l| format!("  | {l}")).collect::<Vec<_>>().join("\n"));
    t.write_config("meshes.yaml", meshes)?;
    wait_for(Duration::from_secs(15), || {
        Ok(http_get(&t.node(n2).netns, "127.0.0.1:15000", "/certificates")?.1.contains("spiffe://shop.example/"))
    })?;
    println!("  each mesh got its own root CA (in {}/meshes/); the pods' certificates were re-issued in their mesh's trust domain without a restart", t.controller_dir().display());
    println!("  $ meshctl meshes (on n2)\n{}", meshctl(&t, n2, &["meshes"])?);
    println!("  $ meshctl certs (on n2)\n{}", meshctl(&t, n2, &["certs"])?);
    let pay_to = format!("{}:8080", t.pod(pay2).ip);
    let shop_to = format!("{}:8080", t.pod(shop2).ip);
    let r = t.pod_app(pay1, &["echo", "--to", &pay_to, "--bytes", "1000"])?;
    println!("  pay-1 -> pay-2 (same mesh, across nodes): ok={}", r["ok"]);
    let shop_before = shop_server.accepted()?.len();
    let r = t.pod_app(pay1, &["echo", "--to", &shop_to, "--bytes", "1000", "--timeout-ms", "1000"])?;
    println!(
        "  pay-1 -> shop-2 (another mesh): ok={}; shop-2's app saw {} connection(s)",
        r["ok"],
        shop_server.accepted()?.len() - shop_before
    );
    std::thread::sleep(Duration::from_millis(200));
    for (name, n) in [("n1", n1), ("n2", n2)] {
        let (_, m) = http_get(&t.node(n).netns, "127.0.0.1:15020", "/metrics")?;
        for l in m.lines().filter(|l| l.starts_with("sockmesh_handshake_failures_total") && l.contains("other_mesh")) {
            println!("  [{name}] {l}");
        }
    }

    say("what the agents counted (local API: {\"op\":\"stats\"})");
    for (name, ag) in [("n1", &agent1), ("n2", &agent2)] {
        let s = ag.stats()?;
        let kv = |m: &std::collections::BTreeMap<String, u64>| {
            m.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")
        };
        println!("  {name}: kernel: {}", kv(&s.kernel));
        println!(
            "  {name}: accepted outbound={} inbound={}; refused outbound: {{{}}} inbound: {{{}}}",
            s.outbound.accepted,
            s.inbound.accepted,
            kv(&s.outbound.refused),
            kv(&s.inbound.refused)
        );
    }

    if keep {
        say("--keep: the mesh stays up");
        let script = t.dir.join("cleanup.sh");
        let mut sh = String::from("#!/bin/sh\n# Stops the demo mesh and removes everything it created.\n");
        for pid in [agent1.pid(), agent2.pid(), controller.pid()].into_iter().flatten() {
            sh.push_str(&format!("kill {pid} 2>/dev/null\n"));
        }
        sh.push_str(&format!(
            "for p in $(cat {0}/*/cgroup.procs {0}/*/*/cgroup.procs 2>/dev/null); do kill $p; done\nsleep 0.5\n",
            t.cgroup_root.display()
        ));
        for ns in t
            .pods
            .iter()
            .map(|p| p.netns.clone())
            .chain(t.nodes.iter().map(|n| n.netns.clone()))
            .chain([t.fabric.clone()])
        {
            sh.push_str(&format!("ip netns del {ns} 2>/dev/null\n"));
        }
        sh.push_str(&format!("rm -rf {}\n", t.bpffs_root.display()));
        sh.push_str(&format!("find {} -depth -type d -exec rmdir {{}} \\; 2>/dev/null\n", t.cgroup_root.display()));
        sh.push_str(&format!("rm -rf {}\n", t.dir.display()));
        std::fs::write(&script, sh).context("writing cleanup script")?;
        // meshctl runs on the node (its admin API is the node's loopback); `meshctl exec` puts
        // the command in pod a's netns *and* cgroup, so its connection is captured and meshed.
        let on_n1 = format!("nsenter --net=/run/netns/{} {}", t.node(n1).netns, bin("meshctl").display());
        println!("  try:  {on_n1} exec default/a -- {} echo --to {to} --bytes 1000", bin("sm-testapp").display());
        println!("        (prints \"peer\":\"127.0.0.1:15001\": the kernel handed the connection to the agent)");
        println!("        {on_n1} connections");
        println!("        {on_n1} status");
        println!("        echo '{{\"op\":\"stats\"}}' | socat - UNIX-CONNECT:{}", agent1.api.display());
        println!("        tail -f {}", agent1.log.display());
        println!("  clean up with: sh {}", script.display());
        std::mem::forget(agent1);
        std::mem::forget(agent2);
        std::mem::forget(controller);
        std::mem::forget(t);
        return Ok(());
    }
    say("cleaning up (pass --keep to leave the mesh running)");
    drop(agent1);
    drop(agent2);
    drop(controller);
    drop(t);
    println!("  done: namespaces, cgroups and pins removed");
    Ok(())
}

/// `cargo xtask demo --zones 2`: one mesh across two clusters through east-west gateways.
fn zones_demo() -> Result<()> {
    use tests::zones::*;
    say("two zones, east and west: each its own fabric, controller and agents, the same pod addresses in both");
    println!("  their pod networks never route to each other; they meet only on an inter-zone link (10.250.0.0/24)");
    println!("  one root CA, an intermediate per zone (mesh-controller ca init / ca intermediate)");
    let (east, mut west) = two_zones("demo-zones")?;
    for z in [&east, &west] {
        println!(
            "  zone {:<4}: controller {}:15012 (zone sync: edge {}:15013), gateway {}:15008, pods client {} web {} hidden {}",
            z.name,
            CONTROLLER_IP,
            z.edge,
            z.edge,
            z.t.pod(CLIENT).ip,
            z.t.pod(WEB).ip,
            z.t.pod(HIDDEN).ip
        );
    }

    say("west exports web (export: true); hidden stays private");
    west.t.write_config("web.yaml", &service("web", "web", "10.96.0.10", true))?;
    west.t.write_config("hidden.yaml", &service("hidden", "hidden", "10.96.0.11", false))?;
    let (vip, took) = east.wait_import("web", 1)?;
    println!(
        "  east's controller learned it from west's ({took:?}) and gave it {vip}: web.default.svc.clusterset.local"
    );
    println!("  hidden imported in east: {}", east.import("hidden").is_some());

    say(&format!("east's client sends 4 MiB to {vip}:80 while tcpdump watches the inter-zone link"));
    let mut cap = Capture::start(&east.t.fabric, "iz", east.t.dir.join("iz.pcap"))?;
    let to = format!("{vip}:80");
    let marker = "SOCKMESH-DEMO-ZONES";
    let r = east.t.pod_app(CLIENT, &["echo", "--to", &to, "--bytes", &(4 << 20).to_string(), "--seed", "3"])?;
    println!("  ok={} received={} bytes", r["ok"], r["received"]);
    let m = east.echoes(&to, 5, &["--marker", marker])?;
    cap.stop();
    let pcap = cap.bytes()?;
    println!(
        "  the link carried {} packets to gateway port 15008; the marker {marker:?} in clear: {}",
        cap.count("tcp port 15008")?,
        pcap.windows(marker.len()).any(|w| w == marker.as_bytes())
    );
    println!("  marker echoes ok={}", m["ok"]);
    for l in east.agents[0].access_log().iter().take(1) {
        println!(
            "  [east n1] {} {} -> {} ({}) {}",
            l["direction"], l["src_principal"], l["orig_dst"], l["dst_principal"], l["connection_security_policy"]
        );
    }
    if let Some(l) = west.gateway.as_ref().and_then(|g| g.log_lines().into_iter().find(|l| l["message"] == "forwarded"))
    {
        println!(
            "  [west gateway] forwarded to {} for {} ({} bytes in, {} out): bytes it cannot read",
            l["endpoint"], l["client"], l["bytes_in"], l["bytes_out"]
        );
    }
    for l in west.agents[1].access_log().iter().take(1) {
        println!(
            "  [west n2] {} from {} to {} result={}",
            l["direction"], l["src_principal"], l["dst_principal"], l["result"]
        );
    }
    let (_, certs) = http_get(&west.t.fabric, "127.0.0.1:15021", "/certs")?;
    println!("  identities west's gateway holds: {certs}");

    say("west denies east's client; west's agent enforces it with the client's own identity");
    west.t.write_config("deny.yaml", "apiVersion: security.sockmesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: deny-east-client, namespace: default}\nspec:\n  selector: {matchLabels: {app: web}}\n  action: DENY\n  rules:\n  - from:\n    - source: {principals: [\"cluster.local/ns/default/sa/sa-client\"]}\n")?;
    let refused = time_until(Duration::from_secs(30), || east.echoes(&to, 1, &[]).is_ok_and(|r| r["failed"] == 1));
    println!("  refused after {refused:?}");
    if let Some(l) = west.agents[1].access_log().into_iter().rfind(|l| l["result"] == "deny_policy") {
        println!("  [west n2] {} from {} result={}", l["direction"], l["src_principal"], l["result"]);
    }
    std::fs::remove_file(west.t.config_dir().join("deny.yaml"))?;
    let allowed = time_until(Duration::from_secs(30), || east.echoes(&to, 1, &[]).is_ok_and(|r| r["ok"] == true));
    println!("  the DENY removed: allowed again after {allowed:?}");

    say("east exports web too: one import, both zones' endpoints; then west's gateway dies");
    east.t.write_config("web.yaml", &service("web", "web", "10.96.0.10", true))?;
    let (vip, _) = east.wait_import("web", 2)?;
    let to = format!("{vip}:80");
    let r = east.echoes(&to, 20, &[])?;
    println!(
        "  20 connections: ok={} (east's web served {}, west's {})",
        r["ok"],
        east.servers[0].accepted()?.len(),
        west.servers[0].accepted()?.len()
    );
    if let Some(g) = west.gateway.as_mut() {
        g.kill();
    }
    let r = east.echoes(&to, 20, &[])?;
    println!(
        "  west's gateway killed; 20 more: ok={} (east's web served {} in all)",
        r["ok"],
        east.servers[0].accepted()?.len()
    );

    say("the zone sync on east's controller's metrics (:15014)");
    let (_, m) = http_get(&east.t.fabric, &format!("{CONTROLLER_IP}:15014"), "/metrics")?;
    for l in m.lines().filter(|l| l.starts_with("sockmesh_zone_")) {
        println!("  {l}");
    }
    say("cleaning up");
    drop((east, west));
    println!("  done: namespaces, cgroups and pins removed");
    Ok(())
}
