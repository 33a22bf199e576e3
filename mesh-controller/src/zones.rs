//! Zones: one mesh across several clusters. Each zone has its own controller and configuration
//! source; they share one root, each zone signing with an intermediate of its own, so every
//! agent verifies every zone's workloads against the one root it already has.
//!
//! A zone offers Services to the others by marking them exported (`export: true` in the
//! configuration directory, the label `sockmesh.io/export: "true"` on Kubernetes). Each
//! controller serves its exports (`ZoneService.Exports`: the Services, their endpoints' addresses
//! and identities, its gateway) to the controllers of the zones it is told of, which prove their
//! zone with their certificate (`spiffe://<td>/zone/<zone>`, signed under the shared root), and
//! follows theirs the same way. What it learns becomes, in its own model, one imported Service
//! per exported name: an address of this zone's (from `--import-cidr`), the Service's ports, and
//! the endpoints of every zone that exports it — this zone's own as they are, the others' marked
//! with their zone, identity and gateway. Agents then carry a connection to a remote endpoint
//! through its zone's gateway (HBONE inside HBONE).
//!
//! A zone that stops answering keeps its last exports (its gateway may still work); a zone that
//! says a Service is gone takes it out at once.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_api::push::zone_service_client::ZoneServiceClient;
use mesh_api::push::zone_service_server::ZoneService;
use mesh_api::push::{ExportsRequest, ZoneExports};
use mesh_identity::SpiffeId;
use mesh_model::service::{Endpoint, Exported, ExportedEndpoint, RemoteEndpoint};
use mesh_model::{Service, WorkloadKey};
use tokio::sync::watch;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::model::Model;

/// How often an exporting zone says it is still there when nothing changed.
pub const KEEPALIVE: Duration = Duration::from_secs(5);

/// An IPv4 range the imported Services' addresses come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    base: u32,
    len: u8,
}

impl std::str::FromStr for Range {
    type Err = String;
    fn from_str(s: &str) -> Result<Range, String> {
        let err = || format!("{s:?}: expected an IPv4 range such as 10.255.0.0/16 (at most /30)");
        let (a, l) = s.split_once('/').ok_or_else(err)?;
        let a: Ipv4Addr = a.parse().map_err(|_| err())?;
        let len: u8 = l.parse().map_err(|_| err())?;
        if !(8..=30).contains(&len) {
            return Err(err());
        }
        let base = u32::from(a) & (u32::MAX << (32 - len));
        Ok(Range { base, len })
    }
}

impl Range {
    /// The usable addresses (no network or broadcast address).
    fn size(&self) -> u32 {
        (1u32 << (32 - self.len)) - 2
    }
    fn nth(&self, i: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(self.base + 1 + i))
    }
}

/// The controller's port for the other zones' controllers (`--zone-listen`).
pub const ZONE_PORT: u16 = 15013;

/// What this controller knows of zones.
#[derive(Debug, Clone)]
pub struct Settings {
    pub zone: String,
    pub trust_domain: String,
    /// Where the other zones reach this zone's gateway, and the identity it proves.
    pub gateway: Option<SocketAddr>,
    pub gateway_identity: SpiffeId,
    /// The zones to follow: name and controller URL.
    pub peers: Vec<(String, String)>,
    pub import_range: Option<Range>,
}

impl Settings {
    /// The DNS name a zone's controller's certificate carries for its zone, which the other
    /// zones' controllers require of it.
    pub fn server_name(zone: &str) -> String {
        format!("{zone}.zone.sockmesh.invalid")
    }

    /// The SPIFFE ID a zone's controller proves.
    pub fn zone_id(trust_domain: &str, zone: &str) -> Result<SpiffeId, String> {
        if !mesh_model::workload::is_dns_label(zone) {
            return Err(format!("zone {zone:?}: a zone's name is a DNS label (lowercase letters, digits, '-')"));
        }
        SpiffeId::parse(&format!("spiffe://{trust_domain}/zone/{zone}")).map_err(|e| format!("zone {zone:?}: {e}"))
    }
}

/// What a zone last said: its gateway and its exports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remote {
    pub gateway: SocketAddr,
    pub gateway_identity: String,
    pub services: Vec<Exported>,
}

/// Every followed zone's last word, by zone.
pub type Remotes = BTreeMap<String, Remote>;

/// This zone's exported Services: their endpoints that are workloads of the default mesh, each
/// with its identity. Endpoints outside the mesh are not offered: the gateway forwards only to
/// an agent's mutual TLS.
pub fn exports_of(m: &Model, trust_domain: &str) -> Vec<Exported> {
    let mut out = Vec::new();
    for s in m.services.values().filter(|s| s.export && !s.imported) {
        let mut endpoints = Vec::new();
        for ep in &s.endpoints {
            let Some(name) = &ep.workload else { continue };
            let key = WorkloadKey { namespace: s.namespace.clone(), name: name.clone() };
            let Some(w) = m.workloads.get(&key).filter(|w| w.mesh.is_none() && w.ips.contains(&ep.address)) else {
                continue;
            };
            let Ok(id) = SpiffeId::workload(trust_domain, &w.namespace, &w.service_account) else { continue };
            endpoints.push(ExportedEndpoint { address: ep.address, identity: id.to_string(), ready: ep.ready });
        }
        endpoints.sort();
        out.push(Exported { namespace: s.namespace.clone(), name: s.name.clone(), ports: s.ports.clone(), endpoints });
    }
    out
}

/// The key an imported Service has in the model (and in the push): it cannot be a Service's own
/// name, which has no dots, so it never takes the place of this zone's Service of that name.
fn import_key(ns: &str, name: &str) -> (String, String) {
    (ns.to_owned(), format!("{name}.clusterset"))
}

/// Adds the imported Services to `m` (built from this zone's source): one per name some other
/// zone exports, with an address from the import range, its ports, and the endpoints of every
/// zone exporting it whose ports agree (this zone's own first, as they are). What cannot be
/// imported is reported in `m.errors`.
pub fn merge(m: &mut Model, s: &Settings, remotes: &Remotes) {
    let Some(range) = s.import_range else { return };
    let mut names: BTreeSet<(String, String)> = BTreeSet::new();
    for r in remotes.values() {
        names.extend(r.services.iter().map(|e| (e.namespace.clone(), e.name.clone())));
    }
    // Addresses already in use in this zone: every workload's and Service's.
    let mut taken: HashSet<IpAddr> = m.workloads.values().flat_map(|w| w.ips.iter().copied()).collect();
    taken.extend(m.services.values().flat_map(|s| s.addresses.iter().copied()));
    for (ns, name) in names {
        let local = m.services.get(&(ns.clone(), name.clone())).filter(|l| l.export).cloned();
        let mut ports = local.as_ref().map(|l| l.ports.clone());
        let mut endpoints: Vec<Endpoint> =
            local.map(|l| l.endpoints.into_iter().filter(|e| e.remote.is_none()).collect()).unwrap_or_default();
        for (zone, r) in remotes {
            let Some(e) = r.services.iter().find(|e| e.namespace == ns && e.name == name) else { continue };
            match &ports {
                None => ports = Some(e.ports.clone()),
                Some(p) if *p != e.ports => {
                    m.errors.push(format!(
                        "zone {zone} exports Service {ns}/{name} with other ports than the first zone exporting it; its endpoints are left out of the import (give it the same ports in every zone)"
                    ));
                    continue;
                }
                Some(_) => {}
            }
            endpoints.extend(e.endpoints.iter().map(|ep| Endpoint {
                address: ep.address,
                workload: None,
                ready: ep.ready,
                remote: Some(RemoteEndpoint {
                    zone: zone.clone(),
                    identity: ep.identity.clone(),
                    gateway: r.gateway,
                    gateway_identity: r.gateway_identity.clone(),
                }),
            }));
        }
        let Some(ports) = ports else { continue };
        // What another zone said is checked as any record is: one bad export must not make
        // every agent here refuse the whole push.
        let ours = |id: &str| SpiffeId::parse_workload(id).is_ok_and(|i| i.trust_domain() == s.trust_domain);
        let bad_identity = endpoints
            .iter()
            .filter_map(|e| e.remote.as_ref())
            .find(|r| !ours(&r.identity) || !ours(&r.gateway_identity))
            .map(|r| r.zone.clone());
        if let Some(zone) = bad_identity {
            m.errors.push(format!(
                "Service {ns}/{name} exported by zone {zone} is not imported: an identity it names is not a workload of trust domain {}",
                s.trust_domain
            ));
            continue;
        }
        let Some(addr) = allocate(range, &ns, &name, &taken) else {
            m.errors.push(format!(
                "Service {ns}/{name} exported by another zone is not imported: --import-cidr has no free address left"
            ));
            continue;
        };
        taken.insert(addr);
        let svc = Service {
            name: name.clone(),
            namespace: ns.clone(),
            addresses: vec![addr],
            ports,
            selector: None,
            endpoints,
            export: false,
            imported: true,
        };
        if let Err(e) = svc.validate() {
            m.errors.push(format!("Service {ns}/{name} exported by another zone is not imported: {e}"));
            continue;
        }
        m.services.insert(import_key(&ns, &name), svc);
    }
}

/// The address an imported Service gets: a hash of its name picks a place in the range, and
/// the first free address from there is its (so a Service keeps its address while the others
/// come and go, but for two whose hashes meet).
fn allocate(range: Range, ns: &str, name: &str, taken: &HashSet<IpAddr>) -> Option<IpAddr> {
    // FNV-1a: the same in every process and release.
    let mut h: u32 = 0x811c_9dc5;
    for b in ns.bytes().chain(std::iter::once(b'/')).chain(name.bytes()) {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    let size = range.size();
    (0..size).map(|i| range.nth((h % size + i) % size)).find(|a| !taken.contains(a))
}

/// The sync's state, for the metrics.
#[derive(Default)]
pub struct Stats {
    zones: Mutex<BTreeMap<String, ZoneStat>>,
}

#[derive(Default, Clone)]
struct ZoneStat {
    connected: bool,
    /// From the exporting zone accepting a change to this zone having it, the last change.
    lag_seconds: f64,
    services: usize,
}

impl Stats {
    fn update(&self, zone: &str, f: impl FnOnce(&mut ZoneStat)) {
        f(self.zones.lock().unwrap().entry(zone.to_owned()).or_default())
    }

    /// OpenMetrics text: sockmesh_zone_connected{zone}, sockmesh_zone_sync_lag_seconds{zone},
    /// sockmesh_zone_imported_services{zone}.
    pub fn encode(&self) -> String {
        use prometheus_client::metrics::family::Family;
        use prometheus_client::metrics::gauge::Gauge;
        use std::sync::atomic::AtomicU64;
        let connected: Family<Vec<(String, String)>, Gauge> = Family::default();
        let lag: Family<Vec<(String, String)>, Gauge<f64, AtomicU64>> = Family::default();
        let services: Family<Vec<(String, String)>, Gauge> = Family::default();
        for (zone, s) in self.zones.lock().unwrap().iter() {
            let l = vec![("zone".to_owned(), zone.clone())];
            connected.get_or_create(&l).set(i64::from(s.connected));
            lag.get_or_create(&l).set(s.lag_seconds);
            services.get_or_create(&l).set(s.services as i64);
        }
        let mut r = prometheus_client::registry::Registry::with_prefix("sockmesh_zone");
        r.register("connected", "Whether this controller follows the zone's exports now (1) or not (0)", connected);
        r.register(
            "sync_lag_seconds",
            "From the zone's controller accepting its last change to this controller having it",
            lag,
        );
        r.register("imported_services", "Services the zone exports, as last received", services);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &r).expect("writing to a String");
        out
    }
}

/// The server side: this zone's exports, to the zones' controllers this one follows.
pub struct ZoneSync {
    pub settings: Arc<Settings>,
    pub model: watch::Receiver<Arc<Model>>,
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

impl ZoneSync {
    /// The zone the caller's certificate proves, if it is one this controller syncs with. Its
    /// chain was verified against the shared root by the TLS layer.
    fn caller(&self, req: &Request<ExportsRequest>) -> Result<String, Status> {
        let certs = req.peer_certs().ok_or_else(|| {
            Status::unauthenticated("a zone's controller certificate is required (TLS client certificate)")
        })?;
        let leaf = certs.first().ok_or_else(|| Status::unauthenticated("no client certificate"))?;
        let id = mesh_identity::verify::any_spiffe_id_of(leaf)
            .map_err(|e| Status::unauthenticated(format!("client certificate: {e}")))?;
        for (zone, _) in &self.settings.peers {
            if Settings::zone_id(&self.settings.trust_domain, zone).is_ok_and(|z| z == id) {
                return Ok(zone.clone());
            }
        }
        Err(Status::permission_denied(format!("{id} is not a zone this controller syncs with (--zone-peer)")))
    }

    fn message(&self, m: &Model) -> ZoneExports {
        let s = &self.settings;
        ZoneExports {
            zone: s.zone.clone(),
            gateway: s.gateway.map(|g| g.to_string()).unwrap_or_default(),
            gateway_identity: s.gateway_identity.to_string(),
            services_json: serde_json::to_string(&exports_of(m, &s.trust_domain)).expect("plain data"),
            accepted_at_ms: m.accepted_at_ms,
        }
    }
}

#[tonic::async_trait]
impl ZoneService for ZoneSync {
    type ExportsStream = ReceiverStream<Result<ZoneExports, Status>>;

    async fn exports(&self, req: Request<ExportsRequest>) -> Result<Response<Self::ExportsStream>, Status> {
        let zone = self.caller(&req)?;
        if self.settings.gateway.is_none() {
            return Err(Status::failed_precondition(
                "this zone has no gateway (--zone-gateway): its Services cannot be reached from other zones",
            ));
        }
        tracing::info!(%zone, "a zone follows this zone's exports");
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mut model = self.model.clone();
        let this = ZoneSync { settings: self.settings.clone(), model: self.model.clone() };
        tokio::spawn(async move {
            loop {
                // After every change of the model, and as a keep-alive when nothing changed (the
                // follower keeps what it has when the exports are the same).
                let msg = this.message(&model.borrow_and_update());
                if tx.send(Ok(msg)).await.is_err() {
                    return;
                }
                tokio::select! {
                    r = model.changed() => if r.is_err() { return },
                    _ = tokio::time::sleep(KEEPALIVE) => {}
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// The client side: follows one zone's exports for ever, reconnecting with backoff; publishes
/// what it says into `remotes`.
pub async fn follow(
    zone: String,
    channel: tonic::transport::Channel,
    remotes: watch::Sender<Remotes>,
    stats: Arc<Stats>,
) {
    let mut backoff = Duration::from_millis(250);
    loop {
        let r = follow_once(&zone, channel.clone(), &remotes, &stats, &mut backoff).await;
        stats.update(&zone, |s| s.connected = false);
        match r {
            Ok(()) => tracing::warn!(%zone, "the zone ended its exports stream; reconnecting"),
            Err(e) => {
                tracing::warn!(%zone, error = %e, retry_in_ms = backoff.as_millis() as u64, "cannot follow the zone's exports; keeping what it said last")
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn follow_once(
    zone: &str,
    channel: tonic::transport::Channel,
    remotes: &watch::Sender<Remotes>,
    stats: &Stats,
    backoff: &mut Duration,
) -> Result<(), String> {
    let mut client = ZoneServiceClient::new(channel);
    let call = tokio::time::timeout(KEEPALIVE * 3, client.exports(ExportsRequest {}));
    let mut s = call.await.map_err(|_| "no answer from the zone".to_owned())?.map_err(|e| e.to_string())?.into_inner();
    // No message for three keep-alives: the zone is gone (its stream may never end by itself).
    while let Some(msg) = tokio::time::timeout(KEEPALIVE * 3, s.message())
        .await
        .map_err(|_| "no word from the zone for three keep-alives".to_owned())?
        .map_err(|e| e.to_string())?
    {
        *backoff = Duration::from_millis(250);
        if msg.zone != zone {
            return Err(format!("the controller answering says it is zone {:?}, not {zone:?}", msg.zone));
        }
        let gateway: SocketAddr =
            msg.gateway.parse().map_err(|_| format!("the zone's gateway {:?} is not address:port", msg.gateway))?;
        SpiffeId::parse_workload(&msg.gateway_identity)
            .map_err(|e| format!("the zone's gateway identity {:?}: {e}", msg.gateway_identity))?;
        let services: Vec<Exported> =
            serde_json::from_str(&msg.services_json).map_err(|e| format!("the zone's exports cannot be read: {e}"))?;
        for e in &services {
            for ep in &e.endpoints {
                SpiffeId::parse_workload(&ep.identity)
                    .map_err(|err| format!("{}/{}: endpoint identity {:?}: {err}", e.namespace, e.name, ep.identity))?;
            }
        }
        let remote = Remote { gateway, gateway_identity: msg.gateway_identity, services };
        let n = remote.services.len();
        let changed = remotes.send_if_modified(|all| {
            if all.get(zone) == Some(&remote) {
                return false;
            }
            all.insert(zone.to_owned(), remote);
            true
        });
        stats.update(zone, |s| {
            s.connected = true;
            s.services = n;
            if changed {
                s.lag_seconds = ((now_ms() - msg.accepted_at_ms).max(0) as f64) / 1000.0;
            }
        });
        if changed {
            tracing::info!(%zone, services = n, "zone exports updated");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
