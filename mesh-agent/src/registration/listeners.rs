//! The agent's listening sockets in a workload's netns, bound from inside it (by its netns
//! thread) before the kernel redirects anything there.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use mesh_common::{InboundKey, HBONE_PORT, INBOUND_PORT, OUTBOUND_PORT};

pub struct Listeners {
    /// 127.0.0.1:15001, and [::1]:15001 when the pod has IPv6 loopback.
    pub outbound: Vec<std::net::TcpListener>,
    /// 15006, fed by sk_lookup.
    pub inbound: std::net::TcpListener,
    /// 15008.
    pub hbone: std::net::TcpListener,
}

impl Listeners {
    /// Each listener's descriptor and kind, for a successor taking them over (see
    /// [`adopt`]). Valid while the listeners are.
    pub fn fds(&self) -> Vec<(&'static str, RawFd)> {
        let mut v: Vec<_> = self.outbound.iter().map(|l| (OUTBOUND, l.as_raw_fd())).collect();
        v.push((INBOUND, self.inbound.as_raw_fd()));
        v.push((HBONE, self.hbone.as_raw_fd()));
        v
    }
}

pub const OUTBOUND: &str = "outbound";
pub const INBOUND: &str = "inbound";
pub const HBONE: &str = "hbone";

/// Listeners a predecessor handed over, by kind, as received.
pub type Handed = Vec<(String, OwnedFd)>;

/// Runs inside the workload's netns: takes a predecessor's listeners for this netns, if they
/// are what they claim: TCP listeners on the mesh's ports, in this very netns (its cookie).
pub fn adopt(handed: Handed) -> Result<Listeners, String> {
    let here = crate::netns::this_netns_cookie().map_err(|e| format!("reading this netns' cookie: {e}"))?;
    let (mut outbound, mut inbound, mut hbone) = (Vec::new(), None, None);
    for (kind, fd) in handed {
        let l = std::net::TcpListener::from(fd);
        let port = l.local_addr().map_err(|e| format!("a handed {kind} socket: {e}"))?.port();
        let listening = socket2::SockRef::from(&l).is_listener().unwrap_or(false);
        let cookie = crate::netns::socket_netns_cookie(&l).map_err(|e| format!("a handed {kind} socket: {e}"))?;
        let want = match kind.as_str() {
            OUTBOUND => OUTBOUND_PORT,
            INBOUND => INBOUND_PORT,
            HBONE => HBONE_PORT,
            other => return Err(format!("a handed socket of unknown kind {other:?}")),
        };
        if port != want || !listening || cookie != here {
            return Err(format!(
                "the handed {kind} socket is not a listener on port {want} in this netns (port {port}, listening {listening}, netns cookie {cookie}, here {here})"
            ));
        }
        l.set_nonblocking(true).map_err(|e| format!("a handed {kind} socket: {e}"))?;
        match kind.as_str() {
            OUTBOUND => outbound.push(l),
            INBOUND => inbound = Some(l),
            _ => hbone = Some(l),
        }
    }
    match (outbound.is_empty(), inbound, hbone) {
        (false, Some(inbound), Some(hbone)) => Ok(Listeners { outbound, inbound, hbone }),
        _ => Err("the handed listeners are incomplete (an outbound, the inbound and the HBONE one are needed)".into()),
    }
}

/// Runs inside the workload's netns.
pub fn bind() -> Result<Listeners, (SocketAddr, std::io::Error)> {
    let v4_lo: SocketAddr = (Ipv4Addr::LOCALHOST, OUTBOUND_PORT).into();
    let mut outbound = vec![listen(v4_lo, false)?];
    // [::1] only if the pod has IPv6 loopback; a v4-only pod never connects over v6.
    if let Ok(l) = listen((Ipv6Addr::LOCALHOST, OUTBOUND_PORT).into(), true) {
        outbound.push(l);
    }
    let inbound = listen_any(INBOUND_PORT)?;
    let hbone = listen_any(HBONE_PORT)?;
    Ok(Listeners { outbound, inbound, hbone })
}

/// A dual-stack wildcard listener (sk_lookup assigns both families to it), or IPv4 only when
/// the netns has IPv6 disabled.
fn listen_any(port: u16) -> Result<std::net::TcpListener, (SocketAddr, std::io::Error)> {
    listen((Ipv6Addr::UNSPECIFIED, port).into(), false).or_else(|_| listen((Ipv4Addr::UNSPECIFIED, port).into(), false))
}

fn listen(addr: SocketAddr, v6only: bool) -> Result<std::net::TcpListener, (SocketAddr, std::io::Error)> {
    let mk = || -> std::io::Result<std::net::TcpListener> {
        let s = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        if addr.is_ipv6() {
            s.set_only_v6(v6only)?;
        }
        s.set_reuse_address(true)?;
        s.set_nonblocking(true)?;
        s.bind(&addr.into())?;
        s.listen(1024)?;
        Ok(s.into())
    };
    mk().map_err(|e| (addr, e))
}

/// Where sk_lookup finds a workload address's inbound socket.
pub fn inbound_key(ip: IpAddr) -> InboundKey {
    match ip {
        IpAddr::V4(v4) => InboundKey::v4(u32::from_ne_bytes(v4.octets())),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let mut w = [0u32; 4];
            for (i, c) in o.chunks(4).enumerate() {
                w[i] = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]);
            }
            InboundKey::v6(w)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inbound_keys_match_what_sk_lookup_reads() {
        // sk_lookup's local_ip4 is the network-order word; on the host that is from_ne_bytes.
        let k = inbound_key("10.20.1.10".parse().unwrap());
        assert_eq!(k, InboundKey::v4(u32::from_ne_bytes([10, 20, 1, 10])));
        let k6 = inbound_key("fd00::1".parse().unwrap());
        assert_eq!(k6.family, mesh_common::AF_INET6 as u32);
        assert_eq!(k6.addr[0].to_ne_bytes(), [0xfd, 0, 0, 0]);
    }
}
