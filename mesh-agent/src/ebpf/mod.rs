//! The kernel side of the datapath: load the programs, attach them (or take over the ones a
//! previous agent left pinned), and keep the maps in step with the local workloads.
//! [`maps`] has the handles the rest of the agent uses afterwards; [`sys`] the raw bpf(2)
//! commands aya does not offer.
//!
//! Layout under the node's bpffs directory (pinned, property P6 in ARCHITECTURE.md):
//!   maps/SM_*            every map, pinned by name (reused by the next agent)
//!   maps/SM_LAYOUT       the maps' layout version: an agent of another layout refuses them
//!   links/connect4 ...   the node's cgroup links (connect4, connect6, sock_ops, sock_release,
//!                        getpeername4/6, getsockname4/6, skb_ingress)
//!   links/sk_lookup-<id> one sk_lookup link per workload netns
//!   links/cgroup_mkdir, links/cgroup_rmdir   the pod cgroup hook (`--kubelet-pods` only)
//! A restarted agent finds the links pinned, swaps its freshly loaded program into each one
//! with BPF_LINK_UPDATE (atomic: the hook is never empty) and reuses the pinned maps.

pub mod btf;
pub mod maps;
pub mod sys;

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aya::maps::{HashMap as BpfHashMap, MapData, SockHash};
use aya::programs::{links::FdLink, CgroupAttachMode, CgroupSock, CgroupSockAddr, RawTracePoint, SkLookup, SockOps};
use aya::{Ebpf, EbpfLoader};
use mesh_common::{InboundKey, WorkloadAddrs, WorkloadValue};

/// The eBPF object built by `cargo xtask build-ebpf` (empty when it was not built).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh-ebpf.o"));

#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error(
        "this agent was built without its eBPF object; build it with `cargo xtask build` (which runs build-ebpf first)"
    )]
    NotBuilt,
    #[error("bpffs directory {path}: {source}; is bpffs mounted (`mount -t bpf bpf /sys/fs/bpf`)?")]
    Bpffs { path: PathBuf, source: std::io::Error },
    #[error(
        "{path} is not on a bpffs mount; mount one (`mount -t bpf bpf /sys/fs/bpf`) and point --bpffs-dir below it"
    )]
    NotBpffs { path: PathBuf },
    #[error("cannot open cgroup root {path}: {source}; it must be a cgroup v2 directory")]
    Cgroup { path: PathBuf, source: std::io::Error },
    #[error("loading the eBPF object failed: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name}: {source}")]
    Program { name: &'static str, source: aya::programs::ProgramError },
    #[error("eBPF map {name}: {source}")]
    Map { name: &'static str, source: aya::maps::MapError },
    #[error("pinning {path}: {reason}")]
    Pin { path: PathBuf, reason: String },
    #[error("taking over pinned link {path}: {source}")]
    Adopt { path: PathBuf, source: std::io::Error },
    #[error(
        "the pinned map {name} was made by an incompatible agent version; remove the node's pins (`mesh-agent uninstall`) and start again"
    )]
    Incompatible { name: &'static str },
    #[error(
        "the maps pinned in {maps_dir} have layout version {pinned}, and this agent (sockmesh {agent}) reads layout version {ours}: it does not take them over, which would misread them, and changed nothing. The programs stay attached (fail closed): this node's meshed pods stay captured, and their connections are refused, until an agent of layout version {pinned} runs again or the pins are replaced. To move this node to layout version {ours}: drain its meshed workloads, stop the agent, run `mesh-agent uninstall --bpffs-dir {bpffs_dir}`, start this agent, then let the workloads back (README, \"Upgrading the agent\")"
    )]
    LayoutVersion { maps_dir: PathBuf, bpffs_dir: PathBuf, pinned: u32, ours: u32, agent: &'static str },
    #[error(
        "the layout record {path} cannot be read ({reason}): this agent cannot tell the pinned maps' layout, so it does not take them over, and changed nothing. The programs stay attached (fail closed). If the pins are this node's, remove them with `mesh-agent uninstall --bpffs-dir {bpffs_dir}` once the node's meshed workloads are drained (README, \"Upgrading the agent\")"
    )]
    LayoutRecord { path: PathBuf, bpffs_dir: PathBuf, reason: String },
    #[error("probing whether the kernel programs see the agent's own sockets: {source}")]
    Probe { source: std::io::Error },
    #[error("the eBPF object has no {0}; rebuild it with `cargo xtask build`")]
    Missing(&'static str),
    #[error("{0}")]
    Kernel(String),
    #[error("{0}; the agent cannot tell whether this kernel runs the datapath, so it does not start")]
    KernelProbe(String),
}

/// Why a link exists: the pin names of the node-wide cgroup links.
const CGROUP_LINKS: [(&str, &str); 9] = [
    (mesh_common::PROG_CONNECT4, "connect4"),
    (mesh_common::PROG_CONNECT6, "connect6"),
    (mesh_common::PROG_SOCK_OPS, "sock_ops"),
    (mesh_common::PROG_SOCK_RELEASE, "sock_release"),
    (mesh_common::PROG_GETPEERNAME4, "getpeername4"),
    (mesh_common::PROG_GETPEERNAME6, "getpeername6"),
    (mesh_common::PROG_GETSOCKNAME4, "getsockname4"),
    (mesh_common::PROG_GETSOCKNAME6, "getsockname6"),
    (mesh_common::PROG_SKB_INGRESS, "skb_ingress"),
];

/// The programs and the maps registration writes to. The connection path never touches this
/// (it reads its one map through [`maps::OrigDstTable`]).
pub struct Datapath {
    ebpf: Ebpf,
    maps_dir: PathBuf,
    links_dir: PathBuf,
    workloads: BpfHashMap<MapData, u64, WorkloadValue>,
    /// Each workload slot's own addresses, for getsockname() on its redirected sockets.
    addrs: aya::maps::Array<MapData, WorkloadAddrs>,
    live: Arc<maps::LiveCounts>,
    inbound: SockHash<MapData, InboundKey>,
    /// Each local workload address's netns cookie (sock_ops knows the agent's dials by it).
    netns_of: BpfHashMap<MapData, InboundKey, u64>,
    /// The meshed pods' UIDs the pod cgroup hook refuses (mesh-common's `pods`).
    pod_uids: BpfHashMap<MapData, [u8; mesh_common::pods::UID_LEN], u8>,
    /// The cgroup ids of the directories the kubelet makes pods' cgroups in.
    pod_parents: BpfHashMap<MapData, u64, u8>,
    /// The cgroups the hook refused, with their pods' UIDs.
    pod_cgroups: BpfHashMap<MapData, u64, [u8; mesh_common::pods::UID_LEN]>,
}

const NO_POD_HOOK: &str = "no pod cgroup hook: a new pod's cgroup is refused when the agent sees it, not inside the kubelet's mkdir, so an app that starts before the agent reacts can connect unmeshed";

/// The tracepoint programs and their pin names: the pod cgroup hook. rmdir first: a refusal
/// mkdir makes is never left without the program that removes it.
const POD_HOOK: [(&str, &str, &str); 2] = [
    (mesh_common::pods::PROG_CGROUP_RMDIR, "cgroup_rmdir", "cgroup_rmdir"),
    (mesh_common::pods::PROG_CGROUP_MKDIR, "cgroup_mkdir", "cgroup_mkdir"),
];

/// Load-time settings.
pub struct DatapathConfig<'a> {
    pub bpffs_dir: &'a Path,
    pub cgroup_root: &'a Path,
    pub max_connections: u32,
    pub max_workloads: u32,
    /// Attach the pod cgroup hook (Kubernetes mode): a meshed pod's cgroup is refused inside
    /// the mkdir that makes it.
    pub pod_hook: bool,
}

/// What attach did with each node-wide link (logged at start; tests look for take-overs).
#[derive(Debug, Clone, serde::Serialize)]
pub struct LinkReport {
    pub name: &'static str,
    pub adopted: bool,
}

impl Datapath {
    pub fn load(cfg: &DatapathConfig<'_>) -> Result<(Self, Vec<LinkReport>), EbpfError> {
        if EBPF_OBJECT.is_empty() {
            return Err(EbpfError::NotBuilt);
        }
        // Before anything is made or attached: on a kernel that lacks a feature the agent
        // refuses whole rather than run half-attached.
        let missing = mesh_api::kernel::check(cfg.cgroup_root).map_err(EbpfError::KernelProbe)?;
        if !missing.is_empty() {
            return Err(EbpfError::Kernel(mesh_api::kernel::refusal(&mesh_api::kernel::release(), &missing)));
        }
        let maps_dir = cfg.bpffs_dir.join("maps");
        let links_dir = cfg.bpffs_dir.join("links");
        for dir in [&maps_dir, &links_dir] {
            std::fs::create_dir_all(dir).map_err(|source| EbpfError::Bpffs { path: dir.clone(), source })?;
        }
        require_bpffs(cfg.bpffs_dir)?;
        // Before any map is opened or made, any program loaded or any link updated: pins of
        // another layout are refused whole, and the hooks stay as they are (fail closed).
        check_layout(cfg.bpffs_dir, &maps_dir)?;
        let cgroup = File::open(cfg.cgroup_root)
            .map_err(|source| EbpfError::Cgroup { path: cfg.cgroup_root.to_owned(), source })?;

        // The pod cgroup hook reads kernel structures: their offsets come from this kernel's
        // BTF. Without them the hook cannot work, and the rest of the datapath still can.
        let offsets = match cfg.pod_hook.then(btf::CgroupOffsets::of_kernel) {
            Some(Err(e)) => {
                tracing::error!(error = %e, "{NO_POD_HOOK}");
                None
            }
            o => o.and_then(Result::ok),
        };
        let mut ebpf = load_object(&maps_dir, cfg.max_connections, cfg.max_workloads, offsets)?;
        // Every program through the verifier before the first is attached: a refusal leaves
        // the hooks as they were.
        load_programs(&mut ebpf)?;
        let mut reports = Vec::new();
        for (prog, pin) in CGROUP_LINKS {
            let pin_path = links_dir.join(pin);
            let program = ebpf.program_mut(prog).ok_or(EbpfError::Missing(prog))?;
            let adopted = match program {
                aya::programs::Program::CgroupSockAddr(p) => attach_or_adopt(prog, p, &cgroup, &pin_path)?,
                aya::programs::Program::SockOps(p) => attach_or_adopt(prog, p, &cgroup, &pin_path)?,
                aya::programs::Program::CgroupSock(p) => attach_or_adopt(prog, p, &cgroup, &pin_path)?,
                aya::programs::Program::CgroupSkb(p) => attach_or_adopt(prog, p, &cgroup, &pin_path)?,
                _ => return Err(EbpfError::Missing(prog)),
            };
            reports.push(LinkReport { name: pin, adopted });
        }
        match (cfg.pod_hook, offsets) {
            // The datapath runs without it: loading or attaching it fails alone.
            (true, Some(_)) => {
                if let Err(e) = attach_pod_hook(&mut ebpf, &links_dir, &mut reports) {
                    tracing::error!(error = %e, "{NO_POD_HOOK}");
                    kept_pod_hook(&links_dir);
                }
            }
            // No offsets (logged above).
            (true, None) => kept_pod_hook(&links_dir),
            // Not in Kubernetes mode: a hook an earlier agent left goes.
            (false, _) => {
                for (_, _, pin) in POD_HOOK {
                    let _ = std::fs::remove_file(links_dir.join(pin));
                    let _ = std::fs::remove_file(links_dir.join(fresh_pin_name(pin)));
                }
            }
        }
        let workloads = take_map(&mut ebpf, mesh_common::WORKLOADS)?;
        let addrs = take_map(&mut ebpf, mesh_common::WORKLOAD_ADDRS)?;
        let live = maps::LiveCounts::open(&maps_dir)?;
        let inbound = take_map(&mut ebpf, mesh_common::INBOUND_LISTENERS)?;
        let netns_of = take_map(&mut ebpf, mesh_common::WORKLOAD_NETNS)?;
        let pod_uids = take_map(&mut ebpf, mesh_common::pods::POD_UIDS)?;
        let pod_parents = take_map(&mut ebpf, mesh_common::pods::POD_PARENTS)?;
        let pod_cgroups = take_map(&mut ebpf, mesh_common::pods::POD_CGROUPS)?;
        let dp = Datapath {
            ebpf,
            maps_dir,
            links_dir,
            workloads,
            addrs,
            live,
            inbound,
            netns_of,
            pod_uids,
            pod_parents,
            pod_cgroups,
        };
        Ok((dp, reports))
    }

    /// Makes the pod cgroup hook's UIDs exactly `uids` (the node's meshed pods).
    pub fn set_pod_uids(&mut self, uids: &std::collections::BTreeSet<String>) -> Result<(), EbpfError> {
        let key = |u: &str| <[u8; mesh_common::pods::UID_LEN]>::try_from(u.as_bytes()).ok();
        let wanted = uids.iter().filter_map(|u| key(u)).collect();
        sync_keys(&mut self.pod_uids, &wanted, mesh_common::pods::POD_UIDS)
    }

    /// Makes the hook's pod parents exactly these cgroup ids.
    pub fn set_pod_parents(&mut self, ids: &std::collections::BTreeSet<u64>) -> Result<(), EbpfError> {
        sync_keys(&mut self.pod_parents, ids, mesh_common::pods::POD_PARENTS)
    }

    /// The cgroups the hook refused that are still there, with their pods' UIDs.
    pub fn hook_refusals(&self) -> Vec<(u64, String)> {
        self.pod_cgroups
            .iter()
            .filter_map(Result::ok)
            .map(|(id, uid)| (id, String::from_utf8_lossy(&uid).into_owned()))
            .collect()
    }

    /// Forgets the hook's record of a refused cgroup (the refusal itself is the caller's).
    pub fn forget_hook_refusal(&mut self, cgroup_id: u64) {
        let _ = self.pod_cgroups.remove(&cgroup_id);
    }

    /// Where the maps are pinned (for [`maps::OrigDstTable`] and [`maps::Census`]).
    pub fn maps_dir(&self) -> &Path {
        &self.maps_dir
    }

    /// Each workload's live connections (shared with the census and the admin API).
    pub fn live_counts(&self) -> &Arc<maps::LiveCounts> {
        &self.live
    }

    /// Marks a cgroup as a meshed workload (or changes its entry in place): from now on its
    /// connects are redirected and counted in slot `id`, up to `max_conns` live ones (0:
    /// every connect refused, for a workload that could not be captured).
    pub fn set_workload_cgroup(&mut self, cgroup_id: u64, id: u32, max_conns: u32) -> Result<(), EbpfError> {
        self.workloads
            .insert(cgroup_id, WorkloadValue { id, max_conns }, 0)
            .map_err(|source| EbpfError::Map { name: mesh_common::WORKLOADS, source })
    }

    /// Records workload slot `id`'s own addresses (its first IPv4 and first IPv6 of `ips`):
    /// what getsockname() shows its redirected sockets as their local address.
    pub fn set_workload_addrs(&mut self, id: u32, ips: &[std::net::IpAddr]) -> Result<(), EbpfError> {
        let v4 = ips.iter().find_map(|ip| match ip {
            std::net::IpAddr::V4(a) => Some(a.octets()),
            _ => None,
        });
        let v6 = ips.iter().find_map(|ip| match ip {
            std::net::IpAddr::V6(a) => Some(a.octets()),
            _ => None,
        });
        self.addrs
            .set(id, WorkloadAddrs::from_octets(v4, v6), 0)
            .map_err(|source| EbpfError::Map { name: mesh_common::WORKLOAD_ADDRS, source })
    }

    /// The entry of a cgroup, if it is marked.
    pub fn workload_cgroup(&self, cgroup_id: u64) -> Option<WorkloadValue> {
        self.workloads.get(&cgroup_id, 0).ok()
    }

    /// Unmarks a cgroup, if its entry is still the one workload `id` made (another workload
    /// may have been given that cgroup since).
    pub fn remove_workload_cgroup(&mut self, cgroup_id: u64, id: u32) -> Result<(), EbpfError> {
        match self.workloads.get(&cgroup_id, 0) {
            Ok(v) if v.id == id => {}
            _ => return Ok(()),
        }
        self.remove_stale_cgroup(cgroup_id)
    }

    /// Unmarks a cgroup whatever its entry (what a previous agent left for a workload that
    /// no longer exists).
    pub fn remove_stale_cgroup(&mut self, cgroup_id: u64) -> Result<(), EbpfError> {
        match self.workloads.remove(&cgroup_id) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(aya::maps::MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            Err(source) => Err(EbpfError::Map { name: mesh_common::WORKLOADS, source }),
        }
    }

    /// The cgroup ids currently marked, with their workload ids.
    pub fn workload_cgroups(&self) -> Vec<(u64, u32)> {
        self.workloads.iter().filter_map(|r| r.ok()).map(|(k, v)| (k, v.id)).collect()
    }

    /// Local workload address `key`: its inbound socket, and its netns (by cookie).
    pub fn set_inbound_listener(&mut self, key: InboundKey, sock: &impl AsRawFd, netns: u64) -> Result<(), EbpfError> {
        self.netns_of
            .insert(key, netns, 0)
            .map_err(|source| EbpfError::Map { name: mesh_common::WORKLOAD_NETNS, source })?;
        self.inbound
            .insert(key, sock.as_raw_fd(), 0)
            .map_err(|source| EbpfError::Map { name: mesh_common::INBOUND_LISTENERS, source })
    }

    pub fn remove_inbound_listener(&mut self, key: &InboundKey) {
        let _ = self.inbound.remove(key);
        let _ = self.netns_of.remove(key);
    }

    /// The addresses with an inbound socket or a netns entry.
    pub fn inbound_keys(&self) -> Vec<InboundKey> {
        let mut keys: Vec<InboundKey> = self.inbound.keys().filter_map(|k| k.ok()).collect();
        keys.extend(self.netns_of.keys().filter_map(|k| k.ok()));
        keys.sort_by_key(|k| (k.family, k.addr));
        keys.dedup();
        keys
    }

    /// Attaches sk_lookup to a workload's netns (or takes over the pinned link).
    pub fn attach_sk_lookup(&mut self, pin_name: &str, netns: &File) -> Result<bool, EbpfError> {
        let pin_path = self.links_dir.join(format!("sk_lookup-{pin_name}"));
        let program: &mut SkLookup = self
            .ebpf
            .program_mut(mesh_common::PROG_SK_LOOKUP)
            .ok_or(EbpfError::Missing(mesh_common::PROG_SK_LOOKUP))?
            .try_into()
            .map_err(|source| EbpfError::Program { name: mesh_common::PROG_SK_LOOKUP, source })?;
        if pin_path.exists() {
            adopt(&pin_path, program.fd().map_err(|source| EbpfError::Program { name: "sk_lookup", source })?.as_fd())?;
            return Ok(true);
        }
        let id = program.attach(netns).map_err(|source| EbpfError::Program { name: "sk_lookup", source })?;
        let link = program.take_link(id).map_err(|source| EbpfError::Program { name: "sk_lookup", source })?;
        let fd_link: FdLink = link.into();
        fd_link.pin(&pin_path).map_err(|e| pin_error(&pin_path, &e))?;
        Ok(false)
    }

    /// Detaches a workload's sk_lookup link (unpinning drops the last reference).
    pub fn detach_sk_lookup(&mut self, pin_name: &str) {
        let _ = std::fs::remove_file(self.links_dir.join(format!("sk_lookup-{pin_name}")));
    }

    /// Names of the sk_lookup links pinned on this node.
    pub fn sk_lookup_pins(&self) -> Vec<String> {
        std::fs::read_dir(&self.links_dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter_map(|e| {
                        e.file_name().to_str().and_then(|n| n.strip_prefix("sk_lookup-")).map(str::to_owned)
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// What a starting agent does about the layout record of the maps dir.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LayoutAction {
    /// The record names this agent's layout: nothing to do.
    Keep,
    /// (Re)write the record with this agent's layout: there are no maps pinned to misread
    /// (whatever an old record said), or the pins have no record and are of this layout.
    Write,
    /// The maps pinned are of another layout, the one given: refuse.
    Refuse(u32),
}

/// The decision (pure): `recorded` is the layout record's version (`None`: no record),
/// `maps_pinned` whether any map is pinned beside it, `ours` this agent's layout.
fn layout_action(recorded: Option<u32>, maps_pinned: bool, ours: u32) -> LayoutAction {
    if !maps_pinned {
        return if recorded == Some(ours) { LayoutAction::Keep } else { LayoutAction::Write };
    }
    // Pins without a record were made before the record existed.
    match recorded.unwrap_or(mesh_common::UNRECORDED_LAYOUT_VERSION) {
        v if v != ours => LayoutAction::Refuse(v),
        _ if recorded.is_none() => LayoutAction::Write,
        _ => LayoutAction::Keep,
    }
}

/// Checks that the maps pinned in `maps_dir` are of this agent's layout
/// ([`mesh_common::MAP_LAYOUT_VERSION`]) and records it when they have no record yet. A
/// refusal changes nothing on the node.
fn check_layout(bpffs_dir: &Path, maps_dir: &Path) -> Result<(), EbpfError> {
    let ours = mesh_common::MAP_LAYOUT_VERSION;
    let record = maps_dir.join(mesh_common::LAYOUT);
    let fresh = maps_dir.join(fresh_pin_name(mesh_common::LAYOUT));
    let bpffs = |source| EbpfError::Bpffs { path: maps_dir.to_owned(), source };
    let mut maps_pinned = false;
    for e in std::fs::read_dir(maps_dir).map_err(bpffs)? {
        let path = e.map_err(bpffs)?.path();
        maps_pinned |= path != record && path != fresh;
    }
    let recorded = match sys::obj_get(&record) {
        Ok(fd) => Some(read_layout(fd.as_fd()).map_err(|reason| EbpfError::LayoutRecord {
            path: record.clone(),
            bpffs_dir: bpffs_dir.to_owned(),
            reason,
        })?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            return Err(EbpfError::LayoutRecord {
                path: record,
                bpffs_dir: bpffs_dir.to_owned(),
                reason: e.to_string(),
            })
        }
    };
    match layout_action(recorded, maps_pinned, ours) {
        LayoutAction::Keep => Ok(()),
        LayoutAction::Refuse(pinned) => Err(EbpfError::LayoutVersion {
            maps_dir: maps_dir.to_owned(),
            bpffs_dir: bpffs_dir.to_owned(),
            pinned,
            ours,
            agent: env!("CARGO_PKG_VERSION"),
        }),
        LayoutAction::Write => {
            if maps_pinned {
                tracing::info!(layout = ours, "the pinned maps have no layout record (an earlier agent's): recorded");
            }
            write_layout(&record, &fresh, ours)
        }
    }
}

/// The version in a layout record, if it has the record's shape.
fn read_layout(fd: std::os::fd::BorrowedFd<'_>) -> Result<u32, String> {
    let shape = sys::map_shape(fd).map_err(|e| format!("not a map: {e}"))?;
    let want = sys::MapShape { map_type: sys::MAP_TYPE_ARRAY, key_size: 4, value_size: 4, max_entries: 1 };
    if shape != want {
        return Err(format!("a map of shape {shape:?}, not {want:?}"));
    }
    sys::array_u32_get(fd, 0).map_err(|e| format!("reading it: {e}"))
}

/// Pins a new layout record naming `version` at `record`: made and filled under another name
/// first, then renamed over any old one, so that the record is never missing or half made.
fn write_layout(record: &Path, fresh: &Path, version: u32) -> Result<(), EbpfError> {
    let failed = |e: std::io::Error| pin_error(record, &e);
    let map = sys::array_u32_create(mesh_common::LAYOUT, 1).map_err(failed)?;
    sys::array_u32_set(map.as_fd(), 0, version).map_err(failed)?;
    let _ = std::fs::remove_file(fresh);
    sys::obj_pin(map.as_fd(), fresh).map_err(|e| pin_error(fresh, &e))?;
    std::fs::rename(fresh, record).map_err(failed)
}

/// Makes a set-like map's keys (value 1) exactly `wanted`: removals first, so that a full map
/// still takes the new ones; past a failed entry, the others are still tried.
fn sync_keys<K: aya::Pod + Ord>(
    map: &mut BpfHashMap<MapData, K, u8>,
    wanted: &std::collections::BTreeSet<K>,
    name: &'static str,
) -> Result<(), EbpfError> {
    let held: std::collections::BTreeSet<K> = map.keys().filter_map(Result::ok).collect();
    let mut last = Ok(());
    for k in held.difference(wanted) {
        if let Err(source) = map.remove(k) {
            last = Err(EbpfError::Map { name, source });
        }
    }
    for k in wanted.difference(&held) {
        if let Err(source) = map.insert(k, 1, 0) {
            last = Err(EbpfError::Map { name, source });
        }
    }
    last
}

/// Loads the object (maps created or reused under `maps_dir`, sized for this node).
fn load_object(
    maps_dir: &Path,
    max_connections: u32,
    max_workloads: u32,
    offsets: Option<btf::CgroupOffsets>,
) -> Result<Ebpf, EbpfError> {
    use mesh_common::pods as p;
    let by_port_size = mesh_common::orig_dst_by_port_size(max_connections);
    // All zero (no hook): the tracepoint programs do nothing.
    let o = offsets.unwrap_or_default();
    Ok(EbpfLoader::new()
        .override_global(p::OFF_CGROUP_KN, &o.cgroup_kn, true)
        .override_global(p::OFF_CGROUP_ROOT, &o.cgroup_root, true)
        .override_global(p::OFF_KERNFS_ID, &o.kernfs_id, true)
        .override_global(p::OFF_ROOT_HIERARCHY, &o.root_hierarchy, true)
        .override_global(p::OFF_KERNFS_PARENT, &o.kernfs_parent, true)
        .default_map_pin_directory(maps_dir)
        .map_max_entries(mesh_common::ORIG_DST, max_connections)
        .map_max_entries(mesh_common::ORIG_DST_BY_PORT, by_port_size)
        .map_max_entries(mesh_common::ORIG_DST_BY_CONN, by_port_size)
        .map_max_entries(mesh_common::WORKLOADS, max_workloads)
        .map_max_entries(mesh_common::WORKLOAD_CONNS, mesh_common::workload_slots(max_workloads))
        .map_max_entries(mesh_common::WORKLOAD_ADDRS, mesh_common::workload_slots(max_workloads))
        .map_max_entries(mesh_common::INBOUND_LISTENERS, mesh_common::inbound_listeners_size(max_workloads))
        .map_max_entries(mesh_common::WORKLOAD_NETNS, mesh_common::inbound_listeners_size(max_workloads))
        .map_max_entries(p::POD_UIDS, max_workloads)
        .map_max_entries(p::POD_CGROUPS, max_workloads)
        .load(EBPF_OBJECT)?)
}

/// Puts every program through the verifier (loads it into the kernel, attaches nothing).
fn load_programs(ebpf: &mut Ebpf) -> Result<(), EbpfError> {
    for (prog, _) in CGROUP_LINKS {
        let program = ebpf.program_mut(prog).ok_or(EbpfError::Missing(prog))?;
        let r = match program {
            aya::programs::Program::CgroupSockAddr(p) => p.load(),
            aya::programs::Program::SockOps(p) => p.load(),
            aya::programs::Program::CgroupSock(p) => p.load(),
            aya::programs::Program::CgroupSkb(p) => p.load(),
            _ => return Err(EbpfError::Missing(prog)),
        };
        r.map_err(|source| EbpfError::Program { name: prog, source })?;
    }
    let sk_lookup: &mut SkLookup = ebpf
        .program_mut(mesh_common::PROG_SK_LOOKUP)
        .ok_or(EbpfError::Missing(mesh_common::PROG_SK_LOOKUP))?
        .try_into()
        .map_err(|source| EbpfError::Program { name: mesh_common::PROG_SK_LOOKUP, source })?;
    sk_lookup.load().map_err(|source| EbpfError::Program { name: mesh_common::PROG_SK_LOOKUP, source })
}

/// Says so when an earlier agent's pod cgroup hook stays attached (this agent could not attach
/// its own): it was made for this same kernel (pins do not outlive a boot) and uses the same
/// pinned maps, which this agent keeps up to date.
fn kept_pod_hook(links_dir: &Path) {
    if links_dir.join("cgroup_mkdir").exists() {
        tracing::warn!("the pod cgroup hook an earlier agent attached on this kernel stays attached");
    }
}

/// The pod cgroup hook's programs through the verifier. Apart from the datapath's: the agent
/// runs without them.
fn load_pod_hook(ebpf: &mut Ebpf) -> Result<(), EbpfError> {
    for (prog, _, _) in POD_HOOK {
        let program = tracepoint_program(ebpf, prog)?;
        program.load().map_err(|source| EbpfError::Program { name: prog, source })?;
    }
    Ok(())
}

/// Loads the pod cgroup hook and attaches it (rmdir first), reporting each link.
fn attach_pod_hook(ebpf: &mut Ebpf, links_dir: &Path, reports: &mut Vec<LinkReport>) -> Result<(), EbpfError> {
    load_pod_hook(ebpf)?;
    for (prog, tracepoint, pin) in POD_HOOK {
        let adopted = attach_tracepoint(prog, tracepoint_program(ebpf, prog)?, tracepoint, &links_dir.join(pin))?;
        reports.push(LinkReport { name: pin, adopted });
    }
    Ok(())
}

fn tracepoint_program<'a>(ebpf: &'a mut Ebpf, prog: &'static str) -> Result<&'a mut RawTracePoint, EbpfError> {
    ebpf.program_mut(prog)
        .ok_or(EbpfError::Missing(prog))?
        .try_into()
        .map_err(|source| EbpfError::Program { name: prog, source })
}

/// What `mesh-agent preflight --kubelet-pods` checks of the pod cgroup hook: this kernel's BTF
/// gives its offsets, and with them its programs pass the verifier (with no offsets it would
/// verify only its first test).
pub fn verify_pod_hook(bpffs: &Path) -> Result<(), EbpfError> {
    if EBPF_OBJECT.is_empty() {
        return Err(EbpfError::NotBuilt);
    }
    let offsets = btf::CgroupOffsets::of_kernel().map_err(EbpfError::Kernel)?;
    require_bpffs(bpffs)?;
    let scratch = bpffs.join(format!("sockmesh-preflight-hook-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).map_err(|source| EbpfError::Bpffs { path: scratch.clone(), source })?;
    let r = load_object(&scratch, 64, 4, Some(offsets)).and_then(|mut ebpf| load_pod_hook(&mut ebpf));
    let _ = std::fs::remove_dir_all(&scratch);
    r
}

/// What `mesh-agent preflight` checks of the kernel programs themselves: the object loads and
/// every program passes this kernel's verifier. Its maps live in a scratch directory under
/// `bpffs` that is removed afterwards; nothing is attached.
pub fn verify_object(bpffs: &Path) -> Result<(), EbpfError> {
    if EBPF_OBJECT.is_empty() {
        return Err(EbpfError::NotBuilt);
    }
    require_bpffs(bpffs)?;
    let scratch = bpffs.join(format!("sockmesh-preflight-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).map_err(|source| EbpfError::Bpffs { path: scratch.clone(), source })?;
    let r = load_object(&scratch, 64, 4, None).and_then(|mut ebpf| load_programs(&mut ebpf));
    let _ = std::fs::remove_dir_all(&scratch);
    r
}

fn require_bpffs(path: &Path) -> Result<(), EbpfError> {
    match sys::is_bpffs(path) {
        Ok(true) => Ok(()),
        Ok(false) => Err(EbpfError::NotBpffs { path: path.to_owned() }),
        Err(source) => Err(EbpfError::Bpffs { path: path.to_owned(), source }),
    }
}

fn take_map<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<T, EbpfError> {
    let map = ebpf.take_map(name).ok_or(EbpfError::Missing(name))?;
    T::try_from(map).map_err(|source| EbpfError::Map { name, source })
}

/// The cgroup-attached program kinds share this shape.
trait CgroupProgram {
    fn prog_fd(&self) -> Result<std::os::fd::BorrowedFd<'_>, aya::programs::ProgramError>;
    fn attach_pinned(&mut self, cgroup: &File, pin: &Path) -> Result<(), EbpfError>;
}

macro_rules! cgroup_program {
    ($ty:ty, $name:literal) => {
        cgroup_program!($ty, $name, (CgroupAttachMode::Single));
    };
    ($ty:ty, $name:literal, ($($attach:expr),*)) => {
        impl CgroupProgram for $ty {
            fn prog_fd(&self) -> Result<std::os::fd::BorrowedFd<'_>, aya::programs::ProgramError> {
                Ok(self.fd()?.as_fd())
            }
            fn attach_pinned(&mut self, cgroup: &File, pin: &Path) -> Result<(), EbpfError> {
                // Mode "Single" means no attach flags: bpf_link_create rejects them, and cgroup
                // links always coexist with other programs (a CNI, systemd) as if ALLOW_MULTI.
                let id = self
                    .attach(cgroup, $($attach),*)
                    .map_err(|source| EbpfError::Program { name: $name, source })?;
                let link = self.take_link(id).map_err(|source| EbpfError::Program { name: $name, source })?;
                let fd_link: FdLink = link.try_into().map_err(|e: aya::programs::links::LinkError| EbpfError::Pin {
                    path: pin.to_owned(),
                    reason: e.to_string(),
                })?;
                fd_link.pin(pin).map_err(|e| pin_error(pin, &e))?;
                Ok(())
            }
        }
    };
}
cgroup_program!(CgroupSockAddr, "cgroup_sock_addr");
cgroup_program!(SockOps, "sock_ops");
cgroup_program!(CgroupSock, "cgroup_sock");
cgroup_program!(
    aya::programs::CgroupSkb,
    "cgroup_skb",
    (aya::programs::CgroupSkbAttachType::Ingress, CgroupAttachMode::Single)
);

fn attach_or_adopt(
    name: &'static str,
    p: &mut impl CgroupProgram,
    cgroup: &File,
    pin: &Path,
) -> Result<bool, EbpfError> {
    if pin.exists() {
        adopt(pin, p.prog_fd().map_err(|source| EbpfError::Program { name, source })?)?;
        Ok(true)
    } else {
        p.attach_pinned(cgroup, pin)?;
        Ok(false)
    }
}

/// Attaches a tracepoint program and pins its link at `pin`. A link an earlier agent pinned
/// there is replaced, not updated (the kernel cannot swap a tracepoint link's program): the new
/// link is attached and pinned beside it first, then renamed over it, so that the hook is never
/// missing; for a moment both run, and what they do is idempotent. Returns whether one was
/// replaced.
fn attach_tracepoint(
    name: &'static str,
    p: &mut RawTracePoint,
    tracepoint: &str,
    pin: &Path,
) -> Result<bool, EbpfError> {
    let program = |source| EbpfError::Program { name, source };
    let id = p.attach(tracepoint).map_err(program)?;
    let link: FdLink = p.take_link(id).map_err(program)?.into();
    let fresh = pin.with_file_name(fresh_pin_name(pin.file_name().and_then(|n| n.to_str()).unwrap_or("link")));
    let _ = std::fs::remove_file(&fresh);
    link.pin(&fresh).map_err(|e| pin_error(&fresh, &e))?;
    let replaced = pin.exists();
    std::fs::rename(&fresh, pin).map_err(|e| pin_error(pin, &e))?;
    Ok(replaced)
}

/// Where a replacing link is pinned before it is renamed over `pin` (bpffs refuses names with
/// a dot).
fn fresh_pin_name(pin: &str) -> String {
    format!("{pin}_new")
}

/// A pinning error with its causes (aya's names only the call that failed).
fn pin_error(path: &Path, e: &dyn std::error::Error) -> EbpfError {
    let mut reason = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        reason += &format!(": {s}");
        source = s.source();
    }
    EbpfError::Pin { path: path.to_owned(), reason }
}

/// Lifts the fail-closed guard a refusing agent left (see [`mesh_api::kernel::guard`]): once
/// the datapath captures the node's workloads it is no longer needed.
pub fn remove_guard(bpffs_dir: &Path) {
    let _ = std::fs::remove_dir_all(bpffs_dir.join("guard"));
}

/// Takes over a pinned link: swaps the freshly loaded program in atomically.
fn adopt(pin: &Path, prog: std::os::fd::BorrowedFd<'_>) -> Result<(), EbpfError> {
    let link = sys::obj_get(pin).map_err(|source| EbpfError::Adopt { path: pin.to_owned(), source })?;
    mesh_api::kernel::link_update(link.as_fd(), prog)
        .map_err(|source| EbpfError::Adopt { path: pin.to_owned(), source })
}

/// A cgroup v2 directory's id, as bpf_get_current_cgroup_id() reports it: its inode number.
pub fn cgroup_id(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(path)?.ino())
}

/// Removes everything this node's agents pinned: detaches all programs and frees the maps.
pub fn uninstall(bpffs_dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(bpffs_dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        r => r?,
    }
    // The default layout is <bpffs>/sockmesh/<node>: the last node out removes the
    // `sockmesh` directory too (only if empty; another node's pins stay).
    if let Some(parent) = bpffs_dir.parent().filter(|p| p.file_name().is_some_and(|n| n == "sockmesh")) {
        let _ = std::fs::remove_dir(parent);
    }
    Ok(())
}

#[cfg(test)]
mod uninstall_tests {
    /// The last node out removes the default layout's `sockmesh` directory; another node's
    /// pins keep it.
    #[test]
    fn uninstall_leaves_no_empty_directory_and_no_other_nodes_pins_gone() {
        let base = std::env::temp_dir().join(format!("sockmesh-uninstall-{}", std::process::id()));
        let dir = base.join("sockmesh");
        for n in ["n1", "n2"] {
            std::fs::create_dir_all(dir.join(n).join("maps")).unwrap();
            std::fs::write(dir.join(n).join("maps/pin"), "").unwrap();
            std::fs::write(dir.join(n).join("maps").join(mesh_common::LAYOUT), "").unwrap();
        }
        super::uninstall(&dir.join("n1")).unwrap();
        assert!(!dir.join("n1").exists(), "the pins or the layout record were left behind");
        assert!(dir.join("n2/maps/pin").exists() && dir.join("n2/maps").join(mesh_common::LAYOUT).exists());
        super::uninstall(&dir.join("n2")).unwrap();
        assert!(!dir.exists(), "an empty sockmesh directory was left");
        assert!(base.exists(), "only the directory the layout made is removed");
        super::uninstall(&dir.join("n2")).unwrap();
        let _ = std::fs::remove_dir_all(&base);
    }
}

#[cfg(test)]
mod layout_tests {
    use super::{layout_action, LayoutAction::*};

    /// Pins of another layout are refused, whatever the record says; pins from before the
    /// record are version 1 and get their record; a record with no maps beside it is replaced.
    #[test]
    fn pins_of_another_layout_are_refused_and_unrecorded_pins_are_version_one() {
        assert_eq!(layout_action(None, false, 1), Write, "no pins at all: recorded");
        assert_eq!(layout_action(None, true, 1), Write, "an earlier agent's pins: version 1, recorded");
        assert_eq!(layout_action(Some(1), true, 1), Keep);
        assert_eq!(layout_action(Some(2), true, 1), Refuse(2));
        assert_eq!(layout_action(Some(1), true, 2), Refuse(1));
        assert_eq!(layout_action(None, true, 2), Refuse(1), "unrecorded pins are version 1, not 2");
        assert_eq!(layout_action(Some(2), false, 1), Write, "no maps to misread: the record is replaced");
        assert_eq!(layout_action(Some(1), false, 1), Keep);
    }

    /// The refusal names both versions, says that nothing was detached, and the way out.
    #[test]
    fn the_refusal_names_both_versions_fail_closed_and_the_upgrade_path() {
        let e = super::EbpfError::LayoutVersion {
            maps_dir: "/sys/fs/bpf/sockmesh/n1/maps".into(),
            bpffs_dir: "/sys/fs/bpf/sockmesh/n1".into(),
            pinned: 7,
            ours: 1,
            agent: "0.1.0",
        }
        .to_string();
        for want in [
            "layout version 7",
            "reads layout version 1",
            "programs stay attached (fail closed)",
            "mesh-agent uninstall --bpffs-dir /sys/fs/bpf/sockmesh/n1",
            "Upgrading the agent",
        ] {
            assert!(e.contains(want), "{want:?} missing from: {e}");
        }
    }
}
