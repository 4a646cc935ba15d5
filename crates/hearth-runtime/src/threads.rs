//! CPU threads, decided once. candle 0.11 asks `utils::get_num_threads()` on every
//! matmul, which rediscovers the CPU count (cpu masks, `/proc/cpuinfo`) each time unless
//! `RAYON_NUM_THREADS` is set; so the count is fixed here once, before the first op,
//! and exported for candle, gemm's rayon pool and candle's barrier pool alike. hearth's
//! own CPU kernels run on candle's persistent spin-barrier pool, as ggml runs every op
//! on one pool: no per-op thread wake-up through a scheduler.

use std::sync::OnceLock;

static THREADS: OnceLock<usize> = OnceLock::new();

/// The number of threads every CPU op uses. The first call decides: an explicit
/// `RAYON_NUM_THREADS` or `CANDLE_NUM_THREADS` wins, else the CPUs this process may
/// run on (cgroup quota and affinity included).
pub fn init() -> usize {
    *THREADS.get_or_init(|| {
        let from_env = |name: &str| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
                .filter(|&n| n > 0)
        };
        let n = from_env("RAYON_NUM_THREADS")
            .or_else(|| from_env("CANDLE_NUM_THREADS"))
            .unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
            });
        // candle and rayon read these lazily; set them before any of their pools exist.
        // SAFETY of the environment write: callers run this at start-up (the binary's
        // main, `load`), before threads that read the environment are started.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        std::env::set_var("CANDLE_NUM_THREADS", n.to_string());
        tracing::debug!(threads = n, "CPU thread count decided");
        n
    })
}

pub fn num_threads() -> usize {
    init()
}

/// Runs `f` over `0..n_items` in chunks on candle's barrier pool (the calling thread
/// takes part). Falls back to the calling thread alone for tiny jobs.
pub fn parallel_chunks<F: Fn(std::ops::Range<usize>) + Sync>(
    n_items: usize,
    min_chunk: usize,
    f: F,
) {
    if n_items == 0 {
        return;
    }
    if num_threads() <= 1 || n_items <= min_chunk.max(1) {
        f(0..n_items);
        return;
    }
    candle_core::utils::barrier_pool().execute_chunked(n_items, f);
}

/// Splits `0..n_items` into one contiguous range per thread, each a multiple of
/// `align` (except the last): for memory-bound kernels whose threads stream disjoint
/// rows.
pub fn parallel_split<F: Fn(std::ops::Range<usize>) + Sync>(n_items: usize, align: usize, f: F) {
    let threads = num_threads();
    let align = align.max(1);
    if threads <= 1 || n_items <= align {
        f(0..n_items);
        return;
    }
    let per = n_items.div_ceil(threads).div_ceil(align) * align;
    candle_core::utils::barrier_pool().execute(|tid| {
        let start = tid * per;
        if start < n_items {
            f(start..n_items.min(start + per));
        }
    });
}

/// Whether the AVX2 + FMA kernels can run here (checked once).
#[cfg(target_arch = "x86_64")]
pub fn has_avx2_fma() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

#[cfg(not(target_arch = "x86_64"))]
pub fn has_avx2_fma() -> bool {
    false
}
