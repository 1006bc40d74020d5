/* Shared by ModuLoRA's CPU kernels (native_kernels.c, native_quip.c): scale loads, the AVX2 switch. */
#ifndef MODULORA_NATIVE_COMMON_H
#define MODULORA_NATIVE_COMMON_H
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_ROWS 8 /* GEMV inputs of at most this many rows (decode steps) */

static inline float bits_to_float(uint32_t b) {
    float f;
    memcpy(&f, &b, 4);
    return f;
}

static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    if (exp == 0) { /* zero or subnormal: man * 2^-24, exact in float32 */
        float f = (float)man * 5.9604644775390625e-08f;
        return sign ? -f : f;
    }
    if (exp == 31) return bits_to_float(sign | 0x7f800000u | (man << 13));
    return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
}

static inline float load_scale(const void *p, int skind, int64_t i) {
    if (skind == 1) return half_to_float(((const uint16_t *)p)[i]);
    if (skind == 2) return bits_to_float((uint32_t)((const uint16_t *)p)[i] << 16);
    return ((const float *)p)[i];
}

#define LANES 8 /* partial sums kept per vector lane across groups: one horizontal sum per output, not per group */

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define HAVE_AVX2 1
#endif

#ifdef HAVE_AVX2
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

#endif
