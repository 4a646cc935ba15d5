// Sampling on the device: one block of SAMPLE_THREADS per row of the step's [S, vocab]
// logits picks the row's token (greedy, or penalties, temperature, top-k, top-p, min-p
// and a seeded draw) and, when asked, its log-prob and the top-N alternatives. Only the
// [S, out_width] result goes back to the host.
//
// The draw is src/seeded_draw.rs's, operation for operation, so that the CPU sampler
// and this kernel give the same token for the same logits and seed: Philox4x32-10
// keyed by the seed, counted by (token, position); Gumbel-max (an argmax, lowest id on
// ties); the one sum (top-p's mass) added per thread in index order and then thread by
// thread in order (the bisection over the distribution's head when it is small enough:
// s_top_p_floor); exp and ln as our own polynomials of __fadd_rn-style operations
// (never fused into FMAs, whatever --use_fast_math says); anything that could be
// subnormal flushed, so flush-to-zero changes nothing.
//
// Per row, `meta` holds SAMPLE_ROW_WORDS words (src/sample_kernel.rs packs them):
//   0 flags (1 greedy, 2 mask, 4 top-p, 8 log-probs)   1 temperature   2 top_k
//   3 top_p   4 min_p   5 repetition   6 frequency   7 presence (f32 bits)
//   8-9 seed (lo, hi)   10-11 position (lo, hi)   12 log-prob alternatives
//   13-14 penalty entries (offset, count): pairs (token, output count | seen << 31)
//   15-16 banned ids (offset, count)   17 mask offset (vocab/32 words, bit set: allowed)
//   18 the row's slot in the penalty table (flag 16; src/penalty_table.rs)
// `scratch` is [S, 2 * vocab] f32: the adjusted/scaled row, then e^(s - max).
//
// Penalties come from one of two places. A row with a slot in `table` ([slots, vocab]
// u16 kept on the device across steps: bit 15 "seen" for the repetition penalty, bits
// 0-14 the output count, saturating) reads its counts there, and the kernel adds the
// token it picks (flags 64: count it, 128: mark it seen). The table row is written
// from the listed entries once, at the sequence's first sampled step after it was
// (re)admitted (flag 32); after that nothing about the penalties is uploaded. A row
// without a slot (no penalties, or the table is full) gets its entries listed every
// step and applies them from the list.

#include <stdint.h>

#define SAMPLE_THREADS 256
#define SAMPLE_ROW_WORDS 19
#define FLAG_GREEDY 1u
#define FLAG_MASK 2u
#define FLAG_TOP_P 4u
#define FLAG_LOGPROBS 8u
#define FLAG_TABLE 16u
#define FLAG_TABLE_FILL 32u
#define FLAG_TABLE_COUNT 64u
#define FLAG_TABLE_SEEN 128u
#define TABLE_SEEN 0x8000u
#define TABLE_MAX_COUNT 0x7fffu
#define GUMBEL_BOUND 17.0f

__device__ __forceinline__ float s_flush(float x) {
    return fabsf(x) < 1.17549435e-38f ? 0.0f : x;
}

__device__ __forceinline__ bool s_finite(float x) {
    return x == x && fabsf(x) <= 3.40282347e38f;
}

// One token's penalties, as the CPU sampler applies them: repetition (HF), then
// frequency and presence (OpenAI).
__device__ __forceinline__ float s_penalize(float v, bool seen, unsigned c, float rep, float freq,
                                            float pres) {
    if (seen) v = s_flush(v > 0.0f ? __fdiv_rn(v, rep) : __fmul_rn(v, rep));
    if (c > 0) v = s_flush(__fsub_rn(v, __fadd_rn(__fmul_rn(freq, (float)c), pres)));
    return v;
}

__device__ __forceinline__ float s_exp_neg(float d) {
    if (!(d >= -87.0f)) return 0.0f;
    const float ln2_hi = __uint_as_float(0x3f317200u);
    const float ln2_lo = __uint_as_float(0x35bfbe8eu);
    const float log2e = __uint_as_float(0x3fb8aa3bu);
    float k = floorf(__fadd_rn(__fmul_rn(d, log2e), 0.5f));
    float r = __fsub_rn(__fsub_rn(d, __fmul_rn(k, ln2_hi)), __fmul_rn(k, ln2_lo));
    float p = __uint_as_float(0x3ab60b61u);
    p = __fadd_rn(__fmul_rn(p, r), __uint_as_float(0x3c088889u));
    p = __fadd_rn(__fmul_rn(p, r), __uint_as_float(0x3d2aaaabu));
    p = __fadd_rn(__fmul_rn(p, r), __uint_as_float(0x3e2aaaabu));
    p = __fadd_rn(__fmul_rn(p, r), 0.5f);
    p = __fadd_rn(__fmul_rn(p, r), 1.0f);
    p = __fadd_rn(__fmul_rn(p, r), 1.0f);
    return __fmul_rn(p, __uint_as_float((unsigned)((int)k + 127) << 23));
}

__device__ __forceinline__ float s_ln(float y) {
    unsigned bits = __float_as_uint(y);
    int e = (int)((bits >> 23) & 0xffu) - 127;
    float f = __uint_as_float((bits & 0x007fffffu) | 0x3f800000u);
    if (f > __uint_as_float(0x3fb504f3u)) {
        f = __fmul_rn(f, 0.5f);
        e += 1;
    }
    float z = __fdiv_rn(__fsub_rn(f, 1.0f), __fadd_rn(f, 1.0f));
    float z2 = __fmul_rn(z, z);
    float p = __uint_as_float(0x3de38e39u);
    p = __fadd_rn(__fmul_rn(p, z2), __uint_as_float(0x3e124925u));
    p = __fadd_rn(__fmul_rn(p, z2), __uint_as_float(0x3e4ccccdu));
    p = __fadd_rn(__fmul_rn(p, z2), __uint_as_float(0x3eaaaaabu));
    p = __fadd_rn(__fmul_rn(p, z2), 1.0f);
    float lf = __fmul_rn(__fmul_rn(2.0f, z), p);
    float ef = (float)e;
    return __fadd_rn(__fmul_rn(ef, __uint_as_float(0x3f317200u)),
                     __fadd_rn(__fmul_rn(ef, __uint_as_float(0x35bfbe8eu)), lf));
}

// Philox4x32-10's first output word for (counter, key).
__device__ __forceinline__ unsigned s_philox(unsigned c0, unsigned c1, unsigned c2, unsigned c3,
                                             unsigned k0, unsigned k1) {
    for (int round = 0; round < 10; ++round) {
        if (round > 0) {
            k0 += 0x9E3779B9u;
            k1 += 0xBB67AE85u;
        }
        unsigned hi0 = __umulhi(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
        unsigned hi1 = __umulhi(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
        unsigned n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
        c0 = n0;
        c1 = lo1;
        c2 = n2;
        c3 = lo0;
    }
    return c0;
}

__device__ __forceinline__ float s_gumbel(const unsigned* h, unsigned token) {
    unsigned r = s_philox(token, h[10], h[11], 0x68656172u, h[8], h[9]);
    float u = __fmul_rn((float)((r >> 9) * 2u + 1u), __uint_as_float(0x33800000u));
    return s_flush(-s_ln(-s_ln(u)));
}

__device__ __forceinline__ float s_scaled(float a, float t) {
    if (!s_finite(a)) return -INFINITY;
    float s = s_flush(__fdiv_rn(a, t));
    return fminf(fmaxf(s, -3.40282347e38f), 3.40282347e38f);
}

// (value, index) order of an argmax: larger first, lower index on ties; NaN never wins.
__device__ __forceinline__ bool s_better(float v, unsigned i, float bv, unsigned bi) {
    return v > bv || (v == bv && i < bi);
}

// The block's best (value, index) of each thread's candidate; every thread gets it.
__device__ void s_block_argmax(float& v, unsigned& i, float* red_f, unsigned* red_u) {
    red_f[threadIdx.x] = v;
    red_u[threadIdx.x] = i;
    __syncthreads();
    if (threadIdx.x == 0) {
        float bv = red_f[0];
        unsigned bi = red_u[0];
        for (int t = 1; t < SAMPLE_THREADS; ++t) {
            if (s_better(red_f[t], red_u[t], bv, bi)) {
                bv = red_f[t];
                bi = red_u[t];
            }
        }
        red_f[0] = bv;
        red_u[0] = bi;
    }
    __syncthreads();
    v = red_f[0];
    i = red_u[0];
    __syncthreads();
}

// The fixed-order sum of each thread's partial: thread 0 adds them in turn.
__device__ float s_block_sum(float partial, float* red_f) {
    red_f[threadIdx.x] = partial;
    __syncthreads();
    if (threadIdx.x == 0) {
        float acc = 0.0f;
        for (int t = 0; t < SAMPLE_THREADS; ++t) acc = __fadd_rn(acc, red_f[t]);
        red_f[0] = acc;
    }
    __syncthreads();
    float total = red_f[0];
    __syncthreads();
    return total;
}

__device__ unsigned s_block_count(unsigned n, unsigned* red_u) {
    red_u[threadIdx.x] = n;
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned acc = 0;
        for (int t = 0; t < SAMPLE_THREADS; ++t) acc += red_u[t];
        red_u[0] = acc;
    }
    __syncthreads();
    unsigned total = red_u[0];
    __syncthreads();
    return total;
}

// A finite float's bits as an unsigned that orders the same way.
__device__ __forceinline__ unsigned s_key(float x) {
    unsigned b = __float_as_uint(x);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// Top-p's floor: the largest bit pattern b such that the kept tokens with e >= b hold
// at least top_p of their mass, every mass a fixed-order sum (s_block_sum over each
// thread's tokens in index order). The answer does not depend on where the bisection
// starts, only that the mass there reaches the target (the sums only grow as the floor
// falls), so most of it runs on the head of the distribution in shared memory:
//   1. with the total, a histogram of e by its top bits (8 steps per octave, down to
//      2^-31) holds each bucket's count and approximate mass;
//   2. thread 0 walks it from the top to the first bucket boundary whose mass passes
//      the target with room, if at most HEAD_CAP tokens lie above it;
//   3. one pass checks that boundary's exact mass, another copies the tokens above it
//      into `head`, each thread's own in index order, contiguously;
//   4. the bisection sums the head alone: no pass over the row per step, and its first
//      step tries the boundary above, which the floor is almost always under.
// When the head is too large or its exact mass falls short: the bisection over the row.
#define HEAD_CAP 2048
#define HEAD_BUCKETS 256u
#define HEAD_BASE 768u  // e's bits >> 20 at 2^-31: exponent 96, 8 buckets per octave
#define HEAD_BUCKET_WIDTH (1u << 20)
__device__ unsigned s_top_p_floor(const float* a, float* e, unsigned n, unsigned floor_key,
                                  const unsigned* h, float* red_f, unsigned* hist, float* head_m,
                                  unsigned* lane_n, unsigned* lane_at, float* head,
                                  unsigned* head_floor) {
    const unsigned tid = threadIdx.x;
    hist[tid] = 0;
    head_m[tid] = 0.0f;
    __syncthreads();
    float part = 0.0f;
    for (unsigned i = tid; i < n; i += SAMPLE_THREADS) {
        float s = a[i];
        if (s_finite(s) && s_key(s) >= floor_key) {
            float ei = e[i];
            part = __fadd_rn(part, ei);
            unsigned key = __float_as_uint(ei) / HEAD_BUCKET_WIDTH;
            if (key >= HEAD_BASE) {
                atomicAdd(&hist[key - HEAD_BASE], 1u);
                atomicAdd(&head_m[key - HEAD_BASE], ei);
            }
        } else {
            e[i] = 0.0f;
        }
    }
    const float total = s_block_sum(part, red_f);
    const float target = s_flush(__fmul_rn(__uint_as_float(h[3]), total));
    if (tid == 0) {
        // The approximate masses only choose where to look; the exact sum decides.
        const float want = target * 1.001f;
        float m = 0.0f;
        unsigned count = 0, at = 0;
        for (int b = (int)HEAD_BUCKETS - 1; b >= 0; --b) {
            count += hist[b];
            m += head_m[b];
            if (count > HEAD_CAP) break;
            if (m >= want) {
                at = ((unsigned)b + HEAD_BASE) * HEAD_BUCKET_WIDTH;
                break;
            }
        }
        head_floor[0] = at;
    }
    __syncthreads();
    unsigned lo = 0;
    const unsigned hf = head_floor[0];
    if (hf != 0) {
        float p = 0.0f;
        unsigned c = 0;
        for (unsigned i = tid; i < n; i += SAMPLE_THREADS) {
            float ei = e[i];
            if (__float_as_uint(ei) >= hf) {
                p = __fadd_rn(p, ei);
                c += 1;
            }
        }
        lane_n[tid] = c;
        const float head_mass = s_block_sum(p, red_f);
        if (tid == 0) {
            unsigned acc = 0;
            for (int t = 0; t < SAMPLE_THREADS; ++t) {
                lane_at[t] = acc;
                acc += lane_n[t];
            }
        }
        __syncthreads();
        if (head_mass >= target) {
            float* mine = head + lane_at[tid];
            unsigned j = 0;
            for (unsigned i = tid; i < n; i += SAMPLE_THREADS) {
                float ei = e[i];
                if (__float_as_uint(ei) >= hf) mine[j++] = ei;
            }
            __syncthreads();
            const unsigned len = lane_n[tid];
            unsigned hi = 0x3f800001u;
            lo = hf;
            // The walk stopped below the next bucket boundary, so the floor is most
            // likely under it: tried first, it leaves 20 steps instead of 30.
            unsigned mid = hf + HEAD_BUCKET_WIDTH;
            while (hi - lo > 1) {
                if (mid <= lo || mid >= hi) mid = lo + (hi - lo) / 2;
                float q = 0.0f;
                for (unsigned j2 = 0; j2 < len; ++j2) {
                    float ei = mine[j2];
                    if (__float_as_uint(ei) >= mid) q = __fadd_rn(q, ei);
                }
                if (s_block_sum(q, red_f) >= target) {
                    lo = mid;
                } else {
                    hi = mid;
                }
                mid = lo + (hi - lo) / 2;
            }
            return lo;
        }
    }
    unsigned hi = 0x3f800001u;
    while (hi - lo > 1) {
        unsigned mid = lo + (hi - lo) / 2;
        float row_part = 0.0f;
        for (unsigned i = tid; i < n; i += SAMPLE_THREADS) {
            float ei = e[i];
            if (__float_as_uint(ei) >= mid) row_part = __fadd_rn(row_part, ei);
        }
        if (s_block_sum(row_part, red_f) >= target) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    return lo;
}

extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
    hearth_sample(const float* logits, const unsigned* meta, unsigned short* table, float* scratch,
                  unsigned* out, int vocab, int out_width) {
    __shared__ float red_f[SAMPLE_THREADS];
    __shared__ unsigned red_u[SAMPLE_THREADS];
    __shared__ unsigned hist[256];
    __shared__ float head_m[256];
    __shared__ unsigned lane_n[SAMPLE_THREADS];
    __shared__ unsigned lane_at[SAMPLE_THREADS];
    __shared__ float head[HEAD_CAP];
    __shared__ unsigned head_floor[1];
    const unsigned row = blockIdx.x;
    const unsigned tid = threadIdx.x;
    const unsigned n = (unsigned)vocab;
    const unsigned* h = meta + (size_t)row * SAMPLE_ROW_WORDS;
    const unsigned flags = h[0];
    const float* x = logits + (size_t)row * n;
    float* a = scratch + (size_t)row * 2 * n;
    float* e = a + n;
    const unsigned* mask = (flags & FLAG_MASK) ? meta + h[17] : nullptr;
    unsigned short* trow = (flags & FLAG_TABLE) ? table + (size_t)h[18] * n : nullptr;

    if (trow && (flags & FLAG_TABLE_FILL)) {
        // (Re)admitted: the row from the host's counts, once.
        for (unsigned i = tid; i < n; i += SAMPLE_THREADS) trow[i] = 0;
        __syncthreads();
        for (unsigned j = tid; j < h[14]; j += SAMPLE_THREADS) {
            unsigned tok = meta[h[13] + 2 * j], packed = meta[h[13] + 2 * j + 1];
            unsigned c = packed & 0x7fffffffu;
            if (tok < n)
                trow[tok] = (unsigned short)((c < TABLE_MAX_COUNT ? c : TABLE_MAX_COUNT) |
                                             ((packed >> 31) ? TABLE_SEEN : 0u));
        }
        __syncthreads();
    }
    // The masked, flushed row (penalised from the table); then penalties on the listed
    // tokens; then bans.
    const float rep = __uint_as_float(h[5]), freq = __uint_as_float(h[6]),
                pres = __uint_as_float(h[7]);
    for (unsigned i = tid; i < n; i += SAMPLE_THREADS) {
        float v = s_flush(x[i]);
        if (mask && !((mask[i >> 5] >> (i & 31)) & 1u)) v = -INFINITY;
        if (trow) {
            unsigned w = trow[i];
            if (w) v = s_penalize(v, (w & TABLE_SEEN) != 0, w & TABLE_MAX_COUNT, rep, freq, pres);
        }
        a[i] = v;
    }
    __syncthreads();
    const unsigned listed = trow ? 0u : h[14];
    for (unsigned j = tid; j < listed; j += SAMPLE_THREADS) {
        unsigned tok = meta[h[13] + 2 * j], packed = meta[h[13] + 2 * j + 1];
        if (tok >= n) continue;
        a[tok] = s_penalize(a[tok], (packed >> 31) != 0, packed & 0x7fffffffu, rep, freq, pres);
    }
    __syncthreads();
    for (unsigned j = tid; j < h[16]; j += SAMPLE_THREADS) {
        unsigned tok = meta[h[15] + j];
        if (tok < n) a[tok] = -INFINITY;
    }
    __syncthreads();

    float top_v = -INFINITY;
    unsigned top = 0;
    for (unsigned i = tid; i < n; i += SAMPLE_THREADS) {
        if (s_better(a[i], i, top_v, top)) {
            top_v = a[i];
            top = i;
        }
    }
    s_block_argmax(top_v, top, red_f, red_u);
    unsigned token = top;

    if (!(flags & FLAG_GREEDY) && s_finite(top_v)) {
        const float t = __uint_as_float(h[1]);
        const float m = s_scaled(top_v, t);
        unsigned finite = 0;
        for (unsigned i = tid; i < n; i += SAMPLE_THREADS) {
            float s = s_scaled(a[i], t);
            a[i] = s;
            e[i] = s_finite(s) ? s_exp_neg(s_flush(__fsub_rn(s, m))) : 0.0f;
            finite += s_finite(s) ? 1u : 0u;
        }
        finite = s_block_count(finite, red_u);
        // Top-k: the key of the k-th largest scaled logit, by radix selection.
        unsigned floor_key = 0;
        const unsigned top_k = h[2];
        if (top_k > 0 && top_k < finite) {
            unsigned prefix = 0, known = 0, remaining = top_k;
            for (int shift = 24; shift >= 0; shift -= 8) {
                hist[tid] = 0;
                __syncthreads();
                for (unsigned i = tid; i < n; i += SAMPLE_THREADS) {
                    float s = a[i];
                    if (!s_finite(s)) continue;
                    unsigned k = s_key(s);
                    if ((k & known) == prefix) atomicAdd(&hist[(k >> shift) & 255u], 1u);
                }
                __syncthreads();
                if (tid == 0) {
                    unsigned b = 255;
                    for (;; --b) {
                        if (hist[b] >= remaining || b == 0) break;
                        remaining -= hist[b];
                    }
                    red_u[0] = b;
                    red_u[1] = remaining;
                }
                __syncthreads();
                prefix |= red_u[0] << shift;
                known |= 255u << shift;
                remaining = red_u[1];
                __syncthreads();
            }
            floor_key = prefix;
        }
        // Top-p: the largest floor (as e's bits) whose mass reaches the target, each
        // mass summed in the fixed order. Tokens top-k dropped get e = 0 first, so that
        // the passes read e alone (a zero changes no sum, and no floor tried is 0).
        unsigned floor_bits = 0;
        if (flags & FLAG_TOP_P) floor_bits = s_top_p_floor(a, e, n, floor_key, h, red_f, hist, head_m,
                                                           lane_n, lane_at, head, head_floor);
        const unsigned min_p_bits = h[4];
        if (min_p_bits > floor_bits) floor_bits = min_p_bits;
        // The Gumbel-max draw over what is left.
        float best = -INFINITY;
        unsigned best_i = 0xffffffffu;
        for (unsigned i = tid; i < n; i += SAMPLE_THREADS) {
            float s = a[i];
            if (!s_finite(s) || s_key(s) < floor_key || __float_as_uint(e[i]) < floor_bits)
                continue;
            if (s_flush(__fadd_rn(s, GUMBEL_BOUND)) < best) continue;
            float sc = s_flush(__fadd_rn(s, s_gumbel(h, i)));
            if (s_better(sc, i, best, best_i)) {
                best = sc;
                best_i = i;
            }
        }
        s_block_argmax(best, best_i, red_f, red_u);
        token = best_i;
    }

    // The pick goes into the table for the next step (no thread reads it in this one).
    if (trow && tid == 0 && token < n) {
        unsigned w = trow[token];
        if ((flags & FLAG_TABLE_COUNT) && (w & TABLE_MAX_COUNT) < TABLE_MAX_COUNT) w += 1;
        if (flags & FLAG_TABLE_SEEN) w |= TABLE_SEEN;
        trow[token] = (unsigned short)w;
    }

    unsigned* o = out + (size_t)row * out_width;
    for (int j = tid; j < out_width; j += SAMPLE_THREADS) o[j] = 0;
    __syncthreads();
    if (tid == 0) o[0] = token;
    if (!(flags & FLAG_LOGPROBS)) return;

    // Log-probs of the masked row (before penalties and temperature).
    float rv = -INFINITY;
    unsigned ri = 0;
    for (unsigned i = tid; i < n; i += SAMPLE_THREADS) {
        float v = s_flush(x[i]);
        if (mask && !((mask[i >> 5] >> (i & 31)) & 1u)) v = -INFINITY;
        a[i] = v;
        if (s_better(v, i, rv, ri)) {
            rv = v;
            ri = i;
        }
    }
    s_block_argmax(rv, ri, red_f, red_u);
    const float m = rv;
    float lz = 0.0f;
    if (s_finite(m)) {
        float part = 0.0f;
        for (unsigned i = tid; i < n; i += SAMPLE_THREADS) {
            float v = a[i];
            if (s_finite(v)) part = __fadd_rn(part, s_exp_neg(s_flush(__fsub_rn(v, m))));
        }
        lz = s_ln(s_block_sum(part, red_f));
    }
#define LOG_PROB(v) (s_finite(m) ? s_flush(__fsub_rn(s_flush(__fsub_rn((v), m)), lz)) \
                                 : s_flush(__fsub_rn((v), m)))
    if (tid == 0) o[1] = __float_as_uint(LOG_PROB(a[token]));
    // The top N, in (value, index) order, one block argmax each below the last pick.
    float prev_v = INFINITY;
    unsigned prev_i = 0;
    const int alternatives = (int)h[12];
    for (int j = 0; j < alternatives && 3 + 2 * j < out_width; ++j) {
        float bv = -INFINITY;
        unsigned bi = 0xffffffffu;
        for (unsigned i = tid; i < n; i += SAMPLE_THREADS) {
            float v = a[i];
            if (!s_finite(v)) continue;
            bool after = v < prev_v || (v == prev_v && (j == 0 ? true : i > prev_i));
            if (after && s_better(v, i, bv, bi)) {
                bv = v;
                bi = i;
            }
        }
        s_block_argmax(bv, bi, red_f, red_u);
        if (bi == 0xffffffffu) break;
        if (tid == 0) {
            o[2 + 2 * j] = bi;
            o[3 + 2 * j] = __float_as_uint(LOG_PROB(bv));
        }
        prev_v = bv;
        prev_i = bi;
    }
#undef LOG_PROB
}
