//! `tern bench decode --device wgpu`: batch-1 decode and prefill speed of a model on a GPU
//! through wgpu (Vulkan or Metal), directly on the engine and through the `bench` actor
//! (whose logits the GPU writes into the actor's imported memory), with the device's memory
//! roofline measured in the same run.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use tern_compute::DeviceChoice;
use tern_model::{Model, Precision};

use super::{GpuBench, GuestBench, print_breakdown};

pub fn decode_wgpu(b: GpuBench<'_>) -> anyhow::Result<ExitCode> {
    if b.baseline {
        anyhow::bail!("--baseline llama-cpp is measured on the CPU and on CUDA, not through wgpu");
    }
    let device = tern_compute::open(DeviceChoice::Wgpu)?;
    let model = Model::open("bench", b.path, 1)?
        .with_precision(Precision::Reference)
        .on_device(&device)?;
    let model = Arc::new(model);
    let (Some(wgpu), Some(gpu)) = (
        model.engine_as::<tern_model::llama::wgpu::WgpuLlama>(),
        device.as_wgpu(),
    ) else {
        bail!("the model did not go onto the GPU");
    };
    let weight_bytes = model.llama.weights.bytes_per_token() as f64;
    let st = wgpu.startup;
    super::print_model("decode", b.path, &model, &format!("on {}", wgpu.label()));
    println!(
        "startup: pipelines {:.1} ms, weights {:.1} ms ({:.1} MB); {} kernels per decode step",
        st.kernels_ms,
        st.upload_ms,
        st.weight_bytes as f64 / 1e6,
        wgpu.kernels_per_step()
    );
    let context = super::context_for(&model, b.prefill, b.decode)?;
    let guest = GuestBench::new(&device, &model, b.prefill)?;
    let paths = guest.time_paths(&model, &b, context)?;
    let (_, decode) = paths.print(&b, "on the host");
    // Measured after the timed runs, on a GPU whose clocks they have raised: straight after
    // start-up the same kernel reads at as little as 60% of this.
    let bandwidth = gpu.read_bandwidth(1 << 30, 5)?;
    let copy = gpu.copy_bandwidth(1 << 30, 5)?;
    let roofline = bandwidth / weight_bytes;
    println!();
    println!(
        "memory roofline: a kernel reading 1 GiB once {:.0} GB/s (a buffer copy: {:.0} GB/s read + write) / {:.1} MB per token = {:.0} tokens/s; decode reaches {:.1}% of it",
        bandwidth / 1e9,
        copy / 1e9,
        weight_bytes / 1e6,
        roofline,
        decode / roofline * 100.0
    );
    paths.print_actor_cost(&b, "on the host");
    breakdown(&model, &guest.prompt, context)?;
    Ok(ExitCode::SUCCESS)
}

/// Prints the GPU time of each kernel of one decode step after `prompt`, where the adapter
/// has timestamp queries.
fn breakdown(model: &Model, prompt: &[u32], context: usize) -> anyhow::Result<()> {
    let (mut session, _) = super::session_after(model, prompt, context)?;
    let wgpu = model
        .engine_as::<tern_model::llama::wgpu::WgpuLlama>()
        .context("no GPU model")?;
    let gpu = session
        .state_mut::<tern_model::llama::wgpu::WgpuSession>()
        .context("no GPU session")?;
    let mut runs = Vec::new();
    for _ in 0..5 {
        match wgpu.profile_step(gpu, 1)? {
            Some(run) => runs.push(run),
            None => {
                println!("no per-kernel breakdown: the adapter has no timestamp queries");
                return Ok(());
            }
        }
    }
    print_breakdown(
        "one decode step, kernel by kernel (each in a pass of its own, GPU timestamps; medians of 5):",
        &runs,
    );
    Ok(())
}
