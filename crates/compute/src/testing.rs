//! Helpers for tests that need a GPU: they run where one is present and report themselves
//! skipped, with the reason, where not. With `TERN_REQUIRE_CUDA=1` (the GPU suite sets it)
//! a missing GPU fails the test instead; `TERN_REQUIRE_WGPU=1` does the same for wgpu.

use std::sync::Arc;

use crate::{Device, DeviceChoice, MatmulDims};

/// The CUDA device, or `None` after printing why the calling test is skipped.
pub fn cuda_or_skip(test: &str) -> Option<Arc<dyn Device>> {
    match crate::open(DeviceChoice::Cuda) {
        Ok(device) => Some(device),
        Err(e) if std::env::var_os("TERN_REQUIRE_CUDA").is_some_and(|v| v == "1") => {
            panic!("{test}: TERN_REQUIRE_CUDA=1 but {e}")
        }
        Err(e) => {
            // Written to the process's stderr directly, past the test harness's capture,
            // so a skipped GPU test says so in every run.
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "{test}: skipped: {e}");
            None
        }
    }
}

/// The wgpu device (Vulkan, or Metal on macOS; a CPU Vulkan driver such as lavapipe counts),
/// or `None` after printing why the calling test is skipped.
pub fn wgpu_or_skip(test: &str) -> Option<Arc<dyn Device>> {
    match crate::open(DeviceChoice::Wgpu) {
        Ok(device) => Some(device),
        Err(e) if std::env::var_os("TERN_REQUIRE_WGPU").is_some_and(|v| v == "1") => {
            panic!("{test}: TERN_REQUIRE_WGPU=1 but {e}")
        }
        Err(e) => {
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "{test}: skipped: {e}");
            None
        }
    }
}

/// Small integers, so every sum is exact in f32 and any correct device agrees bit for bit.
pub fn exact_f32(len: usize, seed: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * 7 + seed * 13 + i / 97) % 17) as f32 - 8.0)
        .collect()
}

/// Carves the operands of a matmul of `dims` out of `bytes` at byte offsets `at` (a, b, c,
/// in that order, 4-byte aligned, not overlapping): a and b filled with [`exact_f32`] values,
/// c with NaN.
pub fn operands(
    bytes: &mut [u8],
    at: [usize; 3],
    dims: MatmulDims,
) -> (&[f32], &[f32], &mut [f32]) {
    let MatmulDims { m, n, k } = dims;
    let (a_end, b_end, c_end) = (at[0] + 4 * m * k, at[1] + 4 * k * n, at[2] + 4 * m * n);
    assert!(a_end <= at[1] && b_end <= at[2] && c_end <= bytes.len());
    let (rest, c) = bytes[..c_end].split_at_mut(at[2]);
    let (rest, b) = rest[..b_end].split_at_mut(at[1]);
    let a = &mut rest[at[0]..a_end];
    let [a, b, c] = [a, b, c].map(|s| {
        assert!(
            s.as_ptr().align_offset(4) == 0,
            "operands must be 4-byte aligned"
        );
        // SAFETY: 4-byte aligned (asserted), a whole number of floats long, and every bit
        // pattern is a valid f32; the borrow of `bytes` carries over.
        unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast::<f32>(), s.len() / 4) }
    });
    a.copy_from_slice(&exact_f32(m * k, 1));
    b.copy_from_slice(&exact_f32(k * n, 2));
    c.fill(f32::NAN);
    (a, b, c)
}

/// C = A B on the CPU reference device.
pub fn cpu_matmul(a: &[f32], b: &[f32], dims: MatmulDims) -> Vec<f32> {
    let mut c = vec![0.0; dims.m * dims.n];
    crate::cpu::CpuDevice::new()
        .matmul_f32(a, b, &mut c, dims)
        .expect("the CPU device takes every operand");
    c
}
