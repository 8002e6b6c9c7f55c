//! `tern run`: load one actor, deliver one message, stream what it emits.

use std::process::ExitCode;

use anyhow::Context;
use tern_actor::Actor;

use crate::host::{HostArgs, resolve_module, stream_to_stdout};

#[derive(clap::Args)]
pub struct RunArgs {
    /// A `.wasm` or `.wat` file, or the name of a bundled guest (`matmul`, `chat`).
    module: String,
    /// The message to send to the actor.
    #[arg(long, default_value = "")]
    message: String,
    #[command(flatten)]
    host: HostArgs,
}

pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let path = resolve_module(&args.module)?;
    let wasm = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let runtime = args.host.runtime()?;
    let device = runtime.device().clone();
    println!("device: {}", device.describe());
    let mut actor = Actor::load(&runtime, &wasm)?;
    let base = actor.memory_base();
    let identity = device.device_address(base);
    println!(
        "memory: guest memory base {base:p} is Tern's region ({} KiB committed); device address {}",
        actor.memory_bytes() / 1024,
        match identity {
            Some(addr) if addr == base as usize => format!("{addr:#x} == host pointer (zero-copy)"),
            Some(addr) => format!("{addr:#x} != host pointer"),
            None => "unavailable".into(),
        }
    );
    stream_to_stdout(&mut actor);
    let reply = actor.send(args.message.as_bytes())?;
    println!("result: {}", reply.code);
    if reply.code < 0
        && let Some(error) = actor.last_error()
    {
        eprintln!("the actor's last host error: {error}");
    }
    Ok(if reply.code >= 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
