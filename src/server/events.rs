//! `GetContainerEvents`: a subscriber's stream of [`crate::events`] as CRI
//! `ContainerEventResponse`s (the pod's status and its containers' statuses as they were).
//! A subscriber that does not keep up is dropped with `ResourceExhausted` (see
//! [`subscribe`]); the runtime never waits for it.

use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc::{self, error::TrySendError};
use tonic::Status;
use tonic::codegen::BoxStream;

use super::{container, pod_sandbox};
use crate::cri::v1 as cri;
use crate::events::{Event, EventHub, Kind};

fn event_type(kind: Kind) -> cri::ContainerEventType {
    match kind {
        Kind::Created => cri::ContainerEventType::ContainerCreatedEvent,
        Kind::Started => cri::ContainerEventType::ContainerStartedEvent,
        Kind::Stopped => cri::ContainerEventType::ContainerStoppedEvent,
        Kind::Deleted => cri::ContainerEventType::ContainerDeletedEvent,
    }
}

/// The CRI form of an event.
pub fn to_response(e: &Event) -> cri::ContainerEventResponse {
    cri::ContainerEventResponse {
        container_id: e.id.clone(),
        container_event_type: event_type(e.kind) as i32,
        created_at: e.at,
        pod_sandbox_status: e.pod.as_ref().map(pod_sandbox::to_status),
        containers_statuses: e.containers.iter().map(container::to_status).collect(),
    }
}

/// A new subscriber's stream: the recovery backlog, then live events.
///
/// A pump task moves events from the hub into a buffer of `[events] subscriber_buffer`
/// events that the gRPC stream drains as the client reads (HTTP/2 flow control holds the
/// stream back when the client does not). When that buffer is full the subscriber is
/// dropped at once: the pump ends (releasing its place in the hub) and the client, if it
/// reads again, gets what was buffered, then `ResourceExhausted`. The pump also ends when
/// the client goes away.
pub fn subscribe(hub: &EventHub) -> BoxStream<cri::ContainerEventResponse> {
    let (backlog, mut rx) = hub.subscribe();
    let capacity = hub.capacity();
    let (tx, out) = mpsc::channel::<cri::ContainerEventResponse>(capacity);
    let why: Arc<Mutex<Option<Status>>> = Arc::new(Mutex::new(None));
    let told = why.clone();
    tokio::spawn(async move {
        let reason = loop {
            let ev = tokio::select! {
                got = rx.recv() => got,
                () = tx.closed() => return,
            };
            let ev = match ev {
                Ok(e) => e,
                Err(RecvError::Lagged(n)) => break format!("it missed {n} events"),
                Err(RecvError::Closed) => return,
            };
            match tx.try_send(to_response(&ev)) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => {
                    break format!("it did not read its last {capacity} events");
                }
                Err(TrySendError::Closed(_)) => return,
            }
        };
        tracing::warn!(%reason, "an events subscriber fell behind; dropping it");
        *told.lock().unwrap_or_else(|p| p.into_inner()) = Some(Status::resource_exhausted(
            format!("the events subscriber fell behind ({reason}); subscribe again"),
        ));
        // `tx` goes here: the stream ends after what was buffered, with the status above.
    });
    let replay = futures_util::stream::iter(backlog.into_iter().map(|e| Ok(to_response(&e))));
    let live = futures_util::stream::unfold(Some(out), move |out| {
        let why = why.clone();
        async move {
            let mut out = out?;
            match out.recv().await {
                Some(e) => Some((Ok(e), Some(out))),
                None => why
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take()
                    .map(|status| (Err(status), None)),
            }
        }
    });
    Box::pin(replay.chain(live))
}
