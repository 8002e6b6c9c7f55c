//! The memory section: linear memory stored page by page, all-zero pages left out, the rest
//! LZ4-compressed when that shrinks them. In an incremental snapshot the section stores only
//! the pages that changed since the parent, an all-zero one as a zero page (codec 2).
//!
//! [`MemorySection::parse`] checks the section header and every page-table entry (order,
//! range, codec, length, and that the payloads fill the section exactly) before anything
//! reads a payload. Restoring then only has to decompress: a payload that does not decompress
//! to exactly one page is an error, never a partial page.

use std::ops::Range;

use lz4_flex::block::{compress_into, decompress_into, get_maximum_output_size};

use crate::layout::u32_at;
use crate::{PAGE_BYTES, SnapshotError, corrupt};

/// Bytes of the section header.
const SECTION_HEADER_BYTES: u64 = 16;
/// Bytes of one page-table entry.
const ENTRY_BYTES: u64 = 16;

/// How a stored page's payload is encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Codec {
    /// The page's bytes as they are.
    Raw = 0,
    /// One LZ4 block.
    Lz4 = 1,
    /// A page of zeros, with no payload: only where a page absent from the table would not
    /// be zero (an incremental snapshot's page that changed to zeros).
    Zero = 2,
}

/// Where an encoded page's payload lives.
enum Payload<'a> {
    Raw(&'a [u8]),
    /// A range of [`EncodedMemory::compressed`].
    Lz4(Range<usize>),
    Zero,
}

/// A memory section ready to be written.
pub(crate) struct EncodedMemory<'a> {
    /// Section header and page table.
    table: Vec<u8>,
    payloads: Vec<Payload<'a>>,
    compressed: Vec<u8>,
}

impl<'a> EncodedMemory<'a> {
    /// Encodes `memory`, whose length is a multiple of [`PAGE_BYTES`] below 4 GiB: every
    /// page that is not all zero, or with `changed`, exactly the pages it lists (in increasing
    /// order, each below the page count; the caller checked), zero ones as zero pages.
    pub(crate) fn new(memory: &'a [u8], changed: Option<&[u32]>) -> Self {
        let mut entries = Vec::new();
        let mut payloads = Vec::new();
        let mut compressed = Vec::new();
        let mut scratch = vec![0u8; get_maximum_output_size(PAGE_BYTES)];
        let pages: Box<dyn Iterator<Item = (usize, &[u8])>> = match changed {
            None => Box::new(memory.chunks_exact(PAGE_BYTES).enumerate()),
            Some(list) => Box::new(list.iter().filter_map(|&p| {
                let p = p as usize;
                Some((p, memory.get(p * PAGE_BYTES..(p + 1) * PAGE_BYTES)?))
            })),
        };
        for (index, page) in pages {
            if is_zero(page) {
                if changed.is_some() {
                    entries.push([index as u32, Codec::Zero as u32, 0, 0]);
                    payloads.push(Payload::Zero);
                }
                continue;
            }
            let (codec, len, payload) = match compress_into(page, &mut scratch) {
                Ok(n) if n < PAGE_BYTES => {
                    let start = compressed.len();
                    compressed.extend_from_slice(&scratch[..n]);
                    (Codec::Lz4, n, Payload::Lz4(start..start + n))
                }
                _ => (Codec::Raw, PAGE_BYTES, Payload::Raw(page)),
            };
            // index < n_pages <= 2^16 and len <= PAGE_BYTES: both fit in u32.
            entries.push([index as u32, codec as u32, len as u32, 0]);
            payloads.push(payload);
        }

        let n_pages = (memory.len() / PAGE_BYTES) as u32;
        let mut table = Vec::with_capacity(16 * (entries.len() + 1));
        for word in [PAGE_BYTES as u32, n_pages, entries.len() as u32, 0] {
            table.extend_from_slice(&word.to_le_bytes());
        }
        for word in entries.iter().flatten() {
            table.extend_from_slice(&word.to_le_bytes());
        }
        EncodedMemory {
            table,
            payloads,
            compressed,
        }
    }

    /// Section length in bytes.
    pub(crate) fn len(&self) -> u64 {
        let payload_bytes: usize = self.payloads.iter().map(|p| self.bytes_of(p).len()).sum();
        (self.table.len() + payload_bytes) as u64
    }

    /// The section's bytes, in order, in a few large pieces.
    pub(crate) fn pieces(&self) -> impl Iterator<Item = &[u8]> {
        std::iter::once(self.table.as_slice()).chain(self.payloads.iter().map(|p| self.bytes_of(p)))
    }

    /// Pages stored (not all-zero).
    #[cfg(test)]
    fn stored(&self) -> usize {
        self.payloads.len()
    }

    fn bytes_of<'s>(&'s self, payload: &'s Payload<'a>) -> &'s [u8] {
        match payload {
            Payload::Raw(page) => page,
            Payload::Lz4(range) => self.compressed.get(range.clone()).unwrap_or_default(),
            Payload::Zero => &[],
        }
    }
}

/// Whether every byte of `page` is zero.
fn is_zero(page: &[u8]) -> bool {
    let (words, rest) = page.as_chunks::<16>();
    words.iter().all(|w| u128::from_ne_bytes(*w) == 0) && rest.iter().all(|&b| b == 0)
}

/// One stored page of a checked section.
struct StoredPage<'a> {
    index: u32,
    codec: Codec,
    payload: &'a [u8],
}

/// A memory section whose header and page table have been checked.
#[derive(Clone, Copy)]
pub(crate) struct MemorySection<'a> {
    n_pages: u32,
    n_stored: u32,
    /// The page table, `16 × n_stored` bytes.
    entries: &'a [u8],
    /// All payloads, back to back.
    payloads: &'a [u8],
    /// Whether zero pages (codec 2) may appear: from version 3.
    zero_pages: bool,
}

impl std::fmt::Debug for MemorySection<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemorySection")
            .field("n_pages", &self.n_pages)
            .field("n_stored", &self.n_stored)
            .field("payload_bytes", &self.payloads.len())
            .finish()
    }
}

impl<'a> MemorySection<'a> {
    /// Checks `section` against the manifest's `memory_bytes`; `zero_pages` says whether the
    /// file's version has zero pages.
    pub(crate) fn parse(
        section: &'a [u8],
        memory_bytes: u64,
        zero_pages: bool,
    ) -> Result<Self, SnapshotError> {
        let short = || corrupt("memory section is shorter than its 16-byte header");
        let field = |offset| u32_at(section, offset).ok_or_else(short);
        let (page_bytes, n_pages, n_stored, reserved) =
            (field(0)?, field(4)?, field(8)?, field(12)?);
        if page_bytes as usize != PAGE_BYTES {
            return Err(corrupt(format!(
                "memory section uses {page_bytes}-byte pages, expected {PAGE_BYTES}"
            )));
        }
        if u64::from(n_pages) * PAGE_BYTES as u64 != memory_bytes {
            return Err(corrupt(format!(
                "memory section holds {n_pages} pages but the manifest says memory_bytes is {memory_bytes}"
            )));
        }
        if n_stored > n_pages {
            return Err(corrupt(format!(
                "memory section stores {n_stored} pages of {n_pages}"
            )));
        }
        if reserved != 0 {
            return Err(corrupt(format!(
                "memory section reserved field is {reserved}, expected 0"
            )));
        }
        let table_end = SECTION_HEADER_BYTES + ENTRY_BYTES * u64::from(n_stored);
        if table_end > section.len() as u64 {
            return Err(corrupt(format!(
                "memory page table of {n_stored} entries ends at byte {table_end}, past the section's {} bytes",
                section.len()
            )));
        }
        // table_end <= section.len().
        let (table, payloads) = section.split_at(table_end as usize);
        let parsed = MemorySection {
            n_pages,
            n_stored,
            entries: &table[SECTION_HEADER_BYTES as usize..],
            payloads,
            zero_pages,
        };
        let used = parsed.for_each_page(|_| Ok(()))?;
        if used != payloads.len() {
            return Err(corrupt(format!(
                "memory payloads take {used} bytes but the section has {} bytes after its page table",
                payloads.len()
            )));
        }
        Ok(parsed)
    }

    /// Number of pages stored in the file.
    pub(crate) fn stored_pages(&self) -> usize {
        self.n_stored as usize
    }

    /// Calls `f` on each stored page in order after checking its entry; returns the payload
    /// bytes used.
    fn for_each_page(
        &self,
        mut f: impl FnMut(StoredPage<'a>) -> Result<(), SnapshotError>,
    ) -> Result<usize, SnapshotError> {
        let mut offset = 0usize;
        let mut next_page = 0u32; // lowest index the next entry may have
        for (i, entry) in self.entries.as_chunks::<16>().0.iter().enumerate() {
            let word = |at: u64| u32_at(entry, at).unwrap_or(u32::MAX);
            let (index, codec, len, reserved) = (word(0), word(4), word(8), word(12));
            if index < next_page || index >= self.n_pages {
                return Err(corrupt(format!(
                    "memory page table entry {i} names page {index}; expected a page in {next_page}..{}",
                    self.n_pages
                )));
            }
            let codec = match codec {
                0 if len as usize == PAGE_BYTES => Codec::Raw,
                1 if len > 0 && (len as usize) < PAGE_BYTES => Codec::Lz4,
                2 if self.zero_pages && len == 0 => Codec::Zero,
                0 | 1 => {
                    return Err(corrupt(format!(
                        "memory page {index} has codec {codec} and an impossible length of {len} bytes"
                    )));
                }
                _ => {
                    return Err(corrupt(format!(
                        "memory page {index} has unknown codec {codec}"
                    )));
                }
            };
            if reserved != 0 {
                return Err(corrupt(format!(
                    "memory page {index} entry reserved field is {reserved}, expected 0"
                )));
            }
            let end = offset.checked_add(len as usize);
            let Some(payload) = end.and_then(|end| self.payloads.get(offset..end)) else {
                return Err(corrupt(format!(
                    "memory page {index} payload runs past the end of the section"
                )));
            };
            offset += payload.len();
            next_page = index + 1; // index < n_pages <= u32::MAX
            f(StoredPage {
                index,
                codec,
                payload,
            })?;
        }
        Ok(offset)
    }

    /// Writes every stored page into `dst` and zeroes each page that is not stored and for
    /// which `dirty(page)` is true.
    pub(crate) fn restore(
        &self,
        dst: &mut [u8],
        dirty: impl FnMut(usize) -> bool,
    ) -> Result<(), SnapshotError> {
        restore_sections(std::slice::from_ref(self), dst, dirty)
    }

    /// Writes each stored page whose flag in `written` is false into `dst`, and sets the flag:
    /// a newer link's page wins over an older one's. `dst` and `written` cover at least this
    /// section's pages. The pages are decoded side by side on up to [`WRITERS`] threads (a
    /// fresh memory's pages fault in as they are first written, so that spreads the faults
    /// too).
    fn apply(&self, dst: &mut [u8], written: &mut [bool]) -> Result<(), SnapshotError> {
        let mut outs: Vec<Option<&mut [u8]>> = dst.chunks_exact_mut(PAGE_BYTES).map(Some).collect();
        let mut work = Vec::new();
        self.for_each_page(|page| {
            let index = page.index as usize;
            // for_each_page checked index < n_pages, and the caller sized dst and written for
            // n_pages; `get_mut` keeps that from being a panic if it ever did not.
            let outside = || corrupt(format!("memory page {index} lies outside memory"));
            let flag = written.get_mut(index).ok_or_else(outside)?;
            if std::mem::replace(flag, true) {
                return Ok(());
            }
            let out = outs.get_mut(index).and_then(Option::take);
            work.push((page, out.ok_or_else(outside)?));
            Ok(())
        })?;
        let writers = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(WRITERS)
            .min(work.len().div_ceil(PAGES_PER_WRITER))
            .max(1);
        if writers == 1 {
            return work
                .into_iter()
                .try_for_each(|(page, out)| decode(page, out));
        }
        let per = work.len().div_ceil(writers);
        let mut parts = Vec::with_capacity(writers);
        while !work.is_empty() {
            let rest = work.split_off(per.min(work.len()));
            parts.push(std::mem::replace(&mut work, rest));
        }
        std::thread::scope(|scope| {
            let handles: Vec<_> = parts
                .into_iter()
                .map(|part| {
                    scope.spawn(move || {
                        part.into_iter()
                            .try_for_each(|(page, out)| decode(page, out))
                    })
                })
                .collect();
            handles.into_iter().try_for_each(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(corrupt("a memory page writer panicked")))
            })
        })
    }

    /// Pages of memory this section describes.
    pub(crate) fn n_pages(&self) -> usize {
        self.n_pages as usize
    }
}

/// Most threads that write one section's pages.
const WRITERS: usize = 8;
/// Fewest pages worth a thread of their own.
const PAGES_PER_WRITER: usize = 16;

/// Writes one stored page into `out`, a page of memory.
fn decode(page: StoredPage<'_>, out: &mut [u8]) -> Result<(), SnapshotError> {
    let index = page.index;
    match page.codec {
        Codec::Raw => out.copy_from_slice(page.payload),
        Codec::Zero => out.fill(0),
        Codec::Lz4 => match decompress_into(page.payload, out) {
            Ok(PAGE_BYTES) => {}
            Ok(n) => {
                return Err(corrupt(format!(
                    "memory page {index} decompresses to {n} bytes, expected {PAGE_BYTES}"
                )));
            }
            Err(e) => {
                return Err(corrupt(format!(
                    "memory page {index} does not decompress: {e}"
                )));
            }
        },
    }
    Ok(())
}

/// Restores memory from the memory sections of a chain, newest first: each page from the
/// newest section that stores it; every page none stores is zeroed where `dirty(page)` is
/// true. `dst` must be exactly the newest section's size, and no section may be larger.
pub(crate) fn restore_sections(
    newest_first: &[MemorySection<'_>],
    dst: &mut [u8],
    mut dirty: impl FnMut(usize) -> bool,
) -> Result<(), SnapshotError> {
    let n_pages = newest_first.first().map_or(0, MemorySection::n_pages);
    let expected = n_pages as u64 * PAGE_BYTES as u64;
    if dst.len() as u64 != expected {
        return Err(SnapshotError::BufferSize {
            what: "memory destination (bytes)",
            expected,
            actual: dst.len() as u64,
        });
    }
    let mut written = vec![false; n_pages];
    for section in newest_first {
        if section.n_pages() > n_pages {
            return Err(corrupt(format!(
                "an older link's memory has {} pages, more than the newest's {n_pages}",
                section.n_pages()
            )));
        }
        section.apply(dst, &mut written)?;
    }
    for (page, chunk) in dst.chunks_exact_mut(PAGE_BYTES).enumerate() {
        if !written[page] && dirty(page) {
            chunk.fill(0);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(memory: &[u8]) -> Vec<u8> {
        let encoded = EncodedMemory::new(memory, None);
        let bytes: Vec<u8> = encoded.pieces().flatten().copied().collect();
        assert_eq!(bytes.len() as u64, encoded.len());
        bytes
    }

    /// Pages: zero, text-like (compressible), pseudo-random (incompressible), zero.
    fn memory() -> Vec<u8> {
        let mut memory = vec![0u8; 4 * PAGE_BYTES];
        for (i, b) in memory[PAGE_BYTES..2 * PAGE_BYTES].iter_mut().enumerate() {
            *b = b"hello, pages "[i % 13];
        }
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for b in &mut memory[2 * PAGE_BYTES..3 * PAGE_BYTES] {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        memory
    }

    #[test]
    fn zero_pages_are_left_out_and_codecs_chosen() {
        let memory = memory();
        let encoded = EncodedMemory::new(&memory, None);
        assert_eq!(encoded.stored(), 2);
        let bytes = section(&memory);
        let entry = |i: u64, field: u64| u32_at(&bytes, 16 + 16 * i + field).unwrap();
        assert_eq!((entry(0, 0), entry(0, 4)), (1, Codec::Lz4 as u32));
        assert!((entry(0, 8) as usize) < PAGE_BYTES / 10);
        assert_eq!(
            (entry(1, 0), entry(1, 4), entry(1, 8)),
            (2, 0, PAGE_BYTES as u32)
        );
    }

    #[test]
    fn restore_round_trips_and_zeroes_gaps() {
        let memory = memory();
        let bytes = section(&memory);
        let parsed = MemorySection::parse(&bytes, memory.len() as u64, true).unwrap();
        assert_eq!(parsed.stored_pages(), 2);
        let mut dst = vec![0xaau8; memory.len()];
        parsed.restore(&mut dst, |_| true).unwrap();
        assert!(dst == memory);
    }

    #[test]
    fn restore_refuses_wrong_destination() {
        let memory = memory();
        let bytes = section(&memory);
        let parsed = MemorySection::parse(&bytes, memory.len() as u64, true).unwrap();
        let err = parsed.restore(&mut [0u8; 10], |_| true).unwrap_err();
        assert!(
            matches!(err, SnapshotError::BufferSize { actual: 10, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn parse_refuses_payload_length_mismatch() {
        let memory = memory();
        let mut bytes = section(&memory);
        bytes.push(0);
        let err = MemorySection::parse(&bytes, memory.len() as u64, true).unwrap_err();
        assert!(err.to_string().contains("after its page table"), "{err}");
    }

    #[test]
    fn corrupt_lz4_payload_is_an_error() {
        let memory = memory();
        let mut bytes = section(&memory);
        // The first payload (page 1, LZ4) starts right after the two entries.
        let payload = 16 + 2 * 16;
        bytes[payload..payload + 8].fill(0xff);
        let parsed = MemorySection::parse(&bytes, memory.len() as u64, true).unwrap();
        let err = parsed
            .restore(&mut vec![0u8; memory.len()], |_| true)
            .unwrap_err();
        assert!(err.to_string().contains("memory page 1"), "{err}");
    }
}
