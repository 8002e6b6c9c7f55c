//! [`Numerics`]: what decides the bits a forward pass computes. Two runs whose numerics are
//! equal, field by field, compute the same bits from the same weights and tokens, so a session
//! moved between them continues bit for bit; where a field differs, it continues validly but
//! later tokens may differ from an uninterrupted run.
//!
//! | field | CPU | CUDA | wgpu |
//! |---|---|---|---|
//! | `backend` | `cpu` | `cuda` | `wgpu` |
//! | `precision` | `fast` (int8 activations) or `reference` (f32) | `f32`, plus `bf16 prefill GEMMs` where cuBLAS is present | `f32`, with subgroup or shared-memory row reductions |
//! | `kernels` | [`CPU_KERNELS`] | the first 16 hex digits of the SHA-256 of the `.cu`/`.cuh` sources | the same of the WGSL sources |
//! | `architecture` | the target: `x86_64-linux-gnu` | the compute capability: `sm_90` | the API, adapter and driver |
//!
//! The CPU's SIMD path (portable, AVX2 or AVX-512) is not part of its architecture:
//! [`crate::fastdot`] and [`crate::quant`] give the same bits on every path (documented there
//! and tested on every path the CPU has), and [`crate::quant::exp`] is written out rather than
//! taken from libm. The target is, because the rotary embedding's `sin`/`cos` and its
//! frequencies' `powf` come from the platform's C library (its version is not recorded).
//!
//! The GPU kernel versions hash the kernel sources only: the Rust code that launches them
//! (grid shapes that set the order of a reduction), the NVRTC that compiles them (it may fuse
//! multiply-adds differently) and the cuBLAS of the prefill GEMMs also decide bits, and a
//! change to one of them does not show here.

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::llama::cpu::Precision;

/// The version of the CPU forward pass's arithmetic. Bump it with every change that can
/// change a bit of its results (an order of summation, a rounding, a new kernel whose bits
/// differ), so that snapshots taken before say they continue validly, not bitwise.
pub const CPU_KERNELS: u32 = 1;

/// What decides the bits of a forward pass (see the [module docs](self)).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Numerics {
    /// Where the forward pass runs: `cpu`, `cuda` or `wgpu`.
    pub backend: String,
    /// How it rounds: the precision of activations and of matrix products.
    pub precision: String,
    /// The version of the backend's kernels.
    pub kernels: String,
    /// The hardware or platform whose arithmetic the results depend on.
    pub architecture: String,
}

impl Numerics {
    /// The CPU forward pass at `precision`.
    pub fn cpu(precision: Precision) -> Numerics {
        let precision = precision.cpu_name();
        Numerics {
            backend: "cpu".into(),
            precision: precision.into(),
            kernels: CPU_KERNELS.to_string(),
            architecture: cpu_target(),
        }
    }

    /// The four fields by name, in order.
    pub fn fields(&self) -> [(&'static str, &str); 4] {
        [
            ("backend", &self.backend),
            ("precision", &self.precision),
            ("kernels", &self.kernels),
            ("architecture", &self.architecture),
        ]
    }

    /// Each field in which `to` differs from `self`, as `"<field> <self's> → <to's>"`
    /// (`"backend cpu → cuda"`); empty when the two compute the same bits.
    pub fn differences(&self, to: &Numerics) -> Vec<String> {
        self.fields()
            .into_iter()
            .zip(to.fields())
            .filter(|((_, a), (_, b))| a != b)
            .map(|((name, a), (_, b))| format!("{name} {} → {}", shown(a), shown(b)))
            .collect()
    }
}

impl fmt::Display for Numerics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}, kernels {}, on {}",
            self.backend, self.precision, self.kernels, self.architecture
        )
    }
}

/// A field's value for messages: `–` when empty.
fn shown(value: &str) -> &str {
    if value.is_empty() { "–" } else { value }
}

/// The compilation target, `<arch>-<os>[-<C library>]`: `x86_64-linux-gnu`.
fn cpu_target() -> String {
    let libc = if cfg!(target_env = "gnu") {
        "-gnu"
    } else if cfg!(target_env = "musl") {
        "-musl"
    } else if cfg!(target_env = "msvc") {
        "-msvc"
    } else {
        ""
    };
    format!("{}-{}{libc}", std::env::consts::ARCH, std::env::consts::OS)
}

/// The version of a set of GPU kernels: the first 16 hex digits of the SHA-256 of their
/// sources, each as its name's and its text's lengths (`u64`, little-endian) and bytes, in
/// the order given.
#[cfg_attr(not(any(feature = "cuda", feature = "wgpu")), allow(dead_code))]
pub(crate) fn kernel_hash<'a>(sources: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut hasher = Sha256::new();
    for (name, text) in sources {
        for part in [name, text] {
            hasher.update((part.len() as u64).to_le_bytes());
            hasher.update(part.as_bytes());
        }
    }
    let digest: [u8; 32] = hasher.finalize().into();
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_numerics_name_precision_and_target() {
        let fast = Numerics::cpu(Precision::Fast);
        assert_eq!(fast.backend, "cpu");
        assert_eq!(fast.precision, "fast");
        assert_eq!(fast.kernels, CPU_KERNELS.to_string());
        assert!(
            fast.architecture.starts_with(std::env::consts::ARCH),
            "{fast}"
        );
        assert_eq!(Numerics::cpu(Precision::Reference).precision, "reference");
        // The CPU computes `tensor` as `fast`: a snapshot taken at one continues bit for bit
        // at the other.
        assert!(
            Numerics::cpu(Precision::Tensor)
                .differences(&fast)
                .is_empty()
        );
    }

    #[test]
    fn differences_name_each_field() {
        let cpu = Numerics::cpu(Precision::Fast);
        assert!(cpu.differences(&cpu).is_empty());
        let gpu = Numerics {
            backend: "cuda".into(),
            architecture: String::new(),
            ..cpu.clone()
        };
        assert_eq!(
            gpu.differences(&cpu),
            [
                "backend cuda → cpu".to_string(),
                format!("architecture – → {}", cpu.architecture)
            ]
        );
    }

    #[test]
    fn kernel_hash_sees_every_byte_and_boundary() {
        let one = kernel_hash([("a.cu", "x"), ("b.cu", "y")]);
        assert_eq!(one.len(), 16);
        assert!(one.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(one, kernel_hash([("a.cu", "x"), ("b.cu", "y")]));
        assert_ne!(one, kernel_hash([("a.cu", "x"), ("b.cu", "z")]));
        assert_ne!(one, kernel_hash([("a.cu", "xb"), (".cu", "y")]));
    }
}
