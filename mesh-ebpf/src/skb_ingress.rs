//! `cgroup_skb/ingress`, on the node's cgroup root: drops an IPv6 packet for a meshed
//! workload's socket that arrived from outside (on any interface but loopback) with the
//! destination address as its source.
//!
//! Only the node itself may send from its own addresses, and what a pod sends to itself comes
//! over loopback. IPv4 drops such a packet as a martian before any socket lookup; IPv6 has no
//! such check, and sk_lookup takes "source is the destination" to mean "from inside the pod"
//! (the agent dials an app from the app's own address, and that is the only mark it can see:
//! the interface it reports for a pod's traffic to itself is the one holding the address, not
//! loopback). So a forged packet would pass sk_lookup to the app's own listener. This hook runs
//! as the packet is delivered to the socket the lookup chose, before the listener, Fast Open or
//! an established connection processes it, and there the device is the real one.
//!
//! Sockets outside meshed workloads (the host's own, with VRFs or CNIs that deliver a host's
//! traffic to itself other ways) are left alone. An IPv4 packet costs one comparison, an IPv6
//! one a 32-byte load; the workload lookup runs only for a self-addressed packet from outside.

use aya_ebpf::{
    helpers::{bpf_skb_ancestor_cgroup_id, bpf_skb_cgroup_id},
    macros::cgroup_skb,
    programs::SkBuffContext,
};
use mesh_common::{Counter, LOOPBACK_IFINDEX};

use crate::connect::workload_of;
use crate::maps::count;

const PASS: i32 = 1;
const DROP: i32 = 0;
/// ETH_P_IPV6, as `__sk_buff::protocol` holds it (network order).
const IPV6: u32 = (0x86dd_u16).to_be() as u32;

#[cgroup_skb(ingress)]
pub fn sm_skb_ingress(ctx: SkBuffContext) -> i32 {
    let skb = unsafe { &*ctx.skb.skb };
    if skb.protocol != IPV6 || skb.ifindex == LOOPBACK_IFINDEX {
        return PASS;
    }
    // The data starts at the IPv6 header: source at 8, destination at 24. One load of a fixed
    // size (the verifier refuses a length that might be zero), compared word by word.
    let Ok(w) = ctx.load::<[u64; 4]>(8) else {
        return PASS;
    };
    if w[0] != w[2] || w[1] != w[3] {
        return PASS;
    }
    let own = unsafe { bpf_skb_cgroup_id(ctx.skb.skb) };
    if workload_of(own, |level| unsafe { bpf_skb_ancestor_cgroup_id(ctx.skb.skb, level) }).is_none() {
        return PASS;
    }
    count(Counter::ForgedSelfSource);
    DROP
}
