//! berth-monitor: one small process per pod that owns its containers' stdio, so that the
//! containers outlive berthd.
//!
//! berthd starts it per pod ([`client::ensure_monitor`]); it daemonizes (double fork and
//! `setsid`, stdio on `/dev/null`), holds a lock on its pid file, listens on a unix socket in
//! its directory and becomes the child subreaper of everything it starts. It runs the OCI
//! runtime's `create` with its own pipes as the container's stdio, writes the output to the
//! CRI log file, reaps the container's init process and records its exit (code, signal, time,
//! OOM) in the container's exit file. The protocol is in [`proto`] and `proto/monitor.md`.
//!
//! - [`server`]: the monitor itself (single-threaded `poll(2)` loop, no async runtime);
//! - [`client`]: berthd's side (tokio);
//! - [`launch`]: monitors that RunPodSandbox starts ahead of the pod's first container;
//! - [`log`]: the CRI log format;
//! - [`proto`]: the requests and responses.
//!
//! The monitor's directory holds [`SOCKET_NAME`], [`PID_FILE`] (locked while the monitor
//! lives) and [`LOG_NAME`] (the monitor's own diagnostics).

pub mod attach;
pub mod client;
pub mod launch;
pub mod log;
pub mod proto;
pub mod server;

use std::fs::File;
use std::path::{Path, PathBuf};

pub use client::{MonitorClient, MonitorError, ensure_monitor};
pub use launch::Launches;
pub use proto::{ContainerState, CreateRequest, ExitInfo};

/// The monitor's socket, in its directory.
pub const SOCKET_NAME: &str = "monitor.sock";
/// The monitor's pid file, in its directory; the monitor holds an exclusive `flock` on it.
pub const PID_FILE: &str = "monitor.pid";
/// The monitor's own diagnostics (lifecycle and errors), in its directory.
pub const LOG_NAME: &str = "monitor.log";

/// The `berth-monitor` binary next to the running executable (berthd's layout).
pub fn default_monitor_path() -> PathBuf {
    std::env::current_exe()
        .map(|p| p.with_file_name("berth-monitor"))
        .unwrap_or_else(|_| PathBuf::from("berth-monitor"))
}

/// The pid of the monitor of `dir` when one is alive (its pid file is locked).
pub fn running_pid(dir: &Path) -> Option<i32> {
    let file = File::open(dir.join(PID_FILE)).ok()?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockSharedNonblock) {
        // Nobody holds it: no monitor (the lock is released when we drop it).
        Ok(_) => None,
        Err((_, _)) => {
            let text = std::fs::read_to_string(dir.join(PID_FILE)).ok()?;
            text.trim().parse().ok()
        }
    }
}

/// The longest path a unix socket address holds (`sun_path` without its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// A path for `socket` usable in a unix socket address: the path itself when short enough,
/// else `/proc/<pid>/fd/<fd of its dir>/<name>` through `dir_fd` (which must stay open
/// while the path is used).
pub(crate) fn socket_address(socket: &Path, dir_fd: Option<&File>, pid: &str) -> PathBuf {
    use std::os::fd::AsRawFd;
    if socket.as_os_str().len() <= MAX_SOCKET_PATH {
        return socket.to_path_buf();
    }
    match (dir_fd, socket.file_name()) {
        (Some(dir), Some(name)) => {
            PathBuf::from(format!("/proc/{pid}/fd/{}", dir.as_raw_fd())).join(name)
        }
        _ => socket.to_path_buf(),
    }
}

/// Opens a directory for [`socket_address`] when `socket` is too long for an address.
pub(crate) fn open_dir_for(socket: &Path) -> std::io::Result<Option<File>> {
    if socket.as_os_str().len() <= MAX_SOCKET_PATH {
        return Ok(None);
    }
    let dir = socket.parent().unwrap_or(Path::new("/"));
    Ok(Some(File::open(dir)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_socket_paths_go_through_proc() {
        let dir = tempfile::tempdir().unwrap();
        let short = dir.path().join(SOCKET_NAME);
        assert_eq!(socket_address(&short, None, "self"), short);
        let long = dir.path().join("x".repeat(120)).join(SOCKET_NAME);
        std::fs::create_dir_all(long.parent().unwrap()).unwrap();
        let f = open_dir_for(&long).unwrap().unwrap();
        let addr = socket_address(&long, Some(&f), "self");
        assert!(addr.as_os_str().len() < 40, "{addr:?}");
        let l = std::os::unix::net::UnixListener::bind(&addr).unwrap();
        assert!(long.exists());
        std::os::unix::net::UnixStream::connect(&addr).unwrap();
        drop(l);
    }

    #[test]
    fn no_monitor_without_lock() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(running_pid(dir.path()), None);
        std::fs::write(dir.path().join(PID_FILE), "1\n").unwrap();
        assert_eq!(running_pid(dir.path()), None);
        let f = File::open(dir.path().join(PID_FILE)).unwrap();
        let _held = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| e)
            .unwrap();
        assert_eq!(running_pid(dir.path()), Some(1));
    }
}
