//! `cargo xtask soak [--minutes N]`: the mesh under steady churn for a while, watched for
//! anything that grows without bound. Two nodes; pod `a` (n1) connects at a steady rate to `b`
//! across nodes and to `c` on its own node; workload `w` (n2) is removed and added again
//! through the local API; a policy is rewritten; certificates live one minute and rotate; the
//! controller is restarted once, halfway.
//!
//! Every round it records each agent's resident memory and descriptors, the
//! original-destination map's fill, `a`'s HBONE connections (its pool) and the connections that
//! failed. It fails if an allowed connection failed or went around the mesh, if memory,
//! descriptors or the pool grew (the last third of the run against the first, after warm-up),
//! if the census had to reclaim entries the kernel hooks left, if the certificates never
//! rotated or a policy written after the controller's restart never arrived, or if, once
//! traffic stops, every bounded map's entries, the descriptors, the pool and the listeners are
//! not back at their baseline.
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

/// TCP connections from `netns` to port 15008.
fn hbone_connections(netns: &str) -> u64 {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", netns, "ss", "-Htn", "state", "established", "( dport = :15008 )"])
        .output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).lines().count() as u64).unwrap_or(0)
}

fn policy(round: u64) -> String {
    // A DENY for an identity that sends nothing here: the allowed traffic must never notice
    // the rewrite (its version changes every time). For the whole namespace, so that every
    // node's agent gets each rewrite (a change is pushed only to the nodes it concerns).
    format!(
        "apiVersion: security.sockmesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: soak, namespace: default}}\nspec:\n  action: DENY\n  rules:\n  - from:\n    - source: {{principals: [\"cluster.local/ns/default/sa/nobody-{round}\"]}}\n"
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
    if !(minutes > 0.0 && minutes <= 24.0 * 60.0) {
        bail!("--minutes {minutes}: between 0 and 1440");
    }
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
    let ctl_flags = ["--cert-ttl", "60s", "--max-cert-ttl", "60s"];
    let mut ctl = t.start_controller(&ctl_flags)?;
    let _sb = t.start_server(b, PORT)?;
    let _sc = t.start_server(c, PORT)?;
    let _sw = t.start_server(w, PORT)?;
    let agents = [t.start_agent(n1, &["--cert-ttl-seconds", "60"])?, t.start_agent(n2, &["--cert-ttl-seconds", "60"])?];
    t.wait_ready(n1)?;
    t.wait_ready(n2)?;
    let w_record = t.workload_json(w);
    agents[1].api(json!({"op": "add_workload", "workload": w_record})).context("adding w")?;
    let pids = [agents[0].pid().context("agent n1")?, agents[1].pid().context("agent n2")?];
    let (to_b, to_c, to_w) = (t.addr(b, PORT), t.addr(c, PORT), t.addr(w, PORT));
    let listeners = |p: PodId| -> Vec<u16> {
        let mut v = listening_ports(&t.pod(p).netns).unwrap_or_default();
        v.sort_unstable();
        v.dedup();
        v
    };
    let all_listeners = || [listeners(a), listeners(b), listeners(c), listeners(w)];
    let stats = |i: usize| agents[i].stats().map_err(|e| anyhow!("agent n{}'s stats: {e}", i + 1));
    // Warm-up: the first connections make what stays for the agent's life (the pooled HBONE
    // connections, the spare dial sockets in each netns dialled into); the baseline is taken
    // after them, and after the census has counted the maps again (every 2 s).
    for to in [&to_b, &to_c, &to_w] {
        let r = t.pod_app(a, &["echo", "--to", to, "--bytes", "1000", "--timeout-ms", "20000"])?;
        if r["ok"] != true {
            bail!("warm-up connection to {to} failed: {r}");
        }
    }
    std::thread::sleep(Duration::from_secs(5));
    let base_listeners = all_listeners();
    let base_fds = [fds(pids[0]), fds(pids[1])];
    let base_maps = [stats(0)?.maps, stats(1)?.maps];
    let base_pool = hbone_connections(&t.pod(a).netns);
    let first = [stats(0)?, stats(1)?];

    eprintln!("soak: {minutes} minutes; baseline fds {base_fds:?}, a's HBONE connections {base_pool}");
    let started = Instant::now();
    let (mut made, mut failed) = (0u64, 0u64);
    let mut errors: Vec<Value> = Vec::new();
    let mut samples = Vec::new();
    let mut problems = Vec::new();
    let mut restarted = false;
    let mut round = 0u64;
    let mut w_present = true;
    // One round; an error (an API or process that failed, not a connection) ends the run with
    // the report written.
    let mut one_round = |round: u64, w_present: &mut bool, restarted: &mut bool| -> Result<()> {
        // Connections at a steady rate: across nodes, on the node, and to w while it is
        // registered (it must work again each time it is added back).
        let mut targets = vec![&to_b, &to_c];
        if *w_present {
            targets.push(&to_w);
        }
        for to in targets {
            let r =
                t.pod_app(a, &["echoes", "--to", to, "--count", "4", "--bytes", "2000", "--timeout-ms", "20000"])?;
            made += r["succeeded"].as_u64().unwrap_or(0) + r["failed"].as_u64().unwrap_or(0);
            let f = r["failed"].as_u64().unwrap_or(4);
            if f > 0 {
                failed += f;
                errors.push(json!({"at_s": started.elapsed().as_secs_f64(), "to": to, "report": r}));
            }
        }
        if round.is_multiple_of(3) {
            let name = t.pod(w).name.clone();
            let req = if *w_present {
                json!({"op": "remove_workload", "namespace": "default", "name": name})
            } else {
                json!({"op": "add_workload", "workload": w_record})
            };
            agents[1].api(req).with_context(|| format!("round {round}: workload churn"))?;
            *w_present = !*w_present;
        }
        if round.is_multiple_of(4) {
            t.write_config("soak.yaml", &policy(round))?;
        }
        if !*restarted && started.elapsed() >= run_for / 2 {
            eprintln!("soak: restarting the controller");
            ctl.stop();
            ctl = t.start_controller(&ctl_flags)?;
            *restarted = true;
        }
        let fill = |i: usize| agents[i].stats().ok().and_then(|s| s.maps.get("SM_ORIG_DST").map(|m| m.entries));
        samples.push(Sample {
            at_s: started.elapsed().as_secs_f64(),
            rss_kib: [rss_kib(pids[0]), rss_kib(pids[1])],
            fds: [fds(pids[0]), fds(pids[1])],
            orig_dst: [fill(0).unwrap_or(0), fill(1).unwrap_or(0)],
            pool: hbone_connections(&t.pod(a).netns),
            made,
            failed,
        });
        std::thread::sleep(Duration::from_millis(500));
        Ok(())
    };
    while started.elapsed() < run_for {
        round += 1;
        if let Err(e) = one_round(round, &mut w_present, &mut restarted) {
            problems.push(format!("the run stopped at round {round}: {e:#}"));
            break;
        }
    }
    if !w_present {
        if let Err(e) = agents[1].api(json!({"op": "add_workload", "workload": w_record})) {
            problems.push(format!("adding w back: {e:#}"));
        }
    }
    // The changes still reach the agents after the controller's restart: one more policy
    // rewrite, and both agents apply it.
    let versions = |i: usize| agents[i].stats().map(|s| s.config.version).unwrap_or(0);
    let before = [versions(0), versions(1)];
    t.write_config("soak.yaml", &policy(u64::MAX))?;
    if wait_for(Duration::from_secs(30), || Ok((0..2).all(|i| versions(i) > before[i]))).is_err() {
        problems.push(format!(
            "a policy written after the controller's restart never reached the agents (versions {before:?})"
        ));
    }
    // Quiet: what the traffic held is given back.
    let entries = |m: &std::collections::BTreeMap<String, mesh_api::admin::MapFill>| {
        m.iter().map(|(k, v)| (k.clone(), v.entries)).collect::<std::collections::BTreeMap<_, _>>()
    };
    let back = |i: usize| -> bool {
        agents[i]
            .stats()
            .is_ok_and(|s| s.maps.iter().all(|(k, v)| v.entries <= base_maps[i].get(k).map_or(0, |b| b.entries)))
    };
    let settled = wait_for(Duration::from_secs(60), || {
        Ok(back(0)
            && back(1)
            // Each netns keeps a reserve of up to 16 spare dial sockets (IPv4 here), refilled
            // when half gone: the count swings by that much.
            && (0..2).all(|i| fds(pids[i]) <= base_fds[i] + 16)
            && hbone_connections(&t.pod(a).netns) <= base_pool
            && all_listeners() == base_listeners)
    });
    if settled.is_err() {
        problems.push(format!(
            "not back at the baseline a minute after the traffic stopped: maps {:?} (baseline {:?}), fds {:?} (baseline {base_fds:?}), a's HBONE connections {} (baseline {base_pool}), listeners {:?} (baseline {base_listeners:?})",
            [stats(0).map(|s| entries(&s.maps)).ok(), stats(1).map(|s| entries(&s.maps)).ok()],
            [entries(&base_maps[0]), entries(&base_maps[1])],
            [fds(pids[0]), fds(pids[1])],
            hbone_connections(&t.pod(a).netns),
            all_listeners(),
        ));
    }
    let last = [stats(0)?, stats(1)?];
    for i in 0..2 {
        // The kernel hooks removed every entry themselves: the census, which would hide a
        // hook that leaks, found nothing to reclaim.
        if last[i].reclaimed_entries > first[i].reclaimed_entries {
            problems.push(format!(
                "agent n{}'s census reclaimed {} entries the kernel hooks left",
                i + 1,
                last[i].reclaimed_entries - first[i].reclaimed_entries
            ));
        }
        if minutes >= 0.75 && last[i].certificates.issued <= first[i].certificates.issued {
            problems.push(format!("agent n{}'s one-minute certificates never rotated", i + 1));
        }
    }
    // Every connection went through the mesh (a's agent carried them).
    let carried = last[0].outbound.accepted - first[0].outbound.accepted;
    if carried < made {
        problems
            .push(format!("a's agent carried {carried} connections of the {made} made: the rest were not captured"));
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
        let (early, late) = (&samples[1..=third], &samples[n - third..]);
        for i in 0..2 {
            let (r0, r1) = (mean(early, &|s| s.rss_kib[i]), mean(late, &|s| s.rss_kib[i]));
            // Allocator noise and the certificates' rotation move a few MiB; a leak of one
            // connection's state per connection made would be far more.
            if r1 > r0 * 1.25 + 4096.0 {
                problems.push(format!("agent n{}'s memory grew from {r0:.0} KiB to {r1:.0} KiB", i + 1));
            }
            let (f0, f1) = (mean(early, &|s| s.fds[i]), mean(late, &|s| s.fds[i]));
            if f1 > f0 + 16.0 {
                problems.push(format!("agent n{}'s descriptors grew from {f0:.0} to {f1:.0}", i + 1));
            }
        }
        let (p0, p1) = (mean(early, &|s| s.pool), mean(late, &|s| s.pool));
        if p1 > p0 + 2.0 {
            problems.push(format!("a's HBONE connections grew from {p0:.1} to {p1:.1}"));
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
    let root = BitMapBackend::new(path, (1800, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((1, 3));
    let end = samples.last().map(|s| s.at_s).unwrap_or(1.0).max(1.0);
    let colors = [RGBColor(31, 119, 180), RGBColor(214, 39, 40)];
    type Reading<'a> = &'a dyn Fn(&Sample, usize) -> f64;
    let series: [(&str, &str, Reading); 3] = [
        ("Agent memory (RSS)", "MiB", &|s, i| s.rss_kib[i] as f64 / 1024.0),
        ("Agent descriptors", "open", &|s, i| s.fds[i] as f64),
        ("Original destinations awaiting the agent (SM_ORIG_DST)", "entries", &|s, i| s.orig_dst[i] as f64),
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
