/* Quantized linear layers for x86 CPUs: y = x @ dequant(W)^T + bias, fp32 in and out.

llm/kernels/cpu_build.py compiles this file at first use, once per instruction set: with -mavx2 -mfma
(VEC = 8 fp32 lanes) or -mavx512f (VEC = 16); the macros below pick the intrinsics. Plain C taking raw
pointers and sizes, loaded with ctypes; nothing here knows torch.

Layouts (the contract is llm/kernels/reference.py):
  int8  q int8 (N, K) row-major, scale fp32 (N,):        W[n, k] = q[n, k] * scale[n]
  int4  q uint8 (N, K/2), column 2j in the low nibble of byte j and 2j+1 in the high one, each nibble holding
        w + 8 in [0, 15]; scale fp32 (N, K/group):       W[n, k] = (nibble - 8) * scale[n, k / group]
Both need K % VEC == 0; int4 needs group % (2 VEC) == 0 (a chunk of 2 VEC columns never straddles a group).

Two paths, neither of which materialises the dequantized weight:
  decode (M <= DECODE_ROWS rows of x): threads split the weight into blocks of 4 rows; each block is streamed
    once from memory and converted to fp32 in registers (int8: sign-extend and convert; int4: zero-extend
    VEC bytes to 32-bit lanes, mask and shift out the two nibbles, convert), multiplied into x with FMAs.
    int4 scales a group's dot product once, and applies the -8 offset once per group through the group's
    sum of x, as llama.cpp's Q4_0 dot products do. A chunk's low nibbles hold its even columns and the high
    nibbles its odd ones, so x is reordered once per call ([even | odd] within each chunk of 2 VEC columns).
  prefill (more rows): each thread dequantizes a panel of PANEL weight rows into an fp32 buffer that stays
    in L2 and multiplies every row of x by it with a 4 x 2 register tile, so a weight is converted once per
    call rather than once per row of x.

int8-dynamic (activations quantized per token, the int8 GEMM is torch._int_mm): quantize_rows and
rescale_rows are its two element-wise passes, each one loop over memory instead of torch's chain of ops.
*/
#include <float.h>
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#if defined(__AVX512F__)
#define VEC 16
typedef __m512 vf;
typedef __m512i vi;
#define vzero() _mm512_setzero_ps()
#define vload(p) _mm512_loadu_ps(p)
#define vstore(p, a) _mm512_storeu_ps(p, a)
#define vset1(a) _mm512_set1_ps(a)
#define vadd(a, b) _mm512_add_ps(a, b)
#define vmul(a, b) _mm512_mul_ps(a, b)
#define vfma(a, b, c) _mm512_fmadd_ps(a, b, c)
#define vsum(a) _mm512_reduce_add_ps(a)
#define vcvt(a) _mm512_cvtepi32_ps(a)
#define iset1(a) _mm512_set1_epi32(a)
#define iand(a, b) _mm512_and_si512(a, b)
#define isrl(a, n) _mm512_srli_epi32(a, n)
#define load_i8(p) _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p))) /* VEC int8 -> int32 lanes */
#define load_u8(p) _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p))) /* VEC uint8 -> int32 lanes */
#elif defined(__AVX2__) && defined(__FMA__)
#define VEC 8
typedef __m256 vf;
typedef __m256i vi;
#define vzero() _mm256_setzero_ps()
#define vload(p) _mm256_loadu_ps(p)
#define vstore(p, a) _mm256_storeu_ps(p, a)
#define vset1(a) _mm256_set1_ps(a)
#define vadd(a, b) _mm256_add_ps(a, b)
#define vmul(a, b) _mm256_mul_ps(a, b)
#define vfma(a, b, c) _mm256_fmadd_ps(a, b, c)
#define vcvt(a) _mm256_cvtepi32_ps(a)
#define iset1(a) _mm256_set1_epi32(a)
#define iand(a, b) _mm256_and_si256(a, b)
#define isrl(a, n) _mm256_srli_epi32(a, n)
#define load_i8(p) _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p)))
#define load_u8(p) _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p)))
static inline float vsum(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#else
#error "build with -mavx2 -mfma or -mavx512f"
#endif

#define INLINE static inline __attribute__((always_inline))
#define DECODE_ROWS 4 /* up to this many rows of x, stream the integer weight once per row of x */
#define BLOCK 4       /* weight rows per block on the decode path */
#define PANEL 8       /* weight rows dequantized at a time on the prefill path */

int vector_width(void) { return VEC; }

static float dot(const float *a, const float *b, int64_t n) {
    vf acc = vzero();
    int64_t i = 0;
    for (; i + VEC <= n; i += VEC) acc = vfma(vload(a + i), vload(b + i), acc);
    float s = vsum(acc);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* ------------------------------------------------------------------------------------------------ decode */

/* y[m, n0 + r] for r < nb <= BLOCK and m < M, from int8 weight rows n0 .. n0 + nb - 1 (read from memory once:
   they stay in L1 for the later rows of x). The next block is prefetched as this one is read (a prefetch never
   faults, past the end of the weight included). */
INLINE void int8_rows(const float *x, const int8_t *q, const float *scale, const float *bias, float *y,
                      int64_t M, int64_t N, int64_t K, int64_t n0, int nb) {
    const int8_t *qr[BLOCK];
    for (int r = 0; r < BLOCK; r++) qr[r] = q + (n0 + (r < nb ? r : 0)) * K; /* rows past nb repeat row n0 */
    for (int64_t m = 0; m < M; m++) {
        const float *xm = x + m * K;
        vf acc[BLOCK][2];
        for (int r = 0; r < BLOCK; r++) acc[r][0] = acc[r][1] = vzero();
        int64_t k = 0;
        for (; k + 2 * VEC <= K; k += 2 * VEC) {
            vf x0 = vload(xm + k), x1 = vload(xm + k + VEC);
            for (int r = 0; r < BLOCK; r++) {
                if (m == 0 && k % 64 == 0) _mm_prefetch((const char *)(qr[r] + BLOCK * K + k), _MM_HINT_T0);
                acc[r][0] = vfma(vcvt(load_i8(qr[r] + k)), x0, acc[r][0]);
                acc[r][1] = vfma(vcvt(load_i8(qr[r] + k + VEC)), x1, acc[r][1]);
            }
        }
        if (k < K) {
            vf x0 = vload(xm + k);
            for (int r = 0; r < BLOCK; r++) acc[r][0] = vfma(vcvt(load_i8(qr[r] + k)), x0, acc[r][0]);
        }
        for (int r = 0; r < nb; r++) {
            int64_t n = n0 + r;
            y[m * N + n] = vsum(vadd(acc[r][0], acc[r][1])) * scale[n] + (bias ? bias[n] : 0.0f);
        }
    }
}

/* The same for int4: xp is x reordered per chunk, xsum[m, g] the sum of x[m] over group g. */
INLINE void int4_rows(const float *xp, const float *xsum, const uint8_t *q, const float *scale, const float *bias,
                      float *y, int64_t M, int64_t N, int64_t K, int64_t group, int64_t n0, int nb) {
    const int64_t G = K / group, row = K / 2;
    const vi low = iset1(15);
    const uint8_t *qr[BLOCK];
    const float *sr[BLOCK];
    for (int r = 0; r < BLOCK; r++) {
        int64_t n = n0 + (r < nb ? r : 0);
        qr[r] = q + n * row;
        sr[r] = scale + n * G;
    }
    for (int64_t m = 0; m < M; m++) {
        const float *xm = xp + m * K;
        vf total[BLOCK];
        for (int r = 0; r < BLOCK; r++) total[r] = vzero();
        for (int64_t g = 0; g < G; g++) {
            vf acc[BLOCK];
            for (int r = 0; r < BLOCK; r++) acc[r] = vzero();
            for (int64_t k = g * group; k < (g + 1) * group; k += 2 * VEC) {
                vf even = vload(xm + k), odd = vload(xm + k + VEC);
                for (int r = 0; r < BLOCK; r++) {
                    if (m == 0 && k % 128 == 0) _mm_prefetch((const char *)(qr[r] + BLOCK * row + k / 2), _MM_HINT_T0);
                    vi b = load_u8(qr[r] + k / 2);
                    acc[r] = vfma(vcvt(iand(b, low)), even, acc[r]);
                    acc[r] = vfma(vcvt(isrl(b, 4)), odd, acc[r]);
                }
            }
            for (int r = 0; r < BLOCK; r++) total[r] = vfma(vset1(sr[r][g]), acc[r], total[r]);
        }
        for (int r = 0; r < nb; r++) {
            int64_t n = n0 + r; /* the -8 of every nibble: 8 * sum over groups of scale * sum(x) */
            y[m * N + n] = vsum(total[r]) - 8.0f * dot(sr[r], xsum + m * G, G) + (bias ? bias[n] : 0.0f);
        }
    }
}

/* ----------------------------------------------------------------------------------------------- prefill */

/* y[m0 + i, n0 + j] = x[m0 + i] . w[j] + bias for i < mb <= 4, j < nb <= 2; w holds fp32 rows of length K. */
INLINE void tile(const float *x, const float *w, const float *bias, float *y, int64_t N, int64_t K, int64_t m0,
                 int64_t n0, int mb, int nb) {
    vf acc[4][2];
    for (int i = 0; i < mb; i++)
        for (int j = 0; j < nb; j++) acc[i][j] = vzero();
    for (int64_t k = 0; k < K; k += VEC) {
        vf wv[2];
        for (int j = 0; j < nb; j++) wv[j] = vload(w + j * K + k);
        for (int i = 0; i < mb; i++) {
            vf xv = vload(x + (m0 + i) * K + k);
            for (int j = 0; j < nb; j++) acc[i][j] = vfma(xv, wv[j], acc[i][j]);
        }
    }
    for (int i = 0; i < mb; i++)
        for (int j = 0; j < nb; j++) y[(m0 + i) * N + n0 + j] = vsum(acc[i][j]) + (bias ? bias[n0 + j] : 0.0f);
}

/* Every row of x times the np <= PANEL dequantized weight rows w (rows n0 .. n0 + np - 1 of W). */
static void panel_matmul(const float *x, const float *w, const float *bias, float *y, int64_t M, int64_t N,
                         int64_t K, int64_t n0, int64_t np) {
    for (int64_t j = 0; j < np; j += 2) {
        const float *wj = w + j * K;
        int64_t m = 0;
        if (j + 1 < np) {
            for (; m + 4 <= M; m += 4) tile(x, wj, bias, y, N, K, m, n0 + j, 4, 2);
            for (; m < M; m++) tile(x, wj, bias, y, N, K, m, n0 + j, 1, 2);
        } else {
            for (; m + 4 <= M; m += 4) tile(x, wj, bias, y, N, K, m, n0 + j, 4, 1);
            for (; m < M; m++) tile(x, wj, bias, y, N, K, m, n0 + j, 1, 1);
        }
    }
}

/* ------------------------------------------------------------------------------------------------- entry */

/* Returns 0, or -1 when a buffer could not be allocated. */
int int8_linear(const float *x, const int8_t *q, const float *scale, const float *bias, float *y, int64_t M,
                int64_t N, int64_t K, int threads) {
    if (M <= DECODE_ROWS) {
        int64_t blocks = (N + BLOCK - 1) / BLOCK;
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t b = 0; b < blocks; b++) {
            int64_t n0 = b * BLOCK;
            int8_rows(x, q, scale, bias, y, M, N, K, n0, N - n0 < BLOCK ? N - n0 : BLOCK);
        }
        return 0;
    }
    int failed = 0;
    int64_t panels = (N + PANEL - 1) / PANEL;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *w = malloc(PANEL * K * sizeof(float));
        failed = w == NULL;
#pragma omp for schedule(static)
        for (int64_t p = 0; p < panels; p++) {
            if (failed) continue;
            int64_t n0 = p * PANEL, np = N - n0 < PANEL ? N - n0 : PANEL;
            for (int64_t r = 0; r < np; r++) {
                vf s = vset1(scale[n0 + r]);
                const int8_t *qr = q + (n0 + r) * K;
                for (int64_t k = 0; k < K; k += VEC) vstore(w + r * K + k, vmul(vcvt(load_i8(qr + k)), s));
            }
            panel_matmul(x, w, bias, y, M, N, K, n0, np);
        }
        free(w);
    }
    return failed ? -1 : 0;
}

int int4_linear(const float *x, const uint8_t *q, const float *scale, const float *bias, float *y, int64_t M,
                int64_t N, int64_t K, int64_t group, int threads) {
    const int64_t G = K / group;
    float *xp = malloc(M * K * sizeof(float)), *xsum = malloc(M * G * sizeof(float));
    int failed = xp == NULL || xsum == NULL;
    if (failed) goto done;
    for (int64_t m = 0; m < M; m++) {
        for (int64_t k = 0; k < K; k += 2 * VEC)
            for (int64_t i = 0; i < VEC; i++) {
                xp[m * K + k + i] = x[m * K + k + 2 * i];
                xp[m * K + k + VEC + i] = x[m * K + k + 2 * i + 1];
            }
        for (int64_t g = 0; g < G; g++) {
            float s = 0.0f;
            for (int64_t k = g * group; k < (g + 1) * group; k++) s += x[m * K + k];
            xsum[m * G + g] = s;
        }
    }
    if (M <= DECODE_ROWS) {
        int64_t blocks = (N + BLOCK - 1) / BLOCK;
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t b = 0; b < blocks; b++) {
            int64_t n0 = b * BLOCK;
            int4_rows(xp, xsum, q, scale, bias, y, M, N, K, group, n0, N - n0 < BLOCK ? N - n0 : BLOCK);
        }
        goto done;
    }
    int64_t panels = (N + PANEL - 1) / PANEL;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *w = malloc(PANEL * K * sizeof(float));
        failed = w == NULL;
        const vi low = iset1(15);
#pragma omp for schedule(static)
        for (int64_t p = 0; p < panels; p++) {
            if (failed) continue;
            int64_t n0 = p * PANEL, np = N - n0 < PANEL ? N - n0 : PANEL;
            for (int64_t r = 0; r < np; r++) {
                const uint8_t *qr = q + (n0 + r) * (K / 2);
                float *wr = w + r * K;
                for (int64_t g = 0; g < G; g++) {
                    float sg = scale[(n0 + r) * G + g];
                    vf s = vset1(sg), shift = vset1(-8.0f * sg);
                    for (int64_t k = g * group; k < (g + 1) * group; k += 2 * VEC) {
                        vi b = load_u8(qr + k / 2);
                        vstore(wr + k, vfma(vcvt(iand(b, low)), s, shift));
                        vstore(wr + k + VEC, vfma(vcvt(isrl(b, 4)), s, shift));
                    }
                }
            }
            panel_matmul(xp, w, bias, y, M, N, K, n0, np); /* w is in xp's column order */
        }
        free(w);
    }
done:
    free(xp);
    free(xsum);
    return failed ? -1 : 0;
}

/* ------------------------------------------------------------------------------------------ int8-dynamic */

/* Each row of x (M, K) to int8, symmetric, bit for bit as torchao quantizes activations (PerRow):
   scale[m] = max |x[m]| / 127.5 (at least FLT_EPSILON), q = clamp(round half to even(x * (1 / scale)), -128, 127). */
void quantize_rows(const float *x, int8_t *q, float *scale, int64_t M, int64_t K, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t m = 0; m < M; m++) {
        const float *xm = x + m * K;
        float amax = 0.0f;
        for (int64_t k = 0; k < K; k++) amax = fabsf(xm[k]) > amax ? fabsf(xm[k]) : amax;
        float s = amax / 127.5f > FLT_EPSILON ? amax / 127.5f : FLT_EPSILON, inverse = 1.0f / s;
        scale[m] = s;
        for (int64_t k = 0; k < K; k++) {
            float v = nearbyintf(xm[k] * inverse);
            q[m * K + k] = (int8_t)(v < -128.0f ? -128.0f : v > 127.0f ? 127.0f : v);
        }
    }
}

/* In place, y[m, n] = acc[m, n] * x_scale[m] * w_scale[n] + bias[n]: the int32 products of torch._int_mm
   become the fp32 output in the same memory. bias may be NULL. */
void rescale_rows(int32_t *acc, const float *x_scale, const float *w_scale, const float *bias, int64_t M,
                  int64_t N, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t m = 0; m < M; m++) {
        float *ym = (float *)(acc + m * N);
        const int32_t *am = acc + m * N;
        for (int64_t n = 0; n < N; n++) ym[n] = (float)am[n] * x_scale[m] * w_scale[n] + (bias ? bias[n] : 0.0f);
    }
}
