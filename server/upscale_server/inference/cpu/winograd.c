/*
 * Winograd F(4x4, 3x3) transforms for 3x3 stride-1 "same" convolutions on NHWC float32 tensors.
 *
 * The matrix products in between are done by torch (MKL/oneDNN batched GEMM); these two loops are
 * what eager torch cannot do without several passes over memory: gathering overlapping 6x6 input
 * patches into the transformed domain, and turning 6x6 products back into 4x4 output tiles with the
 * bias, activation and residual of the layer fused in. Built and loaded by kernel.py (see there).
 *
 * Transform matrices (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2015):
 *   B^T = [4  0 -5  0  1  0]      A^T = [1  1  1  1  1  0]
 *         [0 -4 -4  1  1  0]            [0  1 -1  2 -2  0]
 *         [0  4 -4 -1  1  0]            [0  1  1  4  4  0]
 *         [0 -2 -1  2  1  0]            [0  1 -1  8 -8  1]
 *         [0  2 -1 -2  1  0]
 *         [0  4  0 -5  0  1]
 *
 * Layouts: spatial tensors are [N][H][W] pixels of `cstride` floats, the layer's channels starting
 * at `coff`. The transformed domain is [36][T] rows of `ldc` floats (T = N * ceil(H/4) * ceil(W/4)
 * tiles, tile t = (n * th + ty) * tw + tx), so each of the 36 positions is one GEMM operand.
 *
 * Built at install time (hatch_build.py) in several variants (portable, AVX2+FMA, AVX-512); kernel.py
 * picks one for the CPU. OpenMP: compiled with -fopenmp but linked without a runtime, so the GOMP_*
 * calls bind to the one torch has loaded (kernel.py makes it global first) and both share one pool.
 *
 * Every entry point returns a status: WINO_OK, WINO_DECLINED (wino_gemm: shape not handled, the
 * caller uses torch.bmm) or WINO_ENOMEM (an allocation failed; nothing useful was written).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define WINO_OK 0
#define WINO_DECLINED 1
#define WINO_ENOMEM (-1)

#ifndef CB
#define CB 8 /* channels per inner block: one AVX2 register of floats (the AVX-512 build uses 16) */
#endif

/*
 * Test hook: after `n` more successful allocations every allocation fails (n < 0: never), so the
 * out-of-memory paths can be exercised deterministically (a huge size would depend on overcommit).
 */
static long alloc_budget = -1;

void wino_set_alloc_budget(long n) { __atomic_store_n(&alloc_budget, n, __ATOMIC_SEQ_CST); }

static int alloc_allowed(void) {
    long left = __atomic_load_n(&alloc_budget, __ATOMIC_SEQ_CST);
    while (left >= 0) {
        if (left == 0) return 0;
        if (__atomic_compare_exchange_n(&alloc_budget, &left, left - 1, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
            return 1;
    }
    return 1;
}

static void *wino_malloc(size_t bytes) { return alloc_allowed() ? malloc(bytes) : NULL; }
static void *wino_calloc(size_t n, size_t size) { return alloc_allowed() ? calloc(n, size) : NULL; }

/* Int, not bool, for OpenMP atomics: set by any thread whose buffer could not be had. */
static inline void mark_failed(int *failed) {
#pragma omp atomic write
    *failed = 1;
}

static inline int has_failed(int *failed) {
    int v;
#pragma omp atomic read
    v = *failed;
    return v;
}

/* Short copies inline: a libc memcpy call per 8 floats costs more than the transform itself. */
static inline void copy_floats(float *restrict dst, const float *restrict src, int n) {
    if (n == CB) {
        for (int k = 0; k < CB; k++) dst[k] = src[k];
    } else {
        for (int k = 0; k < n; k++) dst[k] = src[k];
    }
}

static inline void in_1d(const float *d0, const float *d1, const float *d2, const float *d3,
                         const float *d4, const float *d5, float *r[6]) {
    for (int k = 0; k < CB; k++) {
        float s12 = d1[k] + d2[k], s34 = d3[k] + d4[k];
        float a = d1[k] - d2[k], b = d4[k] - d3[k];
        float c = d1[k] - d3[k], e = d4[k] - d2[k];
        r[0][k] = 4.0f * d0[k] - 5.0f * d2[k] + d4[k];
        r[1][k] = s34 - 4.0f * s12;
        r[2][k] = b + 4.0f * a;
        r[3][k] = e - 2.0f * c;
        r[4][k] = e + 2.0f * c;
        r[5][k] = 4.0f * d1[k] - 5.0f * d3[k] + d5[k];
    }
}

static inline void out_1d(const float *m0, const float *m1, const float *m2, const float *m3,
                          const float *m4, const float *m5, float *r[4]) {
    for (int k = 0; k < CB; k++) {
        float p12 = m1[k] + m2[k], n12 = m1[k] - m2[k];
        float p34 = m3[k] + m4[k], n34 = m3[k] - m4[k];
        r[0][k] = m0[k] + p12 + p34;
        r[1][k] = n12 + 2.0f * n34;
        r[2][k] = p12 + 4.0f * p34;
        r[3][k] = n12 + 8.0f * n34 + m5[k];
    }
}

/*
 * Both kernels walk blocks of TB consecutive tiles and stage a block's 36 transformed rows in a
 * per-thread buffer, so the transformed domain is read and written one position (one contiguous
 * run of TB rows) at a time: touching all 36 positions per tile would be 36 interleaved memory
 * streams. Copies are written as loops the compiler inlines (built with
 * -fno-tree-loop-distribute-patterns, which stops gcc from turning them back into memcpy calls).
 */
#define TB 32

/*
 * Per-thread buffers inside the parallel regions: a thread whose allocation fails marks the region
 * failed; after a barrier every thread still enters the worksharing loop (all must) but skips its
 * iterations, and the function returns WINO_ENOMEM.
 */

/* x (spatial, C channels at coff of cstride) -> V[36][T][ldc] at channel offset voff. */
int wino_input(const float *x, int n_img, int h, int w, int c, int cstride, int coff,
                float *v, int ldc, int voff, int nthreads) {
    const int th = (h + 3) / 4, tw = (w + 3) / 4;
    const int64_t tiles = (int64_t)n_img * th * tw;
    const int64_t pstride = tiles * ldc;
    const int cblocks = (c + CB - 1) / CB, cpad = cblocks * CB;
    const int64_t nblocks = (tiles + TB - 1) / TB;
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        float *buf = wino_malloc(sizeof(float) * 36 * TB * (size_t)cpad);
        if (!buf) mark_failed(&failed);
#pragma omp barrier
        const int skip = has_failed(&failed);
#pragma omp for schedule(static)
        for (int64_t blk = 0; blk < nblocks; blk++) {
            if (skip) continue;
            const int64_t t0 = blk * TB, t1 = t0 + TB < tiles ? t0 + TB : tiles;
            for (int64_t t = t0; t < t1; t++) {
                const int n = (int)(t / ((int64_t)th * tw));
                const int rem = (int)(t % ((int64_t)th * tw));
                const int y0 = (rem / tw) * 4 - 1, x0 = (rem % tw) * 4 - 1;
                float d[6][6][CB], u[6][6][CB], o[6][6][CB];
                for (int cb = 0; cb < cblocks; cb++) {
                    const int c0 = cb * CB, nc = c - c0 < CB ? c - c0 : CB;
                    for (int i = 0; i < 6; i++) {
                        const int yy = y0 + i;
                        for (int j = 0; j < 6; j++) {
                            const int xx = x0 + j;
                            if (yy >= 0 && yy < h && xx >= 0 && xx < w) {
                                if (nc < CB) memset(d[i][j], 0, sizeof d[i][j]);
                                copy_floats(d[i][j], x + (((int64_t)n * h + yy) * w + xx) * cstride + coff + c0, nc);
                            } else {
                                memset(d[i][j], 0, sizeof d[i][j]);
                            }
                        }
                    }
                    for (int j = 0; j < 6; j++) { /* columns: u[.][j] = B^T d[.][j] */
                        float *r[6] = {u[0][j], u[1][j], u[2][j], u[3][j], u[4][j], u[5][j]};
                        in_1d(d[0][j], d[1][j], d[2][j], d[3][j], d[4][j], d[5][j], r);
                    }
                    for (int i = 0; i < 6; i++) { /* rows: o[i][.] = u[i][.] B */
                        float *r[6] = {o[i][0], o[i][1], o[i][2], o[i][3], o[i][4], o[i][5]};
                        in_1d(u[i][0], u[i][1], u[i][2], u[i][3], u[i][4], u[i][5], r);
                    }
                    for (int p = 0; p < 36; p++)
                        copy_floats(buf + ((int64_t)p * TB + (t - t0)) * cpad + c0, o[p / 6][p % 6], CB);
                }
            }
            for (int p = 0; p < 36; p++)
                for (int64_t t = t0; t < t1; t++)
                    copy_floats(v + p * pstride + t * ldc + voff, buf + ((int64_t)p * TB + (t - t0)) * cpad, c);
        }
        free(buf);
    }
    return failed ? WINO_ENOMEM : WINO_OK;
}

/*
 * M[36][T][ldc] (GEMM products, channels at moff) -> spatial y (C channels at coff of cstride):
 *   y = act(A^T M A + bias) * scale + (res ? res : 0)
 * where act is leaky ReLU with `slope` (or PReLU with per-channel `slopes` when not NULL) when
 * `activate`, identity otherwise. `res` may alias y (same layout), since each output element is
 * read once before it is written.
 */
int wino_output(const float *m, int ldc, int moff, int n_img, int h, int w, int c,
                 const float *bias, int activate, float slope, const float *slopes, float scale,
                 const float *res, int res_cstride, int res_coff,
                 float *y, int cstride, int coff, int nthreads) {
    const int th = (h + 3) / 4, tw = (w + 3) / 4;
    const int64_t tiles = (int64_t)n_img * th * tw;
    const int64_t pstride = tiles * ldc;
    const int cblocks = (c + CB - 1) / CB, cpad = cblocks * CB;
    const int64_t nblocks = (tiles + TB - 1) / TB;
    /* Per-channel constants, padded to whole blocks; slope 1 means "no activation". */
    float *b = wino_calloc(cpad, sizeof(float)), *s = wino_malloc(sizeof(float) * cpad);
    if (!b || !s) {
        free(b);
        free(s);
        return WINO_ENOMEM;
    }
    for (int k = 0; k < cpad; k++) {
        if (bias && k < c) b[k] = bias[k];
        s[k] = !activate ? 1.0f : slopes && k < c ? slopes[k] : slope;
    }
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        float *buf = wino_calloc((size_t)36 * TB * cpad, sizeof(float));
        if (!buf) mark_failed(&failed);
#pragma omp barrier
        const int skip = has_failed(&failed);
#pragma omp for schedule(static)
        for (int64_t blk = 0; blk < nblocks; blk++) {
            if (skip) continue;
            const int64_t t0 = blk * TB, t1 = t0 + TB < tiles ? t0 + TB : tiles;
            for (int p = 0; p < 36; p++)
                for (int64_t t = t0; t < t1; t++)
                    copy_floats(buf + ((int64_t)p * TB + (t - t0)) * cpad, m + p * pstride + t * ldc + moff, c);
            for (int64_t t = t0; t < t1; t++) {
                const int n = (int)(t / ((int64_t)th * tw));
                const int rem = (int)(t % ((int64_t)th * tw));
                const int y0 = (rem / tw) * 4, x0 = (rem % tw) * 4;
                float u[4][6][CB], o[4][4][CB];
                for (int cb = 0; cb < cblocks; cb++) {
                    const int c0 = cb * CB, nc = c - c0 < CB ? c - c0 : CB;
#define M_AT(i, j) (buf + ((int64_t)((i) * 6 + (j)) * TB + (t - t0)) * cpad + c0)
                    for (int j = 0; j < 6; j++) { /* columns: u[.][j] = A^T m[.][j] */
                        float *r[4] = {u[0][j], u[1][j], u[2][j], u[3][j]};
                        out_1d(M_AT(0, j), M_AT(1, j), M_AT(2, j), M_AT(3, j), M_AT(4, j), M_AT(5, j), r);
                    }
#undef M_AT
                    for (int i = 0; i < 4; i++) { /* rows: o[i][.] = u[i][.] A */
                        float *r[4] = {o[i][0], o[i][1], o[i][2], o[i][3]};
                        out_1d(u[i][0], u[i][1], u[i][2], u[i][3], u[i][4], u[i][5], r);
                    }
                    /* Epilogue without branches on the data, so it vectorizes. */
                    for (int i = 0; i < 4 && y0 + i < h; i++) {
                        for (int j = 0; j < 4 && x0 + j < w; j++) {
                            const int64_t pix = ((int64_t)n * h + y0 + i) * w + x0 + j;
                            float val[CB];
                            for (int k = 0; k < CB; k++) {
                                const float z = o[i][j][k] + b[c0 + k];
                                val[k] = (z < 0.0f ? z * s[c0 + k] : z) * scale;
                            }
                            if (res) {
                                const float *r = res + pix * res_cstride + res_coff + c0;
                                if (nc == CB)
                                    for (int k = 0; k < CB; k++) val[k] += r[k];
                                else
                                    for (int k = 0; k < nc; k++) val[k] += r[k];
                            }
                            copy_floats(y + pix * cstride + coff + c0, val, nc);
                        }
                    }
                }
            }
        }
        free(buf);
    }
    free(b);
    free(s);
    return failed ? WINO_ENOMEM : WINO_OK;
}

/*
 * The 36 products M[p] = V[p] @ U[p] (V[p]: T x K rows of ldv floats, U[p]: K x N row-major, M[p]:
 * T x N rows of ldm floats). MKL's sgemm reaches only about half of an AMD core's FMA peak on these
 * skinny shapes (N = 32 or 64); a 6x16 register-blocked AVX2 kernel with U[p] resident in L1 does
 * better, and the AVX-512 build adds a 6x32 kernel (12 zmm accumulators) for 32-column blocks.
 * Returns WINO_DECLINED (and does nothing) where the kernel is not compiled for AVX2+FMA or N is
 * not a multiple of 16; the caller then uses torch.bmm.
 */
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

static inline void kernel_6x16(const float *a, int64_t lda, const float *b, int ldb, int k_len,
                               float *c, int64_t ldc) {
    __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps(), c10 = _mm256_setzero_ps(),
           c11 = _mm256_setzero_ps(), c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps(),
           c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps(), c40 = _mm256_setzero_ps(),
           c41 = _mm256_setzero_ps(), c50 = _mm256_setzero_ps(), c51 = _mm256_setzero_ps();
    for (int k = 0; k < k_len; k++) {
        const __m256 b0 = _mm256_loadu_ps(b + (int64_t)k * ldb), b1 = _mm256_loadu_ps(b + (int64_t)k * ldb + 8);
        __m256 a0 = _mm256_broadcast_ss(a + k);
        c00 = _mm256_fmadd_ps(a0, b0, c00); c01 = _mm256_fmadd_ps(a0, b1, c01);
        a0 = _mm256_broadcast_ss(a + lda + k);
        c10 = _mm256_fmadd_ps(a0, b0, c10); c11 = _mm256_fmadd_ps(a0, b1, c11);
        a0 = _mm256_broadcast_ss(a + 2 * lda + k);
        c20 = _mm256_fmadd_ps(a0, b0, c20); c21 = _mm256_fmadd_ps(a0, b1, c21);
        a0 = _mm256_broadcast_ss(a + 3 * lda + k);
        c30 = _mm256_fmadd_ps(a0, b0, c30); c31 = _mm256_fmadd_ps(a0, b1, c31);
        a0 = _mm256_broadcast_ss(a + 4 * lda + k);
        c40 = _mm256_fmadd_ps(a0, b0, c40); c41 = _mm256_fmadd_ps(a0, b1, c41);
        a0 = _mm256_broadcast_ss(a + 5 * lda + k);
        c50 = _mm256_fmadd_ps(a0, b0, c50); c51 = _mm256_fmadd_ps(a0, b1, c51);
    }
    _mm256_storeu_ps(c, c00); _mm256_storeu_ps(c + 8, c01);
    _mm256_storeu_ps(c + ldc, c10); _mm256_storeu_ps(c + ldc + 8, c11);
    _mm256_storeu_ps(c + 2 * ldc, c20); _mm256_storeu_ps(c + 2 * ldc + 8, c21);
    _mm256_storeu_ps(c + 3 * ldc, c30); _mm256_storeu_ps(c + 3 * ldc + 8, c31);
    _mm256_storeu_ps(c + 4 * ldc, c40); _mm256_storeu_ps(c + 4 * ldc + 8, c41);
    _mm256_storeu_ps(c + 5 * ldc, c50); _mm256_storeu_ps(c + 5 * ldc + 8, c51);
}

#if defined(__AVX512F__)
static inline void kernel_6x32(const float *a, int64_t lda, const float *b, int ldb, int k_len,
                               float *c, int64_t ldc) {
    __m512 c00 = _mm512_setzero_ps(), c01 = _mm512_setzero_ps(), c10 = _mm512_setzero_ps(),
           c11 = _mm512_setzero_ps(), c20 = _mm512_setzero_ps(), c21 = _mm512_setzero_ps(),
           c30 = _mm512_setzero_ps(), c31 = _mm512_setzero_ps(), c40 = _mm512_setzero_ps(),
           c41 = _mm512_setzero_ps(), c50 = _mm512_setzero_ps(), c51 = _mm512_setzero_ps();
    for (int k = 0; k < k_len; k++) {
        const __m512 b0 = _mm512_loadu_ps(b + (int64_t)k * ldb), b1 = _mm512_loadu_ps(b + (int64_t)k * ldb + 16);
        __m512 a0 = _mm512_set1_ps(a[k]);
        c00 = _mm512_fmadd_ps(a0, b0, c00); c01 = _mm512_fmadd_ps(a0, b1, c01);
        a0 = _mm512_set1_ps(a[lda + k]);
        c10 = _mm512_fmadd_ps(a0, b0, c10); c11 = _mm512_fmadd_ps(a0, b1, c11);
        a0 = _mm512_set1_ps(a[2 * lda + k]);
        c20 = _mm512_fmadd_ps(a0, b0, c20); c21 = _mm512_fmadd_ps(a0, b1, c21);
        a0 = _mm512_set1_ps(a[3 * lda + k]);
        c30 = _mm512_fmadd_ps(a0, b0, c30); c31 = _mm512_fmadd_ps(a0, b1, c31);
        a0 = _mm512_set1_ps(a[4 * lda + k]);
        c40 = _mm512_fmadd_ps(a0, b0, c40); c41 = _mm512_fmadd_ps(a0, b1, c41);
        a0 = _mm512_set1_ps(a[5 * lda + k]);
        c50 = _mm512_fmadd_ps(a0, b0, c50); c51 = _mm512_fmadd_ps(a0, b1, c51);
    }
    _mm512_storeu_ps(c, c00); _mm512_storeu_ps(c + 16, c01);
    _mm512_storeu_ps(c + ldc, c10); _mm512_storeu_ps(c + ldc + 16, c11);
    _mm512_storeu_ps(c + 2 * ldc, c20); _mm512_storeu_ps(c + 2 * ldc + 16, c21);
    _mm512_storeu_ps(c + 3 * ldc, c30); _mm512_storeu_ps(c + 3 * ldc + 16, c31);
    _mm512_storeu_ps(c + 4 * ldc, c40); _mm512_storeu_ps(c + 4 * ldc + 16, c41);
    _mm512_storeu_ps(c + 5 * ldc, c50); _mm512_storeu_ps(c + 5 * ldc + 16, c51);
}
#endif

/* One 6-row block of M[p]: 32-column kernels where the build has them, 16-column ones for the rest. */
static inline void row_block(const float *a, int64_t lda, const float *b, int n_len, int k_len, float *c,
                             int64_t ldc) {
    int j = 0;
#if defined(__AVX512F__)
    for (; j + 32 <= n_len; j += 32) kernel_6x32(a, lda, b + j, n_len, k_len, c + j, ldc);
#endif
    for (; j < n_len; j += 16) kernel_6x16(a, lda, b + j, n_len, k_len, c + j, ldc);
}

int wino_gemm(const float *v, int ldv, const float *u, int k_len, int n_len, float *m, int ldm,
              int64_t tiles, int nthreads) {
    if (n_len % 16 != 0 || n_len > 256 || k_len > 256) return WINO_DECLINED;
    const int64_t vstride = tiles * ldv, mstride = tiles * ldm, ustride = (int64_t)k_len * n_len;
    const int64_t row_blocks = (tiles + 5) / 6;
#pragma omp parallel num_threads(nthreads)
    {
        float a_pad[6 * 256], c_pad[6 * 256];
#pragma omp for schedule(static)
        for (int64_t job = 0; job < 36 * row_blocks; job++) {
            const int p = (int)(job / row_blocks);
            const int64_t r0 = (job % row_blocks) * 6;
            const float *a = v + p * vstride + r0 * ldv, *b = u + p * ustride;
            float *c = m + p * mstride + r0 * ldm;
            const int rows = tiles - r0 < 6 ? (int)(tiles - r0) : 6;
            if (rows == 6) {
                row_block(a, ldv, b, n_len, k_len, c, ldm);
            } else { /* the last few rows: zero-padded copies, so the same kernels serve */
                memset(a_pad, 0, sizeof a_pad);
                for (int r = 0; r < rows; r++) copy_floats(a_pad + r * k_len, a + r * ldv, k_len);
                row_block(a_pad, k_len, b, n_len, k_len, c_pad, n_len);
                for (int r = 0; r < rows; r++) copy_floats(c + r * ldm, c_pad + r * n_len, n_len);
            }
        }
    }
    return WINO_OK;
}
#else
int wino_gemm(const float *v, int ldv, const float *u, int k_len, int n_len, float *m, int ldm,
              int64_t tiles, int nthreads) {
    (void)v; (void)ldv; (void)u; (void)k_len; (void)n_len; (void)m; (void)ldm; (void)tiles; (void)nthreads;
    return WINO_DECLINED;
}
#endif
