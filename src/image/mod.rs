//! Images: pulling from registries into the content store, unpacking layers into snapshots,
//! the durable image records with their tags and digests, lookup, removal and garbage
//! collection.
//!
//! Containers hold the images they use (their rootfs image and image volumes): RemoveImage of
//! a held image fails until the containers are removed, so neither the record nor the snapshot
//! dirs that their overlays stack can go while they exist.
//!
//! A pull writes blobs and snapshots first and registers the image record last, in one store
//! transaction; anything a crash leaves unregistered is collected at the next start
//! ([`ImageManager::open`]). Garbage collection takes the `gc` lock exclusively while pulls hold
//! it shared, so it never removes what an in-flight pull is about to register.

pub mod content;
pub mod manifest;
pub mod reference;
pub mod registry;
pub mod snapshot;
pub mod unpack;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex, RwLock as StdRwLock};

use serde::{Deserialize, Serialize};

use crate::ids::now_nanos;
use sha2::{Digest, Sha256};

use crate::config::{Config, RegistriesConfig};
use crate::locks::KeyedLocks;
use crate::store::{Batch, Store, StoreError, Table};
use content::ContentStore;
use manifest::{Descriptor, ImageConfig, ManifestOrIndex};
use reference::{Reference, is_digest};
pub use registry::Credentials;
use registry::{Registries, Remote};
use snapshot::SnapshotStore;
use unpack::UnpackError;

/// Errors of the image piece.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference { reference: String, reason: String },
    #[error("image {reference:?} not found: {reason}")]
    NotFound { reference: String, reason: String },
    #[error("pulling {reference}: authentication failed: {reason}")]
    Unauthenticated { reference: String, reason: String },
    #[error("pulling {reference}: registry unavailable: {reason}")]
    Unavailable { reference: String, reason: String },
    #[error("pulling {reference}: stalled: {reason}")]
    Stalled { reference: String, reason: String },
    #[error("pulling {reference}: registry error: {reason}")]
    Registry { reference: String, reason: String },
    #[error("pulling {reference}: bad manifest: {reason}")]
    BadManifest { reference: String, reason: String },
    #[error("blob {digest} rejected: {reason}")]
    BlobMismatch { digest: String, reason: String },
    #[error("unsupported digest {0:?} (only sha256)")]
    UnsupportedDigest(String),
    #[error("layer {layer}: {source}")]
    Unpack { layer: String, source: UnpackError },
    #[error("layer {layer}: diff id {actual} does not match the config's {expected}")]
    DiffIdMismatch {
        layer: String,
        expected: String,
        actual: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("image {image:?} ({id}) is in use by container {container}")]
    InUse {
        image: String,
        id: String,
        container: String,
    },
    #[error("internal: {0}")]
    Internal(String),
}

impl ImageError {
    /// How a pull that failed with this error is counted (`berth_image_pulls_total`).
    pub fn pull_result(&self) -> &'static str {
        match self {
            ImageError::NotFound { .. } => "not_found",
            ImageError::Unauthenticated { .. } => "unauthenticated",
            ImageError::Unavailable { .. } => "unavailable",
            ImageError::Stalled { .. } => "stalled",
            ImageError::InvalidReference { .. } | ImageError::UnsupportedDigest(_) => "invalid",
            _ => "failed",
        }
    }

    pub fn io(path: &Path, source: std::io::Error) -> ImageError {
        ImageError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// One layer of an image.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct LayerRecord {
    pub digest: String,
    pub media_type: String,
    pub size: u64,
    pub diff_id: String,
    pub chain_id: String,
}

/// The durable record of an image (key: its id).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ImageRecord {
    /// `sha256:<config digest hex>`.
    pub id: String,
    /// Normalized `registry/repo:tag` names pointing at this image.
    pub repo_tags: Vec<String>,
    /// `registry/repo@digest` of the manifest (or index) it was pulled by.
    pub repo_digests: Vec<String>,
    /// The platform manifest's digest.
    pub manifest_digest: String,
    pub config_digest: String,
    pub layers: Vec<LayerRecord>,
    /// Bytes of manifest, config and compressed layers.
    pub size: u64,
    /// Nanoseconds since the epoch of the first pull.
    pub created_at: i64,
    /// The image config's `User`, if any.
    pub user: Option<String>,
    pub pinned: bool,
    /// Other blobs this image keeps (an index pulled through).
    #[serde(default)]
    pub extra_blobs: Vec<String>,
}

/// The images of one berthd.
pub struct ImageManager {
    content: ContentStore,
    snapshots: SnapshotStore,
    store: Arc<Store>,
    /// Replaced whole on a config reload (SIGHUP); a pull uses the one it started with.
    registries: StdRwLock<Registries>,
    /// In-memory index of the store's image records, by id.
    images: StdRwLock<HashMap<String, ImageRecord>>,
    /// Serializes changes to image records (tags move between images).
    records_lock: tokio::sync::Mutex<()>,
    blob_locks: KeyedLocks,
    snapshot_locks: KeyedLocks,
    pull_locks: KeyedLocks,
    gc_lock: tokio::sync::RwLock<()>,
    root: PathBuf,
    /// Image id → the containers holding it.
    holders: StdMutex<HashMap<String, BTreeSet<String>>>,
    /// Told when garbage collection removed content (the filesystem usage cache listens).
    on_collect: std::sync::OnceLock<Arc<tokio::sync::Notify>>,
    /// Blobs and snapshots written so far, and how many of them a `syncfs` has covered
    /// ([`ImageManager::sync_before_register`]).
    unsynced: AtomicU64,
    synced: AtomicU64,
}

/// The most layers an image may have (Docker's limit: an overlay mount of more lower dirs
/// outgrows the mount options' page).
pub const MAX_LAYERS: usize = 127;

/// The largest image config berth fetches (it is read whole and parsed in memory).
pub const MAX_CONFIG_BYTES: usize = 8 << 20;

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

impl ImageManager {
    /// Opens the image stores under `config.root`, repairs what a crash left (partial blobs,
    /// temporary snapshots, unregistered content) and loads the image index.
    pub fn open(config: &Config, store: Arc<Store>) -> Result<ImageManager, ImageError> {
        let content = ContentStore::open(&config.root)?;
        let snapshots = SnapshotStore::open(&config.root)?;
        let partial = content.repair()?;
        let tmp = snapshots.repair()?;
        if partial + tmp > 0 {
            tracing::info!(
                partial_blobs = partial,
                temporary_snapshots = tmp,
                "removed leftovers of an interrupted pull"
            );
        }
        let records: Vec<(String, ImageRecord)> = store.all(Table::Images)?;
        let images = records.into_iter().collect();
        let mgr = ImageManager {
            content,
            snapshots,
            store,
            registries: StdRwLock::new(Registries::new(
                config.registries.clone(),
                config.pull_progress_timeout,
            )),
            images: StdRwLock::new(images),
            records_lock: tokio::sync::Mutex::new(()),
            blob_locks: KeyedLocks::default(),
            snapshot_locks: KeyedLocks::default(),
            pull_locks: KeyedLocks::default(),
            gc_lock: tokio::sync::RwLock::new(()),
            root: config.root.clone(),
            holders: StdMutex::new(HashMap::new()),
            on_collect: std::sync::OnceLock::new(),
            unsynced: AtomicU64::new(0),
            synced: AtomicU64::new(0),
        };
        let (blobs, snaps) = mgr.collect_garbage_now()?;
        if blobs + snaps > 0 {
            tracing::info!(
                blobs,
                snapshots = snaps,
                "collected unreferenced content at start"
            );
        }
        Ok(mgr)
    }

    fn read_images(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, ImageRecord>> {
        self.images.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_images(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, ImageRecord>> {
        self.images.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces the registry settings (a config reload); pulls under way keep theirs.
    pub fn set_registries(&self, config: RegistriesConfig, progress_timeout: std::time::Duration) {
        if let Ok(mut r) = self.registries.write() {
            *r = Registries::new(config, progress_timeout);
        }
    }

    /// Pulls an image and registers it under the reference. Returns the image id.
    ///
    /// A pull that fails after it stored something (its manifest and config, the layers that
    /// did arrive) leaves none of it behind: what no image references is collected once the
    /// pull is over (in the background, after the pulls under way), as containerd's CRI
    /// plugin does when a failed pull's lease goes. A disk filled by a hostile layer is free
    /// again, and nothing of an image that never registered stays on the node.
    pub async fn pull(
        self: &Arc<Self>,
        image: &str,
        creds: &Credentials,
    ) -> Result<String, ImageError> {
        let written = self.unsynced.load(Ordering::SeqCst);
        let pulled = self.pull_once(image, creds).await;
        if pulled.is_err() && self.unsynced.load(Ordering::SeqCst) != written {
            let me = Arc::clone(self);
            tokio::spawn(async move {
                match me.collect_garbage().await {
                    Ok((blobs, snapshots)) => {
                        tracing::debug!(blobs, snapshots, "collected what a failed pull left")
                    }
                    Err(e) => tracing::warn!(error = %e, "garbage collection failed"),
                }
            });
        }
        pulled
    }

    async fn pull_once(&self, image: &str, creds: &Credentials) -> Result<String, ImageError> {
        let reference = Reference::parse(image)?;
        // Two pulls of one reference run one after the other; the second finds the content.
        let _pull = self.pull_locks.lock(&reference.to_string()).await;
        let _gc = self.gc_lock.read().await;
        let started = std::time::Instant::now();
        let registries = self
            .registries
            .read()
            .map(|r| r.clone())
            .map_err(|_| ImageError::Internal("registry settings lock poisoned".to_string()))?;
        let (remote, top_bytes, top_digest) = registries.resolve(&reference, creds).await?;
        crate::metrics::add_pulled_bytes(top_bytes.len() as u64);
        let bad = |reason: String| ImageError::BadManifest {
            reference: reference.to_string(),
            reason,
        };
        let top = ManifestOrIndex::parse(&top_bytes).map_err(bad)?;
        let mut extra_blobs = Vec::new();
        let (manifest_bytes, manifest_digest) = if top.is_index() {
            let desc =
                top.pick_platform(manifest::host_arch())
                    .ok_or_else(|| ImageError::NotFound {
                        reference: reference.to_string(),
                        reason: format!(
                            "the index has no manifest for linux/{}",
                            manifest::host_arch()
                        ),
                    })?;
            // A platform manifest stored already (verified when it was) is not fetched again.
            let bytes = if self.content.exists(&desc.digest) {
                self.content.read(&desc.digest)?
            } else {
                let bytes = remote.fetch_manifest_by_digest(&desc.digest).await?;
                crate::metrics::add_pulled_bytes(bytes.len() as u64);
                bytes
            };
            extra_blobs.push(top_digest.clone());
            (bytes, desc.digest.clone())
        } else {
            (top_bytes.clone(), top_digest.clone())
        };
        let manifest = ManifestOrIndex::parse(&manifest_bytes)
            .and_then(ManifestOrIndex::into_manifest)
            .map_err(bad)?;
        if manifest.layers.len() > MAX_LAYERS {
            return Err(bad(format!(
                "{} layers, more than the {MAX_LAYERS} an overlay mount can stack",
                manifest.layers.len()
            )));
        }
        if manifest.config.size > MAX_CONFIG_BYTES as i64 {
            return Err(bad(format!(
                "image config of {} bytes, over the limit of {MAX_CONFIG_BYTES}",
                manifest.config.size
            )));
        }
        if top.is_index() {
            self.note_written(self.content.write_all(&top_digest, &top_bytes)?);
        }
        self.note_written(self.content.write_all(&manifest_digest, &manifest_bytes)?);

        // The config: small, fetched into the content store, then parsed.
        let config_digest = manifest.config.digest.clone();
        // Bounded whatever the manifest says: a config descriptor without a size (0) would
        // otherwise be fetched, and then read into memory, whole.
        self.fetch_blob_once(
            &remote,
            &manifest.config,
            Some(("image config", MAX_CONFIG_BYTES as u64)),
        )
        .await?;
        let config_bytes = self.content.read(&config_digest)?;
        let config: ImageConfig = serde_json::from_slice(&config_bytes)
            .map_err(|e| bad(format!("image config {config_digest}: {e}")))?;
        if config.rootfs.diff_ids.len() != manifest.layers.len() {
            return Err(bad(format!(
                "{} layers but {} diff ids in the config",
                manifest.layers.len(),
                config.rootfs.diff_ids.len()
            )));
        }
        let chain = snapshot::chain_ids(&config.rootfs.diff_ids);

        // Layers: fetched and unpacked in parallel (each snapshot is its own directory).
        let jobs = manifest.layers.iter().enumerate().map(|(i, layer)| {
            let remote = &remote;
            let diff_id = config.rootfs.diff_ids[i].clone();
            let chain_id = chain[i].clone();
            async move {
                self.fetch_and_unpack(remote, layer, &diff_id, &chain_id)
                    .await?;
                Ok::<LayerRecord, ImageError>(LayerRecord {
                    digest: layer.digest.clone(),
                    media_type: layer.media_type.clone(),
                    size: layer.size as u64,
                    diff_id,
                    chain_id,
                })
            }
        });
        let layers: Vec<LayerRecord> = futures_util::future::try_join_all(jobs).await?;

        let id = config_digest.clone();
        let size = manifest_bytes.len() as u64
            + config_bytes.len() as u64
            + layers.iter().map(|l| l.size).sum::<u64>();
        let user = config
            .config
            .as_ref()
            .and_then(|c| c.user.clone())
            .filter(|u| !u.is_empty());
        let repo_digest = reference.with_digest(&top_digest);
        let t_sync = std::time::Instant::now();
        self.sync_before_register().await?;
        tracing::debug!(image = %reference, sync_ms = ms(t_sync.elapsed()), "pull flushed");
        self.register(ImageRecord {
            id: id.clone(),
            repo_tags: reference.tagged().into_iter().collect(),
            repo_digests: vec![repo_digest],
            manifest_digest,
            config_digest,
            layers,
            size,
            created_at: now_nanos(),
            user,
            pinned: false,
            extra_blobs,
        })
        .await?;
        tracing::info!(image = %reference, %id, elapsed_ms = started.elapsed().as_millis() as u64, "pulled");
        Ok(id)
    }

    /// Adds or merges an image record, moving its tags away from any other image, in one
    /// store transaction.
    async fn register(&self, new: ImageRecord) -> Result<(), ImageError> {
        let _records = self.records_lock.lock().await;
        let mut batch = Batch::new();
        let mut updated: Vec<ImageRecord> = Vec::new();
        let merged = {
            let images = self.read_images();
            for other in images.values() {
                if other.id == new.id {
                    continue;
                }
                if other.repo_tags.iter().any(|t| new.repo_tags.contains(t)) {
                    let mut o = other.clone();
                    o.repo_tags.retain(|t| !new.repo_tags.contains(t));
                    batch.put(Table::Images, &o.id, &o)?;
                    updated.push(o);
                }
            }
            match images.get(&new.id) {
                Some(existing) => {
                    let mut m = existing.clone();
                    for t in &new.repo_tags {
                        if !m.repo_tags.contains(t) {
                            m.repo_tags.push(t.clone());
                        }
                    }
                    for d in &new.repo_digests {
                        if !m.repo_digests.contains(d) {
                            m.repo_digests.push(d.clone());
                        }
                    }
                    for b in &new.extra_blobs {
                        if !m.extra_blobs.contains(b) {
                            m.extra_blobs.push(b.clone());
                        }
                    }
                    m
                }
                None => new,
            }
        };
        if updated.is_empty() && self.read_images().get(&merged.id) == Some(&merged) {
            return Ok(()); // a pull of an image that is here already, under the same names
        }
        batch.put(Table::Images, &merged.id, &merged)?;
        updated.push(merged);
        self.store.commit(batch).await?;
        let mut images = self.write_images();
        for r in updated {
            images.insert(r.id.clone(), r);
        }
        Ok(())
    }

    /// Fetches a blob unless it is stored; concurrent callers for one digest fetch it once.
    async fn fetch_blob_once(
        &self,
        remote: &Remote,
        desc: &Descriptor,
        max: Option<(&str, u64)>,
    ) -> Result<(), ImageError> {
        let _lock = self.blob_locks.lock(&desc.digest).await;
        if self.content.exists(&desc.digest) {
            return Ok(());
        }
        let size = (desc.size > 0).then_some(desc.size as u64);
        let n = remote
            .fetch_blob(&self.content, &desc.digest, size, max)
            .await?;
        crate::metrics::add_pulled_bytes(n);
        self.note_written(true);
        Ok(())
    }

    /// Counts a blob or snapshot written (not yet flushed to disk).
    fn note_written(&self, written: bool) {
        if written {
            self.unsynced.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Makes the snapshot of one layer unless it exists. A layer not in the content store is
    /// downloaded, stored, verified and unpacked in one pass: the download hands its chunks to
    /// an unpacking thread that spools them into the content store as it unpacks them. The
    /// snapshot is published (renamed into place) only when both the blob's digest and the
    /// unpacked stream's diff id match; it is flushed to disk with the pull's one
    /// [`ImageManager::sync_before_register`].
    async fn fetch_and_unpack(
        &self,
        remote: &Remote,
        layer: &Descriptor,
        diff_id: &str,
        chain_id: &str,
    ) -> Result<(), ImageError> {
        let _lock = self.snapshot_locks.lock(chain_id).await;
        if self.snapshots.exists(chain_id) {
            return Ok(());
        }
        let t0 = std::time::Instant::now();
        let snapshots = &self.snapshots;
        let (tmp, fs) = snapshots.prepare()?;
        // Whatever fails, the temporary snapshot goes (below).
        let outcome = self.unpack_layer_into(remote, layer, fs).await;
        let result = outcome.and_then(|u| {
            if u.diff_id != diff_id {
                return Err(ImageError::DiffIdMismatch {
                    layer: layer.digest.clone(),
                    expected: diff_id.to_string(),
                    actual: u.diff_id,
                });
            }
            snapshots.commit(&tmp, chain_id)?;
            self.note_written(true);
            Ok(())
        });
        if result.is_err() {
            snapshots.discard(&tmp);
        }
        tracing::debug!(layer = %layer.digest, total_ms = ms(t0.elapsed()), "layer pull steps");
        result
    }

    /// Unpacks a layer into the prepared snapshot dir `fs`: from its stored blob, or streamed
    /// from the registry (downloaded, spooled into the content store, verified and unpacked in
    /// one pass). Returns what unpacking measured (the diff id).
    async fn unpack_layer_into(
        &self,
        remote: &Remote,
        layer: &Descriptor,
        fs: PathBuf,
    ) -> Result<unpack::Unpacked, ImageError> {
        let t0 = std::time::Instant::now();
        let unpack_err = |source| ImageError::Unpack {
            layer: layer.digest.clone(),
            source,
        };
        let blob_lock = self.blob_locks.lock(&layer.digest).await;
        if self.content.exists(&layer.digest) {
            // Stored already (a blob shared with another chain): unpack the file.
            drop(blob_lock);
            let blob = self.content.path(&layer.digest)?;
            return tokio::task::spawn_blocking(move || unpack::unpack_layer(&blob, &fs))
                .await
                .map_err(|e| ImageError::Internal(e.to_string()))?
                .map_err(unpack_err);
        }
        let size = (layer.size > 0).then_some(layer.size as u64);
        let spool = self.content.writer(&layer.digest, size)?;
        // Two chunks in flight (hyper's are up to a few hundred KiB): a layer that unpacks
        // slower than it downloads holds the download back, not memory.
        let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(2);
        let unpacking = tokio::task::spawn_blocking(move || {
            let mut reader = content::SpoolingReader::new(rx, spool);
            let unpacked = unpack::unpack_stream(&mut reader, &fs);
            // The rest of the blob is read and checked even if unpacking failed: a corrupt
            // blob is reported as one.
            (unpacked, reader.finish())
        });
        let downloaded = self.download(remote, &layer.digest, tx).await;
        let (unpacked, stored) = unpacking
            .await
            .map_err(|e| ImageError::Internal(e.to_string()))?;
        drop(blob_lock);
        tracing::debug!(
            layer = %layer.digest,
            fetch_and_unpack_ms = ms(t0.elapsed()),
            "layer streamed"
        );
        // The first cause wins: the download, then the blob, then the layer's contents.
        let n = downloaded.and(stored)?;
        crate::metrics::add_pulled_bytes(n);
        unpacked.map_err(unpack_err)
    }

    /// Downloads a blob into `tx` (the unpacking thread). Fails with the download's error; a
    /// receiver that went away (its spooling failed) ends the download quietly, the receiver
    /// reports why.
    async fn download(
        &self,
        remote: &Remote,
        digest: &str,
        tx: tokio::sync::mpsc::Sender<bytes::Bytes>,
    ) -> Result<(), ImageError> {
        let t0 = std::time::Instant::now();
        let mut blob = remote.open_blob(digest).await?;
        let first_byte = t0.elapsed();
        while let Some(chunk) = blob.next_chunk().await? {
            if tx.send(chunk).await.is_err() {
                break;
            }
        }
        tracing::debug!(
            blob = %digest,
            headers_ms = ms(first_byte),
            download_ms = ms(t0.elapsed()),
            "blob download steps"
        );
        Ok(())
    }

    /// Flushes what pulls wrote (blobs and snapshots, none fsynced on its own) to disk before
    /// an image record naming them is committed: one `syncfs` per filesystem, skipped when
    /// nothing was written since the last one finished.
    async fn sync_before_register(&self) -> Result<(), ImageError> {
        let written = self.unsynced.load(Ordering::SeqCst);
        if self.synced.load(Ordering::SeqCst) >= written {
            return Ok(());
        }
        let dirs = [self.content.base(), self.snapshots.base().to_path_buf()];
        tokio::task::spawn_blocking(move || {
            let mut devices = Vec::new();
            for dir in dirs {
                let f = std::fs::File::open(&dir).map_err(|e| ImageError::io(&dir, e))?;
                let dev = std::os::unix::fs::MetadataExt::dev(
                    &f.metadata().map_err(|e| ImageError::io(&dir, e))?,
                );
                if !devices.contains(&dev) {
                    nix::unistd::syncfs(&f).map_err(|e| ImageError::io(&dir, e.into()))?;
                    devices.push(dev);
                }
            }
            Ok::<(), ImageError>(())
        })
        .await
        .map_err(|e| ImageError::Internal(e.to_string()))??;
        self.synced.fetch_max(written, Ordering::SeqCst);
        Ok(())
    }

    /// Resolves what a CRI client names an image by: an id (`sha256:<hex>`, bare hex, or a
    /// unique id prefix), a tag reference (normalized), or a digest reference.
    pub fn resolve(&self, spec: &str) -> Option<ImageRecord> {
        let spec = spec.trim();
        if spec.is_empty() {
            return None;
        }
        let images = self.read_images();
        let as_id = if is_digest(spec) {
            Some(spec.to_string())
        } else if spec.len() == 64 && spec.bytes().all(|b| b.is_ascii_hexdigit()) {
            Some(format!("sha256:{spec}"))
        } else {
            None
        };
        if let Some(id) = &as_id
            && let Some(r) = images.get(id)
        {
            return Some(r.clone());
        }
        if let Ok(r) = Reference::parse(spec) {
            if let Some(d) = &r.digest {
                let want = r.with_digest(d);
                if let Some(img) = images
                    .values()
                    .find(|i| i.repo_digests.contains(&want) || i.manifest_digest == *d)
                {
                    return Some(img.clone());
                }
            } else if let Some(tag) = r.tagged()
                && let Some(img) = images.values().find(|i| i.repo_tags.contains(&tag))
            {
                return Some(img.clone());
            }
        }
        // A unique prefix of an id.
        let hex = spec.strip_prefix("sha256:").unwrap_or(spec);
        if hex.len() >= 3 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            let mut found = images
                .values()
                .filter(|i| i.id["sha256:".len()..].starts_with(hex));
            if let (Some(one), None) = (found.next(), found.next()) {
                return Some(one.clone());
            }
        }
        None
    }

    fn lock_holders(&self) -> std::sync::MutexGuard<'_, HashMap<String, BTreeSet<String>>> {
        self.holders.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Resolves an image (as [`Self::resolve`]) and records that `holder` (a container id) uses
    /// it, atomically with respect to [`Self::remove`]. `None`: no such image.
    pub async fn acquire(&self, spec: &str, holder: &str) -> Option<ImageRecord> {
        let _records = self.records_lock.lock().await;
        let img = self.resolve(spec)?;
        self.hold(&img.id, holder);
        Some(img)
    }

    /// Records that `holder` uses the image `id` (at start, for the containers on record).
    pub fn hold(&self, id: &str, holder: &str) {
        self.lock_holders()
            .entry(id.to_string())
            .or_default()
            .insert(holder.to_string());
    }

    /// Drops every hold of `holder`.
    pub fn release(&self, holder: &str) {
        self.lock_holders().retain(|_, holders| {
            holders.remove(holder);
            !holders.is_empty()
        });
    }

    /// Every image, sorted by id.
    pub fn list(&self) -> Vec<ImageRecord> {
        let mut v: Vec<ImageRecord> = self.read_images().values().cloned().collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// Removes an image, with all its tags, by any name a client gives it (a tag, its id or a
    /// digest). Absent is fine. An image a container holds cannot go ([`ImageError::InUse`]).
    /// Content no other image needs is collected in the background.
    pub async fn remove(self: &Arc<Self>, spec: &str) -> Result<(), ImageError> {
        let _records = self.records_lock.lock().await;
        let Some(img) = self.resolve(spec) else {
            return Ok(());
        };
        // Any reference removes the whole image with all its tags, as containerd does (crictl
        // warns its users of exactly that; the kubelet removes by id).
        if let Some(holder) = self.lock_holders().get(&img.id).and_then(|h| h.first()) {
            return Err(ImageError::InUse {
                image: spec.to_string(),
                id: img.id.clone(),
                container: holder.clone(),
            });
        }
        let mut batch = Batch::new();
        batch.delete(Table::Images, &img.id);
        self.store.commit(batch).await?;
        self.write_images().remove(&img.id);
        tracing::info!(image = %spec, id = %img.id, tags = ?img.repo_tags, "removed");
        let me = Arc::clone(self);
        tokio::spawn(async move {
            if let Err(e) = me.collect_garbage().await {
                tracing::warn!(error = %e, "garbage collection failed");
            }
        });
        Ok(())
    }

    /// Whom to tell when garbage collection removed something (set once).
    pub fn notify_on_collect(&self, n: Arc<tokio::sync::Notify>) {
        let _ = self.on_collect.set(n);
    }

    /// Removes blobs and snapshots no image references, waiting for in-flight pulls.
    pub async fn collect_garbage(self: &Arc<Self>) -> Result<(usize, usize), ImageError> {
        let _gc = self.gc_lock.write().await;
        let me = Arc::clone(self);
        let removed = tokio::task::spawn_blocking(move || me.collect_garbage_now())
            .await
            .map_err(|e| ImageError::Internal(e.to_string()))??;
        if removed.0 + removed.1 > 0
            && let Some(n) = self.on_collect.get()
        {
            n.notify_one();
        }
        Ok(removed)
    }

    fn collect_garbage_now(&self) -> Result<(usize, usize), ImageError> {
        let (blobs, snaps) = {
            let images = self.read_images();
            let mut blobs: HashSet<String> = HashSet::new();
            let mut snaps: HashSet<String> = HashSet::new();
            for i in images.values() {
                blobs.insert(i.manifest_digest.clone());
                blobs.insert(i.config_digest.clone());
                blobs.extend(i.extra_blobs.iter().cloned());
                for l in &i.layers {
                    blobs.insert(l.digest.clone());
                    snaps.insert(l.chain_id.clone());
                }
            }
            (blobs, snaps)
        };
        let mut removed = (0, 0);
        for d in self.content.list()? {
            if !blobs.contains(&d) {
                self.content.delete(&d)?;
                removed.0 += 1;
            }
        }
        for c in self.snapshots.list()? {
            if !snaps.contains(&c) {
                self.snapshots.remove(&c)?;
                removed.1 += 1;
            }
        }
        Ok(removed)
    }

    /// Where image data lives (reported as the image filesystem's mountpoint).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The overlay lower dirs of an image, lowest layer first.
    pub fn snapshot_dirs(&self, img: &ImageRecord) -> Result<Vec<PathBuf>, ImageError> {
        img.layers
            .iter()
            .map(|l| self.snapshots.fs_path(&l.chain_id))
            .collect()
    }

    /// The image config as stored.
    pub fn config_json(&self, img: &ImageRecord) -> Result<serde_json::Value, ImageError> {
        let bytes = self.content.read(&img.config_digest)?;
        serde_json::from_slice(&bytes).map_err(|e| ImageError::BadManifest {
            reference: img.id.clone(),
            reason: format!("stored config: {e}"),
        })
    }
}
