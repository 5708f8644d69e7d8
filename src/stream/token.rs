//! Single-use, short-lived tokens for the streaming URLs: each Exec/Attach/PortForward answer
//! stores its request under a random token; the streaming server takes it out once. An
//! unknown, reused or expired token finds nothing.

use std::collections::HashMap;
use std::io::Read;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;

use crate::cri::v1 as cri;

/// How long a token is good for.
pub const TOKEN_TTL: Duration = Duration::from_secs(60);
/// How many unused tokens may wait at once (as the kubelet's streaming server).
pub const MAX_IN_FLIGHT: usize = 1000;

/// What a token stands for.
#[derive(Debug, Clone)]
pub enum Pending {
    Exec(cri::ExecRequest),
    Attach(cri::AttachRequest),
    PortForward(cri::PortForwardRequest),
}

impl Pending {
    /// The URL path segment of this kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Pending::Exec(_) => "exec",
            Pending::Attach(_) => "attach",
            Pending::PortForward(_) => "portforward",
        }
    }
}

/// Why no token was made.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("more than {MAX_IN_FLIGHT} streaming requests are waiting")]
    TooMany,
    #[error("reading random bytes: {0}")]
    Random(std::io::Error),
}

/// The tokens not used yet.
pub struct Tokens {
    ttl: Duration,
    map: Mutex<HashMap<String, (Instant, Pending)>>,
}

impl Tokens {
    pub fn new(ttl: Duration) -> Tokens {
        Tokens {
            ttl,
            map: Mutex::new(HashMap::new()),
        }
    }

    /// Stores `pending` under a new random token (32 bytes, URL-safe base64).
    pub fn insert(&self, pending: Pending) -> Result<String, TokenError> {
        let mut raw = [0u8; 32];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut raw))
            .map_err(TokenError::Random)?;
        let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
        let now = Instant::now();
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, (at, _)| now.duration_since(*at) < self.ttl);
        if map.len() >= MAX_IN_FLIGHT {
            return Err(TokenError::TooMany);
        }
        map.insert(token.clone(), (now, pending));
        Ok(token)
    }

    /// Whether `token` is waiting for a stream of `kind` (and has not expired).
    pub fn contains(&self, kind: &str, token: &str) -> bool {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.get(token)
            .is_some_and(|(at, p)| at.elapsed() < self.ttl && p.kind() == kind)
    }

    /// Takes the request of `token` if it is of `kind` and has not expired; the token is
    /// gone afterwards whatever the answer.
    pub fn take(&self, kind: &str, token: &str) -> Option<Pending> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let (at, pending) = map.remove(token)?;
        (at.elapsed() < self.ttl && pending.kind() == kind).then_some(pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exec() -> Pending {
        Pending::Exec(cri::ExecRequest::default())
    }

    #[test]
    fn single_use() {
        let t = Tokens::new(TOKEN_TTL);
        let a = t.insert(exec()).expect("token");
        let b = t.insert(exec()).expect("token");
        assert_ne!(a, b);
        assert!(a.len() >= 43);
        assert!(t.contains("exec", &a));
        assert!(!t.contains("attach", &a));
        assert!(t.take("exec", &a).is_some());
        assert!(!t.contains("exec", &a));
        assert!(t.take("exec", &a).is_none());
        assert!(t.take("exec", "nope").is_none());
        // The wrong kind spends the token too.
        assert!(t.take("attach", &b).is_none());
        assert!(t.take("exec", &b).is_none());
    }

    #[test]
    fn expiry() {
        let t = Tokens::new(Duration::from_millis(20));
        let a = t.insert(exec()).expect("token");
        std::thread::sleep(Duration::from_millis(40));
        assert!(t.take("exec", &a).is_none());
    }

    #[test]
    fn bounded() {
        let t = Tokens::new(TOKEN_TTL);
        for _ in 0..MAX_IN_FLIGHT {
            t.insert(exec()).expect("token");
        }
        assert!(matches!(t.insert(exec()), Err(TokenError::TooMany)));
    }
}
