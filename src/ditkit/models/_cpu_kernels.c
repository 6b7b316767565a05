/* ditkit's CPU kernels: elementwise work that eager PyTorch runs slowly on some CPUs, and, on CPUs with
 * AMX tiles, a fused self-attention (forward and backward; at the end of this file).
 *
 * Compiled on first use for the machine it runs on (see cpu_kernels.py) and called through ctypes on
 * contiguous buffers. The loops run on OpenMP threads: linked against libgomp.so.1, the library shares
 * the OpenMP runtime PyTorch has already loaded (same soname), so its threads are PyTorch's intra-op
 * threads, not a second pool competing for the cores. Everything is computed in fp32; bf16 values are
 * widened exactly and rounded back to nearest-even, as PyTorch's CPU kernels do (with AVX512-BF16, by the
 * CPU's conversion instruction, which flushes results below 1.2e-38 to zero).
 *
 * GELU, tanh approximation (Hendrycks & Gimpel 2016):
 *   gelu(x) = 0.5 x (1 + tanh(u)),  u = sqrt(2/pi) (x + 0.044715 x^3)
 *           = x * sigmoid(2u)       (since 0.5 (1 + tanh(u)) = sigmoid(2u))
 *   gelu'(x) = s + x s (1 - s) 2 sqrt(2/pi) (1 + 3 * 0.044715 x^2),  s = sigmoid(2u)
 * The sigmoid form needs one exp per element and vectorises; the argument is clamped to +-88 so the
 * exp stays finite (sigmoid is 0 or 1 to fp32 precision well before that; below -88 it is set to 0),
 * and NaN inputs still give NaN because the result is a product with x (and, in the backward, with the
 * incoming gradient).
 */
#include <math.h>
#include <stdint.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#endif

#define SQRT_2_OVER_PI 0.7978845608028654f
#define GELU_CUBIC 0.044715f
#define PARALLEL_MIN 65536 /* elements below which one thread does the whole loop */

static inline float bf16_to_f32(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16; /* nearest, ties to even */
    uint32_t quiet_nan = (bits >> 16) | 0x40u;                        /* keep NaN a NaN */
    return (uint16_t)(((bits & 0x7fffffffu) > 0x7f800000u) ? quiet_nan : rounded);
}

/* exp(x) for |x| <= 88, inlined so the loops vectorise without calls: 2^(x log2 e) split into an integer
 * power of two (built in the exponent bits) and 2^f for f in [-0.5, 0.5] by Cephes' exp2f polynomial
 * (relative error about 2e-7, the size of fp32 rounding). */
static const float EXP2_POLY[7] = {1.535336188319500e-4f, 1.339887440266574e-3f, 9.618437357674640e-3f,
                                   5.550332471162809e-2f, 2.402264791363012e-1f, 6.931472028550421e-1f, 1.0f};
#define LOG2_E 1.4426950408889634f

static inline float exp_clamped(float x) {
    float t = x * LOG2_E;
    float n = __builtin_rintf(t);
    float f = t - n;
    float p = EXP2_POLY[0];
    for (int i = 1; i < 7; i++) p = p * f + EXP2_POLY[i];
    uint32_t bits = (uint32_t)((int32_t)n + 127) << 23; /* 2^n, n in [-127, 127]; 2^-127 reads 0 */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

static inline float sigmoid_2u(float x) {
    float z = 2.0f * SQRT_2_OVER_PI * (x + GELU_CUBIC * x * x * x);
    float zc = z > 88.0f ? 88.0f : (z < -88.0f ? -88.0f : z);
    float s = 1.0f / (1.0f + exp_clamped(-zc));
    return z < -88.0f ? 0.0f : s; /* exactly 0 below, so x * s is -0 even for x near -FLT_MAX */
}

static inline float gelu_grad(float x) {
    float s = sigmoid_2u(x);
    return s + x * s * (1.0f - s) * (2.0f * SQRT_2_OVER_PI) * (1.0f + 3.0f * GELU_CUBIC * x * x);
}

/* fp32 -> bf16 for a block, nearest-even: the CPU's own conversion instruction where it has one
 * (AVX512-BF16; it flushes subnormal results to zero, values below 1.2e-38), else the bit arithmetic. */
static inline void store_bf16(uint16_t *restrict dst, const float *restrict src, int64_t n) {
    int64_t i = 0;
#if defined(__AVX512BF16__) && defined(__AVX512F__)
    for (; i + 16 <= n; i += 16) {
        __m256bh packed = _mm512_cvtneps_pbh(_mm512_loadu_ps(src + i));
        _mm256_storeu_si256((__m256i *)(dst + i), (__m256i)packed);
    }
#endif
    for (; i < n; i++) dst[i] = f32_to_bf16(src[i]);
}

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#define DITKIT_AVX512 1
/* exp_clamped for 16 lanes, the power of two applied by vscalefps, clamped below at -100 (exp reads 0 there,
 * to fp32 precision after a sum). The clamp's operand order keeps a NaN argument a NaN (vmaxps returns its
 * second operand when one is NaN). */
static inline __m512 exp512(__m512 x) {
    __m512 t = _mm512_mul_ps(_mm512_max_ps(_mm512_set1_ps(-100.0f), x), _mm512_set1_ps(LOG2_E));
    __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(t, n);
    __m512 p = _mm512_set1_ps(EXP2_POLY[0]);
    for (int i = 1; i < 7; i++) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_POLY[i]));
    return _mm512_scalef_ps(p, n);
}

/* exp512 of four vectors in place, their steps interleaved. One exp512 is a chain of 12 dependent operations,
 * and a loop of such chains left an AMD EPYC's (Zen 4's) out-of-order core too few independent ones: the fp32
 * attention at S/2's shape took 51.7 ms on one thread with one chain per step and 38.8 ms with these four
 * (the exps' share fell from 12.6 ms to almost nothing). A cliff, not a slope: a degree-5 polynomial in place
 * of the degree-6 one was as fast as the four chains. */
static inline void exp512x4(__m512 *x) {
    __m512 t[4], n[4], p[4];
    for (int u = 0; u < 4; u++) t[u] = _mm512_mul_ps(_mm512_max_ps(_mm512_set1_ps(-100.0f), x[u]), _mm512_set1_ps(LOG2_E));
    for (int u = 0; u < 4; u++) n[u] = _mm512_roundscale_ps(t[u], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    for (int u = 0; u < 4; u++) t[u] = _mm512_sub_ps(t[u], n[u]);
    for (int u = 0; u < 4; u++) p[u] = _mm512_set1_ps(EXP2_POLY[0]);
    for (int i = 1; i < 7; i++)
        for (int u = 0; u < 4; u++) p[u] = _mm512_fmadd_ps(p[u], t[u], _mm512_set1_ps(EXP2_POLY[i]));
    for (int u = 0; u < 4; u++) x[u] = _mm512_scalef_ps(p[u], n[u]);
}

/* sigmoid_2u for 16 lanes. 1 / (1 + e) is the 14-bit reciprocal estimate refined by one Newton step
 * (relative error about 2^-27, below fp32 rounding's 2^-24), which costs a few multiplies where a division
 * costs as much as the rest of the GELU. As sigmoid_2u: 0 below z = -88, and a NaN x gives a NaN product
 * (min_ps returns its second operand, 88, for a NaN; the callers multiply by x). */
static inline __m512 sigmoid_2u_512(__m512 x) {
    const __m512 z = _mm512_mul_ps(x, _mm512_fmadd_ps(_mm512_mul_ps(x, x), _mm512_set1_ps(2.0f * SQRT_2_OVER_PI * GELU_CUBIC),
                                                     _mm512_set1_ps(2.0f * SQRT_2_OVER_PI)));
    const __m512 e = exp512(_mm512_min_ps(_mm512_sub_ps(_mm512_setzero_ps(), z), _mm512_set1_ps(88.0f)));
    const __m512 d = _mm512_add_ps(_mm512_set1_ps(1.0f), e);
    __m512 r = _mm512_rcp14_ps(d);
    r = _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0f)));
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(z, _mm512_set1_ps(-88.0f), _CMP_GE_OQ), r);
}

/* 2^t (NaN stays NaN: the clamp's operand order, as in exp512, so a NaN score poisons its row as in
 * PyTorch), for results rounded to bf16 (the attention's probabilities, 3.9e-3, and gelu_bf16_512): a
 * degree-4 polynomial on [-0.5, 0.5] (relative error 8.5e-6 where exp512 has 2e-7), two fused
 * multiply-adds fewer per 16 values. Below 2^-150 it reads 0, above 2^128 inf. */
static const float EXP2_POLY4[5] = {9.25496406853199e-3f, 5.585603043437004e-2f, 2.4031251668930054e-1f,
                                    6.93130612373352e-1f, 9.999977946281433e-1f};

static inline __m512 exp2_softmax(__m512 t) {
    t = _mm512_max_ps(_mm512_set1_ps(-150.0f), t);
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(t, n);
    __m512 p = _mm512_set1_ps(EXP2_POLY4[0]);
    for (int i = 1; i < 5; i++) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_POLY4[i]));
    return _mm512_scalef_ps(p, n);
}

/* gelu_grad for 16 lanes. */
static inline __m512 gelu_grad_512(__m512 x) {
    const __m512 s = sigmoid_2u_512(x);
    const __m512 slope = _mm512_fmadd_ps(_mm512_mul_ps(x, x), _mm512_set1_ps(2.0f * SQRT_2_OVER_PI * 3.0f * GELU_CUBIC),
                                         _mm512_set1_ps(2.0f * SQRT_2_OVER_PI));
    const __m512 s1s = _mm512_mul_ps(s, _mm512_sub_ps(_mm512_set1_ps(1.0f), s));
    return _mm512_fmadd_ps(_mm512_mul_ps(x, s1s), slope, s);
}

/* The first `valid` of 16 lanes (none for valid <= 0). */
static inline __mmask16 tail_mask(int64_t valid) {
    return valid >= 16 ? 0xffff : (valid <= 0 ? 0 : (__mmask16)((1u << valid) - 1));
}

static inline __m512 load_bf16x16(const uint16_t *src, __mmask16 m) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, src)), 16));
}

static inline __m256i bf16x16(__m512 x) { return (__m256i)_mm512_cvtneps_pbh(x); }

static inline void store_bf16x16(uint16_t *dst, __m512 v, __mmask16 m) { _mm256_mask_storeu_epi16(dst, m, bf16x16(v)); }

/* Element `offset` of a matrix that is bf16 or fp32. */
static inline void *element_at(const void *base, int32_t bf16, int64_t offset) {
    return (char *)base + offset * (bf16 ? 2 : 4);
}

/* Elements i..i+15 (masked) of a row that is bf16 or fp32, as fp32; and the store to such a row. */
static inline __m512 load_row(const void *row, int32_t bf16, int64_t i, __mmask16 m) {
    return bf16 ? load_bf16x16((const uint16_t *)row + i, m) : _mm512_maskz_loadu_ps(m, (const float *)row + i);
}

static inline void store_row(void *row, int32_t bf16, int64_t i, __m512 v, __mmask16 m) {
    if (bf16)
        store_bf16x16((uint16_t *)row + i, v, m);
    else
        _mm512_mask_storeu_ps((float *)row + i, m, v);
}
#endif

/* 64-byte aligned memory (free() releases it), the size rounded up to whole lines as aligned_alloc requires. */
#ifdef DITKIT_AVX512
static void *aligned_buffer(size_t bytes) { return aligned_alloc(64, (bytes + 63) / 64 * 64); }
#endif

#define BLOCK 1024 /* elements per block of the bf16 loops: fp32 staging that stays in L1 */

#ifdef DITKIT_AVX512
/* The GELU for an output rounded to bf16 (8 significant bits): x / (1 + 2^t), t = -2u log2(e), with
 * exp2_softmax's degree-4 polynomial (relative error 8.5e-6) and the reciprocal estimate alone (2^-14,
 * 6.1e-5): about 7e-5 before the rounding, under 2% of a bf16 unit, where the fp32 kernel's exp and Newton
 * step spend ten more instructions per 16 values on accuracy the rounding discards. t is clamped to
 * [-150, 150] (NaN stays NaN, the clamps' operand order): above, 2^t is inf and the reciprocal 0, so
 * x -> -0 far below as in sigmoid_2u_512, and -inf -> NaN as in PyTorch; below, 2^t is 0 and x passes. */
static inline __m512 gelu_bf16_512(__m512 x) {
    const __m512 a = _mm512_set1_ps(-2.0f * SQRT_2_OVER_PI * LOG2_E), b = _mm512_set1_ps(-2.0f * SQRT_2_OVER_PI * LOG2_E * GELU_CUBIC);
    const __m512 t = _mm512_min_ps(_mm512_set1_ps(150.0f), _mm512_mul_ps(x, _mm512_fmadd_ps(_mm512_mul_ps(x, x), b, a)));
    return _mm512_mul_ps(x, _mm512_rcp14_ps(_mm512_add_ps(_mm512_set1_ps(1.0f), exp2_softmax(t))));
}

/* The elementwise GELU loops over fp32 or bf16, 16 lanes at a time (the last vector masked). */
static void gelu_512(const void *restrict x, void *restrict y, int32_t bf16, int64_t n) {
#pragma omp parallel for schedule(static) if (n >= PARALLEL_MIN)
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 mask = tail_mask(n - i);
        const __m512 v = load_row(x, bf16, i, mask);
        store_row(y, bf16, i, bf16 ? gelu_bf16_512(v) : _mm512_mul_ps(v, sigmoid_2u_512(v)), mask);
    }
}

static void gelu_backward_512(const void *restrict grad, const void *restrict x, void *restrict out, int32_t bf16,
                              int64_t n) {
#pragma omp parallel for schedule(static) if (n >= PARALLEL_MIN)
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 mask = tail_mask(n - i);
        const __m512 g = load_row(grad, bf16, i, mask);
        store_row(out, bf16, i, _mm512_mul_ps(g, gelu_grad_512(load_row(x, bf16, i, mask))), mask);
    }
}

void ditkit_gelu_tanh_f32(const float *restrict x, float *restrict y, int64_t n) { gelu_512(x, y, 0, n); }

void ditkit_gelu_tanh_bf16(const uint16_t *restrict x, uint16_t *restrict y, int64_t n) { gelu_512(x, y, 1, n); }

void ditkit_gelu_tanh_backward_f32(const float *restrict grad, const float *restrict x, float *restrict out,
                                   int64_t n) {
    gelu_backward_512(grad, x, out, 0, n);
}

void ditkit_gelu_tanh_backward_bf16(const uint16_t *restrict grad, const uint16_t *restrict x,
                                    uint16_t *restrict out, int64_t n) {
    gelu_backward_512(grad, x, out, 1, n);
}
#else
void ditkit_gelu_tanh_f32(const float *restrict x, float *restrict y, int64_t n) {
#pragma omp parallel for simd schedule(static) if (n >= PARALLEL_MIN)
    for (int64_t i = 0; i < n; i++) {
        float v = x[i];
        y[i] = v * sigmoid_2u(v);
    }
}

void ditkit_gelu_tanh_bf16(const uint16_t *restrict x, uint16_t *restrict y, int64_t n) {
#pragma omp parallel for schedule(static) if (n >= PARALLEL_MIN)
    for (int64_t start = 0; start < n; start += BLOCK) {
        float buf[BLOCK];
        int64_t m = n - start < BLOCK ? n - start : BLOCK;
        const uint16_t *xb = x + start;
#pragma omp simd
        for (int64_t i = 0; i < m; i++) {
            float v = bf16_to_f32(xb[i]);
            buf[i] = v * sigmoid_2u(v);
        }
        store_bf16(y + start, buf, m);
    }
}

void ditkit_gelu_tanh_backward_f32(const float *restrict grad, const float *restrict x, float *restrict out,
                                   int64_t n) {
#pragma omp parallel for simd schedule(static) if (n >= PARALLEL_MIN)
    for (int64_t i = 0; i < n; i++) {
        out[i] = grad[i] * gelu_grad(x[i]);
    }
}

void ditkit_gelu_tanh_backward_bf16(const uint16_t *restrict grad, const uint16_t *restrict x,
                                    uint16_t *restrict out, int64_t n) {
#pragma omp parallel for schedule(static) if (n >= PARALLEL_MIN)
    for (int64_t start = 0; start < n; start += BLOCK) {
        float buf[BLOCK];
        int64_t m = n - start < BLOCK ? n - start : BLOCK;
        const uint16_t *gb = grad + start, *xb = x + start;
#pragma omp simd
        for (int64_t i = 0; i < m; i++) buf[i] = bf16_to_f32(gb[i]) * gelu_grad(bf16_to_f32(xb[i]));
        store_bf16(out + start, buf, m);
    }
}
#endif

/* ditkit_gelu_tanh_backward_bf16 over an (m, k) matrix that also sums the result over its rows into
 * bias_grad (k fp32, overwritten): the gradient of the bias of the linear layer before the GELU, formed
 * while the values are at hand (fp32, before rounding) instead of in a second pass over the matrix. */
int32_t ditkit_gelu_tanh_backward_bias_bf16(const uint16_t *restrict grad, const uint16_t *restrict x,
                                            uint16_t *restrict out, float *restrict bias_grad, int64_t m, int64_t k) {
    /* one row of partial sums per thread, added up in thread order afterwards: the same result every run */
    const int threads = omp_get_max_threads();
    float *parts = calloc((size_t)threads * k, sizeof(float));
    if (!parts) return -1;
#pragma omp parallel if (m * k >= PARALLEL_MIN)
    {
        float *part = parts + (size_t)omp_get_thread_num() * k;
#ifndef DITKIT_AVX512
        float buf[BLOCK];
#endif
#pragma omp for schedule(static)
        for (int64_t r = 0; r < m; r++) {
            for (int64_t start = 0; start < k; start += BLOCK) {
                int64_t len = k - start < BLOCK ? k - start : BLOCK;
                const uint16_t *gb = grad + r * k + start, *xb = x + r * k + start;
                float *pb = part + start;
#ifdef DITKIT_AVX512
                for (int64_t i = 0; i < len; i += 16) {
                    const __mmask16 mask = tail_mask(len - i);
                    const __m512 g = _mm512_mul_ps(load_bf16x16(gb + i, mask), gelu_grad_512(load_bf16x16(xb + i, mask)));
                    _mm512_mask_storeu_ps(pb + i, mask, _mm512_add_ps(_mm512_maskz_loadu_ps(mask, pb + i), g));
                    store_bf16x16(out + r * k + start + i, g, mask);
                }
#else
#pragma omp simd
                for (int64_t i = 0; i < len; i++) {
                    buf[i] = bf16_to_f32(gb[i]) * gelu_grad(bf16_to_f32(xb[i]));
                    pb[i] += buf[i];
                }
                store_bf16(out + r * k + start, buf, len);
#endif
            }
        }
    }
    for (int64_t j = 0; j < k; j++) bias_grad[j] = 0.0f;
    for (int i = 0; i < threads; i++)
        for (int64_t j = 0; j < k; j++) bias_grad[j] += parts[(size_t)i * k + j];
    free(parts);
    return 0;
}

/* LayerNorm (no affine) + adaLN modulation over x (N, T, D) fp32, per-sample shift and scale (N, D) fp32:
 *   out = (x - mean) * rstd * (1 + scale[n]) + shift[n],  rstd = 1 / sqrt(var + eps)  (biased variance)
 * written as fp32 (out_bf16 = 0) or bf16. Statistics in fp32 from the fp32 input; mean and rstd (N*T)
 * are stored when the pointers are not NULL (training keeps them for the backward). */
#ifdef DITKIT_AVX512
/* One row of ditkit_norm_modulate, 16 lanes at a time (the same two passes for the statistics). */
static inline void norm_modulate_row512(const float *restrict xr, const float *restrict sh, const float *restrict sc,
                                        void *restrict out, int32_t out_bf16, float *mean_out, float *rstd_out,
                                        int64_t d, float eps) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= d; i += 32) {
        acc0 = _mm512_add_ps(acc0, _mm512_loadu_ps(xr + i));
        acc1 = _mm512_add_ps(acc1, _mm512_loadu_ps(xr + i + 16));
    }
    for (; i < d; i += 16) acc0 = _mm512_add_ps(acc0, _mm512_maskz_loadu_ps(tail_mask(d - i), xr + i));
    const float mean = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) / (float)d;
    const __m512 mv = _mm512_set1_ps(mean);
    acc0 = acc1 = _mm512_setzero_ps();
    for (i = 0; i + 32 <= d; i += 32) {
        const __m512 a = _mm512_sub_ps(_mm512_loadu_ps(xr + i), mv), b = _mm512_sub_ps(_mm512_loadu_ps(xr + i + 16), mv);
        acc0 = _mm512_fmadd_ps(a, a, acc0);
        acc1 = _mm512_fmadd_ps(b, b, acc1);
    }
    for (; i < d; i += 16) {
        const __mmask16 m = tail_mask(d - i);
        const __m512 a = _mm512_maskz_sub_ps(m, _mm512_maskz_loadu_ps(m, xr + i), mv);
        acc0 = _mm512_fmadd_ps(a, a, acc0);
    }
    const float rstd = 1.0f / sqrtf(_mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) / (float)d + eps);
    if (mean_out) *mean_out = mean;
    if (rstd_out) *rstd_out = rstd;
    const __m512 rv = _mm512_set1_ps(rstd), one = _mm512_set1_ps(1.0f);
    for (i = 0; i < d; i += 16) {
        const __mmask16 m = tail_mask(d - i);
        const __m512 xhat = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, xr + i), mv), rv);
        const __m512 o = _mm512_fmadd_ps(xhat, _mm512_add_ps(one, _mm512_maskz_loadu_ps(m, sc + i)),
                                         _mm512_maskz_loadu_ps(m, sh + i));
        store_row(out, out_bf16, i, o, m);
    }
}
#endif

void ditkit_norm_modulate(const float *restrict x, const float *restrict shift, const float *restrict scale,
                          void *restrict out, int32_t out_bf16, float *restrict mean_out, float *restrict rstd_out,
                          int64_t n, int64_t t, int64_t d, float eps) {
#pragma omp parallel for schedule(static) if (n * t * d >= PARALLEL_MIN)
    for (int64_t row = 0; row < n * t; row++) {
        const float *xr = x + row * d;
        const float *sh = shift + (row / t) * d;
        const float *sc = scale + (row / t) * d;
#ifdef DITKIT_AVX512
        norm_modulate_row512(xr, sh, sc, element_at(out, out_bf16, row * d), out_bf16, mean_out ? mean_out + row : NULL,
                             rstd_out ? rstd_out + row : NULL, d, eps);
#else
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < d; i++) sum += xr[i];
        float mean = sum / (float)d;
        float sq = 0.0f;
#pragma omp simd reduction(+ : sq)
        for (int64_t i = 0; i < d; i++) sq += (xr[i] - mean) * (xr[i] - mean);
        float rstd = 1.0f / sqrtf(sq / (float)d + eps);
        if (mean_out) mean_out[row] = mean;
        if (rstd_out) rstd_out[row] = rstd;
        if (out_bf16) {
            uint16_t *o = (uint16_t *)out + row * d;
            float buf[BLOCK];
            for (int64_t start = 0; start < d; start += BLOCK) {
                int64_t m = d - start < BLOCK ? d - start : BLOCK;
#pragma omp simd
                for (int64_t i = 0; i < m; i++) {
                    int64_t j = start + i;
                    buf[i] = (xr[j] - mean) * rstd * (1.0f + sc[j]) + sh[j];
                }
                store_bf16(o + start, buf, m);
            }
        } else {
            float *o = (float *)out + row * d;
#pragma omp simd
            for (int64_t i = 0; i < d; i++) o[i] = (xr[i] - mean) * rstd * (1.0f + sc[i]) + sh[i];
        }
#endif
    }
}

/* Its backward, given the output's gradient (fp32 or bf16):
 *   xhat = (x - mean) rstd,  g = grad (1 + scale[n])
 *   grad_x = rstd (g - mean_d(g) - xhat mean_d(g xhat))          (N, T, D) fp32
 *   grad_scale[n] = sum_t grad xhat,  grad_shift[n] = sum_t grad   (N, D) fp32
 * plus `residual` (N, T, D) fp32 in grad_x where it is not NULL: the gradient x also receives through the
 * residual connection around the branch, added here instead of in a separate pass over both.
 * Samples are split across threads, so each sample's sums over its tokens are one thread's. */
void ditkit_norm_modulate_backward(const void *restrict grad, int32_t grad_bf16, const float *restrict x,
                                   const float *restrict mean, const float *restrict rstd,
                                   const float *restrict scale, const float *restrict residual,
                                   float *restrict grad_x, float *restrict grad_scale, float *restrict grad_shift,
                                   int64_t n, int64_t t, int64_t d) {
#pragma omp parallel for schedule(static) if (n * t * d >= PARALLEL_MIN)
    for (int64_t s = 0; s < n; s++) {
        float *gsc = grad_scale + s * d;
        float *gsh = grad_shift + s * d;
        const float *sc = scale + s * d;
        for (int64_t i = 0; i < d; i++) gsc[i] = gsh[i] = 0.0f;
        for (int64_t r = s * t; r < (s + 1) * t; r++) {
            const float *xr = x + r * d;
            float *gx = grad_x + r * d;
            float m = mean[r], rs = rstd[r];
#ifdef DITKIT_AVX512
            const void *grow = element_at(grad, grad_bf16, r * d);
            const __m512 mv = _mm512_set1_ps(m), rv = _mm512_set1_ps(rs), one = _mm512_set1_ps(1.0f);
            __m512 sum_g = _mm512_setzero_ps(), sum_gx = _mm512_setzero_ps();
            for (int64_t i = 0; i < d; i += 16) {
                const __mmask16 k = tail_mask(d - i);
                const __m512 go = load_row(grow, grad_bf16, i, k);
                const __m512 xhat = _mm512_maskz_mul_ps(k, _mm512_sub_ps(_mm512_maskz_loadu_ps(k, xr + i), mv), rv);
                _mm512_mask_storeu_ps(gsc + i, k, _mm512_fmadd_ps(go, xhat, _mm512_maskz_loadu_ps(k, gsc + i)));
                _mm512_mask_storeu_ps(gsh + i, k, _mm512_add_ps(go, _mm512_maskz_loadu_ps(k, gsh + i)));
                const __m512 g = _mm512_mul_ps(go, _mm512_add_ps(one, _mm512_maskz_loadu_ps(k, sc + i)));
                sum_g = _mm512_add_ps(sum_g, g);
                sum_gx = _mm512_fmadd_ps(g, xhat, sum_gx);
            }
            const __m512 mg = _mm512_set1_ps(_mm512_reduce_add_ps(sum_g) / (float)d);
            const __m512 mgx = _mm512_set1_ps(_mm512_reduce_add_ps(sum_gx) / (float)d);
            const float *res = residual ? residual + r * d : NULL;
            for (int64_t i = 0; i < d; i += 16) {
                const __mmask16 k = tail_mask(d - i);
                const __m512 xhat = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, xr + i), mv), rv);
                const __m512 g = _mm512_mul_ps(load_row(grow, grad_bf16, i, k),
                                               _mm512_add_ps(one, _mm512_maskz_loadu_ps(k, sc + i)));
                __m512 out = _mm512_mul_ps(rv, _mm512_sub_ps(_mm512_sub_ps(g, mg), _mm512_mul_ps(xhat, mgx)));
                if (res) out = _mm512_add_ps(out, _mm512_maskz_loadu_ps(k, res + i));
                _mm512_mask_storeu_ps(gx + i, k, out);
            }
#else
            /* gx first holds the incoming gradient in fp32 */
            if (grad_bf16) {
                const uint16_t *g = (const uint16_t *)grad + r * d;
#pragma omp simd
                for (int64_t i = 0; i < d; i++) gx[i] = bf16_to_f32(g[i]);
            } else {
                const float *g = (const float *)grad + r * d;
#pragma omp simd
                for (int64_t i = 0; i < d; i++) gx[i] = g[i];
            }
            float sum_g = 0.0f, sum_gx = 0.0f;
#pragma omp simd reduction(+ : sum_g, sum_gx)
            for (int64_t i = 0; i < d; i++) {
                float xhat = (xr[i] - m) * rs;
                float go = gx[i];
                gsc[i] += go * xhat;
                gsh[i] += go;
                float g = go * (1.0f + sc[i]);
                sum_g += g;
                sum_gx += g * xhat;
            }
            float mg = sum_g / (float)d, mgx = sum_gx / (float)d;
            const float *res = residual ? residual + r * d : NULL;
#pragma omp simd
            for (int64_t i = 0; i < d; i++) {
                float xhat = (xr[i] - m) * rs;
                gx[i] = rs * (gx[i] * (1.0f + sc[i]) - mg - xhat * mgx) + (res ? res[i] : 0.0f);
            }
#endif
        }
    }
}

/* adaLN-Zero's gated residual over x (N, T, D) fp32 with a per-sample gate (N, D) fp32 and the branch
 * (N, T, D) fp32 or bf16:  out = x + gate[n] * branch  (fp32). */
void ditkit_gated_residual(const float *restrict x, const float *restrict gate, const void *restrict branch,
                           int32_t branch_bf16, float *restrict out, int64_t n, int64_t t, int64_t d) {
#pragma omp parallel for schedule(static) if (n * t * d >= PARALLEL_MIN)
    for (int64_t row = 0; row < n * t; row++) {
        const float *xr = x + row * d;
        const float *g = gate + (row / t) * d;
        float *o = out + row * d;
        if (branch_bf16) {
            const uint16_t *b = (const uint16_t *)branch + row * d;
#pragma omp simd
            for (int64_t i = 0; i < d; i++) o[i] = xr[i] + g[i] * bf16_to_f32(b[i]);
        } else {
            const float *b = (const float *)branch + row * d;
#pragma omp simd
            for (int64_t i = 0; i < d; i++) o[i] = xr[i] + g[i] * b[i];
        }
    }
}

/* ditkit_gated_residual, then ditkit_norm_modulate of its result (inference: no statistics kept), row by
 * row while the row is in L1: x_out = x + gate[n] * branch (fp32), out = LayerNorm(x_out) * (1 + scale[n])
 * + shift[n] (fp32 or bf16). One pass over the residual stream where the two kernels make two. */
void ditkit_gated_residual_norm_modulate(const float *restrict x, const float *restrict gate,
                                         const void *restrict branch, int32_t branch_bf16, float *restrict x_out,
                                         const float *restrict shift, const float *restrict scale, void *restrict out,
                                         int32_t out_bf16, int64_t n, int64_t t, int64_t d, float eps) {
#ifdef DITKIT_AVX512
#pragma omp parallel for schedule(static) if (n * t * d >= PARALLEL_MIN)
    for (int64_t row = 0; row < n * t; row++) {
        const float *xr = x + row * d, *g = gate + (row / t) * d;
        const void *b = element_at(branch, branch_bf16, row * d);
        float *o = x_out + row * d;
        for (int64_t i = 0; i < d; i += 16) {
            const __mmask16 m = tail_mask(d - i);
            _mm512_mask_storeu_ps(o + i, m, _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, g + i), load_row(b, branch_bf16, i, m),
                                                             _mm512_maskz_loadu_ps(m, xr + i)));
        }
        norm_modulate_row512(o, shift + (row / t) * d, scale + (row / t) * d, element_at(out, out_bf16, row * d), out_bf16,
                             NULL, NULL, d, eps);
    }
#else /* the two passes */
    ditkit_gated_residual(x, gate, branch, branch_bf16, x_out, n, t, d);
    ditkit_norm_modulate(x_out, shift, scale, out, out_bf16, NULL, NULL, n, t, d, eps);
#endif
}

/* Its backward for the branch and the gate (x's gradient is the incoming one, unchanged):
 *   grad_branch = grad * gate[n]  (in the branch's dtype),  grad_gate[n] = sum_t grad * branch  (fp32).
 * Samples are split across threads, so each sample's sum over its tokens is one thread's. */
void ditkit_gated_residual_backward(const float *restrict grad, const float *restrict gate,
                                    const void *restrict branch, int32_t branch_bf16, void *restrict grad_branch,
                                    float *restrict grad_gate, int64_t n, int64_t t, int64_t d) {
#pragma omp parallel for schedule(static) if (n * t * d >= PARALLEL_MIN)
    for (int64_t s = 0; s < n; s++) {
        const float *g = gate + s * d;
        float *gg = grad_gate + s * d;
        for (int64_t i = 0; i < d; i++) gg[i] = 0.0f;
        for (int64_t r = s * t; r < (s + 1) * t; r++) {
            const float *gr = grad + r * d;
            if (branch_bf16) {
                const uint16_t *b = (const uint16_t *)branch + r * d;
                uint16_t *gb = (uint16_t *)grad_branch + r * d;
                float buf[BLOCK];
                for (int64_t start = 0; start < d; start += BLOCK) {
                    int64_t m = d - start < BLOCK ? d - start : BLOCK;
#pragma omp simd
                    for (int64_t i = 0; i < m; i++) {
                        int64_t j = start + i;
                        buf[i] = gr[j] * g[j];
                        gg[j] += gr[j] * bf16_to_f32(b[j]);
                    }
                    store_bf16(gb + start, buf, m);
                }
            } else {
                const float *b = (const float *)branch + r * d;
                float *gb = (float *)grad_branch + r * d;
#pragma omp simd
                for (int64_t i = 0; i < d; i++) {
                    gb[i] = gr[i] * g[i];
                    gg[i] += gr[i] * b[i];
                }
            }
        }
    }
}

/* ---- Self-attention on AMX tiles (bf16 in, fp32 accumulate), forward and backward ----
 *
 * softmax(scale q k^T) v for each (sample, head), with q, k, v read in place from strided rows (the
 * (N, T, 3, H, D) output of a fused QKV projection needs no permute copies) and the output written as
 * (N, T, H, D), ready for the output projection. Every product is C = A B on AMX tiles: A row-major
 * bf16, B "pair-interleaved" (rows 2i and 2i+1 of B stored side by side, element by element, the layout
 * the tile instruction reads), C fp32. Tokens are padded to a multiple of 32 in the per-thread buffers
 * (padded keys get probability 0, padded queries are never written); the head size must be a multiple
 * of 32. The scores stay fp32 from the product through the softmax (PyTorch's bf16 matmul form rounds them
 * to bf16 first); the probabilities are rounded to bf16 once and, for training, saved pair-interleaved
 * (N, H, Tp/2, Tp, 2), so the backward's dV = P^T dO reads them as its B operand directly.
 *
 * Backward (S = scale q k^T, P = softmax(S), dP = dO v^T):
 *   dS = P (dP - rowsum(dO * O)) scale,  dq = dS k,  dk^T = q^T dS,  dv^T = dO^T P
 * (dk and dv are formed transposed, so that both operands are row-major or pair-interleaved).
 *
 * AMX state is per thread: each OpenMP thread loads its tile configuration, and restores the one it found
 * (or releases the tiles) before it leaves, so PyTorch's own AMX kernels find the state they left. */
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__linux__)
#define DITKIT_AMX 1
#include <sys/syscall.h>
#include <unistd.h>

typedef struct {
    uint8_t palette_id;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* Asks Linux for permission to use the AMX tile registers (per process; harmless to repeat). */
int32_t ditkit_amx_init(void) {
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
}

static void amx_begin(tile_config *saved) {
    tile_config cfg __attribute__((aligned(64)));
    memset(&cfg, 0, sizeof cfg);
    cfg.palette_id = 1;
    for (int i = 0; i < 8; i++) {
        cfg.colsb[i] = 64; /* every tile 16 rows x 64 bytes: 16x32 bf16 operands, 16x16 fp32 results */
        cfg.rows[i] = 16;
    }
    _tile_storeconfig(saved);
    _tile_loadconfig(&cfg);
}

/* A thread's start in a kernel: with its buffers allocated (ok), its tiles configured; else the whole call
 * reports failure (-1: the caller raises MemoryError) and the thread skips its share. Returns ok. */
static int thread_start(int ok, int32_t *failed, tile_config *saved) {
    if (ok) {
        amx_begin(saved);
    } else {
#pragma omp atomic write
        *failed = -1;
    }
    return ok;
}

static void amx_end(const tile_config *saved) {
    if (saved->palette_id)
        _tile_loadconfig(saved);
    else
        _tile_release();
}

/* C (M x N fp32, row stride ldc bytes) = A (M x K bf16, row stride lda bytes) B, with B pair-interleaved:
 * row i of B's storage (stride ldb bytes) holds B[2i][j], B[2i+1][j] for j = 0..N-1. M, N, K multiples of
 * 32; 2x2 blocks of 16x16 result tiles (tiles 0-3), A in tiles 4-5, B in tiles 6-7. */
static void amx_gemm(const uint16_t *a, int64_t lda, const uint16_t *b, int64_t ldb, float *c, int64_t ldc,
                     int64_t m, int64_t n, int64_t k) {
    const char *A = (const char *)a, *B = (const char *)b;
    char *C = (char *)c;
    for (int64_t i = 0; i < m; i += 32) {
        for (int64_t j = 0; j < n; j += 32) {
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            const char *a0 = A + i * lda, *b0 = B + j * 4;
            for (int64_t kk = 0; kk < k; kk += 32) {
                _tile_loadd(4, a0 + kk * 2, lda);
                _tile_loadd(5, a0 + 16 * lda + kk * 2, lda);
                _tile_loadd(6, b0 + (kk / 2) * ldb, ldb);
                _tile_loadd(7, b0 + (kk / 2) * ldb + 64, ldb);
                _tile_dpbf16ps(0, 4, 6);
                _tile_dpbf16ps(1, 4, 7);
                _tile_dpbf16ps(2, 5, 6);
                _tile_dpbf16ps(3, 5, 7);
            }
            char *c0 = C + i * ldc + j * 4;
            _tile_stored(0, c0, ldc);
            _tile_stored(1, c0 + 64, ldc);
            _tile_stored(2, c0 + 16 * ldc, ldc);
            _tile_stored(3, c0 + 16 * ldc + 64, ldc);
        }
    }
}

/* dst (tp x d) row-major = the t valid rows of src (row stride ld elements), zero rows after. */
static void copy_rows(uint16_t *restrict dst, const uint16_t *restrict src, int64_t ld, int64_t t, int64_t tp,
                      int64_t d) {
    for (int64_t r = 0; r < tp; r++) {
        if (r < t)
            memcpy(dst + r * d, src + r * ld, d * 2);
        else
            memset(dst + r * d, 0, d * 2);
    }
}

/* Two rows of 16 bf16 each, interleaved element by element: one 64-byte row of a pair-interleaved B. */
static inline __m512i interleave16(__m256i row0, __m256i row1) {
    return _mm512_or_si512(_mm512_cvtepu16_epi32(row0), _mm512_slli_epi32(_mm512_cvtepu16_epi32(row1), 16));
}

/* dst (tp/2 x d x 2) = rows of src pair-interleaved (zero rows from t on): B operand with K over rows.
 * d is a multiple of 16. */
static void pair_rows(uint16_t *restrict dst, const uint16_t *restrict src, int64_t ld, int64_t t, int64_t tp,
                      int64_t d) {
    const __m256i zero = _mm256_setzero_si256();
    for (int64_t r = 0; r < tp; r += 2) {
        const uint16_t *s0 = src + r * ld, *s1 = src + (r + 1) * ld;
        for (int64_t j = 0; j < d; j += 16) {
            __m256i a = r < t ? _mm256_loadu_si256((const __m256i *)(s0 + j)) : zero;
            __m256i b = r + 1 < t ? _mm256_loadu_si256((const __m256i *)(s1 + j)) : zero;
            _mm512_storeu_si512(dst + (r * d + 2 * j), interleave16(a, b));
        }
    }
}

/* 16 rows from r0 (row stride ld elements), zero from row t on: the 32-bit word at column `col` (a bf16
 * pair) of each, gathered. */
static inline __m512i gather_words(const uint16_t *src, int64_t ld, int64_t r0, int64_t t, int64_t col) {
    const __m512i lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    __mmask16 m = tail_mask(t - r0);
    __m512i idx = _mm512_mullo_epi32(lanes, _mm512_set1_epi32((int32_t)(ld / 2)));
    return _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m, idx, src + r0 * ld + col, 4);
}

/* dst (d/2 x tp x 2) = src^T pair-interleaved, i.e. dst[i][r] (32-bit) = src[r][2i..2i+1]: the B operand
 * for a product with src^T (K over src's columns). Zero from row t on. ld even. */
static void pair_transpose(uint16_t *restrict dst, const uint16_t *restrict src, int64_t ld, int64_t t, int64_t tp,
                           int64_t d) {
    for (int64_t i = 0; i < d / 2; i++)
        for (int64_t r0 = 0; r0 < tp; r0 += 16)
            _mm512_storeu_si512(dst + 2 * (i * tp + r0), gather_words(src, ld, r0, t, 2 * i));
}

/* dst (d x tp) = src^T (zero columns from t on): the A operand for a product with src^T. ld even. */
static void transpose_rows(uint16_t *restrict dst, const uint16_t *restrict src, int64_t ld, int64_t t, int64_t tp,
                           int64_t d) {
    for (int64_t i = 0; i < d; i += 2)
        for (int64_t r0 = 0; r0 < tp; r0 += 16) {
            __m512i w = gather_words(src, ld, r0, t, i);
            _mm256_storeu_si256((__m256i *)(dst + i * tp + r0), _mm512_cvtepi32_epi16(w));
            _mm256_storeu_si256((__m256i *)(dst + (i + 1) * tp + r0), _mm512_cvtepi32_epi16(_mm512_srli_epi32(w, 16)));
        }
}

/* Row r of the scores (fp32, tp wide, t valid) -> exp(scale (s - max)), zero from t on: in place (fp32), or,
 * where `bf16` is not NULL, rounded into it instead (tp values). Returns 1 / the row's sum. */
static inline float softmax_exp(float *restrict sr, uint16_t *restrict bf16, int64_t t, int64_t tp, float scale) {
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < t; j += 16)
        mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(mx, tail_mask(t - j), sr + j));
    const float sc = scale * LOG2_E; /* exp(scale (s - max)) = 2^(s sc - max sc) */
    const __m512 shift = _mm512_set1_ps(_mm512_reduce_max_ps(mx) * sc), scv = _mm512_set1_ps(sc);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < tp; j += 16) {
        __mmask16 m = tail_mask(t - j);
        __m512 e = _mm512_maskz_mov_ps(m, exp2_softmax(_mm512_fmsub_ps(_mm512_loadu_ps(sr + j), scv, shift)));
        sum = _mm512_add_ps(sum, e);
        if (bf16)
            _mm256_storeu_si256((__m256i *)(bf16 + j), bf16x16(e));
        else
            _mm512_storeu_ps(sr + j, e);
    }
    return 1.0f / _mm512_reduce_add_ps(sum);
}

/* dst (k x m) = src^T for src (m x k) bf16 (row stride ld elements, k and ld even): for a weight gradient,
 * whose product with a transposed operand runs at about half the rate of the plain layout on AMX. Blocks of
 * 32 rows (in L1) are gathered two columns at a time, so each store fills a whole 64-byte line of dst. */
void ditkit_transpose_bf16(const uint16_t *src, int64_t ld, uint16_t *dst, int64_t m, int64_t k) {
#pragma omp parallel for schedule(static) if (m * k >= PARALLEL_MIN)
    for (int64_t r0 = 0; r0 < m; r0 += 32) {
        __mmask32 keep = m - r0 >= 32 ? 0xffffffffu : (((__mmask32)1 << (m - r0)) - 1);
        for (int64_t i = 0; i < k; i += 2) {
            __m512i w0 = gather_words(src, ld, r0, m, i), w1 = gather_words(src, ld, r0 + 16, m, i);
            __m512i even = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi32_epi16(w0)),
                                              _mm512_cvtepi32_epi16(w1), 1);
            __m512i odd = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi32_epi16(_mm512_srli_epi32(w0, 16))),
                                             _mm512_cvtepi32_epi16(_mm512_srli_epi32(w1, 16)), 1);
            _mm512_mask_storeu_epi16(dst + i * m + r0, keep, even);
            _mm512_mask_storeu_epi16(dst + (i + 1) * m + r0, keep, odd);
        }
    }
}

static inline int64_t round32(int64_t t) { return (t + 31) / 32 * 32; }


/* q, k, v: element (sample b, token i, head h, channel c) at ptr[b*sb + i*st + h*sh + c]; out likewise
 * with (ob, ot, oh). p: NULL, or (N, H, Tp/2, Tp, 2) bf16 to keep the probabilities for the backward. */
int32_t ditkit_attention_amx(const uint16_t *q, const uint16_t *k, const uint16_t *v, int64_t sb, int64_t st,
                             int64_t sh, uint16_t *out, int64_t ob, int64_t ot, int64_t oh, uint16_t *p, int64_t n,
                             int64_t t, int64_t h, int64_t d, float scale) {
    const int64_t tp = round32(t);
    int32_t failed = 0; /* a thread's buffers could not be allocated: -1, the caller raises */
#pragma omp parallel
    {
        tile_config saved __attribute__((aligned(64)));
        uint16_t *qb = aligned_buffer(tp * d * 2), *kt = aligned_buffer(tp * d * 2);
        uint16_t *vp = aligned_buffer(tp * d * 2), *pb = aligned_buffer(32 * tp * 2);
        float *s = aligned_buffer(32 * tp * 4), *o = aligned_buffer(32 * d * 4);
        const int ok = thread_start(qb && kt && vp && pb && s && o, &failed, &saved);
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < n * h; bh++) {
            if (!ok) continue;
            int64_t b = bh / h, hh = bh % h;
            const int64_t off = b * sb + hh * sh;
            copy_rows(qb, q + off, st, t, tp, d);
            pair_transpose(kt, k + off, st, t, tp, d);
            pair_rows(vp, v + off, st, t, tp, d);
            uint16_t *pbh = p ? p + bh * tp * tp : NULL;
            for (int64_t r0 = 0; r0 < tp; r0 += 32) {
                amx_gemm(qb + r0 * d, d * 2, kt, tp * 4, s, tp * 4, 32, tp, d);
                float inv[32];
                if (!pbh) { /* inference: P unnormalised in bf16, each output row scaled by 1 / its sum */
                    for (int64_t r = 0; r < 32; r++) {
                        if (r0 + r < t)
                            inv[r] = softmax_exp(s + r * tp, pb + r * tp, t, tp, scale);
                        else /* padded row: its output row is not stored */
                            memset(pb + r * tp, 0, tp * 2), inv[r] = 0.0f;
                    }
                } else {
                    for (int64_t r = 0; r < 32; r += 2) { /* softmax, two rows at a time (a pair of P) */
                        float *s0 = s + r * tp, *s1 = s0 + tp;
                        const float inv0 = r0 + r < t ? softmax_exp(s0, NULL, t, tp, scale) : 0.0f; /* padded: 0 */
                        const float inv1 = r0 + r + 1 < t ? softmax_exp(s1, NULL, t, tp, scale) : 0.0f;
                        uint16_t *pair = pbh + (r0 + r) * tp;
                        for (int64_t j = 0; j < tp; j += 16) {
                            __m256i a = bf16x16(_mm512_mul_ps(_mm512_loadu_ps(s0 + j), _mm512_set1_ps(inv0)));
                            __m256i b = bf16x16(_mm512_mul_ps(_mm512_loadu_ps(s1 + j), _mm512_set1_ps(inv1)));
                            _mm256_storeu_si256((__m256i *)(pb + r * tp + j), a);
                            _mm256_storeu_si256((__m256i *)(pb + (r + 1) * tp + j), b);
                            _mm512_storeu_si512(pair + 2 * j, interleave16(a, b));
                        }
                    }
                    for (int64_t r = 0; r < 32; r++) inv[r] = 1.0f;
                }
                amx_gemm(pb, tp * 2, vp, d * 4, o, d * 4, 32, d, tp);
                for (int64_t r = 0; r < 32 && r0 + r < t; r++) {
                    uint16_t *dst = out + b * ob + (r0 + r) * ot + hh * oh;
                    const __m512 sc = _mm512_set1_ps(inv[r]);
                    for (int64_t j = 0; j < d; j += 16)
                        _mm256_storeu_si256((__m256i *)(dst + j), bf16x16(_mm512_mul_ps(_mm512_loadu_ps(o + r * d + j), sc)));
                }
            }
        }
        if (ok) amx_end(&saved);
        free(qb), free(kt), free(vp), free(pb), free(s), free(o);
    }
    return failed;
}

/* The backward of ditkit_attention_amx: dout and out share (ob, ot, oh); dq, dk, dv share q's (sb, st, sh);
 * p is what the forward saved. dbias: NULL, or (3, H, D) fp32 to receive the sums of dq, dk and dv over
 * samples and tokens (the gradient of the QKV projection's bias, formed while the values are at hand). */
int32_t ditkit_attention_amx_backward(const uint16_t *q, const uint16_t *k, const uint16_t *v, int64_t sb,
                                   int64_t st, int64_t sh, const uint16_t *out, const uint16_t *dout, int64_t ob,
                                   int64_t ot, int64_t oh, const uint16_t *p, uint16_t *dq, uint16_t *dk,
                                   uint16_t *dv, float *dbias, int64_t n, int64_t t, int64_t h, int64_t d,
                                   float scale) {
    const int64_t tp = round32(t), nb = 3 * h * d;
    const int threads = omp_get_max_threads();
    float *bias_parts = dbias ? calloc((size_t)threads * nb, sizeof(float)) : NULL; /* a row per thread */
    if (dbias && !bias_parts) return -1;
    int32_t failed = 0;
#pragma omp parallel
    {
        tile_config saved __attribute__((aligned(64)));
        uint16_t *dob = aligned_buffer(tp * d * 2), *vt = aligned_buffer(tp * d * 2);
        uint16_t *kp = aligned_buffer(tp * d * 2), *qt = aligned_buffer(tp * d * 2);
        uint16_t *dot = aligned_buffer(tp * d * 2), *dsb = aligned_buffer(32 * tp * 2);
        uint16_t *dsp = aligned_buffer(tp * tp * 2);
        float *s = aligned_buffer(32 * tp * 4), *acc = aligned_buffer(tp * d * 4);
        float *rowdot = aligned_buffer(tp * 4);
        float *bias_sum = dbias ? bias_parts + (size_t)omp_get_thread_num() * nb : NULL; /* this thread's */
        const int ok = thread_start(dob && vt && kp && qt && dot && dsb && dsp && s && acc && rowdot, &failed, &saved);
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < n * h; bh++) {
            if (!ok) continue;
            int64_t b = bh / h, hh = bh % h;
            const int64_t off = b * sb + hh * sh, ooff = b * ob + hh * oh;
            const uint16_t *pbh = p + bh * tp * tp;
            copy_rows(dob, dout + ooff, ot, t, tp, d);
            for (int64_t r = 0; r < tp; r++) {
                float acc_r = 0.0f;
                if (r < t) {
                    const uint16_t *orow = out + ooff + r * ot, *grow = dob + r * d;
#pragma omp simd reduction(+ : acc_r)
                    for (int64_t c = 0; c < d; c++) acc_r += bf16_to_f32(orow[c]) * bf16_to_f32(grow[c]);
                }
                rowdot[r] = acc_r;
            }
            pair_transpose(vt, v + off, st, t, tp, d);
            pair_rows(kp, k + off, st, t, tp, d);
            transpose_rows(qt, q + off, st, t, tp, d);
            transpose_rows(dot, dob, d, tp, tp, d);
            for (int64_t r0 = 0; r0 < tp; r0 += 32) {
                amx_gemm(dob + r0 * d, d * 2, vt, tp * 4, s, tp * 4, 32, tp, d); /* dP rows r0..r0+31 */
                const __m512 sc = _mm512_set1_ps(scale), high = _mm512_castsi512_ps(_mm512_set1_epi32(-65536));
                for (int64_t r = 0; r < 32; r += 2) { /* dS, two rows at a time: P is stored in pairs */
                    const uint16_t *pair = pbh + (r0 + r) * tp;
                    float *s0 = s + r * tp, *s1 = s0 + tp;
                    const __m512 rd0 = _mm512_set1_ps(rowdot[r0 + r]), rd1 = _mm512_set1_ps(rowdot[r0 + r + 1]);
                    for (int64_t j = 0; j < tp; j += 16) {
                        __m512i w = _mm512_loadu_si512(pair + 2 * j);
                        __m512 p0 = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
                        __m512 p1 = _mm512_and_ps(_mm512_castsi512_ps(w), high);
                        __m512 ds0 = _mm512_mul_ps(_mm512_mul_ps(p0, _mm512_sub_ps(_mm512_loadu_ps(s0 + j), rd0)), sc);
                        __m512 ds1 = _mm512_mul_ps(_mm512_mul_ps(p1, _mm512_sub_ps(_mm512_loadu_ps(s1 + j), rd1)), sc);
                        __m256i a = bf16x16(ds0), b = bf16x16(ds1);
                        _mm256_storeu_si256((__m256i *)(dsb + r * tp + j), a);
                        _mm256_storeu_si256((__m256i *)(dsb + (r + 1) * tp + j), b);
                        _mm512_storeu_si512(dsp + (r0 + r) * tp + 2 * j, interleave16(a, b));
                    }
                }
                amx_gemm(dsb, tp * 2, kp, d * 4, acc, d * 4, 32, d, tp); /* dq rows */
                for (int64_t r = 0; r < 32 && r0 + r < t; r++) {
                    store_bf16(dq + off + (r0 + r) * st, acc + r * d, d);
                    if (bias_sum) {
                        float *bq = bias_sum + hh * d;
#pragma omp simd
                        for (int64_t c = 0; c < d; c++) bq[c] += acc[r * d + c];
                    }
                }
            }
            /* dk^T = q^T dS and dv^T = dO^T P, (d x tp) each, written back transposed */
            for (int which = 0; which < 2; which++) {
                amx_gemm(which ? dot : qt, tp * 2, which ? pbh : dsp, tp * 4, acc, tp * 4, d, tp, tp);
                uint16_t *dst = (which ? dv : dk) + off;
                if (bias_sum) { /* row c of acc: channel c over the tokens (padded ones are 0) */
                    float *bkv = bias_sum + ((1 + which) * h + hh) * d;
                    for (int64_t c = 0; c < d; c++) {
                        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
                        for (int64_t r = 0; r < t; r++) sum += acc[c * tp + r];
                        bkv[c] += sum;
                    }
                }
                const __m512i lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
                const __m512i idx = _mm512_mullo_epi32(lanes, _mm512_set1_epi32((int32_t)tp));
                for (int64_t r = 0; r < t; r++)
                    for (int64_t c0 = 0; c0 < d; c0 += 16) /* 16 channels of token r: a column of acc */
                        _mm256_storeu_si256((__m256i *)(dst + r * st + c0),
                                            bf16x16(_mm512_i32gather_ps(idx, acc + c0 * tp + r, 4)));
            }
        }
        if (ok) amx_end(&saved);
        free(dob), free(vt), free(kp), free(qt), free(dot), free(dsb), free(dsp), free(s), free(acc), free(rowdot);
    }
    if (dbias) { /* in thread order: the same sum every run */
        for (int i = 0; i < threads; i++)
            for (int64_t j = 0; j < nb; j++) dbias[j] += bias_parts[(size_t)i * nb + j];
        free(bias_parts);
    }
    return failed;
}
#endif

int32_t ditkit_has_amx_attention(void) {
#ifdef DITKIT_AMX
    return 1;
#else
    return 0;
#endif
}

#ifdef DITKIT_AVX512
/* fp32 self-attention for inference, with AVX-512 fused multiply-adds (CPUs with or without AMX): per sample
 * and head, K^T and V are copied once into contiguous per-thread buffers, and then, 8 query rows at a time,
 * the scores S = (scale q) K^T (8 x T, fp32 in L1), their softmax (exp512, as accurate as fp32 rounding) and
 * O = P V, each output row divided by its row's sum on the way out. Both products are the same
 * register-blocked step, mul_8x32: an 8 x 32 block of C (16 accumulators) over a dot-product length k, a
 * row of A broadcast against two vectors of B per step. At DiT-S/2 and B/2 shapes (batch 32, 256 tokens,
 * head size 64) it ran at 205-215 GFLOP/s on a 2-core Xeon, PyTorch's fused CPU kernel (SDPA) at 175-190
 * (docs/speed.md, fourteenth session). */
#define ATT_ROWS 8

/* C[r][0..cols) = sum_k A[r][k] B[k][0..cols) for r < 8, cols <= 32 (the lanes past cols masked). The
 * accumulators are named, not an array: GCC stored an array's 16 vectors to the stack on every step. */
#define MUL_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7)
#define MUL_INIT(r) __m512 c##r##0 = _mm512_setzero_ps(), c##r##1 = _mm512_setzero_ps();
#define MUL_STEP(r)                                                                                              \
    {                                                                                                            \
        const __m512 ar = _mm512_set1_ps(a[r * lda + i]);                                                       \
        c##r##0 = _mm512_fmadd_ps(ar, b0, c##r##0), c##r##1 = _mm512_fmadd_ps(ar, b1, c##r##1);                \
    }
#define MUL_STORE(r) _mm512_mask_storeu_ps(c + r * ldc, m0, c##r##0), _mm512_mask_storeu_ps(c + r * ldc + 16, m1, c##r##1);
static inline void mul_8x32(const float *a, int64_t lda, const float *b, int64_t ldb, int64_t k, float *c,
                            int64_t ldc, int64_t cols) {
    const __mmask16 m0 = tail_mask(cols), m1 = tail_mask(cols - 16);
    MUL_ROWS(MUL_INIT)
    for (int64_t i = 0; i < k; i++) {
        const __m512 b0 = _mm512_maskz_loadu_ps(m0, b + i * ldb), b1 = _mm512_maskz_loadu_ps(m1, b + i * ldb + 16);
        MUL_ROWS(MUL_STEP)
    }
    MUL_ROWS(MUL_STORE)
}

/* q, k, v: (n, t, h, d) views with strides (sb, st, sh) in floats (the fused projection's output); bias: NULL,
 * or the projection's bias (3, h, d), added to q, k and v as they are read (so the projection can run without
 * it: a product with a bias first copies the bias into its whole output); out: (n, t, h, d) with strides
 * (ob, ot, oh). Returns 0, or -1 where a thread's buffers could not be allocated. */
int32_t ditkit_attention_f32(const float *q, const float *k, const float *v, int64_t sb, int64_t st, int64_t sh,
                             const float *bias, float *out, int64_t ob, int64_t ot, int64_t oh, int64_t n, int64_t t,
                             int64_t h, int64_t d, float scale) {
    const int64_t tp = (t + 31) / 32 * 32; /* score columns in whole blocks of 32, the padding 0 */
    int32_t failed = 0;
#pragma omp parallel
    {
        float *kt = aligned_buffer(d * tp * 4), *vb = aligned_buffer(t * d * 4);
        float *qs = aligned_buffer(ATT_ROWS * d * 4), *s = aligned_buffer((ATT_ROWS * tp + 32) * 4);
        float *o = aligned_buffer(ATT_ROWS * d * 4), *zero = calloc(d, 4);
        const int ok = kt && vb && qs && s && o && zero;
        if (s) memset(s + ATT_ROWS * tp, 0, 32 * 4); /* the softmax's last 64-wide step may read past row 8 */
        if (!ok) {
#pragma omp atomic write
            failed = -1;
        }
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < n * h; bh++) {
            if (!ok) continue;
            const int64_t off = (bh / h) * sb + (bh % h) * sh;
            const float *bq = bias ? bias + (bh % h) * d : zero, *bk = bias ? bq + h * d : zero;
            const float *bv = bias ? bk + h * d : zero;
            const __m512i rows = _mm512_mullo_epi32(
                _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi32((int32_t)st));
            for (int64_t j0 = 0; j0 < tp; j0 += 16) { /* K^T in panels of 32 keys (d x 32 each), zero past t */
                float *panel = kt + (j0 / 32) * 32 * d + j0 % 32;
                const float *src = k + off + (j0 < t ? j0 : 0) * st;
                const __mmask16 m = tail_mask(t - j0);
                for (int64_t c = 0; c < d; c++) {
                    const __m512 col = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, rows, src + c, 4);
                    _mm512_storeu_ps(panel + c * 32, _mm512_maskz_add_ps(m, col, _mm512_set1_ps(bk[c])));
                }
            }
            for (int64_t j = 0; j < t; j++)
                for (int64_t c = 0; c < d; c += 16) {
                    const __mmask16 m = tail_mask(d - c);
                    const __m512 row = _mm512_maskz_loadu_ps(m, v + off + j * st + c);
                    _mm512_mask_storeu_ps(vb + j * d + c, m, _mm512_add_ps(row, _mm512_maskz_loadu_ps(m, bv + c)));
                }
            const int64_t next = bh + 1 < n * h ? ((bh + 1) / h) * sb + ((bh + 1) % h) * sh : off;
            for (int64_t r0 = 0; r0 < t; r0 += ATT_ROWS) {
                /* the next head's q, k and v rows into L2 meanwhile: rows 4.6 KB apart (S/2) are not
                 * prefetched by the hardware, and their first touch otherwise waits on memory */
                for (int64_t r = r0; r < r0 + ATT_ROWS && r < t; r++)
                    for (int64_t c = 0; c < d; c += 16) {
                        _mm_prefetch((const char *)(q + next + r * st + c), _MM_HINT_T1);
                        _mm_prefetch((const char *)(k + next + r * st + c), _MM_HINT_T1);
                        _mm_prefetch((const char *)(v + next + r * st + c), _MM_HINT_T1);
                    }
                for (int64_t r = 0; r < ATT_ROWS; r++) { /* rows past t repeat the last one, not stored */
                    const float *qr = q + off + (r0 + r < t ? r0 + r : t - 1) * st;
                    for (int64_t c = 0; c < d; c += 16) {
                        const __mmask16 m = tail_mask(d - c);
                        const __m512 qv = _mm512_add_ps(_mm512_maskz_loadu_ps(m, qr + c), _mm512_maskz_loadu_ps(m, bq + c));
                        _mm512_mask_storeu_ps(qs + r * d + c, m, _mm512_mul_ps(qv, _mm512_set1_ps(scale)));
                    }
                }
                for (int64_t j = 0; j < tp; j += 32) mul_8x32(qs, d, kt + j * d, 32, d, s + j, tp, 32);
                float inv[ATT_ROWS];
                for (int64_t r = 0; r < ATT_ROWS; r++) {
                    float *sr = s + r * tp;
                    __m512 mx = _mm512_set1_ps(-INFINITY);
                    for (int64_t j = 0; j < t; j += 16)
                        mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(mx, tail_mask(t - j), sr + j));
                    const __m512 shift = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
                    __m512 sum = _mm512_setzero_ps();
                    for (int64_t j = 0; j < tp; j += 64) { /* 64 at a time: past tp (a multiple of 32) the next
                                                            * row, or the buffer's padding, is read, not stored */
                        __m512 e[4];
                        for (int u = 0; u < 4; u++) e[u] = _mm512_sub_ps(_mm512_loadu_ps(sr + j + 16 * u), shift);
                        exp512x4(e);
                        for (int u = 0; u < 4 && j + 16 * u < tp; u++) {
                            e[u] = _mm512_maskz_mov_ps(tail_mask(t - j - 16 * u), e[u]);
                            sum = _mm512_add_ps(sum, e[u]);
                            _mm512_storeu_ps(sr + j + 16 * u, e[u]);
                        }
                    }
                    inv[r] = 1.0f / _mm512_reduce_add_ps(sum);
                }
                for (int64_t c0 = 0; c0 < d; c0 += 32) mul_8x32(s, tp, vb + c0, d, t, o + c0, d, d - c0);
                for (int64_t r = 0; r < ATT_ROWS && r0 + r < t; r++) {
                    float *dst = out + (bh / h) * ob + (r0 + r) * ot + (bh % h) * oh;
                    for (int64_t c = 0; c < d; c += 16) {
                        const __mmask16 m = tail_mask(d - c);
                        _mm512_mask_storeu_ps(dst + c, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, o + r * d + c), _mm512_set1_ps(inv[r])));
                    }
                }
            }
        }
        free(kt), free(vb), free(qs), free(s), free(o), free(zero);
    }
    return failed;
}
#endif

int32_t ditkit_has_avx512(void) {
#ifdef DITKIT_AVX512
    return 1;
#else
    return 0;
#endif
}
