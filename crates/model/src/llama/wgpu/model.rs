//! [`WgpuLlama`]: a model's weights and kernels on one wgpu device.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use tern_compute::Device;
use tern_compute::wgpu::WgpuDevice;

use super::kernels::{Bind, Kernels};
use super::weights::DeviceWeights;
use super::{MAX_CHUNK, WgpuSession};
use crate::ModelError;
use crate::engine::{Engine, LayerBytes, SessionState, SourceUnits, StepItem, own, own_mut};
use crate::llama::LlamaConfig;
use crate::llama::cpu::{CpuLlama, KvCache, KvType};
use crate::numerics::{Numerics, kernel_hash};
use crate::top::top_k;

/// What opening the model on the GPU cost.
#[derive(Clone, Copy, Debug)]
pub struct Startup {
    /// Building the pipelines, milliseconds.
    pub kernels_ms: f64,
    /// Uploading the weights, milliseconds.
    pub upload_ms: f64,
    /// Bytes of weights in device memory.
    pub weight_bytes: usize,
}

/// A Llama model with its weights on one wgpu device.
pub struct WgpuLlama {
    pub config: LlamaConfig,
    /// The device the model was opened on: the one actors' memories are imported into.
    device: Arc<dyn Device>,
    pub(super) kernels: Kernels,
    pub(super) weights: DeviceWeights,
    /// How its sessions' KV caches store keys and values.
    pub kv_type: KvType,
    inv_freq: Vec<f32>,
    pub startup: Startup,
    /// One forward pass at a time.
    busy: Mutex<()>,
}

impl WgpuLlama {
    /// Uploads the weights of `cpu` (the reference, whose config and rotary frequencies it
    /// shares) to the GPU `device` is (it must be a wgpu device).
    pub fn new(cpu: &CpuLlama, device: Arc<dyn Device>) -> Result<WgpuLlama, ModelError> {
        let config = cpu.config.clone();
        let gpu = device.as_wgpu().ok_or_else(|| {
            ModelError::Invalid(format!("{} is not a wgpu device", device.describe()))
        })?;
        let hd = config.head_dim;
        if !hd.is_multiple_of(4)
            || !128usize.is_multiple_of(hd)
            || !config.n_head.is_multiple_of(config.n_head_kv)
        {
            return Err(ModelError::Unsupported(format!(
                "head size {hd} on wgpu (attention takes multiples of 4 that divide 128)"
            )));
        }
        if !config.n_embd.is_multiple_of(4) {
            return Err(ModelError::Unsupported(format!(
                "embedding width {} on wgpu (the norms read vectors of four)",
                config.n_embd
            )));
        }
        let t = Instant::now();
        let weights = DeviceWeights::upload(gpu, &cpu.weights)?;
        gpu.wait().map_err(wgpu_error)?;
        let upload_ms = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        let embd = [weights.token_embd.dtype];
        let kv_f16 = cpu.kv_type == KvType::F16;
        let kernels = Kernels::build(gpu, &weights.matrix_types(), &embd, None, kv_f16);
        let startup = Startup {
            kernels_ms: t.elapsed().as_secs_f64() * 1e3,
            upload_ms,
            weight_bytes: weights.bytes,
        };
        Ok(WgpuLlama {
            config,
            kv_type: cpu.kv_type,
            inv_freq: cpu.inv_freq().to_vec(),
            device,
            kernels,
            weights,
            startup,
            busy: Mutex::new(()),
        })
    }

    pub fn gpu(&self) -> &WgpuDevice {
        self.device
            .as_wgpu()
            .expect("checked to be a wgpu device at open")
    }

    pub(super) fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// Where the forward pass computes, for snapshots and messages.
    pub fn label(&self) -> String {
        let reduce = match self.kernels.reduce {
            super::shaders::Reduce::Shared => "",
            super::shaders::Reduce::Subgroup => ", subgroups",
        };
        let kv = self.kv_type.precision_note();
        format!("{} f32{reduce}{kv}", self.gpu().describe())
    }

    /// What decides the bits this forward pass computes ([`crate::numerics`]): the row
    /// reduction `label` names, the SHA-256 of the WGSL sources, and the graphics API,
    /// adapter and driver that compile them.
    pub fn numerics(&self) -> Numerics {
        static KERNELS: OnceLock<String> = OnceLock::new();
        let kernels = KERNELS.get_or_init(|| {
            let all = super::shaders::all();
            kernel_hash(
                all.iter()
                    .map(|(name, _, src)| (name.as_str(), src.as_str())),
            )
        });
        let reduce = match self.kernels.reduce {
            super::shaders::Reduce::Shared => "f32, shared-memory reductions",
            super::shaders::Reduce::Subgroup => "f32, subgroup reductions",
        };
        let precision = format!("{reduce}{}", self.kv_type.precision_note());
        let info = self.gpu().adapter_info();
        let api = format!("{:?}", info.backend).to_lowercase();
        let mut architecture = format!("{api} {}", info.name);
        let driver = format!("{} {}", info.driver, info.driver_info);
        if !driver.trim().is_empty() {
            architecture += &format!(", driver {}", driver.trim());
        }
        Numerics {
            backend: "wgpu".into(),
            precision,
            kernels: kernels.clone(),
            architecture,
        }
    }

    /// An empty session of up to `n_ctx` positions.
    pub fn new_session(&self, n_ctx: usize) -> Result<WgpuSession, ModelError> {
        WgpuSession::new(self, n_ctx)
    }

    /// Appends `tokens` to `session` and writes the last position's logits into `logits`
    /// (directly, when `logits` lies in guest memory the device imported).
    pub fn forward(
        &self,
        session: &mut WgpuSession,
        tokens: &[u32],
        logits: &mut [f32],
    ) -> Result<(), ModelError> {
        let c = &self.config;
        super::super::check_forward(c, session.len, session.n_ctx, tokens, Some(logits))?;
        let _busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        let gpu = self.gpu();
        let guest = gpu.guest_slice(logits.as_ptr() as usize, size_of_val(logits));
        let window = guest.as_ref().map(|g| g.window(gpu.storage_align()));
        let chunks = tokens.chunks(MAX_CHUNK);
        let last = chunks.len() - 1;
        for (i, chunk) in chunks.enumerate() {
            let out = (i == last).then(|| {
                window.as_ref().map(|(binding, first)| {
                    let bind = Bind {
                        buffer: binding.buffer,
                        offset: binding.offset,
                        size: binding.size.map(|s| s.get()),
                    };
                    (bind, *first)
                })
            });
            session.run_chunk(self, chunk, out)?;
        }
        if guest.is_some() {
            gpu.finish_guest_writes().map_err(wgpu_error)
        } else {
            session.read_logits(gpu, logits)
        }
    }

    /// Times each kernel of one decode step of `session` (see
    /// `WgpuSession::profile_step`); `None` where the adapter cannot time its work.
    pub fn profile_step(
        &self,
        session: &mut WgpuSession,
        token: u32,
    ) -> Result<Option<Vec<(&'static str, f64)>>, ModelError> {
        if !self.gpu().can_time() {
            return Ok(None);
        }
        let _busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        session.profile_step(self.gpu(), token).map(Some)
    }

    /// Launches of one decode step.
    pub fn kernels_per_step(&self) -> usize {
        let per_layer: usize = self
            .weights
            .layers
            .iter()
            // Two norms, the attention's split (with RoPE and the append) and merge, the
            // output and down products, the Q/K/V and gate/up products, and SwiGLU where gate
            // and up are apart (else it is fused into their product).
            .map(|l| 6 + l.qkv.len() + l.gate_up.len() + usize::from(l.gate_up.len() > 1))
            .sum();
        per_layer + 3
    }
}

/// Maps a compute error to a [`ModelError`]: a bad operand stays [`ModelError::Invalid`];
/// everything else is the device failing ([`ModelError::Device`]).
pub(super) fn wgpu_error(e: tern_compute::ComputeError) -> ModelError {
    use tern_compute::ComputeError;
    match e {
        ComputeError::Shape { .. } | ComputeError::NotRegistered { .. } => {
            ModelError::Invalid(format!("wgpu: {e}"))
        }
        ComputeError::Driver { what, reason, .. } => ModelError::device("wgpu", what, reason),
        ComputeError::Compile { kernel, log } => {
            ModelError::device("wgpu", format!("compiling kernel `{kernel}`"), log)
        }
        other => ModelError::device("wgpu", "using the device", other),
    }
}

crate::engine::session_state!(WgpuSession);

/// The wgpu engine runs a step's sessions one after another, each as
/// [`WgpuLlama::forward`]; the top logits are selected on the host.
impl Engine for WgpuLlama {
    fn label(&self) -> String {
        WgpuLlama::label(self)
    }

    /// Its kernels take one session's positions at a time, so a step's sessions run one
    /// after another (each with the bits it gets alone).
    fn batches_steps(&self) -> bool {
        false
    }

    fn numerics(&self) -> Numerics {
        WgpuLlama::numerics(self)
    }

    fn open_session(&self, n_ctx: usize) -> Result<Box<dyn SessionState>, ModelError> {
        Ok(Box::new(self.new_session(n_ctx)?))
    }

    /// Runs the sessions one after another: the WGSL kernels take one sequence per pass, so
    /// a step reads the weights once per session (each session's bits are its own alone).
    fn step(&self, items: &mut [StepItem<'_>]) -> Result<(), ModelError> {
        let c = &self.config;
        for item in items.iter_mut() {
            let s = own_mut::<WgpuSession>(&mut *item.state)?;
            crate::llama::check_forward(c, s.len, s.n_ctx, item.tokens, item.logits.as_deref())?;
        }
        let mut own_logits = Vec::new();
        for item in items.iter_mut() {
            let s = own_mut::<WgpuSession>(&mut *item.state)?;
            let logits = match item.logits.as_deref_mut() {
                Some(l) => l,
                None => {
                    own_logits.resize(c.n_vocab, 0.0);
                    &mut own_logits[..]
                }
            };
            self.forward(s, item.tokens, logits)?;
            if !item.top.is_empty() {
                top_k(logits, item.top);
            }
        }
        Ok(())
    }

    fn read_kv<'s>(
        &self,
        state: &'s dyn SessionState,
        from: usize,
    ) -> Result<(std::borrow::Cow<'s, KvCache>, usize), ModelError> {
        let s = own::<WgpuSession>(state)?;
        let c = &self.config;
        let from = from.min(s.len);
        let cache = s.download(self.gpu(), from, c.n_layer, c.kv_dim(), self.kv_type)?;
        Ok((std::borrow::Cow::Owned(cache), from))
    }

    fn write_kv(
        &self,
        state: &mut dyn SessionState,
        from: usize,
        len: usize,
        layer: &LayerBytes<'_, '_>,
        _units: Option<&dyn SourceUnits>,
    ) -> Result<(), ModelError> {
        let s = own_mut::<WgpuSession>(state)?;
        let c = &self.config;
        s.upload_layers(
            self.gpu(),
            from,
            len,
            c.n_layer,
            c.kv_dim(),
            self.kv_type,
            layer,
        )
    }
}
