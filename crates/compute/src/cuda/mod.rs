//! The CUDA device: guest memory registered with the driver, kernels compiled by NVRTC.
//!
//! Each committed guest range is page-locked with `cuMemHostRegister(DEVICEMAP | PORTABLE)`
//! and its device pointer is checked to equal its host pointer, so kernels take guest
//! addresses as they are. Kernels are real `.cu` files under `kernels/`, compiled at open
//! time to a CUBIN for the device's own architecture.
//!
//! Built without the `cuda` feature, [`CudaDevice::open`] reports that CUDA support was not
//! compiled in, so callers need no `cfg`.

#[cfg(feature = "cuda")]
mod device;
#[cfg(feature = "cuda")]
mod nvrtc;
#[cfg(feature = "cuda")]
pub use cudarc;
#[cfg(feature = "cuda")]
pub use device::CudaDevice;
#[cfg(feature = "cuda")]
pub use nvrtc::compile_cubin;

#[cfg(not(feature = "cuda"))]
mod stub;
#[cfg(not(feature = "cuda"))]
pub use stub::CudaDevice;
