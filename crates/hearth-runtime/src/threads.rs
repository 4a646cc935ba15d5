//! CPU threads, decided once. candle 0.11 asks `utils::get_num_threads()` on every
//! matmul, which rediscovers the CPU count (cpu masks, `/proc/cpuinfo`) each time unless
//! `RAYON_NUM_THREADS` is set; so the count is fixed here once, before the first op,
//! and exported for candle, gemm's rayon pool and candle's barrier pool alike. hearth's
//! own CPU kernels run on one persistent pool (pool.rs) whose workers spin briefly
//! between ops, as ggml's do, so an op does not pay a thread wake-up.

mod pool;

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

/// Runs `f` over `0..n_items`, in chunks of at least `min_chunk` items taken from a
/// shared cursor by the calling thread and the pool's workers. Tiny jobs, nested calls
/// and calls while another thread uses the pool run on the calling thread alone.
pub fn parallel_chunks<F: Fn(std::ops::Range<usize>) + Sync>(
    n_items: usize,
    min_chunk: usize,
    f: F,
) {
    if n_items == 0 {
        return;
    }
    let threads = num_threads();
    if threads <= 1 || n_items <= min_chunk.max(1) {
        f(0..n_items);
        return;
    }
    // ~4 grabs per thread: stragglers are absorbed, the cursor is not hammered.
    let chunk = n_items.div_ceil(threads * 4).max(min_chunk).max(1);
    pool::get(threads).run(n_items, chunk, &f);
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
