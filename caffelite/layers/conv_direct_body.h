/* The direct convolution kernels' body, included once per instruction set by conv_direct.c,
 * which defines first: TARGET (the function attribute), NAME(x) (the suffixed name), VL (floats
 * per vector), VEC and the V* operations, KEEP(v) (keeps v in a register rather than let the
 * compiler load it again into each FMA), and the register blocking: FO output channels by FV
 * vectors of pixels (forward), GO output channels by GT taps (weight gradient). */

/* The forward (also dx: see conv_direct.c): y[n, o] = bias[o] + sum over taps t of
 * w[o, t] * P[t's offset + i], for items [n0, n1). scratch: P, then FO wide rows. */
static TARGET void NAME(forward)(const float *x, const float *w, const float *bias,
                                 const int64_t *taps, const int64_t *s, float *y, float *scratch,
                                 int64_t n0, int64_t n1) {
    const int64_t k = s[K_], m = s[M_], lr = s[LR_], wp = s[WP_];
    float *padded = scratch, *wide = scratch + s[PSIZE_];
    memset(padded, 0, (size_t)s[PSIZE_] * sizeof(float));
    for (int64_t n = n0; n < n1; ++n) {
        pad_planes(x + n * s[C_] * s[H_] * s[W_], s, padded);
        for (int64_t o0 = 0; o0 < m; o0 += FO) {
            const int64_t rows = m - o0 < FO ? m - o0 : FO;
            const float *wr[FO];
            float b[FO];
            for (int j = 0; j < FO; ++j) {   /* (a short last block repeats its last row) */
                const int64_t o = o0 + (j < rows ? j : rows - 1);
                wr[j] = w + o * k;
                b[j] = bias ? bias[o] : 0.0f;
            }
            for (int64_t i0 = 0; i0 < lr; i0 += FV * VL) {
                VEC acc[FO][FV];
#pragma GCC unroll 8
                for (int j = 0; j < FO; ++j)
#pragma GCC unroll 8
                    for (int v = 0; v < FV; ++v) acc[j][v] = VSET1(b[j]);
                for (int64_t t = 0; t < k; ++t) {
                    const float *p = padded + taps[t] + i0;
                    VEC wt[FO];
#pragma GCC unroll 8
                    for (int j = 0; j < FO; ++j) wt[j] = VSET1(wr[j][t]);
#pragma GCC unroll 8
                    for (int v = 0; v < FV; ++v) {
                        const VEC a = VLOAD(p + v * VL);
#pragma GCC unroll 8
                        for (int j = 0; j < FO; ++j) acc[j][v] = VFMA(wt[j], a, acc[j][v]);
                    }
                }
#pragma GCC unroll 8
                for (int j = 0; j < FO; ++j)
#pragma GCC unroll 8
                    for (int v = 0; v < FV; ++v) VSTORE(wide + j * lr + i0 + v * VL, acc[j][v]);
            }
            for (int64_t j = 0; j < rows; ++j) {
                float *top = y + (n * m + o0 + j) * s[HO_] * s[WO_];
                for (int64_t r = 0; r < s[HO_]; ++r)
                    memcpy(top + r * s[WO_], wide + j * lr + r * wp, (size_t)s[WO_] * sizeof(float));
            }
        }
    }
}

/* The weight gradient: dw[o, t] += sum over i of D[o, i] * P[t's offset + i] and
 * db[o] += sum of D[o] (db may be NULL), D = dy[n] in wide rows with zeros in the extra
 * columns, for items [n0, n1). scratch: P, then m wide rows. */
static TARGET void NAME(weight_grad)(const float *x, const float *dy, const int64_t *taps,
                                     const int64_t *s, float *dw, float *db, float *scratch,
                                     int64_t n0, int64_t n1) {
    const int64_t k = s[K_], m = s[M_], lr = s[LR_], wp = s[WP_], ho = s[HO_], wo = s[WO_];
    float *padded = scratch, *wide = scratch + s[PSIZE_];
    memset(padded, 0, (size_t)s[PSIZE_] * sizeof(float));
    memset(wide, 0, (size_t)(m * lr) * sizeof(float));
    for (int64_t n = n0; n < n1; ++n) {
        pad_planes(x + n * s[C_] * s[H_] * s[W_], s, padded);
        for (int64_t o = 0; o < m; ++o) {
            const float *grad = dy + (n * m + o) * ho * wo;
            for (int64_t r = 0; r < ho; ++r)
                memcpy(wide + o * lr + r * wp, grad + r * wo, (size_t)wo * sizeof(float));
            if (db) {
                VEC sum = VSET1(0.0f);
                for (int64_t i = 0; i < lr; i += VL) sum = VADD(sum, VLOAD(wide + o * lr + i));
                db[o] += VSUM(sum);
            }
        }
        for (int64_t o0 = 0; o0 < m; o0 += GO) {
            const int64_t rows = m - o0 < GO ? m - o0 : GO;
            const float *d[GO];
            for (int j = 0; j < GO; ++j) d[j] = wide + (o0 + (j < rows ? j : rows - 1)) * lr;
            for (int64_t t0 = 0; t0 < k; t0 += GT) {
                const int64_t count = k - t0 < GT ? k - t0 : GT;
                const float *p[GT];
                for (int u = 0; u < GT; ++u) p[u] = padded + taps[t0 + (u < count ? u : count - 1)];
                VEC acc[GO][GT];
#pragma GCC unroll 8
                for (int j = 0; j < GO; ++j)
#pragma GCC unroll 8
                    for (int u = 0; u < GT; ++u) acc[j][u] = VSET1(0.0f);
                for (int64_t i = 0; i < lr; i += VL) {
                    VEC g[GO];
#pragma GCC unroll 8
                    for (int j = 0; j < GO; ++j) g[j] = VLOAD(d[j] + i);
#pragma GCC unroll 8
                    for (int u = 0; u < GT; ++u) {
                        VEC a = VLOAD(p[u] + i);
                        KEEP(a);
#pragma GCC unroll 8
                        for (int j = 0; j < GO; ++j) acc[j][u] = VFMA(g[j], a, acc[j][u]);
                    }
                }
                float sums[GO][GT];   /* (constant indices: the accumulators stay registers) */
#pragma GCC unroll 8
                for (int j = 0; j < GO; ++j)
#pragma GCC unroll 8
                    for (int u = 0; u < GT; ++u) sums[j][u] = VSUM(acc[j][u]);
                for (int64_t j = 0; j < rows; ++j)
                    for (int64_t u = 0; u < count; ++u) dw[(o0 + j) * k + t0 + u] += sums[j][u];
            }
        }
    }
}
