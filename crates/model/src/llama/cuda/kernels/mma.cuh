// BF16 weight-matrix products on tensor cores, with one arithmetic for every number of tokens
// (a lone decode step's one, a batched step's many, a prefill chunk's), so that a token's
// result never depends on the tokens beside it. Device code for mma.cu's kernels:
//
//   mma_tile      the matrix's rows stored again as tiles (below), once at load
//   mma_split     x as bf16 hi + lo (and the RMSNorm scale of each token), for mma_many
//                 and mma_ring
//   mma_one       y = W x for one token
//   mma_many      y = W x for 2 to 32 tokens, x split by mma_split
//   mma_ring      the same for 33 to 64 tokens through a deeper pipeline, on Hopper (sm_90a)
//                 by warpgroup mmas (wgmma), with the same bits; there also for 9 to 16
//                 and 17 to 32 tokens, by warpgroup mmas of 16 or 32 tokens
//
// both products with matvec's fusions (matvec.cuh): the RMSNorm before the product (its scale
// applied to the sum), a residual, the next norm's input y * g, and the interleaved gate/up
// rows' silu(gate) * up. mma_many and mma_ring may also write the next product's input (y * g,
// or gate/up's output) split as mma_split would, so that no mma_split runs before that product,
// which then takes its norm's scales itself (mma_scale_take).
//
// Arithmetic. Each activation is split into hi = bf16(x) and lo = bf16(x - hi), so that
// every product of a bf16 weight with hi and with lo is exact in f32 and hi + lo holds x to
// 16 bits of mantissa. A warp takes a tile of 16 rows (the A operand of mma.m16n8k16) and one
// of P parts of the columns; the tokens are the B operand, 8 to an n8 tile. For each 32-column
// chunk of its part, in column order, the warp issues four mmas into each token's f32 sum:
// columns 8t..8t+3 and 8t+16..8t+19 of lane quad t's hi, then the same with lo, then the
// other 16 columns' hi and lo. A tile's P parts are summed in part order from zero. P is fixed
// by the matrix's shape (mma_parts on the host), never by the tokens, and the sums per token
// are the same mmas in the same order whether one token or 64 share the call (mma_one stages
// token 0 in shared memory, mma_many and mma_ring all tokens of a stage; their fragments hold
// the same values). The norm's scale is the same warp sum (matvec.cuh's rms_scale) either way.
//
// Tiled weights (groups of 8 tiles, chunk by chunk): the 1 KiB of tile t's chunk c is at
// ((t / 8) * chunks + c) * 8 + t % 8 KiB (chunks = cols / 32); its first 512 bytes are rows
// 0-7, the next rows 8-15, lane l's 16 bytes at 16 l: row l / 4 (+ 8), columns 8 (l % 4) ..
// 8 (l % 4) + 7 of the chunk, so that a warp's weight load reads 512 contiguous bytes and the 8
// tiles of a block one 8 KiB run a chunk (and a part's chunks one run). rows must be a
// multiple of 128, cols of 256.
//
// Geometry: blockDim 256 for all. mma_tile: any grid. mma_split: gridDim (n, cols /
// MMA_SPLIT_COLS rounded up, plus 1), dynamic shared memory 0. mma_one: 8 warps take one
// tile's parts (P >= 8; a warp takes parts w and w + 8 where P = 16) or 8 / P tiles' parts;
// gridDim ceil(tiles / tiles a block), dynamic shared memory 4 * cols bytes. mma_many: a
// block's 8 warps take 8 tiles of one part; gridDim (tiles / 8) * P, dynamic shared memory
// mma_many_smem(NT) bytes. mma_ring: as mma_many, its weights and activations streamed into a
// ring of stages in shared memory; dynamic shared memory R (SC (8192 + 128 N) + 8) bytes
// for R stages of SC chunks for N tokens (more than 48 KiB: the host raises the kernels'
// limits).

#ifndef TERN_MMA_CUH
#define TERN_MMA_CUH

#include "common.cuh"
#include "matvec.cuh"

// Bytes of each warp's first weights prefetched into L2 before the wait.
#define MMA_PREFETCH 8192
// Chunks in flight a warp in mma_one.
#define MMA_ONE_CHUNKS 4
// MMA_MAX_TOKENS (constants.cuh): the most tokens one mma_many or mma_ring call takes.

__device__ __forceinline__ void mma_bf16(float* c, unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0,
                                         unsigned b1)
{
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// 16 bytes of weights, past L1 (each is read once).
__device__ __forceinline__ uint4 mma_ldw(const void* p)
{
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

// Byte offset of tile t's chunk c (see the layout above).
__device__ __forceinline__ unsigned long long mma_at(unsigned t, unsigned c, unsigned chunks)
{
    return (((unsigned long long)(t >> 3) * chunks + c) * 8 + (t & 7)) * 1024;
}

// The four mmas of one chunk into one token tile's sum (a, b: rows g and g + 8's 16 bytes;
// bh, bl: the token's hi and lo 16 bytes).
__device__ __forceinline__ void mma_chunk(float* c, uint4 a, uint4 b, uint4 bh, uint4 bl)
{
    mma_bf16(c, a.x, b.x, a.y, b.y, bh.x, bh.y);
    mma_bf16(c, a.x, b.x, a.y, b.y, bl.x, bl.y);
    mma_bf16(c, a.z, b.z, a.w, b.w, bh.z, bh.w);
    mma_bf16(c, a.z, b.z, a.w, b.w, bl.z, bl.w);
}

// mma_chunk's four mmas into G n8 token tiles' sums, interleaved (each sum keeps its order).
template <int G>
__device__ __forceinline__ void mma_chunk_tiles(float (*c)[4], uint4 a, uint4 b, const uint4 (&bh)[G],
                                                const uint4 (&bl)[G])
{
#pragma unroll
    for (int j = 0; j < G; ++j) {
        mma_bf16(c[j], a.x, b.x, a.y, b.y, bh[j].x, bh[j].y);
    }
#pragma unroll
    for (int j = 0; j < G; ++j) {
        mma_bf16(c[j], a.x, b.x, a.y, b.y, bl[j].x, bl[j].y);
    }
#pragma unroll
    for (int j = 0; j < G; ++j) {
        mma_bf16(c[j], a.z, b.z, a.w, b.w, bh[j].z, bh[j].w);
    }
#pragma unroll
    for (int j = 0; j < G; ++j) {
        mma_bf16(c[j], a.z, b.z, a.w, b.w, bl[j].z, bl[j].w);
    }
}

// ---------------------------------------------------------------------------------------
// Tiles and the split
// ---------------------------------------------------------------------------------------

__device__ __forceinline__ void mma_tile(const unsigned char* __restrict__ src, unsigned char* __restrict__ dst,
                                         unsigned rows, unsigned cols)
{
    const unsigned chunks = cols / 32;
    const unsigned long long pieces = (unsigned long long)rows / 16 * chunks * 64;  // 16 bytes each
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < pieces;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        const unsigned lane = i % 32, h = (i / 32) % 2;
        const unsigned long long chunk = i / 64;
        const unsigned tile = (unsigned)(chunk / chunks), c = (unsigned)(chunk % chunks);
        const unsigned long long row = tile * 16ull + (lane >> 2) + 8 * h;
        *(uint4*)(dst + mma_at(tile, c, chunks) + h * 512 + 16 * lane) =
            *(const uint4*)(src + row * cols * 2 + c * 64 + 16 * (lane & 3));
    }
}

// How mma_split lays out the split activations (constants.cuh): MMA_ROWS for mma_many,
// MMA_CHUNKS for mma_ring's fragment reads, MMA_OPERANDS for its warpgroup mmas.

// Block (t, s) of (T, S + 1) = gridDim: token t's x (row t of x_stride floats) split into hi
// and lo words, columns MMA_SPLIT_COLS s onwards (constants.cuh; S = cols / MMA_SPLIT_COLS
// rounded up), 8 a thread, all loaded before the first is split; block (t, S): with norm_x, scale[t] =
// rms_scale of norm_x's row t (matvec.cuh's warp sum, its loads in flight 16 at a time).
// MMA_ROWS: hi and lo rows of cols / 2 words. The others chunk by chunk as mma_ring's stages
// read them, into hi alone:
// - MMA_CHUNKS: the 128 bytes of token t's chunk c (its 32 columns' hi, then their lo; for an
//   odd t lo first, so that a warp's fragment reads of tokens 2i and 2i + 1 fall on distinct
//   banks) at byte (c T + t) 128.
// - MMA_OPERANDS + k: for warpgroup mmas of W = MMA_MAX_TOKENS >> k tokens (common.cuh's
//   operand_tokens; 64, 32 or 16), chunk c's 128 W bytes at
//   byte 128 W c, as four B operands (32 W bytes each: the chunk's first 16 columns' hi, their
//   lo, the other 16's hi, their lo, mma_chunk's order), each W / 8 core matrices of 8 tokens
//   (256 bytes apart) by two halves of its 16 columns (128 bytes apart), a token's 8 columns
//   of a half at 16 (t % 8). The columns take the places
//   mma_chunk's fragments give them: of lane quad q's columns 8q .. 8q + 7, the pairs 8q and
//   8q + 2 go to the first operand's halves, 8q + 4 and 8q + 6 to the third's, at word q of the
//   token's 16 bytes. Tokens T to W - 1 are left as they are.
__device__ __forceinline__ void mma_split(const float* __restrict__ x, unsigned x_stride, unsigned cols,
                                          const float* __restrict__ norm_x, float eps, unsigned* __restrict__ hi,
                                          unsigned* __restrict__ lo, float* __restrict__ scale, unsigned layout)
{
    pdl_wait();
    pdl_launch_dependents();
    const unsigned t = blockIdx.x, T = gridDim.x, first = (t & 1) * 16;
    if (blockIdx.y == gridDim.y - 1) {
        if (norm_x && threadIdx.x < 32) {
            const float s = rms_scale<true, 16>(norm_x + (unsigned long long)t * x_stride, cols, eps, threadIdx.x);
            if (threadIdx.x == 0) {
                scale[t] = s;
            }
        }
        return;
    }
    // The thread's 8 columns: pairs j0 .. j0 + 3.
    const unsigned c0 = blockIdx.y * MMA_SPLIT_COLS + 8 * threadIdx.x, j0 = c0 / 2;
    if (c0 >= cols) {
        return;
    }
    const float* xt = x + (unsigned long long)t * x_stride + c0;
    float v[8];
    if ((unsigned long long)xt % 16 == 0) {
        const float4 a = *(const float4*)xt, b = *(const float4*)(xt + 4);
        v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
    } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            v[i] = xt[i];
        }
    }
    unsigned h[4], l[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        mma_split_pair(v[2 * i], v[2 * i + 1], h[i], l[i]);
    }
    if (layout >= MMA_OPERANDS) {
        // Pair r of the thread's four is pair r of lane quad q: step r / 2's operand, half r % 2.
        const unsigned W = operand_tokens(layout);
        const unsigned q = (j0 % 16) / 4;
        unsigned char* base =
            (unsigned char*)hi + (unsigned long long)(j0 / 16) * 128 * W + (t / 8) * 256 + (t % 8) * 16 + q * 4;
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            unsigned char* op = base + (r / 2) * 64 * W + (r % 2) * 128;
            *(unsigned*)op = h[r];
            *(unsigned*)(op + 32 * W) = l[r];
        }
    } else if (layout == MMA_CHUNKS) {
        unsigned* row = hi + ((unsigned long long)(j0 / 16) * T + t) * 32;
        *(uint4*)(row + first + j0 % 16) = make_uint4(h[0], h[1], h[2], h[3]);
        *(uint4*)(row + (first ^ 16) + j0 % 16) = make_uint4(l[0], l[1], l[2], l[3]);
    } else {
        *(uint4*)(hi + (unsigned long long)t * cols / 2 + j0) = make_uint4(h[0], h[1], h[2], h[3]);
        *(uint4*)(lo + (unsigned long long)t * cols / 2 + j0) = make_uint4(l[0], l[1], l[2], l[3]);
    }
}

// ---------------------------------------------------------------------------------------
// The epilogue: one finished sum (or a gate/up pair) as matvec writes it
// ---------------------------------------------------------------------------------------

// Where the fusions point; null where a fusion is off.
struct MmaOut {
    float* y;
    unsigned y_stride;
    const float* residual;  // may be y
    const float* g;         // the next norm's weights: yg = y * g
    float* yg;
    bool norm;  // multiply by the token's norm scale
    bool glu;
    // Where the next product's input (yg where the next norm is fused, else y) goes split as
    // mma_split would split it (common.cuh; nowhere where split.hi is null).
    SplitOut split;
};

// An output from its sum: scaled by the token's norm scale where the norm is fused, added to
// the residual's value (0 without one).
__device__ __forceinline__ float mma_out(bool norm, float total, float scale, float residual)
{
    if (norm) {
        total *= scale;
    }
    return residual + total;
}

// Row r's sum for token t; returns the next product's input there (yg, or y without g).
__device__ __forceinline__ float mma_emit(const MmaOut& o, float total, float scale, unsigned t, unsigned r)
{
    const unsigned long long i = (unsigned long long)t * o.y_stride + r;
    const float v = mma_out(o.norm, total, scale, o.residual ? o.residual[i] : 0.0f);
    o.y[i] = v;
    if (o.g) {
        const float n = v * o.g[r];
        o.yg[i] = n;
        return n;
    }
    return v;
}

// Gate/up pair q (0-7) of tile `tile` for token t: silu(gate) * up into output 8 tile + q.
__device__ __forceinline__ float mma_emit_glu(const MmaOut& o, float gate, float up, float scale, unsigned t,
                                              unsigned tile, unsigned q)
{
    if (o.norm) {
        gate *= scale;
        up *= scale;
    }
    const float v = gate / (1.0f + expf(-gate)) * up;
    o.y[(unsigned long long)t * o.y_stride + 8 * tile + q] = v;
    return v;
}

// Outputs 2j .. 2j + 3 of token t as the next product's split input (with o.split.hi).
__device__ __forceinline__ void mma_split_out(const MmaOut& o, unsigned T, unsigned t, unsigned j, float a, float b,
                                              float c, float d)
{
    if (o.split.hi) {
        split_put(o.split, T, t, j, a, b);
        split_put(o.split, T, t, j + 1, c, d);
    }
}

// Local rows (0-15) of a tile's gate/up pair q: rows 0-3 gate and 4-7 up of outputs 0-3,
// rows 8-11 and 12-15 of outputs 4-7.
__device__ __forceinline__ unsigned mma_gate_row(unsigned q)
{
    return (q / 4) * 8 + q % 4;
}

// ---------------------------------------------------------------------------------------
// mma_one: one token
// ---------------------------------------------------------------------------------------

// Token 0 split into hi and lo words (mma_split_pair) in shared memory by the block's 256
// threads: 8 float4s of x a thread in flight at once (one batch up to 8,192 columns), all
// issued before the first is split.
__device__ __forceinline__ void mma_one_stage(const float* __restrict__ x, unsigned cols, unsigned* hi, unsigned* lo)
{
    if ((unsigned long long)x % 16 != 0) {
        for (unsigned j = threadIdx.x; j < cols / 2; j += blockDim.x) {
            mma_split_pair(x[2 * j], x[2 * j + 1], hi[j], lo[j]);
        }
        return;
    }
    const unsigned quads = cols / 4;
    for (unsigned base = threadIdx.x; base < quads; base += 8 * 256) {
        float4 v[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const unsigned q = base + 256 * i;
            v[i] = q < quads ? *(const float4*)(x + 4 * q) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        }
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const unsigned q = base + 256 * i;
            if (q < quads) {
                unsigned h0, l0, h1, l1;
                mma_split_pair(v[i].x, v[i].y, h0, l0);
                mma_split_pair(v[i].z, v[i].w, h1, l1);
                *(uint2*)(hi + 2 * q) = make_uint2(h0, h1);
                *(uint2*)(lo + 2 * q) = make_uint2(l0, l1);
            }
        }
    }
}

template <int U>
__device__ __forceinline__ void mma_one(const unsigned char* __restrict__ w, const float* __restrict__ x,
                                        unsigned rows, unsigned cols, unsigned P, const float* __restrict__ norm_x,
                                        float eps, MmaOut o)
{
    extern __shared__ __align__(16) unsigned char xs[];  // token 0's hi (2 cols bytes), then its lo
    __shared__ float s_part[16][16];                    // [part, or warp where P < 8][row of the tile]
    __shared__ float s_scale;
    const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const unsigned tiles = rows / 16, chunks_all = cols / 32;
    const unsigned per_block = P >= 8 ? 1 : 8 / P;  // row tiles a block
    const unsigned my_parts = P >= 8 ? P / 8 : 1;   // parts a warp (P <= 16)
    const unsigned tile = blockIdx.x * per_block + (P >= 8 ? 0 : warp / P);
    const bool mine = tile < tiles;
    const unsigned chunks = chunks_all / P;  // a part's
    const unsigned char* s_hi = xs;
    const unsigned char* s_lo = xs + 2 * cols;
    auto part_of = [&](unsigned i) { return P >= 8 ? warp + 8 * i : warp % P; };
    auto chunk_at = [&](unsigned i, unsigned k) {
        return w + mma_at(mine ? tile : 0, part_of(i) * chunks + k, chunks_all) + 16 * lane;
    };
    float acc[2][4] = {};
    uint4 wa[U][2], wb[U][2];
    auto load = [&](uint4 (&v)[U][2], unsigned i, unsigned k) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const bool ok = mine && k + u < chunks;
            const unsigned char* p = chunk_at(i, ok ? k + u : 0);
            v[u][0] = ok ? mma_ldw(p) : make_uint4(0, 0, 0, 0);
            v[u][1] = ok ? mma_ldw(p + 512) : make_uint4(0, 0, 0, 0);
        }
    };
    auto sum = [&](float (&c)[4], const uint4 (&v)[U][2], unsigned i, unsigned k) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
            if (k + u >= chunks) {
                break;
            }
            const unsigned col = (part_of(i) * chunks + k + u) * 32 + 8 * t;
            uint4 bh = make_uint4(0, 0, 0, 0), bl = make_uint4(0, 0, 0, 0);
            if (g == 0) {
                bh = *(const uint4*)(s_hi + 2 * col);
                bl = *(const uint4*)(s_lo + 2 * col);
            }
            mma_chunk(c, v[u][0], v[u][1], bh, bl);
        }
    };
    if (mine) {
        const unsigned lines = (chunks * 1024 < MMA_PREFETCH ? chunks * 1024 : MMA_PREFETCH) / 128;
        for (unsigned i = lane; i < lines; i += 32) {
            asm volatile("prefetch.global.L2 [%0];" ::"l"(chunk_at(0, i / 8) - 16 * lane + 128 * (i % 8)));
        }
    }
    // The first part's first 2U chunks are on their way while the kernel waits.
    load(wa, 0, 0);
    load(wb, 0, U);
    pdl_wait();
    pdl_launch_dependents();
    mma_one_stage(x, cols, (unsigned*)xs, (unsigned*)(xs + 2 * cols));
    __syncthreads();
    // The norm's scale, needed by the outputs alone: warp 0 takes it while its first weights
    // are still on their way and the other warps start their sums.
    if (norm_x && warp == 0) {
        const float s = rms_scale<true>(norm_x, cols, eps, lane);
        if (lane == 0) {
            s_scale = s;
        }
    }
#pragma unroll
    for (unsigned i = 0; i < 2; ++i) {
        if (i >= my_parts) {
            break;
        }
        if (i > 0) {
            load(wa, i, 0);
        }
        for (unsigned k = 0; k < chunks; k += 2 * U) {
            if (i > 0 || k > 0) {
                load(wb, i, k + U);
            }
            sum(acc[i], wa, i, k);
            load(wa, i, k + 2 * U);
            sum(acc[i], wb, i, k + U);
        }
    }
    // Token 0 of rows g and g + 8 is c[0] and c[2] of the lanes with t = 0.
#pragma unroll
    for (unsigned i = 0; i < 2; ++i) {
        if (i >= my_parts) {
            break;
        }
        const unsigned slot = P >= 8 ? part_of(i) : warp;
        if (t == 0) {
            s_part[slot][g] = acc[i][0];
            s_part[slot][g + 8] = acc[i][2];
        }
    }
    __syncthreads();
    const float scale = o.norm ? s_scale : 1.0f;
    auto total = [&](unsigned tb, unsigned r) {
        float v = 0.0f;
        for (unsigned p = 0; p < P; ++p) {
            v += s_part[P >= 8 ? p : tb * P + p][r];
        }
        return v;
    };
    if (o.glu) {
        if (threadIdx.x >= 8 * per_block) {
            return;
        }
        const unsigned tb = threadIdx.x / 8, q = threadIdx.x % 8, out_tile = blockIdx.x * per_block + tb;
        if (out_tile < tiles) {
            const unsigned r = mma_gate_row(q);
            mma_emit_glu(o, total(tb, r), total(tb, r + 4), scale, 0, out_tile, q);
        }
        return;
    }
    if (threadIdx.x >= 16 * per_block) {
        return;
    }
    const unsigned tb = threadIdx.x / 16, r = threadIdx.x % 16, out_tile = blockIdx.x * per_block + tb;
    if (out_tile < tiles) {
        mma_emit(o, total(tb, r), scale, 0, out_tile * 16 + r);
    }
}

// ---------------------------------------------------------------------------------------
// mma_many: 2 to 32 tokens
// ---------------------------------------------------------------------------------------

// Chunks a stage of activations (and weights in flight a warp).
template <int NT>
__host__ __device__ constexpr int mma_stage_chunks()
{
    return NT >= 4 ? 2 : 4;
}

// A token's row of a stage in shared memory: the stage's chunks' hi and lo, and 64 bytes more
// so that the 8-lane phases of a warp's 16-byte reads fall on distinct banks.
template <int NT>
__host__ __device__ constexpr int mma_many_row()
{
    return mma_stage_chunks<NT>() * 128 + 64;
}

// Dynamic shared memory of mma_many<NT>: two stages.
template <int NT>
__host__ __device__ constexpr int mma_many_smem()
{
    return 2 * 8 * NT * mma_many_row<NT>();
}

// The norm's scales that a product whose input came split by the product before it takes
// itself, in its first T blocks (mma_many, mma_ring with flags): MMA_MAX_TOKENS + 1 words of
// the host's scratch, a flag a token set once its scale is written, then the count of tiles
// done.

__device__ __forceinline__ void flag_set(unsigned* f)
{
    asm volatile("st.release.gpu.global.u32 [%0], %1;" ::"l"(f), "r"(1u) : "memory");
}

__device__ __forceinline__ unsigned flag_get(const unsigned* f)
{
    unsigned v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(f) : "memory");
    return v;
}

// Block t < T's warp (lane `lane`): token t's scale (rms_scale of norm_x's row t, as
// mma_split takes it) into scale[t], then its flag. They are the launch's first blocks, so
// they run (or are done) before any block waits for them.
__device__ __forceinline__ void mma_scale_take(const float* __restrict__ norm_x, unsigned x_stride, unsigned cols,
                                               float eps, float* scale, unsigned* flags, unsigned lane)
{
    const unsigned t = blockIdx.x;
    const float sc = rms_scale<true, 16>(norm_x + (unsigned long long)t * x_stride, cols, eps, lane);
    if (lane == 0) {
        scale[t] = sc;
        flag_set(flags + t);
    }
}

// Before a tile's last warp reads the scales: waits for its T tokens' flags.
__device__ __forceinline__ void mma_scales_wait(const unsigned* flags, unsigned T, unsigned lane)
{
    for (unsigned t = lane; t < T; t += 32) {
        while (flag_get(flags + t) == 0) {
        }
    }
    __syncwarp();
}

// After (lane 0): counts the tile; the last of the `tiles` clears the flags for the next
// launch (every other tile's warp has read them before it counted itself).
__device__ __forceinline__ void mma_scales_done(unsigned* flags, unsigned tiles, unsigned T)
{
    if (atomicAdd(flags + MMA_MAX_TOKENS, 1u) == tiles - 1) {
        for (unsigned t = 0; t < T; ++t) {
            flags[t] = 0;
        }
        flags[MMA_MAX_TOKENS] = 0;
    }
}

// A warp's sums for its tile (c0, c1: row g, tokens 2t, 2t + 1 of each n8 tile; c2, c3: row
// g + 8) as part `part` of P into part_sums ([part][token][row]), with P = 1 and no fusion
// (`plain`) straight into y; whether this warp brought the tile's last part (whose warp
// then sums the parts in part order and writes the tile's outputs: mma_store, mma_ring_store).
template <int NT>
__device__ __forceinline__ bool mma_park(const float (&acc)[NT][4], unsigned rows, unsigned T, unsigned P,
                                         unsigned part, unsigned tile, unsigned* tickets, float* part_sums,
                                         const MmaOut& o, bool plain)
{
    const unsigned lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    float* dst = plain ? o.y : part_sums + (unsigned long long)part * T * rows;
    const unsigned stride = plain ? o.y_stride : rows;
#pragma unroll
    for (int n = 0; n < NT; ++n) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const unsigned tok = 8 * n + 2 * t + (i & 1), r = tile * 16 + g + (i >> 1) * 8;
            if (tok < T) {
                dst[(unsigned long long)tok * stride + r] = acc[n][i];
            }
        }
    }
    if (plain) {
        return false;
    }
    __threadfence();
    __syncwarp();
    unsigned last = 0;
    if (lane == 0) {
        last = atomicAdd(&tickets[tile], 1u) == P - 1;
    }
    last = __shfl_sync(FULL_MASK, last, 0);
    if (!last) {
        return false;
    }
    __threadfence();
    return true;
}

// mma_park, then the last part's warp sums the tile's parts and writes its outputs (with
// `flags`, once the norm's scales are taken: mma_scale_take).
template <int NT>
__device__ __forceinline__ void mma_store(const float (&acc)[NT][4], unsigned rows, unsigned T, unsigned P,
                                          unsigned part, unsigned tile, unsigned* tickets, float* part_sums,
                                          const float* scale, unsigned* flags, const MmaOut& o, bool plain)
{
    if (!mma_park<NT>(acc, rows, T, P, part, tile, tickets, part_sums, o, plain)) {
        return;
    }
    const unsigned lane = threadIdx.x & 31;
    if (o.norm && flags) {
        mma_scales_wait(flags, T, lane);
    }
    // Rows r .. r + 3 of token tok summed over the parts in part order from zero, eight parts'
    // four sums loaded (a 16-byte load each) before the first of them is added: the loads of
    // a part chain overlap instead of waiting for each other.
    auto total4 = [&](unsigned tok, unsigned r) {
        float4 s = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        for (unsigned p0 = 0; p0 < P; p0 += 8) {
            float4 v[8];
#pragma unroll
            for (unsigned i = 0; i < 8; ++i) {
                if (p0 + i < P) {
                    v[i] = __ldcg((const float4*)(part_sums + ((unsigned long long)(p0 + i) * T + tok) * rows +
                                                  tile * 16 + r));
                }
            }
#pragma unroll
            for (unsigned i = 0; i < 8; ++i) {
                if (p0 + i < P) {
                    s.x += v[i].x;
                    s.y += v[i].y;
                    s.z += v[i].z;
                    s.w += v[i].w;
                }
            }
        }
        return s;
    };
    if (o.glu) {
        // Half h of the tile: gate rows 8 h .. 8 h + 3, up rows 8 h + 4 .. 8 h + 7 (mma_gate_row).
        for (unsigned i = lane; i < 2 * T; i += 32) {
            const unsigned tok = i / 2, h = i % 2;
            const float4 gate = total4(tok, 8 * h), up = total4(tok, 8 * h + 4);
            const float sc = o.norm ? __ldcg(scale + tok) : 1.0f;
            const float a = mma_emit_glu(o, gate.x, up.x, sc, tok, tile, 4 * h);
            const float b = mma_emit_glu(o, gate.y, up.y, sc, tok, tile, 4 * h + 1);
            const float c = mma_emit_glu(o, gate.z, up.z, sc, tok, tile, 4 * h + 2);
            const float d = mma_emit_glu(o, gate.w, up.w, sc, tok, tile, 4 * h + 3);
            mma_split_out(o, T, tok, 4 * tile + 2 * h, a, b, c, d);
        }
    } else {
        for (unsigned i = lane; i < 4 * T; i += 32) {
            const unsigned tok = i / 4, r = 4 * (i % 4);
            const float4 v = total4(tok, r);
            const float sc = o.norm ? __ldcg(scale + tok) : 1.0f;
            const float a = mma_emit(o, v.x, sc, tok, tile * 16 + r);
            const float b = mma_emit(o, v.y, sc, tok, tile * 16 + r + 1);
            const float c = mma_emit(o, v.z, sc, tok, tile * 16 + r + 2);
            const float d = mma_emit(o, v.w, sc, tok, tile * 16 + r + 3);
            mma_split_out(o, T, tok, (tile * 16 + r) / 2, a, b, c, d);
        }
    }
    if (lane == 0) {
        tickets[tile] = 0;
        if (o.norm && flags) {
            mma_scales_done(flags, rows / 16, T);
        }
    }
}

// Block b: part b % P, tiles (b / P) * 8 + warp. Stage s of SC chunks: every token's hi and lo
// for the part's chunks s SC .. s SC + SC - 1, copied in by cp.async (two stages in flight)
// and shared by the block's 8 warps; the mmas of two n8 tiles interleave, each sum keeping
// its own order.
//
// With `flags`, x came split by the product before (its outputs' split, MmaOut) and no
// mma_split took the norm's scales: block t < T's last warp takes token t's from norm_x
// (mma_scale_take), and the tiles' last warps wait for them.
template <int NT>
__device__ __forceinline__ void mma_many(const unsigned char* __restrict__ w, const unsigned* __restrict__ xhi_,
                                         const unsigned* __restrict__ xlo_, float* scale, const float* norm_x,
                                         unsigned x_stride, float eps, unsigned* flags, unsigned rows, unsigned cols,
                                         unsigned T, unsigned P, unsigned* tickets, float* part_sums, MmaOut o,
                                         bool plain, const Ahead& ahead)
{
    constexpr int SC = mma_stage_chunks<NT>(), ROW = mma_many_row<NT>(), STAGE = 8 * NT * ROW;
    constexpr int G = NT >= 2 ? 2 : 1;
    extern __shared__ __align__(16) unsigned char xs[];
    const unsigned char* xhi = (const unsigned char*)xhi_;
    const unsigned char* xlo = (const unsigned char*)xlo_;
    const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const unsigned part = blockIdx.x % P, tile = (blockIdx.x / P) * 8 + warp;
    const unsigned tiles = rows / 16, chunks_all = cols / 32;
    const bool mine = tile < tiles;
    const unsigned chunks = chunks_all / P, c0 = part * chunks * 32, stages = chunks / SC;
    const unsigned char* w0 = w + mma_at(mine ? tile : 0, part * chunks, chunks_all) + 16 * lane;
    auto load_x = [&](unsigned s) {
        unsigned char* buf = xs + (s & 1) * STAGE;
        for (unsigned i = threadIdx.x; i < 8 * NT * SC * 8; i += 256) {
            const unsigned q = i & 3, h = (i >> 2) & 1, c = (i >> 3) % SC, tok = (i >> 3) / SC;
            const unsigned long long col = c0 + (s * SC + c) * 32 + 8 * q;
            const unsigned char* src = (h ? xlo : xhi) + ((unsigned long long)(tok < T ? tok : 0) * cols + col) * 2;
            cp_async16(buf + tok * ROW + c * 128 + h * 64 + 16 * q, src, tok < T);
        }
        cp_async_commit();
    };
    uint4 wa[SC][2], wb[SC][2];
    auto load_w = [&](uint4 (&v)[SC][2], unsigned s) {
#pragma unroll
        for (int c = 0; c < SC; ++c) {
            const bool ok = mine && s < stages;
            // Chunk s SC + c of the part: 8 KiB on from the one before (see mma_at).
            const unsigned char* p = w0 + (unsigned long long)(ok ? s * SC + c : 0) * 8192;
            v[c][0] = ok ? mma_ldw(p) : make_uint4(0, 0, 0, 0);
            v[c][1] = ok ? mma_ldw(p + 512) : make_uint4(0, 0, 0, 0);
        }
    };
    float acc[NT][4] = {};
    auto sum = [&](const uint4 (&v)[SC][2], unsigned s) {
        const unsigned char* buf = xs + (s & 1) * STAGE;
#pragma unroll
        for (int c = 0; c < SC; ++c) {
#pragma unroll
            for (int n0 = 0; n0 < NT; n0 += G) {
                if (8 * n0 >= (int)T) {
                    break;
                }
                uint4 bh[G], bl[G];
#pragma unroll
                for (int j = 0; j < G; ++j) {
                    const unsigned char* f = buf + (8 * (n0 + j) + g) * ROW + c * 128 + 16 * t;
                    const bool real = 8 * (n0 + j) < (int)T;
                    bh[j] = real ? *(const uint4*)f : make_uint4(0, 0, 0, 0);
                    bl[j] = real ? *(const uint4*)(f + 64) : make_uint4(0, 0, 0, 0);
                }
                const uint4 a = v[c][0], b = v[c][1];
                mma_chunk_tiles<G>(acc + n0, a, b, bh, bl);
            }
        }
    };
    load_w(wa, 0);
    pdl_wait();
    pdl_launch_dependents();
    load_x(0);
    if (flags && o.norm && warp == 7 && blockIdx.x < T) {
        mma_scale_take(norm_x, x_stride, cols, eps, scale, flags, lane);
    }
    for (unsigned s = 0; s < stages; s += 2) {
        load_w(wb, s + 1);
        if (s + 1 < stages) {
            load_x(s + 1);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        if (mine) {
            sum(wa, s);
        }
        __syncthreads();
        if (s + 1 >= stages) {
            break;
        }
        load_w(wa, s + 2);
        if (s + 2 < stages) {
            load_x(s + 2);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        if (mine) {
            sum(wb, s + 1);
        }
        __syncthreads();
    }
    l2_ahead(ahead);
    if (mine) {
        mma_store<NT>(acc, rows, T, P, part, tile, tickets, part_sums, scale, flags, o, plain);
    }
}

// ---------------------------------------------------------------------------------------
// mma_ring: 33 to 64 tokens (on Hopper also 9 to 32)
// ---------------------------------------------------------------------------------------

// A stage of mma_ring (MMA_RING_CHUNKS chunks, constants.cuh): its 8 tiles' weights (8 KiB a
// chunk, one run) and every token's split activations for the same columns (128 bytes a token
// a chunk, N tokens). R stages in flight (MMA_RING_STAGES for 64 tokens, MMA_WG16_STAGES and
// MMA_WG32_STAGES for 16 and 32), a ring in shared memory: as many as two blocks an SM can
// hold. Its dynamic shared memory: the ring's stages, then an mbarrier a stage (the host's
// mma_ring_smem).

// mma_park, then the last part's warp sums the tile's parts and writes its outputs, with
// more of its loads in flight than mma_store's (64 tokens make 8 rows of four a lane).
template <int NT>
__device__ __forceinline__ void mma_ring_store(const float (&acc)[NT][4], unsigned rows, unsigned T, unsigned P,
                                               unsigned part, unsigned tile, unsigned* tickets, float* part_sums,
                                               const float* scale, unsigned* flags, const MmaOut& o, bool plain)
{
    if (!mma_park<NT>(acc, rows, T, P, part, tile, tickets, part_sums, o, plain)) {
        return;
    }
    const unsigned lane = threadIdx.x & 31;
    // The lane's vectors, four rows r .. r + 3 of a token each (4 T a tile, so at most V a
    // lane): without glu vector j is item lane + 32 j; with glu item i = lane + 32 (j / 2) is
    // half i % 2 of the tile's gate/up pairs (mma_gate_row), its gate rows for an even j and
    // its up rows for an odd one. Each is summed over the parts in part order from zero, two
    // parts of every vector loaded at once; then every value the outputs need is loaded
    // before the first output is stored (y may be the residual, so a load after a store
    // would wait for it).
    constexpr int V = 4 * 8 * NT / 32;
    auto at = [&](int j, unsigned& tok, unsigned& r) {
        if (o.glu) {
            const unsigned i = lane + 32 * (j / 2);
            tok = i / 2;
            r = 8 * (i % 2) + 4 * (j % 2);
            return i < 2 * T;
        }
        const unsigned i = lane + 32 * j;
        tok = i / 4;
        r = 4 * (i % 4);
        return i < 4 * T;
    };
    float4 sum[V];
#pragma unroll
    for (int j = 0; j < V; ++j) {
        sum[j] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
    for (unsigned p0 = 0; p0 < P; p0 += 2) {
        float4 v[2][V];
#pragma unroll
        for (int q = 0; q < 2; ++q) {
#pragma unroll
            for (int j = 0; j < V; ++j) {
                unsigned tok, r;
                if (p0 + q < P && at(j, tok, r)) {
                    v[q][j] = __ldcg((const float4*)(part_sums + ((unsigned long long)(p0 + q) * T + tok) * rows +
                                                     tile * 16 + r));
                }
            }
        }
#pragma unroll
        for (int q = 0; q < 2; ++q) {
#pragma unroll
            for (int j = 0; j < V; ++j) {
                unsigned tok, r;
                if (p0 + q < P && at(j, tok, r)) {
                    sum[j].x += v[q][j].x;
                    sum[j].y += v[q][j].y;
                    sum[j].z += v[q][j].z;
                    sum[j].w += v[q][j].w;
                }
            }
        }
    }
    if (o.norm && flags) {
        mma_scales_wait(flags, T, lane);
    }
    float sc[V];
#pragma unroll
    for (int j = 0; j < V; ++j) {
        unsigned tok, r;
        sc[j] = o.norm && at(j, tok, r) ? __ldcg(scale + tok) : 1.0f;
    }
    if (o.glu) {
#pragma unroll
        for (int j = 0; j < V; j += 2) {
            unsigned tok, r;
            if (at(j, tok, r)) {
                const float4 gate = sum[j], up = sum[j + 1];
                const unsigned q = r / 2;  // gate rows 8 h .. 8 h + 3: pairs 4 h .. 4 h + 3
                const float a = mma_emit_glu(o, gate.x, up.x, sc[j], tok, tile, q);
                const float b = mma_emit_glu(o, gate.y, up.y, sc[j], tok, tile, q + 1);
                const float c = mma_emit_glu(o, gate.z, up.z, sc[j], tok, tile, q + 2);
                const float d = mma_emit_glu(o, gate.w, up.w, sc[j], tok, tile, q + 3);
                mma_split_out(o, T, tok, (8 * tile + q) / 2, a, b, c, d);
            }
        }
    } else {
        // Every vector of the lane holds rows r .. r + 3 of the tile, r = 4 (lane % 4).
        const unsigned r = tile * 16 + 4 * (lane % 4);
        float res[V][4], gv[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            gv[e] = o.g ? o.g[r + e] : 0.0f;
        }
#pragma unroll
        for (int j = 0; j < V; ++j) {
            unsigned tok, rr;
            const bool real = at(j, tok, rr);
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                res[j][e] = real && o.residual ? o.residual[(unsigned long long)tok * o.y_stride + r + e] : 0.0f;
            }
        }
#pragma unroll
        for (int j = 0; j < V; ++j) {
            unsigned tok, rr;
            if (at(j, tok, rr)) {
                const float total[4] = {sum[j].x, sum[j].y, sum[j].z, sum[j].w};
                float next[4];
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const unsigned long long i = (unsigned long long)tok * o.y_stride + r + e;
                    const float v = mma_out(o.norm, total[e], sc[j], res[j][e]);
                    o.y[i] = v;
                    next[e] = v;
                    if (o.g) {
                        next[e] = v * gv[e];
                        o.yg[i] = next[e];
                    }
                }
                mma_split_out(o, T, tok, r / 2, next[0], next[1], next[2], next[3]);
            }
        }
    }
    if (lane == 0) {
        tickets[tile] = 0;
        if (o.norm && flags) {
            mma_scales_done(flags, rows / 16, T);
        }
    }
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// A warpgroup's mma (sm_90a): d, its 64 rows by 8 NT tokens (NT = 8, 4 or 2; each warp's 16
// rows as mma.m16n8k16's C for NT n8 tiles), plus the warp's A fragment (mma_bf16's a0-a3)
// times the tokens' 16 columns, the B operand at `op` in shared memory (see mma_split's
// MMA_OPERANDS + k for 8 NT tokens).
// Asynchronous: d and the fragment wait for mma_wg_wait.
#define MMA_WG_DESC(op) (((smem_addr(op) >> 4) & 0x3fff) | (128ull >> 4 << 16) | (256ull >> 4 << 32))
// (The descriptor: the operand's address, 128 bytes between the halves of its 16 columns, 256
// between groups of 8 tokens, no swizzle.)
#define MMA_WG_D4(n) "+f"(d[n][0]), "+f"(d[n][1]), "+f"(d[n][2]), "+f"(d[n][3])

template <int NT>
__device__ __forceinline__ void mma_wg(float (&d)[NT][4], unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                       const void* op)
{
    if constexpr (NT == 8) {
        asm volatile(
            "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,"
            "%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, {%32,%33,%34,%35}, %36, 1, 1, "
            "1, 0;"
            : MMA_WG_D4(0), MMA_WG_D4(1), MMA_WG_D4(2), MMA_WG_D4(3), MMA_WG_D4(4), MMA_WG_D4(5), MMA_WG_D4(6),
              MMA_WG_D4(7)
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(MMA_WG_DESC(op)));
    } else if constexpr (NT == 4) {
        asm volatile(
            "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,"
            "%14,%15}, {%16,%17,%18,%19}, %20, 1, 1, 1, 0;"
            : MMA_WG_D4(0), MMA_WG_D4(1), MMA_WG_D4(2), MMA_WG_D4(3)
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(MMA_WG_DESC(op)));
    } else {
        static_assert(NT == 2, "warpgroup mmas of 16, 32 or 64 tokens");
        asm volatile(
            "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7}, {%8,%9,%10,%11}, %12, "
            "1, 1, 1, 0;"
            : MMA_WG_D4(0), MMA_WG_D4(1)
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(MMA_WG_DESC(op)));
    }
}

// The sums' registers as the compiler must see them at a warpgroup mma's start and end: read
// and written there, never carried across.
template <int NT>
__device__ __forceinline__ void mma_wg_fence(float (&d)[NT][4])
{
#pragma unroll
    for (int n = 0; n < NT; ++n) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            asm volatile("" : "+f"(d[n][i])::"memory");
        }
    }
}

// Before a warp's first warpgroup mma of a batch (after its registers' last writes).
template <int NT>
__device__ __forceinline__ void mma_wg_begin(float (&d)[NT][4])
{
    mma_wg_fence(d);
    asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
}

// Waits for the warpgroup mmas issued since mma_wg_begin; `a` (their A fragments) stays
// untouched until then.
template <int NT, int N>
__device__ __forceinline__ void mma_wg_wait(float (&d)[NT][4], const uint4 (&a)[N])
{
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
    asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
    mma_wg_fence(d);
#pragma unroll
    for (int i = 0; i < N; ++i) {
        asm volatile("" ::"r"(a[i].x), "r"(a[i].y), "r"(a[i].z), "r"(a[i].w));
    }
}
#endif

// mma_many's product (the same mmas in the same order, so the same bits) for 33 to 64 tokens
// (with WG, T <= N: 9 to 16 for N = 16, 17 to 32 for N = 32) through a deeper pipeline. Block b: part b % P, tiles (b / P) * 8 + warp (every tile
// real: rows are whole groups of 128). Stage s of SC chunks: the 8 tiles' weights for the
// part's chunks s SC .. s SC + SC - 1 (one 8 SC KiB run, see mma_at) and every token's split
// activations for them (one run, see mma_split: SC T 128 bytes laid out MMA_CHUNKS, or with
// WG, SC N 128 bytes laid out MMA_OPERANDS for N tokens), copied into a ring of R
// stages in shared memory R stages ahead: on sm_90 each run by one bulk copy whose bytes
// complete the stage's mbarrier, before it by cp.async. The weights of the first R stages are
// requested before the wait for the kernel before (nothing writes them). Without WG, the mmas
// of two n8 tiles interleave, each sum keeping its own order; with WG (sm_90a only) the
// block's two warpgroups each make a chunk's four products for all its tokens at once as
// four warpgroup mmas, which give mma.sync's bits (measured: scripts/probes/gemm-bf16-mma.cu,
// design W, and the model's tests).
// With `flags`, the norm's scales as mma_many takes them.
template <bool WG, int R = MMA_RING_STAGES, int N = MMA_MAX_TOKENS>
__device__ __forceinline__ void mma_ring(const unsigned char* __restrict__ w, const unsigned char* __restrict__ x,
                                         float* scale, const float* norm_x, unsigned x_stride, float eps,
                                         unsigned* flags, unsigned rows, unsigned cols, unsigned T, unsigned P,
                                         unsigned* tickets, float* part_sums, MmaOut o, bool plain)
{
    static_assert(N == MMA_MAX_TOKENS || WG, "products of fewer tokens by warpgroup mmas alone");
    constexpr int NT = N / 8, G = 2;
    constexpr int SC = MMA_RING_CHUNKS, WB = SC * 8192, STAGE = SC * (8192 + N * 128);
    extern __shared__ __align__(128) unsigned char ring[];
    const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const unsigned part = blockIdx.x % P, group = blockIdx.x / P, tile = group * 8 + warp;
    const unsigned chunks_all = cols / 32, chunks = chunks_all / P, stages = chunks / SC;
    const unsigned char* wp = w + mma_at(group * 8, part * chunks, chunks_all);
    // A chunk's activations: 128 bytes a token (WG: MMA_MAX_TOKENS, T and the room past it).
    const unsigned xchunk = (WG ? N : T) * 128, xbytes = SC * xchunk;
    const unsigned char* xp = x + (unsigned long long)part * chunks * xchunk;
    auto slot = [&](unsigned s) { return ring + (s % R) * STAGE; };
#if __CUDA_ARCH__ >= 900
    unsigned long long* bars = (unsigned long long*)(ring + R * STAGE);
    if (threadIdx.x == 0) {
        for (int i = 0; i < R; ++i) {
            bar_init(&bars[i]);
        }
        bar_init_fence();
    }
    __syncthreads();
    auto fetch_w = [&](unsigned s) {
        if (threadIdx.x == 0 && s < stages) {
            bar_expect(&bars[s % R], WB + xbytes);
            bulk_copy(slot(s), wp + (unsigned long long)s * WB, WB, &bars[s % R]);
        }
    };
    auto fetch_x = [&](unsigned s) {
        if (threadIdx.x == 0 && s < stages) {
            bulk_copy(slot(s) + WB, xp + (unsigned long long)s * xbytes, xbytes, &bars[s % R]);
        }
    };
    auto ready = [&](unsigned s) { bar_wait(&bars[s % R], (s / R) & 1); };
#else
    auto copy = [&](unsigned char* dst, const unsigned char* src, unsigned bytes) {
        for (unsigned i = 16 * threadIdx.x; i < bytes; i += 16 * 256) {
            cp_async16(dst + i, src + i, true);
        }
    };
    auto fetch_w = [&](unsigned s) {
        if (s < stages) {
            copy(slot(s), wp + (unsigned long long)s * WB, WB);
        }
    };
    // A group a stage, empty past the last, so that R - 1 groups in flight leave stage s done.
    auto fetch_x = [&](unsigned s) {
        if (s < stages) {
            copy(slot(s) + WB, xp + (unsigned long long)s * xbytes, xbytes);
        }
        cp_async_commit();
    };
    auto ready = [&](unsigned) {
        cp_async_wait<R - 1>();
        __syncthreads();
    };
#endif
    float acc[NT][4] = {};
    // Stage s's chunks: the warp's tile's 1 KiB a chunk (rows g and g + 8 at lane 16 l and
    // 512 + 16 l), token tok's 128 bytes a chunk at (c T + tok) 128 (hi first for an even tok).
    // The tokens past T of the last n8 tile read whatever the ring holds: their columns of
    // the mma are their own and are never stored.
    auto sum = [&](const unsigned char* buf) {
        const unsigned char* ws = buf + warp * 1024 + 16 * lane;
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
        if constexpr (WG) {
            constexpr int OPB = N * 32;  // bytes of a warpgroup mma's operand
            uint4 a[2 * SC];
#pragma unroll
            for (int c = 0; c < SC; ++c) {
                a[2 * c] = *(const uint4*)(ws + c * 8192);
                a[2 * c + 1] = *(const uint4*)(ws + c * 8192 + 512);
            }
            mma_wg_begin(acc);
#pragma unroll
            for (int c = 0; c < SC; ++c) {
                const unsigned char* op = buf + WB + c * 4 * OPB;
                const uint4 ra = a[2 * c], rb = a[2 * c + 1];
                mma_wg(acc, ra.x, rb.x, ra.y, rb.y, op);
                mma_wg(acc, ra.x, rb.x, ra.y, rb.y, op + OPB);
                mma_wg(acc, ra.z, rb.z, ra.w, rb.w, op + 2 * OPB);
                mma_wg(acc, ra.z, rb.z, ra.w, rb.w, op + 3 * OPB);
            }
            mma_wg_wait(acc, a);
            return;
        }
#endif
        const unsigned char* xs = buf + WB + 16 * t;
#pragma unroll
        for (int c = 0; c < SC; ++c) {
            const uint4 a = *(const uint4*)(ws + c * 8192), b = *(const uint4*)(ws + c * 8192 + 512);
#pragma unroll
            for (int n0 = 0; n0 < NT; n0 += G) {
                if (8 * n0 >= (int)T) {
                    break;
                }
                uint4 bh[G], bl[G];
#pragma unroll
                for (int j = 0; j < G; ++j) {
                    const unsigned tok = 8 * (n0 + j) + g;
                    const unsigned char* f = xs + (c * T + tok) * 128;
                    const bool real = 8 * (n0 + j) < (int)T;
                    bh[j] = real ? *(const uint4*)(f + (g & 1) * 64) : make_uint4(0, 0, 0, 0);
                    bl[j] = real ? *(const uint4*)(f + 64 - (g & 1) * 64) : make_uint4(0, 0, 0, 0);
                }
                mma_chunk_tiles<G>(acc + n0, a, b, bh, bl);
            }
        }
    };
    for (unsigned s = 0; s < R; ++s) {
        fetch_w(s);
    }
    pdl_wait();
    pdl_launch_dependents();
    for (unsigned s = 0; s < R; ++s) {
        fetch_x(s);
    }
    if (flags && o.norm && warp == 7 && blockIdx.x < T) {
        mma_scale_take(norm_x, x_stride, cols, eps, scale, flags, lane);
    }
    for (unsigned s = 0; s < stages; ++s) {
        ready(s);
        sum(slot(s));
        // Every warp is done with the slot before it is filled again.
        __syncthreads();
        fetch_w(s + R);
        fetch_x(s + R);
    }
    mma_ring_store<NT>(acc, rows, T, P, part, tile, tickets, part_sums, scale, flags, o, plain);
}

#endif
