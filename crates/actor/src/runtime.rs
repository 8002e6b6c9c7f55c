//! [`Runtime`]: the Wasmtime engine, its memory creator, the compute device, the models it
//! offers and the clock that interrupts runaway guests; built by [`RuntimeBuilder`], the one
//! way every front (the CLI's commands, the server) sets up a host.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use tern_compute::Device;
use tern_memory::RegionCreator;
use tern_model::{KvType, Model, Precision};
use wasmtime::{Config, Engine};

use crate::ActorError;
use crate::budget::KvLedger;
use crate::clock::{WallClock, system_clock};
use crate::registry::{Locate, ModelRegistry, ModelSource, OpenError, OpenOptions};

/// How often the epoch advances; a time limit is a whole number of ticks.
pub(crate) const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Limits applied to every actor of a runtime.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// The most linear memory one actor may have, in bytes.
    pub memory_bytes: usize,
    /// The longest one guest call (init, one message) may run, counting the guest's own
    /// running time: time spent inside host calls (a forward pass, say) does not count.
    pub call_time: Duration,
    /// The most bytes one message may `emit`.
    pub output_bytes: usize,
    /// The most KV-cache bytes one actor's open sessions may reserve, each counted at its
    /// full capacity when it is opened.
    pub kv_bytes: u64,
    /// The most KV-cache bytes all actors of the runtime together may reserve.
    pub runtime_kv_bytes: u64,
    /// The most bytes of text one host call works on (`tokenize`'s input, `render_chat`'s
    /// messages, `detokenize`'s output): host work runs outside the guest's time limit.
    pub text_bytes: usize,
    /// The longest one host call on text (`tokenize`, `render_chat`) may run.
    pub text_time: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: 1 << 30,
            call_time: Duration::from_secs(60),
            output_bytes: 16 << 20,
            kv_bytes: 4 << 30,
            runtime_kv_bytes: u64::MAX,
            text_bytes: 4 << 20,
            text_time: Duration::from_secs(5),
        }
    }
}

/// Sets up a [`Runtime`]: its device, limits, the models it offers by name (the first also
/// answers to `default`), how CPU forward passes run, and the wall clock actors' virtual
/// clocks read.
pub struct RuntimeBuilder {
    device: Arc<dyn Device>,
    limits: Limits,
    models: Vec<(String, ModelSource)>,
    threads: usize,
    precision: Precision,
    kv_type: KvType,
    clock: WallClock,
    testing_probes: bool,
}

impl RuntimeBuilder {
    /// The limits every actor runs under.
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Offers the model file at `path` (GGUF, or a Hugging Face checkpoint) as `name`, loaded
    /// on first use.
    pub fn model_file(mut self, name: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        self.models
            .push((name.into(), ModelSource::File(path.into())));
        self
    }

    /// Offers the model file `locate` finds (fetching it, say) as `name`, on first use.
    pub fn model_located(mut self, name: impl Into<String>, locate: Locate) -> Self {
        self.models
            .push((name.into(), ModelSource::Located(locate)));
        self
    }

    /// Offers a model already loaded and on this runtime's device, under its own name.
    pub fn model(mut self, model: Arc<Model>) -> Self {
        self.models
            .push((model.name.clone(), ModelSource::Loaded(model)));
        self
    }

    /// CPU threads for the forward pass of models loaded from files (default: all cores).
    pub fn threads(mut self, threads: usize) -> Self {
        self.threads = threads.max(1);
        self
    }

    /// How CPU matrix products treat activations, for models loaded from files.
    pub fn precision(mut self, precision: Precision) -> Self {
        self.precision = precision;
        self
    }

    /// How the KV caches of models loaded from files store keys and values (the default is
    /// f32).
    pub fn kv_type(mut self, kv_type: KvType) -> Self {
        self.kv_type = kv_type;
        self
    }

    /// The wall clock, in milliseconds since the Unix epoch, that actors' virtual clocks read
    /// once each (default: the system's).
    pub fn clock(mut self, clock: WallClock) -> Self {
        self.clock = clock;
        self
    }

    /// Links two host functions for tests: `tern.testing_panic()`, which panics (a host panic
    /// stays inside the actor that caused it), and `tern.testing_sleep(ms)`, which sleeps (host
    /// time does not count against a guest's time limit). Never for production hosts.
    #[doc(hidden)]
    pub fn testing_probes(mut self) -> Self {
        self.testing_probes = true;
        self
    }

    /// The runtime; refuses two models of one name.
    pub fn build(self) -> Result<Runtime, ActorError> {
        for (i, (name, _)) in self.models.iter().enumerate() {
            if self.models[..i].iter().any(|(n, _)| n == name) {
                return Err(ActorError::Config(format!("two models are named `{name}`")));
            }
        }
        let options = OpenOptions {
            device: self.device.clone(),
            threads: self.threads,
            precision: self.precision,
            kv_type: self.kv_type,
        };
        Runtime::new(
            self.device,
            self.limits,
            ModelRegistry::new(self.models, options),
            self.clock,
            self.testing_probes,
        )
    }
}

/// One engine and one device, shared by any number of actors.
pub struct Runtime {
    pub(crate) engine: Engine,
    pub(crate) creator: Arc<RegionCreator>,
    pub(crate) device: Arc<dyn Device>,
    pub(crate) limits: Limits,
    pub(crate) models: ModelRegistry,
    pub(crate) kv: Arc<KvLedger>,
    pub(crate) clock: WallClock,
    pub(crate) testing_probes: bool,
    /// Epoch ticks so far, counted beside the engine's own epoch (which it does not expose).
    pub(crate) ticks: Arc<AtomicU64>,
    ticker: Option<(Arc<AtomicBool>, JoinHandle<()>)>,
}

impl Runtime {
    /// Starts setting up a runtime whose actors' memories are attached to `device`.
    pub fn builder(device: Arc<dyn Device>) -> RuntimeBuilder {
        RuntimeBuilder {
            device,
            limits: Limits::default(),
            models: Vec::new(),
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            precision: Precision::Fast,
            kv_type: KvType::F32,
            clock: system_clock(),
            testing_probes: false,
        }
    }

    fn new(
        device: Arc<dyn Device>,
        limits: Limits,
        models: ModelRegistry,
        clock: WallClock,
        testing_probes: bool,
    ) -> Result<Runtime, ActorError> {
        let creator = Arc::new(RegionCreator::new(
            vec![device.clone()],
            limits.memory_bytes,
        ));
        let mut config = Config::new();
        config
            .with_host_memory(creator.clone())
            // One registration with the device must stay valid: memory never moves.
            .memory_may_move(false)
            // Required with a custom creator: copy-on-write init would replace our pages.
            .memory_init_cow(false)
            // A 4 GiB reservation lets Cranelift elide bounds checks; guard pages trap.
            .memory_reservation(4 << 30)
            .memory_guard_size(32 << 20)
            .memory_reservation_for_growth(0)
            .max_wasm_stack(1 << 20)
            .epoch_interruption(true);
        let engine = Engine::new(&config).map_err(|e| ActorError::Engine(format!("{e:#}")))?;
        let stop = Arc::new(AtomicBool::new(false));
        let ticks = Arc::new(AtomicU64::new(0));
        let ticker = {
            let (engine, stop, ticks) = (engine.clone(), stop.clone(), ticks.clone());
            std::thread::Builder::new()
                .name("tern-epoch".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(EPOCH_TICK);
                        engine.increment_epoch();
                        ticks.fetch_add(1, Ordering::Relaxed);
                    }
                })
                .map_err(|e| ActorError::Engine(format!("cannot start the epoch thread: {e}")))?
        };
        Ok(Runtime {
            engine,
            creator,
            device,
            kv: Arc::new(KvLedger::new(limits.runtime_kv_bytes)),
            limits,
            models,
            clock,
            testing_probes,
            ticks,
            ticker: Some((stop, ticker)),
        })
    }

    /// The Wasmtime engine, configured so that every linear memory is a Tern region. Stores
    /// made on it directly must set an epoch deadline (`Store::set_epoch_deadline`).
    pub fn engine(&self) -> &wasmtime::Engine {
        &self.engine
    }

    /// The model offered as `name` (`default`: the first), loaded now if it was not yet.
    pub fn model(&self, name: &str) -> Result<Arc<Model>, OpenError> {
        self.models.open(name)
    }

    /// The models this runtime offers, by name.
    pub fn models(&self) -> &ModelRegistry {
        &self.models
    }

    /// The KV-cache bytes all actors of this runtime have reserved, and the cap.
    pub fn kv_ledger(&self) -> &KvLedger {
        &self.kv
    }

    /// The device every actor of this runtime computes on.
    pub fn device(&self) -> &Arc<dyn Device> {
        &self.device
    }

    /// The limits every actor of this runtime runs under.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Whether `ptr` is the base of a live Tern region (a guest memory of this runtime).
    pub fn is_region_base(&self, ptr: *const u8) -> bool {
        self.creator.is_region_base(ptr)
    }

    /// Guest memory regions kept from dropped actors for the next ones (zeroed, still
    /// registered with the device), and the bytes they keep mapped.
    pub fn kept_memory(&self) -> (usize, usize) {
        self.creator.kept()
    }

    /// The epoch deadline, in ticks, for one guest call.
    pub(crate) fn deadline_ticks(&self) -> u64 {
        (self.limits.call_time.as_millis() / EPOCH_TICK.as_millis()).max(1) as u64 + 1
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        if let Some((stop, handle)) = self.ticker.take() {
            stop.store(true, Ordering::Relaxed);
            let _ = handle.join();
        }
    }
}
