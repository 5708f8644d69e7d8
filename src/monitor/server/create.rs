//! Creating containers from the monitor: the OCI runtime's `create` with the monitor's pipes
//! (or a console socket for terminals) as the container's stdio, and its answer to berthd.

use std::os::unix::process::CommandExt as _;

use nix::fcntl::FdFlag;
use nix::sys::memfd::{MFdFlags, memfd_create};

use super::conns::{push_response, receive_fd};
use super::exits::parent_of;
use super::io::{output, pipe};
use super::*;

impl Monitor {
    pub(super) fn create(&mut self, conn: u64, req: CreateRequest) -> Option<Response> {
        if self.shutting_down {
            return Some(Response::error(
                ErrorKind::ShuttingDown,
                "monitor is shutting down",
            ));
        }
        if req.id.is_empty() || req.id.contains('/') {
            return Some(Response::error(
                ErrorKind::BadRequest,
                format!("bad container id {:?}", req.id),
            ));
        }
        if self.containers.iter().any(|c| c.id == req.id) {
            return Some(Response::error(
                ErrorKind::AlreadyExists,
                format!("container {} exists", req.id),
            ));
        }
        match self.spawn_create(&req) {
            Ok(Spawned {
                runtime_pid,
                container,
                console,
                runtime_log,
            }) => {
                self.diag(&format!(
                    "container {}: {} create (pid {runtime_pid})",
                    req.id,
                    req.runtime.display()
                ));
                self.containers.push(container);
                let deadline = (req.timeout_ms > 0)
                    .then(|| Instant::now() + Duration::from_millis(req.timeout_ms));
                self.creates.push(PendingCreate {
                    runtime_pid,
                    conn,
                    id: req.id.clone(),
                    req,
                    console,
                    runtime_log,
                    deadline,
                    killed: None,
                    forget_conns: Vec::new(),
                });
                None
            }
            Err(resp) => Some(resp),
        }
    }

    pub(super) fn spawn_create(&mut self, req: &CreateRequest) -> Result<Spawned, Response> {
        let io_err = |what: &str, e: &dyn std::fmt::Display| {
            Response::error(ErrorKind::Io, format!("{what}: {e}"))
        };
        let log = CriLog::open(&req.log_path)
            .map_err(|e| io_err(&format!("opening {}", req.log_path.display()), &e))?;
        let pid_file = req.bundle.join("init.pid");
        for f in [&pid_file, &req.exit_file] {
            match std::fs::remove_file(f) {
                Ok(()) => {}
                Err(e) if e.kind() == IoErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&format!("removing {}", f.display()), &e)),
            }
        }
        // The runtime logs into memory, not a file: a memfd that it opens by its /proc link
        // (inherited at that number, so also by its hooks and by its init until `start`; the
        // container's process does not get it: runc and crun close such fds before the
        // exec). Read for its errors once it ended; nothing reaches the disk (runc writes its
        // log O_SYNC).
        let runtime_log = runtime_log_memfd().map_err(|e| io_err("memfd_create", &e))?;
        let mut cmd = Command::new(&req.runtime);
        cmd.arg("--root")
            .arg(&req.runtime_root)
            .arg("--log")
            .arg(format!("/proc/self/fd/{}", runtime_log.as_raw_fd()))
            .arg("--log-format")
            .arg("json");
        if req.systemd_cgroup {
            cmd.arg("--systemd-cgroup");
        }
        cmd.arg("create")
            .arg("--bundle")
            .arg(&req.bundle)
            .arg("--pid-file")
            .arg(&pid_file);
        let mut outputs = Vec::new();
        let mut stdin = None;
        let mut console = None;
        if req.tty {
            self.console_seq += 1;
            let path = self.dir.join(format!("console-{}.sock", self.console_seq));
            let _ = std::fs::remove_file(&path);
            let addr = socket_address(
                &path,
                self._dir_fd.as_ref(),
                &std::process::id().to_string(),
            );
            let listener = UnixListener::bind(&addr)
                .map_err(|e| io_err(&format!("binding {}", path.display()), &e))?;
            listener
                .set_nonblocking(true)
                .map_err(|e| io_err("console socket", &e))?;
            cmd.arg("--console-socket").arg(&addr);
            cmd.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            console = Some(Console {
                listener,
                path,
                master: None,
            });
        } else {
            let (out_r, out_w) = pipe().map_err(|e| io_err("pipe", &e))?;
            let (err_r, err_w) = pipe().map_err(|e| io_err("pipe", &e))?;
            outputs.push(output(out_r, Stream::Stdout).map_err(|e| io_err("pipe", &e))?);
            outputs.push(output(err_r, Stream::Stderr).map_err(|e| io_err("pipe", &e))?);
            cmd.stdout(Stdio::from(out_w)).stderr(Stdio::from(err_w));
            if req.stdin {
                let (in_r, in_w) = pipe().map_err(|e| io_err("pipe", &e))?;
                stdin = Some(File::from(in_w));
                cmd.stdin(Stdio::from(in_r));
            } else {
                cmd.stdin(Stdio::null());
            }
        }
        cmd.arg(&req.id);
        // A process group of its own, which it leads: a runtime that hangs is killed with
        // every process it started (see `kill_create`). The container's init is not in it
        // (runc and crun start it in a session of its own).
        cmd.process_group(0);
        // std resets the signal mask and dispositions of the child before exec, so the
        // runtime does not inherit our blocked SIGCHLD/SIGTERM.
        let child = cmd.spawn().map_err(|e| {
            Response::error(
                ErrorKind::Runtime,
                format!("running {}: {e}", req.runtime.display()),
            )
        })?;
        // Our copies of the child's ends of the pipes close here.
        drop(cmd);
        // Inherited by this runtime only: no later child gets it (single-threaded, so no
        // other spawn came in between). Not an error when it fails: the runtime runs already
        // (and must be tracked), and a later child holding a memfd is harmless.
        if let Err(e) = fcntl(&runtime_log, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)) {
            self.diag(&format!("container {}: runtime log fd: {e}", req.id));
        }
        let container = Container {
            id: req.id.clone(),
            pid: 0,
            outputs,
            stdin,
            log,
            exit_file: req.exit_file.clone(),
            oom_files: req.cgroup_oom_files.clone(),
            stdin_buf: Vec::new(),
            reaped: None,
            exited: None,
        };
        Ok(Spawned {
            runtime_pid: child.id() as i32,
            container,
            console,
            runtime_log: File::from(runtime_log),
        })
    }

    pub(super) fn accept_console(&mut self, i: usize) {
        let Some(c) = self.creates.get_mut(i).and_then(|p| p.console.as_mut()) else {
            return;
        };
        if c.master.is_some() {
            return;
        }
        let stream = match c.listener.accept() {
            Ok((s, _)) => s,
            Err(_) => return,
        };
        match receive_fd(&stream) {
            Ok(fd) => c.master = Some(File::from(fd)),
            Err(e) => {
                let msg = format!("console socket: {e}");
                self.diag(&msg);
            }
        }
    }

    pub(super) fn complete_create(&mut self, mut p: PendingCreate, status: WaitStatus) {
        if let Some(c) = p.console.as_mut() {
            // The runtime may have sent the terminal just before it exited.
            if c.master.is_none()
                && let Ok((s, _)) = c.listener.accept()
                && let Ok(fd) = receive_fd(&s)
            {
                c.master = Some(File::from(fd));
            }
            let _ = std::fs::remove_file(&c.path);
        }
        let result = match p.killed {
            Some(Killed::Timeout) => Err((
                ErrorKind::Timeout,
                format!(
                    "{} create timed out after {}; it was killed with every process it started",
                    p.req.runtime.display(),
                    humantime::format_duration(Duration::from_millis(p.req.timeout_ms))
                ),
            )),
            Some(Killed::Forgotten) => Err((
                ErrorKind::NotFound,
                format!(
                    "container {} was forgotten while it was being created",
                    p.id
                ),
            )),
            None => self
                .created(&mut p, status)
                .map_err(|m| (ErrorKind::Runtime, m)),
        };
        let resp = match result {
            Ok(pid) => {
                self.diag(&format!("container {} created, pid {pid}", p.id));
                Response::Created { pid }
            }
            Err((kind, message)) => {
                self.diag(&format!("container {}: {message}", p.id));
                self.containers.retain(|c| c.id != p.id);
                Response::error(kind, message)
            }
        };
        if let Some(conn) = self.conns.iter_mut().find(|c| c.id == p.conn) {
            conn.busy = false;
            push_response(conn, &resp);
        }
        for id in p.forget_conns {
            if let Some(conn) = self.conns.iter_mut().find(|c| c.id == id) {
                conn.busy = false;
                push_response(conn, &Response::Ok);
            }
        }
    }

    /// Kills the creates whose time is up (answered once they are reaped).
    pub(super) fn expire_creates(&mut self) {
        let now = Instant::now();
        let expired: Vec<usize> = (0..self.creates.len())
            .filter(|&k| {
                let p = &self.creates[k];
                p.killed.is_none() && p.deadline.is_some_and(|d| d <= now)
            })
            .collect();
        for k in expired {
            self.kill_create(k, Killed::Timeout);
        }
    }

    /// SIGKILLs a pending create's process group (the runtime and whatever it started).
    pub(super) fn kill_create(&mut self, k: usize, why: Killed) {
        let Some(p) = self.creates.get_mut(k) else {
            return;
        };
        if p.killed.is_some() {
            return;
        }
        p.killed = Some(why);
        let (id, pid) = (p.id.clone(), p.runtime_pid);
        let r = nix::sys::signal::killpg(Pid::from_raw(pid), Signal::SIGKILL);
        self.diag(&format!(
            "container {id}: killing the runtime's create (pid {pid}, {why:?}): {r:?}"
        ));
    }

    /// The init pid after a create ended, or the error message.
    pub(super) fn created(
        &mut self,
        p: &mut PendingCreate,
        status: WaitStatus,
    ) -> Result<i32, String> {
        let runtime = p.req.runtime.display().to_string();
        if !matches!(status, WaitStatus::Exited(_, 0)) {
            let log = log_tail(&p.runtime_log, 16384);
            let log = String::from_utf8_lossy(&log);
            // The runtime's errors alone (its warnings are noise to a user).
            let said = crate::runtime::log::errors(&log);
            if !said.is_empty() {
                return Err(said);
            }
            let how = match status {
                WaitStatus::Exited(_, code) => format!("exit status {code}"),
                WaitStatus::Signaled(_, sig, _) => format!("killed by {sig}"),
                _ => "ended".to_string(),
            };
            return Err(format!(
                "{runtime} create failed ({how}) and logged nothing"
            ));
        }
        let pid_file = p.req.bundle.join("init.pid");
        let text = std::fs::read_to_string(&pid_file)
            .map_err(|e| format!("{runtime} create: reading {}: {e}", pid_file.display()))?;
        let pid: i32 = text
            .trim()
            .parse()
            .ok()
            .filter(|&pid| pid > 0)
            .ok_or_else(|| format!("{runtime} create: bad pid file content {text:?}"))?;
        let Some(c) = self.containers.iter_mut().find(|c| c.id == p.id) else {
            return Err(format!(
                "container {} was forgotten during its create",
                p.id
            ));
        };
        if let Some(console) = p.console.as_mut() {
            let Some(master) = console.master.take() else {
                return Err(format!(
                    "{runtime} create did not send the container's terminal"
                ));
            };
            if p.req.stdin {
                c.stdin = Some(master.try_clone().map_err(|e| format!("dup: {e}"))?);
            }
            c.outputs
                .push(output(master.into(), Stream::Stdout).map_err(|e| format!("terminal: {e}"))?);
        }
        c.pid = pid;
        // Its init may have been reaped already (killed right after the create).
        if let Some(k) = self.orphan_exits.iter().position(|o| o.0 == pid) {
            // A stale entry (of an earlier process with the same pid) is told apart by the
            // pid being our child now (alive, or a zombie the next SIGCHLD reaps).
            let ours = parent_of(pid) == Some(std::process::id() as i32);
            if let Some((_, st, at)) = self.orphan_exits.remove(k)
                && !ours
            {
                c.reaped = Some((st, at, Instant::now() + DRAIN_TIMEOUT));
            }
        }
        Ok(pid)
    }

    // ---- connections ----
}

/// A create's runtime, just started.
pub(super) struct Spawned {
    runtime_pid: i32,
    container: Container,
    console: Option<Console>,
    runtime_log: File,
}

/// A memfd for a runtime's log, not executable: sealed so where the kernel knows how
/// (6.3+, and required by `vm.memfd_noexec = 2`), plain on older kernels.
fn runtime_log_memfd() -> nix::Result<OwnedFd> {
    let noexec = MFdFlags::from_bits_retain(libc::MFD_NOEXEC_SEAL);
    match memfd_create(c"runtime-log", noexec) {
        Err(nix::Error::EINVAL) => memfd_create(c"runtime-log", MFdFlags::empty()),
        r => r,
    }
}

/// The last `max` bytes written to `log` (empty when unreadable).
fn log_tail(log: &File, max: u64) -> Vec<u8> {
    use std::os::unix::fs::FileExt as _;
    let len = log.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(max);
    let mut buf = vec![0; (len - start) as usize];
    match log.read_exact_at(&mut buf, start) {
        Ok(()) => buf,
        Err(_) => Vec::new(),
    }
}
