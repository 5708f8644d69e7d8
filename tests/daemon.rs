//! berthd as a process: its command line, configuration errors, the socket (stale, in use,
//! mode), SIGTERM, the RuntimeService RPCs that exist before pods do, and clients that send
//! their socket path as HTTP/2 `:authority`.

mod common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::process::Command;

use berth::cri::v1 as cri;
use common::{Berthd, BerthdConfig};

const BERTHD: &str = env!("CARGO_BIN_EXE_berthd");

#[test]
fn version_and_help() {
    let out = Command::new(BERTHD)
        .arg("--version")
        .output()
        .expect("run berthd");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(env!("CARGO_PKG_VERSION")), "{text}");
    let out = Command::new(BERTHD)
        .arg("--help")
        .output()
        .expect("run berthd");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("--config"));
    let out = Command::new(BERTHD)
        .arg("--print-default-config")
        .output()
        .expect("run berthd");
    assert!(String::from_utf8_lossy(&out.stdout).contains("pull_progress_timeout"));
}

/// A bad config file stops berthd before it creates anything, with a message naming the
/// problem.
#[test]
fn config_errors_name_the_key_and_start_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("s.sock");
    let cases = [
        ("rooot = \"/x\"", vec!["rooot"]),
        (
            "pull_progress_timeout = \"soon\"",
            vec!["pull_progress_timeout", "soon"],
        ),
        ("cgroup_driver = \"both\"", vec!["cgroup_driver", "both"]),
        (
            "[registries.\"docker.io\"]\nmirrors = [\"ftp://x\"]",
            vec!["mirrors", "ftp://x"],
        ),
        ("[network]\nbridge = 3", vec!["bridge"]),
    ];
    for (text, needles) in cases {
        let cfg = dir.path().join("berth.toml");
        std::fs::write(
            &cfg,
            format!(
                "socket = \"{}\"\nroot = \"{}\"\n{text}\n",
                socket.display(),
                dir.path().join("root").display()
            ),
        )
        .expect("write config");
        let out = Command::new(BERTHD)
            .arg("--config")
            .arg(&cfg)
            .output()
            .expect("run berthd");
        assert!(!out.status.success(), "{text} must be refused");
        let err = String::from_utf8_lossy(&out.stderr);
        for n in needles {
            assert!(
                err.contains(n),
                "error for {text:?} should name {n:?}: {err}"
            );
        }
        assert!(!socket.exists(), "no socket for a refused config");
        assert!(
            !dir.path().join("root").exists(),
            "no root for a refused config"
        );
    }
    let out = Command::new(BERTHD)
        .args(["--config", "/nonexistent/berth.toml"])
        .output()
        .expect("run berthd");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/berth.toml"));
}

#[tokio::test]
async fn socket_is_0660_and_a_live_daemon_is_not_displaced() {
    let mut d = Berthd::start(BerthdConfig::new()).await;
    let meta = std::fs::metadata(d.socket()).expect("socket");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);

    // A second daemon on the same socket (own root) refuses to start.
    let other = tempfile::tempdir().expect("tempdir");
    let cfg = other.path().join("berth.toml");
    std::fs::write(
        &cfg,
        format!(
            "root = \"{}\"\nstate = \"{}\"\nsocket = \"{}\"\n[metrics]\naddress = \"\"\n",
            other.path().join("root").display(),
            other.path().join("state").display(),
            d.socket().display()
        ),
    )
    .expect("write config");
    let out = Command::new(BERTHD)
        .arg("--config")
        .arg(&cfg)
        .output()
        .expect("run berthd");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("running daemon"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The first one still answers.
    let mut rt = d.runtime_client().await;
    rt.version(cri::VersionRequest::default())
        .await
        .expect("first daemon still serves");

    // SIGTERM: exit 0 and the socket is gone.
    let status = d.stop().expect("was running");
    assert!(status.success(), "exit status {status:?}\n{}", d.log());
    assert!(!d.socket().exists());

    // A stale socket file (nobody listening) is replaced at start.
    {
        let _l = std::os::unix::net::UnixListener::bind(d.socket()).expect("bind stale socket");
    }
    assert!(d.socket().exists());
    d.restart().await;
    let mut rt = d.runtime_client().await;
    rt.version(cri::VersionRequest::default())
        .await
        .expect("serves after replacing the stale socket");
    assert!(d.log().contains("stale socket"));
}

#[tokio::test]
async fn version_status_and_unimplemented_rpcs() {
    let d = Berthd::start(BerthdConfig::new()).await;
    let mut rt = d.runtime_client().await;
    let v = rt
        .version(cri::VersionRequest::default())
        .await
        .expect("version")
        .into_inner();
    assert_eq!(v.runtime_name, "berth");
    assert_eq!(v.runtime_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(v.runtime_api_version, "v1");

    let s = rt
        .status(cri::StatusRequest { verbose: true })
        .await
        .expect("status")
        .into_inner();
    let conditions = s.status.expect("conditions").conditions;
    let cond = |t: &str| {
        conditions
            .iter()
            .find(|c| c.r#type == t)
            .unwrap_or_else(|| panic!("no {t} condition"))
            .clone()
    };
    assert!(cond("RuntimeReady").status);
    assert!(cond("NetworkReady").status, "the native network is usable");
    // `crictl info`: every value is JSON an operator can read.
    let info = |k: &str| -> serde_json::Value {
        let v = s
            .info
            .get(k)
            .unwrap_or_else(|| panic!("no {k} in {:?}", s.info));
        serde_json::from_str(v).unwrap_or_else(|e| panic!("{k} is not JSON ({e}): {v}"))
    };
    let config = info("config");
    assert_eq!(config["root"], d.root().display().to_string());
    assert_eq!(config["socket"], d.socket().display().to_string());
    assert_eq!(config["cgroup_driver"], "cgroupfs");
    assert_eq!(info("version")["runtimeVersion"], env!("CARGO_PKG_VERSION"));
    let handlers = info("runtimeHandlers");
    assert_eq!(handlers["defaultRuntime"], "runc");
    let runc = handlers["handlers"]
        .as_array()
        .expect("handlers")
        .iter()
        .find(|h| h["name"] == "runc")
        .expect("runc")
        .clone();
    assert_eq!(runc["default"], true);
    assert!(
        runc["version"].as_str().is_some_and(|v| v.contains("runc")),
        "runc --version: {runc}"
    );
    assert!(handlers["features"]["recursiveReadOnlyMounts"].is_boolean());
    let network = info("network");
    assert_eq!(network["mode"], "native");
    assert_eq!(network["ready"], true);
    assert_eq!(
        network["bridge"],
        d.net_slot().expect("own bridge").bridge()
    );
    assert_eq!(info("cgroup")["driver"], "cgroupfs");
    let quiet = rt
        .status(cri::StatusRequest { verbose: false })
        .await
        .expect("status")
        .into_inner();
    assert!(quiet.info.is_empty(), "not verbose: no info");
    assert!(!quiet.runtime_handlers.is_empty());

    let rc = rt
        .runtime_config(cri::RuntimeConfigRequest::default())
        .await
        .expect("runtime config")
        .into_inner();
    assert_eq!(
        rc.linux.expect("linux").cgroup_driver,
        cri::CgroupDriver::Cgroupfs as i32
    );

    let e = rt
        .checkpoint_container(cri::CheckpointContainerRequest::default())
        .await
        .expect_err("not built");
    assert_eq!(e.code(), tonic::Code::Unimplemented);
    let e = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest::default())
        .await
        .expect_err("no config");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
}

/// In CNI mode the network is not ready while no conflist exists, and becomes ready once one
/// is written.
#[tokio::test]
async fn cni_network_ready_follows_the_conflist() {
    let conf_dir = tempfile::tempdir().expect("tempdir");
    let d = Berthd::start(
        BerthdConfig::new()
            .daemon_default_network()
            .network_line("mode = \"cni\"")
            .table(&format!(
                "[cni]\nconf_dir = {}\nbin_dirs = [\"/usr/lib/cni\"]",
                common::toml_str(&conf_dir.path().to_string_lossy())
            )),
    )
    .await;
    let mut rt = d.runtime_client().await;
    let network_ready = |s: cri::StatusResponse| {
        s.status
            .expect("status")
            .conditions
            .into_iter()
            .find(|c| c.r#type == "NetworkReady")
            .expect("NetworkReady")
    };
    let c = network_ready(
        rt.status(cri::StatusRequest::default())
            .await
            .expect("status")
            .into_inner(),
    );
    assert!(!c.status);
    assert!(c.message.contains("no network config"), "{}", c.message);
    std::fs::write(
        conf_dir.path().join("10-test.conflist"),
        r#"{"cniVersion":"1.0.0","name":"t","plugins":[{"type":"loopback"}]}"#,
    )
    .expect("write conflist");
    let c = network_ready(
        rt.status(cri::StatusRequest::default())
            .await
            .expect("status")
            .into_inner(),
    );
    assert!(c.status, "{}", c.message);
}

/// A hand-made HTTP/2 client on a raw unix socket, to send request headers exactly as
/// grpc-java, Python gRPC or `grpcurl -unix` do (the socket path as `:authority`), which
/// tonic's client cannot.
mod raw_h2 {
    use std::path::Path;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixStream;

    pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    pub const DATA: u8 = 0x0;
    pub const HEADERS: u8 = 0x1;
    pub const RST_STREAM: u8 = 0x3;
    pub const SETTINGS: u8 = 0x4;
    pub const PING: u8 = 0x6;
    pub const GOAWAY: u8 = 0x7;
    pub const CONTINUATION: u8 = 0x9;
    pub const END_STREAM: u8 = 0x1;
    pub const ACK: u8 = 0x1;
    pub const END_HEADERS: u8 = 0x4;

    pub type Fields = Vec<(String, String)>;

    pub struct Frame {
        pub kind: u8,
        pub flags: u8,
        pub stream: u32,
        pub payload: Vec<u8>,
    }

    /// What came back on one stream.
    #[derive(Debug, Default)]
    pub struct Response {
        pub headers: Fields,
        pub data: Vec<u8>,
        pub trailers: Fields,
    }

    impl Response {
        pub fn header(&self, name: &str) -> Option<&str> {
            find(&self.headers, name)
        }
        pub fn trailer(&self, name: &str) -> Option<&str> {
            find(&self.trailers, name)
        }
    }

    fn find<'a>(fields: &'a Fields, name: &str) -> Option<&'a str> {
        fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub struct Conn {
        sock: UnixStream,
        enc: loona_hpack::Encoder<'static>,
        dec: loona_hpack::Decoder<'static>,
    }

    impl Conn {
        /// Connects and sends the preface and an empty SETTINGS frame.
        pub async fn connect(path: &Path) -> Conn {
            let sock = UnixStream::connect(path).await.expect("connect");
            let mut c = Conn {
                sock,
                enc: loona_hpack::Encoder::new(),
                dec: loona_hpack::Decoder::new(),
            };
            c.write(PREFACE).await.expect("preface");
            c.frame(SETTINGS, 0, 0, &[]).await.expect("settings");
            c
        }

        async fn write(&mut self, b: &[u8]) -> std::io::Result<()> {
            self.sock.write_all(b).await
        }

        pub async fn frame(
            &mut self,
            kind: u8,
            flags: u8,
            stream: u32,
            payload: &[u8],
        ) -> std::io::Result<()> {
            let len = u32::try_from(payload.len())
                .expect("small frame")
                .to_be_bytes();
            let mut f = len[1..].to_vec();
            f.extend_from_slice(&[kind, flags]);
            f.extend_from_slice(&stream.to_be_bytes());
            f.extend_from_slice(payload);
            self.write(&f).await
        }

        /// The next frame; `None` once the daemon has closed the connection.
        pub async fn read_frame(&mut self) -> Option<Frame> {
            let mut h = [0u8; 9];
            let read = tokio::time::timeout(Duration::from_secs(20), self.sock.read_exact(&mut h))
                .await
                .expect("a frame within 20s");
            read.ok()?;
            let len = (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
            let mut payload = vec![0; len];
            self.sock.read_exact(&mut payload).await.ok()?;
            Some(Frame {
                kind: h[3],
                flags: h[4],
                stream: u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff,
                payload,
            })
        }

        /// A gRPC request: HEADERS (HPACK-encoded by this client, with its own dynamic
        /// table) and one DATA frame with `message`, ending the stream.
        pub async fn grpc_request(
            &mut self,
            stream: u32,
            path: &str,
            authority: &str,
            message: &[u8],
        ) {
            let fields: [(&[u8], &[u8]); 6] = [
                (b":method", b"POST"),
                (b":scheme", b"http"),
                (b":path", path.as_bytes()),
                (b":authority", authority.as_bytes()),
                (b"content-type", b"application/grpc"),
                (b"te", b"trailers"),
            ];
            let block = self.enc.encode(fields);
            self.frame(HEADERS, END_HEADERS, stream, &block)
                .await
                .expect("send HEADERS");
            let mut body = vec![0];
            body.extend_from_slice(&u32::try_from(message.len()).expect("small").to_be_bytes());
            body.extend_from_slice(message);
            self.frame(DATA, END_STREAM, stream, &body)
                .await
                .expect("send DATA");
        }

        /// Reads until `stream` ends, answering SETTINGS and PING, decoding every header
        /// block (the HPACK context is the connection's).
        pub async fn response(&mut self, stream: u32) -> Response {
            let mut resp = Response::default();
            let mut block: Option<(u32, u8, Vec<u8>)> = None;
            loop {
                let f = self
                    .read_frame()
                    .await
                    .unwrap_or_else(|| panic!("connection closed before stream {stream} ended"));
                match f.kind {
                    SETTINGS if f.flags & ACK == 0 => {
                        self.frame(SETTINGS, ACK, 0, &[])
                            .await
                            .expect("settings ack");
                    }
                    PING if f.flags & ACK == 0 => {
                        self.frame(PING, ACK, 0, &f.payload)
                            .await
                            .expect("ping ack");
                    }
                    GOAWAY => panic!("GOAWAY: {:?}", f.payload),
                    RST_STREAM if f.stream == stream => {
                        panic!("RST_STREAM on stream {stream}: {:?}", f.payload)
                    }
                    HEADERS => block = Some((f.stream, f.flags, f.payload)),
                    CONTINUATION => block
                        .as_mut()
                        .expect("CONTINUATION after HEADERS")
                        .2
                        .extend_from_slice(&f.payload),
                    DATA if f.stream == stream => resp.data.extend_from_slice(&f.payload),
                    _ => {}
                }
                if matches!(f.kind, HEADERS | CONTINUATION) && f.flags & END_HEADERS != 0 {
                    let (s, flags, b) = block.take().expect("a header block");
                    let fields: Fields = self
                        .dec
                        .decode(&b)
                        .expect("response headers decode")
                        .into_iter()
                        .map(|(n, v)| {
                            (
                                String::from_utf8_lossy(&n).into_owned(),
                                String::from_utf8_lossy(&v).into_owned(),
                            )
                        })
                        .collect();
                    if s == stream {
                        if resp.headers.is_empty() {
                            resp.headers = fields;
                        } else {
                            resp.trailers = fields;
                        }
                        if flags & END_STREAM != 0 {
                            return resp;
                        }
                    }
                } else if f.kind == DATA && f.stream == stream && f.flags & END_STREAM != 0 {
                    return resp;
                }
            }
        }

        /// Reads (answering nothing) until the daemon closes the connection; panics if a
        /// response arrives on `stream` instead.
        pub async fn expect_closed(&mut self, stream: u32) {
            while let Some(f) = self.read_frame().await {
                assert!(
                    f.stream != stream || f.kind == RST_STREAM,
                    "frame type {} on stream {stream} of a connection that should close",
                    f.kind
                );
            }
        }
    }
}

/// Runs Version on `stream` of `conn` with `authority` and checks the whole gRPC answer.
async fn raw_version(conn: &mut raw_h2::Conn, stream: u32, authority: &str) {
    use prost::Message as _;
    conn.grpc_request(stream, "/runtime.v1.RuntimeService/Version", authority, &[])
        .await;
    let resp = conn.response(stream).await;
    assert_eq!(resp.header(":status"), Some("200"), "{authority}: {resp:?}");
    assert_eq!(resp.header("content-type"), Some("application/grpc"));
    assert_eq!(
        resp.trailer("grpc-status"),
        Some("0"),
        "{authority}: {resp:?}"
    );
    assert!(resp.data.len() > 5, "{authority}: {resp:?}");
    assert_eq!(resp.data[0], 0, "not compressed");
    let len = u32::from_be_bytes([resp.data[1], resp.data[2], resp.data[3], resp.data[4]]);
    assert_eq!(len as usize, resp.data.len() - 5);
    let v = cri::VersionResponse::decode(&resp.data[5..]).expect("a VersionResponse");
    assert_eq!(v.runtime_name, "berth");
    assert_eq!(v.runtime_api_version, "v1");
}

/// grpc-java, Python gRPC >= 1.57, `grpcurl -unix` and grpc-go dialling a bare path put the
/// socket path in `:authority`; berthd answers them like containerd and CRI-O do, several
/// requests on one connection.
#[tokio::test]
async fn socket_path_as_authority_is_served() {
    let d = Berthd::start(BerthdConfig::new()).await;
    let mut conn = raw_h2::Conn::connect(&d.socket()).await;
    raw_version(&mut conn, 1, "/run/berth/berth.sock").await;
    // The same connection: the client's HPACK dynamic table now holds fields of the first
    // request, and the percent-encoded form of the path.
    raw_version(&mut conn, 3, "%2Frun%2Fberth%2Fberth.sock").await;
    raw_version(&mut conn, 5, "/run/berth/berth.sock").await;
    raw_version(&mut conn, 7, "localhost").await;
    raw_version(&mut conn, 9, &d.socket().to_string_lossy()).await;
}

/// A client sending an undecodable header block loses its connection; the daemon goes on
/// serving everyone else.
#[tokio::test]
async fn garbage_header_block_ends_only_that_connection() {
    let d = Berthd::start(BerthdConfig::new()).await;
    let mut good = raw_h2::Conn::connect(&d.socket()).await;
    raw_version(&mut good, 1, "/run/berth/berth.sock").await;

    let mut bad = raw_h2::Conn::connect(&d.socket()).await;
    // Indexed field 0 does not exist (RFC 7541 §6.1).
    bad.frame(
        raw_h2::HEADERS,
        raw_h2::END_HEADERS | raw_h2::END_STREAM,
        1,
        &[0x82, 0x80],
    )
    .await
    .expect("send garbage");
    bad.expect_closed(1).await;
    // A header block interrupted by another frame.
    let mut bad = raw_h2::Conn::connect(&d.socket()).await;
    bad.frame(raw_h2::HEADERS, 0, 1, &[0x83])
        .await
        .expect("send HEADERS");
    bad.frame(raw_h2::DATA, raw_h2::END_STREAM, 1, &[0; 5])
        .await
        .expect("send DATA");
    bad.expect_closed(1).await;

    // The connection opened before still works, and so do new ones.
    raw_version(&mut good, 3, "/run/berth/berth.sock").await;
    let mut rt = d.runtime_client().await;
    let v = rt
        .version(cri::VersionRequest::default())
        .await
        .expect("a normal client is served")
        .into_inner();
    assert_eq!(v.runtime_name, "berth");
    let mut again = raw_h2::Conn::connect(&d.socket()).await;
    raw_version(&mut again, 1, "%2Frun%2Fberth%2Fberth.sock").await;
}
