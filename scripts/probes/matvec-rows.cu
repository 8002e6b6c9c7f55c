// Probe: what holds a one-token product of Q8_0 rows (dealt by lane, as the engine uploads
// them) at about two thirds of BF16's bandwidth? The engine's own row code (matvec.cuh's
// matvec_row) over the Llama-3.2-1B shape's gate/up and output-head matrices, a warp a row,
// varying only how the rows are walked: steps whose loads a lane has in flight (B, with the
// rest of a row's steps loaded at once where TAIL), rows a warp takes one after another (R:
// fewer, longer-lived blocks; or R rows together, each x value loaded once for them), and
// blocks an SM (the register cap that follows); and the engine's own output-head kernel at 1, 2
// and 4 rows a warp. Every variant sums each row in the same order, so the same bits (checked).
// Not part of Tern.
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

// Rows (blockIdx.x * 8 + warp) * R .. + R - 1 together, by the engine's matvec_rows (each
// step's loads of all R rows in flight at once, each x value loaded once for the R rows, each
// row summed as matvec_row sums it: the same bits, B = 4 steps in flight at R = 2, 2 at R =
// 4), stored by each row's lane as finish_row stores it; only the first R rows' bytes asked
// into L2 ahead, and only whole groups of R rows.
template <class T, int R, int OCC>
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
    const float mine =
        matvec_rows<T, R>(w + (unsigned long long)first * row_bytes, row_bytes, x, cols, lane, magic_2p23());
    if (lane < (unsigned)R) {
        y[first + lane] = 0.0f + mine;
    }
}

// The engine's own one-token output-head kernel (matvec.cuh's matvec_out_rows), R rows a warp
// (together where R > 1); the same bits.
template <class T, int R>
__global__ void __launch_bounds__(256, 3)
    mv_engine(const unsigned char* __restrict__ w, const float* __restrict__ x, float* y, unsigned rows,
              unsigned cols, unsigned row_bytes)
{
    matvec_out_rows<T, R>(w, x, y, rows, cols, row_bytes);
}

#define VARIANTS(T, X)                                                                                     \
    X(T, 4, false, 1, 3) X(T, 8, true, 1, 3) X(T, 8, true, 1, 2) X(T, 4, false, 2, 3) X(T, 4, false, 4, 3) \
        X(T, 4, false, 1, 4) X(T, 2, false, 1, 4)
// NVRTC builds every instantiation (kernels_compile).
#define INSTANTIATE(T, B, TAIL, R, OCC) template __global__ void mv_rows<T, B, TAIL, R, OCC>( \
    const unsigned char* __restrict__, const float* __restrict__, float*, unsigned, unsigned, unsigned);
VARIANTS(Half16<true>, INSTANTIATE)
VARIANTS(Q8_0, INSTANTIATE)
#define TOGETHER(T, X) X(T, 2, 3) X(T, 2, 2) X(T, 4, 3)
#define INSTANTIATE_T(T, R, OCC) template __global__ void mv_together<T, R, OCC>( \
    const unsigned char* __restrict__, const float* __restrict__, float*, unsigned, unsigned, unsigned);
TOGETHER(Half16<true>, INSTANTIATE_T)
TOGETHER(Q8_0, INSTANTIATE_T)
#define ENGINE(T, X) X(T, 1) X(T, 2) X(T, 4)
#define INSTANTIATE_E(T, R) template __global__ void mv_engine<T, R>( \
    const unsigned char* __restrict__, const float* __restrict__, float*, unsigned, unsigned, unsigned);
ENGINE(Half16<true>, INSTANTIATE_E)
ENGINE(Q8_0, INSTANTIATE_E)

#ifndef __CUDACC_RTC__  // host code: not for NVRTC, which builds the device code alone
typedef void (*Kernel)(const unsigned char*, const float*, float*, unsigned, unsigned, unsigned);

struct Variant {
    const char* type;
    int b, tail, r, occ;
    Kernel k;
    bool q8, together, engine;
};

#define ENTRY(T, B, TAIL, R, OCC) {#T, B, TAIL, R, OCC, mv_rows<T, B, TAIL, R, OCC>, !T::FLOAT, false, false},
#define ENTRY_T(T, R, OCC) {#T, R == 4 ? 2 : 4, false, R, OCC, mv_together<T, R, OCC>, !T::FLOAT, true, false},
#define ENTRY_E(T, R) {#T, R == 1 ? 4 : R == 2 ? 4 : 2, false, R, 3, mv_engine<T, R>, !T::FLOAT, R > 1, true},

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
    const Variant variants[] = {VARIANTS(Half16<true>, ENTRY) TOGETHER(Half16<true>, ENTRY_T)
                                    ENGINE(Half16<true>, ENTRY_E) VARIANTS(Q8_0, ENTRY) TOGETHER(Q8_0, ENTRY_T)
                                        ENGINE(Q8_0, ENTRY_E)};
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
    if (profile) {
        for (const Variant& v : variants) launch(v, w, shapes[0]);
        CK(cudaStreamSynchronize(st));
        return 0;
    }
    printf("copy: %.0f GB/s (read + write)\n", copy_bandwidth(st, w + (1ull << 30), w, 1ull << 30));
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
            const bool first = v.b == 4 && v.r == 1 && v.occ == 3 && !v.together && !v.engine;
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
            const double ms = elapsed_ms(st, [&] {
                for (int i = 0; i < iters; ++i) launch(v, w + (size_t)(i % copies) * bytes, sh);
            });
            printf("  %-14s %2d %5s %2d %8s %4d %10.1f %8.0f  %s\n", v.type, v.b, v.tail ? "yes" : "no", v.r,
                   v.engine ? (v.together ? "engine, together" : "engine") : v.together ? "together" : "in turn", v.occ,
                   ms * 1000 / iters, bytes * iters / ms / 1e6, first ? "reference" : eq ? "same" : "DIFFER");
        }
    }
    printf("every variant gives its type's reference bits: %s\n", same ? "yes" : "NO");
    return 0;
}
#endif
