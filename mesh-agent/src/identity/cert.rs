//! A workload's certificate and key, and the TLS configurations built from them: the server
//! side an HBONE listener presents, and client sides per peer identity a tunnel requires.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use mesh_identity::verify::{LiveBundle, SpiffeClientVerifier, SpiffeServerVerifier};
use mesh_identity::SpiffeId;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// More distinct destination identities than this per certificate and the cache starts over.
const CLIENT_CONFIGS_MAX: usize = 4096;

pub struct WorkloadCert {
    /// Whose it is.
    pub id: SpiffeId,
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
    /// What the peers a tunnel goes to are verified against (every mesh's trust domain, each
    /// with its own roots: the peer must prove the exact identity the controller's record names).
    servers: Arc<LiveBundle>,
    /// Client configurations by the identity the peer must prove, built once per certificate:
    /// building one loads (and checks) the private key, which costs as much as a signature.
    client_configs: Mutex<HashMap<SpiffeId, Arc<rustls::ClientConfig>>>,
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
        vec![super::kx::X25519, rustls::crypto::ring::kx_group::SECP256R1, rustls::crypto::ring::kx_group::SECP384R1];
    Arc::new(p)
}

impl WorkloadCert {
    /// A certificate chain (leaf first) and its key, verified by the caller, made ready to serve.
    /// `clients`: what the clients of its HBONE listener are verified against (its mesh's trust
    /// domain, and those its mesh trusts); `servers`: what the peers its tunnels go to are.
    pub fn new(
        id: SpiffeId,
        chain: Vec<CertificateDer<'static>>,
        key: PrivatePkcs8KeyDer<'static>,
        clients: Arc<LiveBundle>,
        servers: Arc<LiveBundle>,
        received_at: i64,
    ) -> Result<WorkloadCert, rustls::Error> {
        let leaf = chain.first().ok_or(rustls::Error::NoCertificatesPresented)?;
        let not_after = mesh_identity::verify::not_after(leaf).unwrap_or(0);
        let not_before = mesh_identity::verify::not_before(leaf).unwrap_or(0);
        let mut server = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(Arc::new(SpiffeClientVerifier::new(clients)))
            .with_single_cert(chain.clone(), PrivateKeyDer::Pkcs8(key.clone_key()))?;
        server.alpn_protocols = vec![b"h2".to_vec()];
        // No resumption (see client_config): no tickets to send, no sessions to keep.
        server.send_tls13_tickets = 0;
        server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        Ok(WorkloadCert {
            id,
            chain,
            key,
            not_after,
            not_before,
            received_at,
            server_config: Arc::new(server),
            servers,
            client_configs: Mutex::new(HashMap::new()),
        })
    }

    /// Client TLS for a tunnel from this certificate's workload to a peer that must prove
    /// `expected`.
    pub fn client_config(&self, expected: &SpiffeId) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
        if let Some(c) = self.client_configs.lock().unwrap_or_else(|e| e.into_inner()).get(expected) {
            return Ok(c.clone());
        }
        let mut c = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(
                self.servers.clone(),
                expected.clone(),
            )))
            .with_client_auth_cert(self.chain.clone(), PrivateKeyDer::Pkcs8(self.key.clone_key()))?;
        c.alpn_protocols = vec![b"h2".to_vec()];
        // Every tunnel is a full handshake: both ends prove their identity each time, and no
        // session secrets outlive a connection.
        c.resumption = rustls::client::Resumption::disabled();
        let c = Arc::new(c);
        let mut cache = self.client_configs.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= CLIENT_CONFIGS_MAX {
            cache.clear();
        }
        cache.insert(expected.clone(), c.clone());
        Ok(c)
    }
}

/// When to renew a certificate received at `received_at` that expires at `not_after` (both
/// seconds since the epoch), seen at `now`: at half its remaining life counted from receipt,
/// and never sooner than a second from now (a certificate that is already due, or a clock
/// that jumped, must not make the agent ask in a tight loop).
pub fn renew_in(received_at: i64, not_after: i64, now: i64) -> std::time::Duration {
    let half = (not_after - received_at).max(2) / 2;
    let due = received_at + half;
    std::time::Duration::from_secs((due - now).max(1) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_due_at_half_life_counted_from_receipt() {
        // 24 h certificate received now: renew in 12 h.
        assert_eq!(renew_in(1000, 1000 + 86_400, 1000).as_secs(), 43_200);
        // Back-dating does not matter: only receipt and expiry count. Asked again 2 h later,
        // it is 10 h away.
        assert_eq!(renew_in(1000, 1000 + 86_400, 1000 + 7_200).as_secs(), 36_000);
        // A 20 s certificate renews every 10 s.
        assert_eq!(renew_in(50, 70, 50).as_secs(), 10);
    }

    #[test]
    fn renewal_is_never_sooner_than_a_second() {
        // Already past half-life, expired, or a clock that went backwards past receipt.
        assert_eq!(renew_in(1000, 1020, 1015).as_secs(), 1);
        assert_eq!(renew_in(1000, 1020, 5000).as_secs(), 1);
        assert_eq!(renew_in(1000, 999, 1000).as_secs(), 1);
        assert_eq!(renew_in(1000, 1000 + 86_400, 0).as_secs(), 44_200);
    }
}
