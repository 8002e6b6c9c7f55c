//! Guest memory imported into Vulkan with `VK_EXT_external_memory_host`, through wgpu-hal.

use std::ffi::c_void;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use ash::vk;
use wgpu::hal;
use wgpu::hal::api::Vulkan;

use super::device::{Imported, ready};
use crate::HostRange;

const EXTENSION: &std::ffi::CStr = ash::ext::external_memory_host::NAME;
const HOST_ALLOCATION: vk::ExternalMemoryHandleTypeFlags =
    vk::ExternalMemoryHandleTypeFlags::HOST_ALLOCATION_EXT;

/// Imports host ranges into one Vulkan device.
pub(super) struct Importer {
    raw: ash::Device,
    host: ash::ext::external_memory_host::Device,
    /// `minImportedHostPointerAlignment`: imported addresses and sizes are multiples of it.
    align: u64,
    memory_types: Vec<vk::MemoryType>,
}

impl Importer {
    pub const HOW: &'static str = "VK_EXT_external_memory_host";

    /// Opens the device, with the extension enabled when the driver has it; the importer is
    /// the reason for the copy path when it does not.
    #[allow(clippy::type_complexity)]
    pub fn open(
        adapter: &wgpu::Adapter,
        desc: &wgpu::DeviceDescriptor<'_>,
    ) -> Result<(wgpu::Device, wgpu::Queue, Result<Importer, String>), String> {
        let plain = |reason: String| {
            let (device, queue) = ready(adapter.request_device(desc))
                .ok_or("the device request did not complete")?
                .map_err(|e| format!("opening the device: {e}"))?;
            Ok((device, queue, Err(reason)))
        };
        // SAFETY: the guard is dropped before the adapter is used through wgpu again.
        let Some(hal_adapter) = (unsafe { adapter.as_hal::<Vulkan>() }) else {
            return plain("the adapter is not a Vulkan adapter".into());
        };
        if !hal_adapter
            .physical_device_capabilities()
            .supports_extension(EXTENSION)
        {
            drop(hal_adapter);
            return plain("the Vulkan driver lacks VK_EXT_external_memory_host".into());
        }
        let instance = hal_adapter.shared_instance().raw_instance().clone();
        let phd = hal_adapter.raw_physical_device();
        let add_extension: Box<hal::vulkan::CreateDeviceCallback<'_>> =
            Box::new(|args| args.extensions.push(EXTENSION));
        // SAFETY: the features and limits are the adapter's own (a subset of what it
        // supports), and the callback only adds an extension the adapter supports.
        let open = unsafe {
            hal_adapter.open_with_callback(
                desc.required_features,
                &desc.required_limits,
                &desc.memory_hints,
                Some(add_extension),
            )
        }
        .map_err(|e| format!("opening the Vulkan device: {e}"))?;
        drop(hal_adapter);
        // SAFETY: `open` was created from this adapter with `desc`'s features.
        let (device, queue) = unsafe { adapter.create_device_from_hal(open, desc) }
            .map_err(|e| format!("opening the device: {e}"))?;
        let mut host_props = vk::PhysicalDeviceExternalMemoryHostPropertiesEXT::default();
        let mut props = vk::PhysicalDeviceProperties2::default().push_next(&mut host_props);
        // SAFETY: `phd` is the adapter's physical device of this live instance.
        unsafe { instance.get_physical_device_properties2(phd, &mut props) };
        let align = host_props.min_imported_host_pointer_alignment.max(1);
        // SAFETY: as above.
        let memory = unsafe { instance.get_physical_device_memory_properties(phd) };
        let memory_types = memory.memory_types_as_slice().to_vec();
        // SAFETY: a query of the device just opened; the guard is dropped at once.
        let raw = unsafe { device.as_hal::<Vulkan>() }
            .map(|d| d.raw_device().clone())
            .ok_or("the device is not a Vulkan device")?;
        let host = ash::ext::external_memory_host::Device::new(&instance, &raw);
        let importer = Importer {
            raw,
            host,
            align,
            memory_types,
        };
        Ok((device, queue, Ok(importer)))
    }

    /// Imports `range` as a storage buffer over the same pages.
    pub fn import(&self, device: &wgpu::Device, range: HostRange) -> Result<Imported, String> {
        let bytes = range.bytes as u64;
        if !(range.addr as u64).is_multiple_of(self.align) || !bytes.is_multiple_of(self.align) {
            return Err(format!(
                "range {range} is not aligned to the driver's {} bytes",
                self.align
            ));
        }
        let ptr = range.addr as *mut c_void;
        let mut pointer_props = vk::MemoryHostPointerPropertiesEXT::default();
        // SAFETY: `ptr` is the start of committed memory that stays mapped until
        // `unmap_range`, which releases the import first.
        unsafe {
            (self.host.fp().get_memory_host_pointer_properties_ext)(
                self.host.device(),
                HOST_ALLOCATION,
                ptr,
                &mut pointer_props,
            )
        }
        .result()
        .map_err(|e| format!("vkGetMemoryHostPointerPropertiesEXT: {e}"))?;
        let mut external =
            vk::ExternalMemoryBufferCreateInfo::default().handle_types(HOST_ALLOCATION);
        let info = vk::BufferCreateInfo::default()
            .size(bytes)
            .usage(
                vk::BufferUsageFlags::STORAGE_BUFFER
                    | vk::BufferUsageFlags::TRANSFER_SRC
                    | vk::BufferUsageFlags::TRANSFER_DST,
            )
            .sharing_mode(vk::SharingMode::EXCLUSIVE)
            .push_next(&mut external);
        // SAFETY: a valid create info on this device.
        let buffer = unsafe { self.raw.create_buffer(&info, None) }
            .map_err(|e| format!("vkCreateBuffer: {e}"))?;
        let destroy_buffer = || {
            // SAFETY: the buffer was created above and nothing uses it yet.
            unsafe { self.raw.destroy_buffer(buffer, None) }
        };
        // SAFETY: `buffer` is a live buffer of this device.
        let needs = unsafe { self.raw.get_buffer_memory_requirements(buffer) };
        let Some(type_index) =
            self.memory_type(needs.memory_type_bits & pointer_props.memory_type_bits)
        else {
            destroy_buffer();
            return Err("no memory type can hold both the buffer and the host pointer".into());
        };
        let mut import = vk::ImportMemoryHostPointerInfoEXT::default()
            .handle_type(HOST_ALLOCATION)
            .host_pointer(ptr);
        let alloc = vk::MemoryAllocateInfo::default()
            .allocation_size(bytes)
            .memory_type_index(type_index)
            .push_next(&mut import);
        // SAFETY: the pointer and size are aligned to minImportedHostPointerAlignment
        // (checked) and the memory type is one the pointer allows.
        let memory = match unsafe { self.raw.allocate_memory(&alloc, None) } {
            Ok(m) => m,
            Err(e) => {
                destroy_buffer();
                return Err(format!("vkAllocateMemory (host pointer import): {e}"));
            }
        };
        // SAFETY: both objects are live and the memory is exactly the buffer's size.
        if let Err(e) = unsafe { self.raw.bind_buffer_memory(buffer, memory, 0) } {
            destroy_buffer();
            // SAFETY: allocated above, never bound.
            unsafe { self.raw.free_memory(memory, None) };
            return Err(format!("vkBindBufferMemory: {e}"));
        }
        let released = Arc::new(AtomicBool::new(false));
        let (raw, done) = (self.raw.clone(), released.clone());
        let on_drop: hal::DropCallback = Box::new(move || {
            // SAFETY: wgpu drops its hal buffer only once no submitted work uses it; the
            // buffer and memory were made for it alone.
            unsafe {
                raw.destroy_buffer(buffer, None);
                raw.free_memory(memory, None);
            }
            done.store(true, Ordering::Release);
        });
        // SAFETY: the buffer outlives the hal buffer (it is destroyed by its drop callback).
        let hal_buffer = unsafe { hal::vulkan::Buffer::from_raw_externally_owned(buffer, on_drop) };
        // SAFETY: the buffer was created on this device with the usages below, its memory is
        // bound, and its contents (guest memory) count as initialized.
        let buffer = unsafe {
            device.create_buffer_from_hal::<Vulkan>(
                hal_buffer,
                &wgpu::BufferDescriptor {
                    label: Some("guest memory"),
                    size: bytes,
                    usage: wgpu::BufferUsages::STORAGE
                        | wgpu::BufferUsages::COPY_SRC
                        | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                },
            )
        };
        Ok(Imported { buffer, released })
    }

    /// The index of a memory type among `bits`, host-coherent ones first.
    fn memory_type(&self, bits: u32) -> Option<u32> {
        let allowed = |i: &usize| bits & (1 << i) != 0;
        let coherent =
            vk::MemoryPropertyFlags::HOST_VISIBLE | vk::MemoryPropertyFlags::HOST_COHERENT;
        (0..self.memory_types.len())
            .filter(allowed)
            .find(|&i| self.memory_types[i].property_flags.contains(coherent))
            .or_else(|| (0..self.memory_types.len()).find(allowed))
            .map(|i| i as u32)
    }

    /// Submits, on its own, a barrier that makes shader and transfer writes visible to host
    /// reads (wgpu does not record raw commands in an encoder that has wgpu commands).
    pub fn host_barrier(&self, device: &wgpu::Device, queue: &wgpu::Queue) {
        let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("host barrier"),
        });
        let barrier = vk::MemoryBarrier::default()
            .src_access_mask(vk::AccessFlags::SHADER_WRITE | vk::AccessFlags::TRANSFER_WRITE)
            .dst_access_mask(vk::AccessFlags::HOST_READ);
        // SAFETY: the encoder holds no wgpu commands; the barrier is recorded into its open
        // command buffer, which wgpu ends and submits.
        unsafe {
            encoder.as_hal_mut::<Vulkan, _, _>(|hal_encoder| {
                if let Some(hal_encoder) = hal_encoder {
                    self.raw.cmd_pipeline_barrier(
                        hal_encoder.raw_handle(),
                        vk::PipelineStageFlags::COMPUTE_SHADER | vk::PipelineStageFlags::TRANSFER,
                        vk::PipelineStageFlags::HOST,
                        vk::DependencyFlags::empty(),
                        &[barrier],
                        &[],
                        &[],
                    );
                }
            })
        };
        queue.submit([encoder.finish()]);
    }
}
