//! The workloads added through the local API, kept in `<state-dir>/workloads.json` so that a
//! restarted agent captures them again. Written whole and renamed into place: a crash leaves
//! the old file or the new one, never half of one.

use std::path::{Path, PathBuf};

use mesh_model::Workload;

pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    pub fn new(state_dir: &Path) -> StateFile {
        StateFile { path: state_dir.join("workloads.json") }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The workloads a previous run added; none (logged) when the file is unreadable.
    pub fn load(&self) -> Vec<Workload> {
        match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::error!(path = %self.path.display(), error = %e, "ignoring unreadable state file");
                Vec::new()
            }),
            Err(_) => Vec::new(),
        }
    }

    pub fn save(&self, list: &[&Workload]) -> std::io::Result<()> {
        let tmp = self.path.with_extension("json.tmp");
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&tmp, serde_json::to_vec_pretty(list)?)?;
        std::fs::rename(&tmp, &self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_and_loads_and_a_failed_write_leaves_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = StateFile::new(dir.path());
        assert!(f.load().is_empty());
        let w: Workload = serde_yaml::from_str("name: a\nips: [10.0.0.1]\n").unwrap();
        f.save(&[&w]).unwrap();
        assert_eq!(f.load(), vec![w.clone()]);
        // The temporary name taken by a directory: the write fails, the file stays.
        std::fs::create_dir(dir.path().join("workloads.json.tmp")).unwrap();
        assert!(f.save(&[]).is_err());
        assert_eq!(f.load(), vec![w]);
    }
}
