//! `tern bench decode --device cuda`: batch-1 decode and prefill speed of a model on the GPU,
//! directly on the engine and through the `bench` actor (whose logits the GPU writes into the
//! actor's memory), with the GPU's memory roofline and a per-kernel breakdown of one decode
//! step, all measured in the same run.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use tern_compute::DeviceChoice;
use tern_model::{Model, Precision};

use super::{GpuBench, GuestBench, direct, direct_top, median, print_breakdown};

pub fn decode_cuda(b: GpuBench<'_>) -> anyhow::Result<ExitCode> {
    let device = tern_compute::open(DeviceChoice::Cuda)?;
    let model = Model::open("bench", b.path, 1)?
        .with_precision(Precision::Reference)
        .on_device(&device)?;
    let model = Arc::new(model);
    let Some(cuda) = model.cuda.as_ref() else {
        bail!("the model did not go onto the GPU");
    };
    let c = model.config().clone();
    let weight_bytes = model.llama.weights.bytes_per_token() as f64;
    let st = cuda.startup;
    super::print_model(b.path, &model, &format!("on {}", device.describe()));
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
    let bandwidth = cuda.copy_bandwidth(1 << 30, 5)?;
    let roofline = bandwidth / weight_bytes;
    let context = b.prefill + b.decode + 1;
    let guest = GuestBench::new(&device, &model, b.prefill)?;
    let prompt = &guest.prompt;

    // Warm-up: graphs captured, caches and clocks settled, untimed.
    direct(&model, prompt, b.decode.min(16), context)?;
    direct_top(&model, prompt, b.decode.min(16), context)?;
    let (mut dp, mut dd, mut ap, mut ad) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut dt, mut at) = (Vec::new(), Vec::new());
    for _ in 0..b.repeats.max(1) {
        let (p, d) = direct(&model, prompt, b.decode, context)?;
        dp.push(p);
        dd.push(d);
        dt.push(direct_top(&model, prompt, b.decode, context)?);
        let (p, d) = guest.actor_run(context, "decode", b.decode)?;
        ap.push(p);
        ad.push(d);
        at.push(guest.actor_run(context, "decode_top", b.decode)?.1);
    }
    let rate = |n: usize, secs: &[f64]| n as f64 / median(secs);
    println!();
    println!("{:<52} {:>12} {:>12}", "path", "prefill t/s", "decode t/s");
    let row = |name: &str, prefill: Option<f64>, decode: f64| {
        let prefill = prefill.map_or("".into(), |p| format!("{p:.1}"));
        println!("{name:<52} {prefill:>12} {decode:>12.1}");
    };
    row(
        "engine (logits copied to the host, argmax there)",
        Some(rate(b.prefill, &dp)),
        rate(b.decode, &dd),
    );
    row(
        "actor (logits written into Wasm memory, argmax there)",
        Some(rate(b.prefill, &ap)),
        rate(b.decode, &ad),
    );
    row(
        "engine, top logit selected on the GPU",
        None,
        rate(b.decode, &dt),
    );
    row(
        "actor, top logit selected on the GPU (forward_top)",
        None,
        rate(b.decode, &at),
    );
    let decode = [&dd, &ad, &dt, &at]
        .into_iter()
        .map(|d| rate(b.decode, d))
        .fold(0.0, f64::max);
    println!();
    println!(
        "HBM roofline: device-to-device copy {:.0} GB/s (read + write, 1 GiB) / {:.1} MB per token = {:.0} tokens/s; decode reaches {:.1}% of it",
        bandwidth / 1e9,
        weight_bytes / 1e6,
        roofline,
        decode / roofline * 100.0
    );
    println!("prefill: {}", cuda.prefill_path());
    match cuda.gemm_rate(b.prefill, 5) {
        Ok(gemm) => {
            let prefill = rate(b.prefill, &dp).max(rate(b.prefill, &ap));
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
    let per_token = |secs: &[f64]| median(secs) / b.decode as f64 * 1e6;
    for (what, actor, engine) in [
        ("logits into the actor, argmax in Wasm", &ad, &dd),
        ("top logit from the GPU", &at, &dt),
    ] {
        let extra = per_token(actor) - per_token(engine);
        println!(
            "actor path cost per decoded token, {what}: {extra:+.2} us ({:+.2}% of the engine's {:.1} us)",
            extra / per_token(engine) * 100.0,
            per_token(engine)
        );
    }
    let (wasm_us, native_us) = super::argmax_cost(&guest.runtime, &guest.module, c.n_vocab)?;
    println!(
        "of which the guest's argmax over {} logits: {wasm_us:.1} us in Wasm ({native_us:.1} us natively)",
        c.n_vocab
    );
    breakdown(&model, prompt, context)?;
    Ok(ExitCode::SUCCESS)
}

/// Prints the GPU time of each kernel of one decode step after `prompt`, and of one
/// tensor-core prefill chunk of (up to 512 positions of) `prompt`.
fn breakdown(model: &Model, prompt: &[u32], context: usize) -> anyhow::Result<()> {
    let mut session = model.new_session(context)?;
    let mut logits = vec![0.0; model.config().n_vocab];
    model.forward(&mut session, prompt, &mut logits)?;
    let cuda = model.cuda.as_ref().context("no GPU model")?;
    let gpu = session.cuda_mut().context("no GPU session")?;
    let runs = (0..5)
        .map(|_| cuda.profile_step(gpu, 1))
        .collect::<Result<Vec<_>, _>>()?;
    print_breakdown(
        "one decode step, kernel by kernel (events between kernels, no graph; medians of 5):",
        &runs,
    );
    let chunk = &prompt[..prompt.len().min(512)];
    if chunk.len() >= 64 {
        let mut fresh = model.new_session(context)?;
        let gpu = fresh.cuda_mut().context("no GPU session")?;
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
