//! [`Actor`]: one module instance in its own store, fed one message at a time.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tern_compute::Device;
use wasmtime::{
    Instance, Linker, Memory, Module, ResourceLimiter, Store, Trap, TypedFunc, UpdateDeadline,
    WasmBacktrace,
};

use crate::abi::HostPanic;
use crate::clock::VirtualClock;
use crate::deadline::GuestDeadline;
use crate::guest_memory::{self, AbiError};
use crate::incremental::{Captured, Lineage, PageSet};
use crate::instrument::{Instrumented, Writes, instrument_with};
use crate::models::ModelState;
use crate::{ActorError, Limits, Runtime, abi};

/// What the guest returned for one message, and what it emitted meanwhile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// `tern_on_message`'s result.
    pub code: i32,
    /// Every byte the guest emitted while handling the message.
    pub output: Vec<u8>,
}

/// Where emitted bytes go as they are emitted.
type OutputSink = Box<dyn FnMut(&[u8]) + Send>;

/// Per-actor host state: what host functions see of the actor.
pub(crate) struct HostState {
    pub(crate) device: Arc<dyn Device>,
    pub(crate) memory: Option<Memory>,
    pub(crate) last_error: Option<String>,
    pub(crate) models: ModelState,
    pub(crate) limits: Limits,
    /// The actor's time, read once from the runtime's wall clock and recorded.
    pub(crate) clock: VirtualClock,
    /// When the running guest call is interrupted.
    pub(crate) deadline: GuestDeadline,
    /// Set when whoever waits for the running message no longer does ([`Canceller`]).
    pub(crate) cancelled: Arc<AtomicBool>,
    /// Set when the actor is stopped for good ([`Canceller::stop`]); never cleared.
    pub(crate) stopped: Arc<AtomicBool>,
    /// Pages of guest memory the host wrote since the last snapshot capture
    /// ([`crate::incremental`]).
    pub(crate) written: PageSet,
    /// Whether this actor's thread was moved to the idle scheduling class ([`DEMOTE_AFTER`]).
    demoted: bool,
    output: Vec<u8>,
    output_limit: usize,
    stream: Option<OutputSink>,
    limiter: Limiter,
}

impl HostState {
    /// Records `bytes` as output and passes them to the stream, if any.
    pub(crate) fn emit(&mut self, bytes: &[u8]) -> Result<(), AbiError> {
        self.check_cancelled()?;
        if self.output.len() + bytes.len() > self.output_limit {
            return Err(AbiError::OutputLimit {
                limit: self.output_limit,
            });
        }
        self.output.extend_from_slice(bytes);
        if let Some(stream) = &mut self.stream {
            stream(bytes);
        }
        Ok(())
    }
}

impl HostState {
    /// Refuses host work for a message whose waiter has gone ([`Canceller`]).
    pub(crate) fn check_cancelled(&self) -> Result<(), AbiError> {
        if self.cancelled.load(Ordering::Acquire) || self.stopped.load(Ordering::Acquire) {
            return Err(AbiError::Cancelled);
        }
        Ok(())
    }
}

/// Caps linear memory and tables, and remembers the last growth it refused.
struct Limiter {
    memory_bytes: usize,
    refused: Option<usize>,
}

const MAX_TABLE_ELEMENTS: usize = 1 << 20;

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_bytes {
            self.refused = Some(desired);
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }

    fn instances(&self) -> usize {
        1
    }

    /// The guest's memory and its dirty-page map ([`crate::dirty`]).
    fn memories(&self) -> usize {
        2
    }

    fn tables(&self) -> usize {
        4
    }
}

/// A compiled actor module, instrumented for snapshots ([`crate::instrument`]): compile once,
/// start or restore any number of actors from it.
pub struct ActorModule {
    pub(crate) module: Module,
    /// What the instrumentation learned (its rewritten binary dropped after compiling).
    pub(crate) info: Instrumented,
    name: String,
}

impl ActorModule {
    /// Instruments and compiles `wasm` (binary or text); `name` says where it came from. A
    /// module without the exports an actor needs is refused here, before any actor starts.
    pub fn new(runtime: &Runtime, name: &str, wasm: &[u8]) -> Result<ActorModule, ActorError> {
        let mut info = instrument_with(wasm, Writes::DirtyPages)?;
        let module = Module::new(&runtime.engine, &info.wasm)
            .map_err(|e| ActorError::Module(format!("{e:#}")))?;
        info.wasm = Vec::new();
        check_exports(&module)?;
        // One memory is the actor's state; a second one is the dirty-page map the rewrite
        // added, which snapshots need not hold.
        let allowed = 1 + usize::from(info.dirty.is_some());
        let memories = module.resources_required().num_memories as usize;
        if memories > allowed {
            return Err(ActorError::Module(format!(
                "the module has {} memories; an actor has exactly one",
                memories + 1 - allowed
            )));
        }
        Ok(ActorModule {
            module,
            info,
            name: name.to_string(),
        })
    }

    /// Where the module came from (a guest name or a path).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// SHA-256 of the module's original binary, lowercase hex.
    pub fn digest(&self) -> &str {
        &self.info.digest
    }
}

/// Cancels the message an actor is handling, or stops the actor ([`Actor::canceller`]).
#[derive(Clone, Debug)]
pub struct Canceller {
    cancelled: Arc<AtomicBool>,
    stopped: Arc<AtomicBool>,
}

impl Canceller {
    /// Asks the running message to stop at the guest's next `emit` or forward pass.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Release);
    }

    /// Stops the actor for good (it is being deleted): the running guest call traps within
    /// one epoch check (every `STOP_CHECK` epoch ticks), even in a loop that never calls the host, and the
    /// actor takes no more messages.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
    }
}

/// How often a running guest is checked for [`Canceller::stop`], in epoch ticks: its
/// deadline is set at most this far ahead and moved on by the epoch callback.
pub(crate) const STOP_CHECK: u64 = 20;

/// The trap of a guest whose actor was stopped ([`Canceller::stop`]).
#[derive(Debug)]
struct Stopped;

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the actor was stopped")
    }
}

impl std::error::Error for Stopped {}

/// Guest time without a host call after which the guest counts as spinning and its thread
/// drops to the idle scheduling class ([`crate::sys`]), in epoch ticks (100 ms).
pub(crate) const DEMOTE_AFTER: u64 = 20;

/// The epoch callback: the guest call ends when its actor is stopped or its own running
/// time is spent ([`GuestDeadline`]); a guest that has gone [`DEMOTE_AFTER`] without calling
/// the host gets the idle scheduling class; otherwise it runs on to the next check.
fn epoch_check(
    mut store: wasmtime::StoreContextMut<'_, HostState>,
) -> wasmtime::Result<UpdateDeadline> {
    let state = store.data_mut();
    if !state.demoted && state.deadline.running_alone() >= DEMOTE_AFTER {
        crate::sys::lower_thread_priority();
        state.demoted = true;
    }
    if state.stopped.load(Ordering::Acquire) {
        return Err(wasmtime::Error::new(Stopped));
    }
    match state.deadline.left() {
        0 => Err(Trap::Interrupt.into()),
        left => Ok(UpdateDeadline::Continue(left.min(STOP_CHECK))),
    }
}

/// A sandboxed Wasm actor. Faults stay inside it: a trap poisons this actor only.
pub struct Actor {
    pub(crate) store: Store<HostState>,
    pub(crate) module: Arc<ActorModule>,
    pub(crate) instance: Instance,
    pub(crate) memory: Memory,
    alloc: TypedFunc<u32, u32>,
    on_message: TypedFunc<(u32, u32), i32>,
    deadline_ticks: u64,
    limit_ms: u128,
    pub(crate) poisoned: Option<String>,
    /// The last durable snapshot, which the next incremental one continues.
    pub(crate) lineage: Option<Lineage>,
    /// The last capture, until it is committed.
    pub(crate) captured: Option<Captured>,
    /// Where its restore spent its time, if it was restored.
    pub(crate) restored: Option<crate::snapshot::RestorePhases>,
}

impl Actor {
    /// Compiles and instantiates `wasm` (binary or text), then runs its `tern_init`.
    pub fn load(runtime: &Runtime, wasm: &[u8]) -> Result<Actor, ActorError> {
        Self::start(
            runtime,
            &Arc::new(ActorModule::new(runtime, "module", wasm)?),
        )
    }

    /// A new actor of `module`: instantiated, then initialized by its `tern_init`.
    pub fn start(runtime: &Runtime, module: &Arc<ActorModule>) -> Result<Actor, ActorError> {
        let mut actor = Self::instantiate(runtime, module)?;
        if let Some(init) = actor.instance.get_export(&mut actor.store, "tern_init") {
            let init = init
                .into_func()
                .and_then(|f| f.typed::<(), ()>(&actor.store).ok())
                .ok_or_else(|| {
                    ActorError::Module("export `tern_init` must be a function () -> ()".into())
                })?;
            actor.call("tern_init", |store| init.call(store, ()))?;
        }
        Ok(actor)
    }

    /// An instance of `module` with fresh host state, not yet initialized.
    pub(crate) fn instantiate(
        runtime: &Runtime,
        module: &Arc<ActorModule>,
    ) -> Result<Actor, ActorError> {
        let limits = runtime.limits;
        let state = HostState {
            device: runtime.device.clone(),
            memory: None,
            last_error: None,
            models: ModelState::new(runtime.models.clone(), runtime.kv.clone(), limits.kv_bytes),
            limits,
            clock: VirtualClock::new(runtime.clock.clone()),
            deadline: GuestDeadline::new(runtime.ticks.clone()),
            cancelled: Arc::new(AtomicBool::new(false)),
            stopped: Arc::new(AtomicBool::new(false)),
            written: PageSet::default(),
            demoted: false,
            output: Vec::new(),
            output_limit: limits.output_bytes,
            stream: None,
            limiter: Limiter {
                memory_bytes: limits.memory_bytes,
                refused: None,
            },
        };
        let mut store = Store::new(&runtime.engine, state);
        store.limiter(|s| &mut s.limiter);
        store.epoch_deadline_callback(epoch_check);
        store.data_mut().deadline.start(runtime.deadline_ticks());
        store.set_epoch_deadline(runtime.deadline_ticks().min(STOP_CHECK));
        let mut linker = Linker::new(&runtime.engine);
        abi::link(&mut linker, runtime.testing_probes)
            .map_err(|e| ActorError::Engine(format!("{e:#}")))?;
        let limit_ms = limits.call_time.as_millis();
        let instance =
            linker
                .instantiate(&mut store, &module.module)
                .map_err(|e| match classify(&e, "start", limit_ms, &store) {
                    ActorError::Trap { message, .. } if e.downcast_ref::<Trap>().is_none() => {
                        ActorError::Instantiate(message)
                    }
                    other => other,
                })?;
        let memory = instance.get_memory(&mut store, "memory").ok_or_else(|| {
            ActorError::Module("the module exports no memory named `memory`".into())
        })?;
        if !runtime.is_region_base(memory.data_ptr(&store)) {
            return Err(ActorError::Module(
                "the module's memory is not a Tern region".into(),
            ));
        }
        store.data_mut().memory = Some(memory);
        let alloc = typed(&instance, &mut store, "tern_alloc")?;
        let on_message = typed(&instance, &mut store, "tern_on_message")?;
        Ok(Actor {
            store,
            module: module.clone(),
            instance,
            memory,
            alloc,
            on_message,
            deadline_ticks: runtime.deadline_ticks(),
            limit_ms,
            poisoned: None,
            lineage: None,
            captured: None,
            restored: None,
        })
    }

    /// A handle that cancels the message this actor is handling, from any thread: its next
    /// `emit`, `forward` or `forward_top` returns the ABI's "cancelled" code (−12), so a guest
    /// that checks its results stops at its next token. The actor is not harmed; the next
    /// message runs normally.
    pub fn canceller(&self) -> Canceller {
        let state = self.store.data();
        Canceller {
            cancelled: state.cancelled.clone(),
            stopped: state.stopped.clone(),
        }
    }

    /// Streams every `emit` to `sink` as it happens, in addition to collecting it.
    pub fn on_output(&mut self, sink: impl FnMut(&[u8]) + Send + 'static) {
        self.store.data_mut().stream = Some(Box::new(sink));
    }

    /// Delivers one message: the guest allocates room for it, the host copies it in, and the
    /// guest's `tern_on_message` handles it.
    pub fn send(&mut self, message: &[u8]) -> Result<Reply, ActorError> {
        let len = u32::try_from(message.len()).map_err(|_| ActorError::Abi {
            export: "tern_alloc",
            message: "message larger than 4 GiB".into(),
        })?;
        let state = self.store.data_mut();
        state.output.clear();
        state.cancelled.store(false, Ordering::Release);
        let alloc = self.alloc.clone();
        let ptr = self.call("tern_alloc", |store| alloc.call(store, len))?;
        let memory = self.memory;
        let size = memory.data_size(&self.store);
        let range =
            guest_memory::check("tern_alloc result", size, ptr, len.into(), 1, 1).map_err(|e| {
                self.poison(ActorError::Abi {
                    export: "tern_alloc",
                    message: e.to_string(),
                })
            })?;
        memory.data_mut(&mut self.store)[range.offset()..range.offset() + range.bytes()]
            .copy_from_slice(message);
        (self.store.data_mut().written).mark(range.offset(), range.bytes());
        let on_message = self.on_message.clone();
        let code = self.call("tern_on_message", |store| {
            on_message.call(store, (ptr, len))
        })?;
        Ok(Reply {
            code,
            output: std::mem::take(&mut self.store.data_mut().output),
        })
    }

    /// The guest memory's base address: the Tern region every device sees.
    pub fn memory_base(&self) -> *const u8 {
        self.memory.data_ptr(&self.store)
    }

    /// The guest memory's size in bytes.
    pub fn memory_bytes(&self) -> usize {
        self.memory.data_size(&self.store)
    }

    /// The last ABI error message the guest caused, if any.
    pub fn last_error(&self) -> Option<&str> {
        self.store.data().last_error.as_deref()
    }

    /// Why this actor takes no more messages, if it failed.
    pub fn fault(&self) -> Option<&str> {
        self.poisoned.as_deref()
    }

    /// Runs one guest call under a fresh deadline; a trap poisons the actor.
    fn call<T>(
        &mut self,
        export: &'static str,
        f: impl FnOnce(&mut Store<HostState>) -> wasmtime::Result<T>,
    ) -> Result<T, ActorError> {
        if let Some(fault) = &self.poisoned {
            return Err(ActorError::Poisoned(fault.clone()));
        }
        self.store.data_mut().deadline.start(self.deadline_ticks);
        self.store
            .set_epoch_deadline(self.deadline_ticks.min(STOP_CHECK));
        match f(&mut self.store) {
            Ok(value) => Ok(value),
            Err(e) => {
                let err = classify(&e, export, self.limit_ms, &self.store);
                Err(self.poison(err))
            }
        }
    }

    fn poison(&mut self, err: ActorError) -> ActorError {
        self.poisoned = Some(err.to_string());
        err
    }
}

/// Refuses a module that lacks an export an actor needs, or has one of the wrong type.
fn check_exports(module: &Module) -> Result<(), ActorError> {
    use wasmtime::{ExternType, ValType};
    let func = |name: &str, params: &[ValType], results: &[ValType], required: bool| {
        let wanted = format!("a function ({params:?}) -> ({results:?})");
        match module.get_export(name) {
            None if required => Err(ActorError::Module(format!(
                "the module exports no `{name}` ({wanted})"
            ))),
            None => Ok(()),
            Some(ExternType::Func(f))
                if f.params()
                    .map(|p| p.to_string())
                    .eq(params.iter().map(|p| p.to_string()))
                    && f.results()
                        .map(|r| r.to_string())
                        .eq(results.iter().map(|r| r.to_string())) =>
            {
                Ok(())
            }
            Some(_) => Err(ActorError::Module(format!(
                "export `{name}` must be {wanted}"
            ))),
        }
    };
    if !matches!(module.get_export("memory"), Some(ExternType::Memory(_))) {
        return Err(ActorError::Module(
            "the module exports no memory named `memory`".into(),
        ));
    }
    func("tern_alloc", &[ValType::I32], &[ValType::I32], true)?;
    func(
        "tern_on_message",
        &[ValType::I32, ValType::I32],
        &[ValType::I32],
        true,
    )?;
    func("tern_init", &[], &[], false)
}

fn typed<P: wasmtime::WasmParams, R: wasmtime::WasmResults>(
    instance: &Instance,
    store: &mut Store<HostState>,
    name: &'static str,
) -> Result<TypedFunc<P, R>, ActorError> {
    instance
        .get_typed_func::<P, R>(store, name)
        .map_err(|e| ActorError::Module(format!("export `{name}`: {e:#}")))
}

/// Turns a Wasmtime error from a guest call into an [`ActorError`] that says what happened.
fn classify(
    e: &wasmtime::Error,
    export: &'static str,
    limit_ms: u128,
    store: &Store<HostState>,
) -> ActorError {
    if e.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
        return ActorError::TimeLimit { export, limit_ms };
    }
    if e.downcast_ref::<Stopped>().is_some() {
        return ActorError::Stopped { export };
    }
    if let Some(panic) = e.downcast_ref::<HostPanic>() {
        return ActorError::HostFault {
            export,
            message: panic.to_string(),
        };
    }
    // A trap's reason first, then where it happened (Wasmtime puts the backtrace first).
    let mut message = match (e.downcast_ref::<Trap>(), e.downcast_ref::<WasmBacktrace>()) {
        (Some(trap), Some(trace)) => format!("{trap}\n{trace}"),
        (Some(trap), None) => trap.to_string(),
        _ => format!("{e:#}"),
    };
    if let Some(bytes) = store.data().limiter.refused {
        message.push_str(&format!(
            " (memory growth to {bytes} bytes was refused earlier: the cap is {} bytes)",
            store.data().limiter.memory_bytes
        ));
    }
    ActorError::Trap { export, message }
}
