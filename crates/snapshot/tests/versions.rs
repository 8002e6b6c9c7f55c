//! Format versions: version-3 files carry the link of an incremental snapshot and each
//! session's first stored position and cache type; version-2 files, without those, read as
//! whole snapshots; version-2 files carry each model's SHA-256 and numerics and the host's
//! clock; version-1 files (a real one written by the version-1 writer, in `data/`) still read,
//! with those absent; what no version allows is refused.

mod common;

use common::{Fixture, assemble_as, manifest_json, sections, with_manifest};
use tern_snapshot::{Manifest, SnapshotError, VERSION, parse, to_bytes};

/// `Fixture::small()` as the version-1 writer wrote it (before version 2 existed).
const V1_SMALL: &[u8] = include_bytes!("data/v1-small.snap");

fn standard() -> Vec<u8> {
    to_bytes(&Fixture::standard().write()).unwrap()
}

/// The manifest a version-1 file of `fixture` reads as: no SHA-256, numerics or clock.
fn as_version_1(fixture: &Fixture) -> Manifest {
    let mut m = fixture.manifest.clone();
    for model in &mut m.models {
        model.sha256 = None;
        model.numerics = None;
    }
    m.host.clock_unix_ms = None;
    m
}

/// Expects a refusal of `bytes` whose message contains `expected`.
fn assert_refused(bytes: &[u8], expected: &str) {
    match parse(bytes) {
        Ok(view) => panic!("parsed a bad file: {view:?}"),
        Err(e) => assert!(e.to_string().contains(expected), "{e} lacks {expected:?}"),
    }
}

#[test]
fn version_2_round_trips_digests_numerics_and_clock() {
    let fixture = Fixture::standard();
    let bytes = to_bytes(&fixture.write()).unwrap();
    let view = parse(&bytes).unwrap();
    assert_eq!(view.version(), VERSION);
    assert_eq!(view.manifest, fixture.manifest);
    let json = manifest_json(&bytes);
    let model = &json["models"][0];
    assert_eq!(
        model["sha256"],
        "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    );
    assert_eq!(model["legacy_digest"], 0x0123_4567_89ab_cdef_u64);
    assert_eq!(model["numerics"]["backend"], "cpu");
    assert_eq!(model["numerics"]["architecture"], "x86_64-linux-gnu");
    assert_eq!(json["host"]["clock_unix_ms"], 1_733_246_567_123_i64);

    let mut never_read = Fixture::standard();
    never_read.manifest.host.clock_unix_ms = None;
    let bytes = to_bytes(&never_read.write()).unwrap();
    assert!(manifest_json(&bytes)["host"]["clock_unix_ms"].is_null());
    assert_eq!(parse(&bytes).unwrap().manifest.host.clock_unix_ms, None);
}

#[test]
fn a_version_1_file_still_parses() {
    let view = parse(V1_SMALL).expect("the version-1 file parses");
    assert_eq!(view.version(), 1);
    let fixture = Fixture::small();
    assert_eq!(view.manifest, as_version_1(&fixture));
    assert_eq!(view.manifest.models[0].legacy_digest, 0x0123_4567_89ab_cdef);
    let mut memory = vec![0xa5u8; fixture.memory.len()];
    view.restore_memory(&mut memory).unwrap();
    assert!(memory == fixture.memory, "restored memory differs");
    for (i, session) in fixture.manifest.sessions.iter().enumerate() {
        let kv = view.kv(i).unwrap();
        let floats = session.tokens.len() * kv.kv_dim;
        let mut layer = vec![0f32; floats];
        for l in 0..kv.n_layer {
            kv.k_layer(l, &mut layer).unwrap();
            let want: Vec<u32> = fixture.k[i][l].iter().map(|v| v.to_bits()).collect();
            let got: Vec<u32> = layer.iter().map(|v| v.to_bits()).collect();
            assert_eq!(got, want, "session {i} K layer {l}");
        }
    }
}

#[test]
fn a_version_1_manifest_cannot_be_written_as_version_2() {
    let view = parse(V1_SMALL).unwrap();
    let mut fixture = Fixture::small();
    fixture.manifest = view.manifest.clone();
    let err = to_bytes(&fixture.write()).unwrap_err();
    assert!(matches!(err, SnapshotError::Corrupt(_)), "{err:?}");
    assert!(err.to_string().contains("has no sha256"), "{err}");
}

/// The version-2 manifest JSON of a version-3 file's manifest JSON (of a whole snapshot).
fn v2_json(v3: &serde_json::Value) -> serde_json::Value {
    let mut v2 = v3.clone();
    v2.as_object_mut().unwrap().remove("link");
    for session in v2["sessions"].as_array_mut().unwrap() {
        let session = session.as_object_mut().unwrap();
        session.remove("kv_from");
        session.remove("kv_type");
    }
    v2
}

/// The version-1 manifest JSON of a version-3 file's manifest JSON.
fn v1_json(v3: &serde_json::Value) -> serde_json::Value {
    let mut v1 = v2_json(v3);
    for model in v1["models"].as_array_mut().unwrap() {
        let model = model.as_object_mut().unwrap();
        model.remove("sha256");
        model.remove("numerics");
        let legacy = model.remove("legacy_digest").unwrap();
        model.insert("digest".into(), legacy);
    }
    v1["host"].as_object_mut().unwrap().remove("clock_unix_ms");
    v1
}

/// `file` with its manifest replaced by `manifest` and `version` in its header.
fn rebuilt(file: &[u8], version: u32, manifest: &serde_json::Value) -> Vec<u8> {
    let mut parts = sections(file);
    parts[0].2 = manifest.to_string().into_bytes();
    assemble_as(version, &parts)
}

#[test]
fn the_header_version_decides_how_the_manifest_reads() {
    let bytes = standard();
    let v3 = manifest_json(&bytes);
    let v2 = v2_json(&v3);
    let v1 = v1_json(&v3);
    let fixture = Fixture::standard();
    assert_eq!(
        parse(&rebuilt(&bytes, 1, &v1)).unwrap().manifest,
        as_version_1(&fixture)
    );
    let old = rebuilt(&bytes, 2, &v2);
    let old = parse(&old).unwrap();
    assert_eq!((old.version(), &old.manifest), (2, &fixture.manifest));
    // A version-3 manifest in a version-2 file, and the other way round, are refused.
    assert_refused(&rebuilt(&bytes, 2, &v3), "unknown field `link`");
    assert_refused(&rebuilt(&bytes, 3, &v2), "snapshot manifest is not valid");
    // A version-2 manifest in a version-1 file, and the other way round, are refused.
    assert_refused(&rebuilt(&bytes, 1, &v2), "snapshot manifest is not valid");
    assert_refused(&rebuilt(&bytes, 2, &v1), "snapshot manifest is not valid");
    // A version-1 manifest with one version-2 field is refused.
    let mut mixed = v1.clone();
    mixed["host"]["clock_unix_ms"] = 5.into();
    assert_refused(&rebuilt(&bytes, 1, &mixed), "unknown field `clock_unix_ms`");
}

#[test]
fn a_version_2_manifest_missing_a_new_field_is_refused() {
    let bytes = standard();
    for (pointer, field) in [
        ("/models/1", "sha256"),
        ("/models/1", "legacy_digest"),
        ("/models/0", "numerics"),
        ("/models/0/numerics", "architecture"),
        ("/host", "clock_unix_ms"),
    ] {
        let mut m = manifest_json(&bytes);
        m.pointer_mut(pointer)
            .and_then(|v| v.as_object_mut())
            .unwrap()
            .remove(field);
        let err = parse(&with_manifest(&bytes, m.to_string().as_bytes())).unwrap_err();
        assert!(matches!(err, SnapshotError::Manifest { .. }), "{err:?}");
        assert!(
            err.to_string()
                .contains(&format!("missing field `{field}`")),
            "{err}"
        );
    }
    for field in ["sha256", "numerics"] {
        let mut m = manifest_json(&bytes);
        m["models"][0][field] = serde_json::Value::Null;
        let err = parse(&with_manifest(&bytes, m.to_string().as_bytes())).unwrap_err();
        assert!(
            matches!(err, SnapshotError::Manifest { .. }),
            "{field}: {err:?}"
        );
    }
}

#[test]
fn bad_digests_and_numerics_are_refused() {
    let bytes = standard();
    let good = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
    for bad in [
        good.to_uppercase(),
        good[..63].to_string(),
        format!("{good}0"),
        good.replacen('9', "z", 1),
        String::new(),
    ] {
        let mut m = manifest_json(&bytes);
        m["models"][0]["sha256"] = bad.clone().into();
        assert_refused(
            &with_manifest(&bytes, m.to_string().as_bytes()),
            "is not 64 lowercase hex digits",
        );
    }
    let mut m = manifest_json(&bytes);
    m["models"][0]["sha256"] = 7.into();
    let err = parse(&with_manifest(&bytes, m.to_string().as_bytes())).unwrap_err();
    assert!(matches!(err, SnapshotError::Manifest { .. }), "{err:?}");

    let mut m = manifest_json(&bytes);
    m["models"][1]["numerics"]["kernels"] = "k".repeat(257).into();
    let err = parse(&with_manifest(&bytes, m.to_string().as_bytes())).unwrap_err();
    assert!(
        matches!(
            err,
            SnapshotError::TooLarge {
                what: "model numerics field",
                value: 257,
                limit: 256
            }
        ),
        "{err:?}"
    );
    let mut m = manifest_json(&bytes);
    m["models"][0]["numerics"]["backend"] = "".into();
    assert_refused(
        &with_manifest(&bytes, m.to_string().as_bytes()),
        "numerics name no backend",
    );
}
