//! Kernel compilation: CUDA C++ source to a CUBIN for one architecture, through NVRTC.

use std::ffi::{CStr, CString};

use cudarc::nvrtc::{result, sys};

use crate::ComputeError;

/// Compiles `src` (named `file` in messages) for `sm_{arch}` and returns the CUBIN.
pub fn compile_cubin(file: &'static str, src: &str, arch: u32) -> Result<Vec<u8>, ComputeError> {
    let fail = |log: String| ComputeError::Compile { kernel: file, log };
    let src = CString::new(src).map_err(|_| fail("source contains a NUL byte".into()))?;
    let name = CString::new(file).map_err(|_| fail("name contains a NUL byte".into()))?;
    let prog = result::create_program(&src, Some(&name)).map_err(|e| fail(format!("{e:?}")))?;
    let options = [
        format!("--gpu-architecture=sm_{arch}"),
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
