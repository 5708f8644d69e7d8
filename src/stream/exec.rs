//! A streaming exec, whatever protocol carries it: the process runs through the OCI
//! runtime's `exec` in the foreground (the runtime is its parent and reaper), on a pty
//! (`tty`: berthd holds the master, resizes it and signals the runtime to pass the size on)
//! or on pipes; its stdio is pumped to and from channels that the protocol fills and drains.
//! When the client goes away first, the process is killed and reaped.

use std::future::Future;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::StreamError;
use super::pty;
use crate::container::manager::ContainerManager;
use crate::cri::v1 as cri;
use crate::runtime::ExecChild;

/// How long output is still forwarded after the process ended (a background process that
/// inherited the pipes may hold them open for ever).
const DRAIN: Duration = Duration::from_secs(2);

/// A terminal size as the Kubernetes clients send it on the resize channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct TermSize {
    #[serde(rename = "Width")]
    pub width: u16,
    #[serde(rename = "Height")]
    pub height: u16,
}

/// The client's side of a process's stdio.
#[derive(Default)]
pub struct ProcessIo {
    /// Input; its end (`None`) closes the process's stdin (pipes only: a terminal stays).
    pub stdin: Option<mpsc::Receiver<Vec<u8>>>,
    pub stdout: Option<mpsc::Sender<Vec<u8>>>,
    pub stderr: Option<mpsc::Sender<Vec<u8>>>,
    pub resize: Option<mpsc::Receiver<TermSize>>,
}

/// Runs `req` in its container with `io`; answers its exit code, or kills it when `gone`
/// resolves first (then the error is [`StreamError::ClientGone`]).
pub async fn run(
    containers: &ContainerManager,
    req: &cri::ExecRequest,
    io: ProcessIo,
    gone: impl Future<Output = ()>,
) -> Result<i32, StreamError> {
    let plan = containers.prepare_exec(&req.container_id, req.cmd.clone(), req.tty)?;
    let ProcessIo {
        stdin,
        stdout,
        stderr,
        resize,
    } = io;
    let io_err = |context: &'static str| move |source| StreamError::Io { context, source };
    let mut outputs: Vec<JoinHandle<()>> = Vec::new();
    let mut inputs: Vec<JoinHandle<()>> = Vec::new();
    let mut child: ExecChild;
    if req.tty {
        let (master, slave) = pty::open_pty().map_err(io_err("open a pty"))?;
        let stdio = [
            Stdio::from(slave.try_clone().map_err(io_err("dup the pty"))?),
            Stdio::from(slave.try_clone().map_err(io_err("dup the pty"))?),
            Stdio::from(slave),
        ];
        child = plan.runtime.spawn_exec(
            &plan.container_id,
            &plan.process_file,
            &plan.pid_file,
            stdio,
        )?;
        let master = Arc::new(master);
        // The terminal is read even when no one wants its output, or the process would block.
        let m = master.clone();
        outputs.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                match m.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if let Some(tx) = &stdout {
                            let _ = tx.send(buf[..n].to_vec()).await;
                        }
                    }
                }
            }
        }));
        if let Some(mut rx) = stdin {
            let m = master.clone();
            inputs.push(tokio::spawn(async move {
                while let Some(data) = rx.recv().await {
                    if m.write_all(&data).await.is_err() {
                        break;
                    }
                }
            }));
        }
        if let Some(mut rx) = resize {
            let m = master.clone();
            let runtime_pid = child.runtime_pid();
            inputs.push(tokio::spawn(async move {
                while let Some(size) = rx.recv().await {
                    if let Err(e) = m.resize(size.width, size.height) {
                        tracing::debug!(error = %e, "resize failed");
                        continue;
                    }
                    // The runtime copies the size of its stdio terminal to the container's
                    // console on SIGWINCH.
                    if let Some(pid) = runtime_pid.and_then(|p| i32::try_from(p).ok()) {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid),
                            nix::sys::signal::Signal::SIGWINCH,
                        );
                    }
                }
            }));
        }
    } else {
        let piped = |on: bool| if on { Stdio::piped() } else { Stdio::null() };
        let stdio = [
            piped(stdin.is_some()),
            piped(stdout.is_some()),
            piped(stderr.is_some()),
        ];
        child = plan.runtime.spawn_exec(
            &plan.container_id,
            &plan.process_file,
            &plan.pid_file,
            stdio,
        )?;
        if let (Some(out), Some(tx)) = (child.stdout(), stdout) {
            outputs.push(tokio::spawn(pump(out, tx)));
        }
        if let (Some(err), Some(tx)) = (child.stderr(), stderr) {
            outputs.push(tokio::spawn(pump(err, tx)));
        }
        if let (Some(mut w), Some(mut rx)) = (child.stdin(), stdin) {
            inputs.push(tokio::spawn(async move {
                while let Some(data) = rx.recv().await {
                    if w.write_all(&data).await.is_err() {
                        break;
                    }
                }
                // Dropping `w` closes the process's stdin.
            }));
        }
    }
    let waited = tokio::select! {
        code = child.wait() => Some(code),
        () = gone => None,
    };
    for t in &inputs {
        t.abort();
    }
    let code = match waited {
        Some(code) => code.map_err(io_err("wait for the exec"))?,
        None => {
            let _ = child.kill().await;
            for t in &outputs {
                t.abort();
            }
            return Err(StreamError::ClientGone);
        }
    };
    for t in outputs {
        let abort = t.abort_handle();
        if tokio::time::timeout(DRAIN, t).await.is_err() {
            abort.abort();
        }
    }
    drop(plan);
    Ok(code)
}

async fn pump(mut r: impl AsyncRead + Unpin, tx: mpsc::Sender<Vec<u8>>) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if tx.send(buf[..n].to_vec()).await.is_err() {
                    // Nobody reads: keep draining so that the process does not block.
                    continue;
                }
            }
        }
    }
}
