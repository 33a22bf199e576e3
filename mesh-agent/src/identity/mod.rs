//! The agent's identity manager: a key and certificate per workload identity it serves,
//! requested from the controller's CA when the first workload of that identity appears,
//! renewed at half-life (with backoff on failure; the old certificate is kept until it
//! expires), dropped when the last such workload leaves. Connections of a workload wait a
//! little for its certificate and then fail: never plaintext instead.

mod cert;
pub mod kx;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mesh_api::admin::CertInfo;
use mesh_identity::ca::workload_csr;
use mesh_identity::proto::certificate_service_client::CertificateServiceClient;
use mesh_identity::proto::CreateCertificateRequest;
use mesh_identity::verify::{pem_to_ders, TrustBundle};
use mesh_identity::SpiffeId;
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
    pub controller: String,
    pub controller_name: String,
    pub trust_domain: String,
    pub bundle_pems: Vec<String>,
    /// Read at every request: a projected service-account token is rotated in place.
    pub credential_file: std::path::PathBuf,
    pub cert_ttl: Option<Duration>,
    pub wait: Duration,
}

struct Entry {
    refs: usize,
    rx: watch::Receiver<Option<Arc<WorkloadCert>>>,
    task: tokio::task::JoinHandle<()>,
}

pub struct Identities {
    cfg: IdentityConfig,
    pub bundle: Arc<TrustBundle>,
    client: CertificateServiceClient<Channel>,
    channel: Channel,
    entries: Mutex<HashMap<SpiffeId, Entry>>,
    metrics: Arc<Metrics>,
}

impl Identities {
    pub fn new(cfg: IdentityConfig, metrics: Arc<Metrics>) -> Result<Arc<Self>, InitError> {
        let bundle = Arc::new(TrustBundle::from_pems(&cfg.trust_domain, &cfg.bundle_pems)?);
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificates(cfg.bundle_pems.iter().map(tonic::transport::Certificate::from_pem))
            .domain_name(cfg.controller_name.clone());
        let channel = Channel::from_shared(cfg.controller.clone())
            .map_err(|source| InitError::ControllerUrl { url: cfg.controller.clone(), source })?
            .tls_config(tls)?
            .connect_timeout(Duration::from_secs(3))
            .connect_lazy();
        Ok(Arc::new(Identities {
            cfg,
            bundle,
            client: CertificateServiceClient::new(channel.clone()),
            channel,
            entries: Mutex::new(HashMap::new()),
            metrics,
        }))
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<SpiffeId, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The channel to the controller (shared by the CA client and the config stream).
    pub fn channel(&self) -> Channel {
        self.channel.clone()
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
        let resp = tokio::time::timeout(Duration::from_secs(10), self.client.clone().create_certificate(req))
            .await
            .map_err(|_| FetchError::Timeout)??
            .into_inner();
        let chain = pem_to_ders(&resp.cert_chain.concat());
        let Some((leaf, rest)) = chain.split_first() else {
            return Err(FetchError::EmptyChain);
        };
        // Trust but verify: the chain must be our identity under our roots.
        self.bundle.verify(leaf, rest, mesh_identity::verify::KeyUsage::client_auth(), UnixTime::now(), Some(id))?;
        let key = PrivatePkcs8KeyDer::from(key.serialize_der());
        Ok(WorkloadCert::new(chain, key, self.bundle.clone(), now_secs())?)
    }
}

pub fn now_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}
