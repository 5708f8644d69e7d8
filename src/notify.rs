//! systemd's readiness protocol (`sd_notify`), without libsystemd: a datagram to the unix
//! socket named by `$NOTIFY_SOCKET` (a path, or `@name` for the abstract namespace). berthd
//! says `READY=1` once its state is repaired and the CRI socket serves, and `STOPPING=1` when
//! it begins to stop. Without `$NOTIFY_SOCKET` (not under systemd) nothing is sent.

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::OnceLock;

/// The socket taken from the environment at start (see [`take_from_env`]).
static SOCKET: OnceLock<Option<String>> = OnceLock::new();

/// Reads `$NOTIFY_SOCKET` once and removes it from the environment, so that the processes
/// berthd starts (monitors, runtimes, containers) do not talk to systemd as if they were
/// berthd. Call it before any thread starts.
pub fn take_from_env() {
    SOCKET.get_or_init(|| {
        let v = std::env::var("NOTIFY_SOCKET")
            .ok()
            .filter(|s| !s.is_empty());
        // SAFETY: called from `main` before the async runtime or any other thread exists.
        unsafe { std::env::remove_var("NOTIFY_SOCKET") };
        v
    });
}

/// Sends `state` (e.g. `READY=1`); failures are logged, never fatal.
pub fn notify(state: &str) {
    let Some(Some(addr)) = SOCKET.get() else {
        return;
    };
    if let Err(e) = send(addr, state) {
        tracing::warn!(socket = %addr, state, error = %e, "sd_notify failed");
    }
}

fn send(addr: &str, state: &str) -> std::io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    if let Some(name) = addr.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        let a = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
        sock.send_to_addr(state.as_bytes(), &a)?;
    } else {
        sock.send_to(state.as_bytes(), PathBuf::from(addr))?;
    }
    Ok(())
}
