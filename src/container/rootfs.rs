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
    mount_overlay(lower_dirs, Some((&upper, &work)), target, MsFlags::empty()).map_err(|source| {
        RootfsError::Mount {
            path: target.to_path_buf(),
            source,
        }
    })
}

/// The longest mount options string the kernel takes (one page, minus room to spare).
const MAX_OPTIONS: usize = 4000;

/// Mounts an overlay of `lower_dirs` (lowest layer first), with an upper and work dir or
/// read-only without, at `target`. The kernel takes one page of options: when the lower dirs'
/// paths do not fit, each is opened and named by its short `/proc/self/fd/N` link instead
/// (resolved at mount time; the fds are closed after), so images of up to ~200 layers mount.
pub fn mount_overlay(
    lower_dirs: &[PathBuf],
    upper_work: Option<(&Path, &Path)>,
    target: &Path,
    flags: MsFlags,
) -> Result<(), nix::Error> {
    let tail = match upper_work {
        Some((upper, work)) => format!(",upperdir={},workdir={}", upper.display(), work.display()),
        None => String::new(),
    };
    // overlayfs wants the uppermost lower dir first.
    let plain: Vec<String> = lower_dirs
        .iter()
        .rev()
        .map(|p| p.display().to_string())
        .collect();
    let options = format!("lowerdir={}{tail}", plain.join(":"));
    if options.len() <= MAX_OPTIONS {
        return mount(
            Some("overlay"),
            target,
            Some("overlay"),
            flags,
            Some(options.as_str()),
        );
    }
    let mut fds = Vec::with_capacity(lower_dirs.len());
    for dir in lower_dirs.iter().rev() {
        fds.push(nix::fcntl::open(
            dir.as_path(),
            nix::fcntl::OFlag::O_PATH
                | nix::fcntl::OFlag::O_DIRECTORY
                | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )?);
    }
    use std::os::fd::AsRawFd;
    let short: Vec<String> = fds
        .iter()
        .map(|fd| format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .collect();
    let options = format!("lowerdir={}{tail}", short.join(":"));
    if options.len() > MAX_OPTIONS {
        return Err(nix::Error::E2BIG);
    }
    mount(
        Some("overlay"),
        target,
        Some("overlay"),
        flags,
        Some(options.as_str()),
    )
    // `fds` close here, after the mount resolved them.
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

#[cfg(test)]
mod tests {
    use super::*;

    /// An image of many layers with long paths (more than a page of options) still mounts,
    /// read-only and writable, with every layer in its place.
    #[test]
    fn many_layers_with_long_paths_mount() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipping: mounting overlays needs root");
            return;
        }
        let t = tempfile::tempdir().expect("tmp");
        let long = "a-rather-long-snapshot-directory-name-like-a-chain-id-0123456789abcdef";
        let lower: Vec<PathBuf> = (0..90)
            .map(|i| {
                let d = t.path().join(format!("{long}-{i:03}")).join("fs");
                std::fs::create_dir_all(&d).expect("layer");
                std::fs::write(d.join(format!("f{i}")), format!("{i}")).expect("file");
                std::fs::write(d.join("top"), format!("{i}")).expect("file");
                d
            })
            .collect();
        let plain: usize = lower.iter().map(|p| p.as_os_str().len() + 1).sum();
        assert!(plain > MAX_OPTIONS, "the test must exceed a page: {plain}");
        let target = t.path().join("ro");
        std::fs::create_dir(&target).expect("target");
        mount_overlay(&lower, None, &target, MsFlags::MS_RDONLY).expect("read-only overlay");
        let read = |p: &Path| std::fs::read_to_string(p).expect("read");
        assert_eq!(read(&target.join("f0")), "0");
        assert_eq!(read(&target.join("f89")), "89");
        // The uppermost layer wins.
        assert_eq!(read(&target.join("top")), "89");
        unmount_rootfs(&target).expect("unmount");

        let rootfs = t.path().join("rootfs");
        mount_rootfs(t.path(), "c1", &lower, &rootfs).expect("rootfs");
        std::fs::write(rootfs.join("new"), "x").expect("writable");
        assert_eq!(read(&rootfs.join("f45")), "45");
        unmount_rootfs(&rootfs).expect("unmount");
    }
}
