//! Disk usage of berth's two filesystems, as `ImageFsInfo` and `ContainerStats.writable_layer`
//! report them: the image filesystem (the content store's blobs and the unpacked layer
//! snapshots under `root`) and the container filesystem (the containers' writable layers,
//! `root/containers/<id>`).
//!
//! Nothing here walks a tree for an RPC. A background task ([`FsUsage::run`]) refreshes a
//! cache every `[stats] fs_refresh_interval` and when nudged ([`FsUsage::nudge`], after a
//! pull, an image removal's garbage collection, a container's create or removal). The work of
//! a refresh is bounded by what can change: a snapshot is immutable once committed, so each
//! one is walked once and its usage kept by chain id; blobs are one `stat` each; the writable
//! layers, which change under running containers, are walked every time (as containerd's
//! snapshot syncer does). Readers take the last sample: a lock and an `Arc` clone.
//!
//! A container the cache has not seen yet (created since the last refresh) is measured once,
//! on its first stats call, and kept until the next refresh: its writable layer is new, so
//! that walk is small, and it happens once per container.
//!
//! Both filesystems are identified by a mountpoint. When the snapshots and the writable
//! layers are on one filesystem (the usual case) both report `root`, as containerd reports
//! its snapshotter dir for both; the kubelet then sees no split image filesystem. When they
//! are on different filesystems each reports its own dir.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use tokio::sync::Notify;

use crate::ids::now_nanos;

/// Bytes (allocated blocks) and inodes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub bytes: u64,
    pub inodes: u64,
}

impl std::ops::AddAssign for Usage {
    fn add_assign(&mut self, o: Usage) {
        self.bytes += o.bytes;
        self.inodes += o.inodes;
    }
}

/// One filesystem's usage as of `at` (ns since the epoch).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FsSample {
    pub at: i64,
    /// What identifies the filesystem (CRI `FilesystemIdentifier.mountpoint`).
    pub mountpoint: String,
    pub usage: Usage,
}

/// The containers' filesystem: the total and each container's writable (upper) layer.
#[derive(Debug, Clone, Default)]
struct ContainerSection {
    total: FsSample,
    writable: HashMap<String, Usage>,
}

/// The cache of one berthd's filesystem usage. See the module docs.
pub struct FsUsage {
    root: PathBuf,
    content: PathBuf,
    snapshots: PathBuf,
    containers: PathBuf,
    image: RwLock<FsSample>,
    section: RwLock<Arc<ContainerSection>>,
    /// Containers measured on demand since the last refresh: id → (when, upper usage).
    late: Mutex<HashMap<String, (i64, Usage)>>,
    /// Usage of committed snapshots by dir name (immutable, so walked once). Held during an
    /// image refresh, which serializes image refreshes.
    snapshot_cache: Mutex<HashMap<String, Usage>>,
    nudge: Arc<Notify>,
    refreshes: AtomicU64,
}

/// Bytes and inodes under `dir` (itself included), not following symlinks, each hard-linked
/// inode once (`seen` is shared by the caller across the dirs of one filesystem); `None`
/// when `dir` is not there. Entries that vanish meanwhile are skipped.
pub fn walk(dir: &Path, seen: &mut HashSet<(u64, u64)>) -> Option<Usage> {
    let top = std::fs::symlink_metadata(dir).ok()?;
    let mut u = Usage::default();
    if seen.insert((top.dev(), top.ino())) {
        u.bytes += top.blocks() * 512;
        u.inodes += 1;
    }
    if !top.is_dir() {
        return Some(u);
    }
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(md) = e.metadata() else { continue };
            if md.nlink() > 1 && !md.is_dir() && !seen.insert((md.dev(), md.ino())) {
                continue;
            }
            u.bytes += md.blocks() * 512;
            u.inodes += 1;
            if md.is_dir() {
                stack.push(e.path());
            }
        }
    }
    Some(u)
}

/// The names in a dir (none when it is not there).
fn names(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn device(path: &Path) -> Option<u64> {
    std::fs::metadata(path).ok().map(|m| m.dev())
}

impl FsUsage {
    /// The cache for a berthd whose `root` holds `content/`, `snapshots/` and `containers/`.
    /// Empty until the first [`Self::refresh`].
    pub fn new(root: &Path) -> FsUsage {
        FsUsage {
            root: root.to_path_buf(),
            content: root.join("content"),
            snapshots: root.join("snapshots"),
            containers: root.join("containers"),
            image: RwLock::new(FsSample::default()),
            section: RwLock::new(Arc::new(ContainerSection::default())),
            late: Mutex::new(HashMap::new()),
            snapshot_cache: Mutex::new(HashMap::new()),
            nudge: Arc::new(Notify::new()),
            refreshes: AtomicU64::new(0),
        }
    }

    /// The mountpoints of the image and the container filesystem (see the module docs).
    fn mountpoints(&self) -> (String, String) {
        let image_dir = &self.snapshots;
        let containers_dir = if self.containers.exists() {
            self.containers.clone()
        } else {
            self.root.clone()
        };
        match (device(image_dir), device(&containers_dir)) {
            (Some(a), Some(b)) if a != b => (
                image_dir.display().to_string(),
                containers_dir.display().to_string(),
            ),
            _ => {
                let r = self.root.display().to_string();
                (r.clone(), r)
            }
        }
    }

    /// Recomputes the image filesystem's usage: a `stat` per blob, a walk of each snapshot
    /// not seen before (and of unpacks in progress). Blocking.
    pub fn refresh_images(&self) {
        let mut cache = self
            .snapshot_cache
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut seen = HashSet::new();
        let mut usage = walk(&self.content, &mut seen).unwrap_or_default();
        if let Ok(top) = std::fs::symlink_metadata(&self.snapshots) {
            usage += Usage {
                bytes: top.blocks() * 512,
                inodes: 1,
            };
        }
        let present = names(&self.snapshots);
        cache.retain(|name, _| present.contains(name));
        for name in &present {
            let dir = self.snapshots.join(name);
            // `.tmp-*`: an unpack in progress (or a removal), still changing.
            if name.starts_with('.') {
                usage += walk(&dir, &mut HashSet::new()).unwrap_or_default();
                continue;
            }
            let u = match cache.get(name) {
                Some(u) => *u,
                None => {
                    let Some(u) = walk(&dir, &mut HashSet::new()) else {
                        continue;
                    };
                    cache.insert(name.clone(), u);
                    u
                }
            };
            usage += u;
        }
        drop(cache);
        let (mountpoint, _) = self.mountpoints();
        *self.image.write().unwrap_or_else(|p| p.into_inner()) = FsSample {
            at: now_nanos(),
            mountpoint,
            usage,
        };
    }

    /// Recomputes the container filesystem's usage: a walk of every writable layer. Blocking.
    pub fn refresh_containers(&self) {
        let mut total = std::fs::symlink_metadata(&self.containers)
            .map(|m| Usage {
                bytes: m.blocks() * 512,
                inodes: 1,
            })
            .unwrap_or_default();
        let mut writable = HashMap::new();
        for id in names(&self.containers) {
            let dir = self.containers.join(&id);
            let mut seen = HashSet::new();
            let Ok(top) = std::fs::symlink_metadata(&dir) else {
                continue;
            };
            total += Usage {
                bytes: top.blocks() * 512,
                inodes: 1,
            };
            for child in names(&dir) {
                let Some(u) = walk(&dir.join(&child), &mut seen) else {
                    continue;
                };
                total += u;
                if child == "upper" {
                    writable.insert(id.clone(), u);
                }
            }
        }
        let (_, mountpoint) = self.mountpoints();
        let section = ContainerSection {
            total: FsSample {
                at: now_nanos(),
                mountpoint,
                usage: total,
            },
            writable,
        };
        *self.section.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(section);
        self.late.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// Both refreshes. Blocking.
    pub fn refresh(&self) {
        self.refresh_images();
        self.refresh_containers();
        self.refreshes.fetch_add(1, Ordering::Relaxed);
    }

    /// How many full refreshes ran (for logs and tests).
    pub fn refreshes(&self) -> u64 {
        self.refreshes.load(Ordering::Relaxed)
    }

    /// [`Self::refresh_images`] off the async workers.
    pub async fn refresh_images_now(self: &Arc<Self>) {
        let me = self.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || me.refresh_images()).await {
            tracing::warn!(error = %e, "refreshing image filesystem usage");
        }
    }

    /// Asks the background task for a refresh soon (coalesced; never waits).
    pub fn nudge(&self) {
        self.nudge.notify_one();
    }

    /// A handle that nudges this cache (for pieces that must not depend on it).
    pub fn nudger(&self) -> Arc<Notify> {
        self.nudge.clone()
    }

    /// The image filesystem as last sampled.
    pub fn image(&self) -> FsSample {
        self.image.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The container filesystem as last sampled.
    pub fn containers(&self) -> FsSample {
        self.section
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .total
            .clone()
    }

    /// The mountpoint writable layers are reported on.
    pub fn container_mountpoint(&self) -> String {
        let m = self.containers().mountpoint;
        if m.is_empty() {
            self.mountpoints().1
        } else {
            m
        }
    }

    /// A container's writable layer (`upper`) as last sampled: when, and its usage. A
    /// container not in the last sample is measured now, once (see the module docs); `None`
    /// when it has no writable layer.
    pub fn writable(&self, id: &str) -> Option<(i64, Usage)> {
        {
            let section = self.section.read().unwrap_or_else(|p| p.into_inner());
            if let Some(u) = section.writable.get(id) {
                return Some((section.total.at, *u));
            }
        }
        if let Some(v) = self.late.lock().unwrap_or_else(|p| p.into_inner()).get(id) {
            return Some(*v);
        }
        let upper = self.containers.join(id).join("upper");
        let u = walk(&upper, &mut HashSet::new())?;
        let v = (now_nanos(), u);
        self.late
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string(), v);
        Some(v)
    }

    /// Refreshes every `every`, and soon after each nudge, until the cache is dropped.
    pub async fn run(this: Weak<FsUsage>, every: Duration) {
        let nudge = match this.upgrade() {
            Some(me) => me.nudge.clone(),
            None => return,
        };
        loop {
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = nudge.notified() => {}
            }
            let Some(me) = this.upgrade() else { return };
            let t = std::time::Instant::now();
            let done = tokio::task::spawn_blocking(move || {
                me.refresh();
                me.section
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .writable
                    .len()
            })
            .await;
            match done {
                Ok(layers) => tracing::debug!(
                    ms = t.elapsed().as_secs_f64() * 1000.0,
                    writable_layers = layers,
                    "filesystem usage refreshed"
                ),
                Err(e) => tracing::warn!(error = %e, "refreshing filesystem usage"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, len: usize) {
        if let Some(p) = path.parent() {
            std::fs::create_dir_all(p).expect("mkdir");
        }
        std::fs::write(path, vec![7u8; len]).expect("write");
    }

    #[test]
    fn walk_counts_files_once() {
        let d = tempfile::tempdir().expect("tmp");
        write(&d.path().join("sub/f"), 10000);
        std::fs::hard_link(d.path().join("sub/f"), d.path().join("g")).expect("link");
        let u = walk(d.path(), &mut HashSet::new()).expect("usage");
        // The top dir, sub, and the file once.
        assert_eq!(u.inodes, 3);
        assert!(u.bytes >= 10000, "{u:?}");
        assert_eq!(walk(&d.path().join("absent"), &mut HashSet::new()), None);
    }

    #[test]
    fn images_and_containers_are_apart_and_snapshots_are_walked_once() {
        let d = tempfile::tempdir().expect("tmp");
        let root = d.path();
        write(&root.join("content/blobs/sha256/aa"), 4096);
        write(&root.join("snapshots/c1/fs/bin/x"), 100_000);
        write(&root.join("containers/k1/upper/data"), 50_000);
        write(&root.join("containers/k1/work/w"), 0);
        let fs = FsUsage::new(root);
        assert_eq!(fs.image().usage, Usage::default(), "empty before a refresh");
        fs.refresh();
        assert_eq!(fs.refreshes(), 1);
        let image = fs.image();
        let containers = fs.containers();
        assert!(image.usage.bytes >= 104_096, "{image:?}");
        assert!(containers.usage.bytes >= 50_000, "{containers:?}");
        assert!(containers.usage.bytes < image.usage.bytes);
        // One filesystem: both are reported on `root`.
        assert_eq!(image.mountpoint, root.display().to_string());
        assert_eq!(containers.mountpoint, image.mountpoint);
        let (at, w) = fs.writable("k1").expect("k1's layer");
        assert_eq!(at, containers.at);
        assert!(w.bytes >= 50_000 && w.inodes >= 2, "{w:?}");

        // A committed snapshot is not walked again: what changes inside it is not seen
        // (it never changes), while a new snapshot and a new blob are.
        write(&root.join("snapshots/c1/fs/bin/y"), 100_000);
        write(&root.join("snapshots/c2/fs/z"), 200_000);
        write(&root.join("content/blobs/sha256/bb"), 8192);
        fs.refresh_images();
        let again = fs.image();
        let grew = again.usage.bytes - image.usage.bytes;
        assert!((208_192..300_000).contains(&grew), "grew by {grew}");
        // A removed snapshot leaves the total and the cache.
        std::fs::remove_dir_all(root.join("snapshots/c2")).expect("rm");
        fs.refresh_images();
        assert!(fs.image().usage.bytes < again.usage.bytes);

        // A container created since the refresh is measured once, on demand.
        write(&root.join("containers/k2/upper/f"), 5000);
        let (_, w2) = fs.writable("k2").expect("k2 measured");
        write(&root.join("containers/k2/upper/g"), 500_000);
        assert_eq!(fs.writable("k2").expect("kept").1, w2, "not walked again");
        fs.refresh_containers();
        assert!(fs.writable("k2").expect("refreshed").1.bytes >= 505_000);
        assert_eq!(fs.writable("nobody"), None);
    }

    #[tokio::test]
    async fn a_nudge_refreshes_without_waiting_for_the_interval() {
        let d = tempfile::tempdir().expect("tmp");
        write(&d.path().join("containers/k/upper/f"), 1000);
        let fs = Arc::new(FsUsage::new(d.path()));
        let task = tokio::spawn(FsUsage::run(Arc::downgrade(&fs), Duration::from_secs(3600)));
        fs.nudge();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while fs.refreshes() == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "no refresh after a nudge"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(fs.containers().usage.bytes >= 1000);
        task.abort();
    }
}
