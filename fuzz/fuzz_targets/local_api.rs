//! One line of the agent's local API (JSON), as the agent parses it before acting.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|line: &str| {
    if let Ok(mesh_model::local_api::Request::AddWorkload { workload }) = mesh_model::local_api::Request::parse(line) {
        let _ = workload.validate("n1");
        let _ = workload.key();
    }
});
