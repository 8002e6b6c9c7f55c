//! The model half of the `tern` ABI: models the host configured, opened by name; sessions
//! (one KV cache each) that persist across an actor's messages; tokenizing, chat templates,
//! and `forward`, which writes logits straight into guest memory.
//!
//! | import | signature | does |
//! |---|---|---|
//! | `model_open(name, len)` | `-> handle` | opens a model the host configured, by name (`default`: the host's first model) |
//! | `model_info(model, out, cap)` | `-> len` | JSON: vocab size, context length, special tokens |
//! | `tokenize(model, text, len, ids, cap)` | `-> n` | UTF-8 text to token ids (`u32`); writes at most `cap` ids, returns how many there are |
//! | `detokenize(model, ids, n, out, cap)` | `-> len` | the raw bytes of token ids (may end inside a UTF-8 sequence) |
//! | `render_chat(model, json, len, out, cap)` | `-> len` | renders `[{"role","content"}...]` with the model's template, generation prompt added |
//! | `session_open(model, n_ctx)` | `-> handle` | a new KV cache of `n_ctx` positions (the session's size, not a reply's length) |
//! | `session_close(s)`, `session_len(s)`, `session_rewind(s, n)` | `-> 0 / len / len` | |
//! | `forward(s, ids, n, logits)` | `-> 0` | appends `n` tokens; writes `f32[vocab]` logits of the last |
//! | `forward_top(s, ids, n, logits, top, k)` | `-> k` | as `forward`, and the `k` (1 to 64) largest logits as `(u32 token, f32 logit)` pairs into `top`, largest first, ties to the smaller token; `logits` 0 writes no logits (on a GPU they then never leave it) |
//!
//! Functions returning a length write at most `cap` bytes (or ids) and return the full length,
//! so a guest can retry with a larger buffer.
//!
//! Host work is bounded, since it runs outside the guest's time limit: text in and out of
//! `tokenize`, `detokenize` and `render_chat` is at most [`crate::Limits::text_bytes`]
//! (`-10` beyond), tokenizing and rendering stop at [`crate::Limits::text_time`] (`-11`), and
//! a chat template runs on bounded fuel. `session_open` reserves the session's whole KV
//! cache against the actor's and the runtime's budgets (`-9` when exhausted).

use std::sync::Arc;
use std::time::Instant;

use tern_model::{MAX_TOP, Model, Session};
use tern_text::Message;
use wasmtime::{Caller, Linker};

use crate::abi::with_memory;
use crate::actor::HostState;
use crate::budget::{KvLedger, KvReservation};
use crate::guest_memory::{self, AbiError, GuestMemory, GuestRange};
use crate::registry::ModelRegistry;

/// One open session: the index of its model among the actor's open models, the session, and
/// its share of the KV-cache budget.
pub(crate) struct SessionSlot {
    pub(crate) model: usize,
    pub(crate) session: Session,
    reservation: KvReservation,
    /// Positions whose keys and values are those of the actor's last durable snapshot: an
    /// incremental snapshot stores the session's from here on.
    pub(crate) kept: usize,
}

/// An actor's open models and sessions; handles are indices.
pub(crate) struct ModelState {
    registry: ModelRegistry,
    ledger: Arc<KvLedger>,
    /// The actor's KV-cache budget in bytes.
    kv_budget: u64,
    open: Vec<Arc<Model>>,
    sessions: Vec<Option<SessionSlot>>,
}

/// The most sessions one actor may hold open.
pub(crate) const MAX_SESSIONS: usize = 64;

/// The bytes a session of `n_ctx` positions reserves: keys and values of every layer at
/// every position, in the model's cache type.
pub(crate) fn session_kv_bytes(model: &Model, n_ctx: usize) -> u64 {
    let c = model.config();
    let value = model.kv_type().bytes() as u64;
    2 * value * c.n_layer as u64 * n_ctx as u64 * c.kv_dim() as u64
}

impl ModelState {
    pub(crate) fn new(registry: ModelRegistry, ledger: Arc<KvLedger>, kv_budget: u64) -> Self {
        ModelState {
            registry,
            ledger,
            kv_budget,
            open: Vec::new(),
            sessions: Vec::new(),
        }
    }

    /// The models this actor opened; a model's handle is its index.
    pub(crate) fn open_models(&self) -> &[Arc<Model>] {
        &self.open
    }

    /// Session slots (a handle is an index; closed slots are `None`).
    pub(crate) fn session_slots(&self) -> &[Option<SessionSlot>] {
        &self.sessions
    }

    /// Session slots, writable.
    pub(crate) fn session_slots_mut(&mut self) -> &mut [Option<SessionSlot>] {
        &mut self.sessions
    }

    /// KV-cache bytes this actor's open sessions reserve.
    pub(crate) fn kv_bytes(&self) -> u64 {
        self.sessions
            .iter()
            .flatten()
            .map(|s| s.reservation.bytes())
            .sum()
    }

    /// Reserves the budget for a session of `n_ctx` positions on `model`.
    pub(crate) fn reserve(&self, model: &Model, n_ctx: usize) -> Result<KvReservation, AbiError> {
        let bytes = session_kv_bytes(model, n_ctx);
        KvReservation::take(&self.ledger, bytes, self.kv_bytes(), self.kv_budget)
    }

    /// Replaces the open models and sessions with restored ones, each session with its
    /// reservation ([`Self::reserve`]).
    pub(crate) fn restore(
        &mut self,
        open: Vec<Arc<Model>>,
        sessions: Vec<Option<(usize, Session, KvReservation)>>,
    ) {
        self.open = open;
        self.sessions = sessions
            .into_iter()
            .map(|s| {
                s.map(|(model, session, reservation)| SessionSlot {
                    model,
                    kept: session.tokens.len(),
                    session,
                    reservation,
                })
            })
            .collect();
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
        Ok((&self.open[slot.model], &mut slot.session))
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

/// The guest's UTF-8 text at `ptr`, at most [`crate::Limits::text_bytes`] long.
fn utf8<'m>(
    mem: &'m GuestMemory<'_>,
    state: &HostState,
    what: &'static str,
    ptr: u32,
    len: u32,
) -> Result<&'m str, AbiError> {
    let range = guest_memory::check(what, mem.len(), ptr, len.into(), 1, 1)?;
    check_text_size(state, what, u64::from(len))?;
    std::str::from_utf8(mem.bytes(range))
        .map_err(|e| AbiError::Invalid(format!("{what} is not UTF-8: {e}")))
}

/// Refuses host text work on more than [`crate::Limits::text_bytes`].
fn check_text_size(state: &HostState, what: &'static str, bytes: u64) -> Result<(), AbiError> {
    let limit = state.limits.text_bytes as u64;
    if bytes > limit {
        return Err(AbiError::TooLarge { what, bytes, limit });
    }
    Ok(())
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

fn model_open(mut caller: Caller<'_, HostState>, name: u32, len: u32) -> wasmtime::Result<i32> {
    with_memory(&mut caller, "model_open", |mem, state| {
        let name = utf8(mem, state, "model name", name, len)?;
        let models = &mut state.models;
        let model = models.registry.open(name)?;
        if let Some(i) = models.open.iter().position(|m| Arc::ptr_eq(m, &model)) {
            return Ok(i as i32);
        }
        models.open.push(model);
        Ok(models.open.len() as i32 - 1)
    })
}

fn model_info(
    mut caller: Caller<'_, HostState>,
    model: i32,
    out: u32,
    cap: u32,
) -> wasmtime::Result<i32> {
    with_memory(&mut caller, "model_info", |mem, state| {
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
) -> wasmtime::Result<i32> {
    with_memory(&mut caller, "tokenize", |mem, state| {
        let text = utf8(mem, state, "text", text, len)?;
        let deadline = Instant::now() + state.limits.text_time;
        let tokens = state
            .models
            .model(model)?
            .tokenizer
            .encode_within(text, false, deadline)
            .map_err(|e| text_error(e, "tokenize", state))?;
        let n = tokens.len().min(cap as usize);
        let range = guest_memory::check("ids", mem.len(), ids, n as u64, 4, 4)?;
        let out = mem.bytes_mut(range);
        for (chunk, id) in out.chunks_exact_mut(4).zip(&tokens) {
            chunk.copy_from_slice(&id.to_le_bytes());
        }
        i32::try_from(tokens.len()).map_err(|_| AbiError::Invalid("too many tokens".into()))
    })
}

/// A text error from host work: running out of time is the host's limit, anything else
/// a bad argument.
fn text_error(e: tern_text::TextError, what: &'static str, state: &HostState) -> AbiError {
    match e {
        tern_text::TextError::TimeLimit { .. } => AbiError::TimeLimit {
            what,
            limit_ms: state.limits.text_time.as_millis(),
        },
        other => AbiError::Invalid(other.to_string()),
    }
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
) -> wasmtime::Result<i32> {
    with_memory(&mut caller, "detokenize", |mem, state| {
        // A token is at least one byte of text: more ids than the text limit cannot fit.
        check_text_size(state, "detokenize's ids", u64::from(n))?;
        let ids = read_ids(mem, ids, n)?;
        let tokenizer = &state.models.model(model)?.tokenizer;
        let mut bytes = Vec::new();
        for id in ids {
            bytes.extend(tokenizer.token_bytes(id).ok_or_else(|| {
                AbiError::Invalid(format!("token id {id} is not in the vocabulary"))
            })?);
            check_text_size(state, "detokenize's text", bytes.len() as u64)?;
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
) -> wasmtime::Result<i32> {
    with_memory(&mut caller, "render_chat", |mem, state| {
        let json = utf8(mem, state, "messages", json, len)?;
        let messages: Vec<Message> = serde_json::from_str(json)
            .map_err(|e| AbiError::Invalid(format!("messages JSON: {e}")))?;
        let model = state.models.model(model)?.clone();
        let clock = std::cell::RefCell::new(&mut state.clock);
        let text = model
            .render_chat(&messages, true, &|| clock.borrow_mut().now_unix_ms())
            .map_err(AbiError::from)?;
        check_text_size(state, "render_chat's text", text.len() as u64)?;
        write_out(mem, "render_chat", out, cap, text.as_bytes())
    })
}

fn session_open(
    mut caller: Caller<'_, HostState>,
    model: i32,
    n_ctx: u32,
) -> wasmtime::Result<i32> {
    with_memory(&mut caller, "session_open", |_, state| {
        let models = &mut state.models;
        let m = models.model(model)?;
        let index = usize::try_from(model).expect("checked by model()");
        let free = models.sessions.iter().position(Option::is_none);
        if free.is_none() && models.sessions.len() >= MAX_SESSIONS {
            return Err(AbiError::Budget {
                what: "this actor's sessions",
                needed: 1,
                in_use: MAX_SESSIONS as u64,
                limit: MAX_SESSIONS as u64,
            });
        }
        let reservation = models.reserve(m, n_ctx as usize)?;
        let session = m.new_session(n_ctx as usize)?;
        let slot = Some(SessionSlot {
            model: index,
            session,
            reservation,
            kept: 0,
        });
        match free {
            Some(free) => {
                models.sessions[free] = slot;
                Ok(free as i32)
            }
            None => {
                models.sessions.push(slot);
                Ok(models.sessions.len() as i32 - 1)
            }
        }
    })
}

fn session_close(mut caller: Caller<'_, HostState>, session: i32) -> wasmtime::Result<i32> {
    with_memory(&mut caller, "session_close", |_, state| {
        state.models.session(session)?;
        state.models.sessions[session as usize] = None;
        Ok(0)
    })
}

fn session_len(mut caller: Caller<'_, HostState>, session: i32) -> wasmtime::Result<i32> {
    with_memory(&mut caller, "session_len", |_, state| {
        Ok(state.models.session(session)?.1.tokens.len() as i32)
    })
}

fn session_rewind(
    mut caller: Caller<'_, HostState>,
    session: i32,
    len: u32,
) -> wasmtime::Result<i32> {
    with_memory(&mut caller, "session_rewind", |_, state| {
        let (_, s) = state.models.session(session)?;
        s.rewind(len as usize);
        let len = s.tokens.len();
        if let Some(Some(slot)) = state.models.sessions.get_mut(session as usize) {
            slot.kept = slot.kept.min(len);
        }
        Ok(len as i32)
    })
}

fn forward(
    mut caller: Caller<'_, HostState>,
    session: i32,
    ids: u32,
    n: u32,
    logits: u32,
) -> wasmtime::Result<i32> {
    with_memory(&mut caller, "forward", |mem, state| {
        state.check_cancelled()?;
        let tokens = read_ids(mem, ids, n)?;
        let (model, s) = state.models.session(session)?;
        let vocab = model.config().n_vocab;
        let range = guest_memory::check("logits", mem.len(), logits, vocab as u64, 4, 4)?;
        let out = mem.f32_mut(range)?;
        model.forward(s, &tokens, out)?;
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
) -> wasmtime::Result<i32> {
    with_memory(&mut caller, "forward_top", |mem, state| {
        state.check_cancelled()?;
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
        model.forward_top(s, &tokens, logits, top)?;
        Ok(k as i32)
    })
}
