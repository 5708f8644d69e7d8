//! Containers of pods: durable records, per-pod name reservation, create (rootfs, volumes, OCI
//! spec, bundle, `create` through the pod's berth-monitor), start, stop (the image's stop
//! signal, then SIGKILL), remove, status, exec, resource updates and log reopening.
//!
//! A container holds its image and the images it mounts as volumes
//! ([`ImageManager::acquire`]) from its creation to its removal.
//!
//! Crash safety: a container being made is described by its intent record, `intent.json` in
//! its bundle (under `state`, which lasts one boot), written while the rootfs is mounted
//! (before anything else is made; a bundle without it has at most its rootfs mounted) and not
//! fsynced: what it guards (mounts, the runtime's container, its cgroup, the monitor's fds)
//! ends with the boot, so it only has to survive a crash of berthd. The one durable commit of
//! CreateContainer is the `Created` record that names the whole container, made while the
//! runtime creates it (so its fsync costs no time): until the RPC answers, a record without a
//! pid may name a container the runtime does not have yet. (A crash during the runtime's
//! create may so leave a created container that the kubelet never heard of, as a crash
//! between the commit and the answer always could: its retry finds the name taken until the
//! kubelet removes that container.) StartContainer's `Running` record is not durable on its
//! own: the runtime's state tells a started container after a crash. At start,
//! [`ContainerManager::open`] undoes every bundle that no record names (with its intent record
//! when there is one) and every writable layer under `root` that no record names (what a
//! power loss leaves), removes what is still `Creating` (records of older berthds), whose pod
//! is gone, or whose creation a crash cut (created, no pid, unknown to the runtime, its bundle
//! there), with a deleted event, takes a created container that the runtime calls running as
//! running, and reads the exit files that the monitors wrote while berthd was down.
//! RemoveContainer leaves a `removing` mark in the bundle before it tears
//! anything down and removes the bundle after the record: a start that finds the mark on a
//! record finishes the removal.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::cri::v1 as cri;
use serde::{Deserialize, Serialize};
use tracing::Instrument;

use super::cdi::{self, CdiError};
use super::quiet;
use super::rootfs::{self, RootfsError};
use super::spec::{self, SpecError, SpecInput};
use super::volumes::{self, VolumeError};
use crate::cgroups::{self, CgroupError, Layout};
use crate::config::Config;
use crate::events::{EventHub, Kind as EventKind};
use crate::ids::{self, Index, Lookup, now_nanos, process_start_nanos};
use crate::image::{ImageError, ImageManager};
use crate::locks::KeyedLocks;
use crate::monitor::{self, CreateRequest, ExitInfo, MonitorError};
use crate::runtime::{OciRuntime, RuntimeError};
use crate::sandbox::{Phase as PodPhase, SandboxError, SandboxManager, SandboxRecord, step_done};
use crate::store::{Batch, Store, StoreError, Table};

/// Errors of the container piece.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error(transparent)]
    Nri(#[from] crate::nri::NriError),
    #[error("container {0:?} not found")]
    NotFound(String),
    #[error("container id prefix {0:?} is ambiguous")]
    Ambiguous(String),
    #[error("container name {name:?} is already reserved by {id}")]
    NameReserved { name: String, id: String },
    #[error("invalid container config: {0}")]
    Invalid(String),
    #[error("container {id} is {state}: {what}")]
    WrongState {
        id: String,
        state: &'static str,
        what: &'static str,
    },
    #[error("pod sandbox: {0}")]
    Sandbox(#[from] SandboxError),
    #[error("pod sandbox {0} is not ready")]
    SandboxNotReady(String),
    #[error("image: {0}")]
    Image(#[from] ImageError),
    #[error("image {0:?} is not present; pull it first")]
    ImageNotFound(String),
    #[error("OCI spec: {0}")]
    Spec(#[from] SpecError),
    #[error("rootfs: {0}")]
    Rootfs(#[from] RootfsError),
    #[error(transparent)]
    Cdi(#[from] CdiError),
    /// The container's command does not exist in it (the runtime's noise left out).
    #[error("the container's command {command:?} was not found: {reason}")]
    CommandNotFound { command: String, reason: String },
    #[error("volumes: {0}")]
    Volume(#[from] VolumeError),
    #[error("OCI runtime: {0}")]
    Runtime(#[from] RuntimeError),
    #[error("berth-monitor: {0}")]
    Monitor(#[from] MonitorError),
    /// The client stopped waiting (its deadline passed) before the container was made; what
    /// was made of it is undone.
    #[error("the client stopped waiting before the container was made; it was undone")]
    Cancelled,
    /// The runtime's delete of a removed container failed; the pod keeps it until it works.
    #[error("the OCI runtime's delete of removed container {id} failed: {error}")]
    Undeleted {
        id: String,
        error: Arc<RuntimeError>,
    },
    #[error("cgroup: {0}")]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ContainerError {
    let context = context.into();
    move |source| ContainerError::Io { context, source }
}

/// Maps a blocking or spawned task that panicked or was cancelled to an I/O error naming
/// what it did.
fn task_err(context: &str) -> impl FnOnce(tokio::task::JoinError) -> ContainerError {
    let context = context.to_string();
    move |e| ContainerError::Io {
        context,
        source: std::io::Error::other(e),
    }
}

/// Where a container is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    Creating,
    Created,
    Running,
    Exited,
}

/// An image a container mounts as a volume (KEP-4639).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageVolume {
    /// The index of its CRI mount in `config.mounts`.
    pub index: usize,
    /// The image id (`sha256:…`).
    pub image_id: String,
    /// What ContainerStatus reports as the mount's `image.image_ref`: the image id, which is
    /// what PullImage answered the kubelet (critest compares the two).
    pub image_ref: String,
}

/// The durable record of a container (key: its id).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContainerRecord {
    pub id: String,
    pub sandbox_id: String,
    /// `<sandbox id>/<name>_<attempt>`.
    pub name_key: String,
    pub phase: Phase,
    pub config: cri::ContainerConfig,
    /// The image id (`sha256:…`).
    pub image_id: String,
    /// The image as the client named it.
    pub image_name: String,
    /// The image's repo digest, when it has one.
    pub image_ref: String,
    pub runtime_handler: String,
    pub cgroups_path: String,
    /// `state/containers/<id>`: config.json, rootfs mount point, exit file.
    pub bundle: PathBuf,
    pub log_path: Option<PathBuf>,
    pub pid: i32,
    pub created_at: i64,
    pub started_at: i64,
    pub finished_at: i64,
    pub exit_code: i32,
    pub reason: String,
    pub message: String,
    /// The signal that stops it (number): the config's, else the image's, else SIGTERM.
    /// (Records from before the config could name one hold the image's, or none.)
    pub stop_signal: Option<i32>,
    /// The images mounted as volumes.
    #[serde(default)]
    pub image_volumes: Vec<ImageVolume>,
    /// The identity its first process starts with (from the OCI spec); `None` before the
    /// spec is written, and in older records.
    #[serde(default)]
    pub user: Option<ProcessUser>,
    /// Its init is PID 1 of a PID namespace of its own (killing it ends every process of
    /// it). `false` in older records.
    #[serde(default)]
    pub own_pid_ns: bool,
}

/// The uid, gid and supplementary groups a container's first process starts with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessUser {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

impl ContainerRecord {
    /// Notes this container (id, name, pod id) in the current RPC's span.
    pub fn note_in_span(&self) {
        let name = self
            .config
            .metadata
            .as_ref()
            .map_or("", |m| m.name.as_str());
        crate::span::note_container(&self.id, name, &self.sandbox_id);
    }

    pub fn exit_file(&self) -> PathBuf {
        self.bundle.join("exit.json")
    }
    pub fn rootfs(&self) -> PathBuf {
        self.bundle.join("rootfs")
    }
    pub fn state_name(&self) -> &'static str {
        match self.phase {
            Phase::Creating => "being created",
            Phase::Created => "created",
            Phase::Running => "running",
            Phase::Exited => "exited",
        }
    }
}

/// An exec ready to run: the runtime, the container and the OCI process file.
pub struct ExecPlan {
    pub runtime: OciRuntime,
    pub container_id: String,
    pub process_file: PathBuf,
    pub pid_file: PathBuf,
}

impl Drop for ExecPlan {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.process_file);
        let _ = std::fs::remove_file(&self.pid_file);
    }
}

/// The containers of one berthd.
pub struct ContainerManager {
    config: Config,
    store: Arc<Store>,
    images: Arc<ImageManager>,
    sandboxes: Arc<SandboxManager>,
    /// The containers by id, and their reserved names.
    index: Index<ContainerRecord>,
    locks: KeyedLocks,
    layout: Layout,
    min_oom_score_adj: i32,
    monitor_bin: PathBuf,
    exec_seq: std::sync::atomic::AtomicU64,
    /// CDI spec dirs (read at each CreateContainer that asks for devices).
    cdi: Arc<cdi::Registry>,
    /// Where lifecycle events go.
    events: Arc<EventHub>,
    /// The runtime deletes of removed containers, waiting or running, with their pod's id
    /// and what hurries them (see [`ContainerManager::delete_later`]).
    deleting: std::sync::Mutex<Vec<DeferredDelete>>,
    /// When deferred deletes may run: container stops and removals touch it.
    quiet: Arc<quiet::QuietGate>,
    /// Pod monitor launches under way: ahead of a pod's first container, or by a create.
    launches: monitor::Launches,
    /// Removed containers whose runtime delete failed (a stuck or broken runtime): tried
    /// again by their pod's removal, which fails while one does.
    undeleted: Arc<std::sync::Mutex<Vec<Undeleted>>>,
}

/// Whether the oom_score_adj clamp was logged already.
static OOM_CLAMP_LOGGED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// [`ContainerError::CommandNotFound`] when a runtime's error says `command` was not found,
/// else `other`.
fn not_found_or(message: &str, command: &str, other: ContainerError) -> ContainerError {
    match crate::runtime::log::command_not_found(message, command) {
        Some(reason) if !command.is_empty() => ContainerError::CommandNotFound {
            command: command.to_string(),
            reason,
        },
        _ => other,
    }
}

/// The first argument of the process in a bundle's `config.json` (empty if unreadable).
fn bundle_command(bundle: &Path) -> String {
    std::fs::read(bundle.join("config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v.pointer("/process/args/0")?.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// What [`ContainerManager::make`] makes a container from (checked before anything is made).
struct MakeInputs<'a> {
    sandbox: &'a SandboxRecord,
    /// What NRI plugins were told and asked at CreateContainer.
    nri: &'a mut NriCreate,
    image_config: &'a serde_json::Value,
    lower: &'a [PathBuf],
    work: &'a spec::mounts::HostWork,
    cdi_devices: &'a cdi::Resolved,
}

/// What CreateContainer's NRI hook leaves to do once the container is listed (or gone).
#[derive(Default)]
struct NriCreate {
    /// Set once plugins were told of the container (they hear of its end if it fails).
    pod: Option<crate::nri::api::PodSandbox>,
    /// Their updates to other containers and evictions: carried out after the sync block
    /// is released, since they wait for other containers' locks and NRI events.
    updates: Vec<crate::nri::api::ContainerUpdate>,
    evictions: Vec<crate::nri::api::ContainerEviction>,
}

/// A removed container's runtime delete, waiting for quiet or running (see
/// [`ContainerManager::delete_later`]).
struct DeferredDelete {
    sandbox_id: String,
    task: tokio::task::JoinHandle<()>,
    /// Notified to run it at once (a permit when it is not waiting yet).
    hurry: Arc<tokio::sync::Notify>,
}

/// A removed container whose runtime delete failed.
struct Undeleted {
    sandbox_id: String,
    id: String,
    runtime: OciRuntime,
    cgroups_path: String,
    error: Arc<RuntimeError>,
}

/// How much longer than the runtime's timeout berthd waits for the monitor's answer to a
/// `create` (the monitor kills a create that takes longer and answers at once).
const CREATE_ANSWER_MARGIN: Duration = Duration::from_secs(10);

/// What start-up repair makes of a container the store calls created.
#[derive(Debug, PartialEq, Eq)]
enum Settled {
    /// It stays (its record updated in place).
    Kept,
    /// A CreateContainer that a crash cut: to be undone.
    CutCreate,
}

/// The intent record of a container being made, in its bundle (see the module's doc).
const INTENT_FILE: &str = "intent.json";

/// Writes the intent record of a container being made: one write, not fsynced, while its
/// rootfs is mounted and before anything else is made (a crash before or in the middle of it
/// leaves a record that does not parse, and nothing else of the container but its bundle
/// directory, its rootfs mount and writable layer).
fn write_intent(rec: &ContainerRecord) -> Result<(), ContainerError> {
    let json = serde_json::to_vec(rec).map_err(|e| ContainerError::Io {
        context: "encode the container's intent record".to_string(),
        source: std::io::Error::other(e),
    })?;
    std::fs::write(rec.bundle.join(INTENT_FILE), json)
        .map_err(io_err("write the container's intent record"))
}

/// Left in a bundle when RemoveContainer starts tearing the container down: a start that
/// finds it finishes the removal. The bundle itself goes only after the record.
const REMOVING_MARK: &str = "removing";

/// Removes a container's bundle, unless something is still mounted in it (never recurse
/// into a rootfs or a bind of a host path).
fn remove_bundle(id: &str, bundle: &Path) {
    match volumes::remove_unless_mounted(bundle) {
        Ok(left) if left.is_empty() => {}
        Ok(left) => tracing::warn!(%id, mounts = ?left, "bundle kept: mounts are left in it"),
        Err(e) => tracing::warn!(%id, error = %e, "remove bundle"),
    }
}

/// The intent record left in a bundle, if it is whole and names that bundle.
fn read_intent(bundle: &Path) -> Option<ContainerRecord> {
    let bytes = std::fs::read(bundle.join(INTENT_FILE)).ok()?;
    let rec: ContainerRecord = serde_json::from_slice(&bytes).ok()?;
    (rec.bundle == bundle).then_some(rec)
}

/// How often [`ContainerManager::wait_exit`] looks for the exit file besides its watch.
const EXIT_POLL: Duration = Duration::from_millis(250);

/// An inotify watch of a bundle directory: wakes up when a file is created or renamed into
/// it (the monitor's exit file).
struct ExitWatch(Option<tokio::io::unix::AsyncFd<InotifyFd>>);

impl Drop for ExitWatch {
    /// Closing an inotify instance that holds a watch waits for a grace period of the
    /// kernel's (fsnotify's SRCU: 0.1 to 16 ms measured here). Done on a blocking thread:
    /// on the async worker it held up StopContainer's answer by that much, and every task
    /// queued behind it.
    fn drop(&mut self) {
        let Some(fd) = self.0.take() else { return };
        // Deregistered from the reactor here; only the close goes elsewhere.
        let inotify = fd.into_inner();
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(move || drop(inotify))),
            Err(_) => drop(inotify),
        }
    }
}

/// An inotify instance as [`tokio::io::unix::AsyncFd`] takes it.
struct InotifyFd(nix::sys::inotify::Inotify);

impl std::os::fd::AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsFd;
        self.0.as_fd().as_raw_fd()
    }
}

impl ExitWatch {
    /// Waits for the next batch of events; `false` when the watch is unusable.
    async fn changed(&mut self) -> bool {
        let Some(fd) = self.0.as_ref() else {
            return false;
        };
        loop {
            let Ok(mut guard) = fd.readable().await else {
                return false;
            };
            match guard.try_io(|fd| fd.get_ref().0.read_events().map_err(std::io::Error::from)) {
                Ok(Ok(_)) => return true,
                Ok(Err(_)) => return false,
                Err(_would_block) => continue,
            }
        }
    }
}

/// Watches `bundle` for new files; `None` when inotify is unavailable (then polling).
fn exit_watch(bundle: &Path) -> Option<ExitWatch> {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    let fd = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).ok()?;
    fd.add_watch(
        bundle,
        AddWatchFlags::IN_MOVED_TO | AddWatchFlags::IN_CLOSE_WRITE | AddWatchFlags::IN_ONLYDIR,
    )
    .ok()?;
    // SAFETY: the inotify fd is owned by the InotifyFd moved in, open and the same fd until
    // the AsyncFd drops it.
    unsafe { tokio::io::unix::AsyncFd::register(InotifyFd(fd)) }
        .ok()
        .map(|fd| ExitWatch(Some(fd)))
}

/// Removes a container's cgroup (off the async workers), logging a failure.
async fn remove_cgroup(layout: Layout, id: &str, cgroups_path: String) {
    let removed = tokio::task::spawn_blocking(move || cgroups::remove(layout, &cgroups_path)).await;
    if let Ok(Err(e)) = removed {
        tracing::warn!(%id, error = %e, "remove cgroup");
    }
}

/// Whether a directory name is a container id (64 lowercase hex digits).
fn is_id(name: &str) -> bool {
    name.len() == 64 && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Marks `rec` exited while its monitor was gone: the code cannot be known (containerd's 255
/// for an exit its shim did not see).
fn lost_exit(rec: &mut ContainerRecord) {
    tracing::warn!(id = %rec.id, "container stopped while its berth-monitor was gone; exit code unknown");
    rec.phase = Phase::Exited;
    rec.finished_at = ids::now_nanos();
    rec.exit_code = 255;
    rec.reason = "Error".to_string();
    rec.message = "the exit was not recorded: the pod's berth-monitor was gone".to_string();
}

/// The write that stores `rec`.
fn record_batch(rec: &ContainerRecord) -> Result<Batch, StoreError> {
    let mut b = Batch::new();
    b.put(Table::Containers, &rec.id, rec)?;
    Ok(b)
}

fn read_exit(path: &Path) -> Option<ExitInfo> {
    let bytes = std::fs::read(path).ok()?;
    serde_json::from_slice(&bytes).ok()
}

impl ContainerManager {
    /// Loads the containers and repairs what a crash left behind.
    pub async fn open(
        config: Config,
        store: Arc<Store>,
        images: Arc<ImageManager>,
        sandboxes: Arc<SandboxManager>,
        events: Arc<EventHub>,
    ) -> Result<ContainerManager, ContainerError> {
        let min_oom_score_adj = std::fs::read_to_string("/proc/self/oom_score_adj")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        let records: Vec<(String, ContainerRecord)> = store.all(Table::Containers)?;
        let mgr = ContainerManager {
            monitor_bin: monitor::default_monitor_path(),
            cdi: Arc::new(cdi::Registry::new(config.cdi.spec_dirs.clone())),
            config,
            store,
            images,
            sandboxes,
            index: Index::default(),
            locks: KeyedLocks::default(),
            layout: cgroups::detect(),
            min_oom_score_adj,
            exec_seq: std::sync::atomic::AtomicU64::new(0),
            events,
            deleting: std::sync::Mutex::new(Vec::new()),
            quiet: Arc::new(quiet::QuietGate::default()),
            launches: monitor::Launches::default(),
            undeleted: Arc::new(std::sync::Mutex::new(Vec::new())),
        };
        for (_, mut rec) in records {
            let removing = rec.bundle.join(REMOVING_MARK).exists();
            if rec.phase == Phase::Creating
                || removing
                || mgr.sandboxes.get(&rec.sandbox_id).is_err()
            {
                if removing {
                    tracing::info!(id = %rec.id, "finishing the removal of a container that a crash cut short");
                } else {
                    tracing::info!(id = %rec.id, "removing a container left half-made or orphaned by a crash");
                }
                mgr.remove_at_start(&rec).await?;
                continue;
            }
            mgr.images.hold(&rec.image_id, &rec.id);
            for v in &rec.image_volumes {
                mgr.images.hold(&v.image_id, &rec.id);
            }
            mgr.refresh(&mut rec).await?;
            if mgr.settle_created(&mut rec).await? == Settled::CutCreate {
                tracing::info!(id = %rec.id, "removing a container whose creation a crash cut short");
                // Its runtime's `create` may still run in the monitor: killed first.
                rec.phase = Phase::Creating;
                mgr.remove_at_start(&rec).await?;
                continue;
            }
            mgr.settle_lost_monitor(&mut rec).await?;
            let _ = mgr.index.reserve(&rec.name_key, &rec.id);
            mgr.index.insert(&rec.id.clone(), rec);
        }
        mgr.undo_unnamed().await;
        Ok(mgr)
    }

    /// At start: undoes the bundles and writable layers that no record names (containers a
    /// crash interrupted while they were made; after a power loss only their writable layers
    /// are left).
    async fn undo_unnamed(&self) {
        let known = self.index.ids();
        let bundles = self.config.state.join("containers");
        for e in std::fs::read_dir(&bundles).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if known.contains(&name) {
                // Its intent record (left in place) is stale: the record names it.
                continue;
            }
            if !is_id(&name) {
                continue;
            }
            let rec = match read_intent(&e.path()) {
                Some(rec) => rec,
                None => {
                    // Cut before or while its intent was written: the bundle directory, a torn
                    // intent record and the rootfs mount (made meanwhile) can exist. Never
                    // recurse into a mount.
                    if let Err(err) = rootfs::unmount_rootfs(&e.path().join("rootfs")) {
                        tracing::warn!(id = %name, error = %err, "unmount rootfs");
                    }
                    remove_bundle(&name, &e.path());
                    continue;
                }
            };
            tracing::info!(id = %rec.id, "removing a container left half-made by a crash");
            self.destroy(&rec).await;
        }
        // What a runtime still holds of containers no record names (a crash before a
        // removal's runtime delete ran): deleted, cgroups and all.
        for handler in self.config.runtimes.keys() {
            let Ok(runtime) = self.runtime(handler) else {
                continue;
            };
            for e in std::fs::read_dir(&runtime.root)
                .into_iter()
                .flatten()
                .flatten()
            {
                let name = e.file_name().to_string_lossy().into_owned();
                if is_id(&name) && !known.contains(&name) {
                    tracing::info!(id = %name, %handler, "deleting what the runtime holds of a container no record names");
                    if let Err(err) = runtime.delete(&name).await {
                        tracing::warn!(id = %name, error = %err, "runtime delete");
                    }
                }
            }
        }
        let layers = self.config.root.join("containers");
        for e in std::fs::read_dir(&layers).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if is_id(&name) && !known.contains(&name) {
                tracing::info!(id = %name, "removing the writable layer of a container no record names");
                if let Err(err) = rootfs::remove_rw(&self.config.root, &name) {
                    tracing::warn!(id = %name, error = %err, "remove writable layer");
                }
            }
        }
    }

    /// Takes a failed creation's record out of the store, if it got there: false when that
    /// failed (logged), and the record stays for start-up repair to undo (see
    /// `settle_created`: its bundle must stay too).
    async fn unstore(&self, id: &str) -> bool {
        if let Ok(None) = self.store.get::<ContainerRecord>(Table::Containers, id) {
            return true;
        }
        let mut b = Batch::new();
        b.delete(Table::Containers, id);
        match self.store.commit(b).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(%id, error = %e, "remove the record of a failed creation");
                false
            }
        }
    }

    /// Stores the record (durably; the fsync is waited for off the async workers).
    async fn persist(&self, rec: &ContainerRecord) -> Result<(), ContainerError> {
        self.store.commit(record_batch(rec)?).await?;
        Ok(())
    }

    /// Moves a running container to `Exited` when its monitor recorded the exit, or, when the
    /// monitor is gone (killed), once the container's init is gone too (exit code unknown);
    /// an exit is stored and told to the event subscribers. True when it just exited.
    async fn refresh(&self, rec: &mut ContainerRecord) -> Result<bool, ContainerError> {
        if !self.observe_exit(rec, false) {
            return Ok(false);
        }
        self.persist(rec).await?;
        self.publish_exit(rec);
        Ok(true)
    }

    /// [`Self::refresh`] for the synchronous paths (a status, a list, where an exit is mostly
    /// first seen: the kubelet lists every second): the commit is waited for on this thread
    /// (see [`Store::commit_blocking`]). `thorough` also tells a zombie init from a live one
    /// (for one container's status, not for lists).
    fn refresh_blocking(
        &self,
        rec: &mut ContainerRecord,
        thorough: bool,
    ) -> Result<bool, ContainerError> {
        if !self.observe_exit(rec, thorough) {
            return Ok(false);
        }
        self.store.commit_blocking(record_batch(rec)?)?;
        self.publish_exit(rec);
        Ok(true)
    }

    /// Applies to `rec` the exit its monitor recorded (or, with the monitor gone, an exit
    /// whose code is unknown): true when it exited just now (not yet stored).
    fn observe_exit(&self, rec: &mut ContainerRecord, thorough: bool) -> bool {
        if !matches!(rec.phase, Phase::Running | Phase::Created) {
            return false;
        }
        let Some(exit) = read_exit(&rec.exit_file()) else {
            if rec.phase == Phase::Running && self.orphan_gone(rec, thorough) {
                lost_exit(rec);
                return true;
            }
            return false;
        };
        if rec.phase == Phase::Created {
            // Created containers have an init waiting for `start`; an exit means it died.
            rec.started_at = rec.started_at.max(rec.created_at);
        }
        rec.phase = Phase::Exited;
        rec.exit_code = exit.exit_code;
        rec.finished_at = exit.finished_at;
        rec.reason = if exit.oom_killed {
            "OOMKilled".to_string()
        } else if exit.exit_code == 0 {
            "Completed".to_string()
        } else {
            "Error".to_string()
        };
        true
    }

    /// At start: undoes a container (removing its record, with a deleted event for the
    /// clients that knew it) that a crash left half-made, half-removed or without its pod.
    async fn remove_at_start(&self, rec: &ContainerRecord) -> Result<(), ContainerError> {
        self.destroy(rec).await;
        let mut b = Batch::new();
        b.delete(Table::Containers, &rec.id);
        self.store.commit(b).await?;
        // Replayed to the first subscribers (see crate::events): a client that knew the
        // container learns that it is gone.
        let pod = self.sandboxes.get(&rec.sandbox_id).ok();
        self.events.publish(
            EventKind::Deleted,
            &rec.id,
            &rec.sandbox_id,
            pod.as_ref(),
            None,
        );
        Ok(())
    }

    /// At start, for a container the store calls `Created`, what the runtime says of it:
    /// - running: a StartContainer started it, and its record (stored volatile) did not
    ///   outlive the crash. It is `Running`, started at the time its process began, as the
    ///   kernel tells it (the runtime's init, so about its creation; a start that the crash
    ///   did not let answer has no better figure).
    /// - created (or stopped, with the pod's monitor alive to record it): as stored. A record
    ///   stored while the runtime created the container has no pid: it is the runtime's.
    /// - unknown, with no pid stored and its bundle there: a CreateContainer that a crash cut
    ///   (the record is made while the runtime creates the container), or one whose failure
    ///   could not take its record out: [`Settled::CutCreate`]. (A container the runtime lost
    ///   otherwise while berthd was down, e.g. `runc delete` by hand, looks the same: it is
    ///   removed too, with a deleted event.)
    /// - otherwise (stopped with the pod's monitor gone, before or after a start whose record
    ///   was lost; unknown after a reboot): `Exited`, code unknown.
    async fn settle_created(&self, rec: &mut ContainerRecord) -> Result<Settled, ContainerError> {
        if rec.phase != Phase::Created {
            return Ok(Settled::Kept);
        }
        let st = match self.runtime(&rec.runtime_handler)?.state(&rec.id).await {
            Ok(Some(st)) if st.status == "running" => st,
            Ok(Some(st)) if st.status != "stopped" || self.monitor_alive(rec) => {
                if rec.pid == 0 {
                    rec.pid = st.pid;
                }
                return Ok(Settled::Kept);
            }
            // (Its bundle, made before the record, lasts one boot: gone after a reboot.)
            Ok(None) if rec.pid == 0 && rec.bundle.exists() => return Ok(Settled::CutCreate),
            Ok(_) => {
                // Stopped while nothing could record its exit (an exit file was read before
                // this), gone with a reboot, or deleted behind berthd's back.
                rec.started_at = rec.started_at.max(rec.created_at);
                self.store_lost_exit(rec).await?;
                return Ok(Settled::Kept);
            }
            Err(e) => {
                tracing::warn!(id = %rec.id, error = %e, "runtime state at start");
                return Ok(Settled::Kept);
            }
        };
        tracing::info!(id = %rec.id, "a container started before a crash is running");
        rec.phase = Phase::Running;
        rec.pid = st.pid;
        // (The kernel's figure is whole seconds of boot time plus ticks: never before the
        // creation that berthd timed.)
        rec.started_at = process_start_nanos(st.pid)
            .unwrap_or_else(now_nanos)
            .max(rec.created_at);
        self.persist(rec).await?;
        self.events.publish(
            EventKind::Started,
            &rec.id,
            &rec.sandbox_id,
            None,
            Some(rec),
        );
        Ok(Settled::Kept)
    }

    /// At start: a container still `Running` whose pod monitor is gone can no longer have its
    /// exit recorded. If the runtime says it stopped, it is `Exited` with an unknown code.
    async fn settle_lost_monitor(&self, rec: &mut ContainerRecord) -> Result<(), ContainerError> {
        // (a container of a pod that is gone is left to the pod's repair)
        if rec.phase != Phase::Running
            || self.sandboxes.get(&rec.sandbox_id).is_err()
            || self.monitor_alive(rec)
        {
            return Ok(());
        }
        let running = match self.runtime(&rec.runtime_handler)?.state(&rec.id).await {
            Ok(Some(st)) => st.status == "running",
            Ok(None) => false,
            Err(e) => {
                tracing::warn!(id = %rec.id, error = %e, "runtime state at start");
                return Ok(());
            }
        };
        if !running {
            self.store_lost_exit(rec).await?;
        }
        Ok(())
    }

    /// At start: records (and tells) an exit that nothing could record (see [`lost_exit`]).
    async fn store_lost_exit(&self, rec: &mut ContainerRecord) -> Result<(), ContainerError> {
        lost_exit(rec);
        self.persist(rec).await?;
        self.publish_exit(rec);
        Ok(())
    }

    /// Whether the pod's berth-monitor of a container is alive.
    fn monitor_alive(&self, rec: &ContainerRecord) -> bool {
        match self.sandboxes.get(&rec.sandbox_id) {
            Ok(sandbox) => monitor::running_pid(&self.monitor_dir(&sandbox)).is_some(),
            Err(_) => false,
        }
    }

    /// A running container whose monitor is gone (so no exit will ever be recorded) and whose
    /// init has ended: no such process, a zombie nobody reaps (the monitor was its reaper), or
    /// a pid reused outside the container's cgroup.
    fn orphan_gone(&self, rec: &ContainerRecord, thorough: bool) -> bool {
        rec.pid > 0 && !process_in_container(rec.pid, &rec.id, thorough) && !self.monitor_alive(rec)
    }

    /// Tells the event subscribers (and NRI plugins) of a stored exit.
    fn publish_exit(&self, rec: &ContainerRecord) {
        self.events.publish(
            EventKind::Stopped,
            &rec.id,
            &rec.sandbox_id,
            None,
            Some(rec),
        );
        // NRI's StopContainer for an exit however it was seen (once: see
        // `Nri::container_stopped`); StopContainer and RemoveContainer wait for it.
        if let Some(pod) = self.nri_pod(rec)
            && let Ok(handle) = tokio::runtime::Handle::try_current()
        {
            let (nri, ctr) = (
                self.nri().clone(),
                crate::nri::convert::container(rec, None),
            );
            let id = rec.id.clone();
            handle.spawn(
                async move { nri.container_stopped(&id, move || Some((pod, ctr))).await }
                    .in_current_span(),
            );
        }
    }

    fn nri(&self) -> &Arc<crate::nri::Nri> {
        self.sandboxes.nri()
    }

    /// The container's pod as NRI describes it, when plugins are connected.
    fn nri_pod(&self, rec: &ContainerRecord) -> Option<crate::nri::api::PodSandbox> {
        if !self.nri().active() {
            return None;
        }
        self.sandboxes
            .get(&rec.sandbox_id)
            .ok()
            .map(|sb| crate::nri::convert::pod(&sb))
    }

    /// Tells NRI plugins that the container stopped, once; waits for it to be told. The
    /// event is built only if it was not told yet (its exit notice usually told it).
    async fn nri_stopped(&self, rec: &ContainerRecord) {
        if !self.nri().active() {
            return;
        }
        self.nri()
            .container_stopped(&rec.id, || {
                let pod = self.nri_pod(rec)?;
                Some((pod, crate::nri::convert::container(rec, None)))
            })
            .await;
    }

    /// CreateContainer's NRI hook: plugins' adjustments applied to `spec`, their updates to
    /// other containers applied, their evictions carried out.
    async fn nri_adjust(
        &self,
        rec: &mut ContainerRecord,
        sandbox: &SandboxRecord,
        spec: &mut oci_spec::runtime::Spec,
        nri: &mut NriCreate,
    ) -> Result<(), ContainerError> {
        let pod = crate::nri::convert::pod(sandbox);
        let ctr = crate::nri::convert::container(rec, Some(spec));
        // From here plugins may hold something for it: a failure tells them it is gone.
        nri.pod = Some(pod.clone());
        let result = {
            let (base, record, min) = (&*spec, &*rec, self.min_oom_score_adj);
            self.nri()
                .create_container(&pod, &ctr, |merged| {
                    let mut s = base.clone();
                    merged.apply(&mut s, min).ok()?;
                    Some(crate::nri::convert::container(record, Some(&s)))
                })
                .await?
        };
        nri.updates = result.updates;
        nri.evictions = result.evictions;
        if !result.adjust.is_empty() {
            let applied = result
                .adjust
                .apply(spec, self.min_oom_score_adj)
                .map_err(|reason| ContainerError::Invalid(format!("NRI adjustment: {reason}")))?;
            if !applied.cdi_devices.is_empty() {
                let registry = self.cdi.clone();
                let names = applied.cdi_devices.clone();
                let resolved = tokio::task::spawn_blocking(move || registry.resolve(&names))
                    .await
                    .map_err(task_err("resolving CDI devices"))??;
                resolved.apply(spec)?;
            }
            if let Some(path) = applied.cgroups_path {
                rec.cgroups_path = path;
            }
        }
        Ok(())
    }

    /// The updates and evictions plugins asked for at a CreateContainer.
    async fn nri_aftermath(&self, nri: NriCreate) {
        if !nri.updates.is_empty() {
            self.nri_updates(nri.updates).await;
        }
        if !nri.evictions.is_empty() {
            self.nri_evict(nri.evictions).await;
        }
    }

    /// Plugins' resource updates to existing containers; answers those that failed and
    /// did not allow it.
    async fn nri_updates(
        &self,
        updates: Vec<crate::nri::api::ContainerUpdate>,
    ) -> Vec<crate::nri::api::ContainerUpdate> {
        let mut failed = Vec::new();
        for u in updates {
            let result = async {
                let rec = self.get(&u.container_id)?;
                let mut res = rec
                    .config
                    .linux
                    .as_ref()
                    .and_then(|l| l.resources.clone())
                    .unwrap_or_default();
                if let Some(r) = u.linux.as_ref().and_then(|l| l.resources.as_ref()) {
                    crate::nri::adjust::update_cri_resources(r, &mut res);
                }
                self.apply_resources(&rec.id, res).await
            }
            .await;
            if let Err(e) = result {
                tracing::warn!(container = %u.container_id, error = %e, "NRI: container update failed");
                if !u.ignore_failure {
                    failed.push(u);
                }
            }
        }
        failed
    }

    /// Plugins' evictions: each container is stopped.
    async fn nri_evict(&self, evictions: Vec<crate::nri::api::ContainerEviction>) {
        for e in evictions {
            tracing::info!(container = %e.container_id, reason = %e.reason, "NRI: evicting a container");
            if let Err(err) = self.stop(&e.container_id, 0).await {
                tracing::warn!(container = %e.container_id, error = %err, "NRI: eviction failed");
            }
        }
    }

    /// Resolves a full id or a unique prefix.
    pub fn resolve_id(&self, id: &str) -> Result<String, ContainerError> {
        if id.is_empty() {
            return Err(ContainerError::Invalid(
                "a container id is required".to_string(),
            ));
        }
        match self.index.lookup(id) {
            Lookup::Found(id) => {
                if let Some(rec) = self.index.get(&id) {
                    self.sandboxes.note_in_span(&rec.sandbox_id);
                    rec.note_in_span();
                }
                Ok(id)
            }
            Lookup::Ambiguous => Err(ContainerError::Ambiguous(id.to_string())),
            Lookup::Missing => Err(ContainerError::NotFound(id.to_string())),
        }
    }

    /// The current record (exits noticed); the container is noted in the RPC's span.
    pub fn get(&self, id: &str) -> Result<ContainerRecord, ContainerError> {
        let id = self.resolve_id(id)?;
        self.get_refreshed(&id, true)
    }

    /// [`Self::get`] of a full id, not noted in the RPC's span (for lists).
    fn get_full(&self, id: &str) -> Result<ContainerRecord, ContainerError> {
        self.get_refreshed(id, false)
    }

    fn get_refreshed(&self, id: &str, thorough: bool) -> Result<ContainerRecord, ContainerError> {
        let id = id.to_string();
        let mut rec = self
            .index
            .get(&id)
            .ok_or_else(|| ContainerError::NotFound(id.clone()))?;
        if self.refresh_blocking(&mut rec, thorough)? {
            self.index.insert(&id, rec.clone());
        }
        Ok(rec)
    }

    pub fn list(&self) -> Vec<ContainerRecord> {
        self.list_map(|r| Some(r.clone()))
    }

    /// What `f` makes of each container (refreshed like [`Self::get`]), oldest first. Only
    /// the records that may have ended are refreshed (and cloned); `f` sees the others in
    /// place, so a list of a full node costs a stat and a kill(0) per running container.
    pub fn list_map<T>(&self, mut f: impl FnMut(&ContainerRecord) -> Option<T>) -> Vec<T> {
        let live = self.index.filter_map(|r| {
            matches!(r.phase, Phase::Running | Phase::Created)
                .then(|| (r.id.clone(), r.exit_file(), r.phase, r.pid))
        });
        for (id, exit_file, phase, pid) in live {
            let gone = phase == Phase::Running && pid > 0 && !process_in_container(pid, &id, false);
            if gone || exit_file.exists() {
                let _ = self.get_full(&id);
            }
        }
        let mut v = self.index.filter_map(|r| f(r).map(|t| (r.created_at, t)));
        v.sort_by_key(|(at, _)| *at);
        v.into_iter().map(|(_, t)| t).collect()
    }

    /// The containers of one pod (refreshed like [`Self::get`]), oldest first.
    pub fn list_pod(&self, sandbox_id: &str) -> Vec<ContainerRecord> {
        let mut v: Vec<ContainerRecord> = self
            .in_pod(sandbox_id)
            .iter()
            .filter_map(|id| self.get_full(id).ok())
            .collect();
        v.sort_by_key(|r| r.created_at);
        v
    }

    fn runtime(&self, handler: &str) -> Result<OciRuntime, ContainerError> {
        OciRuntime::for_handler(&self.config, handler).map_err(ContainerError::from)
    }

    fn monitor_dir(&self, sandbox: &SandboxRecord) -> PathBuf {
        sandbox.dir.join("monitor")
    }

    async fn connect_monitor(
        &self,
        sandbox: &SandboxRecord,
    ) -> Result<monitor::MonitorClient, MonitorError> {
        monitor::MonitorClient::connect(&self.monitor_dir(sandbox).join(monitor::SOCKET_NAME)).await
    }

    /// CreateContainer. The work runs in a task of its own, so that it is never cut off half
    /// way (leaving mounts and a reserved name behind): when the caller stops waiting (the
    /// client's deadline passed), a runtime `create` still running is killed and what was
    /// made is undone, and a container finished meanwhile is removed again.
    pub async fn create(
        self: &Arc<Self>,
        sandbox_id: &str,
        config: cri::ContainerConfig,
    ) -> Result<ContainerRecord, ContainerError> {
        // Dropped with this future: the task sees its receiver fail.
        let (_caller_waits, caller_gone) = tokio::sync::oneshot::channel::<()>();
        let me = self.clone();
        let sandbox_id = sandbox_id.to_string();
        tokio::spawn(
            async move { me.create_in_task(&sandbox_id, config, caller_gone).await }
                .in_current_span(),
        )
        .await
        .map_err(task_err("container creation task"))?
    }

    async fn create_in_task(
        &self,
        sandbox_id: &str,
        config: cri::ContainerConfig,
        mut caller_gone: tokio::sync::oneshot::Receiver<()>,
    ) -> Result<ContainerRecord, ContainerError> {
        let sandbox = self.sandboxes.get(sandbox_id)?;
        if sandbox.phase != PodPhase::Ready {
            return Err(ContainerError::SandboxNotReady(sandbox.id.clone()));
        }
        let meta = config
            .metadata
            .clone()
            .ok_or_else(|| ContainerError::Invalid("metadata is required".to_string()))?;
        if meta.name.is_empty() {
            return Err(ContainerError::Invalid(
                "metadata name is required".to_string(),
            ));
        }
        let image_name = config
            .image
            .as_ref()
            .map(|i| i.image.clone())
            .unwrap_or_default();
        if image_name.is_empty() {
            return Err(ContainerError::Invalid("an image is required".to_string()));
        }
        let image = self
            .images
            .resolve(&image_name)
            .ok_or_else(|| ContainerError::ImageNotFound(image_name.clone()))?;
        let image_config = self.images.config_json(&image)?;
        let lower = self.images.snapshot_dirs(&image)?;
        // Every mount is checked before anything is made.
        let work = spec::mounts::host_work(&config, &image_config)?;
        let cdi_devices = self.cdi_devices(&config).await?;
        let stop_signal =
            super::signal::effective(&config, &image_config).map_err(ContainerError::Invalid)?;
        let parent = sandbox
            .config
            .linux
            .as_ref()
            .map(|l| l.cgroup_parent.clone())
            .unwrap_or_default();
        let key = format!("{}/{}_{}", sandbox.id, meta.name, meta.attempt);
        let id = ids::new_id().map_err(io_err("read /dev/urandom"))?;
        crate::span::note_container(&id, &meta.name, sandbox_id);
        let cgroups_path = cgroups::cgroups_path(
            self.config.cgroup_driver == crate::config::CgroupDriver::Systemd,
            &parent,
            &id,
        )?;
        if let Err(holder) = self.index.reserve(&key, &id) {
            return Err(ContainerError::NameReserved {
                name: key,
                id: holder,
            });
        }
        let _lock = self.locks.lock(&id).await;
        let log_path = match (&sandbox.config.log_directory, &config.log_path) {
            (d, p) if !d.is_empty() && !p.is_empty() => {
                Some(Path::new(d).join(relative_log_path(p)?))
            }
            _ => None,
        };
        let mut rec = ContainerRecord {
            id: id.clone(),
            sandbox_id: sandbox.id.clone(),
            name_key: key.clone(),
            phase: Phase::Creating,
            config,
            image_id: image.id.clone(),
            image_name,
            image_ref: image
                .repo_digests
                .first()
                .cloned()
                .unwrap_or_else(|| image.id.clone()),
            runtime_handler: sandbox.runtime_handler.clone(),
            cgroups_path,
            bundle: self.config.state.join("containers").join(&id),
            log_path,
            pid: 0,
            created_at: now_nanos(),
            started_at: 0,
            finished_at: 0,
            exit_code: 0,
            reason: String::new(),
            message: String::new(),
            stop_signal: Some(stop_signal),
            user: None,
            own_pid_ns: false,
            image_volumes: Vec::new(),
        };
        // No NRI plugin is synchronized between the container's hook and its listing.
        let nri_sync = self.nri().block_sync().await;
        let mut nri_create = NriCreate::default();
        let mut made = self
            .make(
                &mut rec,
                MakeInputs {
                    sandbox: &sandbox,
                    nri: &mut nri_create,
                    image_config: &image_config,
                    lower: &lower,
                    work: &work,
                    cdi_devices: &cdi_devices,
                },
                &mut caller_gone,
            )
            .await;
        if made.is_ok()
            && matches!(
                caller_gone.try_recv(),
                Err(tokio::sync::oneshot::error::TryRecvError::Closed)
            )
        {
            // Nobody learns its id: a kubelet would only find its name taken when it tries
            // again. Removed like a failed create (the store's record too).
            made = Err(ContainerError::Cancelled);
        }
        match made {
            Ok(()) => {
                self.index.insert(&id, rec.clone());
                drop(nri_sync);
                self.events.publish(
                    EventKind::Created,
                    &rec.id,
                    &rec.sandbox_id,
                    None,
                    Some(&rec),
                );
                if let Some(pod) = &nri_create.pod {
                    let ctr = crate::nri::convert::container(&rec, None);
                    self.nri().post_create_container(pod, &ctr).await;
                }
                self.nri_aftermath(nri_create).await;
                Ok(rec)
            }
            Err(e) => {
                tracing::warn!(id = %rec.id, error = %e, "container creation failed; undoing it");
                // The record made while the runtime created it goes first: from then on only
                // the intent record names the container, and a crash leaves it to start-up
                // repair like any half-made container.
                if self.unstore(&rec.id).await {
                    self.destroy(&rec).await;
                } else {
                    // The bundle (with the intent record) stays, so that start-up repair
                    // undoes the record as a cut create rather than call it exited.
                    self.undo(&rec, true, false).await;
                }
                self.index.release(&key);
                drop(nri_sync);
                // Plugins that saw it made hear that it is gone.
                if let Some(pod) = &nri_create.pod {
                    let ctr = crate::nri::convert::container(&rec, None);
                    self.nri()
                        .container_stopped(&rec.id, || Some((pod.clone(), ctr.clone())))
                        .await;
                    self.nri().remove_container(pod, &ctr).await;
                    self.nri().forget(&rec.id);
                }
                self.nri_aftermath(nri_create).await;
                Err(e)
            }
        }
    }

    async fn make(
        &self,
        rec: &mut ContainerRecord,
        inputs: MakeInputs<'_>,
        caller_gone: &mut tokio::sync::oneshot::Receiver<()>,
    ) -> Result<(), ContainerError> {
        let MakeInputs {
            sandbox,
            nri,
            image_config,
            lower,
            work,
            cdi_devices,
        } = inputs;
        let t0 = std::time::Instant::now();
        let mark = |step: &str| {
            tracing::debug!(
                step,
                ms = t0.elapsed().as_secs_f64() * 1000.0,
                "container creation"
            )
        };
        // The pod's monitor is reached (after its launch ahead, or launched here if none
        // runs: a few ms) while the rootfs, volumes and spec are made; the create waits for it
        // below.
        let monitor = self.launches.reach(
            &sandbox.id,
            self.monitor_dir(sandbox),
            self.monitor_bin.clone(),
        );
        // Held until removal: RemoveImage must not take an image a container uses.
        if self.images.acquire(&rec.image_id, &rec.id).await.is_none() {
            return Err(ContainerError::ImageNotFound(rec.image_name.clone()));
        }
        let mut images = Vec::new();
        for (index, name, sub_path) in &work.images {
            let img = self
                .images
                .acquire(name, &rec.id)
                .await
                .ok_or_else(|| ContainerError::ImageNotFound(name.clone()))?;
            images.push(volumes::ImageMount {
                index: *index,
                image: img.id.clone(),
                lower_dirs: self.images.snapshot_dirs(&img)?,
                sub_path: sub_path.clone(),
            });
            rec.image_volumes.push(ImageVolume {
                index: *index,
                image_ref: img.id.clone(),
                image_id: img.id,
            });
        }
        std::fs::create_dir_all(&rec.bundle)
            .map_err(io_err(format!("create {}", rec.bundle.display())))?;
        // The rootfs is mounted while the intent record is written (a crash in between
        // leaves a bundle without one: start-up repair unmounts what is mounted in it).
        let mounting = {
            let (root, id, lower, target) = (
                self.config.root.clone(),
                rec.id.clone(),
                lower.to_vec(),
                rec.rootfs(),
            );
            tokio::task::spawn_blocking(move || rootfs::mount_rootfs(&root, &id, &lower, &target))
        };
        let intent = write_intent(rec);
        mark("record");
        // Both end before any error returns: the caller's undo must not race the mount.
        let mounted = mounting.await.map_err(task_err("mounting the rootfs"))?;
        intent?;
        mounted?;
        mark("rootfs");
        let plan = volumes::Plan {
            mounts_dir: volumes::mounts_dir(&rec.bundle),
            volumes_dir: rootfs::rw_dir(&self.config.root, &rec.id).join("volumes"),
            rootfs: rec.rootfs(),
            recursive_read_only: work.recursive_read_only.clone(),
            images,
            declared_volumes: work.declared_volumes.clone(),
        };
        let prepared = tokio::task::spawn_blocking(move || volumes::prepare(&plan))
            .await
            .map_err(task_err("preparing volumes"))??;
        mark("volumes");
        let requested_oom = rec
            .config
            .linux
            .as_ref()
            .and_then(|l| l.resources.as_ref())
            .map(|r| r.oom_score_adj)
            .unwrap_or(0);
        if requested_oom < i64::from(self.min_oom_score_adj)
            && !OOM_CLAMP_LOGGED.swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::info!(
                requested = requested_oom,
                used = self.min_oom_score_adj,
                "oom_score_adj below berthd's own is raised to it (restrict_oom_score_adj); logged once"
            );
        }
        let pod_pid_ns = sandbox
            .init
            .filter(|i| i.alive())
            .map(|i| PathBuf::from(format!("/proc/{}/ns/pid", i.pid)));
        let input = SpecInput {
            container_id: &rec.id,
            config: &rec.config,
            sandbox,
            image_config,
            rootfs: &rec.rootfs(),
            cgroups_path: rec.cgroups_path.clone(),
            pod_pid_ns,
            pod_shm: sandbox.shm_path(),
            min_oom_score_adj: self.min_oom_score_adj,
            prepared: &prepared,
        };
        let mut spec = spec::build_spec(&input)?;
        cdi_devices.apply(&mut spec)?;
        if self.nri().active() {
            self.nri_adjust(rec, sandbox, &mut spec, nri).await?;
            mark("nri");
        }
        let command = spec
            .process()
            .as_ref()
            .and_then(|p| p.args().as_ref())
            .and_then(|a| a.first().cloned())
            .unwrap_or_default();
        rec.own_pid_ns = spec
            .linux()
            .as_ref()
            .and_then(|l| l.namespaces().as_ref())
            .is_some_and(|ns| {
                ns.iter().any(|n| {
                    n.typ() == oci_spec::runtime::LinuxNamespaceType::Pid && n.path().is_none()
                })
            });
        rec.user = spec.process().as_ref().map(|p| ProcessUser {
            uid: p.user().uid(),
            gid: p.user().gid(),
            groups: p.user().additional_gids().clone().unwrap_or_default(),
        });
        let json = serde_json::to_vec(&spec).map_err(|e| ContainerError::Io {
            context: "encode config.json".to_string(),
            source: std::io::Error::other(e),
        })?;
        std::fs::write(rec.bundle.join("config.json"), json)
            .map_err(io_err("write config.json"))?;
        mark("spec");
        let runtime = self.runtime(&rec.runtime_handler)?;
        std::fs::create_dir_all(&runtime.root).map_err(io_err("create runtime root"))?;
        let mut client = monitor
            .await
            .map_err(task_err("reaching the pod's monitor"))??;
        // The monitor kills a `create` that takes longer than the runtime's timeout and says
        // so; berthd waits a little longer for that answer.
        client.set_timeouts(
            runtime.timeout + CREATE_ANSWER_MARGIN,
            monitor::client::REQUEST_TIMEOUT,
        );
        mark("monitor");
        let log_path = rec
            .log_path
            .clone()
            .unwrap_or_else(|| rec.bundle.join("container.log"));
        let create = client.create(CreateRequest {
            id: rec.id.clone(),
            runtime: runtime.binary.clone(),
            runtime_root: runtime.root.clone(),
            systemd_cgroup: runtime.systemd_cgroup,
            bundle: rec.bundle.clone(),
            log_path,
            exit_file: rec.exit_file(),
            cgroup_oom_files: cgroups::oom_files(self.layout, &rec.cgroups_path),
            stdin: rec.config.stdin,
            tty: rec.config.tty,
            timeout_ms: u64::try_from(runtime.timeout.as_millis()).unwrap_or(u64::MAX),
        });
        // The one durable commit is made while the runtime creates the container, so that
        // its fsync costs the RPC nothing: from its end on, the record names the container as
        // created, with no pid yet (start-up repair asks the runtime for it, and undoes the
        // container when the runtime does not have it: a create that a crash cut). On
        // failure the caller takes the record out again.
        let commit = {
            let mut named = rec.clone();
            named.phase = Phase::Created;
            let (store, batch) = (Arc::clone(&self.store), record_batch(&named)?);
            tokio::spawn(async move { store.commit(batch).await })
        };
        let created = tokio::select! {
            created = create => Some(created),
            // The create's connection is dropped with it; the caller's cleanup has the
            // monitor kill the runtime (`forget`) before anything else is undone.
            _ = &mut *caller_gone => None,
        };
        // Waited for in every case: the caller's cleanup deletes the record after it.
        commit
            .await
            .map_err(task_err("storing the container's record"))??;
        let Some(created) = created else {
            return Err(ContainerError::Cancelled);
        };
        let pid = created.map_err(|e| match e {
            MonitorError::Remote {
                kind: monitor::proto::ErrorKind::Timeout,
                ..
            } => ContainerError::Runtime(RuntimeError::Timeout {
                runtime: runtime.handler.clone(),
                command: "create",
                after: runtime.timeout,
            }),
            // What the runtime said, named after its handler and the step.
            MonitorError::Remote {
                kind: monitor::proto::ErrorKind::Runtime,
                message,
                ..
            } => not_found_or(
                &message,
                &command,
                ContainerError::Runtime(RuntimeError::Failed {
                    runtime: runtime.handler.clone(),
                    command: "create",
                    message: message.clone(),
                }),
            ),
            MonitorError::Remote { ref message, .. } => {
                let message = message.clone();
                not_found_or(&message, &command, e.into())
            }
            e => e.into(),
        })?;
        mark("runtime create");
        // The container's mount namespace holds its own copies of the staged mounts now;
        // berthd's are let go, so that nothing of the host's paths stays busy here (a host
        // dir under a recursive read-only mount can be unmounted and removed by its owner).
        let bundle = rec.bundle.clone();
        match tokio::task::spawn_blocking(move || volumes::release(&bundle)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(id = %rec.id, error = %e, "release staged mounts"),
            Err(e) => tracing::warn!(id = %rec.id, error = %e, "release staged mounts"),
        }
        rec.pid = pid;
        rec.phase = Phase::Created;
        mark("created");
        // The intent record stays (stale, ignored) until the bundle goes with the container.
        Ok(())
    }

    /// The CDI devices a container config asks for, resolved now (checked before anything
    /// is made for the container).
    async fn cdi_devices(
        &self,
        config: &cri::ContainerConfig,
    ) -> Result<cdi::Resolved, ContainerError> {
        if !self.config.cdi.enabled {
            if cdi::has_requests(config) {
                tracing::warn!(
                    "CDI is disabled ([cdi] enabled = false); ignoring the CDI devices requested"
                );
            }
            return Ok(cdi::Resolved::default());
        }
        let names = cdi::requested_devices(config)?;
        if names.is_empty() {
            return Ok(cdi::Resolved::default());
        }
        // Reads and parses every spec file: off the async workers.
        let registry = self.cdi.clone();
        Ok(
            tokio::task::spawn_blocking(move || registry.resolve(&names))
                .await
                .map_err(task_err("resolving CDI devices"))??,
        )
    }

    /// Starts a ready pod's monitor in the background (RunPodSandbox), so that its first
    /// CreateContainer finds it listening (see [`monitor::Launches`]).
    pub fn start_monitor_ahead(&self, sandbox: &SandboxRecord) {
        self.launches.start(
            &sandbox.id,
            self.monitor_dir(sandbox),
            self.monitor_bin.clone(),
        );
    }

    /// Has the pod's monitor drop (and, while it is being created, kill) a container.
    async fn forget_in_monitor(&self, rec: &ContainerRecord) {
        if let Ok(sandbox) = self.sandboxes.get(&rec.sandbox_id)
            && let Ok(mut client) = self.connect_monitor(&sandbox).await
            && let Err(e) = client.forget(&rec.id).await
            && !e.is_not_found()
        {
            tracing::warn!(id = %rec.id, error = %e, "monitor forget");
        }
    }

    /// Undoes whatever a container may hold (best effort, logged).
    async fn destroy(&self, rec: &ContainerRecord) {
        self.undo(rec, true, true).await;
    }

    /// [`Self::destroy`], but with `runtime_too` false the runtime's delete and the cgroup's
    /// removal are left to the caller (see [`Self::delete_later`]), and with `bundle_too`
    /// false the bundle (with its marks) is kept for the caller to remove after the record.
    async fn undo(&self, rec: &ContainerRecord, runtime_too: bool, bundle_too: bool) {
        let t0 = std::time::Instant::now();
        // A container being made may still have its runtime's `create` running in the
        // monitor: `forget` kills it and answers once it is gone, so that the runtime's
        // delete below does not race a create that goes on.
        let creating = rec.phase == Phase::Creating;
        if creating {
            self.forget_in_monitor(rec).await;
        }
        if runtime_too && let Ok(runtime) = self.runtime(&rec.runtime_handler) {
            // A stopped container needs no kill: `delete` kills what is left in its cgroup
            // (when it shares the pod's PID namespace). One that may still run is killed
            // first (runc's `delete --force` of a running container polls for its end).
            if rec.phase != Phase::Exited {
                let _ = runtime.kill(&rec.id, libc::SIGKILL, true).await;
            }
            if let Err(e) = runtime.delete(&rec.id).await {
                tracing::warn!(id = %rec.id, error = %e, "runtime delete");
            }
        }
        step_done("container teardown", "runtime delete", t0);
        if !creating {
            self.forget_in_monitor(rec).await;
        }
        step_done("container teardown", "monitor forget", t0);
        // Unmounts, tree removals and cgroup rmdirs: off the async workers.
        let id = rec.id.clone();
        let (rec, root, layout) = (rec.clone(), self.config.root.clone(), self.layout);
        let undone = tokio::task::spawn_blocking(move || {
            if let Err(e) = rootfs::unmount_rootfs(&rec.rootfs()) {
                tracing::warn!(id = %rec.id, error = %e, "unmount rootfs");
            }
            if let Err(e) = volumes::release(&rec.bundle) {
                tracing::warn!(id = %rec.id, error = %e, "release volume mounts");
            }
            if let Err(e) = rootfs::remove_rw(&root, &rec.id) {
                tracing::warn!(id = %rec.id, error = %e, "remove writable layer");
            }
            if runtime_too && let Err(e) = cgroups::remove(layout, &rec.cgroups_path) {
                tracing::warn!(id = %rec.id, error = %e, "remove cgroup");
            }
            if bundle_too {
                remove_bundle(&rec.id, &rec.bundle);
            }
        })
        .await;
        if let Err(e) = undone {
            tracing::warn!(%id, error = %e, "container teardown task failed");
        }
        step_done("container teardown", "mounts and dirs", t0);
        // Its images may go only once nothing of them is mounted for it.
        self.images.release(&id);
    }

    /// StartContainer.
    pub async fn start(&self, id: &str) -> Result<(), ContainerError> {
        let id = self.resolve_id(id)?;
        let t0 = std::time::Instant::now();
        let _lock = self.locks.lock(&id).await;
        let mut rec = self.get(&id)?;
        if rec.phase != Phase::Created {
            return Err(ContainerError::WrongState {
                id,
                state: rec.state_name(),
                what: "only a created container can be started",
            });
        }
        step_done("container start", "record read", t0);
        let runtime = self.runtime(&rec.runtime_handler)?;
        // NRI plugins may refuse the start (the container stays created).
        // The spec is read once for both of its NRI events.
        let nri_event = self.nri_pod(&rec).map(|pod| {
            let spec = oci_spec::runtime::Spec::load(rec.bundle.join("config.json")).ok();
            (pod, spec)
        });
        if let Some((pod, spec)) = &nri_event {
            let ctr = crate::nri::convert::container(&rec, spec.as_ref());
            self.nri().start_container(pod, &ctr).await?;
            step_done("container start", "nri", t0);
        }
        // Taken before `start`: a quick process may exit before `start` returns.
        let started_at = now_nanos();
        let result = runtime.start(&rec.id).await.map_err(|e| {
            let message = match &e {
                RuntimeError::Failed { message, .. } => message.clone(),
                _ => String::new(),
            };
            not_found_or(&message, &bundle_command(&rec.bundle), e.into())
        });
        step_done("container start", "runtime start", t0);
        match result {
            Ok(()) => {
                rec.phase = Phase::Running;
                rec.started_at = started_at;
                // Not durable on its own (it is with the next durable commit): a crash that
                // loses it leaves the container `Created` in the store, and start-up repair
                // finds it running in the runtime's state (see `settle_created`).
                self.store.commit_volatile(record_batch(&rec)?)?;
                step_done("container start", "record", t0);
                self.index.insert(&id, rec.clone());
                self.events
                    .publish(EventKind::Started, &id, &rec.sandbox_id, None, Some(&rec));
                if let Some((pod, spec)) = &nri_event {
                    let ctr = crate::nri::convert::container(&rec, spec.as_ref());
                    self.nri().post_start_container(pod, &ctr).await;
                }
                Ok(())
            }
            Err(e) => {
                // Whatever the runtime left of it (a start that timed out may have started
                // it, and a created init waits) does not run on as an exited container.
                if let Err(kill) = runtime.kill(&rec.id, libc::SIGKILL, true).await {
                    tracing::warn!(%id, error = %kill, "kill after a failed start");
                }
                rec.phase = Phase::Exited;
                rec.started_at = now_nanos();
                rec.finished_at = rec.started_at;
                rec.exit_code = 128;
                rec.reason = "StartError".to_string();
                rec.message = e.to_string();
                self.persist(&rec).await?;
                self.index.insert(&id, rec.clone());
                self.events
                    .publish(EventKind::Stopped, &id, &rec.sandbox_id, None, Some(&rec));
                Err(e)
            }
        }
    }

    /// Waits until the container's exit is recorded, up to `timeout`: woken by the monitor's
    /// exit notice (the exit file renamed into the bundle, seen through inotify), with a slow
    /// poll behind it in case the watch cannot be made or misses.
    async fn wait_exit(&self, rec: &ContainerRecord, timeout: Duration) -> bool {
        let file = rec.exit_file();
        if file.exists() {
            return true;
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let mut watch = exit_watch(&rec.bundle);
        loop {
            // Checked after the watch exists: an exit recorded before it is not missed.
            if file.exists() {
                return true;
            }
            // No monitor to record it: the exit is the init's disappearance (see `refresh`).
            if self.orphan_gone(rec, true) {
                return true;
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return false;
            }
            let nap = (deadline - now).min(EXIT_POLL);
            match watch.as_mut() {
                Some(w) => {
                    if tokio::time::timeout(nap, w.changed())
                        .await
                        .is_ok_and(|ok| !ok)
                    {
                        watch = None;
                    }
                }
                None => tokio::time::sleep(nap).await,
            }
        }
    }

    /// Sends `signal` to the container's init straight through a pidfd, without running
    /// the OCI runtime. Only for an init still running in the container's cgroup (its pid
    /// cannot have been reused: the pidfd pins the process, and it is checked to be in the
    /// cgroup named after the container). `false` when that cannot be done (then the
    /// runtime's `kill` is the way).
    fn signal_init(&self, rec: &ContainerRecord, signal: i32) -> bool {
        if rec.pid <= 0 {
            return false;
        }
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, rec.pid, 0) };
        if fd < 0 {
            return false;
        }
        // SAFETY: the kernel just returned this fd to us; nothing else owns it.
        let fd =
            unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
        let in_cgroup = std::fs::read_to_string(format!("/proc/{}/cgroup", rec.pid))
            .is_ok_and(|c| c.contains(rec.id.as_str()));
        if !in_cgroup {
            return false;
        }
        use std::os::fd::AsRawFd;
        // SAFETY: pidfd_send_signal on the pidfd we own, no siginfo, no flags.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                fd.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        // ESRCH: it exited meanwhile, which is what a stop wants anyway.
        r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
    }

    /// StopContainer: the image's stop signal (or SIGTERM), SIGKILL after `timeout` seconds.
    pub async fn stop(&self, id: &str, timeout_secs: i64) -> Result<(), ContainerError> {
        let id = match self.resolve_id(id) {
            Ok(id) => id,
            // Idempotent: a container that is gone is stopped.
            Err(ContainerError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        let _lock = self.locks.lock(&id).await;
        self.stop_locked(&id, timeout_secs).await
    }

    async fn stop_locked(&self, id: &str, timeout_secs: i64) -> Result<(), ContainerError> {
        let mut rec = self.get(id)?;
        if rec.phase != Phase::Running && rec.phase != Phase::Created {
            return Ok(());
        }
        self.quiet.touch();
        let t0 = std::time::Instant::now();
        let runtime = self.runtime(&rec.runtime_handler)?;
        if timeout_secs > 0 && rec.phase == Phase::Running {
            let sig = rec.stop_signal.unwrap_or(libc::SIGTERM);
            if !self.signal_init(&rec, sig) {
                runtime.kill(&rec.id, sig, false).await?;
            }
            if self
                .wait_exit(&rec, Duration::from_secs(timeout_secs as u64))
                .await
            {
                self.refresh(&mut rec).await?;
                self.index.insert(&rec.id.clone(), rec.clone());
                self.nri_stopped(&rec).await;
                return Ok(());
            }
        }
        // The init of a PID namespace of its own takes every process of it along, whether it
        // is the container's process or, in a container not started yet, the runtime's init
        // waiting for `start`; else the runtime kills each process of the container's cgroup
        // (`kill --all`, about 10 ms of runc's, more on a node with many mounts: a hook or a
        // start whose record was lost may have left more than the init in it).
        let direct = rec.own_pid_ns && self.signal_init(&rec, libc::SIGKILL);
        if !direct {
            runtime.kill(&rec.id, libc::SIGKILL, true).await?;
        }
        step_done("container stop", "killed", t0);
        if !self.wait_exit(&rec, Duration::from_secs(10)).await {
            tracing::warn!(id = %rec.id, "no exit recorded 10s after SIGKILL");
        }
        step_done("container stop", "exited", t0);
        self.refresh(&mut rec).await?;
        step_done("container stop", "record", t0);
        self.index.insert(&rec.id.clone(), rec.clone());
        self.nri_stopped(&rec).await;
        Ok(())
    }

    /// RemoveContainer: stops it if needed; an unknown id is fine.
    pub async fn remove(&self, id: &str) -> Result<(), ContainerError> {
        let id = match self.resolve_id(id) {
            Ok(id) => id,
            Err(ContainerError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        let _lock = self.locks.lock(&id).await;
        if self.index.get(&id).is_none() {
            return Ok(());
        }
        self.stop_locked(&id, 0).await?;
        let Some(rec) = self.index.get(&id) else {
            return Ok(());
        };
        // Read before the bundle goes.
        let nri_event = self
            .nri_pod(&rec)
            .map(|pod| (pod, crate::nri::convert::container(&rec, None)));
        if let Some((pod, ctr)) = &nri_event {
            self.nri()
                .container_stopped(&id, || Some((pod.clone(), ctr.clone())))
                .await;
        }
        self.quiet.touch();
        let t0 = std::time::Instant::now();
        // A bundle that is gone (a reboot emptied `state`) needs no mark: nothing is left in it.
        match std::fs::write(rec.bundle.join(REMOVING_MARK), b"") {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            r => r.map_err(io_err("mark the container as being removed"))?,
        }
        // A stopped container: everything but the runtime's own state goes now.
        let stopped = rec.phase == Phase::Exited;
        self.undo(&rec, !stopped, false).await;
        step_done("container removal", "destroyed", t0);
        let mut b = Batch::new();
        b.delete(Table::Containers, &id);
        self.store.commit(b).await?;
        step_done("container removal", "record", t0);
        // A crash before this leaves a bundle no record names: undone at start.
        let gone = rec.clone();
        if let Err(e) =
            tokio::task::spawn_blocking(move || remove_bundle(&gone.id, &gone.bundle)).await
        {
            tracing::warn!(%id, error = %e, "bundle removal task failed");
        }
        step_done("container removal", "bundle", t0);
        if stopped {
            self.delete_later(&rec);
        }
        self.index.remove(&id);
        self.index.release(&rec.name_key);
        self.events
            .publish(EventKind::Deleted, &id, &rec.sandbox_id, None, None);
        if let Some((pod, ctr)) = &nri_event {
            self.nri().remove_container(pod, ctr).await;
        }
        self.nri().forget(&id);
        Ok(())
    }

    /// The runtime's delete of a removed, stopped container (its state dir and cgroups: what
    /// runc's `delete` takes 10 ms or more to remove) and the removal of its cgroup, after
    /// RemoveContainer answered, once container stops and removals pause (see
    /// [`quiet`]). Nothing observes them meanwhile: the container is gone from the index and
    /// the store, its id is never reused, and RemovePodSandbox hurries the pod's deletes and
    /// waits for them before it goes on (and fails while one of them does, see
    /// [`Self::deletes_done`]). berthd's stop runs those still waiting; a crash before they
    /// ran is repaired at start (the runtime's root holds a container no record names).
    fn delete_later(&self, rec: &ContainerRecord) {
        let Ok(runtime) = self.runtime(&rec.runtime_handler) else {
            return;
        };
        let (id, cgroups_path, layout) = (rec.id.clone(), rec.cgroups_path.clone(), self.layout);
        let (undeleted, sandbox_id) = (self.undeleted.clone(), rec.sandbox_id.clone());
        let (gate, hurry) = (self.quiet.clone(), Arc::new(tokio::sync::Notify::new()));
        let hurried = hurry.clone();
        let task = tokio::spawn(
            async move {
                let _slot = gate.wait(&hurried).await;
                if let Err(e) = runtime.delete(&id).await {
                    tracing::warn!(%id, error = %e, "runtime delete; retried when the pod is removed");
                    undeleted
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(Undeleted {
                            sandbox_id,
                            id: id.clone(),
                            runtime,
                            cgroups_path: cgroups_path.clone(),
                            error: Arc::new(e),
                        });
                }
                remove_cgroup(layout, &id, cgroups_path).await;
            }
            .in_current_span(),
        );
        let mut deleting = self.deleting.lock().unwrap_or_else(|p| p.into_inner());
        deleting.retain(|d| !d.task.is_finished());
        deleting.push(DeferredDelete {
            sandbox_id: rec.sandbox_id.clone(),
            task,
            hurry,
        });
    }

    /// Hurries every deferred runtime delete and waits for them (berthd is stopping).
    pub async fn finish_deletes(&self) {
        for t in self.hurry_deletes(|_| true) {
            let _ = t.await;
        }
    }

    /// Takes the deferred runtime deletes of the pods `which` picks out of the list and
    /// hurries them (one not waiting yet keeps the permit); the caller waits for them.
    fn hurry_deletes(&self, which: impl Fn(&str) -> bool) -> Vec<tokio::task::JoinHandle<()>> {
        let mut deleting = self.deleting.lock().unwrap_or_else(|p| p.into_inner());
        let (mine, rest) = std::mem::take(&mut *deleting)
            .into_iter()
            .partition(|d: &DeferredDelete| which(&d.sandbox_id));
        *deleting = rest;
        mine.into_iter()
            .map(|d| {
                d.hurry.notify_one();
                d.task
            })
            .collect()
    }

    /// Waits for the runtime deletes of the pod's removed containers; those that failed
    /// before this call are tried again. Fails while one of them does.
    async fn deletes_done(&self, sandbox_id: &str) -> Result<(), ContainerError> {
        let earlier: Vec<Undeleted> = {
            let mut undeleted = self.undeleted.lock().unwrap_or_else(|p| p.into_inner());
            let (mine, rest) = std::mem::take(&mut *undeleted)
                .into_iter()
                .partition(|u| u.sandbox_id == sandbox_id);
            *undeleted = rest;
            mine
        };
        for mut u in earlier {
            match u.runtime.delete(&u.id).await {
                Ok(()) => remove_cgroup(self.layout, &u.id, u.cgroups_path.clone()).await,
                Err(e) => {
                    tracing::warn!(id = %u.id, error = %e, "runtime delete, again");
                    u.error = Arc::new(e);
                    self.undeleted
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(u);
                }
            }
        }
        for t in self.hurry_deletes(|pod| pod == sandbox_id) {
            let _ = t.await;
        }
        let undeleted = self.undeleted.lock().unwrap_or_else(|p| p.into_inner());
        match undeleted.iter().find(|u| u.sandbox_id == sandbox_id) {
            Some(u) => Err(ContainerError::Undeleted {
                id: u.id.clone(),
                error: u.error.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Notices exits as they are recorded (every `period`), so that their stopped events go
    /// out without waiting for a client to ask; ends when the manager is dropped.
    ///
    /// Each round looks only at containers that can exit (created or running): their exit
    /// files are picked out under the index's read lock without cloning a record, and a
    /// record is read again only for a container whose exit file appeared.
    pub async fn watch_exits(this: std::sync::Weak<ContainerManager>, period: Duration) {
        loop {
            tokio::time::sleep(period).await;
            let Some(mgr) = this.upgrade() else { return };
            for (id, exit_file) in mgr.exit_candidates() {
                if exit_file.exists()
                    && let Err(e) = mgr.get(&id)
                {
                    tracing::debug!(%id, error = %e, "noticing an exit");
                }
            }
        }
    }

    /// The id and exit file of every container that can still exit (created or running).
    fn exit_candidates(&self) -> Vec<(String, PathBuf)> {
        self.index.filter_map(|r| {
            matches!(r.phase, Phase::Running | Phase::Created)
                .then(|| (r.id.clone(), r.exit_file()))
        })
    }

    /// The records of a pod's containers as the index holds them (exits not looked for).
    pub fn records_in_pod(&self, sandbox_id: &str) -> Vec<ContainerRecord> {
        self.index
            .filter_map(|r| (r.sandbox_id == sandbox_id).then(|| r.clone()))
    }

    fn in_pod(&self, sandbox_id: &str) -> Vec<String> {
        self.index
            .filter_map(|r| (r.sandbox_id == sandbox_id).then(|| r.id.clone()))
    }

    /// Stops every container of a pod (StopPodSandbox does this first).
    pub async fn stop_pod(&self, sandbox_id: &str) -> Result<(), ContainerError> {
        for id in self.in_pod(sandbox_id) {
            // Each container in a span of its own: the pod RPC's span names the pod only.
            self.stop(&id, 0)
                .instrument(tracing::info_span!("container", id = %id))
                .await?;
        }
        Ok(())
    }

    /// Removes every container of a pod and stops its monitor (RemovePodSandbox).
    pub async fn remove_pod(&self, sandbox_id: &str) -> Result<(), ContainerError> {
        for id in self.in_pod(sandbox_id) {
            self.remove(&id)
                .instrument(tracing::info_span!("container", id = %id))
                .await?;
        }
        self.deletes_done(sandbox_id).await?;
        // A monitor being launched (ahead, or by a create) is up before it is shut down.
        self.launches.wait(sandbox_id).await;
        if let Ok(sandbox) = self.sandboxes.get(sandbox_id)
            && let Ok(mut client) = self.connect_monitor(&sandbox).await
        {
            let _ = client.shutdown().await;
        }
        Ok(())
    }

    /// ExecSync: runs `cmd` in a running container and returns its output and exit code.
    pub async fn exec_sync(
        &self,
        id: &str,
        cmd: Vec<String>,
        timeout_secs: i64,
    ) -> Result<crate::runtime::ExecOutput, ContainerError> {
        let plan = self.prepare_exec(id, cmd, false)?;
        let timeout = (timeout_secs > 0).then(|| Duration::from_secs(timeout_secs as u64));
        let out = plan
            .runtime
            .exec(
                &plan.container_id,
                &plan.process_file,
                &plan.pid_file,
                timeout,
            )
            .await;
        Ok(out?)
    }

    /// Writes the OCI process of an exec of `cmd` in the running container `id` (its
    /// environment, user and capabilities as the container's own process has them), for
    /// ExecSync and the streaming Exec. The files go when the plan is dropped.
    pub fn prepare_exec(
        &self,
        id: &str,
        cmd: Vec<String>,
        tty: bool,
    ) -> Result<ExecPlan, ContainerError> {
        let rec = self.get_running(id, "exec needs a running container")?;
        if cmd.is_empty() {
            return Err(ContainerError::Invalid("exec needs a command".to_string()));
        }
        let spec: serde_json::Value = std::fs::read(rec.bundle.join("config.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| ContainerError::Io {
                context: "read config.json".to_string(),
                source: std::io::Error::other("missing or unreadable"),
            })?;
        let mut process = spec.get("process").cloned().unwrap_or_default();
        process["args"] = serde_json::json!(cmd);
        process["terminal"] = serde_json::json!(tty);
        if let (false, Some(p)) = (tty, process.as_object_mut()) {
            p.remove("consoleSize");
        }
        let n = self
            .exec_seq
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let process_file = rec.bundle.join(format!("exec-{n}.json"));
        let pid_file = rec.bundle.join(format!("exec-{n}.pid"));
        let runtime = self.runtime(&rec.runtime_handler)?;
        std::fs::write(&process_file, process.to_string()).map_err(io_err("write exec process"))?;
        Ok(ExecPlan {
            runtime,
            container_id: rec.id,
            process_file,
            pid_file,
        })
    }

    /// Attach: a stream of the running container's stdio from its pod's monitor (frames of
    /// [`monitor::attach`]), and the record (its config says stdin, stdin_once, tty).
    pub async fn attach_stream(
        &self,
        id: &str,
    ) -> Result<
        (
            ContainerRecord,
            tokio::io::BufReader<tokio::net::UnixStream>,
        ),
        ContainerError,
    > {
        let rec = self.get_running(id, "attach needs a running container")?;
        let sandbox = self.sandboxes.get(&rec.sandbox_id)?;
        let client = self.connect_monitor(&sandbox).await?;
        let stream = client.attach(&rec.id).await?;
        Ok((rec, stream))
    }

    /// The record of `id` if the container runs; else `WrongState` saying `what` needs that.
    pub fn get_running(
        &self,
        id: &str,
        what: &'static str,
    ) -> Result<ContainerRecord, ContainerError> {
        let rec = self.get(id)?;
        if rec.phase != Phase::Running {
            return Err(ContainerError::WrongState {
                id: rec.id.clone(),
                state: rec.state_name(),
                what,
            });
        }
        Ok(rec)
    }

    /// UpdateContainerResources: applies new limits to a live container.
    pub async fn update_resources(
        &self,
        id: &str,
        mut resources: cri::LinuxContainerResources,
    ) -> Result<(), ContainerError> {
        let id = self.resolve_id(id)?;
        let rec = self.get(&id)?;
        // NRI plugins may change what is applied, and ask for updates of other containers.
        let nri = match self.nri_pod(&rec) {
            Some(pod) => {
                let ctr = crate::nri::convert::container(&rec, None);
                let asked = crate::nri::convert::from_cri_resources(&resources);
                let (updates, evictions) = self.nri().update_container(&pod, &ctr, &asked).await?;
                let (mine, others): (Vec<_>, Vec<_>) =
                    updates.into_iter().partition(|u| u.container_id == id);
                for u in &mine {
                    if let Some(r) = u.linux.as_ref().and_then(|l| l.resources.as_ref()) {
                        crate::nri::adjust::update_cri_resources(r, &mut resources);
                    }
                }
                Some((pod, others, evictions))
            }
            None => None,
        };
        self.apply_resources(&id, resources).await?;
        if let Some((pod, others, evictions)) = nri {
            if !others.is_empty() {
                self.nri_updates(others).await;
            }
            if !evictions.is_empty() {
                self.nri_evict(evictions).await;
            }
            if let Ok(rec) = self.get(&id) {
                let ctr = crate::nri::convert::container(&rec, None);
                self.nri().post_update_container(&pod, &ctr).await;
            }
        }
        Ok(())
    }

    /// Applies new resources to a created or running container (no NRI hook).
    async fn apply_resources(
        &self,
        id: &str,
        resources: cri::LinuxContainerResources,
    ) -> Result<(), ContainerError> {
        let id = id.to_string();
        let _lock = self.locks.lock(&id).await;
        let mut rec = self.get(&id)?;
        if rec.phase != Phase::Running && rec.phase != Phase::Created {
            return Err(ContainerError::WrongState {
                id,
                state: rec.state_name(),
                what: "resources of a stopped container cannot change",
            });
        }
        let oci = spec::resources_to_oci(&resources)?;
        let file = rec.bundle.join("resources.json");
        let json = serde_json::to_vec(&oci).map_err(|e| ContainerError::Io {
            context: "encode resources".to_string(),
            source: std::io::Error::other(e),
        })?;
        std::fs::write(&file, json).map_err(io_err("write resources.json"))?;
        self.runtime(&rec.runtime_handler)?
            .update(&rec.id, &file)
            .await?;
        rec.config
            .linux
            .get_or_insert_with(Default::default)
            .resources = Some(resources);
        self.persist(&rec).await?;
        self.index.insert(&id, rec);
        Ok(())
    }

    /// ReopenContainerLog.
    pub async fn reopen_log(&self, id: &str) -> Result<(), ContainerError> {
        let rec = self.get_running(id, "only a running container's log can be reopened")?;
        let sandbox = self.sandboxes.get(&rec.sandbox_id)?;
        let mut client = self.connect_monitor(&sandbox).await?;
        client.reopen(&rec.id).await?;
        Ok(())
    }
}

/// A container's `log_path`: relative to its pod's log directory and inside it (the kubelet
/// sends `<name>/<attempt>.log`). An absolute path, a `..`, or a NUL byte is refused: it
/// would make the monitor write container output over any file of the host.
fn relative_log_path(p: &str) -> Result<&Path, ContainerError> {
    let path = Path::new(p);
    let inside = path.components().all(|c| {
        matches!(
            c,
            std::path::Component::Normal(_) | std::path::Component::CurDir
        )
    });
    if p.contains('\0') || !inside || path.file_name().is_none() {
        return Err(ContainerError::Invalid(format!(
            "log_path {p:?} must name a file inside the pod's log directory"
        )));
    }
    Ok(path)
}

/// Whether `pid` is a live (not zombie) process in the cgroup of container `id`. Without
/// `thorough`, only whether a process of that pid exists at all (one `kill(pid, 0)`, cheap
/// enough for every container of a list; a zombie that nobody reaps passes it).
fn process_in_container(pid: i32, id: &str, thorough: bool) -> bool {
    let exists = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None)
        .map_or_else(|e| e != nix::errno::Errno::ESRCH, |()| true);
    if !exists || !thorough {
        return exists;
    }
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the parenthesized command name, which may itself hold ") ".
    let state = stat
        .rsplit_once(") ")
        .and_then(|(_, rest)| rest.chars().next());
    if matches!(state, Some('Z') | Some('X') | None) {
        return false;
    }
    std::fs::read_to_string(format!("/proc/{pid}/cgroup")).is_ok_and(|c| c.contains(id))
}

/// NRI's view of the containers (see [`crate::nri::Host`]).
impl crate::nri::Host for ContainerManager {
    fn snapshot(
        &self,
    ) -> crate::nri::BoxFuture<
        '_,
        (
            Vec<crate::nri::api::PodSandbox>,
            Vec<crate::nri::api::Container>,
        ),
    > {
        Box::pin(async move {
            let pods = self
                .sandboxes
                .list_map(|sb| Some(crate::nri::convert::pod(sb)));
            let containers = self
                .list()
                .iter()
                .map(|r| crate::nri::convert::container(r, None))
                .collect();
            (pods, containers)
        })
    }

    fn update(
        &self,
        updates: Vec<crate::nri::api::ContainerUpdate>,
    ) -> crate::nri::BoxFuture<'_, Vec<crate::nri::api::ContainerUpdate>> {
        Box::pin(self.nri_updates(updates))
    }

    fn evict(
        &self,
        evictions: Vec<crate::nri::api::ContainerEviction>,
    ) -> crate::nri::BoxFuture<'_, ()> {
        Box::pin(self.nri_evict(evictions))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_paths_stay_inside_the_log_directory() {
        for good in ["c.log", "c/0.log", "./c/1.log"] {
            assert!(relative_log_path(good).is_ok(), "{good}");
        }
        for bad in [
            "/etc/passwd",
            "/",
            "..",
            "../x.log",
            "c/../../x",
            "a\0b",
            ".",
        ] {
            assert!(relative_log_path(bad).is_err(), "{bad:?}");
        }
    }
}
