//! `tern snapshot` and `tern restore`: an actor's whole state to a file and back, in this
//! process or another, on this machine or another.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use tern_actor::{Actor, ActorModule, Runtime, SnapshotFile};
use tern_snapshot::{Chain, parse_chain, parse_chain_unverified, split_links};

use crate::host::{HostArgs, load_module, stream_to_stdout};

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
    host: HostArgs,
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
    host: HostArgs,
}

/// Restores the actor saved at `path` (a snapshot, or a chain of them) and says how it will
/// continue; its next [`Actor::save_to`] `path` continues the chain.
pub fn restore(runtime: &Runtime, module: &Arc<ActorModule>, path: &Path) -> anyhow::Result<Actor> {
    let file = SnapshotFile::open(path)?;
    let links = split_links(file.bytes())?;
    if links.torn_bytes > 0 {
        eprintln!(
            "{}: its last {} bytes are a save that did not finish; restoring the snapshot before them",
            path.display(),
            links.torn_bytes
        );
    }
    let chain = parse_chain_unverified(&links.links)?;
    let actor = Actor::restore_chain(runtime, module, &chain)
        .with_context(|| format!("restoring {}", path.display()))?;
    let m = chain.manifest();
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
    match actor.continuation(m) {
        tern_actor::Continuation::Bitwise => {
            eprintln!("continuing bit for bit: taken on {was}, continuing on {now}")
        }
        tern_actor::Continuation::Valid { differs } => eprintln!(
            "taken on {was}, continuing on {now}: a valid continuation, not a bitwise one ({}: the arithmetic differs, so later tokens may differ from an uninterrupted run)",
            differs.join(", ")
        ),
    }
    Ok(actor)
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
    let runtime = args.host.runtime()?;
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
    let links = split_links(file.bytes())?;
    if args.inspect {
        let chain = parse_chain(&links.links)?;
        inspect(&args.snapshot, &chain, links.torn_bytes);
        return Ok(ExitCode::SUCCESS);
    }
    // Read for its module's name; `restore` checks it whole.
    let chain = parse_chain_unverified(&links.links)?;
    let manifest = chain.manifest().clone();
    drop(chain);
    drop(file);
    let runtime = args.host.runtime()?;
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

/// Prints what a checked snapshot or chain holds: each snapshot of the chain, then the
/// state it restores.
fn inspect(path: &Path, chain: &Chain<'_>, torn_bytes: u64) {
    let view = chain.head();
    let m = &view.manifest;
    println!(
        "{}: a valid Tern snapshot (format version {}, ABI version {})",
        path.display(),
        view.version(),
        m.abi_version
    );
    if chain.len() > 1 {
        println!(
            "a chain of {} snapshots: a whole one and {} incremental links",
            chain.len(),
            chain.len() - 1
        );
        for (depth, link) in chain.views().iter().enumerate() {
            let kv: usize = (link.manifest.sessions.iter())
                .map(|s| s.tokens.len() - s.kv_from as usize)
                .sum();
            println!(
                "snapshot {depth}: digest {}, {} pages and {kv} KV positions stored",
                tern_snapshot::digest_hex(link.digest()),
                link.stored_pages(),
            );
        }
    }
    if torn_bytes > 0 {
        println!("then {torn_bytes} bytes of a save that did not finish (left out)");
    }
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
        let identity = match &r.sha256 {
            Some(sha256) => format!("sha256 {sha256}"),
            None => format!("sampled digest {:016x}", r.legacy_digest),
        };
        println!(
            "model {i}: `{}` ({}, {} layers, {} KV heads of {}, vocabulary {}, {identity})",
            r.name, r.arch, r.n_layer, r.n_head_kv, r.head_dim, r.n_vocab
        );
        if let Some(n) = &r.numerics {
            println!(
                "model {i} numerics: backend {}, precision {}, kernels {}, architecture {}",
                n.backend, n.precision, n.kernels, n.architecture
            );
        }
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
