/* CPU kernels: paged decode attention, RMSNorm (with the residual add), RoPE, SiLU * mul, and linear
 * layers of few rows over column-panel weights (AVX-512).
 *
 * Paged decode attention: one query token per sequence, K/V read from their blocks in place.
 *
 * Layouts (all fp32, or all bf16, and int64; contiguous):
 *   q, out           [num_seqs, num_heads, head_dim]
 *   k_cache, v_cache [num_slots, num_kv_heads, head_dim], slot = block_id * block_size + offset
 *   block_tables     [num_seqs, max_blocks]
 *   context_lens     [num_seqs]
 *
 * One task per sequence, reading each token's whole row (all kv heads) at once: a row is one
 * contiguous run of memory, which the hardware prefetchers follow. One task per (sequence, kv head)
 * reads a row's slice every num_kv_heads * head_dim floats, a stride they do not follow; on the
 * real model at batch 32 that was 2.5x slower. GQA: query head h reads kv head h / (num_heads /
 * num_kv_heads). Softmax is two-pass (scores, then max-subtracted exponentials), which keeps the
 * result within float rounding of SDPA's.
 */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* glibc's libmvec has a vector expf. Declared `omp declare simd`, the softmax loop calls it a
 * vector at a time; the scalar expf took a third of the kernel's time on SmolLM2. The build
 * defines ZS_VECTOR_EXPF where it links libmvec (x86-64, glibc >= 2.22). */
#ifdef ZS_VECTOR_EXPF
#pragma omp declare simd notinbranch
float expf(float);
#endif

/* bf16 is the top half of an fp32: widening is a shift, narrowing rounds to nearest even (as
 * torch's casts do; NaN stays NaN). */
static inline float bf16_to_f32(uint16_t x) {
    uint32_t bits = (uint32_t)x << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40u);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

static inline float load_f32(const float *p, int64_t i) { return p[i]; }
static inline float load_bf16(const uint16_t *p, int64_t i) { return bf16_to_f32(p[i]); }
static inline void store_f32(float *p, int64_t i, float v) { p[i] = v; }
static inline void store_bf16(uint16_t *p, int64_t i, float v) { p[i] = f32_to_bf16(v); }

/* The n values at `row` as fp32: in place, or widened into `buf` (a dot product that widens as it
 * loads vectorizes poorly: bf16 attention scores took twice fp32's time). */
static inline const float *row_f32(float *buf, const float *row, int64_t n) {
    (void)buf;
    (void)n;
    return row;
}

static inline const float *row_bf16(float *buf, const uint16_t *row, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++) buf[i] = bf16_to_f32(row[i]);
    return buf;
}

/* In place: `row` [n] becomes its softmax. */
static void softmax_row(float *row, int64_t n) {
    float max = -INFINITY, sum = 0.0f;
#pragma omp simd reduction(max : max)
    for (int64_t t = 0; t < n; t++) max = row[t] > max ? row[t] : max;
#pragma omp simd reduction(+ : sum)
    for (int64_t t = 0; t < n; t++) {
        row[t] = expf(row[t] - max);
        sum += row[t];
    }
    float inv = 1.0f / sum;
    for (int64_t t = 0; t < n; t++) row[t] *= inv;
}

/* In place: each row of p [rows, n] becomes its softmax. */
static void softmax_rows(float *p, int64_t rows, int64_t n) {
    for (int64_t h = 0; h < rows; h++) softmax_row(p + h * n, n);
}

struct seq {
    const int64_t *blocks; /* this sequence's row of block_tables */
    int64_t len, num_heads, group, head_dim, row, block_size;
};

/* Walks a sequence's tokens block by block: `t` the token, `slot` its cache slot (no division per
 * token). */
#define FOR_EACH_TOKEN(s, t, slot)                                                                                \
    for (int64_t block_ = 0, t = 0; t < (s)->len; block_++)                                                     \
        for (int64_t slot = (s)->blocks[block_] * (s)->block_size, end_ = slot + (s)->block_size,                \
                     to_next_ = (block_ + 1) * (s)->block_size < (s)->len                                        \
                                    ? ((s)->blocks[block_ + 1] - (s)->blocks[block_]) * (s)->block_size          \
                                    : 0;                                                                         \
             slot < end_ && t < (s)->len; slot++, t++)

/* Inside FOR_EACH_TOKEN: into L2, `bytes` from `at` (in the row of `slot`) moved to the slot at
 * the same place in the sequence's next block; nothing in its last block. Blocks lie anywhere in
 * the cache, so the hardware prefetcher stops at each (a sequence's blocks are distinct: 0 marks
 * the last). */
#define PREFETCH_A_BLOCK_AHEAD(at, s, bytes)                                                                     \
    do {                                                                                                         \
        if (to_next_ != 0) prefetch_bytes((at) + to_next_ * (s)->row, (bytes));                                  \
    } while (0)

/* Into L2: the `bytes` from `p`. */
static inline void prefetch_bytes(const void *p, int64_t bytes) {
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch((const char *)p + b, 0, 2);
}

/* One vector of fp32 lanes: a zmm register on AVX-512 CPUs (32 of them), a ymm one on AVX2 + FMA
 * CPUs (16). The vector kernels below are written in these terms, their tiles sized by
 * VEC_REGISTERS; without either instruction set they are left out (HAVE_VECTORS undefined) and the
 * scalar code or torch serves. */
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#define HAVE_VECTORS
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
#define VEC_WIDTH 16
#define VEC_REGISTERS 32
typedef __m512 vfloat;
static inline vfloat vzero(void) { return _mm512_setzero_ps(); }
static inline vfloat vset1(float v) { return _mm512_set1_ps(v); }
static inline vfloat vload(const float *p) { return _mm512_loadu_ps(p); }
static inline void vstore(float *p, vfloat v) { _mm512_storeu_ps(p, v); }
static inline vfloat vadd(vfloat a, vfloat b) { return _mm512_add_ps(a, b); }
static inline vfloat vmul(vfloat a, vfloat b) { return _mm512_mul_ps(a, b); }
static inline vfloat vfmadd(vfloat a, vfloat b, vfloat c) { return _mm512_fmadd_ps(a, b, c); }
static inline float vsum(vfloat v) { return _mm512_reduce_add_ps(v); }
/* VEC_WIDTH bf16 values at p, widened to fp32 in the register. */
static inline vfloat vload_bf16(const uint16_t *p) {
    __m256i half = _mm256_loadu_si256((const __m256i *)p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}
#elif defined(HAVE_VECTORS)
#define VEC_WIDTH 8
#define VEC_REGISTERS 16
typedef __m256 vfloat;
static inline vfloat vzero(void) { return _mm256_setzero_ps(); }
static inline vfloat vset1(float v) { return _mm256_set1_ps(v); }
static inline vfloat vload(const float *p) { return _mm256_loadu_ps(p); }
static inline void vstore(float *p, vfloat v) { _mm256_storeu_ps(p, v); }
static inline vfloat vadd(vfloat a, vfloat b) { return _mm256_add_ps(a, b); }
static inline vfloat vmul(vfloat a, vfloat b) { return _mm256_mul_ps(a, b); }
static inline vfloat vfmadd(vfloat a, vfloat b, vfloat c) { return _mm256_fmadd_ps(a, b, c); }
static inline float vsum(vfloat v) {
    __m128 pair = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    pair = _mm_add_ps(pair, _mm_movehl_ps(pair, pair));
    return _mm_cvtss_f32(_mm_add_ss(pair, _mm_movehdup_ps(pair)));
}
static inline vfloat vload_bf16(const uint16_t *p) {
    __m128i half = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}
#endif

#if defined(HAVE_VECTORS)
/* Query heads of one KV head whose outputs sum in registers at once for head size D: up to 3
 * (3 x 8 zmm at 128) while their sums leave two registers free. */
#define VALUE_HEADS(D)                                                                                           \
    (3 * ((D) / VEC_WIDTH) + 2 <= VEC_REGISTERS ? 3 : 2 * ((D) / VEC_WIDTH) + 2 <= VEC_REGISTERS ? 2 : 1)
/* One pass for a head of D values, D / VEC_WIDTH vectors (a constant, so the arrays stay in
 * registers). */
#define DECODE_VECTOR_PASSES_OF(NAME, T, VEC, D)                                                                 \
    static void NAME##_scores_##D(float *p, const float *q, const T *k_cache, const struct seq *s, float scale) { \
        FOR_EACH_TOKEN(s, t, slot) {                                                                             \
            const T *row = k_cache + slot * s->row;                                                              \
            PREFETCH_A_BLOCK_AHEAD(row, s, s->row * (int64_t)sizeof(T));                                         \
            for (int64_t g = 0; g < s->num_heads / s->group; g++) {                                              \
                vfloat k[D / VEC_WIDTH];                                                                         \
                _Pragma("GCC unroll 16") for (int i = 0; i < D / VEC_WIDTH; i++) k[i] =                          \
                    VEC(row + g * D + VEC_WIDTH * i);                                                            \
                for (int64_t h = g * s->group; h < (g + 1) * s->group; h++) {                                    \
                    const float *qh = q + h * D;                                                                 \
                    vfloat sum = vmul(k[0], vload(qh));                                                          \
                    _Pragma("GCC unroll 16") for (int i = 1; i < D / VEC_WIDTH; i++) sum =                       \
                        vfmadd(k[i], vload(qh + VEC_WIDTH * i), sum);                                            \
                    p[h * s->len + t] = vsum(sum) * scale;                                                       \
                }                                                                                                \
            }                                                                                                    \
        }                                                                                                        \
    }                                                                                                            \
    /* Query heads [h0, h0 + heads) of one KV head: each V row read once for them all. */                    \
    static inline __attribute__((always_inline)) void NAME##_values_##D##_of(                                   \
        float *acc, const float *p, const T *v_cache, const struct seq *s, int64_t h0, int heads) {             \
        const T *column = v_cache + h0 / s->group * D;                                                           \
        vfloat out[3][D / VEC_WIDTH];                                                                            \
        _Pragma("GCC unroll 3") for (int j = 0; j < heads; j++)                                                  \
            _Pragma("GCC unroll 16") for (int i = 0; i < D / VEC_WIDTH; i++) out[j][i] = vzero();                \
        FOR_EACH_TOKEN(s, t, slot) {                                                                             \
            const T *vh = column + slot * s->row;                                                                \
            PREFETCH_A_BLOCK_AHEAD(vh, s, D * (int64_t)sizeof(T));                                               \
            vfloat v[D / VEC_WIDTH];                                                                             \
            _Pragma("GCC unroll 16") for (int i = 0; i < D / VEC_WIDTH; i++) v[i] = VEC(vh + VEC_WIDTH * i);     \
            _Pragma("GCC unroll 3") for (int j = 0; j < heads; j++) {                                            \
                vfloat weight = vset1(p[(h0 + j) * s->len + t]);                                                 \
                _Pragma("GCC unroll 16") for (int i = 0; i < D / VEC_WIDTH; i++) out[j][i] =                     \
                    vfmadd(weight, v[i], out[j][i]);                                                             \
            }                                                                                                    \
        }                                                                                                        \
        _Pragma("GCC unroll 3") for (int j = 0; j < heads; j++)                                                  \
            _Pragma("GCC unroll 16") for (int i = 0; i < D / VEC_WIDTH; i++)                                     \
                vstore(acc + (h0 + j) * D + VEC_WIDTH * i, out[j][i]);                                           \
    }                                                                                                            \
    static void NAME##_values_##D(float *acc, const float *p, const T *v_cache, const struct seq *s) {           \
        for (int64_t h = 0; h < s->num_heads;) {                                                                 \
            int64_t group_end = (h / s->group + 1) * s->group, heads = group_end - h;                            \
            heads = heads < VALUE_HEADS(D) ? heads : VALUE_HEADS(D);                                             \
            if (heads == 3) NAME##_values_##D##_of(acc, p, v_cache, s, h, 3);                                    \
            else if (heads == 2) NAME##_values_##D##_of(acc, p, v_cache, s, h, 2);                               \
            else NAME##_values_##D##_of(acc, p, v_cache, s, h, 1);                                               \
            h += heads;                                                                                          \
        }                                                                                                        \
    }

/* head_dim 64 or 128: a head's K or V row is held in registers, widened there; a score is one
 * register's sum, and up to VALUE_HEADS query heads of a KV head sum their outputs in registers
 * over the tokens, each V row read once for them. Else 0: the scalar passes serve. Against the
 * scalar passes on AVX-512: 22.7 -> 17.2 ms fp32, 19.5 -> 13.0 ms bf16 (SmolLM2's 30 layers,
 * 20 sequences of 250 tokens). */
#define DECODE_VECTOR_PASSES(NAME, T, VEC)                                                                       \
    DECODE_VECTOR_PASSES_OF(NAME, T, VEC, 64)                                                                    \
    DECODE_VECTOR_PASSES_OF(NAME, T, VEC, 128)                                                                   \
    static int NAME##_vector_scores(float *p, const float *q, const T *k_cache, const struct seq *s,            \
                                    float scale) {                                                               \
        switch (s->head_dim) {                                                                                   \
            case 64: NAME##_scores_64(p, q, k_cache, s, scale); return 1;                                        \
            case 128: NAME##_scores_128(p, q, k_cache, s, scale); return 1;                                      \
            default: return 0;                                                                                   \
        }                                                                                                        \
    }                                                                                                            \
    static int NAME##_vector_values(float *acc, const float *p, const T *v_cache, const struct seq *s) {         \
        switch (s->head_dim) {                                                                                   \
            case 64: NAME##_values_64(acc, p, v_cache, s); return 1;                                             \
            case 128: NAME##_values_128(acc, p, v_cache, s); return 1;                                           \
            default: return 0;                                                                                   \
        }                                                                                                        \
    }
#else
#define DECODE_VECTOR_PASSES(NAME, T, VEC)                                                                       \
    static int NAME##_vector_scores(float *p, const float *q, const T *k_cache, const struct seq *s,            \
                                    float scale) {                                                               \
        (void)p, (void)q, (void)k_cache, (void)s, (void)scale;                                                   \
        return 0;                                                                                                \
    }                                                                                                            \
    static int NAME##_vector_values(float *acc, const float *p, const T *v_cache, const struct seq *s) {         \
        (void)acc, (void)p, (void)v_cache, (void)s;                                                              \
        return 0;                                                                                                \
    }
#endif

/* The decode kernel for cache element type T (float or uint16_t bf16), queries and outputs of
 * the same type; every product and sum in fp32, the query widened once per sequence. The scalar
 * passes serve where the vector ones do not (they return 0). */
#define DECODE_KERNEL(NAME, T, LOAD, STORE, WIDEN, VEC)                                                          \
    DECODE_VECTOR_PASSES(NAME, T, VEC)                                                                           \
    static void NAME##_scores(float *p, const float *q, float *wide, const T *k_cache, const struct seq *s,      \
                              float scale) {                                                                     \
        if (NAME##_vector_scores(p, q, k_cache, s, scale)) return;                                               \
        FOR_EACH_TOKEN(s, t, slot) {                                                                             \
            PREFETCH_A_BLOCK_AHEAD(k_cache + slot * s->row, s, s->row * (int64_t)sizeof(T));                     \
            const float *row = WIDEN(wide, k_cache + slot * s->row, s->row);                                     \
            for (int64_t h = 0; h < s->num_heads; h++) {                                                         \
                const float *qh = q + h * s->head_dim;                                                           \
                const float *kh = row + h / s->group * s->head_dim;                                              \
                float sum = 0.0f;                                                                                \
                _Pragma("omp simd reduction(+ : sum)") for (int64_t i = 0; i < s->head_dim; i++) sum +=          \
                    qh[i] * kh[i];                                                                               \
                p[h * s->len + t] = sum * scale;                                                                 \
            }                                                                                                    \
        }                                                                                                        \
    }                                                                                                            \
    static void NAME##_values(float *acc, const float *p, float *wide, const T *v_cache, const struct seq *s) {  \
        if (NAME##_vector_values(acc, p, v_cache, s)) return;                                                    \
        for (int64_t i = 0; i < s->num_heads * s->head_dim; i++) acc[i] = 0.0f;                                  \
        FOR_EACH_TOKEN(s, t, slot) {                                                                             \
            PREFETCH_A_BLOCK_AHEAD(v_cache + slot * s->row, s, s->row * (int64_t)sizeof(T));                     \
            const float *row = WIDEN(wide, v_cache + slot * s->row, s->row);                                     \
            for (int64_t h = 0; h < s->num_heads; h++) {                                                         \
                float weight = p[h * s->len + t], *out = acc + h * s->head_dim;                                  \
                const float *vh = row + h / s->group * s->head_dim;                                              \
                _Pragma("omp simd") for (int64_t i = 0; i < s->head_dim; i++) out[i] += weight * vh[i];          \
            }                                                                                                    \
        }                                                                                                        \
    }                                                                                                            \
    int NAME(const T *q, const T *k_cache, const T *v_cache, const int64_t *block_tables,                        \
             const int64_t *context_lens, T *out, int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads,     \
             int64_t head_dim, int64_t max_blocks, int64_t block_size, float scale, int num_threads) {           \
        int64_t longest = 1;                                                                                     \
        for (int64_t i = 0; i < num_seqs; i++) longest = context_lens[i] > longest ? context_lens[i] : longest;  \
        int64_t width = num_heads * head_dim, row = num_kv_heads * head_dim;                                     \
        int failed = 0;                                                                                          \
        /* Contexts differ in length, so sequences are handed out one at a time. */                              \
        _Pragma("omp parallel num_threads(num_threads) reduction(| : failed)") {                                 \
            float *p = malloc(sizeof(float) * (size_t)(num_heads * longest + 2 * width + row));                  \
            failed = p == NULL;                                                                                  \
            _Pragma("omp for schedule(dynamic, 1)") for (int64_t i = 0; i < num_seqs; i++) {                     \
                if (failed) continue;                                                                            \
                struct seq s = {block_tables + i * max_blocks, context_lens[i], num_heads, num_heads / num_kv_heads, \
                                head_dim, num_kv_heads * head_dim, block_size};                                  \
                float *qf = p + num_heads * longest, *acc = qf + width, *wide = acc + width;                     \
                for (int64_t j = 0; j < width; j++) qf[j] = LOAD(q + i * width, j);                              \
                NAME##_scores(p, qf, wide, k_cache, &s, scale);                                                  \
                softmax_rows(p, num_heads, s.len);                                                               \
                NAME##_values(acc, p, wide, v_cache, &s);                                                        \
                for (int64_t j = 0; j < width; j++) STORE(out + i * width, j, acc[j]);                           \
            }                                                                                                    \
            free(p);                                                                                             \
        }                                                                                                        \
        return failed ? -1 : 0;                                                                                  \
    }

/* Each returns 0, or -1 when a score buffer could not be allocated (out is then incomplete). */
DECODE_KERNEL(paged_decode_attention, float, load_f32, store_f32, row_f32, vload)
DECODE_KERNEL(paged_decode_attention_bf16, uint16_t, load_bf16, store_bf16, row_bf16, vload_bf16)

/* RMSNorm of `rows` contiguous rows of `hidden` elements: transformers' formula, the sum in fp32.
 * In fp32 out = weight * (x / sqrt(mean(x^2) + eps)); in bf16 the normalised value is rounded to
 * bf16 before the weight multiplies it, and the product rounded again, as transformers does. With
 * `delta` (else NULL), x += delta first, in place (the residual add before the norm, rounded to
 * x's type as torch's add is). torch runs it as six kernels or more that each allocate; at decode
 * sizes the launches cost more than the arithmetic. */
static inline float round_f32(float v) { return v; }
static inline float round_bf16(float v) { return bf16_to_f32(f32_to_bf16(v)); }

#define RMS_NORM_KERNEL(NAME, T, LOAD, STORE, ROUND)                                                              \
    void NAME(T *x, const T *delta, const T *weight, T *out, int64_t rows, int64_t hidden, float eps,            \
              int num_threads) {                                                                                 \
        _Pragma("omp parallel for num_threads(num_threads) if (rows * hidden >= 65536)")                         \
        for (int64_t r = 0; r < rows; r++) {                                                                     \
            T *row = x + r * hidden;                                                                             \
            T *dst = out + r * hidden;                                                                           \
            if (delta != NULL) {                                                                                 \
                const T *add = delta + r * hidden;                                                               \
                _Pragma("omp simd") for (int64_t i = 0; i < hidden; i++) STORE(row, i,                           \
                                                                         LOAD(row, i) + LOAD(add, i));           \
            }                                                                                                    \
            float sum = 0.0f;                                                                                    \
            _Pragma("omp simd reduction(+ : sum)") for (int64_t i = 0; i < hidden; i++) sum +=                   \
                LOAD(row, i) * LOAD(row, i);                                                                     \
            float inv = 1.0f / sqrtf(sum / (float)hidden + eps);                                                 \
            _Pragma("omp simd") for (int64_t i = 0; i < hidden; i++) STORE(dst, i,                               \
                                                                     LOAD(weight, i) * ROUND(LOAD(row, i) * inv)); \
        }                                                                                                        \
    }

RMS_NORM_KERNEL(rms_norm, float, load_f32, store_f32, round_f32)
RMS_NORM_KERNEL(rms_norm_bf16, uint16_t, load_bf16, store_bf16, round_bf16)

/* RoPE in place on the first `heads` heads of each of `tokens` rows of x (rows `stride` elements
 * apart, heads `head_dim` apart): transformers' x * cos + rotate_half(x) * sin, with cos and sin
 * [tokens, head_dim / 2] (its tables repeat their first half). In bf16 each product and sum is
 * rounded, as torch's ops round them. One pass over q and k where torch takes seven kernels each. */
#define ROPE_KERNEL(NAME, T, LOAD, STORE, ROUND)                                                                  \
    void NAME(T *x, const T *cos, const T *sin, int64_t tokens, int64_t heads, int64_t stride, int64_t head_dim, \
              int num_threads) {                                                                                 \
        int64_t half = head_dim / 2;                                                                             \
        _Pragma("omp parallel for num_threads(num_threads) if (tokens * heads * head_dim >= 65536)")             \
        for (int64_t t = 0; t < tokens; t++) {                                                                   \
            const T *c = cos + t * half, *s = sin + t * half;                                                    \
            for (int64_t h = 0; h < heads; h++) {                                                                \
                T *v = x + t * stride + h * head_dim;                                                            \
                _Pragma("omp simd") for (int64_t i = 0; i < half; i++) {                                         \
                    float a = LOAD(v, i), b = LOAD(v, i + half), ci = LOAD(c, i), si = LOAD(s, i);               \
                    STORE(v, i, ROUND(a * ci) - ROUND(b * si));                                                  \
                    STORE(v, i + half, ROUND(b * ci) + ROUND(a * si));                                           \
                }                                                                                                \
            }                                                                                                    \
        }                                                                                                        \
    }

ROPE_KERNEL(rope, float, load_f32, store_f32, round_f32)
ROPE_KERNEL(rope_bf16, uint16_t, load_bf16, store_bf16, round_bf16)

/* out [tokens, inter] = silu(gate) * up, gate and up the halves of each row of gate_up
 * [tokens, 2 * inter]; in bf16 silu's value is rounded before the product, as torch's two ops do. */
#define SILU_MUL_KERNEL(NAME, T, LOAD, STORE, ROUND)                                                              \
    void NAME(const T *gate_up, T *out, int64_t tokens, int64_t inter, int num_threads) {                        \
        _Pragma("omp parallel for num_threads(num_threads) if (tokens * inter >= 65536)")                        \
        for (int64_t t = 0; t < tokens; t++) {                                                                   \
            const T *gate = gate_up + t * 2 * inter, *up = gate + inter;                                         \
            T *dst = out + t * inter;                                                                            \
            _Pragma("omp simd") for (int64_t i = 0; i < inter; i++) {                                            \
                float g = LOAD(gate, i);                                                                         \
                STORE(dst, i, ROUND(g / (1.0f + expf(-g))) * LOAD(up, i));                                       \
            }                                                                                                    \
        }                                                                                                        \
    }

SILU_MUL_KERNEL(silu_mul, float, load_f32, store_f32, round_f32)
SILU_MUL_KERNEL(silu_mul_bf16, uint16_t, load_bf16, store_bf16, round_bf16)

/* Linear layers of few rows (decode batches): out [rows, n] = x [rows, k] . W^T + bias, with W in
 * column panels, [n / 32][k][32] (`panels`): 32 output columns of one k are one contiguous run.
 * A tile of TILE_ROWS rows x 2 vectors of columns sums in registers (12 x 32 columns in 24 zmm on
 * AVX-512, 6 x 16 in 12 ymm on AVX2, two such tiles a panel), one fp32 FMA per weight vector and
 * row. bf16 weights are widened in the register (exact), so bf16 reads half the bytes at the fp32
 * FMA rate; on AVX512-BF16 CPUs they lie in pairs of k instead (`panel_bf16_pairs`), multiplied by
 * the row's bf16 values with one dot-product instruction per pair. k is walked in chunks that keep
 * the panel's slice in L1 while every row block reads it, the chunks ahead prefetched from memory a
 * share in each pass. Every product and sum in fp32.
 * oneDNN took 1.3-1.5x as long on SmolLM2's decode shapes (bf16), 1.0-1.3x (fp32), on AVX-512. */
#if defined(HAVE_VECTORS)
#define PANEL 32
#define TILE_COLUMNS (2 * VEC_WIDTH)
#if VEC_REGISTERS == 32
#define TILE_ROWS 12
#else
#define TILE_ROWS 6
#endif
#define K_CHUNK 128
#define CACHE_LINE 64
#ifndef PREFETCH_CHUNKS_AHEAD
#define PREFETCH_CHUNKS_AHEAD 1
#endif

/* Cache lines of weights to prefetch into L2 during one tile pass: `lines` of them from `next`,
 * spread evenly over the pass's `steps` k steps (a running credit), so memory streams the chunks
 * ahead while every pass computes, not only the first one that reads the chunk from memory. */
typedef struct {
    const char *next;
    int64_t lines;
    int64_t steps;
} Prefetch;

/* Rows [0, rows) of x (k apart) times TILE_COLUMNS columns of a panel (`panel` at the first) over
 * k in [k0, k1), summed from zero and added to `sums` [rows][PANEL] (stored there when `first`):
 * sums of K_CHUNK products, then of the chunks, keep the rounding error near a blocked GEMM's (one
 * running sum over k had 2-3x MKL's). */
#define PANEL_TILE(NAME, T, VEC)                                                                                 \
    static inline __attribute__((always_inline)) void NAME(const float *x, int64_t k, int64_t k0, int64_t k1,   \
                                                           const T *panel, float *sums, int rows, int first,     \
                                                           Prefetch prefetch) {                                  \
        vfloat lo[TILE_ROWS], hi[TILE_ROWS];                                                                     \
        int64_t credit = 0;                                                                                      \
        _Pragma("GCC unroll 12") for (int m = 0; m < rows; m++) lo[m] = hi[m] = vzero();                         \
        for (int64_t j = k0; j < k1; j++) {                                                                      \
            const T *w = panel + j * PANEL;                                                                      \
            for (credit += prefetch.lines; credit >= prefetch.steps; credit -= prefetch.steps) {                 \
                _mm_prefetch(prefetch.next, _MM_HINT_T1);                                                        \
                prefetch.next += CACHE_LINE;                                                                     \
            }                                                                                                    \
            vfloat w_lo = VEC(w), w_hi = VEC(w + VEC_WIDTH);                                                     \
            _Pragma("GCC unroll 12") for (int m = 0; m < rows; m++) {                                            \
                vfloat xm = vset1(x[m * k + j]);                                                                 \
                lo[m] = vfmadd(xm, w_lo, lo[m]);                                                                 \
                hi[m] = vfmadd(xm, w_hi, hi[m]);                                                                 \
            }                                                                                                    \
        }                                                                                                        \
        _Pragma("GCC unroll 12") for (int m = 0; m < rows; m++) {                                                \
            float *row = sums + m * PANEL;                                                                       \
            vstore(row, first ? lo[m] : vadd(vload(row), lo[m]));                                                \
            vstore(row + VEC_WIDTH, first ? hi[m] : vadd(vload(row + VEC_WIDTH), hi[m]));                        \
        }                                                                                                        \
    }

PANEL_TILE(panel_tile_f32, float, vload)
PANEL_TILE(panel_tile_bf16, uint16_t, vload_bf16)

/* On AVX512-BF16 CPUs, bf16 panels hold k in pairs, [n / 32][ceil(k / 2)][32][2] (a zero pads an
 * odd k): one vdpbf16ps multiplies a row's two bf16 values by two weights in each of 16 columns
 * and adds both products to the column's fp32 sum, twice the fp32 FMA's products per cycle (AMD
 * Zen 4: 225 against 115 GFLOP/s a core). The products of bf16 values are exact in fp32 either
 * way. */
#if defined(__AVX512BF16__)
#define PANEL_BF16_PAIRS 1

/* One pair row of the panel (at `w`) times the pair of each of `rows` rows, added to their sums;
 * `pairs` [rows], each row's two bf16 values as one 32-bit word (the first in the low half). */
static inline __attribute__((always_inline)) void dot_pair_row(__m512 *lo, __m512 *hi, const uint16_t *w,
                                                               const uint32_t *pairs, int rows) {
    __m512bh w_lo = (__m512bh)_mm512_loadu_si512(w), w_hi = (__m512bh)_mm512_loadu_si512(w + PANEL);
    _Pragma("GCC unroll 12") for (int m = 0; m < rows; m++) {
        __m512bh xm = (__m512bh)_mm512_set1_epi32((int)pairs[m]);
        lo[m] = _mm512_dpbf16_ps(lo[m], xm, w_lo);
        hi[m] = _mm512_dpbf16_ps(hi[m], xm, w_hi);
    }
}

/* PANEL_TILE for pair panels and bf16 x: k in [k0, k1), k0 even; an odd k's last value pairs with 0. */
static inline __attribute__((always_inline)) void panel_tile_bf16_pairs(const uint16_t *x, int64_t k, int64_t k0,
                                                                        int64_t k1, const uint16_t *panel,
                                                                        float *sums, int rows, int first,
                                                                        Prefetch prefetch) {
    __m512 lo[TILE_ROWS], hi[TILE_ROWS];
    uint32_t pairs[TILE_ROWS];
    int64_t credit = 0, j = k0;
    _Pragma("GCC unroll 12") for (int m = 0; m < rows; m++) lo[m] = hi[m] = vzero();
    for (; j + 1 < k1; j += 2) {
        for (credit += prefetch.lines; credit >= prefetch.steps; credit -= prefetch.steps) {
            _mm_prefetch(prefetch.next, _MM_HINT_T1);
            prefetch.next += CACHE_LINE;
        }
        _Pragma("GCC unroll 12") for (int m = 0; m < rows; m++) memcpy(&pairs[m], x + m * k + j, sizeof pairs[m]);
        dot_pair_row(lo, hi, panel + j * PANEL, pairs, rows);
    }
    if (j < k1) {
        _Pragma("GCC unroll 12") for (int m = 0; m < rows; m++) pairs[m] = x[m * k + j];
        dot_pair_row(lo, hi, panel + j * PANEL, pairs, rows);
    }
    _Pragma("GCC unroll 12") for (int m = 0; m < rows; m++) {
        float *row = sums + m * PANEL;
        vstore(row, first ? lo[m] : vadd(vload(row), lo[m]));
        vstore(row + VEC_WIDTH, first ? hi[m] : vadd(vload(row + VEC_WIDTH), hi[m]));
    }
}
#else
#define PANEL_BF16_PAIRS 0
#endif

/* Whether bf16 panels hold k in pairs (1) or one k per row (0). */
int panel_bf16_pairs(void) { return PANEL_BF16_PAIRS; }

/* k as the panels of this element type hold it: rounded up to pairs for bf16 pair panels. */
static inline int64_t panel_depth(int64_t k, int bf16) { return bf16 && PANEL_BF16_PAIRS ? (k + 1) & ~(int64_t)1 : k; }

/* The tile for `rows` rows, a constant in each case so the register arrays unroll. */
#define TILE_CASE(TILE, R) \
    case R: TILE(x, k, k0, k1, panel, sums, R, first, prefetch); break;
#if TILE_ROWS == 12
#define PANEL_TILE_SWITCH(TILE, rows)                                                                            \
    switch (rows) {                                                                                              \
        TILE_CASE(TILE, 1) TILE_CASE(TILE, 2) TILE_CASE(TILE, 3) TILE_CASE(TILE, 4) TILE_CASE(TILE, 5)           \
        TILE_CASE(TILE, 6) TILE_CASE(TILE, 7) TILE_CASE(TILE, 8) TILE_CASE(TILE, 9) TILE_CASE(TILE, 10)          \
        TILE_CASE(TILE, 11) TILE_CASE(TILE, 12)                                                                  \
    }
#else
#define PANEL_TILE_SWITCH(TILE, rows)                                                                            \
    switch (rows) {                                                                                              \
        TILE_CASE(TILE, 1) TILE_CASE(TILE, 2) TILE_CASE(TILE, 3) TILE_CASE(TILE, 4) TILE_CASE(TILE, 5)           \
        TILE_CASE(TILE, 6)                                                                                       \
    }
#endif

/* One panel of `k` x PANEL weights times all `m` rows. Each k chunk is read by blocks x
 * (PANEL / TILE_COLUMNS) tile passes; the chunk PREFETCH_CHUNKS_AHEAD further on (the next panel's
 * first chunks once this one ends) is prefetched in equal shares by those passes. */
static void panel_rows(const void *x_all, int64_t m, int64_t k, const void *panel_any, float *sums_all,
                       int bf16) {
    int64_t blocks = (m + TILE_ROWS - 1) / TILE_ROWS;
    int64_t passes = blocks * (PANEL / TILE_COLUMNS);
    int64_t element = bf16 ? sizeof(uint16_t) : sizeof(float);
    int64_t chunk_lines = K_CHUNK * PANEL * element / CACHE_LINE;
    int64_t pass_lines = (chunk_lines + passes - 1) / passes;
    for (int64_t k0 = 0; k0 < k; k0 += K_CHUNK) {
        int64_t k1 = k0 + K_CHUNK < k ? k0 + K_CHUNK : k;
        int first = k0 == 0;
        const char *ahead = (const char *)panel_any + (k0 + PREFETCH_CHUNKS_AHEAD * K_CHUNK) * PANEL * element;
        int64_t pass = 0;
        for (int64_t b = 0; b < blocks; b++)
            for (int64_t c0 = 0; c0 < PANEL; c0 += TILE_COLUMNS, pass++) {
                int64_t r0 = m * b / blocks, r1 = m * (b + 1) / blocks;
                float *sums = sums_all + r0 * PANEL + c0;
                Prefetch prefetch = {ahead + pass * pass_lines * CACHE_LINE, pass_lines, k1 - k0};
                if (bf16 && PANEL_BF16_PAIRS) {
#if PANEL_BF16_PAIRS
                    const uint16_t *x = (const uint16_t *)x_all + r0 * k;
                    const uint16_t *panel = (const uint16_t *)panel_any + 2 * c0;
                    prefetch.steps = (k1 - k0 + 1) / 2;
                    PANEL_TILE_SWITCH(panel_tile_bf16_pairs, (int)(r1 - r0))
#endif
                } else if (bf16) {
                    const float *x = (const float *)x_all + r0 * k;
                    const uint16_t *panel = (const uint16_t *)panel_any + c0;
                    PANEL_TILE_SWITCH(panel_tile_bf16, (int)(r1 - r0))
                } else {
                    const float *x = (const float *)x_all + r0 * k;
                    const float *panel = (const float *)panel_any + c0;
                    PANEL_TILE_SWITCH(panel_tile_f32, (int)(r1 - r0))
                }
            }
    }
}

/* Returns 0, or -1 when a buffer could not be allocated (out is then incomplete). */
#define PANEL_LINEAR(NAME, T, LOAD, STORE, IS_BF16)                                                               \
    int NAME(const T *x, const T *panels, const T *bias, T *out, int64_t m, int64_t n, int64_t k,                \
             int num_threads) {                                                                                  \
        float *wide = NULL;                                                                                      \
        const void *xf = x;                                                                                      \
        if (IS_BF16 && !PANEL_BF16_PAIRS) {                                                                      \
            wide = malloc(sizeof(float) * (size_t)(m * k));                                                      \
            if (wide == NULL) return -1;                                                                         \
            for (int64_t i = 0; i < m * k; i++) wide[i] = LOAD(x, i);                                            \
            xf = wide;                                                                                           \
        }                                                                                                        \
        int failed = 0;                                                                                          \
        _Pragma("omp parallel num_threads(num_threads) reduction(| : failed)") {                                 \
            float *sums = malloc(sizeof(float) * (size_t)(m * PANEL));                                           \
            failed = sums == NULL;                                                                               \
            _Pragma("omp for schedule(static)") for (int64_t g = 0; g < n / PANEL; g++) {                        \
                if (failed) continue;                                                                            \
                panel_rows(xf, m, k, panels + g * PANEL * panel_depth(k, IS_BF16), sums, IS_BF16);               \
                for (int64_t r = 0; r < m; r++)                                                                  \
                    for (int64_t c = 0; c < PANEL; c++) {                                                        \
                        float v = sums[r * PANEL + c];                                                           \
                        STORE(out + r * n + g * PANEL, c, bias == NULL ? v : v + LOAD(bias, g * PANEL + c));     \
                    }                                                                                            \
            }                                                                                                    \
            free(sums);                                                                                          \
        }                                                                                                        \
        free(wide);                                                                                              \
        return failed ? -1 : 0;                                                                                  \
    }

PANEL_LINEAR(panel_linear, float, load_f32, store_f32, 0)
PANEL_LINEAR(panel_linear_bf16, uint16_t, load_bf16, store_bf16, 1)
#endif

/* Causal attention of prefill chunks with nothing cached: sequence i's rows are
 * [starts[i], starts[i] + lens[i]) of q [., num_heads, D], k and v [., num_kv_heads, D] (rows
 * q_stride and kv_stride elements apart: views into the fused q/k/v output) and out (contiguous
 * [., num_heads, D]). A task is a block of QUERY_BLOCK positions of one sequence for the query
 * heads of one KV head: their keys, transposed into a buffer, feed tiles of SCORE_ROWS x 2
 * vectors of scores (12 x 32 on AVX-512, 6 x 16 on AVX2; vertical FMAs over the keys, one running
 * sum per score over D, in order); each row's softmax is two-pass as in the decode kernel; the
 * values then sum in tiles of VALUE_ROWS x 4 vectors, each V row's slice read once per tile. Every
 * product and sum in fp32 (bf16 on AVX512-BF16 CPUs: below). SDPA's CPU kernel ran 55-80 GFLOP/s on
 * SmolLM2's prefill shapes. */
#if defined(HAVE_VECTORS)
#define QUERY_BLOCK 8
#if VEC_REGISTERS == 32
#define SCORE_ROWS 12
#else
#define SCORE_ROWS 6
#endif
#define SCORE_KEYS (2 * VEC_WIDTH)
#define VALUE_ROWS (SCORE_ROWS / 2)
#define VALUE_COLUMNS (4 * VEC_WIDTH)

static inline int64_t round_up(int64_t n, int64_t to) { return (n + to - 1) / to * to; }

/* Each score row [keys_pad] of a task becomes its causal softmax: row r (of `real`, then zero
 * padding rows) is the query at position p0 + r % block, which sees keys [0, p0 + r % block]; the
 * keys it does not see, up to round_up(keys, 2), weigh 0. */
static void causal_softmax_rows(float *scores, int64_t rows, int64_t keys, int64_t keys_pad, int64_t real,
                                int64_t block, int64_t p0) {
    for (int64_t r = 0; r < rows; r++) {
        float *row = scores + r * keys_pad;
        int64_t seen = r < real ? p0 + r % block + 1 : 0;
        if (seen) {
            /* Whole vectors: the keys past `seen` weigh exp(-inf) = 0 (a scalar tail took a third). */
            int64_t width = round_up(seen, 16);
            for (int64_t j = seen; j < width; j++) row[j] = -INFINITY;
            softmax_row(row, width);
        }
        for (int64_t j = seen; j < round_up(keys, 2); j++) row[j] = 0.0f;
    }
}

/* scores [SCORE_ROWS][keys_pad] columns [k0, k0 + SCORE_KEYS) = scale * queries [SCORE_ROWS][D] .
 * keys_t [D][keys_stride] */
static void score_tile(const float *queries, const float *keys_t, int64_t head_dim, int64_t keys_stride,
                       int64_t keys_pad, int64_t k0, float scale, float *scores) {
    vfloat lo[SCORE_ROWS], hi[SCORE_ROWS];
#pragma GCC unroll 12
    for (int r = 0; r < SCORE_ROWS; r++) lo[r] = hi[r] = vzero();
    for (int64_t d = 0; d < head_dim; d++) {
        const float *keys = keys_t + d * keys_stride + k0;
        vfloat k_lo = vload(keys), k_hi = vload(keys + VEC_WIDTH);
#pragma GCC unroll 12
        for (int r = 0; r < SCORE_ROWS; r++) {
            vfloat qd = vset1(queries[r * head_dim + d]);
            lo[r] = vfmadd(qd, k_lo, lo[r]);
            hi[r] = vfmadd(qd, k_hi, hi[r]);
        }
    }
    vfloat s = vset1(scale);
#pragma GCC unroll 12
    for (int r = 0; r < SCORE_ROWS; r++) {
        vstore(scores + r * keys_pad + k0, vmul(lo[r], s));
        vstore(scores + r * keys_pad + k0 + VEC_WIDTH, vmul(hi[r], s));
    }
}

/* Columns [c0, c0 + VALUE_COLUMNS) of out rows [VALUE_ROWS][head_dim] = probs [VALUE_ROWS]
 * [keys_pad] (zero past each row's last key) . v rows [keys] */
#define VALUE_TILE(NAME, T, VEC)                                                                                  \
    static void NAME(const float *probs, int64_t keys_pad, int64_t keys, const T *v, int64_t kv_stride,          \
                     int64_t head_dim, int64_t c0, float *outs) {                                                \
        vfloat acc[VALUE_ROWS][4];                                                                               \
        _Pragma("GCC unroll 8") for (int r = 0; r < VALUE_ROWS; r++)                                             \
            _Pragma("GCC unroll 4") for (int i = 0; i < 4; i++) acc[r][i] = vzero();                             \
        for (int64_t j = 0; j < keys; j++) {                                                                     \
            vfloat vj[4];                                                                                        \
            _Pragma("GCC unroll 4") for (int i = 0; i < 4; i++) vj[i] = VEC(v + j * kv_stride + c0 + VEC_WIDTH * i); \
            _Pragma("GCC unroll 8") for (int r = 0; r < VALUE_ROWS; r++) {                                       \
                vfloat p = vset1(probs[r * keys_pad + j]);                                                       \
                _Pragma("GCC unroll 4") for (int i = 0; i < 4; i++) acc[r][i] = vfmadd(p, vj[i], acc[r][i]);     \
            }                                                                                                    \
        }                                                                                                        \
        _Pragma("GCC unroll 8") for (int r = 0; r < VALUE_ROWS; r++)                                             \
            _Pragma("GCC unroll 4") for (int i = 0; i < 4; i++)                                                  \
                vstore(outs + r * head_dim + c0 + VEC_WIDTH * i, acc[r][i]);                                     \
    }

/* One task: the query heads of KV head g at positions [p0, p1) of a sequence starting at row `start`. */
#define PREFILL_TASK(NAME, T, LOAD, STORE, VEC)                                                                   \
    VALUE_TILE(NAME##_values, T, VEC)                                                                            \
    /* keys_t [D][keys_pad]: KV head g's keys of the sequence at row `start`, transposed, zero padded. */    \
    static void NAME##_transpose(const T *k, const T *v, int64_t start, int64_t len, int64_t g, int64_t head_dim, \
                                 int64_t kv_stride, float *keys_t) {                                             \
        (void)v;                                                                                                 \
        int64_t keys_pad = round_up(len, SCORE_KEYS);                                                            \
        const T *keys = k + start * kv_stride + g * head_dim;                                                    \
        for (int64_t d = 0; d < head_dim; d++) {                                                                 \
            float *dst = keys_t + d * keys_pad;                                                                  \
            for (int64_t j = 0; j < len; j++) dst[j] = LOAD(keys + j * kv_stride, d);                            \
            for (int64_t j = len; j < keys_pad; j++) dst[j] = 0.0f;                                              \
        }                                                                                                        \
    }                                                                                                            \
    /* Its keys_t rows are keys_stride apart; scores over the first round_up(p1, SCORE_KEYS) keys. */    \
    static void NAME##_task(const T *q, const float *keys_t, int64_t keys_stride, const T *v, T *out,            \
                            int64_t start, int64_t p0, int64_t p1, int64_t g, int64_t group, int64_t num_heads,  \
                            int64_t head_dim, int64_t q_stride, int64_t kv_stride, float scale, float *buf) {    \
        int64_t keys = p1, keys_pad = round_up(keys, SCORE_KEYS), block = p1 - p0;                               \
        int64_t rows = round_up(group * block, SCORE_ROWS);                                                      \
        float *queries = buf, *scores = queries + rows * head_dim, *outs = scores + rows * keys_pad;             \
        /* Row r: head g * group + r / block at position p0 + r % block; padding rows are zero. */              \
        for (int64_t r = 0; r < rows; r++) {                                                                     \
            float *dst = queries + r * head_dim;                                                                 \
            const T *src = q + (start + p0 + r % block) * q_stride + (g * group + r / block) * head_dim;         \
            if (r < group * block)                                                                               \
                for (int64_t d = 0; d < head_dim; d++) dst[d] = LOAD(src, d);                                    \
            else                                                                                                 \
                for (int64_t d = 0; d < head_dim; d++) dst[d] = 0.0f;                                            \
        }                                                                                                        \
        for (int64_t r0 = 0; r0 < rows; r0 += SCORE_ROWS)                                                        \
            for (int64_t k0 = 0; k0 < keys_pad; k0 += SCORE_KEYS)                                                \
                score_tile(queries + r0 * head_dim, keys_t, head_dim, keys_stride, keys_pad, k0, scale,          \
                           scores + r0 * keys_pad);                                                              \
        causal_softmax_rows(scores, rows, keys, keys_pad, group * block, block, p0);                             \
        const T *vg = v + start * kv_stride + g * head_dim;                                                      \
        for (int64_t r0 = 0; r0 < rows; r0 += VALUE_ROWS)                                                       \
            for (int64_t c0 = 0; c0 < head_dim; c0 += VALUE_COLUMNS)                                             \
                NAME##_values(scores + r0 * keys_pad, keys_pad, keys, vg, kv_stride, head_dim, c0,                 \
                              outs + r0 * head_dim);                                                             \
        for (int64_t r = 0; r < group * block; r++) {                                                            \
            T *dst = out + ((start + p0 + r % block) * num_heads + g * group + r / block) * head_dim;            \
            const float *src = outs + r * head_dim;                                                              \
            for (int64_t d = 0; d < head_dim; d++) STORE(dst, d, src[d]);                                        \
        }                                                                                                        \
    }

/* The kernel over NAME##_transpose and NAME##_task. Returns 0; -1 when a buffer could not be
 * allocated (out is then incomplete); -2 when head_dim is not 64 or 128 (nothing done). */
#define PREFILL_KERNEL(NAME, T)                                                                                   \
    int NAME(const T *q, const T *k, const T *v, T *out, const int64_t *starts, const int64_t *lens,             \
             int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t q_stride,      \
             int64_t kv_stride, float scale, int num_threads) {                                                  \
        if (head_dim != 64 && head_dim != 128) return -2;                                                        \
        int64_t group = num_heads / num_kv_heads, longest = 1, tasks = 0;                                        \
        for (int64_t i = 0; i < num_seqs; i++) {                                                                 \
            longest = lens[i] > longest ? lens[i] : longest;                                                     \
            tasks += num_kv_heads * ((lens[i] + QUERY_BLOCK - 1) / QUERY_BLOCK);                                 \
        }                                                                                                        \
        int64_t *task_seq = malloc(sizeof(int64_t) * (size_t)(2 * tasks)), *task_block = task_seq + tasks;      \
        if (task_seq == NULL) return -1;                                                                         \
        /* The last blocks (most keys) first, so the short ones fill in at the end. */                          \
        int64_t n = 0;                                                                                           \
        for (int64_t b = (longest + QUERY_BLOCK - 1) / QUERY_BLOCK - 1; b >= 0; b--)                             \
            for (int64_t i = 0; i < num_seqs; i++)                                                               \
                if (b * QUERY_BLOCK < lens[i])                                                                   \
                    for (int64_t g = 0; g < num_kv_heads; g++, n++) task_seq[n] = i * num_kv_heads + g, task_block[n] = b; \
        /* Every sequence's keys transposed once, [seq][kv head][D][round_up(len, SCORE_KEYS)]. */              \
        int64_t *offsets = malloc(sizeof(int64_t) * (size_t)(num_seqs + 1));                                     \
        if (offsets == NULL) return free(task_seq), -1;                                                          \
        offsets[0] = 0;                                                                                          \
        for (int64_t i = 0; i < num_seqs; i++)                                                                   \
            offsets[i + 1] = offsets[i] + num_kv_heads * head_dim * round_up(lens[i], SCORE_KEYS);               \
        float *keys_t = malloc(sizeof(float) * (size_t)offsets[num_seqs]);                                       \
        if (keys_t == NULL) return free(offsets), free(task_seq), -1;                                            \
        int64_t keys_pad = round_up(longest, SCORE_KEYS), rows = round_up(group * QUERY_BLOCK, SCORE_ROWS);       \
        size_t floats = (size_t)(rows * head_dim + rows * keys_pad + rows * head_dim);                           \
        int failed = 0;                                                                                          \
        _Pragma("omp parallel num_threads(num_threads) reduction(| : failed)") {                                 \
            float *buf = malloc(sizeof(float) * floats);                                                         \
            failed = buf == NULL;                                                                                \
            _Pragma("omp for schedule(dynamic, 1)") for (int64_t t = 0; t < num_seqs * num_kv_heads; t++) {      \
                int64_t i = t / num_kv_heads, g = t % num_kv_heads, stride = round_up(lens[i], SCORE_KEYS);      \
                NAME##_transpose(k, v, starts[i], lens[i], g, head_dim, kv_stride,                               \
                                 keys_t + offsets[i] + g * head_dim * stride);                                   \
            }                                                                                                    \
            _Pragma("omp for schedule(dynamic, 1)") for (int64_t t = 0; t < tasks; t++) {                        \
                if (failed) continue;                                                                            \
                int64_t i = task_seq[t] / num_kv_heads, g = task_seq[t] % num_kv_heads;                          \
                int64_t p0 = task_block[t] * QUERY_BLOCK, p1 = p0 + QUERY_BLOCK < lens[i] ? p0 + QUERY_BLOCK : lens[i]; \
                int64_t stride = round_up(lens[i], SCORE_KEYS);                                                  \
                NAME##_task(q, keys_t + offsets[i] + g * head_dim * stride, stride, v, out, starts[i], p0, p1, g, \
                            group, num_heads, head_dim, q_stride, kv_stride, scale, buf);                        \
            }                                                                                                    \
            free(buf);                                                                                           \
        }                                                                                                        \
        free(keys_t);                                                                                            \
        free(offsets);                                                                                           \
        free(task_seq);                                                                                          \
        return failed ? -1 : 0;                                                                                  \
    }

PREFILL_TASK(prefill_attention, float, load_f32, store_f32, vload)
PREFILL_KERNEL(prefill_attention, float)

#if PANEL_BF16_PAIRS
/* bf16 on AVX512-BF16 CPUs: both products by vdpbf16ps, two bf16 values a lane, the sums in fp32.
 * The keys are laid out as [D / 2][keys_pad][2] (two d of one key side by side), the values after
 * them as [keys_pad / 2][D][2] (one d of two keys), and the probabilities are rounded to bf16
 * before they weigh the values, as torch's flash attention rounds them for bf16. On the bench's 32
 * prompts (SmolLM2, Zen 4), four alternating runs: 10.0-14.7 -> 7.0-9.7 ms a layer. */
static void prefill_attention_bf16_transpose(const uint16_t *k, const uint16_t *v, int64_t start, int64_t len, int64_t g,
                                             int64_t head_dim, int64_t kv_stride, float *prepared) {
    int64_t keys_pad = round_up(len, SCORE_KEYS);
    uint32_t *key_pairs = (uint32_t *)prepared; /* [D / 2][keys_pad], a pair of d in each */
    uint16_t *values = (uint16_t *)(key_pairs + head_dim / 2 * keys_pad);
    const uint16_t *keys = k + start * kv_stride + g * head_dim, *rows = v + start * kv_stride + g * head_dim;
    /* One gather takes a pair of d from each of 16 keys (a mask leaves the keys past len zero). */
    __m512i key_offsets = _mm512_mullo_epi32(
        _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi32((int)kv_stride));
    for (int64_t j0 = 0; j0 < keys_pad; j0 += VEC_WIDTH) {
        int64_t valid = len - j0 < 0 ? 0 : len - j0 > VEC_WIDTH ? VEC_WIDTH : len - j0;
        __mmask16 present = (__mmask16)((1u << valid) - 1);
        for (int64_t pair = 0; pair < head_dim / 2; pair++) {
            __m512i got = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), present, key_offsets,
                                                      keys + j0 * kv_stride + 2 * pair, 2);
            _mm512_storeu_si512(key_pairs + pair * keys_pad + j0, got);
        }
    }
    /* Two value rows interleaved, 32 d at a time: lane 2i of the first half takes d = i of the
     * first row, lane 2i + 1 the same d of the second. */
    uint16_t first_half[32], second_half[32];
    for (int i = 0; i < 16; i++) {
        first_half[2 * i] = (uint16_t)i, first_half[2 * i + 1] = (uint16_t)(32 + i);
        second_half[2 * i] = (uint16_t)(16 + i), second_half[2 * i + 1] = (uint16_t)(48 + i);
    }
    __m512i lo = _mm512_loadu_si512(first_half), hi = _mm512_loadu_si512(second_half);
    for (int64_t pair = 0; pair < keys_pad / 2; pair++) {
        int64_t j = 2 * pair;
        for (int64_t d = 0; d < head_dim; d += 32) {
            __m512i a = j < len ? _mm512_loadu_si512(rows + j * kv_stride + d) : _mm512_setzero_si512();
            __m512i b = j + 1 < len ? _mm512_loadu_si512(rows + (j + 1) * kv_stride + d) : _mm512_setzero_si512();
            uint16_t *dst = values + (pair * head_dim + d) * 2;
            _mm512_storeu_si512(dst, _mm512_permutex2var_epi16(a, lo, b));
            _mm512_storeu_si512(dst + 32, _mm512_permutex2var_epi16(a, hi, b));
        }
    }
}

static inline __m512bh bf16_pair(const uint16_t *p) {
    uint32_t pair;
    memcpy(&pair, p, sizeof pair);
    return (__m512bh)_mm512_set1_epi32((int)pair);
}

static void score_tile_bf16_pairs(const uint16_t *queries, const uint16_t *keys_t, int64_t head_dim,
                                  int64_t keys_stride, int64_t keys_pad, int64_t k0, float scale, float *scores) {
    vfloat lo[SCORE_ROWS], hi[SCORE_ROWS];
#pragma GCC unroll 12
    for (int r = 0; r < SCORE_ROWS; r++) lo[r] = hi[r] = vzero();
    for (int64_t d = 0; d < head_dim; d += 2) {
        const uint16_t *keys = keys_t + (d / 2 * keys_stride + k0) * 2;
        __m512bh k_lo = (__m512bh)_mm512_loadu_si512(keys), k_hi = (__m512bh)_mm512_loadu_si512(keys + 2 * VEC_WIDTH);
#pragma GCC unroll 12
        for (int r = 0; r < SCORE_ROWS; r++) {
            __m512bh qd = bf16_pair(queries + r * head_dim + d);
            lo[r] = _mm512_dpbf16_ps(lo[r], qd, k_lo);
            hi[r] = _mm512_dpbf16_ps(hi[r], qd, k_hi);
        }
    }
    vfloat s = vset1(scale);
#pragma GCC unroll 12
    for (int r = 0; r < SCORE_ROWS; r++) {
        vstore(scores + r * keys_pad + k0, vmul(lo[r], s));
        vstore(scores + r * keys_pad + k0 + VEC_WIDTH, vmul(hi[r], s));
    }
}

/* Columns [c0, c0 + VALUE_COLUMNS) of out rows [VALUE_ROWS][head_dim] = probability pairs (row r's
 * at probs + r * keys_pad, as bf16 pairs) . values [keys_pad / 2][head_dim][2]. */
static void values_bf16_pairs(const float *probs, int64_t keys_pad, int64_t keys, const uint16_t *values,
                              int64_t head_dim, int64_t c0, float *outs) {
    vfloat acc[VALUE_ROWS][4];
#pragma GCC unroll 8
    for (int r = 0; r < VALUE_ROWS; r++)
#pragma GCC unroll 4
        for (int i = 0; i < 4; i++) acc[r][i] = vzero();
    for (int64_t pair = 0; pair < (keys + 1) / 2; pair++) {
        const uint16_t *vj = values + (pair * head_dim + c0) * 2;
        __m512bh v[4];
#pragma GCC unroll 4
        for (int i = 0; i < 4; i++) v[i] = (__m512bh)_mm512_loadu_si512(vj + 2 * VEC_WIDTH * i);
#pragma GCC unroll 8
        for (int r = 0; r < VALUE_ROWS; r++) {
            __m512bh p = bf16_pair((const uint16_t *)(probs + r * keys_pad) + 2 * pair);
#pragma GCC unroll 4
            for (int i = 0; i < 4; i++) acc[r][i] = _mm512_dpbf16_ps(acc[r][i], p, v[i]);
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < VALUE_ROWS; r++)
#pragma GCC unroll 4
        for (int i = 0; i < 4; i++) vstore(outs + r * head_dim + c0 + VEC_WIDTH * i, acc[r][i]);
}

/* In place: the first round_up(n, 32) values of `row` as bf16, rounded to nearest even. */
static void narrow_row_bf16(float *row, int64_t n) {
    for (int64_t j = 0; j < n; j += 2 * VEC_WIDTH) {
        __m512bh narrowed = _mm512_cvtne2ps_pbh(vload(row + j + VEC_WIDTH), vload(row + j));
        _mm512_storeu_si512((uint16_t *)row + j, (__m512i)narrowed);
    }
}

static void prefill_attention_bf16_task(const uint16_t *q, const float *prepared, int64_t keys_stride,
                                        const uint16_t *v, uint16_t *out, int64_t start, int64_t p0, int64_t p1,
                                        int64_t g, int64_t group, int64_t num_heads, int64_t head_dim,
                                        int64_t q_stride, int64_t kv_stride, float scale, float *buf) {
    (void)v, (void)kv_stride;
    const uint16_t *keys_t = (const uint16_t *)prepared, *values = keys_t + head_dim * keys_stride;
    int64_t keys = p1, keys_pad = round_up(keys, SCORE_KEYS), block = p1 - p0;
    int64_t rows = round_up(group * block, SCORE_ROWS);
    uint16_t *queries = (uint16_t *)buf;
    float *scores = buf + rows * head_dim, *outs = scores + rows * keys_pad;
    for (int64_t r = 0; r < rows; r++) {
        uint16_t *dst = queries + r * head_dim;
        const uint16_t *src = q + (start + p0 + r % block) * q_stride + (g * group + r / block) * head_dim;
        if (r < group * block)
            memcpy(dst, src, sizeof(uint16_t) * (size_t)head_dim);
        else
            memset(dst, 0, sizeof(uint16_t) * (size_t)head_dim);
    }
    for (int64_t r0 = 0; r0 < rows; r0 += SCORE_ROWS)
        for (int64_t k0 = 0; k0 < keys_pad; k0 += SCORE_KEYS)
            score_tile_bf16_pairs(queries + r0 * head_dim, keys_t, head_dim, keys_stride, keys_pad, k0, scale,
                                  scores + r0 * keys_pad);
    causal_softmax_rows(scores, rows, keys, keys_pad, group * block, block, p0);
    for (int64_t r = 0; r < rows; r++) narrow_row_bf16(scores + r * keys_pad, keys);
    for (int64_t r0 = 0; r0 < rows; r0 += VALUE_ROWS)
        for (int64_t c0 = 0; c0 < head_dim; c0 += VALUE_COLUMNS)
            values_bf16_pairs(scores + r0 * keys_pad, keys_pad, keys, values, head_dim, c0, outs + r0 * head_dim);
    for (int64_t r = 0; r < group * block; r++) {
        uint16_t *dst = out + ((start + p0 + r % block) * num_heads + g * group + r / block) * head_dim;
        for (int64_t d = 0; d < head_dim; d++) store_bf16(dst, d, outs[r * head_dim + d]);
    }
}
#else
PREFILL_TASK(prefill_attention_bf16, uint16_t, load_bf16, store_bf16, vload_bf16)
#endif
PREFILL_KERNEL(prefill_attention_bf16, uint16_t)
#endif
