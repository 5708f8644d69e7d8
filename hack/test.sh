#!/bin/bash
# Sets up and runs every check: formatting, clippy, unit and integration tests.
# Integration tests start real berthd daemons, Debian's docker-registry, runc, and use real
# namespaces, mounts, links, nftables and cgroups: they need root.
set -euo pipefail
cd "$(dirname "$0")/.."
hack/deps.sh test
cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# Examples are built by clippy above; they have no tests.
cargo test --lib --bins --tests 2>&1 | tee "$log"
# One closing line over every test binary.
awk '/^test result:/ { p += $4; f += $6; s += $8 } END { printf "tests: %d passed, %d failed, %d skipped\n", p, f, s }' "$log"
