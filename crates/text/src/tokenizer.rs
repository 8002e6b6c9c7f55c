//! [`Tokenizer`]: text to token ids and back, for byte-level and SentencePiece BPE
//! vocabularies, matching what `transformers` builds from the same GGUF metadata.
//!
//! Encoding runs, in order: added tokens are cut out of the raw text (leftmost-longest); each
//! remaining piece is split into words (byte-level: the `pre` regex; SentencePiece: the whole
//! piece, spaces as `▁`); each word goes through BPE; BOS/EOS are added on request.
//!
//! Work is near linear in the text: added tokens are found in one pass, the split regexes run
//! on a DFA, and BPE takes O(n log n) per word. The constant is not small for pathological
//! text (a megabyte of random letters is one word of a million symbols, about 0.4 s), so
//! [`Tokenizer::encode_within`] takes a deadline for callers that must bound it.

use std::ops::ControlFlow;
use std::sync::Mutex;
use std::time::Instant;

use rustc_hash::FxHashMap;

use crate::added::{AddedTokens, Piece};
use crate::bpe::{Bpe, Deadline, TimeUp, Vocab};
use crate::pretokenize::Splitter;
use crate::spec::{TokenType, TokenizerSpec};
use crate::{TextError, byte_level, sentencepiece};

/// The steps that differ between the two vocabulary kinds.
#[derive(Debug)]
enum Kind {
    /// `gpt2`: words split by a regex, spelled byte by byte in GPT-2's alphabet.
    ByteLevel {
        splitter: Splitter,
        /// The id of the single-character token spelling each byte, if any.
        byte_ids: Box<[Option<u32>; 256]>,
        /// Ids of words seen before.
        cache: WordCache,
    },
    /// `llama`: the text is one word with `▁` for spaces; unknown characters become bytes.
    SentencePiece {
        /// Prefix the text with `▁` (and strip one leading space when decoding).
        space_prefix: bool,
        /// The id of each byte's fallback token `<0xNN>`, if any.
        byte_ids: Box<[Option<u32>; 256]>,
    },
}

/// The longest text [`Tokenizer::encode`] takes: BPE positions are 32-bit.
const MAX_TEXT_BYTES: usize = u32::MAX as usize / 2;

/// Words encoded between two looks at the deadline: a few hundred microseconds of work.
const WORDS_PER_CHECK: usize = 256;

/// Ids of recently encoded words, which natural text repeats a lot.
#[derive(Debug, Default)]
struct WordCache {
    words: Mutex<FxHashMap<Box<str>, Box<[u32]>>>,
}

impl WordCache {
    /// Entries kept before the cache starts over.
    const CAPACITY: usize = 32_768;
    /// Longer words are not kept.
    const MAX_WORD: usize = 256;
}

/// A tokenizer built from a model's own vocabulary. It is `Send + Sync`: one instance can
/// serve every thread.
pub struct Tokenizer {
    kind: Kind,
    /// Token spellings, indexed by id, as the file spells them.
    tokens: Vec<String>,
    types: Vec<TokenType>,
    bpe: Bpe,
    added: AddedTokens,
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
    add_eos: bool,
}

impl std::fmt::Debug for Tokenizer {
    /// A summary: the vocabulary itself is tens of thousands of entries.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.kind {
            Kind::ByteLevel { .. } => "byte-level BPE",
            Kind::SentencePiece { .. } => "SentencePiece BPE",
        };
        f.debug_struct("Tokenizer")
            .field("kind", &kind)
            .field("n_vocab", &self.tokens.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("add_bos", &self.add_bos)
            .field("add_eos", &self.add_eos)
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// Builds the tokenizer `spec` describes, or says what is wrong with it.
    pub fn from_spec(spec: TokenizerSpec) -> Result<Tokenizer, TextError> {
        check(&spec)?;
        let byte_level = match spec.model.as_str() {
            "gpt2" => true,
            "llama" => false,
            other => {
                return Err(TextError::UnsupportedModel {
                    model: other.to_string(),
                });
            }
        };
        let types: Vec<TokenType> = match &spec.token_types {
            Some(raw) => raw.iter().map(|&t| TokenType::from_raw(t)).collect(),
            None => vec![TokenType::Other; spec.tokens.len()],
        };
        let vocab = vocabulary(&spec.tokens, byte_level);
        let bpe = match (parse_merges(spec.merges.as_deref())?, &spec.scores) {
            (Some(merges), _) => Bpe::new(vocab, merges)?,
            (None, Some(scores)) if !byte_level => {
                let derived = sentencepiece::derive_merges(&spec.tokens, scores, &vocab);
                Bpe::new(vocab, derived)?
            }
            (None, None) if !byte_level => return Err(TextError::MissingScores),
            (None, _) => Bpe::new(vocab, [])?,
        };
        let kind = if byte_level {
            let byte_ids = byte_table(|b| {
                bpe.id(byte_level::BYTE_CHARS[usize::from(b)].encode_utf8(&mut [0; 4]))
            });
            Kind::ByteLevel {
                splitter: Splitter::new(spec.pre.as_deref())?,
                byte_ids,
                cache: WordCache::default(),
            }
        } else {
            let byte_ids = byte_table(|b| bpe.id(&sentencepiece::byte_token(b)));
            Kind::SentencePiece {
                space_prefix: spec.add_space_prefix,
                byte_ids,
            }
        };
        let added = added_tokens(&spec, &types, &bpe, byte_level)?;
        Ok(Tokenizer {
            kind,
            tokens: spec.tokens,
            types,
            bpe,
            added,
            bos: spec.bos,
            eos: spec.eos,
            add_bos: spec.add_bos,
            add_eos: spec.add_eos,
        })
    }

    /// The ids of `text`. Added tokens written in the text (`<|im_start|>`) become their ids;
    /// `add_special` adds BOS and/or EOS as the spec asks.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>, TextError> {
        self.encode_until(text, add_special, Deadline::NEVER)
    }

    /// [`Tokenizer::encode`], giving up with [`TextError::TimeLimit`] once `deadline` has
    /// passed. The clock is read between words and every thousand merges of a long word,
    /// so the overrun is about a millisecond at most.
    pub fn encode_within(
        &self,
        text: &str,
        add_special: bool,
        deadline: Instant,
    ) -> Result<Vec<u32>, TextError> {
        self.encode_until(text, add_special, Deadline::at(deadline))
    }

    fn encode_until(
        &self,
        text: &str,
        add_special: bool,
        deadline: Deadline,
    ) -> Result<Vec<u32>, TextError> {
        if text.len() >= MAX_TEXT_BYTES {
            return Err(TextError::TextTooLong {
                bytes: text.len(),
                max: MAX_TEXT_BYTES,
            });
        }
        let mut ids = Vec::with_capacity(text.len() / 3 + 2);
        if add_special && self.add_bos {
            ids.extend(self.bos);
        }
        let time_up = |_: TimeUp| TextError::TimeLimit { bytes: text.len() };
        for piece in self.added.split(text) {
            match piece {
                Piece::Added(id) => ids.push(id),
                Piece::Text { offset, text } => self
                    .encode_piece(text, offset == 0, &mut ids, deadline)
                    .map_err(time_up)?,
            }
        }
        if add_special && self.add_eos {
            ids.extend(self.eos);
        }
        Ok(ids)
    }

    /// Encodes text that holds no added token; `first` when it starts the input.
    fn encode_piece(
        &self,
        text: &str,
        first: bool,
        ids: &mut Vec<u32>,
        deadline: Deadline,
    ) -> Result<(), TimeUp> {
        deadline.check()?;
        let mut symbols: Vec<u32> = Vec::new();
        match &self.kind {
            Kind::ByteLevel {
                splitter,
                byte_ids,
                cache,
            } => {
                // Another thread using the cache just means encoding without it.
                let mut cache = cache.words.try_lock().ok();
                let mut words = 0usize;
                let split = splitter.split(text, |word| {
                    words += 1;
                    if words.is_multiple_of(WORDS_PER_CHECK)
                        && let Err(time_up) = deadline.check()
                    {
                        return ControlFlow::Break(time_up);
                    }
                    if let Some(ids_of_word) = cache.as_ref().and_then(|c| c.get(word)) {
                        ids.extend_from_slice(ids_of_word);
                        return ControlFlow::Continue(());
                    }
                    let start = ids.len();
                    symbols.clear();
                    symbols.extend(word.bytes().filter_map(|b| byte_ids[usize::from(b)]));
                    if let Err(time_up) = self.bpe.merge_into(&symbols, ids, deadline) {
                        return ControlFlow::Break(time_up);
                    }
                    if let Some(cache) = cache.as_mut().filter(|_| word.len() < WordCache::MAX_WORD)
                    {
                        if cache.len() >= WordCache::CAPACITY {
                            cache.clear();
                        }
                        cache.insert(word.into(), ids[start..].into());
                    }
                    ControlFlow::Continue(())
                });
                if let ControlFlow::Break(time_up) = split {
                    return Err(time_up);
                }
            }
            Kind::SentencePiece {
                space_prefix,
                byte_ids,
            } => {
                let prefix =
                    *space_prefix && first && !text.starts_with([' ', sentencepiece::SPACE]);
                if prefix {
                    self.push_char(sentencepiece::SPACE, byte_ids, &mut symbols);
                }
                for c in text.chars() {
                    let c = if c == ' ' { sentencepiece::SPACE } else { c };
                    self.push_char(c, byte_ids, &mut symbols);
                }
                self.bpe.merge_into(&symbols, ids, deadline)?;
            }
        }
        Ok(())
    }

    /// Appends the initial symbol(s) of one character of a SentencePiece word: its token, else
    /// its byte tokens, else nothing (`transformers` sets no unknown token on this model).
    fn push_char(&self, c: char, byte_ids: &[Option<u32>; 256], symbols: &mut Vec<u32>) {
        let mut buf = [0u8; 4];
        let utf8 = c.encode_utf8(&mut buf);
        if let Some(id) = self.bpe.id(utf8) {
            symbols.push(id);
        } else if let Some(bytes) = utf8
            .bytes()
            .map(|b| byte_ids[usize::from(b)])
            .collect::<Option<Vec<u32>>>()
        {
            symbols.extend(bytes);
        }
    }

    /// The text of `ids`, as `transformers`' `decode` gives it (special tokens included).
    /// Invalid UTF-8 becomes U+FFFD; an id outside the vocabulary is an error.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TextError> {
        let tokens = ids
            .iter()
            .map(|&id| self.spelling(id))
            .collect::<Result<Vec<&str>, _>>()?;
        Ok(match &self.kind {
            Kind::ByteLevel { .. } => {
                let mut bytes = Vec::new();
                for token in tokens {
                    bytes.extend(byte_level::token_bytes(token));
                }
                String::from_utf8_lossy(&bytes).into_owned()
            }
            Kind::SentencePiece { space_prefix, .. } => {
                sentencepiece::decode(tokens, *space_prefix)
            }
        })
    }

    /// The spelling of `id` in the file.
    fn spelling(&self, id: u32) -> Result<&str, TextError> {
        self.tokens
            .get(id as usize)
            .map(String::as_str)
            .ok_or(TextError::InvalidId {
                id,
                n_vocab: self.tokens.len(),
            })
    }

    /// The raw bytes of one token, which may be part of a UTF-8 character; `None` for an id
    /// outside the vocabulary. A SentencePiece `▁` is a space here.
    pub fn token_bytes(&self, id: u32) -> Option<Vec<u8>> {
        let token = self.spelling(id).ok()?;
        Some(match &self.kind {
            Kind::ByteLevel { .. } => byte_level::token_bytes(token),
            Kind::SentencePiece { .. } => match sentencepiece::parse_byte_token(token) {
                Some(byte) => vec![byte],
                None => token.replace(sentencepiece::SPACE, " ").into_bytes(),
            },
        })
    }

    /// Whether decoding groups `id` with its neighbours as a raw byte (a SentencePiece
    /// `<0xNN>` token); byte-level tokens are all raw bytes and never need this.
    pub(crate) fn is_byte_token(&self, id: u32) -> bool {
        matches!(self.kind, Kind::SentencePiece { .. })
            && self
                .spelling(id)
                .is_ok_and(|t| sentencepiece::parse_byte_token(t).is_some())
    }

    /// Whether this is a SentencePiece vocabulary.
    pub(crate) fn is_sentencepiece(&self) -> bool {
        matches!(self.kind, Kind::SentencePiece { .. })
    }

    /// Whether decoded text drops one leading space (SentencePiece with a space prefix).
    pub(crate) fn strips_leading_space(&self) -> bool {
        matches!(
            self.kind,
            Kind::SentencePiece {
                space_prefix: true,
                ..
            }
        )
    }

    /// The number of token ids.
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// The beginning-of-sequence token.
    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    /// The end-of-sequence token.
    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// Whether `id` is a control token (`<|im_end|>`, `<s>`, ...).
    pub fn is_control(&self, id: u32) -> bool {
        self.types.get(id as usize) == Some(&TokenType::Control)
    }
}

/// Rejects specs that cannot describe a vocabulary.
fn check(spec: &TokenizerSpec) -> Result<(), TextError> {
    let n_vocab = spec.tokens.len();
    if n_vocab == 0 {
        return Err(TextError::EmptyVocab);
    }
    if u32::try_from(n_vocab).is_err() {
        return Err(TextError::VocabTooLarge { n_vocab });
    }
    let lengths = [
        ("scores", spec.scores.as_ref().map(Vec::len)),
        ("token_types", spec.token_types.as_ref().map(Vec::len)),
    ];
    for (field, len) in lengths {
        if let Some(len) = len.filter(|&len| len != n_vocab) {
            return Err(TextError::LengthMismatch {
                field,
                len,
                n_vocab,
            });
        }
    }
    let specials = [
        ("bos", spec.bos),
        ("eos", spec.eos),
        ("unk", spec.unk),
        ("pad", spec.pad),
    ];
    for (role, id) in specials {
        if let Some(id) = id.filter(|&id| id as usize >= n_vocab) {
            return Err(TextError::SpecialOutOfRange { role, id, n_vocab });
        }
    }
    Ok(())
}

/// Spelling → id. A byte-level token spelled outside GPT-2's alphabet is respelled through it,
/// as `transformers` does, so that it can be found.
fn vocabulary(tokens: &[String], byte_level: bool) -> Vocab {
    let mut vocab = Vocab::with_capacity_and_hasher(tokens.len(), Default::default());
    for (id, token) in tokens.iter().enumerate() {
        let key = if byte_level && !byte_level::is_spelled(token) {
            byte_level::spell(token)
        } else {
            token.clone()
        };
        vocab.insert(key, id as u32);
    }
    vocab
}

/// Splits `"left right"` merges; anything but exactly one space is an error.
fn parse_merges(merges: Option<&[String]>) -> Result<Option<Vec<(&str, &str)>>, TextError> {
    let Some(merges) = merges else {
        return Ok(None);
    };
    let pairs = merges
        .iter()
        .enumerate()
        .map(|(rank, merge)| match merge.split_once(' ') {
            Some((left, right)) if !right.contains(' ') => Ok((left, right)),
            _ => Err(TextError::BadMerge {
                rank,
                merge: merge.clone(),
            }),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Some(pairs))
}

fn byte_table(id_of: impl Fn(u8) -> Option<u32>) -> Box<[Option<u32>; 256]> {
    let mut table = Box::new([None; 256]);
    for b in 0..=255u8 {
        table[usize::from(b)] = id_of(b);
    }
    table
}

/// The tokens matched whole in text, as `transformers` adds them: control tokens (for a
/// byte-level vocabulary only those spelled in its alphabet), user-defined tokens, the spec's
/// BOS/EOS/UNK/PAD, and the defaults of the tokenizer class it builds (`<|endoftext|>` for
/// byte-level; `<unk>`, `<s>`, `</s>` for SentencePiece) where the vocabulary has them.
fn added_tokens(
    spec: &TokenizerSpec,
    types: &[TokenType],
    bpe: &Bpe,
    byte_level: bool,
) -> Result<AddedTokens, TextError> {
    let mut added: Vec<(String, u32)> = Vec::new();
    let class_defaults: &[&str] = if byte_level {
        &["<|endoftext|>"]
    } else {
        &["<unk>", "<s>", "</s>"]
    };
    for token in class_defaults {
        if let Some(id) = bpe.id(token) {
            added.push((token.to_string(), id));
        }
    }
    for (token, kind) in spec.tokens.iter().zip(types) {
        let wanted = match kind {
            TokenType::Control => !byte_level || byte_level::is_spelled(token),
            TokenType::UserDefined => true,
            _ => false,
        };
        if let Some(id) = bpe.id(token).filter(|_| wanted) {
            added.push((token.clone(), id));
        }
    }
    for id in [spec.bos, spec.eos, spec.unk, spec.pad]
        .into_iter()
        .flatten()
    {
        added.push((spec.tokens[id as usize].clone(), id));
    }
    AddedTokens::new(added)
}
