//! The pod init: berth's own tiny PID 1 for pods whose containers share one PID namespace
//! (`NamespaceOption.pid = POD`). No pause image: berthd re-executes itself in
//! `--pod-init` mode inside the pod's network/IPC/UTS namespaces with a new PID namespace;
//! that process forks the init (PID 1 there), reports its host pid through a file and exits.
//! The init reaps every orphan and exits on SIGTERM/SIGINT; it is detached (own session), so
//! it outlives berthd. Killing it kills every process of the pod's PID namespace.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::sched::{CloneFlags, setns, unshare};
use nix::sys::signal::{SigSet, Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid, fork, setsid};

/// The command-line flag that selects init mode in `berthd`.
pub const POD_INIT_FLAG: &str = "--pod-init";

/// A running pod init, identified by pid and start time (so a reused pid is never mistaken
/// for it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct InitProcess {
    pub pid: i32,
    pub start_time: u64,
}

/// Starts the pod init inside the given pinned namespaces. Returns it once it runs.
pub fn spawn(
    pid_file: &Path,
    namespaces: &[(PathBuf, CloneFlags)],
) -> std::io::Result<InitProcess> {
    let files: Vec<(File, CloneFlags)> = namespaces
        .iter()
        .map(|(p, k)| File::open(p).map(|f| (f, *k)))
        .collect::<std::io::Result<_>>()?;
    let _ = std::fs::remove_file(pid_file);
    let mut cmd = Command::new("/proc/self/exe");
    cmd.arg0("berth-pod-init")
        .arg(POD_INIT_FLAG)
        .arg(pid_file)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .env_clear();
    // SAFETY: the closure only makes async-signal-safe system calls (setns, setsid, unshare)
    // between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            for (f, kind) in &files {
                setns(f, *kind).map_err(std::io::Error::from)?;
            }
            setsid().map_err(std::io::Error::from)?;
            unshare(CloneFlags::CLONE_NEWPID).map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    let status = cmd.status()?;
    if !status.success() {
        return Err(std::io::Error::other(format!(
            "pod init launcher exited with {status}"
        )));
    }
    let text = std::fs::read_to_string(pid_file)?;
    let pid: i32 = text
        .trim()
        .parse()
        .map_err(|_| std::io::Error::other(format!("bad pid file content {text:?}")))?;
    let start_time = start_time(pid)
        .ok_or_else(|| std::io::Error::other(format!("pod init {pid} exited at once")))?;
    Ok(InitProcess { pid, start_time })
}

/// The start time (clock ticks since boot) of a live process, from `/proc/PID/stat`;
/// `None` when it does not exist or is a zombie.
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which may hold spaces) start after the last ')'.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let mut fields = rest.split(' ');
    if matches!(fields.next(), Some("Z") | Some("X")) {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

/// The pod init named by a pid file, if that process is alive and is this pod's init (its
/// command line names the pid file).
pub fn from_pid_file(pid_file: &Path) -> Option<InitProcess> {
    let pid: i32 = std::fs::read_to_string(pid_file)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let needle = pid_file.as_os_str().as_encoded_bytes();
    if !cmdline.windows(needle.len()).any(|w| w == needle) {
        return None;
    }
    Some(InitProcess {
        pid,
        start_time: start_time(pid)?,
    })
}

impl InitProcess {
    /// Whether this very process still runs.
    pub fn alive(&self) -> bool {
        start_time(self.pid) == Some(self.start_time)
    }

    /// Kills it (and so its whole PID namespace) and waits up to 2 s for it to go: woken by
    /// its exit through a pidfd (opened before the kill, after checking it is this very
    /// process, so a reused pid is never signalled); by polling where pidfds are missing.
    pub fn kill(&self) {
        if !self.alive() {
            return;
        }
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, self.pid, 0) };
        if fd >= 0 {
            // SAFETY: the kernel just returned this fd; nothing else owns it.
            let fd =
                unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
            if self.alive() {
                use std::os::fd::AsRawFd;
                // SAFETY: pidfd_send_signal on our pidfd, no siginfo, no flags.
                unsafe {
                    libc::syscall(
                        libc::SYS_pidfd_send_signal,
                        fd.as_raw_fd(),
                        libc::SIGKILL,
                        std::ptr::null::<libc::siginfo_t>(),
                        0,
                    )
                };
                let mut pfd = libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd; readable once the process exited.
                unsafe { libc::poll(&mut pfd, 1, 2000) };
                // It may be our child (spawned by this berthd): reap it.
                let _ = waitpid(Pid::from_raw(self.pid), Some(WaitPidFlag::WNOHANG));
            }
            if !self.alive() {
                return;
            }
        }
        let _ = kill(Pid::from_raw(self.pid), Signal::SIGKILL);
        for _ in 0..200 {
            if !self.alive() {
                return;
            }
            // It may be our child (spawned by this berthd): reap it.
            let _ = waitpid(Pid::from_raw(self.pid), Some(WaitPidFlag::WNOHANG));
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        tracing::warn!(pid = self.pid, "pod init did not exit after SIGKILL");
    }
}

/// `berthd --pod-init PIDFILE`: runs in the new PID namespace's parent; forks the init, writes
/// its pid and returns the exit code for the launcher.
pub fn launcher_main(pid_file: &Path) -> i32 {
    // SAFETY: this process is single-threaded here (no runtime started yet).
    match unsafe { fork() } {
        Ok(ForkResult::Parent { child }) => {
            let tmp = pid_file.with_extension("tmp");
            let ok = std::fs::write(&tmp, child.as_raw().to_string())
                .and_then(|()| std::fs::rename(&tmp, pid_file));
            if ok.is_err() {
                let _ = kill(child, Signal::SIGKILL);
                return 1;
            }
            0
        }
        Ok(ForkResult::Child) => init_main(),
        Err(_) => 1,
    }
}

/// PID 1 of the pod: reaps children, exits on SIGTERM or SIGINT.
fn init_main() -> ! {
    let _ = nix::sys::prctl::set_name(c"berth-pod-init");
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
    ] {
        set.add(s);
    }
    if set.thread_block().is_err() {
        std::process::exit(1);
    }
    loop {
        match set.wait() {
            Ok(Signal::SIGCHLD) => loop {
                match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::StillAlive) | Err(_) => break,
                    Ok(_) => continue,
                }
            },
            Ok(Signal::SIGTERM) | Ok(Signal::SIGINT) => std::process::exit(0),
            _ => {}
        }
    }
}
