//! The test harness: a topology on the real kernel — network namespaces as nodes and pods, a
//! cgroup per pod, the real controller and agents — and the tools to drive and observe it.
//! Everything is named after a per-topology id so that tests run in parallel, and everything is
//! deleted on drop (also when the test fails).
//!
//! - [`topology`]: namespaces, veths, cgroups, the workload and config files; builders for the
//!   topologies the tests share ([`Topology::two_node_mesh`], [`Topology::one_node_mesh`]).
//! - [`process`]: the real binaries (controller, agents, the test app) started in a netns and a
//!   cgroup, their logs, the agent's local API.
//! - [`capture`]: packet captures (tcpdump) and what they saw.
//! - [`http`]: HTTP requests from inside a netns (metrics, readiness).
//! - [`metrics`]: reading Prometheus text.
//! - [`kernel`]: what the kernel shows (pinned links, attached programs, listening sockets).
//! - [`peer`]: a hand-driven HBONE client's certificate and TLS configuration.

use std::sync::atomic::AtomicU32;

pub mod bench;
pub mod capture;
pub mod http;
pub mod kernel;
pub mod metrics;
pub mod peer;
pub mod process;
pub mod topology;
pub mod zones;

/// The agent's programs on each node's cgroup root.
pub const CGROUP_PROGRAMS: [&str; 9] = [
    "sm_connect4",
    "sm_connect6",
    "sm_sock_ops",
    "sm_sock_release",
    "sm_getpeername4",
    "sm_getpeername6",
    "sm_getsockname4",
    "sm_getsockname6",
    "sm_skb_ingress",
];

pub use capture::Capture;
pub use http::http_get;
pub use kernel::{
    cgroup2_mount, cgroup_programs, is_bpffs, listening_ports, pinned_link_ids, workload_entries, PinnedMap,
};
pub use metrics::{metric, scrape};
pub use process::{
    bin, command_in, run, time_until, wait_for, Agent, BackgroundApp, Controller, Server, CONTROLLER_IP,
    CONTROLLER_PORT,
};
pub use topology::{Mesh, Node, NodeId, Pod, PodId, Running, Stack, Topology, PREFIX};

/// Makes names unique within this test process.
pub(crate) static COUNTER: AtomicU32 = AtomicU32::new(0);
