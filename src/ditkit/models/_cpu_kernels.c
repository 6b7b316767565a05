/* ditkit's CPU kernels: elementwise work that eager PyTorch runs slowly on some CPUs.
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
static inline float exp_clamped(float x) {
    float t = x * 1.4426950408889634f;
    float n = __builtin_rintf(t);
    float f = t - n;
    float p = 1.535336188319500e-4f;
    p = p * f + 1.339887440266574e-3f;
    p = p * f + 9.618437357674640e-3f;
    p = p * f + 5.550332471162809e-2f;
    p = p * f + 2.402264791363012e-1f;
    p = p * f + 6.931472028550421e-1f;
    p = p * f + 1.0f;
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

#define BLOCK 1024 /* elements per block of the bf16 loops: fp32 staging that stays in L1 */

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

/* LayerNorm (no affine) + adaLN modulation over x (N, T, D) fp32, per-sample shift and scale (N, D) fp32:
 *   out = (x - mean) * rstd * (1 + scale[n]) + shift[n],  rstd = 1 / sqrt(var + eps)  (biased variance)
 * written as fp32 (out_bf16 = 0) or bf16. Statistics in fp32 from the fp32 input; mean and rstd (N*T)
 * are stored when the pointers are not NULL (training keeps them for the backward). */
void ditkit_norm_modulate(const float *restrict x, const float *restrict shift, const float *restrict scale,
                          void *restrict out, int32_t out_bf16, float *restrict mean_out, float *restrict rstd_out,
                          int64_t n, int64_t t, int64_t d, float eps) {
#pragma omp parallel for schedule(static) if (n * t * d >= PARALLEL_MIN)
    for (int64_t row = 0; row < n * t; row++) {
        const float *xr = x + row * d;
        const float *sh = shift + (row / t) * d;
        const float *sc = scale + (row / t) * d;
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
    }
}

/* Its backward, given the output's gradient (fp32 or bf16):
 *   xhat = (x - mean) rstd,  g = grad (1 + scale[n])
 *   grad_x = rstd (g - mean_d(g) - xhat mean_d(g xhat))          (N, T, D) fp32
 *   grad_scale[n] = sum_t grad xhat,  grad_shift[n] = sum_t grad   (N, D) fp32
 * Samples are split across threads, so each sample's sums over its tokens are one thread's. */
void ditkit_norm_modulate_backward(const void *restrict grad, int32_t grad_bf16, const float *restrict x,
                                   const float *restrict mean, const float *restrict rstd,
                                   const float *restrict scale, float *restrict grad_x, float *restrict grad_scale,
                                   float *restrict grad_shift, int64_t n, int64_t t, int64_t d) {
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
#pragma omp simd
            for (int64_t i = 0; i < d; i++) {
                float xhat = (xr[i] - m) * rs;
                gx[i] = rs * (gx[i] * (1.0f + sc[i]) - mg - xhat * mgx);
            }
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
