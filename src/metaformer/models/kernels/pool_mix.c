/* The pooling half of a PoolFormer block, fused, on channels-last fp32 maps (B, H, W, C).

   forward:  y  = x + m_b * k_c * r_b * (avgpool(x) - x),  r_b = 1 / sqrt(var(x_b) + eps1)
             (window 2 * radius + 1, padding not counted). In a plain block k = layer_scale *
             norm1.weight and m_b is stochastic depth's per-sample multiplier (GroupNorm's mean and
             bias cancel in pool(n) - n); in the folded inference block k is the folded scale.
             Optionally also yn = (y - mean(y_b)) / sqrt(var(y_b) + eps2) (the next norm, inference)
             and each sample's mean and r_b (for the backward).
   backward: with t = g * m_b k_c r_b and d = avgpool(x) - x,
             dx = g - t + avgpool^T(t) - r_b^3 (x - mean_b) / N * S_b,   S_b = m_b sum_c k_c G_bc,
             dk_c = sum_b m_b r_b G_bc,                                   G_bc = sum_hw g * d.
   avgpool^T(t) at i sums t_j / count_j over the windows j that hold i (the windows are symmetric).

   The forward is three passes over the map (statistics of x; pool, mix and statistics of y;
   normalise y) instead of the seven that separate ops take. Statistics are accumulated per image row
   in double precision. Parallel over (sample, row) with OpenMP; it shares the process's libgomp
   with torch. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

static void row_stats(const float *p, long n, double *sum, double *sq) {
    double s = 0.0, q = 0.0;
#pragma omp simd reduction(+ : s, q)
    for (long i = 0; i < n; ++i) {
        double v = p[i];
        s += v;
        q += v * v;
    }
    *sum = s;
    *sq = q;
}

static void sample_moments(const double *rows, int h, long count, double *mean, double *var) {
    double s = 0.0, q = 0.0;
    for (int r = 0; r < h; ++r) {
        s += rows[2 * r];
        q += rows[2 * r + 1];
    }
    double m = s / (double)count;
    double v = q / (double)count - m * m;
    *mean = m;
    *var = v > 0.0 ? v : 0.0;
}

static inline int lo(int i, int r) { return i - r < 0 ? 0 : i - r; }
static inline int hi(int i, int r, int n) { return i + r >= n ? n - 1 : i + r; }

/* pooled - x of one image row into out (W*C floats), using colsum (W*C floats) as scratch. */
static void pool_minus_row(const float *xs, int h, int H, int W, int C, int radius, float *colsum,
                           float *out) {
    long plane = (long)W * C;
    int h0 = lo(h, radius), h1 = hi(h, radius, H);
    memcpy(colsum, xs + (long)h0 * plane, sizeof(float) * (size_t)plane);
    for (int r = h0 + 1; r <= h1; ++r) {
        const float *src = xs + (long)r * plane;
        for (long i = 0; i < plane; ++i) colsum[i] += src[i];
    }
    const float *xr = xs + (long)h * plane;
    float rows = (float)(h1 - h0 + 1);
    for (int w = 0; w < W; ++w) {
        int w0 = lo(w, radius), w1 = hi(w, radius, W);
        float inv = 1.0f / (rows * (float)(w1 - w0 + 1));
        float *op = out + (long)w * C;
        const float *xp = xr + (long)w * C;
        const float *first = colsum + (long)w0 * C;
        for (int c = 0; c < C; ++c) op[c] = first[c];
        for (int k = w0 + 1; k <= w1; ++k) {
            const float *col = colsum + (long)k * C;
            for (int c = 0; c < C; ++c) op[c] += col[c];
        }
        for (int c = 0; c < C; ++c) op[c] = op[c] * inv - xp[c];
    }
}

int metaformer_pool_mix_forward(const float *x, float *y, float *yn, const float *k, const float *mult,
                                float *mean_out, float *rstd_out, int B, int H, int W, int C, int radius,
                                float eps1, float eps2, int threads) {
    long plane = (long)W * C, sample = (long)H * plane;
    double *stats = (double *)malloc(sizeof(double) * 2 * (size_t)B * H);
    double *ystats = (double *)malloc(sizeof(double) * 2 * (size_t)B * H);
    double *ymoments = (double *)malloc(sizeof(double) * 2 * (size_t)B);
    float *coef = (float *)malloc(sizeof(float) * (size_t)B * C);
    if (!stats || !ystats || !ymoments || !coef) {
        free(stats), free(ystats), free(ymoments), free(coef);
        return 1;
    }
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *scratch = (float *)malloc(sizeof(float) * 2 * (size_t)plane);
        if (!scratch) {
#pragma omp atomic write
            failed = 1;
        }
        /* pass 1: statistics of x per (sample, row) */
#pragma omp for schedule(static)
        for (long br = 0; br < (long)B * H; ++br)
            row_stats(x + br * plane, plane, &stats[2 * br], &stats[2 * br + 1]);
#pragma omp for schedule(static)
        for (int b = 0; b < B; ++b) {
            double mean, var;
            sample_moments(stats + 2L * b * H, H, sample, &mean, &var);
            double rstd = 1.0 / sqrt(var + (double)eps1);
            if (mean_out) mean_out[b] = (float)mean;
            if (rstd_out) rstd_out[b] = (float)rstd;
            float m = mult ? mult[b] : 1.0f;
            for (int c = 0; c < C; ++c) coef[(long)b * C + c] = m * k[c] * (float)rstd;
        }
        /* pass 2: pool, mix and (for yn) the statistics of y */
#pragma omp for schedule(static)
        for (long br = 0; br < (long)B * H; ++br) {
            if (!scratch) continue;
            int b = (int)(br / H), h = (int)(br % H);
            float *d = scratch + plane;
            pool_minus_row(x + (long)b * sample, h, H, W, C, radius, scratch, d);
            const float *xr = x + br * plane, *cf = coef + (long)b * C;
            float *yr = y + br * plane;
            double s = 0.0, q = 0.0;
            for (int w = 0; w < W; ++w) {
                const float *xp = xr + (long)w * C, *dp = d + (long)w * C;
                float *yp = yr + (long)w * C;
                if (!yn) {
                    for (int c = 0; c < C; ++c) yp[c] = xp[c] + cf[c] * dp[c];
                    continue;
                }
#pragma omp simd reduction(+ : s, q)
                for (int c = 0; c < C; ++c) {
                    float v = xp[c] + cf[c] * dp[c];
                    yp[c] = v;
                    s += v;
                    q += (double)v * v;
                }
            }
            ystats[2 * br] = s;
            ystats[2 * br + 1] = q;
        }
        if (yn) {
#pragma omp for schedule(static)
            for (int b = 0; b < B; ++b) {
                double mean, var;
                sample_moments(ystats + 2L * b * H, H, sample, &mean, &var);
                ymoments[2 * b] = mean;
                ymoments[2 * b + 1] = 1.0 / sqrt(var + (double)eps2);
            }
            /* pass 3: normalise y */
#pragma omp for schedule(static)
            for (long br = 0; br < (long)B * H; ++br) {
                long b = br / H;
                float mean = (float)ymoments[2 * b], rstd = (float)ymoments[2 * b + 1];
                const float *src = y + br * plane;
                float *dst = yn + br * plane;
                for (long i = 0; i < plane; ++i) dst[i] = (src[i] - mean) * rstd;
            }
        }
        free(scratch);
    }
    free(stats), free(ystats), free(ymoments), free(coef);
    return failed;
}

int metaformer_pool_mix_train_backward(const float *x, const float *g, float *dx, float *dk,
                                       const float *k, const float *mult, const float *mean,
                                       const float *rstd, int B, int H, int W, int C, int radius,
                                       int threads) {
    long plane = (long)W * C, sample = (long)H * plane;
    float *partial = (float *)malloc(sizeof(float) * (size_t)B * H * C); /* G per (sample, row) */
    double *gsum = (double *)malloc(sizeof(double) * (size_t)B * C);
    double *S = (double *)malloc(sizeof(double) * (size_t)B);
    float *coef = (float *)malloc(sizeof(float) * (size_t)B * C);
    if (!partial || !gsum || !S || !coef) {
        free(partial), free(gsum), free(S), free(coef);
        return 1;
    }
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *scratch = (float *)malloc(sizeof(float) * 2 * (size_t)plane);
        if (!scratch) {
#pragma omp atomic write
            failed = 1;
        }
        /* pass A: G per (sample, row, channel) = sum_w g * (pool(x) - x) */
#pragma omp for schedule(static)
        for (long br = 0; br < (long)B * H; ++br) {
            if (!scratch) continue;
            int b = (int)(br / H), h = (int)(br % H);
            float *d = scratch + plane;
            pool_minus_row(x + (long)b * sample, h, H, W, C, radius, scratch, d);
            const float *gr = g + br * plane;
            float *acc = partial + br * C;
            for (int c = 0; c < C; ++c) acc[c] = 0.0f;
            for (int w = 0; w < W; ++w)
                for (int c = 0; c < C; ++c) acc[c] += gr[(long)w * C + c] * d[(long)w * C + c];
        }
#pragma omp for schedule(static)
        for (int b = 0; b < B; ++b) {
            float m = mult ? mult[b] : 1.0f;
            double s = 0.0;
            for (int c = 0; c < C; ++c) {
                double total = 0.0;
                for (int h = 0; h < H; ++h) total += partial[((long)b * H + h) * C + c];
                gsum[(long)b * C + c] = total;
                s += (double)k[c] * total;
                coef[(long)b * C + c] = m * k[c] * rstd[b];
            }
            S[b] = m * s;
        }
#pragma omp single
        for (int c = 0; c < C; ++c) {
            double total = 0.0;
            for (int b = 0; b < B; ++b) total += (double)(mult ? mult[b] : 1.0f) * rstd[b] * gsum[(long)b * C + c];
            dk[c] = (float)total;
        }
        /* pass B: dx = g - t + pool^T(t) - r^3 (x - mean) S / N */
#pragma omp for schedule(static)
        for (long br = 0; br < (long)B * H; ++br) {
            if (!scratch) continue;
            int b = (int)(br / H), h = (int)(br % H);
            const float *gs = g + (long)b * sample;
            const float *cf = coef + (long)b * C;
            float *colsum = scratch; /* sum over rows of g / rows_count(row) */
            int h0 = lo(h, radius), h1 = hi(h, radius, H);
            for (long i = 0; i < plane; ++i) colsum[i] = 0.0f;
            for (int r = h0; r <= h1; ++r) {
                float inv = 1.0f / (float)(hi(r, radius, H) - lo(r, radius) + 1);
                const float *src = gs + (long)r * plane;
                for (long i = 0; i < plane; ++i) colsum[i] += src[i] * inv;
            }
            /* divide by each column's count: window sums below then give sum_j t_j / count_j */
            for (int w = 0; w < W; ++w) {
                float inv = 1.0f / (float)(hi(w, radius, W) - lo(w, radius) + 1);
                float *col = colsum + (long)w * C;
                for (int c = 0; c < C; ++c) col[c] *= inv * cf[c];
            }
            float r3 = rstd[b] * rstd[b] * rstd[b];
            float shift = (float)(S[b] / (double)sample) * r3, mu = mean[b];
            const float *gr = gs + (long)h * plane, *xr = x + br * plane;
            float *out = dx + br * plane;
            for (int w = 0; w < W; ++w) {
                int w0 = lo(w, radius), w1 = hi(w, radius, W);
                float *op = out + (long)w * C;
                const float *gp = gr + (long)w * C, *xp = xr + (long)w * C;
                const float *first = colsum + (long)w0 * C;
                for (int c = 0; c < C; ++c) op[c] = first[c];
                for (int q = w0 + 1; q <= w1; ++q) {
                    const float *col = colsum + (long)q * C;
                    for (int c = 0; c < C; ++c) op[c] += col[c];
                }
                for (int c = 0; c < C; ++c) op[c] += gp[c] - gp[c] * cf[c] - shift * (xp[c] - mu);
            }
        }
        free(scratch);
    }
    free(partial), free(gsum), free(S), free(coef);
    return failed;
}

/* The channel MLP's bias + exact (erf) GELU on (rows, cols) fp32 matrices, row-major.

   forward:  z = h + b_c (b required: pass zeros for none);  a = gelu(z) = z Phi(z);  optionally d = gelu'(z) = Phi(z) + z phi(z),
             written over h (training keeps d instead of z, so the backward needs no erf or exp).
   backward: g_z = g_a * d;  db_c = sum_rows g_z (bias gradient in the same pass).

   Phi(z) = (1 + erf(z / sqrt 2)) / 2 with Abramowitz-Stegun 7.1.26 (absolute error below 1.5e-7, the
   approximation ATen's vectorised erf uses), whose exp(-z^2 / 2) is also phi's; exp by range reduction
   and a degree-6 polynomial. Branch-free, so the compiler vectorises the inner loop for the -march it
   builds for. */

static inline float exp_neg(float y) { /* exp(y) for y <= 0 */
    union {
        float f;
        int32_t i;
    } v = {y};
    int32_t mag = v.i & 0x7fffffff;
    mag = mag < 0x42ae0000 ? mag : 0x42ae0000; /* |y| <= 87 in integer compares: a float compare may
                                                  trap, which keeps the compiler from vectorising */
    v.i = mag | (int32_t)0x80000000;
    y = v.f;
    int32_t ni = (int32_t)(y * 1.44269504088896341f - 0.5f); /* round(y / ln 2), y <= 0 */
    float n = (float)ni;
    float r = y - n * 0.693145751953125f - n * 1.428606765330187045e-06f;
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (0.16666666666f + r * (0.041666666666f +
              r * (0.008333333333f + r * 0.0013888888889f)))));
    union {
        int32_t i;
        float f;
    } scale = {(ni + 127) << 23}; /* 2^n */
    return p * scale.f;
}

static inline void gelu_parts(float z, float *a, float *d) {
    float u = fabsf(z) * 0.70710678118654752f;
    float t = 1.0f / (1.0f + 0.3275911f * u);
    float poly = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f +
                 t * 1.061405429f))));
    float e = exp_neg(-u * u);        /* exp(-z^2 / 2) */
    float erf_u = 1.0f - poly * e;    /* erf(|z| / sqrt 2) */
    float cdf = 0.5f + 0.5f * copysignf(erf_u, z);
    *a = z * cdf;
    *d = cdf + z * e * 0.39894228040143268f;
}

int metaformer_bias_gelu_forward(float *h, const float *bias, float *a, int with_grad, long rows, int cols,
                                 int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long r = 0; r < rows; ++r) {
        float *hr = h + r * cols, *ar = a + r * cols;
        if (with_grad) {
#pragma omp simd
            for (int c = 0; c < cols; ++c) {
                float act, grad;
                gelu_parts(hr[c] + bias[c], &act, &grad);
                ar[c] = act;
                hr[c] = grad;
            }
        } else {
#pragma omp simd
            for (int c = 0; c < cols; ++c) {
                float act, grad;
                gelu_parts(hr[c] + bias[c], &act, &grad);
                ar[c] = act;
            }
        }
    }
    return 0;
}

int metaformer_bias_gelu_backward(const float *g, const float *d, float *gz, float *db, long rows, int cols,
                                  int threads) {
    int nt = threads < 1 ? 1 : threads;
    double *partial = db ? calloc((size_t)nt * (size_t)cols, sizeof(double)) : NULL;
    if (db && !partial) return 1;
#pragma omp parallel num_threads(nt)
    {
        int tid = 0, count = 1;
#ifdef _OPENMP
        tid = omp_get_thread_num();
        count = omp_get_num_threads();
#endif
        long begin = rows * tid / count, end = rows * (tid + 1) / count;
        double *acc = partial ? partial + (size_t)tid * (size_t)cols : NULL;
        for (long r = begin; r < end; ++r) {
            const float *gr = g + r * cols, *dr = d + r * cols;
            float *zr = gz + r * cols;
#pragma omp simd
            for (int c = 0; c < cols; ++c) zr[c] = gr[c] * dr[c];
            if (acc) {
#pragma omp simd
                for (int c = 0; c < cols; ++c) acc[c] += zr[c];
            }
        }
    }
    if (db) {
        for (int c = 0; c < cols; ++c) {
            double s = 0.0;
            for (int t = 0; t < nt; ++t) s += partial[(size_t)t * (size_t)cols + c];
            db[c] = (float)s;
        }
        free(partial);
    }
    return 0;
}
