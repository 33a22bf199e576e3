//! One controller per state directory. The state directory holds CA state that a controller
//! generates once and then keeps (`root.pem` and `root-key.pem`, each mesh's under `meshes/`)
//! and the trust bundle agents read: two controllers sharing it could each generate a root
//! and sign with a key the other's bundle does not have. So a controller takes an exclusive
//! lock on `<state-dir>/controller.lock` (flock, not blocking) before it reads or writes any
//! state there, and holds it for its life: the kernel releases it when the process ends,
//! however it ends, so a crashed controller leaves no stale lock. A second controller started
//! on the same directory exits at once with an error naming the holder.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;

/// The lock file's name in the state directory; it holds the holder's PID.
pub const LOCK_FILE: &str = "controller.lock";

/// The held lock (released when dropped, or when the process ends).
pub struct StateLock {
    _file: File,
    pub path: PathBuf,
}

/// Takes the state directory's lock (creating the directory if missing), or fails naming the
/// directory, the controller that holds it, and what to do.
pub fn lock(dir: &Path) -> anyhow::Result<StateLock> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating the state directory {}", dir.display()))?;
    let path = dir.join(LOCK_FILE);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("opening the state directory's lock {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            let holder = match text.trim().parse::<u32>() {
                Ok(pid) => format!("another mesh-controller (PID {pid})"),
                Err(_) => "another mesh-controller".to_owned(),
            };
            anyhow::bail!(
                "the state directory {} is in use: {holder} holds its lock ({}). Two controllers sharing one state directory would corrupt its CA state, so this one does not start. Run one controller per state directory; for several replicas, give each its own --state-dir and the same CA (--ca-cert and --ca-key, made once with `mesh-controller ca init`, and every Mesh its own spec.ca)",
                dir.display(),
                path.display()
            );
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("locking the state directory's lock {}", path.display()));
        }
    }
    // Ours now: say who holds it (for the next one's error).
    let note = (|| -> std::io::Result<()> {
        file.set_len(0)?;
        file.rewind()?;
        writeln!(file, "{}", std::process::id())?;
        file.flush()
    })();
    note.with_context(|| format!("writing {}", path.display()))?;
    Ok(StateLock { _file: file, path })
}

#[cfg(test)]
mod tests {
    /// A second lock on the same directory fails naming the directory and the holder's PID
    /// (flock conflicts between two opens even within one process); released, it can be taken
    /// again.
    #[test]
    fn a_second_controller_on_one_state_dir_is_refused_until_the_first_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let first = super::lock(&state).unwrap();
        let e = format!("{:#}", super::lock(&state).err().expect("a second lock was taken"));
        for want in [
            state.display().to_string(),
            format!("PID {}", std::process::id()),
            "another mesh-controller".to_owned(),
            "one controller per state directory".to_owned(),
            "its own --state-dir".to_owned(),
        ] {
            assert!(e.contains(&want), "{want:?} missing from: {e}");
        }
        assert_eq!(std::fs::read_to_string(&first.path).unwrap().trim(), std::process::id().to_string());
        drop(first);
        let again = super::lock(&state).unwrap();
        drop(again);
    }
}
