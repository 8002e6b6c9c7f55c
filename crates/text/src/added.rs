//! Added tokens: special and user-defined tokens that are matched whole in the raw text before
//! any other processing, so that `<|im_start|>` written in a prompt becomes one id.
//!
//! Matching is leftmost-longest, as in Hugging Face's `AddedVocabulary`: the earliest position
//! where any token matches wins, and the longest token among those matching there. It runs on
//! an Aho-Corasick automaton, as there, so it takes time linear in the text however many added
//! tokens share a prefix (Llama 3 has 256 starting `<|reserved_special_token_`).

use std::collections::HashMap;

use aho_corasick::{AhoCorasick, MatchKind};

use crate::TextError;

/// One piece of the text after added tokens are cut out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Piece<'a> {
    /// An added token's id.
    Added(u32),
    /// Ordinary text, with its byte offset in the whole input.
    Text { offset: usize, text: &'a str },
}

/// The added tokens of a vocabulary.
#[derive(Debug, Default)]
pub(crate) struct AddedTokens {
    /// Matches the contents, leftmost-longest; `None` when there are none.
    matcher: Option<AhoCorasick>,
    /// The id of each pattern of `matcher`.
    ids: Vec<u32>,
}

impl AddedTokens {
    /// Builds the matcher from `(content, id)` pairs; empty contents are ignored, and a content
    /// given twice keeps its last id.
    pub(crate) fn new(
        tokens: impl IntoIterator<Item = (String, u32)>,
    ) -> Result<AddedTokens, TextError> {
        let mut unique: HashMap<String, u32> = HashMap::new();
        for (content, id) in tokens {
            if !content.is_empty() {
                unique.insert(content, id);
            }
        }
        if unique.is_empty() {
            return Ok(AddedTokens::default());
        }
        let (contents, ids): (Vec<String>, Vec<u32>) = unique.into_iter().unzip();
        let matcher = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(&contents)
            .map_err(|e| TextError::AddedTokens {
                count: contents.len(),
                message: e.to_string(),
            })?;
        Ok(AddedTokens {
            matcher: Some(matcher),
            ids,
        })
    }

    /// Cuts `text` into added tokens and the ordinary text between them.
    pub(crate) fn split<'a>(&self, text: &'a str) -> Vec<Piece<'a>> {
        let mut pieces = Vec::new();
        let mut start = 0;
        for found in self.matcher.iter().flat_map(|m| m.find_iter(text)) {
            if start < found.start() {
                pieces.push(Piece::Text {
                    offset: start,
                    text: &text[start..found.start()],
                });
            }
            pieces.push(Piece::Added(self.ids[found.pattern().as_usize()]));
            start = found.end();
        }
        if start < text.len() {
            pieces.push(Piece::Text {
                offset: start,
                text: &text[start..],
            });
        }
        pieces
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> AddedTokens {
        AddedTokens::new([
            ("<|a|>".to_string(), 1),
            ("<|a|><|b|>".to_string(), 2),
            ("<|b|>".to_string(), 3),
            ("é".to_string(), 4),
            (String::new(), 5),
            ("<|b|>".to_string(), 6),
        ])
        .unwrap()
    }

    #[test]
    fn longest_match_at_the_leftmost_position() {
        let pieces = tokens().split("x<|a|><|b|>y<|a|>");
        assert_eq!(
            pieces,
            vec![
                Piece::Text {
                    offset: 0,
                    text: "x"
                },
                Piece::Added(2),
                Piece::Text {
                    offset: 11,
                    text: "y"
                },
                Piece::Added(1),
            ]
        );
        // The later id of a content given twice; a longer match starting later loses.
        assert_eq!(
            tokens().split("<|b|><|a|><|b|>"),
            vec![Piece::Added(6), Piece::Added(2)]
        );
        assert_eq!(
            tokens().split("<|a<|a|><|b|"),
            vec![
                Piece::Text {
                    offset: 0,
                    text: "<|a"
                },
                Piece::Added(1),
                Piece::Text {
                    offset: 8,
                    text: "<|b|"
                },
            ]
        );
    }

    #[test]
    fn partial_tokens_stay_text() {
        let pieces = tokens().split("<|a| é");
        assert_eq!(
            pieces,
            vec![
                Piece::Text {
                    offset: 0,
                    text: "<|a| "
                },
                Piece::Added(4)
            ]
        );
        assert_eq!(tokens().split(""), vec![]);
    }
}
