//! Random-weight Llama models of real shapes, written as GGUF, for tests and benchmarks.
//!
//! Speed does not depend on weight values, so a generated model of a real shape times like
//! the real one; weights are drawn from a seeded PRNG (never zeros) with the scale of a
//! trained model's, so activations stay in a realistic range. The tokenizer is byte-level
//! BPE over the 256 byte tokens plus ChatML special tokens, padded with control tokens to the
//! shape's vocabulary, and the chat template is ChatML.

use std::io::{self, BufWriter, Write};
use std::path::Path;

use crate::gguf::Value;
use crate::gguf_write::{TensorOut, write_gguf};
use crate::quant::{DType, quantize_row};

/// The shape of a Llama-family model.
#[derive(Clone, Debug, PartialEq)]
pub struct Shape {
    pub name: &'static str,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub n_ff: usize,
    pub n_vocab: usize,
    pub n_ctx: usize,
    pub rope_base: f32,
}

/// Shapes of real models, and small ones for fast tests (`small` fits K-quant blocks).
pub const SHAPES: &[Shape] = &[
    Shape {
        name: "tiny",
        n_layer: 2,
        n_embd: 64,
        n_head: 4,
        n_head_kv: 2,
        n_ff: 128,
        n_vocab: 512,
        n_ctx: 256,
        rope_base: 10_000.0,
    },
    Shape {
        name: "small",
        n_layer: 2,
        n_embd: 256,
        n_head: 4,
        n_head_kv: 2,
        n_ff: 512,
        n_vocab: 512,
        n_ctx: 1024,
        rope_base: 10_000.0,
    },
    Shape {
        name: "smollm2-135m",
        n_layer: 30,
        n_embd: 576,
        n_head: 9,
        n_head_kv: 3,
        n_ff: 1536,
        n_vocab: 49152,
        n_ctx: 8192,
        rope_base: 100_000.0,
    },
    Shape {
        name: "llama-3.2-1b",
        n_layer: 16,
        n_embd: 2048,
        n_head: 32,
        n_head_kv: 8,
        n_ff: 8192,
        n_vocab: 128_256,
        n_ctx: 131_072,
        rope_base: 500_000.0,
    },
];

/// The shape named `name`.
pub fn shape(name: &str) -> Option<&'static Shape> {
    SHAPES.iter().find(|s| s.name == name)
}

/// Weight types of a generated model: `linear` for the attention and feed-forward matrices,
/// `embd` for the (tied) embedding matrix.
#[derive(Clone, Copy, Debug)]
pub struct Types {
    pub linear: DType,
    pub embd: DType,
}

struct Rng(u64);

impl Rng {
    /// Roughly normal, mean 0 and standard deviation 1 (sum of four uniforms).
    fn normal(&mut self) -> f32 {
        let mut sum = 0.0;
        for _ in 0..4 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            sum += (self.0 >> 40) as f32 / (1u64 << 24) as f32;
        }
        (sum - 2.0) * 1.732
    }
}

/// GPT-2's printable stand-in for each byte.
fn byte_token(b: u8) -> String {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xa1..=0xac).contains(&b) || b >= 0xae;
    if printable(b) {
        return char::from(b).to_string();
    }
    let shift = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + shift).expect("valid char").to_string()
}

/// The chat template generated models carry: ChatML, as SmolLM2's.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Writes a random model of `shape` with `types` to `path`, with the ChatML template.
pub fn write_random_llama(path: &Path, shape: &Shape, types: Types, seed: u64) -> io::Result<()> {
    write_random_llama_with_template(path, shape, types, seed, CHATML_TEMPLATE)
}

/// Writes a random model of `shape` with `types` and chat template `template` to `path`.
pub fn write_random_llama_with_template(
    path: &Path,
    shape: &Shape,
    types: Types,
    seed: u64,
    template: &str,
) -> io::Result<()> {
    let mut rng = Rng(seed | 1);
    let s = shape;
    let head_dim = s.n_embd / s.n_head;
    let mut tokens: Vec<Value> = (0..=255u8).map(|b| Value::String(byte_token(b))).collect();
    let specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
    tokens.extend(specials.iter().map(|t| Value::String(t.to_string())));
    let mut types_tok: Vec<Value> = vec![Value::I32(1); 256];
    types_tok.extend(std::iter::repeat_n(Value::I32(3), 3));
    while tokens.len() < s.n_vocab {
        tokens.push(Value::String(format!("<|extra_{}|>", tokens.len())));
        types_tok.push(Value::I32(3));
    }
    tokens.truncate(s.n_vocab);
    types_tok.truncate(s.n_vocab);
    let u32v = |v: usize| Value::U32(v as u32);
    let metadata = vec![
        ("general.architecture", Value::String("llama".into())),
        ("general.name", Value::String(format!("random {}", s.name))),
        ("llama.block_count", u32v(s.n_layer)),
        ("llama.context_length", u32v(s.n_ctx)),
        ("llama.embedding_length", u32v(s.n_embd)),
        ("llama.feed_forward_length", u32v(s.n_ff)),
        ("llama.attention.head_count", u32v(s.n_head)),
        ("llama.attention.head_count_kv", u32v(s.n_head_kv)),
        ("llama.rope.freq_base", Value::F32(s.rope_base)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("llama.vocab_size", u32v(s.n_vocab)),
        ("llama.rope.dimension_count", u32v(head_dim)),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String("smollm".into())),
        ("tokenizer.ggml.tokens", Value::Array(tokens)),
        ("tokenizer.ggml.token_type", Value::Array(types_tok)),
        (
            "tokenizer.ggml.merges",
            Value::Array(vec![Value::String("Ġ t".into())]),
        ),
        ("tokenizer.ggml.bos_token_id", Value::U32(257)),
        ("tokenizer.ggml.eos_token_id", Value::U32(258)),
        ("tokenizer.ggml.add_bos_token", Value::Bool(false)),
        ("tokenizer.chat_template", Value::String(template.into())),
    ];
    // (name, rows, cols, dtype, scale): scale keeps activations at a trained model's size.
    let mut specs: Vec<(String, usize, usize, DType, f32)> = Vec::new();
    let (q, kv) = (s.n_head * head_dim, s.n_head_kv * head_dim);
    specs.push((
        "token_embd.weight".into(),
        s.n_vocab,
        s.n_embd,
        types.embd,
        0.05,
    ));
    for i in 0..s.n_layer {
        let n = |t: &str| format!("blk.{i}.{t}.weight");
        let lin = types.linear;
        let scale = |fan_in: usize| 1.0 / (fan_in as f32).sqrt();
        specs.push((n("attn_norm"), 1, s.n_embd, DType::F32, 0.0));
        specs.push((n("attn_q"), q, s.n_embd, lin, scale(s.n_embd)));
        specs.push((n("attn_k"), kv, s.n_embd, lin, scale(s.n_embd)));
        specs.push((n("attn_v"), kv, s.n_embd, lin, scale(s.n_embd)));
        specs.push((n("attn_output"), s.n_embd, q, lin, scale(q)));
        specs.push((n("ffn_norm"), 1, s.n_embd, DType::F32, 0.0));
        specs.push((n("ffn_gate"), s.n_ff, s.n_embd, lin, scale(s.n_embd)));
        specs.push((n("ffn_up"), s.n_ff, s.n_embd, lin, scale(s.n_embd)));
        specs.push((n("ffn_down"), s.n_embd, s.n_ff, lin, scale(s.n_ff)));
    }
    specs.push(("output_norm.weight".into(), 1, s.n_embd, DType::F32, 0.0));
    let mut data = Vec::with_capacity(specs.len());
    for (_, rows, cols, dtype, scale) in &specs {
        let row_bytes = dtype.row_bytes(*cols).expect("shapes are multiples of 256");
        let mut bytes = vec![0u8; rows * row_bytes];
        let mut row = vec![0.0f32; *cols];
        for r in 0..*rows {
            for x in row.iter_mut() {
                // Norm weights near 1; matrices random at their scale.
                *x = if *scale == 0.0 {
                    1.0 + 0.1 * rng.normal()
                } else {
                    scale * rng.normal()
                };
            }
            quantize_row(*dtype, &row, &mut bytes[r * row_bytes..(r + 1) * row_bytes]);
        }
        data.push(bytes);
    }
    let dims: Vec<Vec<u64>> = specs
        .iter()
        .map(|(_, rows, cols, _, _)| {
            if *rows == 1 {
                vec![*cols as u64]
            } else {
                vec![*cols as u64, *rows as u64]
            }
        })
        .collect();
    let tensors: Vec<TensorOut<'_>> = specs
        .iter()
        .zip(&data)
        .zip(&dims)
        .map(|(((name, _, _, dtype, _), bytes), dims)| TensorOut {
            name,
            dims,
            dtype: *dtype,
            data: bytes,
        })
        .collect();
    let mut out = BufWriter::new(std::fs::File::create(path)?);
    let meta: Vec<(&str, Value)> = metadata.into_iter().collect();
    write_gguf(&mut out, &meta, &tensors)?;
    out.flush()
}
