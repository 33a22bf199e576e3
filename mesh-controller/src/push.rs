//! The configuration push: one server stream per watching agent, a snapshot of what its node
//! needs, then a delta for every accepted change that concerns it. An agent that reconnects gets
//! a fresh snapshot. What each node needs is worked out from the shared per-version view
//! (view.rs); large updates go out in parts of about [`PART_BYTES`].

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use mesh_api::push::config_service_server::ConfigService;
use mesh_api::push::{ConfigUpdate, ResourceId, WatchRequest};
use tokio::sync::watch;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::auth::NodeAuthenticator;
use crate::view::{Resources, Update, View};

/// About how many bytes of resources one message carries: a part closes once it holds this
/// much (a single larger resource goes alone).
pub const PART_BYTES: usize = 16 << 10;

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

/// How long a snapshot may hold its turn. An agent that stops reading (frozen, or a node cut
/// off mid-snapshot) keeps its stream, but its turn goes to the next node after this.
pub const TURN: Duration = Duration::from_secs(10);

/// Where one update's parts go: the stream, the largest part it may take, and the snapshot
/// turn, held until its deadline.
struct Parts<'a> {
    tx: &'a Sender,
    part_bytes: usize,
    turn: Option<(tokio::sync::SemaphorePermit<'a>, tokio::time::Instant)>,
}

impl Parts<'_> {
    /// Sends one message; false when the agent has gone.
    async fn send(&mut self, msg: ConfigUpdate) -> bool {
        if let Some((_, deadline)) = &self.turn {
            match tokio::time::timeout_at(*deadline, self.tx.reserve()).await {
                Ok(Ok(slot)) => {
                    slot.send(Ok(msg));
                    return true;
                }
                Ok(Err(_)) => return false,
                // This agent is slow: the turn goes to another, and it goes on at its own pace.
                Err(_) => self.turn = None,
            }
        }
        self.tx.send(Ok(msg)).await.is_ok()
    }

    /// Waits, within the turn's deadline, until the update's last part has been taken for
    /// sending, then gives the turn back. False when the agent has gone.
    async fn finish(&mut self) -> bool {
        let Some((_, deadline)) = self.turn.take() else { return true };
        !matches!(tokio::time::timeout_at(deadline, self.tx.reserve()).await, Ok(Err(_)))
    }

    /// Sends an update in parts of about `part_bytes` (removals first, then upserts): each part
    /// but the last says `more`, and only the first says `snapshot`. False when the agent has
    /// gone.
    async fn update<'r>(
        &mut self,
        view: &View,
        snapshot: bool,
        upserts: impl Iterator<Item = (&'r ResourceId, &'r Arc<str>)>,
        removals: &[ResourceId],
    ) -> bool {
        let empty = ConfigUpdate {
            snapshot: false,
            upserts: vec![],
            removals: vec![],
            version: view.version,
            accepted_at_ms: view.accepted_at_ms,
            more: false,
        };
        let mut msg = ConfigUpdate { snapshot, ..empty.clone() };
        let mut size = 0;
        // A part's size counts names and JSON (a removal's name is about all it carries).
        let removals = removals.iter().map(|id| (id, None));
        for (id, json) in removals.chain(upserts.map(|(id, j)| (id, Some(j)))) {
            if size >= self.part_bytes {
                let part = std::mem::replace(&mut msg, empty.clone());
                if !self.send(ConfigUpdate { more: true, ..part }).await {
                    return false;
                }
                size = 0;
            }
            size += id.namespace.len() + id.name.len() + 8;
            match json {
                Some(j) => {
                    size += j.len();
                    msg.upserts.push(id.clone().with_json(j.to_string()));
                }
                None => msg.removals.push(id.key()),
            }
        }
        self.send(msg).await
    }
}

/// Gives the heap's free pages back to the system, at most once every few seconds. The
/// allocator keeps what a burst of work freed (a storm of snapshots, a model rebuilt), and the
/// controller's resident memory would stay at its high-water mark. Call from a blocking thread:
/// it walks the allocator's arenas.
pub fn release_free_memory() {
    static LAST: std::sync::Mutex<Option<std::time::Instant>> = std::sync::Mutex::new(None);
    let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
    if last.is_some_and(|t| t.elapsed() < Duration::from_secs(5)) {
        return;
    }
    *last = Some(std::time::Instant::now());
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
        let caller = self.auth.authenticate(cred).await.map_err(|e| {
            tracing::warn!(reason = e.reason(), "config watch refused: {e}");
            e.status()
        })?;
        // An agent that does not gather parts (it predates them) gets each update whole, as
        // before: applied part by part, it would hold a partial configuration in between.
        let part_bytes = if req.get_ref().accepts_parts { PART_BYTES } else { usize::MAX };
        tracing::info!(caller = %caller, accepts_parts = req.get_ref().accepts_parts, "agent watching configuration");
        // A gateway is sent what every node shares, and no node's own part.
        let node = caller.view_node().to_owned();
        let mut rx = self.views.clone();
        // One part waiting at most: a slow agent holds back its own stream, and the controller
        // holds about two parts for it (this one, and the one being sent).
        let (tx, out) = tokio::sync::mpsc::channel(1);
        let snapshots = self.snapshots.clone();
        tokio::spawn(async move {
            // The view last sent (its seq), and the node's own part as sent.
            let mut sent: Option<(u64, Resources)> = None;
            loop {
                let view = rx.borrow_and_update().clone();
                let (update, mine) = view.update_for(&node, sent.as_ref().map(|(v, r)| (*v, r)));
                let mut parts = Parts { tx: &tx, part_bytes, turn: None };
                let alive = match update {
                    None => true,
                    Some(Update::Snapshot) => {
                        let Ok(turn) = snapshots.acquire().await else { return };
                        parts.turn = Some((turn, tokio::time::Instant::now() + TURN));
                        // The turn is held until the last part has been taken for sending.
                        let ok = parts.update(&view, true, view.snapshot(&mine), &[]).await && parts.finish().await;
                        drop(parts);
                        if snapshots.available_permits() == SNAPSHOTS_AT_ONCE {
                            // The last of a burst of snapshots: what they held goes back.
                            tokio::task::spawn_blocking(release_free_memory);
                        }
                        ok
                    }
                    Some(Update::Delta { upserts, removals }) => {
                        parts.update(&view, false, upserts.iter().map(|(id, j)| (id, j)), &removals).await
                    }
                };
                if !alive {
                    tracing::info!(caller = %caller, "agent stopped watching");
                    return;
                }
                sent = Some((view.seq, mine));
                // An agent that went away ends its task now, not at the next change for it.
                tokio::select! {
                    r = rx.changed() => if r.is_err() { return },
                    () = tx.closed() => {
                        tracing::info!(caller = %caller, "agent stopped watching");
                        return;
                    }
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
    fn a_large_snapshot_goes_out_in_parts() {
        let text: String = (0..3_000)
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
        m.workloads = Arc::new(c.workloads.into_iter().map(|w| (w.key(), Arc::new(w))).collect());
        let view = View::build(Arc::new(m), "sockmesh-system", None);
        let mine = view.node_part("n1");
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let parts = rt.block_on(async {
            let (tx, mut rx) = tokio::sync::mpsc::channel(100);
            let mut parts = Parts { tx: &tx, part_bytes: PART_BYTES, turn: None };
            assert!(parts.update(&view, true, view.snapshot(&mine), &[]).await);
            // Removals count towards a part too: ten thousand of them are not one message.
            let gone: Vec<ResourceId> = (0..10_000)
                .map(|i| ResourceId::new(mesh_api::push::Kind::Workload, "ns", format!("gone-{i}")))
                .collect();
            assert!(parts.update(&view, false, std::iter::empty(), &gone).await);
            drop(parts);
            drop(tx);
            let mut parts = vec![];
            while let Some(p) = rx.recv().await {
                parts.push(p.unwrap());
            }
            let delta = parts.split_off(parts.iter().position(|p| !p.removals.is_empty()).unwrap());
            assert!(delta.len() >= 2 && delta.iter().all(|p| !p.snapshot), "{} parts of removals", delta.len());
            assert_eq!(delta.iter().map(|p| p.removals.len()).sum::<usize>(), 10_000);
            assert!(delta[..delta.len() - 1].iter().all(|p| p.more) && !delta[delta.len() - 1].more);
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
        assert_eq!((names.len(), parts.iter().map(|p| p.upserts.len()).sum::<usize>()), (3_000, 3_000));
    }
}
