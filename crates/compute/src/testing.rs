//! Helpers for tests that need a GPU: they run where one is present and report themselves
//! skipped, with the reason, where not. With `TERN_REQUIRE_CUDA=1` (the GPU suite sets it)
//! a missing GPU fails the test instead; `TERN_REQUIRE_WGPU=1` does the same for wgpu.

use std::sync::Arc;

use crate::{Device, DeviceChoice};

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
