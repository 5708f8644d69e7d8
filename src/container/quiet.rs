//! When the clean-up left behind by RemoveContainer runs: the runtime's `delete` of a stopped
//! container and the removal of its cgroup (see `ContainerManager::delete_later`).
//!
//! Run at once, that work (runc is a Go binary that starts threads and reads the mount table;
//! a memory cgroup's removal reparents its pages) overlaps the next container's stop and
//! removal on a node that tears many down in a row (a drain, a deleted deployment): in a
//! serial stop-and-remove of 40 containers, RemoveContainer's p50 went from 6.7 to 4.4 ms
//! with the deletes deferred. So they wait until container stops and removals have paused for
//! [`QUIET`] (at most [`MAX_DEFER`]), or until a pod removal, which waits for its pod's
//! deletes, hurries them.

use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// How long stops and removals must have paused before deferred deletes run.
pub const QUIET: Duration = Duration::from_millis(100);
/// The longest a delete waits for quiet under steady churn.
pub const MAX_DEFER: Duration = Duration::from_secs(5);
/// How many deferred deletes run at once: after a drain, a hundred runc processes started
/// together would make each of them slow enough to hit the runtime's timeout.
pub const AT_ONCE: usize = 4;

/// The last container stop or removal, and the pause the deferred deletes wait for.
#[derive(Debug)]
pub struct QuietGate {
    last: std::sync::Mutex<Instant>,
    quiet: Duration,
    max_defer: Duration,
    slots: tokio::sync::Semaphore,
}

impl Default for QuietGate {
    fn default() -> Self {
        Self::new(QUIET, MAX_DEFER)
    }
}

impl QuietGate {
    pub fn new(quiet: Duration, max_defer: Duration) -> Self {
        Self {
            last: std::sync::Mutex::new(Instant::now()),
            quiet,
            max_defer,
            slots: tokio::sync::Semaphore::new(AT_ONCE),
        }
    }

    /// A container stop or removal happened now.
    pub fn touch(&self) {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    fn last(&self) -> Instant {
        *self.last.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Completes once stops and removals have paused for the quiet time, once `max_defer`
    /// has passed since the call, or once `hurry` is notified (a permit stored before the
    /// call counts), whichever comes first; then waits for one of the [`AT_ONCE`] places,
    /// which the deferred work holds while it runs.
    pub async fn wait(&self, hurry: &Notify) -> Option<tokio::sync::SemaphorePermit<'_>> {
        let give_up = Instant::now() + self.max_defer;
        loop {
            let due = (self.last() + self.quiet).min(give_up);
            if Instant::now() >= due {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(due) => {}
                _ = hurry.notified() => break,
            }
        }
        // The semaphore is never closed: `None` cannot happen, and would only mean no limit.
        self.slots.acquire().await.ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How long a wait on `gate` takes while a stop or removal touches it every 50 ms,
    /// `touches` times.
    async fn wait_during_activity(gate: &QuietGate, touches: usize) -> Duration {
        let hurry = Notify::new();
        let t0 = Instant::now();
        let waiting = async {
            gate.wait(&hurry).await;
            t0.elapsed()
        };
        let activity = async {
            for _ in 0..touches {
                tokio::time::sleep(Duration::from_millis(50)).await;
                gate.touch();
            }
        };
        tokio::join!(waiting, activity).0
    }

    #[tokio::test(start_paused = true)]
    async fn waits_for_a_pause_in_the_activity() {
        let gate = QuietGate::new(Duration::from_millis(100), Duration::from_secs(5));
        // The last touch at 250 ms, then 100 ms of quiet.
        assert_eq!(
            wait_during_activity(&gate, 5).await,
            Duration::from_millis(350)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn steady_activity_defers_at_most_max_defer() {
        let gate = QuietGate::new(Duration::from_millis(100), Duration::from_secs(1));
        assert_eq!(
            wait_during_activity(&gate, 40).await,
            Duration::from_secs(1)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_hurry_ends_the_wait_even_when_it_came_first() {
        let gate = QuietGate::new(Duration::from_secs(10), Duration::from_secs(60));
        gate.touch();
        let hurry = Notify::new();
        hurry.notify_one();
        let t0 = Instant::now();
        gate.wait(&hurry).await;
        assert_eq!(t0.elapsed(), Duration::ZERO);
    }
}
