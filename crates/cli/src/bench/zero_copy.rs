//! `tern bench zero-copy`: the seed's measurement, on each available device.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use tern_compute::{Device, DeviceChoice, MatmulDims};
use tern_memory::Region;

#[derive(clap::Args)]
pub struct ZeroCopyArgs {
    /// `cpu`, `cuda`, `wgpu`, or `auto` for every device present.
    #[arg(long, default_value = "auto", value_parser = crate::parse_device)]
    device: DeviceChoice,
    /// Timed calls per path (default: 30 on a GPU, 3 on the CPU).
    #[arg(long, value_parser = crate::parse_count)]
    iters: Option<usize>,
}

const REGION_BYTES: usize = 16 << 20;
const MIB: f64 = (1 << 20) as f64;

/// The largest square matmul whose A, B and C fit in the 16 MiB region together.
fn region_dims() -> MatmulDims {
    let n = ((REGION_BYTES / 4 / 3) as f64).sqrt() as usize;
    MatmulDims { m: n, n, k: n }
}

struct PathResult {
    path: &'static str,
    rss_delta: f64,
    device_delta: Option<f64>,
    times_ms: Vec<f64>,
    errors: usize,
}

pub fn zero_copy(args: ZeroCopyArgs) -> anyhow::Result<ExitCode> {
    let mut devices: Vec<Arc<dyn Device>> = Vec::new();
    match args.device {
        DeviceChoice::Auto => {
            devices.push(tern_compute::open(DeviceChoice::Cpu)?);
            match tern_compute::open(DeviceChoice::Cuda) {
                Ok(dev) => devices.push(dev),
                Err(e) => println!("skipping CUDA: {e}"),
            }
            match tern_compute::open(DeviceChoice::Wgpu) {
                Ok(dev) => devices.push(dev),
                Err(e) => println!("skipping wgpu: {e}"),
            }
        }
        choice => devices.push(tern_compute::open(choice)?),
    }
    let dims = region_dims();
    let operand_bytes = 4 * (dims.m * dims.k + dims.k * dims.n + dims.m * dims.n);
    println!(
        "tern bench zero-copy: C[{m}x{n}] = A[{m}x{k}] . B[{k}x{n}] (f32), operands {:.2} MiB in a {} MiB guest region",
        operand_bytes as f64 / MIB,
        REGION_BYTES >> 20,
        m = dims.m,
        n = dims.n,
        k = dims.k
    );
    println!(
        "baseline (copy): a conventional runtime's pageable guest memory, operands copied into \
         device-owned buffers, result copied back; copy-pinned: the same copies from Tern's \
         page-locked region, for reference"
    );
    let mut rows = Vec::new();
    let mut ok = true;
    for device in &devices {
        let iters = args.iters.unwrap_or(if device.kind() != DeviceChoice::Cpu {
            30
        } else {
            3
        });
        let (identity, results) = measure(device, dims, iters)?;
        println!("{}: {identity}", device.describe());
        ok &= results.iter().all(|r| r.errors == 0);
        rows.push((device.clone(), results));
    }
    print_table(&rows);
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Fills a 16 MiB region attached to `device`, then times the zero-copy and copy paths.
fn measure(
    device: &Arc<dyn Device>,
    dims: MatmulDims,
    iters: usize,
) -> anyhow::Result<(String, Vec<PathResult>)> {
    let mapper: Arc<dyn tern_memory::HostMapper> = device.clone();
    let mut region = Region::with_committed(REGION_BYTES, REGION_BYTES, 0, vec![mapper])
        .context("reserving the guest region")?;
    let (a_len, b_len, c_len) = (dims.m * dims.k, dims.k * dims.n, dims.m * dims.n);
    let floats = region.as_mut_slice();
    let (a, rest) = split_f32(floats, a_len);
    let (b, rest) = split_f32(rest, b_len);
    let (c, _) = split_f32(rest, c_len);
    fill(a, 17, 8.0);
    fill(b, 13, 6.0);
    c.fill(0.0);
    let base = region.base();
    let identity = match device.device_address(base) {
        Some(addr) if addr == base as usize => {
            format!("region base {base:p} == device address {addr:#x}")
        }
        Some(addr) => format!("region base {base:p} != device address {addr:#x}"),
        None => format!("region base {base:p} is not visible to the device"),
    };
    // The guest's operands, as slices of the region (re-borrowed for each path).
    let floats = region.as_mut_slice();
    let (a, rest) = split_f32(floats, a_len);
    let (b, rest) = split_f32(rest, b_len);
    let (c, _) = split_f32(rest, c_len);

    // Zero-copy: the device computes on the region itself.
    // A few calls first, so one-time costs (thread stacks, the driver's command and
    // descriptor pools, which some drivers grow over the first calls) count for no path.
    for _ in 0..3 {
        device.matmul_f32(a, b, c, dims)?;
    }
    let mut zero = time_path("zero-copy", device, iters, || {
        Ok(device.matmul_f32(a, b, c, dims)?)
    })?;
    zero.errors = count_errors(a, b, c, dims);
    let mut results = vec![zero];

    // The baseline: a conventional runtime's guest memory is ordinary pageable memory, so
    // operands are copied into device-owned buffers and the result copied back.
    let (heap_a, heap_b) = (a.to_vec(), b.to_vec());
    let mut heap_c = vec![f32::NAN; c_len];
    let mut staged = None;
    let mut copy = time_path("copy", device, iters, || {
        let staged = match &mut staged {
            Some(s) => s,
            None => staged.insert(device.staged_matmul(dims)?),
        };
        Ok(staged.run(&heap_a, &heap_b, &mut heap_c)?)
    })?;
    copy.errors = count_errors(&heap_a, &heap_b, &heap_c, dims);
    results.push(copy);
    if device.kind() == DeviceChoice::Cuda {
        // For reference: the same copies from Tern's registered (page-locked) region, which
        // DMA at full PCIe speed, but cost the device buffers all the same.
        let staged = staged.as_mut().expect("created by the copy path");
        heap_c.fill(f32::NAN);
        let mut pinned = time_path("copy-pinned", device, iters, || {
            Ok(staged.run(a, b, &mut heap_c)?)
        })?;
        pinned.errors = count_errors(a, b, &heap_c, dims);
        results.push(pinned);
    }
    drop(staged);
    Ok((identity, results))
}

/// Runs `call` once (counted in the memory deltas, not in the times), then `iters` timed
/// times. Every call finishes its device work before it returns. Errors are counted later.
fn time_path(
    path: &'static str,
    device: &Arc<dyn Device>,
    iters: usize,
    mut call: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<PathResult> {
    let (rss0, dev0) = (rss_bytes(), device.device_memory_used());
    call()?;
    let mut times_ms = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        call()?;
        times_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(PathResult {
        path,
        rss_delta: (rss_bytes() - rss0) as f64 / MIB,
        device_delta: delta(dev0, device.device_memory_used()),
        times_ms,
        errors: usize::MAX,
    })
}

fn split_f32(bytes: &mut [u8], n: usize) -> (&mut [f32], &mut [u8]) {
    let (head, tail) = bytes.split_at_mut(n * 4);
    // SAFETY: `head` is 4-byte aligned (the region and every split point are multiples of
    // 4 bytes from a page-aligned base) and any bit pattern is a valid f32.
    let floats = unsafe { std::slice::from_raw_parts_mut(head.as_mut_ptr().cast::<f32>(), n) };
    (floats, tail)
}

/// Small integers, so every sum is exact in f32 and any correct device agrees bit for bit.
fn fill(xs: &mut [f32], modulus: usize, offset: f32) {
    for (i, x) in xs.iter_mut().enumerate() {
        *x = ((i * 7 + i / 1000) % modulus) as f32 - offset;
    }
}

/// Compares a sample of rows of `c` against the CPU's textbook loop.
fn count_errors(a: &[f32], b: &[f32], c: &[f32], dims: MatmulDims) -> usize {
    let MatmulDims { m, n, k } = dims;
    let mut errors = 0;
    for i in (0..m).step_by(61).chain([m - 1]) {
        for j in 0..n {
            let expect: f32 = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            errors += usize::from(c[i * n + j] != expect);
        }
    }
    errors
}

fn delta(before: Option<u64>, after: Option<u64>) -> Option<f64> {
    Some((after? as f64 - before? as f64) / MIB)
}

fn rss_bytes() -> i64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: i64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    pages * tern_memory::host_page_size() as i64
}

/// The `p`-th percentile of sorted `xs`.
pub(super) fn percentile(xs: &[f64], p: f64) -> f64 {
    let i = ((xs.len() - 1) as f64 * p).round() as usize;
    xs[i]
}

fn print_table(rows: &[(Arc<dyn Device>, Vec<PathResult>)]) {
    println!();
    println!(
        "{:<34} {:<10} {:>10} {:>13} {:>10} {:>17} {:>8}",
        "device", "path", "RSS delta", "device delta", "median ms", "p10..p90 ms", "errors"
    );
    for (device, results) in rows {
        for r in results {
            let mut t = r.times_ms.clone();
            t.sort_by(f64::total_cmp);
            let dev = r
                .device_delta
                .map_or("n/a".to_string(), |d| format!("{d:.2} MiB"));
            println!(
                "{:<34} {:<10} {:>6.2} MiB {:>13} {:>10.3} {:>8.3}..{:<8.3} {:>8}",
                truncate(&device.describe(), 34),
                r.path,
                r.rss_delta,
                dev,
                percentile(&t, 0.5),
                percentile(&t, 0.1),
                percentile(&t, 0.9),
                r.errors
            );
        }
        let median = |r: &PathResult| {
            let mut t = r.times_ms.clone();
            t.sort_by(f64::total_cmp);
            percentile(&t, 0.5)
        };
        println!(
            "{:<34} zero-copy latency / copy latency = {:.2}",
            "",
            median(&results[0]) / median(&results[1])
        );
    }
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}
