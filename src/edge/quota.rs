//! How much each identity holds at once (connections, calls in flight), up to a limit, so
//! that one identity cannot take every place the vault has.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Places held per key, each key up to `limit`.
#[derive(Debug)]
pub struct PerKey {
    limit: usize,
    held: Mutex<HashMap<Arc<str>, usize>>,
}

/// One place, given back when dropped.
#[derive(Debug)]
pub struct Held {
    key: Arc<str>,
    counts: Arc<PerKey>,
}

impl PerKey {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit: limit.max(1),
            held: Mutex::default(),
        })
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, usize>> {
        // Only map operations run under the lock; a poisoned one is still whole.
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A place for `key`, unless it already holds `limit`.
    pub fn try_take(self: &Arc<Self>, key: &str) -> Option<Held> {
        let mut held = self.lock();
        let key: Arc<str> = match held.get_key_value(key) {
            Some((_, n)) if *n >= self.limit => return None,
            Some((k, _)) => Arc::clone(k),
            None => key.into(),
        };
        *held.entry(Arc::clone(&key)).or_insert(0) += 1;
        Some(Held {
            key,
            counts: Arc::clone(self),
        })
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut held = self.counts.lock();
        if let Some(n) = held.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_key_holds_at_most_its_limit_and_gives_places_back() {
        let quota = PerKey::new(2);
        let a1 = quota.try_take("a").unwrap();
        let _a2 = quota.try_take("a").unwrap();
        assert!(quota.try_take("a").is_none());
        let _b = quota.try_take("b").unwrap();
        drop(a1);
        let _a3 = quota.try_take("a").unwrap();
        assert!(quota.try_take("a").is_none());
        drop(_b);
        assert!(
            !quota.lock().contains_key("b"),
            "a key holding nothing is forgotten"
        );
    }
}
