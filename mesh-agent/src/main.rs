//! mesh-agent: the per-node sockmesh agent.

mod admin;
mod api;
mod app;
mod balance;
mod census;
mod config;
mod config_watch;
mod connections;
mod ebpf;
mod gateway;
mod gateway_health;
mod handover;
mod hbone;
mod identity;
mod inputs;
mod kubeapi;
#[cfg(test)]
mod layers;
mod limits;
mod metrics;
mod netns;
mod outcome;
mod pods;
mod proxy;
mod registration;
mod sockdiag;
mod state;
mod transparent;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "mesh-agent", version, about = "sockmesh node agent")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Load and attach the kernel programs (or take over pinned ones) and serve this node.
    Run(Box<config::RunArgs>),
    /// A zone's east-west gateway: forwards other zones' tunnels to the agents of this zone's
    /// exported Services, without decrypting them. No kernel programs, no capture.
    Gateway(Box<gateway::GatewayArgs>),
    /// Detach everything this node's agents pinned and free the maps. Meshed pods lose
    /// capture: their connections go direct from then on.
    Uninstall {
        /// The node's bpffs directory (the agent's --bpffs-dir).
        #[arg(long)]
        bpffs_dir: PathBuf,
    },
    /// Check that this kernel has every feature the datapath needs and accepts the agent's
    /// programs, without attaching anything; exit 1 naming what is missing. For an init
    /// container, an install script, or before a kernel upgrade.
    Preflight {
        /// cgroup v2 directory the agent would attach to (a short-lived empty cgroup is made
        /// below it to probe links). Default: the cgroup v2 mount point.
        #[arg(long)]
        cgroup_root: Option<PathBuf>,
        /// A directory on bpffs where the programs' maps may live for the check (a scratch
        /// directory below it is removed afterwards).
        #[arg(long, default_value = "/sys/fs/bpf")]
        bpffs: PathBuf,
        /// Also check what an agent on a Kubernetes node needs (the init container's check): the
        /// cgroup root is the host's cgroup v2 root, --bpffs is the host's bpffs, the host's
        /// /proc is readable, and this process holds every capability the agent uses.
        #[arg(long, default_value_t = false)]
        kubelet_pods: bool,
        /// The host's /proc (with --kubelet-pods).
        #[arg(long, default_value = "/proc")]
        host_proc: PathBuf,
        /// The host's bpffs as the host sees it, to compare with --bpffs (with --kubelet-pods).
        /// Default: <host-proc>/1/root/sys/fs/bpf.
        #[arg(long)]
        host_bpffs: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Run(args) => {
            let cfg = config::Config::from_args(*args)?;
            init_logging(cfg.log_format);
            raise_nofile(6 * u64::from(cfg.max_connections) + 16384);
            limit_malloc_arenas();
            let rt =
                tokio::runtime::Builder::new_multi_thread().worker_threads(cfg.worker_threads).enable_all().build()?;
            rt.block_on(run(cfg))
        }
        Cmd::Gateway(args) => {
            init_logging(args.log_format);
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(gateway::run(*args))
        }
        Cmd::Preflight { cgroup_root, bpffs, kubelet_pods, host_proc, host_bpffs } => {
            let node = kubelet_pods.then(|| {
                let host_bpffs = host_bpffs.unwrap_or_else(|| host_proc.join("1/root/sys/fs/bpf"));
                (host_proc, host_bpffs)
            });
            preflight(cgroup_root, &bpffs, node)
        }
        Cmd::Uninstall { bpffs_dir } => {
            ebpf::uninstall(&bpffs_dir).with_context(|| format!("removing {}", bpffs_dir.display()))?;
            eprintln!("removed {}: programs detached, maps freed", bpffs_dir.display());
            Ok(())
        }
    }
}

/// Prints one line per kernel feature, then whether the programs load; fails if anything is
/// missing.
fn preflight(
    cgroup_root: Option<PathBuf>,
    bpffs: &std::path::Path,
    node: Option<(PathBuf, PathBuf)>,
) -> anyhow::Result<()> {
    let cgroup_root = match cgroup_root {
        Some(p) => p,
        None => config::cgroup2_mount()?,
    };
    let kubelet = node.is_some();
    if let Some((host_proc, host_bpffs)) = node {
        let problems = node_problems(&cgroup_root, bpffs, &host_proc, &host_bpffs);
        for p in &problems {
            println!("MISSING  {p}");
        }
        if !problems.is_empty() {
            anyhow::bail!(
                "preflight refused: this container cannot run the agent of a Kubernetes node; {} to fix (above)",
                problems.len()
            );
        }
        println!(
            "ok       mounts: {} is the host's cgroup v2 root, {} the host's bpffs, {} the host's /proc",
            cgroup_root.display(),
            bpffs.display(),
            host_proc.display()
        );
        println!(
            "ok       capabilities: {}",
            mesh_api::host::AGENT_CAPABILITIES.iter().map(|c| c.0).collect::<Vec<_>>().join(", ")
        );
    }
    let release = mesh_api::kernel::release();
    println!("kernel: Linux {release}");
    let missing = mesh_api::kernel::check(&cgroup_root).map_err(|e| anyhow::anyhow!("{e}"))?;
    for f in mesh_api::kernel::FEATURES {
        let m = missing.iter().find(|m| m.feature.name == f.name);
        match m {
            None => println!("ok       {} (Linux {})", f.name, f.since),
            Some(m) => println!("MISSING  {} (Linux {}): {}", f.name, f.since, m.error),
        }
    }
    if !missing.is_empty() {
        anyhow::bail!("{}", mesh_api::kernel::refusal(&release, &missing));
    }
    ebpf::verify_object(bpffs).context("the kernel programs do not load on this kernel")?;
    println!("ok       the agent's programs pass this kernel's verifier");
    if kubelet {
        // Not a refusal: the agent runs without it, refusing a new pod's cgroup when it sees it.
        match ebpf::verify_pod_hook(bpffs) {
            Ok(()) => println!("ok       pod cgroup hook: a meshed pod's cgroup is refused inside the kubelet's mkdir"),
            Err(e) => println!(
                "WARNING  pod cgroup hook: {e}; without it a new pod's cgroup is refused when the agent sees it, not inside the kubelet's mkdir"
            ),
        }
    }
    println!("preflight: this kernel runs the sockmesh datapath");
    Ok(())
}

/// What stops this process from being a Kubernetes node's agent: its mounts and capabilities.
fn node_problems(
    cgroup_root: &std::path::Path,
    bpffs: &std::path::Path,
    host_proc: &std::path::Path,
    host_bpffs: &std::path::Path,
) -> Vec<String> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut out = mesh_api::host::node_mount_problems(&mountinfo, cgroup_root, bpffs);
    if out.iter().all(|p| !p.starts_with(&bpffs.display().to_string())) {
        match mesh_api::host::same_filesystem(bpffs, host_bpffs) {
            Ok(true) => {}
            Ok(false) => out.push(format!(
                "{} is a bpffs of its own, not the host's (the host's is {}): mount the host's /sys/fs/bpf there (hostPath); pins in a private bpffs vanish with the container and every program detaches",
                bpffs.display(),
                host_bpffs.display()
            )),
            Err(e) => out.push(format!(
                "cannot see the host's bpffs at {} ({e}) to compare with {}: mount the host's /proc at {} (read-only) and add CAP_SYS_PTRACE",
                host_bpffs.display(),
                bpffs.display(),
                host_proc.display()
            )),
        }
    }
    if !host_proc.join("self").exists() {
        out.push(format!("{} is not a proc filesystem: mount the host's /proc there (read-only)", host_proc.display()));
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    for cap in mesh_api::host::missing_capabilities(&status) {
        let why = mesh_api::host::AGENT_CAPABILITIES.iter().find(|c| c.0 == cap).map(|c| c.2).unwrap_or("");
        out.push(format!(
            "capability CAP_{cap} is missing ({why}): add {cap} to the container's securityContext.capabilities.add"
        ));
    }
    out
}

/// Every proxied connection holds up to six descriptors (the pod's socket, the upstream one,
/// and a pipe per direction while a plain relay has a chunk in flight); the default soft limit (often 1024)
/// would refuse connections long before `--max-connections` does. The headroom covers what
/// each workload holds besides connections: its listeners, its netns handle and up to 32 spare
/// dial sockets (netns.rs), a few hundred workloads' worth. Raised as far as allowed, and said
/// when that is not far enough.
fn raise_nofile(want: u64) {
    let mut l = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain getrlimit/setrlimit on our own process with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) != 0 || l.rlim_cur >= want {
            return;
        }
        let up = libc::rlimit { rlim_cur: want, rlim_max: want.max(l.rlim_max) };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &up) == 0 {
            return;
        }
        let hard = libc::rlimit { rlim_cur: l.rlim_max, rlim_max: l.rlim_max };
        libc::setrlimit(libc::RLIMIT_NOFILE, &hard);
        tracing::warn!(
            limit = l.rlim_max,
            wanted = want,
            "open-file limit is below what --max-connections needs; raise the hard limit (`ulimit -Hn` in a shell, LimitNOFILE= in a systemd unit) or lower --max-connections"
        );
    }
}

/// glibc gives each thread that allocates its own arena (up to 8 per core), and memory freed
/// in one arena is not reused by another: after a burst of traffic the agent keeps several
/// arenas' worth of free memory resident. Two arenas keep lock contention low on the agent's
/// few threads and its idle footprint small.
fn limit_malloc_arenas() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt before any other thread exists; a plain integer setting.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

fn init_logging(format: config::LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SOCKMESH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: a log file or journal gets plain text that grep can read.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        config::LogFormat::Json => b.json().flatten_event(true).with_current_span(false).init(),
        config::LogFormat::Text => b.init(),
    }
}

async fn run(cfg: config::Config) -> anyhow::Result<()> {
    let api_socket = cfg.api_socket.clone();
    let (daemonset, bpffs_dir, state_dir) = (cfg.daemonset.clone(), cfg.bpffs_dir.clone(), cfg.state_dir.clone());
    let drain_deadline = std::time::Duration::from_secs(cfg.drain_deadline_seconds);
    std::fs::create_dir_all(&state_dir)?;
    // An agent running on this node (the one being upgraded) hands over its listeners.
    let dir = state_dir.clone();
    let mut taken = tokio::task::spawn_blocking(move || handover::take_over(&dir)).await??;
    // An agent that holds the node but does not answer would keep the pods' ports: capturing
    // beside it would refuse every pod. Said, instead.
    let mut lock = None;
    if taken.is_none() {
        lock = Some(handover::lock(&state_dir)?);
    }
    let mut handed = app::Handed::default();
    if let Some(t) = &mut taken {
        let count: usize = t.groups.values().map(Vec::len).sum();
        tracing::info!(predecessor = t.pid, listeners = count, "taking over from the agent running on this node");
        handed.successor = true;
        for (group, listeners) in t.groups.drain() {
            if group == "node" {
                handed.node = listeners.into_iter().collect();
            } else {
                handed.workloads.insert(group, listeners);
            }
        }
    }
    let agent = app::start(cfg, handed).await?;
    // The API socket is this agent's now; on the way out it is removed only if still so
    // (`Rebind::is_ours`).
    if let Some(t) = taken {
        let wait = std::time::Duration::from_secs(agent.views.config.handover_wait_seconds);
        if let Err((t, missing)) = take_over(&agent, t, wait).await {
            // The running agent serves on: the API's path is given back (it binds it again
            // once this agent's end of the hand-over closes), and nothing of the node's is
            // touched on the way out.
            if agent.api_rebind.is_ours(&api_socket) {
                let _ = std::fs::remove_file(&api_socket);
            }
            let pid = t.pid;
            drop(t);
            anyhow::bail!(
                "could not take over within --handover-wait-seconds {}: {}. The running agent (PID {pid}) serves on; fix what is missing (the controller must be reachable and sign each workload's certificate) and start this agent again (under a DaemonSet the kubelet restarts it, and the rollout waits meanwhile)",
                wait.as_secs(),
                missing.join("; ")
            );
        }
        // The predecessor stopped: what looked stale may be swept now, and the node lock
        // (released when the predecessor exits) is taken for this agent's life.
        agent.views.registry.set_hold(registration::Hold::None);
        let unclaimed = agent.views.registry.drop_unclaimed();
        if !unclaimed.is_empty() {
            tracing::info!(?unclaimed, "closed the predecessor's listeners of workloads this agent does not capture");
        }
        if agent.views.state.load().config.version > 0 {
            agent.views.registry.sweep_stale().await;
        }
        let dir = state_dir.clone();
        tokio::task::spawn_blocking(move || match handover::lock_blocking(&dir) {
            Ok(l) => std::mem::forget(l),
            Err(e) => tracing::warn!(error = %e, "could not take the node's agent lock"),
        });
    } else {
        agent.lifecycle.set(inputs::Phase::Serving);
    }
    let (stopped_tx, stopped) = tokio::sync::oneshot::channel::<()>();
    {
        let rt = tokio::runtime::Handle::current();
        let views = agent.views.clone();
        let node_fds = agent.node_fds.clone();
        let lifecycle = agent.lifecycle.clone();
        let tasks: Vec<_> = agent.tasks.iter().map(|t| t.abort_handle()).collect();
        let api_path = agent.api_rebind.clone();
        let offer = move || -> std::io::Result<handover::Offer> {
            // From here on the successor holds this agent's workloads too: nothing changes.
            views.registry.set_hold(registration::Hold::Frozen);
            api_path.disown();
            let mut groups = Vec::new();
            let mut node = Vec::new();
            for (kind, fd) in &node_fds {
                // SAFETY: owned by the node-wide tasks, which run until `on_stop` below.
                let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(*fd) };
                node.push(((*kind).to_owned(), fd.try_clone_to_owned()?));
            }
            groups.push(("node".to_owned(), node));
            for (pin, fds) in rt.block_on(views.registry.listener_fds())? {
                groups.push((pin, fds.into_iter().map(|(k, fd)| (k.to_owned(), fd)).collect()));
            }
            Ok(groups)
        };
        let (registry, api_rebind, rt) =
            (agent.views.registry.clone(), agent.api_rebind.clone(), tokio::runtime::Handle::current());
        let resume = move || {
            registry.set_hold(registration::Hold::None);
            api_rebind.wanted.notify_one();
            // What changed while frozen (pods come and gone, a new configuration) is caught up.
            let registry = registry.clone();
            rt.spawn(async move { registry.follow_config().await });
        };
        let on_stop = move || {
            lifecycle.set(inputs::Phase::Draining);
            for t in tasks {
                t.abort();
            }
            let _ = stopped_tx.send(());
        };
        // Without it this agent cannot be upgraded without a pause, but it serves: said, not fatal.
        if let Err(e) = handover::serve(&state_dir, offer, resume, on_stop) {
            tracing::error!(error = %e, "cannot answer successors; an upgrade of this agent will refuse connections while it restarts");
        }
    }
    tracing::info!(
        admin = %agent.admin_addr,
        metrics = %agent.metrics_addr,
        readiness = %agent.readiness_addr,
        api = %agent.api_socket.display(),
        failed = agent.failed,
        "agent ready"
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = stopped => {
            // Handed over: the successor owns the listeners, the API socket and the pins.
            drain(&agent, drain_deadline).await;
            if daemonset.is_some() {
                // Exiting now would have the kubelet restart this container, and the restarted
                // old agent would take over back from the new one: the pod's deletion ends it.
                tracing::info!("drained; waiting for the kubelet to stop this pod");
                term.recv().await;
            }
            drop(lock);
            return Ok(());
        }
    }
    // Only if still this agent's (bound again after a successor gave up, say).
    if agent.api_rebind.is_ours(&api_socket) {
        let _ = std::fs::remove_file(&api_socket);
    }
    drop(lock);
    if let Some((ns, name, api)) = &daemonset {
        match kubeapi::daemonset(api, ns, name, std::time::Duration::from_secs(5)).await {
            Ok(owner @ (kubeapi::Owner::Gone | kubeapi::Owner::Deleting)) => {
                // Uninstall: nothing of the mesh may stay behind to refuse the pods' traffic.
                let gone = if owner == kubeapi::Owner::Gone { "gone" } else { "being deleted" };
                match ebpf::uninstall(&bpffs_dir) {
                    Ok(()) => {
                        tracing::info!(daemonset = %format!("{ns}/{name}"), "agent stopping; its DaemonSet is {gone} (uninstall): kernel programs detached, pins removed")
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "agent stopping; its DaemonSet is {gone} but removing the pins failed: run `mesh-agent uninstall --bpffs-dir {}`", bpffs_dir.display())
                    }
                }
                return Ok(());
            }
            Ok(kubeapi::Owner::Present) => {
                tracing::info!(daemonset = %format!("{ns}/{name}"), "agent stopping; its DaemonSet is there (an upgrade or a drain): kernel programs stay attached");
                return Ok(());
            }
            Err(e) => {
                tracing::warn!(error = %e, "agent stopping; cannot tell whether its DaemonSet is gone: kernel programs stay attached (fail closed)");
                return Ok(());
            }
        }
    }
    // The programs stay attached (pinned): meshed pods fail closed until an agent is back.
    tracing::info!("agent stopping; kernel programs stay attached");
    Ok(())
}

/// Waits until this agent could serve every workload it captured (and the predecessor's
/// listeners are claimed, or a while has passed), then accepts and tells the predecessor to
/// stop. If the predecessor dies first, accepts at once: nothing else accepts any more. Gives
/// up after `wait`, handing back what it is missing: the predecessor serves on.
async fn take_over(
    agent: &app::Agent,
    t: handover::Taken,
    wait: std::time::Duration,
) -> Result<(), (handover::Taken, Vec<String>)> {
    let started = std::time::Instant::now();
    let mut logged = started;
    loop {
        let mut missing = agent.views.unable_to_serve();
        // Only what it cannot serve makes it give up; unclaimed listeners have their own wait.
        let cannot_serve = !missing.is_empty();
        let unclaimed = agent.views.registry.unclaimed();
        // Listeners of pods this agent has not captured yet (no configuration naming them
        // yet, say): waited for, a while, so that the predecessor does not close them.
        if unclaimed > 0 && started.elapsed() < UNCLAIMED_WAIT {
            missing.push(format!("{unclaimed} of the predecessor's workloads not captured yet"));
        }
        if missing.is_empty() {
            break;
        }
        if t.predecessor_gone() {
            tracing::warn!(?missing, "the predecessor went away before this agent took over; accepting now");
            agent.lifecycle.set(inputs::Phase::Serving);
            return Ok(());
        }
        if cannot_serve && started.elapsed() >= wait {
            return Err((t, missing));
        }
        if logged.elapsed() >= std::time::Duration::from_secs(10) {
            tracing::info!(?missing, predecessor = t.pid, "not taking over yet; the predecessor serves meanwhile");
            logged = std::time::Instant::now();
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    agent.lifecycle.set(inputs::Phase::Serving);
    match tokio::task::spawn_blocking(move || t.stop()).await {
        Ok(Ok(pid)) => tracing::info!(predecessor = pid, "took over: the predecessor stopped accepting and drains"),
        Ok(Err(e)) => tracing::warn!(error = %e, "the predecessor did not confirm it stopped accepting"),
        Err(e) => tracing::warn!(error = %e, "the predecessor did not confirm it stopped accepting"),
    }
    Ok(())
}

/// How long a successor waits for the predecessor's workloads it has not captured.
const UNCLAIMED_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// After a hand-over: waits for this agent's connections to end, up to `deadline`; those left
/// then are closed (by the exit) and counted. Accepted connections are counted from the
/// moment of their accept (set-up included), and the accept loops themselves until they have
/// stopped, so one accepted just as the hand-over happened is not missed. A SIGTERM meanwhile
/// (the kubelet deleting the old pod) changes nothing.
async fn drain(agent: &app::Agent, deadline: std::time::Duration) {
    let started = std::time::Instant::now();
    let in_flight = || agent.lifecycle.in_flight();
    let relayed = || agent.views.conns.count();
    let since_unix_ms =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    tracing::info!(
        open = relayed(),
        in_flight = in_flight(),
        deadline_s = deadline.as_secs(),
        since_unix_ms,
        "handed over to a successor; draining"
    );
    while (in_flight() > 0 || relayed() > 0) && started.elapsed() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // What the last relays queued (a stream's end, say) leaves before the exit closes them.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    if in_flight() == 0 && relayed() == 0 {
        tracing::info!(
            waited_ms = started.elapsed().as_millis() as u64,
            "drained: every connection ended; exiting, kernel programs stay attached"
        );
        return;
    }
    let listed = agent.views.conns.list();
    for c in &listed {
        tracing::warn!(
            direction = ?c.direction,
            src_workload = c.src_workload.as_deref().unwrap_or("-"),
            dst_workload = c.dst_workload.as_deref().unwrap_or("-"),
            "connection closed at the drain deadline"
        );
    }
    tracing::warn!(
        closed_at_deadline = listed.len().max(in_flight()),
        accepted_in_flight = in_flight(),
        relayed = listed.len(),
        deadline_s = deadline.as_secs(),
        "drain deadline reached: closing the connections still open; exiting, kernel programs stay attached"
    );
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    /// The shipped systemd unit starts the agent with flags it takes.
    #[test]
    fn the_systemd_units_command_line_parses() {
        let unit = include_str!("../../deploy/systemd/sockmesh-agent.service");
        let line = unit.lines().find_map(|l| l.strip_prefix("ExecStart=")).expect("an ExecStart line");
        let argv: Vec<String> = line
            .split_whitespace()
            .filter(|w| !w.starts_with("$SOCKMESH"))
            .map(|w| w.replace("%H", "n1").replace("${SOCKMESH_CONTROLLER}", "https://10.0.0.1:15012"))
            .collect();
        assert!(argv[0].ends_with("/mesh-agent"), "{line}");
        match super::Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{line}: {e}")).cmd {
            super::Cmd::Run(a) => assert_eq!(a.node, "n1"),
            _ => panic!("{line}: not `run`"),
        }
    }

    /// The documents of a manifest file.
    fn documents(text: &str) -> Vec<serde_yaml::Value> {
        use serde::Deserialize;
        serde_yaml::Deserializer::from_str(text).map(|d| serde_yaml::Value::deserialize(d).unwrap()).collect()
    }

    /// The volume a container mounts at the deepest mount path above `path`: (mount, volume).
    fn volume_for<'a>(
        c: &'a serde_yaml::Value,
        pod: &'a serde_yaml::Value,
        path: &std::path::Path,
    ) -> (&'a serde_yaml::Value, &'a serde_yaml::Value) {
        let mounts = c["volumeMounts"].as_sequence().expect("volumeMounts");
        let m = mounts
            .iter()
            .filter(|m| path.starts_with(m["mountPath"].as_str().unwrap()))
            .max_by_key(|m| m["mountPath"].as_str().unwrap().len())
            .unwrap_or_else(|| panic!("{} is under no volumeMount", path.display()));
        let vols = pod["volumes"].as_sequence().expect("volumes");
        let v = vols.iter().find(|v| v["name"] == m["name"]).unwrap_or_else(|| panic!("no volume {:?}", m["name"]));
        (m, v)
    }

    /// `path` is the projected service-account token for the CA's audience, on a volume of
    /// mode 0400 (the agent and gateway refuse a credential others can read).
    fn projected_token_at(c: &serde_yaml::Value, pod: &serde_yaml::Value, path: &std::path::Path) {
        let (m, v) = volume_for(c, pod, path);
        let token = &v["projected"]["sources"][0]["serviceAccountToken"];
        assert_eq!(token["audience"], "sockmesh-ca", "the controller's --token-audience");
        assert_eq!(std::path::Path::new(m["mountPath"].as_str().unwrap()).join(token["path"].as_str().unwrap()), path);
        assert_eq!(v["projected"]["defaultMode"].as_u64(), Some(0o400), "a credential others can read");
    }

    /// The zone gateway's Deployment (deploy/zone/) starts `mesh-agent gateway` with flags it
    /// takes, agreeing with its pod spec and Services: its credential is its own service
    /// account's projected token for the CA's audience (mode 0400, owned by the pod's one
    /// user), the identity it asks for is that service account's, the probe reads its admin
    /// port, and the Service sends the other zones to the port it listens on. It asks the
    /// controller by the name the controller's Service gives it.
    #[test]
    fn the_gateways_command_line_parses_and_agrees_with_its_pod_spec() {
        let docs = documents(include_str!("../../deploy/zone/gateway.yaml"));
        let namespace =
            documents(include_str!("../../deploy/kustomization.yaml"))[0]["namespace"].as_str().unwrap().to_owned();
        let dep = docs.iter().find(|d| d["kind"] == "Deployment").expect("a Deployment");
        let pod = &dep["spec"]["template"]["spec"];
        let c = &pod["containers"][0];
        let args: Vec<&str> = std::iter::once("mesh-agent")
            .chain(c["args"].as_sequence().unwrap().iter().map(|a| a.as_str().unwrap()))
            .collect();
        let a = match super::Cli::try_parse_from(&args).unwrap_or_else(|e| panic!("{args:?}: {e}")).cmd {
            super::Cmd::Gateway(a) => a,
            _ => panic!("not `gateway`"),
        };
        assert_eq!(a.service_account, format!("{namespace}/{}", pod["serviceAccountName"].as_str().unwrap()));
        projected_token_at(c, pod, &a.node_credential_file);
        assert!(pod["securityContext"]["runAsUser"].as_u64().is_some(), "the token file's owner is the pod's user");
        let (m, v) = volume_for(c, pod, &a.trust_bundle);
        assert_eq!(v["configMap"]["name"], "sockmesh-trust-bundle");
        assert!(a.trust_bundle.starts_with(m["mountPath"].as_str().unwrap()));
        assert_eq!(c["readinessProbe"]["httpGet"]["port"].as_u64(), Some(u64::from(a.admin_addr.port())));
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/ready");
        let ports: Vec<u64> =
            c["ports"].as_sequence().unwrap().iter().map(|p| p["containerPort"].as_u64().unwrap()).collect();
        assert!(ports.contains(&u64::from(a.listen.port())), "{ports:?}");
        let svc = docs.iter().find(|d| d["kind"] == "Service" && d["metadata"]["name"] == "sockmesh-gateway").unwrap();
        assert_eq!(svc["spec"]["selector"], pod_labels(dep));
        assert_eq!(svc["spec"]["ports"][0]["targetPort"].as_u64(), Some(u64::from(a.listen.port())));
        let controller = documents(include_str!("../../deploy/controller.yaml"));
        let ctl_svc = controller.iter().find(|d| d["kind"] == "Service").unwrap();
        let host = format!("{}.{namespace}.svc", ctl_svc["metadata"]["name"].as_str().unwrap());
        assert_eq!(a.controller, [format!("https://{host}:15012")]);
        assert_eq!(a.controller_name, host);
    }

    /// A workload's pod template labels.
    fn pod_labels(d: &serde_yaml::Value) -> serde_yaml::Value {
        d["spec"]["template"]["metadata"]["labels"].clone()
    }

    /// The DaemonSet in deploy/ starts the agent (and its preflight) with flags it takes, and
    /// they agree with the pod spec: each path is on the volume it must be (the host's /proc
    /// read-only, cgroup, bpffs with propagation from the host, /run/sockmesh, the projected
    /// token for the CA's audience with mode 0400, the trust bundle), the probe's port is the
    /// readiness port, the DaemonSet named is itself, and the capabilities are exactly those
    /// the agent uses.
    #[test]
    fn the_daemonsets_command_lines_parse_and_agree_with_its_pod_spec() {
        let docs = documents(include_str!("../../deploy/agent.yaml"));
        let kustomization = documents(include_str!("../../deploy/kustomization.yaml"));
        let namespace = kustomization[0]["namespace"].as_str().unwrap();
        let ds = docs.iter().find(|d| d["kind"] == "DaemonSet").expect("a DaemonSet");
        let pod = &ds["spec"]["template"]["spec"];
        let c = &pod["containers"][0];
        let args: Vec<String> = std::iter::once("mesh-agent".to_owned())
            .chain(
                c["args"].as_sequence().unwrap().iter().map(|a| a.as_str().unwrap().replace("$(NODE_NAME)", "node-1")),
            )
            .collect();
        let a = match super::Cli::try_parse_from(&args).unwrap_or_else(|e| panic!("{args:?}: {e}")).cmd {
            super::Cmd::Run(a) => a,
            _ => panic!("not `run`"),
        };
        assert!(a.kubelet_pods);
        assert_eq!(
            a.daemonset.as_deref(),
            Some(format!("{namespace}/{}", ds["metadata"]["name"].as_str().unwrap()).as_str())
        );
        assert_eq!(c["env"][0]["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName");
        let host = |p: &std::path::Path| {
            let (m, v) = volume_for(c, pod, p);
            (v["hostPath"]["path"].as_str().map(str::to_owned), m.clone())
        };
        let (src, m) = host(&a.host_proc);
        assert_eq!((src.as_deref(), m["readOnly"].as_bool()), (Some("/proc"), Some(true)));
        let cgroup_root = a.cgroup_root.clone().expect("--cgroup-root");
        assert_eq!(host(&cgroup_root).0.as_deref(), Some("/sys/fs/cgroup"));
        let (src, m) = host(a.bpffs_dir.as_ref().expect("--bpffs-dir"));
        assert_eq!((src.as_deref(), m["mountPropagation"].as_str()), (Some("/sys/fs/bpf"), Some("HostToContainer")));
        assert_eq!(host(a.state_dir.as_ref().expect("--state-dir")).0.as_deref(), Some("/run/sockmesh"));
        projected_token_at(c, pod, &a.node_credential_file);
        let (m, v) = volume_for(c, pod, &a.trust_bundle);
        assert!(v["configMap"]["name"].is_string());
        assert!(a.trust_bundle.starts_with(m["mountPath"].as_str().unwrap()));
        assert_eq!(c["readinessProbe"]["httpGet"]["port"].as_u64(), Some(u64::from(a.readiness_addr.port())));
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], mesh_api::admin::paths::READY);
        assert!(c["ports"]
            .as_sequence()
            .unwrap()
            .iter()
            .any(|p| p["containerPort"].as_u64() == Some(u64::from(a.metrics_addr.port()))));
        // The init container's preflight checks the same mounts.
        let init = &pod["initContainers"][0];
        let args: Vec<&str> = std::iter::once("mesh-agent")
            .chain(init["args"].as_sequence().unwrap().iter().map(|a| a.as_str().unwrap()))
            .collect();
        match super::Cli::try_parse_from(&args).unwrap_or_else(|e| panic!("{args:?}: {e}")).cmd {
            super::Cmd::Preflight { cgroup_root: cg, bpffs, kubelet_pods, host_proc, .. } => {
                assert!(kubelet_pods);
                assert_eq!((cg.as_ref(), host_proc), (Some(&cgroup_root), a.host_proc.clone()));
                assert!(a.bpffs_dir.as_ref().unwrap().starts_with(&bpffs));
            }
            _ => panic!("the init container does not run preflight"),
        }
        assert_eq!(init["volumeMounts"], {
            let mut v = c["volumeMounts"].as_sequence().unwrap().clone();
            v.retain(|m| init["volumeMounts"].as_sequence().unwrap().iter().any(|i| i["name"] == m["name"]));
            serde_yaml::Value::Sequence(v)
        });
        // Not privileged; drop ALL; add exactly what the agent uses — in both containers.
        let want: Vec<&str> = mesh_api::host::AGENT_CAPABILITIES.iter().map(|c| c.0).collect();
        for ctr in [c, init] {
            let sc = &ctr["securityContext"];
            assert_eq!(sc["privileged"].as_bool(), Some(false));
            assert_eq!(sc["capabilities"]["drop"][0], "ALL");
            let add: Vec<&str> =
                sc["capabilities"]["add"].as_sequence().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
            assert_eq!(add, want, "capabilities of {:?}", ctr["name"]);
        }
        assert_eq!(pod["hostNetwork"].as_bool(), Some(false));
        assert_eq!(pod["priorityClassName"], "system-node-critical");
        assert_eq!(pod["tolerations"][0]["operator"], "Exists");
        let ru = &ds["spec"]["updateStrategy"]["rollingUpdate"];
        // The new agent beside the old one: the hand-over needs both at once.
        assert_eq!((ru["maxSurge"].as_u64(), ru["maxUnavailable"].as_u64()), (Some(1), Some(0)));
        // The kubelet waits for the drain deadline before it kills a handed-over agent.
        let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
        let deadline = a.drain_deadline_seconds;
        assert!(grace > deadline, "terminationGracePeriodSeconds {grace} <= drain deadline {deadline}");
    }

    /// Every flag and subcommand says what it is for in `--help`.
    #[test]
    fn every_flag_has_help_text() {
        let missing = mesh_api::cli::missing_help(&super::Cli::command());
        assert!(missing.is_empty(), "no help text: {missing:?}");
    }
}
