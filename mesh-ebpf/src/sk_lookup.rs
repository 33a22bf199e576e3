//! `sk_lookup`, attached to each meshed workload's network namespace: TCP that arrives from
//! outside the pod (not via loopback) for any port but HBONE is assigned to the agent's inbound
//! socket of that netns. With no agent socket (agent down) it is dropped: nothing reaches the
//! app from outside except through the agent (P4). The one exception is the agent's own dial
//! to an app from the client's address, which comes over loopback but looks like it came from
//! outside: sock_ops records each such SYN in `SM_TP_DIALS`, and it goes to the app.

use aya_ebpf::{macros::sk_lookup, programs::SkLookupContext};
use mesh_common::{inbound_action, Counter, DialKey, InboundAction, AF_INET};

use crate::connect::read_words;
use crate::maps::{count, INBOUND_LISTENERS, TRANSPARENT_DIALS};

const SK_DROP: u32 = 0;
const SK_PASS: u32 = 1;
const IPPROTO_TCP: u32 = 6;

#[sk_lookup]
pub fn sm_sk_lookup(ctx: SkLookupContext) -> u32 {
    let l = unsafe { &*ctx.lookup };
    if l.protocol != IPPROTO_TCP {
        return SK_PASS;
    }
    let v4 = l.family == AF_INET as u32;
    let from_self = if v4 {
        l.remote_ip4 == l.local_ip4 || l.remote_ip4.to_ne_bytes()[0] == 127
    } else {
        let r = read_words(&l.remote_ip6);
        let loc = read_words(&l.local_ip6);
        r == loc
    };
    if inbound_action(l.ingress_ifindex, l.local_port as u16, from_self) == InboundAction::Pass {
        return SK_PASS;
    }
    // One 4-byte ctx load per word: the verifier refuses a memcpy from ctx.
    let (app, client) = if v4 {
        ([l.local_ip4, 0, 0, 0], [l.remote_ip4, 0, 0, 0])
    } else {
        (read_words(&l.local_ip6), read_words(&l.remote_ip6))
    };
    // The agent's own dial from a client's address (see `TRANSPARENT_DIALS`): for the app.
    let dial = DialKey::new(l.family as u16, app, l.local_port as u16, client, u16::from_be(l.remote_port));
    if unsafe { TRANSPARENT_DIALS.get(&dial) }.is_some() {
        return SK_PASS;
    }
    let mut key = dial.app_key();
    match INBOUND_LISTENERS.redirect_sk_lookup(&ctx, &mut key, 0) {
        Ok(()) => {
            count(Counter::InboundSteered);
            SK_PASS
        }
        Err(_) => {
            count(Counter::InboundNoListener);
            SK_DROP
        }
    }
}
