//! A test client's TLS configuration for an HBONE port: it mints its own client certificate
//! (from the controller's root, from a rogue root, or for another trust domain) and verifies
//! the server's SPIFFE identity. Used by the hand-driven HBONE clients (sm-hbone, sm-attack).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use mesh_identity::ca::{workload_csr, Ca};
use mesh_identity::verify::{pem_to_ders, LiveBundle, SpiffeServerVerifier, TrustBundle};
use mesh_identity::SpiffeId;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

/// `kind`: `legit` (signed by the controller's root in `root_dir`), `rogue` (a root of its
/// own) or `other-td` (the right root, another trust domain). `sa`: the service account in
/// namespace `default` the certificate names. The server must prove `expect`.
pub fn client_config(root_dir: &Path, kind: &str, sa: &str, expect: SpiffeId) -> rustls::ClientConfig {
    let root_pem = std::fs::read_to_string(root_dir.join("root.pem")).expect("root.pem");
    let root_key = std::fs::read_to_string(root_dir.join("root-key.pem")).expect("root-key.pem");
    let ttl = Duration::from_secs(600);
    let (td, ca) = match kind {
        "legit" => ("cluster.local", Ca::from_pem("cluster.local", &root_pem, &root_key, "", ttl, ttl).unwrap()),
        "other-td" => ("evil.example", Ca::from_pem("evil.example", &root_pem, &root_key, "", ttl, ttl).unwrap()),
        "rogue" => {
            let r = Ca::generate_root("cluster.local").unwrap();
            ("cluster.local", Ca::from_pem("cluster.local", &r.cert_pem, &r.key_pem, "", ttl, ttl).unwrap())
        }
        other => panic!("--client-cert {other}: legit, rogue or other-td"),
    };
    let id = SpiffeId::workload(td, "default", sa).unwrap();
    let (key, csr) = workload_csr(&id).unwrap();
    let (_, chain) = ca.sign(&csr, None, |_| Ok(())).unwrap();
    let bundle = LiveBundle::new(TrustBundle::from_pems("cluster.local", &[root_pem]).unwrap());
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(bundle, expect)))
        .with_client_auth_cert(
            pem_to_ders(&chain.concat()),
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    cfg
}
