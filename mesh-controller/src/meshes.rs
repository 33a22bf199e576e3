//! The controller's meshes: between the configuration source and everything that reads the
//! model, the keeper checks the meshes against each other (one trust domain each, trust only in
//! meshes that exist), gives each its CA (generated once and kept in the state directory, or
//! the operator's files), writes what agents are told about each mesh (trust domain, roots,
//! trust), and takes out the workloads of namespaces labelled for a mesh that is not there
//! (reported: they get no certificate, so their connections are refused, never plain).
//!
//! The CA service picks the signer by the trust domain a CSR asks for; the node must still run a
//! workload of that mesh with that identity.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use mesh_identity::ca::Ca;
use mesh_model::mesh::{check_meshes, MeshCa, DEFAULT_MESH, MESH_LABEL};
use mesh_model::{MeshRecord, MeshSpec, WorkloadKey};

use crate::model::Model;

/// A CA and the mesh it signs for.
pub struct Signer {
    pub mesh: String,
    pub ca: Arc<Ca>,
    /// The mesh's certificate lifetime, if it sets one (else the CA's default).
    pub ttl: Option<Duration>,
}

/// The signer of each trust domain.
#[derive(Clone, Default)]
pub struct Signers {
    by_trust_domain: HashMap<String, Arc<Signer>>,
}

impl Signers {
    pub fn only_default(ca: Arc<Ca>) -> Signers {
        let mut s = Signers::default();
        s.by_trust_domain
            .insert(ca.trust_domain().to_owned(), Arc::new(Signer { mesh: DEFAULT_MESH.into(), ca, ttl: None }));
        s
    }

    pub fn for_trust_domain(&self, td: &str) -> Option<&Arc<Signer>> {
        self.by_trust_domain.get(td)
    }
}

pub type SharedSigners = Arc<RwLock<Signers>>;

/// A root generated on first use and kept in `dir` (`root.pem`, and `root-key.pem` mode 0600).
pub fn load_or_generate(dir: &Path, trust_domain: &str, ttl: Duration, max_ttl: Duration) -> anyhow::Result<Ca> {
    let read = |p: &Path| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let cert_path = dir.join("root.pem");
    let key_path = dir.join("root-key.pem");
    if !cert_path.exists() {
        let root = Ca::generate_root(trust_domain)?;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&key_path)
            .with_context(|| format!("creating {}", key_path.display()))?;
        std::io::Write::write_all(&mut f, root.key_pem.as_bytes())?;
        // Written whole and renamed: a reader never sees half a root.
        let tmp = cert_path.with_extension("pem.tmp");
        std::fs::write(&tmp, &root.cert_pem)?;
        std::fs::rename(&tmp, &cert_path)?;
        tracing::info!(cert = %cert_path.display(), trust_domain, "generated a new root CA");
    }
    Ok(Ca::from_pem(trust_domain, &read(&cert_path)?, &read(&key_path)?, "", ttl, max_ttl)?)
}

/// What a mesh's CA was loaded for: a change reloads it.
type CaSource = (String, Option<MeshCa>);

pub struct Keeper {
    state_dir: PathBuf,
    default: Arc<Ca>,
    cert_ttl: Duration,
    max_ttl: Duration,
    loaded: BTreeMap<String, (CaSource, Arc<Ca>)>,
}

impl Keeper {
    pub fn new(state_dir: &Path, default: Arc<Ca>, cert_ttl: Duration, max_ttl: Duration) -> Keeper {
        Keeper { state_dir: state_dir.to_owned(), default, cert_ttl, max_ttl, loaded: BTreeMap::new() }
    }

    fn ca_for(&mut self, name: &str, spec: &MeshSpec) -> Result<Arc<Ca>, String> {
        let source = (spec.trust_domain.clone(), spec.ca.clone());
        if let Some((s, ca)) = self.loaded.get(name) {
            if *s == source {
                return Ok(ca.clone());
            }
        }
        let ca = match &spec.ca {
            None => load_or_generate(
                &self.state_dir.join("meshes").join(name),
                &spec.trust_domain,
                self.cert_ttl,
                self.max_ttl,
            )
            .map_err(|e| format!("its CA: {e:#}"))?,
            Some(files) => {
                let read = |what: &str, p: &str| {
                    std::fs::read_to_string(p)
                        .map_err(|e| format!("ca.{what} {p}: {e}; the controller must be able to read it"))
                };
                let chain = files.chain_file.as_deref().map(|p| read("chainFile", p)).transpose()?.unwrap_or_default();
                Ca::from_pem(
                    &spec.trust_domain,
                    &read("certFile", &files.cert_file)?,
                    &read("keyFile", &files.key_file)?,
                    &chain,
                    self.cert_ttl,
                    self.max_ttl,
                )
                .map_err(|e| format!("ca: {e}"))?
            }
        };
        let ca = Arc::new(ca);
        self.loaded.insert(name.to_owned(), (source, ca.clone()));
        Ok(ca)
    }

    /// Admits the model's meshes (see the module's documentation) and returns the signers.
    pub fn admit(&mut self, m: &mut Model) -> Signers {
        let mut signers = Signers::only_default(self.default.clone());
        let verdicts = check_meshes(self.default.trust_domain(), m.meshes.iter().map(|(n, s)| (n.as_str(), s)));
        let mut accepted: BTreeMap<String, MeshSpec> = BTreeMap::new();
        let meshes = std::mem::take(&mut m.meshes);
        for ((name, spec), verdict) in meshes.into_iter().zip(verdicts) {
            match verdict.and_then(|()| self.ca_for(&name, &spec)) {
                Ok(ca) => {
                    let ttl = spec.cert_ttl_seconds.map(Duration::from_secs);
                    let signer = Signer { mesh: name.clone(), ca, ttl };
                    signers.by_trust_domain.insert(spec.trust_domain.clone(), Arc::new(signer));
                    accepted.insert(name, spec);
                }
                Err(e) => {
                    let e = format!("Mesh {name} rejected: {e}");
                    tracing::error!(error = %e, "Mesh rejected; its namespaces' workloads get no certificates");
                    m.errors.push(e);
                }
            }
        }
        for (ns, mesh) in &m.namespace_meshes {
            if !accepted.contains_key(mesh) {
                let e = format!(
                    "namespace {ns} is labelled {MESH_LABEL}={mesh}, but there is no accepted Mesh {mesh}: its workloads get no certificate, so their connections are refused until there is one (or the label names an existing mesh)"
                );
                tracing::error!(error = %e, "namespace in a mesh that does not exist");
                m.errors.push(e);
            }
        }
        let orphans: Vec<WorkloadKey> = m
            .workloads
            .values()
            .filter(|w| w.mesh.as_ref().is_some_and(|x| !accepted.contains_key(x)))
            .map(|w| w.key())
            .collect();
        for k in orphans {
            m.workloads.remove(&k);
        }
        m.mesh_records.clear();
        if !accepted.is_empty() {
            let members = |mesh: Option<&str>| -> Vec<String> {
                let mut ns: Vec<String> = m
                    .workloads
                    .values()
                    .filter(|w| w.mesh.as_deref() == mesh)
                    .map(|w| w.namespace.clone())
                    .chain(m.namespace_meshes.iter().filter(|(_, x)| Some(x.as_str()) == mesh).map(|(n, _)| n.clone()))
                    .collect();
                ns.sort();
                ns.dedup();
                ns
            };
            let default = MeshRecord {
                name: DEFAULT_MESH.into(),
                trust_domain: self.default.trust_domain().into(),
                roots: self.default.roots_pem().to_vec(),
                trust: vec![],
                mtls_mode: None,
                namespaces: members(None),
            };
            let mut records = vec![default];
            for (name, spec) in &accepted {
                let signer = signers.for_trust_domain(&spec.trust_domain).expect("inserted above");
                records.push(MeshRecord {
                    name: name.clone(),
                    trust_domain: spec.trust_domain.clone(),
                    roots: signer.ca.roots_pem().to_vec(),
                    trust: spec.trust.clone(),
                    mtls_mode: spec.mtls_mode,
                    namespaces: members(Some(name)),
                });
            }
            m.mesh_records = records.into_iter().map(|r| (r.name.clone(), r)).collect();
        }
        m.meshes = accepted;
        signers
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(text: &str) -> Model {
        let ws = mesh_model::workload::parse_str(Path::new("w"), text).unwrap();
        let mut m = Model::default();
        for w in ws {
            m.workloads.insert(w.key(), w);
        }
        m
    }

    /// Each mesh gets its own root, kept across restarts; a namespace labelled for a mesh that
    /// is not there loses its workloads (reported); a mesh whose trust domain is taken is
    /// rejected; records go out only when there are meshes.
    #[test]
    fn meshes_get_their_own_roots_and_orphans_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let root = Ca::generate_root("cluster.local").unwrap();
        let default = Arc::new(
            Ca::from_pem(
                "cluster.local",
                &root.cert_pem,
                &root.key_pem,
                "",
                Duration::from_secs(60),
                Duration::from_secs(600),
            )
            .unwrap(),
        );
        let mut keeper = Keeper::new(dir.path(), default.clone(), Duration::from_secs(60), Duration::from_secs(600));
        let mut m = model("kind: Workload\nname: a\nnamespace: team-a\nips: [10.0.0.1]\nnode: n1\n---\nkind: Workload\nname: x\nnamespace: lost\nips: [10.0.0.2]\nnode: n1\n---\nkind: Workload\nname: d\nips: [10.0.0.3]\nnode: n1\n");
        let labels = |v: &str| BTreeMap::from([(MESH_LABEL.to_owned(), v.to_owned())]);
        m.set_namespaces(&BTreeMap::from([
            ("team-a".to_owned(), labels("a")),
            ("lost".to_owned(), labels("nope")),
            ("default".to_owned(), labels("enabled")),
        ]));
        let spec = |td: &str| MeshSpec { trust_domain: td.into(), ..Default::default() };
        m.admit_mesh("a", &spec("a.example"), "Mesh".into());
        m.admit_mesh("b", &spec("cluster.local"), "Mesh".into());
        let signers = keeper.admit(&mut m);
        assert_eq!(m.meshes.keys().collect::<Vec<_>>(), ["a"]);
        assert!(
            m.errors.iter().any(|e| e.contains("Mesh b rejected") && e.contains("mesh default's")),
            "{:?}",
            m.errors
        );
        assert!(
            m.errors.iter().any(|e| e.contains("namespace lost") && e.contains("no accepted Mesh nope")),
            "{:?}",
            m.errors
        );
        let keys: Vec<String> = m.workloads.keys().map(|k| k.to_string()).collect();
        assert_eq!(keys, ["default/d", "team-a/a"], "the orphan is out");
        let a = signers.for_trust_domain("a.example").unwrap();
        assert_eq!(a.mesh, "a");
        assert_ne!(a.ca.roots_pem(), default.roots_pem(), "a root of its own");
        assert_eq!(signers.for_trust_domain("cluster.local").unwrap().mesh, "default");
        assert_eq!(m.mesh_records["a"].namespaces, ["team-a"]);
        assert_eq!(m.mesh_records["default"].namespaces, ["default"]);
        assert_eq!(m.mesh_records["default"].roots, default.roots_pem());

        // Kept across a restart of the controller: the same root.
        let first = a.ca.roots_pem().to_vec();
        let mut again = Keeper::new(dir.path(), default.clone(), Duration::from_secs(60), Duration::from_secs(600));
        let mut m2 = Model::default();
        m2.admit_mesh("a", &spec("a.example"), "Mesh".into());
        let s2 = again.admit(&mut m2);
        assert_eq!(s2.for_trust_domain("a.example").unwrap().ca.roots_pem(), first.as_slice());

        // Without meshes, nothing about meshes is pushed.
        let mut plain = model("kind: Workload\nname: d\nips: [10.0.0.3]\nnode: n1\n");
        keeper.admit(&mut plain);
        assert!(plain.mesh_records.is_empty());
    }
}
