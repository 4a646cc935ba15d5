// hearth's CUDA-on-CPU emulation: what a kernel source under kernels/ needs from CUDA,
// defined for the host C++ compiler, so the same .cu text that nvcc compiles runs in
// `cargo test` on any machine. runtime.cpp runs each thread of a block as a coroutine
// and decides who runs when (see there); this header is the device side: the built-in
// indices, barriers, warp collectives, half-precision types, vector types, atomics and
// the fast-math intrinsics, each with CUDA's semantics where a kernel could tell.
//
// Not here (a kernel using one fails to compile, which is the intended signal):
// textures, cooperative groups, tensor-core intrinsics, inline PTX.
#pragma once

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <string>
#include <type_traits>
#include <utility>

// build.rs preprocesses each kernel source once with HEARTH_EMU_LIST_KERNELS to find
// its entry points by this mark.
#ifdef HEARTH_EMU_LIST_KERNELS
#define __global__ hearth_emu_kernel_mark
#else
#define __global__
#endif
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __constant__ static
// __restrict__ is a GNU C++ keyword already.

struct uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

namespace hearth_emu {

// The built-in variables of the thread that runs now (runtime.cpp points this at the
// resumed thread's before every switch).
struct Builtins {
    uint3 thread_idx, block_idx;
    dim3 block_dim, grid_dim;
};
extern thread_local const Builtins* current;

void* dynamic_shared();
void* static_shared(size_t bytes, size_t align, const void* key);
void syncthreads();
[[noreturn]] void trap(const char* what);

enum Collective : int { SHFL_IDX = 1, SHFL_XOR, SHFL_DOWN, SHFL_UP, BALLOT, ANY, ALL, SYNCWARP };
// Blocks the calling lane until every lane of its warp named in `mask` reaches the
// same collective, then returns this lane's result.
uint64_t warp_collective(int op, unsigned mask, uint64_t value, int param, int width);

template <typename T>
inline uint64_t to_bits(T v) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value,
                  "warp shuffles move at most 8 bytes");
    uint64_t b = 0;
    memcpy(&b, &v, sizeof(T));
    return b;
}
template <typename T>
inline T from_bits(uint64_t b) {
    T v;
    memcpy(&v, &b, sizeof(T));
    return v;
}

}  // namespace hearth_emu

#define threadIdx (hearth_emu::current->thread_idx)
#define blockIdx (hearth_emu::current->block_idx)
#define blockDim (hearth_emu::current->block_dim)
#define gridDim (hearth_emu::current->grid_dim)
#define warpSize 32

inline void __syncthreads() { hearth_emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
    hearth_emu::warp_collective(hearth_emu::SYNCWARP, mask, 0, 0, 32);
}
// Blocks run one after another, so ordering between them is already total.
inline void __threadfence() {}
inline void __threadfence_block() {}
[[noreturn]] inline void __trap() { hearth_emu::trap("__trap()"); }

template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
    return hearth_emu::from_bits<T>(
        hearth_emu::warp_collective(hearth_emu::SHFL_IDX, mask, hearth_emu::to_bits(v), src, width));
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    return hearth_emu::from_bits<T>(hearth_emu::warp_collective(
        hearth_emu::SHFL_XOR, mask, hearth_emu::to_bits(v), lane_mask, width));
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    return hearth_emu::from_bits<T>(hearth_emu::warp_collective(
        hearth_emu::SHFL_DOWN, mask, hearth_emu::to_bits(v), (int)delta, width));
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    return hearth_emu::from_bits<T>(hearth_emu::warp_collective(
        hearth_emu::SHFL_UP, mask, hearth_emu::to_bits(v), (int)delta, width));
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
    return (unsigned)hearth_emu::warp_collective(hearth_emu::BALLOT, mask, pred != 0, 0, 32);
}
inline int __any_sync(unsigned mask, int pred) {
    return (int)hearth_emu::warp_collective(hearth_emu::ANY, mask, pred != 0, 0, 32);
}
inline int __all_sync(unsigned mask, int pred) {
    return (int)hearth_emu::warp_collective(hearth_emu::ALL, mask, pred != 0, 0, 32);
}

// Fast-math intrinsics: the CPU's exact functions (CUDA's are within a few ulp).
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
template <typename T>
inline T __ldg(const T* p) { return *p; }
// Loads that bypass L1 (what a block reads of other blocks' results after a fence and a
// counter): blocks run one at a time here, so a plain load sees every earlier write.
template <typename T>
inline T __ldcg(const T* p) { return *p; }
// Single-rounded IEEE operations (never fused: the host build has no FMA contraction)
// and bit casts, for kernels whose results must match a CPU reference bit for bit.
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline unsigned __float_as_uint(float x) { unsigned u; memcpy(&u, &x, 4); return u; }
inline float __uint_as_float(unsigned u) { float x; memcpy(&x, &u, 4); return x; }
inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((uint64_t)a * b) >> 32); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }

// Atomics: one block runs at a time on one OS thread and its threads switch only at
// barriers and warp collectives, so a plain read-modify-write is atomic here.
template <typename T>
inline T atomicAdd(T* p, T v) { T old = *p; *p = old + v; return old; }
template <typename T>
inline T atomicSub(T* p, T v) { T old = *p; *p = old - v; return old; }
template <typename T>
inline T atomicMax(T* p, T v) { T old = *p; *p = old > v ? old : v; return old; }
template <typename T>
inline T atomicMin(T* p, T v) { T old = *p; *p = old < v ? old : v; return old; }
template <typename T>
inline T atomicExch(T* p, T v) { T old = *p; *p = v; return old; }
template <typename T>
inline T atomicCAS(T* p, T cmp, T v) { T old = *p; if (old == cmp) *p = v; return old; }

// Half precision: storage and the conversions CUDA does (round to nearest even).
struct __half {
    uint16_t __x;
};
struct __half2 {
    __half x, y;
};
struct __nv_bfloat16 {
    uint16_t __x;
};
struct __nv_bfloat162 {
    __nv_bfloat16 x, y;
};
typedef __half half;
typedef __half2 half2;

inline float __half2float(__half h) {
    const uint32_t s = (uint32_t)(h.__x & 0x8000u) << 16;
    uint32_t e = (h.__x >> 10) & 0x1f, m = h.__x & 0x3ffu, bits;
    if (e == 0x1f) {
        bits = s | 0x7f800000u | (m << 13);
    } else if (e != 0) {
        bits = s | ((e + 112) << 23) | (m << 13);
    } else if (m == 0) {
        bits = s;
    } else {  // subnormal: normalise
        int sh = 0;
        while (!(m & 0x400u)) { m <<= 1; ++sh; }
        bits = s | ((uint32_t)(113 - sh) << 23) | ((m & 0x3ffu) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}
inline __half __float2half_rn(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint16_t s = (uint16_t)((x >> 16) & 0x8000u);
    const uint32_t a = x & 0x7fffffffu;
    if (a >= 0x7f800000u) return __half{(uint16_t)(s | 0x7c00u | (a > 0x7f800000u ? 0x200u : 0))};
    if (a >= 0x477ff000u) return __half{(uint16_t)(s | 0x7c00u)};  // rounds past 65504
    if (a < 0x38800000u) {  // subnormal or zero in half
        if (a < 0x33000000u) return __half{s};
        const uint32_t m = (a & 0x7fffffu) | 0x800000u;
        const int shift = 126 - (int)(a >> 23);  // 14..24
        uint32_t r = m >> shift;
        const uint32_t rem = m & ((1u << shift) - 1), half_way = 1u << (shift - 1);
        if (rem > half_way || (rem == half_way && (r & 1))) ++r;
        return __half{(uint16_t)(s | r)};
    }
    uint32_t r = a - 0x38000000u;  // rebias 127 -> 15
    r = (r + 0xfffu + ((r >> 13) & 1)) >> 13;
    return __half{(uint16_t)(s | r)};
}
inline __half __float2half(float f) { return __float2half_rn(f); }
inline float __low2float(__half2 h) { return __half2float(h.x); }
inline float __high2float(__half2 h) { return __half2float(h.y); }
inline __half2 __floats2half2_rn(float a, float b) { return {__float2half_rn(a), __float2half_rn(b)}; }

inline float __bfloat162float(__nv_bfloat16 h) {
    const uint32_t bits = (uint32_t)h.__x << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    if ((x & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{(uint16_t)((x >> 16) | 0x40u)};
    x += 0x7fffu + ((x >> 16) & 1);
    return __nv_bfloat16{(uint16_t)(x >> 16)};
}
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
inline float __low2float(__nv_bfloat162 h) { return __bfloat162float(h.x); }
inline float __high2float(__nv_bfloat162 h) { return __bfloat162float(h.y); }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
    return {__float2bfloat16_rn(a), __float2bfloat16_rn(b)};
}

// Vector types, with CUDA's alignment (a 16-byte load must be 16-byte aligned there).
#define HEARTH_EMU_VEC(T, N2, N4)                                                     \
    struct alignas(2 * sizeof(T)) N2 { T x, y; };                                     \
    struct alignas(4 * sizeof(T)) N4 { T x, y, z, w; };                               \
    inline N2 make_##N2(T x, T y) { return N2{x, y}; }                                \
    inline N4 make_##N4(T x, T y, T z, T w) { return N4{x, y, z, w}; }
HEARTH_EMU_VEC(float, float2, float4)
HEARTH_EMU_VEC(int, int2, int4)
HEARTH_EMU_VEC(unsigned, uint2, uint4)
#undef HEARTH_EMU_VEC

// The kernel table each emulated translation unit exports: name, the argument types
// read off the kernel's own signature, and a trampoline taking CUDA's `void** args`.
namespace hearth_emu {

template <typename T, typename = void>
struct ArgCode {
    static void put(char* out) { snprintf(out, 16, "?%zu", sizeof(T)); }
};
#define HEARTH_EMU_CODE(T, S) \
    template <> struct ArgCode<T> { static void put(char* out) { strcpy(out, S); } };
HEARTH_EMU_CODE(float, "f32")
HEARTH_EMU_CODE(double, "f64")
HEARTH_EMU_CODE(int32_t, "i32")
HEARTH_EMU_CODE(uint32_t, "u32")
HEARTH_EMU_CODE(uint16_t, "u16")
HEARTH_EMU_CODE(int64_t, "i64")
HEARTH_EMU_CODE(uint64_t, "u64")
HEARTH_EMU_CODE(__half, "f16")
HEARTH_EMU_CODE(__nv_bfloat16, "bf16")
#undef HEARTH_EMU_CODE
template <typename T>
struct ArgCode<T*> {
    static void put(char* out) {
        ArgCode<typename std::remove_cv<T>::type>::put(out);
        strcat(out, "*");
    }
};

struct KernelEntry {
    const char* name;
    const char* (*signature)();
    void (*invoke)(void** args);
};

template <typename F>
struct Sig;
template <typename... A>
struct Sig<void (*)(A...)> {
    static const char* signature() {
        static const std::string s = [] {
            std::string out;
            char one[32];
            ((ArgCode<typename std::remove_cv<A>::type>::put(one),
              out += out.empty() ? "" : ",", out += one), ...);
            return out;
        }();
        return s.c_str();
    }
    template <void (*F)(A...), size_t... I>
    static void call(void** args, std::index_sequence<I...>) {
        F(*static_cast<typename std::remove_cv<A>::type*>(args[I])...);
    }
    template <void (*F)(A...)>
    static void invoke(void** args) {
        call<F>(args, std::index_sequence_for<A...>{});
    }
};

}  // namespace hearth_emu

#define HEARTH_EMU_KERNEL(name, fn)                                    \
    hearth_emu::KernelEntry {                                          \
        name, &hearth_emu::Sig<decltype(&fn)>::signature,              \
            &hearth_emu::Sig<decltype(&fn)>::template invoke<&fn>      \
    }
