//! A peer's certificate (DER), as the HBONE server and client read it after the handshake:
//! its SPIFFE ID and validity never panic on any input.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rustls_pki_types::CertificateDer;

fuzz_target!(|der: &[u8]| {
    let cert = CertificateDer::from(der);
    let _ = mesh_identity::verify::spiffe_id_of(&cert);
    let _ = mesh_identity::verify::not_before(&cert);
    let _ = mesh_identity::verify::not_after(&cert);
});
