//! The `tern` guest ABI, version 1: the host functions a guest imports from module `tern`.
//!
//! All pointers are `u32` offsets into the guest's exported `memory`; lengths are bytes
//! unless named otherwise; results are `i32`, `>= 0` for success and `< 0` for an error code
//! whose message `last_error` returns.
//!
//! | import | signature | does |
//! |---|---|---|
//! | `matmul_f32(a, b, c, m, n, k)` | `(i32 x6) -> i32` | `C[m×n] = A[m×k]·B[k×n]` on the actor's device, in place |
//! | `emit(ptr, len)` | `(i32, i32) -> i32` | streams `len` bytes to whoever drives the actor |
//! | `last_error(buf, cap)` | `(i32, i32) -> i32` | copies up to `cap` bytes of the last error message; returns its full length |
//!
//! The model functions are listed in `models.rs`' documentation.
//!
//! Error codes ([`AbiError::code`]), so that a guest can tell a mistake of its own from a
//! host that cannot serve it:
//!
//! | code | meaning |
//! |---|---|
//! | −1, −2, −3, −4 | a pointer argument is out of bounds, misaligned, overflows, or an output aliases an input |
//! | −5 | any other bad argument (an unknown handle, a token outside the vocabulary, ...) |
//! | −6 | the compute device failed (a CUDA or wgpu error): the call may work elsewhere |
//! | −7 | the message's output limit is reached |
//! | −8 | no such model on this host |
//! | −9 | a budget is exhausted: KV-cache bytes (the actor's or the host's), open sessions |
//! | −10 | the input or output of host work is over the host's size limit |
//! | −11 | host work ran past the host's time limit, or past its work bound (a chat template's fuel) |
//! | −12 | the message was cancelled (its sender stopped waiting): stop and return |
//!
//! A host function that panics does not return: the guest traps, and the actor is poisoned
//! (every later call reports the fault); other actors carry on.
//!
//! Guest exports: `memory`, `tern_alloc(len) -> ptr`, `tern_init()` (optional),
//! `tern_on_message(ptr, len) -> i32`.

use std::panic::{AssertUnwindSafe, catch_unwind};

use wasmtime::{AsContextMut, Caller, Linker};

use crate::actor::HostState;
use crate::guest_memory::{self, AbiError, GuestMemory};
use tern_compute::MatmulDims;

/// The ABI version this host implements.
pub const ABI_VERSION: u32 = 1;

/// Adds every `tern` host function to `linker`; `testing_probes` adds `testing_panic` and
/// `testing_sleep` too.
pub(crate) fn link(linker: &mut Linker<HostState>, testing_probes: bool) -> wasmtime::Result<()> {
    linker.func_wrap("tern", "matmul_f32", matmul_f32)?;
    linker.func_wrap("tern", "emit", emit)?;
    linker.func_wrap("tern", "last_error", last_error)?;
    if testing_probes {
        linker.func_wrap("tern", "testing_panic", testing_panic)?;
        linker.func_wrap("tern", "testing_sleep", testing_sleep)?;
    }
    crate::models::link(linker)
}

/// A panic caught in a host function: it traps the guest that made the call.
#[derive(Debug, thiserror::Error)]
#[error("host function `{function}` panicked: {message}")]
pub(crate) struct HostPanic {
    pub(crate) function: &'static str,
    pub(crate) message: String,
}

/// Runs host function `function`'s `body` on the caller's memory. An error becomes its
/// code, its message kept for `last_error`. A panic is caught here, so it never unwinds
/// through the guest into the thread that drives the actor (or other actors): it becomes a
/// trap of this actor, which poisons it.
pub(crate) fn with_memory(
    caller: &mut Caller<'_, HostState>,
    function: &'static str,
    body: impl FnOnce(&mut GuestMemory<'_>, &mut HostState) -> Result<i32, AbiError>,
) -> wasmtime::Result<i32> {
    let Some(memory) = caller.data().memory else {
        caller.data_mut().last_error = Some("the guest has no memory".into());
        return Ok(AbiError::Invalid(String::new()).code());
    };
    let started = caller.data().deadline.now();
    let (data, state) = memory.data_and_store_mut(&mut *caller);
    // The state a panicking body leaves may be half-updated; the actor is poisoned by the
    // trap, so nothing reads that state again except a snapshot, which a poisoned actor
    // refuses.
    let mut guest = GuestMemory::new(data);
    let result = catch_unwind(AssertUnwindSafe(|| body(&mut guest, &mut *state)));
    for &(offset, len) in guest.written() {
        state.written.mark(offset, len);
    }
    // Time in the host is not the guest's: move the deadline out by as much.
    let ticks_left = state.deadline.extend_since(started);
    if let Some(ticks) = ticks_left {
        caller
            .as_context_mut()
            .set_epoch_deadline(ticks.min(crate::actor::STOP_CHECK));
    }
    let state = caller.data_mut();
    match result {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => {
            let code = e.code();
            state.last_error = Some(e.to_string());
            Ok(code)
        }
        Err(payload) => {
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".into());
            Err(wasmtime::Error::new(HostPanic { function, message }))
        }
    }
}

/// `testing_panic()`: panics inside the host (linked only with
/// [`crate::RuntimeBuilder::testing_probes`]).
fn testing_panic(mut caller: Caller<'_, HostState>) -> wasmtime::Result<i32> {
    with_memory(&mut caller, "testing_panic", |_, _| {
        panic!("testing_panic was called")
    })
}

fn matmul_f32(
    mut caller: Caller<'_, HostState>,
    a: u32,
    b: u32,
    c: u32,
    m: u32,
    n: u32,
    k: u32,
) -> wasmtime::Result<i32> {
    with_memory(&mut caller, "matmul_f32", |mem, state| {
        let len = mem.len();
        let (mk, kn, mn) = (
            guest_memory::product("m*k", m, k)?,
            guest_memory::product("k*n", k, n)?,
            guest_memory::product("m*n", m, n)?,
        );
        let a = guest_memory::check("a", len, a, mk, 4, 4)?;
        let b = guest_memory::check("b", len, b, kn, 4, 4)?;
        let c = guest_memory::check("c", len, c, mn, 4, 4)?;
        let (a, b, c) = mem.f32_in_in_out(a, b, c)?;
        let dims = MatmulDims {
            m: m as usize,
            n: n as usize,
            k: k as usize,
        };
        state.device.matmul_f32(a, b, c, dims)?;
        Ok(0)
    })
}

fn emit(mut caller: Caller<'_, HostState>, ptr: u32, len: u32) -> wasmtime::Result<i32> {
    with_memory(&mut caller, "emit", |mem, state| {
        let range = guest_memory::check("emit", mem.len(), ptr, len.into(), 1, 1)?;
        state.emit(mem.bytes(range))?;
        Ok(0)
    })
}

fn last_error(mut caller: Caller<'_, HostState>, buf: u32, cap: u32) -> wasmtime::Result<i32> {
    with_memory(&mut caller, "last_error", |mem, state| {
        let message = state.last_error.clone().unwrap_or_default();
        let n = message.len().min(cap as usize);
        let range = guest_memory::check("last_error", mem.len(), buf, n as u64, 1, 1)?;
        mem.bytes_mut(range)
            .copy_from_slice(&message.as_bytes()[..n]);
        Ok(i32::try_from(message.len()).unwrap_or(i32::MAX))
    })
}

/// `testing_sleep(ms)`: spends `ms` milliseconds in the host (linked only with
/// [`crate::RuntimeBuilder::testing_probes`]).
fn testing_sleep(mut caller: Caller<'_, HostState>, ms: u32) -> wasmtime::Result<i32> {
    with_memory(&mut caller, "testing_sleep", |_, _| {
        std::thread::sleep(std::time::Duration::from_millis(ms.into()));
        Ok(0)
    })
}
