//! [`Model`]: one model file opened once per process and shared by every actor that uses it:
//! its weights, tokenizer and chat template, and the sessions (KV caches) that run on it.

use std::borrow::Cow;
use std::path::Path;

use tern_text::{ChatTemplate, Message, Tokenizer, TokenizerSpec};

use crate::ModelError;
use crate::digest::ModelDigest;
use crate::engine::{Engine, SessionState, SourceUnits, StepItem};
use crate::gguf::{GgufFile, Value};
use crate::llama::cpu::{CpuLlama, KvCache, KvType, Precision};
use crate::llama::{LlamaConfig, LlamaWeights, read_hf_config};
use crate::numerics::Numerics;
use crate::safetensors::SafetensorsFile;
use crate::top::{Candidate, check_k};

/// A loaded model.
pub struct Model {
    pub name: String,
    /// The weights, and the CPU engine: the reference every other backend is checked
    /// against, and the engine unless the model was put on a GPU.
    pub llama: CpuLlama,
    /// The engine on a GPU, when the model was put on one ([`Model::on_device`]).
    gpu: Option<Box<dyn Engine>>,
    pub tokenizer: Tokenizer,
    pub template: Option<ChatTemplate>,
    /// The SHA-256 of the model's files ([`crate::digest`]): its identity in snapshots.
    pub digest: ModelDigest,
    /// The sampled FNV-1a digest ([`fnv1a`]) that version-1 snapshots identify models by.
    pub legacy_digest: u64,
}

/// One sequence's state on a model: its tokens and its engine's state (the KV cache).
pub struct Session {
    pub tokens: Vec<u32>,
    state: Box<dyn SessionState>,
}

impl Model {
    /// Opens a model with `threads` CPU workers: a GGUF file, or a Hugging Face checkpoint
    /// (a directory with `config.json`, `tokenizer.json` and `*.safetensors`, or one of its
    /// files).
    pub fn open(name: &str, path: &Path, threads: usize) -> Result<Model, ModelError> {
        if path.is_dir()
            || path
                .extension()
                .is_some_and(|e| e == "safetensors" || e == "json")
        {
            let dir = if path.is_dir() {
                path
            } else {
                path.parent().unwrap_or(Path::new("."))
            };
            return Self::open_hf(name, dir, threads);
        }
        let file = GgufFile::open(path)?;
        let config = LlamaConfig::from_gguf(&file).map_err(|e| e.in_file(path))?;
        let tokenizer =
            Tokenizer::from_spec(tokenizer_spec(&file)?).map_err(|e| text_error(path, e))?;
        let template = file
            .get("tokenizer.chat_template")
            .and_then(Value::as_str)
            .map(|source| chat_template(&tokenizer, source))
            .transpose()
            .map_err(|e| text_error(path, e))?;
        let digest = ModelDigest::of_file(path, file.bytes());
        let legacy_digest = fnv1a(file.bytes());
        let weights = LlamaWeights::from_gguf(file, &config).map_err(|e| e.in_file(path))?;
        let llama = CpuLlama::new(config, weights, threads)?;
        Ok(Model::on_cpu(
            name,
            llama,
            tokenizer,
            template,
            digest,
            legacy_digest,
        ))
    }

    /// A model on the CPU only (until [`Model::on_device`]).
    fn on_cpu(
        name: &str,
        llama: CpuLlama,
        tokenizer: Tokenizer,
        template: Option<ChatTemplate>,
        digest: ModelDigest,
        legacy_digest: u64,
    ) -> Model {
        Model {
            name: name.to_string(),
            llama,
            gpu: None,
            tokenizer,
            template,
            digest,
            legacy_digest,
        }
    }

    fn open_hf(name: &str, dir: &Path, threads: usize) -> Result<Model, ModelError> {
        let read = |file: &str| {
            std::fs::read_to_string(dir.join(file)).map_err(|e| ModelError::io(&dir.join(file), e))
        };
        // Every file that shapes the model, by name, for its digest.
        let mut files = Vec::new();
        let mut digest_of = |file: &str, text: &str| {
            files.push((file.to_string(), ModelDigest::of_bytes(text.as_bytes())));
        };
        let config_json = read("config.json")?;
        digest_of("config.json", &config_json);
        let hf = read_hf_config(&config_json).map_err(|e| e.in_file(&dir.join("config.json")))?;
        let tokenizer_json = read("tokenizer.json")?;
        digest_of("tokenizer.json", &tokenizer_json);
        let tokenizer_config = read("tokenizer_config.json").ok();
        if let Some(text) = &tokenizer_config {
            digest_of("tokenizer_config.json", text);
        }
        let tok = tern_text::from_hf_files(&tokenizer_json, tokenizer_config.as_deref())
            .map_err(|e| text_error(dir, e))?;
        let tokenizer = Tokenizer::from_spec(tok.spec).map_err(|e| text_error(dir, e))?;
        let template = tok
            .chat_template
            .map(|source| chat_template(&tokenizer, &source))
            .transpose()
            .map_err(|e| text_error(dir, e))?;
        let mut paths: Vec<_> = std::fs::read_dir(dir)
            .map_err(|e| ModelError::io(dir, e))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        paths.sort();
        if paths.is_empty() {
            return Err(ModelError::Format(format!(
                "{}: no *.safetensors files",
                dir.display()
            )));
        }
        let shards = paths
            .iter()
            .map(|p| SafetensorsFile::open(p))
            .collect::<Result<Vec<_>, _>>()?;
        for (path, shard) in paths.iter().zip(&shards) {
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            files.push((name.into_owned(), ModelDigest::of_file(path, shard.bytes())));
        }
        let digest = ModelDigest::of_checkpoint(&files);
        let legacy_digest = shards
            .iter()
            .fold(0u64, |h, s| h.rotate_left(7) ^ fnv1a(s.bytes()));
        let weights = LlamaWeights::from_safetensors(shards, &hf.config, hf.rope_freqs)
            .map_err(|e| e.in_file(dir))?;
        let llama = CpuLlama::new(hf.config, weights, threads)?;
        Ok(Model::on_cpu(
            name,
            llama,
            tokenizer,
            template,
            digest,
            legacy_digest,
        ))
    }

    /// Runs the forward pass on `device` when it is a GPU (weights uploaded once, shared by
    /// every session); on the CPU device this changes nothing.
    pub fn on_device(
        mut self,
        device: &std::sync::Arc<dyn tern_compute::Device>,
    ) -> Result<Model, ModelError> {
        self.gpu = crate::llama::gpu_engine(&self.llama, device)?;
        Ok(self)
    }

    /// The engine the forward pass runs on.
    pub fn engine(&self) -> &dyn Engine {
        match &self.gpu {
            Some(gpu) => &**gpu,
            None => &self.llama,
        }
    }

    /// The engine as a backend's own type, when it is that one (for its benchmarks).
    pub fn engine_as<T: Engine>(&self) -> Option<&T> {
        let any: &dyn std::any::Any = self.engine();
        any.downcast_ref()
    }

    /// Switches how matrix products treat activations (the default is the reference).
    pub fn with_precision(mut self, precision: Precision) -> Model {
        self.llama.precision = precision;
        self
    }

    /// Switches how new sessions' KV caches store keys and values (the default is f32). Set
    /// it before [`on_device`](Self::on_device), which builds the GPU's kernels for it (the
    /// wgpu backend keeps f32 caches only, and refuses another type).
    pub fn with_kv_type(mut self, kv_type: KvType) -> Model {
        self.llama.kv_type = kv_type;
        self
    }

    /// Whether [`Session::refill`] reads its source's units (a GPU that copies
    /// through staging buffers does).
    pub fn reads_kv_units(&self) -> bool {
        self.engine().reads_kv_units()
    }

    /// How new sessions' KV caches store keys and values.
    pub fn kv_type(&self) -> KvType {
        self.llama.kv_type
    }

    /// Where and how the forward pass computes ("cpu fast"), for people; whether two runs
    /// round alike is decided by [`Model::numerics`], field by field.
    pub fn compute_label(&self) -> String {
        self.engine().label()
    }

    /// What decides the bits of the forward pass, field by field ([`crate::numerics`]): where
    /// two models' numerics are equal, a session moved between them continues bit for bit.
    pub fn numerics(&self) -> Numerics {
        self.engine().numerics()
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.llama.config
    }

    /// Facts a guest needs, as JSON.
    pub fn info_json(&self) -> String {
        let c = self.config();
        serde_json::json!({
            "name": self.name,
            "architecture": "llama",
            "vocab_size": c.n_vocab,
            "context_length": c.n_ctx_train,
            "bos": self.tokenizer.bos(),
            "eos": self.tokenizer.eos(),
            "eot": self.end_of_turn(),
            "has_chat_template": self.template.is_some(),
        })
        .to_string()
    }

    /// The token that ends an assistant turn: `<|im_end|>` or `<|eot_id|>` when the vocabulary
    /// has one, else EOS.
    pub fn end_of_turn(&self) -> Option<u32> {
        ["<|im_end|>", "<|eot_id|>", "<|end|>"]
            .iter()
            .find_map(|t| {
                self.tokenizer
                    .encode(t, false)
                    .ok()
                    .filter(|ids| ids.len() == 1)
                    .map(|ids| ids[0])
            })
            .or(self.tokenizer.eos())
    }

    /// Renders a conversation with the model's chat template. `now` is the clock the
    /// template's `strftime_now` reads (Unix time in milliseconds, UTC), called only if the
    /// template asks for the time; see [`tern_text::ChatTemplate::render`].
    pub fn render_chat(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        now: &dyn Fn() -> i64,
    ) -> Result<String, ModelError> {
        let template = self.template.as_ref().ok_or_else(|| {
            ModelError::Invalid(format!("model `{}` has no chat template", self.name))
        })?;
        template
            .render(messages, add_generation_prompt, now)
            .map_err(ModelError::Template)
    }

    /// Whether a step over several sessions reads each weight once for all of them; where
    /// not (wgpu), the sessions of a step run one after another.
    pub fn batches_steps(&self) -> bool {
        self.engine().batches_steps()
    }

    /// The engine's step scheduler's counters: steps run and the forward passes' chunks in
    /// them.
    pub fn step_stats(&self) -> crate::steps::StepStats {
        self.engine().step_stats()
    }

    /// A new, empty session (KV cache) of `n_ctx` positions (at most the trained context).
    pub fn new_session(&self, n_ctx: usize) -> Result<Session, ModelError> {
        self.check_n_ctx(n_ctx)?;
        Ok(Session {
            tokens: Vec::new(),
            state: self.engine().open_session(n_ctx)?,
        })
    }

    /// Makes the memory of a session of `n_ctx` positions ready for the next
    /// [`new_session`](Self::new_session) of that size, ahead of a restore known to come
    /// (a move's copy ahead): on the CPU its pages are brought in and zeroed now, which in a
    /// virtual machine costs more than the restore's copy; elsewhere nothing.
    pub fn keep_session_memory(&self, n_ctx: usize) -> Result<(), ModelError> {
        self.check_n_ctx(n_ctx)?;
        self.engine().keep_session_memory(n_ctx)
    }

    fn check_n_ctx(&self, n_ctx: usize) -> Result<(), ModelError> {
        let limit = self.config().n_ctx_train;
        if n_ctx == 0 || n_ctx > limit {
            return Err(ModelError::Invalid(format!(
                "session of {n_ctx} tokens (1..={limit} allowed)"
            )));
        }
        Ok(())
    }

    /// One step over several sessions at once, each weight read once for all of them: each
    /// [`Step`] appends its tokens and gets its last position's outputs, the same bits
    /// [`forward_top`](Self::forward_top) gives it alone. Every session is checked before
    /// any runs; a session may appear once.
    pub fn step(&self, steps: &mut [Step<'_>]) -> Result<(), ModelError> {
        for step in steps.iter() {
            check_k(step.top.len(), self.config().n_vocab)?;
        }
        let mut items: Vec<StepItem<'_>> = steps
            .iter_mut()
            .map(|step| StepItem {
                state: &mut *step.session.state,
                tokens: step.tokens,
                logits: step.logits.as_deref_mut(),
                top: &mut *step.top,
            })
            .collect();
        self.engine().step(&mut items)?;
        for step in steps.iter_mut() {
            step.session.tokens.extend_from_slice(step.tokens);
        }
        Ok(())
    }

    /// [`step`](Self::step) where each `(session, tokens, logits)` wants its logits only.
    pub fn forward_many(
        &self,
        steps: &mut [(&mut Session, &[u32], &mut [f32])],
    ) -> Result<(), ModelError> {
        let mut steps: Vec<Step<'_>> = steps
            .iter_mut()
            .map(|(session, tokens, logits)| Step {
                session,
                tokens,
                logits: Some(&mut **logits),
                top: &mut [],
            })
            .collect();
        self.step(&mut steps)
    }

    /// Appends `tokens` to the session and writes the last position's logits.
    pub fn forward(
        &self,
        session: &mut Session,
        tokens: &[u32],
        logits: &mut [f32],
    ) -> Result<(), ModelError> {
        self.forward_top(session, tokens, Some(logits), &mut [])
    }

    /// [`forward`](Self::forward), and the `top.len()` (at most
    /// [`MAX_TOP`](crate::top::MAX_TOP)) largest logits of the last position into `top`, in
    /// [`crate::top`]'s order: on a CUDA session they are selected there, and with `logits`
    /// `None` the logits never leave it.
    pub fn forward_top(
        &self,
        session: &mut Session,
        tokens: &[u32],
        logits: Option<&mut [f32]>,
        top: &mut [Candidate],
    ) -> Result<(), ModelError> {
        self.step(&mut [Step {
            session,
            tokens,
            logits,
            top,
        }])
    }
}

/// One session's part of [`Model::step`].
pub struct Step<'a> {
    pub session: &'a mut Session,
    /// Its new positions' tokens.
    pub tokens: &'a [u32],
    /// Where the last position's logits go (`n_vocab`), if wanted.
    pub logits: Option<&'a mut [f32]>,
    /// Where the last position's `top.len()` largest logits go, in [`crate::top`]'s order
    /// (empty: none wanted).
    pub top: &'a mut [Candidate],
}

impl Session {
    /// Keeps the first `len` tokens and forgets the rest.
    pub fn rewind(&mut self, len: usize) {
        self.tokens.truncate(len);
        self.state.truncate(len);
    }

    /// Positions the session can hold.
    pub fn n_ctx(&self) -> usize {
        self.state.n_ctx()
    }

    /// The KV cache of the filled positions on the host: borrowed for a CPU session, copied
    /// from the GPU for a GPU one.
    pub fn host_kv(&self, model: &Model) -> Result<Cow<'_, KvCache>, ModelError> {
        Ok(self.host_kv_from(model, 0)?.0)
    }

    /// The KV cache on the host, at least its filled positions from `from` on, and the
    /// session position of the cache's first position (see [`Engine::read_kv`]): a GPU
    /// session copies only those positions.
    ///
    /// [`Engine::read_kv`]: crate::engine::Engine::read_kv
    pub fn host_kv_from(
        &self,
        model: &Model,
        from: usize,
    ) -> Result<(Cow<'_, KvCache>, usize), ModelError> {
        model.engine().read_kv(&*self.state, from)
    }

    /// Fills positions `from..from + len` from each layer's keys and values as little-endian
    /// f32 bytes, `(len, kv_dim)` each, as `layer` gives them, and forgets every position
    /// after them: how a saved cache is written back, piece by piece in position order. A GPU
    /// session copies them straight from those bytes (a mapped snapshot file, say) to device
    /// memory, reading them through `units` where the model's backend
    /// [does so](Model::reads_kv_units): a restore's checksum computed in the same pass as
    /// the copy.
    pub fn refill<'a>(
        &mut self,
        model: &Model,
        from: usize,
        len: usize,
        layer: impl Fn(usize) -> Result<(&'a [u8], &'a [u8]), ModelError>,
        units: Option<&dyn SourceUnits>,
    ) -> Result<(), ModelError> {
        if from.checked_add(len).is_none_or(|end| end > self.n_ctx()) {
            return Err(ModelError::Invalid(format!(
                "positions {from} + {len} do not fit a session of {}",
                self.n_ctx()
            )));
        }
        model
            .engine()
            .write_kv(&mut *self.state, from, len, &layer, units)
    }

    /// The session's state as its backend's own type, when it is that one (for the
    /// backend's benchmarks and tests).
    pub fn state_mut<T: SessionState>(&mut self) -> Option<&mut T> {
        crate::engine::own_mut(&mut *self.state).ok()
    }
}

/// The chat template `source`, with the tokenizer's BOS and EOS spelled out for it.
fn chat_template(
    tokenizer: &Tokenizer,
    source: &str,
) -> Result<ChatTemplate, tern_text::TextError> {
    let token = |id: Option<u32>| {
        id.and_then(|id| tokenizer.token_bytes(id))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
    };
    ChatTemplate::new(
        source,
        &token(tokenizer.bos()).unwrap_or_default(),
        &token(tokenizer.eos()).unwrap_or_default(),
    )
}

fn text_error(path: &Path, e: tern_text::TextError) -> ModelError {
    ModelError::Format(format!("tokenizer: {e}")).in_file(path)
}

/// The tokenizer as the file describes it (`tokenizer.ggml.*`).
fn tokenizer_spec(file: &GgufFile) -> Result<TokenizerSpec, ModelError> {
    let strings = |key: &str| -> Option<Vec<String>> {
        file.get(key)?
            .as_array()?
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect()
    };
    let id = |key: &str| {
        file.get(key)
            .and_then(Value::as_u64)
            .and_then(|v| u32::try_from(v).ok())
    };
    let flag = |key: &str, default: bool| file.get(key).and_then(Value::as_bool).unwrap_or(default);
    let model = file.str("tokenizer.ggml.model")?.to_string();
    Ok(TokenizerSpec {
        tokens: strings("tokenizer.ggml.tokens")
            .ok_or_else(|| ModelError::Format("tokenizer.ggml.tokens is missing".into()))?,
        scores: file
            .get("tokenizer.ggml.scores")
            .and_then(Value::as_array)
            .map(|a| a.iter().map(|v| v.as_f32().unwrap_or(0.0)).collect()),
        token_types: file
            .get("tokenizer.ggml.token_type")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .map(|v| match v {
                        Value::I32(x) => *x,
                        other => other.as_u64().map_or(1, |x| x as i32),
                    })
                    .collect()
            }),
        merges: strings("tokenizer.ggml.merges"),
        pre: file
            .get("tokenizer.ggml.pre")
            .and_then(Value::as_str)
            .map(str::to_string),
        bos: id("tokenizer.ggml.bos_token_id"),
        eos: id("tokenizer.ggml.eos_token_id"),
        unk: id("tokenizer.ggml.unknown_token_id"),
        pad: id("tokenizer.ggml.padding_token_id"),
        add_bos: flag("tokenizer.ggml.add_bos_token", model == "llama"),
        add_eos: flag("tokenizer.ggml.add_eos_token", false),
        add_space_prefix: flag("tokenizer.ggml.add_space_prefix", model == "llama"),
        model,
    })
}

/// FNV-1a, 64-bit, over `bytes`, sampled: every 4 KiB page's first 64 bytes plus the length,
/// so a 1 GB file hashes in milliseconds while any header or tensor change is caught.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |b: u8| {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    };
    for page in bytes.chunks(4096) {
        page.iter().take(64).for_each(|&b| eat(b));
    }
    (bytes.len() as u64)
        .to_le_bytes()
        .iter()
        .for_each(|&b| eat(b));
    h
}
