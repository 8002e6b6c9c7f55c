//! The CPU device: the readable reference every other backend is checked against.
//!
//! Host memory is already visible to the CPU, so mapping a range is a no-op.

use crate::{ComputeError, Device, DeviceChoice, HostMapper, HostRange, MatmulDims, StagedMatmul};

/// The host CPU, using every available core (a persistent pool) with a fixed split of rows.
pub struct CpuDevice {
    threads: usize,
    pool: rayon::ThreadPool,
}

impl std::fmt::Debug for CpuDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl CpuDevice {
    pub fn new() -> CpuDevice {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        CpuDevice::with_threads(threads)
    }

    /// A CPU device with exactly `threads` workers (at least one).
    pub fn with_threads(threads: usize) -> CpuDevice {
        let threads = threads.max(1);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("tern-cpu-{i}"))
            .build()
            .unwrap_or_else(|_| {
                // Could not start threads: fall back to running on the caller's thread.
                rayon::ThreadPoolBuilder::new()
                    .num_threads(1)
                    .use_current_thread()
                    .build()
                    .expect("a pool on the current thread")
            });
        let threads = pool.current_num_threads();
        CpuDevice { threads, pool }
    }

    /// Runs `f` on this device's worker pool.
    pub fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.pool.install(f)
    }
}

impl Default for CpuDevice {
    fn default() -> Self {
        CpuDevice::new()
    }
}

// SAFETY: the CPU device computes on guest memory only inside the host call that lends it
// (synchronously, on the caller's borrow) and keeps nothing of a range after that call.
unsafe impl HostMapper for CpuDevice {
    fn mapper_name(&self) -> String {
        "cpu".into()
    }
    fn map_range(&self, _range: HostRange) -> Result<(), String> {
        Ok(())
    }
    fn unmap_range(&self, _range: HostRange) {}
}

impl Device for CpuDevice {
    fn kind(&self) -> DeviceChoice {
        DeviceChoice::Cpu
    }

    fn describe(&self) -> String {
        format!("cpu ({} threads)", self.threads)
    }

    fn matmul_f32(
        &self,
        a: &[f32],
        b: &[f32],
        c: &mut [f32],
        dims: MatmulDims,
    ) -> Result<(), ComputeError> {
        dims.check(a.len(), b.len(), c.len())?;
        self.install(|| matmul_f32(a, b, c, dims, self.threads));
        Ok(())
    }

    fn staged_matmul(&self, dims: MatmulDims) -> Result<Box<dyn StagedMatmul + '_>, ComputeError> {
        Ok(Box::new(CpuStaged {
            dims,
            device: self,
            a: vec![0.0; dims.m * dims.k],
            b: vec![0.0; dims.k * dims.n],
            c: vec![0.0; dims.m * dims.n],
        }))
    }
}

/// `c = a · b`; rows of `c` are split evenly into `threads` chunks, run on the current rayon
/// pool. Each element sums its `k` products in order, so the result does not depend on the
/// thread count.
pub fn matmul_f32(a: &[f32], b: &[f32], c: &mut [f32], dims: MatmulDims, threads: usize) {
    use rayon::prelude::*;
    let MatmulDims { m, n, k } = dims;
    if m == 0 || n == 0 {
        return;
    }
    let rows_per_thread = m.div_ceil(threads.max(1));
    c.par_chunks_mut(rows_per_thread * n)
        .enumerate()
        .for_each(|(chunk, c_rows)| {
            let row0 = chunk * rows_per_thread;
            for (r, c_row) in c_rows.chunks_mut(n).enumerate() {
                let a_row = &a[(row0 + r) * k..(row0 + r + 1) * k];
                c_row.fill(0.0);
                // The hot loop: c_row += a[i][p] * b[p][..] for p in order.
                for (p, &a_ip) in a_row.iter().enumerate() {
                    let b_row = &b[p * n..(p + 1) * n];
                    for (c_ij, &b_pj) in c_row.iter_mut().zip(b_row) {
                        *c_ij += a_ip * b_pj;
                    }
                }
            }
        });
}

/// The CPU's copy path: operands copied into buffers of its own, as a runtime that cannot
/// share guest memory would.
struct CpuStaged<'d> {
    dims: MatmulDims,
    device: &'d CpuDevice,
    a: Vec<f32>,
    b: Vec<f32>,
    c: Vec<f32>,
}

impl StagedMatmul for CpuStaged<'_> {
    fn run(&mut self, a: &[f32], b: &[f32], c: &mut [f32]) -> Result<(), ComputeError> {
        self.dims.check(a.len(), b.len(), c.len())?;
        self.a.copy_from_slice(a);
        self.b.copy_from_slice(b);
        let threads = self.device.threads;
        let (a, b, c_own, dims) = (&self.a, &self.b, &mut self.c, self.dims);
        self.device
            .install(|| matmul_f32(a, b, c_own, dims, threads));
        c.copy_from_slice(&self.c);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_textbook_loop_for_any_thread_count() {
        let dims = MatmulDims { m: 7, n: 5, k: 3 };
        let a: Vec<f32> = (0..21).map(|i| i as f32 - 4.0).collect();
        let b: Vec<f32> = (0..15).map(|i| (i % 4) as f32).collect();
        let mut expect = vec![0.0f32; 35];
        for i in 0..7 {
            for j in 0..5 {
                for p in 0..3 {
                    expect[i * 5 + j] += a[i * 3 + p] * b[p * 5 + j];
                }
            }
        }
        for threads in [1, 2, 3, 8] {
            let mut c = vec![f32::NAN; 35];
            matmul_f32(&a, &b, &mut c, dims, threads);
            assert_eq!(c, expect, "threads = {threads}");
        }
    }

    #[test]
    fn rejects_wrong_shapes() {
        let dev = CpuDevice::new();
        let err = dev
            .matmul_f32(
                &[0.0; 6],
                &[0.0; 6],
                &mut [0.0; 3],
                MatmulDims { m: 2, n: 2, k: 3 },
            )
            .unwrap_err();
        assert!(err.to_string().contains("operand `c`"), "{err}");
    }
}
