// hearth's paged attention on CUDA: the same op as the CPU one (paged_attention.rs),
// for the flattened ragged batch of one engine step. One thread block per (query token,
// kv head, group of up to MAX_GROUP of that kv head's query heads); its warps split the
// keys the token may see (positions 0..=its own), each lane holding ceil(head_dim/32)
// consecutive elements of the queries and accumulators (lanes past head_dim idle), with
// an online softmax in f32; the warps' partial results are merged in shared memory.
// Keys and values are read in place through the sequence's block table from caches
// laid out [num_blocks, block_size, kv_heads, head_dim]. gridDim.y is kv_heads times
// the number of head groups, ceil((heads / kv_heads) / MAX_GROUP).
//
// Compiled to PTX by build.rs (feature `cuda`), and for the CPU emulator in every build;
// entry points hearth_paged_attention_{f32,f16,bf16}_d{16,32,64,80,96,128,256}.

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
    const uint32_t* __restrict__ token_seq,   // [tokens]: the sequence of each token
    const uint32_t* __restrict__ query_start, // [seqs + 1]
    const uint32_t* __restrict__ seq_lens,    // [seqs]
    const uint32_t* __restrict__ block_tables,// [seqs, max_blocks]
    int max_blocks, int num_heads, int num_kv_heads, int block_size, float scale) {
    constexpr int EPL = (D + 31) / 32;
    extern __shared__ float smem[];
    const int t = blockIdx.x;
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

#define ENTRY(TYPE, NAME, D)                                                                       \
    extern "C" __global__ void __launch_bounds__(128) hearth_paged_attention_##NAME##_d##D(        \
        const TYPE* q, const TYPE* k, const TYPE* v, TYPE* out, const uint32_t* token_seq,         \
        const uint32_t* query_start, const uint32_t* seq_lens, const uint32_t* block_tables,       \
        int max_blocks, int num_heads, int num_kv_heads, int block_size, float scale) {            \
        paged_attention<TYPE, D>(q, k, v, out, token_seq, query_start, seq_lens, block_tables,     \
                                 max_blocks, num_heads, num_kv_heads, block_size, scale);          \
    }
// Every head size of the supported families (launch.rs's HEAD_DIMS).
#define HEAD_DIMS(TYPE, NAME) \
    ENTRY(TYPE, NAME, 16) ENTRY(TYPE, NAME, 32) ENTRY(TYPE, NAME, 64) ENTRY(TYPE, NAME, 80) \
    ENTRY(TYPE, NAME, 96) ENTRY(TYPE, NAME, 128) ENTRY(TYPE, NAME, 256)

HEAD_DIMS(float, f32)
HEAD_DIMS(__half, f16)
HEAD_DIMS(__nv_bfloat16, bf16)
