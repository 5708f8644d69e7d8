//! Layer snapshots: each layer unpacked once, keyed by its chain id, into
//! `root/snapshots/<chain id hex>/fs`, ready to be an overlayfs lower dir. A snapshot is
//! unpacked into `root/snapshots/.tmp-*` and renamed into place when whole, and removed by
//! renaming it back to a `.tmp-` name first, so a crash never leaves a half snapshot under a
//! valid name; [`SnapshotStore::repair`] removes the leftovers at start.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

use super::ImageError;
use super::reference::is_digest;

const TMP_PREFIX: &str = ".tmp-";
static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

#[derive(Debug, Clone)]
pub struct SnapshotStore {
    dir: PathBuf,
}

/// The chain ids of a stack of layers from their diff ids (lowest first), as the OCI image
/// spec defines them: `chain(0) = diff(0)`, `chain(n) = sha256(chain(n-1) + " " + diff(n))`.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => format!(
                "sha256:{}",
                hex::encode(Sha256::digest(format!("{prev} {d}").as_bytes()))
            ),
        };
        out.push(next);
    }
    out
}

impl SnapshotStore {
    pub fn open(root: &Path) -> Result<SnapshotStore, ImageError> {
        let dir = root.join("snapshots");
        std::fs::create_dir_all(&dir).map_err(|e| ImageError::io(&dir, e))?;
        Ok(SnapshotStore { dir })
    }

    pub fn base(&self) -> &Path {
        &self.dir
    }

    fn dir_of(&self, chain_id: &str) -> Result<PathBuf, ImageError> {
        match chain_id.strip_prefix("sha256:") {
            Some(hex) if is_digest(chain_id) => Ok(self.dir.join(hex)),
            _ => Err(ImageError::UnsupportedDigest(chain_id.to_string())),
        }
    }

    /// The directory holding the layer's files (an overlay lower dir).
    pub fn fs_path(&self, chain_id: &str) -> Result<PathBuf, ImageError> {
        Ok(self.dir_of(chain_id)?.join("fs"))
    }

    pub fn exists(&self, chain_id: &str) -> bool {
        self.fs_path(chain_id).is_ok_and(|p| p.is_dir())
    }

    /// A fresh temporary snapshot dir; returns (the dir to commit, its `fs` to unpack into).
    pub fn prepare(&self) -> Result<(PathBuf, PathBuf), ImageError> {
        let seq = TMP_SEQ.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .dir
            .join(format!("{TMP_PREFIX}{}-{seq}", std::process::id()));
        let fs = tmp.join("fs");
        std::fs::create_dir_all(&fs).map_err(|e| ImageError::io(&fs, e))?;
        Ok((tmp, fs))
    }

    /// Publishes a prepared snapshot under its chain id. Not flushed to disk here: the pull
    /// that made it syncs the filesystem once before the image record naming it is committed,
    /// and a snapshot no durable record names is collected at the next start.
    pub fn commit(&self, tmp: &Path, chain_id: &str) -> Result<(), ImageError> {
        let dest = self.dir_of(chain_id)?;
        std::fs::rename(tmp, &dest).map_err(|e| ImageError::io(&dest, e))
    }

    /// Removes a temporary snapshot (after a failed unpack).
    pub fn discard(&self, tmp: &Path) {
        if let Err(e) = std::fs::remove_dir_all(tmp) {
            tracing::warn!(dir = %tmp.display(), error = %e, "cannot remove temporary snapshot");
        }
    }

    /// Removes a snapshot (absent is fine).
    pub fn remove(&self, chain_id: &str) -> Result<(), ImageError> {
        let dir = self.dir_of(chain_id)?;
        let seq = TMP_SEQ.fetch_add(1, Ordering::Relaxed);
        let doomed = self
            .dir
            .join(format!("{TMP_PREFIX}rm-{}-{seq}", std::process::id()));
        match std::fs::rename(&dir, &doomed) {
            Ok(()) => std::fs::remove_dir_all(&doomed).map_err(|e| ImageError::io(&doomed, e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ImageError::io(&dir, e)),
        }
    }

    /// Every committed snapshot's chain id.
    pub fn list(&self) -> Result<Vec<String>, ImageError> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(|e| ImageError::io(&self.dir, e))? {
            let entry = entry.map_err(|e| ImageError::io(&self.dir, e))?;
            if let Some(name) = entry.file_name().to_str()
                && !name.starts_with(TMP_PREFIX)
            {
                out.push(format!("sha256:{name}"));
            }
        }
        Ok(out)
    }

    /// Removes temporary snapshots left by a crash. Returns how many were removed.
    pub fn repair(&self) -> Result<usize, ImageError> {
        let mut n = 0;
        for entry in std::fs::read_dir(&self.dir).map_err(|e| ImageError::io(&self.dir, e))? {
            let entry = entry.map_err(|e| ImageError::io(&self.dir, e))?;
            if entry.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                let p = entry.path();
                std::fs::remove_dir_all(&p).map_err(|e| ImageError::io(&p, e))?;
                n += 1;
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_spec() {
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        let ids = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(ids[0], a);
        let want = format!("sha256:{}", hex::encode(Sha256::digest(format!("{a} {b}"))));
        assert_eq!(ids[1], want);
    }

    #[test]
    fn prepare_commit_remove_repair() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = SnapshotStore::open(dir.path()).expect("open");
        let id = format!("sha256:{}", "c".repeat(64));
        let (tmp, fs) = s.prepare().expect("prepare");
        std::fs::write(fs.join("f"), b"x").expect("write");
        s.commit(&tmp, &id).expect("commit");
        assert!(s.exists(&id));
        assert_eq!(s.list().expect("list"), vec![id.clone()]);
        let (_tmp2, _) = s.prepare().expect("prepare");
        assert_eq!(s.repair().expect("repair"), 1);
        s.remove(&id).expect("remove");
        assert!(!s.exists(&id));
        s.remove(&id).expect("remove twice");
    }
}
