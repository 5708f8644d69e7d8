//! Pod monitors started ahead of their first container: RunPodSandbox has the pod's monitor
//! launched in the background ([`Launches::start`]), because launching one (an exec and two
//! forks) takes several milliseconds that the pod's first CreateContainer would otherwise
//! wait for. Whoever needs the monitor next waits for a launch under way first
//! ([`Launches::wait`]): CreateContainer, so that it does not launch a second one, and the
//! pod's removal, so that no monitor comes up after it was shut down.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;
use tracing::Instrument;

/// The monitor launches under way, by pod id.
#[derive(Clone, Default)]
pub struct Launches {
    /// Each launch's end: `true` once it is over (a dropped sender ends it too).
    under_way: Arc<Mutex<HashMap<String, watch::Receiver<bool>>>>,
}

impl Launches {
    fn under_way(&self) -> MutexGuard<'_, HashMap<String, watch::Receiver<bool>>> {
        // A panic elsewhere never leaves the map half-changed: each change is one call.
        self.under_way
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Launches the monitor of `pod_id` in `dir` in the background. It is registered before
    /// this returns, so that a [`Launches::wait`] called after it waits for it. A launch that
    /// fails is logged; the pod's first CreateContainer tries again (and reports its error).
    pub fn start(&self, pod_id: &str, dir: PathBuf, monitor_bin: PathBuf) {
        let (done, end) = watch::channel(false);
        self.under_way().insert(pod_id.to_string(), end);
        let (me, pod) = (self.clone(), pod_id.to_string());
        tokio::spawn(
            async move {
                match super::ensure_monitor(&pod, &dir, &monitor_bin).await {
                    Ok(_) => tracing::debug!(pod = %pod, "pod monitor started ahead"),
                    Err(e) => tracing::warn!(pod = %pod, error = %e, "starting the pod's monitor"),
                }
                me.under_way().remove(&pod);
                let _ = done.send(true);
            }
            .in_current_span(),
        );
    }

    /// Waits until no launch of `pod_id`'s monitor is under way.
    pub async fn wait(&self, pod_id: &str) {
        let end = self.under_way().get(pod_id).cloned();
        if let Some(mut end) = end {
            // An error means the launch's task ended without saying so: over too.
            let _ = end.wait_for(|done| *done).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waiting_for_a_pod_without_a_launch_returns_at_once() {
        let l = Launches::default();
        tokio::time::timeout(std::time::Duration::from_secs(1), l.wait("none"))
            .await
            .expect("no launch to wait for");
    }

    #[tokio::test]
    async fn a_failed_launch_ends_and_is_forgotten() {
        let dir = tempfile::tempdir().expect("tempdir");
        let l = Launches::default();
        l.start(
            "pod",
            dir.path().join("monitor"),
            dir.path().join("no-such-binary"),
        );
        assert!(l.under_way().contains_key("pod"), "registered at once");
        tokio::time::timeout(std::time::Duration::from_secs(5), l.wait("pod"))
            .await
            .expect("the launch ends");
        assert!(l.under_way().is_empty());
    }
}
