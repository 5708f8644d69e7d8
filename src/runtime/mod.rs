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
    #[error("{runtime} {command} timed out after {after:?}")]
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

    async fn run(&self, command: &'static str, args: &[&str]) -> Result<Vec<u8>, RuntimeError> {
        let mut c = self.command();
        c.arg(command).args(args);
        let out = tokio::time::timeout(Duration::from_secs(60), c.output())
            .await
            .map_err(|_| RuntimeError::Timeout {
                runtime: self.handler.clone(),
                command,
                after: Duration::from_secs(60),
            })?
            .map_err(|source| RuntimeError::Spawn {
                runtime: self.binary.display().to_string(),
                source,
            })?;
        if out.status.success() {
            return Ok(out.stdout);
        }
        let raw = String::from_utf8_lossy(&out.stderr);
        let message = match log::errors(&raw) {
            m if m.is_empty() => raw.trim().to_string(),
            m => m,
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
