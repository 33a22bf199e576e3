//! The Kubernetes manifests in deploy/, validated offline: rendered with `kubectl kustomize`
//! and checked by `kubernetes-validate --strict` against a pinned Kubernetes version (both
//! installed by `cargo xtask setup`). Whether the binaries' flags agree with them is checked by
//! the binaries' own unit tests, which parse the same files.
#![cfg(feature = "privileged")]

use std::process::Command;

/// The Kubernetes version the manifests are validated against (xtask pins the validator).
const KUBERNETES_VERSION: &str = "1.31.0";

fn render(dir: &str) -> String {
    let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(dir);
    let out = Command::new("kubectl").arg("kustomize").arg(&deploy).output().expect("kubectl (cargo xtask setup)");
    assert!(out.status.success(), "kubectl kustomize: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// `kubernetes-validate --strict` of `rendered`: its report, every object of which passed.
fn validate(rendered: &str) -> String {
    let file = std::env::temp_dir().join(format!("sockmesh-rendered-{}-{}.yaml", std::process::id(), rendered.len()));
    std::fs::write(&file, rendered).unwrap();
    let out = Command::new("kubernetes-validate")
        .args(["--strict", "--kubernetes-version", KUBERNETES_VERSION])
        .arg(&file)
        .output()
        .expect("kubernetes-validate (cargo xtask setup)");
    let _ = std::fs::remove_file(&file);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "kubernetes-validate:\n{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(!text.contains("failed"), "{text}");
    text
}

#[test]
fn the_rendered_manifests_pass_strict_validation() {
    let text = validate(&render("deploy"));
    // Every object was checked, and each kind the install needs is there.
    for kind in [
        "namespace/sockmesh-system",
        "customresourcedefinition/authorizationpolicies.security.sockmesh.io",
        "customresourcedefinition/peerauthentications.security.sockmesh.io",
        "customresourcedefinition/meshes.security.sockmesh.io",
        "deployment/sockmesh-controller",
        "service/sockmesh-controller",
        "daemonset/sockmesh-agent",
        "poddisruptionbudget/sockmesh-controller",
        "clusterrole/sockmesh-controller",
        "role/sockmesh-agent",
    ] {
        assert!(text.contains(&format!("passed for resource {kind}")), "{kind} not validated:\n{text}");
    }
}

/// A zone's install (examples/zone-east: the base with the deploy/zone component) renders and
/// passes the same validation, with the gateway, its Services and the controller's zone flags.
#[test]
fn a_zones_install_renders_and_passes_strict_validation() {
    let rendered = render("examples/zone-east");
    let text = validate(&rendered);
    for kind in [
        "deployment/sockmesh-gateway",
        "service/sockmesh-gateway",
        "service/sockmesh-controller-zones",
        "serviceaccount/sockmesh-gateway",
        "poddisruptionbudget/sockmesh-gateway",
        "deployment/sockmesh-controller",
        "daemonset/sockmesh-agent",
    ] {
        assert!(text.contains(&format!("passed for resource {kind}")), "{kind} not validated:\n{text}");
    }
    for flag in ["--zone=east", "--zone-gateway=", "--zone-peer=", "--import-cidr=", "--ca-chain=", "- gateway\n"] {
        assert!(rendered.contains(flag), "{flag} is not in the rendered zone install");
    }
    in_sockmesh_system_with_the_built_images(&rendered);
}

/// Every namespaced object lands in sockmesh-system, and the images are the ones
/// `cargo xtask image` builds.
#[test]
fn everything_is_in_sockmesh_system_and_uses_the_built_images() {
    in_sockmesh_system_with_the_built_images(&render("deploy"));
}

fn in_sockmesh_system_with_the_built_images(rendered: &str) {
    use serde::Deserialize;
    for doc in serde_yaml::Deserializer::from_str(rendered) {
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

/// README's "Install on Kubernetes" names the objects the manifests use (the CA Secret, the
/// trust bundle ConfigMap and its key), and its `mesh-controller ca init` makes the files the
/// Secret is created from.
#[test]
fn the_install_steps_match_the_manifests() {
    use serde::Deserialize;
    let readme =
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md")).unwrap();
    let section = readme
        .split("## Install on Kubernetes")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("README has the section");
    let rendered = render("deploy");
    let docs: Vec<serde_yaml::Value> =
        serde_yaml::Deserializer::from_str(&rendered).map(|d| serde_yaml::Value::deserialize(d).unwrap()).collect();
    let volume = |kind: &str, name: &str| -> serde_yaml::Value {
        let d = docs.iter().find(|d| d["kind"] == kind).unwrap();
        d["spec"]["template"]["spec"]["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .unwrap()
            .clone()
    };
    let secret = volume("Deployment", "ca")["secret"]["secretName"].as_str().unwrap().to_owned();
    assert!(
        section.contains(&format!("create secret tls {secret} --cert=sockmesh-ca/ca.pem --key=sockmesh-ca/ca-key.pem")),
        "{section}"
    );
    let cm = volume("DaemonSet", "trust")["configMap"]["name"].as_str().unwrap().to_owned();
    let ds = docs.iter().find(|d| d["kind"] == "DaemonSet").unwrap();
    let args: Vec<&str> = ds["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let bundle = args.iter().find_map(|a| a.strip_prefix("--trust-bundle=")).unwrap();
    let key = std::path::Path::new(bundle).file_name().unwrap().to_str().unwrap();
    assert!(section.contains(&format!("create configmap {cm} --from-file={key}=sockmesh-ca/ca.pem")), "{section}");
    assert!(section.contains("mesh-controller ca init --out ./sockmesh-ca"));
    let dir = std::env::temp_dir().join(format!("sockmesh-ca-init-{}", std::process::id()));
    let out = Command::new(tests::process::bin("mesh-controller"))
        .args(["ca", "init", "--out"])
        .arg(dir.join("sockmesh-ca"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(dir.join("sockmesh-ca/ca.pem").exists() && dir.join("sockmesh-ca/ca-key.pem").exists());
    let _ = std::fs::remove_dir_all(&dir);
}
