//! Who is calling: a node proves itself with a credential. One trait, two sources: static
//! per-node credentials from a root-only file (local mode) and, on Kubernetes, the agent's
//! projected service-account token checked by TokenReview.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no credential: send `authorization: Bearer <node credential>`")]
    Missing,
    #[error("unknown node credential")]
    Unknown,
    #[error("the credential was valid but names no node")]
    NoNode,
    #[error("credential check unavailable: {0}")]
    Unavailable(String),
    #[error("too many credentials to check at once; retry in a moment")]
    RateLimited,
}

impl AuthError {
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing_credential",
            AuthError::Unknown => "unknown_credential",
            AuthError::NoNode => "no_node",
            AuthError::Unavailable(_) => "auth_unavailable",
            AuthError::RateLimited => "auth_rate_limited",
        }
    }

    /// The gRPC status a caller gets: retry later when the check could not be made, else
    /// unauthenticated.
    pub fn status(&self) -> tonic::Status {
        match self {
            AuthError::Unavailable(_) | AuthError::RateLimited => tonic::Status::unavailable(self.to_string()),
            _ => tonic::Status::unauthenticated(self.to_string()),
        }
    }
}

/// Who a credential proves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A node's agent: it may obtain the identities of the workloads placed on its node, and is
    /// sent its node's configuration.
    Node(String),
    /// A zone's east-west gateway, by its own service account's token (Kubernetes): it may
    /// obtain the gateway's identity and nothing else, and is sent the configuration every node
    /// shares (no node's own part). `node` is where its pod runs, for the logs.
    Gateway { node: String },
}

impl Caller {
    /// The node whose own part of the configuration the caller is sent: none for a gateway.
    pub fn view_node(&self) -> &str {
        match self {
            Caller::Node(n) => n,
            Caller::Gateway { .. } => "",
        }
    }
}

/// In tests, a node's agent compares equal to its node's name.
#[cfg(test)]
impl PartialEq<&str> for Caller {
    fn eq(&self, other: &&str) -> bool {
        matches!(self, Caller::Node(n) if n == other)
    }
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Caller::Node(n) => write!(f, "node {n}"),
            Caller::Gateway { node } => write!(f, "the zone's gateway (on node {node})"),
        }
    }
}

pub type AuthFuture<'a> = Pin<Box<dyn Future<Output = Result<Caller, AuthError>> + Send + 'a>>;

/// Turns a bearer credential into the caller it proves.
pub trait NodeAuthenticator: Send + Sync + 'static {
    fn authenticate<'a>(&'a self, credential: &'a str) -> AuthFuture<'a>;
}

/// Local mode: `nodes: [{name, credential}]` from a file only root may read.
pub struct StaticCredentials {
    by_node: std::sync::RwLock<BTreeMap<String, String>>,
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialsFileError {
    #[error("cannot read node credentials {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("node credentials {path} is readable by group or others (mode {mode:o}); `chmod 600` it")]
    Mode { path: String, mode: u32 },
    #[error("node credentials {path} (line {line}): {reason}; expected `nodes: [{{name: n1, credential: <secret>}}]`")]
    Parse { path: String, line: usize, reason: String },
    #[error("node credentials {path}: {reason}")]
    Invalid { path: String, reason: String },
}

/// The list's format, both ways (`mesh-controller node add` writes it).
#[derive(serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct File {
    pub nodes: Vec<Entry>,
}
#[derive(serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Entry {
    pub name: String,
    pub credential: String,
}

/// What tells one version of a file from the next: modification time, inode (a rename
/// replaces it) and size. Taken before the file is read, so a change made while it is read is
/// seen at the next check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    modified: Option<std::time::SystemTime>,
    ino: u64,
    len: u64,
}

impl FileStamp {
    pub fn of(path: &Path) -> Option<FileStamp> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        Some(FileStamp { modified: m.modified().ok(), ino: m.ino(), len: m.len() })
    }
}

/// Shortest credential accepted: anything shorter is guessable.
const MIN_CREDENTIAL_LEN: usize = 16;

impl StaticCredentials {
    pub fn load(path: &Path) -> Result<Self, CredentialsFileError> {
        use std::os::unix::fs::PermissionsExt;
        let p = path.display().to_string();
        let meta = std::fs::metadata(path).map_err(|source| CredentialsFileError::Read { path: p.clone(), source })?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(CredentialsFileError::Mode { path: p, mode });
        }
        let text =
            std::fs::read_to_string(path).map_err(|source| CredentialsFileError::Read { path: p.clone(), source })?;
        Self::parse(&p, &text)
    }

    pub fn parse(path: &str, text: &str) -> Result<Self, CredentialsFileError> {
        let f: File = serde_yaml::from_str(text).map_err(|e| CredentialsFileError::Parse {
            path: path.to_owned(),
            line: e.location().map(|l| l.line()).unwrap_or(0),
            reason: e.to_string(),
        })?;
        let mut by_node = BTreeMap::new();
        for e in f.nodes {
            if e.credential.len() < MIN_CREDENTIAL_LEN {
                return Err(CredentialsFileError::Invalid {
                    path: path.to_owned(),
                    reason: format!("node {}: credential shorter than {MIN_CREDENTIAL_LEN} characters", e.name),
                });
            }
            if by_node.values().any(|c| c == &e.credential) {
                return Err(CredentialsFileError::Invalid {
                    path: path.to_owned(),
                    reason: format!("node {}: credential shared with another node", e.name),
                });
            }
            by_node.insert(e.name, e.credential);
        }
        Ok(StaticCredentials { by_node: std::sync::RwLock::new(by_node) })
    }

    /// Node name → credential.
    pub fn into_entries(self) -> BTreeMap<String, String> {
        self.by_node.into_inner().unwrap_or_else(|e| e.into_inner())
    }

    /// Re-reads `path` when it changes (checked every second), so that a node added with
    /// `mesh-controller node add` is accepted without a restart. A file that no longer loads
    /// is reported and the last good list stays in force.
    pub fn watch(self: std::sync::Arc<Self>, path: std::path::PathBuf, loaded: Option<FileStamp>) {
        tokio::spawn(async move {
            let mut seen = loaded;
            loop {
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                let now = FileStamp::of(&path);
                if now == seen {
                    continue;
                }
                seen = now;
                match StaticCredentials::load(&path) {
                    Ok(fresh) => {
                        let nodes = fresh.into_entries();
                        tracing::info!(path = %path.display(), nodes = nodes.len(), "node credentials reloaded");
                        *self.by_node.write().unwrap_or_else(|e| e.into_inner()) = nodes;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "node credentials not reloaded; the last good list stays in force")
                    }
                }
            }
        });
    }
}

/// Compares without an early exit, so that timing does not reveal a prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl NodeAuthenticator for StaticCredentials {
    fn authenticate<'a>(&'a self, credential: &'a str) -> AuthFuture<'a> {
        Box::pin(async move {
            let mut found = None;
            let by_node = self.by_node.read().unwrap_or_else(|e| e.into_inner());
            for (node, c) in by_node.iter() {
                if constant_time_eq(c.as_bytes(), credential.as_bytes()) {
                    found = Some(node.clone());
                }
            }
            found.map(Caller::Node).ok_or(AuthError::Unknown)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn static_credentials_map_a_secret_to_its_node_only() {
        let c = StaticCredentials::parse(
            "f",
            "nodes:\n- {name: n1, credential: aaaaaaaaaaaaaaaa1}\n- {name: n2, credential: bbbbbbbbbbbbbbbb2}\n",
        )
        .unwrap();
        assert_eq!(c.authenticate("aaaaaaaaaaaaaaaa1").await.unwrap(), "n1");
        assert_eq!(c.authenticate("bbbbbbbbbbbbbbbb2").await.unwrap(), "n2");
        assert!(matches!(c.authenticate("aaaaaaaaaaaaaaaa").await, Err(AuthError::Unknown)));
        assert!(matches!(c.authenticate("").await, Err(AuthError::Unknown)));
    }

    #[test]
    fn weak_or_shared_credentials_are_refused() {
        assert!(StaticCredentials::parse("f", "nodes:\n- {name: n1, credential: short}\n").is_err());
        let e = StaticCredentials::parse(
            "f",
            "nodes:\n- {name: n1, credential: aaaaaaaaaaaaaaaa1}\n- {name: n2, credential: aaaaaaaaaaaaaaaa1}\n",
        );
        assert!(e.err().unwrap().to_string().contains("shared"));
        let e = StaticCredentials::parse("f", "nodes:\n- {name: n1, secret: x}\n").err().unwrap();
        assert!(e.to_string().contains("line 2"), "{e}");
    }
}
