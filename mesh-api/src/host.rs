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
