//! The records the control plane and the agents agree on: workloads (who runs where, with
//! which identity and addresses). One model, whatever source it is read from.

pub mod authz;
pub mod policy;
pub mod workload;

pub use authz::Cidr;
pub use workload::{Workload, WorkloadError, WorkloadKey};
