// hearth's small-batch GEMV: y = x' W^T (+ bias) for 1..MAX_ROWS activation rows, the
// projections of a decode step (cuBLAS picks GEMM tiles for these shapes that leave
// bandwidth unused, and every small kernel between two projections is a launch). W is
// the Linear's weight, [N, K] row-major, read once with 16-byte loads: a warp holds
// ROWS_PER_WARP weight rows, each lane VE consecutive elements of each per load, so a
// block of WARPS warps has WARPS * ROWS_PER_WARP * 512 bytes of W in flight per step
// of its loop; each (weight row, activation row) dot product ends in a warp-shuffle sum.
//
// The input x' is staged per tile of `tile_k` columns in shared memory as f32 (rows x
// tile_k), computed there by the block from what the previous kernel left, so the
// element-wise ops between projections are no launches of their own:
// - plain (`hearth_gemv_*`): x' = x;
// - add + RMSNorm (`hearth_gemv_add_norm_*`): s = x + delta (rounded to T), x' =
//   rms_norm(s) * w (rounded to T), as layer_ops.cu's add_rms_norm computes it; every
//   block sums the squares of the rows itself (the rows are a few KiB, in L2), and
//   block 0 alone writes s, the new residual;
// - SiLU·mul (`hearth_gemv_silu_*`): x' = silu(gate) * up, rounded as layer_ops.cu's
//   silu_mul rounds it, from the gate/up projection's two outputs.
//
// The output can be split in up to three parts (Q/K/V, gate/up fused in one weight):
// column n of part p = [start_p, start_p + width_p) goes to
// y[rows * start_p + r * width_p + (n - start_p)], so each part is a contiguous
// [rows, width_p] matrix (no copy to make q, k and v contiguous). split1 <= split2 <= N
// are the part boundaries (split1 == split2 == N: one part).
//
// Requirements the launcher checks: K a multiple of VE, W 16-byte aligned, rows in
// 1..=MAX_ROWS, tile_k a multiple of 32 * VE, rows * tile_k * 4 bytes of dynamic
// shared memory.
//
// Compiled to PTX by build.rs (feature `cuda`), and for the CPU emulator in every test
// build; entry points hearth_gemv{,_add_norm,_silu}_{f32,f16,bf16}.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#define MAX_ROWS 8
#define WARPS 8
#define ROWS_PER_WARP 4

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
    return __float2bfloat16(x);
}
// The value x has once stored as T.
template <typename T> __device__ __forceinline__ float round_to(float x) {
    return to_f32(from_f32<T>(x));
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

enum Prologue { PLAIN = 0, ADD_NORM = 1, SILU = 2 };

// The inputs of one launch; which fields are read depends on the prologue.
template <typename T>
struct Input {
    const T* a;      // plain: x; add_norm: residual; silu: gate   ([rows, K] each)
    const T* b;      // add_norm: delta; silu: up
    const T* w;      // add_norm: the norm's weight [K]
    T* sum_out;      // add_norm: the new residual, written by block 0
    float eps;
};

template <typename T, int MODE>
__device__ void gemv(const T* __restrict__ weight, const T* __restrict__ bias, Input<T> in,
                     T* __restrict__ y, int n_out, int k_in, int rows, int tile_k, int split1,
                     int split2, int has_bias) {
    constexpr int VE = 16 / (int)sizeof(T);  // elements per 16-byte load
    extern __shared__ float xs[];            // [rows][tile_k]: the tile of x'
    __shared__ float partial[MAX_ROWS][WARPS];
    __shared__ float inv_rms[MAX_ROWS];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int n0 = (blockIdx.x * WARPS + warp) * ROWS_PER_WARP;

    if (MODE == ADD_NORM) {
        // Each row's sum of squares of s = x + delta (as rounded to T); block 0 also
        // stores s, the residual the next layer adds to.
        for (int r = 0; r < rows; ++r) {
            float ss = 0.f;
            for (int k = threadIdx.x; k < k_in; k += blockDim.x) {
                const size_t at = (size_t)r * k_in + k;
                const T s = from_f32<T>(to_f32(in.a[at]) + to_f32(in.b[at]));
                if (blockIdx.x == 0) in.sum_out[at] = s;
                const float f = to_f32(s);
                ss += f * f;
            }
            ss = warp_sum(ss);
            if (lane == 0) partial[r][warp] = ss;
        }
        __syncthreads();
        if (threadIdx.x < rows) {
            float total = 0.f;
            for (int w = 0; w < WARPS; ++w) total += partial[threadIdx.x][w];
            inv_rms[threadIdx.x] = rsqrtf(total / k_in + in.eps);
        }
        __syncthreads();
    }

    float acc[ROWS_PER_WARP][MAX_ROWS];
#pragma unroll
    for (int j = 0; j < ROWS_PER_WARP; ++j)
#pragma unroll
        for (int r = 0; r < MAX_ROWS; ++r) acc[j][r] = 0.f;

    for (int k0 = 0; k0 < k_in; k0 += tile_k) {
        const int kt = min(tile_k, k_in - k0);
        // The tile of x', every thread a share of its rows x kt elements.
        for (int i = threadIdx.x; i < rows * kt; i += blockDim.x) {
            const int r = i / kt, k = k0 + i % kt;
            const size_t at = (size_t)r * k_in + k;
            float v;
            if (MODE == PLAIN) {
                v = to_f32(in.a[at]);
            } else if (MODE == ADD_NORM) {
                const float s = round_to<T>(to_f32(in.a[at]) + to_f32(in.b[at]));
                v = round_to<T>(s * inv_rms[r] * to_f32(in.w[k]));
            } else {
                const float g = to_f32(in.a[at]);
                const float act = round_to<T>(g / (1.f + expf(-g)));
                v = round_to<T>(act * to_f32(in.b[at]));
            }
            xs[r * tile_k + i % kt] = v;
        }
        __syncthreads();
        // This warp's weight rows against the tile: one 16-byte load per row per step.
        for (int k = lane * VE; k < kt; k += 32 * VE) {
            uint4 raw[ROWS_PER_WARP];
#pragma unroll
            for (int j = 0; j < ROWS_PER_WARP; ++j) {
                const int n = n0 + j;
                raw[j] = n < n_out
                             ? *reinterpret_cast<const uint4*>(weight + (size_t)n * k_in + k0 + k)
                             : make_uint4(0, 0, 0, 0);
            }
#pragma unroll
            for (int j = 0; j < ROWS_PER_WARP; ++j) {
                T e[VE];
                memcpy(e, &raw[j], 16);
                float wv[VE];
#pragma unroll
                for (int i = 0; i < VE; ++i) wv[i] = to_f32(e[i]);
#pragma unroll
                for (int r = 0; r < MAX_ROWS; ++r) {
                    if (r >= rows) break;
                    // VE floats of the tile, 16-byte aligned (tile_k and k are
                    // multiples of VE >= 4): VE / 4 vector reads of shared memory.
                    const float4* xr = reinterpret_cast<const float4*>(xs + r * tile_k + k);
                    float d = 0.f;
#pragma unroll
                    for (int i = 0; i < VE / 4; ++i) {
                        const float4 x4 = xr[i];
                        d += wv[4 * i] * x4.x + wv[4 * i + 1] * x4.y + wv[4 * i + 2] * x4.z +
                             wv[4 * i + 3] * x4.w;
                    }
                    acc[j][r] += d;
                }
            }
        }
        // The tile is overwritten next round only after every warp is done with it.
        __syncthreads();
    }

#pragma unroll
    for (int j = 0; j < ROWS_PER_WARP; ++j) {
        const int n = n0 + j;
#pragma unroll
        for (int r = 0; r < MAX_ROWS; ++r) {
            if (r >= rows) break;
            const float total = warp_sum(acc[j][r]);
            if (lane == 0 && n < n_out) {
                const float v = total + (has_bias ? to_f32(bias[n]) : 0.f);
                const int start = n < split1 ? 0 : (n < split2 ? split1 : split2);
                const int width = n < split1 ? split1 : (n < split2 ? split2 - split1 : n_out - split2);
                y[(size_t)rows * start + (size_t)r * width + (n - start)] = from_f32<T>(v);
            }
        }
    }
}

#define ENTRY(TYPE, NAME)                                                                          \
    extern "C" __global__ void __launch_bounds__(WARPS * 32) hearth_gemv_##NAME(                   \
        const TYPE* weight, const TYPE* bias, const TYPE* x, TYPE* y, int n_out, int k_in,         \
        int rows, int tile_k, int split1, int split2, int has_bias) {                              \
        Input<TYPE> in{x, nullptr, nullptr, nullptr, 0.f};                                         \
        gemv<TYPE, PLAIN>(weight, bias, in, y, n_out, k_in, rows, tile_k, split1, split2,          \
                          has_bias);                                                               \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(WARPS * 32) hearth_gemv_add_norm_##NAME(          \
        const TYPE* weight, const TYPE* bias, const TYPE* residual, const TYPE* delta,             \
        const TYPE* norm_weight, TYPE* sum_out, TYPE* y, int n_out, int k_in, int rows,            \
        int tile_k, int split1, int split2, int has_bias, float eps) {                             \
        Input<TYPE> in{residual, delta, norm_weight, sum_out, eps};                                \
        gemv<TYPE, ADD_NORM>(weight, bias, in, y, n_out, k_in, rows, tile_k, split1, split2,       \
                             has_bias);                                                            \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(WARPS * 32) hearth_gemv_silu_##NAME(              \
        const TYPE* weight, const TYPE* bias, const TYPE* gate, const TYPE* up, TYPE* y,           \
        int n_out, int k_in, int rows, int tile_k, int split1, int split2, int has_bias) {         \
        Input<TYPE> in{gate, up, nullptr, nullptr, 0.f};                                           \
        gemv<TYPE, SILU>(weight, bias, in, y, n_out, k_in, rows, tile_k, split1, split2,           \
                         has_bias);                                                                \
    }

ENTRY(float, f32)
ENTRY(__half, f16)
ENTRY(__nv_bfloat16, bf16)
