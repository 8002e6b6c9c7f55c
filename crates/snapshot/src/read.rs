//! Reading snapshots: [`parse`] checks a whole file and returns a [`SnapshotView`] that
//! borrows its sections; [`SnapshotFile`] holds a file's bytes (memory-mapped when large).
//!
//! Everything a view hands out was checked by [`parse`]: the frame, the manifest, the memory
//! page table and every KV blob's header and shape against the manifest.

use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::sync::OnceLock;
use std::sync::mpsc::{self, Sender};

use memmap2::{Mmap, MmapOptions};

use crate::kv::KvView;
use crate::layout::{Frame, Unverified, read_frame, read_frame_unverified};
use crate::older::read_manifest;
use crate::pages::MemorySection;
use crate::{MAX_MANIFEST_BYTES, Manifest, SnapshotError, check_limit, corrupt};

/// Files smaller than this are read into memory rather than mapped.
const MAP_THRESHOLD_BYTES: u64 = 256 << 10;

/// Mappings at least this large are unmapped on a thread of their own (see
/// [`SnapshotFile`]'s `Drop`).
const UNMAP_LATER_BYTES: usize = 8 << 20;

/// A snapshot file's bytes, memory-mapped or (for small files) read into memory.
pub struct SnapshotFile {
    bytes: Bytes,
}

enum Bytes {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl SnapshotFile {
    /// Opens the file at `path`. Nothing is checked until [`view`](Self::view).
    ///
    /// Large files are memory-mapped: the file must not be truncated or rewritten in place
    /// while the `SnapshotFile` lives. [`save`](crate::save) never does that (it replaces
    /// files by renaming); a process that did could make reads fault.
    pub fn open(path: &Path) -> Result<SnapshotFile, SnapshotError> {
        let io_error = |source| SnapshotError::Io {
            path: path.to_path_buf(),
            error: source,
        };
        let file = File::open(path).map_err(io_error)?;
        let len = file.metadata().map_err(io_error)?.len();
        let bytes = if len < MAP_THRESHOLD_BYTES {
            let mut bytes = Vec::with_capacity(len as usize);
            // `take` bounds the read even if the file grew since `metadata`.
            file.take(MAP_THRESHOLD_BYTES)
                .read_to_end(&mut bytes)
                .map_err(io_error)?;
            Bytes::Owned(bytes)
        } else {
            // SAFETY: the mapping is read-only and private to this value. Mapping a file is
            // sound as long as no one modifies or truncates it while mapped; snapshot files
            // are published by rename and never written in place, and `open` documents that
            // contract. The bytes are treated as untrusted input by `parse` regardless.
            //
            // Not populated up front: the readers that follow (the checksum's threads, the
            // restore's copies) fault the pages in side by side, faster than one thread
            // mapping them all first.
            let map = unsafe { MmapOptions::new().map(&file) };
            Bytes::Mapped(map.map_err(io_error)?)
        };
        Ok(SnapshotFile { bytes })
    }

    /// Checks the file and returns a view of it; see [`parse`].
    pub fn view(&self) -> Result<SnapshotView<'_>, SnapshotError> {
        parse(self.bytes())
    }

    /// The file's bytes.
    pub fn bytes(&self) -> &[u8] {
        match &self.bytes {
            Bytes::Mapped(map) => map,
            Bytes::Owned(bytes) => bytes,
        }
    }
}

/// A large mapping is unmapped on another thread: tearing down the page tables of a mapping
/// that a restore's threads have read costs about as much as a small restore (0.6-0.7 ms for
/// 94 MB on a 2-core machine), and whoever dropped the file (a restore that just finished) need
/// not wait for it.
impl Drop for SnapshotFile {
    fn drop(&mut self) {
        if let Bytes::Mapped(map) = &self.bytes
            && map.len() >= UNMAP_LATER_BYTES
            && let Bytes::Mapped(map) = std::mem::replace(&mut self.bytes, Bytes::Owned(Vec::new()))
        {
            unmap_later(map);
        }
    }
}

/// Hands `map` to the thread that unmaps large mappings, started on first use; unmaps it
/// here if that thread cannot be started or has gone (a failed send drops it with its error).
fn unmap_later(map: Mmap) {
    static UNMAPPER: OnceLock<Option<Sender<Mmap>>> = OnceLock::new();
    let unmapper = UNMAPPER.get_or_init(|| {
        let (send, receive) = mpsc::channel::<Mmap>();
        std::thread::Builder::new()
            .name("tern-unmap".into())
            .spawn(move || receive.into_iter().for_each(drop))
            .ok()
            .map(|_| send)
    });
    if let Some(send) = unmapper {
        let _ = send.send(map);
    }
}

impl AsRef<[u8]> for SnapshotFile {
    fn as_ref(&self) -> &[u8] {
        self.bytes()
    }
}

impl std::fmt::Debug for SnapshotFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mapped = matches!(self.bytes, Bytes::Mapped(_));
        f.debug_struct("SnapshotFile")
            .field("bytes", &self.bytes().len())
            .field("mapped", &mapped)
            .finish()
    }
}

/// A checked snapshot: the manifest, and the memory and KV sections borrowed from the bytes.
pub struct SnapshotView<'a> {
    /// The manifest, in the current form whatever the file's version (see
    /// [`version`](Self::version)).
    pub manifest: Manifest,
    version: u32,
    digest: u128,
    len: u64,
    memory: MemorySection<'a>,
    kv: Vec<KvView<'a>>,
}

/// Checks `bytes` as a whole snapshot, in order: magic, version, flags, length, checksum,
/// section table, manifest (read as its version wrote it; [`Manifest::validate`] included, a
/// version-1 manifest exempt from the fields it lacks), memory page table, and each KV
/// blob's header and shape against its session (`[model.n_layer, tokens.len(),
/// model.n_head_kv × model.head_dim]`). Never panics; allocates at most a small multiple of
/// `bytes.len()`.
pub fn parse(bytes: &[u8]) -> Result<SnapshotView<'_>, SnapshotError> {
    view_of(bytes, read_frame(bytes)?)
}

/// [`parse`] but for the checksum, which the returned [`Unverified`] checks (and yields
/// the digest of); the view's digest is zero.
pub(crate) fn parse_unverified(
    bytes: &[u8],
) -> Result<(SnapshotView<'_>, Unverified<'_>), SnapshotError> {
    let (frame, unverified) = read_frame_unverified(bytes)?;
    Ok((view_of(bytes, frame)?, unverified))
}

/// The view of a snapshot whose frame has been read: everything after the frame checked.
fn view_of<'a>(bytes: &'a [u8], frame: Frame<'a>) -> Result<SnapshotView<'a>, SnapshotError> {
    check_limit(
        "manifest bytes",
        frame.manifest.len() as u64,
        MAX_MANIFEST_BYTES,
    )?;
    let manifest = read_manifest(frame.version, frame.manifest)
        .map_err(|source| SnapshotError::Manifest { source })?;
    manifest.validate_as(frame.version)?;
    let memory = MemorySection::parse(frame.memory, manifest.memory_bytes, frame.version >= 3)?;

    if frame.kv.len() != manifest.sessions.len() {
        return Err(corrupt(format!(
            "the file has {} KV blobs but the manifest lists {} sessions",
            frame.kv.len(),
            manifest.sessions.len()
        )));
    }
    let mut kv = Vec::with_capacity(frame.kv.len());
    for (i, (blob, session)) in frame.kv.iter().zip(&manifest.sessions).enumerate() {
        let view = KvView::parse(i, blob, session.kv_type)?;
        let Some(model) = manifest.models.get(session.model as usize) else {
            return Err(corrupt(format!("session {i} has no model"))); // validate() checked
        };
        let stored = session.tokens.len() - session.kv_from as usize; // validate() checked
        let expected = [u64::from(model.n_layer), stored as u64, model.kv_dim()];
        let found = view.shape().map(|d| d as u64);
        if found != expected {
            return Err(corrupt(format!(
                "session {i} KV blob has shape {found:?} but its manifest entry implies {expected:?} ([model n_layer, tokens from kv_from, n_head_kv × head_dim])"
            )));
        }
        kv.push(view);
    }
    Ok(SnapshotView {
        manifest,
        version: frame.version,
        digest: frame.digest,
        len: bytes.len() as u64,
        memory,
        kv,
    })
}

impl<'a> SnapshotView<'a> {
    /// The file's format version: [`OLDEST_VERSION`](crate::OLDEST_VERSION) to
    /// [`VERSION`](crate::VERSION).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The snapshot's digest: a 128-bit XXH3 over the body's chunk hashes (see the crate's
    /// byte layout; versions 1 and 2: of the body whole).
    /// A [`Link`](crate::Link) names its parent by it. It detects damage and mix-ups, not
    /// forgery: snapshots are the host's own files.
    pub fn digest(&self) -> u128 {
        self.digest
    }

    /// The snapshot's length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Never: a snapshot has at least its header.
    pub fn is_empty(&self) -> bool {
        false
    }

    pub(crate) fn memory_section(&self) -> MemorySection<'a> {
        self.memory
    }

    /// Writes every stored page into `dst` and zeroes every page that is not stored. `dst`
    /// must be exactly `manifest.memory_bytes` long. On error `dst` holds partial contents.
    pub fn restore_memory(&self, dst: &mut [u8]) -> Result<(), SnapshotError> {
        self.memory.restore(dst, |_| true)
    }

    /// Like [`restore_memory`](Self::restore_memory), but of the pages that are not stored
    /// zeroes only those for which `dirty(page)` is true (page = byte offset / [`PAGE_BYTES`])
    /// and leaves the rest untouched. For a `dst` known to be zero outside a few pages (a
    /// fresh instance whose data segments wrote some pages), this skips the zero fill of the
    /// rest and keeps it uncommitted.
    ///
    /// [`PAGE_BYTES`]: crate::PAGE_BYTES
    pub fn restore_pages(
        &self,
        dst: &mut [u8],
        dirty: impl FnMut(usize) -> bool,
    ) -> Result<(), SnapshotError> {
        self.memory.restore(dst, dirty)
    }

    /// Number of memory pages stored in the file (pages that are not all zero).
    pub fn stored_pages(&self) -> usize {
        self.memory.stored_pages()
    }

    /// The KV cache of `manifest.sessions[session]`.
    pub fn kv(&self, session: usize) -> Result<KvView<'a>, SnapshotError> {
        self.kv
            .get(session)
            .copied()
            .ok_or(SnapshotError::OutOfRange {
                what: "session",
                index: session as u64,
                len: self.kv.len() as u64,
            })
    }
}

impl std::fmt::Debug for SnapshotView<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotView")
            .field("version", &self.version)
            .field("manifest", &self.manifest)
            .field("stored_pages", &self.stored_pages())
            .field("kv", &self.kv)
            .finish()
    }
}
