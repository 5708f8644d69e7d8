//! The monitor process: daemonizing, and its single-threaded `poll(2)` event loop.
//!
//! Nothing here uses an async runtime or threads: the process forks before anything else,
//! and every fd it owns is watched by one `poll` call (the listening socket, connections
//! from berthd, a signalfd for SIGCHLD/SIGTERM/SIGINT, the containers' output pipes or
//! terminals, and the console sockets of terminal containers being created).

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind as IoErrorKind, IoSliceMut, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, Flock, FlockArg, OFlag, fcntl};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, sigprocmask};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid, fork, pipe2, setsid};

use super::attach;
use super::log::{CriLog, LineSplitter, Stream, Tag};
use super::proto::{
    ContainerState, CreateRequest, ErrorKind, ExitInfo, MAX_LINE, Request, Response,
};
use super::{LOG_NAME, PID_FILE, SOCKET_NAME, socket_address};

/// How long a container's output is still read after its init process was reaped (when
/// some other process keeps the pipes open) before the exit is recorded anyway.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// The most bytes read from one pipe per loop iteration (fairness between containers).
const READ_BUDGET: usize = 256 * 1024;
/// Reaped processes nobody claimed yet (a container init reaped before its create ended).
const MAX_ORPHAN_EXITS: usize = 256;
/// The monitor's own log is truncated at start when larger than this.
const MAX_DIAG_LOG: u64 = 1 << 20;

/// What the command line asks for.
#[derive(Debug, Clone)]
pub struct Options {
    /// The monitor's directory (socket, pid file, diagnostics).
    pub dir: PathBuf,
    /// The pod's id (for diagnostics and the process list).
    pub pod_id: String,
    /// Stay in the foreground (no double fork); for debugging.
    pub foreground: bool,
}

/// Runs berth-monitor; returns the exit code of the process that called it. Without
/// `foreground`, the calling process returns (0 once the daemon listens on its socket, or
/// when a monitor already runs for this directory) and the daemon runs on in the background.
///
/// Must be called before any thread or async runtime exists (it forks).
pub fn run(opts: &Options) -> i32 {
    close_inherited_fds();
    if let Err(e) = std::fs::create_dir_all(&opts.dir) {
        eprintln!("berth-monitor: creating {}: {e}", opts.dir.display());
        return 1;
    }
    if opts.foreground {
        return match Monitor::start(opts, None) {
            Ok(Some(mut m)) => m.run(),
            Ok(None) => 0,
            Err(e) => {
                eprintln!("berth-monitor: {e}");
                1
            }
        };
    }
    let (ready_r, ready_w) = match pipe2(OFlag::O_CLOEXEC) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("berth-monitor: pipe: {e}");
            return 1;
        }
    };
    // SAFETY: single-threaded at this point (called first thing in main).
    match unsafe { fork() } {
        Err(e) => {
            eprintln!("berth-monitor: fork: {e}");
            1
        }
        Ok(ForkResult::Parent { child }) => {
            drop(ready_w);
            // The intermediate process exits right after its own fork.
            let _ = waitpid(child, None);
            let mut msg = String::new();
            let _ = File::from(ready_r).read_to_string(&mut msg);
            if msg.starts_with("ok") {
                0
            } else {
                let msg = msg.trim();
                if msg.is_empty() {
                    eprintln!("berth-monitor: the daemon exited before it was ready");
                } else {
                    eprintln!("berth-monitor: {msg}");
                }
                1
            }
        }
        Ok(ForkResult::Child) => {
            drop(ready_r);
            let code = daemon_child(opts, ready_w);
            // SAFETY: _exit ends the forked process without running the parent's atexit.
            unsafe { libc::_exit(code) }
        }
    }
}

/// Closes every fd but stdio that the caller leaked into us (a daemon must not keep its
/// starter's pipes open).
fn close_inherited_fds() {
    // SAFETY: close_range on fds this process does not use (nothing is open yet).
    let r = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    if r == 0 {
        return;
    }
    let fds: Vec<RawFd> = match std::fs::read_dir("/proc/self/fd") {
        Ok(d) => d
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .filter(|&fd| fd > 2)
            .collect(),
        Err(_) => return,
    };
    for fd in fds {
        // SAFETY: as above; the read_dir fd is closed already (EBADF is harmless).
        unsafe { libc::close(fd) };
    }
}

/// The first child: new session, second fork, and the daemon itself in the grandchild.
fn daemon_child(opts: &Options, ready_w: OwnedFd) -> i32 {
    let mut ready = File::from(ready_w);
    if let Err(e) = setsid() {
        let _ = writeln!(ready, "setsid: {e}");
        return 1;
    }
    // SAFETY: still single-threaded.
    match unsafe { fork() } {
        Err(e) => {
            let _ = writeln!(ready, "fork: {e}");
            1
        }
        Ok(ForkResult::Parent { .. }) => 0,
        Ok(ForkResult::Child) => {
            if let Err(e) = detach_stdio() {
                let _ = writeln!(ready, "detaching stdio: {e}");
                return 1;
            }
            match Monitor::start(opts, Some(ready)) {
                Ok(Some(mut m)) => m.run(),
                Ok(None) => 0,
                Err(_) => 1,
            }
        }
    }
}

/// umask 022, cwd `/`, stdio on `/dev/null`.
fn detach_stdio() -> std::io::Result<()> {
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    std::env::set_current_dir("/")?;
    let null = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    for fd in 0..3 {
        // SAFETY: dup2 onto the standard fds, which this process owns.
        if unsafe { libc::dup2(null.as_raw_fd(), fd) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// One of the container's output streams.
struct Output {
    /// `None` once closed (end of stream); dropped before the next poll.
    fd: Option<File>,
    stream: Stream,
    splitter: LineSplitter,
}

struct Container {
    id: String,
    /// The init process; 0 while the runtime's create runs.
    pid: i32,
    outputs: Vec<Output>,
    stdin: Option<File>,
    /// Attach input not yet written to `stdin` (its fd is non-blocking).
    stdin_buf: Vec<u8>,
    log: CriLog,
    exit_file: PathBuf,
    oom_files: Vec<PathBuf>,
    /// The init process was reaped: (status, finished_at, drain deadline).
    reaped: Option<(WaitStatus, i64, Instant)>,
    exited: Option<ExitInfo>,
}

/// A `<runtime> create` still running.
struct PendingCreate {
    runtime_pid: i32,
    conn: u64,
    id: String,
    req: CreateRequest,
    console: Option<Console>,
}

struct Console {
    listener: UnixListener,
    path: PathBuf,
    master: Option<File>,
}

struct Conn {
    id: u64,
    stream: UnixStream,
    inbuf: Vec<u8>,
    outbuf: Vec<u8>,
    /// Waiting for a create: no further request is read until it is answered.
    busy: bool,
    /// The peer closed its side (answers still pending are dropped).
    eof: bool,
    dead: bool,
    /// An attach stream of this container: frames, not lines (see [`attach`]).
    attached: Option<String>,
    /// [`attach::OUT_END`] was queued.
    attach_ended: bool,
}

#[derive(Clone, Copy)]
enum Token {
    Listener,
    Signals,
    Conn(usize),
    Output(usize, usize),
    Console(usize),
    Stdin(usize),
}

struct Monitor {
    dir: PathBuf,
    pod_id: String,
    socket: PathBuf,
    listener: UnixListener,
    signals: SignalFd,
    _pid_lock: Flock<File>,
    _dir_fd: Option<File>,
    diag: Option<File>,
    conns: Vec<Conn>,
    next_conn: u64,
    containers: Vec<Container>,
    creates: Vec<PendingCreate>,
    orphan_exits: VecDeque<(i32, WaitStatus, i64)>,
    shutting_down: bool,
    console_seq: u64,
    buf: Vec<u8>,
}

impl Monitor {
    /// Takes the pid file lock, listens, and reports readiness. `Ok(None)`: a monitor for
    /// this directory runs already.
    fn start(opts: &Options, mut ready: Option<File>) -> Result<Option<Monitor>, String> {
        let r = Monitor::setup(opts);
        let report = match &r {
            Ok(Some(_)) => "ok\n".to_string(),
            Ok(None) => "ok (already running)\n".to_string(),
            Err(e) => format!("{e}\n"),
        };
        if let Some(ready) = ready.as_mut() {
            let _ = ready.write_all(report.as_bytes());
        }
        drop(ready);
        r
    }

    fn setup(opts: &Options) -> Result<Option<Monitor>, String> {
        let dir = opts.dir.clone();
        let pid_path = dir.join(PID_FILE);
        let pid_file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(&pid_path)
            .map_err(|e| format!("opening {}: {e}", pid_path.display()))?;
        let mut pid_lock = match Flock::lock(pid_file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => l,
            Err((_, Errno::EWOULDBLOCK)) => return Ok(None),
            Err((_, e)) => return Err(format!("locking {}: {e}", pid_path.display())),
        };
        let me = std::process::id();
        pid_lock
            .set_len(0)
            .and_then(|_| pid_lock.write_all(format!("{me}\n").as_bytes()))
            .map_err(|e| format!("writing {}: {e}", pid_path.display()))?;

        nix::sys::prctl::set_child_subreaper(true)
            .map_err(|e| format!("PR_SET_CHILD_SUBREAPER: {e}"))?;
        let mut mask = SigSet::empty();
        for s in [Signal::SIGCHLD, Signal::SIGTERM, Signal::SIGINT] {
            mask.add(s);
        }
        sigprocmask(SigmaskHow::SIG_BLOCK, Some(&mask), None)
            .map_err(|e| format!("sigprocmask: {e}"))?;
        let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
            .map_err(|e| format!("signalfd: {e}"))?;

        let socket = dir.join(SOCKET_NAME);
        // Kept open for socket paths too long for an address (see `socket_address`).
        let dir_fd = Some(File::open(&dir).map_err(|e| format!("opening {}: {e}", dir.display()))?);
        let addr = socket_address(&socket, dir_fd.as_ref(), "self");
        match std::fs::remove_file(&socket) {
            Ok(()) => {}
            Err(e) if e.kind() == IoErrorKind::NotFound => {}
            Err(e) => return Err(format!("removing stale {}: {e}", socket.display())),
        }
        let listener =
            UnixListener::bind(&addr).map_err(|e| format!("binding {}: {e}", socket.display()))?;
        let _ = std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600));
        listener
            .set_nonblocking(true)
            .map_err(|e| format!("socket: {e}"))?;

        let diag_path = dir.join(LOG_NAME);
        if std::fs::metadata(&diag_path).is_ok_and(|m| m.len() > MAX_DIAG_LOG) {
            let _ = std::fs::remove_file(&diag_path);
        }
        let diag = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o640)
            .open(&diag_path)
            .ok();
        let mut m = Monitor {
            dir,
            pod_id: opts.pod_id.clone(),
            socket,
            listener,
            signals,
            _pid_lock: pid_lock,
            _dir_fd: dir_fd,
            diag,
            conns: Vec::new(),
            next_conn: 1,
            containers: Vec::new(),
            creates: Vec::new(),
            orphan_exits: VecDeque::new(),
            shutting_down: false,
            console_seq: 0,
            buf: vec![0; 32 * 1024],
        };
        let msg = format!("started (pid {me}) for pod {}", m.pod_id);
        m.diag(&msg);
        Ok(Some(m))
    }

    fn diag(&mut self, msg: &str) {
        if let Some(f) = self.diag.as_mut() {
            let line = format!("{} {msg}\n", super::log::rfc3339_nano(SystemTime::now()));
            let _ = f.write_all(line.as_bytes());
        }
    }

    /// The event loop; returns the process exit code.
    fn run(&mut self) -> i32 {
        let mut fds: Vec<libc::pollfd> = Vec::new();
        let mut tokens: Vec<Token> = Vec::new();
        loop {
            if self.shutting_down && self.done() {
                self.flush_all();
                let _ = std::fs::remove_file(&self.socket);
                let _ = std::fs::remove_file(self.dir.join(PID_FILE));
                self.diag("shut down");
                return 0;
            }
            fds.clear();
            tokens.clear();
            let mut add = |fd: RawFd, events: libc::c_short, t: Token| {
                fds.push(libc::pollfd {
                    fd,
                    events,
                    revents: 0,
                });
                tokens.push(t);
            };
            add(self.listener.as_raw_fd(), libc::POLLIN, Token::Listener);
            add(
                self.signals.as_fd().as_raw_fd(),
                libc::POLLIN,
                Token::Signals,
            );
            for (i, c) in self.conns.iter().enumerate() {
                let mut ev = 0;
                // An attacher whose input waits for the container is not read further.
                if !c.eof && c.inbuf.len() < attach::MAX_FRAME * 2 {
                    ev |= libc::POLLIN;
                }
                if !c.outbuf.is_empty() {
                    ev |= libc::POLLOUT;
                }
                // A closed peer would report POLLHUP forever: only watch it to write.
                if ev != 0 {
                    add(c.stream.as_raw_fd(), ev, Token::Conn(i));
                }
            }
            for (i, c) in self.containers.iter().enumerate() {
                for (j, o) in c.outputs.iter().enumerate() {
                    if let Some(fd) = &o.fd {
                        add(fd.as_raw_fd(), libc::POLLIN, Token::Output(i, j));
                    }
                }
            }
            for (i, c) in self.containers.iter().enumerate() {
                if let (Some(fd), false) = (&c.stdin, c.stdin_buf.is_empty()) {
                    add(fd.as_raw_fd(), libc::POLLOUT, Token::Stdin(i));
                }
            }
            for (i, p) in self.creates.iter().enumerate() {
                if let Some(c) = p.console.as_ref().filter(|c| c.master.is_none()) {
                    add(c.listener.as_raw_fd(), libc::POLLIN, Token::Console(i));
                }
            }
            let timeout = self.poll_timeout();
            // SAFETY: fds is a valid array of pollfd of the given length.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == IoErrorKind::Interrupted {
                    continue;
                }
                self.diag(&format!("poll: {e}"));
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            let ready: Vec<(Token, libc::c_short)> = fds
                .iter()
                .zip(tokens.iter())
                .filter(|(f, _)| f.revents != 0)
                .map(|(f, t)| (*t, f.revents))
                .collect();
            // Order matters: indices stay valid until the phase that may remove entries.
            for &(t, _) in &ready {
                if let Token::Output(i, j) = t {
                    self.read_output(i, j);
                }
            }
            for &(t, _) in &ready {
                if let Token::Console(i) = t {
                    self.accept_console(i);
                }
            }
            for &(t, _) in &ready {
                if let Token::Stdin(i) = t {
                    write_stdin(&mut self.containers[i]);
                }
            }
            // Outputs that hit EOF are dropped only now (indices above stay valid).
            for c in &mut self.containers {
                c.outputs.retain(|o| o.fd.is_some());
            }
            if ready.iter().any(|(t, _)| matches!(t, Token::Signals)) {
                self.handle_signals();
            }
            if ready.iter().any(|(t, _)| matches!(t, Token::Listener)) {
                self.accept_conns();
            }
            for &(t, revents) in &ready {
                if let Token::Conn(i) = t {
                    self.conn_io(i, revents);
                }
            }
            self.process_requests();
            self.conns.retain(|c| !c.dead);
            self.finish_exits();
            // Last: an exit reaped in this round ends its attaches before the next poll.
            self.end_attaches();
        }
    }

    /// No container process left and nothing in flight.
    fn done(&self) -> bool {
        self.creates.is_empty()
            && self
                .containers
                .iter()
                .all(|c| c.pid == 0 || c.exited.is_some())
    }

    fn poll_timeout(&self) -> libc::c_int {
        let now = Instant::now();
        self.containers
            .iter()
            .filter(|c| c.exited.is_none())
            .filter_map(|c| c.reaped.as_ref().map(|r| r.2))
            .map(|d| d.saturating_duration_since(now).as_millis().min(60_000) as libc::c_int + 1)
            .min()
            .unwrap_or(-1)
    }

    fn flush_all(&mut self) {
        for c in &mut self.conns {
            if !c.outbuf.is_empty() {
                let _ = c.stream.set_nonblocking(false);
                let _ = c.stream.set_write_timeout(Some(Duration::from_secs(1)));
                let _ = c.stream.write_all(&c.outbuf);
                c.outbuf.clear();
            }
        }
    }

    // ---- container output ----

    fn read_output(&mut self, i: usize, j: usize) {
        let Some(c) = self.containers.get_mut(i) else {
            return;
        };
        let mut total = 0;
        loop {
            let Some(o) = c.outputs.get_mut(j) else {
                return;
            };
            let Some(fd) = o.fd.as_mut() else { return };
            let r = fd.read(&mut self.buf);
            match r {
                Ok(0) => break close_output(o, &mut c.log),
                Ok(n) => {
                    let stream = o.stream;
                    let kind = match stream {
                        Stream::Stdout => attach::OUT_STDOUT,
                        Stream::Stderr => attach::OUT_STDERR,
                    };
                    for a in self.conns.iter_mut() {
                        if a.attached.as_deref() == Some(c.id.as_str())
                            && !a.dead
                            && a.outbuf.len() < attach::ATTACH_BUFFER
                        {
                            attach::push_frame(&mut a.outbuf, kind, &self.buf[..n]);
                        }
                    }
                    let log = &mut c.log;
                    o.splitter.feed(&self.buf[..n], &mut |tag, line| {
                        let _ = log.write_line(stream, tag, line);
                    });
                    total += n;
                    if total >= READ_BUDGET {
                        return;
                    }
                }
                Err(e) if e.kind() == IoErrorKind::Interrupted => {}
                Err(e) if e.kind() == IoErrorKind::WouldBlock => return,
                // EIO: the terminal's other side is closed; anything else ends it too.
                Err(_) => break close_output(o, &mut c.log),
            }
        }
    }

    // ---- signals and exits ----

    fn handle_signals(&mut self) {
        let mut term = false;
        while let Ok(Some(info)) = self.signals.read_signal() {
            if info.ssi_signo == Signal::SIGTERM as u32 || info.ssi_signo == Signal::SIGINT as u32 {
                term = true;
            }
        }
        if term && !self.shutting_down {
            self.shutting_down = true;
            self.diag("SIGTERM: exiting once no container process remains");
        }
        self.reap();
    }

    fn reap(&mut self) {
        loop {
            let status = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    self.diag(&format!("waitpid: {e}"));
                    return;
                }
                Ok(s) => s,
            };
            let Some(pid) = status.pid() else { continue };
            let pid = pid.as_raw();
            if !matches!(status, WaitStatus::Exited(..) | WaitStatus::Signaled(..)) {
                continue;
            }
            let now = unix_nanos();
            if let Some(k) = self.creates.iter().position(|p| p.runtime_pid == pid) {
                let p = self.creates.remove(k);
                self.complete_create(p, status);
            } else if let Some(c) = self
                .containers
                .iter_mut()
                .find(|c| c.pid == pid && c.reaped.is_none() && c.exited.is_none())
            {
                c.reaped = Some((status, now, Instant::now() + DRAIN_TIMEOUT));
            } else {
                if self.orphan_exits.len() >= MAX_ORPHAN_EXITS {
                    self.orphan_exits.pop_front();
                }
                self.orphan_exits.push_back((pid, status, now));
            }
        }
    }

    /// Records the exit of every reaped container whose output is drained (or whose drain
    /// deadline passed).
    fn finish_exits(&mut self) {
        let now = Instant::now();
        for k in 0..self.containers.len() {
            let c = &mut self.containers[k];
            let Some((status, finished_at, deadline)) = c.reaped else {
                continue;
            };
            if c.exited.is_some() || (!c.outputs.is_empty() && now < deadline) {
                continue;
            }
            for mut o in std::mem::take(&mut c.outputs) {
                close_output(&mut o, &mut c.log);
            }
            c.stdin = None;
            let (exit_code, signal) = match status {
                WaitStatus::Exited(_, code) => (code, None),
                WaitStatus::Signaled(_, sig, _) => (128 + sig as i32, Some(sig as i32)),
                _ => (255, None),
            };
            let info = ExitInfo {
                exit_code,
                signal,
                finished_at,
                oom_killed: c.oom_files.iter().any(|f| oom_killed(f)),
            };
            c.exited = Some(info);
            let r = serde_json::to_vec(&info)
                .map_err(std::io::Error::other)
                .and_then(|json| write_atomic(&c.exit_file, &json));
            let msg = match r {
                Ok(()) => format!("container {} exited: {info:?}", c.id),
                Err(e) => format!(
                    "container {} exited: {info:?}; writing {}: {e}",
                    c.id,
                    c.exit_file.display()
                ),
            };
            self.diag(&msg);
        }
    }

    // ---- create ----

    fn create(&mut self, conn: u64, req: CreateRequest) -> Option<Response> {
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
            Ok((runtime_pid, container, console)) => {
                self.diag(&format!(
                    "container {}: {} create (pid {runtime_pid})",
                    req.id,
                    req.runtime.display()
                ));
                self.containers.push(container);
                self.creates.push(PendingCreate {
                    runtime_pid,
                    conn,
                    id: req.id.clone(),
                    req,
                    console,
                });
                None
            }
            Err(resp) => Some(resp),
        }
    }

    fn spawn_create(
        &mut self,
        req: &CreateRequest,
    ) -> Result<(i32, Container, Option<Console>), Response> {
        let io_err = |what: &str, e: &dyn std::fmt::Display| {
            Response::error(ErrorKind::Io, format!("{what}: {e}"))
        };
        let log = CriLog::open(&req.log_path)
            .map_err(|e| io_err(&format!("opening {}", req.log_path.display()), &e))?;
        let pid_file = req.bundle.join("init.pid");
        let runtime_log = req.bundle.join("runtime.log");
        for f in [&pid_file, &runtime_log, &req.exit_file] {
            match std::fs::remove_file(f) {
                Ok(()) => {}
                Err(e) if e.kind() == IoErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&format!("removing {}", f.display()), &e)),
            }
        }
        let mut cmd = Command::new(&req.runtime);
        cmd.arg("--root")
            .arg(&req.runtime_root)
            .arg("--log")
            .arg(&runtime_log)
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
        Ok((child.id() as i32, container, console))
    }

    fn accept_console(&mut self, i: usize) {
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

    fn complete_create(&mut self, mut p: PendingCreate, status: WaitStatus) {
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
        let result = self.created(&mut p, status);
        let resp = match result {
            Ok(pid) => {
                self.diag(&format!("container {} created, pid {pid}", p.id));
                Response::Created { pid }
            }
            Err(message) => {
                self.diag(&format!("container {}: {message}", p.id));
                self.containers.retain(|c| c.id != p.id);
                Response::error(ErrorKind::Runtime, message)
            }
        };
        if let Some(conn) = self.conns.iter_mut().find(|c| c.id == p.conn) {
            conn.busy = false;
            push_response(conn, &resp);
        }
    }

    /// The init pid after a create ended, or the error message.
    fn created(&mut self, p: &mut PendingCreate, status: WaitStatus) -> Result<i32, String> {
        let runtime = p.req.runtime.display().to_string();
        if !matches!(status, WaitStatus::Exited(_, 0)) {
            let log = std::fs::read(p.req.bundle.join("runtime.log")).unwrap_or_default();
            let log = String::from_utf8_lossy(&log[log.len().saturating_sub(16384)..]);
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

    fn accept_conns(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    self.conns.push(Conn {
                        id: self.next_conn,
                        stream,
                        inbuf: Vec::new(),
                        outbuf: Vec::new(),
                        busy: false,
                        eof: false,
                        dead: false,
                        attached: None,
                        attach_ended: false,
                    });
                    self.next_conn += 1;
                }
                Err(e) if e.kind() == IoErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }

    fn conn_io(&mut self, i: usize, revents: libc::c_short) {
        let Some(c) = self.conns.get_mut(i) else {
            return;
        };
        if revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 && !c.eof {
            loop {
                match c.stream.read(&mut self.buf) {
                    Ok(0) => {
                        c.eof = true;
                        break;
                    }
                    Ok(n) => {
                        c.inbuf.extend_from_slice(&self.buf[..n]);
                        if c.inbuf.len() > MAX_LINE + 1 && !c.inbuf.contains(&b'\n') {
                            let resp =
                                Response::error(ErrorKind::BadRequest, "request line too long");
                            push_response(c, &resp);
                            c.inbuf.clear();
                            c.eof = true;
                            break;
                        }
                    }
                    Err(e) if e.kind() == IoErrorKind::Interrupted => {}
                    Err(e) if e.kind() == IoErrorKind::WouldBlock => break,
                    Err(_) => {
                        c.dead = true;
                        return;
                    }
                }
            }
        }
        flush_conn(c);
    }

    fn process_requests(&mut self) {
        for i in 0..self.conns.len() {
            if self.conns[i].attached.is_some() {
                self.attach_input(i);
            }
            loop {
                let c = &mut self.conns[i];
                if c.busy || c.dead || c.attached.is_some() {
                    break;
                }
                let Some(nl) = c.inbuf.iter().position(|&b| b == b'\n') else {
                    break;
                };
                let line: Vec<u8> = c.inbuf.drain(..=nl).collect();
                let conn_id = c.id;
                let resp = match serde_json::from_slice::<Request>(&line) {
                    Ok(req) => self.handle(conn_id, req),
                    Err(e) => Some(Response::error(
                        ErrorKind::BadRequest,
                        format!("bad request: {e}"),
                    )),
                };
                let c = &mut self.conns[i];
                match resp {
                    Some(r) => push_response(c, &r),
                    None => c.busy = true,
                }
            }
            let c = &mut self.conns[i];
            flush_conn(c);
            if c.eof && !c.busy && c.outbuf.is_empty() && !c.inbuf.contains(&b'\n') {
                c.dead = true;
            }
        }
    }

    /// Applies the frames an attacher sent: stdin bytes (queued, written as the pipe takes
    /// them), stdin close, terminal resize.
    fn attach_input(&mut self, i: usize) {
        let Some(id) = self.conns[i].attached.clone() else {
            return;
        };
        let Some(k) = self.containers.iter().position(|c| c.id == id) else {
            self.conns[i].dead = true;
            return;
        };
        loop {
            // Input waits while the container has not taken what came before.
            if self.containers[k].stdin_buf.len() >= attach::ATTACH_BUFFER {
                break;
            }
            let frame = match attach::take_frame(&mut self.conns[i].inbuf) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(_) => {
                    self.conns[i].dead = true;
                    return;
                }
            };
            let c = &mut self.containers[k];
            match frame {
                (attach::IN_STDIN, data) if c.stdin.is_some() => {
                    c.stdin_buf.extend_from_slice(&data);
                }
                (attach::IN_CLOSE_STDIN, _) => {
                    write_stdin(c);
                    c.stdin_buf.clear();
                    c.stdin = None;
                }
                (attach::IN_RESIZE, size) if size.len() == 4 => {
                    let ws = libc::winsize {
                        ws_col: u16::from_be_bytes([size[0], size[1]]),
                        ws_row: u16::from_be_bytes([size[2], size[3]]),
                        ws_xpixel: 0,
                        ws_ypixel: 0,
                    };
                    let fds = c
                        .outputs
                        .iter()
                        .filter_map(|o| o.fd.as_ref())
                        .chain(c.stdin.as_ref());
                    for fd in fds {
                        // SAFETY: TIOCSWINSZ reads one winsize from a pointer that outlives
                        // the call; on a pipe it fails with ENOTTY and changes nothing.
                        unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
                    }
                }
                _ => {}
            }
        }
        write_stdin(&mut self.containers[k]);
        if self.conns[i].eof && self.conns[i].inbuf.is_empty() && self.conns[i].outbuf.is_empty() {
            self.conns[i].dead = true;
        }
    }

    /// Tells attachers of containers whose output ended (or that are gone) that it did.
    fn end_attaches(&mut self) {
        for a in self.conns.iter_mut() {
            let Some(id) = a.attached.as_deref() else {
                continue;
            };
            if a.attach_ended {
                continue;
            }
            let ended = self
                .containers
                .iter()
                .find(|c| c.id == id)
                .is_none_or(|c| c.outputs.is_empty() && (c.pid == 0 || c.reaped.is_some()));
            if ended {
                attach::push_frame(&mut a.outbuf, attach::OUT_END, &[]);
                a.attach_ended = true;
                a.eof = true;
            }
        }
    }

    /// Handles one request; `None` when the answer comes later (create).
    fn handle(&mut self, conn: u64, req: Request) -> Option<Response> {
        let find = |cs: &mut Vec<Container>, id: &str| cs.iter().position(|c| c.id == id);
        let not_found =
            |id: &str| Response::error(ErrorKind::NotFound, format!("container {id} not found"));
        Some(match req {
            Request::Create(req) => return self.create(conn, req),
            Request::Reopen { id } => match find(&mut self.containers, &id) {
                None => not_found(&id),
                Some(k) => match self.containers[k].log.reopen() {
                    Ok(()) => Response::Ok,
                    Err(e) => Response::error(
                        ErrorKind::Io,
                        format!("reopening {}: {e}", self.containers[k].log.path().display()),
                    ),
                },
            },
            Request::Attach { id } => match find(&mut self.containers, &id) {
                None => not_found(&id),
                Some(_) => {
                    if let Some(c) = self.conns.iter_mut().find(|c| c.id == conn) {
                        c.attached = Some(id);
                    }
                    Response::Ok
                }
            },
            Request::CloseStdin { id } => match find(&mut self.containers, &id) {
                None => not_found(&id),
                Some(k) => {
                    self.containers[k].stdin = None;
                    Response::Ok
                }
            },
            Request::State => Response::State {
                containers: self
                    .containers
                    .iter()
                    .filter(|c| c.pid != 0)
                    .map(|c| ContainerState {
                        id: c.id.clone(),
                        pid: c.pid,
                        exited: c.exited,
                    })
                    .collect(),
            },
            Request::Forget { id } => {
                if self.creates.iter().any(|p| p.id == id) {
                    Response::error(
                        ErrorKind::AlreadyExists,
                        format!("container {id} is being created"),
                    )
                } else {
                    match find(&mut self.containers, &id) {
                        None => not_found(&id),
                        Some(k) => {
                            let mut c = self.containers.remove(k);
                            for mut o in std::mem::take(&mut c.outputs) {
                                close_output(&mut o, &mut c.log);
                            }
                            self.diag(&format!("container {id} forgotten"));
                            Response::Ok
                        }
                    }
                }
            }
            Request::Shutdown => {
                if !self.shutting_down {
                    self.diag("shutdown requested");
                }
                self.shutting_down = true;
                Response::Ok
            }
        })
    }
}

/// Writes what the container's stdin takes of its queued attach input, without blocking.
fn write_stdin(c: &mut Container) {
    let Some(fd) = c.stdin.as_mut() else {
        c.stdin_buf.clear();
        return;
    };
    if let Ok(flags) = fcntl(&*fd, FcntlArg::F_GETFL) {
        let flags = OFlag::from_bits_truncate(flags);
        if !flags.contains(OFlag::O_NONBLOCK) {
            let _ = fcntl(&*fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK));
        }
    }
    while !c.stdin_buf.is_empty() {
        match fd.write(&c.stdin_buf) {
            Ok(n) => {
                c.stdin_buf.drain(..n);
            }
            Err(e) if e.kind() == IoErrorKind::Interrupted => {}
            Err(e) if e.kind() == IoErrorKind::WouldBlock => return,
            Err(_) => {
                // The container closed its stdin: input has nowhere to go.
                c.stdin_buf.clear();
                return;
            }
        }
    }
}

/// Flushes what is left of an output into the log and closes its fd.
fn close_output(o: &mut Output, log: &mut CriLog) {
    let stream = o.stream;
    o.splitter.finish(&mut |tag: Tag, line: &[u8]| {
        let _ = log.write_line(stream, tag, line);
    });
    o.fd = None;
}

fn output(fd: OwnedFd, stream: Stream) -> std::io::Result<Output> {
    let flags = fcntl(fd.as_fd(), FcntlArg::F_GETFL)?;
    fcntl(
        fd.as_fd(),
        FcntlArg::F_SETFL(OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK),
    )?;
    Ok(Output {
        fd: Some(File::from(fd)),
        stream,
        splitter: LineSplitter::default(),
    })
}

/// A pipe whose ends are close-on-exec (the runtime gets them as stdio via dup2).
fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    Ok(pipe2(OFlag::O_CLOEXEC)?)
}

fn push_response(c: &mut Conn, r: &Response) {
    match serde_json::to_vec(r) {
        Ok(mut v) => {
            v.push(b'\n');
            c.outbuf.extend_from_slice(&v);
        }
        Err(_) => c.outbuf.extend_from_slice(
            b"{\"result\":\"error\",\"kind\":\"io\",\"message\":\"cannot encode response\"}\n",
        ),
    }
}

fn flush_conn(c: &mut Conn) {
    while !c.outbuf.is_empty() && !c.dead {
        match c.stream.write(&c.outbuf) {
            Ok(n) => {
                c.outbuf.drain(..n);
            }
            Err(e) if e.kind() == IoErrorKind::Interrupted => {}
            Err(e) if e.kind() == IoErrorKind::WouldBlock => return,
            Err(_) => c.dead = true,
        }
    }
}

/// Receives one fd (runc's `--console-socket` protocol: the terminal master via
/// SCM_RIGHTS).
fn receive_fd(stream: &UnixStream) -> std::io::Result<OwnedFd> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut data = [0u8; 4096];
    let mut iov = [IoSliceMut::new(&mut data)];
    let mut space = nix::cmsg_space!([RawFd; 4]);
    let msg = recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut got: Option<OwnedFd> = None;
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            for fd in fds {
                // SAFETY: the kernel just installed these fds in our table; we own them.
                let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                if got.is_none() {
                    got = Some(owned);
                }
            }
        }
    }
    got.ok_or_else(|| std::io::Error::other("no fd received on the console socket"))
}

/// The parent pid of a process, from `/proc/PID/stat`.
fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which may hold spaces) start after the last ')'.
    stat.get(stat.rfind(')')? + 2..)?
        .split(' ')
        .nth(1)?
        .parse()
        .ok()
}

/// `oom_kill N` with N > 0 in a cgroup file (v1 `memory.oom_control`, v2 `memory.events`).
fn oom_killed(path: &Path) -> bool {
    std::fs::read_to_string(path).is_ok_and(|text| {
        text.lines().any(|l| {
            l.strip_prefix("oom_kill ")
                .and_then(|n| n.trim().parse::<u64>().ok())
                .is_some_and(|n| n > 0)
        })
    })
}

/// Writes `path` atomically and durably: a temporary file, fsync, rename, fsync of the dir.
fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(dir)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()
}

fn unix_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parent_pid() {
        assert_eq!(
            parent_of(std::process::id() as i32),
            Some(nix::unistd::getppid().as_raw())
        );
        assert_eq!(parent_of(i32::MAX), None);
    }

    #[test]
    fn oom_counter() {
        let dir = tempfile::tempdir().unwrap();
        let v1 = dir.path().join("memory.oom_control");
        std::fs::write(&v1, "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n").unwrap();
        assert!(!oom_killed(&v1));
        std::fs::write(&v1, "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n").unwrap();
        assert!(oom_killed(&v1));
        let v2 = dir.path().join("memory.events");
        std::fs::write(
            &v2,
            "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\noom_group_kill 0\n",
        )
        .unwrap();
        assert!(oom_killed(&v2));
        assert!(!oom_killed(&dir.path().join("missing")));
    }

    #[test]
    fn atomic_write() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a/b/exit.json");
        write_atomic(&p, b"{}").unwrap();
        write_atomic(&p, b"{\"x\":1}").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"{\"x\":1}");
        assert!(!dir.path().join("a/b/exit.json.tmp").exists());
    }
}
