//! The OCI runtime CLI (runc, crun, or any runtime with the same command line), one per
//! RuntimeClass handler. berth only ever uses the CLI: `create` runs in the pod's
//! berth-monitor (it owns the stdio), everything else (`start`, `state`, `kill`, `delete`,
//! `exec`, `update`) runs from berthd through [`OciRuntime`]. [`log`] reads what the runtime
//! said when it failed.

pub mod log;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::Deserialize;
use tokio::io::AsyncReadExt;
use tokio::process::Command;

use crate::config::{CgroupDriver, Config};

/// Errors of the OCI runtime CLI.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("unknown runtime handler {0:?}")]
    UnknownHandler(String),
    #[error("{runtime} {command}: {message}")]
    Failed {
        runtime: String,
        command: &'static str,
        message: String,
    },
    #[error("{runtime} {command}: container does not exist")]
    NotFound {
        runtime: String,
        command: &'static str,
    },
    #[error(
        "{runtime} {command} timed out after {}; it was killed with every process it started",
        humantime::format_duration(*after)
    )]
    Timeout {
        runtime: String,
        command: &'static str,
        after: Duration,
    },
    #[error("running {runtime}: {source}")]
    Spawn {
        runtime: String,
        source: std::io::Error,
    },
}

/// One configured OCI runtime.
#[derive(Debug, Clone)]
pub struct OciRuntime {
    /// The RuntimeClass handler name.
    pub handler: String,
    /// The binary.
    pub binary: PathBuf,
    /// Its state directory (`--root`), per handler under berth's `state`.
    pub root: PathBuf,
    /// runc's `--systemd-cgroup`.
    pub systemd_cgroup: bool,
    /// How long one command may take (`[runtimes.NAME] timeout`).
    pub timeout: Duration,
}

/// What `state` reports.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct RuntimeState {
    pub status: String,
    #[serde(default)]
    pub pid: i32,
}

/// The output of an `exec`.
#[derive(Debug, Clone, Default)]
pub struct ExecOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub exit_code: i32,
    pub timed_out: bool,
}

/// The most output an ExecSync keeps per stream (the rest is dropped).
pub const EXEC_OUTPUT_CAP: usize = 16 << 20;

impl OciRuntime {
    /// The runtime of a handler from the configuration.
    pub fn for_handler(config: &Config, handler: &str) -> Result<OciRuntime, RuntimeError> {
        let rc = config
            .runtimes
            .get(handler)
            .ok_or_else(|| RuntimeError::UnknownHandler(handler.to_string()))?;
        Ok(OciRuntime {
            handler: handler.to_string(),
            binary: rc.path.clone(),
            root: config.state.join("runtime").join(handler),
            systemd_cgroup: config.cgroup_driver == CgroupDriver::Systemd,
            timeout: rc.timeout,
        })
    }

    /// The global arguments every command starts with.
    pub fn global_args(&self) -> Vec<String> {
        let mut v = vec!["--root".to_string(), self.root.display().to_string()];
        if self.systemd_cgroup {
            v.push("--systemd-cgroup".to_string());
        }
        v
    }

    fn command(&self) -> Command {
        let mut c = Command::new(&self.binary);
        c.args(self.global_args())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        c
    }

    /// Runs one command in a process group of its own, within [`Self::timeout`]. When the
    /// time is up, or when the caller stops waiting (this future is dropped), the whole
    /// group is killed: a stuck runtime leaves nothing behind
    /// (a shell wrapper's children, a hung helper), and it holds no pipe of ours open.
    async fn run(&self, command: &'static str, args: &[&str]) -> Result<Vec<u8>, RuntimeError> {
        let mut c = self.command();
        c.arg(command).args(args).process_group(0);
        let mut child = c.spawn().map_err(|source| RuntimeError::Spawn {
            runtime: self.binary.display().to_string(),
            source,
        })?;
        // Dropped before `child` (declared after it): the group is killed while its leader is
        // still unreaped, so its id cannot have been reused.
        let group = GroupKiller::new(&child);
        let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
        let work = async {
            let (status, stdout, stderr) =
                tokio::join!(child.wait(), read_to_end(stdout), read_to_end(stderr));
            (status, stdout, stderr)
        };
        let (status, stdout, stderr) = match tokio::time::timeout(self.timeout, work).await {
            Ok(done) => done,
            Err(_) => {
                drop(group);
                // SIGKILLed: reaped at once.
                let _ = child.wait().await;
                tracing::warn!(
                    runtime = %self.handler,
                    binary = %self.binary.display(),
                    command,
                    "OCI runtime command timed out; killed its process group"
                );
                return Err(RuntimeError::Timeout {
                    runtime: self.handler.clone(),
                    command,
                    after: self.timeout,
                });
            }
        };
        group.disarm();
        let status = status.map_err(|source| RuntimeError::Spawn {
            runtime: self.binary.display().to_string(),
            source,
        })?;
        let out = std::process::Output {
            status,
            stdout,
            stderr,
        };
        if out.status.success() {
            return Ok(out.stdout);
        }
        let raw = String::from_utf8_lossy(&out.stderr);
        let message = match log::errors(&raw) {
            m if m.is_empty() => raw.trim().to_string(),
            m => m,
        };
        // A crash says nothing: how it ended is what there is to tell.
        let message = if message.is_empty() {
            format!("failed ({}) and said nothing", out.status)
        } else {
            message
        };
        // The container is unknown to the runtime (runc: "container does not exist"); not
        // any "not found", which also stands for a missing executable.
        if message.contains("does not exist") || message.contains("container not found") {
            return Err(RuntimeError::NotFound {
                runtime: self.handler.clone(),
                command,
            });
        }
        Err(RuntimeError::Failed {
            runtime: self.handler.clone(),
            command,
            message,
        })
    }

    pub async fn start(&self, id: &str) -> Result<(), RuntimeError> {
        self.run("start", &[id]).await.map(|_| ())
    }

    /// The container's state, or `None` when the runtime does not know it.
    pub async fn state(&self, id: &str) -> Result<Option<RuntimeState>, RuntimeError> {
        match self.run("state", &[id]).await {
            Ok(out) => serde_json::from_slice(&out)
                .map(Some)
                .map_err(|e| RuntimeError::Failed {
                    runtime: self.handler.clone(),
                    command: "state",
                    message: format!("unreadable state: {e}"),
                }),
            Err(RuntimeError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Sends a signal to the container's init (`all`: to every process of it).
    pub async fn kill(&self, id: &str, signal: i32, all: bool) -> Result<(), RuntimeError> {
        let sig = signal.to_string();
        let mut args = vec![];
        if all {
            args.push("--all");
        }
        args.push(id);
        args.push(&sig);
        match self.run("kill", &args).await {
            Ok(_) => Ok(()),
            // Already stopped: nothing to signal.
            Err(RuntimeError::Failed { message, .. })
                if message.contains("not running")
                    || message.contains("process already finished") =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Deletes the container; absent is fine.
    pub async fn delete(&self, id: &str) -> Result<(), RuntimeError> {
        match self.run("delete", &["--force", id]).await {
            Ok(_) | Err(RuntimeError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Changes the container's resources (an OCI `LinuxResources` JSON file).
    pub async fn update(&self, id: &str, resources_json: &Path) -> Result<(), RuntimeError> {
        let r = resources_json.display().to_string();
        self.run("update", &["--resources", &r, id])
            .await
            .map(|_| ())
    }

    /// Runs a process (an OCI `Process` JSON file) in the container and collects its output,
    /// killing it when `timeout` passes. The work runs in a task of its own: if this future is
    /// dropped (the client's deadline passed), the process is killed as on a timeout and
    /// reaped by its runtime, instead of being orphaned with it.
    pub async fn exec(
        &self,
        id: &str,
        process_json: &Path,
        pid_file: &Path,
        timeout: Option<Duration>,
    ) -> Result<ExecOutput, RuntimeError> {
        // Dropped with this future: the task sees its receiver fail and stops the exec.
        let (_caller_waits, caller_gone) = tokio::sync::oneshot::channel::<()>();
        let me = self.clone();
        let (id, process_json, pid_file) = (
            id.to_string(),
            process_json.to_path_buf(),
            pid_file.to_path_buf(),
        );
        tokio::spawn(async move {
            me.exec_in_task(&id, &process_json, &pid_file, timeout, caller_gone)
                .await
        })
        .await
        .map_err(|e| RuntimeError::Failed {
            runtime: self.handler.clone(),
            command: "exec",
            message: format!("exec task: {e}"),
        })?
    }

    async fn exec_in_task(
        &self,
        id: &str,
        process_json: &Path,
        pid_file: &Path,
        timeout: Option<Duration>,
        caller_gone: tokio::sync::oneshot::Receiver<()>,
    ) -> Result<ExecOutput, RuntimeError> {
        let mut c = self.command();
        c.arg("exec")
            .arg("--process")
            .arg(process_json)
            .arg("--pid-file")
            .arg(pid_file)
            .arg(id);
        let mut child = c.spawn().map_err(|source| RuntimeError::Spawn {
            runtime: self.binary.display().to_string(),
            source,
        })?;
        let (Some(out), Some(err)) = (child.stdout.take(), child.stderr.take()) else {
            return Err(RuntimeError::Failed {
                runtime: self.handler.clone(),
                command: "exec",
                message: "no output pipes".to_string(),
            });
        };
        let read_capped = |mut r: Box<dyn tokio::io::AsyncRead + Unpin + Send>| async move {
            let mut buf = Vec::new();
            let mut chunk = vec![0u8; 64 * 1024];
            loop {
                match r.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let room = EXEC_OUTPUT_CAP.saturating_sub(buf.len());
                        buf.extend_from_slice(&chunk[..n.min(room)]);
                    }
                }
            }
            buf
        };
        let stdout = tokio::spawn(read_capped(Box::new(out)));
        let stderr = tokio::spawn(read_capped(Box::new(err)));
        let deadline = async {
            match timeout {
                Some(t) => tokio::time::sleep(t).await,
                None => std::future::pending().await,
            }
        };
        let waited = tokio::select! {
            s = child.wait() => Some(s),
            () = deadline => None,
            _ = caller_gone => None,
        };
        let (status, timed_out) = match waited {
            Some(s) => (
                s.map_err(|source| RuntimeError::Spawn {
                    runtime: self.binary.display().to_string(),
                    source,
                })?,
                false,
            ),
            None => (
                stop_exec(&mut child, pid_file)
                    .await
                    .map_err(|source| RuntimeError::Spawn {
                        runtime: self.binary.display().to_string(),
                        source,
                    })?,
                true,
            ),
        };
        // After a kill, a child the process left behind may still hold the pipes open: the
        // output read so far is what the caller gets, without waiting for that child.
        let collect = |task: tokio::task::JoinHandle<Vec<u8>>| async move {
            if !timed_out {
                return task.await.unwrap_or_default();
            }
            let abort = task.abort_handle();
            match tokio::time::timeout(Duration::from_secs(1), task).await {
                Ok(out) => out.unwrap_or_default(),
                Err(_) => {
                    abort.abort();
                    Vec::new()
                }
            }
        };
        let stdout = collect(stdout).await;
        let stderr = collect(stderr).await;
        let exit_code = exit_code(status);
        Ok(ExecOutput {
            stdout,
            stderr,
            exit_code,
            timed_out,
        })
    }
}

/// An exec whose stdio the caller wires (the streaming Exec): `runc exec` in the foreground,
/// the parent and reaper of the process it runs.
pub struct ExecChild {
    child: tokio::process::Child,
    pid_file: PathBuf,
}

impl OciRuntime {
    /// Starts `exec` of an OCI process file with the given stdio. With `process.terminal`
    /// the runtime copies between its own stdio (a pty the caller holds) and the container's
    /// console, and resizes that console on SIGWINCH.
    pub fn spawn_exec(
        &self,
        id: &str,
        process_json: &Path,
        pid_file: &Path,
        stdio: [Stdio; 3],
    ) -> Result<ExecChild, RuntimeError> {
        let [stdin, stdout, stderr] = stdio;
        let mut c = Command::new(&self.binary);
        c.args(self.global_args())
            .arg("exec")
            .arg("--process")
            .arg(process_json)
            .arg("--pid-file")
            .arg(pid_file)
            .arg(id)
            .stdin(stdin)
            .stdout(stdout)
            .stderr(stderr)
            // Its own process group: signals for berthd's group do not reach it.
            .process_group(0)
            .kill_on_drop(true);
        let child = c.spawn().map_err(|source| RuntimeError::Spawn {
            runtime: self.binary.display().to_string(),
            source,
        })?;
        Ok(ExecChild {
            child,
            pid_file: pid_file.to_path_buf(),
        })
    }
}

impl ExecChild {
    pub fn stdin(&mut self) -> Option<tokio::process::ChildStdin> {
        self.child.stdin.take()
    }
    pub fn stdout(&mut self) -> Option<tokio::process::ChildStdout> {
        self.child.stdout.take()
    }
    pub fn stderr(&mut self) -> Option<tokio::process::ChildStderr> {
        self.child.stderr.take()
    }
    /// The runtime's pid (the process to send SIGWINCH to).
    pub fn runtime_pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Waits for the exec's exit code (128 + signal for a signalled one).
    pub async fn wait(&mut self) -> std::io::Result<i32> {
        self.child.wait().await.map(exit_code)
    }

    /// Kills the exec'd process and lets its runtime reap it (see [`stop_exec`]).
    pub async fn kill(&mut self) -> std::io::Result<i32> {
        stop_exec(&mut self.child, &self.pid_file)
            .await
            .map(exit_code)
    }
}

/// Everything a pipe gives until its end (nothing when there is no pipe or it fails).
async fn read_to_end(r: Option<impl tokio::io::AsyncRead + Unpin>) -> Vec<u8> {
    let mut buf = Vec::new();
    if let Some(mut r) = r {
        let _ = r.read_to_end(&mut buf).await;
    }
    buf
}

/// SIGKILLs a runtime command's process group when dropped, unless disarmed (the command
/// ended by itself).
struct GroupKiller(Option<nix::unistd::Pid>);

impl GroupKiller {
    fn new(child: &tokio::process::Child) -> GroupKiller {
        GroupKiller(
            child
                .id()
                .and_then(|id| i32::try_from(id).ok())
                .map(nix::unistd::Pid::from_raw),
        )
    }

    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for GroupKiller {
    fn drop(&mut self) {
        if let Some(pgid) = self.0.take() {
            let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(-1)
}

/// Kills an exec'd process itself and lets its runtime reap it and exit: the process is the
/// runtime's child, and killing the runtime first would orphan it to the host's init, where
/// it lingers as a zombie that the container can see. The runtime is killed only if it does
/// not end by itself.
async fn stop_exec(
    child: &mut tokio::process::Child,
    pid_file: &Path,
) -> std::io::Result<std::process::ExitStatus> {
    // The runtime may not have written the pid yet: give it a moment.
    let mut pid = kill_pid_in(pid_file);
    for _ in 0..20 {
        if pid.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        pid = kill_pid_in(pid_file);
    }
    let grace = if pid.is_some() {
        Duration::from_secs(5)
    } else {
        Duration::ZERO
    };
    let s = match tokio::time::timeout(grace, child.wait()).await {
        Ok(s) => s,
        Err(_) => {
            let _ = child.start_kill();
            child.wait().await
        }
    }?;
    if let Some(pid) = pid {
        for _ in 0..100 {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    Ok(s)
}

/// SIGKILLs the process whose pid a runtime wrote to `pid_file`, if any; returns the pid.
fn kill_pid_in(pid_file: &Path) -> Option<i32> {
    let pid = std::fs::read_to_string(pid_file)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        .filter(|p| *p > 0)?;
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    Some(pid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// A runtime whose binary is `script` (written by a child process, so that this
    /// multi-threaded test process never holds it open for writing: no ETXTBSY).
    fn stub(dir: &Path, script: &str, timeout: Duration) -> OciRuntime {
        let path = dir.join("rt");
        let mut child = std::process::Command::new("sh")
            .arg("-c")
            .arg("cat > \"$1\" && chmod 755 \"$1\"")
            .arg("sh")
            .arg(&path)
            .stdin(Stdio::piped())
            .spawn()
            .expect("sh");
        use std::io::Write as _;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(script.as_bytes())
            .expect("write");
        assert!(child.wait().expect("wait").success());
        OciRuntime {
            handler: "stub".to_string(),
            binary: path,
            root: dir.join("root"),
            systemd_cgroup: false,
            timeout,
        }
    }

    /// A script that records its child's pid in `dir/child` and hangs on it.
    fn hanging(dir: &Path) -> String {
        format!(
            "#!/bin/sh\nsleep 1000 &\necho $! > {}/child\nwait\n",
            dir.display()
        )
    }

    /// Waits until the pid in `dir/child` is gone (or a zombie); false after 5 s.
    async fn child_gone(dir: &Path) -> bool {
        let Some(pid) = std::fs::read_to_string(dir.join("child"))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        else {
            return false;
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = stat.rfind(')').and_then(|i| stat.get(i + 2..i + 3));
            if matches!(state, None | Some("Z")) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    #[tokio::test]
    async fn a_hung_command_times_out_and_its_process_group_is_killed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let rt = stub(dir.path(), &hanging(dir.path()), Duration::from_millis(300));
        let t0 = Instant::now();
        let e = rt.start("x").await.expect_err("times out");
        assert!(
            matches!(
                e,
                RuntimeError::Timeout {
                    command: "start",
                    ..
                }
            ),
            "{e}"
        );
        assert!(
            e.to_string()
                .starts_with("stub start timed out after 300ms"),
            "{e}"
        );
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
        assert!(child_gone(dir.path()).await, "the runtime's child lives on");
    }

    #[tokio::test]
    async fn a_command_the_caller_gives_up_on_is_killed_with_its_group() {
        let dir = tempfile::tempdir().expect("tempdir");
        let rt = stub(dir.path(), &hanging(dir.path()), Duration::from_secs(600));
        let r = tokio::time::timeout(Duration::from_millis(500), rt.kill("x", 9, true)).await;
        assert!(r.is_err(), "the caller gave up");
        assert!(child_gone(dir.path()).await, "the runtime's child lives on");
    }

    #[tokio::test]
    async fn crashes_are_failures_naming_the_runtime_and_command() {
        let dir = tempfile::tempdir().expect("tempdir");
        let rt = stub(
            dir.path(),
            "#!/bin/sh\nprintf 'garbage \\377{\\n' >&2\nexit 1\n",
            Duration::from_secs(10),
        );
        let e = rt.start("x").await.expect_err("fails");
        let m = e.to_string();
        assert!(m.starts_with("stub start: garbage"), "{m}");
        let rt = stub(
            dir.path(),
            "#!/bin/sh\nkill -SEGV $$\n",
            Duration::from_secs(10),
        );
        let e = rt.delete("x").await.expect_err("fails");
        let m = e.to_string();
        assert!(
            m.starts_with("stub delete: failed") && m.contains("SIGSEGV"),
            "{m}"
        );
        // A quick runtime that leaves a child holding its output is waited for no longer
        // than the timeout, and the child goes too.
        let rt = stub(
            dir.path(),
            &format!(
                "#!/bin/sh\nsleep 1000 &\necho $! > {}/child\nexit 0\n",
                dir.path().display()
            ),
            Duration::from_millis(300),
        );
        let e = rt.start("x").await.expect_err("its output never ends");
        assert!(matches!(e, RuntimeError::Timeout { .. }), "{e}");
        assert!(child_gone(dir.path()).await, "the runtime's child lives on");
    }
}
