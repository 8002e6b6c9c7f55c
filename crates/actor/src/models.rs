//! The model half of the `tern` ABI: models the host configured, opened by name; sessions
//! (one KV cache each) that persist across an actor's messages; tokenizing, chat templates,
//! and `forward`, which writes logits straight into guest memory.
//!
//! | import | signature | does |
//! |---|---|---|
//! | `model_open(name, len)` | `-> handle` | opens a model the host configured, by name (`default`: the host's only model, when it offers one) |
//! | `model_info(model, out, cap)` | `-> len` | JSON: vocab size, context length, special tokens |
//! | `tokenize(model, text, len, ids, cap)` | `-> n` | UTF-8 text to token ids (`u32`); writes at most `cap` ids, returns how many there are |
//! | `detokenize(model, ids, n, out, cap)` | `-> len` | the raw bytes of token ids (may end inside a UTF-8 sequence) |
//! | `render_chat(model, json, len, out, cap)` | `-> len` | renders `[{"role","content"}...]` with the model's template, generation prompt added |
//! | `session_open(model, max_tokens)` | `-> handle` | a new KV cache |
//! | `session_close(s)`, `session_len(s)`, `session_rewind(s, n)` | `-> 0 / len / len` | |
//! | `forward(s, ids, n, logits)` | `-> 0` | appends `n` tokens; writes `f32[vocab]` logits of the last |
//! | `forward_top(s, ids, n, logits, top, k)` | `-> k` | as `forward`, and the `k` (1 to 64) largest logits as `(u32 token, f32 logit)` pairs into `top`, largest first, ties to the smaller token; `logits` 0 writes no logits (on a GPU they then never leave it) |
//!
//! Functions returning a length write at most `cap` bytes (or ids) and return the full length,
//! so a guest can retry with a larger buffer.

use std::collections::BTreeMap;
use std::sync::Arc;

use tern_model::{MAX_TOP, Model, Session};
use tern_text::Message;
use wasmtime::{Caller, Linker};

use crate::abi::with_memory;
use crate::actor::HostState;
use crate::guest_memory::{self, AbiError, GuestMemory, GuestRange};

/// The models a runtime's actors may open, by name. Loaded once, shared by every actor.
#[derive(Clone, Default)]
pub struct ModelRegistry {
    models: BTreeMap<String, Arc<Model>>,
}

impl ModelRegistry {
    pub fn insert(&mut self, model: Arc<Model>) {
        self.models.insert(model.name.clone(), model);
    }

    /// The model named `name`. `default` names the host's only model when it offers exactly
    /// one (and none is itself named `default`): what a guest asks for before it is told a name.
    pub fn get(&self, name: &str) -> Option<&Arc<Model>> {
        self.models
            .get(name)
            .or_else(|| match (name, self.models.len()) {
                ("default", 1) => self.models.values().next(),
                _ => None,
            })
    }

    pub fn names(&self) -> Vec<String> {
        self.models.keys().cloned().collect()
    }

    /// What the registry offers, for messages: its names, or "none".
    pub fn offered(&self) -> String {
        match self.names() {
            names if names.is_empty() => "none".to_string(),
            names => names.join(", "),
        }
    }
}

/// An actor's open models and sessions; handles are indices.
#[derive(Default)]
pub(crate) struct ModelState {
    pub(crate) registry: ModelRegistry,
    open: Vec<Arc<Model>>,
    sessions: Vec<Option<(usize, Session)>>,
}

/// The most sessions one actor may hold open.
pub(crate) const MAX_SESSIONS: usize = 64;

impl ModelState {
    pub(crate) fn new(registry: ModelRegistry) -> ModelState {
        ModelState {
            registry,
            ..ModelState::default()
        }
    }

    /// The models this actor opened; a model's handle is its index.
    pub(crate) fn open_models(&self) -> &[Arc<Model>] {
        &self.open
    }

    /// Session slots (a handle is an index; closed slots are `None`), each with the index
    /// of its model.
    pub(crate) fn session_slots(&self) -> &[Option<(usize, Session)>] {
        &self.sessions
    }

    /// Replaces the open models and sessions with restored ones.
    pub(crate) fn restore(
        &mut self,
        open: Vec<Arc<Model>>,
        sessions: Vec<Option<(usize, Session)>>,
    ) {
        self.open = open;
        self.sessions = sessions;
    }

    fn model(&self, handle: i32) -> Result<&Arc<Model>, AbiError> {
        usize::try_from(handle)
            .ok()
            .and_then(|h| self.open.get(h))
            .ok_or_else(|| AbiError::Invalid(format!("no open model with handle {handle}")))
    }

    fn session(&mut self, handle: i32) -> Result<(&Arc<Model>, &mut Session), AbiError> {
        let slot = usize::try_from(handle)
            .ok()
            .and_then(|h| self.sessions.get_mut(h))
            .and_then(Option::as_mut)
            .ok_or_else(|| AbiError::Invalid(format!("no open session with handle {handle}")))?;
        Ok((&self.open[slot.0], &mut slot.1))
    }
}

pub(crate) fn link(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap("tern", "model_open", model_open)?;
    linker.func_wrap("tern", "model_info", model_info)?;
    linker.func_wrap("tern", "tokenize", tokenize)?;
    linker.func_wrap("tern", "detokenize", detokenize)?;
    linker.func_wrap("tern", "render_chat", render_chat)?;
    linker.func_wrap("tern", "session_open", session_open)?;
    linker.func_wrap("tern", "session_close", session_close)?;
    linker.func_wrap("tern", "session_len", session_len)?;
    linker.func_wrap("tern", "session_rewind", session_rewind)?;
    linker.func_wrap("tern", "forward", forward)?;
    linker.func_wrap("tern", "forward_top", forward_top)?;
    Ok(())
}

fn utf8<'m>(
    mem: &'m GuestMemory<'_>,
    what: &'static str,
    ptr: u32,
    len: u32,
) -> Result<&'m str, AbiError> {
    let range = guest_memory::check(what, mem.len(), ptr, len.into(), 1, 1)?;
    std::str::from_utf8(mem.bytes(range))
        .map_err(|e| AbiError::Invalid(format!("{what} is not UTF-8: {e}")))
}

/// Writes as much of `bytes` as fits in `cap` at `out`; returns the full length.
fn write_out(
    mem: &mut GuestMemory<'_>,
    what: &'static str,
    out: u32,
    cap: u32,
    bytes: &[u8],
) -> Result<i32, AbiError> {
    let n = bytes.len().min(cap as usize);
    let range = guest_memory::check(what, mem.len(), out, n as u64, 1, 1)?;
    mem.bytes_mut(range).copy_from_slice(&bytes[..n]);
    i32::try_from(bytes.len()).map_err(|_| AbiError::Invalid(format!("{what}: result too large")))
}

fn model_error(e: tern_model::ModelError) -> AbiError {
    AbiError::Invalid(e.to_string())
}

fn model_open(mut caller: Caller<'_, HostState>, name: u32, len: u32) -> i32 {
    with_memory(&mut caller, |mem, state| {
        let name = utf8(mem, "model name", name, len)?;
        let models = &mut state.models;
        let model = models.registry.get(name).cloned().ok_or_else(|| {
            AbiError::Invalid(format!(
                "unknown model `{name}` (this host offers {})",
                models.registry.offered()
            ))
        })?;
        if let Some(i) = models.open.iter().position(|m| Arc::ptr_eq(m, &model)) {
            return Ok(i as i32);
        }
        models.open.push(model);
        Ok(models.open.len() as i32 - 1)
    })
}

fn model_info(mut caller: Caller<'_, HostState>, model: i32, out: u32, cap: u32) -> i32 {
    with_memory(&mut caller, |mem, state| {
        let info = state.models.model(model)?.info_json();
        write_out(mem, "model_info", out, cap, info.as_bytes())
    })
}

fn tokenize(
    mut caller: Caller<'_, HostState>,
    model: i32,
    text: u32,
    len: u32,
    ids: u32,
    cap: u32,
) -> i32 {
    with_memory(&mut caller, |mem, state| {
        let text = utf8(mem, "text", text, len)?;
        let tokens = state
            .models
            .model(model)?
            .tokenizer
            .encode(text, false)
            .map_err(|e| AbiError::Invalid(e.to_string()))?;
        let n = tokens.len().min(cap as usize);
        let range = guest_memory::check("ids", mem.len(), ids, n as u64, 4, 4)?;
        let out = mem.bytes_mut(range);
        for (chunk, id) in out.chunks_exact_mut(4).zip(&tokens) {
            chunk.copy_from_slice(&id.to_le_bytes());
        }
        i32::try_from(tokens.len()).map_err(|_| AbiError::Invalid("too many tokens".into()))
    })
}

/// Reads `n` token ids from guest memory.
fn read_ids(mem: &GuestMemory<'_>, ptr: u32, n: u32) -> Result<Vec<u32>, AbiError> {
    let range: GuestRange = guest_memory::check("ids", mem.len(), ptr, n.into(), 4, 4)?;
    Ok(mem
        .bytes(range)
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
        .collect())
}

fn detokenize(
    mut caller: Caller<'_, HostState>,
    model: i32,
    ids: u32,
    n: u32,
    out: u32,
    cap: u32,
) -> i32 {
    with_memory(&mut caller, |mem, state| {
        let ids = read_ids(mem, ids, n)?;
        let tokenizer = &state.models.model(model)?.tokenizer;
        let mut bytes = Vec::new();
        for id in ids {
            bytes.extend(tokenizer.token_bytes(id).ok_or_else(|| {
                AbiError::Invalid(format!("token id {id} is not in the vocabulary"))
            })?);
        }
        write_out(mem, "detokenize", out, cap, &bytes)
    })
}

fn render_chat(
    mut caller: Caller<'_, HostState>,
    model: i32,
    json: u32,
    len: u32,
    out: u32,
    cap: u32,
) -> i32 {
    with_memory(&mut caller, |mem, state| {
        let json = utf8(mem, "messages", json, len)?;
        let messages: Vec<Message> = serde_json::from_str(json)
            .map_err(|e| AbiError::Invalid(format!("messages JSON: {e}")))?;
        let text = state
            .models
            .model(model)?
            .render_chat(&messages, true)
            .map_err(model_error)?;
        write_out(mem, "render_chat", out, cap, text.as_bytes())
    })
}

fn session_open(mut caller: Caller<'_, HostState>, model: i32, max_tokens: u32) -> i32 {
    with_memory(&mut caller, |_, state| {
        let models = &mut state.models;
        let m = models.model(model)?;
        let session = m.new_session(max_tokens as usize).map_err(model_error)?;
        let index = usize::try_from(model).expect("checked by model()");
        if let Some(free) = models.sessions.iter().position(Option::is_none) {
            models.sessions[free] = Some((index, session));
            return Ok(free as i32);
        }
        if models.sessions.len() >= MAX_SESSIONS {
            return Err(AbiError::Invalid(format!(
                "at most {MAX_SESSIONS} sessions may be open"
            )));
        }
        models.sessions.push(Some((index, session)));
        Ok(models.sessions.len() as i32 - 1)
    })
}

fn session_close(mut caller: Caller<'_, HostState>, session: i32) -> i32 {
    with_memory(&mut caller, |_, state| {
        state.models.session(session)?;
        state.models.sessions[session as usize] = None;
        Ok(0)
    })
}

fn session_len(mut caller: Caller<'_, HostState>, session: i32) -> i32 {
    with_memory(&mut caller, |_, state| {
        Ok(state.models.session(session)?.1.tokens.len() as i32)
    })
}

fn session_rewind(mut caller: Caller<'_, HostState>, session: i32, len: u32) -> i32 {
    with_memory(&mut caller, |_, state| {
        let (_, s) = state.models.session(session)?;
        s.rewind(len as usize);
        Ok(s.tokens.len() as i32)
    })
}

fn forward(mut caller: Caller<'_, HostState>, session: i32, ids: u32, n: u32, logits: u32) -> i32 {
    with_memory(&mut caller, |mem, state| {
        let tokens = read_ids(mem, ids, n)?;
        let (model, s) = state.models.session(session)?;
        let vocab = model.config().n_vocab;
        let range = guest_memory::check("logits", mem.len(), logits, vocab as u64, 4, 4)?;
        let out = mem.f32_mut(range)?;
        model.forward(s, &tokens, out).map_err(model_error)?;
        Ok(0)
    })
}

/// `forward_top(session, ids, n, logits, top, k)`: appends the tokens, writes the `k` (1 to
/// [`MAX_TOP`]) largest logits of the last position to `top` as (token `u32`, logit `f32`)
/// pairs, largest first (ties to the smaller token), and all logits to `logits` unless it is
/// 0. Returns `k`. On a GPU the selection runs there, so a guest that samples from the top
/// few never reads the vocabulary's logits at all.
fn forward_top(
    mut caller: Caller<'_, HostState>,
    session: i32,
    ids: u32,
    n: u32,
    logits: u32,
    top: u32,
    k: u32,
) -> i32 {
    with_memory(&mut caller, |mem, state| {
        let tokens = read_ids(mem, ids, n)?;
        let (model, s) = state.models.session(session)?;
        let vocab = model.config().n_vocab;
        if k == 0 || k as usize > MAX_TOP.min(vocab) {
            return Err(AbiError::Invalid(format!(
                "{k} top logits asked for (1 to {})",
                MAX_TOP.min(vocab)
            )));
        }
        let logits = (logits != 0)
            .then(|| guest_memory::check("logits", mem.len(), logits, vocab as u64, 4, 4))
            .transpose()?;
        let top = guest_memory::check("top", mem.len(), top, 2 * u64::from(k), 4, 4)?;
        let (logits, top) = mem.f32_and_candidates_mut(logits, top)?;
        model
            .forward_top(s, &tokens, logits, top)
            .map_err(model_error)?;
        Ok(k as i32)
    })
}
