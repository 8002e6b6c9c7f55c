//! The BPE model shared by both tokenizer kinds: a vocabulary, ranked merges, and the merge
//! loop of Hugging Face `tokenizers` (`models/bpe/word.rs`).
//!
//! A word starts as one symbol per character (or byte); the adjacent pair with the lowest
//! merge rank is merged first, the leftmost among equals, until no adjacent pair has a merge.
//! The order is kept exactly, since a different order can give different ids.
//!
//! A word of n symbols takes O(n log n) time (a heap of candidate merges); a long one checks
//! its [`Deadline`] every [`Deadline::CHECK_EVERY`] merges, so that a caller can bound the
//! time of one pathological word (megabytes of one letter) as well as of many words.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Instant;

use rustc_hash::FxHashMap;

use crate::TextError;

/// Token spelling → id. Where the file spells two ids the same, the later id wins, as in a
/// Python dict built from the list.
pub(crate) type Vocab = FxHashMap<String, u32>;

/// The merge loop's state for one symbol of a word (16 bytes: a long word's symbols are
/// visited in no particular order, so their size is the loop's memory traffic).
#[derive(Debug, Clone, Copy)]
struct Symbol {
    id: u32,
    /// Index of the previous live symbol, or [`NONE`].
    prev: u32,
    /// Index of the next live symbol, or [`NONE`].
    next: u32,
    /// False once merged into the symbol on its left.
    live: bool,
}

/// No symbol: words have fewer than `u32::MAX` symbols.
const NONE: u32 = u32::MAX;

/// Words of up to this many symbols take the scan loop instead of the heap.
const SHORT_WORD: usize = 48;

/// The rank of a pair that does not merge.
const NO_MERGE: (u32, u32) = (u32::MAX, 0);

/// When an encode gives up, if ever.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Deadline(Option<Instant>);

/// The [`Deadline`] passed before the work was done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TimeUp;

impl Deadline {
    /// No deadline.
    pub(crate) const NEVER: Deadline = Deadline(None);

    /// Merges of a long word between two looks at the clock: far enough apart that the clock
    /// costs nothing, close enough that a check comes every few hundred microseconds (a merge
    /// of a word of millions of symbols takes up to about 0.5 us).
    pub(crate) const CHECK_EVERY: usize = 1024;

    /// Give up at `instant`.
    pub(crate) fn at(instant: Instant) -> Deadline {
        Deadline(Some(instant))
    }

    /// Fails once the deadline has passed.
    pub(crate) fn check(self) -> Result<(), TimeUp> {
        match self.0 {
            Some(deadline) if Instant::now() >= deadline => Err(TimeUp),
            _ => Ok(()),
        }
    }
}

/// A vocabulary and its merges.
#[derive(Debug)]
pub(crate) struct Bpe {
    vocab: Vocab,
    /// (left id, right id) → (rank, merged id).
    merges: FxHashMap<u64, (u32, u32)>,
}

fn pair_key(left: u32, right: u32) -> u64 {
    (u64::from(left) << 32) | u64::from(right)
}

impl Bpe {
    /// Builds the model from `merges` in rank order (best first).
    ///
    /// A merge naming a token outside the vocabulary is an error; one whose two halves exist
    /// but whose concatenation does not is dropped, since it could never yield a token.
    pub(crate) fn new<'a>(
        vocab: Vocab,
        merges: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Bpe, TextError> {
        let mut map = FxHashMap::default();
        let mut merged = String::new();
        for (rank, (left, right)) in merges.into_iter().enumerate() {
            let unknown = |token: &str| TextError::MergeUnknownToken {
                rank,
                merge: format!("{left} {right}"),
                token: token.to_string(),
            };
            let left_id = *vocab.get(left).ok_or_else(|| unknown(left))?;
            let right_id = *vocab.get(right).ok_or_else(|| unknown(right))?;
            merged.clear();
            merged.push_str(left);
            merged.push_str(right);
            if let Some(&merged_id) = vocab.get(merged.as_str()) {
                let rank = u32::try_from(rank).unwrap_or(u32::MAX - 1);
                map.insert(pair_key(left_id, right_id), (rank, merged_id));
            }
        }
        Ok(Bpe { vocab, merges: map })
    }

    /// The id of the token spelled `token`.
    pub(crate) fn id(&self, token: &str) -> Option<u32> {
        self.vocab.get(token).copied()
    }

    /// The rank and result of merging `left` and `right`, if they merge.
    fn merge_of(&self, left: u32, right: u32) -> Option<(u32, u32)> {
        self.merges.get(&pair_key(left, right)).copied()
    }

    /// Merges the symbols `ids` of one word as far as the merges allow and appends the result
    /// to `out`, unless `deadline` passes first.
    pub(crate) fn merge_into(
        &self,
        ids: &[u32],
        out: &mut Vec<u32>,
        deadline: Deadline,
    ) -> Result<(), TimeUp> {
        if ids.len() < 2 {
            out.extend_from_slice(ids);
        } else if ids.len() <= SHORT_WORD {
            self.merge_short(ids, out);
        } else {
            self.merge_long(ids, out, deadline)?;
        }
        Ok(())
    }

    /// The merge loop for short words: keeps each adjacent pair's rank and scans them for the
    /// best. Same result as [`Bpe::merge_long`], since both take the lowest (rank, position).
    fn merge_short(&self, ids: &[u32], out: &mut Vec<u32>) {
        let start = out.len();
        out.extend_from_slice(ids);
        let symbols = &mut out[start..];
        let mut n = symbols.len();
        // ranks[i]: the merge of symbols[i] and symbols[i + 1], if any.
        let mut ranks = [NO_MERGE; SHORT_WORD];
        for i in 0..n - 1 {
            ranks[i] = self
                .merge_of(symbols[i], symbols[i + 1])
                .unwrap_or(NO_MERGE);
        }
        loop {
            let mut best = 0;
            for i in 1..n - 1 {
                if ranks[i].0 < ranks[best].0 {
                    best = i;
                }
            }
            let (rank, merged) = ranks[best];
            if rank == u32::MAX {
                break;
            }
            symbols[best] = merged;
            symbols.copy_within(best + 2..n, best + 1);
            ranks.copy_within(best + 2..n, best + 1);
            n -= 1;
            if best + 1 < n {
                ranks[best] = self.merge_of(merged, symbols[best + 1]).unwrap_or(NO_MERGE);
            } else {
                ranks[best] = NO_MERGE;
            }
            if best > 0 {
                ranks[best - 1] = self.merge_of(symbols[best - 1], merged).unwrap_or(NO_MERGE);
            }
            if n == 1 {
                break;
            }
        }
        out.truncate(start + n);
    }

    /// The merge loop of `tokenizers` for words of any length (up to `u32::MAX` symbols,
    /// which [`crate::Tokenizer::encode`] ensures): a min-heap of candidate merges over a
    /// linked list of symbols. Looks at `deadline` every [`Deadline::CHECK_EVERY`] steps.
    fn merge_long(
        &self,
        ids: &[u32],
        out: &mut Vec<u32>,
        deadline: Deadline,
    ) -> Result<(), TimeUp> {
        let mut symbols: Vec<Symbol> = ids
            .iter()
            .enumerate()
            .map(|(i, &id)| Symbol {
                id,
                prev: if i == 0 { NONE } else { i as u32 - 1 },
                next: if i + 1 == ids.len() {
                    NONE
                } else {
                    i as u32 + 1
                },
                live: true,
            })
            .collect();
        // Min-heap on (rank, position), packed as `rank << 32 | position`: the best merge,
        // leftmost first. A merge's rank names its pair, so an entry is current exactly when
        // the pair now at its position has its rank.
        let key = |rank: u32, pos: u32| Reverse((u64::from(rank) << 32) | u64::from(pos));
        let mut queue: BinaryHeap<Reverse<u64>> = ids
            .windows(2)
            .enumerate()
            .filter_map(|(pos, w)| Some(key(self.merge_of(w[0], w[1])?.0, pos as u32)))
            .collect();

        let mut steps = 0usize;
        while let Some(Reverse(top)) = queue.pop() {
            steps += 1;
            if steps.is_multiple_of(Deadline::CHECK_EVERY) {
                deadline.check()?;
            }
            let (rank, pos) = ((top >> 32) as u32, top as u32);
            let current = symbols[pos as usize];
            if !current.live || current.next == NONE {
                continue;
            }
            let right = symbols[current.next as usize];
            let merged = match self.merge_of(current.id, right.id) {
                Some((now, merged)) if now == rank => merged,
                _ => continue, // Stale: an earlier merge changed this pair.
            };
            symbols[pos as usize].id = merged;
            symbols[pos as usize].next = right.next;
            symbols[current.next as usize].live = false;
            if right.next != NONE {
                symbols[right.next as usize].prev = pos;
            }
            let current = symbols[pos as usize];
            if current.prev != NONE {
                let prev = symbols[current.prev as usize];
                if let Some((rank, _)) = self.merge_of(prev.id, current.id) {
                    queue.push(key(rank, current.prev));
                }
            }
            if current.next != NONE {
                let next = symbols[current.next as usize];
                if let Some((rank, _)) = self.merge_of(current.id, next.id) {
                    queue.push(key(rank, pos));
                }
            }
        }
        out.extend(symbols.iter().filter(|s| s.live).map(|s| s.id));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(tokens: &[&str], merges: &[(&str, &str)]) -> Bpe {
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), i as u32))
            .collect();
        Bpe::new(vocab, merges.iter().copied()).unwrap()
    }

    fn run(bpe: &Bpe, word: &str) -> Vec<u32> {
        let ids: Vec<u32> = word
            .chars()
            .map(|c| bpe.id(&c.to_string()).unwrap())
            .collect();
        let mut out = Vec::new();
        bpe.merge_into(&ids, &mut out, Deadline::NEVER).unwrap();
        out
    }

    #[test]
    fn lowest_rank_merges_first() {
        // "unrelated" with the merges of the tokenizers crate's own test.
        let tokens = [
            "u",
            "n",
            "r",
            "e",
            "l",
            "a",
            "t",
            "d",
            "re",
            "at",
            "ed",
            "un",
            "ated",
            "rel",
            "related",
            "unrelated",
        ];
        let merges = [
            ("r", "e"),
            ("a", "t"),
            ("e", "d"),
            ("u", "n"),
            ("at", "ed"),
            ("re", "l"),
            ("rel", "ated"),
            ("un", "related"),
        ];
        let bpe = model(&tokens, &merges);
        assert_eq!(run(&bpe, "unrelated"), vec![15]);
        assert_eq!(run(&bpe, "relate"), vec![13, 9, 3]);
    }

    #[test]
    fn equal_ranks_merge_leftmost_first() {
        let bpe = model(&["a", "aa"], &[("a", "a")]);
        assert_eq!(run(&bpe, "aaa"), vec![1, 0]);
        assert_eq!(run(&bpe, "aaaa"), vec![1, 1]);
    }

    #[test]
    fn short_and_long_loops_agree() {
        let tokens = [
            "a", "b", "c", "ab", "bc", "ca", "abc", "bca", "aa", "aab", "cab", "bb",
        ];
        let merges = [
            ("a", "b"),
            ("b", "c"),
            ("c", "a"),
            ("ab", "c"),
            ("b", "ca"),
            ("a", "a"),
            ("aa", "b"),
            ("c", "ab"),
            ("b", "b"),
        ];
        let bpe = model(&tokens, &merges);
        let mut seed = 12345u64;
        for len in 2..=SHORT_WORD {
            for _ in 0..50 {
                let ids: Vec<u32> = (0..len)
                    .map(|_| {
                        seed = seed
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        ((seed >> 33) % 3) as u32
                    })
                    .collect();
                let (mut short, mut long) = (Vec::new(), Vec::new());
                bpe.merge_short(&ids, &mut short);
                bpe.merge_long(&ids, &mut long, Deadline::NEVER).unwrap();
                assert_eq!(short, long, "{ids:?}");
            }
        }
    }

    #[test]
    fn long_words_stop_at_the_deadline() {
        let bpe = model(&["a", "aa"], &[("a", "a")]);
        let ids = vec![0; 4 * Deadline::CHECK_EVERY];
        let mut out = Vec::new();
        let past = Deadline::at(Instant::now());
        assert_eq!(bpe.merge_into(&ids, &mut out, past), Err(TimeUp));
        out.clear();
        bpe.merge_into(&ids, &mut out, Deadline::NEVER).unwrap();
        assert_eq!(out, vec![1; 2 * Deadline::CHECK_EVERY]);
    }

    #[test]
    fn unknown_merge_token_is_an_error() {
        let vocab: Vocab = [("a".to_string(), 0u32)].into_iter().collect();
        let err = Bpe::new(vocab, [("a", "b")]).unwrap_err();
        assert!(err.to_string().contains("`b`"), "{err}");
    }

    #[test]
    fn merge_without_result_token_is_dropped() {
        let bpe = model(&["a", "b"], &[("a", "b")]);
        assert_eq!(run(&bpe, "ab"), vec![0, 1]);
    }
}
