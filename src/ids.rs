//! Ids and times shared by every piece: random 64-hex object ids, id-prefix resolution as CRI
//! clients use it, the in-memory [`Index`] of records with atomic name reservation, and CRI
//! timestamps.

use std::collections::HashMap;
use std::io::Read;
use std::sync::{Mutex, RwLock};

/// What an id or id prefix names among existing ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// The one id it names.
    Found(String),
    /// More than one id starts with it.
    Ambiguous,
    /// None does.
    Missing,
}

/// Resolves a full id or a unique prefix of one among the keys of `map`.
pub fn lookup<V>(map: &HashMap<String, V>, id: &str) -> Lookup {
    if map.contains_key(id) {
        return Lookup::Found(id.to_string());
    }
    let mut found = map.keys().filter(|k| k.starts_with(id));
    match (found.next(), found.next()) {
        (Some(one), None) if !id.is_empty() => Lookup::Found(one.clone()),
        (Some(_), Some(_)) => Lookup::Ambiguous,
        _ => Lookup::Missing,
    }
}

/// The in-memory index of one kind of record (pods, containers) by id, with the reservation
/// of their names: a name is reserved atomically, so a duplicate create fails.
pub struct Index<R> {
    records: RwLock<HashMap<String, R>>,
    /// name → id of the record holding it.
    names: Mutex<HashMap<String, String>>,
}

impl<R: Clone> Default for Index<R> {
    fn default() -> Self {
        Index {
            records: RwLock::new(HashMap::new()),
            names: Mutex::new(HashMap::new()),
        }
    }
}

impl<R: Clone> Index<R> {
    /// Reserves `name` for `id`; `Err` holds the id that already has it.
    pub fn reserve(&self, name: &str, id: &str) -> Result<(), String> {
        let mut names = self.names.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(holder) = names.get(name) {
            return Err(holder.clone());
        }
        names.insert(name.to_string(), id.to_string());
        Ok(())
    }

    /// Frees a name.
    pub fn release(&self, name: &str) {
        self.names
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
    }

    /// What a full id or id prefix names.
    pub fn lookup(&self, id: &str) -> Lookup {
        lookup(&self.records.read().unwrap_or_else(|p| p.into_inner()), id)
    }

    pub fn get(&self, id: &str) -> Option<R> {
        self.records
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    /// Inserts or replaces a record.
    pub fn insert(&self, id: &str, rec: R) {
        self.records
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string(), rec);
    }

    pub fn remove(&self, id: &str) {
        self.records
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    /// Every record (in no particular order).
    pub fn values(&self) -> Vec<R> {
        self.records
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// What `f` picks out of the records, under the read lock (no record is cloned).
    pub fn filter_map<T>(&self, f: impl FnMut(&R) -> Option<T>) -> Vec<T> {
        self.records
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter_map(f)
            .collect()
    }

    /// Every id.
    pub fn ids(&self) -> Vec<String> {
        self.records
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }
}

/// A new random 64-hex id.
pub fn new_id() -> std::io::Result<String> {
    let mut b = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(hex::encode(b))
}

/// Now, in nanoseconds since the epoch (CRI timestamps).
pub fn now_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// When process `pid` began, in nanoseconds since the epoch: its start time in
/// `/proc/PID/stat` (clock ticks after boot) plus the boot time in `/proc/stat`. `None` when
/// the process is gone or the files do not parse.
pub fn process_start_nanos(pid: i32) -> Option<i64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    let after_comm = &stat[stat.rfind(')')? + 1..];
    // Field 22 (starttime) is the 20th after the command name.
    let ticks: i64 = after_comm.split_whitespace().nth(19)?.parse().ok()?;
    let boot_secs: i64 = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz <= 0 {
        return None;
    }
    Some(boot_secs * 1_000_000_000 + ticks * (1_000_000_000 / hz))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_start_of_this_process_is_before_now_and_after_boot() {
        let started = process_start_nanos(std::process::id() as i32).expect("own start time");
        let now = now_nanos();
        assert!(started <= now, "{started} > {now}");
        assert!(
            now - started < 24 * 3600 * 1_000_000_000,
            "started a day ago?"
        );
        assert_eq!(process_start_nanos(-5), None);
    }

    #[test]
    fn prefixes_resolve_when_unique() {
        let map: HashMap<String, ()> = [("abc1".to_string(), ()), ("abd2".to_string(), ())].into();
        assert_eq!(lookup(&map, "abc1"), Lookup::Found("abc1".into()));
        assert_eq!(lookup(&map, "abd"), Lookup::Found("abd2".into()));
        assert_eq!(lookup(&map, "ab"), Lookup::Ambiguous);
        assert_eq!(lookup(&map, "x"), Lookup::Missing);
        assert_eq!(lookup(&map, ""), Lookup::Ambiguous);
        let one: HashMap<String, ()> = [("abc".to_string(), ())].into();
        assert_eq!(lookup(&one, ""), Lookup::Missing);
        let index: Index<u8> = Index::default();
        index.reserve("web", "abc1").expect("free");
        assert_eq!(index.reserve("web", "zzz"), Err("abc1".to_string()));
        index.release("web");
        index.reserve("web", "zzz").expect("free again");
        index.insert("abc1", 1);
        assert_eq!(index.lookup("ab"), Lookup::Found("abc1".into()));
        assert_eq!(index.get("abc1"), Some(1));
        index.remove("abc1");
        assert!(index.values().is_empty() && index.ids().is_empty());
        let id = new_id().expect("id");
        assert_eq!(id.len(), 64);
        assert_ne!(id, new_id().expect("id"));
    }
}
