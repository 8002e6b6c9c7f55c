// What the probes in this folder share: a check of every CUDA runtime call and, for kernels,
// programmatic dependent launch (a kernel may start while the one before it finishes, and
// waits for it where it reads that kernel's results).
#pragma once
#include <cstdio>
#include <cstdlib>

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
