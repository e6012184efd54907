/*
 * y = x @ w.T for bfloat16 weights on a CPU with AVX-512 BF16, or AVX2 + FMA (below), for a few
 * rows of x (a decode step, a short prompt).
 *
 * Built on first use by gemma_profiles/engine/build.py (cc -O3 -fopenmp), loaded with ctypes;
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
 *
 * On a CPU with AVX2 + FMA but no AVX-512 BF16 (Haswell, Zen 1-3), the same product in 8-lane
 * float32 FMAs: x is widened once into a float32 scratch (per 16 columns, the even columns then
 * the odd ones), so a 32-byte load of w gives two float32 vectors with one shift (even columns:
 * each 32-bit lane shifted left 16) and one AND (odd columns: the high half kept) - no
 * cross-lane widening.  Four rows of w per pass share every load of x; a single row of x keeps
 * even and odd sums apart (eight accumulators, enough to cover the FMA latency), more rows go
 * three at a time (twelve accumulators, x read straight from the scratch as memory operands);
 * a single row of x against rows shorter than ONE_ROW_K goes one row of w at a time (dot11).
 * Columns past a multiple of 16 are 8-lane loads through a zeroed buffer (common.h's load8).
 */
#include "common.h"

#include <stdlib.h>

#define AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

static int avx512_bf16(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
}

/* 2: the AVX-512 BF16 path runs here; 1: the AVX2 + FMA path; 0: neither (gemma_profiles.engine.kernels
 * reads which, for the rows it sends to the kernel). */
int gp_bf16_supported(void) {
    if (avx512_bf16()) return 2;
    return gp_avx2_fma() ? 1 : 0;
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
static void matmul_avx512(const uint16_t *x, int64_t m_rows, int64_t k, const uint16_t *w, int64_t n, uint16_t *y) {
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

/* ---- AVX2 + FMA ------------------------------------------------------------------------ */

/* Columns of the scratch for k columns: whole blocks of 16, then the tail rounded up to 8. */
static inline int64_t scratch_cols(int64_t k) { return k / 16 * 16 + (k % 16 + 7) / 8 * 8; }

/* One row of x (bfloat16) as float32 into xs: each whole block of 16 columns as its 8 even
 * columns then its 8 odd ones (the order a shift and an AND of w's 32-bit lanes give), the
 * tail in order, zero-padded to scratch_cols(k). */
AVX2_BASE
static void widen_row(const uint16_t *x, int64_t k, float *xs) {
    const __m256i high = _mm256_set1_epi32((int)0xffff0000u);
    int64_t full = k / 16 * 16, i = 0;
    for (; i < full; i += 16) {
        __m256i v = _mm256_loadu_si256((const __m256i *)(x + i));
        _mm256_storeu_si256((__m256i *)(xs + i), _mm256_slli_epi32(v, 16));
        _mm256_storeu_si256((__m256i *)(xs + i + 8), _mm256_and_si256(v, high));
    }
    for (; i < scratch_cols(k); ++i) xs[i] = i < k ? bf16_to_f32(x[i]) : 0.0f;
}

#define EVEN(p, i) _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_loadu_si256((const __m256i *)((p) + (i))), 16))
#define ODD(p, i) _mm256_castsi256_ps(_mm256_and_si256(_mm256_loadu_si256((const __m256i *)((p) + (i))), high))

/* One row of w with one widened row of x, four accumulators: for rows shorter than ONE_ROW_K
 * columns, which a decode step reads one row after another - a single sequential stream, which
 * the hardware prefetcher follows; four short rows read side by side are four streams of a few
 * cache lines each, too short for it (benchmarks/bf16_avx2.py's shapes, one thread, against a
 * float32 sum() of the same bytes: 640 columns 0.81-0.84x sum()'s rate one row at a time,
 * 0.51x four at a time; 1024 0.91 against 0.66; 1536 0.86/0.78; 2048 0.80/0.88). */
#define ONE_ROW_K 2048

AVX2_BASE
static inline float dot11(const float *xs, const uint16_t *w, int64_t k) {
    const __m256i high = _mm256_set1_epi32((int)0xffff0000u);
    __m256 e0 = _mm256_setzero_ps(), o0 = e0, e1 = e0, o1 = e0;
    int64_t full = k / 16 * 16, i = 0;
    for (; i + 32 <= full; i += 32) {
        e0 = _mm256_fmadd_ps(EVEN(w, i), _mm256_loadu_ps(xs + i), e0);
        o0 = _mm256_fmadd_ps(ODD(w, i), _mm256_loadu_ps(xs + i + 8), o0);
        e1 = _mm256_fmadd_ps(EVEN(w, i + 16), _mm256_loadu_ps(xs + i + 16), e1);
        o1 = _mm256_fmadd_ps(ODD(w, i + 16), _mm256_loadu_ps(xs + i + 24), o1);
    }
    if (i < full) {
        e0 = _mm256_fmadd_ps(EVEN(w, i), _mm256_loadu_ps(xs + i), e0);
        o0 = _mm256_fmadd_ps(ODD(w, i), _mm256_loadu_ps(xs + i + 8), o0);
        i += 16;
    }
    for (; i < k; i += 8) e1 = _mm256_fmadd_ps(load8(w, 1, i, k), _mm256_loadu_ps(xs + i), e1);
    return hsum8(_mm256_add_ps(_mm256_add_ps(e0, o0), _mm256_add_ps(e1, o1)));
}

/* Four rows of w (ws) with one widened row of x: eight accumulators (even and odd columns apart). */
AVX2_BASE
static inline void dot41(const float *xs, const uint16_t *const ws[4], int64_t k, float out[4]) {
    const __m256i high = _mm256_set1_epi32((int)0xffff0000u);
    __m256 e[4], o[4];
    for (int j = 0; j < 4; ++j) e[j] = o[j] = _mm256_setzero_ps();
    int64_t full = k / 16 * 16, i = 0;
    for (; i < full; i += 16) {
        __m256 xe = _mm256_loadu_ps(xs + i), xo = _mm256_loadu_ps(xs + i + 8);
        for (int j = 0; j < 4; ++j) {
            e[j] = _mm256_fmadd_ps(EVEN(ws[j], i), xe, e[j]);
            o[j] = _mm256_fmadd_ps(ODD(ws[j], i), xo, o[j]);
        }
    }
    for (; i < k; i += 8) {
        __m256 xv = _mm256_loadu_ps(xs + i);
        for (int j = 0; j < 4; ++j) e[j] = _mm256_fmadd_ps(load8(ws[j], 1, i, k), xv, e[j]);
    }
    for (int j = 0; j < 4; ++j) out[j] = hsum8(_mm256_add_ps(e[j], o[j]));
}

/* Four rows of w with MX (2 or 3) widened rows of x, xstride floats apart: 4 * MX accumulators,
 * x read from the scratch as the FMAs' memory operands. */
#define DOT4M(MX)                                                                                  \
    AVX2_BASE                                                                                      \
    static inline void dot4_##MX(const float *xs, int64_t xstride, const uint16_t *const ws[4],   \
                                 int64_t k, float out[][4]) {                                      \
        const __m256i high = _mm256_set1_epi32((int)0xffff0000u);                                  \
        __m256 a[MX][4];                                                                           \
        for (int m = 0; m < MX; ++m)                                                               \
            for (int j = 0; j < 4; ++j) a[m][j] = _mm256_setzero_ps();                             \
        int64_t full = k / 16 * 16, i = 0;                                                         \
        for (; i < full; i += 16) {                                                                \
            for (int j = 0; j < 4; ++j) {                                                          \
                __m256 we = EVEN(ws[j], i);                                                        \
                for (int m = 0; m < MX; ++m)                                                       \
                    a[m][j] = _mm256_fmadd_ps(we, _mm256_loadu_ps(xs + m * xstride + i), a[m][j]); \
                __m256 wo = ODD(ws[j], i);                                                         \
                for (int m = 0; m < MX; ++m)                                                       \
                    a[m][j] = _mm256_fmadd_ps(wo, _mm256_loadu_ps(xs + m * xstride + i + 8), a[m][j]); \
            }                                                                                      \
        }                                                                                          \
        for (; i < k; i += 8) {                                                                    \
            for (int j = 0; j < 4; ++j) {                                                          \
                __m256 wv = load8(ws[j], 1, i, k);                                                 \
                for (int m = 0; m < MX; ++m)                                                       \
                    a[m][j] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xs + m * xstride + i), a[m][j]); \
            }                                                                                      \
        }                                                                                          \
        for (int m = 0; m < MX; ++m)                                                               \
            for (int j = 0; j < 4; ++j) out[m][j] = hsum8(a[m][j]);                                \
    }
DOT4M(2)
DOT4M(3)
#undef DOT4M

AVX2_BASE
static void matmul_avx2(const float *xs, int64_t m_rows, int64_t k, const uint16_t *w, int64_t n, uint16_t *y) {
    int64_t xstride = scratch_cols(k), blocks = (n + 3) / 4;
    if (m_rows == 1 && k < ONE_ROW_K) {
#pragma omp parallel for schedule(static)
        for (int64_t r = 0; r < n; ++r) y[r] = f32_to_bf16(dot11(xs, w + r * k, k));
        return;
    }
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
        const uint16_t *ws[4];
        int rows = n - 4 * b < 4 ? (int)(n - 4 * b) : 4;
        for (int j = 0; j < 4; ++j) ws[j] = w + (4 * b + (j < rows ? j : 0)) * k; /* a short block repeats its first row */
        int64_t m = 0;
        while (m < m_rows) {
            float out[3][4];
            int group = m_rows - m >= 3 ? 3 : (int)(m_rows - m);
            if (group == 3)
                dot4_3(xs + m * xstride, xstride, ws, k, out);
            else if (group == 2)
                dot4_2(xs + m * xstride, xstride, ws, k, out);
            else
                dot41(xs + m * xstride, ws, k, out[0]);
            for (int i = 0; i < group; ++i)
                for (int j = 0; j < rows; ++j) y[(m + i) * n + 4 * b + j] = f32_to_bf16(out[i][j]);
            m += group;
        }
    }
}

/*
 * x: m_rows x k bfloat16, row-major, contiguous.  w: n x k bfloat16, row-major, contiguous.
 * y: m_rows x n bfloat16 (float32 sums rounded to nearest even).
 * Returns 0; -1 on a CPU with neither AVX-512 BF16 nor AVX2 + FMA, or sizes out of range; -2 when
 * the AVX2 path's scratch (m_rows x k float32) cannot be allocated.  The entry point itself is
 * compiled for neither, so the check runs before any such instruction.
 */
int gp_bf16_matmul(const uint16_t *x, int64_t m_rows, int64_t k, const uint16_t *w, int64_t n, uint16_t *y) {
    int path = gp_bf16_supported();
    if (!path || k <= 0 || n <= 0 || m_rows <= 0) return -1;
    if (path == 2) {
        matmul_avx512(x, m_rows, k, w, n, y);
        return 0;
    }
    int64_t cols = scratch_cols(k);
    float *xs = (float *)malloc(sizeof(float) * (size_t)(m_rows * cols));
    if (!xs) return -2;
    for (int64_t m = 0; m < m_rows; ++m) widen_row(x + m * k, k, xs + m * cols);
    matmul_avx2(xs, m_rows, k, w, n, y);
    free(xs);
    return 0;
}
