//! The one question the agent asks the Kubernetes API server, once, when it is told to stop:
//! does the DaemonSet it runs as still exist?
//!
//! A stopping agent keeps its programs attached (P6): its pods fail closed until the next agent
//! takes over. That is right for an upgrade, a node drain or a crash, and wrong for an uninstall:
//! deleting the DaemonSet would leave every meshed pod unable to connect. The controller cannot
//! be asked (an uninstall deletes it too, in no particular order), so the agent reads its own
//! DaemonSet — one GET, allowed by a Role naming that one object. Gone, or being deleted: the
//! agent detaches everything it pinned. Present, or the answer unknown (API unreachable, not
//! allowed): it keeps them (fail closed).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Where the API server is and how the agent proves itself to it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KubeApi {
    /// `https://host:port` (or `http://` for a test's fake API server).
    pub url: String,
    pub token_file: PathBuf,
    /// The cluster's CA (https only).
    pub ca_file: PathBuf,
}

/// What became of the agent's DaemonSet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    Present,
    /// It has a deletionTimestamp (a foreground deletion).
    Deleting,
    /// 404.
    Gone,
}

/// The largest answer read (a DaemonSet is a few KiB).
const MAX_RESPONSE: usize = 1 << 20;

/// Asks the API server for DaemonSet `namespace/name`, within `timeout`.
pub async fn daemonset(api: &KubeApi, namespace: &str, name: &str, timeout: Duration) -> Result<Owner, String> {
    let path = format!("/apis/apps/v1/namespaces/{namespace}/daemonsets/{name}");
    let (code, body) = tokio::time::timeout(timeout, get(api, &path))
        .await
        .map_err(|_| format!("no answer from {} within {timeout:?}", api.url))??;
    decide(code, &body, name).map_err(|e| format!("GET {path}: {e}"))
}

/// What an answer says of DaemonSet `name`. Only the API server's own NotFound for that
/// DaemonSet is "gone": a 404 from anything else on the way (a proxy, a wrong path) would
/// detach every program of the node on a routine restart. Anything unexpected is an error,
/// which the caller takes as "keep" (fail closed).
fn decide(code: u16, body: &[u8], name: &str) -> Result<Owner, String> {
    match code {
        404 => {
            let v: serde_json::Value =
                serde_json::from_slice(body).map_err(|_| "HTTP 404 without the API server's Status".to_owned())?;
            let d = &v["details"];
            if v["kind"] == "Status" && v["reason"] == "NotFound" && d["kind"] == "daemonsets" && d["name"] == name {
                Ok(Owner::Gone)
            } else {
                Err(format!("HTTP 404 that is not the API server's NotFound for daemonset {name}: {v}"))
            }
        }
        200 => {
            let v: serde_json::Value =
                serde_json::from_slice(body).map_err(|e| format!("the DaemonSet's JSON: {e}"))?;
            if v["metadata"]["deletionTimestamp"].is_string() {
                Ok(Owner::Deleting)
            } else {
                Ok(Owner::Present)
            }
        }
        c => Err(format!("HTTP {c}: {}", String::from_utf8_lossy(&body[..body.len().min(300)]))),
    }
}

async fn get(api: &KubeApi, path: &str) -> Result<(u16, Vec<u8>), String> {
    let (tls, rest) = match api.url.split_once("://") {
        Some(("https", r)) => (true, r),
        Some(("http", r)) => (false, r),
        _ => return Err(format!("{}: not an http(s) URL", api.url)),
    };
    let authority = rest.trim_end_matches('/');
    let host = match authority.rsplit_once(':') {
        Some((h, p)) if p.parse::<u16>().is_ok() => h,
        _ => authority,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let addr = if authority.contains(':') && !authority.ends_with(']') {
        authority.to_owned()
    } else {
        format!("{authority}:{}", if tls { 443 } else { 80 })
    };
    let token = std::fs::read_to_string(&api.token_file)
        .map_err(|e| format!("reading the token {}: {e}", api.token_file.display()))?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nAuthorization: Bearer {}\r\nAccept: application/json\r\nConnection: close\r\n\r\n",
        token.trim()
    );
    let tcp = tokio::net::TcpStream::connect(&addr).await.map_err(|e| format!("connecting to {addr}: {e}"))?;
    let raw = if tls {
        let pem =
            std::fs::read_to_string(&api.ca_file).map_err(|e| format!("reading {}: {e}", api.ca_file.display()))?;
        let mut roots = rustls::RootCertStore::empty();
        for der in mesh_identity::verify::pem_to_ders(&pem) {
            roots.add(der).map_err(|e| format!("{}: {e}", api.ca_file.display()))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = rustls_pki_types::ServerName::try_from(host.to_owned()).map_err(|e| format!("{host}: {e}"))?;
        let s = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS with {addr}: {e}"))?;
        exchange(s, &request).await?
    } else {
        exchange(tcp, &request).await?
    };
    parse_response(&raw)
}

async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, request: &str) -> Result<Vec<u8>, String> {
    s.write_all(request.as_bytes()).await.map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match s.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) if out.len() + n <= MAX_RESPONSE => out.extend_from_slice(&buf[..n]),
            Ok(_) => return Err(format!("answer longer than {MAX_RESPONSE} bytes")),
            // A server that closes without a TLS close_notify has still sent its answer.
            Err(_) if !out.is_empty() => break,
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(out)
}

/// An HTTP/1.1 response: its status and body (chunked transfer decoded).
fn parse_response(raw: &[u8]) -> Result<(u16, Vec<u8>), String> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or("no HTTP header in the answer")?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let body = &raw[split + 4..];
    let code = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("not an HTTP status line: {:?}", head.lines().next()))?;
    let chunked = head.lines().any(|l| {
        l.split_once(':').is_some_and(|(n, v)| {
            n.eq_ignore_ascii_case("transfer-encoding") && v.trim().eq_ignore_ascii_case("chunked")
        })
    });
    if !chunked {
        return Ok((code, body.to_vec()));
    }
    let mut out = Vec::new();
    let mut rest = body;
    loop {
        let eol = rest.windows(2).position(|w| w == b"\r\n").ok_or("a chunk without its size line")?;
        let size_text = String::from_utf8_lossy(&rest[..eol]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| format!("bad chunk size {size_text:?}"))?;
        rest = &rest[eol + 2..];
        if size == 0 {
            return Ok((code, out));
        }
        if rest.len() < size {
            return Err("a chunk shorter than its size".into());
        }
        out.extend_from_slice(&rest[..size]);
        rest = rest.get(size + 2..).unwrap_or(&[]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_api_servers_notfound_for_this_daemonset_is_gone() {
        let nf = |kind: &str, name: &str| {
            format!(
                r#"{{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"NotFound","details":{{"name":"{name}","group":"apps","kind":"{kind}"}},"code":404}}"#
            )
        };
        assert_eq!(decide(404, nf("daemonsets", "ds").as_bytes(), "ds"), Ok(Owner::Gone));
        // Another object's NotFound, a proxy's 404 page, no body: not gone (kept).
        assert!(decide(404, nf("daemonsets", "other").as_bytes(), "ds").is_err());
        assert!(decide(404, nf("pods", "ds").as_bytes(), "ds").is_err());
        assert!(decide(404, b"<html>404 Not Found</html>", "ds").is_err());
        assert!(decide(404, b"", "ds").is_err());
        assert_eq!(decide(200, br#"{"metadata":{"name":"ds"}}"#, "ds"), Ok(Owner::Present));
        assert_eq!(
            decide(200, br#"{"metadata":{"name":"ds","deletionTimestamp":"2026-01-01T00:00:00Z"}}"#, "ds"),
            Ok(Owner::Deleting)
        );
        // The service account gone with the namespace (an uninstall that deleted everything at
        // once), or not allowed: unknown, kept.
        assert!(decide(401, b"{}", "ds").is_err());
        assert!(decide(403, b"{}", "ds").is_err());
        assert!(decide(200, b"not json", "ds").is_err());
    }

    #[test]
    fn responses_plain_and_chunked() {
        let plain = b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\n{}";
        assert_eq!(parse_response(plain).unwrap(), (404, b"{}".to_vec()));
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"a\":\r\n2;x=y\r\n1}\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked).unwrap(), (200, b"{\"a\":1}".to_vec()));
        assert!(parse_response(b"garbage").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nff\r\nab").is_err());
    }
}
