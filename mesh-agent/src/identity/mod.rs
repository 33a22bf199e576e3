//! The agent's identity manager: a key and certificate per workload identity it serves,
//! requested from the controller's CA when the first workload of that identity appears,
//! renewed at half-life (with backoff on failure; the old certificate is kept until it
//! expires), dropped when the last such workload leaves. Connections of a workload wait a
//! little for its certificate and then fail: never plaintext instead.

mod cert;
pub mod kx;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mesh_api::admin::CertInfo;
use mesh_identity::ca::workload_csr;
use mesh_identity::proto::certificate_service_client::CertificateServiceClient;
use mesh_identity::proto::CreateCertificateRequest;
use mesh_identity::verify::{der_to_pem, pem_to_ders, LiveBundle, TrustBundle};
use mesh_identity::SpiffeId;
use mesh_model::MeshRecord;
use rustls_pki_types::{PrivatePkcs8KeyDer, UnixTime};
use tokio::sync::watch;
use tonic::transport::Channel;

pub use cert::{renew_in, WorkloadCert};

use crate::metrics::Metrics;

#[derive(Debug, Clone, thiserror::Error)]
pub enum IdentityError {
    #[error("no certificate for {0} yet (the controller has not issued one); the connection is refused rather than sent in plaintext")]
    NotReady(Arc<SpiffeId>),
    #[error("{0} is not served by this agent")]
    Unknown(Arc<SpiffeId>),
}

/// Why the identity manager cannot start.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error(transparent)]
    Bundle(#[from] mesh_identity::verify::BundleError),
    #[error("--controller {url}: {source}")]
    ControllerUrl { url: String, source: http::uri::InvalidUri },
    #[error("the TLS settings for the controller: {0}")]
    ControllerTls(#[from] tonic::transport::Error),
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("controller: {0}")]
    Rpc(#[from] tonic::Status),
    #[error("the controller did not answer in time")]
    Timeout,
    #[error("the CA returned an empty chain")]
    EmptyChain,
    #[error("the CA returned a chain that does not verify: {0}")]
    BadChain(#[from] mesh_identity::verify::VerifyError),
    #[error("node credential {path}: {source}")]
    Credential { path: std::path::PathBuf, source: std::io::Error },
    #[error("the node credential is not valid header text")]
    CredentialText,
    #[error("making the key and CSR: {0}")]
    Csr(#[from] mesh_identity::ca::CaError),
    #[error("the certificate cannot be served: {0}")]
    Tls(#[from] rustls::Error),
}

impl FetchError {
    pub fn reason(&self) -> &'static str {
        match self {
            FetchError::Rpc(_) => "rpc",
            FetchError::Timeout => "timeout",
            FetchError::EmptyChain | FetchError::BadChain(_) => "bad_chain",
            FetchError::Credential { .. } | FetchError::CredentialText | FetchError::Csr(_) | FetchError::Tls(_) => {
                "local"
            }
        }
    }
}

pub struct IdentityConfig {
    /// One URL per controller replica; any of them serves.
    pub controllers: Vec<String>,
    pub controller_name: String,
    pub trust_domain: String,
    pub bundle_pems: Vec<String>,
    /// Read at every request: a projected service-account token is rotated in place.
    pub credential_file: std::path::PathBuf,
    pub cert_ttl: Option<Duration>,
    pub wait: Duration,
}

/// The controller replicas, and the one in use: calls stay with one replica until it fails,
/// then move to the next (a replica that went away, say); each keeps its own connection.
struct Controllers {
    channels: Vec<(String, Channel)>,
    current: AtomicUsize,
}

impl Controllers {
    fn current(&self) -> (usize, Channel) {
        let i = self.current.load(Ordering::Relaxed) % self.channels.len();
        (i, self.channels[i].1.clone())
    }

    fn failed(&self, index: usize) {
        if self.channels.len() < 2 {
            return;
        }
        let next = (index + 1) % self.channels.len();
        if self.current.compare_exchange(index, next, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
            tracing::warn!(
                failed = %self.channels[index].0,
                next = %self.channels[next].0,
                "controller replica unavailable; moving to the next"
            );
        }
    }
}

struct Entry {
    refs: usize,
    rx: watch::Receiver<Option<Arc<WorkloadCert>>>,
    task: tokio::task::JoinHandle<()>,
}

/// The roots peers are verified against, kept in step with the meshes the controller pushes.
/// A peer's certificate is always checked against the roots of the trust domain it names.
pub struct Trust {
    default_trust_domain: String,
    default_roots: Vec<String>,
    /// For the servers our tunnels go to: every mesh's trust domain (the client requires the
    /// exact identity the controller's record names, whatever its mesh).
    servers: Arc<LiveBundle>,
    /// For the clients of a workload's HBONE listener, by that workload's trust domain: its
    /// mesh's, and those its mesh trusts; every other mesh's is refused as `other_mesh`.
    clients: Mutex<HashMap<String, Arc<LiveBundle>>>,
}

impl Trust {
    fn new(trust_domain: &str, roots: &[String]) -> Result<Trust, mesh_identity::verify::BundleError> {
        let one = || TrustBundle::from_pems(trust_domain, roots);
        let clients = HashMap::from([(trust_domain.to_owned(), LiveBundle::new(one()?))]);
        Ok(Trust {
            default_trust_domain: trust_domain.to_owned(),
            default_roots: roots.to_vec(),
            servers: LiveBundle::new(one()?),
            clients: Mutex::new(clients),
        })
    }

    /// What the clients of a workload in trust domain `td` are verified against.
    pub fn clients(&self, td: &str) -> Arc<LiveBundle> {
        let mut c = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        let b = c.entry(td.to_owned()).or_insert_with(|| {
            // A trust domain no push has named yet: no one is accepted until one does.
            LiveBundle::new(TrustBundle::federated(&[], vec![]).expect("no roots to parse"))
        });
        b.clone()
    }

    /// The default mesh's roots (the agent's trust bundle file).
    pub fn default_roots(&self) -> &[String] {
        &self.default_roots
    }

    /// What the servers our tunnels go to are verified against.
    pub fn servers(&self) -> Arc<LiveBundle> {
        self.servers.clone()
    }

    /// Follows the meshes of a push (empty: the default mesh only, from the agent's flags). A
    /// mesh's roots were checked when the push was decoded; one that fails here keeps the
    /// bundles as they were.
    pub fn set_meshes(&self, meshes: &std::collections::BTreeMap<String, Arc<MeshRecord>>) {
        let default = mesh_model::mesh::DEFAULT_MESH;
        // (name, trust domain and roots, meshes it trusts), the default mesh from the flags.
        let mut all = vec![(default, (self.default_trust_domain.clone(), self.default_roots.clone()), &[][..])];
        for m in meshes.values().filter(|m| m.name != default) {
            all.push((m.name.as_str(), (m.trust_domain.clone(), m.roots.clone()), &m.trust[..]));
        }
        let every: Vec<(String, Vec<String>)> = all.iter().map(|(_, d, _)| d.clone()).collect();
        let built = (|| -> Result<_, mesh_identity::verify::BundleError> {
            let mut clients = Vec::new();
            for (name, own, trust) in &all {
                // Its own first, then the meshes it trusts; every other mesh is `other_mesh`.
                let accepted: Vec<(String, Vec<String>)> = std::iter::once(own.clone())
                    .chain(
                        all.iter()
                            .filter(|(n, ..)| n != name && trust.iter().any(|t| t == n))
                            .map(|(_, d, _)| d.clone()),
                    )
                    .collect();
                let others = every.iter().map(|(td, _)| td.clone()).filter(|td| !accepted.iter().any(|(a, _)| a == td));
                clients.push((own.0.clone(), TrustBundle::federated(&accepted, others.collect())?));
            }
            Ok((clients, TrustBundle::federated(&every, vec![])?))
        })();
        match built {
            Ok((clients, servers)) => {
                self.servers.store(servers);
                for (td, b) in clients {
                    self.clients(&td).store(b);
                }
            }
            Err(e) => tracing::error!(error = %e, "a mesh's roots cannot be used; the trust bundles stay as they were"),
        }
    }
}

pub struct Identities {
    cfg: IdentityConfig,
    pub trust: Trust,
    controllers: Controllers,
    entries: Mutex<HashMap<SpiffeId, Entry>>,
    metrics: Arc<Metrics>,
}

impl Identities {
    pub fn new(cfg: IdentityConfig, metrics: Arc<Metrics>) -> Result<Arc<Self>, InitError> {
        let trust = Trust::new(&cfg.trust_domain, &cfg.bundle_pems)?;
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificates(cfg.bundle_pems.iter().map(tonic::transport::Certificate::from_pem))
            .domain_name(cfg.controller_name.clone());
        let mut channels = Vec::new();
        for url in &cfg.controllers {
            let channel = Channel::from_shared(url.clone())
                .map_err(|source| InitError::ControllerUrl { url: url.clone(), source })?
                .tls_config(tls.clone())?
                .connect_timeout(Duration::from_secs(3))
                .connect_lazy();
            channels.push((url.clone(), channel));
        }
        Ok(Arc::new(Identities {
            cfg,
            trust,
            controllers: Controllers { channels, current: AtomicUsize::new(0) },
            entries: Mutex::new(HashMap::new()),
            metrics,
        }))
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<SpiffeId, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The controller replica in use (shared by the CA client and the config stream): its
    /// index, for [`Identities::controller_failed`], and its channel.
    pub fn channel(&self) -> (usize, Channel) {
        self.controllers.current()
    }

    /// The replica at `index` failed a call: the next call goes to the next replica.
    pub fn controller_failed(&self, index: usize) {
        self.controllers.failed(index)
    }

    /// `Bearer <node credential>`, read fresh from the credential file.
    pub fn bearer(&self) -> Result<tonic::metadata::MetadataValue<tonic::metadata::Ascii>, FetchError> {
        let path = &self.cfg.credential_file;
        let credential =
            std::fs::read_to_string(path).map_err(|source| FetchError::Credential { path: path.clone(), source })?;
        format!("Bearer {}", credential.trim()).parse().map_err(|_| FetchError::CredentialText)
    }

    /// One more workload uses `id`: start maintaining its certificate if it is the first.
    pub fn acquire(self: &Arc<Self>, id: &SpiffeId) {
        let mut entries = self.entries();
        if let Some(e) = entries.get_mut(id) {
            e.refs += 1;
            return;
        }
        let (tx, rx) = watch::channel(None);
        let task = tokio::spawn(self.clone().maintain(id.clone(), tx));
        entries.insert(id.clone(), Entry { refs: 1, rx, task });
    }

    /// One workload fewer uses `id`: drop its key and certificate with the last one.
    pub fn release(&self, id: &SpiffeId) {
        let mut entries = self.entries();
        if let Some(e) = entries.get_mut(id) {
            e.refs -= 1;
            if e.refs == 0 {
                e.task.abort();
                entries.remove(id);
                self.metrics.certificate_dropped(&id.to_string());
                tracing::info!(identity = %id, "identity dropped: its last workload left");
            }
        }
    }

    /// The certificate for `id` if it has one now.
    pub fn current(&self, id: &SpiffeId) -> Option<Arc<WorkloadCert>> {
        let entries = self.entries();
        let c = entries.get(id)?.rx.borrow().clone()?;
        (c.not_after > now_secs()).then_some(c)
    }

    /// The certificate for `id`, waiting up to the configured time for the first one.
    pub async fn get(&self, id: &Arc<SpiffeId>) -> Result<Arc<WorkloadCert>, IdentityError> {
        let mut rx = {
            let entries = self.entries();
            entries.get(&**id).ok_or_else(|| IdentityError::Unknown(id.clone()))?.rx.clone()
        };
        let deadline = tokio::time::Instant::now() + self.cfg.wait;
        loop {
            if let Some(c) = rx.borrow_and_update().clone() {
                if c.not_after > now_secs() {
                    return Ok(c);
                }
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                _ => return Err(IdentityError::NotReady(id.clone())),
            }
        }
    }

    /// The identities served and their certificates.
    pub fn certs(&self) -> Vec<CertInfo> {
        let entries = self.entries();
        let mut out: Vec<CertInfo> = entries
            .iter()
            .map(|(id, e)| {
                let c = e.rx.borrow().clone();
                CertInfo {
                    identity: id.to_string(),
                    workloads: e.refs,
                    ready: c.as_ref().is_some_and(|c| c.not_after > now_secs()),
                    not_before: c.as_ref().map(|c| c.not_before),
                    not_after: c.as_ref().map(|c| c.not_after),
                    chain: c.as_ref().map(|c| c.chain.iter().map(|d| der_to_pem(d)).collect()).unwrap_or_default(),
                }
            })
            .collect();
        out.sort_by(|a, b| a.identity.cmp(&b.identity));
        out
    }

    async fn maintain(self: Arc<Self>, id: SpiffeId, tx: watch::Sender<Option<Arc<WorkloadCert>>>) {
        let mut backoff = Duration::from_millis(500);
        loop {
            match self.fetch(&id).await {
                Ok(cert) => {
                    let (got, na) = (cert.received_at, cert.not_after);
                    self.metrics.certificate_issued(&id.to_string(), na);
                    tracing::info!(identity = %id, not_after = na, "certificate issued");
                    let _ = tx.send(Some(Arc::new(cert)));
                    backoff = Duration::from_millis(500);
                    tokio::time::sleep(renew_in(got, na, now_secs())).await;
                }
                Err(e) => {
                    self.metrics.certificate_failed(e.reason());
                    let expired = tx.borrow().as_ref().is_some_and(|c| c.not_after <= now_secs());
                    if expired {
                        let _ = tx.send(None);
                    }
                    let kept = tx.borrow().is_some();
                    tracing::warn!(identity = %id, reason = e.reason(), kept_current = kept, retry_in_ms = backoff.as_millis() as u64, "certificate request failed: {e}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    }

    async fn fetch(&self, id: &SpiffeId) -> Result<WorkloadCert, FetchError> {
        let (key, csr) = workload_csr(id)?;
        let mut req = tonic::Request::new(CreateCertificateRequest {
            csr,
            validity_duration_seconds: self.cfg.cert_ttl.map(|t| t.as_secs() as i64).unwrap_or(0),
        });
        req.metadata_mut().insert("authorization", self.bearer()?);
        let (index, channel) = self.channel();
        let mut client = CertificateServiceClient::new(channel);
        let call = client.create_certificate(req);
        let resp = match tokio::time::timeout(Duration::from_secs(10), call).await {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(status)) => {
                // The replica is gone or cannot answer now: the retry asks another. (A refusal
                // is an answer: every replica would give it.)
                if matches!(status.code(), tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Internal) {
                    self.controller_failed(index);
                }
                return Err(status.into());
            }
            Err(_) => {
                self.controller_failed(index);
                return Err(FetchError::Timeout);
            }
        };
        let chain = pem_to_ders(&resp.cert_chain.concat());
        let Some((leaf, rest)) = chain.split_first() else {
            return Err(FetchError::EmptyChain);
        };
        // Trust but verify: the chain must be our identity under its mesh's roots.
        let servers = self.trust.servers();
        servers.load().verify(leaf, rest, mesh_identity::verify::KeyUsage::client_auth(), UnixTime::now(), Some(id))?;
        let key = PrivatePkcs8KeyDer::from(key.serialize_der());
        Ok(WorkloadCert::new(id.clone(), chain, key, self.trust.clients(id.trust_domain()), servers, now_secs())?)
    }
}

pub fn now_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_identity::ca::{workload_csr, Ca};
    use mesh_identity::verify::{PeerRole, VerifyError};

    /// The bundles follow the meshes: a workload's clients are verified against its mesh and
    /// the meshes it trusts (another mesh is `other_mesh`); the servers our tunnels go to
    /// against every mesh, each trust domain against its own roots.
    #[test]
    fn trust_follows_the_meshes_pushed() {
        let day = Duration::from_secs(86_400);
        let ca = |td: &str| {
            let r = Ca::generate_root(td).unwrap();
            Ca::from_pem(td, &r.cert_pem, &r.key_pem, "", day, day).unwrap()
        };
        let (d, a, b) = (ca("cluster.local"), ca("a.example"), ca("b.example"));
        let leaf = |ca: &Ca, td: &str| {
            let id = SpiffeId::workload(td, "ns", "sa").unwrap();
            let (_, csr) = workload_csr(&id).unwrap();
            pem_to_ders(&ca.sign(&csr, None, |_| Ok(())).unwrap().1.concat())
        };
        let trust = Trust::new("cluster.local", d.roots_pem()).unwrap();
        let record = |name: &str, ca: &Ca, trust: &[&str]| {
            Arc::new(MeshRecord {
                name: name.into(),
                trust_domain: ca.trust_domain().into(),
                roots: ca.roots_pem().to_vec(),
                trust: trust.iter().map(|s| s.to_string()).collect(),
                mtls_mode: None,
                namespaces: vec![],
            })
        };
        let meshes = std::collections::BTreeMap::from([
            ("default".to_owned(), record("default", &d, &[])),
            ("a".to_owned(), record("a", &a, &["b"])),
            ("b".to_owned(), record("b", &b, &[])),
        ]);
        trust.set_meshes(&meshes);
        let check = |bundle: &Arc<LiveBundle>, chain: &[rustls_pki_types::CertificateDer<'static>]| {
            bundle.load().verify_peer(&chain[0], &chain[1..], PeerRole::Client, UnixTime::now(), None).map(|_| ())
        };
        let (from_d, from_a, from_b) = (leaf(&d, "cluster.local"), leaf(&a, "a.example"), leaf(&b, "b.example"));
        // a trusts b: a's workloads accept b's clients, and a's own.
        assert_eq!(check(&trust.clients("a.example"), &from_b), Ok(()));
        assert_eq!(check(&trust.clients("a.example"), &from_a), Ok(()));
        assert_eq!(
            check(&trust.clients("a.example"), &from_d),
            Err(VerifyError::OtherMesh { got: "cluster.local".into() })
        );
        // b trusts no one else; the default mesh neither.
        assert_eq!(check(&trust.clients("b.example"), &from_a).unwrap_err().reason(), "other_mesh");
        assert_eq!(check(&trust.clients("cluster.local"), &from_a).unwrap_err().reason(), "other_mesh");
        let servers = trust.servers().load();
        for chain in [&from_d, &from_a, &from_b] {
            assert!(servers.verify_peer(&chain[0], &chain[1..], PeerRole::Client, UnixTime::now(), None).is_ok());
        }
        // The meshes gone: the default mesh alone again.
        trust.set_meshes(&Default::default());
        assert!(trust
            .servers()
            .load()
            .verify_peer(&from_a[0], &from_a[1..], PeerRole::Client, UnixTime::now(), None)
            .is_err());
    }
}
