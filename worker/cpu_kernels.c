/* CPU kernels: paged decode attention, and RMSNorm.
 *
 * Paged decode attention: one query token per sequence, K/V read from their blocks in place.
 *
 * Layouts (all fp32 / int64, contiguous):
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

/* glibc's libmvec has a vector expf. Declared `omp declare simd`, the softmax loop calls it a
 * vector at a time; the scalar expf took a third of the kernel's time on SmolLM2. The build
 * defines ZS_VECTOR_EXPF where it links libmvec (x86-64, glibc >= 2.22). */
#ifdef ZS_VECTOR_EXPF
#pragma omp declare simd notinbranch
float expf(float);
#endif

static inline float dot(const float *a, const float *b, int64_t n) {
    float sum = 0.0f;
    /* The simd reduction lets the compiler split the sum into vector lanes without -ffast-math. */
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < n; i++) sum += a[i] * b[i];
    return sum;
}

static inline void axpy(float *y, float a, const float *x, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++) y[i] += a * x[i];
}

struct seq {
    const int64_t *blocks; /* this sequence's row of block_tables */
    int64_t len, num_heads, group, head_dim, row, block_size;
};

/* The cache row (all kv heads) of token t. */
static inline const float *token_row(const float *cache, const struct seq *s, int64_t t) {
    int64_t slot = s->blocks[t / s->block_size] * s->block_size + t % s->block_size;
    return cache + slot * s->row;
}

/* p [num_heads, len]: the scaled scores of every query head against every key. */
static void scores(float *p, const float *q, const float *k_cache, const struct seq *s, float scale) {
    for (int64_t t = 0; t < s->len; t++) {
        const float *k = token_row(k_cache, s, t);
        for (int64_t h = 0; h < s->num_heads; h++)
            p[h * s->len + t] = dot(q + h * s->head_dim, k + h / s->group * s->head_dim, s->head_dim) * scale;
    }
}

/* In place: each row of p [rows, n] becomes its softmax. */
static void softmax_rows(float *p, int64_t rows, int64_t n) {
    for (int64_t h = 0; h < rows; h++) {
        float *row = p + h * n;
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
}

/* out [num_heads, head_dim] = probabilities p [num_heads, len] times the value rows. */
static void weighted_values(float *out, const float *p, const float *v_cache, const struct seq *s) {
    for (int64_t i = 0; i < s->num_heads * s->head_dim; i++) out[i] = 0.0f;
    for (int64_t t = 0; t < s->len; t++) {
        const float *v = token_row(v_cache, s, t);
        for (int64_t h = 0; h < s->num_heads; h++)
            axpy(out + h * s->head_dim, p[h * s->len + t], v + h / s->group * s->head_dim, s->head_dim);
    }
}

/* Returns 0, or -1 when a score buffer could not be allocated (out is then incomplete). */
int paged_decode_attention(const float *q, const float *k_cache, const float *v_cache, const int64_t *block_tables,
                           const int64_t *context_lens, float *out, int64_t num_seqs, int64_t num_heads,
                           int64_t num_kv_heads, int64_t head_dim, int64_t max_blocks, int64_t block_size,
                           float scale, int num_threads) {
    int64_t longest = 1;
    for (int64_t i = 0; i < num_seqs; i++) longest = context_lens[i] > longest ? context_lens[i] : longest;
    int failed = 0;
    /* Contexts differ in length, so sequences are handed out one at a time. */
#pragma omp parallel num_threads(num_threads) reduction(| : failed)
    {
        float *p = malloc(sizeof(float) * (size_t)(num_heads * longest));
        failed = p == NULL;
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < num_seqs; i++) {
            if (failed) continue;
            struct seq s = {block_tables + i * max_blocks, context_lens[i], num_heads, num_heads / num_kv_heads,
                            head_dim, num_kv_heads * head_dim, block_size};
            int64_t first = i * num_heads * head_dim;
            scores(p, q + first, k_cache, &s, scale);
            softmax_rows(p, num_heads, s.len);
            weighted_values(out + first, p, v_cache, &s);
        }
        free(p);
    }
    return failed ? -1 : 0;
}

/* RMSNorm of `rows` contiguous rows of `hidden` floats: out = weight * (x / sqrt(mean(x^2) + eps)),
 * transformers' formula. torch runs it as six kernels that each allocate; at decode sizes the
 * launches cost more than the arithmetic. */
void rms_norm(const float *x, const float *weight, float *out, int64_t rows, int64_t hidden, float eps,
              int num_threads) {
#pragma omp parallel for num_threads(num_threads) if (rows * hidden >= 65536)
    for (int64_t r = 0; r < rows; r++) {
        const float *row = x + r * hidden;
        float *dst = out + r * hidden;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < hidden; i++) sum += row[i] * row[i];
        float inv = 1.0f / sqrtf(sum / (float)hidden + eps);
#pragma omp simd
        for (int64_t i = 0; i < hidden; i++) dst[i] = weight[i] * (row[i] * inv);
    }
}
