#!/bin/bash
# Sets up and runs every check: formatting, clippy, unit and integration tests.
# Integration tests start real berthd daemons, Debian's docker-registry and use real mounts:
# they need root.
set -euo pipefail
cd "$(dirname "$0")/.."
hack/deps.sh test
cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
cargo test --all-targets
