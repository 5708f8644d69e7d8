//! The streaming server's WebSocket side, as the kubelet's `wsstream` speaks it: the upgrade
//! (RFC 6455; the accept key from tungstenite), the choice of sub-protocol (the client's
//! first that berth speaks, `Sec-WebSocket-Protocol`; none offered means binary channels
//! with the oldest semantics), and the channel framing every message carries: its first
//! byte names the channel (stdin 0, stdout 1, stderr 2, error 3, resize 4; for port-forward
//! 2i the data and 2i+1 the error of the i-th port), the rest is the payload, raw or, for
//! the `base64.` protocols, the channel as an ASCII digit and the payload in base64. In
//! `v5.channel.k8s.io` the message `[255, channel]` closes the client's side of a channel.
//!
//! [`ChannelConn`] runs one such connection: a reader task routes incoming payloads to a
//! sender per channel, a writer task frames what berth sends. `SPDY/3.1+<protocol>` asks for
//! SPDY tunnelled through the WebSocket's binary messages instead ([`tunnel`]), as
//! client-go's port-forward dialer does.

pub mod portforward;
pub mod remotecommand;
pub mod tunnel;

use std::time::Duration;

use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use http::HeaderMap;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};

/// A WebSocket on an upgraded HTTP/1.1 connection of the streaming server.
pub type Socket = WebSocketStream<TokioIo<Upgraded>>;

/// The prefix of a sub-protocol that tunnels SPDY/3.1 through the WebSocket.
pub const TUNNEL_PREFIX: &str = "SPDY/3.1+";
/// The remotecommand (exec, attach) protocols over WebSocket.
pub const REMOTECOMMAND_PROTOCOLS: [&str; 5] = [
    "v5.channel.k8s.io",
    "v4.channel.k8s.io",
    "v4.base64.channel.k8s.io",
    "channel.k8s.io",
    "base64.channel.k8s.io",
];
/// The port-forward protocols over WebSocket.
pub const PORT_FORWARD_PROTOCOLS: [&str; 2] = ["v4.channel.k8s.io", "v4.base64.channel.k8s.io"];
/// The channel byte that, followed by a channel, closes the client's side of it (v5).
pub const STREAM_CLOSE: u8 = 255;
/// Largest message berth takes from a client.
const MAX_MESSAGE: usize = 16 << 20;
/// How long the client has to answer berth's close before the connection is dropped.
const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// Whether a request asks for a WebSocket upgrade.
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    let has = |name: http::header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .map(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
                .unwrap_or(false)
        })
    };
    has(http::header::UPGRADE, "websocket")
        && has(http::header::CONNECTION, "upgrade")
        && headers.contains_key(http::header::SEC_WEBSOCKET_KEY)
}

/// The `Sec-WebSocket-Accept` answer to the request's key.
pub fn accept_key(headers: &HeaderMap) -> Option<String> {
    let key = headers.get(http::header::SEC_WEBSOCKET_KEY)?;
    Some(tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes()))
}

/// The sub-protocols the client offers, in its order.
pub fn offered(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(http::header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect()
}

/// How a channel's payload is put in a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Binary,
    Base64,
}

/// What berth will speak on a WebSocket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Negotiated {
    /// Channels; `protocol` is "" when the client offered none (then nothing is answered).
    Channels {
        protocol: &'static str,
        codec: Codec,
    },
    /// SPDY/3.1 tunnelled through binary messages, speaking `inner` (answered with the prefix).
    Tunnel { inner: &'static str },
}

impl Negotiated {
    /// The `Sec-WebSocket-Protocol` to answer, if any.
    pub fn answer(&self) -> Option<String> {
        match self {
            Negotiated::Channels { protocol: "", .. } => None,
            Negotiated::Channels { protocol, .. } => Some((*protocol).to_string()),
            Negotiated::Tunnel { inner } => Some(format!("{TUNNEL_PREFIX}{inner}")),
        }
    }
}

/// The client's first offer that berth speaks: a channel protocol of `channels` or a
/// tunnel of one of `tunnelled`. No offer at all means binary channels.
pub fn negotiate(
    offered: &[String],
    channels: &[&'static str],
    tunnelled: &[&'static str],
) -> Option<Negotiated> {
    if offered.is_empty() {
        return Some(Negotiated::Channels {
            protocol: "",
            codec: Codec::Binary,
        });
    }
    offered.iter().find_map(|p| {
        if let Some(inner) = p.strip_prefix(TUNNEL_PREFIX) {
            return tunnelled
                .iter()
                .find(|t| **t == inner)
                .map(|inner| Negotiated::Tunnel { inner });
        }
        channels
            .iter()
            .find(|c| **c == p)
            .map(|protocol| Negotiated::Channels {
                protocol,
                codec: if protocol.contains("base64.") {
                    Codec::Base64
                } else {
                    Codec::Binary
                },
            })
    })
}

/// A message from the client, decoded.
#[derive(Debug, PartialEq, Eq)]
pub enum Inbound {
    Data {
        channel: u8,
        data: Vec<u8>,
    },
    /// The client closed its side of a channel (v5).
    CloseChannel(u8),
    /// Nothing for the channels (empty, ping, pong).
    Nothing,
    /// The client closed the connection.
    End,
}

/// Why a client's message is refused (the connection is then dropped).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("a stream close message must name exactly one channel")]
    BadClose,
    #[error("channel {0:?} is not a base64 channel digit")]
    BadChannel(u8),
    #[error("bad base64 payload")]
    BadBase64,
    #[error("text messages are not part of a binary channel protocol")]
    Text,
}

impl Codec {
    /// Frames `data` for `channel`.
    pub fn encode(self, channel: u8, data: &[u8]) -> Message {
        match self {
            Codec::Binary => {
                let mut m = Vec::with_capacity(data.len() + 1);
                m.push(channel);
                m.extend_from_slice(data);
                Message::Binary(m.into())
            }
            Codec::Base64 => {
                let mut m = String::with_capacity(data.len() * 4 / 3 + 5);
                m.push(char::from(b'0'.saturating_add(channel)));
                base64::engine::general_purpose::STANDARD.encode_string(data, &mut m);
                Message::Text(m.into())
            }
        }
    }

    /// Decodes a client's message; `closable`: the protocol knows [`STREAM_CLOSE`].
    pub fn decode(self, msg: Message, closable: bool) -> Result<Inbound, FrameError> {
        let bytes: Vec<u8> = match msg {
            Message::Binary(b) => b.into(),
            Message::Text(t) if self == Codec::Base64 => t.as_bytes().to_vec(),
            Message::Text(_) => return Err(FrameError::Text),
            Message::Close(_) => return Ok(Inbound::End),
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => return Ok(Inbound::Nothing),
        };
        let Some((&first, rest)) = bytes.split_first() else {
            return Ok(Inbound::Nothing);
        };
        if closable && first == STREAM_CLOSE {
            return match rest {
                [channel] => Ok(Inbound::CloseChannel(*channel)),
                _ => Err(FrameError::BadClose),
            };
        }
        match self {
            Codec::Binary => Ok(Inbound::Data {
                channel: first,
                data: rest.to_vec(),
            }),
            Codec::Base64 => {
                let channel = first
                    .checked_sub(b'0')
                    .filter(|c| *c <= 9)
                    .ok_or(FrameError::BadChannel(first))?;
                let data = base64::engine::general_purpose::STANDARD
                    .decode(rest)
                    .map_err(|_| FrameError::BadBase64)?;
                Ok(Inbound::Data { channel, data })
            }
        }
    }
}

/// Completes the server side of an upgraded WebSocket.
pub async fn accept(io: TokioIo<Upgraded>) -> Socket {
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE));
    WebSocketStream::from_raw_socket(
        io,
        tokio_tungstenite::tungstenite::protocol::Role::Server,
        Some(config),
    )
    .await
}

enum Out {
    Data(u8, Vec<u8>),
    Close,
}

/// The sending side of a [`ChannelConn`]; clones share the connection.
#[derive(Clone)]
pub struct Outbound(mpsc::Sender<Out>);

/// The connection is gone.
#[derive(Debug)]
pub struct Closed;

impl Outbound {
    /// Sends `data` on `channel` (an empty payload is sent too: it tells the client the
    /// channel is there).
    pub async fn send(&self, channel: u8, data: Vec<u8>) -> Result<(), Closed> {
        self.0
            .send(Out::Data(channel, data))
            .await
            .map_err(|_| Closed)
    }

    /// A sender whose messages go out on `channel`, and the task that forwards them; the
    /// task ends when every sender is dropped.
    pub fn channel_sender(&self, channel: u8) -> (mpsc::Sender<Vec<u8>>, JoinHandle<()>) {
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(16);
        let out = self.clone();
        let task = tokio::spawn(async move {
            while let Some(data) = rx.recv().await {
                if out.send(channel, data).await.is_err() {
                    return;
                }
            }
        });
        (tx, task)
    }
}

/// One WebSocket speaking channels.
pub struct ChannelConn {
    pub out: Outbound,
    gone: watch::Receiver<bool>,
    writer: JoinHandle<()>,
}

impl ChannelConn {
    /// Starts the reader and the writer of `ws`. `readers[c]` receives the payloads of
    /// channel `c` (and is dropped when the client closes it, v5); payloads for other channels
    /// are dropped, as the kubelet does. `closable`: the protocol knows [`STREAM_CLOSE`].
    pub fn start(
        ws: Socket,
        codec: Codec,
        closable: bool,
        mut readers: Vec<Option<mpsc::Sender<Vec<u8>>>>,
    ) -> ChannelConn {
        let (mut sink, mut stream) = ws.split();
        let (gone_tx, gone) = watch::channel(false);
        let (out_tx, mut out_rx) = mpsc::channel::<Out>(64);
        let reader_gone = gone_tx.clone();
        tokio::spawn(async move {
            while let Some(msg) = stream.next().await {
                let msg = match msg {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::debug!(error = %e, "websocket read failed");
                        break;
                    }
                };
                match codec.decode(msg, closable) {
                    Ok(Inbound::Data { channel, data }) => {
                        if let Some(Some(tx)) = readers.get(usize::from(channel))
                            && tx.send(data).await.is_err()
                        {
                            // The reader is done with the channel.
                            readers[usize::from(channel)] = None;
                        }
                    }
                    Ok(Inbound::CloseChannel(channel)) => {
                        if let Some(slot) = readers.get_mut(usize::from(channel)) {
                            *slot = None;
                        }
                    }
                    Ok(Inbound::Nothing) => {}
                    Ok(Inbound::End) => break,
                    Err(e) => {
                        tracing::debug!(error = %e, "bad websocket message; closing");
                        break;
                    }
                }
            }
            let _ = reader_gone.send(true);
        });
        let writer = tokio::spawn(async move {
            while let Some(out) = out_rx.recv().await {
                let msg = match out {
                    Out::Data(channel, data) => codec.encode(channel, &data),
                    Out::Close => {
                        let _ = sink
                            .send(Message::Close(Some(CloseFrame {
                                code: CloseCode::Normal,
                                reason: "".into(),
                            })))
                            .await;
                        return;
                    }
                };
                if sink.send(msg).await.is_err() {
                    let _ = gone_tx.send(true);
                    return;
                }
            }
        });
        ChannelConn {
            out: Outbound(out_tx),
            gone,
            writer,
        }
    }

    /// Resolves when the client is gone (closed, a read or a write failed, a bad message).
    pub fn gone(&self) -> impl std::future::Future<Output = ()> + use<> {
        let mut gone = self.gone.clone();
        async move {
            let _ = gone.wait_for(|g| *g).await;
        }
    }

    /// Ends the connection: a normal close once everything queued before it is sent; the
    /// client gets a moment to answer it.
    pub async fn finish(self) {
        let ChannelConn { out, gone, writer } = self;
        let _ = out.0.send(Out::Close).await;
        drop(out);
        let abort = writer.abort_handle();
        if tokio::time::timeout(CLOSE_LINGER, writer).await.is_err() {
            abort.abort();
        }
        let mut gone = gone;
        let _ = tokio::time::timeout(CLOSE_LINGER, gone.wait_for(|g| *g)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn negotiation_follows_the_client() {
        let chosen = negotiate(
            &strings(&["v5.channel.k8s.io", "v4.channel.k8s.io"]),
            &REMOTECOMMAND_PROTOCOLS,
            &[],
        );
        assert_eq!(
            chosen,
            Some(Negotiated::Channels {
                protocol: "v5.channel.k8s.io",
                codec: Codec::Binary
            })
        );
        let chosen = negotiate(
            &strings(&["x", "v4.base64.channel.k8s.io"]),
            &REMOTECOMMAND_PROTOCOLS,
            &[],
        );
        assert_eq!(
            chosen,
            Some(Negotiated::Channels {
                protocol: "v4.base64.channel.k8s.io",
                codec: Codec::Base64
            })
        );
        let tunnel = negotiate(
            &strings(&["SPDY/3.1+portforward.k8s.io"]),
            &PORT_FORWARD_PROTOCOLS,
            &["portforward.k8s.io"],
        );
        assert_eq!(
            tunnel,
            Some(Negotiated::Tunnel {
                inner: "portforward.k8s.io"
            })
        );
        assert_eq!(
            tunnel.and_then(|t| t.answer()).as_deref(),
            Some("SPDY/3.1+portforward.k8s.io")
        );
        // No offer: binary channels, nothing answered.
        let none = negotiate(&[], &REMOTECOMMAND_PROTOCOLS, &[]);
        assert_eq!(none.and_then(|n| n.answer()), None);
        assert_eq!(
            negotiate(&strings(&["SPDY/3.1+x"]), &REMOTECOMMAND_PROTOCOLS, &[]),
            None
        );
    }

    #[test]
    fn frames_round_trip() {
        for codec in [Codec::Binary, Codec::Base64] {
            let msg = codec.encode(2, b"hello\x00\xff");
            assert_eq!(
                codec.decode(msg, false),
                Ok(Inbound::Data {
                    channel: 2,
                    data: b"hello\x00\xff".to_vec()
                })
            );
        }
        assert_eq!(
            Codec::Base64.encode(1, b"hi"),
            Message::Text("1aGk=".into())
        );
        assert_eq!(
            Codec::Binary.encode(1, b"hi"),
            Message::Binary(vec![1, b'h', b'i'].into())
        );
    }

    #[test]
    fn closes_and_bad_messages() {
        let close = Message::Binary(vec![STREAM_CLOSE, 0].into());
        assert_eq!(
            Codec::Binary.decode(close.clone(), true),
            Ok(Inbound::CloseChannel(0))
        );
        // Before v5, 255 is just a channel number.
        assert_eq!(
            Codec::Binary.decode(close, false),
            Ok(Inbound::Data {
                channel: 255,
                data: vec![0]
            })
        );
        assert_eq!(
            Codec::Binary.decode(Message::Binary(vec![STREAM_CLOSE, 0, 1].into()), true),
            Err(FrameError::BadClose)
        );
        assert_eq!(
            Codec::Binary.decode(Message::Binary(Vec::new().into()), true),
            Ok(Inbound::Nothing)
        );
        assert_eq!(
            Codec::Binary.decode(Message::Text("0abc".into()), false),
            Err(FrameError::Text)
        );
        assert_eq!(
            Codec::Base64.decode(Message::Text("x".into()), false),
            Err(FrameError::BadChannel(b'x'))
        );
        assert_eq!(
            Codec::Base64.decode(Message::Text("0!!".into()), false),
            Err(FrameError::BadBase64)
        );
        assert_eq!(
            Codec::Binary.decode(Message::Close(None), false),
            Ok(Inbound::End)
        );
    }

    #[test]
    fn upgrade_headers() {
        let mut h = HeaderMap::new();
        h.insert(http::header::UPGRADE, "WebSocket".parse().expect("value"));
        h.insert(
            http::header::CONNECTION,
            "keep-alive, Upgrade".parse().expect("value"),
        );
        assert!(!is_upgrade(&h));
        h.insert(
            http::header::SEC_WEBSOCKET_KEY,
            "dGhlIHNhbXBsZSBub25jZQ==".parse().expect("value"),
        );
        assert!(is_upgrade(&h));
        // RFC 6455's example.
        assert_eq!(
            accept_key(&h).as_deref(),
            Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
        );
        h.append(
            http::header::SEC_WEBSOCKET_PROTOCOL,
            "v5.channel.k8s.io, v4.channel.k8s.io"
                .parse()
                .expect("value"),
        );
        assert_eq!(
            offered(&h),
            strings(&["v5.channel.k8s.io", "v4.channel.k8s.io"])
        );
    }
}
