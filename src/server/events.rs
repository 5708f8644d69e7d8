//! `GetContainerEvents`: a subscriber's stream of [`crate::events`] as CRI
//! `ContainerEventResponse`s (the pod's status and its containers' statuses as they were).
//! A subscriber that falls too far behind gets `ResourceExhausted` and its stream ends; the
//! runtime never waits for it.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::sync::broadcast::error::RecvError;
use tonic::Status;
use tonic::codegen::BoxStream;

use super::{container, pod_sandbox};
use crate::cri::v1 as cri;
use crate::events::{CAPACITY, Event, EventHub, Kind};

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
pub fn subscribe(hub: &EventHub) -> BoxStream<cri::ContainerEventResponse> {
    let (backlog, rx) = hub.subscribe();
    let state = (VecDeque::from(backlog), Some(rx));
    Box::pin(futures_util::stream::unfold(
        state,
        |(mut backlog, rx): (VecDeque<Arc<Event>>, Option<_>)| async move {
            if let Some(e) = backlog.pop_front() {
                return Some((Ok(to_response(&e)), (backlog, rx)));
            }
            let mut rx: tokio::sync::broadcast::Receiver<Arc<Event>> = rx?;
            match rx.recv().await {
                Ok(e) => Some((Ok(to_response(&e)), (backlog, Some(rx)))),
                Err(RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "an events subscriber fell behind; dropping it");
                    Some((
                        Err(Status::resource_exhausted(format!(
                            "the subscriber fell more than {CAPACITY} events behind ({n} missed); subscribe again"
                        ))),
                        (backlog, None),
                    ))
                }
                Err(RecvError::Closed) => None,
            }
        },
    ))
}
