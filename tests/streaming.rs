//! Exec (and the streaming server) through a real berthd, runc and busybox containers, with a
//! SPDY/3.1 test client speaking the Kubernetes remotecommand protocol as client-go does:
//! echo, a stdin round trip through `cat`, exit code 3, a tty resize seen by `stty size`;
//! tokens that are single use; the RPCs' validation; garbage clients; many concurrent execs
//! that leave nothing behind. Timings are printed, not asserted.

mod common;

use std::time::{Duration, Instant};

use berth::cri::v1 as cri;
use berth::stream::spdy::frame::{self, FLAG_FIN, Frame, HeaderDecoder, HeaderEncoder};
use common::stream::{exec_req, fds, payload, sha256, spdy_port_forward_echo, stream_env as env};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A minimal SPDY/3.1 client of the streaming server.
struct SpdyClient {
    tcp: TcpStream,
    enc: HeaderEncoder,
    dec: HeaderDecoder,
    buf: Vec<u8>,
    next_id: u32,
}

/// The HTTP status line's code and the response head, for a request to `url`.
async fn upgrade(url: &str, protocols: &[&str]) -> (TcpStream, u16, String) {
    let rest = url.strip_prefix("http://").expect("http URL");
    let (host, path) = rest.split_at(rest.find('/').expect("path"));
    let mut tcp = TcpStream::connect(host).await.expect("connect");
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
    );
    for p in protocols {
        req.push_str(&format!("X-Stream-Protocol-Version: {p}\r\n"));
    }
    req.push_str("Content-Length: 0\r\n\r\n");
    tcp.write_all(req.as_bytes()).await.expect("send request");
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tcp.read(&mut b).await.expect("read response");
        if n == 0 {
            break;
        }
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).to_string();
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (tcp, code, head)
}

impl SpdyClient {
    async fn connect(url: &str, protocol: &str) -> SpdyClient {
        let (tcp, code, head) = upgrade(url, &[protocol]).await;
        assert_eq!(code, 101, "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains(&format!("x-stream-protocol-version: {protocol}")),
            "{head}"
        );
        SpdyClient {
            tcp,
            enc: HeaderEncoder::new().expect("encoder"),
            dec: HeaderDecoder::new(),
            buf: Vec::new(),
            next_id: 1,
        }
    }

    async fn send(&mut self, f: Frame) {
        let mut out = Vec::new();
        frame::encode(&f, &mut self.enc, &mut out).expect("encode");
        self.tcp.write_all(&out).await.expect("write frame");
    }

    async fn open(&mut self, headers: &[(&str, &str)]) -> u32 {
        let id = self.next_id;
        self.next_id += 2;
        self.send(Frame::SynStream {
            stream_id: id,
            associated_to: 0,
            priority: 0,
            flags: 0,
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
        })
        .await;
        id
    }

    async fn data(&mut self, id: u32, data: &[u8], fin: bool) {
        for chunk in data.chunks(32 * 1024) {
            self.send(Frame::Data {
                stream_id: id,
                flags: 0,
                data: chunk.to_vec(),
            })
            .await;
        }
        if fin {
            self.send(Frame::Data {
                stream_id: id,
                flags: FLAG_FIN,
                data: Vec::new(),
            })
            .await;
        }
    }

    /// The next frame; `None` when the server closed the connection.
    async fn next(&mut self) -> Option<Frame> {
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            if let Some((f, used)) = frame::decode(&self.buf, &mut self.dec).expect("frame") {
                self.buf.drain(..used);
                return Some(f);
            }
            let n = self.tcp.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// What an exec gave back.
#[derive(Debug, Default)]
struct ExecResult {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    error: Vec<u8>,
    replies: usize,
}

impl ExecResult {
    fn status(&self) -> serde_json::Value {
        serde_json::from_slice(&self.error).expect("status JSON")
    }
}

/// Runs the exec behind `url` the way client-go's v4 SPDY executor does.
async fn spdy_exec(
    url: &str,
    stdin: Option<&[u8]>,
    tty: bool,
    resize: Option<(u16, u16)>,
) -> ExecResult {
    let mut c = SpdyClient::connect(url, "v4.channel.k8s.io").await;
    let error = c.open(&[("streamType", "error")]).await;
    let input = match stdin {
        Some(_) => Some(c.open(&[("streamType", "stdin")]).await),
        None => None,
    };
    let stdout = c.open(&[("streamType", "stdout")]).await;
    let stderr = if tty {
        None
    } else {
        Some(c.open(&[("streamType", "stderr")]).await)
    };
    let resize_id = if tty {
        Some(c.open(&[("streamType", "resize")]).await)
    } else {
        None
    };
    if let (Some(id), Some((w, h))) = (resize_id, resize) {
        c.data(
            id,
            format!("{{\"Width\":{w},\"Height\":{h}}}").as_bytes(),
            false,
        )
        .await;
    }
    if let (Some(id), Some(data)) = (input, stdin) {
        c.data(id, data, !tty).await;
    }
    let mut r = ExecResult::default();
    let mut open: Vec<u32> = [Some(error), Some(stdout), stderr]
        .into_iter()
        .flatten()
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !open.is_empty() {
        let f = tokio::time::timeout_at(deadline.into(), c.next())
            .await
            .expect("exec within 60s")
            .expect("connection open until every stream is closed");
        match f {
            Frame::SynReply { .. } => r.replies += 1,
            Frame::Data {
                stream_id,
                flags,
                data,
            } => {
                let sink = if stream_id == error {
                    &mut r.error
                } else if stream_id == stdout {
                    &mut r.stdout
                } else if Some(stream_id) == stderr {
                    &mut r.stderr
                } else {
                    panic!("data on stream {stream_id}")
                };
                sink.extend_from_slice(&data);
                if flags & FLAG_FIN != 0 {
                    open.retain(|s| *s != stream_id);
                }
            }
            Frame::RstStream { stream_id, status } => {
                panic!("stream {stream_id} reset ({status})")
            }
            _ => {}
        }
    }
    // The server says goodbye and closes.
    loop {
        match tokio::time::timeout(Duration::from_secs(10), c.next()).await {
            Ok(Some(Frame::GoAway { .. })) | Ok(None) => break,
            Ok(Some(_)) => {}
            Err(_) => panic!("no GOAWAY"),
        }
    }
    r
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Exec over SPDY: echo, a stdin round trip through cat, exit code 3 with stderr, a tty whose
/// resize `stty size` sees; each answers its status on the error stream.
#[tokio::test]
async fn spdy_exec_echo_stdin_exit_code_and_tty() {
    let mut e = env().await;
    let pod = e.pod("exec").await;
    let id = e.container(&pod, "box", true).await;

    let url = e.exec_url(&id, &["echo", "hello"], false, false).await;
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    let r = spdy_exec(&url, None, false, None).await;
    assert_eq!(r.replies, 3, "a SYN_REPLY per stream");
    assert_eq!(String::from_utf8_lossy(&r.stdout), "hello\n");
    assert!(r.stderr.is_empty());
    assert_eq!(r.status()["status"], "Success");

    // 1 MiB through cat and back, intact.
    let input: Vec<u8> = (0..(1 << 20)).map(|i: u32| (i % 251) as u8).collect();
    let url = e.exec_url(&id, &["cat"], true, false).await;
    let t0 = Instant::now();
    let r = spdy_exec(&url, Some(&input), false, None).await;
    println!("cat round trip of 1 MiB: {:?}", t0.elapsed());
    assert_eq!(r.stdout.len(), input.len());
    assert!(r.stdout == input, "cat gave back other bytes");
    assert_eq!(r.status()["status"], "Success");

    let url = e
        .exec_url(
            &id,
            &["sh", "-c", "echo out; echo err >&2; exit 3"],
            false,
            false,
        )
        .await;
    let r = spdy_exec(&url, None, false, None).await;
    assert_eq!(String::from_utf8_lossy(&r.stdout), "out\n");
    assert_eq!(String::from_utf8_lossy(&r.stderr), "err\n");
    let s = r.status();
    assert_eq!(s["status"], "Failure");
    assert_eq!(s["reason"], "NonZeroExitCode");
    assert_eq!(s["details"]["causes"][0]["reason"], "ExitCode");
    assert_eq!(s["details"]["causes"][0]["message"], "3");

    // A terminal: the size the client sends is the size the process sees.
    let url = e
        .exec_url(&id, &["sh", "-c", "sleep 1; stty size; tty"], true, true)
        .await;
    let r = spdy_exec(&url, Some(b""), true, Some((123, 45))).await;
    let out = String::from_utf8_lossy(&r.stdout);
    assert!(out.contains("45 123"), "stty size said {out:?}");
    assert!(out.contains("/dev/pts/"), "no terminal: {out:?}");
    assert_eq!(r.status()["status"], "Success");

    // Round trip of `true`, sequentially (figures, not assertions).
    let mut times = Vec::new();
    for _ in 0..20 {
        let t0 = Instant::now();
        let url = e.exec_url(&id, &["true"], false, false).await;
        let r = spdy_exec(&url, None, false, None).await;
        times.push(t0.elapsed());
        assert_eq!(r.status()["status"], "Success");
    }
    times.sort();
    println!(
        "SPDY exec round trip of `true` (Exec RPC + stream), n=20: p50 {:?}, p95 {:?}",
        percentile(&times, 0.5),
        percentile(&times, 0.95)
    );
}

/// Tokens: single use, kind-bound, unknown ones 404; the RPCs validate as the CRI says.
#[tokio::test]
async fn tokens_and_validation() {
    let mut e = env().await;
    let pod = e.pod("tokens").await;
    let id = e.container(&pod, "box", true).await;
    let created = e.container(&pod, "idle", false).await;

    let url = e.exec_url(&id, &["true"], false, false).await;
    let r = spdy_exec(&url, None, false, None).await;
    assert_eq!(r.status()["status"], "Success");
    let (_, code, head) = upgrade(&url, &["v4.channel.k8s.io"]).await;
    assert_eq!(code, 404, "a used token: {head}");
    let bogus = format!(
        "{}/exec/not-a-token",
        &url[..url.find("/exec/").expect("path")]
    );
    assert_eq!(upgrade(&bogus, &["v4.channel.k8s.io"]).await.1, 404);
    // An exec token is not found on the attach path; a request for an upgrade berth does not
    // speak leaves it usable.
    let url = e.exec_url(&id, &["true"], false, false).await;
    let wrong = url.replace("/exec/", "/attach/");
    assert_eq!(upgrade(&wrong, &["v4.channel.k8s.io"]).await.1, 404);
    let rest = url.strip_prefix("http://").expect("http");
    let (host, path) = rest.split_at(rest.find('/').expect("path"));
    let mut h2c = TcpStream::connect(host).await.expect("connect");
    h2c.write_all(
        format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .expect("send");
    let mut answer = vec![0u8; 1024];
    let n = h2c.read(&mut answer).await.expect("answer");
    assert!(
        String::from_utf8_lossy(&answer[..n]).starts_with("HTTP/1.1 400"),
        "{}",
        String::from_utf8_lossy(&answer[..n])
    );
    let r = spdy_exec(&url, None, false, None).await;
    assert_eq!(r.status()["status"], "Success");
    // No protocol in common: 403.
    let url = e.exec_url(&id, &["true"], false, false).await;
    assert_eq!(upgrade(&url, &["v9.channel.k8s.io"]).await.1, 403);

    let code = |r: Result<tonic::Response<cri::ExecResponse>, tonic::Status>| {
        r.map(|_| tonic::Code::Ok).unwrap_or_else(|s| s.code())
    };
    let unknown = "0".repeat(64);
    assert_eq!(
        code(e.rt.exec(exec_req(&unknown, &["true"], false, false)).await),
        tonic::Code::NotFound
    );
    assert_eq!(
        code(e.rt.exec(exec_req(&created, &["true"], false, false)).await),
        tonic::Code::FailedPrecondition
    );
    let mut none = exec_req(&id, &["true"], false, false);
    none.stdout = false;
    none.stderr = false;
    assert_eq!(code(e.rt.exec(none).await), tonic::Code::InvalidArgument);
    let mut both = exec_req(&id, &["true"], false, true);
    both.stderr = true;
    assert_eq!(code(e.rt.exec(both).await), tonic::Code::InvalidArgument);
    assert_eq!(
        code(e.rt.exec(exec_req(&id, &[], false, false)).await),
        tonic::Code::InvalidArgument
    );
}

/// Garbage after the upgrade closes that connection only; berthd goes on serving streams.
#[tokio::test]
async fn garbage_spdy_clients_do_not_hurt_berthd() {
    let mut e = env().await;
    let pod = e.pod("garbage").await;
    let id = e.container(&pod, "box", true).await;
    let inputs: Vec<Vec<u8>> = vec![
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        vec![0xff; 4096],
        // A SYN_STREAM whose header block is not zlib.
        vec![
            0x80, 3, 0, 1, 0, 0, 0, 14, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4,
        ],
        // Data on a stream never opened.
        vec![0, 0, 0, 7, 0, 0, 0, 1, 42],
        // A frame announcing 16 MiB, then the connection ends.
        vec![0, 0, 0, 1, 0, 0xff, 0xff, 0xff, 1, 2, 3],
    ];
    for bytes in inputs {
        let url = e.exec_url(&id, &["sleep", "30"], false, false).await;
        let (mut tcp, code, _) = upgrade(&url, &["v4.channel.k8s.io"]).await;
        assert_eq!(code, 101);
        tcp.write_all(&bytes).await.expect("write garbage");
        // Frames that cannot be parsed close the connection from berthd's side; the rest
        // is cut short by the client.
        let mut sink = Vec::new();
        let t0 = Instant::now();
        let closed = tokio::time::timeout(Duration::from_secs(2), tcp.read_to_end(&mut sink)).await;
        if closed.is_err() {
            tcp.shutdown().await.expect("shutdown");
            let _ = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut sink))
                .await
                .expect("berthd closes once the client did");
        }
        println!(
            "garbage {:02x?}…: closed after {:?}",
            &bytes[..4],
            t0.elapsed()
        );
    }
    // Plain HTTP garbage on the listener itself.
    let url = e.exec_url(&id, &["true"], false, false).await;
    let host = url
        .strip_prefix("http://")
        .and_then(|r| r.split('/').next())
        .expect("host")
        .to_string();
    let mut tcp = TcpStream::connect(&host).await.expect("connect");
    tcp.write_all(b"\x00\x01\x02 not http at all\r\n\r\n")
        .await
        .expect("write");
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut sink)).await;
    // Still serving.
    let r = spdy_exec(&url, None, false, None).await;
    assert_eq!(r.status()["status"], "Success");
    assert!(e.d.is_running());
}

/// Many execs at once, and clients that vanish mid-exec: afterwards berthd holds no more fds
/// than before and no runtime process is left.
#[tokio::test]
async fn concurrent_execs_and_vanishing_clients_leave_nothing_behind() {
    let mut e = env().await;
    let pod = e.pod("many").await;
    let id = e.container(&pod, "box", true).await;
    let pid = e.d.pid().expect("berthd pid");
    // Warm up (first exec, connections).
    let url = e.exec_url(&id, &["true"], false, false).await;
    spdy_exec(&url, None, false, None).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fds_before = fds(pid);

    const N: usize = 100;
    let mut urls = Vec::new();
    for i in 0..N {
        let tty = i % 4 == 0;
        let url = e
            .exec_url(&id, &["sh", "-c", &format!("echo n{i}")], !tty, tty)
            .await;
        urls.push((i, tty, url));
    }
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for (i, tty, url) in urls {
        tasks.push(tokio::spawn(async move {
            let stdin: Option<&[u8]> = Some(b"");
            let r = spdy_exec(&url, stdin, tty, tty.then_some((80, 24))).await;
            (i, r)
        }));
    }
    for t in tasks {
        let (i, r) = t.await.expect("task");
        assert!(
            String::from_utf8_lossy(&r.stdout).contains(&format!("n{i}")),
            "exec {i}: {r:?}"
        );
        assert_eq!(r.status()["status"], "Success");
    }
    println!("{N} concurrent SPDY execs: {:?}", t0.elapsed());

    // Clients that go away while their process runs: the process is killed.
    for _ in 0..5 {
        let url = e.exec_url(&id, &["sleep", "1000"], true, false).await;
        let mut c = SpdyClient::connect(&url, "v4.channel.k8s.io").await;
        c.open(&[("streamType", "error")]).await;
        c.open(&[("streamType", "stdin")]).await;
        c.open(&[("streamType", "stdout")]).await;
        c.open(&[("streamType", "stderr")]).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(c);
    }
    e.assert_nothing_left(pid, fds_before, &id).await;
}

/// Port-forward over SPDY to a busybox `nc` echo server inside a pod: 10 MB go up and come
/// back intact (checksums); a port nobody listens on is reported on its error stream; the
/// RPC validates the pod.
#[tokio::test]
async fn spdy_port_forward_moves_data_intact() {
    let mut e = env().await;
    let pod = e.pod("pf").await;
    e.echo_server(&pod, 7000).await;
    let payload = payload(10_000_000);
    let url = e.port_forward_url(&pod, &[7000]).await;
    assert!(url.contains("/portforward/"), "{url}");
    let t0 = Instant::now();
    let (tcp, code, head) = upgrade(&url, &["portforward.k8s.io"]).await;
    assert_eq!(code, 101, "{head}");
    let (back, err, refused) = spdy_port_forward_echo(tcp, 7000, &payload, Some(7001)).await;
    let took = t0.elapsed();
    assert_eq!(back.len(), payload.len());
    assert_eq!(sha256(&back), sha256(&payload), "data changed on the way");
    assert!(err.is_empty(), "error stream: {err}");
    assert!(
        refused.contains("error forwarding port 7001"),
        "refused port: {refused:?}"
    );
    println!(
        "port-forward echo of 10 MB (up and back at once): {took:?}, {:.1} MB/s each way",
        10.0 / took.as_secs_f64()
    );

    // Used token: 404.
    assert_eq!(upgrade(&url, &["portforward.k8s.io"]).await.1, 404);
    // Unknown pod, stopped pod.
    let code = |r: Result<tonic::Response<cri::PortForwardResponse>, tonic::Status>| {
        r.map(|_| tonic::Code::Ok).unwrap_or_else(|s| s.code())
    };
    let unknown = cri::PortForwardRequest {
        pod_sandbox_id: "0".repeat(64),
        port: vec![],
    };
    assert_eq!(
        code(e.rt.port_forward(unknown).await),
        tonic::Code::NotFound
    );
    e.rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await
    .expect("stop pod");
    let stopped = cri::PortForwardRequest {
        pod_sandbox_id: pod.clone(),
        port: vec![],
    };
    assert_eq!(
        code(e.rt.port_forward(stopped).await),
        tonic::Code::FailedPrecondition
    );
}

/// Attach over SPDY to a container's `sh` that berth-monitor holds: commands sent on stdin
/// run, their stdout and stderr come back apart, and the attach ends with the container; the
/// CRI log keeps being written. A terminal container sees the attacher's resize.
#[tokio::test]
async fn spdy_attach_sends_stdin_and_sees_output() {
    let mut e = env().await;
    let pod = e.pod("attach").await;
    // stdin_once: the client's end of stdin closes the container's; the shell ends.
    let id = e.shell(&pod, "sh", false, true).await;
    let url = e.attach_url(&id, false).await;
    let script = b"echo hello; echo oops >&2; exit 0\n";
    let r = spdy_exec(&url, Some(script), false, None).await;
    assert_eq!(String::from_utf8_lossy(&r.stdout), "hello\n");
    assert_eq!(String::from_utf8_lossy(&r.stderr), "oops\n");
    assert_eq!(r.status()["status"], "Success");
    let log = std::fs::read_to_string(e.logs.path().join("sh.log")).unwrap_or_default();
    assert!(log.contains(" stdout F hello"), "log: {log:?}");
    assert!(log.contains(" stderr F oops"), "log: {log:?}");

    // Without stdin_once, the client's end of stdin detaches it; the shell goes on.
    let keep = e.shell(&pod, "keep", false, false).await;
    let url = e.attach_url(&keep, false).await;
    let r = spdy_exec(&url, Some(b"echo first\n"), false, None).await;
    assert_eq!(r.status()["status"], "Success");
    e.wait_log("keep", "first").await;
    let url = e.attach_url(&keep, false).await;
    let r = spdy_exec(&url, Some(b""), false, None).await;
    assert_eq!(r.status()["status"], "Success");

    let tty = e.shell(&pod, "tty", true, false).await;
    let url = e.attach_url(&tty, true).await;
    let r = spdy_exec(
        &url,
        Some(b"sleep 1; stty size; exit 0\n"),
        true,
        Some((100, 30)),
    )
    .await;
    let out = String::from_utf8_lossy(&r.stdout);
    assert!(out.contains("30 100"), "stty size said {out:?}");
    assert_eq!(r.status()["status"], "Success");

    // Attach to a container that is not running: FailedPrecondition.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let st =
            e.rt.container_status(cri::ContainerStatusRequest {
                container_id: id.clone(),
                verbose: false,
            })
            .await
            .expect("status")
            .into_inner()
            .status
            .expect("status");
        if st.state == cri::ContainerState::ContainerExited as i32 {
            break;
        }
        assert!(Instant::now() < deadline, "the shell did not exit");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let err =
        e.rt.attach(cri::AttachRequest {
            container_id: id.clone(),
            stdin: true,
            tty: false,
            stdout: true,
            stderr: true,
        })
        .await
        .expect_err("exited container");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
}
