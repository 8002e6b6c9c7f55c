// Probe: where a lone session's step on the tensor-core products (`--precision tensor`, what
// batching with invariance needs) loses to the matrix-vector kernels (the default): the
// engine's one-token tensor-core product (mma.cuh's mma_one, at MMA_ONE_CHUNKS chunks in
// flight a warp and at 2 and 8) and its one-token matrix-vector kernels (matvec.cuh's
// matvec_together, and matvec_out_rows for the head, at the rows a warp and parts kernels.rs
// gives each matrix) on each BF16 product of the Llama-3.2-1B shape, one token (and mma_one at
// 2 chunks in flight with three blocks an SM, and mma_one's arithmetic with each warp's
// weights, and x too, brought through a ring of its own in shared memory by cp.async): alone, 40
// calls over copies of the matrix (more bytes than L2 holds), and chained as a step's products
// (16 layers of Q/K/V, O, gate/up and down, then the head, each launched with programmatic
// dependent launch as the engine's graph launches them). mma_one's variants give the same bits
// (checked); the two kinds of kernel round differently. Not part of Tern.
//
//   nvcc -O3 -gencode arch=compute_90a,code=sm_90a -std=c++17 \
//     -I crates/model/src/llama/cuda/kernels -o /tmp/mo scripts/probes/mma-one.cu && /tmp/mo
#ifndef __CUDACC_RTC__
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <vector>
#endif

#include "mma.cuh"
#include "probe.cuh"

// The engine's mma_one of U chunks in flight a warp, the product alone (no fusions).
template <int U>
__device__ __forceinline__ void mo_tensor_body(const unsigned char* __restrict__ w, const float* __restrict__ x,
                                               float* y, unsigned rows, unsigned cols, unsigned parts)
{
    MmaOut o;
    o.y = y;
    o.y_stride = rows;
    o.residual = nullptr;
    o.g = nullptr;
    o.yg = nullptr;
    o.norm = false;
    o.glu = false;
    o.split = SplitOut{nullptr, nullptr, 0, 0};
    mma_one<U>(w, x, rows, cols, parts, nullptr, 0.0f, o);
}

template <int U>
__global__ void __launch_bounds__(256)
    mo_tensor(const unsigned char* __restrict__ w, const float* __restrict__ x, float* y, unsigned rows,
              unsigned cols, unsigned parts)
{
    mo_tensor_body<U>(w, x, y, rows, cols, parts);
}

// The same at three blocks an SM (at most 85 registers a thread), for the occupancy question.
template <int U>
__global__ void __launch_bounds__(256, 3)
    mo_tensor3(const unsigned char* __restrict__ w, const float* __restrict__ x, float* y, unsigned rows,
               unsigned cols, unsigned parts)
{
    mo_tensor_body<U>(w, x, y, rows, cols, parts);
}

// The engine's one-token matrix-vector product of R rows a warp in `parts` parts (R = 0: the
// head's kernel, matvec_out_rows of 4 rows a warp).
template <int R>
__global__ void __launch_bounds__(256, 3)
    mo_rows(const unsigned char* __restrict__ w, const float* __restrict__ x, float* y, unsigned rows,
            unsigned cols, unsigned parts)
{
    if constexpr (R == 0) {
        matvec_out_rows<Half16<true>, 4>(w, x, y, rows, cols, cols * 2);
    } else {
        matvec_together<Half16<true>, R>(w, x, y, rows, cols, cols * 2, nullptr, parts, nullptr, 0.0f, nullptr,
                                         nullptr, 0);
    }
}

// mma_one's arithmetic (no fusions) with each warp's weights brought by cp.async into a ring
// of D chunks of its own in shared memory (1 KiB a chunk: a lane's two 16-byte pieces at
// 16 lane and 512 + 16 lane, read back by that lane alone), so that D - 1 chunks a warp are
// in flight ahead of its sums without holding registers. X: token 0's 32 columns of each
// chunk come through the same ring (128 bytes after the chunk's weights; lane t < 4 copies
// the 8 it reads itself, after the wait) and are split where they are used, so that no warp
// waits at a block barrier for the block's staging of x; else x is staged as mma_one stages
// it. The same mmas in the same order, so mma_one's bits.
template <int D, bool X>
__device__ __forceinline__ void mo_async_body(const unsigned char* __restrict__ w, const float* __restrict__ x,
                                              float* y, unsigned rows, unsigned cols, unsigned P)
{
    constexpr unsigned SLOT = X ? 1024 + 128 : 1024;
    extern __shared__ __align__(16) unsigned char smem[];  // the warps' rings, then x's hi and lo (!X)
    __shared__ float s_part[16][16];
    const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const unsigned tiles = rows / 16, chunks_all = cols / 32;
    const unsigned per_block = P >= 8 ? 1 : 8 / P;
    const unsigned my_parts = P >= 8 ? P / 8 : 1;
    const unsigned tile = blockIdx.x * per_block + (P >= 8 ? 0 : warp / P);
    const bool mine = tile < tiles;
    const unsigned chunks = chunks_all / P;
    const unsigned n = mine ? my_parts * chunks : 0;  // the warp's chunks, in order
    unsigned char* ring = smem + warp * D * SLOT;
    unsigned char* s_hi = smem + 8 * D * SLOT;
    unsigned char* s_lo = s_hi + 2 * cols;
    auto part_of = [&](unsigned i) { return P >= 8 ? warp + 8 * i : warp % P; };
    auto col_of = [&](unsigned j) { return (part_of(j / chunks) * chunks + j % chunks) * 32; };
    // Chunk j (its first column col) of the warp into slot j % D: its weights, and (X) its x.
    auto fetch_w = [&](unsigned j, unsigned col) {
        if (j < n) {
            const unsigned char* p = w + mma_at(tile, col / 32, chunks_all) + 16 * lane;
            unsigned char* d = ring + (j % D) * SLOT + 16 * lane;
            cp_async16(d, p, true);
            cp_async16(d + 512, p + 512, true);
        }
    };
    auto fetch_x = [&](unsigned j, unsigned col) {
        if (X && j < n && lane < 4) {  // the 8 columns lane t = lane reads, copied by itself
            unsigned char* d = ring + (j % D) * SLOT + 1024 + 32 * lane;
            cp_async16(d, x + col + 8 * lane, true);
            cp_async16(d + 16, x + col + 8 * lane + 4, true);
        }
    };
    // The next chunk the main loop fetches, D - 1 ahead of the one it sums: its index, part
    // and chunk of the part, advanced without divisions.
    unsigned fj = D - 1, fi = (D - 1) / chunks, fk = (D - 1) % chunks;
    // Chunks 0 .. D - 2's weights before the wait; then (X) their x, a group a chunk (group 0
    // also holds the weights), so that group j holds chunk j whole.
    for (unsigned j = 0; j + 1 < D; ++j) {
        fetch_w(j, col_of(j));
    }
    pdl_wait();
    pdl_launch_dependents();
    for (unsigned j = 0; j + 1 < D; ++j) {
        fetch_x(j, col_of(j));
        cp_async_commit();
    }
    if (!X) {
        mma_one_stage(x, cols, (unsigned*)s_hi, (unsigned*)s_lo);
        __syncthreads();
    }
    float acc[2][4] = {};
#pragma unroll
    for (unsigned i = 0; i < 2; ++i) {
        if (i >= my_parts) {
            break;
        }
        for (unsigned k = 0; k < chunks; ++k) {
            const unsigned j = i * chunks + k;
            // The slot of chunk j - 1, whose sums are issued, takes chunk j + D - 1.
            const unsigned fcol = (part_of(fi) * chunks + fk) * 32;
            fetch_w(fj, fcol);
            fetch_x(fj, fcol);
            cp_async_commit();
            ++fj;
            if (++fk == chunks) {
                fk = 0;
                ++fi;
            }
            cp_async_wait<D - 1>();
            if (!mine) {
                continue;
            }
            const unsigned char* s = ring + (j % D) * SLOT + 16 * lane;
            const uint4 a = *(const uint4*)s, b = *(const uint4*)(s + 512);
            uint4 bh = make_uint4(0, 0, 0, 0), bl = make_uint4(0, 0, 0, 0);
            if (g == 0) {
                if (X) {
                    const float* xs = (const float*)(ring + (j % D) * SLOT + 1024) + 8 * t;
                    const float4 p = *(const float4*)xs, q = *(const float4*)(xs + 4);
                    mma_split_pair(p.x, p.y, bh.x, bl.x);
                    mma_split_pair(p.z, p.w, bh.y, bl.y);
                    mma_split_pair(q.x, q.y, bh.z, bl.z);
                    mma_split_pair(q.z, q.w, bh.w, bl.w);
                } else {
                    const unsigned col = (part_of(i) * chunks + k) * 32 + 8 * t;
                    bh = *(const uint4*)(s_hi + 2 * col);
                    bl = *(const uint4*)(s_lo + 2 * col);
                }
            }
            mma_chunk(acc[i], a, b, bh, bl);
        }
    }
    cp_async_wait<0>();
#pragma unroll
    for (unsigned i = 0; i < 2; ++i) {
        if (i >= my_parts) {
            break;
        }
        const unsigned slot = P >= 8 ? part_of(i) : warp;
        if (t == 0) {
            s_part[slot][g] = acc[i][0];
            s_part[slot][g + 8] = acc[i][2];
        }
    }
    __syncthreads();
    if (threadIdx.x >= 16 * per_block) {
        return;
    }
    const unsigned tb = threadIdx.x / 16, r = threadIdx.x % 16, out_tile = blockIdx.x * per_block + tb;
    if (out_tile < tiles) {
        float v = 0.0f;
        for (unsigned p = 0; p < P; ++p) {
            v += s_part[P >= 8 ? p : tb * P + p][r];
        }
        y[out_tile * 16 + r] = 0.0f + v;  // as mma_emit without a residual
    }
}

template <int D, bool X, int B>
__global__ void __launch_bounds__(256, B)
    mo_async(const unsigned char* __restrict__ w, const float* __restrict__ x, float* y, unsigned rows,
             unsigned cols, unsigned parts)
{
    mo_async_body<D, X>(w, x, y, rows, cols, parts);
}

// Rows laid out as mma_one's tiles.
__global__ void __launch_bounds__(256)
    mo_tile(const unsigned char* __restrict__ src, unsigned char* __restrict__ dst, unsigned rows, unsigned cols)
{
    mma_tile(src, dst, rows, cols);
}

// NVRTC builds every instantiation (kernels_compile).
template __global__ void mo_tensor<2>(const unsigned char* __restrict__, const float* __restrict__, float*,
                                      unsigned, unsigned, unsigned);
template __global__ void mo_tensor<4>(const unsigned char* __restrict__, const float* __restrict__, float*,
                                      unsigned, unsigned, unsigned);
template __global__ void mo_tensor<8>(const unsigned char* __restrict__, const float* __restrict__, float*,
                                      unsigned, unsigned, unsigned);
template __global__ void mo_tensor3<2>(const unsigned char* __restrict__, const float* __restrict__, float*,
                                       unsigned, unsigned, unsigned);
template __global__ void mo_async<4, false, 3>(const unsigned char* __restrict__, const float* __restrict__, float*,
                                               unsigned, unsigned, unsigned);
template __global__ void mo_async<8, false, 3>(const unsigned char* __restrict__, const float* __restrict__, float*,
                                               unsigned, unsigned, unsigned);
template __global__ void mo_async<16, false, 1>(const unsigned char* __restrict__, const float* __restrict__, float*,
                                                unsigned, unsigned, unsigned);
template __global__ void mo_async<4, true, 3>(const unsigned char* __restrict__, const float* __restrict__, float*,
                                              unsigned, unsigned, unsigned);
template __global__ void mo_async<8, true, 3>(const unsigned char* __restrict__, const float* __restrict__, float*,
                                              unsigned, unsigned, unsigned);
template __global__ void mo_rows<0>(const unsigned char* __restrict__, const float* __restrict__, float*, unsigned,
                                    unsigned, unsigned);
template __global__ void mo_rows<2>(const unsigned char* __restrict__, const float* __restrict__, float*, unsigned,
                                    unsigned, unsigned);
template __global__ void mo_rows<4>(const unsigned char* __restrict__, const float* __restrict__, float*, unsigned,
                                    unsigned, unsigned);

#ifndef __CUDACC_RTC__  // host code: not for NVRTC, which builds the device code alone
typedef void (*Kernel)(const unsigned char*, const float*, float*, unsigned, unsigned, unsigned);

// A product of the 1B shape: mma_one's parts (kernels.rs's mma_parts), and the matrix-vector
// kernels' rows a warp (0: the head's kernel) and parts (rows_together and matvec_parts at one
// token).
struct Shape {
    const char* name;
    unsigned rows, cols, mma_parts, rpw, mv_parts;
};

// One product's matrices: `copies` copies as rows and as tiles.
struct Matrix {
    const Shape* shape;
    unsigned char *rows, *tiles;
    size_t bytes;
    int copies;
};

int main()
{
    const Shape shapes[] = {
        {"qkv 3072x2048", 3072, 2048, 8, 2, 2},      {"o 2048x2048", 2048, 2048, 8, 2, 2},
        {"gate_up 16384x2048", 16384, 2048, 2, 4, 1}, {"down 2048x8192", 2048, 8192, 16, 4, 4},
        {"head 128256x2048", 128256, 2048, 1, 0, 1},
    };
    float *x, *y, *y0;
    CK(cudaMalloc(&x, 8192 * 4));
    CK(cudaMalloc(&y, 128256 * 4));
    CK(cudaMalloc(&y0, 128256 * 4));
    unsigned s = 1;
    random_activations(x, 8192, s);
    std::vector<Matrix> ms;
    for (const Shape& sh : shapes) {
        Matrix m{&sh, nullptr, nullptr, (size_t)sh.rows * sh.cols * 2, 0};
        m.copies = (int)((256ull << 20) / m.bytes) > 2 ? (int)((256ull << 20) / m.bytes) : 2;
        CK(cudaMalloc(&m.rows, m.bytes * m.copies));
        CK(cudaMalloc(&m.tiles, m.bytes * m.copies));
        random_weights(m.rows, m.bytes * m.copies, s);
        for (int c = 0; c < m.copies; ++c) {
            mo_tile<<<1024, 256>>>(m.rows + c * m.bytes, m.tiles + c * m.bytes, sh.rows, sh.cols);
        }
        ms.push_back(m);
    }
    CK(cudaDeviceSynchronize());
    cudaStream_t st;
    CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    // mma_one and its variants: the kernel, its chunks in flight (U) or its ring's chunks (D) a
    // warp, whether it is a ring, whether x comes through the ring (else x is staged), its name.
    struct Variant {
        Kernel kernel;
        int depth;
        bool ring, x;
        const char* name;
    };
    const Variant tensor[] = {
        {mo_tensor<MMA_ONE_CHUNKS>, MMA_ONE_CHUNKS, false, false, "mma_one, engine's U"},
        {mo_tensor<2>, 2, false, false, "mma_one, U = 2"},
        {mo_tensor<8>, 8, false, false, "mma_one, U = 8"},
        {mo_tensor3<2>, 2, false, false, "mma_one, U = 2, 3 blocks"},
        {mo_async<4, false, 3>, 4, true, false, "ring of 4, 3 blocks"},
        {mo_async<8, false, 3>, 8, true, false, "ring of 8, 3 blocks"},
        {mo_async<16, false, 1>, 16, true, false, "ring of 16, 1 block"},
        {mo_async<4, true, 3>, 4, true, true, "ring of 4 with x, 3 blks"},
        {mo_async<8, true, 3>, 8, true, true, "ring of 8 with x, 3 blks"},
    };
    constexpr int T = sizeof tensor / sizeof tensor[0];  // variant T is the matrix-vector kernel
    auto name = [&](int v) { return v < T ? tensor[v].name : "matrix-vector, engine's"; };
    // Dynamic shared memory of variant v for `cols` columns: its warps' rings (1 KiB a chunk,
    // and 128 bytes more where x comes through them), and x's hi and lo (4 cols bytes) where it
    // stages x.
    auto smem = [&](int v, unsigned cols) {
        const Variant& t = tensor[v];
        return (t.ring ? 8u * t.depth * (t.x ? 1152u : 1024u) : 0u) + (t.x ? 0u : 4 * cols);
    };
    for (int v = 0; v < T; ++v) {
        CK(cudaFuncSetAttribute(tensor[v].kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem(v, 8192)));
    }
    // Variant v of product m, copy c: v < T mma_one or its variants (tensor[v]), v = T the
    // matrix-vector kernel.
    auto launch = [&](int v, const Matrix& m, int c) {
        const Shape& sh = *m.shape;
        if (v < T) {
            const unsigned tiles = sh.rows / 16, per_block = sh.mma_parts >= 8 ? 1 : 8 / sh.mma_parts;
            launch_pdl(tensor[v].kernel, dim3((tiles + per_block - 1) / per_block), dim3(256), smem(v, sh.cols), st,
                       (const unsigned char*)m.tiles + c * m.bytes, (const float*)x, y, sh.rows, sh.cols,
                       sh.mma_parts);
        } else if (sh.rpw == 0) {
            launch_pdl(mo_rows<0>, dim3((sh.rows + 31) / 32), dim3(256), 0, st,
                       (const unsigned char*)m.rows + c * m.bytes, (const float*)x, y, sh.rows, sh.cols, 1u);
        } else {
            const Kernel k = sh.rpw == 4 ? mo_rows<4> : mo_rows<2>;
            launch_pdl(k, dim3(sh.rows * sh.mv_parts / (8 * sh.rpw)), dim3(256), 0, st,
                       (const unsigned char*)m.rows + c * m.bytes, (const float*)x, y, sh.rows, sh.cols,
                       sh.mv_parts);
        }
    };
    unsigned char *a, *b;
    CK(cudaMalloc(&a, 1ull << 30));
    CK(cudaMalloc(&b, 1ull << 30));
    printf("copy: %.0f GB/s (read + write)\n", copy_bandwidth(st, b, a, 1ull << 30));
    bool same = true;
    char digest[40];
    printf("== one token, us a call (GB/s of weights), 40 calls over the copies\n");
    printf("  %-20s %-26s %4s %10s %8s  %s\n", "product", "kernel", "U|D", "us", "GB/s", "bits");
    for (const Matrix& m : ms) {
        for (int v = 0; v <= T; ++v) {
            launch(v, m, 0);
            CK(cudaStreamSynchronize(st));
            const char* bits = "";
            if (v == 0) {
                CK(cudaMemcpy(y0, y, m.shape->rows * 4, cudaMemcpyDeviceToDevice));
                // Its outputs' FNV-1a digest, to compare builds of other headers.
                std::vector<unsigned char> out(m.shape->rows * 4);
                CK(cudaMemcpy(out.data(), y0, out.size(), cudaMemcpyDeviceToHost));
                unsigned long long h = 1469598103934665603ull;
                for (unsigned char c : out) h = (h ^ c) * 1099511628211ull;
                snprintf(digest, sizeof digest, "reference %016llx", h);
                bits = digest;
            } else if (v < T) {
                std::vector<float> p(m.shape->rows), q(m.shape->rows);
                CK(cudaMemcpy(p.data(), y0, m.shape->rows * 4, cudaMemcpyDeviceToHost));
                CK(cudaMemcpy(q.data(), y, m.shape->rows * 4, cudaMemcpyDeviceToHost));
                const bool eq = memcmp(p.data(), q.data(), m.shape->rows * 4) == 0;
                same = same && eq;
                bits = eq ? "same" : "DIFFER";
            }
            for (int i = 0; i < 3; ++i) launch(v, m, i % m.copies);
            const int iters = 40;
            const double call_ms = elapsed_ms(st, [&] {
                for (int i = 0; i < iters; ++i) launch(v, m, i % m.copies);
            });
            printf("  %-20s %-26s %4d %10.1f %8.0f  %s\n", m.shape->name, name(v), v < T ? tensor[v].depth : 0,
                   call_ms * 1000 / iters, m.bytes * iters / call_ms / 1e6, bits);
        }
    }
    // A step's products: 16 layers of the four, then the head, each on its next copy.
    printf("== a step's products chained (16 layers, then the head), us a step, medians of 5\n");
    for (int v = 0; v <= T; ++v) {
        std::vector<double> runs;
        for (int r = 0; r < 6; ++r) {
            const double t = elapsed_ms(st, [&] {
                for (int l = 0; l < 16; ++l) {
                    for (int p = 0; p < 4; ++p) launch(v, ms[p], l % ms[p].copies);
                }
                launch(v, ms[4], r % ms[4].copies);
            });
            if (r > 0) runs.push_back(t * 1000);
        }
        std::sort(runs.begin(), runs.end());
        printf("  %-26s %10.1f\n", name(v), runs[runs.size() / 2]);
    }
    printf("mma_one's variants give its bits: %s\n", same ? "yes" : "NO");
    return 0;
}
#endif
