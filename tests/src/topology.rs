//! A test topology on the real kernel: network namespaces as nodes and pods, a cgroup per pod,
//! real agent processes. Everything is named after a per-topology id so that tests run in
//! parallel, and everything is deleted on drop (also when the test fails).
//!
//! ```text
//!  fabric netns: br0 (10.99.0.0/24)
//!    ├─ veth ── node netns n1: eth0 10.99.0.1, br0 10.20.1.1/24, ip_forward=1, routes to other nodes
//!    │            └─ veth ── pod netns: eth0 10.20.1.10/24 (default via 10.20.1.1)
//!    └─ veth ── node netns n2 ...
//!  IPv6 beside it: node n eth0 fd99::n/64, br0 fd20:n::1/64, forwarding on, routes to the
//!  other nodes' fd20:m::/64; a dual-stack or IPv6-only pod ([`Stack`]) has fd20:n::<10+k>/64
//!  (default via fd20:n::1)
//!  cgroup v2: <mount>/smt-<id>/<node>/{agent,host,<pod>...}   (node root = <mount>/smt-<id>/<node>)
//!  bpffs:     /sys/fs/bpf/smt-<id>/<node>/...
//! ```

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::kernel::{cgroup2_mount, is_bpffs};
use crate::process::{command_in, run, Agent, Controller, Server, CONTROLLER_IP};
use crate::COUNTER;

/// Prefix of every namespace, cgroup and bpffs directory the tests create (the leftover check
/// in `cargo xtask test` looks for it).
pub const PREFIX: &str = "smt-";

fn ip(args: &[&str]) -> Result<()> {
    run(Command::new("ip").args(args)).map(|_| ())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeId(pub usize);
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodId(pub usize);

pub struct Node {
    pub name: String,
    pub netns: String,
    pub index: usize,
    pub cgroup: PathBuf,
    pub bpffs: PathBuf,
    pub state_dir: PathBuf,
    pub workloads_file: PathBuf,
    pub underlay_ip: Ipv4Addr,
    pub gateway_ip: Ipv4Addr,
    pub underlay_ip6: Ipv6Addr,
    pub gateway_ip6: Ipv6Addr,
    pods: usize,
}

/// A pod's address families.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stack {
    V4,
    /// Both families; its workload record lists both addresses.
    Dual,
    /// No IPv4 address at all (its [`Pod::ip`] is the address it would have had, unused).
    V6,
}

pub struct Pod {
    pub name: String,
    pub node: NodeId,
    pub netns: String,
    pub ip: Ipv4Addr,
    /// Its IPv6 address (dual-stack and IPv6-only pods).
    pub ip6: Option<Ipv6Addr>,
    pub stack: Stack,
    pub cgroup: PathBuf,
    pub meshed: bool,
    pub service_account: String,
    pub labels: Vec<(String, String)>,
    /// Its namespace ("default" unless a test moves it).
    pub namespace: String,
    /// Its veth's name on the node's side.
    node_if: String,
}

pub struct Topology {
    pub id: String,
    pub fabric: String,
    pub cgroup_root: PathBuf,
    pub bpffs_root: PathBuf,
    pub dir: PathBuf,
    pub nodes: Vec<Node>,
    pub pods: Vec<Pod>,
    pub(crate) children: Vec<std::process::Child>,
}

/// The topology most tests use: two nodes, `a` meshed on n1 and `b` meshed on n2, the
/// workloads files written.
pub struct Mesh {
    pub t: Topology,
    pub n1: NodeId,
    pub n2: NodeId,
    pub a: PodId,
    pub b: PodId,
}

/// A [`Mesh`] started by [`Mesh::start`]; each part stops when dropped.
pub struct Running {
    pub ctl: Controller,
    /// The echo server in `b`.
    pub server: Server,
    pub agent1: Agent,
    pub agent2: Agent,
}

impl Mesh {
    /// `b`'s address and `port`, as a client dials it.
    pub fn dst(&self, port: u16) -> String {
        format!("{}:{port}", self.t.pod(self.b).ip)
    }

    /// The controller, an echo server in `b` on `port`, and both agents; returns once both
    /// agents are ready (their programs attached and certificates in hand), so a test's first
    /// traffic does not race start-up.
    pub fn start(&mut self, port: u16) -> Result<Running> {
        let ctl = self.t.start_controller(&[])?;
        let server = self.t.start_server(self.b, port)?;
        let agent1 = self.t.start_agent(self.n1, &[])?;
        let agent2 = self.t.start_agent(self.n2, &[])?;
        self.t.wait_ready(self.n1)?;
        self.t.wait_ready(self.n2)?;
        Ok(Running { ctl, server, agent1, agent2 })
    }
}

impl Topology {
    /// Two nodes, a meshed pod on each (`a` on n1, `b` on n2), workloads written.
    pub fn two_node_mesh(test: &str) -> Result<Mesh> {
        let mut t = Topology::new(test)?;
        let n1 = t.add_node("n1")?;
        let n2 = t.add_node("n2")?;
        let a = t.add_pod(n1, "a", true)?;
        let b = t.add_pod(n2, "b", true)?;
        t.write_workloads()?;
        Ok(Mesh { t, n1, n2, a, b })
    }

    /// One node with two meshed pods, `a` and `b`, workloads written.
    pub fn one_node_mesh(test: &str) -> Result<(Topology, NodeId, PodId, PodId)> {
        let mut t = Topology::new(test)?;
        let n1 = t.add_node("n1")?;
        let a = t.add_pod(n1, "a", true)?;
        let b = t.add_pod(n1, "b", true)?;
        t.write_workloads()?;
        Ok((t, n1, a, b))
    }

    /// `host:port` of a pod, as a client dials it.
    pub fn addr(&self, p: PodId, port: u16) -> String {
        format!("{}:{port}", self.pod(p).ip)
    }

    /// `[ip6]:port` of a dual-stack or IPv6-only pod.
    pub fn addr6(&self, p: PodId, port: u16) -> String {
        format!("[{}]:{port}", self.pod(p).ip6.expect("an IPv6 pod"))
    }

    pub fn new(test: &str) -> Result<Self> {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let id = format!("{:04x}{:02x}", std::process::id() & 0xffff, n & 0xff);
        let cg2 = cgroup2_mount()?;
        let bpf = Path::new("/sys/fs/bpf");
        if !is_bpffs(bpf) {
            bail!("bpffs is not mounted at /sys/fs/bpf; run `cargo xtask setup` (or `mount -t bpf bpf /sys/fs/bpf`)");
        }
        let dir = std::env::temp_dir().join(format!("{PREFIX}{id}-{test}"));
        let t = Topology {
            fabric: format!("{PREFIX}{id}-fabric"),
            cgroup_root: cg2.join(format!("{PREFIX}{id}")),
            bpffs_root: bpf.join(format!("{PREFIX}{id}")),
            dir,
            id,
            nodes: Vec::new(),
            pods: Vec::new(),
            children: Vec::new(),
        };
        std::fs::create_dir_all(&t.dir)?;
        std::fs::create_dir_all(&t.cgroup_root).context("creating the test cgroup")?;
        std::fs::create_dir_all(&t.bpffs_root)?;
        ip(&["netns", "add", &t.fabric])?;
        ip(&["-n", &t.fabric, "link", "set", "lo", "up"])?;
        ip(&["-n", &t.fabric, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &t.fabric, "link", "set", "br0", "up"])?;
        ip(&["-n", &t.fabric, "addr", "add", &format!("{CONTROLLER_IP}/24"), "dev", "br0"])?;
        std::fs::create_dir_all(t.cgroup_root.join("controller"))?;
        std::fs::create_dir_all(t.controller_dir())?;
        std::fs::create_dir_all(t.config_dir())?;
        Ok(t)
    }

    pub fn add_node(&mut self, name: &str) -> Result<NodeId> {
        let index = self.nodes.len() + 1;
        let netns = format!("{PREFIX}{}-{name}", self.id);
        new_netns(&netns)?;
        let fab_if = format!("n{index}");
        let underlay_ip = Ipv4Addr::new(10, 99, 0, index as u8);
        let gateway_ip = Ipv4Addr::new(10, 20, index as u8, 1);
        let underlay_ip6 = Ipv6Addr::new(0xfd99, 0, 0, 0, 0, 0, 0, index as u16);
        let gateway_ip6 = Ipv6Addr::new(0xfd20, index as u16, 0, 0, 0, 0, 0, 1);
        ip(&["-n", &self.fabric, "link", "add", &fab_if, "type", "veth", "peer", "name", "eth0", "netns", &netns])?;
        ip(&["-n", &self.fabric, "link", "set", &fab_if, "master", "br0", "up"])?;
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        ip(&["-n", &netns, "addr", "add", &format!("{underlay_ip}/24"), "dev", "eth0"])?;
        ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &netns, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &netns, "addr", "add", &format!("{gateway_ip}/24"), "dev", "br0"])?;
        ip(&["-n", &netns, "link", "set", "br0", "up"])?;
        ip(&["-n", &netns, "addr", "add", &format!("{underlay_ip6}/64"), "dev", "eth0", "nodad"])?;
        ip(&["-n", &netns, "addr", "add", &format!("{gateway_ip6}/64"), "dev", "br0", "nodad"])?;
        run(Command::new("ip").args(["netns", "exec", &netns, "sysctl", "-qw", "net.ipv4.ip_forward=1"]))?;
        run(Command::new("ip").args(["netns", "exec", &netns, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]))?;
        // Routes between this node's pods and every other node's pods.
        for other in &self.nodes {
            ip(&[
                "-n",
                &netns,
                "route",
                "add",
                &format!("10.20.{}.0/24", other.index),
                "via",
                &other.underlay_ip.to_string(),
            ])?;
            ip(&["-n", &other.netns, "route", "add", &format!("10.20.{index}.0/24"), "via", &underlay_ip.to_string()])?;
            let (theirs, ours) = (format!("fd20:{:x}::/64", other.index), format!("fd20:{index:x}::/64"));
            ip(&["-n", &netns, "-6", "route", "add", &theirs, "via", &other.underlay_ip6.to_string()])?;
            ip(&["-n", &other.netns, "-6", "route", "add", &ours, "via", &underlay_ip6.to_string()])?;
        }
        // The fabric (where the controller is) routes this node's pods through it: an agent
        // in a pod's netns of its own, as a DaemonSet's is, reaches the controller.
        ip(&["-n", &self.fabric, "route", "add", &format!("10.20.{index}.0/24"), "via", &underlay_ip.to_string()])?;
        let cgroup = self.cgroup_root.join(name);
        std::fs::create_dir_all(cgroup.join("agent"))?;
        std::fs::create_dir_all(cgroup.join("host"))?;
        let state_dir = self.dir.join(name);
        std::fs::create_dir_all(&state_dir)?;
        self.nodes.push(Node {
            name: name.to_owned(),
            netns,
            index,
            bpffs: self.bpffs_root.join(name),
            workloads_file: state_dir.join("workloads.yaml"),
            state_dir,
            cgroup,
            underlay_ip,
            gateway_ip,
            underlay_ip6,
            gateway_ip6,
            pods: 0,
        });
        Ok(NodeId(self.nodes.len() - 1))
    }

    /// A pod: its own netns and cgroup under the node. `meshed` pods are listed in the node's
    /// workloads file (written by [`Topology::write_workloads`]).
    pub fn add_pod(&mut self, node: NodeId, name: &str, meshed: bool) -> Result<PodId> {
        self.add_pod_stack(node, name, meshed, Stack::V4)
    }

    /// As [`Topology::add_pod`], with the pod's address families.
    pub fn add_pod_stack(&mut self, node: NodeId, name: &str, meshed: bool, stack: Stack) -> Result<PodId> {
        let n = &mut self.nodes[node.0];
        n.pods += 1;
        let ip4 = Ipv4Addr::new(10, 20, n.index as u8, 9 + n.pods as u8);
        let ip6 = (stack != Stack::V4).then(|| Ipv6Addr::new(0xfd20, n.index as u16, 0, 0, 0, 0, 0, 9 + n.pods as u16));
        let netns = format!("{PREFIX}{}-{}-{name}", self.id, n.name);
        let node_if = format!("p{}", n.pods);
        let v4 = (stack != Stack::V6).then_some((ip4, n.gateway_ip));
        pod_netns(&n.netns, &netns, &node_if, v4, ip6.map(|a| (a, n.gateway_ip6)))?;
        let cgroup = n.cgroup.join(name);
        std::fs::create_dir_all(&cgroup)?;
        self.pods.push(Pod {
            name: name.to_owned(),
            node,
            netns,
            ip: ip4,
            ip6,
            stack,
            cgroup,
            meshed,
            service_account: format!("sa-{name}"),
            labels: vec![("app".into(), name.into())],
            namespace: "default".into(),
            node_if,
        });
        Ok(PodId(self.pods.len() - 1))
    }

    /// Moves a pod into a kubelet-shaped cgroup tree: `pod_dir` (relative to its node's cgroup
    /// root) is its pod-level cgroup, and its processes go into `<pod_dir>/<container>` from
    /// now on. Returns the pod-level directory.
    pub fn kubelet_cgroup(&mut self, p: PodId, pod_dir: &str, container: &str) -> Result<PathBuf> {
        let dir = self.node(self.pod(p).node).cgroup.join(pod_dir);
        std::fs::create_dir_all(dir.join(container))?;
        let old = std::mem::replace(&mut self.pods[p.0].cgroup, dir.join(container));
        if old != dir.join(container) {
            let _ = std::fs::remove_dir(old);
        }
        Ok(dir)
    }

    /// The pod's sandbox (a `sleep`, as a pause container is): a process in its netns and
    /// cgroup, ended with the topology.
    pub fn start_sandbox(&mut self, p: PodId) -> Result<u32> {
        let child = self.pod_command(p, "sleep")?.arg("3600").spawn().context("starting a sandbox")?;
        let pid = child.id();
        self.children.push(child);
        Ok(pid)
    }

    /// What the kubelet does when it replaces a pod's sandbox: the pod's processes end, and a
    /// new netns with the same address takes the old one's place (its cgroup stays).
    pub fn replace_netns(&mut self, p: PodId) -> Result<()> {
        let pod = self.pod(p);
        let pod_dir = pod.cgroup.parent().context("a pod's cgroup has a parent")?.to_owned();
        kill_cgroup_tree(&pod_dir);
        let _ = ip(&["netns", "del", &pod.netns]);
        let n = self.node(pod.node);
        // The old netns lives on while the agent holds it open: its veth pair goes now, so
        // that the new one can take the name.
        let _ = ip(&["-n", &n.netns, "link", "del", &pod.node_if]);
        let v4 = (pod.stack != Stack::V6).then_some((pod.ip, n.gateway_ip));
        pod_netns(&n.netns, &pod.netns, &pod.node_if, v4, pod.ip6.map(|a| (a, n.gateway_ip6)))
    }

    pub fn controller_dir(&self) -> PathBuf {
        self.dir.join("controller")
    }

    /// The controller's configuration directory (policies), watched for changes.
    pub fn config_dir(&self) -> PathBuf {
        self.controller_dir().join("config")
    }

    /// Writes (atomically) a configuration file into the controller's directory.
    pub fn write_config(&self, name: &str, yaml: &str) -> Result<()> {
        std::fs::create_dir_all(self.config_dir())?;
        let tmp = self.controller_dir().join(format!(".{name}.tmp"));
        std::fs::write(&tmp, yaml)?;
        std::fs::rename(&tmp, self.config_dir().join(name))?;
        Ok(())
    }

    pub fn remove_config(&self, name: &str) -> Result<()> {
        std::fs::remove_file(self.config_dir().join(name))?;
        Ok(())
    }

    pub fn trust_bundle(&self) -> PathBuf {
        self.controller_dir().join("trust-bundle.pem")
    }

    pub(crate) fn node_credential(&self, n: &Node) -> String {
        format!("node-credential-{}-{}-0123456789abcdef", self.id, n.name)
    }

    /// The controller's placement: every meshed pod plus `extra` pods (e.g. ones an agent will
    /// add at run time).
    pub fn write_controller_workloads(&self, extra: &[PodId]) -> Result<()> {
        let mut all: Vec<Value> =
            (0..self.pods.len()).filter(|i| self.pods[*i].meshed).map(|i| self.workload_json(PodId(i))).collect();
        all.extend(extra.iter().map(|p| self.workload_json(*p)));
        let path = self.controller_dir().join("workloads.yaml");
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, workload_documents(&all)?)?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    }

    pub fn node(&self, n: NodeId) -> &Node {
        &self.nodes[n.0]
    }
    pub fn pod(&self, p: PodId) -> &Pod {
        &self.pods[p.0]
    }

    /// The workload record of a pod, as the agent's file and API take it.
    pub fn workload_json(&self, p: PodId) -> Value {
        let pod = self.pod(p);
        serde_json::json!({
            "name": pod.name,
            "namespace": pod.namespace,
            "serviceAccount": pod.service_account,
            "labels": pod.labels.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
            "ips": match pod.stack {
                Stack::V4 => vec![pod.ip.to_string()],
                Stack::Dual => vec![pod.ip.to_string(), pod.ip6.unwrap().to_string()],
                Stack::V6 => vec![pod.ip6.unwrap().to_string()],
            },
            "node": self.node(pod.node).name,
            "netns": format!("/run/netns/{}", pod.netns),
            "cgroup": pod.cgroup,
        })
    }

    /// Writes every node's workloads file: all meshed pods of the topology (each agent captures
    /// those on its node and knows the others).
    pub fn write_workloads(&self) -> Result<()> {
        let all: Vec<Value> =
            (0..self.pods.len()).filter(|i| self.pods[*i].meshed).map(|i| self.workload_json(PodId(i))).collect();
        let text = workload_documents(&all)?;
        for n in &self.nodes {
            std::fs::write(&n.workloads_file, &text)?;
        }
        self.write_controller_workloads(&[])
    }

    /// Writes `n`'s workloads file with only the pods of `n` (as a node knows them before any
    /// push: the others' addresses are then known only from the controller).
    pub fn write_local_workloads(&self, n: NodeId) -> Result<()> {
        let mine: Vec<Value> = (0..self.pods.len())
            .filter(|i| self.pods[*i].meshed && self.pods[*i].node == n)
            .map(|i| self.workload_json(PodId(i)))
            .collect();
        std::fs::write(&self.node(n).workloads_file, workload_documents(&mine)?)?;
        Ok(())
    }

    pub fn pod_command(&self, p: PodId, program: impl AsRef<std::ffi::OsStr>) -> Result<Command> {
        let pod = self.pod(p);
        command_in(&pod.netns, &pod.cgroup, program)
    }

    /// A process on the node itself (host network, not in any pod's cgroup).
    pub fn node_command(&self, n: NodeId, program: impl AsRef<std::ffi::OsStr>) -> Result<Command> {
        let node = self.node(n);
        command_in(&node.netns, &node.cgroup.join("host"), program)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Anything else still in our cgroups was started by this topology: end it by pid.
        kill_cgroup_tree(&self.cgroup_root);
        for p in &self.pods {
            let _ = ip(&["netns", "del", &p.netns]);
        }
        for n in &self.nodes {
            let _ = ip(&["netns", "del", &n.netns]);
        }
        let _ = ip(&["netns", "del", &self.fabric]);
        let _ = std::fs::remove_dir_all(&self.bpffs_root);
        remove_cgroup_tree(&self.cgroup_root);
        if std::env::var_os("SOCKMESH_KEEP_LOGS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn kill_cgroup_tree(dir: &Path) {
    if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            // SAFETY: a pid in a cgroup this topology created.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                kill_cgroup_tree(&e.path());
            }
        }
    }
}

fn remove_cgroup_tree(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    // A cgroup whose last process just died may take a moment to be removable.
    for _ in 0..100 {
        match std::fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// A network namespace whose interfaces skip IPv6 duplicate address detection: until it ends,
/// an address (link-local ones too) is tentative and neighbour discovery through it stalls,
/// which a first connection would feel as a lost SYN. Addresses here are unique by
/// construction.
fn new_netns(netns: &str) -> Result<()> {
    ip(&["netns", "add", netns])?;
    let no_dad = ["net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"];
    run(Command::new("ip").args(["netns", "exec", netns, "sysctl", "-qw"]).args(no_dad)).map(|_| ())
}

/// A pod's netns `netns`, joined to its node's bridge by a veth (`node_if` on the node's side),
/// with an IPv4 and/or an IPv6 address (each with its gateway) and default routes through the
/// node.
fn pod_netns(
    node_netns: &str,
    netns: &str,
    node_if: &str,
    v4: Option<(Ipv4Addr, Ipv4Addr)>,
    v6: Option<(Ipv6Addr, Ipv6Addr)>,
) -> Result<()> {
    new_netns(netns)?;
    ip(&["-n", node_netns, "link", "add", node_if, "type", "veth", "peer", "name", "eth0", "netns", netns])?;
    ip(&["-n", node_netns, "link", "set", node_if, "master", "br0", "up"])?;
    ip(&["-n", netns, "link", "set", "lo", "up"])?;
    if let Some((ip4, _)) = v4 {
        ip(&["-n", netns, "addr", "add", &format!("{ip4}/24"), "dev", "eth0"])?;
    }
    if let Some((ip6, _)) = v6 {
        ip(&["-n", netns, "addr", "add", &format!("{ip6}/64"), "dev", "eth0", "nodad"])?;
    }
    ip(&["-n", netns, "link", "set", "eth0", "up"])?;
    if let Some((_, gateway)) = v4 {
        ip(&["-n", netns, "route", "add", "default", "via", &gateway.to_string()])?;
    }
    if let Some((_, gateway)) = v6 {
        ip(&["-n", netns, "-6", "route", "add", "default", "via", &gateway.to_string()])?;
    }
    Ok(())
}

/// A workload file: one `kind: Workload` document per record.
fn workload_documents(records: &[Value]) -> Result<String> {
    let mut out = String::new();
    for r in records {
        let mut r = r.clone();
        r["kind"] = "Workload".into();
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&r)?);
    }
    Ok(out)
}
