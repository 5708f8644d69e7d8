//! Exec, attach and port-forward over WebSocket through a real berthd, runc and busybox
//! containers, with a tungstenite test client speaking the Kubernetes channel protocols as
//! client-go does: `v5.channel.k8s.io` (stdin closed by `[255, 0]`), `v4`, the base64 form,
//! the original `channel.k8s.io`; port-forward over `v4.channel.k8s.io` channels and SPDY
//! tunnelled through a WebSocket (`SPDY/3.1+portforward.k8s.io`); garbage clients; vanishing
//! clients that leave nothing behind.

mod common;

use std::time::{Duration, Instant};

use base64::Engine;
use berth::stream::websocket::tunnel::WsBytes;
use common::stream::{fds, payload, sha256, spdy_port_forward_echo, stream_env};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};

type Ws = WebSocketStream<TcpStream>;

/// Dials `url` as a WebSocket offering `protocols`; answers the socket and the protocol the
/// server chose, or the handshake's error.
async fn dial(url: &str, protocols: &[&str]) -> Result<(Ws, Option<String>), tungstenite::Error> {
    let ws_url = url.replacen("http://", "ws://", 1);
    let host = ws_url
        .trim_start_matches("ws://")
        .split('/')
        .next()
        .unwrap_or_default()
        .to_string();
    let mut req = ws_url.as_str().into_client_request()?;
    if !protocols.is_empty() {
        let v = protocols.join(", ");
        req.headers_mut().insert(
            http::header::SEC_WEBSOCKET_PROTOCOL,
            v.parse().expect("header value"),
        );
    }
    let tcp = TcpStream::connect(host).await.expect("connect");
    let (ws, resp) = tokio_tungstenite::client_async(req, tcp).await?;
    let chosen = resp
        .headers()
        .get(http::header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    Ok((ws, chosen))
}

fn frame(base64: bool, channel: u8, data: &[u8]) -> Message {
    if base64 {
        let mut s = String::from(char::from(b'0' + channel));
        base64::engine::general_purpose::STANDARD.encode_string(data, &mut s);
        Message::Text(s.into())
    } else {
        let mut m = vec![channel];
        m.extend_from_slice(data);
        Message::Binary(m.into())
    }
}

fn unframe(base64: bool, msg: Message) -> Option<(u8, Vec<u8>)> {
    let bytes: Vec<u8> = match msg {
        Message::Binary(b) => b.into(),
        Message::Text(t) => t.as_bytes().to_vec(),
        _ => return None,
    };
    let (&first, rest) = bytes.split_first()?;
    if base64 {
        let data = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .expect("base64 payload");
        Some((first - b'0', data))
    } else {
        Some((first, rest.to_vec()))
    }
}

/// What an exec or attach gave back, channel by channel.
#[derive(Debug, Default)]
struct Channels {
    data: [Vec<u8>; 5],
    /// Messages seen per channel, empty ones included.
    messages: [usize; 5],
    closed_normally: bool,
}

impl Channels {
    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.data[1]).to_string()
    }
    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.data[2]).to_string()
    }
    fn error(&self) -> String {
        String::from_utf8_lossy(&self.data[3]).to_string()
    }
    fn status(&self) -> serde_json::Value {
        serde_json::from_slice(&self.data[3]).expect("status JSON")
    }
}

/// Runs the exec or attach behind `url` as client-go's WebSocket executor does: the
/// terminal size first, then stdin, then (v5) the close of stdin; reads every channel until
/// the server closes the connection.
async fn ws_exec(
    url: &str,
    protocol: &str,
    stdin: Option<&[u8]>,
    resize: Option<(u16, u16)>,
) -> Channels {
    let protocols: Vec<&str> = if protocol.is_empty() {
        Vec::new()
    } else {
        vec![protocol]
    };
    let (mut ws, chosen) = dial(url, &protocols).await.expect("websocket handshake");
    assert_eq!(chosen.as_deref(), protocols.first().copied());
    let b64 = protocol.contains("base64");
    if let Some((w, h)) = resize {
        let size = format!("{{\"Width\":{w},\"Height\":{h}}}");
        ws.send(frame(b64, 4, size.as_bytes()))
            .await
            .expect("resize");
    }
    if let Some(data) = stdin {
        if !data.is_empty() {
            ws.send(frame(b64, 0, data)).await.expect("stdin");
        }
        if protocol == "v5.channel.k8s.io" {
            ws.send(Message::Binary(vec![255, 0].into()))
                .await
                .expect("close stdin");
        }
    }
    let mut r = Channels::default();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let msg = tokio::time::timeout_at(deadline.into(), ws.next())
            .await
            .expect("exec within 60s");
        match msg {
            Some(Ok(Message::Close(frame))) => {
                r.closed_normally = frame
                    .map(|f| f.code == tungstenite::protocol::frame::coding::CloseCode::Normal)
                    .unwrap_or(false);
                break;
            }
            Some(Ok(m)) => {
                if let Some((ch, data)) = unframe(b64, m) {
                    let ch = usize::from(ch);
                    assert!(ch < 5, "channel {ch}");
                    r.messages[ch] += 1;
                    r.data[ch].extend_from_slice(&data);
                }
            }
            Some(Err(e)) => panic!("websocket error: {e}"),
            None => break,
        }
    }
    r
}

/// Exec over WebSocket in every protocol berth speaks: echo, a stdin round trip through
/// `cat` that ends with v5's close of stdin, exit code 3 with stderr, a terminal resize seen
/// by `stty size`, the base64 form, the original protocol's text errors; a request that is
/// not an upgrade leaves the token; an unknown protocol is refused.
#[tokio::test]
async fn websocket_exec_in_every_protocol() {
    let mut e = stream_env().await;
    let pod = e.pod("wsexec").await;
    let id = e.container(&pod, "box", true).await;

    let url = e.exec_url(&id, &["echo", "hello"], false, false).await;
    // A plain GET (no upgrade) is refused and leaves the token for the client's fallback.
    let plain = http_get(&url).await;
    assert!(plain.starts_with("HTTP/1.1 400"), "{plain}");
    let r = ws_exec(&url, "v5.channel.k8s.io", None, None).await;
    assert_eq!(r.stdout(), "hello\n");
    assert_eq!(r.status()["status"], "Success");
    assert!(r.closed_normally, "{r:?}");
    // The empty "ready" message came first on stdout.
    assert!(r.messages[1] >= 2, "{r:?}");
    // Used token: 404, no stream.
    assert!(http_get(&url).await.starts_with("HTTP/1.1 404"));

    let url = e.exec_url(&id, &["cat"], true, false).await;
    let r = ws_exec(&url, "v5.channel.k8s.io", Some(b"round trip\n"), None).await;
    assert_eq!(r.stdout(), "round trip\n");
    assert_eq!(r.status()["status"], "Success");

    let url = e
        .exec_url(&id, &["sh", "-c", "echo oops >&2; exit 3"], false, false)
        .await;
    let r = ws_exec(&url, "v5.channel.k8s.io", None, None).await;
    assert_eq!(r.stderr(), "oops\n");
    let st = r.status();
    assert_eq!(st["status"], "Failure");
    assert_eq!(st["reason"], "NonZeroExitCode");
    assert_eq!(st["details"]["causes"][0]["reason"], "ExitCode");
    assert_eq!(st["details"]["causes"][0]["message"], "3");

    let url = e
        .exec_url(&id, &["sh", "-c", "sleep 1; stty size"], false, true)
        .await;
    let r = ws_exec(&url, "v4.channel.k8s.io", None, Some((100, 30))).await;
    assert!(r.stdout().contains("30 100"), "stty size said {r:?}");
    assert_eq!(r.status()["status"], "Success");

    let url = e.exec_url(&id, &["echo", "b64"], false, false).await;
    let r = ws_exec(&url, "v4.base64.channel.k8s.io", None, None).await;
    assert_eq!(r.stdout(), "b64\n");
    assert_eq!(r.status()["status"], "Success");

    // The original protocol: nothing on the error channel for a success, text for a failure.
    let url = e.exec_url(&id, &["true"], false, false).await;
    let r = ws_exec(&url, "channel.k8s.io", None, None).await;
    assert_eq!(r.error(), "");
    let url = e.exec_url(&id, &["sh", "-c", "exit 3"], false, false).await;
    let r = ws_exec(&url, "", None, None).await;
    assert!(r.error().contains("exit status 3"), "{r:?}");

    let url = e.exec_url(&id, &["true"], false, false).await;
    match dial(&url, &["v9.channel.k8s.io"]).await {
        Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 403),
        other => panic!("unknown protocol accepted: {:?}", other.map(|o| o.1)),
    }
}

/// A GET of `url` without an upgrade; answers the response head.
async fn http_get(url: &str) -> String {
    let rest = url.strip_prefix("http://").expect("http URL");
    let (host, path) = rest.split_at(rest.find('/').expect("path"));
    let mut tcp = TcpStream::connect(host).await.expect("connect");
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    tcp.write_all(req.as_bytes()).await.expect("send");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).to_string()
}

/// Attach over WebSocket to a container's `sh` that berth-monitor holds: commands sent on
/// stdin run, stdout and stderr come back apart, v5's close of stdin ends it (stdin_once).
#[tokio::test]
async fn websocket_attach_sends_stdin_and_sees_output() {
    let mut e = stream_env().await;
    let pod = e.pod("wsattach").await;
    let id = e.shell(&pod, "sh", false, true).await;
    let url = e.attach_url(&id, false).await;
    let r = ws_exec(
        &url,
        "v5.channel.k8s.io",
        Some(b"echo hello; echo oops >&2\n"),
        None,
    )
    .await;
    assert_eq!(r.stdout(), "hello\n");
    assert_eq!(r.stderr(), "oops\n");
    assert_eq!(r.status()["status"], "Success");
    e.wait_log("sh", "hello").await;

    let tty = e.shell(&pod, "tty", true, false).await;
    let url = e.attach_url(&tty, true).await;
    let r = ws_exec(
        &url,
        "v4.channel.k8s.io",
        Some(b"sleep 1; stty size; exit 0\n"),
        Some((120, 40)),
    )
    .await;
    assert!(r.stdout().contains("40 120"), "stty size said {r:?}");
    assert_eq!(r.status()["status"], "Success");
}

/// Sends `data` on channel 0 of a port-forward WebSocket while reading what comes back on
/// channel 0 until `data.len()` bytes arrived; answers them.
async fn ws_port_forward_echo(ws: Ws, data: &[u8]) -> Vec<u8> {
    let (mut tx, mut rx) = ws.split();
    let up = data.to_vec();
    let writer = tokio::spawn(async move {
        for chunk in up.chunks(32 * 1024) {
            tx.send(frame(false, 0, chunk)).await.expect("send data");
        }
        tx
    });
    let mut back = Vec::new();
    while back.len() < data.len() {
        let msg = tokio::time::timeout(Duration::from_secs(60), rx.next())
            .await
            .expect("port-forward data within 60s")
            .expect("connection open")
            .expect("message");
        if let Some((0, d)) = unframe(false, msg) {
            back.extend_from_slice(&d);
        }
    }
    let _tx = writer.await.expect("writer");
    back
}

/// Port-forward over WebSocket to a busybox `nc` echo server in a pod: 10 MB each way intact
/// over `v4.channel.k8s.io` channels (each channel first says its port), a refused port on
/// its error channel, and the same through SPDY tunnelled in a WebSocket.
#[tokio::test]
async fn websocket_port_forward_moves_data_intact() {
    let mut e = stream_env().await;
    let pod = e.pod("wspf").await;
    e.echo_server(&pod, 7000).await;
    let data = payload(10_000_000);

    let url = e.port_forward_url(&pod, &[]).await;
    let (mut ws, chosen) = dial(&format!("{url}?port=7000"), &["v4.channel.k8s.io"])
        .await
        .expect("handshake");
    assert_eq!(chosen.as_deref(), Some("v4.channel.k8s.io"));
    for want in [0u8, 1] {
        let msg = ws.next().await.expect("port message").expect("message");
        assert_eq!(
            unframe(false, msg),
            Some((want, 7000u16.to_le_bytes().to_vec()))
        );
    }
    let t0 = Instant::now();
    let back = ws_port_forward_echo(ws, &data).await;
    println!("websocket port-forward echo of 10 MB: {:?}", t0.elapsed());
    assert_eq!(sha256(&back), sha256(&data), "data changed on the way");

    // The CRI request's ports stand in when the URL names none; a closed port is reported.
    let url = e.port_forward_url(&pod, &[7001]).await;
    let (mut ws, _) = dial(&url, &["v4.channel.k8s.io"]).await.expect("handshake");
    let mut error = Vec::new();
    while let Some(Ok(msg)) = ws.next().await {
        if let Some((1, d)) = unframe(false, msg) {
            error.extend_from_slice(&d);
        }
    }
    let error = String::from_utf8_lossy(&error);
    assert!(error.contains("error forwarding port 7001"), "{error:?}");

    // No port at all: 400.
    let url = e.port_forward_url(&pod, &[]).await;
    match dial(&url, &["v4.channel.k8s.io"]).await {
        Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 400),
        other => panic!("a port-forward without ports: {:?}", other.map(|o| o.1)),
    }

    // SPDY through a WebSocket, as client-go's port-forward dialer does.
    let url = e.port_forward_url(&pod, &[]).await;
    let (ws, chosen) = dial(&url, &["SPDY/3.1+portforward.k8s.io"])
        .await
        .expect("tunnel handshake");
    assert_eq!(chosen.as_deref(), Some("SPDY/3.1+portforward.k8s.io"));
    let (back, err, refused) =
        spdy_port_forward_echo(WsBytes::new(ws), 7000, &data, Some(7001)).await;
    assert_eq!(sha256(&back), sha256(&data), "tunnelled data changed");
    assert!(err.is_empty(), "error stream: {err}");
    assert!(
        refused.contains("error forwarding port 7001"),
        "{refused:?}"
    );
}

/// Clients that send garbage (text on a binary protocol, a bad close, a message over the
/// limit, bytes that are no WebSocket frames) are dropped; clients that vanish mid-exec take
/// their processes with them; berthd is left with no extra fds or children and still works.
#[tokio::test]
async fn garbage_and_vanishing_websocket_clients_leave_nothing_behind() {
    let mut e = stream_env().await;
    let pod = e.pod("wsgarbage").await;
    let id = e.container(&pod, "box", true).await;
    let pid = e.d.pid().expect("berthd pid");
    let url = e.exec_url(&id, &["true"], false, false).await;
    ws_exec(&url, "v5.channel.k8s.io", None, None).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fds_before = fds(pid);

    let garbage: Vec<Message> = vec![
        Message::Text("0hello".into()),
        Message::Binary(vec![255, 0, 1].into()),
        Message::Binary(vec![0u8; 17 << 20].into()),
    ];
    for g in garbage {
        let url = e.exec_url(&id, &["sleep", "1000"], true, false).await;
        let (mut ws, _) = dial(&url, &["v5.channel.k8s.io"]).await.expect("dial");
        let _ = ws.send(g).await;
        // berth drops the connection (and the process).
        let end = tokio::time::timeout(Duration::from_secs(20), async {
            while let Some(Ok(_)) = ws.next().await {}
        })
        .await;
        assert!(end.is_ok(), "berth kept a garbage client");
    }
    // Raw bytes after a good handshake.
    let url = e.exec_url(&id, &["sleep", "1000"], true, false).await;
    let (ws, _) = dial(&url, &["v4.channel.k8s.io"]).await.expect("dial");
    let mut tcp = ws.into_inner();
    let _ = tcp.write_all(&[0xff; 64]).await;
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), tcp.read_to_end(&mut sink)).await;
    drop(tcp);
    // Clients that go away while their process runs.
    for _ in 0..5 {
        let url = e.exec_url(&id, &["sleep", "1000"], true, false).await;
        let (ws, _) = dial(&url, &["v5.channel.k8s.io"]).await.expect("dial");
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(ws);
    }
    // Many at once.
    let mut tasks = Vec::new();
    for i in 0..20 {
        let url = e
            .exec_url(&id, &["sh", "-c", &format!("echo n{i}")], false, false)
            .await;
        tasks.push(tokio::spawn(async move {
            (i, ws_exec(&url, "v5.channel.k8s.io", None, None).await)
        }));
    }
    for t in tasks {
        let (i, r) = t.await.expect("task");
        assert_eq!(r.stdout(), format!("n{i}\n"));
    }
    e.assert_nothing_left(pid, fds_before, &id).await;
}
