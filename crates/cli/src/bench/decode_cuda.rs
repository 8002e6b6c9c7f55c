//! `tern bench decode --device cuda`: batch-1 decode and prefill speed of a model on the GPU,
//! directly on the engine and through the `bench` actor (whose logits the GPU writes into the
//! actor's memory), with the GPU's memory roofline and a per-kernel breakdown of one decode
//! step, all measured in the same run.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use tern_compute::DeviceChoice;
use tern_model::Model;

use super::{GpuBench, GuestBench, print_breakdown};

pub fn decode_cuda(b: GpuBench<'_>) -> anyhow::Result<ExitCode> {
    let device = tern_compute::open(DeviceChoice::Cuda)?;
    let model = Model::open("bench", b.path, 1)?
        .with_precision(b.precision)
        .on_device(&device)?;
    let model = Arc::new(model);
    let Some(cuda) = model.engine_as::<tern_model::llama::cuda::CudaLlama>() else {
        bail!("the model did not go onto the GPU");
    };
    let c = model.config().clone();
    let weight_bytes = model.llama.weights.bytes_per_token() as f64;
    let st = cuda.startup;
    super::print_model(
        "decode",
        b.path,
        &model,
        &format!("on {}", device.describe()),
    );
    println!(
        "startup: kernels {:.1} ms ({}), weights {:.1} ms ({:.1} MB); {} kernels per decode step",
        st.kernels_ms,
        if st.kernels_cached {
            "cached"
        } else {
            "compiled by NVRTC"
        },
        st.upload_ms,
        st.weight_bytes as f64 / 1e6,
        cuda.kernels_per_step()
    );
    println!("decode step: {}", cuda.decode_path());
    let bandwidth = cuda.copy_bandwidth(1 << 30, 5)?;
    let read = cuda.read_bandwidth(1 << 30, 5)?;
    let roofline = bandwidth / weight_bytes;
    let context = super::context_for(&model, b.prefill, b.decode)?;
    let guest = GuestBench::new(&device, &model, b.prefill)?;
    let paths = guest.time_paths(&model, &b, context)?;
    let (prefill, decode) = paths.print(&b, "on the GPU");
    compare_other_kernels(&model, &guest.prompt, &b, context, &paths)?;
    println!();
    println!(
        "HBM roofline: device-to-device copy {:.0} GB/s (read + write, 1 GiB) / {:.1} MB per token = {:.0} tokens/s; decode reaches {:.1}% of it",
        bandwidth / 1e9,
        weight_bytes / 1e6,
        roofline,
        decode / roofline * 100.0
    );
    println!(
        "read-only roofline: a kernel reading 1 GiB {:.0} GB/s / {:.1} MB per token = {:.0} tokens/s; decode reaches {:.1}% of it",
        read / 1e9,
        weight_bytes / 1e6,
        read / weight_bytes,
        decode / (read / weight_bytes) * 100.0
    );
    if b.baseline {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let (base_prefill, base_decode) =
            super::decode::llama_bench(b.path, threads, b.prefill, b.decode, true)?;
        println!(
            "llama.cpp on the same file, same run (CUDA, -ngl 99, {}): prefill \
             {base_prefill:.1} t/s, decode {base_decode:.1} t/s; Tern's decode {decode:.1} t/s \
             = {:.2}x",
            super::decode::llama_bench_tests(b.prefill, b.decode),
            decode / base_decode
        );
    }
    println!("prefill: {}", cuda.prefill_path());
    match cuda.gemm_rate(b.prefill, 5) {
        Ok(gemm) => {
            let achieved = cuda.layer_flops(1) * prefill;
            println!(
                "prefill matrix products: {:.1} TFLOP/s over {} positions; cuBLAS BF16 GEMMs of the same shapes in this run: {:.1} TFLOP/s; prefill reaches {:.1}% of it",
                achieved / 1e12,
                b.prefill,
                gemm / 1e12,
                achieved / gemm * 100.0
            );
        }
        Err(e) => println!("prefill GEMM yardstick not measured: {e}"),
    }
    paths.print_actor_cost(&b, "on the GPU");
    let (wasm_us, native_us) = super::argmax_cost(&guest.runtime, &guest.module, c.n_vocab)?;
    println!(
        "of which the guest's argmax over {} logits: {wasm_us:.1} us in Wasm ({native_us:.1} us natively)",
        c.n_vocab
    );
    breakdown(&model, &guest.prompt, context)?;
    Ok(ExitCode::SUCCESS)
}

/// The engine's decode with the top logit from the GPU through other kernels than the
/// default ones, against the default graph of kernels timed in `paths` in the same run: the
/// layers in one persistent kernel (where the model has it, off by default); one-token
/// products with one row a warp, attention waiting before it reads its cached rows (the
/// default takes several rows a warp and asks for the rows first), both, and then the default
/// kernels again.
fn compare_other_kernels(
    model: &Model,
    prompt: &[u32],
    b: &GpuBench<'_>,
    context: usize,
    paths: &super::Paths,
) -> anyhow::Result<()> {
    let cuda = model
        .engine_as::<tern_model::llama::cuda::CudaLlama>()
        .context("no GPU model")?;
    let graph = b.decode as f64 / super::median(&paths.engine_top);
    if cuda.has_fused_decode() {
        let kernels = cuda.kernels_per_step();
        cuda.set_fused_decode(true);
        let fused = top_rate(model, prompt, b, context);
        cuda.set_fused_decode(false);
        let fused = fused?;
        println!(
            "engine, top logit on the GPU, with the layers in one persistent kernel (off by default): {fused:.1} t/s against {graph:.1} t/s kernel by kernel ({kernels} kernels a step, one CUDA graph) in this run: {:+.1}%",
            (fused / graph - 1.0) * 100.0
        );
    }
    for (together, early, what) in [
        (false, true, "one row a warp in one-token products"),
        (
            true,
            false,
            "attention waiting before it reads its cached rows",
        ),
        (false, false, "both"),
        (true, true, "the default kernels again"),
    ] {
        let tps =
            cuda.with_one_token_kernels(together, early, || top_rate(model, prompt, b, context))?;
        println!(
            "engine, top logit on the GPU, {what}: {tps:.1} t/s against {graph:.1} t/s with the default kernels in this run: {:+.1}%",
            (tps / graph - 1.0) * 100.0
        );
    }
    Ok(())
}

/// The engine's decode with the top logit from the GPU as the model's kernels are set now,
/// tokens/s: up to 16 tokens to warm up, then the median of `b.repeats` runs.
fn top_rate(
    model: &Model,
    prompt: &[u32],
    b: &GpuBench<'_>,
    context: usize,
) -> anyhow::Result<f64> {
    super::direct_top(model, prompt, b.decode.min(16), context)?;
    let times = (0..b.repeats)
        .map(|_| super::direct_top(model, prompt, b.decode, context))
        .collect::<anyhow::Result<Vec<f64>>>()?;
    Ok(b.decode as f64 / super::median(&times))
}

/// Prints the GPU time of each kernel of one decode step after `prompt`, and of one
/// tensor-core prefill chunk of (up to 512 positions of) `prompt`.
fn breakdown(model: &Model, prompt: &[u32], context: usize) -> anyhow::Result<()> {
    let (mut session, _) = super::session_after(model, prompt, context)?;
    let cuda = model
        .engine_as::<tern_model::llama::cuda::CudaLlama>()
        .context("no GPU model")?;
    let gpu = session
        .state_mut::<tern_model::llama::cuda::CudaSession>()
        .context("no GPU session")?;
    println!(
        "one decode step on the GPU (the step's ids set and its graph launched, events around both; median of 5): {:.1} us",
        cuda.graph_step_us(gpu, 1, 5)?
    );
    let profile = |gpu: &mut tern_model::llama::cuda::CudaSession| {
        (0..5)
            .map(|_| cuda.profile_step(gpu, 1))
            .collect::<Result<Vec<_>, _>>()
    };
    print_breakdown(
        "one decode step, kernel by kernel (events between kernels, no graph; medians of 5):",
        &profile(gpu)?,
    );
    let (step, runs) = cuda.with_one_token_kernels(false, false, || {
        (cuda.graph_step_us(gpu, 1, 5), profile(gpu))
    });
    println!(
        "the same step with one row a warp and attention waiting first, graph launched: {:.1} us",
        step?
    );
    print_breakdown(
        "the same step with one row a warp and attention waiting first, kernel by kernel:",
        &runs?,
    );
    if cuda.has_fused_decode() {
        cuda.set_fused_decode(true);
        let runs = profile(gpu);
        cuda.set_fused_decode(false);
        print_breakdown(
            "the same step with the layers in the persistent kernel (its stages from its own timestamps, each until the barrier after it is passed; medians of 5):",
            &runs?,
        );
    }
    if cuda.tensor_cores() {
        let chunk = &prompt[..prompt.len().min(64)];
        if chunk.len() > 8 {
            let runs = (0..3)
                .map(|_| cuda.profile_exact_chunk(gpu, chunk))
                .collect::<Result<Vec<_>, _>>()?;
            print_breakdown(
                &format!(
                    "one prompt chunk of {} positions after the prompt, as the tensor-core products take it, kernel by kernel (events between kernels; medians of 3):",
                    chunk.len()
                ),
                &runs,
            );
        }
        return Ok(());
    }
    let chunk = &prompt[..prompt.len().min(512)];
    if chunk.len() >= 64 {
        let mut fresh = model.new_session(context)?;
        let gpu = fresh
            .state_mut::<tern_model::llama::cuda::CudaSession>()
            .context("no GPU session")?;
        let runs = (0..3)
            .map(|_| cuda.profile_prefill(gpu, chunk))
            .collect::<Result<Vec<_>, _>>()?;
        print_breakdown(
            &format!(
                "one prefill chunk of {} positions, kernel by kernel (events between kernels; medians of 3):",
                chunk.len()
            ),
            &runs,
        );
    }
    Ok(())
}
