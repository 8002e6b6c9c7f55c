//! Guest memory wrapped as Metal buffers with `newBufferWithBytesNoCopy`, through wgpu-hal.
//! Type-checked on other hosts with `cargo check --target aarch64-apple-darwin`.

use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use objc2_metal::{MTLDevice, MTLResourceOptions};
use wgpu::hal;
use wgpu::hal::api::Metal;

use super::device::{Imported, ready};
use crate::HostRange;

/// Apple Silicon's page size: wrapped memory must start and end on it.
const PAGE: usize = 16 << 10;

/// Wraps host ranges for one Metal device.
pub(super) struct Importer;

impl Importer {
    pub const HOW: &'static str = "newBufferWithBytesNoCopy";

    /// Opens the device; every Metal device on Apple Silicon shares memory with the host.
    #[allow(clippy::type_complexity)]
    pub fn open(
        adapter: &wgpu::Adapter,
        desc: &wgpu::DeviceDescriptor<'_>,
    ) -> Result<(wgpu::Device, wgpu::Queue, Result<Importer, String>), String> {
        let (device, queue) = ready(adapter.request_device(desc))
            .ok_or("the device request did not complete")?
            .map_err(|e| format!("opening the device: {e}"))?;
        let importer = if adapter.get_info().backend == wgpu::Backend::Metal {
            Ok(Importer)
        } else {
            Err("the adapter is not a Metal adapter".into())
        };
        Ok((device, queue, importer))
    }

    /// Wraps `range` as a shared-storage buffer over the same pages.
    pub fn import(&self, device: &wgpu::Device, range: HostRange) -> Result<Imported, String> {
        if range.addr % PAGE != 0 || range.bytes % PAGE != 0 {
            return Err(format!("range {range} is not aligned to 16 KiB pages"));
        }
        let ptr = NonNull::new(range.addr as *mut std::ffi::c_void).ok_or("a null range")?;
        // SAFETY: a query only; the guard is dropped at the end of the statement.
        let raw = unsafe { device.as_hal::<Metal>() }
            .map(|d| d.raw_device().clone())
            .ok_or("the device is not a Metal device")?;
        // SAFETY: `ptr` starts `range.bytes` of committed, page-aligned memory that stays
        // mapped until `unmap_range`, which releases this buffer first; no deallocator, as
        // the region owns the pages.
        let buffer = unsafe {
            raw.newBufferWithBytesNoCopy_length_options_deallocator(
                ptr,
                range.bytes,
                MTLResourceOptions::StorageModeShared,
                None,
            )
        }
        .ok_or("newBufferWithBytesNoCopy returned nil")?;
        let released = Arc::new(AtomicBool::new(false));
        let size = range.bytes as u64;
        // SAFETY: the buffer was made on this device and is `size` bytes long.
        let hal_buffer = unsafe { hal::metal::Device::buffer_from_raw(buffer, size) };
        // SAFETY: the buffer belongs to this device, has the usages below (Metal buffers have
        // no usage flags), and its contents (guest memory) count as initialized.
        let buffer = unsafe {
            device.create_buffer_from_hal::<Metal>(
                hal_buffer,
                &wgpu::BufferDescriptor {
                    label: Some("guest memory"),
                    size,
                    usage: wgpu::BufferUsages::STORAGE
                        | wgpu::BufferUsages::COPY_SRC
                        | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                },
            )
        };
        // Metal releases the buffer when its last reference goes, which `unmap_range` waits
        // for by polling the device; nothing else is owned here.
        released.store(true, Ordering::Release);
        Ok(Imported { buffer, released })
    }

    /// Shared storage is coherent once a command buffer completes: nothing to submit.
    pub fn host_barrier(&self, _device: &wgpu::Device, _queue: &wgpu::Queue) {}
}
