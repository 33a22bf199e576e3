//! AuthorizationPolicy and PeerAuthentication specs from YAML (the config directory, the
//! CRDs' JSON is a subset), then validated and compiled as the controller and agent do.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mesh_model::authz::Compiled;
use mesh_model::policy::{AuthorizationPolicySpec, PeerAuthenticationSpec};

fuzz_target!(|s: &str| {
    if let Ok(spec) = serde_yaml::from_str::<AuthorizationPolicySpec>(s) {
        let _ = Compiled::compile("default", "fuzz", &spec);
    }
    if let Ok(spec) = serde_yaml::from_str::<PeerAuthenticationSpec>(s) {
        let _ = spec.validate();
    }
});
