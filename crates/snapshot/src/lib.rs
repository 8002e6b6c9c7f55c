//! The on-disk format of a Tern actor snapshot, version 3: an actor's manifest (module, globals,
//! models, sessions, host state), its linear memory and one KV cache per session, in one
//! checksummed file that another process restores bit for bit; and incremental snapshots,
//! links that hold only what changed since their parent, chained in an append-only file
//! ([`chain`](crate::parse_chain)).
//!
//! This crate writes version 3 ([`VERSION`]) and reads versions 1 to 3 ([`OLDEST_VERSION`]
//! to [`VERSION`]); [`SnapshotView::version`] says which a file is. They differ only in the
//! manifest and in version 3's zero pages (see below); an older manifest is read into the
//! current [`Manifest`] with what its version did not record left `None` (or, for what
//! version 3 added, as a whole snapshot of f32 caches).
//!
//! Writing: [`encode`] or [`to_bytes`] turn a [`SnapshotWrite`] into bytes; [`save`] writes a
//! file crash-safely (temp file, fsync, rename, fsync of the directory). Reading: [`parse`] a
//! byte slice, or [`SnapshotFile::open`] a file (memory-mapped), then [`SnapshotView`] restores
//! the linear memory and hands out each session's KV cache as a [`KvView`].
//!
//! # Guarantees
//!
//! - **Deterministic**: the same [`SnapshotWrite`] always encodes to the same bytes (for one
//!   build of this crate: another LZ4 implementation may compress pages differently, and any
//!   such file still reads the same).
//! - **Lossless**: memory bytes, global bit patterns (NaN payloads included) and KV values come
//!   back exactly as written.
//! - **Hardened**: [`parse`] bounds every length before using it and refuses anything it does
//!   not understand with a [`SnapshotError`] that says what is wrong. No input makes it panic,
//!   overflow, or allocate more than a small multiple of the input's size. Each check holds on
//!   its own, not only because the checksum matched.
//! - **What parses, restores**: once [`parse`] accepts a file, the manifest is consistent with
//!   the sections (see [`Manifest::validate`] and the KV shapes below). Besides a destination
//!   of the wrong size, the only error left for [`SnapshotView::restore_memory`] is an LZ4
//!   payload that does not decompress to exactly one page; KV layers always copy into a destination of the right size.
//! - **What encodes, parses**: [`encode`] runs the same consistency checks as [`parse`], so it
//!   never writes a file that [`parse`] would refuse.
//!
//! # Byte layout, version 3
//!
//! All integers are little-endian. Offsets are from the start of the file.
//!
//! | offset | size | field | rule |
//! |---|---|---|---|
//! | 0 | 8 | magic | `b"TERNSNAP"` ([`MAGIC`]) |
//! | 8 | 4 | version `u32` | 1 to 3 ([`OLDEST_VERSION`] to [`VERSION`]); other versions are refused |
//! | 12 | 4 | flags `u32` | 0 |
//! | 16 | 8 | file_len `u64` | length of the whole file, trailer included |
//! | 24 | 4 | section_count `u32` | at most [`MAX_SECTIONS`] |
//! | 28 | 4 | reserved `u32` | 0 |
//! | 32 | 24 × section_count | section table | one entry per section, below |
//! | … | … | sections | each at a multiple of 64, zero padding between, in table order, non-overlapping |
//! | file_len − 8 | 8 | checksum `u64` | of every byte before it (the body), below |
//!
//! Section table entry (24 bytes):
//!
//! | offset | size | field | rule |
//! |---|---|---|---|
//! | 0 | 4 | kind `u32` | 1 = manifest, 2 = memory, 3 = KV blob |
//! | 4 | 4 | index `u32` | 0 for manifest and memory; the session number for a KV blob |
//! | 8 | 8 | offset `u64` | multiple of 64, at or after the end of the previous section |
//! | 16 | 8 | len `u64` | the section ends before the trailer |
//!
//! Exactly one manifest and one memory section; KV sections appear in table order with
//! indices 0, 1, 2, …, one per entry of [`Manifest::sessions`].
//!
//! **Manifest section** (kind 1): the [`Manifest`] as UTF-8 JSON, at most
//! [`MAX_MANIFEST_BYTES`]; unknown fields are refused, and so are missing ones, except
//! `last_error`. Version 2 added, and requires, in each of `models`: `sha256` (the model's
//! SHA-256, 64 lowercase hex digits), `legacy_digest` (what version 1 called `digest`) and
//! `numerics` (`backend`, `precision`, `kernels` and `architecture`, strings of at most
//! [`MAX_NUMERICS_BYTES`], `backend` not empty); in `host`: `clock_unix_ms` (an integer or
//! `null`). A version-1 manifest has none of these, and `digest` where version 2 has
//! `legacy_digest`; it must not have the others. Version 3 added, and requires, `link` (`null`
//! for a whole snapshot; for an incremental one its parent's [digest](SnapshotView::digest)
//! as 32 lowercase hex digits and its depth, 1 to [`MAX_CHAIN_LINKS`] − 1) and in each
//! session `kv_from` (the first position its KV blob stores: 0 in a whole snapshot, at most
//! its token count) and `kv_type` (`"f32"` or `"f16"`: how its cache keeps values; a restore
//! into a model keeping the other type is refused); versions 1 and 2 must not have them.
//!
//! **Memory section** (kind 2):
//!
//! | offset | size | field | rule |
//! |---|---|---|---|
//! | 0 | 4 | page_bytes `u32` | [`PAGE_BYTES`] |
//! | 4 | 4 | n_pages `u32` | `memory_bytes / PAGE_BYTES` |
//! | 8 | 4 | n_stored `u32` | at most n_pages |
//! | 12 | 4 | reserved `u32` | 0 |
//! | 16 | 16 × n_stored | page table | `{page u32, codec u32, len u32, reserved u32}` |
//! | … | Σ len | payloads | back to back, in page-table order, filling the section exactly |
//!
//! Pages appear in strictly increasing order, each below n_pages. Codec 0 is raw
//! (len = [`PAGE_BYTES`]); codec 1 is an LZ4 block (0 < len < [`PAGE_BYTES`]) that decompresses
//! to exactly [`PAGE_BYTES`]; codec 2 (version 3) is a page of zeros (len = 0). In a whole
//! snapshot all-zero pages are not stored: restoring zeroes every page absent from the table.
//! In a link the table lists exactly the pages that changed since the parent (one that became
//! zero as codec 2); a page absent from it is as the parent has it, or zero where the parent's
//! memory was smaller. The writer stores a page compressed only when that shrinks it.
//!
//! **KV section** (kind 3): a standard [safetensors](https://github.com/huggingface/safetensors)
//! file, so stock readers open it. An 8-byte header length, then a JSON header with exactly
//! `"__metadata__": {"format": "tern-kv", "version": "1"}` and two tensors `"k"` and `"v"`,
//! dtype `F32` (or `F16` for a session whose `kv_type` is `"f16"`), shape
//! `[n_layer, n_tokens, kv_dim]`, `k` at data offsets `[0, n)` and `v` at `[n, 2n)` with
//! `n = n_layer × n_tokens × kv_dim × 4` (× 2 for `F16`), then the little-endian data. The
//! header is padded with spaces so the data starts 64-byte aligned in the file. The shape must
//! agree with the manifest: `n_layer` and `n_head_kv × head_dim` of the session's model, and
//! the session's token count less its `kv_from`: the blob holds positions `kv_from..`.
//!
//! **Checksum and digest** (version 3): the body is hashed in chunks of 4 MiB (the last one
//! shorter), each chunk's 128-bit XXH3 written little-endian one after another; the checksum
//! is the 64-bit XXH3 of that list, the digest ([`SnapshotView::digest`], which a link names
//! its parent by) its 128-bit XXH3. The chunks hash side by side on a reader's cores.
//! Versions 1 and 2: the checksum is the 64-bit XXH3 of the body, the digest its 128-bit
//! XXH3.
//!
//! # Chain files
//!
//! A whole snapshot followed by its links, back to back, each at a multiple of 64 bytes with
//! zero padding between; see [`split_links`] and [`parse_chain`].

mod chain;
mod checksum;
mod hashes;
mod kv;
mod layout;
mod manifest;
mod older;
mod pages;
mod read;
mod write;

use std::io;
use std::path::PathBuf;

pub use chain::{
    Chain, KvPiece, Links, Verified, digest_hex, next_link_at, parse_chain, parse_chain_unverified,
    split_links,
};
pub use hashes::ChunkHashes;
pub use kv::{KvLayers, KvView, KvWrite};
pub use layout::reseal;
pub use manifest::{
    Global, HostInfo, KvType, Link, Manifest, ModelRef, ModuleRef, Numerics, SessionInfo, ValType,
};
pub use read::{SnapshotFile, SnapshotView, parse};
pub use write::{SnapshotWrite, Written, append, encode, save, to_bytes};

/// The first 8 bytes of every snapshot.
pub const MAGIC: [u8; 8] = *b"TERNSNAP";
/// The format version this crate writes, and the newest it reads.
pub const VERSION: u32 = 3;
/// The oldest format version this crate reads.
pub const OLDEST_VERSION: u32 = 1;
/// Bytes in one WebAssembly page; linear memory is stored page by page.
pub const PAGE_BYTES: usize = 65536;

/// Most snapshots in one chain: the whole snapshot and its links.
pub const MAX_CHAIN_LINKS: u32 = 64;
/// Most sections one file may list.
pub const MAX_SECTIONS: u32 = 1024;
/// Largest manifest section, in bytes.
pub const MAX_MANIFEST_BYTES: u64 = 16 << 20;
/// Largest linear memory, in bytes (the 32-bit Wasm limit).
pub const MAX_MEMORY_BYTES: u64 = 4 << 30;
/// Largest session capacity `n_ctx`, in tokens.
pub const MAX_CTX_TOKENS: u32 = 1 << 24;
/// Largest `host.session_slots`.
pub const MAX_SESSION_SLOTS: u32 = 64;
/// Most globals one manifest may list.
pub const MAX_GLOBALS: u64 = 1 << 16;
/// Longest string in the manifest, in bytes.
pub const MAX_STRING_BYTES: u64 = 64 << 10;
/// Longest field of a model's [`Numerics`], in bytes.
pub const MAX_NUMERICS_BYTES: u64 = 256;
/// Longest JSON header of a KV blob, in bytes.
pub const MAX_KV_HEADER_BYTES: u64 = 64 << 10;

/// Everything that can go wrong writing, reading or restoring a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A file operation on `path` failed.
    #[error("snapshot file {}: {error}", .path.display())]
    Io { path: PathBuf, error: io::Error },
    /// The writer given to [`encode`] failed.
    #[error("cannot write snapshot: {error}")]
    Write { error: io::Error },
    /// The bytes do not start with [`MAGIC`].
    #[error("not a Tern snapshot: the file does not start with \"TERNSNAP\"")]
    NotASnapshot,
    /// The file is in a format version this build does not read.
    #[error(
        "snapshot format version {found} is not supported: this build reads versions {OLDEST_VERSION} to {supported}"
    )]
    Version { found: u32, supported: u32 },
    /// The header sets flags that no version defines.
    #[error("snapshot header sets unknown flags {flags:#x}: no version defines any")]
    Flags { flags: u32 },
    /// The file is shorter than its header says (or than the smallest snapshot).
    #[error("snapshot is truncated: expected {expected} bytes, found {actual}")]
    Truncated { expected: u64, actual: u64 },
    /// The file is longer than its header says.
    #[error("snapshot has {actual} bytes but its header says {expected}: unexpected trailing data")]
    TrailingData { expected: u64, actual: u64 },
    /// The trailer's checksum does not match the contents: the file is damaged.
    #[error(
        "snapshot checksum mismatch: the trailer stores {stored:#018x}, the contents hash to {computed:#018x}"
    )]
    Checksum { stored: u64, computed: u64 },
    /// The manifest section is not valid JSON for [`Manifest`] (unknown fields included).
    #[error("snapshot manifest is not valid: {source}")]
    Manifest { source: serde_json::Error },
    /// The sections or the manifest contradict each other or the format; the message says how.
    #[error("inconsistent snapshot: {0}")]
    Corrupt(String),
    /// A count or size is above the format's limit.
    #[error("{what} is {value}, above the limit of {limit}")]
    TooLarge {
        what: &'static str,
        value: u64,
        limit: u64,
    },
    /// A caller asked for a session or layer that does not exist.
    #[error("{what} {index} does not exist: there are {len}")]
    OutOfRange {
        what: &'static str,
        index: u64,
        len: u64,
    },
    /// A caller's destination buffer has the wrong length.
    #[error("{what} has {actual} elements, expected {expected}")]
    BufferSize {
        what: &'static str,
        expected: u64,
        actual: u64,
    },
}

/// Shorthand for a [`SnapshotError::Corrupt`].
fn corrupt(message: impl Into<String>) -> SnapshotError {
    SnapshotError::Corrupt(message.into())
}

/// Errors with [`SnapshotError::TooLarge`] when `value > limit`.
fn check_limit(what: &'static str, value: u64, limit: u64) -> Result<(), SnapshotError> {
    if value > limit {
        return Err(SnapshotError::TooLarge { what, value, limit });
    }
    Ok(())
}
