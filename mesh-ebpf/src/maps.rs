//! Every map of the kernel programs. Names, sizes, keys and values come from mesh-common;
//! the agent may resize the maps at load time. All are pinned by name under the node's bpffs
//! directory (P6) so that a restarted agent takes over the same maps.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, PerCpuArray, SockHash},
};
use mesh_common::pods::{PATH_MAX, POD_PARENTS_SIZE, UID_LEN};
use mesh_common::{DialKey, InboundKey, OrigDst, PortKey, WorkloadAddrs, WorkloadValue};

#[map(name = "SM_WORKLOADS")]
pub static WORKLOADS: HashMap<u64, WorkloadValue> = HashMap::pinned(mesh_common::WORKLOADS_SIZE, 0);

#[map(name = "SM_ORIG_DST")]
pub static ORIG_DST: HashMap<u64, OrigDst> = HashMap::pinned(mesh_common::ORIG_DST_SIZE, 0);

#[map(name = "SM_ORIG_BY_PORT")]
pub static ORIG_DST_BY_PORT: HashMap<PortKey, OrigDst> =
    HashMap::pinned(mesh_common::orig_dst_by_port_size(mesh_common::ORIG_DST_SIZE), 0);

#[map(name = "SM_ORIG_BY_CONN")]
pub static ORIG_DST_BY_CONN: HashMap<u64, OrigDst> =
    HashMap::pinned(mesh_common::orig_dst_by_port_size(mesh_common::ORIG_DST_SIZE), 0);

#[map(name = "SM_WL_LIVE")]
pub static WORKLOAD_CONNS: Array<u64> =
    Array::pinned(mesh_common::workload_slots(mesh_common::WORKLOADS_SIZE), mesh_common::BPF_F_MMAPABLE);

#[map(name = "SM_WL_ADDRS")]
pub static WORKLOAD_ADDRS: Array<WorkloadAddrs> =
    Array::pinned(mesh_common::workload_slots(mesh_common::WORKLOADS_SIZE), 0);

#[map(name = "SM_INBOUND")]
pub static INBOUND_LISTENERS: SockHash<InboundKey> =
    SockHash::pinned(mesh_common::inbound_listeners_size(mesh_common::WORKLOADS_SIZE), 0);

#[map(name = "SM_TP_DIALS")]
pub static TRANSPARENT_DIALS: HashMap<DialKey, u8> =
    HashMap::pinned(mesh_common::TRANSPARENT_DIALS_SIZE, mesh_common::BPF_F_NO_PREALLOC);

#[map(name = "SM_WL_NETNS")]
pub static WORKLOAD_NETNS: HashMap<InboundKey, u64> =
    HashMap::pinned(mesh_common::inbound_listeners_size(mesh_common::WORKLOADS_SIZE), 0);

#[map(name = "SM_PROBE")]
pub static PROBE: Array<u64> = Array::pinned(2, 0);

/// The node's meshed pods' UIDs (mesh-common's `pods`), written by the agent.
#[map(name = "SM_POD_UIDS")]
pub static POD_UIDS: HashMap<[u8; UID_LEN], u8> = HashMap::pinned(mesh_common::WORKLOADS_SIZE, 0);

/// The directories the kubelet makes pods' cgroups in, written by the agent.
#[map(name = "SM_POD_PARENTS")]
pub static POD_PARENTS: HashMap<u64, u8> = HashMap::pinned(POD_PARENTS_SIZE, 0);

/// The cgroups cgroup_mkdir refused, with their pods' UIDs.
#[map(name = "SM_POD_CGROUPS")]
pub static POD_CGROUPS: HashMap<u64, [u8; UID_LEN]> = HashMap::pinned(mesh_common::WORKLOADS_SIZE, 0);

/// Not pinned: one cgroup path per CPU, for as long as one program run.
#[map(name = "SM_PATH_BUF")]
pub static PATH_SCRATCH: PerCpuArray<[u8; PATH_MAX]> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "SM_COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(mesh_common::COUNTERS_SIZE, 0);

/// Adds `delta` to the live intercepted connections of `workload` (a slot that does not exist
/// counts nothing: connect4/6 refuse a workload without one).
#[inline(always)]
pub fn conns_add(workload: u32, delta: u64) {
    if let Some(p) = WORKLOAD_CONNS.get_ptr_mut(workload) {
        // An atomic add whose result is unused: BPF's oldest atomic (XADD), on every kernel.
        // A decrement adds u64::MAX (wrapping -1).
        // (core's AtomicU64 has no read-modify-write methods on this target; the intrinsic
        // lowers to the same instruction.)
        unsafe {
            core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(p, delta);
        }
    }
}

/// Removes the original destination of socket `cookie`, and its connection from its
/// workload's count. Only the caller whose delete succeeds decrements: exactly once per entry,
/// whichever hook (or the agent) gets there first.
#[inline(always)]
pub fn forget_orig_dst(cookie: u64, workload: u32) -> bool {
    if ORIG_DST.remove(&cookie).is_ok() {
        conns_add(workload, u64::MAX);
        true
    } else {
        false
    }
}

#[inline(always)]
pub fn count(c: mesh_common::Counter) {
    if let Some(p) = COUNTERS.get_ptr_mut(c as u32) {
        // Per-CPU slot: no other CPU writes it, and BPF programs are not preempted mid-run
        // on the same CPU for these hooks, so a plain add is exact.
        unsafe { *p += 1 };
    }
}
