// What every kernel program of the forward pass shares (NVRTC compiles each .cu file with this
// folder's headers): warp reductions, programmatic dependent launch, and the grid barrier of
// decode.cu's persistent kernel.

#ifndef TERN_COMMON_CUH
#define TERN_COMMON_CUH

// The numbers these kernels share with the host (ATTN_SPLIT, DECODE_THREADS, TOP_CHUNK, ...),
// written from the host's Rust constants.
#include "constants.cuh"

#define FULL_MASK 0xffffffffu

// The KV cache's element: f32, or IEEE half (bits) when the program is compiled with
// TERN_KV_F16 (the host's KvType::F16). Keys and values are rounded to nearest on the way
// in and widened exactly on the way out, as the CPU reference's f16 cache does; kv_round is
// that round trip, applied to this call's own new keys and values wherever they are read
// from shared memory rather than from the cache, so that a position reads the same values
// whichever call appended it.
#ifdef TERN_KV_F16
typedef unsigned short kv_t;
__device__ __forceinline__ float kv_widen(unsigned short h)
{
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ void kv_store(kv_t* p, float x)
{
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
    *p = h;
}
__device__ __forceinline__ float kv_round(float x)
{
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
    return kv_widen(h);
}
// Four values as the cache holds them (two words, the first value in the low half of u.x).
__device__ __forceinline__ float4 kv_widen4(uint2 u)
{
    return make_float4(kv_widen((unsigned short)(u.x & 0xffff)), kv_widen((unsigned short)(u.x >> 16)),
                       kv_widen((unsigned short)(u.y & 0xffff)), kv_widen((unsigned short)(u.y >> 16)));
}
// Four values from p, which must be 8-byte aligned.
__device__ __forceinline__ float4 kv_load4(const kv_t* p) { return kv_widen4(*(const uint2*)p); }
#else
typedef float kv_t;
__device__ __forceinline__ void kv_store(kv_t* p, float x) { *p = x; }
__device__ __forceinline__ float kv_round(float x) { return x; }
// Four values from p, which must be 16-byte aligned.
__device__ __forceinline__ float4 kv_load4(const kv_t* p) { return *(const float4*)p; }
#endif
#define NEG_INF __int_as_float(0xff800000)

// Programmatic dependent launch (sm_90 and later; nothing before): every kernel is launched
// so that it may be scheduled while the kernel before it on the stream finishes. pdl_wait
// blocks until that kernel has completed and its writes are visible; a kernel calls it
// before it reads any activation or writes anything (only weights, which nothing writes,
// may be touched before). pdl_launch_dependents lets the next kernel be scheduled early;
// it only starts the next kernel's own wait, so it is safe anywhere.
__device__ __forceinline__ void pdl_wait()
{
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_launch_dependents()
{
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Nothing: a device function's hook (a point where its caller may run something) by default.
struct NoMid {
    __device__ __forceinline__ void operator()() const {}
};

// The hook of a kernel that may touch memory no kernel of its step writes (weights, older
// cache rows) before it waits: when `on`, pdl_wait, then pdl_launch_dependents (else the
// kernel waited at its start).
struct LateWait {
    bool on;
    __device__ __forceinline__ void operator()() const
    {
        if (on) {
            pdl_wait();
            pdl_launch_dependents();
        }
    }
};

// Weights a later kernel will read, asked into L2 ahead of it (Hopper's bulk prefetch,
// sm_90; nothing before): `bytes` (a multiple of 16) at `p` (16-byte aligned; none where p is
// null), shared out among the launch's blocks, 4 KiB a request, by each block's first warp.
// Attention asks at its start, a product once its last weights are requested, so that HBM
// streams the next product's weights while these latency-bound kernels run. A hint only: it
// changes no result.
struct Ahead {
    const unsigned char* p;
    unsigned long long bytes;
};

__device__ __forceinline__ void l2_ahead(const Ahead& a)
{
#if __CUDA_ARCH__ >= 900
    if (a.p == nullptr || threadIdx.x >= 32) {
        return;
    }
    const unsigned b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    const unsigned n = gridDim.x * gridDim.y * gridDim.z;
    const unsigned long long share = (a.bytes / n + 4095) / 4096 * 4096;
    const unsigned long long lo = (unsigned long long)b * share;
    const unsigned long long hi = lo + share < a.bytes ? lo + share : a.bytes;
    for (unsigned long long o = lo + 4096ull * threadIdx.x; o < hi; o += 4096ull * 32) {
        const unsigned size = (unsigned)(hi - o < 4096 ? hi - o : 4096);
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(a.p + o), "r"(size) : "memory");
    }
#endif
}

// Asynchronous 16-byte copies from global to shared memory (sm_80 and later; a plain copy
// before): cp_async16 copies src to dst when `real`, else fills dst with zeros; a thread's
// copies since its last cp_async_commit form a group, and cp_async_wait<N> waits until at most
// N of its groups are still in flight (its own copies only: a block synchronizes after it).
__device__ __forceinline__ unsigned smem_addr(const void* p)
{
    return (unsigned)__cvta_generic_to_shared(p);
}

__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool real)
{
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_addr(dst)), "l"(src),
                 "r"(real ? 16 : 0));
#else
    *(uint4*)dst = real ? *(const uint4*)src : make_uint4(0, 0, 0, 0);
#endif
}

__device__ __forceinline__ void cp_async_commit()
{
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}

template <int N>
__device__ __forceinline__ void cp_async_wait()
{
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
#endif
}

// Hopper's bulk copies (sm_90): one thread copies a contiguous run of global memory into
// shared memory (sizes and addresses multiples of 16 bytes), and the copy's bytes complete a
// phase of an mbarrier in shared memory. A phase completes once its one arrival
// (bar_expect, which also tells it the bytes to wait for) has come and every byte has
// landed; bar_wait waits for the phase of the given parity (0, 1, 0, ... as phases pass).
#if __CUDA_ARCH__ >= 900
__device__ __forceinline__ void bar_init(unsigned long long* bar)
{
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_addr(bar)) : "memory");
}

// After every bar_init, before the block's barrier that makes them visible.
__device__ __forceinline__ void bar_init_fence()
{
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}

__device__ __forceinline__ void bar_expect(unsigned long long* bar, unsigned bytes)
{
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes)
                 : "memory");
}

__device__ __forceinline__ void bulk_copy(void* dst, const void* src, unsigned bytes, unsigned long long* bar)
{
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                     smem_addr(dst)),
                 "l"(src), "r"(bytes), "r"(smem_addr(bar))
                 : "memory");
}

__device__ __forceinline__ void bar_wait(unsigned long long* bar, unsigned parity)
{
    asm volatile(
        "{\n"
        ".reg .pred done;\n"
        "WAIT:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra WAIT;\n"
        "}" ::"r"(smem_addr(bar)),
        "r"(parity)
        : "memory");
}
#endif

// Sums v over the warp with a fixed butterfly; every lane gets the same total.
__device__ __forceinline__ float warp_sum(float v)
{
    for (int o = 16; o > 0; o >>= 1) {
        v += __shfl_xor_sync(FULL_MASK, v, o);
    }
    return v;
}

__device__ __forceinline__ float warp_max(float v)
{
    for (int o = 16; o > 0; o >>= 1) {
        v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    }
    return v;
}

// Waits until every block of the grid has arrived here, and makes every write before the
// barrier, by any block, visible to every read after it. Only for grids whose blocks are all
// resident at once (a cooperative launch). `count` is a counter that only ever grows: each
// block adds one per barrier, so barrier k of a launch ends when the count reaches the next
// multiple of the grid's size after the value the block found. A launch whose blocks all
// pass the same number of barriers leaves it at a multiple, ready for the next launch.
__device__ __forceinline__ void grid_barrier(unsigned long long* count)
{
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned long long old, now;
        asm volatile("atom.add.release.gpu.u64 %0, [%1], 1;" : "=l"(old) : "l"(count) : "memory");
        const unsigned long long target = (old / gridDim.x + 1) * gridDim.x;
        do {
            asm volatile("ld.relaxed.gpu.u64 %0, [%1];" : "=l"(now) : "l"(count) : "memory");
        } while (now < target);
        asm volatile("fence.acq_rel.gpu;" ::: "memory");
    }
    __syncthreads();
}

// ---------------------------------------------------------------------------------------
// Activations split for the tensor-core products (mma.cuh)
// ---------------------------------------------------------------------------------------

// Two floats rounded to bf16, a in the low half.
__device__ __forceinline__ unsigned mma_pack(float a, float b)
{
    unsigned d;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(b), "f"(a));
    return d;
}

// A pair x0, x1 as its hi word and its lo word.
__device__ __forceinline__ void mma_split_pair(float x0, float x1, unsigned& hi, unsigned& lo)
{
    hi = mma_pack(x0, x1);
    lo = mma_pack(x0 - __uint_as_float(hi << 16), x1 - __uint_as_float(hi & 0xffff0000u));
}

// Tokens of the warpgroup mmas' operands laid out `layout` (MMA_OPERANDS + k: MMA_MAX_TOKENS
// >> k, for products of fewer tokens).
__device__ __forceinline__ unsigned operand_tokens(unsigned layout)
{
    return MMA_MAX_TOKENS >> (layout - MMA_OPERANDS);
}

// Where a kernel writes a product's input a second time, split as mma.cuh's mma_split would
// split it for that product: laid out `layout` (constants.cuh's MMA_ROWS, MMA_CHUNKS or
// MMA_OPERANDS + k) for rows of `cols` columns; nothing where hi is null.
struct SplitOut {
    unsigned* hi;
    unsigned* lo;
    unsigned layout;
    unsigned cols;
};

// Pair j (columns 2j and 2j + 1) of token t of T, split into its hi and lo words where
// mma_split puts them (see its layouts; MMA_OPERANDS: pair j % 16 = 4 q + r of chunk j / 16 is
// pair r of lane quad q's columns).
__device__ __forceinline__ void split_put(const SplitOut& o, unsigned T, unsigned t, unsigned j, float x0, float x1)
{
    unsigned h, l;
    mma_split_pair(x0, x1, h, l);
    if (o.layout >= MMA_OPERANDS) {
        const unsigned W = operand_tokens(o.layout);
        const unsigned jj = j % 16, q = jj / 4, r = jj % 4;
        unsigned char* op = (unsigned char*)o.hi + (unsigned long long)(j / 16) * 128 * W + (t / 8) * 256 +
                            (t % 8) * 16 + q * 4 + (r / 2) * 64 * W + (r % 2) * 128;
        *(unsigned*)op = h;
        *(unsigned*)(op + 32 * W) = l;
    } else if (o.layout == MMA_CHUNKS) {
        unsigned* row = o.hi + ((unsigned long long)(j / 16) * T + t) * 32;
        const unsigned first = (t & 1) * 16;
        row[first + j % 16] = h;
        row[(first ^ 16) + j % 16] = l;
    } else {
        const unsigned long long at = (unsigned long long)t * (o.cols / 2) + j;
        o.hi[at] = h;
        o.lo[at] = l;
    }
}

#endif  // TERN_COMMON_CUH
