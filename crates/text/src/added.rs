//! Added tokens: special and user-defined tokens that are matched whole in the raw text before
//! any other processing, so that `<|im_start|>` written in a prompt becomes one id.
//!
//! Matching is leftmost-longest, as in Hugging Face's `AddedVocabulary`: the earliest position
//! where any token matches wins, and the longest token among those matching there.

use std::collections::HashMap;

/// One piece of the text after added tokens are cut out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Piece<'a> {
    /// An added token's id.
    Added(u32),
    /// Ordinary text, with its byte offset in the whole input.
    Text { offset: usize, text: &'a str },
}

/// The added tokens of a vocabulary, indexed by first byte.
#[derive(Debug, Default)]
pub(crate) struct AddedTokens {
    /// First byte → (content, id), longest content first.
    by_first_byte: HashMap<u8, Vec<(String, u32)>>,
}

impl AddedTokens {
    /// Builds the matcher from `(content, id)` pairs; empty contents are ignored, and a content
    /// given twice keeps its last id.
    pub(crate) fn new(tokens: impl IntoIterator<Item = (String, u32)>) -> AddedTokens {
        let mut unique: HashMap<String, u32> = HashMap::new();
        for (content, id) in tokens {
            if !content.is_empty() {
                unique.insert(content, id);
            }
        }
        let mut by_first_byte: HashMap<u8, Vec<(String, u32)>> = HashMap::new();
        for (content, id) in unique {
            let first = content.as_bytes()[0];
            by_first_byte.entry(first).or_default().push((content, id));
        }
        for list in by_first_byte.values_mut() {
            list.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        }
        AddedTokens { by_first_byte }
    }

    /// The id of the added token that starts `text`, if any, and its length in bytes.
    fn match_at(&self, text: &str) -> Option<(u32, usize)> {
        let candidates = self.by_first_byte.get(text.as_bytes().first()?)?;
        candidates
            .iter()
            .find(|(content, _)| text.starts_with(content.as_str()))
            .map(|(content, id)| (*id, content.len()))
    }

    /// Cuts `text` into added tokens and the ordinary text between them.
    pub(crate) fn split<'a>(&self, text: &'a str) -> Vec<Piece<'a>> {
        let mut pieces = Vec::new();
        let mut start = 0;
        let mut at = 0;
        if !self.by_first_byte.is_empty() {
            while at < text.len() {
                if !text.is_char_boundary(at)
                    || !self.by_first_byte.contains_key(&text.as_bytes()[at])
                {
                    at += 1;
                    continue;
                }
                match self.match_at(&text[at..]) {
                    Some((id, len)) => {
                        if start < at {
                            pieces.push(Piece::Text {
                                offset: start,
                                text: &text[start..at],
                            });
                        }
                        pieces.push(Piece::Added(id));
                        at += len;
                        start = at;
                    }
                    None => at += 1,
                }
            }
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
        ])
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
