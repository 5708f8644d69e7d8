//! Mounts of a container: the OCI defaults (proc, /dev, devpts, shm, mqueue, sysfs, cgroup),
//! the pod's files (/etc/hostname, /etc/hosts, /etc/resolv.conf) and /dev/shm, and the CRI
//! mounts (bind mounts with propagation), as containerd's CRI plugin lays them out:
//! defaults first (minus those a supplied mount replaces), then the supplied mounts sorted
//! so that parents come before their children.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

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

/// A bind mount to make.
#[derive(Debug)]
struct Bind {
    dest: String,
    source: PathBuf,
    readonly: bool,
    propagation: Propagation,
}

/// A CRI mount → a bind (validated; the host path must exist).
fn cri_bind(m: &cri::Mount) -> Result<Option<Bind>, SpecError> {
    if m.image.is_some() && m.host_path.is_empty() {
        // Image volumes are not supported yet: the kubelet only sends them when asked to.
        tracing::warn!(container_path = %m.container_path, "ignoring an image volume mount");
        return Ok(None);
    }
    let dest = clean_path(&m.container_path).ok_or_else(|| {
        SpecError::Invalid(format!(
            "mount container path {:?} is not absolute",
            m.container_path
        ))
    })?;
    if m.host_path.is_empty() {
        return Err(SpecError::Invalid(format!(
            "mount at {dest} has no host path"
        )));
    }
    let source = std::fs::canonicalize(&m.host_path)
        .map_err(|e| SpecError::Invalid(format!("mount host path {}: {e}", m.host_path)))?;
    if m.recursive_read_only {
        return Err(SpecError::Invalid(format!(
            "recursive read-only mounts are not supported (host path {})",
            m.host_path
        )));
    }
    let propagation = match cri::MountPropagation::try_from(m.propagation) {
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
            tracing::warn!(host_path = %m.host_path, propagation = m.propagation,
                "unknown mount propagation; using private");
            Propagation::Private
        }
    };
    Ok(Some(Bind {
        dest,
        source,
        readonly: m.readonly,
        propagation,
    }))
}

/// The mounts of a container.
pub fn build(
    input: &SpecInput<'_>,
    privileged: bool,
    readonly_rootfs: bool,
) -> Result<MountPlan, SpecError> {
    let mut binds: Vec<Bind> = Vec::new();
    for m in &input.config.mounts {
        if let Some(b) = cri_bind(m)? {
            binds.push(b);
        }
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
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
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
    String::from_utf8_lossy(&out).into_owned()
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
