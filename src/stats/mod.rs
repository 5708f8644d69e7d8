//! Container and pod resource usage as the CRI reports it (`ContainerStats`,
//! `PodSandboxStats`): CPU and memory from the cgroups ([`crate::cgroups::stats`]), CPU
//! usage in nano-cores as a rate between two samples kept per object ([`Rates`]), the
//! writable layer's bytes and inodes (from the background cache of [`fs`], never a walk per
//! call), process counts, and a pod's network counters read inside its network namespace
//! (on a dedicated thread, see [`crate::ns`]) from `/proc/thread-self/net/dev`.
//!
//! A pod with a cgroup of its own (`cgroup_parent`) is read there; one without adds up its
//! containers. Missing cgroups (a stopped container) leave numbers out, never fail.
//! [`metrics`] gives the same numbers, and more, as cAdvisor-named metrics.

pub mod fs;
pub mod metrics;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::cgroups::stats::{CgroupSample, MemorySample};
use crate::cgroups::{self, Layout};
use crate::container::manager::ContainerRecord;
use crate::cri::v1 as cri;
use crate::ids::now_nanos;
use crate::sandbox::{Phase as PodPhase, SandboxRecord};

/// The interface the kubelet treats as a pod's own (the one berth and CNI plugins make).
pub const DEFAULT_INTERFACE: &str = "eth0";

/// Two CPU samples closer than this give no new rate; the last one is reported again.
const MIN_WINDOW_NS: i64 = 100_000_000;

#[derive(Debug, Clone, Copy)]
struct RateEntry {
    at: i64,
    usage: u64,
    rate: Option<u64>,
}

/// Cumulative CPU samples kept per object (container or pod id) to answer a usage rate.
#[derive(Debug, Default)]
pub struct Rates {
    last: Mutex<HashMap<String, RateEntry>>,
}

impl Rates {
    /// Records `usage` (core-ns) taken at `at` (ns) for `key`, and answers nano-cores since
    /// the previous sample: `None` for the first sample, or when the counter went backwards
    /// (a new cgroup under the same key).
    pub fn observe(&self, key: &str, at: i64, usage: u64) -> Option<u64> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let rate = match last.get(key).copied() {
            Some(prev) if usage >= prev.usage => {
                let dt = at - prev.at;
                if dt < MIN_WINDOW_NS {
                    return prev.rate;
                }
                Some(((u128::from(usage - prev.usage) * 1_000_000_000) / dt as u128) as u64)
            }
            // The first sample, or a counter that went backwards: a new baseline.
            _ => None,
        };
        last.insert(key.to_string(), RateEntry { at, usage, rate });
        rate
    }

    /// Forgets every key for which `keep` says no (objects that are gone).
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        last.retain(|k, _| keep(k));
    }

    pub fn len(&self) -> usize {
        self.last.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Counters of one network interface.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct InterfaceSample {
    pub name: String,
    pub rx_bytes: u64,
    pub rx_packets: u64,
    pub rx_errors: u64,
    pub rx_dropped: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
    pub tx_errors: u64,
    pub tx_dropped: u64,
}

/// Parses `/proc/net/dev` (two header lines, then `name: 8 receive and 8 transmit
/// counters`), leaving out `lo`.
pub fn parse_net_dev(text: &str) -> Vec<InterfaceSample> {
    text.lines()
        .skip(2)
        .filter_map(|l| {
            let (name, rest) = l.split_once(':')?;
            let name = name.trim();
            let n: Vec<u64> = rest
                .split_whitespace()
                .map(|v| v.parse().unwrap_or(0))
                .collect();
            if name == "lo" || n.len() < 16 {
                return None;
            }
            Some(InterfaceSample {
                name: name.to_string(),
                rx_bytes: n[0],
                rx_packets: n[1],
                rx_errors: n[2],
                rx_dropped: n[3],
                tx_bytes: n[8],
                tx_packets: n[9],
                tx_errors: n[10],
                tx_dropped: n[11],
            })
        })
        .collect()
}

/// The interface counters inside the network namespace pinned at `netns`, read on a
/// dedicated thread that joined it.
pub async fn read_pod_network(netns: &Path) -> Option<Vec<InterfaceSample>> {
    match crate::ns::run_in_netns(netns, || {
        std::fs::read_to_string("/proc/thread-self/net/dev")
    })
    .await
    {
        Ok(Ok(text)) => Some(parse_net_dev(&text)),
        Ok(Err(e)) => {
            tracing::debug!(netns = %netns.display(), error = %e, "reading pod network counters");
            None
        }
        Err(e) => {
            tracing::debug!(netns = %netns.display(), error = %e, "joining the pod netns");
            None
        }
    }
}

fn u64v(value: u64) -> Option<cri::UInt64Value> {
    Some(cri::UInt64Value { value })
}

/// The CRI form of one interface's counters.
pub fn interface_usage(i: &InterfaceSample) -> cri::NetworkInterfaceUsage {
    cri::NetworkInterfaceUsage {
        name: i.name.clone(),
        rx_bytes: u64v(i.rx_bytes),
        rx_errors: u64v(i.rx_errors),
        tx_bytes: u64v(i.tx_bytes),
        tx_errors: u64v(i.tx_errors),
    }
}

/// The CRI `NetworkUsage` of a pod's interfaces: `eth0` (else the first) as the default.
pub fn network_usage(at: i64, ifaces: &[InterfaceSample]) -> cri::NetworkUsage {
    let default = ifaces
        .iter()
        .position(|i| i.name == DEFAULT_INTERFACE)
        .or(if ifaces.is_empty() { None } else { Some(0) });
    cri::NetworkUsage {
        timestamp: at,
        default_interface: default.map(|d| interface_usage(&ifaces[d])),
        interfaces: ifaces
            .iter()
            .enumerate()
            .filter(|(n, _)| Some(*n) != default)
            .map(|(_, i)| interface_usage(i))
            .collect(),
    }
}

fn cpu_usage(at: i64, usage: Option<u64>, nano_cores: Option<u64>) -> cri::CpuUsage {
    cri::CpuUsage {
        timestamp: at,
        usage_core_nano_seconds: usage.map(|value| cri::UInt64Value { value }),
        usage_nano_cores: nano_cores.map(|value| cri::UInt64Value { value }),
        psi: None,
    }
}

fn memory_usage(at: i64, m: Option<MemorySample>) -> cri::MemoryUsage {
    match m {
        Some(m) => cri::MemoryUsage {
            timestamp: at,
            working_set_bytes: u64v(m.working_set),
            available_bytes: m.available().and_then(u64v),
            usage_bytes: u64v(m.usage),
            rss_bytes: u64v(m.rss),
            page_faults: u64v(m.page_faults),
            major_page_faults: u64v(m.major_page_faults),
            psi: None,
        },
        None => cri::MemoryUsage {
            timestamp: at,
            ..Default::default()
        },
    }
}

/// A container's numbers as read once, before they become CRI messages.
#[derive(Debug, Clone)]
pub struct ContainerSample {
    pub at: i64,
    pub cgroup: CgroupSample,
    pub nano_cores: Option<u64>,
    /// Writable layer bytes and inodes, from the filesystem cache.
    pub writable: Option<(u64, u64)>,
    /// When the writable layer was measured.
    pub writable_at: i64,
}

/// Reads stats for one berthd's containers and pods.
pub struct Collector {
    layout: Layout,
    systemd: bool,
    root: PathBuf,
    rates: Rates,
    fs: Arc<fs::FsUsage>,
}

impl Collector {
    pub fn new(layout: Layout, systemd: bool, root: PathBuf, fs: Arc<fs::FsUsage>) -> Collector {
        Collector {
            layout,
            systemd,
            root,
            rates: Rates::default(),
            fs,
        }
    }

    /// Where containers' writable layers live (their filesystem's id in stats).
    pub fn writable_root(&self) -> PathBuf {
        self.root.join("containers")
    }

    /// Reads a container's cgroup (blocking file I/O) and its writable layer's usage as the
    /// filesystem cache last saw it.
    pub fn sample_container(&self, rec: &ContainerRecord) -> ContainerSample {
        let at = now_nanos();
        let cgroup = if rec.cgroups_path.is_empty() {
            CgroupSample::default()
        } else {
            cgroups::stats::read(self.layout, &cgroups::relative_dir(&rec.cgroups_path))
        };
        let nano_cores = cgroup
            .cpu_usage_ns
            .and_then(|u| self.rates.observe(&format!("c/{}", rec.id), at, u));
        let layer = self.fs.writable(&rec.id);
        ContainerSample {
            at,
            cgroup,
            nano_cores,
            writable: layer.map(|(_, u)| (u.bytes, u.inodes)),
            writable_at: layer.map(|(t, _)| t).unwrap_or(at),
        }
    }

    /// The CRI stats of a container from a sample.
    pub fn container_stats(
        &self,
        rec: &ContainerRecord,
        s: &ContainerSample,
    ) -> cri::ContainerStats {
        cri::ContainerStats {
            attributes: Some(cri::ContainerAttributes {
                id: rec.id.clone(),
                metadata: rec.config.metadata.clone(),
                labels: rec.config.labels.clone(),
                annotations: rec.config.annotations.clone(),
            }),
            cpu: Some(cpu_usage(s.at, s.cgroup.cpu_usage_ns, s.nano_cores)),
            memory: Some(memory_usage(s.at, s.cgroup.memory)),
            writable_layer: Some(cri::FilesystemUsage {
                timestamp: s.writable_at,
                fs_id: Some(cri::FilesystemIdentifier {
                    mountpoint: self.fs.container_mountpoint(),
                }),
                used_bytes: s.writable.and_then(|w| u64v(w.0)),
                inodes_used: s.writable.and_then(|w| u64v(w.1)),
            }),
            swap: None,
            io: None,
        }
    }

    /// The cgroup directory of a pod of its own (`cgroup_parent`), if it names one.
    fn pod_cgroup(&self, pod: &SandboxRecord) -> Option<PathBuf> {
        let parent = pod
            .config
            .linux
            .as_ref()
            .map(|l| l.cgroup_parent.as_str())?;
        if parent.is_empty() {
            return None;
        }
        cgroups::pod::pod_dir(self.systemd, parent).ok()
    }

    /// A pod's stats: its cgroup (or its containers added up), its containers, its network
    /// (read inside its netns when it has its own and is ready).
    pub async fn pod_stats(
        &self,
        pod: &SandboxRecord,
        containers: Vec<(ContainerRecord, ContainerSample)>,
    ) -> cri::PodSandboxStats {
        let at = now_nanos();
        let own = self.pod_cgroup(pod);
        let layout = self.layout;
        let cgroup = match own {
            Some(rel) => {
                match tokio::task::spawn_blocking(move || cgroups::stats::read(layout, &rel)).await
                {
                    Ok(s) if !s.is_empty() => s,
                    _ => CgroupSample::sum(containers.iter().map(|(_, s)| &s.cgroup)),
                }
            }
            None => CgroupSample::sum(containers.iter().map(|(_, s)| &s.cgroup)),
        };
        let nano_cores = cgroup
            .cpu_usage_ns
            .and_then(|u| self.rates.observe(&format!("p/{}", pod.id), at, u));
        let network = match pod.netns_path() {
            Some(ns) if pod.phase == PodPhase::Ready => read_pod_network(&ns)
                .await
                .map(|ifaces| network_usage(now_nanos(), &ifaces)),
            _ => None,
        };
        cri::PodSandboxStats {
            attributes: Some(cri::PodSandboxAttributes {
                id: pod.id.clone(),
                metadata: pod.config.metadata.clone(),
                labels: pod.config.labels.clone(),
                annotations: pod.config.annotations.clone(),
            }),
            linux: Some(cri::LinuxPodSandboxStats {
                cpu: Some(cpu_usage(at, cgroup.cpu_usage_ns, nano_cores)),
                memory: Some(memory_usage(at, cgroup.memory)),
                network,
                process: Some(cri::ProcessUsage {
                    timestamp: at,
                    process_count: cgroup.pids.and_then(u64v),
                }),
                containers: containers
                    .iter()
                    .map(|(rec, s)| self.container_stats(rec, s))
                    .collect(),
                io: None,
            }),
            windows: None,
        }
    }

    /// Forgets the CPU samples of containers not in `live` (ids).
    pub fn forget_containers_except(&self, live: &HashSet<&str>) {
        self.rates
            .retain(|k| k.strip_prefix("c/").is_none_or(|id| live.contains(id)));
    }

    /// Forgets the CPU samples of pods not in `live` (ids).
    pub fn forget_pods_except(&self, live: &HashSet<&str>) {
        self.rates
            .retain(|k| k.strip_prefix("p/").is_none_or(|id| live.contains(id)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_nano_cores_between_samples() {
        let r = Rates::default();
        assert_eq!(r.observe("a", 0, 0), None, "first sample: no rate yet");
        // One core for one second.
        assert_eq!(
            r.observe("a", 1_000_000_000, 1_000_000_000),
            Some(1_000_000_000)
        );
        // A sample too close to the last repeats its rate.
        assert_eq!(
            r.observe("a", 1_000_000_001, 1_000_000_000),
            Some(1_000_000_000)
        );
        // Half a core over the next two seconds.
        assert_eq!(
            r.observe("a", 3_000_000_000, 2_000_000_000),
            Some(500_000_000)
        );
        // A counter that went back is a new cgroup: start over.
        assert_eq!(r.observe("a", 4_000_000_000, 10), None);
        r.retain(|k| k != "a");
        assert!(r.is_empty());
    }

    #[test]
    fn net_dev_parses_and_leaves_out_loopback() {
        let text = "Inter-|   Receive                                                |  Transmit\n \
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    \
lo:     100       1    0    0    0     0          0         0      100       1    0    0    0     0       0          0\n  \
eth0:    5000      40    2    0    0     0          0         0     3000      30    1    0    0     0       0          0\n";
        let v = parse_net_dev(text);
        assert_eq!(
            v,
            vec![InterfaceSample {
                name: "eth0".into(),
                rx_bytes: 5000,
                rx_packets: 40,
                rx_errors: 2,
                rx_dropped: 0,
                tx_bytes: 3000,
                tx_packets: 30,
                tx_errors: 1,
                tx_dropped: 0,
            }]
        );
        let n = network_usage(7, &v);
        assert_eq!(n.timestamp, 7);
        assert_eq!(n.default_interface.expect("eth0").name, "eth0");
        assert!(n.interfaces.is_empty());
        assert!(network_usage(1, &[]).default_interface.is_none());
    }
}
