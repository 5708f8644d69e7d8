//! Per-object locks: RPCs on different objects run in parallel, RPCs on one object in turn.

use std::collections::HashMap;
use std::sync::{Arc, Mutex as StdMutex, Weak};

/// Per-key async locks that disappear when nobody holds them.
#[derive(Default)]
pub struct KeyedLocks {
    map: StdMutex<HashMap<String, Weak<tokio::sync::Mutex<()>>>>,
}

impl KeyedLocks {
    /// Locks `key`, waiting for its current holder.
    pub async fn lock(&self, key: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let m = {
            let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
            map.retain(|_, w| w.strong_count() > 0);
            match map.get(key).and_then(Weak::upgrade) {
                Some(m) => m,
                None => {
                    let m = Arc::new(tokio::sync::Mutex::new(()));
                    map.insert(key.to_string(), Arc::downgrade(&m));
                    m
                }
            }
        };
        m.lock_owned().await
    }
}
