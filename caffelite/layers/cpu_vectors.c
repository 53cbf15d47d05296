/* The vector width the compiled kernels use, from what this CPU has (cpu_vectors.h). */
#include "cpu_vectors.h"

static int bits = -1;

static int supported(void) {
#ifdef HAVE_X86_VECTORS
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return 512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 256;
#endif
    return 0;
}

int vector_bits(void) {
    if (bits < 0) bits = supported();
    return bits;
}

/* Use vectors of at most `limit` bits (tests run every width); returns the width now in use. */
int use_vector_bits(int limit) {
    const int best = supported();
    bits = limit >= best ? best : limit >= 256 && best >= 256 ? 256 : 0;
    return bits;
}
