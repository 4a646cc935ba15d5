//! The engine's supervisor: each piece of the loop's work (a command, an iteration of
//! schedule, forward, sample and output hand-off) runs under `catch_unwind`, so a
//! panic or an error in it ends the requests it touched, not the engine. Faults
//! escalate, counted with no step that ran work in between:
//!
//! 1. the first fails the requests it is theirs (the step's batch, or the request
//!    being submitted), checks that the scheduler's bookkeeping still agrees with
//!    itself, and the engine serves the rest;
//! 2. the second (or a first that no request can be blamed for, or that left the
//!    scheduler inconsistent) fails every request in flight and rebuilds the engine's
//!    state: scheduler, block allocator, KV cache tensors, sampler states;
//! 3. a third, a failed rebuild, or a CUDA error (sticky: the context is unusable
//!    after one, every later call fails) makes the engine DEFUNCT: every request fails,
//!    new ones are refused, and `EngineHandle::defunct` wakes whoever waits on it (the
//!    server exits so its own supervisor restarts the process).
//!
//! Each fault gets a log id, logged with the panic message and named in the error of
//! every request it ended, so a user's error leads to the log line.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::fault::Faults;
use super::{Engine, Shared};
use crate::error::{Result, RuntimeError};
use crate::kv_cache::KvCacheTensors;
use crate::output::OutputMsg;
use crate::request::{FinishReason, Priority};
use crate::scheduler::SeqId;

/// Faults in a row at which the engine gives up (after one rebuild).
const DEFUNCT_AFTER: u32 = 3;

pub(super) struct Supervision {
    /// Faults since the last step that ran work.
    in_a_row: u32,
    /// The requests the work in progress is about: a fault now is theirs.
    pub current: Vec<SeqId>,
    /// A request being submitted, not yet in `active`, and its class (whose queue
    /// slot it holds).
    pub submitting: Option<SeqId>,
    pub submitting_class: Priority,
    pub faults: Faults,
}

impl Supervision {
    pub fn new(faults: Faults) -> Self {
        Self {
            in_a_row: 0,
            current: Vec::new(),
            submitting: None,
            submitting_class: Priority::Normal,
            faults,
        }
    }
}

/// The engine cannot serve again; the reason is in every error and on `/health`.
pub(super) struct Defunct;

impl Shared {
    /// Refuses new work from now on and wakes `EngineHandle::defunct`.
    pub(super) fn set_defunct(&self, reason: String) {
        self.alive.store(false, Ordering::SeqCst);
        self.defunct.send_if_modified(|d| {
            let first = d.is_none();
            if first {
                *d = Some(reason);
            }
            first
        });
    }
}

impl super::EngineHandle {
    /// Why the engine is DEFUNCT (it gave up after faults it could not recover from
    /// and fails every request), or None while it serves.
    pub fn defunct_reason(&self) -> Option<String> {
        self.shared.defunct.borrow().clone()
    }

    /// Resolves once the engine is DEFUNCT, with the reason.
    pub async fn defunct(&self) -> String {
        let mut rx = self.shared.defunct.subscribe();
        let reason = match rx.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone(),
            // The sender lives in `shared`, which this handle holds: never reached.
            Err(_) => None,
        };
        match reason {
            Some(reason) => reason,
            None => std::future::pending().await,
        }
    }
}

/// Marks the engine dead however its thread ends, so handles refuse new work and
/// health checks report it; a panic the supervisor missed makes it DEFUNCT.
pub(super) struct AliveGuard(pub Arc<Shared>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.alive.store(false, Ordering::SeqCst);
        if std::thread::panicking() {
            self.0
                .set_defunct("the engine thread panicked outside its supervisor".into());
        }
    }
}

impl Engine {
    /// Runs `work`; on a panic or an error, ends what it touched as the module says.
    /// `Err` means the engine is DEFUNCT (its requests already failed).
    pub(super) fn supervise(
        &mut self,
        work: impl FnOnce(&mut Engine) -> Result<()>,
    ) -> std::result::Result<(), Defunct> {
        let outcome = catch_unwind(AssertUnwindSafe(|| work(self)));
        let suspects = std::mem::take(&mut self.sup.current);
        let submitting = self.sup.submitting.take();
        let (fault, sticky) = match outcome {
            Ok(Ok(())) => {
                if !suspects.is_empty() {
                    self.sup.in_a_row = 0; // a step ran work: the fault did not persist
                }
                return Ok(());
            }
            Ok(Err(e)) => (e.to_string(), is_sticky(&e)),
            Err(payload) => {
                let m = panic_message(&*payload);
                let sticky = m.contains("CUDA_ERROR");
                (format!("panic: {m}"), sticky)
            }
        };
        self.sup.in_a_row += 1;
        let log_id = new_log_id();
        if sticky {
            return Err(self.defunct(&log_id, format!("a CUDA error: {fault}"), submitting));
        }
        if self.sup.in_a_row >= DEFUNCT_AFTER {
            let why = format!("{} faults in a row, the last: {fault}", self.sup.in_a_row);
            return Err(self.defunct(&log_id, why, submitting));
        }
        if self.sup.in_a_row == 1 && !(suspects.is_empty() && submitting.is_none()) {
            tracing::error!(log_id = %log_id, %fault, requests = ?suspects, "engine fault: failing the requests it hit and serving the rest");
            let msg = format!("internal fault in the engine (log id {log_id}); see the server log");
            let contained = catch_unwind(AssertUnwindSafe(|| {
                for &id in suspects.iter().chain(&submitting) {
                    self.fail(id, &msg, submitting == Some(id));
                }
                self.scheduler.is_consistent()
            }));
            if matches!(contained, Ok(true)) {
                return Ok(());
            }
            tracing::error!(log_id = %log_id, "the scheduler is inconsistent after the fault");
        }
        self.sup.in_a_row = self.sup.in_a_row.max(2);
        tracing::error!(log_id = %log_id, %fault, in_flight = self.active.len(), "engine fault again: failing every request in flight and rebuilding the engine's state");
        // Rebuilt first, so the requests' errors say whether the engine came back.
        match catch_unwind(AssertUnwindSafe(|| self.rebuild())) {
            Ok(Ok(())) => {
                let msg = format!("internal fault in the engine (log id {log_id}): every request in flight was stopped and the engine's state rebuilt; see the server log");
                self.fail_all(&msg, submitting);
                tracing::warn!(log_id = %log_id, "engine state rebuilt: serving again");
                Ok(())
            }
            Ok(Err(e)) => {
                Err(self.defunct(&log_id, format!("the rebuild failed: {e}"), submitting))
            }
            Err(p) => {
                let why = format!("the rebuild panicked: {}", panic_message(&*p));
                Err(self.defunct(&log_id, why, submitting))
            }
        }
    }

    /// Ends one request with `msg`; a request still being submitted gives back its
    /// queue slot here (`drop_seq` does for the others).
    fn fail(&mut self, id: SeqId, msg: &str, submitting: bool) {
        if !self.drop_seq(id) && submitting {
            let class = self.sup.submitting_class;
            self.shared.pending(class).fetch_sub(1, Ordering::SeqCst);
        }
        self.send_failure(id, msg);
    }

    fn send_failure(&self, id: SeqId, msg: &str) {
        let _ = self.output.send(OutputMsg::Finish {
            id,
            reason: FinishReason::Error,
            error: Some(msg.to_string()),
        });
    }

    /// Ends every request in flight without asking the scheduler, which may be broken.
    fn fail_all(&mut self, msg: &str, submitting: Option<SeqId>) {
        let active = std::mem::take(&mut self.active);
        for (&id, a) in &active {
            if !a.admitted {
                self.shared
                    .pending(a.priority)
                    .fetch_sub(1, Ordering::SeqCst);
            }
            self.send_failure(id, msg);
        }
        if let Some(id) = submitting.filter(|id| !active.contains_key(id)) {
            let class = self.sup.submitting_class;
            self.shared.pending(class).fetch_sub(1, Ordering::SeqCst);
            self.send_failure(id, msg);
        }
    }

    /// A new scheduler and block allocator, and new KV cache tensors (allocating them
    /// again also tells whether the device still works); sampler states went with
    /// `active`.
    fn rebuild(&mut self) -> Result<()> {
        self.sup.faults.on_rebuild()?;
        self.scheduler = self.scheduler.emptied();
        self.penalties.clear();
        let kv_dtype = self.cache.dtype();
        self.cache.release();
        let m = &self.model;
        self.cache = KvCacheTensors::new(
            m.config(),
            self.scheduler.allocator().num_blocks(),
            self.scheduler.block_size(),
            kv_dtype,
            m.device(),
        )?;
        if !self.scheduler.is_consistent() {
            return Err(RuntimeError::Device(
                "the new scheduler is inconsistent".into(),
            ));
        }
        Ok(())
    }

    /// Marks the engine DEFUNCT (before failing the requests, so whoever reads their
    /// errors finds the health check saying so) and fails everything in flight.
    fn defunct(&mut self, log_id: &str, why: String, submitting: Option<SeqId>) -> Defunct {
        tracing::error!(log_id = %log_id, reason = %why, in_flight = self.active.len(), "the engine is DEFUNCT: failing every request; the process must be restarted");
        let reason = format!("{why} (log id {log_id})");
        self.shared.set_defunct(reason.clone());
        let msg = format!(
            "internal fault: the engine is DEFUNCT ({reason}); the server must be restarted"
        );
        self.fail_all(&msg, submitting);
        self.cache.release();
        Defunct
    }

    /// After DEFUNCT: until every handle is gone, fails what still arrives (a submit
    /// that raced the flag).
    pub(super) fn refuse_all(&mut self) {
        let reason = self.shared.defunct.borrow().clone().unwrap_or_default();
        let msg = format!("the engine is DEFUNCT ({reason}); the server must be restarted");
        while let Ok(cmd) = self.rx.recv() {
            if let super::Command::Submit {
                id,
                req,
                priority,
                events,
                arrived,
            } = cmd
            {
                self.open_output(id, &req, events, arrived, Default::default());
                self.shared.pending(priority).fetch_sub(1, Ordering::SeqCst);
                self.send_failure(id, &msg);
            }
        }
    }
}

/// Candle's CUDA errors, however wrapped, and anything naming a CUDA driver error.
fn is_sticky(e: &RuntimeError) -> bool {
    fn cuda(e: &candle_core::Error) -> bool {
        use candle_core::Error as E;
        match e {
            E::Cuda(_) => true,
            E::WithBacktrace { inner, .. }
            | E::Context { inner, .. }
            | E::WithPath { inner, .. } => cuda(inner),
            other => other.to_string().contains("CUDA_ERROR"),
        }
    }
    match e {
        RuntimeError::Tensor(c) => cuda(c),
        other => other.to_string().contains("CUDA_ERROR"),
    }
}

/// Names one fault in the log and in the errors it caused.
pub(crate) fn new_log_id() -> String {
    format!("{:08x}", rand::random::<u32>())
}

pub(crate) fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".into()
    }
}
