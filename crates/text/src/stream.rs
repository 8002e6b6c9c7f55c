//! [`StreamDecoder`]: text from token ids that arrive one at a time.
//!
//! A token can hold part of a UTF-8 character (a byte-level token, or a SentencePiece `<0xF0>`),
//! so bytes are held back until they complete a character; everything that is complete is
//! returned at once.
//!
//! Guarantee: for any ids, the concatenation of every [`StreamDecoder::push`] result and the
//! final [`StreamDecoder::finish`] equals [`Tokenizer::decode`] of all the ids, with one
//! exception: a SentencePiece run of byte tokens that holds invalid UTF-8 after some valid
//! characters keeps those characters here, while `decode` replaces the whole run.

use crate::{TextError, Tokenizer};

const REPLACEMENT: char = '\u{FFFD}';

/// Turns a stream of token ids into text as soon as it is valid UTF-8.
///
/// ```
/// # use tern_text::{StreamDecoder, Tokenizer};
/// # fn run(tokenizer: &Tokenizer, ids: &[u32]) -> Result<String, tern_text::TextError> {
/// let mut stream = StreamDecoder::new(tokenizer);
/// let mut text = String::new();
/// for &id in ids {
///     text += &stream.push(tokenizer, id)?;
/// }
/// text += &stream.finish();
/// # Ok(text) }
/// ```
#[derive(Debug, Clone)]
pub struct StreamDecoder {
    /// Bytes of an incomplete character.
    pending: Vec<u8>,
    /// Nothing has been returned yet.
    at_start: bool,
    /// The tokenizer's decoder drops one leading space.
    strip_space: bool,
    /// Invalid bytes become one U+FFFD each (SentencePiece), not one per maximal invalid
    /// sequence (byte-level, as `String::from_utf8_lossy`).
    per_byte: bool,
}

impl StreamDecoder {
    /// A decoder for ids of `tokenizer`; pass the same tokenizer to every `push`.
    pub fn new(tokenizer: &Tokenizer) -> StreamDecoder {
        StreamDecoder {
            pending: Vec::new(),
            at_start: true,
            strip_space: tokenizer.strips_leading_space(),
            per_byte: tokenizer.is_sentencepiece(),
        }
    }

    /// Adds one token and returns the text it completes (often all of it, sometimes none).
    /// An id outside the vocabulary is an error and leaves the decoder as it was.
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String, TextError> {
        let bytes = tokenizer.token_bytes(id).ok_or(TextError::InvalidId {
            id,
            n_vocab: tokenizer.vocab_size(),
        })?;
        let mut text = String::new();
        if self.per_byte && !self.pending.is_empty() && !tokenizer.is_byte_token(id) {
            // A run of byte tokens ended inside a character.
            text.extend(std::iter::repeat_n(REPLACEMENT, self.pending.len()));
            self.pending.clear();
        }
        self.pending.extend_from_slice(&bytes);
        self.drain_complete(&mut text);
        Ok(self.emit(text))
    }

    /// Returns what is still held back (an incomplete character, as U+FFFD) and resets the
    /// decoder for a new sequence.
    pub fn finish(&mut self) -> String {
        let mut text = String::new();
        if !self.pending.is_empty() {
            let n = if self.per_byte { self.pending.len() } else { 1 };
            text.extend(std::iter::repeat_n(REPLACEMENT, n));
            self.pending.clear();
        }
        let text = self.emit(text);
        self.at_start = true;
        text
    }

    /// Moves every complete character (and every invalid sequence, as U+FFFD) from `pending`
    /// to `text`, keeping only a trailing incomplete character.
    fn drain_complete(&mut self, text: &mut String) {
        let mut start = 0;
        loop {
            match std::str::from_utf8(&self.pending[start..]) {
                Ok(valid) => {
                    text.push_str(valid);
                    start = self.pending.len();
                    break;
                }
                Err(e) => {
                    let valid_end = start + e.valid_up_to();
                    // from_utf8 checked these bytes.
                    text.push_str(
                        std::str::from_utf8(&self.pending[start..valid_end]).unwrap_or_default(),
                    );
                    match e.error_len() {
                        Some(n) => {
                            let count = if self.per_byte { n } else { 1 };
                            text.extend(std::iter::repeat_n(REPLACEMENT, count));
                            start = valid_end + n;
                        }
                        None => {
                            start = valid_end;
                            break;
                        }
                    }
                }
            }
        }
        self.pending.drain(..start);
    }

    /// Applies the leading-space strip to the first text returned.
    fn emit(&mut self, mut text: String) -> String {
        if self.at_start && !text.is_empty() {
            if self.strip_space && text.starts_with(' ') {
                text.remove(0);
            }
            self.at_start = false;
        }
        text
    }
}
