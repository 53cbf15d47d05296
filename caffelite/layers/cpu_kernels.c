/* Compiled CPU loops for what NumPy cannot do in whole-array passes (see cpu_kernels.py):
 * MAX pooling backward, im2col / col2im for the columns convolution engine, the SGD /
 * Nesterov steps in one pass, and the DFT engine's complex products from their real parts.
 *
 * MAX pooling backward sends each output's gradient to its window's argmax: Caffe's own loop
 * (pooling_layer.cpp), one plane at a time, so a plane's sums stay in the cache. NumPy needs
 * a compare and a multiply-add over every plane per kernel offset for the same thing. (A
 * scalar AVE backward measured slower than the phased NumPy passes; pool_avx512.c has a
 * vector one.) It takes
 * planes [p0, p1) of (planes, H, W) inputs and (planes, Ho, Wo) outputs; the outputs (dy, the
 * argmax) are read through element strides, so a top, a phased grid or a batch-last buffer
 * serve alike. The input gradient dx is contiguous and overwritten.
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

/* im2col and col2im, 2-D: the columns of image b are col[b * image_stride + r * row_stride + p]
 * for column row r = (c, i, j) (channel, kernel row, kernel column) and output pixel
 * p = oh * Wo + ow, holding x[b, c, oh*sh - ph + i*dh, ow*sw - pw + j*dw] (0 in the padding).
 * The strides give both layouts the convolution uses: (rows, n * pixels) for one GEMM over a
 * chunk of images, and (n, rows, pixels) for a GEMM per image. Images [b0, b1) only.
 * shape: C, H, W, Ho, Wo, kernel h, w, stride h, w, pad h, w, dilation h, w. */
enum { C_, H_, W_, HO_, WO_, KH_, KW_, SH_, SW_, PH_, PW_, DH_, DW_ };

/* The output columns [lo, hi) whose input column for kernel column j lies in the image. */
static void columns_inside(const int64_t *s, int64_t j, int64_t *first, int64_t *lo, int64_t *hi) {
    *first = j * s[DW_] - s[PW_];
    *lo = *first < 0 ? (-*first + s[SW_] - 1) / s[SW_] : 0;
    *hi = *first < s[W_] ? (s[W_] - 1 - *first) / s[SW_] + 1 : 0;
    if (*hi > s[WO_]) *hi = s[WO_];
    if (*lo > *hi) *lo = *hi;
}

#define IM2COL(NAME, T)                                                                       \
    void NAME(const T *x, T *col, int64_t b0, int64_t b1, int64_t image_stride,               \
              int64_t row_stride, const int64_t *s) {                                         \
        const int64_t kernel = s[KH_] * s[KW_], plane = s[H_] * s[W_];                        \
        for (int64_t b = b0; b < b1; ++b) {                                                   \
            for (int64_t r = 0; r < s[C_] * kernel; ++r) {                                    \
                const int64_t c = r / kernel, i = r / s[KW_] % s[KH_], j = r % s[KW_];        \
                int64_t first, lo, hi;                                                        \
                columns_inside(s, j, &first, &lo, &hi);                                       \
                const T *image = x + (b * s[C_] + c) * plane;                                 \
                T *out = col + b * image_stride + r * row_stride;                             \
                for (int64_t oh = 0; oh < s[HO_]; ++oh, out += s[WO_]) {                      \
                    const int64_t h = oh * s[SH_] - s[PH_] + i * s[DH_];                      \
                    if (h < 0 || h >= s[H_]) {                                                \
                        memset(out, 0, (size_t)s[WO_] * sizeof(T));                           \
                        continue;                                                             \
                    }                                                                         \
                    const T *src = image + h * s[W_] + first;                                 \
                    for (int64_t ow = 0; ow < lo; ++ow) out[ow] = 0;                          \
                    if (s[SW_] == 1)                                                          \
                        memcpy(out + lo, src + lo, (size_t)(hi - lo) * sizeof(T));             \
                    else                                                                      \
                        for (int64_t ow = lo; ow < hi; ++ow) out[ow] = src[ow * s[SW_]];      \
                    for (int64_t ow = hi; ow < s[WO_]; ++ow) out[ow] = 0;                     \
                }                                                                             \
            }                                                                                 \
        }                                                                                     \
    }

/* col2im: x[b] (overwritten) = the sum of every column entry at the pixel it came from. */
#define COL2IM(NAME, T)                                                                       \
    void NAME(const T *col, T *x, int64_t b0, int64_t b1, int64_t image_stride,               \
              int64_t row_stride, const int64_t *s) {                                         \
        const int64_t kernel = s[KH_] * s[KW_], plane = s[H_] * s[W_];                        \
        for (int64_t b = b0; b < b1; ++b) {                                                   \
            memset(x + b * s[C_] * plane, 0, (size_t)(s[C_] * plane) * sizeof(T));            \
            for (int64_t r = 0; r < s[C_] * kernel; ++r) {                                    \
                const int64_t c = r / kernel, i = r / s[KW_] % s[KH_], j = r % s[KW_];        \
                int64_t first, lo, hi;                                                        \
                columns_inside(s, j, &first, &lo, &hi);                                       \
                T *image = x + (b * s[C_] + c) * plane;                                       \
                const T *in = col + b * image_stride + r * row_stride;                        \
                for (int64_t oh = 0; oh < s[HO_]; ++oh, in += s[WO_]) {                       \
                    const int64_t h = oh * s[SH_] - s[PH_] + i * s[DH_];                      \
                    if (h < 0 || h >= s[H_]) continue;                                        \
                    T *dst = image + h * s[W_] + first;                                       \
                    for (int64_t ow = lo; ow < hi; ++ow) dst[ow * s[SW_]] += in[ow];          \
                }                                                                             \
            }                                                                                 \
        }                                                                                     \
    }

IM2COL(im2col_f32, float)
IM2COL(im2col_f64, double)
COL2IM(col2im_f32, float)
COL2IM(col2im_f64, double)

/* The SGD and Nesterov steps in one pass over a parameter (the NumPy code does 6 and 9), in
 * the same order and rounding as Caffe's CPU code (and as the NumPy path: no fused
 * multiply-add, see setup.py): g = diff + decay * w, history = momentum * history + rate * g,
 * and the step into diff: SGD history, Nesterov (1 + momentum) * history - momentum * the
 * previous history. */
#define SGD_UPDATE(NAME, T)                                                                   \
    void NAME(int64_t count, T momentum, T rate, T decay, const T *w, T *history, T *diff) {   \
        for (int64_t i = 0; i < count; ++i) {                                                 \
            const T g = diff[i] + decay * w[i];                                               \
            history[i] = momentum * history[i] + rate * g;                                    \
            diff[i] = history[i];                                                             \
        }                                                                                     \
    }

#define NESTEROV_UPDATE(NAME, T)                                                              \
    void NAME(int64_t count, T momentum, T rate, T decay, const T *w, T *history, T *diff) {   \
        const T ahead = (T)1 + momentum;                                                      \
        for (int64_t i = 0; i < count; ++i) {                                                 \
            const T g = diff[i] + decay * w[i], previous = history[i];                        \
            history[i] = momentum * previous + rate * g;                                      \
            diff[i] = -momentum * previous + ahead * history[i];                              \
        }                                                                                     \
    }

SGD_UPDATE(sgd_update_f32, float)
SGD_UPDATE(sgd_update_f64, double)
NESTEROV_UPDATE(nesterov_update_f32, float)
NESTEROV_UPDATE(nesterov_update_f64, double)

/* The DFT convolution's complex products (conv_dft.py) from their four real parts in one
 * pass: z holds, per row and entry, Re(a) times [Br | Bi] and Im(a) times [Br | Bi] (each
 * 2 * cols wide); out = a B, or a conj(B) when `conj`, as re and im planes:
 *     a B:        re = Re a Br - Im a Bi,  im = Re a Bi + Im a Br
 *     a conj(B):  re = Re a Br + Im a Bi,  im = Im a Br - Re a Bi
 * z: (rows, 2, entries, 2 * cols) contiguous; out: (rows, 2, entries, out_stride) with this
 * group's cols from column 0 of `out` on. The same sums as the NumPy passes, bit for bit. */
#define COMPLEX_COMBINE(NAME, T)                                                              \
    void NAME(const T *z, T *out, int64_t rows, int64_t entries, int64_t cols,                \
              int64_t out_stride, int conj) {                                                 \
        for (int64_t r = 0; r < rows; ++r)                                                    \
            for (int64_t e = 0; e < entries; ++e) {                                           \
                const T *a = z + ((r * 2) * entries + e) * 2 * cols;                          \
                const T *b = z + ((r * 2 + 1) * entries + e) * 2 * cols;                      \
                T *re = out + ((r * 2) * entries + e) * out_stride;                           \
                T *im = out + ((r * 2 + 1) * entries + e) * out_stride;                       \
                if (conj)                                                                     \
                    for (int64_t j = 0; j < cols; ++j) {                                      \
                        re[j] = a[j] + b[cols + j];                                           \
                        im[j] = b[j] - a[cols + j];                                           \
                    }                                                                         \
                else                                                                          \
                    for (int64_t j = 0; j < cols; ++j) {                                      \
                        re[j] = a[j] - b[cols + j];                                           \
                        im[j] = a[cols + j] + b[j];                                           \
                    }                                                                         \
            }                                                                                 \
    }

COMPLEX_COMBINE(complex_combine_f32, float)
COMPLEX_COMBINE(complex_combine_f64, double)
