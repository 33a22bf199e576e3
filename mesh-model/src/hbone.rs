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
}

impl BadRequest {
    pub fn label(self) -> &'static str {
        match self {
            BadRequest::NotConnect => "hbone_not_connect",
            BadRequest::NoAuthority => "hbone_no_authority",
            BadRequest::BadAuthority => "hbone_bad_authority",
            BadRequest::NotLocal => "hbone_destination_not_local",
            BadRequest::MeshPort => "hbone_mesh_port",
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
}
