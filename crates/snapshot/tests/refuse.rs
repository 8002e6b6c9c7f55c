//! Damaged, foreign or inconsistent files are refused with a specific error, never a panic.

mod common;

use common::{Fixture, assemble, manifest_json, sections, table, with_manifest};
use tern_snapshot::{PAGE_BYTES, SnapshotError, parse, reseal, to_bytes};

fn standard() -> Vec<u8> {
    to_bytes(&Fixture::standard().write()).unwrap()
}

/// Parses `bytes`, expecting a refusal.
fn refuse(bytes: &[u8]) -> SnapshotError {
    match parse(bytes) {
        Ok(view) => panic!("parsed a bad file: {view:?}"),
        Err(e) => e,
    }
}

/// Expects a [`SnapshotError::Corrupt`] whose message contains `expected`.
fn assert_corrupt(bytes: &[u8], expected: &str) {
    match refuse(bytes) {
        SnapshotError::Corrupt(message) => {
            assert!(message.contains(expected), "{message:?} lacks {expected:?}")
        }
        other => panic!("expected Corrupt({expected:?}), got {other:?}"),
    }
}

fn set_u32(bytes: &mut [u8], at: usize, value: u32) {
    bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
}

fn set_u64(bytes: &mut [u8], at: usize, value: u64) {
    bytes[at..at + 8].copy_from_slice(&value.to_le_bytes());
}

#[test]
fn bad_magic_is_not_a_snapshot() {
    let mut bytes = standard();
    bytes[0] = b'X';
    assert!(matches!(refuse(&bytes), SnapshotError::NotASnapshot));
    assert!(matches!(refuse(b"PK\x03\x04"), SnapshotError::NotASnapshot));
    let err = refuse(b"{\"safetensors\": true}");
    assert!(err.to_string().contains("not a Tern snapshot"), "{err}");
}

#[test]
fn versions_0_and_4_are_refused_naming_the_versions_read() {
    for version in [0, 4, u32::MAX] {
        let mut bytes = standard();
        set_u32(&mut bytes, 8, version);
        reseal(&mut bytes);
        let err = refuse(&bytes);
        assert!(
            matches!(err, SnapshotError::Version { found, supported: 3 } if found == version),
            "{err:?}"
        );
        let message = err.to_string();
        assert!(
            message.contains(&format!("version {version} ")) && message.contains("versions 1 to 3"),
            "{message}"
        );
    }
}

#[test]
fn unknown_flags_are_refused() {
    let mut bytes = standard();
    set_u32(&mut bytes, 12, 4);
    reseal(&mut bytes);
    assert!(matches!(refuse(&bytes), SnapshotError::Flags { flags: 4 }));
}

#[test]
fn truncation_is_reported_at_every_point() {
    let bytes = standard();
    let len = bytes.len() as u64;
    for cut in [
        0,
        4,
        8,
        12,
        20,
        24,
        31,
        40,
        100,
        bytes.len() / 2,
        bytes.len() - 8,
        bytes.len() - 1,
    ] {
        let expected = if cut < 24 { 40 } else { len };
        match refuse(&bytes[..cut]) {
            SnapshotError::Truncated {
                expected: e,
                actual,
            } => assert_eq!((e, actual), (expected, cut as u64), "cut at {cut}"),
            other => panic!("cut at {cut}: expected Truncated, got {other:?}"),
        }
    }
}

#[test]
fn trailing_data_is_refused() {
    let mut bytes = standard();
    bytes.extend_from_slice(&[0; 3]);
    let err = refuse(&bytes);
    assert!(
        matches!(err, SnapshotError::TrailingData { actual, .. } if actual == bytes.len() as u64)
    );
}

#[test]
fn a_file_claiming_to_be_tiny_is_refused() {
    let mut bytes = standard();
    bytes.truncate(32);
    set_u64(&mut bytes, 16, 32);
    assert!(matches!(
        refuse(&bytes),
        SnapshotError::Truncated {
            expected: 40,
            actual: 32
        }
    ));
}

#[test]
fn one_flipped_bit_anywhere_is_caught() {
    let bytes = to_bytes(&Fixture::small().write()).unwrap();
    for at in 0..bytes.len() {
        let mut damaged = bytes.clone();
        damaged[at] ^= 1 << (at % 8);
        let err = refuse(&damaged);
        let expected = match at {
            0..8 => matches!(err, SnapshotError::NotASnapshot),
            // A flip that names another version this build reads fails the checksum.
            8..12 => matches!(
                err,
                SnapshotError::Version { .. } | SnapshotError::Checksum { .. }
            ),
            12..16 => matches!(err, SnapshotError::Flags { .. }),
            16..24 => matches!(
                err,
                SnapshotError::Truncated { .. } | SnapshotError::TrailingData { .. }
            ),
            _ => matches!(err, SnapshotError::Checksum { .. }),
        };
        assert!(expected, "bit flipped at byte {at}: {err:?}");
    }
}

#[test]
fn overlapping_sections_are_refused() {
    let mut bytes = standard();
    let entries = table(&bytes);
    // Move the memory section onto the manifest.
    set_u64(&mut bytes, 32 + 24 + 8, entries[0].offset as u64);
    reseal(&mut bytes);
    assert_corrupt(&bytes, "overlapping");

    // A section starting inside the table.
    let mut bytes = standard();
    set_u64(&mut bytes, 32 + 8, 64);
    reseal(&mut bytes);
    assert_corrupt(&bytes, "overlapping the table");
}

/// An in-place change to a file's bytes.
type Patch = fn(&mut Vec<u8>);

#[test]
fn malformed_section_tables_are_refused() {
    // The first table entry (the manifest) starts at byte 32.
    let cases: [(Patch, &str); 5] = [
        (|b| set_u64(b, 32 + 8, 130), "not a multiple of 64"),
        (|b| set_u64(b, 32 + 16, u64::MAX), "extends past"),
        (|b| set_u32(b, 32, 9), "unknown kind 9"),
        (|b| set_u32(b, 32 + 4, 1), "index 1, expected 0"),
        (|b| set_u32(b, 28, 5), "reserved field is 5"),
    ];
    for (mutate, expected) in cases {
        let mut bytes = standard();
        mutate(&mut bytes);
        reseal(&mut bytes);
        assert_corrupt(&bytes, expected);
    }

    let mut bytes = standard();
    set_u32(&mut bytes, 24, 1025);
    reseal(&mut bytes);
    assert!(matches!(
        refuse(&bytes),
        SnapshotError::TooLarge {
            what: "section count",
            value: 1025,
            limit: 1024
        }
    ));

    let mut bytes = to_bytes(&Fixture::small().write()).unwrap();
    set_u32(&mut bytes, 24, 1000);
    reseal(&mut bytes);
    assert_corrupt(&bytes, "section table of 1000 entries");
}

#[test]
fn duplicate_and_missing_sections_are_refused() {
    let bytes = standard();
    let parts = sections(&bytes);
    let mut doubled = parts.clone();
    doubled.insert(2, parts[1].clone());
    assert_corrupt(&assemble(&doubled), "second memory section");
    assert_corrupt(&assemble(&parts[1..]), "no manifest section");

    let mut missing_kv = parts.clone();
    missing_kv.pop();
    assert_corrupt(
        &assemble(&missing_kv),
        "2 KV blobs but the manifest lists 3 sessions",
    );

    let mut swapped = parts.clone();
    swapped.swap(2, 3);
    assert_corrupt(&assemble(&swapped), "is KV blob 1, expected KV blob 0");
}

#[test]
fn token_count_disagreeing_with_kv_shape_is_refused() {
    let bytes = standard();
    let mut manifest = manifest_json(&bytes);
    manifest["sessions"][0]["tokens"]
        .as_array_mut()
        .unwrap()
        .pop();
    let bytes = with_manifest(&bytes, manifest.to_string().as_bytes());
    assert_corrupt(
        &bytes,
        "session 0 KV blob has shape [2, 5, 8] but its manifest entry implies [2, 4, 8]",
    );
}

#[test]
fn model_shape_disagreeing_with_kv_shape_is_refused() {
    let bytes = standard();
    let mut manifest = manifest_json(&bytes);
    manifest["models"][1]["head_dim"] = 4.into();
    let bytes = with_manifest(&bytes, manifest.to_string().as_bytes());
    assert_corrupt(&bytes, "session 1 KV blob has shape [3, 0, 8]");
}

#[test]
fn page_index_out_of_range_is_refused() {
    let mut bytes = standard();
    let memory = table(&bytes)[1];
    // The last page-table entry (page 4 of 6) now names page 6.
    let n_stored = common::u32_at(&bytes, memory.offset + 8) as usize;
    set_u32(&mut bytes, memory.offset + 16 * n_stored, 6);
    reseal(&mut bytes);
    assert_corrupt(&bytes, "names page 6; expected a page in 3..6");

    let mut bytes = standard();
    set_u32(&mut bytes, memory.offset + 16, 2); // first entry: page 1 -> 2, then 2 repeats
    reseal(&mut bytes);
    assert_corrupt(&bytes, "names page 2; expected a page in 3..6");
}

#[test]
fn memory_section_disagreeing_with_the_manifest_is_refused() {
    let bytes = standard();
    let mut manifest = manifest_json(&bytes);
    manifest["memory_bytes"] = (7 * PAGE_BYTES as u64).into();
    assert_corrupt(
        &with_manifest(&bytes, manifest.to_string().as_bytes()),
        "holds 6 pages but the manifest says memory_bytes is 458752",
    );

    let mut bytes = standard();
    let memory = table(&bytes)[1];
    set_u32(&mut bytes, memory.offset + 16 + 4, 7); // codec of the first page
    reseal(&mut bytes);
    assert_corrupt(&bytes, "unknown codec 7");
}

#[test]
fn manifest_json_errors_are_refused() {
    let bytes = standard();
    let mut manifest = manifest_json(&bytes);
    manifest["host"]["gpu"] = true.into();
    let err = refuse(&with_manifest(&bytes, manifest.to_string().as_bytes()));
    assert!(matches!(err, SnapshotError::Manifest { .. }), "{err:?}");
    assert!(err.to_string().contains("unknown field `gpu`"), "{err}");

    for bad in [&b"\xff\xfe"[..], b"", b"[]", b"{\"abi_version\": 1}"] {
        let err = refuse(&with_manifest(&bytes, bad));
        assert!(matches!(err, SnapshotError::Manifest { .. }), "{err:?}");
    }

    let mut manifest = manifest_json(&bytes);
    manifest["globals"][0]["bits"] = "0x1ffffffff".into();
    assert_corrupt(
        &with_manifest(&bytes, manifest.to_string().as_bytes()),
        "do not fit in 32 bits",
    );
}

#[test]
fn oversized_manifest_is_refused_before_parsing() {
    let bytes = standard();
    let huge = vec![b' '; (16 << 20) + 1];
    let err = refuse(&with_manifest(&bytes, &huge));
    assert!(
        matches!(
            err,
            SnapshotError::TooLarge {
                what: "manifest bytes",
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn callers_asking_for_what_does_not_exist_get_errors() {
    let bytes = standard();
    let view = parse(&bytes).unwrap();
    assert!(matches!(
        view.kv(3),
        Err(SnapshotError::OutOfRange {
            what: "session",
            index: 3,
            len: 3
        })
    ));
    let kv = view.kv(0).unwrap();
    let mut layer = vec![0f32; kv.n_tokens * kv.kv_dim];
    assert!(matches!(
        kv.k_layer(2, &mut layer),
        Err(SnapshotError::OutOfRange { .. })
    ));
    assert!(matches!(
        kv.v_layer(0, &mut layer[1..]),
        Err(SnapshotError::BufferSize { .. })
    ));
    let err = view.restore_memory(&mut [0u8; PAGE_BYTES]).unwrap_err();
    assert!(matches!(
        err,
        SnapshotError::BufferSize {
            expected: 393216,
            actual: 65536,
            ..
        }
    ));
}
