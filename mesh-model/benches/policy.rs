//! Policy decision cost with 10 policies vs 10,000 policies and 100,000 workloads. What the
//! agent does per connection: find the policies selecting the destination workload (index),
//! then decide. The evaluated workload is selected by the same three policies in both
//! clusters, so the ratio shows what the size of the cluster costs. Prints a markdown table
//! (median of 9 runs, and the spread).

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Instant;

use mesh_model::authz::{authorize, Compiled, Facts, PolicyIndex};
use mesh_model::policy::{Action, AuthorizationPolicySpec, From, Operation, Rule, Source, To, WorkloadSelector};

fn policy(ns: &str, name: &str, app: Option<&str>, action: Action, principal: &str, port: &str) -> Compiled {
    let spec = AuthorizationPolicySpec {
        selector: app
            .map(|a| WorkloadSelector { match_labels: mesh_model::Labels::from([("app".to_string(), a.to_string())]) }),
        action,
        rules: vec![Rule {
            from: vec![From { source: Source { principals: vec![principal.to_string()], ..Default::default() } }],
            to: vec![To { operation: Operation { ports: vec![port.to_string()], not_ports: vec![] } }],
        }],
        dry_run: false,
        mesh: None,
    };
    Compiled::compile(ns, name, &spec).unwrap()
}

/// `n_policies` policies over `n_workloads / 100` namespaces; the target (ns-0, app-0) is
/// selected by exactly three of them.
fn cluster(n_policies: usize, n_workloads: usize) -> PolicyIndex {
    let namespaces = (n_workloads / 100).max(1);
    let mut ps = vec![
        policy("ns-0", "deny-x", Some("app-0"), Action::Deny, "cluster.local/ns/evil/*", "8080"),
        policy("ns-0", "allow-a", Some("app-0"), Action::Allow, "cluster.local/ns/ns-1/sa/*", "8080"),
        policy("ns-0", "allow-b", Some("app-0"), Action::Allow, "cluster.local/ns/ns-2/sa/web", "9090"),
    ];
    for i in 3..n_policies {
        // Elsewhere: other namespaces, or other apps of ns-0.
        let ns = format!("ns-{}", 1 + i % namespaces.max(2));
        let app = format!("app-{}", 1 + i % 100);
        ps.push(policy(
            &ns,
            &format!("p-{i}"),
            Some(&app),
            if i % 3 == 0 { Action::Deny } else { Action::Allow },
            "cluster.local/ns/x/sa/*",
            "80",
        ));
    }
    PolicyIndex::new("sockmesh-system", ps)
}

fn measure(idx: &PolicyIndex) -> (f64, f64, f64) {
    let labels: mesh_model::Labels =
        BTreeMap::from([("app".to_string(), "app-0".to_string()), ("version".to_string(), "v1".to_string())]).into();
    let facts = [
        Facts {
            principal: Some("spiffe://cluster.local/ns/ns-1/sa/api"),
            source_ip: "10.0.0.1".parse().unwrap(),
            dst_port: 8080,
        },
        Facts {
            principal: Some("spiffe://cluster.local/ns/evil/sa/x"),
            source_ip: "10.0.0.2".parse().unwrap(),
            dst_port: 8080,
        },
        Facts { principal: None, source_ip: "10.0.0.3".parse().unwrap(), dst_port: 8080 },
    ];
    const N: usize = 200_000;
    let mut runs = Vec::new();
    for _ in 0..9 {
        let t = Instant::now();
        for i in 0..N {
            let p = idx.for_workload(black_box("ns-0"), black_box(&labels));
            black_box(authorize(&facts[i % 3], &p));
        }
        runs.push(t.elapsed().as_nanos() as f64 / N as f64);
    }
    runs.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (runs[4], runs[0], runs[8])
}

fn main() {
    let small = cluster(10, 100);
    let large = cluster(10_000, 100_000);
    // Warm up both.
    measure(&small);
    let (s, s_lo, s_hi) = measure(&small);
    let (l, l_lo, l_hi) = measure(&large);
    println!("| cluster | ns/decision (median of 9) | min | max |");
    println!("|---|---|---|---|");
    println!("| 10 policies, 100 workloads | {s:.0} | {s_lo:.0} | {s_hi:.0} |");
    println!("| 10,000 policies, 100,000 workloads | {l:.0} | {l_lo:.0} | {l_hi:.0} |");
    println!();
    println!("ratio large/small: {:.2}x (target: within 2x)", l / s);
}
