//! What sockmesh needs from the kernel, each need probed directly (feature `kernel`).
//!
//! Versions are not trusted: distribution kernels backport BPF features (RHEL's 5.14 carries
//! many from 6.x), so a version number says little. Each [`Feature`] is checked by asking the
//! kernel for exactly what the agent does: loading a tiny program of the right type that uses
//! the helper or context field in question, creating the same kind of link, calling the same
//! socket option. The version in each entry is the mainline release that added it, for the
//! message a user reads when it is missing.
//!
//! The agent runs these before it touches anything (`mesh-agent run` refuses to start, and
//! `mesh-agent preflight` reports, when one fails), and `meshctl check` runs them too. Probes
//! need root (CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN), as the agent has.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;

/// One kernel capability the datapath depends on.
#[derive(Debug, Clone, Copy)]
pub struct Feature {
    /// What the kernel must have, as a user can search for it.
    pub name: &'static str,
    /// The mainline release that added it.
    pub since: &'static str,
    /// What sockmesh does with it.
    pub used_for: &'static str,
    probe: Probe,
}

#[derive(Debug, Clone, Copy)]
enum Probe {
    /// A program of this type (and expected attach type) that calls this helper loads.
    Helper { prog: ProgType, helper: u32 },
    /// An sk_lookup program that reads `bpf_sk_lookup.ingress_ifindex` loads.
    SkLookupIngressIfindex,
    /// A cgroup link is created and its program swapped in place (BPF_LINK_UPDATE).
    CgroupLink,
    /// An sk_lookup link is created on a network namespace.
    NetnsLink,
    /// getsockopt(SO_NETNS_COOKIE) answers.
    SoNetnsCookie,
}

/// The program types (with their expected attach types) the agent loads.
#[derive(Debug, Clone, Copy)]
enum ProgType {
    Connect4,
    Connect6,
    SockOps,
    SockRelease,
    SkLookup,
}

impl ProgType {
    /// (BPF_PROG_TYPE_*, BPF_* attach type), from the kernel's uapi bpf.h.
    fn ids(self) -> (u32, u32) {
        match self {
            ProgType::Connect4 => (18, 10),   // CGROUP_SOCK_ADDR, CGROUP_INET4_CONNECT
            ProgType::Connect6 => (18, 11),   // CGROUP_SOCK_ADDR, CGROUP_INET6_CONNECT
            ProgType::SockOps => (13, 0),     // SOCK_OPS
            ProgType::SockRelease => (9, 34), // CGROUP_SOCK, CGROUP_INET_SOCK_RELEASE
            ProgType::SkLookup => (30, 36),   // SK_LOOKUP, SK_LOOKUP
        }
    }
}

// Helper ids from uapi bpf.h.
const KTIME_GET_NS: u32 = 5;
const GET_SOCKET_COOKIE: u32 = 46;
const GET_CURRENT_CGROUP_ID: u32 = 80;
const GET_NETNS_COOKIE: u32 = 122;
const GET_CURRENT_ANCESTOR_CGROUP_ID: u32 = 123;

/// Everything the kernel programs and the agent use, oldest first.
pub const FEATURES: &[Feature] = &[
    Feature {
        name: "cgroup and socket cookies in connect programs (bpf_get_current_cgroup_id, bpf_get_current_ancestor_cgroup_id, bpf_get_socket_cookie)",
        since: "5.7",
        used_for: "recognising a meshed pod's connect by its cgroup and remembering its original destination",
        probe: Probe::Helper { prog: ProgType::Connect4, helper: GET_CURRENT_ANCESTOR_CGROUP_ID },
    },
    Feature {
        name: "BPF links on cgroups, replaced in place (BPF_LINK_CREATE, BPF_LINK_UPDATE)",
        since: "5.7",
        used_for: "attaching the node's programs so that a restarted agent takes them over without a gap",
        probe: Probe::CgroupLink,
    },
    Feature {
        name: "sk_lookup programs and their network-namespace links",
        since: "5.9",
        used_for: "steering connections that arrive at a pod to the agent instead of the app",
        probe: Probe::NetnsLink,
    },
    Feature {
        name: "the cgroup sock_release hook, with bpf_get_socket_cookie and bpf_get_netns_cookie",
        since: "5.9",
        used_for: "freeing a closed connection's map entries and its pod's connection quota",
        probe: Probe::Helper { prog: ProgType::SockRelease, helper: GET_NETNS_COOKIE },
    },
    Feature {
        name: "the SO_NETNS_COOKIE socket option",
        since: "5.14",
        used_for: "knowing which pod's network namespace an agent listener serves",
        probe: Probe::SoNetnsCookie,
    },
    Feature {
        name: "bpf_get_netns_cookie in sock_ops programs",
        since: "5.15",
        used_for: "keying a connection's original destination by its pod's network namespace",
        probe: Probe::Helper { prog: ProgType::SockOps, helper: GET_NETNS_COOKIE },
    },
    Feature {
        name: "ingress_ifindex in sk_lookup programs",
        since: "5.17",
        used_for: "telling a pod's own loopback connections from connections arriving from outside it",
        probe: Probe::SkLookupIngressIfindex,
    },
];

/// The oldest mainline kernel that has every [`FEATURES`] entry.
pub const MINIMUM: &str = "5.17";

/// A feature the kernel refused, with what it said.
#[derive(Debug, Clone)]
pub struct Missing {
    pub feature: Feature,
    pub error: String,
}

impl std::fmt::Display for Missing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (Linux {}, used for {}): {}",
            self.feature.name, self.feature.since, self.feature.used_for, self.error
        )
    }
}

/// Probes every feature; `cgroup_root` is a cgroup v2 directory under which a short-lived
/// empty cgroup is made for the link probe. The features the kernel refused, or `Err` when a
/// probe could not be run at all (not root, a bad cgroup directory): that says nothing about
/// the kernel, so it must not be reported as a missing feature.
pub fn check(cgroup_root: &Path) -> Result<Vec<Missing>, String> {
    let mut missing = Vec::new();
    for f in FEATURES {
        match probe(f.probe, cgroup_root) {
            Ok(()) => {}
            Err(ProbeError { missing: true, text }) => missing.push(Missing { feature: *f, error: text }),
            Err(ProbeError { missing: false, text }) => {
                return Err(format!("could not probe for {}: {text}", f.name));
            }
        }
    }
    Ok(missing)
}

/// Why a probe failed: the kernel refused what it was asked (`missing`), or the probe could
/// not ask (permissions, the host's set-up).
#[derive(Debug)]
struct ProbeError {
    missing: bool,
    text: String,
}

fn could_not(text: impl Into<String>) -> ProbeError {
    ProbeError { missing: false, text: text.into() }
}

/// The kernel's answer to a request it does not know (an unknown helper, context field,
/// program, attach or link type, socket option) is one of these.
fn refused(e: &std::io::Error) -> bool {
    const ENOTSUPP: i32 = 524; // the kernel-internal "not supported" some BPF paths return
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::EACCES | libc::E2BIG | libc::EOPNOTSUPP | libc::ENOPROTOOPT | ENOTSUPP)
    )
}

fn io_error(what: &str, e: std::io::Error) -> ProbeError {
    if e.raw_os_error() == Some(libc::EPERM) {
        return could_not(format!(
            "{what}: {e}; run as root (the agent needs CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN)"
        ));
    }
    ProbeError { missing: refused(&e), text: format!("{what}: {e}") }
}

/// Makes the empty cgroup `name` to probe with: below `cgroup_root`, or where the root is not
/// writable without CAP_DAC_OVERRIDE (some hosts make it read-only; the agent does not hold that
/// capability), below the first of its children that is. Returns the root's error if none is.
fn probe_cgroup(cgroup_root: &Path, name: &str) -> std::io::Result<std::path::PathBuf> {
    let first = cgroup_root.join(name);
    let err = match std::fs::create_dir(&first) {
        Ok(()) => return Ok(first),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => e,
        Err(e) => return Err(e),
    };
    let mut children: Vec<std::path::PathBuf> = std::fs::read_dir(cgroup_root)?
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect();
    children.sort();
    for c in children {
        let dir = c.join(name);
        if std::fs::create_dir(&dir).is_ok() {
            return Ok(dir);
        }
    }
    Err(err)
}

/// One paragraph naming every missing feature and what to do, for the agent's refusal.
pub fn refusal(release: &str, missing: &[Missing]) -> String {
    let list: Vec<String> = missing.iter().map(|m| format!("  - {m}")).collect();
    format!(
        "this kernel (Linux {release}) lacks what the sockmesh datapath needs:\n{}\nThe datapath was not attached (none of it: never half). Run a kernel that has these (mainline Linux {MINIMUM} or newer, or a distribution kernel that backports them; docs/kernels.md lists the kernels tested).",
        list.join("\n")
    )
}

/// The running kernel's release string (`uname -r`).
pub fn release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_owned()).unwrap_or_default()
}

fn probe(p: Probe, cgroup_root: &Path) -> Result<(), ProbeError> {
    match p {
        Probe::Helper { prog, helper } => {
            let mut insns = vec![];
            if matches!(helper, GET_CURRENT_ANCESTOR_CGROUP_ID) {
                // The connect probe calls all three of its helpers.
                insns.push(call(GET_CURRENT_CGROUP_ID));
                insns.push(mov_imm(1, 1));
                insns.push(call(GET_CURRENT_ANCESTOR_CGROUP_ID));
                insns.push(mov_reg(1, 6));
                insns.push(call(GET_SOCKET_COOKIE));
            } else if matches!(prog, ProgType::SockRelease) {
                insns.push(call(GET_SOCKET_COOKIE));
                insns.push(mov_reg(1, 6));
                insns.push(call(helper));
                insns.push(call(KTIME_GET_NS));
            } else {
                insns.push(call(helper));
            }
            // r6 keeps the context for the calls after the first (which clobber r1-r5).
            insns.insert(0, mov_reg(6, 1));
            insns.extend([mov_imm(0, 1), exit()]);
            load(prog, &insns).map(drop)
        }
        Probe::SkLookupIngressIfindex => {
            // r2 = *(u32 *)(ctx + offsetof(struct bpf_sk_lookup, ingress_ifindex))
            let ldx = Insn { code: 0x61, regs: 2 | (1 << 4), off: 64, imm: 0 };
            load(ProgType::SkLookup, &[ldx, mov_imm(0, 1), exit()]).map(drop)
        }
        Probe::CgroupLink => {
            let prog = load(ProgType::Connect4, &[mov_imm(0, 1), exit()])?;
            // Unique even across restarts of a process that is always PID 1 (a container).
            static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let nanos =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
            let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let name = format!("sockmesh-probe-{}-{nanos}-{seq}", std::process::id());
            let dir = probe_cgroup(cgroup_root, &name).map_err(|e| {
                could_not(format!("making a cgroup to probe with at {}: {e}", cgroup_root.join(&name).display()))
            })?;
            let r = (|| {
                let cg = std::fs::File::open(&dir).map_err(|e| could_not(format!("{}: {e}", dir.display())))?;
                let link = link_create(&prog, cg.as_raw_fd(), ProgType::Connect4.ids().1)?;
                link_update(link.as_fd(), prog.as_fd()).map_err(|e| io_error("replacing the link's program", e))
            })();
            let _ = std::fs::remove_dir(&dir);
            r
        }
        Probe::NetnsLink => {
            let prog = load(ProgType::SkLookup, &[mov_imm(0, 1), exit()])?;
            // A network namespace of its own, in a thread of its own, so that the probe cannot
            // touch any real traffic.
            std::thread::spawn(move || -> Result<(), ProbeError> {
                // SAFETY: unshare changes only this thread's network namespace.
                if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                    return Err(could_not(format!(
                        "a network namespace to probe in: {}",
                        std::io::Error::last_os_error()
                    )));
                }
                let ns = std::fs::File::open("/proc/thread-self/ns/net")
                    .map_err(|e| could_not(format!("/proc/thread-self/ns/net: {e}")))?;
                link_create(&prog, ns.as_raw_fd(), ProgType::SkLookup.ids().1).map(drop)
            })
            .join()
            .map_err(|_| could_not("the probe thread panicked"))?
        }
        Probe::SoNetnsCookie => {
            const SO_NETNS_COOKIE: libc::c_int = 71;
            // SAFETY: a plain socket, owned at once.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
            if fd < 0 {
                return Err(could_not(format!("a socket to probe with: {}", std::io::Error::last_os_error())));
            }
            // SAFETY: fd is a new descriptor nobody else owns.
            let sock = unsafe { OwnedFd::from_raw_fd(fd) };
            let mut cookie = 0u64;
            let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
            // SAFETY: valid out-pointers of the stated length.
            let rc = unsafe {
                libc::getsockopt(
                    sock.as_raw_fd(),
                    libc::SOL_SOCKET,
                    SO_NETNS_COOKIE,
                    &mut cookie as *mut u64 as *mut libc::c_void,
                    &mut len,
                )
            };
            if rc != 0 {
                return Err(io_error("getsockopt(SO_NETNS_COOKIE)", std::io::Error::last_os_error()));
            }
            Ok(())
        }
    }
}

/// The fail-closed guard for a meshed workload on a node whose kernel cannot run the
/// datapath: `connect()` of a TCP socket in `cgroup` (or below it) to anything but loopback
/// is refused with EPERM, as P4 wants of a meshed pod whose agent is not there. Other
/// protocols, which the mesh does not capture anyway, pass. The two links are pinned as
/// `<pin_dir>/<name>-connect4` and `-connect6`, so the guard outlives the agent's process;
/// removing the pins (`mesh-agent uninstall`) lifts it. Needs only cgroup links (Linux 5.7).
pub fn guard(cgroup: &Path, pin_dir: &Path, name: &str) -> Result<(), String> {
    const NAME: [u8; 16] = *b"sockmesh_guard\0\0";
    let ldx = |off: i16| Insn { code: 0x61, regs: 2 | (1 << 4), off, imm: 0 };
    let jne = |imm: i32, off: i16| Insn { code: 0x55, regs: 2, off, imm };
    // bpf_sock_addr: user_ip4 at 4, user_ip6[4] at 8..24, protocol at 36.
    let v4 = [
        ldx(36),
        jne(6, 5), // not TCP: allow
        ldx(4),
        Insn { code: 0x57, regs: 2, off: 0, imm: u32::from_ne_bytes([0xff, 0, 0, 0]) as i32 }, // r2: the first octet alone
        Insn { code: 0x15, regs: 2, off: 2, imm: u32::from_ne_bytes([127, 0, 0, 0]) as i32 },  // 127/8: allow
        mov_imm(0, 0),
        exit(),
        mov_imm(0, 1),
        exit(),
    ];
    let v6 = [
        ldx(36),
        jne(6, 8), // not TCP: allow
        ldx(8),
        jne(0, 8),
        ldx(12),
        jne(0, 6),
        ldx(16),
        jne(0, 4),
        ldx(20),
        jne(u32::from_ne_bytes([0, 0, 0, 1]) as i32, 2), // ::1: the last word as a native-order load sees it
        mov_imm(0, 1),
        exit(),
        mov_imm(0, 0),
        exit(),
    ];
    std::fs::create_dir_all(pin_dir).map_err(|e| format!("{}: {e}", pin_dir.display()))?;
    let cg = std::fs::File::open(cgroup).map_err(|e| format!("opening cgroup {}: {e}", cgroup.display()))?;
    for (prog, insns, suffix) in [(ProgType::Connect4, &v4[..], "connect4"), (ProgType::Connect6, &v6[..], "connect6")]
    {
        let pin = pin_dir.join(format!("{name}-{suffix}"));
        let fd = load_named(prog, insns, NAME).map_err(|e| e.text)?;
        let link = link_create(&fd, cg.as_raw_fd(), prog.ids().1).map_err(|e| e.text)?;
        // A previous refusal's pin may hold a link to an older cgroup of the same name: the
        // new link is attached before the old one goes, so the workload is never unguarded.
        match std::fs::remove_file(&pin) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(format!("{}: {e}", pin.display())),
            _ => {}
        }
        obj_pin(&link, &pin)?;
    }
    Ok(())
}

fn obj_pin(fd: &OwnedFd, path: &Path) -> Result<(), String> {
    #[repr(C)]
    struct ObjPin {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
    let attr = ObjPin { pathname: c.as_ptr() as u64, bpf_fd: fd.as_raw_fd() as u32, file_flags: 0 };
    bpf(6, &attr).map(drop).map_err(|e| format!("pinning {}: {e}", path.display()))
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    /// dst_reg in the low nibble, src_reg in the high one (little-endian bitfields).
    regs: u8,
    off: i16,
    imm: i32,
}

fn mov_imm(dst: u8, imm: i32) -> Insn {
    Insn { code: 0xb7, regs: dst, off: 0, imm }
}
fn mov_reg(dst: u8, src: u8) -> Insn {
    Insn { code: 0xbf, regs: dst | (src << 4), off: 0, imm: 0 }
}
fn call(helper: u32) -> Insn {
    Insn { code: 0x85, regs: 0, off: 0, imm: helper as i32 }
}
fn exit() -> Insn {
    Insn { code: 0x95, regs: 0, off: 0, imm: 0 }
}

/// The bpf(2) system call with a `#[repr(C)]` prefix of `union bpf_attr` for `cmd` (the
/// kernel zero-checks the rest). The one wrapper: the agent's map and link commands use it too.
pub fn bpf<T>(cmd: libc::c_long, attr: &T) -> std::io::Result<libc::c_long> {
    // SAFETY: every caller passes a #[repr(C)] prefix of union bpf_attr for `cmd`; the kernel
    // reads (and for lookups writes through the pointers in) exactly that many bytes.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *const T, std::mem::size_of::<T>()) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// BPF_PROG_LOAD; on refusal, the verifier's last words.
fn load(prog: ProgType, insns: &[Insn]) -> Result<OwnedFd, ProbeError> {
    load_named(prog, insns, *b"sockmesh_probe\0\0")
}

fn load_named(prog: ProgType, insns: &[Insn], prog_name: [u8; 16]) -> Result<OwnedFd, ProbeError> {
    #[repr(C)]
    struct ProgLoad {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
        prog_name: [u8; 16],
        prog_ifindex: u32,
        expected_attach_type: u32,
    }
    let (prog_type, attach) = prog.ids();
    let license = c"GPL";
    let mut log = vec![0u8; 4096];
    let attr = ProgLoad {
        prog_type,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        kern_version: 0,
        prog_flags: 0,
        prog_name,
        prog_ifindex: 0,
        expected_attach_type: attach,
    };
    match bpf(5, &attr) {
        // SAFETY: the kernel returned a new descriptor that nobody else owns.
        Ok(fd) => Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) }),
        Err(e) => {
            let text = String::from_utf8_lossy(&log[..log.iter().position(|&b| b == 0).unwrap_or(log.len())])
                .trim()
                .to_owned();
            let verifier = text.lines().rev().find(|l| !l.trim().is_empty() && !l.starts_with("processed"));
            match verifier {
                Some(v) if e.raw_os_error() != Some(libc::EPERM) => {
                    Err(ProbeError { missing: true, text: format!("the verifier said \"{}\" ({e})", v.trim()) })
                }
                _ => Err(io_error("loading a program", e)),
            }
        }
    }
}

fn link_create(prog: &OwnedFd, target: i32, attach_type: u32) -> Result<OwnedFd, ProbeError> {
    #[repr(C)]
    struct LinkCreate {
        prog_fd: u32,
        target_fd: u32,
        attach_type: u32,
        flags: u32,
    }
    let attr = LinkCreate { prog_fd: prog.as_raw_fd() as u32, target_fd: target as u32, attach_type, flags: 0 };
    bpf(28, &attr)
        // SAFETY: the kernel returned a new descriptor that nobody else owns.
        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd as i32) })
        .map_err(|e| io_error("creating the link", e))
}

/// BPF_LINK_UPDATE: swaps a link's program atomically (the hook is never empty).
pub fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> std::io::Result<()> {
    #[repr(C)]
    struct LinkUpdate {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let attr =
        LinkUpdate { link_fd: link.as_raw_fd() as u32, new_prog_fd: prog.as_raw_fd() as u32, flags: 0, old_prog_fd: 0 };
    bpf(29, &attr).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table is ordered by version and its minimum is its newest entry: the README's and
    /// the refusal's minimum cannot disagree with what is probed.
    #[test]
    fn the_minimum_is_the_newest_feature() {
        let v = |s: &str| -> (u32, u32) {
            let (a, b) = s.split_once('.').unwrap();
            (a.parse().unwrap(), b.parse().unwrap())
        };
        let newest = FEATURES.iter().map(|f| v(f.since)).max().unwrap();
        assert_eq!(newest, v(MINIMUM));
        assert!(FEATURES.windows(2).all(|w| v(w[0].since) <= v(w[1].since)));
    }

    /// docs/kernels.md and the README say what the probes check and the minimum they imply.
    #[test]
    fn the_docs_list_every_feature_and_the_minimum() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let doc = std::fs::read_to_string(root.join("docs/kernels.md")).unwrap();
        for f in FEATURES {
            let row = format!("| {} | {} | {} |", f.name, f.since, f.used_for);
            assert!(doc.contains(&row), "docs/kernels.md lacks the row {row}");
        }
        let minimum = format!("Linux {MINIMUM} or newer");
        assert!(doc.contains(&format!("**mainline {minimum}**")), "docs/kernels.md does not state {minimum}");
        let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
        assert!(readme.contains(&minimum) && readme.contains("docs/kernels.md"), "README does not state {minimum}");
    }

    #[test]
    fn the_refusal_names_each_missing_feature_and_the_minimum() {
        let m = [Missing { feature: FEATURES[6], error: "the verifier said \"invalid bpf_context access\"".into() }];
        let text = refusal("5.10.0-46-amd64", &m);
        assert!(text.contains("Linux 5.10.0-46-amd64"), "{text}");
        assert!(text.contains("ingress_ifindex in sk_lookup programs (Linux 5.17"), "{text}");
        assert!(text.contains("invalid bpf_context access"), "{text}");
        assert!(text.contains("not attached (none of it"), "{text}");
    }
}
