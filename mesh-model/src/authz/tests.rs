use super::*;
use crate::policy::{From, Operation, Rule, Source, To, WorkloadSelector};
use proptest::prelude::*;
use std::collections::BTreeMap;

fn spec(action: Action, rules: Vec<Rule>) -> AuthorizationPolicySpec {
    AuthorizationPolicySpec { selector: None, action, rules, dry_run: false, mesh: None }
}

fn from(src: Source) -> Rule {
    Rule { from: vec![From { source: src }], to: vec![] }
}

fn ports(p: &[&str]) -> Rule {
    Rule {
        from: vec![],
        to: vec![To { operation: Operation { ports: p.iter().map(|s| s.to_string()).collect(), not_ports: vec![] } }],
    }
}

fn pol(name: &str, s: AuthorizationPolicySpec) -> Compiled {
    Compiled::compile("default", name, &s).unwrap()
}

fn facts(principal: Option<&'static str>, ip: &str, port: u16) -> Facts<'static> {
    Facts { principal, source_ip: ip.parse().unwrap(), dst_port: port }
}

const A: Option<&str> = Some("spiffe://cluster.local/ns/default/sa/a");
const B: Option<&str> = Some("spiffe://cluster.local/ns/other/sa/b");
const DOTTED: Option<&str> = Some("spiffe://cluster.local/ns/default/sa/my.sa");

fn decide(policies: Vec<Compiled>, f: Facts<'_>) -> Decision {
    let idx = PolicyIndex::new("sockmesh-system", policies);
    authorize(&f, &idx.for_workload("default", &BTreeMap::from([("app".to_string(), "web".to_string())]).into()))
        .decision
}

fn s(f: impl FnOnce(&mut Source)) -> Source {
    let mut src = Source::default();
    f(&mut src);
    src
}

#[test]
fn table_of_fields_and_combinations() {
    let allow = |rules| pol("allow", spec(Action::Allow, rules));
    let deny = |rules| pol("deny", spec(Action::Deny, rules));
    let allowed = |d: &Decision| matches!(d, Decision::Allow(_));
    let cases: Vec<(&str, Vec<Compiled>, Facts<'static>, bool)> = vec![
        ("no policies: allow", vec![], facts(A, "10.0.0.1", 80), true),
        ("ALLOW with no rules allows nothing", vec![allow(vec![])], facts(A, "10.0.0.1", 80), false),
        ("DENY with no rules denies nothing", vec![deny(vec![])], facts(A, "10.0.0.1", 80), true),
        ("empty rule matches all", vec![allow(vec![Rule::default()])], facts(None, "10.0.0.1", 80), true),
        (
            "principal exact",
            vec![allow(vec![from(s(|s| s.principals = vec!["cluster.local/ns/default/sa/a".into()]))])],
            facts(A, "10.0.0.1", 80),
            true,
        ),
        (
            "principal with scheme",
            vec![allow(vec![from(s(|s| s.principals = vec!["spiffe://cluster.local/ns/default/sa/a".into()]))])],
            facts(A, "10.0.0.1", 80),
            true,
        ),
        (
            "principal other",
            vec![allow(vec![from(s(|s| s.principals = vec!["cluster.local/ns/default/sa/a".into()]))])],
            facts(B, "10.0.0.1", 80),
            false,
        ),
        (
            "principal prefix",
            vec![allow(vec![from(s(|s| s.principals = vec!["cluster.local/ns/default/*".into()]))])],
            facts(A, "10.0.0.1", 80),
            true,
        ),
        (
            "principal suffix",
            vec![allow(vec![from(s(|s| s.principals = vec!["*/sa/b".into()]))])],
            facts(B, "10.0.0.1", 80),
            true,
        ),
        (
            "principal any, plaintext",
            vec![allow(vec![from(s(|s| s.principals = vec!["*".into()]))])],
            facts(None, "10.0.0.1", 80),
            false,
        ),
        (
            "principal any, mTLS",
            vec![allow(vec![from(s(|s| s.principals = vec!["*".into()]))])],
            facts(A, "10.0.0.1", 80),
            true,
        ),
        (
            "dotted SA is literal",
            vec![allow(vec![from(s(|s| s.principals = vec!["cluster.local/ns/default/sa/my.sa".into()]))])],
            facts(Some("spiffe://cluster.local/ns/default/sa/myxsa"), "10.0.0.1", 80),
            false,
        ),
        (
            "dotted SA matches itself",
            vec![allow(vec![from(s(|s| s.principals = vec!["cluster.local/ns/default/sa/my.sa".into()]))])],
            facts(DOTTED, "10.0.0.1", 80),
            true,
        ),
        (
            "notPrincipals excludes",
            vec![allow(vec![from(s(|s| s.not_principals = vec!["cluster.local/ns/default/sa/a".into()]))])],
            facts(A, "10.0.0.1", 80),
            false,
        ),
        (
            "notPrincipals lets others",
            vec![allow(vec![from(s(|s| s.not_principals = vec!["cluster.local/ns/default/sa/a".into()]))])],
            facts(B, "10.0.0.1", 80),
            true,
        ),
        (
            "namespaces",
            vec![allow(vec![from(s(|s| s.namespaces = vec!["other".into()]))])],
            facts(B, "10.0.0.1", 80),
            true,
        ),
        (
            "namespaces miss",
            vec![allow(vec![from(s(|s| s.namespaces = vec!["other".into()]))])],
            facts(A, "10.0.0.1", 80),
            false,
        ),
        (
            "namespaces need mTLS",
            vec![allow(vec![from(s(|s| s.namespaces = vec!["*".into()]))])],
            facts(None, "10.0.0.1", 80),
            false,
        ),
        (
            "notNamespaces",
            vec![allow(vec![from(s(|s| s.not_namespaces = vec!["other".into()]))])],
            facts(B, "10.0.0.1", 80),
            false,
        ),
        (
            "ipBlocks in",
            vec![allow(vec![from(s(|s| s.ip_blocks = vec!["10.0.0.0/8".into()]))])],
            facts(None, "10.1.2.3", 80),
            true,
        ),
        (
            "ipBlocks out",
            vec![allow(vec![from(s(|s| s.ip_blocks = vec!["10.0.0.0/8".into()]))])],
            facts(None, "192.0.2.1", 80),
            false,
        ),
        (
            "ipBlocks single address",
            vec![allow(vec![from(s(|s| s.ip_blocks = vec!["10.0.0.7".into()]))])],
            facts(None, "10.0.0.7", 80),
            true,
        ),
        (
            "ipBlocks v6",
            vec![allow(vec![from(s(|s| s.ip_blocks = vec!["fd00::/8".into()]))])],
            facts(None, "fd00::1", 80),
            true,
        ),
        (
            "notIpBlocks",
            vec![allow(vec![from(s(|s| s.not_ip_blocks = vec!["10.0.0.0/24".into()]))])],
            facts(None, "10.0.0.9", 80),
            false,
        ),
        ("ports", vec![allow(vec![ports(&["8080"])])], facts(A, "10.0.0.1", 8080), true),
        ("ports miss", vec![allow(vec![ports(&["8080"])])], facts(A, "10.0.0.1", 9090), false),
        (
            "notPorts",
            vec![allow(vec![Rule {
                from: vec![],
                to: vec![To { operation: Operation { ports: vec![], not_ports: vec!["22".into()] } }],
            }])],
            facts(A, "10.0.0.1", 22),
            false,
        ),
        (
            "from AND to",
            vec![allow(vec![Rule {
                from: vec![From { source: s(|s| s.namespaces = vec!["default".into()]) }],
                to: vec![To { operation: Operation { ports: vec!["80".into()], not_ports: vec![] } }],
            }])],
            facts(A, "10.0.0.1", 81),
            false,
        ),
        (
            "fields within a source AND",
            vec![allow(vec![from(s(|s| {
                s.namespaces = vec!["default".into()];
                s.ip_blocks = vec!["192.0.2.0/24".into()]
            }))])],
            facts(A, "10.0.0.1", 80),
            false,
        ),
        ("rules OR", vec![allow(vec![ports(&["1"]), ports(&["80"])])], facts(A, "10.0.0.1", 80), true),
        (
            "DENY beats ALLOW",
            vec![allow(vec![Rule::default()]), deny(vec![from(s(|s| s.principals = vec!["*".into()]))])],
            facts(A, "10.0.0.1", 80),
            false,
        ),
        (
            "DENY not matching leaves ALLOW",
            vec![allow(vec![Rule::default()]), deny(vec![ports(&["22"])])],
            facts(A, "10.0.0.1", 80),
            true,
        ),
        (
            "DENY notPrincipals catches plaintext",
            vec![deny(vec![from(s(|s| s.not_principals = vec!["*".into()]))])],
            facts(None, "10.0.0.1", 80),
            false,
        ),
    ];
    for (name, policies, f, want) in cases {
        assert_eq!(allowed(&decide(policies, f)), want, "{name}");
    }
}

#[test]
fn reasons_audit_and_dry_run() {
    let deny = pol("d", spec(Action::Deny, vec![ports(&["22"])]));
    assert_eq!(
        decide(vec![deny], facts(A, "10.0.0.1", 22)),
        Decision::Deny(DenyReason::DenyPolicy("default/d".into()))
    );
    let allow = pol("a", spec(Action::Allow, vec![ports(&["80"])]));
    assert_eq!(decide(vec![allow.clone()], facts(A, "10.0.0.1", 81)), Decision::Deny(DenyReason::NoAllowMatch));
    assert_eq!(
        decide(vec![allow], facts(A, "10.0.0.1", 80)),
        Decision::Allow(AllowReason::AllowPolicy("default/a".into()))
    );

    let audit = pol("audit", spec(Action::Audit, vec![Rule::default()]));
    let mut dry = spec(Action::Deny, vec![Rule::default()]);
    dry.dry_run = true;
    let dry = pol("dry", dry);
    let idx = PolicyIndex::new("sockmesh-system", vec![audit, dry]);
    let v = authorize(&facts(A, "10.0.0.1", 80), &idx.for_workload("default", &Default::default()));
    assert_eq!(v.decision, Decision::Allow(AllowReason::NoAllowPolicies), "AUDIT and dry-run never decide");
    assert_eq!(v.audited, vec!["default/audit".to_string()]);
    assert_eq!(v.dry_run, vec![("default/dry".to_string(), Action::Deny, true)]);
}

#[test]
fn selection_by_namespace_labels_and_root_namespace() {
    let mut sel = spec(Action::Deny, vec![Rule::default()]);
    sel.selector = Some(WorkloadSelector {
        match_labels: crate::Labels::from([("app".into(), "web".into()), ("tier".into(), "front".into())]),
    });
    let p = Compiled::compile("default", "sel", &sel).unwrap();
    let mesh_wide = Compiled::compile("sockmesh-system", "all", &spec(Action::Audit, vec![])).unwrap();
    let elsewhere = Compiled::compile("other", "x", &spec(Action::Deny, vec![])).unwrap();
    let idx = PolicyIndex::new("sockmesh-system", vec![p, mesh_wide, elsewhere]);
    let web: crate::Labels =
        BTreeMap::from([("app".to_string(), "web".to_string()), ("tier".to_string(), "front".to_string())]).into();
    assert_eq!(idx.for_workload("default", &web).names(), vec!["default/sel", "sockmesh-system/all"]);
    let partial: crate::Labels = BTreeMap::from([("app".to_string(), "web".to_string())]).into();
    assert_eq!(
        idx.for_workload("default", &partial).names(),
        vec!["sockmesh-system/all"],
        "all selector labels must match"
    );
    // A label change changes which policies select a workload, never who it is.
    assert_eq!(idx.for_workload("other", &web).names(), vec!["other/x", "sockmesh-system/all"]);
}

#[test]
fn invalid_policies_are_refused_whole_with_the_field() {
    let bad = [
        (from(s(|s| s.principals = vec!["a*b".into()])), "rules[0].from[0].source.principals"),
        (from(s(|s| s.ip_blocks = vec!["10.0.0.0/33".into()])), "rules[0].from[0].source.ipBlocks"),
        (from(s(|s| s.not_ip_blocks = vec!["nonsense".into()])), "rules[0].from[0].source.notIpBlocks"),
        (ports(&["http"]), "rules[0].to[0].operation.ports"),
        (ports(&["0"]), "rules[0].to[0].operation.ports"),
    ];
    for (rule, field) in bad {
        let e = Compiled::compile("default", "p", &spec(Action::Allow, vec![Rule::default(), rule]))
            .map(|_| ())
            .unwrap_err();
        assert_eq!(e.field, field.replace("rules[0]", "rules[1]"), "{e}");
    }
}

fn arb_source() -> impl Strategy<Value = Source> {
    let pat = prop_oneof![
        Just("*".to_string()),
        Just("cluster.local/ns/default/*".to_string()),
        Just("cluster.local/ns/default/sa/a".to_string()),
        Just("*/sa/b".to_string())
    ];
    let nss = prop_oneof![Just("default".to_string()), Just("other".to_string()), Just("*".to_string())];
    let ips =
        prop_oneof![Just("10.0.0.0/8".to_string()), Just("10.0.0.1".to_string()), Just("192.0.2.0/24".to_string())];
    (
        proptest::collection::vec(pat.clone(), 0..2),
        proptest::collection::vec(pat, 0..2),
        proptest::collection::vec(nss.clone(), 0..2),
        proptest::collection::vec(nss, 0..2),
        proptest::collection::vec(ips.clone(), 0..2),
        proptest::collection::vec(ips, 0..2),
    )
        .prop_map(|(principals, not_principals, namespaces, not_namespaces, ip_blocks, not_ip_blocks)| Source {
            principals,
            not_principals,
            namespaces,
            not_namespaces,
            ip_blocks,
            not_ip_blocks,
        })
}

fn arb_rule() -> impl Strategy<Value = Rule> {
    let port = prop_oneof![Just("80".to_string()), Just("8080".to_string()), Just("22".to_string())];
    (
        proptest::collection::vec(arb_source(), 0..2),
        proptest::collection::vec(port.clone(), 0..2),
        proptest::collection::vec(port, 0..2),
    )
        .prop_map(|(sources, ports, not_ports)| Rule {
            from: sources.into_iter().map(|source| From { source }).collect(),
            to: if ports.is_empty() && not_ports.is_empty() {
                vec![]
            } else {
                vec![To { operation: Operation { ports, not_ports } }]
            },
        })
}

fn arb_policy() -> impl Strategy<Value = AuthorizationPolicySpec> {
    (
        prop_oneof![Just(Action::Allow), Just(Action::Deny), Just(Action::Audit)],
        proptest::collection::vec(arb_rule(), 0..3),
        any::<bool>(),
    )
        .prop_map(|(action, rules, dry_run)| AuthorizationPolicySpec {
            selector: None,
            action,
            rules,
            dry_run,
            mesh: None,
        })
}

fn arb_facts() -> impl Strategy<Value = (Option<&'static str>, &'static str, u16)> {
    (
        prop_oneof![Just(A), Just(B), Just(None), Just(DOTTED)],
        prop_oneof![Just("10.0.0.1"), Just("192.0.2.9"), Just("10.9.9.9")],
        prop_oneof![Just(80u16), Just(8080), Just(22)],
    )
}

proptest! {
    #[test]
    fn an_unrelated_policy_never_changes_a_decision(ps in proptest::collection::vec(arb_policy(), 0..5), other in arb_policy(), (p, ip, port) in arb_facts()) {
        let compiled: Vec<Compiled> = ps.iter().enumerate().map(|(i, s)| pol(&format!("p{i}"), s.clone())).collect();
        let before = decide(compiled.clone(), facts(p, ip, port));
        // Unrelated: another namespace, or a selector the workload does not match.
        let mut with = compiled.clone();
        with.push(Compiled::compile("elsewhere", "u1", &other).unwrap());
        let mut selected = other.clone();
        selected.selector = Some(WorkloadSelector { match_labels: crate::Labels::from([("app".into(), "db".into())]) });
        with.push(Compiled::compile("default", "u2", &selected).unwrap());
        prop_assert_eq!(decide(with, facts(p, ip, port)), before);
    }

    #[test]
    fn a_matching_deny_always_wins(ps in proptest::collection::vec(arb_policy(), 0..5), (p, ip, port) in arb_facts()) {
        let mut compiled: Vec<Compiled> = ps.iter().enumerate().map(|(i, s)| pol(&format!("p{i}"), s.clone())).collect();
        compiled.push(pol("zz-deny", spec(Action::Deny, vec![Rule::default()])));
        let d = decide(compiled, facts(p, ip, port));
        prop_assert!(matches!(d, Decision::Deny(DenyReason::DenyPolicy(_))), "{:?}", d);
    }

    #[test]
    fn dry_run_and_audit_never_decide(ps in proptest::collection::vec(arb_policy(), 0..5), (p, ip, port) in arb_facts()) {
        let enforced: Vec<Compiled> = ps.iter().enumerate().filter(|(_, s)| !s.dry_run && s.action != Action::Audit).map(|(i, s)| pol(&format!("p{i}"), s.clone())).collect();
        let all: Vec<Compiled> = ps.iter().enumerate().map(|(i, s)| pol(&format!("p{i}"), s.clone())).collect();
        prop_assert_eq!(decide(all, facts(p, ip, port)), decide(enforced, facts(p, ip, port)));
    }
}

/// A root-namespace policy is its mesh's: without `mesh` the default mesh's, with it that mesh's
/// only; a namespace's policy applies to its workloads whatever their mesh, unless it names
/// another (then it selects none). One mesh's mesh-wide DENY never reaches another mesh.
#[test]
fn mesh_wide_policies_stay_in_their_mesh() {
    let deny_all = |mesh: Option<&str>| AuthorizationPolicySpec {
        mesh: mesh.map(str::to_owned),
        ..spec(Action::Deny, vec![Rule { from: vec![], to: vec![] }])
    };
    let idx = PolicyIndex::new(
        "sockmesh-system",
        [
            Compiled::compile("sockmesh-system", "default-wide", &deny_all(None)).unwrap(),
            Compiled::compile("sockmesh-system", "a-wide", &deny_all(Some("a"))).unwrap(),
            Compiled::compile("team-a", "local", &deny_all(None)).unwrap(),
            Compiled::compile("team-a", "for-b", &deny_all(Some("b"))).unwrap(),
        ],
    );
    let names = |mesh: &str, ns: &str| idx.for_workload_in(mesh, ns, &Default::default()).names();
    assert_eq!(names("default", "prod"), ["sockmesh-system/default-wide"]);
    let mut a = names("a", "team-a");
    a.sort();
    assert_eq!(a, ["sockmesh-system/a-wide", "team-a/local"]);
    assert!(names("b", "team-b").is_empty(), "{:?}", names("b", "team-b"));
    let e = Compiled::compile("x", "y", &deny_all(Some("Not A Mesh"))).unwrap_err();
    assert!(e.to_string().contains("mesh"), "{e}");
}
