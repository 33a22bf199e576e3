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
use mesh_model::mesh::{check_meshes, DEFAULT_MESH, MESH_LABEL};
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
/// Each file is written whole and renamed into place, the key first: a crash in between leaves
/// a key without a certificate, and the next start makes a new pair.
pub fn load_or_generate(dir: &Path, trust_domain: &str, ttl: Duration, max_ttl: Duration) -> anyhow::Result<Ca> {
    let (cert, key) = root_files(dir, trust_domain)?;
    Ok(Ca::from_pem(trust_domain, &cert, &key, "", ttl, max_ttl)?)
}

/// [`load_or_generate`]'s files: the root's certificate and key (PEM).
fn root_files(dir: &Path, trust_domain: &str) -> anyhow::Result<(String, String)> {
    let read = |p: &Path| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let cert_path = dir.join("root.pem");
    let key_path = dir.join("root-key.pem");
    if !cert_path.exists() {
        let root = Ca::generate_root(trust_domain)?;
        use std::os::unix::fs::OpenOptionsExt;
        let key_tmp = key_path.with_extension("pem.tmp");
        let _ = std::fs::remove_file(&key_tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&key_tmp)
            .with_context(|| format!("creating {}", key_tmp.display()))?;
        std::io::Write::write_all(&mut f, root.key_pem.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&key_tmp, &key_path)?;
        let tmp = cert_path.with_extension("pem.tmp");
        std::fs::write(&tmp, &root.cert_pem)?;
        std::fs::rename(&tmp, &cert_path)?;
        tracing::info!(cert = %cert_path.display(), trust_domain, "generated a new root CA");
    }
    Ok((read(&cert_path)?, read(&key_path)?))
}

/// How soon a Mesh whose root's store did not answer is admitted again.
pub const RETRY_UNANSWERED: Duration = Duration::from_secs(2);
/// How soon a Mesh whose root's store refused (or holds a bad root) is admitted again.
pub const RETRY_REFUSED: Duration = Duration::from_secs(30);

/// Where the root of a Mesh without `spec.ca` is kept once generated.
pub enum RootStore {
    /// `<dir>/meshes/<mesh>/` (local mode: one controller per state directory, locked).
    Files(PathBuf),
    /// A Secret per mesh in the controller's namespace, which every replica reads (Kubernetes:
    /// a replica's state directory is its own, and lost with its pod).
    Secrets(Box<crate::kube_source::roots::Secrets>),
}

/// Why a generated root could not be had.
pub enum RootError {
    /// The store answered, and what it holds is wrong (the message says what to do).
    Bad(String),
    /// The store did not answer; worth trying again.
    Unreachable(String),
}

impl RootStore {
    /// The mesh's root (certificate, key), generated and stored the first time.
    async fn root(&self, mesh: &str, trust_domain: &str) -> Result<(String, String), RootError> {
        match self {
            RootStore::Files(dir) => {
                root_files(&dir.join("meshes").join(mesh), trust_domain).map_err(|e| RootError::Bad(format!("{e:#}")))
            }
            RootStore::Secrets(s) => s.get_or_create(mesh, trust_domain).await,
        }
    }
}

/// What a mesh's CA was loaded from: the trust domain and, for the operator's CA, the files'
/// contents (a rotated Secret is picked up at the next change of the model, or restart).
type CaSource = (String, Option<(String, String, String)>);

/// The keeper's verdict on each Mesh (valid alone, then against the others, then its CA), for
/// the status writer; `changed` wakes it.
#[derive(Default)]
pub struct Verdicts {
    map: RwLock<BTreeMap<String, Result<(), String>>>,
    pub changed: tokio::sync::Notify,
}

impl Verdicts {
    /// The verdict on `name`, if the keeper has judged it.
    pub fn get(&self, name: &str) -> Option<Result<(), String>> {
        self.map.read().unwrap_or_else(|e| e.into_inner()).get(name).cloned()
    }
}

pub struct Keeper {
    roots: RootStore,
    default: Arc<Ca>,
    cert_ttl: Duration,
    max_ttl: Duration,
    loaded: BTreeMap<String, (CaSource, Arc<Ca>)>,
    /// The meshes accepted last time: in a conflict (one trust domain claimed twice) they keep
    /// it, and the newcomer is refused.
    accepted_before: std::collections::BTreeSet<String>,
    pub verdicts: Arc<Verdicts>,
    /// A generated root's store failed at the last admission: admit again after this long
    /// (soon when it did not answer, slowly when it refused: a fixed Role or a deleted bad
    /// Secret is then picked up without another change).
    pub retry: Option<Duration>,
    /// The meshes whose generated root's store did not answer at the last admission: not
    /// accepted yet (their workloads get no certificate meanwhile: refused, never plain), and
    /// no verdict is written on them. A replica that has published nothing yet publishes
    /// nothing while there are any: its agents would drop what another replica gave them.
    pending: std::collections::BTreeSet<String>,
}

impl Keeper {
    pub fn new(roots: RootStore, default: Arc<Ca>, cert_ttl: Duration, max_ttl: Duration) -> Keeper {
        Keeper {
            roots,
            default,
            cert_ttl,
            max_ttl,
            loaded: BTreeMap::new(),
            accepted_before: Default::default(),
            verdicts: Default::default(),
            retry: None,
            pending: Default::default(),
        }
    }

    async fn ca_for(&mut self, name: &str, spec: &MeshSpec) -> Result<Arc<Ca>, String> {
        let read = |what: &str, p: &str| {
            std::fs::read_to_string(p)
                .map_err(|e| format!("ca.{what} {p}: {e}; the controller must be able to read it"))
        };
        let files = match &spec.ca {
            None => None,
            Some(f) => Some((
                read("certFile", &f.cert_file)?,
                read("keyFile", &f.key_file)?,
                f.chain_file.as_deref().map(|p| read("chainFile", p)).transpose()?.unwrap_or_default(),
            )),
        };
        let source = (spec.trust_domain.clone(), files);
        if let Some((s, ca)) = self.loaded.get(name) {
            if *s == source {
                return Ok(ca.clone());
            }
        }
        let ca = match &source.1 {
            None => {
                let again = |k: &mut Keeper, after: Duration| k.retry = Some(k.retry.map_or(after, |r| r.min(after)));
                if !self.pending.is_empty() {
                    // The store did not answer for another mesh just now: not asked again in
                    // this admission (each ask may wait its whole timeout).
                    self.pending.insert(name.to_owned());
                    return Err("its CA: its root's store did not answer; trying again".into());
                }
                let (cert, key) = match self.roots.root(name, &spec.trust_domain).await {
                    Ok(pem) => pem,
                    Err(RootError::Bad(e)) => {
                        again(self, RETRY_REFUSED);
                        return Err(format!("its CA: {e}"));
                    }
                    Err(RootError::Unreachable(e)) => {
                        again(self, RETRY_UNANSWERED);
                        self.pending.insert(name.to_owned());
                        return Err(format!("its CA: {e}; trying again"));
                    }
                };
                Ca::from_pem(&spec.trust_domain, &cert, &key, "", self.cert_ttl, self.max_ttl)
                    .map_err(|e| format!("its generated root: {e}"))?
            }
            Some((cert, key, chain)) => Ca::from_pem(&spec.trust_domain, cert, key, chain, self.cert_ttl, self.max_ttl)
                .map_err(|e| format!("ca: {e}"))?,
        };
        let ca = Arc::new(ca);
        self.loaded.insert(name.to_owned(), (source, ca.clone()));
        Ok(ca)
    }

    /// Whether a mesh's root could not be had at the last admission for want of an answer.
    pub fn pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Admits the model's meshes (see the module's documentation) and returns the signers.
    pub async fn admit(&mut self, m: &mut Model) -> Signers {
        self.retry = None;
        self.pending.clear();
        let mut signers = Signers::only_default(self.default.clone());
        let meshes = std::mem::take(&mut m.meshes);
        // The established first: a newcomer (or a Mesh edited to it) cannot take a trust domain
        // in use. Where the source has status and creation times, a Mesh in force by its status
        // comes first, then the older, then the name, decided alike in every replica of the
        // controller; without them (local mode), those this keeper accepted before.
        let mut order: Vec<(String, MeshSpec)> = meshes.into_iter().collect();
        order.sort_by_key(|(n, _)| {
            let created = m.mesh_created.get(n).copied();
            let in_force = m.mesh_in_force.contains(n) || (created.is_none() && self.accepted_before.contains(n));
            (!in_force, created.unwrap_or(i64::MAX), n.clone())
        });
        let verdicts = check_meshes(self.default.trust_domain(), order.iter().map(|(n, s)| (n.as_str(), s)));
        let mut accepted: BTreeMap<String, MeshSpec> = BTreeMap::new();
        let mut judged: BTreeMap<String, Result<(), String>> = BTreeMap::new();
        // Roots already in use: two meshes must not share one, or one mesh's CA (or any CA
        // under that root) could sign the other's identities.
        let mut roots: Vec<(String, String)> =
            self.default.roots_pem().iter().map(|r| (r.trim().to_owned(), DEFAULT_MESH.to_owned())).collect();
        for ((name, spec), verdict) in order.into_iter().zip(verdicts) {
            let ca = match verdict {
                Ok(()) => self.ca_for(&name, &spec).await,
                Err(e) => Err(e),
            };
            let ca = ca.and_then(|ca| {
                match ca.roots_pem().iter().find_map(|r| roots.iter().find(|(x, _)| x == r.trim())) {
                    Some((_, other)) => Err(format!(
                        "its CA's root is also mesh {other}'s; each mesh needs a root of its own (an intermediate under a shared root would let one mesh's CA sign another's identities)"
                    )),
                    None => Ok(ca),
                }
            });
            match ca {
                Ok(ca) => {
                    roots.extend(ca.roots_pem().iter().map(|r| (r.trim().to_owned(), name.clone())));
                    let ttl = spec.cert_ttl_seconds.map(Duration::from_secs);
                    let signer = Signer { mesh: name.clone(), ca, ttl };
                    signers.by_trust_domain.insert(spec.trust_domain.clone(), Arc::new(signer));
                    judged.insert(name.clone(), Ok(()));
                    accepted.insert(name, spec);
                }
                Err(e) if self.pending.contains(&name) => {
                    let msg = format!("Mesh {name} not accepted yet: {e}");
                    tracing::warn!(error = %msg, "Mesh not accepted yet; its namespaces' workloads get no certificates meanwhile");
                    m.errors.push(msg);
                    // Its status stays what it was (the verdicts are replaced only below).
                    if let Some(v) = self.verdicts.get(&name) {
                        judged.insert(name, v.clone());
                    }
                }
                Err(e) => {
                    let msg = format!("Mesh {name} rejected: {e}");
                    tracing::error!(error = %msg, "Mesh rejected; its namespaces' workloads get no certificates");
                    m.errors.push(msg);
                    judged.insert(name, Err(e));
                }
            }
        }
        // Trust in a mesh that is not there is left out (reported), not held against the mesh
        // that trusts: deleting one mesh must not take down the meshes that trusted it.
        let names: Vec<String> = accepted.keys().cloned().collect();
        for (name, spec) in accepted.iter_mut() {
            let missing: Vec<String> =
                spec.trust.iter().filter(|t| t.as_str() != DEFAULT_MESH && !names.contains(t)).cloned().collect();
            if !missing.is_empty() {
                m.errors.push(format!(
                    "Mesh {name}: trust names {}, which is no accepted Mesh; ignored until it is",
                    missing.join(", ")
                ));
                spec.trust.retain(|t| !missing.contains(t));
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
        let mut orphan_ips = std::collections::HashSet::new();
        for k in orphans {
            if let Some(w) = Arc::make_mut(&mut m.workloads).remove(&k) {
                orphan_ips.extend(w.ips.iter().copied());
            }
        }
        // Nor are they anyone's Service endpoint: an endpoint that is no workload would be
        // reached in plain TCP.
        for svc in m.services.values_mut() {
            svc.endpoints.retain(|e| !orphan_ips.contains(&e.address));
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
        self.accepted_before = accepted.keys().cloned().collect();
        m.meshes = accepted;
        *self.verdicts.map.write().unwrap_or_else(|e| e.into_inner()) = judged;
        self.verdicts.changed.notify_one();
        signers
    }
}

/// A CA for tests: a fresh root of `trust_domain` (certificates of an hour, at most a day) and
/// what it was made from.
#[cfg(test)]
pub(crate) fn test_ca(trust_domain: &str) -> (mesh_identity::ca::GeneratedRoot, Arc<Ca>) {
    let root = Ca::generate_root(trust_domain).unwrap();
    let (hour, day) = (Duration::from_secs(3600), Duration::from_secs(86_400));
    let ca = Ca::from_pem(trust_domain, &root.cert_pem, &root.key_pem, "", hour, day).unwrap();
    (root, Arc::new(ca))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A keeper whose state is `dir`, under a default mesh of cluster.local.
    fn keeper(dir: &Path) -> (Keeper, mesh_identity::ca::GeneratedRoot, Arc<Ca>) {
        let (root, default) = test_ca("cluster.local");
        (
            Keeper::new(
                RootStore::Files(dir.to_owned()),
                default.clone(),
                Duration::from_secs(3600),
                Duration::from_secs(86_400),
            ),
            root,
            default,
        )
    }

    fn model(text: &str) -> Model {
        let ws = mesh_model::workload::parse_str(Path::new("w"), text).unwrap();
        let mut m = Model::default();
        for w in ws {
            Arc::make_mut(&mut m.workloads).insert(w.key(), Arc::new(w));
        }
        m
    }

    /// The keeper works on a copy of the source's model: with no orphan to take out, the copy
    /// still shares the source's maps of workloads and policies (one of each in memory).
    #[tokio::test]
    async fn a_model_with_nothing_to_take_out_shares_the_sources_maps() {
        let dir = tempfile::tempdir().unwrap();
        let (mut keeper, _, _) = keeper(dir.path());
        let mut source = model("kind: Workload\nname: a\nnamespace: shop\nips: [10.0.0.1]\nnode: n1\n");
        let spec: mesh_model::policy::AuthorizationPolicySpec =
            serde_yaml::from_str("selector: {matchLabels: {app: a}}\naction: ALLOW\n").unwrap();
        source.admit_authz(&Model::default(), ("shop".into(), "p".into()), &spec, "AuthorizationPolicy".into());
        let mut m = source.clone();
        keeper.admit(&mut m).await;
        assert_eq!((m.workloads.len(), m.authz.len()), (1, 1));
        assert!(Arc::ptr_eq(&m.workloads, &source.workloads), "the keeper copied the workloads");
        assert!(Arc::ptr_eq(&m.authz, &source.authz), "the keeper copied the policies");
    }

    /// Each mesh gets its own root, kept across restarts; a namespace labelled for a mesh that
    /// is not there loses its workloads (reported); a mesh whose trust domain is taken is
    /// rejected; records go out only when there are meshes.
    #[tokio::test]
    async fn meshes_get_their_own_roots_and_orphans_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let (mut keeper, _, default) = keeper(dir.path());
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
        let source = m.clone();
        let signers = keeper.admit(&mut m).await;
        assert_eq!(source.workloads.len(), 3, "taking the orphan out changed the source's shared map");
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
        let mut again = Keeper::new(
            RootStore::Files(dir.path().to_owned()),
            default.clone(),
            Duration::from_secs(3600),
            Duration::from_secs(86_400),
        );
        let mut m2 = Model::default();
        m2.admit_mesh("a", &spec("a.example"), "Mesh".into());
        let s2 = again.admit(&mut m2).await;
        assert_eq!(s2.for_trust_domain("a.example").unwrap().ca.roots_pem(), first.as_slice());

        // Without meshes, nothing about meshes is pushed.
        let mut plain = model("kind: Workload\nname: d\nips: [10.0.0.3]\nnode: n1\n");
        keeper.admit(&mut plain).await;
        assert!(plain.mesh_records.is_empty());
    }

    /// A mesh with the operator's CA: an intermediate under an external root, from files. The
    /// mesh's roots are the external root; what it signs carries the intermediate; a file it
    /// cannot read rejects the mesh with the path named.
    #[tokio::test]
    async fn an_operator_provided_intermediate_signs_for_its_mesh() {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let dir = tempfile::tempdir().unwrap();
        let external = Ca::generate_root("ext.example").unwrap();
        let int_key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let issuer =
            Issuer::from_ca_cert_pem(&external.cert_pem, KeyPair::from_pem(&external.key_pem).unwrap()).unwrap();
        let int = p.signed_by(&int_key, &issuer).unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path.display().to_string()
        };
        let ca = mesh_model::mesh::MeshCa {
            cert_file: write("int.pem", &int.pem()),
            key_file: write("int-key.pem", &int_key.serialize_pem()),
            chain_file: Some(write("root.pem", &external.cert_pem)),
        };
        let (mut keeper, ..) = keeper(dir.path());
        let mut m = Model::default();
        let spec = MeshSpec { trust_domain: "ext.example".into(), ca: Some(ca.clone()), ..Default::default() };
        m.admit_mesh("ext", &spec, "Mesh".into());
        let signers = keeper.admit(&mut m).await;
        assert!(m.errors.is_empty(), "{:?}", m.errors);
        assert_eq!(m.mesh_records["ext"].roots, [external.cert_pem.trim().to_owned() + "\n"]);
        let id = mesh_identity::SpiffeId::workload("ext.example", "ns", "sa").unwrap();
        let (_, csr) = mesh_identity::ca::workload_csr(&id).unwrap();
        let (_, chain) = signers.for_trust_domain("ext.example").unwrap().ca.sign(&csr, None, |_| Ok(())).unwrap();
        assert_eq!(chain.len(), 2, "leaf and intermediate");

        let mut gone = Model::default();
        let missing = mesh_model::mesh::MeshCa { cert_file: "/nonexistent/int.pem".into(), ..ca };
        gone.admit_mesh("ext", &MeshSpec { ca: Some(missing), ..spec }, "Mesh".into());
        keeper.admit(&mut gone).await;
        assert!(gone.meshes.is_empty());
        assert!(gone.errors.iter().any(|e| e.contains("/nonexistent/int.pem")), "{:?}", gone.errors);
    }

    /// What the review of the first version found: an established mesh keeps its trust domain
    /// against a newcomer; trust in a mesh that is gone is dropped, not held against the
    /// trusting mesh; two meshes cannot share a root; an orphan is nobody's Service endpoint; a
    /// key left without its certificate (a crash while generating) gets a new pair.
    #[tokio::test]
    async fn established_meshes_keep_their_ground_and_orphans_are_no_endpoints() {
        let dir = tempfile::tempdir().unwrap();
        let (mut keeper, root, _) = keeper(dir.path());
        let day = Duration::from_secs(86_400);
        let spec = |td: &str, trust: &[&str]| MeshSpec {
            trust_domain: td.into(),
            trust: trust.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        let mut m = Model::default();
        m.admit_mesh("pay", &spec("pay.example", &["shop"]), "Mesh".into());
        m.admit_mesh("shop", &spec("shop.example", &[]), "Mesh".into());
        keeper.admit(&mut m).await;
        assert_eq!(m.meshes.len(), 2, "{:?}", m.errors);
        assert_eq!(m.mesh_records["pay"].trust, ["shop"]);

        // "aaa" sorts first but comes later: pay keeps its trust domain. shop deleted: pay stays,
        // its trust in shop dropped and reported.
        let mut m = Model::default();
        m.admit_mesh("aaa", &spec("pay.example", &[]), "Mesh".into());
        m.admit_mesh("pay", &spec("pay.example", &["shop"]), "Mesh".into());
        keeper.admit(&mut m).await;
        assert_eq!(m.meshes.keys().collect::<Vec<_>>(), ["pay"], "{:?}", m.errors);
        assert_eq!(
            keeper.verdicts.get("aaa").unwrap().unwrap_err(),
            "trustDomain \"pay.example\" is mesh pay's; each mesh needs its own"
        );
        assert!(m.mesh_records["pay"].trust.is_empty());
        assert!(m.errors.iter().any(|e| e.contains("trust names shop")), "{:?}", m.errors);

        // A mesh whose CA files are the default mesh's root: refused.
        let write = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p.display().to_string()
        };
        let same = mesh_model::mesh::MeshCa {
            cert_file: write("r.pem", &root.cert_pem),
            key_file: write("k.pem", &root.key_pem),
            chain_file: None,
        };
        let mut m = Model::default();
        m.admit_mesh("twin", &MeshSpec { ca: Some(same), ..spec("twin.example", &[]) }, "Mesh".into());
        keeper.admit(&mut m).await;
        assert!(m.meshes.is_empty());
        assert!(keeper.verdicts.get("twin").unwrap().unwrap_err().contains("also mesh default's"));

        // An orphan's address leaves the Services that listed it.
        let mut m = model("kind: Workload\nname: x\nnamespace: lost\nips: [10.0.0.9]\nnode: n1\n");
        m.set_namespaces(&BTreeMap::from([(
            "lost".to_owned(),
            BTreeMap::from([(MESH_LABEL.to_owned(), "nope".to_owned())]),
        )]));
        let svc: mesh_model::Service = serde_yaml::from_str(
            "name: web\nnamespace: lost\naddresses: [10.96.0.9]\nports: [{port: 80}]\nendpoints: [{address: 10.0.0.9}, {address: 192.0.2.1}]\n",
        )
        .unwrap();
        m.services.insert(("lost".into(), "web".into()), svc);
        keeper.admit(&mut m).await;
        let eps: Vec<String> =
            m.services.values().next().unwrap().endpoints.iter().map(|e| e.address.to_string()).collect();
        assert_eq!(eps, ["192.0.2.1"]);

        // A key without its certificate: a new pair, not a refusal.
        let half = dir.path().join("half");
        std::fs::create_dir_all(&half).unwrap();
        std::fs::write(half.join("root-key.pem"), "left by a crash").unwrap();
        let ca = load_or_generate(&half, "half.example", day, day).unwrap();
        assert_eq!(ca.trust_domain(), "half.example");
    }

    /// Two replicas, one that has run all along (it accepted "pay" before "aaa" came) and one
    /// just started: with creation times from the source, both let the older Mesh keep the
    /// trust domain, whatever each accepted before and whatever the names' order.
    #[tokio::test]
    async fn replicas_agree_on_which_mesh_keeps_a_trust_domain() {
        let spec = MeshSpec { trust_domain: "pay.example".into(), ..Default::default() };
        let model = |with_aaa: bool| {
            let mut m = Model::default();
            m.admit_mesh("pay", &spec, "Mesh".into());
            m.mesh_created.insert("pay".into(), 1_000);
            if with_aaa {
                m.admit_mesh("aaa", &spec, "Mesh".into());
                m.mesh_created.insert("aaa".into(), 2_000);
            }
            m
        };
        let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (mut running, ..) = keeper(d1.path());
        running.admit(&mut model(false)).await;
        let (mut fresh, ..) = keeper(d2.path());
        for k in [&mut running, &mut fresh] {
            let mut m = model(true);
            k.admit(&mut m).await;
            assert_eq!(m.meshes.keys().collect::<Vec<_>>(), ["pay"], "{:?}", m.errors);
            assert!(k.verdicts.get("aaa").unwrap().is_err());
        }
        // An older Mesh edited to a trust domain the newer one has in force (its status says
        // so): the one in force keeps it, in every replica, the just started one included.
        let (d3, d4) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (mut one, ..) = keeper(d3.path());
        let (mut other, ..) = keeper(d4.path());
        for k in [&mut one, &mut other] {
            let mut m = model(true);
            m.mesh_created.insert("pay".into(), 3_000);
            m.mesh_in_force.insert("pay".into());
            k.admit(&mut m).await;
            assert_eq!(m.meshes.keys().collect::<Vec<_>>(), ["pay"], "{:?}", m.errors);
        }
    }
}
