//! Stand-in used when Tern is built without the `cuda` feature.

use crate::ComputeError;

/// Never constructed: opening always reports that CUDA support is absent.
#[derive(Debug)]
pub enum CudaDevice {}

impl CudaDevice {
    pub fn open(_ordinal: usize) -> Result<CudaDevice, ComputeError> {
        Err(ComputeError::NoCuda {
            reason: "this build of tern has no CUDA support".into(),
        })
    }
}

absent_device!(CudaDevice);
