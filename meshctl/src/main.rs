//! meshctl: look at and diagnose a sockmesh node. Reads the agent's admin API (loopback only,
//! so run it on the node, in the node's network namespace) with the API's own types; tables by
//! default, `-o json` everywhere (the JSON is what the API returned).

mod check;
mod client;
mod exec;

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use mesh_api::admin::{paths, CertInfo, ConnectionInfo, Meshes, PolicyInfo, ServiceInfo, Status, WorkloadInfo};

#[derive(Parser)]
#[command(name = "meshctl", version, about = "Inspect and diagnose a sockmesh node")]
struct Cli {
    /// The agent's admin API.
    #[arg(long, global = true, default_value = "127.0.0.1:15000")]
    admin: SocketAddr,
    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// The node's agent at a glance.
    Status,
    /// Diagnose the node: kernel, cgroup v2, bpffs, agent, programs, certificates, controller.
    Check {
        /// Where bpffs should be mounted.
        #[arg(long, default_value = "/sys/fs/bpf")]
        bpffs: PathBuf,
    },
    /// The workloads this node's agent captures.
    Workloads,
    /// The authorization policies that apply on this node.
    Policies,
    /// The identities served and their certificates.
    Certs,
    /// The connections being relayed now.
    Connections,
    /// The Services this node's agent resolves: addresses, ports, and each endpoint with the
    /// identity a connection to it must prove, its readiness and the connections carried to it.
    Services,
    /// The meshes: trust domain, when the CA's root expires, the meshes each trusts, member
    /// namespaces; and what the controller could not admit.
    Meshes,
    /// Run a command as part of a workload (in its network namespace and its cgroup), so that
    /// its connections go through the mesh: `meshctl exec default/web -- curl http://...`.
    /// meshctl becomes the command (exec): its PID is the command's.
    Exec {
        /// The workload, as <namespace>/<name>.
        workload: String,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<OsString>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("meshctl: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: &Cli) -> Result<ExitCode> {
    let json = cli.output == Output::Json;
    let ask = |path: &str| format!("{path}: asking the agent at {} (is mesh-agent running on this node?)", cli.admin);
    let path = match &cli.cmd {
        Cmd::Check { bpffs } => return Ok(check::check(cli.admin, bpffs, json)),
        Cmd::Exec { workload, command } => match exec::exec(cli.admin, workload, command)? {},
        Cmd::Status => paths::STATUS,
        Cmd::Workloads => paths::WORKLOADS,
        Cmd::Policies => paths::POLICIES,
        Cmd::Certs => paths::CERTIFICATES,
        Cmd::Connections => paths::CONNECTIONS,
        Cmd::Services => paths::SERVICES,
        Cmd::Meshes => paths::MESHES,
    };
    if json {
        let raw = client::get_raw(cli.admin, path).with_context(|| ask(path))?;
        let v: serde_json::Value = serde_json::from_str(&raw).with_context(|| format!("{path}: not JSON"))?;
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    match &cli.cmd {
        Cmd::Status => print_status(&client::get(cli.admin, path).with_context(|| ask(path))?),
        Cmd::Workloads => {
            let all: Vec<WorkloadInfo> = client::get(cli.admin, path).with_context(|| ask(path))?;
            table(
                &["NAMESPACE", "NAME", "IDENTITY", "IPS", "CGROUP-ID", "SOURCE"],
                all.iter()
                    .map(|w| {
                        let ips = w.ips.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",");
                        let source = serde_json::to_value(w.source).ok().and_then(|v| v.as_str().map(str::to_owned));
                        vec![
                            w.namespace.clone(),
                            w.name.clone(),
                            w.identity.clone(),
                            ips,
                            w.cgroup_id.to_string(),
                            source.unwrap_or_default(),
                        ]
                    })
                    .collect(),
            )
        }
        Cmd::Policies => {
            let all: Vec<PolicyInfo> = client::get(cli.admin, path).with_context(|| ask(path))?;
            table(
                &["NAMESPACE", "NAME", "ACTION", "REASON"],
                all.iter()
                    .map(|p| {
                        let reason = p.reason.clone().unwrap_or_else(|| "-".into());
                        vec![p.namespace.clone(), p.name.clone(), p.action.clone(), reason]
                    })
                    .collect(),
            )
        }
        Cmd::Certs => {
            let all: Vec<CertInfo> = client::get(cli.admin, path).with_context(|| ask(path))?;
            table(
                &["IDENTITY", "READY", "EXPIRES", "WORKLOADS"],
                all.iter()
                    .map(|c| {
                        vec![c.identity.clone(), c.ready.to_string(), expires(c.not_after), c.workloads.to_string()]
                    })
                    .collect(),
            )
        }
        Cmd::Connections => {
            let all: Vec<ConnectionInfo> = client::get(cli.admin, path).with_context(|| ask(path))?;
            let or_dash = |s: &Option<String>| s.clone().unwrap_or_else(|| "-".into());
            table(
                &["DIRECTION", "SOURCE", "DESTINATION", "ORIGINAL-DST", "SECURITY", "AGE"],
                all.iter()
                    .map(|c| {
                        let src = c.src_workload.clone().or(c.src_addr.map(|a| a.to_string()));
                        vec![
                            c.direction.as_str().to_owned(),
                            or_dash(&src),
                            or_dash(&c.dst_workload),
                            c.orig_dst.clone(),
                            c.security.as_str().to_owned(),
                            format!("{}ms", c.age_ms),
                        ]
                    })
                    .collect(),
            )
        }
        Cmd::Services => {
            let all: Vec<ServiceInfo> = client::get(cli.admin, path).with_context(|| ask(path))?;
            let mut rows = Vec::new();
            for s in &all {
                let addrs = s.addresses.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(",");
                let ports = s.ports.iter().map(|(p, t)| format!("{p}->{t}")).collect::<Vec<_>>().join(",");
                // An import from other zones is named as its clients' DNS would.
                let name = match s.imported {
                    true => format!("{}/{} (clusterset)", s.namespace, s.name),
                    false => format!("{}/{}", s.namespace, s.name),
                };
                let addrs = if addrs.is_empty() { "(headless)".to_owned() } else { addrs };
                if s.endpoints.is_empty() {
                    rows.push(vec![name, addrs, ports, "(none)".into(), "-".into(), "-".into(), "-".into()]);
                    continue;
                }
                for (i, e) in s.endpoints.iter().enumerate() {
                    let first = i == 0;
                    rows.push(vec![
                        if first { name.clone() } else { String::new() },
                        if first { addrs.clone() } else { String::new() },
                        if first { ports.clone() } else { String::new() },
                        match &e.zone {
                            Some(z) => format!("{} (zone {z})", e.address),
                            None => e.address.to_string(),
                        },
                        e.identity.clone().unwrap_or_else(|| "(not in the mesh: plain TCP)".into()),
                        if e.ready { "ready" } else { "not-ready" }.to_owned(),
                        e.in_flight.to_string(),
                    ]);
                }
            }
            table(&["SERVICE", "ADDRESSES", "PORTS", "ENDPOINT", "IDENTITY", "HEALTH", "IN-FLIGHT"], rows)
        }
        Cmd::Meshes => {
            let all: Meshes = client::get(cli.admin, path).with_context(|| ask(path))?;
            let or_dash = |v: &[String]| if v.is_empty() { "-".to_owned() } else { v.join(",") };
            table(
                &["MESH", "TRUST-DOMAIN", "CA-EXPIRES", "TRUSTS", "MTLS", "NAMESPACES"],
                all.meshes
                    .iter()
                    .map(|m| {
                        vec![
                            m.name.clone(),
                            m.trust_domain.clone(),
                            expires(m.root_not_after),
                            or_dash(&m.trust),
                            m.mtls_mode.clone(),
                            or_dash(&m.namespaces),
                        ]
                    })
                    .collect(),
            );
            for p in &all.problems {
                println!("warning: {p}");
            }
        }
        Cmd::Check { .. } | Cmd::Exec { .. } => unreachable!("handled above"),
    }
    Ok(ExitCode::SUCCESS)
}

fn expires(not_after: Option<i64>) -> String {
    let Some(t) = not_after else { return "-".into() };
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    let d = t - now;
    if d <= 0 {
        return "expired".into();
    }
    if d >= 2 * 86400 {
        format!("in {}d", d / 86400)
    } else if d >= 3600 {
        format!("in {}h{}m", d / 3600, d % 3600 / 60)
    } else {
        format!("in {}m{}s", d / 60, d % 60)
    }
}

fn table(header: &[&str], rows: Vec<Vec<String>>) {
    if rows.is_empty() {
        println!("(none)");
        return;
    }
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let parts: Vec<String> = cells.iter().enumerate().map(|(i, c)| format!("{c:<width$}", width = w[i])).collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r);
    }
}

fn print_status(s: &Status) {
    println!("node:        {}", s.node);
    println!("ready:       {}", s.ready);
    for m in &s.not_ready {
        println!("  not ready: {m}");
    }
    println!("controller:  {}", s.controller);
    println!("workloads:   {}", s.workloads);
    println!("connections: {}", s.connections);
    let links: Vec<String> =
        s.links.iter().map(|l| format!("{}={}", l.name, if l.attached { "attached" } else { "DETACHED" })).collect();
    println!("programs:    {}", links.join(" "));
    println!("orig dst:    {}", s.orig_dst_lookup);
    let kv = |m: &std::collections::BTreeMap<String, u64>| {
        if m.is_empty() {
            "-".to_owned()
        } else {
            m.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")
        }
    };
    println!("kernel:      {}", kv(&s.stats.kernel));
    let h = &s.stats.hbone;
    println!("hbone:       tls_sessions={} streams={} early_streams={}", h.tls_sessions, h.streams, h.early_streams);
    println!("refused:     outbound: {}; inbound: {}", kv(&s.stats.outbound.refused), kv(&s.stats.inbound.refused));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_takes_everything_after_the_separator() {
        let cli = Cli::parse_from(["meshctl", "exec", "default/a", "--", "sm-testapp", "echo", "--to", "x"]);
        match cli.cmd {
            Cmd::Exec { workload, command } => {
                assert_eq!(workload, "default/a");
                assert_eq!(command, ["sm-testapp", "echo", "--to", "x"].map(OsString::from));
            }
            _ => panic!("not exec"),
        }
        assert!(Cli::try_parse_from(["meshctl", "exec", "default/a"]).is_err(), "a command is required");
    }

    /// Every flag and subcommand says what it is for in `--help`.
    #[test]
    fn every_flag_and_subcommand_has_help_text() {
        use clap::CommandFactory;
        let missing = mesh_api::cli::missing_help(&Cli::command());
        assert!(missing.is_empty(), "no help text: {missing:?}");
    }

    #[test]
    fn expiry_reads_as_a_duration() {
        assert_eq!(expires(None), "-");
        assert_eq!(expires(Some(1)), "expired");
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
        assert!(expires(Some(now + 7300)).starts_with("in 2h"));
        // A root's ten years read in days.
        assert_eq!(expires(Some(now + 3650 * 86400 + 100)), "in 3650d");
    }
}
