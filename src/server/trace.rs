//! One `tracing` span per RPC: method, the ids it names, duration and resulting status.

use std::future::Future;
use std::time::Instant;

use tonic::{Response, Status};
use tracing::Instrument;

/// Runs an RPC body inside a span named after the method, logging its outcome.
pub async fn rpc<T, F>(method: &'static str, id: &str, body: F) -> Result<Response<T>, Status>
where
    F: Future<Output = Result<T, Status>>,
{
    let span = tracing::info_span!("rpc", method, id = %id);
    async move {
        let start = Instant::now();
        let result = body.await;
        let ms = start.elapsed().as_secs_f64() * 1000.0;
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
