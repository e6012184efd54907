/*
 * The small operations of a gemma decoder layer, one call each, for the `fused` builtin
 * (gemma_profiles/fused.py): RMSNorm, gelu(gate) * up, the attention core (rotary
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
 */
#include <math.h>
#include <stdlib.h>

#include "common.h"

#define DEAD_MASK (-1.0e30f) /* gemma masks with -2.3819763e38: exp() of it is exactly 0 */

int gp_decode_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl");
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
void gp_rms_norm(const void *x, int x_bf16, int64_t rows, int64_t d, const void *w, int w_bf16, float offset,
                 float eps, void *y) {
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
void gp_gelu_mul(const void *gate, const void *up, int bf16, int64_t n, void *y) {
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
int gp_attend(const void *q, int64_t q_bs, int64_t q_ts, const void *k, int64_t k_bs, int64_t k_ts, const void *v,
              int64_t v_bs, int64_t v_ts, int64_t batch, int64_t len, int64_t heads, int64_t kv_heads,
              int64_t head_dim, const float *freqs, const int64_t *positions, void *k_cache, void *v_cache,
              int64_t max_seq, const float *mask, int64_t mask_bs, int64_t mask_ts, float scaling, float softcap,
              int bf16, void *out) {
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
void gp_argmax(const void *x, int bf16, int64_t rows, int64_t n, int64_t *out) {
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
