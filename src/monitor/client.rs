//! berthd's side of the monitor protocol (tokio).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::proto::{ContainerState, CreateRequest, ErrorKind, Request, Response};
use super::{SOCKET_NAME, open_dir_for, socket_address};

/// How long a request other than `create` may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `create` may take (the OCI runtime sets up the whole container).
pub const CREATE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long starting a monitor may take until its socket answers.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors talking to a monitor.
#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    #[error("running {bin}: {source}")]
    Spawn {
        bin: PathBuf,
        source: std::io::Error,
    },
    #[error("berth-monitor for pod {pod} did not start: {message}")]
    Start { pod: String, message: String },
    #[error("connecting to berth-monitor at {socket}: {source}")]
    Connect {
        socket: PathBuf,
        source: std::io::Error,
    },
    #[error("berth-monitor {op}: {source}")]
    Io {
        op: &'static str,
        source: std::io::Error,
    },
    #[error("berth-monitor did not answer {op} within {after:?}")]
    Timeout { op: &'static str, after: Duration },
    #[error("berth-monitor closed the connection during {op}")]
    Closed { op: &'static str },
    #[error("berth-monitor {op}: unexpected answer: {answer}")]
    Protocol { op: &'static str, answer: String },
    #[error("berth-monitor {op}: {message}")]
    Remote {
        op: &'static str,
        kind: ErrorKind,
        message: String,
    },
    #[error("connection to berth-monitor unusable after an earlier failure")]
    Broken,
}

impl MonitorError {
    /// The monitor does not know the container.
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            MonitorError::Remote {
                kind: ErrorKind::NotFound,
                ..
            }
        )
    }

    /// The monitor process is gone (or unreachable): a new connection may help.
    pub fn is_disconnected(&self) -> bool {
        matches!(
            self,
            MonitorError::Connect { .. }
                | MonitorError::Closed { .. }
                | MonitorError::Io { .. }
                | MonitorError::Broken
        )
    }
}

/// A connection to one pod's monitor. Requests are sequential (`&mut self`); after a timeout
/// or I/O error the connection is unusable ([`MonitorError::Broken`]): connect again.
#[derive(Debug)]
pub struct MonitorClient {
    stream: BufReader<UnixStream>,
    socket: PathBuf,
    timeout: Duration,
    create_timeout: Duration,
    broken: bool,
}

/// Connects to the monitor of `dir`, starting `monitor_bin --pod POD --dir DIR` first when
/// none runs (its launcher returns once the daemon listens; the daemon is not our child).
pub async fn ensure_monitor(
    pod_id: &str,
    dir: &Path,
    monitor_bin: &Path,
) -> Result<MonitorClient, MonitorError> {
    let socket = dir.join(SOCKET_NAME);
    if let Ok(c) = MonitorClient::connect(&socket).await {
        return Ok(c);
    }
    let mut cmd = tokio::process::Command::new(monitor_bin);
    cmd.arg("--pod")
        .arg(pod_id)
        .arg("--dir")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = cmd.spawn().map_err(|source| MonitorError::Spawn {
        bin: monitor_bin.to_path_buf(),
        source,
    })?;
    let out = tokio::time::timeout(START_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| MonitorError::Start {
            pod: pod_id.to_string(),
            message: format!("launcher did not return within {START_TIMEOUT:?}"),
        })?
        .map_err(|source| MonitorError::Spawn {
            bin: monitor_bin.to_path_buf(),
            source,
        })?;
    if !out.status.success() {
        return Err(MonitorError::Start {
            pod: pod_id.to_string(),
            message: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    // Usually listening already; a monitor that was starting concurrently may need a moment.
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        match MonitorClient::connect(&socket).await {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

impl MonitorClient {
    /// Connects to a running monitor's socket.
    pub async fn connect(socket: &Path) -> Result<MonitorClient, MonitorError> {
        let err = |source| MonitorError::Connect {
            socket: socket.to_path_buf(),
            source,
        };
        let dir = open_dir_for(socket).map_err(err)?;
        let addr = socket_address(socket, dir.as_ref(), "self");
        let stream = UnixStream::connect(&addr).await.map_err(err)?;
        Ok(MonitorClient {
            stream: BufReader::new(stream),
            socket: socket.to_path_buf(),
            timeout: REQUEST_TIMEOUT,
            create_timeout: CREATE_TIMEOUT,
            broken: false,
        })
    }

    /// The socket this client is connected to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Changes the timeouts of `create` and of the other requests.
    pub fn set_timeouts(&mut self, create: Duration, other: Duration) {
        self.create_timeout = create;
        self.timeout = other;
    }

    /// Runs the OCI runtime's `create`; returns the container's init pid.
    pub async fn create(&mut self, req: CreateRequest) -> Result<i32, MonitorError> {
        let t = self.create_timeout;
        match self.call("create", &Request::Create(req), t).await? {
            Response::Created { pid } => Ok(pid),
            other => Err(unexpected("create", &other)),
        }
    }

    /// Reopens the container's log file.
    pub async fn reopen(&mut self, id: &str) -> Result<(), MonitorError> {
        self.ok("reopen", &Request::Reopen { id: id.to_string() })
            .await
    }

    /// Closes the container's stdin.
    pub async fn close_stdin(&mut self, id: &str) -> Result<(), MonitorError> {
        self.ok("close_stdin", &Request::CloseStdin { id: id.to_string() })
            .await
    }

    /// Turns this connection into an attach stream of the container (frames of
    /// [`super::attach`]); the stream may already hold output read with the answer.
    pub async fn attach(mut self, id: &str) -> Result<BufReader<UnixStream>, MonitorError> {
        self.ok("attach", &Request::Attach { id: id.to_string() })
            .await?;
        Ok(self.stream)
    }

    /// The containers the monitor holds, with their exits.
    pub async fn state(&mut self) -> Result<Vec<ContainerState>, MonitorError> {
        let t = self.timeout;
        match self.call("state", &Request::State, t).await? {
            Response::State { containers } => Ok(containers),
            other => Err(unexpected("state", &other)),
        }
    }

    /// Drops the monitor's record and fds of a container.
    pub async fn forget(&mut self, id: &str) -> Result<(), MonitorError> {
        self.ok("forget", &Request::Forget { id: id.to_string() })
            .await
    }

    /// Asks the monitor to exit once no container process remains.
    pub async fn shutdown(&mut self) -> Result<(), MonitorError> {
        self.ok("shutdown", &Request::Shutdown).await
    }

    async fn ok(&mut self, op: &'static str, req: &Request) -> Result<(), MonitorError> {
        let t = self.timeout;
        match self.call(op, req, t).await? {
            Response::Ok => Ok(()),
            other => Err(unexpected(op, &other)),
        }
    }

    async fn call(
        &mut self,
        op: &'static str,
        req: &Request,
        after: Duration,
    ) -> Result<Response, MonitorError> {
        if self.broken {
            return Err(MonitorError::Broken);
        }
        // Until the answer is read, a failure leaves the stream in an unknown state.
        self.broken = true;
        let mut line = serde_json::to_vec(req).map_err(|e| MonitorError::Protocol {
            op,
            answer: format!("cannot encode request: {e}"),
        })?;
        line.push(b'\n');
        let exchange = async {
            self.stream
                .get_mut()
                .write_all(&line)
                .await
                .map_err(|source| MonitorError::Io { op, source })?;
            let mut answer = String::new();
            let n = self
                .stream
                .read_line(&mut answer)
                .await
                .map_err(|source| MonitorError::Io { op, source })?;
            if n == 0 || !answer.ends_with('\n') {
                return Err(MonitorError::Closed { op });
            }
            serde_json::from_str::<Response>(&answer).map_err(|e| MonitorError::Protocol {
                op,
                answer: format!("{e}: {}", answer.trim()),
            })
        };
        let resp = tokio::time::timeout(after, exchange)
            .await
            .map_err(|_| MonitorError::Timeout { op, after })??;
        self.broken = false;
        match resp {
            Response::Error { kind, message } => Err(MonitorError::Remote { op, kind, message }),
            other => Ok(other),
        }
    }
}

fn unexpected(op: &'static str, r: &Response) -> MonitorError {
    MonitorError::Protocol {
        op,
        answer: serde_json::to_string(r).unwrap_or_default(),
    }
}
