//! The label sets of the agent's metrics. Istio's TCP labels are derived from a connection's
//! record here and nowhere else.

use prometheus_client::encoding::EncodeLabelSet;

use crate::outcome::{ConnRecord, Outcome, Peer};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    /// The meshes of the two ends ("unknown" where the workload is not known).
    pub source_mesh: String,
    pub destination_mesh: String,
    /// Istio's Service labels: the Service the client connected to (its host name, name and
    /// namespace), "unknown" for a connection made to a workload's own address.
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    pub connection_security_policy: &'static str,
    pub response_flags: &'static str,
    pub request_protocol: &'static str,
}

impl TcpLabels {
    /// Istio's labels for a connection: derived here and nowhere else.
    pub fn of(rec: &ConnRecord, outcome: &Outcome) -> TcpLabels {
        fn workload(p: &Peer) -> (String, String) {
            match &p.workload {
                Some(w) => (w.workload.name.clone(), w.workload.namespace.clone()),
                None => ("unknown".into(), "unknown".into()),
            }
        }
        fn mesh(p: &Peer) -> String {
            p.workload.as_ref().map(|w| w.mesh().to_owned()).unwrap_or_else(|| "unknown".into())
        }
        fn principal(p: &Peer) -> String {
            p.principal.as_ref().map(|id| id.to_string()).unwrap_or_else(|| "unknown".into())
        }
        let (source_workload, source_workload_namespace) = workload(&rec.src);
        let (destination_workload, destination_workload_namespace) = workload(&rec.dst);
        let (destination_service, destination_service_name, destination_service_namespace) = match &rec.service {
            Some(s) => (s.host.clone(), s.service.name.clone(), s.service.namespace.clone()),
            None => ("unknown".into(), "unknown".into(), "unknown".into()),
        };
        TcpLabels {
            reporter: rec.direction.reporter(),
            source_workload,
            source_workload_namespace,
            source_principal: principal(&rec.src),
            destination_workload,
            destination_workload_namespace,
            destination_principal: principal(&rec.dst),
            source_mesh: mesh(&rec.src),
            destination_mesh: mesh(&rec.dst),
            destination_service,
            destination_service_name,
            destination_service_namespace,
            connection_security_policy: rec.security.as_str(),
            response_flags: match outcome {
                Outcome::Ok => "-",
                Outcome::Refused(r) => r.label(),
            },
            request_protocol: "tcp",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub direction: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IdentityLabels {
    pub identity: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabels {
    pub map: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    pub event: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    pub limit: &'static str,
}
