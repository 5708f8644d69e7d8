//! cAdvisor-named container metrics for `ListMetricDescriptors` and `ListPodSandboxMetrics`
//! (what the kubelet reads in place of cAdvisor with `PodAndContainerStatsFromCRI`): CPU,
//! memory, filesystem, network, processes and the container's spec, with cAdvisor's names,
//! types and label keys. Every metric carries the base labels `id`, `name`, `image` (the
//! kubelet adds `namespace`, `pod`, `container`), then its own (`interface`, `device`, …).
//!
//! The CRI carries integer values: metrics cAdvisor counts in seconds are whole seconds.
//! Network metrics are the pod's (its interfaces), reported at the pod level.

use std::path::Path;

use super::{Collector, ContainerSample, InterfaceSample};
use crate::cgroups::{self, stats::DetailSample};
use crate::container::manager::ContainerRecord;
use crate::cri::v1 as cri;
use crate::ids::now_nanos;
use crate::sandbox::SandboxRecord;

/// The labels every metric starts with.
pub const BASE_LABELS: [&str; 3] = ["id", "name", "image"];

use cri::MetricType::{Counter, Gauge};

/// (name, help, labels after the base ones, type) of every metric berth describes.
const DESCRIPTORS: &[(&str, &str, &[&str], cri::MetricType)] = &[
    (
        "container_cpu_usage_seconds_total",
        "Cumulative cpu time consumed in seconds.",
        &[],
        Counter,
    ),
    (
        "container_cpu_user_seconds_total",
        "Cumulative user cpu time consumed in seconds.",
        &[],
        Counter,
    ),
    (
        "container_cpu_system_seconds_total",
        "Cumulative system cpu time consumed in seconds.",
        &[],
        Counter,
    ),
    (
        "container_cpu_cfs_periods_total",
        "Number of elapsed enforcement period intervals.",
        &[],
        Counter,
    ),
    (
        "container_cpu_cfs_throttled_periods_total",
        "Number of throttled period intervals.",
        &[],
        Counter,
    ),
    (
        "container_cpu_cfs_throttled_seconds_total",
        "Total time duration the container has been throttled.",
        &[],
        Counter,
    ),
    (
        "container_memory_cache",
        "Number of bytes of page cache memory.",
        &[],
        Gauge,
    ),
    ("container_memory_rss", "Size of RSS in bytes.", &[], Gauge),
    (
        "container_memory_kernel_usage",
        "Size of kernel memory allocated in bytes.",
        &[],
        Gauge,
    ),
    (
        "container_memory_mapped_file",
        "Size of memory mapped files in bytes.",
        &[],
        Gauge,
    ),
    (
        "container_memory_swap",
        "Container swap usage in bytes.",
        &[],
        Gauge,
    ),
    (
        "container_memory_failcnt",
        "Number of memory usage hits limits.",
        &[],
        Counter,
    ),
    (
        "container_memory_usage_bytes",
        "Current memory usage in bytes, including all memory regardless of when it was accessed.",
        &[],
        Gauge,
    ),
    (
        "container_memory_max_usage_bytes",
        "Maximum memory usage recorded in bytes.",
        &[],
        Gauge,
    ),
    (
        "container_memory_working_set_bytes",
        "Current working set in bytes.",
        &[],
        Gauge,
    ),
    (
        "container_memory_failures_total",
        "Cumulative count of memory allocation failures.",
        &["failure_type", "scope"],
        Counter,
    ),
    (
        "container_oom_events_total",
        "Count of out of memory events observed for the container.",
        &[],
        Counter,
    ),
    (
        "container_fs_usage_bytes",
        "Number of bytes that are consumed by the container on this filesystem.",
        &["device"],
        Gauge,
    ),
    (
        "container_fs_limit_bytes",
        "Number of bytes that can be consumed by the container on this filesystem.",
        &["device"],
        Gauge,
    ),
    (
        "container_fs_inodes_total",
        "Number of Inodes.",
        &["device"],
        Gauge,
    ),
    (
        "container_fs_inodes_free",
        "Number of available Inodes.",
        &["device"],
        Gauge,
    ),
    (
        "container_fs_reads_bytes_total",
        "Cumulative count of bytes read.",
        &["device"],
        Counter,
    ),
    (
        "container_fs_reads_total",
        "Cumulative count of reads completed.",
        &["device"],
        Counter,
    ),
    (
        "container_fs_writes_bytes_total",
        "Cumulative count of bytes written.",
        &["device"],
        Counter,
    ),
    (
        "container_fs_writes_total",
        "Cumulative count of writes completed.",
        &["device"],
        Counter,
    ),
    (
        "container_blkio_device_usage_total",
        "Blkio device bytes usage.",
        &["device", "major", "minor", "operation"],
        Counter,
    ),
    (
        "container_network_receive_bytes_total",
        "Cumulative count of bytes received.",
        &["interface"],
        Counter,
    ),
    (
        "container_network_receive_packets_total",
        "Cumulative count of packets received.",
        &["interface"],
        Counter,
    ),
    (
        "container_network_receive_packets_dropped_total",
        "Cumulative count of packets dropped while receiving.",
        &["interface"],
        Counter,
    ),
    (
        "container_network_receive_errors_total",
        "Cumulative count of errors encountered while receiving.",
        &["interface"],
        Counter,
    ),
    (
        "container_network_transmit_bytes_total",
        "Cumulative count of bytes transmitted.",
        &["interface"],
        Counter,
    ),
    (
        "container_network_transmit_packets_total",
        "Cumulative count of packets transmitted.",
        &["interface"],
        Counter,
    ),
    (
        "container_network_transmit_packets_dropped_total",
        "Cumulative count of packets dropped while transmitting.",
        &["interface"],
        Counter,
    ),
    (
        "container_network_transmit_errors_total",
        "Cumulative count of errors encountered while transmitting.",
        &["interface"],
        Counter,
    ),
    (
        "container_processes",
        "Number of processes running inside the container.",
        &[],
        Gauge,
    ),
    (
        "container_threads",
        "Number of threads running inside the container.",
        &[],
        Gauge,
    ),
    (
        "container_threads_max",
        "Maximum number of threads allowed inside the container, 0 if unlimited.",
        &[],
        Gauge,
    ),
    (
        "container_file_descriptors",
        "Number of open file descriptors for the container.",
        &[],
        Gauge,
    ),
    (
        "container_sockets",
        "Number of open sockets for the container.",
        &[],
        Gauge,
    ),
    (
        "container_spec_cpu_period",
        "CPU period of the container.",
        &[],
        Gauge,
    ),
    (
        "container_spec_cpu_quota",
        "CPU quota of the container.",
        &[],
        Gauge,
    ),
    (
        "container_spec_cpu_shares",
        "CPU share of the container.",
        &[],
        Gauge,
    ),
    (
        "container_spec_memory_limit_bytes",
        "Memory limit for the container.",
        &[],
        Gauge,
    ),
    (
        "container_spec_memory_swap_limit_bytes",
        "Memory swap limit for the container.",
        &[],
        Gauge,
    ),
    (
        "container_spec_memory_reservation_limit_bytes",
        "Memory reservation limit for the container.",
        &[],
        Gauge,
    ),
    (
        "container_start_time_seconds",
        "Start time of the container since unix epoch in seconds.",
        &[],
        Gauge,
    ),
    (
        "container_last_seen",
        "Last time a container was seen by the exporter.",
        &[],
        Gauge,
    ),
];

/// Every metric descriptor, with the base labels first.
pub fn descriptors() -> Vec<cri::MetricDescriptor> {
    DESCRIPTORS
        .iter()
        .map(|(name, help, labels, _)| cri::MetricDescriptor {
            name: name.to_string(),
            help: help.to_string(),
            label_keys: BASE_LABELS
                .iter()
                .chain(labels.iter())
                .map(|s| s.to_string())
                .collect(),
        })
        .collect()
}

fn metric_type(name: &str) -> cri::MetricType {
    DESCRIPTORS
        .iter()
        .find(|d| d.0 == name)
        .map(|d| d.3)
        .unwrap_or(Gauge)
}

/// Open descriptors and sockets of these processes (ones that vanished count nothing).
fn fds_and_sockets(procs: &[i32]) -> (u64, u64) {
    let (mut fds, mut sockets) = (0, 0);
    for pid in procs {
        let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for e in entries.flatten() {
            fds += 1;
            if std::fs::read_link(e.path())
                .is_ok_and(|l| l.to_string_lossy().starts_with("socket:"))
            {
                sockets += 1;
            }
        }
    }
    (fds, sockets)
}

/// Capacity bytes, inodes and free inodes of the filesystem holding `path`.
fn fs_capacity(path: &Path) -> Option<(u64, u64, u64)> {
    let s = nix::sys::statvfs::statvfs(path).ok()?;
    Some((
        s.blocks() as u64 * s.fragment_size() as u64,
        s.files() as u64,
        s.files_free() as u64,
    ))
}

/// Everything a container's metrics are made of, read once.
#[derive(Debug, Clone)]
pub struct ContainerDetail {
    pub sample: ContainerSample,
    pub detail: DetailSample,
    pub fds: u64,
    pub sockets: u64,
    pub fs: Option<(u64, u64, u64)>,
}

impl Collector {
    /// Reads a container's sample and details (blocking file I/O).
    pub fn detail_container(&self, rec: &ContainerRecord) -> ContainerDetail {
        let sample = self.sample_container(rec);
        let detail = if rec.cgroups_path.is_empty() {
            DetailSample::default()
        } else {
            cgroups::stats::read_detail(self.layout, &cgroups::relative_dir(&rec.cgroups_path))
        };
        let (fds, sockets) = fds_and_sockets(&detail.procs);
        ContainerDetail {
            sample,
            detail,
            fds,
            sockets,
            fs: fs_capacity(&self.writable_root()),
        }
    }

    /// A pod's metrics: its network at the pod level, each container's own.
    pub fn pod_metrics(
        &self,
        pod: &SandboxRecord,
        ifaces: Option<Vec<InterfaceSample>>,
        containers: &[(ContainerRecord, ContainerDetail)],
    ) -> cri::PodSandboxMetrics {
        let at = now_nanos();
        let pod_name = pod
            .config
            .metadata
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default();
        let mut out = Metrics::new([pod.id.clone(), pod_name, String::new()]);
        for i in ifaces.iter().flatten() {
            let l = [i.name.as_str()];
            out.push(
                "container_network_receive_bytes_total",
                &l,
                Some(i.rx_bytes),
            );
            out.push(
                "container_network_receive_packets_total",
                &l,
                Some(i.rx_packets),
            );
            out.push(
                "container_network_receive_packets_dropped_total",
                &l,
                Some(i.rx_dropped),
            );
            out.push(
                "container_network_receive_errors_total",
                &l,
                Some(i.rx_errors),
            );
            out.push(
                "container_network_transmit_bytes_total",
                &l,
                Some(i.tx_bytes),
            );
            out.push(
                "container_network_transmit_packets_total",
                &l,
                Some(i.tx_packets),
            );
            out.push(
                "container_network_transmit_packets_dropped_total",
                &l,
                Some(i.tx_dropped),
            );
            out.push(
                "container_network_transmit_errors_total",
                &l,
                Some(i.tx_errors),
            );
        }
        let device = self.writable_root().display().to_string();
        cri::PodSandboxMetrics {
            pod_sandbox_id: pod.id.clone(),
            metrics: out.metrics,
            container_metrics: containers
                .iter()
                .map(|(rec, d)| container_metrics(at, rec, d, &device))
                .collect(),
        }
    }
}

/// A growing list of metrics sharing base label values.
struct Metrics {
    base: [String; 3],
    metrics: Vec<cri::Metric>,
}

impl Metrics {
    fn new(base: [String; 3]) -> Metrics {
        Metrics {
            base,
            metrics: Vec::new(),
        }
    }

    /// Adds `name` when its value is known.
    fn push(&mut self, name: &str, labels: &[&str], value: Option<u64>) {
        let Some(value) = value else { return };
        self.metrics.push(cri::Metric {
            name: name.to_string(),
            // Gathered live: the CRI wants 0 then.
            timestamp: 0,
            metric_type: metric_type(name) as i32,
            label_values: self
                .base
                .iter()
                .cloned()
                .chain(labels.iter().map(|s| s.to_string()))
                .collect(),
            value: Some(cri::UInt64Value { value }),
        });
    }
}

fn secs(ns: Option<u64>) -> Option<u64> {
    ns.map(|n| n / 1_000_000_000)
}

fn non_negative(v: i64) -> Option<u64> {
    u64::try_from(v).ok()
}

/// One container's metrics.
pub fn container_metrics(
    at: i64,
    rec: &ContainerRecord,
    d: &ContainerDetail,
    device: &str,
) -> cri::ContainerMetrics {
    let name = rec
        .config
        .metadata
        .as_ref()
        .map(|m| m.name.clone())
        .unwrap_or_default();
    let mut m = Metrics::new([rec.id.clone(), name, rec.image_name.clone()]);
    let s = &d.sample.cgroup;
    let x = &d.detail;
    m.push(
        "container_cpu_usage_seconds_total",
        &[],
        secs(s.cpu_usage_ns),
    );
    m.push("container_cpu_user_seconds_total", &[], secs(x.cpu_user_ns));
    m.push(
        "container_cpu_system_seconds_total",
        &[],
        secs(x.cpu_system_ns),
    );
    m.push("container_cpu_cfs_periods_total", &[], x.cfs_periods);
    m.push(
        "container_cpu_cfs_throttled_periods_total",
        &[],
        x.cfs_throttled_periods,
    );
    m.push(
        "container_cpu_cfs_throttled_seconds_total",
        &[],
        secs(x.cfs_throttled_ns),
    );
    if let Some(mem) = s.memory {
        m.push("container_memory_rss", &[], Some(mem.rss));
        m.push("container_memory_usage_bytes", &[], Some(mem.usage));
        m.push(
            "container_memory_working_set_bytes",
            &[],
            Some(mem.working_set),
        );
        for (kind, v) in [
            ("pgfault", mem.page_faults),
            ("pgmajfault", mem.major_page_faults),
        ] {
            m.push(
                "container_memory_failures_total",
                &[kind, "container"],
                Some(v),
            );
        }
    }
    m.push("container_memory_cache", &[], x.memory_cache);
    m.push("container_memory_kernel_usage", &[], x.memory_kernel);
    m.push("container_memory_mapped_file", &[], x.memory_mapped_file);
    m.push("container_memory_swap", &[], x.memory_swap);
    m.push("container_memory_failcnt", &[], x.memory_failcnt);
    m.push("container_memory_max_usage_bytes", &[], x.memory_max_usage);
    m.push("container_oom_events_total", &[], x.oom_kills);
    let dev = [device];
    if let Some((bytes, _)) = d.sample.writable {
        m.push("container_fs_usage_bytes", &dev, Some(bytes));
    }
    if let Some((limit, inodes, free)) = d.fs {
        m.push("container_fs_limit_bytes", &dev, Some(limit));
        m.push("container_fs_inodes_total", &dev, Some(inodes));
        m.push("container_fs_inodes_free", &dev, Some(free));
    }
    if !x.procs.is_empty() || s.pids.is_some() {
        m.push("container_processes", &[], Some(x.procs.len() as u64));
        m.push("container_file_descriptors", &[], Some(d.fds));
        m.push("container_sockets", &[], Some(d.sockets));
    }
    m.push("container_threads", &[], s.pids);
    m.push("container_threads_max", &[], Some(x.pids_max.unwrap_or(0)));
    let res = rec
        .config
        .linux
        .as_ref()
        .and_then(|l| l.resources.clone())
        .unwrap_or_default();
    m.push(
        "container_spec_cpu_period",
        &[],
        non_negative(res.cpu_period),
    );
    m.push(
        "container_spec_cpu_shares",
        &[],
        non_negative(res.cpu_shares),
    );
    if res.cpu_quota > 0 {
        m.push("container_spec_cpu_quota", &[], non_negative(res.cpu_quota));
    }
    m.push(
        "container_spec_memory_limit_bytes",
        &[],
        non_negative(res.memory_limit_in_bytes),
    );
    m.push(
        "container_spec_memory_swap_limit_bytes",
        &[],
        non_negative(res.memory_swap_limit_in_bytes),
    );
    if rec.started_at > 0 {
        m.push(
            "container_start_time_seconds",
            &[],
            non_negative(rec.started_at / 1_000_000_000),
        );
    }
    m.push("container_last_seen", &[], non_negative(at / 1_000_000_000));
    cri::ContainerMetrics {
        container_id: rec.id.clone(),
        metrics: m.metrics,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_are_unique_with_help_and_base_labels() {
        let d = descriptors();
        let mut names: Vec<_> = d.iter().map(|d| d.name.clone()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), d.len());
        for x in &d {
            assert!(!x.help.is_empty());
            assert_eq!(x.label_keys[..3], BASE_LABELS.map(String::from));
        }
        let net = d
            .iter()
            .find(|x| x.name == "container_network_receive_bytes_total")
            .expect("network");
        assert_eq!(net.label_keys.last().map(String::as_str), Some("interface"));
        assert_eq!(metric_type("container_memory_rss"), Gauge);
        assert_eq!(metric_type("container_oom_events_total"), Counter);
    }

    #[test]
    fn metrics_carry_as_many_label_values_as_their_descriptor_has_keys() {
        let mut m = Metrics::new(["i".into(), "n".into(), "img".into()]);
        m.push("container_fs_usage_bytes", &["/dev"], Some(5));
        m.push("container_memory_rss", &[], None);
        assert_eq!(m.metrics.len(), 1, "unknown values are left out");
        let keys = descriptors()
            .into_iter()
            .find(|d| d.name == "container_fs_usage_bytes")
            .expect("fs")
            .label_keys;
        assert_eq!(m.metrics[0].label_values.len(), keys.len());
        assert_eq!(m.metrics[0].metric_type, Gauge as i32);
    }
}
