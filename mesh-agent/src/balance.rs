//! Choosing a Service endpoint: the power of two choices over the connections this agent
//! carries to each endpoint now. Two ready endpoints drawn at random, the less loaded one wins:
//! it needs no shared state beyond a counter per endpoint, spreads load about as well as
//! least-connections, and unlike round robin does not pile new connections onto an endpoint
//! whose connections last longer.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::sync::Mutex;

use mesh_model::Endpoint;

const SHARDS: usize = 16;

/// An endpoint as its load is counted: its address, and the gateway it is reached through when
/// it is in another zone (two zones may number their pods alike: their endpoints at one address
/// are two endpoints).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LoadKey {
    ip: IpAddr,
    via: Option<SocketAddr>,
}

impl LoadKey {
    pub fn of(e: &Endpoint) -> LoadKey {
        LoadKey { ip: e.address, via: e.remote.as_ref().map(|r| r.gateway) }
    }
}

/// Connections this agent carries to each endpoint now.
#[derive(Default)]
pub struct Loads {
    shards: [Mutex<HashMap<LoadKey, Arc<AtomicU32>>>; SHARDS],
}

/// One connection's share of its endpoint's load, released when dropped.
pub struct InFlight(Arc<AtomicU32>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Loads {
    fn shard(&self, key: &LoadKey) -> std::sync::MutexGuard<'_, HashMap<LoadKey, Arc<AtomicU32>>> {
        let h = match key.ip {
            IpAddr::V4(a) => u32::from(a) as usize,
            IpAddr::V6(a) => u128::from(a) as usize,
        };
        self.shards[h % SHARDS].lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, key: &LoadKey) -> u32 {
        self.shard(key).get(key).map(|c| c.load(Ordering::Relaxed)).unwrap_or(0)
    }

    pub fn start(&self, key: LoadKey) -> InFlight {
        // Counted under the shard's lock, so that `retain` cannot forget the counter between
        // its creation and its first count.
        let mut shard = self.shard(&key);
        let c = shard.entry(key).or_default();
        c.fetch_add(1, Ordering::Relaxed);
        InFlight(c.clone())
    }

    /// Forgets idle endpoints that `keep` no longer names (the counters are bounded by the
    /// endpoints of the mesh's Services).
    pub fn retain(&self, keep: impl Fn(&LoadKey) -> bool) {
        for s in &self.shards {
            s.lock().unwrap_or_else(|e| e.into_inner()).retain(|k, c| keep(k) || c.load(Ordering::Relaxed) > 0);
        }
    }
}

/// The power of two choices among the ready endpoints not yet tried, preferring those of the
/// client's address family. `rand(n)` is a uniform index below n. Tried endpoints are told
/// apart whole, not by address: an imported Service's endpoints in two zones may share one.
pub fn pick<'a>(
    endpoints: &'a [Endpoint],
    tried: &[&Endpoint],
    v4: bool,
    load: impl Fn(&Endpoint) -> u32,
    mut rand: impl FnMut(usize) -> usize,
) -> Option<&'a Endpoint> {
    let usable = |e: &&Endpoint| e.ready && !tried.contains(e);
    let mut c: Vec<&Endpoint> = endpoints.iter().filter(usable).filter(|e| e.address.is_ipv4() == v4).collect();
    if c.is_empty() {
        c = endpoints.iter().filter(usable).collect();
    }
    match c.len() {
        0 => None,
        1 => Some(c[0]),
        n => {
            let i = rand(n);
            let j = (i + 1 + rand(n - 1)) % n;
            Some(if load(c[j]) < load(c[i]) { c[j] } else { c[i] })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(a: &str, ready: bool) -> Endpoint {
        Endpoint { address: a.parse().unwrap(), workload: None, ready, remote: None }
    }

    #[test]
    fn two_choices_prefer_the_less_loaded_and_skip_unready_and_tried() {
        let eps = [ep("10.0.0.1", true), ep("10.0.0.2", true), ep("10.0.0.3", false), ep("fd00::4", true)];
        let load = |e: &Endpoint| if e.address == "10.0.0.1".parse::<IpAddr>().unwrap() { 5 } else { 1 };
        // Whichever two are drawn, the less loaded of them wins; the not-ready one never.
        for seed in 0..20 {
            let mut r = fastrand::Rng::with_seed(seed);
            let got = pick(&eps, &[], true, load, |n| r.usize(..n)).unwrap();
            assert_eq!(got.address.to_string(), "10.0.0.2");
        }
        assert_eq!(pick(&eps, &[&eps[1]], true, load, |_| 0).unwrap().address.to_string(), "10.0.0.1");
        // The client's family first; the other family only when none is left.
        assert_eq!(pick(&eps, &[], false, load, |_| 0).unwrap().address.to_string(), "fd00::4");
        assert_eq!(pick(&eps, &[&eps[0], &eps[1]], true, load, |_| 0).unwrap().address.to_string(), "fd00::4");
        assert!(
            pick(&eps, &[&eps[0], &eps[1], &eps[3]], true, load, |_| 0).is_none(),
            "not-ready endpoints are never picked"
        );
        assert!(pick(&[], &[], true, load, |_| 0).is_none());
    }

    /// Two zones number their pods alike: the endpoint in the other zone failing does not rule
    /// out this zone's endpoint at the same address.
    #[test]
    fn endpoints_of_two_zones_at_one_address_are_tried_apart() {
        let remote = mesh_model::service::RemoteEndpoint {
            zone: "west".into(),
            identity: "spiffe://cluster.local/ns/default/sa/web".into(),
            gateway: "192.0.2.2:15008".parse().unwrap(),
            gateway_identity: "spiffe://cluster.local/ns/sockmesh-system/sa/sockmesh-gateway".into(),
        };
        let eps = [ep("10.20.2.10", true), Endpoint { remote: Some(remote), ..ep("10.20.2.10", true) }];
        let got = pick(&eps, &[&eps[1]], true, |_| 0, |_| 0).expect("the local endpoint is left");
        assert!(got.remote.is_none());
        assert!(pick(&eps, &[&eps[1], &eps[0]], true, |_| 0, |_| 0).is_none());
        // And their loads are counted apart: connections to the other zone's do not make this
        // zone's look busy.
        let loads = Loads::default();
        let _busy = [loads.start(LoadKey::of(&eps[1])), loads.start(LoadKey::of(&eps[1]))];
        assert_eq!((loads.get(&LoadKey::of(&eps[0])), loads.get(&LoadKey::of(&eps[1]))), (0, 2));
        let load = |e: &Endpoint| loads.get(&LoadKey::of(e));
        for seed in 0..10 {
            let mut r = fastrand::Rng::with_seed(seed);
            assert!(pick(&eps, &[], true, load, |n| r.usize(..n)).unwrap().remote.is_none());
        }
    }

    #[test]
    fn equal_loads_spread_over_every_endpoint() {
        let eps: Vec<Endpoint> = (1..=3).map(|i| ep(&format!("10.0.0.{i}"), true)).collect();
        let mut seen = HashMap::new();
        for _ in 0..300 {
            let e = pick(&eps, &[], true, |_| 0, |n| fastrand::usize(..n)).unwrap();
            *seen.entry(e.address).or_insert(0) += 1;
        }
        assert_eq!(seen.len(), 3, "{seen:?}");
        assert!(seen.values().all(|&n| n > 30), "{seen:?}");
    }

    #[test]
    fn in_flight_counts_rise_and_fall_and_idle_endpoints_are_forgotten() {
        let loads = Loads::default();
        let ip = LoadKey::of(&ep("10.0.0.1", true));
        let a = loads.start(ip);
        let b = loads.start(ip);
        assert_eq!(loads.get(&ip), 2);
        drop(a);
        loads.retain(|_| false);
        assert_eq!(loads.get(&ip), 1, "a busy endpoint is kept");
        drop(b);
        loads.retain(|_| false);
        assert_eq!(loads.get(&ip), 0);
        assert!(loads.shard(&ip).is_empty());
    }
}
