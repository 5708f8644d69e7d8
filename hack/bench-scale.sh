#!/bin/bash
# Scale benchmark: do berth's costs stay flat as the node fills? berthd vs containerd, side by
# side (Debian's docker-registry on 127.0.0.1, berthd and a baseline containerd as in
# hack/bench-lib.sh).
#
# For each runtime in turn (cri_bench scale): the node is filled, untimed, with pods that each
# run one container (IMAGE, `sleep 3600`), up to each of LEVELS pods; at each level PROBES
# pods are run one at a time (RunPodSandbox timed) and each gets a container
# (CreateContainer timed), then ListContainers and ContainerStatus are timed PROBES times,
# the probe pods are stopped and removed (StopPodSandbox + RemovePodSandbox timed, with their
# container) and the daemon's VmRSS is read. Prints p50/p95 per level.
# The floor (berth's run only, RUNC_FLOOR=1): after each probe, the OCI spec berth wrote for
# the level's first probe is run by bare runc with an overlay rootfs of its own (mount +
# `runc create`, then start, kill, delete), on the same node: the part of CreateContainer
# that any runtime pays, and berth's CreateContainer over it, paired per probe.
# Everything it starts or creates is stopped and removed on exit (see hack/bench-lib.sh).
#
# Knobs (environment): LEVELS=0,10,100,250 PROBES=20 RUNC_FLOOR=1
#                      IMAGE=registry.k8s.io/e2e-test-images/busybox:1.29-2,
#                      BERTH_ONLY=1 (no containerd), and those of bench-lib.sh.
set -euo pipefail
LEVELS=${LEVELS:-0,10,100,250}
PROBES=${PROBES:-20}
RUNC_FLOOR=${RUNC_FLOOR:-1}
IMAGE=${IMAGE:-registry.k8s.io/e2e-test-images/busybox:1.29-2}
# shellcheck source=hack/bench-lib.sh
. "$(dirname "$0")/bench-lib.sh"
BENCH_BERTH_LOG=${BENCH_BERTH_LOG:-info,berth=debug}
bench_init bench-scale.sh
[ "$RUNC_FLOOR" = 1 ] && bench_cgroup_tree berth-bench-runc
bench_registry
bench_critest_images
bench_berthd
[ -n "${BERTH_ONLY:-}" ] || bench_containerd

PAUSE=registry.k8s.io/pause:3.9
declare -A ARGS
ARGS[berth]="--endpoint unix://$BERTH_SOCK --daemon-pid $BERTHD_PID"
[ "$RUNC_FLOOR" = 1 ] && ARGS[berth]+=" --runc-floor $T/berth/state"
ARGS[containerd]="--endpoint unix://${CTRD_SOCK:-} --daemon-pid ${CTRD_PID:-0} --pause-image $PAUSE"
RUNTIMES=(berth)
[ -n "${BERTH_ONLY:-}" ] || RUNTIMES+=(containerd)
for rt in "${RUNTIMES[@]}"; do
  echo "$rt: levels $LEVELS, $PROBES probes each ..." >&2
  # shellcheck disable=SC2086
  bench_cri "$rt" "$T/out.$rt" scale ${ARGS[$rt]} --levels "$LEVELS" --probes "$PROBES" \
    --image "$IMAGE"
  bench_alive "$rt"
done

echo
printf '%-11s %6s  %-17s  %-17s  %-17s  %-17s  %-17s  %10s\n' "" "" "RunPodSandbox" \
  "CreateContainer" "ListContainers" "ContainerStatus" "Stop+RemovePod" "daemon RSS"
printf '%-11s %6s  %8s %8s  %8s %8s  %8s %8s  %8s %8s  %8s %8s  %10s\n' runtime pods p50 p95 \
  p50 p95 p50 p95 p50 p95 p50 p95 "(MiB)"
for rt in "${RUNTIMES[@]}"; do
  awk -v rt="$rt" '
    $1 == "lat" { split($2, a, "@"); l = a[2]; if (!(l in seen)) { seen[l] = 1; order[++n] = l }
                  p50[a[1], l] = $5; p95[a[1], l] = $6 }
    $1 == "rss" && $2 == "daemon" { l = $3; sub(/pods$/, "", l); rss[l] = $5 }
    END {
      for (i = 1; i <= n; i++) {
        l = order[i]
        printf "%-11s %6s  %8.2f %8.2f  %8.2f %8.2f  %8.2f %8.2f  %8.2f %8.2f  %8.2f %8.2f  %10.1f\n",
          rt, l, p50["run", l], p95["run", l], p50["create", l], p95["create", l],
          p50["list", l], p95["list", l], p50["status", l], p95["status", l],
          p50["remove", l], p95["remove", l], rss[l] / 1024
      }
    }' "$T/out.$rt"
done
echo "(ms, nearest-rank over $PROBES probes per level, one at a time; pods = filler pods, each"
echo " running one container ($IMAGE, sleep 3600); daemon RSS after the probes were removed;"
echo " $(bench_versions))"

if grep -q '^lat floor@' "$T/out.berth"; then
  echo
  echo "CreateContainer against the floor (bare runc: an overlay mount + runc create of the spec"
  echo "berth wrote, run right after each probe; over = berth - floor, paired per probe):"
  printf '%6s  %-17s  %-17s  %-17s\n' "" "berth" "floor" "over, paired"
  printf '%6s  %8s %8s  %8s %8s  %8s %8s\n' pods p50 p95 p50 p95 p50 p95
  awk '
    $1 == "lat" { split($2, a, "@"); l = a[2]; if (!(l in seen)) { seen[l] = 1; order[++n] = l }
                  p50[a[1], l] = $5; p95[a[1], l] = $6 }
    END {
      for (i = 1; i <= n; i++) {
        l = order[i]
        printf "%6s  %8.2f %8.2f  %8.2f %8.2f  %+8.2f %+8.2f\n", l, p50["create", l],
          p95["create", l], p50["floor", l], p95["floor", l], p50["over", l], p95["over", l]
      }
    }' "$T/out.berth"
fi

# berthd's own steps of the probes' RunPodSandbox and CreateContainer at each level (from its
# debug log, between the instants cri_bench printed): which step grows as the node fills.
while read -r _ level begin end; do
  echo
  echo "berth steps with $level filler pods:"
  sed 's/\x1b\[[0-9;]*m//g' "$T/berthd.log" | awk -v b="$begin" -v e="$end" '$1 >= b && $1 <= e' >"$T/window.log"
  bench_steps "pod creation" <"$T/window.log"
  bench_steps "container creation" <"$T/window.log"
done < <(grep '^window ' "$T/out.berth")
