// The element-wise ops between a layer's matmuls, fused so each is one launch where
// candle's CUDA path makes two:
//
// - residual add + RMSNorm (`hearth_add_rms_norm_*`): sum = x + delta (rounded to T, as
//   candle's add returns it), normed = rms_norm(sum) * w; both written. One block per
//   row: each thread takes the row's elements at its stride, the block reduces the sum
//   of squares through shared memory (one partial per warp), then each thread scales
//   the elements it wrote.
// - SiLU(gate) * up on the fused gate/up projection's output (`hearth_silu_mul_*`): row
//   r holds gate in columns [0, width) and up in [width, 2 * width) of a row of
//   `in_stride` elements. silu(gate) is rounded to T before the product, as candle's
//   two ops round it. Grid x = rows, grid y = column chunks of the block's width.
//
// Compiled to PTX by build.rs (feature `cuda`), and for the CPU emulator in every test
// build; entry points hearth_add_rms_norm_{f32,f16,bf16}, hearth_silu_mul_{f32,f16,bf16}.

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

// At most 1024 threads per block: 32 warps.
#define MAX_WARPS 32

template <typename T>
__device__ void add_rms_norm(const T* __restrict__ x, const T* __restrict__ delta,
                             const T* __restrict__ w, T* __restrict__ sum_out,
                             T* __restrict__ norm_out, int hidden, float eps) {
    __shared__ float partial[MAX_WARPS];
    const size_t row = blockIdx.x;
    const T* xr = x + row * hidden;
    const T* dr = delta + row * hidden;
    T* sr = sum_out + row * hidden;
    T* nr = norm_out + row * hidden;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nwarps = blockDim.x / 32;
    float ss = 0.f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        const T s = from_f32<T>(to_f32(xr[i]) + to_f32(dr[i]));
        sr[i] = s;
        const float f = to_f32(s);
        ss += f * f;
    }
    ss = warp_sum(ss);
    if (lane == 0) partial[warp] = ss;
    __syncthreads();
    float total = 0.f;
    for (int k = 0; k < nwarps; ++k) total += partial[k];
    const float r = rsqrtf(total / hidden + eps);
    // Each thread reads back only the sums it wrote itself.
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        nr[i] = from_f32<T>(to_f32(sr[i]) * r * to_f32(w[i]));
    }
}

template <typename T>
__device__ void silu_mul(const T* __restrict__ gate_up, T* __restrict__ out, int width,
                         int in_stride) {
    const size_t row = blockIdx.x;
    const T* g = gate_up + row * in_stride;
    const T* u = g + width;
    T* o = out + row * width;
    for (int i = blockIdx.y * blockDim.x + threadIdx.x; i < width; i += gridDim.y * blockDim.x) {
        const float gv = to_f32(g[i]);
        const float act = to_f32(from_f32<T>(gv / (1.f + expf(-gv))));
        o[i] = from_f32<T>(act * to_f32(u[i]));
    }
}

#define ENTRY(TYPE, NAME)                                                                          \
    extern "C" __global__ void __launch_bounds__(1024) hearth_add_rms_norm_##NAME(                 \
        const TYPE* x, const TYPE* delta, const TYPE* w, TYPE* sum_out, TYPE* norm_out,            \
        int hidden, float eps) {                                                                   \
        add_rms_norm<TYPE>(x, delta, w, sum_out, norm_out, hidden, eps);                           \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(1024) hearth_silu_mul_##NAME(                     \
        const TYPE* gate_up, TYPE* out, int width, int in_stride) {                                \
        silu_mul<TYPE>(gate_up, out, width, in_stride);                                            \
    }

ENTRY(float, f32)
ENTRY(__half, f16)
ENTRY(__nv_bfloat16, bf16)
