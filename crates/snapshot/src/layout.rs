//! The file frame: header, section table, 64-byte alignment and the checksum trailer.
//!
//! [`read_frame`] is the one place the frame of untrusted bytes is checked, in this order:
//! magic, version, flags, file length, checksum, section table. Every section slice it hands
//! out lies inside the file, before the trailer, 64-byte aligned, after the table and after
//! the previous section. [`write_header`] produces the header and table for sections laid out
//! by [`lay_out`].

use crate::checksum;

use crate::{MAGIC, MAX_SECTIONS, OLDEST_VERSION, SnapshotError, VERSION, check_limit, corrupt};

/// Bytes before the section table.
pub(crate) const HEADER_BYTES: u64 = 32;
/// Bytes in one section table entry.
pub(crate) const ENTRY_BYTES: u64 = 24;
/// Bytes in the checksum trailer.
pub(crate) const TRAILER_BYTES: u64 = 8;
/// Every section starts at a multiple of this.
pub(crate) const SECTION_ALIGN: u64 = 64;
/// The smallest file that can hold a header and a trailer.
pub(crate) const MIN_FILE_BYTES: u64 = HEADER_BYTES + TRAILER_BYTES;

/// What a section holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SectionKind {
    Manifest = 1,
    Memory = 2,
    Kv = 3,
}

/// One section table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Section {
    pub kind: SectionKind,
    pub index: u32,
    pub offset: u64,
    pub len: u64,
}

/// The sections of a file whose frame checked out.
#[derive(Debug)]
pub(crate) struct Frame<'a> {
    /// The format version in the header, [`OLDEST_VERSION`] to [`VERSION`].
    pub version: u32,
    /// The snapshot's digest ([`crate::checksum`]).
    pub digest: u128,
    pub manifest: &'a [u8],
    pub memory: &'a [u8],
    /// KV blobs by session number.
    pub kv: Vec<&'a [u8]>,
}

/// Rounds `value` up to a multiple of [`SECTION_ALIGN`]; `None` on overflow.
pub(crate) fn align_up(value: u64) -> Option<u64> {
    Some(value.checked_add(SECTION_ALIGN - 1)? & !(SECTION_ALIGN - 1))
}

/// Places sections of the given kinds and lengths after the table, each aligned; returns the
/// sections and the file length (trailer included).
pub(crate) fn lay_out(
    parts: &[(SectionKind, u32, u64)],
) -> Result<(Vec<Section>, u64), SnapshotError> {
    let overflow = || corrupt("snapshot size overflows u64");
    let count = parts.len() as u64;
    check_limit("section count", count, u64::from(MAX_SECTIONS))?;
    let mut end = HEADER_BYTES + ENTRY_BYTES * count;
    let mut sections = Vec::with_capacity(parts.len());
    for &(kind, index, len) in parts {
        let offset = align_up(end).ok_or_else(overflow)?;
        end = offset.checked_add(len).ok_or_else(overflow)?;
        sections.push(Section {
            kind,
            index,
            offset,
            len,
        });
    }
    let file_len = end.checked_add(TRAILER_BYTES).ok_or_else(overflow)?;
    Ok((sections, file_len))
}

/// Header and section table bytes for a file of `file_len` bytes.
pub(crate) fn write_header(sections: &[Section], file_len: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity((HEADER_BYTES + ENTRY_BYTES * sections.len() as u64) as usize);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes()); // flags
    out.extend_from_slice(&file_len.to_le_bytes());
    out.extend_from_slice(&(sections.len() as u32).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes()); // reserved
    for section in sections {
        out.extend_from_slice(&(section.kind as u32).to_le_bytes());
        out.extend_from_slice(&section.index.to_le_bytes());
        out.extend_from_slice(&section.offset.to_le_bytes());
        out.extend_from_slice(&section.len.to_le_bytes());
    }
    out
}

/// Rewrites the trailer of `bytes` with the checksum of everything before it, so mutated files
/// get past the checksum and exercise the checks behind it. Does nothing to a slice shorter
/// than the trailer.
#[doc(hidden)]
pub fn reseal(bytes: &mut [u8]) {
    let Some(body_len) = bytes.len().checked_sub(TRAILER_BYTES as usize) else {
        return;
    };
    let version = u32_at(bytes, 8).unwrap_or(VERSION);
    let (body, trailer) = bytes.split_at_mut(body_len);
    trailer.copy_from_slice(&checksum::of(version, body).checksum.to_le_bytes());
}

pub(crate) fn u32_at(bytes: &[u8], offset: u64) -> Option<u32> {
    let start = usize::try_from(offset).ok()?;
    bytes
        .get(start..)?
        .first_chunk()
        .map(|b| u32::from_le_bytes(*b))
}

pub(crate) fn u64_at(bytes: &[u8], offset: u64) -> Option<u64> {
    let start = usize::try_from(offset).ok()?;
    bytes
        .get(start..)?
        .first_chunk()
        .map(|b| u64::from_le_bytes(*b))
}

/// Checks magic, version, flags, length and checksum, then the section table; returns the
/// sections.
pub(crate) fn read_frame(bytes: &[u8]) -> Result<Frame<'_>, SnapshotError> {
    let unverified = read_header(bytes)?;
    let digest = unverified.verify()?;
    read_table(unverified.body, unverified.version, digest)
}

/// [`read_frame`] but for the checksum, which the returned [`Unverified`] checks (and
/// yields the digest of); the frame's digest is zero.
pub(crate) fn read_frame_unverified(
    bytes: &[u8],
) -> Result<(Frame<'_>, Unverified<'_>), SnapshotError> {
    let unverified = read_header(bytes)?;
    Ok((
        read_table(unverified.body, unverified.version, 0)?,
        unverified,
    ))
}

/// A snapshot's body and the checksum its trailer stores, not compared yet.
#[derive(Clone, Copy)]
pub(crate) struct Unverified<'a> {
    version: u32,
    body: &'a [u8],
    stored: u64,
}

impl<'a> Unverified<'a> {
    /// Hashes the body (on up to 16 threads); the snapshot's digest when it matches the
    /// stored checksum.
    pub(crate) fn verify(&self) -> Result<u128, SnapshotError> {
        self.check(checksum::of(self.version, self.body))
    }

    /// The format version, which says how the body is hashed.
    pub(crate) fn version(&self) -> u32 {
        self.version
    }

    /// The body: every byte the checksum covers.
    pub(crate) fn body(&self) -> &'a [u8] {
        self.body
    }

    /// The snapshot's digest when `sums`, the body's, match the stored checksum.
    pub(crate) fn check(&self, sums: checksum::Sums) -> Result<u128, SnapshotError> {
        if self.stored != sums.checksum {
            return Err(SnapshotError::Checksum {
                stored: self.stored,
                computed: sums.checksum,
            });
        }
        Ok(sums.digest)
    }
}

/// Checks magic, version, flags and length; returns the body and the stored checksum.
fn read_header(bytes: &[u8]) -> Result<Unverified<'_>, SnapshotError> {
    let actual = bytes.len() as u64;
    let truncated = || SnapshotError::Truncated {
        expected: MIN_FILE_BYTES,
        actual,
    };

    let magic_len = bytes.len().min(MAGIC.len());
    if bytes[..magic_len] != MAGIC[..magic_len] {
        return Err(SnapshotError::NotASnapshot);
    }
    let version = u32_at(bytes, 8).ok_or_else(truncated)?;
    if !(OLDEST_VERSION..=VERSION).contains(&version) {
        return Err(SnapshotError::Version {
            found: version,
            supported: VERSION,
        });
    }
    let flags = u32_at(bytes, 12).ok_or_else(truncated)?;
    if flags != 0 {
        return Err(SnapshotError::Flags { flags });
    }
    let file_len = u64_at(bytes, 16).ok_or_else(truncated)?;
    if actual < file_len {
        return Err(SnapshotError::Truncated {
            expected: file_len,
            actual,
        });
    }
    if actual > file_len {
        return Err(SnapshotError::TrailingData {
            expected: file_len,
            actual,
        });
    }
    if file_len < MIN_FILE_BYTES {
        return Err(truncated());
    }

    let body_len = file_len - TRAILER_BYTES;
    let stored = u64_at(bytes, body_len).ok_or_else(truncated)?;
    let body = bytes.get(..body_len as usize).ok_or_else(truncated)?;
    Ok(Unverified {
        version,
        body,
        stored,
    })
}

/// Reads table entry `i` of `body` and checks that its section is aligned, starts at or
/// after `previous_end` and ends inside `body`; moves `previous_end` to the section's end.
fn read_entry<'a>(
    body: &'a [u8],
    i: u32,
    previous_end: &mut u64,
) -> Result<(u32, u32, &'a [u8]), SnapshotError> {
    let body_len = body.len() as u64;
    let at = HEADER_BYTES + ENTRY_BYTES * u64::from(i);
    let short = || corrupt(format!("section table entry {i} is cut short"));
    let kind = u32_at(body, at).ok_or_else(short)?;
    let index = u32_at(body, at + 4).ok_or_else(short)?;
    let offset = u64_at(body, at + 8).ok_or_else(short)?;
    let len = u64_at(body, at + 16).ok_or_else(short)?;

    if !offset.is_multiple_of(SECTION_ALIGN) {
        return Err(corrupt(format!(
            "section {i} starts at byte {offset}, not a multiple of {SECTION_ALIGN}"
        )));
    }
    if offset < *previous_end {
        return Err(corrupt(format!(
            "section {i} starts at byte {offset}, overlapping the table or the previous section (which ends at byte {previous_end})"
        )));
    }
    let end = offset.checked_add(len).filter(|&end| end <= body_len);
    let Some(end) = end else {
        return Err(corrupt(format!(
            "section {i} (bytes {offset} + {len}) extends past the contents' {body_len} bytes"
        )));
    };
    *previous_end = end;
    // Both bounds are at most body_len, which is a usize.
    Ok((kind, index, &body[offset as usize..end as usize]))
}

/// Reads and checks the section table of `body`, the file without its trailer, of format
/// `version`.
fn read_table(body: &[u8], version: u32, digest: u128) -> Result<Frame<'_>, SnapshotError> {
    let body_len = body.len() as u64;
    let count = u32_at(body, 24).ok_or_else(|| corrupt("header is cut short"))?;
    let reserved = u32_at(body, 28).ok_or_else(|| corrupt("header is cut short"))?;
    if reserved != 0 {
        return Err(corrupt(format!(
            "header reserved field is {reserved}, expected 0"
        )));
    }
    check_limit("section count", u64::from(count), u64::from(MAX_SECTIONS))?;
    let table_end = HEADER_BYTES + ENTRY_BYTES * u64::from(count);
    if table_end > body_len {
        return Err(corrupt(format!(
            "section table of {count} entries ends at byte {table_end}, past the contents' {body_len} bytes"
        )));
    }

    let mut manifest = None;
    let mut memory = None;
    let mut kv = Vec::new();
    let mut previous_end = table_end;
    for i in 0..count {
        let (kind, index, data) = read_entry(body, i, &mut previous_end)?;
        let slot = match kind {
            1 => &mut manifest,
            2 => &mut memory,
            3 => {
                if u64::from(index) != kv.len() as u64 {
                    return Err(corrupt(format!(
                        "section {i} is KV blob {index}, expected KV blob {}",
                        kv.len()
                    )));
                }
                kv.push(data);
                continue;
            }
            _ => return Err(corrupt(format!("section {i} has unknown kind {kind}"))),
        };
        let name = if kind == 1 { "manifest" } else { "memory" };
        if index != 0 {
            return Err(corrupt(format!(
                "section {i} is a {name} section with index {index}, expected 0"
            )));
        }
        if slot.replace(data).is_some() {
            return Err(corrupt(format!("section {i} is a second {name} section")));
        }
    }

    let manifest = manifest.ok_or_else(|| corrupt("the file has no manifest section"))?;
    let memory = memory.ok_or_else(|| corrupt("the file has no memory section"))?;
    Ok(Frame {
        version,
        digest,
        manifest,
        memory,
        kv,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A section's kind, index and length.
    type Part = (SectionKind, u32, u64);

    fn file(parts: &[Part]) -> Vec<u8> {
        let (sections, file_len) = lay_out(parts).unwrap();
        let mut bytes = write_header(&sections, file_len);
        bytes.resize(file_len as usize, 0);
        reseal(&mut bytes);
        bytes
    }

    #[test]
    fn align_up_rounds_to_64() {
        assert_eq!(align_up(0), Some(0));
        assert_eq!(align_up(1), Some(64));
        assert_eq!(align_up(64), Some(64));
        assert_eq!(align_up(u64::MAX), None);
    }

    #[test]
    fn lay_out_aligns_every_section() {
        let parts = [
            (SectionKind::Manifest, 0, 10),
            (SectionKind::Memory, 0, 16),
            (SectionKind::Kv, 0, 0),
        ];
        let (sections, file_len) = lay_out(&parts).unwrap();
        let offsets: Vec<u64> = sections.iter().map(|s| s.offset).collect();
        assert_eq!(offsets, [128, 192, 256]);
        assert_eq!(file_len, 256 + 8);
    }

    #[test]
    fn frame_round_trip() {
        let bytes = file(&[
            (SectionKind::Manifest, 0, 3),
            (SectionKind::Memory, 0, 16),
            (SectionKind::Kv, 0, 5),
            (SectionKind::Kv, 1, 7),
        ]);
        let frame = read_frame(&bytes).unwrap();
        assert_eq!(frame.version, VERSION);
        assert_eq!(frame.manifest.len(), 3);
        assert_eq!(frame.memory.len(), 16);
        assert_eq!(frame.kv.iter().map(|b| b.len()).collect::<Vec<_>>(), [5, 7]);
    }

    #[test]
    fn table_refuses_duplicates_and_missing_kinds() {
        let cases: [(&[Part], &str); 4] = [
            (&[(SectionKind::Memory, 0, 1)], "no manifest"),
            (&[(SectionKind::Manifest, 0, 1)], "no memory"),
            (
                &[(SectionKind::Manifest, 0, 1), (SectionKind::Manifest, 0, 1)],
                "second manifest",
            ),
            (
                &[
                    (SectionKind::Manifest, 0, 1),
                    (SectionKind::Memory, 0, 1),
                    (SectionKind::Kv, 1, 1),
                ],
                "expected KV blob 0",
            ),
        ];
        for (parts, expected) in cases {
            let err = read_frame(&file(parts)).unwrap_err();
            assert!(
                err.to_string().contains(expected),
                "{err} lacks {expected:?}"
            );
        }
    }

    #[test]
    fn reseal_ignores_short_slices() {
        let mut short = [1u8; 7];
        reseal(&mut short);
        assert_eq!(short, [1u8; 7]);
    }
}
