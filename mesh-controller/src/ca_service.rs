//! The gRPC certificate service: authenticate the node, check the CSR, authorize the identity
//! against the placement, sign. Every refusal is logged with its reason and counted; no
//! credential, key or CSR content is ever logged.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_identity::ca::CaError;
use mesh_identity::proto::certificate_service_server::CertificateService;
use mesh_identity::proto::{
    CreateCertificateRequest, CreateCertificateResponse, GetTrustBundleRequest, GetTrustBundleResponse,
};
use tonic::{Request, Response, Status};

use crate::auth::{AuthError, Caller, NodeAuthenticator};
use crate::placement;

pub struct CaService {
    /// The CA of each mesh, chosen by the trust domain a request asks for.
    pub signers: crate::meshes::SharedSigners,
    /// The default mesh's roots (GetTrustBundle).
    pub default_roots: Vec<String>,
    pub auth: Arc<dyn NodeAuthenticator>,
    pub placement: placement::Shared,
    pub stats: Arc<Stats>,
    /// The zone's east-west gateway's service account (namespace, name), in the default mesh:
    /// the one identity a caller proven to be the gateway may obtain.
    pub gateway: Option<(String, String)>,
}

impl CaService {
    /// Whether `caller` may have the identity `namespace/service_account` of `mesh`; if not, why.
    fn authorize(
        &self,
        placement: &placement::Placement,
        caller: &Caller,
        mesh: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<(), String> {
        match caller {
            Caller::Node(node) => placement.authorize(node, mesh, namespace, service_account),
            Caller::Gateway { .. } => match &self.gateway {
                Some((ns, sa)) if mesh == mesh_model::mesh::DEFAULT_MESH && ns == namespace && sa == service_account => Ok(()),
                _ => Err(format!("the zone's gateway may have its own identity only, not {namespace}/{service_account} of mesh {mesh}")),
            },
        }
    }
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

    /// OpenMetrics text: sockmesh_ca_certificates_signed_total{identity},
    /// sockmesh_ca_requests_refused_total{reason}.
    pub fn encode(&self) -> String {
        use prometheus_client::metrics::counter::Counter;
        use prometheus_client::metrics::family::Family;
        let signed: Family<Vec<(String, String)>, Counter> = Family::default();
        for (id, n) in self.signed.lock().unwrap().iter() {
            signed.get_or_create(&vec![("identity".into(), id.clone())]).inc_by(*n);
        }
        let refused: Family<Vec<(String, String)>, Counter> = Family::default();
        for (reason, n) in self.refused.lock().unwrap().iter() {
            refused.get_or_create(&vec![("reason".into(), reason.to_string())]).inc_by(*n);
        }
        let mut r = prometheus_client::registry::Registry::with_prefix("sockmesh_ca");
        r.register("certificates_signed", "Workload certificates signed, by identity", signed);
        r.register("requests_refused", "Certificate requests refused, by reason", refused);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &r).expect("writing to a String");
        out
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
        let caller = match bearer(&req) {
            Ok(cred) => self.auth.authenticate(cred).await,
            Err(e) => Err(e),
        };
        let caller = match caller {
            Ok(n) => n,
            Err(e) => {
                self.stats.refuse(e.reason());
                tracing::warn!(reason = e.reason(), "certificate request refused: {e}");
                return Err(e.status());
            }
        };
        let body = req.into_inner();
        let ttl =
            (body.validity_duration_seconds > 0).then(|| Duration::from_secs(body.validity_duration_seconds as u64));
        // The placement in force, not a copy of it: at a hundred thousand workloads a copy per
        // request was most of the CA's work.
        let placement = Arc::clone(&self.placement.read().unwrap());
        // The trust domain asked for picks the mesh's CA; the node must run a workload of that
        // mesh with that identity.
        let signed = mesh_identity::ca::parse_csr(&body.csr).and_then(|(id, _)| {
            let signer = self.signers.read().unwrap().for_trust_domain(id.trust_domain()).cloned();
            let Some(signer) = signer else {
                return Err(CaError::WrongTrustDomain {
                    got: id.trust_domain().to_owned(),
                    want: "the trust domain of a mesh of this controller".into(),
                });
            };
            // A mesh's lifetime caps what the agent asks for, as --max-cert-ttl does.
            let ttl = match (ttl, signer.ttl) {
                (Some(asked), Some(mesh)) => Some(asked.min(mesh)),
                (asked, mesh) => asked.or(mesh),
            };
            signer.ca.sign(&body.csr, ttl, |id| {
                let (ns, sa) = id.workload_parts().expect("checked workload ID");
                self.authorize(&placement, &caller, &signer.mesh, ns, sa)
            })
        });
        match signed {
            Ok((id, chain)) => {
                *self.stats.signed.lock().unwrap().entry(id.to_string()).or_default() += 1;
                tracing::info!(caller = %caller, identity = %id, "certificate signed");
                Ok(Response::new(CreateCertificateResponse { cert_chain: chain }))
            }
            Err(e) => {
                self.stats.refuse(e.reason());
                tracing::warn!(caller = %caller, reason = e.reason(), "certificate request refused: {e}");
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
        Ok(Response::new(GetTrustBundleResponse { roots: self.default_roots.clone() }))
    }
}

#[cfg(test)]
mod tests {
    //! The CA over real gRPC and TLS on loopback: what a node may and may not obtain.
    use super::*;
    use crate::auth::StaticCredentials;
    use mesh_identity::ca::workload_csr;
    use mesh_identity::proto::certificate_service_client::CertificateServiceClient;
    use mesh_identity::proto::certificate_service_server::CertificateServiceServer;
    use mesh_identity::verify::{pem_to_ders, TrustBundle};
    use mesh_identity::SpiffeId;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType, PKCS_ECDSA_P256_SHA256};
    use std::path::Path;

    const N1: &str = "n1-credential-0123456789";
    const N2: &str = "n2-credential-0123456789";

    struct Running {
        client: CertificateServiceClient<tonic::transport::Channel>,
        bundle: TrustBundle,
        stats: Arc<Stats>,
    }

    async fn start() -> Running {
        let (root, ca) = crate::meshes::test_ca("cluster.local");
        let ws = mesh_model::workload::parse_str(
            Path::new("w"),
            "kind: Workload\nname: a\nserviceAccount: sa-a\nips: [10.0.0.1]\nnode: n1\n---\nkind: Workload\nname: b\nserviceAccount: sa-b\nips: [10.0.0.2]\nnode: n2\n",
        )
        .unwrap();
        let placement = Arc::new(std::sync::RwLock::new(Arc::new(crate::placement::Placement::from_workloads(
            &ws.into_iter().map(Arc::new).collect::<Vec<_>>(),
        ))));
        let nodes = StaticCredentials::parse(
            "c",
            &format!("nodes:\n- {{name: n1, credential: {N1}}}\n- {{name: n2, credential: {N2}}}\n"),
        )
        .unwrap();
        let auth = Arc::new(WithGateway(nodes));
        let stats = Arc::new(Stats::default());
        let signers = Arc::new(std::sync::RwLock::new(crate::meshes::Signers::only_default(ca.clone())));
        let gateway = Some(("sockmesh-system".into(), "sockmesh-gateway".into()));
        let svc = CaService {
            signers,
            default_roots: ca.roots_pem().to_vec(),
            auth,
            placement,
            stats: stats.clone(),
            gateway,
        };
        let (chain, key) = ca.issue_server_cert(&["mesh-controller".into()], &[], None).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .tls_config(
                    tonic::transport::ServerTlsConfig::new()
                        .identity(tonic::transport::Identity::from_pem(chain.concat(), key)),
                )
                .unwrap()
                .add_service(CertificateServiceServer::new(svc))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&root.cert_pem))
            .domain_name("mesh-controller");
        let channel = tonic::transport::Channel::from_shared(format!("https://{addr}"))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .unwrap();
        Running {
            client: CertificateServiceClient::new(channel),
            bundle: TrustBundle::from_pems("cluster.local", &[root.cert_pem]).unwrap(),
            stats,
        }
    }

    /// The nodes' credentials, and [`GW`], which proves the zone's gateway on n1 (as its
    /// service account's token does on Kubernetes).
    struct WithGateway(StaticCredentials);
    const GW: &str = "gateway-token-0123456789";

    impl NodeAuthenticator for WithGateway {
        fn authenticate<'a>(&'a self, credential: &'a str) -> crate::auth::AuthFuture<'a> {
            match credential {
                GW => Box::pin(async { Ok(Caller::Gateway { node: "n1".into() }) }),
                c => self.0.authenticate(c),
            }
        }
    }

    async fn ask(r: &Running, credential: Option<&str>, csr: String) -> Result<Vec<String>, tonic::Status> {
        let mut req = tonic::Request::new(CreateCertificateRequest { csr, validity_duration_seconds: 0 });
        if let Some(c) = credential {
            req.metadata_mut().insert("authorization", format!("Bearer {c}").parse().unwrap());
        }
        r.client.clone().create_certificate(req).await.map(|r| r.into_inner().cert_chain)
    }

    fn csr_for(id: &str) -> String {
        workload_csr(&SpiffeId::parse_workload(id).unwrap()).unwrap().1
    }

    fn csr_with(tweak: impl FnOnce(&mut CertificateParams)) -> String {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![SanType::URI("spiffe://cluster.local/ns/default/sa/sa-a".try_into().unwrap())];
        tweak(&mut p);
        p.serialize_request(&key).unwrap().pem().unwrap()
    }

    #[tokio::test]
    async fn a_node_gets_its_own_workloads_identities_and_nothing_else() {
        let r = start().await;
        let chain = ask(&r, Some(N1), csr_for("spiffe://cluster.local/ns/default/sa/sa-a")).await.unwrap();
        let ders = pem_to_ders(&chain.concat());
        let want = SpiffeId::parse_workload("spiffe://cluster.local/ns/default/sa/sa-a").unwrap();
        r.bundle
            .verify(
                &ders[0],
                &ders[1..],
                mesh_identity::verify::KeyUsage::client_auth(),
                rustls_pki_types::UnixTime::now(),
                Some(&want),
            )
            .unwrap();

        // n1 asking for b's identity, which runs on n2.
        let e = ask(&r, Some(N1), csr_for("spiffe://cluster.local/ns/default/sa/sa-b")).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
        assert!(e.message().contains("n2"), "{e:?}");
        // An unknown credential, and none at all.
        let e = ask(&r, Some("not-a-real-node-credential"), csr_for("spiffe://cluster.local/ns/default/sa/sa-a"))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        let e = ask(&r, None, csr_for("spiffe://cluster.local/ns/default/sa/sa-a")).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        // Malformed or overreaching CSRs, from an authenticated node.
        let two = csr_with(|p| {
            p.subject_alt_names.push(SanType::URI("spiffe://cluster.local/ns/default/sa/x".try_into().unwrap()))
        });
        let dns = csr_with(|p| p.subject_alt_names = vec![SanType::DnsName("a.default".try_into().unwrap())]);
        let https = csr_with(|p| p.subject_alt_names = vec![SanType::URI("https://a.example".try_into().unwrap())]);
        let ca = csr_with(|p| p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained));
        for (name, csr) in [("two SANs", two), ("DNS SAN", dns), ("non-SPIFFE URI", https), ("CA:true", ca)] {
            let e = ask(&r, Some(N1), csr).await.unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{name}: {e:?}");
        }
        let refused = r.stats.refused.lock().unwrap().clone();
        assert_eq!(refused.get("unauthorized"), Some(&1), "{refused:?}");
        assert_eq!(refused.get("unknown_credential"), Some(&1), "{refused:?}");
        assert_eq!(refused.get("missing_credential"), Some(&1), "{refused:?}");
        assert_eq!(refused.get("san_count"), Some(&1), "{refused:?}");
        assert_eq!(refused.get("ca_requested"), Some(&1), "{refused:?}");
    }

    /// The zone's gateway gets its own identity, which no placement names, and nothing else:
    /// not the identities of the workloads on its node, nor a node's own.
    #[tokio::test]
    async fn the_zone_gateway_gets_its_own_identity_and_nothing_else() {
        let r = start().await;
        let id = "spiffe://cluster.local/ns/sockmesh-system/sa/sockmesh-gateway";
        let chain = ask(&r, Some(GW), csr_for(id)).await.unwrap();
        let ders = pem_to_ders(&chain.concat());
        let want = SpiffeId::parse_workload(id).unwrap();
        let usage = mesh_identity::verify::KeyUsage::client_auth();
        r.bundle.verify(&ders[0], &ders[1..], usage, rustls_pki_types::UnixTime::now(), Some(&want)).unwrap();
        // sa-a runs on the gateway's node: a node's agent may have it, the gateway may not.
        let e = ask(&r, Some(GW), csr_for("spiffe://cluster.local/ns/default/sa/sa-a")).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
        assert!(e.message().contains("gateway"), "{e:?}");
        // And a node's credential does not give the gateway's identity (no workload of it).
        let e = ask(&r, Some(N1), csr_for(id)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    }
}
