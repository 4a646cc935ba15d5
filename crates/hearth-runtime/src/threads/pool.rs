//! The CPU kernels' thread pool. Workers spin for a short while after each job and
//! then park, so back-to-back ops in a step start without a wake-up. A job is a
//! cursor over chunks that the caller works through too, and the caller waits only
//! for workers that actually joined: a worker the OS has not scheduled (two cores
//! shared with other processes) costs nothing, where a barrier would stall the whole
//! op until that worker ran.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::Thread;

/// How long a worker spins for the next job before it parks: longer than the gap
/// between two ops of a decode step on an idle machine, short enough that a worker
/// sharing its core with the caller (a loaded machine) gives the core back soon.
const SPIN_BEFORE_PARK: std::time::Duration = std::time::Duration::from_micros(40);

type ChunkFn<'a> = dyn Fn(std::ops::Range<usize>) + Sync + 'a;

struct Job {
    cursor: AtomicUsize,
    n_items: usize,
    chunk: usize,
    /// Lifetime erased: valid while the job is open (see `Slot`).
    f: *const ChunkFn<'static>,
}

impl Job {
    fn work(&self) {
        // SAFETY: callers hold the job open (the caller's frame is alive).
        let f = unsafe { &*self.f };
        loop {
            let start = self.cursor.fetch_add(self.chunk, Ordering::Relaxed);
            if start >= self.n_items {
                break;
            }
            f(start..self.n_items.min(start + self.chunk));
        }
    }
}

/// The current job, under a lock: a worker joins only while the job is open and
/// counts itself in `active` under the same lock; the caller closes the job, then
/// waits for `active` to reach zero, so no worker touches a finished job.
struct Slot {
    job: *const Job,
    open: bool,
}

struct Shared {
    slot: Mutex<Slot>,
    generation: AtomicU64,
    active: AtomicUsize,
    sleepers: AtomicUsize,
    panicked: AtomicBool,
    threads: OnceLock<Vec<Thread>>,
}

// SAFETY: the raw pointers in `Slot` are only dereferenced under the protocol above.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

pub(super) struct Pool {
    shared: Arc<Shared>,
    /// One caller at a time; others run their job alone rather than wait.
    call: Mutex<Adapt>,
}

/// Jobs run alone after the pool was seen stalling: about ten decode steps.
const SOLO_JOBS: u32 = 2000;
/// The caller's average wait for joined workers (seconds, moving average) past which
/// the pool is taken to be stalling.
const STALL_LIMIT_S: f32 = 250e-6;

/// When the machine is oversubscribed, a worker that joined a job can lose its core
/// for a scheduler time slice (milliseconds) and the caller waits for its chunk: then
/// running alone is faster. The caller tracks how long it waits for joined workers
/// after its own share is done and, past a threshold, runs jobs alone for a while.
#[derive(Default)]
struct Adapt {
    stall: f32,
    solo_left: u32,
}

impl Adapt {
    /// Records one job (seconds the caller worked, then waited for joined workers) and
    /// says whether to run the next jobs alone. Only the wait beyond half the caller's
    /// own work counts: a healthy worker finishing its last chunk keeps the caller
    /// waiting up to one chunk (a quarter of a long prefill GEMM, milliseconds), which
    /// is not a stall; a preempted worker on a short op keeps it waiting many times
    /// the op. Counting the raw wait sent every long prefill to one thread.
    fn record(&mut self, worked: f32, waited: f32) -> bool {
        let excess = (waited - 0.5 * worked).max(0.0);
        self.stall = 0.9 * self.stall + 0.1 * excess.min(0.02);
        if self.stall > STALL_LIMIT_S {
            self.stall = 0.0;
            self.solo_left = SOLO_JOBS;
            return true;
        }
        false
    }
}

thread_local! {
    static IN_POOL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

static POOL: OnceLock<Pool> = OnceLock::new();

pub(super) fn get(threads: usize) -> &'static Pool {
    POOL.get_or_init(|| Pool::new(threads.saturating_sub(1)))
}

impl Pool {
    fn new(workers: usize) -> Self {
        let shared = Arc::new(Shared {
            slot: Mutex::new(Slot {
                job: std::ptr::null(),
                open: false,
            }),
            generation: AtomicU64::new(0),
            active: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            threads: OnceLock::new(),
        });
        let mut handles = Vec::new();
        for i in 0..workers {
            let s = shared.clone();
            match std::thread::Builder::new()
                .name(format!("hearth-cpu-{i}"))
                .spawn(move || worker(&s))
            {
                Ok(h) => handles.push(h.thread().clone()),
                Err(e) => tracing::warn!(error = %e, "cannot start a CPU worker thread"),
            }
        }
        let _ = shared.threads.set(handles);
        Pool {
            shared,
            call: Mutex::new(Adapt::default()),
        }
    }

    pub(super) fn run(&self, n_items: usize, chunk: usize, f: &ChunkFn<'_>) {
        let inline = || f(0..n_items);
        if IN_POOL.with(|c| c.get()) {
            return inline();
        }
        let Ok(mut adapt) = self.call.try_lock() else {
            return inline();
        };
        if adapt.solo_left > 0 {
            adapt.solo_left -= 1;
            return inline();
        }
        let sh = &*self.shared;
        let job = Job {
            cursor: AtomicUsize::new(0),
            n_items,
            chunk,
            // SAFETY: the lifetime is erased only for as long as the job stays open,
            // which ends before this function returns.
            f: unsafe { std::mem::transmute::<*const ChunkFn<'_>, *const ChunkFn<'static>>(f) },
        };
        {
            let mut slot = sh.slot.lock().unwrap_or_else(|e| e.into_inner());
            slot.job = &job;
            slot.open = true;
        }
        sh.generation.fetch_add(1, Ordering::SeqCst);
        if sh.sleepers.load(Ordering::SeqCst) > 0 {
            for t in sh.threads.get().into_iter().flatten() {
                t.unpark();
            }
        }
        let started = std::time::Instant::now();
        IN_POOL.with(|c| c.set(true));
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| job.work()));
        IN_POOL.with(|c| c.set(false));
        let worked = started.elapsed();
        {
            let mut slot = sh.slot.lock().unwrap_or_else(|e| e.into_inner());
            slot.open = false;
            slot.job = std::ptr::null();
        }
        // Only workers that joined are waited for; they are running by definition.
        let mut spins = 0u32;
        while sh.active.load(Ordering::Acquire) != 0 {
            spins += 1;
            if spins < 256 {
                std::hint::spin_loop();
            } else {
                // A joined worker may have lost its core to another process.
                std::thread::yield_now();
            }
        }
        // A healthy chunk ends within tens of microseconds of the caller's last one;
        // a preempted worker keeps the caller waiting for a time slice (milliseconds).
        let waited = started.elapsed().saturating_sub(worked).as_secs_f32();
        if adapt.record(worked.as_secs_f32(), waited) {
            tracing::debug!("CPU pool stalls on preempted workers; running jobs alone for a while");
        }
        if let Err(p) = result {
            std::panic::resume_unwind(p);
        }
        if sh.panicked.swap(false, Ordering::SeqCst) {
            panic!("a CPU kernel panicked on a worker thread");
        }
    }
}

fn worker(sh: &Shared) {
    IN_POOL.with(|c| c.set(true));
    let mut seen = sh.generation.load(Ordering::SeqCst);
    loop {
        let mut spins = 0u32;
        let mut since = std::time::Instant::now();
        loop {
            let g = sh.generation.load(Ordering::Acquire);
            if g != seen {
                seen = g;
                break;
            }
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(64) || since.elapsed() < SPIN_BEFORE_PARK {
                std::hint::spin_loop();
            } else {
                sh.sleepers.fetch_add(1, Ordering::SeqCst);
                if sh.generation.load(Ordering::SeqCst) == seen {
                    std::thread::park();
                }
                sh.sleepers.fetch_sub(1, Ordering::SeqCst);
                since = std::time::Instant::now();
            }
        }
        let job = {
            let slot = sh.slot.lock().unwrap_or_else(|e| e.into_inner());
            if !slot.open {
                continue; // too late for that job
            }
            sh.active.fetch_add(1, Ordering::AcqRel);
            slot.job
        };
        // SAFETY: the job stays open, and alive, until `active` drops back to zero.
        let r = std::panic::catch_unwind(AssertUnwindSafe(|| unsafe { (*job).work() }));
        if r.is_err() {
            sh.panicked.store(true, Ordering::SeqCst);
        }
        sh.active.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_jobs_with_uneven_ends_keep_the_workers() {
        // A 4 ms prefill GEMM whose last chunk ends 1 ms after the caller's.
        let mut a = Adapt::default();
        assert!((0..1000).all(|_| !a.record(4e-3, 1e-3)));
        assert_eq!(a.solo_left, 0);
    }

    #[test]
    fn short_jobs_waiting_on_a_preempted_worker_go_solo() {
        // 30 us decode ops, each kept waiting 3 ms by a worker that lost its core.
        let mut a = Adapt::default();
        assert!((0..20).any(|_| a.record(30e-6, 3e-3)));
        assert_eq!(a.solo_left, SOLO_JOBS);
    }

    #[test]
    fn every_item_runs_once_even_from_many_callers() {
        let pool = Pool::new(3);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for n in [1usize, 7, 100, 1000] {
                        let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                        pool.run(n, 3, &|r: std::ops::Range<usize>| {
                            for i in r {
                                hits[i].fetch_add(1, Ordering::Relaxed);
                            }
                        });
                        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
                    }
                });
            }
        });
    }
}
