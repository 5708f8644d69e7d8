//! Container and pod sandbox lifecycle events (created, started, stopped, deleted) for the
//! CRI `GetContainerEvents` stream (the kubelet's Evented PLEG).
//!
//! The managers publish into an [`EventHub`], a `tokio` broadcast channel: publishing never
//! waits, every subscriber sees the events in the order they were published, and a
//! subscriber that falls more than `[events] subscriber_buffer` events (default
//! [`CAPACITY`]) behind is dropped (its stream ends with an error) while the runtime carries
//! on. Each event carries a snapshot of the pod and
//! its containers as they were when it happened.
//!
//! Events published while the daemon recovers its state (before [`EventHub::ready`]) have
//! no subscriber yet (a container that exited while berthd was down): they are kept and
//! replayed first to each subscriber that connects within [`BACKLOG_TTL`] of the start.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use tokio::sync::broadcast;

use crate::container::manager::{ContainerManager, ContainerRecord};
use crate::ids::now_nanos;
use crate::sandbox::{SandboxManager, SandboxRecord};

/// Events a subscriber may lag behind before it is dropped, by default.
pub const CAPACITY: usize = 1024;
/// How long after the start the recovery events are replayed to new subscribers.
pub const BACKLOG_TTL: Duration = Duration::from_secs(120);

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Created,
    Started,
    Stopped,
    Deleted,
}

/// One lifecycle event of a container (or of a pod sandbox, then `id == pod_id`).
#[derive(Debug, Clone)]
pub struct Event {
    pub kind: Kind,
    /// The container's id, or the sandbox's for a sandbox event.
    pub id: String,
    pub pod_id: String,
    /// Nanoseconds since the epoch.
    pub at: i64,
    /// The pod as it was (none once it was removed).
    pub pod: Option<SandboxRecord>,
    /// The pod's containers as they were.
    pub containers: Vec<ContainerRecord>,
}

/// The fan-out point of lifecycle events.
pub struct EventHub {
    tx: broadcast::Sender<Arc<Event>>,
    capacity: usize,
    /// Events of the recovery, and whether recovery is over.
    backlog: Mutex<(Vec<Arc<Event>>, bool)>,
    started: Instant,
    /// Containers whose stop was published (an exit is noticed by whoever reads it first;
    /// it is published once).
    stopped: Mutex<HashSet<String>>,
    sandboxes: OnceLock<Weak<SandboxManager>>,
    containers: OnceLock<Weak<ContainerManager>>,
}

impl Default for EventHub {
    fn default() -> Self {
        EventHub::new()
    }
}

impl EventHub {
    pub fn new() -> EventHub {
        EventHub::with_capacity(CAPACITY)
    }

    /// A hub whose subscribers may lag `capacity` events (at least 1) behind.
    pub fn with_capacity(capacity: usize) -> EventHub {
        let capacity = capacity.max(1);
        let (tx, _) = broadcast::channel(capacity);
        EventHub {
            tx,
            capacity,
            backlog: Mutex::new((Vec::new(), false)),
            started: Instant::now(),
            stopped: Mutex::new(HashSet::new()),
            sandboxes: OnceLock::new(),
            containers: OnceLock::new(),
        }
    }

    /// Where the snapshots of pods and their containers come from (set once both managers
    /// exist).
    pub fn set_sources(&self, sandboxes: &Arc<SandboxManager>, containers: &Arc<ContainerManager>) {
        let _ = self.sandboxes.set(Arc::downgrade(sandboxes));
        let _ = self.containers.set(Arc::downgrade(containers));
    }

    /// How many events a subscriber may lag behind.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Recovery is over: events from now on go to subscribers only.
    pub fn ready(&self) {
        self.backlog.lock().unwrap_or_else(|p| p.into_inner()).1 = true;
    }

    /// Publishes an event; `fresh` are records newer than the managers' indexes hold (the
    /// object the event is about, just changed). Never blocks.
    pub fn publish(
        &self,
        kind: Kind,
        id: &str,
        pod_id: &str,
        fresh_pod: Option<&SandboxRecord>,
        fresh_container: Option<&ContainerRecord>,
    ) {
        if kind == Kind::Stopped && id != pod_id {
            let mut stopped = self.stopped.lock().unwrap_or_else(|p| p.into_inner());
            if !stopped.insert(id.to_string()) {
                return;
            }
        }
        if kind == Kind::Deleted && id != pod_id {
            self.stopped
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(id);
        }
        let pod = fresh_pod.cloned().or_else(|| {
            self.sandboxes
                .get()
                .and_then(Weak::upgrade)
                .and_then(|s| s.get(pod_id).ok())
        });
        let mut containers = self
            .containers
            .get()
            .and_then(Weak::upgrade)
            .map(|c| c.records_in_pod(pod_id))
            .unwrap_or_default();
        if let Some(fresh) = fresh_container {
            containers.retain(|c| c.id != fresh.id);
            if kind != Kind::Deleted {
                containers.push(fresh.clone());
            }
        }
        if kind == Kind::Deleted {
            containers.retain(|c| c.id != id);
        }
        containers.sort_by_key(|c| c.created_at);
        let event = Arc::new(Event {
            kind,
            id: id.to_string(),
            pod_id: pod_id.to_string(),
            at: now_nanos(),
            pod: if kind == Kind::Deleted && id == pod_id {
                None
            } else {
                pod
            },
            containers,
        });
        let mut backlog = self.backlog.lock().unwrap_or_else(|p| p.into_inner());
        if !backlog.1 {
            backlog.0.push(event.clone());
        }
        // No subscriber is not an error: nobody is listening.
        let _ = self.tx.send(event);
    }

    /// A new subscriber: the recovery events (within [`BACKLOG_TTL`] of the start), then
    /// a receiver of everything published from now on.
    pub fn subscribe(&self) -> (Vec<Arc<Event>>, broadcast::Receiver<Arc<Event>>) {
        let backlog = self.backlog.lock().unwrap_or_else(|p| p.into_inner());
        let rx = self.tx.subscribe();
        let replay = if self.started.elapsed() < BACKLOG_TTL {
            backlog.0.clone()
        } else {
            Vec::new()
        };
        (replay, rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscribers_get_events_in_order_and_stops_once() {
        let hub = EventHub::new();
        hub.ready();
        let (backlog, mut a) = hub.subscribe();
        let (_, mut b) = hub.subscribe();
        assert!(backlog.is_empty());
        hub.publish(Kind::Created, "c1", "p1", None, None);
        hub.publish(Kind::Started, "c1", "p1", None, None);
        hub.publish(Kind::Stopped, "c1", "p1", None, None);
        hub.publish(Kind::Stopped, "c1", "p1", None, None);
        hub.publish(Kind::Deleted, "c1", "p1", None, None);
        for rx in [&mut a, &mut b] {
            let mut kinds = Vec::new();
            while let Ok(e) = rx.try_recv() {
                kinds.push(e.kind);
            }
            assert_eq!(
                kinds,
                [Kind::Created, Kind::Started, Kind::Stopped, Kind::Deleted]
            );
        }
    }

    #[test]
    fn a_lagging_subscriber_is_told_and_publishing_never_blocks() {
        let hub = EventHub::new();
        hub.ready();
        let (_, mut slow) = hub.subscribe();
        for n in 0..CAPACITY + 10 {
            hub.publish(Kind::Created, &format!("c{n}"), "p", None, None);
        }
        assert!(matches!(
            slow.try_recv(),
            Err(broadcast::error::TryRecvError::Lagged(_))
        ));
    }

    #[test]
    fn recovery_events_are_replayed_to_subscribers() {
        let hub = EventHub::new();
        hub.publish(Kind::Stopped, "c1", "p1", None, None);
        hub.ready();
        hub.publish(Kind::Deleted, "c1", "p1", None, None);
        let (backlog, _) = hub.subscribe();
        assert_eq!(backlog.len(), 1);
        assert_eq!(backlog[0].kind, Kind::Stopped);
        assert_eq!(backlog[0].id, "c1");
    }
}
