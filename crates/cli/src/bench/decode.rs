//! `tern bench decode`: prefill and decode tokens per second of a model on the CPU, measured
//! directly on the engine and through the `bench` actor in the same run; the difference is
//! what the Wasm actor path costs per token.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use tern_actor::{Actor, Runtime};
use tern_compute::DeviceChoice;
use tern_model::Model;

use super::{direct, median, send};

#[derive(clap::Args)]
pub struct DecodeArgs {
    /// Where the model runs (`auto`: the GPU when there is one).
    #[arg(long, default_value = "cpu", value_parser = crate::parse_device)]
    device: DeviceChoice,
    #[command(flatten)]
    model: super::BenchModel,
    /// Prompt tokens to prefill.
    #[arg(long, default_value_t = 128, value_parser = crate::parse_count)]
    prefill: usize,
    /// Tokens to decode.
    #[arg(long, default_value_t = 128, value_parser = crate::parse_count)]
    decode: usize,
    /// Repeats of each measurement (the median is reported).
    #[arg(long, default_value_t = 3, value_parser = crate::parse_count)]
    repeats: usize,
    #[command(flatten)]
    precision: crate::PrecisionArg,
    /// CPU threads (default: all cores).
    #[arg(long, value_parser = crate::parse_count)]
    threads: Option<usize>,
    /// Also measure llama.cpp on the same model in this run (`llama-cpp`: its own
    /// `llama-bench`, built natively by scripts/llama-cpp on first use).
    #[arg(long)]
    baseline: Option<String>,
}

/// Figures quoted for the best CPU engines on SmolLM2-135M Q4_1 (its layer matrices Q4_1),
/// 2 cores; printed only for that model.
const REFERENCE_DECODE: f64 = 158.0;
const REFERENCE_PREFILL: f64 = 290.0;

pub fn decode(args: DecodeArgs) -> anyhow::Result<ExitCode> {
    let path = args.model.path()?;
    let gpu = match args.device {
        DeviceChoice::Auto => tern_compute::open(DeviceChoice::Auto)?.kind(),
        choice => choice,
    };
    match args.baseline.as_deref() {
        None | Some("llama-cpp") => {}
        Some(other) => bail!("unknown baseline `{other}` (expected llama-cpp)"),
    }
    if gpu == DeviceChoice::Wgpu {
        #[cfg(feature = "wgpu")]
        return super::decode_wgpu::decode_wgpu(super::GpuBench {
            path: &path,
            prefill: args.prefill,
            decode: args.decode,
            repeats: args.repeats,
            baseline: args.baseline.is_some(),
            precision: args.precision.value,
        });
        #[cfg(not(feature = "wgpu"))]
        bail!("this build of tern has no wgpu support");
    }
    if gpu == DeviceChoice::Cuda {
        #[cfg(feature = "cuda")]
        return super::decode_cuda::decode_cuda(super::GpuBench {
            path: &path,
            prefill: args.prefill,
            decode: args.decode,
            repeats: args.repeats,
            baseline: args.baseline.is_some(),
            precision: args.precision.value,
        });
        #[cfg(not(feature = "cuda"))]
        bail!("this build of tern has no CUDA support");
    }
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let model =
        Arc::new(Model::open("bench", &path, threads)?.with_precision(args.precision.value));
    let reference = Model::open("bench", &path, threads)?;
    let c = model.config().clone();
    let context = super::context_for(&model, args.prefill, args.decode)?;
    // A real prompt, repeated to the requested length.
    let text =
        "The quick brown fox jumps over the lazy dog while the sea rolls grey under a low sky. ";
    let unit = model.tokenizer.encode(text, false)?;
    let prompt: Vec<u32> = unit.iter().copied().cycle().take(args.prefill).collect();
    super::print_model("decode", &path, &model, &format!("cpu x{threads}"));

    let runtime = Runtime::builder(tern_compute::open(DeviceChoice::Cpu)?)
        .model(model.clone())
        .build()?;
    let wasm =
        std::fs::read(crate::host::resolve_module("bench")?).context("reading the bench guest")?;
    let module = Arc::new(tern_actor::ActorModule::new(&runtime, "bench", &wasm)?);
    let ids = prompt
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(" ");

    // Warm-up: page the mapped weights in and start the worker threads, untimed.
    direct(&model, &prompt, 8, context)?;
    direct(&reference, &prompt, 8, context)?;
    let (mut direct_prefill, mut direct_decode) = (Vec::new(), Vec::new());
    let (mut actor_prefill, mut actor_decode) = (Vec::new(), Vec::new());
    let mut actor_top = Vec::new();
    let (mut ref_prefill, mut ref_decode) = (Vec::new(), Vec::new());
    let (mut base_prefill, mut base_decode) = (Vec::new(), Vec::new());
    // Alternate the two paths so drift in the machine's speed affects both alike.
    for _ in 0..args.repeats {
        let (p, d) = direct(&model, &prompt, args.decode, context)?;
        direct_prefill.push(p);
        direct_decode.push(d);
        // Through the actor: the same work, driven from inside Wasm, with the logits in its
        // memory and the argmax there, then with the top logit chosen by the host.
        let actor_run = |verb: &str| -> anyhow::Result<(f64, f64)> {
            let mut actor = Actor::start(&runtime, &module)?;
            send(&mut actor, &format!("open bench {} {context}", c.n_vocab))?;
            let t = Instant::now();
            send(&mut actor, &format!("prefill {ids}"))?;
            let prefill = t.elapsed().as_secs_f64();
            let t = Instant::now();
            send(&mut actor, &format!("{verb} {}", args.decode))?;
            Ok((prefill, t.elapsed().as_secs_f64()))
        };
        let (p, d) = actor_run("decode")?;
        actor_prefill.push(p);
        actor_decode.push(d);
        actor_top.push(actor_run("decode_top")?.1);
        let (p, d) = direct(&reference, &prompt, args.decode, context)?;
        ref_prefill.push(p);
        ref_decode.push(d);
        if args.baseline.is_some() {
            let (p, d) = llama_bench(&path, threads, args.prefill, args.decode, false)?;
            base_prefill.push(args.prefill as f64 / p);
            base_decode.push(args.decode as f64 / d);
        }
    }

    let baseline =
        (!base_prefill.is_empty()).then(|| (median(&base_prefill), median(&base_decode)));
    let rate = |n: usize, secs: &[f64]| n as f64 / median(secs);
    let (dp, dd) = (
        rate(args.prefill, &direct_prefill),
        rate(args.decode, &direct_decode),
    );
    let (ap, ad) = (
        rate(args.prefill, &actor_prefill),
        rate(args.decode, &actor_decode),
    );
    println!();
    println!("{:<36} {:>12} {:>12}", "path", "prefill t/s", "decode t/s");
    let row = |name: &str, prefill: Option<f64>, decode: f64| {
        let prefill = prefill.map_or("".into(), |p| format!("{p:.1}"));
        println!("{name:<36} {prefill:>12} {decode:>12.1}")
    };
    row("engine, fast (int8 activations)", Some(dp), dd);
    row("actor (Wasm bench guest), fast", Some(ap), ad);
    row(
        "actor, top logit by the host",
        None,
        rate(args.decode, &actor_top),
    );
    row(
        "engine, reference (f32 activations)",
        Some(rate(args.prefill, &ref_prefill)),
        rate(args.decode, &ref_decode),
    );
    // The quoted figures are for one model: compared with any other they mean nothing.
    let quoted_model = c.n_layer == 30
        && c.n_embd == 576
        && c.n_vocab == 49152
        && model.llama.weights.layers[0].wq.dtype == tern_model::quant::DType::Q4_1;
    if quoted_model {
        row(
            "quoted: best CPU engine",
            Some(REFERENCE_PREFILL),
            REFERENCE_DECODE,
        );
    }
    if let Some((prefill_s, decode_s)) = baseline {
        let (prefill, decode) = (
            args.prefill as f64 / prefill_s,
            args.decode as f64 / decode_s,
        );
        row("llama.cpp, same model, this run", Some(prefill), decode);
        println!(
            "llama.cpp: {}",
            llama_bench_tests(args.prefill, args.decode)
        );
        println!(
            "fast engine vs llama.cpp in this run: decode {:.2}x, prefill {:.2}x",
            dd / decode,
            dp / prefill
        );
    }
    println!();
    for (what, actor) in [
        ("logits into Wasm, argmax there", &actor_decode),
        ("top logit by the host, forward_top", &actor_top),
    ] {
        let per_token_us = (median(actor) - median(&direct_decode)) / args.decode as f64 * 1e6;
        println!(
            "actor path cost per decoded token, {what}: {per_token_us:+.1} us ({:+.2}% of the direct engine's {:.0} us)",
            per_token_us / (1e6 / dd) * 100.0,
            1e6 / dd
        );
    }
    let (wasm_us, native_us) = super::argmax_cost(&runtime, &module, c.n_vocab)?;
    println!(
        "of which the guest's argmax over {} logits: {wasm_us:.1} us in Wasm ({native_us:.1} us natively)",
        c.n_vocab
    );
    if quoted_model {
        println!(
            "fast engine vs the quoted best CPU engine: decode {:.2}x, prefill {:.2}x",
            dd / REFERENCE_DECODE,
            dp / REFERENCE_PREFILL
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// What [`llama_bench`] runs, as the benchmarks print it.
pub(super) fn llama_bench_tests(prefill: usize, decode: usize) -> String {
    format!(
        "llama-bench -p {prefill} -n 0 and -p 0 -n {decode} -d {prefill} (its decode after as \
         many tokens of context as Tern's), each the faster of -fa on and off"
    )
}

/// Runs llama.cpp's own `llama-bench` (built natively by scripts/llama-cpp from the vendored
/// source) on `model` as Tern's benchmark runs: a prefill of `prefill` tokens into an empty
/// context, and a decode of `decode` tokens after `prefill` tokens of context (`-d`; its
/// `tg` test alone starts from an empty one, where attention costs next to nothing). Each
/// with flash attention on and off, its faster setting counting (on the CPU that is not
/// always on). Returns the (prefill, decode) tokens per second.
pub(super) fn llama_bench(
    model: &std::path::Path,
    threads: usize,
    prefill: usize,
    decode: usize,
    gpu: bool,
) -> anyhow::Result<(f64, f64)> {
    use std::process::Command;
    let binary = super::batch::build_tool("llama-bench")?;
    let fastest = |test: &[&str]| -> anyhow::Result<f64> {
        let mut command = Command::new(&binary);
        command.arg("-m").arg(model).args(test).args([
            "-fa",
            "on,off",
            "-t",
            &threads.to_string(),
            "-r",
            "1",
            "-o",
            "json",
        ]);
        if gpu {
            command.args(["-ngl", "99"]);
        }
        let out = command
            .output()
            .with_context(|| format!("running {}", binary.display()))?;
        if !out.status.success() {
            bail!(
                "llama-bench failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let runs: Vec<serde_json::Value> =
            serde_json::from_slice(&out.stdout).context("llama-bench's JSON output")?;
        runs.iter()
            .filter_map(|r| r["avg_ts"].as_f64())
            .max_by(f64::total_cmp)
            .context("llama-bench printed no test")
    };
    let (p, n) = (prefill.to_string(), decode.to_string());
    Ok((
        fastest(&["-p", &p, "-n", "0"])?,
        fastest(&["-p", "0", "-n", &n, "-d", &p])?,
    ))
}
