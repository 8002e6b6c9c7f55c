//! Snapshots kept in host memory: a mirror of each actor's chain as the store holds it, so
//! that an actor passivated a little while ago comes back without reading the store.
//!
//! The mirror is updated only after the store has the same bytes (a whole snapshot put, a
//! link appended), so it never holds what the store does not; a chain whose append does not
//! continue the mirror exactly is dropped from it. A budget bounds the bytes kept; past it the
//! chains used longest ago go first. Only a store that one server owns alone (the state
//! folder, locked) is mirrored: in a cluster another node may move the actor on. A cluster's
//! node keeps its immutable snapshot objects in one instead, each under its own name
//! ([`crate::cluster`]).

use std::collections::HashMap;

use bytes::Bytes;

/// One actor's chain: the bytes of its whole snapshot (and any links read with it from the
/// store), then each link appended since, without padding.
struct Chain {
    segments: Vec<Bytes>,
    /// Where the chain ends in the store's value.
    end: u64,
    bytes: u64,
    used: u64,
}

/// The chains kept, within `budget` bytes.
pub struct HotSnapshots {
    chains: HashMap<String, Chain>,
    bytes: u64,
    budget: u64,
    clock: u64,
}

impl HotSnapshots {
    /// An empty mirror that keeps at most `budget` bytes (0: none).
    pub fn new(budget: u64) -> HotSnapshots {
        HotSnapshots {
            chains: HashMap::new(),
            bytes: 0,
            budget,
            clock: 0,
        }
    }

    /// Actor `id`'s chain is now `bytes` (as the store holds it: a whole snapshot, or a chain
    /// file read whole).
    pub fn replace(&mut self, id: &str, bytes: Bytes) {
        self.forget(id);
        let len = bytes.len() as u64;
        if len > self.budget {
            return;
        }
        self.clock += 1;
        self.chains.insert(
            id.to_string(),
            Chain {
                segments: vec![bytes],
                end: len,
                bytes: len,
                used: self.clock,
            },
        );
        self.bytes += len;
        self.evict();
    }

    /// The store appended `link` to actor `id`'s chain after its first `end` bytes, so that it
    /// now ends at `new_end`.
    pub fn append(&mut self, id: &str, end: u64, new_end: u64, link: Vec<u8>) {
        let continues = self.chains.get(id).is_some_and(|c| c.end == end);
        if !continues {
            self.forget(id);
            return;
        }
        self.clock += 1;
        let chain = self.chains.get_mut(id).expect("checked above");
        let len = link.len() as u64;
        chain.segments.push(Bytes::from(link));
        chain.end = new_end;
        chain.bytes += len;
        chain.used = self.clock;
        self.bytes += len;
        self.evict();
    }

    /// Actor `id`'s chain, if kept: the store's bytes up to the first link appended since,
    /// then each such link.
    pub fn get(&mut self, id: &str) -> Option<Vec<Bytes>> {
        self.clock += 1;
        let clock = self.clock;
        self.chains.get_mut(id).map(|c| {
            c.used = clock;
            c.segments.clone()
        })
    }

    /// Drops actor `id`'s chain.
    pub fn forget(&mut self, id: &str) {
        if let Some(chain) = self.chains.remove(id) {
            self.bytes -= chain.bytes;
        }
    }

    /// Bytes kept.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Drops the chains used longest ago until the rest fit the budget.
    fn evict(&mut self) {
        while self.bytes > self.budget {
            let Some(oldest) = self
                .chains
                .iter()
                .min_by_key(|(_, c)| c.used)
                .map(|(id, _)| id.clone())
            else {
                return;
            };
            self.forget(&oldest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(n: usize) -> Bytes {
        Bytes::from(vec![7u8; n])
    }

    #[test]
    fn chains_grow_by_their_appends_and_the_oldest_go_past_the_budget() {
        let mut hot = HotSnapshots::new(1000);
        hot.replace("a", bytes(400));
        hot.append("a", 400, 448 + 100, vec![1; 100]);
        assert_eq!(hot.get("a").unwrap().len(), 2);
        assert_eq!(hot.bytes(), 500);
        // An append that does not continue the mirror drops it.
        hot.append("a", 400, 600, vec![1; 10]);
        assert!(hot.get("a").is_none());
        assert_eq!(hot.bytes(), 0);
        hot.replace("a", bytes(400));
        hot.replace("b", bytes(400));
        hot.get("a");
        hot.replace("c", bytes(400));
        assert!(hot.get("b").is_none(), "b was used longest ago");
        assert!(hot.get("a").is_some() && hot.get("c").is_some());
        hot.replace("big", bytes(2000));
        assert!(hot.get("big").is_none(), "larger than the budget");
        assert_eq!(hot.bytes(), 800);
        let mut none = HotSnapshots::new(0);
        none.replace("a", bytes(1));
        assert!(none.get("a").is_none());
    }
}
