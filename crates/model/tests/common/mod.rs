//! What the GPU backends' model tests share: a deterministic generator, the normalized error
//! their tolerances are stated in, quantized test matrices, generated model files, and
//! greedy generation compared against the CPU reference.

use std::path::PathBuf;
use std::sync::Arc;

use tern_compute::Device;
use tern_model::generate::{Shape, Types, shape, write_random_llama};
use tern_model::quant::{DType, dequantize_row, dot_rows, quantize_row};
use tern_model::{KvType, Model, ModelError, Session};

/// A xorshift generator of values in [-1, 1), seeded by its one field.
pub struct Rng(pub u64);
impl Rng {
    pub fn f32(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
    pub fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f32()).collect()
    }
}

/// `max |a - b| / max |b|`.
pub fn normalized_error(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
    let worst = a.iter().zip(b).fold(0f32, |m, (x, y)| {
        if x.is_nan() || y.is_nan() {
            f32::INFINITY
        } else {
            m.max((x - y).abs())
        }
    });
    worst / scale
}

pub fn quantized(dtype: DType, rows: usize, cols: usize, rng: &mut Rng) -> Vec<u8> {
    let row_bytes = dtype.row_bytes(cols).unwrap();
    let mut w = vec![0u8; rows * row_bytes];
    for r in 0..rows {
        quantize_row(
            dtype,
            &rng.vec(cols),
            &mut w[r * row_bytes..(r + 1) * row_bytes],
        );
    }
    w
}

/// A generated model of `shape` with `linear` matrices, written once per process.
pub fn model_file(shape_name: &str, linear: DType, embd: DType) -> PathBuf {
    model_file_of(shape(shape_name).unwrap(), linear, embd)
}

/// The same for any shape (its name names the file).
pub fn model_file_of(shape: &Shape, linear: DType, embd: DType) -> PathBuf {
    let dir = std::env::temp_dir().join("tern-test-models");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!(
        "{}-{}-{}.gguf",
        shape.name,
        linear.name(),
        embd.name()
    ));
    if !path.exists() {
        // Tests run in parallel threads: each writes its own partial file, then renames it.
        let partial = path.with_extension(format!(
            "partial-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        write_random_llama(&partial, shape, Types { linear, embd }, 3).unwrap();
        std::fs::rename(&partial, &path).unwrap();
    }
    path
}

pub fn prompt(n: usize, vocab: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((i * 7919 + 13) % vocab.min(256)) as u32)
        .collect()
}

/// Greedy generation: the logits after the prompt and after each token, and the tokens. The
/// prompt goes in pieces shorter than the GPU's tensor-core prefill takes, so that both
/// backends run the same f32 arithmetic (the CPU's results do not depend on the pieces).
pub fn greedy(
    model: &Model,
    session: &mut Session,
    prompt: &[u32],
    n: usize,
) -> (Vec<Vec<f32>>, Vec<u32>) {
    let mut logits = vec![0.0; model.config().n_vocab];
    for piece in prompt.chunks(63) {
        model.forward(session, piece, &mut logits).unwrap();
    }
    let (mut all, mut tokens) = (vec![logits.clone()], Vec::new());
    for _ in 0..n {
        let next = tern_model::llama::cpu::argmax(&logits);
        tokens.push(next);
        model.forward(session, &[next], &mut logits).unwrap();
        all.push(logits.clone());
    }
    (all, tokens)
}

pub fn bits(x: &[Vec<f32>]) -> Vec<u32> {
    x.iter().flatten().map(|v| v.to_bits()).collect()
}

/// CPU reference and GPU on one generated model: greedy tokens equal for 32 steps, logits
/// close at every step.
pub fn parity(
    device: &Arc<dyn Device>,
    shape_name: &str,
    linear: DType,
    embd: DType,
    prompt_len: usize,
) {
    parity_with(device, shape_name, linear, embd, prompt_len, KvType::F32);
}

/// [`parity`] with both sides keeping KV caches of `kv_type`.
pub fn parity_with(
    device: &Arc<dyn Device>,
    shape_name: &str,
    linear: DType,
    embd: DType,
    prompt_len: usize,
    kv_type: KvType,
) {
    parity_at(
        device,
        shape_name,
        linear,
        embd,
        prompt_len,
        kv_type,
        tern_model::Precision::Reference,
    );
}

/// [`parity_with`] with the device's model at `precision` (the CPU's stays the reference).
pub fn parity_at(
    device: &Arc<dyn Device>,
    shape_name: &str,
    linear: DType,
    embd: DType,
    prompt_len: usize,
    kv_type: KvType,
    precision: tern_model::Precision,
) {
    let path = model_file(shape_name, linear, embd);
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let cpu = Model::open("m", &path, threads)
        .unwrap()
        .with_kv_type(kv_type);
    let gpu = Model::open("m", &path, threads)
        .unwrap()
        .with_kv_type(kv_type)
        .with_precision(precision)
        .on_device(device)
        .unwrap();
    let p = prompt(prompt_len, cpu.config().n_vocab);
    let ctx = prompt_len + 40;
    let (want_logits, want) = greedy(&cpu, &mut cpu.new_session(ctx).unwrap(), &p, 32);
    let (got_logits, got) = greedy(&gpu, &mut gpu.new_session(ctx).unwrap(), &p, 32);
    let worst = got_logits
        .iter()
        .zip(&want_logits)
        .map(|(g, w)| normalized_error(g, w))
        .fold(0f32, f32::max);
    eprintln!(
        "{shape_name} {linear}, {} KV cache: largest normalized logit error {worst:.2e}",
        kv_type.name()
    );
    assert_eq!(got, want, "{shape_name} {linear}: greedy tokens differ");
    assert!(
        worst <= 1e-3,
        "{shape_name} {linear}: logits differ by {worst}"
    );
}

/// A session's KV cache after a `prompt_len`-token prompt on `device` (the small generated
/// model), copied to the host and written into a fresh session as a snapshot restore does,
/// continues for `steps` greedy tokens with the same bits as the original.
pub fn moved_cache_continues_bit_for_bit(
    device: &Arc<dyn Device>,
    prompt_len: usize,
    n_ctx: usize,
    steps: usize,
) {
    moved_cache_continues_bit_for_bit_with(device, prompt_len, n_ctx, steps, KvType::F32);
}

/// [`moved_cache_continues_bit_for_bit`] with a KV cache of `kv_type`.
pub fn moved_cache_continues_bit_for_bit_with(
    device: &Arc<dyn Device>,
    prompt_len: usize,
    n_ctx: usize,
    steps: usize,
    kv_type: KvType,
) {
    let path = model_file("small", DType::Q4_1, DType::Q8_0);
    let model = Model::open("m", &path, 2)
        .unwrap()
        .with_kv_type(kv_type)
        .on_device(device)
        .unwrap();
    let p = prompt(prompt_len, 512);
    let mut original = model.new_session(n_ctx).unwrap();
    let mut logits = vec![0.0; 512];
    model.forward(&mut original, &p, &mut logits).unwrap();
    let host = original.host_kv(&model).unwrap().into_owned();
    assert_eq!(host.kv_type(), kv_type);
    let mut moved = model.new_session(n_ctx).unwrap();
    let layer = |l: usize| -> (Vec<u8>, Vec<u8>) {
        match kv_type {
            KvType::F32 => {
                let le = |x: &[f32]| x.iter().flat_map(|v| v.to_le_bytes()).collect();
                (le(host.layer(l).0), le(host.layer(l).1))
            }
            KvType::F16 => {
                let le = |x: &[u16]| x.iter().flat_map(|v| v.to_le_bytes()).collect();
                (le(host.layer_half(l).0), le(host.layer_half(l).1))
            }
        }
    };
    let layers: Vec<(Vec<u8>, Vec<u8>)> = (0..host.n_layer()).map(layer).collect();
    moved
        .refill(
            &model,
            0,
            host.len,
            |l| Ok((&layers[l].0[..], &layers[l].1[..])),
            None,
        )
        .unwrap();
    moved.tokens = original.tokens.clone();
    let (a, ta) = greedy(&model, &mut original, &[7], steps);
    let (b, tb) = greedy(&model, &mut moved, &[7], steps);
    assert_eq!(ta, tb);
    assert!(
        bits(&a) == bits(&b),
        "the moved cache continues differently"
    );
}

/// The single-kernel runs both GPU backends' test harnesses offer, for the op parity checks
/// below.
pub trait Ops {
    /// `y[t] = residual[t] + W x[t]` for the `x.len() / cols` rows of `x`.
    fn matvec(
        &self,
        dtype: DType,
        rows: usize,
        cols: usize,
        w: &[u8],
        x: &[f32],
        residual: Option<&[f32]>,
    ) -> Result<Vec<f32>, ModelError>;
    /// Rows `ids` of W, dequantized.
    fn get_rows(
        &self,
        dtype: DType,
        rows: usize,
        cols: usize,
        w: &[u8],
        ids: &[u32],
    ) -> Result<Vec<f32>, ModelError>;
    fn rmsnorm(&self, x: &[f32], w: &[f32], eps: f32) -> Result<Vec<f32>, ModelError>;
    fn swiglu(&self, gate: &[f32], up: &[f32]) -> Result<Vec<f32>, ModelError>;
}

/// Implements [`Ops`] for a backend's op harness, whose inherent methods have the trait's
/// signatures.
macro_rules! harness_ops {
    ($harness:ty) => {
        impl Ops for $harness {
            fn matvec(
                &self,
                dtype: DType,
                rows: usize,
                cols: usize,
                w: &[u8],
                x: &[f32],
                residual: Option<&[f32]>,
            ) -> Result<Vec<f32>, ModelError> {
                <$harness>::matvec(self, dtype, rows, cols, w, x, residual)
            }
            fn get_rows(
                &self,
                dtype: DType,
                rows: usize,
                cols: usize,
                w: &[u8],
                ids: &[u32],
            ) -> Result<Vec<f32>, ModelError> {
                <$harness>::get_rows(self, dtype, rows, cols, w, ids)
            }
            fn rmsnorm(&self, x: &[f32], w: &[f32], eps: f32) -> Result<Vec<f32>, ModelError> {
                <$harness>::rmsnorm(self, x, w, eps)
            }
            fn swiglu(&self, gate: &[f32], up: &[f32]) -> Result<Vec<f32>, ModelError> {
                <$harness>::swiglu(self, gate, up)
            }
        }
    };
}
#[allow(unused_imports)]
pub(crate) use harness_ops;

/// Every weight type's product with 1, 3 and 8 tokens, with and without a residual, for
/// each of `widths` (column counts the type's blocks divide), against the CPU's dot rows.
pub fn matvec_parity(ops: &impl Ops, widths: &[usize]) {
    let mut rng = Rng(0x5eed);
    for dtype in DType::ALL {
        for &cols in widths {
            if dtype.row_bytes(cols).is_none() {
                continue;
            }
            let rows = 300;
            let w = quantized(dtype, rows, cols, &mut rng);
            for n_tok in [1, 3, 8] {
                let x = rng.vec(n_tok * cols);
                let residual = rng.vec(n_tok * rows);
                let mut want = vec![0.0; n_tok * rows];
                for t in 0..n_tok {
                    dot_rows(
                        dtype,
                        &w,
                        &x[t * cols..(t + 1) * cols],
                        &mut want[t * rows..(t + 1) * rows],
                    );
                }
                let got = ops.matvec(dtype, rows, cols, &w, &x, None).unwrap();
                let err = normalized_error(&got, &want);
                assert!(
                    err <= 1e-5,
                    "{dtype} {rows}x{cols}, {n_tok} tokens: error {err}"
                );
                let with: Vec<f32> = want.iter().zip(&residual).map(|(a, b)| a + b).collect();
                let got = ops
                    .matvec(dtype, rows, cols, &w, &x, Some(&residual))
                    .unwrap();
                let err = normalized_error(&got, &with);
                assert!(
                    err <= 1e-5,
                    "{dtype} with residual, {n_tok} tokens: error {err}"
                );
            }
        }
    }
}

/// Embedding rows of every type, repeats included, against the CPU's dequantization.
pub fn embedding_parity(ops: &impl Ops) {
    let mut rng = Rng(7);
    for dtype in DType::ALL {
        let (rows, cols) = (64, 512);
        let w = quantized(dtype, rows, cols, &mut rng);
        let ids = [3, 0, 63, 3, 17];
        let got = ops.get_rows(dtype, rows, cols, &w, &ids).unwrap();
        let row_bytes = dtype.row_bytes(cols).unwrap();
        let mut want = vec![0.0; ids.len() * cols];
        for (i, &id) in ids.iter().enumerate() {
            let id = id as usize;
            dequantize_row(
                dtype,
                &w[id * row_bytes..(id + 1) * row_bytes],
                &mut want[i * cols..(i + 1) * cols],
            );
        }
        let err = normalized_error(&got, &want);
        assert!(err <= 1e-6, "{dtype}: error {err}");
    }
}

/// RMSNorm (on large activations) and SwiGLU against the CPU reference.
pub fn norm_and_activation_parity(ops: &impl Ops) {
    let mut rng = Rng(11);
    let (n_tok, width) = (5, 2048);
    let x: Vec<f32> = rng.vec(n_tok * width).iter().map(|v| v * 30.0).collect();
    let w = rng.vec(width);
    let got = ops.rmsnorm(&x, &w, 1e-5).unwrap();
    let mut want = vec![0.0; x.len()];
    for t in 0..n_tok {
        tern_model::llama::cpu::rmsnorm(
            &mut want[t * width..(t + 1) * width],
            &x[t * width..(t + 1) * width],
            &w,
            1e-5,
        );
    }
    assert!(normalized_error(&got, &want) <= 1e-5);
    let (gate, up) = (rng.vec(width), rng.vec(width));
    let got = ops.swiglu(&gate, &up).unwrap();
    let want: Vec<f32> = gate
        .iter()
        .zip(&up)
        .map(|(&g, &u)| g / (1.0 + (-g).exp()) * u)
        .collect();
    assert!(normalized_error(&got, &want) <= 1e-6);
}
