//! Shared steps of the streaming tests (SPDY and WebSocket): a berthd with a busybox image,
//! pods, containers, the URLs of the streaming RPCs, a SPDY port-forward echo client, and the
//! checks that nothing is left behind (fds, children).

use std::time::{Duration, Instant};

use berth::cri::v1 as cri;
use berth::cri::v1::runtime_service_client::RuntimeServiceClient;
use berth::stream::spdy::frame::{self, FLAG_FIN, Frame, HeaderDecoder, HeaderEncoder};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tonic::transport::Channel;

use super::{Berthd, BerthdConfig, Registry};

pub type Rt = RuntimeServiceClient<Channel>;

pub struct StreamEnv {
    pub _reg: Registry,
    pub d: Berthd,
    pub rt: Rt,
    pub image: String,
    pub logs: tempfile::TempDir,
}

/// A berthd that trusts a registry holding a busybox image, pulled already.
pub async fn stream_env() -> StreamEnv {
    let b = super::busybox_daemon("test/stream", BerthdConfig::new()).await;
    StreamEnv {
        _reg: b.reg,
        d: b.d,
        rt: b.rt,
        image: b.image,
        logs: b.logs,
    }
}

impl StreamEnv {
    pub async fn pod(&mut self, name: &str) -> String {
        let config = cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: name.into(),
                uid: format!("{name}-uid"),
                namespace: "test".into(),
                attempt: 0,
            }),
            log_directory: self.logs.path().display().to_string(),
            linux: Some(cri::LinuxPodSandboxConfig::default()),
            ..Default::default()
        };
        super::run_pod(&mut self.rt, config, "").await
    }

    pub async fn container(&mut self, pod: &str, name: &str, start: bool) -> String {
        let mut config = super::sh_container(name, &self.image, "");
        config.command = vec!["sleep".into(), "3600".into()];
        let id = super::create_container(&mut self.rt, pod, config)
            .await
            .expect("create");
        if start {
            super::start_container(&mut self.rt, &id)
                .await
                .expect("start");
        }
        id
    }

    pub async fn exec_url(&mut self, id: &str, cmd: &[&str], stdin: bool, tty: bool) -> String {
        self.rt
            .exec(exec_req(id, cmd, stdin, tty))
            .await
            .expect("Exec")
            .into_inner()
            .url
    }
}

pub fn exec_req(id: &str, cmd: &[&str], stdin: bool, tty: bool) -> cri::ExecRequest {
    cri::ExecRequest {
        container_id: id.into(),
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
        tty,
        stdin,
        stdout: true,
        stderr: !tty,
    }
}

impl StreamEnv {
    /// Waits until the CRI log of container `name` holds `needle`.
    pub async fn wait_log(&self, name: &str, needle: &str) {
        super::wait_for_log(&self.logs.path().join(format!("{name}.log")), needle).await;
    }
}

impl StreamEnv {
    /// A running `sh` reading commands from its stdin (kept by berth-monitor).
    pub async fn shell(&mut self, pod: &str, name: &str, tty: bool, stdin_once: bool) -> String {
        let mut config = super::sh_container(name, &self.image, "");
        config.command = vec!["sh".into()];
        config.stdin = true;
        config.stdin_once = stdin_once;
        config.tty = tty;
        self.run_container(pod, config).await
    }

    pub async fn attach_url(&mut self, id: &str, tty: bool) -> String {
        self.rt
            .attach(cri::AttachRequest {
                container_id: id.into(),
                stdin: true,
                tty,
                stdout: true,
                stderr: !tty,
            })
            .await
            .expect("Attach")
            .into_inner()
            .url
    }
}

/// Number of open fds of a process.
pub fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Pids whose parent is `parent`.
pub fn children(parent: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").expect("proc").flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let ppid = stat
            .rsplit(')')
            .next()
            .and_then(|s| s.split_whitespace().nth(1))
            .and_then(|s| s.parse::<u32>().ok());
        if ppid == Some(parent) {
            out.push(pid);
        }
    }
    out
}

/// A port-forward request's streams on a SPDY connection (`io`, upgraded already), split:
/// the writer half sends while the reader half receives (an echo server needs both at once).
/// Answers what came back on the data stream and on the error streams of `port` and
/// `refused_port`.
pub async fn spdy_port_forward_echo<IO>(
    io: IO,
    port: u16,
    payload: &[u8],
    refused_port: Option<u16>,
) -> (Vec<u8>, String, String)
where
    IO: AsyncRead + AsyncWrite + Send + 'static,
{
    let mut enc = HeaderEncoder::new().expect("encoder");
    let mut dec = HeaderDecoder::new();
    let mut buf = Vec::new();
    let (mut rd, mut wr) = tokio::io::split(io);
    let mut frames = Vec::new();
    let syn = |id: u32, kind: &str, port: u16, req: &str| Frame::SynStream {
        stream_id: id,
        associated_to: 0,
        priority: 0,
        flags: 0,
        headers: vec![
            ("streamType".into(), kind.into()),
            ("port".into(), port.to_string()),
            ("requestID".into(), req.into()),
        ],
    };
    let fin = |id: u32| Frame::Data {
        stream_id: id,
        flags: FLAG_FIN,
        data: Vec::new(),
    };
    // As client-go: the error stream, closed for writing at once, then the data stream.
    frames.push(syn(1, "error", port, "0"));
    frames.push(fin(1));
    frames.push(syn(3, "data", port, "0"));
    if let Some(p) = refused_port {
        frames.push(syn(5, "error", p, "1"));
        frames.push(fin(5));
        frames.push(syn(7, "data", p, "1"));
    }
    let mut head = Vec::new();
    for f in &frames {
        frame::encode(f, &mut enc, &mut head).expect("encode");
    }
    wr.write_all(&head).await.expect("open streams");
    wr.flush().await.expect("flush");
    let payload = payload.to_vec();
    let writer = tokio::spawn(async move {
        let mut out = Vec::new();
        for chunk in payload.chunks(32 * 1024) {
            out.clear();
            let f = Frame::Data {
                stream_id: 3,
                flags: 0,
                data: chunk.to_vec(),
            };
            frame::encode(&f, &mut enc, &mut out).expect("encode");
            wr.write_all(&out).await.expect("send data");
        }
        out.clear();
        frame::encode(&fin(3), &mut enc, &mut out).expect("encode");
        wr.write_all(&out).await.expect("send FIN");
        wr.flush().await.expect("flush");
        wr
    });
    let (mut data, mut err1, mut err5) = (Vec::new(), Vec::new(), Vec::new());
    let mut open = vec![1u32, 3];
    if refused_port.is_some() {
        open.extend([5, 7]);
    }
    let mut chunk = vec![0u8; 64 * 1024];
    while !open.is_empty() {
        let f = loop {
            if let Some((f, used)) = frame::decode(&buf, &mut dec).expect("frame") {
                buf.drain(..used);
                break f;
            }
            let n = tokio::time::timeout(Duration::from_secs(60), rd.read(&mut chunk))
                .await
                .expect("port-forward data within 60s")
                .expect("read");
            assert!(n > 0, "connection closed with streams {open:?} open");
            buf.extend_from_slice(&chunk[..n]);
        };
        if let Frame::Data {
            stream_id,
            flags,
            data: d,
        } = f
        {
            match stream_id {
                3 => data.extend_from_slice(&d),
                1 => err1.extend_from_slice(&d),
                5 => err5.extend_from_slice(&d),
                _ => {}
            }
            if flags & FLAG_FIN != 0 {
                open.retain(|s| *s != stream_id);
            }
        }
    }
    let _wr = writer.await.expect("writer");
    (
        data,
        String::from_utf8_lossy(&err1).to_string(),
        String::from_utf8_lossy(&err5).to_string(),
    )
}

pub fn sha256(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

impl StreamEnv {
    /// Creates and starts a container; panics when either fails.
    pub async fn run_container(&mut self, pod: &str, config: cri::ContainerConfig) -> String {
        let id = super::create_container(&mut self.rt, pod, config)
            .await
            .expect("create");
        super::start_container(&mut self.rt, &id)
            .await
            .expect("start");
        id
    }

    /// Waits until berthd (`pid`) has no children left and no more fds than `fds_before`,
    /// and no `sleep 1000` runs in container `id`: what vanished clients must leave.
    pub async fn assert_nothing_left(&mut self, pid: u32, fds_before: usize, id: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = children(pid);
            let now = fds(pid);
            if left.is_empty() && now <= fds_before {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "left behind: children {left:?}, fds {now} (before {fds_before})"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let out = self
            .rt
            .exec_sync(cri::ExecSyncRequest {
                container_id: id.to_string(),
                cmd: vec![
                    "sh".into(),
                    "-c".into(),
                    "ps -o args | grep -c '^sleep 1000' || true".into(),
                ],
                timeout: 10,
            })
            .await
            .expect("exec sync")
            .into_inner();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0", "{out:?}");
    }

    /// A running busybox `nc` echo server (`cat`) on `port` in `pod`.
    pub async fn echo_server(&mut self, pod: &str, port: u16) -> String {
        let mut config = super::sh_container("echo", &self.image, "");
        config.command = ["nc", "-ll", "-p", &port.to_string(), "-e", "cat"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let id = self.run_container(pod, config).await;
        // nc listens once it runs.
        tokio::time::sleep(Duration::from_millis(300)).await;
        id
    }

    pub async fn port_forward_url(&mut self, pod: &str, ports: &[i32]) -> String {
        self.rt
            .port_forward(cri::PortForwardRequest {
                pod_sandbox_id: pod.into(),
                port: ports.to_vec(),
            })
            .await
            .expect("PortForward")
            .into_inner()
            .url
    }
}

/// `n` bytes that are not a repeating pattern of a few bytes.
pub fn payload(n: u32) -> Vec<u8> {
    (0..n)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect()
}
