//! Container cgroups: where a container's cgroup is (`<pod cgroup_parent>/<id>` with the
//! cgroupfs driver, `slice:prefix:name` with the systemd driver, as runc expects
//! `linux.cgroupsPath`), which layout the machine has (v1 per-controller hierarchies, the
//! v1+v2 "hybrid", or pure v2), where OOM kills are counted, and removing what the runtime
//! left. The runtime creates the cgroup and applies limits; berth names and cleans. [`pod`]
//! writes the limits of a pod's own cgroup (`UpdatePodSandboxResources`); [`stats`] reads
//! usage (CPU, memory, tasks) on v1 and v2.

pub mod pod;
pub mod stats;

use std::path::{Path, PathBuf};

/// The cgroup hierarchy layout of this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Per-controller v1 hierarchies (possibly with a v2 mount beside: "hybrid").
    V1,
    /// One unified v2 hierarchy at /sys/fs/cgroup.
    V2,
}

const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// The prefix of systemd scope units berth makes (`cri-berth-<id>.scope`).
pub const SYSTEMD_PREFIX: &str = "cri-berth";
/// The cgroup parent used when the pod names none (cgroupfs).
pub const DEFAULT_PARENT: &str = "/berth";
/// The slice used when the pod names none (systemd).
pub const DEFAULT_SLICE: &str = "system.slice";

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("invalid cgroup parent {parent:?}: {reason}")]
    InvalidParent {
        parent: String,
        reason: &'static str,
    },
    #[error("cgroup {0} does not exist")]
    Missing(PathBuf),
    #[error("{0}")]
    Unsupported(String),
    #[error("writing {value:?} to {path}: {source}")]
    Write {
        path: PathBuf,
        value: String,
        source: std::io::Error,
    },
    #[error("removing cgroup {path}: {source}")]
    Remove {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Detects the layout from the filesystem mounted at /sys/fs/cgroup.
pub fn detect() -> Layout {
    match nix::sys::statfs::statfs(CGROUP_ROOT) {
        Ok(s) if s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC => Layout::V2,
        _ => Layout::V1,
    }
}

/// The OCI `linux.cgroupsPath` of a container.
pub fn cgroups_path(systemd: bool, parent: &str, id: &str) -> Result<String, CgroupError> {
    if systemd {
        let slice = if parent.is_empty() {
            DEFAULT_SLICE
        } else {
            parent
        };
        if slice.contains('/') || !slice.ends_with(".slice") {
            return Err(CgroupError::InvalidParent {
                parent: parent.to_string(),
                reason: "the systemd driver wants a slice name like kubepods-pod1.slice",
            });
        }
        return Ok(format!("{slice}:{SYSTEMD_PREFIX}:{id}"));
    }
    let parent = if parent.is_empty() {
        DEFAULT_PARENT
    } else {
        parent
    };
    if !parent.starts_with('/') {
        return Err(CgroupError::InvalidParent {
            parent: parent.to_string(),
            reason: "the cgroupfs driver wants an absolute path",
        });
    }
    if parent.split('/').any(|c| c == ".." || c == ".") {
        return Err(CgroupError::InvalidParent {
            parent: parent.to_string(),
            reason: "`.` and `..` are not allowed",
        });
    }
    if parent.ends_with(".slice") {
        return Err(CgroupError::InvalidParent {
            parent: parent.to_string(),
            reason: "a systemd slice with the cgroupfs driver (set cgroup_driver = \"systemd\")",
        });
    }
    Ok(format!("{}/{id}", parent.trim_end_matches('/')))
}

/// A systemd slice as systemd nests it (`a-b.slice` → `a.slice/a-b.slice`; `-.slice`, the
/// root slice, is the root).
pub fn slice_dir(slice: &str) -> PathBuf {
    let mut dir = PathBuf::new();
    if slice != "-.slice" {
        let mut acc = String::new();
        for piece in slice.trim_end_matches(".slice").split('-') {
            if !acc.is_empty() {
                acc.push('-');
            }
            acc.push_str(piece);
            dir.push(format!("{acc}.slice"));
        }
    }
    dir
}

/// The cgroup directory (relative to a hierarchy root) that a `cgroupsPath` stands for:
/// itself for cgroupfs; for systemd, the slice expanded as systemd nests it
/// (`a-b.slice` → `a.slice/a-b.slice`) plus the scope.
pub fn relative_dir(cgroups_path: &str) -> PathBuf {
    let parts: Vec<&str> = cgroups_path.split(':').collect();
    if let [slice, prefix, name] = parts[..] {
        let mut dir = slice_dir(slice);
        dir.push(format!("{prefix}-{name}.scope"));
        return dir;
    }
    PathBuf::from(cgroups_path.trim_start_matches('/'))
}

/// The directories of a container's cgroup in every hierarchy of this layout.
pub fn dirs(layout: Layout, cgroups_path: &str) -> Vec<PathBuf> {
    let rel = relative_dir(cgroups_path);
    match layout {
        Layout::V2 => vec![Path::new(CGROUP_ROOT).join(rel)],
        Layout::V1 => std::fs::read_dir(CGROUP_ROOT)
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path().join(&rel))
                    .collect()
            })
            .unwrap_or_default(),
    }
}

/// Files whose `oom_kill N` line counts OOM kills in the container's cgroup.
pub fn oom_files(layout: Layout, cgroups_path: &str) -> Vec<PathBuf> {
    let rel = relative_dir(cgroups_path);
    match layout {
        Layout::V2 => vec![Path::new(CGROUP_ROOT).join(rel).join("memory.events")],
        Layout::V1 => vec![
            Path::new(CGROUP_ROOT)
                .join("memory")
                .join(rel)
                .join("memory.oom_control"),
        ],
    }
}

/// A controller file of the container's cgroup (v1: under that controller's hierarchy).
pub fn file(layout: Layout, controller: &str, cgroups_path: &str, name: &str) -> PathBuf {
    let rel = relative_dir(cgroups_path);
    match layout {
        Layout::V2 => Path::new(CGROUP_ROOT).join(rel).join(name),
        Layout::V1 => Path::new(CGROUP_ROOT).join(controller).join(rel).join(name),
    }
}

/// Removes the container's cgroup directories the runtime left (absent is fine).
pub fn remove(layout: Layout, cgroups_path: &str) -> Result<(), CgroupError> {
    for d in dirs(layout, cgroups_path) {
        match std::fs::remove_dir(&d) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(CgroupError::Remove { path: d, source }),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroupfs_paths() {
        assert_eq!(
            cgroups_path(false, "/kubepods/burstable/pod1", "abc").expect("path"),
            "/kubepods/burstable/pod1/abc"
        );
        assert_eq!(cgroups_path(false, "", "abc").expect("path"), "/berth/abc");
        assert!(cgroups_path(false, "relative", "abc").is_err());
        assert!(cgroups_path(false, "/a/../b", "abc").is_err());
        assert!(cgroups_path(false, "kubepods.slice", "abc").is_err());
        assert_eq!(
            relative_dir("/kubepods/pod1/abc"),
            PathBuf::from("kubepods/pod1/abc")
        );
    }

    #[test]
    fn systemd_paths_follow_runc() {
        let p = cgroups_path(true, "kubepods-burstable-pod1.slice", "abc").expect("path");
        assert_eq!(p, "kubepods-burstable-pod1.slice:cri-berth:abc");
        assert_eq!(
            relative_dir(&p),
            PathBuf::from(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice/cri-berth-abc.scope"
            )
        );
        assert_eq!(
            cgroups_path(true, "", "x").expect("path"),
            "system.slice:cri-berth:x"
        );
        assert!(cgroups_path(true, "/kubepods/pod1", "x").is_err());
        assert_eq!(
            relative_dir("-.slice:cri-berth:x"),
            PathBuf::from("cri-berth-x.scope")
        );
    }

    #[test]
    fn oom_files_per_layout() {
        assert_eq!(
            oom_files(Layout::V1, "/berth/x"),
            vec![PathBuf::from(
                "/sys/fs/cgroup/memory/berth/x/memory.oom_control"
            )]
        );
        assert_eq!(
            oom_files(Layout::V2, "/berth/x"),
            vec![PathBuf::from("/sys/fs/cgroup/berth/x/memory.events")]
        );
    }
}
