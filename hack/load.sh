#!/bin/bash
# Load test (issue #11): tests/load.rs with its figures shown. 200 pods with one busybox
# `sleep` container each, run 20 at a time, listed, ExecSync'd into, stopped and removed 20 at
# a time, with no error; berthd's RSS, open fds and threads at 0 pods, at 200 and after the
# removal, and nothing of the pods left (processes, mounts, veths, cgroups, runtime state).
# Needs root (real berthd, registry, runc, namespaces), like hack/test.sh.
#
# Knobs (environment): BERTH_LOAD_PODS=200, CARGO_TARGET_DIR, BERTH_TEST_LOG (berthd's log
# filter, default info,berth=debug).
set -euo pipefail
cd "$(dirname "$0")/.."
hack/deps.sh test
log=$(mktemp)
trap 'rm -f "$log"' EXIT
start=$(date +%s)
rc=0
cargo test --test load -- --nocapture 2>&1 | tee "$log" || rc=$?
echo
echo "load figures ($(($(date +%s) - start)) s with the build):"
grep '^LOAD ' "$log" | sed 's/^LOAD /  /' || echo "  (none: the test did not get that far)"
exit "$rc"
