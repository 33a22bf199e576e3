//! The local API: JSON lines over a root-only Unix socket (mode 0600, and the peer's uid is
//! checked with SO_PEERCRED). One request per line, one response per line:
//!   {"op":"add_workload","workload":{...}}      capture a workload (persisted across restarts)
//!   {"op":"remove_workload","namespace":"default","name":"a"}
//!   {"op":"workloads"}                            the captured workloads and their kernel facts
//!   {"op":"stats"}                                kernel counters, map fill, agent counters
//!   {"op":"config"}                               the agent's configuration
//!   {"op":"certs"}                                the identities served and their certificates

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use mesh_api::admin::Source;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::admin::Views;
use mesh_model::local_api::Request;
use mesh_model::WorkloadKey;

/// Longest accepted request line: a workload record is far smaller.
const MAX_LINE: usize = 64 * 1024;

const USAGE: &str =
    "send one JSON object per line with \"op\" one of add_workload, remove_workload, workloads, stats, config, certs";

pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// The inode of the socket file at `path`, if there is one.
pub fn inode(path: &Path) -> Option<u64> {
    std::fs::metadata(path).map(|m| std::os::unix::fs::MetadataExt::ino(&m)).ok()
}

/// Asks the API server to bind its path again, and says which socket file is its own.
#[derive(Default)]
pub struct Rebind {
    pub wanted: tokio::sync::Notify,
    bound: std::sync::atomic::AtomicU64,
}

impl Rebind {
    pub fn set_bound(&self, ino: Option<u64>) {
        self.bound.store(ino.unwrap_or(0), std::sync::atomic::Ordering::SeqCst);
    }

    /// The path is a successor's from now on (it binds its own there): not to be removed on
    /// exit, whatever the inode found there then.
    pub fn disown(&self) {
        self.set_bound(None);
    }

    /// Whether the socket file at `path` is the one this agent serves on (to remove on exit).
    pub fn is_ours(&self, path: &Path) -> bool {
        let ours = self.bound.load(std::sync::atomic::Ordering::SeqCst);
        ours != 0 && inode(path) == Some(ours)
    }
}

/// Serves the local API on `listener`, bound at `path`. `rebind` is notified when a successor
/// that took the path over went away without taking over: the socket is bound at `path`
/// again, unless the one there is still this one.
pub async fn serve(views: Arc<Views>, mut listener: UnixListener, path: PathBuf, rebind: Arc<Rebind>) {
    let mut bound = inode(&path);
    let mut backoff = Duration::from_millis(10);
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = rebind.wanted.notified() => {
                // Not over a socket someone answers on (a later successor's, say). Ours still
                // there (the successor went before binding its own) is kept, and ours again.
                let answered = matches!(
                    tokio::time::timeout(Duration::from_secs(1), UnixStream::connect(&path)).await,
                    Ok(Ok(_))
                );
                if answered {
                    if bound.is_some() && inode(&path) == bound {
                        rebind.set_bound(bound);
                    }
                } else {
                    match bind(&path) {
                        Ok(l) => {
                            listener = l;
                            bound = inode(&path);
                            rebind.set_bound(bound);
                            tracing::info!(path = %path.display(), "local API bound again: the successor went away");
                        }
                        Err(e) => tracing::error!(path = %path.display(), error = %e, "cannot bind the local API again"),
                    }
                }
                continue;
            }
        };
        let stream = match accepted {
            Ok((s, _)) => {
                backoff = Duration::from_millis(10);
                s
            }
            Err(e) => {
                // Out of descriptors, say: wait rather than spin, longer while it lasts.
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "local API accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let views = views.clone();
        tokio::spawn(async move {
            match stream.peer_cred() {
                Ok(c) if c.uid() == 0 => handle(views, stream).await,
                Ok(c) => tracing::warn!(uid = c.uid(), "refused local API client: only root may use it"),
                Err(_) => {}
            }
        });
    }
}

async fn handle(views: Arc<Views>, stream: UnixStream) {
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r);
    let mut buf = String::new();
    loop {
        buf.clear();
        let n = match (&mut lines).take(MAX_LINE as u64 + 1).read_line(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let resp = if n > MAX_LINE {
            serde_json::json!({"ok": false, "error": format!("request longer than {MAX_LINE} bytes")})
        } else {
            respond(&views, buf.trim()).await
        };
        let mut out = resp.to_string();
        out.push('\n');
        if w.write_all(out.as_bytes()).await.is_err() || n > MAX_LINE {
            return;
        }
    }
}

async fn respond(views: &Views, line: &str) -> serde_json::Value {
    let req = match Request::parse(line) {
        Ok(r) => r,
        Err(e) => return serde_json::json!({"ok": false, "error": format!("bad request: {e}; {USAGE}")}),
    };
    let to_json = |v: serde_json::Result<serde_json::Value>| v.map_err(|e| e.to_string());
    // Taking over from the agent running on this node: a change accepted now would be lost if
    // this agent gave up (the running one serves on without it). Asked again, it lands.
    if matches!(req, Request::AddWorkload { .. } | Request::RemoveWorkload { .. }) && views.registry.taking_over() {
        return serde_json::json!({"ok": false, "error": "this agent is taking over from the one running on this node; try again in a moment"});
    }
    let result = match req {
        Request::AddWorkload { workload } => {
            views.registry.add(*workload, Source::Api).await.map(|_| serde_json::Value::Null).map_err(|e| e.to_string())
        }
        Request::RemoveWorkload { namespace, name } => views
            .registry
            .remove(&WorkloadKey { namespace, name }, true)
            .await
            .map(|_| serde_json::Value::Null)
            .map_err(|e| e.to_string()),
        Request::Workloads => to_json(serde_json::to_value(views.registry.list())),
        Request::Stats => to_json(serde_json::to_value(views.stats().await)),
        Request::Config => to_json(serde_json::to_value(&views.config)),
        Request::Certs => to_json(serde_json::to_value(views.identities.certs())),
    };
    match result {
        Ok(v) => serde_json::json!({"ok": true, "result": v}),
        Err(e) => serde_json::json!({"ok": false, "error": e}),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_op_parses_and_the_usage_names_each() {
        for op in ["workloads", "stats", "config", "certs"] {
            assert!(serde_json::from_str::<Request>(&format!("{{\"op\":\"{op}\"}}")).is_ok(), "{op}");
            assert!(USAGE.contains(op), "{op}");
        }
        assert!(USAGE.contains("add_workload") && USAGE.contains("remove_workload"));
        assert!(serde_json::from_str::<Request>(r#"{"op":"remove_workload","namespace":"d","name":"a"}"#).is_ok());
        assert!(serde_json::from_str::<Request>(r#"{"op":"reboot"}"#).is_err());
    }
}
