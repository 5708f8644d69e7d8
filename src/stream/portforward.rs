//! The Kubernetes port-forward protocol over SPDY/3.1 (`portforward.k8s.io`): for each
//! forwarded connection the client opens an error and a data stream that share a
//! `requestID` header, the data stream naming the pod's `port`. berth connects to
//! localhost:port inside the pod's network namespace (from a thread that entered it, never a
//! tokio worker) and copies both ways with half-closes: the client's FIN shuts the
//! connection's write side; the pod's EOF ends the data stream. A connection that fails is
//! reported as text on the error stream.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use super::Streamer;
use super::spdy::conn::{Connection, IncomingStream, StreamWriter};
use super::spdy::frame::RST_PROTOCOL_ERROR;
use crate::cri::v1 as cri;

/// After the pod's side ended, how long the client's side may still send.
const OTHER_SIDE_GRACE: Duration = Duration::from_secs(1);

/// Serves one port-forward connection until the client closes it.
pub async fn serve_spdy(
    streamer: Arc<Streamer>,
    mut conn: Connection,
    req: cri::PortForwardRequest,
) {
    let pod = match streamer.sandboxes.get(&req.pod_sandbox_id) {
        Ok(p) => p,
        Err(e) => {
            tracing::info!(pod = %req.pod_sandbox_id, error = %e, "port-forward: no such pod");
            conn.finish().await;
            return;
        }
    };
    let netns = pod.netns_path();
    let mut waiting: HashMap<String, (Option<IncomingStream>, Option<IncomingStream>)> =
        HashMap::new();
    let mut tasks = JoinSet::new();
    while let Some(stream) = conn.streams.recv().await {
        let Some(request) = stream.header("requestid").map(str::to_string) else {
            let _ = stream.writer.reset(RST_PROTOCOL_ERROR).await;
            continue;
        };
        let entry = waiting.entry(request.clone()).or_default();
        match stream.header("streamtype") {
            Some("error") if entry.0.is_none() => entry.0 = Some(stream),
            Some("data") if entry.1.is_none() => entry.1 = Some(stream),
            _ => {
                let _ = stream.writer.reset(RST_PROTOCOL_ERROR).await;
                continue;
            }
        }
        if entry.0.is_some()
            && entry.1.is_some()
            && let Some((Some(error), Some(data))) = waiting.remove(&request)
        {
            tasks.spawn(forward(netns.clone(), pod.id.clone(), error, data));
        }
        // Reap finished forwards as we go.
        while tasks.try_join_next().is_some() {}
    }
    // The client is gone: stop every forward.
    tasks.shutdown().await;
    conn.finish().await;
}

/// The client's side of one forwarded connection, whatever carries it.
pub(crate) trait ToClient {
    /// Sends data; `false` once the client is gone.
    fn send(&self, data: &[u8]) -> impl std::future::Future<Output = bool> + Send;
    /// The pod's side ended (where the protocol can say so).
    fn close(&self) -> impl std::future::Future<Output = ()> + Send;
}

impl ToClient for StreamWriter {
    async fn send(&self, data: &[u8]) -> bool {
        self.write(data).await.is_ok()
    }
    async fn close(&self) {
        let _ = StreamWriter::close(self).await;
    }
}

/// Copies a forwarded connection both ways with half-closes: the client's end shuts the
/// connection's write side and the pod decides when its side ends; the pod's end is passed
/// on ([`ToClient::close`]) and the client gets [`OTHER_SIDE_GRACE`] to finish.
pub(crate) async fn copy_both_ways(
    tcp: TcpStream,
    mut from_client: tokio::sync::mpsc::Receiver<Vec<u8>>,
    to_client: &impl ToClient,
) {
    let (mut rd, mut wr) = tcp.into_split();
    let up = async move {
        while let Some(chunk) = from_client.recv().await {
            if wr.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = wr.shutdown().await;
    };
    let down = async {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if !to_client.send(&buf[..n]).await {
                        return;
                    }
                }
            }
        }
        to_client.close().await;
    };
    tokio::pin!(up);
    tokio::pin!(down);
    tokio::select! {
        () = &mut up => down.await,
        () = &mut down => {
            let _ = tokio::time::timeout(OTHER_SIDE_GRACE, up).await;
        }
    }
}

/// Connects to localhost:`port` in `netns` (the host's namespace when `None`).
pub(crate) async fn connect(netns: Option<PathBuf>, port: u16) -> std::io::Result<TcpStream> {
    let dial = move || -> std::io::Result<std::net::TcpStream> {
        let timeout = Duration::from_secs(10);
        let v4 = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let v6 = std::net::SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port));
        let s = std::net::TcpStream::connect_timeout(&v4, timeout)
            .or_else(|e| std::net::TcpStream::connect_timeout(&v6, timeout).map_err(|_| e))?;
        s.set_nonblocking(true)?;
        Ok(s)
    };
    let std_stream = match netns {
        Some(ns) => crate::ns::run_in_netns(&ns, dial)
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))??,
        None => tokio::task::spawn_blocking(dial)
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))??,
    };
    let s = TcpStream::from_std(std_stream)?;
    let _ = s.set_nodelay(true);
    Ok(s)
}

async fn forward(netns: Option<PathBuf>, pod: String, error: IncomingStream, data: IncomingStream) {
    let port_header = data.header("port").unwrap_or_default().to_string();
    let port = port_header.parse::<u16>().ok().filter(|p| *p > 0);
    let tcp = match port {
        Some(p) => connect(netns, p).await.map_err(|e| e.to_string()),
        None => Err(format!("invalid port {port_header:?}")),
    };
    let tcp = match tcp {
        Ok(t) => t,
        Err(e) => {
            let msg = format!("error forwarding port {port_header} to pod {pod}: {e}");
            tracing::info!("{msg}");
            let _ = error.writer.write(msg.as_bytes()).await;
            let _ = error.writer.close().await;
            let _ = data.writer.close().await;
            return;
        }
    };
    let IncomingStream {
        data: from_client,
        writer: to_client,
        ..
    } = data;
    copy_both_ways(tcp, from_client, &to_client).await;
    let _ = error.writer.close().await;
}
