/* CPU kernels of QuIP#: the E8P decode GEMV and the fused 2-bit materialize (codes, Hadamard transforms,
 * sign vectors and scale in one pass). Built and loaded with native_kernels.c (see its header). */
#include "native_common.h"

/* E8P: y [n, m] = x [n, k] C^T for codes [m, k/8] (16-bit, read unsigned) and book [65536, 8]: each code's
 * 8 codebook values dotted with its 8 inputs, no decoded weight. With AVX2 the 2 MiB book is not read per
 * code (a cache miss each) but rebuilt from two 8 KiB tables that stay in L1, by E8P's structure (see
 * modulora_plugin_quipsharp/e8p.py): book[(hi << 8) | lo] = a[hi] * b[lo] + c[lo], a the signed source
 * pattern, b the +-1 signs and c the +-1/4 shift of the low byte (c = -1/4 where lo has odd parity); code 0's
 * pattern is all 1/2, so a[hi] = book[hi << 8] - 1/4 and b[lo] = 2 (book[lo] - c[lo]), all exact. */
void e8p_gemv(const float *x, int64_t n, int64_t k, const int16_t *codes, const float *book, int64_t m, float *y,
              int nt) {
    int64_t blocks = k / 8;
#ifdef HAVE_AVX2
    float *tab = (float *)malloc(sizeof(float) * (2 * 256 * 8 + 256));
    if (tab) {
        float *a = tab, *b = tab + 256 * 8, *c = tab + 2 * 256 * 8;
        for (int lo = 0; lo < 256; lo++) {
            c[lo] = __builtin_popcount((unsigned)lo) & 1 ? -0.25f : 0.25f;
            for (int i = 0; i < 8; i++) b[lo * 8 + i] = 2.f * (book[lo * 8 + i] - c[lo]);
        }
        for (int hi = 0; hi < 256; hi++)
            for (int i = 0; i < 8; i++) a[hi * 8 + i] = book[(int64_t)(hi << 8) * 8 + i] - 0.25f;
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
        for (int64_t o = 0; o < m; o++) {
            const uint16_t *cr = (const uint16_t *)codes + o * blocks;
            for (int64_t r = 0; r < n; r++) {
                const float *xr = x + r * k;
                __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
                int64_t j = 0;
                for (; j + 4 <= blocks; j += 4)
                    for (int u = 0; u < 4; u++) {
                        unsigned cv = cr[j + u], hi = cv >> 8, lo = cv & 255u;
                        __m256 cw = _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(a + hi * 8), _mm256_loadu_ps(b + lo * 8)),
                                                  _mm256_broadcast_ss(c + lo));
                        acc[u] = _mm256_fmadd_ps(cw, _mm256_loadu_ps(xr + (j + u) * 8), acc[u]);
                    }
                for (; j < blocks; j++) {
                    const float *cw = book + (int64_t)cr[j] * 8;
                    acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(cw), _mm256_loadu_ps(xr + j * 8), acc[0]);
                }
                y[r * m + o] = hsum8(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
            }
        }
        free(tab);
        return;
    }
#endif
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (int64_t o = 0; o < m; o++) {
        const uint16_t *c = (const uint16_t *)codes + o * blocks;
        for (int64_t r = 0; r < n; r++) {
            const float *xr = x + r * k;
            float acc[8] = {0};
            for (int64_t j = 0; j < blocks; j++) {
                const float *cw = book + (int64_t)c[j] * 8, *xv = xr + j * 8;
#pragma omp simd
                for (int i = 0; i < 8; i++) acc[i] += cw[i] * xv[i];
            }
            y[r * m + o] = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
        }
    }
}

/* Three levels of butterflies at once (radix 8) on the 8 vectors x + j d (j < 8), over their first len floats:
 * levels d, 2 d, 4 d, each pair (a, b) -> (a + b, a - b). Eight loads and stores for three levels, in registers. */
static inline void radix8(float *x, int64_t d, int64_t len) {
    int64_t t = 0;
#ifdef HAVE_AVX2
    for (; t + 8 <= len; t += 8) {
        float *p = x + t;
        __m256 a0 = _mm256_loadu_ps(p), a1 = _mm256_loadu_ps(p + d), a2 = _mm256_loadu_ps(p + 2 * d),
               a3 = _mm256_loadu_ps(p + 3 * d), a4 = _mm256_loadu_ps(p + 4 * d), a5 = _mm256_loadu_ps(p + 5 * d),
               a6 = _mm256_loadu_ps(p + 6 * d), a7 = _mm256_loadu_ps(p + 7 * d);
        __m256 b0 = _mm256_add_ps(a0, a1), b1 = _mm256_sub_ps(a0, a1), b2 = _mm256_add_ps(a2, a3),
               b3 = _mm256_sub_ps(a2, a3), b4 = _mm256_add_ps(a4, a5), b5 = _mm256_sub_ps(a4, a5),
               b6 = _mm256_add_ps(a6, a7), b7 = _mm256_sub_ps(a6, a7);
        __m256 c0 = _mm256_add_ps(b0, b2), c2 = _mm256_sub_ps(b0, b2), c1 = _mm256_add_ps(b1, b3),
               c3 = _mm256_sub_ps(b1, b3), c4 = _mm256_add_ps(b4, b6), c6 = _mm256_sub_ps(b4, b6),
               c5 = _mm256_add_ps(b5, b7), c7 = _mm256_sub_ps(b5, b7);
        _mm256_storeu_ps(p, _mm256_add_ps(c0, c4));
        _mm256_storeu_ps(p + 4 * d, _mm256_sub_ps(c0, c4));
        _mm256_storeu_ps(p + d, _mm256_add_ps(c1, c5));
        _mm256_storeu_ps(p + 5 * d, _mm256_sub_ps(c1, c5));
        _mm256_storeu_ps(p + 2 * d, _mm256_add_ps(c2, c6));
        _mm256_storeu_ps(p + 6 * d, _mm256_sub_ps(c2, c6));
        _mm256_storeu_ps(p + 3 * d, _mm256_add_ps(c3, c7));
        _mm256_storeu_ps(p + 7 * d, _mm256_sub_ps(c3, c7));
    }
#endif
    for (; t < len; t++) {
        float *p = x + t, a[8], b[8];
        for (int j = 0; j < 8; j++) a[j] = p[j * d];
        for (int j = 0; j < 8; j += 2) b[j] = a[j] + a[j + 1], b[j + 1] = a[j] - a[j + 1];
        for (int j = 0; j < 2; j++) {
            a[j] = b[j] + b[j + 2], a[j + 2] = b[j] - b[j + 2];
            a[j + 4] = b[j + 4] + b[j + 6], a[j + 6] = b[j + 4] - b[j + 6];
        }
        for (int j = 0; j < 4; j++) p[j * d] = a[j] + a[j + 4], p[(j + 4) * d] = a[j] - a[j + 4];
    }
}

/* In-place unnormalized Sylvester transform H_p over the outer index of x viewed as [p, inner] (p a power of
 * two), levels h0, 2 h0, ... < hend (<= p; h0 > 1: the lower levels were applied already, hend < p: the
 * upper ones are left to the caller): butterflies (a, b) ->
 * (a + b, a - b), three levels per pass where it can (radix 8, in registers), then radix 4 and 2, which give
 * the natural (Sylvester) order. The levels act on different bits of the index, so any grouping gives the
 * same transform, and the same floats while the sums are exact. */
static void fwht(float *x, int64_t p, int64_t inner, int64_t h0, int64_t hend) {
    int64_t h = h0;
    for (; 8 * h <= hend; h *= 8)
        for (int64_t base = 0; base < p; base += 8 * h) radix8(x + base * inner, h * inner, h * inner);
    for (; 4 * h <= hend; h *= 4)
        for (int64_t base = 0; base < p; base += 4 * h) {
            float *a = x + base * inner, *b = a + h * inner, *c = b + h * inner, *d = c + h * inner;
#pragma omp simd
            for (int64_t t = 0; t < h * inner; t++) {
                float s0 = a[t] + b[t], d0 = a[t] - b[t], s1 = c[t] + d[t], d1 = c[t] - d[t];
                a[t] = s0 + s1;
                c[t] = s0 - s1;
                b[t] = d0 + d1;
                d[t] = d0 - d1;
            }
        }
    for (; h < hend; h *= 2)
        for (int64_t base = 0; base < p; base += 2 * h) {
            float *a = x + base * inner, *b = x + (base + h) * inner;
#pragma omp simd
            for (int64_t t = 0; t < h * inner; t++) {
                float s = a[t], d = b[t];
                a[t] = s + d;
                b[t] = s - d;
            }
        }
}

/* x viewed as [p, kk, inner]: every [kk, inner] block becomes F^T times it (F [kk, kk] row-major); tmp holds
 * kk * inner floats. */
static void dense_t(float *x, int64_t p, int64_t kk, int64_t inner, const float *f, float *tmp) {
    for (int64_t u = 0; u < p; u++) {
        float *blk = x + u * kk * inner;
        memset(tmp, 0, sizeof(float) * (size_t)(kk * inner));
        if (inner == 1) { /* a row's blocks: vectorize over F's rows instead */
            for (int64_t b = 0; b < kk; b++) {
                float xb = blk[b];
                const float *fr = f + b * kk;
#pragma omp simd
                for (int64_t a = 0; a < kk; a++) tmp[a] += xb * fr[a];
            }
            memcpy(blk, tmp, sizeof(float) * (size_t)kk);
            continue;
        }
        for (int64_t b = 0; b < kk; b++)
            for (int64_t a = 0; a < kk; a++) {
                float fv = f[b * kk + a];
                const float *src = blk + b * inner;
                float *dst = tmp + a * inner;
#pragma omp simd
                for (int64_t t = 0; t < inner; t++) dst[t] += fv * src[t];
            }
        memcpy(blk, tmp, sizeof(float) * (size_t)(kk * inner));
    }
}

/* One row of a strip leaving quip2_materialize: dst = src * rf * colf, one float64 rounding (float32 where that
 * rounds the same: colf +-1 and rf exact in float32). */
static inline void quip_scale_row(float *dst, const float *src, int64_t cw, double rf, const double *colf,
                                  const float *colf32, int signs_only) {
    float r32 = (float)rf;
    if (signs_only && (double)r32 == rf) { /* y * rf rounds once in float32 too: same floats */
#pragma omp simd
        for (int64_t t = 0; t < cw; t++) dst[t] = src[t] * r32 * colf32[t];
    } else {
#pragma omp simd
        for (int64_t t = 0; t < cw; t++) dst[t] = (float)(((double)src[t] * rf) * colf[t]);
    }
}

#define QUIP_STRIP 64 /* columns per output-side task: 256 bytes of each row per gather; a strip of all m rows in L2 or L3 */

/* QuIP# 2-bit materialize: w [m, n] = diag(rowf) H_m^T C H_n diag(colf), C the E8P codewords of codes [m, n/8]
 * (book [65536, 8]; when n is a power of two (k_in = 1), book holds H_8 times each codeword: the input side's
 * three lowest levels act within one codeword, so they come with the lookup). Each side's transform is kron(H_p, F) with F [kk, kk] (NULL when kk = 1), unnormalized;
 * rowf and colf (float64) carry the norms, the scale and the signs, applied in float64 and rounded once.
 * Codewords are multiples of 1/4 and H, Paley F are +-1: the float32 sums stay exact while below 2^22. */
int quip2_materialize(const int16_t *codes, const float *book, int64_t m, int64_t n, int64_t p_in, int64_t k_in,
                      const float *f_in, int64_t p_out, int64_t k_out, const float *f_out, const double *rowf,
                      const double *colf, float *w, int nt) {
    int fail = 0, signs_only = 1; /* colf all +-1 (untuned signs): its product is exact in float32 */
    for (int64_t i = 0; i < n; i++) signs_only &= colf[i] == 1.0 || colf[i] == -1.0;
    float *colf32 = (float *)malloc(sizeof(float) * (size_t)n);
    if (!colf32) return -1;
    for (int64_t i = 0; i < n; i++) colf32[i] = (float)colf[i];
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        float *tmp = (float *)malloc(sizeof(float) * (size_t)(k_in > 1 ? k_in : 1));
        float *buf = (float *)malloc(sizeof(float) * (size_t)(m * QUIP_STRIP));
        float *tmp2 = (float *)malloc(sizeof(float) * (size_t)(k_out * QUIP_STRIP));
        float *tmp3 = (float *)malloc(sizeof(float) * (size_t)((p_out / 64 + 1) * QUIP_STRIP));
        if (!tmp || !buf || !tmp2 || !tmp3) {
#pragma omp atomic write
            fail = 1;
        }
#pragma omp barrier
        if (!fail) {
#pragma omp for schedule(static)
            for (int64_t o = 0; o < m; o++) { /* input side: decode a row, transform it in L1 */
                const uint16_t *c = (const uint16_t *)codes + o * (n / 8);
                float *row = w + o * n;
                for (int64_t j = 0; j < n / 8; j++) memcpy(row + 8 * j, book + (int64_t)c[j] * 8, 8 * sizeof(float));
                fwht(row, p_in, k_in, k_in == 1 ? 8 : 1, p_in);
                if (k_in > 1) dense_t(row, p_in, k_in, 1, f_in, tmp);
            }
#pragma omp for schedule(static)
            for (int64_t c0 = 0; c0 < n; c0 += QUIP_STRIP) { /* output side: a strip of columns at a time */
                int64_t cw = n - c0 < QUIP_STRIP ? n - c0 : QUIP_STRIP, d = k_out * cw;
                if (k_out == 1 && p_out >= 64) { /* H_m = (H_{m/64} x I_64)(I_64 x H_64): L1-sized blocks */
                    int64_t p2 = p_out / 64;
                    for (int64_t b0 = 0; b0 < m; b0 += 64) { /* levels < 64 within 64 rows, as they arrive */
                        for (int64_t o = b0; o < b0 + 64; o++) {
                            const float *src = w + o * n + c0;
                            float *dst = buf + o * cw;
                            if (o + 32 < m) /* rows 16 KiB apart: the hardware prefetchers do not follow */
                                for (int64_t t = 0; t < cw; t += 16) __builtin_prefetch(src + 32 * n + t);
                            for (int64_t t = 0; t < cw; t++) dst[t] = src[t];
                        }
                        fwht(buf + b0 * cw, 64, cw, 1, 64);
                    }
                    for (int64_t r0 = 0; r0 < 64; r0++) { /* the others across the blocks, rows r0 + 64 j */
                        for (int64_t j = 0; j < p2; j++)
                            for (int64_t t = 0; t < cw; t++) tmp3[j * cw + t] = buf[(r0 + 64 * j) * cw + t];
                        fwht(tmp3, p2, cw, 1, p2);
                        for (int64_t j = 0; j < p2; j++) {
                            int64_t o = r0 + 64 * j;
                            quip_scale_row(w + o * n + c0, tmp3 + j * cw, cw, rowf[o], colf + c0, colf32 + c0, signs_only);
                        }
                    }
                    continue;
                }
                /* the lowest three levels on each 8 rows' slices as they arrive (the same floats: exact sums) */
                int fuse_in = p_out >= 8;
                for (int64_t o = 0; o < m; o++) {
                    const float *src = w + o * n + c0;
                    float *dst = buf + o * cw;
                    for (int64_t t = 0; t < cw; t++) dst[t] = src[t];
                    if (fuse_in && o % (8 * k_out) == 8 * k_out - 1) /* rows (u0 + j) k_out + v, j < 8, v < k_out */
                        for (int64_t v = 0; v < k_out; v++) radix8(buf + (o + 1 - 8 * k_out + v) * cw, d, cw);
                }
                fwht(buf, p_out, d, fuse_in ? 8 : 1, p_out);
                if (k_out > 1) dense_t(buf, p_out, k_out, cw, f_out, tmp2);
                for (int64_t o = 0; o < m; o++)
                    quip_scale_row(w + o * n + c0, buf + o * cw, cw, rowf[o], colf + c0, colf32 + c0, signs_only);
            }
        }
        free(tmp);
        free(buf);
        free(tmp2);
        free(tmp3);
    }
    free(colf32);
    return fail ? -1 : 0;
}
