#!/bin/bash
# Streaming benchmark (issue #9): berthd vs containerd's CRI streaming server, side by side.
#
# As root on Debian. Starts Debian's docker-registry on 127.0.0.1 (temp storage) and fills it
# with ../shared/critest-images/build-and-push.sh (busybox, pause), starts berthd and a baseline
# containerd (../shared/baseline/containerd-up.sh), and for each runtime in turn, with the one
# SPDY/3.1 client of examples/cri_bench.rs (berth's frame module; the same for both runtimes,
# behaving as client-go: one stream at a time, each after the server's SYN_REPLY, TCP_NODELAY):
#   - exec round trip (cri_bench exec): in a running busybox container (`sleep 3600`), COUNT
#     times one after another: the `Exec` RPC (stdout+stderr, no stdin, no tty) → URL →
#     HTTP/1.1 upgrade to SPDY/3.1 (v4.channel.k8s.io) → error, stdout and stderr streams →
#     the command (EXEC_CMD, default `true`) runs → its exit status on the error stream → all
#     three streams ended. Also the RPC alone, the streaming part alone, and ExecSync of the
#     same command for reference. WARMUP round trips first, untimed.
#   - port-forward throughput (cri_bench port-forward): one pod with three busybox `nc -ll`
#     servers; per transfer a PortForward RPC and one SPDY connection (portforward.k8s.io,
#     error stream then data stream, as client-go), MB megabytes each: up (to a sink that
#     answers `ok` once `dd` read them all), down (`dd` of /dev/zero, checked) and echo
#     (through `cat`, up and back at once, checked byte for byte); REPEAT times each.
#     Timed from the data stream's SYN_REPLY to the last expected byte (so neither server's
#     way of closing a forwarded connection counts).
# Images are pulled before anything is timed. Prints p50/p95/max latency and MB/s (best and
# median of REPEAT).
# Everything it starts or creates is stopped and removed on exit (see hack/bench-lib.sh).
#
# Knobs (environment): COUNT=100 WARMUP=5 EXEC_CMD=true MB=100 REPEAT=3
#                      IMAGE=registry.k8s.io/e2e-test-images/busybox:1.29-2
#                      CONTAINERD=/work/peers/containerd/containerd (containerd 2.3.4), and those
#                      of bench-lib.sh.
set -euo pipefail
COUNT=${COUNT:-100}
WARMUP=${WARMUP:-5}
EXEC_CMD=${EXEC_CMD:-true}
MB=${MB:-100}
REPEAT=${REPEAT:-3}
IMAGE=${IMAGE:-registry.k8s.io/e2e-test-images/busybox:1.29-2}
# shellcheck source=hack/bench-lib.sh
. "$(dirname "$0")/bench-lib.sh"
bench_init bench-streaming.sh
bench_registry
bench_critest_images
bench_berthd
bench_containerd

PAUSE=registry.k8s.io/pause:3.9
declare -A ARGS
ARGS[berth]="--endpoint unix://$BERTH_SOCK"
ARGS[containerd]="--endpoint unix://$CTRD_SOCK --pause-image $PAUSE"
RUNTIMES=(berth containerd)
for rt in "${RUNTIMES[@]}"; do
  echo "$rt: $COUNT streaming execs of '$EXEC_CMD' ..." >&2
  # shellcheck disable=SC2086
  bench_cri "$rt" "$T/exec.$rt" exec ${ARGS[$rt]} --image "$IMAGE" --count "$COUNT" \
    --warmup "$WARMUP" --command "$EXEC_CMD"
  echo "$rt: port-forward of $MB MB up, down and echoed, $REPEAT times each ..." >&2
  # shellcheck disable=SC2086
  bench_cri "$rt" "$T/pf.$rt" port-forward ${ARGS[$rt]} --image "$IMAGE" --mb "$MB" \
    --repeat "$REPEAT"
  bench_alive "$rt"
done

echo
printf '%-11s %-23s  %-23s  %-23s  %-23s\n' "" "exec round trip (ms)" "Exec RPC (ms)" \
  "SPDY part (ms)" "ExecSync (ms)"
printf '%-11s %7s %7s %7s  %7s %7s %7s  %7s %7s %7s  %7s %7s %7s\n' runtime \
  p50 p95 max p50 p95 max p50 p95 max p50 p95 max
for rt in "${RUNTIMES[@]}"; do
  awk -v rt="$rt" '
    $1 == "lat" { p50[$2] = $5; p95[$2] = $6; mx[$2] = $7 }
    END {
      printf "%-11s", rt
      n = split("exec_total exec_rpc exec_stream exec_sync", ops, " ")
      for (i = 1; i <= n; i++) printf " %7.2f %7.2f %7.2f ", p50[ops[i]], p95[ops[i]], mx[ops[i]]
      printf "\n"
    }' "$T/exec.$rt"
done
echo
printf '%-11s %-17s  %-17s  %-17s\n' "" "up (MB/s)" "down (MB/s)" "echo (MB/s each way)"
printf '%-11s %8s %8s  %8s %8s  %8s %8s\n' runtime best median best median best median
for rt in "${RUNTIMES[@]}"; do
  awk -v rt="$rt" '
    $1 == "tput" { n[$2]++; v[$2, n[$2]] = $4 / 1e6 / $5 }
    END {
      printf "%-11s", rt
      split("up down echo", dirs, " ")
      for (d = 1; d <= 3; d++) {
        k = dirs[d]; m = n[k]
        # insertion sort, ascending
        for (i = 2; i <= m; i++) {
          x = v[k, i]
          for (j = i - 1; j >= 1 && v[k, j] > x; j--) v[k, j + 1] = v[k, j]
          v[k, j + 1] = x
        }
        printf " %8.1f %8.1f ", v[k, m], v[k, int((m + 1) / 2)]
      }
      printf "\n"
    }' "$T/pf.$rt"
done
echo "(exec: p50/p95 nearest-rank over $COUNT serial round trips of '$EXEC_CMD' after $WARMUP untimed,"
echo " Exec RPC to all streams ended with the exit status; port-forward: $MB MB per transfer, $REPEAT"
echo " transfers per direction, busybox nc in the pod, client and servers on this host's loopback;"
echo " $(bench_versions))"
