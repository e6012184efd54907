/*
 * The small operations of a gemma decoder layer, one call each, for the `fused` builtin
 * (gemma_profiles/engine/fused.py): RMSNorm, gelu(gate) * up, the attention core (rotary
 * embedding, KV-cache write, scores, softcapping, mask, softmax, weighted values) and the
 * greedy sampler's argmax.
 *
 * Why: with the weights streamed near memory speed (int8_matmul.c, oneDNN packed weights),
 * gemma's own Python forward is the rest of a decode step - ~50 tensor ops a layer at
 * 2-5 us each, and bfloat16 kernels that are slow at these sizes (a 1 x 256 x 24 bf16 bmm
 * 44 us, argmax over 256000 bf16 logits 850 us on the 2-core box of benchmarks/) - 11 ms a
 * step for 2b, a quarter of the bandwidth bound.
 *
 * Numerics follow gemma's forward: float32 arithmetic, rounded to the model's dtype
 * (float32 or bfloat16) wherever gemma stores a tensor in it (rotated q and k, the scaled
 * q, scores, softcapping steps, probabilities, outputs), so results differ from gemma's
 * only by the order of float32 sums.  fused.py checks each kind against gemma's own
 * forward on the loaded model before using it.
 *
 * Two paths, chosen at run time by each entry point (gp_decode_path): AVX-512 (F, BW, VL),
 * 16 lanes, where the CPU has it; else AVX2 + FMA, 8 lanes (x86-64 since Haswell and Zen 1),
 * the same operations in the same order but for the width of the float32 sums.
 */
#include <math.h>
#include <stdlib.h>

#include "common.h"

#define DEAD_MASK (-1.0e30f) /* gemma masks with -2.3819763e38: exp() of it is exactly 0 */

static int has_avx512(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl");
}

static int avx2_only; /* gp_decode_use(2): the AVX2 path even on an AVX-512 CPU */

/* The path the entry points take: 1 AVX-512 (F, BW, VL), 2 AVX2 + FMA, 0 neither (callers
 * check gp_decode_supported() first; with neither, the entry points do nothing). */
int gp_decode_path(void) {
    if (has_avx512() && !avx2_only) return 1;
    return gp_avx2_fma() ? 2 : 0;
}

int gp_decode_supported(void) { return gp_decode_path() != 0; }

/* 0: choose by the CPU (AVX-512 where it runs); 2: the AVX2 path wherever it runs, so that an
 * AVX-512 machine tests it too.  Returns the path now taken (gp_decode_path). */
int gp_decode_use(int path) {
    avx2_only = path == 2;
    return gp_decode_path();
}

static inline float round_to(float x, int bf16) { return bf16 ? bf16_to_f32(f32_to_bf16(x)) : x; }

static inline void store1(void *y, int bf16, int64_t i, float v) {
    if (bf16)
        ((uint16_t *)y)[i] = f32_to_bf16(v);
    else
        ((float *)y)[i] = v;
}

/* e^x, 16 lanes: Cody-Waite reduction, degree-6 polynomial, exact scaling (~2e-7 relative).
 * Underflows to 0, overflows to inf, NaN stays NaN. */
AVX512_BASE
static inline __m512 exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_set1_ps(89.0f), _mm512_max_ps(_mm512_set1_ps(-104.0f), x));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/*
 * gemma's RMSNorm: y = (x * rsqrt(mean(x^2) + eps)) * (offset + w), in float32, y in x's dtype.
 * x, y: rows x d (float32, or bfloat16 when x_bf16), contiguous; w: d (bfloat16 when w_bf16).
 */
AVX512_BASE
static void rms_norm_512(const void *x, int x_bf16, int64_t rows, int64_t d, const void *w, int w_bf16,
                         float offset, float eps, void *y) {
    size_t row_bytes = (size_t)(x_bf16 ? 2 : 4) * (size_t)d;
#pragma omp parallel for schedule(static) if (rows * d >= 65536)
    for (int64_t r = 0; r < rows; ++r) {
        const char *row = (const char *)x + r * row_bytes;
        char *out = (char *)y + r * row_bytes;
        __m512 acc = _mm512_setzero_ps();
        for (int64_t i = 0; i < d; i += 16) {
            __m512 v = load16(row, x_bf16, i, MASK16(d, i));
            acc = _mm512_fmadd_ps(v, v, acc);
        }
        float inv = 1.0f / sqrtf(_mm512_reduce_add_ps(acc) / (float)d + eps);
        __m512 vinv = _mm512_set1_ps(inv), voff = _mm512_set1_ps(offset);
        for (int64_t i = 0; i < d; i += 16) {
            __mmask16 mask = MASK16(d, i);
            __m512 normed = _mm512_mul_ps(load16(row, x_bf16, i, mask), vinv);
            __m512 scale = _mm512_add_ps(voff, load16(w, w_bf16, i, mask));
            store16(out, x_bf16, i, _mm512_mul_ps(normed, scale), mask);
        }
    }
}

/*
 * gemma's MLP middle: y = gelu_tanh(gate) * up, gelu rounded to the dtype first as gemma's
 * F.gelu does.  gate, up, y: n elements (bfloat16 when bf16), contiguous.
 * gelu_tanh(g) = 0.5 g (1 + tanh(u)) = g / (1 + e^(-2u)),  u = sqrt(2/pi) (g + 0.044715 g^3).
 */
AVX512_BASE
static void gelu_mul_512(const void *gate, const void *up, int bf16, int64_t n, void *y) {
    const __m512 c0 = _mm512_set1_ps(-2.0f * 0.7978845608028654f), c1 = _mm512_set1_ps(0.044715f);
    const __m512 one = _mm512_set1_ps(1.0f);
#pragma omp parallel for schedule(static) if (n >= 262144)
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 mask = MASK16(n, i);
        __m512 g = load16(gate, bf16, i, mask);
        __m512 inner = _mm512_fmadd_ps(_mm512_mul_ps(c1, g), _mm512_mul_ps(g, g), g); /* g + 0.044715 g^3 */
        __m512 e = exp16(_mm512_mul_ps(c0, inner));
        __m512 gelu = round16(_mm512_div_ps(g, _mm512_add_ps(one, e)), bf16);
        store16(y, bf16, i, _mm512_mul_ps(gelu, load16(up, bf16, i, mask)), mask);
    }
}

/* Rotary embedding of one head (gemma pairs element i with element i + d/2), rounded to the dtype. */
static inline void rotate(const void *src, int bf16, int64_t d, const float *freqs, float *dst) {
    int64_t half = d / 2;
    for (int64_t i = 0; i < half; ++i) {
        float a = bf16 ? bf16_to_f32(((const uint16_t *)src)[i]) : ((const float *)src)[i];
        float b = bf16 ? bf16_to_f32(((const uint16_t *)src)[i + half]) : ((const float *)src)[i + half];
        float c = freqs[2 * i], s = freqs[2 * i + 1];
        dst[i] = round_to(a * c - b * s, bf16);
        dst[i + half] = round_to(a * s + b * c, bf16);
    }
}

static inline const void *at(const void *base, int bf16, int64_t offset) {
    return (const char *)base + offset * (bf16 ? 2 : 4);
}

/*
 * gemma's attention core for every query row of one call:
 *   rotate k, write k and v into the caches at positions[t]; for each (b, t, head):
 *   q = round(round(rotate(q)) * scaling); s_j = round(q . k_j) over the cache,
 *   softcapped as gemma does when softcap > 0; p = round(softmax(s + mask)); out = round(p @ v).
 *
 * q, k, v: element strides per batch and per token; each token's heads are contiguous
 *   (heads x head_dim for q, kv_heads x head_dim for k and v).
 * freqs: len x head_dim/2 x (cos, sin), float32 (view_as_real of gemma's freqs_cis rows).
 * caches: batch x max_seq x kv_heads x head_dim, contiguous, the model's dtype.
 * mask: float32, element strides per batch and per token, max_seq contiguous.
 * out: batch x len x heads x head_dim, contiguous.
 * Query head h reads kv head h / (heads / kv_heads), as gemma's repeat_interleave does.
 * Cache rows whose mask is below -1e30 are skipped (their probability is exactly 0 in
 * gemma too) unless a row has no other.  Returns 0; -1 for a position outside the cache
 * (nothing written), -2 out of memory.
 */
AVX512_BASE
static int attend_512(const void *q, int64_t q_bs, int64_t q_ts, const void *k, int64_t k_bs, int64_t k_ts,
                      const void *v, int64_t v_bs, int64_t v_ts, int64_t batch, int64_t len, int64_t heads,
                      int64_t kv_heads, int64_t head_dim, const float *freqs, const int64_t *positions,
                      void *k_cache, void *v_cache, int64_t max_seq, const float *mask, int64_t mask_bs,
                      int64_t mask_ts, float scaling, float softcap, int bf16, void *out) {
    for (int64_t t = 0; t < len; ++t)
        if (positions[t] < 0 || positions[t] >= max_seq) return -1;
    int64_t half = head_dim / 2, row = kv_heads * head_dim, group = heads / kv_heads;
    size_t elem = bf16 ? 2 : 4;
    int failed = 0;

    /* The new keys (rotated) and values, into the caches. */
    for (int64_t b = 0; b < batch; ++b)
        for (int64_t t = 0; t < len; ++t) {
            int64_t slot = (b * max_seq + positions[t]) * row;
            for (int64_t h = 0; h < kv_heads; ++h) {
                float rotated[head_dim];
                rotate(at(k, bf16, b * k_bs + t * k_ts + h * head_dim), bf16, head_dim, freqs + t * 2 * half,
                       rotated);
                for (int64_t i = 0; i < head_dim; ++i) store1(k_cache, bf16, slot + h * head_dim + i, rotated[i]);
            }
            memcpy((char *)v_cache + slot * elem, at(v, bf16, b * v_bs + t * v_ts), (size_t)row * elem);
        }

    int64_t tasks = batch * len * heads;
#pragma omp parallel if (tasks * max_seq * head_dim >= 131072)
    {
        float *scores = malloc(sizeof(float) * (size_t)max_seq);
        float *query = malloc(sizeof(float) * (size_t)head_dim);
        if (!scores || !query) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t task = 0; task < tasks; ++task) {
            if (!scores || !query) continue;
            int64_t b = task / (len * heads), t = (task / heads) % len, h = task % heads, kvh = h / group;
            rotate(at(q, bf16, b * q_bs + t * q_ts + h * head_dim), bf16, head_dim, freqs + t * 2 * half, query);
            for (int64_t i = 0; i < head_dim; ++i) query[i] = round_to(query[i] * scaling, bf16);
            const float *mrow = mask + b * mask_bs + t * mask_ts;
            int64_t live = 0;
            for (int64_t j = 0; j < max_seq; ++j) live += mrow[j] >= DEAD_MASK;
            float top = -INFINITY;
            for (int64_t j = 0; j < max_seq; ++j) {
                if (live && mrow[j] < DEAD_MASK) {
                    scores[j] = -INFINITY;
                    continue;
                }
                const void *key = at(k_cache, bf16, (b * max_seq + j) * row + kvh * head_dim);
                __m512 acc = _mm512_setzero_ps();
                for (int64_t i = 0; i < head_dim; i += 16) {
                    __mmask16 m16 = MASK16(head_dim, i);
                    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m16, query + i), load16(key, bf16, i, m16), acc);
                }
                float s = round_to(_mm512_reduce_add_ps(acc), bf16);
                if (softcap > 0.0f) s = round_to(round_to(tanhf(round_to(s / softcap, bf16)), bf16) * softcap, bf16);
                s += mrow[j];
                scores[j] = s;
                if (s > top || s != s) top = s;
            }
            /* Softmax: e^(s - top) (skipped rows: exactly 0), normalised, rounded as gemma's type_as. */
            __m512 vtop = _mm512_set1_ps(top), sum = _mm512_setzero_ps();
            for (int64_t j = 0; j < max_seq; j += 16) {
                __mmask16 m16 = MASK16(max_seq, j);
                __m512 sv = _mm512_maskz_loadu_ps(m16, scores + j);
                __mmask16 skip = _mm512_cmp_ps_mask(sv, _mm512_set1_ps(-INFINITY), _CMP_EQ_OQ);
                __m512 e = _mm512_maskz_mov_ps((__mmask16)(m16 & ~skip), exp16(_mm512_sub_ps(sv, vtop)));
                _mm512_mask_storeu_ps(scores + j, m16, e);
                sum = _mm512_add_ps(sum, e);
            }
            float total = _mm512_reduce_add_ps(sum);
            float accum[head_dim];
            memset(accum, 0, sizeof accum);
            for (int64_t j = 0; j < max_seq; ++j) {
                if (scores[j] == 0.0f) continue; /* skipped, or underflowed: adds nothing */
                __m512 p = _mm512_set1_ps(round_to(scores[j] / total, bf16));
                const void *value = at(v_cache, bf16, (b * max_seq + j) * row + kvh * head_dim);
                for (int64_t i = 0; i < head_dim; i += 16) {
                    __mmask16 m16 = MASK16(head_dim, i);
                    __m512 acc = _mm512_maskz_loadu_ps(m16, accum + i);
                    _mm512_mask_storeu_ps(accum + i, m16, _mm512_fmadd_ps(p, load16(value, bf16, i, m16), acc));
                }
            }
            char *dst = (char *)out + ((b * len + t) * heads + h) * head_dim * elem;
            for (int64_t i = 0; i < head_dim; i += 16) {
                __mmask16 m16 = MASK16(head_dim, i);
                store16(dst, bf16, i, _mm512_maskz_loadu_ps(m16, accum + i), m16);
            }
        }
        free(scores);
        free(query);
    }
    return failed ? -2 : 0;
}

/* Index of the first largest value in each row (a NaN counts as largest, as torch.argmax).
 * x: rows x n (bfloat16 when bf16), contiguous; out: rows int64. */
AVX512_BASE
static void argmax_512(const void *x, int bf16, int64_t rows, int64_t n, int64_t *out) {
    size_t row_bytes = (size_t)(bf16 ? 2 : 4) * (size_t)n;
    for (int64_t r = 0; r < rows; ++r) {
        const char *row = (const char *)x + r * row_bytes;
        __m512 best = _mm512_set1_ps(-INFINITY);
        int64_t nan_at = -1;
        for (int64_t i = 0; i < n; i += 16) {
            __m512 v = load16(row, bf16, i, MASK16(n, i));
            if (_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q)) {
                for (int64_t j = i; j < i + 16 && j < n; ++j) {
                    float f = bf16 ? bf16_to_f32(((const uint16_t *)row)[j]) : ((const float *)row)[j];
                    if (f != f) {
                        nan_at = j;
                        break;
                    }
                }
                break;
            }
            best = _mm512_mask_max_ps(best, MASK16(n, i), best, v);
        }
        if (nan_at >= 0) {
            out[r] = nan_at;
            continue;
        }
        /* the first index holding the maximum, 16 lanes at a time (a scalar scan took ~100 us
         * for 256 000 logits when the maximum sat mid-row) */
        __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(best));
        int64_t found = 0;
        for (int64_t i = 0; i < n; i += 16) {
            __mmask16 hit = _mm512_mask_cmp_ps_mask(MASK16(n, i), load16(row, bf16, i, MASK16(n, i)), top, _CMP_EQ_OQ);
            if (hit) {
                found = i + __builtin_ctz((unsigned)hit);
                break;
            }
        }
        out[r] = found;
    }
}

/* ---- AVX2 + FMA: the same operations, 8 lanes -----------------------------------------
 * For x86-64 CPUs without AVX-512 (Haswell, Zen 1-3, and Zen 4 / Intel desktop parts where
 * AVX-512 is absent or off).  Every function follows its AVX-512 twin above step for step -
 * the same float32 operations, the same roundings to the model's dtype - so the two paths
 * differ only in the order of float32 sums (8 lanes against 16). */

/* All-ones in the lanes of 8 from element i that lie before k. */
AVX2_BASE
static inline __m256 lanes8(int64_t i, int64_t k) {
    int64_t left = k - i < 8 ? k - i : 8;
    return _mm256_castsi256_ps(
        _mm256_cmpgt_epi32(_mm256_set1_epi32((int)left), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
}

/* e^x, 8 lanes: exp16's reduction and polynomial, bit for bit.  AVX2 has no scalef, so 2^n
 * is built in the exponent bits as 2^(n>>1) * 2^(n - (n>>1)): for n in [-150, 128] (x
 * clamped to [-104, 89]) both factors are normal floats, p * 2^(n>>1) is exact and the second
 * product rounds once, as scalef does - results below 2^-126 are the same subnormals, below
 * 2^-150 exactly 0, past FLT_MAX inf.  NaN stays NaN (the max/min keep it; p is NaN). */
AVX2_BASE
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_set1_ps(89.0f), _mm256_max_ps(_mm256_set1_ps(-104.0f), x));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.0f / 720.0f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    __m256i whole = _mm256_cvtps_epi32(n); /* a NaN lane gives INT_MIN: any scale, p is NaN */
    __m256i low = _mm256_srai_epi32(whole, 1), high = _mm256_sub_epi32(whole, low);
    const __m256i bias = _mm256_set1_epi32(127);
    __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(low, bias), 23));
    __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(high, bias), 23));
    return _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
}

AVX2_BASE
static void rms_norm_avx2(const void *x, int x_bf16, int64_t rows, int64_t d, const void *w, int w_bf16,
                          float offset, float eps, void *y) {
    size_t row_bytes = (size_t)(x_bf16 ? 2 : 4) * (size_t)d;
#pragma omp parallel for schedule(static) if (rows * d >= 65536)
    for (int64_t r = 0; r < rows; ++r) {
        const char *row = (const char *)x + r * row_bytes;
        char *out = (char *)y + r * row_bytes;
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(); /* two: the adds' latency */
        int64_t i = 0;
        for (; i + 16 <= d; i += 16) {
            __m256 v0 = load8(row, x_bf16, i, d), v1 = load8(row, x_bf16, i + 8, d);
            acc0 = _mm256_fmadd_ps(v0, v0, acc0);
            acc1 = _mm256_fmadd_ps(v1, v1, acc1);
        }
        for (; i < d; i += 8) {
            __m256 v = load8(row, x_bf16, i, d);
            acc0 = _mm256_fmadd_ps(v, v, acc0);
        }
        float inv = 1.0f / sqrtf(hsum8(_mm256_add_ps(acc0, acc1)) / (float)d + eps);
        __m256 vinv = _mm256_set1_ps(inv), voff = _mm256_set1_ps(offset);
        for (i = 0; i < d; i += 8) {
            __m256 normed = _mm256_mul_ps(load8(row, x_bf16, i, d), vinv);
            __m256 scale = _mm256_add_ps(voff, load8(w, w_bf16, i, d));
            store8(out, x_bf16, i, _mm256_mul_ps(normed, scale), d);
        }
    }
}

AVX2_BASE
static void gelu_mul_avx2(const void *gate, const void *up, int bf16, int64_t n, void *y) {
    const __m256 c0 = _mm256_set1_ps(-2.0f * 0.7978845608028654f), c1 = _mm256_set1_ps(0.044715f);
    const __m256 one = _mm256_set1_ps(1.0f);
#pragma omp parallel for schedule(static) if (n >= 262144)
    for (int64_t i = 0; i < n; i += 8) {
        __m256 g = load8(gate, bf16, i, n);
        __m256 inner = _mm256_fmadd_ps(_mm256_mul_ps(c1, g), _mm256_mul_ps(g, g), g); /* g + 0.044715 g^3 */
        __m256 e = exp8(_mm256_mul_ps(c0, inner));
        __m256 gelu = round8(_mm256_div_ps(g, _mm256_add_ps(one, e)), bf16);
        store8(y, bf16, i, _mm256_mul_ps(gelu, load8(up, bf16, i, n)), n);
    }
}

/* attend_512, 8 lanes.  The query and the running sum of values live in float buffers padded
 * to whole vectors with zeros, so only the cache rows need the tail-safe load8. */
AVX2_BASE
static int attend_avx2(const void *q, int64_t q_bs, int64_t q_ts, const void *k, int64_t k_bs, int64_t k_ts,
                       const void *v, int64_t v_bs, int64_t v_ts, int64_t batch, int64_t len, int64_t heads,
                       int64_t kv_heads, int64_t head_dim, const float *freqs, const int64_t *positions,
                       void *k_cache, void *v_cache, int64_t max_seq, const float *mask, int64_t mask_bs,
                       int64_t mask_ts, float scaling, float softcap, int bf16, void *out) {
    for (int64_t t = 0; t < len; ++t)
        if (positions[t] < 0 || positions[t] >= max_seq) return -1;
    int64_t half = head_dim / 2, row = kv_heads * head_dim, group = heads / kv_heads;
    int64_t padded = (head_dim + 7) / 8 * 8;
    size_t elem = bf16 ? 2 : 4;
    int failed = 0;

    /* The new keys (rotated) and values, into the caches. */
    for (int64_t b = 0; b < batch; ++b)
        for (int64_t t = 0; t < len; ++t) {
            int64_t slot = (b * max_seq + positions[t]) * row;
            for (int64_t h = 0; h < kv_heads; ++h) {
                float rotated[head_dim];
                rotate(at(k, bf16, b * k_bs + t * k_ts + h * head_dim), bf16, head_dim, freqs + t * 2 * half,
                       rotated);
                for (int64_t i = 0; i < head_dim; ++i) store1(k_cache, bf16, slot + h * head_dim + i, rotated[i]);
            }
            memcpy((char *)v_cache + slot * elem, at(v, bf16, b * v_bs + t * v_ts), (size_t)row * elem);
        }

    int64_t tasks = batch * len * heads;
#pragma omp parallel if (tasks * max_seq * head_dim >= 131072)
    {
        float *scores = malloc(sizeof(float) * (size_t)max_seq);
        float *query = calloc((size_t)padded, sizeof(float));
        if (!scores || !query) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t task = 0; task < tasks; ++task) {
            if (!scores || !query) continue;
            int64_t b = task / (len * heads), t = (task / heads) % len, h = task % heads, kvh = h / group;
            rotate(at(q, bf16, b * q_bs + t * q_ts + h * head_dim), bf16, head_dim, freqs + t * 2 * half, query);
            for (int64_t i = 0; i < head_dim; ++i) query[i] = round_to(query[i] * scaling, bf16);
            const float *mrow = mask + b * mask_bs + t * mask_ts;
            int64_t live = 0;
            for (int64_t j = 0; j < max_seq; ++j) live += mrow[j] >= DEAD_MASK;
            float top = -INFINITY;
            for (int64_t j = 0; j < max_seq; ++j) {
                if (live && mrow[j] < DEAD_MASK) {
                    scores[j] = -INFINITY;
                    continue;
                }
                const void *key = at(k_cache, bf16, (b * max_seq + j) * row + kvh * head_dim);
                __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
                int64_t i = 0;
                for (; i + 16 <= padded; i += 16) {
                    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(query + i), load8(key, bf16, i, head_dim), acc0);
                    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(query + i + 8), load8(key, bf16, i + 8, head_dim), acc1);
                }
                if (i < padded)
                    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(query + i), load8(key, bf16, i, head_dim), acc0);
                float s = round_to(hsum8(_mm256_add_ps(acc0, acc1)), bf16);
                if (softcap > 0.0f) s = round_to(round_to(tanhf(round_to(s / softcap, bf16)), bf16) * softcap, bf16);
                s += mrow[j];
                scores[j] = s;
                if (s > top || s != s) top = s;
            }
            /* Softmax: e^(s - top) (skipped rows: exactly 0), normalised, rounded as gemma's type_as. */
            __m256 vtop = _mm256_set1_ps(top), sum = _mm256_setzero_ps();
            const __m256 skipped = _mm256_set1_ps(-INFINITY);
            for (int64_t j = 0; j < max_seq; j += 8) {
                __m256 sv = load8(scores, 0, j, max_seq);
                __m256 keep = _mm256_andnot_ps(_mm256_cmp_ps(sv, skipped, _CMP_EQ_OQ), lanes8(j, max_seq));
                __m256 e = _mm256_and_ps(keep, exp8(_mm256_sub_ps(sv, vtop)));
                store8(scores, 0, j, e, max_seq);
                sum = _mm256_add_ps(sum, e);
            }
            float total = hsum8(sum);
            float accum[padded];
            memset(accum, 0, sizeof accum);
            for (int64_t j = 0; j < max_seq; ++j) {
                if (scores[j] == 0.0f) continue; /* skipped, or underflowed: adds nothing */
                __m256 p = _mm256_set1_ps(round_to(scores[j] / total, bf16));
                const void *value = at(v_cache, bf16, (b * max_seq + j) * row + kvh * head_dim);
                for (int64_t i = 0; i < padded; i += 8)
                    _mm256_storeu_ps(accum + i,
                                     _mm256_fmadd_ps(p, load8(value, bf16, i, head_dim), _mm256_loadu_ps(accum + i)));
            }
            char *dst = (char *)out + ((b * len + t) * heads + h) * head_dim * elem;
            for (int64_t i = 0; i < head_dim; i += 8) store8(dst, bf16, i, _mm256_loadu_ps(accum + i), head_dim);
        }
        free(scores);
        free(query);
    }
    return failed ? -2 : 0;
}

static inline float element(const void *row, int bf16, int64_t j) {
    return bf16 ? bf16_to_f32(((const uint16_t *)row)[j]) : ((const float *)row)[j];
}

/* argmax_512, 8 lanes: 32 values a step (four running maxima, one NaN test), the last n % 8 one by one. */
AVX2_BASE
static void argmax_avx2(const void *x, int bf16, int64_t rows, int64_t n, int64_t *out) {
    size_t row_bytes = (size_t)(bf16 ? 2 : 4) * (size_t)n;
    for (int64_t r = 0; r < rows; ++r) {
        const char *row = (const char *)x + r * row_bytes;
        __m256 b0 = _mm256_set1_ps(-INFINITY), b1 = b0, b2 = b0, b3 = b0;
        int64_t i = 0;
        int nan = 0;
        for (; i + 32 <= n; i += 32) {
            __m256 v0 = load8(row, bf16, i, n), v1 = load8(row, bf16, i + 8, n);
            __m256 v2 = load8(row, bf16, i + 16, n), v3 = load8(row, bf16, i + 24, n);
            __m256 odd01 = _mm256_or_ps(_mm256_cmp_ps(v0, v0, _CMP_UNORD_Q), _mm256_cmp_ps(v1, v1, _CMP_UNORD_Q));
            __m256 odd23 = _mm256_or_ps(_mm256_cmp_ps(v2, v2, _CMP_UNORD_Q), _mm256_cmp_ps(v3, v3, _CMP_UNORD_Q));
            if (_mm256_movemask_ps(_mm256_or_ps(odd01, odd23))) {
                nan = 1;
                break;
            }
            b0 = _mm256_max_ps(b0, v0);
            b1 = _mm256_max_ps(b1, v1);
            b2 = _mm256_max_ps(b2, v2);
            b3 = _mm256_max_ps(b3, v3);
        }
        for (; !nan && i + 8 <= n; i += 8) {
            __m256 v = load8(row, bf16, i, n);
            if (_mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q))) {
                nan = 1;
                break;
            }
            b0 = _mm256_max_ps(b0, v);
        }
        float top = hmax8(_mm256_max_ps(_mm256_max_ps(b0, b1), _mm256_max_ps(b2, b3)));
        for (; !nan && i < n; ++i) {
            float f = element(row, bf16, i);
            if (f != f) {
                nan = 1;
                break;
            }
            if (f > top) top = f;
        }
        if (nan) { /* the first NaN (a NaN counts as largest, as torch.argmax), at or after i */
            while (element(row, bf16, i) == element(row, bf16, i)) ++i;
            out[r] = i;
            continue;
        }
        /* the first index holding the maximum */
        __m256 vtop = _mm256_set1_ps(top);
        int64_t found = -1;
        for (i = 0; i + 8 <= n; i += 8) {
            int hit = _mm256_movemask_ps(_mm256_cmp_ps(load8(row, bf16, i, n), vtop, _CMP_EQ_OQ));
            if (hit) {
                found = i + __builtin_ctz((unsigned)hit);
                break;
            }
        }
        if (found < 0)
            for (found = i; found < n && element(row, bf16, found) != top; ++found) {
            }
        out[r] = found < n ? found : 0;
    }
}

/* ---- the entry points: the AVX-512 path where the CPU has it, else AVX2 + FMA ------------- */

/*
 * gemma's RMSNorm: y = (x * rsqrt(mean(x^2) + eps)) * (offset + w), in float32, y in x's dtype.
 * x, y: rows x d (float32, or bfloat16 when x_bf16), contiguous; w: d (bfloat16 when w_bf16).
 */
void gp_rms_norm(const void *x, int x_bf16, int64_t rows, int64_t d, const void *w, int w_bf16, float offset,
                 float eps, void *y) {
    switch (gp_decode_path()) {
    case 1: rms_norm_512(x, x_bf16, rows, d, w, w_bf16, offset, eps, y); break;
    case 2: rms_norm_avx2(x, x_bf16, rows, d, w, w_bf16, offset, eps, y); break;
    }
}

/* gelu_tanh(gate) * up (gelu_mul_512's comment); gate, up, y: n elements (bfloat16 when bf16). */
void gp_gelu_mul(const void *gate, const void *up, int bf16, int64_t n, void *y) {
    switch (gp_decode_path()) {
    case 1: gelu_mul_512(gate, up, bf16, n, y); break;
    case 2: gelu_mul_avx2(gate, up, bf16, n, y); break;
    }
}

/* gemma's attention core (attend_512's comment).  Returns 0; -1 for a position outside the
 * cache (nothing written), -2 out of memory, -3 on a CPU with neither path. */
int gp_attend(const void *q, int64_t q_bs, int64_t q_ts, const void *k, int64_t k_bs, int64_t k_ts, const void *v,
              int64_t v_bs, int64_t v_ts, int64_t batch, int64_t len, int64_t heads, int64_t kv_heads,
              int64_t head_dim, const float *freqs, const int64_t *positions, void *k_cache, void *v_cache,
              int64_t max_seq, const float *mask, int64_t mask_bs, int64_t mask_ts, float scaling, float softcap,
              int bf16, void *out) {
    switch (gp_decode_path()) {
    case 1:
        return attend_512(q, q_bs, q_ts, k, k_bs, k_ts, v, v_bs, v_ts, batch, len, heads, kv_heads, head_dim, freqs,
                          positions, k_cache, v_cache, max_seq, mask, mask_bs, mask_ts, scaling, softcap, bf16, out);
    case 2:
        return attend_avx2(q, q_bs, q_ts, k, k_bs, k_ts, v, v_bs, v_ts, batch, len, heads, kv_heads, head_dim, freqs,
                           positions, k_cache, v_cache, max_seq, mask, mask_bs, mask_ts, scaling, softcap, bf16, out);
    }
    return -3;
}

/* Index of the first largest value in each row (a NaN counts as largest, as torch.argmax).
 * x: rows x n (bfloat16 when bf16), contiguous; out: rows int64. */
void gp_argmax(const void *x, int bf16, int64_t rows, int64_t n, int64_t *out) {
    switch (gp_decode_path()) {
    case 1: argmax_512(x, bf16, rows, n, out); break;
    case 2: argmax_avx2(x, bf16, rows, n, out); break;
    }
}

AVX512_BASE
static void exp_512(const float *x, int64_t n, float *y) {
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 mask = MASK16(n, i);
        _mm512_mask_storeu_ps(y + i, mask, exp16(_mm512_maskz_loadu_ps(mask, x + i)));
    }
}

AVX2_BASE
static void exp_avx2(const float *x, int64_t n, float *y) {
    for (int64_t i = 0; i < n; i += 8) store8(y, 0, i, exp8(load8(x, 0, i, n)), n);
}

/* y = e^x for n float32 values: the exp of the softmax and gelu above, for tests. */
void gp_exp(const float *x, int64_t n, float *y) {
    switch (gp_decode_path()) {
    case 1: exp_512(x, n, y); break;
    case 2: exp_avx2(x, n, y); break;
    }
}
