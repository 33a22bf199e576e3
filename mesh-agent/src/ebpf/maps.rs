//! The maps as the rest of the agent uses them after load, each through its own handle so
//! that nothing on the connection path shares a lock with a map walk:
//!
//! - [`OrigDstTable`]: the connection path's one map operation, taking the original
//!   destination of an accepted socket (a lookup-and-delete on its own descriptor, no lock).
//! - [`Census`]: everything that walks maps, off the connection path on a blocking thread:
//!   entries per map (the fill metrics), the kernel programs' counters, the collection of
//!   released entries the agent never consumed, and of entries whose socket is gone.
//! - [`LiveCounts`]: each workload's live intercepted connections, shared with the kernel
//!   through a memory mapping (registration picks free slots; the census counts off what it
//!   removes; the admin API reports them).

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use aya::maps::{HashMap as BpfHashMap, IterableMap, Map, MapData, PerCpuArray, SockHash};
use mesh_common::{Counter, InboundKey, OrigDst, PortKey, WorkloadValue};

use super::{sys, EbpfError};
use crate::metrics::Metrics;

/// Takes original destinations from `SM_ORIG_BY_CONN` (by the accepted socket's cookie) or
/// `SM_ORIG_BY_PORT`, depending on where sock_ops can see the agent's sockets.
pub struct OrigDstTable {
    by_conn: OwnedFd,
    by_port: OwnedFd,
    lookup: Lookup,
}

/// Where the agent looks for an accepted connection's original destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Lookup {
    /// The agent runs below the cgroup root the programs are attached to, so sock_ops sees its
    /// accepted sockets and binds each destination to exactly one of them: the agent looks only
    /// there. A connection whose destination is not there is refused — never looked up by port,
    /// where another connection reusing the port may have left its own.
    ByConnection,
    /// The agent runs outside that cgroup root: sock_ops never sees its accepted sockets, so
    /// destinations stay keyed by (netns, family, client port).
    ByPort,
}

impl Lookup {
    pub fn as_str(self) -> &'static str {
        match self {
            Lookup::ByConnection => "by_connection",
            Lookup::ByPort => "by_port",
        }
    }

    /// Asks the kernel whether sock_ops sees the sockets this agent accepts: a loopback
    /// connection to a port of the agent's own, which sock_ops answers in
    /// [`mesh_common::PROBE`] when it runs for the accepted socket. No guess from cgroup paths
    /// (a cgroup namespace hides where the agent really is).
    pub fn probe(maps_dir: &Path) -> Result<Lookup, EbpfError> {
        const NAME: &str = mesh_common::PROBE;
        let mut probe: aya::maps::Array<MapData, u64> = typed(NAME, Map::Array(open(maps_dir, NAME)?))?;
        let map_err = |source| EbpfError::Map { name: NAME, source };
        let io_err = |source| EbpfError::Probe { source };
        // Another agent of this node probing at the same moment (an upgrade's overlap) can
        // overwrite the answer: try again then.
        let mut answer = Lookup::ByConnection;
        for _ in 0..5 {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(io_err)?;
            let port = listener.local_addr().map_err(io_err)?.port();
            probe.set(mesh_common::PROBE_SEEN, 0, 0).map_err(map_err)?;
            probe.set(mesh_common::PROBE_PORT, port as u64, 0).map_err(map_err)?;
            let _client = std::net::TcpStream::connect(("127.0.0.1", port)).map_err(io_err)?;
            // accept() returns an established socket: sock_ops has run for it by then.
            let (accepted, _) = listener.accept().map_err(io_err)?;
            let cookie = crate::sockdiag::socket_cookie(&accepted).map_err(io_err)?;
            let seen = probe.get(&mesh_common::PROBE_SEEN, 0).map_err(map_err)?;
            probe.set(mesh_common::PROBE_PORT, 0, 0).map_err(map_err)?;
            answer = match seen {
                0 => Lookup::ByPort,
                s if s == cookie => return Ok(Lookup::ByConnection),
                _ => continue,
            };
            break;
        }
        Ok(answer)
    }
}

impl OrigDstTable {
    pub fn open(maps_dir: &Path, lookup: Lookup) -> Result<OrigDstTable, EbpfError> {
        let open = |name: &str| {
            let path = maps_dir.join(name);
            sys::obj_get(&path).map_err(|source| EbpfError::Adopt { path, source })
        };
        Ok(OrigDstTable {
            by_conn: open(mesh_common::ORIG_DST_BY_CONN)?,
            by_port: open(mesh_common::ORIG_DST_BY_PORT)?,
            lookup,
        })
    }

    /// The original destination of the connection the agent accepted on a workload's outbound
    /// listener (`accepted`: its SO_COOKIE; `key`: listener's netns cookie, client family,
    /// client port). Consumed.
    /// Whether sock_ops sees this agent's sockets (see [`Lookup`]).
    pub fn lookup(&self) -> Lookup {
        self.lookup
    }

    pub fn take(&self, accepted: Option<u64>, key: &PortKey) -> Option<OrigDst> {
        match self.lookup {
            Lookup::ByConnection => {
                accepted.and_then(|c| Self::taken(sys::lookup_and_delete(self.by_conn.as_fd(), &c)))
            }
            Lookup::ByPort => Self::taken(sys::lookup_and_delete(self.by_port.as_fd(), key)),
        }
    }

    fn taken(r: std::io::Result<Option<OrigDst>>) -> Option<OrigDst> {
        r.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "reading the original-destination map failed");
            None
        })
    }
}

/// Each workload's live intercepted connections: the kernel's count array
/// ([`mesh_common::WORKLOAD_CONNS`]) mapped into the agent.
pub struct LiveCounts {
    slots: sys::MappedU64Array,
}

impl LiveCounts {
    pub fn open(maps_dir: &Path) -> Result<Arc<LiveCounts>, EbpfError> {
        const NAME: &str = mesh_common::WORKLOAD_CONNS;
        let data = open(maps_dir, NAME)?;
        let info = data.info().map_err(|source| EbpfError::Map { name: NAME, source })?;
        if info.map_flags() & mesh_common::BPF_F_MMAPABLE == 0 || info.value_size() != 8 {
            return Err(EbpfError::Incompatible { name: NAME });
        }
        let slots = sys::MappedU64Array::map(data.fd().as_fd(), info.max_entries())
            .map_err(|source| EbpfError::Adopt { path: maps_dir.join(NAME), source })?;
        Ok(Arc::new(LiveCounts { slots }))
    }

    /// How many slots there are (workload ids are below this).
    pub fn slots(&self) -> u32 {
        self.slots.len() as u32
    }

    /// The live connections counted in slot `id`.
    pub fn get(&self, id: u32) -> Option<u64> {
        self.slots.get(id as usize).map(|n| n.load(Ordering::Relaxed))
    }

    /// Counts off one connection of slot `id` whose entry the agent removed. Never below zero:
    /// the kernel reads a count that wrapped as zero, but it should never see one.
    pub fn count_off(&self, id: u32) {
        if let Some(n) = self.slots.get(id as usize) {
            let _ = n.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1));
        }
    }
}

/// Walks the maps: fill, counters, and collection of released entries.
pub struct Census {
    orig_dst: BpfHashMap<MapData, u64, OrigDst>,
    orig_by_port: BpfHashMap<MapData, PortKey, OrigDst>,
    orig_by_conn: BpfHashMap<MapData, u64, OrigDst>,
    live: Arc<LiveCounts>,
    workloads: BpfHashMap<MapData, u64, WorkloadValue>,
    inbound: SockHash<MapData, InboundKey>,
    counters: PerCpuArray<MapData, u64>,
    /// Each bounded map's size as the kernel has it (a map a previous agent pinned keeps the
    /// size it was made with, whatever this agent's flags say).
    capacity: HashMap<&'static str, u32>,
}

/// The maps whose fill is reported.
pub const BOUNDED_MAPS: [&str; 5] = [
    mesh_common::WORKLOADS,
    mesh_common::ORIG_DST,
    mesh_common::ORIG_DST_BY_PORT,
    mesh_common::ORIG_DST_BY_CONN,
    mesh_common::INBOUND_LISTENERS,
];

fn open(maps_dir: &Path, name: &'static str) -> Result<MapData, EbpfError> {
    MapData::from_pin(maps_dir.join(name)).map_err(|source| EbpfError::Map { name, source })
}

fn typed<T: TryFrom<Map, Error = aya::maps::MapError>>(name: &'static str, m: Map) -> Result<T, EbpfError> {
    T::try_from(m).map_err(|source| EbpfError::Map { name, source })
}

impl Census {
    pub fn open(maps_dir: &Path, live: Arc<LiveCounts>) -> Result<Census, EbpfError> {
        use mesh_common::{COUNTERS, INBOUND_LISTENERS, ORIG_DST, ORIG_DST_BY_CONN, ORIG_DST_BY_PORT, WORKLOADS};
        let mut capacity = HashMap::new();
        for name in BOUNDED_MAPS {
            let info = open(maps_dir, name)?.info().map_err(|source| EbpfError::Map { name, source })?;
            capacity.insert(name, info.max_entries());
        }
        Ok(Census {
            orig_dst: typed(ORIG_DST, Map::HashMap(open(maps_dir, ORIG_DST)?))?,
            orig_by_port: typed(ORIG_DST_BY_PORT, Map::HashMap(open(maps_dir, ORIG_DST_BY_PORT)?))?,
            orig_by_conn: typed(ORIG_DST_BY_CONN, Map::HashMap(open(maps_dir, ORIG_DST_BY_CONN)?))?,
            live,
            workloads: typed(WORKLOADS, Map::HashMap(open(maps_dir, WORKLOADS)?))?,
            inbound: typed(INBOUND_LISTENERS, Map::SockHash(open(maps_dir, INBOUND_LISTENERS)?))?,
            counters: typed(COUNTERS, Map::PerCpuArray(open(maps_dir, COUNTERS)?))?,
            capacity,
        })
    }

    /// The kernel programs' counters into the metrics (cheap: one lookup per counter).
    pub fn read_counters(&self, metrics: &Metrics) {
        for c in Counter::ALL {
            let v = self.counters.get(&(c as u32), 0).map(|vals| vals.iter().sum()).unwrap_or(0);
            metrics.set_kernel_counter(c.name(), v);
        }
    }

    /// One pass: counts every map into the metrics and deletes port-keyed entries whose client
    /// socket was released more than [`mesh_common::RELEASED_ENTRY_TTL_NS`] ago without the
    /// agent consuming them (connections refused while no agent ran, say). Returns how many
    /// it collected.
    pub fn pass(&mut self, metrics: &Metrics) -> usize {
        self.read_counters(metrics);
        let now = sys::monotonic_ns();
        let mut by_port = 0;
        let mut stale = Vec::new();
        for (k, v) in self.orig_by_port.iter().filter_map(|r| r.ok()) {
            by_port += 1;
            if v.released_ns != 0 && now.saturating_sub(v.released_ns) > mesh_common::RELEASED_ENTRY_TTL_NS {
                stale.push(k);
            }
        }
        for k in &stale {
            let _ = self.orig_by_port.remove(k);
        }
        let fills = [
            (mesh_common::ORIG_DST_BY_PORT, by_port - stale.len()),
            (mesh_common::ORIG_DST_BY_CONN, self.orig_by_conn.keys().count()),
            (mesh_common::ORIG_DST, self.orig_dst.keys().count()),
            (mesh_common::WORKLOADS, self.workloads.keys().count()),
            (mesh_common::INBOUND_LISTENERS, self.inbound.keys().count()),
        ];
        for (map, n) in fills {
            metrics.set_map(map, n, self.capacity.get(map).copied().unwrap_or(0));
        }
        stale.len()
    }
}

/// What a reconciliation found, per workload id: the cookies of the TCP sockets alive in its
/// network namespace (`None`: they could not be listed, so its entries are left alone).
/// Workload ids missing here are not registered.
pub type LiveSockets = HashMap<u32, Option<HashSet<u64>>>;

impl Census {
    /// Removes original destinations whose socket is gone: missing from its workload's netns
    /// (or belonging to no registered workload) in this dump and in the previous one
    /// (`suspects`, updated). A socket's entry normally goes with the socket (sock_release, or
    /// sock_ops when it closes); this catches whatever else could leave one behind, and is
    /// what makes a restarted agent's map clean. Two dumps apart, because a socket's entry is
    /// made by connect4 just before the socket appears in the dump (and a workload's before it
    /// appears in the agent's state). Returns how many were removed.
    pub fn reconcile(&mut self, live: &LiveSockets, suspects: &mut HashSet<u64>) -> usize {
        let mut gone = Vec::new();
        let mut still_suspect = HashSet::new();
        for (cookie, orig) in self.orig_dst.iter().filter_map(|r| r.ok()) {
            let alive = match live.get(&orig.workload_id) {
                Some(None) => continue,
                Some(Some(sockets)) => sockets.contains(&cookie),
                None => false,
            };
            if alive {
                continue;
            }
            if suspects.contains(&cookie) {
                gone.push(cookie);
            } else {
                still_suspect.insert(cookie);
            }
        }
        *suspects = still_suspect;
        let mut removed = 0;
        let fd = self.orig_dst.map().fd().as_fd();
        for cookie in gone {
            // Deleting the entry is what entitles us to count it off (the kernel's hooks count
            // off only the entries they delete themselves), in the slot of the entry deleted.
            if let Ok(Some(orig)) = sys::lookup_and_delete::<u64, OrigDst>(fd, &cookie) {
                removed += 1;
                self.live.count_off(orig.workload_id);
            }
        }
        removed
    }
}
