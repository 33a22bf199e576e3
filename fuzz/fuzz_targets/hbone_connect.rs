//! An HBONE CONNECT request's method, authority and `forwarded` header (input:
//! `METHOD\nURI[\nFORWARDED]`), as the destination agent checks them before any dial (the
//! HTTP/2 framing and header decoding before it are the h2 library's): never panics, what is
//! admitted is one of the workload's own addresses, never a mesh port, and a stated client
//! address is one address, never an IPv4-mapped IPv6 one.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(nl) = data.iter().position(|b| *b == b'\n') else { return };
    let (method, rest) = (&data[..nl], &data[nl + 1..]);
    let (uri, forwarded) = match rest.iter().position(|b| *b == b'\n') {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    };
    if let Some(f) = forwarded {
        if let Ok(Some(ip)) = mesh_model::hbone::parse_forwarded([f].into_iter()) {
            assert_eq!(ip, ip.to_canonical(), "{ip} admitted as stated");
        }
    }
    let (Ok(method), Ok(uri)) = (http::Method::from_bytes(method), http::Uri::try_from(uri)) else {
        return;
    };
    let local: [std::net::IpAddr; 2] = ["10.20.2.10".parse().unwrap(), "fd00::10".parse().unwrap()];
    if let Ok(dst) = mesh_model::hbone::parse_connect(&method, &uri, &local) {
        assert!(local.contains(&dst.ip()), "{dst} admitted");
        assert!(dst.port() != 0 && !mesh_common::is_mesh_port(dst.port()), "{dst} admitted");
    }
});
