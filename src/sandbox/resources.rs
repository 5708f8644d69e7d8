//! `UpdatePodSandboxResources`: the pod's resources (the sum of its containers') plus its
//! overhead, checked and written into the pod's own cgroup ([`crate::cgroups::pod`]).

use crate::cgroups::{self, pod::PodLimits};
use crate::cri::v1 as cri;

use super::{SandboxError, SandboxRecord};

/// The limits of `resources` plus `overhead`: the overhead is added to each limit the pod
/// sets; a limit the pod leaves unset (0) stays unset, whatever the overhead. cpusets and
/// unified keys come from `resources`.
pub fn pod_limits(
    overhead: Option<&cri::LinuxContainerResources>,
    resources: Option<&cri::LinuxContainerResources>,
) -> Result<PodLimits, SandboxError> {
    let zero = cri::LinuxContainerResources::default();
    let o = overhead.unwrap_or(&zero);
    let r = resources.unwrap_or(&zero);
    let non_negative = |v: i64, what: &str| {
        u64::try_from(v).map_err(|_| SandboxError::Invalid(format!("{what} {v} is negative")))
    };
    for (v, what) in [
        (o.memory_limit_in_bytes, "overhead memory_limit_in_bytes"),
        (r.memory_limit_in_bytes, "memory_limit_in_bytes"),
        (
            o.memory_swap_limit_in_bytes,
            "overhead memory_swap_limit_in_bytes",
        ),
        (r.memory_swap_limit_in_bytes, "memory_swap_limit_in_bytes"),
    ] {
        non_negative(v, what)?;
    }
    // A limit the pod does not set (0, or -1 for a quota) is no limit: the overhead is added
    // to a limit, never made one of its own.
    let plus_overhead = |pod: i64, over: i64| (pod > 0).then(|| pod.saturating_add(over.max(0)));
    let cpu_shares = match plus_overhead(r.cpu_shares, o.cpu_shares) {
        Some(s) => Some(non_negative(s, "cpu_shares")?),
        None => None,
    };
    let cpu_period = match (o.cpu_period, r.cpu_period) {
        (0, 0) => None,
        (_, p) if p != 0 => Some(non_negative(p, "cpu_period")?),
        (p, _) => Some(non_negative(p, "overhead cpu_period")?),
    };
    let cpu_quota = match r.cpu_quota {
        q if q < 0 => Some(-1),
        0 => None,
        q => Some(q.saturating_add(o.cpu_quota.max(0))),
    };
    let mut hugepages: Vec<(String, u64)> = Vec::new();
    for h in o.hugepage_limits.iter().chain(&r.hugepage_limits) {
        if h.page_size.is_empty() || !h.page_size.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(SandboxError::Invalid(format!(
                "hugepage page size {:?} is invalid",
                h.page_size
            )));
        }
        match hugepages.iter_mut().find(|(s, _)| *s == h.page_size) {
            Some((_, l)) => *l = l.saturating_add(h.limit),
            None => hugepages.push((h.page_size.clone(), h.limit)),
        }
    }
    let mut unified: Vec<(String, String)> = r
        .unified
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    unified.sort();
    Ok(PodLimits {
        cpu_shares,
        cpu_quota,
        cpu_period,
        memory_limit: plus_overhead(r.memory_limit_in_bytes, o.memory_limit_in_bytes),
        memory_swap_limit: plus_overhead(
            r.memory_swap_limit_in_bytes,
            o.memory_swap_limit_in_bytes,
        ),
        cpuset_cpus: (!r.cpuset_cpus.is_empty()).then(|| r.cpuset_cpus.clone()),
        cpuset_mems: (!r.cpuset_mems.is_empty()).then(|| r.cpuset_mems.clone()),
        hugepages,
        unified,
    })
}

/// Writes the pod's new limits into its cgroup (`systemd`: the cgroup parent is a slice).
pub fn update(
    rec: &SandboxRecord,
    systemd: bool,
    overhead: Option<&cri::LinuxContainerResources>,
    resources: Option<&cri::LinuxContainerResources>,
) -> Result<(), SandboxError> {
    let limits = pod_limits(overhead, resources)?;
    let parent = rec
        .config
        .linux
        .as_ref()
        .map(|l| l.cgroup_parent.as_str())
        .unwrap_or_default();
    let dir = cgroups::pod::pod_dir(systemd, parent)?;
    cgroups::pod::apply(cgroups::detect(), &dir, &limits)?;
    tracing::info!(id = %rec.id, cgroup = %dir.display(), ?limits, "pod resources updated");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overhead_adds_to_the_pod_resources() {
        let r = cri::LinuxContainerResources {
            cpu_shares: 1024,
            cpu_quota: 100_000,
            cpu_period: 100_000,
            memory_limit_in_bytes: 256 << 20,
            cpuset_cpus: "0-1".into(),
            ..Default::default()
        };
        let o = cri::LinuxContainerResources {
            cpu_shares: 2,
            cpu_quota: 10_000,
            memory_limit_in_bytes: 16 << 20,
            ..Default::default()
        };
        let l = pod_limits(Some(&o), Some(&r)).expect("limits");
        assert_eq!(l.cpu_shares, Some(1026));
        assert_eq!(l.cpu_quota, Some(110_000));
        assert_eq!(l.cpu_period, Some(100_000));
        assert_eq!(l.memory_limit, Some(272 << 20));
        assert_eq!(l.memory_swap_limit, None);
        assert_eq!(l.cpuset_cpus.as_deref(), Some("0-1"));
        let unlimited = cri::LinuxContainerResources {
            cpu_quota: -1,
            ..Default::default()
        };
        assert_eq!(
            pod_limits(Some(&o), Some(&unlimited))
                .expect("limits")
                .cpu_quota,
            Some(-1)
        );
        assert_eq!(
            pod_limits(None, None).expect("limits"),
            PodLimits::default()
        );
    }

    #[test]
    fn bad_values_are_named() {
        let r = cri::LinuxContainerResources {
            memory_limit_in_bytes: -5,
            ..Default::default()
        };
        let e = pod_limits(None, Some(&r)).expect_err("negative");
        assert!(e.to_string().contains("memory_limit_in_bytes"), "{e}");
        let r = cri::LinuxContainerResources {
            hugepage_limits: vec![cri::HugepageLimit {
                page_size: "../2MB".into(),
                limit: 1,
            }],
            ..Default::default()
        };
        assert!(pod_limits(None, Some(&r)).is_err());
    }
}
