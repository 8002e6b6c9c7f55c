//! The CUDA device against the CPU reference, on registered guest regions. Skipped (with the
//! reason) where no GPU is present; the GPU suite runs them with `TERN_REQUIRE_CUDA=1`.

use std::sync::Arc;

use tern_compute::testing::{cpu_matmul, cuda_or_skip, exact_f32, operands};
use tern_compute::{ComputeError, HostMapper, MatmulDims};
use tern_memory::Region;

fn mismatches(x: &[f32], y: &[f32]) -> usize {
    x.iter()
        .zip(y)
        .filter(|(p, q)| p.to_bits() != q.to_bits())
        .count()
}

#[test]
fn cuda_matmul_matches_the_cpu_on_registered_memory() {
    let Some(gpu) = cuda_or_skip("cuda_matmul_matches_the_cpu_on_registered_memory") else {
        return;
    };
    let mapper: Arc<dyn HostMapper> = gpu.clone();
    let mut region = Region::with_committed(8 << 20, 8 << 20, 0, vec![mapper]).unwrap();
    for (m, n, k) in [
        (1, 1, 1),
        (128, 128, 128),
        (300, 257, 129),
        (7, 1000, 3),
        (513, 64, 700),
    ] {
        let dims = MatmulDims { m, n, k };
        let at = [0, 4 * m * k, 4 * (m * k + k * n)];
        let (a, b, c) = operands(region.as_mut_slice(), at, dims);
        gpu.matmul_f32(a, b, c, dims).unwrap();
        let expect = cpu_matmul(a, b, dims);
        assert_eq!(mismatches(c, &expect), 0, "{dims:?}");
    }
}

#[test]
fn an_operand_may_straddle_ranges_registered_at_different_growths() {
    let Some(gpu) = cuda_or_skip("an_operand_may_straddle_ranges_registered_at_different_growths")
    else {
        return;
    };
    let mapper: Arc<dyn HostMapper> = gpu.clone();
    let mut region = Region::with_committed(64 << 10, 8 << 20, 0, vec![mapper]).unwrap();
    region.grow_to(2 << 20).unwrap();
    region.grow_to(4 << 20).unwrap();
    assert_eq!(region.mapped_ranges().len(), 3);
    let base = region.base() as usize;
    for r in region.mapped_ranges() {
        assert_eq!(
            gpu.device_address((r.addr + r.bytes / 2) as *const u8),
            Some(r.addr + r.bytes / 2)
        );
    }
    // A (64x96) spans the first boundary (64 KiB), B the second (2 MiB).
    let dims = MatmulDims {
        m: 64,
        n: 80,
        k: 96,
    };
    let at = [(64 << 10) - 8192, (2 << 20) - 4096, 3 << 20];
    let (a, b, c) = operands(region.as_mut_slice(), at, dims);
    gpu.matmul_f32(a, b, c, dims).unwrap();
    assert_eq!(mismatches(c, &cpu_matmul(a, b, dims)), 0);
    assert!(a.as_ptr() as usize - base < 64 << 10);
}

#[test]
fn unregistered_memory_is_refused_not_touched() {
    let Some(gpu) = cuda_or_skip("unregistered_memory_is_refused_not_touched") else {
        return;
    };
    let dims = MatmulDims {
        m: 16,
        n: 16,
        k: 16,
    };
    let (a, b, mut c) = (exact_f32(256, 1), exact_f32(256, 2), vec![0.0; 256]);
    let err = gpu.matmul_f32(&a, &b, &mut c, dims).unwrap_err();
    assert!(
        matches!(err, ComputeError::NotRegistered { operand: "a", .. }),
        "{err}"
    );
}

#[test]
fn dropping_a_region_unregisters_it() {
    let Some(gpu) = cuda_or_skip("dropping_a_region_unregisters_it") else {
        return;
    };
    for _ in 0..4 {
        let mapper: Arc<dyn HostMapper> = gpu.clone();
        let region = Region::with_committed(1 << 20, 1 << 20, 0, vec![mapper]).unwrap();
        let addr = region.base() as usize;
        assert_eq!(gpu.device_address(region.base()), Some(addr));
        drop(region);
        assert_eq!(gpu.device_address(addr as *const u8), None);
    }
}

#[test]
fn the_copy_path_agrees_with_zero_copy() {
    let Some(gpu) = cuda_or_skip("the_copy_path_agrees_with_zero_copy") else {
        return;
    };
    let dims = MatmulDims {
        m: 200,
        n: 300,
        k: 100,
    };
    let (a, b) = (exact_f32(200 * 100, 1), exact_f32(100 * 300, 2));
    let mut c = vec![f32::NAN; 200 * 300];
    gpu.staged_matmul(dims)
        .unwrap()
        .run(&a, &b, &mut c)
        .unwrap();
    assert_eq!(mismatches(&c, &cpu_matmul(&a, &b, dims)), 0);
}
