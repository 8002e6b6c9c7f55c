//! Snapshot objects kept in a node's memory.
//!
//! A snapshot object is immutable and named by its content's SHA-256, so a copy kept under
//! its name is that object wherever the directory says it belongs: keeping one never goes
//! stale, however the actor moves. A node keeps each object it wrote and each it read (its
//! digest checked), so that an actor coming back, or one whose chain was fetched ahead of a
//! move ([`super::admin::Admin::Prefetch`]), is restored without reading the store. A budget
//! bounds the bytes kept; past it the objects used longest ago go first.

use std::collections::HashMap;
use std::sync::Arc;

struct Kept {
    bytes: Arc<Vec<u8>>,
    used: u64,
}

/// The objects kept, within `budget` bytes.
pub(crate) struct ObjectCache {
    objects: HashMap<String, Kept>,
    bytes: u64,
    budget: u64,
    clock: u64,
}

impl ObjectCache {
    /// An empty cache that keeps at most `budget` bytes (0: none).
    pub(crate) fn new(budget: u64) -> ObjectCache {
        ObjectCache {
            objects: HashMap::new(),
            bytes: 0,
            budget,
            clock: 0,
        }
    }

    /// The object `name`, if kept.
    pub(crate) fn get(&mut self, name: &str) -> Option<Arc<Vec<u8>>> {
        self.clock += 1;
        let kept = self.objects.get_mut(name)?;
        kept.used = self.clock;
        Some(kept.bytes.clone())
    }

    /// Whether the object `name` is kept.
    pub(crate) fn contains(&self, name: &str) -> bool {
        self.objects.contains_key(name)
    }

    /// Keeps `bytes` as the object `name` (whose content they are), dropping the objects
    /// used longest ago past the budget; an object larger than the budget is not kept.
    pub(crate) fn insert(&mut self, name: &str, bytes: Arc<Vec<u8>>) {
        self.remove(name);
        let len = bytes.len() as u64;
        if len > self.budget {
            return;
        }
        while self.bytes + len > self.budget {
            let Some(oldest) = self
                .objects
                .iter()
                .min_by_key(|(_, kept)| kept.used)
                .map(|(name, _)| name.clone())
            else {
                break;
            };
            self.remove(&oldest);
        }
        self.clock += 1;
        self.bytes += len;
        let used = self.clock;
        self.objects.insert(name.to_string(), Kept { bytes, used });
    }

    /// Drops the object `name`, if kept.
    pub(crate) fn remove(&mut self, name: &str) {
        if let Some(kept) = self.objects.remove(name) {
            self.bytes -= kept.bytes.len() as u64;
        }
    }

    /// The bytes kept.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(len: usize, fill: u8) -> Arc<Vec<u8>> {
        Arc::new(vec![fill; len])
    }

    #[test]
    fn objects_come_back_by_name_within_the_budget_oldest_use_first_out() {
        let mut cache = ObjectCache::new(100);
        cache.insert("a", object(40, 1));
        cache.insert("b", object(40, 2));
        assert_eq!(cache.get("a").as_deref(), Some(&vec![1; 40]));
        // "b" was used longest ago: it makes room for "c".
        cache.insert("c", object(40, 3));
        assert!(!cache.contains("b"));
        assert!(cache.contains("a") && cache.contains("c"));
        assert_eq!(cache.bytes(), 80);
        // Too large to keep at all: nothing else is dropped for it.
        cache.insert("d", object(101, 4));
        assert!(!cache.contains("d"));
        assert_eq!(cache.bytes(), 80);
        // The same name again replaces, never counts twice.
        cache.insert("a", object(40, 1));
        assert_eq!(cache.bytes(), 80);
        cache.remove("a");
        cache.remove("missing");
        assert_eq!(cache.bytes(), 40);
        assert!(cache.get("a").is_none());
    }

    #[test]
    fn a_cache_of_no_bytes_keeps_nothing() {
        let mut cache = ObjectCache::new(0);
        cache.insert("a", object(1, 1));
        assert!(cache.get("a").is_none());
        assert_eq!(cache.bytes(), 0);
    }
}
