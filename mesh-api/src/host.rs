//! Facts about the host's mounts that both the agent and `meshctl check` need, read from
//! `/proc/<pid>/mountinfo`: where cgroup v2 is, what is mounted at a path, and whether this
//! process sees a `/sys` of its own, as under `ip netns exec`.

use std::path::{Path, PathBuf};

/// What to do instead of `ip netns exec`, for every message that detects it.
pub const USE_NSENTER: &str = "this process has a mount namespace of its own with /sys mounted afresh, as `ip netns exec` does, which hides the host's cgroup v2 and bpffs mounts; enter only the network namespace instead: `nsenter --net=/run/netns/NAME -- COMMAND`";

/// One line of mountinfo: the mount point and the filesystem type.
fn mounts(mountinfo: &str) -> impl Iterator<Item = (PathBuf, &str)> {
    mountinfo.lines().filter_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        Some((PathBuf::from(left.split_whitespace().nth(4)?), fstype))
    })
}

/// The first cgroup v2 mount point in `mountinfo` (it is /sys/fs/cgroup on unified hosts and
/// /sys/fs/cgroup/unified on hybrid ones: never hard-coded).
pub fn cgroup2_mount_in(mountinfo: &str) -> Option<PathBuf> {
    mounts(mountinfo).find(|(_, t)| *t == "cgroup2").map(|(p, _)| p)
}

/// This process's cgroup v2 mount point.
pub fn cgroup2_mount() -> Option<PathBuf> {
    cgroup2_mount_in(&std::fs::read_to_string("/proc/self/mountinfo").ok()?)
}

/// The filesystem type mounted exactly at `path` (the last mount there wins), if any.
pub fn mounted_at(mountinfo: &str, path: &Path) -> Option<String> {
    mounts(mountinfo).filter(|(p, _)| p == path).last().map(|(_, t)| t.to_owned())
}

/// Whether `own` has a /sys of its own (another sysfs instance than `init`'s, as
/// `ip netns exec` mounts) that lacks a cgroup v2 or bpffs mount `init` (PID 1's view) has.
/// A private mount namespace that merely unmounted bpffs is not this case: there, mounting it
/// is the right advice.
pub fn hides_host_mounts(own: &str, init: &str) -> bool {
    let sys_dev = |mi: &str| -> Option<String> {
        mi.lines().filter_map(|l| l.split_once(" - ")).find_map(|(left, _)| {
            let f: Vec<&str> = left.split_whitespace().collect();
            (f.get(4) == Some(&"/sys")).then(|| f.get(2).map(|d| d.to_string())).flatten()
        })
    };
    if sys_dev(own) == sys_dev(init) {
        return false;
    }
    let has = |mi: &str, ty: &str| mounts(mi).any(|(_, t)| t == ty);
    ["cgroup2", "bpf"].iter().any(|ty| has(init, ty) && !has(own, ty))
}

/// True when this process runs in a mount namespace other than PID 1's whose /sys hides the
/// host's cgroup v2 or bpffs mounts (as under `ip netns exec`).
pub fn sys_remounted() -> bool {
    let ns = |p: &str| std::fs::read_link(p).ok();
    let (own, init) = (ns("/proc/self/ns/mnt"), ns("/proc/1/ns/mnt"));
    if own.is_none() || own == init {
        return false;
    }
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    hides_host_mounts(&read("/proc/self/mountinfo"), &read("/proc/1/mountinfo"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: &str = "22 1 0:21 / /sys rw shared:7 - sysfs sysfs rw\n\
                        35 25 0:30 / /sys/fs/cgroup rw shared:9 - tmpfs tmpfs rw\n\
                        36 35 0:31 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw\n\
                        40 25 0:40 / /sys/fs/bpf rw shared:12 - bpf bpf rw\n";
    const NETNS_EXEC: &str = "300 200 0:60 / /sys rw - sysfs sysfs rw\n";

    #[test]
    fn finds_cgroup2_in_a_hybrid_mountinfo_and_what_is_mounted_where() {
        assert_eq!(cgroup2_mount_in(HOST), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        assert_eq!(cgroup2_mount_in("35 25 0:30 / /x rw - tmpfs tmpfs rw\n"), None);
        assert_eq!(mounted_at(HOST, Path::new("/sys/fs/bpf")).as_deref(), Some("bpf"));
        assert_eq!(mounted_at(HOST, Path::new("/sys/fs/cgroup")).as_deref(), Some("tmpfs"));
        assert_eq!(mounted_at(HOST, Path::new("/sys/fs/bpf/sockmesh")), None);
    }

    #[test]
    fn a_fresh_sys_that_hides_the_hosts_mounts_is_recognised() {
        assert!(hides_host_mounts(NETNS_EXEC, HOST));
        assert!(!hides_host_mounts(HOST, HOST));
        // A host without cgroup v2 and bpffs mounted anywhere has nothing to hide, even under
        // a fresh /sys.
        let bare: String = HOST
            .lines()
            .filter(|l| !l.contains(" - bpf ") && !l.contains(" - cgroup2 "))
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(!hides_host_mounts(NETNS_EXEC, &bare));
        // Nor is a private mount namespace that unmounted bpffs under the same /sys.
        let unmounted: String = HOST.lines().filter(|l| !l.contains(" - bpf ")).map(|l| format!("{l}\n")).collect();
        assert!(!hides_host_mounts(&unmounted, HOST));
    }
}

/// The mount that holds `path`: its mount point, filesystem type and mount-root field (the
/// deepest mount point that is `path` or above it; the last such mount wins).
fn mount_of<'a>(mountinfo: &'a str, path: &Path) -> Option<(PathBuf, &'a str)> {
    mounts(mountinfo).filter(|(p, _)| path.starts_with(p)).max_by_key(|(p, _)| p.components().count())
}

/// What is wrong with the mounts a Kubernetes node's agent works on (each names the mount to
/// fix and how), from this process's mountinfo: the cgroup root must be the host's cgroup v2
/// tree at its root (not cgroup v1 or a hybrid host's v1 side, not a container's own cgroup
/// namespace), and the bpffs directory must be on bpffs. Whether that bpffs is the host's is
/// [`same_filesystem`]'s question.
pub fn node_mount_problems(mountinfo: &str, cgroup_root: &Path, bpffs: &Path) -> Vec<String> {
    let mut out = Vec::new();
    match mount_of(mountinfo, cgroup_root) {
        Some((_, "cgroup2")) => {
            // The root of a cgroup v2 hierarchy has no cgroup.type; every cgroup below it (a
            // container's cgroup namespace root included) has one. A node that is itself a
            // container (kind) shows its own cgroup as the root, and the kubelet's tree is below
            // it: that is the node's root.
            if cgroup_root.join("cgroup.type").exists() && !has_kubepods(cgroup_root, 3) {
                out.push(format!(
                    "{} is a cgroup below the host's cgroup v2 root (a container's own cgroup namespace shows its cgroup as the root): mount the host's cgroup v2 root there (hostPath /sys/fs/cgroup; /sys/fs/cgroup/unified on a hybrid host)",
                    cgroup_root.display()
                ));
            }
        }
        Some((p, fstype @ ("tmpfs" | "cgroup"))) => out.push(format!(
            "{} is a cgroup v1 tree ({fstype} at {}): the host runs cgroup v1, or hybrid. sockmesh needs cgroup v2: on a hybrid host mount /sys/fs/cgroup/unified there (hostPath); a v1-only host must boot with systemd.unified_cgroup_hierarchy=1",
            cgroup_root.display(),
            p.display()
        )),
        Some((p, fstype)) => out.push(format!(
            "{} is on {fstype} (mounted at {}), not cgroup v2: mount the host's /sys/fs/cgroup there (hostPath)",
            cgroup_root.display(),
            p.display()
        )),
        None => out.push(format!("{} is on no mount this process can see", cgroup_root.display())),
    }
    match mount_of(mountinfo, bpffs) {
        Some((_, "bpf")) => {}
        Some((p, fstype)) => out.push(format!(
            "{} is on {fstype} (mounted at {}), not bpffs: mount the host's /sys/fs/bpf there (hostPath, mountPropagation: HostToContainer); pins anywhere else do not outlive the agent, and the programs would detach with it",
            bpffs.display(),
            p.display()
        )),
        None => out.push(format!("{} is on no mount this process can see", bpffs.display())),
    }
    out
}

/// Whether a `kubepods` tree (either cgroup driver's) is within `depth` levels below `dir`.
fn has_kubepods(dir: &Path, depth: usize) -> bool {
    let Ok(rd) = std::fs::read_dir(dir) else { return false };
    rd.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).any(|e| {
        let n = e.file_name();
        let n = n.to_string_lossy();
        n == "kubepods"
            || (n.starts_with("kube") && n.ends_with("kubepods.slice"))
            || (depth > 1 && has_kubepods(&e.path(), depth - 1))
    })
}

/// Whether two paths are on the same filesystem instance (one superblock: `st_dev`), e.g. a
/// container's /sys/fs/bpf and the host's seen through the host's /proc.
pub fn same_filesystem(a: &Path, b: &Path) -> std::io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(a)?.dev() == std::fs::metadata(b)?.dev())
}

/// The capabilities an agent uses, with why: the DaemonSet adds exactly these (drop ALL),
/// and `mesh-agent preflight --kubelet-pods` refuses to pass without any of them.
pub const AGENT_CAPABILITIES: &[(&str, u32, &str)] = &[
    ("SYS_ADMIN", 21, "setns(2) into each pod's network namespace to make its sockets there; it also covers loading BPF programs and reading kernel memory from them (CAP_BPF, CAP_PERFMON)"),
    ("NET_ADMIN", 12, "attaching the cgroup and sk_lookup network programs"),
    ("SYS_PTRACE", 19, "opening /host/proc/<pid>/ns/net of pods' processes, which run as other users"),
];
// Not CAP_SYS_RESOURCE: the agent raises its open-file limit only up to the hard limit, which
// container runtimes set far above what --max-connections needs (it warns when it is not).

/// The capabilities of [`AGENT_CAPABILITIES`] missing from `status` (the text of
/// /proc/self/status: its CapEff line).
pub fn missing_capabilities(status: &str) -> Vec<&'static str> {
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    AGENT_CAPABILITIES.iter().filter(|(_, bit, _)| eff & (1u64 << bit) == 0).map(|(n, _, _)| *n).collect()
}

#[cfg(test)]
mod node_tests {
    use super::*;

    const HOST: &str = "27 1 254:0 / / rw - ext4 /dev/vda rw\n\
        31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n\
        32 31 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n\
        41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n\
        46 23 0:40 / /sys/fs/bpf rw - bpf bpf rw\n\
        50 27 0:41 / /host/cgroup rw - cgroup2 cgroup2 rw\n\
        51 27 0:40 / /host/bpf rw,relatime master:3 - bpf bpf rw\n";

    #[test]
    fn mounts_a_node_agent_cannot_work_on_are_named_with_the_fix() {
        let dir = std::env::temp_dir().join(format!("sockmesh-host-test-{}", std::process::id()));
        let root = dir.join("root");
        let below = dir.join("below");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&below).unwrap();
        std::fs::write(below.join("cgroup.type"), "domain\n").unwrap();
        // The hierarchy's root, on cgroup v2, and bpffs: nothing to fix.
        let mi = format!(
            "{HOST}60 27 0:38 / {} rw - cgroup2 cgroup2 rw\n61 27 0:40 / {} rw - cgroup2 cgroup2 rw\n",
            root.display(),
            below.display()
        );
        assert!(node_mount_problems(&mi, &root, Path::new("/host/bpf/sockmesh")).is_empty());
        // A cgroup below the root (a container's cgroup namespace).
        let p = node_mount_problems(&mi, &below, Path::new("/sys/fs/bpf"));
        assert!(p.len() == 1 && p[0].contains("below the host's cgroup v2 root") && p[0].contains("hostPath"), "{p:?}");
        // ...unless the kubelet's tree is below it: a node that is a container itself (kind).
        std::fs::create_dir_all(below.join("kubelet.slice/kubelet-kubepods.slice")).unwrap();
        assert!(node_mount_problems(&mi, &below, Path::new("/sys/fs/bpf")).is_empty());
        // A hybrid host's /sys/fs/cgroup (tmpfs of v1 hierarchies), and a v1 hierarchy.
        let p = node_mount_problems(HOST, Path::new("/sys/fs/cgroup"), Path::new("/sys/fs/bpf"));
        assert!(p.len() == 1 && p[0].contains("cgroup v1 tree") && p[0].contains("/sys/fs/cgroup/unified"), "{p:?}");
        let p = node_mount_problems(HOST, Path::new("/sys/fs/cgroup/cpu"), Path::new("/sys/fs/bpf"));
        assert!(p[0].contains("cgroup v1 tree"), "{p:?}");
        // bpffs missing: a plain directory of the root filesystem.
        let p = node_mount_problems(HOST, &root, Path::new("/var/bpf"));
        assert!(
            p.iter().any(|m| m.contains("/var/bpf is on ext4") && m.contains("mount the host's /sys/fs/bpf")),
            "{p:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn missing_capabilities_are_read_from_capeff() {
        let all = "Name:\tx\nCapEff:\t000001ffffffffff\n";
        assert!(missing_capabilities(all).is_empty());
        // SYS_ADMIN (21) and NET_ADMIN (12) only.
        let some = format!("CapEff:\t{:016x}\n", (1u64 << 21) | (1u64 << 12));
        assert_eq!(missing_capabilities(&some), ["SYS_PTRACE"]);
        assert_eq!(missing_capabilities("").len(), AGENT_CAPABILITIES.len());
    }
}
