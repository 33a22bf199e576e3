//! sm-cpbench: the control-plane scale benchmark (`cargo xtask bench --control-plane`).
//!
//! The real `mesh-controller`, reading a generated configuration directory (N nodes' workloads,
//! policies in many namespaces, one root-namespace PeerAuthentication used as a sentinel), and N
//! simulated agents in this one process: each its own TLS connection to the controller,
//! authenticated with its own node credential, watching the configuration like an agent does
//! (every upsert's JSON decoded, the resources kept per node) and asking the CA for a
//! certificate. It measures:
//!
//! - the snapshot: time for each node to get it, its size, the controller's RSS and CPU after;
//! - policy changes: one AuthorizationPolicy rewritten in its file, time until every node it
//!   concerns (the nodes running the workloads it selects) applied it; then the sentinel is
//!   changed and awaited on every node: a stream is ordered, so what a node got between two
//!   sentinels is what the policy change cost it — no timing window is involved;
//! - a node joining with everything running: time to its full snapshot;
//! - the CA: every node asks for a certificate at once; signed per second, latency.
//!
//! Report: report.txt (each row against its target, with the gap) and report.json. Exits
//! non-zero on errors only (a stream or a certificate request failing, a wait timing out), never
//! on a missed target.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use mesh_api::push::config_service_client::ConfigServiceClient;
use mesh_api::push::{ConfigUpdate, Kind, WatchRequest};
use mesh_identity::proto::certificate_service_client::CertificateServiceClient;
use mesh_identity::proto::CreateCertificateRequest;
use prost::Message;
use serde_json::{json, Value};
use tonic::transport::{Channel, Endpoint};

const ROOT_NAMESPACE: &str = "sockmesh-system";
const SENTINEL: &str = "sentinel";
const TRUST_DOMAIN: &str = "cluster.local";
const SERVER_NAME: &str = "mesh-controller";
/// What a real agent accepts in one message: tonic's default decoding limit (the agent does not
/// raise it). The simulated agents accept any size and report the largest seen against it.
const AGENT_MAX_MESSAGE: u64 = 4 * 1024 * 1024;
/// Workloads per app (replicas), and over how many nodes an app's replicas are spread.
const REPLICAS: usize = 10;
const SPREAD: usize = 3;
/// Apps per namespace.
const APPS_PER_NAMESPACE: usize = 100;

#[derive(Parser, Debug, Clone)]
#[command(about = "control-plane scale benchmark: the real controller, many simulated agents")]
struct Opts {
    /// Nodes watching from the start (one more joins later).
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    /// Workloads, spread evenly over the nodes (the joining one included).
    #[arg(long, default_value_t = 100_000)]
    workloads: usize,
    /// AuthorizationPolicies, each selecting one app (about 10 workloads on about 3 nodes).
    #[arg(long, default_value_t = 10_000)]
    policies: usize,
    /// One-policy changes to measure.
    #[arg(long, default_value_t = 20)]
    changes: usize,
    /// Where report.json and report.txt go.
    #[arg(long, default_value = "target/bench/control-plane")]
    out: PathBuf,
    /// A short run: 50 nodes, 2,000 workloads, 200 policies, 5 changes.
    #[arg(long)]
    quick: bool,
    /// How long any one wait may take before the bench fails (a stuck controller must not hang it).
    #[arg(long, default_value_t = 600)]
    timeout_secs: u64,
    /// Nodes connecting (TLS handshake, Watch, snapshot) at once.
    #[arg(long, default_value_t = 200)]
    connect_concurrency: usize,
    /// Stop (and fail) if the controller's and this process's RSS together exceed this many MiB,
    /// rather than let the kernel's OOM killer pick a victim on a shared machine. Default: 75%
    /// of the memory available at start.
    #[arg(long)]
    mem_limit_mib: Option<u64>,
    /// Keep the generated directory (configuration, credentials, controller log).
    #[arg(long)]
    keep: bool,
}

// ---------------------------------------------------------------------------------------------
// The generated cluster.

struct App {
    ns: usize,
    name: String,
    /// Nodes running its replicas (sorted, distinct).
    nodes: Vec<usize>,
}

struct Workload {
    app: usize,
    name: String,
    ip: String,
}

struct Policy {
    app: usize,
    name: String,
    /// The principal its rule allows is caller-g<gen>: changed to make a one-policy change.
    generation: u32,
}

struct Plan {
    nodes: Vec<String>,
    namespaces: Vec<String>,
    apps: Vec<App>,
    workloads: Vec<Workload>,
    policies: Vec<Policy>,
    /// Policies by namespace (indices), in file order.
    policies_by_ns: Vec<Vec<usize>>,
    /// Workloads by node.
    workloads_by_node: Vec<Vec<usize>>,
    sentinel_strict: bool,
}

impl Plan {
    /// `nodes` nodes in all (the joining one is the last).
    fn new(nodes: usize, workloads: usize, policies: usize) -> Plan {
        let node_names: Vec<String> = (0..nodes).map(|i| format!("node-{i:04}")).collect();
        let n_apps = (workloads / REPLICAS).max(1);
        let n_ns = (n_apps / APPS_PER_NAMESPACE).max(1);
        let namespaces: Vec<String> = (0..n_ns).map(|i| format!("ns-{i:03}")).collect();
        let spread = SPREAD.min(nodes);
        let mut apps: Vec<App> =
            (0..n_apps).map(|a| App { ns: a % n_ns, name: format!("app-{a:05}"), nodes: Vec::new() }).collect();
        let mut wls = Vec::with_capacity(workloads);
        let mut by_node = vec![Vec::new(); nodes];
        for i in 0..workloads {
            let a = (i / REPLICAS).min(n_apps - 1);
            let r = i - a * REPLICAS;
            // App a's replicas take slots a*spread .. a*spread+spread-1, dealt round the nodes:
            // every node gets about as many workloads, every app sits on `spread` nodes.
            let node = (a * spread + r % spread) % nodes;
            let n = i + 1;
            let ip = format!("10.{}.{}.{}", (n >> 16) & 255, (n >> 8) & 255, n & 255);
            by_node[node].push(i);
            if !apps[a].nodes.contains(&node) {
                apps[a].nodes.push(node);
            }
            wls.push(Workload { app: a, name: format!("{}-{r}", apps[a].name), ip });
        }
        for a in &mut apps {
            a.nodes.sort_unstable();
        }
        let mut pols = Vec::with_capacity(policies);
        let mut by_ns = vec![Vec::new(); n_ns];
        for j in 0..policies {
            let a = j % n_apps;
            let name = if j < n_apps {
                format!("allow-{}", apps[a].name)
            } else {
                format!("allow-{}-{}", apps[a].name, j / n_apps)
            };
            by_ns[apps[a].ns].push(j);
            pols.push(Policy { app: a, name, generation: 0 });
        }
        Plan {
            nodes: node_names,
            namespaces,
            apps,
            workloads: wls,
            policies: pols,
            policies_by_ns: by_ns,
            workloads_by_node: by_node,
            sentinel_strict: true,
        }
    }

    fn workloads_file(&self, node: usize) -> String {
        let mut s = String::new();
        for &i in &self.workloads_by_node[node] {
            let w = &self.workloads[i];
            let app = &self.apps[w.app];
            s.push_str(&format!(
                "kind: Workload\nname: {}\nnamespace: {}\nserviceAccount: {}\nlabels: {{app: {}}}\nips: [{}]\nnode: {}\n---\n",
                w.name, self.namespaces[app.ns], app.name, app.name, w.ip, self.nodes[node]
            ));
        }
        s
    }

    fn policies_file(&self, ns: usize) -> String {
        let mut s = String::new();
        let nsn = &self.namespaces[ns];
        for &j in &self.policies_by_ns[ns] {
            let p = &self.policies[j];
            let app = &self.apps[p.app].name;
            s.push_str(&format!(
                "apiVersion: security.sockmesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: {}, namespace: {nsn}}}\nspec:\n  selector: {{matchLabels: {{app: {app}}}}}\n  action: ALLOW\n  rules:\n  - from:\n    - source: {{principals: [\"{TRUST_DOMAIN}/ns/{nsn}/sa/caller-g{}\"]}}\n    to:\n    - operation: {{ports: [\"8080\"]}}\n---\n",
                p.name, p.generation
            ));
        }
        s
    }

    fn sentinel_file(&self) -> String {
        let mode = if self.sentinel_strict { "STRICT" } else { "PERMISSIVE" };
        format!(
            "apiVersion: security.sockmesh.io/v1alpha1\nkind: PeerAuthentication\nmetadata: {{name: {SENTINEL}, namespace: {ROOT_NAMESPACE}}}\nspec:\n  mtls: {{mode: {mode}}}\n"
        )
    }

    /// The marker a policy's JSON carries once its change `generation` is in.
    fn marker(generation: u32) -> String {
        format!("caller-g{generation}\"")
    }

    /// Policies selecting workloads on `node`.
    fn policies_on(&self, node: usize) -> usize {
        self.policies.iter().filter(|p| self.apps[p.app].nodes.contains(&node)).count()
    }
}

/// Writes `text` to `path` whole: a temporary file (ignored by the controller) renamed into
/// place. `before_rename` runs just before the rename (the change's t0).
fn write_atomic(path: &Path, text: &str, before_rename: impl FnOnce()) -> Result<()> {
    let tmp = path.with_extension("yaml.tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    before_rename();
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

fn random_hex(bytes: usize) -> Result<String> {
    let mut buf = vec![0u8; bytes];
    use std::io::Read;
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

// ---------------------------------------------------------------------------------------------
// The controller process.

struct ProcStat {
    rss: u64,
    hwm: u64,
    cpu_s: f64,
}

fn proc_stat(pid: u32) -> Option<ProcStat> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb = |field: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .map(|v| v * 1024)
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime) of stat(5); `rest` starts at field 3.
    let ticks: u64 = rest.get(11)?.parse::<u64>().ok()? + rest.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(ProcStat { rss: kb("VmRSS:")?, hwm: kb("VmHWM:").unwrap_or(0), cpu_s: ticks as f64 / hz })
}

struct Controller {
    child: Child,
    log: PathBuf,
}

impl Controller {
    fn pid(&self) -> u32 {
        self.child.id()
    }
    fn stat(&self) -> Result<ProcStat> {
        proc_stat(self.pid()).ok_or_else(|| anyhow!("the controller (pid {}) is gone", self.pid()))
    }
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        // SAFETY: our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn bin(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("SOCKMESH_BIN_DIR") {
        return PathBuf::from(dir).join(name);
    }
    // Next to this binary (target/release), else the workspace's target/release.
    if let Some(p) = std::env::current_exe().ok().and_then(|e| e.parent().map(|d| d.join(name))) {
        if p.exists() {
            return p;
        }
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release").join(name)
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

// ---------------------------------------------------------------------------------------------
// Simulated agents.

/// What one simulated agent has seen, shared with the driver (the resources themselves stay in
/// the agent's task).
#[derive(Default)]
struct Seen {
    /// When it started connecting, and when its snapshot was applied.
    started: Option<Instant>,
    snapshot_at: Option<Instant>,
    snapshot_bytes: u64,
    /// Messages it came in (an update may be sent in parts).
    snapshot_parts: u64,
    snapshot_resources: usize,
    /// Its own workloads found in its snapshot.
    own_workloads: usize,
    /// AuthorizationPolicies it holds: (namespace, name) -> (JSON, when last applied).
    authz: HashMap<(String, String), (String, Instant)>,
    /// Sentinel upserts received (the snapshot's included).
    sentinels: u32,
    /// Received since the last sentinel, the sentinel itself excluded.
    since_sentinel: Round,
    /// Per sentinel after the snapshot: what was received since the one before.
    rounds: Vec<Round>,
    bytes: u64,
    messages: u64,
    largest_message: u64,
    error: Option<String>,
    channel: Option<Channel>,
}

type Shared = Arc<Mutex<Seen>>;

fn key_hash(kind: i32, ns: &str, name: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (kind, ns, name).hash(&mut h);
    h.finish()
}

fn text_hash(s: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    s.hash(&mut h);
    h.finish()
}

struct AgentSpec {
    credential: String,
    /// Key hashes of the workloads placed on this node.
    own: Vec<u64>,
}

async fn agent(
    spec: AgentSpec,
    endpoint: Endpoint,
    seen: Shared,
    permits: Arc<tokio::sync::Semaphore>,
    connected: Arc<AtomicU64>,
) {
    let r = agent_inner(&spec, endpoint, &seen, permits, &connected).await;
    let mut s = seen.lock().unwrap();
    s.error = Some(match r {
        Ok(()) => "the configuration stream ended".into(),
        Err(e) => format!("{e:#}"),
    });
}

async fn agent_inner(
    spec: &AgentSpec,
    endpoint: Endpoint,
    seen: &Shared,
    permits: Arc<tokio::sync::Semaphore>,
    connected: &AtomicU64,
) -> Result<()> {
    let permit = permits.acquire_owned().await?;
    seen.lock().unwrap().started = Some(Instant::now());
    // Its own connection, as a node has.
    let channel = endpoint.connect().await.context("connecting to the controller")?;
    seen.lock().unwrap().channel = Some(channel.clone());
    connected.fetch_add(1, Ordering::Relaxed);
    let mut client = ConfigServiceClient::new(channel).max_decoding_message_size(usize::MAX);
    let mut req = tonic::Request::new(WatchRequest { accepts_parts: true });
    req.metadata_mut().insert("authorization", format!("Bearer {}", spec.credential).parse()?);
    let mut stream = client.watch(req).await.context("Watch")?.into_inner();
    let mut permit = Some(permit);
    // key hash -> JSON hash: what the node holds.
    let mut resources: HashMap<u64, u64> = HashMap::new();
    let sentinel_key = key_hash(Kind::PeerAuthentication as i32, ROOT_NAMESPACE, SENTINEL);
    // An update sent in parts (`more`) is one update, applied when its last part is in.
    let mut update: Option<Update> = None;
    while let Some(u) = stream.message().await.context("configuration stream")? {
        let up = update.get_or_insert_with(|| Update { snapshot: u.snapshot, ..Default::default() });
        if u.snapshot {
            resources.clear();
        }
        let more = u.more;
        decode(&mut resources, &u, sentinel_key, up)?;
        if more {
            continue;
        }
        let up = update.take().expect("an update under way");
        let snapshot = up.snapshot;
        publish(seen, up);
        if snapshot {
            let own = spec.own.iter().filter(|k| resources.contains_key(k)).count();
            let mut s = seen.lock().unwrap();
            s.snapshot_resources = resources.len();
            s.own_workloads = own;
            drop(permit.take());
        }
    }
    Ok(())
}

/// One update (all its parts): what the driver needs of it.
#[derive(Default)]
struct Update {
    snapshot: bool,
    bytes: u64,
    parts: u64,
    largest_part: u64,
    authz: Vec<((String, String), String)>,
    removed_authz: Vec<(String, String)>,
    /// The sentinel's share of the bytes, if it is in this update.
    sentinel_bytes: Option<u64>,
    /// Upserts by kind, and removals, the sentinel left out.
    kinds: BTreeMap<String, u64>,
}

/// Applies one part as an agent does: every upsert's JSON decoded (a full parse), the node's
/// resources changed.
fn decode(resources: &mut HashMap<u64, u64>, u: &ConfigUpdate, sentinel_key: u64, up: &mut Update) -> Result<()> {
    let len = u.encoded_len() as u64;
    up.bytes += len;
    up.parts += 1;
    up.largest_part = up.largest_part.max(len);
    for r in &u.upserts {
        serde_json::from_str::<serde::de::IgnoredAny>(&r.json)
            .with_context(|| format!("resource {}/{}: JSON does not decode", r.namespace, r.name))?;
        let kind = Kind::try_from(r.kind).map_err(|_| anyhow!("unknown kind {}", r.kind))?;
        let k = key_hash(r.kind, &r.namespace, &r.name);
        resources.insert(k, text_hash(&r.json));
        match kind {
            Kind::AuthorizationPolicy => up.authz.push(((r.namespace.clone(), r.name.clone()), r.json.clone())),
            Kind::PeerAuthentication if k == sentinel_key => {
                // Its share of the message: the field's tag, length and body.
                up.sentinel_bytes = Some(prost::encoding::message::encoded_len(2, r) as u64);
                continue;
            }
            Kind::Rejected => bail!("the controller rejected configuration: {}", r.json),
            _ => {}
        }
        *up.kinds.entry(kind.as_str_name().to_owned()).or_default() += 1;
    }
    for k in &u.removals {
        resources.remove(&key_hash(k.kind, &k.namespace, &k.name));
        if k.kind == Kind::AuthorizationPolicy as i32 {
            up.removed_authz.push((k.namespace.clone(), k.name.clone()));
        }
        *up.kinds.entry("removal".to_owned()).or_default() += 1;
    }
    Ok(())
}

/// Records a whole update for the driver: when it was applied, and its bytes in the round
/// between two sentinels.
fn publish(seen: &Shared, up: Update) {
    let now = Instant::now();
    let mut s = seen.lock().unwrap();
    if up.snapshot {
        s.authz.clear();
        s.snapshot_at = Some(now);
        s.snapshot_bytes = up.bytes;
        s.snapshot_parts = up.parts;
    }
    for (k, json) in up.authz {
        s.authz.insert(k, (json, now));
    }
    for k in up.removed_authz {
        s.authz.remove(&k);
    }
    s.bytes += up.bytes;
    s.messages += up.parts;
    s.largest_message = s.largest_message.max(up.largest_part);
    if up.snapshot {
        s.sentinels += u32::from(up.sentinel_bytes.is_some());
        s.since_sentinel = Round::default();
        return;
    }
    let other = !up.kinds.is_empty();
    let r = &mut s.since_sentinel;
    match up.sentinel_bytes {
        // Only the sentinel: the update's own framing is not the change's.
        Some(_) if !other => {}
        Some(own) => {
            r.bytes += up.bytes - own;
            r.updates += 1;
        }
        None => {
            r.bytes += up.bytes;
            r.updates += 1;
        }
    }
    for (k, n) in up.kinds {
        *r.kinds.entry(k).or_default() += n;
    }
    if up.sentinel_bytes.is_some() {
        s.sentinels += 1;
        let round = std::mem::take(&mut s.since_sentinel);
        s.rounds.push(round);
    }
}

/// What a node got between two sentinels.
#[derive(Default, Clone)]
struct Round {
    bytes: u64,
    updates: u64,
    kinds: BTreeMap<String, u64>,
}

// ---------------------------------------------------------------------------------------------
// The driver.

struct Watchdog {
    over: Arc<AtomicBool>,
    why: Arc<Mutex<String>>,
}

/// Kills the controller if it and this process together grow past `limit` bytes.
fn watchdog(pid: u32, limit: u64) -> Watchdog {
    let over = Arc::new(AtomicBool::new(false));
    let why = Arc::new(Mutex::new(String::new()));
    let (o, w) = (over.clone(), why.clone());
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_millis(200));
        let Some(c) = proc_stat(pid) else { return };
        let me = proc_stat(std::process::id()).map(|s| s.rss).unwrap_or(0);
        if c.rss + me > limit {
            *w.lock().unwrap() = format!(
                "memory limit: controller RSS {} MiB + bench RSS {} MiB > {} MiB (--mem-limit-mib); the controller was killed",
                c.rss >> 20,
                me >> 20,
                limit >> 20
            );
            o.store(true, Ordering::SeqCst);
            // SAFETY: our own child's pid.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            return;
        }
    });
    Watchdog { over, why }
}

struct Driver {
    opts: Opts,
    controller: Controller,
    watchdog: Watchdog,
    seen: Vec<Shared>,
}

impl Driver {
    /// Waits until `done` holds, failing after the timeout, on an agent's error, or if the
    /// controller died. `what` names the wait for the error.
    async fn wait(&mut self, what: &str, mut done: impl FnMut(&[Shared]) -> Result<bool, String>) -> Result<()> {
        let end = Instant::now() + Duration::from_secs(self.opts.timeout_secs);
        loop {
            if self.watchdog.over.load(Ordering::SeqCst) {
                bail!("{what}: {}", self.watchdog.why.lock().unwrap());
            }
            if let Ok(Some(st)) = self.controller.child.try_wait() {
                bail!("{what}: the controller exited ({st}); its log ends:\n{}", self.controller.log_tail());
            }
            match done(&self.seen) {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(pending) => {
                    if Instant::now() > end {
                        bail!("{what}: not done after {} s (--timeout-secs): {pending}", self.opts.timeout_secs);
                    }
                }
            }
            if let Some((i, e)) =
                self.seen.iter().enumerate().find_map(|(i, s)| s.lock().unwrap().error.clone().map(|e| (i, e)))
            {
                bail!("{what}: node-{i:04}'s agent failed: {e}");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() -> Result<()> {
    let mut opts = Opts::parse();
    if opts.quick {
        (opts.nodes, opts.workloads, opts.policies, opts.changes) = (50, 2000, 200, 5);
    }
    if opts.nodes == 0 || opts.workloads == 0 || opts.policies == 0 {
        bail!("--nodes, --workloads and --policies must be positive");
    }
    raise_nofile(opts.nodes)?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let dir = std::env::temp_dir().join(format!("sm-cpbench-{}", std::process::id()));
    let r = rt.block_on(run(opts.clone(), &dir));
    if !opts.keep {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        eprintln!("kept {}", dir.display());
    }
    // Agents' streams are still open: leave without waiting for their tasks.
    rt.shutdown_background();
    r
}

fn raise_nofile(nodes: usize) -> Result<()> {
    let mut l = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: a valid pointer to an rlimit.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) };
    l.rlim_cur = l.rlim_max;
    // SAFETY: as above. The controller inherits it.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &l) };
    let need = nodes as u64 * 2 + 256;
    if l.rlim_cur < need {
        bail!("{} nodes need about {need} open files; the limit is {} (ulimit -n)", nodes, l.rlim_cur);
    }
    Ok(())
}

fn mem_available() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(8 << 30)
}

async fn run(opts: Opts, dir: &Path) -> Result<()> {
    let started = Instant::now();
    let n = opts.nodes;
    let mut plan = Plan::new(n + 1, opts.workloads, opts.policies);
    let joiner = n;
    eprintln!(
        "sm-cpbench: {n} nodes (+1 joining), {} workloads in {} namespaces ({} apps), {} policies, {} changes",
        opts.workloads,
        plan.namespaces.len(),
        plan.apps.len(),
        opts.policies,
        opts.changes
    );

    // 1. The files.
    let _ = std::fs::remove_dir_all(dir);
    let config = dir.join("config");
    std::fs::create_dir_all(&config)?;
    let controller_bin = bin("mesh-controller");
    if !controller_bin.exists() {
        bail!("{} is not built (cargo build --release -p mesh-controller)", controller_bin.display());
    }
    let ca = Command::new(&controller_bin).args(["ca", "init", "--out"]).arg(dir.join("ca")).output()?;
    if !ca.status.success() {
        bail!("mesh-controller ca init failed: {}", String::from_utf8_lossy(&ca.stderr));
    }
    let mut credentials = Vec::with_capacity(n + 1);
    let mut list = String::from("nodes:\n");
    for name in &plan.nodes {
        let c = random_hex(24)?;
        list.push_str(&format!("- {{name: {name}, credential: {c}}}\n"));
        credentials.push(c);
    }
    let creds_path = dir.join("nodes.yaml");
    tests::process::write_private(&creds_path, &list)?;
    for node in 0..=n {
        std::fs::write(config.join(format!("workloads-{}.yaml", plan.nodes[node])), plan.workloads_file(node))?;
    }
    for ns in 0..plan.namespaces.len() {
        std::fs::write(config.join(format!("policies-{}.yaml", plan.namespaces[ns])), plan.policies_file(ns))?;
    }
    let sentinel_path = config.join("root.yaml");
    std::fs::write(&sentinel_path, plan.sentinel_file())?;
    eprintln!("  configuration written in {:.1} s", started.elapsed().as_secs_f64());

    // 2. The controller.
    let port = free_port()?;
    let log = dir.join("controller.log");
    let t_spawn = Instant::now();
    let child = Command::new(&controller_bin)
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--metrics-addr")
        .arg(format!("127.0.0.1:{}", free_port()?))
        .arg("--admin-addr")
        .arg(format!("127.0.0.1:{}", free_port()?))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--ca-cert")
        .arg(dir.join("ca/ca.pem"))
        .arg("--ca-key")
        .arg(dir.join("ca/ca-key.pem"))
        .args(["--source", "local", "--config-dir"])
        .arg(&config)
        .args(["--node-auth", "static", "--node-credentials"])
        .arg(&creds_path)
        .args(["--root-namespace", ROOT_NAMESPACE, "--server-name", SERVER_NAME, "--log-format", "json"])
        .env("SOCKMESH_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .context("starting mesh-controller")?;
    let controller = Controller { child, log };
    let limit = opts.mem_limit_mib.map(|m| m << 20).unwrap_or(mem_available() / 4 * 3);
    let watchdog = watchdog(controller.pid(), limit);
    let mut d = Driver { opts: opts.clone(), controller, watchdog, seen: Vec::new() };
    {
        let log = d.controller.log.clone();
        d.wait("the controller becoming ready", |_| {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("\"controller ready\"") {
                Ok(true)
            } else {
                Err("no \"controller ready\" in its log".into())
            }
        })
        .await?;
    }
    let ready_ms = ms(t_spawn.elapsed());
    let st_ready = d.controller.stat()?;
    eprintln!("  controller ready in {:.0} ms, RSS {} MiB", ready_ms, st_ready.rss >> 20);

    // 3. The agents and their snapshots.
    let bundle = std::fs::read_to_string(dir.join("state/trust-bundle.pem")).context("the trust bundle")?;
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(&bundle))
        .domain_name(SERVER_NAME);
    let endpoint = Channel::from_shared(format!("https://127.0.0.1:{port}"))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(30));
    let permits = Arc::new(tokio::sync::Semaphore::new(opts.connect_concurrency.max(1)));
    let connected = Arc::new(AtomicU64::new(0));
    d.seen = (0..=n).map(|_| Shared::default()).collect();
    let own_keys = |node: usize, plan: &Plan| -> Vec<u64> {
        plan.workloads_by_node[node]
            .iter()
            .map(|&i| {
                let w = &plan.workloads[i];
                key_hash(Kind::Workload as i32, &plan.namespaces[plan.apps[w.app].ns], &w.name)
            })
            .collect()
    };
    let spawn_agent = |node: usize, plan: &Plan, d: &Driver| {
        let spec = AgentSpec { credential: credentials[node].clone(), own: own_keys(node, plan) };
        tokio::spawn(agent(spec, endpoint.clone(), d.seen[node].clone(), permits.clone(), connected.clone()));
    };
    let cpu0 = d.controller.stat()?.cpu_s;
    let t_snap = Instant::now();
    for node in 0..n {
        spawn_agent(node, &plan, &d);
    }
    d.wait("every node's snapshot", |seen| {
        let got = seen[..n].iter().filter(|s| s.lock().unwrap().snapshot_at.is_some()).count();
        if got == n {
            Ok(true)
        } else {
            Err(format!("{got} of {n} nodes have their snapshot"))
        }
    })
    .await?;
    let snapshots_all_ms = ms(t_snap.elapsed());
    let cpu_snap = d.controller.stat()?.cpu_s - cpu0;
    let (mut snap_ms, mut snap_bytes, mut snap_res, mut snap_parts) = (Vec::new(), Vec::new(), Vec::new(), 0);
    for s in &d.seen[..n] {
        let s = s.lock().unwrap();
        snap_ms.push(ms(s.snapshot_at.unwrap() - s.started.unwrap()));
        snap_bytes.push(s.snapshot_bytes as f64);
        snap_res.push(s.snapshot_resources as f64);
        snap_parts = snap_parts.max(s.snapshot_parts);
    }
    let (snap_ms, snap_bytes, snap_res) = (sorted(snap_ms), sorted(snap_bytes), sorted(snap_res));
    // A moment for the allocator to settle, then the controller's memory with every node watching.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let st_watching = d.controller.stat()?;
    eprintln!(
        "  {n} snapshots in {:.0} ms (p50 {:.0} ms, p99 {:.0} ms per node), {:.0} KiB each; controller RSS {} MiB",
        snapshots_all_ms,
        quantile(&snap_ms, 0.5),
        quantile(&snap_ms, 0.99),
        quantile(&snap_bytes, 0.5) / 1024.0,
        st_watching.rss >> 20
    );

    // 4. One-policy changes, each followed by a sentinel.
    let mut changes = Vec::new();
    let candidates: Vec<usize> =
        (0..plan.policies.len()).filter(|&j| !plan.apps[plan.policies[j].app].nodes.contains(&joiner)).collect();
    if candidates.is_empty() {
        bail!("every policy concerns the joining node: use more nodes");
    }
    let cpu_changes0 = d.controller.stat()?.cpu_s;
    let mut rss_peak_changes = 0u64;
    for k in 0..opts.changes {
        let j = candidates[(k * candidates.len() / opts.changes.max(1) + k * 7) % candidates.len()];
        let app = plan.policies[j].app;
        let ns = plan.apps[app].ns;
        let generation = k as u32 + 1;
        plan.policies[j].generation = generation;
        let key = (plan.namespaces[ns].clone(), plan.policies[j].name.clone());
        let concerned = plan.apps[app].nodes.clone();
        let path = config.join(format!("policies-{}.yaml", plan.namespaces[ns]));
        let mut t0 = Instant::now();
        write_atomic(&path, &plan.policies_file(ns), || t0 = Instant::now())?;
        let marker = Plan::marker(generation);
        d.wait(&format!("change {k}: policy {}/{} on its {} nodes", key.0, key.1, concerned.len()), |seen| {
            let pending = concerned
                .iter()
                .filter(|&&c| !seen[c].lock().unwrap().authz.get(&key).is_some_and(|(j, _)| j.contains(&marker)))
                .count();
            if pending == 0 {
                Ok(true)
            } else {
                Err(format!("{pending} of {} nodes lack it", concerned.len()))
            }
        })
        .await?;
        let times: Vec<f64> = concerned.iter().map(|&c| ms(d.seen[c].lock().unwrap().authz[&key].1 - t0)).collect();
        let last = times.iter().cloned().fold(0.0, f64::max);
        rss_peak_changes = rss_peak_changes.max(d.controller.stat()?.rss);
        // The sentinel, on every watching node: closes this change's round.
        plan.sentinel_strict = !plan.sentinel_strict;
        write_atomic(&sentinel_path, &plan.sentinel_file(), || {})?;
        let want = k as u32 + 2;
        d.wait(&format!("change {k}: the sentinel on every node"), |seen| {
            let got = seen[..n].iter().filter(|s| s.lock().unwrap().sentinels >= want).count();
            if got == n {
                Ok(true)
            } else {
                Err(format!("{got} of {n} nodes have it"))
            }
        })
        .await?;
        // Still holding the change once the round closed (counted, not assumed).
        let applied = concerned
            .iter()
            .filter(|&&c| d.seen[c].lock().unwrap().authz.get(&key).is_some_and(|(j, _)| j.contains(&marker)))
            .count();
        let mut concerned_bytes = Vec::new();
        let (mut other_bytes, mut other_nodes, mut other_updates) = (0u64, 0usize, 0u64);
        // What was sent, by kind: to the nodes concerned, and to the others.
        let (mut kinds_concerned, mut kinds_other) = (BTreeMap::<String, u64>::new(), BTreeMap::<String, u64>::new());
        for (i, s) in d.seen[..n].iter().enumerate() {
            let s = s.lock().unwrap();
            let r = s.rounds.get(k).ok_or_else(|| anyhow!("node-{i:04}: no round {k}"))?;
            let kinds = if concerned.contains(&i) {
                concerned_bytes.push(r.bytes);
                &mut kinds_concerned
            } else {
                other_bytes += r.bytes;
                other_updates += r.updates;
                other_nodes += usize::from(r.bytes > 0);
                &mut kinds_other
            };
            for (kind, c) in &r.kinds {
                *kinds.entry(kind.clone()).or_default() += c;
            }
        }
        eprintln!(
            "  change {k}: {}/{} ({} nodes) applied by the last in {:.0} ms; {:?} B to each; {} B to the {} others",
            key.0,
            key.1,
            concerned.len(),
            last,
            concerned_bytes,
            other_bytes,
            n - concerned.len()
        );
        changes.push(json!({
            "policy": format!("{}/{}", key.0, key.1),
            "concerned_nodes": concerned.len(),
            "concerned_applied": applied,
            "propagation_ms": times,
            "last_ms": last,
            "bytes_per_concerned_node": concerned_bytes,
            "nonconcerned_nodes": n - concerned.len(),
            "nonconcerned_bytes": other_bytes,
            "nonconcerned_updates": other_updates,
            "sent_to_concerned_by_kind": kinds_concerned,
            "sent_to_nonconcerned_by_kind": kinds_other,
            "nonconcerned_nodes_with_bytes": other_nodes,
        }));
    }
    let cpu_changes = d.controller.stat()?.cpu_s - cpu_changes0;

    // 5. A node joining with everything running.
    let cpu_join0 = d.controller.stat()?.cpu_s;
    let t_join = Instant::now();
    spawn_agent(joiner, &plan, &d);
    d.wait("the joining node's snapshot", |seen| {
        if seen[joiner].lock().unwrap().snapshot_at.is_some() {
            Ok(true)
        } else {
            Err("no snapshot yet".into())
        }
    })
    .await?;
    let join_ms = ms(t_join.elapsed());
    let cpu_join = d.controller.stat()?.cpu_s - cpu_join0;
    let (join_bytes, join_resources, join_own, join_authz) = {
        let s = d.seen[joiner].lock().unwrap();
        (s.snapshot_bytes, s.snapshot_resources, s.own_workloads, s.authz.len())
    };
    eprintln!("  node joined: snapshot in {join_ms:.0} ms, {} KiB", join_bytes / 1024);

    // 6. The CA: every node asks for a certificate for one of its workloads at once.
    let mut csrs = Vec::new();
    for node in 0..n {
        let Some(&w) = plan.workloads_by_node[node].first() else { continue };
        let app = &plan.apps[plan.workloads[w].app];
        let id = mesh_identity::SpiffeId::workload(TRUST_DOMAIN, &plan.namespaces[app.ns], &app.name)
            .map_err(|e| anyhow!("{e}"))?;
        let (_key, csr) = mesh_identity::ca::workload_csr(&id).map_err(|e| anyhow!("{e}"))?;
        let channel = d.seen[node].lock().unwrap().channel.clone().context("a node without its channel")?;
        csrs.push((node, csr, channel));
    }
    let cpu_ca0 = d.controller.stat()?.cpu_s;
    let t_ca = Instant::now();
    let mut tasks = Vec::new();
    for (node, csr, channel) in csrs {
        let cred = credentials[node].clone();
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let mut req = tonic::Request::new(CreateCertificateRequest { csr, validity_duration_seconds: 0 });
            req.metadata_mut().insert("authorization", format!("Bearer {cred}").parse().expect("hex is header text"));
            let r = CertificateServiceClient::new(channel).create_certificate(req).await;
            let took = t.elapsed();
            match r {
                Ok(resp) if !resp.get_ref().cert_chain.is_empty() => Ok(took),
                Ok(_) => Err(format!("node-{node:04}: an empty chain")),
                Err(e) => Err(format!("node-{node:04}: {e}")),
            }
        }));
    }
    let (mut ca_ms, mut ca_errors) = (Vec::new(), Vec::new());
    for t in tasks {
        match t.await? {
            Ok(took) => ca_ms.push(ms(took)),
            Err(e) => ca_errors.push(e),
        }
    }
    let ca_wall = t_ca.elapsed();
    let cpu_ca = d.controller.stat()?.cpu_s - cpu_ca0;
    let ca_ms = sorted(ca_ms);
    let signed = ca_ms.len();
    let per_s = signed as f64 / ca_wall.as_secs_f64();
    eprintln!("  CA: {signed} certificates in {:.0} ms ({per_s:.0}/s), {} errors", ms(ca_wall), ca_errors.len());

    // Agents' own errors (a stream that ended) after the fact.
    let st_end = d.controller.stat()?;
    let mut errors: Vec<String> = ca_errors.iter().take(10).cloned().collect();
    for (i, s) in d.seen.iter().enumerate() {
        if let Some(e) = &s.lock().unwrap().error {
            errors.push(format!("node-{i:04}: {e}"));
        }
    }

    // 7. The report.
    let lasts = sorted(changes.iter().map(|c| c["last_ms"].as_f64().unwrap()).collect());
    let every = sorted(
        changes
            .iter()
            .flat_map(|c| c["propagation_ms"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()))
            .collect(),
    );
    let concerned_b = sorted(
        changes
            .iter()
            .flat_map(|c| c["bytes_per_concerned_node"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()))
            .collect(),
    );
    let other_total: u64 = changes.iter().map(|c| c["nonconcerned_bytes"].as_u64().unwrap()).sum();
    let other_nodes_max =
        changes.iter().map(|c| c["nonconcerned_nodes_with_bytes"].as_u64().unwrap()).max().unwrap_or(0);
    let largest = d.seen.iter().map(|s| s.lock().unwrap().largest_message).max().unwrap_or(0);
    let rss_per_wl = st_watching.rss as f64 / opts.workloads as f64;
    let cpu_per_change = cpu_changes / opts.changes.max(1) as f64;
    let report = json!({
        "machine": tests::bench::machine(),
        "params": {
            "nodes": n, "workloads": opts.workloads, "policies": opts.policies, "changes": opts.changes,
            "namespaces": plan.namespaces.len(), "apps": plan.apps.len(), "quick": opts.quick,
        },
        "controller": {
            "ready_ms": ready_ms,
            "rss_bytes_ready": st_ready.rss,
            "rss_bytes_watching": st_watching.rss,
            "rss_bytes_per_workload": rss_per_wl,
            "rss_bytes_per_workload_ready": st_ready.rss as f64 / opts.workloads as f64,
            "rss_bytes_per_node_watching": (st_watching.rss as f64 - st_ready.rss as f64) / n as f64,
            "rss_bytes_peak_changes": rss_peak_changes,
            "rss_bytes_end": st_end.rss,
            "rss_bytes_hwm": st_end.hwm,
            "cpu_s_startup": st_ready.cpu_s,
            "cpu_s_snapshots": cpu_snap,
            "cpu_s_per_change": cpu_per_change,
            "cpu_s_join": cpu_join,
            "cpu_s_ca": cpu_ca,
        },
        "snapshot": {
            "all_ms": snapshots_all_ms,
            "p50_ms": quantile(&snap_ms, 0.5),
            "p99_ms": quantile(&snap_ms, 0.99),
            "max_ms": quantile(&snap_ms, 1.0),
            "bytes_per_node_median": quantile(&snap_bytes, 0.5),
            "bytes_per_node_max": quantile(&snap_bytes, 1.0),
            "parts_per_node_max": snap_parts,
            "resources_per_node_median": quantile(&snap_res, 0.5),
            "largest_message_bytes": largest,
        },
        "propagation": {
            "last_p50_ms": quantile(&lasts, 0.5),
            "last_p99_ms": quantile(&lasts, 0.99),
            "per_node_p50_ms": quantile(&every, 0.5),
            "per_node_p99_ms": quantile(&every, 0.99),
        },
        "bytes": {
            "per_concerned_node_median": quantile(&concerned_b, 0.5),
            "per_concerned_node_max": quantile(&concerned_b, 1.0),
            "per_concerned_node_min": quantile(&concerned_b, 0.0),
            "nonconcerned_total": other_total,
            "nonconcerned_nodes_with_bytes_max": other_nodes_max,
        },
        "changes": changes,
        "join": {
            "ms": join_ms,
            "bytes": join_bytes,
            "resources": join_resources,
            "own_workloads_expected": plan.workloads_by_node[joiner].len(),
            "own_workloads_received": join_own,
            "policies_expected": plan.policies_on(joiner),
            "policies_received": join_authz,
            "cpu_s": cpu_join,
        },
        "ca": {
            "requested": n, "signed": signed, "errors": ca_errors.len(),
            "wall_ms": ms(ca_wall), "per_s": per_s,
            "p50_ms": quantile(&ca_ms, 0.5), "p99_ms": quantile(&ca_ms, 0.99),
        },
        "errors": errors,
        "took_s": started.elapsed().as_secs_f64(),
    });
    let text = report_text(&report);
    print!("{text}");
    std::fs::create_dir_all(&opts.out).with_context(|| format!("creating {}", opts.out.display()))?;
    std::fs::write(opts.out.join("report.json"), serde_json::to_string_pretty(&report)?)?;
    std::fs::write(opts.out.join("report.txt"), &text)?;
    eprintln!("report in {}", opts.out.display());
    if !errors.is_empty() {
        bail!("{} errors: {}", errors.len(), errors.join("; "));
    }
    Ok(())
}

/// One row: what, the value shown, the target shown, met, the gap.
struct Row {
    what: String,
    value: String,
    target: String,
    met: Option<bool>,
    gap: String,
}

/// A row judged `value ≤ target` (in `unit`, shown divided by `scale`).
fn at_most(what: &str, value: f64, target: f64, unit: &str, scale: f64) -> Row {
    let f = |v: f64| {
        if v / scale >= 100.0 || v == 0.0 {
            format!("{:.0} {unit}", v / scale)
        } else {
            format!("{:.2} {unit}", v / scale)
        }
    };
    let met = value <= target;
    let gap = if target == 0.0 {
        if met {
            "none sent".into()
        } else {
            format!("{} too many", f(value))
        }
    } else if met {
        format!("{:.0}% of target", 100.0 * value / target)
    } else {
        format!("{} over ({:.2}× target)", f(value - target), value / target)
    };
    Row { what: what.into(), value: f(value), target: format!("≤ {}", f(target)), met: Some(met), gap }
}

fn info(what: &str, value: String) -> Row {
    Row { what: what.into(), value, target: "-".into(), met: None, gap: String::new() }
}

fn report_text(r: &Value) -> String {
    let g = |path: &str| path.split('.').fold(r, |v, k| &v[k]).as_f64().unwrap_or(f64::NAN);
    let p = &r["params"];
    let (kib, mib) = (1024.0, 1024.0 * 1024.0);
    let rows = vec![
        at_most("policy propagation, last node, p50 over changes", g("propagation.last_p50_ms"), 1000.0, "ms", 1.0),
        at_most("policy propagation, last node, p99 over changes", g("propagation.last_p99_ms"), 1000.0, "ms", 1.0),
        info("policy propagation per concerned node, p50", format!("{:.0} ms", g("propagation.per_node_p50_ms"))),
        info("policy propagation per concerned node, p99", format!("{:.0} ms", g("propagation.per_node_p99_ms"))),
        info("controller RSS, every node watching", format!("{:.1} MiB", g("controller.rss_bytes_watching") / mib)),
        at_most("controller RSS per workload", g("controller.rss_bytes_per_workload"), 2048.0, "B", 1.0),
        info(
            "  of which: configuration loaded, per workload",
            format!("{:.0} B", g("controller.rss_bytes_per_workload_ready")),
        ),
        info(
            "  of which: each watching node's stream (after its snapshot)",
            format!("{:.0} KiB", g("controller.rss_bytes_per_node_watching") / kib),
        ),
        info(
            "controller RSS before any node (config loaded)",
            format!("{:.1} MiB", g("controller.rss_bytes_ready") / mib),
        ),
        info("controller RSS high-water mark", format!("{:.1} MiB", g("controller.rss_bytes_hwm") / mib)),
        info("controller CPU: start and load", format!("{:.2} s", g("controller.cpu_s_startup"))),
        info("controller CPU: every node's snapshot", format!("{:.2} s", g("controller.cpu_s_snapshots"))),
        info(
            "controller CPU per one-policy change (with its sentinel)",
            format!("{:.3} s", g("controller.cpu_s_per_change")),
        ),
        at_most(
            "bytes per concerned node per change, median",
            g("bytes.per_concerned_node_median"),
            10.0 * kib,
            "KiB",
            kib,
        ),
        at_most("bytes per concerned node per change, max", g("bytes.per_concerned_node_max"), 10.0 * kib, "KiB", kib),
        at_most("bytes to non-concerned nodes, all changes", g("bytes.nonconcerned_total"), 0.0, "B", 1.0),
        info(
            "snapshot per node: size (median, max)",
            format!(
                "{:.0} KiB, {:.0} KiB",
                g("snapshot.bytes_per_node_median") / kib,
                g("snapshot.bytes_per_node_max") / kib
            ),
        ),
        info(
            "snapshot per node: time (p50, p99; all nodes)",
            format!("{:.0} ms, {:.0} ms; {:.0} ms", g("snapshot.p50_ms"), g("snapshot.p99_ms"), g("snapshot.all_ms")),
        ),
        info("snapshot per node: messages (parts), most", format!("{:.0}", g("snapshot.parts_per_node_max"))),
        at_most(
            "largest message vs the agent's decoding limit (4 MiB)",
            g("snapshot.largest_message_bytes"),
            AGENT_MAX_MESSAGE as f64,
            "MiB",
            mib,
        ),
        info(
            "node joining: time to its full snapshot",
            format!("{:.0} ms ({:.0} KiB)", g("join.ms"), g("join.bytes") / kib),
        ),
        info("CA: certificates signed per second, all nodes at once", format!("{:.0} /s", g("ca.per_s"))),
        info("CA: latency p50, p99", format!("{:.0} ms, {:.0} ms", g("ca.p50_ms"), g("ca.p99_ms"))),
    ];
    let mark = |m: Option<bool>| match m {
        Some(true) => "✓ met",
        Some(false) => "✗ missed",
        None => "",
    };
    let m = &r["machine"];
    let mut s = format!(
        "sockmesh control-plane bench: {} nodes (+1 joining), {} workloads, {} policies, {} changes\n\
         machine: {} CPUs ({}), kernel {}, commit {}, {}\n",
        p["nodes"],
        p["workloads"],
        p["policies"],
        p["changes"],
        m["cpus"],
        m["cpu_model"].as_str().unwrap_or(""),
        m["kernel"].as_str().unwrap_or(""),
        m["commit"].as_str().unwrap_or(""),
        m["date"].as_str().unwrap_or(""),
    );
    for row in &rows {
        s.push_str(&format!(
            "  {:<60} {:>24}   target {:<12} {:<9} {}\n",
            row.what,
            row.value,
            row.target,
            mark(row.met),
            row.gap
        ));
    }
    let missed: Vec<&Row> = rows.iter().filter(|r| r.met == Some(false)).collect();
    s.push_str(&format!(
        "targets: {} met, {} missed{}\n",
        rows.iter().filter(|r| r.met == Some(true)).count(),
        missed.len(),
        if missed.is_empty() {
            String::new()
        } else {
            format!(" ({})", missed.iter().map(|r| r.what.as_str()).collect::<Vec<_>>().join("; "))
        }
    ));
    s.push_str(
        "note: the simulated agents run on the same machine as the controller and share its CPUs; \
         propagation includes the controller's 200 ms polling of its configuration directory.\n",
    );
    s
}
