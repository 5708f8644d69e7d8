//! Shared integration-test harness for berth.
//!
//! Included by every integration test binary with `mod common;`. It provides:
//!
//! * [`Registry`]: a real `docker-registry` (CNCF distribution 2.8) on 127.0.0.1 with
//!   anonymous, htpasswd, bearer-token and TLS variants;
//! * [`LayerBuilder`], [`ImageBuilder`], [`IndexBuilder`]: test images made from
//!   Debian's `busybox-static`, hostile layers, random data layers;
//! * [`Proxy`]: a TCP proxy that throttles, stalls and counts HTTP requests;
//! * [`Berthd`]: a `berthd` launcher with its own dirs, socket and config, CRI clients,
//!   kill -9 / restart, and RAII cleanup (processes, mounts, dirs);
//! * [`OverlayMount`]: a read-only overlay of snapshot dirs, unmounted on drop;
//! * CRI helpers in [`cri`]; the streaming tests' shared steps in [`stream`].
//!
//! Every object cleans up in `Drop`, so tests clean up even when they panic. Nothing uses
//! fixed ports or paths, so tests can run in parallel.
#![allow(dead_code, unused_imports)]

pub mod berthd;
pub mod cri;
pub mod image;
pub mod nri_plugin;
pub mod proxy;
pub mod registry;
pub mod stream;

pub use berthd::*;
pub use cri::*;
pub use image::*;
pub use proxy::*;
pub use registry::*;

use std::future::Future;
use std::path::Path;
use std::sync::Once;
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};

/// Installs the rustls crypto provider (ring) once per process. Every harness entry point
/// that may open TLS connections calls it; tests may call it too.
pub fn init() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Another part of the process may have installed one already; that is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// Hex sha256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// `sha256:<hex>` digest of `data`.
pub fn digest_of(data: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(data))
}

/// The hex part of a `sha256:<hex>` digest (or the input when it has no algorithm prefix).
pub fn digest_hex(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}

/// Hex sha256 of a file's contents.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(hex::encode(h.finalize()))
}

/// A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, then release).
/// Callers that start a server on it must handle the (rare) race by retrying.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr").port()
}

/// A 127.0.0.1 port that is bound but not listening: connecting to it is refused, and no
/// other test can take it while the returned socket lives.
pub fn refused_port() -> (tokio::net::TcpSocket, u16) {
    let sock = tokio::net::TcpSocket::new_v4().expect("create TCP socket");
    sock.bind(std::net::SocketAddr::from(([127, 0, 0, 1], 0)))
        .expect("bind 127.0.0.1:0");
    let port = sock.local_addr().expect("local_addr").port();
    (sock, port)
}

/// Polls `f` every 50ms until it returns `Some`, or panics after `timeout` naming `what`.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Blocking variant of [`wait_for`] for sync code.
pub fn wait_for_blocking<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Deterministic pseudo-random bytes (xorshift64*), fast and incompressible enough for
/// layer-size tests. The same `(len, seed)` always gives the same bytes.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed ^ 0x9E37_79B9_7F4A_7C15;
    if state == 0 {
        state = 1;
    }
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        let v = state.wrapping_mul(0x2545_F491_4F6C_DD1D);
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Runs a command to completion, panicking with its output when it fails.
pub fn run_cmd(cmd: &mut std::process::Command) -> std::process::Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// The last `max` bytes of a text file (lossy UTF-8), or a note when it cannot be read.
pub fn tail_file(path: &Path, max: usize) -> String {
    match std::fs::read(path) {
        Ok(data) => {
            let start = data.len().saturating_sub(max);
            let mut s = String::new();
            if start > 0 {
                s.push_str(&format!("[... {start} bytes omitted ...]\n"));
            }
            s.push_str(&String::from_utf8_lossy(&data[start..]));
            s
        }
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}
