//! sockmesh kernel programs: one file per hook, every map in maps.rs, decisions that need no
//! helper calls in mesh-common (tested on the host).
#![no_std]
#![no_main]
// The kernel's atomic add for per-workload connection counts (maps.rs).
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod cgroup_dir;
mod connect;
mod names;
mod skb_ingress;
mod maps;
mod sk_lookup;
mod sock_ops;
mod sock_release;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach this; it exists to satisfy no_std.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
