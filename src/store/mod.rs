//! The durable store: one embedded ACID database (`redb`) under `root`, the source of truth for
//! berth's records. Every record is a JSON value in a named table; a state change is one write
//! transaction ([`Batch`]) that is durable (fsynced) before [`Store::commit`] returns. In-memory
//! indexes elsewhere are rebuilt from here at start.
//!
//! [`Store::commit`] waits for its fsync on a blocking thread, never on an async worker: with
//! two workers, two RPCs waiting for the disk would otherwise stall every other RPC (and a
//! writer waiting behind them for redb's one write lock). [`Store::commit_blocking`] is the
//! same for synchronous code: called on an async worker, it first hands the worker's other
//! tasks to another thread (`tokio::task::block_in_place`).
//!
//! [`Store::commit_volatile`] applies a batch that need not survive a crash on its own: it is
//! visible at once and becomes durable with the next [`Store::commit`] (of any record). It is
//! for bookkeeping that start-up repair can rebuild or drop (e.g. an address held by a pod
//! that no durable record names yet, a started container's record), so that an RPC pays for
//! one fsync, or none. [`Store::flush_volatile`] bounds how long such a batch stays volatile
//! when no durable commit follows.

use std::path::Path;
use std::sync::Arc;

use redb::{Database, ReadableTable, TableDefinition};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The schema version written at creation; a later version migrates older stores at open.
pub const SCHEMA_VERSION: u64 = 1;

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// redb's page cache (its default is 1 GiB, which a node daemon whose store holds a few
/// thousand small records never needs: the whole store of a full node fits in a few MiB).
const CACHE_BYTES: usize = 4 << 20;

/// The tables berth keeps. Each holds JSON records keyed by id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// Image records keyed by image id (`sha256:<config digest>`).
    Images,
    /// Pod sandbox records keyed by sandbox id.
    Sandboxes,
    /// Native IPAM: allocated pod addresses keyed by address, valued by their holder.
    PodIps,
    /// Small settings that must survive restarts (e.g. the kubelet's pod CIDR), by name.
    Settings,
    /// Container records keyed by container id.
    Containers,
}

impl Table {
    const ALL: [Table; 5] = [
        Table::Images,
        Table::Sandboxes,
        Table::PodIps,
        Table::Settings,
        Table::Containers,
    ];

    fn def(self) -> TableDefinition<'static, &'static str, &'static [u8]> {
        match self {
            Table::Images => TableDefinition::new("images"),
            Table::Sandboxes => TableDefinition::new("sandboxes"),
            Table::PodIps => TableDefinition::new("pod_ips"),
            Table::Settings => TableDefinition::new("settings"),
            Table::Containers => TableDefinition::new("containers"),
        }
    }
}

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store database: {0}")]
    Db(Box<redb::Error>),
    #[error("store record {table:?}/{key}: {source}")]
    Decode {
        table: Table,
        key: String,
        source: serde_json::Error,
    },
    #[error("store record encoding: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("store schema version {found} is newer than this berthd supports ({supported})")]
    SchemaTooNew { found: u64, supported: u64 },
    #[error("store commit did not finish: {0}")]
    Task(String),
}

macro_rules! db_err {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Db(Box::new(e.into()))
            }
        }
    )*};
}
db_err!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// Runs `f`, which may wait for the disk: on a worker of a multi-thread runtime, the worker's
/// other tasks move to another thread first (`block_in_place`, which on a blocking thread of
/// that runtime just runs `f`); elsewhere (no runtime, a current-thread runtime) it just
/// runs.
fn off_worker<T>(f: impl FnOnce() -> T) -> T {
    let on_worker = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if on_worker {
        tokio::task::block_in_place(f)
    } else {
        f()
    }
}

/// The open database.
pub struct Store {
    db: Database,
    /// A volatile batch was applied since the last durable commit.
    volatile_pending: std::sync::atomic::AtomicBool,
    /// Wakes [`Store::flush_volatile`].
    volatile_applied: Arc<tokio::sync::Notify>,
}

/// How soon a volatile batch is made durable when no durable commit comes first.
pub const VOLATILE_FLUSH_DELAY: std::time::Duration = std::time::Duration::from_secs(1);

/// The changes of one state transition, applied atomically by [`Store::commit`].
#[derive(Default)]
pub struct Batch {
    puts: Vec<(Table, String, Vec<u8>)>,
    deletes: Vec<(Table, String)>,
}

impl Batch {
    pub fn new() -> Batch {
        Batch::default()
    }

    /// Inserts or replaces a record.
    pub fn put<T: Serialize>(
        &mut self,
        table: Table,
        key: &str,
        value: &T,
    ) -> Result<(), StoreError> {
        self.puts
            .push((table, key.to_string(), serde_json::to_vec(value)?));
        Ok(())
    }

    /// Deletes a record (absent is fine).
    pub fn delete(&mut self, table: Table, key: &str) {
        self.deletes.push((table, key.to_string()));
    }

    pub fn is_empty(&self) -> bool {
        self.puts.is_empty() && self.deletes.is_empty()
    }
}

impl Store {
    /// Opens (or creates) the database at `path`, creating every table and checking the schema.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let db = redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .create(path)?;
        let tx = db.begin_write()?;
        {
            let mut meta = tx.open_table(META)?;
            let found = meta.get("schema_version")?.map(|v| v.value());
            match found {
                Some(v) if v > SCHEMA_VERSION => {
                    return Err(StoreError::SchemaTooNew {
                        found: v,
                        supported: SCHEMA_VERSION,
                    });
                }
                Some(_) => {}
                None => {
                    meta.insert("schema_version", SCHEMA_VERSION)?;
                }
            }
            for t in Table::ALL {
                tx.open_table(t.def())?;
            }
        }
        tx.commit()?;
        Ok(Store {
            db,
            volatile_pending: std::sync::atomic::AtomicBool::new(false),
            volatile_applied: Arc::new(tokio::sync::Notify::new()),
        })
    }

    /// Makes volatile batches durable within `delay` of their commit when no durable commit
    /// does it first (one fsync for all of them, off the RPCs' path), until the store is
    /// dropped: a crash loses at most `delay` of them.
    pub async fn flush_volatile(store: std::sync::Weak<Store>, delay: std::time::Duration) {
        let Some(applied) = store.upgrade().map(|s| Arc::clone(&s.volatile_applied)) else {
            return;
        };
        loop {
            applied.notified().await;
            tokio::time::sleep(delay).await;
            let Some(s) = store.upgrade() else { return };
            if s.volatile_pending
                .load(std::sync::atomic::Ordering::Acquire)
            {
                let flushed = tokio::task::spawn_blocking(move || s.flush())
                    .await
                    .unwrap_or_else(|e| Err(StoreError::Task(e.to_string())));
                if let Err(e) = flushed {
                    tracing::warn!(error = %e, "flushing volatile records");
                }
            }
        }
    }

    /// Applies a batch in one durable write transaction, waiting for it on a blocking thread.
    pub async fn commit(self: &Arc<Self>, batch: Batch) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let store = Arc::clone(self);
        tokio::task::spawn_blocking(move || store.commit_blocking(batch))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
    }

    /// [`Store::commit`] on the calling thread. On a worker of a multi-thread runtime, the
    /// worker's other tasks move to another thread first; elsewhere (a blocking thread, no
    /// runtime, a current-thread runtime) it just waits.
    pub fn commit_blocking(&self, batch: Batch) -> Result<(), StoreError> {
        off_worker(|| self.apply(batch, redb::Durability::Immediate))
    }

    /// Applies a batch in one write transaction that is visible at once but durable only with
    /// the next durable commit: a crash (of the process or the machine) before that loses
    /// it, never a part of it. For records that start-up repair can do without or re-derive
    /// (see [`Store::flush_volatile`] for how long they stay volatile). It waits for
    /// no disk, but may wait for redb's one write lock, which a durable commit holds through
    /// its fsync: like [`Store::commit_blocking`], an async worker hands its tasks off first.
    pub fn commit_volatile(&self, batch: Batch) -> Result<(), StoreError> {
        off_worker(|| self.apply(batch, redb::Durability::None))?;
        if !self
            .volatile_pending
            .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            self.volatile_applied.notify_one();
        }
        Ok(())
    }

    /// Makes every volatile batch applied so far durable (one empty durable commit): for a
    /// clean stop, so that the next start has nothing to re-derive.
    pub fn flush(&self) -> Result<(), StoreError> {
        off_worker(|| self.write(&Batch::new(), redb::Durability::Immediate))
    }

    fn apply(&self, batch: Batch, durability: redb::Durability) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        self.write(&batch, durability)
    }

    /// One write transaction of `batch` (empty for a flush, which redb still commits).
    fn write(&self, batch: &Batch, durability: redb::Durability) -> Result<(), StoreError> {
        if !matches!(durability, redb::Durability::None) {
            // Set before the transaction: a volatile batch applied after it (redb has one
            // writer at a time) sets it again; one applied before is made durable by it.
            self.volatile_pending
                .store(false, std::sync::atomic::Ordering::Release);
        }
        let mut tx = self.db.begin_write()?;
        tx.set_durability(durability);
        {
            for (table, key, value) in &batch.puts {
                tx.open_table(table.def())?
                    .insert(key.as_str(), value.as_slice())?;
            }
            for (table, key) in &batch.deletes {
                tx.open_table(table.def())?.remove(key.as_str())?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Reads one record.
    pub fn get<T: DeserializeOwned>(
        &self,
        table: Table,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(table.def())?;
        match t.get(key)? {
            Some(v) => serde_json::from_slice(v.value())
                .map(Some)
                .map_err(|source| StoreError::Decode {
                    table,
                    key: key.to_string(),
                    source,
                }),
            None => Ok(None),
        }
    }

    /// Reads every record of a table, in key order.
    pub fn all<T: DeserializeOwned>(&self, table: Table) -> Result<Vec<(String, T)>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(table.def())?;
        let mut out = Vec::new();
        for item in t.iter()? {
            let (k, v) = item?;
            let key = k.value().to_string();
            let value = serde_json::from_slice(v.value()).map_err(|source| StoreError::Decode {
                table,
                key: key.clone(),
                source,
            })?;
            out.push((key, value));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_atomic_and_durable_across_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("berth.redb");
        {
            let store = Store::open(&path).expect("open");
            let mut b = Batch::new();
            b.put(Table::Images, "a", &vec![1u32, 2]).expect("put");
            b.put(Table::Images, "b", &vec![3u32]).expect("put");
            store.commit_blocking(b).expect("commit");
            let mut b = Batch::new();
            b.delete(Table::Images, "a");
            b.delete(Table::Images, "missing");
            store.commit_blocking(b).expect("commit");
        }
        let store = Store::open(&path).expect("reopen");
        let all: Vec<(String, Vec<u32>)> = store.all(Table::Images).expect("all");
        assert_eq!(all, vec![("b".to_string(), vec![3])]);
        assert_eq!(
            store.get::<Vec<u32>>(Table::Images, "a").expect("get"),
            None
        );
    }

    #[test]
    fn volatile_batches_are_visible_and_made_durable_by_the_next_commit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("berth.redb");
        {
            let store = Store::open(&path).expect("open");
            let mut b = Batch::new();
            b.put(Table::PodIps, "10.0.0.2", &"a").expect("put");
            store.commit_volatile(b).expect("volatile");
            assert_eq!(
                store.get::<String>(Table::PodIps, "10.0.0.2").expect("get"),
                Some("a".to_string())
            );
            let mut b = Batch::new();
            b.put(Table::Sandboxes, "a", &"ready").expect("put");
            store.commit_blocking(b).expect("commit");
        }
        let store = Store::open(&path).expect("reopen");
        assert_eq!(
            store.get::<String>(Table::PodIps, "10.0.0.2").expect("get"),
            Some("a".to_string())
        );
    }

    /// What a crash of berthd leaves of the store: its file as it is on disk (the page
    /// cache), with the database never closed (leaked, so that no drop writes anything).
    fn crashed_copy(store: Store, dir: &Path, name: &str) -> Store {
        let path = dir.join(name);
        std::fs::copy(dir.join("berth.redb"), &path).expect("copy the file");
        std::mem::forget(store);
        Store::open(&path).expect("open the copy")
    }

    #[test]
    fn volatile_batches_are_lost_in_a_crash_unless_flushed() {
        let dir = tempfile::tempdir().expect("tempdir");
        for flushed in [false, true] {
            let path = dir.path().join("berth.redb");
            let _ = std::fs::remove_file(&path);
            let store = Store::open(&path).expect("open");
            let mut b = Batch::new();
            b.put(Table::Containers, "c", &"created").expect("put");
            store.commit_blocking(b).expect("commit");
            let mut b = Batch::new();
            b.put(Table::Containers, "c", &"running").expect("put");
            store.commit_volatile(b).expect("volatile");
            if flushed {
                store.flush().expect("flush");
            }
            let after = crashed_copy(store, dir.path(), &format!("crashed-{flushed}.redb"));
            let want = if flushed { "running" } else { "created" };
            assert_eq!(
                after.get::<String>(Table::Containers, "c").expect("get"),
                Some(want.to_string()),
                "flushed: {flushed}"
            );
        }
    }

    #[tokio::test]
    async fn volatile_batches_become_durable_soon_without_a_durable_commit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(Store::open(&dir.path().join("berth.redb")).expect("open"));
        tokio::spawn(Store::flush_volatile(
            Arc::downgrade(&store),
            std::time::Duration::from_millis(50),
        ));
        let mut b = Batch::new();
        b.put(Table::Containers, "c", &"running").expect("put");
        store.commit_volatile(b).expect("volatile");
        // Flushed once the flag is down and the flushing task let the store go.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while store
            .volatile_pending
            .load(std::sync::atomic::Ordering::Acquire)
            || Arc::strong_count(&store) > 1
        {
            assert!(std::time::Instant::now() < deadline, "never flushed");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let store = Arc::into_inner(store).expect("the only holder");
        let after = crashed_copy(store, dir.path(), "crashed.redb");
        assert_eq!(
            after.get::<String>(Table::Containers, "c").expect("get"),
            Some("running".to_string())
        );
    }

    #[test]
    fn a_bad_record_is_an_error_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("s.redb")).expect("open");
        let mut b = Batch::new();
        b.put(Table::Images, "x", &"text").expect("put");
        store.commit_blocking(b).expect("commit");
        let e = store
            .get::<u64>(Table::Images, "x")
            .expect_err("wrong type");
        assert!(e.to_string().contains("x"), "{e}");
    }
}
