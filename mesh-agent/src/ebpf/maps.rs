//! The maps as the rest of the agent uses them after load, each through its own handle so
//! that nothing on the connection path shares a lock with a map walk:
//!
//! - [`OrigDstTable`]: the connection path's one map operation, taking the original
//!   destination of an accepted socket (a lookup-and-delete on its own descriptor, no lock).
//! - [`Census`]: everything that walks maps, off the connection path on a blocking thread:
//!   entries per map (the fill metrics), the kernel programs' counters, and the collection of
//!   released entries the agent never consumed.

use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use aya::maps::{HashMap as BpfHashMap, Map, MapData, PerCpuArray, SockHash};
use mesh_common::{Counter, InboundKey, OrigDst, PortKey, WorkloadValue};

use super::{sys, EbpfError};
use crate::metrics::Metrics;

/// Takes original destinations from `SM_ORIG_BY_PORT`.
pub struct OrigDstTable {
    fd: OwnedFd,
}

impl OrigDstTable {
    pub fn open(maps_dir: &Path) -> Result<OrigDstTable, EbpfError> {
        let path = maps_dir.join(mesh_common::ORIG_DST_BY_PORT);
        let fd = sys::obj_get(&path).map_err(|source| EbpfError::Adopt { path, source })?;
        Ok(OrigDstTable { fd })
    }

    /// The original destination of the connection the agent accepted on a workload's outbound
    /// listener: (netns cookie of the listener, client family, client port). Consumed.
    pub fn take(&self, key: &PortKey) -> Option<OrigDst> {
        match sys::lookup_and_delete::<PortKey, OrigDst>(self.fd.as_fd(), key) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "reading the original-destination map failed");
                None
            }
        }
    }
}

/// Walks the maps: fill, counters, and collection of released entries.
pub struct Census {
    orig_dst: BpfHashMap<MapData, u64, OrigDst>,
    orig_by_port: BpfHashMap<MapData, PortKey, OrigDst>,
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
            mesh_common::ORIG_DST_BY_PORT => mesh_common::orig_dst_by_port_size(self.max_connections),
            _ => self.max_workloads,
        }
    }
}

/// The maps whose fill is reported.
pub const BOUNDED_MAPS: [&str; 4] =
    [mesh_common::WORKLOADS, mesh_common::ORIG_DST, mesh_common::ORIG_DST_BY_PORT, mesh_common::INBOUND_LISTENERS];

fn open(maps_dir: &Path, name: &'static str) -> Result<MapData, EbpfError> {
    MapData::from_pin(maps_dir.join(name)).map_err(|source| EbpfError::Map { name, source })
}

fn typed<T: TryFrom<Map, Error = aya::maps::MapError>>(name: &'static str, m: Map) -> Result<T, EbpfError> {
    T::try_from(m).map_err(|source| EbpfError::Map { name, source })
}

impl Census {
    pub fn open(maps_dir: &Path, capacity: Capacity) -> Result<Census, EbpfError> {
        use mesh_common::{COUNTERS, INBOUND_LISTENERS, ORIG_DST, ORIG_DST_BY_PORT, WORKLOADS};
        Ok(Census {
            orig_dst: typed(ORIG_DST, Map::HashMap(open(maps_dir, ORIG_DST)?))?,
            orig_by_port: typed(ORIG_DST_BY_PORT, Map::HashMap(open(maps_dir, ORIG_DST_BY_PORT)?))?,
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
