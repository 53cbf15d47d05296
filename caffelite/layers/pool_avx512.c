/* Pooling with AVX-512 (pooling.py uses it for float32 where vector_bits() is 512), sixteen
 * outputs of a row at once: per kernel offset, masked loads of their input pixels (for stride
 * 2 two vectors' even pixels; larger strides gather, which costs more).
 *
 * MAX forward writes the top and each output's argmax kernel offset (row-major in its
 * window), which the compiled backward (cpu_kernels.c) and the mask top read. Caffe's rule:
 * the first strictly greater value in window order wins, padding never does (a window of
 * nothing but -inf keeps offset 0, which may lie in the padding): pixels outside the image
 * load as -inf. A NaN never wins either, as in Caffe (the NumPy passes' maximum lets it
 * through to the top).
 * AVE forward sums the window's pixels in kernel order (outside ones load as 0) and divides
 * by the pool size per output (Caffe's, from the caller): the NumPy passes' sums and quotients,
 * bit for bit. AVE backward (strides 1 and 2) adds dy / pool size into every pixel of each
 * window, summing a row's kernel columns in registers first.
 * Planes [p0, p1) of contiguous (planes, H, W) inputs and (planes, Ho, Wo) tops; the argmax
 * offsets through (plane, row) strides in elements, rows contiguous.
 * geometry: H, W, Ho, Wo, kernel h, w, stride h, w, pad h, w.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "cpu_vectors.h"

#ifdef HAVE_X86_VECTORS
enum { H, W, HO, WO, KH, KW, SH, SW, PH, PW };

#define TARGET __attribute__((target("avx512f")))

/* The lanes e of the 16 pixels [start, start + 16) of a row for which 0 <= start + e < width. */
static inline __mmask16 inside(int64_t start, int64_t width) {
    const int64_t lo = start < 0 ? -start : 0, hi = width - start < 16 ? width - start : 16;
    return hi > lo ? (__mmask16)(((1u << hi) - 1) & ~((1u << lo) - 1)) : 0;
}

/* The first n lanes (all 16 for n >= 16). */
static inline __mmask16 first_lanes(int64_t n) {
    return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1);
}

/* Input columns first + s * e (e = 0..15) of a row, `none` outside [0, width): contiguous loads
 * for strides 1 and 2 (the even pixels of two vectors), a gather for larger ones. */
static inline TARGET __m512 columns(const float *row, int64_t first, int64_t s, int64_t width,
                                    __m512 none) {
    if (s == 1) return _mm512_mask_loadu_ps(none, inside(first, width), row + first);
    if (s == 2) {
        const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        const __m512 a = _mm512_mask_loadu_ps(none, inside(first, width), row + first);
        const __m512 b = _mm512_mask_loadu_ps(none, inside(first + 16, width), row + first + 16);
        return _mm512_permutex2var_ps(a, even, b);
    }
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i col = _mm512_add_epi32(_mm512_mullo_epi32(lane, _mm512_set1_epi32((int)s)),
                                         _mm512_set1_epi32((int)first));
    const __mmask16 in = _mm512_cmpge_epi32_mask(col, _mm512_setzero_si512())
                         & _mm512_cmplt_epi32_mask(col, _mm512_set1_epi32((int)width));
    return _mm512_mask_i32gather_ps(none, in, col, row, 4);
}

/* The top and argmax offsets of the 16 outputs of row oh from column ow0 on. */
static inline TARGET void window_max(const float *plane, const int64_t *g, int64_t oh, int64_t ow0,
                                     __m512 *best, __m512i *offset) {
    *best = _mm512_set1_ps(-INFINITY);
    *offset = _mm512_setzero_si512();
    for (int64_t ky = 0; ky < g[KH]; ++ky) {
        const int64_t r = oh * g[SH] - g[PH] + ky;
        if (r < 0 || r >= g[H]) continue;   /* (a row of padding: -inf never wins) */
        for (int64_t kx = 0; kx < g[KW]; ++kx) {
            const __m512 v = columns(plane + r * g[W], ow0 * g[SW] - g[PW] + kx, g[SW], g[W],
                                     _mm512_set1_ps(-INFINITY));
            const __mmask16 greater = _mm512_cmp_ps_mask(v, *best, _CMP_GT_OQ);
            *best = _mm512_mask_mov_ps(*best, greater, v);
            *offset = _mm512_mask_mov_epi32(*offset, greater, _mm512_set1_epi32((int)(ky * g[KW] + kx)));
        }
    }
}

#define MAX_FORWARD(NAME, I, STORE)                                                           \
    TARGET void NAME(const float *x, float *y, I *index, const int64_t *index_strides,        \
                     int64_t p0, int64_t p1, const int64_t *g) {                               \
        for (int64_t p = p0; p < p1; ++p) {                                                   \
            const float *plane = x + p * g[H] * g[W];                                         \
            for (int64_t oh = 0; oh < g[HO]; ++oh) {                                          \
                float *top = y + (p * g[HO] + oh) * g[WO];                                    \
                I *at = index + p * index_strides[0] + oh * index_strides[1];                 \
                for (int64_t ow0 = 0; ow0 < g[WO]; ow0 += 16) {                               \
                    const __mmask16 valid = first_lanes(g[WO] - ow0);                          \
                    __m512 best;                                                              \
                    __m512i offset;                                                           \
                    window_max(plane, g, oh, ow0, &best, &offset);                           \
                    _mm512_mask_storeu_ps(top + ow0, valid, best);                            \
                    STORE(at + ow0, valid, offset);                                           \
                }                                                                             \
            }                                                                                 \
        }                                                                                     \
    }

MAX_FORWARD(max_forward_f32_u8, uint8_t, _mm512_mask_cvtepi32_storeu_epi8)
MAX_FORWARD(max_forward_f32_i32, int32_t, _mm512_mask_storeu_epi32)

/* AVE: y = (sum of each window's pixels) / divisor, divisor (Ho, Wo) the pool sizes. */
TARGET void ave_forward_f32(const float *x, float *y, const float *divisor, int64_t p0, int64_t p1,
                            const int64_t *g) {
    for (int64_t p = p0; p < p1; ++p) {
        const float *plane = x + p * g[H] * g[W];
        for (int64_t oh = 0; oh < g[HO]; ++oh)
            for (int64_t ow0 = 0; ow0 < g[WO]; ow0 += 16) {
                const __mmask16 valid = first_lanes(g[WO] - ow0);
                __m512 sum = _mm512_setzero_ps();
                for (int64_t ky = 0; ky < g[KH]; ++ky) {
                    const int64_t r = oh * g[SH] - g[PH] + ky;
                    if (r < 0 || r >= g[H]) continue;   /* (a row of padding adds 0) */
                    for (int64_t kx = 0; kx < g[KW]; ++kx)
                        sum = _mm512_add_ps(sum, columns(plane + r * g[W], ow0 * g[SW] - g[PW] + kx,
                                                         g[SW], g[W], _mm512_setzero_ps()));
                }
                const int64_t at = oh * g[WO] + ow0;
                const __m512 size = _mm512_mask_loadu_ps(_mm512_set1_ps(1.0f), valid, divisor + at);
                _mm512_mask_storeu_ps(y + p * g[HO] * g[WO] + at, valid, _mm512_div_ps(sum, size));
            }
    }
}

/* AVE backward, strides 1 and 2, kernel width up to 16: dx = 0, then per output row and
 * window row, the shares dy / divisor of 16 outputs are spread over the pixels they reach
 * from the first window's first column on (stride 2: share e at pixel 2e, over two vectors),
 * shifted by each kernel column and summed in registers (three vectors, 48 pixels), and
 * added to dx once. */
TARGET void ave_backward_f32(const float *dy, float *dx, const float *divisor, int64_t p0, int64_t p1,
                             const int64_t *g) {
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i low = _mm512_srli_epi32(lane, 1), high = _mm512_add_epi32(low, _mm512_set1_epi32(8));
    const __m512 zero = _mm512_setzero_ps();
    __m512i shift[16];   /* kernel column kx: lane i takes lane i - kx of the pixels before */
    for (int64_t kx = 0; kx < g[KW]; ++kx)
        shift[kx] = _mm512_add_epi32(lane, _mm512_set1_epi32((int)(16 - kx)));
    for (int64_t p = p0; p < p1; ++p) {
        float *plane = dx + p * g[H] * g[W];
        memset(plane, 0, (size_t)(g[H] * g[W]) * sizeof(float));
        for (int64_t oh = 0; oh < g[HO]; ++oh)
            for (int64_t ow0 = 0; ow0 < g[WO]; ow0 += 16) {
                const __mmask16 valid = first_lanes(g[WO] - ow0);
                const int64_t at = oh * g[WO] + ow0;
                const __m512 share = _mm512_maskz_div_ps(
                    valid, _mm512_maskz_loadu_ps(valid, dy + p * g[HO] * g[WO] + at),
                    _mm512_mask_loadu_ps(_mm512_set1_ps(1.0f), valid, divisor + at));
                const __m512 a = g[SW] == 1 ? share : _mm512_maskz_permutexvar_ps(0x5555, low, share);
                const __m512 b = g[SW] == 1 ? zero : _mm512_maskz_permutexvar_ps(0x5555, high, share);
                __m512 sum0 = zero, sum1 = zero, sum2 = zero;
                for (int64_t kx = 0; kx < g[KW]; ++kx) {
                    sum0 = _mm512_add_ps(sum0, _mm512_permutex2var_ps(zero, shift[kx], a));
                    sum1 = _mm512_add_ps(sum1, _mm512_permutex2var_ps(a, shift[kx], b));
                    sum2 = _mm512_add_ps(sum2, _mm512_permutex2var_ps(b, shift[kx], zero));
                }
                const int64_t first = ow0 * g[SW] - g[PW];
                const __mmask16 in0 = inside(first, g[W]), in1 = inside(first + 16, g[W]),
                                in2 = inside(first + 32, g[W]);
                for (int64_t ky = 0; ky < g[KH]; ++ky) {
                    const int64_t r = oh * g[SH] - g[PH] + ky;
                    if (r < 0 || r >= g[H]) continue;
                    float *row = plane + r * g[W] + first;
                    _mm512_mask_storeu_ps(row, in0, _mm512_add_ps(_mm512_maskz_loadu_ps(in0, row), sum0));
                    if (in1) _mm512_mask_storeu_ps(row + 16, in1, _mm512_add_ps(
                        _mm512_maskz_loadu_ps(in1, row + 16), sum1));
                    if (in2) _mm512_mask_storeu_ps(row + 32, in2, _mm512_add_ps(
                        _mm512_maskz_loadu_ps(in2, row + 32), sum2));
                }
            }
    }
}
#endif
