/* Compiled CPU loops for what NumPy cannot do in whole-array passes (see cpu_kernels.py).
 *
 * MAX pooling backward sends each output's gradient to its window's argmax: Caffe's own loop
 * (pooling_layer.cpp), one plane at a time, so a plane's sums stay in the cache. NumPy needs
 * a compare and a multiply-add over every plane per kernel offset for the same thing. (AVE
 * backward in C, separable or not, measured slower than the phased NumPy passes.)
 *
 * Kernels take planes [p0, p1) of (planes, H, W) inputs and (planes, Ho, Wo) outputs;
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

