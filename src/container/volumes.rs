//! Host-side mount work for a container's volumes, done before the OCI runtime's `create` and
//! undone when the container goes (or its creation fails, or a restart removes it half-made):
//!
//! - **recursive read-only mounts**: runc 1.1 has no `rro` option, so berth makes a recursive
//!   bind of the host path at `<bundle>/mounts/rro-<n>`, makes it private, sets every mount in
//!   it read-only with `mount_setattr(AT_RECURSIVE, MOUNT_ATTR_RDONLY)` and gives the runtime
//!   that clone as the bind source (`rbind,ro`): a bind copies each submount's read-only flag;
//! - **image volumes** (KEP-4639): a read-only overlay of the image's layer snapshots (a
//!   read-only bind when it has one layer) at `<bundle>/mounts/image-<n>`; its sub path,
//!   resolved inside the image, is the bind source;
//! - **volumes the image declares** (`VOLUME`): a directory per volume under the container's
//!   writable dir (`<root>/containers/<id>/volumes/<n>`, kept as long as the container, like
//!   containerd's), seeded with the image's content at that path copied from the mounted
//!   rootfs (files, dirs, symlinks, hardlinks, devices and fifos, with owners, modes, times and
//!   xattrs), bound read-write.
//!
//! Every function here blocks (mount syscalls, copying): callers run them on a blocking
//! thread. No namespace is entered: all of it happens in berthd's mount namespace.

use std::collections::HashMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use nix::mount::{MntFlags, MsFlags, mount, umount2};

use super::spec::mounts::{Prepared, unescape_bytes};

/// Errors of the host-side mount work.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// The kernel cannot do what a mount asks.
    #[error("{0}")]
    Unsupported(String),
    /// The request cannot be met with what the image holds.
    #[error("{0}")]
    Invalid(String),
    #[error("{what} {path}: {source}")]
    Mount {
        what: &'static str,
        path: PathBuf,
        source: nix::Error,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("mounts are left under {0} after unmounting")]
    StillMounted(PathBuf),
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> VolumeError {
    let path = path.to_path_buf();
    move |source| VolumeError::Io { what, path, source }
}

fn mnt(what: &'static str, path: &Path) -> impl FnOnce(nix::Error) -> VolumeError {
    let path = path.to_path_buf();
    move |source| VolumeError::Mount { what, path, source }
}

/// An image to mount for a CRI mount.
#[derive(Debug, Clone)]
pub struct ImageMount {
    /// Index of the CRI mount in `config.mounts`.
    pub index: usize,
    /// The image's id (for messages).
    pub image: String,
    /// Its layer snapshots, lowest first.
    pub lower_dirs: Vec<PathBuf>,
    /// A clean relative path inside the image (`""`: its root).
    pub sub_path: String,
}

/// The host work of one container.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// `<bundle>/mounts` holds the mount points.
    pub mounts_dir: PathBuf,
    /// Where declared volumes' dirs go (`<root>/containers/<id>/volumes`).
    pub volumes_dir: PathBuf,
    /// The container's mounted rootfs (declared volumes are seeded from it).
    pub rootfs: PathBuf,
    /// (CRI mount index, host path) to make recursively read-only.
    pub recursive_read_only: Vec<(usize, PathBuf)>,
    pub images: Vec<ImageMount>,
    /// Container paths of the volumes the image declares.
    pub declared_volumes: Vec<String>,
}

/// `<bundle>/mounts`, where a container's staging and image mounts live.
pub fn mounts_dir(bundle: &Path) -> PathBuf {
    bundle.join("mounts")
}

/// Does the work of `plan`. On error, what was made stays for [`release`] to undo.
pub fn prepare(plan: &Plan) -> Result<Prepared, VolumeError> {
    let mut prepared = Prepared::default();
    if !plan.recursive_read_only.is_empty() || !plan.images.is_empty() {
        std::fs::create_dir_all(&plan.mounts_dir).map_err(io("create", &plan.mounts_dir))?;
    }
    for (index, source) in &plan.recursive_read_only {
        let target = plan.mounts_dir.join(format!("rro-{index}"));
        recursive_read_only(source, &target)?;
        prepared.sources.insert(*index, target);
    }
    for image in &plan.images {
        let target = plan.mounts_dir.join(format!("image-{}", image.index));
        mount_image(&image.lower_dirs, &target)?;
        let source = if image.sub_path.is_empty() {
            target
        } else {
            let p = resolve_in_root(&target, &image.sub_path)?;
            match std::fs::symlink_metadata(&p) {
                Ok(m) if m.is_dir() => p,
                Ok(_) => {
                    return Err(VolumeError::Invalid(format!(
                        "image_sub_path {:?} of image {} is not a directory",
                        image.sub_path, image.image
                    )));
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(VolumeError::Invalid(format!(
                        "image_sub_path {:?} does not exist in image {}",
                        image.sub_path, image.image
                    )));
                }
                Err(e) => return Err(io("inspect", &p)(e)),
            }
        };
        prepared.sources.insert(image.index, source);
    }
    for (n, dest) in plan.declared_volumes.iter().enumerate() {
        let dir = plan.volumes_dir.join(n.to_string());
        declared_volume(&plan.rootfs, dest, &dir)?;
        prepared.declared_volumes.push((dest.clone(), dir));
    }
    Ok(prepared)
}

/// Unmounts (detached, recursively) everything under `<bundle>/mounts` and removes that dir.
/// Nothing there is fine.
pub fn release(bundle: &Path) -> Result<(), VolumeError> {
    let dir = mounts_dir(bundle);
    if !dir.exists() {
        return Ok(());
    }
    // A detached unmount takes the mounts under it along; one stacked below shows next round.
    for _ in 0..8 {
        let mounts = mount_points(&dir).map_err(io("find mounts in", &dir))?;
        if mounts.is_empty() {
            break;
        }
        for m in mounts {
            match umount2(&m, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW) {
                Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => {}
                Err(e) => return Err(mnt("unmount", &m)(e)),
            }
        }
    }
    match remove_unless_mounted(&dir) {
        Ok(left) if left.is_empty() => Ok(()),
        Ok(_) => Err(VolumeError::StillMounted(dir)),
        Err(e) => Err(io("remove", &dir)(e)),
    }
}

/// Removes `dir` with everything in it, unless something is mounted at or under it: then
/// nothing is removed (a removal never recurses into a rootfs or a bind of a host path) and
/// the mount points found are returned. Empty when `dir` went or was not there. An error, and
/// nothing removed, when what is mounted there cannot be told.
///
/// Callers hold what keeps anything from being mounted in `dir` meanwhile (the container's
/// lock, or start-up before any RPC).
pub fn remove_unless_mounted(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let left = mount_points(dir)?;
    if !left.is_empty() {
        return Ok(left);
    }
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(Vec::new()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// The mount points at or under `dir`. Found by walking it with one `statx` per entry
/// (`STATX_ATTR_MOUNT_ROOT`, Linux 5.8+), which never enters a mount, so only the outermost
/// mounts are named. Where the kernel does not tell, or the walk fails, every mount point at or
/// under `dir` is taken from /proc/self/mountinfo, deepest first: reading that costs about
/// 2.8 ms on a node with 1250 mounts (250 pods), where the walk of a bundle costs a few µs.
pub(crate) fn mount_points(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    match walk_mount_points(dir, &mut found) {
        Ok(true) => Ok(found),
        Ok(false) => mounts_under(dir),
        Err(e) => {
            tracing::debug!(dir = %dir.display(), error = %e, "walk for mount points; reading mountinfo");
            mounts_under(dir)
        }
    }
}

/// Adds to `found` `path` if it is a mount root, else (a directory) the mount points under it.
/// `Ok(false)` when the kernel does not say what is a mount root. Entries that vanish meanwhile
/// are skipped.
fn walk_mount_points(path: &Path, found: &mut Vec<PathBuf>) -> std::io::Result<bool> {
    let (mount_root, dir) = match statx_mount_root(path) {
        Ok(Some(v)) => v,
        Ok(None) => return Ok(false),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(true),
        Err(e) => return Err(e),
    };
    if mount_root {
        found.push(path.to_path_buf());
        return Ok(true);
    }
    if !dir {
        return Ok(true);
    }
    let entries = match std::fs::read_dir(path) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(true),
        Err(e) => return Err(e),
    };
    for entry in entries {
        if !walk_mount_points(&entry?.path(), found)? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Whether `path` (not followed if a symlink) is the root of a mount, and whether it is a
/// directory; `None` when the kernel does not report both (mount roots: Linux 5.8+).
fn statx_mount_root(path: &Path) -> std::io::Result<Option<(bool, bool)>> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut stx = std::mem::MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: `c` is a NUL-terminated path and `stx` a buffer of the size the kernel fills.
    let r = unsafe {
        libc::statx(
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW | libc::AT_NO_AUTOMOUNT | libc::AT_STATX_DONT_SYNC,
            libc::STATX_TYPE,
            stx.as_mut_ptr(),
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statx succeeded, so it filled the buffer (which was zeroed before).
    let stx = unsafe { stx.assume_init() };
    let bit = libc::STATX_ATTR_MOUNT_ROOT as u64;
    if stx.stx_attributes_mask & bit == 0 || stx.stx_mask & libc::STATX_TYPE == 0 {
        return Ok(None);
    }
    let dir = u32::from(stx.stx_mode) & libc::S_IFMT == libc::S_IFDIR;
    Ok(Some((stx.stx_attributes & bit != 0, dir)))
}

/// Mount points at or under `dir` (per /proc/self/mountinfo, paths taken as bytes), deepest
/// first.
fn mounts_under(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    use std::os::unix::ffi::OsStringExt as _;
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let info = std::fs::read("/proc/self/mountinfo")?;
    let mut v: Vec<PathBuf> = info
        .split(|&b| b == b'\n')
        .filter_map(|l| l.split(|&b| b == b' ').nth(4))
        .map(|m| PathBuf::from(std::ffi::OsString::from_vec(unescape_bytes(m))))
        .filter(|m| m.starts_with(&dir))
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    v.dedup();
    Ok(v)
}

/// `struct mount_attr` of `mount_setattr(2)`.
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

const MOUNT_ATTR_RDONLY: u64 = 0x1;

/// Whether the kernel has `mount_setattr(2)` (Linux 5.12), which recursive read-only mounts
/// need. Probed once.
pub fn recursive_read_only_supported() -> bool {
    static SUPPORTED: OnceLock<bool> = OnceLock::new();
    *SUPPORTED.get_or_init(|| {
        // An invalid call: EBADF/EINVAL/EFAULT when the syscall exists, ENOSYS when it does
        // not (EPERM: a seccomp filter forbids it, which is as good as absent).
        // SAFETY: no pointer is dereferenced by the kernel for these arguments: the path is
        // NULL and the size is 0, so the call fails before reading anything.
        let r = unsafe {
            libc::syscall(
                libc::SYS_mount_setattr,
                -1,
                std::ptr::null::<libc::c_char>(),
                0,
                std::ptr::null::<MountAttr>(),
                0usize,
            )
        };
        if r == 0 {
            return true;
        }
        let errno = std::io::Error::last_os_error().raw_os_error();
        !matches!(errno, Some(libc::ENOSYS) | Some(libc::EPERM))
    })
}

/// Sets every mount of the tree at `path` read-only.
fn set_recursive_read_only(path: &Path) -> Result<(), VolumeError> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| VolumeError::Invalid(format!("path {} has a NUL byte", path.display())))?;
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_RDONLY,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    let flags = (libc::AT_RECURSIVE | libc::AT_SYMLINK_NOFOLLOW) as libc::c_uint;
    // SAFETY: `c_path` is a NUL-terminated string and `attr` a properly sized `mount_attr`,
    // both alive for the call; the kernel only reads them.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            c_path.as_ptr(),
            flags,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if r < 0 {
        return Err(VolumeError::Mount {
            what: "mount_setattr(AT_RECURSIVE, MOUNT_ATTR_RDONLY)",
            path: path.to_path_buf(),
            source: nix::Error::last(),
        });
    }
    Ok(())
}

/// Creates `target` as a mount point for `source` (a dir, or an empty file for a file).
fn mount_point_for(source: &Path, target: &Path) -> Result<(), VolumeError> {
    let is_dir = std::fs::metadata(source)
        .map_err(io("inspect", source))?
        .is_dir();
    if is_dir {
        std::fs::create_dir_all(target).map_err(io("create", target))
    } else {
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(target)
            .map(drop)
            .map_err(io("create", target))
    }
}

/// A private recursive bind of `source` at `target` with every mount in it read-only.
fn recursive_read_only(source: &Path, target: &Path) -> Result<(), VolumeError> {
    if !recursive_read_only_supported() {
        return Err(VolumeError::Unsupported(format!(
            "recursive read-only mount of {}: this kernel lacks mount_setattr(2) (Linux 5.12 \
             or later is needed)",
            source.display()
        )));
    }
    mount_point_for(source, target)?;
    mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(mnt("bind", target))?;
    let made = mount(
        None::<&str>,
        target,
        None::<&str>,
        MsFlags::MS_PRIVATE | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(mnt("make private", target))
    .and_then(|()| set_recursive_read_only(target));
    if made.is_err() {
        let _ = umount2(target, MntFlags::MNT_DETACH);
    }
    made
}

/// A read-only mount of an image's layers at `target`: an overlay of them, or a read-only
/// bind of the only one (overlayfs needs two lower dirs when it has no upper dir).
fn mount_image(lower_dirs: &[PathBuf], target: &Path) -> Result<(), VolumeError> {
    std::fs::create_dir_all(target).map_err(io("create", target))?;
    match lower_dirs {
        [] => {
            return Err(VolumeError::Invalid(format!(
                "the image for {} has no layers",
                target.display()
            )));
        }
        [only] => {
            mount(
                Some(only.as_path()),
                target,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(mnt("bind the image layer at", target))?;
            let ro = mount(
                None::<&str>,
                target,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                None::<&str>,
            );
            if let Err(e) = ro {
                let _ = umount2(target, MntFlags::MNT_DETACH);
                return Err(mnt("make read-only", target)(e));
            }
        }
        many => {
            super::rootfs::mount_overlay(many, None, target, MsFlags::MS_RDONLY)
                .map_err(mnt("mount the image overlay at", target))?;
        }
    }
    if let Err(e) = mount(
        None::<&str>,
        target,
        None::<&str>,
        MsFlags::MS_PRIVATE,
        None::<&str>,
    ) {
        let _ = umount2(target, MntFlags::MNT_DETACH);
        return Err(mnt("make private", target)(e));
    }
    Ok(())
}

/// The host path of `path` inside the tree at `root`, with symlinks resolved as if `root` were
/// `/` (so nothing leads outside it). Components that do not exist are kept as they are.
pub fn resolve_in_root(root: &Path, path: &str) -> Result<PathBuf, VolumeError> {
    super::user::scoped_path(root, path)
        .map_err(|e| VolumeError::Invalid(format!("resolving {path:?} in the image: {e}")))
}

/// The dir of a volume the image declares at `dest`, seeded from the rootfs.
fn declared_volume(rootfs: &Path, dest: &str, dir: &Path) -> Result<(), VolumeError> {
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent).map_err(io("create", parent))?;
    }
    let source = resolve_in_root(rootfs, dest)?;
    match std::fs::symlink_metadata(&source) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir(dir).map_err(io("create", dir))
        }
        Err(e) => Err(io("inspect", &source)(e)),
        Ok(m) if m.is_dir() => {
            std::fs::create_dir(dir).map_err(io("create", dir))?;
            let mut links = HashMap::new();
            copy_tree(&source, dir, &mut links)?;
            copy_attrs(&source, dir, &m)
        }
        Ok(_) => Err(VolumeError::Invalid(format!(
            "the image declares a volume at {dest}, which is not a directory in the image"
        ))),
    }
}

/// Copies the content of dir `from` into the existing dir `to`.
fn copy_tree(
    from: &Path,
    to: &Path,
    links: &mut HashMap<(u64, u64), PathBuf>,
) -> Result<(), VolumeError> {
    for entry in std::fs::read_dir(from).map_err(io("read", from))? {
        let entry = entry.map_err(io("read", from))?;
        let src = entry.path();
        let dst = to.join(entry.file_name());
        let m = std::fs::symlink_metadata(&src).map_err(io("inspect", &src))?;
        let ft = m.file_type();
        if !ft.is_dir() && m.nlink() > 1 {
            if let Some(first) = links.get(&(m.dev(), m.ino())) {
                std::fs::hard_link(first, &dst).map_err(io("link", &dst))?;
                continue;
            }
            links.insert((m.dev(), m.ino()), dst.clone());
        }
        if ft.is_dir() {
            std::fs::create_dir(&dst).map_err(io("create", &dst))?;
            copy_tree(&src, &dst, links)?;
        } else if ft.is_file() {
            std::fs::copy(&src, &dst).map_err(io("copy", &src))?;
        } else if ft.is_symlink() {
            let target = std::fs::read_link(&src).map_err(io("read link", &src))?;
            std::os::unix::fs::symlink(&target, &dst).map_err(io("create", &dst))?;
        } else if ft.is_fifo() || ft.is_char_device() || ft.is_block_device() || ft.is_socket() {
            let kind = nix::sys::stat::SFlag::from_bits_truncate(m.mode() & libc::S_IFMT);
            let perm = nix::sys::stat::Mode::from_bits_truncate(m.mode() & 0o7777);
            nix::sys::stat::mknod(&dst, kind, perm, m.rdev())
                .map_err(|e| mnt("make node", &dst)(e))?;
        }
        copy_attrs(&src, &dst, &m)?;
    }
    Ok(())
}

/// Gives `to` the owner, xattrs, mode and times of `from` (whose metadata is `m`).
fn copy_attrs(from: &Path, to: &Path, m: &std::fs::Metadata) -> Result<(), VolumeError> {
    use nix::sys::stat::{UtimensatFlags, utimensat};
    use nix::sys::time::TimeSpec;
    use nix::unistd::{Gid, Uid, fchownat};
    fchownat(
        nix::fcntl::AT_FDCWD,
        to,
        Some(Uid::from_raw(m.uid())),
        Some(Gid::from_raw(m.gid())),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(|e| mnt("chown", to)(e))?;
    // Best effort: a filesystem without xattrs (or a namespace we may not write) loses them.
    if let Ok(names) = xattr::list(from) {
        for name in names {
            if let Ok(Some(value)) = xattr::get(from, &name)
                && let Err(e) = xattr::set(to, &name, &value)
            {
                tracing::debug!(path = %to.display(), xattr = ?name, error = %e, "xattr not copied");
            }
        }
    }
    if !m.file_type().is_symlink() {
        // After chown, which clears setuid/setgid bits.
        std::fs::set_permissions(to, std::fs::Permissions::from_mode(m.mode() & 0o7777))
            .map_err(io("chmod", to))?;
    }
    utimensat(
        nix::fcntl::AT_FDCWD,
        to,
        &TimeSpec::new(m.atime(), m.atime_nsec()),
        &TimeSpec::new(m.mtime(), m.mtime_nsec()),
        UtimensatFlags::NoFollowSymlink,
    )
    .map_err(|e| mnt("set times of", to)(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A removal keeps a tree with a mount anywhere in it (a directory or a file bind, at any
    /// depth), names the outermost mounts, follows no symlink out of it, and removes the tree
    /// once they are gone; the walk and mountinfo agree. `release` unmounts what is staged.
    #[test]
    fn removal_never_enters_a_mount() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipping: mounting needs root");
            return;
        }
        let t = tempfile::tempdir().expect("tempdir");
        if statx_mount_root(t.path()).expect("statx").is_none() {
            eprintln!("skipping: this kernel does not report mount roots (Linux 5.8+)");
            return;
        }
        let d = std::fs::canonicalize(t.path()).expect("canonical tempdir");
        let bundle = d.join("bundle");
        let (shm, pin) = (bundle.join("a/b/shm"), bundle.join("a/pin"));
        std::fs::create_dir_all(&shm).expect("dirs");
        std::fs::write(&pin, "").expect("file");
        let host = d.join("host");
        std::fs::create_dir(&host).expect("host dir");
        std::fs::write(host.join("file"), "host's").expect("file");
        let mounted = d.join("mounted");
        std::fs::create_dir(&mounted).expect("dir");
        let tmpfs = |at: &Path| {
            mount(Some("t"), at, Some("tmpfs"), MsFlags::empty(), None::<&str>).expect("tmpfs")
        };
        tmpfs(&mounted);
        let _mounted = Unmount(mounted.clone());
        // Symlinks to a host dir and to a mount: neither is followed.
        std::os::unix::fs::symlink(&host, bundle.join("to-host")).expect("symlink");
        std::os::unix::fs::symlink(&mounted, bundle.join("to-mount")).expect("symlink");
        tmpfs(&shm);
        let shm_mounted = Unmount(shm.clone());
        std::fs::create_dir(shm.join("inner")).expect("dir in the tmpfs");
        tmpfs(&shm.join("inner"));
        let _inner = Unmount(shm.join("inner"));
        mount(
            Some(&host.join("file")),
            &pin,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .expect("bind");
        let pin_mounted = Unmount(pin.clone());

        let mut walked = mount_points(&bundle).expect("walk");
        walked.sort();
        assert_eq!(
            walked,
            vec![shm.clone(), pin.clone()],
            "outermost mounts only"
        );
        let mut all = mounts_under(&bundle).expect("mountinfo");
        all.sort();
        assert_eq!(all, vec![shm.clone(), shm.join("inner"), pin.clone()]);
        assert_eq!(
            mount_points(&shm).expect("walk"),
            vec![shm.clone()],
            "a mount root itself"
        );

        let left = remove_unless_mounted(&bundle).expect("removal");
        assert_eq!(left.len(), 2, "{left:?}");
        assert!(
            pin.exists() && shm.join("inner").exists(),
            "nothing was removed"
        );
        drop(pin_mounted);
        assert_eq!(
            remove_unless_mounted(&bundle).expect("removal"),
            vec![shm.clone()]
        );
        drop(shm_mounted);
        assert!(remove_unless_mounted(&bundle).expect("removal").is_empty());
        assert!(!bundle.exists(), "removed once nothing is mounted");
        assert!(remove_unless_mounted(&bundle).expect("absent").is_empty());
        assert_eq!(
            std::fs::read_to_string(host.join("file")).expect("host file"),
            "host's"
        );
        assert!(
            mounted.is_dir() && is_mount_root(&mounted),
            "the mount the link named"
        );

        // What `release` finds staged in a bundle is unmounted, then the staging dir goes.
        let staged = mounts_dir(&bundle);
        std::fs::create_dir_all(staged.join("image-0")).expect("staging dir");
        tmpfs(&staged.join("image-0"));
        let _staged = Unmount(staged.join("image-0"));
        std::fs::create_dir(staged.join("image-0/sub")).expect("dir");
        tmpfs(&staged.join("image-0/sub"));
        release(&bundle).expect("release");
        assert!(!staged.exists(), "staged mounts released and removed");
        assert!(mounts_under(&bundle).expect("mountinfo").is_empty());
    }

    fn is_mount_root(p: &Path) -> bool {
        statx_mount_root(p)
            .ok()
            .flatten()
            .is_some_and(|(root, _)| root)
    }

    /// Detaches its mount (and what is mounted under it) when dropped.
    struct Unmount(PathBuf);

    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = umount2(&self.0, MntFlags::MNT_DETACH);
        }
    }

    #[test]
    fn resolves_inside_the_root() {
        let d = tempfile::tempdir().expect("tempdir");
        let root = d.path();
        std::fs::create_dir_all(root.join("a/b")).expect("dirs");
        std::os::unix::fs::symlink("/a", root.join("abs")).expect("link");
        std::os::unix::fs::symlink("../../..", root.join("a/up")).expect("link");
        std::os::unix::fs::symlink("loop", root.join("loop")).expect("link");
        let r = |p: &str| resolve_in_root(root, p).expect("resolve");
        assert_eq!(r("a/b"), root.join("a/b"));
        assert_eq!(r("/abs/b"), root.join("a/b"), "absolute links stay inside");
        assert_eq!(r("a/up/etc"), root.join("etc"), "`..` stops at the root");
        assert_eq!(r("../../x"), root.join("x"));
        assert_eq!(r("a/missing/c"), root.join("a/missing/c"));
        assert!(resolve_in_root(root, "loop").is_err());
    }

    #[test]
    fn declared_volume_copies_the_image_content() {
        let d = tempfile::tempdir().expect("tempdir");
        let rootfs = d.path().join("rootfs");
        let data = rootfs.join("data");
        std::fs::create_dir_all(data.join("sub")).expect("dirs");
        std::fs::write(data.join("file"), "content").expect("file");
        std::fs::set_permissions(data.join("file"), std::fs::Permissions::from_mode(0o640))
            .expect("chmod");
        std::fs::hard_link(data.join("file"), data.join("hard")).expect("hardlink");
        std::os::unix::fs::symlink("file", data.join("link")).expect("symlink");
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o750)).expect("chmod");
        // An absolute symlink in the image resolves inside the rootfs, not on the host.
        std::os::unix::fs::symlink("/data", rootfs.join("alias")).expect("symlink");

        let vol = d.path().join("volumes/0");
        declared_volume(&rootfs, "/alias", &vol).expect("volume");
        assert_eq!(
            std::fs::read_to_string(vol.join("file")).expect("file"),
            "content"
        );
        let mode = |p: &Path| std::fs::symlink_metadata(p).expect("meta").mode() & 0o7777;
        assert_eq!(mode(&vol.join("file")), 0o640);
        assert_eq!(mode(&vol), 0o750);
        assert!(vol.join("sub").is_dir());
        assert_eq!(
            std::fs::read_link(vol.join("link")).expect("link"),
            Path::new("file")
        );
        let ino = |p: &Path| std::fs::metadata(p).expect("meta").ino();
        assert_eq!(ino(&vol.join("file")), ino(&vol.join("hard")));

        // Absent in the image: an empty dir. A file: refused.
        let vol = d.path().join("volumes/1");
        declared_volume(&rootfs, "/nothing/here", &vol).expect("volume");
        assert!(vol.is_dir());
        let e = declared_volume(&rootfs, "/data/file", &d.path().join("volumes/2"))
            .expect_err("a file");
        assert!(matches!(e, VolumeError::Invalid(_)), "{e}");
    }
}
