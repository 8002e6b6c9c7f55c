//! `tern generate`: random-weight models of real shapes, for benchmarks and for moving
//! snapshots between machines that cannot download the real model. The generator is seeded,
//! so every machine writes the same file (the same weights digest).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, bail};
use tern_model::generate::{SHAPES, Types, shape as find_shape, write_random_llama};
use tern_model::quant::DType;

#[derive(clap::Args)]
pub struct GenerateArgs {
    /// The shape: `tiny`, `small`, `smollm2-135m`, `llama-3.2-1b`.
    #[arg(long)]
    shape: String,
    /// Weight type of the matrices: `q4_1` (with a Q8_0 embedding, as SmolLM2's file has),
    /// `q8_0`, `q4_0`, `q4_k`, `q6_k`, `f16`, `bf16`, `f32`.
    #[arg(long, default_value = "q4_1")]
    weights: String,
}

pub fn generate(args: GenerateArgs) -> anyhow::Result<ExitCode> {
    println!("{}", generated_model(&args.shape, &args.weights)?.display());
    Ok(ExitCode::SUCCESS)
}

/// The model cache's random-weight model of `shape` with `weights` matrices, written on
/// first use.
pub fn generated_model(name: &str, weights: &str) -> anyhow::Result<PathBuf> {
    let shape = find_shape(name).ok_or_else(|| {
        let names: Vec<_> = SHAPES.iter().map(|s| s.name).collect();
        anyhow!("unknown shape `{name}` (known: {})", names.join(", "))
    })?;
    let Some(linear) = DType::ALL
        .into_iter()
        .find(|t| t.to_string().eq_ignore_ascii_case(weights))
    else {
        bail!("unknown weight type `{weights}`");
    };
    let dir = crate::fetch::model_dir();
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("random-{name}-{}.gguf", weights.to_lowercase()));
    if !path.exists() {
        eprintln!(
            "generating a random-weight {name} model into {}",
            path.display()
        );
        let partial = path.with_extension(format!("partial-{}", std::process::id()));
        let embd = if linear == DType::Q4_1 {
            DType::Q8_0
        } else {
            linear
        };
        write_random_llama(&partial, shape, Types { linear, embd }, 1)?;
        std::fs::rename(&partial, &path)?;
    }
    Ok(path)
}
