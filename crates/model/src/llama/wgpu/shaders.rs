//! The forward pass's WGSL kernels, composed from the real files in `kernels/`.
//!
//! WGSL has no includes, so a module that reads weights is the concatenation of its parts:
//! a row reduction (`reduce_shared.wgsl`, or `reduce_subgroup.wgsl` on adapters whose
//! subgroups hold at most 32 invocations), the block reader `blocks.wgsl`, the dequantizer of the matrix's
//! type (`dequant_*.wgsl`), and the kernel with its row choice and stores
//! (`matvec_rows.wgsl`); 16-bit float matrices take `matvec_wide.wgsl` with their
//! `widen_*.wgsl` instead. [`all`] lists every module the backend can build,
//! so the tests validate each with naga and translate it to Metal's language.
//!
//! The numbers host and kernels share are defined once, in Rust, and written into the
//! modules here: `MAX_TOK` (the tokens one call takes; [`MAX_CHUNK`], or 1 for a decode
//! step's matrix kernels) and `SPLIT` (the positions of one attention split, `ATTN_SPLIT`).

use super::{ATTN_SPLIT, MAX_CHUNK};
use crate::quant::DType;

// attn_split.wgsl scores a split's positions with two of its 128 invocations each, and keeps
// the call's keys and values (2 * MAX_TOK * 128 floats) in workgroup memory, which WebGPU
// guarantees only 16 KiB of.
const _: () = assert!(ATTN_SPLIT >= 1 && ATTN_SPLIT <= 64);
const _: () = assert!(MAX_CHUNK >= 1 && MAX_CHUNK <= 8);

const BLOCKS: &str = include_str!("kernels/blocks.wgsl");
const REDUCE_SHARED: &str = include_str!("kernels/reduce_shared.wgsl");
const REDUCE_SUBGROUP: &str = include_str!("kernels/reduce_subgroup.wgsl");
const MATVEC: &str = include_str!("kernels/matvec.wgsl");
const MATVEC_WIDE: &str = include_str!("kernels/matvec_wide.wgsl");
const MATVEC_ROWS: &str = include_str!("kernels/matvec_rows.wgsl");
const GET_ROWS: &str = include_str!("kernels/get_rows.wgsl");

const WG_REDUCE: &str = include_str!("kernels/wg_reduce.wgsl");

/// The kernels that read no weights: (entry point, file).
pub const PLAIN: [(&str, &str); 4] = [
    ("rmsnorm", include_str!("kernels/rmsnorm.wgsl")),
    ("attn_split", ATTN_SPLIT_WGSL),
    ("attn_merge", include_str!("kernels/attn_merge.wgsl")),
    ("swiglu", include_str!("kernels/swiglu.wgsl")),
];

const ATTN_SPLIT_WGSL: &str = include_str!("kernels/attn_split.wgsl");
/// The KV cache's bindings and accessors for `attn_split`: f32 values, or f16 ones.
const KV_F32: &str = include_str!("kernels/kv_f32.wgsl");
pub(super) const KV_F16: &str = include_str!("kernels/kv_f16.wgsl");

/// The module of `PLAIN` kernel `entry`: its file, after the shared constants and the
/// workgroup reductions for the attention's two (and, for `attn_split`, an f32 cache's
/// accessors: [`attn_split`] for either cache).
pub fn plain(entry: &str) -> Option<String> {
    if entry == "attn_split" {
        return Some(attn_split(false));
    }
    let (_, src) = PLAIN.iter().find(|(e, _)| *e == entry)?;
    Some(if entry.starts_with("attn_") {
        [&attn_constants(), WG_REDUCE, src].join("\n")
    } else {
        src.to_string()
    })
}

/// The attention's splits over a cache of f16 values (`kv_f16`) or of f32 ones.
pub fn attn_split(kv_f16: bool) -> String {
    let kv = if kv_f16 { KV_F16 } else { KV_F32 };
    [&attn_constants(), WG_REDUCE, kv, ATTN_SPLIT_WGSL].join("\n")
}

fn attn_constants() -> String {
    format!("const SPLIT: u32 = {ATTN_SPLIT}u;\nconst MAX_TOK: u32 = {MAX_CHUNK}u;")
}

/// How the 32 lanes of a matrix row are summed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reduce {
    /// A fixed tree through workgroup memory: every adapter.
    Shared,
    /// Subgroup reductions: adapters whose subgroups hold at most 32 invocations.
    Subgroup,
}

/// The dequantizer of `dtype`.
fn dequant(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => include_str!("kernels/dequant_f32.wgsl"),
        DType::F16 => include_str!("kernels/dequant_f16.wgsl"),
        DType::BF16 => include_str!("kernels/dequant_bf16.wgsl"),
        DType::Q8_0 => include_str!("kernels/dequant_q8_0.wgsl"),
        DType::Q4_0 => include_str!("kernels/dequant_q4_0.wgsl"),
        DType::Q4_1 => include_str!("kernels/dequant_q4_1.wgsl"),
        DType::Q4_K => include_str!("kernels/dequant_q4_k.wgsl"),
        DType::Q6_K => include_str!("kernels/dequant_q6_k.wgsl"),
    }
}

/// Whether `matvec` reads `dtype` with `matvec_wide.wgsl` (16-byte words of 8 weights) rather
/// than chunk by chunk of 32 with `matvec.wgsl`.
pub fn is_wide(dtype: DType) -> bool {
    matches!(dtype, DType::F16 | DType::BF16)
}

/// The token capacities `matvec` is built for: one (a decode step) and a chunk.
pub const MATVEC_TOKENS: [u32; 2] = [1, MAX_CHUNK as u32];

/// `matvec` for weights of `dtype` and calls of at most `max_tok` tokens (entry point
/// `matvec`): 16-byte loads of 16-bit floats for F16 and BF16, block by block for the rest.
pub fn matvec(dtype: DType, reduce: Reduce, max_tok: u32) -> String {
    let reduce = match reduce {
        Reduce::Shared => REDUCE_SHARED,
        Reduce::Subgroup => REDUCE_SUBGROUP,
    };
    let kernel = if is_wide(dtype) {
        let widen = if dtype == DType::BF16 {
            include_str!("kernels/widen_bf16.wgsl")
        } else {
            include_str!("kernels/widen_f16.wgsl")
        };
        vec![reduce, widen, MATVEC_WIDE]
    } else {
        vec![reduce, BLOCKS, dequant(dtype), MATVEC]
    };
    let capacity = format!("const MAX_TOK: u32 = {max_tok}u;");
    [&[capacity.as_str()], kernel.as_slice(), &[MATVEC_ROWS]]
        .concat()
        .join("\n")
}

/// `get_rows` for an embedding matrix of `dtype` (entry point `get_rows`).
pub fn get_rows(dtype: DType) -> String {
    [BLOCKS, dequant(dtype), GET_ROWS].join("\n")
}

/// Every module the backend builds: (name, entry point, source).
pub fn all() -> Vec<(String, &'static str, String)> {
    let mut out = Vec::new();
    for dtype in DType::ALL {
        for (reduce, tag) in [(Reduce::Shared, "shared"), (Reduce::Subgroup, "subgroup")] {
            for max_tok in MATVEC_TOKENS {
                out.push((
                    format!("matvec_{}_{tag}_{max_tok}", dtype.name()),
                    "matvec",
                    matvec(dtype, reduce, max_tok),
                ));
            }
        }
        out.push((
            format!("get_rows_{}", dtype.name()),
            "get_rows",
            get_rows(dtype),
        ));
    }
    out.push(("attn_split_f16".into(), "attn_split", attn_split(true)));
    for (entry, _) in PLAIN {
        let src = plain(entry).expect("every plain kernel has a module");
        out.push((entry.to_string(), entry, src));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_constants_come_from_the_host_only() {
        let files = PLAIN
            .iter()
            .map(|(_, src)| *src)
            .chain([MATVEC_ROWS, MATVEC]);
        for src in files {
            assert!(!src.contains("const SPLIT") && !src.contains("const MAX_TOK"));
        }
        for entry in ["attn_split", "attn_merge"] {
            let module = plain(entry).unwrap();
            assert!(module.contains(&format!("const SPLIT: u32 = {ATTN_SPLIT}u;")));
            assert!(module.contains(&format!("const MAX_TOK: u32 = {MAX_CHUNK}u;")));
        }
        let chunk = matvec(DType::Q8_0, Reduce::Shared, MAX_CHUNK as u32);
        assert!(chunk.contains(&format!("const MAX_TOK: u32 = {MAX_CHUNK}u;")));
    }
}
