// hearth's paged attention on CUDA: the same op as the CPU one (paged_attention.rs),
// for the flattened ragged batch of one engine step. One thread block per (query token,
// kv head); its warps split the keys the token may see (positions 0..=its own), each
// lane holding head_dim/32 elements of the GQA group's queries and accumulators, with
// an online softmax in f32; the warps' partial results are merged in shared memory.
// Keys and values are read in place through the sequence's block table from caches
// laid out [num_blocks, block_size, kv_heads, head_dim].
//
// Compiled to PTX by build.rs (feature `cuda`); entry points
// hearth_paged_attention_{f32,f16,bf16}_{2,4,8}, the suffix being head_dim / 32.

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

// EPL = head_dim / 32 elements per lane.
template <typename T, int EPL>
__device__ void paged_attention(
    const T* __restrict__ q,                  // [tokens, heads, head_dim]
    const T* __restrict__ k_cache,            // [blocks, block_size, kv_heads, head_dim]
    const T* __restrict__ v_cache,
    T* __restrict__ out,                      // [tokens, heads, head_dim]
    const uint32_t* __restrict__ token_seq,   // [tokens]: the sequence of each token
    const uint32_t* __restrict__ query_start, // [seqs + 1]
    const uint32_t* __restrict__ seq_lens,    // [seqs]
    const uint32_t* __restrict__ block_tables,// [seqs, max_blocks]
    int max_blocks, int num_heads, int num_kv_heads, int block_size, float scale) {
    constexpr int D = EPL * 32;
    extern __shared__ float smem[];
    const int t = blockIdx.x;
    const int kvh = blockIdx.y;
    const int g = num_heads / num_kv_heads;
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
            qr[h][e] = h < g ? to_f32(q[((size_t)t * num_heads + kvh * g + h) * D + lane * EPL + e]) * scale
                             : 0.f;
        }
    }
    for (int j = warp; j <= pos; j += nwarps) {
        const size_t row = (((size_t)table[j / block_size] * block_size + j % block_size) * num_kv_heads + kvh) * D
                           + lane * EPL;
        float kv[EPL], vv[EPL];
#pragma unroll
        for (int e = 0; e < EPL; ++e) {
            kv[e] = to_f32(k_cache[row + e]);
            vv[e] = to_f32(v_cache[row + e]);
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
        for (int e = 0; e < EPL; ++e) w[lane * EPL + e] = acc[h][e];
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
        out[((size_t)t * num_heads + kvh * g + h) * D + dim] = from_f32<T>(num / den);
    }
}

#define ENTRY(TYPE, NAME, EPL)                                                                     \
    extern "C" __global__ void hearth_paged_attention_##NAME##_##EPL(                              \
        const TYPE* q, const TYPE* k, const TYPE* v, TYPE* out, const uint32_t* token_seq,         \
        const uint32_t* query_start, const uint32_t* seq_lens, const uint32_t* block_tables,       \
        int max_blocks, int num_heads, int num_kv_heads, int block_size, float scale) {            \
        paged_attention<TYPE, EPL>(q, k, v, out, token_seq, query_start, seq_lens, block_tables,   \
                                   max_blocks, num_heads, num_kv_heads, block_size, scale);        \
    }

ENTRY(float, f32, 2)
ENTRY(float, f32, 4)
ENTRY(float, f32, 8)
ENTRY(__half, f16, 2)
ENTRY(__half, f16, 4)
ENTRY(__half, f16, 8)
ENTRY(__nv_bfloat16, bf16, 2)
ENTRY(__nv_bfloat16, bf16, 4)
ENTRY(__nv_bfloat16, bf16, 8)
