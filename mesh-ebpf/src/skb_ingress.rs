//! `cgroup_skb/ingress`, on the node's cgroup root, drops two kinds of packet that arrive from
//! outside (on any interface but loopback) for a meshed workload's socket: any TCP packet for
//! one of its listening sockets (see `to_app_listener`), and an IPv6 packet whose source is
//! its destination address.
//!
//! Only the node itself may send from its own addresses, and what a pod sends to itself comes
//! over loopback. IPv4 drops such a packet as a martian before any socket lookup; IPv6 has no
//! such check, and sk_lookup takes "source is the destination" to mean "from inside the pod"
//! (the interface it reports for a pod's traffic to itself is the one holding the address,
//! not loopback). So a forged packet would pass sk_lookup to the app's own listener; an
//! established connection would take it too. This hook runs as the packet is delivered to the
//! socket the lookup chose, before the listener, Fast Open or an established connection
//! processes it, and there the device is the real one.
//!
//! Sockets outside meshed workloads (the host's own, with VRFs or CNIs that deliver a host's
//! traffic to itself other ways) are left alone. A packet over loopback costs one comparison;
//! from outside, an IPv6 one a 32-byte load, and one for a listening socket a socket read; the
//! workload lookup runs only for a self-addressed IPv6 packet or a listener's.

use aya_ebpf::{
    helpers::{bpf_sk_fullsock, bpf_skb_ancestor_cgroup_id, bpf_skb_cgroup_id},
    macros::cgroup_skb,
    programs::SkBuffContext,
};
use mesh_common::{Counter, WorkloadValue, LOOPBACK_IFINDEX};

use crate::connect::workload_of;
use crate::maps::{count, WORKLOAD_ADDRS};

/// `TCP_LISTEN`, as `bpf_sock::state` holds it.
const TCP_LISTEN: u32 = 10;
const IPPROTO_TCP: u32 = 6;
const PASS: i32 = 1;
const DROP: i32 = 0;
/// ETH_P_IPV6 and ETH_P_IP, as `__sk_buff::protocol` holds them (network order).
const IPV6: u32 = (0x86dd_u16).to_be() as u32;
const IPV4: u32 = (0x0800_u16).to_be() as u32;

#[cgroup_skb(ingress)]
pub fn sm_skb_ingress(ctx: SkBuffContext) -> i32 {
    let skb = unsafe { &*ctx.skb.skb };
    if skb.ifindex == LOOPBACK_IFINDEX {
        return PASS;
    }
    // The more specific reason first: a forged self-source SYN is also one for a listener.
    if skb.protocol == IPV6 && forged_self_source(&ctx) {
        count(Counter::ForgedSelfSource);
        return DROP;
    }
    if to_app_listener(&ctx, skb.protocol) {
        count(Counter::OutsideToAppListener);
        return DROP;
    }
    PASS
}

/// An IPv6 packet from outside, for a meshed workload's socket, whose source is its destination.
#[inline(always)]
fn forged_self_source(ctx: &SkBuffContext) -> bool {
    // The data starts at the IPv6 header: source at 8, destination at 24. One load of a fixed
    // size (the verifier refuses a length that might be zero), compared word by word.
    let Ok(w) = ctx.load::<[u64; 4]>(8) else {
        return false;
    };
    if w[0] != w[2] || w[1] != w[3] {
        return false;
    }
    workload(ctx).is_some()
}

/// The meshed workload the packet's socket belongs to (its cgroup or an ancestor registered).
#[inline(always)]
fn workload(ctx: &SkBuffContext) -> Option<WorkloadValue> {
    let own = unsafe { bpf_skb_cgroup_id(ctx.skb.skb) };
    workload_of(own, |level| unsafe { bpf_skb_ancestor_cgroup_id(ctx.skb.skb, level) })
}

/// A packet from outside for a meshed workload's listening TCP socket, to the workload's own
/// address. sk_lookup steers what comes from outside to the agent, whose dials to the app come
/// over loopback; what still gets here came past it (a SYN made to look like the agent's own
/// dial from a client's address, or one that arrived before the workload's sk_lookup was
/// attached), and is dropped. Only the first packets of a connection (SYN, the handshake's
/// ACK) meet a listener, so an established connection costs nothing more here.
#[inline(always)]
fn to_app_listener(ctx: &SkBuffContext, protocol: u32) -> bool {
    let sk = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
    if sk.is_null() || unsafe { (*sk).state } != TCP_LISTEN {
        return false;
    }
    let full = unsafe { bpf_sk_fullsock(sk) };
    if full.is_null() || unsafe { (*full).protocol } != IPPROTO_TCP {
        return false;
    }
    let Some(w) = workload(ctx) else {
        return false;
    };
    // To the workload's own address: a netns of its own that a process of the pod made (a
    // container runtime inside the pod) gets traffic from outside legitimately.
    let Some(own) = WORKLOAD_ADDRS.get(w.id) else {
        return false;
    };
    if protocol == IPV6 {
        ctx.load::<[u32; 4]>(24).is_ok_and(|dst| dst == own.v6)
    } else if protocol == IPV4 {
        ctx.load::<u32>(16).is_ok_and(|dst| dst == own.v4)
    } else {
        false
    }
}
