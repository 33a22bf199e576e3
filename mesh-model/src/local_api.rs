//! The agent's local API (a root-only Unix socket): one JSON object per line, `op` naming what
//! to do. Parsed here, in one place, and fuzzed (fuzz/: `local_api`).

use serde::Deserialize;

use crate::Workload;

#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    AddWorkload { workload: Box<Workload> },
    RemoveWorkload { namespace: String, name: String },
    Workloads,
    Stats,
    Config,
    Certs,
}

impl Request {
    /// One request line.
    pub fn parse(line: &str) -> Result<Request, serde_json::Error> {
        serde_json::from_str(line)
    }
}
