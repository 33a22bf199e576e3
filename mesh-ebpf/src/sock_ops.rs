//! `sock_ops`, on the node's cgroup root, follows a redirected connection through its life:
//!
//! - the client's SYN (`TCP_CONNECT_CB`; its local port is bound by then): re-key its original
//!   destination by (netns cookie, family, local port) — what the agent can compute from the
//!   socket it accepts — and ask for state callbacks on the socket;
//! - the agent's side established (`PASSIVE_ESTABLISHED_CB`, on the accepted socket in the
//!   pod's netns): move the entry to the accepted socket's cookie, binding it to exactly this
//!   connection (the port cannot be reused while the handshake holds it);
//! - a socket closing (`STATE_CB` to `TCP_CLOSE`): drop what is left of its entries. This is
//!   what frees a socket that is never released through the cgroup hook — kernel sockets,
//!   such as MPTCP subflows — so that no kind of socket can leak a map entry.
//!
//! It also follows the agent's dials to an app from a client's address (its sockets marked
//! `TRANSPARENT_MARK`, in the netns of the address they dial): at `TCP_CONNECT_CB` it records
//! the connection's 4-tuple in `SM_TP_DIALS` for sk_lookup, and removes it when the socket
//! closes.

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE,
    },
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns},
    macros::sock_ops,
    programs::SockOpsContext,
    EbpfContext,
};
use mesh_common::{is_loopback6, Counter, DialKey, PortKey, AF_INET, OUTBOUND_PORT, TRANSPARENT_MARK};

use crate::connect::read_words;
use crate::maps::{
    count, forget_orig_dst, ORIG_DST, ORIG_DST_BY_CONN, ORIG_DST_BY_PORT, PROBE, TRANSPARENT_DIALS, WORKLOAD_NETNS,
};

#[sock_ops]
pub fn sm_sock_ops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => {
            // A pod's redirected socket that carries the mark itself is still re-keyed.
            if !(is_marked(&ctx) && dial_started(&ctx)) {
                rekey(&ctx)
            }
        }
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => bind_to_accepted(&ctx),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => closed(&ctx),
        _ => {}
    }
    1
}

/// The socket carries the mark of the agent's dials from a client's address.
#[inline(always)]
fn is_marked(ctx: &SockOpsContext) -> bool {
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    !sk.is_null() && unsafe { (*sk).mark } == TRANSPARENT_MARK
}

/// The dial as sk_lookup will see its SYN arrive: the socket's remote end is the app.
#[inline(always)]
fn dial_key(ctx: &SockOpsContext) -> DialKey {
    // One 4-byte ctx load per word: the verifier refuses wider or moved accesses.
    let (app, client) = if ctx.family() == AF_INET as u32 {
        ([ctx.remote_ip4(), 0, 0, 0], [ctx.local_ip4(), 0, 0, 0])
    } else {
        (read_words(unsafe { &(*ctx.ops).remote_ip6 }), read_words(unsafe { &(*ctx.ops).local_ip6 }))
    };
    // remote_port holds the port in network order in its upper half.
    let app_port = u32::from_be(ctx.remote_port()) as u16;
    DialKey::new(ctx.family() as u16, app, app_port, client, ctx.local_port() as u16)
}

/// A marked socket's SYN: the agent's dial when the socket is in the netns of the workload
/// address it dials, as the agent's dials to apps are (a process elsewhere may set the mark on
/// its own socket; see `SM_WL_NETNS`), and then recorded. False for any other socket.
#[inline(always)]
fn dial_started(ctx: &SockOpsContext) -> bool {
    let key = dial_key(ctx);
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if !unsafe { WORKLOAD_NETNS.get(&key.app_key()) }.is_some_and(|n| *n == netns) {
        return false;
    }
    if TRANSPARENT_DIALS.insert(&key, &1, 0).is_err() {
        count(Counter::TransparentDialsFull);
    } else {
        ask_state_callbacks(ctx);
    }
    true
}

#[inline(always)]
fn port_key(ctx: &SockOpsContext, port: u16) -> PortKey {
    PortKey { netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) }, port, family: ctx.family() as u16, _pad: 0 }
}

#[inline(always)]
fn rekey(ctx: &SockOpsContext) {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(orig) = ORIG_DST.get_ptr_mut(&cookie) else {
        return;
    };
    let port = ctx.local_port() as u16;
    // Remembered for sock_release, which may not read the socket's port.
    unsafe { (*orig).src_port = port };
    let orig = unsafe { *orig };
    if ORIG_DST_BY_PORT.insert(&port_key(ctx, port), &orig, 0).is_err() {
        // The agent will not find this connection's destination and refuses it.
        count(Counter::PortKeyFull);
    }
    // Told when the socket closes, however it ends (see the module documentation).
    ask_state_callbacks(ctx);
}

/// Adds the state callback to whatever callbacks the socket has (another program on the
/// socket's cgroup path, or the kernel, may have asked for others: setting replaces them).
#[inline(always)]
fn ask_state_callbacks(ctx: &SockOpsContext) {
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
}

/// The peer is on loopback (the agent's accepted socket sees the pod's own client).
#[inline(always)]
fn from_loopback(ctx: &SockOpsContext) -> bool {
    if ctx.family() == AF_INET as u32 {
        ctx.remote_ip4().to_ne_bytes()[0] == 127
    } else {
        is_loopback6(read_words(unsafe { &(*ctx.ops).remote_ip6 }))
    }
}

#[inline(always)]
fn bind_to_accepted(ctx: &SockOpsContext) {
    if ctx.local_port() != OUTBOUND_PORT as u32 {
        answer_probe(ctx);
        return;
    }
    if !from_loopback(ctx) {
        return;
    }
    // remote_port holds the port in network order in its upper half.
    let client_port = u32::from_be(ctx.remote_port()) as u16;
    let key = port_key(ctx, client_port);
    let Some(orig) = (unsafe { ORIG_DST_BY_PORT.get(&key) }).copied() else {
        return;
    };
    let accepted = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if ORIG_DST_BY_CONN.insert(&accepted, &orig, 0).is_ok() {
        let _ = ORIG_DST_BY_PORT.remove(&key);
        count(Counter::MovedToAccepted);
        // If the agent never accepts it (it went away), the entry goes when the socket closes.
        ask_state_callbacks(ctx);
    }
    // Otherwise (map full) the agent finds nothing for this connection and refuses it.
}

/// The agent's probe (see `mesh_common::PROBE`): this accepted socket is on the port the agent
/// is probing with, so the agent's sockets are seen here.
#[inline(always)]
fn answer_probe(ctx: &SockOpsContext) {
    let Some(port) = PROBE.get(mesh_common::PROBE_PORT).copied() else {
        return;
    };
    if port != 0 && port == ctx.local_port() as u64 {
        if let Some(seen) = PROBE.get_ptr_mut(mesh_common::PROBE_SEEN) {
            unsafe { *seen = bpf_get_socket_cookie(ctx.as_ptr()) };
        }
    }
}

#[inline(always)]
fn closed(ctx: &SockOpsContext) {
    // The agent's dial from a client's address, however it ended. Only marked sockets can have
    // a record (the other sockets followed here, pods' connections, are spared a map delete);
    // a record whose socket has since dropped the mark would stay, which only a process in
    // the app's own netns holding CAP_NET_ADMIN could do.
    if is_marked(ctx) {
        let _ = TRANSPARENT_DIALS.remove(&dial_key(ctx));
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // The agent's side of a connection it never accepted.
    let _ = ORIG_DST_BY_CONN.remove(&cookie);
    // A client whose entry no release removed.
    let Some(orig) = (unsafe { ORIG_DST.get(&cookie) }).copied() else {
        return;
    };
    if forget_orig_dst(cookie, orig.workload_id) {
        count(Counter::ClosedUnreleased);
    }
    if orig.src_port != 0 {
        if let Some(entry) = ORIG_DST_BY_PORT.get_ptr_mut(&port_key(ctx, orig.src_port)) {
            unsafe { (*entry).released_ns = bpf_ktime_get_ns() };
        }
    }
}
