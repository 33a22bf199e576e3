//! What the push sends, worked out once per model version and shared by every node's stream.
//!
//! Every node is sent every workload, Service and mesh (to resolve destinations and their
//! identities) and what the controller rejected: that part is the same for all, so it is
//! serialised once per version — and only where the object changed since the last version —
//! and its changes since a recent version are kept as a list of what changed. A node's own
//! part (the policies that select its workloads, the PeerAuthentications of their namespaces)
//! is small and is worked out per node from an index built once per version.
//!
//! So a change costs each node's stream a walk of what changed, not of the cluster, and the
//! controller holds one copy of the cluster's JSON, not one per node.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use mesh_api::push::{Kind, ResourceId};
use mesh_model::authz::{Compiled, PolicyIndex};

use crate::model::{Key, Model};

/// Resources as pushed: identity -> JSON, the JSON shared between versions and nodes.
pub type Resources = BTreeMap<ResourceId, Arc<str>>;

/// How many versions back a stream can be and still get a delta (it gets a snapshot past that).
const HISTORY: usize = 64;

/// A delta changing more shared resources than this (and more than a quarter of them) is sent
/// as a snapshot instead.
const BIG_DELTA: usize = 1000;

/// The change from view `from` (its [`View::seq`]) to the next view: the shared resources that were upserted
/// or removed (what they are now is in the view), and which nodes' own parts may have changed.
struct Step {
    from: u64,
    changed: Vec<ResourceId>,
    parts: PartChanges,
}

/// Which nodes' own parts may have changed: those with a workload in `namespaces` (whose
/// policies or PeerAuthentications changed), those in `nodes` (whose workloads changed), or
/// every node (`all`: a change in the root namespace).
#[derive(Default)]
struct PartChanges {
    all: bool,
    namespaces: BTreeSet<String>,
    nodes: BTreeSet<String>,
}

impl PartChanges {
    /// Records a change of policy or PeerAuthentication in `ns`.
    fn namespace(&mut self, ns: &str, root_namespace: &str) {
        if ns == root_namespace {
            self.all = true;
        }
        self.namespaces.insert(ns.to_owned());
    }

    /// Records a node whose workloads changed.
    fn node(&mut self, w: Option<&mesh_model::Workload>) {
        if let Some(n) = w.and_then(|w| w.node.as_ref()) {
            self.nodes.insert(n.clone());
        }
    }
}

pub struct View {
    /// Counts the views built. Streams track what they were sent by it, not by the model's
    /// version: the mesh keeper may publish a model again with the same version and different
    /// contents (a Mesh admitted on a retry).
    pub seq: u64,
    pub version: u64,
    pub accepted_at_ms: i64,
    model: Arc<Model>,
    root_namespace: String,
    /// Pushed to every node: workloads, Services, what was rejected, meshes.
    shared: Arc<Resources>,
    /// The last changes to `shared`, oldest first, ending at this version.
    history: VecDeque<Arc<Step>>,
    authz: BTreeMap<Key, Arc<str>>,
    index: PolicyIndex,
    peer_auth: BTreeMap<Key, Arc<str>>,
    /// node -> its workloads.
    local: Arc<HashMap<String, Vec<Arc<mesh_model::Workload>>>>,
}

/// A node's update: the whole state (the shared resources and the node's own part), or what
/// changed.
pub enum Update {
    Snapshot,
    Delta { upserts: Vec<(ResourceId, Arc<str>)>, removals: Vec<ResourceId> },
}

/// The keys whose values differ between `old` and `new` (added, removed or changed).
fn changed_keys<'a, K: Ord, V: PartialEq>(
    old: &'a BTreeMap<K, V>,
    new: &'a BTreeMap<K, V>,
) -> impl Iterator<Item = &'a K> + 'a {
    let changed = new.iter().filter(move |(k, v)| old.get(*k) != Some(*v)).map(|(k, _)| k);
    changed.chain(old.keys().filter(move |k| !new.contains_key(*k)))
}

fn json<T: serde::Serialize>(v: &T) -> Arc<str> {
    serde_json::to_string(v).expect("model types serialise").into()
}

/// `json` of `now`, or the JSON `prev` already has for it when the object did not change.
fn reuse<T: serde::Serialize + PartialEq>(prev: Option<(&T, &Arc<str>)>, now: &T) -> Arc<str> {
    match prev {
        Some((p, j)) if p == now => j.clone(),
        _ => json(now),
    }
}

/// [`reuse`] for every object of a map: `before` the last model's objects, `json` the last
/// view's JSON of them.
fn reuse_all<T: serde::Serialize + PartialEq>(
    now: &BTreeMap<Key, T>,
    before: Option<&BTreeMap<Key, T>>,
    json: Option<&BTreeMap<Key, Arc<str>>>,
) -> BTreeMap<Key, Arc<str>> {
    now.iter()
        .map(|(k, s)| (k.clone(), reuse(before.and_then(|b| b.get(k)).zip(json.and_then(|j| j.get(k))), s)))
        .collect()
}

impl View {
    /// The view of `model`, reusing what `prev` serialised for objects that did not change.
    pub fn build(model: Arc<Model>, root_namespace: &str, prev: Option<&View>) -> View {
        let m = &*model;
        let pm = prev.map(|p| &*p.model);
        // Most changes are of policies: the workloads (shared records, compared by pointer) and
        // the rest of the shared part are then the last view's, taken whole.
        let same_workloads = pm.is_some_and(|pm| pm.workloads == m.workloads);
        let same_shared = same_workloads
            && pm.is_some_and(|pm| {
                pm.services == m.services && pm.errors == m.errors && pm.mesh_records == m.mesh_records
            });
        let shared = match prev {
            Some(p) if same_shared => p.shared.clone(),
            _ => Arc::new(Self::shared(m, prev)),
        };
        let mut history = prev.map(|p| p.history.clone()).unwrap_or_default();
        // No stream is ever sent version 0 (the controller serves once it has read its
        // configuration), so the step from it, the whole cluster, is not kept.
        if let (Some(p), Some(pm)) = (prev.filter(|p| p.version > 0), pm) {
            let mut changed = Vec::new();
            let mut parts = PartChanges::default();
            if !same_shared {
                // Unchanged objects share their JSON with the last view, so most comparisons
                // are of two pointers.
                let same = |a: &Arc<str>, b: &Arc<str>| Arc::ptr_eq(a, b) || a == b;
                changed = shared
                    .iter()
                    .filter(|(id, j)| !p.shared.get(*id).is_some_and(|o| same(o, j)))
                    .map(|(id, _)| id.clone())
                    .collect();
                changed.extend(p.shared.keys().filter(|id| !shared.contains_key(*id)).cloned());
            }
            if !same_workloads {
                for (k, w) in m.workloads.iter() {
                    let old = pm.workloads.get(k);
                    if old != Some(w) {
                        parts.node(Some(w));
                        parts.node(old.map(|w| &**w));
                    }
                }
                for (k, w) in pm.workloads.iter() {
                    if !m.workloads.contains_key(k) {
                        parts.node(Some(w));
                    }
                }
            }
            for (ns, _) in changed_keys(&pm.authz, &m.authz).chain(changed_keys(&pm.peer_auth, &m.peer_auth)) {
                parts.namespace(ns, root_namespace);
            }
            history.push_back(Arc::new(Step { from: p.seq, changed, parts }));
            while history.len() > HISTORY {
                history.pop_front();
            }
        }
        let authz = reuse_all(&m.authz, pm.map(|pm| &*pm.authz), prev.map(|p| &p.authz));
        let compiled = m.authz.iter().filter_map(|((ns, n), s)| Compiled::compile(ns, n, s).ok());
        let index = PolicyIndex::new(root_namespace, compiled);
        let peer_auth = reuse_all(&m.peer_auth, pm.map(|pm| &pm.peer_auth), prev.map(|p| &p.peer_auth));
        let local = match prev {
            Some(p) if same_workloads => p.local.clone(),
            _ => {
                let mut local: HashMap<String, Vec<Arc<mesh_model::Workload>>> = HashMap::new();
                for w in m.workloads.values() {
                    if let Some(node) = &w.node {
                        local.entry(node.clone()).or_default().push(w.clone());
                    }
                }
                Arc::new(local)
            }
        };
        View {
            seq: prev.map_or(0, |p| p.seq + 1),
            version: m.version,
            accepted_at_ms: m.accepted_at_ms,
            root_namespace: root_namespace.to_owned(),
            shared,
            history,
            authz,
            index,
            peer_auth,
            local,
            model,
        }
    }

    /// The part every node is sent, reusing `prev`'s JSON for what did not change.
    fn shared(m: &Model, prev: Option<&View>) -> Resources {
        let pm = prev.map(|p| &*p.model);
        let old = |id: &ResourceId| prev.and_then(|p| p.shared.get(id));
        let mut shared = Resources::new();
        for (k, w) in m.workloads.iter() {
            let id = ResourceId::new(Kind::Workload, &k.namespace, &k.name);
            let before = pm.and_then(|pm| pm.workloads.get(k));
            let j = match before.zip(old(&id)) {
                // The same record, shared with the last model: nothing to compare.
                Some((b, j)) if Arc::ptr_eq(b, w) => j.clone(),
                _ => reuse(before.map(|w| &**w).zip(old(&id)), &**w),
            };
            shared.insert(id, j);
        }
        for ((ns, n), s) in &m.services {
            let id = ResourceId::new(Kind::Service, ns, n);
            let j = reuse(pm.and_then(|pm| pm.services.get(&(ns.clone(), n.clone()))).zip(old(&id)), s);
            shared.insert(id, j);
        }
        // What the controller rejected, so that agents (and meshctl on any node) can show it.
        for (i, e) in m.errors.iter().enumerate() {
            let id = ResourceId::new(Kind::Rejected, "", format!("{i:04}"));
            let j = reuse(pm.and_then(|pm| pm.errors.get(i)).zip(old(&id)), e);
            shared.insert(id, j);
        }
        for (name, r) in &m.mesh_records {
            let id = ResourceId::new(Kind::Mesh, "", name);
            let j = reuse(pm.and_then(|pm| pm.mesh_records.get(name)).zip(old(&id)), r);
            shared.insert(id, j);
        }
        shared
    }

    /// What only `node` is sent: the policies that select its workloads, and the
    /// PeerAuthentications of the root namespace and of its workloads' namespaces.
    pub fn node_part(&self, node: &str) -> Resources {
        let mut out = Resources::new();
        let local = self.local.get(node).map(Vec::as_slice).unwrap_or_default();
        let mut namespaces = BTreeSet::new();
        for w in local {
            namespaces.insert(w.namespace.as_str());
            let mesh = w.mesh.as_deref().unwrap_or(mesh_model::mesh::DEFAULT_MESH);
            for name in self.index.for_workload_in(mesh, &w.namespace, &w.labels).names() {
                let Some((ns, n)) = name.split_once('/') else { continue };
                let key = (ns.to_owned(), n.to_owned());
                if let Some(j) = self.authz.get(&key) {
                    out.insert(ResourceId::new(Kind::AuthorizationPolicy, ns, n), j.clone());
                }
            }
        }
        namespaces.insert(self.root_namespace.as_str());
        for ns in namespaces {
            let from = (ns.to_owned(), String::new());
            for ((pns, n), j) in self.peer_auth.range(from..).take_while(|((pns, _), _)| pns == ns) {
                out.insert(ResourceId::new(Kind::PeerAuthentication, pns, n), j.clone());
            }
        }
        out
    }

    /// Everything a node is sent in a snapshot, given its own part: the shared resources, then
    /// its own, each once (a key in both is the node's own).
    pub fn snapshot<'a>(&'a self, mine: &'a Resources) -> impl Iterator<Item = (&'a ResourceId, &'a Arc<str>)> + 'a {
        self.shared.iter().filter(|(id, _)| !mine.contains_key(*id)).chain(mine.iter())
    }

    /// The steps since view `since`, or None when this view's history does not reach back
    /// that far (the stream then gets a snapshot).
    fn steps_since(&self, since: u64) -> Option<impl Iterator<Item = &Step>> {
        let first = match since == self.seq {
            true => self.history.len(),
            false => self.history.iter().position(|s| s.from == since)?,
        };
        Some(self.history.range(first..).map(|s| &**s))
    }

    /// Whether `node`'s own part may differ from what it was at the start of `steps`.
    fn part_changed<'a>(&self, node: &str, mut steps: impl Iterator<Item = &'a Step>) -> bool {
        let namespaces: BTreeSet<&str> =
            self.local.get(node).into_iter().flatten().map(|w| w.namespace.as_str()).collect();
        steps.any(|s| {
            let p = &s.parts;
            p.all || p.nodes.contains(node) || namespaces.iter().any(|ns| p.namespaces.contains(*ns))
        })
    }

    /// What to send a node that was last sent `sent` (the view's seq and its own part), or
    /// None when nothing it holds changed; and the node's own part now.
    pub fn update_for(&self, node: &str, sent: Option<(u64, &Resources)>) -> (Option<Update>, Resources) {
        let Some((since, last_mine)) = sent else {
            return (Some(Update::Snapshot), self.node_part(node));
        };
        let Some(steps) = self.steps_since(since) else {
            return (Some(Update::Snapshot), self.node_part(node));
        };
        let steps: Vec<&Step> = steps.collect();
        let changed: BTreeSet<&ResourceId> = steps.iter().flat_map(|s| s.changed.iter()).collect();
        // A change to much of the cluster goes as a snapshot: it waits its turn with the others
        // and is sent as it is read, where a delta is gathered whole for each node.
        if changed.len() > BIG_DELTA.max(self.shared.len() / 4) {
            return (Some(Update::Snapshot), self.node_part(node));
        }
        // A node's own part is worked out again only when something it depends on changed: a
        // change of one namespace's policy costs the nodes running none of its workloads nothing.
        let mine = match self.part_changed(node, steps.iter().copied()) {
            true => self.node_part(node),
            false => last_mine.clone(),
        };
        let mut upserts = Vec::new();
        let mut removals = Vec::new();
        for id in changed {
            match self.shared.get(id) {
                Some(j) => upserts.push((id.clone(), j.clone())),
                None => removals.push(id.clone()),
            }
        }
        for (id, j) in &mine {
            if last_mine.get(id) != Some(j) {
                upserts.push((id.clone(), j.clone()));
            }
        }
        removals.extend(last_mine.keys().filter(|id| !mine.contains_key(*id)).cloned());
        let update = (!upserts.is_empty() || !removals.is_empty()).then_some(Update::Delta { upserts, removals });
        (update, mine)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(version: u64, text: &str) -> Arc<Model> {
        let c = mesh_model::config_file::parse_file(std::path::Path::new("t.yaml"), text).unwrap();
        let mut m = Model { version, ..Default::default() };
        for w in c.workloads {
            Arc::make_mut(&mut m.workloads).insert(w.key(), Arc::new(w));
        }
        for p in c.authz {
            Arc::make_mut(&mut m.authz).insert((p.namespace.clone(), p.name.clone()), p.spec.clone());
        }
        for p in c.peer {
            m.peer_auth.insert((p.namespace.clone(), p.name.clone()), p.spec.clone());
        }
        Arc::new(m)
    }

    const WORKLOADS: &str = "kind: Workload\nname: a\nnamespace: x\nserviceAccount: sa-a\nips: [10.0.0.1]\nnode: n1\nlabels: {app: a}\n---\nkind: Workload\nname: b\nnamespace: y\nserviceAccount: sa-b\nips: [10.0.0.2]\nnode: n2\nlabels: {app: b}\n";

    fn policy(ns: &str, app: &str, principal: &str) -> String {
        format!("---\napiVersion: security.sockmesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: p-{app}, namespace: {ns}}}\nspec:\n  selector: {{matchLabels: {{app: {app}}}}}\n  action: DENY\n  rules:\n  - from:\n    - source: {{principals: [\"cluster.local/ns/{ns}/sa/{principal}\"]}}\n")
    }

    fn peer(ns: &str) -> String {
        format!("---\napiVersion: security.sockmesh.io/v1alpha1\nkind: PeerAuthentication\nmetadata: {{name: strict, namespace: {ns}}}\nspec: {{mtls: {{mode: STRICT}}}}\n")
    }

    fn ids(v: &View, u: &Update, mine: &Resources) -> (Vec<String>, Vec<String>) {
        match u {
            Update::Snapshot => (v.snapshot(mine).map(|(i, _)| i.to_string()).collect(), vec![]),
            Update::Delta { upserts, removals } => {
                (upserts.iter().map(|(i, _)| i.to_string()).collect(), removals.iter().map(|i| i.to_string()).collect())
            }
        }
    }

    /// A node's snapshot has every workload and its own policies only; a change to one node's
    /// policy is sent to that node alone, as that policy alone; a workload's change goes to
    /// every node; a node that fell behind gets what changed over all the versions it missed.
    #[test]
    fn each_node_is_sent_what_changed_that_concerns_it_and_nothing_else() {
        let root = "sockmesh-system";
        let text = |pa: &str| format!("{WORKLOADS}{}{}{}", policy("x", "a", pa), policy("y", "b", "q"), peer("y"));
        let v1 = View::build(model(1, &text("p")), root, None);
        let (snap, mine1) = v1.update_for("n1", None);
        let (names, _) = ids(&v1, &snap.unwrap(), &mine1);
        assert_eq!(
            names,
            ["KIND_WORKLOAD x/a", "KIND_WORKLOAD y/b", "KIND_AUTHORIZATION_POLICY x/p-a"],
            "n1 gets every workload and only the policy selecting its own"
        );
        let (_, mine2) = v1.update_for("n2", None);
        assert_eq!(
            mine2.keys().map(|i| i.to_string()).collect::<Vec<_>>(),
            ["KIND_AUTHORIZATION_POLICY y/p-b", "KIND_PEER_AUTHENTICATION y/strict"]
        );

        // One policy of n1's changes: n1 gets it alone, n2 nothing.
        let v2 = View::build(model(2, &text("changed")), root, Some(&v1));
        let (u1, mine1b) = v2.update_for("n1", Some((v1.seq, &mine1)));
        assert_eq!(ids(&v2, &u1.unwrap(), &mine1b), (vec!["KIND_AUTHORIZATION_POLICY x/p-a".to_owned()], vec![]));
        assert!(v2.update_for("n2", Some((v1.seq, &mine2))).0.is_none(), "n2 is sent nothing");
        assert!(
            Arc::ptr_eq(&v1.shared.values().next().unwrap().clone(), v2.shared.values().next().unwrap()),
            "unchanged JSON is reused"
        );

        // A workload moves and its label changes: every node gets it; n1 loses its policy.
        let moved = text("changed").replace("node: n1\nlabels: {app: a}", "node: n2\nlabels: {app: c}");
        let v3 = View::build(model(3, &moved), root, Some(&v2));
        let (u1, _) = v3.update_for("n1", Some((v2.seq, &mine1b)));
        assert_eq!(
            ids(&v3, &u1.unwrap(), &mine1b),
            (vec!["KIND_WORKLOAD x/a".to_owned()], vec!["KIND_AUTHORIZATION_POLICY x/p-a".to_owned()])
        );
        // n2, last sent version 1, gets versions 2 and 3 in one delta: only the workload.
        let (u2, _) = v3.update_for("n2", Some((v1.seq, &mine2)));
        assert_eq!(ids(&v3, &u2.unwrap(), &mine2), (vec!["KIND_WORKLOAD x/a".to_owned()], vec![]));
        // A removed workload is removed on every node.
        let v4 = View::build(
            model(4, &format!("{}{}", &WORKLOADS[WORKLOADS.find("---").unwrap()..], peer("y"))),
            root,
            Some(&v3),
        );
        let (u2, _) = v4.update_for("n2", Some((v3.seq, &mine2)));
        let (ups, rems) = ids(&v4, &u2.unwrap(), &mine2);
        assert!(
            rems.contains(&"KIND_WORKLOAD x/a".to_owned())
                && rems.contains(&"KIND_AUTHORIZATION_POLICY y/p-b".to_owned()),
            "{ups:?} {rems:?}"
        );
        // A view the history does not know gets a snapshot.
        assert!(matches!(v4.update_for("n2", Some((99, &mine2))).0, Some(Update::Snapshot)));
    }

    /// A policy in the root namespace applies mesh-wide: added, it reaches the node whose
    /// workload it selects in another namespace, and only that node's part changes.
    #[test]
    fn a_root_namespace_policy_reaches_the_nodes_it_selects_in_any_namespace() {
        let root = "sockmesh-system";
        let v1 = View::build(model(1, WORKLOADS), root, None);
        let (_, mine1) = v1.update_for("n1", None);
        let (_, mine2) = v1.update_for("n2", None);
        let v2 = View::build(model(2, &format!("{WORKLOADS}{}", policy(root, "b", "z"))), root, Some(&v1));
        assert!(v2.update_for("n1", Some((v1.seq, &mine1))).0.is_none());
        let (u2, _) = v2.update_for("n2", Some((v1.seq, &mine2)));
        assert_eq!(ids(&v2, &u2.unwrap(), &mine2), (vec![format!("KIND_AUTHORIZATION_POLICY {root}/p-b")], vec![]));
    }

    /// The mesh keeper may publish a model again under the same version with other contents
    /// (a Mesh admitted on a retry): the nodes still get what changed.
    #[test]
    fn a_model_published_again_under_its_version_still_reaches_the_nodes() {
        let root = "sockmesh-system";
        let v1 = View::build(model(1, WORKLOADS), root, None);
        let (_, mine1) = v1.update_for("n1", None);
        let v2 = View::build(model(1, &WORKLOADS.replace("10.0.0.2", "10.0.0.3")), root, Some(&v1));
        let (u, _) = v2.update_for("n1", Some((v1.seq, &mine1)));
        assert_eq!(ids(&v2, &u.expect("the change was sent"), &mine1), (vec!["KIND_WORKLOAD y/b".to_owned()], vec![]));
    }

    /// Past the history's length, a stream that was last sent an early version gets a snapshot
    /// (never a partial delta).
    #[test]
    fn a_stream_behind_the_history_gets_a_snapshot() {
        let root = "sockmesh-system";
        let mut v = View::build(model(1, WORKLOADS), root, None);
        let (_, mine) = v.update_for("n1", None);
        let first = v.seq;
        for i in 2..(HISTORY as u64 + 3) {
            let text = WORKLOADS.replace("10.0.0.1", &format!("10.0.1.{i}"));
            v = View::build(model(i, &text), root, Some(&v));
        }
        assert!(matches!(v.update_for("n1", Some((first, &mine))).0, Some(Update::Snapshot)));
        let last = v.seq - 1;
        assert!(matches!(v.update_for("n1", Some((last, &mine))).0, Some(Update::Delta { .. })));
    }
}
