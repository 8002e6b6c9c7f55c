//! A chain's checksums computed by whoever reads the bytes first.
//!
//! A restore from an unverified chain reads most of the file twice: once to hash it, once
//! to copy it where it belongs. [`ChunkHashes`] lets the copy do the hashing: a reader that
//! copies a version-3 chunk whole takes it through [`ChunkHashes::read`], which hashes each
//! block just before handing it on, while the copy still finds it in the core's cache;
//! [`ChunkHashes::hash_rest`] hashes what no reader takes, on other threads; and
//! [`Chain::verify_hashed`](crate::Chain::verify_hashed) compares the sums, hashing whatever is still missing itself.

use std::ops::Range;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use xxhash_rust::xxh3::xxh3_128;

use crate::checksum::{self, CHUNK_BYTES, Sums};
use crate::layout::Unverified;

/// Threads [`ChunkHashes::hash_rest`] uses at most.
const MAX_THREADS: usize = 16;

/// The hashes of an unverified chain's bodies, filled in by whichever thread reads each
/// part first: the chunks of version-3 snapshots one by one, older snapshots' bodies whole.
pub struct ChunkHashes<'a> {
    /// Every version-3 chunk, in address order.
    chunks: Vec<Chunk<'a>>,
    /// The chunks' address ranges, in the same order.
    ranges: Vec<Range<usize>>,
    /// For each snapshot of the chain, its chunks' places in `chunks`, in body order (empty
    /// for a snapshot hashed whole).
    by_view: Vec<Vec<usize>>,
    /// For each snapshot of a version before 3, its body's sums once hashed.
    whole: Vec<Option<(Unverified<'a>, OnceLock<Sums>)>>,
}

struct Chunk<'a> {
    bytes: &'a [u8],
    hash: OnceLock<u128>,
}

impl<'a> ChunkHashes<'a> {
    pub(crate) fn new(unverified: &[Unverified<'a>]) -> ChunkHashes<'a> {
        let mut chunks: Vec<(usize, usize, &'a [u8])> = Vec::new();
        let mut whole = Vec::with_capacity(unverified.len());
        for (view, u) in unverified.iter().enumerate() {
            if u.version() < 3 {
                whole.push(Some((*u, OnceLock::new())));
                continue;
            }
            whole.push(None);
            for (index, bytes) in u.body().chunks(CHUNK_BYTES).enumerate() {
                chunks.push((view, index, bytes));
            }
        }
        chunks.sort_by_key(|&(_, _, bytes)| bytes.as_ptr() as usize);
        let mut by_view: Vec<Vec<(usize, usize)>> = vec![Vec::new(); unverified.len()];
        for (at, &(view, index, _)) in chunks.iter().enumerate() {
            by_view[view].push((index, at));
        }
        let by_view = by_view
            .into_iter()
            .map(|mut places| {
                places.sort_unstable();
                places.into_iter().map(|(_, at)| at).collect()
            })
            .collect();
        let ranges = chunks
            .iter()
            .map(|&(_, _, b)| b.as_ptr() as usize..b.as_ptr() as usize + b.len())
            .collect();
        let chunks = chunks
            .into_iter()
            .map(|(_, _, bytes)| Chunk {
                bytes,
                hash: OnceLock::new(),
            })
            .collect();
        ChunkHashes {
            chunks,
            ranges,
            by_view,
            whole,
        }
    }

    /// The address range of each chunk a reader may take whole, ascending and disjoint.
    pub fn ranges(&self) -> &[Range<usize>] {
        &self.ranges
    }

    /// Hands every byte of chunk `i` (of [`ranges`](Self::ranges)) to `take`, in order, in
    /// blocks that are sub-slices of the chunk, hashing each block just before; the chunk's
    /// hash is then known.
    pub fn read(&self, i: usize, take: &mut dyn FnMut(&[u8])) {
        if let Some(chunk) = self.chunks.get(i) {
            let hash = checksum::hash_reading(chunk.bytes, take);
            // A chunk read twice has the same hash both times.
            let _ = chunk.hash.set(hash);
        }
    }

    /// Hashes, on up to 16 threads, every chunk not hashed yet whose range `want` accepts,
    /// and every older snapshot's body.
    pub fn hash_rest(&self, want: impl Fn(&Range<usize>) -> bool + Sync) {
        let todo: Vec<Job<'_, 'a>> = self
            .whole
            .iter()
            .flatten()
            .map(Job::Whole)
            .chain(
                self.chunks
                    .iter()
                    .zip(&self.ranges)
                    .filter(|(c, r)| c.hash.get().is_none() && want(r))
                    .map(|(c, _)| Job::Chunk(c)),
            )
            .collect();
        let next = AtomicUsize::new(0);
        let work = || {
            while let Some(job) = todo.get(next.fetch_add(1, Ordering::Relaxed)) {
                job.run();
            }
        };
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(MAX_THREADS)
            .min(todo.len());
        if threads <= 1 {
            work();
        } else {
            std::thread::scope(|scope| {
                for _ in 0..threads {
                    scope.spawn(work);
                }
            });
        }
    }

    /// The sums of snapshot `view`'s body, from the hashes made so far, hashing here what
    /// no one has yet.
    pub(crate) fn sums(&self, view: usize) -> Sums {
        if let Some(Some(whole)) = self.whole.get(view) {
            return whole_sums(whole);
        }
        let hashes: Vec<u128> = self.by_view[view]
            .iter()
            .map(|&at| self.chunks[at].hash())
            .collect();
        checksum::combine(&hashes)
    }
}

impl Chunk<'_> {
    /// The chunk's hash, made now if no one has made it yet.
    fn hash(&self) -> u128 {
        *self.hash.get_or_init(|| xxh3_128(self.bytes))
    }
}

/// The sums of an older snapshot's body, hashed whole, made now if no one has made them yet.
fn whole_sums((u, sums): &(Unverified<'_>, OnceLock<Sums>)) -> Sums {
    *sums.get_or_init(|| checksum::of(u.version(), u.body()))
}

/// A part of [`ChunkHashes`] to hash.
enum Job<'h, 'a> {
    Chunk(&'h Chunk<'a>),
    Whole(&'h (Unverified<'a>, OnceLock<Sums>)),
}

impl Job<'_, '_> {
    fn run(&self) {
        match self {
            Job::Chunk(c) => {
                c.hash();
            }
            Job::Whole(whole) => {
                whole_sums(whole);
            }
        }
    }
}
