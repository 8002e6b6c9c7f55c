//! `tern bench snapshot`: how long an actor holding `n` tokens of context takes to save to a
//! file and to restore from it, and how large the file is, against re-prefilling the same
//! tokens: the baseline a runtime without snapshots pays to rebuild that state. Then one more
//! turn of [`TURN_TOKENS`] tokens made durable incrementally (a link appended to the chain
//! file) and the chain restored. All measured in the same run, on the `bench` actor and the
//! same model.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use tern_actor::{Actor, ActorModule, Runtime, SnapshotFile};
use tern_compute::DeviceChoice;
use tern_model::{Model, Precision};

use super::{median, send};

#[derive(clap::Args)]
pub struct SnapshotBenchArgs {
    /// Where the actor's memory lives and the forward pass runs.
    #[arg(long, default_value = "cpu", value_parser = crate::parse_device)]
    device: DeviceChoice,
    #[command(flatten)]
    model: super::BenchModel,
    /// Context sizes to measure, in tokens.
    #[arg(long, value_delimiter = ',', default_values_t = [24, 512, 4096])]
    tokens: Vec<usize>,
    /// Repeats of each measurement (the median is reported).
    #[arg(long, default_value_t = 3, value_parser = crate::parse_count)]
    repeats: usize,
    /// CPU threads (default: all cores).
    #[arg(long, value_parser = crate::parse_count)]
    threads: Option<usize>,
    /// How the KV cache keeps keys and values: `f32` or `f16`.
    #[arg(long, default_value = "f32", value_parser = crate::parse_kv_type)]
    kv_type: tern_model::KvType,
    /// MiB of incompressible state the actor holds besides its session.
    #[arg(long, default_value_t = 0)]
    memory_mib: usize,
    /// Where to write the snapshots (default: the system's temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
}

/// Tokens of the turn saved incrementally after the whole snapshot.
const TURN_TOKENS: usize = 64;

/// One context size's medians, in seconds and bytes.
struct Row {
    tokens: usize,
    save: f64,
    restore: f64,
    memory_bytes: usize,
    prefill: f64,
    bytes: u64,
    /// The turn's link: save time, bytes, and the restore of the whole chain.
    turn_save: f64,
    turn_bytes: u64,
    chain_restore: f64,
    /// The whole restore's phases: the file opened (mapped), its structure read, its
    /// checksums compared (beside the phases after it), the sessions made, their KV caches
    /// written back, the module instantiated, the memory grown, the memory and globals written
    /// back.
    phases: [f64; 8],
    identical: bool,
}

pub fn snapshot(args: SnapshotBenchArgs) -> anyhow::Result<ExitCode> {
    let path = args.model.path()?;
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let device = tern_compute::open(args.device)?;
    let model = Model::open("bench", &path, threads)?
        .with_precision(Precision::Fast)
        .with_kv_type(args.kv_type)
        .on_device(&device)?;
    let model = Arc::new(model);
    let c = model.config().clone();
    let limit = c.n_ctx_train.saturating_sub(1 + TURN_TOKENS);
    if let Some(&n) = args.tokens.iter().find(|&&n| n == 0 || n > limit) {
        bail!("--tokens {n}: the model holds 1..={limit} tokens and a turn of {TURN_TOKENS}");
    }
    let runtime = Runtime::builder(device.clone())
        .model(model.clone())
        .build()?;
    let wasm =
        std::fs::read(crate::host::resolve_module("bench")?).context("reading the bench guest")?;
    let t = Instant::now();
    let module = Arc::new(ActorModule::new(&runtime, "bench", &wasm)?);
    let compile_ms = t.elapsed().as_secs_f64() * 1e3;
    let dir = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let file = dir.join(format!("tern-bench-{}.tern", std::process::id()));
    println!(
        "tern bench snapshot: {} ({} layers, {} KV floats per token and layer), forward pass on {}, actor memory on {}",
        path.file_name()
            .map_or("model".into(), |n| n.to_string_lossy()),
        c.n_layer,
        c.kv_dim(),
        model.compute_label(),
        device.describe()
    );
    println!(
        "module compiled once, {compile_ms:.1} ms (code, not state: not part of a restore); snapshots in {}",
        dir.display()
    );
    let text =
        "The quick brown fox jumps over the lazy dog while the sea rolls grey under a low sky. ";
    let unit = model.tokenizer.encode(text, false)?;
    let mut rows = Vec::new();
    let mut kept_restores = 0;
    for &n in &args.tokens {
        let ids: Vec<String> = unit.iter().cycle().take(n).map(u32::to_string).collect();
        let prefill_msg = format!("prefill {}", ids.join(" "));
        let turn_msg = format!("prefill {}", ids[..TURN_TOKENS.min(n)].join(" "));
        let open_msg = format!("open bench {} {}", c.n_vocab, n + TURN_TOKENS + 1);
        let (mut save, mut restore, mut prefill) = (Vec::new(), Vec::new(), Vec::new());
        let (mut turn_save, mut chain_restore) = (Vec::new(), Vec::new());
        let mut phases: [Vec<f64>; 8] = Default::default();
        let (mut bytes, mut turn_bytes, mut identical, mut memory_bytes) = (0, 0, true, 0);
        for _ in 0..args.repeats {
            // Baseline: rebuild the state by prefilling the tokens into a fresh session.
            let mut actor = Actor::start(&runtime, &module)?;
            if args.memory_mib > 0 {
                send(&mut actor, &format!("ballast {}", args.memory_mib))?;
            }
            send(&mut actor, &open_msg)?;
            let t = Instant::now();
            send(&mut actor, &prefill_msg)?;
            prefill.push(t.elapsed().as_secs_f64());

            let t = Instant::now();
            bytes = actor.save_to(&file, true)?.bytes;
            save.push(t.elapsed().as_secs_f64());

            let kept_before = runtime.kept_memory().0;
            let t = Instant::now();
            let (mut restored, took) = restore_file(&runtime, &module, &file)?;
            restore.push(t.elapsed().as_secs_f64());
            // A restore drops no memory: one kept fewer is the one it took.
            kept_restores += usize::from(runtime.kept_memory().0 < kept_before);
            for (all, took) in phases.iter_mut().zip(took) {
                all.push(took);
            }

            identical &= restored.snapshot()? == actor.snapshot()?;
            memory_bytes = restored.memory_bytes();
            drop(restored);

            // One more turn, made durable as a link of the chain, and the chain restored.
            send(&mut actor, &turn_msg)?;
            let t = Instant::now();
            turn_bytes = actor.save_to(&file, false)?.bytes;
            turn_save.push(t.elapsed().as_secs_f64());

            let t = Instant::now();
            let (mut restored, _) = restore_file(&runtime, &module, &file)?;
            chain_restore.push(t.elapsed().as_secs_f64());
            identical &= restored.snapshot()? == actor.snapshot()?;
        }
        rows.push(Row {
            tokens: n,
            save: median(&save),
            restore: median(&restore),
            prefill: median(&prefill),
            memory_bytes,
            bytes,
            turn_save: median(&turn_save),
            turn_bytes,
            chain_restore: median(&chain_restore),
            phases: phases.map(|p| median(&p)),
            identical,
        });
    }
    let _ = std::fs::remove_file(&file);
    print_table(&rows);
    println!(
        "guest memory: {kept_restores} of {} whole restores took a region kept from a dropped actor (zeroed, its pages still faulted in and registered with the device), as a server's restores do once actors come and go",
        args.repeats * args.tokens.len()
    );
    print_bus_bound(&model, &rows, threads)?;
    Ok(ExitCode::SUCCESS)
}

/// The bound of each restore: on a GPU, the file's bytes over the page-locked
/// host-to-device bandwidth measured now (the bus); on the CPU, over the host's memory copy
/// bandwidth on `threads` threads measured now (a restore copies every byte once).
fn print_bus_bound(model: &Model, rows: &[Row], threads: usize) -> anyhow::Result<()> {
    let copy = copy_bandwidth(256 << 20, threads, 9);
    println!();
    println!(
        "host memory copy: {:.1} GB/s (256 MiB on {threads} threads, median of 9)",
        copy / 1e9
    );
    let bus = upload_bandwidth(model)?;
    if let Some(bus) = bus {
        println!(
            "bus: {:.1} GB/s (page-locked host-to-device copy, 256 MiB, median of 9)",
            bus / 1e9
        );
    }
    let (what, bandwidth) = match bus {
        Some(bus) => ("bus", bus),
        None => ("copy", copy),
    };
    println!(
        "{:>7} {:>10} {:>15} {:>11} {:>13}",
        "tokens",
        "file MB",
        format!("{what} bound ms"),
        "restore ms",
        "x the bound"
    );
    for r in rows {
        let bound = r.bytes as f64 / bandwidth;
        println!(
            "{:>7} {:>10.2} {:>15.2} {:>11.2} {:>12.1}x",
            r.tokens,
            r.bytes as f64 / 1e6,
            bound * 1e3,
            r.restore * 1e3,
            r.restore / bound
        );
    }
    if bus.is_some() {
        println!("target at 4096 tokens: restore within 3x of the bound");
    }
    Ok(())
}

/// The page-locked host-to-device bandwidth when `model` computes on a CUDA GPU.
fn upload_bandwidth(model: &Model) -> anyhow::Result<Option<f64>> {
    #[cfg(feature = "cuda")]
    if let Some(cuda) = model.engine_as::<tern_model::llama::cuda::CudaLlama>() {
        return Ok(Some(cuda.upload_bandwidth(256 << 20, 9)?));
    }
    let _ = model;
    Ok(None)
}

/// Bytes per second copying `bytes` from one buffer to another, cut in `threads` parts
/// copied side by side: the median of `repeats` copies (after one that faults the pages in).
fn copy_bandwidth(bytes: usize, threads: usize, repeats: usize) -> f64 {
    let src = vec![1u8; bytes];
    let mut dst = vec![0u8; bytes];
    let part = bytes.div_ceil(threads.max(1));
    let mut copy = || {
        let t = Instant::now();
        std::thread::scope(|scope| {
            for (d, s) in dst.chunks_mut(part).zip(src.chunks(part)) {
                scope.spawn(move || d.copy_from_slice(s));
            }
        });
        t.elapsed().as_secs_f64()
    };
    copy();
    let times: Vec<f64> = (0..repeats).map(|_| copy()).collect();
    bytes as f64 / median(&times)
}

/// The actor the chain file at `path` holds: opened, split into its snapshots, checked and
/// restored; with the seconds each phase took (see [`Row::phases`]).
fn restore_file(
    runtime: &Runtime,
    module: &Arc<ActorModule>,
    path: &std::path::Path,
) -> anyhow::Result<(Actor, [f64; 8])> {
    let t = Instant::now();
    let file = SnapshotFile::open(path)?;
    let opened = t.elapsed().as_secs_f64();
    let links = tern_snapshot::split_links(file.bytes())?;
    let chain = tern_snapshot::parse_chain_unverified(&links.links)?;
    let read = t.elapsed().as_secs_f64();
    let actor = Actor::restore_chain(runtime, module, &chain)?;
    let p = actor.restore_phases().unwrap_or_default();
    Ok((
        actor,
        [
            opened,
            read - opened,
            p.check.as_secs_f64(),
            p.sessions.as_secs_f64(),
            p.kv.as_secs_f64(),
            p.instantiate.as_secs_f64(),
            p.grow.as_secs_f64(),
            p.memory.as_secs_f64(),
        ],
    ))
}

fn print_table(rows: &[Row]) {
    println!();
    println!(
        "{:>7} {:>11} {:>10} {:>10} {:>11} {:>14} {:>10} {:>10}",
        "tokens",
        "memory MiB",
        "save ms",
        "file MB",
        "restore ms",
        "re-prefill ms",
        "speedup",
        "identical"
    );
    for r in rows {
        println!(
            "{:>7} {:>11.1} {:>10.2} {:>10.2} {:>11.2} {:>14.1} {:>9.0}x {:>10}",
            r.tokens,
            r.memory_bytes as f64 / (1 << 20) as f64,
            r.save * 1e3,
            r.bytes as f64 / 1e6,
            r.restore * 1e3,
            r.prefill * 1e3,
            r.prefill / r.restore,
            if r.identical { "yes" } else { "NO" }
        );
    }
    println!();
    println!(
        "{:>7} {:>13} {:>8} {:>17} {:>8} {:>8} {:>9} {:>12} {:>7} {:>12} {:>8} {:>10}",
        "tokens",
        "turn save ms",
        "turn MB",
        "chain restore ms",
        "open ms",
        "read ms",
        "check ms",
        "sessions ms",
        "kv ms",
        "instance ms",
        "grow ms",
        "memory ms"
    );
    for r in rows {
        let [open, read, check, sessions, kv, instance, grow, memory] = r.phases.map(|p| p * 1e3);
        println!(
            "{:>7} {:>13.2} {:>8.3} {:>17.2} {:>8.2} {:>8.2} {:>9.2} {:>12.2} {:>7.2} {:>12.2} {:>8.2} {:>10.2}",
            r.tokens,
            r.turn_save * 1e3,
            r.turn_bytes as f64 / 1e6,
            r.chain_restore * 1e3,
            open,
            read,
            check,
            sessions,
            kv,
            instance,
            grow,
            memory,
        );
    }
    println!();
    println!(
        "save: state gathered, written to a temporary file, fsynced and renamed; restore: file opened and checksummed, actor instantiated, memory, globals and KV cache written back"
    );
    println!(
        "open, read, check, sessions, kv, instance, grow, memory: the whole restore's phases (file mapped; frames and structure checked; checksums compared, beside the phases after it; empty sessions made; their KV caches written back; module instantiated; memory grown, on a GPU registered with it; memory and globals written back)"
    );
    println!(
        "turn: {TURN_TOKENS} more tokens, then what changed (new KV positions, written pages) appended to the chain file and fsynced; chain restore: the whole snapshot and the link; target at 4096 tokens: turn save <= 10 ms and <= 5 MB"
    );
    println!(
        "speedup = re-prefill / restore; targets: >= 50x at 24 tokens, >= 200x at 4096 tokens"
    );
    println!(
        "anchor (the seed's author, Llama 3.2 1B on an M1, 24 tokens): save 1.1 ms, 1.58 MB, restore 1.4 ms, re-prefill 67.7 ms (48x)"
    );
}
