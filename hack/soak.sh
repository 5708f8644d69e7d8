#!/bin/bash
# Crash soak, long form (issue #11): the seeded random workload of tests/soak.rs — pods,
# containers, execs, stops, removes, image pulls and removals, 4 at a time — against a real
# berthd that is killed with SIGKILL at random instants (aimed at RunPodSandbox,
# CreateContainer and PullImage, or anywhere) and restarted. After every restart and at the
# end it checks that what berth lists matches the host (pod dirs, bundles, writable layers,
# runtime state, mounts, veths, address leases, nftables chains, monitors, cgroups,
# processes) and that no record was lost; then a calm phase without kills shows whether
# berthd's memory grows; at the end everything is removed and nothing may be left.
#
# Prints cycles, kills, operations cut by a kill, errors, lost records, leaks and berthd's
# RSS. Needs root (real namespaces, mounts, cgroups, links, nftables).
#
# Knobs (environment): SOAK_CYCLES=1000 SOAK_KILL_EVERY=100 SOAK_CALM_CYCLES=1000
#                      SOAK_WORKERS=4 SOAK_SEED=<from the clock; printed, repeats a run>
#                      SOAK_KEEP_LOG=<path: berthd's log is copied there>
set -euo pipefail
cd "$(dirname "$0")/.."
hack/deps.sh test
export SOAK_CYCLES=${SOAK_CYCLES:-1000}
export SOAK_KILL_EVERY=${SOAK_KILL_EVERY:-100}
export SOAK_CALM_CYCLES=${SOAK_CALM_CYCLES:-1000}
export SOAK_WORKERS=${SOAK_WORKERS:-4}
[ -z "${SOAK_SEED:-}" ] || export SOAK_SEED
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --test soak -- --nocapture 2>&1 | tee "$log" >/dev/null || status=$?
echo "----- soak figures -----"
grep -E '^soak' "$log" | grep -v 'aimed at' || true
grep -E '^test result:|panicked at' "$log" || true
exit "$status"
