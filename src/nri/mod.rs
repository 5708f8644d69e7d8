//! NRI, the Node Resource Interface: plugins (resource policies, device injectors,
//! validators) that hook into pod and container lifecycle, as containerd 2.x and CRI-O host
//! them.
//!
//! - [`mux`] and [`ttrpc`]: the wire (two ttrpc connections multiplexed on one socket);
//! - [`plugin`]: one plugin's registration, configuration and calls;
//! - [`convert`]: berth's records as NRI's `PodSandbox` and `Container`;
//! - [`adjust`]: plugins' adjustments merged (conflicts refused) and applied to an OCI spec;
//! - this module, [`Nri`]: the socket, pre-installed plugins, synchronization and the
//!   relaying of each event to the subscribed plugins in index order.
//!
//! A plugin that answers an event with an error fails the CRI call that raised it (for
//! RunPodSandbox, CreateContainer, StartContainer, UpdateContainerResources); one that does
//! not answer within `plugin_request_timeout`, or whose connection is gone or speaks garbage,
//! is dropped and the call goes on without it. A plugin that connects is synchronized with
//! every pod and container while no creation is in flight ([`Nri::block_sync`]), so none is
//! missed: each is in the snapshot or raises its event after the plugin is added.

pub mod adjust;
pub mod convert;
pub mod mux;
pub mod plugin;
pub mod ttrpc;

/// The NRI protocol types generated from `proto/nri/api.proto`.
#[allow(clippy::all, clippy::pedantic)]
pub mod api {
    tonic::include_proto!("nri.pkg.api.v1alpha1");
}

use std::collections::HashMap;
use std::future::Future;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use prost::Message;

use crate::config::NriConfig;
use api::Event;
use plugin::{Origin, Plugin};
use ttrpc::{TtrpcError, code};

/// The NRI version berth speaks (`proto/nri`).
pub const NRI_VERSION: &str = "v0.12.2";
pub const PLUGIN_SERVICE: &str = "nri.pkg.api.v1alpha1.Plugin";
pub const RUNTIME_SERVICE: &str = "nri.pkg.api.v1alpha1.Runtime";

/// Errors of NRI hooks, as the CRI call that raised them reports them.
#[derive(Debug, thiserror::Error)]
pub enum NriError {
    /// A plugin refused the event.
    #[error("NRI plugin {plugin} failed {event}: {message}")]
    Plugin {
        plugin: String,
        event: &'static str,
        message: String,
    },
    /// Two plugins adjusted the same thing.
    #[error("NRI plugins {first} and {second} both adjust {what}")]
    Conflict {
        first: String,
        second: String,
        what: String,
    },
    /// An adjustment berth cannot carry out.
    #[error("NRI adjustment by {plugin}: {reason}")]
    Unsupported { plugin: String, reason: String },
    #[error("NRI: {context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What NRI needs of the runtime: its pods and containers, and applying plugins' updates.
pub trait Host: Send + Sync {
    /// Every pod and container (for a plugin's Synchronize).
    fn snapshot(&self) -> BoxFuture<'_, (Vec<api::PodSandbox>, Vec<api::Container>)>;
    /// Applies resource updates to existing containers; answers those that failed.
    fn update(
        &self,
        updates: Vec<api::ContainerUpdate>,
    ) -> BoxFuture<'_, Vec<api::ContainerUpdate>>;
    /// Stops containers a plugin evicts.
    fn evict(&self, evictions: Vec<api::ContainerEviction>) -> BoxFuture<'_, ()>;
}

/// The adjustments and updates plugins asked for at CreateContainer.
#[derive(Debug, Default)]
pub struct CreateResult {
    pub adjust: adjust::Merged,
    pub updates: Vec<api::ContainerUpdate>,
    pub evictions: Vec<api::ContainerEviction>,
}

/// The NRI host of one berthd.
pub struct Nri {
    config: NriConfig,
    /// Connected, synchronized plugins, by index.
    plugins: std::sync::RwLock<Vec<Arc<Plugin>>>,
    /// Read-held by every creation from its hook until it is listed; write-held while a new
    /// plugin is synchronized.
    sync: Arc<tokio::sync::RwLock<()>>,
    host: OnceLock<Weak<dyn Host>>,
    /// Containers whose StopContainer event went out (or is going out): exactly once each.
    stopped: Mutex<HashMap<String, Arc<tokio::sync::OnceCell<()>>>>,
    listener: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Plugins between their registration and their place in `plugins`: events raised
    /// meanwhile are built (and wait for the synchronization), so none is missed.
    synchronizing: std::sync::atomic::AtomicUsize,
}

/// Counts a plugin as being synchronized while it lives.
struct Synchronizing<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for Synchronizing<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Nri {
    pub fn new(config: NriConfig) -> Arc<Nri> {
        Arc::new(Nri {
            config,
            plugins: std::sync::RwLock::new(Vec::new()),
            sync: Arc::new(tokio::sync::RwLock::new(())),
            host: OnceLock::new(),
            stopped: Mutex::new(HashMap::new()),
            listener: Mutex::new(None),
            synchronizing: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// Where pods, containers and updates come from; set once, before [`Nri::start`].
    pub fn set_host(&self, host: Weak<dyn Host>) {
        let _ = self.host.set(host);
    }

    fn host(&self) -> Option<Arc<dyn Host>> {
        self.host.get().and_then(Weak::upgrade)
    }

    /// Whether any plugin is connected or being synchronized (events are built and sent
    /// only then).
    pub fn active(&self) -> bool {
        self.synchronizing.load(std::sync::atomic::Ordering::SeqCst) > 0
            || !self
                .plugins
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .is_empty()
    }

    /// Names of the connected plugins, in invocation order.
    pub fn plugin_names(&self) -> Vec<String> {
        self.plugins
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|p| p.name.clone())
            .collect()
    }

    /// Held by a creation from its hook until the new pod or container is listed: no plugin
    /// is synchronized meanwhile.
    pub async fn block_sync(&self) -> tokio::sync::OwnedRwLockReadGuard<()> {
        self.sync.clone().read_owned().await
    }

    /// Starts the plugins of `plugin_path` and listens on `socket_path` (unless disabled).
    pub async fn start(self: &Arc<Self>) -> Result<(), NriError> {
        if self.config.disable {
            tracing::info!("NRI is disabled");
            return Ok(());
        }
        self.launch_installed().await;
        if self.config.disable_connections {
            tracing::info!("NRI: connections from external plugins are disabled");
            return Ok(());
        }
        let path = &self.config.socket_path;
        let io = |context: String| move |source| NriError::Io { context, source };
        if let Some(dir) = path.parent() {
            use std::os::unix::fs::DirBuilderExt;
            // Only root may reach the socket (a plugin can change every container).
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io(format!("create {}", dir.display())))?;
        }
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(io(format!("remove {}", path.display()))(e));
            }
            _ => {}
        }
        let listener = tokio::net::UnixListener::bind(path)
            .map_err(io(format!("listen on {}", path.display())))?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                .map_err(io(format!("chmod {}", path.display())))?;
        }
        tracing::info!(socket = %path.display(), "NRI: listening for plugins");
        let me = Arc::downgrade(self);
        let task = tokio::spawn(async move {
            loop {
                let stream = match listener.accept().await {
                    Ok((stream, _)) => stream,
                    // Out of fds, say: plugins may connect again in a moment.
                    Err(e) => {
                        tracing::warn!(error = %e, "NRI: accepting a plugin connection");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Some(nri) = me.upgrade() else { return };
                tokio::spawn(async move {
                    let origin = Origin {
                        launched: None,
                        config: String::new(),
                        child: None,
                    };
                    nri.add(stream, origin).await;
                });
            }
        });
        *self.listener.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
        Ok(())
    }

    /// Stops listening and lets every plugin go (those berthd started are killed).
    pub async fn stop(&self) {
        if let Some(t) = self
            .listener
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            t.abort();
            let _ = std::fs::remove_file(&self.config.socket_path);
        }
        let plugins = std::mem::take(&mut *self.plugins.write().unwrap_or_else(|p| p.into_inner()));
        for p in plugins {
            let _: Result<api::Empty, _> = p
                .call(
                    "Shutdown",
                    &api::Empty {},
                    std::time::Duration::from_millis(500),
                )
                .await;
            p.close().await;
        }
    }

    /// Starts each executable `IDX-NAME` of `plugin_path` on a socketpair (fd 3 in the
    /// plugin, `NRI_PLUGIN_SOCKET=3`), with its config from `plugin_config_path`
    /// (`IDX-NAME.conf`, else `NAME.conf`). One that fails is logged and left out.
    async fn launch_installed(self: &Arc<Self>) {
        let Ok(entries) = std::fs::read_dir(&self.config.plugin_path) else {
            return;
        };
        let mut found: Vec<(String, String, std::path::PathBuf)> = Vec::new();
        for e in entries.flatten() {
            use std::os::unix::fs::PermissionsExt;
            let Ok(meta) = e.metadata() else { continue };
            if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
                continue;
            }
            let file = e.file_name().to_string_lossy().into_owned();
            match parse_plugin_file_name(&file) {
                Some((idx, base)) => found.push((idx, base, e.path())),
                None => {
                    tracing::warn!(file = %e.path().display(), "NRI: not a plugin name (IDX-NAME); skipped")
                }
            }
        }
        found.sort();
        for (idx, base, path) in found {
            if let Err(e) = self.launch(&idx, &base, &path).await {
                tracing::warn!(plugin = %format!("{idx}-{base}"), error = %e, "NRI: pre-installed plugin not started");
            }
        }
    }

    async fn launch(self: &Arc<Self>, idx: &str, base: &str, path: &Path) -> Result<(), String> {
        let config = plugin_config(&self.config.plugin_config_path, idx, base)?;
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(|e| e.to_string())?;
        let fd = theirs.as_raw_fd();
        let mut cmd = std::process::Command::new(path);
        cmd.env_clear()
            .env("NRI_PLUGIN_NAME", base)
            .env("NRI_PLUGIN_IDX", idx)
            .env("NRI_PLUGIN_SOCKET", "3")
            .stdin(std::process::Stdio::null());
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(move || {
                // dup2 leaves the copy without close-on-exec; an fd that is 3 already keeps
                // its flag, so it is cleared by hand.
                let r = if fd == 3 {
                    libc::fcntl(3, libc::F_SETFD, 0)
                } else {
                    libc::dup2(fd, 3)
                };
                if r < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("start {}: {e}", path.display()))?;
        drop(theirs);
        ours.set_nonblocking(true).map_err(|e| e.to_string())?;
        let stream = tokio::net::UnixStream::from_std(ours).map_err(|e| e.to_string())?;
        let origin = Origin {
            launched: Some((idx.to_string(), base.to_string())),
            config,
            child: Some(child),
        };
        if self.add(stream, origin).await {
            Ok(())
        } else {
            Err("it did not register, configure or synchronize (see above)".to_string())
        }
    }

    /// Registers, configures and synchronizes a plugin, then adds it; false when it failed
    /// (logged).
    async fn add(self: &Arc<Self>, stream: tokio::net::UnixStream, origin: Origin) -> bool {
        let plugin = match Plugin::connect(self, stream, origin).await {
            Ok(p) => Arc::new(p),
            Err(e) => {
                tracing::warn!(error = %e, "NRI: plugin not connected");
                return false;
            }
        };
        self.synchronizing
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let counted = Synchronizing(&self.synchronizing);
        let guard = self.sync.write().await;
        let updates = match self.synchronize(&plugin).await {
            Ok(u) => u,
            Err(e) => {
                tracing::warn!(plugin = %plugin.name, error = %e, "NRI: plugin synchronization failed; dropped");
                plugin.close().await;
                return false;
            }
        };
        {
            let mut plugins = self.plugins.write().unwrap_or_else(|p| p.into_inner());
            plugins.push(plugin.clone());
            plugins.sort_by(|a, b| a.idx.cmp(&b.idx));
        }
        drop(guard);
        drop(counted);
        tracing::info!(plugin = %plugin.name, order = ?self.plugin_names(), "NRI: plugin connected and synchronized");
        if !updates.is_empty()
            && let Some(host) = self.host()
        {
            for f in host.update(updates).await {
                tracing::warn!(plugin = %plugin.name, container = %f.container_id, "NRI: update asked at synchronization failed");
            }
        }
        // Dropped from the list when its connection goes.
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            plugin.closed().await;
            if let Some(nri) = me.upgrade() {
                tracing::info!(plugin = %plugin.name, "NRI: plugin disconnected");
                nri.drop_plugin(&plugin).await;
            }
        });
        true
    }

    /// Sends every pod and container, in as many messages as the size limit needs.
    async fn synchronize(&self, plugin: &Plugin) -> Result<Vec<api::ContainerUpdate>, String> {
        let (pods, containers) = match self.host() {
            Some(h) => h.snapshot().await,
            None => (Vec::new(), Vec::new()),
        };
        let chunks = sync_chunks(pods, containers, ttrpc::MAX_MESSAGE - (64 << 10));
        let last = chunks.len() - 1;
        for (i, (pods, containers)) in chunks.into_iter().enumerate() {
            let more = i < last;
            let req = api::SynchronizeRequest {
                pods,
                containers,
                more,
            };
            let resp: api::SynchronizeResponse = plugin
                .call("Synchronize", &req, self.config.plugin_request_timeout)
                .await
                .map_err(|e| e.to_string())?;
            if !more {
                return Ok(resp.update);
            }
            if !resp.update.is_empty() || !resp.more {
                return Err("the plugin does not take a synchronization in parts".to_string());
            }
        }
        Ok(Vec::new())
    }

    async fn drop_plugin(&self, plugin: &Arc<Plugin>) {
        self.plugins
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|p| !Arc::ptr_eq(p, plugin));
        plugin.close().await;
    }

    /// Sends `req` to each subscribed plugin in turn; a plugin that cannot be reached is
    /// dropped, one that answers with an error fails the event. A plugin that does not have
    /// the event's own method (older plugins) gets it as a `StateChange`.
    async fn relay<Req: Message, Resp: Message + Default>(
        &self,
        event: Event,
        req: &Req,
        pod: &api::PodSandbox,
        container: Option<&api::Container>,
    ) -> Result<Vec<(Arc<Plugin>, Resp)>, NriError> {
        self.relay_each(event, req, pod, container, |_, _| Ok(None))
            .await
    }

    /// [`Nri::relay`], with `after` called on each answer before the next plugin is asked:
    /// the request it returns is what the next plugins get.
    async fn relay_each<Req: Message, Resp: Message + Default>(
        &self,
        event: Event,
        req: &Req,
        pod: &api::PodSandbox,
        container: Option<&api::Container>,
        mut after: impl FnMut(&Arc<Plugin>, &Resp) -> Result<Option<Req>, NriError>,
    ) -> Result<Vec<(Arc<Plugin>, Resp)>, NriError> {
        let method = method_of(event);
        let mut changed: Option<Req> = None;
        // A plugin being synchronized gets every event that its snapshot does not hold: the
        // events of creations wait for it in their callers (`block_sync`), the others here,
        // before the plugins are listed (so that it is among them).
        let _sync = match event {
            Event::RunPodSandbox | Event::CreateContainer | Event::ValidateContainerAdjustment => {
                None
            }
            _ => Some(self.sync.read().await),
        };
        let plugins: Vec<Arc<Plugin>> = self
            .plugins
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let timeout = self.config.plugin_request_timeout;
        let mut out = Vec::new();
        for p in plugins {
            if !p.subscribed(event) || p.is_closed() {
                continue;
            }
            let current = changed.as_ref().unwrap_or(req);
            let mut answer: Result<Resp, TtrpcError> = p.call(method, current, timeout).await;
            // Only the events NRI used to send as StateChange fall back to it.
            if let Err(TtrpcError::Status {
                code: code::UNIMPLEMENTED,
                ..
            }) = &answer
                && has_state_change_form(event)
            {
                answer = p
                    .call::<_, api::Empty>("StateChange", &state(event, pod, container), timeout)
                    .await
                    .map(|_| Resp::default());
            }
            match answer {
                Ok(r) => {
                    if let Some(next) = after(&p, &r)? {
                        changed = Some(next);
                    }
                    out.push((p, r));
                }
                // A validator that cannot answer rejects: nothing unvalidated is created.
                Err(e) if e.is_fatal() && event != Event::ValidateContainerAdjustment => {
                    tracing::warn!(plugin = %p.name, event = method, error = %e, "NRI: plugin dropped");
                    self.drop_plugin(&p).await;
                }
                Err(e) => {
                    return Err(NriError::Plugin {
                        plugin: p.name.clone(),
                        event: method,
                        message: match e {
                            TtrpcError::Status { message, .. } => message,
                            other => other.to_string(),
                        },
                    });
                }
            }
        }
        Ok(out)
    }

    /// [`Nri::relay`] of an event that only informs: a plugin's error is logged.
    async fn notify<Req: Message>(
        &self,
        event: Event,
        req: &Req,
        pod: &api::PodSandbox,
        container: Option<&api::Container>,
    ) {
        if let Err(e) = self
            .relay::<Req, api::Empty>(event, req, pod, container)
            .await
        {
            tracing::warn!(error = %e, "NRI: event not handled");
        }
    }

    pub async fn run_pod_sandbox(&self, pod: &api::PodSandbox) -> Result<(), NriError> {
        let req = api::RunPodSandboxRequest {
            pod: Some(pod.clone()),
        };
        self.relay::<_, api::RunPodSandboxResponse>(Event::RunPodSandbox, &req, pod, None)
            .await
            .map(|_| ())
    }

    pub async fn stop_pod_sandbox(&self, pod: &api::PodSandbox) {
        let req = api::StopPodSandboxRequest {
            pod: Some(pod.clone()),
        };
        self.notify(Event::StopPodSandbox, &req, pod, None).await
    }

    pub async fn remove_pod_sandbox(&self, pod: &api::PodSandbox) {
        let req = api::RemovePodSandboxRequest {
            pod: Some(pod.clone()),
        };
        self.notify(Event::RemovePodSandbox, &req, pod, None).await
    }

    /// UpdatePodSandboxResources: a plugin may refuse it.
    pub async fn update_pod_sandbox(
        &self,
        pod: &api::PodSandbox,
        overhead: Option<api::LinuxResources>,
        resources: Option<api::LinuxResources>,
    ) -> Result<(), NriError> {
        let req = api::UpdatePodSandboxRequest {
            pod: Some(pod.clone()),
            overhead_linux_resources: overhead,
            linux_resources: resources,
        };
        self.relay::<_, api::UpdatePodSandboxResponse>(Event::UpdatePodSandbox, &req, pod, None)
            .await
            .map(|_| ())
    }

    pub async fn post_update_pod_sandbox(&self, pod: &api::PodSandbox) {
        let req = api::PostUpdatePodSandboxRequest {
            pod: Some(pod.clone()),
        };
        self.notify(Event::PostUpdatePodSandbox, &req, pod, None)
            .await
    }

    /// CreateContainer: every plugin's adjustment, merged (two plugins adjusting the same
    /// thing is an error), then checked by the validating plugins.
    ///
    /// Each plugin sees the container as the plugins before it adjusted it: `adjusted`
    /// gives the container with a merged adjustment applied.
    pub async fn create_container(
        &self,
        pod: &api::PodSandbox,
        container: &api::Container,
        adjusted: impl Fn(&adjust::Merged) -> Option<api::Container>,
    ) -> Result<CreateResult, NriError> {
        let req = api::CreateContainerRequest {
            pod: Some(pod.clone()),
            container: Some(container.clone()),
        };
        let mut merged = adjust::Merged::default();
        let answers: Vec<(Arc<Plugin>, api::CreateContainerResponse)> = self
            .relay_each(
                Event::CreateContainer,
                &req,
                pod,
                Some(container),
                |p, r: &api::CreateContainerResponse| {
                    let Some(a) = &r.adjust else { return Ok(None) };
                    merged.add(&p.name, a.clone())?;
                    Ok(adjusted(&merged).map(|c| api::CreateContainerRequest {
                        pod: Some(pod.clone()),
                        container: Some(c),
                    }))
                },
            )
            .await?;
        let mut result = CreateResult {
            adjust: merged,
            ..Default::default()
        };
        let consulted = self
            .plugins
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|p| api::PluginInstance {
                name: p.base.clone(),
                index: p.idx.clone(),
            })
            .collect();
        for (_, r) in answers {
            result.updates.extend(r.update);
            result.evictions.extend(r.evict);
        }
        let validate = api::ValidateContainerAdjustmentRequest {
            pod: Some(pod.clone()),
            container: Some(container.clone()),
            adjust: Some(result.adjust.adjustment.clone()),
            update: result.updates.clone(),
            owners: Some(result.adjust.owning_plugins(&container.id)),
            plugins: consulted,
        };
        let verdicts: Vec<(Arc<Plugin>, api::ValidateContainerAdjustmentResponse)> = self
            .relay(
                Event::ValidateContainerAdjustment,
                &validate,
                pod,
                Some(container),
            )
            .await?;
        if let Some((p, v)) = verdicts.into_iter().find(|(_, v)| v.reject) {
            return Err(NriError::Plugin {
                plugin: p.name.clone(),
                event: method_of(Event::ValidateContainerAdjustment),
                message: format!("rejected the adjustment: {}", v.reason),
            });
        }
        Ok(result)
    }

    pub async fn post_create_container(&self, pod: &api::PodSandbox, container: &api::Container) {
        let req = api::PostCreateContainerRequest {
            pod: Some(pod.clone()),
            container: Some(container.clone()),
        };
        self.notify(Event::PostCreateContainer, &req, pod, Some(container))
            .await
    }

    pub async fn start_container(
        &self,
        pod: &api::PodSandbox,
        container: &api::Container,
    ) -> Result<(), NriError> {
        let req = api::StartContainerRequest {
            pod: Some(pod.clone()),
            container: Some(container.clone()),
        };
        self.relay::<_, api::StartContainerResponse>(
            Event::StartContainer,
            &req,
            pod,
            Some(container),
        )
        .await
        .map(|_| ())
    }

    pub async fn post_start_container(&self, pod: &api::PodSandbox, container: &api::Container) {
        let req = api::PostStartContainerRequest {
            pod: Some(pod.clone()),
            container: Some(container.clone()),
        };
        self.notify(Event::PostStartContainer, &req, pod, Some(container))
            .await
    }

    /// UpdateContainerResources: the updates plugins ask for (to this container, changing
    /// what is applied, or to others).
    pub async fn update_container(
        &self,
        pod: &api::PodSandbox,
        container: &api::Container,
        resources: &api::LinuxResources,
    ) -> Result<(Vec<api::ContainerUpdate>, Vec<api::ContainerEviction>), NriError> {
        let req = api::UpdateContainerRequest {
            pod: Some(pod.clone()),
            container: Some(container.clone()),
            linux_resources: Some(resources.clone()),
        };
        let answers: Vec<(Arc<Plugin>, api::UpdateContainerResponse)> = self
            .relay(Event::UpdateContainer, &req, pod, Some(container))
            .await?;
        let mut updates = Vec::new();
        let mut evictions = Vec::new();
        for (_, r) in answers {
            updates.extend(r.update);
            evictions.extend(r.evict);
        }
        Ok((updates, evictions))
    }

    pub async fn post_update_container(&self, pod: &api::PodSandbox, container: &api::Container) {
        let req = api::PostUpdateContainerRequest {
            pod: Some(pod.clone()),
            container: Some(container.clone()),
        };
        self.notify(Event::PostUpdateContainer, &req, pod, Some(container))
            .await
    }

    /// StopContainer, once per container however its stop was seen (StopContainer, its own
    /// exit, a pod's stop, RemoveContainer): a second call waits for the first to finish.
    /// `event` gives the pod and container to send; it is called only by the first call.
    pub async fn container_stopped(
        &self,
        container_id: &str,
        event: impl FnOnce() -> Option<(api::PodSandbox, api::Container)>,
    ) {
        let cell = self
            .stopped
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(container_id.to_string())
            .or_default()
            .clone();
        cell.get_or_init(|| async {
            let Some((pod, container)) = event() else {
                return;
            };
            let req = api::StopContainerRequest {
                pod: Some(pod.clone()),
                container: Some(container.clone()),
            };
            let answers = self
                .relay::<_, api::StopContainerResponse>(
                    Event::StopContainer,
                    &req,
                    &pod,
                    Some(&container),
                )
                .await;
            match answers {
                Ok(answers) => {
                    let updates: Vec<api::ContainerUpdate> =
                        answers.into_iter().flat_map(|(_, r)| r.update).collect();
                    // Applied apart: the caller may hold this container's lock, and an update
                    // waits for the lock of the container it changes.
                    if !updates.is_empty()
                        && let Some(host) = self.host()
                    {
                        tokio::spawn(async move {
                            for f in host.update(updates).await {
                                tracing::warn!(container = %f.container_id, "NRI: update asked at a container's stop failed");
                            }
                        });
                    }
                }
                Err(e) => tracing::warn!(error = %e, "NRI: event not handled"),
            }
        })
        .await;
    }

    pub async fn remove_container(&self, pod: &api::PodSandbox, container: &api::Container) {
        let req = api::RemoveContainerRequest {
            pod: Some(pod.clone()),
            container: Some(container.clone()),
        };
        self.notify(Event::RemoveContainer, &req, pod, Some(container))
            .await;
    }

    /// Forgets a removed container (whether or not plugins were told of its removal).
    pub fn forget(&self, container_id: &str) {
        self.stopped
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(container_id);
    }

    /// A plugin's unsolicited `UpdateContainers`: answers the updates that failed.
    async fn apply_unsolicited(
        &self,
        req: api::UpdateContainersRequest,
    ) -> Vec<api::ContainerUpdate> {
        let Some(host) = self.host() else {
            return req.update;
        };
        let failed = host.update(req.update).await;
        if !req.evict.is_empty() {
            host.evict(req.evict).await;
        }
        failed
    }
}

/// Whether NRI sent this event as a `StateChange` before it had its own method (an older
/// plugin gets it so).
fn has_state_change_form(event: Event) -> bool {
    matches!(
        event,
        Event::RunPodSandbox
            | Event::StopPodSandbox
            | Event::RemovePodSandbox
            | Event::PostCreateContainer
            | Event::StartContainer
            | Event::PostStartContainer
            | Event::PostUpdateContainer
            | Event::PostUpdatePodSandbox
            | Event::RemoveContainer
    )
}

/// The name of the Plugin service's method for an event.
fn method_of(event: Event) -> &'static str {
    match event {
        Event::RunPodSandbox => "RunPodSandbox",
        Event::StopPodSandbox => "StopPodSandbox",
        Event::RemovePodSandbox => "RemovePodSandbox",
        Event::UpdatePodSandbox => "UpdatePodSandbox",
        Event::PostUpdatePodSandbox => "PostUpdatePodSandbox",
        Event::CreateContainer => "CreateContainer",
        Event::PostCreateContainer => "PostCreateContainer",
        Event::StartContainer => "StartContainer",
        Event::PostStartContainer => "PostStartContainer",
        Event::UpdateContainer => "UpdateContainer",
        Event::PostUpdateContainer => "PostUpdateContainer",
        Event::StopContainer => "StopContainer",
        Event::RemoveContainer => "RemoveContainer",
        Event::ValidateContainerAdjustment => "ValidateContainerAdjustment",
        Event::Unknown | Event::Last => "StateChange",
    }
}

fn state(
    event: Event,
    pod: &api::PodSandbox,
    container: Option<&api::Container>,
) -> api::StateChangeEvent {
    api::StateChangeEvent {
        event: event as i32,
        pod: Some(pod.clone()),
        container: container.cloned(),
    }
}

/// `IDX-NAME` (two digits, a dash, a name) of a pre-installed plugin's file.
fn parse_plugin_file_name(file: &str) -> Option<(String, String)> {
    let (idx, base) = file.split_once('-')?;
    (idx.len() == 2 && idx.bytes().all(|b| b.is_ascii_digit()) && !base.is_empty())
        .then(|| (idx.to_string(), base.to_string()))
}

/// A pre-installed plugin's configuration: `IDX-NAME.conf`, else `NAME.conf`, else none.
fn plugin_config(dir: &Path, idx: &str, base: &str) -> Result<String, String> {
    for file in [format!("{idx}-{base}.conf"), format!("{base}.conf")] {
        let path = dir.join(file);
        match std::fs::read_to_string(&path) {
            Ok(text) => return Ok(text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("read {}: {e}", path.display())),
        }
    }
    Ok(String::new())
}

/// Splits a synchronization into messages of at most `limit` bytes (pods first).
fn sync_chunks(
    pods: Vec<api::PodSandbox>,
    containers: Vec<api::Container>,
    limit: usize,
) -> Vec<(Vec<api::PodSandbox>, Vec<api::Container>)> {
    let mut chunks = vec![(Vec::new(), Vec::new())];
    let mut size = 0usize;
    // Each item costs its length plus a tag and a length prefix (at most 6 bytes).
    for p in pods {
        let n = p.encoded_len() + 6;
        if size + n > limit && size > 0 {
            chunks.push((Vec::new(), Vec::new()));
            size = 0;
        }
        size += n;
        if let Some(last) = chunks.last_mut() {
            last.0.push(p);
        }
    }
    for c in containers {
        let n = c.encoded_len() + 6;
        if size + n > limit && size > 0 {
            chunks.push((Vec::new(), Vec::new()));
            size = 0;
        }
        size += n;
        if let Some(last) = chunks.last_mut() {
            last.1.push(c);
        }
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugin_file_names() {
        assert_eq!(
            parse_plugin_file_name("10-topology"),
            Some(("10".to_string(), "topology".to_string()))
        );
        assert_eq!(
            parse_plugin_file_name("01-a-b"),
            Some(("01".to_string(), "a-b".to_string()))
        );
        assert_eq!(parse_plugin_file_name("topology"), None);
        assert_eq!(parse_plugin_file_name("1-topology"), None);
        assert_eq!(parse_plugin_file_name("10-"), None);
    }

    #[test]
    fn synchronization_is_split_by_size() {
        let pod = |i: usize| api::PodSandbox {
            id: format!("{i:064}"),
            ..Default::default()
        };
        let ctr = |i: usize| api::Container {
            id: format!("{i:064}"),
            ..Default::default()
        };
        let one = sync_chunks(vec![pod(1)], vec![ctr(1)], 1 << 20);
        assert_eq!(one.len(), 1);
        let none = sync_chunks(vec![], vec![], 1 << 20);
        assert_eq!(none.len(), 1);
        assert!(none[0].0.is_empty() && none[0].1.is_empty());
        let many = sync_chunks(
            (0..100).map(pod).collect(),
            (0..100).map(ctr).collect(),
            1000,
        );
        assert!(many.len() > 10);
        assert_eq!(many.iter().map(|c| c.0.len()).sum::<usize>(), 100);
        assert_eq!(many.iter().map(|c| c.1.len()).sum::<usize>(), 100);
        for (p, c) in &many {
            let size: usize = p.iter().map(|x| x.encoded_len() + 6).sum::<usize>()
                + c.iter().map(|x| x.encoded_len() + 6).sum::<usize>();
            assert!(size <= 1000);
        }
    }
}
