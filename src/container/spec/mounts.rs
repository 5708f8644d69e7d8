//! Mounts of a container: the OCI defaults (proc, /dev, devpts, shm, mqueue, sysfs, cgroup),
//! the pod's files (/etc/hostname, /etc/hosts, /etc/resolv.conf) and /dev/shm, the CRI
//! mounts (bind mounts with propagation, recursive read-only mounts, image volumes) and the
//! volumes the image declares, as containerd's CRI plugin lays them out: defaults first
//! (minus those a supplied mount replaces), then the supplied mounts sorted so that parents
//! come before their children.
//!
//! This module plans and validates; the host-side work some mounts need first (a recursively
//! read-only clone, an image's mount, a volume dir seeded from the image) is listed by
//! [`host_work`], done by [`crate::container::volumes`], and comes back as [`Prepared`].

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::cri::v1 as cri;
use oci_spec::runtime::Mount;

use super::{SpecError, SpecInput};

/// Mounts and the rootfs propagation they need.
#[derive(Debug, Default)]
pub struct MountPlan {
    pub mounts: Vec<Mount>,
    pub rootfs_propagation: Option<String>,
}

fn mount(dest: &str, typ: &str, source: &Path, options: &[&str]) -> Mount {
    let mut m = Mount::default();
    m.set_destination(PathBuf::from(dest))
        .set_typ(Some(typ.to_string()))
        .set_source(Some(source.to_path_buf()))
        .set_options(Some(options.iter().map(|o| o.to_string()).collect()));
    m
}

/// The mounts every container gets.
fn default_mounts(privileged: bool) -> Vec<Mount> {
    let sys_mode = if privileged { "rw" } else { "ro" };
    vec![
        mount(
            "/proc",
            "proc",
            Path::new("proc"),
            &["nosuid", "noexec", "nodev"],
        ),
        mount(
            "/dev",
            "tmpfs",
            Path::new("tmpfs"),
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        ),
        mount(
            "/dev/pts",
            "devpts",
            Path::new("devpts"),
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        ),
        mount(
            "/dev/shm",
            "tmpfs",
            Path::new("shm"),
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        ),
        mount(
            "/dev/mqueue",
            "mqueue",
            Path::new("mqueue"),
            &["nosuid", "noexec", "nodev"],
        ),
        mount(
            "/sys",
            "sysfs",
            Path::new("sysfs"),
            &["nosuid", "noexec", "nodev", sys_mode],
        ),
        mount(
            "/sys/fs/cgroup",
            "cgroup",
            Path::new("cgroup"),
            &["nosuid", "noexec", "nodev", "relatime", sys_mode],
        ),
    ]
}

/// A lexically cleaned absolute path (`//a/./b/../c/` → `/a/c`); `None` if not absolute.
pub fn clean_path(p: &str) -> Option<String> {
    if !p.starts_with('/') {
        return None;
    }
    let mut parts: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    Some(format!("/{}", parts.join("/")))
}

fn depth(p: &str) -> usize {
    p.split('/').filter(|c| !c.is_empty()).count()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Propagation {
    Private,
    Slave,
    Shared,
}

/// Where a CRI mount's content comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountSource {
    /// A host path, symlinks resolved.
    Host(PathBuf),
    /// An image volume (KEP-4639): the image as the client named it, and a clean path inside
    /// it (`""`: its root).
    Image { image: String, sub_path: String },
}

/// A CRI mount, validated.
#[derive(Debug, Clone)]
pub struct CheckedMount {
    /// The cleaned container path.
    pub dest: String,
    pub source: MountSource,
    pub readonly: bool,
    pub recursive_read_only: bool,
    propagation: Propagation,
}

/// Whether the ignored `selinux_relabel` was logged already.
static SELINUX_RELABEL_LOGGED: AtomicBool = AtomicBool::new(false);

/// Validates a CRI mount (a host path must exist). Fields berth cannot honour and that
/// would change what the container gets are refused; `selinux_relabel` is ignored (berth
/// applies no SELinux labels, like containerd on a host without SELinux).
pub fn check_mount(m: &cri::Mount) -> Result<CheckedMount, SpecError> {
    let dest = clean_path(&m.container_path).ok_or_else(|| {
        SpecError::Invalid(format!(
            "mount container path {:?} is not absolute",
            m.container_path
        ))
    })?;
    if !m.uid_mappings.is_empty() || !m.gid_mappings.is_empty() {
        return Err(SpecError::Invalid(format!(
            "mount at {dest}: uid/gid mappings need idmapped mounts, which the OCI runtime here \
             (runc 1.1) cannot make"
        )));
    }
    if m.selinux_relabel && !SELINUX_RELABEL_LOGGED.swap(true, Ordering::Relaxed) {
        tracing::info!(
            container_path = %dest,
            "selinux_relabel is ignored: berth applies no SELinux labels (logged once)"
        );
    }
    if let Some(image) = &m.image {
        if !m.host_path.is_empty() {
            return Err(SpecError::Invalid(format!(
                "mount at {dest}: host_path {:?} and image are mutually exclusive",
                m.host_path
            )));
        }
        if !m.readonly {
            return Err(SpecError::Invalid(format!(
                "image volume at {dest}: image mounts are read-only; readonly must be true"
            )));
        }
        let name = image.image.trim();
        if name.is_empty() {
            return Err(SpecError::Invalid(format!(
                "image volume at {dest} names no image"
            )));
        }
        let sub_path = clean_sub_path(&m.image_sub_path).map_err(|why| {
            SpecError::Invalid(format!(
                "image volume at {dest}: image_sub_path {:?} {why}",
                m.image_sub_path
            ))
        })?;
        // An image mount has no submounts and is read-only whatever propagation says.
        return Ok(CheckedMount {
            dest,
            source: MountSource::Image {
                image: name.to_string(),
                sub_path,
            },
            readonly: true,
            recursive_read_only: m.recursive_read_only,
            propagation: Propagation::Private,
        });
    }
    if !m.image_sub_path.is_empty() {
        return Err(SpecError::Invalid(format!(
            "mount at {dest}: image_sub_path {:?} needs an image to take it from",
            m.image_sub_path
        )));
    }
    if m.host_path.is_empty() {
        return Err(SpecError::Invalid(format!(
            "mount at {dest} has no host path"
        )));
    }
    let source = std::fs::canonicalize(&m.host_path)
        .map_err(|e| SpecError::Invalid(format!("mount host path {}: {e}", m.host_path)))?;
    let requested = cri::MountPropagation::try_from(m.propagation);
    if m.recursive_read_only {
        if !m.readonly {
            return Err(SpecError::Invalid(format!(
                "mount at {dest} (host path {}): recursive_read_only needs readonly = true",
                m.host_path
            )));
        }
        if requested != Ok(cri::MountPropagation::PropagationPrivate) {
            return Err(SpecError::Invalid(format!(
                "mount at {dest} (host path {}): recursive_read_only needs propagation PRIVATE",
                m.host_path
            )));
        }
    }
    let propagation = match requested {
        Ok(cri::MountPropagation::PropagationPrivate) => Propagation::Private,
        Ok(cri::MountPropagation::PropagationHostToContainer) => {
            ensure_propagates(&source, false)?;
            Propagation::Slave
        }
        Ok(cri::MountPropagation::PropagationBidirectional) => {
            ensure_propagates(&source, true)?;
            Propagation::Shared
        }
        Err(_) => {
            return Err(SpecError::Invalid(format!(
                "mount at {dest} (host path {}): unknown propagation {}",
                m.host_path, m.propagation
            )));
        }
    };
    Ok(CheckedMount {
        dest,
        source: MountSource::Host(source),
        readonly: m.readonly,
        recursive_read_only: m.recursive_read_only,
        propagation,
    })
}

/// A path inside an image, lexically cleaned and relative (`""` for the image's root).
/// Absolute paths and `..` that would leave the image are refused (the reason is returned).
pub fn clean_sub_path(p: &str) -> Result<String, &'static str> {
    if p.starts_with('/') {
        return Err("is absolute; it must be relative to the image's root");
    }
    let mut parts: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    return Err("leaves the image");
                }
            }
            c => parts.push(c),
        }
    }
    Ok(parts.join("/"))
}

/// The host-side work a container's mounts need before its spec can be built
/// ([`crate::container::volumes`] does it and answers with a [`Prepared`]).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct HostWork {
    /// CRI mounts to make recursively read-only: (index in `config.mounts`, host path).
    pub recursive_read_only: Vec<(usize, PathBuf)>,
    /// CRI image mounts: (index in `config.mounts`, image as named, sub path).
    pub images: Vec<(usize, String, String)>,
    /// Container paths of the volumes the image declares (`VOLUME`) that no CRI mount
    /// covers, cleaned and sorted.
    pub declared_volumes: Vec<String>,
}

/// Validates the CRI mounts of `config` and lists the host work they and the image's declared
/// volumes need. Nothing is mounted here.
pub fn host_work(
    config: &cri::ContainerConfig,
    image_config: &serde_json::Value,
) -> Result<HostWork, SpecError> {
    let mut work = HostWork::default();
    let mut dests = HashSet::new();
    for (i, m) in config.mounts.iter().enumerate() {
        let c = check_mount(m)?;
        match c.source {
            MountSource::Host(p) if c.recursive_read_only => {
                work.recursive_read_only.push((i, p));
            }
            MountSource::Host(_) => {}
            MountSource::Image { image, sub_path } => work.images.push((i, image, sub_path)),
        }
        dests.insert(c.dest);
    }
    let image = super::ImageConfig::from_json(image_config)?;
    let mut declared = std::collections::BTreeSet::new();
    for v in image.volumes.iter().flat_map(|v| v.keys()) {
        // Docker takes relative VOLUME paths as relative to the root.
        let Some(dest) = clean_path(&format!("/{}", v.trim_start_matches('/'))) else {
            continue;
        };
        if dest == "/" {
            tracing::warn!(volume = %v, "ignoring an image volume at /");
            continue;
        }
        // Like containerd: a CRI mount at the same path replaces the image's volume.
        if !dests.contains(&dest) {
            declared.insert(dest);
        }
    }
    work.declared_volumes = declared.into_iter().collect();
    Ok(work)
}

/// What berth prepared on the host for a container's mounts.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Prepared {
    /// CRI mount index → the host path bound in its place: a recursively read-only clone of
    /// its host path, or (a sub path of) its image's read-only mount.
    pub sources: BTreeMap<usize, PathBuf>,
    /// Volumes the image declares: (container path, the container's own dir for it).
    pub declared_volumes: Vec<(String, PathBuf)>,
}

/// A bind mount to make.
#[derive(Debug)]
struct Bind {
    dest: String,
    source: PathBuf,
    readonly: bool,
    propagation: Propagation,
}

/// A CRI mount → a bind (validated; prepared sources replace host paths where needed).
fn cri_bind(i: usize, m: &cri::Mount, prepared: &Prepared) -> Result<Bind, SpecError> {
    let c = check_mount(m)?;
    let prepared = prepared.sources.get(&i);
    let (source, readonly) = match (c.source, prepared) {
        (MountSource::Image { .. }, Some(p)) => (p.clone(), true),
        (MountSource::Image { image, .. }, None) => {
            return Err(SpecError::Invalid(format!(
                "image volume at {} (image {image}) is not mounted",
                c.dest
            )));
        }
        (MountSource::Host(_), Some(p)) if c.recursive_read_only => (p.clone(), true),
        (MountSource::Host(h), None) if c.recursive_read_only => {
            return Err(SpecError::Invalid(format!(
                "recursive read-only mount at {} (host path {}) is not prepared",
                c.dest,
                h.display()
            )));
        }
        (MountSource::Host(h), _) => (h, c.readonly),
    };
    Ok(Bind {
        dest: c.dest,
        source,
        readonly,
        propagation: c.propagation,
    })
}

/// The mounts of a container.
pub fn build(
    input: &SpecInput<'_>,
    privileged: bool,
    readonly_rootfs: bool,
) -> Result<MountPlan, SpecError> {
    let mut binds: Vec<Bind> = Vec::new();
    for (i, m) in input.config.mounts.iter().enumerate() {
        binds.push(cri_bind(i, m, input.prepared)?);
    }
    for (dest, dir) in &input.prepared.declared_volumes {
        binds.push(Bind {
            dest: dest.clone(),
            source: dir.clone(),
            readonly: false,
            propagation: Propagation::Private,
        });
    }
    let supplied: HashSet<String> = binds.iter().map(|b| b.dest.clone()).collect();

    // The pod's files and /dev/shm, unless the CRI mounts bring their own.
    let sandbox = input.sandbox;
    let mut extra = Vec::new();
    for (dest, source) in [
        ("/etc/hostname", sandbox.hostname_path()),
        ("/etc/hosts", sandbox.hosts_path()),
        ("/etc/resolv.conf", sandbox.resolv_conf_path()),
    ] {
        if source.exists() {
            extra.push(Bind {
                dest: dest.to_string(),
                source,
                readonly: readonly_rootfs,
                propagation: Propagation::Private,
            });
        }
    }
    if let Some(shm) = &input.pod_shm {
        extra.push(Bind {
            dest: "/dev/shm".to_string(),
            source: shm.clone(),
            readonly: false,
            propagation: Propagation::Private,
        });
    }
    binds.extend(extra.into_iter().filter(|b| !supplied.contains(&b.dest)));
    // Parents before children; stable, so equal depths keep their order.
    binds.sort_by_key(|b| depth(&b.dest));

    let dests: HashSet<&str> = binds.iter().map(|b| b.dest.as_str()).collect();
    let dev_supplied = dests.contains("/dev");
    let mut plan = MountPlan::default();
    for m in default_mounts(privileged) {
        let dest = m.destination().to_string_lossy().into_owned();
        if dests.contains(dest.as_str()) || (dev_supplied && dest.starts_with("/dev/")) {
            continue;
        }
        plan.mounts.push(m);
    }
    for b in binds {
        let propagation = match b.propagation {
            Propagation::Private => "rprivate",
            Propagation::Slave => {
                if plan.rootfs_propagation.as_deref() != Some("rshared") {
                    plan.rootfs_propagation = Some("rslave".to_string());
                }
                "rslave"
            }
            Propagation::Shared => {
                plan.rootfs_propagation = Some("rshared".to_string());
                "rshared"
            }
        };
        let mode = if b.readonly { "ro" } else { "rw" };
        plan.mounts.push(mount(
            &b.dest,
            "bind",
            &b.source,
            &["rbind", propagation, mode],
        ));
    }
    Ok(plan)
}

/// Checks that the mount holding `path` is shared (or, unless `shared_only`, a slave), as a
/// bidirectional (host-to-container) mount needs.
fn ensure_propagates(path: &Path, shared_only: bool) -> Result<(), SpecError> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(super::io_err("read /proc/self/mountinfo"))?;
    let Some((mountpoint, optional)) = mount_of(&info, path) else {
        return Err(SpecError::Invalid(format!(
            "cannot find the mount holding {}",
            path.display()
        )));
    };
    let ok = optional
        .split(' ')
        .any(|o| o.starts_with("shared:") || (!shared_only && o.starts_with("master:")));
    if ok {
        return Ok(());
    }
    let want = if shared_only {
        "a shared mount"
    } else {
        "a shared or slave mount"
    };
    Err(SpecError::Invalid(format!(
        "path {} is mounted on {} but it is not {want}",
        path.display(),
        mountpoint.display()
    )))
}

/// The mount point holding `path` and that mount's optional fields, from mountinfo text.
fn mount_of(mountinfo: &str, path: &Path) -> Option<(PathBuf, String)> {
    let mut best: Option<(PathBuf, String)> = None;
    for line in mountinfo.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        if fields.len() < 7 {
            continue;
        }
        let mountpoint = PathBuf::from(unescape(fields[4]));
        if !path.starts_with(&mountpoint) {
            continue;
        }
        let optional: Vec<&str> = fields[6..]
            .iter()
            .take_while(|f| **f != "-")
            .copied()
            .collect();
        let longer = best
            .as_ref()
            .is_none_or(|(b, _)| mountpoint.as_os_str().len() >= b.as_os_str().len());
        if longer {
            best = Some((mountpoint, optional.join(" ")));
        }
    }
    best
}

/// Undoes mountinfo's octal escapes (`\040` for a space…).
pub fn unescape(s: &str) -> String {
    String::from_utf8_lossy(&unescape_bytes(s.as_bytes())).into_owned()
}

/// [`unescape`] of raw bytes (a mount point need not be UTF-8).
pub fn unescape_bytes(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleans_paths() {
        assert_eq!(clean_path("//a/./b/../c/").as_deref(), Some("/a/c"));
        assert_eq!(clean_path("/").as_deref(), Some("/"));
        assert_eq!(clean_path("/.."), Some("/".to_string()));
        assert_eq!(clean_path("rel"), None);
        assert_eq!(depth("/"), 0);
        assert_eq!(depth("/a/b"), 2);
    }

    #[test]
    fn finds_the_mount_of_a_path() {
        let info = "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n\
            30 22 0:5 / /var/lib rw master:4 - tmpfs tmpfs rw\n\
            31 30 0:6 / /var/lib/with\\040space rw - tmpfs tmpfs rw\n";
        let (mp, opt) = mount_of(info, Path::new("/var/lib/x")).expect("found");
        assert_eq!((mp, opt.as_str()), (PathBuf::from("/var/lib"), "master:4"));
        let (mp, opt) = mount_of(info, Path::new("/var/lib/with space/y")).expect("found");
        assert_eq!(
            (mp, opt.as_str()),
            (PathBuf::from("/var/lib/with space"), "")
        );
        let (mp, _) = mount_of(info, Path::new("/var/libx")).expect("found");
        assert_eq!(mp, PathBuf::from("/"));
    }
}
