//! Writing snapshots: [`encode`] to any writer, [`to_bytes`], the crash-safe [`save`], and
//! [`append`] of a link to a chain file.
//!
//! Everything is checked and laid out before the first byte is written, so a refused input
//! writes nothing; bulk data (pages, KV tensors) is then streamed straight from the caller's
//! slices, hashed and written in large chunks.

use std::fs::{self, OpenOptions};
use std::io::{self, BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::checksum::Streaming;

use crate::kv::{self, KvLayers, KvWrite};
use crate::layout::{self, Section, SectionKind};
use crate::pages::EncodedMemory;
use crate::{MAX_MANIFEST_BYTES, Manifest, SnapshotError, check_limit, corrupt};

/// Bytes hashed and written at a time, so a chunk is still in cache when it is written.
const CHUNK_BYTES: usize = 1 << 20;

/// An actor's state to write.
#[derive(Clone, Debug)]
pub struct SnapshotWrite<'a> {
    pub manifest: &'a Manifest,
    /// Linear memory; `manifest.memory_bytes` long.
    pub memory: &'a [u8],
    /// `kv[i]` is the KV cache of `manifest.sessions[i]`: its positions from `kv_from` on.
    pub kv: Vec<KvWrite<'a>>,
    /// For a link (`manifest.link` set), the memory pages that changed since its parent, in
    /// increasing order; `None` for a whole snapshot, which stores every page that is not zero.
    pub changed_pages: Option<&'a [u32]>,
}

/// What writing a snapshot produced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Written {
    /// The snapshot's length in bytes.
    pub bytes: u64,
    /// Its [digest](crate::SnapshotView::digest).
    pub digest: u128,
    /// The length of the file it was written to, once written: where a chain file's next
    /// link goes.
    pub file_len: u64,
}

/// Encodes `s` into `out` as format [`VERSION`](crate::VERSION); returns its length and digest.
/// Checks `s` first (the manifest with [`Manifest::validate`], which refuses one read from a
/// version-1 file until its models have their `sha256` and `numerics`; the memory length; each
/// KV cache's shape against its session and model) and writes nothing if a check fails. `out`
/// is not flushed.
pub fn encode(s: &SnapshotWrite<'_>, out: &mut impl Write) -> Result<Written, SnapshotError> {
    Plan::new(s)?.write(s, out)
}

/// Encodes `s` into a new vector; see [`encode`].
pub fn to_bytes(s: &SnapshotWrite<'_>) -> Result<Vec<u8>, SnapshotError> {
    let plan = Plan::new(s)?;
    let capacity = usize::try_from(plan.file_len).map_err(|_| SnapshotError::TooLarge {
        what: "snapshot bytes",
        value: plan.file_len,
        limit: usize::MAX as u64,
    })?;
    let mut out = Vec::with_capacity(capacity);
    plan.write(s, &mut out)?;
    Ok(out)
}

/// Writes `s`, a whole snapshot, to `path` crash-safely, replacing any file there (a chain
/// file too: this starts a new chain); returns what it wrote.
///
/// The snapshot goes to a temporary file `<path>.tmp-<pid>-<n>` in the same directory, which
/// is fsynced and renamed over `path`, and then the directory is fsynced. An interruption at
/// any point leaves an existing file at `path` intact: readers see the old snapshot or the new
/// one, never a mix. On error the temporary file is removed.
pub fn save(path: &Path, s: &SnapshotWrite<'_>) -> Result<Written, SnapshotError> {
    let io_error = |source| SnapshotError::Io {
        path: path.to_path_buf(),
        error: source,
    };
    let tmp = temp_path(path).map_err(io_error)?;
    let written = write_file(&tmp, s).and_then(|written| {
        fs::rename(&tmp, path).map_err(io_error)?;
        Ok(written)
    });
    let written = match written {
        Ok(written) => written,
        Err(e) => {
            // The temp file may not exist (creating it failed); nothing else to do then.
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
    };
    sync_parent(path).map_err(io_error)?;
    Ok(written)
}

/// `<path>.tmp-<pid>-<n>`, with `n` distinct per call in this process.
fn temp_path(path: &Path) -> io::Result<PathBuf> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let Some(name) = path.file_name() else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "snapshot path has no file name",
        ));
    };
    let mut tmp = name.to_os_string();
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    tmp.push(format!(".tmp-{}-{n}", std::process::id()));
    Ok(path.with_file_name(tmp))
}

/// Encodes `s` into a new file at `tmp` and fsyncs it.
fn write_file(tmp: &Path, s: &SnapshotWrite<'_>) -> Result<Written, SnapshotError> {
    let io_error = |source| SnapshotError::Io {
        path: tmp.to_path_buf(),
        error: source,
    };
    let plan = Plan::new(s)?;
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(tmp)
        .map_err(io_error)?;
    let mut out = BufWriter::with_capacity(CHUNK_BYTES, file);
    let written = plan.write(s, &mut out).map_err(|e| match e {
        SnapshotError::Write { error } => io_error(error),
        other => other,
    })?;
    let file = out.into_inner().map_err(|e| io_error(e.into_error()))?;
    file.sync_all().map_err(io_error)?;
    Ok(written)
}

/// Appends `s`, a link, to the chain file at `path` whose last complete snapshot ends at byte
/// `end` ([`Links::end`](crate::Links), or [`Written::file_len`] of the last write), and
/// fsyncs it; returns what it wrote. Anything after `end` (an append a crash cut short) is
/// cut off first. An interruption leaves the chain up to `end` whole: readers see it, with
/// or without the new link.
pub fn append(path: &Path, end: u64, s: &SnapshotWrite<'_>) -> Result<Written, SnapshotError> {
    let io_error = |source| SnapshotError::Io {
        path: path.to_path_buf(),
        error: source,
    };
    if s.manifest.link.is_none() {
        return Err(corrupt(
            "only a link can be appended to a chain; a whole snapshot starts a new one",
        ));
    }
    let plan = Plan::new(s)?;
    let mut file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_error)?;
    let len = file.metadata().map_err(io_error)?.len();
    if len < end {
        return Err(corrupt(format!(
            "the chain file {} has {len} bytes, fewer than the {end} it had",
            path.display()
        )));
    }
    file.set_len(end).map_err(io_error)?;
    file.seek(SeekFrom::Start(end)).map_err(io_error)?;
    let pad = crate::next_link_at(end) - end;
    let mut out = BufWriter::with_capacity(CHUNK_BYTES, file);
    out.write_all(&vec![0; pad as usize]).map_err(io_error)?;
    let written = plan.write(s, &mut out).map_err(|e| match e {
        SnapshotError::Write { error } => io_error(error),
        other => other,
    })?;
    let file = out.into_inner().map_err(|e| io_error(e.into_error()))?;
    file.sync_data().map_err(io_error)?;
    Ok(Written {
        file_len: end + pad + written.bytes,
        ..written
    })
}

/// Fsyncs the directory holding `path`, so a rename into it is durable.
#[cfg(unix)]
fn sync_parent(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    fs::File::open(dir)?.sync_all()
}

/// Directories cannot be opened for fsync here; the rename is as durable as the OS makes it.
#[cfg(not(unix))]
fn sync_parent(_path: &Path) -> io::Result<()> {
    Ok(())
}

/// A checked snapshot with every section's bytes or length known, and its layout.
struct Plan<'a> {
    manifest: Vec<u8>,
    memory: EncodedMemory<'a>,
    /// Length prefix and JSON header of each KV blob.
    kv_headers: Vec<Vec<u8>>,
    sections: Vec<Section>,
    file_len: u64,
}

impl<'a> Plan<'a> {
    fn new(s: &SnapshotWrite<'a>) -> Result<Self, SnapshotError> {
        let m = s.manifest;
        m.validate()?;
        if s.memory.len() as u64 != m.memory_bytes {
            return Err(corrupt(format!(
                "memory is {} bytes but the manifest says memory_bytes is {}",
                s.memory.len(),
                m.memory_bytes
            )));
        }
        match (&m.link, s.changed_pages) {
            (None, Some(_)) => {
                return Err(corrupt(
                    "changed pages are given for a whole snapshot, which stores every page",
                ));
            }
            (Some(_), None) => {
                return Err(corrupt(
                    "a link needs the pages that changed since its parent",
                ));
            }
            (Some(_), Some(pages)) => {
                let n_pages = m.memory_bytes / crate::PAGE_BYTES as u64;
                let ordered = pages.windows(2).all(|w| w[0] < w[1]);
                if !ordered || pages.last().is_some_and(|&p| u64::from(p) >= n_pages) {
                    return Err(corrupt(format!(
                        "changed pages must increase and lie below the memory's {n_pages} pages"
                    )));
                }
            }
            (None, None) => {}
        }
        if s.kv.len() != m.sessions.len() {
            return Err(corrupt(format!(
                "{} KV caches given for {} sessions",
                s.kv.len(),
                m.sessions.len()
            )));
        }

        let manifest =
            serde_json::to_vec(m).map_err(|source| SnapshotError::Manifest { source })?;
        check_limit("manifest bytes", manifest.len() as u64, MAX_MANIFEST_BYTES)?;
        let memory = EncodedMemory::new(s.memory, s.changed_pages);
        let mut parts = vec![
            (SectionKind::Manifest, 0, manifest.len() as u64),
            (SectionKind::Memory, 0, memory.len()),
        ];
        let mut kv_headers = Vec::with_capacity(s.kv.len());
        for (i, (kv, session)) in s.kv.iter().zip(&m.sessions).enumerate() {
            let Some(model) = m.models.get(session.model as usize) else {
                return Err(corrupt(format!("session {i} has no model"))); // validate() checked
            };
            let stored = session.tokens.len() - session.kv_from as usize; // validate() checked
            let expected = [model.n_layer as u64, stored as u64, model.kv_dim()];
            let given = [kv.k.len() as u64, kv.n_tokens as u64, kv.kv_dim as u64];
            if given != expected {
                return Err(corrupt(format!(
                    "session {i} KV cache has shape [n_layer, n_tokens, kv_dim] = {given:?} but the manifest implies {expected:?}"
                )));
            }
            let tensor_bytes = kv.tensor_bytes(i)?;
            if kv.k.kv_type() != session.kv_type {
                return Err(corrupt(format!(
                    "session {i} KV cache is {} but the manifest says {}",
                    kv.k.kv_type().name(),
                    session.kv_type.name()
                )));
            }
            let header = kv::header(
                kv.k.len(),
                kv.n_tokens,
                kv.kv_dim,
                session.kv_type,
                tensor_bytes,
            );
            let blob_len = (tensor_bytes.checked_mul(2))
                .and_then(|data| data.checked_add(header.len() as u64))
                .ok_or_else(|| corrupt(format!("session {i} KV blob size overflows u64")))?;
            parts.push((SectionKind::Kv, i as u32, blob_len));
            kv_headers.push(header);
        }
        let (sections, file_len) = layout::lay_out(&parts)?;
        Ok(Plan {
            manifest,
            memory,
            kv_headers,
            sections,
            file_len,
        })
    }

    fn write(&self, s: &SnapshotWrite<'_>, out: &mut impl Write) -> Result<Written, SnapshotError> {
        let mut sink = Sink {
            out,
            hasher: Streaming::new(),
            written: 0,
        };
        sink.put(&layout::write_header(&self.sections, self.file_len))?;
        for section in &self.sections {
            sink.pad_to(section.offset)?;
            match section.kind {
                SectionKind::Manifest => sink.put(&self.manifest)?,
                SectionKind::Memory => {
                    for piece in self.memory.pieces() {
                        sink.put(piece)?;
                    }
                }
                SectionKind::Kv => {
                    let i = section.index as usize;
                    let (Some(header), Some(kv)) = (self.kv_headers.get(i), s.kv.get(i)) else {
                        return Err(corrupt(format!("KV blob {i} was not planned")));
                    };
                    sink.put(header)?;
                    for layers in [&kv.k, &kv.v] {
                        match layers {
                            KvLayers::F32(layers) => {
                                for layer in layers {
                                    sink.put_f32(layer)?;
                                }
                            }
                            KvLayers::F16(layers) => {
                                for layer in layers {
                                    sink.put_u16(layer)?;
                                }
                            }
                        }
                    }
                }
            }
        }
        sink.finish(self.file_len)
    }
}

/// Hashes and counts everything written through it.
struct Sink<'w, W: Write> {
    out: &'w mut W,
    hasher: Streaming,
    written: u64,
}

impl<W: Write> Sink<'_, W> {
    fn put(&mut self, bytes: &[u8]) -> Result<(), SnapshotError> {
        for chunk in bytes.chunks(CHUNK_BYTES) {
            self.hasher.update(chunk);
            self.out
                .write_all(chunk)
                .map_err(|error| SnapshotError::Write { error })?;
        }
        self.written += bytes.len() as u64;
        Ok(())
    }

    #[cfg(target_endian = "little")]
    fn put_f32(&mut self, values: &[f32]) -> Result<(), SnapshotError> {
        self.put(kv::f32_bytes(values))
    }

    #[cfg(not(target_endian = "little"))]
    fn put_f32(&mut self, values: &[f32]) -> Result<(), SnapshotError> {
        let mut buf = Vec::with_capacity(CHUNK_BYTES);
        for chunk in values.chunks(CHUNK_BYTES / 4) {
            buf.clear();
            buf.extend(chunk.iter().flat_map(|v| v.to_le_bytes()));
            self.put(&buf)?;
        }
        Ok(())
    }

    fn put_u16(&mut self, values: &[u16]) -> Result<(), SnapshotError> {
        let mut buf = Vec::with_capacity(CHUNK_BYTES.min(2 * values.len()));
        for chunk in values.chunks(CHUNK_BYTES / 2) {
            buf.clear();
            buf.extend(chunk.iter().flat_map(|v| v.to_le_bytes()));
            self.put(&buf)?;
        }
        Ok(())
    }

    /// Writes zeros up to file offset `offset`.
    fn pad_to(&mut self, offset: u64) -> Result<(), SnapshotError> {
        const ZEROS: [u8; layout::SECTION_ALIGN as usize] = [0; layout::SECTION_ALIGN as usize];
        let gap = offset
            .checked_sub(self.written)
            .filter(|&gap| gap < layout::SECTION_ALIGN)
            .ok_or_else(|| corrupt(format!("section planned at byte {offset} out of order")))?;
        self.put(&ZEROS[..gap as usize])
    }

    /// Writes the checksum trailer; returns the file length and digest.
    fn finish(mut self, file_len: u64) -> Result<Written, SnapshotError> {
        let sums = self.hasher.finish();
        let (checksum, digest) = (sums.checksum.to_le_bytes(), sums.digest);
        self.put(&checksum)?;
        if self.written != file_len {
            return Err(corrupt(format!(
                "wrote {} bytes but planned {file_len}",
                self.written
            )));
        }
        Ok(Written {
            bytes: self.written,
            digest,
            file_len: self.written,
        })
    }
}
