//! HTTP requests from inside a network namespace (the agents' metrics and readiness listen in
//! their node's netns).

use std::fs::File;
use std::io::Write;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};

/// An HTTP/1.1 GET from inside a netns (a thread that enters it): (status, body).
pub fn http_get(netns: &str, addr: &str, path: &str) -> Result<(u16, String)> {
    let ns = File::open(format!("/run/netns/{netns}"))?;
    let addr: SocketAddr = addr.parse()?;
    let path = path.to_owned();
    std::thread::spawn(move || -> Result<(u16, String)> {
        // SAFETY: setns on this short-lived thread only.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns: {}", std::io::Error::last_os_error());
        }
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
        let mut raw = String::new();
        std::io::Read::read_to_string(&mut s, &mut raw)?;
        let (head, body) = raw.split_once("\r\n\r\n").ok_or_else(|| anyhow!("malformed HTTP response"))?;
        let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        Ok((status, body.to_owned()))
    })
    .join()
    .map_err(|_| anyhow!("http_get thread panicked"))?
}
