//! `cgroup/sock_release`: a redirected socket is gone. Its cookie entry is deleted (that map's
//! fill is the number of live intercepted connections); its port-keyed entry is only stamped
//! as released, because the agent may not have accepted the connection yet (a client that
//! connects, writes and closes at once). The agent deletes stamped entries it did not consume.

use aya_ebpf::{
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns},
    macros::cgroup_sock,
    programs::SockContext,
    EbpfContext,
};
use mesh_common::PortKey;

use crate::maps::{forget_orig_dst, ORIG_DST, ORIG_DST_BY_PORT};

#[cgroup_sock(sock_release)]
pub fn sm_sock_release(ctx: SockContext) -> i32 {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(orig) = (unsafe { ORIG_DST.get(&cookie) }).copied() else {
        return 1;
    };
    let src_port = orig.src_port;
    forget_orig_dst(cookie, orig.workload_id);
    if src_port == 0 {
        // Released before its SYN: never re-keyed.
        return 1;
    }
    let sk = unsafe { &*ctx.sock };
    let key = PortKey {
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        port: src_port,
        family: sk.family as u16,
        _pad: 0,
    };
    if let Some(entry) = ORIG_DST_BY_PORT.get_ptr_mut(&key) {
        unsafe { (*entry).released_ns = bpf_ktime_get_ns() };
    }
    1
}
