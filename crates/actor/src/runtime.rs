//! [`Runtime`]: the Wasmtime engine, its memory creator, the compute device and the clock
//! that interrupts runaway guests.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use tern_compute::Device;
use tern_memory::RegionCreator;
use wasmtime::{Config, Engine};

use crate::ActorError;
use crate::models::ModelRegistry;

/// How often the epoch advances; a time limit is a whole number of ticks.
pub(crate) const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Limits applied to every actor of a runtime.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// The most linear memory one actor may have, in bytes.
    pub memory_bytes: usize,
    /// The longest one guest call (init, one message) may run.
    pub call_time: Duration,
    /// The most bytes one message may `emit`.
    pub output_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: 1 << 30,
            call_time: Duration::from_secs(60),
            output_bytes: 16 << 20,
        }
    }
}

/// One engine and one device, shared by any number of actors.
pub struct Runtime {
    pub(crate) engine: Engine,
    pub(crate) creator: Arc<RegionCreator>,
    pub(crate) device: Arc<dyn Device>,
    pub(crate) limits: Limits,
    pub(crate) models: ModelRegistry,
    ticker: Option<(Arc<AtomicBool>, JoinHandle<()>)>,
}

impl Runtime {
    /// A runtime whose actors' memories are attached to `device`.
    pub fn new(device: Arc<dyn Device>, limits: Limits) -> Result<Runtime, ActorError> {
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
        let ticker = {
            let (engine, stop) = (engine.clone(), stop.clone());
            std::thread::Builder::new()
                .name("tern-epoch".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(EPOCH_TICK);
                        engine.increment_epoch();
                    }
                })
                .map_err(|e| ActorError::Engine(format!("cannot start the epoch thread: {e}")))?
        };
        Ok(Runtime {
            engine,
            creator,
            device,
            limits,
            models: ModelRegistry::default(),
            ticker: Some((stop, ticker)),
        })
    }

    /// The Wasmtime engine, configured so that every linear memory is a Tern region. Stores
    /// made on it directly must set an epoch deadline (`Store::set_epoch_deadline`).
    pub fn engine(&self) -> &wasmtime::Engine {
        &self.engine
    }

    /// Offers `model` to this runtime's actors under its name (`tern.model_open`).
    pub fn add_model(&mut self, model: Arc<tern_model::Model>) {
        self.models.insert(model);
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
