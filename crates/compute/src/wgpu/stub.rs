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
impl crate::HostMapper for WgpuDevice {
    fn mapper_name(&self) -> String {
        match *self {}
    }
    fn map_range(&self, _: crate::HostRange) -> Result<(), String> {
        match *self {}
    }
    fn unmap_range(&self, _: crate::HostRange) {
        match *self {}
    }
}

impl crate::Device for WgpuDevice {
    fn kind(&self) -> crate::DeviceChoice {
        match *self {}
    }
    fn describe(&self) -> String {
        match *self {}
    }
    fn matmul_f32(
        &self,
        _: &[f32],
        _: &[f32],
        _: &mut [f32],
        _: crate::MatmulDims,
    ) -> Result<(), ComputeError> {
        match *self {}
    }
    fn staged_matmul(
        &self,
        _: crate::MatmulDims,
    ) -> Result<Box<dyn crate::StagedMatmul + '_>, ComputeError> {
        match *self {}
    }
}
