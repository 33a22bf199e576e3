//! The gRPC certificate service: authenticate the node, check the CSR, authorize the identity
//! against the placement, sign. Every refusal is logged with its reason and counted; no
//! credential, key or CSR content is ever logged.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_identity::ca::{Ca, CaError};
use mesh_identity::proto::certificate_service_server::CertificateService;
use mesh_identity::proto::{
    CreateCertificateRequest, CreateCertificateResponse, GetTrustBundleRequest, GetTrustBundleResponse,
};
use tonic::{Request, Response, Status};

use crate::auth::{AuthError, NodeAuthenticator};
use crate::placement;

pub struct CaService {
    pub ca: Arc<Ca>,
    pub auth: Arc<dyn NodeAuthenticator>,
    pub placement: placement::Shared,
    pub stats: Arc<Stats>,
}

#[derive(Default)]
pub struct Stats {
    pub signed: Mutex<BTreeMap<String, u64>>,
    pub refused: Mutex<BTreeMap<&'static str, u64>>,
}

impl Stats {
    fn refuse(&self, reason: &'static str) {
        *self.refused.lock().unwrap().entry(reason).or_default() += 1;
    }
}

fn bearer(req: &Request<CreateCertificateRequest>) -> Result<&str, AuthError> {
    let v = req.metadata().get("authorization").ok_or(AuthError::Missing)?;
    let s = v.to_str().map_err(|_| AuthError::Missing)?;
    s.strip_prefix("Bearer ").ok_or(AuthError::Missing)
}

#[tonic::async_trait]
impl CertificateService for CaService {
    async fn create_certificate(
        &self,
        req: Request<CreateCertificateRequest>,
    ) -> Result<Response<CreateCertificateResponse>, Status> {
        let node = match bearer(&req) {
            Ok(cred) => self.auth.authenticate(cred).await,
            Err(e) => Err(e),
        };
        let node = match node {
            Ok(n) => n,
            Err(e) => {
                self.stats.refuse(e.reason());
                tracing::warn!(reason = e.reason(), "certificate request refused: {e}");
                return Err(Status::unauthenticated(e.to_string()));
            }
        };
        let body = req.into_inner();
        let ttl =
            (body.validity_duration_seconds > 0).then(|| Duration::from_secs(body.validity_duration_seconds as u64));
        let placement = self.placement.read().unwrap().clone();
        let signed = self.ca.sign(&body.csr, ttl, |id| {
            let (ns, sa) = id.workload_parts().expect("checked workload ID");
            placement.authorize(&node, ns, sa)
        });
        match signed {
            Ok((id, chain)) => {
                *self.stats.signed.lock().unwrap().entry(id.to_string()).or_default() += 1;
                tracing::info!(node, identity = %id, "certificate signed");
                Ok(Response::new(CreateCertificateResponse { cert_chain: chain }))
            }
            Err(e) => {
                self.stats.refuse(e.reason());
                tracing::warn!(node, reason = e.reason(), "certificate request refused: {e}");
                Err(match e {
                    CaError::Unauthorized(_) => Status::permission_denied(e.to_string()),
                    CaError::Config(_) => Status::internal("the CA cannot sign right now"),
                    _ => Status::invalid_argument(e.to_string()),
                })
            }
        }
    }

    async fn get_trust_bundle(
        &self,
        _req: Request<GetTrustBundleRequest>,
    ) -> Result<Response<GetTrustBundleResponse>, Status> {
        Ok(Response::new(GetTrustBundleResponse { roots: self.ca.roots_pem().to_vec() }))
    }
}
