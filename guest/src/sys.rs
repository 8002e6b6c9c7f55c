//! The raw `tern` imports, and thin wrappers that pass slices as (offset, length) pairs.
//!
//! On targets other than wasm32 the imports are absent and every call returns -5
//! ("invalid"), so the SDK's own logic (samplers, parsing) can be unit-tested on the host.
// Off wasm32 the wrappers have no host to pass their arguments to.
#![cfg_attr(not(target_arch = "wasm32"), allow(unused_variables))]

#[cfg(target_arch = "wasm32")]
mod imports {
    #[link(wasm_import_module = "tern")]
    unsafe extern "C" {
        pub fn matmul_f32(a: *const f32, b: *const f32, c: *mut f32, m: u32, n: u32, k: u32)
        -> i32;
        pub fn emit(ptr: *const u8, len: u32) -> i32;
        pub fn last_error(buf: *mut u8, cap: u32) -> i32;
        pub fn model_open(name: *const u8, len: u32) -> i32;
        pub fn model_info(model: i32, out: *mut u8, cap: u32) -> i32;
        pub fn tokenize(model: i32, text: *const u8, len: u32, ids: *mut u32, cap: u32) -> i32;
        pub fn detokenize(model: i32, ids: *const u32, n: u32, out: *mut u8, cap: u32) -> i32;
        pub fn render_chat(model: i32, json: *const u8, len: u32, out: *mut u8, cap: u32) -> i32;
        pub fn session_open(model: i32, n_ctx: u32) -> i32;
        pub fn session_close(session: i32) -> i32;
        pub fn session_len(session: i32) -> i32;
        pub fn session_rewind(session: i32, len: u32) -> i32;
        pub fn forward(session: i32, ids: *const u32, n: u32, logits: *mut f32) -> i32;
        pub fn forward_top(
            session: i32,
            ids: *const u32,
            n: u32,
            logits: *mut f32,
            top: *mut crate::model::Candidate,
            k: u32,
        ) -> i32;
    }
}

/// The result of an import on a target where there is no host.
#[cfg(not(target_arch = "wasm32"))]
const NO_HOST: i32 = -5;

fn len32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

/// `tern.matmul_f32`.
pub fn matmul_f32(a: &[f32], b: &[f32], c: &mut [f32], m: usize, n: usize, k: usize) -> i32 {
    #[cfg(target_arch = "wasm32")]
    // SAFETY: the pointers come from live slices; the host validates every range against
    // guest memory and the shape, and writes only inside `c`.
    unsafe {
        imports::matmul_f32(
            a.as_ptr(),
            b.as_ptr(),
            c.as_mut_ptr(),
            len32(m),
            len32(n),
            len32(k),
        )
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        let _ = (a, b, c, len32(m), n, k);
        NO_HOST
    }
}

/// `tern.emit`.
pub fn emit(bytes: &[u8]) -> i32 {
    #[cfg(target_arch = "wasm32")]
    // SAFETY: the host only reads `bytes.len()` bytes from the slice's start.
    unsafe {
        imports::emit(bytes.as_ptr(), len32(bytes.len()))
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        let _ = bytes;
        NO_HOST
    }
}

/// `tern.last_error`: fills `buf` with up to its length of the message and returns the
/// message's full length (0 when there is none).
pub fn last_error(buf: &mut [u8]) -> usize {
    #[cfg(target_arch = "wasm32")]
    // SAFETY: the host writes at most `buf.len()` bytes from the slice's start.
    let n = unsafe { imports::last_error(buf.as_mut_ptr(), len32(buf.len())) };
    #[cfg(not(target_arch = "wasm32"))]
    let n = {
        let _ = buf;
        0
    };
    usize::try_from(n).unwrap_or(0)
}

/// Calls an import on wasm32; elsewhere evaluates to [`NO_HOST`]-style -5 without a host.
macro_rules! host {
    ($call:expr) => {{
        #[cfg(target_arch = "wasm32")]
        // SAFETY: every pointer passed comes from a live slice whose length is passed beside
        // it; the host validates each range against guest memory before touching it.
        let r = unsafe { $call };
        #[cfg(not(target_arch = "wasm32"))]
        let r = -5;
        r
    }};
}

/// `tern.model_open`.
pub fn model_open(name: &str) -> i32 {
    host!(imports::model_open(name.as_ptr(), len32(name.len())))
}

/// `tern.model_info`.
pub fn model_info(model: i32, out: &mut [u8]) -> i32 {
    host!(imports::model_info(
        model,
        out.as_mut_ptr(),
        len32(out.len())
    ))
}

/// `tern.tokenize`.
pub fn tokenize(model: i32, text: &str, ids: &mut [u32]) -> i32 {
    host!(imports::tokenize(
        model,
        text.as_ptr(),
        len32(text.len()),
        ids.as_mut_ptr(),
        len32(ids.len())
    ))
}

/// `tern.detokenize`.
pub fn detokenize(model: i32, ids: &[u32], out: &mut [u8]) -> i32 {
    host!(imports::detokenize(
        model,
        ids.as_ptr(),
        len32(ids.len()),
        out.as_mut_ptr(),
        len32(out.len())
    ))
}

/// `tern.render_chat`.
pub fn render_chat(model: i32, json: &str, out: &mut [u8]) -> i32 {
    host!(imports::render_chat(
        model,
        json.as_ptr(),
        len32(json.len()),
        out.as_mut_ptr(),
        len32(out.len())
    ))
}

/// `tern.session_open`: a session (KV cache) of `n_ctx` positions.
pub fn session_open(model: i32, n_ctx: u32) -> i32 {
    host!(imports::session_open(model, n_ctx))
}

/// `tern.session_close`.
pub fn session_close(session: i32) -> i32 {
    host!(imports::session_close(session))
}

/// `tern.session_len`.
pub fn session_len(session: i32) -> i32 {
    host!(imports::session_len(session))
}

/// `tern.session_rewind`.
pub fn session_rewind(session: i32, len: u32) -> i32 {
    host!(imports::session_rewind(session, len))
}

/// `tern.forward`.
pub fn forward(session: i32, ids: &[u32], logits: &mut [f32]) -> i32 {
    host!(imports::forward(
        session,
        ids.as_ptr(),
        len32(ids.len()),
        logits.as_mut_ptr()
    ))
}

/// `tern.forward_top`: `logits` `None` passes 0 (no logits written).
pub fn forward_top(
    session: i32,
    ids: &[u32],
    logits: Option<&mut [f32]>,
    top: &mut [crate::model::Candidate],
) -> i32 {
    let logits = logits.map_or(std::ptr::null_mut(), <[f32]>::as_mut_ptr);
    host!(imports::forward_top(
        session,
        ids.as_ptr(),
        len32(ids.len()),
        logits,
        top.as_mut_ptr(),
        len32(top.len())
    ))
}
