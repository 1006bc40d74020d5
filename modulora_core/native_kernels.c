/* CPU kernels of ModuLoRA's first-party plugins: decode-step products (GEMV from the packed form) and fused
 * materialize (unpack and scale in one pass). Built on first use by modulora_core/native.py with the system C
 * compiler and loaded through ctypes: plain C, no torch headers, so the build takes about a second.
 *
 * Every materialize kernel computes the same float32 operations, in the same order, as the plugin's torch
 * code ((code - zero) * scale, or level * absmax), so its output is bit-identical to the torch path. The GEMVs
 * accumulate in float32 in their own order (about 1e-7 relative to the float64 product).
 *
 * Threads: OpenMP over output rows, nt threads (torch.get_num_threads() of the caller).
 * Scale dtypes (skind): 0 float32, 1 float16, 2 bfloat16, read per element by load_scale.
 */
#include "native_common.h"

/* p[i % LANES] += lo(c[j]) * e[j] + hi(c[j]) * od[j] over j < h (lo: the low nibble) */
static inline void dot_nibbles(const uint8_t *c, const float *e, const float *od, int64_t h, float *p) {
    int64_t j = 0;
#ifdef HAVE_AVX2 /* the compiler does not vectorize the byte-to-float conversion of the plain loop */
    __m256 acc = _mm256_loadu_ps(p);
    const __m256i mask = _mm256_set1_epi32(15);
    for (; j + LANES <= h; j += LANES) {
        __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(c + j)));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, mask)), _mm256_loadu_ps(e + j), acc);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), _mm256_loadu_ps(od + j), acc);
    }
    _mm256_storeu_ps(p, acc);
#endif
    for (; j < h; j++) p[j % LANES] += (float)(c[j] & 15) * e[j] + (float)(c[j] >> 4) * od[j];
}

/* p[i % LANES] += L[hi(c[j])] * e[j] + L[lo(c[j])] * od[j]: NF4's order, the first code in the high nibble */
static inline void dot_levels(const uint8_t *c, const float *levels, const float *e, const float *od, int64_t h,
                              float *p) {
    int64_t j = 0;
#ifdef HAVE_AVX2 /* the 16 levels live in two registers: a lookup is two permutes and a blend, not a gather */
    __m256 acc = _mm256_loadu_ps(p), l0 = _mm256_loadu_ps(levels), l1 = _mm256_loadu_ps(levels + 8);
    const __m256i mask = _mm256_set1_epi32(15);
    for (; j + LANES <= h; j += LANES) {
        __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(c + j)));
        __m256i hi = _mm256_srli_epi32(v, 4), lo = _mm256_and_si256(v, mask);
        __m256 vh = _mm256_blendv_ps(_mm256_permutevar8x32_ps(l0, hi), _mm256_permutevar8x32_ps(l1, hi),
                                     _mm256_castsi256_ps(_mm256_slli_epi32(hi, 28)));
        __m256 vl = _mm256_blendv_ps(_mm256_permutevar8x32_ps(l0, lo), _mm256_permutevar8x32_ps(l1, lo),
                                     _mm256_castsi256_ps(_mm256_slli_epi32(lo, 28)));
        acc = _mm256_fmadd_ps(vh, _mm256_loadu_ps(e + j), acc);
        acc = _mm256_fmadd_ps(vl, _mm256_loadu_ps(od + j), acc);
    }
    _mm256_storeu_ps(p, acc);
#endif
    for (; j < h; j++) p[j % LANES] += levels[c[j] >> 4] * e[j] + levels[c[j] & 15] * od[j];
}

static inline float lane_sum(const float *p) {
    return ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
}

/* x [n, k] -> even [n, k/2], odd times oscale [n, k/2] and group sums [n, k/gs] (gs even, dividing k) */
static float *split_x(const float *x, int64_t n, int64_t k, int64_t gs, float oscale) {
    int64_t groups = k / gs;
    float *buf = (float *)malloc(sizeof(float) * (size_t)(n * k + n * groups));
    if (!buf) return NULL;
    for (int64_t r = 0; r < n; r++) {
        const float *xr = x + r * k;
        float *e = buf + r * (k / 2), *o = buf + n * (k / 2) + r * (k / 2), *s = buf + n * k + r * groups;
        for (int64_t j = 0; j < k / 2; j++) {
            e[j] = xr[2 * j];
            o[j] = xr[2 * j + 1] * oscale;
        }
        for (int64_t g = 0; g < groups; g++) {
            float t = 0.f;
            for (int64_t j = 0; j < gs; j++) t += xr[g * gs + j];
            s[g] = t;
        }
    }
    return buf;
}

#ifdef HAVE_AVX2
#define GEMV_ROWS 4 /* output rows per step of the vector GEMVs: each x load serves four rows */

/* RTN 4-bit, rows o0..o0 + R - 1 of y[r] (R <= GEMV_ROWS, a constant once inlined); h % 8 == 0. The high
 * nibble is read in place ((c & 0xf0) = 16 hi) against odd inputs divided by 16 (xo16): no shift. Two
 * accumulators per row (low and high nibbles), so the FMA chains overlap. */
static inline __attribute__((always_inline)) void rtn4_rows(const float *xe, const float *xo16, const float *xs,
                                                            const uint8_t *codes, int64_t stride,
                                                            const void *scales, int skind, const uint8_t *zeros,
                                                            int64_t groups, int64_t h, int64_t o0, const int R,
                                                            float *y) {
    __m256 lanes[GEMV_ROWS];
    float corr[GEMV_ROWS];
    const __m256i m_lo = _mm256_set1_epi32(0x0f), m_hi = _mm256_set1_epi32(0xf0);
    for (int i = 0; i < R; i++) lanes[i] = _mm256_setzero_ps(), corr[i] = 0.f;
    for (int64_t g = 0; g < groups; g++) {
        __m256 lo[GEMV_ROWS], hi[GEMV_ROWS];
        for (int i = 0; i < R; i++) lo[i] = _mm256_setzero_ps(), hi[i] = _mm256_setzero_ps();
        const uint8_t *cg = codes + o0 * stride + g * h;
        for (int64_t j = 0; j < h; j += 8) {
            __m256 e = _mm256_loadu_ps(xe + g * h + j), od = _mm256_loadu_ps(xo16 + g * h + j);
            for (int i = 0; i < R; i++) {
                __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(cg + i * stride + j)));
                lo[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, m_lo)), e, lo[i]);
                hi[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, m_hi)), od, hi[i]);
            }
        }
        for (int i = 0; i < R; i++) {
            int64_t at = (o0 + i) * groups + g;
            float sc = load_scale(scales, skind, at), z = zeros ? (float)zeros[at] : 8.f;
            lanes[i] = _mm256_fmadd_ps(_mm256_set1_ps(sc), _mm256_add_ps(lo[i], hi[i]), lanes[i]);
            corr[i] -= sc * z * xs[g];
        }
    }
    for (int i = 0; i < R; i++) y[o0 + i] = hsum8(lanes[i]) + corr[i];
}

/* NF4/FP4, rows o0..o0 + R - 1 of y[r]; h % 8 == 0. The 16 levels live in two registers: a lookup is two
 * permutes (which read the index's low three bits) and a blend on its fourth bit, not a gather. */
static inline __attribute__((always_inline)) void nf4_rows(const float *xe, const float *xo, const uint8_t *codes,
                                                           int64_t k, const float *absmax, const uint8_t *qabsmax,
                                                           const float *book, const float *ascale,
                                                           const float *aoffset, const float *levels, int64_t nb,
                                                           int64_t h, int64_t o0, const int R, float *y) {
    __m256 lanes[GEMV_ROWS];
    const __m256 l0 = _mm256_loadu_ps(levels), l1 = _mm256_loadu_ps(levels + 8);
    for (int i = 0; i < R; i++) lanes[i] = _mm256_setzero_ps();
    for (int64_t bl = 0; bl < nb; bl++) {
        __m256 acc[GEMV_ROWS];
        for (int i = 0; i < R; i++) acc[i] = _mm256_setzero_ps();
        const uint8_t *cb = codes + o0 * (k / 2) + bl * h;
        for (int64_t j = 0; j < h; j += 8) {
            __m256 e = _mm256_loadu_ps(xe + bl * h + j), od = _mm256_loadu_ps(xo + bl * h + j);
            for (int i = 0; i < R; i++) {
                __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(cb + i * (k / 2) + j)));
                __m256i hi = _mm256_srli_epi32(v, 4);
                __m256 vh = _mm256_blendv_ps(_mm256_permutevar8x32_ps(l0, hi), _mm256_permutevar8x32_ps(l1, hi),
                                             _mm256_castsi256_ps(_mm256_slli_epi32(v, 24)));
                __m256 vl = _mm256_blendv_ps(_mm256_permutevar8x32_ps(l0, v), _mm256_permutevar8x32_ps(l1, v),
                                             _mm256_castsi256_ps(_mm256_slli_epi32(v, 28)));
                acc[i] = _mm256_fmadd_ps(vh, e, acc[i]);
                acc[i] = _mm256_fmadd_ps(vl, od, acc[i]);
            }
        }
        for (int i = 0; i < R; i++) {
            int64_t b = (o0 + i) * nb + bl;
            float am = absmax ? absmax[b] : book[qabsmax[b]] * ascale[b / 256] + aoffset[0];
            lanes[i] = _mm256_fmadd_ps(_mm256_set1_ps(am), acc[i], lanes[i]);
        }
    }
    for (int i = 0; i < R; i++) y[o0 + i] = hsum8(lanes[i]);
}
#endif

/* RTN 4-bit: y [n, out] = x [n, k] W^T, codes [out, stride] (low nibble = even input), scales/zeros [out, G];
 * zeros NULL: symmetric (zero 8). Per group: s * (sum q x - z sum x). Returns 0, or -1 if out of memory. */
int rtn4_gemv(const float *x, int64_t n, int64_t k, const uint8_t *codes, int64_t stride, const void *scales,
              int skind, const uint8_t *zeros, int64_t out, int64_t groups, float *y, int nt) {
    int64_t gs = k / groups, h = gs / 2;
#ifdef HAVE_AVX2
    if (h % 8 == 0) {
        float *buf = split_x(x, n, k, gs, 1.f / 16.f);
        if (!buf) return -1;
        int64_t blocks = (out + GEMV_ROWS - 1) / GEMV_ROWS;
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
        for (int64_t ob = 0; ob < blocks; ob++)
            for (int64_t r = 0; r < n; r++) {
                const float *xe = buf + r * (k / 2), *xo = buf + n * (k / 2) + r * (k / 2), *xs = buf + n * k + r * groups;
                int64_t o0 = ob * GEMV_ROWS;
                if (o0 + GEMV_ROWS <= out)
                    rtn4_rows(xe, xo, xs, codes, stride, scales, skind, zeros, groups, h, o0, GEMV_ROWS, y + r * out);
                else
                    for (int64_t o = o0; o < out; o++)
                        rtn4_rows(xe, xo, xs, codes, stride, scales, skind, zeros, groups, h, o, 1, y + r * out);
            }
        free(buf);
        return 0;
    }
#endif
    float *buf = split_x(x, n, k, gs, 1.f);
    if (!buf) return -1;
    const float *xe = buf, *xo = buf + n * (k / 2), *xs = buf + n * k;
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (int64_t o = 0; o < out; o++) {
        float acc[MAX_ROWS] = {0}, lanes[MAX_ROWS][LANES] = {{0}};
        const uint8_t *c = codes + o * stride;
        for (int64_t g = 0; g < groups; g++) {
            float s = load_scale(scales, skind, o * groups + g);
            float z = zeros ? (float)zeros[o * groups + g] : 8.f;
            const uint8_t *cg = c + g * h;
            for (int64_t r = 0; r < n; r++) {
                const float *e = xe + r * (k / 2) + g * h, *od = xo + r * (k / 2) + g * h;
                float p[LANES] = {0};
                dot_nibbles(cg, e, od, h, p);
#pragma omp simd
                for (int i = 0; i < LANES; i++) lanes[r][i] += s * p[i];
                acc[r] -= s * z * xs[r * groups + g];
            }
        }
        for (int64_t r = 0; r < n; r++) y[r * out + o] = acc[r] + lane_sum(lanes[r]);
    }
    free(buf);
    return 0;
}

/* RTN 4-bit materialize: w [rows, k] float32 = (code - zero) * scale, groups of gs = k / groups (even). */
void rtn4_dequant(const uint8_t *codes, int64_t stride, const void *scales, int skind, const uint8_t *zeros,
                  int64_t rows, int64_t k, int64_t groups, float *w, int nt) {
    int64_t gs = k / groups, h = gs / 2;
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t g = 0; g < groups; g++) {
            float s = load_scale(scales, skind, r * groups + g);
            float z = zeros ? (float)zeros[r * groups + g] : 8.f;
            const uint8_t *cg = codes + r * stride + g * h;
            float *wg = w + r * k + g * gs;
#pragma omp simd
            for (int64_t j = 0; j < h; j++) {
                wg[2 * j] = ((float)(cg[j] & 15) - z) * s;
                wg[2 * j + 1] = ((float)(cg[j] >> 4) - z) * s;
            }
        }
    }
}

/* GPTQ v1 zero of group g, output column o: qzeros [G, zstride] int32 holds zero - 1 per 4-bit field, written
 * by a whole-word subtract, so a whole-word add (mod 2^32) undoes it. */
static inline float optq_zero(const int32_t *qzeros, int64_t zstride, int64_t g, int64_t o) {
    uint32_t word = (uint32_t)qzeros[g * zstride + o / 8] + 0x11111111u;
    return (float)((word >> (4 * (o % 8))) & 15u);
}

/* float32 scales and zeros [G, b - a] of output columns a..b */
static int optq_tables(const int32_t *qzeros, const void *scales, int skind, int64_t groups, int64_t out,
                       int64_t a, int64_t b, float **s_out, float **z_out) {
    int64_t r = b - a, zstride = (out + 7) / 8;
    float *s = (float *)malloc(sizeof(float) * (size_t)(2 * groups * r));
    if (!s) return -1;
    float *z = s + groups * r;
    for (int64_t g = 0; g < groups; g++)
        for (int64_t o = a; o < b; o++) {
            s[g * r + o - a] = load_scale(scales, skind, g * out + o);
            z[g * r + o - a] = optq_zero(qzeros, zstride, g, o);
        }
    *s_out = s;
    *z_out = z;
    return 0;
}

#define OPTQ_CHUNK 64 /* output columns per task: the partial sums of a chunk stay in L1 */

#ifdef HAVE_AVX2
/* optq4_gemv in plain group order, 32 output columns per task (four vectors of words: their accumulators, words
 * and one broadcast input stay in registers). Code j of a word is read in place, w & (15 << 4 j) = 16^j code,
 * against x scaled by 16^-j (exact: a power of two), so one AND and one conversion per code, no shift (but
 * the top code's, whose in-place value would read as negative). s, z: [G, out] tables; xs [n, G] group sums. */
static int optq4_gemv_avx2(const float *x, int64_t n, int64_t k, const int32_t *qweight, const float *s,
                           const float *z, const float *xs, int64_t gs, int64_t groups, int64_t out, float *y,
                           int nt) {
    float *xp = (float *)malloc(sizeof(float) * (size_t)(n * k));
    if (!xp) return -1;
    for (int64_t i = 0; i < n * k; i++) xp[i] = i % 8 == 7 ? x[i] : x[i] * (1.f / (float)(1u << (4 * (i % 8))));
    int64_t chunks = out / 32;
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (int64_t ch = 0; ch < chunks; ch++) {
        int64_t o0 = ch * 32;
        for (int64_t r = 0; r < n; r++) {
            const float *xr = xp + r * k;
            __m256 tot[4];
            for (int v = 0; v < 4; v++) tot[v] = _mm256_setzero_ps();
            for (int64_t g = 0; g < groups; g++) {
                __m256 acc[4];
                for (int v = 0; v < 4; v++) acc[v] = _mm256_setzero_ps();
                for (int64_t kw = g * gs / 8; kw < (g + 1) * gs / 8; kw++) {
                    const int32_t *wr = qweight + kw * out + o0;
                    __m256i w[4];
                    for (int v = 0; v < 4; v++) w[v] = _mm256_loadu_si256((const __m256i *)(wr + 8 * v));
                    for (int j = 0; j < 7; j++) {
                        __m256 xb = _mm256_broadcast_ss(xr + kw * 8 + j);
                        __m256i m = _mm256_set1_epi32(15 << (4 * j));
                        for (int v = 0; v < 4; v++)
                            acc[v] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(w[v], m)), xb, acc[v]);
                    }
                    __m256 xb = _mm256_broadcast_ss(xr + kw * 8 + 7);
                    for (int v = 0; v < 4; v++)
                        acc[v] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(w[v], 28)), xb, acc[v]);
                }
                __m256 xg = _mm256_set1_ps(xs[r * groups + g]);
                for (int v = 0; v < 4; v++) { /* tot += s (part - z sum x) */
                    __m256 sv = _mm256_loadu_ps(s + g * out + o0 + 8 * v), zv = _mm256_loadu_ps(z + g * out + o0 + 8 * v);
                    tot[v] = _mm256_fmadd_ps(sv, _mm256_fnmadd_ps(zv, xg, acc[v]), tot[v]);
                }
            }
            for (int v = 0; v < 4; v++) _mm256_storeu_ps(y + r * out + o0 + 8 * v, tot[v]);
        }
    }
    free(xp);
    return 0;
}
#endif

/* OPTQ 4-bit: y [n, out] = x [n, k] W^T from qweight [k/8, out] (8 codes per word along k). g_idx NULL: plain
 * group order (input k in group k / gs), each group's dot product scaled once; else g_idx [k] int32 (act-order):
 * every term scaled by its own group's scale. */
int optq4_gemv(const float *x, int64_t n, int64_t k, const int32_t *qweight, const int32_t *qzeros,
               const void *scales, int skind, const int32_t *g_idx, int64_t gs, int64_t groups, int64_t out,
               float *y, int nt) {
    float *s, *z;
    if (optq_tables(qzeros, scales, skind, groups, out, 0, out, &s, &z)) return -1;
    float *xs = (float *)calloc((size_t)(n * groups), sizeof(float));
    if (!xs) {
        free(s);
        return -1;
    }
    for (int64_t r = 0; r < n; r++)
        for (int64_t i = 0; i < k; i++) xs[r * groups + (g_idx ? g_idx[i] : i / gs)] += x[r * k + i];
#ifdef HAVE_AVX2
    if (!g_idx && gs % 8 == 0 && out % 32 == 0) {
        int rc = optq4_gemv_avx2(x, n, k, qweight, s, z, xs, gs, groups, out, y, nt);
        free(xs);
        free(s);
        return rc;
    }
#endif
    int64_t chunks = (out + OPTQ_CHUNK - 1) / OPTQ_CHUNK;
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (int64_t ch = 0; ch < chunks; ch++) {
        int64_t o0 = ch * OPTQ_CHUNK, len = out - o0 < OPTQ_CHUNK ? out - o0 : OPTQ_CHUNK;
        float acc[MAX_ROWS][OPTQ_CHUNK], part[MAX_ROWS][OPTQ_CHUNK];
        memset(acc, 0, sizeof(acc));
        if (!g_idx) {
            for (int64_t g = 0; g < groups; g++) {
                memset(part, 0, sizeof(part));
                for (int64_t kw = g * gs / 8; kw < (g + 1) * gs / 8; kw++) {
                    const uint32_t *wr = (const uint32_t *)qweight + kw * out + o0;
                    for (int64_t r = 0; r < n; r++) {
                        const float *xv = x + r * k + kw * 8;
                        float *p = part[r];
#pragma omp simd
                        for (int64_t o = 0; o < len; o++) {
                            uint32_t w = wr[o];
                            float t = (float)(w & 15u) * xv[0] + (float)((w >> 4) & 15u) * xv[1] +
                                      (float)((w >> 8) & 15u) * xv[2] + (float)((w >> 12) & 15u) * xv[3] +
                                      (float)((w >> 16) & 15u) * xv[4] + (float)((w >> 20) & 15u) * xv[5] +
                                      (float)((w >> 24) & 15u) * xv[6] + (float)(w >> 28) * xv[7];
                            p[o] += t;
                        }
                    }
                }
                const float *sg = s + g * out + o0, *zg = z + g * out + o0;
                for (int64_t r = 0; r < n; r++) {
                    float xg = xs[r * groups + g];
#pragma omp simd
                    for (int64_t o = 0; o < len; o++) acc[r][o] += sg[o] * (part[r][o] - zg[o] * xg);
                }
            }
        } else {
            for (int64_t i = 0; i < k; i++) {
                const uint32_t *wr = (const uint32_t *)qweight + (i / 8) * out + o0;
                int sh = (int)(4 * (i % 8));
                const float *sg = s + (int64_t)g_idx[i] * out + o0, *zg = z + (int64_t)g_idx[i] * out + o0;
                for (int64_t r = 0; r < n; r++) {
                    float xv = x[r * k + i];
#pragma omp simd
                    for (int64_t o = 0; o < len; o++)
                        acc[r][o] += ((float)((wr[o] >> sh) & 15u) - zg[o]) * sg[o] * xv;
                }
            }
        }
        for (int64_t r = 0; r < n; r++) memcpy(y + r * out + o0, acc[r], sizeof(float) * (size_t)len);
    }
    free(xs);
    free(s);
    return 0;
}

/* OPTQ 4-bit materialize of W^T's columns a..b: wt [k, b - a] float32 = (code - zero) * scale, the group of
 * input i being g_idx[i]. One task per qweight row (8 inputs): each word is loaded once for its 8 codes, and
 * when the 8 inputs share a group (plain order, and most act-order words), so are the scale and zero, which
 * leaves one load of each per 8 outputs. Returns 0, or -1 if out of memory. */
int optq4_dequant_t(const int32_t *qweight, const int32_t *qzeros, const void *scales, int skind,
                    const int32_t *g_idx, int64_t groups, int64_t k, int64_t out, int64_t a, int64_t b, float *wt,
                    int nt) {
    float *s, *z;
    if (optq_tables(qzeros, scales, skind, groups, out, a, b, &s, &z)) return -1;
    int64_t r = b - a, words = (k + 7) / 8;
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (int64_t kw = 0; kw < words; kw++) {
        const uint32_t *wr = (const uint32_t *)qweight + kw * out + a;
        int64_t i0 = 8 * kw, cnt = k - i0 < 8 ? k - i0 : 8;
        int same = cnt == 8;
        for (int64_t j = 1; j < cnt && same; j++) same = g_idx[i0 + j] == g_idx[i0];
        if (same) {
            const float *sg = s + (int64_t)g_idx[i0] * r, *zg = z + (int64_t)g_idx[i0] * r;
            float *d0 = wt + i0 * r, *d1 = d0 + r, *d2 = d1 + r, *d3 = d2 + r, *d4 = d3 + r, *d5 = d4 + r,
                  *d6 = d5 + r, *d7 = d6 + r;
#pragma omp simd
            for (int64_t o = 0; o < r; o++) {
                uint32_t w = wr[o];
                float sv = sg[o], zv = zg[o];
                d0[o] = ((float)(w & 15u) - zv) * sv;
                d1[o] = ((float)((w >> 4) & 15u) - zv) * sv;
                d2[o] = ((float)((w >> 8) & 15u) - zv) * sv;
                d3[o] = ((float)((w >> 12) & 15u) - zv) * sv;
                d4[o] = ((float)((w >> 16) & 15u) - zv) * sv;
                d5[o] = ((float)((w >> 20) & 15u) - zv) * sv;
                d6[o] = ((float)((w >> 24) & 15u) - zv) * sv;
                d7[o] = ((float)(w >> 28) - zv) * sv;
            }
            continue;
        }
        for (int64_t j = 0; j < cnt; j++) { /* a word across groups: each input its own scale and zero */
            const float *sg = s + (int64_t)g_idx[i0 + j] * r, *zg = z + (int64_t)g_idx[i0 + j] * r;
            float *dst = wt + (i0 + j) * r;
            int sh = (int)(4 * j);
#pragma omp simd
            for (int64_t o = 0; o < r; o++) dst[o] = ((float)((wr[o] >> sh) & 15u) - zg[o]) * sg[o];
        }
    }
    free(s);
    return 0;
}

/* NF4/FP4: y [n, out] = x [n, k] W^T from the row-major bytes of W (first code in the high nibble), blocks of
 * bs (dividing k) scaled by absmax [out * k / bs]; levels [16] are the code's values. absmax NULL: double
 * quantization, block b's absmax is book[qabsmax[b]] * ascale[b / 256] + aoffset[0] (bitsandbytes' two float32
 * roundings, in its order), decoded here rather than into a tensor first. */
int nf4_gemv(const float *x, int64_t n, int64_t k, const uint8_t *codes, const float *absmax, const uint8_t *qabsmax,
             const float *book, const float *ascale, const float *aoffset, const float *levels, int64_t bs,
             int64_t out, float *y, int nt) {
    float *buf = split_x(x, n, k, bs, 1.f);
    if (!buf) return -1;
    const float *xe = buf, *xo = buf + n * (k / 2);
    int64_t nb = k / bs, h = bs / 2;
#ifdef HAVE_AVX2
    if (h % 8 == 0) {
        int64_t blocks = (out + GEMV_ROWS - 1) / GEMV_ROWS;
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
        for (int64_t ob = 0; ob < blocks; ob++)
            for (int64_t r = 0; r < n; r++) {
                const float *e = xe + r * (k / 2), *od = xo + r * (k / 2);
                int64_t o0 = ob * GEMV_ROWS;
                if (o0 + GEMV_ROWS <= out)
                    nf4_rows(e, od, codes, k, absmax, qabsmax, book, ascale, aoffset, levels, nb, h, o0, GEMV_ROWS,
                             y + r * out);
                else
                    for (int64_t o = o0; o < out; o++)
                        nf4_rows(e, od, codes, k, absmax, qabsmax, book, ascale, aoffset, levels, nb, h, o, 1,
                                 y + r * out);
            }
        free(buf);
        return 0;
    }
#endif
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (int64_t o = 0; o < out; o++) {
        float lanes[MAX_ROWS][LANES] = {{0}};
        for (int64_t bl = 0; bl < nb; bl++) {
            const uint8_t *c = codes + o * (k / 2) + bl * h;
            int64_t b = o * nb + bl;
            float am = absmax ? absmax[b] : book[qabsmax[b]] * ascale[b / 256] + aoffset[0];
            for (int64_t r = 0; r < n; r++) {
                const float *e = xe + r * (k / 2) + bl * h, *od = xo + r * (k / 2) + bl * h;
                float p[LANES] = {0};
                dot_levels(c, levels, e, od, h, p);
#pragma omp simd
                for (int i = 0; i < LANES; i++) lanes[r][i] += am * p[i];
            }
        }
        for (int64_t r = 0; r < n; r++) y[r * out + o] = lane_sum(lanes[r]);
    }
    free(buf);
    return 0;
}

/* NF4/FP4 materialize of whole blocks: out [count] = level * absmax, codes[0] starting block `first`. absmax
 * [>= ceil(count / bs)] float32 from block `first` on, or NULL: double quantization, decoded here as in
 * nf4_gemv (qabsmax indexed from block `first`, ascale by the global block index). */
void nf4_dequant(const uint8_t *codes, const float *absmax, const uint8_t *qabsmax, const float *book,
                 const float *ascale, const float *aoffset, int64_t first, const float *levels, int64_t bs,
                 int64_t count, float *out, int nt) {
    int64_t nb = (count + bs - 1) / bs;
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (int64_t bl = 0; bl < nb; bl++) {
        int64_t start = bl * bs, len = count - start < bs ? count - start : bs, j = 0;
        float am = absmax ? absmax[bl] : book[qabsmax[bl]] * ascale[(first + bl) / 256] + aoffset[0];
        const uint8_t *c = codes + start / 2;
        float *dst = out + start;
#ifdef HAVE_AVX2 /* 16 levels in two registers (see dot_levels); the two nibbles' values interleaved on store */
        __m256 l0 = _mm256_loadu_ps(levels), l1 = _mm256_loadu_ps(levels + 8), va = _mm256_set1_ps(am);
        const __m256i mask = _mm256_set1_epi32(15);
        for (; 2 * j + 16 <= len; j += 8) {
            __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(c + j)));
            __m256i hi = _mm256_srli_epi32(v, 4), lo = _mm256_and_si256(v, mask);
            __m256 vh = _mm256_mul_ps(_mm256_blendv_ps(_mm256_permutevar8x32_ps(l0, hi), _mm256_permutevar8x32_ps(l1, hi),
                                                       _mm256_castsi256_ps(_mm256_slli_epi32(hi, 28))), va);
            __m256 vl = _mm256_mul_ps(_mm256_blendv_ps(_mm256_permutevar8x32_ps(l0, lo), _mm256_permutevar8x32_ps(l1, lo),
                                                       _mm256_castsi256_ps(_mm256_slli_epi32(lo, 28))), va);
            __m256 a0 = _mm256_unpacklo_ps(vh, vl), a1 = _mm256_unpackhi_ps(vh, vl);  /* pairs 0,1,4,5 | 2,3,6,7 */
            _mm256_storeu_ps(dst + 2 * j, _mm256_permute2f128_ps(a0, a1, 0x20));
            _mm256_storeu_ps(dst + 2 * j + 8, _mm256_permute2f128_ps(a0, a1, 0x31));
        }
#endif
        for (; 2 * j + 1 < len; j++) {
            dst[2 * j] = levels[c[j] >> 4] * am;
            dst[2 * j + 1] = levels[c[j] & 15] * am;
        }
        if (len % 2) dst[len - 1] = levels[c[len / 2] >> 4] * am;
    }
}
