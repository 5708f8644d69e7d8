//! Namespace work on dedicated OS threads: never `setns`/`unshare` on a tokio worker.
//!
//! [`run_in_netns`] runs a closure on a fresh thread that has joined a pinned network
//! namespace (a netlink socket opened there talks to that namespace); [`create_pinned`]
//! makes new network/IPC/UTS namespaces and pins them by bind mounts so they outlive any
//! process, like `ip netns add`. The threads end with the work, so no thread of berthd is
//! ever left in another namespace.

use std::fs::File;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, setns, unshare};

/// Errors of namespace work.
#[derive(Debug, thiserror::Error)]
pub enum NsError {
    #[error("{what} {path}: {source}")]
    Sys {
        what: &'static str,
        path: PathBuf,
        source: nix::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("namespace thread panicked")]
    ThreadPanicked,
}

/// Which namespaces a pod gets of its own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NewNamespaces {
    pub net: bool,
    pub ipc: bool,
    pub uts: bool,
}

/// Runs `f` on a new OS thread that joined the network namespace pinned at `netns`, and
/// returns its result. Async work inside `f` needs its own (current-thread) runtime.
pub async fn run_in_netns<T, F>(netns: &Path, f: F) -> Result<T, NsError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    run_in_namespaces(&[(netns.to_path_buf(), CloneFlags::CLONE_NEWNET)], f).await
}

/// Runs `f` on a new OS thread that joined each of the given pinned namespaces (network,
/// IPC, UTS: the kinds a single thread may join).
pub async fn run_in_namespaces<T, F>(
    namespaces: &[(PathBuf, CloneFlags)],
    f: F,
) -> Result<T, NsError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let namespaces = namespaces.to_vec();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("berth-ns".to_string())
        .spawn(move || {
            let result = (|| {
                for (path, kind) in &namespaces {
                    let file = File::open(path).map_err(|source| NsError::Io {
                        what: format!("open namespace {}", path.display()),
                        source,
                    })?;
                    setns(&file, *kind).map_err(|source| NsError::Sys {
                        what: "setns",
                        path: path.clone(),
                        source,
                    })?;
                }
                Ok(f())
            })();
            let _ = tx.send(result);
        })
        .map_err(|source| NsError::Io {
            what: "spawn namespace thread".to_string(),
            source,
        })?;
    rx.await.map_err(|_| NsError::ThreadPanicked)?
}

/// Creates the requested namespaces on a new thread, runs `setup` inside them (hostname,
/// sysctls...), and pins each at `dir/<net|ipc|uts>` with a bind mount. On any failure,
/// whatever was pinned is unpinned again.
pub async fn create_pinned<F, E>(dir: &Path, which: NewNamespaces, setup: F) -> Result<(), E>
where
    F: FnOnce() -> Result<(), E> + Send + 'static,
    E: From<NsError> + Send + 'static,
{
    let dir = dir.to_path_buf();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("berth-newns".to_string())
        .spawn(move || {
            let _ = tx.send(create_pinned_on_this_thread(&dir, which, setup));
        })
        .map_err(|source| {
            E::from(NsError::Io {
                what: "spawn namespace thread".to_string(),
                source,
            })
        })?;
    rx.await.map_err(|_| E::from(NsError::ThreadPanicked))?
}

fn create_pinned_on_this_thread<F, E>(dir: &Path, which: NewNamespaces, setup: F) -> Result<(), E>
where
    F: FnOnce() -> Result<(), E>,
    E: From<NsError>,
{
    let mut flags = CloneFlags::empty();
    let mut kinds = Vec::new();
    if which.net {
        flags |= CloneFlags::CLONE_NEWNET;
        kinds.push("net");
    }
    if which.ipc {
        flags |= CloneFlags::CLONE_NEWIPC;
        kinds.push("ipc");
    }
    if which.uts {
        flags |= CloneFlags::CLONE_NEWUTS;
        kinds.push("uts");
    }
    std::fs::create_dir_all(dir).map_err(|source| NsError::Io {
        what: format!("create {}", dir.display()),
        source,
    })?;
    if !flags.is_empty() {
        unshare(flags).map_err(|source| NsError::Sys {
            what: "unshare",
            path: dir.to_path_buf(),
            source,
        })?;
    }
    setup()?;
    let mut pinned: Vec<PathBuf> = Vec::new();
    for kind in kinds {
        let target = dir.join(kind);
        if let Err(e) = pin(kind, &target) {
            for p in &pinned {
                let _ = unpin(p);
            }
            return Err(e.into());
        }
        pinned.push(target);
    }
    Ok(())
}

/// Bind-mounts this thread's namespace of `kind` onto `target` (created as an empty file).
fn pin(kind: &str, target: &Path) -> Result<(), NsError> {
    File::create(target).map_err(|source| NsError::Io {
        what: format!("create {}", target.display()),
        source,
    })?;
    let src = PathBuf::from(format!("/proc/thread-self/ns/{kind}"));
    mount(
        Some(&src),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|source| {
        let _ = std::fs::remove_file(target);
        NsError::Sys {
            what: "bind-mount namespace",
            path: target.to_path_buf(),
            source,
        }
    })
}

/// Unmounts and removes a pinned namespace file. Absent is fine.
pub fn unpin(target: &Path) -> Result<(), NsError> {
    match umount2(target, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => {}
        Err(source) => {
            return Err(NsError::Sys {
                what: "unmount namespace",
                path: target.to_path_buf(),
                source,
            });
        }
    }
    match std::fs::remove_file(target) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(NsError::Io {
            what: format!("remove {}", target.display()),
            source,
        }),
    }
}

/// Whether `path` is a pinned namespace (an nsfs bind mount).
pub fn is_pinned(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type() == nix::sys::statfs::NSFS_MAGIC)
        .unwrap_or(false)
}

/// Brings `lo` up in the calling thread's network namespace (a new netns has it down; the
/// CNI backend's plugins do not touch it).
pub fn loopback_up() -> Result<(), NsError> {
    let fail = |what: &'static str| NsError::Sys {
        what,
        path: PathBuf::from("lo"),
        source: nix::Error::last(),
    };
    // SAFETY: a plain datagram socket and the SIOCGIFFLAGS/SIOCSIFFLAGS ioctls on a zeroed,
    // NUL-terminated ifreq; the fd is closed before returning.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(fail("socket"));
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo\0".iter().enumerate() {
            req.ifr_name[i] = *b as libc::c_char;
        }
        let result = if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) < 0 {
            Err(fail("SIOCGIFFLAGS"))
        } else {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            if libc::ioctl(fd, libc::SIOCSIFFLAGS, &req) < 0 {
                Err(fail("SIOCSIFFLAGS"))
            } else {
                Ok(())
            }
        };
        libc::close(fd);
        result
    }
}
