//! The process's allocator told to keep the memory a forward pass frees. A prefill
//! chunk of 2k tokens allocates tens of MB per layer (a fused gate/up product alone is
//! 2048 × 3072 f32 = 25 MB) and frees it a moment later; glibc's defaults hand such
//! memory back to the kernel (a non-main arena's heap is unmapped once it is empty, the
//! main heap trimmed) and fault it in again, zeroed, for the next layer: 20% of a 2k
//! prefill's CPU time went to page faults and unmapping in a profile of the f32 model.
//! Kept here, freed memory is reused like any other; what a server holds is bounded by
//! its largest step, which the scheduler's token budget bounds.

/// Bytes an allocation must reach to get its own mapping (glibc's upper limit for this
/// setting; larger ones are mapped and unmapped as before).
const MMAP_THRESHOLD: i32 = 32 << 20;
/// Free memory at the top of a heap beyond which glibc trims it.
const TRIM_THRESHOLD: i32 = 1 << 30;
/// Room glibc adds when a heap grows, and keeps when it could shrink one (a per-thread
/// arena's heaps are 64 MiB: with this pad an emptied heap is not unmapped).
const TOP_PAD: i32 = 64 << 20;

/// Sets the policy; call once at start-up. Returns whether the allocator took it (glibc
/// on Linux; elsewhere nothing is changed).
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes the allocator's tunables; it takes the arena locks.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
                && libc::mallopt(libc::M_TOP_PAD, TOP_PAD) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    /// Minor page faults taken by the calling thread so far.
    fn minor_faults() -> i64 {
        // SAFETY: getrusage writes the struct it is given.
        unsafe {
            let mut u: libc::rusage = std::mem::zeroed();
            libc::getrusage(libc::RUSAGE_THREAD, &mut u);
            u.ru_minflt
        }
    }

    /// A prefill layer's pattern on a worker thread: several 24 MB buffers live at once,
    /// written, then freed; the third round must reuse the first rounds' pages instead
    /// of faulting them in again (with glibc's defaults every round faults all of them).
    #[test]
    fn freed_buffers_are_reused_without_page_faults() {
        assert!(super::keep_freed_memory());
        let faults = std::thread::spawn(|| {
            const LEN: usize = 6 << 20; // f32s: 24 MiB
            let mut last = 0;
            for _ in 0..3 {
                let before = minor_faults();
                let bufs: Vec<Vec<f32>> = (0..3)
                    .map(|i| {
                        let mut v = Vec::<f32>::with_capacity(LEN);
                        v.resize(LEN, i as f32 + 1.0);
                        v
                    })
                    .collect();
                std::hint::black_box(&bufs);
                drop(bufs);
                last = minor_faults() - before;
            }
            last
        })
        .join()
        .unwrap();
        let pages = 3 * (24 << 20) / 4096;
        assert!(
            faults < pages / 4,
            "{faults} page faults in the third round for {pages} pages of reused buffers"
        );
    }
}
