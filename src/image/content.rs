//! The content store: blobs (manifests, configs, layers) kept by digest under
//! `root/content/blobs/sha256/<hex>`. A blob is written to `root/content/ingest/` while its
//! digest is computed, and only a verified blob is renamed into place, so a blob that exists is
//! whole and correct. Whatever is left in `ingest/` after a crash is removed at start
//! ([`ContentStore::repair`]).
//!
//! Durability is the pull's, not the blob's: a blob is not fsynced on its own. A pull flushes
//! the filesystem once ([`super::ImageManager`] `sync_before_register`) before the image record
//! that names its blobs is committed; a blob no durable record names is collected at the next
//! start, so a power loss cannot leave a torn blob that anything uses.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};
use std::io::Write;

use super::ImageError;
use super::reference::is_digest;

static INGEST_SEQ: AtomicU64 = AtomicU64::new(0);

/// Bytes of a blob written between two writeback hints.
const WRITEBACK_EVERY: u64 = 8 << 20;

/// Blobs by digest under one directory.
#[derive(Debug, Clone)]
pub struct ContentStore {
    blobs: PathBuf,
    ingest: PathBuf,
}

impl ContentStore {
    /// Creates the directories under `root/content`.
    pub fn open(root: &Path) -> Result<ContentStore, ImageError> {
        let base = root.join("content");
        let store = ContentStore {
            blobs: base.join("blobs").join("sha256"),
            ingest: base.join("ingest"),
        };
        for d in [&store.blobs, &store.ingest] {
            std::fs::create_dir_all(d).map_err(|e| ImageError::io(d, e))?;
        }
        Ok(store)
    }

    /// Removes partial downloads left by a crash. Returns how many were removed.
    pub fn repair(&self) -> Result<usize, ImageError> {
        let mut n = 0;
        for entry in std::fs::read_dir(&self.ingest).map_err(|e| ImageError::io(&self.ingest, e))? {
            let path = entry.map_err(|e| ImageError::io(&self.ingest, e))?.path();
            std::fs::remove_file(&path).map_err(|e| ImageError::io(&path, e))?;
            n += 1;
        }
        Ok(n)
    }

    /// The directory holding everything this store owns.
    pub fn base(&self) -> PathBuf {
        self.ingest
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default()
    }

    /// Where the blob with this digest lives (it may not exist).
    pub fn path(&self, digest: &str) -> Result<PathBuf, ImageError> {
        match digest.strip_prefix("sha256:") {
            Some(hex) if is_digest(digest) => Ok(self.blobs.join(hex)),
            _ => Err(ImageError::UnsupportedDigest(digest.to_string())),
        }
    }

    pub fn exists(&self, digest: &str) -> bool {
        self.path(digest).is_ok_and(|p| p.is_file())
    }

    /// Reads a whole (small) blob such as a manifest or config.
    pub fn read(&self, digest: &str) -> Result<Vec<u8>, ImageError> {
        let p = self.path(digest)?;
        std::fs::read(&p).map_err(|e| ImageError::io(&p, e))
    }

    /// Stores bytes already in memory, verifying their digest. Returns whether it wrote them
    /// (false: the blob was stored already).
    pub fn write_all(&self, digest: &str, data: &[u8]) -> Result<bool, ImageError> {
        if self.exists(digest) {
            return Ok(false);
        }
        let mut w = self.writer(digest, Some(data.len() as u64))?;
        w.write(data)?;
        w.commit()?;
        Ok(true)
    }

    /// Starts writing a blob; [`BlobWriter::commit`] verifies and publishes it.
    pub fn writer(&self, digest: &str, size: Option<u64>) -> Result<BlobWriter, ImageError> {
        let final_path = self.path(digest)?;
        let seq = INGEST_SEQ.fetch_add(1, Ordering::Relaxed);
        let tmp = self.ingest.join(format!(
            "{}-{}-{seq}",
            &digest["sha256:".len()..],
            std::process::id()
        ));
        let file = std::fs::File::create(&tmp).map_err(|e| ImageError::io(&tmp, e))?;
        Ok(BlobWriter {
            file: Some(file),
            tmp,
            final_path,
            digest: digest.to_string(),
            expected_size: size,
            hasher: Sha256::new(),
            written: 0,
        })
    }

    /// Deletes a blob (absent is fine).
    pub fn delete(&self, digest: &str) -> Result<(), ImageError> {
        let p = self.path(digest)?;
        match std::fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ImageError::io(&p, e)),
        }
    }

    /// Every stored blob's digest.
    pub fn list(&self) -> Result<Vec<String>, ImageError> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.blobs).map_err(|e| ImageError::io(&self.blobs, e))? {
            let entry = entry.map_err(|e| ImageError::io(&self.blobs, e))?;
            if let Some(name) = entry.file_name().to_str() {
                out.push(format!("sha256:{name}"));
            }
        }
        Ok(out)
    }
}

/// A blob being written: hashed as it goes, published only if the digest matches.
/// Dropped without commit, its partial file is removed.
pub struct BlobWriter {
    file: Option<std::fs::File>,
    tmp: PathBuf,
    final_path: PathBuf,
    digest: String,
    expected_size: Option<u64>,
    hasher: Sha256,
    written: u64,
}

impl BlobWriter {
    pub fn write(&mut self, chunk: &[u8]) -> Result<(), ImageError> {
        self.written += chunk.len() as u64;
        if let Some(max) = self.expected_size
            && self.written > max
        {
            return Err(ImageError::BlobMismatch {
                digest: self.digest.clone(),
                reason: format!("more than the {max} bytes the manifest declares"),
            });
        }
        self.hasher.update(chunk);
        let Some(file) = self.file.as_mut() else {
            return Err(ImageError::io(
                &self.tmp,
                std::io::Error::other("writer closed"),
            ));
        };
        file.write_all(chunk)
            .map_err(|e| ImageError::io(&self.tmp, e))?;
        // Big blobs go to disk as they arrive (see `start_writeback`), every few MiB.
        if self.written / WRITEBACK_EVERY != (self.written - chunk.len() as u64) / WRITEBACK_EVERY {
            super::unpack::start_writeback(file);
        }
        Ok(())
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    /// Verifies size and digest and renames the blob into place (not fsynced: see the
    /// module's doc).
    pub fn commit(mut self) -> Result<(), ImageError> {
        if let Some(size) = self.expected_size
            && size != self.written
        {
            return Err(ImageError::BlobMismatch {
                digest: self.digest.clone(),
                reason: format!("got {} bytes, the manifest declares {size}", self.written),
            });
        }
        let actual = format!("sha256:{}", hex::encode(self.hasher.clone().finalize()));
        if actual != self.digest {
            return Err(ImageError::BlobMismatch {
                digest: self.digest.clone(),
                reason: format!("digest mismatch: the content hashes to {actual}"),
            });
        }
        if let Some(file) = self.file.take() {
            super::unpack::start_writeback(&file);
        }
        std::fs::rename(&self.tmp, &self.final_path)
            .map_err(|e| ImageError::io(&self.final_path, e))
    }
}

/// A blocking reader over a blob's chunks as a download sends them through a channel, which
/// spools every chunk into the content store on its way: a layer is fetched, stored, verified
/// and unpacked in one pass, on the unpacking thread. The end of the channel (its sender
/// dropped) is the end of the blob; a download that fails drops its sender and reports its
/// error itself.
pub struct SpoolingReader {
    rx: tokio::sync::mpsc::Receiver<bytes::Bytes>,
    current: bytes::Bytes,
    spool: BlobWriter,
    /// Why spooling failed (the reader then fails every read).
    failed: Option<ImageError>,
}

impl SpoolingReader {
    pub fn new(rx: tokio::sync::mpsc::Receiver<bytes::Bytes>, spool: BlobWriter) -> Self {
        SpoolingReader {
            rx,
            current: bytes::Bytes::new(),
            spool,
            failed: None,
        }
    }

    /// Reads (and spools) what is left of the blob, then verifies and publishes it.
    pub fn finish(mut self) -> Result<u64, ImageError> {
        use std::io::BufRead;
        loop {
            match self.fill_buf() {
                Ok([]) => break,
                Ok(buf) => {
                    let n = buf.len();
                    self.consume(n);
                }
                Err(e) => {
                    return Err(self
                        .failed
                        .take()
                        .unwrap_or_else(|| ImageError::io(&self.spool.tmp, e)));
                }
            }
        }
        let n = self.spool.written();
        self.spool.commit()?;
        Ok(n)
    }
}

impl std::io::BufRead for SpoolingReader {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        if let Some(e) = &self.failed {
            return Err(std::io::Error::other(e.to_string()));
        }
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(chunk) => {
                    if let Err(e) = self.spool.write(&chunk) {
                        let io = std::io::Error::other(e.to_string());
                        self.failed = Some(e);
                        return Err(io);
                    }
                    self.current = chunk;
                }
                None => break,
            }
        }
        Ok(&self.current)
    }

    fn consume(&mut self, amt: usize) {
        let amt = amt.min(self.current.len());
        bytes::Buf::advance(&mut self.current, amt);
    }
}

impl std::io::Read for SpoolingReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::io::BufRead;
        let available = self.fill_buf()?;
        let n = available.len().min(buf.len());
        buf[..n].copy_from_slice(&available[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        // After a successful commit the temp name no longer exists; otherwise remove the partial.
        let _ = std::fs::remove_file(&self.tmp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest_of(data: &[u8]) -> String {
        format!("sha256:{}", hex::encode(Sha256::digest(data)))
    }

    #[test]
    fn verified_blobs_are_kept_and_bad_ones_are_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cs = ContentStore::open(dir.path()).expect("open");
        let good = b"hello world";
        let d = digest_of(good);
        cs.write_all(&d, good).expect("good blob");
        assert_eq!(cs.read(&d).expect("read"), good);
        assert_eq!(cs.list().expect("list"), vec![d.clone()]);

        let other = digest_of(b"other");
        let e = cs.write_all(&other, b"not other").expect_err("mismatch");
        assert!(e.to_string().contains(&other), "{e}");
        assert!(!cs.exists(&other));
        assert_eq!(
            std::fs::read_dir(dir.path().join("content/ingest"))
                .expect("ingest")
                .count(),
            0
        );

        let mut w = cs.writer(&digest_of(b"abc"), Some(2)).expect("writer");
        assert!(w.write(b"abc").is_err(), "oversized blob refused");
        drop(w);
        assert_eq!(cs.repair().expect("repair"), 0);
        cs.delete(&d).expect("delete");
        assert!(!cs.exists(&d));
        assert!(cs.path("md5:abc").is_err());
    }
}
