//! Two zones (clusters) of one mesh, for the zone tests and the demo: each a fabric of its own
//! with its own controller (an intermediate CA under one shared root), the same node and pod
//! numbering in both (their pod networks overlap and never route to each other). The fabrics
//! meet only on an inter-zone link, 10.250.0.0/24: each zone's edge (its fabric netns)
//! masquerades what leaves through it and forwards its controller's port, as a cloud NAT and
//! load balancer would, and runs the zone's east-west gateway (`mesh-agent gateway`) on its
//! address there.
//!
//! ```text
//!  zone east: fabric (10.99.0.254, iz 10.250.0.1) ── iz link ── zone west: fabric (10.250.0.2)
//!    n1: client (10.20.1.10)                                       n1: client
//!    n2: web (10.20.2.10, app=web), hidden (10.20.2.11)            n2: web, hidden
//!    gw: the gateway's node (its credential, its workload record)  gw
//! ```

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::{
    bin, command_in, http_get, run, time_until, wait_for, Agent, Controller, NodeId, PodId, Server, Topology,
    CONTROLLER_IP,
};

/// The echo servers' port.
pub const APP_PORT: u16 = 8080;
/// Where each zone's addresses for imported Services come from.
pub const IMPORT_CIDR: &str = "10.255.0.0/24";
/// The gateways' identity.
pub const GATEWAY_ID: &str = "spiffe://cluster.local/ns/sockmesh-system/sa/sockmesh-gateway";
/// Each zone's pods, by index.
pub const CLIENT: PodId = PodId(0);
pub const WEB: PodId = PodId(1);
pub const HIDDEN: PodId = PodId(2);
/// A second client, on n1 beside the first.
pub const CLIENT2: PodId = PodId(3);

/// A gateway process, killed when dropped.
pub struct Gateway {
    child: Option<Child>,
    pub log: PathBuf,
}

impl Gateway {
    /// Starts `mesh-agent gateway` with `args` in the fabric netns `fabric` (in the
    /// controller's cgroup there), its log in `log`; does not wait for it.
    pub fn spawn(fabric: &str, cgroup: &Path, args: &[&str], log: PathBuf) -> Result<Gateway> {
        let child = command_in(fabric, cgroup, bin("mesh-agent"))?
            .args(["gateway", "--log-format", "json"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting mesh-agent gateway")?;
        Ok(Gateway { child: Some(child), log })
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log_lines(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill()
    }
}

/// One running zone. Fields drop in order: the processes before the topology that deletes
/// their namespaces and cgroups.
pub struct Zone {
    pub gateway: Option<Gateway>,
    /// n1's agent, then n2's.
    pub agents: Vec<Agent>,
    pub ctl: Controller,
    /// web's echo server, then hidden's.
    pub servers: Vec<Server>,
    pub name: String,
    pub n1: NodeId,
    /// This zone's address on the inter-zone link (its gateway's).
    pub edge: String,
    pub t: Topology,
}

fn ip(args: &[&str]) -> Result<()> {
    run(Command::new("ip").args(args)).map(|_| ())
}

fn nft(netns: &str, rules: &str) -> Result<()> {
    let mut c = Command::new("ip")
        .args(["netns", "exec", netns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .context("nft (Debian's nftables)")?;
    c.stdin.take().context("nft's stdin")?.write_all(rules.as_bytes())?;
    if !c.wait()?.success() {
        bail!("nft rules in {netns} refused");
    }
    Ok(())
}

/// The shared root and an intermediate per zone, with the controller's own `ca` commands.
fn make_cas(dir: &Path, zones: &[&str]) -> Result<()> {
    let root = dir.join("root");
    run(Command::new(bin("mesh-controller")).args(["ca", "init", "--out"]).arg(&root))?;
    for z in zones {
        run(Command::new(bin("mesh-controller"))
            .args(["ca", "intermediate", "--zone", z, "--root"])
            .arg(&root)
            .arg("--out")
            .arg(dir.join(z)))?;
    }
    Ok(())
}

fn topology(name: &str, edge: &str) -> Result<(Topology, NodeId, NodeId)> {
    let mut t = Topology::new(name)?;
    let n1 = t.add_node("n1")?;
    let n2 = t.add_node("n2")?;
    t.add_node("gw")?;
    t.add_pod(n1, "client", true)?;
    let web = t.add_pod(n2, "web", true)?;
    let hidden = t.add_pod(n2, "hidden", true)?;
    t.add_pod(n1, "client2", true)?;
    t.pods[web.0].labels.push(("app".into(), "web".into()));
    t.pods[hidden.0].labels.push(("app".into(), "hidden".into()));
    // Both servers, for a Service with two endpoints.
    for p in [web, hidden] {
        t.pods[p.0].labels.push(("tier".into(), "backend".into()));
    }
    t.write_workloads()?;
    // The gateway is a workload of its node: the zone's CA signs its identity for that node only.
    t.write_config(
        "gateway.yaml",
        &format!("kind: Workload\nname: sockmesh-gateway\nnamespace: sockmesh-system\nserviceAccount: sockmesh-gateway\nips: [{edge}]\nnode: gw\n"),
    )?;
    Ok((t, n1, n2))
}

/// Joins the two zones' edges with the inter-zone link: each edge masquerades what leaves
/// through it and forwards its controller's port; the nodes route the link's range to their
/// edge. Nothing routes one zone's pod or node addresses to the other.
fn link(east: &Topology, west: &Topology) -> Result<()> {
    ip(&["-n", &east.fabric, "link", "add", "iz", "type", "veth", "peer", "name", "iz", "netns", &west.fabric])?;
    for (t, addr) in [(east, "10.250.0.1/24"), (west, "10.250.0.2/24")] {
        ip(&["-n", &t.fabric, "addr", "add", addr, "dev", "iz"])?;
        ip(&["-n", &t.fabric, "link", "set", "iz", "up"])?;
        run(Command::new("ip").args(["netns", "exec", &t.fabric, "sysctl", "-qw", "net.ipv4.ip_forward=1"]))?;
        nft(
            &t.fabric,
            &format!(
                "table ip smt_zone {{\n chain post {{ type nat hook postrouting priority 100; oifname \"iz\" masquerade; }}\n chain pre {{ type nat hook prerouting priority -100; iifname \"iz\" tcp dport 15013 dnat to {CONTROLLER_IP}; }}\n}}\n"
            ),
        )?;
        for n in &t.nodes {
            ip(&["-n", &n.netns, "route", "add", "10.250.0.0/24", "via", &CONTROLLER_IP.to_string()])?;
        }
    }
    Ok(())
}

fn start_zone(
    t: Topology,
    n1: NodeId,
    n2: NodeId,
    me: &str,
    peer: (&str, &str),
    edge: &str,
    cas: &Path,
) -> Result<Zone> {
    let mut t = t;
    let ca = cas.join(me);
    let p = |f: &str| ca.join(f).to_string_lossy().into_owned();
    let (cert, key, chain) = (p("ca.pem"), p("ca-key.pem"), p("chain.pem"));
    let gateway = format!("{edge}:15008");
    let peer_arg = format!("{}=https://{}:15013", peer.0, peer.1);
    let ctl = t.start_controller(&[
        "--ca-cert",
        &cert,
        "--ca-key",
        &key,
        "--ca-chain",
        &chain,
        "--zone",
        me,
        "--zone-gateway",
        &gateway,
        "--zone-peer",
        &peer_arg,
        "--import-cidr",
        IMPORT_CIDR,
    ])?;
    let servers = vec![t.start_server(WEB, APP_PORT)?, t.start_server(HIDDEN, APP_PORT)?];
    let agents = vec![t.start_agent(n1, &[])?, t.start_agent(n2, &[])?];
    t.wait_ready(n1)?;
    t.wait_ready(n2)?;
    let mut z = Zone { gateway: None, agents, ctl, servers, name: me.to_owned(), n1, edge: edge.to_owned(), t };
    z.gateway = Some(z.start_gateway()?);
    Ok(z)
}

/// Zones `east` and `west`, each with its controller, agents, echo servers and gateway running.
pub fn two_zones(name: &str) -> Result<(Zone, Zone)> {
    let (east_t, e1, e2) = topology(&format!("{name}-e"), "10.250.0.1")?;
    let (west_t, w1, w2) = topology(&format!("{name}-w"), "10.250.0.2")?;
    link(&east_t, &west_t)?;
    make_cas(&east_t.dir, &["east", "west"])?;
    let cas = east_t.dir.clone();
    let east = start_zone(east_t, e1, e2, "east", ("west", "10.250.0.2"), "10.250.0.1", &cas)?;
    let west = start_zone(west_t, w1, w2, "west", ("east", "10.250.0.1"), "10.250.0.2", &cas)?;
    Ok((east, west))
}

/// A `kind: Service` document selecting `app`, port 80 to the echo port.
pub fn service(name: &str, app: &str, vip: &str, export: bool) -> String {
    format!("kind: Service\nname: {name}\nnamespace: default\naddresses: [{vip}]\nports: [{{port: 80, targetPort: {APP_PORT}}}]\nselector: {{app: {app}}}\nexport: {export}\n")
}

impl Zone {
    /// Starts the zone's gateway on its edge; returns once it has its certificate.
    pub fn start_gateway(&self) -> Result<Gateway> {
        let t = &self.t;
        let gw = t.nodes.iter().find(|n| n.name == "gw").context("the gateway's node")?;
        let (bundle, credential) = (t.trust_bundle(), gw.state_dir.join("credential"));
        let args = [
            "--listen",
            &format!("{}:15008", self.edge),
            "--controller",
            &format!("https://{CONTROLLER_IP}:15012"),
            "--trust-bundle",
            &bundle.to_string_lossy(),
            "--node-credential-file",
            &credential.to_string_lossy(),
            // Below the agents' connect timeout here (2 s).
            "--dial-timeout-ms",
            "1000",
        ];
        let g = Gateway::spawn(&t.fabric, &t.cgroup_root.join("controller"), &args, t.dir.join("gateway.log"))?;
        let ready = || Ok(http_get(&t.fabric, "127.0.0.1:15021", "/ready").is_ok_and(|r| r.0 == 200));
        if let Err(e) = wait_for(Duration::from_secs(30), ready) {
            bail!("gateway not ready: {e}: {}", std::fs::read_to_string(&g.log).unwrap_or_default());
        }
        Ok(g)
    }

    /// The address n1's agent has for the Service `name` imported from other zones, and how
    /// many endpoints it has.
    pub fn import(&self, name: &str) -> Option<(IpAddr, usize)> {
        let (_, body) = http_get(&self.t.node(self.n1).netns, "127.0.0.1:15000", "/services").ok()?;
        let all: Vec<mesh_api::admin::ServiceInfo> = serde_json::from_str(&body).ok()?;
        all.into_iter().find(|s| s.name == name && s.imported).map(|s| (s.addresses[0], s.endpoints.len()))
    }

    /// Waits until n1's agent has `name` imported with `endpoints` endpoints: its address, and
    /// how long that took.
    pub fn wait_import(&self, name: &str, endpoints: usize) -> Result<(IpAddr, Duration)> {
        let mut found = None;
        let took = time_until(Duration::from_secs(30), || {
            found = self.import(name).filter(|(_, n)| *n == endpoints);
            found.is_some()
        });
        match (took, found) {
            (Some(took), Some((addr, _))) => Ok((addr, took)),
            _ => {
                let said: Vec<Value> =
                    self.ctl.log_lines().into_iter().filter(|l| l.to_string().contains("zone")).collect();
                bail!(
                    "{name} was never imported with {endpoints} endpoints: {:?}; the controller said {said:?}",
                    self.import(name)
                )
            }
        }
    }

    /// Drops everything between this zone's edge and `peer_edge`, both ways: the other zone
    /// looks wholly gone, as when its network is cut off (no reset, no ICMP: a blackhole).
    pub fn cut_off(&self, peer_edge: &str) -> Result<()> {
        nft(
            &self.t.fabric,
            &format!(
                "table ip smt_cut {{\n chain cut_forward {{ type filter hook forward priority -10; ip daddr {peer_edge} drop; ip saddr {peer_edge} drop; }}\n chain cut_output {{ type filter hook output priority -10; ip daddr {peer_edge} drop; }}\n chain cut_input {{ type filter hook input priority -10; ip saddr {peer_edge} drop; }}\n}}\n"
            ),
        )
    }

    /// Undoes [`Zone::cut_off`].
    pub fn reconnect(&self) -> Result<()> {
        nft(&self.t.fabric, "delete table ip smt_cut\n")
    }

    /// `sm-testapp echoes` from this zone's client.
    pub fn echoes(&self, to: &str, count: u32, extra: &[&str]) -> Result<Value> {
        self.echoes_from(CLIENT, to, count, extra)
    }

    /// `sm-testapp echoes` from `pod`.
    pub fn echoes_from(&self, pod: PodId, to: &str, count: u32, extra: &[&str]) -> Result<Value> {
        let count = count.to_string();
        let mut args = vec!["echoes", "--to", to, "--count", &count, "--bytes", "2000", "--timeout-ms", "5000"];
        args.extend_from_slice(extra);
        self.t.pod_app(pod, &args)
    }

    /// Drops what `netns` sends to `addr` (and `port`, if given), in a table named `table`.
    pub fn drop_to(netns: &str, table: &str, addr: &str, port: Option<u16>) -> Result<()> {
        let port = port.map(|p| format!(" tcp dport {p}")).unwrap_or_default();
        nft(
            netns,
            &format!("table ip {table} {{\n chain cut_output {{ type filter hook output priority -10; ip daddr {addr}{port} drop; }}\n}}\n"),
        )
    }

    /// Undoes [`Zone::drop_to`].
    pub fn undrop(netns: &str, table: &str) -> Result<()> {
        nft(netns, &format!("delete table ip {table}\n"))
    }
}
