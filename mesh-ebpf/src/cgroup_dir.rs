//! `raw_tracepoint/cgroup_mkdir` and `cgroup_rmdir`: a meshed pod's cgroup is refused inside
//! the mkdir that makes it, so the pod's first connect cannot go out before the agent has
//! captured it (mesh-common's `pods` module says how). Both run only for the cgroup v2
//! hierarchy and do nothing until the agent has given them the kernel's structure offsets.

use aya_ebpf::{
    helpers::{
        bpf_probe_read_kernel, generated::bpf_probe_read_kernel as probe_read,
        generated::bpf_probe_read_kernel_str as probe_read_str,
    },
    macros::raw_tracepoint,
    programs::RawTracePointContext,
};
use mesh_common::{
    pods::{pod_uid_of_path_tail, PATH_MAX, TAIL},
    Counter, WorkloadValue, WORKLOAD_SLOT_REFUSED,
};

use crate::maps::{count, PATH_SCRATCH, POD_CGROUPS, POD_PARENTS, POD_UIDS, WORKLOADS};

// Offsets in the running kernel's structures, set by the agent from its BTF (read-only).
#[unsafe(no_mangle)]
static SM_OFF_CGROUP_KN: u32 = 0;
#[unsafe(no_mangle)]
static SM_OFF_CGROUP_ROOT: u32 = 0;
#[unsafe(no_mangle)]
static SM_OFF_KERNFS_ID: u32 = 0;
#[unsafe(no_mangle)]
static SM_OFF_ROOT_HIERARCHY: u32 = 0;
#[unsafe(no_mangle)]
static SM_OFF_KERNFS_PARENT: u32 = 0;

const BPF_NOEXIST: u64 = 1;

/// `TP_PROTO(struct cgroup *cgrp, const char *path)`.
#[raw_tracepoint(tracepoint = "cgroup_mkdir")]
pub fn sm_cgroup_mkdir(ctx: RawTracePointContext) -> i32 {
    let cgrp: u64 = ctx.arg(0);
    let path: u64 = ctx.arg(1);
    let _ = mkdir(cgrp as *const u8, path as *const u8);
    0
}

#[raw_tracepoint(tracepoint = "cgroup_rmdir")]
pub fn sm_cgroup_rmdir(ctx: RawTracePointContext) -> i32 {
    let cgrp: u64 = ctx.arg(0);
    let _ = rmdir(cgrp as *const u8);
    0
}

#[inline(always)]
fn off(v: &'static u32) -> usize {
    unsafe { core::ptr::read_volatile(v) as usize }
}

#[inline(always)]
fn read_ptr(at: *const u8) -> Option<*const u8> {
    let p: *const u8 = unsafe { bpf_probe_read_kernel(at as *const *const u8) }.ok()?;
    (!p.is_null()).then_some(p)
}

/// The kernfs node of a cgroup of the v2 hierarchy (None for a v1 hierarchy's: their ids are
/// another numbering, and could equal a v2 cgroup's).
#[inline(always)]
fn v2_kn(cgrp: *const u8) -> Option<*const u8> {
    let kn_at = off(&SM_OFF_CGROUP_KN);
    if kn_at == 0 {
        return None;
    }
    let root = read_ptr(cgrp.wrapping_add(off(&SM_OFF_CGROUP_ROOT)))?;
    let hierarchy: i32 =
        unsafe { bpf_probe_read_kernel(root.wrapping_add(off(&SM_OFF_ROOT_HIERARCHY)) as *const i32) }.ok()?;
    // The default (v2) hierarchy is number 0: "0::/..." in /proc/<pid>/cgroup.
    if hierarchy != 0 {
        return None;
    }
    read_ptr(cgrp.wrapping_add(kn_at))
}

/// A cgroup's id: its kernfs node's.
#[inline(always)]
fn kn_id(kn: *const u8) -> Option<u64> {
    unsafe { bpf_probe_read_kernel(kn.wrapping_add(off(&SM_OFF_KERNFS_ID)) as *const u64) }.ok()
}

#[inline(always)]
fn mkdir(cgrp: *const u8, path: *const u8) -> Option<()> {
    let kn = v2_kn(cgrp)?;
    // Made in a directory where the kubelet makes pods' cgroups, or not looked at.
    let parent = read_ptr(kn.wrapping_add(off(&SM_OFF_KERNFS_PARENT)))?;
    unsafe { POD_PARENTS.get(&kn_id(parent)?) }?;
    let id = kn_id(kn)?;
    // The path's length: read whole into scratch (the kernel truncates it at PATH_MAX).
    let scratch = PATH_SCRATCH.get_ptr_mut(0)?;
    let n = unsafe { probe_read_str(scratch.cast(), PATH_MAX as u32, path.cast()) };
    if n <= TAIL as i64 {
        return None;
    }
    let len = (n - 1) as usize;
    let mut tail = [0u8; TAIL];
    let r = unsafe { probe_read(tail.as_mut_ptr().cast(), TAIL as u32, path.wrapping_add(len - TAIL).cast()) };
    if r != 0 {
        return None;
    }
    let uid = pod_uid_of_path_tail(&tail)?;
    unsafe { POD_UIDS.get(&uid) }?;
    // For the agent, which finds the pod's refusal by its UID from here. Recorded before the
    // refusal, so that whoever sees the refusal finds its record; no refusal without one (the
    // agent's own look refuses the pod later).
    if POD_CGROUPS.insert(&id, &uid, 0).is_err() {
        count(Counter::PodMkdirMapFull);
        return None;
    }
    let refused = WorkloadValue { id: WORKLOAD_SLOT_REFUSED, max_conns: 0 };
    // NOEXIST: an entry the agent made is left alone.
    if WORKLOADS.insert(&id, &refused, BPF_NOEXIST).is_ok() {
        count(Counter::PodRefusedAtMkdir);
    } else if unsafe { WORKLOADS.get(&id) }.is_none() {
        count(Counter::PodMkdirMapFull);
        let _ = POD_CGROUPS.remove(&id);
    }
    Some(())
}

#[inline(always)]
fn rmdir(cgrp: *const u8) -> Option<()> {
    let id = kn_id(v2_kn(cgrp)?)?;
    let _ = POD_CGROUPS.remove(&id);
    let v = unsafe { WORKLOADS.get(&id) }?;
    // Only a refusal: a captured workload's entry (and its connection count) is the agent's.
    if v.id == WORKLOAD_SLOT_REFUSED && v.max_conns == 0 {
        let _ = WORKLOADS.remove(&id);
    }
    Some(())
}
