//! `sock_ops`: when a redirected socket sends its SYN (its local port is bound by then),
//! re-key its original destination by (netns cookie, family, local port) — what the agent can
//! compute from the socket it accepts (its listener's SO_NETNS_COOKIE and the peer port).

use aya_ebpf::{
    bindings::BPF_SOCK_OPS_TCP_CONNECT_CB,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::sock_ops,
    programs::SockOpsContext,
    EbpfContext,
};
use mesh_common::{Counter, PortKey};

use crate::maps::{count, ORIG_DST, ORIG_DST_BY_PORT};

#[sock_ops]
pub fn sm_sock_ops(ctx: SockOpsContext) -> u32 {
    if ctx.op() == BPF_SOCK_OPS_TCP_CONNECT_CB {
        rekey(&ctx);
    }
    1
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
    let key = PortKey {
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        port,
        family: ctx.family() as u16,
        _pad: 0,
    };
    if ORIG_DST_BY_PORT.insert(&key, &orig, 0).is_err() {
        // The agent will not find this connection's destination and refuses it.
        count(Counter::PortKeyFull);
    }
}
