// Probe: why is a Q8_0 decode step no faster than a BF16 one when it reads half the bytes?
// Runs the engine's own matrix-vector kernel (kernels/matvec.cuh, included as NVRTC compiles
// it) for the Llama-3.2-1B shape's matrices at one token, BF16 against Q8_0, alone and
// chained as a decode step chains them, and against Q8_0 stored another way. Not part of
// Tern: a measurement for choosing how Q8_0 matrices live on the GPU.
//
//   nvcc -O3 -arch=sm_90a -std=c++17 -I crates/model/src/llama/cuda/kernels \
//     -o /tmp/q8 scripts/probes/matvec-q8.cu && /tmp/q8
//
// Ways:
//   bf16   the engine's kernel over BF16 rows (8-byte loads: 8 bytes for 4 weights a load).
//   q8_0   the engine's former row code over GGML's Q8_0 rows (Q8_0G): 34-byte blocks
//          {f16 d; i8 qs[32]}, 2-byte aligned, so a lane's 8 weights and 2 scales of a
//          256-column step take six 2-byte loads.
//   q8_0s  Q8_0 with each 256-column step's 8 blocks stored split (the 256 quants, then the 8
//          scales): the same 272 bytes a step and the same arithmetic in the same order (the
//          engine's bits, checked), but 4-byte aligned quants, so a lane's step is two 4-byte
//          and two 2-byte loads.
//   q8_0l  the engine's kernel over Q8_0 as the engine now uploads it (each step's blocks dealt
//          by lane: matvec.cuh's table): one 8-byte and one 4-byte load a lane-step, the same
//          bits (checked).
//   q8_0i  q8_0s's rows with the activations quantized too (int8 per 32 columns with an f32
//          scale, once per input, as the CPU's `fast` products do): a lane's 4 quants of a
//          block times the activations' 4 in one dp4a, then one fma with the two scales,
//          instead of 4 widenings and 4 fmas. Other numerics (printed: the error against
//          q8_0s), a warp a row; what it answers is whether the per-weight work was the bound.
#ifndef __CUDACC_RTC__
#include <cuda_runtime.h>

#include <cmath>
#include <cstring>
#include <vector>
#endif

#include "matvec.cuh"
#include "probe.cuh"

// GGML's Q8_0 rows as the engine read them before it dealt them by lane at upload: a lane's
// step is six 2-byte loads.
struct Q8_0G {
    static constexpr unsigned BLOCK = 32, STEP = 8 * 34;
    static constexpr bool FLOAT = false, SCALED = true;
    struct Lane {
        const unsigned char *d, *q;  // quad A's; quad B's are 4 blocks on
        unsigned magic;
    };
    struct Raw {
        unsigned da, a0, a1, db, b0, b1;
    };
    static __device__ __forceinline__ Lane lane(const unsigned char* row, unsigned l, unsigned magic)
    {
        const unsigned b = l >> 3, p = l & 7;
        return {row + 34 * b, row + 34 * b + 2 + 4 * p, magic};
    }
    static __device__ __forceinline__ Raw load(const Lane& l, unsigned long long o, bool b_ok)
    {
        const unsigned char *d = l.d + o, *q = l.q + o;
        Raw r = {ld_u16(d), ld_u16(q), ld_u16(q + 2), 0, 0, 0};
        if (b_ok) {
            r.db = ld_u16(d + 136), r.b0 = ld_u16(q + 136), r.b1 = ld_u16(q + 138);
        }
        return r;
    }
    // The engine's widening, over the same bytes gathered as its dealt rows hold them.
    static __device__ __forceinline__ void widen(const Raw& r, const Lane& l, float (&u)[8],
                                                 float (&s)[2])
    {
        Q8_0::widen({__byte_perm(r.a0, r.a1, 0x5410), __byte_perm(r.b0, r.b1, 0x5410), r.da | r.db << 16},
                    {nullptr, nullptr, l.magic}, u, s);
    }
};

// Q8_0 with a step's blocks split: quants at 0..256 of the step, scales at 256..272.
struct Q8_0S {
    static constexpr unsigned BLOCK = 32, STEP = 8 * 34;
    static constexpr bool FLOAT = false, SCALED = true;
    struct Lane {
        const unsigned char *q, *d;  // quad A's quants and scale; quad B's are 128 and 8 bytes on
        unsigned magic;
    };
    struct Raw {
        unsigned a, b, da, db;
    };
    static __device__ __forceinline__ Lane lane(const unsigned char* row, unsigned l, unsigned magic)
    {
        return {row + 4 * l, row + 256 + 2 * (l >> 3), magic};
    }
    static __device__ __forceinline__ Raw load(const Lane& l, unsigned long long o, bool b_ok)
    {
        Raw r = {ld_u32(l.q + o), 0, ld_u16(l.d + o), 0};
        if (b_ok) {
            r.b = ld_u32(l.q + o + 128), r.db = ld_u16(l.d + o + 8);
        }
        return r;
    }
    static __device__ __forceinline__ void widen(const Raw& r, const Lane& l, float (&u)[8], float (&s)[2])
    {
        Q8_0::widen({r.a, r.b, r.da | r.db << 16}, {nullptr, nullptr, l.magic}, u, s);
    }
};

// The engine's entry point (matvec.cu's), one per way.
#define KERNEL(NAME, T)                                                                                        \
    __global__ void __launch_bounds__(256, 3)                                                                  \
        NAME(const unsigned char* __restrict__ w, const float* __restrict__ x, float* y, unsigned rows,        \
             unsigned cols, unsigned row_bytes, unsigned parts)                                                \
    {                                                                                                          \
        matvec<T>(w, x, y, rows, cols, row_bytes, 1, cols, rows, nullptr, parts, nullptr, 0.f, nullptr,       \
                  nullptr, 0);                                                                                 \
    }
KERNEL(mv_bf16, Half16<true>)
KERNEL(mv_q8_0, Q8_0G)
KERNEL(mv_q8_0l, Q8_0)
KERNEL(mv_q8_0s, Q8_0S)

// x (n floats) as int8 per 32 values, each block's scale its largest magnitude / 127.
__global__ void quantize_x(const float* x, signed char* xq, float* xd, unsigned n)
{
    pdl_wait();
    pdl_launch_dependents();
    const unsigned lane = threadIdx.x & 31, block = (blockIdx.x * blockDim.x + threadIdx.x) / 32;
    if (block * 32 >= n) return;
    const float v = x[block * 32 + lane];
    float m = fabsf(v);
    for (int o = 16; o; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    const float d = m / 127.0f;
    xq[block * 32 + lane] = (signed char)__float2int_rn(d > 0.0f ? v / d : 0.0f);
    if (lane == 0) xd[block] = d;
}

// q8_0i: a warp a row of Q8_0S steps, 4 steps' loads in flight; lane l takes quants 4l ..
// 4l + 3 (block l / 8) and 128 + 4l .. (block 4 + l / 8) of each 256-column step.
__global__ void __launch_bounds__(256, 3)
    mv_q8_0i(const unsigned char* __restrict__ w, const signed char* __restrict__ xq, const float* __restrict__ xd,
             float* y, unsigned rows, unsigned cols)
{
    const unsigned lane = threadIdx.x & 31, r = blockIdx.x * 8 + (threadIdx.x >> 5);
    const unsigned steps = cols / 256;
    const unsigned char* row = w + (size_t)(r < rows ? r : 0) * steps * 272;
    if (r < rows) asm volatile("prefetch.global.L2 [%0];" ::"l"(row + 128 * (lane & 15)));
    pdl_wait();
    pdl_launch_dependents();
    if (r >= rows) return;
    float acc = 0.0f;
    for (unsigned k = 0; k < steps; k += 4) {
        unsigned qa[4], qb[4], da[4], db[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const unsigned char* st = row + (size_t)(k + i) * 272;
            qa[i] = ld_u32(st + 4 * lane);
            qb[i] = ld_u32(st + 128 + 4 * lane);
            da[i] = ld_u16(st + 256 + 2 * (lane >> 3));
            db[i] = ld_u16(st + 264 + 2 * (lane >> 3));
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const unsigned c = (k + i) * 256;
            const int xa = *(const int*)(xq + c + 4 * lane), xb = *(const int*)(xq + c + 128 + 4 * lane);
            const float sa = xd[c / 32 + (lane >> 3)], sb = xd[c / 32 + 4 + (lane >> 3)];
            acc = fmaf(f16_to_f32(da[i]) * sa, (float)__dp4a((int)qa[i], xa, 0), acc);
            acc = fmaf(f16_to_f32(db[i]) * sb, (float)__dp4a((int)qb[i], xb, 0), acc);
        }
    }
    for (int o = 16; o; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) y[r] = acc;
}

#ifndef __CUDACC_RTC__  // host code: not for NVRTC, which builds the device code alone
static signed char* xq;
static float* xd;

// q8_0i's product: the input quantized, then the rows.
static void launch_i(cudaStream_t st, const unsigned char* w, const float* x, float* y, unsigned rows, unsigned cols)
{
    launch_pdl(quantize_x, dim3((cols / 32 + 7) / 8), dim3(256), 0, st, x, xq, xd, cols);
    launch_pdl(mv_q8_0i, dim3((rows + 7) / 8), dim3(256), 0, st, w, (const signed char*)xq, (const float*)xd, y, rows, cols);
}

#endif

// GGML Q8_0 rows dealt by lane as the engine uploads them (weights.rs's q8_0_lanes; cols a
// multiple of 256).
__global__ void deal_lanes(const unsigned char* src, unsigned char* dst, size_t steps)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < steps * 8; i += (size_t)gridDim.x * blockDim.x) {
        const size_t step = i / 8, j = i % 8, b = j % 4, half = j / 4;
        const unsigned char* blk = src + step * 272 + j * 34;
        unsigned char* o = dst + step * 272;
        for (int p = 0; p < 8; ++p)
            for (int k = 0; k < 4; ++k) o[8 * (8 * b + p) + 4 * half + k] = blk[2 + 4 * p + k];
        o[256 + 4 * b + 2 * half] = blk[0];
        o[256 + 4 * b + 2 * half + 1] = blk[1];
    }
}

// GGML Q8_0 rows into Q8_0S rows (cols a multiple of 256).
__global__ void split_steps(const unsigned char* src, unsigned char* dst, size_t steps)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < steps * 8; i += (size_t)gridDim.x * blockDim.x) {
        const size_t step = i / 8, blk = i % 8;
        const unsigned char* b = src + step * 272 + blk * 34;
        unsigned char* o = dst + step * 272;
        for (int j = 0; j < 32; ++j) o[blk * 32 + j] = b[2 + j];
        o[256 + 2 * blk] = b[0];
        o[256 + 2 * blk + 1] = b[1];
    }
}

#ifndef __CUDACC_RTC__  // host code: not for NVRTC, which builds the device code alone
typedef void (*Kernel)(const unsigned char*, const float*, float*, unsigned, unsigned, unsigned, unsigned);

// kernels.rs's matvec_parts: warps a row, fixed by the shape.
static unsigned parts_of(unsigned rows, unsigned cols)
{
    unsigned steps = (cols + 255) / 256, parts = 1;
    while (parts < 8 && rows * parts < 8192 && steps >= 8 * parts) parts *= 2;
    return parts;
}

static void launch(Kernel k, cudaStream_t st, const unsigned char* w, const float* x, float* y, unsigned rows,
                   unsigned cols, unsigned row_bytes)
{
    if (!k) {
        launch_i(st, w, x, y, rows, cols);
        return;
    }
    const unsigned parts = parts_of(rows, cols);
    launch_pdl(k, dim3((rows * parts + 7) / 8), dim3(256), 0, st, w, x, y, rows, cols, row_bytes, parts);
}

struct Way {
    const char* name;
    Kernel k;  // none: q8_0i (launch_i)
    bool q8;   // 34 bytes a 32 columns, else 2 bytes a column
};

int main()
{
    const size_t pool = 3ull << 30;
    unsigned char *w, *w2;
    float *x, *y;
    CK(cudaMalloc(&w, pool));
    CK(cudaMalloc(&w2, 600ull << 20));
    CK(cudaMalloc(&x, 8192 * 4));
    CK(cudaMalloc(&y, 128256 * 4 * 2));
    CK(cudaMalloc(&xq, 8192));
    CK(cudaMalloc(&xd, 8192 / 32 * 4));
    {
        unsigned s = 1;
        random_weights(w, pool, s);
        random_activations(x, 8192, s);
    }
    cudaStream_t st;
    CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    float ms;
    const double copy_gbs = copy_bandwidth(st, w + (1ull << 30), w, 1ull << 30);
    printf("copy: %.0f GB/s (read + write)\n", copy_gbs);
    struct Shape {
        const char* name;
        unsigned rows, cols;
    };
    const Shape shapes[] = {{"qkv 3072x2048", 3072, 2048},
                            {"o 2048x2048", 2048, 2048},
                            {"gate_up 16384x2048", 16384, 2048},
                            {"down 2048x8192", 2048, 8192},
                            {"head 128256x2048", 128256, 2048}};
    const Way ways[] = {{"bf16", mv_bf16, false}, {"q8_0", mv_q8_0, true}, {"q8_0s", mv_q8_0s, true},
                        {"q8_0l", mv_q8_0l, true}, {"q8_0i", nullptr, true}};
    auto row_bytes = [](const Way& wy, unsigned cols) { return wy.q8 ? cols / 32 * 34 : cols * 2; };
    // q8_0s gives q8_0's bits, over the same matrix split by steps.
    bool same = true;
    for (auto& sh : shapes) {
        const size_t bytes = (size_t)sh.rows * sh.cols / 32 * 34;
        split_steps<<<1024, 256, 0, st>>>(w, w2, bytes / 272);
        std::vector<float> a(sh.rows), b(sh.rows);
        launch(mv_q8_0, st, w, x, y, sh.rows, sh.cols, sh.cols / 32 * 34);
        CK(cudaStreamSynchronize(st));
        CK(cudaMemcpy(a.data(), y, sh.rows * 4, cudaMemcpyDeviceToHost));
        launch(mv_q8_0s, st, w2, x, y, sh.rows, sh.cols, sh.cols / 32 * 34);
        CK(cudaStreamSynchronize(st));
        CK(cudaMemcpy(b.data(), y, sh.rows * 4, cudaMemcpyDeviceToHost));
        const bool eq = memcmp(a.data(), b.data(), sh.rows * 4) == 0;
        std::vector<float> c(sh.rows);
        launch_i(st, w2, x, y, sh.rows, sh.cols);
        CK(cudaStreamSynchronize(st));
        CK(cudaMemcpy(c.data(), y, sh.rows * 4, cudaMemcpyDeviceToHost));
        double err = 0, nrm = 0;
        for (unsigned i = 0; i < sh.rows; ++i) {
            err += (double)(c[i] - b[i]) * (c[i] - b[i]);
            nrm += (double)b[i] * b[i];
        }
        deal_lanes<<<1024, 256, 0, st>>>(w, w2, bytes / 272);
        launch(mv_q8_0l, st, w2, x, y, sh.rows, sh.cols, sh.cols / 32 * 34);
        CK(cudaStreamSynchronize(st));
        CK(cudaMemcpy(b.data(), y, sh.rows * 4, cudaMemcpyDeviceToHost));
        const bool eq_l = memcmp(a.data(), b.data(), sh.rows * 4) == 0;
        printf("== %s: q8_0s %s q8_0's bits, q8_0l %s; q8_0i's error against q8_0s %.1e\n", sh.name,
               eq ? "gives" : "does NOT give", eq_l ? "gives them" : "does NOT", sqrt(err / nrm));
        same = same && eq && eq_l;
    }
    // Each product alone, back to back, the weights rotated through the pool.
    printf("== us a call, one token (GB/s of weights)\n");
    for (auto& sh : shapes) {
        printf("  %-20s", sh.name);
        for (auto& wy : ways) {
            const size_t bytes = (size_t)sh.rows * row_bytes(wy, sh.cols);
            const int copies = (int)(pool / bytes);
            for (int i = 0; i < 3; ++i) launch(wy.k, st, w + (i % copies) * bytes, x, y, sh.rows, sh.cols, row_bytes(wy, sh.cols));
            const int iters = 40;
            CK(cudaEventRecord(e0, st));
            for (int i = 0; i < iters; ++i)
                launch(wy.k, st, w + (size_t)(i % copies) * bytes, x, y, sh.rows, sh.cols, row_bytes(wy, sh.cols));
            CK(cudaEventRecord(e1, st));
            CK(cudaEventSynchronize(e1));
            CK(cudaEventElapsedTime(&ms, e0, e1));
            printf("  %s %7.1f (%4.0f)", wy.name, ms * 1000 / iters, bytes * iters / ms / 1e6);
        }
        printf("\n");
    }
    // A step's products chained (16 layers and the head), one CUDA graph.
    printf("== a step's products, one token: us a step (GB/s of weights; roofline at the copy bandwidth)\n");
    for (auto& wy : ways) {
        size_t off = 0;
        cudaGraph_t g;
        cudaGraphExec_t ge;
        CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal));
        for (int l = 0; l < 16; ++l)
            for (int i = 0; i < 4; ++i) {
                const Shape& sh = shapes[i];
                launch(wy.k, st, w + off, x, y, sh.rows, sh.cols, row_bytes(wy, sh.cols));
                off += (size_t)sh.rows * row_bytes(wy, sh.cols);
            }
        launch(wy.k, st, w + off, x, y, shapes[4].rows, shapes[4].cols, row_bytes(wy, shapes[4].cols));
        off += (size_t)shapes[4].rows * row_bytes(wy, shapes[4].cols);
        CK(cudaStreamEndCapture(st, &g));
        CK(cudaGraphInstantiate(&ge, g, 0));
        for (int i = 0; i < 3; ++i) CK(cudaGraphLaunch(ge, st));
        const int iters = 20;
        CK(cudaEventRecord(e0, st));
        for (int i = 0; i < iters; ++i) CK(cudaGraphLaunch(ge, st));
        CK(cudaEventRecord(e1, st));
        CK(cudaEventSynchronize(e1));
        CK(cudaEventElapsedTime(&ms, e0, e1));
        const double us = ms * 1000 / iters;
        printf("  %-6s %8.1f us (%4.0f GB/s; roofline %.1f us)\n", wy.name, us, off / us / 1e3, off / copy_gbs / 1e3);
        cudaGraphExecDestroy(ge);
        cudaGraphDestroy(g);
    }
    printf("q8_0s and q8_0l give q8_0's bits: %s\n", same ? "yes" : "NO");
    return 0;
}
#endif
