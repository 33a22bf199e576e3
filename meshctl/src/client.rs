//! One HTTP/1.1 GET to the agent's admin API, its body decoded into the API's own type.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;

pub fn get<T: DeserializeOwned>(addr: SocketAddr, path: &str) -> Result<T> {
    let body = get_raw(addr, path)?;
    serde_json::from_str(&body).with_context(|| {
        format!("{path}: the agent's answer does not match this meshctl's API types (are they the same version?)")
    })
}

/// The body as the agent sent it (for `-o json`).
pub fn get_raw(addr: SocketAddr, path: &str) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAccept: application/json\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").context("malformed HTTP response")?;
    let status = head.split_whitespace().nth(1).unwrap_or("");
    if status != "200" {
        bail!("{path}: HTTP {status}: {body}");
    }
    Ok(body.to_owned())
}
