//! Writing then reading gives back exactly what was written; the bytes follow the documented
//! layout; `save` is atomic.

mod common;

use std::path::{Path, PathBuf};

use common::{Fixture, Page, table, u32_at, u64_at};
use safetensors::{Dtype, SafeTensors};
use tern_snapshot::{
    KvLayers, KvWrite, PAGE_BYTES, SnapshotError, SnapshotFile, SnapshotView, SnapshotWrite,
    encode, parse, reseal, save, to_bytes,
};

/// Asserts that `view` holds exactly `fixture`'s state, bit for bit.
fn assert_restores(view: &SnapshotView<'_>, fixture: &Fixture) {
    assert_eq!(view.manifest, fixture.manifest);

    let mut memory = vec![0xa5u8; fixture.memory.len()];
    view.restore_memory(&mut memory).unwrap();
    assert!(memory == fixture.memory, "restored memory differs");
    let non_zero = fixture
        .memory
        .chunks_exact(PAGE_BYTES)
        .filter(|p| p.iter().any(|&b| b != 0))
        .count();
    assert_eq!(view.stored_pages(), non_zero);

    for (i, session) in fixture.manifest.sessions.iter().enumerate() {
        let kv = view.kv(i).unwrap();
        let model = &fixture.manifest.models[session.model as usize];
        assert_eq!(
            kv.shape(),
            [
                model.n_layer as usize,
                session.tokens.len(),
                model.kv_dim() as usize
            ]
        );
        let mut layer = vec![0f32; kv.n_tokens * kv.kv_dim];
        for l in 0..kv.n_layer {
            kv.k_layer(l, &mut layer).unwrap();
            assert_eq!(
                bits(&layer),
                bits(&fixture.k[i][l]),
                "session {i} K layer {l}"
            );
            kv.v_layer(l, &mut layer).unwrap();
            assert_eq!(
                bits(&layer),
                bits(&fixture.v[i][l]),
                "session {i} V layer {l}"
            );
        }
    }
}

fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn round_trip_restores_everything() {
    let fixture = Fixture::standard();
    let bytes = to_bytes(&fixture.write()).unwrap();
    let view = parse(&bytes).unwrap();
    assert_eq!(view.stored_pages(), 3);
    assert_eq!(view.kv(1).unwrap().n_tokens, 0);
    assert_restores(&view, &fixture);
}

#[test]
fn round_trip_of_incompressible_memory() {
    let fixture = Fixture::new(&[Page::Random; 5], &[], 99);
    let bytes = to_bytes(&fixture.write()).unwrap();
    assert!(
        bytes.len() > fixture.memory.len(),
        "random pages are stored raw"
    );
    assert_restores(&parse(&bytes).unwrap(), &fixture);
}

#[test]
fn restore_pages_zeroes_only_dirty_pages_that_are_not_stored() {
    let fixture = Fixture::standard(); // pages 1, 2 and 4 of 0..6 are stored
    let bytes = to_bytes(&fixture.write()).unwrap();
    let view = parse(&bytes).unwrap();
    let mut memory = vec![9u8; fixture.memory.len()];
    let mut asked = Vec::new();
    view.restore_pages(&mut memory, |p| {
        asked.push(p);
        p == 3
    })
    .unwrap();
    assert_eq!(
        asked,
        [0, 3, 5],
        "asked about each page that is not stored, once"
    );
    for (p, (got, want)) in memory
        .chunks_exact(PAGE_BYTES)
        .zip(fixture.memory.chunks_exact(PAGE_BYTES))
        .enumerate()
    {
        match p {
            0 | 5 => assert!(got.iter().all(|&b| b == 9), "page {p} left alone"),
            _ => assert!(got == want, "page {p} restored"),
        }
    }
}

#[test]
fn encoding_is_deterministic() {
    let fixture = Fixture::standard();
    let first = to_bytes(&fixture.write()).unwrap();
    let second = to_bytes(&fixture.write()).unwrap();
    assert!(first == second);
    let mut streamed = Vec::new();
    let written = encode(&fixture.write(), &mut streamed).unwrap();
    assert_eq!(written.bytes, first.len() as u64);
    assert!(streamed == first);
}

#[test]
fn zero_pages_are_not_stored() {
    let fixture = Fixture::new(&[Page::Zero; 64], &[], 1);
    let bytes = to_bytes(&fixture.write()).unwrap();
    let view = parse(&bytes).unwrap();
    assert_eq!(view.stored_pages(), 0);
    assert!(
        bytes.len() < 4096,
        "{} bytes for 4 MiB of zeros",
        bytes.len()
    );
    assert_restores(&view, &fixture);

    let mut pages = [Page::Zero; 64];
    pages[40] = Page::Sparse;
    let fixture = Fixture::new(&pages, &[], 1);
    let bytes = to_bytes(&fixture.write()).unwrap();
    assert_eq!(parse(&bytes).unwrap().stored_pages(), 1);
    assert!(bytes.len() < 4096, "a sparse page is stored compressed");
}

#[test]
fn layout_matches_the_documented_table() {
    let fixture = Fixture::standard();
    let bytes = to_bytes(&fixture.write()).unwrap();
    assert_eq!(&bytes[..8], b"TERNSNAP");
    assert_eq!(u32_at(&bytes, 8), 3);
    assert_eq!(u32_at(&bytes, 12), 0);
    assert_eq!(u64_at(&bytes, 16), bytes.len() as u64);
    assert_eq!(u32_at(&bytes, 28), 0);

    let entries = table(&bytes);
    let kinds: Vec<(u32, u32)> = entries.iter().map(|e| (e.kind, e.index)).collect();
    assert_eq!(kinds, [(1, 0), (2, 0), (3, 0), (3, 1), (3, 2)]);
    let mut end = 32 + 24 * entries.len();
    for e in &entries {
        assert_eq!(e.offset % 64, 0);
        assert!(e.offset >= end && e.offset - end < 64, "{e:?} after {end}");
        assert!(
            bytes[end..e.offset].iter().all(|&b| b == 0),
            "padding is zero"
        );
        end = e.offset + e.len;
    }
    assert_eq!(end + 8, bytes.len(), "the trailer follows the last section");
    for e in entries.iter().filter(|e| e.kind == 3) {
        let header_len = u64_at(&bytes, e.offset) as usize;
        assert_eq!(
            (e.offset + 8 + header_len) % 64,
            0,
            "KV data is 64-byte aligned"
        );
    }
    let mut resealed = bytes.clone();
    reseal(&mut resealed);
    assert!(resealed == bytes, "the trailer is the checksum of the rest");

    let manifest = common::manifest_json(&bytes);
    assert_eq!(manifest["globals"][2]["bits"], "0x7fc01234");
    assert_eq!(manifest["globals"][4]["ty"], "v128");
}

#[test]
fn kv_blob_opens_with_safetensors() {
    let fixture = Fixture::standard();
    let bytes = to_bytes(&fixture.write()).unwrap();
    let view = parse(&bytes).unwrap();
    for (i, session) in fixture.manifest.sessions.iter().enumerate() {
        let blob = view.kv(i).unwrap().bytes();
        let tensors = SafeTensors::deserialize(blob).unwrap();
        let model = &fixture.manifest.models[session.model as usize];
        let shape = [
            model.n_layer as usize,
            session.tokens.len(),
            model.kv_dim() as usize,
        ];
        for (name, layers) in [("k", &fixture.k[i]), ("v", &fixture.v[i])] {
            let tensor = tensors.tensor(name).unwrap();
            assert_eq!(tensor.dtype(), Dtype::F32);
            assert_eq!(tensor.shape(), shape);
            let expected: Vec<u8> = layers
                .iter()
                .flatten()
                .flat_map(|v| v.to_le_bytes())
                .collect();
            assert!(
                tensor.data() == expected.as_slice(),
                "session {i} tensor {name}"
            );
        }
        let (_, metadata) = SafeTensors::read_metadata(blob).unwrap();
        let metadata = metadata.metadata().clone().unwrap();
        assert_eq!(metadata.get("format").map(String::as_str), Some("tern-kv"));
        assert_eq!(metadata.get("version").map(String::as_str), Some("1"));
    }
}

/// A change that makes a [`SnapshotWrite`] inconsistent.
type Mutation<'a> = Box<dyn Fn(&mut SnapshotWrite<'a>) + 'a>;

fn inconsistencies(fixture: &Fixture) -> Vec<(Mutation<'_>, &'static str)> {
    let short_memory = &fixture.memory[PAGE_BYTES..];
    vec![
        (Box::new(move |s| s.memory = short_memory), "memory is"),
        (
            Box::new(|s| drop(s.kv.pop())),
            "2 KV caches given for 3 sessions",
        ),
        (
            Box::new(|s| s.kv[0].n_tokens = 4),
            "session 0 KV cache has shape",
        ),
        (
            Box::new(|s| {
                if let KvLayers::F32(v) = &mut s.kv[2].v {
                    v.truncate(2);
                }
            }),
            "3 K layers but 2 V layers",
        ),
        (
            Box::new(|s| {
                if let KvLayers::F32(k) = &mut s.kv[2].k {
                    k[1] = &k[1][1..];
                }
            }),
            "K layer 1 holds 23 values",
        ),
    ]
}

#[test]
fn encode_refuses_inconsistent_input_and_writes_nothing() {
    let fixture = Fixture::standard();
    let cases = inconsistencies(&fixture);
    for (mutate, expected) in cases {
        let mut s = fixture.write();
        mutate(&mut s);
        let mut out = Vec::new();
        let err = encode(&s, &mut out).unwrap_err();
        assert!(matches!(err, SnapshotError::Corrupt(_)), "{err:?}");
        assert!(
            err.to_string().contains(expected),
            "{err} lacks {expected:?}"
        );
        assert!(out.is_empty());
    }
}

/// A writer that fails after `left` bytes.
struct FailAfter {
    left: usize,
}

impl std::io::Write for FailAfter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            return Err(std::io::Error::other("disk full"));
        }
        let n = buf.len().min(self.left);
        self.left -= n;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn encode_reports_a_failing_writer() {
    let fixture = Fixture::standard();
    let err = encode(&fixture.write(), &mut FailAfter { left: 1000 }).unwrap_err();
    match err {
        SnapshotError::Write { error } => assert_eq!(error.to_string(), "disk full"),
        other => panic!("expected Write, got {other:?}"),
    }
}

/// A fresh, empty directory for one test.
fn test_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("snapshot-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn dir_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn save_writes_and_replaces_files() {
    let dir = test_dir("save");
    let path = dir.join("actor.snap");
    let small = Fixture::standard();
    let written = save(&path, &small.write()).unwrap();
    assert_eq!(written.bytes, std::fs::metadata(&path).unwrap().len());
    let file = SnapshotFile::open(&path).unwrap();
    assert!(file.bytes() == to_bytes(&small.write()).unwrap().as_slice());
    assert_restores(&file.view().unwrap(), &small);

    // Large enough to be memory-mapped.
    let large = Fixture::new(&[Page::Random; 8], &[(5, 0, 9)], 3);
    save(&path, &large.write()).unwrap();
    assert_restores(&SnapshotFile::open(&path).unwrap().view().unwrap(), &large);
    assert_eq!(dir_names(&dir), ["actor.snap"], "no temp file is left");
}

/// Large files are mapped and, once dropped, unmapped on another thread: every mapping of a
/// file opened and dropped many times is gone soon after (none is kept or leaked).
#[cfg(target_os = "linux")]
#[test]
fn dropped_large_files_are_unmapped() {
    let dir = test_dir("unmapped");
    let path = dir.join("large.bin");
    std::fs::write(&path, vec![7u8; 12 << 20]).unwrap();
    let mappings = || {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let name = path.to_string_lossy().into_owned();
        maps.lines().filter(|l| l.ends_with(name.as_str())).count()
    };
    for _ in 0..20 {
        let file = SnapshotFile::open(&path).unwrap();
        assert_eq!(file.bytes().len(), 12 << 20);
        assert_eq!(file.bytes()[(12 << 20) - 1], 7);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while mappings() > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(mappings(), 0, "every dropped file's mapping is unmapped");
}

#[test]
fn failed_save_keeps_the_old_file_and_no_temp_file() {
    let dir = test_dir("failed-save");
    let path = dir.join("actor.snap");
    let fixture = Fixture::standard();
    save(&path, &fixture.write()).unwrap();
    let before = std::fs::read(&path).unwrap();

    let mut bad = fixture.write();
    if let KvLayers::F32(k) = &mut bad.kv[0].k {
        k[0] = &k[0][..k[0].len() - 1];
    }
    let err = save(&path, &bad).unwrap_err();
    assert!(err.to_string().contains("K layer 0 holds"), "{err}");

    assert!(
        std::fs::read(&path).unwrap() == before,
        "old snapshot intact"
    );
    assert_eq!(dir_names(&dir), ["actor.snap"], "no temp file is left");
}

#[test]
fn failed_rename_removes_the_written_temp_file() {
    let dir = test_dir("failed-rename");
    // A non-empty directory where the snapshot should go: the temp file is written in full,
    // then the rename over the directory fails.
    let path = dir.join("actor.snap");
    std::fs::create_dir(&path).unwrap();
    std::fs::write(path.join("keep"), b"x").unwrap();
    let err = save(&path, &Fixture::standard().write()).unwrap_err();
    assert!(
        matches!(&err, SnapshotError::Io { path: p, .. } if *p == path),
        "{err:?}"
    );
    assert_eq!(dir_names(&dir), ["actor.snap"], "the temp file is removed");
    assert_eq!(dir_names(&path), ["keep"], "what was at the path is intact");
}

#[test]
fn save_into_a_missing_directory_names_the_path() {
    let dir = test_dir("missing");
    let path = dir.join("no-such-dir").join("actor.snap");
    let err = save(&path, &Fixture::standard().write()).unwrap_err();
    match &err {
        SnapshotError::Io { path: p, .. } => assert!(p.starts_with(dir.join("no-such-dir"))),
        other => panic!("expected Io, got {other:?}"),
    }
    assert!(err.to_string().contains("no-such-dir"), "{err}");
}

#[test]
fn open_reports_a_missing_file() {
    let path = test_dir("open").join("absent.snap");
    let err = SnapshotFile::open(&path).unwrap_err();
    assert!(matches!(err, SnapshotError::Io { .. }), "{err:?}");
}

#[test]
fn kv_write_slices_are_borrowed_not_copied() {
    // A KvWrite can describe caches whose storage is larger than the used positions.
    let storage = vec![1.5f32; 4 * 16];
    let fixture = Fixture::new(&[Page::Zero], &[(0, 0, 2)], 5);
    let mut s = fixture.write();
    let used = 2 * 8;
    s.kv[0] = KvWrite {
        kv_dim: 8,
        n_tokens: 2,
        k: KvLayers::F32(vec![&storage[..used], &storage[16..16 + used]]),
        v: KvLayers::F32(vec![&storage[32..32 + used], &storage[48..48 + used]]),
    };
    let bytes = to_bytes(&s).unwrap();
    let mut layer = vec![0f32; used];
    parse(&bytes)
        .unwrap()
        .kv(0)
        .unwrap()
        .v_layer(1, &mut layer)
        .unwrap();
    assert!(layer.iter().all(|&x| x == 1.5));
}
