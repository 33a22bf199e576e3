//! The TCP sockets of the calling thread's network namespace, by socket cookie, from the
//! kernel's socket diagnostics (NETLINK_SOCK_DIAG, as `ss` reads them). The cookie is the one
//! `bpf_get_socket_cookie` returns, so the agent can tell which map entries still have a
//! socket.

use std::collections::HashSet;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const NETLINK_SOCK_DIAG: libc::c_int = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct NlMsgHdr {
    len: u32,
    kind: u16,
    flags: u16,
    seq: u32,
    pid: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct InetDiagSockId {
    sport: u16,
    dport: u16,
    src: [u32; 4],
    dst: [u32; 4],
    interface: u32,
    cookie: [u32; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct InetDiagReqV2 {
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: InetDiagSockId,
}

#[repr(C)]
struct Request {
    hdr: NlMsgHdr,
    req: InetDiagReqV2,
}

/// The start of `struct inet_diag_msg`, up to the cookie.
const MSG_COOKIE_OFFSET: usize = 4 + 2 + 2 + 16 + 16 + 4;
const HDR_LEN: usize = std::mem::size_of::<NlMsgHdr>();
const _: () = assert!(std::mem::size_of::<InetDiagReqV2>() == 56 && HDR_LEN == 16);

/// Every TCP socket's cookie in this thread's network namespace (IPv4 and IPv6, all states).
pub fn tcp_cookies() -> std::io::Result<HashSet<u64>> {
    let mut out = HashSet::new();
    for family in [libc::AF_INET, libc::AF_INET6] {
        dump(family as u8, &mut out)?;
    }
    Ok(out)
}

fn dump(family: u8, out: &mut HashSet<u64>) -> std::io::Result<()> {
    // SAFETY: a plain socket(2) call; the descriptor is owned from here.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, NETLINK_SOCK_DIAG) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just created and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let req = Request {
        hdr: NlMsgHdr {
            len: std::mem::size_of::<Request>() as u32,
            kind: SOCK_DIAG_BY_FAMILY,
            flags: NLM_F_REQUEST | NLM_F_DUMP,
            seq: 1,
            pid: 0,
        },
        req: InetDiagReqV2 { family, protocol: libc::IPPROTO_TCP as u8, states: u32::MAX, ..Default::default() },
    };
    // SAFETY: sending a fully initialised #[repr(C)] request from a live buffer.
    let sent =
        unsafe { libc::send(fd.as_raw_fd(), (&req as *const Request).cast(), std::mem::size_of::<Request>(), 0) };
    if sent < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: receiving into a live buffer of the given length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if parse(&buf[..n as usize], out)? {
            return Ok(());
        }
    }
}

/// Collects the cookies of one datagram's messages; true when the dump is done.
fn parse(mut data: &[u8], out: &mut HashSet<u64>) -> std::io::Result<bool> {
    while data.len() >= HDR_LEN {
        let len = u32::from_ne_bytes(data[0..4].try_into().expect("4 bytes")) as usize;
        let kind = u16::from_ne_bytes(data[4..6].try_into().expect("2 bytes"));
        if len < HDR_LEN || len > data.len() {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "truncated sock_diag message"));
        }
        match kind {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let code = data.get(HDR_LEN..HDR_LEN + 4).map(|b| i32::from_ne_bytes(b.try_into().expect("4 bytes")));
                return match code {
                    Some(0) | None => Ok(true),
                    Some(e) => Err(std::io::Error::from_raw_os_error(-e)),
                };
            }
            _ => {
                let body = &data[HDR_LEN..len];
                if let Some(c) = body.get(MSG_COOKIE_OFFSET..MSG_COOKIE_OFFSET + 8) {
                    let lo = u32::from_ne_bytes(c[0..4].try_into().expect("4 bytes")) as u64;
                    let hi = u32::from_ne_bytes(c[4..8].try_into().expect("4 bytes")) as u64;
                    out.insert(lo | hi << 32);
                }
            }
        }
        // Messages are 4-byte aligned.
        let step = (len + 3) & !3;
        data = data.get(step..).unwrap_or(&[]);
    }
    Ok(false)
}

/// SO_COOKIE of a socket: the same cookie `bpf_get_socket_cookie` returns for it.
pub fn socket_cookie(fd: &impl std::os::fd::AsFd) -> std::io::Result<u64> {
    use std::os::fd::AsRawFd;
    let mut c: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: a live descriptor and an out-pointer sized for u64.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&mut c as *mut u64).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(c)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cookie(fd: &impl std::os::fd::AsFd) -> u64 {
        socket_cookie(fd).unwrap()
    }

    /// The dump lists the sockets that exist and not the ones closed (this namespace, no root
    /// needed).
    #[test]
    fn lists_live_tcp_sockets_by_cookie() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        let (lc, cc, sc) = (cookie(&l), cookie(&c), cookie(&s));
        let all = tcp_cookies().unwrap();
        assert!(all.contains(&lc) && all.contains(&cc) && all.contains(&sc), "{lc} {cc} {sc} not among {}", all.len());
        drop(l);
        let all = tcp_cookies().unwrap();
        assert!(!all.contains(&lc), "a closed listener is still listed");
    }

    #[test]
    fn malformed_messages_are_errors_not_panics() {
        let mut out = HashSet::new();
        assert!(parse(&[0xff; 20], &mut out).is_err());
        assert!(!parse(&[0u8; 3], &mut out).unwrap());
        let mut done = [0u8; 16];
        done[0] = 16;
        done[4] = NLMSG_DONE as u8;
        assert!(parse(&done, &mut out).unwrap());
    }
}
