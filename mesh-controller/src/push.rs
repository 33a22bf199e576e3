//! The configuration push: one server stream per watching agent, a snapshot of what its node
//! needs, then a delta for every accepted change. An agent that reconnects gets a fresh
//! snapshot.

use std::pin::Pin;
use std::sync::Arc;

use mesh_api::push::config_service_server::ConfigService;
use mesh_api::push::{ConfigUpdate, ResourceId, WatchRequest};
use tokio::sync::watch;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::auth::NodeAuthenticator;
use crate::model::{diff, Model, Resources};

pub struct ConfigPush {
    pub auth: Arc<dyn NodeAuthenticator>,
    pub model: watch::Receiver<Arc<Model>>,
    pub root_namespace: String,
}

fn update(snapshot: bool, ups: Vec<(ResourceId, String)>, rem: Vec<ResourceId>, m: &Model) -> ConfigUpdate {
    ConfigUpdate {
        snapshot,
        upserts: ups.into_iter().map(|(id, json)| id.with_json(json)).collect(),
        removals: rem.iter().map(ResourceId::key).collect(),
        version: m.version,
        accepted_at_ms: m.accepted_at_ms,
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
        let mut rx = self.model.clone();
        let root = self.root_namespace.clone();
        let (tx, out) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            let mut last = Resources::new();
            let mut first = true;
            loop {
                let m = rx.borrow_and_update().clone();
                let now = m.resources_for(&node, &root);
                let msg = if first {
                    Some(update(true, now.clone().into_iter().collect(), vec![], &m))
                } else {
                    let (ups, rem) = diff(&last, &now);
                    (!ups.is_empty() || !rem.is_empty()).then(|| update(false, ups, rem, &m))
                };
                if let Some(msg) = msg {
                    if tx.send(Ok(msg)).await.is_err() {
                        tracing::info!(node, "agent stopped watching");
                        return;
                    }
                }
                last = now;
                first = false;
                if rx.changed().await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out))))
    }
}
