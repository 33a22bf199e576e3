//! A configuration push message (protobuf) as the agent receives it from the controller, and
//! each resource's JSON decoded and checked as the agent's state does before applying it.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mesh_api::push::{ConfigUpdate, Kind};
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(update) = ConfigUpdate::decode(data) else { return };
    for r in update.upserts {
        let Ok((id, json)) = r.into_parts() else { continue };
        match id.kind {
            Kind::AuthorizationPolicy => {
                if let Ok(spec) = serde_json::from_str(&json) {
                    let _ = mesh_model::authz::Compiled::compile(&id.namespace, &id.name, &spec);
                }
            }
            Kind::PeerAuthentication => {
                if let Ok(spec) = serde_json::from_str::<mesh_model::policy::PeerAuthenticationSpec>(&json) {
                    let _ = spec.validate();
                }
            }
            Kind::Workload => {
                let _ = serde_json::from_str::<mesh_model::Workload>(&json);
            }
            Kind::Mesh => {
                if let Ok(m) = serde_json::from_str::<mesh_model::MeshRecord>(&json) {
                    let _ = mesh_identity::verify::TrustBundle::from_pems(&m.trust_domain, &m.roots);
                }
            }
            Kind::Service => {
                if let Ok(s) = serde_json::from_str::<mesh_model::Service>(&json) {
                    let _ = s.validate();
                    let _ = s.host();
                }
            }
            Kind::Rejected => {
                let _ = serde_json::from_str::<String>(&json);
            }
            Kind::Unspecified => {}
        }
    }
});
