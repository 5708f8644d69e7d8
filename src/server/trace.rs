//! One `tracing` span per RPC: method, the ids it names (and the pod and container it
//! resolves to, see [`crate::span`]), duration and resulting status; and
//! the client's deadline (`grpc-timeout`), which ends the RPC with `DeadlineExceeded`; and
//! its count, error code and latency in [`crate::metrics`].

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use tonic::{Response, Status};
use tracing::Instrument;

static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);
static IDLE: Notify = Notify::const_new();

/// Counts an RPC as in flight while it lives.
struct InFlight;

impl InFlight {
    fn enter() -> InFlight {
        IN_FLIGHT.fetch_add(1, Ordering::SeqCst);
        InFlight
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if IN_FLIGHT.fetch_sub(1, Ordering::SeqCst) == 1 {
            IDLE.notify_waiters();
        }
    }
}

/// Completes when no RPC is in flight.
pub async fn all_rpcs_done() {
    loop {
        let idle = IDLE.notified();
        if IN_FLIGHT.load(Ordering::SeqCst) == 0 {
            return;
        }
        idle.await;
    }
}

/// The client's deadline for a request, from its `grpc-timeout` header.
pub fn deadline<T>(request: &tonic::Request<T>) -> Option<Duration> {
    request
        .metadata()
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout)
}

/// Parses a gRPC timeout: up to 8 digits and a unit (H, M, S, m, u, n).
fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Runs a state-changing RPC's body in a task of its own, in the RPC's span: a client that
/// gives up, or a deadline that passes, stops the wait for it, never the change half-way (a
/// container started but not recorded as such, a stop that sent SIGTERM and never SIGKILL).
/// The task ends the change; the client's next call sees its result.
pub async fn detached<T, F>(body: F) -> Result<T, Status>
where
    T: Send + 'static,
    F: Future<Output = Result<T, Status>> + Send + 'static,
{
    tokio::spawn(body.in_current_span())
        .await
        .unwrap_or_else(|e| Err(Status::internal(format!("the RPC's task ended: {e}"))))
}

/// Runs an RPC body inside a span named after the method, within the client's deadline,
/// logging its outcome.
pub async fn rpc<T, F>(
    method: &'static str,
    id: &str,
    deadline: Option<Duration>,
    body: F,
) -> Result<Response<T>, Status>
where
    F: Future<Output = Result<T, Status>>,
{
    // The ids and names of the pod and container are filled in by whoever resolves them
    // (see `crate::span`).
    let span = tracing::info_span!(
        "rpc",
        method,
        id = %id,
        pod_id = tracing::field::Empty,
        pod = tracing::field::Empty,
        container_id = tracing::field::Empty,
        container = tracing::field::Empty,
    );
    async move {
        let _in_flight = InFlight::enter();
        let start = Instant::now();
        let result = match deadline {
            Some(d) => tokio::time::timeout(d, body).await.unwrap_or_else(|_| {
                Err(Status::deadline_exceeded(format!(
                    "{method}: the client's deadline of {d:?} passed"
                )))
            }),
            None => body.await,
        };
        let elapsed = start.elapsed();
        crate::metrics::observe_rpc(method, result.as_ref().err().map(|s| s.code()), elapsed);
        let ms = elapsed.as_secs_f64() * 1000.0;
        match &result {
            Ok(_) => tracing::debug!(ms, "ok"),
            Err(s) if s.code() == tonic::Code::Unimplemented => {
                tracing::debug!(ms, "unimplemented")
            }
            Err(s) => tracing::warn!(ms, code = ?s.code(), message = %s.message(), "failed"),
        }
        result.map(Response::new)
    }
    .instrument(span)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse() {
        assert_eq!(parse_grpc_timeout("1m"), Some(Duration::from_millis(1)));
        assert_eq!(parse_grpc_timeout("300S"), Some(Duration::from_secs(300)));
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(
            parse_grpc_timeout("99999u"),
            Some(Duration::from_micros(99999))
        );
        for bad in ["", "S", "1x", "123456789S", "-1S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad}");
        }
    }
}
