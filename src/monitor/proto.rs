//! The berthd ↔ berth-monitor protocol (documented in `proto/monitor.md`).
//!
//! A connection carries requests from berthd and responses from the monitor, one JSON
//! object per line (`\n`-terminated), strictly alternating: berthd writes one request line,
//! the monitor answers with exactly one response line.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The longest request line the monitor accepts (bytes, without the newline).
pub const MAX_LINE: usize = 1 << 20;

/// A request from berthd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Run `<runtime> create` for a container with the monitor's pipes as its stdio.
    Create(CreateRequest),
    /// Reopen the container's log file (after the kubelet rotated it).
    Reopen { id: String },
    /// Close the container's stdin (stdin_once semantics).
    CloseStdin { id: String },
    /// Turn this connection into an attach stream of the container (see
    /// [`super::attach`]).
    Attach { id: String },
    /// The containers the monitor knows about.
    State,
    /// Drop everything the monitor holds of a container.
    Forget { id: String },
    /// Exit once no container process remains.
    Shutdown,
}

/// What `Create` needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateRequest {
    /// The container id (also the runtime's container id).
    pub id: String,
    /// The OCI runtime binary (runc, crun, …).
    pub runtime: PathBuf,
    /// The runtime's state dir (`--root`).
    pub runtime_root: PathBuf,
    /// Pass `--systemd-cgroup` to the runtime.
    #[serde(default)]
    pub systemd_cgroup: bool,
    /// The OCI bundle (holds `config.json`); the runtime writes `init.pid` there.
    pub bundle: PathBuf,
    /// The CRI log file.
    pub log_path: PathBuf,
    /// Where the exit record ([`ExitInfo`] as JSON) is written when the container exits.
    pub exit_file: PathBuf,
    /// Files read at exit for an `oom_kill N` line with N > 0 (cgroup v1
    /// `memory.oom_control`, v2 `memory.events`).
    #[serde(default)]
    pub cgroup_oom_files: Vec<PathBuf>,
    /// Keep a pipe to the container's stdin.
    #[serde(default)]
    pub stdin: bool,
    /// Give the container a terminal (the runtime's `--console-socket`).
    #[serde(default)]
    pub tty: bool,
    /// How long the runtime's `create` may take, in milliseconds: then the monitor kills it
    /// (its whole process group) and answers `timeout`. 0 (or absent): no limit.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub timeout_ms: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A response of the monitor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    /// The request was carried out.
    Ok,
    /// `Create` succeeded: the container's init process (created, not started).
    Created { pid: i32 },
    /// The answer to `State`.
    State { containers: Vec<ContainerState> },
    /// The request failed.
    Error { kind: ErrorKind, message: String },
}

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The line was not a valid request.
    BadRequest,
    /// No container with that id.
    NotFound,
    /// A container with that id exists already.
    AlreadyExists,
    /// The OCI runtime failed (the message holds its log).
    Runtime,
    /// A feature the monitor does not have.
    Unsupported,
    /// The monitor is shutting down.
    ShuttingDown,
    /// A system call or file failed.
    Io,
    /// The OCI runtime did not finish within the request's timeout (it was killed).
    Timeout,
}

/// One container of `State`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerState {
    pub id: String,
    /// The host pid of the container's init process.
    pub pid: i32,
    /// Set once the init process exited and its output was drained.
    pub exited: Option<ExitInfo>,
}

/// How a container's init process ended (also the content of the exit file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitInfo {
    /// The exit status, or 128 + signal when a signal killed it.
    pub exit_code: i32,
    /// The signal that killed it.
    pub signal: Option<i32>,
    /// When it was reaped, in nanoseconds since the Unix epoch.
    pub finished_at: i64,
    /// Its cgroup recorded an OOM kill.
    pub oom_killed: bool,
}

impl Response {
    pub fn error(kind: ErrorKind, message: impl Into<String>) -> Response {
        Response::Error {
            kind,
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format() {
        let r: Request = serde_json::from_str(r#"{"op":"reopen","id":"a"}"#).unwrap();
        assert_eq!(r, Request::Reopen { id: "a".into() });
        assert_eq!(
            serde_json::to_string(&Request::State).unwrap(),
            r#"{"op":"state"}"#
        );
        let c: Request = serde_json::from_str(
            r#"{"op":"create","id":"c","runtime":"runc","runtime_root":"/r","bundle":"/b",
                "log_path":"/l","exit_file":"/e"}"#,
        )
        .unwrap();
        let Request::Create(c) = c else {
            panic!("not a create")
        };
        assert!(!c.tty && !c.stdin && !c.systemd_cgroup && c.cgroup_oom_files.is_empty());
        assert_eq!(c.timeout_ms, 0);
        // No limit is not sent (an older monitor needs no new field for it).
        assert!(
            !serde_json::to_string(&Request::Create(c.clone()))
                .unwrap()
                .contains("timeout_ms")
        );
        let limited = Request::Create(CreateRequest {
            timeout_ms: 3000,
            ..c
        });
        let text = serde_json::to_string(&limited).unwrap();
        assert!(text.contains(r#""timeout_ms":3000"#), "{text}");
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), limited);
        assert_eq!(
            serde_json::to_string(&Response::error(ErrorKind::Timeout, "x")).unwrap(),
            r#"{"result":"error","kind":"timeout","message":"x"}"#
        );
        assert_eq!(
            serde_json::to_string(&Response::Created { pid: 7 }).unwrap(),
            r#"{"result":"created","pid":7}"#
        );
        assert_eq!(
            serde_json::to_string(&Response::error(ErrorKind::NotFound, "x")).unwrap(),
            r#"{"result":"error","kind":"not_found","message":"x"}"#
        );
        // Unknown fields are ignored (a newer berthd may talk to an older monitor), unknown
        // operations are not.
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"state","x":1}"#).unwrap(),
            Request::State
        );
        assert!(serde_json::from_str::<Request>(r#"{"op":"attach"}"#).is_err());
    }
}
