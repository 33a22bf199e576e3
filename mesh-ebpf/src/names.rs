//! `cgroup/getpeername4/6` and `cgroup/getsockname4/6`: what a redirected socket tells its app
//! about its two ends. Its real peer is the agent's outbound listener on loopback, and so its
//! real local address is loopback too; the app dialled another address and would have had its
//! pod's own, and apps log both, check the peer against a TLS server name, use it as an HTTP
//! `Host`. So:
//! - getpeername() answers the original destination, which connect4/6 stored under the
//!   socket's cookie for as long as the socket lives, while the real peer is the agent's
//!   outbound listener (an entry outliving a redirect changes nothing else);
//! - getsockname() answers the pod's own address (from the workload's slot), with the real
//!   port, but only while the real address is loopback: an app that bound a source address of
//!   its own keeps seeing it. An IPv6 socket that dialled an IPv4-mapped address is shown its
//!   pod's IPv4 address, mapped, as it would have had.
//!
//! Attached at the node's cgroup root; a socket with no entry (never redirected, or not a
//! workload's) is left alone.

use aya_ebpf::{
    bindings::bpf_sock_addr, helpers::bpf_get_socket_cookie, macros::cgroup_sock_addr, programs::SockAddrContext,
    EbpfContext,
};
use mesh_common::{is_loopback6, is_v4_mapped, OrigDst, AF_INET, AF_INET6, OUTBOUND_PORT};

use crate::connect::read_ip6;
use crate::maps::{ORIG_DST, WORKLOAD_ADDRS};

/// These hooks may not fail the call: 1 is their only valid return.
const DONE: i32 = 1;

#[cgroup_sock_addr(getpeername4)]
pub fn sm_getpeername4(ctx: SockAddrContext) -> i32 {
    if let Some(orig) = redirected(&ctx, AF_INET) {
        let sa = sock_addr(&ctx);
        if sa.user_port != OUTBOUND_PORT.to_be() as u32 || sa.user_ip4.to_ne_bytes()[0] != 127 {
            return DONE;
        }
        sa.user_ip4 = orig.dst.addr[0];
        sa.user_port = orig.dst.port.to_be() as u32;
    }
    DONE
}

#[cgroup_sock_addr(getpeername6)]
pub fn sm_getpeername6(ctx: SockAddrContext) -> i32 {
    if let Some(orig) = redirected(&ctx, AF_INET6) {
        let sa = sock_addr(&ctx);
        if sa.user_port != OUTBOUND_PORT.to_be() as u32 || !is_loopback6(read_ip6(sa)) {
            return DONE;
        }
        write_ip6(sa, orig.dst.addr);
        sa.user_port = orig.dst.port.to_be() as u32;
    }
    DONE
}

#[cgroup_sock_addr(getsockname4)]
pub fn sm_getsockname4(ctx: SockAddrContext) -> i32 {
    if let Some(orig) = redirected(&ctx, AF_INET) {
        let sa = sock_addr(&ctx);
        if let Some(own) = WORKLOAD_ADDRS.get(orig.workload_id) {
            if sa.user_ip4.to_ne_bytes()[0] == 127 && own.v4 != 0 {
                sa.user_ip4 = own.v4;
            }
        }
    }
    DONE
}

#[cgroup_sock_addr(getsockname6)]
pub fn sm_getsockname6(ctx: SockAddrContext) -> i32 {
    if let Some(orig) = redirected(&ctx, AF_INET6) {
        let sa = sock_addr(&ctx);
        if let Some(own) = WORKLOAD_ADDRS.get(orig.workload_id) {
            if !is_loopback6(read_ip6(sa)) {
                return DONE;
            }
            let d = orig.dst.addr;
            if is_v4_mapped(d) {
                // It dialled IPv4 through an IPv6 socket: its own end is IPv4 too (keeping the
                // destination's ::ffff: word).
                if own.v4 != 0 {
                    write_ip6(sa, [0, 0, d[2], own.v4]);
                }
            } else if own.v6 != [0; 4] {
                write_ip6(sa, own.v6);
            }
        }
    }
    DONE
}

/// The original destination of this socket, if connect4/6 redirected it as `family`.
#[inline(always)]
fn redirected(ctx: &SockAddrContext, family: u16) -> Option<OrigDst> {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let orig = (unsafe { ORIG_DST.get(&cookie) }).copied()?;
    (orig.dst.family == family).then_some(orig)
}

#[inline(always)]
fn sock_addr(ctx: &SockAddrContext) -> &mut bpf_sock_addr {
    unsafe { &mut *ctx.sock_addr }
}

/// Word by word: the verifier refuses ctx accesses through a moved pointer (memcpy).
#[inline(always)]
fn write_ip6(sa: &mut bpf_sock_addr, words: [u32; 4]) {
    for (i, w) in words.iter().enumerate() {
        unsafe { core::ptr::write_volatile(&mut sa.user_ip6[i], *w) };
    }
}
