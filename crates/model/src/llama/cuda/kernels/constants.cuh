// The numbers the host and these kernels share, written by the host from its Rust
// constants (crates/model/src/llama/cuda/constants.rs), their only definition. Do not
// edit: change the constant and run
// `BLESS=1 cargo test -p tern-model --lib constants_cuh`.

#ifndef TERN_CONSTANTS_CUH
#define TERN_CONSTANTS_CUH

#define ATTN_SPLIT 64
#define ATTN_THREADS 128
#define ATTN_MAX_NEW 8
#define ATTN_GROUP_MAX 8
#define DECODE_THREADS 512
#define TOP_CHUNK 1024
#define TOP_MAX 64
#define TOP_MAX_LISTS 1024
#define MMA_MAX_TOKENS 64
#define MMA_RING_CHUNKS 2
#define MMA_RING_STAGES 3
#define MMA_WG16_STAGES 5
#define MMA_WG32_STAGES 4
#define MMA_ROWS 0
#define MMA_CHUNKS 1
#define MMA_OPERANDS 2
#define MMA_SPLIT_COLS 2048

#endif
