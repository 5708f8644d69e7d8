#!/bin/bash
# Cold image pull benchmark: berthd vs Debian's containerd (CRI plugin), side by side, in one run.
#
# As root on Debian. Starts Debian's docker-registry on 127.0.0.1 (temp storage), pushes a
# multi-layer image of random (incompressible) data with gzip layers and an OCI manifest, starts
# berthd and a baseline containerd (../shared/baseline/containerd-up.sh) on temp dirs, and for
# each runtime times PULLS cold PullImage calls (RemoveImage between pulls, waiting until the
# runtime's blobs and snapshots are really gone; the runtimes take turns so drift hits both).
# Prints min/median/max seconds, MB/s (compressed image bytes / median seconds) and the daemon's
# RSS (VmHWM: peak over its whole life, startup included; containerd pulls without its shim).
# Everything it starts or creates is stopped and removed on exit.
#
# The page cache is dropped before every pull (DROP_CACHES=0 keeps it). Ends with the ratio of
# the medians.
# Knobs (environment): PULLS=3 LAYERS=5 TOTAL_MB=100 FILES_PER_LAYER=4 DROP_CACHES=1
#                      BENCH_TMPDIR=/tmp (where the temp dirs go; must support overlayfs)
#                      CONTAINERD=containerd (another build, see containerd-up.sh)
#                      BENCH_KEEP_LOGS=DIR (copy the registry and daemon logs there on exit)
#                      BENCH_PREBUILT=DIR (berthd, berth-monitor and cri_bench from DIR, no build)
#                      PROFILE_DIR=DIR (record berthd with `perf record -g` during each of its
#                        pulls: DIR/berthd.N.perf.data, and DIR/berthd.N.perf.txt, its report
#                        by symbol; needs Debian's linux-perf)
#                      RUST_LOG=berth=debug (berthd's per-layer step timings, in its log)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO_ROOT=$(pwd)
PULLS=${PULLS:-3}
LAYERS=${LAYERS:-5}
TOTAL_MB=${TOTAL_MB:-100}
FILES_PER_LAYER=${FILES_PER_LAYER:-4}
BASELINE=${BASELINE:-$REPO_ROOT/../shared/baseline}

[ "$(id -u)" = 0 ] || { echo "bench-pull.sh: run as root" >&2; exit 1; }

# ----- dependencies -----
pkgs=(containerd runc containernetworking-plugins iptables nftables iproute2 docker-registry protobuf-compiler)
[ -z "${PROFILE_DIR:-}" ] || pkgs+=(linux-perf)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
command -v cargo >/dev/null || { echo "cargo (Rust toolchain) is required" >&2; exit 1; }

if [ -n "${BENCH_PREBUILT:-}" ]; then
  BERTHD=$BENCH_PREBUILT/berthd
  BENCH=$BENCH_PREBUILT/cri_bench
else
  cargo build --release --bin berthd --bin berth-monitor --example cri_bench
  target=${CARGO_TARGET_DIR:-$REPO_ROOT/target}
  BERTHD=$target/release/berthd
  BENCH=$target/release/examples/cri_bench
fi

# berthd's own bridge (not the default berth0, which a real berthd on this host may own)
PULL_BRIDGE=bpull0
if ip link show "$PULL_BRIDGE" >/dev/null 2>&1; then
  echo "bench-pull.sh: bridge $PULL_BRIDGE exists already (another bench-pull.sh running?)" >&2
  exit 1
fi

# ----- temp dirs and cleanup -----
T=$(mktemp -d "${BENCH_TMPDIR:-/tmp}/berth-bench.XXXXXX")
REG_PID= BERTHD_PID= CTRD_UP=
cleanup() {
  local rc=$?
  set +e
  trap - EXIT INT TERM
  if [ -n "${BENCH_KEEP_LOGS:-}" ]; then
    mkdir -p "$BENCH_KEEP_LOGS"
    cp "$T"/registry.log "$T"/berthd.log "$T"/containerd/containerd.log "$BENCH_KEEP_LOGS"/ 2>/dev/null
  fi
  if [ -n "$BERTHD_PID" ] && kill -0 "$BERTHD_PID" 2>/dev/null; then
    kill -TERM "$BERTHD_PID"
    for _ in $(seq 100); do kill -0 "$BERTHD_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$BERTHD_PID" 2>/dev/null
    wait "$BERTHD_PID" 2>/dev/null
  fi
  if [ -n "$CTRD_UP" ]; then
    "$BASELINE/containerd-down.sh" "$T/containerd" >/dev/null 2>&1
  fi
  if [ -n "$REG_PID" ]; then
    kill -TERM "$REG_PID" 2>/dev/null
    wait "$REG_PID" 2>/dev/null
  fi
  grep " $T/" /proc/mounts | awk '{print $2}' | sort -r | xargs -r -n1 umount -l 2>/dev/null
  # berthd's bridge and nftables table (its native network starts with the daemon)
  ip link del "$PULL_BRIDGE" 2>/dev/null
  nft delete table inet "berth_$PULL_BRIDGE" 2>/dev/null
  rm -rf "$T"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

fail() {
  echo "bench-pull.sh: $*" >&2
  for f in "$T"/registry.log "$T"/berthd.log "$T"/containerd/containerd.log; do
    [ -f "$f" ] && { echo "----- $f (tail) -----" >&2; tail -20 "$f" >&2; }
  done
  exit 1
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# ----- registry -----
PORT=$(free_port)
REG=127.0.0.1:$PORT
mkdir -p "$T/registry"
cat >"$T/registry.yml" <<EOF
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $T/registry
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: $REG
  secret: berth-bench
EOF
docker-registry serve "$T/registry.yml" >"$T/registry.log" 2>&1 &
REG_PID=$!
for _ in $(seq 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
  kill -0 "$REG_PID" 2>/dev/null || fail "docker-registry exited"
  sleep 0.1
done
(exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null || fail "docker-registry does not listen on $REG"

echo "pushing a ${LAYERS}-layer ${TOTAL_MB} MB image to $REG ..." >&2
"$BENCH" push-image --registry "$REG" --repo bench/big --tag v1 --layers "$LAYERS" \
  --total-mb "$TOTAL_MB" --files-per-layer "$FILES_PER_LAYER" >"$T/push.out" ||
  fail "push-image failed"
IMAGE=$REG/bench/big:v1
BYTES=$(awk '$1 == "bytes" {print $2}' "$T/push.out")

# ----- berthd -----
mkdir -p "$T/berth"
cat >"$T/berth.toml" <<EOF
root = "$T/berth/root"
state = "$T/berth/state"
socket = "$T/berth/berth.sock"
[nri]
socket_path = "$T/nri.sock"
[metrics]
address = ""
[network]
bridge = "$PULL_BRIDGE"
pod_cidr = "10.97.0.0/16"
[registries."$REG"]
insecure = true
EOF
"$BERTHD" --config "$T/berth.toml" >"$T/berthd.log" 2>&1 &
BERTHD_PID=$!
for _ in $(seq 100); do
  [ -S "$T/berth/berth.sock" ] && break
  kill -0 "$BERTHD_PID" 2>/dev/null || fail "berthd exited"
  sleep 0.1
done
[ -S "$T/berth/berth.sock" ] || fail "berthd did not create its socket"

# ----- containerd -----
CTRD_UP=1
CTRD_SOCK=$("$BASELINE/containerd-up.sh" "$T/containerd" "$REG") || fail "containerd-up.sh failed"
CTRD_PID=$(cat "$T/containerd/containerd.pid")
[ "$(cat "/proc/$CTRD_PID/comm" 2>/dev/null)" = containerd ] ||
  fail "pid $CTRD_PID from containerd.pid is not containerd"
CTRD_ROOT=$T/containerd/root

# name → endpoint, pid, dirs that must be empty for a pull to be cold
declare -A EP PID WAIT
EP[berth]=unix://$T/berth/berth.sock
PID[berth]=$BERTHD_PID
WAIT[berth]="$T/berth/root/content/blobs $T/berth/root/snapshots"
EP[containerd]=unix://$CTRD_SOCK
PID[containerd]=$CTRD_PID
WAIT[containerd]="$CTRD_ROOT/io.containerd.content.v1.content/blobs $CTRD_ROOT/io.containerd.snapshotter.v1.overlayfs/snapshots"
RUNTIMES=(berth containerd)

vm() { awk -v k="$2:" '$1 == k {print $2}' "/proc/$1/status"; }
declare -A IDLE
for rt in "${RUNTIMES[@]}"; do IDLE[$rt]=$(vm "${PID[$rt]}" VmRSS); done

echo "image $IMAGE: $BYTES bytes compressed; $PULLS cold pulls per runtime, taking turns" >&2
for i in $(seq "$PULLS"); do
  for rt in "${RUNTIMES[@]}"; do
    wait_args=()
    for d in ${WAIT[$rt]}; do wait_args+=(--wait-empty "$d"); done
    # Cold: neither the registry's files nor anything of the last pull in the page cache.
    if [ "${DROP_CACHES:-1}" = 1 ]; then sync; echo 3 >/proc/sys/vm/drop_caches; fi
    PERF_PID=
    if [ -n "${PROFILE_DIR:-}" ] && [ "$rt" = berth ]; then
      mkdir -p "$PROFILE_DIR"
      perf record -q -F 1999 -g -p "$BERTHD_PID" -o "$PROFILE_DIR/berthd.$i.perf.data" \
        >/dev/null 2>&1 &
      PERF_PID=$!
      sleep 0.3
    fi
    "$BENCH" pull --endpoint "${EP[$rt]}" --image "$IMAGE" --repeat 1 --remove-between \
      "${wait_args[@]}" >"$T/pull.out" 2>"$T/pull.err" ||
      { cat "$T/pull.err" >&2; fail "$rt: pull $i failed"; }
    if [ -n "$PERF_PID" ]; then
      kill -INT "$PERF_PID"
      wait "$PERF_PID" || true
      { perf report -i "$PROFILE_DIR/berthd.$i.perf.data" --stdio --no-children -g none \
        --percent-limit 0.5 --sort dso,symbol 2>/dev/null || true; } \
        >"$PROFILE_DIR/berthd.$i.perf.txt"
    fi
    read -r secs disk < <(awk '$1 == "pull" {print $3, $4}' "$T/pull.out")
    echo "$secs" >>"$T/times.$rt"
    echo "$disk" >"$T/disk.$rt"
    echo "  $rt pull $i: ${secs}s, $((disk / 1000000)) MB of blobs+snapshots on disk;" \
      "$(grep -o 'content in [0-9.]*s' "$T/pull.err" | tail -1 | sed 's/content in/removed with its content in/')" >&2
    kill -0 "${PID[$rt]}" 2>/dev/null || fail "$rt daemon died"
  done
done

echo
printf '%-11s %5s %9s %9s %9s %8s %12s %12s %8s\n' runtime pulls min_s median_s max_s MB/s peak_RSS_MB idle_RSS_MB disk_MB
for rt in "${RUNTIMES[@]}"; do
  hwm=$(vm "${PID[$rt]}" VmHWM)
  sort -g "$T/times.$rt" | awk -v rt="$rt" -v bytes="$BYTES" -v hwm="$hwm" -v idle="${IDLE[$rt]}" \
    -v disk="$(cat "$T/disk.$rt")" '
    { t[NR] = $1 }
    END {
      med = (NR % 2) ? t[(NR + 1) / 2] : (t[NR / 2] + t[NR / 2 + 1]) / 2
      printf "%-11s %5d %9.3f %9.3f %9.3f %8.1f %12.1f %12.1f %8.1f\n", rt, NR, t[1], med, t[NR],
        bytes / 1e6 / med, hwm / 1024, idle / 1024, disk / 1e6
    }'
done
median() { sort -g "$1" | awk '{ t[NR] = $1 } END { print (NR % 2) ? t[(NR + 1) / 2] : (t[NR / 2] + t[NR / 2 + 1]) / 2 }'; }
awk -v b="$(median "$T/times.berth")" -v c="$(median "$T/times.containerd")" \
  'BEGIN { printf "berth median / containerd median = %.2f\n", b / c }'
echo "(image: $LAYERS gzip layers, $TOTAL_MB MB random data, $BYTES bytes compressed; MB/s = compressed MB / median s;"
echo " peak RSS = VmHWM of the daemon over its life, idle RSS = VmRSS before the first pull;
 disk = bytes of blobs + unpacked snapshots right after a pull, all gone before the next;"
echo " containerd $("${CONTAINERD:-containerd}" --version 2>/dev/null | awk '{print $3}'), berthd $("$BERTHD" --version 2>/dev/null | awk '{print $2}'))"
