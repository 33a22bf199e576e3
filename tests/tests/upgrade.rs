//! Upgrades on the real kernel, real binaries: an agent that meets pins of another map layout
//! refuses them and changes nothing (the programs stay attached, fail closed), and two
//! controllers never share one state directory.
#![cfg(feature = "privileged")]

use std::path::{Path, PathBuf};
use std::process::Command;

use tests::*;

const APP_PORT: u16 = 8080;

/// The node's layout record (`maps/SM_LAYOUT`).
fn record(bpffs: &Path) -> PathBuf {
    bpffs.join("maps/SM_LAYOUT")
}

/// The version the layout record names, via bpftool.
fn recorded_layout(bpffs: &Path) -> anyhow::Result<u32> {
    let out = run(Command::new("bpftool")
        .args(["-j", "map", "lookup", "pinned"])
        .arg(record(bpffs))
        .args(["key", "0", "0", "0", "0"]))?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let bytes: Vec<u8> = v["value"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|b| u8::from_str_radix(b.as_str()?.trim_start_matches("0x"), 16).ok())
        .collect();
    anyhow::ensure!(bytes.len() == 4, "unexpected layout record {v}");
    Ok(u32::from_ne_bytes(bytes[..4].try_into()?))
}

/// Overwrites the layout record's version, as an agent of another layout would have left it.
fn set_layout(bpffs: &Path, version: u32) {
    let v = version.to_ne_bytes().map(|b| b.to_string());
    run(Command::new("bpftool")
        .args(["map", "update", "pinned"])
        .arg(record(bpffs))
        .args(["key", "0", "0", "0", "0", "value"])
        .args(&v))
    .unwrap();
}

/// Every map pinned for the node, by pin name -> kernel map id (a map made again would have a
/// new id), via bpftool.
fn pinned_map_ids(bpffs: &Path) -> std::collections::BTreeMap<String, u64> {
    let mut m = std::collections::BTreeMap::new();
    for e in std::fs::read_dir(bpffs.join("maps")).unwrap().flatten() {
        let out = run(Command::new("bpftool").args(["-j", "map", "show", "pinned"]).arg(e.path())).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        m.insert(e.file_name().to_string_lossy().into_owned(), v["id"].as_u64().unwrap_or(0));
    }
    m
}

fn datapath_programs_attached(cgroup: &Path) {
    let progs = cgroup_programs(cgroup).unwrap();
    for p in tests::CGROUP_PROGRAMS {
        assert!(progs.iter().any(|n| n == p), "{p} detached: {progs:?}");
    }
}

/// Pins of another layout version: the agent exits with an error naming both versions and
/// what to do, and touches nothing — the same links with the same programs, the same maps,
/// the record as it was — so the meshed pod stays captured and its connections are refused.
/// An agent of the pins' layout takes them over again; `mesh-agent uninstall` (the upgrade
/// path) removes the record with the rest.
#[test]
fn an_agent_meeting_pins_of_another_layout_refuses_and_leaves_them_attached() {
    let mut m = Topology::two_node_mesh("layout").unwrap();
    let Running { ctl: _ctl, server, mut agent1, agent2: _agent2 } = m.start(APP_PORT).unwrap();
    let Mesh { t, n1, a, b, .. } = m;
    let to = t.addr(b, APP_PORT);
    let node = t.node(n1);
    assert_eq!(t.pod_app(a, &["echo", "--to", &to, "--bytes", "1000"]).unwrap()["ok"], true);
    // The agent recorded its layout beside the maps.
    assert_eq!(recorded_layout(&node.bpffs).unwrap(), 1);

    agent1.stop().unwrap();
    let links = pinned_link_ids(&node.bpffs).unwrap();
    assert_eq!(links.len(), tests::CGROUP_PROGRAMS.len() + 1, "{links:?}"); // + a's sk_lookup
    let maps = pinned_map_ids(&node.bpffs);
    let entries = workload_entries(&node.bpffs).unwrap();
    // An agent of layout 7 ran here.
    set_layout(&node.bpffs, 7);

    let refused = match t.start_agent(n1, &[]) {
        Ok(_) => panic!("the agent took over pins of layout version 7"),
        Err(e) => format!("{e:#}"),
    };
    println!("the agent's refusal: {refused}");
    // A clear error exit (not a crash), naming both versions, saying that the programs stay
    // attached, and what to do.
    assert!(refused.contains("exited with exit status: 1"), "{refused}");
    for want in [
        "have layout version 7".to_owned(),
        "reads layout version 1".to_owned(),
        "The programs stay attached (fail closed)".to_owned(),
        format!("mesh-agent uninstall --bpffs-dir {}", node.bpffs.display()),
    ] {
        assert!(refused.contains(&want), "{want:?} missing from the refusal: {refused}");
    }
    // Nothing was touched: the same links (and programs), the same maps and entries, the
    // record as the other agent left it.
    assert_eq!(pinned_link_ids(&node.bpffs).unwrap(), links, "links were replaced");
    datapath_programs_attached(&node.cgroup);
    assert_eq!(pinned_map_ids(&node.bpffs), maps, "maps were made again or removed");
    assert_eq!(workload_entries(&node.bpffs).unwrap(), entries);
    assert_eq!(recorded_layout(&node.bpffs).unwrap(), 7, "the refusing agent rewrote the record");
    // a is still captured: its connection goes to the agent's port, where nothing listens
    // (refused), and never to b.
    let before = server.accepted().unwrap().len();
    let r = t.pod_app(a, &["echo", "--to", &to, "--bytes", "1000", "--timeout-ms", "1000"]).unwrap();
    assert_eq!((r["ok"].as_bool(), r["stage"].as_str()), (Some(false), Some("connect")), "{r}");
    assert_eq!(r["errno"], libc::ECONNREFUSED, "{r}");
    assert_eq!(server.accepted().unwrap().len(), before, "a meshed pod's connection went around the refusing agent");

    // The pins are of this agent's layout again: it takes them over in place.
    set_layout(&node.bpffs, 1);
    let agent1 = t.start_agent(n1, &[]).unwrap();
    t.wait_ready(n1).unwrap();
    assert_eq!(pinned_link_ids(&node.bpffs).unwrap(), links, "links were replaced");
    let r = t.pod_app(a, &["echo", "--to", &to, "--bytes", "1000"]).unwrap();
    assert_eq!((r["ok"].as_bool(), r["wire_peer"].as_str()), (Some(true), Some("127.0.0.1:15001")), "{r}");
    drop(agent1);

    // The upgrade path across a layout change: uninstall removes every pin, the record too.
    let out = Command::new(bin("mesh-agent")).args(["uninstall", "--bpffs-dir"]).arg(&node.bpffs).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(!node.bpffs.exists(), "uninstall left {:?}", std::fs::read_dir(&node.bpffs).map(|d| d.count()));
}

/// Pins from before the layout record (an earlier agent's) are version 1: a version-1 agent
/// takes them over in place and records their layout.
#[test]
fn pins_without_a_layout_record_are_taken_over_as_version_1_and_recorded() {
    let mut m = Topology::two_node_mesh("nolayout").unwrap();
    let Running { ctl: _ctl, server: _server, mut agent1, agent2: _agent2 } = m.start(APP_PORT).unwrap();
    let Mesh { t, n1, a, b, .. } = m;
    let node = t.node(n1);
    agent1.stop().unwrap();
    let links = pinned_link_ids(&node.bpffs).unwrap();
    std::fs::remove_file(record(&node.bpffs)).unwrap();
    let mut maps = pinned_map_ids(&node.bpffs);

    let _agent1 = t.start_agent(n1, &[]).unwrap();
    t.wait_ready(n1).unwrap();
    assert_eq!(recorded_layout(&node.bpffs).unwrap(), 1);
    assert_eq!(pinned_link_ids(&node.bpffs).unwrap(), links, "links were replaced");
    // The same maps, and a new record beside them.
    let mut now = pinned_map_ids(&node.bpffs);
    assert!(now.remove("SM_LAYOUT").is_some());
    maps.retain(|k, _| k != "SM_LAYOUT");
    assert_eq!(now, maps, "the pinned maps were made again");
    let r = t.pod_app(a, &["echo", "--to", &t.addr(b, APP_PORT), "--bytes", "1000"]).unwrap();
    assert_eq!((r["ok"].as_bool(), r["wire_peer"].as_str()), (Some(true), Some("127.0.0.1:15001")), "{r}");
}

/// Two controllers on one state directory: the second exits non-zero naming the directory,
/// the first's PID and what to do; the first keeps its state and keeps serving (an agent that
/// starts afterwards gets its certificates from it); once it is gone, a controller starts on
/// the directory again with the same CA.
#[test]
fn a_second_controller_on_the_same_state_dir_exits_and_the_first_keeps_serving() {
    let (mut t, n1, a, b) = Topology::one_node_mesh("ctllock").unwrap();
    let mut first = t.start_controller(&[]).unwrap();
    let dir = t.controller_dir();
    let state = ["root.pem", "root-key.pem", "trust-bundle.pem", "controller.lock"];
    let read_state = || -> Vec<(String, Vec<u8>, std::time::SystemTime)> {
        state
            .iter()
            .map(|f| {
                let p = dir.join(f);
                (f.to_string(), std::fs::read(&p).unwrap(), std::fs::metadata(&p).unwrap().modified().unwrap())
            })
            .collect()
    };
    let before = read_state();
    let pid = first.pid().unwrap();
    assert_eq!(String::from_utf8_lossy(&before[3].1).trim(), pid.to_string());

    let refused = match t.start_controller(&[]) {
        Ok(_) => panic!("a second controller started on {}", dir.display()),
        Err(e) => format!("{e:#}"),
    };
    println!("the second controller's refusal: {refused}");
    assert!(refused.contains("exited with exit status: 1"), "{refused}");
    for want in [
        format!("the state directory {} is in use", dir.display()),
        format!("another mesh-controller (PID {pid})"),
        "one controller per state directory".to_owned(),
        "its own --state-dir".to_owned(),
    ] {
        assert!(refused.contains(&want), "{want:?} missing from: {refused}");
    }
    assert_eq!(read_state(), before, "the second controller changed the state directory");

    // The first still serves: an agent gets its workloads' certificates and carries traffic.
    let _server = t.start_server(b, APP_PORT).unwrap();
    let agent = t.start_agent(n1, &[]).unwrap();
    t.wait_ready(n1).unwrap();
    let r = t.pod_app(a, &["echo", "--to", &t.addr(b, APP_PORT), "--bytes", "1000"]).unwrap();
    assert_eq!((r["ok"].as_bool(), r["wire_peer"].as_str()), (Some(true), Some("127.0.0.1:15001")), "{r}");
    drop(agent);

    // Its lock goes with it: the next controller starts, with the same CA.
    first.stop();
    let next = t.start_controller(&[]).unwrap();
    assert_eq!(std::fs::read(dir.join("root.pem")).unwrap(), before[0].1);
    assert_eq!(std::fs::read_to_string(dir.join("controller.lock")).unwrap().trim(), next.pid().unwrap().to_string());
}
