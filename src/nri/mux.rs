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
/// The largest frame payload written. NRI's Go multiplexer hands each frame whole to a
/// reader whose buffer may be as small as 4 KiB (ttrpc's `bufio.Reader`) and fails with
/// ENOMEM on a bigger one, so messages go out in frames of at most that.
const MAX_WRITE: usize = 4096;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_stay_small_and_reassemble() {
        let (a, b) = UnixStream::pair().expect("socketpair");
        let (writer, _reader) = split(a);
        let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        writer
            .write(PLUGIN_SERVICE_CONN, &data)
            .await
            .expect("write");
        writer.shutdown().await;
        // Raw frames as a Go peer reads them: none bigger than its 4 KiB buffer.
        let mut raw = Vec::new();
        let mut b = b;
        b.read_to_end(&mut raw).await.expect("read");
        let mut payload = Vec::new();
        let mut rest = raw.as_slice();
        while !rest.is_empty() {
            let conn = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
            let len = u32::from_be_bytes([rest[4], rest[5], rest[6], rest[7]]) as usize;
            assert_eq!(conn, PLUGIN_SERVICE_CONN);
            assert!(len <= 4096, "a frame of {len} bytes");
            payload.extend_from_slice(&rest[8..8 + len]);
            rest = &rest[8 + len..];
        }
        assert_eq!(payload, data);
    }

    #[tokio::test]
    async fn payloads_are_routed_by_connection() {
        let (a, b) = UnixStream::pair().expect("socketpair");
        let (writer, _r) = split(a);
        let (_w, reader) = split(b);
        let (tx1, mut rx1) = mpsc::unbounded_channel();
        let (tx2, mut rx2) = mpsc::unbounded_channel();
        let task = tokio::spawn(reader.run(HashMap::from([(1, tx1), (2, tx2)])));
        writer.write(2, b"two").await.expect("write");
        writer.write(9, b"nobody's").await.expect("write");
        writer.write(1, b"one").await.expect("write");
        assert_eq!(rx1.recv().await.as_deref(), Some(&b"one"[..]));
        assert_eq!(rx2.recv().await.as_deref(), Some(&b"two"[..]));
        writer.shutdown().await;
        task.await.expect("reader ends at EOF");
        assert!(rx1.recv().await.is_none());
    }
}
