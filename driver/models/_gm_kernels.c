/* Inference kernels of the Gaussian-moment descriptor: neighbour sums and rotation invariants, forward and
 * backward, in double precision.
 *
 * Why C: at the cluster sizes of this project (10-100 atoms) the PyTorch version of these two steps is a
 * few dozen small tensor operations whose fixed cost per operation, not the arithmetic, sets the time
 * (bench/model_speed.py). Here each step is one loop over pairs or atoms. The definitions are those of
 * driver/models/gaussian_moments.py (its module docstring has the feature table); the tests compare
 * both directions with PyTorch autograd in float64.
 *
 * Only the CPython C API and the buffer protocol are used (numpy arrays are passed as buffers), so the
 * module builds without numpy or torch headers. Every buffer must be C-contiguous: the Python wrapper
 * (driver/models/fast_kernels.py) makes sure of that and of the shapes.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define NM 20 /* symmetric moment components: 1 + 3 + 6 + 10 */

/* The hot loops get an AVX2/FMA clone next to the baseline one, picked at load time by the CPU that runs them
 * (GCC function multiversioning): a build stays portable across x86-64 machines. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && __GNUC__ >= 11
#define HOT __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define HOT
#endif

/* Monomial m = e[a] e[b] e[c] with e = (1, ux, uy, uz), in the order of MONOMIALS (gaussian_moments.py). */
static const int MONO[NM][3] = {
    {0, 0, 0},
    {0, 0, 1}, {0, 0, 2}, {0, 0, 3},
    {0, 1, 1}, {0, 1, 2}, {0, 1, 3}, {0, 2, 2}, {0, 2, 3}, {0, 3, 3},
    {1, 1, 1}, {1, 1, 2}, {1, 1, 3}, {1, 2, 2}, {1, 2, 3}, {1, 3, 3}, {2, 2, 2}, {2, 2, 3}, {2, 3, 3}, {3, 3, 3},
};
/* (-1)^order: the monomial of -u. */
static const double PARITY[NM] = {1, -1, -1, -1, 1, 1, 1, 1, 1, 1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1};

/* Symmetric component of the full Cartesian entries: S2[a][b] for rank 2, S3[a][b][c] for rank 3. */
static int S2[3][3], S3[3][3][3];

static void init_tables(void) {
    for (int m = 4; m < NM; m++) {
        const int *k = MONO[m];
        if (m < 10) {
            int a = k[1] - 1, b = k[2] - 1;
            S2[a][b] = S2[b][a] = m;
        } else {
            int p[3] = {k[0] - 1, k[1] - 1, k[2] - 1};
            int perm[6][3] = {{0, 1, 2}, {0, 2, 1}, {1, 0, 2}, {1, 2, 0}, {2, 0, 1}, {2, 1, 0}};
            for (int q = 0; q < 6; q++) S3[p[perm[q][0]]][p[perm[q][1]]][p[perm[q][2]]] = m;
        }
    }
}

static void monomials(const double u[3], double a[NM]) {
    const double e[4] = {1.0, u[0], u[1], u[2]};
    for (int m = 0; m < NM; m++) a[m] = e[MONO[m][0]] * e[MONO[m][1]] * e[MONO[m][2]];
}

/* da[m][x] = d a_m / d u_x. */
static void monomial_jacobian(const double u[3], double da[NM][3]) {
    const double e[4] = {1.0, u[0], u[1], u[2]};
    for (int m = 0; m < NM; m++) {
        const int *k = MONO[m];
        da[m][0] = da[m][1] = da[m][2] = 0.0;
        if (k[0]) da[m][k[0] - 1] += e[k[1]] * e[k[2]];
        if (k[1]) da[m][k[1] - 1] += e[k[0]] * e[k[2]];
        if (k[2]) da[m][k[2] - 1] += e[k[0]] * e[k[1]];
    }
}

typedef struct {
    int nb;
    const double *centres;
    double beta, cutoff;
} Basis;

/* radial_k = exp(-beta (d - mu_k)^2) f_c(d) and its derivative in d; f_c(d) = (cos(pi d / rc) + 1) / 2. */
static void radial(const Basis *bs, double d, double *rad, double *drad) {
    const double w = Py_MATH_PI / bs->cutoff;
    const double fc = 0.5 * (cos(d * w) + 1.0), dfc = -0.5 * w * sin(d * w);
    for (int k = 0; k < bs->nb; k++) {
        const double x = d - bs->centres[k], g = exp(-bs->beta * x * x);
        rad[k] = g * fc;
        if (drad) drad[k] = g * (dfc - 2.0 * bs->beta * x * fc);
    }
}

/* A pair i < j of real atoms of structure b closer than the cutoff: distance d (Å), unit vector u from i to j. */
typedef struct {
    int b, i, j;
    double d, u[3];
} Pair;

/* All such pairs (malloc'ed; NULL with *count = 0 when there are none or memory is short: see *ok). */
static Pair *pairs_within(const double *pos, const int64_t *species, int B, int N, double cutoff, size_t *count,
                          int *ok) {
    const size_t most = (size_t)B * N * (N > 1 ? N - 1 : 0) / 2;
    Pair *list = most ? malloc(sizeof(Pair) * most) : NULL;
    *ok = !most || list != NULL;
    *count = 0;
    if (!list) return NULL;
    for (int b = 0; b < B; b++) {
        const double *r = pos + (size_t)b * N * 3;
        const int64_t *z = species + (size_t)b * N;
        for (int i = 0; i < N; i++) {
            if (z[i] < 0) continue;
            for (int j = i + 1; j < N; j++) {
                if (z[j] < 0) continue;
                double rij[3], d2 = 0.0;
                for (int x = 0; x < 3; x++) {
                    rij[x] = r[3 * j + x] - r[3 * i + x];
                    d2 += rij[x] * rij[x];
                }
                const double d = sqrt(d2);
                if (!(d < cutoff && d > 0.0)) continue;
                Pair *p = list + (*count)++;
                *p = (Pair){b, i, j, d, {rij[0] / d, rij[1] / d, rij[2] / d}};
            }
        }
    }
    return list;
}

/* M[b, i, z*nb + k, m] = sum over j != i of species z of radial_k(d_ij) a_m(u_ij). */
HOT static int moments_forward(const double *pos, const int64_t *species, int B, int N, int S, const Basis *bs,
                           double *out) {
    const int nb = bs->nb, Q = S * nb;
    double rad[64], a[NM];
    size_t count;
    int ok;
    Pair *pairs = pairs_within(pos, species, B, N, bs->cutoff, &count, &ok);
    memset(out, 0, sizeof(double) * (size_t)B * N * Q * NM);
    for (size_t n = 0; n < count; n++) {
        const Pair *p = pairs + n;
        const int64_t *z = species + (size_t)p->b * N;
        radial(bs, p->d, rad, NULL);
        monomials(p->u, a);
        double *mi = out + (((size_t)p->b * N + p->i) * Q + z[p->j] * nb) * NM;  /* j seen from i: u */
        double *mj = out + (((size_t)p->b * N + p->j) * Q + z[p->i] * nb) * NM;  /* i seen from j: -u */
        for (int k = 0; k < nb; k++)
            for (int m = 0; m < NM; m++) {
                const double v = rad[k] * a[m];
                mi[k * NM + m] += v;
                mj[k * NM + m] += PARITY[m] * v;
            }
    }
    free(pairs);
    return ok;
}

/* gpos[r, b, i] = d L_r / d r_i for R cotangents grad[r] of M (R committee members sharing the sums). */
HOT static int moments_backward(const double *pos, const int64_t *species, int B, int N, int S, const Basis *bs,
                            int R, const double *grad, double *gpos) {
    const int nb = bs->nb, Q = S * nb;
    double rad[64], drad[64], a[NM], da[NM][3];
    size_t count;
    int ok;
    Pair *pairs = pairs_within(pos, species, B, N, bs->cutoff, &count, &ok);
    memset(gpos, 0, sizeof(double) * (size_t)R * B * N * 3);
    for (size_t n = 0; n < count; n++) {
        const Pair *p = pairs + n;
        const int64_t *z = species + (size_t)p->b * N;
        const double *u = p->u, d = p->d;
        radial(bs, d, rad, drad);
        monomials(u, a);
        monomial_jacobian(u, da);
        for (int rep = 0; rep < R; rep++) {
            const double *gb = grad + ((size_t)rep * B + p->b) * N * Q * NM;
            const double *gi = gb + ((size_t)p->i * Q + z[p->j] * nb) * NM;
            const double *gj = gb + ((size_t)p->j * Q + z[p->i] * nb) * NM;
            /* Both directions of the pair in one: L = sum_km H[k, m] radial_k a_m(u_ij). */
            double g_d = 0.0, g_a[NM] = {0};
            for (int k = 0; k < nb; k++) {
                double hk = 0.0;
                for (int m = 0; m < NM; m++) {
                    const double h = gi[k * NM + m] + PARITY[m] * gj[k * NM + m];
                    hk += h * a[m];
                    g_a[m] += h * rad[k];
                }
                g_d += hk * drad[k];
            }
            double g_u[3] = {0, 0, 0};
            for (int m = 1; m < NM; m++)
                for (int x = 0; x < 3; x++) g_u[x] += g_a[m] * da[m][x];
            const double radial_part = g_u[0] * u[0] + g_u[1] * u[1] + g_u[2] * u[2];
            double *gp = gpos + ((size_t)rep * B + p->b) * N * 3;
            for (int x = 0; x < 3; x++) {
                const double g = g_d * u[x] + (g_u[x] - radial_part * u[x]) / d;  /* dL/d(r_j - r_i) */
                gp[3 * p->j + x] += g;
                gp[3 * p->i + x] -= g;
            }
        }
    }
    free(pairs);
    return ok;
}

/* ------------------------------------------------------------------ invariants */

static int n_features(int n) {
    const int pairs = n * (n + 1) / 2;
    return n + 3 * pairs + n * (n + 1) * (n + 2) / 6 + 2 * pairs * n + n * n * n;
}

/* Full Cartesian moments of one atom, flat: p1[a], p2[3a + b], p3[9a + 3b + c]. */
typedef struct {
    double p1[3], p2[9], p3[27];
} Moments;

static void expand(const double *restrict psi, int n, Moments *restrict p) {
    for (int s = 0; s < n; s++) {
        const double *q = psi + s * NM;
        for (int a = 0; a < 3; a++) {
            p[s].p1[a] = q[1 + a];
            for (int b = 0; b < 3; b++) {
                p[s].p2[3 * a + b] = q[S2[a][b]];
                for (int c = 0; c < 3; c++) p[s].p3[9 * a + 3 * b + c] = q[S3[a][b][c]];
            }
        }
    }
}

/* The symmetric components' gradient is the sum over the full entries that copy them. */
static void fold(const Moments *restrict g, int n, double *restrict gpsi) {
    for (int s = 0; s < n; s++) {
        double *q = gpsi + s * NM;
        for (int a = 0; a < 3; a++) {
            q[1 + a] += g[s].p1[a];
            for (int b = 0; b < 3; b++) {
                q[S2[a][b]] += g[s].p2[3 * a + b];
                for (int c = 0; c < 3; c++) q[S3[a][b][c]] += g[s].p3[9 * a + 3 * b + c];
            }
        }
    }
}

static inline double dot3(const double *restrict x, const double *restrict y) {
    return x[0] * y[0] + x[1] * y[1] + x[2] * y[2];
}

static inline double dot(const double *restrict x, const double *restrict y, int len) {
    double acc = 0.0;
    for (int k = 0; k < len; k++) acc += x[k] * y[k];
    return acc;
}

/* y += a x; y and x never overlap (the callers pass a gradient and a moment, or two different moments).
 * "omp simd" (compiled with -fopenmp-simd: no OpenMP runtime) vectorises these short loops (3, 9, 27). */
static inline void axpy(double *restrict y, double a, const double *restrict x, int len) {
#pragma omp simd
    for (int k = 0; k < len; k++) y[k] += a * x[k];
}

/* Products shared by the triple contractions of one atom (n = n_radial), each n x n x (3 or 9):
 *   T[t, u, ab] = sum_cd P3_t[acd] P3_u[bcd]  (t <= u)     W[t, u, a] = sum_bc P2_t[bc] P3_u[abc]
 *   A[s, t, ac] = sum_b P2_s[ab] P2_t[bc]                   V[u, t, a] = sum_b P2_u[ab] P1_t[b]        */
typedef struct {
    double *T, *W, *A, *V, *GT, *GW;
} Scratch;

static int scratch_alloc(Scratch *w, int n) {
    const int nn = n * n;
    double *mem = malloc(sizeof(double) * nn * 36);
    *w = (Scratch){mem, mem + 9 * nn, mem + 12 * nn, mem + 21 * nn, mem + 24 * nn, mem + 33 * nn};
    return mem != NULL;
}

HOT static void intermediates(const Moments *restrict p, int n, const Scratch *w) {
    for (int t = 0; t < n; t++)
        for (int u = 0; u < n; u++) {
            const double *p2t = p[t].p2, *p3u = p[u].p3, *p2u = p[u].p2;
            double *W = w->W + (t * n + u) * 3, *A = w->A + (t * n + u) * 9, *V = w->V + (u * n + t) * 3;
            for (int a = 0; a < 3; a++) {
                W[a] = dot(p2t, p3u + 9 * a, 9);
                V[a] = dot3(p2u + 3 * a, p[t].p1);
                for (int c = 0; c < 3; c++)
                    A[3 * a + c] = p2t[3 * a] * p2u[c] + p2t[3 * a + 1] * p2u[3 + c] + p2t[3 * a + 2] * p2u[6 + c];
            }
            if (u < t) continue;
            double *T = w->T + (t * n + u) * 9;
            for (int a = 0; a < 3; a++)
                for (int b = 0; b < 3; b++) T[3 * a + b] = dot(p[t].p3 + 9 * a, p[u].p3 + 9 * b, 9);
        }
}

/* Features of one atom in the order of the table in gaussian_moments.py. */
HOT static void invariants_atom(const double *restrict psi, int n, Moments *restrict p, const Scratch *w,
                            double *restrict f) {
    expand(psi, n, p);
    intermediates(p, n, w);
    int k = 0;
    for (int s = 0; s < n; s++) f[k++] = psi[s * NM];
    for (int s = 0; s < n; s++)
        for (int t = s; t < n; t++) f[k++] = dot3(p[s].p1, p[t].p1);
    for (int s = 0; s < n; s++)
        for (int t = s; t < n; t++) f[k++] = dot(p[s].p2, p[t].p2, 9);
    for (int s = 0; s < n; s++)
        for (int t = s; t < n; t++) f[k++] = dot(p[s].p3, p[t].p3, 27);
    for (int s = 0; s < n; s++)                                   /* 222, s <= t <= u: tr(P2_s P2_t P2_u) */
        for (int t = s; t < n; t++)
            for (int u = t; u < n; u++) f[k++] = dot(w->A + (s * n + t) * 9, p[u].p2, 9);  /* P2_u symmetric */
    for (int s = 0; s < n; s++)                                   /* 112, s <= t, all u: P1_s . P2_u P1_t */
        for (int t = s; t < n; t++)
            for (int u = 0; u < n; u++) f[k++] = dot3(p[s].p1, w->V + (u * n + t) * 3);
    for (int s = 0; s < n; s++)                                   /* 233, all s, t <= u: P2_s : T_tu */
        for (int t = 0; t < n; t++)
            for (int u = t; u < n; u++) f[k++] = dot(p[s].p2, w->T + (t * n + u) * 9, 9);
    for (int s = 0; s < n; s++)                                   /* 123, all s, t, u: P1_s . W_tu */
        for (int t = 0; t < n; t++)
            for (int u = 0; u < n; u++) f[k++] = dot3(p[s].p1, w->W + (t * n + u) * 3);
}

/* Adds to gpsi (n, 20) the gradient of sum_k gf[k] f[k] for one atom. The moments are symmetric in value,
 * so A[s, t]^T = A[t, s] and P2_u^T P1 = P2_u P1 = V, which the derivatives below use. */
HOT static void invariants_atom_backward(const double *restrict psi, const double *restrict gf, int n,
                                     Moments *restrict p, Moments *restrict g, const Scratch *w,
                                     double *restrict gpsi) {
    expand(psi, n, p);
    intermediates(p, n, w);
    memset(g, 0, sizeof(Moments) * n);
    memset(w->GT, 0, sizeof(double) * n * n * 9);
    memset(w->GW, 0, sizeof(double) * n * n * 3);
    int k = 0;
    for (int s = 0; s < n; s++) gpsi[s * NM] += gf[k++];
    for (int s = 0; s < n; s++)
        for (int t = s; t < n; t++, k++) {
            axpy(g[s].p1, gf[k], p[t].p1, 3);
            axpy(g[t].p1, gf[k], p[s].p1, 3);
        }
    for (int s = 0; s < n; s++)
        for (int t = s; t < n; t++, k++) {
            axpy(g[s].p2, gf[k], p[t].p2, 9);
            axpy(g[t].p2, gf[k], p[s].p2, 9);
        }
    for (int s = 0; s < n; s++)
        for (int t = s; t < n; t++, k++) {
            axpy(g[s].p3, gf[k], p[t].p3, 27);
            axpy(g[t].p3, gf[k], p[s].p3, 27);
        }
    for (int s = 0; s < n; s++)         /* d tr(P_s P_t P_u) / dP_s[ab] = (P_t P_u)[ba] = A[u, t][ab], etc. */
        for (int t = s; t < n; t++)
            for (int u = t; u < n; u++, k++) {
                axpy(g[s].p2, gf[k], w->A + (u * n + t) * 9, 9);
                axpy(g[t].p2, gf[k], w->A + (s * n + u) * 9, 9);
                axpy(g[u].p2, gf[k], w->A + (t * n + s) * 9, 9);
            }
    for (int s = 0; s < n; s++)         /* P1_s . P2_u P1_t */
        for (int t = s; t < n; t++)
            for (int u = 0; u < n; u++, k++) {
                axpy(g[s].p1, gf[k], w->V + (u * n + t) * 3, 3);
                axpy(g[t].p1, gf[k], w->V + (u * n + s) * 3, 3);
                for (int a = 0; a < 3; a++) axpy(g[u].p2 + 3 * a, gf[k] * p[s].p1[a], p[t].p1, 3);
            }
    for (int s = 0; s < n; s++)         /* P2_s : T_tu */
        for (int t = 0; t < n; t++)
            for (int u = t; u < n; u++, k++) {
                axpy(g[s].p2, gf[k], w->T + (t * n + u) * 9, 9);
                axpy(w->GT + (t * n + u) * 9, gf[k], p[s].p2, 9);
            }
    for (int s = 0; s < n; s++)         /* P1_s . W_tu */
        for (int t = 0; t < n; t++)
            for (int u = 0; u < n; u++, k++) {
                axpy(g[s].p1, gf[k], w->W + (t * n + u) * 3, 3);
                axpy(w->GW + (t * n + u) * 3, gf[k], p[s].p1, 3);
            }
    for (int t = 0; t < n; t++)
        for (int u = 0; u < n; u++) {
            const double *gw = w->GW + (t * n + u) * 3;
            for (int a = 0; a < 3; a++) {
                axpy(g[t].p2, gw[a], p[u].p3 + 9 * a, 9);
                axpy(g[u].p3 + 9 * a, gw[a], p[t].p2, 9);
            }
            if (u < t) continue;
            const double *gt = w->GT + (t * n + u) * 9;
            for (int a = 0; a < 3; a++)
                for (int b = 0; b < 3; b++) {
                    axpy(g[t].p3 + 9 * a, gt[3 * a + b], p[u].p3 + 9 * b, 9);
                    axpy(g[u].p3 + 9 * b, gt[3 * a + b], p[t].p3 + 9 * a, 9);
                }
        }
    fold(g, n, gpsi);
}

/* ------------------------------------------------------------------ the whole descriptor */

/* psi[s, m] = sum_q c[q, s] M[q, m]: one member's radial contraction for one atom. */
HOT static void contract(const double *restrict c, const double *restrict M, int Q, int n, double *restrict psi) {
    for (int s = 0; s < n; s++) {
        double acc[NM] = {0};
        for (int q = 0; q < Q; q++) {
            const double cq = c[q * n + s];
            for (int x = 0; x < NM; x++) acc[x] += cq * M[q * NM + x];
        }
        memcpy(psi + s * NM, acc, sizeof acc);
    }
}

/* gM[q, m] += sum_s c[q, s] gpsi[s, m]. */
HOT static void contract_backward(const double *restrict c, const double *restrict gpsi, int Q, int n,
                              double *restrict gM) {
    for (int q = 0; q < Q; q++) {
        double acc[NM] = {0};
        for (int s = 0; s < n; s++) {
            const double cs = c[q * n + s];
            for (int x = 0; x < NM; x++) acc[x] += cs * gpsi[s * NM + x];
        }
        for (int x = 0; x < NM; x++) gM[q * NM + x] += acc[x];
    }
}

/* Features of K members, positions -> (K, B, N, F); psi (K, B, N, n, 20) is kept for the backward.
 * coeff (K, S, Q, n): c[k, Z_i, (z, k'), s], already divided by sqrt(n_basis). */
static int features_forward(const double *pos, const int64_t *species, int B, int N, int S, const Basis *bs,
                            const double *coeff, int K, int n, double *feats, double *psi) {
    const int Q = S * bs->nb, F = n_features(n);
    double *M = malloc(sizeof(double) * (size_t)B * N * Q * NM);
    Moments *p = malloc(sizeof(Moments) * n);
    Scratch w;
    const int ok = scratch_alloc(&w, n) && M && p && moments_forward(pos, species, B, N, S, bs, M);
    for (int k = 0; ok && k < K; k++)
        for (int a = 0; a < B * N; a++) {
            double *ps = psi + ((size_t)k * B * N + a) * n * NM;
            const int64_t z = species[a];
            if (z >= 0)
                contract(coeff + ((size_t)k * S + z) * Q * n, M + (size_t)a * Q * NM, Q, n, ps);
            else
                memset(ps, 0, sizeof(double) * n * NM);
            invariants_atom(ps, n, p, &w, feats + ((size_t)k * B * N + a) * F);
        }
    free(M), free(p), free(w.T);
    return ok;
}

/* gpos (R, B, N, 3) from the features' cotangent gF (K, B, N, F): R = K gives every member its own position
 * gradient (member k's features depend on replica k), R = 1 the gradient of the sum over members. */
static int features_backward(const double *pos, const int64_t *species, int B, int N, int S, const Basis *bs,
                             const double *coeff, int K, int n, const double *psi, const double *gF, int R,
                             double *gpos) {
    const int Q = S * bs->nb, F = n_features(n);
    double *gM = calloc((size_t)R * B * N * Q * NM, sizeof(double));
    double *gpsi = malloc(sizeof(double) * n * NM);
    Moments *p = malloc(sizeof(Moments) * 2 * n);
    Scratch w;
    if (!scratch_alloc(&w, n) || !gM || !gpsi || !p) {
        free(gM), free(gpsi), free(p), free(w.T);
        return 0;
    }
    for (int k = 0; k < K; k++)
        for (int a = 0; a < B * N; a++) {
            const int64_t z = species[a];
            if (z < 0) continue;
            const size_t ka = (size_t)k * B * N + a;
            memset(gpsi, 0, sizeof(double) * n * NM);
            invariants_atom_backward(psi + ka * n * NM, gF + ka * F, n, p, p + n, &w, gpsi);
            const double *c = coeff + ((size_t)k * S + z) * Q * n;
            contract_backward(c, gpsi, Q, n, gM + ((size_t)(R == K ? k : 0) * B * N + a) * Q * NM);
        }
    const int ok = moments_backward(pos, species, B, N, S, bs, R, gM, gpos);
    free(gM), free(gpsi), free(p), free(w.T);
    return ok;
}

/* ------------------------------------------------------------------ Python bindings */

/* None, or the MemoryError of a kernel that could not allocate its scratch. */
static PyObject *done(int ok) {
    if (!ok) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static int check(Py_buffer *buf, Py_ssize_t items, size_t item, const char *name) {
    if (buf->len != items * (Py_ssize_t)item) {
        PyErr_Format(PyExc_ValueError, "_gm_kernels: %s has %zd bytes, expected %zd", name, buf->len,
                     items * (Py_ssize_t)item);
        return 0;
    }
    return 1;
}

/* invariants(psi, M, n, out) and invariants_backward(psi, grad, M, n, out) */
static PyObject *py_invariants(PyObject *self, PyObject *args, int backward) {
    Py_buffer psi, grad = {0}, out;
    int M, n;
    if (!(backward ? PyArg_ParseTuple(args, "y*y*iiw*", &psi, &grad, &M, &n, &out)
                   : PyArg_ParseTuple(args, "y*iiw*", &psi, &M, &n, &out)))
        return NULL;
    const int F = n_features(n);
    PyObject *ret = NULL;
    if (check(&psi, (Py_ssize_t)M * n * NM, sizeof(double), "psi") &&
        (!backward || check(&grad, (Py_ssize_t)M * F, sizeof(double), "grad")) &&
        check(&out, (Py_ssize_t)M * (backward ? n * NM : F), sizeof(double), "out")) {
        Moments *p = malloc(sizeof(Moments) * 2 * n);
        Scratch w;
        const int ok = scratch_alloc(&w, n) && p;
        if (ok) {
            const double *x = psi.buf;
            double *y = out.buf;
            Py_BEGIN_ALLOW_THREADS
            if (backward) {
                memset(y, 0, sizeof(double) * (size_t)M * n * NM);
                for (int i = 0; i < M; i++)
                    invariants_atom_backward(x + (size_t)i * n * NM, (const double *)grad.buf + (size_t)i * F, n,
                                             p, p + n, &w, y + (size_t)i * n * NM);
            } else {
                for (int i = 0; i < M; i++) invariants_atom(x + (size_t)i * n * NM, n, p, &w, y + (size_t)i * F);
            }
            Py_END_ALLOW_THREADS
        }
        ret = done(ok);
        free(p), free(w.T);
    }
    PyBuffer_Release(&psi), PyBuffer_Release(&out);
    if (backward) PyBuffer_Release(&grad);
    return ret;
}

static PyObject *py_invariants_forward(PyObject *self, PyObject *args) { return py_invariants(self, args, 0); }
static PyObject *py_invariants_backward(PyObject *self, PyObject *args) { return py_invariants(self, args, 1); }

/* The arguments both descriptor calls share; sets *nb, the number of radial basis functions. */
static int check_geometry(Py_buffer *pos, Py_buffer *species, Py_buffer *centres, Py_buffer *coeff, int B, int N,
                          int S, int K, int n, int *nb) {
    *nb = (int)(centres->len / sizeof(double));
    if (*nb > 64 || n < 1 || n > 64) {
        PyErr_SetString(PyExc_ValueError, "_gm_kernels: at most 64 radial basis and radial functions");
        return 0;
    }
    const Py_ssize_t atoms = (Py_ssize_t)B * N;
    return check(pos, atoms * 3, sizeof(double), "pos") && check(species, atoms, sizeof(int64_t), "species") &&
           check(coeff, (Py_ssize_t)K * S * S * *nb * n, sizeof(double), "coeff");
}

/* features(pos, species, B, N, S, centres, beta, cutoff, coeff, K, n, out_feats, out_psi) */
static PyObject *py_features(PyObject *self, PyObject *args) {
    Py_buffer pos, species, centres, coeff, feats, psi;
    int B, N, S, K, n;
    double beta, cutoff;
    if (!PyArg_ParseTuple(args, "y*y*iiiy*ddy*iiw*w*", &pos, &species, &B, &N, &S, &centres, &beta, &cutoff,
                          &coeff, &K, &n, &feats, &psi))
        return NULL;
    int nb;
    const Py_ssize_t atoms = (Py_ssize_t)B * N;
    PyObject *ret = NULL;
    if (check_geometry(&pos, &species, &centres, &coeff, B, N, S, K, n, &nb) &&
        check(&feats, K * atoms * n_features(n), sizeof(double), "feats") &&
        check(&psi, K * atoms * n * NM, sizeof(double), "psi")) {
        Basis bs = {nb, centres.buf, beta, cutoff};
        int ok;
        Py_BEGIN_ALLOW_THREADS
        ok = features_forward(pos.buf, species.buf, B, N, S, &bs, coeff.buf, K, n, feats.buf, psi.buf);
        Py_END_ALLOW_THREADS
        ret = done(ok);
    }
    PyBuffer_Release(&pos), PyBuffer_Release(&species), PyBuffer_Release(&centres);
    PyBuffer_Release(&coeff), PyBuffer_Release(&feats), PyBuffer_Release(&psi);
    return ret;
}

/* features_backward(pos, species, B, N, S, centres, beta, cutoff, coeff, K, n, psi, grad, R, out_gpos) */
static PyObject *py_features_backward(PyObject *self, PyObject *args) {
    Py_buffer pos, species, centres, coeff, psi, grad, out;
    int B, N, S, K, n, R;
    double beta, cutoff;
    if (!PyArg_ParseTuple(args, "y*y*iiiy*ddy*iiy*y*iw*", &pos, &species, &B, &N, &S, &centres, &beta, &cutoff,
                          &coeff, &K, &n, &psi, &grad, &R, &out))
        return NULL;
    int nb;
    const Py_ssize_t atoms = (Py_ssize_t)B * N;
    PyObject *ret = NULL;
    if (R != 1 && R != K) {
        PyErr_SetString(PyExc_ValueError, "_gm_kernels: R must be 1 or K");
    } else if (check_geometry(&pos, &species, &centres, &coeff, B, N, S, K, n, &nb) &&
               check(&psi, K * atoms * n * NM, sizeof(double), "psi") &&
               check(&grad, K * atoms * n_features(n), sizeof(double), "grad") &&
               check(&out, R * atoms * 3, sizeof(double), "out")) {
        Basis bs = {nb, centres.buf, beta, cutoff};
        int ok;
        Py_BEGIN_ALLOW_THREADS
        ok = features_backward(pos.buf, species.buf, B, N, S, &bs, coeff.buf, K, n, psi.buf, grad.buf, R,
                               out.buf);
        Py_END_ALLOW_THREADS
        ret = done(ok);
    }
    PyBuffer_Release(&pos), PyBuffer_Release(&species), PyBuffer_Release(&centres), PyBuffer_Release(&coeff);
    PyBuffer_Release(&psi), PyBuffer_Release(&grad), PyBuffer_Release(&out);
    return ret;
}

static PyMethodDef methods[] = {
    {"features", py_features, METH_VARARGS, "Descriptor of K members from positions (float64 buffers)."},
    {"features_backward", py_features_backward, METH_VARARGS, "Position gradients of the descriptor."},
    {"invariants", py_invariants_forward, METH_VARARGS, "Rotation invariants of psi[M, n, 20]."},
    {"invariants_backward", py_invariants_backward, METH_VARARGS, "Gradient of the invariants wrt psi."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_gm_kernels", NULL, -1, methods};

PyMODINIT_FUNC PyInit__gm_kernels(void) {
    init_tables();
    return PyModule_Create(&module);
}
