//! `tern bench batch`: many sequences on one model at once, as the step scheduler batches
//! them, on the CPU or a CUDA GPU, beside llama.cpp's own `llama-batched-bench` (built
//! natively by scripts/llama-cpp from the vendored source; for CUDA on a machine with nvcc)
//! on the same file, in the same run. On wgpu only Tern runs, and the bench says that the
//! backend runs a step's sessions one after another.
//!
//! For each batch size B, as `llama-batched-bench -npp PP -ntg TG -npl B` measures: B
//! sequences each prefill PP prompt tokens (S_PP: all B·PP tokens over the time), then each
//! decode TG tokens (S_TG: all B·TG tokens over the time). Tern's sequences run on B threads
//! calling the model's `forward`, which the step scheduler gathers into batched steps (what
//! B actors do); its decode is also timed as plain batched steps over all B sequences
//! (`Model::step`), the engine alone. Each sequence's next token is the top logit, which the
//! engine selects (on the GPU, where the logits stay), as a serving actor's sampler reads it. On the GPU each row also states the memory
//! roofline of a decode step: the weights read once and every sequence's cache read, at the
//! GPU's measured copy bandwidth. Medians of the rounds, Tern and llama.cpp alternated.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Barrier;
use std::time::Instant;

use anyhow::{Context, bail};
use tern_compute::DeviceChoice;
use tern_model::steps::StepStats;
use tern_model::{Candidate, Model, Session, Step};

use super::median;

#[derive(clap::Args)]
pub struct BatchBenchArgs {
    /// Where the model runs: cpu, cuda or wgpu (`auto`: the GPU when there is one).
    #[arg(long, default_value = "cpu", value_parser = crate::parse_device)]
    device: DeviceChoice,
    #[command(flatten)]
    model: super::BenchModel,
    /// Sequences at once, one row each.
    #[arg(long, default_value = "1,2,4,8,16,32,64", value_delimiter = ',')]
    batch: Vec<usize>,
    /// Prompt tokens per sequence.
    #[arg(long, default_value_t = 128, value_parser = crate::parse_count)]
    prefill: usize,
    /// Tokens decoded per sequence.
    #[arg(long, default_value_t = 32, value_parser = crate::parse_count)]
    decode: usize,
    /// Rounds (medians are reported).
    #[arg(long, default_value_t = 3, value_parser = crate::parse_count)]
    repeats: usize,
    #[command(flatten)]
    precision: crate::PrecisionArg,
    /// How the KV caches store keys and values: f32 or f16 (llama-batched-bench's default).
    #[arg(long, default_value = "f32", value_parser = crate::parse_kv_type)]
    kv_type: tern_model::KvType,
    /// CPU threads (default: all cores).
    #[arg(long, value_parser = crate::parse_count)]
    threads: Option<usize>,
    /// The llama-batched-bench binary (default: built by scripts/llama-cpp).
    #[arg(long)]
    llama_batched_bench: Option<PathBuf>,
    /// Measure Tern alone.
    #[arg(long)]
    no_baseline: bool,
}

/// Tokens per second of one round: prefill, decode through the scheduler, decode as
/// direct batched steps.
#[derive(Default)]
struct Round {
    prefill: Vec<f64>,
    decode: Vec<f64>,
    steps: Vec<f64>,
    /// The scheduler's counters over each round's decode (steps, jobs, time between steps).
    sched: Vec<StepStats>,
}

pub fn batch(args: BatchBenchArgs) -> anyhow::Result<ExitCode> {
    if args.batch.contains(&0) {
        bail!("--batch sizes must be at least 1");
    }
    let path = args.model.path()?;
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let device = match args.device {
        DeviceChoice::Auto => tern_compute::open(DeviceChoice::Auto)?.kind(),
        choice => choice,
    };
    let (model, on, gpu) = match device {
        DeviceChoice::Cpu => (
            Model::open("bench", &path, threads)?
                .with_precision(args.precision.value)
                .with_kv_type(args.kv_type),
            format!("cpu x{threads}"),
            false,
        ),
        DeviceChoice::Cuda | DeviceChoice::Wgpu => {
            let gpu = tern_compute::open(device)?;
            let on = format!("on {}", gpu.describe());
            let model = Model::open("bench", &path, 1)?
                .with_precision(args.precision.value)
                .with_kv_type(args.kv_type)
                .on_device(&gpu)?;
            (model, on, true)
        }
        other => bail!("tern bench batch runs on the CPU or a GPU, not {other:?}"),
    };
    // The roofline and llama.cpp's CUDA build are CUDA's; on wgpu only Tern is measured.
    let cuda = device == DeviceChoice::Cuda;
    let context = super::context_for(&model, args.prefill, args.decode)?;
    super::print_model("batch", &path, &model, &on);
    println!("forward pass: {}", model.compute_label());
    if !model.batches_steps() {
        println!(
            "batched steps: this backend runs a step's sessions one after another (its kernels \
             take one session at a time), so its aggregate decode does not grow with B"
        );
    }
    let roofline = match cuda {
        true => Some(Roofline::measure(&model, args.prefill + args.decode / 2)?),
        false => None,
    };
    let llama = match args.no_baseline || (gpu && !cuda) {
        true => None,
        false => Some(match &args.llama_batched_bench {
            Some(path) => path.clone(),
            None => build_tool("llama-batched-bench")?,
        }),
    };
    let text =
        "The quick brown fox jumps over the lazy dog while the sea rolls grey under a low sky. ";
    let unit = model.tokenizer.encode(text, false)?;
    // Each sequence its own prompt: the same text from a different offset.
    let prompts: Vec<Vec<u32>> = (0..args.batch.iter().copied().max().unwrap_or(1))
        .map(|i| {
            unit.iter()
                .copied()
                .cycle()
                .skip(i % unit.len())
                .take(args.prefill)
                .collect()
        })
        .collect();
    // Warm-up, untimed: the weights paged in, the threads started.
    tern_round(&model, &prompts[..1], args.decode.min(4), context)?;
    let mut tern: Vec<Round> = args.batch.iter().map(|_| Round::default()).collect();
    let mut base: Vec<Round> = args.batch.iter().map(|_| Round::default()).collect();
    for _ in 0..args.repeats {
        for (i, &b) in args.batch.iter().enumerate() {
            let (p, d, s, sched) = tern_round(&model, &prompts[..b], args.decode, context)?;
            tern[i].prefill.push(p);
            tern[i].decode.push(d);
            tern[i].steps.push(s);
            tern[i].sched.push(sched);
        }
        if let Some(binary) = &llama {
            let rows = llama_round(binary, &path, threads, gpu, &args)?;
            for (i, (p, d)) in rows.into_iter().enumerate() {
                base[i].prefill.push(p);
                base[i].decode.push(d);
            }
        }
    }
    println!(
        "\n{} prompt tokens and {} decoded tokens per sequence, greedy, {threads} threads; \
         medians of {} rounds",
        args.prefill, args.decode, args.repeats
    );
    println!(
        "\n| B | Tern prefill t/s | Tern decode t/s (scheduler) | Tern ms per output token | \
         Tern decode t/s (steps) | llama.cpp prefill t/s | llama.cpp decode t/s | \
         decode, Tern / llama.cpp |{}",
        if roofline.is_some() {
            " roofline t/s | Tern, of roofline |"
        } else {
            ""
        }
    );
    println!(
        "|---|---|---|---|---|---|---|---|{}",
        if roofline.is_some() { "---|---|" } else { "" }
    );
    for (i, &b) in args.batch.iter().enumerate() {
        let (t, l) = (&tern[i], &base[i]);
        let med = |xs: &[f64]| if xs.is_empty() { f64::NAN } else { median(xs) };
        let (decode, steps) = (med(&t.decode), med(&t.steps));
        let bound = roofline.as_ref().map_or(String::new(), |r| {
            let top = r.tokens_per_s(b);
            format!(" {top:.0} | {:.1}% |", decode.max(steps) / top * 100.0)
        });
        // llama.cpp's columns, or dashes when it was not measured.
        let (base_prefill, base_decode, ratio) = match l.decode.is_empty() {
            true => ("-".to_string(), "-".to_string(), "-".to_string()),
            false => (
                format!("{:.1}", med(&l.prefill)),
                format!("{:.1}", med(&l.decode)),
                format!("{:.2}x", decode / med(&l.decode)),
            ),
        };
        println!(
            "| {b} | {:.1} | {decode:.1} | {:.2} | {steps:.1} | {base_prefill} | {base_decode} | \
             {ratio} |{bound}",
            med(&t.prefill),
            b as f64 / decode * 1e3,
        );
    }
    if let Some(r) = &roofline {
        println!(
            "\nroofline: a decode step reads the weights once ({:.1} MB) and each sequence's \
             cache at {} positions ({:.2} MB), at the GPU's device-to-device copy bandwidth \
             measured now ({:.0} GB/s)",
            r.weights / 1e6,
            r.positions,
            r.kv_per_sequence / 1e6,
            r.bandwidth / 1e9
        );
    }
    #[cfg(feature = "cuda")]
    if cuda
        && prompts.len() >= 2
        && let Err(e) = profile_step(&model, &prompts, context)
    {
        println!("\n(the batched step was not profiled: {e:#})");
    }
    // (An engine without a step scheduler keeps no counters.)
    let stats = model.step_stats();
    if stats.steps > 0 {
        println!(
            "\nthe step scheduler ran {} chunks of forward passes in {} steps ({:.1} a step); \
             its decode steps, over all rounds:",
            stats.chunks,
            stats.steps,
            stats.chunks as f64 / stats.steps as f64
        );
        for (t, &b) in tern.iter().zip(&args.batch) {
            let (steps, jobs, between, gather, short) =
                t.sched.iter().fold((0, 0, 0, 0, 0), |a, s| {
                    (
                        a.0 + s.steps,
                        a.1 + s.chunks,
                        a.2 + s.between_us,
                        a.3 + s.gather_us,
                        a.4 + s.short_gathers,
                    )
                });
            let each = |x: u64| x as f64 / steps.max(1) as f64;
            println!(
                "  B = {b}: {steps} steps of {:.1} jobs, {:.0} us from a step's end to the next \
                 one's start ({:.0} us of it gathering the step's jobs), {short} gathers ended \
                 short by the deadline",
                each(jobs),
                each(between),
                each(gather)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Where one batched decode step of every prompt's sequence (the largest batch) spends its
/// GPU time, kernel by kernel: medians of 5 steps, each after the prompts.
#[cfg(feature = "cuda")]
fn profile_step(model: &Model, prompts: &[Vec<u32>], context: usize) -> anyhow::Result<()> {
    use anyhow::Context;
    use tern_model::llama::cuda::{CudaLlama, CudaSession};
    let cuda = model.engine_as::<CudaLlama>().context("no GPU model")?;
    let (mut sessions, tops) = after_prompts(model, prompts, context)?;
    let tokens: Vec<u32> = tops.iter().map(|top| top[0].token).collect();
    let mut states = sessions
        .iter_mut()
        .map(|s| s.state_mut::<CudaSession>().context("no GPU session"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let runs = (0..5)
        .map(|_| cuda.profile_batch(&mut states, &tokens))
        .collect::<Result<Vec<_>, _>>()?;
    super::print_breakdown(
        &format!(
            "one batched decode step of {} sequences, kernel by kernel (events between kernels, \
             no graph; medians of 5):",
            prompts.len()
        ),
        &runs,
    );
    Ok(())
}

/// A session after each prompt, and each session's top logit.
fn after_prompts(
    model: &Model,
    prompts: &[Vec<u32>],
    context: usize,
) -> anyhow::Result<(Vec<Session>, Vec<[Candidate; 1]>)> {
    let mut sessions = Vec::with_capacity(prompts.len());
    let mut tops = vec![[Candidate::default()]; prompts.len()];
    for (prompt, top) in prompts.iter().zip(tops.iter_mut()) {
        let mut session = model.new_session(context)?;
        model.forward_top(&mut session, prompt, None, top)?;
        sessions.push(session);
    }
    Ok((sessions, tops))
}

/// One round for `prompts.len()` sequences: prefill and decode tokens per second through
/// the scheduler (one thread per sequence), decode tokens per second as direct batched
/// steps, and the scheduler's counters over the decode.
fn tern_round(
    model: &Model,
    prompts: &[Vec<u32>],
    decode: usize,
    context: usize,
) -> anyhow::Result<(f64, f64, f64, StepStats)> {
    let b = prompts.len();
    let start = Barrier::new(b + 1);
    let (prefill_s, decode_s, sched) =
        std::thread::scope(|s| -> anyhow::Result<(f64, f64, StepStats)> {
            let runs: Vec<_> = prompts
                .iter()
                .map(|prompt| {
                    let start = &start;
                    s.spawn(move || -> anyhow::Result<()> {
                        let mut session = model.new_session(context)?;
                        let mut top = [Candidate::default()];
                        start.wait();
                        model.forward_top(&mut session, prompt, None, &mut top)?;
                        start.wait();
                        start.wait();
                        for _ in 0..decode {
                            let token = top[0].token;
                            model.forward_top(&mut session, &[token], None, &mut top)?;
                        }
                        start.wait();
                        Ok(())
                    })
                })
                .collect();
            start.wait();
            let t = Instant::now();
            start.wait();
            let prefill = t.elapsed().as_secs_f64();
            let before = model.step_stats();
            start.wait();
            let t = Instant::now();
            start.wait();
            let decode = t.elapsed().as_secs_f64();
            let after = model.step_stats();
            for run in runs {
                run.join()
                    .map_err(|_| anyhow::anyhow!("a sequence's thread panicked"))??;
            }
            let sched = StepStats {
                steps: after.steps - before.steps,
                chunks: after.chunks - before.chunks,
                waiting: 0,
                between_us: after.between_us - before.between_us,
                gather_us: after.gather_us - before.gather_us,
                short_gathers: after.short_gathers - before.short_gathers,
            };
            Ok((prefill, decode, sched))
        })?;
    // The engine alone: the same sequences as plain batched steps of all B at once.
    let (mut sessions, mut tops) = after_prompts(model, prompts, context)?;
    let t = Instant::now();
    for _ in 0..decode {
        let next: Vec<[u32; 1]> = tops.iter().map(|top| [top[0].token]).collect();
        let mut steps: Vec<Step<'_>> = sessions
            .iter_mut()
            .zip(&next)
            .zip(tops.iter_mut())
            .map(|((session, token), top)| Step {
                session,
                tokens: token,
                logits: None,
                top,
            })
            .collect();
        model.step(&mut steps)?;
    }
    let steps_s = t.elapsed().as_secs_f64();
    let tokens = |n: usize, s: f64| (b * n) as f64 / s;
    Ok((
        tokens(prompts[0].len(), prefill_s),
        tokens(decode, decode_s),
        tokens(decode, steps_s),
        sched,
    ))
}

/// One llama-batched-bench run over every batch size: (prefill, decode) tokens per second
/// per size, in `--batch` order.
fn llama_round(
    binary: &Path,
    model: &Path,
    threads: usize,
    gpu: bool,
    args: &BatchBenchArgs,
) -> anyhow::Result<Vec<(f64, f64)>> {
    let most = args.batch.iter().copied().max().unwrap_or(1);
    let sizes: Vec<String> = args.batch.iter().map(usize::to_string).collect();
    let mut command = Command::new(binary);
    if gpu {
        // Every layer on the GPU, with flash attention (llama.cpp's fastest decode there).
        command.args(["-ngl", "99", "-fa", "1"]);
    }
    let out = command
        .arg("-m")
        .arg(model)
        .args(["-c", &(most * (args.prefill + args.decode)).to_string()])
        .args(["-b", "2048", "-ub", "512"])
        .args(["-npp", &args.prefill.to_string()])
        .args(["-ntg", &args.decode.to_string()])
        .args(["-npl", &sizes.join(",")])
        .args(["-t", &threads.to_string(), "-tb", &threads.to_string()])
        .args(["--output-format", "jsonl"])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", binary.display()))?;
    if !out.status.success() {
        bail!(
            "llama-batched-bench failed: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        );
    }
    let mut rows = Vec::new();
    for stream in [&out.stdout, &out.stderr] {
        for line in String::from_utf8_lossy(stream).lines() {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(line.trim())
                && let (Some(pl), Some(pp), Some(tg)) = (
                    v["pl"].as_u64(),
                    v["speed_pp"].as_f64(),
                    v["speed_tg"].as_f64(),
                )
            {
                rows.push((pl as usize, (pp, tg)));
            }
        }
    }
    args.batch
        .iter()
        .map(|b| {
            rows.iter()
                .find(|(pl, _)| pl == b)
                .map(|(_, r)| *r)
                .with_context(|| format!("llama-batched-bench printed no row for B = {b}"))
        })
        .collect()
}

/// Builds (once) and finds one of llama.cpp's tools with scripts/llama-cpp.
pub(super) fn build_tool(tool: &str) -> anyhow::Result<PathBuf> {
    let script = super::project_script("llama-cpp");
    eprintln!("building {tool} (scripts/llama-cpp; the first time takes minutes) ...");
    let out = Command::new(&script)
        .arg(tool)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!("scripts/llama-cpp {tool} failed");
    }
    Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()))
}

/// What a decode step over B sequences must read from GPU memory, and how fast it can.
struct Roofline {
    /// Bytes of weights one step reads.
    weights: f64,
    /// Bytes of one sequence's KV cache a step reads, at `positions` positions.
    kv_per_sequence: f64,
    positions: usize,
    /// Device-to-device copy bandwidth (bytes read and written per second).
    bandwidth: f64,
}

impl Roofline {
    #[cfg(feature = "cuda")]
    fn measure(model: &Model, positions: usize) -> anyhow::Result<Roofline> {
        let Some(cuda) = model.engine_as::<tern_model::llama::cuda::CudaLlama>() else {
            bail!("the model did not go onto the GPU");
        };
        let c = model.config();
        Ok(Roofline {
            weights: model.llama.weights.bytes_per_token() as f64,
            kv_per_sequence: (positions * 2 * c.n_layer * c.kv_dim() * model.kv_type().bytes())
                as f64,
            positions,
            bandwidth: cuda.copy_bandwidth(1 << 30, 5)?,
        })
    }

    #[cfg(not(feature = "cuda"))]
    fn measure(_: &Model, _: usize) -> anyhow::Result<Roofline> {
        bail!("this build of tern has no CUDA support")
    }

    /// Decode tokens per second at the bound, B sequences a step.
    fn tokens_per_s(&self, b: usize) -> f64 {
        let bytes = self.weights + b as f64 * self.kv_per_sequence;
        b as f64 * self.bandwidth / bytes
    }
}
