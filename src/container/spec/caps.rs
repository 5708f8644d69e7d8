//! Linux capabilities of a container: containerd's default set, CRI add/drop (with `ALL`),
//! privileged = every capability berthd holds.

use std::collections::BTreeSet;

use crate::cri::v1 as cri;
use oci_spec::runtime::{Capabilities, Capability, LinuxCapabilities};

use super::SpecError;

/// Every capability by number (index = `CAP_*` value).
const ALL: &[(&str, Capability)] = &[
    ("CHOWN", Capability::Chown),
    ("DAC_OVERRIDE", Capability::DacOverride),
    ("DAC_READ_SEARCH", Capability::DacReadSearch),
    ("FOWNER", Capability::Fowner),
    ("FSETID", Capability::Fsetid),
    ("KILL", Capability::Kill),
    ("SETGID", Capability::Setgid),
    ("SETUID", Capability::Setuid),
    ("SETPCAP", Capability::Setpcap),
    ("LINUX_IMMUTABLE", Capability::LinuxImmutable),
    ("NET_BIND_SERVICE", Capability::NetBindService),
    ("NET_BROADCAST", Capability::NetBroadcast),
    ("NET_ADMIN", Capability::NetAdmin),
    ("NET_RAW", Capability::NetRaw),
    ("IPC_LOCK", Capability::IpcLock),
    ("IPC_OWNER", Capability::IpcOwner),
    ("SYS_MODULE", Capability::SysModule),
    ("SYS_RAWIO", Capability::SysRawio),
    ("SYS_CHROOT", Capability::SysChroot),
    ("SYS_PTRACE", Capability::SysPtrace),
    ("SYS_PACCT", Capability::SysPacct),
    ("SYS_ADMIN", Capability::SysAdmin),
    ("SYS_BOOT", Capability::SysBoot),
    ("SYS_NICE", Capability::SysNice),
    ("SYS_RESOURCE", Capability::SysResource),
    ("SYS_TIME", Capability::SysTime),
    ("SYS_TTY_CONFIG", Capability::SysTtyConfig),
    ("MKNOD", Capability::Mknod),
    ("LEASE", Capability::Lease),
    ("AUDIT_WRITE", Capability::AuditWrite),
    ("AUDIT_CONTROL", Capability::AuditControl),
    ("SETFCAP", Capability::Setfcap),
    ("MAC_OVERRIDE", Capability::MacOverride),
    ("MAC_ADMIN", Capability::MacAdmin),
    ("SYSLOG", Capability::Syslog),
    ("WAKE_ALARM", Capability::WakeAlarm),
    ("BLOCK_SUSPEND", Capability::BlockSuspend),
    ("AUDIT_READ", Capability::AuditRead),
    ("PERFMON", Capability::Perfmon),
    ("BPF", Capability::Bpf),
    ("CHECKPOINT_RESTORE", Capability::CheckpointRestore),
];

/// containerd's (and Docker's) default set.
pub const DEFAULT: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "MKNOD",
    "NET_RAW",
    "SETGID",
    "SETUID",
    "SETFCAP",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "KILL",
    "AUDIT_WRITE",
];

/// A set of capabilities by number.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CapSet(BTreeSet<usize>);

/// A capability name (`NET_ADMIN`, `CAP_NET_ADMIN`, any case) → its number.
pub fn parse(name: &str) -> Option<usize> {
    let upper = name.trim().to_ascii_uppercase();
    let bare = upper.strip_prefix("CAP_").unwrap_or(&upper);
    ALL.iter().position(|(n, _)| *n == bare)
}

/// The capabilities berthd itself holds (`CapEff` of `/proc/self/status`): what "all"
/// means, as for containerd; a container cannot get more. Falls back to every capability
/// the kernel knows (`/proc/sys/kernel/cap_last_cap`).
fn current() -> BTreeSet<usize> {
    let effective = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        });
    if let Some(mask) = effective {
        return (0..ALL.len()).filter(|n| mask & (1u64 << n) != 0).collect();
    }
    let last = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
        .map(|n| n.min(ALL.len() - 1))
        .unwrap_or(ALL.len() - 1);
    (0..=last).collect()
}

impl CapSet {
    pub fn default_set() -> CapSet {
        CapSet(DEFAULT.iter().filter_map(|n| parse(n)).collect())
    }
    /// Every capability berthd holds.
    pub fn all() -> CapSet {
        CapSet(current())
    }
    pub fn contains(&self, name: &str) -> bool {
        parse(name).is_some_and(|n| self.0.contains(&n))
    }
    /// `CAP_*` names, in number order.
    pub fn names(&self) -> Vec<String> {
        self.0
            .iter()
            .map(|n| format!("CAP_{}", ALL[*n].0))
            .collect()
    }
    pub fn to_oci(&self) -> Capabilities {
        self.0.iter().map(|n| ALL[*n].1).collect()
    }
}

fn parse_list(names: &[String], what: &str) -> Result<(bool, Vec<usize>), SpecError> {
    let mut all = false;
    let mut out = Vec::new();
    for name in names {
        if name.trim().eq_ignore_ascii_case("ALL") {
            all = true;
            continue;
        }
        out.push(
            parse(name).ok_or_else(|| {
                SpecError::Invalid(format!("unknown capability {name:?} in {what}"))
            })?,
        );
    }
    Ok((all, out))
}

/// The bounding/effective/permitted set and the ambient set of a container.
pub fn resolve(
    sc: &cri::LinuxContainerSecurityContext,
    privileged: bool,
) -> Result<(CapSet, CapSet), SpecError> {
    let requested = sc.capabilities.clone().unwrap_or_default();
    let (add_all, add) = parse_list(&requested.add_capabilities, "add_capabilities")?;
    let (drop_all, drop) = parse_list(&requested.drop_capabilities, "drop_capabilities")?;
    let (_, ambient) = parse_list(
        &requested.add_ambient_capabilities,
        "add_ambient_capabilities",
    )?;
    let mut set = if privileged {
        // Privileged containers get every capability, whatever the lists say (containerd).
        CapSet::all()
    } else {
        let mut set = CapSet::default_set();
        if add_all {
            set = CapSet::all();
        }
        if drop_all {
            set.0.clear();
        }
        set.0.extend(add);
        for d in drop {
            set.0.remove(&d);
        }
        set
    };
    // Ambient capabilities must also be permitted (and inheritable, see `to_linux`).
    set.0.extend(ambient.iter().copied());
    Ok((set, CapSet(ambient.into_iter().collect())))
}

/// The OCI capabilities of a container.
pub fn to_linux(set: &CapSet, ambient: &CapSet) -> LinuxCapabilities {
    let caps = set.to_oci();
    let amb = ambient.to_oci();
    let mut out = LinuxCapabilities::default();
    out.set_bounding(Some(caps.clone()))
        .set_effective(Some(caps.clone()))
        .set_permitted(Some(caps))
        .set_inheritable((!amb.is_empty()).then(|| amb.clone()))
        .set_ambient((!amb.is_empty()).then_some(amb));
    out
}
