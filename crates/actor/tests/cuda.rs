//! A guest on the CUDA device: it grows its memory, lays an operand across the boundary
//! between two registrations, and the GPU computes in place. Skipped without a GPU.

use tern_actor::{Actor, Limits, Runtime};
use tern_compute::cpu::CpuDevice;
use tern_compute::testing::cuda_or_skip;

/// Grows memory by 3 pages (a second registration), fills A (32x48) from offset 65536-2048
/// so it straddles both ranges, B (48x40) after it, multiplies into C, emits C.
const GUEST: &str = r#"(module
  (import "tern" "matmul_f32" (func $matmul (param i32 i32 i32 i32 i32 i32) (result i32)))
  (import "tern" "emit" (func $emit (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "tern_alloc") (param i32) (result i32) (i32.const 1024))
  (func $fill (param $at i32) (param $n i32) (param $seed i32)
    (local $i i32)
    (loop $l
      (f32.store (i32.add (local.get $at) (i32.shl (local.get $i) (i32.const 2)))
        (f32.sub (f32.convert_i32_u (i32.rem_u
            (i32.add (i32.mul (local.get $i) (i32.const 7)) (local.get $seed)) (i32.const 17)))
          (f32.const 8)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $l (i32.lt_u (local.get $i) (local.get $n)))))
  (func (export "tern_on_message") (param i32 i32) (result i32)
    (local $rc i32)
    (drop (memory.grow (i32.const 3)))
    (call $fill (i32.const 63488) (i32.const 1536) (i32.const 1))
    (call $fill (i32.const 69632) (i32.const 1920) (i32.const 2))
    (local.set $rc (call $matmul (i32.const 63488) (i32.const 69632) (i32.const 131072)
      (i32.const 32) (i32.const 40) (i32.const 48)))
    (drop (call $emit (i32.const 131072) (i32.const 5120)))
    (local.get $rc)))"#;

fn run_on(device: std::sync::Arc<dyn tern_compute::Device>) -> Vec<u8> {
    let rt = Runtime::new(device, Limits::default()).unwrap();
    let mut actor = Actor::load(&rt, GUEST.as_bytes()).unwrap();
    let reply = actor.send(b"").unwrap();
    assert_eq!(reply.code, 0, "{:?}", actor.last_error());
    reply.output
}

#[test]
fn a_guest_operand_straddling_two_registrations_computes_on_the_gpu() {
    let Some(gpu) =
        cuda_or_skip("a_guest_operand_straddling_two_registrations_computes_on_the_gpu")
    else {
        return;
    };
    let on_gpu = run_on(gpu);
    let on_cpu = run_on(std::sync::Arc::new(CpuDevice::new()));
    assert_eq!(on_gpu.len(), 4 * 32 * 40);
    assert_eq!(on_gpu, on_cpu, "GPU and CPU results differ");
}
