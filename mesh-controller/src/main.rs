//! mesh-controller: the sockmesh control plane. The CA (gRPC over TLS), authorizing each node
//! for the identities of the workloads placed on it, and the configuration push to agents,
//! from a local directory or the Kubernetes API.

mod auth;
mod auth_kube;
mod ca_service;
mod config_dir;
mod kube_source;
mod meshes;
mod model;
mod nodes;
mod placement;
mod push;
mod state_lock;
mod view;
mod zones;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use mesh_identity::ca::Ca;
use mesh_identity::proto::certificate_service_server::CertificateServiceServer;

#[derive(Parser, Debug)]
#[command(
    name = "mesh-controller",
    version,
    about = "sockmesh control plane: the CA, node authorization and the configuration push",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    run: Args,
}

#[derive(clap::Subcommand, Debug)]
enum Cmd {
    /// Nodes' credentials for static node authentication.
    #[command(subcommand)]
    Node(NodeCmd),
    /// The CA the controller signs with, for an install where several replicas must sign with
    /// one CA (Kubernetes): made once, kept by the operator (a Secret), given as --ca-cert and
    /// --ca-key.
    #[command(subcommand)]
    Ca(CaCmd),
}

#[derive(clap::Subcommand, Debug)]
enum CaCmd {
    /// Make a root CA (ECDSA P-256, ten years): <out>/ca.pem and <out>/ca-key.pem (mode 0600).
    /// Refuses to overwrite either.
    Init {
        /// The directory to write them in (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// The trust domain, written in the root's subject (the controller's --trust-domain).
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
    },
    /// Make a zone's intermediate CA under a root made by `ca init` (five years): <out>/ca.pem
    /// and <out>/ca-key.pem (mode 0600), and <out>/chain.pem (the root). Give them to the zone's
    /// controller as --ca-cert, --ca-key and --ca-chain. Refuses to overwrite.
    Intermediate {
        /// The root's certificate and key (`ca init`'s output directory).
        #[arg(long)]
        root: PathBuf,
        /// The zone's name.
        #[arg(long)]
        zone: String,
        /// The directory to write the zone's CA in (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// The trust domain, written in the intermediate's subject (the root's).
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
    },
}

/// Writes a zone's intermediate to `out` (see [`CaCmd::Intermediate`]).
fn ca_intermediate(
    root: &std::path::Path,
    zone: &str,
    out: &std::path::Path,
    trust_domain: &str,
) -> anyhow::Result<()> {
    zones::Settings::zone_id(trust_domain, zone).map_err(|e| anyhow::anyhow!("--zone: {e}"))?;
    let read = |p: PathBuf| std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()));
    let (root_cert, root_key) = (read(root.join("ca.pem"))?, read(root.join("ca-key.pem"))?);
    let made =
        Ca::generate_intermediate(trust_domain, zone, &root_cert, &root_key).map_err(|e| anyhow::anyhow!("{e}"))?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    for (name, text, mode) in
        [("ca-key.pem", &made.key_pem, 0o600), ("ca.pem", &made.cert_pem, 0o644), ("chain.pem", &root_cert, 0o644)]
    {
        write_new(&out.join(name), text, mode)?;
    }
    Ok(())
}

/// Writes a file that must not exist yet, with `mode`.
fn write_new(p: &std::path::Path, text: &str, mode: u32) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(p)
        .with_context(|| format!("writing {} (a CA is made once: move the old one away first)", p.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

/// Writes a new root CA to `out` (see [`CaCmd::Init`]); the paths written.
fn ca_init(out: &std::path::Path, trust_domain: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let (cert, key) = (out.join("ca.pem"), out.join("ca-key.pem"));
    for p in [&cert, &key] {
        if p.exists() {
            bail!("{} exists: a CA is made once (keep the one you have, or move it away first)", p.display());
        }
    }
    let root = Ca::generate_root(trust_domain).map_err(|e| anyhow::anyhow!("{e}"))?;
    write_new(&key, &root.key_pem, 0o600)?;
    write_new(&cert, &root.cert_pem, 0o644)?;
    Ok((cert, key))
}

#[derive(clap::Subcommand, Debug)]
enum NodeCmd {
    /// Create a credential for a node: adds it to the controller's list (created if absent)
    /// and writes the node's credential file; both mode 0600. A running controller picks the
    /// new node up within a second.
    Add {
        /// The node's name, as its agent's --node.
        name: String,
        /// The controller's list (its --node-credentials).
        #[arg(long)]
        node_credentials: PathBuf,
        /// Where to write the node's credential (its agent's --node-credential-file); must not
        /// exist. Default: <name>.credential.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(clap::Args, Debug)]
struct Args {
    /// gRPC (TLS) listen address.
    #[arg(long, default_value = "0.0.0.0:15012")]
    listen: SocketAddr,
    /// The SPIFFE trust domain of every identity the CA signs (spiffe://<domain>/ns/..).
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// The controller's own directory: a generated root CA (root.pem, root-key.pem) kept across
    /// restarts, and trust-bundle.pem for agents. One controller per directory: it holds
    /// controller.lock while it runs, and a second one started on it exits with an error.
    #[arg(long, required = true)]
    state_dir: Option<PathBuf>,
    /// Operator-provided signing certificate (root or intermediate) and key, instead of a
    /// generated root.
    #[arg(long, requires = "ca_key")]
    ca_cert: Option<PathBuf>,
    /// The private key of --ca-cert (PEM, mode 0600).
    #[arg(long, requires = "ca_cert")]
    ca_key: Option<PathBuf>,
    /// Certificates above --ca-cert, up to and including the root (for an intermediate).
    #[arg(long, requires = "ca_cert")]
    ca_chain: Option<PathBuf>,
    /// A YAML file of `kind: Workload` documents (which workload runs on which node), reloaded
    /// on change. The same documents may also sit in --config-dir.
    #[arg(long)]
    workloads: Option<PathBuf>,
    /// A directory of YAML files: workloads and policies (AuthorizationPolicy,
    /// PeerAuthentication), reloaded on change.
    #[arg(long)]
    config_dir: Option<PathBuf>,
    /// Policies in this namespace without a selector apply to the whole mesh.
    #[arg(long, default_value = "sockmesh-system")]
    root_namespace: String,
    /// Where workloads and policies come from.
    #[arg(long, value_enum, default_value_t = ConfigSource::Local)]
    source: ConfigSource,
    /// How nodes prove themselves.
    #[arg(long, value_enum, default_value_t = NodeAuth::Static)]
    node_auth: NodeAuth,
    /// Per-node credentials (`nodes: [{name, credential}]`), mode 0600 (static node auth).
    #[arg(long)]
    node_credentials: Option<PathBuf>,
    /// The audience agents' projected tokens are minted for (kubernetes node auth).
    #[arg(long, default_value = "sockmesh-ca")]
    token_audience: String,
    /// The agent DaemonSet's service account, namespace/name (kubernetes node auth).
    #[arg(long, default_value = "sockmesh-system/sockmesh-agent")]
    agent_service_account: String,
    /// Default workload certificate lifetime, e.g. 24h, 30m, 90s.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    cert_ttl: Duration,
    /// Longest lifetime an agent may ask for.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    max_cert_ttl: Duration,
    /// Names in the controller's serving certificate (agents check one of them).
    #[arg(long, default_value = "mesh-controller")]
    server_name: Vec<String>,
    /// Addresses in the controller's serving certificate.
    #[arg(long)]
    server_ip: Vec<IpAddr>,
    /// Log lines as text or as one JSON object each.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Prometheus metrics (/metrics): certificates signed, refusals by reason. Counts only:
    /// no workload, policy or node names beyond the identities signed.
    #[arg(long, default_value = "0.0.0.0:15014")]
    metrics_addr: SocketAddr,
    /// The configuration dump (/config: every workload, policy and rejected file); loopback
    /// only, as it lists the whole mesh and has no authentication.
    #[arg(long, default_value = "127.0.0.1:15015")]
    admin_addr: SocketAddr,
    /// The controller's own namespace (kubernetes source): where the Lease that picks the
    /// replica writing policy status lives, and the Secrets keeping the generated roots of
    /// Meshes without `spec.ca`. Default: $POD_NAMESPACE, else sockmesh-system.
    #[arg(long, alias = "lease-namespace")]
    namespace: Option<String>,
    /// The Lease's name.
    #[arg(long, default_value = "sockmesh-controller")]
    lease_name: String,
    /// This replica's name in the Lease. Default: $POD_NAME, else the host name and PID.
    #[arg(long)]
    lease_holder: Option<String>,
    /// How long a Lease not renewed stays its holder's: another replica writes status at most
    /// this long after the writer died.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    lease_duration: Duration,
    /// This controller's zone, when the mesh spans several clusters: its name (a DNS label).
    /// Every zone signs with its own intermediate (--ca-cert, --ca-chain) under one shared root,
    /// and its serving certificate then also proves spiffe://<trust domain>/zone/<zone> to the
    /// other zones' controllers.
    #[arg(long)]
    zone: Option<String>,
    /// Where the other zones' agents reach this zone's east-west gateway (`mesh-agent
    /// gateway`), address:port. Without it, this zone exports nothing.
    #[arg(long, requires = "zone")]
    zone_gateway: Option<SocketAddr>,
    /// The gateway's identity, namespace/service account. In local mode a workload record places
    /// it on the gateway's node; on Kubernetes (--node-auth kubernetes) its pods prove it with
    /// this service account's token, which then gets this identity and nothing else.
    #[arg(long, default_value = "sockmesh-system/sockmesh-gateway")]
    zone_gateway_service_account: String,
    /// Another zone to follow, NAME=URL of its controller (e.g. west=https://192.0.2.2:15012);
    /// repeat for each. Both zones name each other.
    #[arg(long, requires = "zone")]
    zone_peer: Vec<String>,
    /// Where the other zones' controllers follow this zone's exports (gRPC over TLS, a zone
    /// certificate required of every caller). Its own port, apart from --listen: it is the one
    /// port of the controller other networks need to reach, and it serves nothing else. Default:
    /// --listen's address, port 15013.
    #[arg(long, requires = "zone")]
    zone_listen: Option<SocketAddr>,
    /// The IPv4 range this zone's addresses for imported Services come from (e.g.
    /// 10.255.0.0/16): outside the pod and Service ranges.
    #[arg(long)]
    import_cidr: Option<zones::Range>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ConfigSource {
    /// YAML files: --workloads and --config-dir, reloaded on change.
    Local,
    /// The Kubernetes API: Pods in namespaces labelled sockmesh.io/mesh=enabled, and the
    /// policy CRDs.
    Kubernetes,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum NodeAuth {
    /// Per-node credentials from --node-credentials.
    Static,
    /// The agent's projected service-account token, checked by TokenReview.
    Kubernetes,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| format!("{s:?}: expected a number and a unit (s, m, h), e.g. 24h"))?;
    let secs = match unit {
        "s" | "" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return Err(format!("{s:?}: unit must be s, m or h")),
    };
    if secs == 0 {
        return Err(format!("{s:?}: must be positive"));
    }
    Ok(Duration::from_secs(secs))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Cmd::Ca(CaCmd::Init { out, trust_domain })) = &cli.cmd {
        let (cert, key) = ca_init(out, trust_domain)?;
        println!("root CA for {trust_domain}: {} (certificate) and {} (key, mode 0600)", cert.display(), key.display());
        println!("keep the key secret; give both to the controller (--ca-cert, --ca-key) and the certificate to agents (--trust-bundle)");
        return Ok(());
    }
    if let Some(Cmd::Ca(CaCmd::Intermediate { root, zone, out, trust_domain })) = &cli.cmd {
        ca_intermediate(root, zone, out, trust_domain)?;
        println!(
            "intermediate CA for zone {zone}: {0}/ca.pem, {0}/ca-key.pem (mode 0600), {0}/chain.pem (the root)",
            out.display()
        );
        println!("give them to zone {zone}'s controller as --ca-cert, --ca-key and --ca-chain; every zone's agents trust the root (--trust-bundle)");
        return Ok(());
    }
    if let Some(Cmd::Node(NodeCmd::Add { name, node_credentials, out })) = cli.cmd {
        let out = out.unwrap_or_else(|| PathBuf::from(format!("{name}.credential")));
        nodes::add(&node_credentials, &name, &out)?;
        println!("node {name} added to {}", node_credentials.display());
        println!("its credential is in {} (mode 0600): copy it to node {name} and give it to", out.display());
        println!("its agent as --node-credential-file; a running controller accepts it within a second");
        return Ok(());
    }
    let args = cli.run;
    let filter = tracing_subscriber::EnvFilter::try_from_env("SOCKMESH_LOG").unwrap_or_else(|_| "info".into());
    // Colours only on a terminal: a log file or journal gets plain text that grep can read.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match args.log_format {
        LogFormat::Json => b.json().flatten_event(true).init(),
        LogFormat::Text => b.init(),
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(run(args))
}

fn load_ca(args: &Args) -> anyhow::Result<Ca> {
    let read = |p: &PathBuf| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()));
    if let (Some(cert), Some(key)) = (&args.ca_cert, &args.ca_key) {
        let chain = args.ca_chain.as_ref().map(read).transpose()?.unwrap_or_default();
        return Ok(Ca::from_pem(
            &args.trust_domain,
            &read(cert)?,
            &read(key)?,
            &chain,
            args.cert_ttl,
            args.max_cert_ttl,
        )?);
    }
    meshes::load_or_generate(state_dir(args), &args.trust_domain, args.cert_ttl, args.max_cert_ttl)
}

fn state_dir(args: &Args) -> &std::path::Path {
    args.state_dir.as_deref().expect("clap requires --state-dir")
}

/// The zone settings the flags give, if this controller is in a zone.
fn zone_settings(args: &Args) -> anyhow::Result<Option<zones::Settings>> {
    let Some(zone) = &args.zone else { return Ok(None) };
    zones::Settings::zone_id(&args.trust_domain, zone).map_err(|e| anyhow::anyhow!("--zone: {e}"))?;
    let (ns, sa) = args
        .zone_gateway_service_account
        .split_once('/')
        .context("--zone-gateway-service-account: expected namespace/name")?;
    let gateway_identity = mesh_identity::SpiffeId::workload(&args.trust_domain, ns, sa)
        .map_err(|e| anyhow::anyhow!("--zone-gateway-service-account: {e}"))?;
    let mut peers = Vec::new();
    for p in &args.zone_peer {
        let (name, url) = p
            .split_once('=')
            .with_context(|| format!("--zone-peer {p:?}: expected NAME=URL, e.g. west=https://192.0.2.2:15012"))?;
        zones::Settings::zone_id(&args.trust_domain, name).map_err(|e| anyhow::anyhow!("--zone-peer: {e}"))?;
        if name == zone {
            bail!("--zone-peer {p:?}: that is this zone");
        }
        peers.push((name.to_owned(), url.to_owned()));
    }
    if !peers.is_empty() && args.import_cidr.is_none() {
        bail!("--zone-peer needs --import-cidr: the other zones' Services get addresses of this zone's from it");
    }
    Ok(Some(zones::Settings {
        zone: zone.clone(),
        trust_domain: args.trust_domain.clone(),
        gateway: args.zone_gateway,
        gateway_identity,
        peers,
        import_range: args.import_cidr,
    }))
}

/// The zone gateway's service account (namespace, name), when this zone runs a gateway.
fn gateway_account(args: &Args, zone: Option<&zones::Settings>) -> Option<(String, String)> {
    zone.filter(|z| z.gateway.is_some())?;
    let (ns, sa) = args.zone_gateway_service_account.split_once('/')?;
    Some((ns.to_owned(), sa.to_owned()))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let zone = zone_settings(&args)?.map(Arc::new);
    if mesh_identity::SpiffeId::parse(&format!("spiffe://{}", args.trust_domain)).is_err() {
        bail!(
            "--trust-domain {:?}: not a valid SPIFFE trust domain (lowercase letters, digits, '.', '-', '_')",
            args.trust_domain
        );
    }
    // Before any state is read or written, held for the process's life: one controller per
    // state directory.
    let lock = state_lock::lock(state_dir(&args))?;
    tracing::debug!(lock = %lock.path.display(), "state directory locked");
    let ca = Arc::new(load_ca(&args)?);
    // Agents trust the roots; they find them here (or ask GetTrustBundle once trusted).
    // Written whole and renamed: an agent started meanwhile never reads half of it.
    std::fs::create_dir_all(state_dir(&args))?;
    let bundle = state_dir(&args).join("trust-bundle.pem");
    let tmp = bundle.with_extension("pem.tmp");
    std::fs::write(&tmp, ca.roots_pem().concat())?;
    std::fs::rename(&tmp, &bundle).with_context(|| format!("writing {}", bundle.display()))?;
    // One client for everything that reads or writes the Kubernetes API.
    let client = if matches!(args.source, ConfigSource::Kubernetes) || matches!(args.node_auth, NodeAuth::Kubernetes) {
        Some(
            kube::Client::try_default()
                .await
                .context("connecting to the Kubernetes API (in-cluster config or kubeconfig)")?,
        )
    } else {
        None
    };
    let auth: Arc<dyn auth::NodeAuthenticator> = match args.node_auth {
        NodeAuth::Static => {
            let path = args.node_credentials.as_ref().context(
                "--node-auth static needs --node-credentials FILE (create it with `mesh-controller node add <node> --node-credentials FILE`)",
            )?;
            let stamp = auth::FileStamp::of(path);
            let creds = Arc::new(auth::StaticCredentials::load(path)?);
            creds.clone().watch(path.clone(), stamp);
            creds
        }
        NodeAuth::Kubernetes => {
            let (ns, sa) = args
                .agent_service_account
                .split_once('/')
                .context("--agent-service-account: expected namespace/name")?;
            let client = client.clone().context("a client was made above for --node-auth kubernetes")?;
            let mut a = auth_kube::TokenReviewAuthenticator::new(client, &args.token_audience, ns, sa);
            // A zone with a gateway: the gateway's pod proves itself with its own service
            // account's token, and may then have the gateway's identity only.
            if let Some((gns, gsa)) = gateway_account(&args, zone.as_deref()) {
                a = a.with_gateway(&gns, &gsa);
            }
            Arc::new(a)
        }
    };
    // Sources publish what they read; the mesh keeper admits the meshes (CAs, records) and
    // publishes the model everything else reads.
    let (model_tx, model_rx) = tokio::sync::watch::channel(Arc::new(model::Model::default()));
    let (source_tx, mut source_rx) = tokio::sync::watch::channel(Arc::new(model::Model::default()));
    let signers: meshes::SharedSigners = Arc::new(RwLock::new(meshes::Signers::only_default(ca.clone())));
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let namespace = args.namespace.clone().or_else(|| env("POD_NAMESPACE")).unwrap_or_else(|| "sockmesh-system".into());
    // Generated mesh roots: in the state directory when it is the only one (local mode), in
    // Secrets that every replica reads with the Kubernetes source.
    let roots = match (&args.source, &client) {
        (ConfigSource::Kubernetes, Some(c)) => {
            meshes::RootStore::Secrets(Box::new(kube_source::roots::Secrets::new(c.clone(), &namespace)))
        }
        _ => meshes::RootStore::Files(state_dir(&args).to_owned()),
    };
    let mut keeper = meshes::Keeper::new(roots, ca.clone(), args.cert_ttl, args.max_cert_ttl);
    let verdicts = keeper.verdicts.clone();
    // What the other zones export, as their controllers last said.
    let (remotes_tx, mut remotes_rx) = tokio::sync::watch::channel(zones::Remotes::new());
    {
        let signers = signers.clone();
        let zone = zone.clone();
        tokio::spawn(async move {
            let mut published = false;
            loop {
                // Admitted again after a while when a root's store failed.
                let mut remote_change = false;
                tokio::select! {
                    r = source_rx.changed() => if r.is_err() { return },
                    _ = tokio::time::sleep(keeper.retry.unwrap_or_default()), if keeper.retry.is_some() => {}
                    r = remotes_rx.changed() => if r.is_err() { return } else { remote_change = true },
                }
                let mut m = (**source_rx.borrow_and_update()).clone();
                let s = keeper.admit(&mut m).await;
                if let Some(z) = &zone {
                    zones::merge(&mut m, z, &remotes_rx.borrow_and_update());
                    if remote_change {
                        // Accepted now: agents measure their lag from here.
                        m.accepted_at_ms = zones::now_ms();
                    }
                }
                // A replica's first configuration waits for every mesh's root: its agents would
                // otherwise drop a mesh another replica gave them. It serves nothing meanwhile.
                if keeper.pending() && !published {
                    tracing::warn!("a Mesh's generated root could not be read yet: not serving until it can");
                    continue;
                }
                published = true;
                *signers.write().unwrap() = s;
                let _ = model_tx.send(Arc::new(m));
            }
        });
    }
    match args.source {
        ConfigSource::Local => {
            if args.workloads.is_none() && args.config_dir.is_none() {
                bail!("give --workloads FILE and/or --config-dir DIR: the controller must know which workloads run on which node");
            }
            tokio::spawn(config_dir::watch(args.config_dir.clone(), args.workloads.clone(), source_tx));
        }
        ConfigSource::Kubernetes => {
            let client = client.context("a client was made above for the kubernetes source")?;
            let election = kube_source::lease::Election {
                namespace,
                name: args.lease_name.clone(),
                holder: args.lease_holder.clone().or_else(|| env("POD_NAME")).unwrap_or_else(|| {
                    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
                    format!("{}-{}", host.trim(), std::process::id())
                }),
                duration: args.lease_duration,
            };
            tokio::spawn(kube_source::run(client, source_tx, verdicts, Some(election)));
        }
    }
    let shared: placement::Shared = Arc::default();
    {
        // The CA authorizes against the latest model's placement.
        let (shared, mut rx) = (shared.clone(), model_rx.clone());
        tokio::spawn(async move {
            let mut last = None;
            loop {
                let m = rx.borrow_and_update().clone();
                // Rebuilt only when a workload changed (policy changes are most changes).
                // Records shared with the last model compare by pointer.
                if last.as_ref().is_none_or(|l: &Arc<model::Model>| l.workloads != m.workloads) {
                    *shared.write().unwrap() = Arc::new(m.placement());
                }
                last = Some(m);
                if rx.changed().await.is_err() {
                    return;
                }
            }
        });
    }
    // What the push sends, worked out once per model version for every node's stream (off the
    // runtime's threads: at a hundred thousand workloads it is tens of milliseconds of work).
    let first_view = view::View::build(model_rx.borrow().clone(), &args.root_namespace, None);
    let (views_tx, views_rx) = tokio::sync::watch::channel(Arc::new(first_view));
    {
        let (mut rx, root) = (model_rx.clone(), args.root_namespace.clone());
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let (m, prev, root) = (rx.borrow_and_update().clone(), views_tx.borrow().clone(), root.clone());
                match tokio::task::spawn_blocking(move || view::View::build(m, &root, Some(&prev))).await {
                    Ok(v) => {
                        // The model and view this replaces go once their streams move on.
                        views_tx.send_replace(Arc::new(v));
                        tokio::task::spawn_blocking(push::release_free_memory);
                    }
                    Err(e) => {
                        // Without views every stream would end and its agent reconnect, over and
                        // over, while the controller looked healthy: stop, and be restarted.
                        tracing::error!(error = %e, "the configuration push failed; stopping");
                        std::process::exit(1);
                    }
                };
            }
        });
    }
    // Serve only once the first configuration has been read.
    let mut first = views_rx.clone();
    let _ = first.wait_for(|v| v.version > 0).await;

    let mut ips = args.server_ip.clone();
    if !args.listen.ip().is_unspecified() {
        ips.push(args.listen.ip());
    }
    let push = push::ConfigPush::new(auth.clone(), views_rx);
    let zone_id = zone.as_ref().map(|z| zones::Settings::zone_id(&args.trust_domain, &z.zone)).transpose();
    let zone_id = zone_id.map_err(|e| anyhow::anyhow!("--zone: {e}"))?;
    // A zone's controller also carries a name of its zone's own, which the other zones'
    // controllers require: every zone's certificate is under the one root, so the shared
    // server name alone would let one zone's controller answer as another's.
    let mut names = args.server_name.clone();
    names.extend(zone.as_ref().map(|z| zones::Settings::server_name(&z.zone)));
    let (chain, key) = ca.issue_server_cert(&names, &ips, zone_id.as_ref())?;
    let identity = tonic::transport::Identity::from_pem(chain.concat(), &key);
    let zone_stats: Arc<zones::Stats> = Arc::default();
    let tls = tonic::transport::ServerTlsConfig::new().identity(identity.clone());
    if let Some(z) = &zone {
        // Other zones' controllers follow this one on a port of its own, where the TLS layer
        // requires a certificate under the shared root of every caller (ZoneSync then checks
        // it is a zone's): the only port of the controller another network needs to reach.
        let root = tonic::transport::Certificate::from_pem(ca.roots_pem().concat());
        let zone_tls = tonic::transport::ServerTlsConfig::new().identity(identity.clone()).client_ca_root(root.clone());
        let zone_listen = args.zone_listen.unwrap_or(SocketAddr::new(args.listen.ip(), zones::ZONE_PORT));
        let zone_l =
            tokio::net::TcpListener::bind(zone_listen).await.with_context(|| format!("--zone-listen {zone_listen}"))?;
        let sync = mesh_api::push::zone_service_server::ZoneServiceServer::new(zones::ZoneSync {
            settings: z.clone(),
            model: model_rx.clone(),
        });
        let server = tonic::transport::Server::builder().tls_config(zone_tls)?.add_service(sync);
        tokio::spawn(async move {
            let incoming = tonic::transport::server::TcpIncoming::from(zone_l);
            if let Err(e) = server.serve_with_incoming(incoming).await {
                tracing::error!(error = %e, "the zone sync server stopped");
            }
        });
        let client_tls = tonic::transport::ClientTlsConfig::new().ca_certificate(root).identity(identity);
        for (name, url) in &z.peers {
            let channel = tonic::transport::Channel::from_shared(url.clone())
                .with_context(|| format!("--zone-peer {name}={url}: not a URL"))?
                .tls_config(client_tls.clone().domain_name(zones::Settings::server_name(name)))?
                .connect_timeout(Duration::from_secs(3))
                .connect_lazy();
            tokio::spawn(zones::follow(name.clone(), channel, remotes_tx.clone(), zone_stats.clone()));
        }
        tracing::info!(zone = %z.zone, peers = z.peers.len(), gateway = ?z.gateway, listen = %zone_listen, "zone sync on");
    }
    // Held for the process's life: the mesh keeper waits on it (and with no zone, for ever).
    let _remotes_tx = remotes_tx;
    let stats: Arc<ca_service::Stats> = Default::default();
    let svc = ca_service::CaService {
        signers,
        default_roots: ca.roots_pem().to_vec(),
        auth,
        placement: shared,
        stats: stats.clone(),
        gateway: gateway_account(&args, zone.as_deref()),
    };
    let metrics_l = tokio::net::TcpListener::bind(args.metrics_addr)
        .await
        .with_context(|| format!("--metrics-addr {}", args.metrics_addr))?;
    if !args.admin_addr.ip().is_loopback() {
        bail!(
            "--admin-addr {}: must be a loopback address: the configuration dump has no authentication",
            args.admin_addr
        );
    }
    let admin_l = tokio::net::TcpListener::bind(args.admin_addr)
        .await
        .with_context(|| format!("--admin-addr {}", args.admin_addr))?;
    tokio::spawn(serve_metrics(stats, zone.is_some().then_some(zone_stats), metrics_l));
    tokio::spawn(serve_admin(model_rx.clone(), admin_l));
    // Bound before "controller ready" is said: a caller that waits for it finds the port open.
    let listener =
        tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("--listen {}", args.listen))?;
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tracing::info!(listen = %args.listen, trust_domain = %args.trust_domain, "controller ready");
    tonic::transport::Server::builder()
        .tls_config(tls)?
        .add_service(CertificateServiceServer::new(svc))
        .add_service(mesh_api::push::config_service_server::ConfigServiceServer::new(push))
        .serve_with_incoming_shutdown(incoming, async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("signal");
            tokio::select! { _ = term.recv() => {}, _ = tokio::signal::ctrl_c() => {} }
            tracing::info!("controller stopping");
            // Agents hold watch streams open for ever: give in-flight requests a moment, then go.
            tokio::spawn(async {
                tokio::time::sleep(Duration::from_secs(2)).await;
                std::process::exit(0);
            });
        })
        .await
        .context("gRPC server")?;
    Ok(())
}

async fn serve_metrics(
    stats: Arc<ca_service::Stats>,
    zones: Option<Arc<zones::Stats>>,
    listener: tokio::net::TcpListener,
) {
    use axum::routing::get;
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let mut body = stats.encode();
            if let Some(z) = &zones {
                // One exposition: the first one's end marker goes.
                let end = body.rfind("# EOF").unwrap_or(body.len());
                body.truncate(end);
                body.push_str(&z.encode());
            }
            async move {
                (
                    [(axum::http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
                    body,
                )
            }
        }),
    );
    let _ = axum::serve(listener, app).await;
}

async fn serve_admin(model: tokio::sync::watch::Receiver<Arc<model::Model>>, listener: tokio::net::TcpListener) {
    use axum::routing::get;
    let app = axum::Router::new().route(
        "/config",
        get(move || {
            let m = model.borrow().clone();
            let body = serde_json::json!({
                "version": m.version,
                "workloads": m.workloads.keys().map(|k| k.to_string()).collect::<Vec<_>>(),
                "authorizationPolicies": m.authz.keys().map(|(ns, n)| format!("{ns}/{n}")).collect::<Vec<_>>(),
                "peerAuthentications": m.peer_auth.keys().map(|(ns, n)| format!("{ns}/{n}")).collect::<Vec<_>>(),
                "errors": m.errors,
            })
            .to_string();
            async move { ([(axum::http::header::CONTENT_TYPE, "application/json")], body) }
        }),
    );
    let _ = axum::serve(listener, app).await;
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    fn documents(text: &str) -> Vec<serde_yaml::Value> {
        use serde::Deserialize;
        serde_yaml::Deserializer::from_str(text).map(|d| serde_yaml::Value::deserialize(d).unwrap()).collect()
    }

    /// The `value`s of the JSON-patch ops adding arguments to the controller in a kustomization.
    fn added_args(kustomization: &str) -> Vec<String> {
        let k = &documents(kustomization)[0];
        let mut out = Vec::new();
        for p in k["patches"].as_sequence().unwrap() {
            assert_eq!(p["target"]["name"], "sockmesh-controller");
            for op in documents(p["patch"].as_str().unwrap())[0].as_sequence().unwrap() {
                if op["path"] == "/spec/template/spec/containers/0/ports/-" {
                    continue;
                }
                assert_eq!(op["path"], "/spec/template/spec/containers/0/args/-");
                out.push(op["value"].as_str().unwrap().to_owned());
            }
        }
        out
    }

    /// A zone's controller (deploy/ with the deploy/zone component and the example zone's
    /// overlay) parses, its zone settings hold, and they agree with the gateway's manifest: the
    /// gateway's service account is the one whose tokens it takes, its intermediate's chain is
    /// on the CA Secret's mount, and the Service the other zones follow it through selects its
    /// pods on its gRPC port.
    #[test]
    fn a_zones_controller_command_line_parses_and_agrees_with_the_gateway() {
        let docs = documents(include_str!("../../deploy/controller.yaml"));
        let gateway = documents(include_str!("../../deploy/zone/gateway.yaml"));
        let namespace =
            documents(include_str!("../../deploy/kustomization.yaml"))[0]["namespace"].as_str().unwrap().to_owned();
        let dep = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
        let c = &dep["spec"]["template"]["spec"]["containers"][0];
        let args: Vec<String> = std::iter::once("mesh-controller".to_owned())
            .chain(c["args"].as_sequence().unwrap().iter().map(|a| a.as_str().unwrap().to_owned()))
            .chain(added_args(include_str!("../../deploy/zone/kustomization.yaml")))
            .chain(added_args(include_str!("../../examples/zone-east/kustomization.yaml")))
            .collect();
        let a = super::Cli::try_parse_from(&args).unwrap_or_else(|e| panic!("{args:?}: {e}")).run;
        let zone = super::zone_settings(&a).unwrap().expect("a zone");
        assert!(zone.gateway.is_some() && !zone.peers.is_empty() && zone.import_range.is_some());
        let gw = gateway.iter().find(|d| d["kind"] == "Deployment").unwrap();
        let gw_sa = gw["spec"]["template"]["spec"]["serviceAccountName"].as_str().unwrap();
        assert_eq!(super::gateway_account(&a, Some(&zone)), Some((namespace.clone(), gw_sa.to_owned())));
        let mounts = c["volumeMounts"].as_sequence().unwrap();
        let ca_mount = mounts.iter().find(|m| m["name"] == "ca").unwrap()["mountPath"].as_str().unwrap();
        assert!(a.ca_chain.as_ref().expect("--ca-chain").starts_with(ca_mount));
        let follow = gateway.iter().find(|d| d["metadata"]["name"] == "sockmesh-controller-zones").unwrap();
        assert_eq!(follow["spec"]["selector"], dep["spec"]["template"]["metadata"]["labels"]);
        let zone_port = a.zone_listen.expect("--zone-listen").port();
        assert_eq!(follow["spec"]["ports"][0]["targetPort"].as_u64(), Some(u64::from(zone_port)));
        assert_ne!(zone_port, a.listen.port(), "the CA and the push stay off the zone port");
        assert!(zone.peers.iter().all(|(_, url)| url.ends_with(&format!(":{zone_port}"))), "{:?}", zone.peers);
    }

    /// The Deployment in deploy/ starts the controller with flags it takes, agreeing with the
    /// agent's manifest (the audience of its projected token, its service account) and with
    /// the Service (ports), and its ClusterRole allows what the controller reads and writes.
    #[test]
    fn the_deployments_command_line_parses_and_agrees_with_the_agent_and_the_service() {
        let docs = documents(include_str!("../../deploy/controller.yaml"));
        let agent = documents(include_str!("../../deploy/agent.yaml"));
        let namespace =
            documents(include_str!("../../deploy/kustomization.yaml"))[0]["namespace"].as_str().unwrap().to_owned();
        let dep = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
        // Two, surging on update and kept apart by a disruption budget.
        assert_eq!(dep["spec"]["replicas"].as_u64(), Some(2));
        assert_eq!(dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"].as_u64(), Some(0));
        let pdb = docs.iter().find(|d| d["kind"] == "PodDisruptionBudget").unwrap();
        assert_eq!(pdb["spec"]["selector"], dep["spec"]["selector"]);
        assert_eq!(pdb["spec"]["minAvailable"].as_u64(), Some(1));
        let c = &dep["spec"]["template"]["spec"]["containers"][0];
        let args: Vec<&str> = std::iter::once("mesh-controller")
            .chain(c["args"].as_sequence().unwrap().iter().map(|a| a.as_str().unwrap()))
            .collect();
        let a = super::Cli::try_parse_from(&args).unwrap_or_else(|e| panic!("{args:?}: {e}")).run;
        assert!(
            matches!(a.source, super::ConfigSource::Kubernetes) && matches!(a.node_auth, super::NodeAuth::Kubernetes)
        );
        let ds = agent.iter().find(|d| d["kind"] == "DaemonSet").unwrap();
        let agent_pod = &ds["spec"]["template"]["spec"];
        assert_eq!(
            a.agent_service_account,
            format!("{namespace}/{}", agent_pod["serviceAccountName"].as_str().unwrap())
        );
        let token = agent_pod["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .find_map(|v| v["projected"]["sources"][0]["serviceAccountToken"].as_mapping())
            .unwrap();
        assert_eq!(token.get("audience").and_then(|v| v.as_str()), Some(a.token_audience.as_str()));
        // Agents dial the Service's name, which the serving certificate carries.
        let agent_args: Vec<&str> =
            agent_pod["containers"][0]["args"].as_sequence().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        let svc = docs.iter().find(|d| d["kind"] == "Service").unwrap();
        let host = format!("{}.{namespace}.svc", svc["metadata"]["name"].as_str().unwrap());
        assert!(
            agent_args.contains(&format!("--controller=https://{host}:{}", a.listen.port()).as_str()),
            "{agent_args:?}"
        );
        assert!(agent_args.contains(&format!("--controller-name={host}").as_str()));
        assert!(a.server_name.contains(&host));
        let ports: Vec<u64> =
            svc["spec"]["ports"].as_sequence().unwrap().iter().map(|p| p["targetPort"].as_u64().unwrap()).collect();
        assert_eq!(ports, [u64::from(a.listen.port()), u64::from(a.metrics_addr.port())]);
        // The CA's files come from the Secret's mount.
        let mounts = c["volumeMounts"].as_sequence().unwrap();
        let ca_mount = mounts.iter().find(|m| m["name"] == "ca").unwrap()["mountPath"].as_str().unwrap();
        assert!(a.ca_cert.unwrap().starts_with(ca_mount) && a.ca_key.unwrap().starts_with(ca_mount));
        // What the Kubernetes source watches and writes, and TokenReview.
        let role = docs.iter().find(|d| d["kind"] == "ClusterRole").unwrap();
        let allows = |res: &str, verb: &str| {
            role["rules"].as_sequence().unwrap().iter().any(|r| {
                r["resources"].as_sequence().unwrap().iter().any(|x| x == res)
                    && r["verbs"].as_sequence().unwrap().iter().any(|x| x == verb)
            })
        };
        for res in [
            "pods",
            "namespaces",
            "services",
            "endpointslices",
            "authorizationpolicies",
            "peerauthentications",
            "meshes",
        ] {
            assert!(allows(res, "list") && allows(res, "watch"), "{res}");
        }
        for res in ["authorizationpolicies/status", "peerauthentications/status", "meshes/status"] {
            assert!(allows(res, "patch"), "{res}");
        }
        assert!(allows("tokenreviews", "create"));
        // In its own namespace: the Lease, and the Secrets keeping generated mesh roots (read
        // and created, never updated or deleted).
        let ns_role = docs.iter().find(|d| d["kind"] == "Role").unwrap();
        let ns_allows = |res: &str, verb: &str| {
            ns_role["rules"].as_sequence().unwrap().iter().any(|r| {
                r["resources"].as_sequence().unwrap().iter().any(|x| x == res)
                    && r["verbs"].as_sequence().unwrap().iter().any(|x| x == verb)
            })
        };
        assert!(ns_allows("leases", "update") && ns_allows("secrets", "get") && ns_allows("secrets", "create"));
        assert!(!ns_allows("secrets", "update") && !ns_allows("secrets", "delete") && !ns_allows("secrets", "list"));
    }

    /// Every flag and subcommand says what it is for in `--help`.
    #[test]
    fn every_flag_has_help_text() {
        let missing = mesh_api::cli::missing_help(&super::Cli::command());
        assert!(missing.is_empty(), "no help text: {missing:?}");
    }

    /// The shipped systemd unit starts the controller with flags it takes.
    #[test]
    fn the_systemd_units_command_line_parses() {
        let unit = include_str!("../../deploy/systemd/sockmesh-controller.service");
        let line = unit.lines().find_map(|l| l.strip_prefix("ExecStart=")).expect("an ExecStart line");
        let argv: Vec<&str> = line.split_whitespace().filter(|w| !w.starts_with('$')).collect();
        assert!(argv[0].ends_with("/mesh-controller"), "{line}");
        let cli = super::Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{line}: {e}"));
        assert!(cli.cmd.is_none() && cli.run.config_dir.is_some() && cli.run.node_credentials.is_some());
    }

    #[test]
    fn node_add_needs_no_server_flags_and_the_server_needs_its_state_dir() {
        let cli =
            super::Cli::try_parse_from(["mesh-controller", "node", "add", "n1", "--node-credentials", "x"]).unwrap();
        assert!(matches!(cli.cmd, Some(super::Cmd::Node(super::NodeCmd::Add { .. }))));
        let e = super::Cli::try_parse_from(["mesh-controller", "--config-dir", "d"]).unwrap_err().to_string();
        assert!(e.contains("--state-dir"), "{e}");
    }

    /// `ca init` makes a root the controller signs with, the key readable by its owner only,
    /// and never overwrites one.
    #[test]
    fn ca_init_makes_a_usable_root_once() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = super::ca_init(&dir.path().join("ca"), "cluster.local").unwrap();
        assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
        let day = std::time::Duration::from_secs(86_400);
        let (c, k) = (std::fs::read_to_string(&cert).unwrap(), std::fs::read_to_string(&key).unwrap());
        super::Ca::from_pem("cluster.local", &c, &k, "", day, day).unwrap();
        let e = super::ca_init(&dir.path().join("ca"), "cluster.local").unwrap_err().to_string();
        assert!(e.contains("exists") && e.contains("made once"), "{e}");
        assert_eq!(std::fs::read_to_string(&key).unwrap(), k, "the key was overwritten");
    }

    #[test]
    fn durations_parse_with_units_and_reject_nonsense() {
        assert_eq!(super::parse_duration("24h").unwrap().as_secs(), 86400);
        assert_eq!(super::parse_duration("90s").unwrap().as_secs(), 90);
        assert_eq!(super::parse_duration("2m").unwrap().as_secs(), 120);
        assert!(super::parse_duration("0s").is_err());
        assert!(super::parse_duration("1d").is_err());
        assert!(super::parse_duration("h").is_err());
    }
}
