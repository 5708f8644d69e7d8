//! The CNI network backend: standard CNI plugins (bridge, flannel, calico, cilium...) run
//! from the first network configuration in `cni.conf_dir`, as containerd and CRI-O do.
//!
//! - [`conf`]: the first `*.conflist` (or `*.conf`/`*.json`, wrapped into a list) of the conf
//!   dir in lexical order, re-read when it changes; spec 0.1.0 to 1.1.0 configs.
//! - [`exec`]: one plugin run (`CNI_*` environment, config on stdin, result or error on
//!   stdout, a timeout), binaries looked up in `cni.bin_dirs`.
//! - [`args`]: `CNI_ARGS` (`K8S_POD_*`) and the capability arguments for `runtimeConfig`
//!   (`portMappings`, `dns`, `bandwidth`, `ipRanges`, `io.kubernetes.cri.pod-annotations`).
//! - [`cache`]: per attachment, the config, arguments and result of ADD (libcni's layout), so
//!   DEL and CHECK replay exactly what ADD did even after the conflist changed.
//! - [`result`]: a result's addresses → [`PodNetworkStatus`].
//!
//! ADD runs the plugins in order, each getting the previous one's result; if one fails, DEL
//! runs for the whole list in reverse before the error is returned. DEL runs in reverse with
//! the cached config and result as `prevResult`; CHECK (spec ≥ 0.4.0, unless the list says
//! `disableCheck`) likewise in order. The cache must live on persistent storage: IPAM
//! plugins such as host-local keep their reservations across reboots.

pub mod args;
pub mod cache;
pub mod conf;
pub mod exec;
pub mod result;

#[cfg(test)]
mod tests;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ipnet::IpNet;
use serde_json::{Map, Value};

use crate::config::CniConfig;
use crate::locks::KeyedLocks;
use crate::network::{NetworkBackend, NetworkError, PodNetworkRequest, PodNetworkStatus};

use cache::{CACHE_KIND, Cache, CacheEntry};
use conf::{ConfList, ConfSource};
use exec::{Command, Invocation};

/// The pod's interface name (`CNI_IFNAME`).
pub const IFNAME: &str = "eth0";

/// How long one plugin may take before it is killed.
pub const DEFAULT_PLUGIN_TIMEOUT: Duration = Duration::from_secs(60);

/// Pods attached through CNI plugins.
pub struct CniNetwork {
    conf: ConfSource,
    bin_dirs: Vec<PathBuf>,
    cache: Cache,
    /// From `UpdateRuntimeConfig`, offered as the `ipRanges` capability.
    pod_cidrs: RwLock<Vec<IpNet>>,
    locks: KeyedLocks,
    timeout: Duration,
}

/// What a plugin run needs besides its config.
struct Call<'a> {
    list: &'a ConfList,
    container_id: &'a str,
    netns: &'a str,
    cni_args: &'a [[String; 2]],
    capability_args: &'a Map<String, Value>,
}

impl CniNetwork {
    /// A backend reading network configs from `config.conf_dir`, plugins from
    /// `config.bin_dirs`, and keeping its result cache under `cache_dir` (persistent storage,
    /// e.g. `<root>/cni-cache`).
    pub fn new(config: &CniConfig, cache_dir: PathBuf) -> CniNetwork {
        CniNetwork {
            conf: ConfSource::new(config.conf_dir.clone()),
            bin_dirs: config.bin_dirs.clone(),
            cache: Cache::new(&cache_dir),
            pod_cidrs: RwLock::new(Vec::new()),
            locks: KeyedLocks::default(),
            timeout: DEFAULT_PLUGIN_TIMEOUT,
        }
    }

    /// Sets how long one plugin may run (default [`DEFAULT_PLUGIN_TIMEOUT`]).
    pub fn with_plugin_timeout(mut self, timeout: Duration) -> CniNetwork {
        self.timeout = timeout;
        self
    }

    /// The directory of the result cache entries.
    pub fn cache_results_dir(&self) -> &Path {
        self.cache.dir()
    }

    /// The network configuration in force.
    pub fn current_config(&self) -> Result<Arc<ConfList>, NetworkError> {
        self.conf.current().map_err(NetworkError::NotReady)
    }

    /// The binaries of a list's plugins, or which plugin is missing.
    fn plugin_binaries(&self, list: &ConfList) -> Result<Vec<PathBuf>, NetworkError> {
        list.plugins
            .iter()
            .map(|p| {
                exec::find_plugin(&self.bin_dirs, &p.plugin_type).ok_or_else(|| {
                    NetworkError::NotReady(format!(
                        "network {}: CNI plugin {:?} not found in {}",
                        list.name,
                        p.plugin_type,
                        exec::cni_path(&self.bin_dirs)
                    ))
                })
            })
            .collect()
    }

    fn pod_cidrs(&self) -> Vec<IpNet> {
        self.pod_cidrs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    async fn run(
        &self,
        call: &Call<'_>,
        command: Command,
        index: usize,
        binary: &Path,
        prev_result: Option<&Value>,
    ) -> Result<Vec<u8>, NetworkError> {
        let plugin = &call.list.plugins[index];
        let stdin = call
            .list
            .plugin_stdin(index, prev_result, call.capability_args)?;
        let inv = Invocation {
            command,
            container_id: call.container_id.to_string(),
            netns: call.netns.to_string(),
            ifname: IFNAME.to_string(),
            args: args::cni_args_string(call.cni_args),
            path: exec::cni_path(&self.bin_dirs),
        };
        tracing::debug!(
            pod = call.container_id,
            network = %call.list.name,
            plugin = %plugin.plugin_type,
            command = command.as_str(),
            "running CNI plugin"
        );
        exec::run_plugin(binary, &plugin.plugin_type, &inv, &stdin, self.timeout).await
    }

    /// ADD through the list; returns the final result.
    async fn add_list(
        &self,
        call: &Call<'_>,
        binaries: &[PathBuf],
    ) -> Result<Value, (NetworkError, Option<Value>)> {
        let mut prev: Option<Value> = None;
        for (i, binary) in binaries.iter().enumerate() {
            let out = match self.run(call, Command::Add, i, binary, prev.as_ref()).await {
                Ok(out) => out,
                Err(e) => return Err((e, prev)),
            };
            match serde_json::from_slice::<Value>(&out) {
                Ok(v @ Value::Object(_)) => prev = Some(v),
                _ => {
                    let e = NetworkError::Plugin {
                        plugin: call.list.plugins[i].plugin_type.clone(),
                        command: "ADD".to_string(),
                        code: 0,
                        msg: format!("invalid result: {}", String::from_utf8_lossy(&out).trim()),
                    };
                    return Err((e, prev));
                }
            }
        }
        prev.ok_or_else(|| {
            (
                NetworkError::Invalid(format!("network {} has no plugins", call.list.name)),
                None,
            )
        })
    }

    /// DEL through the whole list in reverse. Every plugin found runs even when one fails
    /// or another is missing (DEL is idempotent, so a later retry redoes the lot); the first
    /// error is returned.
    async fn del_list(
        &self,
        call: &Call<'_>,
        prev_result: Option<&Value>,
    ) -> Result<(), NetworkError> {
        let mut first_err = None;
        for (i, plugin) in call.list.plugins.iter().enumerate().rev() {
            let done = match exec::find_plugin(&self.bin_dirs, &plugin.plugin_type) {
                Some(binary) => self.run(call, Command::Del, i, &binary, prev_result).await,
                None => Err(NetworkError::NotReady(format!(
                    "network {}: CNI plugin {:?} not found in {}",
                    call.list.name,
                    plugin.plugin_type,
                    exec::cni_path(&self.bin_dirs)
                ))),
            };
            if let Err(e) = done {
                tracing::warn!(pod = call.container_id, network = %call.list.name, "CNI DEL: {e}");
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// DEL for a cache entry, with the config, arguments and result it recorded; removes the
    /// entry when DEL succeeded. An entry whose config berth cannot read (e.g. written by a
    /// newer berth) gets a best-effort DEL with the current config instead, and is removed.
    async fn del_cached(
        &self,
        path: &Path,
        entry: &CacheEntry,
        netns: &str,
    ) -> Result<(), NetworkError> {
        match entry
            .config_bytes()
            .and_then(|b| ConfList::from_list_bytes(&b))
        {
            Ok(list) => {
                let call = Call {
                    list: &list,
                    container_id: &entry.container_id,
                    netns,
                    cni_args: &entry.cni_args,
                    capability_args: &entry.capability_args,
                };
                self.del_list(&call, entry.result.as_ref()).await?;
            }
            Err(e) => {
                tracing::warn!(pod = %entry.container_id, "CNI cache entry {}: {e}", path.display());
                self.del_with_current_config(
                    &entry.container_id,
                    netns,
                    &entry.cni_args,
                    &entry.capability_args,
                )
                .await;
            }
        }
        self.cache.remove(path)
    }

    /// DEL with the current config for an attachment whose record is unreadable; best
    /// effort, since the record would have said what to undo.
    async fn del_with_current_config(
        &self,
        container_id: &str,
        netns: &str,
        cni_args: &[[String; 2]],
        capability_args: &Map<String, Value>,
    ) {
        let Ok(list) = self.conf.current() else {
            return;
        };
        let call = Call {
            list: &list,
            container_id,
            netns,
            cni_args,
            capability_args,
        };
        if let Err(e) = self.del_list(&call, None).await {
            tracing::warn!(pod = container_id, "CNI DEL without a usable record: {e}");
        }
    }

    /// DEL for an unreadable cache file of the pod `req`, then drops the file.
    async fn del_unreadable(
        &self,
        path: &Path,
        why: &str,
        req: &PodNetworkRequest,
    ) -> Result<(), NetworkError> {
        tracing::warn!(pod = %req.pod_id, "unreadable CNI cache entry {}: {why}", path.display());
        let mut plain = req.clone();
        plain.annotations.clear();
        let caps = args::capability_args(&plain, &[]).unwrap_or_default();
        let netns = req.netns_path.to_string_lossy();
        self.del_with_current_config(&req.pod_id, &netns, &args::cni_args(req), &caps)
            .await;
        self.cache.remove(path)
    }

    async fn setup_locked(
        &self,
        req: &PodNetworkRequest,
    ) -> Result<PodNetworkStatus, NetworkError> {
        let netns = req.netns_path.to_string_lossy().into_owned();
        // Already attached: the same answer again. A half-done ADD (berthd died) or an
        // unreadable entry is undone first.
        for (path, entry) in self.cache.find(&req.pod_id, IFNAME)? {
            match entry {
                Ok(entry) => {
                    if let Some(status) = entry
                        .result
                        .as_ref()
                        .and_then(|r| result::pod_status(r, IFNAME).ok())
                    {
                        return Ok(status);
                    }
                    self.del_cached(&path, &entry, &netns).await?;
                }
                Err(e) => self.del_unreadable(&path, &e, req).await?,
            }
        }
        let list = self.current_config()?;
        let binaries = self.plugin_binaries(&list)?;
        let caps = args::capability_args(req, &self.pod_cidrs())?;
        let cni_args = args::cni_args(req);
        let mut entry = CacheEntry {
            kind: CACHE_KIND.to_string(),
            container_id: req.pod_id.clone(),
            config: CacheEntry::encode_config(&list.bytes),
            if_name: IFNAME.to_string(),
            network_name: list.name.clone(),
            netns: netns.clone(),
            cni_args,
            capability_args: caps,
            result: None,
        };
        let path = self.cache.path(&list.name, &req.pod_id, IFNAME);
        self.cache.write(&entry)?;
        let call = Call {
            list: &list,
            container_id: &req.pod_id,
            netns: &netns,
            cni_args: &entry.cni_args,
            capability_args: &entry.capability_args,
        };
        let outcome = match self.add_list(&call, &binaries).await {
            Ok(res) => match result::pod_status(&res, IFNAME) {
                Ok(status) => Ok((res, status)),
                Err(e) => Err((
                    NetworkError::Invalid(format!("network {}: {e}", list.name)),
                    Some(res),
                )),
            },
            Err(e) => Err(e),
        };
        let failure = match outcome {
            Ok((res, status)) => {
                entry.result = Some(res.clone());
                match self.cache.write(&entry) {
                    Ok(()) => {
                        tracing::info!(pod = %req.pod_id, network = %list.name, ips = ?status.ips, "pod attached (CNI)");
                        return Ok(status);
                    }
                    Err(e) => (e, Some(res)),
                }
            }
            Err(f) => f,
        };
        let (err, prev) = failure;
        // Undo: DEL for the whole list, so no address, link or rule stays behind. The entry
        // stays when that fails, for teardown or repair to retry.
        match self.del_list(&call, prev.as_ref()).await {
            Ok(()) => {
                if let Err(e) = self.cache.remove(&path) {
                    tracing::warn!(pod = %req.pod_id, "{e}");
                }
            }
            Err(del_err) => {
                tracing::warn!(pod = %req.pod_id, "undoing a failed CNI ADD: {del_err}");
            }
        }
        Err(err)
    }

    async fn teardown_locked(&self, req: &PodNetworkRequest) -> Result<(), NetworkError> {
        let netns = req.netns_path.to_string_lossy().into_owned();
        let entries = self.cache.find(&req.pod_id, IFNAME)?;
        // Nothing recorded, nothing attached: the record is written before the first
        // plugin runs.
        if entries.is_empty() {
            return Ok(());
        }
        let mut first_err = None;
        for (path, entry) in entries {
            let done = match entry {
                Ok(entry) => self.del_cached(&path, &entry, &netns).await,
                Err(e) => self.del_unreadable(&path, &e, req).await,
            };
            if let Err(e) = done {
                first_err.get_or_insert(e);
            }
        }
        match first_err {
            None => {
                tracing::info!(pod = %req.pod_id, "pod detached (CNI)");
                Ok(())
            }
            Some(e) => Err(e),
        }
    }
}

/// A request that knows only the pod id (for a pod known only from a damaged record).
fn bare_request(pod_id: &str) -> PodNetworkRequest {
    PodNetworkRequest {
        pod_id: pod_id.to_string(),
        name: String::new(),
        namespace: String::new(),
        uid: String::new(),
        netns_path: PathBuf::new(),
        port_mappings: Vec::new(),
        dns: Default::default(),
        annotations: Default::default(),
    }
}

/// Pod ids name cache files: only what a sandbox id can hold.
fn validate_pod_id(id: &str) -> Result<(), NetworkError> {
    if id.is_empty() || id.len() > 128 || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        return Err(NetworkError::Invalid(format!("invalid pod id {id:?}")));
    }
    Ok(())
}

#[tonic::async_trait]
impl NetworkBackend for CniNetwork {
    /// Ready when the first config of the conf dir parses and all its plugins are installed.
    fn describe(&self) -> serde_json::Value {
        let network = match self.conf.current() {
            Ok(list) => serde_json::json!({
                "name": list.name,
                "cniVersion": list.cni_version,
                "plugins": list.plugins.iter().map(|p| p.plugin_type.as_str()).collect::<Vec<_>>(),
                "config": serde_json::from_slice::<serde_json::Value>(&list.bytes)
                    .unwrap_or(serde_json::Value::Null),
            }),
            Err(e) => serde_json::json!({ "error": e }),
        };
        let cidrs: Vec<String> = self
            .pod_cidrs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(ToString::to_string)
            .collect();
        serde_json::json!({
            "mode": "cni",
            "confDir": self.conf.dir(),
            "binDirs": self.bin_dirs,
            "podCidrs": cidrs,
            "network": network,
        })
    }

    async fn ready(&self) -> Result<(), String> {
        let list = self.conf.current()?;
        self.plugin_binaries(&list)
            .map(|_| ())
            .map_err(|e| match e {
                NetworkError::NotReady(m) => m,
                other => other.to_string(),
            })
    }

    async fn setup(&self, req: &PodNetworkRequest) -> Result<PodNetworkStatus, NetworkError> {
        validate_pod_id(&req.pod_id)?;
        let _guard = self.locks.lock(&req.pod_id).await;
        self.setup_locked(req).await
    }

    async fn teardown(&self, req: &PodNetworkRequest) -> Result<(), NetworkError> {
        validate_pod_id(&req.pod_id)?;
        let _guard = self.locks.lock(&req.pod_id).await;
        self.teardown_locked(req).await
    }

    async fn check(&self, req: &PodNetworkRequest) -> Result<(), NetworkError> {
        validate_pod_id(&req.pod_id)?;
        let _guard = self.locks.lock(&req.pod_id).await;
        let netns = req.netns_path.to_string_lossy().into_owned();
        let attached = self
            .cache
            .find(&req.pod_id, IFNAME)?
            .into_iter()
            .filter_map(|(path, e)| e.ok().filter(|e| e.result.is_some()).map(|e| (path, e)))
            .collect::<Vec<_>>();
        if attached.is_empty() {
            return Err(NetworkError::NotReady(format!(
                "pod {} is not attached to a CNI network",
                req.pod_id
            )));
        }
        for (path, entry) in attached {
            let list = entry
                .config_bytes()
                .and_then(|b| ConfList::from_list_bytes(&b))
                .map_err(|e| {
                    NetworkError::Invalid(format!("cache entry {}: {e}", path.display()))
                })?;
            if !list.version.supports_check() || list.disable_check {
                continue;
            }
            let binaries = self.plugin_binaries(&list)?;
            let call = Call {
                list: &list,
                container_id: &entry.container_id,
                netns: &netns,
                cni_args: &entry.cni_args,
                capability_args: &entry.capability_args,
            };
            for (i, binary) in binaries.iter().enumerate() {
                self.run(&call, Command::Check, i, binary, entry.result.as_ref())
                    .await?;
            }
        }
        Ok(())
    }

    /// The network config defines its own address ranges (host-local `ranges`, flannel's
    /// subnet file, calico's pools), so there is nothing to configure. The CIDRs are kept and
    /// offered as the `ipRanges` capability, used only by a config whose IPAM declares
    /// `"capabilities": {"ipRanges": true}` (as the kubelet's CNI code did).
    async fn set_pod_cidr(&self, cidr: &str) -> Result<(), NetworkError> {
        let cidrs = cidr
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse::<IpNet>()
                    .map(|n| n.trunc())
                    .map_err(|_| NetworkError::Invalid(format!("invalid pod CIDR {s:?}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        *self.pod_cidrs.write().unwrap_or_else(|p| p.into_inner()) = cidrs;
        Ok(())
    }

    /// DEL for every cached attachment of a pod not in `live` (with the netns path it had,
    /// which plugins tolerate being gone), dropping its cache entry. All are tried; the
    /// first failure is returned and its entry kept for the next repair.
    async fn repair(&self, live: &[PodNetworkRequest]) -> Result<(), NetworkError> {
        self.cache.remove_stale_temp_files();
        let live: BTreeSet<&str> = live.iter().map(|r| r.pod_id.as_str()).collect();
        let mut first_err = None;
        for (path, entry) in self.cache.all()? {
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!("unreadable CNI cache entry {}: {e}", path.display());
                    // `<network>-<pod id>-eth0`; pod ids hold no '-'.
                    let id = path
                        .file_name()
                        .and_then(|n| n.to_str())
                        .and_then(|n| n.strip_suffix(&format!("-{IFNAME}")))
                        .and_then(|n| n.rsplit('-').next())
                        .filter(|id| validate_pod_id(id).is_ok() && !live.contains(id));
                    if let Some(id) = id {
                        let _guard = self.locks.lock(id).await;
                        let caps = args::capability_args(&bare_request(id), &[])?;
                        self.del_with_current_config(id, "", &[], &caps).await;
                        if let Err(e) = self.cache.remove(&path) {
                            first_err.get_or_insert(e);
                        }
                    }
                    continue;
                }
            };
            if live.contains(entry.container_id.as_str()) {
                continue;
            }
            let _guard = self.locks.lock(&entry.container_id).await;
            tracing::info!(pod = %entry.container_id, network = %entry.network_name, "releasing the CNI attachment of a gone pod");
            if let Err(e) = self.del_cached(&path, &entry, &entry.netns).await {
                tracing::warn!(pod = %entry.container_id, "repair: {e}");
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}
