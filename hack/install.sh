#!/bin/bash
# Installs berth on a node (run as root):
#   hack/install.sh [PREFIX]               berthd and berth-monitor to PREFIX/bin (default /usr/local)
#   hack/install.sh --uninstall [PREFIX]   removes the binaries and the unit, keeps the configs
#
# What it installs, and when:
#   PREFIX/bin/{berthd,berth-monitor}     always (a release build, or BERTH_BIN_DIR's binaries)
#   /etc/berth/berth.toml                 only when absent (`berthd config default`): an
#                                         operator's file is never overwritten
#   /etc/systemd/system/berthd.service    always (deploy/berthd.service, ExecStart in PREFIX/bin;
#                                         change it with `systemctl edit berthd`, not in place)
#   /etc/crictl.yaml                      only when absent (endpoints = the config's socket)
#   <cni.conf_dir>/10-berth.conflist      only in `[network] mode = "cni"`, and only when that dir
#                                         has no network configuration yet
# Idempotent: a second run changes nothing an operator made and says what it skipped.
#
# Environment:
#   BERTH_BIN_DIR  take berthd and berth-monitor from this dir instead of building them
#   DESTDIR        a staging root put in front of every destination (packages, tests); the
#                  paths written into the unit and crictl.yaml stay the ones without it
#   BERTH_ETC      berth's config dir (default /etc/berth)
#   SYSTEMD_DIR    the unit's dir (default /etc/systemd/system)
#   CRICTL_YAML    crictl's config (default /etc/crictl.yaml)
set -euo pipefail

usage() {
    sed -n '2,4p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

uninstall=0
prefix=/usr/local
case "${1:-}" in
--uninstall)
    uninstall=1
    shift
    ;;
-h | --help) usage ;;
esac
[ $# -le 1 ] || usage
if [ $# -eq 1 ]; then
    prefix="$1"
fi
case "$prefix" in
/*) ;;
*)
    echo "install.sh: PREFIX must be an absolute path, not $prefix" >&2
    exit 2
    ;;
esac
prefix="${prefix%/}"

repo="$(cd "$(dirname "$0")/.." && pwd)"
destdir="${DESTDIR:-}"
destdir="${destdir%/}"
etc="${BERTH_ETC:-/etc/berth}"
systemd_dir="${SYSTEMD_DIR:-/etc/systemd/system}"
crictl_yaml="${CRICTL_YAML:-/etc/crictl.yaml}"

bin_dst="$destdir$prefix/bin"
config="$etc/berth.toml"
unit="$destdir$systemd_dir/berthd.service"

say() { printf '%-9s %s\n' "$1" "$2"; }

# systemd reloads units only on the live system (not into a DESTDIR).
reload_systemd() {
    if [ -z "$destdir" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
        systemctl daemon-reload
        say reloaded "systemd units (systemctl daemon-reload)"
    fi
}

if [ "$uninstall" = 1 ]; then
    for f in "$bin_dst/berthd" "$bin_dst/berth-monitor" "$unit"; do
        if [ -e "$f" ]; then
            rm -f "$f"
            say removed "$f"
        else
            say absent "$f"
        fi
    done
    reload_systemd
    say kept "$destdir$config (and its drop-ins, $destdir$crictl_yaml, CNI configs, data in the config's root)"
    exit 0
fi

# The binaries: a release build unless BERTH_BIN_DIR has them.
if [ -n "${BERTH_BIN_DIR:-}" ]; then
    src="$BERTH_BIN_DIR"
else
    (cd "$repo" && cargo build --release --bin berthd --bin berth-monitor)
    src="${CARGO_TARGET_DIR:-$repo/target}/release"
fi
for b in berthd berth-monitor; do
    [ -x "$src/$b" ] || {
        echo "install.sh: no executable $src/$b" >&2
        exit 1
    }
done

mkdir -p "$bin_dst"
for b in berthd berth-monitor; do
    if cmp -s "$src/$b" "$bin_dst/$b"; then
        say unchanged "$bin_dst/$b"
        continue
    fi
    verb=installed
    [ -e "$bin_dst/$b" ] && verb=updated
    # A copy renamed over the old file: a running berthd keeps its (old) binary.
    install -m 0755 "$src/$b" "$bin_dst/.$b.new"
    mv -f "$bin_dst/.$b.new" "$bin_dst/$b"
    say "$verb" "$bin_dst/$b"
done
berthd="$bin_dst/berthd"

# The config: the embedded defaults, only when there is none.
mkdir -p "$destdir$etc"
if [ -e "$destdir$config" ]; then
    say kept "$destdir$config (exists)"
else
    "$berthd" config default >"$destdir$config.new"
    chmod 0644 "$destdir$config.new"
    mv "$destdir$config.new" "$destdir$config"
    say installed "$destdir$config"
fi

# What the installed config says (after its drop-ins): a bad config stops here.
if ! effective="$("$berthd" config check "$destdir$config")"; then
    echo "install.sh: $destdir$config does not pass 'berthd config check' (see above)" >&2
    exit 1
fi
# `key = "value"` of a table of the effective config (`config check` prints every key).
value_of() {
    local table="$1" key="$2"
    printf '%s\n' "$effective" | awk -v table="$table" -v key="$key" '
        /^\[/ { current = substr($0, 2, length($0) - 2); next }
        current == table && $1 == key && $2 == "=" {
            v = $0; sub(/^[^=]*= */, "", v); gsub(/^"|"$/, "", v); print v; exit
        }'
}
socket="$(value_of "" socket)"
mode="$(value_of network mode)"
cni_dir="$(value_of cni conf_dir)"

# The systemd unit: ours, always brought up to date (operators change it with drop-ins).
mkdir -p "$(dirname "$unit")"
sed -e "s|^ExecStart=.*|ExecStart=$prefix/bin/berthd --config $config|" \
    "$repo/deploy/berthd.service" >"$unit.new"
if cmp -s "$unit.new" "$unit"; then
    rm -f "$unit.new"
    say unchanged "$unit"
else
    verb=installed
    [ -e "$unit" ] && verb=updated
    chmod 0644 "$unit.new"
    mv -f "$unit.new" "$unit"
    say "$verb" "$unit"
    reload_systemd
fi

# crictl's config, only when there is none.
if [ -e "$destdir$crictl_yaml" ]; then
    say kept "$destdir$crictl_yaml (exists)"
else
    mkdir -p "$(dirname "$destdir$crictl_yaml")"
    sed -e "s|unix:///run/berth/berth.sock|unix://$socket|" \
        "$repo/deploy/crictl.yaml" >"$destdir$crictl_yaml.new"
    chmod 0644 "$destdir$crictl_yaml.new"
    mv "$destdir$crictl_yaml.new" "$destdir$crictl_yaml"
    say installed "$destdir$crictl_yaml"
fi

# The CNI network, in cni mode only, and never next to another network's configuration
# (the first file in lexical order wins: ours would shadow the cluster's).
if [ "$mode" != cni ]; then
    say skipped "CNI conflist (network mode is $mode: berth wires pods itself)"
else
    conflist="$destdir$cni_dir/10-berth.conflist"
    if [ -e "$conflist" ]; then
        say kept "$conflist (exists)"
    elif compgen -G "$destdir$cni_dir/*.conf" >/dev/null ||
        compgen -G "$destdir$cni_dir/*.conflist" >/dev/null ||
        compgen -G "$destdir$cni_dir/*.json" >/dev/null; then
        say skipped "CNI conflist ($destdir$cni_dir already has a network configuration)"
    else
        mkdir -p "$destdir$cni_dir"
        install -m 0644 "$repo/cni/10-berth.conflist" "$conflist"
        say installed "$conflist (the plugins: see cni/README.md)"
    fi
fi

if [ -z "$destdir" ]; then
    echo "next: systemctl enable --now berthd; crictl info"
fi
