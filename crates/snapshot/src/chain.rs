//! Incremental snapshots: chains of links, and the append-only files that hold them.
//!
//! A chain is a whole snapshot followed by links. Each link is a complete snapshot file of
//! its own (frame, checksum, manifest) whose manifest names its parent by
//! [digest](crate::SnapshotView::digest) and depth, and whose sections hold only what changed
//! since that parent: the memory pages written since (a page that became zero as a zero page),
//! and per session the KV positions from [`SessionInfo::kv_from`](crate::SessionInfo) on.
//! [`parse_chain`] checks a whole chain, oldest first, so that what parses restores:
//!
//! - the first snapshot is whole, every later one a link whose parent digest is the digest of
//!   the one before it and whose depth is its place in the chain; at most [`MAX_CHAIN_LINKS`];
//! - every link has the module and ABI version of the first;
//! - memory never shrinks along the chain;
//! - a session that stores keys and values from position `p > 0` has, in the parent, a session
//!   in the same slot, of the same model and capacity, holding at least `p` tokens whose first
//!   `p` equal its own; the positions below `p` come from there (and so on down the chain).
//!
//! [`parse_chain_unverified`] checks all of that except what needs the bodies hashed (each
//! snapshot's checksum, and so each parent digest), which [`Chain::verify`] then checks on
//! other threads while a restore reads the chain: a restore need not wait for a large file to
//! be hashed first, and a mismatch found after it discards what it restored.
//!
//! # Chain files
//!
//! A chain file is the chain's snapshots back to back, oldest first, each starting at a
//! multiple of 64 bytes with zero padding between them. [`append`](crate::append) adds a
//! link at the end and fsyncs it; [`save`](crate::save) starts a new chain (a whole snapshot,
//! written beside the file and renamed over it). [`split_links`] splits a file into its
//! snapshots: a last snapshot cut short (an append interrupted by a crash) is left out and
//! reported, so a chain restores to its last complete link; anything else that is not a
//! snapshot where one should start is an error.

use crate::hashes::ChunkHashes;
use crate::kv::KvView;
use crate::layout::{HEADER_BYTES, MIN_FILE_BYTES, SECTION_ALIGN, Unverified, align_up, u64_at};
use crate::pages::{MemorySection, restore_sections};
use crate::read::parse_unverified;
use crate::{Link, MAGIC, MAX_CHAIN_LINKS, Manifest, SnapshotError, SnapshotView, corrupt, parse};

/// A digest as 32 lowercase hex digits, the form a [`Link`](crate::Link) names it in.
pub fn digest_hex(digest: u128) -> String {
    format!("{digest:032x}")
}

/// The digest that 32 lowercase hex digits spell.
pub(crate) fn parse_digest(hex: &str) -> Option<u128> {
    let valid = hex.len() == 32 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    valid.then(|| u128::from_str_radix(hex, 16).ok()).flatten()
}

/// A chain file split into its snapshots.
#[derive(Debug)]
pub struct Links<'a> {
    /// Each complete snapshot, oldest first.
    pub links: Vec<&'a [u8]>,
    /// Bytes at the end that start a snapshot but stop short of its length: an append that
    /// did not finish.
    pub torn_bytes: u64,
    /// Where the last complete snapshot ends: the length to cut the file to before appending.
    pub end: u64,
}

/// Splits a chain file into its snapshots (see the crate docs' "Chain files"). Only the frame of
/// each is looked at here: [`parse_chain`] checks them.
pub fn split_links(bytes: &[u8]) -> Result<Links<'_>, SnapshotError> {
    let len = bytes.len() as u64;
    let mut links = Vec::new();
    let mut at = 0u64;
    let mut end = 0u64;
    while at < len {
        let rest = &bytes[at as usize..];
        let magic_len = rest.len().min(MAGIC.len());
        if rest[..magic_len] != MAGIC[..magic_len] {
            return Err(if at == 0 {
                SnapshotError::NotASnapshot
            } else {
                corrupt(format!(
                    "the chain file holds something other than a snapshot at byte {at}"
                ))
            });
        }
        let Some(link_len) = u64_at(rest, 16) else {
            break; // cut short inside the header
        };
        if link_len < MIN_FILE_BYTES.max(HEADER_BYTES) {
            return Err(corrupt(format!(
                "the snapshot at byte {at} of the chain file says it is {link_len} bytes long"
            )));
        }
        if link_len > len - at {
            break; // cut short
        }
        if links.len() as u64 >= u64::from(MAX_CHAIN_LINKS) {
            return Err(SnapshotError::TooLarge {
                what: "chain links",
                value: links.len() as u64 + 1,
                limit: u64::from(MAX_CHAIN_LINKS),
            });
        }
        links.push(&rest[..link_len as usize]);
        end = at + link_len;
        let next = align_up(end).unwrap_or(u64::MAX).min(len);
        if bytes[end as usize..next as usize].iter().any(|&b| b != 0) {
            return Err(corrupt(format!(
                "the padding after the snapshot ending at byte {end} of the chain file is not zero"
            )));
        }
        at = next;
    }
    if links.is_empty() {
        // Not even a first snapshot: say what is wrong with it as one.
        return Err(parse(bytes).err().unwrap_or(SnapshotError::Truncated {
            expected: MIN_FILE_BYTES,
            actual: len,
        }));
    }
    Ok(Links {
        links,
        torn_bytes: len - end,
        end,
    })
}

/// Where a head session's keys and values come from: positions `from..from + count`, the
/// first `count` positions of `view`.
#[derive(Clone, Copy, Debug)]
pub struct KvPiece<'a> {
    pub from: usize,
    pub count: usize,
    view: KvView<'a>,
}

impl<'a> KvPiece<'a> {
    /// All of a whole snapshot's KV blob: positions `0..view.n_tokens`.
    pub fn whole(view: KvView<'a>) -> KvPiece<'a> {
        KvPiece {
            from: 0,
            count: view.n_tokens,
            view,
        }
    }

    /// Layers of keys and values the piece holds.
    pub fn n_layer(&self) -> usize {
        self.view.n_layer
    }

    /// Layer `layer`'s keys of this piece's positions, little-endian bytes of its type.
    pub fn k_layer_bytes(&self, layer: usize) -> Result<&'a [u8], SnapshotError> {
        self.rows(self.view.k_layer_bytes(layer)?)
    }

    /// Layer `layer`'s values of this piece's positions, little-endian bytes of its type.
    pub fn v_layer_bytes(&self, layer: usize) -> Result<&'a [u8], SnapshotError> {
        self.rows(self.view.v_layer_bytes(layer)?)
    }

    fn rows(&self, layer: &'a [u8]) -> Result<&'a [u8], SnapshotError> {
        let value = self.view.kv_type.bytes() as usize;
        let bytes = self.count.checked_mul(self.view.kv_dim * value);
        bytes
            .and_then(|n| layer.get(..n))
            .ok_or_else(|| corrupt("a KV piece is longer than its blob"))
    }
}

/// A checked chain: its snapshots, oldest first, and where each head session's KV comes from.
pub struct Chain<'a> {
    views: Vec<SnapshotView<'a>>,
    /// For each session of the head, its pieces in position order.
    pieces: Vec<Vec<KvPiece<'a>>>,
    /// Each snapshot's checksum, still to be compared ([`parse_chain_unverified`]); empty for
    /// a chain [`parse_chain`] checked.
    unverified: Vec<Unverified<'a>>,
}

/// Checks `links`, oldest first, as one chain (see the crate docs' "Chain files"); each link as
/// [`parse`] checks a file. A single whole snapshot is a chain of one.
pub fn parse_chain<'a>(links: &[&'a [u8]]) -> Result<Chain<'a>, SnapshotError> {
    read_chain(links, false)
}

/// Checks `links` as [`parse_chain`] does, except for what needs their bodies hashed: each
/// snapshot's checksum, and the digest each link names as its parent's. [`Chain::verify`]
/// checks those, on other threads while this one restores from the chain if the caller
/// likes, and returns the digests; the chain's own views report zero. What a restore reads
/// from an unverified chain has passed every structural check, so it cannot go wrong in any
/// way a verified chain could not; only its contents may be damaged.
pub fn parse_chain_unverified<'a>(links: &[&'a [u8]]) -> Result<Chain<'a>, SnapshotError> {
    read_chain(links, true)
}

fn read_chain<'a>(links: &[&'a [u8]], later: bool) -> Result<Chain<'a>, SnapshotError> {
    if links.is_empty() {
        return Err(corrupt("a chain needs at least one snapshot"));
    }
    if links.len() as u64 > u64::from(MAX_CHAIN_LINKS) {
        return Err(SnapshotError::TooLarge {
            what: "chain links",
            value: links.len() as u64,
            limit: u64::from(MAX_CHAIN_LINKS),
        });
    }
    let mut views: Vec<SnapshotView<'a>> = Vec::with_capacity(links.len());
    let mut unverified = Vec::new();
    for (depth, bytes) in links.iter().enumerate() {
        let view = if later {
            let (view, sums) = parse_unverified(bytes).map_err(|e| in_chain(depth, e))?;
            unverified.push(sums);
            view
        } else {
            parse(bytes).map_err(|e| in_chain(depth, e))?
        };
        check_parent(depth, &view, views.last(), !later)?;
        views.push(view);
    }
    let pieces = kv_pieces(&views)?;
    Ok(Chain {
        views,
        pieces,
        unverified,
    })
}

/// An error in the snapshot at `depth` of a chain, as the chain reports it.
fn in_chain(depth: usize, e: SnapshotError) -> SnapshotError {
    match depth {
        0 => e,
        _ => corrupt(format!("link {depth} of the chain: {e}")),
    }
}

/// The digests of a chain's snapshots, oldest first, as [`Chain::verify`] found them.
#[derive(Clone, Debug)]
pub struct Verified(Vec<u128>);

impl Verified {
    /// The newest snapshot's digest.
    pub fn head(&self) -> u128 {
        self.0.last().copied().unwrap_or(0) // a chain has a snapshot
    }
}

/// Checks `view`, the snapshot at `depth` of a chain, against the one before it.
/// The parent's digest is compared only with `digests` (else by [`Chain::verify`]).
fn check_parent(
    depth: usize,
    view: &SnapshotView<'_>,
    parent: Option<&SnapshotView<'_>>,
    digests: bool,
) -> Result<(), SnapshotError> {
    let m = &view.manifest;
    let (link, parent) = match (&m.link, parent) {
        (None, None) => return Ok(()),
        (Some(_), None) => {
            return Err(corrupt(
                "the chain starts with a link, not a whole snapshot: its parent is missing",
            ));
        }
        (None, Some(_)) => {
            return Err(corrupt(format!(
                "snapshot {depth} of the chain is whole, not a link"
            )));
        }
        (Some(link), Some(parent)) => (link, parent),
    };
    if digests {
        check_named_parent(depth, link, parent.digest())?;
    }
    if link.depth as usize != depth {
        return Err(corrupt(format!(
            "link {depth} of the chain says it is at depth {}",
            link.depth
        )));
    }
    let p = &parent.manifest;
    if (m.module.digest.as_str(), m.abi_version) != (p.module.digest.as_str(), p.abi_version) {
        return Err(corrupt(format!(
            "link {depth} is of module {} (ABI {}), its parent of module {} (ABI {})",
            m.module.digest, m.abi_version, p.module.digest, p.abi_version
        )));
    }
    if m.memory_bytes < p.memory_bytes {
        return Err(corrupt(format!(
            "link {depth} has {} bytes of memory, fewer than its parent's {}",
            m.memory_bytes, p.memory_bytes
        )));
    }
    Ok(())
}

/// Checks that `link`, the snapshot at `depth`, names `parent` as its parent's digest.
fn check_named_parent(depth: usize, link: &Link, parent: u128) -> Result<(), SnapshotError> {
    let expected = digest_hex(parent);
    if link.parent != expected {
        return Err(corrupt(format!(
            "link {depth} continues snapshot {}, but the snapshot before it is {expected}",
            link.parent
        )));
    }
    Ok(())
}

/// The pieces of each head session's KV cache, checked down the chain.
fn kv_pieces<'a>(views: &[SnapshotView<'a>]) -> Result<Vec<Vec<KvPiece<'a>>>, SnapshotError> {
    let head_at = views.len() - 1;
    let head = &views[head_at].manifest;
    let mut all = Vec::with_capacity(head.sessions.len());
    for (i, session) in head.sessions.iter().enumerate() {
        let model = &head.models[session.model as usize]; // validate() checked
        let mut pieces = vec![KvPiece {
            from: session.kv_from as usize,
            count: session.tokens.len() - session.kv_from as usize,
            view: views[head_at].kv(i)?,
        }];
        let mut need = session.kv_from as usize;
        let mut at = head_at;
        while need > 0 {
            // Link 0 is whole, so its sessions start at 0 and `need` is 0 before `at` is.
            at -= 1;
            let m = &views[at].manifest;
            let slot = session.slot;
            let found = m.sessions.iter().position(|s| s.slot == slot);
            let Some(j) = found else {
                return Err(corrupt(format!(
                    "the session in slot {slot} continues from position {need}, but snapshot {at} of the chain has no session in that slot"
                )));
            };
            let p = &m.sessions[j];
            if m.models.get(p.model as usize) != Some(model)
                || p.n_ctx != session.n_ctx
                || p.kv_type != session.kv_type
            {
                return Err(corrupt(format!(
                    "the session in slot {slot} continues one of another model, capacity or cache type in snapshot {at} of the chain"
                )));
            }
            if p.tokens.get(..need) != session.tokens.get(..need) {
                return Err(corrupt(format!(
                    "the session in slot {slot} continues from position {need}, but its first {need} tokens differ from those in snapshot {at} of the chain"
                )));
            }
            let from = p.kv_from as usize;
            if from < need {
                pieces.push(KvPiece {
                    from,
                    count: need - from,
                    view: views[at].kv(j)?,
                });
                need = from;
            }
        }
        pieces.reverse();
        all.push(pieces);
    }
    Ok(all)
}

impl<'a> Chain<'a> {
    /// Checks what [`parse_chain_unverified`] left: each snapshot's checksum (its body hashed
    /// on up to 16 threads) and that each link names the digest of the snapshot before it.
    /// Takes `&self`, so that it can run while another thread restores from the chain. For a
    /// chain [`parse_chain`] read, it only returns the digests.
    pub fn verify(&self) -> Result<Verified, SnapshotError> {
        self.verify_hashed(&self.chunk_hashes())
    }

    /// Empty hashes of the chain's unverified snapshots, for readers to fill
    /// ([`ChunkHashes`]) and [`verify_hashed`](Self::verify_hashed) to compare; none for a
    /// verified chain.
    pub fn chunk_hashes(&self) -> ChunkHashes<'a> {
        ChunkHashes::new(&self.unverified)
    }

    /// [`verify`](Self::verify), from the hashes readers have filled in (`hashes`, from
    /// this chain's [`chunk_hashes`](Self::chunk_hashes)); what they left is hashed here, on
    /// up to 16 threads.
    pub fn verify_hashed(&self, hashes: &ChunkHashes<'a>) -> Result<Verified, SnapshotError> {
        if self.unverified.is_empty() {
            return Ok(Verified(self.views.iter().map(|v| v.digest()).collect()));
        }
        hashes.hash_rest(|_| true);
        let mut digests: Vec<u128> = Vec::with_capacity(self.views.len());
        for (depth, (view, unverified)) in self.views.iter().zip(&self.unverified).enumerate() {
            let digest = unverified
                .check(hashes.sums(depth))
                .map_err(|e| in_chain(depth, e))?;
            if let (Some(link), Some(&parent)) = (&view.manifest.link, digests.last()) {
                check_named_parent(depth, link, parent)?;
            }
            digests.push(digest);
        }
        Ok(Verified(digests))
    }

    /// Whether every snapshot's checksum has been compared (always, for [`parse_chain`]).
    pub fn is_verified(&self) -> bool {
        self.unverified.is_empty()
    }

    /// The newest snapshot's manifest: the state the chain restores.
    pub fn manifest(&self) -> &Manifest {
        &self.head().manifest
    }

    /// The newest snapshot.
    pub fn head(&self) -> &SnapshotView<'a> {
        self.views.last().expect("a chain has a snapshot") // parse_chain refuses none
    }

    /// Every snapshot of the chain, oldest first.
    pub fn views(&self) -> &[SnapshotView<'a>] {
        &self.views
    }

    /// Snapshots in the chain: 1 for a whole snapshot alone.
    pub fn len(&self) -> usize {
        self.views.len()
    }

    /// Never: a chain has at least its whole snapshot.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Like [`SnapshotView::restore_pages`], for the chain: every page as the newest link that
    /// stores it has it.
    pub fn restore_pages(
        &self,
        dst: &mut [u8],
        dirty: impl FnMut(usize) -> bool,
    ) -> Result<(), SnapshotError> {
        let sections: Vec<MemorySection<'a>> = self
            .views
            .iter()
            .rev()
            .map(|v| v.memory_section())
            .collect();
        restore_sections(&sections, dst, dirty)
    }

    /// Like [`SnapshotView::restore_memory`], for the chain.
    pub fn restore_memory(&self, dst: &mut [u8]) -> Result<(), SnapshotError> {
        self.restore_pages(dst, |_| true)
    }

    /// The pieces of the KV cache of the head's `manifest().sessions[session]`, in position
    /// order: together they cover positions `0..tokens.len()` exactly once.
    pub fn kv(&self, session: usize) -> Result<&[KvPiece<'a>], SnapshotError> {
        self.pieces
            .get(session)
            .map(Vec::as_slice)
            .ok_or(SnapshotError::OutOfRange {
                what: "session",
                index: session as u64,
                len: self.pieces.len() as u64,
            })
    }
}

impl std::fmt::Debug for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chain").field("views", &self.views).finish()
    }
}

/// Where a chain file whose last complete snapshot ends at byte `end` starts its next one:
/// the next multiple of 64 (zero padding between).
pub fn next_link_at(end: u64) -> u64 {
    end.next_multiple_of(SECTION_ALIGN)
}
