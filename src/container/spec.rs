//! The OCI runtime spec (`config.json`) of a container, built from its CRI config, its pod
//! sandbox and its image, following containerd's CRI plugin:
//!
//! - process: Kubernetes command/args over the image's Entrypoint/Cmd, image env then CRI
//!   env (by name), working dir, tty, user and groups resolved in the image
//!   ([`super::user`]), capabilities ([`caps`]), no_new_privs, oom_score_adj (never below
//!   berthd's own), no rlimits;
//! - namespaces: the pod's pinned net/IPC/UTS namespaces (or the host's), a PID namespace
//!   per container, the pod's, or the host's, a new mount namespace (and a cgroup namespace
//!   on cgroup v2 for unprivileged containers);
//! - mounts ([`mounts`]), devices ([`devices`]), seccomp ([`super::seccomp`]), masked and
//!   read-only paths, resources, the CRI annotations, the rootfs (read-only on request).
//!
//! Invalid input is a [`SpecError::Invalid`] (the server answers `InvalidArgument`).

pub mod caps;
pub mod devices;
pub mod lsm;
pub mod mounts;
#[cfg(test)]
mod runc_tests;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::cri::v1 as cri;
use oci_spec::runtime::{
    LinuxCpu, LinuxDeviceCgroup, LinuxHugepageLimit, LinuxMemory, LinuxNamespace,
    LinuxNamespaceType, LinuxResources, Process, Root, Spec, User,
};
use serde::Deserialize;

use super::seccomp::{self, Profile, SeccompError};
use super::user::{self, UserError, UserRequest};
use crate::sandbox::SandboxRecord;

/// What a container's spec is built from.
pub struct SpecInput<'a> {
    pub container_id: &'a str,
    pub config: &'a cri::ContainerConfig,
    pub sandbox: &'a SandboxRecord,
    /// The OCI image config JSON (as stored: `{"config": {"Entrypoint","Cmd","Env","User",
    /// "WorkingDir","StopSignal",...}, ...}`).
    pub image_config: &'a serde_json::Value,
    /// The container's mounted rootfs (its /etc/passwd and /etc/group resolve users).
    pub rootfs: &'a Path,
    /// OCI `linux.cgroupsPath` (cgroupfs `/a/b/<id>` or systemd `slice:prefix:name`).
    pub cgroups_path: String,
    /// The PID namespace to join when the pod shares one (`/proc/<init pid>/ns/pid`; for
    /// `NamespaceMode::TARGET`, the target container's). `None`: a new one unless NODE.
    pub pod_pid_ns: Option<PathBuf>,
    /// The pod's /dev/shm to bind at /dev/shm; `None`: a private tmpfs. (containerd binds the
    /// host's `/dev/shm` for a pod in the host IPC namespace: pass `/dev/shm` then.)
    pub pod_shm: Option<PathBuf>,
    /// The lowest oom_score_adj berthd may give (its own); lower requests are raised to it.
    pub min_oom_score_adj: i32,
    /// What was prepared on the host for the mounts ([`mounts::host_work`]).
    pub prepared: &'a mounts::Prepared,
}

/// Errors building a spec.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The config (or what it points at: a user, a host path, a profile) is unusable.
    #[error("invalid container config: {0}")]
    Invalid(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
}

pub(crate) fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> SpecError {
    let context = context.into();
    move |source| SpecError::Io { context, source }
}

impl From<UserError> for SpecError {
    fn from(e: UserError) -> SpecError {
        match e {
            UserError::Io { path, source } => SpecError::Io {
                context: format!("read {} of the image", path.display()),
                source,
            },
            other => SpecError::Invalid(other.to_string()),
        }
    }
}

impl From<SeccompError> for SpecError {
    fn from(e: SeccompError) -> SpecError {
        SpecError::Invalid(e.to_string())
    }
}

/// The `ociVersion` berth writes.
pub const OCI_VERSION: &str = "1.0.2-dev";

/// `PATH` when the image sets none.
pub const DEFAULT_PATH_ENV: &str =
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The annotations containerd's CRI plugin puts on a container's spec.
pub mod annotations {
    pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
    pub const CONTAINER_TYPE_CONTAINER: &str = "container";
    pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
    pub const SANDBOX_NAME: &str = "io.kubernetes.cri.sandbox-name";
    pub const SANDBOX_NAMESPACE: &str = "io.kubernetes.cri.sandbox-namespace";
    pub const SANDBOX_UID: &str = "io.kubernetes.cri.sandbox-uid";
    pub const CONTAINER_NAME: &str = "io.kubernetes.cri.container-name";
    pub const IMAGE_NAME: &str = "io.kubernetes.cri.image-name";
}

/// Paths masked in unprivileged containers (Kubernetes' defaults).
pub const DEFAULT_MASKED_PATHS: &[&str] = &[
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// Paths read-only in unprivileged containers (Kubernetes' defaults).
pub const DEFAULT_READONLY_PATHS: &[&str] = &[
    "/proc/asound",
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// The parts of an OCI image config a spec uses.
#[derive(Debug, Default, Deserialize)]
pub struct ImageConfig {
    #[serde(rename = "Entrypoint", default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(rename = "Cmd", default)]
    pub cmd: Option<Vec<String>>,
    #[serde(rename = "Env", default)]
    pub env: Option<Vec<String>>,
    #[serde(rename = "User", default)]
    pub user: Option<String>,
    #[serde(rename = "WorkingDir", default)]
    pub working_dir: Option<String>,
    /// `VOLUME`s: container paths (the values are empty objects).
    #[serde(rename = "Volumes", default)]
    pub volumes: Option<HashMap<String, serde_json::Value>>,
}

impl ImageConfig {
    /// From a stored image config (`{"config": {...}}`; a bare `{...}` config is taken too).
    pub fn from_json(v: &serde_json::Value) -> Result<ImageConfig, SpecError> {
        let inner = match v.get("config") {
            Some(serde_json::Value::Null) => return Ok(ImageConfig::default()),
            Some(c) => c,
            None if v.get("Entrypoint").is_some()
                || v.get("Cmd").is_some()
                || v.get("Env").is_some()
                || v.get("Volumes").is_some() =>
            {
                v
            }
            None => return Ok(ImageConfig::default()),
        };
        ImageConfig::deserialize(inner)
            .map_err(|e| SpecError::Invalid(format!("the image config is unusable: {e}")))
    }
}

/// What cgroup features the host has (they decide whether swap and hugetlb limits apply).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgroupFeatures {
    /// cgroup v2 (unified) only.
    pub unified: bool,
    /// Swap accounting (`memory.memsw.*` on v1, `memory.swap.max` on v2).
    pub swap: bool,
    pub hugetlb: bool,
}

impl CgroupFeatures {
    /// The host's (probed once).
    pub fn host() -> CgroupFeatures {
        static FEATURES: OnceLock<CgroupFeatures> = OnceLock::new();
        *FEATURES.get_or_init(|| {
            let root = Path::new("/sys/fs/cgroup");
            let unified = root.join("cgroup.controllers").exists();
            if unified {
                let controllers =
                    std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
                let has = |c: &str| controllers.split_whitespace().any(|x| x == c);
                // The root cgroup has no memory.swap.max; any child with memory does.
                let swap = std::fs::read_dir(root)
                    .map(|rd| {
                        rd.flatten()
                            .any(|e| e.path().join("memory.swap.max").exists())
                    })
                    .unwrap_or(false);
                CgroupFeatures {
                    unified,
                    swap,
                    hugetlb: has("hugetlb"),
                }
            } else {
                CgroupFeatures {
                    unified,
                    swap: root.join("memory/memory.memsw.limit_in_bytes").exists(),
                    hugetlb: root.join("hugetlb").exists(),
                }
            }
        })
    }
}

/// Builds the OCI spec of a container.
pub fn build_spec(input: &SpecInput<'_>) -> Result<Spec, SpecError> {
    build_spec_with(input, CgroupFeatures::host())
}

/// [`build_spec`] for given cgroup features.
pub fn build_spec_with(input: &SpecInput<'_>, cgroups: CgroupFeatures) -> Result<Spec, SpecError> {
    let config = input.config;
    let linux = config.linux.clone().unwrap_or_default();
    let sc = linux.security_context.clone().unwrap_or_default();
    let privileged = sc.privileged;
    if privileged && !sandbox_privileged(input.sandbox) {
        return Err(SpecError::Invalid(
            "no privileged container allowed in a sandbox that is not privileged".to_string(),
        ));
    }
    if !input.rootfs.is_absolute() {
        return Err(SpecError::Invalid(format!(
            "the rootfs {} is not an absolute path",
            input.rootfs.display()
        )));
    }
    let image = ImageConfig::from_json(input.image_config)?;

    // Process.
    let args = process_args(config, &image)?;
    let env = environment(config, &image, &input.sandbox.hostname)?;
    let cwd = working_dir(config, &image);
    let resolved = resolve_user(input.rootfs, &sc, &image)?;
    let (cap_set, ambient) = caps::resolve(&sc, privileged)?;
    let apparmor = lsm::apparmor_profile(&sc, privileged)?;
    lsm::check_selinux(sc.selinux_options.as_ref(), "container").map_err(SpecError::Invalid)?;
    lsm::check_userns(sc.namespace_options.as_ref(), "the container")
        .map_err(SpecError::Invalid)?;
    let mut process = Process::default();
    let mut user = User::default();
    user.set_uid(resolved.uid)
        .set_gid(resolved.gid)
        .set_additional_gids(Some(resolved.additional_gids));
    process
        .set_terminal(Some(config.tty))
        .set_args(Some(args))
        .set_env(Some(env))
        .set_cwd(PathBuf::from(cwd))
        .set_user(user)
        .set_capabilities(Some(caps::to_linux(&cap_set, &ambient)))
        .set_rlimits(None)
        .set_no_new_privileges(Some(sc.no_new_privs))
        .set_apparmor_profile(apparmor)
        .set_selinux_label(None)
        .set_oom_score_adj(linux.resources.as_ref().map(|r| {
            let adj = r.oom_score_adj.clamp(-1000, 1000) as i32;
            adj.max(input.min_oom_score_adj)
        }));

    // Seccomp: privileged containers run unconfined whatever profile they name (containerd;
    // critest checks it).
    let profile = seccomp::select(&sc)?;
    let profile = if privileged {
        Profile::Unconfined
    } else {
        profile
    };
    let seccomp = seccomp::resolve(&profile, &cap_set.names())?;

    let mount_plan = mounts::build(input, privileged, sc.readonly_rootfs)?;
    let device_plan = devices::build(config, privileged)?;
    let namespaces = namespaces(input, &sc, privileged, cgroups)?;
    let resources = resources(linux.resources.as_ref(), device_plan.rules, cgroups)?;

    let (masked, readonly) = if privileged {
        (Vec::new(), Vec::new())
    } else {
        (
            if sc.masked_paths.is_empty() {
                to_strings(DEFAULT_MASKED_PATHS)
            } else {
                sc.masked_paths.clone()
            },
            if sc.readonly_paths.is_empty() {
                to_strings(DEFAULT_READONLY_PATHS)
            } else {
                sc.readonly_paths.clone()
            },
        )
    };

    let mut oci_linux = oci_spec::runtime::Linux::default();
    oci_linux
        .set_uid_mappings(None)
        .set_gid_mappings(None)
        .set_sysctl(None)
        .set_resources(Some(resources))
        .set_cgroups_path(Some(PathBuf::from(&input.cgroups_path)))
        .set_namespaces(Some(namespaces))
        .set_devices((!device_plan.devices.is_empty()).then_some(device_plan.devices))
        .set_seccomp(seccomp)
        .set_rootfs_propagation(mount_plan.rootfs_propagation)
        .set_masked_paths(Some(masked))
        .set_readonly_paths(Some(readonly))
        .set_mount_label(None);

    let mut root = Root::default();
    root.set_path(input.rootfs.to_path_buf())
        .set_readonly(Some(sc.readonly_rootfs));

    let mut spec = Spec::default();
    spec.set_version(OCI_VERSION.to_string())
        .set_root(Some(root))
        .set_mounts(Some(mount_plan.mounts))
        .set_process(Some(process))
        .set_hostname(
            input
                .sandbox
                .own_uts
                .then(|| input.sandbox.hostname.clone()),
        )
        .set_domainname(None)
        .set_hooks(None)
        .set_annotations(Some(spec_annotations(input)))
        .set_linux(Some(oci_linux));
    Ok(spec)
}

fn to_strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn sandbox_privileged(sandbox: &SandboxRecord) -> bool {
    sandbox
        .config
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .is_some_and(|s| s.privileged)
}

/// Kubernetes command/args over the image's Entrypoint/Cmd (Docker's rules).
pub fn process_args(
    config: &cri::ContainerConfig,
    image: &ImageConfig,
) -> Result<Vec<String>, SpecError> {
    let mut command = config.command.clone();
    let mut args = config.args.clone();
    if command.is_empty() {
        if args.is_empty() {
            args = image.cmd.clone().unwrap_or_default();
        }
        let entrypoint = image.entrypoint.clone().unwrap_or_default();
        // `ENTRYPOINT [""]` clears the entrypoint.
        if !(entrypoint.len() == 1 && entrypoint[0].is_empty()) {
            command = entrypoint;
        }
    }
    command.extend(args);
    if command.is_empty() {
        return Err(SpecError::Invalid(
            "no command specified (neither the config nor the image has one)".to_string(),
        ));
    }
    Ok(command)
}

/// `PATH` (default), `HOSTNAME`, then the image's env, then the config's, later ones
/// replacing earlier ones of the same name in place.
pub fn environment(
    config: &cri::ContainerConfig,
    image: &ImageConfig,
    hostname: &str,
) -> Result<Vec<String>, SpecError> {
    let mut env: Vec<String> = vec![DEFAULT_PATH_ENV.to_string(), format!("HOSTNAME={hostname}")];
    fn set(env: &mut Vec<String>, entry: String) {
        let key = entry.split_once('=').map_or(entry.as_str(), |(k, _)| k);
        let pos = env
            .iter()
            .position(|e| e.split_once('=').map_or(e.as_str(), |(k, _)| k) == key);
        match pos {
            Some(i) => env[i] = entry,
            None => env.push(entry),
        }
    }
    for e in image.env.iter().flatten() {
        if !e.is_empty() {
            set(&mut env, e.clone());
        }
    }
    for kv in &config.envs {
        if kv.key.is_empty() || kv.key.contains('=') {
            return Err(SpecError::Invalid(format!(
                "invalid environment variable name {:?}",
                kv.key
            )));
        }
        let value = std::str::from_utf8(&kv.value).map_err(|_| {
            SpecError::Invalid(format!(
                "the value of environment variable {:?} is not valid UTF-8",
                kv.key
            ))
        })?;
        set(&mut env, format!("{}={value}", kv.key));
    }
    Ok(env)
}

/// The config's working dir, else the image's, else `/` (made absolute).
pub fn working_dir(config: &cri::ContainerConfig, image: &ImageConfig) -> String {
    let dir = if !config.working_dir.is_empty() {
        config.working_dir.clone()
    } else {
        image.working_dir.clone().unwrap_or_default()
    };
    if dir.is_empty() {
        "/".to_string()
    } else if dir.starts_with('/') {
        dir
    } else {
        format!("/{dir}")
    }
}

/// The user from the security context (run_as_username, run_as_user, run_as_group), else
/// the image's `User`, else root; resolved in the rootfs.
fn resolve_user(
    rootfs: &Path,
    sc: &cri::LinuxContainerSecurityContext,
    image: &ImageConfig,
) -> Result<user::ResolvedUser, SpecError> {
    let run_as_user = sc.run_as_user.as_ref().map(|v| v.value);
    let run_as_group = sc.run_as_group.as_ref().map(|v| v.value);
    let id = |v: i64, what: &str| {
        u32::try_from(v).map_err(|_| SpecError::Invalid(format!("{what} {v} is out of range")))
    };
    let uid_text;
    let gid_text;
    let (user_part, group_part): (&str, Option<&str>) = if !sc.run_as_username.is_empty() {
        (sc.run_as_username.as_str(), None)
    } else if let Some(uid) = run_as_user {
        uid_text = id(uid, "run_as_user")?.to_string();
        (uid_text.as_str(), None)
    } else if run_as_group.is_some() {
        return Err(SpecError::Invalid(
            "run_as_group is set without run_as_user or run_as_username".to_string(),
        ));
    } else {
        match image
            .user
            .as_deref()
            .map(str::trim)
            .filter(|u| !u.is_empty())
        {
            Some(u) => user::split_user(u)?,
            None => ("0", None),
        }
    };
    let group_part = match run_as_group {
        Some(gid) => {
            gid_text = id(gid, "run_as_group")?.to_string();
            Some(gid_text.as_str())
        }
        None => group_part,
    };
    let supplemental = sc
        .supplemental_groups
        .iter()
        .map(|g| id(*g, "supplemental group"))
        .collect::<Result<Vec<u32>, SpecError>>()?;
    let merge = match cri::SupplementalGroupsPolicy::try_from(sc.supplemental_groups_policy) {
        Ok(cri::SupplementalGroupsPolicy::Merge) => true,
        Ok(cri::SupplementalGroupsPolicy::Strict) => false,
        Err(_) => {
            return Err(SpecError::Invalid(format!(
                "unknown supplemental_groups_policy {}",
                sc.supplemental_groups_policy
            )));
        }
    };
    Ok(user::resolve(
        rootfs,
        &UserRequest {
            user: user_part,
            group: group_part,
            supplemental_groups: &supplemental,
            merge_image_groups: merge,
        },
    )?)
}

fn namespace(typ: LinuxNamespaceType, path: Option<PathBuf>) -> LinuxNamespace {
    let mut ns = LinuxNamespace::default();
    ns.set_typ(typ).set_path(path);
    ns
}

/// The namespaces of a container (absent = the host's).
fn namespaces(
    input: &SpecInput<'_>,
    sc: &cri::LinuxContainerSecurityContext,
    privileged: bool,
    cgroups: CgroupFeatures,
) -> Result<Vec<LinuxNamespace>, SpecError> {
    let opts = sc.namespace_options.clone().unwrap_or_default();
    let pid_mode = cri::NamespaceMode::try_from(opts.pid)
        .map_err(|_| SpecError::Invalid(format!("unknown PID namespace mode {}", opts.pid)))?;
    let mut out = Vec::new();
    match pid_mode {
        cri::NamespaceMode::Container => out.push(namespace(LinuxNamespaceType::Pid, None)),
        cri::NamespaceMode::Pod => {
            out.push(namespace(LinuxNamespaceType::Pid, input.pod_pid_ns.clone()))
        }
        cri::NamespaceMode::Node => {}
        cri::NamespaceMode::Target => match &input.pod_pid_ns {
            Some(p) => out.push(namespace(LinuxNamespaceType::Pid, Some(p.clone()))),
            None => {
                return Err(SpecError::Invalid(format!(
                    "the PID namespace of target container {:?} is unknown",
                    opts.target_id
                )));
            }
        },
    }
    let sandbox = input.sandbox;
    for (typ, path) in [
        (LinuxNamespaceType::Network, sandbox.netns_path()),
        (LinuxNamespaceType::Ipc, sandbox.ipcns_path()),
        (LinuxNamespaceType::Uts, sandbox.utsns_path()),
    ] {
        if let Some(p) = path {
            out.push(namespace(typ, Some(p)));
        }
    }
    out.push(namespace(LinuxNamespaceType::Mount, None));
    // A cgroup namespace hides the host's hierarchy; containerd uses one on v2 only.
    if cgroups.unified && !privileged {
        out.push(namespace(LinuxNamespaceType::Cgroup, None));
    }
    Ok(out)
}

/// `linux.resources` for `runc update --resources` (device rules are left as they are).
pub fn resources_to_oci(r: &cri::LinuxContainerResources) -> Result<LinuxResources, SpecError> {
    let mut out = resources(Some(r), vec![], CgroupFeatures::host())?;
    out.set_devices(None);
    Ok(out)
}

/// `linux.resources` of a container.
fn resources(
    r: Option<&cri::LinuxContainerResources>,
    device_rules: Vec<LinuxDeviceCgroup>,
    cgroups: CgroupFeatures,
) -> Result<LinuxResources, SpecError> {
    let mut out = LinuxResources::default();
    out.set_devices(Some(device_rules));
    let Some(r) = r else {
        return Ok(out);
    };
    let non_negative = |v: i64, what: &str| {
        u64::try_from(v).map_err(|_| SpecError::Invalid(format!("{what} {v} is negative")))
    };
    let mut cpu = LinuxCpu::default();
    if r.cpu_period != 0 {
        cpu.set_period(Some(non_negative(r.cpu_period, "cpu_period")?));
    }
    if r.cpu_quota != 0 {
        cpu.set_quota(Some(r.cpu_quota));
    }
    if r.cpu_shares != 0 {
        cpu.set_shares(Some(non_negative(r.cpu_shares, "cpu_shares")?));
    }
    if !r.cpuset_cpus.is_empty() {
        check_cpuset(&r.cpuset_cpus, "cpuset_cpus")?;
        cpu.set_cpus(Some(r.cpuset_cpus.clone()));
    }
    if !r.cpuset_mems.is_empty() {
        check_cpuset(&r.cpuset_mems, "cpuset_mems")?;
        cpu.set_mems(Some(r.cpuset_mems.clone()));
    }
    if cpu != LinuxCpu::default() {
        out.set_cpu(Some(cpu));
    }
    let mut memory = LinuxMemory::default();
    if r.memory_limit_in_bytes != 0 {
        memory.set_limit(Some(r.memory_limit_in_bytes));
        // Swap equal to the limit: no swapping unless asked (containerd).
        if r.memory_swap_limit_in_bytes == 0 && cgroups.swap {
            memory.set_swap(Some(r.memory_limit_in_bytes));
        }
    }
    if r.memory_swap_limit_in_bytes != 0 && cgroups.swap {
        memory.set_swap(Some(r.memory_swap_limit_in_bytes));
    }
    if memory != LinuxMemory::default() {
        out.set_memory(Some(memory));
    }
    if !r.hugepage_limits.is_empty() {
        if cgroups.hugetlb {
            let mut limits = Vec::new();
            for h in &r.hugepage_limits {
                let mut l = LinuxHugepageLimit::default();
                let limit = i64::try_from(h.limit).map_err(|_| {
                    SpecError::Invalid(format!("hugepage limit {} is too large", h.limit))
                })?;
                l.set_page_size(h.page_size.clone()).set_limit(limit);
                limits.push(l);
            }
            out.set_hugepage_limits(Some(limits));
        } else {
            tracing::warn!("the hugetlb cgroup controller is absent; skipping hugepage limits");
        }
    }
    if !r.unified.is_empty() {
        if !cgroups.unified {
            return Err(SpecError::Invalid(
                "unified cgroup settings need cgroup v2; this node has cgroup v1".to_string(),
            ));
        }
        out.set_unified(Some(r.unified.clone()));
    }
    Ok(out)
}

/// A cpuset list as the kernel takes it: `N` or `N-M` (N ≤ M), comma separated.
fn check_cpuset(list: &str, what: &str) -> Result<(), SpecError> {
    let number = |s: &str| {
        (!s.is_empty() && s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse::<u32>().ok())
            .flatten()
    };
    let ok = list.split(',').all(|item| match item.split_once('-') {
        Some((a, b)) => matches!((number(a), number(b)), (Some(a), Some(b)) if a <= b),
        None => number(item).is_some(),
    });
    if ok {
        Ok(())
    } else {
        Err(SpecError::Invalid(format!(
            "{what} {list:?} is not a cpu list (like \"0-3,6\")"
        )))
    }
}

/// The config's annotations plus containerd's CRI ones.
fn spec_annotations(input: &SpecInput<'_>) -> HashMap<String, String> {
    let mut a: HashMap<String, String> = input.config.annotations.clone();
    let pod = input.sandbox.config.metadata.clone().unwrap_or_default();
    let name = input
        .config
        .metadata
        .as_ref()
        .map(|m| m.name.clone())
        .unwrap_or_default();
    let image = input
        .config
        .image
        .as_ref()
        .map(|i| {
            if i.user_specified_image.is_empty() {
                i.image.clone()
            } else {
                i.user_specified_image.clone()
            }
        })
        .unwrap_or_default();
    for (k, v) in [
        (
            annotations::CONTAINER_TYPE,
            annotations::CONTAINER_TYPE_CONTAINER.to_string(),
        ),
        (annotations::SANDBOX_ID, input.sandbox.id.clone()),
        (annotations::SANDBOX_NAME, pod.name),
        (annotations::SANDBOX_NAMESPACE, pod.namespace),
        (annotations::SANDBOX_UID, pod.uid),
        (annotations::CONTAINER_NAME, name),
        (annotations::IMAGE_NAME, image),
    ] {
        a.insert(k.to_string(), v);
    }
    a
}
