//! The maps as the rest of the agent uses them after load, each through its own handle so
//! that nothing on the connection path shares a lock with a map walk:
//!
//! - [`OrigDstTable`]: the connection path's one map operation, taking the original
//!   destination of an accepted socket (a lookup-and-delete on its own descriptor, no lock).
//! - [`Census`]: everything that walks maps, off the connection path on a blocking thread:
//!   entries per map (the fill metrics), the kernel programs' counters, the collection of
//!   released entries the agent never consumed, and of entries whose socket is gone.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use aya::maps::{HashMap as BpfHashMap, Map, MapData, PerCpuArray, SockHash};
use mesh_common::{Counter, InboundKey, OrigDst, PortKey, WorkloadValue};

use super::{sys, EbpfError};
use crate::metrics::Metrics;

/// Takes original destinations from `SM_ORIG_BY_CONN` (by the accepted socket's cookie) and,
/// failing that, `SM_ORIG_BY_PORT`.
pub struct OrigDstTable {
    by_conn: OwnedFd,
    by_port: OwnedFd,
}

impl OrigDstTable {
    pub fn open(maps_dir: &Path) -> Result<OrigDstTable, EbpfError> {
        let open = |name: &str| {
            let path = maps_dir.join(name);
            sys::obj_get(&path).map_err(|source| EbpfError::Adopt { path, source })
        };
        Ok(OrigDstTable {
            by_conn: open(mesh_common::ORIG_DST_BY_CONN)?,
            by_port: open(mesh_common::ORIG_DST_BY_PORT)?,
        })
    }

    /// The original destination of the connection the agent accepted on a workload's outbound
    /// listener. Consumed. sock_ops has normally bound it to the accepted socket (`accepted`,
    /// its SO_COOKIE); where it could not, it is still under (netns cookie of the listener,
    /// client family, client port).
    pub fn take(&self, accepted: Option<u64>, key: &PortKey) -> Option<OrigDst> {
        let by_conn = accepted.and_then(|c| Self::taken(sys::lookup_and_delete(self.by_conn.as_fd(), &c)));
        by_conn.or_else(|| Self::taken(sys::lookup_and_delete(self.by_port.as_fd(), key)))
    }

    fn taken(r: std::io::Result<Option<OrigDst>>) -> Option<OrigDst> {
        r.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "reading the original-destination map failed");
            None
        })
    }
}

/// Walks the maps: fill, counters, and collection of released entries.
pub struct Census {
    orig_dst: BpfHashMap<MapData, u64, OrigDst>,
    orig_by_port: BpfHashMap<MapData, PortKey, OrigDst>,
    orig_by_conn: BpfHashMap<MapData, u64, OrigDst>,
    workload_conns: BpfHashMap<MapData, u32, u64>,
    workloads: BpfHashMap<MapData, u64, WorkloadValue>,
    inbound: SockHash<MapData, InboundKey>,
    counters: PerCpuArray<MapData, u64>,
    capacity: Capacity,
}

/// The maps' sizes as loaded.
#[derive(Debug, Clone, Copy)]
pub struct Capacity {
    pub max_connections: u32,
    pub max_workloads: u32,
}

impl Capacity {
    fn of(&self, map: &str) -> u32 {
        match map {
            mesh_common::ORIG_DST => self.max_connections,
            mesh_common::ORIG_DST_BY_PORT | mesh_common::ORIG_DST_BY_CONN => {
                mesh_common::orig_dst_by_port_size(self.max_connections)
            }
            _ => self.max_workloads,
        }
    }
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
    pub fn open(maps_dir: &Path, capacity: Capacity) -> Result<Census, EbpfError> {
        use mesh_common::{
            COUNTERS, INBOUND_LISTENERS, ORIG_DST, ORIG_DST_BY_CONN, ORIG_DST_BY_PORT, WORKLOADS, WORKLOAD_CONNS,
        };
        Ok(Census {
            orig_dst: typed(ORIG_DST, Map::HashMap(open(maps_dir, ORIG_DST)?))?,
            orig_by_port: typed(ORIG_DST_BY_PORT, Map::HashMap(open(maps_dir, ORIG_DST_BY_PORT)?))?,
            orig_by_conn: typed(ORIG_DST_BY_CONN, Map::HashMap(open(maps_dir, ORIG_DST_BY_CONN)?))?,
            workload_conns: typed(WORKLOAD_CONNS, Map::HashMap(open(maps_dir, WORKLOAD_CONNS)?))?,
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
            metrics.set_map(map, n, self.capacity.of(map));
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
                gone.push((cookie, orig.workload_id));
            } else {
                still_suspect.insert(cookie);
            }
        }
        *suspects = still_suspect;
        // Counts of workloads no longer registered, once nothing is left to count.
        let idle: Vec<u32> = self
            .workload_conns
            .iter()
            .filter_map(|r| r.ok())
            .filter(|(id, n)| *n == 0 && !live.contains_key(id))
            .map(|(id, _)| id)
            .collect();
        for id in idle {
            let _ = self.workload_conns.remove(&id);
        }
        let mut removed = 0;
        for (cookie, workload) in gone {
            if self.orig_dst.remove(&cookie).is_ok() {
                removed += 1;
                // The kernel counts with atomic adds; from here only a read and a write: a
                // connect racing this can be undercounted by one (a rare path: it runs only
                // for entries nothing else removed).
                if let Ok(n) = self.workload_conns.get(&workload, 0) {
                    let _ = self.workload_conns.insert(workload, n.saturating_sub(1), 0);
                }
            }
        }
        removed
    }
}
