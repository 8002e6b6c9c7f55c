//! Models and sessions, as the host offers them: safe handles over the model ABI.

use crate::{Error, check, sys};

/// A model the host configured, opened by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Model(i32);

/// A sequence on a model with its own KV cache on the host; it persists across messages.
#[derive(Debug, PartialEq, Eq)]
pub struct Session {
    handle: i32,
    vocab: usize,
}

/// Calls `f` with a buffer, growing it to the length `f` reports until everything fits.
fn grow<T: Copy + Default>(
    start: usize,
    mut f: impl FnMut(&mut [T]) -> i32,
) -> Result<Vec<T>, Error> {
    let mut buf = vec![T::default(); start];
    loop {
        let n = check(f(&mut buf))? as usize;
        if n <= buf.len() {
            buf.truncate(n);
            return Ok(buf);
        }
        buf.resize(n, T::default());
    }
}

impl Model {
    /// Opens the model the host offers under `name`.
    pub fn open(name: &str) -> Result<Model, Error> {
        check(sys::model_open(name)).map(Model)
    }

    /// The model's facts as JSON (vocab size, context length, special tokens).
    pub fn info_json(&self) -> Result<String, Error> {
        let bytes = grow(512, |buf| sys::model_info(self.0, buf))?;
        String::from_utf8(bytes).map_err(|_| Error::guest("model_info is not UTF-8"))
    }

    /// Token ids of `text` (special tokens written in it are recognized).
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>, Error> {
        grow(text.len() / 2 + 16, |ids| sys::tokenize(self.0, text, ids))
    }

    /// The raw bytes of `ids` (possibly ending inside a UTF-8 sequence).
    pub fn detokenize(&self, ids: &[u32]) -> Result<Vec<u8>, Error> {
        grow(ids.len() * 8 + 16, |out| sys::detokenize(self.0, ids, out))
    }

    /// Renders a conversation (`[{"role":..,"content":..}]` JSON) with the model's chat
    /// template, ready for the assistant's reply.
    pub fn render_chat(&self, messages_json: &str) -> Result<String, Error> {
        let bytes = grow(messages_json.len() + 256, |out| {
            sys::render_chat(self.0, messages_json, out)
        })?;
        String::from_utf8(bytes).map_err(|_| Error::guest("render_chat is not UTF-8"))
    }

    /// A new session (KV cache) of `n_ctx` positions, prompt and replies together; `vocab` is
    /// the model's vocabulary size.
    pub fn session(&self, n_ctx: u32, vocab: usize) -> Result<Session, Error> {
        let handle = check(sys::session_open(self.0, n_ctx))?;
        Ok(Session { handle, vocab })
    }
}

impl Session {
    /// Tokens in the session's cache.
    pub fn len(&self) -> Result<usize, Error> {
        check(sys::session_len(self.handle)).map(|n| n as usize)
    }

    pub fn is_empty(&self) -> Result<bool, Error> {
        self.len().map(|n| n == 0)
    }

    /// Keeps the first `len` tokens.
    pub fn rewind(&self, len: usize) -> Result<usize, Error> {
        check(sys::session_rewind(self.handle, len as u32)).map(|n| n as usize)
    }

    /// Appends `ids` and fills `logits` (`vocab` long) with the last position's logits,
    /// written by the host straight into this memory.
    pub fn forward(&self, ids: &[u32], logits: &mut [f32]) -> Result<(), Error> {
        if logits.len() != self.vocab {
            return Err(Error::guest(format!(
                "logits buffer of {} for a vocabulary of {}",
                logits.len(),
                self.vocab
            )));
        }
        check(sys::forward(self.handle, ids, logits)).map(drop)
    }

    /// Appends `ids` and fills `top` (1 to 64 long) with the last position's largest
    /// logits, largest first (ties to the smaller token), and `logits`, when given, with all
    /// of them. The host selects them (on a GPU, there), so a sampler that keeps only the
    /// top few, or greedy decoding (`top` of one), need not read the vocabulary's logits.
    pub fn forward_top(
        &self,
        ids: &[u32],
        logits: Option<&mut [f32]>,
        top: &mut [Candidate],
    ) -> Result<(), Error> {
        if logits.as_ref().is_some_and(|l| l.len() != self.vocab) {
            return Err(Error::guest(format!(
                "logits buffer for a vocabulary of {}",
                self.vocab
            )));
        }
        check(sys::forward_top(self.handle, ids, logits, top)).map(drop)
    }
}

/// One of a forward pass's largest logits: its token and value, laid out as the host writes
/// them (`u32` token, then the `f32` logit).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Candidate {
    pub token: u32,
    pub logit: f32,
}

impl Drop for Session {
    fn drop(&mut self) {
        sys::session_close(self.handle);
    }
}
