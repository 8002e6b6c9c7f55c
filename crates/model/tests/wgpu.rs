#![cfg(feature = "wgpu")]
//! The wgpu forward pass against the CPU reference: every kernel op by op, then greedy
//! generation end to end on generated models. Runs on any Vulkan driver (lavapipe, the CPU
//! one, in CI; the GPU suite's real GPU) or Metal; skipped (with the reason) where there is
//! none, and failing instead with `TERN_REQUIRE_WGPU=1`. The real shapes (SmolLM2-135M,
//! Llama-3.2-1B) run only on a hardware adapter: on a CPU driver they would take minutes.
//!
//! Tolerances, as for CUDA: both sides keep activations in f32 and dequantize weights inside
//! the dot product, so only the order of additions (and fused multiply-adds) differs; 1e-5
//! of the output's scale per op, 1e-3 of the logits' scale end to end, greedy tokens equal.

mod common;

use common::{
    Ops, Rng, embedding_parity, harness_ops, matvec_parity, model_file,
    moved_cache_continues_bit_for_bit, moved_cache_continues_bit_for_bit_with,
    norm_and_activation_parity, normalized_error, parity, parity_with, prompt,
};

use std::sync::{Arc, OnceLock};

use tern_compute::Device;
use tern_compute::testing::wgpu_or_skip;
use tern_model::llama::wgpu::shaders::Reduce;
use tern_model::llama::wgpu::testing::{AttnShape, OpHarness};
use tern_model::quant::DType;
use tern_model::{KvType, Model, ModelError};

fn gpu(test: &str) -> Option<Arc<dyn Device>> {
    static GPU: OnceLock<Option<Arc<dyn Device>>> = OnceLock::new();
    GPU.get_or_init(|| wgpu_or_skip(test)).clone()
}

fn ops(device: &Arc<dyn Device>) -> &'static OpHarness {
    static OPS: OnceLock<OpHarness> = OnceLock::new();
    OPS.get_or_init(|| OpHarness::new(device, None).unwrap())
}

harness_ops!(OpHarness);

#[test]
fn every_matvec_type_matches_the_cpu() {
    let Some(device) = gpu("every_matvec_type_matches_the_cpu") else {
        return;
    };
    // Both row reductions: the adapter's choice and the other one, where it has subgroups.
    let mut harnesses = vec![ops(&device)];
    let other;
    if OpHarness::adapter_reduce(&device) == Some(Reduce::Subgroup) {
        other = OpHarness::new(&device, Some(Reduce::Shared)).unwrap();
        harnesses.push(&other);
    } else {
        eprintln!("every_matvec_type_matches_the_cpu: the adapter has no usable subgroups");
    }
    for ops in harnesses {
        eprintln!("row sums: {:?}", ops.reduce());
        // 2048 columns split rows of 16-bit types in two, 8192 columns every type's in
        // several.
        matvec_parity(ops, &[256, 576, 2048, 8192]);
    }
}

#[test]
fn embedding_rows_of_every_type_match_the_cpu() {
    let Some(device) = gpu("embedding_rows_of_every_type_match_the_cpu") else {
        return;
    };
    embedding_parity(ops(&device));
}

#[test]
fn norms_and_activations_match_the_cpu() {
    let Some(device) = gpu("norms_and_activations_match_the_cpu") else {
        return;
    };
    norm_and_activation_parity(ops(&device));
}

/// Rotates each head of `x` to `pos` as the CPU reference does.
fn rotate(x: &mut [f32], pos: usize, inv_freq: &[f32], s: &AttnShape) {
    for head in x.chunks_mut(s.head_dim) {
        for (i, &f) in inv_freq.iter().enumerate() {
            let (sin, cos) = (pos as f32 * f).sin_cos();
            let (a, b) = if s.halves {
                (i, i + s.n_rot / 2)
            } else {
                (2 * i, 2 * i + 1)
            };
            let (x0, x1) = (head[a], head[b]);
            head[a] = x0 * cos - x1 * sin;
            head[b] = x0 * sin + x1 * cos;
        }
    }
}

#[test]
fn rope_append_and_attention_match_the_cpu() {
    let Some(device) = gpu("rope_append_and_attention_match_the_cpu") else {
        return;
    };
    let ops = ops(&device);
    let mut rng = Rng(23);
    // (halves, first position, tokens, head size, rotated dimensions): a call inside one
    // split of 64 positions and across two, head sizes 4 to 128, partial rotation, and more
    // splits than the merge takes at once (128).
    for (halves, pos0, n_tok, head_dim, n_rot) in [
        (false, 0, 1, 64, 64),
        (true, 5, 8, 64, 64),
        (true, 60, 8, 64, 64),
        (false, 250, 3, 64, 64),
        (true, 300, 1, 64, 64),
        (false, 130, 8, 128, 128),
        (true, 200, 2, 32, 16),
        (false, 70, 1, 4, 4),
        (true, 8250, 2, 64, 64),
    ] {
        let s = AttnShape {
            n_head: 8,
            n_head_kv: 2,
            head_dim,
            n_rot,
            halves,
            n_ctx: (pos0 + n_tok).max(320),
        };
        let (q_dim, kv) = (s.n_head * s.head_dim, s.n_head_kv * s.head_dim);
        let inv_freq: Vec<f32> = (0..s.n_rot / 2)
            .map(|i| 1.0 / 10000f32.powf((2 * i) as f32 / s.n_rot as f32))
            .collect();
        let qkv = rng.vec(n_tok * (q_dim + 2 * kv));
        let (k_cache, v_cache) = (rng.vec(s.n_ctx * kv), rng.vec(s.n_ctx * kv));
        let got = ops
            .rope_attention(&s, &inv_freq, pos0, &qkv, &k_cache, &v_cache)
            .unwrap();
        // The reference: rotate, append, then causal attention over the cache.
        let (mut k_want, mut v_want) = (k_cache.clone(), v_cache.clone());
        let mut q = vec![0.0; n_tok * q_dim];
        for t in 0..n_tok {
            let row = &qkv[t * (q_dim + 2 * kv)..][..q_dim + 2 * kv];
            let pos = pos0 + t;
            q[t * q_dim..][..q_dim].copy_from_slice(&row[..q_dim]);
            rotate(&mut q[t * q_dim..][..q_dim], pos, &inv_freq, &s);
            k_want[pos * kv..][..kv].copy_from_slice(&row[q_dim..q_dim + kv]);
            rotate(&mut k_want[pos * kv..][..kv], pos, &inv_freq, &s);
            v_want[pos * kv..][..kv].copy_from_slice(&row[q_dim + kv..]);
        }
        let mut want = vec![0.0; n_tok * q_dim];
        let group = s.n_head / s.n_head_kv;
        let scale = 1.0 / (s.head_dim as f32).sqrt();
        for t in 0..n_tok {
            for h in 0..s.n_head {
                let qh = &q[t * q_dim + h * s.head_dim..][..s.head_dim];
                let off = (h / group) * s.head_dim;
                let mut scores: Vec<f32> = (0..=pos0 + t)
                    .map(|p| {
                        let k = &k_want[p * kv + off..][..s.head_dim];
                        qh.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale
                    })
                    .collect();
                tern_model::quant::softmax(&mut scores);
                let out = &mut want[t * q_dim + h * s.head_dim..][..s.head_dim];
                for (p, &w) in scores.iter().enumerate() {
                    let v = &v_want[p * kv + off..][..s.head_dim];
                    for (o, &x) in out.iter_mut().zip(v) {
                        *o += w * x;
                    }
                }
            }
        }
        let what = format!("halves {halves}, positions {pos0}..{}", pos0 + n_tok);
        assert!(
            normalized_error(&got.k_cache, &k_want) <= 1e-6,
            "{what}: keys"
        );
        assert!(got.v_cache == v_want, "{what}: values");
        let err = normalized_error(&got.att, &want);
        assert!(err <= 1e-5, "{what}: attention error {err}");
    }
}

/// Whether the adapter is real hardware (not a CPU driver such as lavapipe).
fn hardware(device: &Arc<dyn Device>) -> bool {
    let gpu = device.as_wgpu().expect("a wgpu device");
    gpu.adapter_info().device_type != tern_compute::wgpu::wgpu::DeviceType::Cpu
}

#[test]
fn small_models_generate_as_the_cpu_does() {
    let Some(device) = gpu("small_models_generate_as_the_cpu_does") else {
        return;
    };
    let types = if hardware(&device) {
        DType::ALL.to_vec()
    } else {
        vec![DType::Q4_0, DType::Q6_K, DType::F16]
    };
    for linear in types {
        parity(&device, "small", linear, DType::Q8_0, 20);
    }
    // A prompt longer than one attention split (128 positions), in several chunks.
    parity(&device, "small", DType::Q4_1, DType::Q8_0, 150);
}

#[test]
fn real_shapes_generate_as_the_cpu_does() {
    let Some(device) = gpu("real_shapes_generate_as_the_cpu_does") else {
        return;
    };
    if !hardware(&device) {
        eprintln!("real_shapes_generate_as_the_cpu_does: skipped: the adapter is a CPU driver");
        return;
    }
    // The shapes of the benchmarks, in their types (the K-quants are checked op by op).
    parity(&device, "smollm2-135m", DType::Q4_1, DType::Q8_0, 24);
    parity(&device, "llama-3.2-1b", DType::F16, DType::F16, 24);
}

#[test]
fn logits_land_in_imported_guest_memory() {
    let Some(device) = gpu("logits_land_in_imported_guest_memory") else {
        return;
    };
    let path = model_file("small", DType::Q8_0, DType::Q8_0);
    let cpu = Model::open("m", &path, 2).unwrap();
    let model = Model::open("m", &path, 2)
        .unwrap()
        .on_device(&device)
        .unwrap();
    // A step's sessions share the CPU's passes over the weights; wgpu runs them one after
    // another, and says so.
    assert!(cpu.batches_steps() && !model.batches_steps());
    let mapper: Arc<dyn tern_compute::HostMapper> = device.clone();
    let mut region =
        tern_memory::Region::with_committed(1 << 20, 1 << 20, 0, vec![mapper]).unwrap();
    let n_vocab = model.config().n_vocab;
    let bytes = region.as_mut_slice();
    // SAFETY: 4-byte aligned (an offset of 4096 from a page), inside the region, and nothing
    // else borrows these bytes while the slice lives.
    let logits = unsafe {
        std::slice::from_raw_parts_mut(bytes.as_mut_ptr().add(4100).cast::<f32>(), n_vocab)
    };
    logits.fill(f32::NAN);
    let p = prompt(12, n_vocab);
    let mut want = vec![0.0; n_vocab];
    cpu.forward(&mut cpu.new_session(64).unwrap(), &p, &mut want)
        .unwrap();
    model
        .forward(&mut model.new_session(64).unwrap(), &p, logits)
        .unwrap();
    let gpu = device.as_wgpu().unwrap();
    if let tern_compute::wgpu::GuestAccess::ZeroCopy { .. } = gpu.guest_access() {
        assert!(
            gpu.guest_slice(logits.as_ptr() as usize, 4 * n_vocab)
                .is_some()
        );
    }
    assert!(normalized_error(logits, &want) <= 1e-4);
}

#[test]
fn a_kv_cache_moved_off_and_back_onto_the_gpu_continues_bit_for_bit() {
    let Some(device) = gpu("a_kv_cache_moved_off_and_back_onto_the_gpu_continues_bit_for_bit")
    else {
        return;
    };
    moved_cache_continues_bit_for_bit(&device, 40, 100, 8);
}

/// The f16 KV cache's conversions in WGSL (integer arithmetic: the language leaves the
/// rounding of its own to the implementation) give the CPU's bits: every f32 rounded to the
/// nearest f16, ties to even (normal, subnormal, tie, overflow, infinity and NaN cases, and
/// a sweep of the rest), and every one of the 65,536 f16s widened exactly.
#[test]
fn the_f16_cache_rounds_and_widens_as_the_cpu_does() {
    let Some(device) = gpu("the_f16_cache_rounds_and_widens_as_the_cpu_does") else {
        return;
    };
    let mut bits: Vec<u32> = (0..=0xffffu32).collect();
    let edges = [
        0x0000_0000,
        0x8000_0000,
        0x3380_0000, // 2^-24: the smallest f16 subnormal
        0x3300_0000, // 2^-25: a tie, rounds to zero (even)
        0x3300_0001, // just above: rounds up to the smallest subnormal
        0x3880_0000, // 2^-14: the smallest normal
        0x387f_e000, // just below it: rounds up to it
        0x3f80_1000, // 1 + 2^-11: a tie, rounds to even (1)
        0x3f80_3000, // 1 + 3 * 2^-11: a tie, rounds to even (up)
        0x477f_e000, // 65504: the largest f16
        0x477f_efff, // just below 65520: 65504
        0x477f_f000, // 65520: rounds to infinity
        0x7f80_0000,
        0xff80_0000,
        0x7fc0_0000,
        0x7f80_0001,
        0x0000_0001, // f32 subnormals: zero
        0x8040_0000,
    ];
    bits.extend(edges);
    // A sweep of every exponent with assorted mantissas, both signs.
    let mut x = 0x1234_5678u32;
    for _ in 0..200_000 {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        bits.push(x);
    }
    let harness = ops(&device);
    let (halves, widened) = harness.f16_conversions(&bits).unwrap();
    for (i, &b) in bits.iter().enumerate() {
        let want = half::f16::from_f32(f32::from_bits(b)).to_bits() as u32;
        assert_eq!(halves[i], want, "f32 {b:#010x} to f16");
        let want = half::f16::from_bits(b as u16).to_f32().to_bits();
        assert_eq!(widened[i], want, "f16 {:#06x} widened", b & 0xffff);
    }
}

/// With an f16 KV cache (keys and values rounded to nearest as they are stored, widened
/// exactly as they are read, the call's own included): the CPU's greedy tokens and the f32
/// cache's tolerance, over one attention split and several in chunks; a cache downloaded and
/// uploaded again (a snapshot's path) continues bit for bit.
#[test]
fn a_half_precision_kv_cache_generates_as_the_cpu_does() {
    let Some(device) = gpu("a_half_precision_kv_cache_generates_as_the_cpu_does") else {
        return;
    };
    parity_with(&device, "small", DType::Q4_1, DType::Q8_0, 20, KvType::F16);
    parity_with(&device, "small", DType::Q4_1, DType::Q8_0, 150, KvType::F16);
    moved_cache_continues_bit_for_bit_with(&device, 40, 100, 8, KvType::F16);
    let path = model_file("small", DType::Q4_1, DType::Q8_0);
    let model = Model::open("m", &path, 2)
        .unwrap()
        .with_kv_type(KvType::F16)
        .on_device(&device)
        .unwrap();
    assert!(model.compute_label().contains("f16 KV cache"));
    assert!(model.numerics().precision.contains("f16 KV cache"));
}
