//! `mesh-controller node add`: creates a node's credential for static node authentication.
//!
//! Two files come out of it, both mode 0600: the controller's list (`--node-credentials`,
//! `nodes: [{name, credential}]`), to which the node is added (written atomically; the running
//! controller reloads it), and the node's own credential file (the credential alone, on one
//! line), which goes to that node and is given to its agent as `--node-credential-file`.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// 32 random bytes, hex: far beyond guessing, and plain ASCII for an HTTP header.
fn new_credential() -> anyhow::Result<String> {
    let mut b = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .map_err(|_| anyhow::anyhow!("the system's random source failed"))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Adds `name` to the list at `list` (created if absent) and writes its credential to `out`.
/// Refuses a node already listed and an `out` that exists: a credential is never replaced by
/// accident. The list is rewritten whole (comments in it are not kept), under a lock on its
/// directory so that two runs at once cannot lose an entry.
pub fn add(list: &Path, name: &str, out: &Path) -> anyhow::Result<()> {
    if !mesh_model::workload::is_node_name(name) {
        bail!("node name {name:?}: use only letters, digits, '-', '.' and '_' (the agent's --node)");
    }
    let dir = match list.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let lock = std::fs::File::open(&dir).with_context(|| format!("opening {}", dir.display()))?;
    lock.lock().with_context(|| format!("locking {}", dir.display()))?;
    let mut nodes = match std::fs::metadata(list) {
        // The same checks the controller makes when it loads the list.
        Ok(_) => crate::auth::StaticCredentials::load(list)?.into_entries(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Default::default(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", list.display())),
    };
    if nodes.contains_key(name) {
        bail!("node {name} is already in {}; remove its entry first to issue a new credential", list.display());
    }
    nodes.insert(name.to_owned(), new_credential()?);
    let credential = nodes[name].clone();
    let file = crate::auth::File {
        nodes: nodes.iter().map(|(n, c)| crate::auth::Entry { name: n.clone(), credential: c.clone() }).collect(),
    };
    let text = format!(
        "# Node credentials for mesh-controller --node-credentials (rewritten by `mesh-controller node add`).\n{}",
        serde_yaml::to_string(&file)?
    );
    // The result must load and say exactly what was meant, or nothing is written.
    let reread = crate::auth::StaticCredentials::parse(&list.display().to_string(), &text)?.into_entries();
    if reread != nodes {
        bail!("{} would not read back as written; nothing changed", list.display());
    }

    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .with_context(|| format!("creating {} (it must not exist yet)", out.display()))?;
    f.write_all(format!("{credential}\n").as_bytes())?;
    f.sync_all()?;

    let tmp: PathBuf = list.with_extension(format!("tmp.{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, list).with_context(|| format!("replacing {}", list.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[tokio::test]
    async fn a_node_added_gets_a_private_credential_the_controller_accepts() {
        use crate::auth::NodeAuthenticator;
        let dir = std::env::temp_dir().join(format!("sockmesh-nodes-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let list = dir.join("nodes.yaml");
        add(&list, "n1", &dir.join("n1.credential")).unwrap();
        add(&list, "n2", &dir.join("n2.credential")).unwrap();
        for f in ["nodes.yaml", "n1.credential", "n2.credential"] {
            let mode = std::fs::metadata(dir.join(f)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{f}");
        }
        let creds = crate::auth::StaticCredentials::load(&list).unwrap();
        let c1 = std::fs::read_to_string(dir.join("n1.credential")).unwrap();
        let c2 = std::fs::read_to_string(dir.join("n2.credential")).unwrap();
        assert_eq!(c1.trim().len(), 64);
        assert_ne!(c1, c2);
        assert_eq!(creds.authenticate(c1.trim()).await.unwrap(), "n1");
        assert_eq!(creds.authenticate(c2.trim()).await.unwrap(), "n2");

        // Never replaced by accident: a listed node, an existing output file, a bad name.
        let e = add(&list, "n1", &dir.join("again")).unwrap_err().to_string();
        assert!(e.contains("already in"), "{e}");
        let e = add(&list, "n3", &dir.join("n1.credential")).unwrap_err();
        assert!(format!("{e:#}").contains("must not exist"), "{e:#}");
        assert!(
            !crate::auth::StaticCredentials::load(&list).unwrap().into_entries().contains_key("n3"),
            "nothing half-written"
        );
        assert!(add(&list, "n 4", &dir.join("n4")).is_err());

        // Entries written by hand, with characters YAML cares about, keep their values.
        use std::os::unix::fs::OpenOptionsExt;
        let odd = "'quoted: #hash, {brace}& *x !y  ";
        let _ = std::fs::remove_file(&list);
        let mut f =
            std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&list).unwrap();
        f.write_all(format!("# mine\nnodes:\n- name: n9\n  credential: \"{}\"\n", odd.replace('"', "\\\"")).as_bytes())
            .unwrap();
        drop(f);
        add(&list, "n5", &dir.join("n5.credential")).unwrap();
        let creds = crate::auth::StaticCredentials::load(&list).unwrap();
        assert_eq!(creds.authenticate(odd).await.unwrap(), "n9");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
