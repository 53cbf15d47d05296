/* Which vector instructions the compiled kernels may use (cpu_vectors.c). */
#ifndef CAFFELITE_CPU_VECTORS_H
#define CAFFELITE_CPU_VECTORS_H

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
/* Kernels for x86-64 vector units are compiled (each function for its own target). */
#define HAVE_X86_VECTORS 1
#endif

/* The vector width in bits the kernels use: 512 (AVX-512), 256 (AVX2 + FMA) or 0 (none). */
int vector_bits(void);

#endif
