//! Every map's name and default size. The kernel side declares the maps with these names
//! (`mesh-ebpf/src/maps.rs`); the agent opens them by name and may shrink or grow the sizes at
//! load time (`--max-connections`, `--max-workloads`). All maps are bounded (P5): when one is
//! full the connection is refused and counted, never passed through unproxied.

/// cgroup id (u64) -> [`crate::WorkloadValue`]: the meshed workloads of this node.
pub const WORKLOADS: &str = "SM_WORKLOADS";
pub const WORKLOADS_SIZE: u32 = 4096;

/// socket cookie (u64) -> [`crate::OrigDst`]: original destinations of redirected sockets,
/// kept for the socket's lifetime (deleted by sock_release). Its fill is the number of live
/// intercepted connections on the node; when full, connect4/6 refuse.
pub const ORIG_DST: &str = "SM_ORIG_DST";
pub const ORIG_DST_SIZE: u32 = 65536;

/// [`crate::PortKey`] -> [`crate::OrigDst`]: the same entries re-keyed by sock_ops when the
/// client sends its SYN, so that the agent finds them from its accepted socket. Twice the
/// size of [`ORIG_DST`]: every entry here has one there while its socket lives, plus released
/// entries awaiting the agent.
pub const ORIG_DST_BY_PORT: &str = "SM_ORIG_BY_PORT";

/// The size of [`ORIG_DST_BY_PORT`] for a given [`ORIG_DST`] size.
pub const fn orig_dst_by_port_size(orig_dst_size: u32) -> u32 {
    orig_dst_size.saturating_mul(2)
}

/// The agent's accepted socket's cookie (u64) -> [`crate::OrigDst`]: sock_ops moves a
/// [`ORIG_DST_BY_PORT`] entry here when the agent's side of the loopback connection is
/// established. During the handshake the client's port cannot be reused (the connection holds
/// it), so the move binds the destination to exactly that connection: a later client reusing
/// the port cannot overwrite it. The agent takes it by its socket's `SO_COOKIE`. Same size as
/// [`ORIG_DST_BY_PORT`].
pub const ORIG_DST_BY_CONN: &str = "SM_ORIG_BY_CONN";

/// Array of u64, indexed by workload id: the live intercepted connections of each workload,
/// what [`crate::WorkloadValue::max_conns`] bounds. The kernel adds one when it makes an
/// [`ORIG_DST`] entry and subtracts one when it removes one, with atomic adds; the agent
/// subtracts one, with an atomic saturating update through a shared memory mapping of the
/// array ([`BPF_F_MMAPABLE`]), for each entry the census removes. Whoever deletes an entry is
/// the one who subtracts, so each connection is counted off exactly once.
///
/// An array, not a hash: its slots always exist, so no count is ever removed and made again
/// while sockets that will subtract from it live. The agent hands out slot numbers as
/// workload ids ([`WORKLOAD_SLOT_REFUSED`] aside) and gives a slot to a new workload only when
/// its count is zero and no cgroup entry names it. Twice as many slots as workloads, plus the
/// refused slot, so that workloads that went away while their connections drain do not keep
/// new ones from registering.
pub const WORKLOAD_CONNS: &str = "SM_WL_LIVE";

/// The number of slots of [`WORKLOAD_CONNS`] for a given [`WORKLOADS`] size.
pub const fn workload_slots(max_workloads: u32) -> u32 {
    max_workloads.saturating_mul(2).saturating_add(1)
}

/// Slot (a workload id, as in [`WORKLOAD_CONNS`]) -> that workload's own addresses
/// ([`crate::WorkloadAddrs`]), for `getsockname()` on its redirected sockets: they connect to
/// the agent over loopback, and the app is shown the address it would have had. Written at
/// registration, before the workload's cgroup is marked.
pub const WORKLOAD_ADDRS: &str = "SM_WL_ADDRS";

/// The workload id of a cgroup that is refused (a workload that could not be captured): its
/// [`crate::WorkloadValue::max_conns`] is 0, so nothing is ever counted in this slot.
pub const WORKLOAD_SLOT_REFUSED: u32 = 0;

/// `BPF_F_MMAPABLE`: an array map user space can map into its memory.
pub const BPF_F_MMAPABLE: u32 = 1 << 10;

/// Default most live intercepted connections per workload: a quarter of the node's default,
/// so that one pod cannot take the whole node's map.
pub const WORKLOAD_CONNS_DEFAULT: u32 = ORIG_DST_SIZE / 4;

/// [`crate::InboundKey`] -> the agent's inbound (15006) listening socket in that workload's
/// netns (a SOCKHASH). Entries vanish when the agent's socket closes, so with the agent down
/// sk_lookup finds nothing and drops: fail closed. One entry per workload address, so sized
/// for two addresses (IPv4 and IPv6) per workload.
pub const INBOUND_LISTENERS: &str = "SM_INBOUND";

/// The size of [`INBOUND_LISTENERS`] for a given [`WORKLOADS`] size.
pub const fn inbound_listeners_size(max_workloads: u32) -> u32 {
    max_workloads.saturating_mul(2)
}

/// [`crate::DialKey`] -> u8: the agent's connections to apps from their clients' addresses.
/// sock_ops adds one as the agent's socket sends its SYN (a socket marked
/// [`crate::TRANSPARENT_MARK`], in the netns of the workload address it dials: see
/// [`WORKLOAD_NETNS`]) and removes it when the socket closes; sk_lookup leaves a packet with
/// such a 4-tuple to the app instead of steering it to the agent (it cannot tell it from a
/// packet from outside otherwise). It lives as long as the connection, not only for the
/// handshake: an app answering with a SYN cookie has no request socket for the handshake's
/// last ACK, which goes through sk_lookup too. Allocated as used. When full, the SYN is steered
/// to the agent's plaintext listener, which refuses its own dial (counted): the app is not
/// reached, and nothing passes unproxied.
pub const TRANSPARENT_DIALS: &str = "SM_TP_DIALS";
pub const TRANSPARENT_DIALS_SIZE: u32 = 65536;

/// `BPF_F_NO_PREALLOC`: a hash map that allocates its entries as they are made.
pub const BPF_F_NO_PREALLOC: u32 = 1;

/// [`crate::InboundKey`] (a local workload's address) -> the cookie of that workload's netns,
/// written at registration beside [`INBOUND_LISTENERS`]. sock_ops records a marked socket's
/// dial in [`TRANSPARENT_DIALS`] only when the socket is in the netns of the workload address
/// it dials, which is what the agent's dials to apps are: a process elsewhere that puts the
/// mark on its own socket (`CAP_NET_RAW` suffices) cannot fill the map.
pub const WORKLOAD_NETNS: &str = "SM_WL_NETNS";

/// Array of two u64: the agent's probe of whether sock_ops sees the sockets it accepts (that
/// is, whether the agent runs below the cgroup root the programs are attached to). The agent
/// writes a port of its own in [`PROBE_PORT`], makes a loopback connection to it and accepts
/// it; sock_ops, on the accepted socket's establishment, writes that socket's cookie in
/// [`PROBE_SEEN`]. A fact from the kernel, not a guess from cgroup paths (which a cgroup
/// namespace hides).
pub const PROBE: &str = "SM_PROBE";
pub const PROBE_PORT: u32 = 0;
pub const PROBE_SEEN: u32 = 1;

/// Array of u64 indexed by [`crate::Counter`].
pub const COUNTERS: &str = "SM_COUNTERS";
pub const COUNTERS_SIZE: u32 = 16;

/// The layout of the pinned maps this build reads and writes. A restarted or upgraded agent
/// reuses the maps it finds pinned by name (P6), so the maps' layout is a contract between the
/// agent that pinned them, the kernel programs still attached that use them, and the next
/// agent.
///
/// Bump it with any change that would make a pinned map mean something else to an agent or
/// program of another build: a pinned map's key or value type (its fields, their order, size
/// or byte order), its size semantics (what `max_entries` counts, how the agent sizes it), its
/// map type or flags, what its entries or indices mean (a new [`crate::Counter`] at an index
/// in use, a slot numbering), or a map name given to another map. Adding a map under a new
/// name, or a counter at an unused index, needs no bump: an earlier agent's pins simply lack
/// it. An agent that finds pins of another version refuses to start and changes nothing (its
/// programs stay attached, fail closed); the upgrade path across a bump is the README's
/// "Upgrading the agent".
pub const MAP_LAYOUT_VERSION: u32 = 1;

/// The layout version of pins that carry no [`LAYOUT`] record: those of agents from before
/// the record existed, whose layout is version 1.
pub const UNRECORDED_LAYOUT_VERSION: u32 = 1;

/// Array of one u32 at index 0: the [`MAP_LAYOUT_VERSION`] of the maps pinned beside it. Made
/// and filled by the agent (no kernel program uses it); its own shape never changes, so that
/// any agent can read it.
pub const LAYOUT: &str = "SM_LAYOUT";

/// Program names (the Rust function names in mesh-ebpf) and their pin names.
pub const PROG_CONNECT4: &str = "sm_connect4";
pub const PROG_CONNECT6: &str = "sm_connect6";
pub const PROG_SOCK_OPS: &str = "sm_sock_ops";
pub const PROG_SOCK_RELEASE: &str = "sm_sock_release";
pub const PROG_GETPEERNAME4: &str = "sm_getpeername4";
pub const PROG_GETPEERNAME6: &str = "sm_getpeername6";
pub const PROG_GETSOCKNAME4: &str = "sm_getsockname4";
pub const PROG_GETSOCKNAME6: &str = "sm_getsockname6";
pub const PROG_SKB_INGRESS: &str = "sm_skb_ingress";
pub const PROG_SK_LOOKUP: &str = "sm_sk_lookup";
