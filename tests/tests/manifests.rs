//! The Kubernetes manifests in deploy/, validated offline: rendered with `kubectl kustomize`
//! and checked by `kubernetes-validate --strict` against a pinned Kubernetes version (both
//! installed by `cargo xtask setup`). Whether the binaries' flags agree with them is checked by
//! the binaries' own unit tests, which parse the same files.
#![cfg(feature = "privileged")]

use std::process::Command;

/// The Kubernetes version the manifests are validated against (xtask pins the validator).
const KUBERNETES_VERSION: &str = "1.31.0";

fn render() -> String {
    let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let out = Command::new("kubectl").arg("kustomize").arg(&deploy).output().expect("kubectl (cargo xtask setup)");
    assert!(out.status.success(), "kubectl kustomize: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn the_rendered_manifests_pass_strict_validation() {
    let rendered = render();
    let file = std::env::temp_dir().join(format!("sockmesh-rendered-{}.yaml", std::process::id()));
    std::fs::write(&file, &rendered).unwrap();
    let out = Command::new("kubernetes-validate")
        .args(["--strict", "--kubernetes-version", KUBERNETES_VERSION])
        .arg(&file)
        .output()
        .expect("kubernetes-validate (cargo xtask setup)");
    let _ = std::fs::remove_file(&file);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "kubernetes-validate:\n{text}{}", String::from_utf8_lossy(&out.stderr));
    // Every object was checked, and each kind the install needs is there.
    for kind in [
        "namespace/sockmesh-system",
        "customresourcedefinition/authorizationpolicies.security.sockmesh.io",
        "customresourcedefinition/peerauthentications.security.sockmesh.io",
        "customresourcedefinition/meshes.security.sockmesh.io",
        "deployment/sockmesh-controller",
        "service/sockmesh-controller",
        "daemonset/sockmesh-agent",
        "clusterrole/sockmesh-controller",
        "role/sockmesh-agent",
    ] {
        assert!(text.contains(&format!("passed for resource {kind}")), "{kind} not validated:\n{text}");
    }
    assert!(!text.contains("failed"), "{text}");
}

/// Every namespaced object lands in sockmesh-system, and the images are the ones
/// `cargo xtask image` builds.
#[test]
fn everything_is_in_sockmesh_system_and_uses_the_built_images() {
    use serde::Deserialize;
    let rendered = render();
    for doc in serde_yaml::Deserializer::from_str(&rendered) {
        let v = serde_yaml::Value::deserialize(doc).unwrap();
        let kind = v["kind"].as_str().unwrap();
        let cluster_scoped =
            ["Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"].contains(&kind);
        if !cluster_scoped {
            assert_eq!(v["metadata"]["namespace"], "sockmesh-system", "{kind} {:?}", v["metadata"]["name"]);
        }
        if let Some(containers) = v["spec"]["template"]["spec"]["containers"].as_sequence() {
            for c in containers {
                let image = c["image"].as_str().unwrap();
                let want = format!(
                    "sockmesh/{}:{}",
                    image.trim_start_matches("sockmesh/").split(':').next().unwrap(),
                    env!("CARGO_PKG_VERSION")
                );
                assert_eq!(image, want, "{kind}");
            }
        }
    }
}
