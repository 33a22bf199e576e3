use super::*;

fn model(yaml_workloads: &[(&str, &str, &str)], services: &[Service]) -> Model {
    let mut m = Model::default();
    for (name, sa, ip) in yaml_workloads {
        let w: mesh_model::Workload =
            serde_yaml::from_str(&format!("name: {name}\nserviceAccount: {sa}\nips: [{ip}]\nnode: n1\n")).unwrap();
        Arc::make_mut(&mut m.workloads).insert(w.key(), Arc::new(w));
    }
    for s in services {
        m.services.insert(s.key(), s.clone());
    }
    m
}

fn svc(yaml: &str) -> Service {
    serde_yaml::from_str(yaml).unwrap()
}

fn settings() -> Settings {
    Settings {
        zone: "east".into(),
        trust_domain: "cluster.local".into(),
        gateway: Some("192.0.2.1:15008".parse().unwrap()),
        gateway_identity: SpiffeId::workload("cluster.local", "sockmesh-system", "sockmesh-gateway").unwrap(),
        peers: vec![("west".into(), "https://192.0.2.2:15012".into())],
        import_range: Some("10.255.0.0/24".parse().unwrap()),
    }
}

/// Only exported Services are offered, and of their endpoints only the mesh workloads, each
/// with the identity it proves.
#[test]
fn a_zone_exports_its_marked_services_mesh_endpoints_with_their_identities() {
    let m = model(
        &[("b", "sa-b", "10.20.2.10"), ("c", "sa-c", "10.20.2.11")],
        &[
            svc("name: web\naddresses: [10.96.0.1]\nports: [{port: 80, targetPort: 8080}]\nexport: true\nendpoints: [{address: 10.20.2.10, workload: b}, {address: 192.0.2.50}]"),
            svc("name: db\naddresses: [10.96.0.2]\nports: [{port: 5432}]\nendpoints: [{address: 10.20.2.11, workload: c}]"),
        ],
    );
    let e = exports_of(&m, "cluster.local");
    assert_eq!(e.len(), 1, "db is not exported: {e:?}");
    assert_eq!((e[0].namespace.as_str(), e[0].name.as_str()), ("default", "web"));
    assert_eq!(
        e[0].endpoints,
        [ExportedEndpoint {
            address: "10.20.2.10".parse().unwrap(),
            identity: "spiffe://cluster.local/ns/default/sa/sa-b".into(),
            ready: true
        }]
    );
}

fn remote(gw: &str, services: Vec<Exported>) -> Remote {
    Remote {
        gateway: gw.parse().unwrap(),
        gateway_identity: "spiffe://cluster.local/ns/sockmesh-system/sa/sockmesh-gateway".into(),
        services,
    }
}

fn exported(name: &str, port: u16, eps: &[&str]) -> Exported {
    Exported {
        namespace: "default".into(),
        name: name.into(),
        ports: vec![mesh_model::ServicePort { name: None, port: 80, target_port: Some(port) }],
        endpoints: eps
            .iter()
            .map(|a| ExportedEndpoint {
                address: a.parse().unwrap(),
                identity: "spiffe://cluster.local/ns/default/sa/web".into(),
                ready: true,
            })
            .collect(),
    }
}

/// A Service another zone exports gets an address of this zone's and its endpoints, marked
/// with their zone and gateway; this zone's own Service of that name stays as it is, and when
/// this zone exports it too its endpoints join the import.
#[test]
fn imports_join_every_exporting_zones_endpoints_under_an_address_of_this_zone() {
    let mut m = model(
        &[("w1", "web", "10.20.1.10")],
        &[svc("name: web\naddresses: [10.96.0.1]\nports: [{port: 80, targetPort: 8080}]\nexport: true\nendpoints: [{address: 10.20.1.10, workload: w1}]")],
    );
    let own = m.services.clone();
    let mut remotes = Remotes::new();
    remotes.insert(
        "west".into(),
        remote("192.0.2.2:15008", vec![exported("web", 8080, &["10.20.1.10"]), exported("api", 9000, &["10.20.2.10"])]),
    );
    merge(&mut m, &settings(), &remotes);
    assert_eq!(
        m.services.get(&("default".into(), "web".into())),
        own.get(&("default".into(), "web".into())),
        "the zone's own Service is untouched"
    );
    let web = &m.services[&("default".to_owned(), "web.clusterset".to_owned())];
    assert!(web.imported && !web.export);
    assert_eq!(web.host(), "web.default.svc.clusterset.local");
    let range: Range = "10.255.0.0/24".parse().unwrap();
    assert!(web.addresses.len() == 1 && (1..=254).any(|i| range.nth(i - 1) == web.addresses[0]), "{:?}", web.addresses);
    // The same address in both zones' overlapping networks: one local, one remote endpoint.
    let eps: Vec<(String, Option<&str>)> =
        web.endpoints.iter().map(|e| (e.address.to_string(), e.remote.as_ref().map(|r| r.zone.as_str()))).collect();
    assert_eq!(eps, [("10.20.1.10".to_owned(), None), ("10.20.1.10".to_owned(), Some("west"))]);
    let r = web.endpoints[1].remote.as_ref().unwrap();
    assert_eq!(r.gateway, "192.0.2.2:15008".parse().unwrap());
    assert_eq!(r.identity, "spiffe://cluster.local/ns/default/sa/web");
    let api = &m.services[&("default".to_owned(), "api.clusterset".to_owned())];
    assert_ne!(api.addresses, web.addresses);
    assert_eq!(api.port(80).unwrap().target(), 9000);
    web.validate().expect("an import is a valid Service record as pushed");
}

/// A zone whose ports for a name differ from the first exporter's is left out, and said so.
#[test]
fn a_zone_exporting_other_ports_is_left_out_and_reported() {
    let mut m = Model::default();
    let mut remotes = Remotes::new();
    remotes.insert("north".into(), remote("192.0.2.3:15008", vec![exported("web", 8080, &["10.20.3.10"])]));
    remotes.insert("west".into(), remote("192.0.2.2:15008", vec![exported("web", 9999, &["10.20.2.10"])]));
    merge(&mut m, &settings(), &remotes);
    let web = &m.services[&("default".to_owned(), "web.clusterset".to_owned())];
    assert_eq!(web.endpoints.len(), 1);
    assert_eq!(web.endpoints[0].remote.as_ref().unwrap().zone, "north");
    assert!(m.errors.iter().any(|e| e.contains("zone west") && e.contains("default/web")), "{:?}", m.errors);
}

/// Addresses come from the range, skip what the zone uses, and stay put as others come and go;
/// a full range is reported.
#[test]
fn import_addresses_are_stable_and_never_taken_twice() {
    let range: Range = "10.255.0.0/30".parse().unwrap();
    assert_eq!(range.size(), 2);
    let none = HashSet::new();
    let a = allocate(range, "default", "web", &none).unwrap();
    assert_eq!(allocate(range, "default", "web", &none), Some(a), "the same name, the same address");
    let b = allocate(range, "default", "api", &HashSet::from([a])).unwrap();
    assert_ne!(a, b);
    assert_eq!(allocate(range, "default", "x", &HashSet::from([a, b])), None);
    assert!("10.0.0.0/31".parse::<Range>().is_err() && "nonsense".parse::<Range>().is_err());

    let mut m = Model::default();
    let mut remotes = Remotes::new();
    let many = (0..3).map(|i| exported(&format!("s{i}"), 80, &[])).collect();
    remotes.insert("west".into(), remote("192.0.2.2:15008", many));
    let s = Settings { import_range: Some(range), ..settings() };
    merge(&mut m, &s, &remotes);
    assert_eq!(m.services.len(), 2);
    assert!(m.errors.iter().any(|e| e.contains("no free address")), "{:?}", m.errors);
}

/// The sync's peers prove their zone with a `zone` SPIFFE ID, which no workload has.
#[test]
fn zone_ids_are_not_workload_ids() {
    let z = Settings::zone_id("cluster.local", "west").unwrap();
    assert_eq!(z.to_string(), "spiffe://cluster.local/zone/west");
    assert!(z.workload_parts().is_none());
    assert!(Settings::zone_id("cluster.local", "a/b").is_err());
    assert!(Settings::zone_id("cluster.local", "West").is_err());
}
