#!/bin/bash
# Stats benchmark (issue #10): berthd vs containerd (CRI plugin), side by side, same runc.
#
# As root on Debian. Starts Debian's docker-registry on 127.0.0.1 (temp storage) and fills it
# with ../shared/critest-images/build-and-push.sh (busybox, pause), starts berthd (its
# Prometheus /metrics on 127.0.0.1:<free port>) and a baseline containerd
# (../shared/baseline/containerd-up.sh), and for each runtime in turn (cri_bench stats):
#   - PODS pod sandboxes (each with a cgroup parent /cri-bench-<pid>/<runtime>/pod<n>, as the
#     kubelet gives one) holding CONTAINERS running busybox containers (`sleep 3600`) in all,
#     spread evenly (made PARALLEL at a time, not timed);
#   - CALLS ListContainerStats (no filter) one after another, INTERVAL seconds apart, each
#     checked to list every container with its CPU usage; two untimed calls first (a CPU rate
#     needs a previous sample);
#   - the same for ListPodSandboxStats;
#   - berth only: CALLS scrapes of /metrics (GET, HTTP/1.1, the whole body read), after one
#     checked to hold a working set for every container (containerd's metrics endpoint is
#     not part of the CRI and is off in the baseline config).
# For each call also the CPU time it cost the daemon and its per-pod helpers (berth-monitor,
# containerd-shim-runc-v2), read from /proc before and after it (10 ms ticks, so a mean).
# Prints p50/p95/max latency and CPU ms per call.
# Everything it starts or creates is stopped and removed on exit (see hack/bench-lib.sh).
#
# Knobs (environment): PODS=20 CONTAINERS=200 CALLS=30 INTERVAL=0.5 PARALLEL=4
#                      IMAGE=registry.k8s.io/e2e-test-images/busybox:1.29-2
#                      CONTAINERD=/work/peers/containerd/containerd (containerd 2.3.4), and those
#                      of bench-lib.sh.
set -euo pipefail
PODS=${PODS:-20}
CONTAINERS=${CONTAINERS:-200}
CALLS=${CALLS:-30}
INTERVAL=${INTERVAL:-0.5}
PARALLEL=${PARALLEL:-4}
IMAGE=${IMAGE:-registry.k8s.io/e2e-test-images/busybox:1.29-2}
# shellcheck source=hack/bench-lib.sh
. "$(dirname "$0")/bench-lib.sh"
bench_init bench-stats.sh
bench_registry
bench_critest_images
BENCH_BERTH_METRICS=1
bench_berthd
bench_containerd

PAUSE=registry.k8s.io/pause:3.9
declare -A ARGS
ARGS[berth]="--endpoint unix://$BERTH_SOCK --daemon-pid $BERTHD_PID --helpers-cmdline $T/berth/ --metrics-url $BERTH_METRICS_URL"
ARGS[containerd]="--endpoint unix://$CTRD_SOCK --daemon-pid $CTRD_PID --helpers-cmdline $CTRD_SOCK --pause-image $PAUSE"
# kubelet-like pods: each has a cgroup parent (containerd reads pod stats there, and only there)
CGROUP_ROOT=cri-bench-$$
bench_cgroup_tree "$CGROUP_ROOT"
RUNTIMES=(berth containerd)
for rt in "${RUNTIMES[@]}"; do
  echo "$rt: $CONTAINERS containers in $PODS pods, then $CALLS calls of each ..." >&2
  # shellcheck disable=SC2086
  bench_cri "$rt" "$T/out.$rt" stats ${ARGS[$rt]} --image "$IMAGE" --pods "$PODS" \
    --containers "$CONTAINERS" --parallel "$PARALLEL" --calls "$CALLS" --interval "$INTERVAL" \
    --cgroup-parent "/$CGROUP_ROOT/$rt"
  bench_alive "$rt"
done

echo
printf '%-11s %-31s  %-31s  %-31s\n' "" "ListContainerStats (ms)" "ListPodSandboxStats (ms)" \
  "/metrics scrape (ms)"
printf '%-11s %7s %7s %7s %7s  %7s %7s %7s %7s  %7s %7s %7s %7s\n' runtime \
  p50 p95 max cpu p50 p95 max cpu p50 p95 max cpu
for rt in "${RUNTIMES[@]}"; do
  awk -v rt="$rt" '
    $1 == "lat" { p50[$2] = $5; p95[$2] = $6; mx[$2] = $7; have[$2] = 1 }
    $1 == "cpu" { cpu[$2] = $4 }
    END {
      printf "%-11s", rt
      n = split("list_container_stats list_pod_sandbox_stats metrics_scrape", ops, " ")
      for (i = 1; i <= n; i++) {
        if (have[ops[i]]) printf " %7.2f %7.2f %7.2f %7.2f ", p50[ops[i]], p95[ops[i]], mx[ops[i]], cpu[ops[i]]
        else printf " %7s %7s %7s %7s ", "-", "-", "-", "-"
      }
      printf "\n"
    }' "$T/out.$rt"
done
awk '$1 == "scrape" { printf "berth /metrics: %d bytes, %d samples, %d container working sets\n", $3, $4, $5 }' \
  "$T/out.berth"
for rt in "${RUNTIMES[@]}"; do
  awk -v rt="$rt" '$1 == "wall" { printf "%s: %d containers in %d pods up in %.1f s\n", rt, $4, pods, $5 }' \
    pods="$PODS" "$T/out.$rt"
done
echo "(p50/p95 nearest-rank over $CALLS serial calls $INTERVAL s apart with $CONTAINERS running"
echo " containers in $PODS pods; cpu = mean CPU ms per call of the daemon + per-pod helpers;"
echo " $(bench_versions))"
