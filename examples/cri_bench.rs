//! A small CRI benchmark client, driven by `hack/bench-pull.sh`.
//!
//! ```text
//! cri_bench push-image --registry 127.0.0.1:5000 --repo bench/big --tag v1 --layers 5 --total-mb 100
//! cri_bench pull --endpoint unix:///run/berth/berth.sock --image 127.0.0.1:5000/bench/big:v1 \
//!     --repeat 3 --remove-between --wait-empty /var/lib/berth/content/blobs/sha256
//! cri_bench rss --pid 1234
//! ```
//!
//! `push-image` builds an image of random (incompressible) data, gzip layers, an OCI manifest,
//! and pushes it over plain HTTP; it prints `bytes <layer+config bytes>` and `digest <manifest>`.
//! `pull` prints one `pull <n> <seconds> <bytes in the --wait-empty dirs after it>` line per
//! PullImage.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use flate2::write::GzEncoder;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::{ImageSpec, ImageStatusRequest, PullImageRequest, RemoveImageRequest};
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
    Ok(ImageServiceClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20))
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
