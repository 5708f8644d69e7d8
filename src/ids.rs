//! Ids and times shared by every piece: random 64-hex object ids, id-prefix resolution as CRI
//! clients use it, and CRI timestamps.

use std::collections::HashMap;
use std::io::Read;

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

#[cfg(test)]
mod tests {
    use super::*;

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
        let id = new_id().expect("id");
        assert_eq!(id.len(), 64);
        assert_ne!(id, new_id().expect("id"));
    }
}
