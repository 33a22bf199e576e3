//! The agent's modules in layers: each may use only the modules listed before it. Checked here
//! by reading the sources, so that an import cycle (or a proxy reaching for the composition
//! root) fails a test instead of creeping back in.

/// Bottom first. ARCHITECTURE.md's module table is in this order.
const LAYERS: &[&str] = &[
    "kubeapi",
    "config",
    "pods",
    "netns",
    "transparent",
    "sockdiag",
    "state",
    "balance",
    "outcome",
    "metrics",
    "gateway_health",
    "limits",
    "ebpf",
    "connections",
    "identity",
    "inputs",
    "hbone",
    "proxy",
    "registration",
    "census",
    "config_watch",
    "admin",
    "api",
    "handover",
    "app",
    "gateway",
];

/// The top-level modules a source file names with `crate::<module>`.
fn uses(source: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    let mut rest = source;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        if !name.is_empty() {
            out.insert(name);
        }
    }
    out
}

#[test]
fn every_module_uses_only_the_layers_below_it() {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut checked = 0;
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = e.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let rel = path.strip_prefix(&src).unwrap();
            let top = rel.iter().next().unwrap().to_string_lossy().trim_end_matches(".rs").to_owned();
            if top == "main" || top == "layers" {
                continue;
            }
            let level = LAYERS.iter().position(|l| *l == top).unwrap_or_else(|| {
                panic!("module {top} ({}) is not in LAYERS: place it in the layering", rel.display())
            });
            let text = std::fs::read_to_string(&path).unwrap();
            for used in uses(&text) {
                if used == top {
                    continue;
                }
                let at = LAYERS.iter().position(|l| *l == used).unwrap_or_else(|| panic!("{used} is not a module"));
                assert!(at < level, "{} uses crate::{used}, a layer at or above {top}", rel.display());
            }
            checked += 1;
        }
    }
    assert!(checked > 20, "only {checked} files checked");
}

#[test]
fn uses_finds_the_modules_named() {
    let u = uses("use crate::state::Snapshot;\nfn f() { crate::netns::reset(x) }");
    assert_eq!(u.into_iter().collect::<Vec<_>>(), ["netns", "state"]);
}
