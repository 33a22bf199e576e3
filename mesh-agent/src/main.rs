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
mod hbone;
mod identity;
mod inputs;
mod kubeapi;
#[cfg(test)]
mod layers;
mod metrics;
mod netns;
mod outcome;
mod pods;
mod proxy;
mod registration;
mod sockdiag;
mod state;

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
        Cmd::Preflight { cgroup_root, bpffs } => preflight(cgroup_root, &bpffs),
        Cmd::Uninstall { bpffs_dir } => {
            ebpf::uninstall(&bpffs_dir).with_context(|| format!("removing {}", bpffs_dir.display()))?;
            eprintln!("removed {}: programs detached, maps freed", bpffs_dir.display());
            Ok(())
        }
    }
}

/// Prints one line per kernel feature, then whether the programs load; fails if anything is
/// missing.
fn preflight(cgroup_root: Option<PathBuf>, bpffs: &std::path::Path) -> anyhow::Result<()> {
    let cgroup_root = match cgroup_root {
        Some(p) => p,
        None => config::cgroup2_mount()?,
    };
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
    println!("preflight: this kernel runs the sockmesh datapath");
    Ok(())
}

/// Every proxied connection holds up to six descriptors (the pod's socket, the upstream one,
/// and a pipe per direction while a plain relay splices); the default soft limit (often 1024)
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
    let (daemonset, bpffs_dir) = (cfg.daemonset.clone(), cfg.bpffs_dir.clone());
    let agent = app::start(cfg).await?;
    tracing::info!(
        admin = %agent.admin_addr,
        metrics = %agent.metrics_addr,
        readiness = %agent.readiness_addr,
        api = %agent.api_socket.display(),
        failed = agent.failed,
        "serving"
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    let _ = std::fs::remove_file(&api_socket);
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

    /// Every flag and subcommand says what it is for in `--help`.
    #[test]
    fn every_flag_has_help_text() {
        let missing = mesh_api::cli::missing_help(&super::Cli::command());
        assert!(missing.is_empty(), "no help text: {missing:?}");
    }
}
