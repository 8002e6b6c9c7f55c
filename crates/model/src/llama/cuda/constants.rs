//! `kernels/constants.cuh`: the numbers the host and the CUDA kernels share (the attention
//! split, the threads of an attention item and of the persistent decode block, the top-k
//! chunking, the tensor-core products' tokens and stages), written from the Rust constants,
//! which are their only definition.
//!
//! The programs are compiled with the text [`header`] writes. The copy in `kernels/` exists
//! so that a kernel file also compiles on its own (the compute crate's compile test, editors);
//! a test checks it against that text, and `BLESS=1` rewrites it.

use std::sync::LazyLock;

use super::kernels::{
    MMA_CHUNKS, MMA_MAX_TOKENS, MMA_OPERANDS, MMA_RING_CHUNKS, MMA_RING_STAGES, MMA_ROWS,
    MMA_SPLIT_COLS, MMA_WG16_STAGES, MMA_WG32_STAGES, TOP_CHUNK, TOP_MAX_LISTS,
};

/// `constants.cuh` as the kernels include it: (name, text).
pub(super) fn header() -> (&'static str, &'static str) {
    static TEXT: LazyLock<String> = LazyLock::new(text);
    ("constants.cuh", TEXT.as_str())
}

/// The header's text: one `#define` per shared number.
fn text() -> String {
    let defines = [
        // Positions of one attention split; threads of one attention item; the most new
        // positions one attention call takes (a chunk).
        ("ATTN_SPLIT", super::ATTN_SPLIT),
        ("ATTN_THREADS", super::ATTN_THREADS as usize),
        ("ATTN_MAX_NEW", super::MAX_CHUNK),
        // The most query heads of a KV group that one block of attention_one_ takes.
        ("ATTN_GROUP_MAX", super::ATTN_GROUP_MAX),
        // Threads of one block of decode.cu's persistent kernel.
        ("DECODE_THREADS", super::fused::DECODE_THREADS as usize),
        // Logits one top_k_blocks block sorts; the most candidates; the most lists merged.
        ("TOP_CHUNK", TOP_CHUNK),
        ("TOP_MAX", crate::top::MAX_TOP),
        ("TOP_MAX_LISTS", TOP_MAX_LISTS),
        // Most tokens of one tensor-core product launch; mma_ring's chunks a stage, and its
        // stages (for 64 tokens, 16 and 32).
        ("MMA_MAX_TOKENS", MMA_MAX_TOKENS as usize),
        ("MMA_RING_CHUNKS", MMA_RING_CHUNKS as usize),
        ("MMA_RING_STAGES", MMA_RING_STAGES as usize),
        ("MMA_WG16_STAGES", MMA_WG16_STAGES as usize),
        ("MMA_WG32_STAGES", MMA_WG32_STAGES as usize),
        // mma_split's layouts of the split activations.
        ("MMA_ROWS", MMA_ROWS as usize),
        ("MMA_CHUNKS", MMA_CHUNKS as usize),
        ("MMA_OPERANDS", MMA_OPERANDS as usize),
        // Columns of one block of mma_split.
        ("MMA_SPLIT_COLS", MMA_SPLIT_COLS as usize),
    ];
    let mut text = String::from(
        "// The numbers the host and these kernels share, written by the host from its Rust\n\
         // constants (crates/model/src/llama/cuda/constants.rs), their only definition. Do not\n\
         // edit: change the constant and run\n\
         // `BLESS=1 cargo test -p tern-model --lib constants_cuh`.\n\n\
         #ifndef TERN_CONSTANTS_CUH\n#define TERN_CONSTANTS_CUH\n\n",
    );
    for (name, value) in defines {
        text.push_str(&format!("#define {name} {value}\n"));
    }
    text.push_str("\n#endif\n");
    text
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    #[test]
    fn constants_cuh_is_written_from_the_host() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("src/llama/cuda/kernels/constants.cuh");
        let (_, text) = super::header();
        if std::env::var_os("BLESS").is_some_and(|v| v == "1") {
            std::fs::write(&path, text).expect("writing constants.cuh");
        }
        let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            on_disk == text,
            "{} differs from the host's constants: run `BLESS=1 cargo test -p tern-model --lib constants_cuh`",
            path.display()
        );
        assert!(text.contains(&format!(
            "#define ATTN_SPLIT {}\n",
            super::super::ATTN_SPLIT
        )));
    }
}
