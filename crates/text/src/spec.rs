//! [`TokenizerSpec`]: the tokenizer a GGUF file describes, as plain data.
//!
//! Field for field it holds llama.cpp's `tokenizer.ggml.*` keys; the model crate fills it and
//! [`crate::Tokenizer::from_spec`] checks it.

use serde::{Deserialize, Serialize};

/// The tokenizer metadata of one model, copied from its GGUF `tokenizer.ggml.*` keys.
///
/// Defaults the filler must apply where a key is absent (they are llama.cpp's and
/// `transformers`'): `add_bos` and `add_space_prefix` are `true` for `model == "llama"` and
/// `false` otherwise; `add_eos` is `false`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TokenizerSpec {
    /// `tokenizer.ggml.model`: `"gpt2"` (byte-level BPE) or `"llama"` (SentencePiece BPE).
    pub model: String,
    /// `tokenizer.ggml.pre`: selects the split pattern of a byte-level BPE (`"llama-bpe"`,
    /// `"qwen2"`, ...); names without a pattern of their own (`"smollm"`, `"default"`, `"gpt-2"`)
    /// get GPT-2's.
    pub pre: Option<String>,
    /// `tokenizer.ggml.tokens`, indexed by token id, spelled as the file spells them.
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.scores`: SentencePiece scores, used to derive merges when none are given.
    pub scores: Option<Vec<f32>>,
    /// `tokenizer.ggml.token_type`: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused,
    /// 6 byte.
    pub token_types: Option<Vec<i32>>,
    /// `tokenizer.ggml.merges`: `"left right"` pairs, best first.
    pub merges: Option<Vec<String>>,
    /// `tokenizer.ggml.bos_token_id`.
    pub bos: Option<u32>,
    /// `tokenizer.ggml.eos_token_id`.
    pub eos: Option<u32>,
    /// `tokenizer.ggml.unknown_token_id`.
    pub unk: Option<u32>,
    /// `tokenizer.ggml.padding_token_id`.
    pub pad: Option<u32>,
    /// `tokenizer.ggml.add_bos_token`: encoding with `add_special` starts with BOS.
    pub add_bos: bool,
    /// `tokenizer.ggml.add_eos_token`: encoding with `add_special` ends with EOS.
    pub add_eos: bool,
    /// `tokenizer.ggml.add_space_prefix`: a SentencePiece vocabulary prefixes the text with `▁`.
    pub add_space_prefix: bool,
}

/// The values of `tokenizer.ggml.token_type` (llama.cpp's `llama_token_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TokenType {
    Normal,
    Unknown,
    /// A special token such as `<|im_start|>`: matched whole in text.
    Control,
    /// An added token such as `<think>`: matched whole in text, but not special.
    UserDefined,
    Unused,
    /// A SentencePiece byte token `<0xNN>`.
    Byte,
    /// Any other value, or no type array at all.
    Other,
}

impl TokenType {
    /// The type of a raw `tokenizer.ggml.token_type` value.
    pub(crate) fn from_raw(raw: i32) -> TokenType {
        match raw {
            1 => TokenType::Normal,
            2 => TokenType::Unknown,
            3 => TokenType::Control,
            4 => TokenType::UserDefined,
            5 => TokenType::Unused,
            6 => TokenType::Byte,
            _ => TokenType::Other,
        }
    }
}
