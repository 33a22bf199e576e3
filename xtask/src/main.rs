//! Developer entry point: `cargo xtask <setup|build-ebpf|build|test|demo|bench|kernels|fuzz|soak|image|codegen>`.
//! Every command that needs the toolchain runs `setup` first; setup is idempotent and quick
//! when everything is present.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

mod fuzz;
mod image;
mod kernels;

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what this machine lacks: Debian packages, nightly rust-src, bpf-linker; mount bpffs.
    Setup,
    /// Build the kernel programs (nightly, bpfel-unknown-none).
    BuildEbpf,
    /// Build the eBPF object and every binary (release).
    Build,
    /// Run all tests: unit tests, then the privileged integration tests on the real kernel.
    Test {
        /// Only run integration tests whose name contains this.
        filter: Option<String>,
    },
    /// Regenerate checked-in artifacts: the gRPC code (the CA's in mesh-identity/src/proto, the
    /// configuration push's in mesh-api/src) and the CRD manifests (deploy/crds) from the Rust
    /// types.
    Codegen,
    /// Benchmarks, reported as ratios to a baseline measured in the same run: policy decision
    /// cost (10 vs 10,000 policies) and the datapath (throughput, latency, connection rate, agent
    /// CPU and memory, mesh vs direct). Report and chart in target/bench/.
    Bench {
        /// One short run of each measurement (a smoke test, not numbers to quote).
        #[arg(long)]
        quick: bool,
        /// Also profile the agents (perf) where targets are hard: new mTLS connections,
        /// cross-node throughput and echo. Flat profiles in target/bench/profile-*.txt.
        #[arg(long)]
        profile: bool,
        /// Extra flags for every agent the bench starts, to measure an option against the
        /// defaults: `--agent-args "--worker-threads 2"`. The report notes them.
        #[arg(long, allow_hyphen_values = true)]
        agent_args: Option<String>,
        /// Instead: the control-plane scale benchmark (the real controller, 1,000 simulated
        /// agents, 100,000 workloads, 10,000 policies; `--quick`: 50, 2,000, 200): policy
        /// propagation, controller memory and CPU, bytes pushed per change, a node joining, CA
        /// signing rate. Report in target/bench/control-plane/.
        #[arg(long, conflicts_with_all = ["profile", "agent_args"])]
        control_plane: bool,
    },
    /// The datapath's core cases on Debian's kernels (other than the host's), each booted
    /// under emulation with the host's root filesystem shared: programs load and attach,
    /// outbound and inbound capture, mTLS across nodes, fail closed, restart, map full, the
    /// pod cgroup hook; on a kernel sockmesh does not support, that the agent refuses and
    /// attaches nothing. Kernels are fetched once (target/kernels/); report in
    /// target/kernels/report.md.
    Kernels {
        /// Kernel series to boot (repeat for several): 6.12, 6.1, 5.10. Default: all.
        #[arg(long = "kernel", value_name = "VERSION")]
        kernels: Vec<String>,
    },
    /// Build the agent's and the controller's container images (FROM scratch, the release
    /// binaries and the libraries they link) with the machine's Docker engine, tagged as
    /// deploy/ names them.
    Image,
    /// Fuzz the parsers of untrusted input (`cargo fuzz` targets in fuzz/, with AddressSanitizer)
    /// from their committed seed corpora. A crash's input is left in target/fuzz/artifacts/.
    Fuzz {
        /// How long each target runs.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Only this target (default: every one in fuzz/fuzz_targets/).
        #[arg(long)]
        target: Option<String>,
    },
    /// The mesh under steady churn for a while (connections, workloads, policies, one-minute
    /// certificates, a controller restart), failing if anything grows without bound or an
    /// allowed connection fails. Report and chart in target/soak/.
    Soak {
        #[arg(long, default_value_t = 10.0)]
        minutes: f64,
    },
    /// A local mesh in network namespaces with real traffic.
    Demo {
        /// Leave the mesh running and print how to poke at it.
        #[arg(long)]
        keep: bool,
        /// Instead: one mesh across two zones (clusters) joined through east-west gateways.
        #[arg(long, value_parser = clap::value_parser!(u8).range(2..=2))]
        zones: Option<u8>,
    },
}

const APT_PACKAGES: &[(&str, &str)] = &[
    // (command that proves it is there, Debian package)
    ("ip", "iproute2"),
    ("bpftool", "bpftool"),
    ("tcpdump", "tcpdump"),
    ("iperf3", "iperf3"),
    // The zone tests and demo: each zone's edge masquerades what leaves it for the other zone
    // (their pod networks overlap), as a cloud NAT would. Test plumbing, not the mesh's.
    ("nft", "nftables"),
    ("ss", "iproute2"),
    // `cargo xtask codegen` and the test that checks the generated gRPC code is current.
    ("protoc", "protobuf-compiler"),
    // The benchmark: its chart's text, and the profiler the report's notes cite.
    ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "fonts-dejavu-core"),
    ("perf", "linux-perf"),
    // The test that checks the systemd units in deploy/systemd/ (`systemd-analyze verify`).
    ("systemd-analyze", "systemd"),
    // The by-hand example (examples/local/): nsenter to enter a host's network namespace, a
    // web server and a client that a user would have.
    ("nsenter", "util-linux"),
    ("findmnt", "util-linux"),
    ("curl", "curl"),
    ("/usr/bin/python3", "python3"),
    // The container test runs the agent's image with an OCI runtime, with exactly the
    // manifest's capabilities (Debian's Docker engine cannot name every one).
    ("runc", "runc"),
    // `ldd` and `strip`, for the images.
    ("ldd", "libc-bin"),
    ("strip", "binutils"),
];

/// Validates the rendered manifests offline (`kubectl kustomize deploy/ | kubernetes-validate
/// --strict`), pinned: the package's version and the Kubernetes version it checks against.
pub const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";
pub const KUBERNETES_VERSION: &str = "1.31.0";

fn main() {
    if let Err(e) = real_main() {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    std::env::set_current_dir(&root)?;
    match cli.cmd {
        Cmd::Setup => setup(),
        Cmd::BuildEbpf => {
            setup()?;
            build_ebpf(&root)
        }
        Cmd::Build => {
            setup()?;
            build(&root)
        }
        Cmd::Test { filter } => {
            setup()?;
            build(&root)?;
            // The container test runs the agent's image as the DaemonSet would.
            image::build(&root)?;
            test(&root, filter.as_deref())
        }
        Cmd::Image => {
            setup()?;
            build(&root)?;
            image::build(&root)
        }
        Cmd::Bench { quick, profile, agent_args, control_plane } => {
            setup()?;
            build(&root)?;
            if control_plane {
                return bench_control_plane(&root, quick);
            }
            bench(&root, quick, profile, agent_args.as_deref())
        }
        Cmd::Kernels { kernels } => {
            let chosen = if kernels.is_empty() {
                kernels::KERNELS.iter().collect::<Vec<_>>()
            } else {
                kernels.iter().map(|k| kernels::find(k)).collect::<Result<Vec<_>>>()?
            };
            setup()?;
            build(&root)?;
            let t = Instant::now();
            let results = kernels::run(&root, &chosen)?;
            print!("{}", kernels::report(&root, &results)?);
            let bad: Vec<&str> = results.iter().filter(|r| !r.as_expected).map(|r| r.series).collect();
            println!("\nkernel matrix finished in {:.0}s", t.elapsed().as_secs_f64());
            println!(
                "summary: {} kernels as expected, {} not{}",
                results.len() - bad.len(),
                bad.len(),
                if bad.is_empty() { String::new() } else { format!(" ({})", bad.join(", ")) }
            );
            if !bad.is_empty() {
                bail!("kernel matrix failed");
            }
            Ok(())
        }
        Cmd::Codegen => {
            for proto in PROTOS {
                codegen(&root, proto, &root.join(proto.out_dir))?;
            }
            write_crds(&root.join("deploy/crds"))?;
            let written = PROTOS.map(|p| format!("{}/{}", p.out_dir, p.generated));
            eprintln!("codegen: wrote {} and deploy/crds", written.join(", "));
            Ok(())
        }
        Cmd::Fuzz { seconds, target } => {
            setup()?;
            fuzz::install()?;
            let t = Instant::now();
            let outcomes = fuzz::run(&root, seconds, "address", target.as_deref())?;
            let failed = fuzz::report(&outcomes);
            println!("\nfuzzing finished in {:.0}s", t.elapsed().as_secs_f64());
            println!("summary: {} targets passed, {failed} failed", outcomes.len() - failed);
            if failed > 0 || outcomes.is_empty() {
                bail!("fuzzing failed");
            }
            Ok(())
        }
        Cmd::Soak { minutes } => {
            setup()?;
            build(&root)?;
            step(&format!("soak: {minutes} minutes"));
            sh(Command::new(root.join("target/release/sm-soak")).args(["--minutes", &minutes.to_string()]))
        }
        Cmd::Demo { keep, zones } => {
            setup()?;
            build(&root)?;
            step("starting the demo mesh");
            let mut cmd = Command::new(root.join("target/release/sm-demo"));
            if keep {
                cmd.arg("--keep");
            }
            if let Some(z) = zones {
                cmd.args(["--zones", &z.to_string()]);
            }
            sh(&mut cmd)
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_owned()
}

fn step(msg: &str) {
    eprintln!("\x1b[1m==> {msg}\x1b[0m");
}

fn sh(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

/// A command on PATH, or (for an absolute path) a file that exists.
fn have(cmd: &str) -> bool {
    if cmd.starts_with('/') {
        return Path::new(cmd).exists();
    }
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd} >/dev/null 2>&1")])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn setup() -> Result<()> {
    let t = Instant::now();
    if unsafe { libc_geteuid() } != 0 {
        bail!("cargo xtask must run as root: it loads eBPF programs and creates network namespaces");
    }
    // 1. Debian packages.
    install_packages(APT_PACKAGES)?;
    // 2. The nightly toolchain's rust-src (for -Z build-std=core).
    let comps = Command::new("rustup").args(["component", "list", "--installed", "--toolchain", "nightly"]).output()?;
    if !comps.status.success() {
        bail!("no nightly toolchain (`rustup toolchain list`): the eBPF programs need one; install it with `rustup toolchain install nightly`");
    }
    if !String::from_utf8_lossy(&comps.stdout).lines().any(|l| l.starts_with("rust-src")) {
        step("adding rust-src to the nightly toolchain");
        sh(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    }
    // 3. bpf-linker, linked against the nightly's own LLVM (docs/toolchain.md says why).
    let linker_ok = Command::new("bpf-linker").arg("--version").output().map(|o| o.status.success()).unwrap_or(false);
    if !linker_ok {
        install_bpf_linker()?;
    }
    // 4. bpffs.
    mount_bpffs()?;
    // 5. The offline validator of the Kubernetes manifests (PyPI).
    let validator_ok = Command::new("kubernetes-validate").arg("--version").output().is_ok_and(|o| {
        o.status.success()
            && String::from_utf8_lossy(&o.stdout)
                .contains(KUBERNETES_VALIDATE.trim_start_matches("kubernetes-validate=="))
    });
    if !validator_ok {
        step(&format!("installing {KUBERNETES_VALIDATE} (PyPI)"));
        sh(Command::new("python3").args(["-m", "pip", "install", "--quiet", KUBERNETES_VALIDATE]))?;
    }
    eprintln!("setup: ok ({:.1}s)", t.elapsed().as_secs_f64());
    Ok(())
}

/// Installs the Debian packages of `list` whose command is missing: (command, package).
fn install_packages(list: &[(&str, &str)]) -> Result<()> {
    let mut missing: Vec<&str> = list.iter().filter(|(c, _)| !have(c)).map(|(_, p)| *p).collect();
    missing.dedup();
    if !missing.is_empty() {
        step(&format!("installing Debian packages: {}", missing.join(" ")));
        sh(Command::new("apt-get").args(["update", "-q"]))?;
        sh(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    Ok(())
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

fn install_bpf_linker() -> Result<()> {
    step("building bpf-linker against the nightly's LLVM (about a minute)");
    let sysroot = Command::new("rustc").args(["+nightly", "--print", "sysroot"]).output()?;
    let lib = PathBuf::from(String::from_utf8(sysroot.stdout)?.trim()).join("lib");
    let llvm = std::fs::read_dir(&lib)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so.") || (n.starts_with("libLLVM") && n.ends_with(".so")))
        })
        .with_context(|| format!("no libLLVM in {}", lib.display()))?;
    // Outside the checkout: the installed bpf-linker keeps a RUNPATH to this prefix.
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/root"));
    let prefix = home.join(".local/share/sockmesh-llvm");
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)?;
    for name in ["libLLVM.so".to_owned(), llvm.file_name().unwrap().to_string_lossy().into_owned()] {
        let link = prefix_lib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&llvm, &link)?;
    }
    sh(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--version",
            "0.13.0",
            "--no-default-features",
            "--features",
            "llvm-22",
            "--force",
        ])
        .env("LLVM_PREFIX", &prefix))
}

fn mount_bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
    let mounted = mounts.lines().any(|l| {
        let mut it = l.split(" - ");
        let left = it.next().unwrap_or("");
        let right = it.next().unwrap_or("");
        left.split_whitespace().nth(4) == Some("/sys/fs/bpf") && right.starts_with("bpf ")
    });
    if !mounted {
        step("mounting bpffs at /sys/fs/bpf");
        std::fs::create_dir_all("/sys/fs/bpf")?;
        sh(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    }
    Ok(())
}

fn build_ebpf(root: &Path) -> Result<()> {
    step("building the eBPF programs (nightly, bpfel-unknown-none)");
    sh(Command::new("cargo")
        .args(["+nightly", "build", "--release", "--target-dir"])
        .arg(root.join("target/ebpf"))
        .current_dir(root.join("mesh-ebpf"))
        // Inherited from `cargo xtask` (stable) these would point the nightly build at stable.
        .env_remove("RUSTC")
        .env_remove("RUSTDOC")
        .env_remove("CARGO")
        .env_remove("RUSTUP_TOOLCHAIN"))
}

fn build(root: &Path) -> Result<()> {
    build_ebpf(root)?;
    step("building the agent and tools (release)");
    // mesh-agent's build.rs embeds target/ebpf/.../mesh-ebpf, where build_ebpf just put it.
    sh(Command::new("cargo").args(["build", "--release", "--workspace", "--bins"]))
}

/// A .proto file and where its generated code is checked in.
#[derive(Clone, Copy)]
struct Proto {
    /// Relative to the workspace root.
    file: &'static str,
    out_dir: &'static str,
    /// The file tonic-prost-build writes (named after the proto package).
    generated: &'static str,
}

const PROTOS: [Proto; 2] = [
    Proto { file: "mesh-identity/proto/ca.proto", out_dir: "mesh-identity/src/proto", generated: "sockmesh.ca.v1.rs" },
    Proto { file: "mesh-api/proto/config.proto", out_dir: "mesh-api/src", generated: "sockmesh.config.v1.rs" },
];

/// Generates a proto's tonic/prost code into `out`.
fn codegen(root: &Path, proto: Proto, out: &Path) -> Result<()> {
    let file = root.join(proto.file);
    let include = file.parent().expect("a proto file has a directory").to_owned();
    std::fs::create_dir_all(out)?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .out_dir(out)
        .compile_protos(&[file], &[include])
        .context("protoc failed (is protobuf-compiler installed? `cargo xtask setup` installs it)")
}

const CRD_HEADER: &str = "# Generated by `cargo xtask codegen` from mesh-model/src/policy.rs. Do not edit.\n";

fn write_crds(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    for (name, yaml) in mesh_model::policy::crd_yamls() {
        std::fs::write(dir.join(name), format!("{CRD_HEADER}{yaml}"))?;
    }
    Ok(())
}

fn bench(root: &Path, quick: bool, profile: bool, agent_args: Option<&str>) -> Result<()> {
    step("policy decision benchmark (10 vs 10,000 policies)");
    let out = Command::new("cargo")
        .args(["bench", "-q", "-p", "mesh-model", "--bench", "policy"])
        .stderr(std::process::Stdio::inherit())
        .output()?;
    if !out.status.success() {
        bail!("policy benchmark failed");
    }
    let table = String::from_utf8(out.stdout)?;
    print!("{table}");
    let dir = root.join("target/bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("policy.md"), &table)?;
    step("datapath benchmark: mesh vs direct in one two-node topology");
    let mut cmd = Command::new(root.join("target/release/sm-bench"));
    cmd.arg("--out").arg(&dir);
    if quick {
        cmd.arg("--quick");
    }
    if profile {
        cmd.arg("--profile");
    }
    if let Some(a) = agent_args {
        cmd.arg("--agent-args").arg(a);
    }
    sh(&mut cmd)
}

/// `cargo xtask bench --control-plane`: sm-cpbench against the release controller.
fn bench_control_plane(root: &Path, quick: bool) -> Result<()> {
    step("control-plane benchmark: the real controller and simulated agents");
    let mut cmd = Command::new(root.join("target/release/sm-cpbench"));
    cmd.arg("--out").arg(root.join("target/bench/control-plane"));
    if quick {
        cmd.arg("--quick");
    }
    sh(cmd.env("SOCKMESH_BIN_DIR", root.join("target/release")))
}

/// Sums cargo's "test result:" lines.
fn count_results(output: &str) -> (u64, u64) {
    let mut passed = 0;
    let mut failed = 0;
    for line in output.lines().filter(|l| l.starts_with("test result:")) {
        for part in line.split([';', '.']) {
            let words: Vec<&str> = part.split_whitespace().collect();
            if words.len() == 2 {
                match (words[0].parse::<u64>(), words[1]) {
                    (Ok(n), "passed") => passed += n,
                    (Ok(n), "failed") => failed += n,
                    _ => {}
                }
            }
        }
    }
    (passed, failed)
}

fn run_tests(cmd: &mut Command) -> Result<(u64, u64, bool)> {
    let out = cmd.stderr(std::process::Stdio::inherit()).output().with_context(|| format!("running {cmd:?}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    print!("{text}");
    let (p, f) = count_results(&text);
    Ok((p, f, out.status.success()))
}

/// How long `cargo xtask test` runs each fuzz target.
const FUZZ_SECONDS_IN_TEST: u64 = 10;

fn test(root: &Path, filter: Option<&str>) -> Result<()> {
    let t = Instant::now();
    let mut passed = 0;
    let mut failed = 0;
    let mut ok = true;
    // One invocation for unit and integration tests: building `tests` alone with its feature
    // would unify dependency features differently and rebuild half the tree.
    step("unit tests, then integration tests on the real kernel");
    let mut cmd = Command::new("cargo");
    cmd.args(["test", "--release", "--workspace", "--no-fail-fast", "--features", "tests/privileged"]);
    if let Some(f) = filter {
        cmd.args(["--", f]);
    }
    let (p, f, s) = run_tests(cmd.env("SOCKMESH_BIN_DIR", root.join("target/release")))?;
    passed += p;
    failed += f;
    ok &= s;
    step("checking that the tests left nothing behind");
    let left = leftovers()?;
    if left.is_empty() {
        passed += 1;
        println!("leftovers: none (namespaces, cgroups, bpffs pins)");
    } else {
        failed += 1;
        ok = false;
        println!("leftovers FAILED: {}", left.join(", "));
    }
    if filter.is_none() {
        // Each fuzz target briefly, from its seeds (which hold every crash input fixed so
        // far): `cargo xtask fuzz` runs them for longer. Each target counts as a test.
        step(&format!("fuzzing: each target for {FUZZ_SECONDS_IN_TEST}s"));
        match fuzz::install().and_then(|()| fuzz::run(root, FUZZ_SECONDS_IN_TEST, "none", None)) {
            Ok(outcomes) => {
                let bad = fuzz::report(&outcomes);
                passed += (outcomes.len() - bad) as u64;
                failed += bad as u64;
                ok &= bad == 0 && !outcomes.is_empty();
            }
            Err(e) => {
                failed += 1;
                ok = false;
                println!("fuzzing FAILED: {e:#}");
            }
        }
        // The core cases on Debian 12's kernel and the refusal on Debian 11's, each booted
        // under emulation (the whole matrix is `cargo xtask kernels`). Each case counts as a
        // test.
        step(&format!("kernel matrix: Linux {} under emulation", kernels::IN_TEST.join(" and ")));
        let chosen = kernels::IN_TEST.iter().map(|k| kernels::find(k)).collect::<Result<Vec<_>>>()?;
        match kernels::run(root, &chosen) {
            Ok(results) => {
                print!("{}", kernels::report(root, &results)?);
                for r in &results {
                    for c in &r.cases {
                        if c.passed {
                            passed += 1;
                        } else {
                            failed += 1;
                        }
                    }
                    if !r.as_expected {
                        ok = false;
                        println!("kernel {} FAILED: not as the matrix expects", r.series);
                    }
                }
            }
            Err(e) => {
                failed += 1;
                ok = false;
                println!("kernel matrix FAILED: {e:#}");
            }
        }
    }
    println!("\nsockmesh tests finished in {:.0}s", t.elapsed().as_secs_f64());
    println!("summary: {passed} passed, {failed} failed");
    if !ok || failed > 0 {
        bail!("tests failed");
    }
    Ok(())
}

/// Namespaces, cgroups and bpffs entries named with the tests' prefix.
fn leftovers() -> Result<Vec<String>> {
    const PREFIX: &str = "smt-";
    let mut left = Vec::new();
    let ns = Command::new("ip").args(["netns", "list"]).output()?;
    for l in String::from_utf8_lossy(&ns.stdout).lines() {
        if l.starts_with(PREFIX) {
            left.push(format!("netns {}", l.split_whitespace().next().unwrap_or(l)));
        }
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    let cg2 = mountinfo.lines().find_map(|l| {
        let (a, b) = l.split_once(" - ")?;
        b.starts_with("cgroup2 ").then(|| a.split_whitespace().nth(4).map(PathBuf::from)).flatten()
    });
    for dir in [cg2, Some(PathBuf::from("/sys/fs/bpf"))].into_iter().flatten() {
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with(PREFIX) {
                    left.push(e.path().display().to_string());
                }
            }
        }
    }
    Ok(left)
}

#[cfg(test)]
mod tests {
    /// The checked-in CRD YAML must be what the Rust types generate today.
    #[test]
    fn checked_in_crds_match_the_types() {
        for (name, yaml) in mesh_model::policy::crd_yamls() {
            let path = super::workspace_root().join("deploy/crds").join(name);
            let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                checked_in == format!("{}{yaml}", super::CRD_HEADER),
                "{} is stale: run `cargo xtask codegen` and commit it",
                path.display()
            );
        }
    }

    /// The checked-in gRPC code of every .proto must be what it generates today.
    #[test]
    fn generated_grpc_code_is_current() {
        let root = super::workspace_root();
        for proto in super::PROTOS {
            let dir = tempfile::tempdir().unwrap();
            super::codegen(&root, proto, dir.path()).unwrap();
            let fresh = std::fs::read_to_string(dir.path().join(proto.generated)).unwrap();
            let path = root.join(proto.out_dir).join(proto.generated);
            let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(fresh == checked_in, "{} is stale: run `cargo xtask codegen` and commit it", path.display());
        }
    }

    #[test]
    fn counts_cargo_result_lines() {
        let out = "test result: ok. 5 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.1s\n\
                   test result: FAILED. 2 passed; 3 failed; 0 ignored; 0 measured; 0 filtered out\n";
        assert_eq!(super::count_results(out), (7, 3));
    }
}
