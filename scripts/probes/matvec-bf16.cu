// Probe: how fast can a one-token BF16 matrix-vector product read its weights on this GPU,
// for the Llama-3.2-1B shape's layer matrices, alone and chained as a decode step chains them?
// Several designs side by side, each checked against the first. Not part of Tern: a
// measurement for choosing the design of matvec.cuh's 16-bit rows.
//
//   nvcc -O3 -arch=sm_90a -std=c++17 -o /tmp/probe scripts/probes/matvec-bf16.cu && /tmp/probe
//
// Designs:
//   A  matvec.cu's today: a warp per row, 8-byte loads at columns 4l and 128 + 4l of each
//      256-column step, 4 steps in flight, 256 threads, 3 blocks an SM, 2 KiB of the row
//      asked of L2 before the programmatic-launch wait.
//   B  a warp per row, 16-byte loads (8 adjacent columns a lane), N steps in flight.
//   C  persistent warps (grid-stride over rows), 16-byte loads in chunks of U steps, the next
//      chunk's loads issued before the current one is used.
//   E  the bulk copy engine: each block streams one contiguous run of the matrix into a ring
//      of S shared-memory stages of SB bytes (cp.async.bulk completing on an mbarrier, issued
//      by a producer warp before the programmatic-launch wait, since weights depend on
//      nothing), 8 consumer warps each summing SB / 8 bytes of a stage.
#include <cuda_runtime.h>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "probe.cuh"

__device__ __forceinline__ uint4 ld16(const void* p)
{
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
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
__device__ __forceinline__ float dot8(uint4 w, const float* x, float acc)
{
    return dot8(w, *(const float4*)x, *(const float4*)(x + 4), acc);
}

// ---- A ----
template <int BATCH>
__global__ void __launch_bounds__(256, 3) gemv_a(const unsigned char* w, const float* x, float* y, int rows, int cols)
{
    const int lane = threadIdx.x & 31, r = blockIdx.x * 8 + (threadIdx.x >> 5);
    const unsigned char* row = w + (size_t)(r < rows ? r : 0) * cols * 2;
    if (r < rows) asm volatile("prefetch.global.L2 [%0];" ::"l"(row + 128 * (lane & 15)));
    pdl_wait();
    pdl_launch();
    if (r >= rows) return;
    float acc = 0.f;
    for (int k = 0; k < cols / 256; k += BATCH) {
        uint2 ra[BATCH], rb[BATCH];
#pragma unroll
        for (int i = 0; i < BATCH; ++i) {
            ra[i] = ld8(row + (k + i) * 512 + 8 * lane);
            rb[i] = ld8(row + (k + i) * 512 + 256 + 8 * lane);
        }
#pragma unroll
        for (int i = 0; i < BATCH; ++i) {
            const float4 a = *(const float4*)(x + (k + i) * 256 + 4 * lane);
            const float4 b = *(const float4*)(x + (k + i) * 256 + 128 + 4 * lane);
            acc = dot8(make_uint4(ra[i].x, ra[i].y, rb[i].x, rb[i].y), a, b, acc);
        }
    }
    acc = wsum(acc);
    if (lane == 0) y[r] = acc;
}

// ---- B ----
template <int BATCH, int MINB>
__global__ void __launch_bounds__(256, MINB) gemv_b(const unsigned char* w, const float* x, float* y, int rows, int cols)
{
    const int lane = threadIdx.x & 31, r = blockIdx.x * 8 + (threadIdx.x >> 5);
    const unsigned char* row = w + (size_t)(r < rows ? r : 0) * cols * 2;
    if (r < rows) asm volatile("prefetch.global.L2 [%0];" ::"l"(row + 128 * (lane & 15)));
    pdl_wait();
    pdl_launch();
    if (r >= rows) return;
    float acc = 0.f;
    for (int k = 0; k < cols / 256; k += BATCH) {
        uint4 v[BATCH];
#pragma unroll
        for (int i = 0; i < BATCH; ++i) v[i] = ld16(row + (k + i) * 512 + 16 * lane);
#pragma unroll
        for (int i = 0; i < BATCH; ++i) acc = dot8(v[i], x + (k + i) * 256 + 8 * lane, acc);
    }
    acc = wsum(acc);
    if (lane == 0) y[r] = acc;
}

// ---- C ----
template <int U, int MINB>
__global__ void __launch_bounds__(256, MINB) gemv_c(const unsigned char* w, const float* x, float* y, int rows, int cols)
{
    const int lane = threadIdx.x & 31;
    const int tw = gridDim.x * 8;
    const int chunks = cols / (256 * U);
    int r = blockIdx.x * 8 + (threadIdx.x >> 5), c = 0;
    uint4 cur[U], nxt[U];
    auto load = [&](uint4* v, int rr, int cc) {
        const unsigned char* p = w + (size_t)rr * cols * 2 + (size_t)cc * U * 512 + 16 * lane;
#pragma unroll
        for (int i = 0; i < U; ++i) v[i] = ld16(p + i * 512);
    };
    if (r < rows) load(cur, r, 0);
    pdl_wait();
    pdl_launch();
    if (r >= rows) return;
    float acc = 0.f;
    while (true) {
        int nr = r, nc = c + 1;
        if (nc == chunks) {
            nc = 0;
            nr = r + tw;
        }
        const bool more = nr < rows;
        if (more) load(nxt, nr, nc);
#pragma unroll
        for (int i = 0; i < U; ++i) acc = dot8(cur[i], x + (c * U + i) * 256 + 8 * lane, acc);
        if (nc == 0) {
            acc = wsum(acc);
            if (lane == 0) y[r] = acc;
            acc = 0.f;
        }
        if (!more) break;
        r = nr;
        c = nc;
#pragma unroll
        for (int i = 0; i < U; ++i) cur[i] = nxt[i];
    }
}

// ---- E ----
__device__ __forceinline__ unsigned smem(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void mbar_init(unsigned long long* b, unsigned count)
{
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem(b)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect(unsigned long long* b, unsigned bytes)
{
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem(b)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(unsigned long long* b)
{
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem(b)) : "memory");
}
__device__ __forceinline__ void mbar_wait(unsigned long long* b, unsigned parity)
{
    unsigned done;
    do {
        asm volatile(
            "{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
            : "=r"(done)
            : "r"(smem(b)), "r"(parity)
            : "memory");
    } while (!done);
}
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, unsigned bytes, unsigned long long* b)
{
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(smem(dst)),
                 "l"(src), "r"(bytes), "r"(smem(b))
                 : "memory");
}

// Block b takes stages [b * n / G, (b + 1) * n / G) of the matrix's n stages of SB bytes
// (SB a multiple of the row's bytes). Warps 0-7 consume, warp 8 lane 0 produces.
template <int S, int SB>
__global__ void __launch_bounds__(288, 1) gemv_e(const unsigned char* w, const float* x, float* y, int rows, int cols)
{
    extern __shared__ __align__(128) unsigned char ring[];  // S * SB
    __shared__ unsigned long long full[S], empty[S];
    __shared__ float red[2][8];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const unsigned row_bytes = cols * 2, rows_per_stage = SB / row_bytes;
    const unsigned n = (rows + rows_per_stage - 1) / rows_per_stage;
    const unsigned s0 = (unsigned long long)blockIdx.x * n / gridDim.x, s1 = (unsigned long long)(blockIdx.x + 1) * n / gridDim.x;
    if (threadIdx.x == 0) {
        for (int i = 0; i < S; ++i) {
            mbar_init(&full[i], 1);
            mbar_init(&empty[i], 8);
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
    if (warp == 8) {
        if (lane == 0) {
            for (unsigned s = s0; s < s1; ++s) {
                const unsigned i = s - s0, slot = i % S;
                if (i >= S) mbar_wait(&empty[slot], (i / S - 1) & 1);
                const unsigned long long off = (unsigned long long)s * SB, total = (unsigned long long)rows * row_bytes;
                const unsigned bytes = off + SB <= total ? SB : (unsigned)(total - off);
                mbar_expect(&full[slot], bytes);
                bulk_copy(ring + slot * SB, w + off, bytes, &full[slot]);
            }
        }
        pdl_wait();
        pdl_launch();
        return;
    }
    pdl_wait();
    pdl_launch();
    const unsigned slice = SB / 8, wpr = row_bytes / slice;  // bytes a warp sums; warps a row
    for (unsigned s = s0; s < s1; ++s) {
        const unsigned i = s - s0, slot = i % S, par = i & 1;
        mbar_wait(&full[slot], (i / S) & 1);
        const unsigned char* p = ring + slot * SB + warp * slice;
        const unsigned first_row = s * rows_per_stage;
        const unsigned r = first_row + warp / wpr, c0 = (warp % wpr) * (slice / 2);
        float acc = 0.f;
        if (r < (unsigned)rows) {
#pragma unroll 4
            for (unsigned k = 0; k < slice / 512; ++k) {
                const uint4 v = *(const uint4*)(p + k * 512 + 16 * lane);
                acc = dot8(v, x + c0 + k * 256 + 8 * lane, acc);
            }
        }
        acc = wsum(acc);
        __syncwarp();
        if (lane == 0) {
            mbar_arrive(&empty[slot]);
            red[par][warp] = acc;
        }
        asm volatile("bar.sync 1, 256;" ::: "memory");
        if (lane == 0 && warp % wpr == 0 && r < (unsigned)rows) {
            float t = 0.f;
            for (unsigned k = 0; k < wpr; ++k) t += red[par][warp + k];
            y[r] = t;
        }
    }
}

__global__ void read_all(const uint4* p, size_t n, unsigned* out)
{
    unsigned s = 0;
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    for (; i + 3 * stride < n; i += 4 * stride) {
        uint4 a = ld16(p + i), b = ld16(p + i + stride), c = ld16(p + i + 2 * stride), d = ld16(p + i + 3 * stride);
        s ^= a.x ^ b.y ^ c.z ^ d.w;
    }
    if (s == 0x12345678) out[0] = s;
}

typedef void (*Kernel)(const unsigned char*, const float*, float*, int, int);

struct Design {
    const char* name;
    Kernel k;
    int threads, smem;  // per block
    int grid_kind;      // 0: a block per 8 rows; 1: blocks_per_sm * SMs (at most a block per 8 rows)
    int blocks_per_sm;
    int min_row_bytes;  // E: its stage must hold whole rows
};

static int sms;

static void launch(const Design& d, cudaStream_t st, const unsigned char* w, const float* x, float* y, int rows, int cols)
{
    int grid = (rows + 7) / 8;
    if (d.grid_kind == 1 && sms * d.blocks_per_sm < grid) grid = sms * d.blocks_per_sm;
    launch_pdl(d.k, dim3(grid), dim3(d.threads), d.smem, st, w, x, y, rows, cols);
}

template <int S, int SB>
static Design design_e(const char* name, int bps)
{
    CK(cudaFuncSetAttribute(gemv_e<S, SB>, cudaFuncAttributeMaxDynamicSharedMemorySize, S * SB));
    return {name, gemv_e<S, SB>, 288, S * SB, 1, bps, SB};
}

int main()
{
    CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    const size_t pool = 3ull << 30;
    unsigned char* w;
    float *x, *y, *y0;
    unsigned* dummy;
    CK(cudaMalloc(&w, pool));
    CK(cudaMalloc(&x, 65536 * 4));
    CK(cudaMalloc(&y, 200000 * 4));
    CK(cudaMalloc(&y0, 200000 * 4));
    CK(cudaMalloc(&dummy, 4));
    {
        std::vector<unsigned short> h(pool / 2);
        unsigned s = 1;
        for (auto& v : h) {
            s = s * 1664525u + 1013904223u;
            v = 0x3c00 | ((s >> 16) & 0x83ff);
        }
        CK(cudaMemcpy(w, h.data(), pool, cudaMemcpyHostToDevice));
        random_activations(x, 65536, s);
    }
    cudaStream_t st;
    CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    cudaEvent_t e0, e1;
    cudaEventCreate(&e0);
    cudaEventCreate(&e1);
    float ms;
    {
        const size_t half = 1ull << 30;
        printf("copy: %.0f GB/s (read + write)\n", copy_bandwidth(st, w + half, w, half));
        for (int i = 0; i < 3; ++i) read_all<<<sms * 8, 256, 0, st>>>((const uint4*)w, pool / 16, dummy);
        cudaEventRecord(e0, st);
        for (int i = 0; i < 10; ++i) read_all<<<sms * 8, 256, 0, st>>>((const uint4*)w, pool / 16, dummy);
        cudaEventRecord(e1, st);
        CK(cudaEventSynchronize(e1));
        cudaEventElapsedTime(&ms, e0, e1);
        printf("read: %.0f GB/s\n", 1.0 * pool * 10 / ms / 1e6);
    }
    std::vector<Design> designs = {
        {"A today (8B loads, 4 steps)", gemv_a<4>, 256, 0, 0, 0, 0},
        {"B 16B, 4 steps, 3/SM", gemv_b<4, 3>, 256, 0, 0, 0, 0},
        {"B 16B, 8 steps, 3/SM", gemv_b<8, 3>, 256, 0, 0, 0, 0},
        {"B 16B, 8 steps, 4/SM", gemv_b<8, 4>, 256, 0, 0, 0, 0},
        {"C persistent U=2, 4/SM", gemv_c<2, 4>, 256, 0, 1, 4, 0},
        {"C persistent U=4, 3/SM", gemv_c<4, 3>, 256, 0, 1, 3, 0},
        {"C persistent U=4, 2/SM", gemv_c<4, 2>, 256, 0, 1, 2, 0},
        design_e<4, 32768>("E bulk 4 x 32 KiB, 1/SM", 1),
        design_e<6, 16384>("E bulk 6 x 16 KiB, 1/SM", 1),
        design_e<4, 16384>("E bulk 4 x 16 KiB, 2/SM", 2),
        design_e<3, 16384>("E bulk 3 x 16 KiB, 3/SM", 3),
        design_e<8, 8192>("E bulk 8 x 8 KiB, 2/SM", 2),
        design_e<4, 8192>("E bulk 4 x 8 KiB, 4/SM", 4),
    };
    struct Shape {
        const char* name;
        int rows, cols;
    };
    const Shape shapes[] = {{"qkv 3072x2048", 3072, 2048},
                            {"o 2048x2048", 2048, 2048},
                            {"gate_up 16384x2048", 16384, 2048},
                            {"down 2048x8192", 2048, 8192},
                            {"head 128256x2048", 128256, 2048}};
    auto usable = [](const Design& d, const Shape& s) { return d.min_row_bytes == 0 || d.min_row_bytes >= s.cols * 2; };
    // Each design alone: back-to-back launches with the weights rotated through the pool.
    for (auto& sh : shapes) {
        const size_t bytes = (size_t)sh.rows * sh.cols * 2;
        const int copies = (int)(pool / bytes);
        printf("== %s (%.1f MB): us a call, GB/s, error against A\n", sh.name, bytes / 1e6);
        launch(designs[0], st, w, x, y0, sh.rows, sh.cols);
        std::vector<float> a(sh.rows), b(sh.rows);
        CK(cudaMemcpy(a.data(), y0, sh.rows * 4, cudaMemcpyDeviceToHost));
        for (auto& d : designs) {
            if (!usable(d, sh)) continue;
            for (int i = 0; i < 3; ++i) launch(d, st, w + (size_t)(i % copies) * bytes, x, y, sh.rows, sh.cols);
            const int iters = 60;
            cudaEventRecord(e0, st);
            for (int i = 0; i < iters; ++i) launch(d, st, w + (size_t)(i % copies) * bytes, x, y, sh.rows, sh.cols);
            cudaEventRecord(e1, st);
            CK(cudaEventSynchronize(e1));
            cudaEventElapsedTime(&ms, e0, e1);
            CK(cudaMemsetAsync(y, 0, sh.rows * 4, st));
            launch(d, st, w, x, y, sh.rows, sh.cols);
            CK(cudaStreamSynchronize(st));
            CK(cudaMemcpy(b.data(), y, sh.rows * 4, cudaMemcpyDeviceToHost));
            double err = 0, nrm = 0;
            for (int i = 0; i < sh.rows; ++i) {
                err += (a[i] - b[i]) * (a[i] - b[i]);
                nrm += a[i] * a[i];
            }
            printf("  %-30s %8.1f us %6.0f GB/s  err %.1e\n", d.name, ms * 1000 / iters, bytes * iters / ms / 1e6, sqrt(err / nrm));
        }
    }
    // A decode step's products chained: 16 layers of Q/K/V, attention output, gate/up, down
    // (each layer its own weights) and the output head, launched with programmatic dependent
    // launch and replayed as one CUDA graph. Mixed: the best designs per shape.
    const int layers = 16;
    const size_t per_layer = (3072ull + 2048 + 16384) * 2048 * 2 + 2048ull * 8192 * 2;
    const size_t head = 128256ull * 2048 * 2, step_bytes = layers * per_layer + head;
    printf("== a decode step's products: 16 layers + head, %.1f MB, one graph\n", step_bytes / 1e6);
    auto chain = [&](const char* name, auto pick) {
        cudaGraph_t g;
        cudaGraphExec_t ge;
        CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal));
        size_t off = 0;
        for (int l = 0; l < layers; ++l) {
            for (auto& sh : shapes) {
                if (sh.rows == 128256) continue;
                launch(*pick(sh), st, w + off, x, y, sh.rows, sh.cols);
                off += (size_t)sh.rows * sh.cols * 2;
            }
        }
        launch(*pick(shapes[4]), st, w + off, x, y, shapes[4].rows, shapes[4].cols);
        CK(cudaStreamEndCapture(st, &g));
        CK(cudaGraphInstantiate(&ge, g, 0));
        for (int i = 0; i < 3; ++i) CK(cudaGraphLaunch(ge, st));
        const int iters = 20;
        cudaEventRecord(e0, st);
        for (int i = 0; i < iters; ++i) CK(cudaGraphLaunch(ge, st));
        cudaEventRecord(e1, st);
        CK(cudaEventSynchronize(e1));
        cudaEventElapsedTime(&ms, e0, e1);
        const double us = ms * 1000 / iters;
        printf("  %-44s %8.1f us a step %6.0f GB/s\n", name, us, step_bytes / us / 1e3);
        cudaGraphExecDestroy(ge);
        cudaGraphDestroy(g);
    };
    for (auto& d : designs) {
        bool all = true;
        for (auto& sh : shapes) all = all && usable(d, sh);
        if (all) chain(d.name, [&](const Shape&) { return &d; });
    }
    chain("E 4x32K for down, E 6x16K else", [&](const Shape& s) { return s.cols == 8192 ? &designs[7] : &designs[8]; });
    chain("E 4x32K for down, E 4x16K 2/SM else", [&](const Shape& s) { return s.cols == 8192 ? &designs[7] : &designs[9]; });
    chain("C U=4 3/SM for gate/up and head, B 8 else", [&](const Shape& s) { return s.rows >= 16384 ? &designs[5] : &designs[2]; });
    return 0;
}
