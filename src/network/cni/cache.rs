//! The result cache: per attachment (network name, container id, interface), the config
//! and arguments ADD used and the result it returned, like libcni's
//! `<cache>/results/<network>-<container id>-<ifname>` (`kind: cniCacheV1`). DEL and CHECK
//! replay from it, so a changed or removed conflist still tears down what was set up.
//!
//! An entry is written (atomically) before the first plugin runs, without a result: if
//! berthd dies during ADD, the entry says what to DEL.

use std::io::Write;
use std::path::{Path, PathBuf};

use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::network::NetworkError;

pub const CACHE_KIND: &str = "cniCacheV1";

/// One attachment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CacheEntry {
    pub kind: String,
    pub container_id: String,
    /// The network configuration list (its JSON bytes), base64 as in libcni.
    pub config: String,
    pub if_name: String,
    pub network_name: String,
    /// The netns path ADD was given (used when a pod is gone and only the cache is left).
    #[serde(default)]
    pub netns: String,
    #[serde(default)]
    pub cni_args: Vec<[String; 2]>,
    #[serde(default)]
    pub capability_args: Map<String, Value>,
    /// The final result; absent while ADD has not finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
}

impl CacheEntry {
    pub fn config_bytes(&self) -> Result<Vec<u8>, String> {
        base64::engine::general_purpose::STANDARD
            .decode(&self.config)
            .map_err(|e| format!("cached config is not base64: {e}"))
    }

    pub fn encode_config(bytes: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }
}

/// A cache file and its entry, or why it cannot be read.
pub type Found = (PathBuf, Result<CacheEntry, String>);

/// The cache directory (`<cache_dir>/results`).
pub struct Cache {
    dir: PathBuf,
}

fn io_err(context: String) -> impl FnOnce(std::io::Error) -> NetworkError {
    move |source| NetworkError::Io { context, source }
}

impl Cache {
    pub fn new(cache_dir: &Path) -> Cache {
        Cache {
            dir: cache_dir.join("results"),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn path(&self, network: &str, container_id: &str, ifname: &str) -> PathBuf {
        self.dir.join(format!("{network}-{container_id}-{ifname}"))
    }

    /// Writes an entry atomically (temp file, fsync, rename, fsync of the dir).
    pub fn write(&self, entry: &CacheEntry) -> Result<(), NetworkError> {
        std::fs::create_dir_all(&self.dir)
            .map_err(io_err(format!("create {}", self.dir.display())))?;
        let target = self.path(&entry.network_name, &entry.container_id, &entry.if_name);
        let bytes = serde_json::to_vec(entry)
            .map_err(|e| NetworkError::Invalid(format!("encode CNI cache entry: {e}")))?;
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = self.dir.join(format!(
            ".tmp-{}-{}-{n}",
            entry.container_id,
            std::process::id()
        ));
        let written = std::fs::File::create(&tmp)
            .and_then(|mut f| {
                f.write_all(&bytes)?;
                f.sync_all()
            })
            .and_then(|()| std::fs::rename(&tmp, &target));
        if let Err(source) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(NetworkError::Io {
                context: format!("write {}", target.display()),
                source,
            });
        }
        sync_dir(&self.dir)
    }

    /// Removes an entry; absent is fine.
    pub fn remove(&self, path: &Path) -> Result<(), NetworkError> {
        match std::fs::remove_file(path) {
            Ok(()) => sync_dir(&self.dir),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(NetworkError::Io {
                context: format!("remove {}", path.display()),
                source,
            }),
        }
    }

    /// The entries of one container (any network), each parsed or with why it is not.
    pub fn find(&self, container_id: &str, ifname: &str) -> Result<Vec<Found>, NetworkError> {
        let suffix = format!("-{container_id}-{ifname}");
        Ok(self
            .all()?
            .into_iter()
            .filter(|(p, e)| match e {
                Ok(e) => e.container_id == container_id && e.if_name == ifname,
                Err(_) => p
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.ends_with(&suffix)),
            })
            .collect())
    }

    /// Every entry, parsed or with why it is not.
    pub fn all(&self) -> Result<Vec<Found>, NetworkError> {
        let read = match std::fs::read_dir(&self.dir) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(NetworkError::Io {
                    context: format!("read {}", self.dir.display()),
                    source,
                });
            }
        };
        let mut out = Vec::new();
        for dirent in read {
            let dirent = dirent.map_err(io_err(format!("read {}", self.dir.display())))?;
            let name = dirent.file_name();
            if name.to_string_lossy().starts_with('.') {
                continue;
            }
            let path = dirent.path();
            let entry = std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<CacheEntry>(&b).map_err(|e| e.to_string()))
                .and_then(|e| {
                    if e.kind == CACHE_KIND {
                        Ok(e)
                    } else {
                        Err(format!("unknown cache kind {:?}", e.kind))
                    }
                });
            out.push((path, entry));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Removes temp files a crash left behind.
    pub fn remove_stale_temp_files(&self) {
        let Ok(read) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for dirent in read.flatten() {
            if dirent.file_name().to_string_lossy().starts_with(".tmp-") {
                let _ = std::fs::remove_file(dirent.path());
            }
        }
    }
}

fn sync_dir(dir: &Path) -> Result<(), NetworkError> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io_err(format!("sync {}", dir.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, net: &str) -> CacheEntry {
        CacheEntry {
            kind: CACHE_KIND.into(),
            container_id: id.into(),
            config: CacheEntry::encode_config(b"{\"name\":\"n\"}"),
            if_name: "eth0".into(),
            network_name: net.into(),
            netns: "/x".into(),
            cni_args: vec![["K".into(), "V".into()]],
            capability_args: Map::new(),
            result: Some(serde_json::json!({"ips": []})),
        }
    }

    #[test]
    fn write_find_remove() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Cache::new(dir.path());
        assert!(cache.find("aa", "eth0").expect("empty").is_empty());
        let e = entry("aa", "net-1");
        cache.write(&e).expect("write");
        cache.write(&entry("aab", "net-1")).expect("write");
        let path = dir.path().join("results/net-1-aa-eth0");
        assert!(path.exists());
        let found = cache.find("aa", "eth0").expect("find");
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].0, path);
        assert_eq!(found[0].1.as_ref().expect("parsed"), &e);
        assert_eq!(e.config_bytes().expect("base64"), b"{\"name\":\"n\"}");
        // libcni's field names.
        let raw: Value =
            serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("json");
        for key in [
            "kind",
            "containerId",
            "config",
            "ifName",
            "networkName",
            "cniArgs",
            "capabilityArgs",
            "result",
        ] {
            assert!(raw.get(key).is_some(), "{key}");
        }
        // A corrupt entry is still found by its name.
        std::fs::write(dir.path().join("results/other-bb-eth0"), "{").expect("write");
        let found = cache.find("bb", "eth0").expect("find");
        assert_eq!(found.len(), 1);
        assert!(found[0].1.is_err());
        assert_eq!(cache.all().expect("all").len(), 3);
        cache.remove(&path).expect("remove");
        cache.remove(&path).expect("remove again");
        assert!(cache.find("aa", "eth0").expect("find").is_empty());
        std::fs::write(dir.path().join("results/.tmp-x"), "").expect("write");
        cache.remove_stale_temp_files();
        assert!(!dir.path().join("results/.tmp-x").exists());
    }
}
