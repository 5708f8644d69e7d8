#!/bin/bash
# Sets up and runs berthd on its embedded defaults (socket /run/berth/berth.sock).
set -euo pipefail
cd "$(dirname "$0")/.."
hack/deps.sh run
cargo build --release --bin berthd
exec target/release/berthd "$@"
