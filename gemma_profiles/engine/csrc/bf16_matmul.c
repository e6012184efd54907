/*
 * y = x @ w.T for bfloat16 weights on a CPU with AVX-512 BF16, for a few rows of x (a decode
 * step, a short prompt).
 *
 * Built on first use by gemma_profiles/native.py (cc -O3 -fopenmp), loaded with ctypes;
 * OpenMP resolves to the libgomp torch already loaded, so both share one thread pool.
 *
 * Why: a decode step reads every weight once, so its time is the rate at which the weights
 * stream from memory.  oneDNN's packed bfloat16 product streams at 0.86-0.87 of a plain
 * sum()'s rate on the 2-core Zen 4 box of benchmarks/cpu_decode.py.  This kernel reads the
 * weight as it is stored - plain row-major (n x k), each thread a contiguous range of rows,
 * so one sequential stream per core - with VDPBF16PS (pairs of bfloat16 products summed
 * into float32 lanes), and streams at 0.85-0.89 of that rate from ordinary 4 KiB pages and
 * 0.92-0.94 from 2 MiB pages, where oneDNN's own copy cannot be put (gemma_profiles/packed.py;
 * 2b's decoder products interleaved in one process, memory at 84-89 GB/s).
 *
 * One row of w at a time against every row of x (up to four at once, so each 64-byte load
 * of w feeds four products); a single row of x gets four accumulators over k instead, so the
 * adds' latency does not bound it.  The row of w stays in L1/L2 while the rows of x pass.
 * Accumulation is float32 (as oneDNN's); y is rounded to bfloat16 (nearest even).  Columns
 * past a multiple of 32 are masked loads.
 */
#include "common.h"

#define AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

int gp_bf16_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
}

#define MASK32(k, i) ((k) - (i) >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1u << ((k) - (i))) - 1))
#define LOAD32(p, i, mask) ((__m512bh)_mm512_maskz_loadu_epi16((mask), (const uint16_t *)(p) + (i)))
#define DOT(acc, a, b) acc = _mm512_dpbf16_ps(acc, a, b)

/* The dot product of one row of w with one row of x, four accumulators over k. */
AVX512_BF16
static inline float dot1(const uint16_t *x, const uint16_t *w, int64_t k) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 128 <= k; i += 128) {
        DOT(a0, LOAD32(x, i, 0xffffffffu), LOAD32(w, i, 0xffffffffu));
        DOT(a1, LOAD32(x, i + 32, 0xffffffffu), LOAD32(w, i + 32, 0xffffffffu));
        DOT(a2, LOAD32(x, i + 64, 0xffffffffu), LOAD32(w, i + 64, 0xffffffffu));
        DOT(a3, LOAD32(x, i + 96, 0xffffffffu), LOAD32(w, i + 96, 0xffffffffu));
    }
    for (; i < k; i += 32) DOT(a0, LOAD32(x, i, MASK32(k, i)), LOAD32(w, i, MASK32(k, i)));
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

/* Four rows of w (w0..w3) with four rows of x (x0..x3): 16 accumulators, eight loads per 16
 * products (a short group repeats a row; its results are not stored). */
AVX512_BF16
static inline void dot44(const uint16_t *const xs[4], const uint16_t *const ws[4], int64_t k, float out[4][4]) {
    __m512 a[4][4];
    for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) a[i][j] = _mm512_setzero_ps();
#define STEP44(mask)                                                                              \
    do {                                                                                          \
        __m512bh w0 = LOAD32(ws[0], i, mask), w1 = LOAD32(ws[1], i, mask);                        \
        __m512bh w2 = LOAD32(ws[2], i, mask), w3 = LOAD32(ws[3], i, mask);                        \
        for (int m = 0; m < 4; ++m) {                                                             \
            __m512bh v = LOAD32(xs[m], i, mask);                                                  \
            DOT(a[m][0], v, w0);                                                                  \
            DOT(a[m][1], v, w1);                                                                  \
            DOT(a[m][2], v, w2);                                                                  \
            DOT(a[m][3], v, w3);                                                                  \
        }                                                                                         \
    } while (0)
    int64_t i = 0;
    for (; i + 32 <= k; i += 32) STEP44(0xffffffffu);
    if (i < k) STEP44(MASK32(k, i));
#undef STEP44
    for (int m = 0; m < 4; ++m)
        for (int j = 0; j < 4; ++j) out[m][j] = _mm512_reduce_add_ps(a[m][j]);
}

AVX512_BF16
static void matmul(const uint16_t *x, int64_t m_rows, int64_t k, const uint16_t *w, int64_t n, uint16_t *y) {
    if (m_rows == 1) {
#pragma omp parallel for schedule(static)
        for (int64_t r = 0; r < n; ++r) y[r] = f32_to_bf16(dot1(x, w + r * k, k));
        return;
    }
    int64_t blocks = (n + 3) / 4;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
        const uint16_t *ws[4];
        for (int j = 0; j < 4; ++j) ws[j] = w + (4 * b + j < n ? 4 * b + j : 4 * b) * k;
        for (int64_t m = 0; m < m_rows; m += 4) {
            const uint16_t *xs[4];
            for (int i = 0; i < 4; ++i) xs[i] = x + (m + i < m_rows ? m + i : m) * k;
            float out[4][4];
            dot44(xs, ws, k, out);
            for (int i = 0; i < 4 && m + i < m_rows; ++i)
                for (int j = 0; j < 4 && 4 * b + j < n; ++j) y[(m + i) * n + 4 * b + j] = f32_to_bf16(out[i][j]);
        }
    }
}

/*
 * x: m_rows x k bfloat16, row-major, contiguous.  w: n x k bfloat16, row-major, contiguous.
 * y: m_rows x n bfloat16 (float32 sums rounded to nearest even).
 * Returns 0; -1 on a CPU without AVX-512 BF16 or sizes out of range.  The entry point itself
 * is not compiled for AVX-512, so the check runs before any such instruction.
 */
int gp_bf16_matmul(const uint16_t *x, int64_t m_rows, int64_t k, const uint16_t *w, int64_t n, uint16_t *y) {
    if (!gp_bf16_supported() || k <= 0 || n <= 0 || m_rows <= 0) return -1;
    matmul(x, m_rows, k, w, n, y);
    return 0;
}
