//! The monitor process: daemonizing, and its single-threaded `poll(2)` event loop.
//!
//! Nothing here uses an async runtime or threads: the process forks before anything else,
//! and every fd it owns is watched by one `poll` call (the listening socket, connections
//! from berthd, a signalfd for SIGCHLD/SIGTERM/SIGINT, the containers' output pipes or
//! terminals, and the console sockets of terminal containers being created).
//!
//! This module owns the process (daemonizing, the pid lock, the socket) and the loop; the
//! loop's work is split by concern: [`create`] (the runtime's `create`), [`exits`] (reaping
//! and exit records), [`conns`] (berthd's requests) and [`io`] (the containers' stdio, logs
//! and attaches).

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

mod conns;
mod create;
mod exits;
mod io;

use io::write_stdin;

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

/// A `<runtime> create` still running (in a process group of its own, led by it).
struct PendingCreate {
    runtime_pid: i32,
    conn: u64,
    id: String,
    req: CreateRequest,
    console: Option<Console>,
    /// Where the runtime logs (a memfd): its errors when the create fails.
    runtime_log: File,
    /// When it is killed unless it ended (`timeout_ms`).
    deadline: Option<Instant>,
    /// Why it was killed, once it was.
    killed: Option<Killed>,
    /// Connections whose `forget` of this container is answered once it is reaped.
    forget_conns: Vec<u64>,
}

/// Why a pending create was killed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Killed {
    /// Its `timeout_ms` passed.
    Timeout,
    /// berthd forgot the container while it was being created.
    Forgotten,
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
            self.expire_creates();
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
        let drains = self
            .containers
            .iter()
            .filter(|c| c.exited.is_none())
            .filter_map(|c| c.reaped.as_ref().map(|r| r.2));
        let creates = self
            .creates
            .iter()
            .filter(|p| p.killed.is_none())
            .filter_map(|p| p.deadline);
        drains
            .chain(creates)
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
}

/// Writes `path` atomically: a temporary file renamed over it. Not fsynced: what it is for (a
/// container's exit file in its bundle under berth's `state`) lasts one boot, like the
/// container it describes; a crash of berthd or of the monitor does not lose it.
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
    }
    std::fs::rename(&tmp, path)
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
    fn atomic_write() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a/b/exit.json");
        write_atomic(&p, b"{}").unwrap();
        write_atomic(&p, b"{\"x\":1}").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"{\"x\":1}");
        assert!(!dir.path().join("a/b/exit.json.tmp").exists());
    }
}
