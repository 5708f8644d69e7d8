//! CDI, the Container Device Interface (github.com/cncf-tags/container-device-interface,
//! SPEC.md, spec versions 0.3.0 to 1.1.0): device vendors describe devices in JSON or YAML
//! spec files under a few directories (`/etc/cdi`, `/var/run/cdi`), and a container asks for
//! them by fully qualified name, `vendor.com/class=name`, through the CRI field
//! `ContainerConfig.CDI_devices` or the older `cdi.k8s.io/*` annotations (a comma separated
//! list of names each), as containerd and CRI-O take them.
//!
//! [`Registry::resolve`] reads every `*.json` and `*.yaml` file of the spec dirs at the time
//! of the call (no cache, no watch: a spec a driver writes just before CreateContainer is
//! seen). A file that does not parse or validate is logged (once per change) and skipped; the
//! other files still count. A device declared in several dirs is taken from the last dir;
//! declared twice in one dir, it is a conflict and neither is used (as the reference
//! implementation does).
//!
//! [`Resolved::apply`] edits a built OCI spec: for each device, its spec's `containerEdits`
//! (once per spec file) then the device's own; `env` set by name, `deviceNodes` into
//! `linux.devices` (type and numbers from the host node when the spec leaves them out) with
//! an allow rule in `linux.resources.devices`, `mounts` (bind mounts unless a type says
//! otherwise) with mounts sorted parents first, `hooks` by `hookName`, `additionalGids` to the
//! process' groups. `intelRdt` is ignored with a log line; `netDevices` is refused.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::cri::v1 as cri;
use oci_spec::runtime::{
    Hook, Hooks, LinuxDevice, LinuxDeviceCgroup, LinuxDeviceType, LinuxResources, Mount, Spec,
};
use serde::{Deserialize, Deserializer};

/// The prefix of the annotation keys that request CDI devices (`cdi.k8s.io/<plugin>_<id>`).
pub const ANNOTATION_PREFIX: &str = "cdi.k8s.io/";

/// The CDI spec dirs used when the config names none.
pub const DEFAULT_SPEC_DIRS: &[&str] = &["/etc/cdi", "/var/run/cdi"];

/// Errors of CDI device resolution and injection.
#[derive(Debug, thiserror::Error)]
pub enum CdiError {
    /// A requested name is not a fully qualified CDI device name.
    #[error("invalid CDI device name {name:?}: {reason}")]
    InvalidName { name: String, reason: String },
    /// Requested devices that no valid spec in the spec dirs declares.
    #[error("unresolvable CDI devices: {}", unresolved_message(.devices, .dirs, .skipped))]
    Unresolvable {
        /// Each device and why it was not found.
        devices: Vec<(String, String)>,
        dirs: Vec<PathBuf>,
        /// Spec files skipped as invalid (`path: reason`).
        skipped: Vec<String>,
    },
    /// The device's edits ask for something berth does not do.
    #[error("CDI device {device}: {what} is not supported by berth")]
    Unsupported { device: String, what: String },
    /// The device's edits cannot be applied to this container.
    #[error("CDI device {device}: {reason}")]
    Invalid { device: String, reason: String },
    /// The host device node a device names cannot be read.
    #[error("CDI device {device}: host device {}: {source}", .path.display())]
    HostDevice {
        device: String,
        path: PathBuf,
        source: std::io::Error,
    },
}

fn unresolved_message(
    devices: &[(String, String)],
    dirs: &[PathBuf],
    skipped: &[String],
) -> String {
    let list: Vec<String> = devices
        .iter()
        .map(|(name, why)| format!("{name} ({why})"))
        .collect();
    let dirs: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    let mut s = format!(
        "{}; CDI spec dirs searched: {}",
        list.join(", "),
        if dirs.is_empty() {
            "none configured".to_string()
        } else {
            dirs.join(", ")
        }
    );
    const SHOWN: usize = 5;
    if !skipped.is_empty() {
        s.push_str(&format!(
            "; invalid spec files skipped: {}",
            skipped[..skipped.len().min(SHOWN)].join("; ")
        ));
        if skipped.len() > SHOWN {
            s.push_str(&format!(" (and {} more)", skipped.len() - SHOWN));
        }
    }
    s
}

/// A spec file that cannot be used (logged and skipped).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SpecFileError(String);

fn bad(msg: impl Into<String>) -> SpecFileError {
    SpecFileError(msg.into())
}

// ---------------------------------------------------------------------------------------
// The spec file format.

/// A `null` in a spec file is the field's default (Go's decoder treats it so).
fn nullable<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// One CDI spec file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CdiSpec {
    #[serde(rename = "cdiVersion")]
    pub version: String,
    pub kind: String,
    #[serde(default, deserialize_with = "nullable")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "nullable")]
    pub devices: Vec<CdiDevice>,
    #[serde(default, rename = "containerEdits", deserialize_with = "nullable")]
    pub container_edits: ContainerEdits,
}

/// A device of a spec.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CdiDevice {
    pub name: String,
    #[serde(default, deserialize_with = "nullable")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, rename = "containerEdits", deserialize_with = "nullable")]
    pub container_edits: ContainerEdits,
}

/// Edits to a container's OCI spec.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ContainerEdits {
    #[serde(default, deserialize_with = "nullable")]
    pub env: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub device_nodes: Vec<DeviceNode>,
    #[serde(default, deserialize_with = "nullable")]
    pub net_devices: Vec<NetDevice>,
    #[serde(default, deserialize_with = "nullable")]
    pub hooks: Vec<CdiHook>,
    #[serde(default, deserialize_with = "nullable")]
    pub mounts: Vec<CdiMount>,
    #[serde(default)]
    pub intel_rdt: Option<IntelRdt>,
    /// SPEC.md spells it `additionalGIDs`; the reference implementation writes
    /// `additionalGids` (and Go's decoder takes either).
    #[serde(default, alias = "additionalGIDs", deserialize_with = "nullable")]
    pub additional_gids: Vec<u32>,
}

/// A device node to create in the container.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DeviceNode {
    /// In the container.
    pub path: String,
    /// On the host (default: `path`).
    #[serde(default, deserialize_with = "nullable")]
    pub host_path: String,
    /// `b`, `c`, `u` or `p`; from the host node when empty.
    #[serde(default, rename = "type", deserialize_with = "nullable")]
    pub typ: String,
    #[serde(default, deserialize_with = "nullable")]
    pub major: i64,
    #[serde(default, deserialize_with = "nullable")]
    pub minor: i64,
    #[serde(default)]
    pub file_mode: Option<u32>,
    /// Cgroup access: some of `rwm` (default `rwm`), or `none`.
    #[serde(default, deserialize_with = "nullable")]
    pub permissions: String,
    #[serde(default)]
    pub uid: Option<u32>,
    #[serde(default)]
    pub gid: Option<u32>,
}

/// A mount to add.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CdiMount {
    pub host_path: String,
    pub container_path: String,
    #[serde(default, deserialize_with = "nullable")]
    pub options: Vec<String>,
    #[serde(default, rename = "type", deserialize_with = "nullable")]
    pub typ: String,
}

/// An OCI hook to add.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CdiHook {
    pub hook_name: String,
    pub path: String,
    #[serde(default, deserialize_with = "nullable")]
    pub args: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub env: Vec<String>,
    #[serde(default)]
    pub timeout: Option<i64>,
}

/// Intel RDT settings (ignored by berth). Fields of every spec version are taken.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct IntelRdt {
    #[serde(default, rename = "closID", deserialize_with = "nullable")]
    pub clos_id: String,
    #[serde(default, deserialize_with = "nullable")]
    pub l3_cache_schema: String,
    #[serde(default, deserialize_with = "nullable")]
    pub mem_bw_schema: String,
    #[serde(default)]
    pub schemata: Option<Vec<String>>,
    #[serde(default, deserialize_with = "nullable")]
    pub enable_monitoring: bool,
    #[serde(default, rename = "enableCMT", deserialize_with = "nullable")]
    pub enable_cmt: bool,
    #[serde(default, rename = "enableMBM", deserialize_with = "nullable")]
    pub enable_mbm: bool,
}

/// A host network interface to move into the container (refused by berth).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NetDevice {
    pub host_interface_name: String,
    pub name: String,
}

/// The encodings of spec files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Yaml,
}

impl Format {
    /// By file extension: `.json` or `.yaml` (other files are not spec files).
    pub fn of(path: &Path) -> Option<Format> {
        match path.extension()?.to_str()? {
            "json" => Some(Format::Json),
            "yaml" => Some(Format::Yaml),
            _ => None,
        }
    }
}

/// Parses and validates a spec file's text.
pub fn parse_spec(text: &str, format: Format) -> Result<CdiSpec, SpecFileError> {
    let spec: CdiSpec = match format {
        Format::Json => serde_json::from_str(text).map_err(|e| bad(e.to_string()))?,
        Format::Yaml => serde_norway::from_str(text).map_err(|e| bad(e.to_string()))?,
    };
    validate_spec(&spec)?;
    Ok(spec)
}

// ---------------------------------------------------------------------------------------
// Versions.

/// The released spec versions (major, minor), oldest first.
const KNOWN_VERSIONS: &[(u32, u32)] = &[
    (0, 1),
    (0, 2),
    (0, 3),
    (0, 4),
    (0, 5),
    (0, 6),
    (0, 7),
    (0, 8),
    (1, 0),
    (1, 1),
];

/// `x.y.z` (a leading `v` allowed) of a released minor version; patch levels of a known minor
/// version are taken (they change no field).
fn parse_version(v: &str) -> Option<(u32, u32)> {
    let v = v.strip_prefix('v').unwrap_or(v);
    let mut parts = v.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    let _patch: u32 = parts.next()?.parse().ok()?;
    if parts.next().is_some() {
        return None;
    }
    KNOWN_VERSIONS
        .contains(&(major, minor))
        .then_some((major, minor))
}

/// The lowest spec version that has every field `spec` uses (SPEC.md's table).
pub fn minimum_version(spec: &CdiSpec) -> (u32, u32) {
    let all_edits = || {
        std::iter::once(&spec.container_edits)
            .chain(spec.devices.iter().map(|d| &d.container_edits))
    };
    let rdt_v110 = |e: &ContainerEdits| {
        e.intel_rdt
            .as_ref()
            .is_some_and(|r| r.schemata.is_some() || r.enable_monitoring)
    };
    if all_edits().any(|e| !e.net_devices.is_empty() || rdt_v110(e)) {
        return (1, 1);
    }
    if all_edits().any(|e| e.intel_rdt.is_some() || !e.additional_gids.is_empty()) {
        return (0, 7);
    }
    let class_has_dot = spec
        .kind
        .split_once('/')
        .is_some_and(|(_, class)| class.contains('.'));
    if !spec.annotations.is_empty()
        || spec.devices.iter().any(|d| !d.annotations.is_empty())
        || class_has_dot
    {
        return (0, 6);
    }
    if spec
        .devices
        .iter()
        .any(|d| d.name.starts_with(|c: char| c.is_ascii_digit()))
        || all_edits().any(|e| e.device_nodes.iter().any(|n| !n.host_path.is_empty()))
    {
        return (0, 5);
    }
    if all_edits().any(|e| e.mounts.iter().any(|m| !m.typ.is_empty())) {
        return (0, 4);
    }
    (0, 3)
}

// ---------------------------------------------------------------------------------------
// Names.

/// A fully qualified device name split into its parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QualifiedName<'a> {
    pub vendor: &'a str,
    pub class: &'a str,
    pub name: &'a str,
}

impl QualifiedName<'_> {
    /// `vendor/class`.
    pub fn kind(&self) -> String {
        format!("{}/{}", self.vendor, self.class)
    }
}

fn alnum(c: char) -> bool {
    c.is_ascii_alphanumeric()
}

/// A vendor or class name: a letter first, a letter or digit last, letters, digits, `_`,
/// `-` and `.` between.
pub fn validate_vendor_or_class(what: &str, s: &str) -> Result<(), String> {
    let Some(first) = s.chars().next() else {
        return Err(format!("empty {what}"));
    };
    if !first.is_ascii_alphabetic() {
        return Err(format!("{what} {s:?} should start with a letter"));
    }
    if let Some(c) = s
        .chars()
        .find(|&c| !(alnum(c) || matches!(c, '_' | '-' | '.')))
    {
        return Err(format!("invalid character {c:?} in {what} {s:?}"));
    }
    if !s.ends_with(alnum) {
        return Err(format!("{what} {s:?} should end with a letter or digit"));
    }
    Ok(())
}

/// A device name: a letter or digit first and last, letters, digits, `_`, `-`, `.` and `:`
/// between.
pub fn validate_device_name(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("empty device name".to_string());
    }
    if !s.starts_with(alnum) {
        return Err(format!(
            "device name {s:?} should start with a letter or digit"
        ));
    }
    if let Some(c) = s
        .chars()
        .find(|&c| !(alnum(c) || matches!(c, '_' | '-' | '.' | ':')))
    {
        return Err(format!("invalid character {c:?} in device name {s:?}"));
    }
    if !s.ends_with(alnum) {
        return Err(format!(
            "device name {s:?} should end with a letter or digit"
        ));
    }
    Ok(())
}

/// Splits and validates `vendor/class=name`.
pub fn parse_qualified_name(device: &str) -> Result<QualifiedName<'_>, CdiError> {
    let invalid = |reason: String| CdiError::InvalidName {
        name: device.to_string(),
        reason,
    };
    let want = "want vendor.com/class=name";
    let (kind, name) = device
        .split_once('=')
        .ok_or_else(|| invalid(format!("no '=' ({want})")))?;
    let (vendor, class) = kind
        .split_once('/')
        .ok_or_else(|| invalid(format!("no '/' before '=' ({want})")))?;
    validate_vendor_or_class("vendor", vendor).map_err(invalid)?;
    validate_vendor_or_class("class", class).map_err(invalid)?;
    validate_device_name(name).map_err(invalid)?;
    Ok(QualifiedName {
        vendor,
        class,
        name,
    })
}

/// The spec's `kind`: `vendor/class`, the vendor a DNS subdomain of at most 253 characters,
/// the class at most 63.
fn validate_kind(kind: &str) -> Result<(), SpecFileError> {
    let (vendor, class) = kind
        .split_once('/')
        .ok_or_else(|| bad(format!("kind {kind:?} is not vendor/class")))?;
    validate_vendor_or_class("vendor", vendor).map_err(bad)?;
    validate_vendor_or_class("class", class).map_err(bad)?;
    if vendor.len() > 253 {
        return Err(bad(format!(
            "the vendor of kind {kind:?} is longer than 253"
        )));
    }
    if class.len() > 63 {
        return Err(bad(format!("the class of kind {kind:?} is longer than 63")));
    }
    Ok(())
}

/// Whether a container config asks for any CDI device (names unchecked).
pub fn has_requests(config: &cri::ContainerConfig) -> bool {
    !config.cdi_devices.is_empty()
        || config
            .annotations
            .keys()
            .any(|k| k.starts_with(ANNOTATION_PREFIX))
}

/// The CDI devices a container asks for: the `CDI_devices` field, then the names of the
/// `cdi.k8s.io/*` annotations (keys in order); each name once.
pub fn requested_devices(config: &cri::ContainerConfig) -> Result<Vec<String>, CdiError> {
    let mut out: Vec<String> = Vec::new();
    let mut push = |name: &str| -> Result<(), CdiError> {
        parse_qualified_name(name)?;
        if !out.iter().any(|n| n == name) {
            out.push(name.to_string());
        }
        Ok(())
    };
    for d in &config.cdi_devices {
        push(&d.name)?;
    }
    let mut keys: Vec<&String> = config
        .annotations
        .keys()
        .filter(|k| k.starts_with(ANNOTATION_PREFIX))
        .collect();
    keys.sort();
    for key in keys {
        for name in config.annotations[key].split(',') {
            push(name).map_err(|e| match e {
                CdiError::InvalidName { name, reason } => CdiError::InvalidName {
                    name,
                    reason: format!("{reason} (in annotation {key})"),
                },
                other => other,
            })?;
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Validation of spec files.

fn validate_env(env: &[String], what: &str) -> Result<(), SpecFileError> {
    for e in env {
        if e.find('=').is_none_or(|i| i == 0) {
            return Err(bad(format!("{what}: invalid environment variable {e:?}")));
        }
    }
    Ok(())
}

const HOOK_NAMES: &[&str] = &[
    "prestart",
    "createRuntime",
    "createContainer",
    "startContainer",
    "poststart",
    "poststop",
];

fn validate_edits(e: &ContainerEdits, what: &str) -> Result<(), SpecFileError> {
    validate_env(&e.env, what)?;
    for d in &e.device_nodes {
        if d.path.is_empty() {
            return Err(bad(format!("{what}: a device node has an empty path")));
        }
        if !matches!(d.typ.as_str(), "" | "b" | "c" | "u" | "p") {
            return Err(bad(format!(
                "{what}: device node {}: invalid type {:?}",
                d.path, d.typ
            )));
        }
        if !(d.permissions.is_empty()
            || d.permissions == "none"
            || d.permissions.chars().all(|c| "rwm".contains(c)))
        {
            return Err(bad(format!(
                "{what}: device node {}: invalid permissions {:?}",
                d.path, d.permissions
            )));
        }
    }
    for h in &e.hooks {
        if !HOOK_NAMES.contains(&h.hook_name.as_str()) {
            return Err(bad(format!("{what}: invalid hook name {:?}", h.hook_name)));
        }
        if !h.path.starts_with('/') {
            return Err(bad(format!(
                "{what}: {} hook path {:?} is not absolute",
                h.hook_name, h.path
            )));
        }
        if h.timeout.is_some_and(|t| t <= 0) {
            return Err(bad(format!(
                "{what}: {} hook timeout must be positive",
                h.hook_name
            )));
        }
        validate_env(&h.env, &format!("{what}: {} hook", h.hook_name))?;
    }
    for m in &e.mounts {
        if m.host_path.is_empty() {
            return Err(bad(format!("{what}: a mount has an empty hostPath")));
        }
        if m.container_path.is_empty() {
            return Err(bad(format!("{what}: a mount has an empty containerPath")));
        }
    }
    let mut hosts = HashSet::new();
    let mut names = HashSet::new();
    for n in &e.net_devices {
        if n.host_interface_name.is_empty() || n.name.is_empty() {
            return Err(bad(format!("{what}: a net device has an empty name")));
        }
        if !hosts.insert(&n.host_interface_name) || !names.insert(&n.name) {
            return Err(bad(format!("{what}: duplicate net device {:?}", n.name)));
        }
    }
    Ok(())
}

fn edits_empty(e: &ContainerEdits) -> bool {
    e.env.is_empty()
        && e.device_nodes.is_empty()
        && e.net_devices.is_empty()
        && e.hooks.is_empty()
        && e.mounts.is_empty()
        && e.intel_rdt.is_none()
        && e.additional_gids.is_empty()
}

/// A spec's version, kind, device names and edits.
pub fn validate_spec(spec: &CdiSpec) -> Result<(), SpecFileError> {
    let version = parse_version(&spec.version).ok_or_else(|| {
        bad(format!(
            "unsupported cdiVersion {:?} (berth reads 0.3.0 to 1.1.x)",
            spec.version
        ))
    })?;
    let min = minimum_version(spec);
    if version < min {
        return Err(bad(format!(
            "cdiVersion {} is too old for the fields used: they need at least {}.{}.0",
            spec.version, min.0, min.1
        )));
    }
    validate_kind(&spec.kind)?;
    validate_edits(&spec.container_edits, "spec containerEdits")?;
    if spec.devices.is_empty() {
        return Err(bad("no devices"));
    }
    let mut seen = HashSet::new();
    for d in &spec.devices {
        validate_device_name(&d.name).map_err(bad)?;
        if !seen.insert(d.name.as_str()) {
            return Err(bad(format!("device {:?} is declared twice", d.name)));
        }
        if edits_empty(&d.container_edits) {
            return Err(bad(format!("device {:?} has no containerEdits", d.name)));
        }
        validate_edits(&d.container_edits, &format!("device {:?}", d.name))?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The registry.

/// A valid spec file, read at one CreateContainer.
#[derive(Debug)]
struct LoadedSpec {
    path: PathBuf,
    /// The index of its dir in the spec dirs (higher wins).
    priority: usize,
    spec: CdiSpec,
}

/// Where a device is declared.
#[derive(Debug, Clone)]
struct Declared {
    spec: Arc<LoadedSpec>,
    index: usize,
}

/// Every device of the spec dirs at one moment.
#[derive(Debug, Default)]
struct Snapshot {
    devices: HashMap<String, Declared>,
    /// Devices declared twice in one dir (unusable), with the two files.
    conflicts: HashMap<String, (PathBuf, PathBuf)>,
    /// Kinds with at least one valid spec.
    kinds: HashSet<String>,
    /// Invalid files: `path: reason`.
    skipped: Vec<String>,
}

/// Reads CDI specs from the configured dirs and resolves device names.
#[derive(Debug)]
pub struct Registry {
    dirs: Vec<PathBuf>,
    /// The last problem logged per spec file, so that a broken file is logged when it
    /// changes, not at every CreateContainer.
    reported: Mutex<HashMap<PathBuf, String>>,
}

impl Registry {
    /// A registry over `dirs`, lowest priority first.
    pub fn new(dirs: Vec<PathBuf>) -> Registry {
        Registry {
            dirs,
            reported: Mutex::new(HashMap::new()),
        }
    }

    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    fn report(&self, path: &Path, problem: &str) {
        let mut reported = match self.reported.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        if reported.get(path).map(String::as_str) != Some(problem) {
            tracing::warn!(path = %path.display(), problem, "CDI spec file skipped");
            reported.insert(path.to_path_buf(), problem.to_string());
        }
    }

    fn forget(&self, path: &Path) {
        if let Ok(mut reported) = self.reported.lock() {
            reported.remove(path);
        }
    }

    /// The spec files of one dir, by name (a dir that does not exist has none).
    fn spec_files(&self, dir: &Path) -> Vec<PathBuf> {
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
            Err(e) => {
                self.report(dir, &format!("cannot list the CDI spec dir: {e}"));
                return Vec::new();
            }
        };
        let mut files: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| Format::of(p).is_some())
            // Symlinks followed; directories named *.json are not specs.
            .filter(|p| std::fs::metadata(p).is_ok_and(|m| !m.is_dir()))
            .collect();
        files.sort();
        files
    }

    fn load_file(&self, path: &Path) -> Result<CdiSpec, SpecFileError> {
        let format = Format::of(path).ok_or_else(|| bad("not a .json or .yaml file"))?;
        let text = std::fs::read_to_string(path).map_err(|e| bad(format!("read: {e}")))?;
        parse_spec(&text, format)
    }

    /// Reads every spec file now.
    fn snapshot(&self) -> Snapshot {
        let mut snap = Snapshot::default();
        for (priority, dir) in self.dirs.iter().enumerate() {
            for path in self.spec_files(dir) {
                let spec = match self.load_file(&path) {
                    Ok(s) => {
                        self.forget(&path);
                        s
                    }
                    Err(e) => {
                        self.report(&path, &e.0);
                        snap.skipped.push(format!("{}: {}", path.display(), e.0));
                        continue;
                    }
                };
                snap.kinds.insert(spec.kind.clone());
                let loaded = Arc::new(LoadedSpec {
                    path,
                    priority,
                    spec,
                });
                for (index, d) in loaded.spec.devices.iter().enumerate() {
                    let qualified = format!("{}={}", loaded.spec.kind, d.name);
                    let new = Declared {
                        spec: loaded.clone(),
                        index,
                    };
                    match snap.devices.get(&qualified) {
                        Some(old) if old.spec.priority == priority => {
                            tracing::warn!(
                                device = %qualified,
                                first = %old.spec.path.display(),
                                second = %loaded.path.display(),
                                "CDI device declared twice in one spec dir; neither is used"
                            );
                            snap.conflicts.insert(
                                qualified.clone(),
                                (old.spec.path.clone(), loaded.path.clone()),
                            );
                        }
                        _ => {
                            // A later dir overrides an earlier one (and its conflict).
                            snap.conflicts.remove(&qualified);
                            snap.devices.insert(qualified, new);
                        }
                    }
                }
            }
        }
        for name in snap.conflicts.keys() {
            snap.devices.remove(name);
        }
        snap
    }

    /// Resolves fully qualified device names to the edits they make, reading the spec dirs
    /// now.
    pub fn resolve(&self, names: &[String]) -> Result<Resolved, CdiError> {
        let mut out = Resolved::default();
        if names.is_empty() {
            return Ok(out);
        }
        let snap = self.snapshot();
        let mut unresolved = Vec::new();
        // Spec files whose spec-level edits are in already.
        let mut specs_done: HashSet<PathBuf> = HashSet::new();
        for name in names {
            let q = parse_qualified_name(name)?;
            let Some(found) = snap.devices.get(name) else {
                let why = if let Some((a, b)) = snap.conflicts.get(name) {
                    format!(
                        "declared in both {} and {}, so in neither",
                        a.display(),
                        b.display()
                    )
                } else if snap.kinds.contains(&q.kind()) {
                    format!("kind {} has no device {:?}", q.kind(), q.name)
                } else {
                    format!("no spec of kind {}", q.kind())
                };
                unresolved.push((name.clone(), why));
                continue;
            };
            let spec = &found.spec;
            let device = &spec.spec.devices[found.index];
            // (`insert` first: it records the spec even when its edits are empty.)
            if specs_done.insert(spec.path.clone()) && !edits_empty(&spec.spec.container_edits) {
                out.edits.push(Edits {
                    device: name.clone(),
                    source: spec.path.clone(),
                    edits: spec.spec.container_edits.clone(),
                });
            }
            out.edits.push(Edits {
                device: name.clone(),
                source: spec.path.clone(),
                edits: device.container_edits.clone(),
            });
            out.devices.push(name.clone());
        }
        if !unresolved.is_empty() {
            return Err(CdiError::Unresolvable {
                devices: unresolved,
                dirs: self.dirs.clone(),
                skipped: snap.skipped,
            });
        }
        for e in &out.edits {
            if !e.edits.net_devices.is_empty() {
                return Err(CdiError::Unsupported {
                    device: e.device.clone(),
                    what: format!(
                        "netDevices (moving host interfaces into the pod, in {})",
                        e.source.display()
                    ),
                });
            }
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------------------------------
// Applying edits.

/// One set of edits and what it came from.
#[derive(Debug, Clone)]
struct Edits {
    /// The device whose request brought them in.
    device: String,
    /// The spec file.
    source: PathBuf,
    edits: ContainerEdits,
}

/// The edits of resolved devices, in the order they apply.
#[derive(Debug, Default, Clone)]
pub struct Resolved {
    devices: Vec<String>,
    edits: Vec<Edits>,
}

/// The number of components of a mount destination (`/` is 0).
fn depth(p: &Path) -> usize {
    p.components()
        .filter(|c| matches!(c, std::path::Component::Normal(_)))
        .count()
}

/// Sets `KEY=value` in `env`, replacing an entry of the same name in place.
fn set_env(env: &mut Vec<String>, entry: &str) {
    let key = entry.split_once('=').map_or(entry, |(k, _)| k);
    match env
        .iter()
        .position(|e| e.split_once('=').map_or(e.as_str(), |(k, _)| k) == key)
    {
        Some(i) => env[i] = entry.to_string(),
        None => env.push(entry.to_string()),
    }
}

fn device_type(t: &str) -> Option<LinuxDeviceType> {
    match t {
        "b" => Some(LinuxDeviceType::B),
        "c" => Some(LinuxDeviceType::C),
        "u" => Some(LinuxDeviceType::U),
        "p" => Some(LinuxDeviceType::P),
        _ => None,
    }
}

/// Fills a device node's type, numbers and mode from its host node (symlinks followed),
/// as the reference implementation does: a node that names its type and major (or is a
/// FIFO) needs no host node; otherwise the host node must exist and match the type.
fn fill_device(device: &str, node: &DeviceNode) -> Result<(LinuxDevice, String), CdiError> {
    let host = if node.host_path.is_empty() {
        &node.path
    } else {
        &node.host_path
    };
    let minimal = !node.typ.is_empty() && (node.major != 0 || node.typ == "p");
    let mut typ = node.typ.clone();
    let (mut major, mut minor) = (node.major, node.minor);
    let mut file_mode = node.file_mode;
    match std::fs::metadata(host) {
        Ok(meta) => {
            let ft = meta.file_type();
            let host_typ = if ft.is_block_device() {
                "b"
            } else if ft.is_char_device() {
                "c"
            } else if ft.is_fifo() {
                "p"
            } else {
                ""
            };
            if host_typ.is_empty() && !minimal {
                return Err(CdiError::Invalid {
                    device: device.to_string(),
                    reason: format!("host path {host} is not a device node"),
                });
            }
            if file_mode.is_none() && !host_typ.is_empty() {
                file_mode = Some(meta.mode() & 0o7777);
            }
            if !minimal {
                if typ.is_empty() {
                    typ = host_typ.to_string();
                }
                let same = typ == host_typ || (typ == "u" && host_typ == "c");
                if !same {
                    return Err(CdiError::Invalid {
                        device: device.to_string(),
                        reason: format!(
                            "device node {} has type {typ:?} but host node {host} is {host_typ:?}",
                            node.path
                        ),
                    });
                }
                if typ != "p" && major == 0 {
                    let rdev = meta.rdev();
                    major = i64::from(libc::major(rdev));
                    minor = i64::from(libc::minor(rdev));
                }
            }
        }
        Err(source) if !minimal => {
            return Err(CdiError::HostDevice {
                device: device.to_string(),
                path: PathBuf::from(host),
                source,
            });
        }
        Err(_) => {}
    }
    let oci_typ = device_type(&typ).ok_or_else(|| CdiError::Invalid {
        device: device.to_string(),
        reason: format!("device node {} has no usable type", node.path),
    })?;
    let mut d = LinuxDevice::default();
    d.set_path(PathBuf::from(&node.path))
        .set_typ(oci_typ)
        .set_major(major)
        .set_minor(minor)
        .set_file_mode(file_mode)
        .set_uid(node.uid)
        .set_gid(node.gid);
    Ok((d, typ))
}

fn add_hook(hooks: &mut Hooks, name: &str, hook: Hook) -> Result<(), String> {
    let list = match name {
        #[allow(deprecated)]
        "prestart" => hooks.prestart_mut(),
        "createRuntime" => hooks.create_runtime_mut(),
        "createContainer" => hooks.create_container_mut(),
        "startContainer" => hooks.start_container_mut(),
        "poststart" => hooks.poststart_mut(),
        "poststop" => hooks.poststop_mut(),
        other => return Err(format!("unknown hook name {other:?}")),
    };
    list.get_or_insert_with(Vec::new).push(hook);
    Ok(())
}

/// A CDI mount as an OCI mount: a bind mount unless it names another type (`rbind` added
/// when the options ask for neither `bind` nor `rbind`).
fn oci_mount(m: &CdiMount) -> Mount {
    let mut options = m.options.clone();
    let typ = if m.typ.is_empty() || m.typ == "bind" || m.typ == "none" {
        if !options.iter().any(|o| o == "bind" || o == "rbind") {
            options.push("rbind".to_string());
        }
        "bind".to_string()
    } else {
        m.typ.clone()
    };
    let mut out = Mount::default();
    out.set_destination(PathBuf::from(&m.container_path))
        .set_typ(Some(typ))
        .set_source(Some(PathBuf::from(&m.host_path)))
        .set_options(Some(options));
    out
}

impl Resolved {
    /// The devices resolved, in request order.
    pub fn devices(&self) -> &[String] {
        &self.devices
    }

    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// Applies the edits to a built OCI spec.
    pub fn apply(&self, spec: &mut Spec) -> Result<(), CdiError> {
        if self.edits.is_empty() {
            return Ok(());
        }
        let (proc_uid, proc_gid) = spec
            .process()
            .as_ref()
            .map_or((0, 0), |p| (p.user().uid(), p.user().gid()));
        let mut added_mounts = false;
        for Edits {
            device,
            source,
            edits,
        } in &self.edits
        {
            if !edits.env.is_empty() {
                let process = spec.process_mut().get_or_insert_with(Default::default);
                let env = process.env_mut().get_or_insert_with(Vec::new);
                for e in &edits.env {
                    set_env(env, e);
                }
            }
            for node in &edits.device_nodes {
                let (mut dev, typ) = fill_device(device, node)?;
                // The container's user owns a node that names no owner (as upstream).
                if dev.uid().is_none() && proc_uid > 0 {
                    dev.set_uid(Some(proc_uid));
                }
                if dev.gid().is_none() && proc_gid > 0 {
                    dev.set_gid(Some(proc_gid));
                }
                let linux = spec.linux_mut().get_or_insert_with(Default::default);
                let devices = linux.devices_mut().get_or_insert_with(Vec::new);
                devices.retain(|d| d.path() != dev.path());
                let rule_typ = match typ.as_str() {
                    "b" => Some(LinuxDeviceType::B),
                    "c" => Some(LinuxDeviceType::C),
                    _ => None,
                };
                let access = match node.permissions.as_str() {
                    "" => Some("rwm".to_string()),
                    "none" => None,
                    p => Some(p.to_string()),
                };
                if let (Some(rule_typ), Some(access)) = (rule_typ, access) {
                    let mut rule = LinuxDeviceCgroup::default();
                    rule.set_allow(true)
                        .set_typ(Some(rule_typ))
                        .set_major(Some(dev.major()))
                        .set_minor(Some(dev.minor()))
                        .set_access(Some(access));
                    let resources = linux
                        .resources_mut()
                        .get_or_insert_with(LinuxResources::default);
                    resources
                        .devices_mut()
                        .get_or_insert_with(Vec::new)
                        .push(rule);
                }
                let devices = linux.devices_mut().get_or_insert_with(Vec::new);
                devices.push(dev);
            }
            for m in &edits.mounts {
                let mounts = spec.mounts_mut().get_or_insert_with(Vec::new);
                let dest = PathBuf::from(&m.container_path);
                if let Some(i) = mounts.iter().position(|x| x.destination() == &dest) {
                    mounts.remove(i);
                }
                mounts.push(oci_mount(m));
                added_mounts = true;
            }
            for h in &edits.hooks {
                let mut hook = Hook::default();
                hook.set_path(PathBuf::from(&h.path))
                    .set_args((!h.args.is_empty()).then(|| h.args.clone()))
                    .set_env((!h.env.is_empty()).then(|| h.env.clone()))
                    .set_timeout(h.timeout);
                let hooks = spec.hooks_mut().get_or_insert_with(Hooks::default);
                add_hook(hooks, &h.hook_name, hook).map_err(|reason| CdiError::Invalid {
                    device: device.clone(),
                    reason,
                })?;
            }
            if let Some(rdt) = &edits.intel_rdt {
                tracing::info!(
                    device = %device,
                    spec = %source.display(),
                    clos_id = %rdt.clos_id,
                    "CDI intelRdt edits are ignored: berth does not manage resctrl"
                );
            }
            if !edits.net_devices.is_empty() {
                return Err(CdiError::Unsupported {
                    device: device.clone(),
                    what: "netDevices".to_string(),
                });
            }
            if edits.additional_gids.iter().any(|g| *g != 0) {
                let process = spec.process_mut().get_or_insert_with(Default::default);
                let mut user = process.user().clone();
                let mut gids = user.additional_gids().clone().unwrap_or_default();
                for g in edits.additional_gids.iter().filter(|g| **g != 0) {
                    if !gids.contains(g) {
                        gids.push(*g);
                    }
                }
                user.set_additional_gids(Some(gids));
                process.set_user(user);
            }
        }
        if added_mounts && let Some(mounts) = spec.mounts_mut() {
            // Parents before children; stable, so equal depths keep their order.
            mounts.sort_by_key(|m| depth(m.destination()));
        }
        tracing::info!(devices = ?self.devices, "CDI devices injected");
        Ok(())
    }
}

#[cfg(test)]
mod tests;
