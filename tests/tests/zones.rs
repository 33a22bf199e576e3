//! Zones: one mesh across two clusters whose pod networks do not route to each other — here
//! they even overlap, both zones numbering their nodes and pods alike. Each zone is a fabric of
//! its own with its own controller (an intermediate CA under one shared root). The two fabrics
//! meet only on an inter-zone link, 10.250.0.0/24, where each zone's edge (its fabric netns)
//! masquerades what leaves it and forwards its controller's port, as a cloud NAT and load
//! balancer would; each zone's east-west gateway (`mesh-agent gateway`) listens on its edge
//! address. Real controllers, agents, gateways and kernel.
#![cfg(feature = "privileged")]

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use tests::*;

const APP_PORT: u16 = 8080;
const MIB: u64 = 1024 * 1024;
const IMPORT_CIDR: &str = "10.255.0.0/24";
const GATEWAY_ID: &str = "spiffe://cluster.local/ns/sockmesh-system/sa/sockmesh-gateway";

fn id(sa: &str) -> String {
    format!("spiffe://cluster.local/ns/default/sa/{sa}")
}

/// A gateway process, killed when dropped.
struct Gateway {
    child: Option<Child>,
    log: PathBuf,
}

impl Gateway {
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
    fn log_lines(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill()
    }
}

/// One zone: `client` on n1; `web` (app=web) and `hidden` (app=hidden) on n2, each serving an
/// echo on 8080; a node `gw` whose only workload is the gateway. Fields drop in order: the
/// processes before the topology that deletes their namespaces and cgroups.
struct Zone {
    gateway: Option<Gateway>,
    agents: Vec<Agent>,
    ctl: Controller,
    servers: Vec<Server>,
    client: PodId,
    n1: NodeId,
    /// This zone's address on the inter-zone link.
    edge: String,
    t: Topology,
}

fn nft(netns: &str, rules: &str) {
    let mut c =
        Command::new("ip").args(["netns", "exec", netns, "nft", "-f", "-"]).stdin(Stdio::piped()).spawn().expect("nft");
    use std::io::Write;
    c.stdin.take().unwrap().write_all(rules.as_bytes()).unwrap();
    assert!(c.wait().unwrap().success(), "nft rules in {netns}");
}

fn ip(args: &[&str]) {
    run(Command::new("ip").args(args)).unwrap();
}

/// The shared root and an intermediate per zone (the controller's own `ca` commands).
fn make_cas(dir: &std::path::Path) {
    let root = dir.join("root");
    run(Command::new(bin("mesh-controller")).args(["ca", "init", "--out"]).arg(&root)).unwrap();
    for z in ["east", "west"] {
        run(Command::new(bin("mesh-controller"))
            .args(["ca", "intermediate", "--zone", z, "--root"])
            .arg(&root)
            .arg("--out")
            .arg(dir.join(z)))
        .unwrap();
    }
}

fn topology(name: &str, edge: &str) -> (Topology, NodeId, NodeId, PodId) {
    let mut t = Topology::new(name).unwrap();
    let n1 = t.add_node("n1").unwrap();
    let n2 = t.add_node("n2").unwrap();
    t.add_node("gw").unwrap();
    let client = t.add_pod(n1, "client", true).unwrap();
    let web = t.add_pod(n2, "web", true).unwrap();
    let hidden = t.add_pod(n2, "hidden", true).unwrap();
    t.pods[web.0].labels.push(("app".into(), "web".into()));
    t.pods[hidden.0].labels.push(("app".into(), "hidden".into()));
    t.write_workloads().unwrap();
    // The gateway is a workload of its node: the zone's CA signs its identity for that node only.
    t.write_config(
        "gateway.yaml",
        &format!("kind: Workload\nname: sockmesh-gateway\nnamespace: sockmesh-system\nserviceAccount: sockmesh-gateway\nips: [{edge}]\nnode: gw\n"),
    )
    .unwrap();
    (t, n1, n2, client)
}

/// Joins the two zones' edges with the inter-zone link: each edge masquerades what leaves
/// through it and forwards its controller's port; the nodes route the link's range to their
/// edge. Nothing routes one zone's pod or node addresses to the other.
fn link(east: &Topology, west: &Topology) {
    ip(&["-n", &east.fabric, "link", "add", "iz", "type", "veth", "peer", "name", "iz", "netns", &west.fabric]);
    for (t, addr) in [(east, "10.250.0.1/24"), (west, "10.250.0.2/24")] {
        ip(&["-n", &t.fabric, "addr", "add", addr, "dev", "iz"]);
        ip(&["-n", &t.fabric, "link", "set", "iz", "up"]);
        run(Command::new("ip").args(["netns", "exec", &t.fabric, "sysctl", "-qw", "net.ipv4.ip_forward=1"])).unwrap();
        nft(
            &t.fabric,
            &format!(
                "table ip smt_zone {{\n chain post {{ type nat hook postrouting priority 100; oifname \"iz\" masquerade; }}\n chain pre {{ type nat hook prerouting priority -100; iifname \"iz\" tcp dport 15012 dnat to {CONTROLLER_IP}; }}\n}}\n"
            ),
        );
        for n in &t.nodes {
            ip(&["-n", &n.netns, "route", "add", "10.250.0.0/24", "via", &CONTROLLER_IP.to_string()]);
        }
    }
}

fn start_zone(
    t: Topology,
    n1: NodeId,
    n2: NodeId,
    client: PodId,
    me: &str,
    peer: (&str, &str),
    edge: &str,
    cas: &std::path::Path,
) -> Zone {
    let mut t = t;
    let ca = cas.join(me);
    let p = |f: &str| ca.join(f).to_string_lossy().into_owned();
    let (cert, key, chain) = (p("ca.pem"), p("ca-key.pem"), p("chain.pem"));
    let gateway = format!("{edge}:15008");
    let peer_arg = format!("{}=https://{}:15012", peer.0, peer.1);
    let ctl = t
        .start_controller(&[
            "--ca-cert",
            &cert,
            "--ca-key",
            &key,
            "--ca-chain",
            &chain,
            "--zone",
            me,
            "--zone-gateway",
            &gateway,
            "--zone-peer",
            &peer_arg,
            "--import-cidr",
            IMPORT_CIDR,
        ])
        .unwrap();
    let web = PodId(1);
    let hidden = PodId(2);
    let servers = vec![t.start_server(web, APP_PORT).unwrap(), t.start_server(hidden, APP_PORT).unwrap()];
    let agents = vec![t.start_agent(n1, &[]).unwrap(), t.start_agent(n2, &[]).unwrap()];
    t.wait_ready(n1).unwrap();
    t.wait_ready(n2).unwrap();
    let mut z = Zone { gateway: None, agents, ctl, servers, client, n1, edge: edge.to_owned(), t };
    z.gateway = Some(start_gateway(&z));
    z
}

fn start_gateway(z: &Zone) -> Gateway {
    let t = &z.t;
    let gw = t.nodes.iter().find(|n| n.name == "gw").unwrap();
    let log = t.dir.join(format!("gateway-{}.log", std::process::id()));
    let child = command_in(&t.fabric, &t.cgroup_root.join("controller"), bin("mesh-agent"))
        .unwrap()
        .args(["gateway", "--log-format", "json", "--listen", &format!("{}:15008", z.edge)])
        .args(["--controller", &format!("https://{CONTROLLER_IP}:15012")])
        .arg("--trust-bundle")
        .arg(t.trust_bundle())
        .arg("--node-credential-file")
        .arg(gw.state_dir.join("credential"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let g = Gateway { child: Some(child), log };
    wait_for(
        Duration::from_secs(30),
        || Ok(http_get(&t.fabric, "127.0.0.1:15021", "/ready").is_ok_and(|r| r.0 == 200)),
    )
    .unwrap_or_else(|e| panic!("gateway not ready: {e}: {}", std::fs::read_to_string(&g.log).unwrap_or_default()));
    g
}

fn two_zones(name: &str) -> (Zone, Zone) {
    let (east_t, e1, e2, ec) = topology(&format!("{name}-e"), "10.250.0.1");
    let (west_t, w1, w2, wc) = topology(&format!("{name}-w"), "10.250.0.2");
    link(&east_t, &west_t);
    make_cas(&east_t.dir);
    let cas = east_t.dir.clone();
    let east = start_zone(east_t, e1, e2, ec, "east", ("west", "10.250.0.2"), "10.250.0.1", &cas);
    let west = start_zone(west_t, w1, w2, wc, "west", ("east", "10.250.0.1"), "10.250.0.2", &cas);
    (east, west)
}

fn service(name: &str, app: &str, vip: &str, export: bool) -> String {
    format!("kind: Service\nname: {name}\nnamespace: default\naddresses: [{vip}]\nports: [{{port: 80, targetPort: {APP_PORT}}}]\nselector: {{app: {app}}}\nexport: {export}\n")
}

/// The address `n`'s agent has for the Service `name` imported from other zones, with its
/// endpoints (address, zone).
fn import(z: &Zone, n: NodeId, name: &str) -> Option<(IpAddr, usize)> {
    let (_, body) = http_get(&z.t.node(n).netns, "127.0.0.1:15000", "/services").ok()?;
    let all: Vec<mesh_api::admin::ServiceInfo> = serde_json::from_str(&body).ok()?;
    all.into_iter()
        .find(|s| s.name == name && s.addresses.iter().any(|a| a.to_string().starts_with("10.255.0.")))
        .map(|s| (s.addresses[0], s.endpoints.len()))
}

fn wait_import(z: &Zone, name: &str, endpoints: usize) -> (IpAddr, Duration) {
    let mut found = None;
    let took = time_until(Duration::from_secs(30), || {
        found = import(z, z.n1, name).filter(|(_, n)| *n == endpoints);
        found.is_some()
    })
    .unwrap_or_else(|| {
        let zone_lines: Vec<Value> = z.ctl.log_lines().into_iter().filter(|l| l.to_string().contains("zone")).collect();
        panic!(
            "{name} was never imported with {endpoints} endpoints: {:?}; the controller said {zone_lines:?}",
            import(z, z.n1, name)
        )
    });
    (found.unwrap().0, took)
}

/// One CONNECT for `target` to west's gateway from east's edge, with a legitimate certificate
/// of the mesh (`sm-attack streams`, signed by the shared root): what the gateway answered.
fn attack_gateway(east: &Zone, target: &str) -> Value {
    let dir = east.t.dir.join("attacker");
    if !dir.exists() {
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(east.t.dir.join("root/ca.pem"), dir.join("root.pem")).unwrap();
        std::fs::copy(east.t.dir.join("root/ca-key.pem"), dir.join("root-key.pem")).unwrap();
    }
    let out = command_in(&east.t.fabric, &east.t.cgroup_root.join("controller"), bin("sm-attack"))
        .unwrap()
        .args(["streams", "--to", "10.250.0.2:15008", "--target", target, "--count", "1", "--expect", GATEWAY_ID])
        .arg("--root-dir")
        .arg(&dir)
        .output()
        .unwrap();
    serde_json::from_slice(out.stdout.trim_ascii())
        .unwrap_or_else(|_| panic!("sm-attack: {}", String::from_utf8_lossy(&out.stdout)))
}

fn echoes(z: &Zone, to: &str, count: u32, extra: &[&str]) -> Value {
    let count = count.to_string();
    let mut args = vec!["echoes", "--to", to, "--count", &count, "--bytes", "2000", "--timeout-ms", "5000"];
    args.extend_from_slice(extra);
    z.t.pod_app(z.client, &args).unwrap()
}

/// A client in east reaches web, exported by west, by the address east gives it: through both
/// gateways' edge, 10 MB intact; the inter-zone link and the gateway's netns carry only TLS;
/// the gateway holds only its own identity; west's agent sees and logs east's client identity,
/// and a DENY for it in west refuses it. The Service west does not export is not imported.
#[test]
fn a_client_reaches_another_zones_exported_service_through_its_gateway_end_to_end() {
    let (east, west) = two_zones("zones");
    west.t.write_config("web.yaml", &service("web", "web", "10.96.0.10", true)).unwrap();
    west.t.write_config("hidden.yaml", &service("hidden", "hidden", "10.96.0.11", false)).unwrap();
    let (vip, took) = wait_import(&east, "web", 1);
    eprintln!("web exported in west was usable in east after {took:?}");
    let to = format!("{vip}:80");

    let mut link = Capture::start(&east.t.fabric, "iz", east.t.dir.join("iz.pcap")).unwrap();
    let mut gw = Capture::start(&west.t.fabric, "any", west.t.dir.join("gateway.pcap")).unwrap();
    let r =
        east.t.pod_app(east.client, &["echo", "--to", &to, "--bytes", &(10 * MIB).to_string(), "--seed", "9"]).unwrap();
    assert_eq!(r["ok"], true, "10 MB through the gateway: {r}");
    assert_eq!(r["received"], 10 * MIB, "{r}");
    let marker = "SOCKMESH-ZONES-MARKER-7f31";
    let r = echoes(&east, &to, 20, &["--marker", marker]);
    assert_eq!(r["ok"], true, "{r}");
    link.stop();
    gw.stop();
    assert!(link.count("tcp port 15008").unwrap() > 100, "the transfer crossed the inter-zone link to the gateway");
    assert!(gw.count("tcp port 15008").unwrap() > 100);
    for (what, cap) in [("the inter-zone link", &link), ("the gateway's netns", &gw)] {
        let pcap = cap.bytes().unwrap();
        assert!(!pcap.windows(marker.len()).any(|w| w == marker.as_bytes()), "the marker crossed {what} in plaintext");
        // Only the tunnels (15008) and the zone sync (15012) cross; nothing else.
        assert_eq!(cap.count("tcp and not port 15008 and not port 15012").unwrap(), 0, "{what}: other traffic");
    }

    // The gateway has only its own identity: it was never given a key that decrypts the
    // tunnels it forwards.
    let (_, certs) = http_get(&west.t.fabric, "127.0.0.1:15021", "/certs").unwrap();
    let certs: Vec<String> = serde_json::from_str(&certs).unwrap();
    assert_eq!(certs, [GATEWAY_ID]);
    let forwarded: Vec<Value> =
        west.gateway.as_ref().unwrap().log_lines().into_iter().filter(|l| l["message"] == "forwarded").collect();
    assert!(!forwarded.is_empty() && forwarded.iter().all(|l| l["client"] == id("sa-client")), "{forwarded:?}");

    // West's agent saw east's client's own identity, proved end to end.
    let inbound: Vec<Value> = west.agents[1].access_log().into_iter().filter(|l| l["direction"] == "inbound").collect();
    assert!(!inbound.is_empty());
    assert!(
        inbound.iter().all(|l| l["src_principal"] == id("sa-client") && l["dst_principal"] == id("sa-web")),
        "{inbound:?}"
    );
    let out: Vec<Value> = east.agents[0].access_log().into_iter().filter(|l| l["direction"] == "outbound").collect();
    assert!(
        out.iter().any(|l| l["dst_principal"] == id("sa-web") && l["connection_security_policy"] == "mutual_tls"),
        "{out:?}"
    );

    // Not exported, not imported.
    assert!(import(&east, east.n1, "hidden").is_none());
    // Nor forwarded to anyone who asks west's gateway for it by address, with a valid
    // certificate of the mesh: only exported Services' endpoints, on their target ports, are.
    let (web_ip, hidden_ip) = (west.t.pod(PodId(1)).ip, west.t.pod(PodId(2)).ip);
    let ask = |target: String| attack_gateway(&east, &target);
    assert_eq!(ask(format!("{web_ip}:{APP_PORT}"))["opened"], 1, "the control: an exported endpoint is forwarded");
    assert_eq!(ask(format!("{hidden_ip}:{APP_PORT}"))["other"], serde_json::json!([404]), "an unexported one is not");
    assert_eq!(ask(format!("{web_ip}:22"))["other"], serde_json::json!([404]), "nor another port of an exported one");

    // A DENY in west for east's client: refused at west's agent.
    let deny = "apiVersion: security.sockmesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: deny-east-client, namespace: default}\nspec:\n  selector: {matchLabels: {app: web}}\n  action: DENY\n  rules:\n  - from:\n    - source: {principals: [\"cluster.local/ns/default/sa/sa-client\"]}\n";
    west.t.write_config("deny.yaml", deny).unwrap();
    wait_for(Duration::from_secs(30), || {
        Ok(west.agents[1].log_lines().iter().any(|l| l["message"] == "configuration change applied"))
    })
    .unwrap();
    let refused = time_until(Duration::from_secs(30), || echoes(&east, &to, 1, &[])["failed"] == 1);
    assert!(refused.is_some(), "the DENY in west never applied to east's client");
    let r = echoes(&east, &to, 5, &[]);
    assert_eq!(r["failed"], 5, "{r}");
    assert!(
        west.agents[1]
            .access_log()
            .iter()
            .any(|l| l["src_principal"] == id("sa-client") && l["result"] == "deny_policy"),
        "west's agent did not log the denial: {:?}",
        west.agents[1].access_log().last()
    );
}

/// Exports come and go across zones; a Service both zones export is one import whose
/// endpoints are both zones', and it keeps working when the other zone's gateway is killed.
#[test]
fn exports_sync_both_ways_and_a_service_of_both_zones_survives_a_dead_gateway() {
    let (east, mut west) = two_zones("zonesync");
    west.t.write_config("web.yaml", &service("web", "web", "10.96.0.10", true)).unwrap();
    east.t.write_config("web.yaml", &service("web", "web", "10.96.0.10", false)).unwrap();
    wait_import(&east, "web", 1);

    // Exported in west: imported in east. Withdrawn: gone from east.
    west.t.write_config("api.yaml", &service("api", "hidden", "10.96.0.12", true)).unwrap();
    let (_, took) = wait_import(&east, "api", 1);
    eprintln!("api exported in west: usable in east after {took:?}");
    std::fs::remove_file(west.t.config_dir().join("api.yaml")).unwrap();
    let gone = time_until(Duration::from_secs(30), || import(&east, east.n1, "api").is_none());
    eprintln!("api withdrawn in west: gone from east after {gone:?}");
    assert!(gone.is_some(), "api was never withdrawn from east");

    // Exported by both: east's import joins east's endpoint and west's.
    east.t.write_config("web.yaml", &service("web", "web", "10.96.0.10", true)).unwrap();
    let (vip, _) = wait_import(&east, "web", 2);
    let to = format!("{vip}:80");
    let r = echoes(&east, &to, 30, &[]);
    assert_eq!(r["ok"], true, "{r}");
    let (east_got, west_got) = (east.servers[0].accepted().unwrap().len(), west.servers[0].accepted().unwrap().len());
    assert!(east_got > 0 && west_got > 0, "both zones' endpoints serve: east {east_got}, west {west_got}");

    // West's gateway dies: east's clients go on, to east's endpoint.
    west.gateway.as_mut().unwrap().kill();
    let r = echoes(&east, &to, 30, &[]);
    assert_eq!(r["ok"], true, "with west's gateway gone: {r}");
    assert_eq!(west.servers[0].accepted().unwrap().len(), west_got, "nothing reached west without its gateway");

    // The sync is on the controller's dashboard.
    let (_, m) = http_get(&east.t.fabric, &format!("{CONTROLLER_IP}:15014"), "/metrics").unwrap();
    assert!(m.contains("sockmesh_zone_connected{zone=\"west\"} 1"), "{m}");
    assert!(m.contains("sockmesh_zone_sync_lag_seconds{zone=\"west\"}"), "{m}");
    assert!(m.contains("sockmesh_zone_imported_services{zone=\"west\"} 1"), "{m}");
}
