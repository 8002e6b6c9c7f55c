//! SentencePiece-style BPE (`tokenizer.ggml.model = "llama"`): the pieces `transformers`
//! builds around the shared BPE model.
//!
//! - Encoding: spaces become `▁`, and the text's first piece gets a `▁` prefix unless it has one
//!   (`Metaspace`, prepend scheme "first"); the whole piece is one BPE word; characters
//!   missing from the vocabulary fall back to byte tokens `<0xNN>`.
//! - Merges: GGUF files of this kind usually carry none, so they are derived from the scores
//!   exactly as `transformers.tokenization_utils_base.generate_merges` does.
//! - Decoding: `▁` becomes a space, runs of byte tokens become their UTF-8 text (or one U+FFFD
//!   per byte when invalid), and one leading space is stripped.

use std::cmp::Ordering;
use std::collections::HashMap;

use crate::bpe::Vocab;

/// The word-boundary marker that stands for a space.
pub(crate) const SPACE: char = '▁';

/// Spells a byte as its fallback token, `<0x0A>`.
pub(crate) fn byte_token(byte: u8) -> String {
    format!("<0x{byte:02X}>")
}

/// The byte of a fallback token spelled `<0xNN>` (either case of hex digit).
pub(crate) fn parse_byte_token(token: &str) -> Option<u8> {
    let hex = token.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// One merge candidate of [`derive_merges`].
struct Candidate<'a> {
    left: &'a str,
    right: &'a str,
    score: f32,
    left_chars: usize,
    right_chars: usize,
}

/// Merges implied by a scored vocabulary: every split of every token into two tokens, ordered
/// by the token's score (best first), then the longer left part, then the longer right part,
/// ties kept in vocabulary order.
pub(crate) fn derive_merges<'a>(
    tokens: &'a [String],
    scores: &[f32],
    vocab: &Vocab,
) -> Vec<(&'a str, &'a str)> {
    // A Python dict from zip(tokens, scores): first position, last score.
    let mut last_score: HashMap<&str, f32> = HashMap::with_capacity(tokens.len());
    let mut order: Vec<&str> = Vec::with_capacity(tokens.len());
    for (token, &score) in tokens.iter().zip(scores) {
        if last_score.insert(token.as_str(), score).is_none() {
            order.push(token.as_str());
        }
    }
    let mut candidates = Vec::new();
    for token in order {
        let score = last_score[token];
        let start = candidates.len();
        let n_chars = token.chars().count();
        for (left_chars, (split, _)) in token.char_indices().enumerate().skip(1) {
            let (left, right) = token.split_at(split);
            if vocab.contains_key(left) && vocab.contains_key(right) {
                let right_chars = n_chars - left_chars;
                candidates.push(Candidate {
                    left,
                    right,
                    score,
                    left_chars,
                    right_chars,
                });
            }
        }
        candidates[start..].sort_by_key(|c| (vocab[c.left], vocab[c.right]));
    }
    // Stable, descending: equal keys keep their order, as Python's sorted(reverse=True) does.
    candidates.sort_by(|a, b| {
        b.score
            .partial_cmp(&a.score)
            .unwrap_or(Ordering::Equal)
            .then(b.left_chars.cmp(&a.left_chars))
            .then(b.right_chars.cmp(&a.right_chars))
    });
    candidates.into_iter().map(|c| (c.left, c.right)).collect()
}

/// Decodes the spellings of a run of tokens as `transformers`' SentencePiece decoder does:
/// `Replace(▁, " ")`, `ByteFallback`, `Fuse`, then `Strip(left = 1)` when `strip_space`.
pub(crate) fn decode<'a>(tokens: impl IntoIterator<Item = &'a str>, strip_space: bool) -> String {
    let mut text = String::new();
    let mut bytes: Vec<u8> = Vec::new();
    for token in tokens {
        if let Some(byte) = parse_byte_token(token) {
            bytes.push(byte);
            continue;
        }
        flush_bytes(&mut bytes, &mut text);
        text.extend(token.chars().map(|c| if c == SPACE { ' ' } else { c }));
    }
    flush_bytes(&mut bytes, &mut text);
    if strip_space && text.starts_with(' ') {
        text.remove(0);
    }
    text
}

/// Appends a run of byte tokens: its text when valid UTF-8, else one U+FFFD per byte.
fn flush_bytes(bytes: &mut Vec<u8>, text: &mut String) {
    if bytes.is_empty() {
        return;
    }
    match std::str::from_utf8(bytes) {
        Ok(valid) => text.push_str(valid),
        Err(_) => text.extend(std::iter::repeat_n('\u{FFFD}', bytes.len())),
    }
    bytes.clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab(tokens: &[String]) -> Vocab {
        tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect()
    }

    #[test]
    fn merges_follow_scores_then_lengths() {
        let tokens: Vec<String> = ["a", "b", "c", "ab", "abc", "bc"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let scores = [0.0, 0.0, 0.0, -1.0, -3.0, -2.0];
        let merges = derive_merges(&tokens, &scores, &vocab(&tokens));
        assert_eq!(
            merges,
            vec![("a", "b"), ("b", "c"), ("ab", "c"), ("a", "bc")]
        );
    }

    #[test]
    fn byte_tokens_parse_and_print() {
        assert_eq!(byte_token(0x0A), "<0x0A>");
        assert_eq!(parse_byte_token("<0xe5>"), Some(0xE5));
        assert_eq!(parse_byte_token("<0x0A0>"), None);
        assert_eq!(parse_byte_token("<s>"), None);
    }

    #[test]
    fn decoding_fuses_bytes_and_strips_one_space() {
        let text = decode(
            ["▁Hi", "<0xE5>", "<0x8F>", "<0xAB>", "▁", "<0xE5>", "x"],
            true,
        );
        assert_eq!(text, "Hi叫 \u{FFFD}x");
        assert_eq!(decode(["<s>", "▁Hi"], true), "<s> Hi");
        assert_eq!(decode(["▁▁Hi"], false), "  Hi");
    }
}
