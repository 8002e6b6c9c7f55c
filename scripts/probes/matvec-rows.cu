// Probe: what holds a one-token product of Q8_0 rows (dealt by lane, as the engine uploads
// them) at about two thirds of BF16's bandwidth? The engine's own row code (matvec.cuh's
// matvec_row) over the Llama-3.2-1B shape's gate/up and output-head matrices, a warp a row,
// varying only how the rows are walked: steps whose loads a lane has in flight (B, with the
// rest of a row's steps loaded at once where TAIL), rows a warp takes one after another (R:
// fewer, longer-lived blocks; or R rows together, each x value loaded once for them), and
// blocks an SM (the register cap that follows); and the engine's matvec_stream (the weights
// brought into shared memory by bulk copies) by its ring's stages, stage size and blocks an
// SM. Every variant sums each row in the same order, so the same bits (checked). Not part of
// Tern.
//
//   nvcc -O3 -gencode arch=compute_90a,code=sm_90a -std=c++17 \
//     -I crates/model/src/llama/cuda/kernels -o /tmp/mr scripts/probes/matvec-rows.cu && /tmp/mr
//   /tmp/mr profile   (each variant once on gate/up, for Nsight Compute: ncu -k regex:mv_)
#ifndef __CUDACC_RTC__
#include <cuda_runtime.h>

#include <cstring>
#include <vector>
#endif

#include "matvec.cuh"
#include "probe.cuh"

// Rows (blockIdx.x * 8 + warp) * R .. + R - 1, each by matvec_row at one token.
template <class T, int B, bool TAIL, int R, int OCC>
__global__ void __launch_bounds__(256, OCC)
    mv_rows(const unsigned char* __restrict__ w, const float* __restrict__ x, float* y, unsigned rows,
            unsigned cols, unsigned row_bytes)
{
    const unsigned lane = threadIdx.x & 31, first = (blockIdx.x * 8 + (threadIdx.x >> 5)) * R;
    if (first < rows) {
        prefetch_weights(w + (unsigned long long)first * row_bytes, row_bytes, lane);
    }
    pdl_wait();
    pdl_launch_dependents();
    const unsigned magic = magic_2p23();
    for (int i = 0; i < R; ++i) {
        const unsigned r = first + i;
        if (r >= rows) {
            break;
        }
        matvec_row<T, 1, true, true, B, TAIL>(w + (unsigned long long)r * row_bytes, x, y, r, cols, 1, cols,
                                                rows, nullptr, lane, magic, nullptr);
    }
}

// Rows (blockIdx.x * 8 + warp) * R .. + R - 1 together: each step's loads of all R rows in
// flight at once, and each x value loaded once for the R rows (x is most of what a row
// moves through L1). Each row summed as matvec_row sums it (dot_values, then
// finish_row's), so the same bits; whole steps only (cols a multiple of 256 * B).
template <class T, int B, int R, int OCC>
__global__ void __launch_bounds__(256, OCC)
    mv_together(const unsigned char* __restrict__ w, const float* __restrict__ x, float* y, unsigned rows,
                unsigned cols, unsigned row_bytes)
{
    const unsigned lane = threadIdx.x & 31, first = (blockIdx.x * 8 + (threadIdx.x >> 5)) * R;
    if (first < rows) {
        prefetch_weights(w + (unsigned long long)first * row_bytes, R * row_bytes, lane);
    }
    pdl_wait();
    pdl_launch_dependents();
    if (first + R > rows) {
        return;
    }
    const unsigned magic = magic_2p23();
    typename T::Lane l[R];
    float acc[R];
    for (int i = 0; i < R; ++i) {
        l[i] = T::lane(w + (unsigned long long)(first + i) * row_bytes, lane, magic);
        acc[i] = 0.0f;
    }
    for (unsigned k = 0; k < cols / 256; k += B) {
        typename T::Raw raw[R][B];
#pragma unroll
        for (int j = 0; j < B; ++j) {
#pragma unroll
            for (int i = 0; i < R; ++i) {
                raw[i][j] = T::load(l[i], (unsigned long long)(k + j) * T::STEP, true);
            }
        }
#pragma unroll
        for (int j = 0; j < B; ++j) {
            const float* xs = x + (k + j) * 256 + 4 * lane;
            const float4 p = __ldg((const float4*)xs), q = __ldg((const float4*)(xs + 128));
            const float v[8] = {p.x, p.y, p.z, p.w, q.x, q.y, q.z, q.w};
#pragma unroll
            for (int i = 0; i < R; ++i) {
                float u[8], s[2];
                T::widen(raw[i][j], l[i], u, s);
                dot_values<T>(u, s, v, true, acc[i]);
            }
        }
    }
    for (int i = 0; i < R; ++i) {
        const float total = warp_sum(acc[i]);
        if (lane == 0) {
            y[first + i] = 0.0f + total;
        }
    }
}

// The engine's matvec_stream (matvec.cuh): the block's weights brought into shared memory by
// bulk copies, `stages` of them in flight; the same bits.
template <class T>
__global__ void __launch_bounds__(256)
    mv_stream(const unsigned char* __restrict__ w, const float* __restrict__ x, float* y, unsigned rows,
              unsigned cols, unsigned row_bytes, unsigned chunk, unsigned gps, unsigned stages)
{
    matvec_stream<T>(w, x, y, rows, cols, row_bytes, chunk, gps, stages, 1, nullptr, nullptr, 0.0f, nullptr,
                     nullptr, 0);
}
template __global__ void mv_stream<Half16<true>>(const unsigned char* __restrict__, const float* __restrict__,
                                                 float*, unsigned, unsigned, unsigned, unsigned, unsigned,
                                                 unsigned);
template __global__ void mv_stream<Q8_0>(const unsigned char* __restrict__, const float* __restrict__, float*,
                                         unsigned, unsigned, unsigned, unsigned, unsigned, unsigned);

#define VARIANTS(T, X)                                                                                     \
    X(T, 4, false, 1, 3) X(T, 8, true, 1, 3) X(T, 8, true, 1, 2) X(T, 4, false, 2, 3) X(T, 4, false, 4, 3) \
        X(T, 4, false, 1, 4) X(T, 2, false, 1, 4)
// NVRTC builds every instantiation (kernels_compile).
#define INSTANTIATE(T, B, TAIL, R, OCC) template __global__ void mv_rows<T, B, TAIL, R, OCC>( \
    const unsigned char* __restrict__, const float* __restrict__, float*, unsigned, unsigned, unsigned);
VARIANTS(Half16<true>, INSTANTIATE)
VARIANTS(Q8_0, INSTANTIATE)
#define TOGETHER(T, X) X(T, 4, 2, 3) X(T, 4, 2, 2) X(T, 2, 4, 3)
#define INSTANTIATE_T(T, B, R, OCC) template __global__ void mv_together<T, B, R, OCC>( \
    const unsigned char* __restrict__, const float* __restrict__, float*, unsigned, unsigned, unsigned);
TOGETHER(Half16<true>, INSTANTIATE_T)
TOGETHER(Q8_0, INSTANTIATE_T)

#ifndef __CUDACC_RTC__  // host code: not for NVRTC, which builds the device code alone
typedef void (*Kernel)(const unsigned char*, const float*, float*, unsigned, unsigned, unsigned);

struct Variant {
    const char* type;
    int b, tail, r, occ;
    Kernel k;
    bool q8, together;
};

#define ENTRY(T, B, TAIL, R, OCC) {#T, B, TAIL, R, OCC, mv_rows<T, B, TAIL, R, OCC>, !T::FLOAT, false},
#define ENTRY_T(T, B, R, OCC) {#T, B, false, R, OCC, mv_together<T, B, R, OCC>, !T::FLOAT, true},

int main(int argc, char** argv)
{
    const bool profile = argc > 1 && strcmp(argv[1], "profile") == 0;
    const size_t pool = 3ull << 30;
    unsigned char* w;
    float *x, *y, *y0;
    CK(cudaMalloc(&w, pool));
    CK(cudaMalloc(&x, 8192 * 4));
    CK(cudaMalloc(&y, 128256 * 4));
    CK(cudaMalloc(&y0, 128256 * 4));
    {
        unsigned s = 1;
        random_weights(w, pool, s);
        random_activations(x, 8192, s);
    }
    const Variant variants[] = {VARIANTS(Half16<true>, ENTRY) TOGETHER(Half16<true>, ENTRY_T) VARIANTS(Q8_0, ENTRY)
                                    TOGETHER(Q8_0, ENTRY_T)};
    struct Shape {
        const char* name;
        unsigned rows, cols;
    };
    const Shape shapes[] = {{"gate_up 16384x2048", 16384, 2048}, {"head 128256x2048", 128256, 2048}};
    cudaStream_t st;
    CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    auto row_bytes = [](const Variant& v, unsigned cols) { return v.q8 ? cols / 32 * 34 : cols * 2; };
    auto launch = [&](const Variant& v, const unsigned char* m, const Shape& sh) {
        const unsigned warps = (sh.rows + v.r - 1) / v.r;
        launch_pdl(v.k, dim3((warps + 7) / 8), dim3(256), 0, st, m, (const float*)x, y, sh.rows, sh.cols,
                   row_bytes(v, sh.cols));
    };
    // matvec_stream as the engine lays it out (kernels.rs, StreamPlan::layout: whole rows of
    // up to a stage's eighth, several groups a stage where a block takes many), by stages,
    // stage bytes and blocks an SM.
    int sms = 0;
    CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    struct Stream {
        unsigned stages, stage_kib, per_sm;
    };
    const Stream streams[] = {{4, 17, 1}, {4, 17, 2}, {6, 17, 1}, {3, 34, 1}, {8, 8, 1}};
    for (int q8 = 0; q8 < 2; ++q8) {
        auto k = q8 ? mv_stream<Q8_0> : mv_stream<Half16<true>>;
        CK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 << 10));  // (static memory on top)
    }
    // Variant v of the stream over shape sh's rows at m (Q8_0 or BF16).
    auto stream_launch = [&](bool q8, const Stream& v, const Shape& sh, const unsigned char* m) {
        const unsigned rb = q8 ? sh.cols / 256 * 272 : sh.cols * 2, step = q8 ? 272 : 512;
        const unsigned stage = v.stage_kib << 10, groups = (sh.rows + 7) / 8;
        const unsigned blocks = v.per_sm * sms < groups ? v.per_sm * sms : groups;
        const unsigned most = stage / 8 / step ? stage / 8 / step : 1, steps = (rb + step - 1) / step;
        const unsigned n_chunks = (steps + most - 1) / most;
        const unsigned per_stage = (steps + n_chunks - 1) / n_chunks * step;
        const bool whole = rb <= per_stage;
        const unsigned chunk = whole ? rb : per_stage;
        unsigned gps = 1;
        if (whole) {
            const unsigned fit = stage / (8 * rb), cap = (groups + blocks - 1) / blocks;
            gps = fit < cap ? fit : cap;
            gps = gps ? gps : 1;
        }
        const unsigned smem = v.stages * (8 * gps * chunk + 8);
        launch_pdl(q8 ? mv_stream<Q8_0> : mv_stream<Half16<true>>, dim3(blocks), dim3(256), smem, st, m,
                   (const float*)x, y, sh.rows, sh.cols, rb, chunk, gps, v.stages);
        return gps;
    };
    if (profile) {
        for (const Variant& v : variants) launch(v, w, shapes[0]);
        for (int q8 = 0; q8 < 2; ++q8)
            for (const Stream& v : streams) stream_launch(q8, v, shapes[0], w);
        CK(cudaStreamSynchronize(st));
        return 0;
    }
    printf("copy: %.0f GB/s (read + write)\n", copy_bandwidth(st, w + (1ull << 30), w, 1ull << 30));
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    bool same = true;
    for (const Shape& sh : shapes) {
        printf("== %s, one token: us a call (GB/s of weights), 40 calls over the pool\n", sh.name);
        printf("  %-14s %2s %5s %2s %8s %4s %10s %8s  %s\n", "type", "B", "tail", "R", "rows", "/SM", "us", "GB/s",
               "bits");
        for (const Variant& v : variants) {
            const size_t bytes = (size_t)sh.rows * row_bytes(v, sh.cols);
            const int copies = (int)(pool / bytes);
            // The first variant of a type is the reference for the bits.
            launch(v, w, sh);
            CK(cudaStreamSynchronize(st));
            const bool first = v.b == 4 && v.r == 1 && v.occ == 3 && !v.together;
            bool eq = true;
            if (first) {
                CK(cudaMemcpy(y0, y, sh.rows * 4, cudaMemcpyDeviceToDevice));
            } else {
                std::vector<float> a(sh.rows), b(sh.rows);
                CK(cudaMemcpy(a.data(), y0, sh.rows * 4, cudaMemcpyDeviceToHost));
                CK(cudaMemcpy(b.data(), y, sh.rows * 4, cudaMemcpyDeviceToHost));
                eq = memcmp(a.data(), b.data(), sh.rows * 4) == 0;
                same = same && eq;
            }
            for (int i = 0; i < 3; ++i) launch(v, w + (i % copies) * bytes, sh);
            const int iters = 40;
            CK(cudaEventRecord(e0, st));
            for (int i = 0; i < iters; ++i) launch(v, w + (size_t)(i % copies) * bytes, sh);
            CK(cudaEventRecord(e1, st));
            CK(cudaEventSynchronize(e1));
            float ms;
            CK(cudaEventElapsedTime(&ms, e0, e1));
            printf("  %-14s %2d %5s %2d %8s %4d %10.1f %8.0f  %s\n", v.type, v.b, v.tail ? "yes" : "no", v.r,
                   v.together ? "together" : "in turn", v.occ,
                   ms * 1000 / iters, bytes * iters / ms / 1e6, first ? "reference" : eq ? "same" : "DIFFER");
        }
    }
    for (const Shape& sh : shapes) {
        printf("== %s, one token, matvec_stream: us a call (GB/s of weights)\n", sh.name);
        for (int q8 = 0; q8 < 2; ++q8) {
            // The reference bits: the first variant of the type, as above.
            const Variant& ref = variants[q8 ? sizeof(variants) / sizeof(variants[0]) / 2 : 0];
            launch(ref, w, sh);
            CK(cudaStreamSynchronize(st));
            std::vector<float> want(sh.rows), got(sh.rows);
            CK(cudaMemcpy(want.data(), y, sh.rows * 4, cudaMemcpyDeviceToHost));
            const size_t bytes = (size_t)sh.rows * (q8 ? sh.cols / 256 * 272 : sh.cols * 2);
            const int copies = (int)(pool / bytes);
            for (const Stream& v : streams) {
                unsigned gps = 0;
                auto go = [&](const unsigned char* m) { gps = stream_launch(q8, v, sh, m); };
                go(w);
                CK(cudaStreamSynchronize(st));
                CK(cudaMemcpy(got.data(), y, sh.rows * 4, cudaMemcpyDeviceToHost));
                const bool eq = memcmp(want.data(), got.data(), sh.rows * 4) == 0;
                same = same && eq;
                for (int i = 0; i < 3; ++i) go(w + (i % copies) * bytes);
                const int iters = 40;
                CK(cudaEventRecord(e0, st));
                for (int i = 0; i < iters; ++i) go(w + (size_t)(i % copies) * bytes);
                CK(cudaEventRecord(e1, st));
                CK(cudaEventSynchronize(e1));
                float ms;
                CK(cudaEventElapsedTime(&ms, e0, e1));
                printf("  %-14s stages %u of %2u KiB, %u groups a stage, %u blocks an SM %10.1f %8.0f  %s\n",
                       q8 ? "Q8_0" : "Half16<true>", v.stages, v.stage_kib, gps, v.per_sm, ms * 1000 / iters,
                       bytes * iters / ms / 1e6, eq ? "same" : "DIFFER");
            }
        }
    }
    printf("every variant gives its type's reference bits: %s\n", same ? "yes" : "NO");
    return 0;
}
#endif
