// The Llama forward pass's element-wise and attention kernels (matrix-vector products are in
// matvec.cu). Compiled by NVRTC for the device's architecture; no headers.
//
// Every reduction runs in a fixed order (fixed thread-to-element assignment, fixed
// shuffle trees, fixed split sizes), so results are bitwise reproducible run to run and do
// not depend on what else runs on the GPU. Positions are read from device memory (`step`),
// so one captured CUDA graph serves every decode step.
//
// Layouts: activations are row-major `[token][width]` f32; a layer's KV cache is
// `[position][n_head_kv * head_dim]` f32; `step[0]` is the first position of this call.

#define WARP 32
#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over a block of `blockDim.x` (a multiple of 32, at most 1024) threads, in a fixed order.
__device__ float block_sum(float v, float* shared) {
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP, warps = blockDim.x / WARP;
    v = warp_sum(v);
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    float total = 0.0f;
    for (int i = 0; i < warps; i++) total += shared[i];
    __syncthreads();
    return total;
}

// out[t] = x[t] / rms(x[t]) * w. Grid (n_tok), block 256.
extern "C" __global__ void rmsnorm(const float* __restrict__ x, const float* __restrict__ w,
                                   float* __restrict__ out, unsigned n, float eps) {
    __shared__ float shared[32];
    const float* xr = x + (size_t)blockIdx.x * n;
    float* o = out + (size_t)blockIdx.x * n;
    float sum = 0.0f;
    for (unsigned i = threadIdx.x; i < n; i += blockDim.x) sum += xr[i] * xr[i];
    float mean_sq = block_sum(sum, shared) / (float)n;
    float scale = 1.0f / sqrtf(mean_sq + eps);
    for (unsigned i = threadIdx.x; i < n; i += blockDim.x) o[i] = xr[i] * scale * w[i];
}

// Rotates the query heads in place and the new key heads, and appends keys and values to the
// layer's cache at positions step[0] + t. Token t's query starts at q + t*stride, its new key
// and value at k_new + t*stride and v_new + t*stride (one fused Q|K|V row per token, or three
// buffers with stride set per buffer by the caller). Grid (n_tok, n_head + n_head_kv),
// block 64. `halves` selects Hugging Face's pairing (i, i + n_rot/2) over adjacent pairs.
extern "C" __global__ void rope_append(float* q, const float* k_new, const float* v_new,
                                       float* __restrict__ k_cache, float* __restrict__ v_cache,
                                       const float* __restrict__ inv_freq,
                                       const int* __restrict__ step, unsigned n_head,
                                       unsigned n_head_kv, unsigned head_dim, unsigned n_rot,
                                       int halves, unsigned stride) {
    unsigned t = blockIdx.x, head = blockIdx.y;
    unsigned kv_dim = n_head_kv * head_dim;
    int pos = step[0] + (int)t;
    bool is_q = head < n_head;
    unsigned kv_head = head - n_head;
    float* dst;
    const float* src;
    if (is_q) {
        dst = q + (size_t)t * stride + head * head_dim;
        src = dst;
    } else {
        src = k_new + (size_t)t * stride + kv_head * head_dim;
        dst = k_cache + (size_t)pos * kv_dim + kv_head * head_dim;
        // Values are appended as they are; dimensions past n_rot are copied unrotated.
        const float* vs = v_new + (size_t)t * stride + kv_head * head_dim;
        float* vd = v_cache + (size_t)pos * kv_dim + kv_head * head_dim;
        for (unsigned i = threadIdx.x; i < head_dim; i += blockDim.x) vd[i] = vs[i];
        for (unsigned i = n_rot + threadIdx.x; i < head_dim; i += blockDim.x) dst[i] = src[i];
    }
    for (unsigned i = threadIdx.x; i < n_rot / 2; i += blockDim.x) {
        float angle = (float)pos * inv_freq[i];
        float s, c;
        sincosf(angle, &s, &c);
        unsigned a = halves ? i : 2 * i, b = halves ? i + n_rot / 2 : 2 * i + 1;
        float x0 = src[a], x1 = src[b];
        dst[a] = x0 * c - x1 * s;
        dst[b] = x0 * s + x1 * c;
    }
}

// out[t][i] = silu(gate[t][i]) * up[t][i] for i < n_ff, where token t's gate row starts at
// gate + t*stride and its up row at up + t*stride (one fused gate|up row per token). out is
// (n_tok, n_ff). Grid (ceil(n_ff / 256), n_tok), block 256.
extern "C" __global__ void swiglu(const float* __restrict__ gate, const float* __restrict__ up,
                                  float* __restrict__ out, unsigned n_ff, unsigned stride) {
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x, t = blockIdx.y;
    if (i < n_ff) {
        float g = gate[(size_t)t * stride + i];
        out[(size_t)t * n_ff + i] = g / (1.0f + expf(-g)) * up[(size_t)t * stride + i];
    }
}

// Flash-decoding, part 1. Positions are cut into fixed splits of ATTN_SPLIT; block
// (split, head, t) scores query (t, head) against the positions of its split that are causal
// for it (<= step[0] + t) and writes the split's max score, sum of exponentials and
// unnormalized output. Token t's query heads start at q + t*q_stride. Splits past the
// query's position write nothing.
//
// Block ATTN_SPLIT threads. Thread i scores position first + i (its own key row, read with
// 16-byte loads); the block takes the max and the sum of exponentials in a fixed order; then
// each output dimension sums weight * value over the split's positions in position order,
// the positions dealt to `blockDim.x / head_dim` threads per dimension whose partial sums
// are added in a fixed order. head_dim <= 256, a multiple of 4 that divides ATTN_SPLIT.
#define ATTN_SPLIT 128

__device__ float block_max(float v, float* shared) {
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP, warps = blockDim.x / WARP;
    v = warp_max(v);
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    float m = shared[0];
    for (int i = 1; i < warps; i++) m = fmaxf(m, shared[i]);
    __syncthreads();
    return m;
}

extern "C" __global__ void __launch_bounds__(ATTN_SPLIT)
attn_split(const float* __restrict__ q, const float* __restrict__ k_cache,
           const float* __restrict__ v_cache, float* __restrict__ part_o,
           float* __restrict__ part_ml, const int* __restrict__ step, unsigned n_head,
           unsigned n_head_kv, unsigned head_dim, unsigned n_split, float scale,
           unsigned q_stride) {
    __shared__ __align__(16) float s_q[256];
    __shared__ float s_w[ATTN_SPLIT];
    __shared__ float s_part[ATTN_SPLIT];
    __shared__ float s_red[32];
    unsigned split = blockIdx.x, head = blockIdx.y, t = blockIdx.z, tid = threadIdx.x;
    int last = step[0] + (int)t;  // the last position this query sees
    int first = (int)(split * ATTN_SPLIT);
    if (first > last) return;
    int count = last + 1 - first < ATTN_SPLIT ? last + 1 - first : ATTN_SPLIT;
    unsigned kv_dim = n_head_kv * head_dim;
    unsigned kv_off = (head / (n_head / n_head_kv)) * head_dim;
    const float* qh = q + (size_t)t * q_stride + head * head_dim;
    for (unsigned d = tid; d < head_dim; d += blockDim.x) s_q[d] = qh[d];
    __syncthreads();

    float score = NEG_INF;
    if ((int)tid < count) {
        const float4* k = (const float4*)(k_cache + (size_t)(first + tid) * kv_dim + kv_off);
        const float4* qv = (const float4*)s_q;
        float dot = 0.0f;
        for (unsigned j = 0; j < head_dim / 4; j++) {
            float4 a = k[j], b = qv[j];
            dot += a.x * b.x;
            dot += a.y * b.y;
            dot += a.z * b.z;
            dot += a.w * b.w;
        }
        score = dot * scale;
    }
    float m = block_max(score, s_red);
    float w = (int)tid < count ? expf(score - m) : 0.0f;
    s_w[tid] = w;
    float l = block_sum(w, s_red);  // also makes s_w visible to every thread

    unsigned lanes = blockDim.x / head_dim;  // threads per output dimension
    unsigned d = tid % head_dim, part = tid / head_dim;
    float acc = 0.0f;
    if (part < lanes) {
        const float* v = v_cache + (size_t)first * kv_dim + kv_off + d;
        for (int p = (int)part; p < count; p += (int)lanes) acc += s_w[p] * v[(size_t)p * kv_dim];
    }
    s_part[tid] = acc;
    __syncthreads();
    size_t slot = ((size_t)t * n_head + head) * n_split + split;
    if (tid < head_dim) {
        float o = 0.0f;
        for (unsigned i = 0; i < lanes; i++) o += s_part[i * head_dim + tid];
        part_o[slot * head_dim + tid] = o;
    }
    if (tid == 0) {
        part_ml[slot * 2] = m;
        part_ml[slot * 2 + 1] = l;
    }
}

// Flash-decoding, part 2: merges the splits of query (t, head) in split order.
// Grid (n_head, n_tok), block head_dim threads.
extern "C" __global__ void attn_merge(const float* __restrict__ part_o,
                                      const float* __restrict__ part_ml, float* __restrict__ out,
                                      const int* __restrict__ step, unsigned n_head,
                                      unsigned head_dim, unsigned n_split) {
    unsigned head = blockIdx.x, t = blockIdx.y, d = threadIdx.x;
    int last = step[0] + (int)t;
    unsigned used = (unsigned)(last / ATTN_SPLIT) + 1;
    if (used > n_split) used = n_split;
    size_t base = ((size_t)t * n_head + head) * n_split;
    float m_all = NEG_INF;
    for (unsigned s = 0; s < used; s++) m_all = fmaxf(m_all, part_ml[(base + s) * 2]);
    float l_all = 0.0f, o = 0.0f;
    for (unsigned s = 0; s < used; s++) {
        float f = expf(part_ml[(base + s) * 2] - m_all);
        l_all += part_ml[(base + s) * 2 + 1] * f;
        o += part_o[(base + s) * head_dim + d] * f;
    }
    out[((size_t)t * n_head + head) * head_dim + d] = o / l_all;
}
