// What the probes in this folder share: a check of every CUDA runtime call and, for kernels,
// programmatic dependent launch (a kernel may start while the one before it finishes, and
// waits for it where it reads that kernel's results).
#pragma once
#ifndef __CUDACC_RTC__  // (NVRTC compiles the probes' device code alone: see kernels_compile.rs)
#include <cstdio>
#include <cstdlib>
#endif

#define CK(x)                                                                              \
    do {                                                                                   \
        cudaError_t e = (x);                                                               \
        if (e != cudaSuccess) {                                                            \
            printf("error %s at line %d\n", cudaGetErrorString(e), __LINE__);              \
            exit(1);                                                                       \
        }                                                                                  \
    } while (0)

// (Probes that include the engine's kernel headers take these from common.cuh.)
#if defined(__CUDACC__) && !defined(TERN_COMMON_CUH)
__device__ __forceinline__ void pdl_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
__device__ __forceinline__ void pdl_launch() { asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); }
#endif

#ifdef __CUDACC__
// 16 bytes of weights, read past L1 (each is read once).
__device__ __forceinline__ uint4 ldw(const void* p)
{
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}
// The low and high bf16 of a 32-bit word, as floats.
__device__ __forceinline__ float lo16(unsigned u) { return __uint_as_float(u << 16); }
__device__ __forceinline__ float hi16(unsigned u) { return __uint_as_float(u & 0xffff0000u); }
// A warp's values summed by a fixed butterfly.
__device__ __forceinline__ float wsum(float v)
{
    for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
// acc plus 8 bf16 weights times a (columns 0-3) and b (4-7), in column order.
__device__ __forceinline__ float dot8(uint4 w, float4 a, float4 b, float acc)
{
    acc = fmaf(lo16(w.x), a.x, acc);
    acc = fmaf(hi16(w.x), a.y, acc);
    acc = fmaf(lo16(w.y), a.z, acc);
    acc = fmaf(hi16(w.y), a.w, acc);
    acc = fmaf(lo16(w.z), b.x, acc);
    acc = fmaf(hi16(w.z), b.y, acc);
    acc = fmaf(lo16(w.w), b.z, acc);
    acc = fmaf(hi16(w.w), b.w, acc);
    return acc;
}
#endif

#if defined(__CUDACC__) && !defined(__CUDACC_RTC__)
// Launches `k` on `st` with programmatic dependent launch.
template <class... Params, class... Args>
static void launch_pdl(void (*k)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t st, Args... args)
{
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = st;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    CK(cudaLaunchKernelEx(&cfg, k, args...));
}

// Fills `n` floats at `x` (device memory) with values in [-0.5, 0.5), continuing the
// generator state `s`.
static void random_activations(float* x, size_t n, unsigned& s)
{
    float* h = new float[n];
    for (size_t i = 0; i < n; ++i) {
        s = s * 1664525u + 1013904223u;
        h[i] = ((s >> 8) & 0xffff) / 65536.0f - 0.5f;
    }
    CK(cudaMemcpy(x, h, n * 4, cudaMemcpyHostToDevice));
    delete[] h;
}

// Fills `bytes` bytes at `w` (device memory, `bytes` even) with random bytes, each odd byte's
// exponent bits tamed: modest BF16 weights, and Q8_0 scales (f16) in [0.5, 1) where a scale's
// high byte lands on an odd byte. Continues the generator state `s`.
static void random_weights(unsigned char* w, size_t bytes, unsigned& s)
{
    unsigned char* h = new unsigned char[bytes];
    for (size_t i = 0; i < bytes; i += 2) {
        s = s * 1664525u + 1013904223u;
        h[i] = (s >> 8) & 0xff;
        h[i + 1] = ((s >> 16) & 0x83) | 0x38;
    }
    CK(cudaMemcpy(w, h, bytes, cudaMemcpyHostToDevice));
    delete[] h;
}

// Milliseconds the work `enqueue` puts on `st` takes there (events around it).
template <class F>
static double elapsed_ms(cudaStream_t st, F&& enqueue)
{
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    CK(cudaEventRecord(e0, st));
    enqueue();
    CK(cudaEventRecord(e1, st));
    CK(cudaEventSynchronize(e1));
    float ms;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    CK(cudaEventDestroy(e0));
    CK(cudaEventDestroy(e1));
    return ms;
}

// The device-to-device copy bandwidth (read + write), GB/s: `bytes` at `from` copied to `to`
// ten times on `st`, after three copies to warm up.
static double copy_bandwidth(cudaStream_t st, unsigned char* to, const unsigned char* from, size_t bytes)
{
    for (int i = 0; i < 3; ++i) CK(cudaMemcpyAsync(to, from, bytes, cudaMemcpyDeviceToDevice, st));
    const double ms = elapsed_ms(st, [&] {
        for (int i = 0; i < 10; ++i) CK(cudaMemcpyAsync(to, from, bytes, cudaMemcpyDeviceToDevice, st));
    });
    return 2.0 * bytes * 10 / ms / 1e6;
}
#endif
