//! What the kernel shows: cgroup v2 and bpffs mounts, pinned links, attached programs,
//! listening sockets.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Result;
use serde_json::Value;

use crate::process::run;

pub fn cgroup2_mount() -> Result<PathBuf> {
    mesh_api::host::cgroup2_mount().ok_or_else(|| anyhow::anyhow!("no cgroup v2 mount in /proc/self/mountinfo"))
}

pub fn is_bpffs(p: &Path) -> bool {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and out-pointer.
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == 0xcafe4a11 }
}

/// Links pinned under a node's bpffs dir, by pin name -> kernel link id (via bpftool).
pub fn pinned_link_ids(bpffs: &Path) -> Result<std::collections::BTreeMap<String, u64>> {
    let mut m = std::collections::BTreeMap::new();
    let dir = bpffs.join("links");
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return Ok(m);
    };
    for e in rd {
        let e = e?;
        let out = run(Command::new("bpftool").args(["-j", "link", "show", "pinned"]).arg(e.path()))?;
        let v: Value = serde_json::from_slice(&out.stdout)?;
        m.insert(e.file_name().to_string_lossy().into_owned(), v["id"].as_u64().unwrap_or(0));
    }
    Ok(m)
}

/// Program names attached to a cgroup (effective set), via bpftool.
pub fn cgroup_programs(cgroup: &Path) -> Result<Vec<String>> {
    let out = run(Command::new("bpftool").args(["-j", "cgroup", "show"]).arg(cgroup))?;
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Array(vec![]));
    Ok(v.as_array()
        .map(|a| a.iter().filter_map(|p| p["name"].as_str().map(str::to_owned)).collect())
        .unwrap_or_default())
}

/// TCP listening ports inside a netns.
pub fn listening_ports(netns: &str) -> Result<Vec<u16>> {
    let out = run(Command::new("ip").args(["netns", "exec", netns, "ss", "-Htln"]))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3))
        .filter_map(|a| a.rsplit(':').next())
        .filter_map(|p| p.parse().ok())
        .collect())
}

/// The node's meshed-cgroup entries (`SM_WORKLOADS`, pinned under `bpffs`): cgroup id ->
/// (workload id, connection quota; a quota of 0 refuses every connect), via bpftool.
pub fn workload_entries(bpffs: &Path) -> Result<std::collections::BTreeMap<u64, (u32, u32)>> {
    let out = run(Command::new("bpftool").args(["-j", "map", "dump", "pinned"]).arg(bpffs.join("maps/SM_WORKLOADS")))?;
    let v: Value = serde_json::from_slice(&out.stdout)?;
    let bytes = |v: &Value| -> Vec<u8> {
        v.as_array()
            .map(|a| {
                a.iter().filter_map(|b| u8::from_str_radix(b.as_str()?.trim_start_matches("0x"), 16).ok()).collect()
            })
            .unwrap_or_default()
    };
    let mut m = std::collections::BTreeMap::new();
    for e in v.as_array().into_iter().flatten() {
        let (k, val) = (bytes(&e["key"]), bytes(&e["value"]));
        anyhow::ensure!(k.len() == 8 && val.len() == 8, "unexpected SM_WORKLOADS entry {e}");
        let word = |b: &[u8]| u32::from_ne_bytes(b.try_into().unwrap());
        m.insert(u64::from_ne_bytes(k[..8].try_into().unwrap()), (word(&val[..4]), word(&val[4..])));
    }
    Ok(m)
}
