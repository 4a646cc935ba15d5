// hearth's paged attention on CUDA: the same op as the CPU one (paged_attention.rs),
// for the flattened ragged batch of one engine step, in two kernels by the kind of row:
//
// - Rows of sequences with several queries (prefill chunks), `paged_attention`: one
// thread block per (query token, kv head, group of up to MAX_GROUP of that kv head's
// query heads), the tokens listed in `rows`; its warps split the
// keys the token may see (positions 0..=its own), each lane holding ceil(head_dim/32)
// consecutive elements of the queries and accumulators (lanes past head_dim idle), with
// an online softmax in f32; the warps' partial results are merged in shared memory.
// Keys and values are read in place through the sequence's block table from caches
// laid out [num_blocks, block_size, kv_heads, head_dim]. gridDim.y is kv_heads times
// the number of head groups, ceil((heads / kv_heads) / MAX_GROUP).
//
// - Rows of sequences with one query (decodes), split-key ("flash-decoding", vLLM's
// PagedAttention v2): `paged_attention_split` gives each block one partition of
// `partition_keys` keys of one row (grid z), so a batch-1 decode of a long context
// still spreads over every SM; each key row is read with 16-byte loads by LPR lanes, and
// each group of LPR lanes loads two rows before using either, so a warp has
// 2 * 32 / LPR rows of K and of V in flight; each block leaves an unnormalised partial result
// with its max and sum, and the last block to finish a (row, head group) merges the
// row's partitions (log-sum-exp) into the output: an atomic counter per (row, head
// group) counts the finished blocks (each block's partials made visible with
// __threadfence first, as CUDA's threadFenceReduction sample does), and the merging
// block sets it back to zero for the next launch. No combine kernel: one launch per
// layer for decode rows.
//
// Compiled to PTX by build.rs (feature `cuda`), and for the CPU emulator in every build;
// entry points hearth_paged_attention{,_split}_{f32,f16,bf16}_d{16,...,256}.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#define MAX_GROUP 8

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
    return __float2bfloat16(x);
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

// D = head_dim; each lane holds EPL = ceil(D / 32) elements, lane * EPL + e.
template <typename T, int D>
__device__ void paged_attention(
    const T* __restrict__ q,                  // [tokens, heads, head_dim]
    const T* __restrict__ k_cache,            // [blocks, block_size, kv_heads, head_dim]
    const T* __restrict__ v_cache,
    T* __restrict__ out,                      // [tokens, heads, head_dim]
    const uint32_t* __restrict__ rows,        // [gridDim.x]: the tokens this launch does
    const uint32_t* __restrict__ token_seq,   // [tokens]: the sequence of each token
    const uint32_t* __restrict__ query_start, // [seqs + 1]
    const uint32_t* __restrict__ seq_lens,    // [seqs]
    const uint32_t* __restrict__ block_tables,// [seqs, max_blocks]
    int max_blocks, int num_heads, int num_kv_heads, int block_size, float scale) {
    constexpr int EPL = (D + 31) / 32;
    extern __shared__ float smem[];
    const int t = (int)rows[blockIdx.x];
    const int groups = gridDim.y / num_kv_heads;
    const int kvh = blockIdx.y / groups;
    const int group = num_heads / num_kv_heads;
    const int h0 = (blockIdx.y % groups) * MAX_GROUP;  // this block's first head of the group
    const int g = min(MAX_GROUP, group - h0);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nwarps = blockDim.x / 32;
    const uint32_t s = token_seq[t];
    const int qlen = (int)(query_start[s + 1] - query_start[s]);
    const int pos = (int)seq_lens[s] - qlen + (t - (int)query_start[s]);
    const uint32_t* table = block_tables + (size_t)s * max_blocks;

    float qr[MAX_GROUP][EPL], acc[MAX_GROUP][EPL], m[MAX_GROUP], l[MAX_GROUP];
#pragma unroll
    for (int h = 0; h < MAX_GROUP; ++h) {
        m[h] = -INFINITY;
        l[h] = 0.f;
#pragma unroll
        for (int e = 0; e < EPL; ++e) {
            acc[h][e] = 0.f;
            const int i = lane * EPL + e;
            qr[h][e] = h < g && i < D
                           ? to_f32(q[((size_t)t * num_heads + kvh * group + h0 + h) * D + i]) * scale
                           : 0.f;
        }
    }
    for (int j = warp; j <= pos; j += nwarps) {
        const size_t row = (((size_t)table[j / block_size] * block_size + j % block_size) * num_kv_heads + kvh) * D
                           + lane * EPL;
        float kv[EPL], vv[EPL];
#pragma unroll
        for (int e = 0; e < EPL; ++e) {
            const bool in = lane * EPL + e < D;
            kv[e] = in ? to_f32(k_cache[row + e]) : 0.f;
            vv[e] = in ? to_f32(v_cache[row + e]) : 0.f;
        }
#pragma unroll
        for (int h = 0; h < MAX_GROUP; ++h) {
            if (h >= g) break;
            float part = 0.f;
#pragma unroll
            for (int e = 0; e < EPL; ++e) part += qr[h][e] * kv[e];
            const float score = warp_sum(part);
            const float m_new = fmaxf(m[h], score);
            const float c = __expf(m[h] - m_new);
            const float p = __expf(score - m_new);
            l[h] = l[h] * c + p;
#pragma unroll
            for (int e = 0; e < EPL; ++e) acc[h][e] = acc[h][e] * c + p * vv[e];
            m[h] = m_new;
        }
    }
    // Each warp's (m, l, acc) per head into shared memory: [warp][head][D + 2].
    const int stride = D + 2;
    for (int h = 0; h < g; ++h) {
        float* w = smem + ((size_t)warp * g + h) * stride;
#pragma unroll
        for (int e = 0; e < EPL; ++e)
            if (lane * EPL + e < D) w[lane * EPL + e] = acc[h][e];
        if (lane == 0) {
            w[D] = m[h];
            w[D + 1] = l[h];
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < g * D; i += blockDim.x) {
        const int h = i / D, dim = i % D;
        float mx = -INFINITY;
        for (int w = 0; w < nwarps; ++w) mx = fmaxf(mx, smem[((size_t)w * g + h) * stride + D]);
        float num = 0.f, den = 0.f;
        for (int w = 0; w < nwarps; ++w) {
            const float* p = smem + ((size_t)w * g + h) * stride;
            if (p[D] == -INFINITY) continue;  // a warp that saw no key
            const float f = __expf(p[D] - mx);
            num += p[dim] * f;
            den += p[D + 1] * f;
        }
        out[((size_t)t * num_heads + kvh * group + h0 + h) * D + dim] = from_f32<T>(num / den);
    }
}

// ---- split-key decode ----

// The lanes that read one key row: enough for its 16-byte loads, a power of two (so the
// row's dot product reduces with xor shuffles inside the group), at most a warp.
__host__ __device__ constexpr int lanes_per_row(int loads) {
    int l = 1;
    while (l < loads && l < 32) l *= 2;
    return l;
}

// N = 16 / sizeof(T) elements from 16 aligned bytes, one load instruction.
template <typename T>
__device__ __forceinline__ void load16(const T* p, float* out) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    T e[16 / sizeof(T)];
    memcpy(e, &raw, 16);
#pragma unroll
    for (int i = 0; i < (int)(16 / sizeof(T)); ++i) out[i] = to_f32(e[i]);
}

// (m, l, acc) merged with another partial softmax over disjoint keys.
template <int N>
__device__ __forceinline__ void merge_partial(float& m, float& l, float* acc, float m2, float l2,
                                              const float* acc2) {
    const float mx = fmaxf(m, m2);
    const float c1 = m == -INFINITY ? 0.f : __expf(m - mx);
    const float c2 = m2 == -INFINITY ? 0.f : __expf(m2 - mx);
    l = l * c1 + l2 * c2;
#pragma unroll
    for (int e = 0; e < N; ++e) acc[e] = acc[e] * c1 + acc2[e] * c2;
    m = mx;
}

// One block: row `rows[blockIdx.x]`, kv head and head group from blockIdx.y as above,
// keys [z * partition_keys, (z + 1) * partition_keys) of the row's visible ones.
// Writes the partition's accumulator (relative to its max), max and sum to
// part_{acc,max,sum}[row, head, z]; a block past the row's keys writes nothing and is
// not counted (the merge reads only the partitions that hold keys). The last block of
// a (row, head group) writes the group's heads of `out`.
template <typename T, int D>
__device__ void paged_attention_split(
    const T* __restrict__ q, const T* __restrict__ k_cache, const T* __restrict__ v_cache,
    T* __restrict__ out,                      // [tokens, heads, head_dim]
    float* __restrict__ part_acc,             // [rows, heads, max_parts, head_dim]
    float* __restrict__ part_max,             // [rows, heads, max_parts]
    float* __restrict__ part_sum,             // [rows, heads, max_parts]
    uint32_t* __restrict__ counters,          // [rows, gridDim.y], zero between launches
    const uint32_t* __restrict__ rows, const uint32_t* __restrict__ token_seq,
    const uint32_t* __restrict__ query_start, const uint32_t* __restrict__ seq_lens,
    const uint32_t* __restrict__ block_tables, int max_blocks, int num_heads, int num_kv_heads,
    int block_size, int partition_keys, int max_parts, float scale) {
    constexpr int VE = 16 / (int)sizeof(T);       // elements per 16-byte load
    constexpr int LOADS = D / VE;                 // loads per key row
    constexpr int LPR = lanes_per_row(LOADS);     // lanes per key row
    constexpr int VPL = (LOADS + LPR - 1) / LPR;  // loads per lane per row
    constexpr int RPW = 32 / LPR;                 // key rows in flight per warp
    constexpr int EPL = VPL * VE;                 // elements per lane
    constexpr int UNROLL = 2;                     // rows per row group per iteration
    static_assert(D % VE == 0, "head_dim must be a multiple of 16 bytes");
    extern __shared__ float smem[];
    const int r = blockIdx.x;
    const int t = (int)rows[r];
    const int groups = gridDim.y / num_kv_heads;
    const int kvh = blockIdx.y / groups;
    const int group = num_heads / num_kv_heads;
    const int h0 = (blockIdx.y % groups) * MAX_GROUP;
    const int g = min(MAX_GROUP, group - h0);
    const uint32_t s = token_seq[t];
    const int qlen = (int)(query_start[s + 1] - query_start[s]);
    const int pos = (int)seq_lens[s] - qlen + (t - (int)query_start[s]);
    const int start = (int)blockIdx.z * partition_keys;
    if (start > pos) return;  // the whole block: no barrier is skipped by some threads only
    const int end = min(pos + 1, start + partition_keys);
    const uint32_t* table = block_tables + (size_t)s * max_blocks;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nwarps = blockDim.x / 32;
    const int sub = lane / LPR, sl = lane % LPR;

    // Lane sl of a row group holds loads sl, sl + LPR, ...: elements (sl + i * LPR) * VE + e.
    float qr[MAX_GROUP][EPL], acc[MAX_GROUP][EPL], m[MAX_GROUP], l[MAX_GROUP];
#pragma unroll
    for (int h = 0; h < MAX_GROUP; ++h) {
        m[h] = -INFINITY;
        l[h] = 0.f;
#pragma unroll
        for (int i = 0; i < VPL; ++i)
#pragma unroll
            for (int e = 0; e < VE; ++e) {
                const int x = (sl + i * LPR) * VE + e;
                acc[h][i * VE + e] = 0.f;
                qr[h][i * VE + e] =
                    h < g && x < D
                        ? to_f32(q[((size_t)t * num_heads + kvh * group + h0 + h) * D + x]) * scale
                        : 0.f;
            }
    }
    // UNROLL rows per row group per iteration, all loaded before any is used: with
    // head_dim 128 in bf16 (LPR 16), 4 rows of K and 4 of V in flight per warp.
    for (int j0 = start + warp * RPW * UNROLL; j0 < end; j0 += nwarps * RPW * UNROLL) {
        float kv[UNROLL][EPL], vv[UNROLL][EPL];
        bool valid[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int j = j0 + u * RPW + sub;
            valid[u] = j < end;
            if (!valid[u]) continue;
            const size_t row =
                (((size_t)table[j / block_size] * block_size + j % block_size) * num_kv_heads + kvh) * D;
#pragma unroll
            for (int i = 0; i < VPL; ++i) {
                const int ld = sl + i * LPR;
                if (ld < LOADS) {
                    load16(k_cache + row + ld * VE, kv[u] + i * VE);
                    load16(v_cache + row + ld * VE, vv[u] + i * VE);
                } else {
#pragma unroll
                    for (int e = 0; e < VE; ++e) kv[u][i * VE + e] = vv[u][i * VE + e] = 0.f;
                }
            }
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
#pragma unroll
            for (int h = 0; h < MAX_GROUP; ++h) {
                if (h >= g) break;
                float score = 0.f;
                if (valid[u])
#pragma unroll
                    for (int e = 0; e < EPL; ++e) score += qr[h][e] * kv[u][e];
#pragma unroll
                for (int o = LPR / 2; o > 0; o >>= 1) score += __shfl_xor_sync(0xffffffffu, score, o);
                if (valid[u]) {
                    const float m_new = fmaxf(m[h], score);
                    const float c = __expf(m[h] - m_new);
                    const float p = __expf(score - m_new);
                    l[h] = l[h] * c + p;
#pragma unroll
                    for (int e = 0; e < EPL; ++e) acc[h][e] = acc[h][e] * c + p * vv[u][e];
                    m[h] = m_new;
                }
            }
        }
    }
    // The warp's row groups merged into lanes 0..LPR-1.
#pragma unroll
    for (int h = 0; h < MAX_GROUP; ++h) {
        if (h >= g) break;
#pragma unroll
        for (int o = LPR; o < 32; o <<= 1) {
            float other[EPL];
#pragma unroll
            for (int e = 0; e < EPL; ++e) other[e] = __shfl_xor_sync(0xffffffffu, acc[h][e], o);
            const float m2 = __shfl_xor_sync(0xffffffffu, m[h], o);
            const float l2 = __shfl_xor_sync(0xffffffffu, l[h], o);
            merge_partial<EPL>(m[h], l[h], acc[h], m2, l2, other);
        }
    }
    // Each warp's (acc, m, l) per head into shared memory: [warp][head][D + 2].
    const int stride = D + 2;
    if (sub == 0)
        for (int h = 0; h < g; ++h) {
            float* w = smem + ((size_t)warp * g + h) * stride;
#pragma unroll
            for (int i = 0; i < VPL; ++i)
#pragma unroll
                for (int e = 0; e < VE; ++e) {
                    const int x = (sl + i * LPR) * VE + e;
                    if (x < D) w[x] = acc[h][i * VE + e];
                }
            if (sl == 0) {
                w[D] = m[h];
                w[D + 1] = l[h];
            }
        }
    __syncthreads();
    for (int i = threadIdx.x; i < g * D; i += blockDim.x) {
        const int h = i / D, dim = i % D;
        float mx = -INFINITY;
        for (int w = 0; w < nwarps; ++w) mx = fmaxf(mx, smem[((size_t)w * g + h) * stride + D]);
        float num = 0.f, den = 0.f;
        for (int w = 0; w < nwarps; ++w) {
            const float* p = smem + ((size_t)w * g + h) * stride;
            if (p[D] == -INFINITY) continue;  // a warp that saw no key
            const float f = __expf(p[D] - mx);
            num += p[dim] * f;
            den += p[D + 1] * f;
        }
        const size_t at = ((size_t)r * num_heads + kvh * group + h0 + h) * max_parts + blockIdx.z;
        part_acc[at * D + dim] = num;
        if (dim == 0) {
            part_max[at] = mx;
            part_sum[at] = den;
        }
    }

    // Count this block in; the one that completes the row's partitions merges them.
    const int keys = pos + 1;
    const int combine_parts = (keys + partition_keys - 1) / partition_keys;
    const size_t slot = (size_t)r * gridDim.y + blockIdx.y;
    __shared__ int is_last;
    __threadfence();  // this thread's partials, visible to every block, before the count
    __syncthreads();  // every thread's fenced
    if (threadIdx.x == 0) is_last = atomicAdd(&counters[slot], 1u) + 1 == (uint32_t)combine_parts;
    __syncthreads();
    if (!is_last) return;
    __threadfence();  // the other blocks' partials are read after their counts
    for (int i = threadIdx.x; i < g * D; i += blockDim.x) {
        const int h = i / D, dim = i % D;
        const size_t base = ((size_t)r * num_heads + kvh * group + h0 + h) * max_parts;
        float m_all = -INFINITY;
        for (int p = 0; p < combine_parts; ++p) m_all = fmaxf(m_all, __ldcg(part_max + base + p));
        float num = 0.f, den = 0.f;
        for (int p = 0; p < combine_parts; ++p) {
            const float f = __expf(__ldcg(part_max + base + p) - m_all);
            den += f * __ldcg(part_sum + base + p);
            num += f * __ldcg(part_acc + (base + p) * D + dim);
        }
        out[((size_t)t * num_heads + kvh * group + h0 + h) * D + dim] = from_f32<T>(num / den);
    }
    // Zero again for the next launch (the next layer's, or the next step's).
    if (threadIdx.x == 0) counters[slot] = 0u;
}

#define ENTRY(TYPE, NAME, D)                                                                       \
    extern "C" __global__ void __launch_bounds__(128) hearth_paged_attention_##NAME##_d##D(        \
        const TYPE* q, const TYPE* k, const TYPE* v, TYPE* out, const uint32_t* rows,              \
        const uint32_t* token_seq, const uint32_t* query_start, const uint32_t* seq_lens,          \
        const uint32_t* block_tables, int max_blocks, int num_heads, int num_kv_heads,             \
        int block_size, float scale) {                                                             \
        paged_attention<TYPE, D>(q, k, v, out, rows, token_seq, query_start, seq_lens,             \
                                 block_tables, max_blocks, num_heads, num_kv_heads, block_size,    \
                                 scale);                                                           \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(128) hearth_paged_attention_split_##NAME##_d##D(  \
        const TYPE* q, const TYPE* k, const TYPE* v, TYPE* out, float* part_acc, float* part_max,  \
        float* part_sum, uint32_t* counters, const uint32_t* rows, const uint32_t* token_seq,      \
        const uint32_t* query_start, const uint32_t* seq_lens, const uint32_t* block_tables,       \
        int max_blocks, int num_heads, int num_kv_heads, int block_size, int partition_keys,       \
        int max_parts, float scale) {                                                              \
        paged_attention_split<TYPE, D>(q, k, v, out, part_acc, part_max, part_sum, counters, rows, \
                                       token_seq, query_start, seq_lens, block_tables, max_blocks, \
                                       num_heads, num_kv_heads, block_size, partition_keys,        \
                                       max_parts, scale);                                          \
    }
// Every head size of the supported families (launch.rs's HEAD_DIMS).
#define HEAD_DIMS(TYPE, NAME) \
    ENTRY(TYPE, NAME, 16) ENTRY(TYPE, NAME, 32) ENTRY(TYPE, NAME, 64) ENTRY(TYPE, NAME, 80) \
    ENTRY(TYPE, NAME, 96) ENTRY(TYPE, NAME, 128) ENTRY(TYPE, NAME, 256)

HEAD_DIMS(float, f32)
HEAD_DIMS(__half, f16)
HEAD_DIMS(__nv_bfloat16, bf16)
