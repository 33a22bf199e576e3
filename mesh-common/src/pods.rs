//! Pod cgroups refused the moment the kubelet makes them (`--kubelet-pods`).
//!
//! The agent keeps the UIDs of the meshed pods the controller gave its node in
//! [`POD_UIDS`]. A program on the kernel's `cgroup_mkdir` tracepoint runs inside the
//! `mkdir(2)` that makes a cgroup, before the call returns and therefore before any process
//! can be moved into it. When the new directory is the pod-level cgroup of one of those UIDs,
//! the program enters it in [`crate::WORKLOADS`] as refused (the same entry a pod that cannot
//! be captured gets). A pod's first connect then fails with `EPERM` until the agent captures
//! it, even when the agent is stopped or slow. A program on `cgroup_rmdir` removes such a
//! refusal when its directory goes.
//!
//! Only a directory made in one of the kubelet's pod parents ([`POD_PARENTS`]: the `kubepods`
//! roots and their QoS levels, which only root may write) is looked at: a user's delegated
//! cgroup named like a pod must not take entries of the node's map.
//!
//! The name test below is the kernel side of `mesh-agent/src/pods.rs`'s `pod_uid_of_dir`,
//! reduced to fixed offsets from the end of the path that the verifier accepts.

/// Pod UID (36 ASCII bytes, lowercase 8-4-4-4-12) -> 1: the meshed pods of this node.
pub const POD_UIDS: &str = "SM_POD_UIDS";

/// cgroup id (u64) -> 1: the directories the kubelet makes pods' cgroups in, kept by the agent.
pub const POD_PARENTS: &str = "SM_POD_PARENTS";
pub const POD_PARENTS_SIZE: u32 = 64;

/// cgroup id (u64) -> pod UID: the cgroups the mkdir program refused, so that the agent finds
/// them by UID (to keep them through its start-up sweep, or to lift the refusal of a pod that
/// left the mesh before the agent took it up) without scanning directories. Removed by the
/// rmdir program, or by the agent when it lifts the refusal. Sized like [`crate::WORKLOADS`].
pub const POD_CGROUPS: &str = "SM_POD_CGROUPS";

/// Per-CPU scratch the mkdir program reads a cgroup's path into, to learn its length.
pub const PATH_SCRATCH: &str = "SM_PATH_BUF";
/// The kernel's longest cgroup path in these tracepoints (`TRACE_CGROUP_PATH_LEN`).
pub const PATH_MAX: usize = 1024;

/// Program names.
pub const PROG_CGROUP_MKDIR: &str = "sm_cgroup_mkdir";
pub const PROG_CGROUP_RMDIR: &str = "sm_cgroup_rmdir";

/// The kernel structure offsets the tracepoint programs need, read by the agent from the
/// kernel's BTF at load time and given to the programs as read-only globals (these names).
/// All zero: the programs do nothing.
pub const OFF_CGROUP_KN: &str = "SM_OFF_CGROUP_KN";
pub const OFF_CGROUP_ROOT: &str = "SM_OFF_CGROUP_ROOT";
pub const OFF_KERNFS_ID: &str = "SM_OFF_KERNFS_ID";
pub const OFF_ROOT_HIERARCHY: &str = "SM_OFF_ROOT_HIERARCHY";
pub const OFF_KERNFS_PARENT: &str = "SM_OFF_KERNFS_PARENT";

/// The end of a cgroup path the mkdir program reads: enough for either driver's pod name.
pub const TAIL: usize = 48;

pub const UID_LEN: usize = 36;

/// The pod UID a cgroup path names, from its last [`TAIL`] bytes: a pod-level directory in
/// either kubelet cgroup driver's naming.
/// - cgroupfs: `.../pod<uid>`;
/// - systemd: `...-pod<uid with '_' for '-'>.slice`.
///
/// The UID must have the shape of one (8-4-4-4-12 lowercase hex).
#[inline(always)]
pub fn pod_uid_of_path_tail(tail: &[u8; TAIL]) -> Option<[u8; UID_LEN]> {
    const SLICE: &[u8; 6] = b".slice";
    let systemd = tail[TAIL - 6] == SLICE[0]
        && tail[TAIL - 5] == SLICE[1]
        && tail[TAIL - 4] == SLICE[2]
        && tail[TAIL - 3] == SLICE[3]
        && tail[TAIL - 2] == SLICE[4]
        && tail[TAIL - 1] == SLICE[5];
    // Where "pod" starts, and the character that must come before it.
    let (at, before, dash) =
        if systemd { (TAIL - 6 - UID_LEN - 3, b'-', b'_') } else { (TAIL - UID_LEN - 3, b'/', b'-') };
    if tail[at - 1] != before || tail[at] != b'p' || tail[at + 1] != b'o' || tail[at + 2] != b'd' {
        return None;
    }
    let mut uid = [0u8; UID_LEN];
    let mut i = 0;
    while i < UID_LEN {
        let c = tail[at + 3 + i];
        let want_dash = i == 8 || i == 13 || i == 18 || i == 23;
        if want_dash {
            if c != dash {
                return None;
            }
            uid[i] = b'-';
        } else if c.is_ascii_digit() || (b'a'..=b'f').contains(&c) {
            uid[i] = c;
        } else {
            return None;
        }
        i += 1;
    }
    Some(uid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tail(path: &str) -> [u8; TAIL] {
        let b = path.as_bytes();
        assert!(b.len() >= TAIL, "{path} is shorter than the tail");
        b[b.len() - TAIL..].try_into().unwrap()
    }

    const UID: &[u8; UID_LEN] = b"5e1f0c2a-7b3d-4e8f-9a01-0000000000ab";

    #[test]
    fn both_drivers_names_give_the_uid() {
        for path in [
            "/kubepods/burstable/pod5e1f0c2a-7b3d-4e8f-9a01-0000000000ab",
            "/kubepods/pod5e1f0c2a-7b3d-4e8f-9a01-0000000000ab",
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod5e1f0c2a_7b3d_4e8f_9a01_0000000000ab.slice",
            "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod5e1f0c2a_7b3d_4e8f_9a01_0000000000ab.slice",
        ] {
            assert_eq!(pod_uid_of_path_tail(&tail(path)).as_ref(), Some(UID), "{path}");
        }
    }

    #[test]
    fn other_names_give_none() {
        for path in [
            // A container's cgroup below the pod's.
            "/kubepods/burstable/pod5e1f0c2a-7b3d-4e8f-9a01-0000000000ab/0123456789abcdef0123456789ab",
            "/kubepods.slice/kubepods-pod5e1f0c2a_7b3d_4e8f_9a01_0000000000ab.slice/cri-containerd-0a.scope",
            // The wrong separator for the driver.
            "/kubepods/burstable/pod5e1f0c2a_7b3d_4e8f_9a01_0000000000ab",
            "/kubepods.slice/kubepods-pod5e1f0c2a-7b3d-4e8f-9a01-0000000000ab.slice",
            // "pod" inside a longer name, upper case, not hex.
            "/kubepods/burstable/xpod5e1f0c2a-7b3d-4e8f-9a01-0000000000ab",
            "/kubepods/burstable/pod5E1F0C2A-7b3d-4e8f-9a01-0000000000ab",
            "/kubepods/burstable/pod5e1f0c2a-7b3d-4e8f-9a01-00000000zzab",
            "/system.slice/docker-0123456789abcdef0123456789abcdef0123.scope",
        ] {
            assert_eq!(pod_uid_of_path_tail(&tail(path)), None, "{path}");
        }
    }
}
