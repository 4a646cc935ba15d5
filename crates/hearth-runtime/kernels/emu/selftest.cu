// Kernels that exercise the emulator itself (tests/cuda_emulator.rs); build.rs compiles
// them for the emulator only, never with nvcc.
#include <stdint.h>

// Block-wide sum: warp sums by shuffle, then the warps' sums through static shared
// memory. Correct only with the barrier between the two.
extern "C" __global__ void selftest_block_sum(const float* in, float* out) {
    __shared__ float partial[32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    float v = in[blockIdx.x * blockDim.x + threadIdx.x];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < (int)(blockDim.x / 32) ? partial[lane] : 0.f;
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane == 0) out[blockIdx.x] = v;
    }
}

// The same without the barrier: warp 0 may read partial sums not written yet (right
// only when it happens to run last).
extern "C" __global__ void selftest_block_sum_racy(const float* in, float* out) {
    __shared__ float partial[32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    float v = in[blockIdx.x * blockDim.x + threadIdx.x];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    if (lane == 0) partial[warp] = v;
    if (warp == 0) {
        v = lane < (int)(blockDim.x / 32) ? partial[lane] : 0.f;
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane == 0) out[blockIdx.x] = v;
    }
}

// A full-mask shuffle that only half of each warp reaches.
extern "C" __global__ void selftest_divergent_shuffle(float* out) {
    float v = (float)threadIdx.x;
    if (threadIdx.x % 32 < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
    out[threadIdx.x] = v;
}

// Votes: ballot of lane % 3 == 0, any(lane == 5), all(lane < 31).
extern "C" __global__ void selftest_votes(uint32_t* out) {
    const int lane = threadIdx.x % 32;
    const uint32_t b = __ballot_sync(0xffffffffu, lane % 3 == 0);
    const int any = __any_sync(0xffffffffu, lane == 5);
    const int all = __all_sync(0xffffffffu, lane < 31);
    if (threadIdx.x == 0) {
        out[0] = b;
        out[1] = (uint32_t)any;
        out[2] = (uint32_t)all;
    }
}

// Writes one element past the end of `out` (n elements).
extern "C" __global__ void selftest_out_of_bounds(float* out, int n) {
    if (threadIdx.x == 0) out[n] = 1.f;
}

// Reads `offset` elements past `p`: far outside any allocation when offset is huge.
extern "C" __global__ void selftest_wild_read(const float* p, float* out, int64_t offset) {
    out[threadIdx.x] = p[offset + threadIdx.x];
}
