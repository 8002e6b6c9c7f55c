// C[m x n] = A[m x k] * B[k x n], all row-major f32.
//
// One block of 256 threads computes a 128 x 128 tile of C; each thread owns an 8 x 8
// micro-tile. Tiles of A and B pass through shared memory 8 columns of k at a time, so each
// element of A and B is read from memory ceil(n / 128) and ceil(m / 128) times: few enough
// that operands can stay in (registered, host-resident) guest memory.
//
// Each C element sums its k products in increasing k order: the result is bitwise the same
// on every run.

#define TILE_M 128
#define TILE_N 128
#define TILE_K 8
#define MICRO 8
#define THREADS 256

extern "C" __global__ void __launch_bounds__(THREADS)
matmul_f32(const float* __restrict__ a, const float* __restrict__ b, float* __restrict__ c,
           unsigned m, unsigned n, unsigned k)
{
    __shared__ float a_tile[TILE_K][TILE_M + 4];  // transposed: a_tile[kk][row]
    __shared__ float b_tile[TILE_K][TILE_N];

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
        // A tile: 128 rows x 8 columns; consecutive threads walk along a row.
#pragma unroll
        for (int i = 0; i < (TILE_M * TILE_K) / THREADS; ++i) {
            unsigned idx = tid + i * THREADS;
            unsigned r = idx / TILE_K, kk = idx % TILE_K;
            unsigned gr = row0 + r, gk = k0 + kk;
            a_tile[kk][r] = (gr < m && gk < k) ? a[(size_t)gr * k + gk] : 0.0f;
        }
        // B tile: 8 rows x 128 columns; consecutive threads walk along a row.
#pragma unroll
        for (int i = 0; i < (TILE_K * TILE_N) / THREADS; ++i) {
            unsigned idx = tid + i * THREADS;
            unsigned kk = idx / TILE_N, cc = idx % TILE_N;
            unsigned gk = k0 + kk, gc = col0 + cc;
            b_tile[kk][cc] = (gk < k && gc < n) ? b[(size_t)gk * n + gc] : 0.0f;
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

#pragma unroll
    for (int i = 0; i < MICRO; ++i) {
        unsigned gr = row0 + ty * MICRO + i;
        if (gr >= m) continue;
#pragma unroll
        for (int j = 0; j < MICRO; ++j) {
            unsigned gc = col0 + tx * MICRO + j;
            if (gc < n) c[(size_t)gr * n + gc] = acc[i][j];
        }
    }
}
