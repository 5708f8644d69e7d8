//! The Kubernetes remotecommand protocol (exec and attach) over SPDY/3.1, as
//! `k8s.io/apimachinery/pkg/util/remotecommand` and the kubelet's streaming server speak it:
//! the client opens one stream per `streamType` (error, stdin, stdout, stderr, resize); berth
//! waits for the streams the request needs, runs the process, and reports how it ended on
//! the error stream: a `metav1.Status` JSON from `v4.channel.k8s.io` on (`NonZeroExitCode`
//! with an `ExitCode` cause), plain text before. What does not depend on the transport
//! ([`Target`], [`status_message`], [`resize_events`]) is shared with the
//! WebSocket form (`super::websocket::remotecommand`).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::attach;
use super::exec::{self, ProcessIo, TermSize};
use super::spdy::conn::{Connection, IncomingStream, StreamWriter};
use super::spdy::frame::RST_REFUSED_STREAM;
use super::{StreamError, Streamer};
use crate::cri::v1 as cri;

/// The remotecommand protocols berth speaks over SPDY, newest first (v5 adds nothing over
/// SPDY: stdin's end is the stream's FIN already).
pub const SPDY_PROTOCOLS: [&str; 5] = [
    "v5.channel.k8s.io",
    "v4.channel.k8s.io",
    "v3.channel.k8s.io",
    "v2.channel.k8s.io",
    "channel.k8s.io",
];

/// How long the client has to open the streams the request needs.
const STREAM_CREATION_TIMEOUT: Duration = Duration::from_secs(30);

/// The first protocol the client offers (in its order of preference) that berth speaks. The
/// header may repeat and may hold comma-separated lists.
pub fn negotiate<'a>(offered: &[String], supported: &[&'a str]) -> Option<&'a str> {
    offered
        .iter()
        .flat_map(|h| h.split(','))
        .map(str::trim)
        .find_map(|p| supported.iter().find(|s| **s == p).copied())
}

/// The streams of one exec or attach.
#[derive(Default)]
struct Streams {
    error: Option<IncomingStream>,
    stdin: Option<IncomingStream>,
    stdout: Option<IncomingStream>,
    stderr: Option<IncomingStream>,
    resize: Option<IncomingStream>,
}

impl Streams {
    fn complete(&self, w: &Wanted, protocol: &str) -> bool {
        self.error.is_some()
            && (!w.stdin || self.stdin.is_some())
            && (!w.stdout || self.stdout.is_some())
            && (!w.stderr || w.tty || self.stderr.is_some())
            && (!w.tty || protocol_resizes(protocol) == self.resize.is_some())
    }
}

fn protocol_resizes(protocol: &str) -> bool {
    matches!(
        protocol,
        "v3.channel.k8s.io" | "v4.channel.k8s.io" | "v5.channel.k8s.io"
    )
}

/// Whether the protocol reports the end as a `metav1.Status` JSON (v4 on, also in base64).
fn reports_status(protocol: &str) -> bool {
    protocol.starts_with("v4.") || protocol.starts_with("v5.")
}

/// What a remotecommand connection runs.
pub enum Target {
    Exec(cri::ExecRequest),
    Attach(cri::AttachRequest),
}

/// Which of its stdio a request wants.
pub struct Wanted {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub tty: bool,
}

impl Target {
    pub fn wanted(&self) -> Wanted {
        let (stdin, stdout, stderr, tty) = match self {
            Target::Exec(r) => (r.stdin, r.stdout, r.stderr, r.tty),
            Target::Attach(r) => (r.stdin, r.stdout, r.stderr, r.tty),
        };
        Wanted {
            stdin,
            stdout,
            stderr,
            tty,
        }
    }

    pub fn container_id(&self) -> &str {
        match self {
            Target::Exec(r) => &r.container_id,
            Target::Attach(r) => &r.container_id,
        }
    }

    /// The command (empty for an attach), for the status message.
    pub fn cmd(&self) -> &[String] {
        match self {
            Target::Exec(r) => &r.cmd,
            Target::Attach(_) => &[],
        }
    }

    /// Runs the exec or the attach with `io` until it ends or `gone` resolves.
    pub async fn run(
        &self,
        streamer: &Streamer,
        io: ProcessIo,
        gone: impl std::future::Future<Output = ()>,
    ) -> Result<i32, StreamError> {
        match self {
            Target::Exec(req) => exec::run(&streamer.containers, req, io, gone).await,
            Target::Attach(req) => attach::run(&streamer.containers, req, io, gone).await,
        }
    }
}

/// Serves one exec or attach over an upgraded SPDY connection.
pub async fn serve(
    streamer: Arc<Streamer>,
    mut conn: Connection,
    protocol: &'static str,
    target: Target,
) {
    let wanted = target.wanted();
    let Some(mut streams) = collect(&mut conn, &wanted, protocol).await else {
        conn.finish().await;
        return;
    };
    let Some(error) = streams.error.take() else {
        conn.finish().await;
        return;
    };
    let mut io = ProcessIo::default();
    let mut senders = Vec::new();
    if let Some(s) = streams.stdin.take() {
        io.stdin = Some(s.data);
    }
    for (stream, slot) in [
        (streams.stdout.take(), &mut io.stdout),
        (streams.stderr.take(), &mut io.stderr),
    ] {
        if let Some(s) = stream {
            let (tx, task) = forward_spdy_output(s.writer);
            *slot = Some(tx);
            senders.push(task);
        }
    }
    if let Some(s) = streams.resize.take() {
        io.resize = Some(resize_events(s.data));
    }
    let mut gone = conn.gone_signal();
    let result = target.run(&streamer, io, gone.wait()).await;
    if let Err(StreamError::ClientGone) = result {
        return;
    }
    // Every output is sent and closed before the status.
    for t in senders {
        let _ = t.await;
    }
    let _ = error
        .writer
        .write(&status_message(protocol, target.cmd(), &result))
        .await;
    let _ = error.writer.close().await;
    if let Err(e) = &result {
        tracing::info!(container = %target.container_id(), error = %e, "exec or attach failed");
    }
    conn.finish().await;
}

/// Waits for the streams `wanted` needs; `None` when the client goes away or is too slow.
async fn collect(conn: &mut Connection, wanted: &Wanted, protocol: &str) -> Option<Streams> {
    let mut s = Streams::default();
    let deadline = tokio::time::sleep(STREAM_CREATION_TIMEOUT);
    tokio::pin!(deadline);
    while !s.complete(wanted, protocol) {
        let stream = tokio::select! {
            st = conn.streams.recv() => st?,
            () = &mut deadline => {
                tracing::debug!("the client did not open its streams in time");
                return None;
            }
        };
        let kind = stream.header("streamtype").unwrap_or_default().to_string();
        let slot = match kind.as_str() {
            "error" => &mut s.error,
            "stdin" => &mut s.stdin,
            "stdout" => &mut s.stdout,
            "stderr" => &mut s.stderr,
            "resize" => &mut s.resize,
            _ => {
                let _ = stream.writer.reset(RST_REFUSED_STREAM).await;
                continue;
            }
        };
        if slot.is_some() {
            let _ = stream.writer.reset(RST_REFUSED_STREAM).await;
            continue;
        }
        *slot = Some(stream);
    }
    Some(s)
}

/// A channel whose data goes out on `writer`; the stream is closed (FIN) once every sender
/// is dropped.
fn forward_spdy_output(
    writer: StreamWriter,
) -> (mpsc::Sender<Vec<u8>>, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(16);
    let task = tokio::spawn(async move {
        while let Some(data) = rx.recv().await {
            if writer.write(&data).await.is_err() {
                return;
            }
        }
        let _ = writer.close().await;
    });
    (tx, task)
}

/// Decodes the resize stream: JSON objects one after the other.
pub fn resize_events(mut data: mpsc::Receiver<Vec<u8>>) -> mpsc::Receiver<TermSize> {
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        let mut buf = Vec::new();
        while let Some(chunk) = data.recv().await {
            buf.extend_from_slice(&chunk);
            let mut it = serde_json::Deserializer::from_slice(&buf).into_iter::<TermSize>();
            let mut used = 0;
            loop {
                match it.next() {
                    Some(Ok(size)) => {
                        used = it.byte_offset();
                        if tx.send(size).await.is_err() {
                            return;
                        }
                    }
                    Some(Err(e)) if e.is_eof() => break,
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "bad resize event");
                        return;
                    }
                    None => {
                        used = buf.len();
                        break;
                    }
                }
            }
            buf.drain(..used);
        }
    });
    rx
}

/// What the error stream carries at the end of an exec.
pub fn status_message(
    protocol: &str,
    cmd: &[String],
    result: &Result<i32, StreamError>,
) -> Vec<u8> {
    let v4 = reports_status(protocol);
    match result {
        Ok(0) if v4 => serde_json::json!({"metadata": {}, "status": "Success"})
            .to_string()
            .into_bytes(),
        Ok(0) => Vec::new(),
        Ok(code) if v4 => serde_json::json!({
            "metadata": {},
            "status": "Failure",
            "message": format!(
                "command terminated with non-zero exit code: error executing command {cmd:?}, exit code {code}"
            ),
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
        })
        .to_string()
        .into_bytes(),
        Ok(code) => format!("command terminated with non-zero exit code: exit status {code}")
            .into_bytes(),
        Err(e) if v4 => serde_json::json!({
            "metadata": {},
            "status": "Failure",
            "message": e.to_string(),
            "reason": "InternalError",
            "code": 500,
        })
        .to_string()
        .into_bytes(),
        Err(e) => e.to_string().into_bytes(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_follows_the_client() {
        let offered = vec![
            "v9.channel.k8s.io".to_string(),
            "v4.channel.k8s.io, v3.channel.k8s.io".to_string(),
        ];
        assert_eq!(
            negotiate(&offered, &SPDY_PROTOCOLS),
            Some("v4.channel.k8s.io")
        );
        assert_eq!(
            negotiate(&["v5.channel.k8s.io".to_string()], &SPDY_PROTOCOLS),
            Some("v5.channel.k8s.io")
        );
        assert_eq!(
            negotiate(&["channel.k8s.io".to_string()], &SPDY_PROTOCOLS),
            Some("channel.k8s.io")
        );
        assert_eq!(negotiate(&["x".to_string()], &SPDY_PROTOCOLS), None);
    }

    #[test]
    fn statuses() {
        let cmd = vec!["sh".to_string()];
        let ok: serde_json::Value =
            serde_json::from_slice(&status_message("v4.channel.k8s.io", &cmd, &Ok(0)))
                .expect("json");
        assert_eq!(ok["status"], "Success");
        let bad: serde_json::Value =
            serde_json::from_slice(&status_message("v4.channel.k8s.io", &cmd, &Ok(3)))
                .expect("json");
        assert_eq!(bad["reason"], "NonZeroExitCode");
        assert_eq!(bad["details"]["causes"][0]["reason"], "ExitCode");
        assert_eq!(bad["details"]["causes"][0]["message"], "3");
        assert!(status_message("v2.channel.k8s.io", &cmd, &Ok(0)).is_empty());
    }
}
