//! `tern`: run, chat with and benchmark Tern actors.

mod bench;
mod chat;
mod cluster;
mod fetch;
mod generate;
mod host;
mod run;
mod serve;
mod snapshot;

use clap::{Parser, Subcommand};
use tern_compute::DeviceChoice;

#[derive(Parser)]
#[command(
    name = "tern",
    version,
    about = "Stateful, sandboxed AI actors on shared GPU memory"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Chat with a model through the chat actor (the default model is fetched on first use).
    Chat(chat::ChatArgs),
    /// Load an actor, send it one message and print what it emits.
    Run(run::RunArgs),
    /// Serve actors over HTTP: upload modules, start actors, send them messages.
    Serve(serve::ServeArgs),
    /// Run a cluster of `tern serve --cluster` nodes: status, drain a node, move an actor.
    Cluster(cluster::ClusterArgs),
    /// Start an actor, deliver messages, and save its whole state to a file.
    Snapshot(snapshot::SnapshotArgs),
    /// Restore an actor from a snapshot, deliver more messages, optionally save it again.
    Restore(snapshot::RestoreArgs),
    /// Write a random-weight model of a real shape into the model cache; print its path.
    Generate(generate::GenerateArgs),
    /// Fetch the default model into the model cache (if needed) and print its path.
    Fetch,
    /// Measure Tern against a baseline, in the same run.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

/// Parses `--kv-type`.
pub fn parse_kv_type(s: &str) -> Result<tern_model::KvType, String> {
    match s {
        "f32" => Ok(tern_model::KvType::F32),
        "f16" => Ok(tern_model::KvType::F16),
        other => Err(format!(
            "unknown KV cache type `{other}` (expected f32 or f16)"
        )),
    }
}

/// `--precision`, as `tern run`, `tern serve` and the benchmarks take it.
#[derive(clap::Args, Clone, Copy, Debug)]
pub struct PrecisionArg {
    /// `fast` (int8 activations on the CPU, as llama.cpp), `tensor` (`fast`, and on a CUDA GPU
    /// the BF16 matrices on tensor cores: several times the batched throughput, about a fifth
    /// slower alone) or `reference` (f32 activations).
    #[arg(
        long = "precision",
        value_name = "PRECISION",
        default_value = "fast",
        value_parser = parse_precision
    )]
    pub value: tern_model::Precision,
}

/// Parses `--precision`.
pub fn parse_precision(s: &str) -> Result<tern_model::Precision, String> {
    match s {
        "fast" => Ok(tern_model::Precision::Fast),
        "reference" => Ok(tern_model::Precision::Reference),
        "tensor" => Ok(tern_model::Precision::Tensor),
        other => Err(format!(
            "unknown precision `{other}` (expected fast, tensor or reference)"
        )),
    }
}

/// Parses a count that must be at least 1 (`--repeats`, `--decode`, ...).
pub fn parse_count(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// Parses `--device`.
pub fn parse_device(s: &str) -> Result<DeviceChoice, String> {
    s.parse()
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Chat(args) => chat::chat(args),
        Command::Run(args) => run::run(args),
        Command::Serve(args) => serve::serve(args),
        Command::Cluster(args) => cluster::cluster(args),
        Command::Generate(args) => generate::generate(args),
        Command::Snapshot(args) => snapshot::snapshot(args),
        Command::Restore(args) => snapshot::restore_command(args),
        Command::Fetch => fetch::default_model().map(|path| {
            println!("{}", path.display());
            std::process::ExitCode::SUCCESS
        }),
        Command::Bench(cmd) => bench::bench(cmd),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
