//! A small CRI benchmark client, driven by `hack/bench-pull.sh`, `hack/bench-pods.sh`,
//! `hack/bench-containers.sh`, `hack/bench-streaming.sh` and `hack/bench-stats.sh`.
//!
//! ```text
//! cri_bench push-image --registry 127.0.0.1:5000 --repo bench/big --tag v1 --layers 5 --total-mb 100
//! cri_bench pull --endpoint unix:///run/berth/berth.sock --image 127.0.0.1:5000/bench/big:v1 \
//!     --repeat 3 --remove-between --wait-empty /var/lib/berth/content/blobs/sha256
//! cri_bench rss --pid 1234
//! cri_bench pods --endpoint unix:///run/berth/berth.sock --count 100 --parallel 10 \
//!     --daemon-pid 1234 --helpers-cmdline /run/berth/
//! cri_bench containers --endpoint unix:///run/berth/berth.sock --count 100 \
//!     --image registry.k8s.io/e2e-test-images/busybox:1.29-2 --helper-comm berth-monitor
//! cri_bench exec --endpoint unix:///run/berth/berth.sock \
//!     --image registry.k8s.io/e2e-test-images/busybox:1.29-2 --count 100 --command true
//! cri_bench port-forward --endpoint unix:///run/berth/berth.sock \
//!     --image registry.k8s.io/e2e-test-images/busybox:1.29-2 --mb 100 --repeat 3
//! cri_bench stats --endpoint unix:///run/berth/berth.sock \
//!     --image registry.k8s.io/e2e-test-images/busybox:1.29-2 --pods 20 --containers 200 \
//!     --metrics-url http://127.0.0.1:9537/metrics --daemon-pid 1234 --helpers-cmdline /run/berth/
//! cri_bench cleanup --endpoint unix:///run/berth/berth.sock
//! ```
//!
//! `exec` and `port-forward` speak SPDY/3.1 to the runtime's streaming server with one client
//! for every runtime, built on berth's frame module (`berth::stream::spdy::frame`) and shaped
//! after client-go: `POST` upgrade with `X-Stream-Protocol-Version`, TCP_NODELAY, streams
//! created one at a time, each after its SYN_REPLY; a stream ends with FIN or RST_STREAM, all
//! of them with GOAWAY or the connection's end (servers differ in how they end an exec).
//!
//! `push-image` builds an image of random (incompressible) data, gzip layers, an OCI manifest,
//! and pushes it over plain HTTP; it prints `bytes <layer+config bytes>` and `digest <manifest>`.
//! `pull` prints one `pull <n> <seconds> <bytes in the --wait-empty dirs after it>` line per
//! PullImage.
//!
//! `pods` and `containers` print machine-readable lines (times in milliseconds, memory in KiB):
//!
//! ```text
//! lat <op> <mode> <n> <p50_ms> <p95_ms> <max_ms>       latency of one RPC (or RPC pair)
//! wall <op> <mode> <n> <seconds>                      wall time of a whole phase
//! rss <what> <when> <procs> <rss_kib> <pss_kib> <comms>  resident memory of a process group
//!     (comms: `<n>x<comm>(<mean VmRSS>MiB/each)` joined by `+`, or `-` for none)
//! tput <up|down|echo> <run> <bytes> <seconds>         one port-forward transfer
//! cpu <op> <n> <ms_per_call>                          CPU time of daemon + helpers per call
//! scrape <status> <body_bytes> <samples> <containers>  one /metrics scrape, checked
//! ```
//!
//! Percentiles are nearest-rank. `rss` sums VmRSS (which counts a shared page in every
//! process mapping it) and Pss (`/proc/PID/smaps_rollup`, shared pages split between users).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use berth::cri::v1 as cri;
use berth::cri::v1::image_service_client::ImageServiceClient;
use berth::cri::v1::runtime_service_client::RuntimeServiceClient;
use berth::cri::v1::{ImageSpec, ImageStatusRequest, PullImageRequest, RemoveImageRequest};
use berth::stream::spdy::frame::{self as spdy, FLAG_FIN, Frame, HeaderDecoder, HeaderEncoder};
use clap::{Parser, Subcommand};
use flate2::write::GzEncoder;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Reference, RegistryOperation};
use sha2::{Digest, Sha256};
use tonic::transport::{Channel, Endpoint, Uri};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

#[derive(Parser)]
#[command(about = "CRI image benchmark helper (see hack/bench-pull.sh)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Builds an image of random data (gzip layers, OCI manifest) and pushes it over HTTP.
    PushImage {
        /// Registry host:port (plain HTTP).
        #[arg(long)]
        registry: String,
        #[arg(long, default_value = "bench/big")]
        repo: String,
        #[arg(long, default_value = "v1")]
        tag: String,
        #[arg(long, default_value_t = 5)]
        layers: usize,
        /// Uncompressed payload over all layers, in MB (10^6 bytes).
        #[arg(long, default_value_t = 100)]
        total_mb: u64,
        /// Files per layer (the layer's payload is split evenly between them).
        #[arg(long, default_value_t = 4)]
        files_per_layer: usize,
    },
    /// Pulls an image over CRI, timing each PullImage.
    Pull {
        /// CRI endpoint, `unix:///path.sock` or a plain path.
        #[arg(long)]
        endpoint: String,
        #[arg(long)]
        image: String,
        #[arg(long, default_value_t = 1)]
        repeat: usize,
        /// RemoveImage after each pull (and before the first, if present) so each pull is cold.
        #[arg(long)]
        remove_between: bool,
        /// After a removal, wait until this directory holds no regular file (any depth).
        /// Repeatable: the runtime's blob and snapshot dirs.
        #[arg(long)]
        wait_empty: Vec<PathBuf>,
        /// How long to wait for `--wait-empty` dirs, in seconds.
        #[arg(long, default_value_t = 120)]
        wait_timeout: u64,
    },
    /// Prints a process's peak and current resident set size in KiB (VmHWM, VmRSS).
    Rss {
        #[arg(long)]
        pid: u32,
    },
    /// Pod sandbox latency: RunPodSandbox, then StopPodSandbox+RemovePodSandbox, over `count`
    /// pods, first one at a time, then `parallel` at a time; memory with `count` pods running.
    Pods {
        /// CRI endpoint, `unix:///path.sock` or a plain path.
        #[arg(long)]
        endpoint: String,
        #[arg(long, default_value_t = 100)]
        count: usize,
        #[arg(long, default_value_t = 10)]
        parallel: usize,
        /// Pulled (untimed) before the first pod, for runtimes that run a pause image.
        #[arg(long)]
        pause_image: Option<String>,
        /// The pods' PID namespace mode: `container` (the kubelet's default) or `pod`.
        #[arg(long, default_value = "container")]
        pid_mode: String,
        /// The runtime daemon, for its VmRSS.
        #[arg(long)]
        daemon_pid: Option<u32>,
        /// Helper processes to count with the pods (shims, monitors, pod inits): every process
        /// whose command line contains this string, and all their descendants. Repeatable.
        #[arg(long)]
        helpers_cmdline: Vec<String>,
        /// Seconds to let things settle before each memory reading.
        #[arg(long, default_value_t = 2.0)]
        settle: f64,
    },
    /// Container latency in one pod: CreateContainer+StartContainer, then
    /// StopContainer(timeout 0)+RemoveContainer, over `count` containers, one at a time; the
    /// per-pod helper's memory with 1 and 10 containers.
    Containers {
        /// CRI endpoint, `unix:///path.sock` or a plain path.
        #[arg(long)]
        endpoint: String,
        #[arg(long, default_value_t = 100)]
        count: usize,
        #[arg(long)]
        image: String,
        /// Pulled (untimed) before the pod, for runtimes that run a pause image.
        #[arg(long)]
        pause_image: Option<String>,
        #[arg(long, default_value = "sleep 3600")]
        command: String,
        /// The pod's log directory (containers log to `<name>.log` in it); none if empty.
        #[arg(long, default_value = "")]
        log_dir: String,
        /// The pod's PID namespace mode: `container` (the kubelet's default) or `pod`.
        #[arg(long, default_value = "container")]
        pid_mode: String,
        /// The per-pod helper process: its comm or argv[0] file name starts with this and its
        /// command line contains the pod id (berth-monitor, containerd-shim).
        #[arg(long)]
        helper_comm: Option<String>,
        /// Container counts at which the helper's memory is read.
        #[arg(long, value_delimiter = ',', default_value = "1,10")]
        helper_at: Vec<usize>,
        /// The runtime daemon, for its VmRSS.
        #[arg(long)]
        daemon_pid: Option<u32>,
        /// Seconds to let things settle before each memory reading.
        #[arg(long, default_value_t = 1.0)]
        settle: f64,
        /// berth's state dir: the OCI spec berth wrote for the first container
        /// (`<dir>/containers/<id>/config.json`) is run by the bare OCI runtime (`--runc`)
        /// after each of berth's containers, twice: on berth's rootfs (`runc_*`), and on an
        /// overlay rootfs of its own mounted first (`runc_mount_*`); create, start,
        /// kill+wait, delete.
        #[arg(long)]
        runc_floor: Option<PathBuf>,
        /// The OCI runtime binary of `--runc-floor`.
        #[arg(long, default_value = "runc")]
        runc: String,
    },
    /// Costs as the node fills: the node is filled (untimed) with pods that each run one
    /// container, up to each of `levels` pods in turn; at each level `probes` pods are run
    /// (RunPodSandbox timed) and get one container each (CreateContainer timed), then
    /// ListContainers and ContainerStatus are timed `probes` times, the probes are stopped and
    /// removed (StopPodSandbox + RemovePodSandbox timed) and the daemon's VmRSS is read.
    /// Prints `lat <op>@<level> …` (with `--runc-floor`, also `floor@<level>` and
    /// `over@<level>`) and `rss daemon <level>pods …`.
    Scale {
        /// CRI endpoint, `unix:///path.sock` or a plain path.
        #[arg(long)]
        endpoint: String,
        #[arg(long, value_delimiter = ',', default_value = "0,10,100,250")]
        levels: Vec<usize>,
        #[arg(long, default_value_t = 20)]
        probes: usize,
        #[arg(long)]
        image: String,
        /// Pulled (untimed) before the pods, for runtimes that run a pause image.
        #[arg(long)]
        pause_image: Option<String>,
        #[arg(long, default_value = "sleep 3600")]
        command: String,
        /// The runtime daemon, for its VmRSS.
        #[arg(long)]
        daemon_pid: Option<u32>,
        /// Seconds to let things settle before each memory reading.
        #[arg(long, default_value_t = 1.0)]
        settle: f64,
        /// The runtime's state directory (berth's): after each probe's CreateContainer, the
        /// spec it wrote for the level's first probe is run by the bare OCI runtime with a
        /// rootfs mount of its own (as `containers --runc-floor` does), so that each level
        /// shows how much of CreateContainer's growth is the OCI runtime's own.
        #[arg(long)]
        runc_floor: Option<PathBuf>,
        /// The OCI runtime binary of `--runc-floor`.
        #[arg(long, default_value = "runc")]
        runc: String,
    },
    /// Streaming exec round trip: `Exec` RPC → URL → SPDY/3.1 upgrade → streams → exit status
    /// on the error stream, `count` times one at a time in a running container; `ExecSync` of
    /// the same command for reference.
    Exec {
        /// CRI endpoint, `unix:///path.sock` or a plain path.
        #[arg(long)]
        endpoint: String,
        #[arg(long)]
        image: String,
        /// Pulled (untimed) before the pod, for runtimes that run a pause image.
        #[arg(long)]
        pause_image: Option<String>,
        #[arg(long, default_value_t = 100)]
        count: usize,
        /// Untimed round trips first.
        #[arg(long, default_value_t = 5)]
        warmup: usize,
        /// The command exec'd (split on whitespace).
        #[arg(long, default_value = "true")]
        command: String,
    },
    /// Port-forward throughput over SPDY/3.1 to busybox `nc` servers in a pod: `mb` MB up (to
    /// a `dd` sink that answers once it has them all), down (`dd` of /dev/zero) and echoed
    /// (through `cat`, both ways at once), `repeat` times each.
    PortForward {
        /// CRI endpoint, `unix:///path.sock` or a plain path.
        #[arg(long)]
        endpoint: String,
        #[arg(long)]
        image: String,
        /// Pulled (untimed) before the pod, for runtimes that run a pause image.
        #[arg(long)]
        pause_image: Option<String>,
        /// Megabytes (10^6 bytes) per transfer.
        #[arg(long, default_value_t = 100)]
        mb: u64,
        #[arg(long, default_value_t = 3)]
        repeat: usize,
    },
    /// Stats latency with many running containers: `pods` pods holding `containers` containers
    /// in all, then `calls` timed ListContainerStats, ListPodSandboxStats and (with
    /// `--metrics-url`) Prometheus scrapes, `interval` seconds apart.
    Stats {
        /// CRI endpoint, `unix:///path.sock` or a plain path.
        #[arg(long)]
        endpoint: String,
        #[arg(long)]
        image: String,
        /// Pulled (untimed) before the pods, for runtimes that run a pause image.
        #[arg(long)]
        pause_image: Option<String>,
        #[arg(long, default_value_t = 20)]
        pods: usize,
        /// Running containers in all, spread evenly over the pods.
        #[arg(long, default_value_t = 200)]
        containers: usize,
        #[arg(long, default_value = "sleep 3600")]
        command: String,
        /// Containers created and started at a time (not timed).
        #[arg(long, default_value_t = 4)]
        parallel: usize,
        #[arg(long, default_value_t = 30)]
        calls: usize,
        /// Seconds between two timed calls.
        #[arg(long, default_value_t = 0.5)]
        interval: f64,
        /// `http://host:port/metrics` of the runtime, scraped like the calls.
        #[arg(long)]
        metrics_url: Option<String>,
        /// The runtime daemon, for the CPU time the calls cost.
        #[arg(long)]
        daemon_pid: Option<u32>,
        /// Helper processes whose CPU time counts too (shims): every process whose command line
        /// contains this string, and all their descendants. Repeatable.
        #[arg(long)]
        helpers_cmdline: Vec<String>,
        /// Each pod's cgroup parent is `<this>/pod<n>` (cgroupfs), as the kubelet gives one
        /// (`/kubepods/besteffort/pod<uid>`); none if empty.
        #[arg(long, default_value = "")]
        cgroup_parent: String,
    },
    /// Stops and removes every container and pod sandbox of a runtime.
    Cleanup {
        /// CRI endpoint, `unix:///path.sock` or a plain path.
        #[arg(long)]
        endpoint: String,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    match Cli::parse().cmd {
        Cmd::PushImage {
            registry,
            repo,
            tag,
            layers,
            total_mb,
            files_per_layer,
        } => {
            push_image(
                &registry,
                &repo,
                &tag,
                layers,
                total_mb * 1_000_000,
                files_per_layer,
            )
            .await
        }
        Cmd::Pull {
            endpoint,
            image,
            repeat,
            remove_between,
            wait_empty,
            wait_timeout,
        } => {
            let opts = PullOpts {
                image,
                repeat,
                remove_between,
                wait_empty,
                wait_timeout: Duration::from_secs(wait_timeout),
            };
            pull(&endpoint, &opts).await
        }
        Cmd::Rss { pid } => {
            let (hwm, rss) = rss_kib(pid)?;
            println!("VmHWM {hwm}\nVmRSS {rss}");
            Ok(())
        }
        Cmd::Pods {
            endpoint,
            count,
            parallel,
            pause_image,
            pid_mode,
            daemon_pid,
            helpers_cmdline,
            settle,
        } => {
            let opts = PodsOpts {
                count,
                parallel: parallel.max(1),
                pause_image,
                pid_mode: parse_pid_mode(&pid_mode)?,
                daemon_pid,
                helpers_cmdline,
                settle: Duration::from_secs_f64(settle),
            };
            pods(&endpoint, &opts).await
        }
        Cmd::Scale {
            endpoint,
            levels,
            probes,
            image,
            pause_image,
            command,
            daemon_pid,
            settle,
            runc_floor,
            runc,
        } => {
            let opts = ScaleOpts {
                levels,
                probes,
                image,
                pause_image,
                command: command.split_whitespace().map(String::from).collect(),
                daemon_pid,
                settle: Duration::from_secs_f64(settle),
                runc_floor,
                runc,
            };
            scale(&endpoint, &opts).await
        }
        Cmd::Containers {
            endpoint,
            count,
            image,
            pause_image,
            command,
            log_dir,
            pid_mode,
            helper_comm,
            helper_at,
            daemon_pid,
            settle,
            runc_floor,
            runc,
        } => {
            let opts = ContainersOpts {
                runc_floor,
                runc,
                count,
                image,
                pause_image,
                command: command.split_whitespace().map(String::from).collect(),
                log_dir,
                pid_mode: parse_pid_mode(&pid_mode)?,
                helper_comm,
                helper_at,
                daemon_pid,
                settle: Duration::from_secs_f64(settle),
            };
            containers(&endpoint, &opts).await
        }
        Cmd::Exec {
            endpoint,
            image,
            pause_image,
            count,
            warmup,
            command,
        } => {
            let opts = ExecOpts {
                image,
                pause_image,
                count,
                warmup,
                command: command.split_whitespace().map(String::from).collect(),
            };
            exec_bench(&endpoint, &opts).await
        }
        Cmd::PortForward {
            endpoint,
            image,
            pause_image,
            mb,
            repeat,
        } => {
            let opts = PortForwardOpts {
                image,
                pause_image,
                bytes: usize::try_from(mb * 1_000_000).context("--mb")?,
                repeat,
            };
            port_forward_bench(&endpoint, &opts).await
        }
        Cmd::Stats {
            endpoint,
            image,
            pause_image,
            pods,
            containers,
            command,
            parallel,
            calls,
            interval,
            metrics_url,
            daemon_pid,
            helpers_cmdline,
            cgroup_parent,
        } => {
            let opts = StatsOpts {
                image,
                pause_image,
                pods: pods.max(1),
                containers,
                command: command.split_whitespace().map(String::from).collect(),
                parallel: parallel.max(1),
                calls,
                interval: Duration::from_secs_f64(interval),
                metrics_url,
                daemon_pid,
                helpers_cmdline,
                cgroup_parent,
            };
            stats_bench(&endpoint, &opts).await
        }
        Cmd::Cleanup { endpoint } => cleanup(&endpoint).await,
    }
}

// ----- push-image -----

fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "powerpc64" => "ppc64le",
        "s390x" => "s390x",
        "riscv64" => "riscv64",
        "arm" => "arm",
        "x86" => "386",
        other => other,
    }
}

/// One layer: an uncompressed tar of `files` random files totalling `size` bytes.
/// Returns `(tar, gzip)`.
fn build_layer(
    index: usize,
    size: u64,
    files: usize,
    urandom: &mut std::fs::File,
) -> Result<(Vec<u8>, Vec<u8>)> {
    let files = files.max(1) as u64;
    let mut builder = tar::Builder::new(Vec::with_capacity(size as usize + 64 * 1024));
    let dir = format!("bench/layer-{index}");
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Directory);
    header.set_mode(0o755);
    header.set_uid(0);
    header.set_gid(0);
    header.set_size(0);
    header.set_mtime(0);
    builder.append_data(&mut header, "bench/", std::io::empty())?;
    builder.append_data(&mut header, format!("{dir}/"), std::io::empty())?;
    let mut written = 0;
    for f in 0..files {
        let len = if f == files - 1 {
            size - written
        } else {
            size / files
        };
        written += len;
        let mut data = vec![0u8; len as usize];
        urandom.read_exact(&mut data).context("read /dev/urandom")?;
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_size(len);
        header.set_mtime(0);
        builder.append_data(&mut header, format!("{dir}/file-{f}.bin"), &data[..])?;
    }
    let tar = builder.into_inner()?;
    // Random data does not compress: the fastest level gives the same size, sooner.
    let mut gz = GzEncoder::new(
        Vec::with_capacity(tar.len() + tar.len() / 100 + 1024),
        flate2::Compression::fast(),
    );
    gz.write_all(&tar)?;
    let gz = gz.finish()?;
    Ok((tar, gz))
}

async fn push_image(
    registry: &str,
    repo: &str,
    tag: &str,
    layers: usize,
    total: u64,
    files_per_layer: usize,
) -> Result<()> {
    if layers == 0 {
        bail!("--layers must be at least 1");
    }
    let reference = Reference::with_tag(registry.to_string(), repo.to_string(), tag.to_string());
    let client = oci_client::Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        use_monolithic_push: true,
        ..Default::default()
    });
    client
        .auth(
            &reference,
            &RegistryAuth::Anonymous,
            RegistryOperation::Push,
        )
        .await
        .with_context(|| format!("auth for push to {reference}"))?;

    let mut urandom = std::fs::File::open("/dev/urandom").context("open /dev/urandom")?;
    let mut diff_ids = Vec::new();
    let mut layer_descs = Vec::new();
    let mut pushed_bytes: u64 = 0;
    let mut assigned = 0;
    for i in 0..layers {
        let size = if i == layers - 1 {
            total - assigned
        } else {
            total / layers as u64
        };
        assigned += size;
        let (tar, gz) = build_layer(i, size, files_per_layer, &mut urandom)?;
        let diff_id = sha256_digest(&tar);
        drop(tar);
        let digest = sha256_digest(&gz);
        let len = gz.len() as u64;
        client
            .push_blob(&reference, gz, &digest)
            .await
            .with_context(|| format!("push layer {i} ({digest})"))?;
        eprintln!("pushed layer {i}: {digest} ({len} bytes, diff id {diff_id})");
        pushed_bytes += len;
        diff_ids.push(diff_id);
        layer_descs.push(serde_json::json!({
            "mediaType": OCI_LAYER_GZIP,
            "digest": digest,
            "size": len,
        }));
    }

    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": oci_arch(),
        "os": "linux",
        "config": {
            "Cmd": ["/bin/sh"],
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        },
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
        "history": (0..layers).map(|i| serde_json::json!({
            "created_by": format!("cri_bench random layer {i}"),
        })).collect::<Vec<_>>(),
    }))?;
    let config_digest = sha256_digest(&config);
    let config_len = config.len() as u64;
    client
        .push_blob(&reference, config, &config_digest)
        .await
        .context("push config")?;
    pushed_bytes += config_len;

    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": OCI_CONFIG,
            "digest": config_digest,
            "size": config_len,
        },
        "layers": layer_descs,
    }))?;
    let manifest_digest = sha256_digest(&manifest);
    client
        .push_manifest_raw(
            &reference,
            manifest,
            http::HeaderValue::from_static(OCI_MANIFEST),
        )
        .await
        .context("push manifest")?;
    println!("image {reference}");
    println!("digest {manifest_digest}");
    println!("bytes {pushed_bytes}");
    Ok(())
}

// ----- pull -----

struct PullOpts {
    image: String,
    repeat: usize,
    remove_between: bool,
    wait_empty: Vec<PathBuf>,
    wait_timeout: Duration,
}

async fn connect(endpoint: &str) -> Result<ImageServiceClient<Channel>> {
    Ok(image_client(channel(endpoint).await?))
}

fn image_client(channel: Channel) -> ImageServiceClient<Channel> {
    ImageServiceClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

fn runtime_client(channel: Channel) -> RuntimeServiceClient<Channel> {
    RuntimeServiceClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

async fn channel(endpoint: &str) -> Result<Channel> {
    let path = PathBuf::from(endpoint.strip_prefix("unix://").unwrap_or(endpoint));
    let channel = Endpoint::try_from("http://[::]:50051")?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
        .with_context(|| format!("connect to {endpoint}"))?;
    Ok(channel)
}

fn spec(image: &str) -> Option<ImageSpec> {
    Some(ImageSpec {
        image: image.to_string(),
        ..Default::default()
    })
}

async fn image_present(client: &mut ImageServiceClient<Channel>, image: &str) -> Result<bool> {
    let resp = client
        .image_status(ImageStatusRequest {
            image: spec(image),
            verbose: false,
        })
        .await
        .with_context(|| format!("ImageStatus {image}"))?;
    Ok(resp.into_inner().image.is_some())
}

/// Regular files (any depth) under `dir`; a missing dir counts as empty.
fn count_files(dir: &Path) -> Result<usize> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e).with_context(|| format!("read dir {}", dir.display())),
    };
    let mut n = 0;
    for entry in entries {
        let entry = entry?;
        let ft = entry.file_type()?;
        if ft.is_dir() {
            n += count_files(&entry.path())?;
        } else {
            n += 1;
        }
    }
    Ok(n)
}

/// Bytes of regular files (any depth) under `dir`; a missing dir holds none.
fn file_bytes(dir: &Path) -> Result<u64> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e).with_context(|| format!("read dir {}", dir.display())),
    };
    let mut n = 0;
    for entry in entries {
        let entry = entry?;
        let ft = entry.file_type()?;
        if ft.is_dir() {
            n += file_bytes(&entry.path())?;
        } else if ft.is_file() {
            n += entry.metadata()?.len();
        }
    }
    Ok(n)
}

/// RemoveImage, then wait until the image is gone and every `wait_empty` dir is empty.
async fn remove_and_wait(client: &mut ImageServiceClient<Channel>, opts: &PullOpts) -> Result<()> {
    let start = Instant::now();
    client
        .remove_image(RemoveImageRequest {
            image: spec(&opts.image),
        })
        .await
        .with_context(|| format!("RemoveImage {}", opts.image))?;
    if image_present(client, &opts.image).await? {
        bail!("{} still listed after RemoveImage", opts.image);
    }
    loop {
        let mut left = Vec::new();
        for d in &opts.wait_empty {
            let n = count_files(d)?;
            if n > 0 {
                left.push(format!("{}: {n} files", d.display()));
            }
        }
        if left.is_empty() {
            break;
        }
        if start.elapsed() > opts.wait_timeout {
            bail!(
                "content not collected {:?} after RemoveImage: {}",
                opts.wait_timeout,
                left.join(", ")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "removed {} and its content in {:.2}s",
        opts.image,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn pull(endpoint: &str, opts: &PullOpts) -> Result<()> {
    let mut client = connect(endpoint).await?;
    if opts.remove_between && image_present(&mut client, &opts.image).await? {
        remove_and_wait(&mut client, opts).await?;
    }
    for n in 1..=opts.repeat {
        if opts.remove_between {
            for d in &opts.wait_empty {
                let files = count_files(d)?;
                if files > 0 {
                    bail!(
                        "pull {n} would not be cold: {} holds {files} files",
                        d.display()
                    );
                }
            }
        }
        // Start every pull with no dirty pages left over from the previous one.
        nix::unistd::sync();
        let start = Instant::now();
        let resp = client
            .pull_image(PullImageRequest {
                image: spec(&opts.image),
                auth: None,
                sandbox_config: None,
            })
            .await
            .with_context(|| format!("PullImage {} (pull {n})", opts.image))?;
        let secs = start.elapsed().as_secs_f64();
        let mut on_disk = 0;
        for d in &opts.wait_empty {
            on_disk += file_bytes(d)?;
        }
        println!("pull {n} {secs:.3} {on_disk}");
        eprintln!(
            "pull {n}: {secs:.3}s -> {} ({on_disk} bytes in the watched dirs)",
            resp.into_inner().image_ref
        );
        if opts.remove_between {
            remove_and_wait(&mut client, opts).await?;
        }
    }
    Ok(())
}

// ----- rss -----

fn rss_kib(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64> {
        kib_field(&status, name).with_context(|| format!("no {name} in /proc/{pid}/status"))
    };
    Ok((field("VmHWM:")?, field("VmRSS:")?))
}

/// The value of a `Name:   123 kB` line of a `/proc/PID/status`-like text, in KiB.
fn kib_field(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

// ----- pods, containers, cleanup -----

fn parse_pid_mode(mode: &str) -> Result<cri::NamespaceMode> {
    match mode {
        "container" => Ok(cri::NamespaceMode::Container),
        "pod" => Ok(cri::NamespaceMode::Pod),
        other => bail!("--pid-mode {other:?}: want `container` or `pod`"),
    }
}

fn pod_config(name: &str, pid_mode: cri::NamespaceMode, log_dir: &str) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.to_string(),
            uid: format!("uid-{name}"),
            namespace: "cri-bench".to_string(),
            attempt: 0,
        }),
        hostname: name.to_string(),
        log_directory: log_dir.to_string(),
        linux: Some(cri::LinuxPodSandboxConfig {
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(cri::NamespaceOption {
                    pid: pid_mode as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Pulls `image` unless the runtime has it already (not timed).
async fn ensure_image(channel: &Channel, image: &str) -> Result<()> {
    let mut client = image_client(channel.clone());
    if image_present(&mut client, image).await? {
        return Ok(());
    }
    let start = Instant::now();
    client
        .pull_image(PullImageRequest {
            image: spec(image),
            auth: None,
            sandbox_config: None,
        })
        .await
        .with_context(|| format!("PullImage {image}"))?;
    eprintln!("pulled {image} in {:.2}s", start.elapsed().as_secs_f64());
    Ok(())
}

/// Runs `f` over `items`, at most `parallel` at a time (one task per worker, all sharing the
/// one HTTP/2 connection of the channel, as the kubelet does). Results in completion order.
async fn fan_out<T, R, F, Fut>(items: Vec<T>, parallel: usize, f: F) -> Result<Vec<R>>
where
    T: Send + 'static,
    R: Send + 'static,
    F: Fn(T) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<R>> + Send + 'static,
{
    let queue = Arc::new(StdMutex::new(items.into_iter()));
    let f = Arc::new(f);
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..parallel.max(1) {
        let queue = queue.clone();
        let f = f.clone();
        set.spawn(async move {
            let mut out = Vec::new();
            loop {
                let next = queue.lock().expect("queue lock").next();
                let Some(item) = next else { break };
                out.push(f(item).await?);
            }
            Ok::<_, anyhow::Error>(out)
        });
    }
    let mut all = Vec::new();
    let mut first_err = None;
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok(Ok(v)) => all.extend(v),
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(e) => {
                first_err.get_or_insert(e.into());
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(all),
    }
}

/// Nearest-rank percentile of sorted `v` (`q` in 0..=1).
fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Prints `lat <op> <mode> <n> <p50_ms> <p95_ms> <max_ms>` for `secs`.
fn print_lat(op: &str, mode: &str, secs: &[f64]) {
    let mut v: Vec<f64> = secs.iter().map(|s| s * 1000.0).collect();
    v.sort_by(f64::total_cmp);
    println!(
        "lat {op} {mode} {} {:.2} {:.2} {:.2}",
        v.len(),
        percentile(&v, 0.50),
        percentile(&v, 0.95),
        v.last().copied().unwrap_or(f64::NAN)
    );
}

/// One process as /proc shows it.
struct Proc {
    pid: u32,
    ppid: u32,
    comm: String,
    argv0: String,
    cmdline: String,
}

fn list_procs() -> Vec<Proc> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        // Processes come and go while we look: skip the ones that went.
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid …; comm may hold spaces and parentheses.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = stat[open + 1..close].to_string();
        let Some(ppid) = stat[close + 1..]
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
        else {
            continue;
        };
        let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let args: Vec<String> = raw
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let argv0 = args
            .first()
            .map(|a| a.rsplit('/').next().unwrap_or(a).to_string())
            .unwrap_or_default();
        out.push(Proc {
            pid,
            ppid,
            comm,
            argv0,
            cmdline: args.join(" "),
        });
    }
    out
}

/// `(VmRSS, Pss)` of a process in KiB; `None` when it is gone (or a kernel thread).
fn rss_pss_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = kib_field(&status, "VmRSS:")?;
    let pss = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|s| kib_field(&s, "Pss:"))
        .unwrap_or(0);
    Some((rss, pss))
}

/// Sums memory over `pids`; prints `rss <what> <when> <procs> <rss_kib> <pss_kib> <comms>`,
/// and for one process `rssparts <what> <when> <anon_kib> <file_kib>`.
fn print_rss(what: &str, when: &str, pids: &[u32], procs: &[Proc]) {
    let mut n = 0;
    let (mut rss, mut pss) = (0, 0);
    // comm → (processes, VmRSS KiB)
    let mut comms: std::collections::BTreeMap<&str, (usize, u64)> = Default::default();
    for &pid in pids {
        if let Some((r, p)) = rss_pss_kib(pid) {
            n += 1;
            rss += r;
            pss += p;
            let comm = procs
                .iter()
                .find(|p| p.pid == pid)
                .map(|p| p.comm.as_str())
                .unwrap_or("?");
            let e = comms.entry(comm).or_default();
            e.0 += 1;
            e.1 += r;
        }
    }
    let comms = if comms.is_empty() {
        "-".to_string()
    } else {
        comms
            .iter()
            .map(|(c, (k, r))| format!("{k}x{c}({:.2}MiB/each)", *r as f64 / 1024.0 / *k as f64))
            .collect::<Vec<_>>()
            .join("+")
    };
    println!("rss {what} {when} {n} {rss} {pss} {comms}");
    // Where a daemon's RSS is: its heap and stacks (RssAnon) or mapped files, mostly its own
    // binary's code (RssFile).
    if let [pid] = pids
        && let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status"))
    {
        let field = |name: &str| kib_field(&status, name).unwrap_or(0);
        println!(
            "rssparts {what} {when} {} {}",
            field("RssAnon:"),
            field("RssFile:")
        );
    }
}

/// The processes whose command line holds one of `patterns`, and all their descendants
/// (never this process nor `exclude`).
fn helper_tree(procs: &[Proc], patterns: &[String], exclude: Option<u32>) -> Vec<u32> {
    let me = std::process::id();
    let mut set: std::collections::BTreeSet<u32> = procs
        .iter()
        .filter(|p| p.pid != me && Some(p.pid) != exclude)
        .filter(|p| patterns.iter().any(|s| p.cmdline.contains(s.as_str())))
        .map(|p| p.pid)
        .collect();
    loop {
        let before = set.len();
        for p in procs {
            if set.contains(&p.ppid) && p.pid != me && Some(p.pid) != exclude {
                set.insert(p.pid);
            }
        }
        if set.len() == before {
            break;
        }
    }
    set.into_iter().collect()
}

fn print_daemon_rss(daemon_pid: Option<u32>, when: &str) {
    if let Some(pid) = daemon_pid {
        let procs = list_procs();
        print_rss("daemon", when, &[pid], &procs);
    }
}

struct PodsOpts {
    count: usize,
    parallel: usize,
    pause_image: Option<String>,
    pid_mode: cri::NamespaceMode,
    daemon_pid: Option<u32>,
    helpers_cmdline: Vec<String>,
    settle: Duration,
}

async fn run_pods(
    channel: &Channel,
    prefix: &str,
    opts: &PodsOpts,
    parallel: usize,
) -> Result<Vec<(String, f64)>> {
    let names: Vec<String> = (0..opts.count).map(|i| format!("{prefix}-{i}")).collect();
    let channel = channel.clone();
    let pid_mode = opts.pid_mode;
    fan_out(names, parallel, move |name| {
        let mut client = runtime_client(channel.clone());
        async move {
            let start = Instant::now();
            let resp = client
                .run_pod_sandbox(cri::RunPodSandboxRequest {
                    config: Some(pod_config(&name, pid_mode, "")),
                    runtime_handler: String::new(),
                })
                .await
                .with_context(|| format!("RunPodSandbox {name}"))?;
            Ok((
                resp.into_inner().pod_sandbox_id,
                start.elapsed().as_secs_f64(),
            ))
        }
    })
    .await
}

async fn stop_remove_pod(client: &mut RuntimeServiceClient<Channel>, id: String) -> Result<f64> {
    let start = Instant::now();
    client
        .stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: id.clone(),
        })
        .await
        .with_context(|| format!("StopPodSandbox {id}"))?;
    client
        .remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: id.clone(),
        })
        .await
        .with_context(|| format!("RemovePodSandbox {id}"))?;
    Ok(start.elapsed().as_secs_f64())
}

async fn remove_pods(channel: &Channel, ids: Vec<String>, parallel: usize) -> Result<Vec<f64>> {
    let channel = channel.clone();
    fan_out(ids, parallel, move |id| {
        let mut client = runtime_client(channel.clone());
        async move { stop_remove_pod(&mut client, id).await }
    })
    .await
}

fn read_memory(opts: &PodsOpts, when: &str) {
    let procs = list_procs();
    if let Some(pid) = opts.daemon_pid {
        print_rss("daemon", when, &[pid], &procs);
    }
    if !opts.helpers_cmdline.is_empty() {
        let pids = helper_tree(&procs, &opts.helpers_cmdline, opts.daemon_pid);
        print_rss("helpers", when, &pids, &procs);
    }
}

async fn pods(endpoint: &str, opts: &PodsOpts) -> Result<()> {
    let channel = channel(endpoint).await?;
    if let Some(image) = &opts.pause_image {
        ensure_image(&channel, image).await?;
    }
    read_memory(opts, "idle");
    let cpu = || runtime_cpu_ms(opts.daemon_pid, &opts.helpers_cmdline);
    for (mode, parallel) in [("serial", 1), ("parallel", opts.parallel)] {
        let start = Instant::now();
        let cpu0 = cpu();
        let made = run_pods(&channel, &format!("bench-{mode}"), opts, parallel).await?;
        // Helpers that exit before the second reading (none do while their pods run) would
        // take their time with them.
        let cpu_run = cpu() - cpu0;
        let wall = start.elapsed().as_secs_f64();
        let secs: Vec<f64> = made.iter().map(|(_, s)| *s).collect();
        print_lat("run", mode, &secs);
        println!(
            "cpu run_{mode} {} {:.2}",
            made.len(),
            cpu_run / made.len().max(1) as f64
        );
        println!("wall run {mode} {} {wall:.3}", made.len());
        eprintln!("{mode}: {} pods running after {wall:.1}s", made.len());
        tokio::time::sleep(opts.settle).await;
        read_memory(opts, &format!("{}pods-{mode}", made.len()));
        let ids = made.into_iter().map(|(id, _)| id).collect();
        let start = Instant::now();
        let secs = remove_pods(&channel, ids, parallel).await?;
        let wall = start.elapsed().as_secs_f64();
        print_lat("stop_remove", mode, &secs);
        println!("wall stop_remove {mode} {} {wall:.3}", secs.len());
        eprintln!("{mode}: {} pods removed after {wall:.1}s", secs.len());
    }
    tokio::time::sleep(opts.settle).await;
    read_memory(opts, "after");
    Ok(())
}

struct ContainersOpts {
    count: usize,
    image: String,
    pause_image: Option<String>,
    command: Vec<String>,
    log_dir: String,
    pid_mode: cri::NamespaceMode,
    helper_comm: Option<String>,
    helper_at: Vec<usize>,
    daemon_pid: Option<u32>,
    settle: Duration,
    runc_floor: Option<PathBuf>,
    runc: String,
}

/// The per-pod helper of `pod_id`: comm or argv[0] starts with `name`, command line holds
/// the pod id.
fn find_helper(procs: &[Proc], name: &str, pod_id: &str) -> Vec<u32> {
    let me = std::process::id();
    procs
        .iter()
        .filter(|p| p.pid != me)
        .filter(|p| p.comm.starts_with(name) || p.argv0.starts_with(name))
        .filter(|p| p.cmdline.contains(pod_id))
        .map(|p| p.pid)
        .collect()
}

async fn containers(endpoint: &str, opts: &ContainersOpts) -> Result<()> {
    let channel = channel(endpoint).await?;
    let mut client = runtime_client(channel.clone());
    if let Some(image) = &opts.pause_image {
        ensure_image(&channel, image).await?;
    }
    ensure_image(&channel, &opts.image).await?;
    let pod_cfg = pod_config("bench-containers", opts.pid_mode, &opts.log_dir);
    let pod_id = client
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(pod_cfg.clone()),
            runtime_handler: String::new(),
        })
        .await
        .context("RunPodSandbox")?
        .into_inner()
        .pod_sandbox_id;
    eprintln!("pod {pod_id}");
    let read_helper = |n: usize| {
        if let Some(name) = &opts.helper_comm {
            let procs = list_procs();
            let pids = find_helper(&procs, name, &pod_id);
            print_rss("helper", &format!("{n}ctr"), &pids, &procs);
        }
    };
    if opts.helper_at.contains(&0) {
        tokio::time::sleep(opts.settle).await;
        read_helper(0);
    }
    let (mut create, mut start, mut both) = (Vec::new(), Vec::new(), Vec::new());
    let mut ids = Vec::new();
    // Wall time of the create+start phase, without the pauses for memory readings (and the
    // floor's copies).
    let mut paused = Duration::ZERO;
    let mut floor: Option<Floor> = None;
    let wall = Instant::now();
    for i in 0..opts.count {
        let name = format!("c{i}");
        let config = cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: name.clone(),
                attempt: 0,
            }),
            image: spec(&opts.image),
            command: opts.command.clone(),
            log_path: if opts.log_dir.is_empty() {
                String::new()
            } else {
                format!("{name}.log")
            },
            linux: Some(cri::LinuxContainerConfig::default()),
            ..Default::default()
        };
        let t0 = Instant::now();
        let id = client
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod_id.clone(),
                config: Some(config),
                sandbox_config: Some(pod_cfg.clone()),
            })
            .await
            .with_context(|| format!("CreateContainer {name}"))?
            .into_inner()
            .container_id;
        let t1 = Instant::now();
        client
            .start_container(cri::StartContainerRequest {
                container_id: id.clone(),
            })
            .await
            .with_context(|| format!("StartContainer {name} ({id})"))?;
        let t2 = Instant::now();
        create.push((t1 - t0).as_secs_f64());
        start.push((t2 - t1).as_secs_f64());
        both.push((t2 - t0).as_secs_f64());
        ids.push(id);
        // The floor's copies run between the runtime's containers, so that both see the same
        // node (as many containers running, the same moment's disk and CPU).
        if let Some(state) = &opts.runc_floor {
            let t = Instant::now();
            if floor.is_none() {
                let spec = state.join("containers").join(&ids[0]).join("config.json");
                floor = Some(Floor::new(&opts.runc, &spec).context("bare runc floor")?);
            }
            if let Some(f) = floor.as_mut() {
                // Each copy, and the runtime's next container, starts on a settled node: the
                // kernel's deferred work of what ran just before (a start, a copy's kill,
                // delete and unmount) does not land on it.
                tokio::time::sleep(FLOOR_SETTLE).await;
                f.once(false).context("bare runc floor")?;
                tokio::time::sleep(FLOOR_SETTLE).await;
                f.once(true)
                    .context("bare runc floor with a rootfs mount")?;
                tokio::time::sleep(FLOOR_SETTLE).await;
            }
            paused += t.elapsed();
        }
        if opts.helper_at.contains(&ids.len()) {
            let t = Instant::now();
            tokio::time::sleep(opts.settle).await;
            read_helper(ids.len());
            paused += t.elapsed();
        }
    }
    let wall = (wall.elapsed() - paused).as_secs_f64();
    print_lat("create", "serial", &create);
    print_lat("start", "serial", &start);
    print_lat("create_start", "serial", &both);
    println!("wall create_start serial {} {wall:.3}", ids.len());
    eprintln!("{} containers running", ids.len());
    tokio::time::sleep(opts.settle).await;
    print_daemon_rss(opts.daemon_pid, &format!("{}ctr", ids.len()));
    read_helper(ids.len());
    if let Some(f) = floor.take() {
        f.print(&both);
    }

    let (mut stop, mut remove, mut both) = (Vec::new(), Vec::new(), Vec::new());
    let wall = Instant::now();
    for id in ids {
        let t0 = Instant::now();
        client
            .stop_container(cri::StopContainerRequest {
                container_id: id.clone(),
                timeout: 0,
            })
            .await
            .with_context(|| format!("StopContainer {id}"))?;
        let t1 = Instant::now();
        client
            .remove_container(cri::RemoveContainerRequest {
                container_id: id.clone(),
            })
            .await
            .with_context(|| format!("RemoveContainer {id}"))?;
        let t2 = Instant::now();
        stop.push((t1 - t0).as_secs_f64());
        remove.push((t2 - t1).as_secs_f64());
        both.push((t2 - t0).as_secs_f64());
    }
    let wall = wall.elapsed().as_secs_f64();
    print_lat("stop", "serial", &stop);
    print_lat("remove", "serial", &remove);
    print_lat("stop_remove", "serial", &both);
    println!("wall stop_remove serial {} {wall:.3}", both.len());
    stop_remove_pod(&mut client, pod_id.clone()).await?;
    eprintln!("containers and pod removed");
    Ok(())
}

/// The pause before each floor copy and after the last (see `containers`).
const FLOOR_SETTLE: Duration = Duration::from_millis(100);

/// Runs `<runc> args…` with stdin and stdout on /dev/null and stderr into `err` (a file, not
/// a pipe: the init that `create` leaves waiting would hold a pipe open); fails with it.
fn run_runc(runc: &str, args: &[&str], err: &Path) -> Result<()> {
    let status = std::process::Command::new(runc)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(err)?)
        .status()
        .with_context(|| format!("running {runc}"))?;
    if !status.success() {
        bail!(
            "{runc} {}: {}",
            args.join(" "),
            std::fs::read_to_string(err).unwrap_or_default().trim()
        );
    }
    Ok(())
}

/// The floor under a runtime's container lifecycle: copies of the OCI spec at `spec` (written
/// by the runtime for a running container of the pod, so with the pod's namespaces, mounts
/// and rootfs) run one at a time by the bare OCI runtime: `create` + `start`, then `kill 9` +
/// waiting for the exit (this process is made the subreaper, so the container's init is its
/// child) + `delete`. Each copy gets its own bundle, cgroup (`/berth-bench-runc/<name>`) and
/// runtime root; everything is deleted as it goes.
///
/// When the runtime's rootfs is an overlay, a copy can also get a rootfs of its own first, as a
/// runtime must ("mount"): the same lower dirs with a new upper and work dir, mounted
/// `volatile`, timed as `runc_mount_mount` and unmounted after its `delete`.
struct Floor {
    runc: String,
    config: serde_json::Value,
    lower: Option<String>,
    dir: tempfile::TempDir,
    root: String,
    bare: FloorTimes,
    mounted: FloorTimes,
}

/// The timings of one kind of floor copy, in seconds.
#[derive(Default)]
struct FloorTimes {
    /// The rootfs mount (copies with a rootfs of their own only).
    mount: Vec<f64>,
    create: Vec<f64>,
    start: Vec<f64>,
    create_start: Vec<f64>,
    stop: Vec<f64>,
    remove: Vec<f64>,
    stop_remove: Vec<f64>,
}

impl FloorTimes {
    /// Prints the floor's figures, and the runtime's Create+Start over this floor paired per
    /// container (`over`: the runtime's i-th Create+Start, whose floor copy ran right after
    /// it): p50 of the differences is steadier than a difference of two p50s on a noisy node.
    fn print(&self, prefix: &str, over: &[f64]) {
        if self.create.is_empty() {
            return;
        }
        let paired: Vec<f64> = over
            .iter()
            .zip(&self.create_start)
            .map(|(runtime, floor)| runtime - floor)
            .collect();
        print_lat(&format!("over_{prefix}"), "serial", &paired);
        if !self.mount.is_empty() {
            print_lat(&format!("{prefix}_mount"), "serial", &self.mount);
        }
        for (op, v) in [
            ("create", &self.create),
            ("start", &self.start),
            ("create_start", &self.create_start),
            ("stop", &self.stop),
            ("remove", &self.remove),
            ("stop_remove", &self.stop_remove),
        ] {
            print_lat(&format!("{prefix}_{op}"), "serial", v);
        }
    }
}

impl Floor {
    fn new(runc: &str, spec: &Path) -> Result<Floor> {
        let text = std::fs::read(spec).with_context(|| format!("reading {}", spec.display()))?;
        let mut config: serde_json::Value = serde_json::from_slice(&text)?;
        let bundle = spec.parent().unwrap_or(Path::new("/"));
        // The same rootfs (shared read-write by the copies, which only sleep).
        let mut rootfs = bundle.join("rootfs");
        if let Some(root) = config.pointer_mut("/root/path") {
            let p = PathBuf::from(root.as_str().unwrap_or("rootfs"));
            rootfs = bundle.join(p);
            *root = serde_json::json!(rootfs.display().to_string());
        }
        // Staged mounts berth let go after its create may be gone: those are left out.
        if let Some(mounts) = config.get_mut("mounts").and_then(|m| m.as_array_mut()) {
            mounts.retain(|m| {
                let bind = m
                    .get("options")
                    .and_then(|o| o.as_array())
                    .is_some_and(|o| o.iter().any(|x| x == "bind" || x == "rbind"));
                !bind
                    || m.get("source")
                        .and_then(|s| s.as_str())
                        .is_some_and(|s| Path::new(s).exists())
            });
        }
        if let Some(p) = config.pointer_mut("/process/terminal") {
            *p = serde_json::json!(false);
        }
        let dir = tempfile::tempdir()?;
        let root = dir.path().join("runc-root").display().to_string();
        // The container inits become our children: `kill` is then followed by a real wait.
        nix::sys::prctl::set_child_subreaper(true)?;
        Ok(Floor {
            runc: runc.to_string(),
            config,
            lower: overlay_lowerdir(&rootfs),
            dir,
            root,
            bare: FloorTimes::default(),
            mounted: FloorTimes::default(),
        })
    }

    /// One copy, with a rootfs of its own when `own_rootfs` (and the rootfs is an overlay).
    fn once(&mut self, own_rootfs: bool) -> Result<()> {
        let lower = match (own_rootfs, &self.lower) {
            (true, Some(l)) => Some(l.clone()),
            (true, None) => return Ok(()),
            (false, _) => None,
        };
        // Unique in this process (a scale run makes a Floor per level).
        static COPIES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = COPIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("berth-bench-runc-{}-{n}", std::process::id());
        let b = self.dir.path().join(&name);
        std::fs::create_dir_all(&b)?;
        let mut config = self.config.clone();
        config["linux"]["cgroupsPath"] = serde_json::json!(format!("/berth-bench-runc/{name}"));
        if lower.is_some() {
            config["root"]["path"] = serde_json::json!(b.join("rootfs").display().to_string());
        }
        // Written first: nothing fails between the mount and its unmount below.
        std::fs::write(b.join("config.json"), serde_json::to_vec(&config)?)?;
        let mut mount = None;
        if let Some(lower) = &lower {
            let tm = Instant::now();
            for d in ["upper", "work", "rootfs"] {
                std::fs::create_dir(b.join(d))?;
            }
            let options = format!(
                "lowerdir={lower},upperdir={},workdir={},volatile",
                b.join("upper").display(),
                b.join("work").display()
            );
            nix::mount::mount(
                Some("overlay"),
                &b.join("rootfs"),
                Some("overlay"),
                nix::mount::MsFlags::empty(),
                Some(options.as_str()),
            )
            .context("mounting a rootfs of its own")?;
            mount = Some(tm.elapsed().as_secs_f64());
        }
        let err = b.join("runc.err");
        let once = floor_once(&self.runc, &self.root, &b, &name, &err);
        if mount.is_some() {
            let _ = nix::mount::umount2(&b.join("rootfs"), nix::mount::MntFlags::MNT_DETACH);
        }
        let [t0, t1, t2, t3, t4, t5] = match once {
            Ok(t) => t,
            Err(e) => {
                // Whatever of it exists goes (its init may wait in `create`'s state).
                let _ = run_runc(
                    &self.runc,
                    &["--root", &self.root, "delete", "--force", &name],
                    &err,
                );
                return Err(e);
            }
        };
        let times = if lower.is_some() {
            &mut self.mounted
        } else {
            &mut self.bare
        };
        times.mount.extend(mount);
        times.create.push((t1 - t0).as_secs_f64());
        times.start.push((t2 - t1).as_secs_f64());
        times
            .create_start
            .push((t2 - t0).as_secs_f64() + mount.unwrap_or(0.0));
        times.stop.push((t4 - t3).as_secs_f64());
        times.remove.push((t5 - t4).as_secs_f64());
        times.stop_remove.push((t5 - t3).as_secs_f64());
        std::fs::remove_dir_all(&b)?;
        Ok(())
    }

    /// `over`: the runtime's Create+Start of each container, in order.
    fn print(&self, over: &[f64]) {
        self.bare.print("runc", over);
        self.mounted.print("runc_mount", over);
    }
}

impl Drop for Floor {
    fn drop(&mut self) {
        let _ = nix::sys::prctl::set_child_subreaper(false);
    }
}

/// The `lowerdir` option of the overlay mounted at `target`, from this process's mountinfo
/// (none when it is no overlay).
fn overlay_lowerdir(target: &Path) -> Option<String> {
    let target = std::fs::canonicalize(target).ok()?;
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().rev().find_map(|line| {
        let (mine, theirs) = line.split_once(" - ")?;
        let point = mine.split(' ').nth(4)?;
        let mut t = theirs.split(' ');
        if Path::new(point) != target || t.next()? != "overlay" {
            return None;
        }
        let options = t.nth(1)?;
        options
            .split(',')
            .find_map(|o| o.strip_prefix("lowerdir="))
            .map(str::to_string)
    })
}

struct ScaleOpts {
    levels: Vec<usize>,
    probes: usize,
    image: String,
    pause_image: Option<String>,
    command: Vec<String>,
    daemon_pid: Option<u32>,
    settle: Duration,
    runc_floor: Option<PathBuf>,
    runc: String,
}

/// A container config of `name` running `command` in `image`, no log.
fn container_config(name: &str, image: &str, command: &[String]) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: name.to_string(),
            attempt: 0,
        }),
        image: spec(image),
        command: command.to_vec(),
        linux: Some(cri::LinuxContainerConfig::default()),
        ..Default::default()
    }
}

/// Runs pod `name` and creates a container in it (started when `start`); the times of
/// RunPodSandbox and CreateContainer, the pod and container ids.
async fn pod_and_container(
    client: &mut RuntimeServiceClient<Channel>,
    name: &str,
    opts: &ScaleOpts,
    start: bool,
) -> Result<(f64, f64, String, String)> {
    let pod_cfg = pod_config(name, cri::NamespaceMode::Container, "");
    let t0 = Instant::now();
    let pod = client
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(pod_cfg.clone()),
            runtime_handler: String::new(),
        })
        .await
        .with_context(|| format!("RunPodSandbox {name}"))?
        .into_inner()
        .pod_sandbox_id;
    let t1 = Instant::now();
    let ctr = client
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(container_config("c", &opts.image, &opts.command)),
            sandbox_config: Some(pod_cfg),
        })
        .await
        .with_context(|| format!("CreateContainer in {name}"))?
        .into_inner()
        .container_id;
    let t2 = Instant::now();
    if start {
        client
            .start_container(cri::StartContainerRequest {
                container_id: ctr.clone(),
            })
            .await
            .with_context(|| format!("StartContainer in {name}"))?;
    }
    Ok(((t1 - t0).as_secs_f64(), (t2 - t1).as_secs_f64(), pod, ctr))
}

async fn scale(endpoint: &str, opts: &ScaleOpts) -> Result<()> {
    let channel = channel(endpoint).await?;
    let mut client = runtime_client(channel.clone());
    if let Some(image) = &opts.pause_image {
        ensure_image(&channel, image).await?;
    }
    ensure_image(&channel, &opts.image).await?;
    let mut levels = opts.levels.clone();
    levels.sort_unstable();
    let mut fillers: Vec<String> = Vec::new();
    for level in levels {
        while fillers.len() < level {
            let name = format!("scale-fill-{}", fillers.len());
            let (_, _, pod, _) = pod_and_container(&mut client, &name, opts, true).await?;
            fillers.push(pod);
        }
        eprintln!("{level} pods, each with a running container");
        let (mut run, mut create, mut list, mut status) = (vec![], vec![], vec![], vec![]);
        let mut probes: Vec<(String, String)> = Vec::new();
        let mut floor: Option<Floor> = None;
        let begin = humantime::format_rfc3339_micros(std::time::SystemTime::now());
        for i in 0..opts.probes {
            let name = format!("scale-probe-{level}-{i}");
            let (r, c, pod, ctr) = pod_and_container(&mut client, &name, opts, false).await?;
            run.push(r);
            create.push(c);
            probes.push((pod, ctr));
            // The floor's copy runs right after the probe, on the same node (its pod's
            // namespaces, as many mounts and processes); each starts on a settled node.
            if let Some(state) = &opts.runc_floor {
                if floor.is_none() {
                    let spec = state.join("containers").join(&probes[0].1);
                    let f = Floor::new(&opts.runc, &spec.join("config.json"))
                        .context("bare runc floor")?;
                    if f.lower.is_none() {
                        bail!("--runc-floor: the probe's rootfs is no overlay to copy");
                    }
                    floor = Some(f);
                }
                if let Some(f) = floor.as_mut() {
                    tokio::time::sleep(FLOOR_SETTLE).await;
                    f.once(true)
                        .context("bare runc floor with a rootfs mount")?;
                    tokio::time::sleep(FLOOR_SETTLE).await;
                }
            }
        }
        if let Some(f) = floor.take() {
            // What CreateContainer stands for: the rootfs mount and the runtime's create.
            let m = &f.mounted;
            let floor: Vec<f64> = m.mount.iter().zip(&m.create).map(|(a, b)| a + b).collect();
            let over: Vec<f64> = create.iter().zip(&floor).map(|(c, f)| c - f).collect();
            print_lat(&format!("floor@{level}"), "serial", &floor);
            print_lat(&format!("over@{level}"), "serial", &over);
        }
        // When the probes ran, for the daemon's step timings (hack/bench-scale.sh).
        println!(
            "window {level} {begin} {}",
            humantime::format_rfc3339_micros(std::time::SystemTime::now())
        );
        for (_, ctr) in &probes {
            let t = Instant::now();
            client
                .list_containers(cri::ListContainersRequest::default())
                .await
                .context("ListContainers")?;
            list.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            client
                .container_status(cri::ContainerStatusRequest {
                    container_id: ctr.clone(),
                    verbose: false,
                })
                .await
                .context("ContainerStatus")?;
            status.push(t.elapsed().as_secs_f64());
        }
        let mut remove = Vec::new();
        for (pod, _) in probes {
            remove.push(stop_remove_pod(&mut client, pod).await?);
        }
        print_lat(&format!("run@{level}"), "serial", &run);
        print_lat(&format!("create@{level}"), "serial", &create);
        print_lat(&format!("list@{level}"), "serial", &list);
        print_lat(&format!("status@{level}"), "serial", &status);
        print_lat(&format!("remove@{level}"), "serial", &remove);
        tokio::time::sleep(opts.settle).await;
        print_daemon_rss(opts.daemon_pid, &format!("{level}pods"));
    }
    for pod in fillers {
        stop_remove_pod(&mut client, pod).await?;
    }
    Ok(())
}

/// One bare-runtime lifecycle of the bundle `b`: the instants before create, after create,
/// after start, before kill, after the init was reaped, after delete.
fn floor_once(runc: &str, root: &str, b: &Path, name: &str, err: &Path) -> Result<[Instant; 6]> {
    let (bs, pid_file) = (b.display().to_string(), b.join("init.pid"));
    let pf = pid_file.display().to_string();
    let t0 = Instant::now();
    let create = [
        "--root",
        root,
        "create",
        "--bundle",
        &bs,
        "--pid-file",
        &pf,
        name,
    ];
    run_runc(runc, &create, err)?;
    let t1 = Instant::now();
    run_runc(runc, &["--root", root, "start", name], err)?;
    let t2 = Instant::now();
    let pid: i32 = std::fs::read_to_string(&pid_file)?.trim().parse()?;
    let t3 = Instant::now();
    run_runc(runc, &["--root", root, "kill", name, "9"], err)?;
    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
    let t4 = Instant::now();
    run_runc(runc, &["--root", root, "delete", "--force", name], err)?;
    Ok([t0, t1, t2, t3, t4, Instant::now()])
}

/// Stops and removes every container, then every pod sandbox; reports what it did.
async fn cleanup(endpoint: &str) -> Result<()> {
    let channel = channel(endpoint).await?;
    let mut client = runtime_client(channel);
    let mut failed = 0;
    let ctrs = client
        .list_containers(cri::ListContainersRequest { filter: None })
        .await
        .context("ListContainers")?
        .into_inner()
        .containers;
    for c in &ctrs {
        let stop = client
            .stop_container(cri::StopContainerRequest {
                container_id: c.id.clone(),
                timeout: 0,
            })
            .await;
        let rm = client
            .remove_container(cri::RemoveContainerRequest {
                container_id: c.id.clone(),
            })
            .await;
        if let Err(e) = stop.and(rm) {
            eprintln!("container {}: {}", c.id, e.message());
            failed += 1;
        }
    }
    let pods = client
        .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
        .await
        .context("ListPodSandbox")?
        .into_inner()
        .items;
    for p in &pods {
        if let Err(e) = stop_remove_pod(&mut client, p.id.clone()).await {
            eprintln!("pod {}: {e:#}", p.id);
            failed += 1;
        }
    }
    println!(
        "cleanup {} containers {} pods {failed} failed",
        ctrs.len(),
        pods.len()
    );
    if failed > 0 {
        bail!("{failed} removals failed");
    }
    Ok(())
}

// ----- streaming: a SPDY/3.1 client as client-go's -----

/// The read half of a SPDY/3.1 connection: frames out of the socket.
struct SpdyReader {
    rd: tokio::net::tcp::OwnedReadHalf,
    dec: HeaderDecoder,
    buf: Vec<u8>,
    /// Where the next undecoded byte of `buf` is.
    pos: usize,
}

/// The write half: frames into the socket.
struct SpdyWriter {
    wr: tokio::net::tcp::OwnedWriteHalf,
    enc: HeaderEncoder,
    out: Vec<u8>,
    next_id: u32,
}

impl SpdyReader {
    /// The next frame; `None` once the server closed the connection.
    async fn next(&mut self) -> Result<Option<Frame>> {
        use tokio::io::AsyncReadExt;
        loop {
            if let Some((f, used)) =
                spdy::decode(&self.buf[self.pos..], &mut self.dec).context("SPDY frame")?
            {
                self.pos += used;
                return Ok(Some(f));
            }
            // Keep only the partial frame, then read more behind it.
            self.buf.drain(..self.pos);
            self.pos = 0;
            let len = self.buf.len();
            self.buf.resize(len + 256 * 1024, 0);
            let n = self.rd.read(&mut self.buf[len..]).await;
            let n = match n {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => 0,
                Err(e) => return Err(e).context("read from the streaming server"),
            };
            self.buf.truncate(len + n);
            if n == 0 {
                return Ok(None);
            }
        }
    }
}

impl SpdyWriter {
    async fn send(&mut self, f: &Frame) -> Result<()> {
        use tokio::io::AsyncWriteExt;
        self.out.clear();
        spdy::encode(f, &mut self.enc, &mut self.out).context("encode SPDY frame")?;
        self.wr
            .write_all(&self.out)
            .await
            .context("write to the streaming server")
    }

    /// SYN_STREAM with `headers`; returns the stream id.
    async fn open(&mut self, headers: &[(&str, String)]) -> Result<u32> {
        let id = self.next_id;
        self.next_id += 2;
        self.send(&Frame::SynStream {
            stream_id: id,
            associated_to: 0,
            priority: 0,
            flags: 0,
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.clone()))
                .collect(),
        })
        .await?;
        Ok(id)
    }

    async fn data(&mut self, stream_id: u32, data: &[u8], flags: u8) -> Result<()> {
        self.send(&Frame::Data {
            stream_id,
            flags,
            data: data.to_vec(),
        })
        .await
    }
}

/// `http://host:port/path` → `(host:port, /path)`.
fn split_url(url: &str) -> Result<(&str, &str)> {
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("streaming URL {url:?} is not http://"))?;
    let slash = rest
        .find('/')
        .with_context(|| format!("streaming URL {url:?} has no path"))?;
    Ok(rest.split_at(slash))
}

/// HTTP/1.1 upgrade to SPDY/3.1 with `protocol` (as client-go's SPDY round tripper: POST,
/// `Connection: Upgrade`, `Upgrade: SPDY/3.1`, `X-Stream-Protocol-Version`), TCP_NODELAY as
/// Go sets it. Fails unless the server switches protocols and picks `protocol`.
async fn spdy_connect(url: &str, protocol: &str) -> Result<(SpdyReader, SpdyWriter)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (host, path) = split_url(url)?;
    let mut tcp = tokio::net::TcpStream::connect(host)
        .await
        .with_context(|| format!("connect to {host}"))?;
    tcp.set_nodelay(true)?;
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: cri_bench\r\nContent-Length: 0\r\n\
         Connection: Upgrade\r\nUpgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: {protocol}\r\n\r\n"
    );
    tcp.write_all(req.as_bytes())
        .await
        .context("send upgrade")?;
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 64 * 1024 {
            bail!("response head of {url} longer than 64 KiB");
        }
        let n = tcp
            .read(&mut chunk)
            .await
            .context("read upgrade response")?;
        if n == 0 {
            bail!("{url}: connection closed before the response head");
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_string();
    let code = head.split_whitespace().nth(1).unwrap_or("");
    if code != "101" {
        bail!("{url}: no upgrade: {}", head.lines().next().unwrap_or(""));
    }
    let agreed = head.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("x-stream-protocol-version")
            .then(|| value.trim().to_string())
    });
    if agreed.as_deref() != Some(protocol) {
        bail!("{url}: server agreed to protocol {agreed:?}, not {protocol}");
    }
    // Bytes after the head are already SPDY frames.
    buf.drain(..end);
    let (rd, wr) = tcp.into_split();
    Ok((
        SpdyReader {
            rd,
            dec: HeaderDecoder::new(),
            buf,
            pos: 0,
        },
        SpdyWriter {
            wr,
            enc: HeaderEncoder::new().context("SPDY header encoder")?,
            out: Vec::new(),
            next_id: 1,
        },
    ))
}

/// What happened to the streams of one exchange.
#[derive(Default)]
struct Streams {
    /// Bytes received per stream id.
    data: std::collections::HashMap<u32, Vec<u8>>,
    /// Streams the server ended (FIN or RST_STREAM).
    ended: std::collections::HashSet<u32>,
    /// Streams the server answered with SYN_REPLY.
    replied: std::collections::HashSet<u32>,
    /// GOAWAY received or the connection closed: every stream has ended.
    gone: bool,
}

impl Streams {
    fn done(&self, id: u32) -> bool {
        self.gone || self.ended.contains(&id)
    }
}

/// Reads one frame into `st`, answering PINGs. `Ok(false)` once the connection is closed.
async fn pump(rd: &mut SpdyReader, wr: &mut SpdyWriter, st: &mut Streams) -> Result<bool> {
    let Some(f) = rd.next().await? else {
        st.gone = true;
        return Ok(false);
    };
    match f {
        Frame::SynReply { stream_id, .. } => {
            st.replied.insert(stream_id);
        }
        Frame::Data {
            stream_id,
            flags,
            data,
        } => {
            st.data
                .entry(stream_id)
                .or_default()
                .extend_from_slice(&data);
            if flags & FLAG_FIN != 0 {
                st.ended.insert(stream_id);
            }
        }
        Frame::RstStream { stream_id, .. } => {
            st.ended.insert(stream_id);
        }
        Frame::GoAway { .. } => st.gone = true,
        Frame::Ping { id } => wr.send(&Frame::Ping { id }).await?,
        _ => {}
    }
    Ok(true)
}

/// Opens a stream and waits for its SYN_REPLY, as client-go's `CreateStream` does.
async fn create_stream(
    rd: &mut SpdyReader,
    wr: &mut SpdyWriter,
    st: &mut Streams,
    headers: &[(&str, String)],
) -> Result<u32> {
    let id = wr.open(headers).await?;
    while !st.replied.contains(&id) {
        if st.gone || st.ended.contains(&id) || !pump(rd, wr, st).await? {
            bail!("stream {headers:?} refused or connection closed before its reply");
        }
    }
    Ok(id)
}

struct ExecOpts {
    image: String,
    pause_image: Option<String>,
    count: usize,
    warmup: usize,
    command: Vec<String>,
}

/// One exec of `url` as client-go's v4 SPDY executor without stdin: error, stdout and stderr
/// streams (each waiting for its reply), then everything to the end of all three. Returns the
/// exit status as the error stream says it (`metav1.Status` JSON; empty is success).
async fn spdy_exec(url: &str) -> Result<(Vec<u8>, String)> {
    let (mut rd, mut wr) = spdy_connect(url, "v4.channel.k8s.io").await?;
    let mut st = Streams::default();
    let stream = |t: &str| [("streamType", t.to_string())];
    let error = create_stream(&mut rd, &mut wr, &mut st, &stream("error")).await?;
    let stdout = create_stream(&mut rd, &mut wr, &mut st, &stream("stdout")).await?;
    let stderr = create_stream(&mut rd, &mut wr, &mut st, &stream("stderr")).await?;
    while ![error, stdout, stderr].iter().all(|s| st.done(*s)) {
        if !pump(&mut rd, &mut wr, &mut st).await? {
            break;
        }
    }
    let status = String::from_utf8_lossy(st.data.get(&error).map_or(&[][..], |v| v)).to_string();
    let out = st.data.remove(&stdout).unwrap_or_default();
    Ok((out, status))
}

/// Whether a v4 error-stream status says success (an empty one does too).
fn exec_succeeded(status: &str) -> bool {
    if status.trim().is_empty() {
        return true;
    }
    serde_json::from_str::<serde_json::Value>(status)
        .map(|v| v["status"] == "Success")
        .unwrap_or(false)
}

/// A pod with one running container of `image` running `command`; returns (pod, container).
async fn pod_with_container(
    client: &mut RuntimeServiceClient<Channel>,
    pod_name: &str,
    image: &str,
    containers: &[(&str, Vec<String>)],
) -> Result<(String, Vec<String>)> {
    let pod_cfg = pod_config(pod_name, cri::NamespaceMode::Container, "");
    let pod_id = client
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(pod_cfg.clone()),
            runtime_handler: String::new(),
        })
        .await
        .context("RunPodSandbox")?
        .into_inner()
        .pod_sandbox_id;
    let mut ids = Vec::new();
    for (name, command) in containers {
        let id = create_start(client, &pod_id, &pod_cfg, name, image, command).await?;
        ids.push(id);
    }
    Ok((pod_id, ids))
}

async fn create_start(
    client: &mut RuntimeServiceClient<Channel>,
    pod_id: &str,
    pod_cfg: &cri::PodSandboxConfig,
    name: &str,
    image: &str,
    command: &[String],
) -> Result<String> {
    let config = cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: name.to_string(),
            attempt: 0,
        }),
        image: spec(image),
        command: command.to_vec(),
        linux: Some(cri::LinuxContainerConfig::default()),
        ..Default::default()
    };
    let id = client
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod_id.to_string(),
            config: Some(config),
            sandbox_config: Some(pod_cfg.clone()),
        })
        .await
        .with_context(|| format!("CreateContainer {name}"))?
        .into_inner()
        .container_id;
    client
        .start_container(cri::StartContainerRequest {
            container_id: id.clone(),
        })
        .await
        .with_context(|| format!("StartContainer {name} ({id})"))?;
    Ok(id)
}

async fn exec_bench(endpoint: &str, opts: &ExecOpts) -> Result<()> {
    let channel = channel(endpoint).await?;
    let mut client = runtime_client(channel.clone());
    if let Some(image) = &opts.pause_image {
        ensure_image(&channel, image).await?;
    }
    ensure_image(&channel, &opts.image).await?;
    let sleep = vec!["sleep".to_string(), "3600".to_string()];
    let (pod_id, ids) =
        pod_with_container(&mut client, "bench-exec", &opts.image, &[("box", sleep)]).await?;
    let id = ids.first().context("no container")?.clone();
    let (mut rpc, mut stream, mut total) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..opts.warmup + opts.count {
        let t0 = Instant::now();
        let url = client
            .exec(cri::ExecRequest {
                container_id: id.clone(),
                cmd: opts.command.clone(),
                tty: false,
                stdin: false,
                stdout: true,
                stderr: true,
            })
            .await
            .context("Exec")?
            .into_inner()
            .url;
        let t1 = Instant::now();
        let (_, status) = spdy_exec(&url)
            .await
            .with_context(|| format!("exec {i} through {url}"))?;
        let t2 = Instant::now();
        if !exec_succeeded(&status) {
            bail!("exec {i} of {:?} failed: {status}", opts.command);
        }
        if i >= opts.warmup {
            rpc.push((t1 - t0).as_secs_f64());
            stream.push((t2 - t1).as_secs_f64());
            total.push((t2 - t0).as_secs_f64());
        }
    }
    print_lat("exec_rpc", "serial", &rpc);
    print_lat("exec_stream", "serial", &stream);
    print_lat("exec_total", "serial", &total);
    let mut sync = Vec::new();
    for i in 0..opts.warmup + opts.count {
        let t0 = Instant::now();
        let r = client
            .exec_sync(cri::ExecSyncRequest {
                container_id: id.clone(),
                cmd: opts.command.clone(),
                timeout: 10,
            })
            .await
            .context("ExecSync")?
            .into_inner();
        if r.exit_code != 0 {
            bail!(
                "ExecSync {i} of {:?}: exit code {}",
                opts.command,
                r.exit_code
            );
        }
        if i >= opts.warmup {
            sync.push(t0.elapsed().as_secs_f64());
        }
    }
    print_lat("exec_sync", "serial", &sync);
    stop_remove_pod(&mut client, pod_id).await?;
    Ok(())
}

struct PortForwardOpts {
    image: String,
    pause_image: Option<String>,
    bytes: usize,
    repeat: usize,
}

const PF_ECHO: u16 = 7000;
const PF_SINK: u16 = 7001;
const PF_SOURCE: u16 = 7002;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// Client → pod: `bytes` to a sink (`dd`) that answers `ok` once it has read them all.
    Up,
    /// Pod → client: `bytes` of zeros (`dd` of /dev/zero).
    Down,
    /// Both at once: `bytes` through `cat` and back, checked.
    Echo,
}

impl Direction {
    fn name(self) -> &'static str {
        match self {
            Direction::Up => "up",
            Direction::Down => "down",
            Direction::Echo => "echo",
        }
    }
    fn port(self) -> u16 {
        match self {
            Direction::Up => PF_SINK,
            Direction::Down => PF_SOURCE,
            Direction::Echo => PF_ECHO,
        }
    }
}

/// One transfer through the port-forward behind `url`, as client-go's port forwarder opens
/// it (error stream, closed for writing at once, then the data stream, each after its reply).
/// Seconds from the data stream's reply to the last expected byte; `Ok(None)` when the error
/// stream reported a failure before any data moved (the server in the pod not listening yet).
async fn pf_transfer(url: &str, dir: Direction, payload: &Arc<Vec<u8>>) -> Result<Option<f64>> {
    let (mut rd, mut wr) = spdy_connect(url, "portforward.k8s.io").await?;
    let mut st = Streams::default();
    let headers = |t: &str| {
        [
            ("streamType", t.to_string()),
            ("port", dir.port().to_string()),
            ("requestID", "0".to_string()),
        ]
    };
    let error = create_stream(&mut rd, &mut wr, &mut st, &headers("error")).await?;
    wr.data(error, &[], FLAG_FIN).await?;
    let data = create_stream(&mut rd, &mut wr, &mut st, &headers("data")).await?;
    let start = Instant::now();
    // The writer half goes to its own task (up and echo send while receiving); PINGs are not
    // answered meanwhile (neither server sends any).
    let writer = if dir == Direction::Down {
        None
    } else {
        let payload = payload.clone();
        Some(tokio::spawn(async move {
            for chunk in payload.chunks(32 * 1024) {
                wr.data(data, chunk, 0).await?;
            }
            Ok::<_, anyhow::Error>(wr)
        }))
    };
    let want = match dir {
        Direction::Up => 3, // "ok\n"
        Direction::Down | Direction::Echo => payload.len(),
    };
    let mut got = 0usize;
    let result = loop {
        let Some(f) = rd.next().await? else {
            break Err(anyhow::anyhow!(
                "connection closed after {got} of {want} bytes"
            ));
        };
        match f {
            Frame::Data {
                stream_id,
                data: d,
                flags,
            } if stream_id == data => {
                let check = match dir {
                    Direction::Echo => payload.get(got..got + d.len()) == Some(&d[..]),
                    Direction::Down => d.iter().all(|b| *b == 0),
                    Direction::Up => true,
                };
                if !check {
                    break Err(anyhow::anyhow!("bytes {got}.. came back changed"));
                }
                got += d.len();
                if dir == Direction::Up && got >= want {
                    let answer = &d[d.len().saturating_sub(3)..];
                    if answer != b"ok\n" {
                        break Err(anyhow::anyhow!("the sink answered {answer:?}"));
                    }
                }
                if got >= want {
                    break Ok(Some(start.elapsed().as_secs_f64()));
                }
                if flags & FLAG_FIN != 0 {
                    break Err(anyhow::anyhow!("data stream ended after {got} of {want}"));
                }
            }
            Frame::Data {
                stream_id, data: d, ..
            } if stream_id == error && !d.is_empty() => {
                let msg = String::from_utf8_lossy(&d).to_string();
                if got == 0 {
                    eprintln!("port {}: {msg}", dir.port());
                    break Ok(None);
                }
                break Err(anyhow::anyhow!("error stream: {msg}"));
            }
            Frame::RstStream { stream_id, status } if stream_id == data => {
                break Err(anyhow::anyhow!(
                    "data stream reset ({status}) after {got} of {want} bytes"
                ));
            }
            Frame::GoAway { .. } => {
                break Err(anyhow::anyhow!("GOAWAY after {got} of {want} bytes"));
            }
            _ => {}
        }
    };
    if let Some(w) = writer {
        if result.as_ref().is_ok_and(|r| r.is_some()) {
            w.await.context("writer task")??;
        } else {
            w.abort();
        }
    }
    result
}

async fn port_forward_bench(endpoint: &str, opts: &PortForwardOpts) -> Result<()> {
    let channel = channel(endpoint).await?;
    let mut client = runtime_client(channel.clone());
    if let Some(image) = &opts.pause_image {
        ensure_image(&channel, image).await?;
    }
    ensure_image(&channel, &opts.image).await?;
    let nc = |port: u16, prog: &[&str]| -> Vec<String> {
        let port = port.to_string();
        ["nc", "-ll", "-p", &port, "-e"]
            .iter()
            .chain(prog)
            .map(|s| s.to_string())
            .collect()
    };
    let n = opts.bytes;
    // dd moves 1 MiB per system call; `count_bytes` + `fullblock`: exactly n bytes.
    let sink = format!(
        "dd of=/dev/null bs=1048576 count={n} iflag=count_bytes,fullblock status=none; echo ok"
    );
    let count = format!("count={n}");
    let source = [
        "dd",
        "if=/dev/zero",
        "bs=1048576",
        &count,
        "iflag=count_bytes",
        "status=none",
    ];
    let servers = [
        ("echo", nc(PF_ECHO, &["cat"])),
        ("sink", nc(PF_SINK, &["sh", "-c", &sink])),
        ("source", nc(PF_SOURCE, &source)),
    ];
    let (pod_id, _) =
        pod_with_container(&mut client, "bench-portforward", &opts.image, &servers).await?;
    // Incompressible-looking bytes, the same every run.
    let payload: Arc<Vec<u8>> = Arc::new(
        (0..n as u64)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
            .collect(),
    );
    for dir in [Direction::Up, Direction::Down, Direction::Echo] {
        let mut run = 0;
        let mut tries = 0;
        while run < opts.repeat {
            let url = client
                .port_forward(cri::PortForwardRequest {
                    pod_sandbox_id: pod_id.clone(),
                    port: vec![i32::from(dir.port())],
                })
                .await
                .context("PortForward")?
                .into_inner()
                .url;
            match pf_transfer(&url, dir, &payload)
                .await
                .with_context(|| format!("port-forward {} run {run}", dir.name()))?
            {
                Some(secs) => {
                    run += 1;
                    println!("tput {} {run} {n} {secs:.4}", dir.name());
                    eprintln!("{} {run}: {:.1} MB/s", dir.name(), n as f64 / 1e6 / secs);
                }
                None if tries < 20 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                None => bail!("port {} never accepted a connection", dir.port()),
            }
        }
    }
    stop_remove_pod(&mut client, pod_id).await?;
    Ok(())
}

// ----- stats -----

struct StatsOpts {
    image: String,
    pause_image: Option<String>,
    pods: usize,
    containers: usize,
    command: Vec<String>,
    parallel: usize,
    calls: usize,
    interval: Duration,
    metrics_url: Option<String>,
    daemon_pid: Option<u32>,
    helpers_cmdline: Vec<String>,
    cgroup_parent: String,
}

/// CPU time (user + system) in milliseconds of the daemon and the helper processes.
fn cpu_ms(opts: &StatsOpts) -> f64 {
    runtime_cpu_ms(opts.daemon_pid, &opts.helpers_cmdline)
}

/// CPU time (user + system) in milliseconds of a daemon and its helpers (those alive now).
fn runtime_cpu_ms(daemon_pid: Option<u32>, helpers_cmdline: &[String]) -> f64 {
    let procs = list_procs();
    let mut pids = helper_tree(&procs, helpers_cmdline, daemon_pid);
    pids.extend(daemon_pid);
    // SAFETY: sysconf has no memory safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mut ticks = 0u64;
    for pid in pids {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        // after "pid (comm)": state ppid … utime is field 14, stime 15 (1-based)
        let f: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        for i in [11, 12] {
            ticks += f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    ticks as f64 * 1000.0 / hz
}

/// One GET of `url` over HTTP/1.1 (`Connection: close`): (status, body without chunking).
async fn http_get(url: &str) -> Result<(u16, Vec<u8>)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (host, path) = split_url(url)?;
    let mut tcp = tokio::net::TcpStream::connect(host)
        .await
        .with_context(|| format!("connect to {host}"))?;
    tcp.set_nodelay(true)?;
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: cri_bench\r\nAccept: text/plain\r\n\
         Connection: close\r\n\r\n"
    );
    tcp.write_all(req.as_bytes()).await?;
    let mut resp = Vec::new();
    tcp.read_to_end(&mut resp).await.context("read response")?;
    let end = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no end of the response head")?
        + 4;
    let head = String::from_utf8_lossy(&resp[..end]).to_ascii_lowercase();
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no status code")?;
    let mut body = resp.split_off(end);
    if head.contains("transfer-encoding: chunked") {
        let mut out = Vec::with_capacity(body.len());
        let mut at = 0;
        loop {
            let line_end = body[at..]
                .windows(2)
                .position(|w| w == b"\r\n")
                .context("bad chunk")?;
            let size = std::str::from_utf8(&body[at..at + line_end])?;
            let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
                .context("bad chunk size")?;
            at += line_end + 2;
            if size == 0 {
                break;
            }
            out.extend_from_slice(body.get(at..at + size).context("short chunk")?);
            at += size + 2;
        }
        body = out;
    }
    Ok((code, body))
}

/// Times `calls` runs of `f`, `interval` apart; prints `lat` and `cpu <op> <n> <ms/call>`.
async fn time_calls<F, Fut>(op: &str, opts: &StatsOpts, mut f: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    // Two untimed first: rates need a previous sample, caches warm up.
    for _ in 0..2 {
        f().await?;
        tokio::time::sleep(opts.interval).await;
    }
    let mut secs = Vec::new();
    let mut cpu = 0.0;
    for _ in 0..opts.calls {
        let c0 = cpu_ms(opts);
        let t0 = Instant::now();
        f().await?;
        secs.push(t0.elapsed().as_secs_f64());
        cpu += cpu_ms(opts) - c0;
        tokio::time::sleep(opts.interval).await;
    }
    print_lat(op, "serial", &secs);
    println!(
        "cpu {op} {} {:.2}",
        secs.len(),
        cpu / secs.len().max(1) as f64
    );
    Ok(())
}

async fn stats_bench(endpoint: &str, opts: &StatsOpts) -> Result<()> {
    let channel = channel(endpoint).await?;
    let mut client = runtime_client(channel.clone());
    if let Some(image) = &opts.pause_image {
        ensure_image(&channel, image).await?;
    }
    ensure_image(&channel, &opts.image).await?;
    let start = Instant::now();
    let mut pods = Vec::new();
    for p in 0..opts.pods {
        let mut cfg = pod_config(
            &format!("bench-stats-{p}"),
            cri::NamespaceMode::Container,
            "",
        );
        if !opts.cgroup_parent.is_empty()
            && let Some(linux) = cfg.linux.as_mut()
        {
            linux.cgroup_parent = format!("{}/pod{p}", opts.cgroup_parent);
        }
        let id = client
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(cfg.clone()),
                runtime_handler: String::new(),
            })
            .await
            .with_context(|| format!("RunPodSandbox bench-stats-{p}"))?
            .into_inner()
            .pod_sandbox_id;
        pods.push((id, cfg));
    }
    let work: Vec<(usize, String, cri::PodSandboxConfig)> = (0..opts.containers)
        .map(|i| {
            let (id, cfg) = &pods[i % pods.len()];
            (i, id.clone(), cfg.clone())
        })
        .collect();
    let (ch, image, command) = (channel.clone(), opts.image.clone(), opts.command.clone());
    let ids =
        fan_out(work, opts.parallel, move |(i, pod, cfg)| {
            let mut client = runtime_client(ch.clone());
            let (image, command) = (image.clone(), command.clone());
            async move {
                create_start(&mut client, &pod, &cfg, &format!("c{i}"), &image, &command).await
            }
        })
        .await?;
    println!(
        "wall setup serial {} {:.3}",
        ids.len(),
        start.elapsed().as_secs_f64()
    );
    eprintln!(
        "{} pods, {} containers running after {:.1}s",
        pods.len(),
        ids.len(),
        start.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;

    let want = ids.len();
    let list = client.clone();
    time_calls("list_container_stats", opts, || {
        let mut client = list.clone();
        async move {
            let stats = client
                .list_container_stats(cri::ListContainerStatsRequest { filter: None })
                .await
                .context("ListContainerStats")?
                .into_inner()
                .stats;
            let with_cpu = stats
                .iter()
                .filter(|s| {
                    s.cpu
                        .as_ref()
                        .is_some_and(|c| c.usage_core_nano_seconds.is_some())
                })
                .count();
            if stats.len() != want || with_cpu != want {
                bail!(
                    "ListContainerStats: {} stats, {with_cpu} with CPU, for {want} containers",
                    stats.len()
                );
            }
            Ok(())
        }
    })
    .await?;
    let list = client.clone();
    let want_pods = pods.len();
    time_calls("list_pod_sandbox_stats", opts, || {
        let mut client = list.clone();
        async move {
            let stats = client
                .list_pod_sandbox_stats(cri::ListPodSandboxStatsRequest { filter: None })
                .await
                .context("ListPodSandboxStats")?
                .into_inner()
                .stats;
            if stats.len() != want_pods {
                bail!(
                    "ListPodSandboxStats: {} stats for {want_pods} pods",
                    stats.len()
                );
            }
            Ok(())
        }
    })
    .await?;
    if let Some(url) = &opts.metrics_url {
        let (code, body) = http_get(url).await?;
        let text = String::from_utf8_lossy(&body);
        let samples = text.lines().filter(|l| !l.starts_with('#')).count();
        let per_container = text
            .lines()
            .filter(|l| l.starts_with("berth_container_memory_working_set_bytes{"))
            .count();
        println!("scrape {code} {} {samples} {per_container}", body.len());
        if code != 200 || per_container < want {
            bail!("{url}: status {code}, {per_container} containers with a working set");
        }
        time_calls("metrics_scrape", opts, || async {
            let (code, _) = http_get(url).await?;
            if code != 200 {
                bail!("{url}: status {code}");
            }
            Ok(())
        })
        .await?;
    }

    let start = Instant::now();
    let ch = channel.clone();
    fan_out(ids, opts.parallel, move |id| {
        let mut client = runtime_client(ch.clone());
        async move {
            client
                .stop_container(cri::StopContainerRequest {
                    container_id: id.clone(),
                    timeout: 0,
                })
                .await
                .with_context(|| format!("StopContainer {id}"))?;
            client
                .remove_container(cri::RemoveContainerRequest {
                    container_id: id.clone(),
                })
                .await
                .with_context(|| format!("RemoveContainer {id}"))?;
            Ok(())
        }
    })
    .await?;
    for (id, _) in pods {
        stop_remove_pod(&mut client, id).await?;
    }
    eprintln!("removed in {:.1}s", start.elapsed().as_secs_f64());
    Ok(())
}
