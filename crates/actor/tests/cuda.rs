//! A guest on the CUDA device: it grows its memory, lays an operand across the boundary
//! between two registrations, and the GPU computes in place. Skipped without a GPU.

use tern_actor::{Actor, Runtime};
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
    let rt = Runtime::builder(device).build().unwrap();
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

/// Opens model `m` and a session on the first message; every message is little-endian u32
/// token ids to run; the logits (512 floats, written by the device into this memory) are
/// emitted.
const FORWARD_GUEST: &str = r#"(module
  (import "tern" "model_open" (func $model_open (param i32 i32) (result i32)))
  (import "tern" "session_open" (func $session_open (param i32 i32) (result i32)))
  (import "tern" "forward" (func $forward (param i32 i32 i32 i32) (result i32)))
  (import "tern" "emit" (func $emit (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $session (mut i32) (i32.const -1))
  (data (i32.const 0) "m")
  (func (export "tern_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "tern_on_message") (param $ptr i32) (param $len i32) (result i32)
    (local $rc i32)
    (if (i32.lt_s (global.get $session) (i32.const 0))
      (then (global.set $session
        (call $session_open (call $model_open (i32.const 0) (i32.const 1)) (i32.const 64)))))
    (local.set $rc (call $forward (global.get $session) (local.get $ptr)
      (i32.shr_u (local.get $len) (i32.const 2)) (i32.const 8192)))
    (if (i32.lt_s (local.get $rc) (i32.const 0)) (then (return (local.get $rc))))
    (drop (call $emit (i32.const 8192) (i32.const 2048)))
    (i32.const 0)))"#;

fn small_model(
    device: &std::sync::Arc<dyn tern_compute::Device>,
) -> std::sync::Arc<tern_model::Model> {
    use tern_model::generate::{Types, shape, write_random_llama};
    use tern_model::quant::DType;
    let path = std::env::temp_dir().join(format!("tern-actor-cuda-{}.gguf", std::process::id()));
    let types = Types {
        linear: DType::Q4_1,
        embd: DType::Q8_0,
    };
    write_random_llama(&path, shape("small").unwrap(), types, 5).unwrap();
    let model = tern_model::Model::open("m", &path, 2)
        .unwrap()
        .on_device(device)
        .unwrap();
    let _ = std::fs::remove_file(&path);
    std::sync::Arc::new(model)
}

fn ids(tokens: &[u32]) -> Vec<u8> {
    tokens.iter().flat_map(|t| t.to_le_bytes()).collect()
}

#[test]
fn the_gpu_writes_logits_into_the_actor_and_snapshots_continue_bit_for_bit() {
    let Some(device) = cuda_or_skip("the_gpu_writes_logits_into_the_actor") else {
        return;
    };
    let model = small_model(&device);
    assert!(
        model
            .engine_as::<tern_model::llama::cuda::CudaLlama>()
            .is_some(),
        "the model is not on the GPU"
    );
    let rt = Runtime::builder(device)
        .model(model.clone())
        .build()
        .unwrap();
    let mut actor = Actor::load(&rt, FORWARD_GUEST.as_bytes()).unwrap();
    let prompt = [1, 2, 3, 40, 50, 60, 7];
    let through_actor = actor.send(&ids(&prompt)).unwrap();
    assert_eq!(through_actor.code, 0, "{:?}", actor.last_error());
    // The engine directly (logits copied to a host buffer): the same kernels, the same bits.
    let mut session = model.new_session(64).unwrap();
    let mut logits = vec![0.0f32; 512];
    model.forward(&mut session, &prompt, &mut logits).unwrap();
    let direct: Vec<u8> = logits.iter().flat_map(|v| v.to_le_bytes()).collect();
    assert!(
        through_actor.output == direct,
        "actor and engine logits differ"
    );

    let snapshot = actor.snapshot().unwrap();
    let view = tern_snapshot::parse(&snapshot).unwrap();
    let module = std::sync::Arc::new(
        tern_actor::ActorModule::new(&rt, "module", FORWARD_GUEST.as_bytes()).unwrap(),
    );
    let mut restored = Actor::restore(&rt, &module, &view).unwrap();
    // Read unverified, the KV bytes are hashed by the copy into the GPU's staging slots.
    let chain = tern_snapshot::parse_chain_unverified(&[&snapshot]).unwrap();
    let mut hashed_by_copy = Actor::restore_chain(&rt, &module, &chain).unwrap();
    for step in [[9u32], [10], [11]] {
        let a = actor.send(&ids(&step)).unwrap();
        let b = restored.send(&ids(&step)).unwrap();
        let c = hashed_by_copy.send(&ids(&step)).unwrap();
        assert_eq!(a.code, 0);
        assert!(a.output == b.output, "the restored actor's logits differ");
        assert!(
            a.output == c.output,
            "the chain's restored actor's logits differ"
        );
    }

    // A damaged key, which only the checksum the copy computed can notice.
    let k = view.kv(0).unwrap().k_layer_bytes(1).unwrap();
    let at = k.as_ptr() as usize - snapshot.as_ptr() as usize + k.len() / 2;
    let mut damaged = snapshot.clone();
    damaged[at] ^= 0x08;
    let chain = tern_snapshot::parse_chain_unverified(&[&damaged]).unwrap();
    let err = Actor::restore_chain(&rt, &module, &chain)
        .err()
        .expect("a damaged chain is refused");
    assert!(err.to_string().contains("checksum"), "{err}");
}
