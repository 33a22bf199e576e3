//! Installing by hand on plain hosts: the example a newcomer follows (and the README that quotes
//! it) runs here with the real binaries, the shipped systemd units pass `systemd-analyze
//! verify`, and the tools point the right way when run the obvious wrong way.
#![cfg(feature = "privileged")]

use std::path::{Path, PathBuf};
use std::process::Command;

use tests::*;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn bin_dir() -> PathBuf {
    bin("mesh-agent").parent().expect("the binaries' directory").to_owned()
}

/// The README's by-hand section, run as written: a meshed connection in mutual TLS, a denial,
/// plaintext refused by STRICT and `meshctl check` green on both nodes; and nothing left behind.
#[test]
fn the_by_hand_example_meshes_denies_refuses_plaintext_and_cleans_up() {
    // Short: interface names hold 15 characters.
    let prefix = format!("{PREFIX}x{}-", std::process::id() % 100);
    let out = Command::new(repo().join("examples/local/run.sh"))
        .env("SOCKMESH_BIN", bin_dir())
        .env("SOCKMESH_EXAMPLE_PREFIX", &prefix)
        .env_remove("SOCKMESH_EXAMPLE_KEEP")
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the example failed:\n{text}");
    for want in [
        "ok: meshctl check is green on n1",
        "ok: meshctl check is green on n2",
        "ok: client got HTTP 200 from web",
        "ok: n2's agent saw the client's identity over mutual TLS",
        "ok: intruder got no HTTP answer",
        "ok: plaintext to web got no HTTP answer",
        "example: every check passed",
    ] {
        assert!(text.contains(want), "{want:?} missing:\n{text}");
    }
    // meshctl check's own lines, not only the script's verdict.
    assert!(!text.contains("✗"), "a failed check:\n{text}");
    assert!(text.contains("✓ certificates"), "{text}");
    // The denial is the DENY policy's, as the destination agent logged it.
    assert!(
        text.lines().any(|l| l.starts_with("  n2 log:")
            && l.contains("default/intruder")
            && l.contains("denied by policy default/deny-intruder")),
        "{text}"
    );
    // Its cleanup: no process it started, and no namespace, cgroup or bpffs directory of its
    // prefix is left.
    let survivors: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&prefix) || c.contains("examples/local/config") || c.contains("http.server 8080"))
        .collect();
    assert!(survivors.is_empty(), "processes left running: {survivors:?}");
    let netns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&netns.stdout).contains(&prefix), "namespaces left behind");
    let cg = cgroup2_mount().unwrap();
    for dir in [cg.as_path(), Path::new("/sys/fs/bpf")] {
        let left: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            .map(|e| e.path())
            .collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    }
}

/// Every command the README's by-hand section shows is one the example script runs, so the
/// test above runs the README too.
#[test]
fn the_readmes_commands_are_the_examples() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let script = std::fs::read_to_string(repo().join("examples/local/run.sh")).unwrap();
    let section = readme
        .split("## Running it by hand")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("README has a by-hand section");
    // Whole commands (continuation lines joined, spaces collapsed), each found in the script
    // after the one before it.
    let joined = |text: &str| -> Vec<String> {
        let mut out = Vec::new();
        let mut cur = String::new();
        for l in text.lines() {
            let l = l.trim();
            match l.strip_suffix('\\') {
                Some(part) => cur.push_str(part),
                None => {
                    cur.push_str(l);
                    out.push(cur.split_whitespace().collect::<Vec<_>>().join(" "));
                    cur.clear();
                }
            }
        }
        out
    };
    let script = joined(&script).join("\n");
    let mut blocks = String::new();
    let mut in_block = false;
    for line in section.lines() {
        match line.trim() {
            "```sh" => in_block = true,
            "```" => in_block = false,
            l if in_block && !l.is_empty() && !l.starts_with('#') => blocks.push_str(&format!("{line}\n")),
            _ => {}
        }
    }
    let mut quoted = 0;
    let mut from = 0;
    for cmd in joined(&blocks).into_iter().filter(|c| !c.is_empty()) {
        let Some(at) = script[from..].find(&cmd) else {
            panic!("the README shows a command the example does not run (whole, and in this order):\n  {cmd}");
        };
        from += at + cmd.len();
        quoted += 1;
    }
    assert!(quoted >= 5, "only {quoted} commands found in the README's by-hand section");
}

/// The systemd units in deploy/systemd/ load as systemd would load them: `systemd-analyze
/// verify` against a root holding the system's units and the real binaries where the units
/// expect them. Any warning fails too (a misspelt setting is only a warning to systemd).
#[test]
fn the_systemd_units_verify() {
    let root = std::env::temp_dir().join(format!("sockmesh-units-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let units = root.join("etc/systemd/system");
    std::fs::create_dir_all(&units).unwrap();
    std::fs::create_dir_all(root.join("usr/local/bin")).unwrap();
    std::fs::create_dir_all(root.join("usr/lib/systemd")).unwrap();
    run(Command::new("cp").args(["-a", "/usr/lib/systemd/system"]).arg(root.join("usr/lib/systemd/"))).unwrap();
    for b in ["mesh-agent", "mesh-controller"] {
        std::fs::copy(bin(b), root.join("usr/local/bin").join(b)).unwrap();
    }
    let mut names = Vec::new();
    for e in std::fs::read_dir(repo().join("deploy/systemd")).unwrap().flatten() {
        std::fs::copy(e.path(), units.join(e.file_name())).unwrap();
        names.push(units.join(e.file_name()));
    }
    assert!(names.len() >= 2, "{names:?}");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", root.display()))
        .args(&names)
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // The test itself must be able to fail: a broken setting is reported.
    std::fs::write(
        units.join("sockmesh-broken.service"),
        "[Service]\nExecStart=/usr/local/bin/mesh-agent run\nLimitNOFILE=lots\n",
    )
    .unwrap();
    let broken = Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", root.display()))
        .arg(units.join("sockmesh-broken.service"))
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&root);
    assert!(out.status.success() && text.trim().is_empty(), "systemd-analyze verify:\n{text}");
    assert!(!String::from_utf8_lossy(&broken.stderr).trim().is_empty(), "a broken unit went unnoticed");
}

/// `ip netns exec` remounts /sys, hiding cgroup v2 and bpffs: the agent and `meshctl check`
/// say to use `nsenter --net` instead, and never advise mounting over what is there.
#[test]
fn under_ip_netns_exec_the_agent_and_meshctl_say_to_use_nsenter() {
    let mut t = Topology::new("netnsexec").unwrap();
    let n1 = t.add_node("n1").unwrap();
    let netns = t.node(n1).netns.clone();
    let agent = Command::new("ip")
        .args(["netns", "exec", &netns])
        .arg(bin("mesh-agent"))
        .args(["run", "--node", "n1", "--controller", "https://10.0.0.1:15012"])
        .args(["--trust-bundle", "/nonexistent", "--node-credential-file", "/nonexistent"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&agent.stderr);
    assert!(!agent.status.success(), "{err}");
    assert!(err.contains("mount namespace of its own") && err.contains("nsenter --net="), "{err}");

    let check = Command::new("ip").args(["netns", "exec", &netns]).arg(bin("meshctl")).arg("check").output().unwrap();
    let out = String::from_utf8_lossy(&check.stdout);
    assert!(!check.status.success(), "{out}");
    let cgroup_hint = out.lines().skip_while(|l| !l.contains("cgroup v2")).nth(1).unwrap_or_default();
    assert!(cgroup_hint.contains("mount namespace of its own") && cgroup_hint.contains("nsenter --net="), "{out}");
    assert!(!out.contains("mount -t"), "meshctl advises mounting over a hidden mount:\n{out}");

    // Entered the right way, the same node's mounts are all there.
    let check = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{netns}"))
        .arg("--")
        .arg(bin("meshctl"))
        .arg("check")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&check.stdout);
    assert!(out.contains("✓ cgroup v2") && out.contains("✓ bpffs"), "{out}");
    assert!(!out.contains("mount namespace of its own"), "{out}");
}
