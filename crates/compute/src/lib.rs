//! Compute devices that read and write Tern's guest memory in place.
//!
//! A [`Device`] is also a [`HostMapper`]: attached to a [`tern_memory::Region`], it is told
//! about every committed range, and afterwards computes directly on slices of that region
//! with no staging copy. The CPU backend ([`cpu`]) is the readable reference; the CUDA
//! backend ([`cuda`]) registers committed ranges with the driver so that device pointers
//! equal host pointers; the wgpu backend ([`wgpu`]) imports them into Vulkan or wraps them
//! as Metal buffers.
//!
//! | CPU idea                 | device idea                                  |
//! |--------------------------|----------------------------------------------|
//! | a slice of guest memory  | the same addresses, registered for the GPU   |
//! | a function call          | a kernel launch, finished before returning   |

/// The `HostMapper` and `Device` impls of a backend's stand-in, an enum with no variants
/// (used when Tern is built without that backend): never constructed, so never called.
#[allow(unused_macros)]
macro_rules! absent_device {
    ($device:ty) => {
        // SAFETY: an enum with no variants is never constructed, so nothing is ever mapped.
        unsafe impl crate::HostMapper for $device {
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

        impl crate::Device for $device {
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
            ) -> Result<(), crate::ComputeError> {
                match *self {}
            }
            fn staged_matmul(
                &self,
                _: crate::MatmulDims,
            ) -> Result<Box<dyn crate::StagedMatmul + '_>, crate::ComputeError> {
                match *self {}
            }
        }
    };
}

pub mod cpu;
pub mod cuda;
pub mod testing;
pub mod wgpu;

use std::fmt;
use std::sync::Arc;

pub use tern_memory::{HostMapper, HostRange};

/// Errors from opening a device or running an operation on it.
#[derive(Debug, thiserror::Error)]
pub enum ComputeError {
    #[error("no CUDA device: {reason}")]
    NoCuda { reason: String },
    #[error("no wgpu device: {reason}")]
    NoWgpu { reason: String },
    #[error("operand `{operand}` has {actual} elements; {rows}x{cols} needs {expected}")]
    Shape {
        operand: &'static str,
        rows: usize,
        cols: usize,
        expected: usize,
        actual: usize,
    },
    #[error(
        "operand `{operand}` at {addr:#x} ({bytes} bytes) is not inside memory registered with {device}"
    )]
    NotRegistered {
        operand: &'static str,
        addr: usize,
        bytes: usize,
        device: String,
    },
    #[error("{device}: {what} failed: {reason}")]
    Driver {
        device: String,
        what: &'static str,
        reason: String,
    },
    #[error("kernel `{kernel}` failed to compile: {log}")]
    Compile { kernel: &'static str, log: String },
}

/// Which device to open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceChoice {
    Cpu,
    Cuda,
    /// A GPU through wgpu: Vulkan, or Metal on macOS.
    Wgpu,
    /// CUDA when a device is present, else (on macOS) Metal through wgpu, else the CPU.
    Auto,
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda),
            "wgpu" => Ok(DeviceChoice::Wgpu),
            "auto" => Ok(DeviceChoice::Auto),
            other => Err(format!(
                "unknown device `{other}` (expected cpu, cuda, wgpu or auto)"
            )),
        }
    }
}

/// Dimensions of `C[m×n] = A[m×k] · B[k×n]`, all row-major.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MatmulDims {
    pub m: usize,
    pub n: usize,
    pub k: usize,
}

impl MatmulDims {
    /// Checks that `a`, `b` and `c` have exactly the lengths these dimensions need.
    pub fn check(&self, a: usize, b: usize, c: usize) -> Result<(), ComputeError> {
        let expect = [
            ("a", self.m, self.k, a),
            ("b", self.k, self.n, b),
            ("c", self.m, self.n, c),
        ];
        for (operand, rows, cols, actual) in expect {
            let expected = rows.saturating_mul(cols);
            if expected != actual {
                return Err(ComputeError::Shape {
                    operand,
                    rows,
                    cols,
                    expected,
                    actual,
                });
            }
        }
        Ok(())
    }
}

/// A compute device. Operations run to completion before they return: no device work on a
/// slice outlives the call that lent it.
pub trait Device: HostMapper + fmt::Debug {
    /// Which backend this is.
    fn kind(&self) -> DeviceChoice;

    /// A one-line description ("cuda:0 NVIDIA H100 80GB HBM3 (sm_90)").
    fn describe(&self) -> String;

    /// `c = a · b` computed in place on the caller's memory. On devices that need it, every
    /// slice must lie inside ranges this device has mapped.
    fn matmul_f32(
        &self,
        a: &[f32],
        b: &[f32],
        c: &mut [f32],
        dims: MatmulDims,
    ) -> Result<(), ComputeError>;

    /// The copy path a runtime without shared memory takes: device-owned buffers for
    /// `dims`, filled by copying in, computed on, copied back out.
    fn staged_matmul(&self, dims: MatmulDims) -> Result<Box<dyn StagedMatmul + '_>, ComputeError>;

    /// The address at which this device sees host address `host`, if it sees it at all.
    /// Zero-copy means this equals `host`.
    fn device_address(&self, host: *const u8) -> Option<usize> {
        Some(host as usize)
    }

    /// Bytes of device memory in use now, where the device has memory of its own.
    fn device_memory_used(&self) -> Option<u64> {
        None
    }

    /// This device as a CUDA GPU, when it is one: models run their forward pass on it.
    fn as_cuda(&self) -> Option<&cuda::CudaDevice> {
        None
    }

    /// This device as a wgpu GPU, when it is one: models run their forward pass on it.
    fn as_wgpu(&self) -> Option<&wgpu::WgpuDevice> {
        None
    }
}

/// Device-owned operand buffers for the explicit-copy path.
pub trait StagedMatmul {
    /// Copies `a` and `b` in, computes, copies the result into `c`.
    fn run(&mut self, a: &[f32], b: &[f32], c: &mut [f32]) -> Result<(), ComputeError>;
}

/// Opens the chosen device. `Auto` picks CUDA when it is present, then (on macOS, where
/// the GPU shares memory with the host) Metal through wgpu, then the CPU.
pub fn open(choice: DeviceChoice) -> Result<Arc<dyn Device>, ComputeError> {
    match choice {
        DeviceChoice::Cpu => Ok(Arc::new(cpu::CpuDevice::new())),
        DeviceChoice::Cuda => Ok(Arc::new(cuda::CudaDevice::open(0)?)),
        DeviceChoice::Wgpu => Ok(Arc::new(wgpu::WgpuDevice::open()?)),
        DeviceChoice::Auto => {
            if let Ok(dev) = cuda::CudaDevice::open(0) {
                return Ok(Arc::new(dev));
            }
            if cfg!(target_os = "macos")
                && let Ok(dev) = wgpu::WgpuDevice::open()
            {
                return Ok(Arc::new(dev));
            }
            Ok(Arc::new(cpu::CpuDevice::new()))
        }
    }
}
