//! The streaming server of Exec, Attach and PortForward: the RPCs store their request under
//! a single-use token ([`token`]) and answer a URL of this server; a client that opens that
//! URL within a minute gets the stream. [`http`] is the HTTP/1.1 server and its upgrades,
//! [`spdy`] SPDY/3.1, [`remotecommand`] the exec/attach protocol on top, [`portforward`]
//! the port-forward protocol, [`websocket`] both over WebSocket (channels, or SPDY
//! tunnelled); [`exec`] the processes behind them, [`attach`] the containers' stdio from
//! berth-monitor and [`pty`] their terminals.

pub mod attach;
pub mod exec;
pub mod http;
pub mod portforward;
pub mod pty;
pub mod remotecommand;
pub mod spdy;
pub mod token;
pub mod websocket;

use std::net::SocketAddr;
use std::sync::Arc;

use crate::container::manager::{ContainerError, ContainerManager};
use crate::cri::v1 as cri;
use crate::runtime::RuntimeError;
use crate::sandbox::{Phase as PodPhase, SandboxError, SandboxManager};
use token::{Pending, TokenError, Tokens};

/// Errors of the streaming RPCs and streams.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error(transparent)]
    Container(#[from] ContainerError),
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("{0}")]
    Invalid(String),
    #[error("pod sandbox {0} is not ready")]
    PodNotReady(String),
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("{context}: {source}")]
    Io {
        context: &'static str,
        source: std::io::Error,
    },
    #[error("the client went away")]
    ClientGone,
}

/// The streaming server's state: where it listens, its tokens, the managers it works with.
pub struct Streamer {
    addr: SocketAddr,
    tokens: Tokens,
    pub containers: Arc<ContainerManager>,
    pub sandboxes: Arc<SandboxManager>,
}

fn check_stdio(stdin: bool, stdout: bool, stderr: bool, tty: bool) -> Result<(), StreamError> {
    if !(stdin || stdout || stderr) {
        return Err(StreamError::Invalid(
            "one of stdin, stdout and stderr must be requested".to_string(),
        ));
    }
    if tty && stderr {
        return Err(StreamError::Invalid(
            "tty and stderr cannot both be requested: a terminal has one output".to_string(),
        ));
    }
    Ok(())
}

impl Streamer {
    pub fn new(
        addr: SocketAddr,
        containers: Arc<ContainerManager>,
        sandboxes: Arc<SandboxManager>,
    ) -> Streamer {
        Streamer {
            addr,
            tokens: Tokens::new(token::TOKEN_TTL),
            containers,
            sandboxes,
        }
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn url(&self, pending: Pending) -> Result<String, StreamError> {
        let kind = pending.kind();
        let token = self.tokens.insert(pending)?;
        Ok(format!("http://{}/{kind}/{token}", self.addr))
    }

    /// Exec: validates the request and answers the URL of its stream.
    pub fn exec_url(&self, mut req: cri::ExecRequest) -> Result<String, StreamError> {
        req.container_id = self
            .containers
            .get_running(&req.container_id, "exec needs a running container")?
            .id;
        if req.cmd.is_empty() {
            return Err(StreamError::Invalid("exec needs a command".to_string()));
        }
        check_stdio(req.stdin, req.stdout, req.stderr, req.tty)?;
        self.url(Pending::Exec(req))
    }

    /// Attach: validates the request and answers the URL of its stream.
    pub fn attach_url(&self, mut req: cri::AttachRequest) -> Result<String, StreamError> {
        req.container_id = self
            .containers
            .get_running(&req.container_id, "attach needs a running container")?
            .id;
        check_stdio(req.stdin, req.stdout, req.stderr, req.tty)?;
        self.url(Pending::Attach(req))
    }

    /// PortForward: validates the request and answers the URL of its stream.
    pub fn port_forward_url(
        &self,
        mut req: cri::PortForwardRequest,
    ) -> Result<String, StreamError> {
        let rec = self.sandboxes.get(&req.pod_sandbox_id)?;
        if rec.phase != PodPhase::Ready {
            return Err(StreamError::PodNotReady(rec.id));
        }
        if let Some(p) = req.port.iter().find(|p| !(1..=65535).contains(*p)) {
            return Err(StreamError::Invalid(format!("port {p} is out of range")));
        }
        req.pod_sandbox_id = rec.id;
        self.url(Pending::PortForward(req))
    }

    /// Whether a token waits for a stream of `kind` (see [`Tokens::contains`]).
    pub fn has(&self, kind: &str, token: &str) -> bool {
        self.tokens.contains(kind, token)
    }

    /// Takes the request of a token (see [`Tokens::take`]).
    pub fn take(&self, kind: &str, token: &str) -> Option<Pending> {
        self.tokens.take(kind, token)
    }
}
