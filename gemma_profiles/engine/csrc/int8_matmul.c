/*
 * y = x @ (w * scale[:, None]).T for gemma's int8 layers on a CPU with AVX-512 VNNI.
 *
 * Built on first use by gemma_profiles/native.py (cc -O3 -fopenmp), loaded with ctypes;
 * OpenMP resolves to the libgomp torch already loaded, so both share one thread pool.
 *
 * Why: torch's _weight_int8pack_mm converts every int8 weight to float before its
 * multiply-add: ~17 GB/s of weights per core on the 2-core AVX-512 box of
 * benchmarks/cpu_decode.py, below what memory delivers, so an int8 decode step is
 * compute-bound.  Here the weights are never converted.  Each row of x is quantized once
 * per call to a 24-bit integer (per-row scale amax / (2^23 - 1): finer than bfloat16
 * activations for any value within 2^15 of the row's largest) and split into three byte
 * planes
 *     q = 65536 * h + 256 * m + l,    l, m in [0, 255], h in [-128, 127],
 * so that VPDPBUSD (unsigned byte x signed byte, four products summed into an int32 lane)
 * multiplies the int8 weights as they are: one instruction per plane per 64 weights.  The
 * top plane is stored as h + 128 (unsigned); 128 * sum(w) is taken back out with the
 * per-row weight sums the caller passes.  Integer sums are exact; the result is scaled in
 * double.
 *
 * Layout: w is packed once after loading (gemma_profiles/native.py) into blocks of four rows,
 * interleaved 64 bytes at a time, so each thread reads one sequential stream (four
 * interleaved row streams of a plain layout leave the hardware prefetcher behind: ~30%
 * slower here).  Wide weights (k > 4096, e.g. gemma's down_proj) are split into column
 * chunks of kc <= 4096 stored one after the other - [k/kc][n/4][kc/64][4][64], zero-padded
 * to multiples of 4 rows and kc columns; kc = k padded to 64 when k <= 4096 - so that the
 * activation planes of a chunk (3 * kc bytes) stay in L1 while its weights stream past:
 * with all of a 16384-wide row's planes (48 KiB) read from L2, the kernel streamed 10%
 * slower than on narrow weights.  Threads keep the same blocks in every chunk and carry
 * their rows' partial sums from chunk to chunk.
 *
 * Bounds: each int32 lane adds k/16 products of at most 255 * 128, and a row's sum adds 16
 * lanes, so k <= 32768 keeps every partial sum below 2^31 (checked).
 *
 * CPUs without AVX-512 VNNI but with AVX2 + FMA (Haswell and later, AMD Zen 1-3) take a second
 * path over the same packed layout: each int8 weight is widened to float32 in registers
 * (VPMOVSXBD + VCVTDQ2PS, eight at a time) and multiplied into float32 accumulators against
 * the activations widened once to float32.  torch's _weight_int8pack_mm, the alternative
 * there, converts the weights the same way but through memory, and reads them at ~4 GB/s on
 * the 2-core AVX2 box (docs/benchmarks.md); AVX2's byte product (VPMADDUBSW) saturates its
 * 16-bit pairs on the kernel's unsigned planes, so the exact-integer scheme above does not
 * carry over.  A product of an int8 and a bfloat16 value is exact in float32, so with
 * bfloat16 activations only the float32 sums round; results differ from the VNNI path's by
 * float32 rounding of the sums, not by the activations' 24-bit quantization.  Every entry point
 * checks the CPU and dispatches; neither path's instructions run on a CPU without them.
 */
#include <stdlib.h>

#include "common.h"

#define ROWS 4
/* Software prefetch distance.  On 2 MiB pages (gemma_profiles/hugepages.py), 2b's decoder and
 * embedder products interleaved in one process (8 runs of 40 rounds, medians): with memory at
 * ~50 GB/s 4096 bytes read 0.92-1.00 of the probe's rate, 1.5-3.5 points above 8192 in every
 * run (0.90-0.98); at 80+ GB/s 0.87-0.92 against 8192's 0.88-0.93; 2048 and 1024 fell behind
 * there (0.84-0.89, 0.81-0.85); no prefetch read 0.90-0.94 in slow runs. */
#define PREFETCH_BYTES 4096
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

static int vnni(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}

/* 1: AVX-512 VNNI (integer planes), 2: AVX2 + FMA (float32 accumulation), 0: neither. */
int gp_int8_path(void) { return vnni() ? 1 : gp_avx2_fma() ? 2 : 0; }

int gp_int8_supported(void) { return gp_int8_path() != 0; }

/* One row of x -> three byte planes of kp bytes (weights past k are loaded as 0); returns its scale. */
AVX512
static double quantize_row(const void *x, int bf16, int64_t k, int64_t kp, uint8_t *planes) {
    __m512 amax = _mm512_setzero_ps();
    for (int64_t i = 0; i < k; i += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(load16(x, bf16, i, MASK16(k, i))));
    float top = _mm512_reduce_max_ps(amax);
    memset(planes, 0, (size_t)(2 * kp));
    memset(planes + 2 * kp, 128, (size_t)kp); /* h + 128 for h = 0 */
    if (!(top > 0.0f) || top != top || top > 3.0e38f) return 0.0;
    const float qmax = 8388607.0f; /* 2^23 - 1 */
    __m512 inv = _mm512_set1_ps(qmax / top);
    __m512i lo = _mm512_set1_epi32(-8388607), hi = _mm512_set1_epi32(8388607), bias = _mm512_set1_epi32(128);
    for (int64_t i = 0; i < k; i += 16) {
        __mmask16 mask = MASK16(k, i);
        __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(load16(x, bf16, i, mask), inv));
        q = _mm512_max_epi32(_mm512_min_epi32(q, hi), lo);
        _mm_mask_storeu_epi8(planes + i, mask, _mm512_cvtepi32_epi8(q));
        _mm_mask_storeu_epi8(planes + kp + i, mask, _mm512_cvtepi32_epi8(_mm512_srai_epi32(q, 8)));
        _mm_mask_storeu_epi8(planes + 2 * kp + i, mask,
                             _mm512_cvtepi32_epi8(_mm512_add_epi32(_mm512_srai_epi32(q, 16), bias)));
    }
    return (double)top / (double)qmax;
}

static inline void finish(int64_t sl, int64_t sm, int64_t sh, int32_t wsum, double xscale, float scale, void *y,
                          int y_bf16, int64_t at) {
    double total = (double)((sh - 128 * (int64_t)wsum) * 65536 + sm * 256 + sl);
    float out = (float)(total * xscale) * scale;
    if (y_bf16)
        ((uint16_t *)y)[at] = f32_to_bf16(out);
    else
        ((float *)y)[at] = out;
}

#define DOT3(a, v)                              \
    a##l = _mm512_dpbusd_epi32(a##l, xl, v);    \
    a##m = _mm512_dpbusd_epi32(a##m, xm, v);    \
    a##h = _mm512_dpbusd_epi32(a##h, xh, v)
#define ZERO3(a) __m512i a##l = _mm512_setzero_si512(), a##m = _mm512_setzero_si512(), a##h = _mm512_setzero_si512()
/* The totals of four accumulators (one per row of a block), in one pass: two 128-bit-lane
 * transposing adds, then two in-lane ones - a third of the work of four separate reductions. */
AVX512
static inline __m128i sum4(__m512i a, __m512i b, __m512i c, __m512i d) {
    __m512i ab = _mm512_add_epi32(_mm512_shuffle_i32x4(a, b, 0x44), _mm512_shuffle_i32x4(a, b, 0xEE));
    __m512i cd = _mm512_add_epi32(_mm512_shuffle_i32x4(c, d, 0x44), _mm512_shuffle_i32x4(c, d, 0xEE));
    __m512i t = _mm512_add_epi32(_mm512_shuffle_i32x4(ab, cd, 0x88), _mm512_shuffle_i32x4(ab, cd, 0xDD));
    t = _mm512_add_epi32(t, _mm512_shuffle_epi32(t, (_MM_PERM_ENUM)0x4E));
    t = _mm512_add_epi32(t, _mm512_shuffle_epi32(t, (_MM_PERM_ENUM)0xB1));
    return _mm512_castsi512_si128(_mm512_permutexvar_epi32(_mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12, 8, 4, 0), t));
}

/* Block b of one column chunk of w (rows 4b..4b+3, kc columns from c0) against every row of
 * x: 12 accumulators in registers; the block stays in L2 across the rows of x, so w is read
 * from memory once whatever m_rows is.  Sums are added to acc (3 per row of x and of w) until
 * the last chunk, which finishes the rows; acc is NULL when there is one chunk. */
AVX512
static void block4(const uint8_t *planes, const double *xscale, int64_t m_rows, int64_t kp, int64_t c0, int64_t kc,
                   const int8_t *block, int64_t n0, int last, int32_t *acc, const float *scale, const int32_t *wsum,
                   void *y, int y_bf16, int64_t n) {
    for (int64_t m = 0; m < m_rows; ++m) {
        const uint8_t *pl = planes + m * 3 * kp + c0, *pm = pl + kp, *ph = pl + 2 * kp;
        ZERO3(a);
        ZERO3(b);
        ZERO3(c);
        ZERO3(d);
        for (int64_t i = 0; i < kc; i += 64) {
            const int8_t *at = block + i * ROWS;
            if (m == 0) { /* the stream PREFETCH_BYTES ahead; past the end these are hints, which never fault */
                _mm_prefetch((const char *)at + PREFETCH_BYTES, _MM_HINT_T0);
                _mm_prefetch((const char *)at + PREFETCH_BYTES + 64, _MM_HINT_T0);
                _mm_prefetch((const char *)at + PREFETCH_BYTES + 128, _MM_HINT_T0);
                _mm_prefetch((const char *)at + PREFETCH_BYTES + 192, _MM_HINT_T0);
            }
            __m512i xl = _mm512_load_si512(pl + i), xm = _mm512_load_si512(pm + i), xh = _mm512_load_si512(ph + i);
            __m512i v0 = _mm512_loadu_si512(at), v1 = _mm512_loadu_si512(at + 64);
            __m512i v2 = _mm512_loadu_si512(at + 128), v3 = _mm512_loadu_si512(at + 192);
            DOT3(a, v0);
            DOT3(b, v1);
            DOT3(c, v2);
            DOT3(d, v3);
        }
        int32_t sums[3][4];
        _mm_storeu_si128((__m128i *)sums[0], sum4(al, bl, cl, dl));
        _mm_storeu_si128((__m128i *)sums[1], sum4(am, bm, cm, dm));
        _mm_storeu_si128((__m128i *)sums[2], sum4(ah, bh, ch, dh));
        int64_t n4 = (n + ROWS - 1) / ROWS * ROWS;
        int32_t *carried = acc ? acc + (m * n4 + n0) * 3 : NULL; /* acc: m_rows x n4 x 3 */
        for (int r = 0; r < ROWS; ++r) {
            int32_t sl = sums[0][r], sm = sums[1][r], sh = sums[2][r];
            if (carried) {
                sl += carried[3 * r], sm += carried[3 * r + 1], sh += carried[3 * r + 2];
                if (!last) {
                    carried[3 * r] = sl, carried[3 * r + 1] = sm, carried[3 * r + 2] = sh;
                    continue;
                }
            }
            if (n0 + r < n) finish(sl, sm, sh, wsum[n0 + r], xscale[m], scale[n0 + r], y, y_bf16, m * n + n0 + r);
        }
    }
}

/* gp_int8_quantize_rows (below) on AVX-512. */
AVX512
static void quantize_rows512(const void *x, int x_bf16, int64_t n, int64_t k, int8_t *q, float *scale) {
    size_t row_bytes = (size_t)(x_bf16 ? 2 : 4) * (size_t)k;
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < n; ++r) {
        const void *row = (const char *)x + r * row_bytes;
        __m512 amax = _mm512_setzero_ps();
        for (int64_t i = 0; i < k; i += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(load16(row, x_bf16, i, MASK16(k, i))));
        float top = _mm512_reduce_max_ps(amax);
        float s = (top > 1e-12f ? top : 1e-12f) / 127.0f;
        __m512 vs = _mm512_set1_ps(s), lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
        for (int64_t i = 0; i < k; i += 16) {
            __mmask16 mask = MASK16(k, i);
            __m512 t = _mm512_div_ps(load16(row, x_bf16, i, mask), vs);
            t = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            t = _mm512_min_ps(_mm512_max_ps(t, lo), hi);
            _mm_mask_storeu_epi8(q + r * k + i, mask, _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(t)));
        }
        scale[r] = s;
    }
}

/* out[r] = sum of row r of w (n x k int8, row-major, plain layout): the kernel's correction
 * terms, without the int32 copy of w that torch's sum(dtype=int32) makes on a CPU. */
void gp_int8_row_sums(const int8_t *w, int64_t n, int64_t k, int32_t *out) {
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < n; ++r) {
        const int8_t *row = w + r * k;
        int32_t total = 0;
        for (int64_t i = 0; i < k; ++i) total += row[i];
        out[r] = total;
    }
}

/* gp_int8_dequantize (below) on AVX-512. */
AVX512
static void dequantize512(const int8_t *w, int64_t n, int64_t k, int64_t kc, const float *scale, void *y, int y_bf16) {
    int64_t blocks = (n + ROWS - 1) / ROWS, chunks = (k + kc - 1) / kc;
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < n; ++r) {
        __m512 s = _mm512_set1_ps(scale[r]);
        for (int64_t c = 0; c < chunks; ++c) {
            const int8_t *block = w + ((c * blocks + r / ROWS) * kc) * ROWS + (r % ROWS) * 64;
            for (int64_t j = 0; j < kc; j += 64) {
                const int8_t *src = block + j * ROWS;
                for (int64_t part = 0; part < 4; ++part) {
                    int64_t i = c * kc + j + part * 16;
                    if (i >= k) break;
                    __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(src + part * 16))));
                    store16((char *)y + r * k * (y_bf16 ? 2 : 4), y_bf16, i, _mm512_mul_ps(v, s), MASK16(k, i));
                }
            }
        }
    }
}


/* ---- the AVX2 + FMA path ------------------------------------------------------------- */

/* Eight int8 weights from p, widened to float32. */
#define WIDEN8(p) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p))))

/* The same operations as quantize_rows512 (and the loader's torch code), eight lanes at a time. */
AVX2_BASE
static void quantize_rows256(const void *x, int x_bf16, int64_t n, int64_t k, int8_t *q, float *scale) {
    size_t row_bytes = (size_t)(x_bf16 ? 2 : 4) * (size_t)k;
    const __m256 sign = _mm256_set1_ps(-0.0f);
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < n; ++r) {
        const void *row = (const char *)x + r * row_bytes;
        __m256 amax = _mm256_setzero_ps();
        for (int64_t i = 0; i < k; i += 8) amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, load8(row, x_bf16, i, k)));
        float top = hmax8(amax);
        float s = (top > 1e-12f ? top : 1e-12f) / 127.0f;
        __m256 vs = _mm256_set1_ps(s), lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
        for (int64_t i = 0; i < k; i += 8) {
            __m256 t = _mm256_div_ps(load8(row, x_bf16, i, k), vs);
            t = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            t = _mm256_min_ps(_mm256_max_ps(t, lo), hi);
            __m256i v = _mm256_cvtps_epi32(t);
            __m128i h = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
            int8_t bytes[16];
            _mm_storeu_si128((__m128i *)bytes, _mm_packs_epi16(h, h));
            memcpy(q + r * k + i, bytes, (size_t)(k - i < 8 ? k - i : 8));
        }
        scale[r] = s;
    }
}

AVX2_BASE
static void dequantize256(const int8_t *w, int64_t n, int64_t k, int64_t kc, const float *scale, void *y, int y_bf16) {
    int64_t blocks = (n + ROWS - 1) / ROWS, chunks = (k + kc - 1) / kc;
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < n; ++r) {
        __m256 s = _mm256_set1_ps(scale[r]);
        void *out = (char *)y + r * k * (y_bf16 ? 2 : 4);
        for (int64_t c = 0; c < chunks; ++c) {
            const int8_t *block = w + ((c * blocks + r / ROWS) * kc) * ROWS + (r % ROWS) * 64;
            for (int64_t j = 0; j < kc; j += 64) {
                const int8_t *src = block + j * ROWS;
                for (int64_t part = 0; part < 8; ++part) {
                    int64_t i = c * kc + j + part * 8;
                    if (i >= k) break;
                    store8(out, y_bf16, i, _mm256_mul_ps(WIDEN8(src + part * 8), s), k);
                }
            }
        }
    }
}

/* The result of one row of the block: carried to the next chunk, or scaled and stored. */
static inline void finish256(float total, int64_t m, int64_t row, int last, float *acc, int64_t n4, const float *scale,
                             void *y, int y_bf16, int64_t n) {
    if (acc) {
        total += acc[m * n4 + row];
        if (!last) {
            acc[m * n4 + row] = total;
            return;
        }
    }
    if (row >= n) return;
    float out = scale ? total * scale[row] : total;
    if (y_bf16)
        ((uint16_t *)y)[m * n + row] = f32_to_bf16(out);
    else
        ((float *)y)[m * n + row] = out;
}

/* Block b of one column chunk (rows 4b..4b+3, kc columns from c0) against every row of the
 * widened activations xf (m_rows x kp float32, zero past k).  Two rows of x at a time: each
 * eight weights are widened once and feed two products, eight FMA chains in flight (a single
 * row of x gets two chains per row of w instead).  The block stays in L1/L2 across the rows
 * of x, so w is read from memory once whatever m_rows is.  Partial sums are carried in acc
 * (m_rows x n4 floats) until the last chunk; acc is NULL when there is one chunk. */
#define PREFETCH_BLOCK(at)                                                          \
    do {                                                                            \
        _mm_prefetch((const char *)(at) + PREFETCH_BYTES, _MM_HINT_T0);             \
        _mm_prefetch((const char *)(at) + PREFETCH_BYTES + 64, _MM_HINT_T0);        \
        _mm_prefetch((const char *)(at) + PREFETCH_BYTES + 128, _MM_HINT_T0);       \
        _mm_prefetch((const char *)(at) + PREFETCH_BYTES + 192, _MM_HINT_T0);       \
    } while (0)
AVX2_BASE
static void block4_256(const float *xf, int64_t m_rows, int64_t kp, int64_t c0, int64_t kc, const int8_t *block,
                       int64_t n0, int last, float *acc, const float *scale, void *y, int y_bf16, int64_t n) {
    int64_t n4 = (n + ROWS - 1) / ROWS * ROWS;
    int64_t m = 0;
    for (; m + 2 <= m_rows; m += 2) {
        const float *xa = xf + m * kp + c0, *xb = xa + kp;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
        for (int64_t i = 0; i < kc; i += 64) {
            const int8_t *at = block + i * ROWS;
            if (m == 0) PREFETCH_BLOCK(at);
            for (int j = 0; j < 64; j += 8) {
                __m256 va = _mm256_loadu_ps(xa + i + j), vb = _mm256_loadu_ps(xb + i + j);
                __m256 w0 = WIDEN8(at + j), w1 = WIDEN8(at + 64 + j), w2 = WIDEN8(at + 128 + j), w3 = WIDEN8(at + 192 + j);
                a0 = _mm256_fmadd_ps(w0, va, a0);
                a1 = _mm256_fmadd_ps(w1, va, a1);
                a2 = _mm256_fmadd_ps(w2, va, a2);
                a3 = _mm256_fmadd_ps(w3, va, a3);
                b0 = _mm256_fmadd_ps(w0, vb, b0);
                b1 = _mm256_fmadd_ps(w1, vb, b1);
                b2 = _mm256_fmadd_ps(w2, vb, b2);
                b3 = _mm256_fmadd_ps(w3, vb, b3);
            }
        }
        __m256 as[ROWS] = {a0, a1, a2, a3}, bs[ROWS] = {b0, b1, b2, b3};
        for (int r = 0; r < ROWS; ++r) {
            finish256(hsum8(as[r]), m, n0 + r, last, acc, n4, scale, y, y_bf16, n);
            finish256(hsum8(bs[r]), m + 1, n0 + r, last, acc, n4, scale, y, y_bf16, n);
        }
    }
    if (m < m_rows) { /* one row of x (a decode step): two chains per row of w */
        const float *xm = xf + m * kp + c0;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
        for (int64_t i = 0; i < kc; i += 64) {
            const int8_t *at = block + i * ROWS;
            if (m == 0) PREFETCH_BLOCK(at);
            for (int j = 0; j < 64; j += 16) {
                __m256 x0 = _mm256_loadu_ps(xm + i + j), x1 = _mm256_loadu_ps(xm + i + j + 8);
                a0 = _mm256_fmadd_ps(WIDEN8(at + j), x0, a0);
                b0 = _mm256_fmadd_ps(WIDEN8(at + j + 8), x1, b0);
                a1 = _mm256_fmadd_ps(WIDEN8(at + 64 + j), x0, a1);
                b1 = _mm256_fmadd_ps(WIDEN8(at + 64 + j + 8), x1, b1);
                a2 = _mm256_fmadd_ps(WIDEN8(at + 128 + j), x0, a2);
                b2 = _mm256_fmadd_ps(WIDEN8(at + 128 + j + 8), x1, b2);
                a3 = _mm256_fmadd_ps(WIDEN8(at + 192 + j), x0, a3);
                b3 = _mm256_fmadd_ps(WIDEN8(at + 192 + j + 8), x1, b3);
            }
        }
        __m256 sums[ROWS] = {_mm256_add_ps(a0, b0), _mm256_add_ps(a1, b1), _mm256_add_ps(a2, b2), _mm256_add_ps(a3, b3)};
        for (int r = 0; r < ROWS; ++r) finish256(hsum8(sums[r]), m, n0 + r, last, acc, n4, scale, y, y_bf16, n);
    }
}

/* ---- scales per group of columns (AVX2 path only) ----------------------------------------
 * w ~= q * gscale[r][i / group]: gscale is n x (k / group) float32, group a multiple of 64
 * dividing kc (so no group straddles a chunk).  Each group's float32 sum is scaled once, by
 * an FMA into the row's total.  llama.cpp's Q8_0 keeps a scale per 32 weights; on the real
 * Gemma 3 270M groups of 64-128 columns take int8's error from per-row scales' to within the
 * issue's goal in float32 compute (docs/engine.md).
 *
 * One row of x (a decode step) runs four FMA chains, one per row of the block: still faster
 * than memory delivers the weights on one core.  The loop issues one FMA per cycle there, the
 * rate of the widening (VPMOVSXBD + VCVTDQ2PS), not a wait on the FMA latency: eight chains (two
 * per row of the block), with VPMOVSXBD or with in-lane VPSHUFB widening, measured 0.88-0.99x
 * its speed (docs/benchmarks.md).  Rows of x in pairs (a prompt) share each eight
 * widened weights, eight chains in flight, as block4_256 does; the group step adds one FMA per
 * eight (1/8 more than per-row scales), and the eight totals live in registers across groups.
 * Both loops put a row through the same FMAs in the same order - chains, group step, horizontal
 * sum - so a row's result does not depend on how many rows are beside it, bit for bit
 * (tests/test_native.py).  (Four rows of x, two rows of the block at a time, measured no faster
 * than two: benchmarks/int8_rows.py.) */

/* Two rows of x (xa, xb; kc columns from c0) against the block; totals ta, tb (one per row of
 * the block) carried in and out.  sp: each row of the block's group scales. */
AVX2_BASE
static void two_rows_grouped(const float *xa, const float *xb, int64_t c0, int64_t kc, const int8_t *block,
                             int prefetch, const float *const sp[ROWS], int64_t group, int64_t k, __m256 *ta,
                             __m256 *tb) {
    __m256 ta0 = ta[0], ta1 = ta[1], ta2 = ta[2], ta3 = ta[3], tb0 = tb[0], tb1 = tb[1], tb2 = tb[2], tb3 = tb[3];
    const float *s0 = sp[0], *s1 = sp[1], *s2 = sp[2], *s3 = sp[3];
    for (int64_t g0 = 0, gi = c0 / group; g0 < kc && c0 + g0 < k; g0 += group, ++gi) {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
        for (int64_t i = g0; i < g0 + group; i += 64) {
            const int8_t *at = block + i * ROWS;
            if (prefetch) PREFETCH_BLOCK(at);
            for (int j = 0; j < 64; j += 8) {
                __m256 va = _mm256_loadu_ps(xa + i + j), vb = _mm256_loadu_ps(xb + i + j);
                __m256 w = WIDEN8(at + j);
                a0 = _mm256_fmadd_ps(w, va, a0);
                b0 = _mm256_fmadd_ps(w, vb, b0);
                w = WIDEN8(at + 64 + j);
                a1 = _mm256_fmadd_ps(w, va, a1);
                b1 = _mm256_fmadd_ps(w, vb, b1);
                w = WIDEN8(at + 128 + j);
                a2 = _mm256_fmadd_ps(w, va, a2);
                b2 = _mm256_fmadd_ps(w, vb, b2);
                w = WIDEN8(at + 192 + j);
                a3 = _mm256_fmadd_ps(w, va, a3);
                b3 = _mm256_fmadd_ps(w, vb, b3);
            }
        }
        __m256 s = _mm256_broadcast_ss(s0 + gi);
        ta0 = _mm256_fmadd_ps(a0, s, ta0);
        tb0 = _mm256_fmadd_ps(b0, s, tb0);
        s = _mm256_broadcast_ss(s1 + gi);
        ta1 = _mm256_fmadd_ps(a1, s, ta1);
        tb1 = _mm256_fmadd_ps(b1, s, tb1);
        s = _mm256_broadcast_ss(s2 + gi);
        ta2 = _mm256_fmadd_ps(a2, s, ta2);
        tb2 = _mm256_fmadd_ps(b2, s, tb2);
        s = _mm256_broadcast_ss(s3 + gi);
        ta3 = _mm256_fmadd_ps(a3, s, ta3);
        tb3 = _mm256_fmadd_ps(b3, s, tb3);
    }
    ta[0] = ta0, ta[1] = ta1, ta[2] = ta2, ta[3] = ta3, tb[0] = tb0, tb[1] = tb1, tb[2] = tb2, tb[3] = tb3;
}

/* One row of x (xm) against the block: the same chains and group steps as one of two_rows_grouped's. */
AVX2_BASE
static void one_row_grouped(const float *xm, int64_t c0, int64_t kc, const int8_t *block, int prefetch,
                            const float *const sp[ROWS], int64_t group, int64_t k, __m256 *t) {
    __m256 t0 = t[0], t1 = t[1], t2 = t[2], t3 = t[3];
    for (int64_t g0 = 0, gi = c0 / group; g0 < kc && c0 + g0 < k; g0 += group, ++gi) {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t i = g0; i < g0 + group; i += 64) {
            const int8_t *at = block + i * ROWS;
            if (prefetch) PREFETCH_BLOCK(at);
            for (int j = 0; j < 64; j += 8) {
                __m256 xv = _mm256_loadu_ps(xm + i + j);
                a0 = _mm256_fmadd_ps(WIDEN8(at + j), xv, a0);
                a1 = _mm256_fmadd_ps(WIDEN8(at + 64 + j), xv, a1);
                a2 = _mm256_fmadd_ps(WIDEN8(at + 128 + j), xv, a2);
                a3 = _mm256_fmadd_ps(WIDEN8(at + 192 + j), xv, a3);
            }
        }
        t0 = _mm256_fmadd_ps(a0, _mm256_broadcast_ss(sp[0] + gi), t0);
        t1 = _mm256_fmadd_ps(a1, _mm256_broadcast_ss(sp[1] + gi), t1);
        t2 = _mm256_fmadd_ps(a2, _mm256_broadcast_ss(sp[2] + gi), t2);
        t3 = _mm256_fmadd_ps(a3, _mm256_broadcast_ss(sp[3] + gi), t3);
    }
    t[0] = t0, t[1] = t1, t[2] = t2, t[3] = t3;
}

/* Block b of one column chunk (rows n0..n0+3, kc columns from c0) against every row of xf, two
 * rows at a time and a last odd one alone; partial sums carried in acc as block4_256's. */
AVX2_BASE
static void block4_grouped(const float *xf, int64_t m_rows, int64_t kp, int64_t c0, int64_t kc, const int8_t *block,
                           int64_t n0, int last, float *acc, const float *gscale, int64_t group, void *y, int y_bf16,
                           int64_t n, int64_t k) {
    int64_t n4 = (n + ROWS - 1) / ROWS * ROWS, groups = k / group;
    /* each row's scales; a padding row (past n) borrows row n - 1's: its weights are zero, so its
     * sums stay zero, and it is never stored */
    const float *sp[ROWS];
    for (int r = 0; r < ROWS; ++r) sp[r] = gscale + (n0 + r < n ? n0 + r : n - 1) * groups;
    int64_t m = 0;
    for (; m + 2 <= m_rows; m += 2) {
        __m256 ta[ROWS], tb[ROWS];
        for (int r = 0; r < ROWS; ++r) ta[r] = tb[r] = _mm256_setzero_ps();
        two_rows_grouped(xf + m * kp + c0, xf + (m + 1) * kp + c0, c0, kc, block, m == 0, sp, group, k, ta, tb);
        for (int r = 0; r < ROWS; ++r) {
            finish256(hsum8(ta[r]), m, n0 + r, last, acc, n4, NULL, y, y_bf16, n);
            finish256(hsum8(tb[r]), m + 1, n0 + r, last, acc, n4, NULL, y, y_bf16, n);
        }
    }
    if (m < m_rows) {
        __m256 t[ROWS];
        for (int r = 0; r < ROWS; ++r) t[r] = _mm256_setzero_ps();
        one_row_grouped(xf + m * kp + c0, c0, kc, block, m == 0, sp, group, k, t);
        for (int r = 0; r < ROWS; ++r) finish256(hsum8(t[r]), m, n0 + r, last, acc, n4, NULL, y, y_bf16, n);
    }
}

/* The AVX2 product with per-row scales (scale) or per-group ones (gscale, group columns each). */
AVX2_BASE
static int matmul256_with(const void *x, int x_bf16, int64_t m_rows, int64_t k, const int8_t *w, int64_t n, int64_t kc,
                          const float *scale, const float *gscale, int64_t group, void *y, int y_bf16) {
    int64_t chunks = (k + kc - 1) / kc, kp = chunks * kc, blocks = (n + ROWS - 1) / ROWS;
    float *xf = aligned_alloc(64, sizeof(float) * (size_t)(m_rows * kp));
    float *acc = chunks > 1 ? calloc((size_t)(m_rows * blocks * ROWS), sizeof(float)) : NULL;
    if (!xf || (chunks > 1 && !acc)) {
        free(xf);
        free(acc);
        return -2;
    }
    size_t row_bytes = (size_t)(x_bf16 ? 2 : 4) * (size_t)k;
    for (int64_t m = 0; m < m_rows; ++m)
        for (int64_t i = 0; i < kp; i += 8)
            _mm256_store_ps(xf + m * kp + i, load8((const char *)x + m * row_bytes, x_bf16, i, k));
#pragma omp parallel
    for (int64_t c = 0; c < chunks; ++c) {
#pragma omp for schedule(static) nowait
        for (int64_t b = 0; b < blocks; ++b)
            if (gscale)
                block4_grouped(xf, m_rows, kp, c * kc, kc, w + (c * blocks + b) * ROWS * kc, b * ROWS, c == chunks - 1,
                               acc, gscale, group, y, y_bf16, n, k);
            else
                block4_256(xf, m_rows, kp, c * kc, kc, w + (c * blocks + b) * ROWS * kc, b * ROWS, c == chunks - 1, acc,
                           scale, y, y_bf16, n);
    }
    free(xf);
    free(acc);
    return 0;
}

/*
 * y = x @ (q * gscale per group).T on the AVX2 path: x m_rows x k (float32, or bfloat16 when
 * x_bf16); w packed as for gp_int8_matmul (chunks of kc columns); gscale n x (k / group) float32.
 * Returns 0; -1 when the AVX2 path does not run here, or k, kc, group out of range (group a
 * multiple of 64 dividing k and kc); -2 out of memory.
 */
int gp_int8_matmul_grouped(const void *x, int x_bf16, int64_t m_rows, int64_t k, const int8_t *w, int64_t n,
                           int64_t kc, const float *gscale, int64_t group, void *y, int y_bf16) {
    if (!gp_avx2_fma() || k <= 0 || k > 32768 || n <= 0 || m_rows <= 0 || kc <= 0 || kc % 64) return -1;
    if (group <= 0 || group % 64 || k % group || kc % group) return -1;
    return matmul256_with(x, x_bf16, m_rows, k, w, n, kc, NULL, gscale, group, y, y_bf16);
}

/* y = q * gscale per group, plain row-major (bfloat16 when y_bf16, else float32; rounded once
 * from float32), for a long prompt's float GEMM.  Returns -1 where gp_int8_matmul_grouped would. */
AVX2_BASE
static void dequantize_grouped256(const int8_t *w, int64_t n, int64_t k, int64_t kc, const float *gscale,
                                  int64_t group, void *y, int y_bf16) {
    int64_t blocks = (n + ROWS - 1) / ROWS, chunks = (k + kc - 1) / kc, groups = k / group;
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < n; ++r) {
        void *out = (char *)y + r * k * (y_bf16 ? 2 : 4);
        for (int64_t c = 0; c < chunks; ++c) {
            const int8_t *block = w + ((c * blocks + r / ROWS) * kc) * ROWS + (r % ROWS) * 64;
            for (int64_t j = 0; j < kc; j += 64) {
                int64_t i0 = c * kc + j;
                if (i0 >= k) break;
                __m256 s = _mm256_set1_ps(gscale[r * groups + i0 / group]);
                const int8_t *src = block + j * ROWS;
                for (int64_t part = 0; part < 8; ++part)
                    store8(out, y_bf16, i0 + part * 8, _mm256_mul_ps(WIDEN8(src + part * 8), s), k);
            }
        }
    }
}

int gp_int8_dequantize_grouped(const int8_t *w, int64_t n, int64_t k, int64_t kc, const float *gscale, int64_t group,
                               void *y, int y_bf16) {
    if (!gp_avx2_fma() || k <= 0 || n <= 0 || kc <= 0 || kc % 64 || group <= 0 || group % 64 || k % group ||
        kc % group)
        return -1;
    dequantize_grouped256(w, n, k, kc, gscale, group, y, y_bf16);
    return 0;
}

/* ---- entry points: check the CPU, then the path ----------------------------------------- */

/* Symmetric per-row int8, as gemma's int8 format: scale[r] = max(|x[r]|, 1e-12) / 127,
 * q[r][i] = round_half_even(x[r][i] / scale[r]) clamped to [-127, 127] - the same float32
 * operations, in the same order, as the loader's torch version, so the results are equal.
 * x: n x k float32, or bfloat16 when x_bf16, row-major.  Needs gp_int8_supported(). */
void gp_int8_quantize_rows(const void *x, int x_bf16, int64_t n, int64_t k, int8_t *q, float *scale) {
    int path = gp_int8_path();
    if (path == 1)
        quantize_rows512(x, x_bf16, n, k, q, scale);
    else if (path == 2)
        quantize_rows256(x, x_bf16, n, k, q, scale);
}

/*
 * y = w * scale[:, None], w (n x k) packed as above with chunks of kc columns, y plain
 * row-major (bfloat16 when y_bf16, else float32), rounded as torch's int8 * scaler: for
 * products with many rows of x (a prompt), where a float GEMM on the dequantized weight is
 * faster than either path's per-row work.  Needs gp_int8_supported().
 */
void gp_int8_dequantize(const int8_t *w, int64_t n, int64_t k, int64_t kc, const float *scale, void *y, int y_bf16) {
    int path = gp_int8_path();
    if (path == 1)
        dequantize512(w, n, k, kc, scale, y, y_bf16);
    else if (path == 2)
        dequantize256(w, n, k, kc, scale, y, y_bf16);
}

/*
 * x: m_rows x k (float32, or bfloat16 when x_bf16), row-major, contiguous.
 * w: n x k int8 packed as above, in column chunks of kc (a multiple of 64).
 * scale: n float32.  wsum: n int32 (each row of w summed).
 * y: m_rows x n (bfloat16 when y_bf16, else float32).
 * Returns 0; -1 on a CPU with neither path or k, kc out of range; -2 out of memory.
 * (wsum is read by the VNNI path only.)
 */
int gp_int8_matmul(const void *x, int x_bf16, int64_t m_rows, int64_t k, const int8_t *w, int64_t n, int64_t kc,
                   const float *scale, const int32_t *wsum, void *y, int y_bf16) {
    int path = gp_int8_path();
    if (!path || k <= 0 || k > 32768 || n <= 0 || m_rows <= 0 || kc <= 0 || kc % 64) return -1;
    if (path == 2) return matmul256_with(x, x_bf16, m_rows, k, w, n, kc, scale, NULL, 0, y, y_bf16);
    int64_t chunks = (k + kc - 1) / kc, kp = chunks * kc, blocks = (n + ROWS - 1) / ROWS;
    uint8_t *planes = aligned_alloc(64, (size_t)(m_rows * 3 * kp));
    double *xscale = malloc(sizeof(double) * (size_t)m_rows);
    int32_t *acc = chunks > 1 ? calloc((size_t)(m_rows * blocks * ROWS * 3), sizeof(int32_t)) : NULL;
    if (!planes || !xscale || (chunks > 1 && !acc)) {
        free(planes);
        free(xscale);
        free(acc);
        return -2;
    }
    size_t row_bytes = (size_t)(x_bf16 ? 2 : 4) * (size_t)k;
#pragma omp parallel for schedule(static) if (m_rows * k >= 65536)
    for (int64_t m = 0; m < m_rows; ++m)
        xscale[m] = quantize_row((const char *)x + m * row_bytes, x_bf16, k, kp, planes + m * 3 * kp);
#pragma omp parallel
    for (int64_t c = 0; c < chunks; ++c) {
        /* static schedule, same bounds in every chunk: each thread keeps its blocks, and the
         * partial sums it carries are its own - no barrier between chunks */
#pragma omp for schedule(static) nowait
        for (int64_t b = 0; b < blocks; ++b)
            block4(planes, xscale, m_rows, kp, c * kc, kc, w + (c * blocks + b) * ROWS * kc, b * ROWS, c == chunks - 1,
                   acc, scale, wsum, y, y_bf16, n);
    }
    free(planes);
    free(xscale);
    free(acc);
    return 0;
}
