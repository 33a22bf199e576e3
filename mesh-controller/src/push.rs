//! The configuration push: one server stream per watching agent, a snapshot of what its node
//! needs, then a delta for every accepted change that concerns it. An agent that reconnects gets
//! a fresh snapshot. What each node needs is worked out from the shared per-version view
//! (view.rs); large updates go out in parts of about [`PART_BYTES`].

use std::pin::Pin;
use std::sync::Arc;

use mesh_api::push::config_service_server::ConfigService;
use mesh_api::push::{ConfigUpdate, ResourceId, WatchRequest};
use tokio::sync::watch;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::auth::NodeAuthenticator;
use crate::view::{Resources, Update, View};

/// About how many bytes of resources one message carries: a part closes once it holds this
/// much (a single larger resource goes alone).
pub const PART_BYTES: usize = 64 << 10;

/// How many snapshots are sent at once. When every node connects at the same moment (the
/// controller restarted), the others wait their turn: sending them all at once would not finish
/// sooner (it is CPU work), but would hold parts for all of them.
pub const SNAPSHOTS_AT_ONCE: usize = 32;

pub struct ConfigPush {
    pub auth: Arc<dyn NodeAuthenticator>,
    pub views: watch::Receiver<Arc<View>>,
    pub snapshots: Arc<tokio::sync::Semaphore>,
}

impl ConfigPush {
    pub fn new(auth: Arc<dyn NodeAuthenticator>, views: watch::Receiver<Arc<View>>) -> ConfigPush {
        ConfigPush { auth, views, snapshots: Arc::new(tokio::sync::Semaphore::new(SNAPSHOTS_AT_ONCE)) }
    }
}

type Sender = tokio::sync::mpsc::Sender<Result<ConfigUpdate, Status>>;

/// Sends an update's resources in parts; false when the agent has gone.
async fn send_parts<'a>(
    tx: &Sender,
    view: &View,
    snapshot: bool,
    upserts: impl Iterator<Item = (&'a ResourceId, &'a Arc<str>)>,
    removals: &[ResourceId],
) -> bool {
    let mut msg = ConfigUpdate {
        snapshot,
        upserts: vec![],
        removals: removals.iter().map(ResourceId::key).collect(),
        version: view.version,
        accepted_at_ms: view.accepted_at_ms,
        more: false,
    };
    let mut size = 0;
    for (id, json) in upserts {
        if size >= PART_BYTES {
            let next = ConfigUpdate { snapshot: false, upserts: vec![], removals: vec![], more: false, ..msg };
            let part = std::mem::replace(&mut msg, next);
            if tx.send(Ok(ConfigUpdate { more: true, ..part })).await.is_err() {
                return false;
            }
            size = 0;
        }
        size += json.len() + id.namespace.len() + id.name.len();
        msg.upserts.push(id.clone().with_json(json.to_string()));
    }
    tx.send(Ok(msg)).await.is_ok()
}

/// Gives the heap's free pages back to the system. The allocator keeps what a burst of work
/// freed (a storm of snapshots, a model rebuilt), and the controller's resident memory would
/// stay at its high-water mark.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory of the allocator's own arenas to the system.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[tonic::async_trait]
impl ConfigService for ConfigPush {
    type WatchStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<ConfigUpdate, Status>> + Send + 'static>>;

    async fn watch(&self, req: Request<WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let cred = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.strip_prefix("Bearer "))
            .ok_or_else(|| Status::unauthenticated("send `authorization: Bearer <node credential>`"))?;
        let node = self.auth.authenticate(cred).await.map_err(|e| {
            tracing::warn!(reason = e.reason(), "config watch refused: {e}");
            e.status()
        })?;
        tracing::info!(node, "agent watching configuration");
        let mut rx = self.views.clone();
        // One part waiting at most: a slow agent holds back its own stream, and the controller
        // holds about two parts for it (this one, and the one being sent).
        let (tx, out) = tokio::sync::mpsc::channel(1);
        let snapshots = self.snapshots.clone();
        tokio::spawn(async move {
            // The version last sent, and the node's own part as sent.
            let mut sent: Option<(u64, Resources)> = None;
            loop {
                let view = rx.borrow_and_update().clone();
                let (update, mine) = view.update_for(&node, sent.as_ref().map(|(v, r)| (*v, r)));
                let alive = match update {
                    None => true,
                    Some(Update::Snapshot) => {
                        let Ok(turn) = snapshots.acquire().await else { return };
                        // The turn is held until the last part has been taken for sending.
                        let sent =
                            send_parts(&tx, &view, true, view.snapshot(&mine), &[]).await && tx.reserve().await.is_ok();
                        drop(turn);
                        if snapshots.available_permits() == SNAPSHOTS_AT_ONCE {
                            // The last of a burst of snapshots: what they held goes back.
                            tokio::task::spawn_blocking(release_free_memory);
                        }
                        sent
                    }
                    Some(Update::Delta { upserts, removals }) => {
                        send_parts(&tx, &view, false, upserts.iter().map(|(id, j)| (id, j)), &removals).await
                    }
                };
                if !alive {
                    tracing::info!(node, "agent stopped watching");
                    return;
                }
                sent = Some((view.version, mine));
                if rx.changed().await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A snapshot larger than a part goes out in parts: the first a snapshot, the others not,
    /// all of one version, `more` on all but the last, and every resource exactly once.
    #[test]
    fn a_large_snapshot_goes_out_in_parts_of_about_a_mebibyte() {
        let text: String = (0..12_000)
            .map(|i| {
                format!(
                    "---\nkind: Workload\nname: w{i}\nnamespace: ns{}\nserviceAccount: sa{i}\nips: [10.{}.{}.{}]\nnode: n{}\nlabels: {{app: app{i}, tier: backend}}\n",
                    i % 100,
                    i / 65536,
                    (i / 256) % 256,
                    i % 256,
                    i % 10
                )
            })
            .collect();
        let c = mesh_model::config_file::parse_file(std::path::Path::new("w.yaml"), &text).unwrap();
        let mut m = crate::model::Model { version: 3, ..Default::default() };
        m.workloads = c.workloads.into_iter().map(|w| (w.key(), Arc::new(w))).collect();
        let view = View::build(Arc::new(m), "sockmesh-system", None);
        let mine = view.node_part("n1");
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let parts = rt.block_on(async {
            let (tx, mut rx) = tokio::sync::mpsc::channel(100);
            assert!(send_parts(&tx, &view, true, view.snapshot(&mine), &[]).await);
            drop(tx);
            let mut parts = vec![];
            while let Some(p) = rx.recv().await {
                parts.push(p.unwrap());
            }
            parts
        });
        let total: usize = parts.iter().flat_map(|p| &p.upserts).map(|r| r.json.len()).sum();
        assert!(parts.len() >= 2 && total > PART_BYTES, "{} parts, {total} bytes", parts.len());
        for (i, p) in parts.iter().enumerate() {
            let last = i == parts.len() - 1;
            assert_eq!((p.snapshot, p.more, p.version), (i == 0, !last, 3), "part {i}");
            let size: usize = p.upserts.iter().map(|r| r.json.len()).sum();
            assert!(size < PART_BYTES + 1024, "part {i}: {size} bytes");
        }
        let names: std::collections::BTreeSet<&str> =
            parts.iter().flat_map(|p| &p.upserts).map(|r| r.name.as_str()).collect();
        assert_eq!((names.len(), parts.iter().map(|p| p.upserts.len()).sum::<usize>()), (12_000, 12_000));
    }
}
