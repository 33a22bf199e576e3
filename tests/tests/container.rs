//! The agent as a container, as the DaemonSet in deploy/ runs it: the image `cargo xtask image`
//! built, started with an OCI runtime (runc) from a config generated from the rendered
//! DaemonSet — its command line, exactly its capability list (Debian's Docker engine cannot
//! name every capability, so Docker is not used to run it), drop ALL, no privilege, a read-only
//! root, its host mounts with their propagation, and mount, PID, IPC, UTS, cgroup and network
//! namespaces of its own. It finds the fake kubelet's pods and carries their traffic over mTLS.
//! Its init container's preflight passes, and fails, naming the mount, where the bpffs or
//! cgroup mount is not the host's.
//!
//! What differs from a cluster, and why (each is a fact of this machine, not of the manifest):
//! - hostPath sources: this host is hybrid, so its cgroup v2 tree is /sys/fs/cgroup/unified, not
//!   /sys/fs/cgroup; /run/sockmesh is a directory of the test's.
//! - `--host-netns` and `--host-bpffs` name the host through the test's own process: PID 1 of
//!   the sandbox the tests run in cannot be read, even by root.
//! - `--kube-api` is the fake API server's plain-HTTP address (no cluster, no
//!   KUBERNETES_SERVICE_HOST); the controller's Service name resolves through /etc/hosts, as
//!   cluster DNS would resolve it.
#![cfg(feature = "privileged")]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};
use tests::process::FAKE_API;
use tests::*;

const PORT: u16 = 8080;
const SERVICE_HOST: &str = "sockmesh-controller.sockmesh-system.svc";

fn uid(n: u8) -> String {
    format!("7c0d3b1e-2a4f-4b6c-8d9e-0000000000{n:02x}")
}

/// The rendered manifests' DaemonSet, as JSON.
fn daemonset() -> Value {
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let out = Command::new("kubectl").arg("kustomize").arg(&deploy).output().expect("kubectl");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let ds = serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde_json::to_value(serde_yaml::Value::deserialize(d).unwrap()).unwrap())
        .find(|v| v["kind"] == "DaemonSet");
    ds.expect("a DaemonSet in deploy/")
}

/// The image's root filesystem, exported from the Docker engine.
fn rootfs(dir: &Path) -> PathBuf {
    let rootfs = dir.join("rootfs");
    if rootfs.exists() {
        return rootfs;
    }
    std::fs::create_dir_all(&rootfs).unwrap();
    let image = format!("sockmesh/mesh-agent:{}", env!("CARGO_PKG_VERSION"));
    let out = Command::new("docker").args(["create", &image]).output().expect("docker");
    assert!(out.status.success(), "no image {image} (cargo xtask image): {}", String::from_utf8_lossy(&out.stderr));
    let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let export = Command::new("sh")
        .arg("-c")
        .arg(format!("docker export {id} | tar -C {} -x", rootfs.display()))
        .status()
        .unwrap();
    let _ = Command::new("docker").args(["rm", &id]).output();
    assert!(export.success());
    rootfs
}

/// A runc container: deleted (with its cgroup) when dropped.
struct Container {
    id: String,
    child: Option<std::process::Child>,
    log: PathBuf,
}

impl Container {
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
    /// Waits for the container's process to end; its exit code.
    fn wait(&mut self) -> i32 {
        self.child.take().unwrap().wait().unwrap().code().unwrap_or(-1)
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("runc").args(["delete", "-f", &self.id]).output();
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// How a volume of the pod spec is backed on this machine.
struct Host {
    cgroup2: PathBuf,
    run: PathBuf,
    trust: PathBuf,
    token: PathBuf,
    sa: PathBuf,
    hosts: PathBuf,
}

/// Starts container `c` of the pod spec (`init`: from initContainers) with runc, in network
/// namespace `netns`, from a process in cgroup `cgroup`; `extra` args are appended, `mounts`
/// override volumes by mount path (to break them on purpose). `instance` tells apart two
/// containers of one spec running at once (a DaemonSet's surge pod beside the old one).
#[allow(clippy::too_many_arguments)]
fn run_container(
    t: &Topology,
    ds: &Value,
    c: &Value,
    node: &str,
    netns: &str,
    host: &Host,
    extra: &[String],
    replace: &[(&str, Value)],
    instance: &str,
) -> Container {
    let pod = &ds["spec"]["template"]["spec"];
    let id = format!("{}-{}-{}{instance}", PREFIX, t.id, c["name"].as_str().unwrap());
    let bundle = t.dir.join(&id);
    std::fs::create_dir_all(&bundle).unwrap();
    let root = rootfs(&t.dir.join("image"));
    let mut env = vec!["PATH=/usr/local/bin".to_owned()];
    for e in c["env"].as_array().into_iter().flatten() {
        assert_eq!(
            e["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName",
            "only the node's name is taken from the pod"
        );
        env.push(format!("{}={node}", e["name"].as_str().unwrap()));
    }
    let mut args: Vec<String> =
        c["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().replace("$(NODE_NAME)", node)).collect();
    args.extend(extra.iter().cloned());
    let sc = &c["securityContext"];
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    let caps: Vec<String> =
        sc["capabilities"]["add"].as_array().unwrap().iter().map(|c| format!("CAP_{}", c.as_str().unwrap())).collect();
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc"}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}),
        json!({"destination": "/etc/hosts", "type": "bind", "source": host.hosts, "options": ["rbind", "ro"]}),
        json!({"destination": "/var/run/secrets/kubernetes.io/serviceaccount", "type": "bind", "source": host.sa, "options": ["rbind", "ro"]}),
    ];
    for m in c["volumeMounts"].as_array().unwrap() {
        let dest = m["mountPath"].as_str().unwrap();
        if let Some((_, v)) = replace.iter().find(|(d, _)| *d == dest) {
            let mut v = v.clone();
            v["destination"] = dest.into();
            mounts.push(v);
            continue;
        }
        let vol = pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == m["name"]).unwrap();
        let source: PathBuf = if let Some(p) = vol["hostPath"]["path"].as_str() {
            match p {
                "/sys/fs/cgroup" => host.cgroup2.clone(),
                "/run/sockmesh" => host.run.clone(),
                other => PathBuf::from(other),
            }
        } else if vol["configMap"].is_object() {
            host.trust.clone()
        } else if vol["projected"].is_object() {
            host.token.clone()
        } else {
            panic!("a volume this test does not back: {vol}");
        };
        let mut options = vec!["rbind".to_owned()];
        options.push(if m["readOnly"] == true { "ro" } else { "rw" }.into());
        match m["mountPropagation"].as_str() {
            None | Some("None") => options.push("rprivate".into()),
            Some("HostToContainer") => options.push("rslave".into()),
            Some(other) => panic!("propagation {other} needs a privileged container"),
        }
        mounts.push(json!({"destination": dest, "type": "bind", "source": source, "options": options}));
    }
    let config = json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": sc["runAsUser"].as_u64().unwrap_or(0), "gid": 0},
            "args": std::iter::once("/usr/local/bin/mesh-agent".to_owned()).chain(args).collect::<Vec<_>>(),
            "env": env,
            "cwd": "/",
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "noNewPrivileges": sc["allowPrivilegeEscalation"] == false,
        },
        "root": {"path": root, "readonly": sc["readOnlyRootFilesystem"] == true},
        "hostname": node,
        "mounts": mounts,
        "linux": {
            // Its own cgroup (named with the tests' prefix, so that a leftover would be seen).
            "cgroupsPath": format!("/{id}"),
            "namespaces": [
                {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "cgroup"},
                {"type": "network", "path": format!("/run/netns/{netns}")},
            ],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list"],
            "readonlyPaths": ["/proc/sys", "/proc/sysrq-trigger"],
        },
    });
    std::fs::write(bundle.join("config.json"), serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    let log = bundle.join("container.log");
    let child = Command::new("runc")
        .args(["run", "--bundle"])
        .arg(&bundle)
        .arg(&id)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::OpenOptions::new().append(true).open(&log).unwrap())
        .spawn()
        .expect("runc (cargo xtask setup)");
    Container { id, child: Some(child), log }
}

/// Removes what the container's agent pinned (under the manifest's bpffs directory), whatever
/// happened.
struct Pins(PathBuf);
impl Drop for Pins {
    fn drop(&mut self) {
        let _ = Command::new(bin("mesh-agent")).arg("uninstall").arg("--bpffs-dir").arg(&self.0).output();
    }
}

#[test]
fn the_agent_runs_as_the_daemonset_runs_it_and_its_preflight_names_wrong_mounts() {
    let ds = daemonset();
    let pod = &ds["spec"]["template"]["spec"];
    let agent_c = pod["containers"][0].clone();
    let init_c = pod["initContainers"][0].clone();
    let mut t = Topology::new("container").unwrap();
    // A node name of this test's own: the manifest pins under /sys/fs/bpf/sockmesh/<node>.
    let node = format!("k{}", t.id);
    let n1 = t.add_node(&node).unwrap();
    let n2 = t.add_node("n2").unwrap();
    let _pins = Pins(PathBuf::from(format!("/sys/fs/bpf/sockmesh/{node}")));
    // The agent's pod: a netns of its own on the node (hostNetwork: false).
    let agent_pod = t.add_pod(n1, "agent", false).unwrap();
    let a = t.add_pod(n1, "a", false).unwrap();
    let b = t.add_pod(n2, "b", false).unwrap();
    // The pod of the DaemonSet's rolling update (maxSurge 1), beside the first.
    let surge_pod = t.add_pod(n1, "agent-surge", false).unwrap();
    t.kubelet_cgroup(
        a,
        &format!("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice", uid(1).replace('-', "_")),
        "cri-containerd-0a.scope",
    )
    .unwrap();
    t.kubelet_cgroup(b, &format!("kubepods/besteffort/pod{}", uid(2)), "0b").unwrap();
    t.start_sandbox(a).unwrap();
    t.start_sandbox(b).unwrap();

    let api = t.dir.join("api");
    std::fs::create_dir_all(api.join("objects")).unwrap();
    let put = |file: &str, o: &Value| std::fs::write(api.join(format!("objects/{file}.json")), o.to_string()).unwrap();
    put(
        "ns",
        &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default", "labels": {"sockmesh.io/mesh": "enabled"}}}),
    );
    for (p, n) in [(a, 1u8), (b, 2)] {
        let pd = t.pod(p);
        put(
            &pd.name,
            &json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": pd.name, "namespace": "default", "uid": uid(n), "labels": {"app": pd.name}},
                "spec": {"nodeName": t.node(pd.node).name, "serviceAccountName": pd.service_account},
                "status": {"phase": "Running", "qosClass": "BestEffort", "podIP": pd.ip.to_string(), "podIPs": [{"ip": pd.ip.to_string()}]},
            }),
        );
    }
    put(
        "ds",
        &json!({"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "sockmesh-agent", "namespace": "sockmesh-system", "uid": uid(9)}}),
    );
    let kubeconfig = t.start_fake_api(&api).unwrap();
    let _ctl = t
        .start_kube_controller(&kubeconfig, &["--server-name", "mesh-controller", "--server-name", SERVICE_HOST])
        .unwrap();
    let server = t.start_server(b, PORT).unwrap();
    let host_netns = format!("/proc/{}/ns/net", std::process::id());
    let agent2 = t.start_agent(n2, &["--kubelet-pods", "--host-netns", &host_netns]).unwrap();
    t.wait_ready(n2).unwrap();

    // What the pod's volumes are backed by here.
    let vols = t.dir.join("volumes");
    let host = Host {
        cgroup2: cgroup2_mount().unwrap(),
        run: vols.join("run"),
        trust: vols.join("trust"),
        token: vols.join("token"),
        sa: vols.join("sa"),
        hosts: vols.join("hosts"),
    };
    for d in [&host.run, &host.trust, &host.token, &host.sa] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::copy(t.trust_bundle(), host.trust.join("roots.pem")).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        let token = host.token.join("token");
        std::fs::write(&token, format!("token-{node}")).unwrap();
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o400)).unwrap();
    }
    std::fs::write(host.sa.join("token"), "agent-api-token").unwrap();
    std::fs::write(&host.hosts, format!("127.0.0.1 localhost\n{CONTROLLER_IP} {SERVICE_HOST}\n")).unwrap();
    let through_test = |p: &str| format!("/host/proc/{}/{p}", std::process::id());
    let netns = t.pod(agent_pod).netns.clone();

    // The init container: preflight passes with the manifest's mounts and capabilities...
    let host_bpffs = format!("--host-bpffs={}", through_test("root/sys/fs/bpf"));
    let mut init = run_container(&t, &ds, &init_c, &node, &netns, &host, std::slice::from_ref(&host_bpffs), &[], "");
    let code = init.wait();
    assert_eq!(code, 0, "preflight failed in the DaemonSet's container:\n{}", init.log_text());
    assert!(init.log_text().contains("ok       capabilities: SYS_ADMIN, NET_ADMIN, SYS_PTRACE"), "{}", init.log_text());
    drop(init);
    // ...and fails, naming the mount, with a bpffs of the container's own...
    let own_bpffs = json!({"type": "bpf", "source": "bpf", "options": ["rw"]});
    let mut init = run_container(
        &t,
        &ds,
        &init_c,
        &node,
        &netns,
        &host,
        std::slice::from_ref(&host_bpffs),
        &[("/sys/fs/bpf", own_bpffs)],
        "",
    );
    assert_ne!(init.wait(), 0);
    let out = init.log_text();
    assert!(out.contains("/sys/fs/bpf is a bpffs of its own, not the host's") && out.contains("hostPath"), "{out}");
    drop(init);
    // ...or with the hybrid host's v1 tree where the cgroup v2 root must be.
    let v1 = json!({"type": "bind", "source": "/sys/fs/cgroup", "options": ["rbind", "rw"]});
    let mut init = run_container(&t, &ds, &init_c, &node, &netns, &host, &[host_bpffs], &[("/host/cgroup", v1)], "");
    assert_ne!(init.wait(), 0);
    let out = init.log_text();
    assert!(out.contains("/host/cgroup is a cgroup v1 tree") && out.contains("/sys/fs/cgroup/unified"), "{out}");
    drop(init);

    // The agent: captures a (found by UID through the host's /proc) and carries its traffic.
    let extra = [format!("--host-netns={}", through_test("ns/net")), format!("--kube-api=http://{FAKE_API}")];
    let mut old = run_container(&t, &ds, &agent_c, &node, &netns, &host, &extra, &[], "");
    let agent = &old;
    let ready = wait_for(Duration::from_secs(30), || {
        Ok(http_get(&netns, "127.0.0.1:15021", "/healthz/ready").map(|r| r.0 == 200).unwrap_or(false))
    });
    assert!(
        ready.is_ok(),
        "the containerised agent never became ready:\n{}\n{}",
        agent.log_text(),
        http_get(&netns, "127.0.0.1:15021", "/healthz/ready").map(|r| r.1).unwrap_or_default()
    );
    let (_, body) = http_get(&netns, "127.0.0.1:15000", "/workloads").unwrap();
    let w: Vec<Value> = serde_json::from_str(&body).unwrap();
    assert!(w.iter().any(|w| w["name"] == "a" && w["podUid"] == uid(1)), "{body}");
    // The pod cgroup hook is attached in the container too (the kernel's BTF is readable
    // there, and the capabilities allow tracing programs).
    let attached: Vec<Value> = agent
        .log_text()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["message"] == "program attached")
        .collect();
    for link in ["cgroup_mkdir", "cgroup_rmdir"] {
        assert!(
            attached.iter().any(|l| l["link"] == link),
            "{link} not attached in the container:\n{}",
            agent.log_text()
        );
    }
    let to = format!("{}:{PORT}", t.pod(b).ip);
    let r = t.pod_app(a, &["echo", "--to", &to, "--bytes", "3000", "--timeout-ms", "3000"]).unwrap();
    assert_eq!(
        (&r["ok"], &r["received"], &r["wire_peer"]),
        (&json!(true), &json!(3000), &json!("127.0.0.1:15001")),
        "{r}"
    );
    // The agent set a's netns up to dial its apps from their clients' addresses, through the
    // DaemonSet's writable view of the network sysctls: the sysctl, the rule and the route.
    let a_ns = t.pod(a).netns.clone();
    let ip = |args: &[&str]| {
        let out = Command::new("ip").args(["-n", &a_ns]).args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(
        ip(&["rule", "show"]).contains("fwmark 0x3aa0 lookup 15008"),
        "{}\n{}",
        ip(&["rule", "show"]),
        agent.log_text()
    );
    assert!(ip(&["-6", "rule", "show"]).contains("fwmark 0x3aa0 lookup 15008"), "{}", ip(&["-6", "rule", "show"]));
    assert!(ip(&["route", "show", "table", "15008"]).contains("local default dev lo"), "{}", agent.log_text());
    let sysctl = Command::new("ip")
        .args(["netns", "exec", &a_ns, "sysctl", "-n", "net.ipv4.tcp_fwmark_accept"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&sysctl.stdout).trim(), "1", "{}", agent.log_text());
    let a_id = "spiffe://cluster.local/ns/default/sa/sa-a";
    wait_for(Duration::from_secs(5), || {
        Ok(agent2
            .access_log()
            .iter()
            .any(|l| l["src_principal"] == a_id && l["connection_security_policy"] == "mutual_tls"))
    })
    .unwrap_or_else(|_| panic!("b's agent never saw a's identity over mTLS: {:?}", agent2.access_log()));

    // The rolling update: the surge pod's agent, in a netns of its own, takes over through the
    // hand-over socket on the shared hostPath while a probes b every 2 ms, and none is refused.
    // The old agent drains and then waits for the kubelet's SIGTERM rather than exit (the
    // kubelet would restart it, and it would take over back).
    let until = t.dir.join("probe-stop").display().to_string();
    let probe = ["probe", "--to", &to, "--interval-ms", "2", "--duration-ms", "900000", "--until-file", &until];
    let prober = t.spawn_pod_app(a, &[&probe[..], &["--timeout-ms", "10000"]].concat()).unwrap();
    let accepted = || server.accepted().map(|a| a.len()).unwrap_or(0);
    let before = accepted();
    wait_for(Duration::from_secs(30), || Ok(accepted() >= before + 3)).unwrap();
    let surge_netns = t.pod(surge_pod).netns.clone();
    let mut agent = run_container(&t, &ds, &agent_c, &node, &surge_netns, &host, &extra, &[], "-surge");
    wait_for(Duration::from_secs(60), || {
        Ok(http_get(&surge_netns, "127.0.0.1:15021", "/healthz/ready").map(|r| r.0 == 200).unwrap_or(false))
    })
    .unwrap_or_else(|_| panic!("the surge pod's agent never became ready:\n{}", agent.log_text()));
    wait_for(Duration::from_secs(60), || {
        Ok(old.log_text().contains("drained; waiting for the kubelet to stop this pod"))
    })
    .unwrap_or_else(|_| panic!("the old agent did not drain:\n{}", old.log_text()));
    let _ = Command::new("runc").args(["kill", &old.id, "TERM"]).output();
    assert_eq!(old.wait(), 0, "{}", old.log_text());
    let before = accepted();
    wait_for(Duration::from_secs(30), || Ok(accepted() >= before + 3)).unwrap();
    std::fs::write(&until, "").unwrap();
    let s = prober.result().unwrap();
    assert_eq!(s["failed"], 0, "probes failed during the rolling update: {s}");
    let r = t.pod_app(a, &["echo", "--to", &to, "--bytes", "3000", "--timeout-ms", "3000"]).unwrap();
    assert_eq!(r["ok"], true, "through the surge pod's agent: {r}");

    // Told to stop while its DaemonSet exists: its programs stay (a fails closed).
    let _ = Command::new("runc").args(["kill", &agent.id, "TERM"]).output();
    wait_for(Duration::from_secs(10), || Ok(agent.log_text().contains("its DaemonSet is there")))
        .unwrap_or_else(|_| panic!("{}", agent.log_text()));
    // Gone, not on its way out (until it exits, its listeners still take connections).
    agent.wait();
    assert!(Path::new(&format!("/sys/fs/bpf/sockmesh/{node}/links")).exists(), "the pins are gone after a stop");
    let r = t.pod_app(a, &["echo", "--to", &to, "--bytes", "10", "--timeout-ms", "3000"]).unwrap();
    assert_eq!((&r["ok"], &r["errno"]), (&json!(false), &json!(libc::ECONNREFUSED)), "{r}");
}
