//! The interfaces between sockmesh's components, defined once for both ends:
//!
//! - [`push`]: the configuration push from the controller to the agents (gRPC, generated from
//!   `proto/config.proto`), with the resource kinds as an enum on both sides.
//! - [`admin`]: what the agent's admin API answers (JSON), which `meshctl` reads with the same
//!   types, so the CLI cannot drift from the API.
//! - `cli` (feature `cli`, for tests): the conventions every binary's command line keeps.
//! - [`host`]: facts about the host's mounts that the agent and `meshctl check` both need.
//! - `kernel` (feature `kernel`): the kernel features the datapath needs, each probed.

pub mod admin;
#[cfg(feature = "cli")]
pub mod cli;
pub mod host;
#[cfg(feature = "kernel")]
pub mod kernel;
#[cfg(feature = "push")]
pub mod push;
