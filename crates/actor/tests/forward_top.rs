//! `forward_top`: the host selects the largest logits for the guest. The candidates equal a
//! full sort of the logits the engine computes (on the CPU here, and on the GPU, where one is
//! present); bad requests (no candidates, too many, out of bounds, overlapping the logits, a
//! closed session) are error codes and the actor keeps working.

use std::sync::Arc;

use tern_actor::{Actor, Runtime};
use tern_compute::Device;
use tern_compute::cpu::CpuDevice;
use tern_compute::testing::cuda_or_skip;
use tern_model::Model;

/// Opens model `m` and a session on the first message. Each message is little-endian u32s:
/// k, the logits offset (0: none), the top offset, then token ids; the guest runs
/// `forward_top` with them and emits the `k` candidates (8 bytes each) from the top offset.
const GUEST: &str = r#"(module
  (import "tern" "model_open" (func $model_open (param i32 i32) (result i32)))
  (import "tern" "session_open" (func $session_open (param i32 i32) (result i32)))
  (import "tern" "forward_top" (func $forward_top (param i32 i32 i32 i32 i32 i32) (result i32)))
  (import "tern" "emit" (func $emit (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $session (mut i32) (i32.const -1))
  (data (i32.const 0) "m")
  (func (export "tern_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "tern_on_message") (param $ptr i32) (param $len i32) (result i32)
    (local $rc i32) (local $k i32) (local $top i32)
    (if (i32.lt_s (global.get $session) (i32.const 0))
      (then (global.set $session
        (call $session_open (call $model_open (i32.const 0) (i32.const 1)) (i32.const 64)))))
    (local.set $k (i32.load (local.get $ptr)))
    (local.set $top (i32.load offset=8 (local.get $ptr)))
    (local.set $rc (call $forward_top (global.get $session)
      (i32.add (local.get $ptr) (i32.const 12))
      (i32.shr_u (i32.sub (local.get $len) (i32.const 12)) (i32.const 2))
      (i32.load offset=4 (local.get $ptr)) (local.get $top) (local.get $k)))
    (if (i32.lt_s (local.get $rc) (i32.const 0)) (then (return (local.get $rc))))
    (drop (call $emit (local.get $top) (i32.shl (local.get $k) (i32.const 3))))
    (local.get $rc)))"#;

fn small_model(device: Option<&Arc<dyn Device>>) -> Arc<Model> {
    use tern_model::generate::{Types, shape, write_random_llama};
    use tern_model::quant::DType;
    let path = std::env::temp_dir().join(format!(
        "tern-forward-top-{}-{}.gguf",
        std::process::id(),
        device.is_some()
    ));
    let types = Types {
        linear: DType::Q4_1,
        embd: DType::Q8_0,
    };
    write_random_llama(&path, shape("small").unwrap(), types, 9).unwrap();
    let mut model = Model::open("m", &path, 2).unwrap();
    if let Some(device) = device {
        model = model.on_device(device).unwrap();
    }
    let _ = std::fs::remove_file(&path);
    Arc::new(model)
}

fn message(k: u32, logits: u32, top: u32, tokens: &[u32]) -> Vec<u8> {
    [k, logits, top]
        .iter()
        .chain(tokens)
        .flat_map(|v| v.to_le_bytes())
        .collect()
}

fn candidates(bytes: &[u8]) -> Vec<(u32, u32)> {
    bytes
        .chunks_exact(8)
        .map(|c| {
            (
                u32::from_le_bytes(c[..4].try_into().unwrap()),
                u32::from_le_bytes(c[4..].try_into().unwrap()),
            )
        })
        .collect()
}

/// The engine's logits after `prompt`, then `next`, and the first `k` of them fully sorted.
fn expected(model: &Model, steps: &[&[u32]], k: usize) -> Vec<(u32, u32)> {
    let mut session = model.new_session(64).unwrap();
    let mut logits = vec![0.0; model.config().n_vocab];
    for step in steps {
        model.forward(&mut session, step, &mut logits).unwrap();
    }
    let mut all: Vec<(u32, f32)> = (0..).zip(logits.iter().copied()).collect();
    all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    all.iter().take(k).map(|&(t, l)| (t, l.to_bits())).collect()
}

fn check_on(device: Arc<dyn Device>, model: Arc<Model>) {
    let rt = Runtime::builder(device)
        .model(model.clone())
        .build()
        .unwrap();
    let mut actor = Actor::load(&rt, GUEST.as_bytes()).unwrap();
    let prompt = [5u32, 6, 7, 300, 11];
    // 64 candidates and the logits, then one without logits.
    let reply = actor.send(&message(64, 8192, 16384, &prompt)).unwrap();
    assert_eq!(reply.code, 64, "{:?}", actor.last_error());
    assert_eq!(candidates(&reply.output), expected(&model, &[&prompt], 64));
    let reply = actor.send(&message(1, 0, 16384, &[42])).unwrap();
    assert_eq!(reply.code, 1, "{:?}", actor.last_error());
    assert_eq!(
        candidates(&reply.output),
        expected(&model, &[&prompt, &[42]], 1)
    );

    // Bad requests: error codes, nothing run, and the actor goes on.
    for (k, logits, top, what) in [
        (0, 0, 16384, "0 top logits"),
        (65, 0, 16384, "65 top logits"),
        (4, 0, 65530, "out of bounds"),
        (4, 0, 16386, "misaligned"),
        (4, 8192, 8192 + 2040, "overlap"),
    ] {
        let reply = actor.send(&message(k, logits, top, &[1])).unwrap();
        assert!(reply.code < 0, "{what}: code {}", reply.code);
        let error = actor.last_error().unwrap_or_default().to_string();
        assert!(!error.is_empty(), "{what}: no message");
    }
    let reply = actor.send(&message(2, 0, 16384, &[43])).unwrap();
    assert_eq!(reply.code, 2, "{:?}", actor.last_error());
    assert_eq!(
        candidates(&reply.output),
        expected(&model, &[&prompt, &[42], &[43]], 2)
    );
}

#[test]
fn the_cpu_selects_the_largest_logits_for_the_guest() {
    check_on(Arc::new(CpuDevice::new()), small_model(None));
}

#[test]
fn the_gpu_selects_the_largest_logits_for_the_guest() {
    let Some(gpu) = cuda_or_skip("the_gpu_selects_the_largest_logits_for_the_guest") else {
        return;
    };
    let model = small_model(Some(&gpu));
    check_on(gpu, model);
}
