//! Text in and out of a model: tokenizers and chat templates, built from the model's own
//! metadata.
//!
//! A GGUF file carries no `tokenizer.json`; it stores the vocabulary, merges and special token
//! ids under llama.cpp's `tokenizer.ggml.*` keys. The model crate copies those keys into a
//! [`TokenizerSpec`], and [`Tokenizer::from_spec`] rebuilds the tokenizer that Hugging Face
//! `transformers` builds from the same file (`AutoTokenizer.from_pretrained(dir, gguf_file=..)`,
//! `integrations/gguf/gguf_tokenizer_mapping.py`), so that both give the same ids for the same
//! text:
//!
//! | `tokenizer.ggml.model` | what it is                          | pipeline                                              |
//! |------------------------|-------------------------------------|-------------------------------------------------------|
//! | `gpt2`                 | byte-level BPE (SmolLM2, Llama 3)   | split regex chosen by `pre` → bytes → BPE             |
//! | `llama`                | SentencePiece BPE (Llama 2)         | spaces → `▁`, `▁` prefix → BPE with `<0xNN>` fallback |
//!
//! Before either, "added tokens" written in the text are matched whole (leftmost-longest), as
//! `transformers` adds them: control tokens (type 3; for `gpt2` only those spelled in GPT-2's
//! byte alphabet), user-defined tokens (type 4), the BOS/EOS/UNK/PAD tokens, and the defaults of
//! the tokenizer class `transformers` uses (`<|endoftext|>`; `<unk>`, `<s>`, `</s>`) where the
//! vocabulary has them. A SentencePiece vocabulary without merges gets them derived from its
//! scores exactly as `transformers` derives them.
//!
//! [`ChatTemplate`] renders a model's Jinja chat template the way `apply_chat_template` does
//! (trimmed blocks, Python string methods, `raise_exception`, `strftime_now`, Python-style
//! `tojson` and printing). [`StreamDecoder`] turns ids generated one at a time into text,
//! holding back bytes until they form whole UTF-8 characters.
//!
//! Nothing here panics on bad input: malformed specs, out-of-range ids and broken templates are
//! [`TextError`]s. Work is bounded for callers that run it for someone else:
//! [`Tokenizer::encode_within`] stops at a deadline, and a template render stops at fixed
//! limits of work, nesting and output (see [`ChatTemplate`]).
//!
//! # Where this differs from `transformers`, on purpose
//!
//! - [`Tokenizer::decode`] refuses ids outside the vocabulary; `transformers` skips them.
//! - Where `transformers` invents an id past the vocabulary for a class default it does not find
//!   (`<|endoftext|>` in a Llama 3 vocabulary), that text is encoded as ordinary text here.
//! - `add_space_prefix = false` is honoured for `llama` vocabularies, as llama.cpp honours it;
//!   `transformers` ignores the key and always prefixes (checked with 5.24). Files that set the
//!   key to `true` or leave it out (Llama 2, TinyLlama, Mistral) are unaffected.
//! - A merge whose halves exist but whose concatenation does not is ignored; `transformers`
//!   refuses the file.
//! - Architecture-specific SentencePiece variants (Gemma, Phi-3) and other models (`t5`
//!   unigram, `gemma4`) are not built: the spec does not carry the architecture.

mod added;
mod bpe;
mod byte_level;
mod hf;
mod pretokenize;
mod pyfmt;
mod sentencepiece;
mod spec;
mod stream;
mod template;
mod tokenizer;

pub use hf::{HfTokenizer, from_hf_files};
pub use spec::TokenizerSpec;
pub use stream::StreamDecoder;
pub use template::{
    ChatTemplate, MAX_RENDER_BYTES, Message, RECURSION_LIMIT, RENDER_FUEL, RENDER_STACK_BYTES,
};
pub use tokenizer::Tokenizer;

/// Errors from building a tokenizer, encoding, decoding or rendering a chat template.
#[derive(Debug, thiserror::Error)]
pub enum TextError {
    #[error("tokenizer model `{model}` is not supported (expected `gpt2` or `llama`)")]
    UnsupportedModel { model: String },
    #[error("the vocabulary is empty")]
    EmptyVocab,
    #[error("the vocabulary has {n_vocab} tokens, more than 32-bit token ids can address")]
    VocabTooLarge { n_vocab: usize },
    #[error("{field} has {len} entries but the vocabulary has {n_vocab} tokens")]
    LengthMismatch {
        field: &'static str,
        len: usize,
        n_vocab: usize,
    },
    #[error("{role} token id {id} is outside the vocabulary of {n_vocab} tokens")]
    SpecialOutOfRange {
        role: &'static str,
        id: u32,
        n_vocab: usize,
    },
    #[error("merge {rank} `{merge}` is malformed: expected two tokens separated by one space")]
    BadMerge { rank: usize, merge: String },
    #[error("merge {rank} `{merge}` names `{token}`, which is not in the vocabulary")]
    MergeUnknownToken {
        rank: usize,
        merge: String,
        token: String,
    },
    #[error("the SentencePiece vocabulary has neither merges nor scores to derive them from")]
    MissingScores,
    #[error("the pre-tokenizer pattern for `{pre}` does not compile: {message}")]
    BadPattern { pre: String, message: String },
    #[error("text of {bytes} bytes is too long to encode (at most {max})")]
    TextTooLong { bytes: usize, max: usize },
    #[error("the {count} added tokens do not build a matcher: {message}")]
    AddedTokens { count: usize, message: String },
    #[error("encoding {bytes} bytes of text ran past its deadline")]
    TimeLimit { bytes: usize },
    #[error("token id {id} is outside the vocabulary of {n_vocab} tokens")]
    InvalidId { id: u32, n_vocab: usize },
    #[error("chat template does not compile: {message}")]
    TemplateSyntax { message: String },
    #[error("chat template failed to render: {message}")]
    TemplateRender { message: String },
    /// A render ran past one of its bounds (work, nesting, output size).
    #[error("chat template stopped: it went past its limit of {limit} {what}")]
    TemplateLimit { what: &'static str, limit: u64 },
    #[error("Hugging Face tokenizer files: {message}")]
    Hf { message: String },
}
