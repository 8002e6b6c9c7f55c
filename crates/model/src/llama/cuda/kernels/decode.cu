// One decode step's transformer layers in one launch: a persistent kernel whose blocks (one
// per SM, all resident: a cooperative launch) walk every layer's stages and wait for each
// other at a grid barrier between them, instead of one kernel launch per stage. At batch 1 a
// small model's step is bound by its ~150 dependent launches, each with its ramp, tail and
// launch gap; here a stage boundary costs one barrier, and every block asks L2 for its first
// weights of the next stage before it waits there. (Measured on an H100, a stage still costs
// 3.5-4 us at the least, barrier included, more than a kernel launched with programmatic
// dependent launch inside a graph: the host keeps this kernel off unless asked; see
// docs/perf.md.)
//
// Per layer (x: the residual stream, xb: the next norm's input times its weights, as in
// matvec.cuh's fused RMSNorm):
//   1. qkv = W_qkv (xb) * rms_scale(x)          (layer 0: xb is already normalized)
//   2. attention (attention.cuh, one item per team of ATTN_THREADS threads), RoPE and the
//      KV append fused in; the last of a query's splits merges them
//   3. x += W_o att; xb = x * ffn_norm
//   4. hb = silu(gate) * up of W_gate_up (xb) * rms_scale(x)   (gate and up interleaved)
//   5. x += W_down hb; xb = x * the next layer's attn_norm (none after the last layer)
// with a grid barrier after every stage but the last. The embedding lookup and first norm
// before, and the output norm and head after, stay their own kernels (matvec.cu, llama.cu).
//
// Every row of a product is computed by one warp (or `parts` warps of one block, added in
// part order) with matvec.cuh's arithmetic, and every attention item with attention.cuh's:
// results are the same bits as the kernel-by-kernel step's, and never depend on the grid's
// size or on timing. Activations are read with ordinary loads (other blocks write them in
// the same launch); the grid barrier orders them. A product's input is copied once into
// each block's shared memory after the barrier, and every row of the block reads it there:
// read through L1 by every warp instead, x moves more bytes than the weights do (4 bytes a
// column against 2 or fewer), and the probe scripts/probes/decode-persistent.cu measured the
// same step at twice the time that way.
//
// Compiled once per weight type and head size: DECODE_TYPE (0-7, the host's DType::ALL
// order) and DECODE_HEAD_DIM; every layer matrix must be of that type, gate and up
// interleaved (one matrix), Q/K/V stacked (one matrix), float rows whole 32-column slices.
// Grid: any number of blocks that can all be resident; block DECODE_THREADS; dynamic shared
// memory DECODE_TEAMS * sizeof(AttnShared<D, 1>), then 4 bytes for each column of the widest
// layer matrix (the products' inputs).

#include "attention.cuh"
#include "matvec.cuh"

#ifndef DECODE_TYPE
#define DECODE_TYPE 2
#endif
#ifndef DECODE_HEAD_DIM
#define DECODE_HEAD_DIM 64
#endif

typedef WeightType<DECODE_TYPE>::T W;

// DECODE_THREADS comes from constants.cuh (the host's numbers).
#define DECODE_WARPS (DECODE_THREADS / 32)
#define DECODE_TEAMS (DECODE_THREADS / ATTN_THREADS)
// Bytes of its rows of the next stage that each warp asks L2 for before a barrier (0, 4 and
// 16 KiB measured within noise of each other on an H100; see docs/perf.md).
#define DECODE_PREFETCH 4096

// A weight matrix: `rows` rows of `row_bytes` bytes; each row's columns are cut into `parts`
// runs of whole 256-column steps, taken by `parts` warps of one block.
struct DecodeMatrix {
    unsigned long long w;
    unsigned rows, cols, row_bytes, parts;
};

// One layer: its matrices, norm weights (next_norm: the next layer's attn_norm, 0 for the
// last) and this session's KV cache rows.
struct DecodeLayer {
    DecodeMatrix qkv, wo, gate_up, down;
    unsigned long long attn_norm, ffn_norm, next_norm, k_cache, v_cache;
};

// Everything the step reads and writes: device addresses (layers: n_layer DecodeLayers;
// step: [position, token]; barrier: the grid barrier's counter; timing: 0, or 5 * n_layer + 1
// timestamps, see stamp) and the model's sizes.
struct DecodeArgs {
    unsigned long long layers, step, barrier, x, xb, qkv, att, hb, part_o, part_ml, tickets,
        inv_freq, timing;
    unsigned n_layer, n_head, n_head_kv, n_rot, n_split;
    int halves;
    float eps, scale;
};

// Steps of a row whose loads a lane issues before it uses the first (matvec_row's BATCH),
// with an SM's registers shared by 16 warps: 4, 2 for q6_k (whose raw steps take 11
// registers). With the products' input in shared memory, 8 for 16-bit weights spilled and
// lost 11% of the step to 4 (docs/perf.md); f32 and the 4- and 8-bit formats spill some at
// 4 too (fewer steps for them not yet measured).
template <class T>
__device__ constexpr int decode_batch()
{
    if constexpr (T::FLOAT) {
        return 4;
    } else {
        return T::STEP == 210 ? 2 : 4;
    }
}
#define DECODE_BATCH decode_batch<W>()

// How a stage's rows are dealt. With parts == 1, warp w of block b is global warp
// g = w * gridDim.x + b (a stage's rows spread over every SM first) and takes rows (outputs,
// for gate/up) g, g + G, ... of the G warps, alone, with no block-wide synchronization. With
// parts > 1, in round k block b takes rows (k * gridDim.x + b) * per_round + (0 .. per_round),
// warp w part w % parts of row w / parts, and the parts meet in shared memory.
struct StageRows {
    unsigned first, step;   // the warp's first row (or output) and the stride to its next
    unsigned c0, c1;        // its part of a row: columns c0 .. c1 (matvec.cuh's row_part)
    unsigned long long b0;  // the part's first byte in its row
};

__device__ __forceinline__ StageRows stage_rows(const DecodeMatrix& m, unsigned warp)
{
    StageRows s;
    if (m.parts == 1) {
        s.first = warp * gridDim.x + blockIdx.x;
        s.step = gridDim.x * DECODE_WARPS;
    } else {
        const unsigned per_round = DECODE_WARPS / m.parts;
        s.first = blockIdx.x * per_round + warp / m.parts;
        s.step = gridDim.x * per_round;
    }
    row_part<W>(m.cols, m.parts, warp % m.parts, s.c0, s.c1);
    s.b0 = bytes_of<W>(s.c0);
    return s;
}

// Asks L2 for this warp's row parts of `m`, in order, up to `budget` bytes (for gate/up,
// rows in the order its outputs take them).
__device__ __forceinline__ void prefetch_stage(const DecodeMatrix& m, bool glu,
                                               unsigned long long budget)
{
    const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const StageRows s = stage_rows(m, warp);
    const unsigned long long bytes = bytes_of<W>(s.c1 - s.c0);
    if (bytes == 0) {
        return;
    }
    const unsigned units = glu ? m.rows / 2 : m.rows;
    for (unsigned u = s.first; u < units && budget > 0; u += s.step) {
        for (unsigned h = 0; h < (glu ? 2u : 1u); ++h) {
            const unsigned r = glu ? 8 * (u / 4) + 4 * h + u % 4 : u;
            prefetch_weights((const unsigned char*)m.w + (unsigned long long)r * m.row_bytes + s.b0,
                             bytes, lane, budget);
            budget = budget > bytes ? budget - bytes : 0;
        }
    }
}

// Row r's columns c0 .. c1 times x: the total in lane 0 (0 elsewhere); `mid` runs while the
// row's first loads are on their way.
template <class Mid = NoMid>
__device__ __forceinline__ float row_dot(const DecodeMatrix& m, const StageRows& s, unsigned r,
                                         const float* x, unsigned lane, const Mid& mid = Mid())
{
    float total = 0.0f;
    matvec_row<W, 1, true, false, DECODE_BATCH, true>((const unsigned char*)m.w + (unsigned long long)r * m.row_bytes + s.b0,
                                                      x + s.c0, nullptr, r, s.c1 - s.c0, 1, 0, 0,
                                                      nullptr, lane, magic_2p23(), &total, mid);
    return total;
}

// The stage's input x, `n` floats (a multiple of 32) written by other blocks before the
// barrier, copied into the block's shared memory `xs`, where the stage's rows read it.
__device__ __forceinline__ const float* stage_in(const float* x, unsigned n, float* xs)
{
    if (((unsigned long long)x & 15) == 0) {
        for (unsigned i = threadIdx.x; i < n / 4; i += blockDim.x) {
            ((float4*)xs)[i] = __ldcg((const float4*)x + i);
        }
    } else {
        for (unsigned i = threadIdx.x; i < n; i += blockDim.x) {
            xs[i] = __ldcg(x + i);
        }
    }
    __syncthreads();
    return xs;
}

// y = (residual ? residual : 0) + W x, one token, with matvec's fused norms: with norm_x,
// times rms_scale(norm_x); with g, also yg = y * g; with glu (parts 1), y[i] = silu(gate_i) *
// up_i of the interleaved rows instead. The same arithmetic as matvec.cu's matvec, in the
// same order, so the same bits. Every load that does not depend on the product (the
// residual, g, the norm's input) is issued before the product's loads complete: a stage is
// then one memory latency, not three.
__device__ __forceinline__ void stage_matvec(const DecodeMatrix& m, const float* x, float* y,
                                             const float* residual, const float* norm_x,
                                             float eps, const float* g, float* yg, bool glu,
                                             float* s_part, float* s_scale, float* xs)
{
    x = stage_in(x, m.cols, xs);
    const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const StageRows s = stage_rows(m, warp);
    float scale = 1.0f;
    bool scaled = norm_x == nullptr;
    // The norm's scale, computed by each warp (the same bits in every warp) while its first
    // row's loads are on their way.
    const auto first_scale = [&] {
        if (!scaled) {
            scale = rms_scale<false>(norm_x, m.cols, eps, lane);
            scaled = true;
        }
    };
    if (m.parts == 1) {
        // Each warp alone.
        const unsigned units = glu ? m.rows / 2 : m.rows;
        for (unsigned u = s.first; u < units; u += s.step) {
            if (glu) {
                const unsigned r = 8 * (u / 4) + u % 4;  // gate u; up u is four rows on
                float gate = 0.0f + row_dot(m, s, r, x, lane, first_scale);
                float up = 0.0f + row_dot(m, s, r + 4, x, lane);
                if (norm_x) {
                    gate *= scale;
                    up *= scale;
                }
                if (lane == 0) {
                    y[u] = gate / (1.0f + expf(-gate)) * up;
                }
            } else {
                const float res = residual && lane == 0 ? residual[u] : 0.0f;
                const float gu = g && lane == 0 ? g[u] : 0.0f;
                float total = 0.0f + row_dot(m, s, u, x, lane, first_scale);
                if (norm_x) {
                    total *= scale;
                }
                if (lane == 0) {
                    const float v = res + total;
                    y[u] = v;
                    if (g) {
                        yg[u] = v * gu;
                    }
                }
            }
        }
        return;
    }
    const unsigned per_round = DECODE_WARPS / m.parts;
    for (unsigned r0 = s.first - warp / m.parts; r0 < m.rows; r0 += s.step) {
        const unsigned r = r0 + warp / m.parts, i = threadIdx.x, row = r0 + i;
        // The finishing threads' residual and g, and warp 0's norm scale (for the block),
        // before the products' loads complete.
        const bool finisher = i < per_round && row < m.rows;
        const float res = finisher && residual ? residual[row] : 0.0f;
        const float gr = finisher && g ? g[row] : 0.0f;
        if (lane == 0) {
            s_part[warp] = 0.0f;
        }
        __syncwarp();
        if (r < m.rows && s.c1 > s.c0) {
            const float t = warp == 0 ? row_dot(m, s, r, x, lane, first_scale) : row_dot(m, s, r, x, lane);
            if (lane == 0) {
                s_part[warp] = t;
            }
        }
        if (warp == 0) {
            first_scale();
            if (lane == 0) {
                *s_scale = scale;
            }
        }
        __syncthreads();
        if (finisher) {
            float total = 0.0f;
            for (unsigned k = 0; k < m.parts; ++k) {
                total += s_part[i * m.parts + k];
            }
            if (norm_x) {
                total *= *s_scale;
            }
            const float v = res + total;
            y[row] = v;
            if (g) {
                yg[row] = v * gr;
            }
        }
        __syncthreads();
    }
}

// With `timing` given, block 0 writes %globaltimer (ns) there at the start and as it leaves
// each stage's barrier (after the last stage: as it finishes).
__device__ __forceinline__ void stamp(unsigned long long* timing, unsigned i)
{
    if (timing && blockIdx.x == 0 && threadIdx.x == 0) {
        unsigned long long now;
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
        timing[i] = now;
    }
}

extern "C" __global__ void __launch_bounds__(DECODE_THREADS, 1) decode_layers(DecodeArgs a)
{
    constexpr int D = DECODE_HEAD_DIM;
    extern __shared__ __align__(16) unsigned char smem[];
    __shared__ float s_part[DECODE_WARPS];
    __shared__ float s_scale;
    pdl_wait();
    const DecodeLayer* layers = (const DecodeLayer*)a.layers;
    unsigned long long* barrier = (unsigned long long*)a.barrier;
    float *x = (float*)a.x, *xb = (float*)a.xb, *qkv = (float*)a.qkv, *att = (float*)a.att;
    float* hb = (float*)a.hb;
    const int pos = ((const int*)a.step)[0];
    const unsigned stride = (a.n_head + 2 * a.n_head_kv) * D;
    const unsigned team = threadIdx.x / ATTN_THREADS;
    AttnShared<D, 1>& sh = ((AttnShared<D, 1>*)smem)[team];
    float* xs = (float*)(smem + DECODE_TEAMS * sizeof(AttnShared<D, 1>));
    const unsigned items = (unsigned)(pos / ATTN_SPLIT + 1) * a.n_head;
    unsigned long long* timing = (unsigned long long*)a.timing;
    stamp(timing, 0);

    for (unsigned l = 0; l < a.n_layer; ++l) {
        const DecodeLayer& L = layers[l];
        const float* norm_x = l > 0 ? x : nullptr;
        stage_matvec(L.qkv, xb, qkv, nullptr, norm_x, a.eps, nullptr, nullptr, false, s_part, &s_scale,
                     xs);
        grid_barrier(barrier);
        stamp(timing, 5 * l + 1);

        for (unsigned item = blockIdx.x * DECODE_TEAMS + team; item < items;
             item += gridDim.x * DECODE_TEAMS) {
            attention<D, 1>(Team{threadIdx.x % ATTN_THREADS, 1 + team}, sh, item / a.n_head,
                            item % a.n_head, 1, 0, pos, qkv, (kv_t*)L.k_cache, (kv_t*)L.v_cache,
                            (const float*)a.inv_freq, (float*)a.part_o, (float*)a.part_ml,
                            (unsigned*)a.tickets, att, a.n_head, a.n_head_kv, a.n_rot, a.halves,
                            a.n_split, a.scale, stride, no_split());
        }
        prefetch_stage(L.wo, false, DECODE_PREFETCH);
        grid_barrier(barrier);
        stamp(timing, 5 * l + 2);

        stage_matvec(L.wo, att, x, x, nullptr, a.eps, (const float*)L.ffn_norm, xb, false, s_part,
                     &s_scale, xs);
        prefetch_stage(L.gate_up, true, DECODE_PREFETCH);
        grid_barrier(barrier);
        stamp(timing, 5 * l + 3);

        stage_matvec(L.gate_up, xb, hb, nullptr, x, a.eps, nullptr, nullptr, true, s_part, &s_scale,
                     xs);
        prefetch_stage(L.down, false, DECODE_PREFETCH);
        grid_barrier(barrier);
        stamp(timing, 5 * l + 4);

        stage_matvec(L.down, hb, x, x, nullptr, a.eps, (const float*)L.next_norm, xb, false, s_part,
                     &s_scale, xs);
        if (l + 1 < a.n_layer) {
            prefetch_stage(layers[l + 1].qkv, false, DECODE_PREFETCH);
            grid_barrier(barrier);
        }
        stamp(timing, 5 * l + 5);
    }
}
