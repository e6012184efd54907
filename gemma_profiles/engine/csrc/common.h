/* Shared by the native CPU kernels (int8_matmul.c, decode.c): bfloat16 conversions and
 * masked 16-lane loads.  Every function using AVX-512 carries a target attribute, so the
 * library builds with plain -O3 and each entry point checks the CPU before using them. */
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

#endif
