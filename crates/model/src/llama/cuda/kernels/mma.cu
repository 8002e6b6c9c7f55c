// The tensor-core kernels' entry points, compiled by NVRTC (with this folder's headers): what
// each computes, the weights' tiled layout and the order of the sums are in mma.cuh.

#include "mma.cuh"

extern "C" __global__ void __launch_bounds__(256)
    mma_tile_bf16(const unsigned char* __restrict__ src, unsigned char* __restrict__ dst, unsigned rows, unsigned cols)
{
    mma_tile(src, dst, rows, cols);
}

extern "C" __global__ void __launch_bounds__(256)
    mma_split_f32(const float* __restrict__ x, unsigned x_stride, unsigned cols, const float* __restrict__ norm_x,
                  float eps, unsigned* __restrict__ hi, unsigned* __restrict__ lo, float* __restrict__ scale,
                  unsigned layout)
{
    mma_split(x, x_stride, cols, norm_x, eps, hi, lo, scale, layout);
}

// The fusions' arguments, as matvec takes them: residual (may be y), norm_x and eps (the
// norm before), g and yg (the next norm's input), glu; and where the next product's input
// goes split (split_hi: none if null).
#define MMA_OUT                                                                                   \
    MmaOut o;                                                                                     \
    o.y = y;                                                                                      \
    o.y_stride = y_stride;                                                                        \
    o.residual = residual;                                                                        \
    o.g = g;                                                                                      \
    o.yg = yg;                                                                                    \
    o.norm = norm;                                                                                \
    o.glu = glu != 0;                                                                             \
    o.split = SplitOut{split_hi, split_lo, split_layout, split_cols};

extern "C" __global__ void __launch_bounds__(256)
    mma_one_bf16(const unsigned char* __restrict__ w, const float* __restrict__ x, float* y, unsigned rows,
                 unsigned cols, unsigned parts, unsigned y_stride, const float* residual,
                 const float* __restrict__ norm_x, float eps, const float* __restrict__ g, float* __restrict__ yg,
                 unsigned glu)
{
    const bool norm = norm_x != nullptr;
    unsigned *split_hi = nullptr, *split_lo = nullptr, split_layout = 0, split_cols = 0;
    MMA_OUT
    mma_one<MMA_ONE_CHUNKS>(w, x, rows, cols, parts, norm_x, eps, o);
}

// The arguments of mma_many, mma_ring and mma_wg after their activations (x as mma_split
// left it): the norm's scales (scale; with flags, taken by the kernel itself from norm_x),
// the outputs and their fusions (MMA_OUT), the parts' scratch, and weights to ask into L2
// ahead (common.cuh's l2_ahead: mma_many asks; the host makes no request of the ring kernels,
// which leave it).
#define MMA_PRODUCT_ARGS                                                                          \
    float *scale, float *y, unsigned rows, unsigned cols, unsigned n_tok, unsigned parts,         \
        unsigned *tickets, float *part_sums, unsigned y_stride, const float *residual,            \
        unsigned norm, const float *__restrict__ g, float *__restrict__ yg, unsigned glu,         \
        unsigned plain, const float *norm_x, unsigned x_stride, float eps, unsigned *flags,       \
        unsigned *split_hi, unsigned *split_lo, unsigned split_layout, unsigned split_cols, Ahead ahead

// mma_many for NT n8 tiles of tokens (T <= 8 NT), at two blocks an SM (at most 128 registers a
// thread: one block an SM left too few warps reading).
#define MMA_MANY(NT)                                                                                  \
    extern "C" __global__ void __launch_bounds__(256, 2)                                              \
        mma_many_bf16_##NT(const unsigned char* __restrict__ w, const unsigned* __restrict__ hi,      \
                           const unsigned* __restrict__ lo, MMA_PRODUCT_ARGS)                         \
    {                                                                                                 \
        MMA_OUT                                                                                       \
        mma_many<NT>(w, hi, lo, scale, norm_x, x_stride, eps, flags, rows, cols, n_tok, parts, tickets, \
                     part_sums, o, plain != 0, ahead);                                                \
    }

MMA_MANY(1)
MMA_MANY(2)
MMA_MANY(4)

// mma_ring for 33 to 64 tokens, at two blocks an SM (its shared memory): mma_many's
// arguments, x split into hi alone (lo unused), laid out MMA_CHUNKS.
extern "C" __global__ void __launch_bounds__(256, 2)
    mma_ring_bf16(const unsigned char* __restrict__ w, const unsigned char* __restrict__ xs, const unsigned* lo,
                  MMA_PRODUCT_ARGS)
{
    MMA_OUT
    mma_ring<false>(w, xs, scale, norm_x, x_stride, eps, flags, rows, cols, n_tok, parts, tickets, part_sums, o,
                    plain != 0);
}

// The same by warpgroup mmas, x laid out MMA_OPERANDS for 64 tokens: Hopper's (sm_90a) alone,
// empty elsewhere (the host takes it only there).
extern "C" __global__ void __launch_bounds__(256, 2)
    mma_wg_bf16(const unsigned char* __restrict__ w, const unsigned char* __restrict__ xs, const unsigned* lo,
                MMA_PRODUCT_ARGS)
{
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    MMA_OUT
    mma_ring<true>(w, xs, scale, norm_x, x_stride, eps, flags, rows, cols, n_tok, parts, tickets, part_sums, o,
                   plain != 0);
#endif
}

// The same for 9 to 16 and 17 to 32 tokens: warpgroup mmas of N = 16 or 32 tokens, x laid out
// MMA_OPERANDS + 2 or + 1 (operands of N tokens), stages as many as two blocks an SM hold
// (MMA_WG16_STAGES, MMA_WG32_STAGES: constants.cuh). Empty before sm_90a.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define MMA_WG_FEW(N, R)                                                                          \
    MMA_OUT                                                                                       \
    mma_ring<true, R, N>(w, xs, scale, norm_x, x_stride, eps, flags, rows, cols, n_tok, parts, tickets, part_sums, \
                         o, plain != 0);
#else
#define MMA_WG_FEW(N, R)
#endif

extern "C" __global__ void __launch_bounds__(256, 2)
    mma_wg_bf16_16(const unsigned char* __restrict__ w, const unsigned char* __restrict__ xs, const unsigned* lo,
                   MMA_PRODUCT_ARGS)
{
    MMA_WG_FEW(16, MMA_WG16_STAGES)
}

extern "C" __global__ void __launch_bounds__(256, 2)
    mma_wg_bf16_32(const unsigned char* __restrict__ w, const unsigned char* __restrict__ xs, const unsigned* lo,
                   MMA_PRODUCT_ARGS)
{
    MMA_WG_FEW(32, MMA_WG32_STAGES)
}
