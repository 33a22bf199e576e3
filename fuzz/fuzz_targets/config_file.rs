//! One file of the controller's configuration directory (multi-document YAML of workloads,
//! Services, Meshes, Namespaces and policies), parsed and checked as the controller does.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|s: &str| {
    let _ = mesh_model::config_file::parse_file(std::path::Path::new("fuzz.yaml"), s);
});
