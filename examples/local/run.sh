#!/usr/bin/env bash
# A sockmesh mesh built by hand: one controller, two nodes, three workloads, mutual TLS between
# nodes, an ALLOW, a DENY and STRICT. Network namespaces stand in for hosts and pods here; on
# real hosts each "host" step is done on that host, and the workloads already exist.
#
# Run as root from a checkout after `cargo xtask build` (or set SOCKMESH_BIN to where
# mesh-controller, mesh-agent and meshctl are). It prints every command before it runs it,
# checks what a user would check, and removes everything it made when it ends
# (SOCKMESH_EXAMPLE_KEEP=1 keeps the mesh running until you press Enter).
#
# `cargo xtask test` runs this script and the README quotes it, so neither can drift from the
# binaries.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
BIN=${SOCKMESH_BIN:-$HERE/../../target/release}
export PATH="$BIN:$PATH"
P=${SOCKMESH_EXAMPLE_PREFIX:-smx-}          # names of everything this script creates
CG=$(findmnt -n -o TARGET -t cgroup2 | head -n1 || true)
PIDS=()
FAILED=0

step() { printf '\n==> %s\n' "$*"; }
# Commands are printed on stderr, so that $(...) captures only what they print.
run() { printf '  $ %s\n' "$*" >&2; "$@"; }
# Runs a command on a "host": in its network namespace only (never `ip netns exec`, which
# remounts /sys and hides the host's cgroup and bpffs mounts from the command).
on() { local host=$1; shift; printf '  [%s] $ %s\n' "$host" "$*" >&2; nsenter --net="/run/netns/$P$host" -- "$@"; }
# Starts a long-running command on a host, its output in a log file. nsenter execs the command,
# so the PID kept for the cleanup is the command's own.
start() {
  local host=$1 log=$2; shift 2
  printf '  [%s] $ %s &   # log: %s\n' "$host" "$*" "$log" >&2
  nsenter --net="/run/netns/$P$host" -- "$@" >"$log" 2>&1 &
  PIDS+=($!)
}
expect() { if [ "$1" = "$2" ]; then echo "  ok: $3"; else echo "  FAILED: $3 (got $1, wanted $2)"; FAILED=1; fi; }

cleanup() {
  set +e
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null; done   # gone before their pins go
  for n in n1 n2; do mesh-agent uninstall --bpffs-dir "/sys/fs/bpf/$P$n" >/dev/null 2>&1; done
  for ns in n1 n2 client intruder web; do ip netns del "$P$ns" 2>/dev/null; done
  for d in n1/client n1/intruder n2/web n1 n2; do rmdir "$CG/$P$d" 2>/dev/null; done
  rm -rf "$WORK"
}
[ "$(id -u)" = 0 ] || { echo "run as root: the agent loads eBPF programs"; exit 1; }
for b in mesh-controller mesh-agent meshctl; do
  command -v $b >/dev/null || { echo "$b not found in $BIN: run \`cargo xtask build\` or set SOCKMESH_BIN"; exit 1; }
done
[ -n "$CG" ] || { echo "no cgroup v2 mount found: mount one first"; exit 1; }
# The cleanup removes what carries the prefix: never start over another run's mesh.
for f in /run/netns/${P}{n1,n2,client,intruder,web} "$CG/${P}n1" "$CG/${P}n2" /sys/fs/bpf/${P}{n1,n2}; do
  if [ -e "$f" ]; then
    echo "$f exists (another run of this example?): stop that run first, or set SOCKMESH_EXAMPLE_PREFIX"
    exit 1
  fi
done
WORK=$(mktemp -d /tmp/sockmesh-example.XXXXXX)
trap cleanup EXIT

step "1. Two hosts, n1 (10.99.0.1) and n2 (10.99.0.2), on one link"
for n in n1 n2; do run ip netns add "$P$n"; run ip -n "$P$n" link set lo up; done
run ip link add "${P}link1" netns "${P}n1" type veth peer name "${P}link2" netns "${P}n2"
run ip -n "${P}n1" addr add 10.99.0.1/24 dev "${P}link1"
run ip -n "${P}n2" addr add 10.99.0.2/24 dev "${P}link2"
run ip -n "${P}n1" link set "${P}link1" up
run ip -n "${P}n2" link set "${P}link2" up

step "2. Workloads (pods): a network namespace and a cgroup each, behind a bridge on their host"
# pod HOST NAME ADDRESS: a veth from the host's bridge (named after the address) to the pod.
pod() {
  local host=$1 name=$2 ip=$3 veth="${P}v${3##*.}"
  run ip netns add "$P$name"
  run ip -n "$P$host" link add "$veth" type veth peer name eth0 netns "$P$name"
  run ip -n "$P$host" link set "$veth" master br0 up
  run ip -n "$P$name" link set lo up
  run ip -n "$P$name" addr add "$ip/24" dev eth0
  run ip -n "$P$name" link set eth0 up
  run ip -n "$P$name" route add default via "${ip%.*}.1"
  run mkdir -p "$CG/$P$host/$name"
}
for h in 1 2; do
  run ip -n "${P}n$h" link add br0 type bridge
  run ip -n "${P}n$h" addr add "10.20.$h.1/24" dev br0
  run ip -n "${P}n$h" link set br0 up
  run ip -n "${P}n$h" route add "10.20.$((3 - h)).0/24" via "10.99.0.$((3 - h))"
  on "n$h" sysctl -qw net.ipv4.ip_forward=1
done
pod n1 client 10.20.1.10
pod n1 intruder 10.20.1.11
pod n2 web 10.20.2.10

step "3. The controller (on n1): one credential per node, then the CA and the configuration"
mkdir -p "$WORK/controller" "$WORK/n1" "$WORK/n2"
run mesh-controller node add n1 --node-credentials "$WORK/controller/nodes.yaml" --out "$WORK/n1/node.credential"
run mesh-controller node add n2 --node-credentials "$WORK/controller/nodes.yaml" --out "$WORK/n2/node.credential"
echo "  the configuration: workloads, an ALLOW, a DENY and STRICT ($HERE/config)"
start n1 "$WORK/controller.log" \
  mesh-controller --listen 10.99.0.1:15012 --state-dir "$WORK/controller" \
  --config-dir "$HERE/config" --node-credentials "$WORK/controller/nodes.yaml" \
  --admin-addr 127.0.0.1:15015
for _ in $(seq 100); do [ -f "$WORK/controller/trust-bundle.pem" ] && break; sleep 0.2; done
echo "  the trust bundle agents need: $WORK/controller/trust-bundle.pem (copy it to each host)"

step "4. One agent per host (each its own bpffs directory and cgroup root)"
# Each agent's --workloads file: the controller's documents for the workloads of its host, plus
# where their kernel objects are. The controller decides identity and placement; the agent only
# captures, and a workload the controller does not place on its host gets no certificate.
# local_workload NAME HOST ADDRESS: the document config/workloads.yaml has for NAME (its
# service account and app label are its name), plus its netns and cgroup on HOST.
local_workload() {
  cat <<EOF
kind: Workload
name: $1
namespace: default
serviceAccount: $1
labels: {app: $1}
ips: [$3]
node: $2
netns: /run/netns/$P$1
cgroup: $CG/$P$2/$1
EOF
}
{ local_workload client n1 10.20.1.10; echo ---; local_workload intruder n1 10.20.1.11; } >"$WORK/n1/workloads.yaml"
local_workload web n2 10.20.2.10 >"$WORK/n2/workloads.yaml"
for n in n1 n2; do
  echo "  $WORK/$n/workloads.yaml:"; sed 's/^/    /' "$WORK/$n/workloads.yaml"
  start $n "$WORK/$n/agent.log" \
    mesh-agent run --node $n --cgroup-root "$CG/$P$n" --bpffs-dir "/sys/fs/bpf/$P$n" \
    --state-dir "$WORK/$n/state" --workloads "$WORK/$n/workloads.yaml" --mesh-cidr 10.20.0.0/16 \
    --controller https://10.99.0.1:15012 --trust-bundle "$WORK/controller/trust-bundle.pem" \
    --node-credential-file "$WORK/$n/node.credential"
done

step "5. Wait until both nodes are healthy (programs attached, certificates, configuration)"
for n in n1 n2; do
  ok=0
  for _ in $(seq 300); do
    if nsenter --net="/run/netns/$P$n" -- meshctl check >/dev/null 2>&1; then ok=1; break; fi
    sleep 0.2
  done
  on $n meshctl check || true
  expect $ok 1 "meshctl check is green on $n"
done

step "6. web serves HTTP on 8080, run as part of the workload (its netns and its cgroup)"
start n2 "$WORK/web.log" meshctl exec default/web -- python3 -m http.server 8080 --bind 0.0.0.0
for _ in $(seq 100); do nsenter --net="/run/netns/${P}web" -- ss -Hltn 'sport = :8080' | grep -q . && break; sleep 0.1; done

step "7. client -> web across nodes: through both agents, in mutual TLS"
code=$(on n1 meshctl exec default/client -- curl -sS -o /dev/null -w '%{http_code}' --max-time 10 http://10.20.2.10:8080/ || true)
expect "$code" 200 "client got HTTP $code from web"
sleep 1   # the access-log line is written when the connection closes
grep -m1 'src_workload="\?default/client' "$WORK/n2/agent.log" | sed 's/^/  n2 log: /' || true
grep -q 'src_principal="\?spiffe://cluster.local/ns/default/sa/client.*connection_security_policy="\?mutual_tls' "$WORK/n2/agent.log" \
  && echo "  ok: n2's agent saw the client's identity over mutual TLS" \
  || { echo "  FAILED: no mutual-TLS connection from client in n2's log"; FAILED=1; }

step "8. intruder -> web: denied by deny-intruder (the TCP connect succeeds, then it is reset)"
code=$(on n1 meshctl exec default/intruder -- curl -sS -o /dev/null -w '%{http_code}' --max-time 10 http://10.20.2.10:8080/ || true)
expect "$code" 000 "intruder got no HTTP answer"
sleep 1
grep -m1 'src_workload="\?default/intruder.*deny-intruder' "$WORK/n2/agent.log" | sed 's/^/  n2 log: /' || { echo "  FAILED: no denial in n2's log"; FAILED=1; }

step "9. A process in client's network namespace but not its cgroup is not meshed: plaintext, refused by STRICT"
code=$(on client curl -sS -o /dev/null -w '%{http_code}' --max-time 10 http://10.20.2.10:8080/ || true)
expect "$code" 000 "plaintext to web got no HTTP answer"
sleep 1
grep -m1 'src_addr=10.20.1.10.*mtls_strict' "$WORK/n2/agent.log" | sed 's/^/  n2 log: /' || { echo "  FAILED: no STRICT refusal in n2's log"; FAILED=1; }

step "10. What the nodes say"
on n2 meshctl policies
on n1 meshctl certs

if [ "${SOCKMESH_EXAMPLE_KEEP:-}" = 1 ]; then
  echo; echo "The mesh is running. Try: nsenter --net=/run/netns/${P}n1 meshctl exec default/client -- curl http://10.20.2.10:8080/"
  read -r -p "Press Enter to tear it down. " _
fi
if [ $FAILED = 0 ]; then
  echo; echo "example: every check passed"
else
  for f in controller.log n1/agent.log n2/agent.log web.log; do echo "--- $f"; tail -n 30 "$WORK/$f"; done
  echo; echo "example: FAILED"
fi
exit $FAILED
