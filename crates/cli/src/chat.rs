//! `tern chat`: the chat actor on a model, interactively or for one prompt.

use std::io::BufRead;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use tern_actor::Actor;

use crate::host::{HostArgs, load_module, stream_to_stdout};

#[derive(clap::Args)]
pub struct ChatArgs {
    /// Say this once, print the reply, and exit (otherwise: interactive).
    #[arg(long)]
    prompt: Option<String>,
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
    /// Snapshot the actor to this file after every reply: incrementally (each save appends
    /// what changed, and the file starts over with a whole snapshot now and then); crash-safe
    /// (an interrupted save keeps every earlier one).
    #[arg(long)]
    save: Option<PathBuf>,
    /// Continue the conversation saved in this snapshot instead of starting a new one (the
    /// sampler settings are the snapshot's; `--model` must be the model it was taken with).
    #[arg(long)]
    resume: Option<PathBuf>,
    /// The host: the model the actor chats with (the first `--model`, or the default one),
    /// device, threads, precision, limits.
    #[command(flatten)]
    host: HostArgs,
}

pub fn chat(args: ChatArgs) -> anyhow::Result<ExitCode> {
    let runtime = args.host.runtime()?;
    let model = runtime.model("default")?;
    let module = load_module(&runtime, "chat")?;
    eprintln!(
        "model: {} ({} layers, vocab {}), forward pass on {}; actor memory on {}",
        model.name,
        model.config().n_layer,
        model.config().n_vocab,
        model.compute_label(),
        runtime.device().describe()
    );
    // The first save starts a new chain, unless it continues the one restored.
    let mut restart = args.resume.is_none() || args.resume != args.save;
    let mut actor = match &args.resume {
        Some(path) => crate::snapshot::restore(&runtime, &module, path)?,
        None => {
            let mut actor = Actor::start(&runtime, &module)?;
            let config = serde_json::json!({"config": {
                "model": model.name, "seed": args.seed, "temperature": args.temperature,
                "max_tokens": args.max_tokens, "system": args.system,
            }});
            expect_ok(actor.send(config.to_string().as_bytes())?.code, &actor)?;
            actor
        }
    };
    stream_to_stdout(&mut actor);
    let mut save = |actor: &mut Actor| -> anyhow::Result<()> {
        if let Some(path) = &args.save {
            actor
                .save_to(path, std::mem::take(&mut restart))
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

fn expect_ok(code: i32, actor: &Actor) -> anyhow::Result<()> {
    if code < 0 {
        anyhow::bail!(
            "the chat actor failed ({code}): {}",
            actor.last_error().unwrap_or("see its output")
        );
    }
    Ok(())
}
