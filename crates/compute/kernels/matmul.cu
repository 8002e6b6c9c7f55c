// C[m x n] = A[m x k] * B[k x n], all row-major f32, for operands that may live in
// registered host memory (an actor's guest memory) and be read by the GPU over PCIe.
//
// PCIe, not arithmetic, bounds this kernel when operands are host-resident: the GPU's L2 does
// not keep host lines, so every tile a block reads crosses the bus. Two things keep the bus
// traffic low:
//   - Thread-block clusters of 4 x 2 blocks share tiles through distributed shared memory:
//     the 4 blocks of a cluster row need the same A tile, so each fetches a quarter of it and
//     reads the other quarters from its neighbours; the 2 blocks of a cluster column share B
//     tiles the same way. A crosses the bus ceil(n/128)/4 times instead of ceil(n/128).
//   - Every global access is a whole 128-byte row segment per warp; the C tile is staged in
//     shared memory and written back in full rows.
//
// One block of 256 threads computes a 128 x 128 tile of C; each thread owns an 8 x 8
// micro-tile and sums its k products in increasing k order, so the result is bitwise the
// same on every run and for every grid.

// Cluster primitives in PTX (NVRTC ships no cooperative_groups headers).

// Barrier over every thread of every block in the cluster; orders shared-memory writes
// before it (release) with reads after it (acquire), across the cluster.
__device__ __forceinline__ void cluster_sync()
{
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}

// This block's coordinates inside its cluster.
__device__ __forceinline__ uint2 cluster_position()
{
    unsigned x, y;
    asm("mov.u32 %0, %%cluster_ctaid.x;" : "=r"(x));
    asm("mov.u32 %0, %%cluster_ctaid.y;" : "=r"(y));
    return make_uint2(x, y);
}

// The address of `p` (in this block's shared memory) in the shared memory of block `rank` of
// the cluster, as a generic pointer.
__device__ __forceinline__ const float* cluster_peer(const float* p, unsigned rank)
{
    unsigned long long peer;
    asm volatile("mapa.u64 %0, %1, %2;" : "=l"(peer) : "l"(p), "r"(rank));
    return reinterpret_cast<const float*>(peer);
}

#define TILE_M 128
#define TILE_N 128
#define TILE_K 32
#define MICRO 8
#define THREADS 256
#define CLUSTER_X 4  // blocks along n sharing A tiles
#define CLUSTER_Y 2  // blocks along m sharing B tiles
#define A_PART (TILE_M / CLUSTER_X)  // rows of the A tile this block fetches
#define B_PART (TILE_K / CLUSTER_Y)  // rows of the B tile this block fetches
#define C_CHUNK 32                   // rows of C staged at a time

extern "C" __global__ void __cluster_dims__(CLUSTER_X, CLUSTER_Y, 1) __launch_bounds__(THREADS)
matmul_f32(const float* __restrict__ a, const float* __restrict__ b, float* __restrict__ c,
           unsigned m, unsigned n, unsigned k)
{
    // What this block fetched for its cluster, read by its neighbours.
    __shared__ float a_part[A_PART][TILE_K];
    __shared__ float b_part[B_PART][TILE_N];
    // The full tiles this block computes on; a_tile is transposed and padded against bank
    // conflicts. Reused to stage C at the end.
    __shared__ float tiles[TILE_K * (TILE_M + 1) + TILE_K * TILE_N];
    float (*a_tile)[TILE_M + 1] = reinterpret_cast<float (*)[TILE_M + 1]>(tiles);
    float (*b_tile)[TILE_N] = reinterpret_cast<float (*)[TILE_N]>(tiles + TILE_K * (TILE_M + 1));

    const uint2 at = cluster_position();
    const unsigned tid = threadIdx.x;
    const unsigned row0 = blockIdx.y * TILE_M;
    const unsigned col0 = blockIdx.x * TILE_N;
    const unsigned ty = tid / (TILE_N / MICRO);  // 0..15
    const unsigned tx = tid % (TILE_N / MICRO);  // 0..15

    float acc[MICRO][MICRO];
#pragma unroll
    for (int i = 0; i < MICRO; ++i)
#pragma unroll
        for (int j = 0; j < MICRO; ++j) acc[i][j] = 0.0f;

    for (unsigned k0 = 0; k0 < k; k0 += TILE_K) {
        cluster_sync();  // every neighbour is done reading the previous parts
        // My quarter of the A tile: rows at.x*32.. of this block's 128, 32 columns of k.
#pragma unroll
        for (int i = 0; i < (A_PART * TILE_K) / THREADS; ++i) {
            unsigned idx = tid + i * THREADS;
            unsigned r = idx / TILE_K, kk = idx % TILE_K;
            unsigned gr = row0 + at.x * A_PART + r, gk = k0 + kk;
            a_part[r][kk] = (gr < m && gk < k) ? a[(size_t)gr * k + gk] : 0.0f;
        }
        // My half of the B tile: rows at.y*16.. of the 32, 128 columns.
#pragma unroll
        for (int i = 0; i < (B_PART * TILE_N) / THREADS; ++i) {
            unsigned idx = tid + i * THREADS;
            unsigned kk = idx / TILE_N, cc = idx % TILE_N;
            unsigned gk = k0 + at.y * B_PART + kk, gc = col0 + cc;
            b_part[kk][cc] = (gk < k && gc < n) ? b[(size_t)gk * n + gc] : 0.0f;
        }
        cluster_sync();  // every part of this step is in place
        // Gather the full A tile from the 4 blocks of my cluster row, B from my column.
        for (unsigned q = 0; q < CLUSTER_X; ++q) {
            const float* src = cluster_peer(&a_part[0][0], q + at.y * CLUSTER_X);
#pragma unroll
            for (int i = 0; i < (A_PART * TILE_K) / THREADS; ++i) {
                unsigned idx = tid + i * THREADS;
                unsigned r = idx / TILE_K, kk = idx % TILE_K;
                a_tile[kk][q * A_PART + r] = src[idx];
            }
        }
        for (unsigned q = 0; q < CLUSTER_Y; ++q) {
            const float* src = cluster_peer(&b_part[0][0], at.x + q * CLUSTER_X);
#pragma unroll
            for (int i = 0; i < (B_PART * TILE_N) / THREADS; ++i) {
                unsigned idx = tid + i * THREADS;
                b_tile[q * B_PART + idx / TILE_N][idx % TILE_N] = src[idx];
            }
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < TILE_K; ++kk) {
            float a_frag[MICRO], b_frag[MICRO];
#pragma unroll
            for (int i = 0; i < MICRO; ++i) a_frag[i] = a_tile[kk][ty * MICRO + i];
#pragma unroll
            for (int j = 0; j < MICRO; ++j) b_frag[j] = b_tile[kk][tx * MICRO + j];
#pragma unroll
            for (int i = 0; i < MICRO; ++i)
#pragma unroll
                for (int j = 0; j < MICRO; ++j) acc[i][j] += a_frag[i] * b_frag[j];
        }
        __syncthreads();
    }
    cluster_sync();  // no neighbour reads my parts any more; the cluster may retire

    // Write C through shared memory, 32 rows at a time, in whole rows.
    float (*c_stage)[TILE_N] = reinterpret_cast<float (*)[TILE_N]>(tiles);
    for (unsigned chunk = 0; chunk < TILE_M / C_CHUNK; ++chunk) {
        if (ty * MICRO / C_CHUNK == chunk) {
#pragma unroll
            for (int i = 0; i < MICRO; ++i)
#pragma unroll
                for (int j = 0; j < MICRO; ++j)
                    c_stage[(ty * MICRO + i) % C_CHUNK][tx * MICRO + j] = acc[i][j];
        }
        __syncthreads();
        for (unsigned idx = tid; idx < C_CHUNK * TILE_N; idx += THREADS) {
            unsigned gr = row0 + chunk * C_CHUNK + idx / TILE_N, gc = col0 + idx % TILE_N;
            if (gr < m && gc < n) c[(size_t)gr * n + gc] = c_stage[idx / TILE_N][idx % TILE_N];
        }
        __syncthreads();
    }
}
