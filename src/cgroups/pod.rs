//! A pod's own cgroup (its `cgroup_parent`, made by the kubelet) and the limits that
//! `UpdatePodSandboxResources` writes into it: CPU weight, quota and period, memory and swap
//! limits, cpusets, hugepage limits and (v2) raw unified keys, on v1 per-controller
//! hierarchies and on v2.

use std::path::{Path, PathBuf};

use super::{CGROUP_ROOT, CgroupError, Layout};

/// Limits for a pod's cgroup; `None` leaves a limit as it is.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PodLimits {
    pub cpu_shares: Option<u64>,
    /// Microseconds per period; `Some(-1)` is "no limit".
    pub cpu_quota: Option<i64>,
    pub cpu_period: Option<u64>,
    pub memory_limit: Option<i64>,
    /// Memory plus swap (v1 semantics), as the CRI gives it.
    pub memory_swap_limit: Option<i64>,
    pub cpuset_cpus: Option<String>,
    pub cpuset_mems: Option<String>,
    /// Page size (`2MB`, `1GB`) → bytes.
    pub hugepages: Vec<(String, u64)>,
    /// cgroup v2 files → values.
    pub unified: Vec<(String, String)>,
}

/// The pod cgroup directory (relative to a hierarchy root) of a `cgroup_parent`: the path
/// itself with the cgroupfs driver; with the systemd driver the slice as systemd nests it
/// (`kubepods-pod1.slice` → `kubepods.slice/kubepods-pod1.slice`).
pub fn pod_dir(systemd: bool, parent: &str) -> Result<PathBuf, CgroupError> {
    let invalid = |reason| CgroupError::InvalidParent {
        parent: parent.to_string(),
        reason,
    };
    if parent.is_empty() {
        return Err(invalid("the pod has no cgroup parent of its own"));
    }
    if systemd {
        if parent.contains('/') || !parent.ends_with(".slice") {
            return Err(invalid(
                "the systemd driver wants a slice name like kubepods-pod1.slice",
            ));
        }
        let dir = super::slice_dir(parent);
        if dir.as_os_str().is_empty() {
            return Err(invalid("the root slice is no pod's own cgroup"));
        }
        return Ok(dir);
    }
    if !parent.starts_with('/') || parent.split('/').any(|c| c == ".." || c == ".") {
        return Err(invalid(
            "the cgroupfs driver wants an absolute path without . or ..",
        ));
    }
    let dir = PathBuf::from(parent.trim_matches('/'));
    if dir.as_os_str().is_empty() {
        return Err(invalid("the root cgroup is no pod's own cgroup"));
    }
    Ok(dir)
}

/// cgroup v1 `cpu.shares` → v2 `cpu.weight` (the OCI runtimes' conversion).
pub fn shares_to_weight(shares: u64) -> u64 {
    if shares == 0 {
        return 0;
    }
    1 + (shares.clamp(2, 262_144) - 2) * 9999 / 262_142
}

/// Writes `limits` into the pod cgroup `rel` (from [`pod_dir`]) under `/sys/fs/cgroup`.
pub fn apply(layout: Layout, rel: &Path, limits: &PodLimits) -> Result<(), CgroupError> {
    apply_under(Path::new(CGROUP_ROOT), layout, rel, limits)
}

/// [`apply`] under another root (tests).
pub fn apply_under(
    root: &Path,
    layout: Layout,
    rel: &Path,
    limits: &PodLimits,
) -> Result<(), CgroupError> {
    let dir = |controller: &str| match layout {
        Layout::V2 => root.join(rel),
        Layout::V1 => root.join(controller).join(rel),
    };
    let mut writes: Vec<(PathBuf, String)> = Vec::new();
    match layout {
        Layout::V1 => {
            if let Some(s) = limits.cpu_shares {
                writes.push((dir("cpu").join("cpu.shares"), s.to_string()));
            }
            if let Some(p) = limits.cpu_period {
                writes.push((dir("cpu").join("cpu.cfs_period_us"), p.to_string()));
            }
            if let Some(q) = limits.cpu_quota {
                writes.push((dir("cpu").join("cpu.cfs_quota_us"), q.to_string()));
            }
            if let Some(m) = limits.memory_limit {
                writes.push((dir("memory").join("memory.limit_in_bytes"), m.to_string()));
            }
            if let Some(s) = limits.memory_swap_limit {
                writes.push((
                    dir("memory").join("memory.memsw.limit_in_bytes"),
                    s.to_string(),
                ));
            }
            for (size, bytes) in &limits.hugepages {
                writes.push((
                    dir("hugetlb").join(format!("hugetlb.{size}.limit_in_bytes")),
                    bytes.to_string(),
                ));
            }
            if let Some((key, _)) = limits.unified.first() {
                return Err(CgroupError::Unsupported(format!(
                    "unified key {key:?} needs cgroup v2; this host has v1"
                )));
            }
        }
        Layout::V2 => {
            if let Some(s) = limits.cpu_shares {
                writes.push((dir("").join("cpu.weight"), shares_to_weight(s).to_string()));
            }
            // cpu.max holds both: written when a quota is given (a period alone would
            // otherwise lift a quota that is there).
            if let Some(q) = limits.cpu_quota {
                let quota = if q > 0 {
                    q.to_string()
                } else {
                    "max".to_string()
                };
                let period = limits.cpu_period.unwrap_or(100_000);
                writes.push((dir("").join("cpu.max"), format!("{quota} {period}")));
            }
            if let Some(m) = limits.memory_limit {
                let v = if m > 0 { m.to_string() } else { "max".into() };
                writes.push((dir("").join("memory.max"), v));
            }
            if let Some(s) = limits.memory_swap_limit {
                // v2 limits swap alone: memory+swap minus memory.
                let v = match (s, limits.memory_limit) {
                    (s, _) if s <= 0 => "max".to_string(),
                    (s, Some(m)) if m > 0 => s.saturating_sub(m).max(0).to_string(),
                    _ => "max".to_string(),
                };
                writes.push((dir("").join("memory.swap.max"), v));
            }
            for (size, bytes) in &limits.hugepages {
                writes.push((
                    dir("").join(format!("hugetlb.{size}.max")),
                    bytes.to_string(),
                ));
            }
            for (key, value) in &limits.unified {
                if key.contains('/') || key.starts_with('.') || key.is_empty() {
                    return Err(CgroupError::Unsupported(format!(
                        "unified key {key:?} is not a cgroup file name"
                    )));
                }
                writes.push((dir("").join(key), value.clone()));
            }
        }
    }
    if let Some(c) = &limits.cpuset_cpus {
        writes.push((dir("cpuset").join("cpuset.cpus"), c.clone()));
    }
    if let Some(m) = &limits.cpuset_mems {
        writes.push((dir("cpuset").join("cpuset.mems"), m.clone()));
    }
    // Every directory first: a pod whose cgroup is missing gets nothing half written.
    for (path, _) in &writes {
        let d = path.parent().unwrap_or(root);
        if !d.is_dir() {
            return Err(CgroupError::Missing(d.to_path_buf()));
        }
    }
    // v1 wants memory.limit_in_bytes <= memory.memsw.limit_in_bytes at every moment: when
    // both rise, memsw must go first; when both fall, memory first. Try one order, then the
    // other, as runc does.
    let is_memsw = |p: &Path| p.ends_with("memory.memsw.limit_in_bytes");
    if let Err(e) = write_all(&writes) {
        if !writes.iter().any(|(p, _)| is_memsw(p)) {
            return Err(e);
        }
        let (memsw, rest): (Vec<_>, Vec<_>) = writes.into_iter().partition(|(p, _)| is_memsw(p));
        write_all(&memsw.into_iter().chain(rest).collect::<Vec<_>>())?;
    }
    Ok(())
}

fn write_all(writes: &[(PathBuf, String)]) -> Result<(), CgroupError> {
    for (path, value) in writes {
        std::fs::write(path, value).map_err(|source| CgroupError::Write {
            path: path.clone(),
            value: value.clone(),
            source,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_dirs_per_driver() {
        assert_eq!(
            pod_dir(false, "/kubepods/burstable/pod1/").expect("dir"),
            PathBuf::from("kubepods/burstable/pod1")
        );
        assert_eq!(
            pod_dir(true, "kubepods-burstable-pod1.slice").expect("dir"),
            PathBuf::from("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice")
        );
        assert!(pod_dir(false, "").is_err());
        assert!(pod_dir(false, "/").is_err());
        assert!(pod_dir(true, "-.slice").is_err());
        assert!(pod_dir(false, "/a/../b").is_err());
        assert!(pod_dir(true, "/kubepods").is_err());
    }

    #[test]
    fn weight_conversion_matches_the_runtimes() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(1024), 39);
        assert_eq!(shares_to_weight(262_144), 10_000);
    }

    fn fake(root: &Path, dirs: &[&str]) {
        for d in dirs {
            std::fs::create_dir_all(root.join(d)).expect("mkdir");
        }
    }

    #[test]
    fn v1_writes_per_controller_and_missing_dirs_write_nothing() {
        let t = tempfile::tempdir().expect("tmp");
        let limits = PodLimits {
            cpu_shares: Some(512),
            cpu_quota: Some(50_000),
            cpu_period: Some(100_000),
            memory_limit: Some(64 << 20),
            cpuset_cpus: Some("0".into()),
            ..Default::default()
        };
        let rel = Path::new("kubepods/pod1");
        fake(t.path(), &["cpu/kubepods/pod1", "memory/kubepods/pod1"]);
        let err = apply_under(t.path(), Layout::V1, rel, &limits).expect_err("no cpuset dir");
        assert!(matches!(err, CgroupError::Missing(_)), "{err}");
        assert!(!t.path().join("cpu/kubepods/pod1/cpu.shares").exists());
        fake(t.path(), &["cpuset/kubepods/pod1"]);
        apply_under(t.path(), Layout::V1, rel, &limits).expect("apply");
        let read = |p: &str| std::fs::read_to_string(t.path().join(p)).expect("read");
        assert_eq!(read("cpu/kubepods/pod1/cpu.shares"), "512");
        assert_eq!(read("cpu/kubepods/pod1/cpu.cfs_quota_us"), "50000");
        assert_eq!(
            read("memory/kubepods/pod1/memory.limit_in_bytes"),
            "67108864"
        );
        assert_eq!(read("cpuset/kubepods/pod1/cpuset.cpus"), "0");
        let unified = PodLimits {
            unified: vec![("memory.high".into(), "1".into())],
            ..Default::default()
        };
        assert!(apply_under(t.path(), Layout::V1, rel, &unified).is_err());
    }

    #[test]
    fn v2_writes_unified_files() {
        let t = tempfile::tempdir().expect("tmp");
        fake(t.path(), &["kubepods/pod1"]);
        let rel = Path::new("kubepods/pod1");
        let limits = PodLimits {
            cpu_shares: Some(1024),
            cpu_quota: Some(-1),
            memory_limit: Some(1 << 30),
            memory_swap_limit: Some(3 << 29),
            unified: vec![("memory.high".into(), "900000000".into())],
            ..Default::default()
        };
        apply_under(t.path(), Layout::V2, rel, &limits).expect("apply");
        let read = |p: &str| {
            std::fs::read_to_string(t.path().join("kubepods/pod1").join(p)).expect("read")
        };
        assert_eq!(read("cpu.weight"), "39");
        assert_eq!(read("cpu.max"), "max 100000");
        assert_eq!(read("memory.max"), "1073741824");
        assert_eq!(read("memory.swap.max"), (1u64 << 29).to_string());
        assert_eq!(read("memory.high"), "900000000");
        let bad = PodLimits {
            unified: vec![("../x".into(), "1".into())],
            ..Default::default()
        };
        assert!(apply_under(t.path(), Layout::V2, rel, &bad).is_err());
    }
}
