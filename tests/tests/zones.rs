//! Zones: one mesh across two clusters whose pod networks do not route to each other — here
//! they even overlap, both zones numbering their nodes and pods alike. Each zone is a fabric of
//! its own with its own controller (an intermediate CA under one shared root). The two fabrics
//! meet only on an inter-zone link, 10.250.0.0/24, where each zone's edge (its fabric netns)
//! masquerades what leaves it and forwards its controller's port, as a cloud NAT and load
//! balancer would; each zone's east-west gateway (`mesh-agent gateway`) listens on its edge
//! address. Real controllers, agents, gateways and kernel.
#![cfg(feature = "privileged")]

use std::time::Duration;

use serde_json::Value;
use tests::zones::*;
use tests::*;

const MIB: u64 = 1024 * 1024;

fn id(sa: &str) -> String {
    format!("spiffe://cluster.local/ns/default/sa/{sa}")
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

/// A client in east reaches web, exported by west, by the address east gives it: through both
/// gateways' edge, 10 MB intact; the inter-zone link and the gateway's netns carry only TLS;
/// the gateway holds only its own identity; west's agent sees and logs east's client identity,
/// and a DENY for it in west refuses it. The Service west does not export is not imported.
#[test]
fn a_client_reaches_another_zones_exported_service_through_its_gateway_end_to_end() {
    let (east, west) = two_zones("zones").unwrap();
    west.t.write_config("web.yaml", &service("web", "web", "10.96.0.10", true)).unwrap();
    west.t.write_config("hidden.yaml", &service("hidden", "hidden", "10.96.0.11", false)).unwrap();
    let (vip, took) = east.wait_import("web", 1).unwrap();
    eprintln!("web exported in west was usable in east after {took:?}");
    let to = format!("{vip}:80");

    let mut link = Capture::start(&east.t.fabric, "iz", east.t.dir.join("iz.pcap")).unwrap();
    let mut gw = Capture::start(&west.t.fabric, "any", west.t.dir.join("gateway.pcap")).unwrap();
    let r = east.t.pod_app(CLIENT, &["echo", "--to", &to, "--bytes", &(10 * MIB).to_string(), "--seed", "9"]).unwrap();
    assert_eq!(r["ok"], true, "10 MB through the gateway: {r}");
    assert_eq!(r["received"], 10 * MIB, "{r}");
    let marker = "SOCKMESH-ZONES-MARKER-7f31";
    let r = east.echoes(&to, 20, &["--marker", marker]).unwrap();
    assert_eq!(r["ok"], true, "{r}");
    link.stop();
    gw.stop();
    assert!(link.count("tcp port 15008").unwrap() > 100, "the transfer crossed the inter-zone link to the gateway");
    assert!(gw.count("tcp port 15008").unwrap() > 100);
    for (what, cap) in [("the inter-zone link", &link), ("the gateway's netns", &gw)] {
        let pcap = cap.bytes().unwrap();
        assert!(!pcap.windows(marker.len()).any(|w| w == marker.as_bytes()), "the marker crossed {what} in plaintext");
        // Only the tunnels (15008) and the zone sync (15013) cross; nothing else.
        assert_eq!(cap.count("tcp and not port 15008 and not port 15013").unwrap(), 0, "{what}: other traffic");
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
    assert!(east.import("hidden").is_none());
    // Nor forwarded to anyone who asks west's gateway for its pod by address, with a valid
    // certificate of the mesh: only exported Services' endpoints are.
    let (web_ip, hidden_ip) = (west.t.pod(WEB).ip, west.t.pod(HIDDEN).ip);
    let ask = |target: String| attack_gateway(&east, &target);
    assert_eq!(ask(format!("{web_ip}:{APP_PORT}"))["opened"], 1, "the control: an exported endpoint is forwarded");
    assert_eq!(ask(format!("{hidden_ip}:{APP_PORT}"))["other"], serde_json::json!([404]), "an unexported one is not");

    // A DENY in west for east's client: refused at west's agent.
    let deny = "apiVersion: security.sockmesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: deny-east-client, namespace: default}\nspec:\n  selector: {matchLabels: {app: web}}\n  action: DENY\n  rules:\n  - from:\n    - source: {principals: [\"cluster.local/ns/default/sa/sa-client\"]}\n";
    west.t.write_config("deny.yaml", deny).unwrap();
    wait_for(Duration::from_secs(30), || {
        Ok(west.agents[1].log_lines().iter().any(|l| l["message"] == "configuration change applied"))
    })
    .unwrap();
    let refused = time_until(Duration::from_secs(30), || east.echoes(&to, 1, &[]).unwrap()["failed"] == 1);
    assert!(refused.is_some(), "the DENY in west never applied to east's client");
    let r = east.echoes(&to, 5, &[]).unwrap();
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
    let (east, mut west) = two_zones("zonesync").unwrap();
    west.t.write_config("web.yaml", &service("web", "web", "10.96.0.10", true)).unwrap();
    east.t.write_config("web.yaml", &service("web", "web", "10.96.0.10", false)).unwrap();
    east.wait_import("web", 1).unwrap();

    // Exported in west: imported in east. Withdrawn: gone from east.
    west.t.write_config("api.yaml", &service("api", "hidden", "10.96.0.12", true)).unwrap();
    let (_, took) = east.wait_import("api", 1).unwrap();
    eprintln!("api exported in west: usable in east after {took:?}");
    std::fs::remove_file(west.t.config_dir().join("api.yaml")).unwrap();
    let gone = time_until(Duration::from_secs(30), || east.import("api").is_none());
    eprintln!("api withdrawn in west: gone from east after {gone:?}");
    assert!(gone.is_some(), "api was never withdrawn from east");

    // Exported by both: east's import joins east's endpoint and west's.
    east.t.write_config("web.yaml", &service("web", "web", "10.96.0.10", true)).unwrap();
    let (vip, _) = east.wait_import("web", 2).unwrap();
    let to = format!("{vip}:80");
    let r = east.echoes(&to, 30, &[]).unwrap();
    assert_eq!(r["ok"], true, "{r}");
    let (east_got, west_got) = (east.servers[0].accepted().unwrap().len(), west.servers[0].accepted().unwrap().len());
    assert!(east_got > 0 && west_got > 0, "both zones' endpoints serve: east {east_got}, west {west_got}");

    // A Service only west exports, for after its gateway is gone.
    west.t.write_config("api.yaml", &service("api", "hidden", "10.96.0.12", true)).unwrap();
    let (api, _) = east.wait_import("api", 1).unwrap();
    let api = format!("{api}:80");
    assert_eq!(east.echoes(&api, 1, &[]).unwrap()["ok"], true);

    // West's gateway dies: east's clients go on, to east's endpoint.
    west.gateway.as_mut().unwrap().kill();
    let r = east.echoes(&to, 30, &[]).unwrap();
    assert_eq!(r["ok"], true, "with west's gateway gone: {r}");
    assert_eq!(west.servers[0].accepted().unwrap().len(), west_got, "nothing reached west without its gateway");
    // And what only west serves is refused by the agent at once (the gateway's port refuses,
    // or the agent already knows it gone), not left waiting for a timeout. The agent's record
    // is what is checked: which of the client's reading and writing threads sees the reset is
    // a race (the other sees the end of the stream).
    let r = east.echoes(&api, 3, &[]).unwrap();
    assert_eq!(r["failed"], 3, "{r}");
    let results: Vec<Value> =
        east.agents[0].access_log().into_iter().filter(|l| l["orig_dst"] == api).map(|l| l["result"].clone()).collect();
    let last = &results[results.len().saturating_sub(3)..];
    assert!(
        last.len() == 3 && last.iter().all(|r| *r == "gateway_unreachable" || *r == "hbone_connect_failed"),
        "{results:?}"
    );

    // The sync is on the controller's dashboard.
    let (_, m) = http_get(&east.t.fabric, &format!("{CONTROLLER_IP}:15014"), "/metrics").unwrap();
    assert!(m.contains("sockmesh_zone_connected{zone=\"west\"} 1"), "{m}");
    assert!(m.contains("sockmesh_zone_sync_lag_seconds{zone=\"west\"}"), "{m}");
    assert!(m.contains("sockmesh_zone_imported_services{zone=\"west\"} 2"), "{m}");
}

/// Every Service endpoint failure an agent counted, whatever the reason.
fn endpoint_failures(metrics: &str) -> f64 {
    let name = "sockmesh_service_endpoint_failures_total";
    metrics.lines().filter(|l| l.starts_with(name)).filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok()).sum()
}

/// A zone wholly cut off (its edge a blackhole: no reset, no ICMP). The first connection that
/// tries its gateway waits out the agent's connect timeout; from then on the agent skips that
/// gateway until it answers again: what another zone also serves goes there without trying
/// the lost zone, and what only the lost zone serves is refused at once. The local zone is
/// unaffected, the import is kept (the zone may come back), and once the link is back the lost
/// zone's Services work again.
#[test]
fn a_zone_cut_off_is_skipped_at_once_until_its_gateway_answers_again() {
    let (east, west) = two_zones("zonecut").unwrap();
    west.t.write_config("web.yaml", &service("web", "web", "10.96.0.10", true)).unwrap();
    east.t.write_config("web.yaml", &service("web", "web", "10.96.0.10", true)).unwrap();
    west.t.write_config("api.yaml", &service("api", "hidden", "10.96.0.12", true)).unwrap();
    let (web, _) = east.wait_import("web", 2).unwrap();
    let (api, _) = east.wait_import("api", 1).unwrap();
    let (web, api) = (format!("{web}:80"), format!("{api}:80"));
    // A pooled tunnel to west's gateway is open when the link goes.
    assert_eq!(east.echoes(&api, 3, &[]).unwrap()["ok"], true);
    let unreachable = || metric(&scrape(&east.t, east.n1), "sockmesh_gateways_unreachable", &[]);
    assert_eq!(unreachable(), Some(0.0));

    // The pool keeps that tunnel across a change of east's configuration (a change evicts the
    // tunnels whose destination is gone): no new TLS session to the gateway after it.
    let sessions = east.agents[0].stats().unwrap().hbone.tls_sessions;
    let applied =
        || east.agents[0].log_lines().iter().filter(|l| l["message"] == "configuration change applied").count();
    let before = applied();
    east.t.write_config("other.yaml", &service("other", "web", "10.96.0.13", false)).unwrap();
    wait_for(Duration::from_secs(30), || Ok(applied() > before)).unwrap();
    assert_eq!(east.echoes(&api, 3, &[]).unwrap()["ok"], true);
    assert_eq!(east.agents[0].stats().unwrap().hbone.tls_sessions, sessions, "the tunnel to the gateway was dropped");

    east.cut_off(&west.edge).unwrap();
    // The first connection waits for the pooled tunnel's answer until the connect timeout;
    // the next ones are refused without trying west's gateway.
    let r = east.echoes(&api, 3, &[]).unwrap();
    assert_eq!(r["failed"], 3, "{r}");
    assert_eq!(unreachable(), Some(1.0), "west's gateway is marked unreachable");
    let results: Vec<Value> =
        east.agents[0].access_log().into_iter().filter(|l| l["orig_dst"] == api).map(|l| l["result"].clone()).collect();
    assert_eq!(results.len(), 9, "{results:?}");
    assert_eq!(results[7..], ["gateway_unreachable", "gateway_unreachable"], "{results:?}");

    // What both zones serve goes to east's endpoint, without one more try of west's gateway.
    let west_got = west.servers[0].accepted().unwrap().len();
    let failures = endpoint_failures(&scrape(&east.t, east.n1));
    let r = east.echoes(&web, 30, &[]).unwrap();
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(endpoint_failures(&scrape(&east.t, east.n1)), failures, "an endpoint behind the lost gateway was tried");
    assert_eq!(west.servers[0].accepted().unwrap().len(), west_got);
    // East's own pods are unaffected.
    let local = format!("{}:{APP_PORT}", east.t.pod(WEB).ip);
    assert_eq!(east.echoes(&local, 5, &[]).unwrap()["ok"], true);

    // East's controller loses west's sync and says so; west's last exports stay imported.
    let (_, m) = http_get(&east.t.fabric, &format!("{CONTROLLER_IP}:15014"), "/metrics").unwrap();
    assert_eq!(metric(&m, "sockmesh_zone_imported_services", &[("zone", "west")]), Some(2.0), "{m}");
    let lost = time_until(Duration::from_secs(60), || {
        http_get(&east.t.fabric, &format!("{CONTROLLER_IP}:15014"), "/metrics")
            .is_ok_and(|(_, m)| metric(&m, "sockmesh_zone_connected", &[("zone", "west")]) == Some(0.0))
    });
    assert!(lost.is_some(), "east's controller never noticed west was gone");
    assert!(east.import("api").is_some(), "west's exports are kept while it is away");

    // Back: the agent finds west's gateway again by itself, and west's Services work.
    east.reconnect().unwrap();
    let back = time_until(Duration::from_secs(60), || east.echoes(&api, 1, &[]).is_ok_and(|r| r["ok"] == true));
    eprintln!("west reachable again after {back:?}");
    assert!(back.is_some(), "west's Services never came back");
    assert_eq!(unreachable(), Some(0.0));
    assert_eq!(east.echoes(&web, 10, &[]).unwrap()["ok"], true);
}

/// What marks a gateway unreachable, and for whom. A dead endpoint behind a live gateway is
/// answered 503 by the gateway, below the agent's connect timeout: that endpoint fails over
/// alone and the gateway stays in use. A pod that cannot reach a gateway (its own egress
/// blocked) finds out for itself: its first connection tries one endpoint behind that gateway,
/// not each of them, and from then on it is refused at once; the node's other pod, which
/// reaches the gateway, is not shut out.
#[test]
fn a_gateway_is_unreachable_per_pod_and_a_dead_endpoint_behind_it_fails_alone() {
    let (east, west) = two_zones("zoneper").unwrap();
    let pair = "kind: Service\nname: pair\nnamespace: default\naddresses: [10.96.0.14]\nports: [{port: 80, targetPort: 8080}]\nselector: {tier: backend}\nexport: true\n";
    west.t.write_config("pair.yaml", pair).unwrap();
    west.t.write_config("web.yaml", &service("web", "web", "10.96.0.10", true)).unwrap();
    let (pair, _) = east.wait_import("pair", 2).unwrap();
    let (web, _) = east.wait_import("web", 1).unwrap();
    let (pair, web) = (format!("{pair}:80"), format!("{web}:80"));
    let metrics = || scrape(&east.t, east.n1);
    let unreachable = || metric(&metrics(), "sockmesh_gateways_unreachable", &[]);

    // West's web pod's agent stops answering west's gateway (a blackhole, not a reset).
    let web_ip = west.t.pod(WEB).ip.to_string();
    Zone::drop_to(&west.t.fabric, "smt_dead", &web_ip, Some(15008)).unwrap();
    let r = east.echoes(&pair, 6, &[]).unwrap();
    assert_eq!(r["ok"], true, "the live endpoint serves: {r}");
    assert_eq!(unreachable(), Some(0.0), "a dead endpoint marked its whole gateway");
    let answered_503 =
        metric(&metrics(), "sockmesh_service_endpoint_failures_total", &[("reason", "destination_app_unreachable")]);
    assert!(answered_503.is_some_and(|n| n >= 1.0), "the gateway never answered 503 for the dead endpoint");
    Zone::undrop(&west.t.fabric, "smt_dead").unwrap();

    // The client's own egress to west's edge is blocked; client2's is not.
    let client_netns = east.t.pod(CLIENT).netns.clone();
    Zone::drop_to(&client_netns, "smt_egress", &west.edge, None).unwrap();
    let failures = endpoint_failures(&metrics());
    let r = east.echoes(&pair, 1, &[]).unwrap();
    assert_eq!(r["failed"], 1, "{r}");
    assert_eq!(endpoint_failures(&metrics()), failures + 1.0, "one endpoint tried behind the lost gateway, not both");
    let last = |to: &str| {
        east.agents[0].access_log().into_iter().rev().find(|l| l["orig_dst"] == to).map(|l| l["result"].clone())
    };
    let r = east.echoes(&web, 2, &[]).unwrap();
    assert_eq!(r["failed"], 2, "{r}");
    assert_eq!(last(&web), Some("gateway_unreachable".into()));
    assert_eq!(unreachable(), Some(1.0));
    // The other pod on the node still reaches west.
    assert_eq!(east.echoes_from(CLIENT2, &web, 3, &[]).unwrap()["ok"], true);
    assert_eq!(east.echoes_from(CLIENT2, &pair, 3, &[]).unwrap()["ok"], true);

    Zone::undrop(&client_netns, "smt_egress").unwrap();
    let back = time_until(Duration::from_secs(60), || east.echoes(&web, 1, &[]).is_ok_and(|r| r["ok"] == true));
    assert!(back.is_some(), "the client never reached west again");
    assert_eq!(unreachable(), Some(0.0));
}
