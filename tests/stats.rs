//! Container and pod stats through a real berthd, runc and the kernel's cgroups: a
//! CPU-burning container shows about one core of nano-cores, one holding 50 MB shows that
//! working set, a pod's numbers add up its containers', pod network counters grow with
//! traffic between two pods, filters select, the `Stream*` forms answer like the unary ones,
//! and stopped or unknown containers answer sensibly.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use berth::cri::v1 as cri;
use berth::cri::v1::runtime_service_client::RuntimeServiceClient;
use common::{Berthd, BerthdConfig, ImageBuilder, Registry};
use tonic::transport::Channel;

type Rt = RuntimeServiceClient<Channel>;

struct Env {
    _reg: Registry,
    _d: Berthd,
    rt: Rt,
    image: String,
    logs: tempfile::TempDir,
}

async fn env() -> Env {
    let b = common::busybox_daemon("test/stats", BerthdConfig::new()).await;
    Env {
        _reg: b.reg,
        _d: b.d,
        rt: b.rt,
        image: b.image,
        logs: b.logs,
    }
}

/// A pod cgroup made as the kubelet makes one; on drop, it and whatever the runtime left
/// under it are removed from every hierarchy.
struct PodCgroup {
    top: String,
}

impl PodCgroup {
    fn new(top: &str, rel: &str) -> PodCgroup {
        let root = Path::new("/sys/fs/cgroup");
        let dirs: Vec<PathBuf> = if root.join("cgroup.controllers").exists() {
            vec![root.join(rel)]
        } else {
            ["cpu", "cpuacct", "memory", "pids"]
                .iter()
                .map(|c| root.join(c).join(rel))
                .collect()
        };
        for d in &dirs {
            std::fs::create_dir_all(d).expect("make the pod cgroup");
        }
        PodCgroup {
            top: top.to_string(),
        }
    }
}

fn remove_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

impl Drop for PodCgroup {
    fn drop(&mut self) {
        let root = Path::new("/sys/fs/cgroup");
        if root.join("cgroup.controllers").exists() {
            remove_tree(&root.join(&self.top));
        } else if let Ok(hierarchies) = std::fs::read_dir(root) {
            for h in hierarchies.flatten() {
                remove_tree(&h.path().join(&self.top));
            }
        }
    }
}

impl Env {
    fn pod_config(&self, name: &str, cgroup_parent: &str) -> cri::PodSandboxConfig {
        cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: name.into(),
                uid: format!("{name}-uid"),
                namespace: "stats".into(),
                attempt: 0,
            }),
            labels: [("pod".to_string(), name.to_string())].into(),
            log_directory: self.logs.path().display().to_string(),
            linux: Some(cri::LinuxPodSandboxConfig {
                cgroup_parent: cgroup_parent.into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    async fn pod(&mut self, config: cri::PodSandboxConfig) -> String {
        common::run_pod(&mut self.rt, config, "").await
    }

    async fn run(&mut self, pod: &str, name: &str, script: &str) -> String {
        let mut config = common::sh_container(name, &self.image, script);
        config.labels = [("name".to_string(), name.to_string())].into();
        let id = common::create_container(&mut self.rt, pod, config)
            .await
            .expect("create");
        common::start_container(&mut self.rt, &id)
            .await
            .expect("start");
        id
    }

    async fn wait_log(&self, name: &str, needle: &str) {
        let path = self.logs.path().join(format!("{name}.log"));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if text.contains(needle) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{needle:?} never logged: {text:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn list(
        &mut self,
        filter: Option<cri::ContainerStatsFilter>,
    ) -> Vec<cri::ContainerStats> {
        self.rt
            .list_container_stats(cri::ListContainerStatsRequest { filter })
            .await
            .expect("list container stats")
            .into_inner()
            .stats
    }

    async fn container(&mut self, id: &str) -> Result<cri::ContainerStats, tonic::Status> {
        self.rt
            .container_stats(cri::ContainerStatsRequest {
                container_id: id.into(),
            })
            .await
            .map(|r| r.into_inner().stats.expect("stats"))
    }

    async fn pod_stats(&mut self, id: &str) -> Result<cri::PodSandboxStats, tonic::Status> {
        self.rt
            .pod_sandbox_stats(cri::PodSandboxStatsRequest {
                pod_sandbox_id: id.into(),
            })
            .await
            .map(|r| r.into_inner().stats.expect("stats"))
    }

    async fn remove_pod(&mut self, pod: &str) {
        common::remove_pod(&mut self.rt, pod).await;
    }
}

fn by_id<'a>(stats: &'a [cri::ContainerStats], id: &str) -> &'a cri::ContainerStats {
    stats
        .iter()
        .find(|s| s.attributes.as_ref().is_some_and(|a| a.id == id))
        .unwrap_or_else(|| panic!("no stats for {id}"))
}

fn cpu(s: &cri::ContainerStats) -> (u64, Option<u64>) {
    let c = s.cpu.as_ref().expect("cpu");
    assert!(c.timestamp > 0);
    (
        c.usage_core_nano_seconds.as_ref().expect("core-ns").value,
        c.usage_nano_cores.as_ref().map(|v| v.value),
    )
}

fn working_set(m: &Option<cri::MemoryUsage>) -> u64 {
    let m = m.as_ref().expect("memory");
    assert!(m.timestamp > 0);
    m.working_set_bytes.as_ref().expect("working set").value
}

/// A container spinning a shell loop uses about one core; one holding a 50 MB string has a
/// working set of at least 50 MB; the pod (with its own cgroup, as the kubelet makes it)
/// counts at least what its containers count; filters select; the stream form answers the
/// same containers.
#[tokio::test]
async fn cpu_burner_holder_and_pod_totals() {
    let top = format!("berth-test-stats-{}", std::process::id());
    let rel = format!("{top}/pod1");
    let _cg = PodCgroup::new(&top, &rel);
    let mut e = env().await;
    let pod = e.pod(e.pod_config("busy", &format!("/{rel}"))).await;
    let burner = e.run(&pod, "burner", "while :; do :; done").await;
    let holder = e
        .run(
            &pod,
            "holder",
            "x=$(yes aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa | head -c 52428800); echo held ${#x}; while :; do sleep 1000; done",
        )
        .await;
    e.wait_log("holder", "held").await;

    // Two samples a couple of seconds apart give the rate.
    let first = e.list(None).await;
    let (burn0, _) = cpu(by_id(&first, &burner));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let second = e.list(None).await;
    let (burn1, cores) = cpu(by_id(&second, &burner));
    let cores = cores.expect("nano-cores after two samples");
    let window = second
        .iter()
        .find_map(|s| s.cpu.as_ref().map(|c| c.timestamp))
        .unwrap_or(0)
        - first
            .iter()
            .find_map(|s| s.cpu.as_ref().map(|c| c.timestamp))
            .unwrap_or(0);
    println!(
        "burner: {:.3} cores (usage grew {:.3} s of CPU over {:.3} s)",
        cores as f64 / 1e9,
        (burn1 - burn0) as f64 / 1e9,
        window as f64 / 1e9
    );
    // Two shared cores: other work may take a share, but a spinning shell holds most of one.
    assert!(
        (500_000_000..=1_200_000_000).contains(&cores),
        "burner nano-cores {cores}"
    );
    let holder_stats = by_id(&second, &holder);
    let ws = working_set(&holder_stats.memory);
    println!("holder: working set {} MiB", ws >> 20);
    assert!(ws >= 50 << 20, "holder working set {ws}");
    let m = holder_stats.memory.as_ref().expect("memory");
    assert!(m.usage_bytes.as_ref().expect("usage").value >= ws);
    assert!(m.rss_bytes.as_ref().expect("rss").value >= 50 << 20);
    assert!(m.page_faults.as_ref().expect("faults").value > 0);
    let (_, idle) = cpu(holder_stats);
    assert!(
        idle.expect("holder rate") < 200_000_000,
        "holder sleeps: {idle:?}"
    );
    let wl = holder_stats
        .writable_layer
        .as_ref()
        .expect("writable layer");
    assert!(wl.timestamp > 0 && wl.inodes_used.as_ref().expect("inodes").value >= 1);

    // ContainerStats by id prefix; filters by id, pod and labels.
    let one = e.container(&holder[..12]).await.expect("container stats");
    assert_eq!(one.attributes.as_ref().expect("attrs").id, holder);
    assert_eq!(
        one.attributes
            .as_ref()
            .expect("attrs")
            .metadata
            .as_ref()
            .expect("meta")
            .name,
        "holder"
    );
    let f = |id: &str, pod: &str, label: Option<&str>| cri::ContainerStatsFilter {
        id: id.into(),
        pod_sandbox_id: pod.into(),
        label_selector: label
            .map(|l| [("name".to_string(), l.to_string())].into())
            .unwrap_or_default(),
    };
    let only = e.list(Some(f(&burner, "", None))).await;
    assert_eq!(only.len(), 1);
    assert_eq!(e.list(Some(f("", &pod, None))).await.len(), 2);
    let labelled = e.list(Some(f("", "", Some("holder")))).await;
    assert_eq!(labelled.len(), 1);
    assert_eq!(labelled[0].attributes.as_ref().expect("attrs").id, holder);
    assert!(e.list(Some(f("", "", Some("nobody")))).await.is_empty());
    let streamed: Vec<String> = common::collect_stream(
        e.rt.stream_container_stats(cri::StreamContainerStatsRequest {
            filter: Some(f("", &pod, None)),
        })
        .await,
    )
    .await
    .expect("stream")
    .into_iter()
    .flat_map(|m| m.container_stats)
    .filter_map(|s| s.attributes.map(|a| a.id))
    .collect();
    assert_eq!(streamed.len(), 2);
    assert!(streamed.contains(&burner) && streamed.contains(&holder));

    // The pod's cgroup holds both containers: it counts at least their sum (its sample is
    // read after theirs).
    let ps = e.pod_stats(&pod).await.expect("pod stats");
    let linux = ps.linux.as_ref().expect("linux");
    assert_eq!(ps.attributes.as_ref().expect("attrs").id, pod);
    assert_eq!(linux.containers.len(), 2);
    let sum_cpu: u64 = linux.containers.iter().map(|c| cpu(c).0).sum();
    let pod_cpu = linux
        .cpu
        .as_ref()
        .and_then(|c| c.usage_core_nano_seconds.as_ref())
        .expect("pod cpu")
        .value;
    let sum_ws: u64 = linux
        .containers
        .iter()
        .map(|c| working_set(&c.memory))
        .sum();
    let pod_ws = working_set(&linux.memory);
    println!(
        "pod: cpu {:.3} s (containers {:.3} s), working set {} MiB (containers {} MiB)",
        pod_cpu as f64 / 1e9,
        sum_cpu as f64 / 1e9,
        pod_ws >> 20,
        sum_ws >> 20
    );
    assert!(pod_cpu >= sum_cpu, "pod {pod_cpu} < containers {sum_cpu}");
    assert!(
        pod_ws >= sum_ws * 9 / 10,
        "pod {pod_ws} vs containers {sum_ws}"
    );
    let procs = linux
        .process
        .as_ref()
        .and_then(|p| p.process_count.as_ref())
        .expect("process count")
        .value;
    assert!(procs >= 2, "processes {procs}");
    // The native network gives the pod eth0.
    let net = linux.network.as_ref().expect("network");
    assert_eq!(net.default_interface.as_ref().expect("eth0").name, "eth0");

    // ListPodSandboxStats selects by id and labels; the stream says the same.
    let listed =
        e.rt.list_pod_sandbox_stats(cri::ListPodSandboxStatsRequest {
            filter: Some(cri::PodSandboxStatsFilter {
                label_selector: [("pod".to_string(), "busy".to_string())].into(),
                ..Default::default()
            }),
        })
        .await
        .expect("list pod stats")
        .into_inner()
        .stats;
    assert_eq!(listed.len(), 1);
    let none =
        e.rt.list_pod_sandbox_stats(cri::ListPodSandboxStatsRequest {
            filter: Some(cri::PodSandboxStatsFilter {
                id: "ffffffff".into(),
                ..Default::default()
            }),
        })
        .await
        .expect("list pod stats")
        .into_inner()
        .stats;
    assert!(none.is_empty());
    let streamed = common::collect_stream(
        e.rt.stream_pod_sandbox_stats(cri::StreamPodSandboxStatsRequest { filter: None })
            .await,
    )
    .await
    .expect("stream pod stats");
    assert_eq!(
        streamed
            .iter()
            .map(|m| m.pod_sandbox_stats.len())
            .sum::<usize>(),
        1
    );

    e.remove_pod(&pod).await;
}

fn pod_tx(ps: &cri::PodSandboxStats) -> u64 {
    ps.linux
        .as_ref()
        .and_then(|l| l.network.as_ref())
        .and_then(|n| n.default_interface.as_ref())
        .and_then(|i| i.tx_bytes.as_ref())
        .map(|v| v.value)
        .expect("eth0 tx bytes")
}

/// A file served by one pod to another shows in both pods' eth0 counters; a pod without
/// a cgroup of its own adds up its containers; a stopped container still answers (with
/// timestamps), a removed or unknown one is NotFound.
#[tokio::test]
async fn pod_network_grows_and_stopped_containers_answer() {
    let mut e = env().await;
    let server = e.pod(e.pod_config("server", "")).await;
    let client = e.pod(e.pod_config("client", "")).await;
    let listener = e
        .run(
            &server,
            "listener",
            "mkdir -p /www && head -c 2000000 /dev/zero > /www/big && exec httpd -f -p 9000 -h /www",
        )
        .await;
    let ip =
        e.rt.pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: server.clone(),
            verbose: false,
        })
        .await
        .expect("status")
        .into_inner()
        .status
        .and_then(|s| s.network)
        .map(|n| n.ip)
        .expect("pod ip");
    let before = pod_tx(&e.pod_stats(&server).await.expect("pod stats"));
    e.run(
        &client,
        "sender",
        &format!(
            "until wget -q -O /dev/null http://{ip}:9000/big; do sleep 0.2; done; echo fetched; \
             while :; do sleep 1000; done"
        ),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let after = loop {
        let tx = pod_tx(&e.pod_stats(&server).await.expect("pod stats"));
        if tx >= before + 2_000_000 || Instant::now() > deadline {
            break tx;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!("server pod eth0 tx: {before} -> {after} bytes");
    assert!(after >= before + 2_000_000, "tx {before} -> {after}");

    // Without a pod cgroup, the pod's numbers are its containers' added up.
    let ps = e.pod_stats(&client).await.expect("pod stats");
    let linux = ps.linux.expect("linux");
    assert_eq!(linux.containers.len(), 1);
    assert_eq!(
        working_set(&linux.memory),
        working_set(&linux.containers[0].memory)
    );
    assert_eq!(
        linux.cpu.expect("cpu").usage_core_nano_seconds,
        linux.containers[0]
            .cpu
            .as_ref()
            .expect("cpu")
            .usage_core_nano_seconds
    );
    let rx = linux
        .network
        .and_then(|n| n.default_interface)
        .and_then(|i| i.rx_bytes)
        .expect("client rx")
        .value;
    assert!(rx >= 2_000_000, "client rx {rx}");

    // Stopped: still stats, with timestamps.
    e.rt.stop_container(cri::StopContainerRequest {
        container_id: listener.clone(),
        timeout: 1,
    })
    .await
    .expect("stop");
    let stopped = e
        .container(&listener)
        .await
        .expect("stats of a stopped container");
    assert!(stopped.cpu.expect("cpu").timestamp > 0);
    assert!(stopped.memory.expect("memory").timestamp > 0);
    assert!(
        by_id(&e.list(None).await, &listener)
            .writable_layer
            .is_some()
    );
    e.rt.remove_container(cri::RemoveContainerRequest {
        container_id: listener.clone(),
    })
    .await
    .expect("remove");
    let gone = e.container(&listener).await.expect_err("removed");
    assert_eq!(gone.code(), tonic::Code::NotFound);
    let unknown = e.pod_stats(&"f".repeat(64)).await.expect_err("unknown pod");
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    assert!(
        e.list(None)
            .await
            .iter()
            .all(|s| s.attributes.as_ref().is_some_and(|a| a.id != listener))
    );

    e.remove_pod(&client).await;
    e.remove_pod(&server).await;
}

/// ListMetricDescriptors names cAdvisor's metrics with help and label keys; every metric
/// ListPodSandboxMetrics gives has a descriptor and as many label values as it has keys;
/// the container's spec and usage, and the pod's network, are there; the stream form
/// answers the same pods.
#[tokio::test]
async fn metric_descriptors_and_pod_metrics() {
    let mut e = env().await;
    let descs =
        e.rt.list_metric_descriptors(cri::ListMetricDescriptorsRequest {})
            .await
            .expect("descriptors")
            .into_inner()
            .descriptors;
    for name in [
        "container_cpu_usage_seconds_total",
        "container_memory_working_set_bytes",
        "container_network_receive_bytes_total",
        "container_fs_usage_bytes",
        "container_processes",
        "container_spec_memory_limit_bytes",
    ] {
        assert!(descs.iter().any(|d| d.name == name), "{name} described");
    }
    let pod = e.pod(e.pod_config("metrics", "")).await;
    let c = {
        let config = cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: "limited".into(),
                attempt: 0,
            }),
            image: Some(cri::ImageSpec {
                image: e.image.clone(),
                ..Default::default()
            }),
            command: vec![
                "sh".into(),
                "-c".into(),
                "while :; do sleep 1000; done".into(),
            ],
            log_path: "limited.log".into(),
            linux: Some(cri::LinuxContainerConfig {
                resources: Some(cri::LinuxContainerResources {
                    memory_limit_in_bytes: 64 << 20,
                    cpu_shares: 512,
                    cpu_period: 100_000,
                    cpu_quota: 20_000,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let id =
            e.rt.create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(config),
                sandbox_config: None,
            })
            .await
            .expect("create")
            .into_inner()
            .container_id;
        e.rt.start_container(cri::StartContainerRequest {
            container_id: id.clone(),
        })
        .await
        .expect("start");
        id
    };
    let all =
        e.rt.list_pod_sandbox_metrics(cri::ListPodSandboxMetricsRequest {})
            .await
            .expect("pod metrics")
            .into_inner()
            .pod_metrics;
    let pm = all
        .iter()
        .find(|m| m.pod_sandbox_id == pod)
        .expect("the pod's metrics");
    let keys = |name: &str| {
        descs
            .iter()
            .find(|d| d.name == name)
            .unwrap_or_else(|| panic!("no descriptor for {name}"))
            .label_keys
            .len()
    };
    let cm = pm
        .container_metrics
        .iter()
        .find(|m| m.container_id == c)
        .expect("the container's metrics");
    for m in pm.metrics.iter().chain(cm.metrics.iter()) {
        assert_eq!(m.label_values.len(), keys(&m.name), "{}", m.name);
    }
    let value = |ms: &[cri::Metric], name: &str| {
        ms.iter()
            .find(|m| m.name == name)
            .and_then(|m| m.value.as_ref())
            .map(|v| v.value)
            .unwrap_or_else(|| panic!("no {name}"))
    };
    assert_eq!(
        value(&cm.metrics, "container_spec_memory_limit_bytes"),
        64 << 20
    );
    assert_eq!(value(&cm.metrics, "container_spec_cpu_shares"), 512);
    assert_eq!(value(&cm.metrics, "container_spec_cpu_quota"), 20_000);
    assert!(value(&cm.metrics, "container_memory_working_set_bytes") > 0);
    assert!(value(&cm.metrics, "container_processes") >= 1);
    assert!(value(&cm.metrics, "container_threads") >= 1);
    assert!(value(&cm.metrics, "container_fs_inodes_total") > 0);
    let rx = pm
        .metrics
        .iter()
        .find(|m| m.name == "container_network_receive_bytes_total")
        .expect("pod network");
    assert_eq!(rx.label_values.last().map(String::as_str), Some("eth0"));
    let streamed: Vec<String> = common::collect_stream(
        e.rt.stream_pod_sandbox_metrics(cri::StreamPodSandboxMetricsRequest {})
            .await,
    )
    .await
    .expect("stream")
    .into_iter()
    .flat_map(|m| m.pod_sandbox_metrics)
    .map(|m| m.pod_sandbox_id)
    .collect();
    assert_eq!(streamed, vec![pod.clone()]);
    e.remove_pod(&pod).await;
}

/// Figures, not a check: ListContainerStats, ListPodSandboxStats and ListPodSandboxMetrics
/// latency with `BERTH_STATS_N` (default 50) running containers in 5 pods. Run by hand:
/// `cargo test --test stats stats_latency_figures -- --ignored --nocapture`.
#[tokio::test]
#[ignore = "prints figures; run by hand"]
async fn stats_latency_figures() {
    let n: usize = std::env::var("BERTH_STATS_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let mut e = env().await;
    let mut pods = Vec::new();
    for p in 0..5 {
        pods.push(e.pod(e.pod_config(&format!("bench{p}"), "")).await);
    }
    let made = Instant::now();
    for i in 0..n {
        let pod = pods[i % pods.len()].clone();
        e.run(&pod, &format!("c{i}"), "while :; do sleep 1000; done")
            .await;
    }
    println!("{n} containers made in {:?}", made.elapsed());
    let mut times = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let got = e.list(None).await;
        times.push(t.elapsed());
        assert_eq!(got.len(), n);
    }
    times.sort();
    println!(
        "ListContainerStats with {n} containers: median {:?}, min {:?}, max {:?} (20 calls)",
        times[times.len() / 2],
        times[0],
        times[times.len() - 1]
    );
    let mut times = Vec::new();
    for _ in 0..10 {
        let t = Instant::now();
        e.rt.list_pod_sandbox_stats(cri::ListPodSandboxStatsRequest { filter: None })
            .await
            .expect("pod stats");
        times.push(t.elapsed());
    }
    times.sort();
    println!(
        "ListPodSandboxStats with 5 pods / {n} containers: median {:?}, max {:?} (10 calls)",
        times[times.len() / 2],
        times[times.len() - 1]
    );
    let mut times = Vec::new();
    for _ in 0..10 {
        let t = Instant::now();
        e.rt.list_pod_sandbox_metrics(cri::ListPodSandboxMetricsRequest {})
            .await
            .expect("pod metrics");
        times.push(t.elapsed());
    }
    times.sort();
    println!(
        "ListPodSandboxMetrics with 5 pods / {n} containers: median {:?}, max {:?} (10 calls)",
        times[times.len() / 2],
        times[times.len() - 1]
    );
    let mut ic = e._d.image_client().await;
    let mut times = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        image_fs_info(&mut ic).await;
        times.push(t.elapsed());
    }
    times.sort();
    println!(
        "ImageFsInfo with {n} writable layers: median {:?}, max {:?} (20 calls)",
        times[times.len() / 2],
        times[times.len() - 1]
    );
    // What the background refresh costs (berthd logs it at debug).
    if let Some(l) =
        e._d.log()
            .lines()
            .rev()
            .find(|l| l.contains("filesystem usage refreshed"))
    {
        println!("last background refresh: {l}");
    }
    for pod in pods {
        e.remove_pod(&pod).await;
    }
}

/// The one filesystem of an `ImageFsInfo` list: (used bytes, inodes, mountpoint, timestamp).
fn fs_of(fs: &[cri::FilesystemUsage]) -> (u64, u64, String, i64) {
    assert_eq!(fs.len(), 1, "{fs:?}");
    let f = &fs[0];
    (
        f.used_bytes.as_ref().expect("used bytes").value,
        f.inodes_used.as_ref().expect("inodes").value,
        f.fs_id.as_ref().expect("fs id").mountpoint.clone(),
        f.timestamp,
    )
}

async fn image_fs_info(
    ic: &mut common::ImageClient,
) -> ((u64, u64, String, i64), (u64, u64, String, i64)) {
    let r = ic
        .image_fs_info(cri::ImageFsInfoRequest {})
        .await
        .expect("ImageFsInfo")
        .into_inner();
    (fs_of(&r.image_filesystems), fs_of(&r.container_filesystems))
}

/// The image filesystem (blobs and snapshots) and the container filesystem (writable layers)
/// are reported apart, from the background cache: a pull makes the image filesystem grow (at
/// once: the pull samples its new snapshots); a container writing 5 MB into its rootfs makes
/// the container filesystem and its own writable layer grow by that much once the cache is
/// refreshed (`[stats] fs_refresh_interval = "1s"` here), and not the image filesystem;
/// removing the pod gives the space back. Both share `root`'s filesystem, so both report
/// `root` as their mountpoint (the kubelet then sees no split image filesystem).
#[tokio::test]
async fn image_and_container_filesystems_apart() {
    let reg = Registry::anonymous();
    let built = ImageBuilder::busybox()
        .layer(common::random_layer(2 << 20, 41))
        .build();
    let layers = built.layers_size();
    let image = reg.push("test/fsinfo", "1", &built).await.reference;
    let d = Berthd::start(
        BerthdConfig::new()
            .trust(&reg)
            .table("[stats]\nfs_refresh_interval = \"1s\""),
    )
    .await;
    let mut ic = d.image_client().await;
    let (img0, ctr0) = image_fs_info(&mut ic).await;
    let root = d.root().display().to_string();
    assert_eq!(img0.2, root, "image fs mountpoint");
    assert_eq!(ctr0.2, root, "container fs mountpoint: the same filesystem");
    assert!(img0.3 > 0 && ctr0.3 > 0, "timestamps");

    common::pull_image(&mut ic, &image, None)
        .await
        .expect("pull");
    let (img1, _) = image_fs_info(&mut ic).await;
    println!(
        "image fs: {} -> {} bytes, {} -> {} inodes after pulling {layers} bytes of layers",
        img0.0, img1.0, img0.1, img1.1
    );
    assert!(img1.0 >= img0.0 + layers, "image fs grew by the layers");
    assert!(img1.1 > img0.1 + 100, "busybox's links are inodes");

    let logs = tempfile::tempdir().expect("log dir");
    let mut rt = d.runtime_client().await;
    let pod = common::run_pod(
        &mut rt,
        common::plain_pod_config("writer", "stats", logs.path()),
        "",
    )
    .await;
    let id = common::create_container(
        &mut rt,
        &pod,
        common::sh_container(
            "writer",
            &image,
            "dd if=/dev/urandom of=/big bs=1048576 count=5 && sync && echo written; sleep 100000",
        ),
    )
    .await
    .expect("create");
    common::start_container(&mut rt, &id).await.expect("start");
    common::wait_for_log(&logs.path().join("writer.log"), "written").await;

    let five = 5u64 << 20;
    let ctr_base = ctr0.0;
    let (_, ctr1) = common::wait_for(
        Duration::from_secs(60),
        "the container filesystem to count the 5 MB",
        || {
            let mut ic = ic.clone();
            async move {
                let (i, c) = image_fs_info(&mut ic).await;
                (c.0 >= ctr_base + five).then_some((i, c))
            }
        },
    )
    .await;
    println!("container fs: {} -> {} bytes", ctr0.0, ctr1.0);
    let layer = common::wait_for(
        Duration::from_secs(60),
        "the writable layer to count the 5 MB",
        || {
            let mut rt = rt.clone();
            let id = id.clone();
            async move {
                let s = rt
                    .container_stats(cri::ContainerStatsRequest { container_id: id })
                    .await
                    .expect("container stats")
                    .into_inner()
                    .stats
                    .expect("stats");
                let wl = s.writable_layer.expect("writable layer");
                let used = wl.used_bytes.as_ref().map(|v| v.value).unwrap_or(0);
                (used >= five).then_some(wl)
            }
        },
    )
    .await;
    assert_eq!(
        layer.fs_id.as_ref().expect("fs id").mountpoint,
        root,
        "the writable layer is on the container filesystem"
    );
    assert!(layer.timestamp > 0);
    let (img2, _) = image_fs_info(&mut ic).await;
    assert!(
        img2.0 < img1.0 + (1 << 20),
        "the container's writes are not counted on the image filesystem: {} -> {}",
        img1.0,
        img2.0
    );

    common::remove_pod(&mut rt, &pod).await;
    let full = ctr1.0;
    common::wait_for(
        Duration::from_secs(60),
        "the container filesystem to give the 5 MB back",
        || {
            let mut ic = ic.clone();
            async move {
                let (_, c) = image_fs_info(&mut ic).await;
                (c.0 + five <= full).then_some(())
            }
        },
    )
    .await;
}
