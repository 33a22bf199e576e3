//! Verifying a peer's certificate: chain to the trust bundle, validity window, not a CA, exactly
//! one well-formed workload SPIFFE URI SAN, the trust domain, and (when known) the expected
//! identity. Every refusal has a bounded reason that reaches the log and a metric. rustls
//! verifiers for both ends of the tunnel are built on it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime};
use x509_parser::extensions::GeneralName;

use crate::spiffe::{SpiffeError, SpiffeId};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("the peer presented no certificate")]
    NoCertificate,
    #[error("the certificate cannot be parsed")]
    Malformed,
    #[error("the certificate has expired")]
    Expired,
    #[error("the certificate is not yet valid")]
    NotYetValid,
    #[error("the certificate is not issued by a trusted root")]
    UnknownIssuer,
    #[error("the certificate is a CA certificate, not a workload leaf")]
    CaLeaf,
    #[error("the certificate has no URI SAN")]
    NoUriSan,
    #[error("the certificate has more than one URI SAN")]
    MultipleUriSans,
    #[error("the certificate's URI SAN is not a workload SPIFFE ID: {0}")]
    MalformedSpiffeId(SpiffeError),
    #[error("the certificate's trust domain {got:?} is not {want:?}")]
    WrongTrustDomain { got: String, want: String },
    #[error("the peer belongs to another mesh (trust domain {got:?}), which this workload's mesh does not trust")]
    OtherMesh { got: String },
    #[error("the peer is {got}, expected {want}")]
    UnexpectedIdentity { got: String, want: String },
    #[error("the certificate chain is invalid: {0}")]
    Invalid(String),
}

impl VerifyError {
    /// A bounded label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            VerifyError::NoCertificate => "no_certificate",
            VerifyError::Malformed => "malformed",
            VerifyError::Expired => "expired",
            VerifyError::NotYetValid => "not_yet_valid",
            VerifyError::UnknownIssuer => "unknown_issuer",
            VerifyError::CaLeaf => "ca_leaf",
            VerifyError::NoUriSan => "no_uri_san",
            VerifyError::MultipleUriSans => "multiple_uri_sans",
            VerifyError::MalformedSpiffeId(_) => "malformed_spiffe_id",
            VerifyError::WrongTrustDomain { .. } => "wrong_trust_domain",
            VerifyError::OtherMesh { .. } => "other_mesh",
            VerifyError::UnexpectedIdentity { .. } => "unexpected_identity",
            VerifyError::Invalid(_) => "invalid_chain",
        }
    }

    /// Finds our reason inside a rustls error (a failed handshake).
    pub fn from_rustls(e: &rustls::Error) -> Option<VerifyError> {
        match e {
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(o)) => {
                o.0.downcast_ref::<VerifyError>().cloned()
            }
            _ => None,
        }
    }
}

/// The trust domains a peer may belong to, each with its own roots, and the trust domains
/// known to belong to other meshes (refused with [`VerifyError::OtherMesh`]).
///
/// A certificate is checked against the roots of the trust domain its SPIFFE ID names, never
/// against another's: with several meshes (or federation), one mesh's CA cannot vouch for
/// another mesh's identities.
#[derive(Debug)]
pub struct TrustBundle {
    /// The first is the bundle's own trust domain.
    domains: Vec<(String, Vec<TrustAnchor<'static>>)>,
    others: Vec<String>,
    /// Chains that verified against these anchors (see [`TrustBundle::verify_peer`]).
    verified: Mutex<HashMap<[u8; 32], Verified>>,
}

/// A trust bundle that the configuration may replace: verifiers read the one in force at each
/// handshake.
#[derive(Debug)]
pub struct LiveBundle(arc_swap::ArcSwap<TrustBundle>);

impl LiveBundle {
    pub fn new(b: TrustBundle) -> Arc<LiveBundle> {
        Arc::new(LiveBundle(arc_swap::ArcSwap::from_pointee(b)))
    }
    pub fn load(&self) -> Arc<TrustBundle> {
        self.0.load_full()
    }
    pub fn store(&self, b: TrustBundle) {
        self.0.store(Arc::new(b))
    }
}

/// What the tunnel's end is verifying: the peer's certificate must allow that use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerRole {
    /// The HBONE server, verified by the client.
    Server,
    /// The HBONE client, verified by the server.
    Client,
}

impl PeerRole {
    fn usage(self) -> webpki::KeyUsage {
        match self {
            PeerRole::Server => webpki::KeyUsage::server_auth(),
            PeerRole::Client => webpki::KeyUsage::client_auth(),
        }
    }
}

/// A chain that verified: whose it is, and the window (seconds since the epoch, inclusive) in
/// which every certificate presented with it is within its validity.
#[derive(Debug, Clone)]
struct Verified {
    id: SpiffeId,
    not_before: u64,
    not_after: u64,
}

/// Past this many distinct verified chains the cache starts over (a node sees a few per peer
/// identity per rotation).
const VERIFIED_MAX: usize = 4096;

#[derive(Debug, thiserror::Error)]
#[error("trust bundle: {0}")]
pub struct BundleError(String);

fn anchors_of(pems: &[String]) -> Result<Vec<TrustAnchor<'static>>, BundleError> {
    let mut anchors = Vec::new();
    for pem in pems {
        for der in pem_to_ders(pem) {
            let a = webpki::anchor_from_trusted_cert(&der).map_err(|e| BundleError(e.to_string()))?;
            anchors.push(a.to_owned());
        }
    }
    Ok(anchors)
}

impl TrustBundle {
    /// One trust domain and its roots.
    pub fn from_pems(trust_domain: &str, pems: &[String]) -> Result<TrustBundle, BundleError> {
        TrustBundle::federated(&[(trust_domain.to_owned(), pems.to_vec())], Vec::new())
    }

    /// Several trust domains, each with its roots (the first is the bundle's own), and the trust
    /// domains of other meshes, which are refused as such. No trust domain at all accepts no one.
    pub fn federated(domains: &[(String, Vec<String>)], others: Vec<String>) -> Result<TrustBundle, BundleError> {
        let mut out = Vec::new();
        for (td, pems) in domains {
            let anchors = anchors_of(pems)?;
            if anchors.is_empty() {
                return Err(BundleError(format!("no root certificate found for trust domain {td}")));
            }
            out.push((td.clone(), anchors));
        }
        Ok(TrustBundle { domains: out, others, verified: Default::default() })
    }

    /// The bundle's own trust domain ("" for a bundle that accepts no one).
    pub fn trust_domain(&self) -> &str {
        self.domains.first().map(|(td, _)| td.as_str()).unwrap_or("")
    }

    /// Verifies a peer chain and returns its workload identity.
    pub fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        usage: webpki::KeyUsage,
        now: UnixTime,
        expected: Option<&SpiffeId>,
    ) -> Result<SpiffeId, VerifyError> {
        let (_, x509) = x509_parser::parse_x509_certificate(end_entity).map_err(|_| VerifyError::Malformed)?;
        if x509.basic_constraints().ok().flatten().is_some_and(|bc| bc.value.ca) {
            return Err(VerifyError::CaLeaf);
        }
        // The SPIFFE ID picks the roots: a certificate is only ever checked against the roots of
        // the trust domain it claims.
        let id = spiffe_id_of_parsed(&x509)?;
        let Some((_, anchors)) = self.domains.iter().find(|(td, _)| td == id.trust_domain()) else {
            let got = id.trust_domain().to_owned();
            if self.others.contains(&got) {
                return Err(VerifyError::OtherMesh { got });
            }
            return Err(VerifyError::WrongTrustDomain { got, want: self.trust_domain().to_owned() });
        };
        let ee = webpki::EndEntityCert::try_from(end_entity).map_err(|_| VerifyError::Malformed)?;
        ee.verify_for_usage(webpki::ALL_VERIFICATION_ALGS, anchors, intermediates, now, usage, None, None).map_err(
            |e| match e {
                webpki::Error::CertExpired { .. } => VerifyError::Expired,
                webpki::Error::CertNotValidYet { .. } => VerifyError::NotYetValid,
                // A root with the same name but another key (another install's root) shows up
                // as a bad signature: either way no trusted root issued it.
                webpki::Error::UnknownIssuer | webpki::Error::InvalidSignatureForPublicKey => {
                    VerifyError::UnknownIssuer
                }
                webpki::Error::CaUsedAsEndEntity => VerifyError::CaLeaf,
                other => VerifyError::Invalid(format!("{other:?}")),
            },
        )?;
        expect(id, expected)
    }

    /// [`TrustBundle::verify`] for a tunnel's peer, remembering chains that verified.
    ///
    /// Every mutual-TLS handshake presents the same few certificates again and again, and
    /// checking a chain's signatures costs as much as the handshake's own signature. What the
    /// check decides depends only on the certificates' bytes, these anchors, the use and the
    /// time, so a chain that verified is remembered by a digest of its bytes and the use, with
    /// the window in which all its certificates are valid; a later handshake presenting the
    /// same bytes inside that window gets the same answer without the signature checks. The
    /// expected identity is checked every time, a chain outside its window is verified again
    /// (and refused with the precise reason), and failures are never remembered. The handshake
    /// itself still proves possession of the key (CertificateVerify) every time.
    pub fn verify_peer(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        role: PeerRole,
        now: UnixTime,
        expected: Option<&SpiffeId>,
    ) -> Result<SpiffeId, VerifyError> {
        let key = chain_digest(role, end_entity, intermediates);
        let t = now.as_secs();
        let hit = self.verified.lock().unwrap().get(&key).filter(|v| v.not_before <= t && t <= v.not_after).cloned();
        if let Some(v) = hit {
            return expect(v.id, expected);
        }
        let id = self.verify(end_entity, intermediates, role.usage(), now, None)?;
        if let Some((not_before, not_after)) = validity_window(end_entity, intermediates) {
            let mut cache = self.verified.lock().unwrap();
            if cache.len() >= VERIFIED_MAX {
                cache.clear();
            }
            cache.insert(key, Verified { id: id.clone(), not_before, not_after });
        }
        expect(id, expected)
    }

    /// How many verified chains are remembered.
    pub fn remembered_chains(&self) -> usize {
        self.verified.lock().unwrap().len()
    }
}

fn expect(id: SpiffeId, expected: Option<&SpiffeId>) -> Result<SpiffeId, VerifyError> {
    match expected {
        Some(want) if &id != want => {
            Err(VerifyError::UnexpectedIdentity { got: id.to_string(), want: want.to_string() })
        }
        _ => Ok(id),
    }
}

/// SHA-256 over the use and each certificate, length-prefixed.
fn chain_digest(role: PeerRole, end_entity: &[u8], intermediates: &[CertificateDer<'_>]) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(&[role as u8]);
    for der in std::iter::once(end_entity).chain(intermediates.iter().map(|c| c.as_ref())) {
        ctx.update(&(der.len() as u64).to_be_bytes());
        ctx.update(der);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// The span in which every presented certificate is within its validity, if it is not empty.
fn validity_window(end_entity: &[u8], intermediates: &[CertificateDer<'_>]) -> Option<(u64, u64)> {
    let (mut from, mut to) = (0u64, u64::MAX);
    for der in std::iter::once(end_entity).chain(intermediates.iter().map(|c| c.as_ref())) {
        let (_, x509) = x509_parser::parse_x509_certificate(der).ok()?;
        let v = x509.validity();
        from = from.max(u64::try_from(v.not_before.timestamp()).unwrap_or(0));
        to = to.min(u64::try_from(v.not_after.timestamp()).ok()?);
    }
    (from <= to).then_some((from, to))
}

/// The workload SPIFFE ID in a certificate (exactly one URI SAN). Checks nothing else: use it
/// only on a certificate that [`TrustBundle::verify`] accepted.
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, VerifyError> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert).map_err(|_| VerifyError::Malformed)?;
    spiffe_id_of_parsed(&x509)
}

/// The SPIFFE ID in a certificate's one URI SAN, whatever its path (a zone controller's
/// `spiffe://<td>/zone/<zone>`, which no workload certificate can carry: the CA signs only
/// workload paths). Checks nothing else: use it only on a certificate whose chain was verified.
pub fn any_spiffe_id_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, VerifyError> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert).map_err(|_| VerifyError::Malformed)?;
    one_uri(&x509, SpiffeId::parse)
}

fn uri_sans<'a>(x509: &'a x509_parser::certificate::X509Certificate<'_>) -> Result<Vec<&'a str>, VerifyError> {
    let san = x509.subject_alternative_name().map_err(|_| VerifyError::Malformed)?;
    Ok(san
        .map(|s| {
            s.value
                .general_names
                .iter()
                .filter_map(|g| if let GeneralName::URI(u) = g { Some(*u) } else { None })
                .collect()
        })
        .unwrap_or_default())
}

fn spiffe_id_of_parsed(x509: &x509_parser::certificate::X509Certificate<'_>) -> Result<SpiffeId, VerifyError> {
    one_uri(x509, SpiffeId::parse_workload)
}

/// The certificate's one URI SAN, parsed by `parse`.
fn one_uri(
    x509: &x509_parser::certificate::X509Certificate<'_>,
    parse: fn(&str) -> Result<SpiffeId, crate::spiffe::SpiffeError>,
) -> Result<SpiffeId, VerifyError> {
    match uri_sans(x509)?.as_slice() {
        [] => Err(VerifyError::NoUriSan),
        [one] => parse(one).map_err(VerifyError::MalformedSpiffeId),
        _ => Err(VerifyError::MultipleUriSans),
    }
}

pub use webpki::KeyUsage;

/// The not-before time of a certificate, in seconds since the epoch.
pub fn not_before(cert: &CertificateDer<'_>) -> Option<i64> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert).ok()?;
    Some(x509.validity().not_before.timestamp())
}

/// The not-after time of a certificate, in seconds since the epoch.
pub fn not_after(cert: &CertificateDer<'_>) -> Option<i64> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert).ok()?;
    Some(x509.validity().not_after.timestamp())
}

/// One certificate as PEM (LF line endings), the inverse of [`pem_to_ders`].
pub fn der_to_pem(der: &[u8]) -> String {
    let config = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    pem::encode_config(&pem::Pem::new("CERTIFICATE", der), config)
}

pub fn pem_to_ders(pem: &str) -> Vec<CertificateDer<'static>> {
    use rustls_pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes()).filter_map(|r| r.ok()).collect()
}

fn algorithms() -> WebPkiSupportedAlgorithms {
    rustls::crypto::ring::default_provider().signature_verification_algorithms
}

fn reject(e: VerifyError) -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(Arc::new(e))))
}

/// The client side of the tunnel: the server must prove the destination workload's identity.
/// The TLS server name is not used; the SPIFFE ID is the name.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    bundle: Arc<LiveBundle>,
    expected: SpiffeId,
}

impl SpiffeServerVerifier {
    pub fn new(bundle: Arc<LiveBundle>, expected: SpiffeId) -> Self {
        SpiffeServerVerifier { bundle, expected }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.bundle
            .load()
            .verify_peer(end_entity, intermediates, PeerRole::Server, now, Some(&self.expected))
            .map(|_| ServerCertVerified::assertion())
            .map_err(reject)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}

/// The server side: any workload of the trust domain may connect; who it is is read from the
/// verified certificate and handed to policy.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    bundle: Arc<LiveBundle>,
}

impl SpiffeClientVerifier {
    pub fn new(bundle: Arc<LiveBundle>) -> Self {
        SpiffeClientVerifier { bundle }
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.bundle
            .load()
            .verify_peer(end_entity, intermediates, PeerRole::Client, now, None)
            .map(|_| ClientCertVerified::assertion())
            .map_err(reject)
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}
