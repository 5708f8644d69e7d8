#!/bin/bash
# Runs critest (kubernetes-sigs/cri-tools' CRI validation suite) against a private berthd.
#
# Builds berthd and berth-monitor (debug: `cargo build`), writes a berth config in a temp dir
# (root, state and socket inside it; bridge berthct0, pod CIDR 10.231.0.0/16, metrics off;
# docker.io, gcr.io, registry.k8s.io, k8s.gcr.io and public.ecr.aws mirrored to REGISTRY over
# plain HTTP), starts `berthd --config`, waits for its socket and runs
#   critest -runtime-endpoint unix://SOCK -image-endpoint unix://SOCK "$@"
# with its output also saved to $CRITEST_LOGDIR/critest.log (berthd's log: berthd.log there).
# On exit (any exit): every pod is removed (`crictl rmp -fa`), berthd gets SIGTERM and is waited
# for, berth-monitors it left behind are killed (by pid, only ours), mounts under the temp dir are
# undone (`umount -R`, best effort), the bridge berthct0 and nftables table inet berth_berthct0
# are deleted and the temp dir is removed. The exit status is critest's.
#
# Usage: hack/critest.sh [critest args...]   e.g. hack/critest.sh -ginkgo.focus="PodSandbox"
#                                                 hack/critest.sh -parallel 2
# Needs root, and beforehand:
#   ../shared/peers/build.sh cri-tools GITDIR /work/peers/cri-tools   (crictl, critest, ginkgo)
#   a registry at REGISTRY filled by ../shared/critest-images/build-and-push.sh REGISTRY
# Environment:
#   CRITEST_BIN=/work/peers/cri-tools    dir with critest, crictl, ginkgo (put first on PATH:
#                                        critest -parallel N runs `ginkgo`)
#   REGISTRY=127.0.0.1:5000              the local registry the mirrors point at
#   CRITEST_LOGDIR=target/critest        where critest.log and berthd.log are kept
#   CRITEST_TMPDIR=/tmp                  parent of the temp dir (must support overlayfs)
#   CRITEST_NO_BUILD=1                   skip `cargo build`, use the binaries already built
#   CARGO_TARGET_DIR                     honoured for the binaries' location
set -euo pipefail

cd "$(dirname "$0")/.."
REPO_ROOT=$(pwd)
CRITEST_BIN=$(cd "${CRITEST_BIN:-/work/peers/cri-tools}" && pwd)
REGISTRY=${REGISTRY:-127.0.0.1:5000}
LOGDIR=${CRITEST_LOGDIR:-$REPO_ROOT/target/critest}
BRIDGE=berthct0
POD_CIDR=10.231.0.0/16
NFT_TABLE=berth_$BRIDGE

die() { echo "critest.sh: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root"
for b in critest crictl ginkgo; do
  [ -x "$CRITEST_BIN/$b" ] || die "$CRITEST_BIN/$b missing (build it with ../shared/peers/build.sh cri-tools)"
done
export PATH=$CRITEST_BIN:$PATH
if ! curl -fsS -o /dev/null "http://$REGISTRY/v2/" 2>/dev/null; then
  die "no registry answers at http://$REGISTRY/v2/ (start docker-registry, fill it with ../shared/critest-images/build-and-push.sh $REGISTRY)"
fi
if ip link show "$BRIDGE" >/dev/null 2>&1; then
  die "bridge $BRIDGE exists already (another critest run?)"
fi

hack/deps.sh run
if [ -z "${CRITEST_NO_BUILD:-}" ]; then
  cargo build --bin berthd --bin berth-monitor
fi
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO_ROOT/target}
BERTHD=$TARGET_DIR/debug/berthd
[ -x "$BERTHD" ] && [ -x "$TARGET_DIR/debug/berth-monitor" ] || die "no $BERTHD or berth-monitor next to it"

mkdir -p "$LOGDIR"
LOGDIR=$(cd "$LOGDIR" && pwd)
T=$(mktemp -d "${CRITEST_TMPDIR:-/tmp}/berth-critest.XXXXXX")
SOCK=$T/berth/berth.sock
BERTHD_PID=""

cleanup() {
  local rc=$? f pid
  set +e
  trap - EXIT INT TERM
  if [ -n "$BERTHD_PID" ] && kill -0 "$BERTHD_PID" 2>/dev/null; then
    timeout 300 crictl -r "unix://$SOCK" -i "unix://$SOCK" --timeout 60s rmp -fa >&2 ||
      echo "critest.sh: removing berth's pods failed" >&2
    kill -TERM "$BERTHD_PID"
    for _ in $(seq 300); do kill -0 "$BERTHD_PID" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$BERTHD_PID" 2>/dev/null; then
      echo "critest.sh: berthd did not exit within 30s of SIGTERM, killing it" >&2
      kill -KILL "$BERTHD_PID"
    fi
    wait "$BERTHD_PID" 2>/dev/null
  fi
  # berth-monitors of pods that could not be removed (each holds a lock on its pid file)
  for f in "$T"/berth/state/pods/*/monitor/monitor.pid; do
    [ -f "$f" ] || continue
    pid=$(cat "$f")
    if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = berth-monitor ]; then
      echo "critest.sh: killing leftover berth-monitor $pid" >&2
      kill -KILL "$pid"
    fi
  done
  [ -f "$T/berthd.log" ] && cp "$T/berthd.log" "$LOGDIR/berthd.log"
  # containers the pod removal left (the OCI runtimes' state under $T), killed and deleted
  for rt_dir in "$T"/berth/state/runtime/*; do
    [ -d "$rt_dir" ] || continue
    rt=$(basename "$rt_dir")
    command -v "$rt" >/dev/null || continue
    for id in $("$rt" --root "$rt_dir" list -q 2>/dev/null); do
      "$rt" --root "$rt_dir" delete --force "$id" >/dev/null 2>&1
    done
  done
  # mounts under $T, deepest first; a lazy unmount for whatever is still busy
  grep -F " $T/" /proc/mounts | awk '{print $2}' | sort -r | while read -r f; do
    umount -R "$f" 2>/dev/null || umount -R -l "$f" 2>/dev/null
  done
  # the default cgroup parent of containers whose pods named none, once empty
  for d in /sys/fs/cgroup/*/berth /sys/fs/cgroup/berth; do
    [ -d "$d" ] && rmdir "$d" 2>/dev/null
  done
  ip link del "$BRIDGE" 2>/dev/null
  nft delete table inet "$NFT_TABLE" 2>/dev/null
  # never through a mount that is still there (a bind of a host path)
  rm -rf --one-file-system "$T" || echo "critest.sh: could not remove $T completely" >&2
  [ -f "$LOGDIR/critest.log" ] && echo "critest.sh: logs in $LOGDIR (critest.log, berthd.log)" >&2
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

mkdir -p "$T/berth"
{
  cat <<EOF
root = "$T/berth/root"
state = "$T/berth/state"
socket = "$SOCK"

[network]
bridge = "$BRIDGE"
pod_cidr = "$POD_CIDR"

[metrics]
address = ""

# critest's NRI specs connect their plugins here (-nri-socket). Their Synchronize hook is
# held open for 2 s on purpose, which NRI's default 2 s request timeout would cut.
[nri]
socket_path = "$T/nri.sock"
plugin_request_timeout = "10s"

# the mirror itself: plain HTTP (unverified TLS) allowed
[registries."$REGISTRY"]
insecure = true
EOF
  for r in docker.io gcr.io registry.k8s.io k8s.gcr.io public.ecr.aws; do
    printf '\n[registries."%s"]\nmirrors = ["http://%s"]\n' "$r" "$REGISTRY"
  done
} >"$T/berth.toml"

"$BERTHD" --config "$T/berth.toml" >"$T/berthd.log" 2>&1 &
BERTHD_PID=$!
for _ in $(seq 300); do
  [ -S "$SOCK" ] && break
  kill -0 "$BERTHD_PID" 2>/dev/null || { tail -20 "$T/berthd.log" >&2; die "berthd exited"; }
  sleep 0.1
done
[ -S "$SOCK" ] || { tail -20 "$T/berthd.log" >&2; die "berthd did not create $SOCK within 30s"; }
echo "critest.sh: berthd $BERTHD_PID on $SOCK (config $T/berth.toml), critest $*" >&2

color=(); [ -t 1 ] || color=(-ginkgo.no-color)   # a plain log when not on a terminal
critest -runtime-endpoint "unix://$SOCK" -image-endpoint "unix://$SOCK" -nri-socket "$T/nri.sock" "${color[@]}" "$@" 2>&1 |
  tee "$LOGDIR/critest.log"
