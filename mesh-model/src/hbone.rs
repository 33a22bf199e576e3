//! HBONE CONNECT requests as the destination agent checks them before any dial: what a peer
//! may ask for. Pure, and fuzzed (fuzz/: `hbone_connect`).

use std::net::{IpAddr, SocketAddr};

use http::Method;

/// Why a CONNECT request was refused before any dial (answered 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadRequest {
    NotConnect,
    NoAuthority,
    BadAuthority,
    NotLocal,
    MeshPort,
    /// A `forwarded` header that is not one `for=` address.
    BadForwarded,
    /// A stated client address that is no workload of the peer's verified identity.
    ForgedSource,
}

impl BadRequest {
    pub fn label(self) -> &'static str {
        match self {
            BadRequest::NotConnect => "hbone_not_connect",
            BadRequest::NoAuthority => "hbone_no_authority",
            BadRequest::BadAuthority => "hbone_bad_authority",
            BadRequest::NotLocal => "hbone_destination_not_local",
            BadRequest::MeshPort => "hbone_mesh_port",
            BadRequest::BadForwarded => "hbone_bad_forwarded",
            BadRequest::ForgedSource => "hbone_source_not_peers",
        }
    }
}

/// The destination a CONNECT request asks for, if this workload may serve it. Pure: checked
/// before any dial.
pub fn parse_connect(method: &Method, uri: &http::Uri, local_ips: &[IpAddr]) -> Result<SocketAddr, BadRequest> {
    if method != Method::CONNECT {
        return Err(BadRequest::NotConnect);
    }
    let auth = uri.authority().ok_or(BadRequest::NoAuthority)?;
    // An address, never a name: the agent resolves nothing on behalf of a peer.
    let dst: SocketAddr = auth.as_str().parse().map_err(|_| BadRequest::BadAuthority)?;
    if dst.port() == 0 {
        return Err(BadRequest::BadAuthority);
    }
    if !local_ips.contains(&dst.ip()) {
        return Err(BadRequest::NotLocal);
    }
    if mesh_common::is_mesh_port(dst.port()) {
        return Err(BadRequest::MeshPort);
    }
    Ok(dst)
}

/// The header in which the source agent states its client's address (RFC 7239's `Forwarded`,
/// with one `for=` pair: `for=10.20.1.10`, `for="[fd20:1::10]"`). A claim, which the
/// destination checks against the workload records of the peer's verified identity.
pub const FORWARDED: &str = "forwarded";

/// The `forwarded` header's value for a client at `ip`.
pub fn forwarded_for(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("for={v4}"),
        IpAddr::V6(v6) => format!("for=\"[{v6}]\""),
    }
}

/// The client address stated in a request's `forwarded` headers (`values`): none without one,
/// an error for anything but a single header with a single `for=` address. Pure.
pub fn parse_forwarded<'a>(mut values: impl Iterator<Item = &'a [u8]>) -> Result<Option<IpAddr>, BadRequest> {
    let Some(v) = values.next() else { return Ok(None) };
    if values.next().is_some() {
        return Err(BadRequest::BadForwarded);
    }
    let v = std::str::from_utf8(v).map_err(|_| BadRequest::BadForwarded)?.trim();
    let (key, node) = v.split_once('=').ok_or(BadRequest::BadForwarded)?;
    if !key.trim().eq_ignore_ascii_case("for") {
        return Err(BadRequest::BadForwarded);
    }
    let node = node.trim();
    let node = node.strip_prefix('"').and_then(|n| n.strip_suffix('"')).unwrap_or(node);
    let node = node.strip_prefix('[').and_then(|n| n.strip_suffix(']')).unwrap_or(node);
    let ip: IpAddr = node.parse().map_err(|_| BadRequest::BadForwarded)?;
    Ok(Some(ip.to_canonical()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips() -> Vec<IpAddr> {
        vec!["10.20.2.10".parse().unwrap()]
    }

    #[test]
    fn connect_requests_are_checked_before_any_dial() {
        let ok = parse_connect(&Method::CONNECT, &"10.20.2.10:8080".parse().unwrap(), &ips());
        assert_eq!(ok, Ok("10.20.2.10:8080".parse().unwrap()));
        let cases: &[(Method, &str, BadRequest)] = &[
            (Method::GET, "10.20.2.10:8080", BadRequest::NotConnect),
            (Method::POST, "10.20.2.10:8080", BadRequest::NotConnect),
            (Method::CONNECT, "/path-only", BadRequest::NoAuthority),
            (Method::CONNECT, "example.com:80", BadRequest::BadAuthority),
            (Method::CONNECT, "10.20.2.10:0", BadRequest::BadAuthority),
            (Method::CONNECT, "10.20.9.9:8080", BadRequest::NotLocal),
            (Method::CONNECT, "10.20.2.10:15008", BadRequest::MeshPort),
            (Method::CONNECT, "10.20.2.10:15006", BadRequest::MeshPort),
        ];
        for (m, u, want) in cases {
            assert_eq!(parse_connect(m, &u.parse().unwrap(), &ips()), Err(*want), "{m} {u}");
        }
    }

    #[test]
    fn forwarded_states_one_client_address() {
        let one = |v: &str| parse_forwarded([v.as_bytes()].into_iter());
        for ip in ["10.20.1.10", "fd20:1::10"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(one(&forwarded_for(ip)), Ok(Some(ip)));
        }
        assert_eq!(one("For=\"10.20.1.10\""), Ok(Some("10.20.1.10".parse().unwrap())));
        assert_eq!(one("for=\"[::ffff:10.20.1.10]\""), Ok(Some("10.20.1.10".parse().unwrap())));
        assert_eq!(parse_forwarded(std::iter::empty()), Ok(None));
        for bad in [
            "",
            "for=",
            "by=10.0.0.1",
            "for=10.20.1.10;proto=http",
            "for=10.20.1.10, for=10.0.0.2",
            "for=_hidden",
            "for=unknown",
            "for=10.20.1.10:80",
            "for=[fd20:1::10]:80",
        ] {
            assert_eq!(one(bad), Err(BadRequest::BadForwarded), "{bad}");
        }
        assert_eq!(parse_forwarded([b"\xff".as_slice()].into_iter()), Err(BadRequest::BadForwarded));
        let two = parse_forwarded([b"for=10.0.0.1".as_slice(), b"for=10.0.0.2".as_slice()].into_iter());
        assert_eq!(two, Err(BadRequest::BadForwarded));
    }
}
