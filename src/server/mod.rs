//! The gRPC server: opens berth's state, binds the CRI unix socket and serves the
//! RuntimeService and ImageService until asked to stop. Each RPC is thin (see the service
//! files); errors become statuses in [`error`] only. Every accepted connection goes
//! through [`authority`] so that clients sending their socket path as `:authority` are
//! served.

pub mod authority;
pub mod container;
pub mod error;
pub mod events;
pub mod image_service;
pub mod list_stream;
pub mod pod_sandbox;
pub mod reload;
pub mod runtime_service;
pub mod stats;
pub mod trace;

use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;

use crate::cri::v1::image_service_server::ImageServiceServer;
use crate::cri::v1::runtime_service_server::RuntimeServiceServer;
use tokio::net::UnixListener;

use crate::config::Config;
use crate::container::manager::ContainerManager;
use crate::events::EventHub;
use crate::image::{ImageError, ImageManager};
use crate::sandbox::SandboxManager;
use crate::stats::fs::FsUsage;
use crate::store::{Store, StoreError};
use crate::stream::Streamer;

/// Why the daemon could not start or serve.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("socket {0} is served by a running daemon; stop it first")]
    SocketInUse(PathBuf),
    #[error("opening the store: {0}")]
    Store(#[from] StoreError),
    #[error("opening the image store: {0}")]
    Image(#[from] ImageError),
    #[error("setting up pod networking: {0}")]
    Network(#[from] crate::network::NetworkError),
    #[error("loading pod sandboxes: {0}")]
    Sandbox(#[from] crate::sandbox::SandboxError),
    #[error("metrics endpoint: {0}")]
    Metrics(#[from] crate::metrics::MetricsError),
    #[error("loading containers: {0}")]
    Container(#[from] crate::container::manager::ContainerError),
    #[error("starting NRI: {0}")]
    Nri(#[from] crate::nri::NriError),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ServerError + '_ {
    move |source| ServerError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Creates `dir` (and its parents) if missing and makes it `0700`.
fn private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Whether `labels` has every key and value of a List filter's `label_selector`.
pub fn labels_match(
    selector: &std::collections::HashMap<String, String>,
    labels: &std::collections::HashMap<String, String>,
) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The largest CRI message accepted (a big ListContainers answer or a pod config).
const MAX_MESSAGE: usize = 16 << 20;
/// How often recorded exits are looked for (their stopped events go out within this).
const EXIT_WATCH_PERIOD: Duration = Duration::from_millis(250);
/// How long a stopping daemon waits for in-flight RPCs.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// A daemon whose state is open and whose socket is bound, ready to serve.
pub struct Daemon {
    config: Config,
    listener: UnixListener,
    images: Arc<ImageManager>,
    sandboxes: Arc<SandboxManager>,
    containers: Arc<ContainerManager>,
    /// Flushed at a clean stop (see [`Store::flush`]).
    store: Arc<Store>,
    events: Arc<EventHub>,
    fs: Arc<FsUsage>,
    metrics: Option<crate::metrics::MetricsServer>,
    streamer: Arc<Streamer>,
    stream_listener: tokio::net::TcpListener,
    /// The config file re-read on SIGHUP (see [`reload`]), and how to change the log filter.
    config_file: Option<(std::path::PathBuf, Option<reload::LogFilterSetter>)>,
}

impl Daemon {
    /// Opens the store and image state (repairing what a crash left) and binds the socket.
    pub async fn start(config: Config) -> Result<Daemon, ServerError> {
        for dir in [&config.root, &config.state] {
            std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        }
        std::fs::set_permissions(&config.root, std::fs::Permissions::from_mode(0o711))
            .map_err(io_err(&config.root))?;
        // What images bring (setuid binaries, device nodes, anything an image says) lies in
        // the snapshots, the containers' writable layers and their mounted rootfs under the
        // bundles: only root may reach it, or a host user could run an image's setuid-root
        // shell or open its block device node through these paths (as containerd's and
        // Docker's 0700 snapshotter and bundle dirs prevent).
        for dir in [
            config.root.join("snapshots"),
            config.root.join("containers"),
            config.state.join("containers"),
        ] {
            private_dir(&dir).map_err(io_err(&dir))?;
        }
        refuse_live_socket(&config.socket).await?;
        let store = Arc::new(Store::open(&config.root.join("berth.redb"))?);
        tokio::spawn(Store::flush_volatile(
            Arc::downgrade(&store),
            crate::store::VOLATILE_FLUSH_DELAY,
        ));
        let images = {
            let cfg = config.clone();
            let store = store.clone();
            tokio::task::spawn_blocking(move || ImageManager::open(&cfg, store))
                .await
                .map_err(|e| ServerError::Io {
                    path: config.root.clone(),
                    source: std::io::Error::other(e.to_string()),
                })??
        };
        let events = Arc::new(EventHub::with_capacity(config.events.subscriber_buffer));
        let nri = crate::nri::Nri::new(config.nri.clone());
        let network = crate::network::from_config(&config, store.clone()).await?;
        // After the network backend's own setup (native turns forwarding on): logs once
        // what the node still lacks; `Status` reports it.
        crate::node_check::check_at_start(config.network.mode);
        let sandboxes = Arc::new(
            SandboxManager::open(
                store.clone(),
                network,
                &config.state,
                events.clone(),
                nri.clone(),
            )
            .await?,
        );
        let images = Arc::new(images);
        let containers = Arc::new(
            ContainerManager::open(
                config.clone(),
                store.clone(),
                images.clone(),
                sandboxes.clone(),
                events.clone(),
            )
            .await?,
        );
        events.set_sources(&sandboxes, &containers);
        {
            let host: std::sync::Arc<dyn crate::nri::Host> = containers.clone();
            nri.set_host(Arc::downgrade(&host));
        }
        events.ready();
        // Disk usage of images and writable layers: sampled once now (so ImageFsInfo never
        // answers an empty cache), then in the background.
        let fs = Arc::new(FsUsage::new(&config.root));
        images.notify_on_collect(fs.nudger());
        {
            let fs = fs.clone();
            let t = std::time::Instant::now();
            tokio::task::spawn_blocking(move || fs.refresh())
                .await
                .map_err(|e| ServerError::Io {
                    path: config.root.clone(),
                    source: std::io::Error::other(e.to_string()),
                })?;
            tracing::debug!(
                ms = t.elapsed().as_secs_f64() * 1000.0,
                "filesystem usage sampled"
            );
        }
        tokio::spawn(FsUsage::run(
            Arc::downgrade(&fs),
            config.stats.fs_refresh_interval,
        ));
        tokio::spawn(ContainerManager::watch_exits(
            Arc::downgrade(&containers),
            EXIT_WATCH_PERIOD,
        ));
        let metrics = crate::metrics::MetricsServer::bind(&config.metrics.address).await?;
        let stream_addr = config.streaming.address.clone();
        let stream_listener = tokio::net::TcpListener::bind(&stream_addr)
            .await
            .map_err(io_err(Path::new(&stream_addr)))?;
        let bound = stream_listener
            .local_addr()
            .map_err(io_err(Path::new(&stream_addr)))?;
        let streamer = Arc::new(Streamer::new(bound, containers.clone(), sandboxes.clone()));
        // Plugins are synchronized with the state loaded above.
        nri.start().await?;
        // Bound last: a client that can connect finds a daemon whose state is ready.
        let listener = bind_socket(&config.socket).await?;
        Ok(Daemon {
            config,
            listener,
            images,
            sandboxes,
            containers,
            store,
            events,
            fs,
            metrics,
            streamer,
            stream_listener,
            config_file: None,
        })
    }

    /// Re-reads `path` on SIGHUP while serving and applies what can change live; `log`
    /// changes the log filter (`None`: `[log] level` changes need a restart).
    pub fn reload_on_sighup(
        &mut self,
        path: std::path::PathBuf,
        log: Option<reload::LogFilterSetter>,
    ) {
        self.config_file = Some((path, log));
    }

    /// Serves until `shutdown` completes, then stops accepting, lets in-flight RPCs finish
    /// (up to [`DRAIN_TIMEOUT`]) and removes the socket.
    ///
    /// Connections are served with hyper directly rather than tonic's `Server`, whose
    /// `grpc-timeout` handling answers `Cancelled`; berth answers `DeadlineExceeded` like
    /// containerd and CRI-O (see [`trace::rpc`]).
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
        let socket = self.config.socket.clone();
        let metrics_task = self.metrics.map(|m| {
            let sources = Arc::new(crate::metrics::Sources::new(
                self.sandboxes.clone(),
                self.containers.clone(),
                crate::cgroups::detect(),
            ));
            tokio::spawn(m.serve(sources))
        });
        let runtime = runtime_service::RuntimeServiceImpl::new(
            self.config.clone(),
            self.sandboxes.clone(),
            self.containers.clone(),
            self.events.clone(),
            self.streamer.clone(),
            self.fs.clone(),
        );
        let streaming = tokio::spawn(crate::stream::http::serve(
            self.stream_listener,
            self.streamer.clone(),
        ));
        tracing::info!(address = %self.streamer.addr(), "serving streams");
        let reload_task = self.config_file.clone().map(|(path, log)| {
            tokio::spawn(reload::on_sighup(
                path,
                self.config.clone(),
                self.images.clone(),
                log,
            ))
        });
        let image = image_service::ImageServiceImpl::new(
            self.images.clone(),
            self.config.runtimes.keys().cloned().collect(),
            self.fs.clone(),
        );
        let routes = tonic::service::Routes::new(
            RuntimeServiceServer::new(runtime).max_decoding_message_size(MAX_MESSAGE),
        )
        .add_service(ImageServiceServer::new(image).max_decoding_message_size(MAX_MESSAGE));
        // Keep the default SETTINGS_HEADER_TABLE_SIZE: [`authority::AuthorityFix`] decodes
        // the clients' header blocks with the table size that implies.
        let http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        let graceful = GracefulShutdown::new();
        tracing::info!(socket = %socket.display(), root = %self.config.root.display(), "serving CRI");
        tokio::pin!(shutdown);
        // State is repaired and the socket is bound: clients are served from here on.
        crate::notify::notify("READY=1");
        loop {
            tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let service = TowerToHyperService::new(routes.clone());
                        let io = TokioIo::new(authority::AuthorityFix::new(stream));
                        let conn = http2.serve_connection(io, service);
                        let conn = graceful.watch(conn);
                        tokio::spawn(async move {
                            if let Err(e) = conn.await {
                                tracing::debug!(error = %e, "connection ended with an error");
                            }
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                () = &mut shutdown => break,
            }
        }
        crate::notify::notify("STOPPING=1");
        drop(self.listener);
        streaming.abort();
        let _ = std::fs::remove_file(&socket);
        // Finish in-flight RPCs; idle client connections are not waited for beyond that.
        let drained = async {
            trace::all_rpcs_done().await;
            // Let the last answers reach their clients.
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        tokio::select! {
            () = graceful.shutdown() => {}
            () = drained => {}
            () = tokio::time::sleep(DRAIN_TIMEOUT) => {
                tracing::warn!("in-flight RPCs did not finish within {DRAIN_TIMEOUT:?}; stopping anyway");
            }
        }
        for t in metrics_task.into_iter().chain(reload_task) {
            t.abort();
        }
        // Deletes deferred until the node was quiet run now rather than at the next start.
        self.containers.finish_deletes().await;
        // Records stored volatile (a start's, an address's) need no re-deriving at the next
        // start.
        if let Err(e) = self.store.flush() {
            tracing::warn!(error = %e, "flushing the store");
        }
        self.sandboxes.nri().stop().await;
        tracing::info!("stopped");
        Ok(())
    }
}

/// Fails if a live daemon answers on the socket path.
async fn refuse_live_socket(path: &Path) -> Result<(), ServerError> {
    if std::fs::symlink_metadata(path).is_ok()
        && tokio::net::UnixStream::connect(path).await.is_ok()
    {
        return Err(ServerError::SocketInUse(path.to_path_buf()));
    }
    Ok(())
}

/// Binds the CRI socket (mode 0660). A socket file left by a crashed daemon is replaced; one
/// that a live daemon answers on is an error.
async fn bind_socket(path: &Path) -> Result<UnixListener, ServerError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io_err(parent))?;
    }
    if std::fs::symlink_metadata(path).is_ok() {
        refuse_live_socket(path).await?;
        tracing::info!(socket = %path.display(), "replacing a stale socket");
        std::fs::remove_file(path).map_err(io_err(path))?;
    }
    let listener = UnixListener::bind(path).map_err(io_err(path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(io_err(path))?;
    Ok(listener)
}
