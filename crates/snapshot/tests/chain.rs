//! Incremental snapshots: links restore to exactly the state they were taken of, chain files
//! survive an append cut short, and chains that do not hold together are refused.

mod common;

use common::{Fixture, Page, Rng};
use tern_snapshot::{
    Chain, ChunkHashes, Link, PAGE_BYTES, SnapshotError, Written, append, digest_hex, parse,
    parse_chain, parse_chain_unverified, save, split_links, to_bytes,
};

/// The state after a turn: memory page 1 partly rewritten, page 4 zeroed, one page more at
/// the end; session 0 three tokens longer (or, when long, rewound to two and grown by three); session 2 (slot 7) rewound to one token and grown to four.
/// Returns the new state and the pages that changed.
fn turn(before: &Fixture, seed: u64) -> (Fixture, Vec<u32>) {
    let mut rng = Rng(seed | 1);
    let mut next = Fixture {
        manifest: before.manifest.clone(),
        memory: before.memory.clone(),
        k: before.k.clone(),
        v: before.v.clone(),
    };
    rng.fill(&mut next.memory[PAGE_BYTES + 100..PAGE_BYTES + 200]);
    next.memory[4 * PAGE_BYTES..5 * PAGE_BYTES].fill(0);
    let grown = next.memory.len() / PAGE_BYTES;
    next.memory.resize(next.memory.len() + PAGE_BYTES, 0);
    next.memory[grown * PAGE_BYTES + 3] = seed as u8 | 1;
    next.manifest.memory_bytes = next.memory.len() as u64;
    let mut grow = |i: usize, keep: usize, add: usize, next: &mut Fixture| {
        let session = &mut next.manifest.sessions[i];
        let kv_dim = next.manifest.models[session.model as usize].kv_dim() as usize;
        session.tokens.truncate(keep);
        for _ in 0..add {
            session.tokens.push((rng.next() % 1000) as u32);
        }
        for layers in [&mut next.k[i], &mut next.v[i]] {
            for layer in layers.iter_mut() {
                layer.truncate(keep * kv_dim);
                layer.extend((0..add * kv_dim).map(|_| f32::from_bits(rng.next() as u32)));
            }
        }
        session.kv_from = keep as u32;
    };
    let (n0, n2) = (
        next.manifest.sessions[0].tokens.len(),
        next.manifest.sessions[2].tokens.len(),
    );
    grow(0, if n0 > 40 { 2 } else { n0 }, 3, &mut next);
    let n1 = next.manifest.sessions[1].tokens.len();
    grow(1, n1, 0, &mut next);
    grow(2, n2.min(1), 3, &mut next);
    (next, vec![1, 4, grown as u32])
}

/// `state` as the link after the snapshot whose digest is `parent`, at `depth`.
fn link_bytes(state: &mut Fixture, parent: u128, depth: u32, changed: &[u32]) -> Vec<u8> {
    state.manifest.link = Some(Link {
        parent: digest_hex(parent),
        depth,
    });
    to_bytes(&state.write_link(Some(changed))).unwrap()
}

/// A whole snapshot and `n` links after it: their bytes and the state after each.
fn chain_of(n: usize) -> (Vec<Vec<u8>>, Vec<Fixture>) {
    let base = Fixture::standard();
    let mut files = vec![to_bytes(&base.write()).unwrap()];
    let mut states = vec![base];
    for depth in 1..=n {
        let (mut next, changed) = turn(states.last().unwrap(), depth as u64);
        let parent = parse(files.last().unwrap()).unwrap().digest();
        files.push(link_bytes(&mut next, parent, depth as u32, &changed));
        states.push(next);
    }
    (files, states)
}

/// Restores `chain` and checks memory, manifest and every KV value against `want`.
fn assert_restores(chain: &Chain<'_>, want: &Fixture) {
    let mut memory = vec![0xa5u8; want.memory.len()];
    chain.restore_memory(&mut memory).unwrap();
    assert!(memory == want.memory, "restored memory differs");
    let m = chain.manifest();
    assert_eq!(m.sessions.len(), want.manifest.sessions.len());
    for (i, session) in want.manifest.sessions.iter().enumerate() {
        assert_eq!(m.sessions[i].tokens, session.tokens, "session {i} tokens");
        let kv_dim = want.manifest.models[session.model as usize].kv_dim() as usize;
        let pieces = chain.kv(i).unwrap();
        let covered: usize = pieces.iter().map(|p| p.count).sum();
        assert_eq!(covered, session.tokens.len(), "session {i} positions");
        for layer in 0..want.k[i].len() {
            let mut k = Vec::new();
            let mut v = Vec::new();
            let mut at = 0;
            for piece in pieces {
                assert_eq!(piece.from, at, "session {i} pieces are in order");
                at += piece.count;
                k.extend_from_slice(piece.k_layer_bytes(layer).unwrap());
                v.extend_from_slice(piece.v_layer_bytes(layer).unwrap());
            }
            let bits = |floats: &[f32]| -> Vec<u8> {
                floats.iter().flat_map(|f| f.to_le_bytes()).collect()
            };
            assert_eq!(k, bits(&want.k[i][layer]), "session {i} K layer {layer}");
            assert_eq!(v, bits(&want.v[i][layer]), "session {i} V layer {layer}");
            assert_eq!(k.len(), session.tokens.len() * kv_dim * 4);
        }
    }
}

#[test]
fn every_prefix_of_a_chain_restores_its_own_state() {
    let (files, states) = chain_of(4);
    for n in 1..=files.len() {
        let links: Vec<&[u8]> = files[..n].iter().map(Vec::as_slice).collect();
        let chain = parse_chain(&links).unwrap();
        assert_eq!(chain.len(), n);
        assert_restores(&chain, &states[n - 1]);
    }
    // A link stores what changed, far less than the whole.
    assert!(
        files[2].len() * 2 < files[0].len(),
        "{} vs {}",
        files[2].len(),
        files[0].len()
    );
}

/// A chain read unverified restores the same state, and its verification (which a restore
/// runs beside itself) gives the digests `parse_chain` finds; a damaged byte in the contents,
/// which only the checksum notices, fails the verification and nothing else.
#[test]
fn an_unverified_chain_restores_alike_and_its_verification_finds_damage() {
    let (files, states) = chain_of(2);
    let links: Vec<&[u8]> = files.iter().map(Vec::as_slice).collect();
    let checked = parse_chain(&links).unwrap();
    let chain = parse_chain_unverified(&links).unwrap();
    assert!(checked.is_verified() && !chain.is_verified());
    assert_restores(&chain, &states[2]);
    let verified = chain.verify().unwrap();
    assert_eq!(verified.head(), checked.head().digest());

    // The whole snapshot's last KV byte, then a link's: contents that parse either way.
    for (at, file) in [(0, &files[0]), (1, &files[1])] {
        let mut damaged = files.clone();
        let kv = parse(file).unwrap().kv(0).unwrap();
        let k = kv.k_layer_bytes(0).unwrap();
        let offset = k.as_ptr() as usize - file.as_ptr() as usize + k.len() - 1;
        damaged[at][offset] ^= 0x40;
        let links: Vec<&[u8]> = damaged.iter().map(Vec::as_slice).collect();
        let chain = parse_chain_unverified(&links).unwrap();
        let err = chain.verify().unwrap_err().to_string();
        assert!(err.contains("checksum"), "{err}");
        assert_eq!(err, parse_chain(&links).unwrap_err().to_string());
    }
}

/// A whole snapshot of 200 random pages (about 12.5 MiB, four checksum chunks) and a link
/// after it.
fn large_chain() -> Vec<Vec<u8>> {
    let base = Fixture::new(&[Page::Random; 200], &[(0, 0, 5), (3, 1, 0), (7, 1, 3)], 9);
    let (mut next, changed) = turn(&base, 5);
    let first = to_bytes(&base.write()).unwrap();
    let parent = parse(&first).unwrap().digest();
    let link = link_bytes(&mut next, parent, 1, &changed);
    vec![first, link]
}

/// Reads chunks `which` of `hashes` whole, checking that every block lies in its chunk, and
/// returns the bytes read.
fn read_chunks(hashes: &ChunkHashes<'_>, which: &[usize]) -> usize {
    let mut read = 0;
    for &i in which {
        let r = hashes.ranges()[i].clone();
        hashes.read(i, &mut |block| {
            let at = block.as_ptr() as usize;
            assert!(r.start <= at && at + block.len() <= r.end);
            read += block.len();
        });
    }
    read
}

/// Hashes filled in by readers, by other threads, or by no one verify exactly as the chain
/// itself does, and a damaged byte fails the check whoever hashed its chunk.
#[test]
fn a_chain_verifies_alike_whoever_hashes_its_chunks() {
    let files = large_chain();
    let links: Vec<&[u8]> = files.iter().map(Vec::as_slice).collect();
    let chain = parse_chain_unverified(&links).unwrap();
    let expected = parse_chain(&links).unwrap().verify().unwrap().head();

    let hashes = chain.chunk_hashes();
    let ranges = hashes.ranges().to_vec();
    assert_eq!(
        ranges.len(),
        5,
        "four chunks of the whole snapshot, one of the link"
    );
    assert!(ranges.windows(2).all(|w| w[0].end <= w[1].start));
    assert_eq!(chain.verify_hashed(&hashes).unwrap().head(), expected);

    let hashes = chain.chunk_hashes();
    let read = read_chunks(&hashes, &[4, 0, 2]);
    assert_eq!(
        read,
        [0, 2, 4].iter().map(|&i| ranges[i].len()).sum::<usize>()
    );
    let taken = [&ranges[0], &ranges[2], &ranges[4]];
    hashes.hash_rest(|r| !taken.contains(&r));
    assert_eq!(chain.verify_hashed(&hashes).unwrap().head(), expected);

    let all: Vec<usize> = (0..ranges.len()).collect();
    let damaged_at = |i: usize| {
        let (file, r) = (files[0].as_ptr() as usize, &ranges[i]);
        (r.start + r.len() / 2)
            .checked_sub(file)
            .filter(|&at| at < files[0].len())
    };
    for chunk in [1, 3] {
        let mut damaged = files.clone();
        damaged[0][damaged_at(chunk).unwrap()] ^= 1;
        let links: Vec<&[u8]> = damaged.iter().map(Vec::as_slice).collect();
        let chain = parse_chain_unverified(&links).unwrap();
        for by in ["reader", "threads", "check"] {
            let hashes = chain.chunk_hashes();
            match by {
                "reader" => _ = read_chunks(&hashes, &all),
                "threads" => hashes.hash_rest(|_| true),
                _ => {}
            }
            let err = chain.verify_hashed(&hashes).unwrap_err().to_string();
            assert!(
                err.contains("checksum"),
                "chunk {chunk} hashed by {by}: {err}"
            );
        }
    }
}

#[test]
fn a_chain_file_appends_links_and_survives_an_append_cut_short() {
    let path = test_dir("append").join("actor.tern");
    let base = Fixture::standard();
    let mut last: Written = save(&path, &base.write()).unwrap();
    let mut states = vec![base];
    for depth in 1..=3u32 {
        let (mut next, changed) = turn(states.last().unwrap(), u64::from(depth));
        next.manifest.link = Some(Link {
            parent: digest_hex(last.digest),
            depth,
        });
        last = append(&path, last.file_len, &next.write_link(Some(&changed))).unwrap();
        states.push(next);
    }
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(bytes.len() as u64, last.file_len);
    let links = split_links(&bytes).unwrap();
    assert_eq!((links.links.len(), links.torn_bytes), (4, 0));
    assert_restores(&parse_chain(&links.links).unwrap(), &states[3]);

    // Cut the last link anywhere: the chain restores to the link before it.
    let offset = |link: &[u8]| link.as_ptr() as usize - bytes.as_ptr() as usize;
    let start = offset(links.links[2]) + links.links[2].len();
    let mut rng = Rng(99);
    for _ in 0..40 {
        let cut = start + (rng.next() as usize) % (bytes.len() - start);
        let torn = split_links(&bytes[..cut]).unwrap();
        assert_eq!(torn.links.len(), 3, "cut at {cut}");
        assert_eq!(torn.torn_bytes, (cut as u64) - torn.end);
        assert_restores(&parse_chain(&torn.links).unwrap(), &states[2]);
    }

    // Appending after a torn tail cuts it off first.
    std::fs::write(&path, &bytes[..bytes.len() - 5]).unwrap();
    let file = std::fs::read(&path).unwrap();
    let torn = split_links(&file).unwrap();
    assert!(torn.torn_bytes > 0 && torn.end as usize == start);
    let parent = parse(torn.links[2]).unwrap().digest();
    let (mut again, changed) = turn(&states[2], 3);
    again.manifest.link = Some(Link {
        parent: digest_hex(parent),
        depth: 3,
    });
    append(&path, torn.end, &again.write_link(Some(&changed))).unwrap();
    let file = std::fs::read(&path).unwrap();
    let links = split_links(&file).unwrap();
    assert_eq!((links.links.len(), links.torn_bytes), (4, 0));
    assert_restores(&parse_chain(&links.links).unwrap(), &again);

    // A whole snapshot saved over the file starts a new chain.
    let mut whole = Fixture::standard();
    whole.memory[0] = 9;
    save(&path, &whole.write()).unwrap();
    let file = std::fs::read(&path).unwrap();
    let links = split_links(&file).unwrap();
    assert_eq!(links.links.len(), 1);
    assert_restores(&parse_chain(&links.links).unwrap(), &whole);
}

/// An empty directory for one test's files.
fn test_dir(name: &str) -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("chain-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn refuse(links: &[&[u8]]) -> String {
    match parse_chain(links) {
        Ok(chain) => panic!("a bad chain parsed: {chain:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn chains_that_do_not_hold_together_are_refused() {
    let (files, states) = chain_of(3);
    let f: Vec<&[u8]> = files.iter().map(Vec::as_slice).collect();

    // A missing parent: the chain starts with a link, or skips one.
    assert!(refuse(&f[1..]).contains("parent is missing"));
    let skipped = refuse(&[f[0], f[2]]);
    assert!(skipped.contains("continues snapshot"), "{skipped}");
    // A cycle or a reordering: a link before its parent.
    let swapped = refuse(&[f[0], f[2], f[1]]);
    assert!(swapped.contains("continues snapshot"), "{swapped}");
    // A whole snapshot in the middle.
    assert!(refuse(&[f[0], f[0]]).contains("is whole, not a link"));

    // A parent of another actor: same shape, other contents.
    let mut other = Fixture::standard();
    other.memory[PAGE_BYTES] ^= 1;
    let other = to_bytes(&other.write()).unwrap();
    let foreign = refuse(&[&other, f[1]]);
    assert!(foreign.contains("continues snapshot"), "{foreign}");

    // A link at the wrong depth.
    let (mut next, changed) = turn(&states[0], 1);
    let parent = parse(f[0]).unwrap().digest();
    let deep = link_bytes(&mut next, parent, 2, &changed);
    assert!(refuse(&[f[0], &deep]).contains("says it is at depth 2"));

    // A session that continues one its parent does not have, or has with other tokens.
    let (mut next, changed) = turn(&states[0], 1);
    next.manifest.sessions[0].slot = 5;
    let moved = link_bytes(&mut next, parent, 1, &changed);
    assert!(refuse(&[f[0], &moved]).contains("no session in that slot"));
    let (mut next, changed) = turn(&states[0], 1);
    next.manifest.sessions[0].tokens[0] += 1;
    let edited = link_bytes(&mut next, parent, 1, &changed);
    assert!(refuse(&[f[0], &edited]).contains("tokens differ"));

    // Memory that shrinks.
    let (mut next, _) = turn(&states[0], 1);
    next.memory.truncate(2 * PAGE_BYTES);
    next.manifest.memory_bytes = next.memory.len() as u64;
    let small = link_bytes(&mut next, parent, 1, &[1]);
    assert!(refuse(&[f[0], &small]).contains("fewer than its parent's"));
}

#[test]
fn a_chain_too_long_is_refused() {
    let (files, _) = chain_of(63);
    let f: Vec<&[u8]> = files.iter().map(Vec::as_slice).collect();
    parse_chain(&f).unwrap();
    let mut longer = f.clone();
    longer.push(f[1]);
    let err = parse_chain(&longer).unwrap_err();
    assert!(
        matches!(
            err,
            SnapshotError::TooLarge {
                what: "chain links",
                ..
            }
        ),
        "{err:?}"
    );
    // A link cannot say it is deeper than a chain may be.
    let mut state = Fixture::new(&[Page::Text], &[], 3);
    state.manifest.link = Some(Link {
        parent: digest_hex(1),
        depth: 64,
    });
    let err = to_bytes(&state.write_link(Some(&[]))).unwrap_err();
    assert!(err.to_string().contains("link depth 64"), "{err}");
}

#[test]
fn links_and_whole_snapshots_are_written_only_as_what_they_are() {
    let base = Fixture::standard();
    let err = to_bytes(&base.write_link(Some(&[1]))).unwrap_err();
    assert!(err.to_string().contains("whole snapshot"), "{err}");
    let (mut next, _) = turn(&base, 1);
    next.manifest.link = Some(Link {
        parent: digest_hex(7),
        depth: 1,
    });
    let err = to_bytes(&next.write_link(None)).unwrap_err();
    assert!(err.to_string().contains("pages that changed"), "{err}");
    let err = to_bytes(&next.write_link(Some(&[4, 1]))).unwrap_err();
    assert!(err.to_string().contains("must increase"), "{err}");
    next.manifest.link = None;
    let err = to_bytes(&next.write_link(None)).unwrap_err();
    assert!(err.to_string().contains("stores them from 0"), "{err}");
    let path = test_dir("append-whole").join("c.tern");
    save(&path, &base.write()).unwrap();
    let err = append(&path, 0, &base.write()).unwrap_err();
    assert!(err.to_string().contains("only a link"), "{err}");
}
