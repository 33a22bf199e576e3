//! The local API: JSON lines over a root-only Unix socket (mode 0600, and the peer's uid is
//! checked with SO_PEERCRED). One request per line, one response per line:
//!   {"op":"add_workload","workload":{...}}      capture a workload (persisted across restarts)
//!   {"op":"remove_workload","namespace":"default","name":"a"}
//!   {"op":"workloads"}                            the captured workloads and their kernel facts
//!   {"op":"stats"}                                kernel counters, map fill, agent counters
//!   {"op":"config"}                               the agent's configuration
//!   {"op":"certs"}                                the identities served and their certificates

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::app::Agent;
use mesh_model::{Workload, WorkloadKey};

/// Longest accepted request line: a workload record is far smaller.
const MAX_LINE: usize = 64 * 1024;

#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
enum Request {
    AddWorkload { workload: Workload },
    RemoveWorkload { namespace: String, name: String },
    Workloads,
    Stats,
    Config,
    Certs,
}

pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

pub async fn serve(agent: Arc<Agent>, listener: UnixListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let agent = agent.clone();
        tokio::spawn(async move {
            match stream.peer_cred() {
                Ok(c) if c.uid() == 0 => handle(agent, stream).await,
                Ok(c) => {
                    tracing::warn!(uid = c.uid(), "refused local API client: only root may use it");
                }
                Err(_) => {}
            }
        });
    }
}

async fn handle(agent: Arc<Agent>, stream: UnixStream) {
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
            respond(&agent, buf.trim()).await
        };
        let mut out = resp.to_string();
        out.push('\n');
        if w.write_all(out.as_bytes()).await.is_err() || n > MAX_LINE {
            return;
        }
    }
}

async fn respond(agent: &Arc<Agent>, line: &str) -> serde_json::Value {
    let req: Request = match serde_json::from_str(line) {
        Ok(r) => r,
        Err(e) => {
            return serde_json::json!({"ok": false, "error": format!(
                "bad request: {e}; send one JSON object per line with \"op\" one of add_workload, remove_workload, workloads, stats, config")})
        }
    };
    let result = match req {
        Request::AddWorkload { workload } => agent.add_workload(workload, true).await.map(|_| serde_json::Value::Null),
        Request::RemoveWorkload { namespace, name } => {
            agent.remove_workload(&WorkloadKey { namespace, name }, true).await.map(|_| serde_json::Value::Null)
        }
        Request::Workloads => Ok(agent.workloads_json()),
        Request::Stats => Ok(agent.stats_json()),
        Request::Config => Ok(serde_json::to_value(&agent.config).unwrap_or_default()),
        Request::Certs => Ok(agent.identities.certs_json()),
    };
    match result {
        Ok(v) => serde_json::json!({"ok": true, "result": v}),
        Err(e) => serde_json::json!({"ok": false, "error": e.to_string()}),
    }
}
