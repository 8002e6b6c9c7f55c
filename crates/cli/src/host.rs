//! What every command that runs actors shares: the host's flags (device, models, limits), the
//! runtime they build through [`tern_actor::RuntimeBuilder`], and finding modules.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use tern_actor::{Actor, ActorModule, Limits, Runtime};
use tern_compute::DeviceChoice;
use tern_model::KvType;

use crate::fetch;

/// A `--model` value: `FILE`, named by its file stem, or `NAME=FILE`.
#[derive(Clone, Debug)]
pub struct ModelArg {
    pub name: String,
    pub path: PathBuf,
}

/// Parses `--model [NAME=]FILE`.
pub fn parse_model(s: &str) -> Result<ModelArg, String> {
    let (name, path) = match s.split_once('=') {
        Some((name, path)) if !name.is_empty() && !name.contains(['/', '\\']) => {
            (name.to_string(), PathBuf::from(path))
        }
        _ => {
            let path = PathBuf::from(s);
            let stem = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .filter(|s| !s.is_empty())
                .ok_or_else(|| format!("`{s}` names no file"))?;
            (stem, path)
        }
    };
    if path.as_os_str().is_empty() {
        return Err(format!("`{s}` names no file"));
    }
    Ok(ModelArg { name, path })
}

/// The host an actor runs on: its device, the models it offers and its limits.
#[derive(clap::Args, Clone)]
pub struct HostArgs {
    /// A model to offer every actor, as `FILE` (named by its file stem) or `NAME=FILE`: a GGUF
    /// file or a Hugging Face checkpoint. Repeat for several; the first is also `default`.
    /// Without one, the default model (SmolLM2-135M-Instruct) is offered, fetched on first use.
    #[arg(long = "model", value_parser = parse_model)]
    pub models: Vec<ModelArg>,
    /// Where the actor's memory lives and the forward pass runs (`auto`: the GPU when there
    /// is one).
    #[arg(long, default_value = "auto", value_parser = crate::parse_device)]
    pub device: DeviceChoice,
    /// CPU threads for the forward pass (default: all cores).
    #[arg(long, value_parser = crate::parse_count)]
    pub threads: Option<usize>,
    #[command(flatten)]
    pub precision: crate::PrecisionArg,
    /// How KV caches keep keys and values: `f32`, or `f16` (half the memory and snapshot
    /// bytes; on the CPU and CUDA, not on wgpu).
    #[arg(long, default_value = "f32", value_parser = crate::parse_kv_type)]
    pub kv_type: KvType,
    /// The most linear memory one actor may use, in MiB.
    #[arg(long, default_value_t = 1024)]
    pub memory_mib: usize,
    /// The longest one guest call (one message) may run, in milliseconds.
    #[arg(long, default_value_t = 600_000)]
    pub time_limit_ms: u64,
    /// The most KV-cache memory one actor's sessions may reserve, in MiB.
    #[arg(long, default_value_t = 4096)]
    pub kv_mib: u64,
    /// The most KV-cache memory all actors together may reserve, in MiB (default: no cap
    /// beyond each actor's).
    #[arg(long)]
    pub host_kv_mib: Option<u64>,
}

impl HostArgs {
    /// The runtime these flags describe. Models load when an actor first opens one (or
    /// through [`Runtime::model`]).
    pub fn runtime(&self) -> anyhow::Result<Runtime> {
        let device = tern_compute::open(self.device)?;
        let limits = Limits {
            memory_bytes: self
                .memory_mib
                .checked_mul(1 << 20)
                .context("--memory-mib is too large")?,
            call_time: Duration::from_millis(self.time_limit_ms),
            kv_bytes: self
                .kv_mib
                .checked_mul(1 << 20)
                .context("--kv-mib is too large")?,
            runtime_kv_bytes: match self.host_kv_mib {
                Some(mib) => mib
                    .checked_mul(1 << 20)
                    .context("--host-kv-mib is too large")?,
                None => u64::MAX,
            },
            ..Limits::default()
        };
        let mut builder = Runtime::builder(device)
            .limits(limits)
            .precision(self.precision.value)
            .kv_type(self.kv_type);
        if let Some(threads) = self.threads {
            builder = builder.threads(threads);
        }
        if self.models.is_empty() {
            let locate = Arc::new(|| fetch::default_model().map_err(|e| format!("{e:#}")));
            builder = builder.model_located(fetch::DEFAULT_MODEL, locate);
        }
        for m in &self.models {
            builder = builder.model_file(&m.name, &m.path);
        }
        Ok(builder.build()?)
    }
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

/// Instruments and compiles a module named by path or bundled-guest name.
pub fn load_module(runtime: &Runtime, name: &str) -> anyhow::Result<Arc<ActorModule>> {
    let path = resolve_module(name)?;
    let wasm = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(Arc::new(ActorModule::new(runtime, name, &wasm)?))
}

/// Streams everything `actor` emits to standard output as it is emitted.
pub fn stream_to_stdout(actor: &mut Actor) {
    actor.on_output(|bytes| {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(bytes);
        let _ = out.flush();
    });
}

/// The bundled guests by name (`chat`, `matmul`, ...): the `.wasm` files where the build put
/// them, or beside the `tern` binary in a packed copy, the first found of each name.
pub fn bundled_guests() -> Vec<(String, PathBuf)> {
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf));
    let mut guests: Vec<(String, PathBuf)> = Vec::new();
    for dir in [Some(PathBuf::from(env!("TERN_GUEST_DIR"))), beside]
        .into_iter()
        .flatten()
    {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut found: Vec<(String, PathBuf)> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "wasm"))
            .filter_map(|p| Some((p.file_stem()?.to_str()?.to_string(), p)))
            .filter(|(name, _)| !guests.iter().any(|(n, _)| n == name))
            .collect();
        found.sort();
        guests.extend(found);
    }
    guests
}
