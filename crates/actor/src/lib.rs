//! Sandboxed WebAssembly actors whose linear memory is Tern's own shared region.
//!
//! A [`Runtime`] owns one Wasmtime engine configured so that every linear memory is a
//! [`tern_memory::Region`] attached to the runtime's compute [`Device`]: the guest's pointer
//! is the device's pointer, and no byte is copied between them. An [`Actor`] is one module
//! instance in its own store, driven through the `tern` guest ABI ([`abi`]).
//!
//! Guarantees:
//! - Every guest-supplied offset, length, alignment and size product is checked in one
//!   place ([`guest_memory`]) before host or device code touches memory; a bad call returns
//!   a negative code and leaves a message for `tern.last_error`.
//! - A runaway guest is interrupted (epoch deadline, counting its own running time and not
//!   its time in host calls), memory is capped, and a trap poisons only that actor: every
//!   later call on it reports the original fault.
//! - A panic inside a host function is caught there: it traps the guest that made the call
//!   and poisons that actor only; the process and every other actor carry on.
//! - Host work on a guest's behalf is bounded: text in and out of host calls by size and
//!   time, KV caches by a per-actor and a per-runtime budget counted at `session_open`.
//! - Device work on guest memory completes before the host call that started it returns.
//! - Nothing an actor sees depends on when it runs: its clock is virtual ([`clock`]).

pub mod abi;
mod actor;
mod budget;
pub mod clock;
mod deadline;
pub mod dirty;
pub mod guest_memory;
mod incremental;
pub mod instrument;
mod models;
mod registry;
mod runtime;
mod snapshot;
mod sys;

pub use actor::{Actor, ActorModule, Canceller, Reply};
pub use budget::KvLedger;
pub use clock::WallClock;
pub use incremental::{COMPACT_AFTER_LINKS, ChainWrite};
pub use registry::{Locate, ModelRegistry, ModelSource, OpenError};
pub use runtime::{Limits, Runtime, RuntimeBuilder};
pub use snapshot::{Continuation, RestorePhases};
pub use tern_compute::Device;
pub use tern_snapshot::{SnapshotError, SnapshotFile, SnapshotView};

/// Errors from loading or driving an actor.
#[derive(Debug, thiserror::Error)]
pub enum ActorError {
    #[error("cannot set up the Wasm engine: {0}")]
    Engine(String),
    #[error("bad host configuration: {0}")]
    Config(String),
    #[error("invalid module: {0}")]
    Module(String),
    #[error("cannot instantiate the module: {0}")]
    Instantiate(String),
    #[error("the guest trapped in `{export}`: {message}")]
    Trap {
        export: &'static str,
        message: String,
    },
    #[error("the guest ran past its time limit of {limit_ms} ms in `{export}` and was interrupted")]
    TimeLimit {
        export: &'static str,
        limit_ms: u128,
    },
    #[error("the actor was stopped (deleted) while running `{export}`")]
    Stopped { export: &'static str },
    #[error("the guest broke the ABI in `{export}`: {message}")]
    Abi {
        export: &'static str,
        message: String,
    },
    #[error("a host function panicked in `{export}` while serving this actor: {message}")]
    HostFault {
        export: &'static str,
        message: String,
    },
    #[error("this actor failed earlier and takes no more messages ({0})")]
    Poisoned(String),
    #[error("cannot snapshot this actor: {0}")]
    Snapshot(String),
    #[error("the snapshot does not fit here: {0}")]
    Incompatible(String),
    #[error(transparent)]
    Format(#[from] tern_snapshot::SnapshotError),
}
