// The weight-matrix kernels' entry points, compiled by NVRTC (with this folder's headers):
// what each computes, the block formats and the work split are in matvec.cuh.

#include "matvec.cuh"

// ---------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------

// matvec keeps at most 80 registers a thread so that 3 blocks (24 warps) share an SM: on an
// H100 this beat both 2 blocks (fewer loads in flight) and 4 (spills at 8 tokens).
#define WEIGHT_KERNELS(NAME, T)                                                                      \
    extern "C" __global__ void __launch_bounds__(256, 3)                                             \
        matvec_##NAME(const unsigned char* __restrict__ w, const float* __restrict__ x, float* y,   \
                      unsigned rows, unsigned cols, unsigned row_bytes, unsigned n_tok,              \
                      unsigned x_stride, unsigned y_stride, const float* residual, unsigned parts,  \
                      const float* norm_x, float eps, const float* g, float* yg, unsigned glu)       \
    {                                                                                                \
        matvec<T>(w, x, y, rows, cols, row_bytes, n_tok, x_stride, y_stride, residual, parts,        \
                  norm_x, eps, g, yg, glu);                                                          \
    }                                                                                                \
    extern "C" __global__ void __launch_bounds__(256, 3)                                             \
        matvec_out_##NAME(const unsigned char* __restrict__ w, const float* __restrict__ x,          \
                          float* y, unsigned rows, unsigned cols, unsigned row_bytes)                \
    {                                                                                                \
        matvec_out_rows<T, 1>(w, x, y, rows, cols, row_bytes);                                       \
    }                                                                                                \
    extern "C" __global__ void __launch_bounds__(256, 3)                                             \
        matvec_rows_##NAME(const unsigned char* __restrict__ w, const float* __restrict__ x, float* y, \
                           unsigned rows, unsigned cols, unsigned row_bytes, const float* residual,   \
                           unsigned parts, const float* norm_x, float eps, const float* g, float* yg, \
                           unsigned glu, unsigned rpw)                                                \
    {                                                                                                \
        matvec_rows_of<T>(w, x, y, rows, cols, row_bytes, residual, parts, norm_x, eps, g, yg, glu,  \
                          rpw);                                                                      \
    }                                                                                                \
    extern "C" __global__ void __launch_bounds__(256, 3)                                             \
        matvec_out_rows_##NAME(const unsigned char* __restrict__ w, const float* __restrict__ x,     \
                               float* y, unsigned rows, unsigned cols, unsigned row_bytes,           \
                               unsigned rpw)                                                         \
    {                                                                                                \
        matvec_out_rows_of<T>(w, x, y, rows, cols, row_bytes, rpw);                                  \
    }                                                                                                \
    extern "C" __global__ void __launch_bounds__(256)                                                \
        get_rows_##NAME(const unsigned char* __restrict__ w, const int* __restrict__ ids,            \
                        float* __restrict__ out, unsigned cols, unsigned row_bytes, unsigned n,      \
                        unsigned out_stride)                                                         \
    {                                                                                                \
        get_rows<T>(w, ids, out, cols, row_bytes, n, out_stride);                                    \
    }                                                                                                \
    extern "C" __global__ void __launch_bounds__(256)                                                \
        dequant_bf16_##NAME(const unsigned char* __restrict__ w, unsigned short* __restrict__ out,   \
                            unsigned rows, unsigned cols, unsigned row_bytes)                        \
    {                                                                                                \
        dequant_bf16<T>(w, out, rows, cols, row_bytes);                                              \
    }

// One type's kernels when MATVEC_TYPE is defined (0-7: matvec.cuh's WeightType),
// so that the types compile as separate programs side by side; every type otherwise.
#if !defined(MATVEC_TYPE)
#define MATVEC_TYPE_IS(n) 1
#else
#define MATVEC_TYPE_IS(n) (MATVEC_TYPE == (n))
#endif
#if MATVEC_TYPE_IS(0)
WEIGHT_KERNELS(f32, WeightType<0>::T)
#endif
#if MATVEC_TYPE_IS(1)
WEIGHT_KERNELS(f16, WeightType<1>::T)
#endif
#if MATVEC_TYPE_IS(2)
WEIGHT_KERNELS(bf16, WeightType<2>::T)
#endif
#if MATVEC_TYPE_IS(3)
WEIGHT_KERNELS(q8_0, WeightType<3>::T)
#endif
#if MATVEC_TYPE_IS(4)
WEIGHT_KERNELS(q4_0, WeightType<4>::T)
#endif
#if MATVEC_TYPE_IS(5)
WEIGHT_KERNELS(q4_1, WeightType<5>::T)
#endif
#if MATVEC_TYPE_IS(6)
WEIGHT_KERNELS(q4_k, WeightType<6>::T)
#endif
#if MATVEC_TYPE_IS(7)
WEIGHT_KERNELS(q6_k, WeightType<7>::T)
#endif
