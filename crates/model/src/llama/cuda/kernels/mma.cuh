// BF16 weight-matrix products on tensor cores, with one arithmetic for every number of tokens
// (a lone decode step's one, a batched step's many, a prefill chunk's), so that a token's
// result never depends on the tokens beside it. Device code for mma.cu's kernels:
//
//   mma_tile      the matrix's rows stored again as tiles (below), once at load
//   mma_split     x as bf16 hi + lo (and the RMSNorm scale of each token), for mma_many
//   mma_one       y = W x for one token
//   mma_many      y = W x for 2 to 64 tokens, x split by mma_split
//
// both products with matvec's fusions (matvec.cuh): the RMSNorm before the product (its scale
// applied to the sum), a residual, the next norm's input y * g, and the interleaved gate/up
// rows' silu(gate) * up.
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
// token 0 in shared memory, mma_many all tokens of a stage; their fragments hold the same
// values). The norm's scale is the same warp sum (matvec.cuh's rms_scale) either way.
//
// Tiled weights (groups of 8 tiles, chunk by chunk): the 1 KiB of tile t's chunk c is at
// ((t / 8) * chunks + c) * 8 + t % 8 KiB (chunks = cols / 32); its first 512 bytes are rows
// 0-7, the next rows 8-15, lane l's 16 bytes at 16 l: row l / 4 (+ 8), columns 8 (l % 4) ..
// 8 (l % 4) + 7 of the chunk, so that a warp's weight load reads 512 contiguous bytes and the 8
// tiles of a block one 8 KiB run a chunk. rows must be a multiple of 128, cols of 256.
//
// Geometry: blockDim 256 for all. mma_tile: any grid. mma_split: gridDim (n), dynamic shared
// memory 0. mma_one: 8 warps take one tile's parts (P >= 8; a warp takes parts w and w + 8
// where P = 16) or 8 / P tiles' parts; gridDim ceil(tiles / tiles a block), dynamic shared
// memory 4 * cols bytes. mma_many: a block's 8 warps take 8 tiles of one part; gridDim
// (tiles / 8) * P, dynamic shared memory mma_many_smem(NT) bytes.

#ifndef TERN_MMA_CUH
#define TERN_MMA_CUH

#include "common.cuh"
#include "matvec.cuh"

// Bytes of each warp's first weights prefetched into L2 before the wait.
#define MMA_PREFETCH 8192
// Chunks in flight a warp in mma_one.
#define MMA_ONE_CHUNKS 4
// Most tokens one mma_many call takes.
#define MMA_MAX_TOKENS 64

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

// Two floats rounded to bf16, a in the low half.
__device__ __forceinline__ unsigned mma_pack(float a, float b)
{
    unsigned d;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(b), "f"(a));
    return d;
}

// A pair x0, x1 as its hi word and its lo word.
__device__ __forceinline__ void mma_split_pair(float x0, float x1, unsigned& hi, unsigned& lo)
{
    hi = mma_pack(x0, x1);
    lo = mma_pack(x0 - __uint_as_float(hi << 16), x1 - __uint_as_float(hi & 0xffff0000u));
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

// Block t: token t's x (row t of x_stride floats) as cols / 2 hi words and lo words (rows of
// cols / 2 words), and with norm_x, scale[t] = rms_scale of norm_x's row t.
__device__ __forceinline__ void mma_split(const float* __restrict__ x, unsigned x_stride, unsigned cols,
                                          const float* __restrict__ norm_x, float eps, unsigned* __restrict__ hi,
                                          unsigned* __restrict__ lo, float* __restrict__ scale)
{
    pdl_wait();
    pdl_launch_dependents();
    const unsigned t = blockIdx.x;
    const float* xt = x + (unsigned long long)t * x_stride;
    for (unsigned j = threadIdx.x; j < cols / 2; j += blockDim.x) {
        unsigned h, l;
        mma_split_pair(xt[2 * j], xt[2 * j + 1], h, l);
        hi[(unsigned long long)t * cols / 2 + j] = h;
        lo[(unsigned long long)t * cols / 2 + j] = l;
    }
    if (norm_x && threadIdx.x < 32) {
        const float s = rms_scale<true>(norm_x + (unsigned long long)t * x_stride, cols, eps, threadIdx.x);
        if (threadIdx.x == 0) {
            scale[t] = s;
        }
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
};

// Row r's sum for token t.
__device__ __forceinline__ void mma_emit(const MmaOut& o, float total, float scale, unsigned t, unsigned r)
{
    if (o.norm) {
        total *= scale;
    }
    const unsigned long long i = (unsigned long long)t * o.y_stride + r;
    const float v = (o.residual ? o.residual[i] : 0.0f) + total;
    o.y[i] = v;
    if (o.g) {
        o.yg[i] = v * o.g[r];
    }
}

// Gate/up pair q (0-7) of tile `tile` for token t: silu(gate) * up into output 8 tile + q.
__device__ __forceinline__ void mma_emit_glu(const MmaOut& o, float gate, float up, float scale, unsigned t,
                                             unsigned tile, unsigned q)
{
    if (o.norm) {
        gate *= scale;
        up *= scale;
    }
    o.y[(unsigned long long)t * o.y_stride + 8 * tile + q] = gate / (1.0f + expf(-gate)) * up;
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
    load(wa, 0, 0);
    pdl_wait();
    pdl_launch_dependents();
    // Token 0 split as it is staged.
    for (unsigned j = threadIdx.x; j < cols / 2; j += blockDim.x) {
        unsigned h, l;
        mma_split_pair(x[2 * j], x[2 * j + 1], h, l);
        ((unsigned*)xs)[j] = h;
        ((unsigned*)(xs + 2 * cols))[j] = l;
    }
    if (norm_x && warp == 0) {
        const float s = rms_scale<true>(norm_x, cols, eps, lane);
        if (lane == 0) {
            s_scale = s;
        }
    }
    __syncthreads();
#pragma unroll
    for (unsigned i = 0; i < 2; ++i) {
        if (i >= my_parts) {
            break;
        }
        if (i > 0) {
            load(wa, i, 0);
        }
        for (unsigned k = 0; k < chunks; k += 2 * U) {
            load(wb, i, k + U);
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
// mma_many: 2 to 64 tokens
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

// A warp's sums for its tile (c0, c1: row g, tokens 2t, 2t + 1 of each n8 tile; c2, c3: row
// g + 8) as part `part` of P into part_sums ([part][token][row]); the warp that brings the
// tile's last part sums the parts in part order and writes the tile's outputs. With P = 1 and
// no fusion (`plain`) the sums go straight to y.
template <int NT>
__device__ __forceinline__ void mma_store(const float (&acc)[NT][4], unsigned rows, unsigned T, unsigned P,
                                          unsigned part, unsigned tile, unsigned* tickets, float* part_sums,
                                          const float* scale, const MmaOut& o, bool plain)
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
        return;
    }
    __threadfence();
    __syncwarp();
    unsigned last = 0;
    if (lane == 0) {
        last = atomicAdd(&tickets[tile], 1u) == P - 1;
    }
    last = __shfl_sync(FULL_MASK, last, 0);
    if (!last) {
        return;
    }
    __threadfence();
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
            const float sc = o.norm ? scale[tok] : 1.0f;
            mma_emit_glu(o, gate.x, up.x, sc, tok, tile, 4 * h);
            mma_emit_glu(o, gate.y, up.y, sc, tok, tile, 4 * h + 1);
            mma_emit_glu(o, gate.z, up.z, sc, tok, tile, 4 * h + 2);
            mma_emit_glu(o, gate.w, up.w, sc, tok, tile, 4 * h + 3);
        }
    } else {
        for (unsigned i = lane; i < 4 * T; i += 32) {
            const unsigned tok = i / 4, r = 4 * (i % 4);
            const float4 v = total4(tok, r);
            const float sc = o.norm ? scale[tok] : 1.0f;
            mma_emit(o, v.x, sc, tok, tile * 16 + r);
            mma_emit(o, v.y, sc, tok, tile * 16 + r + 1);
            mma_emit(o, v.z, sc, tok, tile * 16 + r + 2);
            mma_emit(o, v.w, sc, tok, tile * 16 + r + 3);
        }
    }
    if (lane == 0) {
        tickets[tile] = 0;
    }
}

// Block b: part b % P, tiles (b / P) * 8 + warp. Stage s of SC chunks: every token's hi and lo
// for the part's chunks s SC .. s SC + SC - 1, copied in by cp.async (two stages in flight)
// and shared by the block's 8 warps; the mmas of two n8 tiles interleave, each sum keeping
// its own order.
template <int NT>
__device__ __forceinline__ void mma_many(const unsigned char* __restrict__ w, const unsigned* __restrict__ xhi_,
                                         const unsigned* __restrict__ xlo_, const float* __restrict__ scale,
                                         unsigned rows, unsigned cols, unsigned T, unsigned P, unsigned* tickets,
                                         float* part_sums, MmaOut o, bool plain)
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
                // The chunk's four mmas (mma_chunk's order), two n8 tiles interleaved.
#pragma unroll
                for (int j = 0; j < G; ++j) {
                    mma_bf16(acc[n0 + j], a.x, b.x, a.y, b.y, bh[j].x, bh[j].y);
                }
#pragma unroll
                for (int j = 0; j < G; ++j) {
                    mma_bf16(acc[n0 + j], a.x, b.x, a.y, b.y, bl[j].x, bl[j].y);
                }
#pragma unroll
                for (int j = 0; j < G; ++j) {
                    mma_bf16(acc[n0 + j], a.z, b.z, a.w, b.w, bh[j].z, bh[j].w);
                }
#pragma unroll
                for (int j = 0; j < G; ++j) {
                    mma_bf16(acc[n0 + j], a.z, b.z, a.w, b.w, bl[j].z, bl[j].w);
                }
            }
        }
    };
    load_w(wa, 0);
    pdl_wait();
    pdl_launch_dependents();
    load_x(0);
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
    if (mine) {
        mma_store<NT>(acc, rows, T, P, part, tile, tickets, part_sums, scale, o, plain);
    }
}

#endif
