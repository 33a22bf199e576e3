//! `cargo xtask kernels`: the datapath's core cases on other kernels than the host's.
//!
//! Each kernel is a Debian package, fetched with a private apt configuration (the host's own
//! package lists are left alone) and cached under `target/kernels/`. virtme-ng boots it under
//! software emulation (these machines are VMs without nested virtualisation, so KVM cannot be
//! used) with the host's root filesystem shared read-only over 9p: the guest runs the very
//! test binaries and release binaries the host built. Results come back through a shared
//! directory, one file per case.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

/// A kernel of the matrix.
pub struct Kernel {
    /// The kernel series, as `--kernel` takes it.
    pub series: &'static str,
    /// Where users run it.
    pub shipped_in: &'static str,
    /// apt sources that carry its packages.
    sources: &'static [&'static str],
    /// Whether sockmesh supports it: every core case must pass. An unsupported kernel must
    /// instead be refused by preflight and by the agent, which guards its meshed pods.
    pub supported: bool,
    /// What the package names of this release carry (Debian 13 and a Debian 12 build of the
    /// same series differ only here), or "" where the series alone decides.
    tag: &'static str,
}

pub const KERNELS: &[Kernel] = &[
    Kernel {
        series: "6.12",
        shipped_in: "Debian 13 (trixie)",
        sources: &[
            "deb http://deb.debian.org/debian trixie main",
            "deb http://deb.debian.org/debian-security trixie-security main",
        ],
        supported: true,
        tag: "+deb13-",
    },
    Kernel {
        series: "6.1",
        shipped_in: "Debian 12 (bookworm)",
        sources: &[
            "deb http://deb.debian.org/debian bookworm main",
            "deb http://deb.debian.org/debian-security bookworm-security main",
        ],
        supported: true,
        tag: "",
    },
    Kernel {
        series: "5.10",
        shipped_in: "Debian 11 (bullseye)",
        sources: &[
            "deb http://deb.debian.org/debian bullseye main",
            "deb http://deb.debian.org/debian-security bullseye-security main",
        ],
        supported: false,
        tag: "",
    },
];

/// The kernels `cargo xtask test` boots besides the host's: a supported one (every core case)
/// and a refused one (the refusal and its fail-closed guard, about 40 s).
pub const IN_TEST: &[&str] = &["6.1", "5.10"];

/// The cases every supported kernel must pass: (test binary, test name, what it shows).
const CORE: &[(&str, &str, &str)] = &[
    (
        "datapath",
        "the_agent_runs_only_where_the_kernel_has_every_feature_it_needs",
        "preflight, programs load and attach",
    ),
    ("datapath", "cross_node_bytes_arrive_intact_and_the_source_agent_records_them", "outbound capture"),
    ("identity", "between_nodes_the_wire_carries_only_tls_and_b_sees_a_verified", "mTLS across two nodes"),
    ("datapath", "inbound_from_the_node_lands_on_the_agent_not_the_app", "inbound sk_lookup capture"),
    ("datapath", "fail_closed_while_the_agent_is_stopped_and_back_after_restart", "fail closed, agent stopped"),
    ("datapath", "kill_9_and_restart_keeps_programs_attached_and_nothing_bypasses", "restart takes over links"),
    ("datapath", "a_pod_over_its_quota_and_a_full_map_are_refused_and_counted", "map-full refusal"),
    (
        "ipv6",
        "an_outside_packet_forging_a_pods_own_ipv6_address_never_reaches_its_app",
        "IPv6 pods captured; an outside packet forging a pod's own IPv6 address dropped before the app sees it",
    ),
    (
        "transparent",
        "an_outside_connection_marked_like_the_agents_own_dial_never_reaches_the_app",
        "the app dialled from its plaintext client's address (transparent socket, reply rule and route); a connection from outside carrying the agent's mark steered like any other",
    ),
    (
        "handover",
        "a_surge_agent_in_a_netns_of_its_own_takes_over",
        "an upgrade: listeners passed over SCM_RIGHTS, programs swapped into the same links, no refusal",
    ),
    (
        "kubernetes",
        "a_meshed_pods_cgroup_is_refused_inside_the_kubelets_mkdir",
        "a pod's cgroup refused inside the kubelet's mkdir (structure offsets from this kernel's BTF)",
    ),
];

/// The case an unsupported kernel runs: the agent refuses and attaches nothing.
const REFUSAL: usize = 0;

/// What the VM packages need besides the project's: (command that proves it, Debian package).
pub const APT_PACKAGES: &[(&str, &str)] =
    &[("qemu-system-x86_64", "qemu-system-x86"), ("depmod", "kmod"), ("busybox", "busybox-static")];

/// The most one case may take inside the guest (the slowest takes about 30 s there).
const CASE_TIMEOUT_S: u64 = 600;

/// virtme-ng from PyPI, pinned.
const VIRTME_NG: &str = "virtme-ng==1.42";

/// One case's outcome.
pub struct CaseResult {
    pub name: &'static str,
    pub shows: &'static str,
    pub passed: bool,
    pub reason: String,
}

pub struct KernelResult {
    pub series: &'static str,
    pub shipped_in: &'static str,
    pub release: String,
    pub supported: bool,
    pub preflight_ok: bool,
    pub preflight: String,
    pub cases: Vec<CaseResult>,
    /// The kernel's verdict matches what the matrix says of it.
    pub as_expected: bool,
    pub seconds: f64,
}

pub fn find(series: &str) -> Result<&'static Kernel> {
    KERNELS.iter().find(|k| k.series == series).with_context(|| {
        let known: Vec<&str> = KERNELS.iter().map(|k| k.series).collect();
        format!("no kernel {series:?} in the matrix; known: {}", known.join(", "))
    })
}

/// virtme-ng's `vng`, installed from PyPI if missing.
fn vng() -> Result<PathBuf> {
    let scripts = Command::new("python3")
        .args(["-c", "import sysconfig; print(sysconfig.get_path('scripts'))"])
        .output()
        .context("running python3 (needed for virtme-ng)")?;
    let vng = PathBuf::from(String::from_utf8_lossy(&scripts.stdout).trim()).join("vng");
    if !vng.exists() {
        crate::step(&format!("installing {VIRTME_NG} (boots kernels for the kernel matrix)"));
        crate::sh(Command::new("python3").args(["-m", "pip", "install", "--quiet", VIRTME_NG]))?;
    }
    if !vng.exists() {
        bail!("pip installed {VIRTME_NG} but {} is not there", vng.display());
    }
    Ok(vng)
}

/// apt options that keep lists, cache and state under `dir`, not the host's.
fn apt_opts(dir: &Path) -> Vec<String> {
    let d = dir.display();
    vec![
        format!("-oDir::Etc::SourceList={d}/sources.list"),
        "-oDir::Etc::SourceParts=/nonexistent".into(),
        format!("-oDir::State::Lists={d}/lists"),
        format!("-oDir::Cache={d}/cache"),
        format!("-oDir::State::status={d}/status"),
        "-oDebug::NoLocking=1".into(),
        "-oAPT::Sandbox::User=root".into(),
    ]
}

/// The kernel image of `k`, fetched and unpacked once (cached under `cache`).
fn fetch(k: &Kernel, cache: &Path) -> Result<PathBuf> {
    let unpacked = cache.join("root");
    if let Some(img) = find_image(&unpacked, k.series, k.tag)? {
        return Ok(img);
    }
    crate::step(&format!("fetching Debian's Linux {} kernel", k.series));
    let apt = cache.join("apt");
    for d in ["lists/partial", "cache/archives/partial"] {
        std::fs::create_dir_all(apt.join(d))?;
    }
    let sources: Vec<&str> = KERNELS.iter().flat_map(|k| k.sources.iter().copied()).collect();
    std::fs::write(apt.join("sources.list"), sources.join("\n") + "\n")?;
    std::fs::write(apt.join("status"), "")?;
    let opts = apt_opts(&apt);
    crate::sh(Command::new("apt-get").args(&opts).args(["update", "-qq"]))?;
    // Debian 11 and 12 name them linux-image-5.10.0-46-amd64, Debian 13 linux-image-6.12.57+deb13-amd64.
    let pattern = format!("^linux-image-{}\\.[0-9][-0-9.+deb]*-amd64$", k.series.replace('.', "\\."));
    let found = Command::new("apt-cache").args(&opts).args(["search", "--names-only", &pattern]).output()?;
    let mut pkgs: Vec<(Vec<u32>, String)> = String::from_utf8_lossy(&found.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|p| p.contains(k.tag))
        .map(|p| (version_key(p), p.to_owned()))
        .collect();
    pkgs.sort();
    let (_, pkg) = pkgs.pop().with_context(|| format!("no linux-image-{}.*-amd64 package in {sources:?}", k.series))?;
    let debs = cache.join("debs");
    std::fs::create_dir_all(&debs)?;
    crate::sh(Command::new("apt-get").args(&opts).args(["download", "-qq", &pkg]).current_dir(&debs))?;
    let deb = std::fs::read_dir(&debs)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&format!("{pkg}_"))))
        .with_context(|| format!("apt-get download {pkg} left no .deb in {}", debs.display()))?;
    let dest = unpacked.join(&pkg);
    std::fs::create_dir_all(&dest)?;
    crate::sh(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&dest))?;
    find_image(&unpacked, k.series, k.tag)?.with_context(|| format!("{} holds no vmlinuz", deb.display()))
}

/// The numbers in a package name, to order a series' packages (newest last).
fn version_key(pkg: &str) -> Vec<u32> {
    pkg.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty()).map(|s| s.parse().unwrap_or(0)).collect()
}

/// `root/linux-image-<series>.*-amd64/boot/vmlinuz-*`, the newest package first.
fn find_image(root: &Path, series: &str, tag: &str) -> Result<Option<PathBuf>> {
    let prefix = format!("linux-image-{series}.");
    let mut dirs: Vec<PathBuf> = match std::fs::read_dir(root) {
        Ok(rd) => rd.flatten().map(|e| e.path()).collect(),
        Err(_) => return Ok(None),
    };
    dirs.retain(|d| {
        d.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&prefix) && n.to_string_lossy().contains(tag))
    });
    dirs.sort_by_key(|d| version_key(&d.file_name().unwrap_or_default().to_string_lossy()));
    for d in dirs.iter().rev() {
        let boot = d.join("boot");
        if let Some(img) = std::fs::read_dir(&boot)
            .ok()
            .and_then(|rd| rd.flatten().map(|e| e.path()).find(|p| p.to_string_lossy().contains("/vmlinuz-")))
        {
            return Ok(Some(img));
        }
    }
    Ok(None)
}

/// The integration test binaries cargo built, by target name.
fn test_binaries(root: &Path) -> Result<std::collections::BTreeMap<String, PathBuf>> {
    let out = Command::new("cargo")
        .args(["test", "--release", "--workspace", "--features", "tests/privileged", "--no-run"])
        .args(["--message-format=json", "-q"])
        .current_dir(root)
        .stderr(std::process::Stdio::inherit())
        .output()?;
    if !out.status.success() {
        bail!("building the test binaries failed");
    }
    let mut bins = std::collections::BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        if v["reason"] == "compiler-artifact" && v["target"]["kind"][0] == "test" {
            if let (Some(name), Some(exe)) = (v["target"]["name"].as_str(), v["executable"].as_str()) {
                bins.insert(name.to_owned(), PathBuf::from(exe));
            }
        }
    }
    Ok(bins)
}

/// Boots each kernel and runs its cases. Everything is reported; the caller decides.
pub fn run(root: &Path, kernels: &[&'static Kernel]) -> Result<Vec<KernelResult>> {
    crate::install_packages(APT_PACKAGES)?;
    let vng = vng()?;
    let bins = test_binaries(root)?;
    let cache = root.join("target/kernels");
    let mut results = Vec::new();
    for k in kernels {
        let image = fetch(k, &cache)?;
        crate::step(&format!("booting Linux {} ({}) under emulation", k.series, image.display()));
        results.push(boot_and_test(root, &vng, &bins, k, &image, &cache.join("results").join(k.series))?);
    }
    Ok(results)
}

fn boot_and_test(
    root: &Path,
    vng: &Path,
    bins: &std::collections::BTreeMap<String, PathBuf>,
    k: &'static Kernel,
    image: &Path,
    out: &Path,
) -> Result<KernelResult> {
    let t = Instant::now();
    let _ = std::fs::remove_dir_all(out);
    std::fs::create_dir_all(out)?;
    let cases: Vec<usize> = if k.supported { (0..CORE.len()).collect() } else { vec![REFUSAL] };
    let agent = root.join("target/release/mesh-agent");
    let mut script = String::from("#!/bin/sh\n# Runs inside the guest; results go to the shared directory.\n");
    script += &format!("R={}\ncd /\n", out.display());
    script += "mkdir -p /sys/fs/bpf && mount -t bpf bpf /sys/fs/bpf\n";
    script += "uname -r > $R/release\n";
    script += &format!("{} preflight > $R/preflight.txt 2>&1; echo $? > $R/preflight.rc\n", agent.display());
    for &i in &cases {
        let (bin, name, _) = CORE[i];
        let exe = bins.get(bin).with_context(|| format!("no test binary {bin} was built"))?;
        script += &format!(
            "SOCKMESH_EXPECT_KERNEL={} SOCKMESH_BIN_DIR={} timeout -k 10 {CASE_TIMEOUT_S} {} --exact --test-threads 1 --show-output {name} > $R/{name}.txt 2>&1; echo $? > $R/{name}.rc\n",
            if k.supported { "supported" } else { "refused" },
            root.join("target/release").display(),
            exe.display()
        );
    }
    script += "echo done > $R/finished\n";
    let script_path = out.join("guest.sh");
    std::fs::write(&script_path, script)?;
    // Every case may use its whole budget, plus boot and preflight.
    let budget = CASE_TIMEOUT_S * cases.len() as u64 + 300;
    let status = Command::new("timeout")
        .args(["-k", "10"])
        .arg(budget.to_string())
        .arg(vng)
        .arg("--run")
        .arg(image)
        .args(["--disable-kvm", "--force-9p", "--cpus", "2", "--memory", "3G"])
        .arg(format!("--rwdir={}", out.display()))
        .arg("--exec")
        .arg(format!("sh {}", script_path.display()))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(out.join("vng.log"))?)
        .status()
        .context("running vng")?;
    let read = |name: &str| std::fs::read_to_string(out.join(name)).unwrap_or_default();
    // A guest that did not finish still reports the cases it ran; the others say why not.
    let unfinished = read("finished")
        .is_empty()
        .then(|| format!("the guest did not finish ({status}); see {}", out.join("vng.log").display()));
    let preflight_ok = read("preflight.rc").trim() == "0";
    let mut results = Vec::new();
    for &i in &cases {
        let (_, name, shows) = CORE[i];
        let shows = if k.supported {
            shows
        } else {
            "the agent refuses, naming what is missing, attaches none of the datapath and guards the meshed pod"
        };
        let text = read(&format!("{name}.txt"));
        let rc = read(&format!("{name}.rc"));
        let passed = rc.trim() == "0" && text.contains(&format!("test {name} ... ok"));
        results.push(CaseResult {
            name,
            shows,
            passed,
            reason: match (&unfinished, passed, text.is_empty()) {
                (_, true, _) => String::new(),
                (Some(why), false, true) => format!("did not run: {why}"),
                _ => failure_reason(&text),
            },
        });
    }
    let all_passed = results.iter().all(|c| c.passed);
    // A supported kernel passes preflight and every case; an unsupported one is refused by
    // preflight, and its case (the refusal, no program attached) passes on that branch.
    let refusal_seen = results.first().is_some_and(|c| c.passed)
        && read(&format!("{}.txt", CORE[REFUSAL].1)).contains("preflight refused");
    let as_expected =
        unfinished.is_none() && if k.supported { preflight_ok && all_passed } else { !preflight_ok && refusal_seen };
    Ok(KernelResult {
        series: k.series,
        shipped_in: k.shipped_in,
        release: read("release").trim().to_owned(),
        supported: k.supported,
        preflight_ok,
        preflight: read("preflight.txt"),
        cases: results,
        as_expected,
        seconds: t.elapsed().as_secs_f64(),
    })
}

/// The panic message of a failed test (its first lines), or what else went wrong.
fn failure_reason(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    if let Some(i) = lines.iter().position(|l| l.contains("panicked at")) {
        return lines[i + 1..].iter().take(3).map(|l| l.trim()).collect::<Vec<_>>().join(" ");
    }
    if text.trim().is_empty() {
        return "no output (the case did not run)".into();
    }
    lines.iter().rev().find(|l| !l.trim().is_empty()).map(|l| l.trim().to_owned()).unwrap_or_default()
}

/// The report: a table per kernel, written to target/kernels/report.md and printed.
pub fn report(root: &Path, results: &[KernelResult]) -> Result<String> {
    let mut md = String::from("# Kernel matrix\n\n");
    md += "| kernel | shipped in | release booted | expected | preflight | result | time |\n|---|---|---|---|---|---|---|\n";
    for r in results {
        md += &format!(
            "| {} | {} | {} | {} | {} | {} | {:.0}s |\n",
            r.series,
            r.shipped_in,
            r.release,
            if r.supported { "supported" } else { "refused" },
            if r.preflight_ok { "passed" } else { "refused" },
            if r.as_expected { "as expected" } else { "NOT as expected" },
            r.seconds
        );
    }
    for r in results {
        md += &format!("\n## Linux {} ({})\n\n", r.series, r.release);
        for c in &r.cases {
            md += &format!("- {} {} ({})", if c.passed { "passed" } else { "FAILED" }, c.shows, c.name);
            if !c.passed {
                md += &format!(": {}", c.reason);
            }
            md += "\n";
        }
        let missing: Vec<&str> = r.preflight.lines().filter(|l| l.starts_with("MISSING")).collect();
        if !missing.is_empty() {
            md += "\nMissing features:\n\n";
            for m in missing {
                md += &format!("- {}\n", m.trim_start_matches("MISSING").trim());
            }
        }
    }
    let path = root.join("target/kernels/report.md");
    std::fs::write(&path, &md)?;
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packages_order_by_their_numbers_not_their_text() {
        let mut p = ["linux-image-6.1.0-9-amd64", "linux-image-6.1.0-56-amd64", "linux-image-6.1.0-10-amd64"];
        p.sort_by_key(|p| version_key(p));
        assert_eq!(p.last(), Some(&"linux-image-6.1.0-56-amd64"));
        assert!(version_key("linux-image-6.12.57+deb13-amd64") > version_key("linux-image-6.12.9+deb13-amd64"));
    }

    #[test]
    fn a_failed_case_is_reported_by_its_panic_message() {
        let out = "running 1 test\ntest x ... FAILED\n\n---- x stdout ----\n\nthread 'x' panicked at tests/tests/datapath.rs:1:2:\napp accepted 4, probes ok 1\nnote: run with `RUST_BACKTRACE=1`\n";
        assert!(failure_reason(out).starts_with("app accepted 4, probes ok 1"), "{}", failure_reason(out));
        assert_eq!(failure_reason(""), "no output (the case did not run)");
    }

    /// Every case the matrix names exists in its test file, so a renamed test cannot turn a
    /// kernel's case into "did not run".
    #[test]
    fn every_core_case_is_a_test() {
        let root = crate::workspace_root();
        for (bin, name, _) in CORE {
            let src = std::fs::read_to_string(root.join(format!("tests/tests/{bin}.rs"))).unwrap();
            assert!(src.contains(&format!("fn {name}()")), "no test {name} in tests/tests/{bin}.rs");
        }
        for series in IN_TEST {
            assert!(KERNELS.iter().any(|k| k.series == *series), "{series} is not in the matrix");
        }
        assert!(
            IN_TEST.iter().any(|s| find(s).unwrap().supported) && IN_TEST.iter().any(|s| !find(s).unwrap().supported)
        );
    }
}
