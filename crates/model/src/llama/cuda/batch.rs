//! Batched steps on the GPU: several sessions' new positions through the layers together,
//! each weight matrix read once for all of them.
//!
//! A step's positions are rows of one set of activation buffers (the model's, grown to what
//! the largest step needed). Every matrix product runs over all the rows with the same
//! `matvec` kernels a session alone runs, whose result for a row never depends on the other
//! rows; each row's attention runs over its own session's cache with the same device code
//! and split as that session alone (`attention_batch`, one launch per layer, from a table of
//! one [`AttnJob`] per row); the output head takes the last row of each session that wants
//! logits and a scatter writes each one where its session's logits go. So a session's bits
//! are the same alone, beside any other sessions, and cut into any chunks (see
//! docs/numerics.md). Prompts of [`PREFILL_MIN`] positions or more run a session at a time:
//! at `Precision::Tensor` in rounds of their own of up to [`EXACT_CHUNK`] positions, with
//! the same bits; otherwise through cuBLAS GEMMs (`prefill.rs`), whose bits differ.
//!
//! Concurrent forward passes from different threads (actors) meet in a [`StepBatcher`]: one
//! of them leads a step over all that wait, the others sleep until their result is there.

use tern_compute::cuda::cudarc::driver::{CudaEvent, CudaSlice, DevicePtr};

use super::kernels::{Fuse, Launcher, MMA_MAX_TOKENS, TopJob, top_k_many_scratch};
use super::prefill::{self, PREFILL_CHUNK, PREFILL_MIN};
use super::session::{ActBuffers, Slots, enqueue_layers, from_pairs};
use super::{ATTN_SPLIT, CudaLlama, CudaSession, Held, MAX_CHUNK, driver};
use crate::ModelError;
use crate::steps::{Budget, StepJob};
use crate::top::{Candidate, MAX_TOP};

/// Sessions one batched step's round takes at most (more are run in several rounds).
pub const MAX_SESSIONS: usize = 64;

/// Positions of a long prompt one round takes at `Precision::Tensor`: every product over
/// all of them in one launch (`MMA_MAX_TOKENS`), whose result for a position is the one it
/// gets alone; attention after every position's key and value are in the cache, each
/// position's query over the positions before it and its own as a decode step takes it,
/// all in one launch where the round's shared scratch holds their slots ([`RoundScratch`]),
/// else [`MAX_CHUNK`] a launch in the session's own. So a prompt gives the bits of the same
/// tokens decoded one by one, however it is cut.
pub(super) const EXACT_CHUNK: usize = MMA_MAX_TOKENS as usize;

/// What one scheduled step takes: a long prompt's tensor-core chunk and every other
/// session's next positions beside it.
pub(super) const STEP_BUDGET: Budget = Budget {
    tokens: PREFILL_CHUNK + MAX_SESSIONS * MAX_CHUNK,
    jobs: MAX_SESSIONS,
};

/// Sets of [`MAX_SESSIONS`] slots of the model's greedy selections ([`Slots`]): those of the
/// step enqueued ahead that a step claims, that step's own, and those of the step it
/// enqueues ahead in turn.
const AHEAD_SETS: usize = 3;

/// Index of the model's slot for item `i` of a step in set `set` (see [`AHEAD_SETS`]).
fn slot(set: usize, i: usize) -> usize {
    set * MAX_SESSIONS + i
}

/// A batched greedy step enqueued ahead of its calls: after a step of several greedy decode
/// steps (one token each, the top logit alone), each session's next position, of the token
/// that step selected, so that the GPU runs it while the callers look at their tokens and
/// come back. A later step takes a session's row when its caller brings that token at that
/// position (the same bits: a position's result never depends on the sessions beside it);
/// what a row not taken wrote stays past its session's positions, and a session changed in
/// between leaves its row ([`CudaSession::drop_ahead`]).
pub(super) struct BatchAhead {
    /// Unique to this step; its sessions hold it with their row (`CudaSession::batch_ahead`).
    mark: u64,
    /// Each row's position and the token it ran there.
    rows: Vec<(usize, u32)>,
    /// The set of slots its selections land in.
    set: usize,
    done: CudaEvent,
}

impl Drop for BatchAhead {
    // Its selections land in the model's page-locked slots: it ends before they can be freed
    // (an error here means the context is gone, and the work with it).
    fn drop(&mut self) {
        let _ = self.done.synchronize();
    }
}

/// One query of a batched step, laid out as `llama.cu`'s `AttnJob`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct AttnJob {
    pub k_cache: u64,
    pub v_cache: u64,
    pub layer: u64,
    pub part_o: u64,
    pub part_ml: u64,
    pub tickets: u64,
    pub step0: i32,
    pub t: u32,
    pub first: u32,
    pub n_split: u32,
}

/// Where queries keep their attention scratch (see `attention.cuh`): each query's slot of
/// its heads' splits' unnormalized outputs (`part_o`), maxima and sums (`part_ml`) and merge
/// tickets, slots of `n_split` splits a head laid out one after another.
#[derive(Clone, Copy, Debug)]
pub(super) struct QueryScratch {
    pub part_o: u64,
    pub part_ml: u64,
    pub tickets: u64,
    pub n_split: u32,
}

/// Floats of a long prompt's round's shared attention outputs ([`RoundScratch`]): 64 MiB,
/// so that a round of [`EXACT_CHUNK`] positions of a shape of 32 heads of 64 takes one
/// attention launch a layer up to about 7,900 positions.
const ROUND_SCRATCH_O: usize = 16 << 20;

/// The attention scratch of a long prompt's round ([`EXACT_CHUNK`] positions of one
/// session): up to [`EXACT_CHUNK`] queries' slots, as many as fit for the round's splits.
struct RoundScratch {
    part_o: CudaSlice<f32>,
    part_ml: CudaSlice<f32>,
    tickets: CudaSlice<u32>, // zero between launches
}

/// One session's part of a step on the GPU.
pub(super) struct Item<'a> {
    pub session: &'a mut CudaSession,
    pub tokens: &'a [u32],
    /// Where the last position's logits go, if the caller wants them on the host.
    pub logits: Option<&'a mut [f32]>,
    /// Where the last position's `top.len()` largest logits go.
    pub top: &'a mut [Candidate],
    /// Whether the last position's logits are computed at all (a scheduled job's chunks
    /// before its last want none).
    pub out: bool,
}

impl Item<'_> {
    /// The token of a greedy decode step (one token, its top logit alone), if this is one.
    fn greedy(&self) -> Option<u32> {
        match (self.tokens, self.top.len(), &self.logits, self.out) {
            (&[token], 1, None, true) => Some(token),
            _ => None,
        }
    }
}

/// Device buffers of batched steps, made on the first and grown as steps need.
pub(super) struct BatchBuffers {
    /// Positions the activation buffers hold, and logits rows.
    rows: usize,
    outs: usize,
    act: ActBuffers,
    /// The step's plan: its attention jobs, token ids, the rows whose logits are wanted and
    /// where each goes (see [`Plan`]).
    plan: CudaSlice<u8>,
    logits: CudaSlice<f32>,
    /// Made by the first long prompt's round on tensor cores.
    round_scratch: Option<RoundScratch>,
}

/// Byte offsets of a plan's parts for `rows` positions and `outs` logits rows: the attention
/// jobs, the token ids, the rows whose logits are wanted, where each goes, and (for a step
/// enqueued ahead, see [`BatchAhead`]) where each row's token is to be taken from.
struct Plan {
    ids: usize,
    out_rows: usize,
    dsts: usize,
    srcs: usize,
    bytes: usize,
}

impl Plan {
    fn of(rows: usize, outs: usize) -> Plan {
        let ids = rows * size_of::<AttnJob>();
        let out_rows = (ids + 4 * rows).next_multiple_of(16);
        let dsts = (out_rows + 4 * outs).next_multiple_of(16);
        let srcs = (dsts + 8 * outs).next_multiple_of(16);
        Plan {
            ids,
            out_rows,
            dsts,
            srcs,
            bytes: srcs + 8 * rows,
        }
    }
}

impl BatchBuffers {
    /// Buffers for at least `rows` positions and `outs` logits rows: `have`'s, or new ones
    /// as large as both.
    fn fit<'a>(
        model: &CudaLlama,
        have: &'a mut Option<BatchBuffers>,
        rows: usize,
        outs: usize,
    ) -> Result<&'a mut BatchBuffers, ModelError> {
        if let Some(b) = have.as_ref()
            && (b.rows < rows || b.outs < outs)
        {
            *have = None;
        }
        if have.is_none() {
            let rows = rows.next_multiple_of(64);
            let outs = outs.next_multiple_of(16);
            let c = &model.config;
            let s = &model.stream;
            let alloc = |n: usize| {
                s.alloc_zeros::<f32>(n)
                    .map_err(driver("allocating a batched step"))
            };
            *have = Some(BatchBuffers {
                rows,
                outs,
                act: ActBuffers::new(s, c, rows, "allocating a batched step")?,
                plan: s
                    .alloc_zeros::<u8>(Plan::of(rows, outs).bytes)
                    .map_err(driver("allocating a batched step"))?,
                logits: alloc(outs * c.n_vocab)?,
                round_scratch: None,
            });
        }
        Ok(have.as_mut().expect("made above"))
    }

    fn ptr<T>(&self, model: &CudaLlama, slice: &CudaSlice<T>) -> u64 {
        slice.device_ptr(&model.stream).0
    }

    /// The round's shared attention scratch laid out for `n_split` splits a head, and how
    /// many queries' slots it holds (at most [`EXACT_CHUNK`]); made on first use.
    fn round_scratch(
        &mut self,
        model: &CudaLlama,
        n_split: usize,
    ) -> Result<(QueryScratch, usize), ModelError> {
        let c = &model.config;
        if self.round_scratch.is_none() {
            let s = &model.stream;
            let zeros = |n: usize| {
                s.alloc_zeros::<f32>(n)
                    .map_err(driver("allocating a long prompt's attention scratch"))
            };
            self.round_scratch = Some(RoundScratch {
                part_o: zeros(ROUND_SCRATCH_O)?,
                part_ml: zeros(ROUND_SCRATCH_O / 16)?,
                tickets: s
                    .alloc_zeros::<u32>(EXACT_CHUNK * c.n_head)
                    .map_err(driver("allocating a long prompt's attention scratch"))?,
            });
        }
        let r = self.round_scratch.as_ref().expect("made above");
        let head = c.n_head * n_split.max(1);
        let slots = (ROUND_SCRATCH_O / (head * c.head_dim))
            .min(ROUND_SCRATCH_O / 16 / (head * 2))
            .min(EXACT_CHUNK);
        let scratch = QueryScratch {
            part_o: self.ptr(model, &r.part_o),
            part_ml: self.ptr(model, &r.part_ml),
            tickets: self.ptr(model, &r.tickets),
            n_split: n_split as u32,
        };
        Ok((scratch, slots))
    }
}

/// Device buffers of several sessions' top-logit selections made together: the table of
/// [`TopJob`]s, the kernels' scratch, and the selections bound for host memory ([`MAX_TOP`]
/// pairs a job), made on the first and grown as steps need.
pub(super) struct TopBuffers {
    jobs: usize,
    table: CudaSlice<u8>,
    cand: CudaSlice<u64>,
    out: CudaSlice<u32>,
}

impl TopBuffers {
    /// Enqueues every selection of `jobs` ((logits, k, where the GPU may write the result)),
    /// one launch of each kernel for all; a job without a destination leaves its result in
    /// the buffers, for [`TopBuffers::read`] once the stream has run.
    fn enqueue<'a>(
        model: &CudaLlama,
        have: &'a mut Option<TopBuffers>,
        jobs: &[(u64, usize, Option<u64>)],
    ) -> Result<&'a mut TopBuffers, ModelError> {
        if have.as_ref().is_some_and(|b| b.jobs < jobs.len()) {
            *have = None;
        }
        let s = &model.stream;
        let n = model.config.n_vocab;
        if have.is_none() {
            let n_jobs = jobs.len().next_multiple_of(16);
            let fail = driver("allocating top-logit selections");
            *have = Some(TopBuffers {
                jobs: n_jobs,
                table: s.alloc_zeros(n_jobs * size_of::<TopJob>()).map_err(&fail)?,
                cand: s
                    .alloc_zeros(top_k_many_scratch(n, n_jobs))
                    .map_err(&fail)?,
                out: s.alloc_zeros(n_jobs * 2 * MAX_TOP).map_err(&fail)?,
            });
        }
        let b = have.as_mut().expect("made above");
        let out = b.out.device_ptr(s).0;
        let table: Vec<TopJob> = jobs
            .iter()
            .enumerate()
            .map(|(j, &(logits, k, dst))| TopJob {
                logits,
                out: dst.unwrap_or(out + (j * 2 * MAX_TOP * 4) as u64),
                k: k as u32,
                pad: 0,
            })
            .collect();
        let bytes = TopJob::bytes(&table);
        s.memcpy_htod(bytes, &mut b.table.slice_mut(..bytes.len()))
            .map_err(driver("setting top-logit selections"))?;
        let run = Launcher {
            kernels: &model.kernels,
            stream: s,
        };
        let (table, cand) = (b.table.device_ptr(s).0, b.cand.device_ptr(s).0);
        run.top_k_many(table, jobs.len() as u32, n as u32, cand)?;
        Ok(b)
    }

    /// The results left here by the first `jobs` jobs of [`TopBuffers::enqueue`] ([`MAX_TOP`]
    /// (token, logit bits) pairs a job), once the stream has run them.
    fn read(&self, model: &CudaLlama, jobs: usize) -> Result<Vec<u32>, ModelError> {
        let mut pairs = vec![0u32; jobs * 2 * MAX_TOP];
        model
            .stream
            .memcpy_dtoh(&self.out.slice(..pairs.len()), &mut pairs)
            .map_err(driver("copying the top logits"))?;
        Ok(pairs)
    }
}

/// One session's positions in a round: at most [`MAX_CHUNK`], and where the last one's
/// logits go (if wanted). A part alone in its round may hold up to [`EXACT_CHUNK`]: its
/// keys and values are then stored first and its queries' attention runs as
/// [`EXACT_CHUNK`] says.
struct Part<'s, 't> {
    session: &'s mut CudaSession,
    tokens: &'t [u32],
    out: Option<u64>,
}

/// Enqueues one round: every part's positions through every layer together, the logits of
/// each part that wants them written to its address. The caller holds the model. `mark` is
/// told each kernel's name (or a layer phase's) after it is enqueued. With `ids_from`, each
/// row's token id is read on the GPU from the pair at that row's address there (a step
/// enqueued ahead: the parts' tokens are placeholders).
fn round(
    model: &CudaLlama,
    have: &mut Option<BatchBuffers>,
    parts: &mut [Part<'_, '_>],
    mark: &mut dyn FnMut(&'static str) -> Result<(), ModelError>,
    ids_from: Option<&[u64]>,
) -> Result<(), ModelError> {
    let c = &model.config;
    let w = &model.weights;
    let rows: usize = parts.iter().map(|p| p.tokens.len()).sum();
    let outs = parts.iter().filter(|p| p.out.is_some()).count();
    let b = BatchBuffers::fit(model, have, rows, outs)?;
    let plan = Plan::of(b.rows, b.outs);
    let mut bytes = vec![0u8; plan.bytes];
    let grouped = rows > MAX_CHUNK * parts.len();
    if grouped && parts.len() != 1 {
        return Err(ModelError::Invalid(format!(
            "a round of {} sessions with one of more than {MAX_CHUNK} positions",
            parts.len()
        )));
    }
    // A grouped part's queries each take a slot of the round's scratch, all in one launch
    // where that many slots fit, else of the session's own, MAX_CHUNK a launch.
    let (scratch, per_launch) = match grouped {
        true => {
            let session = &parts[0].session;
            let (round, slots) =
                b.round_scratch(model, (session.len + rows - 1) / ATTN_SPLIT + 1)?;
            match slots > MAX_CHUNK {
                true => (Some(round), slots.min(rows)),
                false => (Some(session.own_scratch()), MAX_CHUNK),
            }
        }
        false => (None, rows.max(1)),
    };
    let (mut first, mut n_split, mut out) = (0, 0, 0);
    for p in parts.iter() {
        for (i, &token) in p.tokens.iter().enumerate() {
            let job = match scratch {
                Some(s) => p.session.attn_job_alone(c, s, i % per_launch, first + i, i),
                None => p.session.attn_job(c, i, first, 0),
            };
            n_split = n_split.max((job.step0 as u32 + job.t) / ATTN_SPLIT as u32 + 1);
            let at = (first + i) * size_of::<AttnJob>();
            bytes[at..at + size_of::<AttnJob>()].copy_from_slice(job_bytes(&job));
            let at = plan.ids + 4 * (first + i);
            bytes[at..at + 4].copy_from_slice(&(token as i32).to_le_bytes());
        }
        first += p.tokens.len();
        if let Some(dst) = p.out {
            let at = plan.out_rows + 4 * out;
            bytes[at..at + 4].copy_from_slice(&((first - 1) as i32).to_le_bytes());
            let at = plan.dsts + 8 * out;
            bytes[at..at + 8].copy_from_slice(&dst.to_le_bytes());
            out += 1;
        }
    }
    if let Some(srcs) = ids_from {
        for (i, src) in srcs.iter().take(rows).enumerate() {
            let at = plan.srcs + 8 * i;
            bytes[at..at + 8].copy_from_slice(&src.to_le_bytes());
        }
    }
    model
        .stream
        .memcpy_htod(&bytes, &mut b.plan.slice_mut(..plan.bytes))
        .map_err(driver("setting a batched step"))?;
    let run = Launcher {
        kernels: &model.kernels,
        stream: &model.stream,
    };
    let acts = b.act.acts(&model.stream);
    let base = b.ptr(model, &b.plan);
    if ids_from.is_some() {
        run.next_ids(base + plan.srcs as u64, base + plan.ids as u64, rows as u32)?;
    }
    let (n, e) = (rows as u32, c.n_embd as u32);
    run.get_rows(&w.token_embd, base + plan.ids as u64, acts.x, n)?;
    run.rmsnorm(
        acts.x,
        w.layers[0].attn_norm,
        acts.xb,
        n,
        e,
        c.rms_eps,
        false,
    )?;
    mark("embedding, norm")?;
    let mut attention = |l: usize| {
        // A grouped part's keys and values first, which its queries then read from the cache
        // as a decode step's query reads those before its own.
        if grouped {
            run.append_kv(c, n, acts.qkv, base, l as u32, w.inv_freq)?;
        }
        for (from, to) in attention_launches(rows, per_launch) {
            run.attention_batch(
                c,
                (to - from) as u32,
                n_split,
                acts.qkv,
                base + (from * size_of::<AttnJob>()) as u64,
                l as u32,
                w.inv_freq,
                acts.att,
                grouped || rows == parts.len(),
                !grouped && rows == parts.len(),
                &w.layers[l].wo,
            )?;
        }
        Ok(())
    };
    enqueue_layers(model, &run, acts, rows, &mut attention, mark)?;
    if outs > 0 {
        let (outs, vocab) = (outs as u32, c.n_vocab as u32);
        let rows_at = base + plan.out_rows as u64;
        run.rmsnorm_rows(acts.x, rows_at, outs, w.output_norm, acts.xb, e, c.rms_eps)?;
        let whole = Fuse {
            whole_rows: true,
            ..Fuse::default()
        };
        let logits = b.ptr(model, &b.logits);
        run.product(&w.output, acts.xb, logits, outs, e, vocab, 0, whole)?;
        mark("output head")?;
        run.scatter_rows(logits, base + plan.dsts as u64, outs, vocab)?;
        mark("logits scattered")?;
    }
    for p in parts.iter_mut() {
        p.session.drop_ahead();
        p.session.len += p.tokens.len();
    }
    Ok(())
}

/// The rows of a round's attention launches: `per_launch` a launch (the last the rest).
/// Position `i` of a grouped part takes slot `i % per_launch` of its scratch, distinct
/// within each launch.
fn attention_launches(rows: usize, per_launch: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..rows)
        .step_by(per_launch.max(1))
        .map(move |from| (from, rows.min(from + per_launch.max(1))))
}

/// A job's bytes as `llama.cu` reads them.
fn job_bytes(job: &AttnJob) -> &[u8] {
    // SAFETY: `AttnJob` is `repr(C)` plain integers with no padding (six u64, then four
    // 4-byte fields: 64 bytes), so all of its bytes are initialized.
    unsafe { std::slice::from_raw_parts(std::ptr::from_ref(job).cast(), size_of::<AttnJob>()) }
}

impl CudaLlama {
    /// Times each kernel of one batched decode step: `tokens[i]` after `sessions[i]`'s
    /// positions, every session's logits and top logit (with an event after each kernel or
    /// layer phase, outside any graph), leaving the sessions as they were; each name's total
    /// in microseconds, in the order first seen.
    pub fn profile_batch(
        &self,
        sessions: &mut [&mut CudaSession],
        tokens: &[u32],
    ) -> Result<Vec<(&'static str, f64)>, ModelError> {
        if sessions.len() != tokens.len() || !(2..=MAX_SESSIONS).contains(&sessions.len()) {
            return Err(ModelError::Invalid(format!(
                "a batched step of {} sessions and {} tokens (2 to {MAX_SESSIONS} of each)",
                sessions.len(),
                tokens.len()
            )));
        }
        if let Some(full) = sessions.iter().find(|s| s.len >= s.n_ctx) {
            return Err(ModelError::Invalid(format!(
                "a session of {} positions holds {} already",
                full.n_ctx, full.len
            )));
        }
        let mut busy = self.hold()?;
        let lens: Vec<usize> = sessions.iter().map(|s| s.len).collect();
        let times = super::session::timed(self, |mark| {
            let mut parts: Vec<Part<'_, '_>> = sessions
                .iter_mut()
                .zip(tokens)
                .map(|(session, token)| {
                    let out = Some(session.logits_ptr());
                    Part {
                        session,
                        tokens: std::slice::from_ref(token),
                        out,
                    }
                })
                .collect();
            round(self, &mut busy.batch, &mut parts, mark, None)?;
            let jobs: Vec<_> = parts
                .iter()
                .map(|p| (p.session.logits_ptr(), 1, None))
                .collect();
            TopBuffers::enqueue(self, &mut busy.tops, &jobs)?;
            mark("top logits")
        });
        for (session, len) in sessions.iter_mut().zip(lens) {
            session.truncate(len);
        }
        times
    }

    /// Times each kernel of one round of a long prompt's `tokens` (more than [`MAX_CHUNK`], at
    /// most [`EXACT_CHUNK`]) after `session`'s positions as `Precision::Tensor` runs it (the
    /// tensor-core products over all of them, attention as [`EXACT_CHUNK`] says; an event
    /// after each kernel or layer phase, outside any graph), leaving the session as it was;
    /// each name's total in microseconds, in the order first seen.
    pub fn profile_exact_chunk(
        &self,
        session: &mut CudaSession,
        tokens: &[u32],
    ) -> Result<Vec<(&'static str, f64)>, ModelError> {
        if tokens.len() <= MAX_CHUNK
            || tokens.len() > EXACT_CHUNK
            || session.len + tokens.len() > session.n_ctx
        {
            return Err(ModelError::Invalid(format!(
                "a chunk of {} positions ({} to {EXACT_CHUNK}) after {} in a session of {}",
                tokens.len(),
                MAX_CHUNK + 1,
                session.len,
                session.n_ctx
            )));
        }
        let mut busy = self.hold()?;
        let len = session.len;
        let times = super::session::timed(self, |mark| {
            let out = Some(session.logits_ptr());
            let mut part = [Part {
                session: &mut *session,
                tokens,
                out,
            }];
            round(self, &mut busy.batch, &mut part, mark, None)
        });
        session.truncate(len);
        times
    }

    /// Appends each item's tokens to its session and writes the outputs it asks for, as
    /// [`CudaLlama::forward_top`] would for each alone (the same bits): long prompts' chunks
    /// on tensor cores a session at a time, then every session's remaining positions
    /// [`MAX_CHUNK`] at a time, all sessions together, in rounds. The items are checked
    /// before any runs; a session may appear once. A step of several greedy decode steps
    /// (one token each, its top logit alone) also enqueues the next one ahead of its calls
    /// ([`BatchAhead`]), and an item that brings the token that one ran takes its result.
    pub(super) fn step_items(&self, items: &mut [Item<'_>]) -> Result<(), ModelError> {
        for item in items.iter() {
            self.check_item(item.session, item.tokens, item.logits.as_deref(), item.top)?;
        }
        let mut held = self.hold()?;
        let busy = &mut *held;
        // Each item that the step enqueued ahead ran already: its row there.
        let ahead = busy.ahead.take();
        let greedy: Vec<Option<u32>> = items.iter().map(Item::greedy).collect();
        let claimed: Vec<Option<usize>> = items
            .iter()
            .zip(&greedy)
            .map(|(item, &token)| {
                let (a, (mark, row)) = (ahead.as_ref()?, item.session.batch_ahead?);
                (mark == a.mark && a.rows[row] == (item.session.len, token?)).then_some(row)
            })
            .collect();
        let any_claimed = claimed.iter().any(Option::is_some);
        // A lone greedy decode step: with the next one run ahead of its call.
        if !any_claimed
            && let [item] = items
            && let (Some(token), [top]) = (greedy[0], &mut *item.top)
        {
            return item.session.greedy(self, token, top);
        }
        // Sets of the model's slots: the claimed selections', this step's where the next
        // step goes ahead, and the next step's (distinct, as each is read after the wait
        // while the step ahead may write its own).
        let claimed_set = ahead
            .as_ref()
            .filter(|_| any_claimed)
            .map_or(AHEAD_SETS - 1, |a| a.set);
        let this_set = (claimed_set + 1) % AHEAD_SETS;
        let next_set = (claimed_set + 2) % AHEAD_SETS;
        let go_ahead = (2..=MAX_SESSIONS).contains(&items.len())
            && greedy.iter().all(Option::is_some)
            && items.iter().all(|i| i.session.len + 1 < i.session.n_ctx);
        if (go_ahead || any_claimed) && busy.slots.is_none() {
            busy.slots = Some(Slots::new(self, AHEAD_SETS * MAX_SESSIONS)?);
        }
        let mut at = vec![0usize; items.len()];
        for ((item, row), at) in items.iter_mut().zip(&claimed).zip(&mut at) {
            if row.is_some() {
                item.session.len += 1;
                item.session.batch_ahead = None;
                *at = item.tokens.len();
            }
        }
        let sees = |ptr: usize, bytes: usize| {
            self.device
                .as_cuda()
                .is_some_and(|gpu| gpu.sees(ptr, bytes))
        };
        // Where each item's logits go: the caller's buffer when the GPU sees it, else the
        // session's own (copied out at the end).
        let dsts: Vec<(u64, bool)> = items
            .iter()
            .map(|item| match item.logits.as_deref() {
                Some(l) if sees(l.as_ptr() as usize, size_of_val(l)) => (l.as_ptr() as u64, true),
                _ => (item.session.logits_ptr(), false),
            })
            .collect();
        // Long prompts chunk by chunk, a session at a time: at `Precision::Tensor` through
        // the tensor-core products of every step (the bits of one token at a time), else
        // through cuBLAS GEMMs; where neither can run, the rounds below take them.
        for (i, item) in items.iter_mut().enumerate() {
            while item.tokens.len() - at[i] >= PREFILL_MIN {
                if self.tensor_cores() {
                    let n = (item.tokens.len() - at[i]).min(EXACT_CHUNK);
                    let last = at[i] + n == item.tokens.len();
                    let mut part = [Part {
                        session: &mut *item.session,
                        tokens: &item.tokens[at[i]..at[i] + n],
                        out: (last && item.out).then_some(dsts[i].0),
                    }];
                    round(self, &mut busy.batch, &mut part, &mut |_| Ok(()), None)?;
                    at[i] += n;
                    continue;
                }
                let Ok(prefill) = self.prefill(&mut busy.prefill) else {
                    break;
                };
                let n = (item.tokens.len() - at[i]).min(PREFILL_CHUNK);
                let last = at[i] + n == item.tokens.len();
                let out = (last && item.out).then_some(dsts[i].0);
                let chunk = &item.tokens[at[i]..at[i] + n];
                item.session
                    .prefill_chunk(self, prefill, chunk, out, &mut |_| Ok(()))?;
                at[i] += n;
            }
        }
        // The rest in rounds of up to MAX_CHUNK positions of every session.
        loop {
            let mut parts: Vec<Part<'_, '_>> = Vec::new();
            for (i, item) in items.iter_mut().enumerate() {
                let n = (item.tokens.len() - at[i]).min(MAX_CHUNK);
                if n == 0 {
                    continue;
                }
                let last = at[i] + n == item.tokens.len();
                parts.push(Part {
                    session: &mut *item.session,
                    tokens: &item.tokens[at[i]..at[i] + n],
                    out: (last && item.out).then_some(dsts[i].0),
                });
                at[i] += n;
            }
            match parts.as_mut_slice() {
                [] => break,
                // One session alone: its own buffers, and its decode graph for one token.
                [one] => match (one.tokens, one.out) {
                    (&[token], Some(dst)) => one.session.decode(self, token, dst)?,
                    (tokens, out) => one.session.run_chunk(self, tokens, out)?,
                },
                many => {
                    for group in many.chunks_mut(MAX_SESSIONS) {
                        round(self, &mut busy.batch, group, &mut |_| Ok(()), None)?;
                    }
                }
            }
        }
        // Every selection enqueued first, then one wait, then the copies the GPU could not
        // write itself: a copy waits for the stream, so copying between the launches would
        // wait once per session.
        let mut jobs = Vec::new();
        // Per item: the index of its job whose result is copied to the host after the wait.
        let mut copy_top = vec![None; items.len()];
        for (i, (item, &(dst, _))) in items.iter().zip(&dsts).enumerate() {
            if !item.out || item.top.is_empty() || claimed[i].is_some() {
                continue;
            }
            // Where the next step goes ahead, it takes its tokens from the model's slots.
            let out = match (go_ahead, &busy.slots) {
                (true, Some(slots)) => Some(slots.ptr(slot(this_set, i))),
                _ => {
                    let direct = sees(item.top.as_ptr() as usize, size_of_val(item.top));
                    if !direct {
                        copy_top[i] = Some(jobs.len());
                    }
                    direct.then_some(item.top.as_ptr() as u64)
                }
            };
            jobs.push((i, (dst, item.top.len(), out)));
        }
        // One selection in the session's own buffers; several in one launch of each kernel.
        let together = match jobs.as_slice() {
            [] => false,
            &[(i, (dst, k, out))] => {
                items[i].session.enqueue_top_k(self, dst, k, out)?;
                false
            }
            _ => {
                let table: Vec<_> = jobs.iter().map(|&(_, job)| job).collect();
                TopBuffers::enqueue(self, &mut busy.tops, &table)?;
                true
            }
        };
        let done = self
            .stream
            .record_event(None)
            .map_err(driver("recording an event"))?;
        let next = match (go_ahead, &busy.slots) {
            (true, Some(slots)) => {
                let srcs: Vec<u64> = claimed
                    .iter()
                    .enumerate()
                    .map(|(i, row)| match row {
                        Some(row) => slots.ptr(slot(claimed_set, *row)),
                        None => slots.ptr(slot(this_set, i)),
                    })
                    .collect();
                Some(self.enqueue_ahead(busy, items, &srcs, next_set)?)
            }
            _ => None,
        };
        done.synchronize()
            .map_err(driver("running the forward pass"))?;
        let pairs = match &busy.tops {
            Some(tops) if together && copy_top.iter().any(Option::is_some) => {
                tops.read(self, jobs.len())?
            }
            _ => Vec::new(),
        };
        for (i, (item, &(_, direct))) in items.iter_mut().zip(&dsts).enumerate() {
            match (claimed[i], copy_top[i], together, &busy.slots) {
                (Some(row), _, _, Some(slots)) => item.top[0] = slots.read(slot(claimed_set, row)),
                (None, _, _, Some(slots)) if go_ahead => {
                    item.top[0] = slots.read(slot(this_set, i))
                }
                (_, Some(_), false, _) => item.session.read_top(item.top)?,
                (_, Some(j), true, _) => from_pairs(item.top, &pairs[j * 2 * MAX_TOP..]),
                _ => {}
            }
            if let Some(l) = item.logits.as_deref_mut()
                && item.out
                && !direct
            {
                item.session.read_logits(&self.stream, l)?;
            }
        }
        if let Some(mut next) = next {
            for (i, item) in items.iter_mut().enumerate() {
                next.rows[i].1 = item.top[0].token;
                item.session.batch_ahead = Some((next.mark, i));
            }
            busy.ahead = Some(next);
        }
        Ok(())
    }

    /// Enqueues the step ahead of a step of greedy `items` (see [`BatchAhead`]): each item's
    /// session's next position, of the token in the pair at `srcs[i]` (its selection in the
    /// step before), its own selection into its slot of set `set`.
    fn enqueue_ahead(
        &self,
        busy: &mut Held,
        items: &mut [Item<'_>],
        srcs: &[u64],
        set: usize,
    ) -> Result<BatchAhead, ModelError> {
        const PLACEHOLDER: [u32; 1] = [0];
        let mut parts: Vec<Part<'_, '_>> = items
            .iter_mut()
            .map(|item| {
                let out = Some(item.session.logits_ptr());
                Part {
                    session: &mut *item.session,
                    tokens: &PLACEHOLDER,
                    out,
                }
            })
            .collect();
        round(
            self,
            &mut busy.batch,
            &mut parts,
            &mut |_| Ok(()),
            Some(srcs),
        )?;
        let slots = busy
            .slots
            .as_ref()
            .ok_or_else(|| ModelError::Invalid("a step ahead without the model's slots".into()))?;
        let jobs: Vec<_> = parts
            .iter_mut()
            .enumerate()
            .map(|(i, p)| {
                // The positions stay the callers' to take.
                p.session.len -= 1;
                (p.session.logits_ptr(), 1, Some(slots.ptr(slot(set, i))))
            })
            .collect();
        TopBuffers::enqueue(self, &mut busy.tops, &jobs)?;
        let done = self
            .stream
            .record_event(None)
            .map_err(driver("recording an event"))?;
        busy.marks += 1;
        Ok(BatchAhead {
            mark: busy.marks,
            rows: parts.iter().map(|p| (p.session.len, u32::MAX)).collect(),
            set,
            done,
        })
    }

    /// Refuses `tokens` for `session` (with outputs `logits` and `top`) that a step cannot
    /// run.
    pub(super) fn check_item(
        &self,
        session: &CudaSession,
        tokens: &[u32],
        logits: Option<&[f32]>,
        top: &[Candidate],
    ) -> Result<(), ModelError> {
        let c = &self.config;
        super::super::check_forward(c, session.len, session.n_ctx, tokens, logits)?;
        super::check_top(c.n_vocab, top.len())
    }

    /// One step's jobs of the scheduler, each its next chunk, together.
    pub(super) fn step_jobs(&self, jobs: &mut [CudaJob]) {
        let chunks: Vec<usize> = jobs.iter().map(StepJob::next_tokens).collect();
        let mut items = Vec::with_capacity(jobs.len());
        for (job, &n) in jobs.iter_mut().zip(&chunks) {
            let last = job.at + n == job.tokens.len();
            // SAFETY: see `CudaJob`: the pointers are the caller's borrows, alive and used by
            // this thread alone until the job is done.
            let (session, tokens) = unsafe { (&mut *job.session, &*job.tokens) };
            let (logits, top) = match last {
                // SAFETY: as above.
                true => unsafe { (job.logits.map(|l| &mut *l), &mut *job.top) },
                false => (None, &mut [][..]),
            };
            items.push(Item {
                session,
                tokens: &tokens[job.at..job.at + n],
                logits,
                top,
                out: last,
            });
        }
        let result = self.step_items(&mut items);
        drop(items);
        for (job, n) in jobs.iter_mut().zip(chunks) {
            match &result {
                Ok(()) => job.at += n,
                Err(e) => job.failed = Some(e.to_string()),
            }
        }
    }
}

/// One forward pass waiting for (or in) the scheduler's steps: its caller's session, tokens
/// and outputs, as raw pointers.
pub(super) struct CudaJob {
    pub session: *mut CudaSession,
    pub tokens: *const [u32],
    pub logits: Option<*mut [f32]>,
    pub top: *mut [Candidate],
    /// Tokens already run.
    pub at: usize,
    pub failed: Option<String>,
}

// SAFETY: a job's pointers come from `&mut` borrows that its caller holds across
// `StepBatcher::run`, which returns only once the job is done; meanwhile only the thread
// leading a step that holds the job uses them (jobs are handed between threads under the
// batcher's lock or a waiting caller's own), so the borrowed data is never used by two
// threads at once. `CudaSession`
// itself may move between threads.
unsafe impl Send for CudaJob {}

impl StepJob for CudaJob {
    fn next_tokens(&self) -> usize {
        if self.failed.is_some() {
            return 0;
        }
        // Chunks at fixed offsets from the call's first token, as `forward_top` cuts them.
        let left = self.tokens.len() - self.at;
        match left >= PREFILL_MIN && prefill::unavailable().is_none() {
            true => left.min(PREFILL_CHUNK),
            false => left.min(MAX_CHUNK),
        }
    }

    fn fail(&mut self, why: String) {
        self.failed = Some(why);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_prompts_attention_launches_cover_its_rows_with_distinct_slots() {
        let launches = |rows, n| attention_launches(rows, n).collect::<Vec<_>>();
        assert_eq!(launches(12, 12), [(0, 12)]);
        assert_eq!(launches(64, 64), [(0, 64)]);
        let all: Vec<_> = (0..8).map(|g| (8 * g, 8 * g + 8)).collect();
        assert_eq!(launches(64, 8), all);
        assert_eq!(launches(13, 8), [(0, 8), (8, 13)]);
        assert_eq!(launches(9, 8), [(0, 8), (8, 9)]);
        assert_eq!(launches(50, 20), [(0, 20), (20, 40), (40, 50)]);
        for (rows, n) in [(9, 8), (13, 8), (50, 8), (64, 8), (50, 20), (64, 64)] {
            for (from, to) in launches(rows, n) {
                let mut slots: Vec<_> = (from..to).map(|i| i % n).collect();
                slots.sort();
                assert_eq!(slots, (0..to - from).collect::<Vec<_>>());
            }
        }
    }
}
