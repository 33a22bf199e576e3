//! `cgroup/connect4` and `cgroup/connect6`: redirect a meshed workload's TCP connect to the
//! agent's outbound listener inside the workload's own netns, remembering the original
//! destination by socket cookie. Attached at the node's cgroup root; sockets of cgroups that
//! are not meshed workloads (the agent's own among them: P3) are left alone.

use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::{bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
    EbpfContext,
};
use mesh_common::{
    outbound_action_v4, outbound_action_v6, quota_check, Counter, OrigDst, OutboundAction,
    QuotaCheck, SockAddr, WorkloadValue, AF_INET, AF_INET6, MAX_CGROUP_DEPTH, OUTBOUND_PORT,
};

use crate::maps::{conns_add, count, forget_orig_dst, ORIG_DST, WORKLOADS, WORKLOAD_CONNS};

const ALLOW: i32 = 1;
/// connect() fails with EPERM.
const REFUSE: i32 = 0;
const SOCK_STREAM: u32 = 1;
const BPF_NOEXIST: u64 = 1;

#[cgroup_sock_addr(connect4)]
pub fn sm_connect4(ctx: SockAddrContext) -> i32 {
    try_connect(&ctx, AF_INET)
}

#[cgroup_sock_addr(connect6)]
pub fn sm_connect6(ctx: SockAddrContext) -> i32 {
    try_connect(&ctx, AF_INET6)
}

/// The meshed workload the current task belongs to: its own cgroup or the nearest registered
/// ancestor (a pod's processes usually live in container cgroups below the pod's).
#[inline(always)]
fn meshed_workload() -> Option<WorkloadValue> {
    let own = unsafe { bpf_get_current_cgroup_id() };
    workload_of(own, |level| unsafe { bpf_get_current_ancestor_cgroup_id(level) })
}

/// The workload of cgroup `own` or of its nearest registered ancestor (`ancestor(level)`: the
/// id of its ancestor at that depth from the root, 0 past its own depth).
#[inline(always)]
pub(crate) fn workload_of(own: u64, ancestor: impl Fn(i32) -> u64) -> Option<WorkloadValue> {
    if let Some(w) = unsafe { WORKLOADS.get(&own) } {
        return Some(*w);
    }
    let mut level = 1;
    while level <= MAX_CGROUP_DEPTH {
        let id = ancestor(level);
        if id == 0 || id == own {
            return None;
        }
        if let Some(w) = unsafe { WORKLOADS.get(&id) } {
            return Some(*w);
        }
        level += 1;
    }
    None
}

#[inline(always)]
fn try_connect(ctx: &SockAddrContext, family: u16) -> i32 {
    let sa: &mut bpf_sock_addr = unsafe { &mut *ctx.sock_addr };
    if sa.type_ != SOCK_STREAM {
        return ALLOW;
    }
    let Some(workload) = meshed_workload() else {
        return ALLOW;
    };
    let port = u16::from_be(sa.user_port as u16);
    let mut dst = SockAddr { family, port, _pad: 0, addr: [0; 4] };
    let action = if family == AF_INET {
        dst.addr[0] = sa.user_ip4;
        outbound_action_v4(sa.user_ip4)
    } else {
        dst.addr = read_ip6(sa);
        outbound_action_v6(dst.addr)
    };
    if action == OutboundAction::Pass {
        // A socket whose earlier, redirected connect failed keeps that entry; its loopback
        // connection now is not redirected, and getpeername/getsockname must not think so.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        if let Some(old) = unsafe { ORIG_DST.get(&cookie) }.copied() {
            forget_orig_dst(cookie, old.workload_id);
        }
        count(Counter::PassedLocal);
        return ALLOW;
    }
    // One workload may not take the node's map: each has its quota of live connections.
    let live = WORKLOAD_CONNS.get_ptr(workload.id).map(|p| unsafe { core::ptr::read_volatile(p) });
    match quota_check(workload.max_conns, live) {
        QuotaCheck::Admit => {}
        QuotaCheck::Exceeded => {
            count(Counter::RefusedWorkloadQuota);
            return REFUSE;
        }
        QuotaCheck::NotCaptured => {
            count(Counter::RefusedNotCaptured);
            return REFUSE;
        }
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let orig = OrigDst { dst, workload_id: workload.id, src_port: 0, _pad: 0, released_ns: 0 };
    // A socket connecting again after a failed attempt has an entry, counted in the slot of
    // the workload it was made for: counted off there first.
    if let Some(old) = unsafe { ORIG_DST.get(&cookie) }.copied() {
        forget_orig_dst(cookie, old.workload_id);
    }
    // Counted before the entry exists, so whoever later deletes it always has one to count off.
    conns_add(workload.id, 1);
    if ORIG_DST.insert(&cookie, &orig, BPF_NOEXIST).is_err() {
        conns_add(workload.id, u64::MAX);
        // P5: a full map refuses the connection; it never goes out unproxied.
        count(Counter::RefusedOrigDstFull);
        return REFUSE;
    }
    if family == AF_INET {
        sa.user_ip4 = u32::from_ne_bytes([127, 0, 0, 1]);
    } else {
        // Word by word: the verifier refuses ctx accesses through a moved pointer (memcpy).
        let lo = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];
        for (i, w) in lo.iter().enumerate() {
            unsafe { core::ptr::write_volatile(&mut sa.user_ip6[i], *w) };
        }
    }
    sa.user_port = OUTBOUND_PORT.to_be() as u32;
    count(Counter::Redirected);
    ALLOW
}

/// Reads user_ip6 one 4-byte ctx load at a time (the only access the verifier allows).
#[inline(always)]
pub(crate) fn read_ip6(sa: &bpf_sock_addr) -> [u32; 4] {
    read_words(&sa.user_ip6)
}

/// An IPv6 address in a program's context, one 4-byte load per word: the verifier refuses a
/// wider load or a memcpy from ctx.
#[inline(always)]
pub(crate) fn read_words(w: &[u32; 4]) -> [u32; 4] {
    unsafe {
        [
            core::ptr::read_volatile(&w[0]),
            core::ptr::read_volatile(&w[1]),
            core::ptr::read_volatile(&w[2]),
            core::ptr::read_volatile(&w[3]),
        ]
    }
}
