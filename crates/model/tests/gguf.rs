//! The GGUF reader on small generated files: what it reads back, and clear errors (never a
//! panic) for corrupt, truncated and unsupported files.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use tern_model::ModelError;
use tern_model::gguf::{GgufFile, Value};
use tern_model::gguf_write::{TensorOut, write_gguf};
use tern_model::quant::DType;

fn sample() -> Vec<u8> {
    let weights: Vec<u8> = (0..8 * 4)
        .flat_map(|i| (i as f32 * 0.5).to_le_bytes())
        .collect();
    let mut out = Vec::new();
    write_gguf(
        &mut out,
        &[
            ("general.architecture", Value::String("llama".into())),
            ("llama.block_count", Value::U32(1)),
            (
                "tokenizer.ggml.tokens",
                Value::Array(vec![Value::String("a".into()), Value::String("b".into())]),
            ),
        ],
        &[TensorOut {
            name: "w",
            dims: &[8, 4],
            dtype: DType::F32,
            data: &weights,
        }],
    )
    .unwrap();
    out
}

fn open(bytes: &[u8]) -> Result<GgufFile, ModelError> {
    let dir = std::env::temp_dir().join(format!("tern-gguf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Tests run in parallel threads of one process: every file gets its own name, since two
    // samples with the same length and byte sum would otherwise overwrite each other.
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let path: PathBuf = dir.join(format!("{}.gguf", NEXT.fetch_add(1, Ordering::Relaxed)));
    std::fs::write(&path, bytes).unwrap();
    let result = GgufFile::open(&path);
    let _ = std::fs::remove_file(&path);
    result
}

#[test]
fn reads_back_what_was_written() {
    let file = open(&sample()).unwrap();
    assert_eq!(file.version, 3);
    assert_eq!(file.str("general.architecture").unwrap(), "llama");
    assert_eq!(file.u64("llama.block_count").unwrap(), 1);
    let w = file.tensor("w").unwrap();
    assert_eq!(w.dims, [8, 4]);
    assert_eq!(w.dtype, DType::F32);
    let data = file.data(w);
    assert_eq!(data.len(), 128);
    assert_eq!(f32::from_le_bytes(data[4..8].try_into().unwrap()), 0.5);
}

#[test]
fn every_truncation_is_a_clear_error() {
    let bytes = sample();
    for len in 0..bytes.len() {
        let err = open(&bytes[..len])
            .err()
            .unwrap_or_else(|| panic!("a file cut at {len} opened"));
        let text = err.to_string();
        assert!(
            text.contains("truncated")
                || text.contains("past the end")
                || text.contains("not a GGUF"),
            "{len}: {text}"
        );
    }
}

#[test]
fn corrupt_headers_are_refused() {
    let good = sample();
    let patch = |at: usize, with: &[u8]| {
        let mut b = good.clone();
        b[at..at + with.len()].copy_from_slice(with);
        b
    };
    let cases = [
        (patch(0, b"GGUX"), "not a GGUF"),
        (patch(4, &9u32.to_le_bytes()), "version 9"),
        (patch(8, &u64::MAX.to_le_bytes()), "tensors"),
        (patch(16, &(1u64 << 40).to_le_bytes()), "metadata"),
        (patch(24, &(1u64 << 50).to_le_bytes()), "string"),
    ];
    for (bytes, words) in cases {
        let err = open(&bytes).expect_err("refused").to_string();
        assert!(err.contains(words), "`{err}` lacks `{words}`");
    }
}

#[test]
fn unsupported_tensor_types_are_named() {
    let mut out = Vec::new();
    write_gguf(
        &mut out,
        &[],
        &[TensorOut {
            name: "odd",
            dims: &[32],
            dtype: DType::Q8_0,
            data: &[0; 34],
        }],
    )
    .unwrap();
    // Change the tensor's type id (the 4 bytes before its offset) to 99.
    let at = out
        .windows(4)
        .rposition(|w| w == 8u32.to_le_bytes())
        .unwrap();
    out[at..at + 4].copy_from_slice(&99u32.to_le_bytes());
    let err = open(&out).expect_err("refused").to_string();
    assert!(err.contains("ggml type 99") && err.contains("odd"), "{err}");
}

#[test]
fn random_bit_flips_never_panic() {
    let good = sample();
    let mut state = 0x1234_5678_u64;
    for _ in 0..2000 {
        let mut b = good.clone();
        for _ in 0..3 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let i = (state as usize) % b.len();
            b[i] ^= 1 << (state % 8);
        }
        let _ = open(&b);
    }
}
