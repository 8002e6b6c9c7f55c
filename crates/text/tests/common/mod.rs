//! Tiny handmade vocabularies shared by the integration tests.
//!
//! The expected ids in the tests were produced by writing these same vocabularies into GGUF
//! files and loading them with `transformers` (`AutoTokenizer.from_pretrained(dir,
//! gguf_file=..)`, version 5.24).

#![allow(dead_code)]

use tern_text::{Tokenizer, TokenizerSpec};

/// GPT-2's spelling of byte `b` (the printable bytes stand for themselves; the others are
/// U+0100.. in byte order).
pub fn byte_char(b: u8) -> char {
    let printable = |x: u8| matches!(x, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    if printable(b) {
        return char::from(b);
    }
    let shift = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + shift).expect("U+0100..U+0143")
}

/// The byte-level vocabulary: ids 0-2 are `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`
/// (control), ids 3..=258 are the bytes 0..=255 in order (byte `b` is id `b + 3`), then one
/// token per merge (ids 259..=269), then `<think>` (user-defined, id 270).
pub const BPE_MERGES: [(&str, &str); 11] = [
    ("Ġ", "t"),     // 259 "Ġt"
    ("h", "e"),     // 260 "he"
    ("Ġt", "he"),   // 261 "Ġthe"
    ("l", "l"),     // 262 "ll"
    ("ll", "o"),    // 263 "llo"
    ("he", "llo"),  // 264 "hello"
    ("Ġ", "Ġ"),     // 265 "ĠĠ"
    ("1", "2"),     // 266 "12"
    ("ð", "Ł"),     // 267 "ðŁ": the first two bytes of most emoji
    ("Ċ", "Ċ"),     // 268 "ĊĊ"
    ("Ġ", "hello"), // 269 "Ġhello"
];

/// The id of byte `b` in the byte-level vocabulary.
pub fn bpe_byte(b: u8) -> u32 {
    u32::from(b) + 3
}

pub fn tiny_bpe_spec() -> TokenizerSpec {
    let mut tokens: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        .map(String::from)
        .to_vec();
    let mut types = vec![3; 3];
    tokens.extend((0..=255u8).map(|b| byte_char(b).to_string()));
    types.extend([1; 256]);
    for (left, right) in BPE_MERGES {
        tokens.push(format!("{left}{right}"));
        types.push(1);
    }
    tokens.push("<think>".into());
    types.push(4);
    TokenizerSpec {
        model: "gpt2".into(),
        pre: Some("smollm".into()),
        tokens,
        token_types: Some(types),
        merges: Some(BPE_MERGES.iter().map(|(l, r)| format!("{l} {r}")).collect()),
        bos: Some(1),
        eos: Some(2),
        ..TokenizerSpec::default()
    }
}

pub fn tiny_bpe() -> Tokenizer {
    Tokenizer::from_spec(tiny_bpe_spec()).expect("the tiny byte-level spec builds")
}

/// Scored pieces of the SentencePiece vocabulary, ids 259.. in order; no merges are given, so
/// they are derived from the scores.
pub const SPM_PIECES: [(&str, f32); 22] = [
    ("▁h", -1.0),      // 259
    ("▁he", -2.0),     // 260
    ("ll", -3.0),      // 261
    ("llo", -4.0),     // 262
    ("▁hello", -5.0),  // 263
    ("▁w", -6.0),      // 264
    ("or", -7.0),      // 265
    ("▁wor", -8.0),    // 266
    ("ld", -9.0),      // 267
    ("▁world", -10.0), // 268
    ("▁▁", -11.0),     // 269
    ("▁", -100.0),     // 270
    ("h", -101.0),     // 271
    ("e", -102.0),     // 272
    ("l", -103.0),     // 273
    ("o", -104.0),     // 274
    ("w", -105.0),     // 275
    ("r", -106.0),     // 276
    ("d", -107.0),     // 277
    ("!", -108.0),     // 278
    ("a", -109.0),     // 279
    ("é", -110.0),     // 280
];

/// The SentencePiece vocabulary: `<unk>` (unknown), `<s>`, `</s>` (control), the byte tokens
/// `<0x00>`..`<0xFF>` (byte `b` is id `b + 3`), then [`SPM_PIECES`]. BOS is added.
pub fn tiny_spm_spec() -> TokenizerSpec {
    let mut tokens: Vec<String> = ["<unk>", "<s>", "</s>"].map(String::from).to_vec();
    let mut types = vec![2, 3, 3];
    let mut scores = vec![0.0; 3];
    tokens.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
    types.extend([6; 256]);
    scores.extend([0.0; 256]);
    for (piece, score) in SPM_PIECES {
        tokens.push(piece.into());
        types.push(1);
        scores.push(score);
    }
    TokenizerSpec {
        model: "llama".into(),
        pre: Some("default".into()),
        tokens,
        scores: Some(scores),
        token_types: Some(types),
        bos: Some(1),
        eos: Some(2),
        unk: Some(0),
        add_bos: true,
        add_space_prefix: true,
        ..TokenizerSpec::default()
    }
}

pub fn tiny_spm() -> Tokenizer {
    Tokenizer::from_spec(tiny_spm_spec()).expect("the tiny SentencePiece spec builds")
}
