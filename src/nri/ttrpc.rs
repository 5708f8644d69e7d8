//! ttrpc, the RPC protocol NRI speaks on each multiplexed connection ([`super::mux`]).
//!
//! A message is `length (u32 BE) | stream id (u32 BE) | type (u8) | flags (u8)` and a
//! protobuf body: a `Request` (service, method, payload, timeout) or a `Response` (a
//! `google.rpc.Status` and a payload). Calls are matched to answers by stream id; the caller
//! uses odd ids. One [`Endpoint`] is a client on one connection and a server on the other.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use prost::Message;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot, watch};

use super::mux::{self, MuxWriter};

const HEADER_LEN: usize = 10;
/// The largest message either side accepts (ttrpc's own limit).
pub const MAX_MESSAGE: usize = 4 << 20;
const TYPE_REQUEST: u8 = 1;
const TYPE_RESPONSE: u8 = 2;

/// gRPC status codes used on this protocol.
pub mod code {
    pub const INVALID_ARGUMENT: i32 = 3;
    pub const DEADLINE_EXCEEDED: i32 = 4;
    pub const RESOURCE_EXHAUSTED: i32 = 8;
    pub const UNIMPLEMENTED: i32 = 12;
    pub const INTERNAL: i32 = 13;
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct KeyValue {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Request {
    #[prost(string, tag = "1")]
    pub service: String,
    #[prost(string, tag = "2")]
    pub method: String,
    #[prost(bytes = "vec", tag = "3")]
    pub payload: Vec<u8>,
    #[prost(int64, tag = "4")]
    pub timeout_nano: i64,
    #[prost(message, repeated, tag = "5")]
    pub metadata: Vec<KeyValue>,
}

/// `google.rpc.Status` (its `details` are not read).
#[derive(Clone, PartialEq, prost::Message)]
pub struct RpcStatus {
    #[prost(int32, tag = "1")]
    pub code: i32,
    #[prost(string, tag = "2")]
    pub message: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Response {
    #[prost(message, optional, tag = "1")]
    pub status: Option<RpcStatus>,
    #[prost(bytes = "vec", tag = "2")]
    pub payload: Vec<u8>,
}

/// Why a call got no answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TtrpcError {
    #[error("the connection is closed")]
    Closed,
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("{message} (status {code})")]
    Status { code: i32, message: String },
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl TtrpcError {
    /// The peer cannot be talked to any more (closed, hung, or speaking garbage): NRI drops
    /// such a plugin rather than failing the request.
    pub fn is_fatal(&self) -> bool {
        !matches!(self, TtrpcError::Status { .. })
    }
}

/// What serves incoming calls: `(service, method, payload)` to a payload or a status.
pub type Handler = Arc<
    dyn Fn(
            String,
            String,
            Vec<u8>,
        ) -> Pin<Box<dyn Future<Output = Result<Vec<u8>, RpcStatus>> + Send>>
        + Send
        + Sync,
>;

/// Reads whole ttrpc messages from one multiplexed connection.
struct Messages {
    rx: mpsc::UnboundedReceiver<Bytes>,
    buf: BytesMut,
}

struct Incoming {
    stream: u32,
    kind: u8,
    body: Vec<u8>,
}

impl Messages {
    /// The next message; `None` when the connection ended.
    async fn next(&mut self) -> Result<Option<Incoming>, TtrpcError> {
        loop {
            if self.buf.len() >= HEADER_LEN {
                let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]])
                    as usize;
                if len > MAX_MESSAGE {
                    return Err(TtrpcError::Protocol(format!(
                        "a message of {len} bytes (at most {MAX_MESSAGE})"
                    )));
                }
                if self.buf.len() >= HEADER_LEN + len {
                    let stream =
                        u32::from_be_bytes([self.buf[4], self.buf[5], self.buf[6], self.buf[7]]);
                    let kind = self.buf[8];
                    self.buf.advance(HEADER_LEN);
                    let body = self.buf.split_to(len).to_vec();
                    return Ok(Some(Incoming { stream, kind, body }));
                }
            }
            match self.rx.recv().await {
                Some(b) => self.buf.extend_from_slice(&b),
                None => return Ok(None),
            }
        }
    }
}

fn frame(stream: u32, kind: u8, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEADER_LEN + body.len());
    v.extend_from_slice(&(body.len() as u32).to_be_bytes());
    v.extend_from_slice(&stream.to_be_bytes());
    v.push(kind);
    v.push(0);
    v.extend_from_slice(body);
    v
}

type Pending = Mutex<HashMap<u32, oneshot::Sender<Result<Vec<u8>, TtrpcError>>>>;

struct Inner {
    writer: Arc<MuxWriter>,
    conn: u32,
    /// The next call's stream id. Held while the call's request is queued: ttrpc's Go
    /// server refuses an id not above the last one it saw, so ids go out in order.
    next_stream: Mutex<u32>,
    pending: Pending,
    closed: AtomicBool,
    closed_tx: watch::Sender<bool>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Inner {
    fn mark_closed(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let waiting: Vec<_> = self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .collect();
        for (_, tx) in waiting {
            let _ = tx.send(Err(TtrpcError::Closed));
        }
        self.closed_tx.send_replace(true);
    }
}

/// Both directions of one peer: calls out on one connection, serves calls on the other.
/// Cloning shares it; [`Endpoint::close`] ends it for every clone.
#[derive(Clone)]
pub struct Endpoint {
    inner: Arc<Inner>,
}

impl Endpoint {
    /// Multiplexes `stream`: calls go out on `client_conn`, calls coming in on `server_conn`
    /// are answered by `handler`.
    pub fn open(stream: UnixStream, client_conn: u32, server_conn: u32, handler: Handler) -> Self {
        let (writer, reader) = mux::split(stream);
        let (client_tx, client_rx) = mpsc::unbounded_channel();
        let (server_tx, server_rx) = mpsc::unbounded_channel();
        let routes = HashMap::from([(client_conn, client_tx), (server_conn, server_tx)]);
        let (closed_tx, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            writer: writer.clone(),
            conn: client_conn,
            next_stream: Mutex::new(1),
            pending: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
            closed_tx,
            tasks: Mutex::new(Vec::new()),
        });
        let demux = tokio::spawn(reader.run(routes));
        let answers = {
            let inner = Arc::downgrade(&inner);
            let mut messages = Messages {
                rx: client_rx,
                buf: BytesMut::new(),
            };
            tokio::spawn(async move {
                loop {
                    let next = messages.next().await;
                    let Some(inner) = inner.upgrade() else { return };
                    match next {
                        Ok(Some(m)) if m.kind == TYPE_RESPONSE => {
                            let tx = inner
                                .pending
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .remove(&m.stream);
                            if let Some(tx) = tx {
                                let _ = tx.send(decode_response(&m.body));
                            }
                        }
                        Ok(Some(_)) => {}
                        Ok(None) | Err(_) => {
                            inner.mark_closed();
                            return;
                        }
                    }
                }
            })
        };
        let serving = {
            let mut messages = Messages {
                rx: server_rx,
                buf: BytesMut::new(),
            };
            tokio::spawn(async move {
                while let Ok(Some(m)) = messages.next().await {
                    if m.kind != TYPE_REQUEST {
                        continue;
                    }
                    let (handler, writer) = (handler.clone(), writer.clone());
                    tokio::spawn(async move {
                        let answer = match Request::decode(m.body.as_slice()) {
                            Ok(req) => (handler)(req.service, req.method, req.payload).await,
                            Err(e) => Err(RpcStatus {
                                code: code::INVALID_ARGUMENT,
                                message: format!("undecodable request: {e}"),
                            }),
                        };
                        let resp = match answer {
                            Ok(payload) => Response {
                                status: Some(RpcStatus::default()),
                                payload,
                            },
                            Err(status) => Response {
                                status: Some(status),
                                payload: Vec::new(),
                            },
                        };
                        let _ = writer.write(
                            server_conn,
                            &frame(m.stream, TYPE_RESPONSE, &resp.encode_to_vec()),
                        );
                    });
                }
            })
        };
        *inner.tasks.lock().unwrap_or_else(|p| p.into_inner()) = vec![demux, answers, serving];
        Endpoint { inner }
    }

    /// Calls `service.method` with `req`, waiting at most `timeout` for the answer.
    pub async fn call<Req: Message, Resp: Message + Default>(
        &self,
        service: &str,
        method: &str,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, TtrpcError> {
        if self.is_closed() {
            return Err(TtrpcError::Closed);
        }
        let body = Request {
            service: service.to_string(),
            method: method.to_string(),
            payload: req.encode_to_vec(),
            timeout_nano: i64::try_from(timeout.as_nanos()).unwrap_or(i64::MAX),
            metadata: Vec::new(),
        }
        .encode_to_vec();
        if body.len() > MAX_MESSAGE {
            return Err(TtrpcError::Status {
                code: code::RESOURCE_EXHAUSTED,
                message: format!("a request of {} bytes (at most {MAX_MESSAGE})", body.len()),
            });
        }
        let (tx, rx) = oneshot::channel();
        let (stream, sent) = {
            let mut next = self
                .inner
                .next_stream
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let stream = *next;
            *next = next.wrapping_add(2);
            self.inner
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(stream, tx);
            // Queued whole, in id order; the writer task puts it on the socket.
            let sent = self
                .inner
                .writer
                .write(self.inner.conn, &frame(stream, TYPE_REQUEST, &body));
            (stream, sent)
        };
        let answer = match sent {
            Err(_) => Err(TtrpcError::Closed),
            Ok(()) => match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(answer)) => answer,
                Ok(Err(_)) => Err(TtrpcError::Closed),
                Err(_) => Err(TtrpcError::Timeout(timeout)),
            },
        };
        self.inner
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&stream);
        let payload = answer?;
        Resp::decode(payload.as_slice())
            .map_err(|e| TtrpcError::Protocol(format!("undecodable answer to {method}: {e}")))
    }

    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::SeqCst)
    }

    /// Resolves when the peer is gone (or [`Endpoint::close`] was called).
    pub async fn closed(&self) {
        let mut rx = self.inner.closed_tx.subscribe();
        let _ = rx.wait_for(|c| *c).await;
    }

    /// Ends the connection: pending calls fail, the socket is shut and its tasks stop.
    pub async fn close(&self) {
        self.inner.mark_closed();
        self.inner.writer.shutdown().await;
        for t in self
            .inner
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            t.abort();
        }
    }
}

fn decode_response(body: &[u8]) -> Result<Vec<u8>, TtrpcError> {
    let resp = Response::decode(body)
        .map_err(|e| TtrpcError::Protocol(format!("undecodable response: {e}")))?;
    match resp.status {
        Some(s) if s.code != 0 => Err(TtrpcError::Status {
            code: s.code,
            message: s.message,
        }),
        _ => Ok(resp.payload),
    }
}

/// A status for a handler's answer.
pub fn status(code: i32, message: impl Into<String>) -> RpcStatus {
    RpcStatus {
        code,
        message: message.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn echo() -> Handler {
        Arc::new(|service, method, payload| {
            Box::pin(async move {
                match method.as_str() {
                    "Echo" => Ok(payload),
                    "Hang" => std::future::pending().await,
                    _ => Err(status(
                        code::UNIMPLEMENTED,
                        format!("no {service}/{method}"),
                    )),
                }
            })
        })
    }

    fn pair() -> (Endpoint, Endpoint) {
        let (a, b) = UnixStream::pair().expect("socketpair");
        (
            Endpoint::open(a, 1, 2, echo()),
            Endpoint::open(b, 2, 1, echo()),
        )
    }

    #[tokio::test]
    async fn calls_cross_both_ways_and_errors_keep_their_code() {
        let (a, b) = pair();
        let msg = RpcStatus {
            code: 7,
            message: "x".repeat(100_000),
        };
        let back: RpcStatus = a
            .call("s", "Echo", &msg, Duration::from_secs(5))
            .await
            .expect("a→b");
        assert_eq!(back, msg);
        let back: RpcStatus = b
            .call("s", "Echo", &msg, Duration::from_secs(5))
            .await
            .expect("b→a");
        assert_eq!(back, msg);
        let err = a
            .call::<_, RpcStatus>("s", "Nope", &msg, Duration::from_secs(5))
            .await
            .expect_err("unimplemented");
        assert!(
            matches!(
                err,
                TtrpcError::Status {
                    code: code::UNIMPLEMENTED,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(!err.is_fatal());
        let err = a
            .call::<_, RpcStatus>("s", "Hang", &msg, Duration::from_millis(100))
            .await
            .expect_err("timeout");
        assert!(matches!(err, TtrpcError::Timeout(_)) && err.is_fatal());
        // Calls in flight do not block each other.
        let (x, y) = tokio::join!(
            a.call::<_, RpcStatus>("s", "Echo", &msg, Duration::from_secs(5)),
            a.call::<_, RpcStatus>("s", "Echo", &msg, Duration::from_secs(5))
        );
        assert!(x.is_ok() && y.is_ok());
    }

    /// A Go ttrpc server refuses a stream id not above the last one: concurrent calls must
    /// still put their requests on the wire in id order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_calls_go_out_in_stream_id_order() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (a, mut raw) = UnixStream::pair().expect("socketpair");
        let client = Endpoint::open(a, 1, 2, echo());
        let peer = tokio::spawn(async move {
            let (mut ids, mut buf) = (Vec::new(), Vec::new());
            let mut header = [0u8; 8];
            while ids.len() < 50 {
                raw.read_exact(&mut header).await.expect("mux header");
                let len = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
                let mut payload = vec![0u8; len as usize];
                raw.read_exact(&mut payload).await.expect("mux payload");
                buf.extend_from_slice(&payload);
                while buf.len() >= HEADER_LEN {
                    let n = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
                    if buf.len() < HEADER_LEN + n {
                        break;
                    }
                    let id = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
                    buf.drain(..HEADER_LEN + n);
                    ids.push(id);
                    let resp = Response {
                        status: None,
                        payload: Vec::new(),
                    }
                    .encode_to_vec();
                    let msg = frame(id, TYPE_RESPONSE, &resp);
                    let mut out = Vec::new();
                    out.extend_from_slice(&1u32.to_be_bytes());
                    out.extend_from_slice(&(msg.len() as u32).to_be_bytes());
                    out.extend_from_slice(&msg);
                    raw.write_all(&out).await.expect("answer");
                }
            }
            ids
        });
        let calls = (0..50).map(|_| {
            let c = client.clone();
            tokio::spawn(async move {
                c.call::<_, RpcStatus>("s", "Echo", &RpcStatus::default(), Duration::from_secs(5))
                    .await
            })
        });
        for r in futures_util::future::join_all(calls).await {
            r.expect("task").expect("answered");
        }
        let ids = peer.await.expect("peer");
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
        assert!(ids.iter().all(|i| i % 2 == 1));
    }

    #[tokio::test]
    async fn closing_one_side_is_seen_by_the_other() {
        let (a, b) = pair();
        a.close().await;
        // Seen even by a waiter that comes after the close.
        tokio::time::sleep(Duration::from_millis(100)).await;
        tokio::time::timeout(Duration::from_secs(5), b.closed())
            .await
            .expect("b sees the close");
        let err = b
            .call::<_, RpcStatus>("s", "Echo", &RpcStatus::default(), Duration::from_secs(1))
            .await
            .expect_err("closed");
        assert!(err.is_fatal());
    }
}
