/* CPU row kernel of the torch path: tempered softmax + per-row KL + gradient in three sweeps per row.
 *
 * For row r, with s = student logits already divided by T and u = t / T:
 *   p = softmax(u), q = softmax(s), loss[r] = T^2 * sum_c p_c (log p_c - log q_c), grad[r] = q - p.
 * Sweep 1 finds both row maxima; sweep 2 stores exp(s - max_s) and exp(u - max_u) into two row
 * scratches, then sums them and a = sum exp(u - m_u) * ((u - m_u) - (s - m_s)); sweep 3
 * normalises: grad = e_s / d_s - e_u / d_u. KL = a / d_u + log(d_s / d_u). Two exponentials per
 * element, each row hot in L1/L2 for all three sweeps (torch ops need ~16 sweeps over the chunk).
 * With a teacher gradient wanted, h = p * ((log p - log q) - KL) per row, formed around the teacher's
 * most probable class j: e_c = (u_c - u_j) - (s_c - s_j), h_c = p_c * (e_c - sum_k p_k e_k), so no
 * two numbers as large as the logits cancel (one more sweep, only then).
 * A teacher logit of -inf masks its class (p = 0, adds nothing). Built without -ffast-math so that
 * infinities keep their meaning; the loops are written in LANES-wide blocks so that gcc vectorises
 * the reductions without reassociation flags.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define LANES 16
_Static_assert(LANES == 16, "row_total's tree is written for 16 lanes");

/* Row sums, SUM_ROW(n, TERM, FLUSH): TERM(k, j) adds class k's terms into float lane j, in LANES-wide steps that
 * gcc vectorises without reassociating, and FLUSH adds the float lanes into double ones and zeroes them
 * (lanes_flush) after every SUM_BLOCK classes and after the last whole step; the last classes then go one more
 * term into each of the first float lanes, and row_total adds both sets of lanes up. A float lane chained over a
 * whole row drops every term under half an ulp of its running sum: over 32000 classes of spread logits the
 * normalisers came out 5e-7 low, a bias (torch's own softmax has it too) that the entropies and the KL then
 * carried at 2x to 4x eager's error. Here a float lane holds at most SUM_BLOCK / LANES terms. The steps' count
 * is computed before each block's loop: a flush tested inside the loop, or a block loop of fixed count beside
 * a second loop for the rest of the row, cost up to 25% (gcc then vectorised the loops less well). */
#define SUM_BLOCK 256
#define SUM_ROW(n, TERM, FLUSH)                                         \
    do {                                                                \
        int64_t c_ = 0;                                                 \
        while (c_ + LANES <= (n)) {                                     \
            const int64_t left_ = ((n) - c_) / LANES;                   \
            const int64_t steps_ = left_ < SUM_BLOCK / LANES ? left_ : SUM_BLOCK / LANES; \
            for (int64_t b_ = 0; b_ < steps_; ++b_, c_ += LANES)        \
                for (int j_ = 0; j_ < LANES; ++j_) TERM(c_ + j_, j_);   \
            FLUSH;                                                      \
        }                                                               \
        for (int j_ = 0; c_ + j_ < (n); ++j_) TERM(c_ + j_, j_);        \
    } while (0)

/* The KL's sum a = sum e_u * diff goes into its float lanes scaled by LANE_SCALE: a lane holds at most 16 terms
 * (SUM_BLOCK / LANES, or a short row's n < SHORT_ROW; kl_short_rows sums rows of more classes in double), each at
 * most the largest difference (e_u <= 1), so their sum cannot overflow where the row's mean a / d_u does not: a
 * student at torch.finfo's min on classes the teacher keeps makes differences near 3.4e38, and 17 of them in one
 * lane read inf where eager's loss is a finite 1e37. Exact (a power of two); a term under 16 times the smallest
 * normal float turns subnormal instead (it adds nothing a double sum of normal terms keeps). Row sums come back in
 * plain units (times LANE_UNIT, in double). */
#define LANE_SCALE 0.0625f
#define LANE_UNIT 16.0
_Static_assert(SUM_BLOCK / LANES == 16, "LANE_SCALE is 1 / (terms per float lane)");
/* Between tiles (hydra_kl_tile_stats) `a` is held as float in A_SCALE units, 2^-24, as the torch ops' class-tiled
 * statistics are (fasthydra/ops/hydra_kl.py): a double sum of up to 2^24 classes fits it. */
#define A_SCALE 5.9604644775390625e-08
#define A_UNIT 16777216.0

/* float and double lanes set to 0 */
static inline void lanes_clear(float *lane, double *blocks) {
    for (int j = 0; j < LANES; ++j) {
        lane[j] = 0.0f;
        blocks[j] = 0.0;
    }
}

/* float lanes added into double lanes, then zeroed */
static inline void lanes_flush(double *to, float *from) {
    for (int j = 0; j < LANES; ++j) {
        to[j] += from[j];
        from[j] = 0.0f;
    }
}

/* A row's sum after SUM_ROW: its double lanes and its float lanes (the last classes), added in double as a tree
 * (four dependent additions, not sixteen: rows of tens of classes feel them) */
static inline double row_total(const double *blocks, const float *lane) {
    double t[LANES];
    for (int j = 0; j < LANES; ++j) t[j] = lane[j];
    for (int j = 0; j < LANES; ++j) t[j] += blocks[j];
    for (int j = 0; j < 8; ++j) t[j] += t[j + 8]; /* fixed widths: gcc unrolls these, not a loop over w */
    for (int j = 0; j < 4; ++j) t[j] += t[j + 4];
    for (int j = 0; j < 2; ++j) t[j] += t[j + 2];
    return t[0] + t[1];
}

/* LOADS: no loop here reads memory under a condition. gcc 12 if-converts `e > 0 ? e * x[c] : 0` (x read only
 * where e > 0) into masked vector loads, and for AVX2 (no AVX-512) it fed the second 8-lane half of a 16-lane
 * block the first half's mask: x read as 0 where the other half's class was masked, so every entropy with a
 * masked class came out wrong (tests/test_native.py caught it on an AVX2 host). Loading x before the select
 * is not enough (gcc sinks a load whose value only the selected arm uses into that arm): a product that may be
 * 0 * -inf is masked by kept(), an AND on its bits, which has no arm to sink into. tests/test_native.py
 * compiles this file for AVX2 and AVX-512 and finds no masked load. */

/* Threads. Every exported function takes rows [r0, r1) and `threads`; SPLIT_ROWS runs `call` (an expression in
 * lo, hi and part) once per part of that range. Built with OpenMP, the parts run on the OpenMP team of the
 * calling thread: loaded into a process whose torch uses the same runtime (native.py checks), that is torch's
 * own intra-op team, whose threads, still spinning after the torch op before, take the parts at once (a pool of
 * other threads would contend with them for the cores). threads <= 1 calls `call` directly without any OpenMP
 * call: the path of a forked child (whose team does not exist) and of the host's own thread pool, which hands
 * each of its threads a part. Scratch rows: part `part` uses scratch + part * ld_scratch. */
/* Each part runs with subnormals kept (IEEE_PART), whatever the calling thread's mode. torch 2.4's inductor links
 * its CPU kernels with -ffast-math, so gcc adds crtfastmath.o, whose constructor sets MXCSR's FTZ and DAZ in the
 * thread that loads a compiled kernel (set_fast_math in each .so). From then on that thread, and only that one,
 * flushed: the rows of the part on it lost subnormal teacher probabilities (vexp's band) while the parts on the
 * OpenMP team's other threads kept them (CI's torch 2.4 stage, after a torch.compile test: a Hinton target of -inf
 * on 8 rows of 12, finite on the other 4). The mode is cleared for the part and put back after it, so the caller's
 * own arithmetic stays as it chose. */
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#define FP_FLUSH_BITS 0x8040u /* MXCSR: FTZ (bit 15), DAZ (bit 6) */
typedef unsigned int fp_mode_t;
static inline fp_mode_t fp_mode_get(void) { return _mm_getcsr(); }
static inline void fp_mode_set(fp_mode_t m) { _mm_setcsr(m); }
#elif defined(__aarch64__)
#define FP_FLUSH_BITS (1ull << 24) /* FPCR: FZ */
typedef unsigned long long fp_mode_t;
static inline fp_mode_t fp_mode_get(void) {
    fp_mode_t m;
    __asm__ volatile("mrs %0, fpcr" : "=r"(m) : : "memory");
    return m;
}
static inline void fp_mode_set(fp_mode_t m) { __asm__ volatile("msr fpcr, %0" : : "r"(m) : "memory"); }
#else
#define FP_FLUSH_BITS 0u
typedef unsigned int fp_mode_t;
static inline fp_mode_t fp_mode_get(void) { return 0u; }
static inline void fp_mode_set(fp_mode_t m) { (void)m; }
#endif
/* (the empty asm with a memory clobber keeps the part's loads after the mode's change and its stores before the
 * restore: a mode change orders no arithmetic by itself) */
#define IEEE_PART(call)                                                          \
    do {                                                                         \
        const fp_mode_t mode_ = fp_mode_get();                                   \
        if (mode_ & FP_FLUSH_BITS) fp_mode_set(mode_ & ~(fp_mode_t)FP_FLUSH_BITS); \
        __asm__ volatile("" : : : "memory");                                     \
        call;                                                                    \
        __asm__ volatile("" : : : "memory");                                     \
        if (mode_ & FP_FLUSH_BITS) fp_mode_set(mode_);                           \
    } while (0)

#ifdef _OPENMP
#include <omp.h>
#define SPLIT_ROWS(call)                                                                             \
    do {                                                                                             \
        if (threads <= 1) {                                                                          \
            const int64_t lo = r0, hi = r1, part = 0;                                                \
            (void)part;                                                                              \
            IEEE_PART(call);                                                                         \
            break;                                                                                   \
        }                                                                                            \
        _Pragma("omp parallel num_threads(threads)") {                                               \
            const int64_t part = omp_get_thread_num(), parts = omp_get_num_threads(), span = r1 - r0; \
            const int64_t lo = r0 + span * part / parts, hi = r0 + span * (part + 1) / parts;        \
            (void)part;                                                                              \
            IEEE_PART(call);                                                                         \
        }                                                                                            \
    } while (0)
#else
#define SPLIT_ROWS(call)                                 \
    do {                                                 \
        const int64_t lo = r0, hi = r1, part = 0;        \
        (void)threads;                                   \
        (void)part;                                      \
        IEEE_PART(call);                                 \
    } while (0)
#endif

/* 1 where the library runs its parts on an OpenMP team, else 0 (the host splits rows over its own threads) */
int hydra_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* The OpenMP runtime this library is bound to, named by the address of one of its functions (NULL without
 * OpenMP): the host compares it with the one torch's libraries resolve. */
void *hydra_openmp_entry(void) {
#ifdef _OPENMP
    return (void *)&omp_get_num_threads;
#else
    return NULL;
#endif
}

/* Offset of row r of an (O, inner, C) view with strides (outer_stride, inner_stride, 1), rows walked in
 * row-major order: a (rows, heads, C) chunk in either memory order, with no copy. */
#define ROW(r, outer_stride, inner_stride, inner) \
    (((r) / (inner)) * (outer_stride) + ((r) % (inner)) * (inner_stride))

/* v where keep, else +0: selected by bits (an AND), not by a branch, so that every operand of v is loaded and
 * computed whatever keep is (see LOADS) */
static inline float kept(int keep, float v) {
    uint32_t bits;
    memcpy(&bits, &v, sizeof bits);
    bits &= (uint32_t)0 - (uint32_t)(keep != 0);
    memcpy(&v, &bits, sizeof v);
    return v;
}

/* exp for a vector lane: Cody-Waite range reduction + degree-6 polynomial (about 2 ulp), branch-free so that gcc
 * vectorises it. 2^n is applied as 2^floor(n/2) times 2^(n - floor(n/2)), each a normal float, so that results
 * below float32's smallest normal come out subnormal (down to exp(-103.3)), not 0, and exp(88.7) finite: a teacher
 * probability of 1e-40 is not nothing where the student lies at torch.finfo's min there (p times a difference of
 * 3.4e38 / T in the KL and the teacher's gradient: until the sixtieth session such a row lost that term, 0.9 of a
 * loss of 7.8 in a sweep case, where torch's exp, the Triton kernels and float64 keep it). 0 below -104, so
 * exp(-inf) = 0 exactly. */
static inline float vexp(float x) {
    const float lo = -104.0f, hi = 88.7f;
    float xc = x < lo ? lo : (x > hi ? hi : x);
    float n = floorf(xc * 1.44269504088896341f + 0.5f);
    float r = xc - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    /* n in [-150, 128]: n1 = floor(n / 2) (an arithmetic shift, as gcc and clang define >> on negative ints)
     * and n - n1 in [-75, 64]; a floorf of n / 2 instead took 8% more time a call (AVX-512, gcc 12) */
    int32_t ni = (int32_t)n, n1 = ni >> 1;
    int32_t bits1 = (n1 + 127) << 23, bits2 = (ni - n1 + 127) << 23;
    float scale1, scale2;
    memcpy(&scale1, &bits1, sizeof scale1);
    memcpy(&scale2, &bits2, sizeof scale2);
    float y = (p * scale1) * scale2;
    return x < lo ? 0.0f : y;
}

#if defined(__AVX__)
#include <immintrin.h>
/* max_c x[c]; explicit AVX because gcc keeps a lane array for this reduction in memory. */
static float row_max(const float *x, int64_t n) {
    __m256 m0 = _mm256_set1_ps(-INFINITY), m1 = m0;
    int64_t c = 0;
    for (; c + 16 <= n; c += 16) {
        m0 = _mm256_max_ps(m0, _mm256_loadu_ps(x + c));
        m1 = _mm256_max_ps(m1, _mm256_loadu_ps(x + c + 8));
    }
    float lanes[8], out = -INFINITY;
    _mm256_storeu_ps(lanes, _mm256_max_ps(m0, m1));
    for (int j = 0; j < 8; ++j) out = lanes[j] > out ? lanes[j] : out;
    for (; c < n; ++c) {
        float v = x[c];
        out = v > out ? v : out;
    }
    return out;
}
#else
static float row_max(const float *x, int64_t n) {
    float m[LANES];
    for (int j = 0; j < LANES; ++j) m[j] = -INFINITY;
    int64_t c = 0;
    for (; c + LANES <= n; c += LANES)
        for (int j = 0; j < LANES; ++j) {
            float v = x[c + j];
            m[j] = v > m[j] ? v : m[j];
        }
    float out = -INFINITY;
    for (int j = 0; j < LANES; ++j) out = m[j] > out ? m[j] : out;
    for (; c < n; ++c) {
        float v = x[c];
        out = v > out ? v : out;
    }
    return out;
}
#endif

/* One row. The student is x * mult (x raw logits and mult = 1 / T, or x already tempered and mult = 1: exact).
 * e_s and e_u are scratch rows for the two exponentials; g = (q - p) * g_mult is written in the last sweep only,
 * after every read of x, so it may be x itself (a chunk the caller consumes); h (the teacher's gradient) is
 * scaled by h_scale. The KL's differences are taken in x's units, (t - max t) * tm - (x - max x) with
 * tm = 1 / (T mult) (1 for a raw student), and scaled by mult only in the row's mean, in double: divided by T
 * first, a raw student at torch.finfo's min at a class the teacher keeps overflows at T < 1, though the loss
 * row, T^2 times the KL, fits float32. Both sides are shifted before they are scaled, (x - max x) * mult and
 * (t - max t) / T: exactly 0 at the maximum whether or not the compiler contracts a product and a difference
 * into one FMA (gcc does under -march=native on FMA hosts: x * mult - max(x * mult) then keeps the product's
 * rounding, and a one-class row, whose KL and gradients are 0, came out at 1e-7 on those hosts only), and no
 * more rounding than the difference's own where x lies near the maximum. */
static void kl_row(const float *x, float mult, const float *t, float *g, float g_mult, float *e_s, float *e_u,
                   float *h, float h_scale, int64_t n, float inv_t, float t2, float *loss, int want_grad) {
    float m_x = row_max(x, n);
    float m_t = row_max(t, n);
    float ref_t = isinf(m_t) ? 0.0f : m_t; /* only an all-masked row, which the host rejects */
    const float tm = inv_t / mult, h_mult = h_scale * mult; /* the teacher's shift in x's units; h's scale */
    /* sweep 2a: the exponentials, a pure elementwise map */
    for (int64_t c = 0; c < n; ++c) {
        e_s[c] = vexp((x[c] - m_x) * mult);
        e_u[c] = vexp((t[c] - ref_t) * inv_t);
    }
    /* sweep 2b: the sums (SUM_ROW); the lanes then summed in double: in float that chain kept a few ulps of
     * rounding, which log(d_s / d_u) passes on to a KL of 1e-2 as 2e-5 of its value (a random sweep case at
     * T = 5, C = 40: 2.6x eager's error) */
    float ds[LANES], du[LANES], a[LANES];
    double ds_d[LANES], du_d[LANES], a_d[LANES];
    lanes_clear(ds, ds_d);
    lanes_clear(du, du_d);
    lanes_clear(a, a_d);
#define KL_TERMS(k, j)                                                                  \
    do {                                                                                \
        float eu = e_u[k];                                                              \
        float diff = (t[k] - ref_t) * tm - (x[k] - m_x);                                \
        ds[j] += e_s[k];                                                                \
        du[j] += eu;                                                                    \
        a[j] += kept(eu > 0.0f, eu * diff * LANE_SCALE); /* a masked class: 0 * -inf reads as 0 */ \
    } while (0)
    SUM_ROW(n, KL_TERMS, (lanes_flush(ds_d, ds), lanes_flush(du_d, du), lanes_flush(a_d, a)));
#undef KL_TERMS
    const double d_s = row_total(ds_d, ds), d_u = row_total(du_d, du), acc = row_total(a_d, a) * LANE_UNIT;
    /* one logarithm per row (two were most of a row's time at C = 10), and log(d_s / d_u) does not
     * cancel where the student matches the teacher, as log d_s - log d_u does */
    *loss = (float)(t2 * (mult * (acc / d_u) + log(d_s / d_u))); /* T^2 KL in double: the KL may not fit */
    float inv_ds = (float)(1.0 / d_s), inv_du = (float)(1.0 / d_u);
    if (h != NULL) { /* the teacher's gradient (unscaled), pivoted at j = the first class with t = max t */
        int64_t j = 0;
        while (j < n - 1 && !(t[j] == m_t)) ++j;
        float x_j = x[j];
        double me_d[LANES];
        lanes_clear(a, me_d);
#define MEAN_TERMS(k, l) a[l] += kept(e_u[k] > 0.0f, e_u[k] * inv_du * ((t[k] - ref_t) * tm - (x[k] - x_j)))
        SUM_ROW(n, MEAN_TERMS, lanes_flush(me_d, a));
#undef MEAN_TERMS
        const float mean_e = (float)row_total(me_d, a);
        for (int64_t c = 0; c < n; ++c) {
            float diff = (t[c] - ref_t) * tm - (x[c] - x_j);
            h[c] = kept(e_u[c] > 0.0f, e_u[c] * inv_du * (diff - mean_e)) * h_mult;
        }
    }
    if (!want_grad) return;
    for (int64_t c = 0; c < n; ++c) g[c] = (e_s[c] * inv_ds - e_u[c] * inv_du) * g_mult;
}

/* Rows shorter than a vector (C < SIDE_ROW, e.g. 10 classes): a row's own loops never fill a vector. Here
 * SHORT_BLOCK rows at a time are turned on their side: class c of row i goes to column i of line c of a block,
 * so that every sweep (maxima, exponentials, sums, loss, q - p) runs along the lines with one row per vector
 * lane; the rows are copied in and q - p (and the teacher's gradient) copied out. Per row the same formulas as
 * kl_row, each sum taken in class order. Row offsets are stepped (no division per row). The loss (with the
 * teacher's gradient too), the mixture and uncertainty take rows under SIDE_ROW classes so, uncertainty's
 * gradient under GRAD_SIDE_ROW: the row-at-a-time kernels have a fixed cost of about 60 ns a row, so 16 to 20
 * classes cost kl_row 4.8 ns a class where 15 classes on their side cost 1.9 (uncertainty 2.6 to 3.0 against
 * 1.2). A row's sums are float chains under SHORT_ROW classes (at most 15 terms: the lane scale holds) and double
 * from there on (a float chain over 40 classes gave 2.6x eager's error in the loss; summed in double, 10-class
 * rows took 25% longer). */
#define SHORT_ROW 16
/* with the teacher's gradient, per element on their side against kl_row: AVX-512 3.5 to 3.8 ns against 3.5 to
 * 4.1 at 32 to 47 classes (kl_row ahead only at 40), AVX2 3.9 to 4.1 against 4.5 to 5.7; at 10 classes 3.6
 * against 9.1 (bench/RESULTS.md, forty-seventh session) */
#define SIDE_ROW 48
#define SHORT_BLOCK 64

/* LANES: every loop over a block's lanes runs over all SHORT_BLOCK of them (a constant the vector width divides),
 * the block's last lanes padded with zeros where it holds fewer rows; only the copies in and out stop at `rows`.
 * Then each lane is computed by the same instructions whatever its place. A loop over `rows` left a block's last
 * lanes to the loop's scalar tail, which gcc contracts into FMAs otherwise than its vector body (a * b - c * d):
 * on NEON a row's q - p changed in its last bit with the way rows were split over threads (its lane and the
 * block's row count depend on the split). -ffp-contract=off fixed that too but cost 10 to 30% everywhere. */
static inline void pad_lanes(float *x, int64_t n, int64_t rows) {
    for (int64_t c = 0; c < n; ++c)
        for (int64_t i = rows; i < SHORT_BLOCK; ++i) x[c * SHORT_BLOCK + i] = 0.0f;
}

static inline __attribute__((always_inline)) void
kl_short_rows_body(const float *s, int64_t so, int64_t si, float mult, const float *t, int64_t to, int64_t ti,
                   int64_t inner, float *grad, int64_t go, int64_t gi, float g_mult, float *tgrad, float h_scale,
                   int64_t ld_h, float *loss, int64_t r0, int64_t r1, int64_t n, float inv_t, float t2, int want_grad,
                   const int wide) {
    float xs[SIDE_ROW * SHORT_BLOCK], xu[SIDE_ROW * SHORT_BLOCK];
    float xr[SIDE_ROW * SHORT_BLOCK], tr[SIDE_ROW * SHORT_BLOCK]; /* raw rows for the teacher's gradient */
    float m_s[SHORT_BLOCK], ref_t[SHORT_BLOCK], fs[SHORT_BLOCK], fu[SHORT_BLOCK], fa[SHORT_BLOCK];
    double d_s[SHORT_BLOCK], d_u[SHORT_BLOCK], acc[SHORT_BLOCK];
    int64_t outer = r0 / inner, in = r0 % inner; /* row r0's place in the (O, inner, C) view */
    const float tm = inv_t / mult, h_mult = h_scale * mult; /* as kl_row: differences in the student's units */
    for (int64_t b0 = r0; b0 < r1; b0 += SHORT_BLOCK) {
        const int64_t rows = r1 - b0 < SHORT_BLOCK ? r1 - b0 : SHORT_BLOCK;
        const int64_t o0 = outer, i0 = in; /* the block's first row, for the copy out */
        for (int64_t i = 0; i < rows; ++i) {
            const float *sr = s + outer * so + in * si, *tr = t + outer * to + in * ti;
            for (int64_t c = 0; c < n; ++c) {
                xs[c * SHORT_BLOCK + i] = sr[c];
                xu[c * SHORT_BLOCK + i] = tr[c];
            }
            if (++in == inner) {
                in = 0;
                ++outer;
            }
        }
        pad_lanes(xs, n, rows);
        pad_lanes(xu, n, rows);
        float m_t[SHORT_BLOCK], lo[SHORT_BLOCK];
        for (int64_t i = 0; i < SHORT_BLOCK; ++i) m_s[i] = m_t[i] = -INFINITY;
        for (int64_t c = 0; c < n; ++c)
            for (int64_t i = 0; i < SHORT_BLOCK; ++i) {
                float vs = xs[c * SHORT_BLOCK + i], vu = xu[c * SHORT_BLOCK + i];
                m_s[i] = vs > m_s[i] ? vs : m_s[i];
                m_t[i] = vu > m_t[i] ? vu : m_t[i];
            }
        for (int64_t i = 0; i < SHORT_BLOCK; ++i) { /* as kl_row: only an all-masked row, which the host rejects */
            ref_t[i] = m_t[i] == INFINITY || m_t[i] == -INFINITY ? 0.0f : m_t[i];
            d_s[i] = d_u[i] = acc[i] = 0.0;
            fs[i] = fu[i] = fa[i] = 0.0f;
        }
        if (tgrad != NULL)
            for (int64_t k = 0; k < n * SHORT_BLOCK; ++k) {
                xr[k] = xs[k];
                tr[k] = xu[k];
            }
        for (int64_t c = 0; c < n; ++c) /* the exponentials written over the logits they come from */
            for (int64_t i = 0; i < SHORT_BLOCK; ++i) {
                float *ps = xs + c * SHORT_BLOCK + i, *pu = xu + c * SHORT_BLOCK + i;
                float ds_ = *ps - m_s[i], dt_ = *pu - ref_t[i];
                float ss = ds_ * mult, us = dt_ * inv_t; /* shifted, then scaled */
                float diff = dt_ * tm - ds_;
                float es = vexp(ss), eu = vexp(us);
                if (wide) { /* a masked class: 0 * -inf reads as 0 */
                    d_s[i] += es;
                    d_u[i] += eu;
                    acc[i] += kept(eu > 0.0f, eu * diff);
                } else {
                    fs[i] += es;
                    fu[i] += eu;
                    fa[i] += kept(eu > 0.0f, eu * diff * LANE_SCALE);
                }
                *ps = es;
                *pu = eu;
            }
        if (wide)
            for (int64_t i = 0; i < SHORT_BLOCK; ++i) /* in double, as kl_row's */
                lo[i] = (float)(t2 * (mult * (acc[i] / d_u[i]) + log(d_s[i] / d_u[i])));
        else
            for (int64_t i = 0; i < SHORT_BLOCK; ++i) {
                lo[i] = (fa[i] / fu[i]) * (t2 * mult * (float)LANE_UNIT) + t2 * logf(fs[i] / fu[i]);
                d_s[i] = fs[i];
                d_u[i] = fu[i];
            }
        for (int64_t i = 0; i < rows; ++i) loss[b0 + i] = lo[i];
        float inv_s[SHORT_BLOCK], inv_u[SHORT_BLOCK];
        for (int64_t i = 0; i < SHORT_BLOCK; ++i) {
            inv_s[i] = wide ? (float)(1.0 / d_s[i]) : 1.0f / (float)d_s[i];
            inv_u[i] = wide ? (float)(1.0 / d_u[i]) : 1.0f / (float)d_u[i];
        }
        if (tgrad != NULL) { /* the teacher's gradient as kl_row forms it, pivoted at the first class at max t */
            float x_j[SHORT_BLOCK], mean_e[SHORT_BLOCK];
            /* the pivot by a scalar search (a select per class made gcc emit masked loads: LOADS) */
            for (int64_t i = 0; i < SHORT_BLOCK; ++i) {
                int64_t j = 0;
                while (j < n - 1 && !(tr[j * SHORT_BLOCK + i] == m_t[i])) ++j;
                x_j[i] = xr[j * SHORT_BLOCK + i];
            }
            for (int64_t i = 0; i < SHORT_BLOCK; ++i) {
                acc[i] = 0.0;
                fa[i] = 0.0f;
            }
            for (int64_t c = 0; c < n; ++c) /* e = (t - max t) tm - (x - x_j) over the tr lines */
                for (int64_t i = 0; i < SHORT_BLOCK; ++i) {
                    float *e = tr + c * SHORT_BLOCK + i, eu = xu[c * SHORT_BLOCK + i];
                    *e = (*e - ref_t[i]) * tm - (xr[c * SHORT_BLOCK + i] - x_j[i]);
                    float term = kept(eu > 0.0f, eu * inv_u[i] * *e);
                    if (wide)
                        acc[i] += term;
                    else
                        fa[i] += term;
                }
            for (int64_t i = 0; i < SHORT_BLOCK; ++i) mean_e[i] = wide ? (float)acc[i] : fa[i];
            for (int64_t c = 0; c < n; ++c)
                for (int64_t i = 0; i < SHORT_BLOCK; ++i) {
                    float *e = tr + c * SHORT_BLOCK + i, eu = xu[c * SHORT_BLOCK + i];
                    *e = kept(eu > 0.0f, eu * inv_u[i] * (*e - mean_e[i])) * h_mult;
                }
            for (int64_t i = 0; i < rows; ++i) {
                float *h = tgrad + (b0 + i) * ld_h;
                for (int64_t c = 0; c < n; ++c) h[c] = tr[c * SHORT_BLOCK + i];
            }
        }
        if (!want_grad) continue;
        for (int64_t c = 0; c < n; ++c)
            for (int64_t i = 0; i < SHORT_BLOCK; ++i) {
                float *v = xs + c * SHORT_BLOCK + i;
                *v = (*v * inv_s[i] - xu[c * SHORT_BLOCK + i] * inv_u[i]) * g_mult;
            }
        int64_t o = o0, k = i0;
        for (int64_t i = 0; i < rows; ++i) {
            float *g = grad + o * go + k * gi;
            for (int64_t c = 0; c < n; ++c) g[c] = xs[c * SHORT_BLOCK + i];
            if (++k == inner) {
                k = 0;
                ++o;
            }
        }
    }
}

/* kl_short_rows_body made twice: rows under SHORT_ROW classes sum in float, longer ones in double */
static void kl_short_rows(const float *s, int64_t so, int64_t si, float mult, const float *t, int64_t to,
                          int64_t ti, int64_t inner, float *grad, int64_t go, int64_t gi, float g_mult, float *tgrad,
                          float h_scale, int64_t ld_h, float *loss, int64_t r0, int64_t r1, int64_t n, float inv_t,
                          float t2, int want_grad) {
    if (n < SHORT_ROW)
        kl_short_rows_body(s, so, si, mult, t, to, ti, inner, grad, go, gi, g_mult, tgrad, h_scale, ld_h, loss, r0, r1,
                           n, inv_t, t2, want_grad, 0);
    else
        kl_short_rows_body(s, so, si, mult, t, to, ti, inner, grad, go, gi, g_mult, tgrad, h_scale, ld_h, loss, r0, r1,
                           n, inv_t, t2, want_grad, 1);
}

static void tile_row_stats(const float *s, float mult, const float *t, int64_t w, float inv_t, float *m_s,
                           double *d_s, float *m_t, double *d_u, double *a);

/* Rows [r0, r1) of s * mult and t into loss (rows,); with want_grad, (q - p) * g_mult into grad (row r at
 * grad + ROW(r, go, gi, inner): s itself where the caller consumes it, every row's s read before its q - p is
 * written), and with tgrad != NULL the teacher's gradient p * ((log p - log q) - KL) * h_scale (row stride ld_h;
 * its own scale: formed from raw differences, it is stored scaled, and an unscaled one may pass float32's range
 * at T < 1 where T times it fits).
 * Row r of s lives at s + ROW(r, so, si, inner), of t at t + ROW(r, to, ti, inner). e_s, e_u: scratch rows of n
 * floats. */
static void kl_rows_part(const float *s, int64_t so, int64_t si, float mult, const float *t, int64_t to, int64_t ti,
                         int64_t inner, float *grad, int64_t go, int64_t gi, float g_mult, float *tgrad,
                         float h_scale, int64_t ld_h, float *loss, int64_t r0, int64_t r1, int64_t n, float inv_t,
                         float t2, int want_grad, float *e_s, float *e_u) {
    if (n < SIDE_ROW) {
        kl_short_rows(s, so, si, mult, t, to, ti, inner, grad, go, gi, g_mult, tgrad, h_scale, ld_h, loss, r0, r1, n,
                      inv_t, t2, want_grad);
        return;
    }
    if (!want_grad && tgrad == NULL) { /* the loss alone: the class-tiled mode's statistics over the whole row
                                        * as one tile (the maxima, then one sweep of sums; nothing stored) */
        for (int64_t r = r0; r < r1; ++r) {
            float m_s = -INFINITY, m_t = -INFINITY;
            double d_s = 0.0, d_u = 0.0, a = 0.0;
            tile_row_stats(s + ROW(r, so, si, inner), mult, t + ROW(r, to, ti, inner), n, inv_t, &m_s, &d_s, &m_t,
                           &d_u, &a);
            loss[r] = (float)(t2 * (mult * (a / d_u) + log(d_s / d_u))); /* in double, as kl_row's */
        }
        return;
    }
    for (int64_t r = r0; r < r1; ++r)
        kl_row(s + ROW(r, so, si, inner), mult, t + ROW(r, to, ti, inner),
               want_grad ? grad + ROW(r, go, gi, inner) : NULL, g_mult, e_s, e_u,
               tgrad != NULL ? tgrad + r * ld_h : NULL, h_scale, n, inv_t, t2, loss + r, want_grad);
}

/* scratch: two rows of n floats per part (the two exponentials of kl_row) */
void hydra_kl_rows(const float *s, int64_t so, int64_t si, float mult, const float *t, int64_t to, int64_t ti,
                   int64_t inner, float *grad, int64_t go, int64_t gi, float g_mult, float *tgrad, float h_scale,
                   int64_t ld_h, float *loss, int64_t n, float inv_t, float t2, int want_grad, float *scratch,
                   int64_t ld_scratch, int64_t r0, int64_t r1, int threads) {
    SPLIT_ROWS(kl_rows_part(s, so, si, mult, t, to, ti, inner, grad, go, gi, g_mult, tgrad, h_scale, ld_h, loss, lo, hi,
                            n, inv_t, t2, want_grad, scratch + part * ld_scratch, scratch + part * ld_scratch + n));
}

/* Class-tiled mode (large C on the torch path): a row's classes arrive in tiles of w, the logits of a
 * tile made by a GEMM just before. Pass 1 folds each tile into per-row online statistics, pass 2 turns
 * a recomputed tile into q - p in place. Row r of a tile lives at s + ROW(r, so, si, inner) (likewise t
 * with to, ti): the (M, rows, w) logits tile and a (rows, M, C) teacher seen as (M, rows, w).
 *
 * Statistics per row, from the raw student s (s * mult tempered: mult = 1 / T, here and in kl_rows' loss alone)
 * and the raw teacher t: m_s = max s, d_s = sum exp((s - m_s) mult); m_t = max t, d_u = sum exp((t - m_t) / T)
 * (each shift exactly 0 at the maximum), a = sum exp((t - m_t) / T) * ((t - m_t) tm - (s - m_s)) in the
 * student's units (tm = 1 / (T mult): 1 for raw logits; kl_row says why). When a tile raises a maximum the sums
 * are rescaled: d *= exp(old - new), a = exp(-du) * (a - d_u * (du - ds)) with du, ds the shifts.
 * T^2 KL = T^2 (mult a / d_u + log(d_s / d_u)) (on the host, per row, for the tiles: kl_from_sums). A -inf
 * teacher logit masks its class. The sums are double here (the loss alone keeps them so to its last step); the
 * tiles' arrays hold them as float between tiles, `a` in A_SCALE units. */
static void tile_row_stats(const float *s, float mult, const float *t, int64_t w, float inv_t, float *m_s,
                           double *d_s, float *m_t, double *d_u, double *a) {
    float tm_s = row_max(s, w), tm_t = row_max(t, w);
    float new_s = tm_s > *m_s ? tm_s : *m_s, new_t = tm_t > *m_t ? tm_t : *m_t;
    float ref_s = isinf(new_s) && new_s < 0 ? 0.0f : new_s;
    if (*d_s > 0.0f) *d_s *= vexp((*m_s - ref_s) * mult);
    const float tm = inv_t / mult; /* the teacher's shifts in the student's units (kl_row) */
    float shift_s = ref_s - (isinf(*m_s) && *m_s < 0 ? 0.0f : *m_s);
    *m_s = new_s;
    if (isinf(new_t) && new_t < 0) { /* every teacher class so far masked: only the student's sum moves */
        float ds[LANES];
        double ds_d[LANES];
        lanes_clear(ds, ds_d);
#define STUDENT_TERM(k, j) ds[j] += vexp((s[k] - ref_s) * mult)
        SUM_ROW(w, STUDENT_TERM, lanes_flush(ds_d, ds));
#undef STUDENT_TERM
        *d_s += row_total(ds_d, ds);
        return;
    }
    if (*d_u > 0.0f) { /* both references move: rescale the sums kept so far */
        float scale_u = vexp(-((new_t - *m_t) * inv_t)), shift_u = (new_t - *m_t) * tm;
        /* a maximum so far below the new one (a first tile masked at torch.finfo's min) that its terms vanish:
         * d_u * shift may overflow there, and 0 * inf would be NaN */
        *a = scale_u == 0.0f ? 0.0 : scale_u * (*a - *d_u * (double)(shift_u - shift_s));
        *d_u *= scale_u;
    } else {
        *a = 0.0;
        *d_u = 0.0;
    }
    *m_t = new_t;
    float ds[LANES], du[LANES], aa[LANES]; /* summed as kl_row's */
    double ds_d[LANES], du_d[LANES], a_d[LANES];
    lanes_clear(ds, ds_d);
    lanes_clear(du, du_d);
    lanes_clear(aa, a_d);
#define TILE_TERMS(k, j)                                                                    \
    do {                                                                                    \
        float dt_ = t[k] - new_t, ds_ = s[k] - ref_s;                                      \
        float eu = vexp(dt_ * inv_t);                                                       \
        ds[j] += vexp(ds_ * mult);                                                          \
        du[j] += eu;                                                                        \
        aa[j] += kept(eu > 0.0f, eu * (dt_ * tm - ds_) * LANE_SCALE); /* masked: 0 * -inf reads as 0 */ \
    } while (0)
    SUM_ROW(w, TILE_TERMS, (lanes_flush(ds_d, ds), lanes_flush(du_d, du), lanes_flush(a_d, aa)));
#undef TILE_TERMS
    *d_s += row_total(ds_d, ds);
    *d_u += row_total(du_d, du);
    *a += row_total(a_d, aa) * LANE_UNIT;
}

/* Pass 1 over rows [r0, r1) of one tile; stats arrays indexed by the row. */
static void tile_stats_part(const float *s, int64_t so, int64_t si, const float *t, int64_t to, int64_t ti,
                            int64_t inner, int64_t r0, int64_t r1, int64_t w, float inv_t, float *m_s, float *d_s,
                            float *m_t, float *d_u, float *a) {
    for (int64_t r = r0; r < r1; ++r) {
        double ds = d_s[r], du = d_u[r], ar = a[r] * A_UNIT;
        tile_row_stats(s + ROW(r, so, si, inner), inv_t, t + ROW(r, to, ti, inner), w, inv_t, m_s + r, &ds, m_t + r,
                       &du, &ar);
        d_s[r] = (float)ds;
        d_u[r] = (float)du;
        a[r] = (float)(ar * A_SCALE);
    }
}

void hydra_kl_tile_stats(const float *s, int64_t so, int64_t si, const float *t, int64_t to, int64_t ti,
                         int64_t inner, int64_t r0, int64_t r1, int64_t w, float inv_t, float *m_s, float *d_s,
                         float *m_t, float *d_u, float *a, int threads) {
    SPLIT_ROWS(tile_stats_part(s, so, si, t, to, ti, inner, lo, hi, w, inv_t, m_s, d_s, m_t, d_u, a));
}

/* Pass 2 over rows [r0, r1) of one tile: s (raw, overwritten) = q - p = exp((s - m_s) / T - log d_s) -
 * exp((t - m_t) / T - log d_u), from the statistics of pass 1. */
static void tile_grad_part(float *s, int64_t so, int64_t si, const float *t, int64_t to, int64_t ti,
                           int64_t inner, int64_t r0, int64_t r1, int64_t w, float inv_t, const float *m_s,
                           const float *log_d_s, const float *m_t, const float *log_d_u) {
    for (int64_t r = r0; r < r1; ++r) {
        float *g = s + ROW(r, so, si, inner);
        const float *tr = t + ROW(r, to, ti, inner);
        float ref_s = isinf(m_s[r]) && m_s[r] < 0 ? 0.0f : m_s[r], ls = log_d_s[r];
        float ref_t = isinf(m_t[r]) && m_t[r] < 0 ? 0.0f : m_t[r], lu = log_d_u[r];
        for (int64_t c = 0; c < w; ++c) g[c] = vexp((g[c] - ref_s) * inv_t - ls) - vexp((tr[c] - ref_t) * inv_t - lu);
    }
}

void hydra_kl_tile_grad(float *s, int64_t so, int64_t si, const float *t, int64_t to, int64_t ti, int64_t inner,
                        int64_t r0, int64_t r1, int64_t w, float inv_t, const float *m_s, const float *log_d_s,
                        const float *m_t, const float *log_d_u, int threads) {
    SPLIT_ROWS(tile_grad_part(s, so, si, t, to, ti, inner, lo, hi, w, inv_t, m_s, log_d_s, m_t, log_d_u));
}

/* log for a vector lane, x > 0 and normal (about 1 ulp), minus e_adj log 2: x = 2^e * f with f in
 * [sqrt(1/2), sqrt(2)), log f by a degree-9 polynomial in f - 1, (e - e_adj) * log 2 added in two parts;
 * branch-free so that gcc vectorises it. vlog keeps 0 and subnormals to its callers, vlog_any takes those too. */
static inline float vlog_shifted(float x, float e_adj) {
    int32_t bits;
    memcpy(&bits, &x, sizeof bits);
    float e = (float)(((bits >> 23) & 0xff) - 126) - e_adj;
    bits = (bits & 0x007fffff) | 0x3f000000; /* the mantissa as a float in [0.5, 1) */
    float f;
    memcpy(&f, &bits, sizeof f);
    int low = f < 0.70710678118654752f;
    e = low ? e - 1.0f : e;
    f = low ? f + f - 1.0f : f - 1.0f;
    float z = f * f;
    float p = 7.0376836292e-2f;
    p = p * f - 1.1514610310e-1f;
    p = p * f + 1.1676998740e-1f;
    p = p * f - 1.2420140846e-1f;
    p = p * f + 1.4249322787e-1f;
    p = p * f - 1.6668057665e-1f;
    p = p * f + 2.0000714765e-1f;
    p = p * f - 2.4999993993e-1f;
    p = p * f + 3.3333331174e-1f;
    float y = p * f * z - 2.12194440e-4f * e - 0.5f * z;
    return f + y + 0.693359375f * e;
}

static inline float vlog(float x) { return vlog_shifted(x, 0.0f); }

/* log x for x > 0, subnormals included: one below float32's smallest normal is scaled by 2^24 (exact) first */
static inline float vlog_any(float x) {
    int sub = x < 1.17549435e-38f;
    return vlog_shifted(sub ? x * 16777216.0f : x, sub ? 24.0f : 0.0f);
}

/* The row sums below are functions of their own (noinline): inlined into `uncertainty`'s loops, gcc vectorised
 * those loops worse, and a step at C = 40 cost 22% more than with the float lanes of before; called, 5%. */

/* sum_c a_c b_c over a row (SUM_ROW) */
__attribute__((noinline)) static double row_dot(const float *a, const float *b, int64_t n) {
    float acc[LANES];
    double acc_d[LANES];
    lanes_clear(acc, acc_d);
#define AB_TERM(k, j) acc[j] += a[k] * b[k]
    SUM_ROW(n, AB_TERM, lanes_flush(acc_d, acc));
#undef AB_TERM
    return row_total(acc_d, acc);
}

/* sum of x[0, n) (SUM_ROW) */
__attribute__((noinline)) static float lane_sum(const float *x, int64_t n) {
    float acc[LANES];
    double acc_d[LANES];
    lanes_clear(acc, acc_d);
#define X_TERM(k, j) acc[j] += x[k]
    SUM_ROW(n, X_TERM, lanes_flush(acc_d, acc));
#undef X_TERM
    return (float)row_total(acc_d, acc);
}

/* sum_c e_c (x_c - ref) / T over a row (SUM_ROW), 0 for a masked class (not 0 * -inf) */
__attribute__((noinline)) static double entropy_sum(const float *e, const float *x, float ref, float inv_t,
                                                    int64_t n) {
    float al[LANES];
    double al_d[LANES];
    lanes_clear(al, al_d);
#define ENTROPY_TERM(k, j) al[j] += kept(e[k] > 0.0f, e[k] * ((x[k] - ref) * inv_t))
    SUM_ROW(n, ENTROPY_TERM, lanes_flush(al_d, al));
#undef ENTROPY_TERM
    return row_total(al_d, al);
}

/* P = mean_m softmax(z_m / T) of one row (head stride ld_m, unit along the n classes) into p; with `entropy`,
 * returns the mean of the members' entropies H_m = log d_m - sum_c q_mc (z_mc - max_m) / T (else 0: that sum is
 * half the work). One exponential per element, each head row swept three times while hot in cache; e is scratch
 * of n floats. A -inf logit masks its class (q = 0, adds nothing). */
static float mixture_row(const float *z, int64_t ld_m, int64_t m, int64_t n, float inv_t, float *p, float *e,
                         int entropy) {
    float inv_m = 1.0f / (float)m;
    for (int64_t c = 0; c < n; ++c) p[c] = 0.0f;
    float ale = 0.0f;
    for (int64_t h = 0; h < m; ++h) {
        const float *x = z + h * ld_m;
        float mx = row_max(x, n);
        /* a row -inf everywhere has no softmax (0 / 0 below: NaN, as torch's softmax); +inf gives NaN too */
        float ref = isinf(mx) && mx < 0 ? 0.0f : mx;
        for (int64_t c = 0; c < n; ++c) e[c] = vexp((x[c] - ref) * inv_t); /* a pure map: vectorised */
        float d = lane_sum(e, n);
        if (entropy) {
            ale += logf(d) - (float)(entropy_sum(e, x, ref, inv_t, n) / d);
        }
        float w = inv_m / d;
        for (int64_t c = 0; c < n; ++c) p[c] += e[c] * w;
    }
    return ale * inv_m;
}

/* Head h's rows of a short block on their side: x[c * SHORT_BLOCK + i] = z[i, h, c] for i < rows (row stride
 * ld_b, head stride ld_m), and with ref != NULL ref[i] = the row's maximum, 0 for a row -inf everywhere (NaN
 * follows from its sum 0, as in mixture_row). */
static void short_head(const float *z, int64_t ld_b, int64_t ld_m, int64_t h, int64_t n, int64_t rows, float *x,
                       float *ref) {
    for (int64_t i = 0; i < rows; ++i) {
        const float *xr = z + i * ld_b + h * ld_m;
        for (int64_t c = 0; c < n; ++c) x[c * SHORT_BLOCK + i] = xr[c];
    }
    pad_lanes(x, n, rows);
    if (ref == NULL) return;
    for (int64_t i = 0; i < SHORT_BLOCK; ++i) ref[i] = -INFINITY;
    for (int64_t c = 0; c < n; ++c)
        for (int64_t i = 0; i < SHORT_BLOCK; ++i) {
            float v = x[c * SHORT_BLOCK + i];
            ref[i] = v > ref[i] ? v : ref[i];
        }
    for (int64_t i = 0; i < SHORT_BLOCK; ++i) ref[i] = ref[i] == -INFINITY ? 0.0f : ref[i];
}

/* mixture_row for the `rows` rows of a block at z, n < SIDE_ROW classes, turned on their side as in
 * kl_short_rows (class c of row i at column i of line c, one row per vector lane, each head's row copied in):
 * P[c * SHORT_BLOCK + i] = mean_m softmax(z_m / T)[c] of row i and, with ale != NULL, ale[i] its members' mean
 * entropy. The same formulas as mixture_row, each sum in class order (in double where `wide`). */
static inline __attribute__((always_inline)) void
mixture_short_body(const float *z, int64_t ld_b, int64_t ld_m, int64_t m, int64_t n, float inv_t, int64_t rows,
                   float *P, float *ale, const int wide) {
    float x[SIDE_ROW * SHORT_BLOCK], ref[SHORT_BLOCK], d[SHORT_BLOCK], a[SHORT_BLOCK];
    double dd[SHORT_BLOCK], ad[SHORT_BLOCK];
    const float inv_m = 1.0f / (float)m;
    for (int64_t k = 0; k < n * SHORT_BLOCK; ++k) P[k] = 0.0f;
    for (int64_t i = 0; i < SHORT_BLOCK; ++i) a[i] = 0.0f;
    for (int64_t h = 0; h < m; ++h) {
        short_head(z, ld_b, ld_m, h, n, rows, x, ref);
        for (int64_t i = 0; i < SHORT_BLOCK; ++i) {
            d[i] = 0.0f;
            dd[i] = ad[i] = 0.0;
        }
        for (int64_t c = 0; c < n; ++c) /* the exponentials written over the logits */
            for (int64_t i = 0; i < SHORT_BLOCK; ++i) {
                float *xc = x + c * SHORT_BLOCK + i;
                float u = (*xc - ref[i]) * inv_t, e = vexp(u);
                if (wide) {
                    dd[i] += e;
                    ad[i] += kept(e > 0.0f, e * u); /* masked: 0, not 0 * -inf (summed only where ale is wanted) */
                } else {
                    d[i] += e;
                    a[i] += kept(e > 0.0f, e * u);
                }
                *xc = e;
            }
        for (int64_t i = 0; i < SHORT_BLOCK; ++i) {
            if (wide) {
                if (ale != NULL) ale[i] = (h == 0 ? 0.0f : ale[i]) + (float)(log(dd[i]) - ad[i] / dd[i]);
                d[i] = (float)(inv_m / dd[i]);
            } else {
                if (ale != NULL) ale[i] = (h == 0 ? 0.0f : ale[i]) + (logf(d[i]) - a[i] / d[i]);
                a[i] = 0.0f;
                d[i] = inv_m / d[i];
            }
        }
        for (int64_t c = 0; c < n; ++c)
            for (int64_t i = 0; i < SHORT_BLOCK; ++i) P[c * SHORT_BLOCK + i] += x[c * SHORT_BLOCK + i] * d[i];
    }
    if (ale != NULL)
        for (int64_t i = 0; i < SHORT_BLOCK; ++i) ale[i] *= inv_m;
}

/* mixture_short_body made twice: rows under SHORT_ROW classes sum in float, longer ones in double */
static void mixture_short_block(const float *z, int64_t ld_b, int64_t ld_m, int64_t m, int64_t n, float inv_t,
                                int64_t rows, float *P, float *ale) {
    if (n < SHORT_ROW)
        mixture_short_body(z, ld_b, ld_m, m, n, inv_t, rows, P, ale, 0);
    else
        mixture_short_body(z, ld_b, ld_m, m, n, inv_t, rows, P, ale, 1);
}

/* uncertainty of rows [r0, r1): logits z (row stride ld_b, head stride ld_m, unit along the n classes),
 * q_m = softmax(z_m / T); writes P = mean_m q_m (mixture_row; row stride ld_p), total = -sum_c P log P,
 * aleatoric = mean_m H_m, epistemic = max(total - aleatoric, 0). e is scratch of n floats. */
static void uncertainty_part(const float *z, int64_t ld_b, int64_t ld_m, int64_t m, int64_t n, float inv_t,
                             float *probs, int64_t ld_p, float *total, float *aleatoric, float *epistemic, float *e,
                             int64_t r0, int64_t r1) {
    if (n < SIDE_ROW) { /* blocks of rows on their side (mixture_short_block), the same formulas as below */
        float P[SIDE_ROW * SHORT_BLOCK], L[SIDE_ROW * SHORT_BLOCK], ale[SHORT_BLOCK], tot[SHORT_BLOCK];
        double tot_d[SHORT_BLOCK];
        for (int64_t b0 = r0; b0 < r1; b0 += SHORT_BLOCK) {
            const int64_t rows = r1 - b0 < SHORT_BLOCK ? r1 - b0 : SHORT_BLOCK;
            mixture_short_block(z + b0 * ld_b, ld_b, ld_m, m, n, inv_t, rows, P, ale);
            for (int64_t k = 0; k < n * SHORT_BLOCK; ++k) L[k] = vlog(P[k] > 1.0e-37f ? P[k] : 1.0f);
            if (n < SHORT_ROW) {
                for (int64_t i = 0; i < SHORT_BLOCK; ++i) tot[i] = 0.0f;
                for (int64_t c = 0; c < n; ++c)
                    for (int64_t i = 0; i < SHORT_BLOCK; ++i)
                        tot[i] -= P[c * SHORT_BLOCK + i] * L[c * SHORT_BLOCK + i];
            } else { /* in double (as the long rows' row_dot) */
                for (int64_t i = 0; i < SHORT_BLOCK; ++i) tot_d[i] = 0.0;
                for (int64_t c = 0; c < n; ++c)
                    for (int64_t i = 0; i < SHORT_BLOCK; ++i)
                        tot_d[i] -= P[c * SHORT_BLOCK + i] * L[c * SHORT_BLOCK + i];
                for (int64_t i = 0; i < SHORT_BLOCK; ++i) tot[i] = (float)tot_d[i];
            }
            for (int64_t i = 0; i < rows; ++i) {
                float *p = probs + (b0 + i) * ld_p;
                for (int64_t c = 0; c < n; ++c) p[c] = P[c * SHORT_BLOCK + i];
                total[b0 + i] = tot[i];
                aleatoric[b0 + i] = ale[i];
                epistemic[b0 + i] = tot[i] - ale[i] < 0.0f ? 0.0f : tot[i] - ale[i];
            }
        }
        return;
    }
    for (int64_t r = r0; r < r1; ++r) {
        float *p = probs + r * ld_p;
        float ale = mixture_row(z + r * ld_b, ld_m, m, n, inv_t, p, e, 1);
        /* total = -sum P log P: the logarithms as a map into the scratch row, then the sum */
        for (int64_t c = 0; c < n; ++c) e[c] = vlog(p[c] > 1.0e-37f ? p[c] : 1.0f); /* P = 0 adds 0 * log 1 */
        const float tot = (float)-row_dot(p, e, n);
        total[r] = tot;
        aleatoric[r] = ale;
        epistemic[r] = tot - ale < 0.0f ? 0.0f : tot - ale; /* a NaN row stays NaN, as torch's clamp_min */
    }
}

/* scratch: a row of n floats per part */
void hydra_uncertainty_rows(const float *z, int64_t ld_b, int64_t ld_m, int64_t m, int64_t n, float inv_t,
                            float *probs, int64_t ld_p, float *total, float *aleatoric, float *epistemic,
                            float *scratch, int64_t ld_scratch, int64_t r0, int64_t r1, int threads) {
    SPLIT_ROWS(uncertainty_part(z, ld_b, ld_m, m, n, inv_t, probs, ld_p, total, aleatoric, epistemic,
                                scratch + part * ld_scratch, lo, hi));
}

/* The Hinton target of rows [r0, r1): out = T log P, P = mean_m softmax(z_m / T) (mixture_row; z as there, out
 * with row stride ld_o, unit along the n classes), -inf where P = 0 (every member masks the class); NaN stays NaN.
 * A P below fp32's normal range keeps its logarithm: times a student at torch.finfo's min there, about 3.4e38 / T,
 * it is a term of the loss (until the sixtieth session such classes were -inf, masked). One exponential per
 * element and one logarithm per class; e is scratch of n floats. */
static void log_mean_part(const float *z, int64_t ld_b, int64_t ld_m, int64_t m, int64_t n, float inv_t, float t,
                          float *out, int64_t ld_o, float *e, int64_t r0, int64_t r1) {
    if (n < SIDE_ROW) { /* blocks of rows on their side (mixture_short_block), the same map as below */
        float P[SIDE_ROW * SHORT_BLOCK];
        for (int64_t b0 = r0; b0 < r1; b0 += SHORT_BLOCK) {
            const int64_t rows = r1 - b0 < SHORT_BLOCK ? r1 - b0 : SHORT_BLOCK;
            mixture_short_block(z + b0 * ld_b, ld_b, ld_m, m, n, inv_t, rows, P, NULL);
            for (int64_t k = 0; k < n * SHORT_BLOCK; ++k) {
                float v = P[k];
                float l = t * vlog_any(v > 0.0f ? v : 1.0f);
                P[k] = v > 0.0f ? l : (v == v ? -INFINITY : v);
            }
            for (int64_t i = 0; i < rows; ++i)
                for (int64_t c = 0; c < n; ++c) out[(b0 + i) * ld_o + c] = P[c * SHORT_BLOCK + i];
        }
        return;
    }
    for (int64_t r = r0; r < r1; ++r) {
        float *p = out + r * ld_o;
        mixture_row(z + r * ld_b, ld_m, m, n, inv_t, p, e, 0);
        for (int64_t c = 0; c < n; ++c) { /* a pure map: vectorised */
            float v = p[c];
            float l = t * vlog_any(v > 0.0f ? v : 1.0f);
            p[c] = v > 0.0f ? l : (v == v ? -INFINITY : v);
        }
    }
}

/* scratch: a row of n floats per part */
void hydra_log_mean_rows(const float *z, int64_t ld_b, int64_t ld_m, int64_t m, int64_t n, float inv_t, float t,
                         float *out, int64_t ld_o, float *scratch, int64_t ld_scratch, int64_t r0, int64_t r1,
                         int threads) {
    SPLIT_ROWS(log_mean_part(z, ld_b, ld_m, m, n, inv_t, t, out, ld_o, scratch + part * ld_scratch, lo, hi));
}

/* gradient of uncertainty for rows [r0, r1): with p_m = softmax(z_m / T), P = mean_m p_m and the upstream
 * gradients g (of P; row stride ld_g, NULL: none), a = g_total + g_epistemic and b = g_aleatoric - g_epistemic
 * per row (NULL: 0), dz_mc = p_mc (V_mc - sum_k p_mk V_mk) / (M T) with V_mc = g_c - a log P_c - b log p_mc
 * (the softmax's vector product with dL/dp). dz has row stride ld_db, head stride ld_dm, unit along the n
 * classes. scratch: 3 * n + 2 * m floats (a row of p, the mixture then W, a row of V, and each head's reference
 * and log of its sum). Each head's exponentials are computed twice (for P, then for its gradient): three rows
 * of scratch stay in cache where M rows of p would not at large C. A -inf logit masks its class: p = 0, dz = 0.
 * The scratch rows do not overlap each other, the logits or dz: restrict, and every scalar a loop reads in a
 * local, so that gcc vectorises the loops (it otherwise reloads through possible aliases, element by element). */
#define SHORT_HEADS 32 /* the most heads whose per-row references and normalisers a short block keeps */
/* Rows on their side under 48 classes, as elsewhere, but under 32 where AVX-512 builds uncertainty_grad_part's
 * whole rows: from 32 on those were faster there (per element 2.4 to 2.7 ns against 2.9 to 3.1 at 32 to 44 classes;
 * at 20, 3.5 against 2.8 on their side), where with AVX2 the side was ahead up to 47 (3.0 to 3.1 against 3.3 to
 * 4.2). NEON and SVE vectors are no wider than AVX2's. */
#if defined(__AVX512F__)
#define GRAD_SIDE_ROW 32
#else
#define GRAD_SIDE_ROW 48
#endif

/* uncertainty_grad_part for the `rows` rows of a block at row b0, n < GRAD_SIDE_ROW classes, m <= SHORT_HEADS,
 * turned on their side as in kl_short_rows (one row per vector lane, each head's row copied in, twice: for P and
 * for its gradient). The same formulas as uncertainty_grad_part, each sum in class order (in double where
 * `wide`). */
static inline __attribute__((always_inline)) void
uncertainty_grad_short_body(const float *z, int64_t ld_b, int64_t ld_m, int64_t m, int64_t n, float inv_t,
                            const float *g, int64_t ld_g, const float *on_total, const float *on_heads, float *dz,
                            int64_t ld_db, int64_t ld_dm, int64_t b0, int64_t rows, const int wide) {
    float x[GRAD_SIDE_ROW * SHORT_BLOCK], w[GRAD_SIDE_ROW * SHORT_BLOCK], v[GRAD_SIDE_ROW * SHORT_BLOCK];
    float ref[SHORT_HEADS * SHORT_BLOCK], inv_d[SHORT_HEADS * SHORT_BLOCK], d[SHORT_BLOCK], lh[SHORT_BLOCK];
    float av[SHORT_BLOCK], bv[SHORT_BLOCK];
    double dd[SHORT_BLOCK];
    const float inv_m = 1.0f / (float)m, scale = inv_m * inv_t;
    for (int64_t k = 0; k < n * SHORT_BLOCK; ++k) w[k] = 0.0f;
    for (int64_t h = 0; h < m; ++h) { /* each head's normaliser, and the mixture P (in w) */
        float *rh = ref + h * SHORT_BLOCK, *idh = inv_d + h * SHORT_BLOCK;
        short_head(z + b0 * ld_b, ld_b, ld_m, h, n, rows, x, rh);
        for (int64_t i = 0; i < SHORT_BLOCK; ++i) {
            d[i] = 0.0f;
            dd[i] = 0.0;
        }
        for (int64_t c = 0; c < n; ++c)
            for (int64_t i = 0; i < SHORT_BLOCK; ++i) {
                float *xc = x + c * SHORT_BLOCK + i;
                *xc = vexp((*xc - rh[i]) * inv_t);
                if (wide)
                    dd[i] += *xc;
                else
                    d[i] += *xc;
            }
        for (int64_t i = 0; i < SHORT_BLOCK; ++i) {
            idh[i] = wide ? (float)(1.0 / dd[i]) : 1.0f / d[i];
            d[i] = wide ? (float)(inv_m / dd[i]) : inv_m / d[i];
        }
        for (int64_t c = 0; c < n; ++c)
            for (int64_t i = 0; i < SHORT_BLOCK; ++i) w[c * SHORT_BLOCK + i] += x[c * SHORT_BLOCK + i] * d[i];
    }
    for (int64_t i = 0; i < SHORT_BLOCK; ++i) av[i] = bv[i] = 0.0f; /* (LANES) */
    for (int64_t i = 0; i < rows; ++i) {
        av[i] = on_total ? on_total[b0 + i] : 0.0f;
        bv[i] = on_heads ? on_heads[b0 + i] : 0.0f;
    }
    for (int64_t c = 0; c < n; ++c) /* W = g - a log P (a class every head masks: log 1, times p = 0) */
        for (int64_t i = 0; i < SHORT_BLOCK; ++i) {
            float mc = w[c * SHORT_BLOCK + i];
            float log_mix = mc > 1.0e-37f ? vlog(mc) : (mc != mc ? mc : 0.0f); /* NaN stays NaN */
            w[c * SHORT_BLOCK + i] = -av[i] * log_mix;
        }
    if (g) /* a loop of its own: no load under a condition (LOADS) */
        for (int64_t i = 0; i < rows; ++i)
            for (int64_t c = 0; c < n; ++c) w[c * SHORT_BLOCK + i] += g[(b0 + i) * ld_g + c];
    for (int64_t h = 0; h < m; ++h) {
        const float *rh = ref + h * SHORT_BLOCK, *idh = inv_d + h * SHORT_BLOCK;
        short_head(z + b0 * ld_b, ld_b, ld_m, h, n, rows, x, NULL);
        for (int64_t i = 0; i < SHORT_BLOCK; ++i) {
            lh[i] = -logf(idh[i]);
            d[i] = 0.0f; /* <p, V> */
            dd[i] = 0.0;
        }
        for (int64_t c = 0; c < n; ++c) /* p again (the same rounding as for P) into x, V = W - b log p */
            for (int64_t i = 0; i < SHORT_BLOCK; ++i) {
                float xc = (x[c * SHORT_BLOCK + i] - rh[i]) * inv_t;
                float pc = vexp(xc) * idh[i];
                float vc = w[c * SHORT_BLOCK + i] - bv[i] * (pc > 0.0f ? xc - lh[i] : 0.0f);
                x[c * SHORT_BLOCK + i] = pc;
                v[c * SHORT_BLOCK + i] = vc;
                if (wide)
                    dd[i] += pc * vc;
                else
                    d[i] += pc * vc;
            }
        if (wide)
            for (int64_t i = 0; i < SHORT_BLOCK; ++i) d[i] = (float)dd[i];
        for (int64_t c = 0; c < n; ++c)
            for (int64_t i = 0; i < SHORT_BLOCK; ++i)
                v[c * SHORT_BLOCK + i] = x[c * SHORT_BLOCK + i] * (v[c * SHORT_BLOCK + i] - d[i]) * scale;
        for (int64_t i = 0; i < rows; ++i) {
            float *out = dz + (b0 + i) * ld_db + h * ld_dm;
            for (int64_t c = 0; c < n; ++c) out[c] = v[c * SHORT_BLOCK + i];
        }
    }
}

/* uncertainty_grad_short_body made twice: rows under SHORT_ROW classes sum in float, longer ones in double */
static void uncertainty_grad_short(const float *z, int64_t ld_b, int64_t ld_m, int64_t m, int64_t n, float inv_t,
                                   const float *g, int64_t ld_g, const float *on_total, const float *on_heads,
                                   float *dz, int64_t ld_db, int64_t ld_dm, int64_t b0, int64_t rows) {
    if (n < SHORT_ROW)
        uncertainty_grad_short_body(z, ld_b, ld_m, m, n, inv_t, g, ld_g, on_total, on_heads, dz, ld_db, ld_dm, b0,
                                    rows, 0);
    else
        uncertainty_grad_short_body(z, ld_b, ld_m, m, n, inv_t, g, ld_g, on_total, on_heads, dz, ld_db, ld_dm, b0,
                                    rows, 1);
}

static void uncertainty_grad_part(const float *z, int64_t ld_b, int64_t ld_m, int64_t m, int64_t n, float inv_t,
                                  const float *g, int64_t ld_g, const float *on_total, const float *on_heads,
                                  float *dz, int64_t ld_db, int64_t ld_dm, float *scratch, int64_t r0, int64_t r1) {
    if (n < GRAD_SIDE_ROW && m <= SHORT_HEADS) {
        for (int64_t b0 = r0; b0 < r1; b0 += SHORT_BLOCK)
            uncertainty_grad_short(z, ld_b, ld_m, m, n, inv_t, g, ld_g, on_total, on_heads, dz, ld_db, ld_dm, b0,
                                   r1 - b0 < SHORT_BLOCK ? r1 - b0 : SHORT_BLOCK);
        return;
    }
    float inv_m = 1.0f / (float)m, scale = inv_m * inv_t;
    float *restrict p = scratch, *restrict mix = p + n, *restrict v = mix + n, *restrict ref = v + n;
    float *restrict inv_d = ref + m;
    for (int64_t r = r0; r < r1; ++r) {
        float a = on_total ? on_total[r] : 0.0f, b = on_heads ? on_heads[r] : 0.0f;
        for (int64_t c = 0; c < n; ++c) mix[c] = 0.0f;
        for (int64_t h = 0; h < m; ++h) { /* each head's normaliser, and the mixture P */
            const float *restrict x = z + r * ld_b + h * ld_m;
            float mx = row_max(x, n);
            const float rh = isinf(mx) && mx < 0 ? 0.0f : mx; /* a row -inf everywhere: NaN below, as the forward */
            for (int64_t c = 0; c < n; ++c) p[c] = vexp((x[c] - rh) * inv_t);
            float d = lane_sum(p, n);
            ref[h] = rh;
            inv_d[h] = 1.0f / d;
            const float w = inv_m / d;
            for (int64_t c = 0; c < n; ++c) mix[c] += p[c] * w;
        }
        /* W = g - a log P over the mixture's row (in place); a class every head masks: log 1, times p = 0 */
        const float *restrict gr = g ? g + r * ld_g : NULL;
        for (int64_t c = 0; c < n; ++c) {
            float mc = mix[c];
            float log_mix = mc > 1.0e-37f ? vlog(mc) : (mc != mc ? mc : 0.0f); /* NaN stays NaN */
            mix[c] = -a * log_mix;
        }
        if (gr) /* a loop of its own: no load under a condition (LOADS) */
            for (int64_t c = 0; c < n; ++c) mix[c] += gr[c];
        for (int64_t h = 0; h < m; ++h) {
            const float *restrict x = z + r * ld_b + h * ld_m;
            float *restrict out = dz + r * ld_db + h * ld_dm;
            const float rh = ref[h], id = inv_d[h], lh = -logf(id);
            /* p again (the same rounding as for P), V = W - b log p (log p = (x - ref) / T - log d; 0 where p = 0,
             * whose products are 0): maps; then <p, V> in LANES partial sums (one loop doing it all is not
             * vectorised) */
            for (int64_t c = 0; c < n; ++c) {
                float xc = (x[c] - rh) * inv_t;
                float pc = vexp(xc) * id;
                p[c] = pc;
                v[c] = mix[c] - b * (pc > 0.0f ? xc - lh : 0.0f);
            }
            const float s = (float)row_dot(p, v, n);
            for (int64_t c = 0; c < n; ++c) out[c] = p[c] * (v[c] - s) * scale;
        }
    }
}

/* scratch: 3 n + 2 m floats per part */
void hydra_uncertainty_grad_rows(const float *z, int64_t ld_b, int64_t ld_m, int64_t m, int64_t n, float inv_t,
                                 const float *g, int64_t ld_g, const float *on_total, const float *on_heads,
                                 float *dz, int64_t ld_db, int64_t ld_dm, float *scratch, int64_t ld_scratch,
                                 int64_t r0, int64_t r1, int threads) {
    SPLIT_ROWS(uncertainty_grad_part(z, ld_b, ld_m, m, n, inv_t, g, ld_g, on_total, on_heads, dz, ld_db, ld_dm,
                                     scratch + part * ld_scratch, lo, hi));
}
