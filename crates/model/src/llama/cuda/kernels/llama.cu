// The Llama forward pass's element-wise and attention kernels (matrix-vector products are in
// matvec.cu, the decode attention's device code in attention.cuh). Compiled by NVRTC for the
// device's architecture, with this folder's headers.
//
// Every reduction runs in a fixed order (fixed thread-to-element assignment, fixed
// shuffle trees, fixed split sizes), so results are bitwise reproducible run to run and do
// not depend on what else runs on the GPU. Positions are read from device memory (`step`),
// so one captured CUDA graph serves every decode step.
//
// Layouts: activations are row-major `[token][width]` f32; a layer's KV cache is
// `[position][n_head_kv * head_dim]` f32; `step[0]` is the first position of this call.

#include "attention.cuh"

// Sum over a block of `blockDim.x` (a multiple of 32, at most 1024) threads, in a fixed order.
__device__ float block_sum(float v, float* shared) {
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    v = warp_sum(v);
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    float total = 0.0f;
    for (int i = 0; i < warps; i++) total += shared[i];
    __syncthreads();
    return total;
}

// o = xr / rms(xr) * w for one row of n floats, by the whole block.
__device__ __forceinline__ void rmsnorm_row(const float* __restrict__ xr, const float* __restrict__ w,
                                            float* __restrict__ o, unsigned n, float eps) {
    __shared__ float shared[32];
    float sum = 0.0f;
    for (unsigned i = threadIdx.x; i < n; i += blockDim.x) sum += xr[i] * xr[i];
    float mean_sq = block_sum(sum, shared) / (float)n;
    float scale = 1.0f / sqrtf(mean_sq + eps);
    for (unsigned i = threadIdx.x; i < n; i += blockDim.x) o[i] = xr[i] * scale * w[i];
}

// out[t] = x[t] / rms(x[t]) * w. Grid (n_tok), block 256.
extern "C" __global__ void rmsnorm(const float* __restrict__ x, const float* __restrict__ w,
                                   float* __restrict__ out, unsigned n, float eps) {
    pdl_wait();
    pdl_launch_dependents();
    rmsnorm_row(x + (size_t)blockIdx.x * n, w, out + (size_t)blockIdx.x * n, n, eps);
}

// out[i] = x[rows[i]] / rms(x[rows[i]]) * w: rmsnorm of chosen rows (a batched step's last
// positions, before the output head), the same arithmetic. Grid (number of rows), block 256.
extern "C" __global__ void rmsnorm_rows(const float* __restrict__ x, const int* __restrict__ rows,
                                        const float* __restrict__ w, float* __restrict__ out,
                                        unsigned n, float eps) {
    pdl_wait();
    pdl_launch_dependents();
    rmsnorm_row(x + (size_t)rows[blockIdx.x] * n, w, out + (size_t)blockIdx.x * n, n, eps);
}

// Row i of src (n floats) to the address dsts[i] (device memory, or host memory registered
// with the GPU: an actor's logits). Grid (number of rows, ceil(n / 1024)), block 256.
extern "C" __global__ void scatter_rows(const float* __restrict__ src,
                                        const unsigned long long* __restrict__ dsts, unsigned n) {
    pdl_wait();
    pdl_launch_dependents();
    const float* s = src + (size_t)blockIdx.x * n;
    float* d = (float*)dsts[blockIdx.x];
    for (unsigned i = blockIdx.y * 1024 + threadIdx.x, end = min(n, (blockIdx.y + 1) * 1024); i < end;
         i += blockDim.x)
        d[i] = s[i];
}

// f32 to bf16 bits, nearest with ties to even; NaNs stay NaN, made quiet (as matvec.cu's).
__device__ __forceinline__ unsigned short to_bf16_bits(float f) {
    const unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 64u);
    return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// rmsnorm with the result rounded to bf16: the operand of a prefill GEMM. Each thread keeps
// its part of the row in registers (16-byte loads, at most NORM_VEC of them) when the width
// allows, else reads the row twice. Grid (n_tok), block 256.
#define NORM_VEC 8

__device__ __forceinline__ unsigned bf16_pair(float lo, float hi) {
    return to_bf16_bits(lo) | (unsigned)to_bf16_bits(hi) << 16;
}

extern "C" __global__ void rmsnorm_bf16(const float* __restrict__ x, const float* __restrict__ w,
                                        unsigned short* __restrict__ out, unsigned n, float eps) {
    pdl_wait();
    pdl_launch_dependents();
    __shared__ float shared[32];
    const float* xr = x + (size_t)blockIdx.x * n;
    unsigned short* o = out + (size_t)blockIdx.x * n;
    if (n % 4 == 0 && n <= 4 * NORM_VEC * blockDim.x) {
        float4 v[NORM_VEC];
        float sum = 0.0f;
#pragma unroll
        for (int k = 0; k < NORM_VEC; k++) {
            const unsigned i = 4 * (threadIdx.x + k * blockDim.x);
            v[k] = i < n ? *(const float4*)(xr + i) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            sum += v[k].x * v[k].x + v[k].y * v[k].y + v[k].z * v[k].z + v[k].w * v[k].w;
        }
        const float scale = 1.0f / sqrtf(block_sum(sum, shared) / (float)n + eps);
#pragma unroll
        for (int k = 0; k < NORM_VEC; k++) {
            const unsigned i = 4 * (threadIdx.x + k * blockDim.x);
            if (i >= n) break;
            const float4 g = *(const float4*)(w + i);
            *(uint2*)(o + i) = make_uint2(bf16_pair(v[k].x * scale * g.x, v[k].y * scale * g.y),
                                          bf16_pair(v[k].z * scale * g.z, v[k].w * scale * g.w));
        }
        return;
    }
    float sum = 0.0f;
    for (unsigned i = threadIdx.x; i < n; i += blockDim.x) sum += xr[i] * xr[i];
    float mean_sq = block_sum(sum, shared) / (float)n;
    float scale = 1.0f / sqrtf(mean_sq + eps);
    for (unsigned i = threadIdx.x; i < n; i += blockDim.x) o[i] = to_bf16_bits(xr[i] * scale * w[i]);
}

// Rotates the query heads of n_tok fused q | k | v rows (`stride` floats apart) in place and
// appends the rotated keys and the values to the layer's cache at positions step[0] + t:
// the prefill path's half of what `attention` fuses for short calls (attention_prefill
// reads them back from the cache). Block t takes token t: the rotation's n_rot / 2 angles
// once, then every head's pairs. Grid (n_tok), block 256; n_rot <= 256.
extern "C" __global__ void rope_append(float* qkv, kv_t* __restrict__ k_cache,
                                       kv_t* __restrict__ v_cache,
                                       const float* __restrict__ inv_freq,
                                       const int* __restrict__ step, unsigned n_head,
                                       unsigned n_head_kv, unsigned head_dim, unsigned n_rot,
                                       int halves, unsigned stride) {
    pdl_wait();
    pdl_launch_dependents();
    __shared__ float s_cos[128], s_sin[128];
    const unsigned t = blockIdx.x, half = n_rot / 2;
    const unsigned q_dim = n_head * head_dim, kv_dim = n_head_kv * head_dim;
    const int pos = step[0] + (int)t;
    for (unsigned i = threadIdx.x; i < half; i += blockDim.x)
        sincosf((float)pos * inv_freq[i], &s_sin[i], &s_cos[i]);
    float* row = qkv + (size_t)t * stride;
    kv_t* k_row = k_cache + (size_t)pos * kv_dim;
    kv_t* v_row = v_cache + (size_t)pos * kv_dim;
    for (unsigned i = threadIdx.x; i < kv_dim; i += blockDim.x) {
        kv_store(v_row + i, row[q_dim + kv_dim + i]);
        if (i % head_dim >= n_rot) kv_store(k_row + i, row[q_dim + i]);
    }
    __syncthreads();
    for (unsigned i = threadIdx.x; i < (n_head + n_head_kv) * half; i += blockDim.x) {
        const unsigned head = i / half, p = i % half;
        const unsigned a = halves ? p : 2 * p, b = halves ? p + half : 2 * p + 1;
        const float* src = row + head * head_dim;  // a key head's src follows the queries
        const float x0 = src[a], x1 = src[b], c = s_cos[p], sn = s_sin[p];
        const float ya = x0 * c - x1 * sn, yb = x0 * sn + x1 * c;
        if (head < n_head) {
            row[head * head_dim + a] = ya;
            row[head * head_dim + b] = yb;
        } else {
            kv_store(k_row + (head - n_head) * head_dim + a, ya);
            kv_store(k_row + (head - n_head) * head_dim + b, yb);
        }
    }
}

// out[t][i] = bf16(silu(gate) * up) for i < n_ff, as swiglu below, where token t's row of
// 2 * n_ff GEMM outputs is [gate | up], or, when `interleaved`, gate and up four at a time
// (gate i at 8 (i / 4) + i % 4, up i four on). Thread q takes i = 4q .. 4q + 3, with 16-byte
// loads when n_ff is a multiple of 4. Grid (ceil(n_ff / 1024), n_tok), block 256.
__device__ __forceinline__ unsigned short swiglu_bf16_one(float g, float u) {
    return to_bf16_bits(g / (1.0f + expf(-g)) * u);
}

extern "C" __global__ void swiglu_bf16(const float* __restrict__ gate_up,
                                       unsigned short* __restrict__ out, unsigned n_ff,
                                       int interleaved) {
    pdl_wait();
    pdl_launch_dependents();
    const unsigned q = blockIdx.x * blockDim.x + threadIdx.x, t = blockIdx.y, i0 = 4 * q;
    if (i0 >= n_ff) return;
    const float* row = gate_up + (size_t)t * 2 * n_ff;
    unsigned short* o = out + (size_t)t * n_ff + i0;
    if (n_ff % 4 == 0) {
        const float4 g = *(const float4*)(row + (interleaved ? 8 * q : i0));
        const float4 u = *(const float4*)(row + (interleaved ? 8 * q + 4 : n_ff + i0));
        const unsigned lo = swiglu_bf16_one(g.x, u.x) | (unsigned)swiglu_bf16_one(g.y, u.y) << 16;
        const unsigned hi = swiglu_bf16_one(g.z, u.z) | (unsigned)swiglu_bf16_one(g.w, u.w) << 16;
        if ((size_t)o % 8 == 0) {
            *(uint2*)o = make_uint2(lo, hi);
        } else {
            o[0] = (unsigned short)lo, o[1] = (unsigned short)(lo >> 16);
            o[2] = (unsigned short)hi, o[3] = (unsigned short)(hi >> 16);
        }
        return;
    }
    for (unsigned i = i0; i < i0 + 4 && i < n_ff; i++) {
        const unsigned gi = interleaved ? 8 * (i / 4) + i % 4 : i;
        const unsigned ui = interleaved ? gi + 4 : n_ff + i;
        out[(size_t)t * n_ff + i] = swiglu_bf16_one(row[gi], row[ui]);
    }
}

// out[t][i] = silu(gate[t][i]) * up[t][i] for i < n_ff, where token t's gate row starts at
// gate + t*stride and its up row at up + t*stride (one fused gate|up row per token). out is
// (n_tok, n_ff). Grid (ceil(n_ff / 256), n_tok), block 256.
extern "C" __global__ void swiglu(const float* __restrict__ gate, const float* __restrict__ up,
                                  float* __restrict__ out, unsigned n_ff, unsigned stride) {
    pdl_wait();
    pdl_launch_dependents();
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x, t = blockIdx.y;
    if (i < n_ff) {
        float g = gate[(size_t)t * stride + i];
        out[(size_t)t * n_ff + i] = g / (1.0f + expf(-g)) * up[(size_t)t * stride + i];
    }
}

// Decode attention (attention.cuh). Grid (n_split / spb rounded up, n_head, n_tok), block
// ATTN_THREADS, n_tok <= ATTN_MAX_NEW: a block takes items (split, head, t) for spb splits
// in turn. attention_one_<D>: the same for n_tok = 1, a block taking a KV group's query heads
// (grid (.., n_head_kv, 1), n_head / n_head_kv <= ATTN_GROUP_MAX) by attention_group where
// its shared memory fits (else one head after another): the same arithmetic, so the same
// bits, from a quarter of the blocks (where n_head = 4 n_head_kv), each reading its keys and
// values once. With `early`, the kernel waits for the one before it only once its first
// split's cached rows are on their way (attention_group's `wait`; the other paths wait first).
template <int D, int NEW, class Wait = NoMid>
__device__ __forceinline__ void attention_splits(
    unsigned spb, unsigned kv_head, unsigned t, int step0, const float* qkv, kv_t* k_cache,
    kv_t* v_cache, const float* __restrict__ inv_freq, float* part_o, float* part_ml,
    unsigned* tickets, float* out, unsigned n_head, unsigned n_head_kv, unsigned n_rot,
    int halves, unsigned n_split, float scale, unsigned stride, const AttnSplit& split_out,
    const Wait& wait = Wait()) {
    const unsigned s_begin = blockIdx.x * spb;
    if constexpr (NEW == 1 && GroupShared<D>::FITS) {
        __shared__ GroupShared<D> sh;
        attention_group<D>(sh, s_begin, spb, kv_head, step0, qkv, k_cache, v_cache, inv_freq,
                           part_o, part_ml, tickets, out, n_head, n_head_kv, n_rot, halves,
                           n_split, scale, split_out, wait);
    } else {
        wait();
        __shared__ AttnShared<D, NEW> sh;
        const unsigned heads = NEW == 1 ? n_head / n_head_kv : 1;
        for (unsigned s = s_begin; s < s_begin + spb && s < n_split; s++) {
            if (s > s_begin) __syncthreads();
            attention<D, NEW>(Team{threadIdx.x, 0}, sh, s, kv_head * heads, heads, t, step0, qkv,
                              k_cache, v_cache, inv_freq, part_o, part_ml, tickets, out, n_head,
                              n_head_kv, n_rot, halves, n_split, scale, stride, split_out);
        }
    }
}

#define ATTENTION(D, NEW, NAME)                                                                   \
    extern "C" __global__ void __launch_bounds__(ATTN_THREADS) NAME##D(                           \
        const float* qkv, kv_t* k_cache, kv_t* v_cache, const float* __restrict__ inv_freq,       \
        float* part_o, float* part_ml, unsigned* tickets, float* out, const int* __restrict__ step, \
        unsigned n_head, unsigned n_head_kv, unsigned n_rot, int halves, unsigned n_split,        \
        float scale, unsigned stride, unsigned spb, Ahead ahead, unsigned early) {                \
        l2_ahead(ahead);                                                                          \
        if (!early) {                                                                             \
            pdl_wait();                                                                           \
            pdl_launch_dependents();                                                              \
        }                                                                                         \
        attention_splits<D, NEW>(spb, blockIdx.y, blockIdx.z, step[0], qkv, k_cache, v_cache,     \
                                 inv_freq, part_o, part_ml, tickets, out, n_head, n_head_kv,      \
                                 n_rot, halves, n_split, scale, stride, no_split(),               \
                                 LateWait{early != 0});                                           \
    }

// M(D, NEW, NAME) for every head size the host instantiates (kernels.rs's HEAD_DIMS).
#define FOR_HEAD_DIMS(M, NEW, NAME) \
    M(32, NEW, NAME) M(64, NEW, NAME) M(128, NEW, NAME) M(256, NEW, NAME)

FOR_HEAD_DIMS(ATTENTION, ATTN_MAX_NEW, attention_)
FOR_HEAD_DIMS(ATTENTION, 1, attention_one_)

// One query of a batched step (the host's `AttnJob`, 64 bytes): its session's cache and
// attention scratch, where the session's new positions start, and which of them it is.
struct AttnJob {
    unsigned long long k_cache, v_cache;  // the session's layer 0; layer l is l * layer on
    unsigned long long layer;             // elements from one layer's cache to the next
    unsigned long long part_o, part_ml, tickets;  // the session's (see attention.cuh)
    int step0;        // the session's first new position in this step
    unsigned t;       // this query among the session's new positions (< ATTN_MAX_NEW)
    unsigned first;   // the step's row of the session's first new position
    unsigned n_split; // the session's attention splits
};

// Decode attention for a batched step: query z of the step (its fused q | k | v row in
// qkv, `stride` floats apart, as one matrix product over all the step's positions wrote
// it) over its own session's cache, exactly as `attention` above computes it for that
// session alone (the same device code and order; the split and merge are fixed by the
// session's positions). Grid (the most splits of any session / spb rounded up, n_head,
// queries), block ATTN_THREADS; out: (queries, n_head * D). attention_batch_one_<D>: the
// same where every session has one new position, as attention_one_<D> (a KV group's heads a
// block: grid (.., n_head_kv, queries)). With split_hi, out is also written split for the
// output projection's product of all the step's queries, laid out split_layout (see
// attention.cuh's AttnSplit).
#define ATTENTION_BATCH(D, NEW, NAME)                                                             \
    extern "C" __global__ void __launch_bounds__(ATTN_THREADS) NAME##D(                           \
        const float* qkv, const AttnJob* __restrict__ jobs, unsigned layer,                      \
        const float* __restrict__ inv_freq, float* out, unsigned n_head, unsigned n_head_kv,      \
        unsigned n_rot, int halves, float scale, unsigned stride, unsigned spb,                   \
        unsigned* split_hi, unsigned* split_lo, unsigned split_layout, Ahead ahead) {             \
        l2_ahead(ahead);                                                                          \
        pdl_wait();                                                                               \
        pdl_launch_dependents();                                                                  \
        const AttnJob j = jobs[blockIdx.z];                                                       \
        if (blockIdx.x * spb >= j.n_split) return;                                                \
        const size_t at = (size_t)layer * j.layer;                                                \
        const AttnSplit split{SplitOut{split_hi, split_lo, split_layout, n_head * D}, gridDim.z,  \
                              j.first + j.t};                                                     \
        attention_splits<D, NEW>(spb, blockIdx.y, j.t, j.step0, qkv + (size_t)j.first * stride,   \
                                 (kv_t*)j.k_cache + at, (kv_t*)j.v_cache + at, inv_freq,          \
                                 (float*)j.part_o, (float*)j.part_ml, (unsigned*)j.tickets,       \
                                 out + (size_t)j.first * n_head * D, n_head, n_head_kv, n_rot,    \
                                 halves, j.n_split, scale, stride, split);                        \
    }

FOR_HEAD_DIMS(ATTENTION_BATCH, ATTN_MAX_NEW, attention_batch_)
FOR_HEAD_DIMS(ATTENTION_BATCH, 1, attention_batch_one_)

// The rotated key and the value of each query of a batched step (job z's position step0 + t,
// its row first + t of qkv) stored into its session's cache at `layer`, exactly as the
// attention kernels above append them (rope_head and kv_round): so that a launch of
// attention_batch_one after it may take several positions of one session, each reading the
// positions before its own from the cache (its own block stores the same bytes again).
// Grid (queries, n_head_kv), block ATTN_THREADS; head_dim <= 256.
extern "C" __global__ void __launch_bounds__(ATTN_THREADS)
    append_kv(const float* qkv, const AttnJob* __restrict__ jobs, unsigned layer,
              const float* __restrict__ inv_freq, unsigned n_head, unsigned n_head_kv,
              unsigned head_dim, unsigned n_rot, int halves, unsigned stride) {
    pdl_wait();
    pdl_launch_dependents();
    __shared__ float s_k[256];
    const AttnJob j = jobs[blockIdx.x];
    const unsigned q_dim = n_head * head_dim, kv_dim = n_head_kv * head_dim;
    const unsigned kv_off = blockIdx.y * head_dim, tid = threadIdx.x;
    const int pos = j.step0 + (int)j.t;
    const float* row = qkv + (size_t)(j.first + j.t) * stride;
    rope_head<true>(tid, ATTN_THREADS, row + q_dim + kv_off, s_k, pos, inv_freq, n_rot, halves,
                    head_dim);
    __syncthreads();
    const size_t at = (size_t)layer * j.layer + (size_t)pos * kv_dim + kv_off;
    for (unsigned d = tid; d < head_dim; d += ATTN_THREADS) {
        kv_store((kv_t*)j.k_cache + at + d, s_k[d]);
        kv_store((kv_t*)j.v_cache + at + d, kv_round(row[q_dim + kv_dim + kv_off + d]));
    }
}

// The four floats at `off` of cached position p's key and value, zeros past `last`.
__device__ __forceinline__ void kv_at(const kv_t* __restrict__ k_cache,
                                      const kv_t* __restrict__ v_cache, int p, int last,
                                      unsigned kv_dim, unsigned off, float4& k, float4& v) {
    k = v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (p <= last) {
        k = kv_load4(k_cache + (size_t)p * kv_dim + off);
        v = kv_load4(v_cache + (size_t)p * kv_dim + off);
    }
}

// Causal attention for a prefill chunk (flash attention, f32): block (head, tile) takes
// queries QT * tile .. of one head, already rotated in place in their fused q | k | v rows
// (`stride` floats apart), and walks the cache's key and value rows (this chunk's appended
// by rope_append) in tiles of KT positions up to the tile's last query, in position order.
// Each tile: scores into shared memory (each thread a 2 x 4-ish patch of queries by keys,
// dot products in dimension order), a few lanes per query row take the tile's max and sum of
// exponentials in a fixed order and rescale its running sum, then each thread adds weight
// * value for its queries and dimensions in position order. The order of every sum is fixed
// by the tile sizes, never by timing, so results are bitwise reproducible.
//
// Grid (n_head, ceil(n_tok / QT)), block 128. out: (n_tok, n_head * D) bf16, the operand of
// the output projection's GEMM.
template <int D, int QT, int KT>
__device__ __forceinline__ void attention_prefill(const float* __restrict__ qkv,
                                                  const kv_t* __restrict__ k_cache,
                                                  const kv_t* __restrict__ v_cache,
                                                  unsigned short* __restrict__ out,
                                                  const int* __restrict__ step, unsigned n_tok,
                                                  unsigned n_head, unsigned n_head_kv,
                                                  float scale, unsigned stride) {
    constexpr int RQ = QT / 16;  // query rows per thread (16 row groups)
    constexpr int RK = KT / 8;   // keys per thread in the scores (8 key groups)
    constexpr int RD = D / 8;    // output dimensions per thread
    constexpr int ROWS_PER_WARP = QT / 4;
    constexpr int LANES_PER_ROW = 32 / ROWS_PER_WARP;  // in the softmax update
    constexpr int KEYS_PER_LANE = KT / LANES_PER_ROW;
    __shared__ float s_q[QT][D + 1];  // padded: a warp reads four rows at once
    __shared__ float s_k[KT][D + 1];  // padded: threads of a row read keys 8 apart
    __shared__ __align__(16) float s_v[KT][D];
    __shared__ float s_p[QT][KT + 1];
    __shared__ float s_alpha[QT], s_l[QT];

    pdl_wait();
    pdl_launch_dependents();
    const unsigned tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const unsigned ty = tid / 8, tx = tid % 8;
    const unsigned head = blockIdx.x, t0 = (gridDim.y - 1 - blockIdx.y) * QT;  // longest first
    const int step0 = step[0];
    const unsigned q_dim = n_head * D, kv_dim = n_head_kv * D;
    const unsigned kv_off = (head / (n_head / n_head_kv)) * D;
    const unsigned t_end = t0 + QT < n_tok ? t0 + QT : n_tok;
    const int last = step0 + (int)t_end - 1;  // the tile's last query position

    for (unsigned i = tid; i < QT * D; i += blockDim.x) {
        const unsigned r = i / D, d = i % D;
        s_q[r][d] = t0 + r < n_tok ? qkv[(size_t)(t0 + r) * stride + head * D + d] : 0.0f;
    }
    // The running max and sum of this lane's softmax row (see the update below), and the
    // running output of this thread's rows and dimensions.
    float m_run = NEG_INF, l_run = 0.0f;
    float o[RQ][RD];
    for (int r = 0; r < RQ; r++)
        for (int m = 0; m < RD; m++) o[r][m] = 0.0f;

    for (int k0 = 0; k0 <= last; k0 += KT) {
        __syncthreads();  // the previous tile's s_k, s_v, s_p are used up
        for (unsigned i = tid; i < KT * D / 4; i += blockDim.x) {
            const unsigned j = i / (D / 4), d = 4 * (i % (D / 4));
            const int p = k0 + (int)j;
            float4 kv4, vv4;
            kv_at(k_cache, v_cache, p, last, kv_dim, kv_off + d, kv4, vv4);
            s_k[j][d] = kv4.x;
            s_k[j][d + 1] = kv4.y;
            s_k[j][d + 2] = kv4.z;
            s_k[j][d + 3] = kv4.w;
            *(float4*)&s_v[j][d] = vv4;
        }
        __syncthreads();
        // Scores: rows ty + 16 r, keys tx + 8 c.
        {
            float acc[RQ][RK];
            for (int r = 0; r < RQ; r++)
                for (int c = 0; c < RK; c++) acc[r][c] = 0.0f;
#pragma unroll 8
            for (int d = 0; d < D; d++) {
                float qv[RQ], kv[RK];
                for (int r = 0; r < RQ; r++) qv[r] = s_q[ty + 16 * r][d];
                for (int c = 0; c < RK; c++) kv[c] = s_k[tx + 8 * c][d];
                for (int r = 0; r < RQ; r++)
                    for (int c = 0; c < RK; c++) acc[r][c] = fmaf(qv[r], kv[c], acc[r][c]);
            }
            for (int r = 0; r < RQ; r++) {
                const int qp = step0 + (int)(t0 + ty + 16 * r);
                for (int c = 0; c < RK; c++) {
                    const int kp = k0 + (int)(tx + 8 * c);
                    s_p[ty + 16 * r][tx + 8 * c] = kp <= qp ? acc[r][c] * scale : NEG_INF;
                }
            }
        }
        __syncthreads();
        // Softmax update: warp w takes rows w * ROWS_PER_WARP.., LANES_PER_ROW lanes per row,
        // each with KEYS_PER_LANE consecutive keys; the row's max and sum combine its lanes
        // with a fixed butterfly.
        {
            const unsigned row = warp * ROWS_PER_WARP + lane / LANES_PER_ROW;
            const unsigned k0s = (lane % LANES_PER_ROW) * KEYS_PER_LANE;
            float sc[KEYS_PER_LANE];
            float mx = NEG_INF;
            for (int i = 0; i < KEYS_PER_LANE; i++) {
                sc[i] = s_p[row][k0s + i];
                mx = fmaxf(mx, sc[i]);
            }
            for (int o = LANES_PER_ROW / 2; o > 0; o >>= 1)
                mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, o));
            const float m_new = fmaxf(m_run, mx);
            float sum = 0.0f;
            for (int i = 0; i < KEYS_PER_LANE; i++) {
                const float p = expf(sc[i] - m_new);
                s_p[row][k0s + i] = p;
                sum += p;
            }
            for (int o = LANES_PER_ROW / 2; o > 0; o >>= 1)
                sum += __shfl_xor_sync(FULL_MASK, sum, o);
            const float alpha = expf(m_run - m_new);
            l_run = l_run * alpha + sum;
            m_run = m_new;
            if (k0s == 0) s_alpha[row] = alpha;
        }
        __syncthreads();
        // Output: rows ty + 16 r, dimensions tx + 8 m, keys in position order.
        for (int r = 0; r < RQ; r++) {
            const float alpha = s_alpha[ty + 16 * r];
            for (int m = 0; m < RD; m++) o[r][m] *= alpha;
        }
#pragma unroll 4
        for (int j = 0; j < KT; j++) {
            float v[RD];
            for (int m = 0; m < RD; m++) v[m] = s_v[j][tx + 8 * m];
            for (int r = 0; r < RQ; r++) {
                const float p = s_p[ty + 16 * r][j];
                for (int m = 0; m < RD; m++) o[r][m] = fmaf(p, v[m], o[r][m]);
            }
        }
    }
    if (lane % LANES_PER_ROW == 0) s_l[warp * ROWS_PER_WARP + lane / LANES_PER_ROW] = l_run;
    __syncthreads();
    for (int r = 0; r < RQ; r++) {
        const unsigned row = ty + 16 * r, t = t0 + row;
        if (t >= n_tok) continue;
        const float l = s_l[row];
        for (int m = 0; m < RD; m++)
            out[(size_t)t * q_dim + head * D + tx + 8 * m] = to_bf16_bits(o[r][m] / l);
    }
}

#define ATTENTION_PREFILL(D, QT, KT)                                                              \
    extern "C" __global__ void __launch_bounds__(128) attention_prefill_##D(                      \
        const float* __restrict__ qkv, const kv_t* __restrict__ k_cache,                         \
        const kv_t* __restrict__ v_cache, unsigned short* __restrict__ out,                      \
        const int* __restrict__ step, unsigned n_tok, unsigned n_head, unsigned n_head_kv,        \
        float scale, unsigned stride) {                                                           \
        attention_prefill<D, QT, KT>(qkv, k_cache, v_cache, out, step, n_tok, n_head, n_head_kv, \
                                     scale, stride);                                              \
    }

ATTENTION_PREFILL(32, 32, 32)
ATTENTION_PREFILL(64, 32, 32)
ATTENTION_PREFILL(128, 32, 16)
ATTENTION_PREFILL(256, 16, 8)

#if __CUDA_ARCH__ >= 800
// The same attention on tensor cores (sm_80 and later), for head sizes 64 and 128: TF32
// mma.sync (m16n8k8, f32 accumulation), FlashAttention-2's layout. Block (head, tile) takes
// MMA_QT = 64 queries of one head, 16 per warp; the longest (last) tiles are scheduled first.
// Each warp keeps its queries as A fragments in registers and, per tile of KT cached
// positions (staged in shared memory, rounded to TF32, rows padded by 4 floats so that
// fragment reads hit 32 distinct banks), computes its 16 x KT scores S = Q K^T, masks and
// scales them, updates each row's running max and sum (a row's four lanes combined by a
// fixed butterfly), and adds P V into its 16 x D accumulators. P's accumulator layout feeds
// the next mma as its A operand once the keys inside each group of eight are taken in the
// order 0, 2, 4, 6, 1, 3, 5, 7, which V's B fragments follow. Every sum runs in an order
// fixed by the tile sizes, so results are bitwise reproducible.
//
// Grid (n_head, ceil(n_tok / MMA_QT)), block 128. out: (n_tok, n_head * D) bf16.
#define MMA_QT 64

__device__ __forceinline__ unsigned to_tf32(float f) {
    unsigned r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(f));
    return r;
}

// d += a b for one m16n8k8 TF32 tile: a (16 x 8) as four registers, b (8 x 8) as two.
__device__ __forceinline__ void mma_tf32(float (&d)[4], unsigned a0, unsigned a1, unsigned a2,
                                         unsigned a3, unsigned b0, unsigned b1) {
    asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

template <int D, int KT>
__device__ __forceinline__ void attention_prefill_mma(const float* __restrict__ qkv,
                                                      const kv_t* __restrict__ k_cache,
                                                      const kv_t* __restrict__ v_cache,
                                                      unsigned short* __restrict__ out,
                                                      const int* __restrict__ step,
                                                      unsigned n_tok, unsigned n_head,
                                                      unsigned n_head_kv, float scale,
                                                      unsigned stride) {
    constexpr int KS = D + 4;   // a staged row's stride, in floats
    constexpr int NB = KT / 8;  // groups of eight keys in a tile
    constexpr int DB = D / 8;   // groups of eight dimensions
    __shared__ __align__(16) float s_k[KT * KS];
    __shared__ __align__(16) float s_v[KT * KS];

    pdl_wait();
    pdl_launch_dependents();
    const unsigned tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const unsigned g = lane / 4, tq = lane % 4;  // mma fragment coordinates
    const unsigned head = blockIdx.x, t0 = (gridDim.y - 1 - blockIdx.y) * MMA_QT;
    const int step0 = step[0];
    const unsigned q_dim = n_head * D, kv_dim = n_head_kv * D;
    const unsigned kv_off = (head / (n_head / n_head_kv)) * D;
    const unsigned t_end = t0 + MMA_QT < n_tok ? t0 + MMA_QT : n_tok;
    const int last = step0 + (int)t_end - 1;  // the block's last query position
    const unsigned r0 = t0 + warp * 16 + g, r1 = r0 + 8;  // this thread's two query rows
    const int qp0 = step0 + (int)r0, qp1 = step0 + (int)r1;
    const int warp_last = step0 + (int)(t0 + warp * 16 + 15);

    unsigned qa[DB][4];
    {
        const float* q0 = qkv + (size_t)r0 * stride + head * D;
        const float* q1 = qkv + (size_t)r1 * stride + head * D;
        for (int kb = 0; kb < DB; kb++) {
            const unsigned c = kb * 8 + tq;
            qa[kb][0] = to_tf32(r0 < n_tok ? q0[c] : 0.0f);
            qa[kb][1] = to_tf32(r1 < n_tok ? q1[c] : 0.0f);
            qa[kb][2] = to_tf32(r0 < n_tok ? q0[c + 4] : 0.0f);
            qa[kb][3] = to_tf32(r1 < n_tok ? q1[c + 4] : 0.0f);
        }
    }
    float o[DB][4];
    for (int db = 0; db < DB; db++) o[db][0] = o[db][1] = o[db][2] = o[db][3] = 0.0f;
    float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.0f, l1 = 0.0f;  // rows r0, r1 (l: this lane's part)

    for (int k0 = 0; k0 <= last; k0 += KT) {
        __syncthreads();  // the previous tile is used up
        for (unsigned i = tid; i < KT * D / 4; i += blockDim.x) {
            const unsigned j = i / (D / 4), d = 4 * (i % (D / 4));
            const int p = k0 + (int)j;
            float4 kv4, vv4;
            kv_at(k_cache, v_cache, p, last, kv_dim, kv_off + d, kv4, vv4);
            *(uint4*)&s_k[j * KS + d] =
                make_uint4(to_tf32(kv4.x), to_tf32(kv4.y), to_tf32(kv4.z), to_tf32(kv4.w));
            *(uint4*)&s_v[j * KS + d] =
                make_uint4(to_tf32(vv4.x), to_tf32(vv4.y), to_tf32(vv4.z), to_tf32(vv4.w));
        }
        __syncthreads();
        if (k0 > warp_last) continue;  // every key of the tile is after this warp's queries
        const unsigned* sk = (const unsigned*)s_k;
        const unsigned* sv = (const unsigned*)s_v;
        float s[NB][4];
        for (int nb = 0; nb < NB; nb++) {
            s[nb][0] = s[nb][1] = s[nb][2] = s[nb][3] = 0.0f;
            const unsigned* krow = sk + (nb * 8 + g) * KS + tq;
            for (int kb = 0; kb < DB; kb++)
                mma_tf32(s[nb], qa[kb][0], qa[kb][1], qa[kb][2], qa[kb][3], krow[kb * 8],
                         krow[kb * 8 + 4]);
        }
        float mx0 = NEG_INF, mx1 = NEG_INF;
        for (int nb = 0; nb < NB; nb++) {
            for (int e = 0; e < 4; e++) {
                const int kp = k0 + nb * 8 + 2 * (int)tq + (e & 1);
                s[nb][e] = kp <= (e < 2 ? qp0 : qp1) ? s[nb][e] * scale : NEG_INF;
            }
            mx0 = fmaxf(mx0, fmaxf(s[nb][0], s[nb][1]));
            mx1 = fmaxf(mx1, fmaxf(s[nb][2], s[nb][3]));
        }
        for (int x = 1; x < 4; x <<= 1) {
            mx0 = fmaxf(mx0, __shfl_xor_sync(FULL_MASK, mx0, x));
            mx1 = fmaxf(mx1, __shfl_xor_sync(FULL_MASK, mx1, x));
        }
        // The first tile always holds position 0, which every query sees: the maxima are
        // finite from then on.
        const float n0 = fmaxf(m0, mx0), n1 = fmaxf(m1, mx1);
        const float alpha0 = expf(m0 - n0), alpha1 = expf(m1 - n1);
        m0 = n0, m1 = n1;
        float sum0 = 0.0f, sum1 = 0.0f;
        for (int nb = 0; nb < NB; nb++) {
            s[nb][0] = expf(s[nb][0] - n0), s[nb][1] = expf(s[nb][1] - n0);
            s[nb][2] = expf(s[nb][2] - n1), s[nb][3] = expf(s[nb][3] - n1);
            sum0 += s[nb][0] + s[nb][1];
            sum1 += s[nb][2] + s[nb][3];
        }
        l0 = l0 * alpha0 + sum0, l1 = l1 * alpha1 + sum1;
        for (int db = 0; db < DB; db++) {
            o[db][0] *= alpha0, o[db][1] *= alpha0;
            o[db][2] *= alpha1, o[db][3] *= alpha1;
        }
        for (int nb = 0; nb < NB; nb++) {
            const unsigned a0 = to_tf32(s[nb][0]), a1 = to_tf32(s[nb][2]);
            const unsigned a2 = to_tf32(s[nb][1]), a3 = to_tf32(s[nb][3]);
            const unsigned* vrow = sv + (nb * 8 + 2 * tq) * KS + g;
            for (int db = 0; db < DB; db++)
                mma_tf32(o[db], a0, a1, a2, a3, vrow[db * 8], vrow[KS + db * 8]);
        }
    }
    for (int x = 1; x < 4; x <<= 1) {
        l0 += __shfl_xor_sync(FULL_MASK, l0, x);
        l1 += __shfl_xor_sync(FULL_MASK, l1, x);
    }
    for (int db = 0; db < DB; db++) {
        const unsigned col = head * D + db * 8 + 2 * tq;
        if (r0 < n_tok)
            *(unsigned*)(out + (size_t)r0 * q_dim + col) =
                to_bf16_bits(o[db][0] / l0) | (unsigned)to_bf16_bits(o[db][1] / l0) << 16;
        if (r1 < n_tok)
            *(unsigned*)(out + (size_t)r1 * q_dim + col) =
                to_bf16_bits(o[db][2] / l1) | (unsigned)to_bf16_bits(o[db][3] / l1) << 16;
    }
}

#define ATTENTION_PREFILL_MMA(D, KT)                                                              \
    extern "C" __global__ void __launch_bounds__(128) attention_prefill_mma_##D(                  \
        const float* __restrict__ qkv, const kv_t* __restrict__ k_cache,                         \
        const kv_t* __restrict__ v_cache, unsigned short* __restrict__ out,                      \
        const int* __restrict__ step, unsigned n_tok, unsigned n_head, unsigned n_head_kv,        \
        float scale, unsigned stride) {                                                           \
        attention_prefill_mma<D, KT>(qkv, k_cache, v_cache, out, step, n_tok, n_head, n_head_kv, \
                                     scale, stride);                                              \
    }

ATTENTION_PREFILL_MMA(64, 64)
ATTENTION_PREFILL_MMA(128, 32)
#endif

// The k largest logits (top.rs's order: logit descending in IEEE total order, ties to the
// smaller token), in two launches. A candidate is a 64-bit key, the logit's order key above
// ~token, so that a larger key comes first; 0 is no candidate. Keys are unique (the token is
// in them), so every way of finding the largest gives the same selection.
//
// top_k_blocks: block b takes logits TOP_CHUNK b .. TOP_CHUNK (b + 1) - 1 and writes its
// first k keys in order to cand[k b ..]: for k = 1 their maximum (a block reduction), else
// all of them sorted by a bitonic network (descending) in shared memory.
// Grid (ceil(n / TOP_CHUNK)), block 256, k <= TOP_MAX.
// top_k_merge: one warp merges the sorted lists, k rounds of taking the largest head, and
// writes (token, logit bits) pairs to out[2 i], out[2 i + 1]. Grid (1), block 32.
// top_k_blocks_many, top_k_merge_many: the same for every TopJob of a table (the jobs'
// logits rows of n each), job j's lists in cand[j TOP_MAX lists ..]. Grids (lists, jobs) and
// (jobs).
// TOP_CHUNK, TOP_MAX and TOP_MAX_LISTS come from constants.cuh (the host's numbers).

struct TopJob {
    const float* logits;
    unsigned* out;
    unsigned k;
    unsigned pad;
};

__device__ __forceinline__ unsigned order_key(float logit) {
    unsigned bits = __float_as_uint(logit);
    return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

__device__ __forceinline__ unsigned long long top_key(const float* logits, unsigned n, unsigned token) {
    return token < n ? ((unsigned long long)order_key(logits[token]) << 32) | (0xffffffffu - token) : 0ull;
}

__device__ __forceinline__ unsigned long long max_u64(unsigned long long a, unsigned long long b) {
    return a > b ? a : b;
}

__device__ void top_k_block(const float* __restrict__ logits, unsigned n, unsigned k,
                            unsigned long long* __restrict__ cand, unsigned blk) {
    __shared__ unsigned long long s_key[TOP_CHUNK];
    const unsigned base = blk * TOP_CHUNK;
    if (k == 1) {
        unsigned long long best = 0ull;
        for (unsigned i = threadIdx.x; i < TOP_CHUNK; i += blockDim.x)
            best = max_u64(best, top_key(logits, n, base + i));
        for (int o = 16; o > 0; o >>= 1) best = max_u64(best, __shfl_xor_sync(0xffffffffu, best, o));
        if ((threadIdx.x & 31) == 0) s_key[threadIdx.x >> 5] = best;
        __syncthreads();
        if (threadIdx.x == 0) {
            for (unsigned w = 1; w < blockDim.x / 32; w++) best = max_u64(best, s_key[w]);
            cand[blk] = best;
        }
        return;
    }
    for (unsigned i = threadIdx.x; i < TOP_CHUNK; i += blockDim.x) s_key[i] = top_key(logits, n, base + i);
    __syncthreads();
    for (unsigned size = 2; size <= TOP_CHUNK; size <<= 1) {
        for (unsigned stride = size >> 1; stride > 0; stride >>= 1) {
            for (unsigned i = threadIdx.x; i < TOP_CHUNK; i += blockDim.x) {
                const unsigned j = i ^ stride;
                if (j > i) {
                    const unsigned long long a = s_key[i], b = s_key[j];
                    const bool descending = (i & size) == 0;
                    if (descending ? a < b : a > b) {
                        s_key[i] = b;
                        s_key[j] = a;
                    }
                }
            }
            __syncthreads();
        }
    }
    for (unsigned i = threadIdx.x; i < k; i += blockDim.x) cand[(size_t)blk * k + i] = s_key[i];
}

__device__ void top_k_merge_lists(const unsigned long long* __restrict__ cand, unsigned lists, unsigned k,
                                  const float* __restrict__ logits, unsigned* __restrict__ out) {
    __shared__ unsigned s_head[TOP_MAX_LISTS];
    const unsigned lane = threadIdx.x;
    for (unsigned l = lane; l < lists; l += 32) s_head[l] = 0;
    __syncwarp();
    for (unsigned r = 0; r < k; r++) {
        unsigned long long best = 0ull;
        unsigned from = 0;
        for (unsigned l = lane; l < lists; l += 32) {
            const unsigned h = s_head[l];
            const unsigned long long key = h < k ? cand[(size_t)l * k + h] : 0ull;
            if (key > best) {
                best = key;
                from = l;
            }
        }
        for (int o = 16; o > 0; o >>= 1) {
            const unsigned long long other = __shfl_xor_sync(0xffffffffu, best, o);
            const unsigned other_from = __shfl_xor_sync(0xffffffffu, from, o);
            if (other > best) {
                best = other;
                from = other_from;
            }
        }
        if (lane == 0) {
            const unsigned token = 0xffffffffu - (unsigned)(best & 0xffffffffu);
            s_head[from] += 1;
            out[2 * r] = token;
            out[2 * r + 1] = __float_as_uint(logits[token]);
        }
        __syncwarp();
    }
}

extern "C" __global__ void __launch_bounds__(256)
top_k_blocks(const float* __restrict__ logits, unsigned n, unsigned k,
             unsigned long long* __restrict__ cand) {
    pdl_wait();
    pdl_launch_dependents();
    top_k_block(logits, n, k, cand, blockIdx.x);
}

extern "C" __global__ void __launch_bounds__(32)
top_k_merge(const unsigned long long* __restrict__ cand, unsigned lists, unsigned k,
            const float* __restrict__ logits, unsigned* __restrict__ out) {
    pdl_wait();
    pdl_launch_dependents();
    top_k_merge_lists(cand, lists, k, logits, out);
}

extern "C" __global__ void __launch_bounds__(256)
top_k_blocks_many(const TopJob* __restrict__ jobs, unsigned n, unsigned long long* __restrict__ cand) {
    pdl_wait();
    pdl_launch_dependents();
    const TopJob job = jobs[blockIdx.y];
    if (job.k == 0) return;
    top_k_block(job.logits, n, job.k, cand + (size_t)blockIdx.y * gridDim.x * TOP_MAX, blockIdx.x);
}

extern "C" __global__ void __launch_bounds__(32)
top_k_merge_many(const TopJob* __restrict__ jobs, unsigned lists, const unsigned long long* __restrict__ cand) {
    pdl_wait();
    pdl_launch_dependents();
    const TopJob job = jobs[blockIdx.x];
    if (job.k == 0) return;
    top_k_merge_lists(cand + (size_t)blockIdx.x * lists * TOP_MAX, lists, job.k, job.logits, job.out);
}

// A greedy step run ahead: step[0] = pos, step[1] = the token of the (token, logit bits) pair
// at `pair` (the step before's selection). Grid (1), block 32.
extern "C" __global__ void __launch_bounds__(32)
next_step(const unsigned* __restrict__ pair, int* __restrict__ step, int pos) {
    pdl_wait();
    pdl_launch_dependents();
    if (threadIdx.x == 0) {
        step[0] = pos;
        step[1] = (int)pair[0];
    }
}

// The token ids of a batched greedy step enqueued ahead of its calls (batch.rs's BatchAhead):
// ids[i] is the token of the (token, logit bits) pair at src[i], a selection of the step
// before. Grid 1, block 64.
extern "C" __global__ void __launch_bounds__(64)
next_ids(const unsigned long long* __restrict__ src, int* __restrict__ ids, unsigned n) {
    pdl_wait();
    pdl_launch_dependents();
    for (unsigned i = threadIdx.x; i < n; i += blockDim.x) {
        ids[i] = (int)*(const unsigned*)src[i];
    }
}

// Reads the n 16-byte words at p, each once, and nothing else: the read-only roofline that
// `tern bench decode` prints beside the copy's. Each thread XORs what it loads and stores it
// only if it is one value the bench's zeroed buffer cannot give, so that no load is dropped.
// Grid any, block 256.
extern "C" __global__ void __launch_bounds__(256)
read_all(const uint4* __restrict__ p, unsigned long long n, unsigned* __restrict__ out) {
    pdl_wait();
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    unsigned s = 0;
    for (; i + 3 * stride < n; i += 4 * stride) {
        uint4 v[4];
        for (int k = 0; k < 4; ++k) {
            asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                : "=r"(v[k].x), "=r"(v[k].y), "=r"(v[k].z), "=r"(v[k].w)
                : "l"(p + i + k * stride));
        }
        for (int k = 0; k < 4; ++k) {
            s ^= v[k].x ^ v[k].y ^ v[k].z ^ v[k].w;
        }
    }
    for (; i < n; i += stride) {
        const uint4 v = p[i];
        s ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    if (s == 0x9e3779b9u) {
        out[0] = s;
    }
}
