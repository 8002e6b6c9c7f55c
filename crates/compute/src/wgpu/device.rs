//! [`WgpuDevice`]: one GPU through wgpu, computing on guest memory it imported.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wgpu::util::DeviceExt;

#[cfg(target_vendor = "apple")]
use super::metal::Importer;
#[cfg(not(target_vendor = "apple"))]
use super::vulkan::Importer;
use crate::{ComputeError, Device, DeviceChoice, HostMapper, HostRange, MatmulDims, StagedMatmul};

const MATMUL_SRC: &str = include_str!("../../kernels/matmul.wgsl");
const READ_SRC: &str = include_str!("../../kernels/read.wgsl");
const MATMUL_TILE: u32 = 16;

/// How the GPU reaches guest memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestAccess {
    /// Committed ranges are imported: the GPU reads and writes the guest's own pages.
    ZeroCopy { how: &'static str },
    /// Operands are copied into device buffers and results copied back, for `reason`.
    Copied { reason: String },
}

/// A guest range imported as a wgpu buffer.
pub(super) struct Imported {
    pub buffer: wgpu::Buffer,
    /// Set once the driver object behind `buffer` is gone.
    pub released: Arc<AtomicBool>,
}

struct Guest {
    range: HostRange,
    /// `None` when the range could not be imported (the copy path serves it).
    imported: Option<Imported>,
}

/// Where a slice of guest memory lies inside an imported buffer.
#[derive(Clone, Debug)]
pub struct GuestSlice {
    pub buffer: wgpu::Buffer,
    /// Byte offset of the slice's first byte in `buffer`.
    pub offset: u64,
    /// Bytes of the slice.
    pub bytes: u64,
}

impl GuestSlice {
    /// A binding window for a shader that indexes the slice from an element offset: the
    /// window starts at the slice's offset rounded down to `align` bytes (the device's
    /// storage offset alignment) and ends with the slice; returns the binding and the
    /// slice's first element (of 4 bytes) inside it.
    pub fn window(&self, align: u64) -> (wgpu::BufferBinding<'_>, u32) {
        let start = self.offset - self.offset % align.max(4);
        let binding = wgpu::BufferBinding {
            buffer: &self.buffer,
            offset: start,
            size: wgpu::BufferSize::new(self.offset + self.bytes - start),
        };
        (binding, ((self.offset - start) / 4) as u32)
    }
}

/// One GPU through wgpu, with Tern's matmul kernel loaded.
pub struct WgpuDevice {
    device: wgpu::Device,
    queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    importer: Result<Importer, String>,
    guests: Mutex<Vec<Guest>>,
    matmul: wgpu::ComputePipeline,
    label: String,
    /// Time to open the device and build the kernel, in milliseconds.
    pub startup_ms: f64,
}

impl std::fmt::Debug for WgpuDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

/// Waits for a future that wgpu's native backends resolve at once.
pub(super) fn ready<F: Future>(future: F) -> Option<F::Output> {
    let mut future = std::pin::pin!(future);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match future.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(out) => Some(out),
        std::task::Poll::Pending => None,
    }
}

impl WgpuDevice {
    /// Opens the first high-performance adapter (Vulkan, or Metal on Apple platforms). No
    /// adapter is [`ComputeError::NoWgpu`], never a panic.
    pub fn open() -> Result<WgpuDevice, ComputeError> {
        Self::open_with(true)
    }

    /// Opens the adapter as [`WgpuDevice::open`] does, but never imports guest memory: every
    /// guest operand takes the copy path, as on a driver without the extension.
    pub fn open_copying() -> Result<WgpuDevice, ComputeError> {
        Self::open_with(false)
    }

    fn open_with(import: bool) -> Result<WgpuDevice, ComputeError> {
        let no = |reason: String| ComputeError::NoWgpu { reason };
        let started = Instant::now();
        let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
        desc.backends = wgpu::Backends::VULKAN | wgpu::Backends::METAL;
        desc.flags = wgpu::InstanceFlags::empty();
        let instance = wgpu::Instance::new(desc);
        let options = wgpu::RequestAdapterOptions {
            power_preference: wgpu::PowerPreference::HighPerformance,
            force_fallback_adapter: false,
            compatible_surface: None,
            apply_limit_buckets: false,
        };
        let adapter = ready(instance.request_adapter(&options))
            .ok_or_else(|| no("the adapter request did not complete".into()))?
            .map_err(|e| no(format!("no Vulkan or Metal adapter: {e}")))?;
        let info = adapter.get_info();
        let wanted = wgpu::Features::SUBGROUP | wgpu::Features::TIMESTAMP_QUERY;
        let desc = wgpu::DeviceDescriptor {
            label: Some("tern"),
            required_features: adapter.features() & wanted,
            required_limits: adapter.limits(),
            ..Default::default()
        };
        let (device, queue, importer) = if import {
            Importer::open(&adapter, &desc).map_err(no)?
        } else {
            let (device, queue) = ready(adapter.request_device(&desc))
                .ok_or_else(|| no("the device request did not complete".into()))?
                .map_err(|e| no(format!("opening the device: {e}")))?;
            (
                device,
                queue,
                Err("zero-copy turned off for this device".into()),
            )
        };
        let matmul = compute_pipeline(&device, "matmul_f32", MATMUL_SRC);
        let label = format!("wgpu:{:?}", info.backend).to_lowercase();
        Ok(WgpuDevice {
            device,
            queue,
            info,
            importer,
            guests: Mutex::new(Vec::new()),
            matmul,
            label,
            startup_ms: started.elapsed().as_secs_f64() * 1e3,
        })
    }

    pub fn device(&self) -> &wgpu::Device {
        &self.device
    }

    pub fn queue(&self) -> &wgpu::Queue {
        &self.queue
    }

    pub fn adapter_info(&self) -> &wgpu::AdapterInfo {
        &self.info
    }

    /// Whether guest memory is imported (zero-copy) or copied, and why.
    pub fn guest_access(&self) -> GuestAccess {
        match &self.importer {
            Ok(_) => GuestAccess::ZeroCopy { how: Importer::HOW },
            Err(reason) => GuestAccess::Copied {
                reason: reason.clone(),
            },
        }
    }

    /// The imported buffer holding `[addr, addr + bytes)`, if one range holds all of it.
    /// A slice that straddles two imports (a range and the one `memory.grow` added after
    /// it), or lies in memory that was not imported, takes the copy path.
    pub fn guest_slice(&self, addr: usize, bytes: usize) -> Option<GuestSlice> {
        let guests = self.guests.lock().unwrap_or_else(|e| e.into_inner());
        let end = addr.checked_add(bytes)?;
        guests.iter().find_map(|g| {
            let imported = g.imported.as_ref()?;
            (g.range.addr <= addr && end <= g.range.end()).then(|| GuestSlice {
                buffer: imported.buffer.clone(),
                offset: (addr - g.range.addr) as u64,
                bytes: bytes as u64,
            })
        })
    }

    /// Makes what the GPU wrote into imported guest memory visible to the host, and waits for
    /// all submitted work: call before the host reads results.
    pub fn finish_guest_writes(&self) -> Result<(), ComputeError> {
        if let Ok(importer) = &self.importer {
            importer.host_barrier(&self.device, &self.queue);
        }
        self.wait()
    }

    /// Waits until every submitted command has finished.
    pub fn wait(&self) -> Result<(), ComputeError> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map(|_| ())
            .map_err(|e| self.error("waiting for the GPU", e))
    }

    fn error(&self, what: &'static str, e: impl std::fmt::Display) -> ComputeError {
        ComputeError::Driver {
            device: self.label.clone(),
            what,
            reason: e.to_string(),
        }
    }

    /// Copies `out.len()` floats from `buffer` at byte `offset` to the host.
    pub fn read_f32(
        &self,
        buffer: &wgpu::Buffer,
        offset: u64,
        out: &mut [f32],
    ) -> Result<(), ComputeError> {
        let mut bytes = vec![0u8; size_of_val(out)];
        self.read_bytes(buffer, offset, &mut bytes)?;
        for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
            *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
        Ok(())
    }

    /// Copies `out.len()` bytes from `buffer` at byte `offset` to the host.
    pub fn read_bytes(
        &self,
        buffer: &wgpu::Buffer,
        offset: u64,
        out: &mut [u8],
    ) -> Result<(), ComputeError> {
        let bytes = out.len() as u64;
        if bytes == 0 {
            return Ok(());
        }
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size: bytes,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut encoder = self.device.create_command_encoder(&Default::default());
        encoder.copy_buffer_to_buffer(buffer, offset, &staging, 0, bytes);
        self.queue.submit([encoder.finish()]);
        let mapped = Arc::new(Mutex::new(None));
        let slot = mapped.clone();
        staging.slice(..).map_async(wgpu::MapMode::Read, move |r| {
            *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
        });
        // Another thread's poll may be the one that runs the callback: wait until it has.
        let mut status = None;
        for _ in 0..10_000 {
            self.wait()?;
            status = mapped.lock().unwrap_or_else(|e| e.into_inner()).take();
            if status.is_some() {
                break;
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        match status {
            Some(Ok(())) => {}
            Some(Err(e)) => return Err(self.error("reading back", e)),
            None => return Err(self.error("reading back", "the buffer was never mapped")),
        }
        let view = staging
            .slice(..)
            .get_mapped_range()
            .map_err(|e| self.error("reading back", e))?;
        out.copy_from_slice(&view);
        Ok(())
    }

    /// Whether the device can time passes ([`WgpuDevice::time_passes`]).
    pub fn can_time(&self) -> bool {
        self.device
            .features()
            .contains(wgpu::Features::TIMESTAMP_QUERY)
    }

    /// Runs `n` compute passes in one submission, pass `i` recorded by `record(i, pass)`,
    /// and returns each one's GPU time in microseconds, from timestamps the GPU writes at
    /// its start and end.
    pub fn time_passes(
        &self,
        n: usize,
        record: impl Fn(usize, &mut wgpu::ComputePass<'_>),
    ) -> Result<Vec<f64>, ComputeError> {
        let what = "timing passes";
        if !self.can_time() {
            return Err(self.error(what, "the adapter has no timestamp queries"));
        }
        let count = 2 * n as u64;
        if count > u64::from(wgpu::QUERY_SET_MAX_QUERIES) {
            return Err(self.error(
                what,
                format!("{n} passes are more than one query set holds"),
            ));
        }
        if n == 0 {
            return Ok(Vec::new());
        }
        let set = self.device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("pass times"),
            ty: wgpu::QueryType::Timestamp,
            count: count as u32,
        });
        let resolved = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("pass times"),
            size: 8 * count,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let mut encoder = self.device.create_command_encoder(&Default::default());
        for i in 0..n as u32 {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: None,
                timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                    query_set: &set,
                    beginning_of_pass_write_index: Some(2 * i),
                    end_of_pass_write_index: Some(2 * i + 1),
                }),
            });
            record(i as usize, &mut pass);
        }
        encoder.resolve_query_set(&set, 0..count as u32, &resolved, 0);
        self.queue.submit([encoder.finish()]);
        let mut bytes = vec![0u8; 8 * count as usize];
        self.read_bytes(&resolved, 0, &mut bytes)?;
        let tick_us = f64::from(self.queue.get_timestamp_period()) / 1e3;
        let ticks: Vec<u64> = bytes
            .chunks_exact(8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
            .collect();
        Ok(ticks
            .chunks_exact(2)
            .map(|t| t[1].saturating_sub(t[0]) as f64 * tick_us)
            .collect())
    }

    /// A device buffer holding `data`.
    pub fn upload_f32(&self, label: &str, data: &[f32]) -> wgpu::Buffer {
        let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(label),
                contents: &bytes,
                usage: wgpu::BufferUsages::STORAGE
                    | wgpu::BufferUsages::COPY_SRC
                    | wgpu::BufferUsages::COPY_DST,
            })
    }

    /// Runs the matmul kernel on operands at element offsets `at` (a, b, c) of `mem`.
    fn dispatch_matmul(
        &self,
        mem: wgpu::BufferBinding<'_>,
        at: [u64; 3],
        dims: MatmulDims,
    ) -> Result<(), ComputeError> {
        let MatmulDims { m, n, k } = dims;
        let too_big = |_| self.error("launching matmul", "a dimension exceeds u32");
        let (m, n, k) = (
            u32::try_from(m).map_err(too_big)?,
            u32::try_from(n).map_err(too_big)?,
            u32::try_from(k).map_err(too_big)?,
        );
        let [a, b, c] = at.map(|e| u32::try_from(e).map_err(too_big));
        let params = [m, n, k, a?, b?, c?, 0, 0];
        let uniform = self.uniform(&params);
        let entries = [
            buffer_entry(0, mem),
            buffer_entry(1, uniform.as_entire_buffer_binding()),
        ];
        let group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("matmul"),
            layout: &self.matmul.get_bind_group_layout(0),
            entries: &entries,
        });
        let mut encoder = self.device.create_command_encoder(&Default::default());
        {
            let mut pass = encoder.begin_compute_pass(&Default::default());
            pass.set_pipeline(&self.matmul);
            pass.set_bind_group(0, &group, &[]);
            pass.dispatch_workgroups(n.div_ceil(MATMUL_TILE), m.div_ceil(MATMUL_TILE), 1);
        }
        self.queue.submit([encoder.finish()]);
        Ok(())
    }

    /// A uniform buffer of 32-bit parameters.
    pub fn uniform(&self, words: &[u32]) -> wgpu::Buffer {
        let bytes: Vec<u8> = words.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("params"),
                contents: &bytes,
                usage: wgpu::BufferUsages::UNIFORM,
            })
    }

    /// The device's memory bandwidth as a buffer-to-buffer copy of up to `bytes` sees it:
    /// bytes read plus bytes written per second, the median of `repeats` timed submissions.
    pub fn copy_bandwidth(&self, bytes: u64, repeats: usize) -> Result<f64, ComputeError> {
        let bytes = bytes.min(self.device.limits().max_buffer_size) / 4 * 4;
        let buffer = |label| {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: bytes,
                usage: wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        };
        let (src, dst) = (buffer("copy source"), buffer("copy destination"));
        self.rate(2 * bytes, repeats, |encoder| {
            encoder.copy_buffer_to_buffer(&src, 0, &dst, 0, bytes);
        })
    }

    /// The device's memory-read bandwidth: bytes per second of a kernel that reads up to
    /// `bytes` of device memory once (`kernels/read.wgsl`), the median of `repeats` timed
    /// submissions. The roofline of a decode step, which reads each weight once.
    pub fn read_bandwidth(&self, bytes: u64, repeats: usize) -> Result<f64, ComputeError> {
        let limits = self.device.limits();
        let words = (bytes
            .min(limits.max_storage_buffer_binding_size)
            .min(limits.max_buffer_size)
            / 16)
            .min(u64::from(u32::MAX));
        let src = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("read source"),
            size: 16 * words,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        let sink = self.upload_f32("read sink", &[0.0]);
        let uniform = self.uniform(&[words as u32, 0, 0, 0]);
        let pipeline = compute_pipeline(&self.device, "read_words", READ_SRC);
        let entries = [
            buffer_entry(0, src.as_entire_buffer_binding()),
            buffer_entry(1, sink.as_entire_buffer_binding()),
            buffer_entry(2, uniform.as_entire_buffer_binding()),
        ];
        let group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("read"),
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        });
        // Four words an invocation, as far as the grid's limit allows.
        let groups = words
            .div_ceil(4 * 256)
            .min(u64::from(limits.max_compute_workgroups_per_dimension))
            as u32;
        self.rate(16 * words, repeats, |encoder| {
            let mut pass = encoder.begin_compute_pass(&Default::default());
            pass.set_pipeline(&pipeline);
            pass.set_bind_group(0, &group, &[]);
            pass.dispatch_workgroups(groups, 1, 1);
        })
    }

    /// Bytes per second of the work `record` adds to an encoder (moving `bytes`): the median
    /// of `repeats` submissions, each of many such recordings so that the submission's own
    /// latency does not count, timed from submission to completion after one untimed run.
    fn rate(
        &self,
        bytes: u64,
        repeats: usize,
        record: impl Fn(&mut wgpu::CommandEncoder),
    ) -> Result<f64, ComputeError> {
        const TIMES: u32 = 20;
        let run = || {
            let mut encoder = self.device.create_command_encoder(&Default::default());
            for _ in 0..TIMES {
                record(&mut encoder);
            }
            self.queue.submit([encoder.finish()]);
            self.wait()
        };
        run()?;
        let mut rates = Vec::new();
        for _ in 0..repeats.max(1) {
            let t = Instant::now();
            run()?;
            rates.push(f64::from(TIMES) * bytes as f64 / t.elapsed().as_secs_f64());
        }
        rates.sort_by(f64::total_cmp);
        Ok(rates[rates.len() / 2])
    }

    /// Refuses a kernel operand window of `bytes` that the device cannot bind.
    fn check_binding(&self, bytes: usize) -> Result<(), ComputeError> {
        let limits = self.device.limits();
        let limit = limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size);
        if bytes as u64 > limit {
            return Err(self.error(
                "binding operands",
                format!("{bytes} bytes exceed the adapter's {limit}-byte storage binding"),
            ));
        }
        Ok(())
    }

    /// The device's storage-buffer offset alignment, in bytes.
    pub fn storage_align(&self) -> u64 {
        u64::from(self.device.limits().min_storage_buffer_offset_alignment)
    }

    fn release(&self, guest: Guest) {
        let Some(imported) = guest.imported else {
            return;
        };
        imported.buffer.destroy();
        drop(imported.buffer);
        // The driver objects go when wgpu drops its last reference, which a poll triggers
        // once no submitted work uses the buffer.
        for _ in 0..100 {
            let _ = self.device.poll(wgpu::PollType::wait_indefinitely());
            if imported.released.load(Ordering::Acquire) {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        eprintln!(
            "{}: imported guest range {} still referenced at unmap",
            self.label, guest.range
        );
    }
}

/// A bind group entry for a buffer binding.
pub fn buffer_entry(binding: u32, resource: wgpu::BufferBinding<'_>) -> wgpu::BindGroupEntry<'_> {
    wgpu::BindGroupEntry {
        binding,
        resource: wgpu::BindingResource::Buffer(resource),
    }
}

/// A compute pipeline for entry point `entry` of WGSL `src`, its layout derived from the
/// shader.
pub fn compute_pipeline(device: &wgpu::Device, entry: &str, src: &str) -> wgpu::ComputePipeline {
    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some(entry),
        source: wgpu::ShaderSource::Wgsl(src.into()),
    });
    device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some(entry),
        layout: None,
        module: &module,
        entry_point: Some(entry),
        compilation_options: Default::default(),
        cache: None,
    })
}

// SAFETY: submissions that use an imported guest range are waited on before the host call
// that made them returns, so none is in flight at `unmap_range`; `release` also destroys the
// range's buffer and waits for the device before returning. Importing neither reads nor
// writes the pages.
unsafe impl HostMapper for WgpuDevice {
    fn mapper_name(&self) -> String {
        self.label.clone()
    }

    fn map_range(&self, range: HostRange) -> Result<(), String> {
        // A range that cannot be imported is still served, by the copy path.
        let imported = match &self.importer {
            Ok(importer) => importer.import(&self.device, range).ok(),
            Err(_) => None,
        };
        self.guests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Guest { range, imported });
        Ok(())
    }

    fn unmap_range(&self, range: HostRange) {
        let guest = {
            let mut guests = self.guests.lock().unwrap_or_else(|e| e.into_inner());
            guests
                .iter()
                .position(|g| g.range == range)
                .map(|i| guests.remove(i))
        };
        if let Some(guest) = guest {
            self.release(guest);
        }
    }
}

impl Device for WgpuDevice {
    fn kind(&self) -> DeviceChoice {
        DeviceChoice::Wgpu
    }

    fn describe(&self) -> String {
        let access = match self.guest_access() {
            GuestAccess::ZeroCopy { how } => format!("zero-copy via {how}"),
            GuestAccess::Copied { reason } => format!("copy path: {reason}"),
        };
        format!("{} {} ({access})", self.label, self.info.name)
    }

    fn matmul_f32(
        &self,
        a: &[f32],
        b: &[f32],
        c: &mut [f32],
        dims: MatmulDims,
    ) -> Result<(), ComputeError> {
        dims.check(a.len(), b.len(), c.len())?;
        if dims.m == 0 || dims.n == 0 {
            return Ok(());
        }
        // One window over all three operands, when one import holds them.
        let spans = [a, b, c as &[f32]].map(|s| {
            let start = s.as_ptr() as usize;
            (start, start + size_of_val(s).max(4))
        });
        let start = spans.iter().map(|s| s.0).min().unwrap_or(0);
        let end = spans.iter().map(|s| s.1).max().unwrap_or(0);
        self.check_binding(end - start)?;
        if let Some(slice) = self.guest_slice(start, end - start) {
            let (window, first) = slice.window(self.storage_align());
            let at = spans.map(|s| u64::from(first) + ((s.0 - start) / 4) as u64);
            self.dispatch_matmul(window, at, dims)?;
            return self.finish_guest_writes();
        }
        self.staged_matmul(dims)?.run(a, b, c)
    }

    fn staged_matmul(&self, dims: MatmulDims) -> Result<Box<dyn StagedMatmul + '_>, ComputeError> {
        let (a, b, c) = (dims.m * dims.k, dims.k * dims.n, dims.m * dims.n);
        let total = a
            .checked_add(b)
            .and_then(|s| s.checked_add(c))
            .and_then(|s| s.checked_mul(4));
        self.check_binding(total.unwrap_or(usize::MAX))?;
        let mem = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("a | b | c"),
            size: (4 * (a + b + c).max(1)) as u64,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        Ok(Box::new(WgpuStaged {
            mem,
            at: [0, a as u64, (a + b) as u64],
            device: self,
            dims,
        }))
    }

    fn device_address(&self, host: *const u8) -> Option<usize> {
        // Imported memory is the guest's own pages: the GPU sees them at the host address.
        self.guest_slice(host as usize, 1).map(|_| host as usize)
    }

    fn device_memory_used(&self) -> Option<u64> {
        self.device
            .generate_allocator_report()
            .map(|r| r.total_allocated_bytes)
    }

    fn as_wgpu(&self) -> Option<&WgpuDevice> {
        Some(self)
    }
}

/// Device buffers for the explicit-copy path.
struct WgpuStaged<'d> {
    device: &'d WgpuDevice,
    dims: MatmulDims,
    /// a | b | c, at element offsets `at`.
    mem: wgpu::Buffer,
    at: [u64; 3],
}

impl StagedMatmul for WgpuStaged<'_> {
    fn run(&mut self, a: &[f32], b: &[f32], c: &mut [f32]) -> Result<(), ComputeError> {
        let dev = self.device;
        self.dims.check(a.len(), b.len(), c.len())?;
        let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        dev.queue.write_buffer(&self.mem, 4 * self.at[0], &bytes(a));
        dev.queue.write_buffer(&self.mem, 4 * self.at[1], &bytes(b));
        dev.dispatch_matmul(self.mem.as_entire_buffer_binding(), self.at, self.dims)?;
        dev.read_f32(&self.mem, 4 * self.at[2], c)
    }
}
