//! The portable GPU device: wgpu over Vulkan (Linux, Windows) or Metal (macOS), computing on
//! guest memory without copies where the platform allows it.
//!
//! Zero-copy, by platform:
//! - Vulkan: each committed guest range is imported as device memory with
//!   `VK_EXT_external_memory_host` (which wgpu does not enable by itself: the device is
//!   opened through wgpu-hal with the extension added), bound to a `VkBuffer` and handed to
//!   wgpu as an externally owned buffer. Ranges committed by `memory.grow` are imported as
//!   they come; each import is released before its range is unmapped. Results the GPU wrote
//!   are made visible to the host by a barrier submitted on its own.
//! - Metal: each committed range (16 KiB-aligned on Apple Silicon) is wrapped with
//!   `newBufferWithBytesNoCopy` and handed to wgpu through its hal layer.
//! - Otherwise (the extension is missing, or a range is not aligned as the driver needs), the
//!   device copies operands into its own buffers and results back, and
//!   [`WgpuDevice::guest_access`] says so and why.
//!
//! Built without the `wgpu` feature, [`WgpuDevice::open`] reports that support was not
//! compiled in, so callers need no `cfg`.

#[cfg(feature = "wgpu")]
mod device;
#[cfg(all(feature = "wgpu", target_vendor = "apple"))]
mod metal;
#[cfg(all(feature = "wgpu", not(target_vendor = "apple")))]
mod vulkan;
#[cfg(feature = "wgpu")]
pub use device::{GuestAccess, GuestSlice, WgpuDevice, compute_pipeline};
#[cfg(feature = "wgpu")]
pub use wgpu;

#[cfg(not(feature = "wgpu"))]
mod stub;
#[cfg(not(feature = "wgpu"))]
pub use stub::WgpuDevice;
