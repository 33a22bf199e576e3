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
