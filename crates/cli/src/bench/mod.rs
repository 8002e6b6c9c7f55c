//! `tern bench`: Tern's measurements, each printed beside the baseline it is compared with,
//! measured in the same run.

mod decode;
#[cfg(feature = "cuda")]
mod decode_cuda;
mod snapshot;
mod zero_copy;

use std::process::ExitCode;

#[derive(clap::Subcommand)]
pub enum BenchCommand {
    /// Zero-copy guest memory against the explicit-copy path, on each available device.
    ZeroCopy(zero_copy::ZeroCopyArgs),
    /// Prefill and decode speed of a model, directly and through a Wasm actor.
    Decode(decode::DecodeArgs),
    /// Snapshot save and restore time and size at several context lengths, against
    /// re-prefilling the same tokens.
    Snapshot(snapshot::SnapshotBenchArgs),
}

pub fn bench(cmd: BenchCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        BenchCommand::ZeroCopy(args) => zero_copy::zero_copy(args),
        BenchCommand::Decode(args) => decode::decode(args),
        BenchCommand::Snapshot(args) => snapshot::snapshot(args),
    }
}

/// The median of `xs`.
fn median(xs: &[f64]) -> f64 {
    let mut sorted = xs.to_vec();
    sorted.sort_by(f64::total_cmp);
    zero_copy::percentile(&sorted, 0.5)
}

/// The model a benchmark runs on: `model`, else a random-weight model of `shape` with
/// `weights` matrices (generated once into the model cache), else the default model.
fn bench_model(
    model: Option<&std::path::Path>,
    shape: Option<&str>,
    weights: &str,
) -> anyhow::Result<std::path::PathBuf> {
    use tern_model::generate::{Types, shape as find_shape, write_random_llama};
    use tern_model::quant::DType;
    match (model, shape) {
        (Some(_), Some(_)) => anyhow::bail!("give --model or --shape, not both"),
        (Some(path), None) => Ok(path.to_path_buf()),
        (None, None) => crate::fetch::default_model(),
        (None, Some(name)) => {
            let shape = find_shape(name).ok_or_else(|| {
                let names: Vec<_> = tern_model::generate::SHAPES
                    .iter()
                    .map(|s| s.name)
                    .collect();
                anyhow::anyhow!("unknown shape `{name}` (known: {})", names.join(", "))
            })?;
            let linear = DType::ALL
                .into_iter()
                .find(|t| t.to_string().eq_ignore_ascii_case(weights))
                .ok_or_else(|| anyhow::anyhow!("unknown weight type `{weights}`"))?;
            let dir = crate::fetch::model_dir();
            std::fs::create_dir_all(&dir)?;
            let path = dir.join(format!("random-{name}-{}.gguf", weights.to_lowercase()));
            if !path.exists() {
                eprintln!(
                    "generating a random-weight {name} model into {}",
                    path.display()
                );
                let partial = path.with_extension(format!("partial-{}", std::process::id()));
                // SmolLM2's file keeps its embedding in Q8_0 beside Q4_1 matrices; float
                // models keep every matrix in their one type.
                let embd = if linear == DType::Q4_1 {
                    DType::Q8_0
                } else {
                    linear
                };
                let types = Types { linear, embd };
                write_random_llama(&partial, shape, types, 1)?;
                std::fs::rename(&partial, &path)?;
            }
            Ok(path)
        }
    }
}
