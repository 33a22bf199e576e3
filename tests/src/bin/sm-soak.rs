//! `cargo xtask soak [--minutes N]`: the mesh under steady churn for a while, watched for
//! anything that grows without bound. Two nodes; pod `a` (n1) connects at a steady rate to `b`
//! across nodes and to `c` on its own node; workload `w` (n2) is removed and added again
//! through the local API; a policy is rewritten; certificates live one minute and rotate; the
//! controller is restarted once, halfway.
//!
//! Every few seconds it records each agent's resident memory and descriptors, the
//! original-destination map's fill, `a`'s HBONE connections (its pool) and the connections that
//! failed. It fails if an allowed connection failed, if memory or descriptors grew without
//! bound (the last third of the run against the first, after warm-up), or if, once traffic
//! stops, the map entries, descriptors and listeners are not back at their baseline.
//! Writes target/soak/{report.md, samples.json, chart.png}.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use tests::*;

const PORT: u16 = 8080;

#[derive(Debug, Clone, serde::Serialize)]
struct Sample {
    at_s: f64,
    /// Per agent (n1, n2): resident memory in KiB and open descriptors.
    rss_kib: [u64; 2],
    fds: [u64; 2],
    /// SM_ORIG_DST entries on each node.
    orig_dst: [u64; 2],
    /// `a`'s HBONE connections (its pool).
    pool: u64,
    /// Connections made and failed since the start.
    made: u64,
    failed: u64,
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count() as u64).unwrap_or(0)
}

fn orig_dst(agent: &Agent) -> u64 {
    agent.stats().ok().and_then(|s| s.maps.get("SM_ORIG_DST").map(|m| m.entries)).unwrap_or(0)
}

/// TCP connections from `netns` to port 15008.
fn hbone_connections(netns: &str) -> u64 {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", netns, "ss", "-Htn", "state", "established", "( dport = :15008 )"])
        .output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).lines().count() as u64).unwrap_or(0)
}

fn policy(round: u64) -> String {
    // A DENY for an identity that sends nothing here: the allowed traffic must never notice
    // the rewrite (its version changes every time).
    format!(
        "apiVersion: security.sockmesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: soak, namespace: default}}\nspec:\n  selector: {{matchLabels: {{app: b}}}}\n  action: DENY\n  rules:\n  - from:\n    - source: {{principals: [\"cluster.local/ns/default/sa/nobody-{round}\"]}}\n"
    )
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let minutes: f64 = args
        .iter()
        .position(|a| a == "--minutes")
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().context("--minutes: a number"))
        .transpose()?
        .unwrap_or(10.0);
    let out_dir = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/soak"));
    let run_for = Duration::from_secs_f64(minutes * 60.0);

    let mut t = Topology::new("soak")?;
    let n1 = t.add_node("n1")?;
    let n2 = t.add_node("n2")?;
    let a = t.add_pod(n1, "a", true)?;
    let c = t.add_pod(n1, "c", true)?;
    let b = t.add_pod(n2, "b", true)?;
    // Not in n2's workloads file (the API may not remove those): the controller places it on
    // n2, and the soak adds and removes it through the local API.
    let w = t.add_pod(n2, "w", false)?;
    t.write_workloads()?;
    t.write_controller_workloads(&[w])?;
    t.write_config("soak.yaml", &policy(0))?;
    let mut ctl = t.start_controller(&["--cert-ttl", "60s", "--max-cert-ttl", "60s"])?;
    let _sb = t.start_server(b, PORT)?;
    let _sc = t.start_server(c, PORT)?;
    let _sw = t.start_server(w, PORT)?;
    let agents = [t.start_agent(n1, &["--cert-ttl-seconds", "60"])?, t.start_agent(n2, &["--cert-ttl-seconds", "60"])?];
    t.wait_ready(n1)?;
    t.wait_ready(n2)?;
    let w_record = t.workload_json(w);
    agents[1].api(json!({"op": "add_workload", "workload": w_record})).context("adding w")?;
    wait_for(Duration::from_secs(20), || {
        Ok(agents[1]
            .api(json!({"op": "certs"}))?
            .as_array()
            .is_some_and(|c| c.len() == 2 && c.iter().all(|c| c["ready"] == true)))
    })
    .context("w's certificate")?;
    let pids = [agents[0].pid().context("agent n1")?, agents[1].pid().context("agent n2")?];
    let (to_b, to_c) = (t.addr(b, PORT), t.addr(c, PORT));
    let listeners = |p: PodId| -> Result<Vec<u16>> {
        let mut v = listening_ports(&t.pod(p).netns)?;
        v.sort_unstable();
        v.dedup();
        Ok(v)
    };
    // Warm-up: the first connections make what stays for the agent's life (the pooled HBONE
    // connection, the spare dial sockets in each netns dialled into); the baseline is taken
    // after them.
    for to in [&to_b, &to_c] {
        let r = t.pod_app(a, &["echo", "--to", to, "--bytes", "1000", "--timeout-ms", "20000"])?;
        if r["ok"] != true {
            bail!("warm-up connection to {to} failed: {r}");
        }
    }
    std::thread::sleep(Duration::from_secs(2));
    let base_listeners = [listeners(a)?, listeners(b)?, listeners(c)?, listeners(w)?];
    let base_fds = [fds(pids[0]), fds(pids[1])];
    let base_orig = [orig_dst(&agents[0]), orig_dst(&agents[1])];

    eprintln!("soak: {minutes} minutes; baseline fds {base_fds:?}, orig_dst entries {base_orig:?}");
    let started = Instant::now();
    let (mut made, mut failed) = (0u64, 0u64);
    let mut errors: Vec<Value> = Vec::new();
    let mut samples = Vec::new();
    let mut restarted = false;
    let mut round = 0u64;
    let mut w_present = true;
    while started.elapsed() < run_for {
        round += 1;
        // Connections at a steady rate: across nodes and on the node, a few each round.
        for to in [&to_b, &to_c] {
            let r =
                t.pod_app(a, &["echoes", "--to", to, "--count", "5", "--bytes", "2000", "--timeout-ms", "20000"])?;
            made += r["succeeded"].as_u64().unwrap_or(0) + r["failed"].as_u64().unwrap_or(0);
            let f = r["failed"].as_u64().unwrap_or(5);
            if f > 0 {
                failed += f;
                errors.push(json!({"at_s": started.elapsed().as_secs_f64(), "to": to, "report": r}));
            }
        }
        // A workload removed and added again (its connections refused in between: it is not
        // one of the allowed ones).
        if round.is_multiple_of(3) {
            let name = t.pod(w).name.clone();
            let req = if w_present {
                json!({"op": "remove_workload", "namespace": "default", "name": name})
            } else {
                json!({"op": "add_workload", "workload": w_record})
            };
            agents[1].api(req).with_context(|| format!("round {round}: workload churn"))?;
            w_present = !w_present;
        }
        if round.is_multiple_of(4) {
            t.write_config("soak.yaml", &policy(round))?;
        }
        if !restarted && started.elapsed() >= run_for / 2 {
            eprintln!("soak: restarting the controller");
            ctl.stop();
            ctl = t.start_controller(&["--cert-ttl", "60s", "--max-cert-ttl", "60s"])?;
            restarted = true;
        }
        samples.push(Sample {
            at_s: started.elapsed().as_secs_f64(),
            rss_kib: [rss_kib(pids[0]), rss_kib(pids[1])],
            fds: [fds(pids[0]), fds(pids[1])],
            orig_dst: [orig_dst(&agents[0]), orig_dst(&agents[1])],
            pool: hbone_connections(&t.pod(a).netns),
            made,
            failed,
        });
        std::thread::sleep(Duration::from_millis(500));
    }
    if !w_present {
        agents[1].api(json!({"op": "add_workload", "workload": w_record}))?;
    }
    // Quiet: what the traffic held is given back.
    let mut problems = Vec::new();
    let settled = wait_for(Duration::from_secs(60), || {
        Ok([orig_dst(&agents[0]), orig_dst(&agents[1])] == base_orig
            // Each netns keeps a reserve of up to 16 spare dial sockets per family, refilled
            // when half gone: the count swings by that much.
            && (0..2).all(|i| fds(pids[i]) <= base_fds[i] + 32)
            && [listeners(a)?, listeners(b)?, listeners(c)?, listeners(w)?] == base_listeners)
    });
    if settled.is_err() {
        problems.push(format!(
            "not back at the baseline a minute after the traffic stopped: orig_dst {:?} (baseline {base_orig:?}), fds {:?} (baseline {base_fds:?}), listeners {:?} (baseline {base_listeners:?})",
            [orig_dst(&agents[0]), orig_dst(&agents[1])],
            [fds(pids[0]), fds(pids[1])],
            [listeners(a)?, listeners(b)?, listeners(c)?, listeners(w)?],
        ));
    }
    if failed > 0 {
        problems.push(format!("{failed} of {made} allowed connections failed; first: {}", errors[0]));
    }
    if !restarted {
        problems.push("the controller was never restarted (the run was too short)".into());
    }
    // Growth: the last third against the first third after the first sample (warm-up).
    let n = samples.len();
    if n >= 6 {
        let third = n / 3;
        let mean = |s: &[Sample], f: &dyn Fn(&Sample) -> u64| s.iter().map(f).sum::<u64>() as f64 / s.len() as f64;
        for i in 0..2 {
            let early = &samples[1..=third];
            let late = &samples[n - third..];
            let (r0, r1) = (mean(early, &|s| s.rss_kib[i]), mean(late, &|s| s.rss_kib[i]));
            // Allocator noise and the certificates' rotation move a few MiB; a leak of one
            // connection's state per connection made would be far more.
            if r1 > r0 * 1.25 + 4096.0 {
                problems.push(format!("agent n{}'s memory grew from {r0:.0} KiB to {r1:.0} KiB", i + 1));
            }
            let (f0, f1) = (mean(early, &|s| s.fds[i]), mean(late, &|s| s.fds[i]));
            if f1 > f0 + 32.0 {
                problems.push(format!("agent n{}'s descriptors grew from {f0:.0} to {f1:.0}", i + 1));
            }
        }
    } else {
        problems.push(format!("only {n} samples: run longer"));
    }
    write_report(&out_dir, minutes, &samples, made, failed, &problems)?;
    drop((agents, ctl));
    println!(
        "summary: soak {minutes} min, {made} connections, {failed} failed, {}",
        if problems.is_empty() { "nothing grew".to_owned() } else { format!("{} problems", problems.len()) }
    );
    if !problems.is_empty() {
        bail!("soak failed:\n- {}", problems.join("\n- "));
    }
    Ok(())
}

fn write_report(
    dir: &Path,
    minutes: f64,
    samples: &[Sample],
    made: u64,
    failed: u64,
    problems: &[String],
) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("samples.json"), serde_json::to_vec_pretty(samples)?)?;
    let mut md = format!(
        "# Soak\n\n{minutes} minutes; {made} connections, {failed} failed. Chart: chart.png; every sample: samples.json.\n\n| s | RSS n1 KiB | RSS n2 KiB | fds n1 | fds n2 | orig_dst n1 | orig_dst n2 | a's HBONE connections | failed |\n|---|---|---|---|---|---|---|---|---|\n"
    );
    let step = (samples.len() / 20).max(1);
    for s in samples.iter().step_by(step) {
        md += &format!(
            "| {:.0} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            s.at_s, s.rss_kib[0], s.rss_kib[1], s.fds[0], s.fds[1], s.orig_dst[0], s.orig_dst[1], s.pool, s.failed
        );
    }
    md += if problems.is_empty() {
        "\nNothing grew without bound; everything came back to its baseline.\n".to_owned()
    } else {
        format!("\nProblems:\n- {}\n", problems.join("\n- "))
    }
    .as_str();
    std::fs::write(dir.join("report.md"), md)?;
    chart(&dir.join("chart.png"), samples)
}

fn chart(path: &Path, samples: &[Sample]) -> Result<()> {
    use plotters::prelude::*;
    let font = std::fs::read("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")
        .map_err(|_| anyhow!("no DejaVuSans.ttf (apt package fonts-dejavu-core; `cargo xtask setup` installs it)"))?;
    plotters::style::register_font("sans-serif", FontStyle::Normal, Box::leak(font.into_boxed_slice()))
        .map_err(|_| anyhow!("DejaVuSans.ttf is not a usable font"))?;
    let root = BitMapBackend::new(path, (1200, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((1, 2));
    let end = samples.last().map(|s| s.at_s).unwrap_or(1.0).max(1.0);
    let colors = [RGBColor(31, 119, 180), RGBColor(214, 39, 40)];
    type Reading<'a> = &'a dyn Fn(&Sample, usize) -> f64;
    let series: [(&str, &str, Reading); 2] = [
        ("Agent memory (RSS)", "MiB", &|s, i| s.rss_kib[i] as f64 / 1024.0),
        ("Agent descriptors", "open", &|s, i| s.fds[i] as f64),
    ];
    for (area, (title, unit, f)) in panels.iter().zip(series) {
        let top = samples.iter().flat_map(|s| [f(s, 0), f(s, 1)]).fold(1.0, f64::max) * 1.2;
        let mut c = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(0f64..end, 0f64..top)?;
        c.configure_mesh().x_desc("seconds").y_desc(unit).draw()?;
        for (i, color) in colors.iter().enumerate() {
            c.draw_series(LineSeries::new(samples.iter().map(|s| (s.at_s, f(s, i))), color))?
                .label(format!("agent n{}", i + 1))
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], *color));
        }
        c.configure_series_labels().border_style(BLACK).background_style(WHITE.mix(0.8)).draw()?;
    }
    root.present()?;
    Ok(())
}
