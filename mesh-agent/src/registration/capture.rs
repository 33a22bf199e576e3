//! The mechanics of capturing a workload and of letting it go.

use std::collections::HashSet;
use std::sync::Arc;

use mesh_api::admin::Source;
use mesh_common::InboundKey;
use mesh_model::{Workload, WorkloadKey};
use tokio::task::JoinHandle;

use super::{listeners, Inner, RegisterError, Registered, Registry};
use crate::ebpf::{self, Datapath};
use crate::netns::{self, NetnsWorker};
use crate::pods::PodError;
use crate::state::LocalWorkload;

impl Registry {
    /// Captures a workload of this node: listeners in its netns, then steering, then
    /// redirection of its cgroup. On error nothing of the capture remains (the caller decides
    /// whether its cgroup is refused instead).
    pub(super) async fn capture(
        &self,
        inner: &mut Inner,
        w: Workload,
        source: Source,
    ) -> Result<Arc<LocalWorkload>, RegisterError> {
        w.validate(&self.node)?;
        let key = w.key();
        if !w.is_local_to(&self.node) {
            let node = w.node.clone().unwrap_or_default();
            return Err(RegisterError::OtherNode { key, node, here: self.node.clone() });
        }
        if inner.registered.contains_key(&key) {
            return Err(RegisterError::Exists(key));
        }
        let (netns_path, cgroup_path) = match &w.pod_uid {
            None => {
                w.check_local_objects()?;
                let netns = w.netns.clone().expect("validated: a local workload names its netns");
                (netns, w.cgroup.clone().expect("validated: a local workload names its cgroup"))
            }
            // A pod: its cgroup by UID, its netns from the processes in it.
            Some(uid) => {
                let kubelet = self.kubelet.as_ref().ok_or_else(|| RegisterError::NoKubelet(key.clone()))?;
                let pod = |source| RegisterError::Pod { key: key.clone(), source: Box::new(source) };
                let cgroup = kubelet.find_cgroup(uid, w.qos_class.as_deref()).map_err(pod)?;
                if w.ips.is_empty() {
                    return Err(RegisterError::NoAddress(key));
                }
                (kubelet.find_netns(uid, &cgroup).map_err(pod)?.0, cgroup)
            }
        };
        let ino = |f: &std::fs::File| f.metadata().map(|m| std::os::unix::fs::MetadataExt::ino(&m)).ok();
        if let Some(mine) = std::fs::File::open(&netns_path).ok().as_ref().and_then(ino) {
            if let Some(other) = inner.registered.values().find(|r| ino(r.wl.netns.file()) == Some(mine)) {
                return Err(RegisterError::SharedNetns { key, netns: netns_path, other: other.wl.key().clone() });
            }
        }
        let w_uid = w.pod_uid.clone();
        let known =
            self.state.identity_for(w).map_err(|source| RegisterError::Identity { key: key.clone(), source })?;
        let cgroup_id = ebpf::cgroup_id(&cgroup_path).map_err(|source| RegisterError::Cgroup {
            key: key.clone(),
            path: cgroup_path.clone(),
            source,
        })?;
        if let Some(other) = cgroup_owner(inner, cgroup_id).filter(|o| **o != key) {
            return Err(RegisterError::SharedCgroup { key, cgroup: cgroup_path, other: other.clone() });
        }
        let id = allocate_slot(inner, cgroup_id).ok_or_else(|| RegisterError::NoSlot { key: key.clone() })?;
        let spawn_path = netns_path.clone();
        let worker = tokio::task::spawn_blocking(move || NetnsWorker::spawn(&spawn_path))
            .await
            .map_err(|e| RegisterError::Netns { key: key.clone(), source: netns::NetnsError::Thread(e.to_string()) })?
            .map_err(|source| RegisterError::Netns { key: key.clone(), source })?;
        // The netns's addresses. A pod's netns, found from a process, must hold one of its
        // addresses: a process that put itself in a pod's cgroup from another netns does not
        // get that pod's traffic. They are also what its apps' clients may not claim to be.
        let local = worker
            .run(netns::local_addresses)
            .await
            .map_err(|source| RegisterError::Netns { key: key.clone(), source })?;
        if let Some(uid) = &w_uid {
            let has = local.as_ref().map_err(|e| RegisterError::Pod {
                key: key.clone(),
                source: Box::new(PodError::Read {
                    path: netns_path.clone(),
                    reason: format!("listing its addresses: {e}"),
                }),
            })?;
            if !known.workload.ips.iter().any(|ip| has.contains(ip)) {
                let source = PodError::NetnsWithoutAddress {
                    uid: uid.clone(),
                    netns: netns_path,
                    want: known.workload.ips.clone(),
                };
                return Err(RegisterError::Pod { key, source: Box::new(source) });
            }
        }

        // A pod's pins are keyed by its UID (a pod recreated under the same name is another).
        let pin_name = match &w_uid {
            Some(uid) => format!("pod-{uid}"),
            None => format!("{}_{}", key.namespace, key.name),
        };
        // Listeners first: by the time the kernel redirects anything, someone is listening.
        // Those of a predecessor handing over are taken (the same sockets: nothing queued in
        // them is lost), if they are this netns'; else new ones are bound.
        let handed = self.handed.lock().unwrap_or_else(|e| e.into_inner()).remove(&pin_name);
        let adopted_listeners = match handed {
            Some(h) => match worker.run(move || listeners::adopt(h)).await {
                Ok(Ok(l)) => Some(l),
                Ok(Err(why)) => {
                    tracing::warn!(workload = %key, why, "not taking the predecessor's listeners; binding new ones");
                    None
                }
                Err(source) => return Err(RegisterError::Netns { key: key.clone(), source }),
            },
            None => None,
        };
        let taken_over = adopted_listeners.is_some();
        let listeners = match adopted_listeners {
            Some(l) => l,
            None => worker
                .run(listeners::bind)
                .await
                .map_err(|source| RegisterError::Netns { key: key.clone(), source })?
                .map_err(|(addr, source)| RegisterError::Listen { key: key.clone(), addr, source })?,
        };
        let netns_cookie =
            netns::socket_netns_cookie(&listeners.outbound[0]).map_err(|source| RegisterError::Netns {
                key: key.clone(),
                source: netns::NetnsError::Enter { path: worker.path().into(), source },
            })?;
        let inbound_keys: Vec<InboundKey> = known.workload.ips.iter().map(|ip| listeners::inbound_key(*ip)).collect();
        // Dialling apps from their clients' addresses needs sock_ops to see the agent's
        // sockets (it records each dial for sk_lookup); an agent outside the programs' cgroup
        // root dials from the apps' own addresses, counted (`not_set_up`).
        let transparent = if self.inputs.orig_dst.lookup() == ebpf::maps::Lookup::ByConnection {
            let name = key.to_string();
            let sysctl_net = self.sysctl_net.clone();
            let local = local.unwrap_or_default();
            worker
                .run(move || crate::transparent::install(&name, &sysctl_net, local))
                .await
                .map_err(|source| RegisterError::Netns { key: key.clone(), source })?
        } else {
            crate::transparent::Setup::default()
        };
        let wl = Arc::new(LocalWorkload {
            key: key.clone(),
            ips: known.workload.ips.clone(),
            known: tokio::sync::watch::Sender::new(Arc::new(known)),
            id,
            cgroup_id,
            cgroup: cgroup_path,
            netns: worker,
            netns_cookie,
            transparent,
            inbound_keys,
            pin_name,
            source,
        });

        let attach = (|| -> Result<bool, ebpf::EbpfError> {
            let dp = &mut inner.datapath;
            for k in &wl.inbound_keys {
                dp.set_inbound_listener(*k, &listeners.inbound, wl.netns_cookie)?;
            }
            let adopted = dp.attach_sk_lookup(&wl.pin_name, wl.netns.file())?;
            dp.set_workload_addrs(id, &wl.ips)?;
            dp.set_workload_cgroup(cgroup_id, id, self.max_conns)?;
            Ok(adopted)
        })();
        let adopted = match attach {
            Ok(a) => a,
            Err(source) => {
                release_kernel_state(&mut inner.datapath, &wl, Release::Refuse);
                return Err(RegisterError::Ebpf { key, source: Box::new(source) });
            }
        };
        self.state.update_local(|cur| cur.with(wl.clone()));
        let fds = listeners.fds();
        let tasks = self.spawn_proxies(&wl, listeners);
        self.identities.acquire(&wl.spiffe_id());

        inner.registered.insert(key.clone(), Registered { wl: wl.clone(), tasks, fds });
        if source == Source::Api {
            if let Err(e) = self.save_state(inner, None) {
                let reg = inner.registered.remove(&key).expect("just inserted");
                self.undo(&mut inner.datapath, reg, Release::Refuse);
                return Err(RegisterError::State { path: self.file.path().to_owned(), source: e });
            }
        }
        tracing::info!(
            workload = %key,
            cgroup_id,
            netns_cookie,
            id,
            sk_lookup_adopted = adopted,
            listeners_taken_over = taken_over,
            "workload captured"
        );
        Ok(wl)
    }

    pub(super) fn spawn_proxies(&self, wl: &Arc<LocalWorkload>, l: listeners::Listeners) -> Vec<JoinHandle<()>> {
        let tokio_listener =
            |l: std::net::TcpListener| tokio::net::TcpListener::from_std(l).expect("nonblocking listener");
        let inputs = &self.inputs;
        let mut tasks = Vec::new();
        for l in l.outbound {
            let serve = crate::proxy::outbound::serve(inputs.clone(), self.pool.clone(), wl.clone(), tokio_listener(l));
            tasks.push(tokio::spawn(serve));
        }
        tasks.push(tokio::spawn(crate::proxy::inbound::serve(inputs.clone(), wl.clone(), tokio_listener(l.inbound))));
        tasks.push(tokio::spawn(crate::hbone::server::serve(inputs.clone(), wl.clone(), tokio_listener(l.hbone))));
        tasks
    }

    /// Reverse order of add: stop redirecting (or refuse), stop steering, close the
    /// listeners, forget it.
    pub(super) fn undo(&self, dp: &mut Datapath, reg: Registered, how: Release) {
        release_kernel_state(dp, &reg.wl, how);
        for t in reg.tasks {
            t.abort();
        }
        self.identities.release(&reg.wl.spiffe_id());
        self.state.update_local(|cur| cur.without(reg.wl.key()));
        self.pool.evict_stale(&self.state.load());
    }
}

/// What becomes of a released workload's cgroup.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Release {
    /// The workload left the mesh: its connections are no longer redirected.
    Forget,
    /// Capturing it failed: its cgroup entry is changed in place to refuse every connection,
    /// never removed first (between the two its connections would go out unredirected).
    Refuse,
}

pub(super) fn release_kernel_state(dp: &mut Datapath, wl: &LocalWorkload, how: Release) {
    let r = match how {
        Release::Forget => dp.remove_workload_cgroup(wl.cgroup_id, wl.id),
        Release::Refuse => dp.set_workload_cgroup(wl.cgroup_id, mesh_common::WORKLOAD_SLOT_REFUSED, 0),
    };
    if let Err(e) = r {
        tracing::error!(workload = %wl.key(), error = %e, "could not change the workload's cgroup entry");
    }
    dp.detach_sk_lookup(&wl.pin_name);
    for k in &wl.inbound_keys {
        dp.remove_inbound_listener(k);
    }
}

/// The workload (captured or refused) that holds a cgroup.
pub(super) fn cgroup_owner(inner: &Inner, cgroup_id: u64) -> Option<&WorkloadKey> {
    let captured = inner.registered.iter().find(|(_, r)| r.wl.cgroup_id == cgroup_id).map(|(k, _)| k);
    captured.or_else(|| inner.failed.iter().find(|(_, f)| f.cgroup_id == Some(cgroup_id)).map(|(k, _)| k))
}

/// The workload's id, which is also its slot in the kernel's connection counts: the one its
/// cgroup entry already has (a previous agent's: the connections counted there are this
/// workload's), else the next slot after the last one given out whose count is zero and that
/// no captured workload and no cgroup entry uses. `None` when every slot is taken.
pub(super) fn allocate_slot(inner: &mut Inner, cgroup_id: u64) -> Option<u32> {
    let live = inner.datapath.live_counts().clone();
    let slots = live.slots();
    let mut used: HashSet<u32> = inner.registered.values().map(|r| r.wl.id).collect();
    if let Some(v) = inner.datapath.workload_cgroup(cgroup_id) {
        if v.id != mesh_common::WORKLOAD_SLOT_REFUSED && v.id < slots && !used.contains(&v.id) {
            return Some(v.id);
        }
    }
    used.extend(inner.datapath.workload_cgroups().into_iter().filter(|(cg, _)| *cg != cgroup_id).map(|(_, id)| id));
    let free = pick_slot(slots, inner.next_slot, &used, |s| live.get(s))?;
    inner.next_slot = free;
    Some(free)
}

/// The first of slots `1..slots`, starting after `last`, that is not `used` and whose count is
/// zero. Starting after the last one given out, a slot just freed is not given again at once.
fn pick_slot(slots: u32, last: u32, used: &HashSet<u32>, count: impl Fn(u32) -> Option<u64>) -> Option<u32> {
    let n = slots.checked_sub(1).filter(|n| *n > 0)?;
    (0..n).map(|i| 1 + (last + i) % n).find(|s| !used.contains(s) && count(*s) == Some(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_given_round_robin_skipping_used_and_busy_ones_and_never_zero() {
        let counts = [0u64, 0, 3, 0, 0];
        let count = |s: u32| counts.get(s as usize).copied();
        let none = HashSet::new();
        assert_eq!(pick_slot(5, 0, &none, count), Some(1));
        assert_eq!(pick_slot(5, 1, &none, count), Some(3), "slot 2 still counts 3 connections");
        assert_eq!(pick_slot(5, 3, &none, count), Some(4));
        assert_eq!(pick_slot(5, 4, &none, count), Some(1), "wraps around, past slot 0");
        assert_eq!(pick_slot(5, 4, &HashSet::from([1, 3, 4]), count), None);
        assert_eq!(pick_slot(1, 0, &none, count), None);
        assert_eq!(pick_slot(0, 0, &none, count), None);
    }
}
