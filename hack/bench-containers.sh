#!/bin/bash
# Container benchmark: berthd vs Debian's containerd (CRI plugin), side by side, same runc.
#
# As root on Debian. Starts Debian's docker-registry on 127.0.0.1 (temp storage) and fills it
# with ../shared/critest-images/build-and-push.sh (busybox, pause), starts berthd and a baseline
# containerd (../shared/baseline/containerd-up.sh), and for each runtime in turn
# (cri_bench containers), in one pod with a log directory:
#   - CreateContainer+StartContainer of COUNT containers (IMAGE, `sleep 3600`), one at a time;
#   - StopContainer (timeout 0) + RemoveContainer of each, one at a time;
#   - the per-pod helper's memory with 0, 1, 10 and COUNT containers: berth-monitor (one per
#     pod, started with the pod's first container) vs containerd-shim-runc-v2 (one per pod,
#     started with the pod; it also parents the pause container, not counted here);
#   - the floor (berth's run only, RUNC_FLOOR=1): the OCI spec berth wrote for the first
#     container is run by bare runc after each of berth's containers (create, start, kill 9 +
#     wait, delete; own bundle, cgroup and runc root each time), so that both see the same
#     node: what no runtime can beat; and again with a rootfs of its own per copy
#     ("runc+mount": the same overlay lower dirs, a new upper and work dir, mounted volatile
#     before the create), the work any runtime whose image is an overlay does before runc;
#     berth's Create+Start over each floor, paired per container (p50 of the differences);
#     each copy, and berth's next container, starts after a 100 ms pause (no copy's teardown
#     lands on the next measurement);
#   - berth's own steps (its debug log, STEPS=1): p50 of each CreateContainer step.
# Images are pulled before anything is timed. Prints p50/p95/max latency and VmRSS (Pss).
# Everything it starts or creates is stopped and removed on exit (see hack/bench-lib.sh).
#
# Knobs (environment): COUNT=100 IMAGE=registry.k8s.io/e2e-test-images/busybox:1.29-2
#                      PID_MODE=container RUNC_FLOOR=1 STEPS=1, BERTH_ONLY=1 (no containerd),
#                      and those of bench-lib.sh.
set -euo pipefail
COUNT=${COUNT:-100}
IMAGE=${IMAGE:-registry.k8s.io/e2e-test-images/busybox:1.29-2}
PID_MODE=${PID_MODE:-container}
RUNC_FLOOR=${RUNC_FLOOR:-1}
STEPS=${STEPS:-1}
# berth's step timings are at debug level
[ "$STEPS" = 1 ] && export BENCH_BERTH_LOG=${BENCH_BERTH_LOG:-info,berth=debug}
# shellcheck source=hack/bench-lib.sh
. "$(dirname "$0")/bench-lib.sh"
bench_init bench-containers.sh
bench_cgroup_tree berth-bench-runc
bench_registry
bench_critest_images
bench_berthd
[ -n "${BERTH_ONLY:-}" ] || bench_containerd

PAUSE=registry.k8s.io/pause:3.9
declare -A ARGS
ARGS[berth]="--endpoint unix://$BERTH_SOCK --daemon-pid $BERTHD_PID --helper-comm berth-monitor"
[ "$RUNC_FLOOR" = 1 ] && ARGS[berth]+=" --runc-floor $T/berth/state"
ARGS[containerd]="--endpoint unix://$CTRD_SOCK --daemon-pid $CTRD_PID --helper-comm containerd-shim --pause-image $PAUSE"
RUNTIMES=(berth)
[ -n "${BERTH_ONLY:-}" ] || RUNTIMES+=(containerd)
for rt in "${RUNTIMES[@]}"; do
  echo "$rt: $COUNT containers in one pod ..." >&2
  mkdir -p "$T/logs/$rt"
  # shellcheck disable=SC2086
  bench_cri "$rt" "$T/out.$rt" containers ${ARGS[$rt]} --count "$COUNT" --image "$IMAGE" \
    --command "sleep 3600" --log-dir "$T/logs/$rt" --pid-mode "$PID_MODE" --helper-at "0,1,10"
  bench_alive "$rt"
done

echo
printf '%-11s %-23s  %-23s  %-23s  %-23s  %s\n' "" "Create+Start (ms)" "Create (ms)" "Start (ms)" \
  "Stop(0)+Remove (ms)" "containers/s"
printf '%-11s %7s %7s %7s  %7s %7s %7s  %7s %7s %7s  %7s %7s %7s  %6s %6s\n' runtime \
  p50 p95 max p50 p95 max p50 p95 max p50 p95 max up down
for rt in "${RUNTIMES[@]}"; do
  awk -v rt="$rt" '
    $1 == "lat" { p50[$2] = $5; p95[$2] = $6; mx[$2] = $7 }
    $1 == "wall" { rate[$2] = $4 / $5 }
    END {
      printf "%-11s", rt
      n = split("create_start create start stop_remove", ops, " ")
      for (i = 1; i <= n; i++) printf " %7.1f %7.1f %7.1f ", p50[ops[i]], p95[ops[i]], mx[ops[i]]
      printf " %6.1f %6.1f\n", rate["create_start"], rate["stop_remove"]
    }' "$T/out.$rt"
done
# the floor: bare runc on berth's spec, same columns; then with a rootfs mount of its own
floor_line() {
  awk -v pre="$1" -v label="$2" '
    $1 == "lat" && index($2, pre) == 1 {
      op = substr($2, length(pre) + 1); p50[op] = $5; p95[op] = $6; mx[op] = $7; n++ }
    END {
      if (!n) exit
      printf "%-11s", label
      k = split("create_start create start stop_remove", ops, " ")
      for (i = 1; i <= k; i++) printf " %7.1f %7.1f %7.1f ", p50[ops[i]], p95[ops[i]], mx[ops[i]]
      printf "\n"
    }' "$T/out.berth"
}
floor_line runc_ "bare runc"
floor_line runc_mount_ "runc+mount"
awk '$1 == "lat" && $2 == "runc_mount_mount" {
  printf "  (runc+mount: each copy first mounts an overlay rootfs of its own, as berth does:\n"
  printf "   the mount alone p50 %.1f ms, p95 %.1f ms; Create+Start includes it)\n", $5, $6 }' "$T/out.berth"
awk '$1 == "lat" && $2 == "over_runc" { over = sprintf("bare runc %+.1f ms (p95 %+.1f)", $5, $6) }
  $1 == "lat" && $2 == "over_runc_mount" { over = over sprintf(", runc+mount %+.1f ms (p95 %+.1f)", $5, $6) }
  END { if (over != "") printf "  berth Create+Start over the floor, paired per container (each floor copy ran right\n   after its berth container; p50 of the differences): %s\n", over }' "$T/out.berth"
for rt in "${RUNTIMES[@]}"; do
  awk -v rt="$rt" '$1 == "lat" && ($2 == "stop" || $2 == "remove" || $2 == "runc_stop" || $2 == "runc_remove") {
    printf "  %s %s: p50 %.1f ms, p95 %.1f ms, max %.1f ms\n", rt, $2, $5, $6, $7 }' "$T/out.$rt"
done
if [ "$STEPS" = 1 ]; then
  echo
  echo "berth CreateContainer steps (from its debug log; ms since the RPC's work began, p50 and"
  echo "p50 of the step's own time over the $COUNT containers; first = the first container's):"
  bench_steps "container creation" <"$T/berthd.log"
  echo "berth StartContainer steps:"
  bench_steps "container start" <"$T/berthd.log"
  echo "berth StopContainer(0) steps:"
  bench_steps "container stop" <"$T/berthd.log"
  echo "berth RemoveContainer steps (\"container teardown\" is its part that undoes the container):"
  bench_steps "container removal" <"$T/berthd.log"
  bench_steps "container teardown" <"$T/berthd.log"
fi
echo
printf '%-11s %-22s %8s %10s %10s %12s\n' runtime "per-pod helper" containers "RSS (MiB)" "Pss (MiB)" "daemon RSS"
for rt in "${RUNTIMES[@]}"; do
  helper=$([ "$rt" = berth ] && echo berth-monitor || echo containerd-shim-runc-v2)
  awk -v rt="$rt" -v helper="$helper" '
    $1 == "rss" && $2 == "helper" { n = $3; sub(/ctr$/, "", n); ns[++k] = n + 0; r[n + 0] = $5; p[n + 0] = $6; c[n + 0] = $4 }
    $1 == "rss" && $2 == "daemon" { d = $5; dn = $3; sub(/ctr$/, "", dn) }
    END {
      for (i = 1; i <= k; i++) {
        n = ns[i]
        label = c[n] == 1 ? helper : c[n] == 0 ? "(none running)" : helper " x" c[n]
        dd = (n == dn + 0) ? sprintf("%.1f", d / 1024) : "-"
        printf "%-11s %-22s %8d %10.2f %10.2f %12s\n", rt, label, n, r[n] / 1024, p[n] / 1024, dd
      }
    }' "$T/out.$rt"
done
echo "(p50/p95 nearest-rank over $COUNT containers in one pod, serial; containers/s = $COUNT / wall time"
echo " of the phase; image $IMAGE, command sleep 3600,"
echo " logs to the pod's log directory; pod PID mode: $PID_MODE;"
echo " helper = the process whose comm/argv0 is berth-monitor or containerd-shim* and whose command"
echo " line names the pod id; daemon RSS with $COUNT containers running;"
echo " $(bench_versions))"
