//! Split patterns of byte-level BPE vocabularies: text is cut into words by a regex before BPE
//! runs on each word, so that no token spans two words.
//!
//! Which pattern applies is chosen by `tokenizer.ggml.pre`, with the table `transformers` uses
//! (`integrations/gguf/gguf_tokenizer_mapping.py`); every other name gets GPT-2's pattern, which
//! is what `transformers` uses for `smollm`, `default`, `gpt-2` and the rest. (SmolLM2's pattern
//! keeps digit runs together; its vocabulary simply has no multi-digit tokens, so
//! "1234567" still becomes seven ids.)
//!
//! Every pattern ends in `\s+(?!\S)|\s+`: a run of spaces leaves its last space to the word that
//! follows. The `regex` crate has no look-ahead, so the tail is matched as `\s+` and the rule is
//! applied after the match (see [`Splitter::split`]), which keeps matching on a DFA.

use std::ops::ControlFlow;

use regex::Regex;

use crate::TextError;

/// GPT-2's pattern (`tokenizers`' `ByteLevel` pre-tokenizer with `use_regex`).
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

/// Llama 3's pattern: case-insensitive contractions, digits in threes.
const LLAMA3: &str = concat!(
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}",
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);

/// Qwen 2's pattern: like Llama 3's but single digits.
const QWEN2: &str = concat!(
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}",
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);

/// Qwen 3.5's pattern: marks join letters.
const QWEN35: &str = concat!(
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}",
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);

/// Mistral's Tekken pattern.
const TEKKEN: &str = concat!(
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+",
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*",
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);

/// GPT-4o's pattern (also Llama 4's).
const GPT4O: &str = concat!(
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);

/// The split pattern for `tokenizer.ggml.pre`.
pub(crate) fn pattern_for(pre: Option<&str>) -> &'static str {
    match pre.unwrap_or("") {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" | "dbrx" | "smaug-bpe" => LLAMA3,
        "tekken" => TEKKEN,
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" => QWEN2,
        "qwen35" => QWEN35,
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => GPT4O,
        _ => GPT2,
    }
}

/// The tail every pattern ends with.
const LOOKAHEAD_TAIL: &str = r"\s+(?!\S)|\s+";

/// The alternative of Llama-3-style patterns that takes whitespace ending in a newline.
const NEWLINE_RUN: &str = r"\s*[\r\n]+";

/// A compiled split pattern.
#[derive(Debug)]
pub(crate) struct Splitter {
    /// The pattern with its tail matched as plain `\s+`.
    regex: Regex,
    /// The pattern has [`NEWLINE_RUN`], so a whitespace match holding a newline came from it
    /// rather than from the tail.
    has_newline_run: bool,
}

impl Splitter {
    /// Compiles the pattern for `pre`.
    pub(crate) fn new(pre: Option<&str>) -> Result<Splitter, TextError> {
        let pattern = pattern_for(pre);
        let bad = |message: String| TextError::BadPattern {
            pre: pre.unwrap_or("").to_string(),
            message,
        };
        let head = pattern
            .strip_suffix(LOOKAHEAD_TAIL)
            .ok_or_else(|| bad(format!("pattern does not end in `{LOOKAHEAD_TAIL}`")))?;
        let regex = Regex::new(&format!(r"{head}\s+")).map_err(|e| bad(e.to_string()))?;
        Ok(Splitter {
            regex,
            has_newline_run: head.contains(NEWLINE_RUN),
        })
    }

    /// Calls `word` on each piece of `text`, in order: every match, and any text between
    /// matches (the patterns cover all text, so there is none in practice); stops early when
    /// `word` breaks.
    ///
    /// The look-ahead tail: a match that is all whitespace came from `\s+` (or, when it holds
    /// a newline in a pattern with [`NEWLINE_RUN`], from that alternative). `\s+` took the whole
    /// run, so unless the run ends the text a non-space follows, and `\s+(?!\S)` would have
    /// stopped one character short, if that leaves anything.
    pub(crate) fn split<B>(
        &self,
        text: &str,
        mut word: impl FnMut(&str) -> ControlFlow<B>,
    ) -> ControlFlow<B> {
        let mut at = 0;
        while at < text.len() {
            let Some(found) = self.regex.find_at(text, at) else {
                break;
            };
            if found.start() > at {
                word(&text[at..found.start()])?;
            }
            let piece = found.as_str();
            let mut end = found.end();
            let from_tail = piece.chars().all(char::is_whitespace)
                && !(self.has_newline_run && piece.contains(['\r', '\n']));
            let last = piece.char_indices().next_back().map_or(0, |(last, _)| last);
            if from_tail && end < text.len() && last > 0 {
                end = found.start() + last;
            }
            if end == found.start() {
                // An empty match cannot happen with these patterns; step over a character.
                end += text[end..].chars().next().map_or(1, char::len_utf8);
            }
            word(&text[found.start()..end])?;
            at = end;
        }
        if at < text.len() {
            word(&text[at..])?;
        }
        ControlFlow::Continue(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(pre: &str, text: &str) -> Vec<String> {
        let splitter = Splitter::new(Some(pre)).unwrap();
        let mut out = Vec::new();
        let _: ControlFlow<()> = splitter.split(text, |w| {
            out.push(w.to_string());
            ControlFlow::Continue(())
        });
        out
    }

    #[test]
    fn gpt2_keeps_one_space_with_the_next_word() {
        assert_eq!(
            words("smollm", "Hello   world!!\n"),
            ["Hello", "  ", " world", "!!", "\n"]
        );
        assert_eq!(
            words("gpt-2", "it's 1234 apples"),
            ["it", "'s", " 1234", " apples"]
        );
        assert_eq!(words("gpt-2", "a \n\n  b  "), ["a", " \n\n ", " b", "  "]);
        assert_eq!(words("gpt-2", "x\t y"), ["x", "\t", " y"]);
    }

    #[test]
    fn llama3_groups_digits_in_threes() {
        assert_eq!(
            words("llama-bpe", "1234567 IT'S"),
            ["123", "456", "7", " IT", "'S"]
        );
        assert_eq!(words("qwen2", "2024"), ["2", "0", "2", "4"]);
        assert_eq!(
            words("llama-bpe", "a  \n\n  b   c"),
            ["a", "  \n\n", " ", " b", "  ", " c"]
        );
    }

    #[test]
    fn every_pattern_compiles() {
        for pre in [
            "llama-bpe",
            "tekken",
            "qwen2",
            "qwen35",
            "gpt-4o",
            "default",
        ] {
            assert!(Splitter::new(Some(pre)).is_ok(), "{pre}");
        }
    }
}
