//! Kubernetes pods found by UID: the controller pushes each node its pods (name, identity, UID,
//! QoS class, addresses) and the agent ties each to its kernel objects by itself.
//!
//! - The cgroup: the pod-level directory the kubelet makes under its `kubepods` tree, in either
//!   cgroup driver's naming — systemd `kubepods.slice/kubepods-<qos>.slice/
//!   kubepods-<qos>-pod<uid with '_' for '-'>.slice`, cgroupfs `kubepods/<qos>/pod<uid>`; a
//!   Guaranteed pod has no QoS level — below any nested root (kind's `kubelet.slice/
//!   kubelet-kubepods.slice/...`). Exactly one directory may match.
//! - The netns: that of the processes in the pod's cgroup (the sandbox and its containers,
//!   read through the host's /proc). All of them must share one netns, which must be neither
//!   the host's (PID 1's) nor the agent's own; whether it holds one of the pod's addresses is
//!   checked where the agent enters it (registration).
//!
//! Only the facts the kernel gives (directory names the kubelet made, cgroup membership,
//! namespace inodes) are used; an address never selects a pod.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// How deep below the cgroup root the kubelet's `kubepods` tree may start (kind nests it two
/// levels down) plus the QoS level and the pod level.
const MAX_DEPTH: usize = 6;

/// Processes looked at per pod: a pod's cgroup holds its sandbox and containers' processes.
const MAX_PROCS: usize = 4096;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PodError {
    #[error("pod {uid}: no cgroup of it under {root} yet (looked for {systemd} and pod{uid} below a kubepods tree); the kubelet makes it when it starts the pod")]
    NoCgroup { uid: String, root: PathBuf, systemd: String },
    #[error("pod {uid}: {} cgroups match its UID ({}); exactly one must (is a second kubelet tree or a stale copy under the cgroup root?)", found.len(), list(found))]
    Ambiguous { uid: String, found: Vec<PathBuf> },
    #[error("pod {uid}: its cgroup {cgroup} is where a {found} pod's would be, but the pod's QoS class is {qos}")]
    QosMismatch { uid: String, cgroup: PathBuf, qos: String, found: String },
    #[error("pod {uid}: no process in its cgroup {cgroup} yet; its netns is found from its sandbox's process")]
    NoProcess { uid: String, cgroup: PathBuf },
    #[error("pod {uid}: process {pid} in its cgroup is in the host's network namespace; a meshed pod must have its own (hostNetwork pods are not meshed)")]
    HostNetns { uid: String, pid: u32 },
    #[error("pod {uid}: process {pid} in its cgroup is in the agent's own network namespace; refused")]
    AgentNetns { uid: String, pid: u32 },
    #[error("pod {uid}: processes in its cgroup are in different network namespaces (pid {pid} in net:[{ino}], pid {other_pid} in net:[{other_ino}]); a foreign process in a pod is refused")]
    ForeignNetns { uid: String, pid: u32, ino: u64, other_pid: u32, other_ino: u64 },
    #[error("pod {uid}: the netns of its processes ({}) holds none of its addresses ({}); refused", netns.display(), want.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", "))]
    NetnsWithoutAddress { uid: String, netns: PathBuf, want: Vec<std::net::IpAddr> },
    #[error("reading {path}: {reason}")]
    Read { path: PathBuf, reason: String },
}

fn list(v: &[PathBuf]) -> String {
    v.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
}

/// A pod's QoS level in the kubelet's tree: none for Guaranteed.
fn qos_level(qos: &str) -> Option<&'static str> {
    match qos {
        "Burstable" => Some("burstable"),
        "BestEffort" => Some("besteffort"),
        _ => None,
    }
}

/// The systemd driver's name part for a pod: `pod<uid with '_' for '-'>.slice`.
fn systemd_suffix(uid: &str) -> String {
    format!("-pod{}.slice", uid.replace('-', "_"))
}

/// The UID of the pod whose pod-level cgroup a directory name is, in either driver's naming.
pub fn pod_uid_of_dir(name: &str) -> Option<String> {
    let uid = if let Some(rest) = name.strip_suffix(".slice") {
        // systemd: "<prefix>kubepods[-<qos>]-pod<uid_>.slice"
        let (prefix, uid) = rest.rsplit_once("-pod")?;
        // systemd escapes the UID's '-' as '_' (a '-' would start a new slice level).
        if !prefix.contains("kubepods") || uid.contains('-') {
            return None;
        }
        uid.replace('_', "-")
    } else {
        name.strip_prefix("pod")?.to_owned()
    };
    mesh_model::workload::is_pod_uid(&uid).then_some(uid)
}

/// The QoS class a pod-level cgroup's place says: its parent is the QoS level (or, for
/// Guaranteed, the kubepods root itself).
fn qos_of_parent(parent: &str) -> &'static str {
    let p = parent.trim_end_matches(".slice");
    if p == "burstable" || p.ends_with("-burstable") {
        "Burstable"
    } else if p == "besteffort" || p.ends_with("-besteffort") {
        "BestEffort"
    } else {
        "Guaranteed"
    }
}

/// Whether a process's `/proc/<pid>/cgroup` puts it in pod directory `pod_dir` (its path, as
/// components) or below it. The path a process shows is relative to the reader's cgroup
/// namespace (`/../../<from the common ancestor down>`, or from the hierarchy's root): its
/// components after the last `..`, down to the pod's directory, must be the last components of
/// `pod_dir`. They start at a child of that common ancestor, which only root can name: a
/// directory named like the pod elsewhere (a user's delegated cgroup) does not pass.
fn in_pod_dir(proc_cgroup: &str, uid: &str, pod_dir: &[String]) -> bool {
    let mut lines: Vec<&str> = proc_cgroup.lines().collect();
    lines.sort_by_key(|l| !l.starts_with("0::"));
    lines.iter().any(|l| {
        let Some(path) = l.splitn(3, ':').nth(2) else { return false };
        let comps: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
        let Some(at) = comps.iter().position(|c| pod_uid_of_dir(c).as_deref() == Some(uid)) else { return false };
        let from = comps[..at].iter().rposition(|c| *c == "..").map_or(0, |i| i + 1);
        let tail = &comps[from..=at];
        tail.len() <= pod_dir.len() && pod_dir[pod_dir.len() - tail.len()..].iter().zip(tail).all(|(a, b)| a == b)
    })
}

/// Where the agent looks: the host's cgroup v2 tree (the agent's `--cgroup-root`) and the host's
/// /proc.
#[derive(Debug, Clone)]
pub struct Kubelet {
    pub cgroup_root: PathBuf,
    pub proc_root: PathBuf,
    /// The host's netns (its PID 1's, unless told otherwise).
    pub host_netns: PathBuf,
}

impl Kubelet {
    /// The directories pod-level cgroups are made in: each `kubepods` root (either driver's
    /// naming, under nested roots) and its QoS levels. Watched, so that a pod's cgroup is seen
    /// the moment the kubelet makes it, and the only places a pod's cgroup is looked for.
    pub fn pod_parents(&self) -> Result<Vec<PathBuf>, PodError> {
        let mut out = Vec::new();
        let mut stack = vec![(self.cgroup_root.clone(), 0usize, false)];
        while let Some((dir, depth, in_kubepods)) = stack.pop() {
            for (path, name) in subdirs(&dir, dir == self.cgroup_root)? {
                if pod_uid_of_dir(&name).is_some() || depth + 1 >= MAX_DEPTH {
                    continue;
                }
                let root = name == "kubepods" || (name.starts_with("kube") && name.ends_with("kubepods.slice"));
                let qos = in_kubepods && qos_of_parent(&name) != "Guaranteed";
                if root || qos {
                    out.push(path.clone());
                }
                // Nested roots in the first levels, and the kubelet's own trees.
                if root || (!in_kubepods && (depth < 2 || name.contains("kube"))) {
                    stack.push((path, depth + 1, in_kubepods || root));
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// The pod-level cgroup directory of pod `uid`: exactly one directory, in one of
    /// [`Kubelet::pod_parents`], named as either driver names it, at the place its QoS class
    /// (when known) puts it.
    pub fn find_cgroup(&self, uid: &str, qos: Option<&str>) -> Result<PathBuf, PodError> {
        let mut found: Vec<PathBuf> = self.pod_dirs()?.into_iter().filter(|(_, u)| u == uid).map(|(p, _)| p).collect();
        found.sort();
        let cgroup = match found.len() {
            0 => {
                return Err(PodError::NoCgroup {
                    uid: uid.into(),
                    root: self.cgroup_root.clone(),
                    systemd: format!("kubepods-*{}", systemd_suffix(uid)),
                })
            }
            1 => found.pop().expect("one"),
            _ => return Err(PodError::Ambiguous { uid: uid.into(), found }),
        };
        if let Some(qos) = qos {
            let parent = cgroup.parent().and_then(|p| p.file_name()).and_then(|n| n.to_str()).unwrap_or("");
            let at = qos_of_parent(parent);
            let expected = if qos_level(qos).is_some() { qos } else { "Guaranteed" };
            if at != expected {
                return Err(PodError::QosMismatch { uid: uid.into(), cgroup, qos: qos.into(), found: at.into() });
            }
        }
        Ok(cgroup)
    }

    /// Every pod-level cgroup directory in [`Kubelet::pod_parents`], with the UID it names.
    fn pod_dirs(&self) -> Result<Vec<(PathBuf, String)>, PodError> {
        let mut out = Vec::new();
        for parent in self.pod_parents()? {
            let pods = subdirs(&parent, false)?;
            out.extend(pods.into_iter().filter_map(|(p, n)| Some((p, pod_uid_of_dir(&n)?))));
        }
        Ok(out)
    }

    /// The netns of the processes in a pod's cgroup (and the cgroups below it): the path of one
    /// of them (`<proc>/<pid>/ns/net`) and its inode.
    ///
    /// `cgroup.procs` lists only processes of the reader's PID namespace: an agent in a
    /// container of its own (no `hostPID`) reads nothing there. So when the cgroup is populated
    /// but lists no process, the host's /proc is searched for the processes whose cgroup is the
    /// pod's.
    pub fn find_netns(&self, uid: &str, cgroup: &Path) -> Result<(PathBuf, u64), PodError> {
        let pod_dir = components(cgroup);
        let mut pids = procs_below(cgroup)?;
        if pids.is_empty() && populated(cgroup) {
            pids = self.procs_of_pod(uid, &pod_dir);
        }
        if pids.is_empty() {
            return Err(PodError::NoProcess { uid: uid.into(), cgroup: cgroup.to_owned() });
        }
        let ino_of = |pid: &str| std::fs::metadata(self.proc_root.join(pid).join("ns/net")).map(|m| m.ino());
        let host = std::fs::metadata(&self.host_netns).map(|m| m.ino()).map_err(|e| PodError::Read {
            path: self.host_netns.clone(),
            reason: format!(
                "{e} (the agent needs the host's /proc, and CAP_SYS_PTRACE to read other processes' namespaces)"
            ),
        })?;
        let own = std::fs::metadata("/proc/self/ns/net").map(|m| m.ino()).ok();
        let mut chosen: Option<(u32, u64)> = None;
        for pid in pids {
            // A process that has exited or left the pod since the list was read is not the pod's.
            let in_pod = std::fs::read_to_string(self.proc_root.join(pid.to_string()).join("cgroup"))
                .is_ok_and(|t| in_pod_dir(&t, uid, &pod_dir));
            if !in_pod {
                continue;
            }
            let Ok(ino) = ino_of(&pid.to_string()) else { continue };
            if ino == host {
                return Err(PodError::HostNetns { uid: uid.into(), pid });
            }
            if Some(ino) == own {
                return Err(PodError::AgentNetns { uid: uid.into(), pid });
            }
            match chosen {
                None => chosen = Some((pid, ino)),
                Some((p, i)) if i != ino => {
                    return Err(PodError::ForeignNetns {
                        uid: uid.into(),
                        pid: p,
                        ino: i,
                        other_pid: pid,
                        other_ino: ino,
                    })
                }
                Some(_) => {}
            }
        }
        let (pid, ino) = chosen.ok_or_else(|| PodError::NoProcess { uid: uid.into(), cgroup: cgroup.to_owned() })?;
        Ok((self.proc_root.join(pid.to_string()).join("ns/net"), ino))
    }
}

impl Kubelet {
    /// The host's processes whose cgroup is pod `uid`'s (or below it), from each one's
    /// `/proc/<pid>/cgroup` (at most [`MAX_PROCS`]).
    fn procs_of_pod(&self, uid: &str, pod_dir: &[String]) -> Vec<u32> {
        let Ok(rd) = std::fs::read_dir(&self.proc_root) else { return Vec::new() };
        rd.flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                std::fs::read_to_string(self.proc_root.join(pid.to_string()).join("cgroup"))
                    .is_ok_and(|t| in_pod_dir(&t, uid, pod_dir))
            })
            .take(MAX_PROCS)
            .collect()
    }
}

/// The subdirectories of `dir`, with their names. A directory removed meanwhile has none
/// (unless it is `must_exist`); any other failure to read one is an error, never "no such pod"
/// (which would lift a refusal).
fn subdirs(dir: &Path, must_exist: bool) -> Result<Vec<(PathBuf, String)>, PodError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !must_exist => return Ok(Vec::new()),
        Err(e) => return Err(PodError::Read { path: dir.to_owned(), reason: e.to_string() }),
    };
    Ok(entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| Some((e.path(), e.file_name().into_string().ok()?)))
        .collect())
}

/// A path's components (the root left out).
fn components(p: &Path) -> Vec<String> {
    p.iter().filter_map(|c| c.to_str()).filter(|c| *c != "/").map(str::to_owned).collect()
}

/// Whether a cgroup or one below it holds a process (`cgroup.events`), whatever PID namespace
/// the reader is in.
fn populated(cgroup: &Path) -> bool {
    std::fs::read_to_string(cgroup.join("cgroup.events")).is_ok_and(|t| t.lines().any(|l| l == "populated 1"))
}

/// The processes of a cgroup and of every cgroup below it (at most [`MAX_PROCS`]), as the
/// reader's PID namespace numbers them (a process outside it is left out).
fn procs_below(cgroup: &Path) -> Result<Vec<u32>, PodError> {
    let mut pids = Vec::new();
    let mut stack = vec![cgroup.to_owned()];
    while let Some(dir) = stack.pop() {
        let procs = dir.join("cgroup.procs");
        match std::fs::read_to_string(&procs) {
            Ok(text) => pids.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()).filter(|p| *p > 0)),
            // The directory went away meanwhile (a container stopped): nothing in it.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && dir != cgroup => continue,
            Err(e) => return Err(PodError::Read { path: procs, reason: e.to_string() }),
        }
        if pids.len() >= MAX_PROCS {
            pids.truncate(MAX_PROCS);
            break;
        }
        if let Ok(entries) = std::fs::read_dir(&dir) {
            stack.extend(entries.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.path()));
        }
    }
    Ok(pids)
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "8a3c5e6f-1b2d-4c7e-9f00-aabbccddeeff";
    const OTHER: &str = "11111111-2222-4333-8444-555555555555";

    /// A fixture tree: directories only, each with an empty cgroup.procs, as the kubelet and
    /// the runtime would leave them.
    fn tree(dirs: &[&str]) -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        for d in dirs {
            let p = t.path().join(d);
            std::fs::create_dir_all(&p).unwrap();
            std::fs::write(p.join("cgroup.procs"), "").unwrap();
        }
        t
    }

    fn kubelet(t: &tempfile::TempDir) -> Kubelet {
        Kubelet { cgroup_root: t.path().to_owned(), proc_root: "/proc".into(), host_netns: "/proc/self/ns/net".into() }
    }

    fn sd(uid: &str) -> String {
        uid.replace('-', "_")
    }

    #[test]
    fn both_drivers_and_all_three_qos_classes_are_found() {
        let u = sd(UID);
        let cases = [
            (format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice"), "Burstable"),
            (format!("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice"), "BestEffort"),
            (format!("kubepods.slice/kubepods-pod{u}.slice"), "Guaranteed"),
            (format!("kubepods/burstable/pod{UID}"), "Burstable"),
            (format!("kubepods/besteffort/pod{UID}"), "BestEffort"),
            (format!("kubepods/pod{UID}"), "Guaranteed"),
        ];
        for (path, qos) in cases {
            // Beside other pods, the QoS levels and the system's own cgroups.
            let t = tree(&[
                &path,
                &format!("{path}/cri-containerd-0123abcd.scope"),
                "system.slice/containerd.service",
                "kubepods.slice/kubepods-burstable.slice",
                &format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice", sd(OTHER)),
                &format!("kubepods/besteffort/pod{OTHER}"),
            ]);
            let k = kubelet(&t);
            assert_eq!(k.find_cgroup(UID, Some(qos)).unwrap(), t.path().join(&path), "{path}");
            assert_eq!(k.find_cgroup(UID, None).unwrap(), t.path().join(&path), "{path}, QoS unknown");
            let wrong = if qos == "Guaranteed" { "Burstable" } else { "Guaranteed" };
            let e = k.find_cgroup(UID, Some(wrong)).unwrap_err();
            assert!(matches!(e, PodError::QosMismatch { .. }), "{path}: {e}");
        }
    }

    #[test]
    fn nested_roots_and_runtime_scopes_are_found() {
        let u = sd(UID);
        // kind (systemd driver under --cgroup-root=/kubelet), and a cgroupfs tree nested in a
        // container's cgroup.
        for path in [
            format!("kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{u}.slice"),
            format!("docker/0123abcd/kubepods/burstable/pod{UID}"),
        ] {
            let t = tree(&[&path, &format!("{path}/crio-0123abcd.scope"), &format!("{path}/docker-77.scope")]);
            assert_eq!(kubelet(&t).find_cgroup(UID, None).unwrap(), t.path().join(&path));
        }
    }

    #[test]
    fn the_directories_pods_appear_in_are_the_kubepods_roots_and_their_qos_levels() {
        let t = tree(&[
            &format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/x.scope", sd(UID)),
            "kubepods.slice/kubepods-besteffort.slice",
            "kubelet/kubepods/burstable",
            "kubelet/kubepods/besteffort",
            "system.slice/containerd.service",
        ]);
        let got: Vec<String> = kubelet(&t)
            .pod_parents()
            .unwrap()
            .iter()
            .map(|p| p.strip_prefix(t.path()).unwrap().display().to_string())
            .collect();
        assert_eq!(
            got,
            [
                "kubelet/kubepods",
                "kubelet/kubepods/besteffort",
                "kubelet/kubepods/burstable",
                "kubepods.slice",
                "kubepods.slice/kubepods-besteffort.slice",
                "kubepods.slice/kubepods-burstable.slice",
            ]
        );
    }

    #[test]
    fn missing_and_ambiguous_matches_are_errors_that_say_so() {
        let t = tree(&[&format!("kubepods/burstable/pod{OTHER}"), "system.slice"]);
        let e = kubelet(&t).find_cgroup(UID, None).unwrap_err();
        assert!(matches!(e, PodError::NoCgroup { .. }));
        assert!(e.to_string().contains(&format!("pod{UID}")) && e.to_string().contains(&sd(UID)), "{e}");
        let t = tree(&[
            &format!("kubepods/burstable/pod{UID}"),
            &format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice", sd(UID)),
        ]);
        let e = kubelet(&t).find_cgroup(UID, None).unwrap_err();
        assert!(matches!(&e, PodError::Ambiguous { found, .. } if found.len() == 2), "{e}");
        assert!(e.to_string().contains("exactly one"), "{e}");
        // A directory named like a pod outside any kubepods tree is not one.
        let t = tree(&[&format!("system.slice/pod{UID}")]);
        assert!(matches!(kubelet(&t).find_cgroup(UID, None), Err(PodError::NoCgroup { .. })));
    }

    #[test]
    fn names_that_are_not_pod_cgroups_are_not_taken_for_them() {
        assert_eq!(pod_uid_of_dir(&format!("pod{UID}")).as_deref(), Some(UID));
        assert_eq!(pod_uid_of_dir(&format!("kubepods-besteffort-pod{}.slice", sd(UID))).as_deref(), Some(UID));
        for bad in [
            "pod".to_owned(),
            "podman".to_owned(),
            format!("pod{}", UID.to_uppercase()),
            format!("system-pod{}.slice", sd(UID)),
            format!("kubepods-pod{UID}.slice"),
            "kubepods-burstable.slice".to_owned(),
            format!("pod{UID}/.."),
        ] {
            assert_eq!(pod_uid_of_dir(&bad), None, "{bad}");
        }
    }

    /// `/proc/<pid>/cgroup` as read on real nodes: cgroup v2 with either driver and runtime,
    /// a hybrid host's v1 lines, and paths seen from inside a cgroup namespace; and a user's
    /// delegated cgroup named like the pod, which is not the pod's.
    #[test]
    fn proc_cgroup_forms_seen_on_real_nodes() {
        let u = sd(UID);
        let dir = |p: &str| p.split('/').map(str::to_owned).collect::<Vec<_>>();
        let systemd = dir(&format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice"));
        let cgroupfs = dir(&format!("kubepods/besteffort/pod{UID}"));
        let kind = dir(&format!("kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/kubelet-kubepods-burstable-pod{u}.slice"));
        let forms = [
            (format!("0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/cri-containerd-6f1e2d.scope\n"), &systemd),
            (format!("0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/crio-6f1e2d.scope\n"), &systemd),
            (format!("0::/kubepods/besteffort/pod{UID}/6f1e2d3c4b5a\n"), &cgroupfs),
            (format!("0::/../../besteffort/pod{UID}/docker-6f1e.scope\n"), &cgroupfs),
            (format!("12:memory:/kubepods/besteffort/pod{UID}/6f1e\n1:name=systemd:/kubepods/besteffort/pod{UID}/6f1e\n0::/\n"), &cgroupfs),
            (format!("0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/kubelet-kubepods-burstable-pod{u}.slice/cri-containerd-1.scope\n"), &kind),
        ];
        for (f, d) in &forms {
            assert!(in_pod_dir(f, UID, d), "{f}");
            assert!(!in_pod_dir(f, OTHER, d), "{f}");
        }
        for f in [
            "0::/system.slice/containerd.service\n".to_owned(),
            "0::/\n".to_owned(),
            "".to_owned(),
            format!("0::/user.slice/user-1000.slice/user@1000.service/pod{UID}/x\n"),
            format!("0::/user.slice/user@1000.service/kubepods/besteffort/pod{UID}/x\n"),
            format!("0::/../../user@1000.service/kubepods-besteffort-pod{u}.slice/x\n"),
        ] {
            assert!(!in_pod_dir(&f, UID, &cgroupfs) && !in_pod_dir(&f, UID, &systemd), "{f}");
        }
    }

    #[test]
    fn a_pod_without_a_process_has_no_netns_yet() {
        let path = format!("kubepods/burstable/pod{UID}");
        let t = tree(&[&path, &format!("{path}/ctr")]);
        let e = kubelet(&t).find_netns(UID, &t.path().join(&path)).unwrap_err();
        assert!(matches!(e, PodError::NoProcess { .. }), "{e}");
    }

    /// A process of the host's netns, however it got into the pod's cgroup, is refused; one
    /// that has left the pod since the cgroup was listed is not taken for the pod's.
    #[test]
    fn a_process_in_the_hosts_netns_is_refused() {
        let path = format!("kubepods/pod{UID}");
        let t = tree(&[&path, &format!("{path}/ctr")]);
        // A fixture /proc: 7 (in the pod's cgroup) in the host's netns (this test's); 8 listed
        // in the cgroup but in another cgroup by now.
        let proc_root = t.path().join("proc");
        for (pid, cg) in [("7", format!("0::/{path}/ctr\n")), ("8", "0::/other\n".to_owned())] {
            std::fs::create_dir_all(proc_root.join(pid).join("ns")).unwrap();
            std::os::unix::fs::symlink("/proc/self/ns/net", proc_root.join(pid).join("ns/net")).unwrap();
            std::fs::write(proc_root.join(pid).join("cgroup"), cg).unwrap();
        }
        let k = Kubelet { cgroup_root: t.path().to_owned(), proc_root, host_netns: "/proc/self/ns/net".into() };
        std::fs::write(t.path().join(&path).join("ctr/cgroup.procs"), "8\n").unwrap();
        let e = k.find_netns(UID, &t.path().join(&path)).unwrap_err();
        assert!(matches!(e, PodError::NoProcess { .. }), "{e}");
        std::fs::write(t.path().join(&path).join("ctr/cgroup.procs"), "8\n7\n").unwrap();
        let e = k.find_netns(UID, &t.path().join(&path)).unwrap_err();
        assert!(matches!(e, PodError::HostNetns { pid: 7, .. }), "{e}");
        assert!(e.to_string().contains("hostNetwork"), "{e}");
    }

    /// An agent in a PID namespace of its own reads no process in a pod's cgroup.procs: the
    /// pod's processes are found through the host's /proc (their cgroup names the pod, in any
    /// of the forms a cgroup namespace shows), and the netns is theirs.
    #[test]
    fn processes_of_another_pid_namespace_are_found_through_the_hosts_proc() {
        let path = format!("kubepods/besteffort/pod{UID}");
        let t = tree(&[&path, &format!("{path}/ctr")]);
        std::fs::write(t.path().join(&path).join("cgroup.events"), "populated 1\nfrozen 0\n").unwrap();
        let proc_root = t.path().join("proc");
        // 40: the pod's, seen from a cgroup namespace; 41: another pod's; "self": not a pid.
        for (pid, cg) in [
            ("40", format!("0::/../../besteffort/pod{UID}/ctr\n")),
            ("41", format!("0::/kubepods/besteffort/pod{OTHER}/ctr\n")),
            ("self", format!("0::/{path}/ctr\n")),
        ] {
            std::fs::create_dir_all(proc_root.join(pid).join("ns")).unwrap();
            // Any namespace file stands for a netns here: only inodes are compared.
            std::os::unix::fs::symlink("/proc/self/ns/ipc", proc_root.join(pid).join("ns/net")).unwrap();
            std::fs::write(proc_root.join(pid).join("cgroup"), cg).unwrap();
        }
        let k = Kubelet {
            cgroup_root: t.path().to_owned(),
            proc_root: proc_root.clone(),
            host_netns: "/proc/self/ns/uts".into(),
        };
        let (netns, ino) = k.find_netns(UID, &t.path().join(&path)).unwrap();
        assert_eq!(netns, proc_root.join("40/ns/net"));
        assert_eq!(ino, std::fs::metadata("/proc/self/ns/ipc").unwrap().ino());
        // Not populated: no process yet, and the host's /proc is not searched.
        std::fs::write(t.path().join(&path).join("cgroup.events"), "populated 0\nfrozen 0\n").unwrap();
        assert!(matches!(k.find_netns(UID, &t.path().join(&path)), Err(PodError::NoProcess { .. })));
    }
}
