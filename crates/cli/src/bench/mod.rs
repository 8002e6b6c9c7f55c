//! `tern bench`: Tern's measurements, each printed beside the baseline it is compared with,
//! measured in the same run.

mod batch;
mod cluster;
mod decode;
#[cfg(feature = "cuda")]
mod decode_cuda;
#[cfg(feature = "wgpu")]
mod decode_wgpu;
mod serve;
mod snapshot;
mod zero_copy;

use std::process::ExitCode;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
use std::sync::Arc;

#[cfg(any(feature = "cuda", feature = "wgpu"))]
use anyhow::Context;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
use tern_actor::{ActorModule, Runtime};

#[derive(clap::Subcommand)]
pub enum BenchCommand {
    /// Zero-copy guest memory against the explicit-copy path, on each available device.
    ZeroCopy(zero_copy::ZeroCopyArgs),
    /// Prefill and decode speed of a model, directly and through a Wasm actor.
    Decode(decode::DecodeArgs),
    /// Snapshot save and restore time and size at several context lengths, against
    /// re-prefilling the same tokens.
    Snapshot(snapshot::SnapshotBenchArgs),
    /// `tern serve` under concurrent multi-turn conversations over HTTP, beside llama.cpp's
    /// llama-server under the same load.
    Serve(serve::ServeBenchArgs),
    /// Many sequences on one model at once (batched steps), beside llama.cpp's
    /// llama-batched-bench on the same file.
    Batch(batch::BatchBenchArgs),
    /// A two-node cluster on NATS: object-store throughput, routed-message overhead,
    /// migration against re-prefill, failover after SIGKILL.
    Cluster(cluster::ClusterBenchArgs),
}

pub fn bench(cmd: BenchCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        BenchCommand::ZeroCopy(args) => zero_copy::zero_copy(args),
        BenchCommand::Decode(args) => decode::decode(args),
        BenchCommand::Snapshot(args) => snapshot::snapshot(args),
        BenchCommand::Serve(args) => serve::serve(args),
        BenchCommand::Batch(args) => batch::batch(args),
        BenchCommand::Cluster(args) => cluster::cluster(args),
    }
}

/// The median of `xs`.
fn median(xs: &[f64]) -> f64 {
    let mut sorted = xs.to_vec();
    sorted.sort_by(f64::total_cmp);
    zero_copy::percentile(&sorted, 0.5)
}

/// The model a benchmark runs on, as its flags name it.
#[derive(clap::Args)]
struct BenchModel {
    /// A GGUF model file (default: SmolLM2-135M-Instruct).
    #[arg(long)]
    model: Option<std::path::PathBuf>,
    /// Instead of a model file, a random-weight model of this shape (`smollm2-135m`,
    /// `llama-3.2-1b`, ...), generated once into the model cache.
    #[arg(long)]
    shape: Option<String>,
    /// Weight type of a generated model's matrices (`q4_1`, `q8_0`, `bf16`, ...).
    #[arg(long, default_value = "q4_1")]
    weights: String,
}

impl BenchModel {
    /// `--model`, else a random-weight model of `--shape` (generated once into the model
    /// cache), else the default model (fetched on first use).
    fn path(&self) -> anyhow::Result<std::path::PathBuf> {
        match (&self.model, &self.shape) {
            (Some(_), Some(_)) => anyhow::bail!("give --model or --shape, not both"),
            (Some(path), None) => Ok(path.clone()),
            (None, None) => crate::fetch::default_model(),
            (None, Some(name)) => crate::generate::generated_model(name, &self.weights),
        }
    }
}

/// Prefills `prompt`, then decodes `n` tokens greedily on the engine directly; returns the
/// seconds each took.
fn direct(
    model: &tern_model::Model,
    prompt: &[u32],
    n: usize,
    context: usize,
) -> anyhow::Result<(f64, f64)> {
    use std::time::Instant;
    let mut session = model.new_session(context)?;
    let mut logits = vec![0.0; model.config().n_vocab];
    let t = Instant::now();
    model.forward(&mut session, prompt, &mut logits)?;
    let prefill = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for _ in 0..n {
        let next = tern_guest::sample::argmax(&logits);
        model.forward(&mut session, &[next], &mut logits)?;
    }
    Ok((prefill, t.elapsed().as_secs_f64()))
}

/// As [`direct`], but each decode step asks the engine for the top logit only
/// ([`tern_model::Model::forward_top`], no logits copied out); returns the decode time.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
fn direct_top(
    model: &tern_model::Model,
    prompt: &[u32],
    n: usize,
    context: usize,
) -> anyhow::Result<f64> {
    use std::time::Instant;
    let (mut session, logits) = session_after(model, prompt, context)?;
    let mut top = [tern_model::Candidate {
        token: tern_guest::sample::argmax(&logits),
        logit: 0.0,
    }];
    let t = Instant::now();
    for _ in 0..n {
        model.forward_top(&mut session, &[top[0].token], None, &mut top)?;
    }
    Ok(t.elapsed().as_secs_f64())
}

/// A session of `context` positions that has run `prompt`, and the prompt's last logits.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
fn session_after(
    model: &tern_model::Model,
    prompt: &[u32],
    context: usize,
) -> anyhow::Result<(tern_model::Session, Vec<f32>)> {
    let mut session = model.new_session(context)?;
    let mut logits = vec![0.0; model.config().n_vocab];
    model.forward(&mut session, prompt, &mut logits)?;
    Ok((session, logits))
}

/// What a GPU decode benchmark runs.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
pub struct GpuBench<'a> {
    pub path: &'a std::path::Path,
    pub prefill: usize,
    pub decode: usize,
    /// At least 1 (`--repeats` is parsed by `parse_count`).
    pub repeats: usize,
    /// Run llama.cpp's own `llama-bench` on the same file in the same run.
    pub baseline: bool,
    /// How the model's matrix products treat activations (`--precision`).
    pub precision: tern_model::Precision,
}

/// The project's script `name` (`scripts/NAME`): in the working folder's checkout (as
/// `scripts/tern` and the device machine's commands run), else beside the binary's
/// checkout (`target/PROFILE/tern`), else where the binary was built from.
pub(crate) fn project_script(name: &str) -> std::path::PathBuf {
    let relative = std::path::Path::new("scripts").join(name);
    let beside_exe = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.ancestors().nth(3).map(|root| root.join(&relative)));
    [Some(relative.clone()), beside_exe]
        .into_iter()
        .flatten()
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../..")
                .join(relative)
        })
}

/// The positions a decode benchmark's session needs (the prompt, the decoded tokens and one
/// more), or a clear error naming the flags when the model holds fewer.
fn context_for(model: &tern_model::Model, prefill: usize, decode: usize) -> anyhow::Result<usize> {
    let (context, limit) = (prefill + decode + 1, model.config().n_ctx_train);
    if context > limit {
        anyhow::bail!(
            "--prefill {prefill} and --decode {decode} need {context} positions; this model holds {limit}"
        );
    }
    Ok(context)
}

/// The first line of every decode benchmark: the model, its weights read per token, and
/// where it runs (`on`).
fn print_model(bench: &str, path: &std::path::Path, model: &tern_model::Model, on: &str) {
    let c = model.config();
    println!(
        "tern bench {bench}: {} ({} layers, n_embd {}, vocab {}), {:.1} MB of weights per token, {on}",
        path.file_name()
            .map_or("model".into(), |n| n.to_string_lossy()),
        c.n_layer,
        c.n_embd,
        c.n_vocab,
        model.llama.weights.bytes_per_token() as f64 / 1e6
    );
}

/// What the GPU decode benchmarks share: a prompt of `prefill` tokens spread over the
/// vocabulary, a runtime serving `model` on `device`, the compiled `bench` guest, and the
/// message that prefills the prompt in it.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
struct GuestBench {
    prompt: Vec<u32>,
    runtime: Runtime,
    module: Arc<ActorModule>,
    prefill_msg: String,
    n_vocab: usize,
}

#[cfg(any(feature = "cuda", feature = "wgpu"))]
impl GuestBench {
    fn new(
        device: &Arc<dyn tern_compute::Device>,
        model: &Arc<tern_model::Model>,
        prefill: usize,
    ) -> anyhow::Result<GuestBench> {
        let vocab = model.config().n_vocab as u32;
        let prompt: Vec<u32> = (0..prefill as u32)
            .map(|i| (i * 7919 + 13) % vocab)
            .collect();
        let runtime = Runtime::builder(device.clone())
            .model(model.clone())
            .build()?;
        let wasm = std::fs::read(crate::host::resolve_module("bench")?)
            .context("reading the bench guest")?;
        let module = Arc::new(ActorModule::new(&runtime, "bench", &wasm)?);
        let ids: Vec<String> = prompt.iter().map(u32::to_string).collect();
        let prefill_msg = format!("prefill {}", ids.join(" "));
        Ok(GuestBench {
            prompt,
            runtime,
            module,
            prefill_msg,
            n_vocab: vocab as usize,
        })
    }

    /// A fresh bench actor with a session of `context` positions: the seconds its prefill
    /// of the prompt takes, then the seconds of `{verb} {n}` (`decode` or `decode_top`).
    fn actor_run(&self, context: usize, verb: &str, n: usize) -> anyhow::Result<(f64, f64)> {
        use std::time::Instant;
        let mut actor = tern_actor::Actor::start(&self.runtime, &self.module)?;
        send(
            &mut actor,
            &format!("open bench {} {context}", self.n_vocab),
        )?;
        let t = Instant::now();
        send(&mut actor, &self.prefill_msg)?;
        let prefill = t.elapsed().as_secs_f64();
        let t = Instant::now();
        send(&mut actor, &format!("{verb} {n}"))?;
        Ok((prefill, t.elapsed().as_secs_f64()))
    }
}

/// Seconds of each decode path over the repeats of a GPU benchmark (and the prefills before
/// the first two): the engine with the logits on the host and the argmax there, the actor
/// with the logits in Wasm memory and the argmax there, and both with the top logit chosen
/// by the engine (`forward_top`).
#[cfg(any(feature = "cuda", feature = "wgpu"))]
#[derive(Default)]
struct Paths {
    engine_prefill: Vec<f64>,
    engine: Vec<f64>,
    actor_prefill: Vec<f64>,
    actor: Vec<f64>,
    engine_top: Vec<f64>,
    actor_top: Vec<f64>,
}

#[cfg(any(feature = "cuda", feature = "wgpu"))]
impl GuestBench {
    /// Times every path `b.repeats` times after an untimed warm-up (kernels compiled by the
    /// driver, graphs captured, clocks raised).
    fn time_paths(
        &self,
        model: &tern_model::Model,
        b: &GpuBench<'_>,
        context: usize,
    ) -> anyhow::Result<Paths> {
        let prompt = &self.prompt;
        direct(model, prompt, b.decode.min(16), context)?;
        direct_top(model, prompt, b.decode.min(16), context)?;
        let mut p = Paths::default();
        for _ in 0..b.repeats {
            let (pre, d) = direct(model, prompt, b.decode, context)?;
            p.engine_prefill.push(pre);
            p.engine.push(d);
            p.engine_top
                .push(direct_top(model, prompt, b.decode, context)?);
            let (pre, d) = self.actor_run(context, "decode", b.decode)?;
            p.actor_prefill.push(pre);
            p.actor.push(d);
            p.actor_top
                .push(self.actor_run(context, "decode_top", b.decode)?.1);
        }
        Ok(p)
    }
}

#[cfg(any(feature = "cuda", feature = "wgpu"))]
impl Paths {
    /// Prints the table of rates and returns the best prefill and decode rates; `top` says
    /// where the engine chooses the top logit.
    fn print(&self, b: &GpuBench<'_>, top: &str) -> (f64, f64) {
        let rate = |n: usize, secs: &[f64]| n as f64 / median(secs);
        println!();
        println!("{:<52} {:>12} {:>12}", "path", "prefill t/s", "decode t/s");
        let row = |name: &str, prefill: Option<f64>, decode: f64| {
            let prefill = prefill.map_or("".into(), |p| format!("{p:.1}"));
            println!("{name:<52} {prefill:>12} {decode:>12.1}");
        };
        let (ep, ap) = (
            rate(b.prefill, &self.engine_prefill),
            rate(b.prefill, &self.actor_prefill),
        );
        row(
            "engine (logits copied to the host, argmax there)",
            Some(ep),
            rate(b.decode, &self.engine),
        );
        row(
            "actor (logits written into Wasm memory, argmax there)",
            Some(ap),
            rate(b.decode, &self.actor),
        );
        row(
            &format!("engine, top logit selected {top}"),
            None,
            rate(b.decode, &self.engine_top),
        );
        row(
            &format!("actor, top logit selected {top} (forward_top)"),
            None,
            rate(b.decode, &self.actor_top),
        );
        let decode = [&self.engine, &self.actor, &self.engine_top, &self.actor_top]
            .into_iter()
            .map(|d| rate(b.decode, d))
            .fold(0.0, f64::max);
        (ep.max(ap), decode)
    }

    /// Prints what the actor path costs per decoded token over the engine's, both ways.
    fn print_actor_cost(&self, b: &GpuBench<'_>, top: &str) {
        let per_token = |secs: &[f64]| median(secs) / b.decode as f64 * 1e6;
        for (what, actor, engine) in [
            (
                "logits into the actor, argmax in Wasm",
                &self.actor,
                &self.engine,
            ),
            (
                &*format!("top logit selected {top}"),
                &self.actor_top,
                &self.engine_top,
            ),
        ] {
            let extra = per_token(actor) - per_token(engine);
            println!(
                "actor path cost per decoded token, {what}: {extra:+.2} us ({:+.2}% of the engine's {:.1} us)",
                extra / per_token(engine) * 100.0,
                per_token(engine)
            );
        }
    }
}

/// Sends `message` to a bench actor; a negative reply is an error with the actor's output.
fn send(actor: &mut tern_actor::Actor, message: &str) -> anyhow::Result<()> {
    let reply = actor.send(message.as_bytes())?;
    if reply.code < 0 {
        anyhow::bail!(
            "the bench actor failed: {}",
            String::from_utf8_lossy(&reply.output)
        );
    }
    Ok(())
}

/// The guest's share of a greedy decode step: microseconds per argmax over the model's
/// vocabulary in the `bench` actor (Wasm), and natively, in the same run.
fn argmax_cost(
    runtime: &tern_actor::Runtime,
    module: &std::sync::Arc<tern_actor::ActorModule>,
    n_vocab: usize,
) -> anyhow::Result<(f64, f64)> {
    use std::time::Instant;
    const REPS: usize = 200;
    let mut actor = tern_actor::Actor::start(runtime, module)?;
    send(&mut actor, &format!("open bench {n_vocab} 8"))?;
    send(&mut actor, "prefill 1 2 3")?;
    send(&mut actor, "argmax 1")?;
    let t = Instant::now();
    send(&mut actor, &format!("argmax {REPS}"))?;
    let wasm = t.elapsed().as_secs_f64() / REPS as f64 * 1e6;
    let logits: Vec<f32> = (0..n_vocab).map(|i| ((i * 7919) % 1013) as f32).collect();
    let t = Instant::now();
    for _ in 0..REPS {
        std::hint::black_box(tern_guest::sample::argmax(std::hint::black_box(&logits)));
    }
    let native = t.elapsed().as_secs_f64() / REPS as f64 * 1e6;
    Ok((wasm, native))
}

/// Prints kernel times (medians over `runs`, each a list of (kernel, microseconds)).
#[cfg(any(feature = "cuda", feature = "wgpu"))]
pub(super) fn print_breakdown(title: &str, runs: &[Vec<(&str, f64)>]) {
    let total: Vec<f64> = runs
        .iter()
        .map(|r| r.iter().map(|(_, t)| t).sum())
        .collect();
    let total = median(&total);
    println!();
    println!("{title}");
    println!("{:<16} {:>10} {:>8}", "kernel", "us", "share");
    for (i, (name, _)) in runs[0].iter().enumerate() {
        let us = median(&runs.iter().map(|r| r[i].1).collect::<Vec<_>>());
        println!("{name:<16} {us:>10.1} {:>7.1}%", us / total * 100.0);
    }
    println!("{:<16} {total:>10.1}", "total");
}
