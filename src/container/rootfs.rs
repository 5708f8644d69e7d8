//! A container's root filesystem: an overlay mount of its image's layer snapshots (read-only
//! lower dirs) with a private upper dir, mounted at `<bundle>/rootfs` and removed with the
//! container. The upper and work dirs live under `root/containers/<id>` so a container's
//! writes survive a reboot like containerd's snapshots do.

use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};

#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("mounting the overlay at {path}: {source}")]
    Mount { path: PathBuf, source: nix::Error },
    #[error("unmounting {path}: {source}")]
    Unmount { path: PathBuf, source: nix::Error },
    #[error("the image has no layers")]
    NoLayers,
}

/// Where a container's writable layer lives.
pub fn rw_dir(root: &Path, id: &str) -> PathBuf {
    root.join("containers").join(id)
}

/// Mounts the overlay of `lower_dirs` (lowest layer first) plus the container's upper dir at
/// `target`.
pub fn mount_rootfs(
    root: &Path,
    id: &str,
    lower_dirs: &[PathBuf],
    target: &Path,
) -> Result<(), RootfsError> {
    if lower_dirs.is_empty() {
        return Err(RootfsError::NoLayers);
    }
    let rw = rw_dir(root, id);
    let (upper, work) = (rw.join("upper"), rw.join("work"));
    for d in [&upper, &work, &target.to_path_buf()] {
        std::fs::create_dir_all(d).map_err(|source| RootfsError::Io {
            what: "create",
            path: d.clone(),
            source,
        })?;
    }
    // overlayfs wants the uppermost lower dir first.
    let lower: Vec<String> = lower_dirs
        .iter()
        .rev()
        .map(|p| p.display().to_string())
        .collect();
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.join(":"),
        upper.display(),
        work.display()
    );
    mount(
        Some("overlay"),
        target,
        Some("overlay"),
        MsFlags::empty(),
        Some(options.as_str()),
    )
    .map_err(|source| RootfsError::Mount {
        path: target.to_path_buf(),
        source,
    })
}

/// Unmounts a container's rootfs (not mounted is fine).
pub fn unmount_rootfs(target: &Path) -> Result<(), RootfsError> {
    match umount2(target, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => Ok(()),
        Err(source) => Err(RootfsError::Unmount {
            path: target.to_path_buf(),
            source,
        }),
    }
}

/// Removes a container's writable layer.
pub fn remove_rw(root: &Path, id: &str) -> Result<(), RootfsError> {
    let rw = rw_dir(root, id);
    match std::fs::remove_dir_all(&rw) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(RootfsError::Io {
            what: "remove",
            path: rw,
            source,
        }),
    }
}

/// Whether `path` is a mount point (its device differs from its parent's).
pub fn is_mounted(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (
        std::fs::metadata(path),
        path.parent().map(std::fs::metadata),
    ) {
        (Ok(m), Some(Ok(p))) => m.dev() != p.dev(),
        _ => false,
    }
}
