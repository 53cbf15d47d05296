/* Direct 2-D convolution for the CPU (conv_direct.py): stride 1, no dilation, no groups,
 * float32, with AVX-512 or AVX2 + FMA vectors (cpu_vectors.c says which).
 *
 * No columns: each item's input planes are copied into zero-padded planes P, rows Wp = W + 2pw
 * wide, and the output is computed on the same wide grid, row r of it at r * Wp. Output pixel
 * i = r * Wp + c then reads input (r + ky, c + kx) at i + ky * Wp + kx: every tap t = (channel,
 * ky, kx) is one offset into P, and a convolution is, per output channel o,
 *     wide[o, i] = bias[o] + sum over taps t of w[o, t] * P[offset(t) + i]
 * over the contiguous i in [0, Ho * Wp): the Wp - Wo extra columns per row are computed and
 * dropped. Register blocks of FO channels by FV vectors of i (forward) and GO channels by GT
 * taps (weight gradient, which runs the same sum the other way round with dy in wide rows and
 * zeros in the extra columns) keep the FMA units fed from the cache.
 * dx of a stride-1 convolution is this forward over dy, padded by kernel - 1 - pad, with the
 * weights flipped and transposed (conv_direct.py builds them).
 *
 * shape: C, H, W (input), M, Ho, Wo (output), pad h, w, K (taps), Wp, the padded planes' size
 * with their slack (PSIZE) and the wide rows' length LR (Ho * Wp rounded up to whole blocks).
 * Items [n0, n1) of contiguous (N, C, H, W) inputs and (N, M, Ho, Wo) outputs; scratch from
 * the caller, each part its own.
 */
#include <stdint.h>
#include <string.h>

#include "cpu_vectors.h"

enum { C_, H_, W_, M_, HO_, WO_, PH_, PW_, K_, WP_, PSIZE_, LR_ };

#ifdef HAVE_X86_VECTORS
/* Item x's channels into the padded planes' insides (their borders stay zero). */
static void pad_planes(const float *x, const int64_t *s, float *padded) {
    const int64_t plane = (s[H_] + 2 * s[PH_]) * s[WP_];
    for (int64_t c = 0; c < s[C_]; ++c)
        for (int64_t r = 0; r < s[H_]; ++r)
            memcpy(padded + c * plane + (r + s[PH_]) * s[WP_] + s[PW_], x + (c * s[H_] + r) * s[W_],
                   (size_t)s[W_] * sizeof(float));
}

/* ---- AVX-512: 32 vector registers ---- */
#define TARGET __attribute__((target("avx512f")))
#define NAME(x) x##_avx512
#define VL 16
#define VEC __m512
#define VLOAD _mm512_loadu_ps
#define VSTORE _mm512_storeu_ps
#define VSET1 _mm512_set1_ps
#define VADD _mm512_add_ps
#define VFMA _mm512_fmadd_ps
#define VSUM _mm512_reduce_add_ps
#define KEEP(v) ((void)0)
#define FO 4
#define FV 4
#define GO 4
#define GT 5
#include "conv_direct_body.h"
#undef TARGET
#undef NAME
#undef VL
#undef VEC
#undef VLOAD
#undef VSTORE
#undef VSET1
#undef VADD
#undef VFMA
#undef VSUM
#undef KEEP
#undef FO
#undef FV
#undef GO
#undef GT

/* ---- AVX2 + FMA: 16 vector registers ---- */
#define TARGET __attribute__((target("avx2,fma")))
static inline TARGET float sum_avx2(__m256 v) {
    const __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 pair = _mm_add_ps(half, _mm_movehl_ps(half, half));
    return _mm_cvtss_f32(_mm_add_ss(pair, _mm_movehdup_ps(pair)));
}
#define NAME(x) x##_avx2
#define VL 8
#define VEC __m256
#define VLOAD _mm256_loadu_ps
#define VSTORE _mm256_storeu_ps
#define VSET1 _mm256_set1_ps
#define VADD _mm256_add_ps
#define VFMA _mm256_fmadd_ps
#define VSUM sum_avx2
/* (with 16 registers GCC would rather load a tap's pixels once per FMA: twice the loads) */
#define KEEP(v) __asm__("" : "+x"(v))
#define FO 3
#define FV 4
#define GO 2
#define GT 5
#include "conv_direct_body.h"
#endif

#ifdef HAVE_X86_VECTORS
void direct_forward_f32(const float *x, const float *w, const float *bias, const int64_t *taps,
                        const int64_t *s, float *y, float *scratch, int64_t n0, int64_t n1) {
    if (vector_bits() == 512) forward_avx512(x, w, bias, taps, s, y, scratch, n0, n1);
    else if (vector_bits() == 256) forward_avx2(x, w, bias, taps, s, y, scratch, n0, n1);
}

void direct_weight_grad_f32(const float *x, const float *dy, const int64_t *taps, const int64_t *s,
                            float *dw, float *db, float *scratch, int64_t n0, int64_t n1) {
    if (vector_bits() == 512) weight_grad_avx512(x, dy, taps, s, dw, db, scratch, n0, n1);
    else if (vector_bits() == 256) weight_grad_avx2(x, dy, taps, s, dw, db, scratch, n0, n1);
}
#endif
