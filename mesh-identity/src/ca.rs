//! The certificate authority: signs workload certificates from CSRs, after checking that the
//! request is exactly what a workload may have and that the caller may have it.

use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use time::OffsetDateTime;

use crate::spiffe::{SpiffeError, SpiffeId};

/// Why the CA refused a request. Bounded: these become metric labels.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("the CSR cannot be parsed or its signature does not verify: {0}")]
    BadCsr(String),
    #[error("the CSR's key must be ECDSA P-256")]
    WrongKeyType,
    #[error("the CSR must carry exactly one SAN, a SPIFFE URI; it has {0}")]
    SanCount(usize),
    #[error("the CSR's SAN is not a URI")]
    NonUriSan,
    #[error("the CSR's URI SAN is not a workload SPIFFE ID: {0}")]
    NotSpiffe(SpiffeError),
    #[error("the CSR's trust domain {got:?} is not this CA's ({want:?})")]
    WrongTrustDomain { got: String, want: String },
    #[error("the CSR asks for a CA certificate; workloads get leaf certificates only")]
    CaRequested,
    #[error("not authorized: {0}")]
    Unauthorized(String),
    #[error("CA key or certificate: {0}")]
    Config(String),
}

impl CaError {
    pub fn reason(&self) -> &'static str {
        match self {
            CaError::BadCsr(_) => "bad_csr",
            CaError::WrongKeyType => "wrong_key_type",
            CaError::SanCount(_) => "san_count",
            CaError::NonUriSan => "non_uri_san",
            CaError::NotSpiffe(_) => "not_spiffe",
            CaError::WrongTrustDomain { .. } => "wrong_trust_domain",
            CaError::CaRequested => "ca_requested",
            CaError::Unauthorized(_) => "unauthorized",
            CaError::Config(_) => "config",
        }
    }
}

pub struct Ca {
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    /// PEMs sent after the leaf: the signing certificate when it is an intermediate, and the
    /// intermediates above it.
    chain: Vec<String>,
    roots: Vec<String>,
    pub default_ttl: Duration,
    pub max_ttl: Duration,
}

/// A freshly generated root: what an operator would keep (`cert_pem`, `key_pem`).
pub struct GeneratedRoot {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Ca {
    /// Generates a self-signed root (ECDSA P-256, 10 years).
    pub fn generate_root(trust_domain: &str) -> Result<GeneratedRoot, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| CaError::Config(e.to_string()))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, trust_domain);
        dn.push(DnType::CommonName, "sockmesh root CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(3650);
        let cert = params.self_signed(&key).map_err(|e| CaError::Config(e.to_string()))?;
        Ok(GeneratedRoot { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }

    /// Generates an intermediate CA under the root `root_cert_pem`/`root_key_pem` (ECDSA P-256,
    /// five years, no CA below it), named for `zone`: each zone of a mesh signs with its own, and
    /// every zone's agents trust the one root.
    pub fn generate_intermediate(
        trust_domain: &str,
        zone: &str,
        root_cert_pem: &str,
        root_key_pem: &str,
    ) -> Result<GeneratedRoot, CaError> {
        let root_key = KeyPair::from_pem(root_key_pem).map_err(|e| CaError::Config(format!("root key: {e}")))?;
        let root = Issuer::from_ca_cert_pem(root_cert_pem, root_key)
            .map_err(|e| CaError::Config(format!("root certificate: {e}")))?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| CaError::Config(e.to_string()))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, trust_domain);
        dn.push(DnType::CommonName, format!("sockmesh zone {zone} intermediate CA"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(1825);
        let cert = params.signed_by(&key, &root).map_err(|e| CaError::Config(e.to_string()))?;
        Ok(GeneratedRoot { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }

    /// A CA signing with `cert_pem`/`key_pem`. `chain_pem` holds the certificates above the
    /// signing certificate up to and including the root; empty when the signing certificate is
    /// itself the root. The last certificate of the chain (or the signing certificate) is the
    /// trust anchor served in the bundle.
    pub fn from_pem(
        trust_domain: &str,
        cert_pem: &str,
        key_pem: &str,
        chain_pem: &str,
        ttl: Duration,
        max_ttl: Duration,
    ) -> Result<Ca, CaError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| CaError::Config(format!("CA key: {e}")))?;
        let issuer =
            Issuer::from_ca_cert_pem(cert_pem, key).map_err(|e| CaError::Config(format!("CA certificate: {e}")))?;
        let above = split_pems(chain_pem);
        let (chain, roots) = match above.split_last() {
            None => (vec![], vec![cert_pem.trim().to_owned() + "\n"]),
            Some((root, middle)) => {
                let mut chain = vec![cert_pem.trim().to_owned() + "\n"];
                chain.extend(middle.iter().cloned());
                (chain, vec![root.clone()])
            }
        };
        Ok(Ca { trust_domain: trust_domain.to_owned(), issuer, chain, roots, default_ttl: ttl, max_ttl })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn roots_pem(&self) -> &[String] {
        &self.roots
    }

    /// Checks a CSR and returns the identity it asks for, without signing.
    pub fn check_csr(&self, csr_pem: &str) -> Result<(SpiffeId, CertificateSigningRequestParams), CaError> {
        let (id, csr) = parse_csr(csr_pem)?;
        if id.trust_domain() != self.trust_domain {
            return Err(CaError::WrongTrustDomain {
                got: id.trust_domain().to_owned(),
                want: self.trust_domain.clone(),
            });
        }
        Ok((id, csr))
    }

    /// Signs a workload CSR once `authorize` accepts the identity it asks for. Returns the
    /// chain (leaf first) as PEM.
    pub fn sign(
        &self,
        csr_pem: &str,
        ttl: Option<Duration>,
        authorize: impl FnOnce(&SpiffeId) -> Result<(), String>,
    ) -> Result<(SpiffeId, Vec<String>), CaError> {
        let (id, csr) = self.check_csr(csr_pem)?;
        authorize(&id).map_err(CaError::Unauthorized)?;
        let ttl = ttl.filter(|t| !t.is_zero()).unwrap_or(self.default_ttl).min(self.max_ttl);
        let mut params = CertificateParams::default();
        params.subject_alt_names = csr.params.subject_alt_names.clone();
        params.distinguished_name = DistinguishedName::new();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        // A minute of slack for clocks that disagree a little.
        params.not_before = now - time::Duration::minutes(1);
        params.not_after = now + time::Duration::seconds(ttl.as_secs() as i64);
        let leaf =
            params.signed_by(&csr.public_key, &self.issuer).map_err(|e| CaError::Config(format!("signing: {e}")))?;
        let mut chain = vec![leaf.pem()];
        chain.extend(self.chain.iter().cloned());
        Ok((id, chain))
    }

    /// A serving certificate for the controller's own gRPC port (DNS and IP SANs). With
    /// `zone`, also the zone controller's identity (a URI SAN, `spiffe://<td>/zone/<zone>`) and
    /// client use: the same certificate proves the zone to the other zones' controllers.
    pub fn issue_server_cert(
        &self,
        dns: &[String],
        ips: &[std::net::IpAddr],
        zone: Option<&SpiffeId>,
    ) -> Result<(Vec<String>, String), CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| CaError::Config(e.to_string()))?;
        let mut params = CertificateParams::new(dns.to_vec()).map_err(|e| CaError::Config(e.to_string()))?;
        params.subject_alt_names.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params.is_ca = IsCa::ExplicitNoCa;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        if let Some(z) = zone {
            let uri = z.to_string().try_into().map_err(|e| CaError::Config(format!("zone identity: {e}")))?;
            params.subject_alt_names.push(SanType::URI(uri));
            params.extended_key_usages.push(ExtendedKeyUsagePurpose::ClientAuth);
        }
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(1);
        params.not_after = now + time::Duration::days(365);
        let cert = params.signed_by(&key, &self.issuer).map_err(|e| CaError::Config(e.to_string()))?;
        let mut chain = vec![cert.pem()];
        chain.extend(self.chain.iter().cloned());
        Ok((chain, key.serialize_pem()))
    }
}

/// Checks that a CSR asks for exactly a workload leaf (one SPIFFE URI SAN, ECDSA P-256, not a
/// CA) and returns the identity it asks for, in whatever trust domain: which CA may sign it is
/// the caller's choice.
pub fn parse_csr(csr_pem: &str) -> Result<(SpiffeId, CertificateSigningRequestParams), CaError> {
    let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| CaError::BadCsr(e.to_string()))?;
    if csr.public_key.algorithm() != &PKCS_ECDSA_P256_SHA256 {
        return Err(CaError::WrongKeyType);
    }
    if matches!(csr.params.is_ca, IsCa::Ca(_)) {
        return Err(CaError::CaRequested);
    }
    let sans = &csr.params.subject_alt_names;
    if sans.len() != 1 {
        return Err(CaError::SanCount(sans.len()));
    }
    let SanType::URI(uri) = &sans[0] else {
        return Err(CaError::NonUriSan);
    };
    let id = SpiffeId::parse_workload(uri.as_str()).map_err(CaError::NotSpiffe)?;
    Ok((id, csr))
}

/// Splits concatenated PEM certificates.
pub fn split_pems(s: &str) -> Vec<String> {
    const END: &str = "-----END CERTIFICATE-----";
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(start) = rest.find("-----BEGIN CERTIFICATE-----") {
        let Some(end) = rest[start..].find(END) else { break };
        let stop = start + end + END.len();
        out.push(rest[start..stop].to_owned() + "\n");
        rest = &rest[stop..];
    }
    out
}

/// A workload key and a CSR for `id` (what the agent sends).
pub fn workload_csr(id: &SpiffeId) -> Result<(KeyPair, String), CaError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| CaError::Config(e.to_string()))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names =
        vec![SanType::URI(id.to_string().try_into().map_err(|_| CaError::Config("SPIFFE ID is not IA5".into()))?)];
    let csr = params.serialize_request(&key).map_err(|e| CaError::Config(e.to_string()))?;
    Ok((key, csr.pem().map_err(|e| CaError::Config(e.to_string()))?))
}
