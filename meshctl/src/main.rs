//! meshctl: look at and diagnose a sockmesh node. Reads the agent's admin API (loopback only,
//! so run it on the node, in the node's network namespace); tables by default, `-o json`
//! everywhere (the JSON is what the API returned, the tables are drawn from it).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::{json, Value};

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
    if let Cmd::Check { bpffs } = &cli.cmd {
        return Ok(check(cli, bpffs));
    }
    let path = match cli.cmd {
        Cmd::Status => "/status",
        Cmd::Workloads => "/workloads",
        Cmd::Policies => "/policies",
        Cmd::Certs => "/certificates",
        Cmd::Connections => "/connections",
        Cmd::Check { .. } => unreachable!(),
    };
    let v = get(cli.admin, path)
        .with_context(|| format!("asking the agent at {} (is mesh-agent running on this node?)", cli.admin))?;
    if cli.output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    match cli.cmd {
        Cmd::Status => print_status(&v),
        Cmd::Workloads => table(
            &["NAMESPACE", "NAME", "IDENTITY", "IPS", "CGROUP-ID", "SOURCE"],
            rows(&v, |w| {
                vec![
                    s(&w["namespace"]),
                    s(&w["name"]),
                    s(&w["identity"]),
                    list(&w["ips"]),
                    s(&w["cgroupId"]),
                    s(&w["source"]),
                ]
            }),
        ),
        Cmd::Policies => table(
            &["NAMESPACE", "NAME", "ACTION"],
            rows(&v, |p| vec![s(&p["namespace"]), s(&p["name"]), s(&p["action"])]),
        ),
        Cmd::Certs => table(
            &["IDENTITY", "READY", "EXPIRES", "WORKLOADS"],
            rows(&v, |c| vec![s(&c["identity"]), s(&c["ready"]), expires(&c["notAfter"]), s(&c["workloads"])]),
        ),
        Cmd::Connections => table(
            &["DIRECTION", "SOURCE", "DESTINATION", "ORIGINAL-DST", "SECURITY", "AGE"],
            rows(&v, |c| {
                let src = c["srcWorkload"].as_str().map(str::to_owned).unwrap_or_else(|| s(&c["srcAddr"]));
                vec![
                    s(&c["direction"]),
                    src,
                    s(&c["dstWorkload"]),
                    s(&c["origDst"]),
                    s(&c["security"]),
                    format!("{}ms", s(&c["ageMs"])),
                ]
            }),
        ),
        Cmd::Check { .. } => unreachable!(),
    }
    Ok(ExitCode::SUCCESS)
}

/// A JSON value as a table cell.
fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(x) => x.clone(),
        other => other.to_string(),
    }
}

fn list(v: &Value) -> String {
    v.as_array().map(|a| a.iter().map(s).collect::<Vec<_>>().join(",")).unwrap_or_else(|| "-".into())
}

fn expires(v: &Value) -> String {
    let Some(t) = v.as_i64() else { return "-".into() };
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    let d = t - now;
    if d <= 0 {
        return "expired".into();
    }
    if d >= 3600 {
        format!("in {}h{}m", d / 3600, d % 3600 / 60)
    } else {
        format!("in {}m{}s", d / 60, d % 60)
    }
}

fn rows(v: &Value, f: impl Fn(&Value) -> Vec<String>) -> Vec<Vec<String>> {
    v.as_array().map(|a| a.iter().map(f).collect()).unwrap_or_default()
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

fn print_status(v: &Value) {
    println!("node:        {}", s(&v["node"]));
    println!("ready:       {}", s(&v["ready"]));
    for m in v["notReady"].as_array().into_iter().flatten() {
        println!("  not ready: {}", s(m));
    }
    println!("controller:  {}", s(&v["controller"]));
    println!("workloads:   {}", s(&v["workloads"]));
    println!("connections: {}", s(&v["connections"]));
    let links: Vec<String> = v["links"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|l| format!("{}={}", s(&l["name"]), if l["attached"] == true { "attached" } else { "DETACHED" }))
        .collect();
    println!("programs:    {}", links.join(" "));
    println!("kernel:      {}", v["stats"]["kernel"]);
    println!("hbone:       {}", v["stats"]["hbone"]);
    println!("refused:     {}", v["stats"]["agent"]["refused"]);
}

/// One HTTP/1.1 GET to the admin API; the body parsed as JSON.
fn get(addr: SocketAddr, path: &str) -> Result<Value> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAccept: application/json\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").context("malformed HTTP response")?;
    let status = head.split_whitespace().nth(1).unwrap_or("");
    if status != "200" {
        bail!("{path}: HTTP {status}: {body}");
    }
    serde_json::from_str(body).with_context(|| format!("{path}: not JSON"))
}

struct Check {
    name: &'static str,
    ok: bool,
    detail: String,
    hint: String,
}

fn check(cli: &Cli, bpffs: &Path) -> ExitCode {
    let mut out = Vec::new();
    let mut add = |name, ok, detail: String, hint: &str| {
        out.push(Check { name, ok, detail, hint: if ok { String::new() } else { hint.to_owned() } })
    };

    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let (maj, min) = kernel_version(release.trim());
    let btf = Path::new("/sys/kernel/btf/vmlinux").exists();
    let kernel_ok = (maj, min) >= (5, 15);
    add(
        "kernel",
        kernel_ok,
        format!("Linux {} (BTF {})", release.trim(), if btf { "present" } else { "absent" }),
        "sockmesh needs Linux 5.15 or newer (sk_lookup links, sock_release, SO_NETNS_COOKIE)",
    );

    let cg2 = cgroup2_mount();
    add(
        "cgroup v2",
        cg2.is_some(),
        cg2.as_ref().map(|p| format!("mounted at {}", p.display())).unwrap_or_else(|| "not mounted".into()),
        "mount cgroup v2 (e.g. `mount -t cgroup2 none /sys/fs/cgroup/unified`)",
    );

    let bpf_ok = is_bpffs(bpffs);
    add(
        "bpffs",
        bpf_ok,
        if bpf_ok {
            format!("mounted at {}", bpffs.display())
        } else {
            format!("{} is not a bpffs mount", bpffs.display())
        },
        &format!("mount it: `mount -t bpf bpf {}`; without it the agent cannot pin its programs", bpffs.display()),
    );

    let status = get(cli.admin, "/status");
    let certs = get(cli.admin, "/certificates");
    let config = get(cli.admin, "/config_dump");
    match &status {
        Ok(v) => add("agent", true, format!("answering on {} (node {})", cli.admin, s(&v["node"])), ""),
        Err(e) => add(
            "agent",
            false,
            format!("no answer on {}: {e}", cli.admin),
            "start mesh-agent on this node (run meshctl inside the node's network namespace, or pass --admin)",
        ),
    }
    match &status {
        Ok(v) => {
            let links: Vec<&Value> = v["links"].as_array().map(|a| a.iter().collect()).unwrap_or_default();
            let detached: Vec<String> = links.iter().filter(|l| l["attached"] != true).map(|l| s(&l["name"])).collect();
            let ok = !links.is_empty() && detached.is_empty();
            let detail = if ok {
                format!("{} attached", links.iter().map(|l| s(&l["name"])).collect::<Vec<_>>().join(", "))
            } else {
                format!("not attached: {}", detached.join(", "))
            };
            add(
                "programs",
                ok,
                detail,
                "restart the agent: it re-attaches missing programs and takes over pinned ones",
            );
        }
        Err(_) => add("programs", false, "unknown: the agent is not answering".into(), "start the agent first"),
    }
    match &certs {
        Ok(v) => {
            let all: Vec<&Value> = v.as_array().map(|a| a.iter().collect()).unwrap_or_default();
            let bad: Vec<String> = all.iter().filter(|c| c["ready"] != true).map(|c| s(&c["identity"])).collect();
            let detail = if bad.is_empty() {
                format!("{} identities with valid certificates", all.len())
            } else {
                format!("no valid certificate: {}", bad.join(", "))
            };
            add("certificates", bad.is_empty(), detail, "check that the controller is reachable and places these workloads on this node (see the agent's log: 'certificate request failed')");
        }
        Err(_) => add("certificates", false, "unknown: the agent is not answering".into(), "start the agent first"),
    }
    match &config {
        Ok(v) => {
            let url = s(&v["config"]["controller"]);
            let hostport = url.trim_start_matches("https://").trim_end_matches('/').to_owned();
            let reachable = hostport
                .to_socket_addrs()
                .ok()
                .and_then(|mut a| a.next())
                .map(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok())
                .unwrap_or(false);
            add("controller", reachable, format!("{url} {}", if reachable { "reachable" } else { "unreachable" }), "start mesh-controller or fix the agent's --controller; existing certificates keep working until they expire");
        }
        Err(_) => add("controller", false, "unknown: the agent is not answering".into(), "start the agent first"),
    }

    let all_ok = out.iter().all(|c| c.ok);
    if cli.output == Output::Json {
        let checks: Vec<Value> =
            out.iter().map(|c| json!({"name": c.name, "ok": c.ok, "detail": c.detail, "hint": c.hint})).collect();
        println!("{}", serde_json::to_string_pretty(&json!({"ok": all_ok, "checks": checks})).unwrap());
    } else {
        for c in &out {
            println!("{} {:<13} {}", if c.ok { "✓" } else { "✗" }, c.name, c.detail);
            if !c.ok {
                println!("  hint: {}", c.hint);
            }
        }
    }
    if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn kernel_version(release: &str) -> (u32, u32) {
    let mut it = release.split(|c: char| !c.is_ascii_digit()).filter(|p| !p.is_empty()).map(|p| p.parse().unwrap_or(0));
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}

fn cgroup2_mount() -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        Some(PathBuf::from(left.split_whitespace().nth(4)?))
    })
}

fn is_bpffs(p: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) else { return false };
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and out-pointer.
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == 0xcafe4a11 }
}

#[cfg(test)]
mod tests {
    #[test]
    fn kernel_versions_parse() {
        assert_eq!(super::kernel_version("6.18.0-1-amd64"), (6, 18));
        assert_eq!(super::kernel_version("5.15.120"), (5, 15));
        assert_eq!(super::kernel_version("garbage"), (0, 0));
    }
}
