//! A SPDY/3.1 server connection over any byte stream (the upgraded HTTP/1.1 connection): a
//! reader task that parses frames and hands each stream the client opens to the protocol on
//! top ([`IncomingStream`]: its headers, its incoming data, a writer), and a writer task that
//! sends the frames of every stream in order.
//!
//! Every stream the client opens is answered with SYN_REPLY at once (the Kubernetes clients
//! wait for it). PINGs are answered; SETTINGS, WINDOW_UPDATE and HEADERS are ignored (the
//! Kubernetes clients, `moby/spdystream`, do no flow control: TCP's is the back-pressure). A
//! frame that cannot be parsed, a stream id reused or data on a stream never opened closes
//! the connection.

use std::collections::HashMap;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

use super::frame::{
    self, FLAG_FIN, Frame, HeaderDecoder, HeaderEncoder, Headers, RST_PROTOCOL_ERROR,
    RST_REFUSED_STREAM,
};

/// How many streams one connection may open (an exec needs 5, a port-forward 2 per port).
const MAX_STREAMS: usize = 1024;
/// The largest piece of data sent in one DATA frame.
pub const MAX_DATA_CHUNK: usize = 32 * 1024;
/// How long a finished connection waits for the client to close its side.
const LINGER: Duration = Duration::from_secs(5);

enum Out {
    Frame(Frame),
    /// Send GOAWAY, flush, close the write side.
    Finish,
}

/// A stream the client opened.
pub struct IncomingStream {
    pub id: u32,
    pub headers: Headers,
    /// The client's data; `None` once it sent FIN or reset the stream (or the connection
    /// ended).
    pub data: mpsc::Receiver<Vec<u8>>,
    pub writer: StreamWriter,
}

impl IncomingStream {
    /// The first value of a header (names compare case-insensitively).
    pub fn header(&self, name: &str) -> Option<&str> {
        frame::header(&self.headers, name)
    }
}

/// The connection went away: nothing can be sent any more.
#[derive(Debug, thiserror::Error)]
#[error("the SPDY connection is closed")]
pub struct Closed;

/// Sends data on one stream.
#[derive(Clone)]
pub struct StreamWriter {
    id: u32,
    tx: mpsc::Sender<Out>,
}

impl StreamWriter {
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Sends `data` in DATA frames of at most [`MAX_DATA_CHUNK`] bytes.
    pub async fn write(&self, data: &[u8]) -> Result<(), Closed> {
        for chunk in data.chunks(MAX_DATA_CHUNK) {
            self.tx
                .send(Out::Frame(Frame::Data {
                    stream_id: self.id,
                    flags: 0,
                    data: chunk.to_vec(),
                }))
                .await
                .map_err(|_| Closed)?;
        }
        Ok(())
    }

    /// Half-closes the stream (an empty DATA frame with FIN).
    pub async fn close(&self) -> Result<(), Closed> {
        self.tx
            .send(Out::Frame(Frame::Data {
                stream_id: self.id,
                flags: FLAG_FIN,
                data: Vec::new(),
            }))
            .await
            .map_err(|_| Closed)
    }

    /// Resets the stream.
    pub async fn reset(&self, status: u32) -> Result<(), Closed> {
        self.tx
            .send(Out::Frame(Frame::RstStream {
                stream_id: self.id,
                status,
            }))
            .await
            .map_err(|_| Closed)
    }
}

/// The protocol's side of a connection.
pub struct Connection {
    /// Streams as the client opens them; ends with the connection.
    pub streams: mpsc::Receiver<IncomingStream>,
    out: mpsc::Sender<Out>,
    gone: watch::Receiver<bool>,
    finishing: watch::Sender<bool>,
}

impl Connection {
    /// Starts serving SPDY/3.1 on `io`.
    pub fn start<IO>(io: IO) -> Connection
    where
        IO: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (read, write) = tokio::io::split(io);
        let (out_tx, out_rx) = mpsc::channel(64);
        let (streams_tx, streams) = mpsc::channel(16);
        let (gone_tx, gone) = watch::channel(false);
        let (finishing, finishing_rx) = watch::channel(false);
        tokio::spawn(write_loop(write, out_rx, gone_tx.clone()));
        let reader_out = out_tx.clone();
        tokio::spawn(async move {
            if let Err(e) = read_loop(read, reader_out, streams_tx, finishing_rx).await {
                tracing::debug!(error = %e, "SPDY connection closed");
            }
            let _ = gone_tx.send(true);
        });
        Connection {
            streams,
            out: out_tx,
            gone,
            finishing,
        }
    }

    /// Resolves when the client is gone (its side closed, a protocol error, or a write failed).
    pub async fn gone(&self) {
        let mut gone = self.gone.clone();
        let _ = gone.wait_for(|g| *g).await;
    }

    /// A handle that resolves [`ConnectionGone::wait`] when the client is gone.
    pub fn gone_signal(&self) -> ConnectionGone {
        ConnectionGone(self.gone.clone())
    }

    /// Ends the connection: GOAWAY once every frame queued before is sent, then the write
    /// side is closed; the client gets a moment to close its side.
    pub async fn finish(self) {
        let _ = self.finishing.send(true);
        let _ = self.out.send(Out::Finish).await;
        let mut gone = self.gone.clone();
        let _ = tokio::time::timeout(LINGER, gone.wait_for(|g| *g)).await;
    }
}

/// Resolves when a connection's client is gone.
#[derive(Clone)]
pub struct ConnectionGone(watch::Receiver<bool>);

impl ConnectionGone {
    pub async fn wait(&mut self) {
        let _ = self.0.wait_for(|g| *g).await;
    }
}

#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("reading: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Frame(#[from] frame::SpdyError),
    #[error("protocol error: {0}")]
    Protocol(String),
}

async fn read_loop<R>(
    mut read: R,
    out: mpsc::Sender<Out>,
    streams_tx: mpsc::Sender<IncomingStream>,
    mut finishing: watch::Receiver<bool>,
) -> Result<(), ConnError>
where
    R: AsyncRead + Unpin,
{
    let mut decoder = HeaderDecoder::new();
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut open: HashMap<u32, mpsc::Sender<Vec<u8>>> = HashMap::new();
    let mut last_id = 0u32;
    let mut chunk = vec![0u8; 64 * 1024];
    let mut finished = false;
    let mut linger: Option<tokio::time::Instant> = None;
    let reply = |f: Frame| {
        let out = out.clone();
        async move { out.send(Out::Frame(f)).await.is_ok() }
    };
    loop {
        // Parse every whole frame in the buffer.
        let mut at = 0;
        while let Some((f, used)) = frame::decode(&buf[at..], &mut decoder)? {
            at += used;
            match f {
                Frame::SynStream {
                    stream_id,
                    flags,
                    headers,
                    ..
                } => {
                    if stream_id % 2 == 0 || stream_id <= last_id {
                        return Err(ConnError::Protocol(format!(
                            "stream id {stream_id} after {last_id}"
                        )));
                    }
                    last_id = stream_id;
                    if open.len() >= MAX_STREAMS {
                        reply(Frame::RstStream {
                            stream_id,
                            status: RST_REFUSED_STREAM,
                        })
                        .await;
                        continue;
                    }
                    let (data_tx, data) = mpsc::channel(16);
                    if flags & FLAG_FIN == 0 {
                        open.insert(stream_id, data_tx);
                    }
                    reply(Frame::SynReply {
                        stream_id,
                        flags: 0,
                        headers: Vec::new(),
                    })
                    .await;
                    let stream = IncomingStream {
                        id: stream_id,
                        headers,
                        data,
                        writer: StreamWriter {
                            id: stream_id,
                            tx: out.clone(),
                        },
                    };
                    if streams_tx.send(stream).await.is_err() {
                        open.remove(&stream_id);
                        reply(Frame::RstStream {
                            stream_id,
                            status: RST_REFUSED_STREAM,
                        })
                        .await;
                    }
                }
                Frame::Data {
                    stream_id,
                    flags,
                    data,
                } => {
                    if stream_id > last_id || stream_id % 2 == 0 {
                        return Err(ConnError::Protocol(format!(
                            "data on stream {stream_id}, never opened"
                        )));
                    }
                    // Data on a stream closed before is dropped.
                    if let Some(tx) = open.get(&stream_id) {
                        if !data.is_empty() && tx.send(data).await.is_err() {
                            open.remove(&stream_id);
                        }
                        if flags & FLAG_FIN != 0 {
                            open.remove(&stream_id);
                        }
                    }
                }
                Frame::RstStream { stream_id, .. } => {
                    open.remove(&stream_id);
                }
                Frame::Ping { id } => {
                    reply(Frame::Ping { id }).await;
                }
                Frame::GoAway { .. } => return Ok(()),
                Frame::Headers {
                    stream_id, flags, ..
                } => {
                    if flags & FLAG_FIN != 0 {
                        open.remove(&stream_id);
                    }
                }
                Frame::SynReply { stream_id, .. } => {
                    // berth opens no streams: a reply to one is a protocol error.
                    reply(Frame::RstStream {
                        stream_id,
                        status: RST_PROTOCOL_ERROR,
                    })
                    .await;
                }
                Frame::Settings { .. } | Frame::WindowUpdate { .. } | Frame::Unknown { .. } => {}
            }
        }
        buf.drain(..at);
        if !finished && *finishing.borrow() {
            finished = true;
        }
        let n = if finished {
            // Our side is done: give the client a moment to close, then stop reading.
            let until = *linger.get_or_insert_with(|| tokio::time::Instant::now() + LINGER);
            match tokio::time::timeout_at(until, read.read(&mut chunk)).await {
                Ok(n) => n?,
                Err(_) => return Ok(()),
            }
        } else {
            tokio::select! {
                n = read.read(&mut chunk) => n?,
                changed = finishing.changed() => {
                    // A dropped Connection counts as finished.
                    if changed.is_err() {
                        finished = true;
                    }
                    continue;
                }
            }
        };
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn write_loop<W>(mut write: W, mut rx: mpsc::Receiver<Out>, gone: watch::Sender<bool>)
where
    W: AsyncWrite + Unpin,
{
    let mut encoder = match HeaderEncoder::new() {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(error = %e, "SPDY header compression unavailable");
            let _ = gone.send(true);
            return;
        }
    };
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut finish = false;
    while let Some(first) = rx.recv().await {
        buf.clear();
        let mut next = Some(first);
        // Batch what is queued into one write.
        while let Some(item) = next.take() {
            match item {
                Out::Frame(f) => {
                    if let Err(e) = frame::encode(&f, &mut encoder, &mut buf) {
                        tracing::debug!(error = %e, "SPDY frame not sent");
                    }
                }
                Out::Finish => {
                    let _ = frame::encode(
                        &Frame::GoAway {
                            last_good_stream_id: 0,
                            status: 0,
                        },
                        &mut encoder,
                        &mut buf,
                    );
                    finish = true;
                    break;
                }
            }
            if buf.len() < 256 * 1024 {
                next = rx.try_recv().ok();
            }
        }
        if write.write_all(&buf).await.is_err() || write.flush().await.is_err() {
            let _ = gone.send(true);
            return;
        }
        if finish {
            break;
        }
    }
    let _ = write.shutdown().await;
}
