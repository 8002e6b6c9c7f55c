//! The `tern` guest ABI, version 1: the host functions a guest imports from module `tern`.
//!
//! All pointers are `u32` offsets into the guest's exported `memory`; lengths are bytes
//! unless named otherwise; results are `i32`, `>= 0` for success and `< 0` for an error code
//! whose message `last_error` returns. Codes are those of [`AbiError::code`].
//!
//! | import | signature | does |
//! |---|---|---|
//! | `matmul_f32(a, b, c, m, n, k)` | `(i32 x6) -> i32` | `C[m×n] = A[m×k]·B[k×n]` on the actor's device, in place |
//! | `emit(ptr, len)` | `(i32, i32) -> i32` | streams `len` bytes to whoever drives the actor |
//! | `last_error(buf, cap)` | `(i32, i32) -> i32` | copies up to `cap` bytes of the last error message; returns its full length |
//!
//! Guest exports: `memory`, `tern_alloc(len) -> ptr`, `tern_init()` (optional),
//! `tern_on_message(ptr, len) -> i32`.

use wasmtime::{Caller, Linker};

use crate::actor::HostState;
use crate::guest_memory::{self, AbiError, GuestMemory};
use tern_compute::MatmulDims;

/// The ABI version this host implements.
pub const ABI_VERSION: u32 = 1;

/// Adds every `tern` host function to `linker`.
pub(crate) fn link(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap("tern", "matmul_f32", matmul_f32)?;
    linker.func_wrap("tern", "emit", emit)?;
    linker.func_wrap("tern", "last_error", last_error)?;
    crate::models::link(linker)
}

/// Runs `body` on the caller's memory; an error becomes its code and its message is kept
/// for `last_error`.
pub(crate) fn with_memory(
    caller: &mut Caller<'_, HostState>,
    body: impl FnOnce(&mut GuestMemory<'_>, &mut HostState) -> Result<i32, AbiError>,
) -> i32 {
    let Some(memory) = caller.data().memory else {
        caller.data_mut().last_error = Some("the guest has no memory".into());
        return AbiError::Invalid(String::new()).code();
    };
    let (data, state) = memory.data_and_store_mut(caller);
    let result = body(&mut GuestMemory::new(data), state);
    match result {
        Ok(value) => value,
        Err(e) => {
            let code = e.code();
            state.last_error = Some(e.to_string());
            code
        }
    }
}

fn matmul_f32(
    mut caller: Caller<'_, HostState>,
    a: u32,
    b: u32,
    c: u32,
    m: u32,
    n: u32,
    k: u32,
) -> i32 {
    with_memory(&mut caller, |mem, state| {
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

fn emit(mut caller: Caller<'_, HostState>, ptr: u32, len: u32) -> i32 {
    with_memory(&mut caller, |mem, state| {
        let range = guest_memory::check("emit", mem.len(), ptr, len.into(), 1, 1)?;
        state.emit(mem.bytes(range))?;
        Ok(0)
    })
}

fn last_error(mut caller: Caller<'_, HostState>, buf: u32, cap: u32) -> i32 {
    with_memory(&mut caller, |mem, state| {
        let message = state.last_error.clone().unwrap_or_default();
        let n = message.len().min(cap as usize);
        let range = guest_memory::check("last_error", mem.len(), buf, n as u64, 1, 1)?;
        mem.bytes_mut(range)
            .copy_from_slice(&message.as_bytes()[..n]);
        Ok(i32::try_from(message.len()).unwrap_or(i32::MAX))
    })
}
