//! A TCP proxy on 127.0.0.1 for registry traffic: counts HTTP requests (method + path)
//! going upstream, and can throttle or stall the bytes coming back.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use super::registry::{BackgroundServer, find_subslice, parse_request_head};

/// One request seen by the proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxiedRequest {
    pub method: String,
    /// Path without query string, e.g. `/v2/test/busybox/blobs/sha256:…`.
    pub path: String,
    pub at: Instant,
}

struct ProxyState {
    upstream: SocketAddr,
    /// Bytes per second from upstream to clients, over all connections (0 = unlimited).
    rate: AtomicU64,
    /// Stop forwarding upstream->client bytes once this many were forwarded in total.
    stall_after: AtomicU64,
    /// Bytes forwarded upstream->client so far.
    forwarded: AtomicU64,
    /// Refuse (close) new connections.
    refuse: AtomicBool,
    /// Cut a connection once it has forwarded this many upstream->client bytes…
    cut_after: AtomicU64,
    /// …this many more times (bytes counted since the last `cut_connections_after`).
    cuts_left: AtomicU64,
    /// Bumped by each `cut_connections_after`: connections count their bytes afresh.
    cut_generation: AtomicU64,
    connections: AtomicU64,
    requests: Mutex<Vec<ProxiedRequest>>,
    /// Token-bucket clock of the rate limiter: when the next byte may go.
    next_free: Mutex<Instant>,
}

/// See the module docs. Stops (closing every connection) on drop.
pub struct Proxy {
    port: u16,
    state: Arc<ProxyState>,
    _server: BackgroundServer,
}

impl Proxy {
    /// Starts a proxy to `upstream` (e.g. [`super::Registry::addr`]).
    pub fn start(upstream: SocketAddr) -> Proxy {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        listener.set_nonblocking(true).expect("nonblocking proxy");
        let port = listener.local_addr().expect("proxy addr").port();
        let state = Arc::new(ProxyState {
            upstream,
            rate: AtomicU64::new(0),
            stall_after: AtomicU64::new(u64::MAX),
            forwarded: AtomicU64::new(0),
            refuse: AtomicBool::new(false),
            cut_after: AtomicU64::new(u64::MAX),
            cuts_left: AtomicU64::new(0),
            cut_generation: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            requests: Mutex::new(Vec::new()),
            next_free: Mutex::new(Instant::now()),
        });
        let st = state.clone();
        let server = BackgroundServer::spawn("test-proxy", move || async move {
            let listener = match tokio::net::TcpListener::from_std(listener) {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("proxy listener: {e}");
                    return;
                }
            };
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    // e.g. EMFILE: do not spin.
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    continue;
                };
                if st.refuse.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                st.connections.fetch_add(1, Ordering::SeqCst);
                let st = st.clone();
                tokio::spawn(async move {
                    let _ = handle_conn(client, st).await;
                });
            }
        });
        Proxy {
            port,
            state,
            _server: server,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT`: use it as the registry host of image references or as a mirror.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.host())
    }

    /// Limits upstream->client bandwidth (all connections together); `None` = unlimited.
    pub fn set_rate_limit(&self, bytes_per_sec: Option<u64>) {
        self.state
            .rate
            .store(bytes_per_sec.unwrap_or(0), Ordering::SeqCst);
        if let Ok(mut n) = self.state.next_free.lock() {
            *n = Instant::now();
        }
    }

    /// Stops forwarding upstream->client bytes once `bytes` bytes in total have been
    /// forwarded (counting from the proxy's start). Connections stay open, silent.
    pub fn stall_after(&self, bytes: u64) {
        self.state.stall_after.store(bytes, Ordering::SeqCst);
    }

    /// Stops forwarding from now on.
    pub fn stall(&self) {
        let now = self.bytes_forwarded();
        self.stall_after(now);
    }

    /// Forwards again (undoes [`Self::stall`]/[`Self::stall_after`]).
    pub fn resume(&self) {
        self.state.stall_after.store(u64::MAX, Ordering::SeqCst);
    }

    /// Whether forwarding is currently held back by a stall.
    pub fn is_stalled(&self) -> bool {
        self.bytes_forwarded() >= self.state.stall_after.load(Ordering::SeqCst)
    }

    /// The next `times` connections that forward more than `bytes` upstream->client bytes
    /// from now on are cut there (closed mid-response, as a registry or a network failing
    /// mid-layer).
    pub fn cut_connections_after(&self, bytes: u64, times: u64) {
        self.state.cut_after.store(bytes, Ordering::SeqCst);
        self.state.cuts_left.store(times, Ordering::SeqCst);
        self.state.cut_generation.fetch_add(1, Ordering::SeqCst);
    }

    /// New connections are accepted and closed immediately while `true`.
    pub fn refuse_connections(&self, refuse: bool) {
        self.state.refuse.store(refuse, Ordering::SeqCst);
    }

    /// Total upstream->client bytes forwarded.
    pub fn bytes_forwarded(&self) -> u64 {
        self.state.forwarded.load(Ordering::SeqCst)
    }

    /// Number of client connections accepted.
    pub fn connections(&self) -> u64 {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// Every request seen so far, in order.
    pub fn requests(&self) -> Vec<ProxiedRequest> {
        self.state
            .requests
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default()
    }

    /// How many `method` requests for exactly `path` were seen.
    pub fn count(&self, method: &str, path: &str) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.method == method && r.path == path)
            .count()
    }

    /// How many `GET`s of blob `digest` (any repository) were seen.
    pub fn blob_gets(&self, digest: &str) -> usize {
        let suffix = format!("/blobs/{digest}");
        self.requests()
            .iter()
            .filter(|r| r.method == "GET" && r.path.ends_with(&suffix))
            .count()
    }

    /// Forgets the recorded requests.
    pub fn reset_requests(&self) {
        if let Ok(mut r) = self.state.requests.lock() {
            r.clear();
        }
    }
}

async fn handle_conn(client: TcpStream, st: Arc<ProxyState>) -> std::io::Result<()> {
    let upstream = TcpStream::connect(st.upstream).await?;
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (ur, uw) = upstream.into_split();
    let client_gone = Arc::new(AtomicBool::new(false));
    let up = client_to_upstream(cr, uw, st.clone(), client_gone.clone());
    let down = upstream_to_client(ur, cw, st, client_gone);
    let _ = tokio::join!(up, down);
    Ok(())
}

/// Incremental parser of the client->upstream byte stream: yields `(method, path)` of
/// each request. Bodies with Content-Length are skipped; on anything it cannot follow
/// (chunked bodies, TLS) it gives up and the proxy just forwards.
#[derive(Default)]
struct RequestParser {
    head: Vec<u8>,
    body_left: u64,
    passthrough: bool,
}

impl RequestParser {
    fn feed(&mut self, data: &[u8]) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut pending = data.to_vec();
        while !self.passthrough && !pending.is_empty() {
            if self.body_left > 0 {
                let k = (self.body_left as usize).min(pending.len());
                self.body_left -= k as u64;
                pending.drain(..k);
                continue;
            }
            self.head.append(&mut pending);
            if let Some(pos) = find_subslice(&self.head, b"\r\n\r\n") {
                let rest = self.head.split_off(pos + 4);
                let head = std::mem::take(&mut self.head);
                match parse_request_head(&head) {
                    Some(req) => {
                        if req
                            .header("transfer-encoding")
                            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
                        {
                            self.passthrough = true;
                        }
                        self.body_left = req
                            .header("content-length")
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(0);
                        out.push((req.method, req.path));
                    }
                    None => self.passthrough = true,
                }
                pending = rest;
            } else if self.head.len() > 64 * 1024 || !looks_like_http(&self.head) {
                self.passthrough = true;
            }
        }
        out
    }
}

/// Forwards client bytes upstream, recording each request.
async fn client_to_upstream(
    mut cr: OwnedReadHalf,
    mut uw: OwnedWriteHalf,
    st: Arc<ProxyState>,
    client_gone: Arc<AtomicBool>,
) -> std::io::Result<()> {
    let mut buf = [0u8; 16 * 1024];
    let mut parser = RequestParser::default();
    let result = async {
        loop {
            let n = cr.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            let reqs = parser.feed(&buf[..n]);
            if !reqs.is_empty()
                && let Ok(mut r) = st.requests.lock()
            {
                let at = Instant::now();
                for (method, path) in reqs {
                    r.push(ProxiedRequest { method, path, at });
                }
            }
            uw.write_all(&buf[..n]).await?;
        }
        Ok::<(), std::io::Error>(())
    }
    .await;
    client_gone.store(true, Ordering::SeqCst);
    let _ = uw.shutdown().await;
    result
}

fn looks_like_http(head: &[u8]) -> bool {
    let n = head.len().min(8);
    head[..n]
        .iter()
        .all(|b| b.is_ascii_uppercase() || *b == b' ' || *b == b'/' || b.is_ascii_alphanumeric())
}

async fn upstream_to_client(
    mut ur: OwnedReadHalf,
    mut cw: OwnedWriteHalf,
    st: Arc<ProxyState>,
    client_gone: Arc<AtomicBool>,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 16 * 1024];
    let (mut generation, mut on_this_connection) = (0u64, 0u64);
    loop {
        let rate = st.rate.load(Ordering::SeqCst);
        // Small reads when throttled so that the limiter is smooth.
        let max = if rate == 0 {
            buf.len()
        } else {
            ((rate / 20) as usize).clamp(512, buf.len())
        };
        let n = ur.read(&mut buf[..max]).await?;
        if n == 0 {
            let _ = cw.shutdown().await;
            return Ok(());
        }
        let mut off = 0;
        while off < n {
            // Stall: forward only up to the limit, then wait.
            let limit = st.stall_after.load(Ordering::SeqCst);
            let fwd = st.forwarded.load(Ordering::SeqCst);
            if fwd >= limit {
                if client_gone.load(Ordering::SeqCst) {
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            let mut k = ((limit - fwd).min((n - off) as u64)) as usize;
            let now_generation = st.cut_generation.load(Ordering::SeqCst);
            if now_generation != generation {
                (generation, on_this_connection) = (now_generation, 0);
            }
            let cut_at = st.cut_after.load(Ordering::SeqCst);
            let cut = on_this_connection + k as u64 > cut_at
                && st
                    .cuts_left
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |c| c.checked_sub(1))
                    .is_ok();
            if cut {
                k = cut_at.saturating_sub(on_this_connection) as usize;
            }
            on_this_connection += k as u64;
            throttle(&st, k as u64).await;
            cw.write_all(&buf[off..off + k]).await?;
            st.forwarded.fetch_add(k as u64, Ordering::SeqCst);
            off += k;
            if cut {
                // Dropping the write half ends the response mid-body.
                return Ok(());
            }
        }
    }
}

async fn throttle(st: &ProxyState, bytes: u64) {
    let rate = st.rate.load(Ordering::SeqCst);
    if rate == 0 {
        return;
    }
    let wait_until = {
        let Ok(mut next) = st.next_free.lock() else {
            return;
        };
        let now = Instant::now();
        let start = if *next > now { *next } else { now };
        *next = start + Duration::from_secs_f64(bytes as f64 / rate as f64);
        start
    };
    tokio::time::sleep_until(wait_until.into()).await;
}
