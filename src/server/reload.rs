//! SIGHUP: berthd reads its config file (and drop-ins) again and applies what can change
//! live: `[registries]` (mirrors, TLS, host dirs) and `pull_progress_timeout`, for pulls
//! that start afterwards, and `[log] level` (unless `--log` or `RUST_LOG` set the filter).
//! Everything else that differs from the running config is named in
//! the log as needing a restart. A file that does not load leaves the running config as it
//! is (the error is logged).

use std::path::PathBuf;
use std::sync::Arc;

use crate::config::Config;
use crate::image::ImageManager;

/// The top-level config keys applied live (`log` is looked at key by key).
const LIVE: &[&str] = &["registries", "pull_progress_timeout"];

/// Sets berthd's log filter (a tracing reload handle); absent when `--log` or `RUST_LOG`
/// chose the filter, which the config does not override.
pub type LogFilterSetter = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// What a reload did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reloaded {
    /// Keys whose new values now apply.
    pub applied: Vec<String>,
    /// Keys that changed but apply only after a restart.
    pub need_restart: Vec<String>,
}

/// The top-level keys whose values differ between two configs.
fn changed_keys(running: &Config, new: &Config) -> Vec<String> {
    let (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) =
        (serde_json::to_value(running), serde_json::to_value(new))
    else {
        return Vec::new();
    };
    let mut keys: Vec<String> = a
        .keys()
        .chain(b.keys())
        .filter(|k| a.get(*k) != b.get(*k))
        .cloned()
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

/// Applies what can change live of `new` over `running` (which is updated to match, for
/// those keys only).
pub fn apply(
    running: &mut Config,
    new: &Config,
    images: &ImageManager,
    log: Option<&LogFilterSetter>,
) -> Reloaded {
    let mut out = Reloaded::default();
    for key in changed_keys(running, new) {
        if LIVE.contains(&key.as_str()) {
            out.applied.push(key);
        } else if key != "log" {
            out.need_restart.push(key);
        }
    }
    if running.log.format != new.log.format {
        out.need_restart.push("log.format".to_string());
    }
    if running.log.level != new.log.level {
        match log.map(|set| set(&new.log.level)) {
            Some(Ok(())) => {
                running.log.level = new.log.level.clone();
                out.applied.push("log.level".to_string());
            }
            Some(Err(e)) => {
                tracing::warn!(level = %new.log.level, error = %e, "SIGHUP: log level not applied");
                out.need_restart.push("log.level".to_string());
            }
            None => out
                .need_restart
                .push("log.level (--log or RUST_LOG chose the filter)".to_string()),
        }
    }
    if !out.applied.is_empty() {
        running.registries = new.registries.clone();
        running.pull_progress_timeout = new.pull_progress_timeout;
        images.set_registries(new.registries.clone(), new.pull_progress_timeout);
    }
    out
}

/// Reloads `path` on every SIGHUP until the task is dropped.
pub async fn on_sighup(
    path: PathBuf,
    mut running: Config,
    images: Arc<ImageManager>,
    log: Option<LogFilterSetter>,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot watch SIGHUP: config reloads need a restart");
        return;
    };
    while hup.recv().await.is_some() {
        let loaded = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || Config::load(&path)).await
        };
        let new = match loaded {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                tracing::error!(config = %path.display(), error = %e, "SIGHUP: the config does not load; keeping the running one");
                continue;
            }
            Err(e) => {
                tracing::error!(error = %e, "SIGHUP: reload failed");
                continue;
            }
        };
        let r = apply(&mut running, &new, &images, log.as_ref());
        tracing::info!(
            config = %path.display(),
            applied = ?r.applied,
            needs_restart = ?r.need_restart,
            "SIGHUP: config reloaded"
        );
        if !r.need_restart.is_empty() {
            tracing::warn!(keys = ?r.need_restart, "SIGHUP: these changes apply after a restart");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_keys_name_what_differs() {
        let a = Config::default();
        let mut b = a.clone();
        assert!(changed_keys(&a, &b).is_empty());
        b.registries.config_path = Some("/x".to_string());
        b.pull_progress_timeout = std::time::Duration::from_secs(7);
        b.cdi.enabled = !b.cdi.enabled;
        assert_eq!(
            changed_keys(&a, &b),
            vec!["cdi", "pull_progress_timeout", "registries"]
        );
    }
}
