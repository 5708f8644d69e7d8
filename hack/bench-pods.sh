#!/bin/bash
# Pod sandbox benchmark: berthd vs Debian's containerd (CRI plugin, pause image), side by side.
#
# As root on Debian. Starts Debian's docker-registry on 127.0.0.1 (temp storage) and fills it
# with ../shared/critest-images/build-and-push.sh (pause:3.9 for containerd), starts berthd
# (bridge bbench0, 10.99.0.0/16) and a baseline containerd (../shared/baseline/containerd-up.sh:
# bridge CNI on ctrd0, 10.98.0.0/16), and for each runtime in turn (cri_bench pods):
#   - RunPodSandbox of COUNT pods one at a time, then StopPodSandbox+RemovePodSandbox of each;
#   - the same with PARALLEL calls in flight (over one connection, as the kubelet does);
#   - memory with COUNT pods running (after the serial starts and after the parallel ones).
# containerd's pause image is pulled before anything is timed. Pods are kubelet-like: own
# network, IPC and UTS namespaces, PID namespace per container (PID_MODE=pod: one per pod).
# Prints p50/p95/max latency per runtime and mode, and VmRSS (Pss in brackets).
# Everything it starts or creates is stopped and removed on exit (see hack/bench-lib.sh).
#
# With STEPS=1 (default) berthd runs at debug level and its RunPodSandbox step timings are
# printed as a table (p50 over every RunPodSandbox of the run, serial and parallel).
#
# Knobs (environment): COUNT=100 PARALLEL=10 PID_MODE=container STEPS=1, BERTH_ONLY=1 (no
#                      containerd: e.g. berth's memory at 250 pods), and those of bench-lib.sh.
set -euo pipefail
COUNT=${COUNT:-100}
PARALLEL=${PARALLEL:-10}
PID_MODE=${PID_MODE:-container}
STEPS=${STEPS:-1}
# berth's step timings are at debug level
[ "$STEPS" = 1 ] && export BENCH_BERTH_LOG=${BENCH_BERTH_LOG:-info,berth=debug}
# shellcheck source=hack/bench-lib.sh
. "$(dirname "$0")/bench-lib.sh"
bench_init bench-pods.sh
bench_registry
bench_critest_images
bench_berthd
[ -n "${BERTH_ONLY:-}" ] || bench_containerd

PAUSE=registry.k8s.io/pause:3.9
declare -A ARGS
# helpers counted with the pods: for berth whatever runs with its state dir on the command
# line (berth-monitor, berth-pod-init), for containerd its shims (-address <its socket>), and
# all their descendants (the pause processes).
ARGS[berth]="--endpoint unix://$BERTH_SOCK --daemon-pid $BERTHD_PID --helpers-cmdline $T/berth/"
ARGS[containerd]="--endpoint unix://$CTRD_SOCK --daemon-pid $CTRD_PID --helpers-cmdline $CTRD_SOCK --pause-image $PAUSE"
RUNTIMES=(berth)
[ -n "${BERTH_ONLY:-}" ] || RUNTIMES+=(containerd)
for rt in "${RUNTIMES[@]}"; do
  echo "$rt: $COUNT pods serial, then $PARALLEL in parallel ..." >&2
  # shellcheck disable=SC2086
  bench_cri "$rt" "$T/out.$rt" pods ${ARGS[$rt]} --count "$COUNT" --parallel "$PARALLEL" \
    --pid-mode "$PID_MODE"
  bench_alive "$rt"
done

echo
printf '%-11s %-9s %-37s %-28s\n' "" "" "RunPodSandbox (ms)" "Stop+RemovePodSandbox (ms)"
printf '%-11s %-9s %8s %8s %8s %8s %8s %8s %8s %8s %8s\n' runtime mode p50 p95 max "pods/s" "CPU/pod" p50 p95 max "pods/s"
for rt in "${RUNTIMES[@]}"; do
  for mode in serial parallel; do
    awk -v rt="$rt" -v mode="$mode" '
      $1 == "lat" && $3 == mode { p50[$2] = $5; p95[$2] = $6; mx[$2] = $7 }
      $1 == "wall" && $3 == mode { rate[$2] = $4 / $5 }
      $1 == "cpu" && $2 == "run_" mode { cpu = $4 }
      END {
        printf "%-11s %-9s %8.1f %8.1f %8.1f %8.1f %8.2f %8.1f %8.1f %8.1f %8.1f\n", rt, mode,
          p50["run"], p95["run"], mx["run"], rate["run"], cpu,
          p50["stop_remove"], p95["stop_remove"], mx["stop_remove"], rate["stop_remove"]
      }' "$T/out.$rt"
  done
done
echo "(CPU/pod: user + system CPU ms of the daemon and its helpers per RunPodSandbox, over the phase)"
echo
printf '%-11s %-26s %11s %11s %12s %12s %8s  %s\n' runtime "memory (MiB)" "daemon RSS" "(anon/file)" "helpers RSS" "helpers Pss" "per pod" "helper processes"
for rt in "${RUNTIMES[@]}"; do
  awk -v rt="$rt" -v count="$COUNT" '
    $1 == "rss" { k = $3; if (!(k in seen)) { seen[k] = 1; keys[++n] = k } }
    $1 == "rss" && $2 == "daemon" { d[$3] = $5 }
    $1 == "rssparts" && $2 == "daemon" { da[$3] = $4; df[$3] = $5 }
    $1 == "rss" && $2 == "helpers" { h[$3] = $5; hp[$3] = $6; hc[$3] = $7 }
    END {
      for (i = 1; i <= n; i++) {
        k = keys[i]; label = k
        if (k == "idle") label = "idle, no pods"
        else if (k == "after") label = "after removing all"
        else if (split(k, a, "pods-") == 2) label = a[1] " pods up (" a[2] ")"
        per = (k ~ /pods-/) ? sprintf("%.2f", (d[k] - d["idle"] + h[k] - h["idle"]) / 1024 / count) : "-"
        parts = (k in da) ? sprintf("%.1f/%.1f", da[k] / 1024, df[k] / 1024) : "-"
        printf "%-11s %-26s %11.1f %11s %12.1f %12.1f %8s  %s\n", rt, label, d[k] / 1024, parts,
          h[k] / 1024, hp[k] / 1024, per, hc[k]
      }
    }' "$T/out.$rt"
done
echo "(p50/p95 nearest-rank over $COUNT pods; pods/s = pods / wall time of the phase; pod PID mode: $PID_MODE;"
echo " helpers = for berth every process with berth's state dir on its command line and their"
echo " descendants, for containerd every containerd-shim-runc-v2 (comm containerd-shim) with its"
echo " socket as -address and their descendants (the pause processes); RSS sums count a shared page"
echo " in every process mapping it, Pss splits it; anon/file = the daemon's heap and stacks / its mapped"
echo " files (mostly its own binary's code); per pod = (daemon + helpers RSS - idle) / $COUNT in MiB;"
echo " $(bench_versions))"
if [ "$STEPS" = 1 ]; then
  echo
  echo "berth RunPodSandbox steps (from its debug log; ms since the RPC's work began, p50 over"
  echo "the $((2 * COUNT)) pods, serial and parallel, and the step's own time):"
  bench_steps "pod creation" <"$T/berthd.log"
  echo "berth StopPodSandbox steps (\"pod release\" is its init and network part):"
  bench_steps "pod stop" <"$T/berthd.log"
  bench_steps "pod release" <"$T/berthd.log"
  echo "berth RemovePodSandbox steps (\"pod teardown\" is its part that undoes the pod):"
  bench_steps "pod removal" <"$T/berthd.log"
  bench_steps "pod teardown" <"$T/berthd.log"
fi
