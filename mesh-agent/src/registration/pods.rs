//! Pods the controller pushes for this node (`--kubelet-pods`): captured once found by UID,
//! refused while they cannot be, released when the controller no longer has them, and captured
//! again when the kubelet replaces their sandbox (same UID, a new netns).

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use std::time::Duration;

use mesh_api::admin::Source;
use mesh_model::{Workload, WorkloadKey};

use super::{capture, Inner, Registry};
use crate::ebpf;

/// How often pods are looked at while one of this node's is not captured yet (its cgroup
/// appears when the kubelet starts it: it is refused from the first look that finds it).
const WAITING_POLL: Duration = Duration::from_millis(100);
/// How often captured pods' sandboxes are checked otherwise.
const POLL: Duration = Duration::from_secs(1);

impl Registry {
    pub fn follows_pods(&self) -> bool {
        self.kubelet.is_some()
    }

    /// Brings the captured pods in line with the controller's pods for this node. Without a
    /// configuration nothing changes (the kernel state a previous agent left stays: fail
    /// closed).
    pub async fn follow_pods(&self) -> Followed {
        let Some(kubelet) = &self.kubelet else { return Followed::default() };
        // The directories pods' cgroups are made in: watched, and where the hook looks (a tree
        // that cannot be read leaves the hook as it was).
        let dirs = kubelet.pod_parents();
        let parents = dirs.as_ref().ok().map(|d| d.iter().filter_map(|d| ebpf::cgroup_id(d).ok()).collect());
        let mut followed = Followed { waiting: false, parents: dirs.unwrap_or_default() };
        let snap = self.state.load();
        if snap.config.version == 0 {
            return followed;
        }
        let desired = node_pods(&snap, &self.node);
        let uids: BTreeSet<String> = desired.values().filter_map(|w| w.pod_uid.clone()).collect();
        let mut inner = self.inner.lock().await;
        if self.frozen() {
            return followed;
        }
        // First: a pod's cgroup the kubelet makes from now on is refused inside its mkdir.
        if let Err(e) = inner.datapath.set_pod_uids(&uids) {
            tracing::error!(error = %e, "could not give the pod cgroup hook all of this node's pods");
        }
        if let Some(Err(e)) = parents.map(|p: BTreeSet<u64>| inner.datapath.set_pod_parents(&p)) {
            tracing::error!(error = %e, "could not give the pod cgroup hook every directory pods are made in");
        }
        let Inner { registered, failed, .. } = &*inner;
        let mut gone = Vec::new();
        let mut again = Vec::new();
        let mut dead = Vec::new();
        for (key, r) in registered.iter().filter(|(_, r)| r.wl.source == Source::Kubernetes) {
            let held = r.wl.known();
            match desired.get(key) {
                None => gone.push(key.clone()),
                // Another pod under the same name: the old one is let go first.
                Some(w) if w.pod_uid != held.workload.pod_uid => gone.push(key.clone()),
                Some(w) if w.ips != held.workload.ips || w.qos_class != held.workload.qos_class => {
                    again.push(key.clone())
                }
                Some(w) => match sandbox(kubelet, w, &r.wl) {
                    Sandbox::Same => {}
                    Sandbox::Replaced => {
                        tracing::info!(workload = %key, "the pod's sandbox was replaced: capturing it again");
                        again.push(key.clone());
                    }
                    // Its cgroup was removed (the pod is being deleted): nothing is left to
                    // refuse, and its entry goes with it.
                    Sandbox::CgroupGone => dead.push(key.clone()),
                },
            }
        }
        for (key, f) in failed.iter().filter(|(_, f)| f.source == Source::Kubernetes) {
            if desired.get(key).is_none_or(|w| w.pod_uid != f.workload.pod_uid) {
                gone.push(key.clone());
            }
        }
        for key in gone.iter().chain(&dead) {
            let _ = self.remove_locked(&mut inner, key, false);
        }
        if !self.holds_cleanup() {
            lift_orphan_refusals(&mut inner, &uids);
        }
        for key in &again {
            // Refused in place, never unredirected in between; kept as failed with that cgroup
            // until captured again, so that the entry is let go if the pod's cgroup changed.
            if let Some(reg) = inner.registered.remove(key) {
                let (cg, path, workload) = (reg.wl.cgroup_id, reg.wl.cgroup.clone(), reg.wl.known().workload.clone());
                self.undo(&mut inner.datapath, reg, capture::Release::Refuse);
                let failed = super::Failed {
                    workload,
                    source: Source::Kubernetes,
                    wants: Some(cg),
                    cgroup_id: Some(cg),
                    held: Some(path),
                    reason: "being captured again".into(),
                    waiting: false,
                };
                inner.failed.insert(key.clone(), failed);
            }
        }
        for (key, w) in desired {
            if !inner.registered.contains_key(&key) {
                let _ = self.add_locked(&mut inner, w, Source::Kubernetes).await;
            }
        }
        followed.waiting = inner.failed.values().any(|f| f.source == Source::Kubernetes);
        drop(inner);
        if !gone.is_empty() || !again.is_empty() || !dead.is_empty() {
            self.pool.evict_stale(&self.state.load());
        }
        followed
    }

    /// The UIDs of the controller's pods for this node.
    pub(super) fn node_pod_uids(&self) -> BTreeSet<String> {
        node_pods(&self.state.load(), &self.node).into_values().filter_map(|w| w.pod_uid).collect()
    }

    /// Follows the controller's pods for this node: after each configuration change, every
    /// [`WAITING_POLL`] while a pod is not captured, else every [`POLL`]. The first time a
    /// configuration is in force, what a previous agent left for pods that are gone is swept.
    /// Also at once when a directory is made where pods' cgroups appear (inotify): a new pod's
    /// cgroup is refused the moment the kubelet makes it, long before the runtime can start
    /// the pod's sandbox and app in it. The polls stay, for what inotify cannot tell (a netns
    /// replaced, a process moved).
    pub async fn watch_pods(self: Arc<Self>, mut swept: bool) {
        let watch = match Inotify::new() {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, "no inotify: new pods' cgroups are seen by polling only");
                None
            }
        };
        loop {
            let followed = self.follow_pods().await;
            if !swept && self.state.load().config.version > 0 {
                self.sweep_stale().await;
                swept = true;
            }
            if let Some(w) = &watch {
                for dir in &followed.parents {
                    w.add(dir);
                }
            }
            let wait = if followed.waiting { WAITING_POLL } else { POLL };
            tokio::select! {
                _ = self.pods_changed.notified() => {}
                _ = tokio::time::sleep(wait) => {}
                _ = async { if let Some(w) = &watch { w.created().await } else { std::future::pending().await } } => {}
            }
        }
    }
}

/// What a pass of [`Registry::follow_pods`] found.
#[derive(Default)]
pub struct Followed {
    /// One of this node's pods is not captured yet.
    pub waiting: bool,
    /// The directories pods' cgroups are made in.
    pub parents: Vec<std::path::PathBuf>,
}

/// The controller's pods for `node`.
fn node_pods(snap: &crate::state::Snapshot, node: &str) -> BTreeMap<WorkloadKey, Workload> {
    snap.config
        .by_key
        .values()
        .filter(|k| k.workload.pod_uid.is_some() && k.workload.node.as_deref() == Some(node))
        .map(|k| (k.key.clone(), k.workload.clone()))
        .collect()
}

/// An inotify instance watching directories for new subdirectories.
struct Inotify(tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>);

impl Inotify {
    fn new() -> std::io::Result<Inotify> {
        use std::os::fd::FromRawFd;
        // SAFETY: inotify_init1 returns a new descriptor we own, or -1.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a valid descriptor nobody else owns.
        let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        // SAFETY: an OwnedFd always returns its one open descriptor, and it is closed only when
        // the AsyncFd drops it.
        let fd = unsafe { tokio::io::unix::AsyncFd::register_with_interest(owned, tokio::io::Interest::READABLE) };
        fd.map(Inotify).map_err(|e| std::io::Error::other(e.to_string()))
    }

    /// Watches `dir` for new subdirectories (again is harmless: the same watch).
    fn add(&self, dir: &std::path::Path) {
        use std::os::fd::AsRawFd;
        use std::os::unix::ffi::OsStrExt;
        let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else { return };
        // SAFETY: a valid inotify descriptor and a NUL-terminated path.
        unsafe {
            libc::inotify_add_watch(self.0.get_ref().as_raw_fd(), c.as_ptr(), libc::IN_CREATE | libc::IN_ONLYDIR)
        };
    }

    /// Returns when something was created in a watched directory (the events are drained).
    async fn created(&self) {
        use std::os::fd::AsRawFd;
        let Ok(mut guard) = self.0.readable().await else { return std::future::pending().await };
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: reading into our own buffer from our own descriptor.
            let n = unsafe { libc::read(self.0.get_ref().as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                break;
            }
        }
        guard.clear_ready();
    }
}

/// Lifts the refusals the pod cgroup hook made for pods that are no longer this node's meshed
/// pods (moved out of the mesh, or deleted) and whose cgroups no workload holds: the hook
/// refused the cgroup before the agent took the pod up, and the pod left before it did. Found
/// by UID in the hook's own record, so nothing is missed, and tried on every pass.
fn lift_orphan_refusals(inner: &mut Inner, uids: &BTreeSet<String>) {
    let records = inner.datapath.hook_refusals();
    for (cg, uid) in orphans(&records, uids, |cg| capture::cgroup_owner(inner, cg).is_some()) {
        // A record whose refusal is gone already (released with its pod) is only forgotten.
        if inner.datapath.workload_cgroup(cg).is_some_and(|v| v.id == mesh_common::WORKLOAD_SLOT_REFUSED) {
            tracing::info!(pod_uid = %uid, cgroup_id = cg, "lifting the refusal of a pod that left the mesh before it was taken up");
            if inner.datapath.remove_workload_cgroup(cg, mesh_common::WORKLOAD_SLOT_REFUSED).is_err() {
                continue;
            }
        }
        inner.datapath.forget_hook_refusal(cg);
    }
}

/// The hook's records (cgroup id, pod UID) whose pod is not one of `uids` and whose cgroup no
/// workload holds.
fn orphans(records: &[(u64, String)], uids: &BTreeSet<String>, held: impl Fn(u64) -> bool) -> Vec<(u64, String)> {
    records.iter().filter(|(cg, uid)| !uids.contains(uid) && !held(*cg)).cloned().collect()
}

/// What became of a captured pod's sandbox.
enum Sandbox {
    Same,
    /// Its cgroup or netns is no longer the one it was captured with.
    Replaced,
    /// Its cgroup directory is gone.
    CgroupGone,
}

/// Whether a captured pod's cgroup or netns is still the one it was captured with. A pod whose
/// processes are all gone for now (its sandbox being replaced) is left as it is until they are
/// back; so is one whose cgroup cannot be read for another reason than its absence.
fn sandbox(kubelet: &crate::pods::Kubelet, w: &Workload, wl: &crate::state::LocalWorkload) -> Sandbox {
    let Some(uid) = &w.pod_uid else { return Sandbox::Same };
    match std::fs::metadata(&wl.cgroup) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Sandbox::CgroupGone,
        Err(_) => return Sandbox::Same,
        Ok(_) => {}
    }
    if ebpf::cgroup_id(&wl.cgroup).ok() != Some(wl.cgroup_id) {
        return Sandbox::Replaced;
    }
    let held = wl.netns.file().metadata().map(|m| m.ino()).ok();
    match kubelet.find_netns(uid, &wl.cgroup) {
        Ok((_, ino)) if Some(ino) == held => Sandbox::Same,
        Ok(_) => Sandbox::Replaced,
        Err(crate::pods::PodError::NoProcess { .. } | crate::pods::PodError::Read { .. }) => Sandbox::Same,
        // Anything else (a foreign process, the host's netns): captured again, which refuses it.
        Err(_) => Sandbox::Replaced,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hook_refusal_is_an_orphan_once_its_pod_left_and_no_workload_holds_its_cgroup() {
        let records = vec![(10, "u-meshed".to_owned()), (11, "u-left".to_owned()), (12, "u-left-held".to_owned())];
        let uids = BTreeSet::from(["u-meshed".to_owned()]);
        assert_eq!(orphans(&records, &uids, |cg| cg == 12), vec![(11, "u-left".to_owned())]);
        assert!(orphans(&records, &BTreeSet::new(), |_| true).is_empty());
    }
}
