#!/bin/bash
# Installs the Debian packages berth builds, runs and tests with. Idempotent; needs root.
# Usage: hack/deps.sh run|test
set -euo pipefail
what=${1:-test}
pkgs=(protobuf-compiler runc crun iproute2 nftables iptables containernetworking-plugins)
if [ "$what" = test ]; then
  pkgs+=(busybox-static docker-registry openssl apache2-utils zstd prometheus)  # prometheus: promtool
fi
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
command -v cargo >/dev/null || { echo "cargo (Rust toolchain) is required" >&2; exit 1; }
