// The decode attention's device code (see attention below), shared by llama.cu's attention
// kernel and decode.cu's persistent decode kernel.

#ifndef TERN_ATTENTION_CUH
#define TERN_ATTENTION_CUH

#include "common.cuh"

// Attention of n_tok queries over one layer's cache, with this call's rotary embedding and
// KV append fused in (flash-decoding with a fixed reduction order).
//
// qkv holds one fused q | k | v row per token (`stride` floats apart), as the QKV matrix
// product wrote it, unrotated. Positions are cut into splits of ATTN_SPLIT; item
// (split, head, t) takes query (t, head) against the split's positions that are causal for
// it (<= step[0] + t) and exits at once when there are none. An item may take `heads` query
// heads of one KV group from `head` on (1, or n_head / n_head_kv from the group's first),
// one after another over the keys and values it read once, each head with the arithmetic of
// an item of its own: the same bits, and a group's cache rows read once, not once a head.
// It rotates the query, and the
// keys of this call's positions that fall in the split, into shared memory and reads those
// keys and values from there, older ones from the cache. The block of the first query head
// of each KV group whose split holds the query's own position appends that position's
// rotated key and value to the cache: one writer per position, and no block of the same
// launch reads those cache rows.
//
// Each block scores its positions (L lanes of a warp per key row, 16-byte loads, the lanes'
// partial dots summed by a fixed butterfly), takes the max and the sum of exponentials in
// one warp in a fixed order, then sums weight * value per dimension over the positions in
// a fixed deal of positions to thread groups whose partial sums are added in group order.
// A query with one split writes its output directly. Otherwise every block writes its
// max, sum and unnormalized output; the last of the query's blocks to finish (a ticket
// counter, which decides only who merges, never the order) merges the splits in split order
// and resets the ticket for the next launch. So results are bitwise reproducible.
//
// One item (split, head, t) is taken by a Team of ATTN_THREADS threads: a whole block of
// llama.cu's attention kernels (which may take several splits in turn), or one of the teams
// of decode.cu's persistent kernel. (attention_group below computes the same items of one
// new position for a KV group's heads at once.) D = head_dim, one of 32, 64, 128, 256; n_tok
// <= NEW (at most ATTN_MAX_NEW). part_o: (n_tok, n_head, n_split, D), part_ml: (.., 2),
// tickets: (n_tok, n_head) zeros, out: (n_tok, n_head * D). qkv and out are read and written
// with ordinary (coherent) accesses: in decode.cu, other blocks of the same launch write qkv.
// ATTN_SPLIT, ATTN_THREADS, ATTN_MAX_NEW and ATTN_GROUP_MAX come from constants.cuh (the
// host's numbers).

// The threads that take one attention item together: thread `tid` of ATTN_THREADS, which
// synchronize with __syncthreads when they are the whole block (bar 0), else with named
// barrier `bar` (1-15) of ATTN_THREADS threads.
struct Team {
    unsigned tid, bar;
    __device__ __forceinline__ void sync() const {
        if (bar == 0) {
            __syncthreads();
        } else {
            asm volatile("bar.sync %0, %1;" ::"r"(bar), "n"(ATTN_THREADS) : "memory");
        }
    }
};

// A team's shared memory for items of head size D and up to NEW new positions.
template <int D, int NEW>
struct AttnShared {
    static constexpr unsigned L = D / 4 < 32 ? D / 4 : 32;  // lanes per key or value row
    static constexpr unsigned G = ATTN_THREADS / L;         // thread groups summing values
    __align__(16) float q[D];
    __align__(16) float k[NEW][D];
    __align__(16) float v[NEW][D];
    __align__(16) float part[G * D];
    float w[ATTN_SPLIT];
    float ml[2];
    unsigned merge;
};

// Rotates the n_rot / 2 pairs of a head for position `pos` from src into dst (which may be
// src): Hugging Face's pairing (i, i + n_rot/2) when `halves`, else adjacent pairs. Thread
// `tid` of `threads` takes every threads-th pair from its own on.
// With KEY, each value written is rounded as the KV cache stores it (kv_round).
template <bool KEY>
__device__ __forceinline__ void rope_pairs(unsigned tid, unsigned threads, const float* src,
                                           float* dst, int pos, const float* __restrict__ inv_freq,
                                           unsigned n_rot, int halves) {
    for (unsigned i = tid; i < n_rot / 2; i += threads) {
        float angle = (float)pos * inv_freq[i];
        float s, c;
        sincosf(angle, &s, &c);
        unsigned a = halves ? i : 2 * i, b = halves ? i + n_rot / 2 : 2 * i + 1;
        float x0 = src[a], x1 = src[b];
        const float ya = x0 * c - x1 * s, yb = x0 * s + x1 * c;
        dst[a] = KEY ? kv_round(ya) : ya;
        dst[b] = KEY ? kv_round(yb) : yb;
    }
}

// dst[0..d) = src rotated for position `pos` (see rope_pairs); dimensions from n_rot on are
// copied as they are (rounded too, with KEY).
template <bool KEY>
__device__ __forceinline__ void rope_head(unsigned tid, unsigned threads, const float* src,
                                          float* dst, int pos, const float* __restrict__ inv_freq,
                                          unsigned n_rot, int halves, unsigned d) {
    rope_pairs<KEY>(tid, threads, src, dst, pos, inv_freq, n_rot, halves);
    for (unsigned i = n_rot + tid; i < d; i += threads)
        dst[i] = KEY ? kv_round(src[i]) : src[i];
}

// rope_head of a head of D dimensions.
template <int D, bool KEY>
__device__ __forceinline__ void rope_into(unsigned tid, unsigned threads, const float* src,
                                          float* dst, int pos, const float* __restrict__ inv_freq,
                                          unsigned n_rot, int halves) {
    rope_head<KEY>(tid, threads, src, dst, pos, inv_freq, n_rot, halves, D);
}

// Where an attention writes its outputs a second time, split for the output projection's
// tensor-core product (common.cuh's SplitOut) as row t of its T tokens; nowhere where to.hi
// is null.
struct AttnSplit {
    SplitOut to;
    unsigned T, t;
    // Columns c and c + 1 of the row (c even).
    __device__ __forceinline__ void put(unsigned c, float x0, float x1) const {
        if (to.hi) split_put(to, T, t, c / 2, x0, x1);
    }
};

__device__ __forceinline__ AttnSplit no_split() {
    return AttnSplit{SplitOut{nullptr, nullptr, 0u, 0u}, 0u, 0u};
}

// A query's `used` splits (max, sum and unnormalized output of each, from `base` on in
// part_ml and part_o) merged in split order into o_row, columns col .. of its token's row
// (and split there); thread `tid` of `threads` takes dimensions 2 tid and 2 tid + 1, then
// 2 (tid + threads) .., each summed as if alone.
template <int D>
__device__ __forceinline__ void merge_splits(unsigned tid, unsigned threads, const float* part_o,
                                             const float* part_ml, size_t base, unsigned used,
                                             float* o_row, const AttnSplit& split_out, unsigned col) {
    float m_all = NEG_INF;
#pragma unroll 8
    for (unsigned s = 0; s < used; s++) m_all = fmaxf(m_all, __ldcg(part_ml + (base + s) * 2));
    for (unsigned d = 2 * tid; d < D; d += 2 * threads) {
        float l_all = 0.0f, o0 = 0.0f, o1 = 0.0f;
#pragma unroll 4
        for (unsigned s = 0; s < used; s++) {
            const float f = expf(__ldcg(part_ml + (base + s) * 2) - m_all);
            l_all += __ldcg(part_ml + (base + s) * 2 + 1) * f;
            const float2 p = __ldcg((const float2*)(part_o + (base + s) * D + d));
            o0 += p.x * f;
            o1 += p.y * f;
        }
        const float r0 = o0 / l_all, r1 = o1 / l_all;
        o_row[d] = r0;
        o_row[d + 1] = r1;
        split_out.put(col + d, r0, r1);
    }
}

template <int D, int NEW>
__device__ __forceinline__ void attention(const Team& team, AttnShared<D, NEW>& sh,
                                          unsigned split, unsigned head, unsigned heads,
                                          unsigned t, int step0,
                                          const float* qkv, kv_t* k_cache, kv_t* v_cache,
                                          const float* __restrict__ inv_freq, float* part_o,
                                          float* part_ml, unsigned* tickets, float* out,
                                          unsigned n_head, unsigned n_head_kv, unsigned n_rot,
                                          int halves, unsigned n_split, float scale,
                                          unsigned stride, const AttnSplit& split_out) {
    constexpr unsigned L = AttnShared<D, NEW>::L, F = D / (4 * L);  // float4s per lane and row
    constexpr unsigned P = 32 / L;                                  // rows per warp and pass
    constexpr unsigned WARPS = ATTN_THREADS / 32;
    constexpr unsigned G = AttnShared<D, NEW>::G;
    float* s_q = sh.q;
    float (*s_k)[D] = sh.k;
    float (*s_v)[D] = sh.v;
    float* s_part = sh.part;
    float* s_w = sh.w;
    float* s_ml = sh.ml;

    const unsigned tid = team.tid;
    const int last = step0 + (int)t, first = (int)(split * ATTN_SPLIT);
    if (first > last) return;
    const int count = last + 1 - first < ATTN_SPLIT ? last + 1 - first : ATTN_SPLIT;
    const unsigned q_dim = n_head * D, kv_dim = n_head_kv * D;
    const unsigned group = n_head / n_head_kv, kv_off = (head / group) * D;

    // The cached keys and values this thread reads (positions before this call's), loaded
    // first so that their latency overlaps the rotations below.
    constexpr unsigned PASSES = ATTN_SPLIT / (WARPS * P), VSTEPS = ATTN_SPLIT / G;
    const unsigned warp = tid / 32, lane = tid % 32;
    const unsigned sub = lane / L, ek = lane % L, g = tid / L, ev = tid % L;
    float4 kr[PASSES][F], vr[VSTEPS][F];
#pragma unroll
    for (unsigned pass = 0; pass < PASSES; pass++) {
        const int pl = (int)((pass * WARPS + warp) * P + sub), p = first + pl;
        const kv_t* k = k_cache + (size_t)p * kv_dim + kv_off;
#pragma unroll
        for (unsigned f = 0; f < F; f++)
            kr[pass][f] = pl < count && p < step0 ? kv_load4(k + 4 * (ek + L * f))
                                                  : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
#pragma unroll
    for (unsigned i = 0; i < VSTEPS; i++) {
        const int pl = (int)(g + i * G), p = first + pl;
        const kv_t* v = v_cache + (size_t)p * kv_dim + kv_off;
#pragma unroll
        for (unsigned f = 0; f < F; f++)
            vr[i][f] = pl < count && p < step0 ? kv_load4(v + 4 * (ev + L * f))
                                               : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }

    // This call's positions step0 + j that the split holds and the query sees: j0 <= j <= t.
    const int j0 = first > step0 ? first - step0 : 0;
    for (int j = j0; j <= (int)t; j++) {
        const float* row = qkv + (size_t)j * stride;
        rope_into<D, true>(tid, ATTN_THREADS, row + q_dim + kv_off, s_k[j], step0 + j, inv_freq,
                           n_rot, halves);
        for (unsigned d = tid; d < D; d += ATTN_THREADS)
            s_v[j][d] = kv_round(row[q_dim + kv_dim + kv_off + d]);
    }
    for (unsigned h = head; h < head + heads; h++) {
        // Each head with the arithmetic of an item of its own; the sync keeps the head before's
        // readers of the shared memory ahead of this head's writers.
        if (h > head) team.sync();
        rope_into<D, false>(tid, ATTN_THREADS, qkv + (size_t)t * stride + h * D, s_q, last,
                            inv_freq, n_rot, halves);
        team.sync();
        if (h % group == 0 && last - first < ATTN_SPLIT) {
            size_t at = (size_t)last * kv_dim + kv_off;
            for (unsigned d = tid; d < D; d += ATTN_THREADS) {
                kv_store(k_cache + at + d, s_k[t][d]);  // already rounded: exact
                kv_store(v_cache + at + d, s_v[t][d]);
            }
        }

    #pragma unroll
        for (unsigned pass = 0; pass < PASSES; pass++) {
            const int pl = (int)((pass * WARPS + warp) * P + sub), p = first + pl;
            float dot = 0.0f;
            if (pl < count) {
    #pragma unroll
                for (unsigned f = 0; f < F; f++) {
                    const float4 a = p >= step0 ? *(const float4*)(s_k[p - step0] + 4 * (ek + L * f))
                                                : kr[pass][f];
                    const float4 b = *(const float4*)(s_q + 4 * (ek + L * f));
                    dot = fmaf(a.x, b.x, dot);
                    dot = fmaf(a.y, b.y, dot);
                    dot = fmaf(a.z, b.z, dot);
                    dot = fmaf(a.w, b.w, dot);
                }
            }
            for (unsigned o = L / 2; o > 0; o >>= 1) dot += __shfl_xor_sync(FULL_MASK, dot, o);
            if (ek == 0) s_w[pl] = pl < count ? dot * scale : NEG_INF;
        }
        team.sync();
        if (warp == 0) {
            const float a = s_w[lane], b = s_w[lane + 32];
            const float m = warp_max(fmaxf(a, b));
            const float wa = (int)lane < count ? expf(a - m) : 0.0f;
            const float wb = (int)lane + 32 < count ? expf(b - m) : 0.0f;
            s_w[lane] = wa;
            s_w[lane + 32] = wb;
            const float l = warp_sum(wa + wb);
            if (lane == 0) {
                s_ml[0] = m;
                s_ml[1] = l;
            }
        }
        team.sync();
        {
            float4 acc[F];
    #pragma unroll
            for (unsigned f = 0; f < F; f++) acc[f] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    #pragma unroll
            for (unsigned i = 0; i < VSTEPS; i++) {
                const int pl = (int)(g + i * G), p = first + pl;
                if (pl < count) {
                    const float w = s_w[pl];
    #pragma unroll
                    for (unsigned f = 0; f < F; f++) {
                        const float4 x = p >= step0 ? *(const float4*)(s_v[p - step0] + 4 * (ev + L * f))
                                                    : vr[i][f];
                        acc[f].x = fmaf(w, x.x, acc[f].x);
                        acc[f].y = fmaf(w, x.y, acc[f].y);
                        acc[f].z = fmaf(w, x.z, acc[f].z);
                        acc[f].w = fmaf(w, x.w, acc[f].w);
                    }
                }
            }
    #pragma unroll
            for (unsigned f = 0; f < F; f++) *(float4*)(s_part + g * D + 4 * (ev + L * f)) = acc[f];
        }
        team.sync();

        const unsigned query = t * n_head + h;
        const unsigned used = (unsigned)(last / ATTN_SPLIT) + 1;
        float* o_row = out + (size_t)query * D;
        if (used == 1) {
            for (unsigned d = 2 * tid; d < D; d += 2 * ATTN_THREADS) {
                float o0 = 0.0f, o1 = 0.0f;
                for (unsigned i = 0; i < G; i++) {
                    o0 += s_part[i * D + d];
                    o1 += s_part[i * D + d + 1];
                }
                const float r0 = o0 / s_ml[1], r1 = o1 / s_ml[1];
                o_row[d] = r0;
                o_row[d + 1] = r1;
                split_out.put(h * D + d, r0, r1);
            }
            continue;
        }
        const size_t base = (size_t)query * n_split;
        for (unsigned d = tid; d < D; d += ATTN_THREADS) {
            float o = 0.0f;
            for (unsigned i = 0; i < G; i++) o += s_part[i * D + d];
            part_o[(base + split) * D + d] = o;
        }
        if (tid == 0) {
            part_ml[(base + split) * 2] = s_ml[0];
            part_ml[(base + split) * 2 + 1] = s_ml[1];
        }
        __threadfence();
        team.sync();
        if (tid == 0) sh.merge = atomicAdd(&tickets[query], 1u) == used - 1;
        team.sync();
        if (!sh.merge) continue;
        __threadfence();
        merge_splits<D>(tid, ATTN_THREADS, part_o, part_ml, base, used, o_row, split_out, h * D);
        if (tid == 0) tickets[query] = 0;
    }
}

// A block's shared memory for attention_group: STAGES buffers of a split's cached keys and
// values as the cache holds them (a key row's 16-byte units swizzled, see group_unit), a KV
// group's rotated queries, and each head's weights, max and sum. Once a split's scores are
// taken, its key buffer holds the thread groups' weighted sums of HC heads at a time.
// FITS: whether it fits the 48 KiB of static shared memory (two buffers where they fit, so
// that the next split's rows arrive while this one's are used; else one).
template <int D>
struct GroupShared {
    static constexpr unsigned L = AttnShared<D, 1>::L, G = AttnShared<D, 1>::G;
    static constexpr unsigned E = 16 / sizeof(kv_t), UNITS = D / E;         // a row's 16-byte units
    static constexpr size_t ROWS = (size_t)ATTN_SPLIT * D * sizeof(kv_t);  // bytes of K (or V)
    static constexpr size_t HEAD_SUMS = (size_t)G * D * sizeof(float);    // a head's group sums
    static constexpr unsigned HC =
        ROWS / HEAD_SUMS < ATTN_GROUP_MAX ? (unsigned)(ROWS / HEAD_SUMS) : ATTN_GROUP_MAX;
    static constexpr size_t REST =
        ((size_t)ATTN_GROUP_MAX * D + 2 * D + ATTN_GROUP_MAX * (ATTN_SPLIT + 2)) * sizeof(float);
    static constexpr unsigned STAGES = 4 * ROWS + REST <= 48 * 1024 ? 2 : 1;
    static constexpr bool FITS = 2 * ROWS + REST <= 48 * 1024 && HC >= 1;
    __align__(16) kv_t k[STAGES][ATTN_SPLIT][D];
    __align__(16) kv_t v[STAGES][ATTN_SPLIT][D];
    __align__(16) float q[ATTN_GROUP_MAX][D];
    __align__(16) float k_new[D];  // this call's position's key and value, rounded
    __align__(16) float v_new[D];
    float w[ATTN_GROUP_MAX][ATTN_SPLIT];
    float ml[ATTN_GROUP_MAX][2];
};

// Where 16-byte unit u of key row `row` lies in GroupShared's key buffers: swizzled by the row,
// so that a warp's lanes, each reading unit u of its own row, fall on distinct banks.
template <int D>
__device__ __forceinline__ unsigned group_unit(unsigned row, unsigned u) {
    constexpr unsigned U = GroupShared<D>::UNITS, M = U < 8 ? U : 8;
    return u ^ ((row / (8 / M)) % M);
}

// One thread's key row (its units, in order) and the H query heads it scores against it.
template <int D, unsigned H>
struct GroupKey {
    static constexpr unsigned L = AttnShared<D, 1>::L, F = D / (4 * L);
    uint4 raw[GroupShared<D>::UNITS];
    const float* q[H];

    // Dimensions 4c .. 4c + 3 of the row, widened as kv_load4 widens them (c is known at
    // compile time where this is unrolled, so raw stays in registers).
    __device__ __forceinline__ float4 chunk(unsigned c) const {
#ifdef TERN_KV_F16
        const uint4 u = raw[c / 2];
        return kv_widen4(c % 2 ? make_uint2(u.z, u.w) : make_uint2(u.x, u.y));
#else
        const uint4 u = raw[c];
        return make_float4(__uint_as_float(u.x), __uint_as_float(u.y), __uint_as_float(u.z),
                           __uint_as_float(u.w));
#endif
    }

    // Lane J's partial dot of `attention`'s L lanes for each head: its fma chain over
    // dimensions 4 (J + L f) .. + 3, f < F.
    template <unsigned J>
    __device__ __forceinline__ void lane(float (&out)[H]) const {
        float4 k[F];
#pragma unroll
        for (unsigned f = 0; f < F; f++) k[f] = chunk(J + L * f);
#pragma unroll
        for (unsigned h = 0; h < H; h++) {
            float dot = 0.0f;
#pragma unroll
            for (unsigned f = 0; f < F; f++) {
                const float4 b = *(const float4*)(q[h] + 4 * (J + L * f));
                dot = fmaf(k[f].x, b.x, dot);
                dot = fmaf(k[f].y, b.y, dot);
                dot = fmaf(k[f].z, b.z, dot);
                dot = fmaf(k[f].w, b.w, dot);
            }
            out[h] = dot;
        }
    }
};

// The sum that `attention`'s butterfly (lanes xor L/2, .., 1) makes of the L lanes' partial
// dots, taken by one thread: tree<J, 1> with tree<J, S> = tree<J, 2S> + tree<J + S, 2S> and
// tree<J, L> lane J's partial (after the butterfly every lane holds this sum, or its mirror,
// which is equal), for H heads at once.
template <unsigned L, unsigned J, unsigned S, class Key, unsigned H>
__device__ __forceinline__ void group_tree(const Key& key, float (&out)[H]) {
    if constexpr (S == L) {
        key.template lane<J>(out);
    } else {
        float a[H], b[H];
        group_tree<L, J, 2 * S>(key, a);
        group_tree<L, J + S, 2 * S>(key, b);
#pragma unroll
        for (unsigned h = 0; h < H; h++) out[h] = a[h] + b[h];
    }
}

// A split's scores into sh.w: thread tid takes key row tid % ATTN_SPLIT (in buffer b) against
// heads tid / ATTN_SPLIT + KPT i (i < H) of the group's n heads, each dot as `attention`
// takes it; rows from `count` on score NEG_INF.
template <int D, unsigned H>
__device__ __forceinline__ void group_scores(GroupShared<D>& sh, unsigned b, int count,
                                             unsigned n, float scale) {
    constexpr unsigned KPT = ATTN_THREADS / ATTN_SPLIT, E = GroupShared<D>::E;
    static_assert(ATTN_THREADS % ATTN_SPLIT == 0, "a key row a thread, KPT threads a row");
    const unsigned row = threadIdx.x % ATTN_SPLIT, h0 = threadIdx.x / ATTN_SPLIT;
    GroupKey<D, H> key;
#pragma unroll
    for (unsigned u = 0; u < GroupShared<D>::UNITS; u++)
        key.raw[u] = *(const uint4*)&sh.k[b][row][group_unit<D>(row, u) * E];
#pragma unroll
    for (unsigned i = 0; i < H; i++) key.q[i] = sh.q[h0 + KPT * i < ATTN_GROUP_MAX ? h0 + KPT * i : 0];
    float dot[H];
    group_tree<AttnShared<D, 1>::L, 0, 1>(key, dot);
#pragma unroll
    for (unsigned i = 0; i < H; i++)
        if (h0 + KPT * i < n) sh.w[h0 + KPT * i][row] = (int)row < count ? dot[i] * scale : NEG_INF;
}

// `attention` for one new position at step0 (t = 0) and all query heads of KV group
// `kv_head` (n_head / n_head_kv <= ATTN_GROUP_MAX), over splits s_begin .. s_begin +
// s_count - 1 (those that hold positions), item by item with `attention`'s arithmetic: the
// same bits. The block's splits go through shared memory in turn, the next one's rows
// copied in (cp.async) while this one's are used, and each is taken for all the group's heads
// at once, each key row and value row read and widened once for them all:
// - scores: a thread a key row and some of the heads (group_scores), each dot the sum
//   `attention`'s lanes make of their partial dots, in the order their butterfly adds them;
// - the softmax in one warp a head, as there;
// - weighted sums of values: thread (g, e) of `attention`'s thread groups sums the same
//   positions and dimensions, for every head, and the groups' sums are added in group order
//   through shared memory.
// A split's parts are written as `attention` writes them, and the block adds its count of
// splits to each query's ticket once, so whichever block finishes a query's splits merges
// them, in split order as there.
template <int D, class Wait = NoMid>
__device__ __forceinline__ void attention_group(
    GroupShared<D>& sh, unsigned s_begin, unsigned s_count, unsigned kv_head, int step0,
    const float* qkv, kv_t* k_cache, kv_t* v_cache, const float* __restrict__ inv_freq,
    float* part_o, float* part_ml, unsigned* tickets, float* out, unsigned n_head,
    unsigned n_head_kv, unsigned n_rot, int halves, unsigned n_split, float scale,
    const AttnSplit& split_out, const Wait& wait = Wait()) {
    constexpr unsigned L = AttnShared<D, 1>::L, F = D / (4 * L);
    constexpr unsigned G = AttnShared<D, 1>::G, VSTEPS = ATTN_SPLIT / G;
    constexpr unsigned WARPS = ATTN_THREADS / 32, KPT = ATTN_THREADS / ATTN_SPLIT;
    constexpr unsigned E = GroupShared<D>::E, CH = GroupShared<D>::UNITS;
    constexpr unsigned STAGES = GroupShared<D>::STAGES, HC = GroupShared<D>::HC;
    static_assert(ATTN_SPLIT == 64, "the softmax takes a split's weights as two per lane");
    const unsigned tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const unsigned e = tid % L, g = tid / L;
    const int last = step0;
    const unsigned used = (unsigned)(last / ATTN_SPLIT) + 1;
    const unsigned s_end = s_begin + s_count < used ? s_begin + s_count : used;
    if (s_begin >= s_end) return;
    const unsigned group = n_head / n_head_kv, head0 = kv_head * group;
    const unsigned q_dim = n_head * D, kv_dim = n_head_kv * D, kv_off = kv_head * D;

    // Split s's cached rows (those before step0) into buffer b, as one group of copies.
    auto stage = [&](unsigned s, unsigned b) {
        const int first = (int)(s * ATTN_SPLIT);
        const int cached = step0 - first < ATTN_SPLIT ? step0 - first : ATTN_SPLIT;
        for (unsigned c = tid; c < ATTN_SPLIT * CH; c += ATTN_THREADS) {
            const unsigned row = c / CH, u = c % CH;
            if ((int)row < cached) {
                const size_t at = (size_t)(first + (int)row) * kv_dim + kv_off + u * E;
                cp_async16(&sh.k[b][row][group_unit<D>(row, u) * E], k_cache + at, true);
                cp_async16(&sh.v[b][row][u * E], v_cache + at, true);
            }
        }
        cp_async_commit();
    };

    // The first split's rows are on their way while the kernel waits for the one before it
    // (`wait`: the cached rows are older than that kernel) and the queries are rotated.
    stage(s_begin, 0);
    wait();
    for (unsigned h = warp; h < group; h += WARPS)
        rope_into<D, false>(lane, 32, qkv + (size_t)(head0 + h) * D, sh.q[h], last, inv_freq,
                            n_rot, halves);
    for (unsigned s = s_begin; s < s_end; s++) {
        const unsigned b = STAGES == 2 ? (s - s_begin) % 2 : 0;
        __syncthreads();  // every thread is done with the buffer filled next
        if (STAGES == 1) {
            if (s > s_begin) stage(s, 0);
            cp_async_wait<0>();
        } else if (s + 1 < s_end) {
            stage(s + 1, b ^ 1);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        const int first = (int)(s * ATTN_SPLIT);
        const int count = last + 1 - first < ATTN_SPLIT ? last + 1 - first : ATTN_SPLIT;
        if (last - first < ATTN_SPLIT) {
            // The split holds this call's position: its rotated key and its value, rounded
            // as the cache stores them, into the buffer's row and appended to the cache.
            rope_into<D, true>(tid, ATTN_THREADS, qkv + q_dim + kv_off, sh.k_new, last,
                               inv_freq, n_rot, halves);
            for (unsigned d = tid; d < D; d += ATTN_THREADS)
                sh.v_new[d] = kv_round(qkv[q_dim + kv_dim + kv_off + d]);
            __syncthreads();
            const size_t at = (size_t)last * kv_dim + kv_off;
            const unsigned row = (unsigned)count - 1;
            for (unsigned d = tid; d < D; d += ATTN_THREADS) {
                kv_store(&sh.k[b][row][group_unit<D>(row, d / E) * E + d % E], sh.k_new[d]);
                kv_store(&sh.v[b][row][d], sh.v_new[d]);  // already rounded: exact
                kv_store(k_cache + at + d, sh.k_new[d]);
                kv_store(v_cache + at + d, sh.v_new[d]);
            }
        }
        __syncthreads();  // the split's rows are in shared memory for every thread

        switch ((group + KPT - 1) / KPT) {
        case 1: group_scores<D, 1>(sh, b, count, group, scale); break;
        case 2: group_scores<D, 2>(sh, b, count, group, scale); break;
        case 3: group_scores<D, 3>(sh, b, count, group, scale); break;
        default: group_scores<D, (ATTN_GROUP_MAX + KPT - 1) / KPT>(sh, b, count, group, scale);
        }
        __syncthreads();
        for (unsigned h = warp; h < group; h += WARPS) {
            float* w = sh.w[h];
            const float wa0 = w[lane], wb0 = w[lane + 32];
            const float m = warp_max(fmaxf(wa0, wb0));
            const float wa = (int)lane < count ? expf(wa0 - m) : 0.0f;
            const float wb = (int)lane + 32 < count ? expf(wb0 - m) : 0.0f;
            const float l = warp_sum(wa + wb);
            w[lane] = wa;
            w[lane + 32] = wb;
            if (lane == 0) {
                sh.ml[h][0] = m;
                sh.ml[h][1] = l;
            }
        }
        __syncthreads();

        // Thread group g's sums of weight * value over positions g, g + G, .. for lane e's
        // dimensions, every head's from each value row read once.
        float4 acc[ATTN_GROUP_MAX][F];
#pragma unroll
        for (unsigned h = 0; h < ATTN_GROUP_MAX; h++)
#pragma unroll
            for (unsigned f = 0; f < F; f++) acc[h][f] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
        for (unsigned i = 0; i < VSTEPS; i++) {
            const unsigned pl = g + i * G;
            if ((int)pl < count) {
                float4 x[F];
#pragma unroll
                for (unsigned f = 0; f < F; f++) x[f] = kv_load4(&sh.v[b][pl][4 * (e + L * f)]);
#pragma unroll
                for (unsigned h = 0; h < ATTN_GROUP_MAX; h++) {
                    if (h < group) {
                        const float wt = sh.w[h][pl];
#pragma unroll
                        for (unsigned f = 0; f < F; f++) {
                            acc[h][f].x = fmaf(wt, x[f].x, acc[h][f].x);
                            acc[h][f].y = fmaf(wt, x[f].y, acc[h][f].y);
                            acc[h][f].z = fmaf(wt, x[f].z, acc[h][f].z);
                            acc[h][f].w = fmaf(wt, x[f].w, acc[h][f].w);
                        }
                    }
                }
            }
        }
        // The groups' sums added in group order, HC heads at a time through the split's key
        // buffer (its scores are taken), and each head's output or part written.
        float* sums = (float*)&sh.k[b][0][0];
        for (unsigned c0 = 0; c0 < group; c0 += HC) {
            if (c0 > 0) __syncthreads();  // the heads before are summed
#pragma unroll
            for (unsigned h = 0; h < ATTN_GROUP_MAX; h++) {
                if (h >= c0 && h < c0 + HC && h < group) {
#pragma unroll
                    for (unsigned f = 0; f < F; f++)
                        *(float4*)(sums + ((h - c0) * G + g) * D + 4 * (e + L * f)) = acc[h][f];
                }
            }
            __syncthreads();
            const unsigned heads = group - c0 < HC ? group - c0 : HC;
            for (unsigned i = tid; i < heads * (D / 4); i += ATTN_THREADS) {
                const unsigned hc = i / (D / 4), d = 4 * (i % (D / 4)), h = c0 + hc;
                float4 o = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
                for (unsigned gg = 0; gg < G; gg++) {
                    const float4 p = *(const float4*)(sums + (hc * G + gg) * D + d);
                    o.x += p.x;
                    o.y += p.y;
                    o.z += p.z;
                    o.w += p.w;
                }
                const unsigned query = head0 + h;
                if (used == 1) {
                    const float l = sh.ml[h][1];
                    const float4 r = make_float4(o.x / l, o.y / l, o.z / l, o.w / l);
                    *(float4*)(out + (size_t)query * D + d) = r;
                    split_out.put(query * D + d, r.x, r.y);
                    split_out.put(query * D + d + 2, r.z, r.w);
                } else {
                    *(float4*)(part_o + ((size_t)query * n_split + s) * D + d) = o;
                }
            }
        }
        if (used > 1 && tid < group) {
            const size_t at = ((size_t)(head0 + tid) * n_split + s) * 2;
            part_ml[at] = sh.ml[tid][0];
            part_ml[at + 1] = sh.ml[tid][1];
        }
    }
    if (used == 1) return;

    // The block's splits are written: each head's warp adds their count to the query's
    // ticket, and the one that completes it merges the query's splits as `attention` does.
    __threadfence();
    __syncthreads();
    for (unsigned h = warp; h < group; h += WARPS) {
        const unsigned query = head0 + h, mine = s_end - s_begin;
        unsigned before = 0;
        if (lane == 0) before = atomicAdd(&tickets[query], mine);
        before = __shfl_sync(FULL_MASK, before, 0);
        if (before + mine != used) continue;
        __threadfence();
        merge_splits<D>(lane, 32, part_o, part_ml, (size_t)query * n_split, used,
                        out + (size_t)query * D, split_out, query * D);
        if (lane == 0) tickets[query] = 0;
    }
}

#endif  // TERN_ATTENTION_CUH
