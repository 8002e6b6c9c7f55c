//! The raw `tern` imports, and thin wrappers that pass slices as (offset, length) pairs.
//!
//! On targets other than wasm32 the imports are absent and every call returns -5
//! ("invalid"), so the SDK's own logic (samplers, parsing) can be unit-tested on the host.

#[cfg(target_arch = "wasm32")]
mod imports {
    #[link(wasm_import_module = "tern")]
    unsafe extern "C" {
        pub fn matmul_f32(a: *const f32, b: *const f32, c: *mut f32, m: u32, n: u32, k: u32)
        -> i32;
        pub fn emit(ptr: *const u8, len: u32) -> i32;
        pub fn last_error(buf: *mut u8, cap: u32) -> i32;
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
