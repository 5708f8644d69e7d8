//! Exec and attach over WebSocket channels, as the kubelet's streaming server serves them:
//! stdin arrives on channel 0 (its end, in v5, as a close of channel 0), the terminal's size
//! on channel 4; output goes out on 1 and 2, and the end on 3 (a `metav1.Status` JSON from
//! v4 on, text on failure before). An empty message on the lowest output channel tells the
//! client the streams are ready; after the status berth closes the connection normally,
//! which is the end of every stream for the client.

use std::sync::Arc;

use tokio::sync::mpsc;

use super::{ChannelConn, Codec, Socket};
use crate::stream::StreamError;
use crate::stream::Streamer;
use crate::stream::exec::ProcessIo;
use crate::stream::remotecommand::{Target, resize_events, status_message};

pub const STDIN: u8 = 0;
pub const STDOUT: u8 = 1;
pub const STDERR: u8 = 2;
pub const ERROR: u8 = 3;
pub const RESIZE: u8 = 4;

/// Serves one exec or attach on `ws`, speaking `protocol` ("" when none was negotiated).
pub async fn serve(
    streamer: Arc<Streamer>,
    ws: Socket,
    protocol: &'static str,
    codec: Codec,
    target: Target,
) {
    let wanted = target.wanted();
    let mut readers: Vec<Option<mpsc::Sender<Vec<u8>>>> = vec![None; usize::from(RESIZE) + 1];
    let mut io = ProcessIo::default();
    if wanted.stdin {
        let (tx, rx) = mpsc::channel(16);
        readers[usize::from(STDIN)] = Some(tx);
        io.stdin = Some(rx);
    }
    if wanted.tty {
        let (tx, rx) = mpsc::channel(4);
        readers[usize::from(RESIZE)] = Some(tx);
        io.resize = Some(resize_events(rx));
    }
    let conn = ChannelConn::start(ws, codec, protocol == "v5.channel.k8s.io", readers);
    let ready_on = if wanted.stdout {
        STDOUT
    } else if wanted.stderr {
        STDERR
    } else {
        ERROR
    };
    if conn.out.send(ready_on, Vec::new()).await.is_err() {
        return;
    }
    let mut outputs = Vec::new();
    if wanted.stdout {
        let (tx, task) = conn.out.channel_sender(STDOUT);
        io.stdout = Some(tx);
        outputs.push(task);
    }
    if wanted.stderr && !wanted.tty {
        let (tx, task) = conn.out.channel_sender(STDERR);
        io.stderr = Some(tx);
        outputs.push(task);
    }
    let result = target.run(&streamer, io, conn.gone()).await;
    if let Err(StreamError::ClientGone) = result {
        return;
    }
    // Every output is sent before the status.
    for t in outputs {
        let _ = t.await;
    }
    let status = status_message(protocol, target.cmd(), &result);
    if !status.is_empty() {
        let _ = conn.out.send(ERROR, status).await;
    }
    if let Err(e) = &result {
        tracing::info!(container = %target.container_id(), error = %e, "exec or attach failed");
    }
    conn.finish().await;
}
