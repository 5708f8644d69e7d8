//! The object an RPC works on, recorded in its `tracing` span (opened by
//! `server::trace::rpc` with the fields `pod_id`, `pod`, `container_id` and `container` left
//! empty): the piece that resolves an id or makes an object notes it here, so every event
//! of the RPC (and its outcome line) names the pod and container, in text and JSON logs.
//! Outside an RPC span these are no-ops.

/// Notes the pod (`id`, and `namespace/name` when known) in the current span.
pub fn note_pod(id: &str, namespace: &str, name: &str) {
    let span = tracing::Span::current();
    span.record("pod_id", id);
    if !name.is_empty() {
        span.record("pod", format!("{namespace}/{name}"));
    }
}

/// Notes the container (`id`, its name when known) and its pod's id in the current span.
pub fn note_container(id: &str, name: &str, pod_id: &str) {
    let span = tracing::Span::current();
    span.record("container_id", id);
    if !name.is_empty() {
        span.record("container", name);
    }
    if !pod_id.is_empty() {
        span.record("pod_id", pod_id);
    }
}
