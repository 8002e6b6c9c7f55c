//! `tern bench`: Tern's measurements, each printed beside the baseline it is compared with,
//! measured in the same run.

mod decode;
mod zero_copy;

use std::process::ExitCode;

#[derive(clap::Subcommand)]
pub enum BenchCommand {
    /// Zero-copy guest memory against the explicit-copy path, on each available device.
    ZeroCopy(zero_copy::ZeroCopyArgs),
    /// Prefill and decode speed of a model, directly and through a Wasm actor.
    Decode(decode::DecodeArgs),
}

pub fn bench(cmd: BenchCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        BenchCommand::ZeroCopy(args) => zero_copy::zero_copy(args),
        BenchCommand::Decode(args) => decode::decode(args),
    }
}

/// The median of `xs`.
fn median(xs: &[f64]) -> f64 {
    let mut sorted = xs.to_vec();
    sorted.sort_by(f64::total_cmp);
    zero_copy::percentile(&sorted, 0.5)
}
