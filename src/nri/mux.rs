//! NRI's connection multiplexer: two byte streams over one unix socket.
//!
//! Every frame on the socket is `conn id (u32, big endian) | length (u32, big endian) |
//! payload`. Connection 1 carries the plugin's service (the runtime calls it), connection 2
//! the runtime's service (the plugin calls it); each is a byte stream that ttrpc messages are
//! read from ([`super::ttrpc`]), and a message may span frames (see [`frames`] for how berth
//! cuts them).

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
/// The size of the first frame of a message that does not fit in one (see [`frames`]).
const FIRST_FRAME: usize = 4096;
/// The largest frame accepted from a peer.
const MAX_READ: usize = 16 << 20;

/// A message as frames for NRI's Go multiplexer, which hands each frame whole to a reader:
/// ttrpc's `bufio.Reader` (4 KiB) fails with ENOMEM on a bigger one, except where it reads
/// straight into the rest of a message. So a message bigger than 4 KiB goes out as Go's own
/// `bufio.Writer` sends it: a first frame of 4 KiB, then the rest in one frame (the Go side
/// queues at most 256 frames per connection, so small frames are no answer either).
fn frames(conn: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 * HEADER_LEN + data.len());
    let parts = if data.len() > FIRST_FRAME {
        vec![&data[..FIRST_FRAME], &data[FIRST_FRAME..]]
    } else {
        vec![data]
    };
    for part in parts {
        out.extend_from_slice(&conn.to_be_bytes());
        out.extend_from_slice(&(part.len() as u32).to_be_bytes());
        out.extend_from_slice(part);
    }
    out
}

enum Command {
    Send(Vec<u8>),
    Shutdown,
}

/// The sending side: one task writes every message whole, in the order given, so a caller
/// that stops waiting (a deadline) never leaves half a message on the socket.
pub struct MuxWriter {
    tx: mpsc::UnboundedSender<Command>,
    task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl MuxWriter {
    fn new(mut half: OwnedWriteHalf) -> MuxWriter {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Some(cmd) = rx.recv().await {
                match cmd {
                    Command::Send(bytes) => {
                        if half.write_all(&bytes).await.is_err() {
                            return;
                        }
                    }
                    Command::Shutdown => {
                        let _ = half.shutdown().await;
                        return;
                    }
                }
            }
        });
        MuxWriter {
            tx,
            task: std::sync::Mutex::new(Some(task)),
        }
    }

    /// Queues `data` for connection `conn`; fails once the socket is gone.
    pub fn write(&self, conn: u32, data: &[u8]) -> std::io::Result<()> {
        self.tx
            .send(Command::Send(frames(conn, data)))
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))
    }

    /// Shuts the socket down for writing once what is queued is written (the peer reads
    /// EOF); a peer that reads nothing more gets it cut after a second.
    pub async fn shutdown(&self) {
        let _ = self.tx.send(Command::Shutdown);
        let task = self.task.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(mut task) = task
            && tokio::time::timeout(std::time::Duration::from_secs(1), &mut task)
                .await
                .is_err()
        {
            task.abort();
        }
    }
}

/// The receiving side: hands each frame's payload to its connection's channel.
pub struct MuxReader {
    half: OwnedReadHalf,
}

/// Splits a socket into its multiplexed writer and reader.
pub fn split(stream: UnixStream) -> (Arc<MuxWriter>, MuxReader) {
    let (r, w) = stream.into_split();
    (Arc::new(MuxWriter::new(w)), MuxReader { half: r })
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
    async fn big_messages_go_in_two_frames_and_reassemble() {
        let (a, b) = UnixStream::pair().expect("socketpair");
        let (writer, _reader) = split(a);
        let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        writer.write(PLUGIN_SERVICE_CONN, &data).expect("write");
        writer
            .write(PLUGIN_SERVICE_CONN, &data[..100])
            .expect("write");
        writer.shutdown().await;
        // Raw frames as a Go peer reads them: a message's first frame fits its 4 KiB
        // buffer, the rest of the message comes in one frame.
        let mut raw = Vec::new();
        let mut b = b;
        b.read_to_end(&mut raw).await.expect("read");
        let mut payload = Vec::new();
        let mut sizes = Vec::new();
        let mut rest = raw.as_slice();
        while !rest.is_empty() {
            let conn = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
            let len = u32::from_be_bytes([rest[4], rest[5], rest[6], rest[7]]) as usize;
            assert_eq!(conn, PLUGIN_SERVICE_CONN);
            sizes.push(len);
            payload.extend_from_slice(&rest[8..8 + len]);
            rest = &rest[8 + len..];
        }
        assert_eq!(sizes, [4096, 10_000 - 4096, 100]);
        assert_eq!(&payload[..10_000], &data[..]);
        assert_eq!(&payload[10_000..], &data[..100]);
    }

    #[tokio::test]
    async fn payloads_are_routed_by_connection() {
        let (a, b) = UnixStream::pair().expect("socketpair");
        let (writer, _r) = split(a);
        let (_w, reader) = split(b);
        let (tx1, mut rx1) = mpsc::unbounded_channel();
        let (tx2, mut rx2) = mpsc::unbounded_channel();
        let task = tokio::spawn(reader.run(HashMap::from([(1, tx1), (2, tx2)])));
        writer.write(2, b"two").expect("write");
        writer.write(9, b"nobody's").expect("write");
        writer.write(1, b"one").expect("write");
        assert_eq!(rx1.recv().await.as_deref(), Some(&b"one"[..]));
        assert_eq!(rx2.recv().await.as_deref(), Some(&b"two"[..]));
        writer.shutdown().await;
        task.await.expect("reader ends at EOF");
        assert!(rx1.recv().await.is_none());
    }
}
