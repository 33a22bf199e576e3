//! The agent's identity manager: a key and certificate per workload identity it serves,
//! requested from the controller's CA when the first workload of that identity appears,
//! renewed at half-life (with backoff on failure; the old certificate is kept until it
//! expires), dropped when the last such workload leaves. Connections of a workload wait a
//! little for its certificate and then fail: never plaintext instead.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mesh_identity::ca::workload_csr;
use mesh_identity::proto::certificate_service_client::CertificateServiceClient;
use mesh_identity::proto::CreateCertificateRequest;
use mesh_identity::verify::{pem_to_ders, SpiffeClientVerifier, SpiffeServerVerifier, TrustBundle};
use mesh_identity::SpiffeId;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use tokio::sync::watch;
use tonic::transport::Channel;

#[derive(Debug, Clone, thiserror::Error)]
pub enum IdentityError {
    #[error("no certificate for {0} yet (the controller has not issued one); the connection is refused rather than sent in plaintext")]
    NotReady(String),
    #[error("{0} is not served by this agent")]
    Unknown(String),
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("controller: {0}")]
    Rpc(String),
    #[error("the controller did not answer in time")]
    Timeout,
    #[error("the CA returned a chain that does not verify: {0}")]
    BadChain(String),
    #[error("local: {0}")]
    Local(String),
}

impl FetchError {
    pub fn reason(&self) -> &'static str {
        match self {
            FetchError::Rpc(_) => "rpc",
            FetchError::Timeout => "timeout",
            FetchError::BadChain(_) => "bad_chain",
            FetchError::Local(_) => "local",
        }
    }
}

pub struct WorkloadCert {
    pub chain: Vec<CertificateDer<'static>>,
    key: PrivatePkcs8KeyDer<'static>,
    /// Seconds since the epoch.
    pub not_after: i64,
    pub not_before: i64,
    /// When this agent received it: renewal is due half-way from here to `not_after` (the CA
    /// back-dates `not_before` for clock skew, so counting from there would renew too early).
    pub received_at: i64,
    /// What the HBONE listener of a workload with this identity presents.
    pub server_config: Arc<rustls::ServerConfig>,
    /// Client configurations by the identity the peer must prove, built once per certificate:
    /// building one loads (and checks) the private key, which costs as much as a signature.
    client_configs: Mutex<HashMap<SpiffeId, Arc<rustls::ClientConfig>>>,
}

/// More distinct destination identities than this per certificate and the cache starts over.
const CLIENT_CONFIGS_MAX: usize = 4096;

impl WorkloadCert {
    fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
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

#[derive(Default)]
pub struct IdentityStats {
    pub issued: AtomicU64,
    pub failures: Mutex<std::collections::BTreeMap<&'static str, u64>>,
}

pub struct Identities {
    cfg: IdentityConfig,
    pub bundle: Arc<TrustBundle>,
    client: CertificateServiceClient<Channel>,
    channel: Channel,
    entries: Mutex<HashMap<SpiffeId, Entry>>,
    pub stats: IdentityStats,
}

/// ring (with aws-lc's X25519), with the TLS 1.3 suites in the order the agent prefers:
/// AES-128-GCM/SHA-256 first (fewer AES rounds per byte than AES-256, and SHA-256 for the key
/// schedule where SHA-384 runs on SHA-512 blocks, which most CPUs do not accelerate). Both
/// ends are agents, so this order decides; every suite is still TLS 1.3 AEAD with forward
/// secrecy.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::ring::cipher_suite;
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = vec![
        cipher_suite::TLS13_AES_128_GCM_SHA256,
        cipher_suite::TLS13_AES_256_GCM_SHA384,
        cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    // X25519 first, as rustls orders them, from aws-lc (see kx.rs); the NIST curves from ring.
    p.kx_groups =
        vec![crate::kx::X25519, rustls::crypto::ring::kx_group::SECP256R1, rustls::crypto::ring::kx_group::SECP384R1];
    Arc::new(p)
}

impl Identities {
    pub fn new(cfg: IdentityConfig) -> Result<Arc<Self>, String> {
        let bundle = Arc::new(TrustBundle::from_pems(&cfg.trust_domain, &cfg.bundle_pems).map_err(|e| e.to_string())?);
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificates(cfg.bundle_pems.iter().map(tonic::transport::Certificate::from_pem))
            .domain_name(cfg.controller_name.clone());
        let channel = Channel::from_shared(cfg.controller.clone())
            .map_err(|e| format!("--controller {:?}: {e}", cfg.controller))?
            .tls_config(tls)
            .map_err(|e| format!("controller TLS: {e}"))?
            .connect_timeout(Duration::from_secs(3))
            .connect_lazy();
        Ok(Arc::new(Identities {
            cfg,
            bundle,
            client: CertificateServiceClient::new(channel.clone()),
            channel,
            entries: Mutex::new(HashMap::new()),
            stats: IdentityStats::default(),
        }))
    }

    /// The channel to the controller (shared by the CA client and the config stream).
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// `Bearer <node credential>`, read fresh from the credential file.
    pub fn bearer(&self) -> Result<tonic::metadata::MetadataValue<tonic::metadata::Ascii>, FetchError> {
        let credential = std::fs::read_to_string(&self.cfg.credential_file)
            .map_err(|e| FetchError::Local(format!("node credential {}: {e}", self.cfg.credential_file.display())))?;
        format!("Bearer {}", credential.trim())
            .parse()
            .map_err(|_| FetchError::Local("node credential is not valid header text".into()))
    }

    pub fn trust_domain(&self) -> &str {
        &self.cfg.trust_domain
    }

    /// One more workload uses `id`: start maintaining its certificate if it is the first.
    pub fn acquire(self: &Arc<Self>, id: &SpiffeId) {
        let mut entries = self.entries.lock().unwrap();
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
        let mut entries = self.entries.lock().unwrap();
        if let Some(e) = entries.get_mut(id) {
            e.refs -= 1;
            if e.refs == 0 {
                e.task.abort();
                entries.remove(id);
                tracing::info!(identity = %id, "identity dropped: its last workload left");
            }
        }
    }

    /// The certificate for `id` if it has one now.
    pub fn current(&self, id: &SpiffeId) -> Option<Arc<WorkloadCert>> {
        let entries = self.entries.lock().unwrap();
        let c = entries.get(id)?.rx.borrow().clone()?;
        (c.not_after > now_secs()).then_some(c)
    }

    /// The certificate for `id`, waiting up to the configured time for the first one.
    pub async fn get(&self, id: &SpiffeId) -> Result<Arc<WorkloadCert>, IdentityError> {
        let mut rx = {
            let entries = self.entries.lock().unwrap();
            entries.get(id).ok_or_else(|| IdentityError::Unknown(id.to_string()))?.rx.clone()
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
                _ => return Err(IdentityError::NotReady(id.to_string())),
            }
        }
    }

    /// Client TLS for a tunnel from `cert`'s workload to a peer that must prove `expected`.
    pub fn client_config(
        &self,
        cert: &WorkloadCert,
        expected: SpiffeId,
    ) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
        if let Some(c) = cert.client_configs.lock().unwrap().get(&expected) {
            return Ok(c.clone());
        }
        let mut c = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(
                self.bundle.clone(),
                expected.clone(),
            )))
            .with_client_auth_cert(cert.chain.clone(), cert.key())?;
        c.alpn_protocols = vec![b"h2".to_vec()];
        // Every tunnel is a full handshake: both ends prove their identity each time, and no
        // session secrets outlive a connection.
        c.resumption = rustls::client::Resumption::disabled();
        let c = Arc::new(c);
        let mut cache = cert.client_configs.lock().unwrap();
        if cache.len() >= CLIENT_CONFIGS_MAX {
            cache.clear();
        }
        cache.insert(expected, c.clone());
        Ok(c)
    }

    pub fn certs_json(&self) -> serde_json::Value {
        let entries = self.entries.lock().unwrap();
        serde_json::Value::Array(
            entries
                .iter()
                .map(|(id, e)| {
                    let c = e.rx.borrow().clone();
                    serde_json::json!({
                        "identity": id.to_string(),
                        "workloads": e.refs,
                        "ready": c.as_ref().is_some_and(|c| c.not_after > now_secs()),
                        "notBefore": c.as_ref().map(|c| c.not_before),
                        "notAfter": c.as_ref().map(|c| c.not_after),
                    })
                })
                .collect(),
        )
    }

    async fn maintain(self: Arc<Self>, id: SpiffeId, tx: watch::Sender<Option<Arc<WorkloadCert>>>) {
        let mut backoff = Duration::from_millis(500);
        loop {
            match self.fetch(&id).await {
                Ok(cert) => {
                    let (got, na) = (cert.received_at, cert.not_after);
                    self.stats.issued.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(identity = %id, not_after = na, "certificate issued");
                    let _ = tx.send(Some(Arc::new(cert)));
                    backoff = Duration::from_millis(500);
                    // Renew at half-life, counted from receipt.
                    let half = ((na - got).max(2) / 2) as u64;
                    let renew_at = (got as u64 + half).saturating_sub(now_secs() as u64);
                    tokio::time::sleep(Duration::from_secs(renew_at.max(1))).await;
                }
                Err(e) => {
                    *self.stats.failures.lock().unwrap().entry(e.reason()).or_default() += 1;
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
        let (key, csr) = workload_csr(id).map_err(|e| FetchError::Local(e.to_string()))?;
        let mut req = tonic::Request::new(CreateCertificateRequest {
            csr,
            validity_duration_seconds: self.cfg.cert_ttl.map(|t| t.as_secs() as i64).unwrap_or(0),
        });
        req.metadata_mut().insert("authorization", self.bearer()?);
        let resp = tokio::time::timeout(Duration::from_secs(10), self.client.clone().create_certificate(req))
            .await
            .map_err(|_| FetchError::Timeout)?
            .map_err(|s| FetchError::Rpc(format!("{}: {}", s.code(), s.message())))?
            .into_inner();
        let chain = pem_to_ders(&resp.cert_chain.concat());
        let Some((leaf, rest)) = chain.split_first() else {
            return Err(FetchError::BadChain("empty chain".into()));
        };
        // Trust but verify: the chain must be our identity under our roots.
        self.bundle
            .verify(leaf, rest, webpki_usage(), UnixTime::now(), Some(id))
            .map_err(|e| FetchError::BadChain(e.to_string()))?;
        let not_after = mesh_identity::verify::not_after(leaf).unwrap_or(0);
        let not_before = mesh_identity::verify::not_before(leaf).unwrap_or(0);
        let key = PrivatePkcs8KeyDer::from(key.serialize_der());
        let mut server = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| FetchError::Local(e.to_string()))?
            .with_client_cert_verifier(Arc::new(SpiffeClientVerifier::new(self.bundle.clone())))
            .with_single_cert(chain.clone(), PrivateKeyDer::Pkcs8(key.clone_key()))
            .map_err(|e| FetchError::Local(e.to_string()))?;
        server.alpn_protocols = vec![b"h2".to_vec()];
        // No resumption (see client_config): no tickets to send, no sessions to keep.
        server.send_tls13_tickets = 0;
        server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        Ok(WorkloadCert {
            chain,
            key,
            not_after,
            not_before,
            received_at: now_secs(),
            server_config: Arc::new(server),
            client_configs: Mutex::new(HashMap::new()),
        })
    }
}

fn webpki_usage() -> mesh_identity::verify::KeyUsage {
    mesh_identity::verify::KeyUsage::client_auth()
}

pub fn now_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}
