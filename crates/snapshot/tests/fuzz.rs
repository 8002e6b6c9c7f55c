//! Hostile input never panics, and never makes the reader allocate more than a small multiple
//! of the input's size.
//!
//! Three sources of input, each resealed so the checksum passes and the checks behind it run:
//! arbitrary bytes behind a valid header, byte-level mutations of a valid file (overwrite,
//! truncate, extend), and structural mutations (a number in the manifest or in a KV header
//! set to an edge value, then the file rebuilt around it). Whatever parses is then restored:
//! memory and every layer of every KV cache.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use common::{Fixture, assemble, sections};
use proptest::prelude::*;
use tern_snapshot::{
    Chain, Link, PAGE_BYTES, SnapshotError, digest_hex, parse, parse_chain, parse_chain_unverified,
    reseal, split_links, to_bytes,
};

/// Counts this thread's live heap bytes and their peak, so a test can bound what one call
/// allocates.
struct CountingAlloc;

thread_local! {
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

fn grew(bytes: usize) {
    LIVE.with(|live| {
        let now = live.get().saturating_add(bytes);
        live.set(now);
        PEAK.with(|peak| peak.set(peak.get().max(now)));
    });
}

fn shrank(bytes: usize) {
    LIVE.with(|live| live.set(live.get().saturating_sub(bytes)));
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged; the
// bookkeeping touches only const-initialized thread-locals without destructors, which neither
// allocate nor unwind.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        grew(layout.size());
        // SAFETY: forwarded with the caller's layout, which meets `alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        shrank(layout.size());
        // SAFETY: `ptr` was allocated by `System` with `layout`, per the caller's contract.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        grew(new_size);
        shrank(layout.size());
        // SAFETY: forwarded unchanged; the caller meets `realloc`'s contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// Peak bytes allocated on this thread while `f` runs, above what was live before.
fn peak_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let before = LIVE.with(Cell::get);
    PEAK.with(|peak| peak.set(before));
    let result = f();
    (result, PEAK.with(Cell::get) - before)
}

/// Restores larger than this are skipped: the destination is the test's allocation, not the
/// reader's, and a valid file may describe gigabytes of zero memory in a few bytes.
const MAX_RESTORE_BYTES: u64 = 16 << 20;

/// Parses `bytes` and, if that works, restores everything; panics (failing the property) if
/// the reader allocates more than `8 × len + 64 KiB` at any point.
fn exercise(bytes: &[u8]) {
    let limit = 8 * bytes.len() + (64 << 10);
    let (parsed, peak) = peak_allocation(|| parse(bytes));
    assert!(
        peak <= limit,
        "parse allocated {peak} bytes for {} input bytes",
        bytes.len()
    );
    let Ok(view) = parsed else { return };

    if view.manifest.memory_bytes <= MAX_RESTORE_BYTES {
        let mut memory = vec![0xa5u8; view.manifest.memory_bytes as usize];
        let (restored, peak) = peak_allocation(|| view.restore_memory(&mut memory));
        assert!(peak <= limit, "restore allocated {peak} bytes");
        if restored.is_ok() {
            let stored = memory
                .chunks_exact(PAGE_BYTES)
                .filter(|p| p.iter().any(|&b| b != 0));
            assert!(
                stored.count() <= view.stored_pages(),
                "unstored pages are zeroed"
            );
        }
    }
    for i in 0..view.manifest.sessions.len() {
        let kv = view.kv(i).expect("every session has a KV view");
        let mut layer = Vec::new();
        if kv.n_layer > 0 {
            // parse checked the blob holds n_layer × n_tokens × kv_dim floats twice, so this
            // is bounded by the input.
            layer = vec![0f32; kv.n_tokens * kv.kv_dim];
        }
        // A model may have billions of layers of zero tokens; visit the first and last few.
        let layers = (0..kv.n_layer.min(64)).chain(kv.n_layer.saturating_sub(2)..kv.n_layer);
        for l in layers {
            kv.k_layer(l, &mut layer).expect("a parsed layer copies");
            kv.v_layer(l, &mut layer).expect("a parsed layer copies");
        }
        assert!(matches!(
            kv.k_layer(kv.n_layer, &mut layer),
            Err(SnapshotError::OutOfRange { .. })
        ));
    }
    assert!(view.kv(view.manifest.sessions.len()).is_err());
}

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn valid_small() -> Vec<u8> {
    to_bytes(&Fixture::small().write()).unwrap()
}

/// A byte-level change to a file.
#[derive(Clone, Debug)]
enum Edit {
    Overwrite { at: usize, bytes: Vec<u8> },
    Truncate { len: usize },
    Extend { bytes: Vec<u8> },
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        6 => (any::<usize>(), prop::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(at, bytes)| Edit::Overwrite { at, bytes }),
        1 => any::<usize>().prop_map(|len| Edit::Truncate { len }),
        1 => prop::collection::vec(any::<u8>(), 1..200).prop_map(|bytes| Edit::Extend { bytes }),
    ]
}

fn apply(file: &mut Vec<u8>, edit: &Edit) {
    match edit {
        Edit::Overwrite { at, bytes } => {
            let at = at % file.len().max(1);
            for (i, b) in bytes.iter().enumerate() {
                if let Some(slot) = file.get_mut(at + i) {
                    *slot = *b;
                }
            }
        }
        Edit::Truncate { len } => file.truncate(len % (file.len() + 1)),
        Edit::Extend { bytes } => file.extend_from_slice(bytes),
    }
}

/// Values that sit on or next to the format's limits.
fn edge_value() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(1),
        Just(2),
        Just(7),
        Just(63),
        Just(64),
        Just(65),
        Just(PAGE_BYTES as u64),
        Just(3 * PAGE_BYTES as u64),
        Just(1 << 24),
        Just((1 << 24) + 1),
        Just(u64::from(u32::MAX)),
        Just(1 << 32),
        Just(u64::MAX),
        any::<u64>(),
        0u64..1000,
    ]
}

/// Sets the `pick`-th number (in document order) of `value` to `to`; returns false if there
/// are fewer numbers than `pick + 1`.
fn set_number(value: &mut serde_json::Value, pick: &mut usize, to: u64) -> bool {
    match value {
        serde_json::Value::Number(n) => {
            if *pick == 0 {
                *n = to.into();
                return true;
            }
            *pick -= 1;
            false
        }
        serde_json::Value::Array(items) => items.iter_mut().any(|v| set_number(v, pick, to)),
        serde_json::Value::Object(map) => map.values_mut().any(|v| set_number(v, pick, to)),
        _ => false,
    }
}

/// `file` with one number in the manifest (`target` 0) or in KV blob `target - 1`'s header
/// set to `to`, rebuilt around the changed section.
fn with_number(file: &[u8], target: usize, pick: usize, to: u64) -> Vec<u8> {
    let mut parts = sections(file);
    // Sections are manifest, memory, KV 0, KV 1, ...
    let index = if target == 0 {
        0
    } else {
        2 + (target - 1) % (parts.len() - 2)
    };
    let section = &mut parts[index].2;
    let (prefix, json, data) = if target == 0 {
        (0, &section[..], &[][..])
    } else {
        let header_len = u64::from_le_bytes(section[..8].try_into().unwrap()) as usize;
        (8, &section[8..8 + header_len], &section[8 + header_len..])
    };
    let mut value: serde_json::Value = serde_json::from_slice(json).unwrap();
    let mut left = pick;
    set_number(&mut value, &mut left, to);
    let json = value.to_string().into_bytes();
    let mut rebuilt = Vec::new();
    if prefix == 8 {
        rebuilt.extend_from_slice(&(json.len() as u64).to_le_bytes());
    }
    rebuilt.extend_from_slice(&json);
    rebuilt.extend_from_slice(data);
    *section = rebuilt;
    assemble(&parts)
}

/// A whole snapshot and a link after it: session 0 one token longer, session 1 unchanged,
/// memory page 1 changed.
fn valid_chain() -> (Vec<u8>, Vec<u8>) {
    let base = Fixture::small();
    let whole = to_bytes(&base.write()).unwrap();
    let mut next = Fixture {
        manifest: base.manifest.clone(),
        memory: base.memory.clone(),
        k: base.k.clone(),
        v: base.v.clone(),
    };
    let kv_dim = next.manifest.models[next.manifest.sessions[0].model as usize].kv_dim() as usize;
    let first = &mut next.manifest.sessions[0];
    first.kv_from = first.tokens.len() as u32;
    first.tokens.push(5);
    for layer in next.k[0].iter_mut().chain(next.v[0].iter_mut()) {
        layer.extend(std::iter::repeat_n(1.5f32, kv_dim));
    }
    let second = &mut next.manifest.sessions[1];
    second.kv_from = second.tokens.len() as u32;
    next.memory[PAGE_BYTES + 9] ^= 0xff;
    next.manifest.link = Some(Link {
        parent: digest_hex(parse(&whole).unwrap().digest()),
        depth: 1,
    });
    let link = to_bytes(&next.write_link(Some(&[1]))).unwrap();
    (whole, link)
}

/// Checks `links` as a chain, verified and unverified: both refuse or accept alike (the
/// unverified read then verifies to the same digests), and whatever the unverified read
/// accepts, which a restore reads before its checksums are compared, restores everything it
/// holds; the pieces of each session's cache must cover its tokens exactly.
fn exercise_chain(links: &[&[u8]]) {
    let checked = parse_chain(links);
    let unverified = parse_chain_unverified(links);
    let verified = unverified.as_ref().ok().map(|c| c.verify());
    match (&checked, &verified) {
        (Ok(chain), Some(Ok(v))) => assert_eq!(v.head(), chain.head().digest()),
        (Err(_), None | Some(Err(_))) => {}
        (Ok(_), _) => panic!("a chain parse_chain accepts is refused unverified or by verify"),
        (Err(e), Some(Ok(_))) => panic!("parse_chain refuses a chain that verifies: {e}"),
    }
    if let Ok(chain) = &unverified {
        restore_all(chain);
    }
}

/// Restores everything `chain` holds, as a restore reads it.
fn restore_all(chain: &Chain<'_>) {
    let m = chain.manifest();
    if m.memory_bytes <= MAX_RESTORE_BYTES {
        let mut memory = vec![0xa5u8; m.memory_bytes as usize];
        let _ = chain.restore_memory(&mut memory);
    }
    for (i, session) in m.sessions.iter().enumerate() {
        let pieces = chain.kv(i).expect("every session has its pieces");
        let mut at = 0;
        for piece in pieces {
            assert_eq!(piece.from, at, "pieces follow each other");
            at += piece.count;
            let n_layer = m.models[session.model as usize].n_layer as usize;
            for l in (0..n_layer.min(64)).chain(n_layer.saturating_sub(2)..n_layer) {
                piece.k_layer_bytes(l).expect("a parsed piece reads");
                piece.v_layer_bytes(l).expect("a parsed piece reads");
            }
        }
        assert_eq!(at, session.tokens.len(), "pieces cover the tokens");
    }
}

proptest! {
    #![proptest_config(config(3000))]

    #[test]
    fn mutated_links_never_panic(
        edits in prop::collection::vec(edit(), 1..4),
        fix_len in any::<bool>(),
    ) {
        let (whole, mut link) = valid_chain();
        for e in &edits {
            apply(&mut link, e);
        }
        if fix_len && link.len() >= 24 {
            let len = link.len() as u64;
            link[16..24].copy_from_slice(&len.to_le_bytes());
        }
        reseal(&mut link);
        exercise(&link);
        exercise_chain(&[&whole, &link]);
    }

    #[test]
    fn structurally_mutated_links_never_panic(
        target in 0usize..3,
        pick in 0usize..64,
        to in edge_value(),
    ) {
        let (whole, link) = valid_chain();
        exercise_chain(&[&whole, &with_number(&link, target, pick, to)]);
    }

    #[test]
    fn mutated_chain_files_never_panic(edits in prop::collection::vec(edit(), 1..4)) {
        let (whole, link) = valid_chain();
        let mut file = whole.clone();
        file.resize(file.len().next_multiple_of(64), 0);
        file.extend_from_slice(&link);
        for e in &edits {
            apply(&mut file, e);
        }
        if let Ok(links) = split_links(&file) {
            assert!(links.end + links.torn_bytes == file.len() as u64);
            exercise_chain(&links.links);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        exercise(&bytes);
    }

    #[test]
    fn arbitrary_tables_behind_a_valid_header_never_panic(
        count in 0u32..12,
        mut rest in prop::collection::vec(any::<u8>(), 8..1024),
    ) {
        let mut bytes = b"TERNSNAP".to_vec();
        bytes.extend_from_slice(&1u32.to_le_bytes());
        bytes.extend_from_slice(&0u32.to_le_bytes());
        let len = (24 + 8 + rest.len()) as u64;
        bytes.extend_from_slice(&len.to_le_bytes());
        bytes.extend_from_slice(&count.to_le_bytes());
        bytes.extend_from_slice(&0u32.to_le_bytes());
        // Small offsets and lengths, so entries point inside the file more often than not.
        for entry in rest.chunks_exact_mut(24) {
            let (kind, index, offset, len) = (entry[0] % 4, entry[4] % 3, entry[8], entry[16]);
            entry[..4].copy_from_slice(&u32::from(kind).to_le_bytes());
            entry[4..8].copy_from_slice(&u32::from(index).to_le_bytes());
            entry[8..16].copy_from_slice(&(u64::from(offset) * 64).to_le_bytes());
            entry[16..24].copy_from_slice(&u64::from(len).to_le_bytes());
        }
        bytes.append(&mut rest);
        reseal(&mut bytes);
        exercise(&bytes);
    }

    #[test]
    fn mutated_snapshots_never_panic(
        edits in prop::collection::vec(edit(), 1..4),
        fix_len in any::<bool>(),
    ) {
        let mut bytes = valid_small();
        for e in &edits {
            apply(&mut bytes, e);
        }
        if fix_len && bytes.len() >= 24 {
            let len = bytes.len() as u64;
            bytes[16..24].copy_from_slice(&len.to_le_bytes());
        }
        reseal(&mut bytes);
        exercise(&bytes);
    }

    #[test]
    fn structurally_mutated_snapshots_never_panic(
        target in 0usize..3,
        pick in 0usize..64,
        to in edge_value(),
    ) {
        exercise(&with_number(&valid_small(), target, pick, to));
    }
}

#[test]
fn the_fuzzed_chain_is_valid_to_begin_with() {
    let (whole, link) = valid_chain();
    let chain = parse_chain(&[&whole, &link]).unwrap();
    assert_eq!(chain.len(), 2);
    assert_eq!(
        chain.kv(0).unwrap().len(),
        2,
        "session 0 comes from both snapshots"
    );
    exercise_chain(&[&whole, &link]);
}

#[test]
fn the_fuzzed_file_is_valid_to_begin_with() {
    let bytes = valid_small();
    let (parsed, _) = peak_allocation(|| parse(&bytes));
    let view = parsed.unwrap();
    assert_eq!(view.manifest.sessions.len(), 2);
    assert_eq!(view.stored_pages(), 2);
    exercise(&bytes);
    // Rebuilding with an unchanged number gives a file that still parses.
    let same = with_number(&bytes, 0, 0, u64::from(view.manifest.abi_version));
    assert!(parse(&same).is_ok());
}

#[test]
fn the_allocation_bound_can_fail() {
    let (v, peak) = peak_allocation(|| vec![0u8; 1 << 20]);
    assert!(peak >= 1 << 20, "counted {peak}");
    drop(v);
}
