//! [`CudaDevice`]: one GPU, computing in place on registered guest memory.

use std::ffi::c_void;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use cudarc::driver::sys::{self, CUdevice_attribute};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::Ptx;

use super::nvrtc::compile_cubin;
use crate::{ComputeError, Device, DeviceChoice, HostMapper, HostRange, MatmulDims, StagedMatmul};

const MATMUL_SRC: &str = include_str!("../../kernels/matmul.cu");
const MATMUL_TILE: usize = 128;
const MATMUL_THREADS: u32 = 256;
/// The kernel's compile-time cluster shape (blocks along n, along m); grids are padded to it.
const MATMUL_CLUSTER: (usize, usize) = (4, 2);

/// One CUDA GPU with Tern's kernels loaded.
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    matmul: CudaFunction,
    label: String,
    name: String,
    arch: u32,
    /// Time to compile and load the kernels at open, in milliseconds.
    pub startup_ms: f64,
    /// Guest ranges registered with the driver, in registration order.
    registered: Mutex<Vec<HostRange>>,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl CudaDevice {
    /// Opens GPU `ordinal`. A missing driver or NVRTC library, or no GPU, is
    /// [`ComputeError::NoCuda`], never a panic.
    pub fn open(ordinal: usize) -> Result<CudaDevice, ComputeError> {
        let no_cuda = |reason: String| ComputeError::NoCuda { reason };
        // SAFETY: these only try to load the shared libraries.
        if !unsafe { sys::is_culib_present() } {
            return Err(no_cuda(
                "the CUDA driver library (libcuda) was not found".into(),
            ));
        }
        // SAFETY: as above.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return Err(no_cuda("the NVRTC library (libnvrtc) was not found".into()));
        }
        // cudarc panics when a symbol is missing from an old library; keep that a clean error.
        catch_unwind(AssertUnwindSafe(|| Self::open_present(ordinal)))
            .unwrap_or_else(|_| Err(no_cuda("the CUDA libraries are unusable".into())))
    }

    fn open_present(ordinal: usize) -> Result<CudaDevice, ComputeError> {
        let count = CudaContext::device_count().map_err(|e| ComputeError::NoCuda {
            reason: format!("cuInit failed: {e:?}"),
        })?;
        if ordinal >= count.max(0) as usize {
            return Err(ComputeError::NoCuda {
                reason: format!("the driver reports {count} GPUs, none with index {ordinal}"),
            });
        }
        let label = format!("cuda:{ordinal}");
        let driver = |what: &'static str| {
            let label = label.clone();
            move |e: cudarc::driver::DriverError| ComputeError::Driver {
                device: label.clone(),
                what,
                reason: format!("{e:?}"),
            }
        };
        let ctx = CudaContext::new(ordinal).map_err(driver("creating a context"))?;
        let host_ptr_ok = ctx
            .attribute(
                CUdevice_attribute::CU_DEVICE_ATTRIBUTE_CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM,
            )
            .map_err(driver("reading attributes"))?;
        if host_ptr_ok != 1 {
            return Err(ComputeError::NoCuda {
                reason: "the GPU cannot address registered host memory at host addresses".into(),
            });
        }
        let (major, minor) = ctx
            .compute_capability()
            .map_err(driver("reading attributes"))?;
        let arch = (major * 10 + minor) as u32;
        let name = ctx.name().map_err(driver("reading the name"))?;
        let started = Instant::now();
        let cubin = compile_cubin("matmul.cu", MATMUL_SRC, &[], arch)?;
        let module = ctx
            .load_module(Ptx::from_binary(cubin))
            .map_err(driver("loading kernels"))?;
        let matmul = module
            .load_function("matmul_f32")
            .map_err(driver("loading kernels"))?;
        let startup_ms = started.elapsed().as_secs_f64() * 1e3;
        let stream = ctx.default_stream();
        Ok(CudaDevice {
            ctx,
            stream,
            matmul,
            label,
            name,
            arch,
            startup_ms,
            registered: Mutex::new(Vec::new()),
        })
    }

    /// The driver context every buffer and kernel of this GPU lives in.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The GPU's compute capability as one number (`90` for sm_90).
    pub fn arch(&self) -> u32 {
        self.arch
    }

    /// Whether `[addr, addr + bytes)` lies in host memory registered with this GPU, so that
    /// kernels may read and write it at the same address.
    pub fn sees(&self, addr: usize, bytes: usize) -> bool {
        self.check_registered("range", addr, bytes).is_ok()
    }

    fn driver_error(&self, what: &'static str, e: impl std::fmt::Debug) -> ComputeError {
        ComputeError::Driver {
            device: self.label.clone(),
            what,
            reason: format!("{e:?}"),
        }
    }

    /// Checks that `[addr, addr + bytes)` is covered by registered ranges; an operand may
    /// straddle ranges registered separately, as long as they are contiguous.
    fn check_registered(
        &self,
        operand: &'static str,
        addr: usize,
        bytes: usize,
    ) -> Result<(), ComputeError> {
        if bytes == 0 {
            return Ok(());
        }
        let mut ranges = self
            .registered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        ranges.sort_by_key(|r| r.addr);
        let end = addr.saturating_add(bytes);
        let mut covered_to = addr;
        for r in ranges.iter().filter(|r| r.end() > addr) {
            if r.addr > covered_to {
                break;
            }
            covered_to = covered_to.max(r.end());
            if covered_to >= end {
                return Ok(());
            }
        }
        Err(ComputeError::NotRegistered {
            operand,
            addr,
            bytes,
            device: self.label.clone(),
        })
    }

    fn launch_matmul(&self, a: u64, b: u64, c: u64, dims: MatmulDims) -> Result<(), ComputeError> {
        let MatmulDims { m, n, k } = dims;
        if m == 0 || n == 0 {
            return Ok(());
        }
        let too_big = |what| self.driver_error("launching matmul", format!("{what} exceeds u32"));
        let (m32, n32, k32) = (
            u32::try_from(m).map_err(|_| too_big("m"))?,
            u32::try_from(n).map_err(|_| too_big("n"))?,
            u32::try_from(k).map_err(|_| too_big("k"))?,
        );
        let cfg = LaunchConfig {
            grid_dim: (
                n.div_ceil(MATMUL_TILE).next_multiple_of(MATMUL_CLUSTER.0) as u32,
                m.div_ceil(MATMUL_TILE).next_multiple_of(MATMUL_CLUSTER.1) as u32,
                1,
            ),
            block_dim: (MATMUL_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut launch = self.stream.launch_builder(&self.matmul);
        launch.arg(&a).arg(&b).arg(&c).arg(&m32).arg(&n32).arg(&k32);
        // SAFETY: the kernel's signature is (const float*, const float*, float*, unsigned x3);
        // the three pointers address m*k, k*n and m*n floats that the caller checked are
        // device-visible, and the stream is synchronized before the memory is given back.
        unsafe { launch.launch(cfg) }.map_err(|e| self.driver_error("launching matmul", e))?;
        self.stream
            .synchronize()
            .map_err(|e| self.driver_error("running matmul", e))
    }
}

// SAFETY: every kernel that reads registered guest memory is launched inside a host call and
// its stream synchronized before that call returns, so no work is in flight when
// `unmap_range` unregisters a range; registration neither reads nor writes the pages.
unsafe impl HostMapper for CudaDevice {
    fn mapper_name(&self) -> String {
        self.label.clone()
    }

    fn map_range(&self, range: HostRange) -> Result<(), String> {
        self.ctx.bind_to_thread().map_err(|e| format!("{e:?}"))?;
        let ptr = range.addr as *mut c_void;
        let flags = sys::CU_MEMHOSTREGISTER_DEVICEMAP | sys::CU_MEMHOSTREGISTER_PORTABLE;
        // SAFETY: `range` is committed, page-aligned memory that the region keeps mapped
        // until `unmap_range` is called for it.
        unsafe { sys::cuMemHostRegister_v2(ptr, range.bytes, flags) }
            .result()
            .map_err(|e| format!("cuMemHostRegister: {e:?}"))?;
        let mut dptr: sys::CUdeviceptr = 0;
        // SAFETY: `ptr` was registered just above; `dptr` is a valid out-pointer.
        let got = unsafe { sys::cuMemHostGetDevicePointer_v2(&mut dptr, ptr, 0) }.result();
        if got.is_err() || dptr != range.addr as u64 {
            // SAFETY: `ptr` is registered and nothing has used it yet.
            let _ = unsafe { sys::cuMemHostUnregister(ptr) };
            return Err(format!(
                "device pointer {dptr:#x} differs from host pointer {ptr:p} ({got:?})"
            ));
        }
        self.registered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(range);
        Ok(())
    }

    fn unmap_range(&self, range: HostRange) {
        let mut registered = self.registered.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = registered.iter().position(|r| *r == range) {
            registered.remove(i);
            let _ = self.ctx.bind_to_thread();
            // SAFETY: the range was registered by `map_range`; every launch on it has been
            // synchronized, so no device work can still touch it.
            let _ = unsafe { sys::cuMemHostUnregister(range.addr as *mut c_void) };
        }
    }
}

impl Device for CudaDevice {
    fn kind(&self) -> DeviceChoice {
        DeviceChoice::Cuda
    }

    fn describe(&self) -> String {
        format!("{} {} (sm_{})", self.label, self.name, self.arch)
    }

    fn matmul_f32(
        &self,
        a: &[f32],
        b: &[f32],
        c: &mut [f32],
        dims: MatmulDims,
    ) -> Result<(), ComputeError> {
        dims.check(a.len(), b.len(), c.len())?;
        self.check_registered("a", a.as_ptr() as usize, size_of_val(a))?;
        self.check_registered("b", b.as_ptr() as usize, size_of_val(b))?;
        self.check_registered("c", c.as_ptr() as usize, size_of_val(c))?;
        self.ctx
            .bind_to_thread()
            .map_err(|e| self.driver_error("binding the context", e))?;
        // Registered memory: the device pointer is the host pointer (checked at map time).
        self.launch_matmul(
            a.as_ptr() as u64,
            b.as_ptr() as u64,
            c.as_mut_ptr() as u64,
            dims,
        )
    }

    fn staged_matmul(&self, dims: MatmulDims) -> Result<Box<dyn StagedMatmul + '_>, ComputeError> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| self.driver_error("binding the context", e))?;
        let alloc = |len: usize| {
            self.stream
                .alloc_zeros::<f32>(len)
                .map_err(|e| self.driver_error("allocating", e))
        };
        Ok(Box::new(CudaStaged {
            a: alloc(dims.m * dims.k)?,
            b: alloc(dims.k * dims.n)?,
            c: alloc(dims.m * dims.n)?,
            device: self,
            dims,
        }))
    }

    fn device_address(&self, host: *const u8) -> Option<usize> {
        self.ctx.bind_to_thread().ok()?;
        let mut dptr: sys::CUdeviceptr = 0;
        // SAFETY: a query only; the driver fails cleanly for unregistered addresses.
        unsafe { sys::cuMemHostGetDevicePointer_v2(&mut dptr, host as *mut c_void, 0) }
            .result()
            .ok()?;
        Some(dptr as usize)
    }

    fn device_memory_used(&self) -> Option<u64> {
        let (free, total) = self.ctx.mem_get_info().ok()?;
        Some((total - free) as u64)
    }

    fn as_cuda(&self) -> Option<&CudaDevice> {
        Some(self)
    }
}

/// Device buffers for the explicit-copy path.
struct CudaStaged<'d> {
    device: &'d CudaDevice,
    dims: MatmulDims,
    a: CudaSlice<f32>,
    b: CudaSlice<f32>,
    c: CudaSlice<f32>,
}

impl StagedMatmul for CudaStaged<'_> {
    fn run(&mut self, a: &[f32], b: &[f32], c: &mut [f32]) -> Result<(), ComputeError> {
        let dev = self.device;
        self.dims.check(a.len(), b.len(), c.len())?;
        let copy = |e| dev.driver_error("copying", e);
        dev.stream.memcpy_htod(a, &mut self.a).map_err(copy)?;
        dev.stream.memcpy_htod(b, &mut self.b).map_err(copy)?;
        let ptr = |s: &CudaSlice<f32>| {
            use cudarc::driver::DevicePtr;
            s.device_ptr(&dev.stream).0
        };
        dev.launch_matmul(ptr(&self.a), ptr(&self.b), ptr(&self.c), self.dims)?;
        dev.stream.memcpy_dtoh(&self.c, c).map_err(copy)?;
        dev.stream.synchronize().map_err(copy)
    }
}
