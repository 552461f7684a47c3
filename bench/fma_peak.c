/* FP32 FMA peak of one core: independent FMA chains on ymm (AVX2) and, where the CPU has it, zmm (AVX-512)
 * registers, nothing else in the loop. Built and run by bench/model_speed.py:
 *
 *     gcc -O3 -mavx2 -mfma fma_peak.c -o fma_peak && ./fma_peak [seconds]
 *
 * prints one line per instruction set, "avx2 <GFLOP/s>" and "avx512 <GFLOP/s>", the best of many ~1 ms runs
 * for [seconds] each (a run that shared the core with another process is slower, never faster).
 *
 * 12 accumulators cover an FMA latency of 4-6 cycles on two FMA ports (latency x ports <= 12), so the
 * loop is bound by FMA throughput alone; each FMA is 2 FLOPs per lane (8 lanes ymm, 16 zmm).
 */
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define N_ACC 12

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static volatile float sink;

#define CHAINS(FMA, a, b, c) \
    a##0 = FMA(a##0, b, c); a##1 = FMA(a##1, b, c); a##2 = FMA(a##2, b, c); a##3 = FMA(a##3, b, c); \
    a##4 = FMA(a##4, b, c); a##5 = FMA(a##5, b, c); a##6 = FMA(a##6, b, c); a##7 = FMA(a##7, b, c); \
    a##8 = FMA(a##8, b, c); a##9 = FMA(a##9, b, c); a##10 = FMA(a##10, b, c); a##11 = FMA(a##11, b, c);

__attribute__((target("avx2,fma"), noinline)) static double run_avx2(long iters) {
    __m256 b = _mm256_set1_ps(0.9999999f), c = _mm256_set1_ps(1e-7f);
    __m256 x0 = _mm256_set1_ps(0.f), x1 = _mm256_set1_ps(1.f), x2 = _mm256_set1_ps(2.f), x3 = _mm256_set1_ps(3.f),
           x4 = _mm256_set1_ps(4.f), x5 = _mm256_set1_ps(5.f), x6 = _mm256_set1_ps(6.f), x7 = _mm256_set1_ps(7.f),
           x8 = _mm256_set1_ps(8.f), x9 = _mm256_set1_ps(9.f), x10 = _mm256_set1_ps(10.f), x11 = _mm256_set1_ps(11.f);
    double t = now();
    for (long n = 0; n < iters; n++) {
        CHAINS(_mm256_fmadd_ps, x, b, c)
        __asm__ volatile("" : "+x"(x0), "+x"(x1), "+x"(x2), "+x"(x3), "+x"(x4), "+x"(x5),
                              "+x"(x6), "+x"(x7), "+x"(x8), "+x"(x9), "+x"(x10), "+x"(x11));
    }
    t = now() - t;
    __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(x0, x1), _mm256_add_ps(x2, x3)),
                             _mm256_add_ps(_mm256_add_ps(x4, x5), _mm256_add_ps(x6, x7)));
    s = _mm256_add_ps(s, _mm256_add_ps(_mm256_add_ps(x8, x9), _mm256_add_ps(x10, x11)));
    float out[8];
    _mm256_storeu_ps(out, s);
    sink = out[0];
    return (double)iters * N_ACC * 8 * 2 / t / 1e9;
}

__attribute__((target("avx512f"), noinline)) static double run_avx512(long iters) {
    __m512 b = _mm512_set1_ps(0.9999999f), c = _mm512_set1_ps(1e-7f);
    __m512 x0 = _mm512_set1_ps(0.f), x1 = _mm512_set1_ps(1.f), x2 = _mm512_set1_ps(2.f), x3 = _mm512_set1_ps(3.f),
           x4 = _mm512_set1_ps(4.f), x5 = _mm512_set1_ps(5.f), x6 = _mm512_set1_ps(6.f), x7 = _mm512_set1_ps(7.f),
           x8 = _mm512_set1_ps(8.f), x9 = _mm512_set1_ps(9.f), x10 = _mm512_set1_ps(10.f), x11 = _mm512_set1_ps(11.f);
    double t = now();
    for (long n = 0; n < iters; n++) {
        CHAINS(_mm512_fmadd_ps, x, b, c)
        __asm__ volatile("" : "+v"(x0), "+v"(x1), "+v"(x2), "+v"(x3), "+v"(x4), "+v"(x5),
                              "+v"(x6), "+v"(x7), "+v"(x8), "+v"(x9), "+v"(x10), "+v"(x11));
    }
    t = now() - t;
    __m512 s = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(x0, x1), _mm512_add_ps(x2, x3)),
                             _mm512_add_ps(_mm512_add_ps(x4, x5), _mm512_add_ps(x6, x7)));
    s = _mm512_add_ps(s, _mm512_add_ps(_mm512_add_ps(x8, x9), _mm512_add_ps(x10, x11)));
    sink = _mm512_reduce_add_ps(s);
    return (double)iters * N_ACC * 16 * 2 / t / 1e9;
}

static double best(double (*run)(long), double seconds) {
    /* Many short runs (~1 ms each, within one scheduler time slice) and the fastest of them: on a shared
     * machine a long run is always cut by other processes, a short one often is not. */
    long iters = 1000;
    while (1) {
        double t = now();
        run(iters);
        if (now() - t > 1e-3 || iters > (1L << 40)) break;
        iters *= 2;
    }
    double top = 0, start = now();
    for (int r = 0; r < 20 || now() - start < seconds; r++) {
        double g = run(iters);
        if (g > top) top = g;
    }
    return top;
}

int main(int argc, char **argv) {
    double seconds = argc > 1 ? atof(argv[1]) : 0.5;
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        printf("avx2 %.2f\n", best(run_avx2, seconds));
    if (__builtin_cpu_supports("avx512f"))
        printf("avx512 %.2f\n", best(run_avx512, seconds));
    return 0;
}
