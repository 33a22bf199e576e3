//! `cargo xtask fuzz`: the `cargo fuzz` targets in fuzz/ (one per parser of untrusted input),
//! each run for a while from its committed seed corpus (fuzz/corpus/<target>/, never written
//! to: what the fuzzer finds goes to target/fuzz/corpus/<target>/). A crash leaves its input
//! in target/fuzz/artifacts/<target>/; fixed, that input joins the seeds, so every later run
//! (the short one in `cargo xtask test` included) replays it first.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

/// The cargo-fuzz release setup installs (`cargo install --locked`).
const CARGO_FUZZ: &str = "0.13.2";

/// Installs cargo-fuzz if this machine lacks it (or has another version).
pub fn install() -> Result<()> {
    let ok = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains(CARGO_FUZZ));
    if !ok {
        super::step(&format!("installing cargo-fuzz {CARGO_FUZZ}"));
        super::sh(Command::new("cargo").args(["install", "--locked", "--version", CARGO_FUZZ, "cargo-fuzz"]))?;
    }
    Ok(())
}

/// The targets: fuzz/fuzz_targets/*.rs.
pub fn targets(root: &Path) -> Result<Vec<String>> {
    let mut v: Vec<String> = std::fs::read_dir(root.join("fuzz/fuzz_targets"))?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_suffix(".rs").map(str::to_owned))
        .collect();
    v.sort();
    Ok(v)
}

pub struct Outcome {
    pub target: String,
    pub ok: bool,
    /// How many inputs ran (as libFuzzer counted them), or the fuzzer's report of a crash.
    pub detail: String,
}

/// Builds every target once with `sanitizer` (`address`, or `none` for the short run), then
/// runs each for `seconds`.
pub fn run(root: &Path, seconds: u64, sanitizer: &str, only: Option<&str>) -> Result<Vec<Outcome>> {
    let t = Instant::now();
    let build = Command::new("cargo")
        .current_dir(root)
        // -O with -a: optimised, but with debug assertions and overflow checks, so that an
        // overflow in a parser is a crash, not a silent wrap.
        .args(["+nightly", "fuzz", "build", "-O", "-a", "-s", sanitizer])
        .status()
        .context("running cargo fuzz build")?;
    if !build.success() {
        bail!("cargo fuzz build failed ({build})");
    }
    eprintln!("fuzz targets built ({:.0}s)", t.elapsed().as_secs_f64());
    let mut out = Vec::new();
    for target in targets(root)? {
        if only.is_some_and(|o| o != target) {
            continue;
        }
        let work = root.join("target/fuzz/corpus").join(&target);
        let artifacts = root.join("target/fuzz/artifacts").join(&target);
        std::fs::create_dir_all(&work)?;
        std::fs::create_dir_all(&artifacts)?;
        let seeds = root.join("fuzz/corpus").join(&target);
        let o = Command::new("cargo")
            .current_dir(root)
            .args(["+nightly", "fuzz", "run", "-O", "-a", "-s", sanitizer, &target])
            .arg(&work)
            .arg(&seeds)
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .arg("-print_final_stats=1")
            .output()
            .with_context(|| format!("running fuzz target {target}"))?;
        let log = String::from_utf8_lossy(&o.stderr);
        let execs = log
            .lines()
            .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0);
        let detail = if o.status.success() {
            format!("{execs} inputs in {seconds}s")
        } else {
            // The fuzzer's own report of the crash, and where it left the input.
            let tail: Vec<&str> = log.lines().rev().take(25).collect();
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        };
        out.push(Outcome { target, ok: o.status.success() && execs > 0, detail });
    }
    Ok(out)
}

/// Prints one line per target; the number that failed.
pub fn report(outcomes: &[Outcome]) -> usize {
    for o in outcomes {
        println!("fuzz {:<22} {} {}", o.target, if o.ok { "ok" } else { "FAILED" }, o.detail);
    }
    outcomes.iter().filter(|o| !o.ok).count()
}
