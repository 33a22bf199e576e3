//! Dialling an app from its client's address, so that the app sees who called it.
//!
//! The agent dials an app from inside the app's netns. Bound to the client's address (a
//! transparent socket: `IP_TRANSPARENT`, which the agent may use as it holds `CAP_NET_ADMIN`),
//! the SYN still goes over loopback (the app's address is local), and the app accepts a
//! connection from the client's pod address. Its replies, though, go to an address that is not
//! the netns's own, and would leave the pod by its default route. Three things keep them on
//! the node, set up in the netns when a workload is captured ([`install`]):
//!
//! - the agent's dial socket carries [`mesh_common::TRANSPARENT_MARK`]; the mark survives
//!   loopback, and with `net.ipv4.tcp_fwmark_accept` (one per netns, both families) the app's
//!   accepted socket takes the mark of the SYN that made it, so every packet of the app's side
//!   of the connection carries it;
//! - a rule sends packets with that mark to table [`mesh_common::REPLY_TABLE`];
//! - that table's one route, `local default dev lo`, delivers them locally, where the agent's
//!   socket (bound to the client's address) receives them.
//!
//! No packet filter is involved (P1), and nothing changes for packets without the mark. The
//! kernel side (sk_lookup must not steer this SYN back to the agent) is `SM_TP_DIALS`.
//!
//! When the client's address cannot be used the app is dialled from its own address, as before,
//! and that is counted by reason ([`Fallback`]).

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use mesh_common::{REPLY_RULE_PRIORITY, REPLY_TABLE, TRANSPARENT_MARK};

/// What a workload's netns was set up for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Setup {
    /// The families whose reply rule and route are in place.
    pub v4: bool,
    pub v6: bool,
    /// The netns's own addresses when it was set up: a client claiming one of them would be
    /// taken for the pod itself.
    pub local: Vec<IpAddr>,
}

impl Setup {
    fn has(&self, ip: IpAddr) -> bool {
        if ip.is_ipv4() {
            self.v4
        } else {
            self.v6
        }
    }
}

/// Where the agent dials an app from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The app's own address (sk_lookup takes "from the destination itself" as from inside).
    Own(IpAddr),
    /// The client's address, through a transparent socket.
    Client(IpAddr),
}

/// Why an app was dialled from its own address instead of its client's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// The source did not say (a peer agent of an earlier version).
    NotStated,
    /// The stated address is no workload this agent knows (yet: its records may lag the
    /// source's), so it cannot be checked against the peer's identity.
    Unverified,
    /// The client's address is of the other family than the app's.
    Family,
    /// The client's address is one of the destination netns's own (or not a unicast address):
    /// the app would take it for itself.
    Collision,
    /// The netns could not be set up for it (see the agent's log at capture).
    NotSetUp,
    /// The kernel refused to bind the client's address.
    Bind,
}

impl Fallback {
    pub fn label(self) -> &'static str {
        match self {
            Fallback::NotStated => "not_stated",
            Fallback::Unverified => "unverified",
            Fallback::Family => "family",
            Fallback::Collision => "collision",
            Fallback::NotSetUp => "not_set_up",
            Fallback::Bind => "bind_failed",
        }
    }
}

/// The address to dial an app at `dst` from, for a connection from `client` (already checked:
/// a verified workload's address, or a plaintext connection's real peer; or why there is none),
/// in a netns set up as `setup` says.
pub fn source(setup: &Setup, client: Result<IpAddr, Fallback>, dst: IpAddr) -> (Source, Option<Fallback>) {
    let own = Source::Own(dst);
    let client = match client {
        Ok(c) => c.to_canonical(),
        Err(why) => return (own, Some(why)),
    };
    if client == dst {
        // The pod itself: its own address is the true one.
        return (own, None);
    }
    if client.is_ipv4() != dst.is_ipv4() {
        return (own, Some(Fallback::Family));
    }
    if !is_unicast(client) || setup.local.contains(&client) {
        return (own, Some(Fallback::Collision));
    }
    if !setup.has(client) {
        return (own, Some(Fallback::NotSetUp));
    }
    (Source::Client(client), None)
}

fn is_unicast(ip: IpAddr) -> bool {
    !(ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() || ip == IpAddr::from([255, 255, 255, 255]))
}

/// Makes `s` (unbound) a socket that binds a foreign address and carries the mark.
pub fn prepare(s: &socket2::Socket, v6: bool) -> io::Result<()> {
    let (level, opt) = if v6 { (libc::SOL_IPV6, libc::IPV6_TRANSPARENT) } else { (libc::SOL_IP, libc::IP_TRANSPARENT) };
    crate::netns::setsockopt_int(s, level, opt, 1)?;
    s.set_mark(TRANSPARENT_MARK)
}

/// Whether an accepted socket is one of the agent's own dials from a client's address (it
/// carries the mark, taken from the SYN): one that sk_lookup steered back to the agent.
pub fn is_own_dial(s: &tokio::net::TcpStream) -> bool {
    socket2::SockRef::from(s).mark().is_ok_and(|m| m == TRANSPARENT_MARK)
}

/// Sets up the calling thread's netns (run it on a workload's netns thread) so that an app's
/// replies to the agent's transparent dials come back to the agent. Each family is set up on
/// its own; what fails is logged and left out (its connections fall back, counted). Idempotent.
/// `sysctl_net` is the network sysctls' directory (`/proc/sys/net`, which shows the netns of the
/// thread that opens a file in it).
/// `local` are the netns's addresses.
pub fn install(workload: &str, sysctl_net: &std::path::Path, local: Vec<IpAddr>) -> Setup {
    let mut setup = Setup { local, ..Setup::default() };
    // Per netns; it only gives an accepted socket the mark its SYN carried, and only the
    // agent's SYNs carry one (marks do not cross into a netns from outside).
    let path = sysctl_net.join("ipv4/tcp_fwmark_accept");
    if let Err(e) = std::fs::write(&path, "1") {
        tracing::warn!(workload, path = %path.display(), error = %e, "cannot set net.ipv4.tcp_fwmark_accept in the workload's netns (is --sysctl-net a writable view of /proc/sys/net?); its apps will see connections come from their own address");
        return setup;
    }
    for (family, done) in [(libc::AF_INET, &mut setup.v4), (libc::AF_INET6, &mut setup.v6)] {
        match reply_rule(family).and_then(|()| reply_route(family)) {
            Ok(()) => *done = true,
            // No IPv6 in this netns (disabled): nothing to set up.
            Err(e) if family == libc::AF_INET6 && e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {}
            Err(e) => {
                let family = if family == libc::AF_INET { "IPv4" } else { "IPv6" };
                tracing::warn!(workload, family, error = %e, "cannot add the reply rule and route to the workload's netns; its apps will see these connections come from their own address");
            }
        }
    }
    setup
}

// Netlink, as little as these two requests need (linux/netlink.h, rtnetlink.h, fib_rules.h).
const RTM_NEWROUTE: u16 = 24;
const RTM_NEWRULE: u16 = 32;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const FR_ACT_TO_TBL: u8 = 1;
const FRA_PRIORITY: u16 = 6;
const FRA_FWMARK: u16 = 10;
const FRA_TABLE: u16 = 15;
const FRA_FWMASK: u16 = 16;
const RTA_OIF: u16 = 4;
const RTA_TABLE: u16 = 15;
const RTPROT_STATIC: u8 = 4;
const RT_SCOPE_HOST: u8 = 254;
const RTN_LOCAL: u8 = 2;

/// `fwmark TRANSPARENT_MARK lookup REPLY_TABLE`, at `REPLY_RULE_PRIORITY`.
fn reply_rule(family: libc::c_int) -> io::Result<()> {
    // struct fib_rule_hdr: family, dst_len, src_len, tos, table, res1, res2, action; flags.
    let mut body = vec![family as u8, 0, 0, 0, 0, 0, 0, FR_ACT_TO_TBL];
    body.extend_from_slice(&0u32.to_ne_bytes());
    attr(&mut body, FRA_PRIORITY, &REPLY_RULE_PRIORITY.to_ne_bytes());
    attr(&mut body, FRA_FWMARK, &TRANSPARENT_MARK.to_ne_bytes());
    attr(&mut body, FRA_FWMASK, &u32::MAX.to_ne_bytes());
    attr(&mut body, FRA_TABLE, &REPLY_TABLE.to_ne_bytes());
    request(RTM_NEWRULE, &body)
}

/// `local default dev lo table REPLY_TABLE`.
fn reply_route(family: libc::c_int) -> io::Result<()> {
    // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type; flags.
    let mut body = vec![family as u8, 0, 0, 0, 0, RTPROT_STATIC, RT_SCOPE_HOST, RTN_LOCAL];
    body.extend_from_slice(&0u32.to_ne_bytes());
    attr(&mut body, RTA_TABLE, &REPLY_TABLE.to_ne_bytes());
    attr(&mut body, RTA_OIF, &mesh_common::LOOPBACK_IFINDEX.to_ne_bytes());
    request(RTM_NEWROUTE, &body)
}

fn attr(buf: &mut Vec<u8>, kind: u16, value: &[u8]) {
    let len = 4 + value.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(value);
    buf.resize(buf.len().next_multiple_of(4), 0);
}

/// Sends one request on a route netlink socket of the calling thread's netns and waits for its
/// acknowledgement. One that already exists is done.
fn request(kind: u16, body: &[u8]) -> io::Result<()> {
    // SAFETY: a plain socket() call; the descriptor is owned below.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor just created and owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = 16 + body.len();
    let mut msg = Vec::with_capacity(len);
    msg.extend_from_slice(&(len as u32).to_ne_bytes());
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL).to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(body);
    // SAFETY: sends from a live buffer of the length given; the kernel is the destination.
    if unsafe { libc::send(fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = [0u8; 1024];
    // SAFETY: receives into a live buffer of the length given.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    ack(&buf[..n as usize])
}

/// The answer to a request: an error message whose code is 0 (done) or minus an errno.
fn ack(msg: &[u8]) -> io::Result<()> {
    let short = || io::Error::new(io::ErrorKind::InvalidData, "short netlink answer");
    let kind = u16::from_ne_bytes(msg.get(4..6).ok_or_else(short)?.try_into().map_err(|_| short())?);
    if kind != NLMSG_ERROR {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("unexpected netlink answer type {kind}")));
    }
    let code = i32::from_ne_bytes(msg.get(16..20).ok_or_else(short)?.try_into().map_err(|_| short())?);
    match -code {
        0 | libc::EEXIST => Ok(()),
        errno => Err(io::Error::from_raw_os_error(errno)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_client_address_is_used_only_when_it_can_be() {
        let setup = Setup { v4: true, v6: true, local: vec![ip("10.20.2.10"), ip("fd20:2::10"), ip("127.0.0.1")] };
        let dst = ip("10.20.2.10");
        let own = Source::Own(dst);
        assert_eq!(source(&setup, Ok(ip("10.20.1.10")), dst), (Source::Client(ip("10.20.1.10")), None));
        // A v4-mapped claim is its IPv4 address.
        assert_eq!(source(&setup, Ok(ip("::ffff:10.20.1.10")), dst), (Source::Client(ip("10.20.1.10")), None));
        assert_eq!(source(&setup, Ok(dst), dst), (own, None));
        assert_eq!(source(&setup, Err(Fallback::Unverified), dst), (own, Some(Fallback::Unverified)));
        assert_eq!(source(&setup, Ok(ip("fd20:1::10")), dst), (own, Some(Fallback::Family)));
        for c in ["127.0.0.1", "0.0.0.0", "224.0.0.1", "255.255.255.255"] {
            assert_eq!(source(&setup, Ok(ip(c)), dst), (own, Some(Fallback::Collision)), "{c}");
        }
        let v6 = ip("fd20:2::10");
        assert_eq!(source(&setup, Ok(ip("fd20:1::10")), v6), (Source::Client(ip("fd20:1::10")), None));
        assert_eq!(source(&setup, Ok(ip("::1")), v6), (Source::Own(v6), Some(Fallback::Collision)));
        // Another address the destination netns holds.
        let mut holds = setup.clone();
        holds.local.push(ip("10.20.1.10"));
        assert_eq!(source(&holds, Ok(ip("10.20.1.10")), dst), (own, Some(Fallback::Collision)));
        let no_v4 = Setup { v4: false, ..setup };
        assert_eq!(source(&no_v4, Ok(ip("10.20.1.10")), dst), (own, Some(Fallback::NotSetUp)));
        assert_eq!(source(&no_v4, Ok(ip("fd20:1::10")), v6), (Source::Client(ip("fd20:1::10")), None));
    }

    #[test]
    fn netlink_answers_are_read_without_panicking() {
        let mut ok = vec![0u8; 36];
        ok[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        assert!(ack(&ok).is_ok());
        let mut exists = ok.clone();
        exists[16..20].copy_from_slice(&(-libc::EEXIST).to_ne_bytes());
        assert!(ack(&exists).is_ok());
        let mut perm = ok.clone();
        perm[16..20].copy_from_slice(&(-libc::EPERM).to_ne_bytes());
        assert_eq!(ack(&perm).unwrap_err().raw_os_error(), Some(libc::EPERM));
        assert!(ack(&ok[..10]).is_err());
        assert!(ack(&[]).is_err());
        let mut other = ok;
        other[4..6].copy_from_slice(&3u16.to_ne_bytes());
        assert!(ack(&other).is_err());
    }

    #[test]
    fn attributes_are_padded_to_four_bytes() {
        let mut b = Vec::new();
        attr(&mut b, 7, &[1, 2, 3, 4, 5]);
        assert_eq!(b.len(), 12);
        assert_eq!(u16::from_ne_bytes([b[0], b[1]]), 9);
    }
}
