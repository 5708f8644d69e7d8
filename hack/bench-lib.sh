# shellcheck shell=bash
# Shared setup for the hack/bench-*.sh scripts (sourced, bash).
#
# bench_init NAME       root check, Debian packages, release build, temp dir $T, cleanup trap
# bench_registry        docker-registry on 127.0.0.1:<free port> with its own storage → $REG
# bench_critest_images  ../shared/critest-images/build-and-push.sh $REG (pause, busybox, …)
# bench_berthd          berthd on $T/berth (bridge bbench0, 10.99.0.0/16, mirrors → $REG),
#                       started cold (bench_cold: its binaries out of the page cache)
#                       → $BERTH_SOCK $BERTHD_PID; with BENCH_BERTH_METRICS=1 its /metrics
#                       listens on 127.0.0.1:<free port> → $BERTH_METRICS_URL
# bench_containerd      ../shared/baseline/containerd-up.sh $T/containerd $REG, cold too
#                       → $CTRD_SOCK $CTRD_PID
#
# On exit (any exit): every pod and container of both runtimes is stopped and removed, berthd
# is stopped, berth-monitors and containerd shims still alive are killed (by pid; only ours),
# containerd-down.sh runs, the registry is killed, mounts under $T are undone, berth's bridge
# (bbench0) and nftables table (inet berth_bbench0) are deleted, /var/run/nri goes if the
# baseline containerd made it (its NRI socket), the default cgroup parents
# (/k8s.io, /berth) are removed if this run made them and they are empty, so are the cgroup
# trees named with bench_cgroup_tree, and $T is removed.
#
# Knobs (environment): BENCH_TMPDIR=/tmp (must support overlayfs), CONTAINERD=containerd,
#                      CARGO_TARGET_DIR (where the release build goes; default ./target),
#                      BENCH_KEEP_LOGS=DIR (copy the registry and daemon logs there on exit),
#                      BENCH_BERTH_LOG (berthd's RUST_LOG; the scripts set it for step timings),
#                      BENCH_PREBUILT=DIR (berthd, berth-monitor and cri_bench from DIR, no
#                      build: e.g. an older build kept for a before/after comparison)
#
# bench_cri RT OUT SUB ARGS...
#                       runs `cri_bench SUB ARGS...` for runtime RT (berth, containerd) with
#                       its output in OUT; on failure shows that output and fails
# bench_alive RT        fails when RT's daemon has died
#
# bench_steps WHAT      reads berthd's log on stdin and prints, for its debug lines
#                       `WHAT step=S ms=M` (M = ms since that RPC's work began), a table of
#                       each step's p50 of M, p50 of its own time (M minus the previous
#                       step's M) and the first RPC's own time

BENCH_BRIDGE=bbench0
BENCH_POD_CIDR=10.99.0.0/16
BENCH_NFT_TABLE=berth_$BENCH_BRIDGE

bench_init() {
  BENCH_NAME=$1
  cd "$(dirname "$0")/.." || exit 1
  REPO_ROOT=$(pwd)
  BASELINE=${BASELINE:-$REPO_ROOT/../shared/baseline}
  CRITEST_IMAGES=${CRITEST_IMAGES:-$REPO_ROOT/../shared/critest-images}
  [ "$(id -u)" = 0 ] || { echo "$BENCH_NAME: run as root" >&2; exit 1; }

  local pkgs=(runc containernetworking-plugins iptables nftables iproute2
    docker-registry protobuf-compiler busybox-static umoci skopeo gcc python3)
  # Debian's containerd, unless another build is given
  [ -n "${CONTAINERD:-}" ] || pkgs+=(containerd)
  local missing=() p
  for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
  command -v cargo >/dev/null || { echo "cargo (Rust toolchain) is required" >&2; exit 1; }
  if ip link show "$BENCH_BRIDGE" >/dev/null 2>&1; then
    echo "$BENCH_NAME: bridge $BENCH_BRIDGE exists already (another benchmark running?)" >&2
    exit 1
  fi
  if ip link show ctrd0 >/dev/null 2>&1; then
    echo "$BENCH_NAME: bridge ctrd0 exists already (another baseline containerd running?)" >&2
    exit 1
  fi

  if [ -n "${BENCH_PREBUILT:-}" ]; then
    BERTHD=$BENCH_PREBUILT/berthd
    BENCH=$BENCH_PREBUILT/cri_bench
  else
    cargo build --release --bin berthd --bin berth-monitor --example cri_bench
    local target=${CARGO_TARGET_DIR:-$REPO_ROOT/target}
    BERTHD=$target/release/berthd
    BENCH=$target/release/examples/cri_bench
  fi

  T=$(mktemp -d "${BENCH_TMPDIR:-/tmp}/berth-bench.XXXXXX")
  # the runtimes' default cgroup parents (containerd: /k8s.io, berth: /berth): those that do not
  # exist yet are removed on exit if empty (another runtime on this machine may share them)
  BENCH_NEW_CGROUPS=()
  local h n
  for h in /sys/fs/cgroup /sys/fs/cgroup/*/; do
    for n in k8s.io berth; do
      [ -e "${h%/}/$n" ] || BENCH_NEW_CGROUPS+=("${h%/}/$n")
    done
  done
  BENCH_CGROUP_TREES=()
  REG_PID="" BERTHD_PID="" BERTH_SOCK="" CTRD_UP="" CTRD_SOCK="" CTRD_PID="" CTRD_MADE_NRI_DIR=""
  trap bench_cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
}

bench_cleanup() {
  local rc=$? pid f
  set +e
  trap - EXIT INT TERM
  if [ -n "${BENCH_KEEP_LOGS:-}" ]; then
    mkdir -p "$BENCH_KEEP_LOGS"
    cp "$T"/registry.log "$T"/berthd.log "$T"/containerd/containerd.log "$BENCH_KEEP_LOGS"/ 2>/dev/null
  fi
  # pods and containers first, while the daemons still answer
  if [ -n "$BERTHD_PID" ] && kill -0 "$BERTHD_PID" 2>/dev/null; then
    timeout 300 "$BENCH" cleanup --endpoint "unix://$BERTH_SOCK" >&2 ||
      echo "$BENCH_NAME: cleanup of berth's pods failed" >&2
  fi
  if [ -n "$CTRD_PID" ] && kill -0 "$CTRD_PID" 2>/dev/null; then
    timeout 300 "$BENCH" cleanup --endpoint "unix://$CTRD_SOCK" >&2 ||
      echo "$BENCH_NAME: cleanup of containerd's pods failed" >&2
  fi
  if [ -n "$BERTHD_PID" ] && kill -0 "$BERTHD_PID" 2>/dev/null; then
    kill -TERM "$BERTHD_PID"
    for _ in $(seq 100); do kill -0 "$BERTHD_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$BERTHD_PID" 2>/dev/null
    wait "$BERTHD_PID" 2>/dev/null
  fi
  # berth-monitors of pods that could not be removed (each holds a lock on its pid file)
  for f in "$T"/berth/state/pods/*/monitor/monitor.pid; do
    [ -f "$f" ] || continue
    pid=$(cat "$f")
    if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = berth-monitor ]; then
      echo "$BENCH_NAME: killing leftover berth-monitor $pid" >&2
      kill -KILL "$pid"
    fi
  done
  if [ -n "$CTRD_UP" ]; then
    # shims that outlived their pods (containerd-down.sh only stops containerd)
    for pid in $(pgrep -f -- "-address $T/containerd/containerd.sock"); do
      echo "$BENCH_NAME: killing leftover containerd shim $pid" >&2
      kill -KILL "$pid"
    done
    "$BASELINE/containerd-down.sh" "$T/containerd" >/dev/null 2>&1
    # containerd 2's NRI listens on the host-wide /var/run/nri/nri.sock, which it leaves
    [ -n "$CTRD_MADE_NRI_DIR" ] && rm -rf /var/run/nri
  fi
  if [ -n "$REG_PID" ]; then
    kill -TERM "$REG_PID" 2>/dev/null
    wait "$REG_PID" 2>/dev/null
  fi
  grep " $T/" /proc/mounts | awk '{print $2}' | sort -r | xargs -r -n1 umount -l 2>/dev/null
  for f in "${BENCH_NEW_CGROUPS[@]}"; do [ -d "$f" ] && rmdir "$f" 2>/dev/null; done
  for f in "${BENCH_CGROUP_TREES[@]}"; do
    [ -d "$f" ] && find "$f" -depth -type d -exec rmdir {} + 2>/dev/null
  done
  ip link del "$BENCH_BRIDGE" 2>/dev/null
  nft delete table inet "$BENCH_NFT_TABLE" 2>/dev/null
  rm -rf "$T"
  exit "$rc"
}

# bench_cgroup_tree NAME: /NAME in every cgroup hierarchy (a cgroup parent the benchmark
# gives its pods) is removed on exit with everything under it, once empty of processes.
bench_cgroup_tree() {
  local h
  for h in /sys/fs/cgroup /sys/fs/cgroup/*/; do
    [ -e "${h%/}/cgroup.procs" ] && BENCH_CGROUP_TREES+=("${h%/}/$1")
  done
}

bench_fail() {
  echo "$BENCH_NAME: $*" >&2
  local f
  for f in "$T"/registry.log "$T"/berthd.log "$T"/containerd/containerd.log; do
    [ -f "$f" ] && { echo "----- $f (tail) -----" >&2; tail -20 "$f" >&2; }
  done
  exit 1
}

bench_cri() {
  local rt=$1 out=$2 sub=$3
  shift 3
  # Its own temporary files (the floor's bundles and rootfs mounts) in $T: cleaned up with it.
  TMPDIR="$T" "$BENCH" "$sub" "$@" >"$out" || { cat "$out" >&2; bench_fail "$rt: cri_bench $sub failed"; }
}

bench_alive() {
  kill -0 "$([ "$1" = berth ] && echo "$BERTHD_PID" || echo "$CTRD_PID")" 2>/dev/null ||
    bench_fail "$1 daemon died"
}

bench_free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

bench_registry() {
  local port
  port=$(bench_free_port)
  REG=127.0.0.1:$port
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
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
    kill -0 "$REG_PID" 2>/dev/null || bench_fail "docker-registry exited"
    sleep 0.1
  done
  bench_fail "docker-registry does not listen on $REG"
}

bench_critest_images() {
  echo "pushing pause and busybox images to $REG ..." >&2
  "$CRITEST_IMAGES/build-and-push.sh" "$REG" >"$T/push.log" 2>&1 ||
    { tail -20 "$T/push.log" >&2; bench_fail "build-and-push.sh failed"; }
}

bench_berthd() {
  mkdir -p "$T/berth"
  BERTH_SOCK=$T/berth/berth.sock
  local metrics=""
  BERTH_METRICS_URL=""
  if [ -n "${BENCH_BERTH_METRICS:-}" ]; then
    metrics=127.0.0.1:$(bench_free_port)
    # shellcheck disable=SC2034  # for the benchmark scripts
    BERTH_METRICS_URL=http://$metrics/metrics
  fi
  cat >"$T/berth.toml" <<EOF
root = "$T/berth/root"
state = "$T/berth/state"
socket = "$BERTH_SOCK"
[nri]
socket_path = "$T/nri.sock"
[metrics]
address = "$metrics"
[network]
bridge = "$BENCH_BRIDGE"
pod_cidr = "$BENCH_POD_CIDR"
[registries."docker.io"]
mirrors = ["http://$REG"]
[registries."registry.k8s.io"]
mirrors = ["http://$REG"]
[registries."gcr.io"]
mirrors = ["http://$REG"]
[registries."$REG"]
insecure = true
EOF
  bench_cold "$BERTHD" "$(dirname "$BERTHD")/berth-monitor"
  RUST_LOG=${BENCH_BERTH_LOG:-${RUST_LOG:-}} "$BERTHD" --config "$T/berth.toml" >"$T/berthd.log" 2>&1 &
  BERTHD_PID=$!
  for _ in $(seq 100); do
    [ -S "$BERTH_SOCK" ] && return 0
    kill -0 "$BERTHD_PID" 2>/dev/null || bench_fail "berthd exited"
    sleep 0.1
  done
  bench_fail "berthd did not create its socket"
}

bench_containerd() {
  CTRD_UP=1
  [ -e /var/run/nri ] || CTRD_MADE_NRI_DIR=1
  local ctrd
  ctrd=$(command -v "${CONTAINERD:-containerd}") || bench_fail "no containerd binary"
  bench_cold "$ctrd" "$(dirname "$ctrd")/containerd-shim-runc-v2"
  CTRD_SOCK=$("$BASELINE/containerd-up.sh" "$T/containerd" "$REG") || bench_fail "containerd-up.sh failed"
  CTRD_PID=$(cat "$T/containerd/containerd.pid")
  [ "$(cat "/proc/$CTRD_PID/comm" 2>/dev/null)" = containerd ] ||
    bench_fail "pid $CTRD_PID from containerd.pid is not containerd"
}

bench_versions() {
  echo "containerd $("${CONTAINERD:-containerd}" --version 2>/dev/null | awk '{print $3}')," \
    "runc $(runc --version 2>/dev/null | awk 'NR == 1 {print $3}')," \
    "berthd $("$BERTHD" --version 2>/dev/null | awk '{print $2}'), $(nproc) CPUs"
}

# Drops the given executables from the page cache, so that a daemon's code is read from disk
# as at boot. How much of a binary's text ends up resident depends on how its pages entered
# the cache (a file just written or copied is cached in large folios, each mapped whole on
# its first fault); starting cold makes RSS figures comparable between runs and runtimes.
bench_cold() {
  local f
  for f in "$@"; do
    [ -f "$f" ] && dd if="$f" iflag=nocache count=0 status=none
  done
  return 0
}

bench_steps() {
  # tracing's text format: `... rpc{method="M" … container_id="…" | pod_id="…"}: … WHAT
  # step="S" ms=M` (colours stripped); one RPC = one method and id
  sed 's/\x1b\[[0-9;]*m//g' | awk -v what="$1" '
    index($0, what " step=") && / ms=/ {
      s = $0; sub(/.* step=/, "", s)
      if (substr(s, 1, 1) == "\"") { s = substr(s, 2); sub(/".*/, "", s) } else sub(/ .*/, "", s)
      m = $0; sub(/.* ms=/, "", m); sub(/[^0-9.].*/, "", m)
      key = ""
      if (match($0, /method="[A-Za-z]+"/)) key = substr($0, RSTART, RLENGTH)
      if (match($0, /container_id="[0-9a-f]+"/)) key = key substr($0, RSTART, RLENGTH)
      else if (match($0, /pod_id="[0-9a-f]+"/)) key = key substr($0, RSTART, RLENGTH)
      if (!(key in rpc)) { rpc[key] = ++nrpc; prev[key] = 0 }
      if (!(s in n)) order[++ns] = s
      n[s]++; at[s, n[s]] = m; own[s, n[s]] = m - prev[key]
      if (rpc[key] == 1) first[s] = m - prev[key]
      prev[key] = m
    }
    function p50(arr, s, k,   i, j, v, t) {
      for (i = 1; i <= k; i++) v[i] = arr[s, i] + 0
      for (i = 2; i <= k; i++) { t = v[i]; for (j = i - 1; j >= 1 && v[j] > t; j--) v[j + 1] = v[j]; v[j + 1] = t }
      return v[int((k + 1) / 2)]
    }
    END {
      if (!ns) { print "  (no step timings in the log: is berthd at debug level?)"; exit }
      printf "  %-16s %8s %9s %10s %6s\n", "step (ms)", "p50 at", "p50 own", "first own", "n"
      for (i = 1; i <= ns; i++) {
        s = order[i]
        printf "  %-16s %8.2f %9.2f %10.2f %6d\n", s, p50(at, s, n[s]), p50(own, s, n[s]), first[s], n[s]
      }
    }'
}
