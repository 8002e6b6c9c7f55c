// Probe: can one persistent kernel keep the weight stream of a one-token decode step running
// through its dependencies, where a graph of kernels leaves HBM idle at every kernel boundary?
// Not part of Tern: a measurement for choosing the design of the batch-1 decode step (the
// Llama-3.2-1B shape in BF16, 2,471.5 MB of weights a token; with -DSMALL_SHAPE the
// SmolLM2-135M shape's 30 layers of 576 columns, whose step is bound by its dependencies, not
// its 269 MB of BF16 weights).
//
//   nvcc -O3 -gencode arch=compute_90a,code=sm_90a -std=c++17 -I crates/model/src/llama/cuda/kernels \
//     [-DSMALL_SHAPE] -o /tmp/dp scripts/probes/decode-persistent.cu && /tmp/dp
//
// A step here is the decode step's chain of matrix products and its attention, with their
// real dependencies, and without the norms (fused into the products in the engine): per
// layer x -> QKV product -> attention (the engine's own device code, attention.cuh: RoPE,
// the KV append and flash-decoding splits merged by the last, over POS cached positions of
// an f32 cache) -> O product added to x -> gate/up product with SwiGLU (gate and up rows
// interleaved) -> down product added to x; every layer, then the output head. Each stage reads
// the whole of the stage before's output. Every design but LE runs the same warp code per
// row (a warp a row, 16-byte loads, lane l's columns 8l .. 8l + 7 of each 256, a fixed
// butterfly) and the same attention code, so all give the same bits (checked against G).
//
// Designs:
//   G   a graph of kernels: a kernel a stage, each launched with programmatic dependent launch
//       and asking L2 for the first bytes of its rows before it waits (today's engine).
//   B   one persistent kernel, a block an SM, each stage's rows dealt to blocks in equal
//       contiguous runs; a block signals a counter when its rows of a stage are written and
//       waits for the stage before it to be complete (all blocks counted) before reading its
//       input: a grid barrier between stages.
//   C   B with the next stage's weights of each block copied into shared memory (up to
//       SMEM bytes, cp.async) as soon as the block has finished its rows of a stage, before it
//       waits for the others: the weight stream keeps running through the wait, and a stage
//       small enough to fit (Q/K/V, O) reads only shared memory once its input is there.
//   L   B with the next stage's first bytes of each row asked of L2 before the wait instead.
//   GX, BX, CX, LX  the same with each block copying the stage's input x into its shared
//       memory once (after the wait) and every row reading it there, rather than every warp
//       reading x through L2 (two bytes of x a byte of weights). Run on an H100 without them,
//       every design read L2-bound at 0.8-1.1 TB/s (G 2,996 us a step against a copy roofline of
//       823 us), far from what the engine's own kernels read.
//   PX  LX with each warp's rows walked in segments of SEG_LOADS * 256 columns (1,024; build
//       with -DSEG_LOADS=8 for 2,048), the next segment's loads issued before the current one
//       is summed, and the first segment's loads issued before the wait: the barrier and the
//       copy of x overlap the weights' first bytes in flight.
//   NX, NPX  LX and PX without the waits (stages read inputs not yet written: timing only,
//       wrong results): how fast the same rows stream with no dependency at all, the ceiling
//       of the row code against which the waits' cost is read.
//   SX, SPX  LX and PX with the small stages' weights streamed ahead: each block's Q/K/V rows
//       (24 of 4 KiB on 132 SMs) copied into its shared memory by one bulk copy issued as its
//       down product of the layer before starts, its O rows (16) as its Q/K/V product starts,
//       and the first 192 KiB of its gate/up rows asked of L2 as its attention starts. HBM
//       then streams through the latency-bound stages (Q/K/V, attention, O), which read
//       shared memory once their input is complete: the megakernel's shape, per stage.
//   LE  LX with each row summed by the engine's own BF16 row code (matvec.cuh's matvec_row,
//       as decode.cu calls it: a lane's two 4-column quads of every 256 columns, 8-byte loads,
//       four steps in flight) rather than row_dot (a lane's 8 consecutive columns, 16-byte
//       loads): whether the engine's row code or the rest of its step (rows split in parts,
//       the fused norms) keeps decode.cu's layers from LX's time. Another order of sums, so
//       other bits (timing only).
//   R   LX with each block's rows of every layer stage streamed into a ring in its shared
//       memory, in stage order, by bulk copies issued as soon as the ring has room (layers
//       ahead), and its first head rows asked of L2 once the last layer's are issued: the
//       dependencies wait on counters as in B, but no stage of a layer waits for HBM once its
//       input is there. Only where a block's rows of a stage fit the ring (the small shape).
//   RN  R without the waits on other blocks (timing only): the ring's ceiling.
//
// What it answers: how far C and L take a step toward the products' bytes at HBM's speed, and
// what a dependency between stages costs each way. After the table of steps it prints, for each
// persistent design, how long each kind of stage takes a layer (block 0's %globaltimer at the
// start of every stage) and the rate its weights are read at.
#ifndef __CUDACC_RTC__
#include <cuda_runtime.h>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <cstring>
#include <vector>
#endif

#include "attention.cuh"
#include "matvec.cuh"
#include "probe.cuh"

#ifdef SMALL_SHAPE  // SmolLM2-135M's shape (rows of 576 columns: 2.25 steps of 256)
constexpr int LAYERS = 30, EMBD = 576, FF = 1536, VOCAB = 49152, HEADS = 9, KV_HEADS = 3;
#else  // Llama-3.2-1B's
constexpr int LAYERS = 16, EMBD = 2048, FF = 8192, VOCAB = 128256, HEADS = 32, KV_HEADS = 8;
#endif
constexpr int D = 64, KV_DIM = KV_HEADS * D, QKV = HEADS * D + 2 * KV_DIM, CTX = 1024, POS = 640;
constexpr int SPLITS = CTX / ATTN_SPLIT, ITEMS = (POS / ATTN_SPLIT + 1) * HEADS;
constexpr int THREADS = 512, WARPS = THREADS / 32, TEAMS = THREADS / ATTN_THREADS;
constexpr int SMEM = 200 * 1024, SMEM_X = 176 * 1024;  // C's weights: x through L2 / in shared memory

// Attention's buffers (the same for every layer but the cache), and where the persistent
// designs' block 0 stamps %globaltimer as it starts each stage (after its wait) and once all
// blocks have finished the last (null: no stamps).
struct Attn {
    unsigned long long* stamps;
    const float* inv_freq;
    float *part_o, *part_ml;
    unsigned* tickets;
};

// A lane's 16 bytes of a row, from shared memory or (read once) past L1.
template <bool SHARED>
__device__ __forceinline__ uint4 row_load(const unsigned char* p)
{
    return SHARED ? *(const uint4*)p : ldw(p);
}

// acc plus the 8 weights in v times x's 8 columns at xp (XS: in shared memory).
template <bool XS>
__device__ __forceinline__ float row_sum(uint4 v, const float* xp, float acc)
{
    if (XS) return dot8(v, *(const float4*)xp, *(const float4*)(xp + 4), acc);
    return dot8(v, __ldcg((const float4*)xp), __ldcg((const float4*)(xp + 4)), acc);
}

// One row's dot product with x, by a warp; `smem` rows are read with ordinary loads. x is f32,
// read through L2 (in the persistent designs other blocks of the same launch wrote it), or
// with XS from the block's copy of it in shared memory (the same values, so the same bits).
template <bool SHARED, bool XS>
__device__ __forceinline__ float row_dot(const unsigned char* row, const float* x, int cols)
{
    const int lane = threadIdx.x & 31, steps = cols / 256;
    float acc = 0.f;
    int k = 0;
    for (; k + 4 <= steps; k += 4) {
        uint4 v[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) v[i] = row_load<SHARED>(row + (k + i) * 512 + 16 * lane);
#pragma unroll
        for (int i = 0; i < 4; ++i) acc = row_sum<XS>(v[i], x + (k + i) * 256 + 8 * lane, acc);
    }
    // The last steps one at a time, then a partial step's columns (the small shape's).
    for (; k < steps; ++k) acc = row_sum<XS>(row_load<SHARED>(row + k * 512 + 16 * lane), x + k * 256 + 8 * lane, acc);
    if (8 * lane < cols - 256 * steps)
        acc = row_sum<XS>(row_load<SHARED>(row + k * 512 + 16 * lane), x + k * 256 + 8 * lane, acc);
    return wsum(acc);
}

// LE's row: the engine's own BF16 row code (matvec.cuh's matvec_row as decode.cu calls it: a
// lane's two 4-column quads of each 256 columns, 8-byte loads, four steps in flight), x read
// where it is (the block's copy); the total in lane 0. Another order of sums than row_dot's.
__device__ __forceinline__ float engine_row(const unsigned char* row, const float* x, int cols)
{
    float total = 0.f;
    matvec_row<WeightType<2>::T, 1, true, false, 4, true>(row, x, nullptr, 0, cols, 1, 0, 0, nullptr, threadIdx.x & 31,
                                                          magic_2p23(), &total);
    return total;
}

// A stage: y = W x over `rows` rows (kind 0), the same added to y (1), or SwiGLU over
// interleaved gate/up rows into y[r / 2] (2); or attention (3) of the QKV row x over the
// layer's cache k, v (`w` unused) into y.
struct Stage {
    const unsigned char* w;
    const float* x;
    float* y;
    int rows, cols, kind;
    float *k, *v;
};

// Attention item `item` (split item / HEADS, head item % HEADS) of stage s by `team`.
__device__ __forceinline__ void attend(const Stage& s, const Attn& a, AttnShared<D, 1>& sh, Team team, int item)
{
    attention<D, 1>(team, sh, item / HEADS, item % HEADS, 1, 0, POS, s.x, s.k, s.v, a.inv_freq, a.part_o,
                    a.part_ml, a.tickets, s.y, HEADS, KV_HEADS, D, 1, SPLITS, 0.125f, QKV, no_split());
}

__device__ __forceinline__ void finish_row(const Stage& s, int r, float v, float other)
{
    if ((threadIdx.x & 31) != 0) return;
    if (s.kind == 0) s.y[r] = v;
    if (s.kind == 1) s.y[r] += v;
    if (s.kind == 2) s.y[r / 2] = v / (1.f + expf(-v)) * other;
}

// The stage's input x (cols floats, written by other blocks: read through L2) copied into
// `xs` by the whole block.
__device__ __forceinline__ void stage_x(const Stage& s, float* xs)
{
    for (int i = threadIdx.x; i < s.cols / 4; i += blockDim.x) ((float4*)xs)[i] = __ldcg((const float4*)s.x + i);
    __syncthreads();
}

// Rows lo .. hi - 1 of stage s by the block's warps; rows below `in_smem` (from lo) come from
// `sm`, which holds them in order; x from `x` (XS: the block's copy). Attention: the block's
// teams take items in turn.
template <bool XS, bool ENGINE = false>
__device__ void run_rows(const Stage& s, const Attn& a, AttnShared<D, 1>* ash, int lo_, int hi_, const unsigned char* sm,
                         int in_smem, const float* x)
{
    const int warp = threadIdx.x >> 5;
    if (s.kind == 3) {
        const int team = threadIdx.x / ATTN_THREADS;
        for (int item = blockIdx.x * TEAMS + team; item < ITEMS; item += gridDim.x * TEAMS)
            attend(s, a, ash[team], Team{threadIdx.x % ATTN_THREADS, 1u + team}, item);
        return;
    }
    const size_t rb = (size_t)s.cols * 2;
    const int step = s.kind == 2 ? 2 : 1;
    for (int r = lo_ + warp * step; r < hi_; r += WARPS * step) {
        float v, other = 0.f;
        if (r - lo_ < in_smem) {
            v = row_dot<true, XS>(sm + (size_t)(r - lo_) * rb, x, s.cols);
            if (step == 2) other = row_dot<true, XS>(sm + (size_t)(r + 1 - lo_) * rb, x, s.cols);
        } else if (ENGINE) {
            v = engine_row(s.w + (size_t)r * rb, x, s.cols);
            if (step == 2) other = engine_row(s.w + (size_t)(r + 1) * rb, x, s.cols);
        } else {
            v = row_dot<false, XS>(s.w + (size_t)r * rb, x, s.cols);
            if (step == 2) other = row_dot<false, XS>(s.w + (size_t)(r + 1) * rb, x, s.cols);
        }
        finish_row(s, r, v, other);
    }
}

// G: one stage a launch, a block of 8 warps per 8 rows (16 for SwiGLU), or 256 outputs.
__global__ void __launch_bounds__(ATTN_THREADS) attention_kernel(Stage s, Attn a)
{
    __shared__ AttnShared<D, 1> sh;
    pdl_wait();
    pdl_launch_dependents();
    if ((int)blockIdx.x <= POS / ATTN_SPLIT) attend(s, a, sh, Team{threadIdx.x, 0}, blockIdx.x * HEADS + blockIdx.y);
}

template <bool XS>
__global__ void __launch_bounds__(256) stage_kernel(Stage s)
{
    __shared__ __align__(16) float xs[XS ? FF : 4];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int step = s.kind == 2 ? 2 : 1;
    const int r = (blockIdx.x * 8 + warp) * step;
    const size_t rb = (size_t)s.cols * 2;
    if (r < s.rows) asm volatile("prefetch.global.L2 [%0];" ::"l"(s.w + (size_t)r * rb + 128 * (lane & 15)));
    pdl_wait();
    pdl_launch_dependents();
    if (XS) stage_x(s, xs);
    if (r >= s.rows) return;
    const float* x = XS ? xs : s.x;
    const float v = row_dot<false, XS>(s.w + (size_t)r * rb, x, s.cols);
    const float other = step == 2 ? row_dot<false, XS>(s.w + (size_t)(r + 1) * rb, x, s.cols) : 0.f;
    finish_row(s, r, v, other);
}

__device__ __forceinline__ unsigned ld_acquire(const unsigned* p)
{
    unsigned v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}
__device__ __forceinline__ unsigned long long globaltimer()
{
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
__device__ __forceinline__ void cp16(void* dst, const void* src)
{
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"((unsigned)__cvta_generic_to_shared(dst)), "l"(src));
}

// The block's run of a stage's rows (whole SwiGLU pairs).
__device__ __forceinline__ void block_rows(const Stage& s, int* lo_, int* hi_)
{
    const int unit = s.kind == 2 ? 2 : 1, units = s.rows / unit;
    *lo_ = (int)((long long)units * blockIdx.x / gridDim.x) * unit;
    *hi_ = (int)((long long)units * (blockIdx.x + 1) / gridDim.x) * unit;
}

// A segment of P's rows: each lane's SEG_LOADS loads of 16 bytes, 256 columns each.
#ifndef SEG_LOADS
#define SEG_LOADS 4
#endif
constexpr int SEG_COLS = SEG_LOADS * 256;

// P's loads of segment j of a warp's rows of stage s (rows lo, lo + WARPS * unit, ... from
// `first`, a unit of `unit` rows: SwiGLU's gate and up) into v.
__device__ __forceinline__ void seg_load(const Stage& s, int first, int unit, int j, uint4 (&v)[SEG_LOADS])
{
    const int pieces = s.cols / SEG_COLS, per_unit = unit * pieces;
    const int row = first + (j / per_unit) * WARPS * unit + (j / pieces) % unit;
    const unsigned char* p = s.w + (size_t)row * s.cols * 2 + (size_t)(j % pieces) * SEG_COLS * 2 + 16 * (threadIdx.x & 31);
#pragma unroll
    for (int i = 0; i < SEG_LOADS; ++i) v[i] = ldw(p + i * 512);
}

// P's sums of segment j (loaded in v) into acc[0] (acc[1]: SwiGLU's up row), in column order
// as row_dot's; a unit's last segment finishes its row.
__device__ __forceinline__ void seg_sum(const Stage& s, int first, int unit, int j, const uint4 (&v)[SEG_LOADS], const float* x,
                                        float& acc0, float& acc1)
{
    const int lane = threadIdx.x & 31, pieces = s.cols / SEG_COLS, per_unit = unit * pieces;
    const int h = (j / pieces) % unit, piece = j % pieces;
    float acc = h ? acc1 : acc0;
#pragma unroll
    for (int i = 0; i < SEG_LOADS; ++i) {
        const float* xp = x + (piece * SEG_LOADS + i) * 256 + 8 * lane;
        acc = dot8(v[i], *(const float4*)xp, *(const float4*)(xp + 4), acc);
    }
    if (h) acc1 = acc; else acc0 = acc;
    if (j % per_unit == per_unit - 1) {
        const int row = first + (j / per_unit) * WARPS * unit;
        finish_row(s, row, wsum(acc0), unit == 2 ? wsum(acc1) : 0.f);
        acc0 = acc1 = 0.f;
    }
}

// S's shared memory: a block's Q/K/V rows, then its O rows, each at most ceil(rows / blocks).
__host__ __device__ constexpr size_t s_rows_bytes(int rows, int blocks) { return (size_t)((rows + blocks - 1) / blocks) * EMBD * 2; }

// S: the block's rows of stage s copied into `buf` by one bulk copy (pieces of 64 KiB at most),
// completing a phase of `bar`. By one thread, after the block's last reads of `buf`.
__device__ __forceinline__ void copy_ahead(const Stage& s, unsigned char* buf, unsigned long long* bar)
{
    int lo_, hi_;
    block_rows(s, &lo_, &hi_);
    const unsigned bytes = (unsigned)((hi_ - lo_) * s.cols * 2);
    const unsigned char* src = s.w + (size_t)lo_ * s.cols * 2;
#if __CUDA_ARCH__ >= 900  // (the host pass sees no Hopper helpers)
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    bar_expect(bar, bytes);
    for (unsigned o = 0; o < bytes; o += 65536) bulk_copy(buf + o, src + o, bytes - o < 65536 ? bytes - o : 65536, bar);
#endif
}

// S's two barriers set up by the block, and a wait for phase `parity` of one.
__device__ __forceinline__ void s_bars_init(unsigned long long* bars)
{
#if __CUDA_ARCH__ >= 900
    if (threadIdx.x == 0) {
        bar_init(&bars[0]);
        bar_init(&bars[1]);
        bar_init_fence();
    }
#endif
    __syncthreads();
}
__device__ __forceinline__ void s_bar_wait(unsigned long long* bar, unsigned parity)
{
#if __CUDA_ARCH__ >= 900
    bar_wait(bar, parity);
#endif
}

// R: a block's rows of the step's matrix stages (all but the head), streamed in stage order
// into a ring of RING bytes of its shared memory by bulk copies as soon as the ring has room.
// Weights depend on nothing, so they stream while the stages before theirs run and wait, and
// a stage reads only shared memory once its input is complete: the megakernel's resident
// weights, for a model small enough that a few layers' rows of a block fit (the small shape:
// about 54 KiB a layer a block on 132 SMs). A chunk (a block's rows of a stage) is never split
// by the ring's end: the bytes before it are left unused.
constexpr unsigned RING = 192 * 1024;
constexpr int RING_SLOTS = 32;                // chunks in the ring at most (an mbarrier each)
constexpr unsigned HEAD_AHEAD = 256 * 1024;  // a block's head bytes asked of L2 once its layers are issued

struct Ring {
    unsigned long long bars[RING_SLOTS];
    unsigned off[RING_SLOTS], end[RING_SLOTS];  // a chunk's offset, and wpos after it
};

// Thread 0's side of the ring: the next stage to issue, chunks issued and freed, and bytes
// allocated (skipped ends included) and freed, ever.
struct RingFill {
    int next;
    unsigned issued, freed, wpos, rpos;
};

// Thread 0: issues the next chunks while the ring has room and a free slot (the head: its
// first bytes asked of L2 instead, once).
__device__ void ring_fill(const Stage* stages, int n, unsigned char* ring, Ring& r, RingFill& f)
{
#if __CUDA_ARCH__ >= 900
    for (; f.next < n; ++f.next) {
        const Stage s = stages[f.next];
        if (s.kind == 3) continue;
        int lo_, hi_;
        block_rows(s, &lo_, &hi_);
        const unsigned char* src = s.w + (size_t)lo_ * s.cols * 2;
        const unsigned bytes = (unsigned)((hi_ - lo_) * s.cols * 2);
        if (f.next == n - 1) {
            for (unsigned o = 0; o < bytes && o < HEAD_AHEAD; o += 32768)
                asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(src + o),
                             "r"(bytes - o < 32768 ? bytes - o : 32768u)
                             : "memory");
            continue;
        }
        if (f.issued - f.freed == RING_SLOTS) return;
        if (f.wpos == f.rpos) f.wpos = f.rpos = (f.wpos + RING - 1) / RING * RING;  // empty: start at 0
        unsigned at = f.wpos % RING, need = bytes;
        if (at + bytes > RING) {
            need += RING - at;
            at = 0;
        }
        if (f.wpos + need - f.rpos > RING) return;
        f.wpos += need;
        const unsigned slot = f.issued % RING_SLOTS;
        r.off[slot] = at;
        r.end[slot] = f.wpos;
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // after the block's reads of the bytes
        bar_expect(&r.bars[slot], bytes);
        for (unsigned o = 0; o < bytes; o += 65536)
            bulk_copy(ring + at + o, src + o, bytes - o < 65536 ? bytes - o : 65536u, &r.bars[slot]);
        ++f.issued;
    }
#endif
}

// B, C, L, P, S: every stage in one launch. `done[i]` counts the blocks that finished stage i.
// Without WAIT no block waits for another (timing only).
// MODE 0: B, 1: C (shared memory), 2: L (L2), 3: P, 4: S over L, 5: S over P, 6: LE, 7: R over L
// (the ring above; the host checks that a block's rows of any stage fit it) (S: each block's
// Q/K/V rows copied into its shared memory by a bulk copy issued as its down product of the
// layer before starts, its O rows as its Q/K/V product starts, and the first 192 KiB of its
// gate/up rows asked of L2 as its attention starts: the small stages' weights stream while
// the stages before them run, and read shared memory once their input is there).
template <int MODE, bool XS, bool WAIT = true>
__global__ void __launch_bounds__(THREADS, 1) persistent(const Stage* stages, int n, Attn a, unsigned* done)
{
    constexpr bool S = MODE == 4 || MODE == 5, ENGINE = MODE == 6, R = MODE == 7;
    constexpr int BASE = S ? MODE - 2 : ENGINE || R ? 2 : MODE;
    extern __shared__ __align__(16) unsigned char sm[];
    __shared__ AttnShared<D, 1> ash[TEAMS];
    __shared__ __align__(16) float xs[XS ? FF : 4];
    __shared__ __align__(8) unsigned long long bars[2];  // S: Q/K/V rows, O rows
    unsigned char* const bufs[2] = {sm, sm + s_rows_bytes(QKV, gridDim.x)};
    if (S) {
        s_bars_init(bars);
        if (threadIdx.x == 0) copy_ahead(stages[0], bufs[0], &bars[0]);
    }
    __shared__ Ring ring;
    RingFill fill = {0, 0, 0, 0, 0};
    unsigned chunk = 0;  // R: the next stage's chunk
    if (R) {
#if __CUDA_ARCH__ >= 900
        if (threadIdx.x == 0) {
            for (int k = 0; k < RING_SLOTS; ++k) bar_init(&ring.bars[k]);
            bar_init_fence();
        }
#endif
        __syncthreads();
        if (threadIdx.x == 0) ring_fill(stages, n, sm, ring, fill);
    }
    int in_smem = 0;
    for (int i = 0; i < n; ++i) {
        const Stage s = stages[i];
        const bool ringed = R && s.kind != 3 && i != n - 1;
        const int pos = i % 5, layer = i / 5;
        // S: this stage's rows are (or are being) copied into bufs[pos / 2].
        const bool ahead = S && layer < LAYERS && (pos == 0 || pos == 2);
        if (S && threadIdx.x == 0 && layer < LAYERS) {
            if (pos == 0) copy_ahead(stages[i + 2], bufs[1], &bars[1]);
            if (pos == 4 && layer + 1 < LAYERS) copy_ahead(stages[i + 1], bufs[0], &bars[0]);
            if (pos == 1) {
                int lo_, hi_;
                block_rows(stages[i + 2], &lo_, &hi_);
                const size_t rb = (size_t)stages[i + 2].cols * 2, bytes = (size_t)(hi_ - lo_) * rb;
                const unsigned char* p = stages[i + 2].w + (size_t)lo_ * rb;
                for (size_t o = 0; o < bytes && o < 192 * 1024; o += 32768)
                    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p + o), "r"(32768u) : "memory");
            }
        }
        int lo_, hi_;
        block_rows(s, &lo_, &hi_);
        if (BASE == 1 && s.kind != 3) {
            // This stage's rows, from the first, as many as fit, while the stage before
            // finishes elsewhere.
            const size_t rb = (size_t)s.cols * 2;
            const int unit = s.kind == 2 ? 2 : 1;
            in_smem = (int)((XS ? SMEM_X : SMEM) / rb) / unit * unit;
            if (in_smem > hi_ - lo_) in_smem = hi_ - lo_;
            const size_t bytes = (size_t)in_smem * rb;
            const unsigned char* src = s.w + (size_t)lo_ * rb;
            for (size_t b = threadIdx.x * 16; b < bytes; b += THREADS * 16) cp16(sm + b, src + b);
            asm volatile("cp.async.commit_group;" ::: "memory");
        }
        const int unit = s.kind == 2 ? 2 : 1;
        if (BASE >= 2 && s.kind != 3 && !ahead && !ringed) {
            const size_t rb = (size_t)s.cols * 2;
            // (P loads each warp's first rows itself.)
            const int from = lo_ + (BASE == 3 ? WARPS * unit : 0);
            for (int r = from + (threadIdx.x >> 5); r < hi_ && r < lo_ + 4 * WARPS; r += WARPS)
                asm volatile("prefetch.global.L2 [%0];" ::"l"(s.w + (size_t)r * rb + 128 * (threadIdx.x & 15)));
        }
        // P: the warp's segments, the first one's loads issued now.
        const int first = lo_ + (threadIdx.x >> 5) * unit;
        int nseg = 0;
        uint4 va[SEG_LOADS], vb[SEG_LOADS];
        if (BASE == 3 && s.kind != 3 && !ahead) {
            const int units = first < hi_ ? (hi_ - first + WARPS * unit - 1) / (WARPS * unit) : 0;
            nseg = units * unit * (s.cols / SEG_COLS);
            if (nseg > 0) seg_load(s, first, unit, 0, va);
        }
        if (WAIT && i > 0) {
            if (threadIdx.x == 0)
                while (ld_acquire(done + i - 1) < gridDim.x) {
                }
            __syncthreads();
        }
        if (BASE == 1) asm volatile("cp.async.wait_all;" ::: "memory");
        if (ahead) s_bar_wait(&bars[pos / 2], layer & 1);
        if (ringed) s_bar_wait(&ring.bars[chunk % RING_SLOTS], (chunk / RING_SLOTS) & 1);
        __syncthreads();
        if (a.stamps && blockIdx.x == 0 && threadIdx.x == 0) a.stamps[i] = globaltimer();
        if (XS && s.kind != 3) stage_x(s, xs);
        if (BASE == 3 && s.kind != 3 && !ahead) {
            float acc0 = 0.f, acc1 = 0.f;
            for (int j = 0; j < nseg; j += 2) {
                if (j + 1 < nseg) seg_load(s, first, unit, j + 1, vb);
                seg_sum(s, first, unit, j, va, xs, acc0, acc1);
                if (j + 1 >= nseg) break;
                if (j + 2 < nseg) seg_load(s, first, unit, j + 2, va);
                seg_sum(s, first, unit, j + 1, vb, xs, acc0, acc1);
            }
        } else {
            const unsigned char* rows_sm = ahead ? bufs[pos / 2] : ringed ? sm + ring.off[chunk % RING_SLOTS] : sm;
            const int rows_in_sm = ahead || ringed ? hi_ - lo_ : BASE == 1 && s.kind != 3 ? in_smem : 0;
            run_rows<XS, ENGINE>(s, a, ash, lo_, hi_, rows_sm, rows_in_sm, XS ? xs : s.x);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            __threadfence();
            atomicAdd(done + i, 1u);
            if (ringed) {
                // The chunk's bytes are free: the ring takes the next ones.
                fill.rpos = ring.end[chunk % RING_SLOTS];
                ++fill.freed;
                ring_fill(stages, n, sm, ring, fill);
            }
        }
        chunk += ringed;
    }
    if (a.stamps && blockIdx.x == 0 && threadIdx.x == 0) {
        while (ld_acquire(done + n - 1) < gridDim.x) {
        }
        a.stamps[n] = globaltimer();
    }
}

#ifdef __CUDACC_RTC__
// NVRTC (the workspace's kernel compile test) builds the device code alone: every design's
// kernels, instantiated here since no host code launches them there.
template __global__ void stage_kernel<false>(Stage);
template __global__ void stage_kernel<true>(Stage);
template __global__ void persistent<0, false>(const Stage*, int, Attn, unsigned*);
template __global__ void persistent<1, false>(const Stage*, int, Attn, unsigned*);
template __global__ void persistent<2, false>(const Stage*, int, Attn, unsigned*);
template __global__ void persistent<0, true>(const Stage*, int, Attn, unsigned*);
template __global__ void persistent<1, true>(const Stage*, int, Attn, unsigned*);
template __global__ void persistent<2, true>(const Stage*, int, Attn, unsigned*);
template __global__ void persistent<3, true>(const Stage*, int, Attn, unsigned*);
template __global__ void persistent<2, true, false>(const Stage*, int, Attn, unsigned*);
template __global__ void persistent<3, true, false>(const Stage*, int, Attn, unsigned*);
// (LE and R alone of SX, SPX, LE, R and RN: NVRTC 13.0 crashes on a program holding more of
// them, though each compiles without the others, and nvcc builds them all.)
template __global__ void persistent<6, true>(const Stage*, int, Attn, unsigned*);
template __global__ void persistent<7, true>(const Stage*, int, Attn, unsigned*);
#else
int main()
{
    int sms;
    CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    const size_t per_layer = ((size_t)QKV * EMBD + (size_t)EMBD * EMBD + 2ull * FF * EMBD + (size_t)EMBD * FF) * 2;
    const size_t total = LAYERS * per_layer + (size_t)VOCAB * EMBD * 2;
    unsigned char* w;
    CK(cudaMalloc(&w, total));
    {
        std::vector<unsigned short> h(total / 2);
        unsigned s = 1;
        for (auto& v : h) {
            s = s * 1664525u + 1013904223u;
            v = 0x3c00 | ((s >> 16) & 0x83ff);  // about +-1, small exponents
        }
        // Scale rows down so that the residual stream stays bounded through the layers.
        for (auto& v : h) v = (unsigned short)((v & 0x8000) | ((v & 0x7fff) - 0x0300));
        CK(cudaMemcpy(w, h.data(), total, cudaMemcpyHostToDevice));
    }
    float *x, *x0, *qkv, *att, *hb, *logits, *ref;
    CK(cudaMalloc(&x, EMBD * 4));
    CK(cudaMalloc(&x0, EMBD * 4));
    CK(cudaMalloc(&qkv, QKV * 4));
    CK(cudaMalloc(&att, EMBD * 4));
    CK(cudaMalloc(&hb, FF * 4));
    CK(cudaMalloc(&logits, (size_t)VOCAB * 4));
    CK(cudaMalloc(&ref, (size_t)VOCAB * 4));
    unsigned seed = 3;
    random_activations(x0, EMBD, seed);
    unsigned* done;
    CK(cudaMalloc(&done, 1024 * 4));
    // Attention: each layer's cache with POS random positions, the rotary frequencies
    // (theta 500,000, as Llama 3's), the splits' scratch and merge tickets.
    float *kv, *inv_freq;
    const size_t cache = (size_t)CTX * KV_DIM;
    CK(cudaMalloc(&kv, 2 * LAYERS * cache * 4));
    random_activations(kv, 2 * LAYERS * cache, seed);
    {
        std::vector<float> f(D / 2);
        for (int i = 0; i < D / 2; ++i) f[i] = (float)pow(500000.0, -2.0 * i / D);
        CK(cudaMalloc(&inv_freq, D / 2 * 4));
        CK(cudaMemcpy(inv_freq, f.data(), D / 2 * 4, cudaMemcpyHostToDevice));
    }
    Attn attn;
    attn.stamps = nullptr;
    attn.inv_freq = inv_freq;
    CK(cudaMalloc(&attn.part_o, (size_t)HEADS * SPLITS * D * 4));
    CK(cudaMalloc(&attn.part_ml, (size_t)HEADS * SPLITS * 2 * 4));
    CK(cudaMalloc(&attn.tickets, HEADS * 4));
    CK(cudaMemset(attn.tickets, 0, HEADS * 4));

    // The step's stages.
    std::vector<Stage> st;
    size_t off = 0;
    for (int l = 0; l < LAYERS; ++l) {
        st.push_back({w + off, x, qkv, QKV, EMBD, 0});
        off += (size_t)QKV * EMBD * 2;
        st.push_back({nullptr, qkv, att, EMBD, 0, 3, kv + 2 * l * cache, kv + (2 * l + 1) * cache});
        st.push_back({w + off, att, x, EMBD, EMBD, 1});
        off += (size_t)EMBD * EMBD * 2;
        st.push_back({w + off, x, hb, 2 * FF, EMBD, 2});
        off += 2ull * FF * EMBD * 2;
        st.push_back({w + off, hb, x, EMBD, FF, 1});
        off += (size_t)EMBD * FF * 2;
    }
    st.push_back({w + off, x, logits, VOCAB, EMBD, 0});
    const int n = (int)st.size();
    Stage* dst;
    CK(cudaMalloc(&dst, n * sizeof(Stage)));
    CK(cudaMemcpy(dst, st.data(), n * sizeof(Stage), cudaMemcpyHostToDevice));

    cudaStream_t s;
    CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    unsigned char* scratch;
    CK(cudaMalloc(&scratch, 1ull << 30));
    const double copy_gbs = copy_bandwidth(s, scratch, scratch + (512ull << 20), 512ull << 20);
    CK(cudaFree(scratch));
    printf("copy: %.0f GB/s; a step's weights %.1f MB, roofline %.1f us\n", copy_gbs, total / 1e6, total / copy_gbs / 1e3);

    // G as a graph: the input reset, then every stage (x through L2, or with XS copied into
    // each block's shared memory first).
    auto graph_of = [&](bool xs) {
        cudaGraph_t g;
        cudaGraphExec_t ge;
        CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
        CK(cudaMemcpyAsync(x, x0, EMBD * 4, cudaMemcpyDeviceToDevice, s));
        for (const Stage& t : st) {
            if (t.kind == 3) {
                launch_pdl(attention_kernel, dim3(SPLITS, HEADS), dim3(ATTN_THREADS), 0, s, t, attn);
                continue;
            }
            const dim3 grid((t.rows / (t.kind == 2 ? 2 : 1) + 7) / 8);
            if (xs)
                launch_pdl(stage_kernel<true>, grid, dim3(256), 0, s, t);
            else
                launch_pdl(stage_kernel<false>, grid, dim3(256), 0, s, t);
        }
        CK(cudaStreamEndCapture(s, &g));
        CK(cudaGraphInstantiate(&ge, g, 0));
        return ge;
    };
    const cudaGraphExec_t graphs[2] = {graph_of(false), graph_of(true)};

    // Design d: G, B, C, L with x through L2 (d < 4), the same with x in shared memory (4 <= d
    // < 8), then PX, NX and NPX.
    using Kernel = void (*)(const Stage*, int, Attn, unsigned*);
    const Kernel kernels[2][3] = {{persistent<0, false>, persistent<1, false>, persistent<2, false>},
                                  {persistent<0, true>, persistent<1, true>, persistent<2, true>}};
    const Kernel more[8] = {persistent<3, true>, persistent<2, true, false>, persistent<3, true, false>,
                            persistent<4, true>,  persistent<5, true>,        persistent<6, true>,
                            persistent<7, true>,  persistent<7, true, false>};
    const size_t smem_s = s_rows_bytes(QKV, sms) + s_rows_bytes(EMBD, sms);
    for (int k = 3; k < 5; ++k)
        CK(cudaFuncSetAttribute(more[k], cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem_s));
    // R runs where a block's rows of every layer stage fit its ring; P's segments need rows of
    // whole segments (not the small shape's).
    size_t chunk_max = 0;
    for (int k = 0; k < 5; ++k) {
        const Stage& t = st[k];
        const int unit = t.kind == 2 ? 2 : 1;
        if (t.kind != 3) chunk_max = std::max(chunk_max, (size_t)((t.rows / unit + sms - 1) / sms * unit) * t.cols * 2);
    }
    const bool ring_fits = chunk_max <= RING, segments = EMBD % SEG_COLS == 0 && FF % SEG_COLS == 0;
    if (ring_fits)
        for (int k = 6; k < 8; ++k)
            CK(cudaFuncSetAttribute(more[k], cudaFuncAttributeMaxDynamicSharedMemorySize, (int)RING));
    const auto skipped = [&](int d) { return ((d == 8 || d == 10 || d == 12) && !segments) || (d >= 14 && !ring_fits); };
    printf("a block's largest rows of a stage: %.1f KiB (ring %u KiB: R %s)\n", chunk_max / 1024.0, RING / 1024,
           ring_fits ? "runs" : "skipped");
    for (int xs = 0; xs < 2; ++xs)
        for (int mode = 0; mode < 3; ++mode)
            CK(cudaFuncSetAttribute(kernels[xs][mode], cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    mode == 1 ? (xs ? SMEM_X : SMEM) : 0));
    unsigned long long* stamps;
    CK(cudaMalloc(&stamps, (n + 1) * 8));
    auto run = [&](int design, bool stamped = false) {
        const int xs = design < 8 ? design / 4 : 1, mode = design < 8 ? design % 4 - 1 : 0;
        if (mode < 0) {
            CK(cudaGraphLaunch(graphs[xs], s));
            return;
        }
        CK(cudaMemcpyAsync(x, x0, EMBD * 4, cudaMemcpyDeviceToDevice, s));
        CK(cudaMemsetAsync(done, 0, n * 4, s));
        // Cooperative, so that every block is resident (they wait for each other) or the
        // launch fails.
        const Stage* stages = dst;
        Attn at = attn;
        if (stamped) at.stamps = stamps;
        void* args[] = {(void*)&stages, (void*)&n, (void*)&at, (void*)&done};
        const Kernel k = design < 8 ? kernels[xs][mode] : more[design - 8];
        const size_t smem = design < 8 && mode == 1            ? (xs ? SMEM_X : SMEM)
                            : design == 11 || design == 12 ? smem_s
                            : design >= 14                 ? RING
                                                           : 0;
        CK(cudaLaunchCooperativeKernel((void*)k, dim3(sms), dim3(THREADS), args, smem, s));
    };
    const char* names[] = {"G graph of kernels (today's)",     "B persistent, a barrier a stage",
                           "C B, next weights into shared mem", "L B, next rows asked of L2",
                           "GX G, x in shared memory",          "BX B, x in shared memory",
                           "CX C, x in shared memory",          "LX L, x in shared memory",
                           "PX LX, segments loaded ahead",      "NX LX without waits (timing)",
                           "NPX PX without waits (timing)",      "SX LX, Q/K/V and O rows ahead in smem",
                           "SPX PX, Q/K/V and O rows ahead in smem", "LE LX, the engine's rows (other bits)",
                           "R LX, every layer's rows ahead in smem", "RN R without waits (timing)"};
    const int designs = sizeof(names) / sizeof(names[0]);
    std::vector<float> want(VOCAB), got(VOCAB);
    printf("%-40s %10s %10s  %s\n", "design", "us a step", "GB/s", "logits against G");
    for (int round = 0; round < 2; ++round)
        for (int d = 0; d < designs; ++d) {
            if (skipped(d)) continue;
            run(d);
            CK(cudaStreamSynchronize(s));
            CK(cudaMemcpy(d == 0 ? want.data() : got.data(), logits, (size_t)VOCAB * 4, cudaMemcpyDeviceToHost));
            bool same = d == 0 || memcmp(want.data(), got.data(), (size_t)VOCAB * 4) == 0;
            bool finite = true;
            for (float v : (d == 0 ? want : got)) finite = finite && std::isfinite(v);
            for (int i = 0; i < 3; ++i) run(d);
            const int iters = 20;
            CK(cudaEventRecord(e0, s));
            for (int i = 0; i < iters; ++i) run(d);
            CK(cudaEventRecord(e1, s));
            CK(cudaEventSynchronize(e1));
            float ms;
            CK(cudaEventElapsedTime(&ms, e0, e1));
            const double us = ms * 1000 / iters;
            printf("%-40s %10.1f %10.0f  %s%s\n", names[d], us, total / us / 1e3, same ? "bit-equal" : "DIFFERS",
                   finite ? "" : " (not finite)");
        }

    // Where a persistent step's time goes: block 0's stamps, a stage from its start (after
    // its wait) to the next stage's, us a layer (the mean of the layers; GB/s of the stage's weights).
    const char* stage_names[5] = {"Q/K/V", "attention", "O", "gate/up", "down"};
    printf("\n%-40s", "stages, us a layer (GB/s)");
    for (const char* name : stage_names) printf(" %16s", name);
    printf(" %16s\n", "head");
    // The rate a stage's weights are read at: its rows times its columns (attention's: none).
    const auto gbs = [](const Stage& stage, double us) { return (double)stage.rows * stage.cols * 2 / us / 1e3; };
    std::vector<unsigned long long> t(n + 1);
    for (int d = 1; d < designs; ++d) {
        if ((d < 8 && d % 4 == 0) || skipped(d)) continue;  // the graphs (G, GX) stamp nothing
        run(d, true);
        CK(cudaStreamSynchronize(s));
        CK(cudaMemcpy(t.data(), stamps, (n + 1) * 8, cudaMemcpyDeviceToHost));
        printf("%-40s", names[d]);
        for (int k = 0; k < 5; ++k) {
            double ns = 0;
            for (int l = 0; l < LAYERS; ++l) ns += (double)(t[5 * l + k + 1] - t[5 * l + k]);
            const double us = ns / LAYERS / 1e3;
            if (st[k].cols > 0)
                printf(" %8.1f (%5.0f)", us, gbs(st[k], us));
            else
                printf(" %16.1f", us);
        }
        const double head = (double)(t[n] - t[n - 1]) / 1e3;
        printf(" %8.1f (%5.0f)\n", head, gbs(st[n - 1], head));
    }
    return 0;
}
#endif
