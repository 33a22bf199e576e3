//! SPIFFE IDs, as read from peer certificates' URI SANs and from policies: parsing never
//! panics, and what parses prints back to an ID that parses to the same.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mesh_identity::SpiffeId;

fuzz_target!(|s: &str| {
    if let Ok(id) = SpiffeId::parse(s) {
        let again = SpiffeId::parse(&id.to_string()).expect("a parsed ID parses again");
        assert_eq!(again, id);
    }
    let _ = SpiffeId::parse_workload(s);
});
