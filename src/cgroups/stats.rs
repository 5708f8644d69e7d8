//! Resource usage read from a cgroup, on v1 per-controller hierarchies (`cpuacct`, `memory`,
//! `pids`) and on the v2 unified hierarchy: cumulative CPU time, memory usage, the kubelet's
//! working set (usage minus inactive file pages), RSS, page faults, the memory limit and the
//! number of tasks. A file that is absent (the cgroup is gone, or the controller is not
//! mounted) leaves its numbers unknown rather than failing: stats of a container that just
//! stopped are still an answer.

use std::path::Path;

use super::{CGROUP_ROOT, Layout};

/// v1 reports "no limit" as a huge page-aligned number (`PAGE_COUNTER_MAX` × page size); any
/// limit at or above this is treated as none.
const V1_UNLIMITED: u64 = 1 << 62;

/// What one cgroup's memory controller says.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemorySample {
    /// Everything charged: anon, page cache, kernel (v1 `memory.usage_in_bytes`, v2
    /// `memory.current`).
    pub usage: u64,
    /// `usage` minus inactive file pages, floored at 0 (the kubelet's eviction signal).
    pub working_set: u64,
    /// Anonymous and swap cache memory (v1 `total_rss`, v2 `anon`).
    pub rss: u64,
    pub page_faults: u64,
    pub major_page_faults: u64,
    /// The memory limit in bytes; `None` when there is none.
    pub limit: Option<u64>,
}

impl MemorySample {
    /// Bytes left before the limit (`limit − working set`); `None` without a limit.
    pub fn available(&self) -> Option<u64> {
        self.limit.map(|l| l.saturating_sub(self.working_set))
    }
}

/// One reading of a cgroup; `None` where the kernel had no answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CgroupSample {
    /// Cumulative CPU time of all its tasks, in nanoseconds.
    pub cpu_usage_ns: Option<u64>,
    pub memory: Option<MemorySample>,
    /// Tasks (processes and threads) in it.
    pub pids: Option<u64>,
}

impl CgroupSample {
    /// Whether the kernel answered anything at all (the cgroup exists).
    pub fn is_empty(&self) -> bool {
        self.cpu_usage_ns.is_none() && self.memory.is_none() && self.pids.is_none()
    }

    /// The sum of several samples (a pod without a cgroup of its own adds its containers).
    /// A number is known in the sum when it is known in at least one part; limits add only
    /// when every part has one.
    pub fn sum<'a>(samples: impl IntoIterator<Item = &'a CgroupSample>) -> CgroupSample {
        let mut out = CgroupSample::default();
        let mut all_limited = true;
        for s in samples {
            if let Some(c) = s.cpu_usage_ns {
                *out.cpu_usage_ns.get_or_insert(0) += c;
            }
            if let Some(p) = s.pids {
                *out.pids.get_or_insert(0) += p;
            }
            if let Some(m) = s.memory {
                let o = out.memory.get_or_insert_with(MemorySample::default);
                o.usage += m.usage;
                o.working_set += m.working_set;
                o.rss += m.rss;
                o.page_faults += m.page_faults;
                o.major_page_faults += m.major_page_faults;
                match (m.limit, all_limited) {
                    (Some(l), true) => o.limit = Some(o.limit.unwrap_or(0) + l),
                    _ => {
                        all_limited = false;
                        o.limit = None;
                    }
                }
            }
        }
        out
    }
}

/// Reads the cgroup at `rel` (relative to each hierarchy root) under `/sys/fs/cgroup`.
pub fn read(layout: Layout, rel: &Path) -> CgroupSample {
    read_under(Path::new(CGROUP_ROOT), layout, rel)
}

/// [`read`] under another root (tests use fixture trees).
pub fn read_under(root: &Path, layout: Layout, rel: &Path) -> CgroupSample {
    match layout {
        Layout::V1 => read_v1(root, rel),
        Layout::V2 => read_v2(&root.join(rel)),
    }
}

fn read_string(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

fn read_u64(path: &Path) -> Option<u64> {
    read_string(path)?.trim().parse().ok()
}

/// The value of `key` in a flat-keyed file (`memory.stat`, `cpu.stat`).
fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

fn working_set(usage: u64, inactive_file: u64) -> u64 {
    usage.saturating_sub(inactive_file)
}

fn read_v1(root: &Path, rel: &Path) -> CgroupSample {
    let cpu_usage_ns = read_u64(&root.join("cpuacct").join(rel).join("cpuacct.usage"));
    let mem = root.join("memory").join(rel);
    let memory = read_u64(&mem.join("memory.usage_in_bytes")).map(|usage| {
        let stat = read_string(&mem.join("memory.stat")).unwrap_or_default();
        let get = |k| keyed(&stat, k).unwrap_or(0);
        // hierarchical_memory_limit is the effective limit (the smallest of the ancestors').
        let limit = keyed(&stat, "hierarchical_memory_limit")
            .or_else(|| read_u64(&mem.join("memory.limit_in_bytes")))
            .filter(|l| *l < V1_UNLIMITED);
        MemorySample {
            usage,
            working_set: working_set(usage, get("total_inactive_file")),
            rss: get("total_rss"),
            page_faults: get("total_pgfault"),
            major_page_faults: get("total_pgmajfault"),
            limit,
        }
    });
    let pids = read_u64(&root.join("pids").join(rel).join("pids.current"));
    CgroupSample {
        cpu_usage_ns,
        memory,
        pids,
    }
}

fn read_v2(dir: &Path) -> CgroupSample {
    let cpu_usage_ns = read_string(&dir.join("cpu.stat"))
        .and_then(|s| keyed(&s, "usage_usec"))
        .map(|us| us.saturating_mul(1000));
    let memory = read_u64(&dir.join("memory.current")).map(|usage| {
        let stat = read_string(&dir.join("memory.stat")).unwrap_or_default();
        let get = |k| keyed(&stat, k).unwrap_or(0);
        // "max" (no limit) does not parse: None.
        let limit = read_u64(&dir.join("memory.max"));
        MemorySample {
            usage,
            working_set: working_set(usage, get("inactive_file")),
            rss: get("anon"),
            page_faults: get("pgfault"),
            major_page_faults: get("pgmajfault"),
            limit,
        }
    });
    let pids = read_u64(&dir.join("pids.current"));
    CgroupSample {
        cpu_usage_ns,
        memory,
        pids,
    }
}

/// The further numbers cAdvisor's container metrics carry (read for
/// `ListPodSandboxMetrics` only); `None` where this layout or kernel has no answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DetailSample {
    pub cpu_user_ns: Option<u64>,
    pub cpu_system_ns: Option<u64>,
    pub cfs_periods: Option<u64>,
    pub cfs_throttled_periods: Option<u64>,
    pub cfs_throttled_ns: Option<u64>,
    pub memory_cache: Option<u64>,
    pub memory_mapped_file: Option<u64>,
    pub memory_swap: Option<u64>,
    pub memory_kernel: Option<u64>,
    pub memory_failcnt: Option<u64>,
    pub memory_max_usage: Option<u64>,
    pub oom_kills: Option<u64>,
    /// The tasks' limit (`pids.max`); `None` when unlimited.
    pub pids_max: Option<u64>,
    /// Process ids in the cgroup (`cgroup.procs`).
    pub procs: Vec<i32>,
}

/// Reads the details of the cgroup at `rel` under `/sys/fs/cgroup`.
pub fn read_detail(layout: Layout, rel: &Path) -> DetailSample {
    read_detail_under(Path::new(CGROUP_ROOT), layout, rel)
}

/// USER_HZ: the unit of v1 `cpuacct.stat`.
const USER_HZ_NS: u64 = 10_000_000;

fn procs(path: &Path) -> Vec<i32> {
    read_string(path)
        .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// [`read_detail`] under another root (tests use fixture trees).
pub fn read_detail_under(root: &Path, layout: Layout, rel: &Path) -> DetailSample {
    match layout {
        Layout::V1 => {
            let acct = read_string(&root.join("cpuacct").join(rel).join("cpuacct.stat"))
                .unwrap_or_default();
            let cpu = read_string(&root.join("cpu").join(rel).join("cpu.stat")).unwrap_or_default();
            let mem = root.join("memory").join(rel);
            let stat = read_string(&mem.join("memory.stat")).unwrap_or_default();
            let oom = read_string(&mem.join("memory.oom_control")).unwrap_or_default();
            let pids = root.join("pids").join(rel);
            DetailSample {
                cpu_user_ns: keyed(&acct, "user").map(|t| t * USER_HZ_NS),
                cpu_system_ns: keyed(&acct, "system").map(|t| t * USER_HZ_NS),
                cfs_periods: keyed(&cpu, "nr_periods"),
                cfs_throttled_periods: keyed(&cpu, "nr_throttled"),
                cfs_throttled_ns: keyed(&cpu, "throttled_time"),
                memory_cache: keyed(&stat, "total_cache"),
                memory_mapped_file: keyed(&stat, "total_mapped_file"),
                memory_swap: keyed(&stat, "total_swap"),
                memory_kernel: read_u64(&mem.join("memory.kmem.usage_in_bytes")),
                memory_failcnt: read_u64(&mem.join("memory.failcnt")),
                memory_max_usage: read_u64(&mem.join("memory.max_usage_in_bytes")),
                oom_kills: keyed(&oom, "oom_kill"),
                pids_max: read_u64(&pids.join("pids.max")),
                procs: procs(&mem.join("cgroup.procs")),
            }
        }
        Layout::V2 => {
            let dir = root.join(rel);
            let cpu = read_string(&dir.join("cpu.stat")).unwrap_or_default();
            let stat = read_string(&dir.join("memory.stat")).unwrap_or_default();
            let events = read_string(&dir.join("memory.events")).unwrap_or_default();
            let us = |k| keyed(&cpu, k).map(|v| v.saturating_mul(1000));
            DetailSample {
                cpu_user_ns: us("user_usec"),
                cpu_system_ns: us("system_usec"),
                cfs_periods: keyed(&cpu, "nr_periods"),
                cfs_throttled_periods: keyed(&cpu, "nr_throttled"),
                cfs_throttled_ns: us("throttled_usec"),
                memory_cache: keyed(&stat, "file"),
                memory_mapped_file: keyed(&stat, "file_mapped"),
                memory_swap: read_u64(&dir.join("memory.swap.current")),
                memory_kernel: keyed(&stat, "kernel"),
                memory_failcnt: keyed(&events, "max"),
                memory_max_usage: read_u64(&dir.join("memory.peak")),
                oom_kills: keyed(&events, "oom_kill"),
                pids_max: read_u64(&dir.join("pids.max")),
                procs: procs(&dir.join("cgroup.procs")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::create_dir_all(dir).expect("mkdir");
        std::fs::write(dir.join(name), text).expect("write");
    }

    #[test]
    fn v2_parser_reads_a_fixture_cgroup() {
        let root = tempfile::tempdir().expect("tmp");
        let dir = root.path().join("kubepods/pod1/c1");
        write(
            &dir,
            "cpu.stat",
            "usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\nnr_periods 0\n",
        );
        write(&dir, "memory.current", "104857600\n");
        write(
            &dir,
            "memory.stat",
            "anon 52428800\nfile 41943040\nkernel 1048576\nactive_file 10485760\n\
             inactive_file 31457280\npgfault 12345\npgmajfault 7\n",
        );
        write(&dir, "memory.max", "max\n");
        write(&dir, "pids.current", "3\n");
        let s = read_under(root.path(), Layout::V2, Path::new("kubepods/pod1/c1"));
        assert_eq!(s.cpu_usage_ns, Some(2_500_000_000));
        assert_eq!(s.pids, Some(3));
        let m = s.memory.expect("memory");
        assert_eq!(m.usage, 104_857_600);
        assert_eq!(m.working_set, 104_857_600 - 31_457_280);
        assert_eq!(m.rss, 52_428_800);
        assert_eq!((m.page_faults, m.major_page_faults), (12345, 7));
        assert_eq!(m.limit, None);
        assert_eq!(m.available(), None);

        write(&dir, "memory.max", "209715200\n");
        let m = read_under(root.path(), Layout::V2, Path::new("kubepods/pod1/c1"))
            .memory
            .expect("memory");
        assert_eq!(m.limit, Some(209_715_200));
        assert_eq!(m.available(), Some(209_715_200 - m.working_set));
    }

    #[test]
    fn v1_parser_reads_per_controller_hierarchies() {
        let root = tempfile::tempdir().expect("tmp");
        let rel = Path::new("berth/c1");
        write(
            &root.path().join("cpuacct").join(rel),
            "cpuacct.usage",
            "987654321\n",
        );
        let mem = root.path().join("memory").join(rel);
        write(&mem, "memory.usage_in_bytes", "1000\n");
        write(&mem, "memory.limit_in_bytes", "9223372036854771712\n");
        write(
            &mem,
            "memory.stat",
            "cache 10\nrss 20\nhierarchical_memory_limit 9223372036854771712\n\
             total_rss 600\ntotal_inactive_file 300\ntotal_pgfault 40\ntotal_pgmajfault 2\n",
        );
        let s = read_under(root.path(), Layout::V1, rel);
        assert_eq!(s.cpu_usage_ns, Some(987_654_321));
        assert_eq!(s.pids, None, "no pids hierarchy in the fixture");
        let m = s.memory.expect("memory");
        assert_eq!((m.usage, m.working_set, m.rss), (1000, 700, 600));
        assert_eq!((m.page_faults, m.major_page_faults), (40, 2));
        assert_eq!(m.limit, None, "the v1 'unlimited' value is no limit");
    }

    #[test]
    fn details_parse_on_v1_and_v2() {
        let root = tempfile::tempdir().expect("tmp");
        let dir = root.path().join("c");
        write(
            &dir,
            "cpu.stat",
            "usage_usec 30\nuser_usec 20\nsystem_usec 10\nnr_periods 5\nnr_throttled 2\nthrottled_usec 7\n",
        );
        write(&dir, "memory.stat", "file 100\nfile_mapped 40\nkernel 9\n");
        write(
            &dir,
            "memory.events",
            "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n",
        );
        write(&dir, "pids.max", "max\n");
        write(&dir, "cgroup.procs", "12\n34\n");
        let d = read_detail_under(root.path(), Layout::V2, Path::new("c"));
        assert_eq!(
            (d.cpu_user_ns, d.cpu_system_ns),
            (Some(20_000), Some(10_000))
        );
        assert_eq!(
            (d.cfs_periods, d.cfs_throttled_periods, d.cfs_throttled_ns),
            (Some(5), Some(2), Some(7000))
        );
        assert_eq!(
            (d.memory_cache, d.memory_mapped_file, d.memory_kernel),
            (Some(100), Some(40), Some(9))
        );
        assert_eq!(
            (d.memory_failcnt, d.oom_kills, d.pids_max),
            (Some(3), Some(1), None)
        );
        assert_eq!(d.procs, vec![12, 34]);

        let rel = Path::new("b/c");
        write(
            &root.path().join("cpuacct").join(rel),
            "cpuacct.stat",
            "user 150\nsystem 50\n",
        );
        write(
            &root.path().join("memory").join(rel),
            "memory.oom_control",
            "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        );
        write(&root.path().join("pids").join(rel), "pids.max", "100\n");
        let d = read_detail_under(root.path(), Layout::V1, rel);
        assert_eq!(
            (d.cpu_user_ns, d.cpu_system_ns),
            (Some(1_500_000_000), Some(500_000_000))
        );
        assert_eq!((d.oom_kills, d.pids_max), (Some(2), Some(100)));
    }

    #[test]
    fn inactive_file_above_usage_floors_at_zero_and_missing_cgroups_are_empty() {
        assert_eq!(working_set(100, 300), 0);
        let root = tempfile::tempdir().expect("tmp");
        assert!(read_under(root.path(), Layout::V1, Path::new("gone")).is_empty());
        assert!(read_under(root.path(), Layout::V2, Path::new("gone")).is_empty());
    }

    #[test]
    fn sums_add_known_numbers_and_limits_only_when_all_are_limited() {
        let a = CgroupSample {
            cpu_usage_ns: Some(10),
            memory: Some(MemorySample {
                usage: 5,
                working_set: 4,
                limit: Some(100),
                ..Default::default()
            }),
            pids: Some(1),
        };
        let b = CgroupSample {
            cpu_usage_ns: Some(5),
            memory: Some(MemorySample {
                usage: 1,
                working_set: 1,
                limit: None,
                ..Default::default()
            }),
            pids: None,
        };
        let s = CgroupSample::sum([&a, &b]);
        assert_eq!(s.cpu_usage_ns, Some(15));
        assert_eq!(s.pids, Some(1));
        let m = s.memory.expect("memory");
        assert_eq!((m.usage, m.working_set, m.limit), (6, 5, None));
        assert_eq!(
            CgroupSample::sum([&a, &a]).memory.and_then(|m| m.limit),
            Some(200)
        );
        assert!(CgroupSample::sum([]).is_empty());
    }
}
