/* Grouped GEMV for CPU MoE decode: y[r, :] = x[r, :] @ W[e(r)].T for rows grouped by expert.
 *
 * Decode batches give each expert a handful of rows, so the work is reading the expert weights once; the
 * FLOPs are few. This kernel streams every weight byte of the experts that received rows exactly once, in
 * address order, and does only the routed FLOPs (oneDNN has no grouped GEMM: one call per expert costs
 * ~13 us each, and one dense GEMM over all experts does E/top_k times the FLOPs and turns compute-bound).
 *
 * Weight layout (built by pd/layers/cpu_grouped_gemv.py): [N/16][E][K][16] float32, i.e. for each block of
 * 16 output features, every expert's [K, 16] panel in turn. Work items are (block, expert) panels taken in
 * that order, split evenly over the threads, so each thread reads one contiguous stretch of memory (minus
 * the experts without rows) and every thread does about the same number of rows.
 *
 * Plain C with GCC/Clang vector extensions; built with -O3 -march=native -fopenmp. Linked against the
 * process's libgomp.so.1 (the one torch loaded), so its threads are torch's threads.
 */
#include <stdint.h>

#define BLOCK 16 /* output features per panel: one 512-bit vector of float32 */
#define MAX_ROWS 4 /* rows computed per pass over a panel: 4 x 2 accumulators stay in registers */

typedef float vec16 __attribute__((vector_size(64)));
/* the same vector for loads: panels are 64-byte aligned when torch allocates them, but nothing here relies on it */
typedef float vec16_unaligned __attribute__((vector_size(64), aligned(4)));

/* rows x [K] times one [K, 16] panel. Two accumulators per row (even and odd k) hide the FMA latency. */
static inline __attribute__((always_inline)) void panel_rows(const int rows, const float *restrict x, int64_t K,
                                                             const float *restrict panel, float *restrict y,
                                                             int64_t N) {
    vec16 even[MAX_ROWS], odd[MAX_ROWS];
    for (int i = 0; i < rows; i++) {
        even[i] = (vec16){0};
        odd[i] = (vec16){0};
    }
    int64_t k = 0;
    for (; k + 1 < K; k += 2) {
        vec16 w0 = *(const vec16_unaligned *)(panel + k * BLOCK);
        vec16 w1 = *(const vec16_unaligned *)(panel + (k + 1) * BLOCK);
        for (int i = 0; i < rows; i++) {
            even[i] += x[i * K + k] * w0;
            odd[i] += x[i * K + k + 1] * w1;
        }
    }
    if (k < K) { /* odd K */
        vec16 w0 = *(const vec16_unaligned *)(panel + k * BLOCK);
        for (int i = 0; i < rows; i++) even[i] += x[i * K + k] * w0;
    }
    for (int i = 0; i < rows; i++) {
        vec16 sum = even[i] + odd[i];
        for (int j = 0; j < BLOCK; j++) y[i * N + j] = sum[j]; /* y rows need not be 64-byte aligned */
    }
}

/* x: [M, K] rows sorted by expert; row_offsets: [E + 1], expert e owns rows [row_offsets[e], row_offsets[e+1]);
 * weights: [N/16][E][K][16]; y: [M, N]. N must be a multiple of 16. */
void grouped_gemv_f32(const float *x, int64_t K, const float *weights, int64_t N, const int64_t *row_offsets,
                      int64_t E, float *y, int num_threads) {
    const int64_t num_blocks = N / BLOCK;
    int64_t hit[E > 0 ? E : 1];
    int64_t num_hit = 0;
    for (int64_t e = 0; e < E; e++)
        if (row_offsets[e + 1] > row_offsets[e]) hit[num_hit++] = e;
    const int64_t num_items = num_blocks * num_hit;
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t item = 0; item < num_items; item++) {
        const int64_t block = item / num_hit, e = hit[item % num_hit];
        const float *panel = weights + (block * E + e) * K * BLOCK;
        for (int64_t r = row_offsets[e]; r < row_offsets[e + 1]; r += MAX_ROWS) {
            const int64_t left = row_offsets[e + 1] - r;
            const float *xr = x + r * K;
            float *yr = y + r * N + block * BLOCK;
            /* constant row counts so each call compiles to straight-line register code */
            switch (left < MAX_ROWS ? left : MAX_ROWS) {
            case 1: panel_rows(1, xr, K, panel, yr, N); break;
            case 2: panel_rows(2, xr, K, panel, yr, N); break;
            case 3: panel_rows(3, xr, K, panel, yr, N); break;
            default: panel_rows(4, xr, K, panel, yr, N); break;
            }
        }
    }
}
