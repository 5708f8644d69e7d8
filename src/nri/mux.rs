//! NRI's connection multiplexer: two byte streams over one unix socket.
//!
//! Every frame on the socket is `conn id (u32, big endian) | length (u32, big endian) |
//! payload`. Connection 1 carries the plugin's service (the runtime calls it), connection 2
//! the runtime's service (the plugin calls it); each is a byte stream that ttrpc messages are
//! read from ([`super::ttrpc`]), and a message may span frames.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;

/// The connection the plugin serves its `Plugin` service on.
pub const PLUGIN_SERVICE_CONN: u32 = 1;
/// The connection the runtime serves its `Runtime` service on.
pub const RUNTIME_SERVICE_CONN: u32 = 2;

const HEADER_LEN: usize = 8;
/// The largest frame written (NRI's own: a ttrpc header and its largest message).
const MAX_WRITE: usize = 10 + (4 << 20);
/// The largest frame accepted from a peer.
const MAX_READ: usize = 16 << 20;

/// The sending side: frames for any connection, one writer at a time.
pub struct MuxWriter {
    half: tokio::sync::Mutex<OwnedWriteHalf>,
}

impl MuxWriter {
    /// Writes `data` to connection `conn`, in as many frames as it takes.
    pub async fn write(&self, conn: u32, data: &[u8]) -> std::io::Result<()> {
        let mut half = self.half.lock().await;
        for chunk in data.chunks(MAX_WRITE) {
            let mut frame = Vec::with_capacity(HEADER_LEN + chunk.len());
            frame.extend_from_slice(&conn.to_be_bytes());
            frame.extend_from_slice(&(chunk.len() as u32).to_be_bytes());
            frame.extend_from_slice(chunk);
            half.write_all(&frame).await?;
        }
        Ok(())
    }

    /// Shuts the socket down for writing (the peer reads EOF).
    pub async fn shutdown(&self) {
        let _ = self.half.lock().await.shutdown().await;
    }
}

/// The receiving side: hands each frame's payload to its connection's channel.
pub struct MuxReader {
    half: OwnedReadHalf,
}

/// Splits a socket into its multiplexed writer and reader.
pub fn split(stream: UnixStream) -> (Arc<MuxWriter>, MuxReader) {
    let (r, w) = stream.into_split();
    (
        Arc::new(MuxWriter {
            half: tokio::sync::Mutex::new(w),
        }),
        MuxReader { half: r },
    )
}

impl MuxReader {
    /// Reads frames until the socket ends or a frame is malformed, routing each payload to
    /// its connection; frames for other connections are dropped. The channels close when
    /// this returns, which is how the connections learn that the socket is gone.
    pub async fn run(mut self, routes: HashMap<u32, mpsc::UnboundedSender<Bytes>>) {
        let mut header = [0u8; HEADER_LEN];
        loop {
            if self.half.read_exact(&mut header).await.is_err() {
                return;
            }
            let conn = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
            let len = u32::from_be_bytes([header[4], header[5], header[6], header[7]]) as usize;
            if len > MAX_READ {
                tracing::warn!(conn, len, "NRI: oversized frame; closing the connection");
                return;
            }
            let mut payload = vec![0u8; len];
            if self.half.read_exact(&mut payload).await.is_err() {
                return;
            }
            if let Some(tx) = routes.get(&conn) {
                let _ = tx.send(Bytes::from(payload));
            }
        }
    }
}
