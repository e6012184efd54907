/* Shared by the native CPU kernels (int8_matmul.c, bf16_matmul.c, decode.c): bfloat16
 * conversions, masked 16-lane (AVX-512) and 8-lane (AVX2 + FMA) loads and stores.  Every
 * function using AVX-512 or AVX2 carries a target attribute, so the library builds with plain
 * -O3 and each entry point checks the CPU before using them. */
#ifndef GEMMA_PROFILES_COMMON_H
#define GEMMA_PROFILES_COMMON_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define AVX512_BASE __attribute__((target("avx512f,avx512bw,avx512vl")))
#define MASK16(k, i) ((k) - (i) >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << ((k) - (i))) - 1))

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);                                            /* round to nearest even */
    return (uint16_t)(u >> 16);
}

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* 16 values from element i of x (float32, or bfloat16 when bf16) as float32; masked lanes read 0. */
AVX512_BASE
static inline __m512 load16(const void *x, int bf16, int64_t i, __mmask16 mask) {
    if (bf16) {
        __m256i v = _mm256_maskz_loadu_epi16(mask, (const uint16_t *)x + i);
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
    }
    return _mm512_maskz_loadu_ps(mask, (const float *)x + i);
}

/* Round-to-nearest-even to bfloat16 and back, 16 lanes (NaN inputs stay NaN). */
AVX512_BASE
static inline __m512 round16(__m512 v, int bf16) {
    if (!bf16) return v;
    __m512i u = _mm512_castps_si512(v);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd));
    r = _mm512_and_si512(r, _mm512_set1_epi32((int)0xffff0000u));
    __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    return _mm512_mask_blend_ps(nan, _mm512_castsi512_ps(r), v);
}

AVX512_BASE
static inline void store16(void *y, int bf16, int64_t i, __m512 v, __mmask16 mask) {
    if (bf16) {
        __m512i u = _mm512_castps_si512(round16(v, 1));
        _mm256_mask_storeu_epi16((uint16_t *)y + i, mask, _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
    } else {
        _mm512_mask_storeu_ps((float *)y + i, mask, v);
    }
}

/* ---- AVX2 + FMA (x86-64 CPUs without AVX-512: Haswell/Zen 1-3 and later) ----------------
 * The same conversions, 8 lanes.  AVX2 has no 16-bit masked loads, so a tail shorter than 8
 * goes through a zeroed local buffer. */
#define AVX2_BASE __attribute__((target("avx2,fma")))

static inline int gp_avx2_fma(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

/* 8 values from element i of x (float32, or bfloat16 when bf16) as float32; lanes at or past k read 0. */
AVX2_BASE
static inline __m256 load8(const void *x, int bf16, int64_t i, int64_t k) {
    if (k - i >= 8) {
        if (bf16) {
            __m128i v = _mm_loadu_si128((const __m128i *)((const uint16_t *)x + i));
            return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
        }
        return _mm256_loadu_ps((const float *)x + i);
    }
    float tmp[8] = {0};
    for (int j = 0; j < 8 && i + j < k; ++j)
        tmp[j] = bf16 ? bf16_to_f32(((const uint16_t *)x)[i + j]) : ((const float *)x)[i + j];
    return _mm256_loadu_ps(tmp);
}

/* Round-to-nearest-even to bfloat16 and back, 8 lanes (NaN inputs stay NaN). */
AVX2_BASE
static inline __m256 round8(__m256 v, int bf16) {
    if (!bf16) return v;
    __m256i u = _mm256_castps_si256(v);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd));
    r = _mm256_and_si256(r, _mm256_set1_epi32((int)0xffff0000u));
    __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    return _mm256_blendv_ps(_mm256_castsi256_ps(r), v, nan);
}

/* Store 8 lanes at element i of y (bfloat16, rounded to nearest even, when bf16); lanes at or past k are not written. */
AVX2_BASE
static inline void store8(void *y, int bf16, int64_t i, __m256 v, int64_t k) {
    if (bf16) {
        __m256i u = _mm256_srli_epi32(_mm256_castps_si256(round8(v, 1)), 16);
        __m128i h = _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1));
        if (k - i >= 8) {
            _mm_storeu_si128((__m128i *)((uint16_t *)y + i), h);
        } else {
            uint16_t tmp[8];
            _mm_storeu_si128((__m128i *)tmp, h);
            memcpy((uint16_t *)y + i, tmp, sizeof(uint16_t) * (size_t)(k - i));
        }
    } else if (k - i >= 8) {
        _mm256_storeu_ps((float *)y + i, v);
    } else {
        float tmp[8];
        _mm256_storeu_ps(tmp, v);
        memcpy((float *)y + i, tmp, sizeof(float) * (size_t)(k - i));
    }
}

/* The sum of 8 lanes. */
AVX2_BASE
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* The largest of 8 lanes. */
AVX2_BASE
static inline float hmax8(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

#endif
