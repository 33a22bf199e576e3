//! The mechanics of capturing a workload and of letting it go.

use std::sync::Arc;

use mesh_api::admin::Source;
use mesh_common::InboundKey;
use mesh_model::{Workload, WorkloadKey};
use tokio::task::JoinHandle;

use super::{listeners, Inner, RegisterError, Registered, Registry};
use crate::ebpf::{self, Datapath};
use crate::netns::{self, NetnsWorker};
use crate::state::{KnownWorkload, LocalWorkload};

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
        w.check_local_objects()?;
        let netns_path = w.netns.clone().expect("validated: a local workload names its netns");
        let cgroup_path = w.cgroup.clone().expect("validated: a local workload names its cgroup");
        if inner.registered.contains_key(&key) {
            return Err(RegisterError::Exists(key));
        }
        let ino = |p: &std::path::Path| std::fs::metadata(p).map(|m| std::os::unix::fs::MetadataExt::ino(&m)).ok();
        if let Some(mine) = ino(&netns_path) {
            if let Some(other) = inner.registered.values().find(|r| ino(r.wl.netns.path()) == Some(mine)) {
                return Err(RegisterError::SharedNetns { key, netns: netns_path, other: other.wl.key().clone() });
            }
        }
        let known = KnownWorkload::new(self.state.trust_domain(), w)
            .map_err(|source| RegisterError::Identity { key: key.clone(), source })?;
        let cgroup_id = ebpf::cgroup_id(&cgroup_path).map_err(|source| RegisterError::Cgroup {
            key: key.clone(),
            path: cgroup_path.clone(),
            source,
        })?;
        let worker = tokio::task::spawn_blocking(move || NetnsWorker::spawn(&netns_path))
            .await
            .map_err(|e| RegisterError::Netns { key: key.clone(), source: netns::NetnsError::Thread(e.to_string()) })?
            .map_err(|source| RegisterError::Netns { key: key.clone(), source })?;

        // Listeners first: by the time the kernel redirects anything, someone is listening.
        let listeners = worker
            .run(listeners::bind)
            .await
            .map_err(|source| RegisterError::Netns { key: key.clone(), source })?
            .map_err(|(addr, source)| RegisterError::Listen { key: key.clone(), addr, source })?;
        let netns_cookie =
            netns::socket_netns_cookie(&listeners.outbound[0]).map_err(|source| RegisterError::Netns {
                key: key.clone(),
                source: netns::NetnsError::Enter { path: worker.path().into(), source },
            })?;
        let id = allocate_id(inner, &key);
        let inbound_keys: Vec<InboundKey> = known.workload.ips.iter().map(|ip| listeners::inbound_key(*ip)).collect();
        let wl = Arc::new(LocalWorkload {
            known: Arc::new(known),
            id,
            cgroup_id,
            netns: worker,
            netns_cookie,
            inbound_keys,
            pin_name: format!("{}_{}", key.namespace, key.name),
            source,
        });

        let attach = (|| -> Result<bool, ebpf::EbpfError> {
            let dp = &mut inner.datapath;
            for k in &wl.inbound_keys {
                dp.set_inbound_listener(*k, &listeners.inbound)?;
            }
            let adopted = dp.attach_sk_lookup(&wl.pin_name, wl.netns.file())?;
            dp.add_workload_cgroup(cgroup_id, id, self.max_conns)?;
            Ok(adopted)
        })();
        let adopted = match attach {
            Ok(a) => a,
            Err(source) => {
                release_kernel_state(&mut inner.datapath, &wl);
                return Err(RegisterError::Ebpf { key, source: Box::new(source) });
            }
        };
        self.state.update_local(|cur| cur.with(wl.clone()));
        let tasks = self.spawn_proxies(&wl, listeners);
        self.identities.acquire(wl.spiffe_id());

        inner.registered.insert(key.clone(), Registered { wl: wl.clone(), tasks });
        if source == Source::Api {
            if let Err(e) = self.save_state(inner, None) {
                let reg = inner.registered.remove(&key).expect("just inserted");
                self.undo(&mut inner.datapath, reg);
                return Err(RegisterError::State { path: self.file.path().to_owned(), source: e });
            }
        }
        tracing::info!(workload = %key, cgroup_id, netns_cookie, id, sk_lookup_adopted = adopted, "workload captured");
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

    /// Reverse order of add: stop redirecting, stop steering, close the listeners, forget it.
    pub(super) fn undo(&self, dp: &mut Datapath, reg: Registered) {
        release_kernel_state(dp, &reg.wl);
        for t in reg.tasks {
            t.abort();
        }
        self.identities.release(reg.wl.spiffe_id());
        self.state.update_local(|cur| cur.without(reg.wl.key()));
        self.pool.evict_stale(&self.state.load());
    }
}

pub(super) fn release_kernel_state(dp: &mut Datapath, wl: &LocalWorkload) {
    if let Err(e) = dp.remove_workload_cgroup(wl.cgroup_id) {
        tracing::error!(workload = %wl.key(), error = %e, "could not remove the workload's cgroup entry");
    }
    dp.detach_sk_lookup(&wl.pin_name);
    for k in &wl.inbound_keys {
        dp.remove_inbound_listener(k);
    }
}

/// A stable id per workload name (so a restarted agent gives a workload the id its pinned
/// entries carry), moved on past ids in use.
pub(super) fn allocate_id(inner: &Inner, key: &WorkloadKey) -> u32 {
    let mut id = fnv1a(key.to_string().as_bytes()).max(1);
    let taken = |id: u32| {
        inner.registered.values().any(|r| r.wl.id == id) || inner.failed.iter().any(|(k, f)| k != key && f.id == id)
    };
    while taken(id) {
        id = id.wrapping_add(1).max(1);
    }
    id
}

fn fnv1a(bytes: &[u8]) -> u32 {
    let mut h: u32 = 0x811c9dc5;
    for b in bytes {
        h ^= *b as u32;
        h = h.wrapping_mul(0x01000193);
    }
    h
}
