//! What berthd needs from the node's kernel, checked at start and at every `Status`.
//!
//! - overlayfs: every container rootfs is an overlay mount. Registered in `/proc/filesystems`
//!   is ready; not registered but built as a module of the running kernel (`modules.dep`,
//!   `modules.builtin` under `/lib/modules/<release>`) is fine too, as the kernel loads it at
//!   the first overlay mount (a warning only); neither is `RuntimeReady=false`.
//! - `native` network mode: `net.ipv4.ip_forward` must be 1 for pods to reach beyond the
//!   node (the native backend turns it on when it sets the bridge up, and this check turns
//!   it on at start if something turned it off); still 0 is `NetworkReady=false`. Without
//!   `br_netfilter` (`/proc/sys/net/bridge/bridge-nf-call-iptables` absent, or 0) bridged pod
//!   traffic bypasses iptables, which kube-proxy's iptables mode relies on for Service IPs
//!   between pods of one node: a warning only, berth does not change it (it is host-wide).
//!
//! What is missing is logged once at start ([`check_at_start`]); `Status` asks [`check`]
//! each time, so a fixed node turns ready without a restart. In `cni` mode the plugins own
//! forwarding and the bridge, so only overlayfs is checked.

use std::path::{Path, PathBuf};

use crate::config::NetworkMode;

/// One thing the node lacks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// No overlayfs, neither registered nor as a module of the running kernel.
    OverlayMissing,
    /// overlayfs is a module not loaded yet (the kernel loads it at the first mount).
    OverlayNotLoaded,
    /// `net.ipv4.ip_forward` is 0 (native mode).
    IpForwardOff,
    /// `br_netfilter` is not loaded (native mode).
    BridgeNetfilterMissing,
    /// `net.bridge.bridge-nf-call-iptables` is 0 (native mode).
    BridgeNetfilterOff,
    /// A file that tells could not be read.
    Unreadable { path: PathBuf, error: String },
}

impl Finding {
    /// Whether the node can still run pods (a warning) or not.
    pub fn is_warning(&self) -> bool {
        !matches!(self, Finding::OverlayMissing | Finding::IpForwardOff)
    }

    /// A line for the log and for `Status` condition messages.
    pub fn message(&self) -> String {
        match self {
            Finding::OverlayMissing => "the kernel has no overlay filesystem (not in \
                /proc/filesystems, no overlay module): container root filesystems cannot be \
                mounted; load it with `modprobe overlay`"
                .to_string(),
            Finding::OverlayNotLoaded => "the overlay module is not loaded yet; the kernel \
                loads it at the first mount (`modprobe overlay` loads it now)"
                .to_string(),
            Finding::IpForwardOff => "net.ipv4.ip_forward is 0: pods cannot reach beyond \
                the node; set it to 1 (sysctl -w net.ipv4.ip_forward=1)"
                .to_string(),
            Finding::BridgeNetfilterMissing => "br_netfilter is not loaded \
                (/proc/sys/net/bridge/bridge-nf-call-iptables is absent): traffic between \
                pods on the bridge bypasses iptables, which kube-proxy's iptables mode needs \
                for Service IPs; `modprobe br_netfilter`"
                .to_string(),
            Finding::BridgeNetfilterOff => "net.bridge.bridge-nf-call-iptables is 0: traffic \
                between pods on the bridge bypasses iptables, which kube-proxy's iptables mode \
                needs for Service IPs"
                .to_string(),
            Finding::Unreadable { path, error } => {
                format!("cannot read {}: {error}", path.display())
            }
        }
    }
}

/// The outcome of a check.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub findings: Vec<Finding>,
}

impl Report {
    /// `(reason, message)` for `RuntimeReady=false`, when containers cannot run.
    pub fn runtime_problem(&self) -> Option<(&'static str, String)> {
        self.findings
            .iter()
            .find(|f| **f == Finding::OverlayMissing)
            .map(|f| ("OverlayfsUnavailable", f.message()))
    }

    /// `(reason, message)` for `NetworkReady=false`, when pods cannot be networked.
    pub fn network_problem(&self) -> Option<(&'static str, String)> {
        self.findings
            .iter()
            .find(|f| **f == Finding::IpForwardOff)
            .map(|f| ("IPForwardingDisabled", f.message()))
    }
}

/// Where the kernel's files are (the real `/proc` and `/lib/modules`, or a test's dirs).
#[derive(Debug, Clone)]
pub struct Host {
    pub proc: PathBuf,
    pub modules: PathBuf,
}

impl Default for Host {
    fn default() -> Self {
        Host {
            proc: PathBuf::from("/proc"),
            modules: PathBuf::from("/lib/modules"),
        }
    }
}

/// Checks the real node (see the module docs); changes nothing.
pub fn check(mode: NetworkMode) -> Report {
    check_host(&Host::default(), mode)
}

/// At start: turns `net.ipv4.ip_forward` on in native mode if it is off, then checks and
/// logs each finding once (an error or a warning).
pub fn check_at_start(mode: NetworkMode) -> Report {
    let host = Host::default();
    if mode == NetworkMode::Native {
        let path = host.proc.join("sys/net/ipv4/ip_forward");
        if let Ok(v) = std::fs::read_to_string(&path)
            && v.trim() == "0"
        {
            match std::fs::write(&path, "1") {
                Ok(()) => tracing::info!("net.ipv4.ip_forward was 0: set it to 1"),
                Err(e) => tracing::warn!(error = %e, "cannot set net.ipv4.ip_forward to 1"),
            }
        }
    }
    let report = check_host(&host, mode);
    for f in &report.findings {
        if f.is_warning() {
            tracing::warn!("node check: {}", f.message());
        } else {
            tracing::error!("node check: {}", f.message());
        }
    }
    report
}

/// [`check`] against the files under `host`.
pub fn check_host(host: &Host, mode: NetworkMode) -> Report {
    let mut findings = Vec::new();
    let filesystems = host.proc.join("filesystems");
    match std::fs::read_to_string(&filesystems) {
        Ok(text) if has_filesystem(&text, "overlay") => {}
        Ok(_) => {
            let release = std::fs::read_to_string(host.proc.join("sys/kernel/osrelease"))
                .map(|r| r.trim().to_string())
                .unwrap_or_default();
            if !release.is_empty() && overlay_module_exists(&host.modules.join(&release)) {
                findings.push(Finding::OverlayNotLoaded);
            } else {
                findings.push(Finding::OverlayMissing);
            }
        }
        Err(e) => findings.push(unreadable(&filesystems, e)),
    }
    if mode == NetworkMode::Native {
        let forward = host.proc.join("sys/net/ipv4/ip_forward");
        match std::fs::read_to_string(&forward) {
            Ok(v) if sysctl_on(&v) => {}
            Ok(_) => findings.push(Finding::IpForwardOff),
            Err(e) => findings.push(unreadable(&forward, e)),
        }
        let nf = host.proc.join("sys/net/bridge/bridge-nf-call-iptables");
        match std::fs::read_to_string(&nf) {
            Ok(v) if sysctl_on(&v) => {}
            Ok(_) => findings.push(Finding::BridgeNetfilterOff),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                findings.push(Finding::BridgeNetfilterMissing)
            }
            Err(e) => findings.push(unreadable(&nf, e)),
        }
    }
    Report { findings }
}

fn unreadable(path: &Path, e: std::io::Error) -> Finding {
    Finding::Unreadable {
        path: path.to_path_buf(),
        error: e.to_string(),
    }
}

/// Whether `/proc/filesystems` text (`[nodev]\t<name>` a line) lists `name`.
pub fn has_filesystem(text: &str, name: &str) -> bool {
    text.lines()
        .filter_map(|l| l.split_whitespace().last())
        .any(|fs| fs == name)
}

/// Whether a boolean sysctl's file content is on (`1`).
pub fn sysctl_on(value: &str) -> bool {
    value.trim().parse::<u32>().is_ok_and(|v| v != 0)
}

/// Whether the kernel modules dir of one release (`/lib/modules/<release>`) has overlayfs,
/// built in or as a loadable module.
pub fn overlay_module_exists(dir: &Path) -> bool {
    ["modules.builtin", "modules.dep"]
        .iter()
        .any(|f| std::fs::read_to_string(dir.join(f)).is_ok_and(|text| lists_overlay_module(&text)))
}

/// Whether `modules.dep`/`modules.builtin` text names the overlay module
/// (`kernel/fs/overlayfs/overlay.ko[.xz|.zst|.gz]`, before the `:` in `modules.dep`).
pub fn lists_overlay_module(text: &str) -> bool {
    text.lines().any(|l| {
        let module = l.split(':').next().unwrap_or("").trim();
        let file = module.rsplit('/').next().unwrap_or("");
        file == "overlay.ko" || file.starts_with("overlay.ko.")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILESYSTEMS: &str = "nodev\tsysfs\nnodev\ttmpfs\n\text4\nnodev\toverlay\n\tbtrfs\n";

    #[test]
    fn filesystems_parse() {
        assert!(has_filesystem(FILESYSTEMS, "overlay"));
        assert!(has_filesystem(FILESYSTEMS, "ext4"));
        assert!(!has_filesystem(FILESYSTEMS, "nodev"));
        assert!(!has_filesystem("nodev\toverlayfs\n", "overlay"));
        assert!(!has_filesystem("", "overlay"));
    }

    #[test]
    fn sysctl_values() {
        assert!(sysctl_on("1\n"));
        assert!(!sysctl_on("0\n"));
        assert!(!sysctl_on(""));
        assert!(!sysctl_on("yes"));
    }

    #[test]
    fn module_lists() {
        assert!(lists_overlay_module(
            "kernel/fs/overlayfs/overlay.ko.xz:\nkernel/net/bridge/bridge.ko: kernel/net/802/stp.ko\n"
        ));
        assert!(lists_overlay_module("kernel/fs/overlayfs/overlay.ko\n"));
        assert!(!lists_overlay_module(
            "kernel/fs/btrfs/btrfs.ko: kernel/fs/overlayfs/overlay.ko\n"
        ));
        assert!(!lists_overlay_module(
            "kernel/fs/overlayfs2/overlayfs.ko:\n"
        ));
    }

    /// A fake `/proc` and `/lib/modules`.
    fn host(
        filesystems: &str,
        forward: Option<&str>,
        nf: Option<&str>,
    ) -> (tempfile::TempDir, Host) {
        let dir = tempfile::tempdir().expect("tmp");
        let proc = dir.path().join("proc");
        std::fs::create_dir_all(proc.join("sys/net/ipv4")).expect("dirs");
        std::fs::create_dir_all(proc.join("sys/kernel")).expect("dirs");
        std::fs::write(proc.join("filesystems"), filesystems).expect("filesystems");
        std::fs::write(proc.join("sys/kernel/osrelease"), "6.1.0-test\n").expect("release");
        if let Some(v) = forward {
            std::fs::write(proc.join("sys/net/ipv4/ip_forward"), v).expect("forward");
        }
        if let Some(v) = nf {
            std::fs::create_dir_all(proc.join("sys/net/bridge")).expect("dirs");
            std::fs::write(proc.join("sys/net/bridge/bridge-nf-call-iptables"), v).expect("nf");
        }
        let host = Host {
            proc,
            modules: dir.path().join("modules"),
        };
        (dir, host)
    }

    #[test]
    fn a_ready_node_has_no_findings() {
        let (_d, h) = host(FILESYSTEMS, Some("1\n"), Some("1\n"));
        let r = check_host(&h, NetworkMode::Native);
        assert_eq!(r, Report::default());
        assert_eq!(r.runtime_problem(), None);
        assert_eq!(r.network_problem(), None);
    }

    #[test]
    fn forwarding_off_is_a_network_problem_in_native_mode_only() {
        let (_d, h) = host(FILESYSTEMS, Some("0\n"), None);
        let r = check_host(&h, NetworkMode::Native);
        assert_eq!(
            r.findings,
            vec![Finding::IpForwardOff, Finding::BridgeNetfilterMissing]
        );
        let (reason, message) = r.network_problem().expect("network problem");
        assert_eq!(reason, "IPForwardingDisabled");
        assert!(message.contains("ip_forward"), "{message}");
        assert_eq!(r.runtime_problem(), None);
        assert!(check_host(&h, NetworkMode::Cni).findings.is_empty());
    }

    #[test]
    fn bridge_netfilter_is_a_warning() {
        let (_d, h) = host(FILESYSTEMS, Some("1"), Some("0"));
        let r = check_host(&h, NetworkMode::Native);
        assert_eq!(r.findings, vec![Finding::BridgeNetfilterOff]);
        assert!(r.findings.iter().all(Finding::is_warning));
        assert_eq!(r.network_problem(), None);
    }

    #[test]
    fn overlay_missing_or_loadable() {
        let (_d, h) = host("nodev\tsysfs\n\text4\n", Some("1"), Some("1"));
        let r = check_host(&h, NetworkMode::Native);
        assert_eq!(r.findings, vec![Finding::OverlayMissing]);
        let (reason, _) = r.runtime_problem().expect("runtime problem");
        assert_eq!(reason, "OverlayfsUnavailable");
        // A module of the running kernel: loaded at the first mount, a warning.
        let dir = h.modules.join("6.1.0-test");
        std::fs::create_dir_all(&dir).expect("modules dir");
        std::fs::write(
            dir.join("modules.dep"),
            "kernel/fs/overlayfs/overlay.ko.xz:\n",
        )
        .expect("modules.dep");
        let r = check_host(&h, NetworkMode::Native);
        assert_eq!(r.findings, vec![Finding::OverlayNotLoaded]);
        assert_eq!(r.runtime_problem(), None);
    }

    #[test]
    fn unreadable_files_are_reported() {
        let (_d, h) = host(FILESYSTEMS, None, Some("1"));
        std::fs::remove_file(h.proc.join("filesystems")).expect("rm");
        let r = check_host(&h, NetworkMode::Native);
        assert_eq!(r.findings.len(), 2, "{:?}", r.findings);
        assert!(
            r.findings
                .iter()
                .all(|f| matches!(f, Finding::Unreadable { .. }))
        );
        assert_eq!(r.runtime_problem(), None);
    }
}
