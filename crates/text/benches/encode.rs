//! Encoding and decoding throughput on a real vocabulary.
//!
//! `TERN_TEXT_FIXTURES=/path/to/fixtures cargo bench -p tern-text --bench encode` times every
//! fixture's long texts (see `tests/transformers_parity.rs` for the fixture format) and prints
//! microseconds per KiB: encoding with a cold and a warm word cache, and decoding the same
//! text as a baseline. `ROUNDS` sets the number of warm rounds (default 20).

use std::time::Instant;

use serde::Deserialize;
use tern_text::{Tokenizer, TokenizerSpec};

#[derive(Deserialize)]
struct Fixture {
    spec: TokenizerSpec,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    text: String,
}

fn main() {
    let Some(dir) = std::env::var_os("TERN_TEXT_FIXTURES") else {
        eprintln!("set TERN_TEXT_FIXTURES to a folder of fixtures to run this benchmark");
        return;
    };
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .expect("TERN_TEXT_FIXTURES is a folder")
        .map(|entry| entry.expect("readable folder").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
        .collect();
    paths.sort();
    for path in paths {
        let fixture: Fixture =
            serde_json::from_slice(&std::fs::read(&path).expect("readable")).expect("fixture");
        let started = Instant::now();
        let tokenizer = Tokenizer::from_spec(fixture.spec).expect("spec builds");
        let build = started.elapsed();
        let texts: Vec<&str> = fixture
            .cases
            .iter()
            .map(|c| c.text.as_str())
            .filter(|t| t.len() >= 2048)
            .collect();
        let bytes: usize = texts.iter().map(|t| t.len()).sum();
        let rounds: usize = std::env::var("ROUNDS")
            .ok()
            .and_then(|r| r.parse().ok())
            .unwrap_or(20);
        // The first pass runs with an empty word cache; the later ones mostly hit it.
        let started = Instant::now();
        let mut all_ids: Vec<Vec<u32>> = texts
            .iter()
            .map(|t| tokenizer.encode(t, false).expect("encodes"))
            .collect();
        let cold = started.elapsed();
        let started = Instant::now();
        for _ in 0..rounds {
            all_ids = texts
                .iter()
                .map(|t| tokenizer.encode(t, false).expect("encodes"))
                .collect();
        }
        let encode = started.elapsed();
        let started = Instant::now();
        for _ in 0..rounds {
            for ids in &all_ids {
                std::hint::black_box(tokenizer.decode(ids).expect("decodes"));
            }
        }
        let decode = started.elapsed();
        let kib = bytes as f64 / 1024.0;
        let per_kib = |d: std::time::Duration, n: usize| d.as_secs_f64() * 1e6 / (kib * n as f64);
        let (cold, enc, dec) = (
            per_kib(cold, 1),
            per_kib(encode, rounds),
            per_kib(decode, rounds),
        );
        println!(
            "{}: build {:.1} ms; encode {cold:.1} us/KiB cold, {enc:.1} us/KiB warm; decode {dec:.1} us/KiB \
             (encode warm / decode {:.1}x); {} texts, {bytes} bytes",
            path.file_stem().unwrap_or_default().to_string_lossy(),
            build.as_secs_f64() * 1e3,
            enc / dec,
            texts.len(),
        );
    }
}
