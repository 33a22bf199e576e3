//! Types, constants and pure decisions shared by the kernel programs (`mesh-ebpf`) and user
//! space (`mesh-agent`). Everything here is `no_std`; the `user` feature adds `aya::Pod`.
//!
//! Byte orders follow the kernel contexts they come from, and every field says which:
//! addresses are always network order (as `bpf_sock_addr.user_ip4` carries them), ports are
//! always host order (we convert at the edge, once).
#![no_std]

pub mod maps;
pub mod pods;
pub mod ports;

pub use maps::*;
pub use ports::*;

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// `ingress_ifindex` of the loopback device; it is 1 in every network namespace.
pub const LOOPBACK_IFINDEX: u32 = 1;

/// A socket address as the kernel programs see it. `addr` holds the IPv4 address in `addr[0]`
/// (network order) or the IPv6 address as four network-order words.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockAddr {
    pub family: u16,
    /// Host byte order.
    pub port: u16,
    pub _pad: u32,
    pub addr: [u32; 4],
}
const _: () = assert!(core::mem::size_of::<SockAddr>() == 24);

/// What `connect4`/`connect6` remember about a redirected socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct OrigDst {
    pub dst: SockAddr,
    /// The workload id the source cgroup was registered under (see [`WorkloadValue`]).
    pub workload_id: u32,
    /// The client's local port (host order), filled in by sock_ops when it is bound: the
    /// sock_release hook may not read the socket's port itself.
    pub src_port: u16,
    pub _pad: u16,
    /// CLOCK_MONOTONIC ns at which the client socket was released, 0 while it lives. Set by
    /// sock_release in [`maps::ORIG_DST_BY_PORT`] instead of deleting, because a client may
    /// connect, write and close before the agent accepts: the agent must still find the
    /// original destination. The agent deletes an entry when it consumes it and collects
    /// released entries older than [`RELEASED_ENTRY_TTL_NS`].
    pub released_ns: u64,
}
const _: () = assert!(core::mem::size_of::<OrigDst>() == 40);

/// How long a released, unconsumed [`maps::ORIG_DST_BY_PORT`] entry waits for the agent.
pub const RELEASED_ENTRY_TTL_NS: u64 = 10_000_000_000;

/// How many cgroup levels connect4/6 climb to find a meshed pod's cgroup: a pod's processes
/// usually sit in a container cgroup below it.
pub const MAX_CGROUP_DEPTH: i32 = 16;

/// Key of [`maps::ORIG_DST_BY_PORT`]: where the agent finds an accepted socket's original
/// destination. The netns cookie is that of the pod's network namespace (the agent reads it
/// from its listener with `SO_NETNS_COOKIE`), the port is the client's local port (the agent's
/// peer port), host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct PortKey {
    pub netns_cookie: u64,
    pub port: u16,
    pub family: u16,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<PortKey>() == 16);

/// Value of [`maps::WORKLOAD_ADDRS`]: a workload's own addresses, as getsockname() reports a
/// redirected socket's local end (all zero: not known, the socket's real address stays).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct WorkloadAddrs {
    /// IPv4, in network order as `bpf_sock_addr::user_ip4` holds it.
    pub v4: u32,
    /// IPv6, four words in network order as `bpf_sock_addr::user_ip6` holds it.
    pub v6: [u32; 4],
}

impl WorkloadAddrs {
    /// The first IPv4 and the first IPv6 address of `ips` (given as octets).
    pub fn from_octets(v4: Option<[u8; 4]>, v6: Option<[u8; 16]>) -> WorkloadAddrs {
        let mut a = WorkloadAddrs::default();
        if let Some(o) = v4 {
            a.v4 = u32::from_ne_bytes(o);
        }
        if let Some(o) = v6 {
            for (i, w) in a.v6.iter_mut().enumerate() {
                *w = u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]);
            }
        }
        a
    }
}

/// Value of [`maps::WORKLOADS`], keyed by the pod's cgroup id (its cgroup v2 inode number).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct WorkloadValue {
    /// Agent-assigned id, echoed into [`OrigDst::workload_id`] so that the agent can check that
    /// the socket it accepted in a pod's netns really came from that pod's cgroup. It is also
    /// the workload's slot in [`maps::WORKLOAD_CONNS`] ([`maps::WORKLOAD_SLOT_REFUSED`] for a
    /// refused cgroup).
    pub id: u32,
    /// The most live intercepted connections this workload may hold ([`maps::WORKLOAD_CONNS`]
    /// counts them); beyond it connect() fails and is counted. 0 refuses every connection:
    /// a workload whose registration failed stays redirected but is never let through.
    pub max_conns: u32,
}
const _: () = assert!(core::mem::size_of::<WorkloadValue>() == 8);

/// What connect4/6 do for a meshed workload, given its live connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuotaCheck {
    Admit,
    /// The workload's registration failed: it is captured but nothing is let through.
    NotCaptured,
    /// The workload holds its quota of connections.
    Exceeded,
}

/// The quota decision (pure, tested on the host). `live` is the workload's count slot, `None`
/// when its id names no slot (refused: a count that cannot be kept cannot be bounded).
///
/// A count above `i64::MAX` can only be one that went below zero (more subtractions than
/// additions: a bug, since every entry is counted off once by whoever deletes it); it is read
/// as zero rather than refusing the workload for good.
pub const fn quota_check(max_conns: u32, live: Option<u64>) -> QuotaCheck {
    let live = match live {
        None if max_conns == 0 => 0,
        None => return QuotaCheck::Exceeded,
        Some(n) if n > i64::MAX as u64 => 0,
        Some(n) => n,
    };
    if max_conns == 0 {
        QuotaCheck::NotCaptured
    } else if live >= max_conns as u64 {
        QuotaCheck::Exceeded
    } else {
        QuotaCheck::Admit
    }
}

/// Key of [`maps::INBOUND_LISTENERS`]: a local workload address. `sk_lookup` runs inside the
/// pod's netns and picks the agent's inbound socket of that same netns by the address the
/// packet was sent to (pod addresses are unique on a node). This is steering, not identity:
/// the kernel refuses to assign a socket of another netns, and no identity is derived from it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct InboundKey {
    pub family: u32,
    pub addr: [u32; 4],
}
const _: () = assert!(core::mem::size_of::<InboundKey>() == 20);

impl InboundKey {
    pub const fn v4(addr_be: u32) -> Self {
        InboundKey { family: AF_INET as u32, addr: [addr_be, 0, 0, 0] }
    }
    pub const fn v6(addr_be: [u32; 4]) -> Self {
        InboundKey { family: AF_INET6 as u32, addr: addr_be }
    }
}

/// The mark on the agent's sockets that dial an app from its client's address (a transparent
/// source), in the app's netns. The app's replies must come back to the agent's socket rather
/// than leave the pod toward that address: the netns takes an accepted socket's mark from the
/// SYN that made it (`tcp_fwmark_accept`), and a rule sends marked packets to [`REPLY_TABLE`],
/// whose one route delivers everything locally. sock_ops also knows these sockets by it.
pub const TRANSPARENT_MARK: u32 = 15008;
/// The routing table, in a workload's netns, of packets marked [`TRANSPARENT_MARK`].
pub const REPLY_TABLE: u32 = 15008;
/// The priority of the rule that looks [`TRANSPARENT_MARK`] up in [`REPLY_TABLE`]: after the
/// local table's (0), before the main table's (32766).
pub const REPLY_RULE_PRIORITY: u32 = 15008;

/// Key of [`maps::TRANSPARENT_DIALS`]: an agent's dial from a client's address to an app, in
/// the app's netns, as sk_lookup sees its SYN arrive: `app` is the local end, `client` the
/// remote one. Addresses as [`SockAddr::addr`], ports host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct DialKey {
    pub family: u16,
    pub app_port: u16,
    pub client_port: u16,
    pub _pad: u16,
    pub app: [u32; 4],
    pub client: [u32; 4],
}
const _: () = assert!(core::mem::size_of::<DialKey>() == 40);

impl DialKey {
    pub const fn new(family: u16, app: [u32; 4], app_port: u16, client: [u32; 4], client_port: u16) -> DialKey {
        DialKey { family, app_port, client_port, _pad: 0, app, client }
    }

    /// The app's end, as [`maps::INBOUND_LISTENERS`] and [`maps::WORKLOAD_NETNS`] key it.
    pub const fn app_key(&self) -> InboundKey {
        InboundKey { family: self.family as u32, addr: self.app }
    }
}

/// Indices into [`maps::COUNTERS`]: why the kernel programs did what they did.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// connect4/6 redirected a meshed socket to its agent.
    Redirected = 0,
    /// connect4/6 refused a connection because the original-destination map was full.
    RefusedOrigDstFull = 1,
    /// sock_ops could not re-key an original destination (map full); the agent refuses it.
    PortKeyFull = 2,
    /// sk_lookup steered an inbound connection to the agent's inbound socket.
    InboundSteered = 3,
    /// sk_lookup dropped an inbound connection: no agent socket for that workload (agent down).
    InboundNoListener = 4,
    /// connect4/6 left a meshed socket alone (loopback).
    PassedLocal = 5,
    /// connect4/6 refused a connection: the workload holds its quota of connections.
    RefusedWorkloadQuota = 6,
    /// connect4/6 refused a connection of a workload whose registration failed.
    RefusedNotCaptured = 7,
    /// An original destination was removed when its socket closed without a release (kernel
    /// sockets, such as MPTCP subflows, are never released through the cgroup hook).
    ClosedUnreleased = 8,
    /// sock_ops moved an original destination to the agent's accepted socket.
    MovedToAccepted = 9,
    /// cgroup_mkdir refused a meshed pod's cgroup as the kubelet made it ([`pods`]).
    PodRefusedAtMkdir = 10,
    /// cgroup_mkdir could not refuse a meshed pod's new cgroup: the workloads map (or its
    /// record of refusals) was full.
    PodMkdirMapFull = 11,
    /// The ingress filter dropped an IPv6 packet from outside whose source was the
    /// destination address itself (forged: only the node itself may send from its addresses).
    ForgedSelfSource = 12,
    /// sock_ops could not record an agent's dial from a client's address (map full): sk_lookup
    /// steers it to the agent's plaintext listener, which recognises its own dial by the mark
    /// and refuses it.
    TransparentDialsFull = 13,
    /// The ingress filter dropped a TCP packet from outside (not over loopback) for a meshed
    /// workload's listening socket: everything from outside reaches an app through the agent,
    /// whose dials come over loopback.
    OutsideToAppListener = 14,
}

impl Counter {
    pub const ALL: [Counter; 15] = [
        Counter::Redirected,
        Counter::RefusedOrigDstFull,
        Counter::PortKeyFull,
        Counter::InboundSteered,
        Counter::InboundNoListener,
        Counter::PassedLocal,
        Counter::RefusedWorkloadQuota,
        Counter::RefusedNotCaptured,
        Counter::ClosedUnreleased,
        Counter::MovedToAccepted,
        Counter::PodRefusedAtMkdir,
        Counter::PodMkdirMapFull,
        Counter::ForgedSelfSource,
        Counter::TransparentDialsFull,
        Counter::OutsideToAppListener,
    ];
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Redirected => "redirected",
            Counter::RefusedOrigDstFull => "refused_orig_dst_map_full",
            Counter::PortKeyFull => "port_key_map_full",
            Counter::InboundSteered => "inbound_steered",
            Counter::InboundNoListener => "inbound_dropped_no_agent",
            Counter::PassedLocal => "passed_local",
            Counter::RefusedWorkloadQuota => "refused_workload_quota",
            Counter::RefusedNotCaptured => "refused_not_captured",
            Counter::ClosedUnreleased => "closed_unreleased",
            Counter::MovedToAccepted => "moved_to_accepted",
            Counter::PodRefusedAtMkdir => "pod_cgroups_refused_at_mkdir",
            Counter::PodMkdirMapFull => "pod_cgroups_not_refused_map_full",
            Counter::ForgedSelfSource => "inbound_dropped_forged_self_source",
            Counter::TransparentDialsFull => "transparent_dial_map_full",
            Counter::OutsideToAppListener => "inbound_dropped_outside_to_app_listener",
        }
    }
}

/// What connect4/connect6 do with a meshed socket's destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutboundAction {
    /// Leave it alone: loopback (the pod talking to itself, or to the agent's listener in its
    /// netns). Every other destination is captured, the mesh's own ports on other hosts
    /// included: the agent decides about those (it refuses them), nothing leaves uncaptured.
    Pass,
    /// Record the original destination and send it to the agent's outbound listener.
    Redirect,
}

/// The decision for an IPv4 destination (`addr_be` network order).
pub fn outbound_action_v4(addr_be: u32) -> OutboundAction {
    // 127.0.0.0/8: first octet is the lowest-addressed byte of the network-order word.
    let first_octet = addr_be.to_ne_bytes()[0];
    if first_octet == 127 {
        OutboundAction::Pass
    } else {
        OutboundAction::Redirect
    }
}

/// The decision for an IPv6 destination (four network-order words).
pub fn outbound_action_v6(addr_be: [u32; 4]) -> OutboundAction {
    // ::ffff:127.x.y.z is a v4-mapped loopback on a dual-stack socket.
    if is_loopback6(addr_be) || (is_v4_mapped(addr_be) && addr_be[3].to_ne_bytes()[0] == 127) {
        OutboundAction::Pass
    } else {
        OutboundAction::Redirect
    }
}

/// `::1`, given as the kernel's four words in network order.
#[inline(always)]
pub fn is_loopback6(addr_be: [u32; 4]) -> bool {
    addr_be[0] == 0 && addr_be[1] == 0 && addr_be[2] == 0 && addr_be[3].to_ne_bytes() == [0, 0, 0, 1]
}

/// An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`), as the kernel's four words in network order;
/// its IPv4 address is the last word.
#[inline(always)]
pub fn is_v4_mapped(addr_be: [u32; 4]) -> bool {
    addr_be[0] == 0 && addr_be[1] == 0 && addr_be[2].to_ne_bytes() == [0, 0, 0xff, 0xff]
}

/// What `sk_lookup` does with a TCP connection arriving in a pod's netns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InboundAction {
    /// Normal lookup: loopback traffic (the agent dialling the app, the app itself) or HBONE.
    Pass,
    /// Steer to the agent's inbound socket of this netns.
    Steer,
}

/// `from_self`: the packet's source is the destination address itself (the agent dialling the
/// app from inside the pod binds to the app's address) or loopback. Local traffic does not
/// arrive with the loopback ifindex when it is addressed to the pod's own IP, so the source
/// is what tells. An outside packet cannot claim a local source: for IPv4 the kernel drops those
/// as martians (accept_local=0) before any socket lookup; IPv6 has no such check, and the
/// ingress filter (mesh-ebpf's `skb_ingress`) drops those for meshed workloads before their
/// sockets process them.
pub fn inbound_action(ingress_ifindex: u32, local_port: u16, from_self: bool) -> InboundAction {
    if from_self || ingress_ifindex == LOOPBACK_IFINDEX || local_port == HBONE_PORT {
        InboundAction::Pass
    } else {
        InboundAction::Steer
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    unsafe impl aya::Pod for SockAddr {}
    unsafe impl aya::Pod for OrigDst {}
    unsafe impl aya::Pod for PortKey {}
    unsafe impl aya::Pod for WorkloadValue {}
    unsafe impl aya::Pod for InboundKey {}
    unsafe impl aya::Pod for WorkloadAddrs {}
    unsafe impl aya::Pod for DialKey {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(a: [u8; 4]) -> u32 {
        u32::from_ne_bytes(a)
    }
    fn v6(a: [u8; 16]) -> [u32; 4] {
        let mut w = [0u32; 4];
        for (i, c) in a.chunks(4).enumerate() {
            w[i] = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]);
        }
        w
    }

    #[test]
    fn loopback_passes_everything_else_redirects_mesh_ports_included() {
        assert_eq!(outbound_action_v4(v4([127, 0, 0, 1])), OutboundAction::Pass);
        assert_eq!(outbound_action_v4(v4([127, 9, 9, 9])), OutboundAction::Pass);
        assert_eq!(outbound_action_v4(v4([10, 0, 2, 7])), OutboundAction::Redirect);
        assert_eq!(outbound_action_v4(v4([10, 99, 0, 2])), OutboundAction::Redirect);
        assert_eq!(outbound_action_v4(v4([128, 0, 0, 1])), OutboundAction::Redirect);
    }

    #[test]
    fn v6_loopback_and_mapped_loopback_pass() {
        let mut lo = [0u8; 16];
        lo[15] = 1;
        assert_eq!(outbound_action_v6(v6(lo)), OutboundAction::Pass);
        let mut mapped = [0u8; 16];
        mapped[10] = 0xff;
        mapped[11] = 0xff;
        mapped[12] = 127;
        mapped[15] = 1;
        assert_eq!(outbound_action_v6(v6(mapped)), OutboundAction::Pass);
        mapped[12] = 10;
        assert_eq!(outbound_action_v6(v6(mapped)), OutboundAction::Redirect);
        assert!(is_v4_mapped(v6(mapped)) && !is_loopback6(v6(mapped)));
        assert_eq!(v6(mapped)[3].to_ne_bytes(), [10, 0, 0, 1], "the last word is the IPv4 address");
        let mut global = [0u8; 16];
        global[0] = 0xfd;
        global[15] = 7;
        assert_eq!(outbound_action_v6(v6(global)), OutboundAction::Redirect);
        assert!(!is_v4_mapped(v6(global)) && !is_loopback6(v6(global)) && is_loopback6(v6(lo)));
    }

    #[test]
    fn inbound_steers_all_but_loopback_and_hbone() {
        assert_eq!(inbound_action(1, 8080, false), InboundAction::Pass);
        assert_eq!(inbound_action(2, 8080, true), InboundAction::Pass);
        assert_eq!(inbound_action(2, 15008, false), InboundAction::Pass);
        assert_eq!(inbound_action(2, 8080, false), InboundAction::Steer);
        assert_eq!(inbound_action(7, 15001, false), InboundAction::Steer);
    }

    #[test]
    fn quota_admits_below_the_limit_and_zero_captures_without_admitting() {
        assert_eq!(quota_check(2, Some(0)), QuotaCheck::Admit);
        assert_eq!(quota_check(2, Some(1)), QuotaCheck::Admit);
        assert_eq!(quota_check(2, Some(2)), QuotaCheck::Exceeded);
        assert_eq!(quota_check(2, Some(9)), QuotaCheck::Exceeded);
        assert_eq!(quota_check(0, Some(0)), QuotaCheck::NotCaptured);
        assert_eq!(quota_check(0, None), QuotaCheck::NotCaptured);
    }

    #[test]
    fn quota_without_a_slot_refuses_and_a_wrapped_count_reads_as_zero() {
        assert_eq!(quota_check(2, None), QuotaCheck::Exceeded);
        assert_eq!(quota_check(2, Some(u64::MAX)), QuotaCheck::Admit);
        assert_eq!(quota_check(2, Some(i64::MAX as u64)), QuotaCheck::Exceeded);
    }
}
