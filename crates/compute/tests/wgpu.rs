//! The wgpu device against the CPU reference, on guest regions: imported without copies where
//! the driver has `VK_EXT_external_memory_host` (or Metal), copied otherwise. Runs on any
//! Vulkan driver, lavapipe (the CPU one) included; skipped (with the reason) where there is
//! none.

use std::sync::Arc;

use tern_compute::cpu::CpuDevice;
use tern_compute::testing::{cpu_matmul, exact_f32, operands, wgpu_or_skip};
use tern_compute::wgpu::GuestAccess;
use tern_compute::{Device, HostMapper, MatmulDims};
use tern_memory::Region;

fn check(device: &dyn Device, bytes: &mut [u8], at: [usize; 3], dims: MatmulDims) {
    let (a, b, c) = operands(bytes, at, dims);
    let want = cpu_matmul(a, b, dims);
    device.matmul_f32(a, b, c, dims).unwrap();
    let bad = c
        .iter()
        .zip(&want)
        .filter(|(x, y)| x.to_bits() != y.to_bits())
        .count();
    assert_eq!(bad, 0, "{dims:?}: {bad} of {} differ", want.len());
}

#[test]
fn wgpu_matmul_matches_the_cpu_in_guest_memory() {
    let Some(device) = wgpu_or_skip("wgpu_matmul_matches_the_cpu_in_guest_memory") else {
        return;
    };
    let gpu = device.as_wgpu().unwrap();
    eprintln!("{}", device.describe());
    let mapper: Arc<dyn HostMapper> = device.clone();
    let mut region = Region::with_committed(8 << 20, 8 << 20, 0, vec![mapper]).unwrap();
    let bytes = region.as_mut_slice();
    let base = bytes.as_ptr() as usize;
    if let GuestAccess::ZeroCopy { .. } = gpu.guest_access() {
        assert!(
            gpu.guest_slice(base, bytes.len()).is_some(),
            "the region was not imported"
        );
        assert_eq!(device.device_address(bytes.as_ptr()), Some(base));
    }
    for (m, n, k) in [(1, 1, 1), (128, 128, 128), (300, 257, 129), (7, 1000, 3)] {
        let dims = MatmulDims { m, n, k };
        // Operands at unaligned offsets, to exercise the binding windows.
        let a = 4 * 3;
        let b = (a + 4 * m * k).next_multiple_of(4096) + 4;
        let c = (b + 4 * k * n).next_multiple_of(64) + 8;
        check(device.as_ref(), bytes, [a, b, c], dims);
    }
}

#[test]
fn wgpu_imports_ranges_added_by_growth_and_releases_them() {
    let Some(device) = wgpu_or_skip("wgpu_imports_ranges_added_by_growth_and_releases_them") else {
        return;
    };
    let gpu = device.as_wgpu().unwrap();
    let zero_copy = matches!(gpu.guest_access(), GuestAccess::ZeroCopy { .. });
    let mapper: Arc<dyn HostMapper> = device.clone();
    let mut region = Region::with_committed(1 << 20, 4 << 20, 0, vec![mapper]).unwrap();
    region.grow_to(2 << 20).unwrap();
    let bytes = region.as_mut_slice();
    let base = bytes.as_ptr() as usize;
    assert_eq!(bytes.len(), 2 << 20);
    if zero_copy {
        // The grown range is imported on its own: slices inside it bind directly.
        assert!(gpu.guest_slice(base + (1 << 20), 1 << 20).is_some());
        assert!(gpu.guest_slice(base + (1 << 20) - 4, 8).is_none());
    }
    // Operands in the grown range, and one straddling both imports (the copy path).
    let dims = MatmulDims {
        m: 64,
        n: 64,
        k: 64,
    };
    check(
        device.as_ref(),
        bytes,
        [(1 << 20) + 16, (1 << 20) + 65536, (1 << 20) + 131072],
        dims,
    );
    check(
        device.as_ref(),
        bytes,
        [(1 << 20) - 4096, (1 << 20) + 65536, (1 << 20) + 131072],
        dims,
    );
    drop(region);
    assert!(
        gpu.guest_slice(base, 4).is_none(),
        "an import outlived its region"
    );
}

#[test]
fn wgpu_staged_matmul_matches_the_cpu() {
    let Some(device) = wgpu_or_skip("wgpu_staged_matmul_matches_the_cpu") else {
        return;
    };
    let dims = MatmulDims {
        m: 33,
        n: 65,
        k: 17,
    };
    let (a, b) = (exact_f32(33 * 17, 1), exact_f32(17 * 65, 2));
    let mut want = vec![0.0; 33 * 65];
    CpuDevice::new()
        .matmul_f32(&a, &b, &mut want, dims)
        .unwrap();
    let mut got = vec![f32::NAN; 33 * 65];
    device
        .staged_matmul(dims)
        .unwrap()
        .run(&a, &b, &mut got)
        .unwrap();
    assert_eq!(got, want);
}

#[test]
fn without_import_guest_operands_take_the_copy_path_and_say_so() {
    if wgpu_or_skip("without_import_guest_operands_take_the_copy_path_and_say_so").is_none() {
        return;
    }
    let device: Arc<dyn Device> = Arc::new(tern_compute::wgpu::WgpuDevice::open_copying().unwrap());
    let gpu = device.as_wgpu().unwrap();
    assert!(matches!(gpu.guest_access(), GuestAccess::Copied { .. }));
    assert!(
        device.describe().contains("copy path"),
        "{}",
        device.describe()
    );
    let mapper: Arc<dyn HostMapper> = device.clone();
    let mut region = Region::with_committed(1 << 20, 1 << 20, 0, vec![mapper]).unwrap();
    let bytes = region.as_mut_slice();
    assert!(gpu.guest_slice(bytes.as_ptr() as usize, 4).is_none());
    assert_eq!(device.device_address(bytes.as_ptr()), None);
    let dims = MatmulDims {
        m: 50,
        n: 70,
        k: 30,
    };
    check(device.as_ref(), bytes, [64, 65536, 131072], dims);
}
