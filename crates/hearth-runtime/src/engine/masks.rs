//! Token masks for constrained rows, off the engine thread, on a fixed pool of workers.
//!
//! A step's sampled token is what advances a row's matcher, so step n+1's mask cannot
//! start before step n samples; what can overlap is everything after that. Right after
//! sampling, the engine consumes each constrained row's token (it must know whether the
//! grammar accepted before it schedules the next step; a token costs microseconds) and
//! hands the matcher to a worker, which computes the row's next mask while the engine
//! sends output, takes commands, schedules, builds the batch and runs the next forward
//! pass; the workers spread a batch's rows between them. The engine takes the matcher
//! back just before it samples that row again. A new request's first mask starts at
//! submission, so it overlaps the prompt's prefill. (Consuming the tokens on the
//! workers too was measured first: on the loaded 2-core machine the engine then waited
//! longer for the workers to wake than the tokens take; benches/RESULTS.md.)
//!
//! Bounds: the pool's size is fixed at start; a row has at most one job in flight, so
//! the queue holds at most one job per request in flight; every wait for a worker ends
//! by `WAIT_LIMIT`. A matcher that errs or panics fails its own request only (a worker
//! survives a panic); a mask that comes back for a request that ended is dropped.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::supervisor::panic_message;
use super::Active;
use crate::constraint::{Progress, SeqConstraint};
use crate::scheduler::SeqId;

/// Longest the engine waits for a worker's mask before it fails the rows still out.
/// llguidance's own limits (lexer fuel, items per step) keep a mask far below it.
const WAIT_LIMIT: Duration = Duration::from_secs(30);

/// Most workers, whatever the CPU count: masks are small next to a forward pass.
const MAX_WORKERS: usize = 8;

/// Where a constrained request's matcher is.
pub(super) enum Slot {
    /// On the engine thread, with the mask for the request's next token.
    Ready(Box<SeqConstraint>),
    /// With a worker, computing that mask.
    Away,
    /// The matcher failed; the request's next row allows only EOS, then it fails.
    Failed(String),
}

struct Job {
    id: SeqId,
    matcher: Box<SeqConstraint>,
    /// Fault injection (tests only): the job panics.
    panic: bool,
}

enum Report {
    /// The matcher, with its next mask computed (or its failure recorded).
    Back {
        id: SeqId,
        matcher: Box<SeqConstraint>,
        secs: f64,
    },
    /// The job panicked; the matcher is gone.
    Panicked { id: SeqId, reason: String },
}

pub(super) struct MaskPool {
    jobs: mpsc::Sender<Job>,
    reports: mpsc::Receiver<Report>,
    /// The row of a request whose matcher failed.
    eos_only: Vec<u32>,
    /// Masks computed; their seconds on the workers; the engine thread's seconds on
    /// constraints (consuming tokens, waiting for masks).
    pub masks: u64,
    pub work_secs: f64,
    pub engine_secs: f64,
}

impl MaskPool {
    pub fn start(eos_ids: &[u32]) -> std::io::Result<Self> {
        let (jobs, job_rx) = mpsc::channel::<Job>();
        let (report_tx, reports) = mpsc::channel();
        let job_rx = Arc::new(Mutex::new(job_rx));
        let n = crate::threads::num_threads().clamp(1, MAX_WORKERS);
        for i in 0..n {
            let (job_rx, report_tx) = (job_rx.clone(), report_tx.clone());
            std::thread::Builder::new()
                .name(format!("hearth-mask-{i}"))
                .spawn(move || work(&job_rx, &report_tx))?;
        }
        let mut eos_only = Vec::new();
        for &e in eos_ids {
            let word = e as usize / 32;
            if word >= eos_only.len() {
                eos_only.resize(word + 1, 0);
            }
            eos_only[word] |= 1 << (e % 32);
        }
        Ok(Self {
            jobs,
            reports,
            eos_only,
            masks: 0,
            work_secs: 0.0,
            engine_secs: 0.0,
        })
    }

    /// Hands a matcher to a worker for its next mask; returns the request's slot.
    pub fn send(&self, id: SeqId, matcher: Box<SeqConstraint>, panic: bool) -> Slot {
        match self.jobs.send(Job { id, matcher, panic }) {
            Ok(()) => Slot::Away,
            Err(_) => Slot::Failed("the output constraint's workers are gone".into()),
        }
    }

    /// Consumes each sampled row's token and sends its matcher for the next mask.
    /// Returns the rows whose grammar ended (accepted, or failed: their request fails).
    pub fn advance(
        &mut self,
        active: &mut HashMap<SeqId, Active>,
        sampled: &[(SeqId, u32)],
        panic: &dyn Fn(SeqId) -> bool,
    ) -> HashMap<SeqId, Progress> {
        let started = Instant::now();
        let mut ended = HashMap::new();
        for &(id, token) in sampled {
            let Some(slot) = active.get_mut(&id).and_then(|a| a.constraint.as_mut()) else {
                continue;
            };
            let progress = match std::mem::replace(slot, Slot::Away) {
                Slot::Ready(mut m) => match catch_unwind(AssertUnwindSafe(|| m.advance(token))) {
                    Ok(Progress::Continue) => {
                        *slot = self.send(id, m, panic(id));
                        continue;
                    }
                    Ok(p) => p,
                    Err(p) => Progress::Failed(format!(
                        "the output constraint failed: {}",
                        panic_message(&*p)
                    )),
                },
                Slot::Failed(reason) => Progress::Failed(reason),
                Slot::Away => Progress::Failed("the output constraint was not ready".into()),
            };
            if let Progress::Failed(reason) = &progress {
                *slot = Slot::Failed(reason.clone());
            }
            ended.insert(id, progress);
        }
        self.engine_secs += started.elapsed().as_secs_f64();
        ended
    }

    /// Waits until each of `ids` that has a constraint holds its mask (or its failure).
    pub fn collect(&mut self, active: &mut HashMap<SeqId, Active>, ids: &[SeqId]) {
        let started = Instant::now();
        let deadline = started + WAIT_LIMIT;
        let away = |active: &HashMap<SeqId, Active>| {
            ids.iter().any(|id| {
                matches!(
                    active.get(id).and_then(|a| a.constraint.as_ref()),
                    Some(Slot::Away)
                )
            })
        };
        while away(active) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.reports.recv_timeout(left) {
                Ok(report) => self.apply(active, report),
                Err(_) => {
                    let reason = format!(
                        "the output constraint's mask took longer than {} s",
                        WAIT_LIMIT.as_secs()
                    );
                    for id in ids {
                        if let Some(slot) = active.get_mut(id).and_then(|a| a.constraint.as_mut()) {
                            if matches!(slot, Slot::Away) {
                                *slot = Slot::Failed(reason.clone());
                            }
                        }
                    }
                    break;
                }
            }
        }
        // Masks that came back early are taken without waiting.
        while let Ok(report) = self.reports.try_recv() {
            self.apply(active, report);
        }
        self.engine_secs += started.elapsed().as_secs_f64();
    }

    /// The mask of a request's next row: its matcher's, or EOS alone if it failed.
    pub fn row_mask<'a>(&'a self, slot: &'a Slot) -> &'a [u32] {
        match slot {
            Slot::Ready(m) => m.mask(),
            _ => &self.eos_only,
        }
    }

    fn apply(&mut self, active: &mut HashMap<SeqId, Active>, report: Report) {
        let (id, back) = match report {
            Report::Back { id, matcher, secs } => {
                self.work_secs += secs;
                self.masks += 1;
                let back = match matcher.failure() {
                    Some(f) => Slot::Failed(f.to_string()),
                    None => Slot::Ready(matcher),
                };
                (id, back)
            }
            Report::Panicked { id, reason } => (
                id,
                Slot::Failed(format!("the output constraint failed: {reason}")),
            ),
        };
        // A request that ended meanwhile has no slot: its mask is dropped.
        if let Some(slot @ Slot::Away) = active.get_mut(&id).and_then(|a| a.constraint.as_mut()) {
            *slot = back;
        }
    }
}

fn work(jobs: &Mutex<mpsc::Receiver<Job>>, reports: &mpsc::Sender<Report>) {
    loop {
        // Held only while taking a job; no code that can panic runs under it.
        let job = match jobs.lock().unwrap_or_else(|p| p.into_inner()).recv() {
            Ok(job) => job,
            Err(_) => return, // the engine is gone
        };
        let id = job.id;
        match catch_unwind(AssertUnwindSafe(|| mask(job))) {
            Ok(back) => {
                let _ = reports.send(back);
            }
            Err(p) => {
                let reason = panic_message(&*p);
                tracing::error!(id, %reason, "an output constraint's matcher panicked");
                let _ = reports.send(Report::Panicked { id, reason });
            }
        }
    }
}

fn mask(mut job: Job) -> Report {
    if job.panic {
        panic!("injected fault: hearth-fault:mask-panic");
    }
    let started = Instant::now();
    job.matcher.compute_mask();
    Report::Back {
        id: job.id,
        secs: started.elapsed().as_secs_f64(),
        matcher: job.matcher,
    }
}
