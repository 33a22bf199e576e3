//! The workloads file (`kind: Workload` documents) the agent and the controller read.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|s: &str| {
    let _ = mesh_model::workload::parse_str(std::path::Path::new("fuzz.yaml"), s);
});
