//! The certificate matrix and the CA's refusals, without sockets.

use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType, PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384,
};
use rustls_pki_types::{CertificateDer, UnixTime};
use time::OffsetDateTime;

use crate::ca::{workload_csr, Ca, CaError};
use crate::spiffe::{SpiffeError, SpiffeId};
use crate::verify::{pem_to_ders, PeerRole, TrustBundle, VerifyError};

const TD: &str = "cluster.local";

fn root() -> (Ca, TrustBundle) {
    let r = Ca::generate_root(TD).unwrap();
    let ca =
        Ca::from_pem(TD, &r.cert_pem, &r.key_pem, "", Duration::from_secs(3600), Duration::from_secs(86400)).unwrap();
    let bundle = TrustBundle::from_pems(TD, ca.roots_pem()).unwrap();
    (ca, bundle)
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().unwrap())
}

/// A leaf signed by `issuer_pem`/`issuer_key`, shaped by `tweak`.
fn leaf_from(
    issuer_pem: &str,
    issuer_key: &str,
    tweak: impl FnOnce(&mut CertificateParams),
) -> CertificateDer<'static> {
    let issuer = Issuer::from_ca_cert_pem(issuer_pem, KeyPair::from_pem(issuer_key).unwrap()).unwrap();
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = CertificateParams::default();
    p.subject_alt_names = vec![uri("spiffe://cluster.local/ns/default/sa/web")];
    p.is_ca = IsCa::ExplicitNoCa;
    p.extended_key_usages =
        vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let now = OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::hours(1);
    tweak(&mut p);
    p.signed_by(&key, &issuer).unwrap().der().clone()
}

fn verify(bundle: &TrustBundle, cert: &CertificateDer<'_>, expected: Option<&str>) -> Result<SpiffeId, VerifyError> {
    let want = expected.map(|e| SpiffeId::parse_workload(e).unwrap());
    bundle.verify(cert, &[], webpki::KeyUsage::server_auth(), UnixTime::now(), want.as_ref())
}

#[test]
fn certificate_matrix_each_defect_is_refused_with_its_reason() {
    let r = Ca::generate_root(TD).unwrap();
    let bundle = TrustBundle::from_pems(TD, std::slice::from_ref(&r.cert_pem)).unwrap();
    let other = Ca::generate_root(TD).unwrap();
    let leaf = |t: &dyn Fn(&mut CertificateParams)| leaf_from(&r.cert_pem, &r.key_pem, t);
    let now = OffsetDateTime::now_utc();
    let long = format!("spiffe://cluster.local/ns/default/sa/{}", "a".repeat(2048));
    let cases: Vec<(&str, CertificateDer<'static>, VerifyError)> = vec![
        (
            "expired",
            leaf(&|p| {
                p.not_before = now - time::Duration::hours(2);
                p.not_after = now - time::Duration::hours(1)
            }),
            VerifyError::Expired,
        ),
        (
            "not yet valid",
            leaf(&|p| {
                p.not_before = now + time::Duration::hours(1);
                p.not_after = now + time::Duration::hours(2)
            }),
            VerifyError::NotYetValid,
        ),
        (
            "wrong trust domain",
            leaf(&|p| p.subject_alt_names = vec![uri("spiffe://evil.example/ns/default/sa/web")]),
            VerifyError::WrongTrustDomain { got: "evil.example".into(), want: TD.into() },
        ),
        (
            "no URI SAN",
            leaf(&|p| p.subject_alt_names = vec![SanType::DnsName("web.default".try_into().unwrap())]),
            VerifyError::NoUriSan,
        ),
        (
            "two URI SANs",
            leaf(&|p| {
                p.subject_alt_names = vec![
                    uri("spiffe://cluster.local/ns/default/sa/web"),
                    uri("spiffe://cluster.local/ns/default/sa/db"),
                ]
            }),
            VerifyError::MultipleUriSans,
        ),
        ("CA leaf", leaf(&|p| p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained)), VerifyError::CaLeaf),
        ("unknown issuer", leaf_from(&other.cert_pem, &other.key_pem, |_| {}), VerifyError::UnknownIssuer),
        (
            "port",
            leaf(&|p| p.subject_alt_names = vec![uri("spiffe://cluster.local:443/ns/default/sa/web")]),
            VerifyError::MalformedSpiffeId(SpiffeError::Port),
        ),
        (
            "query",
            leaf(&|p| p.subject_alt_names = vec![uri("spiffe://cluster.local/ns/default/sa/web?x=1")]),
            VerifyError::MalformedSpiffeId(SpiffeError::Query),
        ),
        (
            "userinfo",
            leaf(&|p| p.subject_alt_names = vec![uri("spiffe://u@cluster.local/ns/default/sa/web")]),
            VerifyError::MalformedSpiffeId(SpiffeError::UserInfo),
        ),
        (
            "fragment",
            leaf(&|p| p.subject_alt_names = vec![uri("spiffe://cluster.local/ns/default/sa/web#f")]),
            VerifyError::MalformedSpiffeId(SpiffeError::Fragment),
        ),
        (
            "over 2048 bytes",
            leaf(&|p| p.subject_alt_names = vec![uri(&long)]),
            VerifyError::MalformedSpiffeId(SpiffeError::TooLong),
        ),
        (
            "not a workload path",
            leaf(&|p| p.subject_alt_names = vec![uri("spiffe://cluster.local/web")]),
            VerifyError::MalformedSpiffeId(SpiffeError::NotWorkload),
        ),
    ];
    for (name, cert, want) in cases {
        let got = verify(&bundle, &cert, None);
        assert_eq!(got, Err(want.clone()), "{name}");
        assert!(!want.reason().is_empty() && !want.to_string().is_empty());
    }
    // The well-formed one passes, and is refused when another identity is expected.
    let good = leaf(&|_| {});
    assert_eq!(verify(&bundle, &good, None).unwrap().to_string(), "spiffe://cluster.local/ns/default/sa/web");
    assert_eq!(
        verify(&bundle, &good, Some("spiffe://cluster.local/ns/default/sa/db")).unwrap_err().reason(),
        "unexpected_identity"
    );
}

#[test]
fn the_ca_signs_a_well_formed_request_for_an_authorized_identity() {
    let (ca, bundle) = root();
    let id = SpiffeId::workload(TD, "default", "web").unwrap();
    let (_key, csr) = workload_csr(&id).unwrap();
    let (got, chain) = ca.sign(&csr, Some(Duration::from_secs(600)), |_| Ok(())).unwrap();
    assert_eq!(got, id);
    let ders = pem_to_ders(&chain.join(""));
    assert_eq!(ders.len(), 1);
    assert_eq!(
        bundle.verify(&ders[0], &[], webpki::KeyUsage::client_auth(), UnixTime::now(), Some(&id)),
        Ok(id.clone())
    );
    // ECDSA P-256, not a CA, the requested TTL.
    let (_, x) = x509_parser::parse_x509_certificate(&ders[0]).unwrap();
    assert!(!x.basic_constraints().unwrap().map(|b| b.value.ca).unwrap_or(false));
    let life = x.validity().not_after.timestamp() - x.validity().not_before.timestamp();
    assert_eq!(life, 600 + 60, "TTL plus a minute of back-dating");
    assert_eq!(
        x.public_key().algorithm.parameters.as_ref().and_then(|p| p.as_oid().ok()).map(|o| o.to_id_string()),
        Some("1.2.840.10045.3.1.7".into())
    );
}

fn csr_with(key_alg: &'static rcgen::SignatureAlgorithm, tweak: impl FnOnce(&mut CertificateParams)) -> String {
    let key = KeyPair::generate_for(key_alg).unwrap();
    let mut p = CertificateParams::default();
    p.subject_alt_names = vec![uri("spiffe://cluster.local/ns/default/sa/web")];
    tweak(&mut p);
    p.serialize_request(&key).unwrap().pem().unwrap()
}

#[test]
fn the_ca_refuses_malformed_or_overreaching_requests() {
    let (ca, _) = root();
    let allow = |_: &SpiffeId| Ok(());
    let sign = |csr: &str| ca.sign(csr, None, allow).map(|_| ()).unwrap_err();
    assert!(matches!(
        sign(&csr_with(&PKCS_ECDSA_P256_SHA256, |p| p
            .subject_alt_names
            .push(uri("spiffe://cluster.local/ns/default/sa/db")))),
        CaError::SanCount(2)
    ));
    assert!(matches!(
        sign(&csr_with(&PKCS_ECDSA_P256_SHA256, |p| p.subject_alt_names = vec![uri("https://web.example")])),
        CaError::NotSpiffe(SpiffeError::WrongScheme)
    ));
    assert!(matches!(
        sign(&csr_with(&PKCS_ECDSA_P256_SHA256, |p| p.subject_alt_names =
            vec![SanType::DnsName("web".try_into().unwrap())])),
        CaError::NonUriSan
    ));
    assert!(matches!(
        sign(&csr_with(&PKCS_ECDSA_P256_SHA256, |p| p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained))),
        CaError::CaRequested
    ));
    assert!(matches!(
        sign(
            &csr_with(&PKCS_ECDSA_P256_SHA256, |p| p.subject_alt_names = vec![uri("spiffe://other/ns/default/sa/web")])
        ),
        CaError::WrongTrustDomain { .. }
    ));
    assert!(matches!(sign(&csr_with(&PKCS_ECDSA_P384_SHA384, |_| {})), CaError::WrongKeyType));
    assert!(matches!(
        sign("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"),
        CaError::BadCsr(_)
    ));
    let denied = ca
        .sign(&csr_with(&PKCS_ECDSA_P256_SHA256, |_| {}), None, |_| Err("web runs on node n2".into()))
        .map(|_| ())
        .unwrap_err();
    assert!(matches!(denied, CaError::Unauthorized(ref m) if m.contains("n2")), "{denied}");
}

#[test]
fn an_intermediate_under_an_external_root_signs_chains_that_verify() {
    // The operator's root stays offline; the controller gets an intermediate and its chain.
    let external = Ca::generate_root(TD).unwrap();
    let ext_issuer =
        Issuer::from_ca_cert_pem(&external.cert_pem, KeyPair::from_pem(&external.key_pem).unwrap()).unwrap();
    let int_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = CertificateParams::default();
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::DigitalSignature];
    p.distinguished_name.push(rcgen::DnType::CommonName, "sockmesh intermediate");
    let int_cert = p.signed_by(&int_key, &ext_issuer).unwrap().pem();
    let ca = Ca::from_pem(
        TD,
        &int_cert,
        &int_key.serialize_pem(),
        &external.cert_pem,
        Duration::from_secs(600),
        Duration::from_secs(600),
    )
    .unwrap();
    assert_eq!(ca.roots_pem(), std::slice::from_ref(&external.cert_pem.trim().to_owned().add_nl()));
    let bundle = Arc::new(TrustBundle::from_pems(TD, ca.roots_pem()).unwrap());
    let id = SpiffeId::workload(TD, "default", "web").unwrap();
    let (_k, csr) = workload_csr(&id).unwrap();
    let (_, chain) = ca.sign(&csr, None, |_| Ok(())).unwrap();
    let ders = pem_to_ders(&chain.join(""));
    assert_eq!(ders.len(), 2, "leaf and intermediate");
    assert_eq!(
        bundle.verify(&ders[0], &ders[1..], webpki::KeyUsage::client_auth(), UnixTime::now(), Some(&id)),
        Ok(id.clone())
    );
    // Without the intermediate, the leaf does not chain.
    assert_eq!(
        bundle.verify(&ders[0], &[], webpki::KeyUsage::client_auth(), UnixTime::now(), Some(&id)),
        Err(VerifyError::UnknownIssuer)
    );
}

trait AddNl {
    fn add_nl(self) -> String;
}
impl AddNl for String {
    fn add_nl(self) -> String {
        self + "\n"
    }
}

#[test]
fn a_remembered_chain_is_still_checked_for_identity_time_and_use() {
    let r = Ca::generate_root(TD).unwrap();
    let bundle = TrustBundle::from_pems(TD, std::slice::from_ref(&r.cert_pem)).unwrap();
    let web = SpiffeId::parse_workload("spiffe://cluster.local/ns/default/sa/web").unwrap();
    let db = SpiffeId::parse_workload("spiffe://cluster.local/ns/default/sa/db").unwrap();
    let now = OffsetDateTime::now_utc();
    let at = |t: OffsetDateTime| UnixTime::since_unix_epoch(Duration::from_secs(t.unix_timestamp() as u64));
    let good = leaf_from(&r.cert_pem, &r.key_pem, |_| {});
    for _ in 0..3 {
        assert_eq!(bundle.verify_peer(&good, &[], PeerRole::Server, at(now), Some(&web)), Ok(web.clone()));
    }
    assert_eq!(bundle.remembered_chains(), 1, "the same chain is verified once and then remembered");
    // Remembered, but not for another identity, nor past its validity, nor before it.
    assert_eq!(
        bundle.verify_peer(&good, &[], PeerRole::Server, at(now), Some(&db)).unwrap_err().reason(),
        "unexpected_identity"
    );
    assert_eq!(
        bundle.verify_peer(&good, &[], PeerRole::Server, at(now + time::Duration::hours(2)), None),
        Err(VerifyError::Expired)
    );
    assert_eq!(
        bundle.verify_peer(&good, &[], PeerRole::Server, at(now - time::Duration::hours(2)), None),
        Err(VerifyError::NotYetValid)
    );
    // Verified for one use is not verified for the other: a server-only certificate.
    let server_only = leaf_from(&r.cert_pem, &r.key_pem, |p| {
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    });
    assert!(bundle.verify_peer(&server_only, &[], PeerRole::Server, at(now), None).is_ok());
    assert_eq!(
        bundle.verify_peer(&server_only, &[], PeerRole::Client, at(now), None).unwrap_err().reason(),
        "invalid_chain"
    );
    // Another root's leaf with the same name is refused, and failures are not remembered.
    let other = Ca::generate_root(TD).unwrap();
    let forged = leaf_from(&other.cert_pem, &other.key_pem, |_| {});
    for _ in 0..2 {
        assert_eq!(bundle.verify_peer(&forged, &[], PeerRole::Server, at(now), None), Err(VerifyError::UnknownIssuer));
    }
    assert_eq!(bundle.remembered_chains(), 2, "good and server_only (as server) only");
}

/// With several trust domains, a certificate is checked only against the roots of the trust
/// domain it names: mesh A's CA cannot vouch for an identity of mesh B, even where both are
/// trusted. A known other mesh is refused as such.
#[test]
fn each_trust_domain_is_checked_against_its_own_roots_only() {
    let a = Ca::generate_root("a.example").unwrap();
    let b = Ca::generate_root("b.example").unwrap();
    let both = TrustBundle::federated(
        &[("a.example".into(), vec![a.cert_pem.clone()]), ("b.example".into(), vec![b.cert_pem.clone()])],
        vec![],
    )
    .unwrap();
    let a_only =
        TrustBundle::federated(&[("a.example".into(), vec![a.cert_pem.clone()])], vec!["b.example".into()]).unwrap();
    let san = |td: &str| uri(&format!("spiffe://{td}/ns/default/sa/web"));
    let b_by_b = leaf_from(&b.cert_pem, &b.key_pem, |p| p.subject_alt_names = vec![san("b.example")]);
    let b_by_a = leaf_from(&a.cert_pem, &a.key_pem, |p| p.subject_alt_names = vec![san("b.example")]);
    let a_by_a = leaf_from(&a.cert_pem, &a.key_pem, |p| p.subject_alt_names = vec![san("a.example")]);
    let c_by_a = leaf_from(&a.cert_pem, &a.key_pem, |p| p.subject_alt_names = vec![san("c.example")]);
    assert_eq!(verify(&both, &b_by_b, None).unwrap().trust_domain(), "b.example");
    assert_eq!(verify(&both, &a_by_a, None).unwrap().trust_domain(), "a.example");
    assert_eq!(verify(&both, &b_by_a, None), Err(VerifyError::UnknownIssuer), "A's CA cannot sign B's identities");
    assert_eq!(verify(&a_only, &b_by_b, None), Err(VerifyError::OtherMesh { got: "b.example".into() }));
    assert_eq!(verify(&a_only, &b_by_b, None).unwrap_err().reason(), "other_mesh");
    assert_eq!(
        verify(&a_only, &c_by_a, None),
        Err(VerifyError::WrongTrustDomain { got: "c.example".into(), want: "a.example".into() })
    );
}

/// What the admin API shows of a chain decodes back to the same certificates.
#[test]
fn pem_encoding_round_trips() {
    let r = Ca::generate_root(TD).unwrap();
    let der = pem_to_ders(&r.cert_pem).remove(0);
    let pem = crate::verify::der_to_pem(&der);
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----\n") && !pem.contains('\r'), "{pem}");
    assert_eq!(pem_to_ders(&pem), vec![der]);
}
