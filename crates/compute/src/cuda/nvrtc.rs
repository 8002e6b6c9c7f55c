//! Kernel compilation: CUDA C++ source to a CUBIN for one architecture, through NVRTC.

use std::ffi::{CStr, CString};

use cudarc::nvrtc::{result, sys};

use crate::ComputeError;

/// Compiles `src` (named `file` in messages) for `sm_{arch}` and returns the CUBIN; sm_90 as
/// sm_90a, with Hopper's own instructions (warpgroup mmas), which such a CUBIN may use since it
/// only ever runs on the GPU it was compiled for. `headers` are the (name, source) pairs its
/// `#include "name"` lines may name; nothing else is found.
pub fn compile_cubin(
    file: &'static str,
    src: &str,
    headers: &[(&str, &str)],
    arch: u32,
) -> Result<Vec<u8>, ComputeError> {
    let fail = |log: String| ComputeError::Compile { kernel: file, log };
    let c_str = |s: &str, what: &str| {
        CString::new(s).map_err(|_| fail(format!("{what} contains a NUL byte")))
    };
    let src = c_str(src, "source")?;
    let name = c_str(file, "name")?;
    let mut header_src = Vec::with_capacity(headers.len());
    let mut header_names = Vec::with_capacity(headers.len());
    for (n, h) in headers {
        header_names.push(c_str(n, "a header's name")?);
        header_src.push(c_str(h, "a header")?);
    }
    let src_ptrs: Vec<*const std::ffi::c_char> = header_src.iter().map(|h| h.as_ptr()).collect();
    let name_ptrs: Vec<*const std::ffi::c_char> = header_names.iter().map(|n| n.as_ptr()).collect();
    let count = i32::try_from(headers.len()).map_err(|_| fail("too many headers".into()))?;
    let mut prog: sys::nvrtcProgram = std::ptr::null_mut();
    // SAFETY: every pointer is a NUL-terminated string that outlives the call (the CStrings
    // above), the two arrays hold `count` entries each, and `prog` is a valid out-pointer.
    unsafe {
        sys::nvrtcCreateProgram(
            &mut prog,
            src.as_ptr(),
            name.as_ptr(),
            count,
            src_ptrs.as_ptr(),
            name_ptrs.as_ptr(),
        )
    }
    .result()
    .map_err(|e| fail(format!("{e:?}")))?;
    let options = [
        format!(
            "--gpu-architecture=sm_{arch}{}",
            if arch == 90 { "a" } else { "" }
        ),
        "--std=c++17".to_string(),
    ];
    // SAFETY: `prog` was just created and is destroyed only below.
    let compiled = unsafe { result::compile_program(prog, &options) };
    let out = match compiled {
        Ok(()) => cubin_of(prog).map_err(fail),
        Err(e) => {
            // SAFETY: `prog` is live; the log is a NUL-terminated C string.
            let log = unsafe { result::get_program_log(prog) }
                .map(|raw| {
                    unsafe { CStr::from_ptr(raw.as_ptr()) }
                        .to_string_lossy()
                        .into_owned()
                })
                .unwrap_or_default();
            Err(fail(format!("{e:?}: {log}")))
        }
    };
    // SAFETY: `prog` is live and not used after this.
    let _ = unsafe { result::destroy_program(prog) };
    out
}

fn cubin_of(prog: sys::nvrtcProgram) -> Result<Vec<u8>, String> {
    let mut size = 0usize;
    // SAFETY: `prog` is a successfully compiled program; `size` is a valid out-pointer.
    unsafe { sys::nvrtcGetCUBINSize(prog, &mut size) }
        .result()
        .map_err(|e| format!("nvrtcGetCUBINSize: {e:?}"))?;
    let mut cubin = vec![0u8; size];
    // SAFETY: `cubin` has exactly the size NVRTC reported for this program.
    unsafe { sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr().cast()) }
        .result()
        .map_err(|e| format!("nvrtcGetCUBIN: {e:?}"))?;
    Ok(cubin)
}
