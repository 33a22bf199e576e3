//! A test topology on the real kernel: network namespaces as nodes and pods, a cgroup per pod,
//! real agent processes. Everything is named after a per-topology id so that tests run in
//! parallel, and everything is deleted on drop (also when the test fails).
//!
//! ```text
//!  fabric netns: br0 (10.99.0.0/24)
//!    ├─ veth ── node netns n1: eth0 10.99.0.1, br0 10.20.1.1/24, ip_forward=1, routes to other nodes
//!    │            └─ veth ── pod netns: eth0 10.20.1.10/24 (default via 10.20.1.1)
//!    └─ veth ── node netns n2 ...
//!  cgroup v2: <mount>/smt-<id>/<node>/{agent,host,<pod>...}   (node root = <mount>/smt-<id>/<node>)
//!  bpffs:     /sys/fs/bpf/smt-<id>/<node>/...
//! ```

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

/// Prefix of every namespace, cgroup and bpffs directory the tests create (the leftover check
/// in `cargo xtask test` looks for it).
pub const PREFIX: &str = "smt-";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// The workspace's target dir, where `cargo xtask build` put the release binaries.
pub fn bin(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("SOCKMESH_BIN_DIR") {
        return PathBuf::from(dir).join(name);
    }
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    for profile in ["release", "debug"] {
        let p = here.join("../target").join(profile).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("{name} is not built; run the integration tests with `cargo xtask test`")
}

pub fn cgroup2_mount() -> Result<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    for line in text.lines() {
        if let Some((left, right)) = line.split_once(" - ") {
            if right.split_whitespace().next() == Some("cgroup2") {
                if let Some(p) = left.split_whitespace().nth(4) {
                    return Ok(PathBuf::from(p));
                }
            }
        }
    }
    bail!("no cgroup v2 mount in /proc/self/mountinfo")
}

pub fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}{}", String::from_utf8_lossy(&out.stderr), String::from_utf8_lossy(&out.stdout));
    }
    Ok(out)
}

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
    pods: usize,
}

pub struct Pod {
    pub name: String,
    pub node: NodeId,
    pub netns: String,
    pub ip: Ipv4Addr,
    pub cgroup: PathBuf,
    pub meshed: bool,
    pub service_account: String,
    pub labels: Vec<(String, String)>,
}

/// The controller's address on the fabric (reachable from every node).
pub const CONTROLLER_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 254);
pub const CONTROLLER_PORT: u16 = 15012;

pub struct Controller {
    child: Option<Child>,
    pub log: PathBuf,
}

impl Controller {
    pub fn log_lines(&self) -> Vec<Value> {
        read_json_lines(&self.log).unwrap_or_default()
    }
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: our own child's pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            wait_or_kill(&mut c);
        }
    }
}

/// Waits up to 5 s for a signalled child, then kills it: a stuck shutdown must not hang a test.
fn wait_or_kill(c: &mut Child) {
    let end = Instant::now() + Duration::from_secs(5);
    while Instant::now() < end {
        if let Ok(Some(_)) = c.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = c.kill();
    let _ = c.wait();
}

impl Drop for Controller {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub struct Topology {
    pub id: String,
    pub fabric: String,
    pub cgroup_root: PathBuf,
    pub bpffs_root: PathBuf,
    pub dir: PathBuf,
    pub nodes: Vec<Node>,
    pub pods: Vec<Pod>,
    children: Vec<Child>,
}

/// Runs a process inside a netns and a cgroup (both entered between fork and exec).
pub fn command_in(netns: &str, cgroup: &Path, program: impl AsRef<std::ffi::OsStr>) -> Result<Command> {
    let ns = File::open(format!("/run/netns/{netns}")).with_context(|| format!("netns {netns}"))?;
    let procs = std::fs::OpenOptions::new()
        .write(true)
        .open(cgroup.join("cgroup.procs"))
        .with_context(|| format!("cgroup {}", cgroup.display()))?;
    let mut cmd = Command::new(program);
    // SAFETY: only async-signal-safe calls (setns, write) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(cmd)
}

impl Topology {
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
        ip(&["netns", "add", &netns])?;
        let fab_if = format!("n{index}");
        let underlay_ip = Ipv4Addr::new(10, 99, 0, index as u8);
        let gateway_ip = Ipv4Addr::new(10, 20, index as u8, 1);
        ip(&["-n", &self.fabric, "link", "add", &fab_if, "type", "veth", "peer", "name", "eth0", "netns", &netns])?;
        ip(&["-n", &self.fabric, "link", "set", &fab_if, "master", "br0", "up"])?;
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        ip(&["-n", &netns, "addr", "add", &format!("{underlay_ip}/24"), "dev", "eth0"])?;
        ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &netns, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &netns, "addr", "add", &format!("{gateway_ip}/24"), "dev", "br0"])?;
        ip(&["-n", &netns, "link", "set", "br0", "up"])?;
        run(Command::new("ip").args(["netns", "exec", &netns, "sysctl", "-qw", "net.ipv4.ip_forward=1"]))?;
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
        }
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
            pods: 0,
        });
        Ok(NodeId(self.nodes.len() - 1))
    }

    /// A pod: its own netns and cgroup under the node. `meshed` pods are listed in the node's
    /// workloads file (written by [`Topology::write_workloads`]).
    pub fn add_pod(&mut self, node: NodeId, name: &str, meshed: bool) -> Result<PodId> {
        let n = &mut self.nodes[node.0];
        n.pods += 1;
        let ip4 = Ipv4Addr::new(10, 20, n.index as u8, 9 + n.pods as u8);
        let netns = format!("{PREFIX}{}-{}-{name}", self.id, n.name);
        ip(&["netns", "add", &netns])?;
        let node_if = format!("p{}", n.pods);
        ip(&["-n", &n.netns, "link", "add", &node_if, "type", "veth", "peer", "name", "eth0", "netns", &netns])?;
        ip(&["-n", &n.netns, "link", "set", &node_if, "master", "br0", "up"])?;
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        ip(&["-n", &netns, "addr", "add", &format!("{ip4}/24"), "dev", "eth0"])?;
        ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &netns, "route", "add", "default", "via", &n.gateway_ip.to_string()])?;
        let cgroup = n.cgroup.join(name);
        std::fs::create_dir_all(&cgroup)?;
        self.pods.push(Pod {
            name: name.to_owned(),
            node,
            netns,
            ip: ip4,
            cgroup,
            meshed,
            service_account: format!("sa-{name}"),
            labels: vec![("app".into(), name.into())],
        });
        Ok(PodId(self.pods.len() - 1))
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

    fn node_credential(&self, n: &Node) -> String {
        format!("node-credential-{}-{}-0123456789abcdef", self.id, n.name)
    }

    /// Starts the controller (CA) in the fabric netns with every node's credential and the
    /// placement of every meshed pod. Its root CA persists in its state dir across restarts.
    pub fn start_controller(&self, extra: &[&str]) -> Result<Controller> {
        use std::os::unix::fs::OpenOptionsExt;
        let dir = self.controller_dir();
        let creds = dir.join("node-credentials.yaml");
        let mut text = String::from("nodes:\n");
        for n in &self.nodes {
            text.push_str(&format!("- name: {}\n  credential: {}\n", n.name, self.node_credential(n)));
            let path = n.state_dir.join("credential");
            let _ = std::fs::remove_file(&path);
            let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path)?;
            f.write_all(self.node_credential(n).as_bytes())?;
        }
        let _ = std::fs::remove_file(&creds);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&creds)?
            .write_all(text.as_bytes())?;
        let workloads = dir.join("workloads.yaml");
        if !workloads.exists() {
            self.write_controller_workloads(&[])?;
        }
        let log = dir.join(format!("controller-{}.log", COUNTER.fetch_add(1, Ordering::SeqCst)));
        let mut cmd = command_in(&self.fabric, &self.cgroup_root.join("controller"), bin("mesh-controller"))?;
        cmd.args(["--listen", &format!("{CONTROLLER_IP}:{CONTROLLER_PORT}"), "--log-format", "json"])
            .arg("--state-dir")
            .arg(&dir)
            .arg("--workloads")
            .arg(&workloads)
            .arg("--node-credentials")
            .arg(&creds)
            .arg("--config-dir")
            .arg(self.config_dir())
            .args(extra)
            .stdout(Stdio::null())
            .stderr(File::create(&log)?);
        let child = cmd.spawn().context("starting mesh-controller")?;
        let mut c = Controller { child: Some(child), log };
        let ready = wait_for(Duration::from_secs(20), || {
            if let Some(status) = c.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("mesh-controller exited with {status}: {}", std::fs::read_to_string(&c.log).unwrap_or_default());
            }
            Ok(c.log_lines().iter().any(|l| l["message"] == "controller ready"))
        });
        if let Err(e) = ready {
            bail!("controller did not become ready: {e}\n{}", std::fs::read_to_string(&c.log).unwrap_or_default());
        }
        Ok(c)
    }

    /// The controller's placement: every meshed pod plus `extra` pods (e.g. ones an agent will
    /// add at run time).
    pub fn write_controller_workloads(&self, extra: &[PodId]) -> Result<()> {
        let mut all: Vec<Value> =
            (0..self.pods.len()).filter(|i| self.pods[*i].meshed).map(|i| self.workload_json(PodId(i))).collect();
        all.extend(extra.iter().map(|p| self.workload_json(*p)));
        let doc = serde_json::json!({ "workloads": all });
        let path = self.controller_dir().join("workloads.yaml");
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_yaml::to_string(&doc)?)?;
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
            "namespace": "default",
            "serviceAccount": pod.service_account,
            "labels": pod.labels.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
            "ips": [pod.ip.to_string()],
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
        let doc = serde_json::json!({ "workloads": all });
        for n in &self.nodes {
            std::fs::write(&n.workloads_file, serde_yaml::to_string(&doc)?)?;
        }
        self.write_controller_workloads(&[])
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

    /// Starts the echo server in a pod on `port`; returns a handle to read who connected.
    pub fn start_server(&mut self, p: PodId, port: u16) -> Result<Server> {
        let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port);
        let log = self.dir.join(format!("server-{}-{port}.log", self.pod(p).name));
        let child = self
            .pod_command(p, bin("sm-testapp"))?
            .args(["serve", "--listen", &addr.to_string()])
            .stdout(File::create(&log)?)
            .stderr(Stdio::null())
            .spawn()?;
        let pid = child.id();
        self.children.push(child);
        let s = Server { log, pid };
        wait_for(Duration::from_secs(5), || Ok(s.events()?.iter().any(|e| e["event"] == "listening")))
            .context("echo server did not start")?;
        Ok(s)
    }

    /// Starts the echo server as a plain process on a node (outside any pod).
    pub fn start_node_server(&mut self, n: NodeId, port: u16) -> Result<Server> {
        let log = self.dir.join(format!("server-node-{}-{port}.log", self.node(n).name));
        let child = self
            .node_command(n, bin("sm-testapp"))?
            .args(["serve", "--listen", &format!("0.0.0.0:{port}")])
            .stdout(File::create(&log)?)
            .stderr(Stdio::null())
            .spawn()?;
        let pid = child.id();
        self.children.push(child);
        let s = Server { log, pid };
        wait_for(Duration::from_secs(5), || Ok(s.events()?.iter().any(|e| e["event"] == "listening")))
            .context("echo server did not start")?;
        Ok(s)
    }

    /// Runs sm-testapp in a pod to completion and parses its last JSON line.
    pub fn pod_app(&self, p: PodId, args: &[&str]) -> Result<Value> {
        app_output(self.pod_command(p, bin("sm-testapp"))?.args(args))
    }

    pub fn node_app(&self, n: NodeId, args: &[&str]) -> Result<Value> {
        app_output(self.node_command(n, bin("sm-testapp"))?.args(args))
    }

    /// `sm-testapp` in the pod, in the background; [`BackgroundApp::result`] waits for its report.
    pub fn spawn_pod_app(&self, p: PodId, args: &[&str]) -> Result<BackgroundApp> {
        let child = self
            .pod_command(p, bin("sm-testapp"))?
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting sm-testapp")?;
        Ok(BackgroundApp(child))
    }

    /// Waits until the node's agent reports ready on `/healthz/ready`: its programs attached
    /// and a certificate for every workload it serves. Until then a meshed pod's first
    /// connections wait for a certificate (and under load may time out); a test whose first
    /// traffic is not about start-up waits here first.
    pub fn wait_ready(&self, n: NodeId) -> Result<()> {
        let netns = &self.node(n).netns;
        wait_for(Duration::from_secs(20), || Ok(http_get(netns, "127.0.0.1:15021", "/healthz/ready")?.0 == 200))
            .with_context(|| format!("agent on {} not ready", self.node(n).name))
    }

    /// Starts the node's agent with the node's workloads file, JSON logs and `extra` flags.
    pub fn start_agent(&self, n: NodeId, extra: &[&str]) -> Result<Agent> {
        let node = self.node(n);
        let log = node.state_dir.join(format!("agent-{}.log", COUNTER.fetch_add(1, Ordering::SeqCst)));
        let api = node.state_dir.join("agent.sock");
        let mut cmd = command_in(&node.netns, &node.cgroup.join("agent"), bin("mesh-agent"))?;
        cmd.arg("run")
            .args(["--node", &node.name])
            .arg("--cgroup-root")
            .arg(&node.cgroup)
            .arg("--bpffs-dir")
            .arg(&node.bpffs)
            .arg("--state-dir")
            .arg(&node.state_dir)
            .arg("--api-socket")
            .arg(&api)
            .args(["--log-format", "json", "--connect-timeout-ms", "2000"])
            .args(["--controller", &format!("https://{CONTROLLER_IP}:{CONTROLLER_PORT}")])
            .arg("--trust-bundle")
            .arg(self.trust_bundle())
            .arg("--node-credential-file")
            .arg(node.state_dir.join("credential"));
        if node.workloads_file.exists() {
            cmd.arg("--workloads").arg(&node.workloads_file);
        }
        cmd.args(extra).stdout(Stdio::null()).stderr(File::create(&log)?);
        let child = cmd.spawn().context("starting mesh-agent")?;
        let mut agent = Agent { child: Some(child), log, api };
        let ready = wait_for(Duration::from_secs(20), || {
            if let Some(status) = agent.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("mesh-agent exited with {status}: {}", agent.log_text());
            }
            Ok(agent.log_lines().iter().any(|l| l["message"] == "agent ready"))
        });
        if let Err(e) = ready {
            bail!("agent {} did not become ready: {e}\n{}", node.name, agent.log_text());
        }
        Ok(agent)
    }
}

/// An `sm-testapp` started with [`Topology::spawn_pod_app`]; dropping it leaves the process to
/// finish on its own.
pub struct BackgroundApp(Child);

impl BackgroundApp {
    /// Waits for the app to end and returns its JSON report.
    pub fn result(self) -> Result<Value> {
        app_report(self.0.wait_with_output().context("waiting for sm-testapp")?)
    }
}

fn app_output(cmd: &mut Command) -> Result<Value> {
    app_report(cmd.stderr(Stdio::inherit()).output().context("running sm-testapp")?)
}

fn app_report(out: std::process::Output) -> Result<Value> {
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last().ok_or_else(|| anyhow!("sm-testapp printed nothing ({})", out.status))?;
    serde_json::from_str(last).with_context(|| format!("sm-testapp output {last:?}"))
}

pub fn is_bpffs(p: &Path) -> bool {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and out-pointer.
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == 0xcafe4a11 }
}

/// Polls `f` until it returns true or `limit` passes.
pub fn wait_for(limit: Duration, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let end = Instant::now() + limit;
    loop {
        if f()? {
            return Ok(());
        }
        if Instant::now() > end {
            bail!("timed out after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub struct Server {
    pub log: PathBuf,
    pub pid: u32,
}

impl Server {
    pub fn events(&self) -> Result<Vec<Value>> {
        read_json_lines(&self.log)
    }
    pub fn accepted(&self) -> Result<Vec<Value>> {
        Ok(self.events()?.into_iter().filter(|e| e["event"] == "accept").collect())
    }
}

fn read_json_lines(p: &Path) -> Result<Vec<Value>> {
    let f = File::open(p)?;
    Ok(BufReader::new(f).lines().map_while(|l| l.ok()).filter_map(|l| serde_json::from_str(&l).ok()).collect())
}

pub struct Agent {
    child: Option<Child>,
    pub log: PathBuf,
    pub api: PathBuf,
}

impl Agent {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_lines(&self) -> Vec<Value> {
        read_json_lines(&self.log).unwrap_or_default()
    }

    /// The access-log lines (one per connection, written at close).
    pub fn access_log(&self) -> Vec<Value> {
        self.log_lines().into_iter().filter(|l| l["target"] == "access").collect()
    }

    /// One request to the local API.
    pub fn api(&self, req: Value) -> Result<Value> {
        let mut s = std::os::unix::net::UnixStream::connect(&self.api).context("connecting to the agent API")?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        writeln!(s, "{req}")?;
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line)?;
        let v: Value = serde_json::from_str(&line).with_context(|| format!("API reply {line:?}"))?;
        if v["ok"] != true {
            bail!("API error: {}", v["error"]);
        }
        Ok(v["result"].clone())
    }

    pub fn stats(&self) -> Result<Value> {
        self.api(serde_json::json!({"op": "stats"}))
    }

    /// Graceful stop (SIGTERM), waiting for exit.
    pub fn stop(&mut self) -> Result<()> {
        self.signal(libc::SIGTERM)
    }

    /// kill -9.
    pub fn kill(&mut self) -> Result<()> {
        self.signal(libc::SIGKILL)
    }

    fn signal(&mut self, sig: i32) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            // SAFETY: our own child's pid.
            unsafe { libc::kill(c.id() as i32, sig) };
            wait_or_kill(&mut c);
        }
        Ok(())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

/// Links pinned under a node's bpffs dir, by pin name -> kernel link id (via bpftool).
pub fn pinned_link_ids(bpffs: &Path) -> Result<std::collections::BTreeMap<String, u64>> {
    let mut m = std::collections::BTreeMap::new();
    let dir = bpffs.join("links");
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return Ok(m);
    };
    for e in rd {
        let e = e?;
        let out = run(Command::new("bpftool").args(["-j", "link", "show", "pinned"]).arg(e.path()))?;
        let v: Value = serde_json::from_slice(&out.stdout)?;
        m.insert(e.file_name().to_string_lossy().into_owned(), v["id"].as_u64().unwrap_or(0));
    }
    Ok(m)
}

/// Program names attached to a cgroup (effective set), via bpftool.
pub fn cgroup_programs(cgroup: &Path) -> Result<Vec<String>> {
    let out = run(Command::new("bpftool").args(["-j", "cgroup", "show"]).arg(cgroup))?;
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Array(vec![]));
    Ok(v.as_array()
        .map(|a| a.iter().filter_map(|p| p["name"].as_str().map(str::to_owned)).collect())
        .unwrap_or_default())
}

/// TCP listening ports inside a netns.
pub fn listening_ports(netns: &str) -> Result<Vec<u16>> {
    let out = run(Command::new("ip").args(["netns", "exec", netns, "ss", "-Htln"]))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3))
        .filter_map(|a| a.rsplit(':').next())
        .filter_map(|p| p.parse().ok())
        .collect())
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

/// A packet capture on an interface of a netns (tcpdump), stopped and flushed on `stop()`.
pub struct Capture {
    child: Option<Child>,
    pub file: PathBuf,
}

impl Capture {
    pub fn start(netns: &str, iface: &str, file: PathBuf) -> Result<Capture> {
        let err = file.with_extension("err");
        let child = Command::new("ip")
            .args(["netns", "exec", netns, "tcpdump", "-i", iface, "-nn", "-U", "-s", "0", "-w"])
            .arg(&file)
            .arg("tcp")
            .stdout(Stdio::null())
            .stderr(File::create(&err)?)
            .spawn()
            .context("starting tcpdump")?;
        let c = Capture { child: Some(child), file };
        wait_for(Duration::from_secs(10), || {
            Ok(std::fs::read_to_string(&err).unwrap_or_default().contains("listening on"))
        })
        .context("tcpdump did not start")?;
        Ok(c)
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: our own child; SIGINT makes tcpdump flush and exit.
            unsafe { libc::kill(c.id() as i32, libc::SIGINT) };
            let _ = c.wait();
        }
    }

    /// How many captured packets match a tcpdump filter expression.
    pub fn count(&self, filter: &str) -> Result<usize> {
        let out = run(Command::new("tcpdump").args(["-nn", "-r"]).arg(&self.file).arg(filter))?;
        Ok(String::from_utf8_lossy(&out.stdout).lines().count())
    }

    pub fn bytes(&self) -> Result<Vec<u8>> {
        Ok(std::fs::read(&self.file)?)
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An HTTP/1.1 GET from inside a netns (a thread that enters it): (status, body).
pub fn http_get(netns: &str, addr: &str, path: &str) -> Result<(u16, String)> {
    let ns = File::open(format!("/run/netns/{netns}"))?;
    let addr: SocketAddr = addr.parse()?;
    let path = path.to_owned();
    std::thread::spawn(move || -> Result<(u16, String)> {
        // SAFETY: setns on this short-lived thread only.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns: {}", std::io::Error::last_os_error());
        }
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
        let mut raw = String::new();
        std::io::Read::read_to_string(&mut s, &mut raw)?;
        let (head, body) = raw.split_once("\r\n\r\n").ok_or_else(|| anyhow!("malformed HTTP response"))?;
        let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        Ok((status, body.to_owned()))
    })
    .join()
    .map_err(|_| anyhow!("http_get thread panicked"))?
}

/// The value of one Prometheus sample whose labels include all of `labels`.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let (n, rest) = series.split_once('{').unwrap_or((series, "}"));
        if n != name {
            return None;
        }
        let all = labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
        if all {
            value.parse().ok()
        } else {
            None
        }
    })
}
