//! Incremental snapshots of an actor: links that hold only what changed since the last
//! snapshot made durable, and the chain files they are appended to.
//!
//! What changed is tracked, never found by reading memory: the guest's own stores mark the
//! pages they write in its dirty-page map ([`crate::dirty`]), and every host write into guest
//! memory (a message, a host function's output, device work) marks its pages in
//! [`PageSet`]. A session's keys and values only grow; a rewind lowers the session's `kept`
//! mark, the positions known equal to the last durable snapshot's.
//!
//! Two steps make a link durable: [`Actor::capture_link`] writes it (what changed since the
//! last committed snapshot, which it names as its parent), and [`Actor::commit`], called
//! once the link is stored, makes it the parent of the next. A capture that is never
//! committed (its save failed) loses nothing: the next capture still holds everything since
//! the last commit. [`Actor::save_link`] does both, appending to a chain (a file, or a
//! store's key) and deciding when to start it over with a whole snapshot.

use std::path::Path;

use tern_snapshot::{self as format, Chain, Link, MAX_CHAIN_LINKS, PAGE_BYTES, Written};

use crate::{Actor, ActorError};

/// A set of Wasm pages (64 KiB) of an actor's memory.
#[derive(Clone, Debug, Default)]
pub(crate) struct PageSet {
    words: Vec<u64>,
}

impl PageSet {
    /// Adds every page that bytes `offset..offset + len` touch.
    pub(crate) fn mark(&mut self, offset: usize, len: usize) {
        if len == 0 {
            return;
        }
        let (first, last) = (offset / PAGE_BYTES, (offset + len - 1) / PAGE_BYTES);
        for page in first..=last {
            self.insert(page);
        }
    }

    pub(crate) fn insert(&mut self, page: usize) {
        let word = page / 64;
        if word >= self.words.len() {
            self.words.resize(word + 1, 0);
        }
        self.words[word] |= 1 << (page % 64);
    }

    fn union(&mut self, other: &PageSet) {
        for (i, w) in other.words.iter().enumerate() {
            if *w != 0 {
                if i >= self.words.len() {
                    self.words.resize(i + 1, 0);
                }
                self.words[i] |= w;
            }
        }
    }

    /// The pages in the set below `n_pages`, in increasing order.
    pub(crate) fn below(&self, n_pages: usize) -> Vec<u32> {
        let mut out = Vec::new();
        for (i, &w) in self.words.iter().enumerate() {
            let mut bits = w;
            while bits != 0 {
                let page = i * 64 + bits.trailing_zeros() as usize;
                if page < n_pages {
                    out.push(page as u32);
                }
                bits &= bits - 1;
            }
        }
        out
    }
}

/// The last durable snapshot of an actor: what its next link continues.
#[derive(Clone, Debug)]
pub(crate) struct Lineage {
    digest: u128,
    depth: u32,
    /// The chain it ends, as bytes.
    chain: ChainBytes,
    /// Pages written since that snapshot and drained from the trackers by captures that were
    /// not committed.
    pending: PageSet,
}

impl Lineage {
    /// The lineage of an actor restored from `view`, a whole snapshot.
    pub(crate) fn whole(view: &format::SnapshotView<'_>) -> Lineage {
        Lineage {
            digest: view.digest(),
            depth: 0,
            chain: ChainBytes::whole(view.len()),
            pending: PageSet::default(),
        }
    }

    /// The lineage of an actor restored from `chain`, whose newest snapshot's digest is
    /// `digest` (the chain's own, or its verification's).
    pub(crate) fn of(chain: &Chain<'_>, digest: u128) -> Lineage {
        Lineage {
            digest,
            depth: chain.len() as u32 - 1,
            chain: ChainBytes::of(chain),
            pending: PageSet::default(),
        }
    }
}

/// What a capture took, until it is committed.
#[derive(Clone, Debug)]
pub(crate) struct Captured {
    digest: u128,
    depth: u32,
    /// Each session slot's token count when captured (`None`: no session).
    lengths: Vec<Option<usize>>,
}

impl Actor {
    /// Writes this actor's state as the next link of its chain: what changed since its last
    /// committed snapshot ([`commit`](Self::commit)), or a whole snapshot when there is none,
    /// when `whole` is set, or when the chain is as long as a chain may be. `write` stores it
    /// ([`format::append`] to a chain file, or bytes for an object store) and returns what
    /// it wrote. Call [`commit`](Self::commit) with that once it is durable.
    pub fn capture_link(
        &mut self,
        whole: bool,
        write: impl FnOnce(&format::SnapshotWrite<'_>) -> Result<Written, format::SnapshotError>,
    ) -> Result<Written, ActorError> {
        let changed = self.drain_written()?;
        let lineage = self.lineage.as_ref().filter(|l| {
            !whole && self.module.info.dirty.is_some() && l.depth + 1 < MAX_CHAIN_LINKS
        });
        let link = lineage.map(|l| {
            (
                Link {
                    parent: format::digest_hex(l.digest),
                    depth: l.depth + 1,
                },
                changed,
            )
        });
        let depth = link.as_ref().map_or(0, |(l, _)| l.depth);
        let lengths = self.session_lengths();
        let written = self.capture_as(link, write)?;
        self.captured = Some(Captured {
            digest: written.digest,
            depth,
            lengths,
        });
        Ok(written)
    }

    /// Makes the snapshot that [`capture_link`](Self::capture_link) returned as `written` the
    /// parent of this actor's next link: call it once that snapshot is durable, before the
    /// actor handles another message. Anything but the latest capture is ignored.
    pub fn commit(&mut self, written: &Written) {
        let Some(captured) = self.captured.take_if(|c| c.digest == written.digest) else {
            return;
        };
        let chain = self.lineage.as_ref().map(|l| l.chain).unwrap_or_default();
        self.lineage = Some(Lineage {
            digest: captured.digest,
            depth: captured.depth,
            chain,
            pending: PageSet::default(),
        });
        let slots = self.store.data_mut().models.session_slots_mut();
        for (slot, length) in slots.iter_mut().zip(captured.lengths) {
            if let (Some(slot), Some(length)) = (slot, length) {
                slot.kept = length.min(slot.session.tokens.len());
            }
        }
    }

    /// Each session slot's token count.
    fn session_lengths(&self) -> Vec<Option<usize>> {
        let slots = self.store.data().models.session_slots();
        slots
            .iter()
            .map(|s| s.as_ref().map(|s| s.session.tokens.len()))
            .collect()
    }

    /// Forgets every page marked written: the memory is as the lineage's snapshot has it.
    pub(crate) fn clear_written(&mut self) -> Result<(), ActorError> {
        self.drain_marks().map(drop)
    }

    /// The pages the guest and the host marked written since the last drain, cleared.
    fn drain_marks(&mut self) -> Result<PageSet, ActorError> {
        let mut pages = std::mem::take(&mut self.store.data_mut().written);
        if let Some(map) = &self.module.info.dirty {
            let memory = self
                .instance
                .get_memory(&mut self.store, &map.export)
                .ok_or_else(|| ActorError::Snapshot("the dirty-page map is gone".into()))?;
            let n_pages = self.memory.data_size(&self.store) / PAGE_BYTES;
            let marks = memory.data_mut(&mut self.store);
            for page in crate::dirty::marked_pages(marks, n_pages as u64) {
                pages.insert(page as usize);
            }
            marks.fill(0);
        }
        Ok(pages)
    }

    /// Every page written since the last commit, in increasing order: the guest's marks and
    /// the host's, which are cleared, with those earlier uncommitted captures drained.
    fn drain_written(&mut self) -> Result<PageSet, ActorError> {
        let mut pages = self.drain_marks()?;
        if let Some(lineage) = &mut self.lineage {
            lineage.pending.union(&pages);
            pages = lineage.pending.clone();
        }
        Ok(pages)
    }
}

/// What [`Actor::capture_as`] stores of a link: the link and the pages written since its
/// parent.
pub(crate) type LinkParts = Option<(Link, PageSet)>;

/// How [`Actor::save_link`] asks for a snapshot to be stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChainWrite {
    /// A whole snapshot that starts the chain over, replacing it ([`format::save`]).
    Whole,
    /// A link appended to the chain, whose last complete snapshot ends at byte `end`
    /// ([`format::append`]).
    Append { end: u64 },
}

/// Links a chain holds before the next save starts it over with a whole snapshot.
pub const COMPACT_AFTER_LINKS: u32 = 32;

/// The byte layout of the chain an actor's lineage lives in (see [`format::split_links`]).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct ChainBytes {
    /// Where the last complete snapshot ends.
    end: u64,
    /// Bytes of the whole snapshot the chain starts with, and of its links with their padding.
    whole: u64,
    links: u64,
}

impl ChainBytes {
    /// The layout of `chain` as a chain file holds it.
    pub(crate) fn of(chain: &Chain<'_>) -> ChainBytes {
        let lens: Vec<u64> = chain.views().iter().map(|v| v.len()).collect();
        let end = lens[..lens.len() - 1]
            .iter()
            .map(|&l| format::next_link_at(l))
            .sum::<u64>()
            + lens[lens.len() - 1];
        ChainBytes {
            end,
            whole: lens[0],
            links: end - lens[0],
        }
    }

    /// A chain of one whole snapshot of `bytes`.
    pub(crate) fn whole(bytes: u64) -> ChainBytes {
        ChainBytes {
            end: bytes,
            whole: bytes,
            links: 0,
        }
    }
}

impl Actor {
    /// Saves this actor's state durably, through `store`: a link appended to its chain, or a
    /// whole snapshot that starts the chain over when `restart` is set (a new file, say),
    /// when there is no chain yet, when the chain holds [`COMPACT_AFTER_LINKS`] links, or when
    /// its links together outweigh its whole snapshot (so a chain never holds more than
    /// twice the actor's state, and a restore never reads more than that). `store` gets the
    /// snapshot and how to store it, and returns what it wrote ([`Written::file_len`]: where
    /// the chain now ends); the save is committed when it returns.
    pub fn save_link(
        &mut self,
        restart: bool,
        store: impl FnOnce(
            &format::SnapshotWrite<'_>,
            ChainWrite,
        ) -> Result<Written, format::SnapshotError>,
    ) -> Result<Written, ActorError> {
        let chain = self.lineage.as_ref().map(|l| (l.depth, l.chain));
        let whole = restart
            || chain.is_none_or(|(depth, bytes)| {
                depth + 1 >= COMPACT_AFTER_LINKS || bytes.links > bytes.whole
            });
        let end = chain.map_or(0, |(_, bytes)| bytes.end);
        let written = self.capture_link(whole, |s| match s.manifest.link {
            None => store(s, ChainWrite::Whole),
            Some(_) => store(s, ChainWrite::Append { end }),
        })?;
        self.commit(&written);
        if let Some(lineage) = &mut self.lineage {
            lineage.chain = match (lineage.depth, chain) {
                (0, _) | (_, None) => ChainBytes::whole(written.bytes),
                (_, Some((_, before))) => ChainBytes {
                    end: written.file_len,
                    whole: before.whole,
                    links: before.links + (written.file_len - before.end),
                },
            };
        }
        Ok(written)
    }

    /// Saves this actor's state to the chain file at `path` ([`save_link`](Self::save_link)):
    /// a link appended to it, or a whole snapshot replacing it crash-safely. Either way an
    /// interruption leaves the chain as it was. Set `restart` when `path` does not hold this
    /// actor's chain (the actor was restored from elsewhere).
    pub fn save_to(&mut self, path: &Path, restart: bool) -> Result<Written, ActorError> {
        self.save_link(restart, |s, how| match how {
            ChainWrite::Whole => format::save(path, s),
            ChainWrite::Append { end } => format::append(path, end, s),
        })
    }

    /// Makes the next save a whole snapshot that starts a new chain: for an actor restored
    /// from a snapshot that is not where it will be saved (an upload, say).
    pub fn restart_chain(&mut self) {
        self.lineage = None;
        self.captured = None;
    }

    /// Snapshots in this actor's chain since its last whole one (1: just that one), or 0
    /// before its first durable save.
    pub fn chain_len(&self) -> u32 {
        self.lineage.as_ref().map_or(0, |l| l.depth + 1)
    }
}
