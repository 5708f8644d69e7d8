//! A container's root filesystem: an overlay mount of its image's layer snapshots (read-only
//! lower dirs) with a private upper dir, mounted at `<bundle>/rootfs` and removed with the
//! container. The upper and work dirs live under `root/containers/<id>`, on disk beside the
//! record, so an exited container's writes can still be looked at.
//!
//! The writable overlay is mounted `volatile` where the kernel has it (5.10+), as CRI-O does:
//! a container's writable layer is never mounted again once its container is gone (the CRI
//! has no restart; after a reboot the kubelet makes new containers), so syncing the whole
//! backing filesystem at every unmount, which a plain overlay does, buys nothing and puts a
//! `syncfs` of the node's disk on every RemoveContainer.

use std::path::{Path, PathBuf};

use std::sync::atomic::{AtomicBool, Ordering};

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
    let mount = |volatile| {
        mount_overlay(
            lower_dirs,
            Some(UpperDir {
                upper: &upper,
                work: &work,
                volatile,
            }),
            target,
            MsFlags::empty(),
        )
    };
    let result = if VOLATILE_REFUSED.load(Ordering::Relaxed) {
        mount(false)
    } else {
        match mount(true) {
            // A kernel before 5.10 does not know the option: once it says so, it is not
            // offered again.
            Err(nix::Error::EINVAL) => {
                let plain = mount(false);
                if plain.is_ok() {
                    VOLATILE_REFUSED.store(true, Ordering::Relaxed);
                    tracing::info!(
                        "this kernel's overlayfs has no `volatile`; writable layers are synced at unmount"
                    );
                }
                plain
            }
            r => r,
        }
    };
    result.map_err(|source| RootfsError::Mount {
        path: target.to_path_buf(),
        source,
    })
}

/// Set once the kernel refused `volatile`.
static VOLATILE_REFUSED: AtomicBool = AtomicBool::new(false);

/// A writable overlay's upper and work dirs, and whether it is mounted `volatile` (no sync of
/// the upper filesystem at unmount or on `syncfs`).
#[derive(Debug, Clone, Copy)]
pub struct UpperDir<'a> {
    pub upper: &'a Path,
    pub work: &'a Path,
    pub volatile: bool,
}

/// The longest mount options string the kernel takes (one page, minus room to spare).
const MAX_OPTIONS: usize = 4000;

/// Mounts an overlay of `lower_dirs` (lowest layer first), with an upper and work dir or
/// read-only without, at `target`. The kernel takes one page of options: when the lower dirs'
/// paths do not fit, each is opened and named by its short `/proc/self/fd/N` link instead
/// (resolved at mount time; the fds are closed after), so images of up to ~200 layers mount.
pub fn mount_overlay(
    lower_dirs: &[PathBuf],
    upper_dir: Option<UpperDir<'_>>,
    target: &Path,
    flags: MsFlags,
) -> Result<(), nix::Error> {
    let tail = match upper_dir {
        Some(u) => format!(
            ",upperdir={},workdir={}{}",
            u.upper.display(),
            u.work.display(),
            if u.volatile { ",volatile" } else { "" }
        ),
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
        let _ro = Unmounted(&target);
        let read = |p: &Path| std::fs::read_to_string(p).expect("read");
        assert_eq!(read(&target.join("f0")), "0");
        assert_eq!(read(&target.join("f89")), "89");
        // The uppermost layer wins.
        assert_eq!(read(&target.join("top")), "89");
        unmount_rootfs(&target).expect("unmount");

        let rootfs = t.path().join("rootfs");
        mount_rootfs(t.path(), "c1", &lower, &rootfs).expect("rootfs");
        let _rw = Unmounted(&rootfs);
        std::fs::write(rootfs.join("new"), "x").expect("writable");
        // The writable layer is volatile: its unmount does not sync the node's disk.
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        let line = mountinfo
            .lines()
            .find(|l| l.split(' ').nth(4) == Some(rootfs.to_str().expect("utf-8")))
            .expect("the rootfs is in mountinfo");
        // (shown as `fsync=volatile` by kernels that have the `fsync=` option)
        assert!(
            line.contains(",volatile")
                || line.contains("fsync=volatile")
                || VOLATILE_REFUSED.load(Ordering::Relaxed),
            "{line}"
        );
        assert_eq!(read(&rootfs.join("f45")), "45");
        unmount_rootfs(&rootfs).expect("unmount");
    }

    /// Unmounts its path when dropped, so that a failed assertion leaves no mount behind.
    struct Unmounted<'a>(&'a Path);

    impl Drop for Unmounted<'_> {
        fn drop(&mut self) {
            let _ = unmount_rootfs(self.0);
        }
    }
}
