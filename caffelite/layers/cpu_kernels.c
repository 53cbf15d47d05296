/* Compiled CPU loops for what NumPy cannot do in whole-array passes (see cpu_kernels.py).
 *
 * Pooling backward scatters each output's gradient into its window: Caffe's own loops
 * (pooling_layer.cpp), one plane at a time, so a plane's window sums stay in the cache.
 * NumPy needs a pass over every plane per kernel offset for the same thing.
 *
 * Every function takes planes [p0, p1) of (planes, H, W) inputs and (planes, Ho, Wo) outputs;
 * the outputs (dy, the argmax) are read through element strides, so a top, a phased grid or a
 * batch-last buffer serve alike. The input gradient dx is contiguous and overwritten.
 * geometry: H, W, Ho, Wo, kernel h, w, stride h, w, pad h, w.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { H, W, HO, WO, KH, KW, SH, SW, PH, PW };

/* Kernel offset k -> (k / kw, k % kw), once per call (a division per output costs more than
 * the rest of the loop). NULL when out of memory. */
static int64_t *offset_table(const int64_t *g) {
    const int64_t count = g[KH] * g[KW];
    int64_t *table = malloc((size_t)(2 * count) * sizeof(int64_t));
    for (int64_t k = 0; table && k < count; ++k) {
        table[2 * k] = k / g[KW];
        table[2 * k + 1] = k % g[KW];
    }
    return table;
}

/* MAX: dx[oh*sh - ph + k / kw, ow*sw - pw + k % kw] += dy[oh, ow], k = the argmax kernel
 * offset of output (oh, ow) (row-major in its window, as the forward pass wrote it).
 * Returns 0, or -1 when out of memory. */
#define MAX_BACKWARD(NAME, T, I)                                                              \
    int NAME(const T *dy, const int64_t *dy_strides, const I *index,                          \
             const int64_t *index_strides, T *dx, int64_t p0, int64_t p1, const int64_t *g) {  \
        const int64_t plane = g[H] * g[W];                                                    \
        int64_t *offset = offset_table(g);                                                    \
        if (!offset) return -1;                                                               \
        for (int64_t p = p0; p < p1; ++p) {                                                   \
            T *out = dx + p * plane;                                                          \
            memset(out, 0, (size_t)plane * sizeof(T));                                        \
            for (int64_t oh = 0; oh < g[HO]; ++oh) {                                          \
                const T *grad = dy + p * dy_strides[0] + oh * dy_strides[1];                  \
                const I *k = index + p * index_strides[0] + oh * index_strides[1];            \
                const int64_t top = oh * g[SH] - g[PH];                                       \
                for (int64_t ow = 0; ow < g[WO]; ++ow) {                                      \
                    const int64_t *at = offset + 2 * (int64_t)k[ow * index_strides[2]];       \
                    const int64_t h = top + at[0], w = ow * g[SW] - g[PW] + at[1];            \
                    /* (a window of nothing but -inf may name its padding) */                 \
                    if ((uint64_t)h < (uint64_t)g[H] && (uint64_t)w < (uint64_t)g[W])         \
                        out[h * g[W] + w] += grad[ow * dy_strides[2]];                        \
                }                                                                             \
            }                                                                                 \
        }                                                                                     \
        free(offset);                                                                         \
        return 0;                                                                             \
    }

MAX_BACKWARD(max_backward_f32_u8, float, uint8_t)
MAX_BACKWARD(max_backward_f32_i32, float, int32_t)
MAX_BACKWARD(max_backward_f64_u8, double, uint8_t)
MAX_BACKWARD(max_backward_f64_i32, double, int32_t)

/* AVE: dx[window of (oh, ow)] += dy[oh, ow] / pool size, the window clipped to the image and
 * the pool size to the padded image (Caffe's rule). Separably: an output row's shares are
 * spread over one image row, which is added to each row its windows cover. ``row`` is
 * scratch of W elements. */
#define AVE_BACKWARD(NAME, T)                                                                 \
    void NAME(const T *dy, const int64_t *dy_strides, T *dx, int64_t p0, int64_t p1,          \
              const int64_t *g, T *row) {                                                     \
        const int64_t plane = g[H] * g[W];                                                    \
        for (int64_t p = p0; p < p1; ++p) {                                                   \
            T *out = dx + p * plane;                                                          \
            memset(out, 0, (size_t)plane * sizeof(T));                                        \
            for (int64_t oh = 0; oh < g[HO]; ++oh) {                                          \
                const T *grad = dy + p * dy_strides[0] + oh * dy_strides[1];                  \
                int64_t h0 = oh * g[SH] - g[PH], h1 = h0 + g[KH];                             \
                if (h1 > g[H] + g[PH]) h1 = g[H] + g[PH];                                     \
                const int64_t rows = h1 - h0;                                                 \
                if (h0 < 0) h0 = 0;                                                           \
                if (h1 > g[H]) h1 = g[H];                                                     \
                memset(row, 0, (size_t)g[W] * sizeof(T));                                     \
                for (int64_t ow = 0; ow < g[WO]; ++ow) {                                      \
                    int64_t w0 = ow * g[SW] - g[PW], w1 = w0 + g[KW];                         \
                    if (w1 > g[W] + g[PW]) w1 = g[W] + g[PW];                                 \
                    const T share = grad[ow * dy_strides[2]] / (T)(rows * (w1 - w0));         \
                    if (w0 < 0) w0 = 0;                                                       \
                    if (w1 > g[W]) w1 = g[W];                                                 \
                    for (int64_t w = w0; w < w1; ++w) row[w] += share;                        \
                }                                                                             \
                for (int64_t h = h0; h < h1; ++h) {                                           \
                    T *restrict target = out + h * g[W];                                      \
                    for (int64_t w = 0; w < g[W]; ++w) target[w] += row[w];                   \
                }                                                                             \
            }                                                                                 \
        }                                                                                     \
    }

AVE_BACKWARD(ave_backward_f32, float)
AVE_BACKWARD(ave_backward_f64, double)
