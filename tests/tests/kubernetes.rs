//! Kubernetes mode on the real kernel: the real controller with `--source kubernetes
//! --node-auth kubernetes` against `sm-fakeapi` (a test fixture serving recorded objects over
//! HTTP: list, watch, TokenReview, status), and real agents with `--kubelet-pods` that find each
//! pod from its UID alone: its cgroup in a kubelet-shaped tree under the node's cgroup root, its
//! netns from the processes in that cgroup. No paths are given to any agent.
#![cfg(feature = "privileged")]

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use tests::process::FAKE_API;
use tests::*;

const PORT: u16 = 8080;
const A_ID: &str = "spiffe://cluster.local/ns/default/sa/sa-a";

fn uid(n: u8) -> String {
    format!("5e1f0c2a-7b3d-4e8f-9a01-0000000000{n:02x}")
}

fn sd(uid: &str) -> String {
    uid.replace('-', "_")
}

/// A Pod as the API server returns it. `ip: None`: scheduled, no address yet.
fn pod_json(t: &Topology, p: PodId, uid: &str, qos: &str, ip: Option<String>) -> Value {
    let pod = t.pod(p);
    let mut status = json!({"phase": "Running", "qosClass": qos});
    if let Some(ip) = ip {
        status["podIP"] = ip.clone().into();
        status["podIPs"] = json!([{"ip": ip}]);
    } else {
        status["phase"] = "Pending".into();
    }
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod.name, "namespace": "default", "uid": uid, "labels": {"app": pod.name}},
        "spec": {"nodeName": t.node(pod.node).name, "serviceAccountName": pod.service_account, "containers": [{"name": "app", "image": "app:1"}]},
        "status": status,
    })
}

fn put(api: &Path, file: &str, o: &Value) {
    let tmp = api.join(format!("objects/.{file}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec_pretty(o).unwrap()).unwrap();
    std::fs::rename(tmp, api.join(format!("objects/{file}.json"))).unwrap();
}

fn echo(t: &Topology, p: PodId, to: &str) -> Value {
    t.pod_app(p, &["echo", "--to", to, "--bytes", "3000", "--timeout-ms", "3000"]).unwrap()
}

fn workloads(t: &Topology, n: NodeId) -> Vec<Value> {
    let (_, body) = http_get(&t.node(n).netns, "127.0.0.1:15000", "/workloads").unwrap();
    serde_json::from_str(&body).unwrap_or_default()
}

fn readiness(t: &Topology, n: NodeId) -> (u16, String) {
    http_get(&t.node(n).netns, "127.0.0.1:15021", "/healthz/ready").unwrap()
}

/// Waits until `n`'s agent is not ready for a reason about `pod` containing `why`.
fn wait_refused(t: &Topology, n: NodeId, pod: &str, why: &str) -> String {
    let mut last = String::new();
    let seen = time_until(Duration::from_secs(20), || {
        let (code, body) = readiness(t, n);
        last = body.clone();
        code == 503 && body.contains(&format!("default/{pod} is not captured")) && body.contains(why)
    });
    assert!(seen.is_some(), "{pod}: never refused with {why:?}; readiness: {last}");
    last
}

/// The agent's flags on a node: pods from the controller, found by UID. The host's netns is
/// this test's (the machine's); PID 1's is not readable in every sandbox the tests run in.
fn kubelet_flags() -> [&'static str; 3] {
    let host: &'static str = Box::leak(format!("/proc/{}/ns/net", std::process::id()).into_boxed_str());
    ["--kubelet-pods", "--host-netns", host]
}

/// A process put somewhere it should not be (a pod's cgroup, another netns), ended when dropped.
struct Intruder(std::process::Child);

impl Intruder {
    /// `sleep` in network namespace `netns` (None: this test's, the machine's) and `cgroup`.
    fn start(netns: Option<&str>, cgroup: &Path) -> Intruder {
        let child = match netns {
            Some(ns) => command_in(ns, cgroup, "sleep").unwrap().arg("3600").spawn().unwrap(),
            None => {
                let c = std::process::Command::new("sleep").arg("3600").spawn().unwrap();
                std::fs::write(cgroup.join("cgroup.procs"), c.id().to_string()).unwrap();
                c
            }
        };
        Intruder(child)
    }
}

impl Drop for Intruder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn ino(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| std::os::unix::fs::MetadataExt::ino(&m)).unwrap()
}

/// Adds a cgroup id to the directories the pod cgroup hook looks in (`SM_POD_PARENTS`), as the
/// agent does for the kubelet's.
fn add_pod_parent(bpffs: &Path, id: u64) {
    let key: Vec<String> = id.to_ne_bytes().iter().map(|b| format!("{b:02x}")).collect();
    let out = std::process::Command::new("bpftool")
        .args(["map", "update", "pinned"])
        .arg(bpffs.join("maps/SM_POD_PARENTS"))
        .args(["key", "hex"])
        .args(&key)
        .args(["value", "hex", "01"])
        .output()
        .unwrap();
    assert!(out.status.success(), "bpftool: {}", String::from_utf8_lossy(&out.stderr));
}

/// A named cgroup v1 hierarchy with no controllers, mounted at a directory; unmounted (its
/// cgroups removed first, deepest first) when dropped.
struct V1Hierarchy(PathBuf);

impl V1Hierarchy {
    fn mount(at: &Path, name: &str) -> V1Hierarchy {
        std::fs::create_dir_all(at).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "cgroup", "-o", &format!("none,name={name}"), "cgroup"])
            .arg(at)
            .output()
            .unwrap();
        assert!(out.status.success(), "mounting a v1 hierarchy: {}", String::from_utf8_lossy(&out.stderr));
        V1Hierarchy(at.to_owned())
    }
}

impl Drop for V1Hierarchy {
    fn drop(&mut self) {
        let mut dirs = Vec::new();
        let mut stack = vec![self.0.clone()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(e.path());
                    dirs.push(e.path());
                }
            }
        }
        for d in dirs.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
        let _ = std::process::Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

struct Kube {
    t: Topology,
    n1: NodeId,
    n2: NodeId,
    a: PodId,
    b: PodId,
    api: PathBuf,
    /// a's and b's pod-level cgroups.
    a_dir: PathBuf,
    b_dir: PathBuf,
}

/// Two nodes; pod `a` on n1 in the systemd driver's layout (Burstable), pod `b` on n2 in the
/// cgroupfs layout nested under another root (BestEffort), both with their sandboxes running
/// before anything of the mesh starts; the namespace meshed; the fake API server serving them.
fn kube(test: &str) -> Kube {
    let mut t = Topology::new(test).unwrap();
    let n1 = t.add_node("n1").unwrap();
    let n2 = t.add_node("n2").unwrap();
    let a = t.add_pod(n1, "a", false).unwrap();
    let b = t.add_pod(n2, "b", false).unwrap();
    let a_dir = t
        .kubelet_cgroup(
            a,
            &format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice", sd(&uid(1))),
            "cri-containerd-0a.scope",
        )
        .unwrap();
    let b_dir = t.kubelet_cgroup(b, &format!("kubelet/kubepods/besteffort/pod{}", uid(2)), "0b").unwrap();
    t.start_sandbox(a).unwrap();
    t.start_sandbox(b).unwrap();
    let api = t.dir.join("api");
    std::fs::create_dir_all(api.join("objects")).unwrap();
    put(
        &api,
        "ns-default",
        &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default", "labels": {"sockmesh.io/mesh": "enabled"}}}),
    );
    put(&api, "pod-a", &pod_json(&t, a, &uid(1), "Burstable", Some(t.pod(a).ip.to_string())));
    put(&api, "pod-b", &pod_json(&t, b, &uid(2), "BestEffort", Some(t.pod(b).ip.to_string())));
    Kube { t, n1, n2, a, b, api, a_dir, b_dir }
}

/// The whole path with nothing but UIDs and addresses from the API: the pods that were there
/// before the agents are captured at start, carry traffic over mutual TLS with their identities,
/// a policy that arrives as a watch event is enforced, its status is written back, and a pod
/// whose sandbox the kubelet replaces is captured again.
#[test]
fn pods_are_found_by_uid_and_carry_traffic_over_mtls() {
    let Kube { mut t, n1, n2, a, b, api, a_dir, b_dir } = kube("kube-e2e");
    let kubeconfig = t.start_fake_api(&api).unwrap();
    let _ctl = t.start_kube_controller(&kubeconfig, &[]).unwrap();
    let _server = t.start_server(b, PORT).unwrap();
    let _agent1 = t.start_agent(n1, &kubelet_flags()).unwrap();
    let agent2 = t.start_agent(n2, &kubelet_flags()).unwrap();
    t.wait_ready(n1).unwrap();
    t.wait_ready(n2).unwrap();

    // Found by UID: the pod-level cgroup, and the netns of its processes.
    let w = workloads(&t, n1);
    let wa = w.iter().find(|w| w["name"] == "a").unwrap_or_else(|| panic!("a not captured: {w:?}"));
    assert_eq!(wa["podUid"], uid(1));
    assert_eq!(wa["source"], "kubernetes");
    assert_eq!(Path::new(wa["cgroup"].as_str().unwrap()), a_dir);
    assert!(wa["netns"].as_str().unwrap().ends_with("/ns/net"), "{wa}");
    let w = workloads(&t, n2);
    let wb = w.iter().find(|w| w["name"] == "b").unwrap_or_else(|| panic!("b not captured: {w:?}"));
    assert_eq!(Path::new(wb["cgroup"].as_str().unwrap()), b_dir);

    let to = format!("{}:{PORT}", t.pod(b).ip);
    let r = echo(&t, a, &to);
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["received"], 3000, "{r}");
    assert_eq!(r["checksum_match"], true, "{r}");
    wait_for(Duration::from_secs(5), || Ok(agent2.access_log().iter().any(|l| l["src_principal"] == A_ID))).unwrap();
    let line = agent2.access_log().into_iter().find(|l| l["src_principal"] == A_ID).unwrap();
    assert_eq!(line["connection_security_policy"], "mutual_tls", "{line}");
    assert_eq!(line["result"], "ok", "{line}");

    // A DENY arrives as a watch event; its status is written back through the API.
    let deny = json!({
        "apiVersion": "security.sockmesh.io/v1alpha1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny-a", "namespace": "default", "generation": 1, "uid": uid(9)},
        "spec": {"selector": {"matchLabels": {"app": "b"}}, "action": "DENY", "rules": [{"from": [{"source": {"principals": [A_ID]}}]}]},
    });
    put(&api, "ap-deny-a", &deny);
    let refused = time_until(Duration::from_secs(20), || echo(&t, a, &to)["ok"] == false);
    assert!(refused.is_some(), "the DENY that arrived by watch was never enforced");
    wait_for(Duration::from_secs(5), || {
        Ok(agent2.access_log().iter().any(|l| l["src_principal"] == A_ID && l["result"] == "deny_policy"))
    })
    .unwrap_or_else(|_| panic!("no denial logged: {:?}", agent2.access_log()));
    let writes = std::fs::read_to_string(api.join("requests.log")).unwrap();
    let status = writes.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).find(|r| {
        r["method"] == "PATCH" && r["path"].as_str().is_some_and(|p| p.ends_with("authorizationpolicies/deny-a/status"))
    });
    let status = status.expect("the policy's status was never written");
    assert_eq!(status["body"]["status"]["conditions"][0]["status"], "True", "{status}");
    std::fs::remove_file(api.join("objects/ap-deny-a.json")).unwrap();
    let allowed = time_until(Duration::from_secs(20), || echo(&t, a, &to)["ok"] == true);
    assert!(allowed.is_some(), "removing the DENY (a DELETED event) never took effect");

    // The kubelet replaces b's sandbox: same UID and cgroup, a new netns with the same address.
    // The agent captures the new netns; traffic flows again.
    t.replace_netns(b).unwrap();
    t.start_sandbox(b).unwrap();
    let _server = t.start_server(b, PORT).unwrap();
    let back = time_until(Duration::from_secs(20), || echo(&t, a, &to)["ok"] == true);
    assert!(back.is_some(), "b was not captured again after its sandbox was replaced: {}", agent2.log_text());
    assert!(agent2.log_lines().iter().any(|l| l["message"] == "the pod's sandbox was replaced: capturing it again"));
}

/// A pod is pushed as soon as it is scheduled; until it can be captured its connections are
/// refused, never sent in plaintext, and the agent is not ready. Then the refusals: the host's
/// netns, a netns without the pod's address, a foreign process, a netns shared with another pod.
#[test]
fn pods_that_cannot_be_captured_are_refused_never_plain() {
    let Kube { mut t, n1, n2, a, b, api, .. } = kube("kube-refuse");
    // c: scheduled on n1, in its cgroup but no address in the API yet.
    let c = t.add_pod(n1, "c", false).unwrap();
    t.kubelet_cgroup(c, &format!("kubepods.slice/kubepods-pod{}.slice", sd(&uid(3))), "cri-containerd-0c.scope")
        .unwrap();
    t.start_sandbox(c).unwrap();
    put(&api, "pod-c", &pod_json(&t, c, &uid(3), "Guaranteed", None));
    // w: its cgroup made and its address known before the agent starts, its sandbox not
    // started yet.
    let w = t.add_pod(n1, "w", false).unwrap();
    t.kubelet_cgroup(w, &format!("kubepods/burstable/pod{}", uid(11)), "0w").unwrap();
    put(&api, "pod-w", &pod_json(&t, w, &uid(11), "Burstable", Some(t.pod(w).ip.to_string())));
    let kubeconfig = t.start_fake_api(&api).unwrap();
    let _ctl = t.start_kube_controller(&kubeconfig, &[]).unwrap();
    let _server = t.start_server(b, PORT).unwrap();
    let agent1 = t.start_agent(n1, &kubelet_flags()).unwrap();
    let agent2 = t.start_agent(n2, &kubelet_flags()).unwrap();
    t.wait_ready(n2).unwrap();
    let to = format!("{}:{PORT}", t.pod(b).ip);

    // Waiting for an address: from the moment its agent has seen it, every connect is refused
    // (EPERM from the kernel), the first one included; and it is not a readiness blocker.
    let seen = |l: &Value| {
        l["workload"] == "default/c" && l["message"].as_str().is_some_and(|m| m.starts_with("cannot capture workload"))
    };
    wait_for(Duration::from_secs(20), || Ok(agent1.log_lines().iter().any(seen)))
        .unwrap_or_else(|_| panic!("the agent never took up c: {}", agent1.log_text()));
    for _ in 0..3 {
        let r = echo(&t, c, &to);
        assert_eq!((&r["ok"], &r["errno"]), (&json!(false), &json!(libc::EPERM)), "c, without an address: {r}");
    }
    let c_ip = t.pod(c).ip.to_string();
    let from_c = |l: &Value| l["src_addr"].as_str().is_some_and(|a| a.starts_with(&format!("{c_ip}:")));
    assert!(!agent2.access_log().iter().any(from_c), "a connection from c reached b: {:?}", agent2.access_log());
    // The agent is not ready while a pod with an address is not captured (w has no process
    // yet); once w's sandbox runs it is captured and the agent is ready, c notwithstanding.
    wait_refused(&t, n1, "w", "no process in its cgroup");
    t.start_sandbox(w).unwrap();
    t.wait_ready(n1).unwrap();
    assert!(workloads(&t, n1).iter().any(|x| x["name"] == "w"), "w is not captured");
    // Its address arrives: captured, and its traffic flows.
    put(&api, "pod-c", &pod_json(&t, c, &uid(3), "Guaranteed", Some(t.pod(c).ip.to_string())));
    let ok = time_until(Duration::from_secs(20), || echo(&t, c, &to)["ok"] == true);
    assert!(ok.is_some(), "c was never captured once it had its address");

    // d: its record says an address its netns does not hold.
    let d = t.add_pod(n1, "d", false).unwrap();
    t.kubelet_cgroup(d, &format!("kubepods/burstable/pod{}", uid(4)), "0d").unwrap();
    t.start_sandbox(d).unwrap();
    put(&api, "pod-d", &pod_json(&t, d, &uid(4), "Burstable", Some("10.20.1.99".into())));
    wait_refused(&t, n1, "d", "holds none of its addresses");
    assert_eq!(echo(&t, d, &to)["errno"], libc::EPERM, "d's connects must be refused");
    std::fs::remove_file(api.join("objects/pod-d.json")).unwrap();

    // e: a process in its cgroup lives in another pod's (a's) netns: that netns is a's.
    let e = t.add_pod(n1, "e", false).unwrap();
    let e_dir = t.kubelet_cgroup(e, &format!("kubepods/besteffort/pod{}", uid(5)), "0e").unwrap();
    let intruder = Intruder::start(Some(&t.pod(a).netns), &e_dir.join("0e"));
    put(&api, "pod-e", &pod_json(&t, e, &uid(5), "BestEffort", Some(t.pod(a).ip.to_string())));
    wait_refused(&t, n1, "e", "already used by workload default/a");
    drop(intruder);
    std::fs::remove_file(api.join("objects/pod-e.json")).unwrap();

    // f: its sandbox in its own netns, and a foreign process in another netns (the node's).
    let f = t.add_pod(n1, "f", false).unwrap();
    let f_dir = t.kubelet_cgroup(f, &format!("kubepods/besteffort/pod{}", uid(6)), "0f").unwrap();
    t.start_sandbox(f).unwrap();
    std::fs::create_dir_all(f_dir.join("0g")).unwrap();
    let foreign = Intruder::start(Some(&t.pod(c).netns), &f_dir.join("0g"));
    put(&api, "pod-f", &pod_json(&t, f, &uid(6), "BestEffort", Some(t.pod(f).ip.to_string())));
    wait_refused(&t, n1, "f", "different network namespaces");
    assert_eq!(echo(&t, f, &to)["errno"], libc::EPERM, "f's connects must be refused");
    drop(foreign);
    // With the foreign process gone, f is captured.
    let ok = time_until(Duration::from_secs(20), || echo(&t, f, &to)["ok"] == true);
    assert!(ok.is_some(), "f was not captured once the foreign process left");

    // g: a process in the node's own netns (where the agent runs) in the pod's cgroup.
    let g = t.add_pod(n1, "g", false).unwrap();
    let g_dir = t.kubelet_cgroup(g, &format!("kubepods/besteffort/pod{}", uid(7)), "0g").unwrap();
    let on_node = Intruder::start(Some(&t.node(n1).netns), &g_dir.join("0g"));
    put(&api, "pod-g", &pod_json(&t, g, &uid(7), "BestEffort", Some(t.pod(g).ip.to_string())));
    wait_refused(&t, n1, "g", "the agent's own network namespace");
    drop(on_node);
    std::fs::remove_file(api.join("objects/pod-g.json")).unwrap();

    // h: a process of the host's netns (the machine's, PID 1's) moved into the pod's cgroup.
    let h = t.add_pod(n1, "h", false).unwrap();
    let h_dir = t.kubelet_cgroup(h, &format!("kubepods/besteffort/pod{}", uid(8)), "0h").unwrap();
    let _on_host = Intruder::start(None, &h_dir.join("0h"));
    put(&api, "pod-h", &pod_json(&t, h, &uid(8), "BestEffort", Some(t.pod(h).ip.to_string())));
    wait_refused(&t, n1, "h", "the host's network namespace");
}

/// A meshed pod's cgroup is refused inside the mkdir that makes it, by the kernel: the agent
/// is stopped (SIGSTOP) before the kubelet makes the cgroup of a pod the controller has given
/// the node and the runtime starts the app in it, so nothing but the cgroup_mkdir hook can
/// act; the app's first connect fails with EPERM and nothing reaches the other pod. A pod the
/// mesh does not have, in a pod-shaped cgroup, is left alone. When a refused pod's cgroup is
/// removed, its refusal goes with it (cgroup_rmdir). Resumed, the agent captures the pod and
/// its traffic flows.
#[test]
fn a_meshed_pods_cgroup_is_refused_inside_the_kubelets_mkdir() {
    let Kube { mut t, n1, n2, b, api, .. } = kube("kube-mkdir");
    let kubeconfig = t.start_fake_api(&api).unwrap();
    let _ctl = t.start_kube_controller(&kubeconfig, &[]).unwrap();
    let _server = t.start_server(b, PORT).unwrap();
    let agent1 = t.start_agent(n1, &kubelet_flags()).unwrap();
    let agent2 = t.start_agent(n2, &kubelet_flags()).unwrap();
    t.wait_ready(n1).unwrap();
    t.wait_ready(n2).unwrap();
    let to = format!("{}:{PORT}", t.pod(b).ip);
    let bpffs = t.node(n1).bpffs.clone();

    // The kubelet makes its QoS levels when it starts, before any pod: the agent gives them
    // to the hook as it takes pods up (a's made the systemd tree's).
    std::fs::create_dir_all(t.node(n1).cgroup.join("kubepods/besteffort")).unwrap();
    // p and r: scheduled to n1, their cgroups not made yet; the agent has taken them up.
    let p = t.add_pod(n1, "p", false).unwrap();
    let r = t.add_pod(n1, "r", false).unwrap();
    put(&api, "pod-p", &pod_json(&t, p, &uid(12), "Burstable", Some(t.pod(p).ip.to_string())));
    put(&api, "pod-r", &pod_json(&t, r, &uid(14), "BestEffort", Some(t.pod(r).ip.to_string())));
    for pod in ["p", "r"] {
        let waiting = |l: &Value| {
            l["workload"] == format!("default/{pod}")
                && l["message"].as_str().is_some_and(|m| m.contains("no cgroup of it"))
        };
        wait_for(Duration::from_secs(20), || Ok(agent1.log_lines().iter().any(waiting)))
            .unwrap_or_else(|_| panic!("the agent never took up {pod}: {}", agent1.log_text()));
    }
    agent1.pause();

    // The kubelet makes p's cgroup and the runtime starts the app in it at once.
    let p_dir = t
        .kubelet_cgroup(
            p,
            &format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice", sd(&uid(12))),
            "cri-containerd-0p.scope",
        )
        .unwrap();
    let p_ip = t.pod(p).ip.to_string();
    for _ in 0..3 {
        let res = echo(&t, p, &to);
        assert_eq!(
            (&res["ok"], &res["errno"]),
            (&json!(false), &json!(libc::EPERM)),
            "p, made while its agent was stopped: {res}"
        );
    }
    let from_p = |l: &Value| l["src_addr"].as_str().is_some_and(|a| a.starts_with(&format!("{p_ip}:")));
    assert!(!agent2.access_log().iter().any(from_p), "a connection from p reached b: {:?}", agent2.access_log());
    let p_cg = ino(&p_dir);
    assert_eq!(workload_entries(&bpffs).unwrap().get(&p_cg), Some(&(0, 0)), "p's cgroup is not entered as refused");

    // Not pods' cgroups, though named for r (which is in the mesh): nothing is entered for them.
    // - One in a cgroup v1 hierarchy (its own, mounted for the test), even made in a directory
    //   whose id the test adds to the hook's pod directories: v1 cgroup ids are another
    //   numbering, which could name a v2 cgroup.
    // - One outside the kubelet's pod directories (a user's delegated cgroup): it could fill
    //   the node's map.
    let v1 = V1Hierarchy::mount(&t.dir.join("v1"), &format!("smt-{}", std::process::id()));
    let v1_parent = v1.0.join("kubepods/besteffort");
    std::fs::create_dir_all(&v1_parent).unwrap();
    add_pod_parent(&bpffs, ino(&v1_parent));
    let delegated = t.node(n1).cgroup.join(format!("user.slice/user-1000.slice/pod{}", uid(14)));
    for d in [&v1_parent.join(format!("pod{}", uid(14))), &delegated] {
        let before = workload_entries(&bpffs).unwrap();
        std::fs::create_dir_all(d).unwrap();
        let id = ino(d);
        assert_eq!(workload_entries(&bpffs).unwrap().get(&id), before.get(&id), "{} was entered", d.display());
    }
    drop(v1);
    std::fs::remove_dir(&delegated).unwrap();

    // q: not the mesh's (not in the API), in a pod-shaped cgroup: its traffic is its own.
    let q = t.add_pod(n1, "q", false).unwrap();
    t.kubelet_cgroup(q, &format!("kubepods/besteffort/pod{}", uid(13)), "0q").unwrap();
    let res = echo(&t, q, &to);
    assert_eq!(res["ok"], true, "q, a pod the mesh does not have, was refused: {res}");

    // r's cgroup is made, then removed before the agent has looked: its refusal goes with it.
    let r_dir = t.kubelet_cgroup(r, &format!("kubepods/besteffort/pod{}", uid(14)), "0r").unwrap();
    let r_cg = ino(&r_dir);
    assert_eq!(workload_entries(&bpffs).unwrap().get(&r_cg), Some(&(0, 0)), "r's cgroup is not entered as refused");
    std::fs::remove_dir(r_dir.join("0r")).unwrap();
    std::fs::remove_dir(&r_dir).unwrap();
    assert_eq!(workload_entries(&bpffs).unwrap().get(&r_cg), None, "r's refusal outlived its cgroup");

    // Resumed, the agent captures p once its sandbox runs; its traffic flows over the mesh.
    agent1.resume();
    t.start_sandbox(p).unwrap();
    let ok = time_until(Duration::from_secs(20), || echo(&t, p, &to)["ok"] == true);
    assert!(ok.is_some(), "p was never captured after its agent resumed: {}", agent1.log_text());
    assert!(agent2.access_log().iter().any(from_p), "p's connection did not go through the mesh");
    assert!(agent1.stats().unwrap().kernel["pod_cgroups_refused_at_mkdir"] >= 2);

    // No agent runs on n1 (killed: its programs stay pinned) while r's cgroup is made again and
    // r leaves the mesh. The next agent starts with no kept configuration (its state lost), so
    // the hook's record is all it has of r: it lifts the refusal, and r's traffic is its own.
    let before = pinned_link_ids(&bpffs).unwrap();
    let mut agent1 = agent1;
    agent1.kill().unwrap();
    let r_dir = t.kubelet_cgroup(r, &format!("kubepods/besteffort/pod{}", uid(14)), "0r").unwrap();
    t.start_sandbox(r).unwrap();
    let r_cg = ino(&r_dir);
    assert_eq!(workload_entries(&bpffs).unwrap().get(&r_cg), Some(&(0, 0)), "r's new cgroup is not entered as refused");
    assert_eq!(echo(&t, r, &to)["errno"], libc::EPERM, "r must be refused while it is in the mesh");
    let pushed = agent2.stats().unwrap().config.version;
    std::fs::remove_file(api.join("objects/pod-r.json")).unwrap();
    std::fs::remove_file(t.node(n1).state_dir.join("config.json")).unwrap();
    // The controller has dropped r before n1's agent starts (every agent gets every workload
    // record, so n2's sees the change): otherwise the new agent could capture r from a push
    // made before the deletion was seen, and release it, lifting nothing.
    wait_for(Duration::from_secs(20), || Ok(agent2.stats()?.config.version > pushed)).unwrap();
    let agent1 = t.start_agent(n1, &kubelet_flags()).unwrap();
    t.wait_ready(n1).unwrap();
    let lifted = time_until(Duration::from_secs(20), || !workload_entries(&bpffs).unwrap().contains_key(&r_cg));
    assert!(lifted.is_some(), "r, out of the mesh, is still refused: {}", agent1.log_text());
    let lift = |l: &Value| {
        l["message"].as_str().is_some_and(|m| m.starts_with("lifting the refusal")) && l["pod_uid"] == uid(14)
    };
    assert!(
        agent1.log_lines().iter().any(lift),
        "r's refusal was not lifted from the hook's record: {}",
        agent1.log_text()
    );
    let res = echo(&t, r, &to);
    assert_eq!(res["ok"], true, "r, out of the mesh, cannot connect: {res}");

    // The restarted agent replaced the hook's links (the kernel cannot swap their programs):
    // the old ones are gone, not left running beside the new.
    let after = pinned_link_ids(&bpffs).unwrap();
    for pin in ["cgroup_mkdir", "cgroup_rmdir"] {
        let (old, new) = (before[pin], after[pin]);
        assert!(old != 0 && new != 0 && old != new, "{pin}: {before:?} -> {after:?}");
        // Freed once its last pin goes (after an RCU grace period: waited for, not assumed).
        let gone = wait_for(Duration::from_secs(10), || {
            let shown =
                std::process::Command::new("bpftool").args(["link", "show", "id", &old.to_string()]).output()?;
            Ok(!shown.status.success())
        });
        assert!(gone.is_ok(), "{pin}: the old link {old} is still attached");
    }
    assert_eq!(after.keys().filter(|k| k.ends_with("_new")).count(), 0, "{after:?}");
}

/// SIGTERM is an upgrade or a drain while the agent's DaemonSet exists: the programs stay
/// attached and the pods fail closed. Once the DaemonSet is gone (an uninstall) the agent
/// detaches everything on its way out and the pods' connections go direct again.
#[test]
fn sigterm_keeps_programs_while_the_daemonset_exists_and_detaches_them_when_it_is_gone() {
    let Kube { mut t, n1, n2, a, api, .. } = kube("kube-sigterm");
    // p: a pod outside the mesh (not in the API) on n2, serving.
    let p = t.add_pod(n2, "p", false).unwrap();
    let ds = json!({
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": "sockmesh-agent", "namespace": "sockmesh-system", "uid": uid(10)},
        "spec": {"selector": {"matchLabels": {"app.kubernetes.io/name": "sockmesh-agent"}}},
    });
    put(&api, "ds", &ds);
    let kubeconfig = t.start_fake_api(&api).unwrap();
    let _ctl = t.start_kube_controller(&kubeconfig, &[]).unwrap();
    let token = t.dir.join("agent-api-token");
    std::fs::write(&token, "agent-api-token").unwrap();
    let api_url = format!("http://{FAKE_API}");
    let mut flags = kubelet_flags().to_vec();
    flags.extend(["--daemonset", "sockmesh-system/sockmesh-agent", "--kube-api", &api_url, "--kube-token-file"]);
    flags.push(token.to_str().unwrap());
    let _server = t.start_server(p, PORT).unwrap();
    let mut agent1 = t.start_agent(n1, &flags).unwrap();
    let _agent2 = t.start_agent(n2, &flags).unwrap();
    t.wait_ready(n1).unwrap();
    let to = format!("{}:{PORT}", t.pod(p).ip);
    let r = echo(&t, a, &to);
    assert_eq!(
        (&r["ok"], &r["wire_peer"]),
        (&json!(true), &json!("127.0.0.1:15001")),
        "a's connection is captured: {r}"
    );

    // Stopped with its DaemonSet there: everything stays attached, a's connects fail closed.
    let links = t.node(n1).bpffs.join("links");
    let before = std::fs::read_dir(&links).unwrap().count();
    agent1.stop().unwrap();
    let kept = "agent stopping; its DaemonSet is there (an upgrade or a drain): kernel programs stay attached";
    wait_for(Duration::from_secs(10), || Ok(agent1.log_lines().iter().any(|l| l["message"] == kept)))
        .unwrap_or_else(|_| panic!("{}", agent1.log_text()));
    assert_eq!(std::fs::read_dir(&links).unwrap().count(), before, "pinned links were lost on an upgrade");
    let r = echo(&t, a, &to);
    assert_eq!((&r["ok"], &r["errno"]), (&json!(false), &json!(libc::ECONNREFUSED)), "fail closed: {r}");

    // Uninstall: the DaemonSet is deleted, then its agent is told to stop.
    let mut agent1 = t.start_agent(n1, &flags).unwrap();
    t.wait_ready(n1).unwrap();
    std::fs::remove_file(api.join("objects/ds.json")).unwrap();
    let path = "/apis/apps/v1/namespaces/sockmesh-system/daemonsets/sockmesh-agent";
    wait_for(Duration::from_secs(10), || Ok(http_get(&t.fabric, FAKE_API, path)?.0 == 404)).unwrap();
    agent1.stop().unwrap();
    let gone = "agent stopping; its DaemonSet is gone (uninstall): kernel programs detached, pins removed";
    wait_for(Duration::from_secs(10), || Ok(agent1.log_lines().iter().any(|l| l["message"] == gone)))
        .unwrap_or_else(|_| panic!("{}", agent1.log_text()));
    assert!(!t.node(n1).bpffs.exists(), "the node's pins are still there after an uninstall");
    let r = echo(&t, a, &to);
    assert_eq!(
        (&r["ok"], r["peer"].as_str()),
        (&json!(true), Some(to.as_str())),
        "a goes direct after an uninstall: {r}"
    );
}

/// Two controller replicas against the API server, sharing one CA: one holds the Lease and
/// writes policy status, the other does not; the writer killed, the other takes the Lease
/// over and writes the next status, while the agents, moved to whichever replica answers,
/// enforce the policy change and keep their certificates coming.
#[test]
fn two_controller_replicas_one_status_writer_and_a_successor_when_it_dies() {
    let Kube { mut t, n1, n2, a, b, api, .. } = kube("kube-replicas");
    let kubeconfig = t.start_fake_api(&api).unwrap();
    let dir = t.controller_dir();
    let lease = ["--lease-duration", "3s"];
    let first = t.start_kube_controller(&kubeconfig, &[&lease[..], &["--lease-holder", "first"]].concat()).unwrap();
    let ca: Vec<String> = ["root.pem", "root-key.pem"].iter().map(|f| dir.join(f).display().to_string()).collect();
    let second_dir = dir.with_file_name("controller-replica-2");
    let second_args = [
        "--ca-cert",
        &ca[0],
        "--ca-key",
        &ca[1],
        "--metrics-addr",
        "0.0.0.0:15114",
        "--admin-addr",
        "127.0.0.1:15115",
        "--lease-holder",
        "second",
    ];
    let second = t
        .start_kube_controller_replica(
            &kubeconfig,
            CONTROLLER_PORT + 1,
            &second_dir,
            &[&lease[..], &second_args[..]].concat(),
        )
        .unwrap();
    let writer_line = "this replica writes policy status now";
    let writes = |c: &Controller| c.log_lines().iter().filter(|l| l["message"] == writer_line).count();
    wait_for(Duration::from_secs(30), || Ok(writes(&first) + writes(&second) == 1)).unwrap();
    let first_writes = writes(&first) == 1;
    let (mut writer, mut other) = if first_writes { (first, second) } else { (second, first) };
    let (writer_name, other_name) = if first_writes { ("first", "second") } else { ("second", "first") };

    let _server = t.start_server(b, PORT).unwrap();
    let both = format!("https://{CONTROLLER_IP}:{},https://{CONTROLLER_IP}:{}", CONTROLLER_PORT, CONTROLLER_PORT + 1);
    let flags = [&kubelet_flags()[..], &["--controller", &both, "--cert-ttl-seconds", "8"]].concat();
    let agent1 = t.start_agent(n1, &flags).unwrap();
    let agent2 = t.start_agent(n2, &flags).unwrap();
    t.wait_ready(n1).unwrap();
    t.wait_ready(n2).unwrap();
    let to = format!("{}:{PORT}", t.pod(b).ip);
    assert_eq!(echo(&t, a, &to)["ok"], true);

    let status_of = |c: &Controller, name: &str| {
        c.log_lines().iter().any(|l| l["message"] == "policy status written" && l["name"] == name)
    };
    let deny = |name: &str, uid_n: u8| {
        json!({
            "apiVersion": "security.sockmesh.io/v1alpha1", "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": "default", "generation": 1, "uid": uid(uid_n)},
            "spec": {"selector": {"matchLabels": {"app": "b"}}, "action": "DENY", "rules": [{"from": [{"source": {"principals": [A_ID]}}]}]},
        })
    };
    put(&api, "ap-first", &deny("deny-first", 20));
    wait_for(Duration::from_secs(30), || Ok(status_of(&writer, "deny-first"))).unwrap();
    assert!(!status_of(&other, "deny-first"), "both replicas wrote status");
    std::fs::remove_file(api.join("objects/ap-first.json")).unwrap();
    time_until(Duration::from_secs(30), || echo(&t, a, &to)["ok"] == true).expect("the policy's removal never arrived");

    // The writer dies without a word (its Lease is not released): the other takes it over.
    writer.kill();
    wait_for(Duration::from_secs(60), || Ok(writes(&other) == 1)).expect("no replica took the Lease over");
    // Never before the dead writer's Lease ran out (two writers at once), as the Lease's
    // stored writes show (not those refused with a conflict): the other's acquireTime against
    // the writer's last renewTime.
    let lease_writes: Vec<Value> = std::fs::read_to_string(api.join("requests.log"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["stored"].is_u64() && l["path"].as_str().is_some_and(|p| p.contains("/leases")))
        .map(|l| l["object"]["spec"].clone())
        .collect();
    let micros = |s: &Value, field: &str| {
        let t: jiff::Timestamp = s[field].as_str().unwrap_or_else(|| panic!("{field} in {s}")).parse().unwrap();
        t.as_microsecond()
    };
    let last_renewal =
        lease_writes.iter().filter(|s| s["holderIdentity"] == writer_name).map(|s| micros(s, "renewTime")).max();
    let taken =
        lease_writes.iter().filter(|s| s["holderIdentity"] == other_name).map(|s| micros(s, "acquireTime")).min();
    let (last_renewal, taken) = (last_renewal.expect("the writer's renewals"), taken.expect("the takeover"));
    assert!(
        taken - last_renewal >= 3_000_000,
        "taken over {} ms after the last renewal, before the 3 s Lease ran out",
        (taken - last_renewal) / 1000
    );
    println!(
        "the Lease was taken over {} ms after its holder's last renewal (duration 3 s, followers look every 1 s)",
        (taken - last_renewal) / 1000
    );
    put(&api, "ap-second", &deny("deny-second", 21));
    wait_for(Duration::from_secs(30), || Ok(status_of(&other, "deny-second")))
        .expect("the next status was not written");
    time_until(Duration::from_secs(30), || echo(&t, a, &to)["ok"] == false).expect("the DENY never reached the agents");
    // Certificates keep coming (an 8 s lifetime: renewed every few seconds) from the survivor.
    let issued = |a: &Agent| a.log_lines().iter().filter(|l| l["message"] == "certificate issued").count();
    let before = (issued(&agent1), issued(&agent2));
    wait_for(Duration::from_secs(60), || Ok(issued(&agent1) > before.0 && issued(&agent2) > before.1))
        .expect("certificates stopped being issued");
    other.stop();
}

/// Two replicas and a Mesh without `spec.ca`: its root is generated once, by one replica, and
/// kept in a Secret that both read. Agents on different replicas trust each other's
/// certificates, and a replica that comes back with an empty state directory (an `emptyDir`,
/// as in the Deployment) signs under the same root.
#[test]
fn replicas_share_a_generated_mesh_root_through_a_secret() {
    let Kube { mut t, n1, n2, a, b, api, .. } = kube("kube-mesh-root");
    put(
        &api,
        "ns-default",
        &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default", "labels": {"sockmesh.io/mesh": "blue"}}}),
    );
    put(
        &api,
        "mesh-blue",
        &json!({"apiVersion": "security.sockmesh.io/v1alpha1", "kind": "Mesh", "metadata": {"name": "blue", "generation": 1}, "spec": {"trustDomain": "blue.example"}}),
    );
    let kubeconfig = t.start_fake_api(&api).unwrap();
    let dir = t.controller_dir();
    let mut first = t.start_kube_controller(&kubeconfig, &["--lease-holder", "first"]).unwrap();
    let ca: Vec<String> = ["root.pem", "root-key.pem"].iter().map(|f| dir.join(f).display().to_string()).collect();
    let replica = |t: &Topology, port: u16, state: &str, holder: &str| {
        let (metrics, admin) = (format!("0.0.0.0:{}", port + 100), format!("127.0.0.1:{}", port + 200));
        let args = [
            "--ca-cert",
            &ca[0],
            "--ca-key",
            &ca[1],
            "--metrics-addr",
            &metrics,
            "--admin-addr",
            &admin,
            "--lease-holder",
            holder,
        ];
        t.start_kube_controller_replica(&kubeconfig, port, &dir.with_file_name(state), &args).unwrap()
    };
    let mut second = replica(&t, CONTROLLER_PORT + 1, "controller-replica-2", "second");

    // n1's agent asks the first replica, n2's the second.
    let (one, two) = (
        format!("https://{CONTROLLER_IP}:{CONTROLLER_PORT}"),
        format!("https://{CONTROLLER_IP}:{}", CONTROLLER_PORT + 1),
    );
    let flags = |order: String| {
        let f = [&kubelet_flags()[..], &["--controller", &order, "--cert-ttl-seconds", "8"]].concat();
        f.iter().map(|s| s.to_string()).collect::<Vec<String>>()
    };
    let (f1, f2) = (flags(format!("{one},{two}")), flags(format!("{two},{one}")));
    let _server = t.start_server(b, PORT).unwrap();
    let agent1 = t.start_agent(n1, &f1.iter().map(String::as_str).collect::<Vec<_>>()).unwrap();
    let agent2 = t.start_agent(n2, &f2.iter().map(String::as_str).collect::<Vec<_>>()).unwrap();
    t.wait_ready(n1).unwrap();
    t.wait_ready(n2).unwrap();
    let to = format!("{}:{PORT}", t.pod(b).ip);
    let r = echo(&t, a, &to);
    assert_eq!(r["ok"], true, "a and b, with certificates from different replicas: {r}");
    let from_a =
        |l: &Value| l["direction"] == "inbound" && l["src_principal"] == "spiffe://blue.example/ns/default/sa/sa-a";
    wait_for(Duration::from_secs(10), || Ok(agent2.access_log().iter().any(from_a)))
        .expect("n2's agent logged no connection from a's identity in mesh blue");
    let generated = "generated a new root CA for the mesh, kept in a Secret";
    let made = |c: &Controller| c.log_lines().iter().filter(|l| l["message"] == generated).count();
    assert_eq!(made(&first) + made(&second), 1, "the root was generated once");
    let stored = std::fs::read_to_string(api.join("requests.log"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["stored"] == 201 && l["path"].as_str().is_some_and(|p| p.ends_with("/secrets")))
        .count();
    assert_eq!(stored, 1, "Secrets created");

    // The first replica comes back with an empty state directory, and the second goes: both
    // agents' certificates now come from the one that came back, under the Secret's root.
    first.kill();
    let mut back = replica(&t, CONTROLLER_PORT, "controller-replica-1-again", "first-again");
    second.kill();
    let issued = |a: &Agent| a.log_lines().iter().filter(|l| l["message"] == "certificate issued").count();
    let before = (issued(&agent1), issued(&agent2));
    wait_for(Duration::from_secs(60), || Ok(issued(&agent1) > before.0 + 1 && issued(&agent2) > before.1 + 1))
        .expect("no new certificates from the replica that came back");
    assert_eq!(made(&back), 0, "the replica that came back generated a root of its own");
    let r = echo(&t, a, &to);
    assert_eq!(r["ok"], true, "a's certificate from the replica that came back: {r}");
    back.stop();
}

/// A zone's east-west gateway on Kubernetes proves itself with its own service account's
/// projected token (no node credential, no workload record): the controller, in a zone, takes
/// that token as the gateway's and signs the gateway's identity for it and nothing else; the
/// gateway gets its zone's exported endpoints from the push. A gateway asking for a workload's
/// identity with the same token is refused.
#[test]
fn a_zone_gateway_proves_itself_with_its_service_accounts_token_and_gets_only_its_identity() {
    let Kube { mut t, b, api, .. } = kube("kube-gateway");
    // b's Service, exported to the other zones, with its EndpointSlice.
    let b_ip = t.pod(b).ip.to_string();
    put(
        &api,
        "svc-b",
        &json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "b", "namespace": "default", "labels": {"sockmesh.io/export": "true"}},
            "spec": {"clusterIP": "10.96.0.20", "clusterIPs": ["10.96.0.20"], "selector": {"app": "b"}, "ports": [{"port": 80, "targetPort": PORT}]},
        }),
    );
    put(
        &api,
        "es-b",
        &json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "b-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "b"}},
            "addressType": "IPv4", "ports": [{"port": PORT}],
            "endpoints": [{"addresses": [b_ip], "targetRef": {"kind": "Pod", "name": "b"}, "conditions": {"ready": true}}],
        }),
    );
    let kubeconfig = t.start_fake_api(&api).unwrap();
    let gateway_at = format!("{CONTROLLER_IP}:15008");
    let ctl = t.start_kube_controller(&kubeconfig, &["--zone", "east", "--zone-gateway", &gateway_at]).unwrap();
    // The gateway pod's token: its own service account's, bound to its node.
    let tokens = api.join("tokens.json");
    let mut known: Value = serde_json::from_slice(&std::fs::read(&tokens).unwrap()).unwrap();
    known["token-gateway"] = json!({"username": "system:serviceaccount:sockmesh-system:sockmesh-gateway", "node": "n1", "audiences": ["sockmesh-ca"]});
    std::fs::write(&tokens, serde_json::to_vec(&known).unwrap()).unwrap();
    let token = t.dir.join("gateway-token");
    tests::process::write_private(&token, "token-gateway").unwrap();

    let (bundle, token) = (t.trust_bundle().to_string_lossy().into_owned(), token.to_string_lossy().into_owned());
    let controller = format!("https://{CONTROLLER_IP}:15012");
    let cgroup = t.cgroup_root.join("controller");
    let start = |listen: &str, admin: &str, account: &str, log: &str| {
        let args = [
            "--listen",
            listen,
            "--admin-addr",
            admin,
            "--controller",
            &controller,
            "--trust-bundle",
            &bundle,
            "--node-credential-file",
            &token,
            "--service-account",
            account,
        ];
        tests::zones::Gateway::spawn(&t.fabric, &cgroup, &args, t.dir.join(log)).unwrap()
    };
    let gw = start(&gateway_at, "127.0.0.1:15021", "sockmesh-system/sockmesh-gateway", "gateway.log");
    let ready = wait_for(Duration::from_secs(30), || {
        Ok(http_get(&t.fabric, "127.0.0.1:15021", "/ready").is_ok_and(|(s, _)| s == 200))
    });
    assert!(ready.is_ok(), "the gateway never got its identity: {:?}", gw.log_lines());
    let (_, certs) = http_get(&t.fabric, "127.0.0.1:15021", "/certs").unwrap();
    let certs: Vec<String> = serde_json::from_str(&certs).unwrap();
    assert_eq!(certs, [tests::zones::GATEWAY_ID]);
    // Its routes came from the push: b's endpoint, the one exported.
    let routes = time_until(Duration::from_secs(30), || {
        http_get(&t.fabric, "127.0.0.1:15021", "/stats")
            .is_ok_and(|(_, s)| serde_json::from_str::<Value>(&s).is_ok_and(|v| v["routes"] == 1))
    });
    assert!(routes.is_some(), "the gateway never had b's endpoint: {:?}", gw.log_lines());

    // The same token asking for b's identity (whose pod runs on the token's node) is refused.
    let _bad = start(&format!("{CONTROLLER_IP}:15009"), "127.0.0.1:15022", "default/sa-b", "gateway-bad.log");
    let refused = wait_for(Duration::from_secs(30), || {
        Ok(ctl.log_lines().iter().any(|l| {
            l["message"].as_str().is_some_and(|m| m.contains("the zone's gateway may have its own identity only"))
        }))
    });
    assert!(refused.is_ok(), "the controller never refused the gateway a workload's identity");
    assert!(http_get(&t.fabric, "127.0.0.1:15022", "/ready").map_or(true, |(s, _)| s != 200));
    let signed: Vec<Value> = ctl.log_lines().into_iter().filter(|l| l["message"] == "certificate signed").collect();
    assert!(
        !signed.iter().any(|l| l["identity"] == "spiffe://cluster.local/ns/default/sa/sa-b"
            && l["caller"].as_str().is_some_and(|c| c.contains("gateway"))),
        "{signed:?}"
    );
}
