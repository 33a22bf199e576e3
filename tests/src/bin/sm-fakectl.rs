//! A test fixture, never shipped: a stand-in controller that pushes a scripted sequence of
//! configuration updates, so that a test can send an agent what the real controller never
//! would (an update the agent cannot decode). It serves the same two gRPC services on TLS:
//! certificates for any workload CSR (from a root it generates), and the configuration watch,
//! which replays the script to every agent that connects.
//!
//!   sm-fakectl --listen IP:PORT --state-dir DIR --script FILE
//!
//! DIR receives trust-bundle.pem (the agents' --trust-bundle). FILE is JSON: a list of
//! `{"delayMs": N, "update": {"snapshot": bool, "version": N, "upserts": [{"kind": K,
//! "namespace": "", "name": "", "json": ""}], "removals": [{"kind": K, "namespace": "",
//! "name": ""}]}}` with kinds as the protocol's numbers.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use mesh_api::push::config_service_server::{ConfigService, ConfigServiceServer};
use mesh_api::push::{ConfigUpdate, Resource, ResourceKey, WatchRequest};
use mesh_identity::ca::Ca;
use mesh_identity::proto::certificate_service_server::{CertificateService, CertificateServiceServer};
use mesh_identity::proto::{
    CreateCertificateRequest, CreateCertificateResponse, GetTrustBundleRequest, GetTrustBundleResponse,
};
use serde::Deserialize;
use tonic::{Request, Response, Status};

#[derive(Deserialize, Clone)]
#[serde(rename_all = "camelCase")]
struct Step {
    delay_ms: u64,
    update: Update,
}

#[derive(Deserialize, Clone)]
struct Update {
    #[serde(default)]
    snapshot: bool,
    version: u64,
    #[serde(default)]
    upserts: Vec<Res>,
    #[serde(default)]
    removals: Vec<Res>,
}

#[derive(Deserialize, Clone)]
struct Res {
    kind: i32,
    namespace: String,
    name: String,
    #[serde(default)]
    json: String,
}

impl Update {
    fn message(&self) -> ConfigUpdate {
        ConfigUpdate {
            snapshot: self.snapshot,
            version: self.version,
            accepted_at_ms: 0,
            more: false,
            upserts: self
                .upserts
                .iter()
                .map(|r| Resource {
                    kind: r.kind,
                    namespace: r.namespace.clone(),
                    name: r.name.clone(),
                    json: r.json.clone(),
                })
                .collect(),
            removals: self
                .removals
                .iter()
                .map(|r| ResourceKey { kind: r.kind, namespace: r.namespace.clone(), name: r.name.clone() })
                .collect(),
        }
    }
}

struct Ca2(Arc<Ca>);

#[tonic::async_trait]
impl CertificateService for Ca2 {
    async fn create_certificate(
        &self,
        req: Request<CreateCertificateRequest>,
    ) -> Result<Response<CreateCertificateResponse>, Status> {
        let r = req.into_inner();
        let ttl = (r.validity_duration_seconds > 0).then(|| Duration::from_secs(r.validity_duration_seconds as u64));
        let (_, chain) = self.0.sign(&r.csr, ttl, |_| Ok(())).map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(CreateCertificateResponse { cert_chain: chain }))
    }

    async fn get_trust_bundle(
        &self,
        _req: Request<GetTrustBundleRequest>,
    ) -> Result<Response<GetTrustBundleResponse>, Status> {
        Ok(Response::new(GetTrustBundleResponse { roots: self.0.roots_pem().to_vec() }))
    }
}

struct Script(Vec<Step>);

type Stream = Pin<Box<dyn tokio_stream::Stream<Item = Result<ConfigUpdate, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl ConfigService for Script {
    type WatchStream = Stream;

    async fn watch(&self, _req: Request<WatchRequest>) -> Result<Response<Stream>, Status> {
        let steps = self.0.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            for s in steps {
                tokio::time::sleep(Duration::from_millis(s.delay_ms)).await;
                if tx.send(Ok(s.update.message())).await.is_err() {
                    return;
                }
            }
            // Then the stream stays open, as the controller's does.
            tx.closed().await;
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let listen: SocketAddr = arg("--listen").expect("--listen IP:PORT").parse()?;
    let dir = std::path::PathBuf::from(arg("--state-dir").expect("--state-dir DIR"));
    let script: Vec<Step> = serde_json::from_str(&std::fs::read_to_string(arg("--script").expect("--script FILE"))?)?;
    let td = "cluster.local";
    let root = Ca::generate_root(td)?;
    let day = Duration::from_secs(86_400);
    let ca = Arc::new(Ca::from_pem(td, &root.cert_pem, &root.key_pem, "", day, day)?);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("trust-bundle.pem"), &root.cert_pem)?;
    let (chain, key) = ca.issue_server_cert(&["mesh-controller".to_owned()], &[listen.ip()], None)?;
    let identity = tonic::transport::Identity::from_pem(chain.concat(), key);
    eprintln!("{}", serde_json::json!({"message": "controller ready"}));
    tonic::transport::Server::builder()
        .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))?
        .add_service(CertificateServiceServer::new(Ca2(ca)))
        .add_service(ConfigServiceServer::new(Script(script)))
        .serve(listen)
        .await?;
    Ok(())
}
