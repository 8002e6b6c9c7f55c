//! `tern run`: load one actor, deliver one message, stream what it emits.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use tern_actor::{Actor, Limits, Runtime};
use tern_compute::DeviceChoice;

#[derive(clap::Args)]
pub struct RunArgs {
    /// A `.wasm` or `.wat` file, or the name of a bundled guest (`matmul`).
    module: String,
    /// Where the actor computes.
    #[arg(long, default_value = "auto", value_parser = crate::parse_device)]
    device: DeviceChoice,
    /// The message to send to the actor.
    #[arg(long, default_value = "")]
    message: String,
    /// The most linear memory the actor may use, in MiB.
    #[arg(long, default_value_t = 1024)]
    memory_mib: usize,
    /// The longest one guest call may run, in milliseconds.
    #[arg(long, default_value_t = 60_000)]
    time_limit_ms: u64,
}

/// Finds a module by path, or by name among the bundled guests.
pub fn resolve_module(name: &str) -> anyhow::Result<PathBuf> {
    let path = Path::new(name);
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    if !name.contains(['/', '.']) {
        // Where the build put the guests, or beside the `tern` binary in a packed copy.
        let beside = std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(|dir| dir.join(format!("{name}.wasm"))));
        let built = Path::new(env!("TERN_GUEST_DIR")).join(format!("{name}.wasm"));
        if let Some(path) = [Some(built), beside]
            .into_iter()
            .flatten()
            .find(|p| p.exists())
        {
            return Ok(path);
        }
    }
    bail!("no module at `{name}`, and no bundled guest of that name")
}

pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let path = resolve_module(&args.module)?;
    let wasm = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let device = tern_compute::open(args.device)?;
    let limits = Limits {
        memory_bytes: args
            .memory_mib
            .checked_mul(1 << 20)
            .context("--memory-mib is too large")?,
        call_time: Duration::from_millis(args.time_limit_ms),
        ..Limits::default()
    };
    let mut runtime = Runtime::new(device.clone(), limits)?;
    if args.module == "chat" {
        // The bundled chat guest asks for the host's default model.
        let (_, model) = crate::chat::open_model(None, None, tern_model::Precision::Fast, &device)?;
        runtime.add_model(model);
    }
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
    crate::snapshot::stream_to_stdout(&mut actor);
    let reply = actor.send(args.message.as_bytes())?;
    println!("result: {}", reply.code);
    Ok(if reply.code >= 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
