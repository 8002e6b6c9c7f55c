//! `tern chat`: the chat actor on a model, interactively or for one prompt.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use tern_actor::{Actor, Limits, Runtime};
use tern_compute::DeviceChoice;
use tern_model::{Model, Precision};

use crate::fetch;

#[derive(clap::Args)]
pub struct ChatArgs {
    /// Say this once, print the reply, and exit (otherwise: interactive).
    #[arg(long)]
    prompt: Option<String>,
    /// A GGUF model file (default: SmolLM2-135M-Instruct, fetched on first use).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Seed of the actor's sampler.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// The most tokens per reply.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// A system prompt.
    #[arg(long)]
    system: Option<String>,
    /// Where the actor's memory lives and the forward pass runs (`auto`: the GPU when there
    /// is one).
    #[arg(long, default_value = "auto", value_parser = crate::parse_device)]
    device: DeviceChoice,
    /// CPU threads for the forward pass (default: all cores).
    #[arg(long, value_parser = crate::parse_count)]
    threads: Option<usize>,
    /// `fast` (int8 activations, as llama.cpp) or `reference` (f32 activations).
    #[arg(long, default_value = "fast", value_parser = crate::parse_precision)]
    precision: Precision,
    /// Snapshot the actor to this file after every reply (crash-safe: an interrupted save
    /// keeps the previous snapshot).
    #[arg(long)]
    save: Option<PathBuf>,
    /// Continue the conversation saved in this snapshot instead of starting a new one (the
    /// sampler settings are the snapshot's; `--model` must be the model it was taken with).
    #[arg(long)]
    resume: Option<PathBuf>,
}

pub fn chat(args: ChatArgs) -> anyhow::Result<ExitCode> {
    let device = tern_compute::open(args.device)?;
    let (name, model) = open_model(args.model.as_deref(), args.threads, args.precision, &device)?;
    let mut runtime = Runtime::new(
        device.clone(),
        Limits {
            call_time: std::time::Duration::from_secs(600),
            ..Limits::default()
        },
    )?;
    runtime.add_model(model.clone());
    let module = crate::snapshot::load_module(&runtime, "chat")?;
    eprintln!(
        "model: {name} ({} layers, vocab {}), forward pass on {}; actor memory on {}",
        model.config().n_layer,
        model.config().n_vocab,
        model.compute_label(),
        device.describe()
    );
    let mut actor = match &args.resume {
        Some(path) => crate::snapshot::restore(&runtime, &module, path)?,
        None => {
            let mut actor = Actor::start(&runtime, &module)?;
            let config = serde_json::json!({"config": {
                "model": name, "seed": args.seed, "temperature": args.temperature,
                "max_tokens": args.max_tokens, "system": args.system,
            }});
            expect_ok(actor.send(config.to_string().as_bytes())?.code, &actor)?;
            actor
        }
    };
    crate::snapshot::stream_to_stdout(&mut actor);
    let save = |actor: &mut Actor| -> anyhow::Result<()> {
        if let Some(path) = &args.save {
            actor
                .save(path)
                .with_context(|| format!("saving the conversation to {}", path.display()))?;
        }
        Ok(())
    };
    save(&mut actor)?;
    if let Some(prompt) = &args.prompt {
        expect_ok(actor.send(prompt.as_bytes())?.code, &actor)?;
        save(&mut actor)?;
        return Ok(ExitCode::SUCCESS);
    }
    let stdin = std::io::stdin();
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            return Ok(ExitCode::SUCCESS);
        }
        let line = line.trim_end_matches(['\n', '\r']);
        if line.is_empty() {
            continue;
        }
        let reply = actor.send(line.as_bytes())?;
        if reply.code < 0 {
            eprintln!("the actor reported an error ({})", reply.code);
        }
        save(&mut actor)?;
    }
}

/// Opens `path` (or the default model, fetched on first use), named by its file stem, with
/// its forward pass on `device` when that is a GPU.
pub fn open_model(
    path: Option<&Path>,
    threads: Option<usize>,
    precision: Precision,
    device: &Arc<dyn tern_compute::Device>,
) -> anyhow::Result<(String, Arc<Model>)> {
    let (name, path) = match path {
        Some(path) => (
            path.file_stem()
                .map_or("model".into(), |s| s.to_string_lossy().into_owned()),
            path.to_path_buf(),
        ),
        None => (fetch::DEFAULT_MODEL.to_string(), fetch::default_model()?),
    };
    let threads =
        threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let model = Model::open(&name, &path, threads)?
        .with_precision(precision)
        .on_device(device)?;
    Ok((name, Arc::new(model)))
}

fn expect_ok(code: i32, actor: &Actor) -> anyhow::Result<()> {
    if code < 0 {
        anyhow::bail!(
            "the chat actor failed ({code}): {}",
            actor.last_error().unwrap_or("see its output")
        );
    }
    Ok(())
}
