// Probe: can one BF16 matrix kernel on tensor cores serve every token count of a step (1 for a
// lone decode, up to 64 for a batched one) with the same bits per token, and read its weights
// as fast as the matrix-vector kernels do at one token? Not part of Tern: a measurement for
// choosing the design of batched steps' matrix products (the Llama-3.2-1B shape's matrices).
//
//   nvcc -O3 -gencode arch=compute_90a,code=sm_90a -std=c++17 -o /tmp/gemm scripts/probes/gemm-bf16-mma.cu && /tmp/gemm
//
// (`/tmp/gemm wg`: only A, M, ZG2, ZI and the W designs; `/tmp/gemm profile`: see below.)
//
// Designs:
//   A   the matrix-vector kernel (matvec.cu's, as in matvec-bf16.cu): a warp per row, f32
//       sums on CUDA cores, tokens 8 at a time, so the row passes through L1 once per 8 tokens.
//   M   tensor cores, the weights as mma's A operand: a warp takes a tile of 16 rows and one
//       of P parts of the columns (P fixed by the matrix's shape, never by the tokens), every
//       token of the call as B operand in n8 tiles. Each activation is split beforehand into
//       bf16 hi + lo (hi = bf16(x), lo = bf16(x - hi)), so every product is exact in f32;
//       each 32-column chunk is four m16n8k16 mmas into one f32 sum (16 columns' hi, their
//       lo, the other 16 columns' hi, their lo). A
//       tile's parts are summed in part order by whichever warp finishes last (a ticket per
//       tile), so no sum depends on timing or on the number of tokens.
//   M2  M with two row tiles a warp (each activation fragment used twice): fewer activation
//       reads through L1 at many tokens, half the warps.
//   M8  M with 8 chunks' weights in flight a warp up to 16 tokens (4 above). The chunks in
//       flight change when loads are issued, never the sums, so its bits are M's.
//   MS  M (one row tile a warp) with the activations staged in shared memory: the block's 8
//       warps share their part's columns, so each stage of 4 chunks of every token's hi and
//       lo is copied in once for the block (cp.async, two stages in flight) rather than read
//       by each warp through L1. The same mmas in the same order: M's bits, checked.
//   H   each product the faster of M and MS for its shape and token count (Q/K/V through M
//       with 2 chunks up to 16 tokens, everything else through MS): since M and MS make the
//       same mmas in the same order over the same parts, a token's bits still never depend
//       on the token count, checked.
//   B   at one token MB, above it MS. MB: a block takes one row tile's parts (8 warps, one or
//       two parts a warp) or, where a matrix has fewer than 8 parts, 8 / P tiles' parts;
//       token 0's hi and lo for every column are copied into shared memory once, then each
//       warp streams its weights as M does with no barrier; the parts are summed in part
//       order in shared memory (no tickets, no global round trip). The same mmas in the same
//       order and the same sum of parts as M: M's bits, checked.
//   Z   B over weights stored in tiles: each 16-row tile's 32-column chunk is 1 KiB, the
//       first 512 bytes rows 0-7 and the next rows 8-15, each lane's 16 bytes where that
//       lane's fragment wants them, so that every weight load of a warp reads 512
//       contiguous bytes (a row-major matrix gives it 64 bytes of each of 8 rows). The model
//       would store its matrices so once, at load. The same values, so M's bits, checked
//       against M over the row-major matrix.
//   ZP  Z with the first PF bytes of each warp's first part prefetched into L2 before the
//       kernel waits for the one before it (as the matrix-vector kernels prefetch their rows),
//       so that a chained step's weights stream while the kernel before it finishes.
//   ZP2 ZP with 2 chunks in flight a warp (78 registers rather than 124: three blocks an SM
//       rather than two, so more of the next kernel's blocks are resident early).
//   ZPP ZP with matrices of fewer than 8 parts (gate/up, the output head) cut into twice as
//       many: more, shorter weight streams. A different shape rule, so its own bits (token 0
//       still the same at every token count, checked), not M's.
//   ZS2 ZP with MS taking two row tiles a warp from 16 tokens on (each activation fragment
//       read from shared memory used twice). M's bits.
//   ZH  ZP with bf16 activations alone (hi, no lo): half the mmas, each product rounded to
//       bf16 first (its own bits, within about 1e-3 of the f32 sums; token 0 still the same at
//       every token count, checked).
//   ZO  ZP with MS built for two blocks an SM (at most 128 registers a thread, 2 chunks a
//       stage from 32 tokens on): MS's 136-150 registers allowed one block (8 warps) an SM
//       from 16 tokens on. ZO3: three blocks (80 registers, some spilled). ZO2: ZO over ZP2.
//   ZG2 ZO with the mmas of 2 (ZG4: 4) n8 tiles interleaved, each sum keeping its own order
//       (hi, lo, hi, lo), so that consecutive mmas rarely wait on each other. M's bits.
//   ZN  ZG2 with MB's blocks of 4 warps where a matrix has fewer than 8 parts (Q/K/V and O
//       have 4: blocks of 8 warps took two tiles each and left SMs idle at one token), so that
//       blocks come and go in finer steps as a chained kernel ends and the next begins. ZN2:
//       blocks of 2 warps (of P where P is 2 or 4).
//   ZHO ZO and ZG2 with bf16 activations alone (ZH's bits).
//   ZT  ZG2 with 2 warps a row tile from 16 tokens on, each with half the tokens' n8 tiles
//       (the same mmas for each token, so M's bits): twice the warps on small matrices. ZT3:
//       at three blocks an SM. ZT4: 4 warps a tile from 32 tokens on, three blocks an SM.
//   ZD  ZG2 with MB reading token 0's hi and lo fragments from global memory (L2) as each
//       chunk needs them, instead of copying the whole input into shared memory behind a
//       block barrier after the wait: nothing between the wait and the first mma but the
//       fragments' own loads. ZDN: ZD with MB's blocks of 4 warps where P < 8. ZD2: ZD with 2
//       chunks in flight (fewer registers: three blocks an SM).
//   ZI  ZG2 over tiles stored in groups of 8 (a group's chunk k is 8 KiB in a row: tile 0's
//       1 KiB, tile 1's, ...), so that a block whose 8 warps take 8 tiles reads one 8 KiB run
//       a chunk rather than 8 runs 64 KiB apart. M's bits, checked.
//   W   Hopper's warpgroup mma (wgmma m64nNk16, N = 8 to 64 tokens): a block of 4 warps takes
//       64 rows (each warp its row tile's fragments from Z's tiles, in registers as wgmma's A
//       operand) and one of P parts; the tokens' hi and lo come from shared memory as the B
//       operand, staged SC chunks at a time while the stage before is multiplied. The same
//       products in M's order, one instruction for up to 64 tokens instead of 8 mmas a warp:
//       whether a wgmma gives an mma.sync's bits (a token's sum over 16 columns in the same
//       order) is what the check answers. W2, W8: 2 and 8 chunks a stage.
//
// `gemm profile` runs each of a few products once (for Nsight Compute) and nothing else.
//
// The chained step is timed twice for the tensor-core designs: with a kernel splitting each
// product's input into hi and lo, and without (the input split once beforehand, standing in
// for a producer kernel that writes hi and lo itself, as the engine's would).
//
// Checks: M's token 0 gives the same bits at every token count; M against A's f32 sums (the
// relative error of bf16 hi/lo products).
#include <cuda_runtime.h>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "probe.cuh"

__device__ __forceinline__ uint4 ldx(const void* p)
{
    uint4 v;
    asm volatile("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}
__device__ __forceinline__ uint2 ld8(const void* p)
{
    uint2 v;
    asm("ld.global.nc.L1::evict_first.v2.u32 {%0,%1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
    return v;
}

// ---- A: f32 matrix-vector sums, 8 tokens a pass over the row ----
template <int STEPS>
__global__ void __launch_bounds__(256, 3)
    gemv_a(const unsigned char* w, const float* x, float* y, int rows, int cols, int T, int P, const void*, const void*, unsigned*, float*)
{
    const int lane = threadIdx.x & 31, r = blockIdx.x * 8 + (threadIdx.x >> 5);
    const unsigned char* row = w + (size_t)(r < rows ? r : 0) * cols * 2;
    if (r < rows) asm volatile("prefetch.global.L2 [%0];" ::"l"(row + 128 * (lane & 15)));
    pdl_wait();
    pdl_launch();
    if (r >= rows) return;
    for (int t0 = 0; t0 < T; t0 += 8) {
        const int nt = T - t0 < 8 ? T - t0 : 8;
        float acc[8] = {};
        for (int k = 0; k < cols / 256; k += STEPS) {
            uint2 ra[STEPS], rb[STEPS];
#pragma unroll
            for (int i = 0; i < STEPS; ++i) {
                ra[i] = ld8(row + (k + i) * 512 + 8 * lane);
                rb[i] = ld8(row + (k + i) * 512 + 256 + 8 * lane);
            }
#pragma unroll
            for (int i = 0; i < STEPS; ++i) {
#pragma unroll
                for (int t = 0; t < 8; ++t) {
                    if (t >= nt) break;
                    const float* xt = x + (size_t)(t0 + t) * cols;
                    const float4 a = *(const float4*)(xt + (k + i) * 256 + 4 * lane);
                    const float4 b = *(const float4*)(xt + (k + i) * 256 + 128 + 4 * lane);
                    acc[t] = dot8(make_uint4(ra[i].x, ra[i].y, rb[i].x, rb[i].y), a, b, acc[t]);
                }
            }
        }
        for (int t = 0; t < nt; ++t) {
            float v = acc[t];
            for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
            if (lane == 0) y[(size_t)(t0 + t) * rows + r] = v;
        }
    }
}

// ---- the activations split into bf16 hi and lo ----
__device__ __forceinline__ unsigned pack_bf16(float a, float b)
{
    unsigned d;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(b), "f"(a));  // a in the low half
    return d;
}
__global__ void split_x(const float* x, unsigned* xhi, unsigned* xlo, int n_pairs)
{
    pdl_wait();
    pdl_launch();
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n_pairs; i += gridDim.x * blockDim.x) {
        const float2 v = ((const float2*)x)[i];
        const unsigned h = pack_bf16(v.x, v.y);
        xhi[i] = h;
        xlo[i] = pack_bf16(v.x - lo16(h), v.y - hi16(h));
    }
}

// ---- M: tensor cores ----
__device__ __forceinline__ void mma(float* c, unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0, unsigned b1)
{
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// A warp's sums for row tile `tile` (c0, c1: row g, tokens 2t, 2t + 1; c2, c3: row g + 8)
// written as part `part` of P; the warp that writes a tile's last part sums the parts in part
// order (a ticket per tile), so no sum depends on timing or on the number of tokens.
// With TS > 1, TS warps share the tile's part, each holding NT n8 tiles of tokens from
// n8 tile n_base on; the tile's last arrival of P * TS sums every token's parts.
template <int NT>
__device__ __forceinline__ void store_tile(const float (&acc)[NT][4], float* y, int rows, int T, int P, int part, int tile,
                                           unsigned* tickets, float* part_sums, int n_base = 0, int TS = 1)
{
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    float* dst = P == 1 ? y : part_sums + (size_t)part * T * rows;
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int tok = 8 * (n_base + n) + 2 * t + (i & 1), r = tile * 16 + g + (i >> 1) * 8;
            if (tok < T) dst[(size_t)tok * rows + r] = acc[n][i];
        }
    if (P == 1) return;
    P *= TS;  // arrivals
    const int parts = P / TS;
    __threadfence();
    __syncwarp();
    unsigned last = 0;
    if (lane == 0) last = atomicAdd(&tickets[tile], 1u) == (unsigned)P - 1;
    last = __shfl_sync(0xffffffffu, last, 0);
    if (!last) return;
    __threadfence();
    for (int i = lane; i < 16 * T; i += 32) {
        const int tok = i / 16, r = tile * 16 + i % 16;
        float s = 0.f;
        for (int p = 0; p < parts; ++p) s += __ldcg(part_sums + ((size_t)p * T + tok) * rows + r);
        y[(size_t)tok * rows + r] = s;
    }
    if (lane == 0) tickets[tile] = 0;
}

// Block b: part b % P, row tiles (b / P) * 8 * MT + warp * MT ... (MT tiles of 16 rows a
// warp). Per 32-column chunk, lane (g = lane / 4, t = lane % 4) holds 16 bytes (columns 8t ..
// 8t + 7) of rows g and g + 8 of each tile, and of token 8n + g's hi and lo activations; the
// first mma takes columns 8t .. 8t + 3, the second 8t + 4 .. 8t + 7 (A and B permuted alike,
// so each is a sum over 16 columns). NT: n8 tiles of tokens a pass (T <= 8 NT).
template <int NT, int MT, int U>
__global__ void __launch_bounds__(256)
    gemm_m(const unsigned char* w, const float*, float* y, int rows, int cols, int T, int P, const void* xhi_, const void* xlo_,
           unsigned* tickets, float* part_sums)
{
    const unsigned char* xhi = (const unsigned char*)xhi_;
    const unsigned char* xlo = (const unsigned char*)xlo_;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int part = blockIdx.x % P;
    const int tile0 = ((blockIdx.x / P) * 8 + warp) * MT;
    const int tiles = rows / 16;
    if (tile0 >= tiles) {
        pdl_wait();
        pdl_launch();
        return;
    }
    const int kp = cols / P, chunks = kp / 32, c0 = part * kp;
    const size_t row_bytes = (size_t)cols * 2;
    const unsigned char* wr[MT][2];
#pragma unroll
    for (int m = 0; m < MT; ++m) {
        const int tile = tile0 + m < tiles ? tile0 + m : tiles - 1;
        wr[m][0] = w + (size_t)(tile * 16 + g) * row_bytes + (size_t)c0 * 2 + 16 * t;
        wr[m][1] = wr[m][0] + 8 * row_bytes;
    }
    float acc[MT][NT][4] = {};
    uint4 wa[U][MT][2], wb[U][MT][2];
    // Chunks come U at a time into one of two register sets, the next set's loads issued
    // before the current set is summed.
    auto load = [&](uint4 (&v)[U][MT][2], int k) {
#pragma unroll
        for (int u = 0; u < U; ++u)
#pragma unroll
            for (int m = 0; m < MT; ++m)
#pragma unroll
                for (int h = 0; h < 2; ++h) v[u][m][h] = k + u < chunks ? ldw(wr[m][h] + (k + u) * 64) : make_uint4(0, 0, 0, 0);
    };
    auto sum = [&](const uint4 (&v)[U][MT][2], int k) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
            if (k + u >= chunks) break;
            const size_t col = (size_t)c0 + (k + u) * 32 + 8 * t;
#pragma unroll
            for (int n = 0; n < NT; ++n) {
                const int tok = 8 * n + g;
                uint4 bh = make_uint4(0, 0, 0, 0), bl = make_uint4(0, 0, 0, 0);
                if (tok < T) {
                    bh = ldx(xhi + ((size_t)tok * cols + col) * 2);
                    bl = ldx(xlo + ((size_t)tok * cols + col) * 2);
                }
#pragma unroll
                for (int m = 0; m < MT; ++m) {
                    const uint4 a = v[u][m][0], b = v[u][m][1];
                    mma(acc[m][n], a.x, b.x, a.y, b.y, bh.x, bh.y);
                    mma(acc[m][n], a.x, b.x, a.y, b.y, bl.x, bl.y);
                    mma(acc[m][n], a.z, b.z, a.w, b.w, bh.z, bh.w);
                    mma(acc[m][n], a.z, b.z, a.w, b.w, bl.z, bl.w);
                }
            }
        }
    };
    load(wa, 0);
    pdl_wait();
    pdl_launch();
    for (int k = 0; k < chunks; k += 2 * U) {
        load(wb, k + U);
        sum(wa, k);
        load(wa, k + 2 * U);
        sum(wb, k + U);
    }
#pragma unroll
    for (int m = 0; m < MT; ++m) {
        if (tile0 + m >= tiles) break;
        store_tile<NT>(acc[m], y, rows, T, P, part, tile0 + m, tickets, part_sums);
    }
}

// ---- MS: M with the activations staged in shared memory ----
// As M with one row tile a warp (the same mmas in the same order, so M's bits), but the
// block's 8 warps, which share their part's columns, read the activations' fragments from
// shared memory: SC chunks of every token's hi and lo are copied in at a time (cp.async, two
// stages in flight), once for the block instead of once per warp through L1. A token's row of
// a stage is SC * 128 bytes and 64 more, so that the 8-lane phases of a warp's 16-byte reads
// fall on distinct banks.
__device__ __forceinline__ unsigned smem_addr(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void cp16(void* dst, const void* src, bool real)
{
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_addr(dst)), "l"(src), "r"(real ? 16 : 0));
}
template <int NT, int SC, int Z = 0, bool LO = true, int MT = 1, int MINB = 1, int G = 1, int TS = 1>
__global__ void __launch_bounds__(256, MINB)
    gemm_ms(const unsigned char* w, const float*, float* y, int rows, int cols, int T, int P, const void* xhi_, const void* xlo_,
            unsigned* tickets, float* part_sums)
{
    constexpr int ROW = SC * 128 + 64, STAGE = 8 * NT * ROW;
    extern __shared__ __align__(16) unsigned char xs[];  // 2 stages
    const unsigned char* xhi = (const unsigned char*)xhi_;
    const unsigned char* xlo = (const unsigned char*)xlo_;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    // TS warps a row tile (MT = 1), each with NW of the call's n8 tiles of tokens from nb on.
    constexpr int NW = NT / TS;
    const int nb = (warp % TS) * NW;
    const int part = blockIdx.x % P;
    const int tile = ((blockIdx.x / P) * (8 / TS) + warp / TS) * MT;
    const int tiles = rows / 16;
    // A warp whose share holds no token still takes its ticket (it stores nothing).
    const bool mine = tile < tiles, busy = mine && 8 * nb < T;
    const int kp = cols / P, chunks = kp / 32, c0 = part * kp, stages = chunks / SC;
    const size_t row_bytes = (size_t)cols * 2;
    // A chunk's two loads of each of the warp's tiles: rows g and g + 8, row-major or (Z)
    // tiled.
    const unsigned char* wr0[MT];
    const unsigned char* wr1[MT];
#pragma unroll
    for (int m = 0; m < MT; ++m) {
        const int tm = mine && tile + m < tiles ? tile + m : 0;
        wr0[m] = Z == 2 ? w + (((size_t)(tm >> 3) * (cols / 32) + c0 / 32) * 8 + (tm & 7)) * 1024 + 16 * lane
                 : Z    ? w + ((size_t)tm * (cols / 32) + c0 / 32) * 1024 + 16 * lane
                   : w + (size_t)(tm * 16 + g) * row_bytes + (size_t)c0 * 2 + 16 * t;
        wr1[m] = Z ? wr0[m] + 512 : wr0[m] + 8 * row_bytes;
    }
    const int step = Z == 2 ? 8192 : Z ? 1024 : 64;
    // Stage s's activations into buffer s % 2: (token, chunk, hi/lo, quarter) items of 16 B.
    auto load_x = [&](int s) {
        unsigned char* buf = xs + (s & 1) * STAGE;
        for (int i = threadIdx.x; i < 8 * NT * SC * 8; i += 256) {
            const int q = i & 3, h = (i >> 2) & 1, c = (i >> 3) % SC, tok = (i >> 3) / SC;
            const size_t col = (size_t)c0 + (s * SC + c) * 32 + 8 * q;
            const unsigned char* src = (h ? xlo : xhi) + ((size_t)(tok < T ? tok : 0) * cols + col) * 2;
            cp16(buf + tok * ROW + c * 128 + h * 64 + 16 * q, src, tok < T);
        }
        asm volatile("cp.async.commit_group;" ::: "memory");
    };
    uint4 wa[SC][MT][2], wb[SC][MT][2];
    auto load_w = [&](uint4 (&v)[SC][MT][2], int s) {
#pragma unroll
        for (int c = 0; c < SC; ++c)
#pragma unroll
            for (int m = 0; m < MT; ++m) {
                const bool ok = busy && s < stages && tile + m < tiles;
                v[c][m][0] = ok ? ldw(wr0[m] + (s * SC + c) * step) : make_uint4(0, 0, 0, 0);
                v[c][m][1] = ok ? ldw(wr1[m] + (s * SC + c) * step) : make_uint4(0, 0, 0, 0);
            }
    };
    float acc[MT][NW][4] = {};
    auto sum = [&](const uint4 (&v)[SC][MT][2], int s) {
        const unsigned char* buf = xs + (s & 1) * STAGE;
#pragma unroll
        for (int c = 0; c < SC; ++c) {
#pragma unroll
            for (int n0 = 0; n0 < NW; n0 += G) {
                if (8 * (nb + n0) >= T) break;
                // G n8 tiles' fragments, then their mmas interleaved (each sum's own order
                // unchanged: hi, lo, hi, lo), so consecutive mmas rarely wait on each other.
                uint4 bh[G], bl[G];
#pragma unroll
                for (int j = 0; j < G; ++j) {
                    const unsigned char* f = buf + (8 * (nb + n0 + j) + g) * ROW + c * 128 + 16 * t;
                    const bool real = G == 1 || 8 * (nb + n0 + j) < T;
                    bh[j] = real ? *(const uint4*)f : make_uint4(0, 0, 0, 0);
                    bl[j] = LO && real ? *(const uint4*)(f + 64) : make_uint4(0, 0, 0, 0);
                }
#pragma unroll
                for (int m = 0; m < MT; ++m) {
                    const uint4 a = v[c][m][0], b = v[c][m][1];
#pragma unroll
                    for (int j = 0; j < G; ++j)
                        if (G == 1 || 8 * (nb + n0 + j) < T) mma(acc[m][n0 + j], a.x, b.x, a.y, b.y, bh[j].x, bh[j].y);
                    if (LO)
#pragma unroll
                        for (int j = 0; j < G; ++j)
                            if (G == 1 || 8 * (nb + n0 + j) < T) mma(acc[m][n0 + j], a.x, b.x, a.y, b.y, bl[j].x, bl[j].y);
#pragma unroll
                    for (int j = 0; j < G; ++j)
                        if (G == 1 || 8 * (nb + n0 + j) < T) mma(acc[m][n0 + j], a.z, b.z, a.w, b.w, bh[j].z, bh[j].w);
                    if (LO)
#pragma unroll
                        for (int j = 0; j < G; ++j)
                            if (G == 1 || 8 * (nb + n0 + j) < T) mma(acc[m][n0 + j], a.z, b.z, a.w, b.w, bl[j].z, bl[j].w);
                }
            }
        }
    };
    load_w(wa, 0);
    pdl_wait();
    pdl_launch();
    load_x(0);
    for (int s = 0; s < stages; s += 2) {
        load_w(wb, s + 1);
        if (s + 1 < stages) load_x(s + 1);
        if (s + 1 < stages) asm volatile("cp.async.wait_group 1;" ::: "memory");
        else asm volatile("cp.async.wait_group 0;" ::: "memory");
        __syncthreads();
        if (mine) sum(wa, s);
        __syncthreads();
        if (s + 1 >= stages) break;
        load_w(wa, s + 2);
        if (s + 2 < stages) load_x(s + 2);
        if (s + 2 < stages) asm volatile("cp.async.wait_group 1;" ::: "memory");
        else asm volatile("cp.async.wait_group 0;" ::: "memory");
        __syncthreads();
        if (mine) sum(wb, s + 1);
        __syncthreads();
    }
#pragma unroll
    for (int m = 0; m < MT; ++m)
        if (mine && tile + m < tiles) store_tile<NW>(acc[m], y, rows, T, P, part, tile + m, tickets, part_sums, nb, TS);
}

// ---- MB: one token, a block a row tile's parts ----
template <int U, int Z = 0, int PF = 0, bool LO = true, bool DX = false>
__global__ void __launch_bounds__(256)
    gemm_mb(const unsigned char* w, const float*, float* y, int rows, int cols, int, int P, const void* xhi_, const void* xlo_,
            unsigned*, float*)
{
    extern __shared__ __align__(16) unsigned char xs[];  // token 0's hi (2 * cols bytes), then its lo
    __shared__ float s_part[16][16];                    // [part, or warp where P < 8][row of the tile]
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int tiles = rows / 16;
    // Row tiles a block: one where P >= 8, else (blocks of 8 warps, or fewer: see ZN) as many
    // as its warps hold a tile's P parts.
    const int per_block = P >= 8 ? 1 : (int)(blockDim.x / 32) / P;
    const int my_parts = P >= 8 ? P / 8 : 1;   // parts a warp (P <= 16)
    const int tile = blockIdx.x * per_block + (P >= 8 ? 0 : warp / P);
    const bool mine = tile < tiles;
    const int kp = cols / P, chunks = kp / 32;
    const size_t row_bytes = (size_t)cols * 2;
    const unsigned char* w0 = w + (size_t)((mine ? tile : 0) * 16 + g) * row_bytes + 16 * t;
    const unsigned char* s_hi = xs;
    const unsigned char* s_lo = xs + 2 * cols;
    float acc[2][4] = {};
    uint4 wa[U][2], wb[U][2];
    auto part_of = [&](int i) { return P >= 8 ? warp + 8 * i : warp % P; };
    // Z: a tile's chunks 1 KiB apart; Z == 2 (ZI): groups of 8 tiles, chunk by chunk, so a
    // tile's chunks are 8 KiB apart and a block's 8 tiles' chunk k are one 8 KiB run.
    const int tm = mine ? tile : 0;
    constexpr int CS = Z == 2 ? 8192 : 1024;
    const unsigned char* z0 = Z == 2 ? w + ((size_t)(tm >> 3) * (cols / 32) * 8 + (tm & 7)) * 1024 + 16 * lane
                                     : w + (size_t)tm * (cols / 32) * 1024 + 16 * lane;
    auto load = [&](uint4 (&v)[U][2], int i, int k) {
        const unsigned char* r0 = w0 + (size_t)part_of(i) * kp * 2;
        const unsigned char* q0 = z0 + (size_t)part_of(i) * chunks * CS;
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const bool ok = mine && k + u < chunks;
            v[u][0] = ok ? ldw(Z ? q0 + (size_t)(k + u) * CS : r0 + (k + u) * 64) : make_uint4(0, 0, 0, 0);
            v[u][1] = ok ? ldw(Z ? q0 + (size_t)(k + u) * CS + 512 : r0 + 8 * row_bytes + (k + u) * 64) : make_uint4(0, 0, 0, 0);
        }
    };
    auto sum = [&](float (&c)[4], const uint4 (&v)[U][2], int i, int k) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
            if (k + u >= chunks) break;
            const int col = part_of(i) * kp + (k + u) * 32 + 8 * t;
            uint4 bh = make_uint4(0, 0, 0, 0), bl = make_uint4(0, 0, 0, 0);
            if (g == 0) {
                // DX: token 0's fragments straight from global memory (L2), no staging.
                bh = DX ? ldx((const unsigned char*)xhi_ + 2 * col) : *(const uint4*)(s_hi + 2 * col);
                if (LO) bl = DX ? ldx((const unsigned char*)xlo_ + 2 * col) : *(const uint4*)(s_lo + 2 * col);
            }
            const uint4 a = v[u][0], b = v[u][1];
            mma(c, a.x, b.x, a.y, b.y, bh.x, bh.y);
            if (LO) mma(c, a.x, b.x, a.y, b.y, bl.x, bl.y);
            mma(c, a.z, b.z, a.w, b.w, bh.z, bh.w);
            if (LO) mma(c, a.z, b.z, a.w, b.w, bl.z, bl.w);
        }
    };
    if (Z && PF > 0 && mine) {
        const unsigned char* q = z0 - 16 * lane + (size_t)part_of(0) * chunks * CS;
        const int lines = (chunks * 1024 < PF ? chunks * 1024 : PF) / 128;  // 8 a chunk
        for (int i = lane; i < lines; i += 32) asm volatile("prefetch.global.L2 [%0];" ::"l"(q + (size_t)(i / 8) * CS + 128 * (i % 8)));
    }
    load(wa, 0, 0);
    pdl_wait();
    pdl_launch();
    if (!DX) {
        for (int j = threadIdx.x; j < cols / 8; j += blockDim.x) {
            ((uint4*)xs)[j] = ((const uint4*)xhi_)[j];
            ((uint4*)(xs + 2 * cols))[j] = ((const uint4*)xlo_)[j];
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        if (i >= my_parts) break;
        if (i > 0) load(wa, i, 0);
        for (int k = 0; k < chunks; k += 2 * U) {
            load(wb, i, k + U);
            sum(acc[i], wa, i, k);
            load(wa, i, k + 2 * U);
            sum(acc[i], wb, i, k + U);
        }
    }
    // Token 0 of rows g and g + 8 is c[0] and c[2] of the lanes with t = 0.
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        if (i >= my_parts) break;
        const int slot = P >= 8 ? part_of(i) : warp;
        if (t == 0) {
            s_part[slot][g] = acc[i][0];
            s_part[slot][g + 8] = acc[i][2];
        }
    }
    __syncthreads();
    if (threadIdx.x >= 16 * per_block) return;
    const int tb = threadIdx.x / 16, r = threadIdx.x % 16, out_tile = blockIdx.x * per_block + tb;
    if (out_tile >= tiles) return;
    float v;
    if (P == 1) {
        v = s_part[tb][r];
    } else {
        v = 0.f;
        for (int p = 0; p < P; ++p) v += s_part[P >= 8 ? p : tb * P + p][r];
    }
    y[out_tile * 16 + r] = v;
}

// ---- W: wgmma (sm_90a), the weights in registers as A, the tokens from shared memory as B ----
// A block is one warpgroup (4 warps, 64 rows: warp w takes row tile 4 (b / P) + w, loading its
// fragments from Z's tiles as M's warps do) and one of P parts of the columns. Per stage of
// SC 32-column chunks, the block copies every token's hi and lo of those columns into shared
// memory as wgmma's B operands (K-major, no swizzle: core matrices of 8 tokens x 8 columns, 128
// bytes; the two 8-column halves of a k16 step 128 bytes apart, the 8-token groups 256), with
// M's permutation of columns within a chunk, so that each wgmma m64nNk16 is M's mma for 8 N
// tokens at once, in M's order: per chunk, step 0's hi, its lo, step 1's hi, its lo. The next
// stage's weights are loaded and its activations copied while this stage's wgmmas run. Parts
// are summed as M sums them (store_tile). Whether a wgmma gives mma.sync's bits is what the
// check answers.
template <int NT>
struct Wg;
template <>
struct Wg<1> {
    __device__ __forceinline__ static void mma(float (&d)[1][4], unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                               unsigned long long desc)
    {
        asm volatile(
            "wgmma.mma_async.sync.aligned.m64n8k16.f32.bf16.bf16 {%0,%1,%2,%3}, {%4,%5,%6,%7}, %8, 1, 1, 1, 0;"
            : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3])
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc));
    }
};
template <>
struct Wg<2> {
    __device__ __forceinline__ static void mma(float (&d)[2][4], unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                               unsigned long long desc)
    {
        asm volatile(
            "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7}, {%8,%9,%10,%11}, %12, 1, 1, 1, 0;"
            : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3])
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc));
    }
};
template <>
struct Wg<4> {
    __device__ __forceinline__ static void mma(float (&d)[4][4], unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                               unsigned long long desc)
    {
        asm volatile(
            "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15}, {%16,%17,%18,%19}, %20, 1, 1, 1, 0;"
            : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3])
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc));
    }
};
template <>
struct Wg<8> {
    __device__ __forceinline__ static void mma(float (&d)[8][4], unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                               unsigned long long desc)
    {
        asm volatile(
            "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, {%32,%33,%34,%35}, %36, 1, 1, 1, 0;"
            : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc));
    }
};

__device__ __forceinline__ unsigned long long wg_desc(const void* p)
{
    // Start address, leading (K) byte offset 128, stride (N) byte offset 256, no swizzle.
    const unsigned long long a = smem_addr(p);
    return ((a >> 4) & 0x3fff) | ((unsigned long long)(128 >> 4) << 16) | ((unsigned long long)(256 >> 4) << 32);
}
__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wg_wait0() { asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory"); }
__device__ __forceinline__ void fence_async_smem() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }

template <int NT, int SC>
__global__ void __launch_bounds__(128)
    gemm_wg(const unsigned char* w, const float*, float* y, int rows, int cols, int T, int P, const void* xhi_, const void* xlo_,
            unsigned* tickets, float* part_sums)
{
    extern __shared__ __align__(128) unsigned char wsm[];
    constexpr int OP = NT * 256;        // one k16 operand: NT groups of 8 tokens x 16 columns
    constexpr int STAGE = SC * 4 * OP;  // per chunk: step 0 hi, step 0 lo, step 1 hi, step 1 lo
    const unsigned char* xhi = (const unsigned char*)xhi_;
    const unsigned char* xlo = (const unsigned char*)xlo_;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int part = blockIdx.x % P, tiles = rows / 16;
    const int tile = (blockIdx.x / P) * 4 + warp, tl = tile < tiles ? tile : tiles - 1;
    const int kp = cols / P, chunks = kp / 32, c0 = part * kp;
    const unsigned char* wt = w + ((size_t)tl * (cols / 32) + c0 / 32) * 1024 + 16 * lane;
    uint4 wa[SC][2], wb[SC][2];
    float acc[NT][4] = {};
    auto load = [&](uint4 (&v)[SC][2], int k) {
#pragma unroll
        for (int u = 0; u < SC; ++u)
#pragma unroll
            for (int h = 0; h < 2; ++h) v[u][h] = k + u < chunks ? ldw(wt + (size_t)(k + u) * 1024 + h * 512) : make_uint4(0, 0, 0, 0);
    };
    // Stage k's activations into buf: token n's 16 bytes of columns 8q .. 8q + 7 of a chunk
    // go to step 0 (columns 8q, 8q + 1 as virtual k 2q, 2q + 1; 8q + 2, 8q + 3 as 2q + 8, 2q + 9)
    // and step 1 (the same with 8q + 4 .. 8q + 7).
    auto fill = [&](unsigned char* buf, int k) {
        for (int i = threadIdx.x; i < SC * NT * 8 * 8; i += 128) {
            const int hl = i & 1, q = (i >> 1) & 3, n = (i >> 3) % (NT * 8), u = (i >> 3) / (NT * 8);
            uint4 v = make_uint4(0, 0, 0, 0);
            if (n < T && k + u < chunks) v = ldx((hl ? xlo : xhi) + ((size_t)n * cols + c0 + (k + u) * 32 + 8 * q) * 2);
            unsigned char* s0 = buf + ((u * 2 + 0) * 2 + hl) * OP + (n >> 3) * 256 + (n & 7) * 16 + q * 4;
            unsigned char* s1 = buf + ((u * 2 + 1) * 2 + hl) * OP + (n >> 3) * 256 + (n & 7) * 16 + q * 4;
            *(unsigned*)s0 = v.x;
            *(unsigned*)(s0 + 128) = v.y;
            *(unsigned*)s1 = v.z;
            *(unsigned*)(s1 + 128) = v.w;
        }
    };
    auto fence_acc = [&]() {
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int i = 0; i < 4; ++i) asm volatile("" : "+f"(acc[n][i])::"memory");
    };
    // This stage's wgmmas from v and buf, the next stage's activations into next meanwhile.
    auto stage = [&](const uint4 (&v)[SC][2], unsigned char* buf, unsigned char* next, int k) {
        fence_acc();
        wg_fence();
#pragma unroll
        for (int u = 0; u < SC; ++u) {
            if (k + u >= chunks) break;
            const uint4 a = v[u][0], b = v[u][1];
            unsigned char* op = buf + u * 4 * OP;
            Wg<NT>::mma(acc, a.x, b.x, a.y, b.y, wg_desc(op));
            Wg<NT>::mma(acc, a.x, b.x, a.y, b.y, wg_desc(op + OP));
            Wg<NT>::mma(acc, a.z, b.z, a.w, b.w, wg_desc(op + 2 * OP));
            Wg<NT>::mma(acc, a.z, b.z, a.w, b.w, wg_desc(op + 3 * OP));
        }
        wg_commit();
        if (k + SC < chunks) fill(next, k + SC);
        wg_wait0();
        fence_acc();
        // The weights' registers stay untouched until the wgmmas reading them are done.
#pragma unroll
        for (int u = 0; u < SC; ++u)
#pragma unroll
            for (int h = 0; h < 2; ++h) asm volatile("" ::"r"(v[u][h].x), "r"(v[u][h].y), "r"(v[u][h].z), "r"(v[u][h].w));
        fence_async_smem();
        __syncthreads();
    };
    load(wa, 0);
    pdl_wait();
    pdl_launch();
    unsigned char *b0 = wsm, *b1 = wsm + STAGE;
    fill(b0, 0);
    fence_async_smem();
    __syncthreads();
    for (int k = 0; k < chunks; k += 2 * SC) {
        load(wb, k + SC);
        stage(wa, b0, b1, k);
        if (k + SC >= chunks) break;
        load(wa, k + 2 * SC);
        stage(wb, b1, b0, k + SC);
    }
    if (tile < tiles) store_tile<NT>(acc, y, rows, T, P, part, tile, tickets, part_sums);
}

// Row-major bf16 rows x cols into Z's tiles (mode 2: ZI's groups of 8 tiles, chunk by chunk).
__global__ void to_tiles(const unsigned char* src, unsigned char* dst, int rows, int cols, int mode)
{
    const size_t n = (size_t)rows / 16 * (cols / 32) * 64;  // 16-byte pieces
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const int lane = i % 32, h = (i / 32) % 2;
        const size_t chunk = i / 64, tile = chunk / (cols / 32), c = chunk % (cols / 32);
        const size_t row = tile * 16 + (lane >> 2) + 8 * h;
        const size_t at = mode == 2 ? (((tile >> 3) * (cols / 32) + c) * 8 + (tile & 7)) * 1024 + h * 512 + 16 * lane : 16 * i;
        *(uint4*)(dst + at) = *(const uint4*)(src + row * cols * 2 + c * 64 + 16 * (lane & 3));
    }
}

__global__ void read_all(const uint4* p, size_t n, unsigned* out)
{
    unsigned s = 0;
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    for (; i + 3 * stride < n; i += 4 * stride) {
        uint4 a = ldw(p + i), b = ldw(p + i + stride), c = ldw(p + i + 2 * stride), d = ldw(p + i + 3 * stride);
        s ^= a.x ^ b.y ^ c.z ^ d.w;
    }
    if (s == 0x12345678) out[0] = s;
}

typedef void (*Kernel)(const unsigned char*, const float*, float*, int, int, int, int, const void*, const void*, unsigned*, float*);

static int sms;
static unsigned* tickets;
static float* part_sums;
static unsigned *xhi, *xlo;

struct Design {
    const char* name;
    bool mma;
    int mt;       // row tiles a warp (M)
    int u;        // chunks in flight (M)
    bool staged;  // MS: activations through shared memory
    bool hybrid;  // H: M or MS by shape and token count
    int mb;       // B: MB (with this many chunks in flight) at one token, MS above
    bool z;       // Z: weights in tiles
    int pf;       // ZP: bytes prefetched into L2 a warp
    int mb_u = 4; // ZP2: chunks in flight a warp at one token
    int pmul = 1; // ZPP: parts of matrices with fewer than 8, multiplied
    bool lo = true; // ZH: false, activations as bf16 alone (no lo mmas)
    int ms_mt = 1;  // ZS2: row tiles a warp in MS (from 16 tokens on)
    int minb = 1;   // ZO: MS's blocks an SM by registers (2: at most 128 a thread)
    int g = 1;      // ZG: n8 tiles whose mmas MS interleaves
    int wb = 8;     // ZN: MB's warps a block where P < 8 (at least P)
    int ts = 1;     // ZT: warps sharing a row tile in MS, each with its share of the tokens
    bool dx = false; // ZD: MB reads token 0's fragments from global memory, no staging
    bool zi = false; // ZI: tiles in groups of 8, chunk by chunk
    int wg = 0;      // W: wgmma, this many chunks a stage
};

// MB's instantiation for a design.
static Kernel mb_kernel(const Design& d)
{
    if (d.zi) return gemm_mb<4, 2, 8192>;
    if (!d.lo) return gemm_mb<4, true, 8192, false>;
    if (d.dx) return d.mb_u == 2 ? gemm_mb<2, true, 8192, true, true> : gemm_mb<4, true, 8192, true, true>;
    if (d.pf == 8192) return d.mb_u == 2 ? gemm_mb<2, true, 8192> : gemm_mb<4, true, 8192>;
    if (d.pf) return gemm_mb<4, true, 32768>;
    if (d.z) return gemm_mb<4, true>;
    return d.mb == 2 ? gemm_mb<2> : gemm_mb<4>;
}

constexpr int MS_SC = 4;  // MS: chunks a stage

// MINB > 1: blocks an SM the registers must allow, with 2 chunks a stage from 4 n8 tiles on.
template <int NT, int Z, bool LO = true, int MT = 1, int MINB = 1, int G = 1, int TS = 1>
static Kernel ms_kernel(int* smem)
{
    constexpr int SC = MT == 1 && (MINB == 1 || NT < 4) ? MS_SC : MS_SC / 2;
    constexpr int TT = TS < NT ? TS : NT;
    constexpr int GG = G < NT / TT ? G : NT / TT;
    *smem = 2 * 8 * NT * (SC * 128 + 64);
    static bool set = false;
    if (!set) {
        CK(cudaFuncSetAttribute(gemm_ms<NT, SC, Z, LO, MT, MINB, GG, TT>, cudaFuncAttributeMaxDynamicSharedMemorySize, *smem));
        set = true;
    }
    return gemm_ms<NT, SC, Z, LO, MT, MINB, GG, TT>;
}

template <int Z = 0, bool LO = true, int MT = 1, int MINB = 1, int G = 1, int TS = 1>
static Kernel pick_ms(int T, int* smem, int* ts)
{
    *ts = 1;
    if (T <= 8) return ms_kernel<1, Z, LO>(smem);
    *ts = TS < 2 ? TS : 2;
    if (T <= 16) return ms_kernel<2, Z, LO, MT, MINB, G, TS>(smem);
    *ts = TS < 4 ? TS : 4;
    if (T <= 32) return ms_kernel<4, Z, LO, MT, MINB, G, TS>(smem);
    return ms_kernel<8, Z, LO, MT, MINB, G, TS>(smem);
}

template <int NT, int SC>
static Kernel wg_kernel(int* smem)
{
    *smem = 2 * SC * 4 * NT * 256;
    static bool set = false;
    if (!set) {
        CK(cudaFuncSetAttribute(gemm_wg<NT, SC>, cudaFuncAttributeMaxDynamicSharedMemorySize, *smem));
        set = true;
    }
    return gemm_wg<NT, SC>;
}

template <int SC>
static Kernel pick_wg(int T, int* smem)
{
    if (T <= 8) return wg_kernel<1, SC>(smem);
    if (T <= 16) return wg_kernel<2, SC>(smem);
    if (T <= 32) return wg_kernel<4, SC>(smem);
    return wg_kernel<8, SC>(smem);
}

// Parts of a matrix's columns for M: fixed by its shape alone. The fewest (a power of two,
// columns a part a multiple of 256) giving at least 2,048 warps of one row tile.
static int parts_of(int rows, int cols)
{
    int p = 1;
    while ((rows / 16) * p < 2048 && cols / (2 * p) >= 256 && cols % (512 * p) == 0) p *= 2;
    return p;
}

template <int MT, int U>
static Kernel pick_m(int T)
{
    if (T <= 8) return gemm_m<1, MT, U>;
    if (T <= 16) return gemm_m<2, MT, U>;
    if (T <= 32) return gemm_m<4, MT, U>;
    return gemm_m<8, MT, U>;
}

static void launch_kernel(Kernel k, int grid, cudaStream_t st, const unsigned char* w, const float* x, float* y, int rows, int cols,
                          int T, int P, int smem = 0, int threads = 256)
{
    launch_pdl(k, dim3(grid), dim3(threads), smem, st, w, x, y, rows, cols, T, P, (const void*)xhi, (const void*)xlo, tickets,
               part_sums);
}

static void split(cudaStream_t st, const float* x, int T, int cols)
{
    const int pairs = T * cols / 2;
    const int grid = (pairs + 255) / 256 < 4 * sms ? (pairs + 255) / 256 : 4 * sms;
    launch_pdl(split_x, dim3(grid), dim3(256), 0, st, x, xhi, xlo, pairs);
}

// One product y = W x for T tokens; M's split of x is its caller's (once per input).
static void product(const Design& d, cudaStream_t st, const unsigned char* w, const float* x, float* y, int rows, int cols, int T)
{
    if (!d.mma) {
        launch_kernel(gemv_a<4>, (rows + 7) / 8, st, w, x, y, rows, cols, T, 1);
        return;
    }
    int P = parts_of(rows, cols);
    if (d.pmul > 1 && P < 8) P *= d.pmul;
    if (d.wg) {
        int smem = 0;
        Kernel k = d.wg == 8 ? pick_wg<8>(T, &smem) : d.wg == 2 ? pick_wg<2>(T, &smem) : pick_wg<4>(T, &smem);
        launch_kernel(k, (rows / 16 + 3) / 4 * P, st, w, x, y, rows, cols, T, P, smem, 128);
        return;
    }
    if (d.mb && T == 1 && P <= 16) {
        const int warps = P >= 8 ? 8 : (d.wb > P ? d.wb : P);
        const int per_block = P >= 8 ? 1 : warps / P;
        launch_kernel(mb_kernel(d), (rows / 16 + per_block - 1) / per_block, st, w, x, y, rows, cols, T, P,
                      d.dx ? 0 : 4 * cols, 32 * warps);
        return;
    }
    if (d.staged || d.mb || (d.hybrid && !(rows == 3072 && T <= 16))) {
        int smem = 0, ts = 1;
        const int mt = T > 8 ? d.ms_mt : 1;
        Kernel k = d.zi ? pick_ms<2, true, 1, 2, 2>(T, &smem, &ts)
                   : d.ts == 2 && d.minb == 3 ? pick_ms<true, true, 1, 3, 2, 2>(T, &smem, &ts)
                   : d.ts == 2 ? pick_ms<true, true, 1, 2, 2, 2>(T, &smem, &ts)
                   : d.ts == 4 ? pick_ms<true, true, 1, 3, 2, 4>(T, &smem, &ts)
                   : !d.lo && d.minb == 2 ? pick_ms<true, false, 1, 2, 2>(T, &smem, &ts)
                   : !d.lo        ? pick_ms<true, false>(T, &smem, &ts)
                   : d.g == 2     ? pick_ms<true, true, 1, 2, 2>(T, &smem, &ts)
                   : d.g == 4     ? pick_ms<true, true, 1, 2, 4>(T, &smem, &ts)
                   : d.minb == 2 ? pick_ms<true, true, 1, 2>(T, &smem, &ts)
                   : d.minb == 3 ? pick_ms<true, true, 1, 3>(T, &smem, &ts)
                   : mt == 2     ? pick_ms<true, true, 2>(T, &smem, &ts)
                   : d.z     ? pick_ms<true>(T, &smem, &ts)
                             : pick_ms(T, &smem, &ts);
        const int tpb = 8 / ts;
        launch_kernel(k, (rows / 16 / mt + tpb - 1) / tpb * P, st, w, x, y, rows, cols, T, P, smem);
        return;
    }
    const int warps = (rows / 16 + d.mt - 1) / d.mt;
    const int grid = (warps + 7) / 8 * P;
    Kernel k = d.hybrid    ? pick_m<1, 2>(T)
               : d.mt == 2 ? pick_m<2, 2>(T)
               : d.u == 2 ? pick_m<1, 2>(T)
               : d.u == 4 ? pick_m<1, 4>(T)
               : T <= 8   ? gemm_m<1, 1, 8>
               : T <= 16  ? gemm_m<2, 1, 8>
                          : pick_m<1, 4>(T);
    launch_kernel(k, grid, st, w, x, y, rows, cols, T, P);
}

int main(int argc, char** argv)
{
    // `profile`: each of a few products once, for Nsight Compute, and nothing else.
    const bool profile = argc > 1 && strcmp(argv[1], "profile") == 0;
    const bool wg_only = argc > 1 && strcmp(argv[1], "wg") == 0;
    CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    const size_t pool = 3ull << 30;
    unsigned char* w;
    float *x, *y, *y0;
    unsigned* dummy;
    const int max_t = 64, max_cols = 8192, max_rows = 128256;
    CK(cudaMalloc(&w, pool));
    CK(cudaMalloc(&x, (size_t)max_t * max_cols * 4));
    CK(cudaMalloc(&xhi, (size_t)max_t * max_cols * 2));
    CK(cudaMalloc(&xlo, (size_t)max_t * max_cols * 2));
    CK(cudaMalloc(&y, (size_t)max_t * max_rows * 4));
    CK(cudaMalloc(&y0, (size_t)max_t * max_rows * 4));
    CK(cudaMalloc(&tickets, 65536 * 4));
    CK(cudaMemset(tickets, 0, 65536 * 4));
    CK(cudaMalloc(&part_sums, 64ull << 20));
    CK(cudaMalloc(&dummy, 4));
    {
        std::vector<unsigned short> h(pool / 2);
        unsigned s = 1;
        for (auto& v : h) {
            s = s * 1664525u + 1013904223u;
            v = 0x3c00 | ((s >> 16) & 0x83ff);
        }
        CK(cudaMemcpy(w, h.data(), pool, cudaMemcpyHostToDevice));
        random_activations(x, (size_t)max_t * max_cols, s);
    }
    cudaStream_t st;
    CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    cudaEvent_t e0, e1;
    cudaEventCreate(&e0);
    cudaEventCreate(&e1);
    float ms;
    double copy_gbs = 0;
    {
        const size_t half = 1ull << 30;
        copy_gbs = copy_bandwidth(st, w + half, w, half);
        printf("copy: %.0f GB/s (read + write)\n", copy_gbs);
        // The pool again, with the probe's own data (the copies above overwrote its top half).
        std::vector<unsigned short> h(pool / 2);
        unsigned s = 7;
        for (auto& v : h) {
            s = s * 1664525u + 1013904223u;
            v = 0x3c00 | ((s >> 16) & 0x83ff);
        }
        CK(cudaMemcpy(w, h.data(), pool, cudaMemcpyHostToDevice));
        for (int i = 0; i < 3; ++i) read_all<<<sms * 8, 256, 0, st>>>((const uint4*)w, pool / 16, dummy);
        cudaEventRecord(e0, st);
        for (int i = 0; i < 10; ++i) read_all<<<sms * 8, 256, 0, st>>>((const uint4*)w, pool / 16, dummy);
        cudaEventRecord(e1, st);
        CK(cudaEventSynchronize(e1));
        cudaEventElapsedTime(&ms, e0, e1);
        printf("read: %.0f GB/s\n", 1.0 * pool * 10 / ms / 1e6);
    }
    const Design all_designs[] = {
        {"A f32 matvec, 8 tokens a pass", false, 1, 0, false, false, 0},
        {"M mma, 1 tile a warp, 2 chunks", true, 1, 2, false, false, 0},
        {"M mma, 1 tile a warp, 4 chunks", true, 1, 4, false, false, 0},
        {"M2 mma, 2 tiles a warp, 2 chunks", true, 2, 2, false, false, 0},
        {"M8 mma, 8 chunks to 16 tokens, 4 above", true, 1, 8, false, false, 0},
        {"MS mma, activations in shared memory", true, 1, 4, true, false, 0},
        {"H M or MS by shape and tokens", true, 1, 2, false, true, 0},
        {"B MB at one token (4 chunks), MS above", true, 1, 4, false, false, 4},
        {"B2 MB at one token (2 chunks), MS above", true, 1, 4, false, false, 2},
        {"Z B over weights in tiles", true, 1, 4, false, false, 4, true},
        {"ZP Z, 8 KiB a warp prefetched", true, 1, 4, false, false, 4, true, 8192},
        {"ZP32 Z, 32 KiB a warp prefetched", true, 1, 4, false, false, 4, true, 32768},
        {"ZP2 ZP, 2 chunks in flight", true, 1, 4, false, false, 4, true, 8192, 2},
        {"ZPP ZP, small part counts doubled", true, 1, 4, false, false, 4, true, 8192, 4, 2},
        {"ZS2 ZP, 2 row tiles a warp from 16 tok", true, 1, 4, false, false, 4, true, 8192, 4, 1, true, 2},
        {"ZH ZP, bf16 activations (no lo)", true, 1, 4, false, false, 4, true, 8192, 4, 1, false},
        {"ZO ZP, MS at 2 blocks an SM", true, 1, 4, false, false, 4, true, 8192, 4, 1, true, 1, 2},
        {"ZO3 ZP, MS at 3 blocks an SM", true, 1, 4, false, false, 4, true, 8192, 4, 1, true, 1, 3},
        {"ZO2 ZP2 with MS at 2 blocks an SM", true, 1, 4, false, false, 4, true, 8192, 2, 1, true, 1, 2},
        {"ZG2 ZO, 2 n8 tiles' mmas interleaved", true, 1, 4, false, false, 4, true, 8192, 4, 1, true, 1, 2, 2},
        {"ZG4 ZO, 4 n8 tiles' mmas interleaved", true, 1, 4, false, false, 4, true, 8192, 4, 1, true, 1, 2, 4},
        {"ZN ZG2, MB blocks of 4 warps (P<8)", true, 1, 4, false, false, 4, true, 8192, 4, 1, true, 1, 2, 2, 4},
        {"ZN2 ZG2, MB blocks of 2 warps (P<4)", true, 1, 4, false, false, 4, true, 8192, 4, 1, true, 1, 2, 2, 2},
        {"ZHO ZO with bf16 activations (no lo)", true, 1, 4, false, false, 4, true, 8192, 4, 1, false, 1, 2, 2},
        {"ZT ZG2, 2 warps a tile from 16 tok", true, 1, 4, false, false, 4, true, 8192, 4, 1, true, 1, 2, 2, 8, 2},
        {"ZD ZG2, MB's token 0 from L2, unstaged", true, 1, 4, false, false, 4, true, 8192, 4, 1, true, 1, 2, 2, 8, 1, true},
        {"ZDN ZD, MB blocks of 4 warps (P<8)", true, 1, 4, false, false, 4, true, 8192, 4, 1, true, 1, 2, 2, 4, 1, true},
        {"ZD2 ZD, 2 chunks in flight at one token", true, 1, 4, false, false, 4, true, 8192, 2, 1, true, 1, 2, 2, 8, 1, true},
        {"ZI ZG2 over tiles in groups of 8", true, 1, 4, false, false, 4, true, 8192, 4, 1, true, 1, 2, 2, 8, 1, false, true},
        {"W wgmma, 4 chunks a stage", true, 1, 4, false, false, 0, true, 0, 4, 1, true, 1, 1, 1, 8, 1, false, false, 4},
        {"W2 wgmma, 2 chunks a stage", true, 1, 4, false, false, 0, true, 0, 4, 1, true, 1, 1, 1, 8, 1, false, false, 2},
        {"W8 wgmma, 8 chunks a stage", true, 1, 4, false, false, 0, true, 0, 4, 1, true, 1, 1, 1, 8, 1, false, false, 8},
    };
    // `gemm wg`: A, M, ZG2, ZI and the wgmma designs alone.
    std::vector<Design> ds;
    for (const Design& d : all_designs)
        if (!wg_only || !d.mma || d.name[0] == 'W' || (d.name[0] == 'M' && d.name[1] == ' ' && d.u == 2) ||
            !strncmp(d.name, "ZG2", 3) || !strncmp(d.name, "ZI", 2))
            ds.push_back(d);
    const Design* designs = ds.data();
    const int n_designs = (int)ds.size();
    struct Shape {
        const char* name;
        int rows, cols;
    };
    const Shape shapes[] = {{"qkv 3072x2048", 3072, 2048},
                            {"o 2048x2048", 2048, 2048},
                            {"gate_up 16384x2048", 16384, 2048},
                            {"down 2048x8192", 2048, 8192},
                            {"head 128256x2048", 128256, 2048}};
    const int counts[] = {1, 4, 16, 64};
    if (profile) {
        for (int si : {0, 3, 4})
            for (int di : {0, 19, 28})
                for (int T : {1, 64}) {
                    const Design& d = designs[di];
                    split(st, x, T, shapes[si].cols);
                    product(d, st, w, x, y, shapes[si].rows, shapes[si].cols, T);
                    CK(cudaStreamSynchronize(st));
                    printf("profiled %s, %s, T = %d\n", shapes[si].name, d.name, T);
                }
        return 0;
    }
    bool all_same = true;
    // Checks: token 0's bits at every token count, and the error against A at 64 tokens.
    for (auto& sh : shapes) {
        const int P = parts_of(sh.rows, sh.cols);
        printf("== %s: %d parts of %d columns\n", sh.name, P, sh.cols / P);
        std::vector<float> a((size_t)64 * sh.rows), b((size_t)64 * sh.rows), first(sh.rows), m64;
        product(designs[0], st, w, x, y0, sh.rows, sh.cols, 64);
        CK(cudaStreamSynchronize(st));
        CK(cudaMemcpy(a.data(), y0, a.size() * 4, cudaMemcpyDeviceToHost));
        for (int di = 1; di < n_designs; ++di) {
            const Design& d = designs[di];
            bool same = true;
            for (int T : {1, 3, 8, 13, 16, 40, 64}) {
                split(st, x, T, sh.cols);
                CK(cudaMemsetAsync(y, 0, (size_t)T * sh.rows * 4, st));
                if (d.z) to_tiles<<<4 * sms, 256, 0, st>>>(w, w + pool / 2, sh.rows, sh.cols, d.zi ? 2 : 1);
                product(d, st, d.z ? w + pool / 2 : w, x, y, sh.rows, sh.cols, T);
                CK(cudaStreamSynchronize(st));
                CK(cudaMemcpy(b.data(), y, (size_t)T * sh.rows * 4, cudaMemcpyDeviceToHost));
                if (T == 1) memcpy(first.data(), b.data(), sh.rows * 4);
                same = same && memcmp(first.data(), b.data(), sh.rows * 4) == 0;
            }
            // b holds the 64-token product: MS must give M's bits for every output.
            if (di == 1) m64 = b;
            if ((d.staged || d.hybrid || d.mb || d.z) && d.pmul == 1 && d.lo) {
                const bool as_m = memcmp(m64.data(), b.data(), b.size() * 4) == 0;
                printf("  %-34s 64 tokens: %s M's bits\n", d.name, as_m ? "the same as" : "NOT");
                all_same = all_same && as_m;
            }
            double err = 0, nrm = 0;
            for (size_t i = 0; i < a.size(); ++i) {
                err += (double)(a[i] - b[i]) * (a[i] - b[i]);
                nrm += (double)a[i] * a[i];
            }
            printf("  %-34s token 0 %s at 1-64 tokens, error against A %.1e\n", d.name, same ? "bit-equal" : "DIFFERS",
                   sqrt(err / nrm));
            all_same = all_same && same;
        }
    }
    // Each product alone, back to back, the weights rotated through the pool.
    for (auto& sh : shapes) {
        const size_t bytes = (size_t)sh.rows * sh.cols * 2;
        const int copies = (int)(pool / bytes);
        printf("== %s (%.1f MB): us a call at 1 / 4 / 16 / 64 tokens (GB/s of weights)\n", sh.name, bytes / 1e6);
        for (auto& d : ds) {
            printf("  %-34s", d.name);
            for (int T : counts) {
                split(st, x, T, sh.cols);
                for (int i = 0; i < 3; ++i) product(d, st, w + (size_t)(i % copies) * bytes, x, y, sh.rows, sh.cols, T);
                const int iters = 40;
                cudaEventRecord(e0, st);
                for (int i = 0; i < iters; ++i) product(d, st, w + (size_t)(i % copies) * bytes, x, y, sh.rows, sh.cols, T);
                cudaEventRecord(e1, st);
                CK(cudaEventSynchronize(e1));
                cudaEventElapsedTime(&ms, e0, e1);
                printf(" %8.1f (%4.0f)", ms * 1000 / iters, bytes * iters / ms / 1e6);
            }
            printf("\n");
        }
    }
    // A step's products chained as a decode step chains them (16 layers and the head, each
    // its own weights, M with the split of each distinct input), as one CUDA graph.
    const int layers = 16;
    const size_t per_layer = (3072ull + 2048 + 16384) * 2048 * 2 + 2048ull * 8192 * 2;
    const size_t head = 128256ull * 2048 * 2, step_bytes = layers * per_layer + head;
    printf("== a step's products: 16 layers + head, %.1f MB of weights, one graph; roofline %.1f us at the copy bandwidth\n",
           step_bytes / 1e6, step_bytes / copy_gbs / 1e3);
    printf("  %-34s %10s %10s %10s %10s   (us a step; tokens/s at 64)\n", "design", "T=1", "T=4", "T=16", "T=64");
    for (int run = 0; run < 2 * n_designs; ++run) {
        const Design& d = designs[run / 2];
        const bool split_each = run % 2 == 0;
        if (!d.mma && !split_each) continue;
        printf("  %-34s", split_each ? d.name : "  the same, no split kernels");
        double us64 = 0;
        for (int T : counts) {
            if (!split_each) split(st, x, T, 8192);
            cudaGraph_t g;
            cudaGraphExec_t ge;
            CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal));
            size_t off = 0;
            for (int l = 0; l < layers; ++l) {
                for (auto& sh : shapes) {
                    if (sh.rows == 128256) continue;
                    // Every product of a layer has an input of its own, split once.
                    if (d.mma && split_each) split(st, x, T, sh.cols);
                    product(d, st, w + off, x, y, sh.rows, sh.cols, T);
                    off += (size_t)sh.rows * sh.cols * 2;
                }
            }
            if (d.mma && split_each) split(st, x, T, shapes[4].cols);
            product(d, st, w + off, x, y, shapes[4].rows, shapes[4].cols, T);
            CK(cudaStreamEndCapture(st, &g));
            CK(cudaGraphInstantiate(&ge, g, 0));
            for (int i = 0; i < 3; ++i) CK(cudaGraphLaunch(ge, st));
            const int iters = 10;
            cudaEventRecord(e0, st);
            for (int i = 0; i < iters; ++i) CK(cudaGraphLaunch(ge, st));
            cudaEventRecord(e1, st);
            CK(cudaEventSynchronize(e1));
            cudaEventElapsedTime(&ms, e0, e1);
            const double us = ms * 1000 / iters;
            if (T == 64) us64 = us;
            printf(" %10.1f", us);
            cudaGraphExecDestroy(ge);
            cudaGraphDestroy(g);
        }
        printf("   %8.0f\n", 64 / us64 * 1e6);
    }
    printf("token 0 bit-equal at every token count: %s\n", all_same ? "yes" : "NO");
    return 0;
}
