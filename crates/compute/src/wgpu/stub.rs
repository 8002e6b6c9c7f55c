//! Stand-in used when Tern is built without the `wgpu` feature.

use crate::ComputeError;

/// Never constructed: opening always reports that wgpu support is absent.
#[derive(Debug)]
pub enum WgpuDevice {}

impl WgpuDevice {
    pub fn open() -> Result<WgpuDevice, ComputeError> {
        Err(ComputeError::NoWgpu {
            reason: "this build of tern has no wgpu support".into(),
        })
    }

    pub fn open_copying() -> Result<WgpuDevice, ComputeError> {
        Self::open()
    }
}

absent_device!(WgpuDevice);
