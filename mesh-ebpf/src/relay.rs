//! `sk_skb` verdict on the agent's two sockets of a same-node relay (the pod ↔ agent loopback
//! legs): each segment that arrives on one is sent out of the other inside the kernel, so the
//! bytes never reach the agent and the agent is not woken to move them. The pods' own sockets
//! are not touched (a socket in a sockmap gets the sockmap's receive path, which the pods'
//! blocking readers must not see; see ARCHITECTURE.md).
//!
//! Order is kept by one rule (`relay_may_redirect`): bytes go straight to the peer only once
//! the agent has forwarded everything passed up to it before. Bytes are passed up when the
//! peer is not (or no longer) in the map.

use aya_ebpf::{helpers::bpf_get_socket_cookie, macros::stream_verdict, programs::SkBuffContext, EbpfContext};
use mesh_common::relay_may_redirect;

use crate::maps::{RELAY_BYTES, RELAY_PEERS, RELAY_SOCKS};

const SK_DROP: u32 = 0;
const SK_PASS: u32 = 1;

#[stream_verdict]
pub fn sm_relay(ctx: SkBuffContext) -> u32 {
    // SAFETY: the context is the segment's skb, owned by the receiving socket.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let len = ctx.len() as u64;
    if len == 0 {
        // A segment that carried only a FIN: TCP has already taken note of it (the agent sees
        // the hang-up and passes the half-close on itself, after the bytes), and there is
        // nothing to deliver. It must not enter the socket's relay queue either way: the
        // kernel's relay work takes a zero-byte delivery or send for a broken pipe, marks the
        // socket with EPIPE and from then on drops every segment redirected to it. Passed up
        // while that queue holds segments on their way out, it would be queued there too, so
        // it is dropped, which only frees it.
        return SK_DROP;
    }
    let Some(bytes) = RELAY_BYTES.get_ptr_mut(&cookie) else {
        return SK_PASS;
    };
    // SAFETY: map values stay valid for the program's run; only this socket's verdicts, which
    // run one at a time, write this entry.
    let bytes = unsafe { &mut *bytes };
    if let Some(peer) = unsafe { RELAY_PEERS.get(&cookie) } {
        if relay_may_redirect(peer, bytes) {
            let mut key = peer.peer;
            if RELAY_SOCKS.redirect_skb(&ctx, &mut key, 0) == SK_PASS as i64 {
                bytes.redirected += len;
                return SK_PASS;
            }
        }
    }
    bytes.passed += len;
    SK_PASS
}
