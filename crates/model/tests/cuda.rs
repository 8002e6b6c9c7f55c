#![cfg(feature = "cuda")]
//! The CUDA forward pass against the CPU reference: every kernel op by op, then greedy
//! generation end to end on generated models of real shapes, determinism, and KV caches
//! moved off and back onto the GPU. Skipped (with the reason) where no GPU is present; the
//! GPU suite runs them with `TERN_REQUIRE_CUDA=1`.
//!
//! Tolerances: the GPU and the reference both keep activations in f32 and dequantize weights
//! inside the dot product, so only the order of additions (and fused multiply-adds) differs.
//! A dot product of n terms then differs by a few ulps of its largest partial sums: 1e-5 of
//! the output's scale covers n up to 8192 with margin. End to end, 30 layers compound that
//! to about 1e-4 of the logits' scale, far below the gap between the top two logits in all
//! but rare near-ties, so greedy tokens must match exactly for 32 steps.

mod common;
#[path = "common/conversations.rs"]
mod conversations;

use common::{
    Ops, Rng, bits, embedding_parity, greedy, harness_ops, matvec_parity, model_file,
    model_file_of, moved_cache_continues_bit_for_bit, moved_cache_continues_bit_for_bit_with,
    norm_and_activation_parity, normalized_error, parity, parity_with, prompt, quantized,
};

use std::sync::{Arc, OnceLock};

use tern_compute::Device;
use tern_compute::testing::cuda_or_skip;
use tern_model::generate::{Shape, shape};
use tern_model::llama::cuda::testing::OpHarness;
use tern_model::quant::{DType, dot_rows};
use tern_model::{KvType, Model, ModelError};

fn gpu(test: &str) -> Option<Arc<dyn Device>> {
    static GPU: OnceLock<Option<Arc<dyn Device>>> = OnceLock::new();
    GPU.get_or_init(|| cuda_or_skip(test)).clone()
}

harness_ops!(OpHarness);

#[test]
fn every_matvec_type_matches_the_cpu() {
    let Some(device) = gpu("every_matvec_type_matches_the_cpu") else {
        return;
    };
    // 2048 to 8192 columns split rows into 2, 2 (uneven), 4 and 8 parts.
    let widths = [256, 576, 2048, 2304, 4096, 8192];
    matvec_parity(&OpHarness::new(&device).unwrap(), &widths);
}

/// The forward pass fuses each RMSNorm into the product after it (the scale computed by the
/// kernel, the weights multiplied in by the kernel before): the same 1e-5 as a plain product,
/// as only the order of the scale's multiplication changes.
#[test]
fn matvec_with_the_norm_fused_in_matches_the_cpu() {
    let Some(device) = gpu("matvec_with_the_norm_fused_in_matches_the_cpu") else {
        return;
    };
    let ops = OpHarness::new(&device).unwrap();
    let mut rng = Rng(0xf05e);
    for (dtype, rows, cols) in [(DType::Q4_1, 960, 576), (DType::BF16, 3072, 2048)] {
        let w = quantized(dtype, rows, cols, &mut rng);
        let (g, g_next) = (rng.vec(cols), rng.vec(rows));
        for n_tok in [1, 5] {
            let x: Vec<f32> = rng.vec(n_tok * cols).iter().map(|v| v * 20.0).collect();
            let mut want = vec![0.0; n_tok * rows];
            let mut xb = vec![0.0; cols];
            for t in 0..n_tok {
                tern_model::llama::cpu::rmsnorm(&mut xb, &x[t * cols..(t + 1) * cols], &g, 1e-5);
                dot_rows(dtype, &w, &xb, &mut want[t * rows..(t + 1) * rows]);
            }
            let (y, yg) = ops
                .matvec_norm(dtype, rows, cols, &w, &x, &g, 1e-5, &g_next)
                .unwrap();
            let err = normalized_error(&y, &want);
            assert!(
                err <= 1e-5,
                "{dtype} {rows}x{cols}, {n_tok} tokens: error {err}"
            );
            let want_g: Vec<f32> = y
                .chunks(rows)
                .flat_map(|r| r.iter().zip(&g_next).map(|(a, b)| a * b))
                .collect();
            assert_eq!(
                yg.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want_g.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{dtype}: y * g_next"
            );
        }
    }
}

/// One-token products whose rows a warp takes several together (`matvec_together`,
/// `matvec_out_rows`) give the bits of one row a warp: every type (those whose rows never go
/// together too), 2 and 4 rows a warp, rows in parts, a partial last group of rows and partial
/// last steps, with and without the residual, the norm and the next norm's input, SwiGLU's
/// interleaved rows and the output head's kernel.
#[test]
fn rows_taken_together_give_the_bits_of_a_row_a_warp() {
    let Some(device) = gpu("rows_taken_together_give_the_bits_of_a_row_a_warp") else {
        return;
    };
    let ops = OpHarness::new(&device).unwrap();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let mut rng = Rng(0x70e7);
    // Rows a warp (`rows_together`): 4 (16,384 rows, and 16,387 with a last group of 3 and
    // 2.25 steps a row); 2, or 4 with fewer warps kept reading (8,195 rows, a last group of 1
    // or 3; 2,048 rows of 8,192 columns in 4 parts); 1, or 2 with fewer (5,003 rows; 2,048 of
    // 2,048 columns in 2 parts); 1 (300).
    let shapes = [
        (16384, 256),
        (16387, 576),
        (8195, 512),
        (2048, 8192),
        (5003, 512),
        (2048, 2048),
        (300, 2304),
    ];
    let both = |run: &dyn Fn() -> Vec<Vec<u32>>| {
        ops.set_rows_together(false);
        let apart = run();
        ops.set_rows_together(true);
        (run(), apart)
    };
    for dtype in DType::ALL {
        for (rows, cols) in shapes {
            if dtype.row_bytes(cols).is_none() {
                continue;
            }
            let w = quantized(dtype, rows, cols, &mut rng);
            let (x, residual) = (rng.vec(cols), rng.vec(rows));
            let (together, apart) = both(&|| {
                vec![
                    bits(&ops.matvec(dtype, rows, cols, &w, &x, None).unwrap()),
                    bits(
                        &ops.matvec(dtype, rows, cols, &w, &x, Some(&residual))
                            .unwrap(),
                    ),
                    bits(&ops.matvec_out(dtype, rows, cols, &w, &x).unwrap()),
                ]
            });
            assert!(together == apart, "{dtype} {rows}x{cols}");
        }
        let (rows, cols) = (16384, 576);
        if dtype.row_bytes(cols).is_none() {
            continue;
        }
        let w = quantized(dtype, rows, cols, &mut rng);
        let (g, g_next) = (rng.vec(cols), rng.vec(rows));
        let x: Vec<f32> = rng.vec(cols).iter().map(|v| v * 20.0).collect();
        let (together, apart) = both(&|| {
            let (y, yg) = ops
                .matvec_norm(dtype, rows, cols, &w, &x, &g, 1e-5, &g_next)
                .unwrap();
            let glu = ops.matvec_glu(dtype, rows, cols, &w, &x).unwrap();
            vec![bits(&y), bits(&yg), bits(&glu)]
        });
        assert!(
            together == apart,
            "{dtype} {rows}x{cols} with the norm and SwiGLU"
        );
    }
}

/// The GPU's top-k selection picks exactly what the CPU's does (same order, ties to the
/// smaller token, infinities and signed zeros in IEEE total order), for vocabularies that
/// fill one block, many, and a partial last one.
#[test]
fn top_logits_are_selected_as_on_the_cpu() {
    let Some(device) = gpu("top_logits_are_selected_as_on_the_cpu") else {
        return;
    };
    let ops = OpHarness::new(&device).unwrap();
    let mut rng = Rng(0x7017);
    let bits = |c: &[tern_model::Candidate]| -> Vec<(u32, u32)> {
        c.iter().map(|c| (c.token, c.logit.to_bits())).collect()
    };
    for n in [512, 1000, 49_152, 128_256] {
        // Values from a small set, so that ties are everywhere.
        let mut logits: Vec<f32> = (0..n).map(|_| (rng.f32() * 50.0).round() / 4.0).collect();
        logits[n / 3] = f32::INFINITY;
        logits[n / 2] = -0.0;
        logits[n / 2 + 1] = 0.0;
        logits[n - 1] = f32::NEG_INFINITY;
        for k in [1, 5, 64] {
            let got = ops.top_k(&logits, k).unwrap();
            let mut want = vec![tern_model::Candidate::default(); k];
            tern_model::top::top_k(&logits, &mut want);
            assert_eq!(bits(&got), bits(&want), "{n} logits, k = {k}");
        }
        // Several rows selected together (a batched step's sessions), k = 0 among them.
        let ks = [1, 64, 0, 5];
        let rows: Vec<f32> = (0..ks.len())
            .flat_map(|_| {
                (0..n)
                    .map(|_| (rng.f32() * 50.0).round() / 4.0)
                    .collect::<Vec<_>>()
            })
            .collect();
        let together = ops.top_k_many(&rows, n, &ks).unwrap();
        for ((row, &k), got) in rows.chunks_exact(n).zip(&ks).zip(&together) {
            let alone = ops.top_k(row, k.max(1)).unwrap();
            let mut want = vec![tern_model::Candidate::default(); k];
            tern_model::top::top_k(row, &mut want);
            assert_eq!(bits(got), bits(&want), "{n} logits, k = {k}, together");
            assert_eq!(bits(got), bits(&alone[..k]), "{n} logits, k = {k}, alone");
        }
    }
}

#[test]
fn embedding_rows_of_every_type_match_the_cpu() {
    let Some(device) = gpu("embedding_rows_of_every_type_match_the_cpu") else {
        return;
    };
    embedding_parity(&OpHarness::new(&device).unwrap());
}

#[test]
fn norms_and_activations_match_the_cpu() {
    let Some(device) = gpu("norms_and_activations_match_the_cpu") else {
        return;
    };
    norm_and_activation_parity(&OpHarness::new(&device).unwrap());
}

#[test]
fn small_models_of_every_type_generate_as_the_cpu_does() {
    let Some(device) = gpu("small_models_of_every_type_generate_as_the_cpu_does") else {
        return;
    };
    for linear in DType::ALL {
        parity(&device, "small", linear, DType::Q8_0, 20);
    }
    // A prompt of many attention splits (64 positions each), prefilled in chunks.
    parity(&device, "small", DType::Q4_1, DType::Q8_0, 600);
}

/// Prompts of 64 positions and more go through BF16 tensor-core GEMMs, whose operands (the
/// normalized activations, the attention output, SwiGLU's output, and weights of other
/// types) are rounded to 8 significant bits: a relative error of up to 2^-9 per operand.
/// Over a dot product of random-signed terms that stays near 2^-9 of the result's scale, and
/// through every layer it compounds to a few 1e-3 of the logits' scale; 3e-2 leaves margin
/// and still catches any wrong index, layout or missing term, which give errors of order 1.
/// The same prompt twice gives the same bits.
#[test]
fn tensor_core_prefill_stays_close_to_the_cpu() {
    let Some(device) = gpu("tensor_core_prefill_stays_close_to_the_cpu") else {
        return;
    };
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    // The small shape again with each other head size the attention kernels are built for
    // (64 is the real shapes'): 32 and 256 on f32 FMAs, 128 on tensor cores.
    let small = shape("small").unwrap();
    let heads = |name, n_head, n_head_kv| Shape {
        name,
        n_head,
        n_head_kv,
        ..small.clone()
    };
    for (shape, linear, embd) in [
        (small.clone(), DType::Q4_1, DType::Q8_0),
        (heads("small-d32", 8, 4), DType::Q4_1, DType::Q8_0),
        (heads("small-d128", 2, 1), DType::Q4_1, DType::Q8_0),
        (heads("small-d256", 1, 1), DType::Q4_1, DType::Q8_0),
        (
            shape("smollm2-135m").unwrap().clone(),
            DType::Q8_0,
            DType::Q8_0,
        ),
        (
            shape("llama-3.2-1b").unwrap().clone(),
            DType::BF16,
            DType::BF16,
        ),
    ] {
        let shape_name = shape.name;
        let path = model_file_of(&shape, linear, embd);
        let cpu = Model::open("m", &path, threads).unwrap();
        let gpu = Model::open("m", &path, threads)
            .unwrap()
            .on_device(&device)
            .unwrap();
        let n_vocab = cpu.config().n_vocab;
        // One chunk; one chunk of many attention splits plus a shorter one; and a long
        // prompt after a short one (the chunk starts mid-split).
        for (before, len) in [(0, 64), (0, 600), (5, 130)] {
            let p = prompt(before + len, n_vocab);
            let run = |model: &Model| {
                let mut session = model.new_session(before + len + 8).unwrap();
                let mut logits = vec![0.0; n_vocab];
                if before > 0 {
                    model
                        .forward(&mut session, &p[..before], &mut logits)
                        .unwrap();
                }
                model
                    .forward(&mut session, &p[before..], &mut logits)
                    .unwrap();
                // One decode step on the cache the prefill wrote (the same token for both).
                let next = 17;
                let mut after = vec![0.0; n_vocab];
                model.forward(&mut session, &[next], &mut after).unwrap();
                (logits, after)
            };
            let (want, want_after) = run(&cpu);
            let (got, got_after) = run(&gpu);
            let err = normalized_error(&got, &want);
            let err_after = normalized_error(&got_after, &want_after);
            eprintln!(
                "{shape_name} {linear}, {before} + {len} positions: normalized logit error {err:.2e}, after one more token {err_after:.2e}"
            );
            assert!(err <= 3e-2, "{shape_name} {linear} {len}: error {err}");
            assert!(
                err_after <= 3e-2,
                "{shape_name} {linear} {len}: error {err_after} after"
            );
            let (again, _) = run(&gpu);
            assert_eq!(
                bits(&[again]),
                bits(&[got]),
                "{shape_name} {len}: the tensor-core prefill is not reproducible"
            );
        }
    }
}

#[test]
fn real_shapes_generate_as_the_cpu_does() {
    let Some(device) = gpu("real_shapes_generate_as_the_cpu_does") else {
        return;
    };
    parity(&device, "smollm2-135m", DType::Q4_1, DType::Q8_0, 24);
    parity(&device, "smollm2-135m", DType::Q8_0, DType::Q8_0, 24);
    parity(&device, "llama-3.2-1b", DType::BF16, DType::BF16, 24);
    parity(&device, "llama-3.2-1b", DType::Q8_0, DType::Q8_0, 24);
}

/// Runs `check` over the models the decode path's bit tests take, each opened on `device`
/// with a prompt of its length: every weight type at a small shape, a context of many
/// attention splits, and the real shapes.
fn each_decode_model(
    device: &Arc<dyn Device>,
    mut check: impl FnMut(&str, DType, &Model, &tern_model::llama::cuda::CudaLlama, &[u32]),
) {
    let cases = DType::ALL
        .iter()
        .map(|&t| ("small", t, DType::Q8_0, 20))
        .chain([
            ("small", DType::Q4_1, DType::Q8_0, 600),
            ("smollm2-135m", DType::Q4_1, DType::Q8_0, 40),
            ("llama-3.2-1b", DType::BF16, DType::BF16, 70),
            ("llama-3.2-1b", DType::Q8_0, DType::Q8_0, 70),
        ]);
    for (shape_name, linear, embd, len) in cases {
        let model = open_on(device, &model_file(shape_name, linear, embd));
        let cuda = model
            .engine_as::<tern_model::llama::cuda::CudaLlama>()
            .unwrap();
        let p = prompt(len, model.config().n_vocab);
        check(shape_name, linear, &model, cuda, &p);
    }
}

/// A decode step's layers, when asked to run in one persistent kernel (decode.cu), keep the
/// arithmetic of the kernel-by-kernel step (matvec.cuh, attention.cuh): the same logits, bit
/// for bit, step after step, for every weight type, for the real shapes, and at a context of
/// many attention splits.
#[test]
fn the_persistent_decode_kernel_gives_the_kernel_by_kernel_bits() {
    let Some(device) = gpu("the_persistent_decode_kernel_gives_the_kernel_by_kernel_bits") else {
        return;
    };
    each_decode_model(&device, |shape_name, linear, model, cuda, p| {
        assert!(
            cuda.has_fused_decode(),
            "{shape_name} {linear}: {}",
            cuda.decode_path()
        );
        let run = || greedy(model, &mut model.new_session(p.len() + 40).unwrap(), p, 16);
        cuda.set_fused_decode(true);
        let (fused, tokens) = run();
        cuda.set_fused_decode(false);
        let (apart, tokens_apart) = run();
        assert_eq!(tokens, tokens_apart, "{shape_name} {linear}");
        assert!(
            bits(&fused) == bits(&apart),
            "{shape_name} {linear}, {} positions: the persistent kernel's logits differ",
            p.len()
        );
    });
}

/// One-token products taking several rows a warp and attention asking for its cached rows
/// before its wait (both on by default), each off and both off, give the same logits, bit for
/// bit, over the same models.
#[test]
fn rows_together_and_early_attention_give_the_plain_kernels_bits() {
    let Some(device) = gpu("rows_together_and_early_attention_give_the_plain_kernels_bits") else {
        return;
    };
    each_decode_model(&device, |shape_name, linear, model, cuda, p| {
        let run = |together, early| {
            cuda.with_one_token_kernels(together, early, || {
                greedy(model, &mut model.new_session(p.len() + 40).unwrap(), p, 16)
            })
        };
        let (plain, tokens) = run(false, false);
        let mut failures = Vec::new();
        for (together, early) in [(true, false), (false, true), (true, true)] {
            let (logits, t) = run(together, early);
            if t != tokens || bits(&logits) != bits(&plain) {
                failures.push(format!("rows together {together}, early attention {early}"));
            }
        }
        assert!(
            failures.is_empty(),
            "{shape_name} {linear}, {} positions: the logits differ from the plain kernels' with {}",
            p.len(),
            failures.join("; ")
        );
    });
}

#[test]
fn results_are_bitwise_reproducible_whatever_else_runs() {
    let Some(device) = gpu("results_are_bitwise_reproducible_whatever_else_runs") else {
        return;
    };
    let path = model_file("smollm2-135m", DType::Q4_1, DType::Q8_0);
    let model = open_on(&device, &path);
    let p = prompt(40, 49152);
    let (alone, tokens) = greedy(&model, &mut model.new_session(300).unwrap(), &p, 24);
    // The same run with another session's work interleaved step by step.
    let mut session = model.new_session(300).unwrap();
    let mut other = model.new_session(300).unwrap();
    let mut logits = vec![0.0; model.config().n_vocab];
    let mut noise = vec![0.0; model.config().n_vocab];
    model
        .forward(&mut other, &prompt(77, 49152), &mut noise)
        .unwrap();
    model.forward(&mut session, &p, &mut logits).unwrap();
    let mut busy = vec![logits.clone()];
    for &t in &tokens {
        model.forward(&mut other, &[5], &mut noise).unwrap();
        model.forward(&mut session, &[t], &mut logits).unwrap();
        busy.push(logits.clone());
    }
    assert!(
        bits(&alone) == bits(&busy),
        "logits changed with other work on the GPU"
    );
    let (again, _) = greedy(&model, &mut model.new_session(300).unwrap(), &p, 24);
    assert!(bits(&alone) == bits(&again), "logits changed between runs");
}

/// A half-precision KV cache on the GPU against the CPU's (both round keys and values to
/// nearest as they are appended and widen them exactly for attention): the same tolerance
/// and greedy tokens as the f32 cache, at a short and a long context (many attention
/// splits); the persistent decode kernel keeps the kernel-by-kernel bits; and a cache
/// downloaded and uploaded again (a snapshot's path) continues bit for bit.
#[test]
fn a_half_precision_kv_cache_generates_as_the_cpu_does() {
    let Some(device) = gpu("a_half_precision_kv_cache_generates_as_the_cpu_does") else {
        return;
    };
    parity_with(&device, "small", DType::Q4_1, DType::Q8_0, 20, KvType::F16);
    parity_with(&device, "small", DType::Q4_1, DType::Q8_0, 600, KvType::F16);
    parity_with(
        &device,
        "smollm2-135m",
        DType::Q4_1,
        DType::Q8_0,
        24,
        KvType::F16,
    );
    moved_cache_continues_bit_for_bit_with(&device, 300, 400, 16, KvType::F16);

    let path = model_file("smollm2-135m", DType::Q4_1, DType::Q8_0);
    let model = Model::open("m", &path, 2)
        .unwrap()
        .with_kv_type(KvType::F16)
        .on_device(&device)
        .unwrap();
    assert_eq!(model.kv_type(), KvType::F16);
    assert!(model.compute_label().contains("f16 KV cache"));
    let cuda = model
        .engine_as::<tern_model::llama::cuda::CudaLlama>()
        .unwrap();
    let p = prompt(100, model.config().n_vocab);
    let run = || greedy(&model, &mut model.new_session(200).unwrap(), &p, 16);
    let (apart, tokens) = run();
    if cuda.has_fused_decode() {
        cuda.set_fused_decode(true);
        let (fused, fused_tokens) = run();
        cuda.set_fused_decode(false);
        assert_eq!(tokens, fused_tokens);
        assert!(
            bits(&fused) == bits(&apart),
            "the persistent kernel's logits differ"
        );
    }
    // A position's keys read the same whether this call or an earlier one appended them:
    // token by token gives the bits of chunks of 63.
    let mut session = model.new_session(200).unwrap();
    let mut logits = vec![0.0; model.config().n_vocab];
    for &t in &p {
        model.forward(&mut session, &[t], &mut logits).unwrap();
    }
    assert!(
        bits(&[logits]) == bits(&apart[..1]),
        "token by token differs from chunks"
    );
}

#[test]
fn a_kv_cache_moved_off_and_back_onto_the_gpu_continues_bit_for_bit() {
    let Some(device) = gpu("a_kv_cache_moved_off_and_back_onto_the_gpu_continues_bit_for_bit")
    else {
        return;
    };
    moved_cache_continues_bit_for_bit(&device, 300, 400, 16);
}

#[test]
fn sessions_made_read_and_dropped_on_other_threads_leave_decoding_alone() {
    let Some(device) = gpu("sessions_made_read_and_dropped_on_other_threads_leave_decoding_alone")
    else {
        return;
    };
    let path = model_file("smollm2-135m", DType::Q4_1, DType::Q8_0);
    let model = Arc::new(open_on(&device, &path));
    let p = prompt(40, 49152);
    let (alone, _) = greedy(&model, &mut model.new_session(300).unwrap(), &p, 24);
    // While threads decode (each decode step may capture the stream into a graph), others
    // open sessions, prefill them, read their KV caches back and drop them.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let churn: Vec<_> = (0..3)
        .map(|i| {
            let (model, stop) = (model.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut logits = vec![0.0; model.config().n_vocab];
                let mut rounds = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let mut s = model.new_session(128 + 64 * i).unwrap();
                    model
                        .forward(&mut s, &prompt(20 + i, 49152), &mut logits)
                        .unwrap();
                    let kv = s.host_kv(&model).unwrap();
                    assert_eq!(kv.len, 20 + i);
                    rounds += 1;
                }
                rounds
            })
        })
        .collect();
    let decoders: Vec<_> = (0..3)
        .map(|_| {
            let (model, p) = (model.clone(), p.clone());
            std::thread::spawn(move || {
                (0..4)
                    .map(|_| greedy(&model, &mut model.new_session(300).unwrap(), &p, 24).0)
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    for d in decoders {
        for run in d.join().unwrap() {
            assert!(
                bits(&alone) == bits(&run),
                "logits changed beside other sessions' work"
            );
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for c in churn {
        assert!(c.join().unwrap() > 0);
    }
}

/// A greedy decode (each call wants its top logit alone) runs each next step ahead of its
/// call. The tokens and logits are the bits of steps run one call at a time: also where the
/// caller feeds another token than the one run ahead, rewinds, or reads the cache between
/// steps.
#[test]
fn greedy_steps_run_ahead_with_the_same_bits() {
    let Some(device) = gpu("greedy_steps_run_ahead_with_the_same_bits") else {
        return;
    };
    let model = smollm2_on(&device);
    let vocab = model.config().n_vocab;
    let p = prompt(40, vocab);
    // The reference wants every step's logits, so nothing of it runs ahead.
    let (mut want, mut got) = (
        model.new_session(300).unwrap(),
        model.new_session(300).unwrap(),
    );
    let (mut logits, mut first) = (vec![0.0; vocab], vec![0.0; vocab]);
    model.forward(&mut want, &p, &mut logits).unwrap();
    model.forward(&mut got, &p, &mut first).unwrap();
    assert!(bits(&[logits.clone()]) == bits(&[first]));
    let mut next = tern_model::llama::cpu::argmax(&logits);
    let mut len = p.len();
    for step in 0..48 {
        let mut top = [tern_model::Candidate::default()];
        model
            .forward_top(&mut got, &[next], None, &mut top)
            .unwrap();
        model.forward(&mut want, &[next], &mut logits).unwrap();
        len += 1;
        let best = tern_model::llama::cpu::argmax(&logits);
        assert_eq!(
            (top[0].token, top[0].logit.to_bits()),
            (best, logits[best as usize].to_bits()),
            "step {step}"
        );
        next = best;
        match step {
            // Another token than the one the step run ahead took.
            10 | 11 => next = (best + 1) % vocab as u32,
            // Back three positions, with a step run ahead at the end.
            20 => {
                len -= 3;
                got.rewind(len);
                want.rewind(len);
            }
            // The cache read back while a step runs ahead.
            30 => {
                let (a, b) = (got.host_kv(&model).unwrap(), want.host_kv(&model).unwrap());
                assert_eq!(a.len, len);
                assert!(a.k == b.k && a.v == b.v, "the caches differ");
            }
            _ => {}
        }
    }
}

/// Steps of several greedy decode steps enqueue the next one ahead of their calls: each
/// session gets the bits of its own steps run alone (which copy their logits out) whether
/// its caller takes the step ahead, brings another token, rewinds, sits a step out, reads its
/// cache back, or comes back alone; in steps of `Model::step` and through the scheduler.
#[test]
fn batched_greedy_steps_run_ahead_with_the_same_bits() {
    let Some(device) = gpu("batched_greedy_steps_run_ahead_with_the_same_bits") else {
        return;
    };
    let model = smollm2_on(&device);
    let vocab = model.config().n_vocab;
    const N: usize = 6;
    let mut want: Vec<_> = (0..N).map(|_| model.new_session(300).unwrap()).collect();
    let mut got: Vec<_> = (0..N).map(|_| model.new_session(300).unwrap()).collect();
    let (mut logits, mut first) = (vec![0.0; vocab], vec![0.0; vocab]);
    let mut next = [0u32; N];
    let mut len = [0usize; N];
    for i in 0..N {
        let p = prompt(10 + 7 * i, vocab);
        model.forward(&mut want[i], &p, &mut logits).unwrap();
        model.forward(&mut got[i], &p, &mut first).unwrap();
        assert!(bits(&[logits.clone()]) == bits(&[first.clone()]));
        next[i] = tern_model::llama::cpu::argmax(&logits);
        len[i] = p.len();
    }
    for step in 0..40 {
        let in_step: Vec<usize> = match step {
            // Session 4 sits out: its row of the step ahead is not taken.
            10 => (0..N).filter(|&i| i != 4).collect(),
            // One session alone takes its row.
            30 => vec![2],
            _ => (0..N).collect(),
        };
        let mut tops = vec![[tern_model::Candidate::default()]; in_step.len()];
        let mut steps: Vec<tern_model::Step<'_>> = got
            .iter_mut()
            .zip(&next)
            .enumerate()
            .filter(|(i, _)| in_step.contains(i))
            .zip(tops.iter_mut())
            .map(|((_, (session, token)), top)| tern_model::Step {
                session,
                tokens: std::slice::from_ref(token),
                logits: None,
                top,
            })
            .collect();
        model.step(&mut steps).unwrap();
        drop(steps);
        for (&i, top) in in_step.iter().zip(&tops) {
            model
                .forward(&mut want[i], &[next[i]], &mut logits)
                .unwrap();
            len[i] += 1;
            let best = tern_model::llama::cpu::argmax(&logits);
            assert_eq!(
                (top[0].token, top[0].logit.to_bits()),
                (best, logits[best as usize].to_bits()),
                "step {step}, session {i}"
            );
            next[i] = best;
        }
        match step {
            // Another token than the one the step ahead took.
            15 => next[1] = (next[1] + 1) % vocab as u32,
            // Back three positions.
            20 => {
                len[3] -= 3;
                got[3].rewind(len[3]);
                want[3].rewind(len[3]);
            }
            // The cache read back while a step runs ahead.
            25 => {
                let (a, b) = (
                    got[0].host_kv(&model).unwrap(),
                    want[0].host_kv(&model).unwrap(),
                );
                assert_eq!(a.len, len[0]);
                assert!(a.k == b.k && a.v == b.v, "the caches differ");
            }
            _ => {}
        }
    }
    // Through the step scheduler: 12 threads decoding greedily at once, each now and then
    // bringing another token than its selection, against the same steps alone.
    let runs: Vec<Vec<(u32, u32)>> = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..12)
            .map(|t| {
                let model = &model;
                scope.spawn(move || {
                    let mut session = model.new_session(300).unwrap();
                    let mut top = [tern_model::Candidate::default()];
                    model
                        .forward_top(&mut session, &prompt(5 + 3 * t, vocab), None, &mut top)
                        .unwrap();
                    (0..32)
                        .map(|step| {
                            let mut token = top[0].token;
                            if (step + t) % 11 == 0 {
                                token = (token + 1) % vocab as u32;
                            }
                            model
                                .forward_top(&mut session, &[token], None, &mut top)
                                .unwrap();
                            (token, top[0].logit.to_bits())
                        })
                        .collect()
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    });
    for (t, run) in runs.iter().enumerate() {
        let mut alone = model.new_session(300).unwrap();
        let p = prompt(5 + 3 * t, vocab);
        model.forward(&mut alone, &p, &mut logits).unwrap();
        let mut best = tern_model::llama::cpu::argmax(&logits);
        for (step, &(token, logit)) in run.iter().enumerate() {
            if (step + t) % 11 != 0 {
                assert_eq!(token, best, "thread {t}, step {step}");
            }
            model.forward(&mut alone, &[token], &mut logits).unwrap();
            best = tern_model::llama::cpu::argmax(&logits);
            assert_eq!(
                logit,
                logits[best as usize].to_bits(),
                "thread {t}, step {step}"
            );
        }
    }
}

/// The SmolLM2-135M shape, Q4_1, on the GPU.
fn smollm2_on(device: &Arc<dyn Device>) -> Model {
    open_on(
        device,
        &model_file("smollm2-135m", DType::Q4_1, DType::Q8_0),
    )
}

/// The model file at `path` opened (2 threads) and moved onto `device`.
fn open_on(device: &Arc<dyn Device>, path: &std::path::Path) -> Model {
    Model::open("m", path, 2)
        .unwrap()
        .on_device(device)
        .unwrap()
}

/// Batched steps on the GPU keep every conversation's bits: alone, and among 1, 7 and 63
/// others whose forward passes the step scheduler gathers with its own (random prompts,
/// pieces, arrival times; pieces of 64 tokens or more take the tensor-core prefill, cut
/// the same way alone and together).
#[test]
fn conversations_get_the_same_bits_alone_and_among_up_to_63_others() {
    let Some(device) = gpu("conversations_get_the_same_bits_alone_and_among_up_to_63_others")
    else {
        return;
    };
    let model = smollm2_on(&device);
    let vocab = model.config().n_vocab;
    let mut rng = Rng(0x5eed_00c0);
    for others in [1, 7, 63] {
        let conversations: Vec<_> = (0..=others)
            .map(|_| conversations::Conversation::random(&mut rng, vocab))
            .collect();
        conversations::alone_and_together(&model, &conversations);
    }
    let stats = model.step_stats();
    assert!(
        stats.steps < stats.chunks,
        "no step held two forward passes"
    );
}

/// One step over sessions at different positions, with 1 to 64 new tokens each, on the
/// GPU: each session's logits and cache are those it gets alone.
#[test]
fn one_step_over_several_sessions_gives_each_its_own_bits() {
    let Some(device) = gpu("one_step_over_several_sessions_gives_each_its_own_bits") else {
        return;
    };
    let model = smollm2_on(&device);
    conversations::one_step_gives_each_session_its_own_bits(
        &model,
        &[0, 5, 40, 100, 63, 200, 1, 0],
        &[30, 1, 64, 3, 1, 9, 8, 1],
    );
    // More sessions than one round takes.
    let history: Vec<usize> = (0..70).map(|i| i * 3 % 50).collect();
    let new: Vec<usize> = (0..70).map(|i| 1 + i % 3).collect();
    conversations::one_step_gives_each_session_its_own_bits(&model, &history, &new);
    long_conversations_keep_their_bits(&model);
}

/// 64 sessions of 600 to 2,000 positions (or the model's context), a new token each, in
/// one step: thousands of attention splits, which the batched attention's blocks take
/// several at a time (a session alone takes one a block), each session with the bits it
/// gets alone.
fn long_conversations_keep_their_bits(model: &Model) {
    let span = model.config().n_ctx_train.min(2003) - 603;
    let history: Vec<usize> = (0..64).map(|i| 600 + i * 97 % span).collect();
    conversations::one_step_gives_each_session_its_own_bits(model, &history, &[1; 64]);
}

/// Below the tensor-core prefill's 64 positions, a prompt in one call, in pieces and token
/// by token gives the same bits on the GPU.
#[test]
fn short_prompts_give_the_same_bits_however_they_are_cut() {
    let Some(device) = gpu("short_prompts_give_the_same_bits_however_they_are_cut") else {
        return;
    };
    cuts_give_the_bits_of_one_call(&smollm2_on(&device), 63, &[5, 17, 41]);
}

/// At `Precision::Tensor` a prompt of 64 positions or more (chunks of 64 through the
/// tensor-core products of every step, its queries on the decode attention kernel) gives the
/// bits of one call, of any pieces and of the same tokens one by one.
#[test]
fn long_prompts_on_tensor_cores_give_the_same_bits_however_they_are_cut() {
    let Some(device) = gpu("long_prompts_on_tensor_cores_give_the_same_bits_however_they_are_cut")
    else {
        return;
    };
    let model = llama_1b_on_tensor_cores(&device);
    cuts_give_the_bits_of_one_call(&model, 150, &[70, 13, 67]);
}

/// The Llama-3.2-1B shape in BF16 on `device` at `Precision::Tensor`.
fn llama_1b_on_tensor_cores(device: &Arc<dyn Device>) -> Model {
    let path = model_file("llama-3.2-1b", DType::BF16, DType::BF16);
    Model::open("m", &path, 2)
        .unwrap()
        .with_precision(tern_model::Precision::Tensor)
        .on_device(device)
        .unwrap()
}

/// A prompt of `len` positions gives `model`'s logits the same bits in one call, in
/// `pieces` and token by token.
fn cuts_give_the_bits_of_one_call(model: &Model, len: usize, pieces: &[usize]) {
    let vocab = model.config().n_vocab;
    let p = prompt(len, vocab);
    let run = |pieces: &[usize]| {
        let mut session = model.new_session(len + 1).unwrap();
        let mut logits = vec![0.0; vocab];
        let mut at = 0;
        for &n in pieces {
            model
                .forward(&mut session, &p[at..at + n], &mut logits)
                .unwrap();
            at += n;
        }
        bits(&[logits])
    };
    let whole = run(&[len]);
    assert!(run(pieces) == whole, "pieces differ from one call");
    assert!(
        run(&vec![1; len]) == whole,
        "token by token differs from one call"
    );
}

/// 1,000 runs of one request while three threads run random conversations on the same
/// model give one output.
#[test]
fn a_thousand_runs_of_one_request_among_random_load_give_one_output() {
    let Some(device) = gpu("a_thousand_runs_of_one_request_among_random_load_give_one_output")
    else {
        return;
    };
    conversations::one_request_among_random_load_gives_one_output(
        Arc::new(smollm2_on(&device)),
        1000,
    );
}

/// At `Precision::Tensor` (the BF16 products on tensor cores, `mma.cuh`), the 1B shape's
/// matrices keep each session's bits alone, in one step beside others, and among
/// conversations the scheduler gathers.
#[test]
fn tensor_core_products_keep_each_sessions_bits() {
    let Some(device) = gpu("tensor_core_products_keep_each_sessions_bits") else {
        return;
    };
    let model = llama_1b_on_tensor_cores(&device);
    let cuda = model
        .engine_as::<tern_model::llama::cuda::CudaLlama>()
        .unwrap();
    assert!(
        cuda.tensor_cores(),
        "the BF16 matrices are not on tensor cores"
    );
    // Within 1.5e-5 of the CPU reference when measured (1.3e-6 for the f32 kernels).
    common::parity_at(
        &device,
        "llama-3.2-1b",
        DType::BF16,
        DType::BF16,
        24,
        KvType::F32,
        tern_model::Precision::Tensor,
    );
    keeps_each_sessions_bits(&model, 0x5eed_7c0e, 12);
}

/// A model of bf16 matrices (the 1B benchmark's type) keeps each session's bits alone, in
/// one step beside others, and among conversations the scheduler gathers.
#[test]
fn bf16_matrices_keep_each_sessions_bits_in_batched_steps() {
    let Some(device) = gpu("bf16_matrices_keep_each_sessions_bits_in_batched_steps") else {
        return;
    };
    let path = model_file("small", DType::BF16, DType::BF16);
    let model = open_on(&device, &path);
    keeps_each_sessions_bits(&model, 0x5eed_0bf1, 24);
}

/// `model` gives each session its own bits in one step over 8 sessions at different
/// positions, `n` random conversations (from `seed`) the same bits alone and together, and
/// 64 long conversations in one step.
fn keeps_each_sessions_bits(model: &Model, seed: u64, n: usize) {
    conversations::one_step_gives_each_session_its_own_bits(
        model,
        &[0, 5, 40, 100, 63, 200, 1, 0],
        &[30, 1, 64, 3, 1, 9, 8, 1],
    );
    let vocab = model.config().n_vocab;
    let mut rng = Rng(seed);
    let conversations: Vec<_> = (0..n)
        .map(|_| conversations::Conversation::random(&mut rng, vocab))
        .collect();
    conversations::alone_and_together(model, &conversations);
    long_conversations_keep_their_bits(model);
}

/// A profiled batched step (`tern bench batch`'s breakdown) times every phase and leaves its
/// sessions as they were: the step after it gives the bits a step gives unprofiled.
#[test]
fn a_profiled_batched_step_leaves_its_sessions_as_they_were() {
    let Some(device) = gpu("a_profiled_batched_step_leaves_its_sessions_as_they_were") else {
        return;
    };
    let model = smollm2_on(&device);
    let cuda = model
        .engine_as::<tern_model::llama::cuda::CudaLlama>()
        .unwrap();
    let vocab = model.config().n_vocab;
    let prompts = [prompt(20, vocab), prompt(33, vocab)];
    let after_prompts = || {
        prompts
            .iter()
            .map(|p| {
                let mut session = model.new_session(64).unwrap();
                let mut logits = vec![0.0; vocab];
                model.forward(&mut session, p, &mut logits).unwrap();
                session
            })
            .collect::<Vec<_>>()
    };
    let tokens = [7u32, 11];
    let step = |sessions: &mut [tern_model::Session]| {
        let mut logits = vec![vec![0.0f32; vocab]; sessions.len()];
        let mut tops = vec![[tern_model::Candidate::default()]; sessions.len()];
        let mut steps: Vec<tern_model::Step<'_>> = sessions
            .iter_mut()
            .zip(&tokens)
            .zip(logits.iter_mut().zip(tops.iter_mut()))
            .map(|((session, token), (l, top))| tern_model::Step {
                session,
                tokens: std::slice::from_ref(token),
                logits: Some(l.as_mut_slice()),
                top,
            })
            .collect();
        model.step(&mut steps).unwrap();
        logits
    };
    let mut plain = after_prompts();
    let want = step(&mut plain);
    let mut profiled = after_prompts();
    let mut states: Vec<_> = profiled
        .iter_mut()
        .map(|s| {
            s.state_mut::<tern_model::llama::cuda::CudaSession>()
                .unwrap()
        })
        .collect();
    let times = cuda.profile_batch(&mut states, &tokens).unwrap();
    for phase in ["embedding, norm", "attention", "output head", "top logits"] {
        assert!(
            times.iter().any(|(name, us)| *name == phase && *us > 0.0),
            "no time for {phase}: {times:?}"
        );
    }
    assert!(cuda.profile_batch(&mut states[..1], &tokens[..1]).is_err());
    let got = step(&mut profiled);
    assert!(
        bits(&got) == bits(&want),
        "the profiled step moved a session"
    );
}
