//! The records the control plane and the agents agree on: workloads (who runs where, with
//! which identity and addresses), Services (virtual addresses in front of endpoints) and
//! policies. One model, whatever source it is read from.

pub mod authz;
pub mod config_file;
pub mod hbone;
pub mod labels;
pub mod local_api;
pub mod mesh;
pub mod policy;
pub mod service;
pub mod workload;

pub use authz::Cidr;
pub use labels::Labels;
pub use mesh::{Mesh, MeshRecord, MeshSpec};
pub use service::{Endpoint, Service, ServicePort};
pub use workload::{Workload, WorkloadError, WorkloadKey};
