//! Pod sandboxes: the durable records, name reservation, the pod's pinned namespaces, its
//! files (hostname, hosts, resolv.conf), sysctls, the optional pod init, and its network
//! (through a [`NetworkBackend`]).
//!
//! Crash safety: a sandbox being made is described by its intent record, `intent.json` in the
//! pod's directory (under `state`, which lasts one boot), written before anything is made
//! and again, with the network request, before the network is set up. Everything it guards
//! (pinned namespaces, mounts, the pod init, links, rules) ends with the boot too, so the
//! intent only has to survive a crash of berthd, not a power loss: it is written without
//! fsync. The one durable commit of RunPodSandbox is the `Ready` record that names the whole
//! pod. At start, [`SandboxManager::open`] undoes every pod directory that no record names
//! (with its intent record when there is one), removes sandboxes still `Creating` (records of
//! older berthds), marks `Ready` ones whose namespaces did not survive (a reboot) `NotReady`,
//! and lets the network backend free what pods that are not ready hold.
//!
//! Teardowns are marked the same way: StopPodSandbox leaves `stopping` and RemovePodSandbox
//! `removing` in the pod's directory before they release anything, and a start that finds a
//! mark on a record finishes what the crash cut short (the kubelet asked for it). The
//! directory goes after the record, so a record never names a pod without its mark.

pub mod files;
pub mod init;
pub mod resources;
pub mod sysctl;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::cri::v1 as cri;
use nix::sched::CloneFlags;
use serde::{Deserialize, Serialize};

use crate::events::{EventHub, Kind as EventKind};
use crate::ids::{self, Index, Lookup, now_nanos};
use crate::locks::KeyedLocks;
use crate::network::{
    DnsSettings, NetworkBackend, NetworkError, PodNetworkRequest, PodNetworkStatus, PortMapping,
    Protocol,
};
use crate::nri::Nri;
use crate::ns::{self, NewNamespaces, NsError};
use crate::store::{Batch, Store, StoreError, Table};
use init::InitProcess;
use sysctl::{Sysctl, SysctlNamespace};

/// Errors of the sandbox piece.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("pod sandbox {0:?} not found")]
    NotFound(String),
    #[error("pod sandbox id prefix {0:?} is ambiguous")]
    Ambiguous(String),
    #[error("pod sandbox name {name:?} is already reserved by {id}")]
    NameReserved { name: String, id: String },
    #[error("invalid pod sandbox config: {0}")]
    Invalid(String),
    #[error("pod network: {0}")]
    Network(#[from] NetworkError),
    #[error("pod namespaces: {0}")]
    Ns(#[from] NsError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("sysctl: {0}")]
    Sysctl(String),
    #[error("pod cgroup: {0}")]
    Cgroup(#[from] crate::cgroups::CgroupError),
    #[error(transparent)]
    Nri(#[from] crate::nri::NriError),
}

/// Whether the sandbox-level security settings are usable here. The ones that shape a pause
/// container (run as, read-only rootfs, seccomp, AppArmor) have nothing to apply to: berth
/// runs no pause container, and its pod init (PID namespace sharing only) is berth's own
/// reaper. That is logged once; user namespaces are refused, SELinux is checked as for
/// containers.
fn check_security_context(sc: &cri::LinuxSandboxSecurityContext) -> Result<(), SandboxError> {
    use crate::container::spec::lsm;
    lsm::check_userns(sc.namespace_options.as_ref(), "the pod").map_err(SandboxError::Invalid)?;
    lsm::check_selinux(sc.selinux_options.as_ref(), "pod").map_err(SandboxError::Invalid)?;
    static LOGGED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    #[allow(deprecated)]
    let pause_only = sc.run_as_user.is_some()
        || sc.run_as_group.is_some()
        || sc.readonly_rootfs
        || !sc.supplemental_groups.is_empty()
        || sc.seccomp.is_some()
        || sc.apparmor.is_some()
        || !sc.seccomp_profile_path.is_empty();
    if pause_only && !LOGGED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        tracing::info!(
            "pod-level run_as/readonly_rootfs/seccomp/apparmor settings shape a pause container; berth runs none, so they change nothing (containers carry their own; logged once)"
        );
    }
    Ok(())
}

/// The intent record of a sandbox being made, in its directory (see the module's doc).
const INTENT_FILE: &str = "intent.json";

/// Writes the intent record of a sandbox being made: in place, one write, not fsynced (it
/// guards what a crash of berthd leaves, all of which a reboot ends anyway). A crash in the
/// middle of a write leaves a record that does not parse; it is written before anything is
/// made and again just before the network is set up, so such a pod holds at most what
/// [`SandboxManager::undo_unnamed`] removes without it.
fn write_intent(rec: &SandboxRecord) -> Result<(), SandboxError> {
    let json = serde_json::to_vec(rec).map_err(|e| SandboxError::Io {
        context: "encode the pod's intent record".to_string(),
        source: std::io::Error::other(e),
    })?;
    std::fs::write(rec.dir.join(INTENT_FILE), json).map_err(io_err("write the pod's intent record"))
}

/// Left in a pod's directory when StopPodSandbox starts releasing it: a start that finds it
/// on a `Ready` record finishes the stop (a crash cut it after the network was detached).
const STOPPING_MARK: &str = "stopping";
/// Left in a pod's directory when RemovePodSandbox starts tearing it down: a start that
/// finds it finishes the removal. The directory itself goes only after the record.
const REMOVING_MARK: &str = "removing";

/// Marks what a pod's teardown is about to do (see [`STOPPING_MARK`], [`REMOVING_MARK`]): an
/// empty file, not fsynced, for the same reason as the intent record. A pod whose directory
/// is gone (a reboot emptied `state`) holds nothing a mark would guard: none is written.
fn write_mark(dir: &Path, mark: &str) -> Result<(), SandboxError> {
    match std::fs::write(dir.join(mark), b"") {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        r => r.map_err(io_err(format!("mark the pod as {mark}"))),
    }
}

/// The intent record left in a pod directory, if it is whole and names that directory.
fn read_intent(dir: &Path) -> Option<SandboxRecord> {
    let bytes = std::fs::read(dir.join(INTENT_FILE)).ok()?;
    let rec: SandboxRecord = serde_json::from_slice(&bytes).ok()?;
    (rec.dir == dir).then_some(rec)
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> SandboxError {
    let context = context.into();
    move |source| SandboxError::Io { context, source }
}

/// Where a sandbox is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Being made; a crash in this phase means "remove it at start".
    Creating,
    Ready,
    NotReady,
}

/// The durable record of a pod sandbox (key: its id).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxRecord {
    pub id: String,
    /// `name_namespace_uid_attempt`, unique among sandboxes.
    pub name_key: String,
    pub phase: Phase,
    /// Nanoseconds since the epoch.
    pub created_at: i64,
    pub config: cri::PodSandboxConfig,
    /// The handler its containers run with (the default one resolved).
    pub runtime_handler: String,
    /// The handler the client asked for, as it asked (`""` = the default): what statuses
    /// report. `None` in records from before it was kept.
    #[serde(default)]
    pub requested_runtime_handler: Option<String>,
    /// `state/pods/<id>`: pinned namespaces and the pod's files.
    pub dir: PathBuf,
    /// Which namespaces the pod has of its own (pinned under `dir/ns`).
    pub own_net: bool,
    pub own_ipc: bool,
    pub own_uts: bool,
    pub hostname: String,
    pub init: Option<InitProcess>,
    /// What the network backend was asked, kept for teardown after a restart.
    pub network_request: Option<PodNetworkRequest>,
    pub network: Option<PodNetworkStatus>,
}

impl SandboxRecord {
    /// Notes this pod (id, `namespace/name`) in the current RPC's span.
    pub fn note_in_span(&self) {
        let (namespace, name) = self
            .config
            .metadata
            .as_ref()
            .map_or(("", ""), |m| (m.namespace.as_str(), m.name.as_str()));
        crate::span::note_pod(&self.id, namespace, name);
    }

    /// The RuntimeClass handler statuses report: the one the client asked for.
    pub fn reported_runtime_handler(&self) -> &str {
        self.requested_runtime_handler
            .as_deref()
            .unwrap_or(&self.runtime_handler)
    }

    pub fn netns_path(&self) -> Option<PathBuf> {
        self.own_net.then(|| self.dir.join("ns/net"))
    }
    pub fn ipcns_path(&self) -> Option<PathBuf> {
        self.own_ipc.then(|| self.dir.join("ns/ipc"))
    }
    pub fn utsns_path(&self) -> Option<PathBuf> {
        self.own_uts.then(|| self.dir.join("ns/uts"))
    }
    pub fn hosts_path(&self) -> PathBuf {
        self.dir.join("hosts")
    }
    pub fn resolv_conf_path(&self) -> PathBuf {
        self.dir.join("resolv.conf")
    }
    pub fn hostname_path(&self) -> PathBuf {
        self.dir.join("hostname")
    }
    /// The pod's `/dev/shm` (a tmpfs shared by its containers) when it has its own IPC
    /// namespace.
    pub fn shm_path(&self) -> Option<PathBuf> {
        self.own_ipc.then(|| self.dir.join("shm"))
    }

    fn namespace_options(&self) -> cri::NamespaceOption {
        self.config
            .linux
            .as_ref()
            .and_then(|l| l.security_context.as_ref())
            .and_then(|s| s.namespace_options.clone())
            .unwrap_or_default()
    }

    /// The pinned namespaces a process of this pod joins (for the init and sysctls).
    fn joinable_namespaces(&self) -> Vec<(PathBuf, CloneFlags)> {
        let mut v = Vec::new();
        if let Some(p) = self.netns_path() {
            v.push((p, CloneFlags::CLONE_NEWNET));
        }
        if let Some(p) = self.ipcns_path() {
            v.push((p, CloneFlags::CLONE_NEWIPC));
        }
        if let Some(p) = self.utsns_path() {
            v.push((p, CloneFlags::CLONE_NEWUTS));
        }
        v
    }
}

/// Sandboxes of one berthd.
pub struct SandboxManager {
    store: Arc<Store>,
    network: Arc<dyn NetworkBackend>,
    pods_dir: PathBuf,
    /// The sandboxes by id, and their reserved names.
    index: Index<SandboxRecord>,
    locks: KeyedLocks,
    /// Where lifecycle events go.
    events: Arc<EventHub>,
    /// NRI plugins hooked into pod lifecycle.
    nri: Arc<Nri>,
}

fn name_key(m: &cri::PodSandboxMetadata) -> String {
    format!("{}_{}_{}_{}", m.name, m.namespace, m.uid, m.attempt)
}

fn mode(m: i32) -> cri::NamespaceMode {
    cri::NamespaceMode::try_from(m).unwrap_or(cri::NamespaceMode::Pod)
}

impl SandboxManager {
    /// Loads the sandboxes and repairs what a crash left behind.
    pub async fn open(
        store: Arc<Store>,
        network: Arc<dyn NetworkBackend>,
        state: &Path,
        events: Arc<EventHub>,
        nri: Arc<Nri>,
    ) -> Result<SandboxManager, SandboxError> {
        let pods_dir = state.join("pods");
        std::fs::create_dir_all(&pods_dir)
            .map_err(io_err(format!("create {}", pods_dir.display())))?;
        let records: Vec<(String, SandboxRecord)> = store.all(Table::Sandboxes)?;
        let mgr = SandboxManager {
            store,
            network,
            pods_dir,
            index: Index::default(),
            locks: KeyedLocks::default(),
            events,
            nri,
        };
        for (_, mut rec) in records {
            let removing = rec.dir.join(REMOVING_MARK).exists();
            if rec.phase == Phase::Creating || removing {
                if removing {
                    tracing::info!(id = %rec.id, "finishing the removal of a pod sandbox that a crash cut short");
                } else {
                    tracing::info!(id = %rec.id, "removing a pod sandbox left half-made by a crash");
                }
                mgr.destroy(&rec).await?;
                let mut b = Batch::new();
                b.delete(Table::Sandboxes, &rec.id);
                mgr.store.commit(b).await?;
                remove_pod_dir(&rec.dir);
                if removing {
                    mgr.events
                        .publish(EventKind::Deleted, &rec.id, &rec.id, None, None);
                }
                continue;
            }
            if rec.phase == Phase::Ready && rec.dir.join(STOPPING_MARK).exists() {
                tracing::info!(id = %rec.id, "finishing the stop of a pod sandbox that a crash cut short");
                mgr.release_runtime_resources(&rec).await?;
                rec.phase = Phase::NotReady;
                rec.network = None;
                rec.init = None;
                mgr.persist(&rec).await?;
                mgr.events
                    .publish(EventKind::Stopped, &rec.id, &rec.id, Some(&rec), None);
            } else if rec.phase == Phase::Ready && !mgr.namespaces_intact(&rec) {
                tracing::info!(id = %rec.id, "pod sandbox namespaces are gone (reboot?): NotReady");
                rec.phase = Phase::NotReady;
                mgr.persist(&rec).await?;
                mgr.events
                    .publish(EventKind::Stopped, &rec.id, &rec.id, Some(&rec), None);
            }
            let _ = mgr.index.reserve(&rec.name_key, &rec.id);
            mgr.index.insert(&rec.id.clone(), rec);
        }
        // Only ready pods hold network resources: a pod that start found without its
        // namespaces (a crash mid-teardown, a reboot) gives its address, veth and rules back
        // here, not at a StopPodSandbox that may never come.
        let live: Vec<PodNetworkRequest> = mgr
            .index
            .values()
            .iter()
            .filter(|r| r.phase == Phase::Ready && r.network.is_some())
            .filter_map(|r| r.network_request.clone())
            .collect();
        if let Err(e) = mgr.network.repair(&live).await {
            tracing::warn!(error = %e, "network repair at start failed");
        }
        // Pod directories no record names: pods a crash interrupted while they were made.
        if let Ok(entries) = std::fs::read_dir(&mgr.pods_dir) {
            let known = mgr.index.ids();
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let path = e.path();
                if known.contains(&name) {
                    // Its intent record (left in place) is stale: the record names the pod.
                    continue;
                }
                mgr.undo_unnamed(&path).await;
            }
        }
        Ok(mgr)
    }

    /// Undoes a pod directory that no record names (a crash while the pod was made): with its
    /// intent record everything it may hold, else the init its pid file names, the pinned
    /// namespaces and the directory (the network repair at start frees links, rules and
    /// addresses of pods no record names).
    async fn undo_unnamed(&self, dir: &Path) {
        if let Some(rec) = read_intent(dir) {
            tracing::info!(id = %rec.id, "removing a pod sandbox left half-made by a crash");
            if let Err(e) = self.destroy(&rec).await {
                tracing::warn!(id = %rec.id, error = %e, "undoing a half-made pod sandbox");
            }
        } else if let Some(init) = init::from_pid_file(&dir.join("init.pid")) {
            let _ = tokio::task::spawn_blocking(move || init.kill()).await;
        }
        remove_pod_dir(dir);
    }

    async fn persist(&self, rec: &SandboxRecord) -> Result<(), SandboxError> {
        let mut b = Batch::new();
        b.put(Table::Sandboxes, &rec.id, rec)?;
        self.store.commit(b).await?;
        Ok(())
    }

    fn namespaces_intact(&self, rec: &SandboxRecord) -> bool {
        [rec.netns_path(), rec.ipcns_path(), rec.utsns_path()]
            .into_iter()
            .flatten()
            .all(|p| ns::is_pinned(&p))
    }

    /// Whether pods can get a network now (`Err` is the reason).
    pub async fn network_ready(&self) -> Result<(), String> {
        self.network.ready().await
    }

    /// The network backend as an operator sees it (see [`NetworkBackend::describe`]).
    pub fn network_info(&self) -> serde_json::Value {
        self.network.describe()
    }

    /// Passes the kubelet's pod CIDR to the network backend.
    pub async fn set_pod_cidr(&self, cidr: &str) -> Result<(), SandboxError> {
        Ok(self.network.set_pod_cidr(cidr).await?)
    }

    /// Resolves a full id or a unique prefix.
    pub fn resolve_id(&self, id: &str) -> Result<String, SandboxError> {
        if id.is_empty() {
            return Err(SandboxError::Invalid(
                "a pod sandbox id is required".to_string(),
            ));
        }
        match self.index.lookup(id) {
            Lookup::Found(id) => {
                if let Some(rec) = self.index.get(&id) {
                    rec.note_in_span();
                }
                Ok(id)
            }
            Lookup::Ambiguous => Err(SandboxError::Ambiguous(id.to_string())),
            Lookup::Missing => Err(SandboxError::NotFound(id.to_string())),
        }
    }

    /// Notes the pod of a full id (its id and name) in the current RPC's span.
    /// The NRI host (for the container manager).
    pub fn nri(&self) -> &Arc<Nri> {
        &self.nri
    }

    pub fn note_in_span(&self, id: &str) {
        if let Some(rec) = self.index.get(id) {
            rec.note_in_span();
        }
    }

    pub fn get(&self, id: &str) -> Result<SandboxRecord, SandboxError> {
        let id = self.resolve_id(id)?;
        self.index.get(&id).ok_or(SandboxError::NotFound(id))
    }

    pub fn list(&self) -> Vec<SandboxRecord> {
        self.list_map(|r| Some(r.clone()))
    }

    /// What `f` makes of each sandbox, oldest first (no record is cloned).
    pub fn list_map<T>(&self, mut f: impl FnMut(&SandboxRecord) -> Option<T>) -> Vec<T> {
        let mut v = self.index.filter_map(|r| f(r).map(|t| (r.created_at, t)));
        v.sort_by_key(|(at, _)| *at);
        v.into_iter().map(|(_, t)| t).collect()
    }

    /// RunPodSandbox: makes a ready pod or leaves nothing behind.
    pub async fn run(
        &self,
        config: cri::PodSandboxConfig,
        runtime_handler: String,
        requested_runtime_handler: String,
    ) -> Result<SandboxRecord, SandboxError> {
        let meta = config
            .metadata
            .clone()
            .ok_or_else(|| SandboxError::Invalid("metadata is required".to_string()))?;
        if meta.name.is_empty() || meta.namespace.is_empty() {
            return Err(SandboxError::Invalid(
                "metadata name and namespace are required".to_string(),
            ));
        }
        let ns_opts = config
            .linux
            .as_ref()
            .and_then(|l| l.security_context.as_ref())
            .and_then(|s| s.namespace_options.clone())
            .unwrap_or_default();
        let sc = config
            .linux
            .as_ref()
            .and_then(|l| l.security_context.clone())
            .unwrap_or_default();
        check_security_context(&sc)?;
        let log_dir = &config.log_directory;
        if !log_dir.is_empty() && (!log_dir.starts_with('/') || log_dir.contains('\0')) {
            return Err(SandboxError::Invalid(format!(
                "log_directory {log_dir:?} must be an absolute path"
            )));
        }
        let own_net = mode(ns_opts.network) != cri::NamespaceMode::Node;
        let own_ipc = mode(ns_opts.ipc) != cri::NamespaceMode::Node;
        let pid_mode = mode(ns_opts.pid);
        let sysctls = self.validate_sysctls(&config, own_net, own_ipc)?;
        let port_mappings = port_mappings(&config.port_mappings)?;
        let hostname = if config.hostname.is_empty() {
            nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "localhost".to_string())
        } else {
            config.hostname.clone()
        };
        if own_net && !files::valid_hostname(&hostname) {
            return Err(SandboxError::Invalid(format!(
                "invalid hostname {hostname:?}"
            )));
        }

        let key = name_key(&meta);
        let id = ids::new_id().map_err(io_err("read /dev/urandom"))?;
        crate::span::note_pod(&id, &meta.namespace, &meta.name);
        if let Err(holder) = self.index.reserve(&key, &id) {
            return Err(SandboxError::NameReserved {
                name: key,
                id: holder,
            });
        }
        let _lock = self.locks.lock(&id).await;
        // No NRI plugin is synchronized between the pod's hook and its listing.
        let _nri_sync = self.nri.block_sync().await;
        let mut rec = SandboxRecord {
            id: id.clone(),
            name_key: key.clone(),
            phase: Phase::Creating,
            created_at: now_nanos(),
            config,
            runtime_handler,
            requested_runtime_handler: Some(requested_runtime_handler),
            dir: self.pods_dir.join(&id),
            own_net,
            own_ipc,
            // Kubernetes gives a host-network pod the host's UTS namespace too.
            own_uts: own_net,
            hostname,
            init: None,
            network_request: None,
            network: None,
        };
        let result = self
            .create(&mut rec, sysctls, port_mappings, pid_mode)
            .await;
        match result {
            Ok(()) => {
                self.index.insert(&id, rec.clone());
                self.events
                    .publish(EventKind::Created, &id, &id, Some(&rec), None);
                self.events
                    .publish(EventKind::Started, &id, &id, Some(&rec), None);
                Ok(rec)
            }
            Err(e) => {
                tracing::warn!(id = %rec.id, error = %e, "pod sandbox creation failed; undoing it");
                // No record names it yet (the Ready commit is the last step).
                match self.destroy(&rec).await {
                    Ok(()) => remove_pod_dir(&rec.dir),
                    // The directory and its intent record stay: the next start retries.
                    Err(undo) => {
                        tracing::error!(id = %rec.id, error = %undo, "undoing a failed pod sandbox")
                    }
                }
                self.index.release(&key);
                Err(e)
            }
        }
    }

    fn validate_sysctls(
        &self,
        config: &cri::PodSandboxConfig,
        own_net: bool,
        own_ipc: bool,
    ) -> Result<Vec<Sysctl>, SandboxError> {
        let mut out = Vec::new();
        let Some(linux) = config.linux.as_ref() else {
            return Ok(out);
        };
        let mut names: Vec<(&String, &String)> = linux.sysctls.iter().collect();
        names.sort();
        for (name, value) in names {
            let s = sysctl::classify(name, value).map_err(SandboxError::Invalid)?;
            match s.ns {
                SysctlNamespace::Net if !own_net => {
                    return Err(SandboxError::Invalid(format!(
                        "sysctl {name} would change the host: the pod uses the host network"
                    )));
                }
                SysctlNamespace::Ipc if !own_ipc => {
                    return Err(SandboxError::Invalid(format!(
                        "sysctl {name} would change the host: the pod uses the host IPC namespace"
                    )));
                }
                _ => out.push(s),
            }
        }
        Ok(out)
    }

    async fn create(
        &self,
        rec: &mut SandboxRecord,
        sysctls: Vec<Sysctl>,
        port_mappings: Vec<PortMapping>,
        pid_mode: cri::NamespaceMode,
    ) -> Result<(), SandboxError> {
        let t0 = std::time::Instant::now();
        let mark = |step: &str| {
            tracing::debug!(
                step,
                ms = t0.elapsed().as_secs_f64() * 1000.0,
                "pod creation"
            )
        };
        let dir = rec.dir.clone();
        std::fs::create_dir_all(dir.join("ns"))
            .map_err(io_err(format!("create {}", dir.display())))?;
        write_intent(rec)?;
        mark("record");

        // The pod's files.
        std::fs::write(rec.hostname_path(), format!("{}\n", rec.hostname))
            .map_err(io_err("write hostname"))?;
        let resolv = match files::resolv_conf(rec.config.dns_config.as_ref()) {
            Some(text) => text.into_bytes(),
            None => std::fs::read("/etc/resolv.conf").unwrap_or_default(),
        };
        files::write_atomic(&rec.resolv_conf_path(), &resolv)
            .map_err(io_err("write resolv.conf"))?;
        if !rec.own_net {
            let host = std::fs::read("/etc/hosts").unwrap_or_default();
            files::write_atomic(&rec.hosts_path(), &host).map_err(io_err("write hosts"))?;
        }

        // The pod's /dev/shm: one tmpfs its containers share.
        if let Some(shm) = rec.shm_path() {
            std::fs::create_dir_all(&shm).map_err(io_err("create shm dir"))?;
            nix::mount::mount(
                Some("shm"),
                &shm,
                Some("tmpfs"),
                nix::mount::MsFlags::MS_NOSUID
                    | nix::mount::MsFlags::MS_NODEV
                    | nix::mount::MsFlags::MS_NOEXEC,
                Some("mode=1777,size=65536k"),
            )
            .map_err(|e| SandboxError::Io {
                context: format!("mount tmpfs at {}", shm.display()),
                source: e.into(),
            })?;
        }

        mark("files");
        // Namespaces, with the hostname set inside the new UTS namespace.
        let which = NewNamespaces {
            net: rec.own_net,
            ipc: rec.own_ipc,
            uts: rec.own_uts,
        };
        if which.net || which.ipc || which.uts {
            let hostname = rec.hostname.clone();
            let set_hostname = which.uts;
            let new_net = which.net;
            ns::create_pinned(&dir.join("ns"), which, move || {
                if new_net {
                    ns::loopback_up()?;
                }
                if set_hostname {
                    nix::unistd::sethostname(&hostname).map_err(|source| NsError::Sys {
                        what: "sethostname",
                        path: PathBuf::from(&hostname),
                        source,
                    })?;
                }
                Ok::<(), SandboxError>(())
            })
            .await?;
        }

        mark("namespaces");
        // Network.
        if rec.own_net {
            let meta = rec.config.metadata.clone().unwrap_or_default();
            let dns = rec.config.dns_config.clone().unwrap_or_default();
            let req = PodNetworkRequest {
                pod_id: rec.id.clone(),
                name: meta.name,
                namespace: meta.namespace,
                uid: meta.uid,
                netns_path: dir.join("ns/net"),
                port_mappings,
                dns: DnsSettings {
                    servers: dns.servers,
                    searches: dns.searches,
                    options: dns.options,
                },
                annotations: rec
                    .config
                    .annotations
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect::<BTreeMap<_, _>>(),
            };
            // Recorded before setup so a crash during setup is torn down at start.
            rec.network_request = Some(req.clone());
            write_intent(rec)?;
            mark("network record");
            let status = self.network.setup(&req).await?;
            mark("network setup");
            rec.network = Some(status);
            let ips: Vec<IpAddr> = rec
                .network
                .as_ref()
                .map(|n| n.ips.clone())
                .unwrap_or_default();
            files::write_atomic(
                &rec.hosts_path(),
                files::hosts(&rec.hostname, &ips).as_bytes(),
            )
            .map_err(io_err("write hosts"))?;
        }

        // Sysctls, from a thread inside the pod's namespaces (after the network exists, so
        // per-interface ones find eth0).
        if !sysctls.is_empty() {
            let joined = rec.joinable_namespaces();
            ns::run_in_namespaces(&joined, move || sysctl::apply(&sysctls))
                .await?
                .map_err(SandboxError::Sysctl)?;
        }

        if pid_mode == cri::NamespaceMode::Pod {
            let joined = rec.joinable_namespaces();
            let pid_file = dir.join("init.pid");
            let init = tokio::task::spawn_blocking(move || init::spawn(&pid_file, &joined))
                .await
                .map_err(|e| SandboxError::Io {
                    context: "start pod init".to_string(),
                    source: std::io::Error::other(e.to_string()),
                })?
                .map_err(io_err("start pod init"))?;
            rec.init = Some(init);
        }

        rec.phase = Phase::Ready;
        // NRI plugins see the pod ready, before anyone else can: one that fails it fails
        // RunPodSandbox (and the pod is undone).
        let nri_pod = self.nri.active().then(|| crate::nri::convert::pod(rec));
        if let Some(pod) = &nri_pod {
            self.nri.run_pod_sandbox(pod).await?;
            mark("nri");
        }
        // The one durable commit: from here on the record names the pod.
        if let Err(e) = self.persist(rec).await {
            // Told apart: the caller holds the sync block that the event waits behind.
            if let Some(pod) = nri_pod {
                let nri = self.nri.clone();
                tokio::spawn(async move { nri.remove_pod_sandbox(&pod).await });
            }
            return Err(e);
        }
        mark("ready");
        // The intent record stays (stale, ignored) until the directory goes with the pod:
        // removing it would cost this RPC one more metadata operation.
        Ok(())
    }

    /// Undoes everything a sandbox may hold but its directory: init, network, namespaces.
    /// The caller removes the directory ([`remove_pod_dir`]) once no record names the pod.
    async fn destroy(&self, rec: &SandboxRecord) -> Result<(), SandboxError> {
        let t0 = std::time::Instant::now();
        self.release_runtime_resources(rec).await?;
        step_done("pod teardown", "released", t0);
        for p in [rec.netns_path(), rec.ipcns_path(), rec.utsns_path()]
            .into_iter()
            .flatten()
        {
            ns::unpin(&p)?;
        }
        step_done("pod teardown", "unpinned", t0);
        Ok(())
    }

    /// Stops the init and detaches the network (what StopPodSandbox releases).
    async fn release_runtime_resources(&self, rec: &SandboxRecord) -> Result<(), SandboxError> {
        let t0 = std::time::Instant::now();
        // An init started just before a crash is not in the record: find it by its pid file.
        let init = rec
            .init
            .or_else(|| init::from_pid_file(&rec.dir.join("init.pid")));
        if let Some(init) = init {
            tokio::task::spawn_blocking(move || init.kill())
                .await
                .map_err(|e| SandboxError::Io {
                    context: "stop pod init".to_string(),
                    source: std::io::Error::other(e.to_string()),
                })?;
        }
        step_done("pod release", "init", t0);
        if let Some(req) = &rec.network_request {
            self.network.teardown(req).await?;
        }
        step_done("pod release", "network", t0);
        Ok(())
    }

    /// StopPodSandbox: idempotent; an unknown id is fine.
    pub async fn stop(&self, id: &str) -> Result<(), SandboxError> {
        let id = match self.resolve_id(id) {
            Ok(id) => id,
            Err(SandboxError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        let _lock = self.locks.lock(&id).await;
        let Some(mut rec) = self.index.get(&id) else {
            return Ok(());
        };
        if rec.phase == Phase::NotReady && rec.network.is_none() && rec.init.is_none() {
            return Ok(());
        }
        let t0 = std::time::Instant::now();
        write_mark(&rec.dir, STOPPING_MARK)?;
        // Its containers are stopped (the caller did that); plugins hear of it while the pod
        // is still whole.
        if self.nri_stopping(&rec).await {
            step_done("pod stop", "nri", t0);
        }
        self.release_runtime_resources(&rec).await?;
        step_done("pod stop", "released", t0);
        rec.phase = Phase::NotReady;
        rec.network = None;
        rec.init = None;
        self.persist(&rec).await?;
        step_done("pod stop", "record", t0);
        self.index.insert(&id, rec.clone());
        self.events
            .publish(EventKind::Stopped, &id, &id, Some(&rec), None);
        Ok(())
    }

    /// Tells NRI plugins that a ready pod stops (once, since a stopped pod is not ready);
    /// whether there were plugins to tell.
    async fn nri_stopping(&self, rec: &SandboxRecord) -> bool {
        let tell = rec.phase == Phase::Ready && self.nri.active();
        if tell {
            self.nri
                .stop_pod_sandbox(&crate::nri::convert::pod(rec))
                .await;
        }
        tell
    }

    /// RemovePodSandbox: stops it if needed and removes it; an unknown id is fine.
    pub async fn remove(&self, id: &str) -> Result<(), SandboxError> {
        let id = match self.resolve_id(id) {
            Ok(id) => id,
            Err(SandboxError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        let _lock = self.locks.lock(&id).await;
        let Some(rec) = self.index.get(&id) else {
            return Ok(());
        };
        let t0 = std::time::Instant::now();
        write_mark(&rec.dir, REMOVING_MARK)?;
        // A pod removed without a stop was still ready: plugins hear of its stop first.
        self.nri_stopping(&rec).await;
        self.destroy(&rec).await?;
        step_done("pod removal", "destroyed", t0);
        let mut b = Batch::new();
        b.delete(Table::Sandboxes, &id);
        self.store.commit(b).await?;
        step_done("pod removal", "record", t0);
        // A crash before this leaves a directory no record names: removed at start.
        remove_pod_dir(&rec.dir);
        step_done("pod removal", "dir removed", t0);
        self.index.remove(&id);
        self.index.release(&rec.name_key);
        self.events
            .publish(EventKind::Deleted, &id, &id, None, None);
        if self.nri.active() {
            self.nri
                .remove_pod_sandbox(&crate::nri::convert::pod(&rec))
                .await;
        }
        Ok(())
    }
}

/// Logs (debug) that `step` of `what` is done, with the milliseconds since `t0` (the
/// benchmarks read these: `hack/bench-lib.sh`'s `bench_steps`).
pub(crate) fn step_done(what: &'static str, step: &'static str, t0: std::time::Instant) {
    tracing::debug!(step, ms = t0.elapsed().as_secs_f64() * 1000.0, "{what}");
}

fn remove_pod_dir(dir: &Path) {
    // Anything still mounted below (a namespace pinned by a crashed daemon) goes first.
    for kind in ["net", "ipc", "uts"] {
        let _ = ns::unpin(&dir.join("ns").join(kind));
    }
    let _ = nix::mount::umount2(&dir.join("shm"), nix::mount::MntFlags::MNT_DETACH);
    if let Err(e) = std::fs::remove_dir_all(dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot remove pod directory");
    }
}

/// CRI port mappings → network port mappings (validated).
fn port_mappings(pms: &[cri::PortMapping]) -> Result<Vec<PortMapping>, SandboxError> {
    let mut out = Vec::new();
    for pm in pms {
        let protocol = match cri::Protocol::try_from(pm.protocol) {
            Ok(cri::Protocol::Tcp) => Protocol::Tcp,
            Ok(cri::Protocol::Udp) => Protocol::Udp,
            Ok(cri::Protocol::Sctp) => Protocol::Sctp,
            Err(_) => {
                return Err(SandboxError::Invalid(format!(
                    "unknown port mapping protocol {}",
                    pm.protocol
                )));
            }
        };
        let port = |p: i32, what: &str| {
            u16::try_from(p)
                .map_err(|_| SandboxError::Invalid(format!("{what} {p} is not a port number")))
        };
        let container_port = port(pm.container_port, "container port")?;
        let host_port = port(pm.host_port, "host port")?;
        if container_port == 0 {
            return Err(SandboxError::Invalid("container port 0".to_string()));
        }
        if !pm.host_ip.is_empty() && pm.host_ip.parse::<IpAddr>().is_err() {
            return Err(SandboxError::Invalid(format!(
                "host IP {:?} is not an address",
                pm.host_ip
            )));
        }
        // A mapping without a host port only documents the container port.
        if host_port == 0 {
            continue;
        }
        out.push(PortMapping {
            protocol,
            container_port,
            host_port,
            host_ip: pm.host_ip.clone(),
        });
    }
    Ok(out)
}

/// CRI namespace options of a record, as PodSandboxStatus reports them.
pub fn namespace_options(rec: &SandboxRecord) -> cri::NamespaceOption {
    rec.namespace_options()
}
