//! `tern snapshot` and `tern restore`: an actor's whole state to a file and back, in this
//! process or another, on this machine or another.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use tern_actor::{Actor, ActorModule, Limits, Runtime, SnapshotFile};
use tern_compute::DeviceChoice;
use tern_model::Precision;

use crate::chat::open_model;

/// What an actor runs against: its device and, optionally, a model.
#[derive(clap::Args)]
pub struct ActorEnv {
    /// A GGUF model (or Hugging Face checkpoint) to offer the actor, named by its file stem
    /// (default: SmolLM2-135M-Instruct, for the bundled chat guest or a snapshot that names it).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Where the actor's memory lives and the forward pass runs.
    #[arg(long, default_value = "auto", value_parser = crate::parse_device)]
    device: DeviceChoice,
    /// CPU threads for the forward pass (default: all cores).
    #[arg(long, value_parser = crate::parse_count)]
    threads: Option<usize>,
    /// `fast` (int8 activations) or `reference` (f32 activations).
    #[arg(long, default_value = "fast", value_parser = crate::parse_precision)]
    precision: Precision,
}

#[derive(clap::Args)]
pub struct SnapshotArgs {
    /// A `.wasm` or `.wat` file, or the name of a bundled guest (`chat`).
    module: String,
    /// Where to write the snapshot.
    #[arg(long, short)]
    out: PathBuf,
    /// Messages to deliver before the snapshot, in order.
    #[arg(long)]
    message: Vec<String>,
    #[command(flatten)]
    env: ActorEnv,
}

#[derive(clap::Args)]
pub struct RestoreArgs {
    /// The snapshot to restore.
    snapshot: PathBuf,
    /// The module the snapshot was taken with (default: the bundled guest or path it names).
    #[arg(long)]
    module: Option<String>,
    /// Messages to deliver after restoring, in order.
    #[arg(long)]
    message: Vec<String>,
    /// Snapshot the actor again to this file after the messages.
    #[arg(long)]
    save: Option<PathBuf>,
    /// Only check the file and print what it holds (module, memory, globals, models,
    /// sessions); restore nothing.
    #[arg(long)]
    inspect: bool,
    #[command(flatten)]
    env: ActorEnv,
}

/// A runtime on `env`'s device, offering `env`'s model (or the default one when `wanted`
/// names it).
fn runtime(env: &ActorEnv, wanted: &[String]) -> anyhow::Result<Runtime> {
    let device = tern_compute::open(env.device)?;
    let mut runtime = Runtime::new(
        device,
        Limits {
            call_time: std::time::Duration::from_secs(600),
            ..Limits::default()
        },
    )?;
    let default = crate::fetch::DEFAULT_MODEL.to_string();
    if env.model.is_some() || wanted.contains(&default) {
        let (_, model) = open_model(
            env.model.as_deref(),
            env.threads,
            env.precision,
            runtime.device(),
        )?;
        runtime.add_model(model);
    }
    Ok(runtime)
}

/// Instruments and compiles a module named by path or bundled-guest name.
pub fn load_module(runtime: &Runtime, name: &str) -> anyhow::Result<Arc<ActorModule>> {
    let path = crate::run::resolve_module(name)?;
    let wasm = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(Arc::new(ActorModule::new(runtime, name, &wasm)?))
}

/// Restores the actor saved at `path` and says how it will continue.
pub fn restore(runtime: &Runtime, module: &Arc<ActorModule>, path: &Path) -> anyhow::Result<Actor> {
    let file = SnapshotFile::open(path)?;
    let view = file.view()?;
    let actor = Actor::restore(runtime, module, &view)
        .with_context(|| format!("restoring {}", path.display()))?;
    let m = &view.manifest;
    let tokens: usize = m.sessions.iter().map(|s| s.tokens.len()).sum();
    let (was, now) = (&m.host.device, actor.compute_label());
    eprintln!(
        "restored {}: module `{}`, {} KiB of memory, {} globals, {} sessions ({tokens} tokens of KV cache)",
        path.display(),
        m.module.name,
        m.memory_bytes / 1024,
        m.globals.len(),
        m.sessions.len(),
    );
    if *was == now {
        eprintln!("continuing bit for bit: taken on {was}, continuing on {now}");
    } else {
        eprintln!(
            "taken on {was}, continuing on {now}: a valid continuation, not a bitwise one (devices round differently, so later tokens may differ from an uninterrupted run)"
        );
    }
    Ok(actor)
}

/// Streams everything `actor` emits to standard output as it is emitted.
pub fn stream_to_stdout(actor: &mut Actor) {
    actor.on_output(|bytes| {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(bytes);
        let _ = out.flush();
    });
}

fn deliver(actor: &mut Actor, messages: &[String]) -> anyhow::Result<()> {
    for message in messages {
        let reply = actor.send(message.as_bytes())?;
        println!();
        if reply.code < 0 {
            anyhow::bail!(
                "the actor reported an error ({}): {}",
                reply.code,
                actor.last_error().unwrap_or("see its output")
            );
        }
    }
    Ok(())
}

pub fn snapshot(args: SnapshotArgs) -> anyhow::Result<ExitCode> {
    // The bundled chat guest asks for the host's `default` model until a config names one:
    // offer it the default model, as `tern chat` does.
    let wanted = match args.module.as_str() {
        "chat" => vec![crate::fetch::DEFAULT_MODEL.to_string()],
        _ => Vec::new(),
    };
    let runtime = runtime(&args.env, &wanted)?;
    let module = load_module(&runtime, &args.module)?;
    let mut actor = Actor::start(&runtime, &module)?;
    stream_to_stdout(&mut actor);
    deliver(&mut actor, &args.message)?;
    let bytes = actor.save(&args.out)?;
    eprintln!("saved {} ({bytes} bytes)", args.out.display());
    Ok(ExitCode::SUCCESS)
}

pub fn restore_command(args: RestoreArgs) -> anyhow::Result<ExitCode> {
    let file = SnapshotFile::open(&args.snapshot)?;
    let view = file.view()?;
    if args.inspect {
        inspect(&args.snapshot, &view);
        return Ok(ExitCode::SUCCESS);
    }
    let manifest = view.manifest;
    let names: Vec<String> = manifest.models.iter().map(|m| m.name.clone()).collect();
    let runtime = runtime(&args.env, &names)?;
    let module_name = args.module.as_deref().unwrap_or(&manifest.module.name);
    let module = load_module(&runtime, module_name)?;
    let mut actor = restore(&runtime, &module, &args.snapshot)?;
    stream_to_stdout(&mut actor);
    deliver(&mut actor, &args.message)?;
    if let Some(path) = &args.save {
        let bytes = actor.save(path)?;
        eprintln!("saved {} ({bytes} bytes)", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints what a checked snapshot holds.
fn inspect(path: &Path, view: &tern_actor::SnapshotView<'_>) {
    let m = &view.manifest;
    println!(
        "{}: a valid Tern snapshot (ABI version {})",
        path.display(),
        m.abi_version
    );
    println!("module: `{}`, sha256 {}", m.module.name, m.module.digest);
    println!(
        "memory: {} KiB, {} of {} pages stored",
        m.memory_bytes / 1024,
        view.stored_pages(),
        m.memory_bytes / tern_snapshot::PAGE_BYTES as u64
    );
    for g in &m.globals {
        let kind = if g.mutable { "mut " } else { "" };
        println!("global {}: {kind}{:?} = {:#x}", g.name, g.ty, g.bits);
    }
    for (i, r) in m.models.iter().enumerate() {
        println!(
            "model {i}: `{}` ({}, {} layers, {} KV heads of {}, vocabulary {}, weights digest {:016x})",
            r.name, r.arch, r.n_layer, r.n_head_kv, r.head_dim, r.n_vocab, r.digest
        );
    }
    for s in &m.sessions {
        println!(
            "session {} on model {}: {} of {} positions",
            s.slot,
            s.model,
            s.tokens.len(),
            s.n_ctx
        );
    }
    println!("taken on: {}", m.host.device);
    if let Some(e) = &m.host.last_error {
        println!("last error the guest saw: {e}");
    }
}
