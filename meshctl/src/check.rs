//! `meshctl check`: diagnoses a node — kernel, cgroup v2, bpffs, the agent, its programs, its
//! certificates, the controller — each with a hint when it fails.

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use mesh_api::admin::{paths, CertInfo, ConfigDump, Meshes, Status};
use serde::Serialize;

use crate::client::get;

#[derive(Serialize)]
struct Check {
    name: &'static str,
    ok: bool,
    detail: String,
    hint: String,
}

#[derive(Serialize)]
struct Report {
    ok: bool,
    checks: Vec<Check>,
}

pub fn check(admin: SocketAddr, bpffs: &Path, json: bool) -> ExitCode {
    let mut out = Vec::new();
    let mut add = |name, ok, detail: String, hint: &str| {
        out.push(Check { name, ok, detail, hint: if ok { String::new() } else { hint.to_owned() } })
    };

    // Each feature probed, not the version compared: distribution kernels backport them.
    let release = mesh_api::kernel::release();
    let btf = Path::new("/sys/kernel/btf/vmlinux").exists();
    let probe_cgroup = mesh_api::host::cgroup2_mount().unwrap_or_else(|| "/sys/fs/cgroup".into());
    let checked = mesh_api::kernel::check(&probe_cgroup);
    let missing = checked.as_ref().map(Vec::as_slice).unwrap_or_default();
    let needs: Vec<String> =
        missing.iter().map(|m| format!("{} (Linux {}): {}", m.feature.name, m.feature.since, m.error)).collect();
    add(
        "kernel",
        checked.as_ref().is_ok_and(|m| m.is_empty()),
        if let Err(e) = &checked {
            format!("Linux {release}: {e}")
        } else if missing.is_empty() {
            format!(
                "Linux {release}: all {} datapath features present (BTF {})",
                mesh_api::kernel::FEATURES.len(),
                if btf { "present" } else { "absent" }
            )
        } else {
            format!("Linux {release} lacks {}", needs.join("; "))
        },
        &format!(
            "the agent will not start on this kernel; run mainline Linux {} or newer, or a distribution kernel that backports these features (docs/kernels.md lists the kernels tested)",
            mesh_api::kernel::MINIMUM
        ),
    );

    // Under `ip netns exec` the host's cgroup v2 and bpffs mounts are hidden, not missing:
    // advising to mount them would be wrong, so the hint says how to run meshctl instead.
    let remounted = mesh_api::host::sys_remounted();
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let cg2 = mesh_api::host::cgroup2_mount_in(&mountinfo);
    add(
        "cgroup v2",
        cg2.is_some(),
        cg2.as_ref().map(|p| format!("mounted at {}", p.display())).unwrap_or_else(|| "not mounted".into()),
        if remounted {
            mesh_api::host::USE_NSENTER
        } else {
            "no cgroup v2 hierarchy is mounted anywhere: mount one on an empty directory (e.g. `mount -t cgroup2 none /sys/fs/cgroup/unified` on a hybrid host)"
        },
    );

    let bpf_ok = is_bpffs(bpffs);
    let other = mesh_api::host::mounted_at(&mountinfo, bpffs);
    let hint = match (&other, remounted) {
        (_, true) => mesh_api::host::USE_NSENTER.to_owned(),
        (Some(t), false) => format!(
            "{} holds a {t} mount, not bpffs: pass --bpffs with the directory where bpffs is mounted (see `findmnt -t bpf`)",
            bpffs.display()
        ),
        (None, false) => {
            format!("mount it: `mount -t bpf bpf {}`; without it the agent cannot pin its programs", bpffs.display())
        }
    };
    add(
        "bpffs",
        bpf_ok,
        if bpf_ok {
            format!("mounted at {}", bpffs.display())
        } else {
            format!("{} is not a bpffs mount", bpffs.display())
        },
        &hint,
    );

    // What a Kubernetes node's agent needs of the host's mounts (the same check as `mesh-agent
    // preflight --kubelet-pods`): the cgroup v2 mount is its hierarchy's root, bpffs is bpffs.
    if let Some(cg) = &cg2 {
        let problems = mesh_api::host::node_mount_problems(&mountinfo, cg, bpffs);
        add(
            "node mounts",
            problems.is_empty(),
            if problems.is_empty() {
                format!("{} is the cgroup v2 root, {} is on bpffs", cg.display(), bpffs.display())
            } else {
                problems.join("; ")
            },
            "fix the mounts named; in a container, mount the host's (hostPath) as deploy/agent.yaml does",
        );
    }

    let status: anyhow::Result<Status> = get(admin, paths::STATUS);
    let certs: anyhow::Result<Vec<CertInfo>> = get(admin, paths::CERTIFICATES);
    let config: anyhow::Result<ConfigDump> = get(admin, paths::CONFIG_DUMP);
    let not_answering = "unknown: the agent is not answering";
    match &status {
        Ok(s) => add("agent", true, format!("answering on {admin} (node {})", s.node), ""),
        Err(e) => add(
            "agent",
            false,
            format!("no answer on {admin}: {e}"),
            "start mesh-agent on this node; run meshctl in the agent's network namespace (`nsenter --net=/run/netns/NODE meshctl ...`, not `ip netns exec`), or pass --admin",
        ),
    }
    match &status {
        Ok(s) => {
            let detached: Vec<&str> = s.links.iter().filter(|l| !l.attached).map(|l| l.name.as_str()).collect();
            let ok = !s.links.is_empty() && detached.is_empty();
            let detail = if ok {
                format!("{} attached", s.links.iter().map(|l| l.name.as_str()).collect::<Vec<_>>().join(", "))
            } else {
                format!("not attached: {}", detached.join(", "))
            };
            add(
                "programs",
                ok,
                detail,
                "restart the agent: it re-attaches missing programs and takes over pinned ones",
            );
        }
        Err(_) => add("programs", false, not_answering.into(), "start the agent first"),
    }
    match &certs {
        Ok(all) => {
            let bad: Vec<&str> = all.iter().filter(|c| !c.ready).map(|c| c.identity.as_str()).collect();
            let detail = if bad.is_empty() {
                format!("{} identities with valid certificates", all.len())
            } else {
                format!("no valid certificate: {}", bad.join(", "))
            };
            add("certificates", bad.is_empty(), detail, "check that the controller is reachable and places these workloads on this node (see the agent's log: 'certificate request failed')");
        }
        Err(_) => add("certificates", false, not_answering.into(), "start the agent first"),
    }
    let meshes: anyhow::Result<Meshes> = get(admin, paths::MESHES);
    match &meshes {
        Ok(m) => add(
            "meshes",
            m.problems.is_empty(),
            if m.problems.is_empty() {
                let names: Vec<&str> = m.meshes.iter().map(|m| m.name.as_str()).collect();
                names.join(", ")
            } else {
                m.problems.join("; ")
            },
            "label the namespace with an existing mesh's name (`meshctl meshes` lists them) or create the Mesh; its workloads get no certificate until then",
        ),
        Err(_) => add("meshes", false, not_answering.into(), "start the agent first"),
    }
    match &config {
        Ok(d) => {
            // One URL per controller replica (a single string from agents before replicas).
            let urls: Vec<String> = match &d.config["controller"] {
                serde_json::Value::String(s) => vec![s.clone()],
                serde_json::Value::Array(a) => a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect(),
                _ => Vec::new(),
            };
            let reaches = |url: &str| {
                let hostport = url.trim_start_matches("https://").trim_end_matches('/').to_owned();
                hostport
                    .to_socket_addrs()
                    .ok()
                    .and_then(|mut a| a.next())
                    .map(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok())
                    .unwrap_or(false)
            };
            let seen: Vec<(String, bool)> = urls.iter().map(|u| (u.clone(), reaches(u))).collect();
            // The agent uses any replica that answers.
            let reachable = seen.iter().any(|(_, r)| *r);
            let detail = seen
                .iter()
                .map(|(u, r)| format!("{u} {}", if *r { "reachable" } else { "unreachable" }))
                .collect::<Vec<_>>()
                .join(", ");
            add("controller", reachable, detail, "start mesh-controller or fix the agent's --controller; existing certificates keep working until they expire");
        }
        Err(_) => add("controller", false, not_answering.into(), "start the agent first"),
    }

    let report = Report { ok: out.iter().all(|c| c.ok), checks: out };
    if json {
        println!("{}", serde_json::to_string_pretty(&report).expect("serialisable"));
    } else {
        for c in &report.checks {
            println!("{} {:<13} {}", if c.ok { "✓" } else { "✗" }, c.name, c.detail);
            if !c.ok {
                println!("  hint: {}", c.hint);
            }
        }
    }
    if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn is_bpffs(p: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) else { return false };
    // SAFETY: statfs is plain old data.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid path and out-pointer.
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == 0xcafe4a11 }
}
