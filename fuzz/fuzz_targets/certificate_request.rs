//! A certificate signing request as a node sends it to the CA (PEM), and PEM bundles as the
//! agent reads trust bundles: parsing never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|s: &str| {
    let _ = mesh_identity::ca::parse_csr(s);
    let _ = mesh_identity::ca::split_pems(s);
    let _ = mesh_identity::verify::pem_to_ders(s);
    let _ = mesh_identity::verify::TrustBundle::from_pems("cluster.local", &[s.to_owned()]);
});
