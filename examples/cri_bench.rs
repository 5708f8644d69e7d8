//! A small CRI benchmark client, driven by `hack/bench-pull.sh`, `hack/bench-pods.sh` and
//! `hack/bench-containers.sh`.
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
//! cri_bench cleanup --endpoint unix:///run/berth/berth.sock
//! ```
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
        } => {
            let opts = ContainersOpts {
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
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no {name} in /proc/{pid}/status"))
    };
    Ok((field("VmHWM:")?, field("VmRSS:")?))
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
    let field = |text: &str, name: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = field(&status, "VmRSS:")?;
    let pss = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|s| field(&s, "Pss:"))
        .unwrap_or(0);
    Some((rss, pss))
}

/// Sums memory over `pids`; prints `rss <what> <when> <procs> <rss_kib> <pss_kib> <comms>`.
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
    for (mode, parallel) in [("serial", 1), ("parallel", opts.parallel)] {
        let start = Instant::now();
        let made = run_pods(&channel, &format!("bench-{mode}"), opts, parallel).await?;
        let wall = start.elapsed().as_secs_f64();
        let secs: Vec<f64> = made.iter().map(|(_, s)| *s).collect();
        print_lat("run", mode, &secs);
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
    // Wall time of the create+start phase, without the pauses for memory readings.
    let mut paused = Duration::ZERO;
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
