// The write of one step's new keys and values into the paged cache, fused with what
// comes before it in the layer: Qwen3's per-head RMSNorm of q and k (the `_norm`
// entry points), RoPE on q and k (the rotate-half form of transformers' Llama, with the
// model's cos/sin tables: Llama-3 frequency scaling and linear scaling are in the
// tables, rope.rs), and the copy of k and v into their slots (vLLM's
// reshape_and_cache, taking the slot ids directly). One thread block per token; its
// warps take the token's heads in turn (q heads, then k, then v), a lane holding the
// pairs (i, i + head_dim / 2) it rotates. Rotated q goes to q_out.
//
// Caches are [num_blocks, block_size, kv_heads, head_dim]: slot s = block * block_size
// + offset is row s of [slots, kv_heads, head_dim]. Positions and slots are checked on
// the host (rope_cache.rs) before any launch.
//
// Compiled to PTX by build.rs (feature `cuda`), and for the CPU emulator in every build;
// entry points hearth_rope_cache{,_norm}_{f32,f16,bf16}_d{16,32,64,80,96,128,256}.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

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

template <typename T, int D, bool NORM>
__device__ void rope_cache(
    const T* __restrict__ q,              // [tokens, heads, head_dim]
    const T* __restrict__ k,              // [tokens, kv_heads, head_dim]
    const T* __restrict__ v,              // [tokens, kv_heads, head_dim]
    T* __restrict__ q_out,                // [tokens, heads, head_dim]
    T* __restrict__ k_cache,              // [slots, kv_heads, head_dim]
    T* __restrict__ v_cache,
    const T* __restrict__ cos,            // [positions, head_dim / 2]
    const T* __restrict__ sin,
    const T* __restrict__ q_norm,         // [head_dim] (NORM only)
    const T* __restrict__ k_norm,
    const uint32_t* __restrict__ positions,  // [tokens]
    const uint32_t* __restrict__ slots,      // [tokens]
    int num_heads, int num_kv_heads, float eps) {
    constexpr int HALF = D / 2;
    constexpr int PPL = (HALF + 31) / 32;  // pairs per lane
    const int t = blockIdx.x;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nwarps = blockDim.x / 32;
    const size_t slot = slots[t];
    const T* c = cos + (size_t)positions[t] * HALF;
    const T* s = sin + (size_t)positions[t] * HALF;
    for (int hh = warp; hh < num_heads + 2 * num_kv_heads; hh += nwarps) {
        if (hh >= num_heads + num_kv_heads) {  // a value head: copied as it is
            const int kh = hh - num_heads - num_kv_heads;
            const T* src = v + ((size_t)t * num_kv_heads + kh) * D;
            T* dst = v_cache + (slot * num_kv_heads + kh) * D;
            for (int i = lane; i < D; i += 32) dst[i] = src[i];
            continue;
        }
        const bool is_q = hh < num_heads;
        const int head = is_q ? hh : hh - num_heads;
        const T* src = is_q ? q + ((size_t)t * num_heads + head) * D
                            : k + ((size_t)t * num_kv_heads + head) * D;
        T* dst = is_q ? q_out + ((size_t)t * num_heads + head) * D
                      : k_cache + (slot * num_kv_heads + head) * D;
        float x1[PPL], x2[PPL];
#pragma unroll
        for (int p = 0; p < PPL; ++p) {
            const int i = lane + p * 32;
            x1[p] = i < HALF ? to_f32(src[i]) : 0.f;
            x2[p] = i < HALF ? to_f32(src[i + HALF]) : 0.f;
        }
        if (NORM) {
            float ss = 0.f;
#pragma unroll
            for (int p = 0; p < PPL; ++p) ss += x1[p] * x1[p] + x2[p] * x2[p];
            const float r = rsqrtf(warp_sum(ss) / D + eps);
            const T* w = is_q ? q_norm : k_norm;
#pragma unroll
            for (int p = 0; p < PPL; ++p) {
                const int i = lane + p * 32;
                if (i < HALF) {
                    // Rounded to T as the unfused path's norm output is.
                    x1[p] = to_f32(from_f32<T>(x1[p] * r * to_f32(w[i])));
                    x2[p] = to_f32(from_f32<T>(x2[p] * r * to_f32(w[i + HALF])));
                }
            }
        }
#pragma unroll
        for (int p = 0; p < PPL; ++p) {
            const int i = lane + p * 32;
            if (i < HALF) {
                const float cv = to_f32(c[i]), sv = to_f32(s[i]);
                dst[i] = from_f32<T>(x1[p] * cv - x2[p] * sv);
                dst[i + HALF] = from_f32<T>(x1[p] * sv + x2[p] * cv);
            }
        }
    }
}

#define ENTRY(TYPE, NAME, D)                                                                       \
    extern "C" __global__ void __launch_bounds__(128) hearth_rope_cache_##NAME##_d##D(             \
        const TYPE* q, const TYPE* k, const TYPE* v, TYPE* q_out, TYPE* k_cache, TYPE* v_cache,    \
        const TYPE* cos, const TYPE* sin, const uint32_t* positions, const uint32_t* slots,        \
        int num_heads, int num_kv_heads) {                                                         \
        rope_cache<TYPE, D, false>(q, k, v, q_out, k_cache, v_cache, cos, sin, nullptr, nullptr,   \
                                   positions, slots, num_heads, num_kv_heads, 0.f);                \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(128) hearth_rope_cache_norm_##NAME##_d##D(        \
        const TYPE* q, const TYPE* k, const TYPE* v, TYPE* q_out, TYPE* k_cache, TYPE* v_cache,    \
        const TYPE* cos, const TYPE* sin, const TYPE* q_norm, const TYPE* k_norm,                  \
        const uint32_t* positions, const uint32_t* slots, int num_heads, int num_kv_heads,         \
        float eps) {                                                                               \
        rope_cache<TYPE, D, true>(q, k, v, q_out, k_cache, v_cache, cos, sin, q_norm, k_norm,      \
                                  positions, slots, num_heads, num_kv_heads, eps);                 \
    }
// Every head size of the supported families (paged_attention/launch.rs's HEAD_DIMS).
#define HEAD_DIMS(TYPE, NAME) \
    ENTRY(TYPE, NAME, 16) ENTRY(TYPE, NAME, 32) ENTRY(TYPE, NAME, 64) ENTRY(TYPE, NAME, 80) \
    ENTRY(TYPE, NAME, 96) ENTRY(TYPE, NAME, 128) ENTRY(TYPE, NAME, 256)

HEAD_DIMS(float, f32)
HEAD_DIMS(__half, f16)
HEAD_DIMS(__nv_bfloat16, bf16)
