//! Pod monitors started ahead of their first container: RunPodSandbox has the pod's monitor
//! launched in the background ([`Launches::start`]), because launching one (an exec and two
//! forks) takes several milliseconds that the pod's first CreateContainer would otherwise
//! wait for. CreateContainer reaches the monitor through [`Launches::reach`], which waits for
//! a launch ahead first (rather than launch a second one). The pod's removal waits for every
//! launch under way ([`Launches::wait`]), ahead or of a create, so that no monitor comes up
//! after it was shut down.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;
use tracing::Instrument;

use super::{MonitorClient, MonitorError};

/// The monitor launches under way, by pod id.
#[derive(Clone, Default)]
pub struct Launches {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Default)]
struct Inner {
    /// Each launch ahead's end: `true` once it is over (a dropped sender ends it too).
    ahead: HashMap<String, watch::Receiver<bool>>,
    /// How many CreateContainers are reaching each pod's monitor (and may launch it).
    reaching: HashMap<String, watch::Sender<usize>>,
}

/// One CreateContainer reaching its pod's monitor; counted until dropped.
struct Reaching {
    launches: Launches,
    pod: String,
}

impl Drop for Reaching {
    fn drop(&mut self) {
        let mut inner = self.launches.inner();
        if let Some(count) = inner.reaching.get(&self.pod) {
            count.send_modify(|n| *n = n.saturating_sub(1));
            if *count.borrow() == 0 {
                inner.reaching.remove(&self.pod);
            }
        }
    }
}

impl Launches {
    fn inner(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere never leaves the maps half-changed: each change is one call.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Launches the monitor of `pod_id` in `dir` in the background. It is registered before
    /// this returns, so that a [`Launches::wait`] called after it waits for it. A launch that
    /// fails is logged; the pod's first CreateContainer tries again (and reports its error).
    pub fn start(&self, pod_id: &str, dir: PathBuf, monitor_bin: PathBuf) {
        let (done, end) = watch::channel(false);
        self.inner().ahead.insert(pod_id.to_string(), end);
        let (me, pod) = (self.clone(), pod_id.to_string());
        tokio::spawn(
            async move {
                match super::ensure_monitor(&pod, &dir, &monitor_bin).await {
                    Ok(_) => tracing::debug!(pod = %pod, "pod monitor started ahead"),
                    Err(e) => tracing::warn!(pod = %pod, error = %e, "starting the pod's monitor"),
                }
                me.inner().ahead.remove(&pod);
                let _ = done.send(true);
            }
            .in_current_span(),
        );
    }

    /// Connects to the monitor of `pod_id` in a task of its own (CreateContainer goes on
    /// meanwhile), once a launch ahead is over, launching it if none runs. It is counted from
    /// this call to the task's end, whether or not anyone awaits the task: the pod's removal
    /// ([`Launches::wait`]) never misses a monitor that a failed create launched.
    pub fn reach(
        &self,
        pod_id: &str,
        dir: PathBuf,
        monitor_bin: PathBuf,
    ) -> tokio::task::JoinHandle<Result<MonitorClient, MonitorError>> {
        self.inner()
            .reaching
            .entry(pod_id.to_string())
            .or_insert_with(|| watch::channel(0).0)
            .send_modify(|n| *n += 1);
        let reaching = Reaching {
            launches: self.clone(),
            pod: pod_id.to_string(),
        };
        let (me, pod) = (self.clone(), pod_id.to_string());
        tokio::spawn(
            async move {
                let _counted = reaching;
                me.wait_ahead(&pod).await;
                super::ensure_monitor(&pod, &dir, &monitor_bin).await
            }
            .in_current_span(),
        )
    }

    async fn wait_ahead(&self, pod_id: &str) {
        let end = self.inner().ahead.get(pod_id).cloned();
        if let Some(mut end) = end {
            // An error means the launch's task ended without saying so: over too.
            let _ = end.wait_for(|done| *done).await;
        }
    }

    /// Waits until no launch of `pod_id`'s monitor is under way: neither one ahead nor one
    /// of a CreateContainer.
    pub async fn wait(&self, pod_id: &str) {
        self.wait_ahead(pod_id).await;
        let count = self.inner().reaching.get(pod_id).map(|c| c.subscribe());
        if let Some(mut count) = count {
            let _ = count.wait_for(|n| *n == 0).await;
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
        assert!(l.inner().ahead.contains_key("pod"), "registered at once");
        tokio::time::timeout(std::time::Duration::from_secs(5), l.wait("pod"))
            .await
            .expect("the launch ends");
        assert!(l.inner().ahead.is_empty());
    }

    #[tokio::test]
    async fn a_reach_nobody_awaits_is_waited_for_until_it_ends() {
        let dir = tempfile::tempdir().expect("tempdir");
        let l = Launches::default();
        // Not awaited: as when the create fails before it needs the monitor.
        drop(l.reach(
            "pod",
            dir.path().join("monitor"),
            dir.path().join("no-such-binary"),
        ));
        assert!(l.inner().reaching.contains_key("pod"), "counted at once");
        tokio::time::timeout(std::time::Duration::from_secs(5), l.wait("pod"))
            .await
            .expect("the reach ends");
        assert!(l.inner().reaching.is_empty(), "forgotten once over");
    }
}
