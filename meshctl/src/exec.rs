//! `meshctl exec <namespace>/<name> -- CMD...`: runs a command inside a workload's network
//! namespace *and* cgroup, the two facts that make a process part of a meshed workload, so
//! that what it connects to goes through the mesh. (`ip netns exec` enters only the netns: a
//! process there is not in the workload's cgroup, and its connections are not captured.)

use std::ffi::OsString;
use std::fs::File;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;

use anyhow::{bail, Context, Result};
use mesh_api::admin::{paths, WorkloadInfo};

pub fn exec(admin: SocketAddr, workload: &str, cmd: &[OsString]) -> Result<std::convert::Infallible> {
    let Some((namespace, name)) = workload.split_once('/') else {
        bail!("{workload:?}: name the workload as <namespace>/<name> (see `meshctl workloads`)");
    };
    let Some(program) = cmd.first() else {
        bail!("no command: `meshctl exec {workload} -- CMD [ARGS...]`");
    };
    let all: Vec<WorkloadInfo> = crate::client::get(admin, paths::WORKLOADS).with_context(|| {
        format!("asking the agent at {admin} for its workloads (is mesh-agent running on this node?)")
    })?;
    let Some(w) = all.iter().find(|w| w.namespace == namespace && w.name == name) else {
        let names: Vec<String> = all.iter().map(|w| format!("{}/{}", w.namespace, w.name)).collect();
        bail!("{workload} is not captured by this node's agent; it captures: {}", names.join(", "));
    };
    let netns = File::open(&w.netns).with_context(|| format!("opening the workload's netns {}", w.netns.display()))?;
    let procs = std::fs::OpenOptions::new()
        .write(true)
        .open(w.cgroup.join("cgroup.procs"))
        .with_context(|| format!("opening the workload's cgroup {} (run meshctl as root)", w.cgroup.display()))?;
    let mut c = std::process::Command::new(program);
    c.args(&cmd[1..]);
    // SAFETY: only async-signal-safe calls (setns, write) between fork and exec.
    unsafe {
        c.pre_exec(move || {
            if libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let e = c.exec();
    bail!("running {program:?} in {workload}: {e}")
}
