//! The real binaries, started the way a node runs them: the controller in the fabric netns,
//! an agent in its node's netns and `agent` cgroup, the test app in a pod's netns and cgroup.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use crate::http::http_get;
use crate::topology::{NodeId, PodId, Topology};
use crate::COUNTER;

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

pub fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}{}", String::from_utf8_lossy(&out.stderr), String::from_utf8_lossy(&out.stdout));
    }
    Ok(out)
}

/// The controller's address on the fabric (reachable from every node).
pub const CONTROLLER_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 254);
pub const CONTROLLER_PORT: u16 = 15012;
/// Where `sm-fakeapi` listens: in the fabric netns beside the controller, on the controller's
/// address (agents reach it there too, as they would reach a cluster's API server).
pub const FAKE_API: &str = "10.99.0.254:16443";

pub struct Controller {
    child: Option<Child>,
    pub log: PathBuf,
}

impl Controller {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }
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

    /// kill -9: gone without releasing anything.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
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

/// Starts the controller `cmd` (its stderr going to `log`) and waits until it says it is ready.
fn spawn_controller(cmd: &mut Command, log: PathBuf) -> Result<Controller> {
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

/// Writes a secret file afresh, readable by its owner only (mode 0600, as the agent and the
/// controller require of credentials): never another mode left by an earlier file.
pub fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

/// Writes node `n`'s credential file.
fn write_credential(n: &crate::Node, credential: &str) -> Result<()> {
    write_private(&n.state_dir.join("credential"), credential)
}

impl Topology {
    /// Starts the controller (CA) in the fabric netns with every node's credential and the
    /// placement of every meshed pod. Its root CA persists in its state dir across restarts.
    pub fn start_controller(&self, extra: &[&str]) -> Result<Controller> {
        self.start_controller_replica(CONTROLLER_PORT, &self.controller_dir(), extra)
    }

    /// The same, listening on `port` of the controller's address with its state in `state_dir`
    /// (a replica beside the first: give it the first one's CA with `--ca-cert/--ca-key`). Both
    /// read the node credentials, placements and configuration from the first one's directory.
    pub fn start_controller_replica(&self, port: u16, state_dir: &Path, extra: &[&str]) -> Result<Controller> {
        let dir = self.controller_dir();
        let creds = dir.join("node-credentials.yaml");
        let mut text = String::from("nodes:\n");
        for n in &self.nodes {
            text.push_str(&format!("- name: {}\n  credential: {}\n", n.name, self.node_credential(n)));
            write_credential(n, &self.node_credential(n))?;
        }
        write_private(&creds, &text)?;
        let workloads = dir.join("workloads.yaml");
        if !workloads.exists() {
            self.write_controller_workloads(&[])?;
        }
        let log = dir.join(format!("controller-{}.log", COUNTER.fetch_add(1, Ordering::SeqCst)));
        let mut cmd = command_in(&self.fabric, &self.cgroup_root.join("controller"), bin("mesh-controller"))?;
        cmd.args(["--listen", &format!("{CONTROLLER_IP}:{port}"), "--log-format", "json"])
            .arg("--state-dir")
            .arg(state_dir)
            .arg("--workloads")
            .arg(&workloads)
            .arg("--node-credentials")
            .arg(&creds)
            .arg("--config-dir")
            .arg(self.config_dir())
            .args(extra)
            .stdout(Stdio::null())
            .stderr(File::create(&log)?);
        spawn_controller(&mut cmd, log)
    }

    /// Starts `sm-fakeapi` (a test fixture standing in for the Kubernetes API server) in the
    /// fabric netns on [`FAKE_API`], serving `dir`'s objects; writes the kubeconfig the
    /// controller uses to `dir/kubeconfig`.
    pub fn start_fake_api(&mut self, dir: &Path) -> Result<PathBuf> {
        std::fs::create_dir_all(dir.join("objects"))?;
        let log = dir.join("fakeapi.log");
        let mut cmd = command_in(&self.fabric, &self.cgroup_root.join("controller"), bin("sm-fakeapi"))?;
        cmd.args(["--listen", FAKE_API]).arg("--dir").arg(dir).stdout(Stdio::null()).stderr(File::create(&log)?);
        let child = cmd.spawn().context("starting sm-fakeapi")?;
        self.children.push(child);
        wait_for(Duration::from_secs(10), || Ok(std::fs::read_to_string(&log)?.contains("fake API server ready")))
            .context("sm-fakeapi did not start")?;
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!("apiVersion: v1\nkind: Config\nclusters: [{{name: fake, cluster: {{server: 'http://{FAKE_API}'}}}}]\nusers: [{{name: controller, user: {{token: controller-token}}}}]\ncontexts: [{{name: fake, context: {{cluster: fake, user: controller}}}}]\ncurrent-context: fake\n"),
        )?;
        Ok(kubeconfig)
    }

    /// Starts the controller with `--source kubernetes --node-auth kubernetes` against the fake
    /// API server's `kubeconfig`. Each node's credential file holds `token-<node>`, the token
    /// the fake API server's `tokens.json` (written here) binds to that node.
    pub fn start_kube_controller(&self, kubeconfig: &Path, extra: &[&str]) -> Result<Controller> {
        self.start_kube_controller_replica(kubeconfig, CONTROLLER_PORT, &self.controller_dir(), extra)
    }

    /// The same, listening on `port` with its state in `state_dir`: a replica beside the first
    /// (give it the first one's CA with `--ca-cert/--ca-key`, and other metrics and admin
    /// addresses).
    pub fn start_kube_controller_replica(
        &self,
        kubeconfig: &Path,
        port: u16,
        state_dir: &Path,
        extra: &[&str],
    ) -> Result<Controller> {
        let dir = self.controller_dir();
        let mut tokens = serde_json::Map::new();
        for n in &self.nodes {
            let token = format!("token-{}", n.name);
            tokens.insert(
                token.clone(),
                serde_json::json!({"username": "system:serviceaccount:sockmesh-system:sockmesh-agent", "node": n.name, "audiences": ["sockmesh-ca"]}),
            );
            write_credential(n, &token)?;
        }
        let api_dir = kubeconfig.parent().context("kubeconfig has no directory")?;
        std::fs::write(api_dir.join("tokens.json"), serde_json::to_vec(&tokens)?)?;
        std::fs::create_dir_all(&dir)?;
        let log = dir.join(format!("controller-{}.log", COUNTER.fetch_add(1, Ordering::SeqCst)));
        let mut cmd = command_in(&self.fabric, &self.cgroup_root.join("controller"), bin("mesh-controller"))?;
        cmd.args(["--listen", &format!("{CONTROLLER_IP}:{port}"), "--log-format", "json"])
            .arg("--state-dir")
            .arg(state_dir)
            .args(["--source", "kubernetes", "--node-auth", "kubernetes"])
            .env("KUBECONFIG", kubeconfig)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(File::create(&log)?);
        spawn_controller(&mut cmd, log)
    }

    /// Starts `sm-fakectl` (a test fixture) where the controller would be, pushing `script`
    /// (its JSON format is in the binary's documentation). It writes its own trust bundle where
    /// the agents read the controller's; every node's credential file is written as for the
    /// real controller.
    pub fn start_fake_controller(&self, script: &Value) -> Result<Controller> {
        let dir = self.controller_dir();
        for n in &self.nodes {
            write_credential(n, &self.node_credential(n))?;
        }
        let script_path = dir.join("fake-script.json");
        std::fs::write(&script_path, serde_json::to_vec(script)?)?;
        let log = dir.join(format!("fakectl-{}.log", COUNTER.fetch_add(1, Ordering::SeqCst)));
        let mut cmd = command_in(&self.fabric, &self.cgroup_root.join("controller"), bin("sm-fakectl"))?;
        cmd.args(["--listen", &format!("{CONTROLLER_IP}:{CONTROLLER_PORT}")])
            .arg("--state-dir")
            .arg(&dir)
            .arg("--script")
            .arg(&script_path)
            .stdout(Stdio::null())
            .stderr(File::create(&log)?);
        let child = cmd.spawn().context("starting sm-fakectl")?;
        let c = Controller { child: Some(child), log };
        wait_for(Duration::from_secs(20), || Ok(c.log_lines().iter().any(|l| l["message"] == "controller ready")))
            .with_context(|| {
                format!("sm-fakectl did not start: {}", std::fs::read_to_string(&c.log).unwrap_or_default())
            })?;
        Ok(c)
    }

    /// Starts the echo server in a pod on `port`; returns a handle to read who connected.
    pub fn start_server(&mut self, p: PodId, port: u16) -> Result<Server> {
        let log = self.dir.join(format!("server-{}-{port}.log", self.pod(p).name));
        let cmd = self.pod_command(p, bin("sm-testapp"))?;
        // Both families where the pod has IPv6, IPv4 only otherwise.
        let any =
            if self.pod(p).ip6.is_some() { IpAddr::V6(Ipv6Addr::UNSPECIFIED) } else { Ipv4Addr::UNSPECIFIED.into() };
        self.serve(cmd, SocketAddr::new(any, port), log)
    }

    fn serve(&mut self, mut cmd: Command, addr: SocketAddr, log: PathBuf) -> Result<Server> {
        let child = cmd
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

    /// Starts the node's agent with the node's workloads file, JSON logs and `extra` flags, in
    /// a cgroup below the node's cgroup root (where a DaemonSet's agent is).
    pub fn start_agent(&self, n: NodeId, extra: &[&str]) -> Result<Agent> {
        self.start_agent_in(n, &self.node(n).cgroup.join("agent"), extra)
    }

    /// The same, the agent's process in `cgroup` (created if missing; it must be below the
    /// topology's cgroup root, which the topology cleans up).
    pub fn start_agent_in(&self, n: NodeId, cgroup: &Path, extra: &[&str]) -> Result<Agent> {
        self.start_agent_at(n, &self.node(n).netns, cgroup, extra)
    }

    /// The same, the agent's process in `netns` too: a netns of its own, as a DaemonSet's
    /// agent pod has (`hostNetwork: false`). Its node-wide listeners (readiness, metrics,
    /// admin) are in that netns.
    pub fn start_agent_at(&self, n: NodeId, netns: &str, cgroup: &Path, extra: &[&str]) -> Result<Agent> {
        std::fs::create_dir_all(cgroup)?;
        let node = self.node(n);
        let log = node.state_dir.join(format!("agent-{}.log", COUNTER.fetch_add(1, Ordering::SeqCst)));
        let api = node.state_dir.join("agent.sock");
        let mut cmd = command_in(netns, cgroup, bin("mesh-agent"))?;
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
            .args(["--log-format", "json", "--connect-timeout-ms", "2000"]);
        // The controller, unless `extra` names the replicas (a repeated flag adds to the list).
        if !extra.iter().any(|a| *a == "--controller" || a.starts_with("--controller=")) {
            cmd.args(["--controller", &format!("https://{CONTROLLER_IP}:{CONTROLLER_PORT}")]);
        }
        cmd.arg("--trust-bundle")
            .arg(self.trust_bundle())
            .arg("--node-credential-file")
            .arg(node.state_dir.join("credential"));
        if node.workloads_file.exists() {
            cmd.arg("--workloads").arg(&node.workloads_file);
        }
        cmd.args(extra).stdout(Stdio::null()).stderr(File::create(&log)?);
        let child = cmd.spawn().context("starting mesh-agent")?;
        let mut agent = Agent { child: Some(child), log, api };
        // Generous: a successor is ready only once it has every certificate and the agent it
        // replaces has stopped, and a slow emulated VM takes its time.
        let ready = wait_for(Duration::from_secs(60), || {
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

    /// Ends the app now (it may be holding connections) and returns the report it printed.
    pub fn stop(mut self) -> Result<Value> {
        let _ = self.0.kill();
        self.result()
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

/// How long until `f` holds, polling (`None` if not within `limit`). For liveness: a test
/// reports the time, it does not judge it.
pub fn time_until(limit: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
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

    /// Stops the server without ending it (SIGSTOP): its listen queue fills and further
    /// connects to it wait, as they would to an app too busy to accept.
    pub fn pause(&self) {
        // SAFETY: the pid of a child this topology started.
        unsafe { libc::kill(self.pid as i32, libc::SIGSTOP) };
    }

    /// Lets a paused server run again (SIGCONT).
    pub fn resume(&self) {
        // SAFETY: as in pause.
        unsafe { libc::kill(self.pid as i32, libc::SIGCONT) };
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

    /// The agent's counters, as the API's own type.
    pub fn stats(&self) -> Result<mesh_api::admin::Stats> {
        Ok(serde_json::from_value(self.api(serde_json::json!({"op": "stats"}))?)?)
    }

    /// Graceful stop (SIGTERM), waiting for exit.
    pub fn stop(&mut self) -> Result<()> {
        self.signal(libc::SIGTERM)
    }

    /// Stops the agent without ending it (SIGSTOP): the kernel still completes handshakes to
    /// its listeners, nothing accepts them.
    pub fn pause(&self) {
        if let Some(pid) = self.pid() {
            // SAFETY: our own child's pid.
            unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
        }
    }

    /// Lets a paused agent run again (SIGCONT).
    pub fn resume(&self) {
        if let Some(pid) = self.pid() {
            // SAFETY: our own child's pid.
            unsafe { libc::kill(pid as i32, libc::SIGCONT) };
        }
    }

    /// Waits for the agent to exit on its own (after handing over, say), up to `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Result<std::process::ExitStatus> {
        let end = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                return Ok(status);
            }
            if self.child.is_none() {
                bail!("the agent was already stopped");
            }
            if Instant::now() > end {
                bail!("the agent did not exit within {limit:?}: {}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
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
