//! The trailer's checksum and the snapshot's digest.
//!
//! Version 3 hashes the body (every byte before the trailer) in chunks of [`CHUNK_BYTES`]:
//! each chunk's 128-bit XXH3, little-endian, one after another, make a list; the checksum is
//! the 64-bit XXH3 of that list and the digest its 128-bit XXH3. The chunks hash side by
//! side, so checking a large snapshot takes a fraction of one core's time. Versions 1 and 2
//! hash the body whole (64-bit XXH3; their digest, which only a chain's links name, is its
//! 128-bit XXH3).

use xxhash_rust::xxh3::{Xxh3, xxh3_64, xxh3_128};

/// Bytes of the body each chunk hash covers (the last chunk may be shorter).
pub(crate) const CHUNK_BYTES: usize = 4 << 20;

/// A snapshot's checksum and digest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Sums {
    pub checksum: u64,
    pub digest: u128,
}

/// The sums of `body` as a file of `version` has them, its chunks hashed on up to
/// `available_parallelism` threads.
pub(crate) fn of(version: u32, body: &[u8]) -> Sums {
    if version < 3 {
        let mut hasher = Xxh3::new();
        hasher.update(body);
        return Sums {
            checksum: hasher.digest(),
            digest: hasher.digest128(),
        };
    }
    let chunks: Vec<&[u8]> = body.chunks(CHUNK_BYTES).collect();
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(16)
        .min(chunks.len())
        .max(1);
    let mut hashes = vec![0u128; chunks.len()];
    if threads == 1 {
        for (h, chunk) in hashes.iter_mut().zip(&chunks) {
            *h = xxh3_128(chunk);
        }
    } else {
        let per = chunks.len().div_ceil(threads);
        std::thread::scope(|scope| {
            for (hs, cs) in hashes.chunks_mut(per).zip(chunks.chunks(per)) {
                scope.spawn(move || {
                    for (h, chunk) in hs.iter_mut().zip(cs) {
                        *h = xxh3_128(chunk);
                    }
                });
            }
        });
    }
    combine(&hashes)
}

/// The sums of a version-3 body from its chunks' hashes.
pub(crate) fn combine(hashes: &[u128]) -> Sums {
    let list: Vec<u8> = hashes.iter().flat_map(|h| h.to_le_bytes()).collect();
    Sums {
        checksum: xxh3_64(&list),
        digest: xxh3_128(&list),
    }
}

/// Bytes [`hash_reading`] hashes before handing them on: small enough to stay in a core's
/// own cache until its reader has copied them.
const READ_BLOCK: usize = 64 << 10;

/// A chunk's hash, as [`of`] makes it, computed while `take` reads the chunk: it is handed
/// the chunk's bytes in order, in blocks (sub-slices of `chunk`), each just after it is
/// hashed, so that a copy of them costs no second pass over memory.
pub(crate) fn hash_reading(chunk: &[u8], take: &mut dyn FnMut(&[u8])) -> u128 {
    let mut hasher = Xxh3::new();
    for block in chunk.chunks(READ_BLOCK) {
        hasher.update(block);
        take(block);
    }
    hasher.digest128()
}

/// Hashes a version-3 body as it is written, chunk by chunk.
pub(crate) struct Streaming {
    chunk: Xxh3,
    in_chunk: usize,
    hashes: Vec<u128>,
}

impl Streaming {
    pub(crate) fn new() -> Streaming {
        Streaming {
            chunk: Xxh3::new(),
            in_chunk: 0,
            hashes: Vec::new(),
        }
    }

    pub(crate) fn update(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let take = (CHUNK_BYTES - self.in_chunk).min(bytes.len());
            self.chunk.update(&bytes[..take]);
            self.in_chunk += take;
            bytes = &bytes[take..];
            if self.in_chunk == CHUNK_BYTES {
                self.hashes.push(self.chunk.digest128());
                self.chunk = Xxh3::new();
                self.in_chunk = 0;
            }
        }
    }

    /// The sums of everything given so far.
    pub(crate) fn finish(&self) -> Sums {
        let mut hashes = self.hashes.clone();
        if self.in_chunk > 0 {
            hashes.push(self.chunk.digest128());
        }
        combine(&hashes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streamed_and_parallel_sums_agree_at_every_boundary() {
        let body: Vec<u8> = (0..3 * CHUNK_BYTES + 17)
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        for len in [
            0,
            1,
            CHUNK_BYTES - 1,
            CHUNK_BYTES,
            CHUNK_BYTES + 1,
            body.len(),
        ] {
            let mut streaming = Streaming::new();
            for piece in body[..len].chunks(1_000_003) {
                streaming.update(piece);
            }
            assert_eq!(streaming.finish(), of(3, &body[..len]), "{len} bytes");
        }
        assert_ne!(of(3, &body[..10]), of(3, &body[..11]));
        let mut seen = Vec::new();
        let chunk = &body[..CHUNK_BYTES];
        let hash = hash_reading(chunk, &mut |block| seen.extend_from_slice(block));
        assert_eq!(hash, xxh3_128(chunk));
        assert_eq!(seen, chunk);
        assert_eq!(of(2, &body[..10]).checksum, xxh3_64(&body[..10]));
    }
}
