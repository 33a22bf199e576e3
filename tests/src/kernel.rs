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

/// A map a node's agent pinned under its bpffs dir, opened by the test to change what the
/// kernel programs see (to fill a bounded map, say). Raw `bpf(2)`: the tests do not link aya.
pub struct PinnedMap(std::os::fd::OwnedFd);

const BPF_MAP_UPDATE_ELEM: libc::c_int = 2;
const BPF_MAP_DELETE_ELEM: libc::c_int = 3;
const BPF_OBJ_GET: libc::c_int = 7;
/// Adds only a key the map does not hold.
const BPF_NOEXIST: u64 = 1;

impl PinnedMap {
    pub fn open(path: &Path) -> Result<PinnedMap> {
        use std::os::fd::FromRawFd;
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
        // union bpf_attr, BPF_OBJ_GET: the path's address first, the rest zero.
        let mut attr = [0u64; 16];
        attr[0] = c.as_ptr() as u64;
        let fd = bpf(BPF_OBJ_GET, &mut attr)
            .map_err(|e| anyhow::anyhow!("cannot open the pinned map {}: {e}", path.display()))?;
        // SAFETY: a descriptor the kernel just gave us, owned by nothing else.
        Ok(PinnedMap(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }))
    }

    /// Adds `key` with `value` unless the map holds it; false when the map is full.
    pub fn insert(&self, key: &[u8], value: &[u8]) -> Result<bool> {
        match self.elem(BPF_MAP_UPDATE_ELEM, key, Some(value), BPF_NOEXIST) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::E2BIG) => Ok(false),
            Err(e) => Err(anyhow::anyhow!("map update: {e}")),
        }
    }

    pub fn remove(&self, key: &[u8]) -> Result<()> {
        self.elem(BPF_MAP_DELETE_ELEM, key, None, 0).map_err(|e| anyhow::anyhow!("map delete: {e}"))
    }

    /// `key` and `value` must be the map's sizes (the kernel reads that many bytes).
    fn elem(&self, cmd: libc::c_int, key: &[u8], value: Option<&[u8]>, flags: u64) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        // union bpf_attr, the element commands: map_fd (u32, then padding), key, value, flags.
        let mut attr = [0u64; 16];
        attr[0] = self.0.as_raw_fd() as u64;
        attr[1] = key.as_ptr() as u64;
        attr[2] = value.map_or(0, |v| v.as_ptr() as u64);
        attr[3] = flags;
        bpf(cmd, &mut attr).map(|_| ())
    }
}

fn bpf(cmd: libc::c_int, attr: &mut [u64; 16]) -> std::io::Result<i32> {
    // SAFETY: attr is a zero-padded bpf_attr of the size given; the pointers in it are live
    // for the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), std::mem::size_of_val(attr)) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc as i32)
    }
}
