//! Which identities each node may obtain: those of the workloads the controller's model places
//! on it (the node-authorization rule of Istio's CA).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use mesh_model::Workload;

#[derive(Debug, Default, Clone)]
pub struct Placement {
    /// node -> its workloads: the model's own records, shared, not copies of their names.
    by_node: HashMap<String, Vec<Arc<Workload>>>,
}

fn is(w: &Workload, mesh: &str, namespace: &str, service_account: &str) -> bool {
    w.mesh.as_deref().unwrap_or(mesh_model::mesh::DEFAULT_MESH) == mesh
        && w.namespace == namespace
        && w.service_account == service_account
}

impl Placement {
    pub fn from_workloads<'a>(ws: impl IntoIterator<Item = &'a Arc<Workload>>) -> Self {
        let mut by_node: HashMap<String, Vec<Arc<Workload>>> = HashMap::new();
        for w in ws {
            if let Some(node) = &w.node {
                by_node.entry(node.clone()).or_default().push(w.clone());
            }
        }
        Placement { by_node }
    }

    /// Ok when a workload of `mesh` with this identity runs on `node`; otherwise why not.
    pub fn authorize(&self, node: &str, mesh: &str, namespace: &str, service_account: &str) -> Result<(), String> {
        let here = self.by_node.get(node).into_iter().flatten();
        if here.clone().any(|w| is(w, mesh, namespace, service_account)) {
            return Ok(());
        }
        let mut elsewhere: Vec<&str> = self
            .by_node
            .iter()
            .filter(|(_, ws)| ws.iter().any(|w| is(w, mesh, namespace, service_account)))
            .map(|(n, _)| n.as_str())
            .collect();
        elsewhere.sort();
        if elsewhere.is_empty() {
            Err(format!(
                "no workload of mesh {mesh} with service account {namespace}/{service_account} is placed on any node"
            ))
        } else {
            Err(format!(
                "node {node} runs no workload with service account {namespace}/{service_account} (it runs on {})",
                elsewhere.join(", ")
            ))
        }
    }
}

pub type Shared = Arc<RwLock<Arc<Placement>>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_may_have_only_identities_of_its_own_workloads() {
        let ws = mesh_model::workload::parse_str(
            std::path::Path::new("w"),
            "kind: Workload\nname: a\nserviceAccount: sa-a\nips: [10.0.0.1]\nnode: n1\n---\nkind: Workload\nname: b\nserviceAccount: sa-b\nips: [10.0.0.2]\nnode: n2\n",
        )
        .unwrap();
        let ws: Vec<Arc<Workload>> = ws.into_iter().map(Arc::new).collect();
        let p = Placement::from_workloads(&ws);
        assert!(p.authorize("n1", "default", "default", "sa-a").is_ok());
        let e = p.authorize("n1", "default", "default", "sa-b").unwrap_err();
        assert!(e.contains("runs on n2"), "{e}");
        assert!(p.authorize("n3", "default", "default", "sa-a").is_err());
        assert!(p.authorize("n1", "default", "other", "sa-a").is_err());
        // The same names in another mesh are another identity.
        assert!(p.authorize("n1", "payments", "default", "sa-a").is_err());
    }
}
